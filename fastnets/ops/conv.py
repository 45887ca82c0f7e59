"""2-D convolution with a fused epilogue, and Conv -> BatchNorm -> [add] -> [activation], as torch.library
ops with autograd (the ops: groups=1; the `conv2d` wrapper takes everything F.conv2d takes and runs grouped
convolutions through F.conv2d).

  conv2d:        (y, pre): y = act((conv(x, W) [+ bias]) [* scale] [+ shift] [+ residual]), act any activation
                 of fastnets.activations; `pre` is the pre-activation, written by the same epilogue only for
                 activations whose backward needs it (not identity or relu, whose mask comes from y), else
                 an empty tensor. Saving it costs one write and one read; recomputing it would be a second
                 convolution.
                 With scale/shift a BatchNorm folded from its running statistics this is the whole eval-mode
                 Conv->BN->[add]->ReLU block in one convolution; W itself is never changed, so gradients with
                 respect to x, W, the BN affine parameters and the residual are exact (frozen-BN fine-tuning).
  conv2d_stats:  (z, mean, var) with z = conv(x, W) [+ bias] and the per-output-channel batch mean and biased
                 variance of z, accumulated in the convolution's epilogue (per-tile mean and M2 merged with
                 Chan's formula), so the BatchNorm statistics pass disappears in training.
  bn_apply_train: act(batch_norm(z; mean, var) [+ residual]) with the training-mode BatchNorm backward
                 (fastnets::batch_norm_backward), the normalize pass of the fused BN family.

Ops (namespace `fastnets`): conv2d, conv2d_stats, conv2d_backward, bn_apply_train. Each takes a trailing
`backend` string, resolved inside the op at run time. For the conv family, `auto` on a GPU is the measured
policy: per shape it runs the Triton kernel or cuDNN, whichever was measured faster (fastnets/ops/
_conv_auto.py); the fused parts around the convolution are fastnets kernels either way.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

import torch.nn.functional as F

from .. import _checks, _tensors, activations
from ..backends import requested_backend
from .._tensors import acc_dtype
from .batch_norm import fold_scale_shift, save_for_act, update_running_stats
from . import _native_cpu
from ._registry import kernels, register_family

# `auto` on a GPU where Triton runs is the measured policy (Triton or cuDNN per shape, ops/_conv_auto.py);
# the order is what `auto` means where it cannot run.
# There is no hand-written CUDA C++ convolution: the family's `cuda` backend is cuDNN (ops/_cudnn_conv.py:
# the reference's F.conv2d on a GPU) with the fused BatchNorm parts on the CUDA C++ kernels, so that
# use_backend("cuda") runs whole models.
register_family(
    "conv",
    {"reference": ".reference.conv", "triton": ".triton_kernels.conv", "cuda": ".ops._cudnn_conv"},
    auto_order=("triton", "reference"),
    auto_policy=".ops._conv_auto",
    auto_needs=("triton",),
)


# ----------------------------------------------------------------------------------------------- shapes


def out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _out_shape(x, weight, stride, padding, dilation):
    return (
        x.shape[0],
        weight.shape[0],
        out_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0]),
        out_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1]),
    )


def _is_cl(x):
    """The layout dense_layout picks for x: channels_last only when x is not plain contiguous."""
    return (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)


def _alloc_like_layout(x, shape, dtype=None):
    """An uninitialized tensor of `shape` in x's layout (NCHW or channels_last)."""
    fmt = torch.channels_last if _is_cl(x) else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def _new_out(x, shape, dtype=None):
    """An output of `shape` in x's layout (NCHW or channels_last), NaN-poisoned under tests."""
    return _tensors.new_output(_alloc_like_layout(x, shape, dtype))


def _exact(t, x):
    """t with exactly the strides _alloc_like_layout gives for x's layout (a copy only when they differ)."""
    out = _alloc_like_layout(x, tuple(t.shape), t.dtype)
    if t.stride() == out.stride():
        return t
    out.copy_(t)
    return out


