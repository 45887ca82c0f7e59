"""BatchNorm-apply + activation fused into the next convolution's prologue (the MLPerf ResNet recipe), as
torch.library ops with autograd:

    out = conv2d(act(z * scale[c] + shift[c]), weight) [+ bias]

z is the previous convolution's output, scale/shift the previous BatchNorm's folded per-channel affine
(gamma * rstd, beta - mean * gamma * rstd), computed by the caller with torch ops so that autograd through
the batch statistics happens outside the op. The op saves for backward ONLY z, scale, shift and weight,
never y = act(z * scale + shift): grad-weight recomputes y as it loads its input tile (Triton: the
convolution kernels' prologue), the pre-activation gradient is dpre = grad_input(dout, weight) *
act'(z * scale + shift) (Triton: the grad-input kernel's epilogue, reading z), and
dz = dpre * scale, dscale = sum over N, H, W of dpre * z, dshift = sum of dpre (per-tile partial sums in that
same epilogue). Padded positions are zero after the transform.

With stats=True the op also returns the per-channel batch mean and biased variance of `out` (the conv
family's statistics epilogue, Chan-merged per-tile partials), so Conv -> BN -> act -> Conv -> BN keeps one
statistics pass; mean/var are non-differentiable outputs (the caller's BatchNorm math on them is torch's).

Ops (namespace `fastnets`): bn_act_conv2d, bn_act_conv2d_backward; each takes a trailing `backend` string,
resolved inside the op at run time. Backends:
  reference  plain PyTorch (fastnets/reference/conv_prologue.py): y materialised transiently in forward and
             recomputed in backward; F.conv2d / aten.convolution_backward.
  triton     the prologue/epilogue inside fastnets' Triton convolution kernels (groups=1 only: explicit
             `triton` with groups > 1 raises; `auto` runs such a call on the reference).
  cuda       the reference module on the GPU (cuDNN convolutions, y recomputed in backward): fastnets has no
             hand-written CUDA C++ convolution.
  native / auto on CPU: the reference (torch's own CPU kernels: oneDNN convolutions; it already saves only z).
  auto on a GPU: triton, then the reference.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, _tensors, activations
from ..backends import BackendUnavailableError, requested_backend
from .._tensors import acc_dtype
from ._registry import kernels, register_family
from .conv import _alloc_like_layout, _autocast, _exact, _new_out, _out_shape, _pair, _placeholder

register_family(
    "conv_prologue",
    {"reference": ".reference.conv_prologue", "triton": ".triton_kernels.conv_prologue",
     "cuda": ".reference.conv_prologue"},
    auto_order=("triton", "reference"),
)


def _kernels(backend, device, groups):
    k = kernels("conv_prologue", backend, device)
    if groups != 1 and not getattr(k, "SUPPORTS_GROUPS", True):
        if backend == "auto":  # documented fallback: grouped convolutions run on the reference under auto
            return kernels("conv_prologue", "reference", device)
        raise BackendUnavailableError(
            f"bn_act_conv2d: groups={groups}: the {backend} backend runs groups=1 only; use backend='auto' or "
            f"'reference'")
    return k


@torch.library.custom_op("fastnets::bn_act_conv2d", mutates_args=())
def bn_act_conv2d_op(
    z: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
    padding: List[int], dilation: List[int], groups: int, act: str, act_param: float, stats: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    k = _kernels(backend, z.device, groups)
    z, _ = _tensors.dense_layout(z)
    out = _new_out(z, _out_shape(z, weight, stride, padding, dilation))
    if stats:
        return k.forward(z, scale, shift, weight, bias, stride, padding, dilation, groups, act, act_param, out,
                         stats=True)
    k.forward(z, scale, shift, weight, bias, stride, padding, dilation, groups, act, act_param, out)
    return out, _placeholder(z), _placeholder(z)


@bn_act_conv2d_op.register_fake
def _(z, scale, shift, weight, bias, stride, padding, dilation, groups, act, act_param, stats, backend):
    c = weight.shape[0] if stats else 0
    acc = acc_dtype(z)
    return (_alloc_like_layout(z, _out_shape(z, weight, stride, padding, dilation)), z.new_empty(c, dtype=acc),
            z.new_empty(c, dtype=acc))


@torch.library.custom_op("fastnets::bn_act_conv2d_backward", mutates_args=())
def bn_act_conv2d_backward_op(
    grad_out: Tensor, z: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stride: List[int],
    padding: List[int], dilation: List[int], groups: int, act: str, act_param: float, need_z: bool,
    need_scale: bool, need_shift: bool, need_weight: bool, need_bias: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_z, grad_scale, grad_shift, grad_weight, grad_bias); grad_scale/shift/bias in the accumulation
    dtype; unneeded outputs are empty tensors. y is recomputed from z, scale and shift by each primitive."""
    k = _kernels(backend, z.device, groups)
    z, _ = _tensors.dense_layout(z)
    g = _exact(grad_out, z)  # z's layout
    acc = acc_dtype(z)
    gz = gsc = gsh = gw = gb = None
    if need_z or need_scale or need_shift:
        gz, gsc, gsh = k.grad_input(g, weight, z, scale, shift, stride, padding, dilation, groups, act, act_param,
                                    _new_out(z, tuple(z.shape)))
    if need_weight:
        gw = k.grad_weight(g, z, scale, shift, tuple(weight.shape), stride, padding, dilation, groups, act,
                           act_param)
        gw = _tensors.match_layout(gw.to(weight.dtype), weight)
    if need_bias:
        gb = g.sum(dim=(0, 2, 3), dtype=acc)
    return tuple(_placeholder(z) if (t is None or not need) else t for t, need in
                 ((gz, need_z), (gsc, need_scale), (gsh, need_shift), (gw, need_weight), (gb, need_bias)))


