"""The fastnets torch.library ops and their functional wrappers."""
from .batch_norm import batch_norm
from .conv import conv2d, conv2d_batch_norm
from .conv_prologue import bn_act_conv2d
from .squeeze_excite import se_excite, se_scale, se_squeeze, squeeze_excite

__all__ = ["conv2d", "conv2d_batch_norm", "bn_act_conv2d", "batch_norm", "squeeze_excite", "se_squeeze", "se_excite", "se_scale"]
