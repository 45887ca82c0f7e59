"""2-D convolution (groups=1) in Triton by implicit GEMM; same contract as fastnets/reference/conv.py.

Forward: rows m = (n, oh, ow) output pixels, columns = output channels, reduction over (kh, kw, c) with the
input tile gathered on the fly from x (any dense layout: strides are arguments; channels_last makes the
c-blocks contiguous) and the weight repacked once per call to (KH, KW, Cin, Cout). A 1x1 convolution is the
same kernel with KH = KW = 1, i.e. a plain GEMM over the channels_last activation matrix (stride 2 reads
every other pixel). The epilogue applies bias, the folded-BN scale/shift, the residual and ReLU, and in
the training variant writes per-tile, per-channel (mean, M2) partials of conv + bias (two-pass inside the
tile, in registers), merged across tiles with Chan's formula: the BatchNorm statistics pass disappears.

Grad input: 1x1 with no padding is the forward GEMM dy @ W (written through a strided view for stride > 1);
KxK is an implicit GEMM over input pixels, reducing over (kh, kw, cout) with the taps that hit an output
pixel (stride divisibility masked). Grad weight: GEMM dy^T @ im2col(x) per (kh, kw), split over the
N*OH*OW reduction into fp32 partials summed afterwards (deterministic), so layers with few channels and
many pixels still fill the GPU.

Tensor cores: fp16/bf16 operands, fp32 accumulation; fp32 operands use TF32 when cuDNN's convolutions
may (torch.backends.cudnn.conv.fp32_precision, docs/tf32.md; else IEEE fp32); float64 accumulates in
float64 without tl.dot.
Offsets are int64. On a GPU tile shapes are autotuned from a short list, once per key (M's power-of-two
bucket, layouts, channels, taps, strides, flags: _tune_key, docs/conv_autotune.md); under the interpreter
(TRITON_INTERPRET=1) one small fixed configuration is used and bf16 tiles are upcast to fp32 before
tl.dot (the interpreter's bf16 dot is wrong), never on a GPU.
"""
import os

import torch
import triton
import triton.language as tl

from .. import _tensors
from ..activations import code
from .._tensors import acc_dtype, sm_count
from ._common import INTERPRET, div_rn, max_shared_bytes, on_tensor_device, vector
from .activations import act_fwd, act_grad, relu_grad

_INTERP_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}
# float64 (gradcheck, not a speed path) reduces with a broadcast product instead of tl.dot: small tiles.
_FP64_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 8, "GROUP_M": 4}


