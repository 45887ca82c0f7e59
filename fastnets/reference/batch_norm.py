"""BatchNorm (+ residual add + ReLU) primitives in plain PyTorch, on any device and layout.

Every backend implements the same four primitives (see fastnets/ops/batch_norm.py for how they compose):
  stats(x, channels_last, eps)                         -> (mean, invstd), per channel, biased variance
  apply(x, scale, shift, residual, relu, channels_last) -> y = [relu](x * scale + shift [+ residual])
  backward_reduce(dy, x, y, mean, relu, channels_last)  -> (sum g, sum g * (x - mean)), g = dy masked by y > 0
  backward_apply(dy, x, y, a, b, d, mean, relu, train, write_g, channels_last)
                                                        -> (dx = a*g [+ b*(x - mean) + d], g or None)
Per-channel vectors are in the accumulation dtype: float64 for float64 inputs, float32 otherwise.
"""
import torch


def acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(v, x):
    return v.view([1, -1] + [1] * (x.dim() - 2))


def _reduce_dims(x):
    return [0] + list(range(2, x.dim()))


def _relu_mask(dy, y, relu):
    # The ReLU mask comes from the saved output, as torch's threshold_backward does: grad where y > 0.
    return torch.where(y > 0, dy, torch.zeros((), dtype=dy.dtype, device=dy.device)) if relu else dy


def stats(x, channels_last, eps):
    xf = x.to(acc_dtype(x))
    var, mean = torch.var_mean(xf, dim=_reduce_dims(x), unbiased=False)
    return mean, torch.rsqrt(var + eps)


def apply(x, scale, shift, residual, relu, channels_last):
    v = x.to(scale.dtype) * _per_channel(scale, x) + _per_channel(shift, x)
    if residual is not None:
        v = v + residual.to(scale.dtype)
    if relu:
        v = torch.relu(v)
    return v.to(x.dtype)


def backward_reduce(dy, x, y, mean, relu, channels_last):
    g = _relu_mask(dy, y, relu).to(mean.dtype)
    dims = _reduce_dims(x)
    return g.sum(dims), (g * (x.to(mean.dtype) - _per_channel(mean, x))).sum(dims)


def backward_apply(dy, x, y, a, b, d, mean, relu, train, write_g, channels_last):
    g = _relu_mask(dy, y, relu)
    dx = g.to(a.dtype) * _per_channel(a, x)
    if train:
        dx = dx + (x.to(a.dtype) - _per_channel(mean, x)) * _per_channel(b, x) + _per_channel(d, x)
    return dx.to(x.dtype), (g.clone() if write_g else None)
