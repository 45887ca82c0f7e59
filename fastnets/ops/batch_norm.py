"""BatchNorm with an optional fused residual add and activation, as torch.library ops with autograd.

  y = act(batch_norm(x) [+ residual])     act: fastnets.activations (a name and one float parameter)

Ops (namespace `fastnets`), all functional so that autograd can be registered and torch.compile traces them:
  batch_norm_train(x, weight, bias, residual, act, act_param, eps, backend) -> (y, mean, invstd)
  batch_norm_eval(x, weight, bias, residual, running_mean, running_var, act, act_param, eps, backend) -> y
  batch_norm_backward(...) -> (grad_x, grad_weight, grad_bias, grad_residual)
The backward of relu masks with the saved output (as eager); the other activations recompute their
pre-activation from x, the folded scale/shift and the residual, which the backward passes read anyway
(x) or which stays alive in the network regardless (the residual): one fewer full-size tensor written and
saved than keeping the pre-activation, at the cost of one residual read per backward pass.
Running statistics are updated by `batch_norm(...)` below with in-place torch ops on the returned batch
statistics, exactly as torch.nn.BatchNorm2d updates them.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, _tensors, activations
from ..backends import requested_backend
from .._tensors import acc_dtype
from . import _native_cpu
from ._registry import kernels, register_family

register_family(
    "batch_norm",
    {
        "reference": ".reference.batch_norm",
        "triton": ".triton_kernels.batch_norm",
        "cuda": ".cuda_kernels.batch_norm",
    },
)

def _placeholder(like):
    """The zero-size tensor an op returns for an output nobody asked for (a custom op cannot return None)."""
    return like.new_empty(0)


def fold_scale_shift(weight, bias, mean, invstd):
    """Per-channel scale and shift of y = x * scale + shift, in the accumulation dtype, with mean and invstd
    folded in (weight and bias may be None)."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(invstd.dtype)
    return scale, shift


def _needs_pre(act):
    """The activation's backward recomputes its pre-activation (everything but identity and relu)."""
    return act not in activations.FROM_OUTPUT


@torch.library.custom_op("fastnets::batch_norm_train", mutates_args=())
def batch_norm_train_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
    act: str, act_param: float, eps: float, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    k = kernels("batch_norm", backend, x.device)
    x, cl = _tensors.dense_layout(x)
    mean, invstd = k.stats(x, cl, eps)
    scale, shift = fold_scale_shift(weight, bias, mean, invstd)
    res = None if residual is None else _tensors.match_layout(residual, x)
    y = k.apply(x, scale, shift, res, activations.code(act), cl, act_param)
    return _tensors.match_layout(y, x), mean, invstd


@batch_norm_train_op.register_fake
def _(x, weight, bias, residual, act, act_param, eps, backend):
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty(c, dtype=acc_dtype(x)), x.new_empty(c, dtype=acc_dtype(x))


@torch.library.custom_op("fastnets::batch_norm_eval", mutates_args=())
def batch_norm_eval_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
    running_mean: Tensor, running_var: Tensor, act: str, act_param: float, eps: float, backend: str,
) -> Tensor:
    k = kernels("batch_norm", backend, x.device)
    x, cl = _tensors.dense_layout(x)
    acc = acc_dtype(x)
    scale, shift = fold_scale_shift(weight, bias, running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps))
    res = None if residual is None else _tensors.match_layout(residual, x)
    return _tensors.match_layout(k.apply(x, scale, shift, res, activations.code(act), cl, act_param), x)


