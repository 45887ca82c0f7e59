"""The conv family's `auto` policy on a GPU: per shape, the Triton convolution or cuDNN, whichever was measured
faster; the work fused around the convolution stays on fastnets kernels either way. It is registered with
the family (ops/conv.py: `register_family(..., auto_policy=...)`) and picked by the registry for `auto` on a
CUDA device where Triton can run; elsewhere `auto` follows the family's order. It is dispatch policy, not a
kernel, so it sits in ops/ and takes its halves from the layers below: triton_kernels/conv.py and
ops/_cudnn_conv.py (the `cuda` backend), with the BatchNorm kernels from the registry.

Each primitive (forward with its epilogue, forward with the BN-statistics epilogue, grad input, grad weight)
is timed once per key (primitive, the batch size's power-of-two bucket and the other shapes, stride, padding,
dilation, dtype and TF32 flag, layout, every epilogue flag: a ragged last batch or a new eval batch size in
the bucket measures nothing) on the first call with both implementations, CUDA events around a few runs after a warm-up run that includes Triton's
autotuning (fastnets/_timing.py); the winner is cached in `choices` (and, with FASTNETS_CONV_CACHE=path.json,
in that file, so later processes skip the measurement; the conv benchmark reports `choices`). During
CUDA-graph capture nothing is measured: an unseen key runs cuDNN. In deterministic mode
(_tensors.deterministic_mode: FASTNETS_DETERMINISTIC=1 or torch.use_deterministic_algorithms(True)) nothing is
measured or read from the cache file: every key takes the Triton convolution (which then runs one fixed tile
configuration), cuDNN where Triton fails on the shape, so every process makes the same choice.

The cuDNN forward is F.conv2d followed by the fused BN family's `apply` kernel (bias folded into the
shift): y = [relu](z * scale + shift [+ residual]) in one pass. The cuDNN statistics variant is F.conv2d
followed by the BN family's statistics kernel, i.e. what eager does.
"""
import json
import os
import threading

import torch

from .. import _tensors, _timing
from .._tensors import acc_dtype
from ..activations import code
from ..triton_kernels import conv as tri
from . import _cudnn_conv as cudnn
from ._registry import kernels

choices = {}
_lock = threading.Lock()
_CACHE_PATH = os.environ.get("FASTNETS_CONV_CACHE")
if _CACHE_PATH and os.path.exists(_CACHE_PATH):
    try:
        with open(_CACHE_PATH) as f:
            choices.update(json.load(f))
    except (OSError, ValueError):
        pass


def _bn_kernels(device):
    return kernels("batch_norm", "auto", device)


def _key(prim, x, w_shape, stride, padding, dilation, *flags):
    """The measured choice's key: the batch size by its power-of-two bucket (N <= 2^k), the rest exactly."""
    cl = (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)
    dtype = str(x.dtype).replace("torch.", "")
    if x.dtype == torch.float32:
        dtype += "-tf32" if _tensors.conv_allows_tf32() else "-ieee"
    batch = f"N<={1 << max(x.shape[0] - 1, 1).bit_length()}"
    parts = [prim, batch, tuple(x.shape[1:]), tuple(w_shape), tuple(stride), tuple(padding), tuple(dilation), dtype,
             "cl" if cl else "nchw", *flags]
    return "|".join(str(p) for p in parts)


def _time_ms(fn, reps=5):
    """Milliseconds per run of `fn` on the current CUDA device: one warm-up run, then `reps` runs between
    two CUDA events."""
    return _timing.time_iterations(fn, "cuda", warmup=1, iters=reps, repeats=1)[0] * 1e3


_pinned = {}  # deterministic mode's choices: the rule's, never a measured one


def _choose_by_rule(key, device, run_triton):
    """Deterministic mode: Triton, unless it fails on this key (tried once, untimed; not during capture)."""
    c = _pinned.get(key)
    if c is not None:
        return c
    c = "triton"
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        try:
            run_triton()
        except Exception as e:
            import warnings

            warnings.warn(f"fastnets conv: the Triton kernel failed on {key} ({type(e).__name__}: {e}); using cuDNN")
            c = "cudnn"
    _pinned[key] = c
    return c


