"""BatchNorm (+ residual add + activation) primitives in plain PyTorch, on any device and layout.

Every backend implements the same four primitives (see fastnets/ops/batch_norm.py for how they compose):
  stats(x, channels_last, eps)                         -> (mean, invstd), per channel, biased variance
  apply(x, scale, shift, residual, act, channels_last, act_param=0.0)
                                                       -> y = act(x * scale + shift [+ residual])
  backward_reduce(dy, x, y, mean, act, channels_last, act_param=0.0, scale=None, shift=None, residual=None)
                                                       -> (sum g, sum g * (x - mean)), g = dy * act'(v)
  backward_apply(dy, x, y, a, b, d, mean, act, train, write_g, channels_last, act_param=0.0, scale=None,
                 shift=None, residual=None)            -> (dx = a*g [+ b*(x - mean) + d], g or None)
`act` is an activation code of fastnets/activations.py (a legacy bool means relu/identity). relu's
gradient is masked by the saved output y (y > 0, as threshold_backward); every other non-identity
activation recomputes the pre-activation v = x * scale + shift [+ residual], so scale and shift (and the
residual, when the forward had one) are required there and y is not.
Per-channel vectors are in the accumulation dtype: float64 for float64 inputs, float32 otherwise.
"""
import torch

from .. import activations
from .._tensors import acc_dtype


def _per_channel(v, x):
    return v.view([1, -1] + [1] * (x.dim() - 2))


def _reduce_dims(x):
    return [0] + list(range(2, x.dim()))


def _act_grad(dy, x, y, act, act_param, scale, shift, residual, acc):
    """g = dy * act'(v), in dy's dtype for identity/relu (as the kernels), else in `acc`."""
    act = activations.code(act)
    if act == 0:
        return dy
    if act == 1:  # the mask comes from the saved output, as torch's threshold_backward
        return torch.ops.aten.threshold_backward(dy, y, 0)
    v = x.to(acc) * _per_channel(scale, x) + _per_channel(shift, x)
    if residual is not None:
        v = v + residual.to(acc)
    return activations.backward(dy.to(acc), v, None, act, act_param)


def stats(x, channels_last, eps):
    xf = x.to(acc_dtype(x))
    var, mean = torch.var_mean(xf, dim=_reduce_dims(x), unbiased=False)
    return mean, torch.rsqrt(var + eps)


def apply(x, scale, shift, residual, act, channels_last, act_param=0.0):
    v = x.to(scale.dtype) * _per_channel(scale, x) + _per_channel(shift, x)
    if residual is not None:
        v = v + residual.to(scale.dtype)
    return activations.forward(v, act, act_param).to(x.dtype)


def backward_reduce(dy, x, y, mean, act, channels_last, act_param=0.0, scale=None, shift=None, residual=None):
    g = _act_grad(dy, x, y, act, act_param, scale, shift, residual, mean.dtype).to(mean.dtype)
    dims = _reduce_dims(x)
    return g.sum(dims), (g * (x.to(mean.dtype) - _per_channel(mean, x))).sum(dims)


def backward_apply(dy, x, y, a, b, d, mean, act, train, write_g, channels_last, act_param=0.0, scale=None,
                   shift=None, residual=None):
    g = _act_grad(dy, x, y, act, act_param, scale, shift, residual, a.dtype)
    dx = g.to(a.dtype) * _per_channel(a, x)
    if train:
        dx = dx + (x.to(a.dtype) - _per_channel(mean, x)) * _per_channel(b, x) + _per_channel(d, x)
    return dx.to(x.dtype), (g.to(dy.dtype).clone() if write_g else None)
