"""Squeeze-and-excitation (Hu, Shen and Sun, 2017) with an optional fused residual add and ReLU.

  pooled = mean over (H, W) of x                      [N, C]   (squeeze)
  hidden = inner_act(pooled @ w1.T + b1)              [N, R]   (excite, first FC; relu by default)
  gate   = gate_fn(hidden @ w2.T + b2)                [N, C]   (excite, second FC; sigmoid or hardsigmoid)
  y      = [relu](x * gate[n, c] [+ residual])                 (scale)

inner_act is any activation of fastnets.activations (torchvision's MobileNetV3 / EfficientNet SE blocks use
relu or silu); the gate is sigmoid or hardsigmoid. Both are arguments of the excite kernel (one launch for
the whole batch either way); their backward runs on the [N, R] / [N, C] vectors with torch's own backward
functions, recomputing the small pre-activations from pooled / hidden when the function needs them.

Ops (namespace `fastnets`, each with a fake kernel and registered autograd):
  se_squeeze(x, backend) -> pooled
  se_excite(pooled, w1, b1, w2, b2, backend, inner_act, inner_param, gate) -> (hidden, gate)
  se_scale(x, gate, residual, relu, backend) -> y
  squeeze_excite(x, w1, b1, w2, b2, residual, relu, backend, inner_act, inner_param, gate)
      -> (y, pooled, hidden, gate)   (the fused block; the activation arguments default to relu/sigmoid)
and their backward ops se_scale_backward and squeeze_excite_backward. The fused block's backward makes two
passes over grad_y: one reduction (grad_gate = sum over space of g * x), then, after the small network's
backward on [N, C] tensors, one elementwise pass dx = g * gate + grad_pooled / (H * W) (and grad_residual
when the ReLU masks it). It saves x, y (only with relu) and the [N, C]/[N, R] vectors: no more than eager.

Weights: w1 [R, C, 1, 1] or [R, C], b1 [R], w2 [C, R, 1, 1] or [C, R], b2 [C] (torchvision/timm 1x1 convs),
in x's dtype, or float32 with float16/bfloat16 x (autocast style). [N, C] vectors are float32 (float64 for
float64 x).
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
    "squeeze_excite",
    {
        "reference": ".reference.squeeze_excite",
        "triton": ".triton_kernels.squeeze_excite",
        "cuda": ".cuda_kernels.squeeze_excite",
    },
)


def _placeholder(like):
    """The zero-size tensor an op returns for an output nobody asked for (a custom op cannot return None)."""
    return like.new_empty(0)


def _mat(w):
    """A 1x1 conv weight [O, I, 1, 1] (or a linear weight [O, I]) as a contiguous [O, I] matrix."""
    return w.reshape(w.shape[0], -1).contiguous()


def excite_backward(grad_gate, grad_hidden, pooled, hidden, gate, w1, w2, b1=None, b2=None, inner_act="relu",
                    inner_param=0.0, gate_fn="sigmoid"):
    """Backward of the small network on [N, C] tensors (plain torch ops on every backend).
    w1 [R, C], w2 [C, R]; returns (grad_pooled, grad_w1 [R, C], grad_b1, grad_w2 [C, R], grad_b2), acc dtype.
    sigmoid's backward uses its output (the gate), relu's its output (hidden); hardsigmoid and the other
    inner activations recompute their [N, C] / [N, R] inputs from hidden / pooled with b2 / b1."""
    acc = gate.dtype
    z2 = None
    if gate_fn != "sigmoid":
        z2 = torch.addmm(b2.to(acc), hidden, w2.to(acc).t())
    dz2 = activations.gate_backward(grad_gate.to(acc), z2, gate, gate_fn)
    grad_w2 = dz2.t() @ hidden
    grad_b2 = dz2.sum(0)
    dh = dz2 @ w2.to(acc)
    if grad_hidden is not None:
        dh = dh + grad_hidden.to(acc)
    z1 = None
    if inner_act not in activations.FROM_OUTPUT:
        z1 = torch.addmm(b1.to(acc), pooled.to(acc), w1.to(acc).t())
    dz1 = activations.backward(dh, z1, hidden, inner_act, inner_param)
    grad_w1 = dz1.t() @ pooled.to(acc)
    grad_b1 = dz1.sum(0)
    grad_pooled = dz1 @ w1.to(acc)
    return grad_pooled, grad_w1, grad_b1, grad_w2, grad_b2


# ----------------------------------------------------------------------------------------------------------
# The fused block


@torch.library.custom_op("fastnets::squeeze_excite", mutates_args=())
def squeeze_excite_op(
    x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, residual: Optional[Tensor], relu: bool, backend: str,
    inner_act: str = "relu", inner_param: float = 0.0, gate: str = "sigmoid",
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    k = kernels("squeeze_excite", backend, x.device)
    x, cl = _tensors.dense_layout(x)
    pooled = k.pool(x, cl)
    hidden, gate = k.excite(pooled, _mat(w1), b1.contiguous(), _mat(w2), b2.contiguous(),
                            activations.code(inner_act), inner_param, activations.GATE_CODES[gate])
    res = None if residual is None else _tensors.match_layout(residual, x)
    y = k.scale(x, gate, res, relu, cl)
    return _tensors.match_layout(y, x), pooled, hidden, gate


@squeeze_excite_op.register_fake
def _(x, w1, b1, w2, b2, residual, relu, backend, inner_act="relu", inner_param=0.0, gate="sigmoid"):
    n, c, r = x.shape[0], x.shape[1], w1.shape[0]
    acc = acc_dtype(x)
    return torch.empty_like(x), x.new_empty((n, c), dtype=acc), x.new_empty((n, r), dtype=acc), x.new_empty((n, c), dtype=acc)


@torch.library.custom_op("fastnets::squeeze_excite_backward", mutates_args=())
def squeeze_excite_backward_op(
    grad_y: Tensor, x: Tensor, y: Optional[Tensor], pooled: Tensor, hidden: Tensor, gate: Tensor, w1: Tensor,
    w2: Tensor, relu: bool, need_grad_x: bool, need_grad_weights: bool, need_grad_residual: bool, backend: str,
    b1: Optional[Tensor] = None, b2: Optional[Tensor] = None, inner_act: str = "relu", inner_param: float = 0.0,
    gate_fn: str = "sigmoid",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_residual); grad_residual only when relu masks
    it (else it is grad_y itself, passed on by the autograd formula without a copy). Unneeded outputs are
    empty tensors. Weight gradients have the weights' shapes and dtype."""
    k = kernels("squeeze_excite", backend, x.device)
    x, cl, dy, y = _tensors.grad_layouts(grad_y, x, y, relu)
    grad_x = grad_res = grad_p = None
    grads_w = (None,) * 4
    if need_grad_x or need_grad_weights:
        grad_gate = k.backward_reduce(dy, x, y, relu, cl)
        grad_p, gw1, gb1, gw2, gb2 = excite_backward(grad_gate, None, pooled, hidden, gate, _mat(w1), _mat(w2), b1,
                                                     b2, inner_act, inner_param, gate_fn)
        if need_grad_weights:
            grads_w = (
                gw1.to(w1.dtype).reshape(w1.shape),
                gb1.to(w1.dtype),
                gw2.to(w2.dtype).reshape(w2.shape),
                gb2.to(w2.dtype),
            )
    write_g = relu and need_grad_residual
    if need_grad_x or write_g:
        gp = None if grad_p is None else (grad_p / (x.shape[2] * x.shape[3])).contiguous()
        grad_x, grad_res = k.backward_apply(dy, y, gate, gp, relu, write_g, cl)
        if not need_grad_x:
            grad_x = None
    return tuple(_placeholder(x) if t is None else t for t in (grad_x,) + grads_w + (grad_res,))


