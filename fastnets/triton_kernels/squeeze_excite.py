"""Squeeze-and-excitation primitives in Triton; same contract as fastnets/reference/squeeze_excite.py.

Layout: x is dense, (N, C, S) in memory (NCHW; S = H*W) or (N, S, C) (channels_last). Every big kernel sees
one sample n as a C x S matrix with strides (stride_c, stride_s) = (S, 1) or (1, C) and tiles it
[BLOCK_C, BLOCK_S]; Triton coalesces along whichever axis has stride 1 (strides equal to 1 are specialized).
  pool / backward_reduce: grid (sample, channel block, S split); each program sums its S range in fp32
    (fp64 for fp64 x) and writes a partial [N, SPLIT, C]; with SPLIT == 1 it writes the result directly.
  scale / backward_apply: grid (sample, channel block, S block), elementwise with the gate of (n, c).
  excite: one launch for the batch: each program takes BLOCK_N samples through both FC layers with
    elementwise multiplies and tl.sum in fp32 (no tl.dot: the matrices are tiny, and the interpreter's
    bf16 tl.dot is wrong); the hidden layer goes through the `hidden` output, behind a barrier.
Offsets are int64.
"""
import triton
import triton.language as tl

from .. import _tensors
from .._tensors import acc_dtype, sm_count
from ._common import div_rn, on_tensor_device, tl_acc_dtype, vector
from .activations import act_fwd, relu_grad


def _geometry(x, channels_last):
    n, c, h, w = x.shape
    s = h * w
    return (n, c, s) + ((1, c) if channels_last else (s, 1))


