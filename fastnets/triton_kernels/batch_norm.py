"""BatchNorm (+ residual add + activation) primitives in Triton; same contract as fastnets/reference/batch_norm.py.
The activation is the constexpr ACT (codes of fastnets/activations.py): relu's gradient mask comes from the
saved output y; the other activations' gradients recompute the pre-activation v = x * scale + shift
[+ residual] from what the backward reads anyway (x), plus the residual when there is one.

Layout: x is dense, (N, C, S) in memory (NCHW; S = H*W, 1 for a 2-D input) or (N, S, C) (channels_last).
Every kernel works on 2-D tiles whose inner axis is contiguous in memory, so no per-element integer
division is needed (int64 division per element would make these memory-bound kernels compute-bound):
  channels_last: rows r = n*S + s (outer) by channels c (inner), offset r*C + c;
  NCHW:          planes p = n*C + c (outer) by spatial s (inner), offset p*S + s.
The reductions split the work over channel blocks and over rows (images and spatial chunks), so that
small-spatial shapes with many channels (N x 2048 x 7 x 7) and few-channel, large-spatial ones both fill
the GPU. The statistics kernels keep a Welford state per element of the tile across their loop (nothing
crosses threads inside it), merge the tile's states in two passes at the end and the splits with Chan's
parallel-variance formula; never E[x^2] - E[x]^2. Offsets are int64.
"""
import torch
import triton
import triton.language as tl

from .. import _tensors
from ..activations import code
from .._tensors import acc_dtype, sm_count
from ._common import INTERPRET, div_rn, on_tensor_device, rsqrt_rn, tl_acc_dtype, vector
from .activations import act_fwd, act_grad, relu_grad


def _geometry(x):
    n, c = x.shape[0], x.shape[1]
    return n, c, x.numel() // (n * c)


# ----------------------------------------------------------------------------------------- helpers


@triton.jit
def _chan_merge(mean, m2, count, tile_mean, tile_m2, nb):
    """Merge a tile's (mean, M2) over nb values into the running (mean, M2) over count values."""
    total = count + nb
    delta = tile_mean - mean
    w = div_rn(nb, total)
    mean = mean + delta * w
    m2 = m2 + tile_m2 + delta * delta * (count * w)
    return mean, m2, total


@triton.jit
def _split_range(split, per_split, size):
    lo = split * per_split
    return lo, tl.minimum(lo + per_split, size)


# ----------------------------------------------------------------------------------------- statistics


