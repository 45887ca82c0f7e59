"""The `cuda` backend of the batch_norm op family: the four primitives of fastnets/reference/batch_norm.py
(same signatures, semantics and output dtypes), run by the CUDA C++ kernels in csrc/batch_norm.cu.

The layout arguments are those of fastnets._checks.dense_layout: x is (N, C, S) or (N, S, C) in memory,
and dy, y and residual have x's strides; the kernels check this and raise otherwise.
"""
import torch

from .. import _extension

if not _extension.load():  # the registry imports this module only when the backend is available
    raise ImportError(f"fastnets cuda backend: {_extension.reason()}")

_ops = torch.ops.fastnets


def stats(x, channels_last, eps):
    return _ops.cuda_bn_stats(x, bool(channels_last), float(eps))


def apply(x, scale, shift, residual, relu, channels_last):
    return _ops.cuda_bn_apply(x, scale, shift, residual, bool(relu), bool(channels_last))


def backward_reduce(dy, x, y, mean, relu, channels_last):
    return _ops.cuda_bn_backward_reduce(dy, x, y, mean, bool(relu), bool(channels_last))


def backward_apply(dy, x, y, a, b, d, mean, relu, train, write_g, channels_last):
    dx, g = _ops.cuda_bn_backward_apply(
        dy, x, y, a, b, d, mean, bool(relu), bool(train), bool(write_g), bool(channels_last)
    )
    return dx, (g if write_g else None)
