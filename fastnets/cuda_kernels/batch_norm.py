"""The `cuda` backend of the batch_norm op family: the four primitives of fastnets/reference/batch_norm.py
(same signatures, semantics and output dtypes), run by the CUDA C++ kernels in csrc/batch_norm.cu.

The layout arguments are those of fastnets._tensors.dense_layout: x is (N, C, S) or (N, S, C) in memory,
and dy, y and residual have x's strides; the kernels check this and raise otherwise.
"""
import torch

from .. import _extension
from ..activations import code

if not _extension.load():  # the registry imports this module only when the backend is available
    raise ImportError(f"fastnets cuda backend: {_extension.reason()}")
if not hasattr(torch.ops.fastnets_cuda, "bn_apply") or "int act" not in str(
    torch.ops.fastnets_cuda.bn_apply.default._schema
):
    raise ImportError(
        "fastnets cuda backend: the compiled extension fastnets._C predates the fused activations or the "
        "fastnets_cuda namespace of its ops; rebuild with `pip install --no-build-isolation -e .`"
    )

_ops = torch.ops.fastnets_cuda


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
