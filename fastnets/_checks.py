"""Input validation shared by every op: a Python exception that names the argument and what was expected."""
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_ndim(t, name, allowed):
    if t.dim() not in allowed:
        want = " or ".join(f"{d}-D" for d in allowed)
        raise ValueError(f"{name} must be {want}, got a {t.dim()}-D tensor of shape {tuple(t.shape)}")


def check_same_device(ref, ref_name, **others):
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must be on one device")


def check_channel_vector(t, name, channels):
    if t is None:
        return
    check_float(t, name)
    if t.dim() != 1 or t.numel() != channels:
        raise ValueError(f"{name} must have shape ({channels},), got {tuple(t.shape)}")


def check_like(t, name, ref, ref_name):
    """`t` must have `ref`'s shape, dtype and device (a residual, a gradient)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}; they must match")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must match")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must be on one device")


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
    import os

    if shape is None:
        out = torch.empty_like(like, dtype=dtype)
    else:
        out = like.new_empty(shape, dtype=dtype or like.dtype)
    if os.environ.get("FASTNETS_POISON_OUTPUTS", "0") == "1" and out.is_floating_point():
        out.fill_(float("nan"))
    return out
