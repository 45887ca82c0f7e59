"""Squeeze-and-excitation (+ residual add + ReLU) primitives in plain PyTorch, on any device and layout.

Every backend implements the same primitives (see fastnets/ops/squeeze_excite.py for how they compose):
  pool(x, channels_last)                          -> pooled [N, C], the mean of each channel of each sample
  excite(pooled, w1, b1, w2, b2, inner_act=relu, inner_param=0.0, gate=sigmoid)
                                                  -> (hidden = inner_act(pooled @ w1.T + b1) [N, R],
                                                      gate = gate(hidden @ w2.T + b2) [N, C])
                                                     (activation and gate codes of fastnets/activations.py)
  scale(x, gate, residual, relu, channels_last)   -> y = [relu](x * gate[n, c] [+ residual])
  backward_reduce(dy, x, y, relu, channels_last)  -> grad_gate [N, C] = sum over space of g * x,
                                                      g = dy masked by y > 0 when relu (threshold_backward)
  backward_apply(dy, y, gate, gp, relu, write_g, channels_last)
                                                  -> (dx = g * gate[n, c] [+ gp[n, c]], g or None)
x is 4-D (N, C, H, W), NCHW or channels_last; w1 is [R, C], w2 is [C, R] (1x1 conv weights flattened).
[N, C] and [N, R] tensors (pooled, hidden, gate, grad_gate, gp) are in the accumulation dtype: float64 for
float64 inputs, float32 otherwise; weights may be float32 with float16/bfloat16 activations.
"""
import torch

from .. import activations
from .._tensors import acc_dtype


def _nc(v):
    return v[:, :, None, None]


def _relu_mask(dy, y, relu):
    # torch's threshold_backward: 0 where the saved output is <= 0 (the gradient passes where it is NaN)
    return torch.ops.aten.threshold_backward(dy, y, 0) if relu else dy


def pool(x, channels_last):
    return x.to(acc_dtype(x)).mean(dim=(2, 3))


def excite(pooled, w1, b1, w2, b2, inner_act=1, inner_param=0.0, gate=0):
    acc = pooled.dtype
    hidden = activations.forward(torch.addmm(b1.to(acc), pooled, w1.to(acc).t()), inner_act, inner_param)
    z = torch.addmm(b2.to(acc), hidden, w2.to(acc).t())
    return hidden, activations.gate_forward(z, activations.GATES[gate])


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