def _dense(t, like_cl):
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous(memory_format=torch.channels_last if like_cl else torch.contiguous_format)


def _placeholder(like):
    """The zero-size tensor an op returns for an output nobody asked for (a custom op cannot return None)."""
    return like.new_empty(0)


# ----------------------------------------------------------------------------------------------- conv2d


@torch.library.custom_op("fastnets::conv2d", mutates_args=())
def conv2d_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
    residual: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int], act: str,
    act_param: float, backend: str,
) -> Tuple[Tensor, Tensor]:
    k = kernels("conv", backend, x.device)
    x, _ = _tensors.dense_layout(x)
    shape = _out_shape(x, weight, stride, padding, dilation)
    out = _new_out(x, shape)
    pre = _new_out(x, shape) if act not in activations.FROM_OUTPUT else None
    res = None if residual is None else _tensors.match_layout(residual, out)
    y = k.forward(x, weight, bias, scale, shift, res, stride, padding, dilation, activations.code(act), out,
                  act_param=act_param, pre=pre)
    return y, (_placeholder(x) if pre is None else pre)


@conv2d_op.register_fake
def _(x, weight, bias, scale, shift, residual, stride, padding, dilation, act, act_param, backend):
    shape = _out_shape(x, weight, stride, padding, dilation)
    pre = _placeholder(x) if act in activations.FROM_OUTPUT else _alloc_like_layout(x, shape)
    return _alloc_like_layout(x, shape), pre


@torch.library.custom_op("fastnets::conv2d_stats", mutates_args=())
def conv2d_stats_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
    dilation: List[int], backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    k = kernels("conv", backend, x.device)
    x, _ = _tensors.dense_layout(x)
    out = _new_out(x, _out_shape(x, weight, stride, padding, dilation))
    return k.forward_stats(x, weight, bias, stride, padding, dilation, out)


@conv2d_stats_op.register_fake
def _(x, weight, bias, stride, padding, dilation, backend):
    c = weight.shape[0]
    acc = acc_dtype(x)
    z = _alloc_like_layout(x, _out_shape(x, weight, stride, padding, dilation))
    return z, x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)