@batch_norm_eval_op.register_fake
def _(x, weight, bias, residual, running_mean, running_var, act, act_param, eps, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fastnets::batch_norm_backward", mutates_args=())
def batch_norm_backward_op(
    grad_y: Tensor, x: Tensor, y: Optional[Tensor], residual: Optional[Tensor], weight: Optional[Tensor],
    bias: Optional[Tensor], mean: Tensor, invstd: Tensor, act: str, act_param: float, training: bool,
    need_grad_x: bool, need_grad_affine: bool, need_grad_residual: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """grad_residual is returned only when an activation stands between the add and the output (else it is
    grad_y itself, which the autograd formula passes on without a copy); unneeded outputs are empty tensors.
    y (the forward output) is read only for relu; the residual only by activations that recompute their
    pre-activation v = x * scale + shift [+ residual], scale and shift being refolded from weight, bias,
    mean and invstd."""
    k = kernels("batch_norm", backend, x.device)
    code = activations.code(act)
    x, cl, dy, y = _tensors.grad_layouts(grad_y, x, y, code == 1)
    extra = {}
    if _needs_pre(act):
        scale, shift = fold_scale_shift(weight, bias, mean, invstd)
        res = None if residual is None else _tensors.match_layout(residual, x)
        extra = dict(act_param=act_param, scale=scale, shift=shift, residual=res)
    count = x.numel() // x.shape[1]
    grad_w = grad_b = grad_x = grad_res = None
    sum_g = sum_gxmu = None
    if training or need_grad_affine:
        sum_g, sum_gxmu = k.backward_reduce(dy, x, y, mean, code, cl, **extra)
        if need_grad_affine and weight is not None:
            grad_w = (sum_gxmu * invstd).to(weight.dtype)
            grad_b = sum_g.to(weight.dtype)
    write_g = code != 0 and need_grad_residual
    if need_grad_x or write_g:
        a = invstd if weight is None else invstd * weight.to(invstd.dtype)
        if training:
            # dx = a * (g - sum_g / M - xhat * sum(g * xhat) / M), written as a*g + b*(x - mean) + d
            b = -a * invstd * invstd * sum_gxmu / count
            d = -a * sum_g / count
        else:
            b = d = a  # unused: an eval-mode backward is dx = a * g
        grad_x, grad_res = k.backward_apply(dy, x, y, a, b, d, mean, code, training, write_g, cl, **extra)
        if not need_grad_x:
            grad_x = None
    return tuple(_placeholder(x) if t is None else t for t in (grad_x, grad_w, grad_b, grad_res))


@batch_norm_backward_op.register_fake
def _(grad_y, x, y, residual, weight, bias, mean, invstd, act, act_param, training, need_grad_x, need_grad_affine,
      need_grad_residual, backend):
    affine = need_grad_affine and weight is not None
    return (
        torch.empty_like(x) if need_grad_x else _placeholder(x),
        torch.empty_like(weight) if affine else _placeholder(x),
        torch.empty_like(weight) if affine else _placeholder(x),
        torch.empty_like(x) if (act != "identity" and need_grad_residual) else _placeholder(x),
    )


def save_for_act(ctx, x, y, residual, weight, bias, act, *rest):
    """What the backward of act(bn(x) [+ residual]) needs: y for relu, the residual and bias for the
    activations that recompute their pre-activation, nothing extra for identity."""
    pre = _needs_pre(act)
    ctx.save_for_backward(x, y if act == "relu" else None, residual if pre else None, weight,
                          bias if pre else None, *rest)


def _backward(ctx, grad_y, training, mean, invstd):
    x, y, residual, weight, bias = ctx.saved_tensors[:5]
    need_x, need_w, need_b, need_res = ctx.needs_input_grad[:4]
    grad_x, grad_w, grad_b, grad_res = torch.ops.fastnets.batch_norm_backward(
        grad_y, x, y, residual, weight, bias, mean, invstd, ctx.act, ctx.act_param, training, need_x,
        need_w or need_b, need_res, ctx.backend,
    )
    if need_res and ctx.act == "identity":
        grad_res = grad_y
    return _tensors.needed_grads((grad_x, grad_w, grad_b, grad_res), (need_x, need_w, need_b, need_res))


def _train_setup_context(ctx, inputs, output):
    x, weight, bias, residual, act, act_param, eps, backend = inputs
    y, mean, invstd = output
    ctx.act, ctx.act_param, ctx.backend = act, act_param, backend
    save_for_act(ctx, x, y, residual, weight, bias, act, mean, invstd)
    ctx.mark_non_differentiable(mean, invstd)


def _train_backward(ctx, grad_y, grad_mean, grad_invstd):
    mean, invstd = ctx.saved_tensors[5:]
    return _backward(ctx, grad_y, True, mean, invstd) + (None, None, None, None)


def _eval_setup_context(ctx, inputs, output):
    x, weight, bias, residual, running_mean, running_var, act, act_param, eps, backend = inputs
    ctx.act, ctx.act_param, ctx.backend, ctx.eps = act, act_param, backend, eps
    save_for_act(ctx, x, output, residual, weight, bias, act, running_mean, running_var)


def _eval_backward(ctx, grad_y):
    x = ctx.saved_tensors[0]
    running_mean, running_var = ctx.saved_tensors[5:]
    acc = acc_dtype(x)
    mean, invstd = running_mean.to(acc), torch.rsqrt(running_var.to(acc) + ctx.eps)
    return _backward(ctx, grad_y, False, mean, invstd) + (None,) * 6


batch_norm_train_op.register_autograd(_train_backward, setup_context=_train_setup_context)
batch_norm_eval_op.register_autograd(_eval_backward, setup_context=_eval_setup_context)


def _validate(x, running_mean, running_var, weight, bias, residual, training):
    _checks.check_float(x, "input")
    _checks.check_ndim(x, "input", (2, 3, 4, 5))
    c = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _checks.check_channel_vector(t, name, c)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.requires_grad:  # torch refuses these too; ours would update them silently
            raise ValueError(f"{name} must not require grad: running statistics are buffers updated in place")
    _checks.check_same_device(x, "input", running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    if residual is not None:
        _checks.check_like(residual, "residual", x, "input")
    if x.numel() == 0:
        raise ValueError(f"input must be non-empty, got shape {tuple(x.shape)}")
    if training and x.numel() // c <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var are required when training=False")


def batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
    residual=None, relu=False, backend=None, act=None,
):
    """torch.nn.functional.batch_norm's contract, plus an optional fused residual add and activation:
    y = act(batch_norm(input) [+ residual]). `act` is any activation fastnets.activations.canonical accepts
    (a name, a (name, param) pair, an nn.Module, a torch function); without it, `relu` picks relu or
    identity. In training, running statistics (when given) are updated in place as torch does:
    new = (1 - momentum) * old + momentum * batch, the variance unbiased."""
    act, act_param = activations.resolve(act, relu)
    backend = requested_backend(backend)
    if isinstance(input, torch.Tensor) and input.numel() == 0 and residual is None:
        _checks.check_float(input, "input")
        return _empty_batch_norm(input, weight, bias, act, act_param)
    _validate(input, running_mean, running_var, weight, bias, residual, training)
    if _native_cpu.active(backend, input):  # torch's F.batch_norm: its own running-statistics update and autograd
        return _native_cpu.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                      residual, act, act_param)
    x, _ = _tensors.dense_layout(input)
    if residual is not None:
        residual = _tensors.match_layout(residual, x)
    if not training:
        return torch.ops.fastnets.batch_norm_eval(
            x, weight, bias, residual, running_mean, running_var, act, act_param, float(eps), backend
        )
    y, mean, invstd = torch.ops.fastnets.batch_norm_train(x, weight, bias, residual, act, act_param, float(eps), backend)
    if running_mean is not None or running_var is not None:
        # the op returns invstd (what the backward needs); var = invstd^-2 - eps is exact to fp32 rounding
        var = (invstd.pow(-2) - eps).clamp_min(0)  # a zero-variance channel would round to -1e-12
        update_running_stats(running_mean, running_var, mean, var, momentum, x.numel() // x.shape[1])
    return y


def _empty_batch_norm(input, weight, bias, act, act_param):
    """F.batch_norm of an empty input, as aten computes it: a clone (not a view, so autograd keeps its
    chain), scaled by weight[0] and shifted by bias[0] when they have elements; statistics untouched."""
    out = input.clone()
    if weight is not None and weight.numel() > 0:
        out = out * weight[0]
    if bias is not None and bias.numel() > 0:
        out = out + bias[0]
    return activations.forward(out, act, act_param)


def update_running_stats(running_mean, running_var, mean, var, momentum, count):
    """new = (1 - momentum) * old + momentum * batch, with the batch variance `var` (biased, over `count`
    values per channel) made unbiased, as torch.nn.BatchNorm2d does; one lerp_ per buffer when dtypes match.
    `momentum` is a float or a 0-d tensor on the buffers' device (momentum=None's 1 / num_batches_tracked)."""
    if isinstance(momentum, torch.Tensor):
        momentum = momentum.to(mean.dtype)
    with torch.no_grad():
        if running_mean is not None:
            if running_mean.dtype == mean.dtype:
                running_mean.lerp_(mean, momentum)
            else:
                running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.to(mean.dtype))
        if running_var is not None:
            unbiased = var * (count / (count - 1))
            if running_var.dtype == unbiased.dtype:
                running_var.lerp_(unbiased, momentum)
            else:
                running_var.copy_(momentum * unbiased + (1 - momentum) * running_var.to(unbiased.dtype))
