"""Per-sample batched augmentation: torchvision.transforms.v2-style transforms fused into one kernel call.

Each transform below has the name, arguments and parameter distribution of its torchvision v2 namesake, but
draws its parameters for EVERY SAMPLE of an (N, C, H, W) batch, on the batch's device, from a
torch.Generator (v2 draws one set per call, shared by the whole batch). `Augment([...])` composes them:

  * geometric transforms (RandomResizedCrop, Resize, CenterCrop, RandomCrop, Pad, RandomHorizontalFlip,
    RandomVerticalFlip, RandomRotation, RandomAffine, RandomPerspective), in the order given, into one 3x3
    matrix per sample that maps an output pixel to its source (projective, in "corner" coordinates: a pixel
    (x, y) covers [x, x + 1) x [y, y + 1));
  * then ColorJitter (brightness, contrast, saturation, in that fixed order; v2 shuffles the order per
    call), GaussianNoise, Normalize, and the output dtype and memory format (Augment's out_dtype and
    memory_format; bf16 channels_last for a model trained under autocast).

One kernel (fastnets.ops.augment_apply) then reads each output pixel's source by bilinear or nearest sampling
and applies the colour ops, the noise and the normalisation in registers: one read of the input, one write of
the output (contrast, whose factor blends with the mean grey level of each transformed image as in v2, adds a
reduction pass over the transformed image first).

Semantics, against torchvision v2 applied per image with the same parameters (tests/test_augment.py):
  * every geometric transform alone, ColorJitter, Normalize: the same values (float images in [0, 1]; v2 on
    uint8 rounds after every op, fastnets reads uint8 as x / 255 and rounds once, like v2's
    ToDtype(torch.float32, scale=True) placed first). Resizes are not antialiased (v2's antialias=False).
  * a composition is resampled ONCE, through the composed matrix: sharper than v2's chain of resamplings,
    and a pixel that an intermediate step would have filled is filled only where the final source lies
    outside the input. The box of a leading crop/resize is honoured (its border is clamped as interpolate
    does), so RandomResizedCrop followed by flips equals v2 exactly.
  * nearest sampling rounds the source position as grid_sample does (v2's Resize(NEAREST) floors instead).
  * GaussianNoise draws other random numbers than torch.randn_like (same distribution).
"""
import math
import numbers
from typing import Optional, Sequence

import torch
from torch import nn

from ..ops.augment import augment_apply


# ------------------------------------------------------------------------------------------ helpers


def _pair(v, name):
    if isinstance(v, numbers.Number):
        return (int(v), int(v))
    if isinstance(v, (tuple, list)) and len(v) == 1:
        return (int(v[0]), int(v[0]))
    if isinstance(v, (tuple, list)) and len(v) == 2:
        return (int(v[0]), int(v[1]))
    raise ValueError(f"{name} must be an int or a (height, width) pair, got {v!r}")


def _size(size, name="size"):
    h, w = _pair(size, name)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return h, w


def _range(v, name, center=None, bound=None, allow_negative=False):
    """A (lo, hi) range: a single number d means (center - d, center + d) (or (-d, d)), as in v2."""
    if isinstance(v, numbers.Number):
        if v < 0:
            raise ValueError(f"{name} must be non-negative when a single number, got {v}")
        lo, hi = ((center - v, center + v) if center is not None else (-v, v))
        if center is not None:
            lo = max(lo, 0.0)
    elif isinstance(v, (tuple, list)) and len(v) == 2:
        lo, hi = float(v[0]), float(v[1])
    else:
        raise ValueError(f"{name} must be a number or a (min, max) pair, got {v!r}")
    if lo > hi:
        raise ValueError(f"{name} must be (min, max) with min <= max, got {v!r}")
    if not allow_negative and center is not None and lo < 0:
        raise ValueError(f"{name} values must be non-negative, got {v!r}")
    if bound is not None and (lo < bound[0] or hi > bound[1]):
        raise ValueError(f"{name} must lie in [{bound[0]}, {bound[1]}], got {v!r}")
    return float(lo), float(hi)