@bn_act_conv2d_backward_op.register_fake
def _(grad_out, z, scale, shift, weight, stride, padding, dilation, groups, act, act_param, need_z, need_scale,
      need_shift, need_weight, need_bias, backend):
    c, cout = z.shape[1], weight.shape[0]
    acc = acc_dtype(z)
    return (
        _alloc_like_layout(z, tuple(z.shape)) if need_z else z.new_empty(0),
        z.new_empty(c if need_scale else 0, dtype=acc),
        z.new_empty(c if need_shift else 0, dtype=acc),
        torch.empty_like(weight) if need_weight else z.new_empty(0),
        z.new_empty(cout if need_bias else 0, dtype=acc),
    )


def _setup(ctx, inputs, output):
    z, scale, shift, weight, bias, stride, padding, dilation, groups, act, act_param, stats, backend = inputs
    ctx.conf = (stride, padding, dilation, groups, act, act_param, backend)
    ctx.dtypes = (scale.dtype, shift.dtype, None if bias is None else bias.dtype)
    ctx.save_for_backward(z, scale, shift, weight)  # never y: the backward recomputes it
    ctx.mark_non_differentiable(output[1], output[2])


def _bwd(ctx, grad_out, grad_mean, grad_var):
    z, scale, shift, weight = ctx.saved_tensors
    stride, padding, dilation, groups, act, act_param, backend = ctx.conf
    nz, nsc, nsh, nw, nb = ctx.needs_input_grad[:5]
    gz, gsc, gsh, gw, gb = torch.ops.fastnets.bn_act_conv2d_backward(
        grad_out, z, scale, shift, weight, stride, padding, dilation, groups, act, act_param, nz, nsc, nsh, nw, nb,
        backend,
    )
    dsc, dsh, db = ctx.dtypes
    return (
        gz if nz else None,
        gsc.to(dsc) if nsc else None,
        gsh.to(dsh) if nsh else None,
        gw if nw else None,
        gb.to(db) if nb else None,
    ) + (None,) * 8


bn_act_conv2d_op.register_autograd(_bwd, setup_context=_setup)


