"""Drop-in torch.nn replacements that run on fastnets kernels."""
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNormReLU2d, bn_act

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNormReLU2d", "bn_act"]
