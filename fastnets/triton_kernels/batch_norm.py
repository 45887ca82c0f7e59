"""BatchNorm (+ residual add + ReLU) primitives in Triton; same contract as fastnets/reference/batch_norm.py.

Layout: x is dense, (N, C, S) in memory (NCHW; S = H*W, 1 for 2-D input) or (N, S, C) (channels_last).
The reductions see x as rows r = (n, s) by channels c and tile it [BLOCK_R, BLOCK_C]: channels_last tiles
are contiguous along c, NCHW tiles along r. The grid is (channel blocks, row splits) so that small-spatial
shapes with many channels (N x 2048 x 7 x 7) still fill the GPU; each program merges its tiles with
Chan's parallel-variance formula (exact two-pass statistics inside a tile, Welford merge across tiles and
splits), never E[x^2] - E[x]^2. Offsets are int64.
"""
import os

import torch
import triton
import triton.language as tl

from .. import _checks
from ..reference.batch_norm import acc_dtype

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tl_acc(x):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _geometry(x):
    n, c = x.shape[0], x.shape[1]
    return n, c, x.numel() // (n * c)


@triton.jit
def _tile_offsets(r0, r_end, cols, C, S, CL: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = r0 + tl.arange(0, BLOCK_R)
    mask = (rows < r_end)[:, None] & (cols < C)[None, :]
    if CL:
        offs = rows[:, None] * C + cols[None, :]
    else:
        n = rows // S
        s = rows - n * S
        offs = (n[:, None] * C + cols[None, :]) * S + s[:, None]
    return offs, mask


@triton.jit
def _stats_partial_kernel(
    x_ptr, pmean_ptr, pm2_ptr, C, S, R, rows_per_split,
    CL: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_start = split.to(tl.int64) * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for r0 in range(r_start, r_end, BLOCK_R):
        offs, mask = _tile_offsets(r0, r_end, cols, C, S, CL, BLOCK_R)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        seen = (r0 - r_start).to(ACC)  # every earlier tile of this split was full
        nb = tl.minimum(r_end - r0, BLOCK_R).to(ACC)
        tile_mean = tl.sum(x, axis=0) / nb
        d = tl.where(mask, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(d * d, axis=0)
        total = seen + nb
        delta = tile_mean - mean
        mean += delta * (nb / total)
        m2 += tile_m2 + delta * delta * (seen * nb / total)
    cmask = cols < C
    out = split.to(tl.int64) * C + cols
    tl.store(pmean_ptr + out, mean, mask=cmask)
    tl.store(pm2_ptr + out, m2, mask=cmask)


@triton.jit
def _stats_finalize_kernel(
    pmean_ptr, pm2_ptr, mean_ptr, invstd_ptr, C, R, rows_per_split, num_splits, eps,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for i in range(0, num_splits):
        seen = (i * rows_per_split).to(ACC)
        nb = tl.minimum(R - i * rows_per_split, rows_per_split).to(ACC)
        pm = tl.load(pmean_ptr + i * C + cols, mask=cmask, other=0.0)
        pm2 = tl.load(pm2_ptr + i * C + cols, mask=cmask, other=0.0)
        total = seen + nb
        delta = pm - mean
        mean += delta * (nb / total)
        m2 += pm2 + delta * delta * (seen * nb / total)
    var = m2 / R
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(invstd_ptr + cols, 1.0 / tl.sqrt(var + eps), mask=cmask)


@triton.jit
def _apply_kernel(
    x_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, numel, C, S,
    CL: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = offs % C if CL else (offs // S) % C
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    v = x * tl.load(scale_ptr + c, mask=mask, other=0.0) + tl.load(shift_ptr + c, mask=mask, other=0.0)
    if HAS_RES:
        v += tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
    if RELU:
        v = tl.where(v < 0, 0.0, v)  # NaN stays NaN, as torch.relu
    tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_reduce_kernel(
    dy_ptr, x_ptr, y_ptr, mean_ptr, psum_g_ptr, psum_gx_ptr, C, S, R, rows_per_split,
    CL: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    r_start = split.to(tl.int64) * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    sum_g = tl.zeros([BLOCK_C], ACC)
    sum_gx = tl.zeros([BLOCK_C], ACC)
    for r0 in range(r_start, r_end, BLOCK_R):
        offs, mask = _tile_offsets(r0, r_end, cols, C, S, CL, BLOCK_R)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        if RELU:
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
            g = tl.where(y > 0, g, 0.0)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(tl.where(mask, g * (x - mean[None, :]), 0.0), axis=0)
    out = split.to(tl.int64) * C + cols
    tl.store(psum_g_ptr + out, sum_g, mask=cmask)
    tl.store(psum_gx_ptr + out, sum_gx, mask=cmask)


@triton.jit
def _backward_apply_kernel(
    dy_ptr, x_ptr, y_ptr, a_ptr, b_ptr, d_ptr, mean_ptr, dx_ptr, g_ptr, numel, C, S,
    CL: tl.constexpr, RELU: tl.constexpr, TRAIN: tl.constexpr, WRITE_G: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = offs % C if CL else (offs // S) % C
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0)
    if RELU:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0)
        g = tl.where(y > 0, g, 0.0).to(g.dtype)
    if WRITE_G:
        tl.store(g_ptr + offs, g, mask=mask)
    dx = g.to(ACC) * tl.load(a_ptr + c, mask=mask, other=0.0)
    if TRAIN:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        mean = tl.load(mean_ptr + c, mask=mask, other=0.0)
        dx += tl.load(b_ptr + c, mask=mask, other=0.0) * (x - mean) + tl.load(d_ptr + c, mask=mask, other=0.0)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _num_programs_target(device):
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after another: few, large ones


def _reduction_config(x, channels_last):
    """Tile shape and row split for the per-channel reductions."""
    n, c, s = _geometry(x)
    rows = n * s
    if channels_last:
        block_c = min(64, triton.next_power_of_2(c))
        block_r = max(16, 2048 // block_c)
    else:
        # NCHW: tiles run along the contiguous spatial axis; with a small S a tile spans several
        # images and, with many channels, several channels too.
        block_r = min(1024, max(16, triton.next_power_of_2(rows)))
        block_c = max(1, min(16, 2048 // block_r, triton.next_power_of_2(c)))
    block_r = min(block_r, max(16, triton.next_power_of_2(rows)))
    channel_blocks = triton.cdiv(c, block_c)
    splits = max(1, min(triton.cdiv(rows, block_r), triton.cdiv(_num_programs_target(x.device), channel_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_r) * block_r
    splits = triton.cdiv(rows, rows_per_split)
    return block_r, block_c, channel_blocks, splits, rows_per_split


def _elementwise_block(x):
    return 4096 if _INTERPRET else 1024


def stats(x, channels_last, eps):
    n, c, s = _geometry(x)
    rows = n * s
    acc = acc_dtype(x)
    block_r, block_c, channel_blocks, splits, rows_per_split = _reduction_config(x, channels_last)
    pmean = torch.empty((splits, c), dtype=acc, device=x.device)
    pm2 = torch.empty((splits, c), dtype=acc, device=x.device)
    _stats_partial_kernel[(channel_blocks, splits)](
        x, pmean, pm2, c, s, rows, rows_per_split,
        CL=channels_last, ACC=_tl_acc(x), BLOCK_R=block_r, BLOCK_C=block_c,
    )
    mean = _checks.new_output(x, dtype=acc, shape=(c,))
    invstd = _checks.new_output(x, dtype=acc, shape=(c,))
    fin_block = min(1024, triton.next_power_of_2(c))
    _stats_finalize_kernel[(triton.cdiv(c, fin_block),)](
        pmean, pm2, mean, invstd, c, rows, rows_per_split, splits, eps, ACC=_tl_acc(x), BLOCK_C=fin_block,
    )
    return mean, invstd


def apply(x, scale, shift, residual, relu, channels_last):
    n, c, s = _geometry(x)
    y = _checks.new_output(x)
    block = _elementwise_block(x)
    _apply_kernel[(triton.cdiv(x.numel(), block),)](
        x, scale, shift, x if residual is None else residual, y, x.numel(), c, s,
        CL=channels_last, HAS_RES=residual is not None, RELU=relu, ACC=_tl_acc(x), BLOCK=block,
    )
    return y


def backward_reduce(dy, x, y, mean, relu, channels_last):
    n, c, s = _geometry(x)
    rows = n * s
    block_r, block_c, channel_blocks, splits, rows_per_split = _reduction_config(x, channels_last)
    psum_g = torch.empty((splits, c), dtype=mean.dtype, device=x.device)
    psum_gx = torch.empty((splits, c), dtype=mean.dtype, device=x.device)
    _backward_reduce_kernel[(channel_blocks, splits)](
        dy, x, x if y is None else y, mean, psum_g, psum_gx, c, s, rows, rows_per_split,
        CL=channels_last, RELU=relu, ACC=_tl_acc(x), BLOCK_R=block_r, BLOCK_C=block_c,
    )
    # Second stage of the two-stage reduction: [splits, C] partials, splits ~ a few per SM.
    return psum_g.sum(0), psum_gx.sum(0)


def backward_apply(dy, x, y, a, b, d, mean, relu, train, write_g, channels_last):
    n, c, s = _geometry(x)
    dx = _checks.new_output(x)
    g = _checks.new_output(dy) if write_g else None
    block = _elementwise_block(x)
    _backward_apply_kernel[(triton.cdiv(x.numel(), block),)](
        dy, x, x if y is None else y, a, b, d, mean, dx, dx if g is None else g, x.numel(), c, s,
        CL=channels_last, RELU=relu, TRAIN=train, WRITE_G=write_g, ACC=_tl_acc(x), BLOCK=block,
    )
    return dx, g
