"""The `cuda` backend of the squeeze_excite op family: the primitives of fastnets/reference/squeeze_excite.py
(same signatures, semantics and output dtypes), run by the CUDA C++ kernels in csrc/squeeze_excite.cu.

Outputs are allocated here with fastnets._tensors.new_output (NaN-poisoned under the tests) and written in
place by the internal ops `torch.ops.fastnets_cuda.se_*`. The layout arguments are those of
fastnets._tensors.dense_layout; the kernels check them and raise otherwise.
"""
import torch

from .. import _tensors
from . import require_ops
from .._tensors import acc_dtype

_ops = require_ops("se_apply", "se_excite", "inner_act",
                   "has no squeeze_excite kernels (it was built before csrc/squeeze_excite.cu had its activation "
                   "arguments)")
_WARPS_PER_BLOCK = 8  # csrc/launch_plans.h: kSeReduceThreads / 32 (one (plane, split) per warp in NCHW)


def _cl_channel_blocks(c, itemsize):
    """Blocks across the channels of the channels_last reduction (launch_plans.h, se_reduce): 32 threads of
    16-byte vectors (one element each when C is not a multiple of the vector)."""
    vec = 16 // itemsize if c % (16 // itemsize) == 0 else 1
    cols = -(-c // vec)
    return -(-cols // min(32, 1 << (cols - 1).bit_length()))


def _splits(x, channels_last, split):
    """Splits of the spatial range: enough blocks to fill the GPU when N * C alone does not."""
    n, c, h, w = x.shape
    s = h * w
    if split is not None:
        return max(1, min(int(split), s))
    sms = _tensors.sm_count(x.device)
    blocks = n * _cl_channel_blocks(c, x.element_size()) if channels_last else -(-(n * c) // _WARPS_PER_BLOCK)
    want = 8 * sms
    if blocks >= want:
        return 1
    # at least 64 spatial positions per split
    return max(1, min(-(-want // blocks), s // 64))


def _reduce(x, dy, y, relu, channels_last, split):
    n, c, h, w = x.shape
    splits = _splits(x, channels_last, split)
    grad = dy is not None
    shape = (n, c) if splits == 1 else (n, splits, c)
    out = _tensors.new_output(x, dtype=acc_dtype(x), shape=shape)
    _ops.se_reduce(x, dy, y if (grad and relu) else None, out, bool(channels_last), bool(relu), not grad and splits == 1)
    if splits == 1:
        return out
    tot = out.sum(1)
    return tot if grad else tot / (h * w)


def pool(x, channels_last, split=None):
    return _reduce(x, None, None, False, channels_last, split)


def backward_reduce(dy, x, y, relu, channels_last, split=None):
    return _reduce(x, dy, y, relu, channels_last, split)


def excite(pooled, w1, b1, w2, b2, inner_act=1, inner_param=0.0, gate=0):
    n, c = pooled.shape
    r = w1.shape[0]
    hidden = _tensors.new_output(pooled, shape=(n, r))
    gate_out = _tensors.new_output(pooled, shape=(n, c))
    _ops.se_excite(pooled.contiguous(), w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(),
                        hidden, gate_out, int(inner_act), float(inner_param), int(gate))
    gate = gate_out
    return hidden, gate


def scale(x, gate, residual, relu, channels_last):
    y = _tensors.new_output(x)
    _ops.se_apply(x, gate.contiguous(), residual, None, y, None, bool(channels_last), False, bool(relu))
    return y


def backward_apply(dy, y, gate, gp, relu, write_g, channels_last):
    dx = _tensors.new_output(dy)
    g = _tensors.new_output(dy) if write_g else None
    _ops.se_apply(
        dy, gate.contiguous(), y if relu else None, gp, dx, g, bool(channels_last), True, bool(relu)
    )
    return dx, g
