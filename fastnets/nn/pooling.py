"""Drop-in torch.nn.AvgPool2d whose 2x2 / stride-2 window runs as two strided adds on CPU tensors under
`auto` (fastnets/ops/_native_fast.py: avg_pool2x2), several times faster than aten's NCHW avg_pool2d kernel on
the CPU; every other configuration, device, dtype or backend is torch's own avg_pool2d."""
from torch import nn

from ..ops import _native_fast


class AvgPool2d(nn.AvgPool2d):
    """torch.nn.AvgPool2d (same arguments, repr, no state)."""

    def forward(self, input):
        if _native_fast.fast_auto(input) and _native_fast.avg_pool2x2_ok(self, input):
            return _native_fast.avg_pool2x2(input)
        return super().forward(input)
