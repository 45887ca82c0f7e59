"""Fused augmentation in plain PyTorch (the oracle, and the CPU path): the composed per-sample matrices become
a sampling grid for torch.nn.functional.grid_sample, then torchvision v2's colour formulas, noise and the
normalisation run as separate torch ops.

Primitive (every backend implements it; fastnets/ops/augment.py validates and calls it):
  apply(x, matrix, box, colour, brightness, contrast, saturation, noise_seed, noise_mean, noise_std,
        noise_clip, scale, shift, nearest, fill, out)
x (N, C, H, W) uint8 (read as x / 255) or float; matrix (N, 3, 3) float32 maps an output pixel's corner
coordinates (x + 0.5, y + 0.5) projectively to the source's; box (N, 4) = (x0, x1, y0, y1) clamps the source
pixel position, or None; colour (N, 3) = brightness, contrast, saturation factors; scale/shift (C,) apply
v * scale + shift (Normalize); out is written in place (its shape gives the output size, its dtype and
strides the output's). Arithmetic in float32 (float64 for float64 input).

Border pixels: sampled = mask * (img - fill) + fill for bilinear (mask = the in-image share of the bilinear
weights, img the zero-padded grid_sample) and fill where mask < 0.5 for nearest: torchvision's formula.

Invalid parameters are not checked on the host (the check would synchronise a GPU every batch): a sample whose
matrix or box holds a non-finite value, or whose colour factor of an enabled colour op is negative or NaN, is
all NaN in the output (invalid_samples).
"""
import torch
import torch.nn.functional as F

from .._tensors import acc_dtype

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def source_positions(matrix, box, out_h, out_w, acc):
    """(sx, sy), each (N, out_h * out_w): the source pixel-index position of every output pixel."""
    dev = matrix.device
    ys, xs = torch.meshgrid(torch.arange(out_h, device=dev, dtype=acc) + 0.5,
                            torch.arange(out_w, device=dev, dtype=acc) + 0.5, indexing="ij")
    pts = torch.stack([xs.reshape(-1), ys.reshape(-1), torch.ones(out_h * out_w, device=dev, dtype=acc)])
    src = matrix.to(acc) @ pts
    sx = src[:, 0] / src[:, 2] - 0.5
    sy = src[:, 1] / src[:, 2] - 0.5
    if box is not None:
        b = box.to(acc)
        sx = torch.minimum(torch.maximum(sx, b[:, 0:1]), b[:, 1:2])
        sy = torch.minimum(torch.maximum(sy, b[:, 2:3]), b[:, 3:4])
    return sx, sy


def gray(img):
    if img.shape[1] == 1:
        return img
    r, g, b = img.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(1)


def sample(x, matrix, box, out_h, out_w, nearest, fill):
    acc = acc_dtype(x)
    n, c, h, w = x.shape
    xf = x.to(acc) / 255 if x.dtype == torch.uint8 else x.to(acc)
    sx, sy = source_positions(matrix, box, out_h, out_w, acc)
    grid = torch.stack([(2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1], -1).view(n, out_h, out_w, 2)
    mode = "nearest" if nearest else "bilinear"
    img = F.grid_sample(xf, grid, mode=mode, padding_mode="zeros", align_corners=False)
    mask = F.grid_sample(torch.ones(n, 1, h, w, dtype=acc, device=x.device), grid, mode=mode,
                         padding_mode="zeros", align_corners=False)
    if nearest:
        return torch.where(mask < 0.5, torch.full_like(img, fill), img)
    return (img - fill) * mask + fill


def colour_ops(img, colour, brightness, contrast, saturation):
    if colour is None:
        return img
    f = colour.to(img.dtype)[:, :, None, None, None]
    if brightness:
        img = (img * f[:, 0]).clamp(0, 1)
    if contrast:
        m = gray(img).mean(dim=(1, 2, 3), keepdim=True)
        img = (f[:, 1] * img + (1 - f[:, 1]) * m).clamp(0, 1)
    if saturation and img.shape[1] == 3:
        img = (f[:, 2] * img + (1 - f[:, 2]) * gray(img)).clamp(0, 1)
    return img


def invalid_samples(x, matrix, box, colour, brightness, contrast, saturation):
    """(N,) bool on the device: the samples whose output is NaN (module docstring)."""
    bad = ~torch.isfinite(matrix).flatten(1).all(1)
    if box is not None:
        bad = bad | ~torch.isfinite(box).all(1)
    if colour is not None:
        used = [brightness, contrast, saturation and x.shape[1] == 3]
        for i in range(3):
            if used[i]:
                bad = bad | ~(colour[:, i] >= 0)
    return bad


def apply(x, matrix, box, colour, brightness, contrast, saturation, noise_seed, noise_mean, noise_std, noise_clip,
          scale, shift, nearest, fill, out):
    img = sample(x, matrix, box, out.shape[2], out.shape[3], nearest, fill)
    img = colour_ops(img, colour, brightness, contrast, saturation)
    if noise_seed is not None and noise_std > 0:
        gen = torch.Generator(device=x.device).manual_seed(int(noise_seed.reshape(-1)[0].item()))
        img = img + (torch.randn(img.shape, generator=gen, device=x.device, dtype=img.dtype) * noise_std + noise_mean)
        if noise_clip:
            img = img.clamp(0, 1)
    if scale is not None:
        img = img * scale.to(img.dtype)[None, :, None, None] + shift.to(img.dtype)[None, :, None, None]
    bad = invalid_samples(x, matrix, box, colour, brightness, contrast, saturation)
    img = torch.where(bad[:, None, None, None], torch.full((), float("nan"), dtype=img.dtype, device=img.device), img)
    out.copy_(img)
    return out