@torch.library.custom_op("fastnets::conv2d_backward", mutates_args=())
def conv2d_backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor, y: Optional[Tensor], bias: Optional[Tensor],
    scale: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int], act: str,
    act_param: float, need_x: bool, need_weight: bool, need_bias: bool, need_scale: bool, need_shift: bool,
    need_residual: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of conv2d. `y` is the forward output for relu and the pre-activation for the activations
    that need it (unused for identity). With g = dy * act'(.) (relu: dy masked where y <= 0):
      grad_residual = g (returned only when there is an activation), grad_shift = sum g,
      dW_g = wgrad(x, g); grad_weight = dW_g * scale; grad_scale = sum_k W * dW_g + bias * sum g,
      grad_bias = scale * sum g, grad_x = dgrad(g, W * scale)
    so the scale is applied to the (small) weight, never to a full-size activation. Per-channel gradients
    are in the accumulation dtype; unneeded outputs are empty tensors."""
    k = kernels("conv", backend, x.device)
    x, cl = _tensors.dense_layout(x)
    acc = acc_dtype(x)
    g = _dense(grad_y, cl)
    if act == "relu":  # threshold_backward, as torch's relu: 0 where y <= 0
        g = torch.ops.aten.threshold_backward(g, _dense(y, cl), 0)
    elif act != "identity":
        g = activations.backward(g.to(acc), _dense(y, cl).to(acc), None, act, act_param).to(grad_y.dtype)
    grad_x = grad_w = grad_b = grad_scale = grad_shift = grad_res = None
    sum_g = None
    if need_shift or need_bias or (need_scale and bias is not None):
        sum_g = g.sum(dim=(0, 2, 3), dtype=acc)
    if need_weight or need_scale:
        dwg = k.grad_weight(g, x, tuple(weight.shape), stride, padding, dilation)
        if need_weight:
            grad_w = (dwg if scale is None else dwg * scale.to(acc).view(-1, 1, 1, 1)).to(weight.dtype)
            grad_w = _tensors.match_layout(grad_w, weight)
        if need_scale:
            grad_scale = (dwg * weight.to(acc)).sum(dim=(1, 2, 3))
            if bias is not None:
                grad_scale = grad_scale + bias.to(acc) * sum_g
    if need_bias:
        grad_b = sum_g if scale is None else sum_g * scale.to(acc)
    if need_shift:
        grad_shift = sum_g
    if need_x:
        w = weight if scale is None else (weight.to(acc) * scale.to(acc).view(-1, 1, 1, 1)).to(weight.dtype)
        grad_x = k.grad_input(g, w, _new_out(x, tuple(x.shape)), stride, padding, dilation)
    if act != "identity" and need_residual:
        grad_res = _exact(g, x)
    grads = (grad_x, grad_w, grad_b, grad_scale, grad_shift, grad_res)
    return tuple(_placeholder(x) if t is None else t for t in grads)


@conv2d_backward_op.register_fake
def _(grad_y, x, weight, y, bias, scale, stride, padding, dilation, act, act_param, need_x, need_weight, need_bias,
      need_scale, need_shift, need_residual, backend):
    c = weight.shape[0]
    acc = acc_dtype(x)
    vec = lambda need: x.new_empty(c, dtype=acc) if need else _placeholder(x)  # noqa: E731
    return (
        _alloc_like_layout(x, tuple(x.shape)) if need_x else _placeholder(x),
        torch.empty_like(weight) if need_weight else _placeholder(x),
        vec(need_bias),
        vec(need_scale),
        vec(need_shift),
        _alloc_like_layout(x, tuple(grad_y.shape)) if (act != "identity" and need_residual) else _placeholder(x),
    )


def _conv_setup(ctx, inputs, output):
    x, weight, bias, scale, shift, residual, stride, padding, dilation, act, act_param, backend = inputs
    y, pre = output
    ctx.conf = (stride, padding, dilation, act, act_param, backend)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, scale, shift))
    saved = y if act == "relu" else (None if act == "identity" else pre)
    ctx.save_for_backward(x, weight, saved, bias, scale)
    ctx.mark_non_differentiable(pre)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _conv_bwd(ctx, grad_y, grad_pre):
    x, weight, y, bias, scale = ctx.saved_tensors
    stride, padding, dilation, act, act_param, backend = ctx.conf
    nx, nw, nb, nsc, nsh, nres = ctx.needs_input_grad[:6]
    gx, gw, gb, gsc, gsh, gres = torch.ops.fastnets.conv2d_backward(
        grad_y, x, weight, y, bias, scale, stride, padding, dilation, act, act_param, nx, nw, nb, nsc, nsh, nres,
        backend,
    )
    db, dsc, dsh = ctx.dtypes
    return (
        gx if nx else None,
        gw if nw else None,
        _cast(gb, db) if nb else None,
        _cast(gsc, dsc) if nsc else None,
        _cast(gsh, dsh) if nsh else None,
        (grad_y if act == "identity" else gres) if nres else None,
        None, None, None, None, None, None,
    )


conv2d_op.register_autograd(_conv_bwd, setup_context=_conv_setup)


def _stats_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, backend = inputs
    ctx.conf = (stride, padding, dilation, backend)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight)
    ctx.mark_non_differentiable(output[1], output[2])


def _stats_bwd(ctx, grad_y, grad_mean, grad_var):
    # mean and var are consumed only by bn_apply_train, whose training-mode backward already accounts for
    # their dependence on z; they are non-differentiable here.
    x, weight = ctx.saved_tensors
    stride, padding, dilation, backend = ctx.conf
    nx, nw, nb = ctx.needs_input_grad[:3]
    gx, gw, gb, _, _, _ = torch.ops.fastnets.conv2d_backward(
        grad_y, x, weight, None, None, None, stride, padding, dilation, "identity", 0.0, nx, nw, nb, False, False,
        False, backend,
    )
    return gx if nx else None, gw if nw else None, _cast(gb, ctx.bias_dtype) if nb else None, None, None, None, None


conv2d_stats_op.register_autograd(_stats_bwd, setup_context=_stats_setup)


# ------------------------------------------------------------------------------------ BN apply (training)


@torch.library.custom_op("fastnets::bn_apply_train", mutates_args=())
def bn_apply_train_op(
    z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor], mean: Tensor,
    invstd: Tensor, act: str, act_param: float, backend: str,
) -> Tensor:
    """act((z - mean) * invstd * weight + bias [+ residual]) with batch statistics computed elsewhere
    (conv2d_stats); its backward is BatchNorm's training-mode backward."""
    k = kernels("batch_norm", backend, z.device)
    z, cl = _tensors.dense_layout(z)
    scale, shift = fold_scale_shift(weight, bias, mean, invstd)
    res = None if residual is None else _tensors.match_layout(residual, z)
    return _tensors.match_layout(k.apply(z, scale, shift, res, activations.code(act), cl, act_param), z)


