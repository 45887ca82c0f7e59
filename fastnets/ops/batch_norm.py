"""BatchNorm with an optional fused residual add and ReLU, as torch.library ops with autograd.

  y = [relu](batch_norm(x) [+ residual])

Ops (namespace `fastnets`), all functional so that autograd can be registered and torch.compile traces them:
  batch_norm_train(x, weight, bias, residual, relu, eps, backend) -> (y, mean, invstd)
  batch_norm_eval(x, weight, bias, residual, running_mean, running_var, relu, eps, backend) -> y
  batch_norm_backward(...) -> (grad_x, grad_weight, grad_bias, grad_residual)
Running statistics are updated by `batch_norm(...)` below with in-place torch ops on the returned batch
statistics, exactly as torch.nn.BatchNorm2d updates them.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _checks
from ..backends import current_backend
from ..reference.batch_norm import acc_dtype
from ._registry import kernels, register_family

register_family(
    "batch_norm",
    {
        "reference": ".reference.batch_norm",
        "triton": ".triton_kernels.batch_norm",
        "cuda": ".cuda_kernels.batch_norm",
    },
)

def _empty(like):
    return like.new_empty(0)


def fold_scale_shift(weight, bias, mean, invstd):
    """Per-channel scale and shift of y = x * scale + shift, in the accumulation dtype, with mean and invstd
    folded in (weight and bias may be None)."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(invstd.dtype)
    return scale, shift


@torch.library.custom_op("fastnets::batch_norm_train", mutates_args=())
def batch_norm_train(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
    relu: bool, eps: float, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    k = kernels("batch_norm", backend, x.device)
    x, cl = _checks.dense_layout(x)
    mean, invstd = k.stats(x, cl, eps)
    scale, shift = fold_scale_shift(weight, bias, mean, invstd)
    res = None if residual is None else _checks.match_layout(residual, x)
    y = k.apply(x, scale, shift, res, relu, cl)
    return _checks.match_layout(y, x), mean, invstd


@batch_norm_train.register_fake
def _(x, weight, bias, residual, relu, eps, backend):
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty(c, dtype=acc_dtype(x)), x.new_empty(c, dtype=acc_dtype(x))


@torch.library.custom_op("fastnets::batch_norm_eval", mutates_args=())
def batch_norm_eval(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
    running_mean: Tensor, running_var: Tensor, relu: bool, eps: float, backend: str,
) -> Tensor:
    k = kernels("batch_norm", backend, x.device)
    x, cl = _checks.dense_layout(x)
    acc = acc_dtype(x)
    scale, shift = fold_scale_shift(weight, bias, running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps))
    res = None if residual is None else _checks.match_layout(residual, x)
    return _checks.match_layout(k.apply(x, scale, shift, res, relu, cl), x)


