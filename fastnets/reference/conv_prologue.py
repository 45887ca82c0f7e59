"""BatchNorm-apply + activation inside the next convolution's prologue, in plain PyTorch: the contract.

    out = conv2d(y, W) [+ bias],   y = act(z * scale[c] + shift[c])

z is the previous convolution's output (N, C, H, W); scale/shift are the previous BatchNorm's folded
per-channel gamma * rstd and beta - mean * gamma * rstd (computed by the caller, so autograd through the
batch statistics happens outside). y is never stored: the backward recomputes it from z, scale and shift.
Padding is applied to y (padded pixels are exactly zero after the transform, as conv2d(act(bn(z))) pads).
y is rounded to z's dtype before the convolution, as the unfused chain stores it.

Every backend of the family implements these primitives with the same names and arguments (groups: the
reference runs any; the Triton backend runs groups=1 only, see fastnets/ops/conv_prologue.py):

  forward(z, scale, shift, w, bias, stride, padding, dilation, groups, act, act_param, out, stats=False)
        -> out = conv(y, w) [+ bias] written into `out` (or a tensor with out's strides); with stats=True
           (out, mean, var): the per output channel mean and biased variance of out (the next BatchNorm's
           batch statistics, from the convolution's epilogue in Triton)
  grad_input(g, w, z, scale, shift, stride, padding, dilation, groups, act, act_param, out)
        -> (dz, dscale, dshift) with dpre = grad_input(g, w) * act'(z * scale + shift) (relu: masked where
           y <= 0, as torch's threshold_backward), dz = dpre * scale written into `out` (z's shape and layout),
           dscale = sum over N, H, W of dpre * z, dshift = sum of dpre (accumulation dtype, shape (C,))
  grad_weight(g, z, scale, shift, w_shape, stride, padding, dilation, groups, act, act_param)
        -> dW = grad_weight(g, y) in the accumulation dtype, shape (Cout, Cin / groups, KH, KW)

`act` is an activation name of fastnets/activations.py, act_param its parameter. scale/shift may be in z's
dtype or the accumulation dtype; the transform is computed in the accumulation dtype (float32; float64 for
float64 inputs).
"""
import torch
import torch.nn.functional as F

from .. import activations
from .._tensors import acc_dtype


def _per_channel(v):
    return v.view(1, -1, 1, 1)


def transform(z, scale, shift, act, act_param):
    """(y, v): v = z * scale + shift in the accumulation dtype, y = act(v) rounded to z's dtype."""
    acc = acc_dtype(z)
    v = z.to(acc) * _per_channel(scale.to(acc)) + _per_channel(shift.to(acc))
    return activations.forward(v, act, act_param).to(z.dtype), v


def forward(z, scale, shift, w, bias, stride, padding, dilation, groups, act, act_param, out, stats=False):
    y, _ = transform(z, scale, shift, act, act_param)
    o = F.conv2d(y, w.to(z.dtype), None, tuple(stride), tuple(padding), tuple(dilation), groups)
    del y
    acc = acc_dtype(z)
    if bias is not None:
        o = (o.to(acc) + _per_channel(bias.to(acc))).to(z.dtype)
    out.copy_(o)
    if not stats:
        return out
    var, mean = torch.var_mean(out.to(acc), dim=(0, 2, 3), unbiased=False)
    return out, mean, var


def grad_input(g, w, z, scale, shift, stride, padding, dilation, groups, act, act_param, out):
    dy = torch.ops.aten.convolution_backward(
        g, z, w.to(g.dtype), None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [True, False, False],
    )[0]
    acc = acc_dtype(z)
    y, v = transform(z, scale, shift, act, act_param)
    dpre = activations.backward(dy.to(acc), v, y.to(acc), act, act_param)
    out.copy_(dpre * _per_channel(scale.to(acc)))
    dscale = (dpre * z.to(acc)).sum(dim=(0, 2, 3))
    dshift = dpre.sum(dim=(0, 2, 3))
    return out, dscale, dshift


def grad_weight(g, z, scale, shift, w_shape, stride, padding, dilation, groups, act, act_param):
    y, _ = transform(z, scale, shift, act, act_param)
    w = z.new_empty(w_shape)
    dw = torch.ops.aten.convolution_backward(
        g, y, w, None, list(stride), list(padding), list(dilation), False, [0, 0], groups, [False, True, False],
    )[1]
    return dw.to(acc_dtype(z))