@bn_apply_train_op.register_fake
def _(z, weight, bias, residual, mean, invstd, act, act_param, backend):
    return torch.empty_like(z)


def _bn_setup(ctx, inputs, output):
    z, weight, bias, residual, mean, invstd, act, act_param, backend = inputs
    ctx.act, ctx.act_param, ctx.backend = act, act_param, backend
    save_for_act(ctx, z, output, residual, weight, bias, act, mean, invstd)


def _bn_bwd(ctx, grad_out):
    z, out, residual, weight, bias, mean, invstd = ctx.saved_tensors
    nz, nw, nb, nres = ctx.needs_input_grad[:4]
    gz, gw, gb, gres = torch.ops.fastnets.batch_norm_backward(
        grad_out, z, out, residual, weight, bias, mean, invstd, ctx.act, ctx.act_param, True, nz, nw or nb, nres,
        ctx.backend,
    )
    if nres and ctx.act == "identity":
        gres = grad_out
    return (gz if nz else None, gw if nw else None, gb if nb else None, gres if nres else None) + (None,) * 5


bn_apply_train_op.register_autograd(_bn_bwd, setup_context=_bn_setup)


# ------------------------------------------------------------------------------------ functional wrappers


def _pair(v, name, minimum):
    if isinstance(v, int):
        v = (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if any(i < minimum for i in v):
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return [int(i) for i in v]


def _validate(x, weight, bias, stride, padding, dilation, residual, scale=None, shift=None, params_uncast=False,
              groups=1):
    """params_uncast: weight and bias were left out of _autocast (they may be what autocast would cast)."""
    _checks.check_float(x, "input")
    _checks.check_float(weight, "weight")
    _checks.check_ndim(x, "input", (4,))
    _checks.check_ndim(weight, "weight", (4,))
    if weight.dtype != x.dtype and not (params_uncast and _autocast_would_cast(weight, x)):
        raise TypeError(f"weight has dtype {weight.dtype} but input has dtype {x.dtype}; they must match")
    if bias is not None:
        _checks.check_float(bias, "bias")
        if bias.dtype != x.dtype and not (params_uncast and _autocast_would_cast(bias, x)):
            raise TypeError(f"bias has dtype {bias.dtype} but input has dtype {x.dtype}; they must match")
    _checks.check_same_device(x, "input", weight=weight, bias=bias, scale=scale, shift=shift, residual=residual)
    cout, cin = weight.shape[:2]
    if x.shape[1] != cin * groups:
        raise ValueError(
            f"input has {x.shape[1]} channels (dim 1 of shape {tuple(x.shape)}) but weight of shape "
            f"{tuple(weight.shape)} expects {cin * groups} input channels (groups={groups})"
        )
    if weight.numel() == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    for name, t in (("bias", bias), ("scale", scale), ("shift", shift)):
        _checks.check_channel_vector(t, name, cout)
    padded = [x.shape[2 + i] + 2 * padding[i] for i in range(2)]
    dilated = [dilation[i] * (weight.shape[2 + i] - 1) + 1 for i in range(2)]
    if padded[0] < dilated[0] or padded[1] < dilated[1]:
        raise ValueError(
            f"weight's kernel size (dilated: {dilated[0]} x {dilated[1]}) is larger than the padded input "
            f"({padded[0]} x {padded[1]}) of input shape {tuple(x.shape)} with padding {tuple(padding)}"
        )
    if x.numel() == 0:
        raise ValueError(f"input must be non-empty (the output would have zero size), got shape {tuple(x.shape)}")
    shape = _out_shape(x, weight, stride, padding, dilation)
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a torch.Tensor, got {type(residual).__name__}")
        if tuple(residual.shape) != shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)} but the convolution output has shape {shape}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual has dtype {residual.dtype} but input has dtype {x.dtype}; they must match")
    return shape


