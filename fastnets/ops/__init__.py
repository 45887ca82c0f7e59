"""The fastnets torch.library ops and their functional wrappers."""
from .batch_norm import batch_norm

__all__ = ["batch_norm"]