# ------------------------------------------------------------------------------------ functional wrapper


def _validate(z, scale, shift, weight, bias, stride, padding, dilation, groups):
    _checks.check_float(z, "z")
    _checks.check_ndim(z, "z", (4,))
    _checks.check_float(weight, "weight")
    _checks.check_ndim(weight, "weight", (4,))
    if weight.dtype != z.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but z has dtype {z.dtype}; they must match")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    c = z.shape[1]
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            raise TypeError(f"{name} must be a torch.Tensor of shape ({c},), got None")
        _checks.check_channel_vector(t, name, c)
        allowed = {z.dtype, acc_dtype(z)}
        if t.dtype not in allowed:
            raise TypeError(f"{name} has dtype {t.dtype} but z has dtype {z.dtype}; {name} must be "
                            f"{' or '.join(sorted(str(d) for d in allowed))}")
    if bias is not None:
        _checks.check_float(bias, "bias")
        if bias.dtype != z.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but z has dtype {z.dtype}; they must match")
    _checks.check_same_device(z, "z", scale=scale, shift=shift, weight=weight, bias=bias)
    cout = weight.shape[0]
    if cout % groups:
        raise ValueError(f"groups={groups} must divide weight's out_channels ({cout}, weight shape "
                         f"{tuple(weight.shape)})")
    if c != weight.shape[1] * groups:
        raise ValueError(f"z has {c} channels (dim 1 of shape {tuple(z.shape)}) but weight of shape "
                         f"{tuple(weight.shape)} with groups={groups} expects {weight.shape[1] * groups}")
    if weight.numel() == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    _checks.check_channel_vector(bias, "bias", cout)
    padded = [z.shape[2 + i] + 2 * padding[i] for i in range(2)]
    dilated = [dilation[i] * (weight.shape[2 + i] - 1) + 1 for i in range(2)]
    if padded[0] < dilated[0] or padded[1] < dilated[1]:
        raise ValueError(
            f"weight's kernel size (dilated: {dilated[0]} x {dilated[1]}) is larger than the padded input "
            f"({padded[0]} x {padded[1]}) of z shape {tuple(z.shape)} with padding {tuple(padding)}")
    if z.numel() == 0:
        raise ValueError(f"z must be non-empty, got shape {tuple(z.shape)}")


def bn_act_conv2d(z, scale, shift, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, activation="relu",
                  backend=None, stats=False):
    """conv2d(act(z * scale[c] + shift[c]), weight, bias, stride, padding, dilation, groups), saving only z,
    scale, shift and weight for backward (y = act(...) is recomputed). z: (N, C, H, W), NCHW or
    channels_last (the output follows z's layout); scale, shift: (C,) in z's dtype or float32 (float64 for
    float64 z); weight (Cout, C / groups, KH, KW) and bias (Cout,) in z's dtype. `activation`: any activation
    of fastnets.activations (a name, a (name, param) pair, a module or function); padding: int or pair.
    Differentiable in z, scale, shift, weight and bias. With stats=True returns (out, mean, var): out's
    per-channel batch mean and biased variance (float32; non-differentiable), from the convolution's epilogue."""
    act, act_param = activations.canonical(activation, "activation")
    backend = requested_backend(backend)
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    if isinstance(z, torch.Tensor) and z.device.type != "meta":
        z, weight, bias, _ = _autocast(z, weight, bias, None)
    _validate(z, scale, shift, weight, bias, stride, padding, dilation, groups)
    if groups != 1 and backend == "triton":
        raise ValueError(f"groups={groups}: the triton backend of bn_act_conv2d runs groups=1 only; use "
                         f"backend='auto' (which runs it on the reference) or 'reference'")
    out, mean, var = torch.ops.fastnets.bn_act_conv2d(
        z, scale, shift, weight, bias, stride, padding, dilation, groups, act, act_param, bool(stats), backend)
    return (out, mean, var) if stats else out