@squeeze_excite_backward_op.register_fake
def _(grad_y, x, y, pooled, hidden, gate, w1, w2, relu, need_grad_x, need_grad_weights, need_grad_residual, backend,
      b1=None, b2=None, inner_act="relu", inner_param=0.0, gate_fn="sigmoid"):
    if need_grad_weights:
        r, c = w1.shape[0], w2.shape[0]
        gw = (torch.empty_like(w1), w1.new_empty(r), torch.empty_like(w2), w2.new_empty(c))
    else:
        gw = tuple(_placeholder(x) for _ in range(4))
    return (
        (torch.empty_like(x) if need_grad_x else _placeholder(x),)
        + gw
        + (torch.empty_like(x) if (relu and need_grad_residual) else _placeholder(x),)
    )


def _se_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, relu, backend = inputs[:8]
    inner_act, inner_param, gate_fn = (tuple(inputs[8:]) + ("relu", 0.0, "sigmoid")[len(inputs) - 8:])
    y, pooled, hidden, gate = output
    ctx.relu, ctx.backend, ctx.act = relu, backend, (inner_act, inner_param, gate_fn)
    ctx.save_for_backward(
        x, y if relu else None, pooled, hidden, gate, w1, w2,
        b1 if inner_act not in activations.FROM_OUTPUT else None, b2 if gate_fn != "sigmoid" else None,
    )
    ctx.mark_non_differentiable(pooled, hidden, gate)