def _prob(p, name="p"):
    if not isinstance(p, numbers.Number) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _uniform(n, lo, hi, g, device):
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device, dtype=torch.float64)


def _randint(n, low, high, g, device):
    """Per-sample integers uniform in [low, high) (float64 tensors on `device` or numbers), as torch.randint
    per sample. Numbers stay kernel arguments: no tensor is built from host data (an upload and a sync)."""
    u = torch.rand(n, generator=g, device=device, dtype=torch.float64)
    return torch.clamp(low + torch.floor(u * (high - low)), max=high - 1)


def _eye(n, device):
    return torch.eye(3, dtype=torch.float64, device=device).expand(n, 3, 3).clone()


def _translate(tx, ty):
    m = _eye(tx.shape[0], tx.device)
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


def _scale(sx, sy):
    m = _eye(sx.shape[0], sx.device)
    m[:, 0, 0], m[:, 1, 1] = sx, sy
    return m


def inverse_affine_matrix(angle, translate_x, translate_y, scale, shear_x, shear_y, center_x, center_y):
    """torchvision's _get_inverse_affine_matrix for per-sample (N,) float64 tensors: (N, 3, 3), output to
    source, in coordinates centred on the image centre."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    cos_sy, tan_sx = torch.cos(sy), torch.tan(sx)
    a = torch.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot - sy) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    m = _eye(angle.shape[0], angle.device)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = d / scale, -b / scale, -c / scale, a / scale
    cxt, cyt = center_x + translate_x, center_y + translate_y
    m[:, 0, 2] = center_x - m[:, 0, 0] * cxt - m[:, 0, 1] * cyt
    m[:, 1, 2] = center_y - m[:, 1, 0] * cxt - m[:, 1, 1] * cyt
    return m


def _centered(m_centered, in_hw, out_hw):
    """A matrix in image-centred coordinates (torchvision's affine grid) as one in corner coordinates."""
    (h, w), (oh, ow) = in_hw, out_hw
    n, dev = m_centered.shape[0], m_centered.device
    full = lambda v: torch.full((n,), float(v), dtype=torch.float64, device=dev)  # noqa: E731
    return _translate(full(w / 2), full(h / 2)) @ m_centered @ _translate(full(-ow / 2), full(-oh / 2))


class Sample:
    """One transform's parameters for a batch: `matrix` (N, 3, 3) float64 output-to-source in corner
    coordinates, the output size, and optionally `box` (N, 4) = source (x0, x1, y0, y1) pixel-index bounds
    that the source position is clamped to (a crop/resize's border, as interpolate clamps)."""

    def __init__(self, matrix, out_hw, box=None, **params):
        self.matrix, self.out_hw, self.box, self.params = matrix, out_hw, box, params


# ------------------------------------------------------------------------------------------ geometric


class GeometricTransform:
    interpolation_sensitive = True

    def sample(self, n, in_hw, generator, device):
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class _RandomFlip(GeometricTransform):
    """Mirrors each image with probability p along `axis` (0: x -> w - x, 1: y -> h - y)."""

    axis = None

    def __init__(self, p=0.5):
        self.p = _prob(p)

    def sample(self, n, in_hw, g, device):
        flip = torch.rand(n, generator=g, device=device, dtype=torch.float64) < self.p
        mirror = torch.where(flip, -1.0, 1.0).to(torch.float64)
        keep = torch.ones_like(mirror)
        m = _scale(mirror, keep) if self.axis == 0 else _scale(keep, mirror)
        m[:, self.axis, 2] = torch.where(flip, float(in_hw[1 - self.axis]), 0.0)
        return Sample(m, in_hw, flip=flip)


class RandomHorizontalFlip(_RandomFlip):
    axis = 0


class RandomVerticalFlip(_RandomFlip):
    axis = 1


def _crop_resize(top, left, height, width, out_hw):
    """Crop (top, left, height, width) per sample (float64 (N,)), resized to out_hw (interpolate's
    align_corners=False mapping), with the crop's box."""
    oh, ow = out_hw
    m = _scale(width / ow, height / oh)
    m[:, 0, 2], m[:, 1, 2] = left, top
    box = torch.stack([left, left + width - 1, top, top + height - 1], dim=1)
    return m, box


class RandomResizedCrop(GeometricTransform):
    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), antialias=False):
        self.size = _size(size)
        self.scale = _range(scale, "scale")
        self.ratio = _range(ratio, "ratio")
        if self.scale[0] <= 0 or self.ratio[0] <= 0:
            raise ValueError(f"scale and ratio must be positive, got scale={scale!r}, ratio={ratio!r}")
        if antialias:
            raise ValueError("antialias=True is not supported: the fused kernel samples bilinearly without "
                             "antialiasing (v2's antialias=False)")
        self.antialias = False

    def sample(self, n, in_hw, g, device):
        height, width = in_hw
        area = height * width
        tries = 10
        target = area * _uniform((n, tries), self.scale[0], self.scale[1], g, device)
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(_uniform((n, tries), log_r[0], log_r[1], g, device))
        w = torch.round(torch.sqrt(target * aspect))
        h = torch.round(torch.sqrt(target / aspect))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)  # the first try that fits, as v2's loop
        found = ok.any(dim=1)
        w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
        # v2's fallback: a central crop with the ratio clamped into range
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            fw, fh = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            fw, fh = int(round(height * max(self.ratio))), height
        else:
            fw, fh = width, height
        w = torch.where(found, w, float(fw))
        h = torch.where(found, h, float(fh))
        top = torch.where(found, _randint(n, 0, height - h + 1, g, device), float((height - fh) // 2))
        left = torch.where(found, _randint(n, 0, width - w + 1, g, device), float((width - fw) // 2))
        m, box = _crop_resize(top, left, h, w, self.size)
        return Sample(m, self.size, box, top=top, left=left, height=h, width=w)


class Resize(GeometricTransform):
    def __init__(self, size, antialias=False):
        self.size = _size(size)
        if antialias:
            raise ValueError("antialias=True is not supported (the fused kernel does not antialias)")
        self.antialias = False

    def sample(self, n, in_hw, g, device):
        z = torch.zeros(n, dtype=torch.float64, device=device)
        m, box = _crop_resize(z, z, z + in_hw[0], z + in_hw[1], self.size)
        return Sample(m, self.size, box)


class CenterCrop(GeometricTransform):
    def __init__(self, size):
        self.size = _size(size)

    def sample(self, n, in_hw, g, device):
        (h, w), (oh, ow) = in_hw, self.size
        # v2: top = round((h - oh) / 2), left = round((w - ow) / 2); outside the image is filled
        top, left = int(round((h - oh) / 2.0)), int(round((w - ow) / 2.0))
        z = torch.zeros(n, dtype=torch.float64, device=device)
        return Sample(_translate(z + left, z + top), self.size)


def _padding(padding):
    if isinstance(padding, numbers.Number):
        p = int(padding)
        pad = (p, p, p, p)
    elif isinstance(padding, (tuple, list)) and len(padding) in (1, 2, 4):
        pad = [int(v) for v in padding]
        pad = tuple(pad * 4 if len(pad) == 1 else (pad * 2 if len(pad) == 2 else pad))
    else:
        raise ValueError(f"padding must be an int or a sequence of 1, 2 or 4 ints, got {padding!r}")
    if len(padding if isinstance(padding, (tuple, list)) else [0]) == 2:
        pad = (pad[0], pad[1], pad[0], pad[1])  # (left/right, top/bottom), as v2
    if min(pad) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return pad  # left, top, right, bottom


class Pad(GeometricTransform):
    def __init__(self, padding, fill=None, padding_mode="constant"):
        if padding_mode != "constant":
            raise ValueError(f"padding_mode must be 'constant' (the fill of Augment), got {padding_mode!r}")
        if fill is not None:
            raise ValueError("fill is Augment's argument (one fill for the whole pipeline)")
        self.padding = _padding(padding)

    def sample(self, n, in_hw, g, device):
        l, t, r, b = self.padding
        z = torch.zeros(n, dtype=torch.float64, device=device)
        return Sample(_translate(z - l, z - t), (in_hw[0] + t + b, in_hw[1] + l + r))


class RandomCrop(GeometricTransform):
    def __init__(self, size, padding=None, pad_if_needed=False, fill=None, padding_mode="constant"):
        self.size = _size(size)
        self.padding = _padding(padding) if padding is not None else (0, 0, 0, 0)
        self.pad_if_needed = bool(pad_if_needed)
        if padding_mode != "constant":
            raise ValueError(f"padding_mode must be 'constant' (the fill of Augment), got {padding_mode!r}")
        if fill is not None:
            raise ValueError("fill is Augment's argument (one fill for the whole pipeline)")

    def sample(self, n, in_hw, g, device):
        l, t, r, b = self.padding
        ph, pw = in_hw[0] + t + b, in_hw[1] + l + r
        oh, ow = self.size
        if self.pad_if_needed:  # v2 pads both sides by the shortfall
            if ph < oh:
                d = oh - ph
                t, b, ph = t + d, b + d, ph + 2 * d
            if pw < ow:
                d = ow - pw
                l, r, pw = l + d, r + d, pw + 2 * d
        if ph < oh or pw < ow:
            raise ValueError(f"RandomCrop size {self.size} is larger than the (padded) input {(ph, pw)}")
        top = _randint(n, 0, ph - oh + 1, g, device)
        left = _randint(n, 0, pw - ow + 1, g, device)
        return Sample(_translate(left - l, top - t), self.size, top=top, left=left)


def _degrees(degrees, name="degrees"):
    return _range(degrees, name)


class RandomRotation(GeometricTransform):
    def __init__(self, degrees, expand=False, center=None):
        self.degrees = _degrees(degrees)
        if expand:
            raise ValueError("expand=True is not supported (the output keeps the input's size)")
        self.center = None if center is None else (float(center[0]), float(center[1]))

    def sample(self, n, in_hw, g, device):
        angle = _uniform(n, self.degrees[0], self.degrees[1], g, device)
        h, w = in_hw
        z = torch.zeros(n, dtype=torch.float64, device=device)
        cx, cy = (0.0, 0.0) if self.center is None else (self.center[0] - w * 0.5, self.center[1] - h * 0.5)
        # v2's rotate uses -angle in the inverse affine matrix ("incoherence between affine and rotate")
        m = inverse_affine_matrix(-angle, z, z, z + 1, z, z, z + cx, z + cy)
        return Sample(_centered(m, in_hw, in_hw), in_hw, angle=angle)


class RandomAffine(GeometricTransform):
    def __init__(self, degrees, translate=None, scale=None, shear=None, center=None):
        self.degrees = _degrees(degrees)
        if translate is not None:
            if len(translate) != 2 or not all(0.0 <= t <= 1.0 for t in translate):
                raise ValueError(f"translate must be a pair of fractions in [0, 1], got {translate!r}")
            translate = (float(translate[0]), float(translate[1]))
        self.translate = translate
        if scale is not None:
            scale = _range(scale, "scale")
            if scale[0] <= 0:
                raise ValueError(f"scale values must be positive, got {scale!r}")
        self.scale = scale
        if shear is not None:
            if isinstance(shear, numbers.Number):
                shear = (*_range(shear, "shear"), 0.0, 0.0)
            elif len(shear) == 2:
                shear = (*_range(tuple(shear), "shear"), 0.0, 0.0)
            elif len(shear) == 4:
                shear = (*_range(tuple(shear[:2]), "shear"), *_range(tuple(shear[2:]), "shear"))
            else:
                raise ValueError(f"shear must be a number or a sequence of 2 or 4 numbers, got {shear!r}")
        self.shear = shear
        self.center = None if center is None else (float(center[0]), float(center[1]))

    def sample(self, n, in_hw, g, device):
        h, w = in_hw
        z = torch.zeros(n, dtype=torch.float64, device=device)
        angle = _uniform(n, self.degrees[0], self.degrees[1], g, device)
        if self.translate is not None:
            mx, my = self.translate[0] * w, self.translate[1] * h
            tx = torch.round(_uniform(n, -mx, mx, g, device))
            ty = torch.round(_uniform(n, -my, my, g, device))
        else:
            tx = ty = z
        s = _uniform(n, self.scale[0], self.scale[1], g, device) if self.scale is not None else z + 1
        if self.shear is not None:
            shx = _uniform(n, self.shear[0], self.shear[1], g, device)
            shy = _uniform(n, self.shear[2], self.shear[3], g, device) if self.shear[2:] != (0.0, 0.0) else z
        else:
            shx = shy = z
        cx, cy = (0.0, 0.0) if self.center is None else (self.center[0] - w * 0.5, self.center[1] - h * 0.5)
        m = inverse_affine_matrix(angle, tx, ty, s, shx, shy, z + cx, z + cy)
        return Sample(_centered(m, in_hw, in_hw), in_hw, angle=angle, translate_x=tx, translate_y=ty, scale=s,
                      shear_x=shx, shear_y=shy)


def perspective_matrix(startpoints, endpoints):
    """The (N, 3, 3) projective matrix mapping endpoints to startpoints (each (N, 4, 2), float64), as v2's
    _get_perspective_coeffs (coefficients rounded to float32 as v2 rounds them)."""
    n = startpoints.shape[0]
    a = torch.zeros(n, 8, 8, dtype=torch.float64, device=startpoints.device)
    x, y = endpoints[..., 0], endpoints[..., 1]
    u, v = startpoints[..., 0], startpoints[..., 1]
    a[:, 0::2, 0], a[:, 0::2, 1], a[:, 0::2, 2] = x, y, 1
    a[:, 1::2, 3], a[:, 1::2, 4], a[:, 1::2, 5] = x, y, 1
    a[:, 0::2, 6], a[:, 0::2, 7] = -u * x, -u * y
    a[:, 1::2, 6], a[:, 1::2, 7] = -v * x, -v * y
    b = startpoints.reshape(n, 8)
    # solve_ex: no host check of the factorisation (linalg.solve reads its info on the host: a sync); a singular
    # system gives a non-finite matrix, whose sample the kernel writes as NaN
    coeffs = torch.linalg.solve_ex(a, b)[0].to(torch.float32).to(torch.float64)
    return torch.cat([coeffs, torch.ones(n, 1, dtype=torch.float64, device=coeffs.device)], 1).view(n, 3, 3)


class RandomPerspective(GeometricTransform):
    def __init__(self, distortion_scale=0.5, p=0.5):
        if not 0.0 <= distortion_scale <= 1.0:
            raise ValueError(f"distortion_scale must be in [0, 1], got {distortion_scale!r}")
        self.distortion_scale = float(distortion_scale)
        self.p = _prob(p)

    def sample(self, n, in_hw, g, device):
        h, w = in_hw
        apply = torch.rand(n, generator=g, device=device, dtype=torch.float64) < self.p
        bh, bw = int(self.distortion_scale * (h // 2)) + 1, int(self.distortion_scale * (w // 2)) + 1
        ri = lambda lo, hi: _randint(n, lo, hi, g, device)  # noqa: E731
        end = torch.stack([
            torch.stack([ri(0, bw), ri(0, bh)], 1),
            torch.stack([ri(w - bw, w), ri(0, bh)], 1),
            torch.stack([ri(w - bw, w), ri(h - bh, h)], 1),
            torch.stack([ri(0, bw), ri(h - bh, h)], 1),
        ], 1)
        corner = torch.arange(4, device=device)  # (0, 0), (w - 1, 0), (w - 1, h - 1), (0, h - 1), built on the device
        start = torch.stack([((corner == 1) | (corner == 2)).to(torch.float64) * (w - 1),
                             (corner >= 2).to(torch.float64) * (h - 1)], 1).expand(n, 4, 2)
        m = perspective_matrix(start, end)  # v2's grid: corner coordinates in, corner coordinates out
        m = torch.where(apply[:, None, None], m, _eye(n, device))
        return Sample(m, in_hw, apply=apply, startpoints=start, endpoints=end)


# ------------------------------------------------------------------------------------------ colour etc.


class ColorJitter:
    def __init__(self, brightness=0, contrast=0, saturation=0, hue=0):
        self.brightness = _range(brightness, "brightness", center=1.0) if brightness else None
        self.contrast = _range(contrast, "contrast", center=1.0) if contrast else None
        self.saturation = _range(saturation, "saturation", center=1.0) if saturation else None
        if hue:
            raise ValueError("hue is not supported by the fused kernel (brightness, contrast, saturation are)")

    def sample(self, n, g, device):
        out = torch.ones(n, 3, dtype=torch.float64, device=device)
        for i, r in enumerate((self.brightness, self.contrast, self.saturation)):
            if r is not None:
                out[:, i] = _uniform(n, r[0], r[1], g, device)
        return out

    def __repr__(self):
        return f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation})"


class GaussianNoise:
    def __init__(self, mean=0.0, sigma=0.1, clip=True):
        if not isinstance(sigma, numbers.Number) or sigma < 0:
            raise ValueError(f"sigma must be a non-negative number, got {sigma!r}")
        if not isinstance(mean, numbers.Number) or not math.isfinite(mean):
            raise ValueError(f"mean must be a finite number, got {mean!r}")
        self.mean, self.sigma, self.clip = float(mean), float(sigma), bool(clip)

    def __repr__(self):
        return f"GaussianNoise(mean={self.mean}, sigma={self.sigma}, clip={self.clip})"


class Normalize:
    def __init__(self, mean, std):
        self.mean = [float(m) for m in (mean if isinstance(mean, (tuple, list)) else [mean])]
        self.std = [float(s) for s in (std if isinstance(std, (tuple, list)) else [std])]
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {std!r}")

    def __repr__(self):
        return f"Normalize(mean={self.mean}, std={self.std})"


_INTERPOLATION = ("bilinear", "nearest")


class Augment(nn.Module):
    """`Augment(transforms, interpolation="bilinear", fill=0, out_dtype=torch.float32,
    memory_format=torch.contiguous_format, generator=None)`: the per-sample, fused equivalent of
    v2.Compose([...transforms, ToDtype(out_dtype), ...]) for (N, C, H, W) uint8 or float batches.

    forward(x, generator=None) draws new parameters for every sample (from `generator`, else the module's,
    else the default generator of x's device) and returns the augmented batch. `sample(x)` returns the
    parameters it would draw, `apply(x, params)` applies given parameters (tests; replaying an augmentation).
    fill is in input units (0..255 for uint8)."""

    def __init__(self, transforms: Sequence, interpolation="bilinear", fill=0.0, out_dtype=torch.float32,
                 memory_format=torch.contiguous_format, generator: Optional[torch.Generator] = None):
        super().__init__()
        if interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {_INTERPOLATION}, got {interpolation!r}")
        if out_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"out_dtype must be a floating-point dtype, got {out_dtype}")
        if memory_format not in (torch.contiguous_format, torch.channels_last):
            raise ValueError(f"memory_format must be torch.contiguous_format or torch.channels_last, got {memory_format}")
        if not isinstance(fill, numbers.Number):
            raise ValueError(f"fill must be one number (in input units), got {fill!r}")
        self.geometric, self.jitter, self.noise, self.normalize = [], None, None, None
        stage = 0  # geometry (any order) < colour < noise < normalize
        for t in transforms:
            if isinstance(t, GeometricTransform):
                self.geometric.append(t)
                continue
            order = {ColorJitter: 1, GaussianNoise: 2, Normalize: 3}.get(type(t))
            if order is None:
                raise TypeError(f"transforms: {t!r} is not one of fastnets.augment's transforms")
            if order <= stage:
                raise ValueError(f"transforms: {type(t).__name__} must come before what follows it in "
                                 "(ColorJitter, GaussianNoise, Normalize) and appear once")
            stage = order
            if order == 1:
                self.jitter = t
            elif order == 2:
                self.noise = t
            else:
                self.normalize = t
        self.transforms = list(transforms)
        self.interpolation, self.fill, self.out_dtype = interpolation, float(fill), out_dtype
        self.memory_format = memory_format
        self.generator = generator
        self._normalize_cache = {}  # (device, channels) -> (scale, shift): uploaded once, not every batch

    def extra_repr(self):
        return (f"transforms={self.transforms}, interpolation={self.interpolation!r}, fill={self.fill}, "
                f"out_dtype={self.out_dtype}, memory_format={self.memory_format}")

    def sample(self, x, generator=None):
        """Per-sample parameters for batch x: dict(matrix (N, 3, 3) float32, out_hw, box, colour (N, 3) or None,
        noise_seed (1,) int64 or None, steps = each geometric transform's Sample)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
        g = generator if generator is not None else self.generator
        if g is not None and not isinstance(g, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(g).__name__}")
        if g is not None and g.device.type != x.device.type:
            raise ValueError(f"generator is on {g.device} but input is on {x.device}")
        n, dev = x.shape[0], x.device
        hw = tuple(x.shape[-2:])
        matrix, box, steps = _eye(n, dev), None, []
        for i, t in enumerate(self.geometric):
            s = t.sample(n, hw, g, dev)
            if i == 0 and s.box is not None:
                box = s.box
            matrix = matrix @ s.matrix  # source of the output = earlier steps' matrices applied last
            hw = s.out_hw
            steps.append(s)
        colour = self.jitter.sample(n, g, dev).to(torch.float32) if self.jitter is not None else None
        seed = None
        if self.noise is not None and self.noise.sigma > 0:
            seed = torch.randint(0, 2**31 - 1, (1,), generator=g, device=dev, dtype=torch.int64)
        return {"matrix": matrix.to(torch.float32), "out_hw": hw,
                "box": None if box is None else box.to(torch.float32), "colour": colour, "noise_seed": seed,
                "steps": steps}

    def apply(self, x, params):
        jit = self.jitter
        scale = shift = None
        if self.normalize is not None:
            c = x.shape[1]
            mean, std = self.normalize.mean, self.normalize.std
            if len(mean) == 1:
                mean = mean * c
            if len(std) == 1:
                std = std * c
            if len(mean) != c or len(std) != c:
                raise ValueError(f"Normalize has {len(mean)} means and {len(std)} stds for {c} channels")
            key = (x.device, c)
            if key not in self._normalize_cache:
                self._normalize_cache[key] = (
                    torch.tensor([1.0 / s for s in std], dtype=torch.float32).to(x.device),
                    torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).to(x.device))
            scale, shift = self._normalize_cache[key]
        noise = self.noise
        return augment_apply(
            x, params["matrix"], params["out_hw"], box=params["box"], colour=params["colour"],
            brightness=jit is not None and jit.brightness is not None,
            contrast=jit is not None and jit.contrast is not None,
            saturation=jit is not None and jit.saturation is not None,
            noise_seed=params["noise_seed"], noise_mean=noise.mean if noise else 0.0,
            noise_std=noise.sigma if noise else 0.0, noise_clip=noise.clip if noise else True,
            scale=scale, shift=shift, interpolation=self.interpolation, fill=self.fill,
            out_dtype=self.out_dtype, channels_last=self.memory_format == torch.channels_last,
        )

    def forward(self, x, generator=None):
        return self.apply(x, self.sample(x, generator))
