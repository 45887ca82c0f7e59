"""Convolution primitives in plain PyTorch (F.conv2d: cuDNN on a GPU, oneDNN/native on the CPU).

This is the CPU path, the test oracle and, on a GPU, cuDNN: the conv family's `cuda` backend
(fastnets/ops/_cudnn_conv.py) and the cuDNN half of its measured `auto` (fastnets/ops/_conv_auto.py).
Every conv backend implements the same primitives (see fastnets/ops/conv.py for how they compose); 2-D
convolution, groups=1, symmetric zero padding:

  forward(x, w, bias, scale, shift, residual, stride, padding, dilation, act, out, act_param=0.0, pre=None)
        -> y = act((conv(x, w) [+ bias]) [* scale] [+ shift] [+ residual]): `out`, or a tensor with
           out's strides; act is an activation code of fastnets/activations.py (a legacy bool: relu or
           identity); `pre`, when given (out's strides), receives the pre-activation
  forward_stats(x, w, bias, stride, padding, dilation, out)
        -> (z, mean, var): z = conv(x, w) [+ bias] (`out`, or a tensor with out's strides) and its per
           output channel mean and biased variance
  grad_input(g, w, out, stride, padding, dilation)   -> dx written into `out` (x's shape and layout)
  grad_weight(g, x, w_shape, stride, padding, dilation)
        -> dW in the accumulation dtype (float32, float64 for float64 inputs), shape (Cout, Cin, KH, KW)

Per-channel vectors (bias, scale, shift, mean, var) are in the accumulation dtype.
"""
import torch
import torch.nn.functional as F

from .. import activations
from .._tensors import acc_dtype


def _per_channel(v):
    return v.view(1, -1, 1, 1)


def _conv(x, w, stride, padding, dilation):
    return F.conv2d(x, w.to(x.dtype), None, tuple(stride), tuple(padding), tuple(dilation), 1)


def forward(x, w, bias, scale, shift, residual, stride, padding, dilation, relu, out, act_param=0.0, pre=None):
    z = _conv(x, w, stride, padding, dilation)
    act = activations.code(relu)
    if bias is None and scale is None and shift is None and residual is None and act == 0:
        out.copy_(z)
        if pre is not None:
            pre.copy_(z)
        return out
    acc = acc_dtype(x)
    v = z.to(acc)
    if bias is not None:
        v = v + _per_channel(bias.to(acc))
    if scale is not None:
        v = v * _per_channel(scale.to(acc))
    if shift is not None:
        v = v + _per_channel(shift.to(acc))
    if residual is not None:
        v = v + residual.to(acc)
    if pre is not None:
        pre.copy_(v)
    out.copy_(activations.forward(v, act, act_param))
    return out


def forward_stats(x, w, bias, stride, padding, dilation, out):
    z = _conv(x, w, stride, padding, dilation)
    if bias is not None:
        z = (z.to(acc_dtype(x)) + _per_channel(bias.to(acc_dtype(x)))).to(x.dtype)
    out.copy_(z)
    var, mean = torch.var_mean(out.to(acc_dtype(x)), dim=(0, 2, 3), unbiased=False)
    return out, mean, var


def grad_input(g, w, out, stride, padding, dilation):
    dx = torch.ops.aten.convolution_backward(
        g, out, w.to(g.dtype), None, list(stride), list(padding), list(dilation), False, [0, 0], 1,
        [True, False, False],
    )[0]
    out.copy_(dx)
    return out


def grad_weight(g, x, w_shape, stride, padding, dilation):
    w = x.new_empty(w_shape)
    dw = torch.ops.aten.convolution_backward(
        g, x, w, None, list(stride), list(padding), list(dilation), False, [0, 0], 1, [False, True, False],
    )[1]
    return dw.to(acc_dtype(x))
