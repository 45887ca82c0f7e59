"""conv_prologue in Triton: the launchers. The arithmetic is a constexpr prologue/epilogue of the conv family's
implicit-GEMM kernels (fastnets/triton_kernels/conv.py), not a copy of them:

  forward      _conv_fwd_kernel with PRO: each loaded input tile becomes act(z * scale[c] + shift[c]) (in
               fp32, rounded to z's dtype as the unfused chain stores y; padded taps and out-of-range
               rows/channels stay exactly zero), then the usual GEMM and epilogue (bias; with stats=True the
               conv family's per-tile (mean, M2) statistics epilogue and Chan merge).
  grad input   _conv_dgrad_kernel with EPI (every kernel size, 1x1 included: the 1x1 forward-GEMM shortcut of
               conv.grad_input has no epilogue): acc = dgrad(g, W) is multiplied by act'(z * scale + shift)
               read from z, stored as dz = dpre * scale, with per-tile per-channel partial sums of dpre * z
               and dpre (grad scale, grad shift) summed afterwards (deterministic).
  grad weight  _conv_wgrad_kernel with PRO: y recomputed from z on each loaded tile.

Same contract as fastnets/reference/conv_prologue.py. groups=1 only (SUPPORTS_GROUPS: ops/conv_prologue.py
runs grouped calls on the reference under `auto` and rejects them for an explicit `triton`). NCHW and
channels_last (any dense strides), 1x1 and KxK, strides, dilation, padding; fp16/bf16/fp32/fp64.
"""
import torch

from ..activations import code
from .._tensors import acc_dtype
from . import conv as cv
from ._common import on_tensor_device

SUPPORTS_GROUPS = False


def _vectors(z, scale, shift):
    acc = acc_dtype(z)
    return scale.to(acc).contiguous(), shift.to(acc).contiguous()


def _groups1(groups):
    if groups != 1:
        raise ValueError(f"groups={groups}: the Triton conv_prologue kernels run groups=1 only")


@on_tensor_device
def forward(z, scale, shift, w, bias, stride, padding, dilation, groups, act, act_param, out, stats=False):
    _groups1(groups)
    n, c, h, wd = z.shape
    cout, _, kh, kw = w.shape
    oh, ow = out.shape[2:]
    sc, sh = _vectors(z, scale, shift)
    result = cv._run_fwd(
        z, z.stride(), cv._packed_weight(w, z.dtype), out, out.stride(), (n, c, h, wd, cout, oh, ow, kh, kw),
        (*stride, *padding, *dilation), bias, None, None, None, 0, stats, prologue=(sc, sh, code(act), act_param),
    )
    if not stats:
        return out
    mean, var = result
    return out, mean, var


@on_tensor_device
def grad_input(g, w, z, scale, shift, stride, padding, dilation, groups, act, act_param, out):
    _groups1(groups)
    n, c, h, wd = z.shape
    cout, _, kh, kw = w.shape
    oh, ow = g.shape[2:]
    sc, sh = _vectors(z, scale, shift)
    if z.stride() != out.stride():  # the epilogue reads z at dz's offsets (differs only in size-1 dims)
        z = torch.empty_strided(out.shape, out.stride(), dtype=z.dtype, device=z.device).copy_(z)
    dscale, dshift = cv._run_dgrad(
        g, cv._packed_weight(w, g.dtype), out, (n, c, h, wd, cout, oh, ow, kh, kw), stride, padding, dilation,
        epilogue=(z, sc, sh, code(act), act_param),
    )
    return out, dscale, dshift


@on_tensor_device
def grad_weight(g, z, scale, shift, w_shape, stride, padding, dilation, groups, act, act_param):
    _groups1(groups)
    sc, sh = _vectors(z, scale, shift)
    return cv.grad_weight(g, z, w_shape, stride, padding, dilation, prologue=(sc, sh, code(act), act_param))