@batch_norm_eval.register_fake
def _(x, weight, bias, residual, running_mean, running_var, relu, eps, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fastnets::batch_norm_backward", mutates_args=())
def batch_norm_backward(
    grad_y: Tensor, x: Tensor, y: Optional[Tensor], weight: Optional[Tensor], mean: Tensor, invstd: Tensor,
    relu: bool, training: bool, need_grad_x: bool, need_grad_affine: bool, need_grad_residual: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """grad_residual is returned only when relu masks it (else it is grad_y itself, which the autograd
    formula passes on without a copy); unneeded outputs are empty tensors."""
    k = kernels("batch_norm", backend, x.device)
    x, cl, dy, y = _checks.grad_layouts(grad_y, x, y, relu)
    count = x.numel() // x.shape[1]
    grad_w = grad_b = grad_x = grad_res = None
    sum_g = sum_gxmu = None
    if training or need_grad_affine:
        sum_g, sum_gxmu = k.backward_reduce(dy, x, y, mean, relu, cl)
        if need_grad_affine and weight is not None:
            grad_w = (sum_gxmu * invstd).to(weight.dtype)
            grad_b = sum_g.to(weight.dtype)
    write_g = relu and need_grad_residual
    if need_grad_x or write_g:
        a = invstd if weight is None else invstd * weight.to(invstd.dtype)
        if training:
            # dx = a * (g - sum_g / M - xhat * sum(g * xhat) / M), written as a*g + b*(x - mean) + d
            b = -a * invstd * invstd * sum_gxmu / count
            d = -a * sum_g / count
        else:
            b = d = a  # unused: an eval-mode backward is dx = a * g
        grad_x, grad_res = k.backward_apply(dy, x, y, a, b, d, mean, relu, training, write_g, cl)
        if not need_grad_x:
            grad_x = None
    return tuple(_empty(x) if t is None else t for t in (grad_x, grad_w, grad_b, grad_res))


@batch_norm_backward.register_fake
def _(grad_y, x, y, weight, mean, invstd, relu, training, need_grad_x, need_grad_affine, need_grad_residual, backend):
    affine = need_grad_affine and weight is not None
    return (
        torch.empty_like(x) if need_grad_x else x.new_empty(0),
        torch.empty_like(weight) if affine else x.new_empty(0),
        torch.empty_like(weight) if affine else x.new_empty(0),
        torch.empty_like(x) if (relu and need_grad_residual) else x.new_empty(0),
    )


def _backward(ctx, grad_y, training, mean, invstd):
    x, y, weight = ctx.saved_tensors[:3]
    need_x, need_w, need_b, need_res = ctx.needs_input_grad[:4]
    grad_x, grad_w, grad_b, grad_res = torch.ops.fastnets.batch_norm_backward(
        grad_y, x, y, weight, mean, invstd, ctx.relu, training, need_x, need_w or need_b, need_res, ctx.backend,
    )
    if need_res and not ctx.relu:
        grad_res = grad_y
    return (
        grad_x if need_x else None,
        grad_w if need_w else None,
        grad_b if need_b else None,
        grad_res if need_res else None,
    )


def _train_setup_context(ctx, inputs, output):
    x, weight, bias, residual, relu, eps, backend = inputs
    y, mean, invstd = output
    ctx.relu, ctx.backend = relu, backend
    ctx.save_for_backward(x, y if relu else None, weight, mean, invstd)
    ctx.mark_non_differentiable(mean, invstd)


def _train_backward(ctx, grad_y, grad_mean, grad_invstd):
    mean, invstd = ctx.saved_tensors[3:]
    return _backward(ctx, grad_y, True, mean, invstd) + (None, None, None)


def _eval_setup_context(ctx, inputs, output):
    x, weight, bias, residual, running_mean, running_var, relu, eps, backend = inputs
    ctx.relu, ctx.backend, ctx.eps = relu, backend, eps
    ctx.save_for_backward(x, output if relu else None, weight, running_mean, running_var)


def _eval_backward(ctx, grad_y):
    x = ctx.saved_tensors[0]
    running_mean, running_var = ctx.saved_tensors[3:]
    acc = acc_dtype(x)
    mean, invstd = running_mean.to(acc), torch.rsqrt(running_var.to(acc) + ctx.eps)
    return _backward(ctx, grad_y, False, mean, invstd) + (None, None, None, None, None)


batch_norm_train.register_autograd(_train_backward, setup_context=_train_setup_context)
batch_norm_eval.register_autograd(_eval_backward, setup_context=_eval_setup_context)


def _validate(x, running_mean, running_var, weight, bias, residual, training):
    _checks.check_float(x, "input")
    _checks.check_ndim(x, "input", (2, 3, 4, 5))
    c = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _checks.check_channel_vector(t, name, c)
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
    residual=None, relu=False, backend=None,
):
    """torch.nn.functional.batch_norm's contract, plus an optional fused residual add and ReLU:
    y = [relu](batch_norm(input) [+ residual]). In training, running statistics (when given) are updated
    in place as torch does: new = (1 - momentum) * old + momentum * batch, the variance unbiased."""
    _validate(input, running_mean, running_var, weight, bias, residual, training)
    backend = current_backend() if backend is None else backend
    x, _ = _checks.dense_layout(input)
    if residual is not None:
        residual = _checks.match_layout(residual, x)
    if not training:
        return torch.ops.fastnets.batch_norm_eval(
            x, weight, bias, residual, running_mean, running_var, bool(relu), float(eps), backend
        )
    y, mean, invstd = torch.ops.fastnets.batch_norm_train(x, weight, bias, residual, bool(relu), float(eps), backend)
    if running_mean is not None or running_var is not None:
        # the op returns invstd (what the backward needs); var = invstd^-2 - eps is exact to fp32 rounding
        var = invstd.pow(-2) - eps
        update_running_stats(running_mean, running_var, mean, var, momentum, x.numel() // x.shape[1])
    return y


def update_running_stats(running_mean, running_var, mean, var, momentum, count):
    """new = (1 - momentum) * old + momentum * batch, with the batch variance `var` (biased, over `count`
    values per channel) made unbiased, as torch.nn.BatchNorm2d does; one lerp_ per buffer when dtypes match."""
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
