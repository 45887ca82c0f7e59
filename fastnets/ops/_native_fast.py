"""Module-level fast paths of the `native` backend: `auto` on a CPU tensor must cost no more than eager.

The modules (fastnets.nn.Conv2d, fastnets.nn.AvgPool2d) test `fast_auto` first (a module global and two
attribute reads) and then call torch exactly as torch.nn does, before any backend resolution, argument
checking or custom op. Bad input is diagnosed after torch rejects it, by the same checks every backend runs,
so the errors still name the argument (fastnets/nn/conv.py).
"""
import torch

from .. import backends as _backends  # the module, read at call time: use_backend rebinds its selection


def fast_auto(t):
    """True when the selection is `auto` and t is a CPU tensor (native kernels, torch's own call)."""
    return _backends._current == "auto" and isinstance(t, torch.Tensor) and t.is_cpu


class _AvgPool2x2(torch.autograd.Function):
    """2x2 / stride-2 average pooling of an even-sized NCHW or channels_last tensor as three strided adds:
    aten's NCHW avg_pool2d walks each window in a scalar loop, several times slower on the CPU (measured in
    fastnets/bench/cpu_ratios.py). The adds follow aten's order, ((x00 + x01) + x10) + x11, then / 4 (a
    multiplication by 0.25: the same rounding), so the output is bit-identical to aten's and a model trained
    with it follows eager's run exactly. Backward: grad / 4 broadcast over each window (aten's, exactly)."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        ctx.cl = (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)
        top, bottom = x[:, :, 0::2], x[:, :, 1::2]
        y = top[..., 0::2] + top[..., 1::2]
        y += bottom[..., 0::2]
        y += bottom[..., 1::2]
        return y.mul_(0.25)

    @staticmethod
    def backward(ctx, g):
        n, c, h, w = ctx.shape
        q = g * 0.25
        if ctx.cl:  # built as NHWC, one copy: (n, h/2, 1, w/2, 1, c) broadcast over each window
            nhwc = q.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(n, h // 2, 2, w // 2, 2, c)
            dx = nhwc.reshape(n, h, w, c).permute(0, 3, 1, 2)
        else:
            dx = q[:, :, :, None, :, None].expand(n, c, h // 2, 2, w // 2, 2).reshape(n, c, h, w)
        fmt = torch.channels_last if ctx.cl else torch.contiguous_format
        if not dx.is_contiguous(memory_format=fmt):  # a one-window reshape stays a broadcast view
            dx = dx.contiguous(memory_format=fmt)
        return dx


def avg_pool2x2_ok(pool, x):
    """pool (an nn.AvgPool2d) is the plain 2x2 / stride 2 window and x an fp32/fp64 4-D CPU tensor of even
    height and width (the fast path's contract; everything else runs aten's avg_pool2d)."""
    return (pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0))
            and not pool.ceil_mode and pool.divisor_override is None and x.dim() == 4
            and x.dtype in (torch.float32, torch.float64) and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0
            and x.shape[2] > 0 and x.shape[3] > 0 and not torch.compiler.is_compiling())


def avg_pool2x2(x):
    return _AvgPool2x2.apply(x)
