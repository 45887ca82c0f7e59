"""Input validation shared by every op: a Python exception that names the argument and what was expected.
Layouts and output allocation are fastnets/_tensors.py."""
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
