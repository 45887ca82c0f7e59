"""The fused augmentation op: fastnets::augment_apply.

  augment_apply(x, matrix, out_hw, box=None, colour=None, brightness=False, contrast=False, saturation=False,
                noise_seed=None, noise_mean=0.0, noise_std=0.0, noise_clip=True, scale=None, shift=None,
                interpolation="bilinear", fill=0.0, out_dtype=torch.float32, channels_last=False) -> Tensor

samples every output pixel of x (N, C, H, W; uint8 read as x / 255, or float in [0, 1]) through its sample's
3x3 matrix (output corner coordinates to source corner coordinates), then applies the colour ops, noise and
v * scale + shift. The parameters are drawn by fastnets.augment's transforms (fastnets/nn/augment.py), which
is where users start; this op takes them explicitly (replaying an augmentation, tests).

Values are never read on the host (a check would synchronise the GPU every batch, break CUDA-graph capture and
torch.compile's graph): a sample whose matrix or box holds a non-finite value, or whose colour factor of an
enabled colour op is negative or NaN, comes out as NaN (every backend; tests/test_augment.py). Shapes, dtypes
and devices are checked here, with exceptions that name the argument.

Autograd: none. Augmentation is applied to data, not learned through; for float inputs that require grad
the op raises instead of silently returning a result without a gradient (differentiable warping is
torch.nn.functional.grid_sample's job). torch.compile traces it (fake kernel below).
"""
from typing import Optional

import torch
from torch import Tensor

from ..backends import requested_backend
from ._registry import kernels, register_family

register_family("augment", {"reference": ".reference.augment", "triton": ".triton_kernels.augment"})

IN_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _new_out(x, out_h, out_w, out_dtype, channels_last):
    n, c = x.shape[:2]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((n, c, out_h, out_w), dtype=out_dtype, device=x.device, memory_format=fmt)


@torch.library.custom_op("fastnets::augment_apply", mutates_args=())
def augment_apply_op(
    x: Tensor, matrix: Tensor, box: Optional[Tensor], colour: Optional[Tensor], brightness: bool, contrast: bool,
    saturation: bool, noise_seed: Optional[Tensor], noise_mean: float, noise_std: float, noise_clip: bool,
    scale: Optional[Tensor], shift: Optional[Tensor], out_h: int, out_w: int, nearest: bool, fill: float,
    out_dtype: torch.dtype, channels_last: bool, backend: str,
) -> Tensor:
    out = _new_out(x, out_h, out_w, out_dtype, channels_last)
    if x.shape[0] == 0:
        return out
    k = kernels("augment", backend, x.device)
    k.apply(x, matrix, box, colour, brightness, contrast, saturation, noise_seed, noise_mean, noise_std, noise_clip,
            scale, shift, nearest, fill, out)
    return out


@augment_apply_op.register_fake
def _(x, matrix, box, colour, brightness, contrast, saturation, noise_seed, noise_mean, noise_std, noise_clip,
      scale, shift, out_h, out_w, nearest, fill, out_dtype, channels_last, backend):
    return _new_out(x, out_h, out_w, out_dtype, channels_last)


def _check_tensor(t, name, shape, device, dtypes=(torch.float32,)):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but input is on {device}; they must be on one device")


def augment_apply(x, matrix, out_hw, box=None, colour=None, brightness=False, contrast=False, saturation=False,
                  noise_seed=None, noise_mean=0.0, noise_std=0.0, noise_clip=True, scale=None, shift=None,
                  interpolation="bilinear", fill=0.0, out_dtype=torch.float32, channels_last=False, backend=None):
    """Validated call of fastnets::augment_apply; see the module docstring."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in IN_DTYPES:
        raise TypeError(f"input must be uint8 or floating point (float16, bfloat16, float32, float64), got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if n == 0:
        raise ValueError("input is an empty batch (N = 0)")
    if c == 0 or h == 0 or w == 0:
        raise ValueError(f"input must have C, H, W >= 1, got shape {tuple(x.shape)}")
    if x.requires_grad:
        raise ValueError("input requires grad, but augment_apply is not differentiable: pass input.detach()")
    out_h, out_w = (int(v) for v in out_hw)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"out_hw must be positive, got {tuple(out_hw)}")
    _check_tensor(matrix, "matrix", (n, 3, 3), x.device)  # values are not read on the host: see the docstring
    if box is not None:
        _check_tensor(box, "box", (n, 4), x.device)
    if colour is not None:
        _check_tensor(colour, "colour", (n, 3), x.device)
    elif brightness or contrast or saturation:
        raise ValueError("colour must be given (N, 3) factors when brightness, contrast or saturation is on")
    if (contrast or saturation) and c not in (1, 3):
        raise ValueError(f"contrast and saturation need 1 or 3 channels (grey or RGB), got input with C = {c}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be non-negative, got {noise_std}")
    if noise_std > 0:
        if noise_seed is None:
            raise ValueError("noise_seed must be given (a (1,) int64 tensor) when noise_std > 0")
        _check_tensor(noise_seed, "noise_seed", (1,), x.device, (torch.int64, torch.int32))
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift must be given together (Normalize: v * scale + shift)")
    if scale is not None:
        _check_tensor(scale, "scale", (c,), x.device)
        _check_tensor(shift, "shift", (c,), x.device)
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be a floating-point dtype, got {out_dtype}")
    backend = requested_backend(backend)
    fill = float(fill) / 255.0 if x.dtype == torch.uint8 else float(fill)
    return augment_apply_op(
        x, matrix.contiguous(), None if box is None else box.contiguous(), None if colour is None else colour.contiguous(),
        bool(brightness), bool(contrast), bool(saturation), noise_seed if noise_std > 0 else None, float(noise_mean),
        float(noise_std), bool(noise_clip), scale, shift, out_h, out_w, interpolation == "nearest", fill, out_dtype,
        bool(channels_last), backend,
    )
