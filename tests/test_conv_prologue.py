"""bn_act_conv2d: conv2d(act(z * scale + shift), W) + bias with the BatchNorm-apply + activation in the
convolution's prologue, every backend here, against torch in float64 (F.conv2d of torch's activation of the
affine transform, on the same rounded inputs). Every gradient (z, scale, shift, weight, bias), fp32/fp16/bf16
and float64, NCHW and channels_last, odd shapes, strides, padding with act(shift) != 0, several tiles in
M/N/K, a real training BatchNorm in front (scale/shift from var_mean of z, with autograd), what is saved
for backward (saved_tensors_hooks: y is never saved), bad input and opcheck.

Errors are conftest.assert_rel (||a - b|| / ||b||) with the bound of the result's dtype; the Triton backend
runs under the interpreter on this machine, so shapes are tiny."""
import pytest
import torch
import torch.nn.functional as F

import fastnets
from fastnets import activations
from fastnets.ops.conv_prologue import bn_act_conv2d

from conftest import (assert_rel, backend_params, biting_grad, check_bad_input_row, device_for,
                      fp32_bound_dtype)

BACKENDS = backend_params("conv_prologue")


def _bound_dtype(dtype):
    return fp32_bound_dtype(dtype)  # fp16's bound where TF32 is on (never inside conftest's IEEE fixture)