def _args(input, stride, padding, dilation):
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    return stride, padding, dilation


def _string_padding(padding, weight, stride, dilation):
    """F.conv2d's padding='valid' / 'same' as (symmetric padding, extra (right, bottom) padding): 'same'
    with an odd total pads the extra row/column at the end, as torch does."""
    if padding == "valid":
        return [0, 0], (0, 0)
    if padding != "same":
        raise ValueError(f"padding must be 'valid', 'same', an int or a pair of ints, got {padding!r}")
    if any(s != 1 for s in stride):
        raise ValueError(f"padding='same' is not supported for strided convolutions (stride={tuple(stride)})")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError("padding='same' needs a 4-D weight to size the padding")
    total = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(2)]
    return [t // 2 for t in total], (total[1] - total[1] // 2 * 2, total[0] - total[0] // 2 * 2)


def _check_groups(groups, input, weight):
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    _checks.check_float(input, "input")
    _checks.check_float(weight, "weight")
    _checks.check_ndim(weight, "weight", (4,))
    if input.dim() not in (3, 4):
        raise ValueError(f"input must be 3-D (unbatched) or 4-D, got a {input.dim()}-D tensor of shape "
                         f"{tuple(input.shape)}")
    if weight.shape[0] % groups:
        raise ValueError(f"groups={groups} must divide weight's out_channels ({weight.shape[0]}, weight shape "
                         f"{tuple(weight.shape)})")
    cin = input.shape[-3]
    if cin != weight.shape[1] * groups:
        raise ValueError(
            f"input has {cin} channels (shape {tuple(input.shape)}) but weight of shape {tuple(weight.shape)} "
            f"with groups={groups} expects {weight.shape[1] * groups}"
        )


def _grouped(input, weight, bias, stride, padding, dilation, groups, scale, shift, residual, act, act_param):
    """What the fastnets convolution cannot run (groups > 1): F.conv2d (cuDNN on a GPU), then the epilogue
    in torch ops, so that autograd and torch's semantics are torch's own."""
    y = F.conv2d(input, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    if scale is None and shift is None and residual is None and act == "identity":
        return y
    acc = acc_dtype(y)
    v = y.to(acc)
    view = [-1, 1, 1] if y.dim() == 3 else [1, -1, 1, 1]
    if scale is not None:
        v = v * scale.to(acc).view(view)
    if shift is not None:
        v = v + shift.to(acc).view(view)
    if residual is not None:
        v = v + residual.to(acc)
    return activations.forward(v, act, act_param).to(y.dtype)


def _autocast(input, weight, bias, residual, params=True):
    """Under torch.autocast, cast as F.conv2d's autocast rule does (custom ops get no autocast of their own):
    floating tensors other than float64 go to the autocast dtype; BatchNorm's scale and shift stay fp32.
    params=False leaves weight and bias as they are (a caller that casts what it derives from them)."""
    # meta tensors (shape inference) have no autocast state: asking raises an internal error
    if not isinstance(input, torch.Tensor) or input.device.type == "meta" or not torch.is_autocast_enabled(input.device.type):
        return input, weight, bias, residual
    dtype = torch.get_autocast_dtype(input.device.type)

    def cast(t):
        return t.to(dtype) if _autocast_casts(t) else t

    if not params:
        return cast(input), weight, bias, cast(residual)
    return cast(input), cast(weight), cast(bias), cast(residual)


def _autocast_casts(t):
    """The tensors _autocast casts (as F.conv2d's autocast rule): floating, other than float64."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def _autocast_would_cast(t, x):
    """True when _autocast would have cast parameter t to the dtype of x (x already cast)."""
    return (x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
            and x.dtype == torch.get_autocast_dtype(x.device.type) and _autocast_casts(t))


def _unbatched(input, residual):
    if isinstance(input, torch.Tensor) and input.dim() == 3:
        return input.unsqueeze(0), (None if residual is None else residual.unsqueeze(0)), True
    return input, residual, False


def conv2d(
    input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, scale=None, shift=None, residual=None,
    relu=False, backend=None, act=None,
):
    """torch.nn.functional.conv2d (same arguments: string padding 'valid'/'same', groups, a 3-D unbatched
    input) with a fused epilogue: y = act((conv(input, weight) [+ bias]) [* scale] [+ shift] [+ residual]).
    scale/shift are per output channel (any float dtype; float32 is usual); `act` is any activation of
    fastnets.activations (it wins over `relu`). groups > 1 runs F.conv2d (cuDNN on a GPU) with the epilogue
    in torch ops; everything else runs fastnets' convolution."""
    act, act_param = activations.resolve(act, relu)
    backend = requested_backend(backend)
    _check_groups(groups, input, weight)
    stride = _pair(stride, "stride", 1)
    dilation = _pair(dilation, "dilation", 1)
    extra = (0, 0)
    if isinstance(padding, str):
        padding, extra = _string_padding(padding, weight, stride, dilation)
    else:
        padding = _pair(padding, "padding", 0)
    if any(extra):  # 'same' with an odd total: the extra row/column at the end, as torch
        input = F.pad(input, (0, extra[0], 0, extra[1]))
    if _native_cpu.active(backend, input):  # torch's F.conv2d / oneDNN with the epilogue fused or in place
        input, weight, bias, residual = _autocast(input, weight, bias, residual)
        if groups == 1:  # the same argument checks (and messages) as every other backend
            x4, r4, _ = _unbatched(input, residual)
            _validate(x4, weight, bias, stride, padding, dilation, r4, scale, shift)
        return _native_cpu.conv2d(input, weight, bias, stride, padding, dilation, groups, scale, shift, residual,
                                  act, act_param)
    if groups != 1:
        input, weight, bias, residual = _autocast(input, weight, bias, residual)
        return _grouped(input, weight, bias, stride, padding, dilation, groups, scale, shift, residual, act, act_param)
    input, residual, unbatched = _unbatched(input, residual)
    input, weight, bias, residual = _autocast(input, weight, bias, residual)
    _validate(input, weight, bias, stride, padding, dilation, residual, scale, shift)
    y, _ = torch.ops.fastnets.conv2d(
        input, weight, bias, scale, shift, residual, stride, padding, dilation, act, act_param, backend
    )
    return y.squeeze(0) if unbatched else y


def conv2d_batch_norm(
    input, weight, bias, running_mean, running_var, bn_weight=None, bn_bias=None, training=False, momentum=0.1,
    eps=1e-5, stride=1, padding=0, dilation=1, residual=None, relu=True, backend=None, act=None, cache_owner=None,
    groups=1,
):
    """act(batch_norm(conv2d(input, weight, bias)) [+ residual]) (act: fastnets.activations; it wins over
    `relu`), with batch_norm following
    torch.nn.functional.batch_norm's contract (running statistics, when given, updated in place in training
    as torch does). Training: the convolution's epilogue produces the batch statistics and the fused BN
    kernel normalizes (+residual, +activation). Eval: the BatchNorm is folded into the convolution's epilogue.
    On the native backend (auto on CPU) eval folds BN into the weights of one oneDNN convolution;
    `cache_owner` (the conv module, from conv_bn_act) caches that fold (see ops/_native_cpu.py).
    `groups` > 1 (grouped, depthwise): folded likewise in eval on the native backend; elsewhere F.conv2d
    and fastnets' batch_norm with the add and activation."""
    act, act_param = activations.resolve(act, relu)
    backend = requested_backend(backend)
    stride, padding, dilation = _args(input, stride, padding, dilation)
    if groups != 1:
        _check_groups(groups, input, weight)
    input, residual, unbatched = _unbatched(input, residual)
    if groups != 1 and (training or not _native_cpu.active(backend, input)):
        from .batch_norm import batch_norm

        x, w, b, r = _autocast(input, weight, bias, residual)
        z = F.conv2d(x, w, b, tuple(stride), tuple(padding), tuple(dilation), groups)
        y = batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, residual=r,
                       act=(act, act_param), backend=backend)
        return y.squeeze(0) if unbatched else y
    # native eval folds the BatchNorm into the module's own (uncast) weight and bias, in fp32, and rounds the
    # cached fold once to the autocast dtype: casting them here would make a new tensor every call (no cache
    # hit, a copy per layer)
    native_eval = not training and _native_cpu.active(backend, input)
    input, weight, bias, residual = _autocast(input, weight, bias, residual, params=not native_eval)
    shape = _validate(input, weight, bias, stride, padding, dilation, residual, params_uncast=native_eval,
                      groups=groups)
    cout = weight.shape[0]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("bn_weight", bn_weight),
                    ("bn_bias", bn_bias)):
        _checks.check_channel_vector(t, name, cout)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.requires_grad:  # torch refuses these too; ours would update them silently
            raise ValueError(f"{name} must not require grad: running statistics are buffers updated in place")
    _checks.check_same_device(input, "input", running_mean=running_mean, running_var=running_var,
                              bn_weight=bn_weight, bn_bias=bn_bias)
    if training:
        count = shape[0] * shape[2] * shape[3]
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got output size {shape}")
        if _native_cpu.active(backend, input):  # F.conv2d, then F.batch_norm (running statistics natively)
            z = F.conv2d(input, weight, bias, tuple(stride), tuple(padding), tuple(dilation))
            y = _native_cpu.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps,
                                       residual, act, act_param)
            return y.squeeze(0) if unbatched else y
        z, mean, var = torch.ops.fastnets.conv2d_stats(input, weight, bias, stride, padding, dilation, backend)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None or running_var is not None:
            update_running_stats(running_mean, running_var, mean, var, momentum, count)
        y = torch.ops.fastnets.bn_apply_train(z, bn_weight, bn_bias, residual, mean, invstd, act, act_param, backend)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when training=False")
        if native_eval:  # one oneDNN convolution of the folded weights (folded into input's dtype)
            y = _native_cpu.conv_bn_eval(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps,
                                         stride, padding, dilation, residual, act, act_param, cache_owner, groups)
            return y.squeeze(0) if unbatched else y
        acc = acc_dtype(input)
        scale, shift = fold_scale_shift(bn_weight, bn_bias, running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps))
        y, _ = torch.ops.fastnets.conv2d(
            input, weight, bias, scale, shift, residual, stride, padding, dilation, act, act_param, backend
        )
    return y.squeeze(0) if unbatched else y
