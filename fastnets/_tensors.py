"""Tensor helpers every layer shares (reference, Triton, CUDA and ops alike), so that no backend imports
another backend or the oracle for them: the accumulation dtype, the dense layouts the kernels take, output
allocation, the SM count launch plans are sized by, the device guard every launch runs under, and the
global numerics switches as fastnets reads them (TF32 for convolutions, deterministic mode). Argument
validation is fastnets/_checks.py."""
import contextlib
import contextvars
import os

import torch


def acc_dtype(x):
    """The dtype sums and per-channel vectors are kept in for `x` (a tensor or a dtype): float64 for
    float64, float32 otherwise."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def conv_allows_tf32():
    """Whether fp32 convolutions may round their operands to TF32: the flag cuDNN reads for convolutions,
    so that the Triton convolution and cuDNN follow one setting (docs/tf32.md). On torch >= 2.9 that is
    torch.backends.cudnn.conv.fp32_precision, whose getter resolves "none" through
    torch.backends.cudnn.fp32_precision and torch.backends.fp32_precision as cuDNN does (the legacy
    torch.backends.cudnn.allow_tf32 sets the same state); older torch: allow_tf32 itself."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(torch.backends, "fp32_precision"):
        return bool(torch.backends.cudnn.allow_tf32)
    return conv.fp32_precision == "tf32"


def deterministic_mode():
    """Whether fastnets pins what it would otherwise measure (docs/conv_autotune.md): conv's `auto` takes the
    Triton convolution by rule, without timing (cuDNN only where Triton fails on a shape), and the Triton
    convolution runs one fixed tile configuration instead of autotuning, so the choice and the summation
    order are the same in every process. On with FASTNETS_DETERMINISTIC=1 or
    torch.use_deterministic_algorithms(True)."""
    return os.environ.get("FASTNETS_DETERMINISTIC", "0") == "1" or torch.are_deterministic_algorithms_enabled()


def dense_layout(x):
    """Return (x, channels_last) with x laid out as (N, C, S) or (N, S, C) in memory, copying only when it
    is neither. S is the product of the spatial sizes (1 for a 2-D input)."""
    if x.is_contiguous():
        return x, False
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    if x.dim() == 3 and x.transpose(1, 2).is_contiguous():
        return x, True
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x, True
    return x.contiguous(), False


def match_layout(t, like):
    """`t` with exactly `like`'s strides (a copy only when they differ)."""
    if t.stride() == like.stride():
        return t
    out = torch.empty_like(like, dtype=t.dtype)
    out.copy_(t)
    return out


def grad_layouts(grad_y, x, y, relu):
    """A backward op's inputs in one dense layout: (x, channels_last, grad_y, y), with grad_y (and y, which
    carries the ReLU mask, when relu) given exactly x's strides."""
    x, channels_last = dense_layout(x)
    grad_y = match_layout(grad_y, x)
    if relu:
        y = match_layout(y, x)
    return x, channels_last, grad_y, y


def new_output(like, dtype=None, shape=None):
    """An output buffer shaped like `like` (same strides when `shape` is None). With
    FASTNETS_POISON_OUTPUTS=1 (the test suite sets it) it is filled with NaN, so an element that a kernel
    forgot to write shows up instead of passing by luck."""
    if shape is None:
        out = torch.empty_like(like, dtype=dtype)
    else:
        out = like.new_empty(shape, dtype=dtype or like.dtype)
    if os.environ.get("FASTNETS_POISON_OUTPUTS", "0") == "1" and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def sm_count(device):
    """The number of streaming multiprocessors of a CUDA `device`; 1 on any other device. Off a GPU the
    only kernels that run are Triton's under the interpreter, which runs programs one after another, as a
    single SM would: plans sized by this stay small there. A plan that wants several programs under the
    interpreter (so that the tests run its cross-program merge) says so where it is made."""
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# The device the innermost device_guard made current (None outside every guard): the test suite's launch
# checker (tests/launch_checker.py) reads it at every Triton launch and compares it with the device of the
# launch's tensors, on a machine without a GPU too.
_guarded = contextvars.ContextVar("fastnets_guarded_device", default=None)


def guarded_device():
    return _guarded.get()


@contextlib.contextmanager
def device_guard(device):
    """Make `device` current for the launches inside. Triton launches on torch's current CUDA device and on
    that device's current stream, not on its tensors' device: with tensors on cuda:1 while cuda:0 is
    current it would run on GPU 0 with GPU 1's pointers. A no-op on other devices (CPU, meta)."""
    device = torch.device(device)
    token = _guarded.set(device)
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                yield
        else:
            yield
    finally:
        _guarded.reset(token)


def needed_grads(grads, needs):
    """What an autograd backward returns: each gradient where its input needs one (needs_input_grad), else None
    (a kernel may compute more than was asked for, e.g. weight and bias together)."""
    return tuple(g if need else None for g, need in zip(grads, needs))