def _choose(key, device, run_triton, run_cudnn):
    """The cached winner for `key`, measuring both on first sight (deterministic mode: the rule's choice)."""
    if _tensors.deterministic_mode():
        return _choose_by_rule(key, device, run_triton)
    c = choices.get(key)
    if c is not None:
        return c
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "cudnn"
    try:
        t_tri = _time_ms(run_triton)
    except Exception as e:  # a Triton failure on some shape (resources, compiler) must not break `auto`
        import warnings

        warnings.warn(f"fastnets conv: the Triton kernel failed on {key} ({type(e).__name__}: {e}); using cuDNN")
        t_tri = float("inf")
    t_cud = _time_ms(run_cudnn)
    c = "triton" if t_tri <= t_cud else "cudnn"
    with _lock:
        choices[key] = c
        if _CACHE_PATH:
            try:
                with open(_CACHE_PATH, "w") as f:
                    json.dump(choices, f, indent=1, sort_keys=True)
            except OSError:
                pass
    return c


def _cudnn_forward(x, w, bias, scale, shift, residual, stride, padding, dilation, relu, out, act_param=0.0,
                   pre=None):
    z = cudnn.conv(x, w, stride, padding, dilation)
    if bias is None and scale is None and shift is None and residual is None and not relu:
        if pre is not None:
            pre.copy_(z)
        return z if z.stride() == out.stride() else out.copy_(z)
    acc = acc_dtype(x)
    cout = w.shape[0]
    sc = torch.ones(cout, dtype=acc, device=x.device) if scale is None else scale.to(acc)
    sh = torch.zeros(cout, dtype=acc, device=x.device) if shift is None else shift.to(acc)
    if bias is not None:
        sh = sh + bias.to(acc) * sc
    z, cl = _tensors.dense_layout(z)
    res = None if residual is None else _tensors.match_layout(residual, z)
    bn = _bn_kernels(x.device)
    if pre is not None:  # the pre-activation is an output of its own: one pass for it, one for the activation
        v = bn.apply(z, sc, sh, res, 0, cl)
        pre.copy_(v)
        y = bn.apply(v, torch.ones_like(sc), torch.zeros_like(sh), None, relu, cl, act_param)
    else:
        y = bn.apply(z, sc, sh, res, relu, cl, act_param)
    return y if y.stride() == out.stride() else out.copy_(y)


def forward(x, w, bias, scale, shift, residual, stride, padding, dilation, relu, out, act_param=0.0, pre=None):
    key = _key("fwd", x, w.shape, stride, padding, dilation, bias is not None, scale is not None,
               shift is not None, residual is not None, f"act{code(relu)}", pre is not None)
    args = (x, w, bias, scale, shift, residual, stride, padding, dilation, relu, out)
    kw = dict(act_param=act_param, pre=pre)
    c = _choose(key, x.device, lambda: tri.forward(*args, **kw), lambda: _cudnn_forward(*args, **kw))
    return tri.forward(*args, **kw) if c == "triton" else _cudnn_forward(*args, **kw)


def _cudnn_stats(x, w, bias, stride, padding, dilation, out):
    z = cudnn.conv(x, w, stride, padding, dilation)
    if bias is not None:
        z = z + bias.to(z.dtype).view(1, -1, 1, 1)
    if z.stride() != out.stride():
        z = out.copy_(z)
    mean, invstd = _bn_kernels(x.device).stats(z, _tensors.dense_layout(z)[1], 0.0)
    return z, mean, invstd.pow(-2)


def forward_stats(x, w, bias, stride, padding, dilation, out):
    key = _key("stats", x, w.shape, stride, padding, dilation, bias is not None)
    args = (x, w, bias, stride, padding, dilation, out)
    c = _choose(key, x.device, lambda: tri.forward_stats(*args), lambda: _cudnn_stats(*args))
    return (tri.forward_stats if c == "triton" else _cudnn_stats)(*args)


def grad_input(g, w, out, stride, padding, dilation):
    key = _key("dgrad", out, w.shape, stride, padding, dilation)
    args = (g, w, out, stride, padding, dilation)
    c = _choose(key, g.device, lambda: tri.grad_input(*args), lambda: cudnn.grad_input(*args))
    return (tri if c == "triton" else cudnn).grad_input(*args)


def grad_weight(g, x, w_shape, stride, padding, dilation):
    key = _key("wgrad", x, w_shape, stride, padding, dilation)
    args = (g, x, w_shape, stride, padding, dilation)
    c = _choose(key, x.device, lambda: tri.grad_weight(*args), lambda: cudnn.grad_weight(*args))
    return (tri if c == "triton" else cudnn).grad_weight(*args)