def _se_backward(ctx, grad_y, grad_pooled, grad_hidden, grad_gate):
    x, y, pooled, hidden, gate, w1, w2, b1, b2 = ctx.saved_tensors
    need_x, need_w1, need_b1, need_w2, need_b2, need_res = ctx.needs_input_grad[:6]
    need_w = need_w1 or need_b1 or need_w2 or need_b2
    gx, gw1, gb1, gw2, gb2, gres = torch.ops.fastnets.squeeze_excite_backward(
        grad_y, x, y, pooled, hidden, gate, w1, w2, ctx.relu, need_x, need_w, need_res, ctx.backend, b1, b2,
        *ctx.act,
    )
    if need_res and not ctx.relu:
        gres = grad_y
    return _tensors.needed_grads((gx, gw1, gb1, gw2, gb2, gres), ctx.needs_input_grad[:6]) + (None,) * (
        len(ctx.needs_input_grad) - 6)


squeeze_excite_op.register_autograd(_se_backward, setup_context=_se_setup_context)


# ----------------------------------------------------------------------------------------------------------
# The three stages as separate ops (for users composing their own blocks)


@torch.library.custom_op("fastnets::se_squeeze", mutates_args=())
def se_squeeze_op(x: Tensor, backend: str) -> Tensor:
    k = kernels("squeeze_excite", backend, x.device)
    x, cl = _tensors.dense_layout(x)
    return k.pool(x, cl)


@se_squeeze_op.register_fake
def _(x, backend):
    return x.new_empty((x.shape[0], x.shape[1]), dtype=acc_dtype(x))


def _squeeze_setup_context(ctx, inputs, output):
    x, backend = inputs
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype


def _squeeze_backward(ctx, grad_pooled):
    n, c, h, w = ctx.x_shape
    g = (grad_pooled / (h * w)).to(ctx.x_dtype)
    return g[:, :, None, None].expand(n, c, h, w), None


se_squeeze_op.register_autograd(_squeeze_backward, setup_context=_squeeze_setup_context)


@torch.library.custom_op("fastnets::se_excite", mutates_args=())
def se_excite_op(
    pooled: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, backend: str, inner_act: str = "relu",
    inner_param: float = 0.0, gate: str = "sigmoid",
) -> Tuple[Tensor, Tensor]:
    k = kernels("squeeze_excite", backend, pooled.device)
    return k.excite(pooled.to(acc_dtype(pooled)).contiguous(), _mat(w1), b1.contiguous(), _mat(w2), b2.contiguous(),
                    activations.code(inner_act), inner_param, activations.GATE_CODES[gate])


@se_excite_op.register_fake
def _(pooled, w1, b1, w2, b2, backend, inner_act="relu", inner_param=0.0, gate="sigmoid"):
    acc = acc_dtype(pooled)
    n = pooled.shape[0]
    return pooled.new_empty((n, w1.shape[0]), dtype=acc), pooled.new_empty((n, w2.shape[0]), dtype=acc)


def _excite_setup_context(ctx, inputs, output):
    pooled, w1, b1, w2, b2, backend = inputs[:6]
    ctx.act = tuple(inputs[6:]) + ("relu", 0.0, "sigmoid")[len(inputs) - 6:]
    hidden, gate = output
    ctx.save_for_backward(pooled, hidden, gate, w1, w2, b1, b2)
    ctx.dtypes = (pooled.dtype, b1.dtype, b2.dtype)


def _excite_backward(ctx, grad_hidden, grad_gate):
    pooled, hidden, gate, w1, w2, b1, b2 = ctx.saved_tensors
    if grad_gate is None:
        grad_gate = torch.zeros_like(gate)
    gp, gw1, gb1, gw2, gb2 = excite_backward(
        grad_gate, grad_hidden, pooled.to(acc_dtype(pooled)), hidden, gate, _mat(w1), _mat(w2), b1, b2, *ctx.act
    )
    p_dtype, b1_dtype, b2_dtype = ctx.dtypes
    return (
        gp.to(p_dtype),
        gw1.to(w1.dtype).reshape(w1.shape),
        gb1.to(b1_dtype),
        gw2.to(w2.dtype).reshape(w2.shape),
        gb2.to(b2_dtype),
    ) + (None,) * (len(ctx.needs_input_grad) - 5)


se_excite_op.register_autograd(_excite_backward, setup_context=_excite_setup_context)