@triton.jit
def _mma(acc, a, b, UPCAST: tl.constexpr, FP64: tl.constexpr, PREC: tl.constexpr):
    if FP64:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _tile_ids(M, NCOLS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(NCOLS, BLOCK_N)
    in_group = GROUP_M * num_n
    group = pid // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _bn_act_tile(a, ok, c, mk, scale_ptr, shift_ptr, ACT: tl.constexpr, param):
    """The prologue of conv_prologue (BatchNorm-apply + activation of the previous layer, fused into this
    convolution's input load): act(a * scale[c] + shift[c]) in the accumulation dtype (scale's), rounded to
    a's dtype as the unfused chain stores y, and exactly zero where `ok` is false: padding and rows/channels
    out of range stay zero after the transform."""
    sc = tl.load(scale_ptr + c, mask=mk, other=0.0)
    sh = tl.load(shift_ptr + c, mask=mk, other=0.0)
    v = act_fwd(a.to(sc.dtype) * sc + sh, ACT, param)
    return tl.where(ok, v, 0.0).to(a.dtype)


# ------------------------------------------------------------------------------------------------ forward


@triton.jit(do_not_specialize=["TUNE_KEY"])  # the autotune key only (_tune_key): no recompiles
def _conv_fwd_kernel(
    x_ptr, w_ptr, y_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, pmean_ptr, pm2_ptr, pre_ptr,
    pro_scale_ptr, pro_shift_ptr,
    M, C, H, W, Cout, OH, OW, act_param, pro_param,
    sxn, sxc, sxh, sxw,
    swk, swc, swh, sww,
    syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, TUNE_KEY,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, SAVE_PRE: tl.constexpr, STATS: tl.constexpr, FLAT: tl.constexpr,
    PRO: tl.constexpr, PRO_ACT: tl.constexpr,
    UPCAST: tl.constexpr, FP64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # PRO: the input tile is act(x * pro_scale[c] + pro_shift[c]) (conv_prologue), applied as it is loaded.
    pid_m, pid_n = _tile_ids(M, Cout, BLOCK_M, BLOCK_N, GROUP_M)
    # int64 rows: M = N*OH*OW can pass 2**31 (explicitly, not left to M's int64 specialization reaching pid_m
    # through _tile_ids); the per-row indices after the divisions fit int32 again
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < Cout
    ow = (offs_m % OW).to(tl.int32)
    t = offs_m // OW
    oh = (t % OH).to(tl.int32)
    n = (t // OH).to(tl.int32)
    x_base = n.to(tl.int64) * sxn
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    offs_k0 = tl.arange(0, BLOCK_K)
    wn = offs_n.to(tl.int64) * swk
    if FP64:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FLAT:
        # Few input channels (the C=3 stem): one flattened reduction over (kh, kw, c), gathering each
        # element's tap, instead of a padded c-block per tap.
        KTOT = C * KH * KW
        for k0 in range(0, KTOT, BLOCK_K):
            kk = k0 + offs_k0
            mk = kk < KTOT
            c = kk % C
            rs = kk // C
            r = rs // KW
            s = rs % KW
            ih = ih0[:, None] + (r * dil_h)[None, :]
            iw = iw0[:, None] + (s * dil_w)[None, :]
            ok = mask_m[:, None] & mk[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(
                x_ptr + x_base[:, None] + c[None, :].to(tl.int64) * sxc + ih.to(tl.int64) * sxh
                + iw.to(tl.int64) * sxw,
                mask=ok, other=0.0,
            )
            if PRO:
                a = _bn_act_tile(a, ok, c[None, :], mk[None, :], pro_scale_ptr, pro_shift_ptr, PRO_ACT, pro_param)
            w_k = r.to(tl.int64) * swh + s.to(tl.int64) * sww + c.to(tl.int64) * swc
            b = tl.load(w_ptr + w_k[:, None] + wn[None, :], mask=mk[:, None] & mask_n[None, :], other=0.0)
            acc = _mma(acc, a, b, UPCAST, FP64, PREC)
    else:
        # One flat loop over (tap, channel block) so that Triton software-pipelines the loads across taps
        # (a nested per-tap loop would leave a one-iteration inner loop for C <= BLOCK_K).
        n_cb = tl.cdiv(C, BLOCK_K)
        ok1 = mask_m & (ih0 >= 0) & (ih0 < H) & (iw0 >= 0) & (iw0 < W)  # the 1x1 case: one tap
        a_row1 = x_base + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw
        for it in range(0, KH * KW * n_cb):
            if KH * KW == 1:  # 1x1: a plain GEMM over the channels of the (strided) pixel rows
                r = 0
                s = 0
                c0 = it * BLOCK_K
                ok = ok1
                a_row = a_row1
            else:
                tap = it // n_cb
                c0 = (it - tap * n_cb) * BLOCK_K
                r = tap // KW
                s = tap - r * KW
                ih = ih0 + r * dil_h
                iw = iw0 + s * dil_w
                ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a_row = x_base + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            offs_k = c0 + offs_k0
            mk = offs_k < C
            a = tl.load(
                x_ptr + a_row[:, None] + offs_k[None, :].to(tl.int64) * sxc,
                mask=ok[:, None] & mk[None, :], other=0.0,
            )
            if PRO:
                a = _bn_act_tile(a, ok[:, None] & mk[None, :], offs_k[None, :], mk[None, :], pro_scale_ptr,
                                 pro_shift_ptr, PRO_ACT, pro_param)
            w_tap = r * swh + s * sww
            b = tl.load(
                w_ptr + w_tap + offs_k[:, None].to(tl.int64) * swc + wn[None, :],
                mask=mk[:, None] & mask_n[None, :], other=0.0,
            )
            acc = _mma(acc, a, b, UPCAST, FP64, PREC)
    v = acc
    if HAS_BIAS:
        v += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(v.dtype)[None, :]
    if STATS:
        # This tile's per-channel mean and M2 (sum of squared deviations from the tile mean), two-pass in
        # registers; merged across tiles by the caller with Chan's formula.
        cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(v.dtype)
        vm = tl.where(mask_m[:, None], v, 0.0)
        t_mean = div_rn(tl.sum(vm, axis=0), cnt)  # correctly rounded (_common.div_rn), as the merge
        dev = tl.where(mask_m[:, None], v - t_mean[None, :], 0.0)
        t_m2 = tl.sum(dev * dev, axis=0)
        p_off = pid_m.to(tl.int64) * Cout + offs_n
        tl.store(pmean_ptr + p_off, t_mean, mask=mask_n)
        tl.store(pm2_ptr + p_off, t_m2, mask=mask_n)
    if HAS_SCALE:
        v = v * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(v.dtype)[None, :]
    if HAS_SHIFT:
        v += tl.load(shift_ptr + offs_n, mask=mask_n, other=0.0).to(v.dtype)[None, :]
    y_off = (n.to(tl.int64) * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw)[:, None] + (
        offs_n.to(tl.int64) * syc
    )[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        v += tl.load(res_ptr + y_off, mask=mask, other=0.0).to(v.dtype)
    if SAVE_PRE:  # the pre-activation, for the backward of activations other than identity/relu
        tl.store(pre_ptr + y_off, v.to(pre_ptr.dtype.element_ty), mask=mask)
    v = act_fwd(v, ACT, act_param)
    tl.store(y_ptr + y_off, v.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------- grad input


@triton.jit(do_not_specialize=["TUNE_KEY"])  # the autotune key only (_tune_key): no recompiles
def _conv_dgrad_kernel(
    g_ptr, w_ptr, dx_ptr, z_ptr, epi_scale_ptr, epi_shift_ptr, pdscale_ptr, pdshift_ptr,
    M, C, H, W, Cout, OH, OW, epi_param,
    sgn, sgc, sgh, sgw,
    swk, swc, swh, sww,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, TUNE_KEY,
    KH: tl.constexpr, KW: tl.constexpr, EPI: tl.constexpr, EPI_ACT: tl.constexpr,
    UPCAST: tl.constexpr, FP64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # rows m = (n, ih, iw) input pixels, columns = input channels, reduction over (kh, kw, cout).
    # EPI (conv_prologue's backward): dx is the gradient of the prologue's pre-activation, multiplied by
    # act'(z * scale + shift) read from z (x's strides) and written as dz = dpre * scale, with this tile's
    # per-channel partial sums of dpre * z and dpre (grad scale, grad shift).
    pid_m, pid_n = _tile_ids(M, C, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M = N*H*W can reach 2**31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < C
    iw = (offs_m % W).to(tl.int32)
    t = offs_m // W
    ih = (t % H).to(tl.int32)
    n = (t // H).to(tl.int32)
    g_base = n.to(tl.int64) * sgn
    offs_k0 = tl.arange(0, BLOCK_K)
    wn = offs_n.to(tl.int64) * swc
    if FP64:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_cb = tl.cdiv(Cout, BLOCK_K)
    for it in range(0, KH * KW * n_cb):  # one flat loop over (tap, cout block): pipelined across taps
        tap = it // n_cb
        k0 = (it - tap * n_cb) * BLOCK_K
        r = tap // KW
        s = tap - r * KW
        th = ih + pad_h - r * dil_h
        thc = tl.maximum(th, 0)
        oh = thc // stride_h
        tw = iw + pad_w - s * dil_w
        twc = tl.maximum(tw, 0)
        ow = twc // stride_w
        ok = mask_m & (th >= 0) & (thc - oh * stride_h == 0) & (oh < OH)
        ok = ok & (tw >= 0) & (twc - ow * stride_w == 0) & (ow < OW)
        a_row = g_base + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
        offs_k = k0 + offs_k0
        mk = offs_k < Cout
        a = tl.load(
            g_ptr + a_row[:, None] + offs_k[None, :].to(tl.int64) * sgc,
            mask=ok[:, None] & mk[None, :], other=0.0,
        )
        w_tap = r * swh + s * sww
        b = tl.load(
            w_ptr + w_tap + offs_k[:, None].to(tl.int64) * swk + wn[None, :],
            mask=mk[:, None] & mask_n[None, :], other=0.0,
        )
        acc = _mma(acc, a, b, UPCAST, FP64, PREC)
    x_off = (n.to(tl.int64) * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None] + (
        offs_n.to(tl.int64) * sxc
    )[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if EPI:
        zt = tl.load(z_ptr + x_off, mask=mask, other=0.0)
        sc = tl.load(epi_scale_ptr + offs_n, mask=mask_n, other=0.0)
        sh = tl.load(epi_shift_ptr + offs_n, mask=mask_n, other=0.0)
        zf = zt.to(sc.dtype)
        v = zf * sc[None, :] + sh[None, :]
        if EPI_ACT == 1:  # relu: threshold_backward on y as the unfused chain stores it (z's dtype)
            acc = relu_grad(acc, tl.where(v < 0, 0.0, v).to(zt.dtype))
        elif EPI_ACT != 0:
            acc = act_grad(acc, v, EPI_ACT, epi_param)
        acc = tl.where(mask, acc, 0.0)
        p_off = pid_m.to(tl.int64) * C + offs_n
        tl.store(pdscale_ptr + p_off, tl.sum(acc * zf, axis=0), mask=mask_n)
        tl.store(pdshift_ptr + p_off, tl.sum(acc, axis=0), mask=mask_n)
        acc = acc * sc[None, :]
    tl.store(dx_ptr + x_off, acc.to(dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------ grad weight


@triton.jit(do_not_specialize=["TUNE_KEY"])  # the autotune key only (_tune_key): no recompiles
def _conv_wgrad_kernel(
    g_ptr, x_ptr, part_ptr, pro_scale_ptr, pro_shift_ptr,
    M, C, H, W, Cout, OH, OW, rows_per_split, pro_param,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, TUNE_KEY,
    KH: tl.constexpr, KW: tl.constexpr, PRO: tl.constexpr, PRO_ACT: tl.constexpr,
    UPCAST: tl.constexpr, FP64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # PRO: x_tap is recomputed as act(x * pro_scale[c] + pro_shift[c]) as it is loaded (conv_prologue).
    # part[split, kh*KW + kw, cout, c] = sum over this split's output pixels of g[., cout] * x_tap[., c]
    pid_m, pid_n = _tile_ids(Cout, C, BLOCK_M, BLOCK_N, GROUP_M)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    r = tap // KW
    s = tap % KW
    offs_co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_co = offs_co < Cout
    mask_c = offs_c < C
    gco = offs_co.to(tl.int64) * sgc
    xc = offs_c.to(tl.int64) * sxc
    # row indices stay int32 (grad_weight launches at most WGRAD_MAX_ROWS rows): no int64 division in the loop
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    if FP64:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_K):
        offs_k = m0 + tl.arange(0, BLOCK_K)
        mk = offs_k < m_end
        ow = offs_k % OW
        t = offs_k // OW
        oh = t % OH
        n = t // OH
        ih = oh * stride_h - pad_h + r * dil_h
        iw = ow * stride_w - pad_w + s * dil_w
        ok = mk & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        n64 = n.to(tl.int64)
        g_row = n64 * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
        x_row = n64 * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        gt = tl.load(g_ptr + g_row[:, None] + gco[None, :], mask=mk[:, None] & mask_co[None, :], other=0.0)
        xt = tl.load(x_ptr + x_row[:, None] + xc[None, :], mask=ok[:, None] & mask_c[None, :], other=0.0)
        if PRO:
            xt = _bn_act_tile(xt, ok[:, None] & mask_c[None, :], offs_c[None, :], mask_c[None, :], pro_scale_ptr,
                              pro_shift_ptr, PRO_ACT, pro_param)
        acc = _mma(acc, tl.trans(gt), xt, UPCAST, FP64, PREC)
    base = (split.to(tl.int64) * (KH * KW) + tap) * Cout * C
    p_off = base + offs_co.to(tl.int64)[:, None] * C + offs_c[None, :]
    tl.store(part_ptr + p_off, acc, mask=mask_co[:, None] & mask_c[None, :])


# ------------------------------------------------------------------------------------ statistics merge


@triton.jit
def _stats_merge_kernel(
    pmean_ptr, pm2_ptr, mean_ptr, var_ptr, tiles, Cout, M, BLOCK_ROWS, last_count,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Chan's parallel merge of per-tile (count, mean, M2) into per-channel mean and biased variance. Every
    tile but the last holds BLOCK_ROWS rows. Two passes over the partials: the mean, then
    M2 = sum M2_i + sum n_i (mean_i - mean)^2 (exact, no E[x^2] - E[x]^2)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = cols < Cout
    dtype = mean_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_C], dtype)
    for t0 in range(0, tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mt = t < tiles
        cnt = tl.where(t == tiles - 1, last_count, BLOCK_ROWS).to(dtype)
        cnt = tl.where(mt, cnt, 0.0)
        off = t.to(tl.int64)[:, None] * Cout + cols[None, :]
        pm = tl.load(pmean_ptr + off, mask=mt[:, None] & mc[None, :], other=0.0)
        total += tl.sum(pm * cnt[:, None], axis=0)
    mean = div_rn(total, M)
    m2 = tl.zeros([BLOCK_C], dtype)
    for t0 in range(0, tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mt = t < tiles
        cnt = tl.where(t == tiles - 1, last_count, BLOCK_ROWS).to(dtype)
        cnt = tl.where(mt, cnt, 0.0)
        off = t.to(tl.int64)[:, None] * Cout + cols[None, :]
        msk = mt[:, None] & mc[None, :]
        pm = tl.load(pmean_ptr + off, mask=msk, other=0.0)
        p2 = tl.load(pm2_ptr + off, mask=msk, other=0.0)
        d = pm - mean[None, :]
        m2 += tl.sum(p2 + d * d * cnt[:, None], axis=0)
    tl.store(mean_ptr + cols, mean, mask=mc)
    tl.store(var_ptr + cols, div_rn(m2, M), mask=mc)


# ---------------------------------------------------------------------------------------------- configs


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


# Curated for Hopper/Ampere with bf16/fp16 (the pruning drops the fp32 configs that do not fit the GPU's
# shared memory before anything compiles). Small-BLOCK_K entries serve the C=3 stem; pruned when the
# reduction is wide.
_GEMM_CONFIGS = [
    _cfg(128, 256, 64, 8, 3),
    _cfg(256, 128, 64, 8, 3),
    _cfg(128, 128, 64, 8, 4),
    _cfg(128, 128, 32, 4, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(128, 64, 16, 4, 4),
]


if os.environ.get("FASTNETS_CONV_TUNE", "") == "quick":  # benchmarks' --quick: no autotuning, one config
    _GEMM_CONFIGS = [_cfg(128, 64, 64, 4, 4)]


def shared_bytes(cfg, itemsize, prologue=False):
    """Shared memory of a GEMM config: num_stages pipeline buffers, each an A tile (BLOCK_M x BLOCK_K) and a B
    tile (BLOCK_K x BLOCK_N) of `itemsize`-byte operands (exactly what Triton 3.8 compiles these kernels to on
    sm_90), plus, with the forward's prologue (the A tile transformed in registers before tl.dot), a
    layout-conversion scratch of up to (16 * num_warps + 12) x BLOCK_K operands, counted as 16 * num_warps +
    16. tests/triton_aot.py checks that this bounds every compiled configuration."""
    k = cfg.kwargs
    pipeline = cfg.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * itemsize
    return pipeline + ((16 * cfg.num_warps + 16) * k["BLOCK_K"] * itemsize if prologue else 0)


def _fitting(configs, operand, prologue=False):
    """The configs that fit the shared memory of the operand's device (sm_90's off a GPU): pruned before
    compiling, instead of compiling them and catching OutOfResources (fp32 128x256x64 with 3 stages needs
    288 KiB)."""
    budget = max_shared_bytes(operand.device)
    return [c for c in configs if shared_bytes(c, operand.element_size(), prologue) <= budget]


def _prune_channels(kname, nname, operand):
    def prune(configs, named_args, **kwargs):
        k = named_args[kname]
        ncols = named_args[nname]
        configs = _fitting(configs, named_args[operand], bool(kwargs.get("PRO", named_args.get("PRO", False))))
        keep = []
        for cfg in configs:
            bk, bn = cfg.kwargs["BLOCK_K"], cfg.kwargs["BLOCK_N"]
            if bk > max(16, triton.next_power_of_2(k)):
                continue  # a reduction block wider than the channels only loads zeros
            if k >= 64 and bk < 32:
                continue
            if bn > max(64, 2 * triton.next_power_of_2(ncols)):
                continue
            keep.append(cfg)
        return keep or configs[-1:]

    return prune


_WGRAD_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 128, 32, 4, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(64, 64, 32, 4, 4),
]


if os.environ.get("FASTNETS_CONV_TUNE", "") == "quick":
    _WGRAD_CONFIGS = [_cfg(64, 64, 64, 4, 4)]


def _prune_wgrad(configs, named_args, **kwargs):
    configs = _fitting(configs, named_args["g_ptr"])
    keep = [
        c for c in configs
        if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(named_args["Cout"]))
        and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(named_args["C"]))
    ]
    return keep or configs[-1:]


# Autotune keys: TUNE_KEY (M's power-of-two bucket and the operands' layouts, _tune_key) instead of M, H, W
# (a ragged last batch or a new eval batch size re-benchmarked, with host syncs, and could pick another
# summation order), the channels, taps and strides, every epilogue/prologue flag and the precision; Triton
# adds the pointer dtypes. tests/test_conv_autotune.py counts the benchmark rounds.
_FWD_KEY = ["TUNE_KEY", "C", "Cout", "KH", "KW", "stride_h", "stride_w", "HAS_BIAS", "HAS_SCALE", "HAS_SHIFT",
            "HAS_RES", "ACT", "SAVE_PRE", "STATS", "PRO", "PRO_ACT", "PREC"]
_DGRAD_KEY = ["TUNE_KEY", "C", "Cout", "KH", "KW", "stride_h", "stride_w", "EPI", "EPI_ACT", "PREC"]
_WGRAD_KEY = ["TUNE_KEY", "C", "Cout", "KH", "KW", "stride_h", "stride_w", "PRO", "PRO_ACT", "PREC"]
_fwd_tuned = triton.autotune(
    _GEMM_CONFIGS, key=_FWD_KEY, prune_configs_by={"early_config_prune": _prune_channels("C", "Cout", "x_ptr")},
)(_conv_fwd_kernel)
_dgrad_tuned = triton.autotune(
    _GEMM_CONFIGS, key=_DGRAD_KEY, prune_configs_by={"early_config_prune": _prune_channels("Cout", "C", "g_ptr")},
)(_conv_dgrad_kernel)
_wgrad_tuned = triton.autotune(
    _WGRAD_CONFIGS, key=_WGRAD_KEY, prune_configs_by={"early_config_prune": _prune_wgrad},
)(_conv_wgrad_kernel)


def _tune_key(m, *channels_last):
    """The shape part of the autotune key: log2 of M's power-of-two bucket (the rows of the GEMM, N * pixels)
    times 16, plus bit i set when operand i is channels-last (its channel stride is 1)."""
    bucket = max(int(m) - 1, 1).bit_length()  # next_power_of_2(m) == 2 ** bucket
    return bucket * 16 + sum(int(bool(cl)) << i for i, cl in enumerate(channels_last))

_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _GEMM_CONFIGS)


_FIXED_GPU_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}


def _launch(tuned, raw, grid, *args, **kwargs):
    """Autotuned on a GPU; one fixed small configuration under the interpreter, for float64, with
    FASTNETS_CONV_TUNE=fixed (the test suite on a GPU: many tiny shapes, no autotuning cost) and in
    deterministic mode (_tensors.deterministic_mode: one tile shape, so one summation order, whatever was
    measured or seen before)."""
    if INTERPRET or kwargs["FP64"]:
        cfg = _FP64_CONFIG if kwargs["FP64"] else _INTERP_CONFIG
        raw[grid(cfg)](*args, **kwargs, **cfg)
        return cfg
    if os.environ.get("FASTNETS_CONV_TUNE", "") == "fixed" or _tensors.deterministic_mode():
        cfg = _FIXED_GPU_CONFIG
        raw[grid(cfg)](*args, **kwargs, **cfg, num_warps=4, num_stages=3)
        return cfg
    tuned[grid](*args, **kwargs)
    return tuned.best_config.kwargs


def _math_flags(x):
    """fp32 operands go to tl.dot as TF32 exactly when cuDNN's convolutions may use TF32
    (_tensors.conv_allows_tf32, docs/tf32.md), on a GPU and under the interpreter alike (whose tl.dot is a
    float32 numpy matmul whatever input_precision says); fp16/bf16 ignore PREC."""
    fp64 = x.dtype == torch.float64
    prec = "tf32" if x.dtype != torch.float32 or _tensors.conv_allows_tf32() else "ieee"
    return {"UPCAST": INTERPRET and x.dtype == torch.bfloat16, "FP64": fp64, "PREC": prec}


def _gemm_grid(rows, cols):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)


def _packed_weight(w, dtype):
    """(KH, KW, Cin, Cout) contiguous, so the reduction tile [c, cout] is contiguous along cout."""
    return w.to(dtype).permute(2, 3, 1, 0).contiguous()


def _run_fwd(x, x_strides, wp, y, y_strides, dims, conv, bias, scale, shift, residual, relu, stats, act_param=0.0,
             pre=None, prologue=None):
    """Forward launch on explicit strides. dims = (N, C, H, W, Cout, OH, OW, KH, KW); wp is (KH, KW, C, Cout)
    contiguous; conv = (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w). `relu` is the activation code (a
    legacy bool means relu/identity); `pre`, when given, receives the pre-activation (y's strides);
    `prologue` = (scale, shift, act code, act_param) transforms the input tile: act(x * scale + shift), the
    vectors per input channel in the accumulation dtype (conv_prologue)."""
    n, c, h, w, cout, oh, ow, kh, kw = dims
    m = n * oh * ow
    bias, scale, shift = vector(bias), vector(scale), vector(shift)  # the epilogue reads them at ptr + channel
    if prologue is not None:
        prologue = (vector(prologue[0]), vector(prologue[1])) + tuple(prologue[2:])
    pmean = pm2 = None
    acc = acc_dtype(x)
    if stats:
        tiles = triton.cdiv(m, min(_MIN_BLOCK_M, _INTERP_CONFIG["BLOCK_M"], _FP64_CONFIG["BLOCK_M"],
                                   _FIXED_GPU_CONFIG["BLOCK_M"]))
        pmean = torch.empty((tiles, cout), dtype=acc, device=x.device)
        pm2 = torch.empty((tiles, cout), dtype=acc, device=x.device)
    dummy = y
    pro_scale, pro_shift, pro_act, pro_param = (dummy, dummy, 0, 0.0) if prologue is None else prologue
    cfg = _launch(
        _fwd_tuned, _conv_fwd_kernel, _gemm_grid(m, cout),
        x, wp, y,
        dummy if bias is None else bias, dummy if scale is None else scale, dummy if shift is None else shift,
        dummy if residual is None else residual, dummy if pmean is None else pmean, dummy if pm2 is None else pm2,
        dummy if pre is None else pre, pro_scale, pro_shift,
        m, c, h, w, cout, oh, ow, float(act_param), float(pro_param),
        *x_strides, 1, cout, kw * c * cout, c * cout, *y_strides, *conv,
        _tune_key(m, x_strides[1] == 1, y_strides[1] == 1),
        KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        HAS_RES=residual is not None, ACT=code(relu), SAVE_PRE=pre is not None, STATS=bool(stats),
        FLAT=c < 16 and kh * kw > 1, PRO=prologue is not None, PRO_ACT=code(pro_act),
        **_math_flags(x),
    )
    if not stats:
        return None
    tiles = triton.cdiv(m, cfg["BLOCK_M"])
    mean = _tensors.new_output(x, dtype=acc, shape=(cout,))
    var = _tensors.new_output(x, dtype=acc, shape=(cout,))
    block_c = 32 if INTERPRET else 64
    _stats_merge_kernel[(triton.cdiv(cout, block_c),)](
        pmean, pm2, mean, var, tiles, cout, m, cfg["BLOCK_M"], m - (tiles - 1) * cfg["BLOCK_M"],
        BLOCK_T=32, BLOCK_C=block_c,
    )
    return mean, var


@on_tensor_device
def forward(x, w, bias, scale, shift, residual, stride, padding, dilation, relu, out, stats=False, act_param=0.0,
            pre=None):
    n, c, h, wd = x.shape
    cout, _, kh, kw = w.shape
    oh, ow = out.shape[2:]
    if pre is not None:
        assert pre.stride() == out.stride()
    return_stats = _run_fwd(
        x, x.stride(), _packed_weight(w, x.dtype), out, out.stride(), (n, c, h, wd, cout, oh, ow, kh, kw),
        (*stride, *padding, *dilation), bias, scale, shift, residual, relu, stats, act_param, pre,
    )
    return (out, return_stats) if stats else out


@on_tensor_device
def forward_stats(x, w, bias, stride, padding, dilation, out):
    _, (mean, var) = forward(x, w, bias, None, None, None, stride, padding, dilation, False, out, stats=True)
    return out, mean, var


@on_tensor_device
def grad_input(g, w, out, stride, padding, dilation):
    n, c, h, wd = out.shape
    cout, _, kh, kw = w.shape
    oh, ow = g.shape[2:]
    w = w.to(g.dtype)
    if kh == 1 and kw == 1 and padding[0] == 0 and padding[1] == 0:
        # dx[:, :, ::s, ::s] = dy @ W: the forward GEMM with the weight seen as (Cin, Cout, 1, 1).
        if stride[0] > 1 or stride[1] > 1:
            out.zero_()  # the pixels no output reads from get zero gradient
        view = out[:, :, :: stride[0], :: stride[1]]
        view = view[:, :, :oh, :ow]
        wp = w.reshape(cout, c).contiguous().view(1, 1, cout, c)
        _run_fwd(
            g, g.stride(), wp, view, view.stride(), (n, cout, oh, ow, c, oh, ow, 1, 1), (1, 1, 0, 0, 1, 1),
            None, None, None, None, False, False,
        )
        return out
    _run_dgrad(g, _packed_weight(w, g.dtype), out, (n, c, h, wd, cout, oh, ow, kh, kw), stride, padding, dilation)
    return out


def _run_dgrad(g, wp, out, dims, stride, padding, dilation, epilogue=None):
    """The implicit-GEMM grad-input launch; wp is (KH, KW, C, Cout) contiguous (the reduction over cout is
    contiguous). `epilogue` = (z, scale, shift, act code, act_param) (conv_prologue's backward; z with out's
    strides): out receives dz = dpre * scale, and the per-channel (grad scale, grad shift) are returned."""
    n, c, h, wd, cout, oh, ow, kh, kw = dims
    m = n * h * wd
    if epilogue is not None:  # the epilogue reads scale and shift at ptr + channel
        epilogue = (epilogue[0], vector(epilogue[1]), vector(epilogue[2])) + tuple(epilogue[3:])
    z, scale, shift, act, act_param = (out, out, out, 0, 0.0) if epilogue is None else epilogue
    pds = pdh = out
    if epilogue is not None:
        assert z.stride() == out.stride()
        tiles = triton.cdiv(m, min(_MIN_BLOCK_M, _INTERP_CONFIG["BLOCK_M"], _FP64_CONFIG["BLOCK_M"],
                                   _FIXED_GPU_CONFIG["BLOCK_M"]))
        pds = torch.empty((tiles, c), dtype=scale.dtype, device=out.device)
        pdh = torch.empty((tiles, c), dtype=scale.dtype, device=out.device)
    cfg = _launch(
        _dgrad_tuned, _conv_dgrad_kernel, _gemm_grid(m, c),
        g, wp, out, z, scale, shift, pds, pdh, m, c, h, wd, cout, oh, ow, float(act_param),
        *g.stride(), 1, cout, kw * c * cout, c * cout, *out.stride(),
        *stride, *padding, *dilation, _tune_key(m, g.stride(1) == 1, out.stride(1) == 1),
        KH=kh, KW=kw, EPI=epilogue is not None, EPI_ACT=code(act), **_math_flags(g),
    )
    if epilogue is None:
        return None
    tiles = triton.cdiv(m, cfg["BLOCK_M"])
    return pds[:tiles].sum(0), pdh[:tiles].sum(0)


def _wgrad_target_programs(device):
    """Programs the split weight-gradient reduction aims for: two waves on a GPU; under the interpreter (a
    CPU tensor) 8, with at most 2 splits (grad_weight), so that the tests run the split reduction."""
    return 2 * sm_count(device) if device.type == "cuda" else 8


# Rows (N*OH*OW output pixels) of one weight-gradient launch: the kernel keeps its row indices in int32 (an
# int64 division per element in its inner loop would cost), and split * rows_per_split + BLOCK_K must stay
# below 2**31. Larger problems are run as several launches over slices of the batch.
WGRAD_MAX_ROWS = 2**30


@on_tensor_device
def grad_weight(g, x, w_shape, stride, padding, dilation, prologue=None):
    """dW of conv(x); with `prologue` = (scale, shift, act code, act_param), of conv(act(x * scale + shift)),
    the transform recomputed on each loaded x tile (conv_prologue)."""
    n, c, h, wd = x.shape
    cout, _, kh, kw = w_shape
    oh, ow = g.shape[2:]
    m = n * oh * ow
    if m > WGRAD_MAX_ROWS:
        per = WGRAD_MAX_ROWS // (oh * ow)
        if per < 1:
            raise ValueError(f"grad_weight: one image of {oh} x {ow} output pixels is more than the Triton "
                             f"weight-gradient kernel's {WGRAD_MAX_ROWS} rows per launch")
        dw = None
        for i in range(0, n, per):
            part = grad_weight(g[i:i + per], x[i:i + per], w_shape, stride, padding, dilation, prologue)
            dw = part if dw is None else dw + part
        return dw
    # Split the N*OH*OW reduction so that about two waves of programs run (assuming 128x128 tiles);
    # each split keeps at least 1024 rows so the partial sums stay a small fraction of the work.
    tiles = triton.cdiv(cout, 128) * triton.cdiv(c, 128) * kh * kw
    splits = max(1, min(triton.cdiv(_wgrad_target_programs(x.device), tiles), triton.cdiv(m, 1024)))
    if INTERPRET:
        splits = min(splits, 2)
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), 128) * 128
    splits = triton.cdiv(m, rows_per_split)
    acc = acc_dtype(x)
    part = _tensors.new_output(x, dtype=acc, shape=(splits, kh * kw, cout, c))

    def grid(meta):
        return (triton.cdiv(cout, meta["BLOCK_M"]) * triton.cdiv(c, meta["BLOCK_N"]), kh * kw, splits)

    pro_scale, pro_shift, pro_act, pro_param = (part, part, 0, 0.0) if prologue is None else prologue
    _launch(
        _wgrad_tuned, _conv_wgrad_kernel, grid,
        g, x, part, pro_scale, pro_shift, m, c, h, wd, cout, oh, ow, rows_per_split, float(pro_param),
        *g.stride(), *x.stride(), *stride, *padding, *dilation, _tune_key(m, g.stride(1) == 1, x.stride(1) == 1),
        KH=kh, KW=kw, PRO=prologue is not None,
        PRO_ACT=code(pro_act), **_math_flags(x),
    )
    dw = part[0] if splits == 1 else part.sum(0)
    return dw.view(kh, kw, cout, c).permute(2, 3, 0, 1)