def _tiles(c, s, channels_last, elems=4096):
    """[BLOCK_C, BLOCK_S] with the contiguous axis long enough to coalesce."""
    if channels_last:
        bc = min(triton.next_power_of_2(c), 128)
        bs = max(1, min(triton.next_power_of_2(s), elems // bc))
    else:
        bs = min(triton.next_power_of_2(s), 512)
        bc = max(1, min(triton.next_power_of_2(c), elems // bs))
    return bc, bs


def _split(n, c_blocks, s, bs, device, split):
    if split is not None:
        return max(1, min(int(split), triton.cdiv(s, bs)))
    want = 4 * sm_count(device)
    have = n * c_blocks
    if device.type != "cuda" or have >= want:
        return 1
    return max(1, min(triton.cdiv(want, have), triton.cdiv(s, bs)))


@triton.jit
def _reduce_kernel(
    x_ptr, dy_ptr, y_ptr, out_ptr, C, S, stride_c, stride_s, c_blocks, s_per_split, num_splits,
    GRAD: tl.constexpr, RELU: tl.constexpr, MEAN: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """GRAD=False: sum over s of x (divided by S when MEAN). GRAD=True: sum over s of g * x, g = dy masked by
    y > 0 when RELU. Writes out[n, split, c]."""
    pid = tl.program_id(0)
    split = pid % num_splits
    rest = pid // num_splits
    pid_c = rest % c_blocks
    n = (rest // c_blocks).to(tl.int64)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    base = n * C * S
    c_off = cs.to(tl.int64)[:, None] * stride_c
    s_start = split * s_per_split
    s_end = tl.minimum(s_start + s_per_split, S)
    acc = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    for s0 in range(s_start, s_end, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (ss < s_end)[None, :]
        offs = base + c_off + ss.to(tl.int64)[None, :] * stride_s
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if GRAD:
            g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
            if RELU:
                g = relu_grad(g, tl.load(y_ptr + offs, mask=mask, other=0.0))
            acc += g * x
        else:
            acc += x
    tot = tl.sum(acc, axis=1)
    if MEAN:
        tot = div_rn(tot, S)  # correctly rounded (_common.div_rn), as the CUDA kernel's div_rn
    tl.store(out_ptr + (n * num_splits + split) * C + cs, tot, mask=cmask)


@triton.jit
def _apply_kernel(
    x_ptr, gate_ptr, res_ptr, gp_ptr, out_ptr, g_out_ptr, C, S, stride_c, stride_s, c_blocks, s_blocks,
    GRAD: tl.constexpr, HAS_ADD: tl.constexpr, RELU: tl.constexpr, WRITE_G: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """GRAD=False (scale): out = [relu](x * gate[n, c] [+ res]); x_ptr is x, res_ptr the residual (HAS_ADD).
    GRAD=True (backward apply): x_ptr is dy, res_ptr is y (read when RELU), g = dy masked by y > 0 when
    RELU; out = g * gate[n, c] [+ gp[n, c] when HAS_ADD]; g_out = g when WRITE_G."""
    pid = tl.program_id(0)
    pid_s = pid % s_blocks
    rest = pid // s_blocks
    pid_c = rest % c_blocks
    n = (rest // c_blocks).to(tl.int64)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ss = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    cmask = cs < C
    mask = cmask[:, None] & (ss < S)[None, :]
    offs = n * C * S + cs.to(tl.int64)[:, None] * stride_c + ss.to(tl.int64)[None, :] * stride_s
    gate = tl.load(gate_ptr + n * C + cs, mask=cmask, other=0.0).to(ACC)
    v = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if GRAD:
        if RELU:
            v = relu_grad(v, tl.load(res_ptr + offs, mask=mask, other=0.0))
        if WRITE_G:
            tl.store(g_out_ptr + offs, v, mask=mask)
        out = v.to(ACC) * gate[:, None]
        if HAS_ADD:
            gp = tl.load(gp_ptr + n * C + cs, mask=cmask, other=0.0).to(ACC)
            out += gp[:, None]
    else:
        out = v.to(ACC) * gate[:, None]
        if HAS_ADD:
            out += tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
        if RELU:
            out = tl.where(out < 0, 0.0, out)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _excite_kernel(
    p_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, h_ptr, gate_ptr, N, C, R, inner_param,
    INNER: tl.constexpr, GATE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """hidden = inner(p @ w1.T + b1) [N, R]; gate = sigmoid or hardsigmoid(hidden @ w2.T + b2) [N, C];
    w1 [R, C], w2 [C, R]. INNER: activation code, GATE: 0 sigmoid, 1 hardsigmoid."""
    ns = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < N
    # Layer 1: [BLOCK_N, BLOCK_R] blocks of hidden, summing over C in chunks of BLOCK_K.
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        rmask = rs < R
        acc = tl.zeros([BLOCK_N, BLOCK_R], ACC)
        for k0 in range(0, C, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < C
            p = tl.load(p_ptr + ns[:, None] * C + ks[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w1_ptr + rs.to(tl.int64)[:, None] * C + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            acc += tl.sum(p.to(ACC)[:, None, :] * w.to(ACC)[None, :, :], axis=2)
        b = tl.load(b1_ptr + rs, mask=rmask, other=0.0).to(ACC)
        h = acc + b[None, :]
        h = act_fwd(h, INNER, inner_param)
        tl.store(h_ptr + ns[:, None] * R + rs[None, :], h, mask=nmask[:, None] & rmask[None, :])
    tl.debug_barrier()  # the whole CTA has written this block's hidden rows before any thread reads them
    # Layer 2: [BLOCK_N, BLOCK_C] blocks of the gate, summing over R in chunks of BLOCK_R.
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        acc = tl.zeros([BLOCK_N, BLOCK_C], ACC)
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            rmask = rs < R
            h = tl.load(h_ptr + ns[:, None] * R + rs[None, :], mask=nmask[:, None] & rmask[None, :], other=0.0)
            w = tl.load(w2_ptr + cs.to(tl.int64)[:, None] * R + rs[None, :], mask=cmask[:, None] & rmask[None, :], other=0.0)
            acc += tl.sum(h.to(ACC)[:, None, :] * w.to(ACC)[None, :, :], axis=2)
        b = tl.load(b2_ptr + cs, mask=cmask, other=0.0).to(ACC)
        z = acc + b[None, :]
        if GATE == 1:  # hardsigmoid = relu6(z + 3) / 6, NaN stays NaN
            t = z + 3.0
            gate = tl.where(t < 0, 0.0, tl.where(t > 6.0, 6.0, t)) / 6.0
        else:
            gate = 1.0 / (1.0 + tl.exp(-z))
        tl.store(gate_ptr + ns[:, None] * C + cs[None, :], gate, mask=nmask[:, None] & cmask[None, :])


def _reduce(x, dy, y, relu, channels_last, grad, split):
    n, c, s, stride_c, stride_s = _geometry(x, channels_last)
    bc, bs = _tiles(c, s, channels_last)
    c_blocks = triton.cdiv(c, bc)
    num_splits = _split(n, c_blocks, s, bs, x.device, split)
    s_per_split = triton.cdiv(triton.cdiv(s, num_splits), bs) * bs
    num_splits = triton.cdiv(s, s_per_split)
    acc = acc_dtype(x)
    if num_splits == 1:
        out = _tensors.new_output(x, dtype=acc, shape=(n, c))
    else:
        out = _tensors.new_output(x, dtype=acc, shape=(n, num_splits, c))
    _reduce_kernel[(n * c_blocks * num_splits,)](
        x, dy if grad else x, y if (grad and relu) else x, out, c, s, stride_c, stride_s, c_blocks, s_per_split,
        num_splits, GRAD=grad, RELU=relu, MEAN=(not grad and num_splits == 1), ACC=tl_acc_dtype(acc),
        BLOCK_C=bc, BLOCK_S=bs, num_warps=4,
    )
    if num_splits == 1:
        return out
    tot = out.sum(1)
    return tot if grad else tot / s


@on_tensor_device
def pool(x, channels_last, split=None):
    return _reduce(x, None, None, False, channels_last, grad=False, split=split)


@on_tensor_device
def backward_reduce(dy, x, y, relu, channels_last, split=None):
    return _reduce(x, dy, y, relu, channels_last, grad=True, split=split)


def _apply(src, gate, aux, gp, relu, write_g, channels_last, grad):
    n, c, s, stride_c, stride_s = _geometry(src, channels_last)
    bc, bs = _tiles(c, s, channels_last)
    c_blocks, s_blocks = triton.cdiv(c, bc), triton.cdiv(s, bs)
    out = _tensors.new_output(src)
    g_out = _tensors.new_output(src) if write_g else None
    has_add = (gp is not None) if grad else (aux is not None)
    _apply_kernel[(n * c_blocks * s_blocks,)](
        src, gate, aux if aux is not None else src, gp if gp is not None else gate, out,
        g_out if g_out is not None else out, c, s, stride_c, stride_s, c_blocks, s_blocks,
        GRAD=grad, HAS_ADD=has_add, RELU=relu, WRITE_G=write_g, ACC=tl_acc_dtype(gate.dtype),
        BLOCK_C=bc, BLOCK_S=bs, num_warps=4,
    )
    return out, g_out


@on_tensor_device
def scale(x, gate, residual, relu, channels_last):
    return _apply(x, vector(gate), residual, None, relu, False, channels_last, grad=False)[0]


@on_tensor_device
def backward_apply(dy, y, gate, gp, relu, write_g, channels_last):
    return _apply(dy, vector(gate), y if relu else None, vector(gp), relu, write_g, channels_last, grad=True)


@on_tensor_device
def excite(pooled, w1, b1, w2, b2, inner_act=1, inner_param=0.0, gate=0, block_n=None):
    # [N, C] / [R, C] / [C, R] matrices and vectors, indexed as contiguous (a transposed weight is a view)
    pooled, b1, b2 = vector(pooled), vector(b1), vector(b2)
    w1, w2 = vector(w1.reshape(w1.shape[0], -1)), vector(w2.reshape(w2.shape[0], -1))
    n, c = pooled.shape
    r = w1.shape[0]
    acc = pooled.dtype
    hidden = _tensors.new_output(pooled, shape=(n, r))
    gate_out = _tensors.new_output(pooled, shape=(n, c))
    if block_n is None:
        # The most samples per program that still leaves about one program per two SMs: each program reads
        # both weight matrices once, so fewer programs mean less L2 traffic but fewer busy SMs.
        sms = sm_count(pooled.device)
        block_n = 8
        while block_n > 1 and triton.cdiv(n, block_n) * 2 < sms:
            block_n //= 2
    bn = min(block_n, triton.next_power_of_2(n))
    br = min(triton.next_power_of_2(r), 32)
    bk = max(1, min(triton.next_power_of_2(c), 8192 // (bn * br)))
    bc = max(1, min(triton.next_power_of_2(c), 8192 // (bn * br)))
    _excite_kernel[(triton.cdiv(n, bn),)](
        pooled, w1, b1, w2, b2, hidden, gate_out, n, c, r, float(inner_param), INNER=int(inner_act), GATE=int(gate),
        ACC=tl_acc_dtype(acc), BLOCK_N=bn, BLOCK_R=br, BLOCK_K=bk, BLOCK_C=bc, num_warps=4,
    )
    return hidden, gate_out