@torch.library.custom_op("fastnets::se_scale", mutates_args=())
def se_scale_op(x: Tensor, gate: Tensor, residual: Optional[Tensor], relu: bool, backend: str) -> Tensor:
    k = kernels("squeeze_excite", backend, x.device)
    x, cl = _tensors.dense_layout(x)
    res = None if residual is None else _tensors.match_layout(residual, x)
    y = k.scale(x, gate.to(acc_dtype(x)).contiguous(), res, relu, cl)
    return _tensors.match_layout(y, x)


@se_scale_op.register_fake
def _(x, gate, residual, relu, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fastnets::se_scale_backward", mutates_args=())
def se_scale_backward_op(
    grad_y: Tensor, x: Tensor, y: Optional[Tensor], gate: Tensor, relu: bool, need_grad_x: bool,
    need_grad_gate: bool, need_grad_residual: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_gate, grad_residual); grad_residual only when relu masks it; unneeded ones empty."""
    k = kernels("squeeze_excite", backend, x.device)
    x, cl, dy, y = _tensors.grad_layouts(grad_y, x, y, relu)
    grad_x = grad_gate = grad_res = None
    if need_grad_gate:
        grad_gate = k.backward_reduce(dy, x, y, relu, cl).to(gate.dtype)
    write_g = relu and need_grad_residual
    if need_grad_x or write_g:
        grad_x, grad_res = k.backward_apply(dy, y, gate.to(acc_dtype(x)).contiguous(), None, relu, write_g, cl)
        if not need_grad_x:
            grad_x = None
    return tuple(_placeholder(x) if t is None else t for t in (grad_x, grad_gate, grad_res))


@se_scale_backward_op.register_fake
def _(grad_y, x, y, gate, relu, need_grad_x, need_grad_gate, need_grad_residual, backend):
    return (
        torch.empty_like(x) if need_grad_x else _placeholder(x),
        torch.empty_like(gate) if need_grad_gate else _placeholder(x),
        torch.empty_like(x) if (relu and need_grad_residual) else _placeholder(x),
    )


def _scale_setup_context(ctx, inputs, output):
    x, gate, residual, relu, backend = inputs
    ctx.relu, ctx.backend = relu, backend
    ctx.save_for_backward(x, output if relu else None, gate)


def _scale_backward(ctx, grad_y):
    x, y, gate = ctx.saved_tensors
    need_x, need_gate, need_res = ctx.needs_input_grad[:3]
    gx, gg, gres = torch.ops.fastnets.se_scale_backward(
        grad_y, x, y, gate, ctx.relu, need_x, need_gate, need_res, ctx.backend
    )
    if need_res and not ctx.relu:
        gres = grad_y
    return _tensors.needed_grads((gx, gg, gres), (need_x, need_gate, need_res)) + (None, None)


se_scale_op.register_autograd(_scale_backward, setup_context=_scale_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Functional wrappers: validate, then call the ops


def _check_input(x, name="input", channels=None):
    _checks.check_float(x, name)
    _checks.check_ndim(x, name, (4,))
    if x.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{name} has {x.shape[1]} channels (dim 1 of shape {tuple(x.shape)}) but the squeeze-excite "
            f"weights expect {channels}"
        )


def _check_weights(x_dtype, device, w1, b1, w2, b2):
    """Returns (C, R) as the weights define them."""
    for name, t in (("w1 (fc1.weight)", w1), ("b1 (fc1.bias)", b1), ("w2 (fc2.weight)", w2), ("b2 (fc2.bias)", b2)):
        _checks.check_float(t, name)
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but input is on {device}; they must be on one device")
    for name, t in (("w1 (fc1.weight)", w1), ("w2 (fc2.weight)", w2)):
        if not (t.dim() == 2 or (t.dim() == 4 and t.shape[2:] == (1, 1))):
            raise ValueError(f"{name} must be [out, in, 1, 1] (a 1x1 conv) or [out, in], got {tuple(t.shape)}")
    r, c = w1.shape[0], w1.shape[1]
    if r < 1 or c < 1:
        raise ValueError(f"w1 (fc1.weight) must have at least one output and input channel, got {tuple(w1.shape)}")
    if tuple(w2.shape[:2]) != (c, r):
        raise ValueError(f"w2 (fc2.weight) must be [{c}, {r}(, 1, 1)] to match w1 {tuple(w1.shape)}, got {tuple(w2.shape)}")
    if b1.dim() != 1 or b1.shape[0] != r:
        raise ValueError(f"b1 (fc1.bias) must have shape ({r},), got {tuple(b1.shape)}")
    if b2.dim() != 1 or b2.shape[0] != c:
        raise ValueError(f"b2 (fc2.bias) must have shape ({c},), got {tuple(b2.shape)}")
    wd = {w1.dtype, b1.dtype, w2.dtype, b2.dtype}
    if len(wd) != 1:
        raise TypeError(f"w1, b1, w2, b2 must share one dtype, got {[t.dtype for t in (w1, b1, w2, b2)]}")
    wd = wd.pop()
    if x_dtype is not None and not (wd == x_dtype or (wd == torch.float32 and x_dtype in (torch.float16, torch.bfloat16))):
        raise TypeError(
            f"the squeeze-excite weights are {wd} but input is {x_dtype}; weights must match the input's dtype "
            "(or be float32 with a float16/bfloat16 input)"
        )
    return c, r


def squeeze_excite(x, w1, b1, w2, b2, residual=None, relu=False, backend=None, inner_act="relu", gate="sigmoid"):
    """y = [relu](x * gate(fc2(inner_act(fc1(mean_hw(x))))) [+ residual]), fused. x is (N, C, H, W), NCHW or
    channels_last; w1 [R, C, 1, 1] (or [R, C]), b1 [R], w2 [C, R, 1, 1] (or [C, R]), b2 [C]. inner_act: any
    activation of fastnets.activations (default relu); gate: sigmoid (default) or hardsigmoid."""
    inner, inner_param = activations.canonical(inner_act, "inner_act")
    gate = activations.canonical_gate(gate, "gate")
    _checks.check_float(x, "input")
    _checks.check_ndim(x, "input", (4,))
    c, _ = _check_weights(x.dtype, x.device, w1, b1, w2, b2)
    _check_input(x, channels=c)
    if residual is not None:
        _checks.check_like(residual, "residual", x, "input")
    backend = requested_backend(backend)
    if _native_cpu.active(backend, x):  # torch's own ops and autograd
        return _native_cpu.squeeze_excite(x, _mat(w1), b1, _mat(w2), b2, residual, bool(relu), inner, inner_param,
                                          gate)
    x, _ = _tensors.dense_layout(x)
    if residual is not None:
        residual = _tensors.match_layout(residual, x)
    y, _, _, _ = torch.ops.fastnets.squeeze_excite(x, w1, b1, w2, b2, residual, bool(relu), backend, inner,
                                                   inner_param, gate)
    return y


def se_squeeze(x, backend=None):
    """Per-(sample, channel) mean over H and W of a 4-D x, accumulated in float32: [N, C]."""
    _check_input(x)
    backend = requested_backend(backend)
    x, _ = _tensors.dense_layout(x)
    return torch.ops.fastnets.se_squeeze(x, backend)


def se_excite(pooled, w1, b1, w2, b2, backend=None, inner_act="relu", gate="sigmoid"):
    """(hidden, gate) = (inner_act(pooled @ w1.T + b1), gate(hidden @ w2.T + b2)) for all samples at once."""
    inner, inner_param = activations.canonical(inner_act, "inner_act")
    gate = activations.canonical_gate(gate, "gate")
    _checks.check_float(pooled, "pooled")
    _checks.check_ndim(pooled, "pooled", (2,))
    c, _ = _check_weights(None, pooled.device, w1, b1, w2, b2)
    if pooled.shape[1] != c or pooled.shape[0] == 0:
        raise ValueError(f"pooled must be (N >= 1, {c}), got {tuple(pooled.shape)}")
    if (pooled.dtype == torch.float64) != (w1.dtype == torch.float64):
        raise TypeError(
            f"pooled is {pooled.dtype} but the weights are {w1.dtype}: float64 pooled needs float64 weights, "
            "and float64 weights need float64 pooled"
        )
    backend = requested_backend(backend)
    return torch.ops.fastnets.se_excite(pooled, w1, b1, w2, b2, backend, inner, inner_param, gate)


def se_scale(x, gate, residual=None, relu=False, backend=None):
    """[relu](x * gate[n, c] [+ residual]) for x (N, C, H, W) and gate (N, C)."""
    _check_input(x)
    _checks.check_float(gate, "gate")
    if tuple(gate.shape) != tuple(x.shape[:2]):
        raise ValueError(f"gate must have shape {tuple(x.shape[:2])} (N, C of input), got {tuple(gate.shape)}")
    _checks.check_same_device(x, "input", gate=gate)
    if residual is not None:
        _checks.check_like(residual, "residual", x, "input")
    backend = requested_backend(backend)
    x, _ = _tensors.dense_layout(x)
    if residual is not None:
        residual = _tensors.match_layout(residual, x)
    return torch.ops.fastnets.se_scale(x, gate, residual, bool(relu), backend)
