"""Fused augmentation in one Triton kernel: per output pixel, the composed 3x3 matrix gives the source
position, a bilinear (4 taps, all channels at once) or nearest read samples it, and brightness, contrast,
saturation, Gaussian noise, the normalisation and the cast to the output dtype happen in registers before
one store: one read of the input, one write of the output, any input/output strides (NCHW, channels_last).

Contrast blends with each transformed image's mean grey level (torchvision's definition), which needs a
reduction over the output before the colour ops: the same kernel with STATS=True samples the image,
applies brightness and writes per-(sample, tile) partial sums of the grey level (no output); the mean is
their sum / (OH * OW) (a fixed-order sum, so results are deterministic).

Noise: tl.randn(seed, element index) (Philox), the seed a device tensor drawn from the caller's generator.
Invalid parameters are not checked on the host (that would synchronise every batch): a sample whose matrix or
box is not finite, or whose enabled colour factor is negative or NaN, is written as NaN (the reference's
contract), and a NaN source position is clamped before its integer conversion.
Primitive: apply(...) as in fastnets/reference/augment.py.
"""
import torch
import triton
import triton.language as tl

from ._common import on_tensor_device, vector


BLOCK = 256  # output pixels per program; each holds C_BLOCK channels, so up to 1024 values per tap


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _finite(v):
    return tl.abs(v) <= 3.4028234663852886e38  # false for +-inf and NaN


