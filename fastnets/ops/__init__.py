"""The fastnets torch.library ops and their functional wrappers."""
from .batch_norm import batch_norm
from .conv import conv2d, conv2d_batch_norm
from .squeeze_excite import se_excite, se_scale, se_squeeze, squeeze_excite

__all__ = ["conv2d", "conv2d_batch_norm", "batch_norm", "squeeze_excite", "se_squeeze", "se_excite", "se_scale"]
