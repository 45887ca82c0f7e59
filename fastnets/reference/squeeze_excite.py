"""Squeeze-and-excitation (+ residual add + ReLU) primitives in plain PyTorch, on any device and layout.

Every backend implements the same primitives (see fastnets/ops/squeeze_excite.py for how they compose):
  pool(x, channels_last)                          -> pooled [N, C], the mean of each channel of each sample
  excite(pooled, w1, b1, w2, b2)                  -> (hidden = relu(pooled @ w1.T + b1) [N, R],
                                                      gate = sigmoid(hidden @ w2.T + b2) [N, C])
  scale(x, gate, residual, relu, channels_last)   -> y = [relu](x * gate[n, c] [+ residual])
  backward_reduce(dy, x, y, relu, channels_last)  -> grad_gate [N, C] = sum over space of g * x,
                                                      g = dy masked by y > 0 when relu
  backward_apply(dy, y, gate, gp, relu, write_g, channels_last)
                                                  -> (dx = g * gate[n, c] [+ gp[n, c]], g or None)
x is 4-D (N, C, H, W), NCHW or channels_last; w1 is [R, C], w2 is [C, R] (1x1 conv weights flattened).
[N, C] and [N, R] tensors (pooled, hidden, gate, grad_gate, gp) are in the accumulation dtype: float64 for
float64 inputs, float32 otherwise; weights may be float32 with float16/bfloat16 activations.
"""
import torch


def acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _nc(v):
    return v[:, :, None, None]


def _relu_mask(dy, y, relu):
    # As torch's threshold_backward: the gradient passes where the saved output is > 0.
    return torch.where(y > 0, dy, torch.zeros((), dtype=dy.dtype, device=dy.device)) if relu else dy


def pool(x, channels_last):
    return x.to(acc_dtype(x)).mean(dim=(2, 3))


def excite(pooled, w1, b1, w2, b2):
    acc = pooled.dtype
    hidden = torch.relu(torch.addmm(b1.to(acc), pooled, w1.to(acc).t()))
    gate = torch.sigmoid(torch.addmm(b2.to(acc), hidden, w2.to(acc).t()))
    return hidden, gate


def scale(x, gate, residual, relu, channels_last):
    v = x.to(gate.dtype) * _nc(gate)
    if residual is not None:
        v = v + residual.to(gate.dtype)
    if relu:
        v = torch.relu(v)
    return v.to(x.dtype)


def backward_reduce(dy, x, y, relu, channels_last):
    acc = acc_dtype(x)
    g = _relu_mask(dy, y, relu).to(acc)
    return (g * x.to(acc)).sum(dim=(2, 3))


def backward_apply(dy, y, gate, gp, relu, write_g, channels_last):
    g = _relu_mask(dy, y, relu)
    dx = g.to(gate.dtype) * _nc(gate)
    if gp is not None:
        dx = dx + _nc(gp)
    return dx.to(dy.dtype), (g.clone() if write_g else None)