@triton.jit
def _tap(base, xi, yi, W, H, sxh, sxw, c_off, pmask, cmask):
    valid = pmask & (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
    xs = tl.where(valid, xi, 0)
    ys = tl.where(valid, yi, 0)
    ptrs = base + (ys.to(tl.int64) * sxh + xs.to(tl.int64) * sxw)[:, None] + c_off[None, :]
    v = tl.load(ptrs, mask=valid[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    return v, valid


@triton.jit
def _augment_kernel(
    x_ptr, out_ptr, mat_ptr, box_ptr, col_ptr, mean_ptr, part_ptr, seed_ptr, scale_ptr, shift_ptr,
    C, H, W, OH, OW,
    sxn, sxc, sxh, sxw, son, soc, soh, sow,
    in_scale, fill, noise_mean, noise_std, n_tiles,
    C_BLOCK: tl.constexpr, BLOCK: tl.constexpr, NEAREST: tl.constexpr, HAS_BOX: tl.constexpr,
    BRIGHTNESS: tl.constexpr, CONTRAST: tl.constexpr, SATURATION: tl.constexpr, RGB: tl.constexpr,
    NOISE: tl.constexpr, NOISE_CLIP: tl.constexpr, NORMALIZE: tl.constexpr, STATS: tl.constexpr,
):
    # 1-D grid (x holds up to 2**31 - 1 programs; y and z only 65,535, which the tiles of one large output
    # image would pass): program `pid` is tile `pid % n_tiles` of sample `pid // n_tiles`
    pid = tl.program_id(0)
    n = pid // n_tiles
    tile = pid - n * n_tiles
    p = tile * BLOCK + tl.arange(0, BLOCK)
    pmask = p < OH * OW
    oy = p // OW
    ox = p - oy * OW
    c = tl.arange(0, C_BLOCK)
    cmask = c < C

    m = mat_ptr + n.to(tl.int64) * 9
    m0 = tl.load(m + 0)
    m1 = tl.load(m + 1)
    m2 = tl.load(m + 2)
    m3 = tl.load(m + 3)
    m4 = tl.load(m + 4)
    m5 = tl.load(m + 5)
    m6 = tl.load(m + 6)
    m7 = tl.load(m + 7)
    m8 = tl.load(m + 8)
    X = ox.to(tl.float32) + 0.5
    Y = oy.to(tl.float32) + 0.5
    ok = (_finite(m0) & _finite(m1) & _finite(m2) & _finite(m3) & _finite(m4) & _finite(m5) & _finite(m6)
          & _finite(m7) & _finite(m8))  # this sample's parameters are valid (else its output is NaN)
    den = m6 * X + m7 * Y + m8
    sx = (m0 * X + m1 * Y + m2) / den - 0.5
    sy = (m3 * X + m4 * Y + m5) / den - 0.5
    if HAS_BOX:
        bx = box_ptr + n.to(tl.int64) * 4
        b0 = tl.load(bx + 0)
        b1 = tl.load(bx + 1)
        b2 = tl.load(bx + 2)
        b3 = tl.load(bx + 3)
        ok = ok & _finite(b0) & _finite(b1) & _finite(b2) & _finite(b3)
        sx = tl.minimum(tl.maximum(sx, b0), b1)
        sy = tl.minimum(tl.maximum(sy, b2), b3)
    # far outside the image every tap is invalid anyway; keep the int conversion in range (NaN included:
    # a 0/0 position, or an invalid sample's, whose output is NaN anyway)
    sx = tl.where(sx == sx, sx, -4.0)
    sy = tl.where(sy == sy, sy, -4.0)
    sx = tl.minimum(tl.maximum(sx, -4.0), W + 4.0)
    sy = tl.minimum(tl.maximum(sy, -4.0), H + 4.0)

    base = x_ptr + n.to(tl.int64) * sxn
    c_off = c.to(tl.int64) * sxc
    if NEAREST:
        v, valid = _tap(base, _round_half_even(sx).to(tl.int32), _round_half_even(sy).to(tl.int32), W, H, sxh, sxw,
                        c_off, pmask, cmask)
        v = tl.where(valid[:, None], v * in_scale, fill)
    else:
        x0f = tl.floor(sx)
        y0f = tl.floor(sy)
        wx = sx - x0f
        wy = sy - y0f
        x0 = x0f.to(tl.int32)
        y0 = y0f.to(tl.int32)
        v00, k00 = _tap(base, x0, y0, W, H, sxh, sxw, c_off, pmask, cmask)
        v01, k01 = _tap(base, x0 + 1, y0, W, H, sxh, sxw, c_off, pmask, cmask)
        v10, k10 = _tap(base, x0, y0 + 1, W, H, sxh, sxw, c_off, pmask, cmask)
        v11, k11 = _tap(base, x0 + 1, y0 + 1, W, H, sxh, sxw, c_off, pmask, cmask)
        w00 = (1.0 - wx) * (1.0 - wy)
        w01 = wx * (1.0 - wy)
        w10 = (1.0 - wx) * wy
        w11 = wx * wy
        acc = w00[:, None] * v00 + w01[:, None] * v01 + w10[:, None] * v10 + w11[:, None] * v11
        mask = (tl.where(k00, w00, 0.0) + tl.where(k01, w01, 0.0) + tl.where(k10, w10, 0.0)
                + tl.where(k11, w11, 0.0))
        # torchvision's fill blend: mask * (img - fill) + fill, img the zero-padded bilinear sample
        v = mask[:, None] * (acc * in_scale - fill) + fill

    if BRIGHTNESS:
        f = tl.load(col_ptr + n * 3 + 0)
        ok = ok & (f >= 0)
        v = tl.minimum(tl.maximum(v * f, 0.0), 1.0)
    if RGB:
        gw = tl.where(c == 0, 0.2989, tl.where(c == 1, 0.587, tl.where(c == 2, 0.114, 0.0)))
    else:
        gw = tl.where(c == 0, 1.0, 0.0)
    if STATS:
        g = tl.sum(v * gw[None, :], axis=1)
        tl.store(part_ptr + pid, tl.sum(tl.where(pmask, g, 0.0), axis=0))  # part[n, tile]
    else:
        if CONTRAST:
            f = tl.load(col_ptr + n * 3 + 1)
            ok = ok & (f >= 0)
            mean = tl.load(mean_ptr + n)
            v = tl.minimum(tl.maximum(f * v + (1.0 - f) * mean, 0.0), 1.0)
        if SATURATION:
            f = tl.load(col_ptr + n * 3 + 2)
            ok = ok & (f >= 0)
            g = tl.sum(v * gw[None, :], axis=1)
            v = tl.minimum(tl.maximum(f * v + (1.0 - f) * g[:, None], 0.0), 1.0)
        out_off = (oy.to(tl.int64) * soh + ox.to(tl.int64) * sow)[:, None] + c[None, :].to(tl.int64) * soc
        if NOISE:
            seed = tl.load(seed_ptr).to(tl.uint32)
            # element index (n, c, pixel), independent of the output layout; int64: an int32 index wraps past
            # 2**31 and, from N * C * OH * OW = 2**32 on, repeats the Philox stream (the same noise in samples
            # far apart)
            idx = (n.to(tl.int64) * C + c[None, :]) * (OH * OW) + p[:, None]
            v = v + (tl.randn(seed, idx) * noise_std + noise_mean)
            if NOISE_CLIP:
                v = tl.minimum(tl.maximum(v, 0.0), 1.0)
        if NORMALIZE:
            sc = tl.load(scale_ptr + c, mask=cmask, other=1.0)
            sh = tl.load(shift_ptr + c, mask=cmask, other=0.0)
            v = v * sc[None, :] + sh[None, :]
        v = tl.where(ok, v, float("nan"))
        tl.store(out_ptr + n.to(tl.int64) * son + out_off, v.to(out_ptr.dtype.element_ty),
                 mask=pmask[:, None] & cmask[None, :])


def plan(c):
    c_block = triton.next_power_of_2(max(int(c), 1))
    return {"C_BLOCK": c_block, "BLOCK": max(16, BLOCK // max(c_block // 4, 1)), "num_warps": 4}


@on_tensor_device
def apply(x, matrix, box, colour, brightness, contrast, saturation, noise_seed, noise_mean, noise_std, noise_clip,
          scale, shift, nearest, fill, out):
    n, c, h, w = x.shape
    oh, ow = out.shape[2], out.shape[3]
    cfg = plan(c)
    n_tiles = triton.cdiv(oh * ow, cfg["BLOCK"])
    grid = (n * n_tiles,)  # 1-D: see the kernel
    matrix = vector(matrix.to(torch.float32))
    dummy = matrix  # stands in for absent tensors (never read: their flag is off)
    box_t = vector(box.to(torch.float32)) if box is not None else dummy
    col = vector(colour.to(torch.float32)) if colour is not None else dummy
    scale, shift = vector(scale), vector(shift)
    rgb = c == 3
    has_noise = noise_seed is not None and noise_std > 0
    normalize = scale is not None
    common = dict(
        C_BLOCK=cfg["C_BLOCK"], BLOCK=cfg["BLOCK"], NEAREST=bool(nearest), HAS_BOX=box is not None,
        BRIGHTNESS=bool(brightness and colour is not None), RGB=rgb, num_warps=cfg["num_warps"],
    )
    in_scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
    args = (c, h, w, oh, ow, *x.stride(), *out.stride(), in_scale, float(fill), float(noise_mean), float(noise_std),
            n_tiles)
    mean = dummy
    if contrast and colour is not None:
        part = torch.empty((n, n_tiles), dtype=torch.float32, device=x.device)
        _augment_kernel[grid](x, out, matrix, box_t, col, dummy, part, dummy, dummy, dummy, *args,
                              CONTRAST=False, SATURATION=False, NOISE=False, NOISE_CLIP=False, NORMALIZE=False,
                              STATS=True, **common)
        mean = (part.sum(1) / (oh * ow)).contiguous()
    seed = noise_seed.reshape(-1)[:1].contiguous() if has_noise else dummy
    _augment_kernel[grid](
        x, out, matrix, box_t, col, mean, dummy, seed, scale if normalize else dummy, shift if normalize else dummy,
        *args,
        CONTRAST=bool(contrast and colour is not None), SATURATION=bool(saturation and colour is not None and rgb),
        NOISE=has_noise, NOISE_CLIP=bool(noise_clip), NORMALIZE=normalize, STATS=False, **common,
    )
    return out
