"""Drop-in torch.nn replacements that run on fastnets kernels."""
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNormAct2d, BatchNormReLU2d, bn_act
from .conv import Conv2d, ConvBNReLU2d, conv_bn_act
from .pooling import AvgPool2d
from .squeeze_excite import SqueezeExcite
from .sync_batch_norm import SyncBatchNorm, SyncBatchNormAct2d, SyncBatchNormReLU2d

__all__ = ["Conv2d", "ConvBNReLU2d", "conv_bn_act", "BatchNorm1d", "BatchNorm2d", "BatchNormReLU2d", "BatchNormAct2d", "bn_act", "SqueezeExcite"]
__all__ += ["AvgPool2d"]
__all__ += ["SyncBatchNorm", "SyncBatchNormReLU2d", "SyncBatchNormAct2d"]
