"""The `native` backend: torch's own CPU kernels, chosen by `auto` for CPU tensors (fastnets/backends.py).

The op wrappers (batch_norm, conv2d, conv2d_batch_norm, squeeze_excite) and fastnets.nn's bn_act /
conv_bn_act dispatch here before any fastnets custom op, so autograd is torch's native backward:
  - BatchNorm:  F.batch_norm (it updates the running statistics itself, with torch's semantics), then the
                residual add and the activation in place on its fresh output where autograd allows.
  - Conv:       F.conv2d (oneDNN), epilogue in place likewise.
  - Conv + BN in eval: ONE convolution with the BatchNorm folded into its weight and bias; without autograd
                through oneDNN's fused post-ops (`mkldnn._convolution_pointwise`, `.binary` 'add' for the
                residual), with autograd a plain F.conv2d of the folded (differentiable) weight, so frozen-BN
                fine-tuning gets exact gradients for conv.weight, bn.weight/bias and x.
The folded weights of a (conv, bn) module pair are cached (without autograd only) and recomputed whenever
any of their parameters or buffers changes (data_ptr + version counter: in-place updates, optimizer steps,
load_state_dict, `.data =`); the modules' own tensors are never modified.
"""
import functools
import weakref

import torch
import torch.nn.functional as F

from .. import activations
from .._tensors import acc_dtype
from ..backends import BackendUnavailableError, unavailable_reason


def active(backend, t):
    """True when `backend` ('auto' or a concrete name) runs torch's native kernels for tensor `t`."""
    if backend == "native":
        if isinstance(t, torch.Tensor):
            why = unavailable_reason("native", t.device)
            if why is not None:
                raise BackendUnavailableError(f"fastnets backend 'native' is unavailable: {why}")
        return True
    return backend == "auto" and isinstance(t, torch.Tensor) and t.device.type == "cpu"


def _needs_grad(*ts):
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def _act_(y, act, param, inplace):
    """torch's activation of y, in place when `inplace` (y is a fresh output no backward has saved)."""
    if act == "identity":
        return y
    if not inplace:
        return activations.forward(y, act, param)
    if act == "relu":
        return y.relu_()
    if act == "relu6":
        return F.hardtanh_(y, 0.0, 6.0)
    if act == "leaky_relu":
        return F.leaky_relu_(y, param)
    if act == "silu":
        return F.silu(y, inplace=True)
    if act == "hardswish":
        return F.hardswish(y, inplace=True)
    return activations.forward(y, act, param)


def epilogue(y, residual, act, param):
    """act(y [+ residual]) on a fresh output y (of F.batch_norm or F.conv2d, whose backwards do not read
    it): the add always in place, the activation in place without autograd, and relu in place with it
    (relu's backward reads its own output)."""
    if residual is not None:
        y = y.add_(residual) if y.dtype == residual.dtype else y + residual
    grad = _needs_grad(y)
    return _act_(y, act, param, inplace=(not grad) or act == "relu")


_REDUCED = (torch.bfloat16, torch.float16)


def check_batch_norm_dtypes(x, **params):
    """torch's CPU BatchNorm takes parameters and statistics of the input's dtype, or float32 ones with a
    bfloat16/float16 input (mixed precision); anything else is a TypeError naming every argument's dtype
    (torch's own message, "mixed dtype (CPU): all inputs must share same datatype.", names none)."""
    given = {k: t.dtype for k, t in params.items() if t is not None}
    if all(d == x.dtype for d in given.values()):
        return
    if x.dtype in _REDUCED and all(d == torch.float32 for d in given.values()):
        return
    names = ", ".join(f"{k} {d}" for k, d in given.items())
    raise TypeError(
        f"BatchNorm on the native backend (torch's CPU kernel) needs weight, bias, running_mean and running_var "
        f"in the input's dtype, or float32 with a bfloat16/float16 input; got input {x.dtype} with {names}. "
        f"Cast the input (e.g. x.to({next(iter(given.values()))})) or the module (e.g. bn.to({x.dtype}))")


def batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, residual, act, param):
    check_batch_norm_dtypes(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    if isinstance(momentum, torch.Tensor):  # momentum=None's 1 / num_batches_tracked: a CPU tensor here, no sync
        momentum = float(momentum)
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return epilogue(y, residual, act, param)


def conv2d(x, weight, bias, stride, padding, dilation, groups, scale, shift, residual, act, param):
    """act((conv(x, W) [+ bias]) [* scale] [+ shift] [+ residual]) on torch's kernels."""
    if scale is None and shift is None:
        return fused_conv(x, weight, bias, stride, padding, dilation, residual, act, param, groups=groups)
    y = F.conv2d(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    if scale is not None or shift is not None:
        acc = acc_dtype(y)
        view = [1, -1, 1, 1]
        v = y.to(acc)
        if scale is not None:
            v = v * scale.to(acc).view(view)
        if shift is not None:
            v = v + shift.to(acc).view(view)
        y = v.to(x.dtype)
        if residual is not None:
            y = y + residual
        return activations.forward(y, act, param)
    return epilogue(y, residual, act, param)


def squeeze_excite(x, w1, b1, w2, b2, residual, relu, inner_act, inner_param, gate):
    """[relu](x * gate(fc2(inner_act(fc1(mean_hw(x))))) [+ residual]) in torch ops; the small network in
    fp32 (fp64 for fp64 x) as the reference computes it, weights [R, C] / [C, R]."""
    acc = acc_dtype(x)
    pooled = x.mean(dim=(2, 3), dtype=acc)
    hidden = activations.forward(F.linear(pooled, w1.to(acc), None if b1 is None else b1.to(acc)), inner_act,
                                 inner_param)
    g = activations.gate_forward(F.linear(hidden, w2.to(acc), None if b2 is None else b2.to(acc)), gate)
    y = x * g.to(x.dtype)[:, :, None, None]
    return epilogue(y, residual, "relu" if relu else "identity", 0.0)


# ----------------------------------------------------------------------------- oneDNN fused convolution

# fastnets activation -> (oneDNN post-op name, its scalars, its algorithm)
_ONEDNN_ACTS = {
    "identity": ("none", lambda p: [], ""),
    "relu": ("relu", lambda p: [], ""),
    "relu6": ("hardtanh", lambda p: [0.0, 6.0], ""),
    "leaky_relu": ("leaky_relu", lambda p: [p], ""),
    "silu": ("swish", lambda p: [], ""),
    "hardswish": ("hardswish", lambda p: [], ""),
    "gelu": ("gelu", lambda p: [], "none"),
    "gelu_tanh": ("gelu", lambda p: [], "tanh"),
}


def _onednn_ok(x, weight):
    # first: under torch.compile inductor fuses F.conv2d itself (keep the graph plain), and dynamo cannot
    # trace torch.backends.mkldnn.is_available (a graph break per convolution)
    if torch.compiler.is_compiling():
        return False
    if not torch.backends.mkldnn.is_available() or x.device.type != "cpu" or x.dim() != 4:
        return False
    if x.dtype == torch.float32:
        return weight.dtype == torch.float32
    if x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def fused_conv(x, weight, bias, stride, padding, dilation, residual, act, param, packed=None, groups=1):
    """act(conv(x, W) + b [+ residual]) as one oneDNN convolution with post-ops when no autograd is needed
    and the dtype is oneDNN's, else F.conv2d and the in-place epilogue (any `groups`)."""
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    if (not _needs_grad(x, weight, bias, residual) and _onednn_ok(x, weight)
            and (residual is None or (residual.dtype == x.dtype and residual.shape[0] == x.shape[0]))):
        name, scalars, algo = _ONEDNN_ACTS[act]
        xd = x if (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)) else x.contiguous()
        if packed is not None:  # the cached weight in oneDNN's blocked layout for this input size
            weight = packed(xd, padding, stride, dilation)
        b = bias if (bias is None or bias.dtype == x.dtype) else bias.to(x.dtype)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(xd, weight, b, padding, stride, dilation, groups, name,
                                                           scalars(param), algo)
        cl = xd.is_contiguous(memory_format=torch.channels_last) and not xd.is_contiguous()
        res = residual.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        fuse = act == "relu"  # oneDNN's binary fusion takes relu (only) as its trailing post-op
        y = torch.ops.mkldnn._convolution_pointwise.binary(
            xd, res, weight, b, padding, stride, dilation, groups, "add", None, "relu" if fuse else None, [], None)
        return y if fuse else _act_(y, act, param, inplace=True)
    y = F.conv2d(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    return epilogue(y, residual, act, param)


# ------------------------------------------------------------------------------- BatchNorm folding


def fold(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, dtype):
    """(W', b') with conv(x, W') + b' == batch_norm(conv(x, W) + b) in eval, computed in fp32 (fp64 for
    fp64) and returned in `dtype`; differentiable in every argument."""
    acc = acc_dtype(dtype)
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    shift = -running_mean.to(acc) * scale
    if bias is not None:
        shift = shift + bias.to(acc) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(acc)
    w = weight.to(acc) * scale.view(-1, 1, 1, 1)
    return w.to(dtype), shift.to(dtype)


def conv_bn_eval(x, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, stride, padding, dilation,
                 residual, act, param, cache_owner=None, groups=1):
    """The eval-mode Conv -> BN -> [add] -> [act] as one convolution of the folded weights, folded in fp32
    (fp64) and rounded to x's dtype (under autocast the module's fp32 weight meets a bf16 x); grouped and
    depthwise convolutions too (the fold scales each output channel's filter). `cache_owner` (the conv
    module) enables the fold cache when no autograd flows through the weights."""
    params = (weight, bias, running_mean, running_var, bn_weight, bn_bias)
    dtype = x.dtype
    packed = None
    if not _needs_grad(*params):
        if cache_owner is not None and not torch.compiler.is_compiling():
            w, b = _cached_fold(cache_owner, params, eps, dtype)
            packed = functools.partial(_packed, cache_owner, w, groups=groups)
        else:
            with torch.no_grad():
                w, b = fold(*params, eps, dtype)
    else:
        w, b = fold(*params, eps, dtype)
    return fused_conv(x, w, b, stride, padding, dilation, residual, act, param, packed=packed, groups=groups)


def _packed(owner, w, x, padding, stride, dilation, groups=1):
    """The cached folded weight w reordered once per input size into oneDNN's layout (what inductor's
    weight prepacking does), instead of on every call."""
    hit = _FOLDS.get(owner)
    if hit is None or hit[1] is not w:
        return w
    key = (tuple(x.shape), x.is_contiguous(), tuple(padding), tuple(stride), tuple(dilation), groups)
    got = hit[3].get(key)
    if got is None:
        with torch.inference_mode(False), torch.no_grad():
            got = torch.ops.mkldnn._reorder_convolution_weight(w, list(padding), list(stride), list(dilation), groups,
                                                               list(x.shape))
        hit[3].clear()  # one input size at a time: a model sees one shape per layer in a steady state
        hit[3][key] = got
    return got


# conv module -> (key, folded weight, folded bias); weak so that the cache never keeps a model alive
_FOLDS = weakref.WeakKeyDictionary()


def _key(params, eps, dtype):
    return (eps, dtype) + tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))
                                for t in params)


def _cached_fold(owner, params, eps, dtype):
    key = _key(params, eps, dtype)
    hit = _FOLDS.get(owner)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    with torch.inference_mode(False), torch.no_grad():  # normal tensors, usable outside inference_mode too
        w, b = fold(*params, eps, dtype)
    _FOLDS[owner] = (key, w, b, {})
    return w, b


def cache_size():
    """How many folded (conv, bn) pairs are cached (for tests)."""
    return len(_FOLDS)