@triton.jit
def _stats_cl_kernel(
    x_ptr, pmean_ptr, pm2_ptr, pcount_ptr, C, R, rows_per_split,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Welford per element of the [BLOCK_R, BLOCK_C] tile, across the loop: row slot j sees rows r_lo + j,
    # r_lo + j + BLOCK_R, ... Every slot still in range at step t has seen t - 1 rows before, so the update's
    # 1 / t is one scalar per step, and nothing crosses threads until the two-pass merge after the loop (a
    # tile's own sums and Chan merge per step held the loop at ~0.5 bytes per warp-instruction). Rows past r_hi
    # (the last step only) leave their state as it is: x := mean makes delta 0. Never E[x^2] - E[x]^2.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    split = tl.program_id(1).to(tl.int64)
    r_lo, r_hi = _split_range(split, rows_per_split, R)
    slot = tl.arange(0, BLOCK_R)
    mean = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    t = tl.zeros([], ACC)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows = r0 + slot
        mask = cmask[None, :] & (rows < r_hi)[:, None]
        x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(ACC)
        t += 1.0
        inv = div_rn(tl.full([], 1.0, ACC), t)
        x = tl.where(mask, x, mean)
        delta = x - mean
        mean += delta * inv
        m2 += delta * (x - mean)
    # The slots' states merged at once, in two passes over them: the mean from the counts, then M2 from the
    # slots' deviations from it (sum of M2_j + n_j (mean_j - mean)^2; a slot with no row adds nothing).
    n_rows = r_hi - r_lo  # int64; BLOCK_R is a power of two, so // and % are shifts and masks
    slot_n = (n_rows // BLOCK_R + (slot < n_rows % BLOCK_R).to(tl.int64)).to(ACC)[:, None]
    count = tl.zeros([BLOCK_C], ACC) + n_rows.to(ACC)
    mean_all = div_rn(tl.sum(slot_n * mean, axis=0), tl.maximum(count, 1.0))
    dev = mean - mean_all[None, :]
    m2 = tl.sum(m2 + slot_n * dev * dev, axis=0)
    mean = mean_all
    out = split * C + cols
    tl.store(pmean_ptr + out, mean, mask=cmask)
    tl.store(pm2_ptr + out, m2, mask=cmask)
    tl.store(pcount_ptr + out, count, mask=cmask)


@triton.jit
def _stats_nchw_kernel(
    x_ptr, pmean_ptr, pm2_ptr, pcount_ptr, N, C, S, n_per_split, s_per_split, splits_s,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Welford per element of the [BLOCK_C, BLOCK_S] tile across the loops, as _stats_cl_kernel: slot j of a
    # channel sees positions s_lo + j, s_lo + j + BLOCK_S, ... of every plane n of the split. With K chunks of
    # the split's L positions per plane, the last one holding `rem` of them, a slot j < rem ("full") has seen
    # a * K + b values before chunk b of plane n_lo + a, a slot j >= rem ("short") a * (K - 1) + b (and takes
    # no value from the last chunk): two scalar reciprocals per step, selected per slot.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    split = tl.program_id(1).to(tl.int64)
    n_lo, n_hi = _split_range(split // splits_s, n_per_split, N)
    s_lo, s_hi = _split_range(split % splits_s, s_per_split, S)
    slot = tl.arange(0, BLOCK_S)
    n_chunks = tl.cdiv(s_hi - s_lo, BLOCK_S)
    full = (slot < (s_hi - s_lo) - (n_chunks - 1) * BLOCK_S)[None, :]
    mean = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    m2 = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    one = tl.full([], 1.0, ACC)
    seen_full = tl.zeros([], ACC)  # values a full slot has taken so far
    seen_short = tl.zeros([], ACC)
    for n in range(n_lo, n_hi):
        base = (n * C + cols) * S
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + slot
            mask = cmask[:, None] & (s < s_hi)[None, :]
            x = tl.load(x_ptr + base[:, None] + s[None, :], mask=mask, other=0.0).to(ACC)
            seen_full += 1.0
            seen_short += tl.where(s0 + BLOCK_S < s_hi, 1.0, 0.0)  # the last chunk gives short slots nothing
            inv = tl.where(full, div_rn(one, seen_full), div_rn(one, tl.maximum(seen_short, 1.0)))
            x = tl.where(mask, x, mean)
            delta = x - mean
            mean += delta * inv
            m2 += delta * (x - mean)
    # Merge the slots in two passes (as _stats_cl_kernel): the mean from the counts, then M2.
    slot_n = tl.where(full, seen_full, seen_short)
    count = tl.zeros([BLOCK_C], ACC) + ((n_hi - n_lo) * (s_hi - s_lo)).to(ACC)
    mean_all = div_rn(tl.sum(slot_n * mean, axis=1), tl.maximum(count, 1.0))
    dev = mean - mean_all[:, None]
    m2 = tl.sum(m2 + slot_n * dev * dev, axis=1)
    out = split * C + cols
    tl.store(pmean_ptr + out, mean_all, mask=cmask)
    tl.store(pm2_ptr + out, m2, mask=cmask)
    tl.store(pcount_ptr + out, count, mask=cmask)


@triton.jit
def _stats_finalize_kernel(
    pmean_ptr, pm2_ptr, pcount_ptr, mean_ptr, invstd_ptr, C, num_splits, eps,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    count = tl.zeros([BLOCK_C], ACC)
    for i in range(0, num_splits):
        offs = i * C + cols
        nb = tl.load(pcount_ptr + offs, mask=cmask, other=1.0)
        mean, m2, count = _chan_merge(
            mean, m2, count,
            tl.load(pmean_ptr + offs, mask=cmask, other=0.0), tl.load(pm2_ptr + offs, mask=cmask, other=0.0), nb,
        )
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(invstd_ptr + cols, rsqrt_rn(div_rn(m2, count) + eps), mask=cmask)


# ----------------------------------------------------------------------------------------- backward reduction


@triton.jit
def _masked_grad(dy_ptr, y_ptr, res_ptr, x, sc, sh, offs, mask, ACT: tl.constexpr, HAS_RES: tl.constexpr, param,
                 ACC: tl.constexpr):
    """g = dy * act'(v). x is the loaded x tile (ACC), sc/sh the broadcast per-channel scale and shift."""
    # Masked lanes zeroed by tl.where, not by the load's `other`: Triton 3.1 aborts compiling the NCHW
    # backward reduction (fp32/fp64, no activation) with other=0.0 here (tests/triton_aot.py).
    g = tl.where(mask, tl.load(dy_ptr + offs, mask=mask).to(ACC), 0.0)
    if ACT == 1:  # the ReLU mask comes from the saved output, as torch's threshold_backward
        g = relu_grad(g, tl.load(y_ptr + offs, mask=mask, other=0.0))
    elif ACT != 0:  # recompute the pre-activation
        v = x * sc + sh
        if HAS_RES:
            v += tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = tl.where(mask, act_grad(g, v, ACT, param), 0.0)
    return g


@triton.jit
def _bwd_reduce_cl_kernel(
    dy_ptr, x_ptr, y_ptr, res_ptr, scale_ptr, shift_ptr, mean_ptr, psum_g_ptr, psum_gx_ptr, C, R, rows_per_split,
    act_param, ACT: tl.constexpr, HAS_RES: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    sc = tl.zeros([1, BLOCK_C], ACC)
    sh = tl.zeros([1, BLOCK_C], ACC)
    if ACT > 1:
        sc = tl.load(scale_ptr + cols, mask=cmask, other=0.0)[None, :]
        sh = tl.load(shift_ptr + cols, mask=cmask, other=0.0)[None, :]
    split = tl.program_id(1).to(tl.int64)
    r_lo, r_hi = _split_range(split, rows_per_split, R)
    sum_g = tl.zeros([BLOCK_C], ACC)
    sum_gx = tl.zeros([BLOCK_C], ACC)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < r_hi)[:, None] & cmask[None, :]
        offs = rows[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = _masked_grad(dy_ptr, y_ptr, res_ptr, x, sc, sh, offs, mask, ACT, HAS_RES, act_param, ACC)
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(g * (x - mean[None, :]), axis=0)
    out = split * C + cols
    tl.store(psum_g_ptr + out, sum_g, mask=cmask)
    tl.store(psum_gx_ptr + out, sum_gx, mask=cmask)


@triton.jit
def _bwd_reduce_nchw_kernel(
    dy_ptr, x_ptr, y_ptr, res_ptr, scale_ptr, shift_ptr, mean_ptr, psum_g_ptr, psum_gx_ptr, N, C, S, n_per_split,
    s_per_split, splits_s, act_param, ACT: tl.constexpr, HAS_RES: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    sc = tl.zeros([BLOCK_C, 1], ACC)
    sh = tl.zeros([BLOCK_C, 1], ACC)
    if ACT > 1:
        sc = tl.load(scale_ptr + cols, mask=cmask, other=0.0)[:, None]
        sh = tl.load(shift_ptr + cols, mask=cmask, other=0.0)[:, None]
    split = tl.program_id(1).to(tl.int64)
    n_lo, n_hi = _split_range(split // splits_s, n_per_split, N)
    s_lo, s_hi = _split_range(split % splits_s, s_per_split, S)
    sum_g = tl.zeros([BLOCK_C], ACC)
    sum_gx = tl.zeros([BLOCK_C], ACC)
    for n in range(n_lo, n_hi):
        base = (n * C + cols) * S
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < s_hi)[None, :]
            offs = base[:, None] + s[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            g = _masked_grad(dy_ptr, y_ptr, res_ptr, x, sc, sh, offs, mask, ACT, HAS_RES, act_param, ACC)
            sum_g += tl.sum(g, axis=1)
            sum_gx += tl.sum(g * (x - mean[:, None]), axis=1)
    out = split * C + cols
    tl.store(psum_g_ptr + out, sum_g, mask=cmask)
    tl.store(psum_gx_ptr + out, sum_gx, mask=cmask)


# ----------------------------------------------------------------------------------------- element-wise passes


@triton.jit
def _tile(OUTER, INNER, C, CL: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """Offsets and mask of this program's [BLOCK_O, BLOCK_I] tile, and the channel of each row or column.
    The grid is 1-D (x holds up to 2**31 - 1 programs; y and z only 65,535, which the inner blocks of an
    NCHW plane of more than 64 Mi pixels would pass): program p is tile (p // inner blocks, p % inner blocks)."""
    inner_blocks = tl.cdiv(INNER, BLOCK_I)
    pid = tl.program_id(0)
    pid_o = pid // inner_blocks
    o = pid_o.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = (pid - pid_o * inner_blocks) * BLOCK_I + tl.arange(0, BLOCK_I)
    omask = o < OUTER
    imask = i < INNER
    mask = omask[:, None] & imask[None, :]
    offs = o[:, None] * INNER + i[None, :]
    if CL:
        c = i
        cmask = imask
    else:
        c = o % C  # one division per row of the tile, not per element
        cmask = omask
    return offs, mask, c, cmask


@triton.jit
def _per_channel(ptr, c, cmask, CL: tl.constexpr):
    v = tl.load(ptr + c, mask=cmask, other=0.0)
    return v[None, :] if CL else v[:, None]


@triton.jit
def _apply_kernel(
    x_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, OUTER, INNER, C, act_param,
    CL: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    offs, mask, c, cmask = _tile(OUTER, INNER, C, CL, BLOCK_O, BLOCK_I)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    v = x * _per_channel(scale_ptr, c, cmask, CL) + _per_channel(shift_ptr, c, cmask, CL)
    if HAS_RES:
        v += tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
    v = act_fwd(v, ACT, act_param)
    tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_apply_kernel(
    dy_ptr, x_ptr, y_ptr, res_ptr, scale_ptr, shift_ptr, a_ptr, b_ptr, d_ptr, mean_ptr, dx_ptr, g_ptr,
    OUTER, INNER, C, act_param,
    CL: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, TRAIN: tl.constexpr, WRITE_G: tl.constexpr,
    ACC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    offs, mask, c, cmask = _tile(OUTER, INNER, C, CL, BLOCK_O, BLOCK_I)
    x = tl.zeros([BLOCK_O, BLOCK_I], ACC)
    sc = tl.zeros([BLOCK_O, BLOCK_I], ACC)
    sh = tl.zeros([BLOCK_O, BLOCK_I], ACC)
    if TRAIN or ACT > 1:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    if ACT > 1:
        sc = _per_channel(scale_ptr, c, cmask, CL) + sc
        sh = _per_channel(shift_ptr, c, cmask, CL) + sh
    g = _masked_grad(dy_ptr, y_ptr, res_ptr, x, sc, sh, offs, mask, ACT, HAS_RES, act_param, ACC)
    if WRITE_G:
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    dx = g * _per_channel(a_ptr, c, cmask, CL)
    if TRAIN:
        dx += _per_channel(b_ptr, c, cmask, CL) * (x - _per_channel(mean_ptr, c, cmask, CL))
        dx += _per_channel(d_ptr, c, cmask, CL)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------- launch configuration


def _target_programs(device):
    if device.type == "cuda":
        return 4 * sm_count(device)
    # the interpreter runs programs one after another: few, large ones; two, so that the tests run the
    # cross-program merge
    return 2


def _tile_budget():
    return 16384 if INTERPRET else 2048  # elements per tile


def _reduction_plan(x, channels_last):
    """Tile shape and work split of the per-channel reductions; returns (kernel args, grid, constexprs)."""
    n, c, s = _geometry(x)
    target = _target_programs(x.device)
    if channels_last:
        rows = n * s
        block_c = min(128, triton.next_power_of_2(c))
        block_r = max(1, min(_tile_budget() // block_c, triton.next_power_of_2(rows)))
        channel_blocks = triton.cdiv(c, block_c)
        splits = max(1, min(triton.cdiv(rows, block_r), triton.cdiv(target, channel_blocks)))
        rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_r) * block_r
        splits = triton.cdiv(rows, rows_per_split)
        return (rows, rows_per_split), (channel_blocks, splits), dict(BLOCK_R=block_r, BLOCK_C=block_c)
    block_s = min(1024, triton.next_power_of_2(s))
    block_c = max(1, min(triton.next_power_of_2(c), _tile_budget() // block_s))
    channel_blocks = triton.cdiv(c, block_c)
    wanted = max(1, triton.cdiv(target, channel_blocks))
    splits_n = min(n, wanted)
    n_per_split = triton.cdiv(n, splits_n)
    splits_n = triton.cdiv(n, n_per_split)
    splits_s = max(1, min(triton.cdiv(s, block_s), triton.cdiv(wanted, splits_n)))
    s_per_split = triton.cdiv(triton.cdiv(s, splits_s), block_s) * block_s
    splits_s = triton.cdiv(s, s_per_split)
    args = (n, c, s, n_per_split, s_per_split, splits_s)
    return args, (channel_blocks, splits_n * splits_s), dict(BLOCK_C=block_c, BLOCK_S=block_s)


def _elementwise_plan(x, channels_last):
    n, c, s = _geometry(x)
    outer, inner = (n * s, c) if channels_last else (n * c, s)
    # channels_last 16-bit: 64 channels a tile, whose fp32 per-channel vectors Triton loads 16 bytes a thread
    # straight into the tile's layout (at 256 it loads them 8 bytes a thread and converts through shared memory)
    widest = 64 if x.element_size() == 2 else 256
    block_i = min(widest if channels_last else 1024, triton.next_power_of_2(inner))
    block_o = max(1, min(_tile_budget() // block_i, triton.next_power_of_2(outer)))
    grid = (triton.cdiv(outer, block_o) * triton.cdiv(inner, block_i),)  # 1-D: see _tile
    return (outer, inner, c), grid, dict(BLOCK_O=block_o, BLOCK_I=block_i)


# ----------------------------------------------------------------------------------------- primitives


@on_tensor_device
def stats(x, channels_last, eps):
    c = x.shape[1]
    acc = acc_dtype(x)
    args, grid, blocks = _reduction_plan(x, channels_last)
    partial = [torch.empty((grid[1], c), dtype=acc, device=x.device) for _ in range(3)]
    if channels_last:
        _stats_cl_kernel[grid](x, *partial, c, *args, ACC=tl_acc_dtype(x), **blocks)
    else:
        _stats_nchw_kernel[grid](x, *partial, *args, ACC=tl_acc_dtype(x), **blocks)
    mean = _tensors.new_output(x, dtype=acc, shape=(c,))
    invstd = _tensors.new_output(x, dtype=acc, shape=(c,))
    fin_block = min(1024, triton.next_power_of_2(c))
    _stats_finalize_kernel[(triton.cdiv(c, fin_block),)](
        *partial, mean, invstd, c, grid[1], eps, ACC=tl_acc_dtype(x), BLOCK_C=fin_block,
    )
    return mean, invstd


@on_tensor_device
def apply(x, scale, shift, residual, act, channels_last, act_param=0.0):
    scale, shift = vector(scale), vector(shift)
    y = _tensors.new_output(x)
    args, grid, blocks = _elementwise_plan(x, channels_last)
    _apply_kernel[grid](
        x, scale, shift, x if residual is None else residual, y, *args, float(act_param),
        CL=channels_last, HAS_RES=residual is not None, ACT=code(act), ACC=tl_acc_dtype(x), **blocks,
    )
    return y


def _act_args(x, y, act, scale, shift, residual, mean):
    """(y, residual, scale, shift, HAS_RES) as the kernels take them; unused pointers get x / mean."""
    act = code(act)
    if act > 1 and (scale is None or shift is None):
        raise ValueError("scale and shift are required to recompute the pre-activation of this activation")
    use_res = act > 1 and residual is not None
    return (
        x if y is None else y,
        residual if use_res else x,
        mean if scale is None else scale,
        mean if shift is None else shift,
        use_res,
    )


@on_tensor_device
def backward_reduce(dy, x, y, mean, act, channels_last, act_param=0.0, scale=None, shift=None, residual=None):
    mean, scale, shift = vector(mean), vector(scale), vector(shift)
    c = x.shape[1]
    args, grid, blocks = _reduction_plan(x, channels_last)
    psum_g = torch.empty((grid[1], c), dtype=mean.dtype, device=x.device)
    psum_gx = torch.empty((grid[1], c), dtype=mean.dtype, device=x.device)
    y, res, sc, sh, has_res = _act_args(x, y, act, scale, shift, residual, mean)
    kw = dict(ACT=code(act), HAS_RES=has_res, ACC=tl_acc_dtype(x), **blocks)
    if channels_last:
        _bwd_reduce_cl_kernel[grid](dy, x, y, res, sc, sh, mean, psum_g, psum_gx, c, *args, float(act_param), **kw)
    else:
        _bwd_reduce_nchw_kernel[grid](dy, x, y, res, sc, sh, mean, psum_g, psum_gx, *args, float(act_param), **kw)
    # Second stage of the two-stage reduction over [splits, C] partials (a few splits per SM).
    return psum_g.sum(0), psum_gx.sum(0)


@on_tensor_device
def backward_apply(dy, x, y, a, b, d, mean, act, train, write_g, channels_last, act_param=0.0, scale=None,
                   shift=None, residual=None):
    a, b, d, mean, scale, shift = (vector(v) for v in (a, b, d, mean, scale, shift))
    dx = _tensors.new_output(x)
    g = _tensors.new_output(dy) if write_g else None
    args, grid, blocks = _elementwise_plan(x, channels_last)
    y, res, sc, sh, has_res = _act_args(x, y, act, scale, shift, residual, mean)
    _bwd_apply_kernel[grid](
        dy, x, y, res, sc, sh, a, b, d, mean, dx, dx if g is None else g, *args, float(act_param),
        CL=channels_last, ACT=code(act), HAS_RES=has_res, TRAIN=train, WRITE_G=write_g, ACC=tl_acc_dtype(x), **blocks,
    )
    return dx, g