def _close(actual, expected, dtype, ref=None, msg=""):
    return assert_rel(actual, expected, _bound_dtype(dtype), ref=ref, msg=msg)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make_inputs(n, c, h, w, cout, k, dtype, channels_last=False, bias=True, device="cpu", shift_loc=0.3, groups=1):
    """Non-zero-mean z with per-channel spread, a negative scale on one channel, and shifts that put the
    pre-activation on both sides of zero."""
    kh, kw = _pair(k)
    z = torch.randn(n, c, h, w) * torch.linspace(0.5, 2.0, c).view(1, c, 1, 1) + torch.linspace(-1.0, 1.5, c).view(1, c, 1, 1)
    scale = torch.rand(c) + 0.5
    if c > 1:
        scale[c // 2] = -scale[c // 2]  # BatchNorm's gamma may be negative
    shift = torch.randn(c) * 0.5 + shift_loc
    wt = torch.randn(cout, c // groups, kh, kw) / (c // groups * kh * kw) ** 0.5
    b = torch.randn(cout) * 0.5 if bias else None
    vec_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    z = z.to(dtype).contiguous(memory_format=fmt).to(device)
    wt = wt.to(dtype).contiguous(memory_format=fmt).to(device)
    b = None if b is None else b.to(dtype).to(device)
    return z, scale.to(vec_dtype).to(device), shift.to(vec_dtype).to(device), wt, b


def truth(z, scale, shift, w, b, stride, padding, dilation, groups, act, act_param):
    """torch in float64: F.conv2d(act(z * scale + shift)) with torch's own activation; float64 leaves."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (z, scale, shift, w, b)]
    zr, sr, hr, wr, br = leaves
    y = activations.forward(zr * sr.view(1, -1, 1, 1) + hr.view(1, -1, 1, 1), act, act_param)
    return F.conv2d(y, wr, br, stride, padding, dilation, groups), leaves


def check_all(backend, z, scale, shift, w, b, stride=1, padding=0, dilation=1, groups=1, act="relu",
              act_param=0.0, what=""):
    """Output (dtype, layout, values) and the gradients of z, scale, shift, weight and bias against float64."""
    dtype = z.dtype
    ins = [None if t is None else t.detach().clone().requires_grad_() for t in (z, scale, shift, w, b)]
    out = bn_act_conv2d(*ins, stride=stride, padding=padding, dilation=dilation, groups=groups,
                        activation=(act, act_param), backend=backend)
    want, leaves = truth(z, scale, shift, w, b, stride, padding, dilation, groups, act, act_param)
    assert out.dtype == dtype and out.shape == want.shape, (out.dtype, out.shape, want.shape)
    cl = (not z.is_contiguous()) and z.is_contiguous(memory_format=torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    _close(out, want, dtype, msg=f"output {what}")
    g = biting_grad(out)
    used = [(name, a, r) for name, a, r in zip(("z", "scale", "shift", "weight", "bias"), ins, leaves) if a is not None]
    got = torch.autograd.grad(out, [a for _, a, _ in used], g)
    exp = torch.autograd.grad(want, [r for _, _, r in used], g.double())
    for (name, a, _), gt, ex in zip(used, got, exp):
        assert gt.dtype == a.dtype and gt.shape == a.shape, (name, gt.dtype, gt.shape)
        # scale/shift gradients are float32 sums of low-precision products: the activations' bound
        _close(gt, ex, dtype, msg=f"grad {name} {what}")
    return out


# name: (N, C, H, W, Cout, kernel, stride, padding, dilation, bias, act, dtype, channels_last)
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
CASES = {
    "3x3_p1_nchw": (1, 5, 7, 6, 8, 3, 1, 1, 1, True, "relu", F32, False),
    "3x3_p1_cl": (1, 5, 7, 6, 8, 3, 1, 1, 1, True, "relu", F32, True),
    "1x1_s2_identity_cl": (2, 8, 7, 9, 16, 1, 2, 0, 1, False, "identity", F32, True),
    "1x1_nchw": (2, 8, 5, 5, 8, 1, 1, 0, 1, True, "relu", F32, False),
    "3x3_s2_p1_c16_bf16_cl": (2, 16, 7, 7, 8, 3, 2, 1, 1, True, "relu", BF16, True),
    "3x3_s2_p1_c16_f16_nchw": (2, 16, 7, 7, 8, 3, 2, 1, 1, False, "relu", F16, False),
    "1x1_bf16_nchw": (2, 8, 5, 5, 8, 1, 1, 0, 1, True, "relu", BF16, False),
    "1x1_s2_f16_cl": (2, 8, 5, 7, 8, 1, 2, 0, 1, False, "relu", F16, True),
    "c1": (2, 1, 5, 5, 4, 3, 1, 1, 1, True, "relu", F32, False),
    "1x1_spatial_in": (3, 3, 1, 1, 5, 1, 1, 0, 1, True, "relu", F32, True),
    "1x1_spatial_out": (2, 4, 3, 3, 5, 3, 1, 0, 1, False, "relu", F32, False),
    "primes_silu_cl": (1, 7, 5, 11, 13, 3, 1, 1, 1, True, "silu", F32, True),
    "dilated_leaky": (1, 4, 7, 6, 6, 3, 1, 2, 2, False, "leaky_relu", F32, False),
    "5x3_s21_p21_f16_cl": (1, 6, 7, 6, 5, (5, 3), (2, 1), (2, 1), 1, True, "relu", F16, True),
    "float64": (2, 3, 5, 4, 4, 3, 2, 1, 1, True, "relu", F64, False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_float64(backend, case):
    n, c, h, w, cout, k, s, p, d, bias, act, dtype, cl = CASES[case]
    device = device_for(backend)
    z, sc, sh, wt, b = make_inputs(n, c, h, w, cout, k, dtype, cl, bias, device)
    check_all(backend, z, sc, sh, wt, b, s, p, d, act=act, act_param=0.1 if act == "leaky_relu" else 0.0, what=case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act,channels_last", [("relu", False), ("identity", True)])
def test_padded_pixels_stay_zero(backend, act, channels_last):
    """shift = +3 so that act(0 * scale + shift) = 3: a kernel that transformed the padded pixels would add
    3 * (sum of the border taps) to the output and the weight gradient."""
    device = device_for(backend)
    z, sc, sh, wt, b = make_inputs(2, 4, 4, 3, 8, 3, F32, channels_last, False, device, shift_loc=3.0)
    out = check_all(backend, z, sc, sh, wt, b, 1, 2, 1, act=act, what=f"padding {act}")
    unpadded, _ = truth(z, sc, sh, wt, b, 1, 0, 1, 1, act, 0.0)
    _close(out[:, :, 2:-2, 2:-2], unpadded, F32, msg="interior equals the unpadded convolution")
    # the corner output reads only padded taps but its own pixel's 3x3 neighbourhood: against a transformed
    # padding the corner of a 1x1 spatial input would be act(shift) * sum(w) instead of 0
    z1, sc1, sh1, wt1, _ = make_inputs(2, 4, 1, 1, 8, 3, F32, channels_last, False, device, shift_loc=3.0)
    check_all(backend, z1, sc1, sh1, wt1, None, 1, 1, 1, act=act, what=f"1x1 spatial, padding 1, {act}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups(backend):
    """groups > 1: the reference runs them; the triton backend rejects them by name and `auto` runs them on
    the reference."""
    device = device_for(backend)
    z, sc, sh, wt, b = make_inputs(2, 4, 5, 5, 6, 3, F32, False, True, device, groups=2)
    if backend == "triton":
        with pytest.raises(ValueError, match="groups=2: the triton backend"):
            bn_act_conv2d(z, sc, sh, wt, b, padding=1, groups=2, backend="triton")
        backend = "auto"
    check_all(backend, z, sc, sh, wt, b, 1, 1, 1, groups=2, what="groups=2")


@pytest.fixture
def small_tiles(monkeypatch):
    """A 16 x 16 x 16 tile for the Triton kernels (the interpreter's default is 32 x 16 x 16)."""
    from fastnets.triton_kernels import conv as tri

    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
    monkeypatch.setattr(tri, "_INTERP_CONFIG", cfg)
    monkeypatch.setattr(tri, "_FIXED_GPU_CONFIG", cfg)
    monkeypatch.setenv("FASTNETS_CONV_TUNE", "fixed")
    return cfg


# (N, C, H, W, Cout, kernel, stride, padding, dtype, channels_last): C and Cout >= 2 tiles of 16, M several
MULTI_TILE = {
    "3x3_c17": (2, 17, 4, 3, 17, 3, 1, 1, F32, True),
    "1x1_s2_c17": (2, 17, 7, 7, 18, 1, 2, 0, BF16, False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(MULTI_TILE))
def test_several_tiles_in_m_n_and_k(backend, case, small_tiles):
    n, c, h, w, cout, k, s, p, dtype, cl = MULTI_TILE[case]
    device = device_for(backend)
    z, sc, sh, wt, b = make_inputs(n, c, h, w, cout, k, dtype, cl, True, device)
    check_all(backend, z, sc, sh, wt, b, s, p, 1, what=case)


# ------------------------------------------------------------------------------------- a real BatchNorm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,channels_last", [(F32, False), (BF16, True)], ids=["f32-nchw", "bf16-cl"])
def test_train_through_batch_norm(backend, dtype, channels_last):
    """Conv -> BN(train) -> ReLU -> Conv -> BN statistics: the caller computes scale/shift from var_mean of z
    with autograd (so the batch statistics' backward is torch's), the op fuses the BN apply + ReLU into the
    second convolution and returns its output's statistics. Against torch's own chain in float64
    (F.conv2d -> F.batch_norm(training=True) -> relu -> F.conv2d): output, the second BN's statistics, and the
    gradients of x, both weights, gamma, beta and the second conv's bias."""
    device = device_for(backend)
    eps = 1e-5
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(2, 3, 7, 6) + 0.5).to(dtype).contiguous(memory_format=fmt).to(device)
    w1 = (torch.randn(6, 3, 3, 3) / 27 ** 0.5).to(dtype).contiguous(memory_format=fmt).to(device)
    w2 = (torch.randn(8, 6, 3, 3) / 54 ** 0.5).to(dtype).contiguous(memory_format=fmt).to(device)
    b2 = (torch.randn(8) * 0.5).to(dtype).to(device)
    gamma = (torch.rand(6) + 0.5).to(device)
    beta = torch.randn(6).to(device)
    ins = [t.detach().clone().requires_grad_() for t in (x, w1, w2, b2, gamma, beta)]
    xi, w1i, w2i, b2i, gi, bi = ins
    z = F.conv2d(xi, w1i, None, 1, 1)
    var, mean = torch.var_mean(z.float(), dim=(0, 2, 3), unbiased=False)
    scale = gi * torch.rsqrt(var + eps)
    shift = bi - mean * scale
    out, m2, v2 = bn_act_conv2d(z, scale, shift, w2i, b2i, stride=2, padding=1, backend=backend, stats=True)

    refs = [t.detach().double().requires_grad_() for t in ins]
    xr, w1r, w2r, b2r, gr, br = refs
    zr = F.conv2d(xr, w1r, None, 1, 1)
    want = F.conv2d(torch.relu(F.batch_norm(zr, None, None, gr, br, True, 0.1, eps)), w2r, b2r, 2, 1)
    _close(out, want, dtype, msg="output")
    vr, mr = torch.var_mean(want, dim=(0, 2, 3), unbiased=False)
    assert m2.dtype == torch.float32 and v2.dtype == torch.float32
    _close(m2, mr, dtype, msg="output mean")
    _close(v2, vr, dtype, msg="output var")
    g = biting_grad(out)
    got = torch.autograd.grad(out, ins, g)
    exp = torch.autograd.grad(want, refs, g.double())
    for name, a, e in zip(("x", "w1", "w2", "b2", "gamma", "beta"), got, exp):
        _close(a, e, dtype, msg=f"grad {name}")


# ------------------------------------------------------------------------------------ what is saved


def _saved_storages(fn):
    """(result, {data_ptr: bytes}) of every tensor saved for backward while fn() runs, storage counted once."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_z_scale_shift_weight(backend):
    device = device_for(backend)
    z, sc, sh, wt, b = make_inputs(2, 8, 6, 5, 8, 3, F32, True, True, device)
    ins = [t.requires_grad_() for t in (z, sc, sh, wt, b)]
    out, saved = _saved_storages(lambda: bn_act_conv2d(*ins, padding=1, backend=backend))
    allowed = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (z, sc, sh, wt)}
    assert saved == allowed, f"saved {saved}, expected only z, scale, shift and weight {allowed}"
    # the unfused torch chain saves z and scale (the multiply), y (relu's output and conv's input) and the
    # weight: one activation (y, as large as z) more than the fused op, and no shift
    _, eager = _saved_storages(lambda: F.conv2d(torch.relu(ins[0] * ins[1].view(1, -1, 1, 1)
                                                           + ins[2].view(1, -1, 1, 1)), ins[3], ins[4], 1, 1))
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    assert sum(eager.values()) == sum(saved.values()) + nbytes(z) - nbytes(sh)
    out.backward(biting_grad(out))  # and the backward runs from exactly these
    assert all(t.grad is not None for t in ins)


# ------------------------------------------------------------------------------------------- bad input


def _args(d, dtype=torch.float32, c=4):
    z, sc, sh, wt, b = make_inputs(2, c, 5, 5, 6, 3, dtype, False, True, d)
    return z, sc, sh, wt, b


def _call(d, **over):
    z, sc, sh, wt, b = _args(d)
    kw = dict(z=z, scale=sc, shift=sh, weight=wt, bias=b)
    kw.update(over.pop("tensors", {}))
    return bn_act_conv2d(kw["z"], kw["scale"], kw["shift"], kw["weight"], kw["bias"], **over)


ROWS = [
    ("scale of Cout channels", lambda d: _call(d, tensors={"scale": torch.rand(6, device=d)}),
     (ValueError, "scale must have shape (4,)")),
    ("shift 2-D", lambda d: _call(d, tensors={"shift": torch.rand(1, 4, device=d)}),
     (ValueError, "shift must have shape (4,)")),
    ("scale None", lambda d: _call(d, tensors={"scale": None}), (TypeError, "scale must be a torch.Tensor")),
    ("scale float64 with float32 z", lambda d: _call(d, tensors={"scale": torch.rand(4, dtype=torch.float64, device=d)}),
     (TypeError, "scale has dtype torch.float64 but z has dtype torch.float32")),
    ("shift int", lambda d: _call(d, tensors={"shift": torch.ones(4, dtype=torch.long, device=d)}),
     (TypeError, "shift must be float16")),
    ("weight fp16, z fp32", lambda d: _call(d, tensors={"weight": torch.randn(6, 4, 3, 3, device=d).half()}),
     (TypeError, "weight has dtype torch.float16 but z has dtype torch.float32")),
    ("bias fp64", lambda d: _call(d, tensors={"bias": torch.randn(6, dtype=torch.float64, device=d)}),
     (TypeError, "bias has dtype")),
    ("bias of C channels", lambda d: _call(d, tensors={"bias": torch.randn(4, device=d)}),
     (ValueError, "bias must have shape (6,)")),
    ("channel mismatch", lambda d: _call(d, tensors={"weight": torch.randn(6, 3, 3, 3, device=d)}),
     (ValueError, "z has 4 channels")),
    ("3-D z", lambda d: _call(d, tensors={"z": torch.randn(4, 5, 5, device=d)}), (ValueError, "z must be 4-D")),
    ("int z", lambda d: _call(d, tensors={"z": torch.ones(2, 4, 5, 5, dtype=torch.long, device=d)}),
     (TypeError, "z must be float16")),
    ("empty z", lambda d: _call(d, tensors={"z": torch.randn(0, 4, 5, 5, device=d)}), (ValueError, "z must be non-empty")),
    ("kernel larger than input", lambda d: _call(d, tensors={"z": torch.randn(2, 4, 2, 5, device=d)}),
     (ValueError, "larger than the padded input")),
    ("unknown activation", lambda d: _call(d, activation="tanhh"), (ValueError, "activation must be one of")),
    ("unknown backend", lambda d: _call(d, backend="cudnn"), (ValueError, "backend must be one of")),
    ("stride 0", lambda d: _call(d, stride=0), (ValueError, "stride must be >= 1")),
    ("string padding", lambda d: _call(d, padding="same"), (ValueError, "padding must be an int or a pair")),
    ("groups not dividing", lambda d: _call(d, groups=4), (ValueError, "groups=4 must divide")),
    ("scale on meta", lambda d: _call(d, tensors={"scale": torch.rand(4, device="meta")}),
     (ValueError, "scale is on meta")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_names_the_argument(backend, row):
    check_bad_input_row(backend, row)


# ------------------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
def test_opcheck(backend, stats):
    """The op's registration (schema, fake kernel with the real output's strides, autograd) on the reference;
    the Triton kernels allocate through the same op code (their output strides are checked above)."""
    if backend != "reference":
        pytest.skip("the registration does not depend on the backend; opcheck is slow under the interpreter")
    device = device_for(backend)
    z, sc, sh, wt, b = make_inputs(2, 3, 4, 4, 4, 3, F32, stats, True, device)
    args = [t.requires_grad_() for t in (z, sc, sh, wt, b)]
    torch.library.opcheck(torch.ops.fastnets.bn_act_conv2d.default,
                          (*args, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, stats, backend))
    g = torch.randn(2, 4, 4, 4, device=device)
    torch.library.opcheck(torch.ops.fastnets.bn_act_conv2d_backward.default,
                          (g, z.detach(), sc.detach(), sh.detach(), wt.detach(), [1, 1], [1, 1], [1, 1], 1, "relu", 0.0,
                           True, True, True, True, stats, backend))


def test_native_and_auto_on_cpu_run_the_reference():
    """auto / native on CPU tensors is the reference (torch's CPU kernels; it saves only z as well)."""
    from fastnets.ops._registry import kernels
    from fastnets.reference import conv_prologue as ref

    assert kernels("conv_prologue", "auto", "cpu") is ref
    assert kernels("conv_prologue", "native", "cpu") is ref
    z, sc, sh, wt, b = make_inputs(2, 3, 5, 5, 4, 3, F32)
    with fastnets.use_backend("native"):
        check_all(None, z, sc, sh, wt, b, 1, 1, what="native")
