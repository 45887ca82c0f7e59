"""The `cuda` backend of the batch_norm op family: the four primitives of fastnets/reference/batch_norm.py
(same signatures, semantics and output dtypes), run by the CUDA C++ kernels in csrc/batch_norm.cu.

The layout arguments are those of fastnets._tensors.dense_layout: x is (N, C, S) or (N, S, C) in memory,
and dy, y and residual have x's strides; the kernels check this and raise otherwise.
"""
import torch

from . import require_ops
from ..activations import code

_ops = require_ops("bn_apply", "bn_apply", "int act",
                   "predates the fused activations or the fastnets_cuda namespace of its ops")


def stats(x, channels_last, eps):
    return _ops.bn_stats(x, bool(channels_last), float(eps))


def apply(x, scale, shift, residual, act, channels_last, act_param=0.0):
    return _ops.bn_apply(x, scale, shift, residual, code(act), float(act_param), bool(channels_last))


def _pre(act, scale, shift, residual):
    """scale, shift, residual as the kernels take them: only for activations that recompute v."""
    if code(act) > 1:
        return residual, scale, shift
    return None, None, None


def backward_reduce(dy, x, y, mean, act, channels_last, act_param=0.0, scale=None, shift=None, residual=None):
    res, sc, sh = _pre(act, scale, shift, residual)
    return _ops.bn_backward_reduce(
        dy, x, y if code(act) == 1 else None, res, sc, sh, mean, code(act), float(act_param), bool(channels_last)
    )


def backward_apply(dy, x, y, a, b, d, mean, act, train, write_g, channels_last, act_param=0.0, scale=None,
                   shift=None, residual=None):
    res, sc, sh = _pre(act, scale, shift, residual)
    dx, g = _ops.bn_backward_apply(
        dy, x, y if code(act) == 1 else None, res, sc, sh, a, b, d, mean, code(act), float(act_param),
        bool(train), bool(write_g), bool(channels_last),
    )
    return dx, (g if write_g else None)
