"""The compiled extension fastnets._C and the `cuda` backend of batch_norm, primitive by primitive.

The general BatchNorm behaviour (modules, running statistics, torch.compile, ...) is tested for every
backend in test_batch_norm.py; this file covers what is specific to the extension: that it was built and
registers its ops, and that each CUDA kernel path (NCHW small and large planes, channels_last, vectorized
and scalar fallbacks, > 2^31 elements) matches the reference primitives. The GPU tests need a GPU.
"""
import glob
import os
import re
import shutil

import pytest
import torch

import fastnets
from fastnets import _extension, _tensors
from fastnets.ops.batch_norm import batch_norm
from fastnets.reference import batch_norm as ref

from conftest import GPU, TOL, assert_rel, bn_truth

# The extension's ops are internal (the cuda backend's primitives): their own namespace, apart from the user
# ops of torch.ops.fastnets. The squeeze-excite ones are checked in test_squeeze_excite.py.
INTERNAL_OPS = ("bn_stats", "bn_apply", "bn_backward_reduce", "bn_backward_apply", "se_reduce", "se_excite",
                "se_apply", "build_info", "launch_plan")
SCHEMAS = {
    "bn_stats": "fastnets_cuda::bn_stats(Tensor x, bool channels_last, float eps) -> (Tensor mean, Tensor invstd)",
    "bn_apply": "fastnets_cuda::bn_apply(Tensor x, Tensor scale, Tensor shift, Tensor? residual, int act, "
    "float act_param, bool channels_last) -> Tensor",
    "bn_backward_reduce": "fastnets_cuda::bn_backward_reduce(Tensor dy, Tensor x, Tensor? y, Tensor? residual, "
    "Tensor? scale, Tensor? shift, Tensor mean, int act, float act_param, bool channels_last) "
    "-> (Tensor sum_g, Tensor sum_gxmu)",
    "bn_backward_apply": "fastnets_cuda::bn_backward_apply(Tensor dy, Tensor x, Tensor? y, Tensor? residual, "
    "Tensor? scale, Tensor? shift, Tensor a, Tensor b, Tensor d, Tensor mean, int act, float act_param, bool train, "
    "bool write_g, bool channels_last) -> (Tensor dx, Tensor g)",
    "build_info": "fastnets_cuda::build_info() -> str",
    # the kernels' launch plans, for tests/test_cuda_launch_plans.py
    "launch_plan": "fastnets_cuda::launch_plan(str kind, int[] args) -> str",
}


def _nvcc():
    return shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")


def _require_built_extension():
    """Skip (with the reason) where setup.py would not have built the extension; fail where it should have."""
    if torch.version.cuda is None:
        pytest.skip("torch has no CUDA, so setup.py builds no extension")
    if not _nvcc():
        pytest.skip("no nvcc on this machine, so setup.py builds no extension")
    if os.environ.get("FASTNETS_BUILD_CUDA", "1") == "0":
        pytest.skip("FASTNETS_BUILD_CUDA=0: installed without the extension")
    if os.environ.get("FASTNETS_DISABLE_CUDA_EXTENSION", "0") == "1":
        pytest.skip("FASTNETS_DISABLE_CUDA_EXTENSION=1: the extension is deliberately not loaded")


# ---------------------------------------------------------------------------------------------------
# Build and registration (no GPU needed)


def test_extension_is_built_and_registers_its_ops():
    _require_built_extension()
    here = os.path.dirname(fastnets.__file__)
    libs = glob.glob(os.path.join(here, "_C*.so"))
    assert libs, (
        f"nvcc and a CUDA torch are here but there is no fastnets/_C*.so in {here}: the extension was not "
        "built; run `pip install --no-build-isolation -e .` and read its output"
    )
    assert _extension.is_loaded(), _extension.reason()
    for name, schema in SCHEMAS.items():
        assert hasattr(torch.ops.fastnets_cuda, name), f"torch.ops.fastnets_cuda.{name} is not registered"
        assert str(getattr(torch.ops.fastnets_cuda, name).default._schema) == schema


def test_extension_ops_are_internal_and_apart_from_the_user_ops():
    """The extension registers exactly its internal ops, all in torch.ops.fastnets_cuda; nothing of it lands
    in the user-facing torch.ops.fastnets namespace (which the Python package alone fills), and fastnets.info
    lists both."""
    _require_built_extension()
    assert _extension.is_loaded(), _extension.reason()
    from fastnets import info

    assert info.registered_ops("fastnets_cuda") == sorted(INTERNAL_OPS)
    user = info.registered_ops("fastnets")
    assert {"batch_norm_train", "conv2d", "squeeze_excite"} <= set(user), user
    internal_only = set(INTERNAL_OPS) - {"se_excite"}  # fastnets::se_excite is also a user op (the SE stage)
    assert not [n for n in user if n.startswith("cuda_") or n in internal_only], user
    report = info.report()
    assert "internal ops torch.ops.fastnets_cuda (9" in report and "bn_backward_reduce" in report, report


def test_build_info_names_archs_and_runtime():
    _require_built_extension()
    info = torch.ops.fastnets_cuda.build_info()
    assert _extension.build_info() == info
    m = re.fullmatch(r"archs=(\S+) cuda_runtime=(\d+)", info)
    assert m, f"unexpected fastnets_cuda::build_info(): {info!r}"
    archs = m.group(1).split(";")
    assert archs and all(re.fullmatch(r"\d+\.\d+\+?(PTX)?a?", a) for a in archs), info
    runtime = int(m.group(2))
    # Built with the toolkit whose major version matches torch's (cpp_extension refuses otherwise).
    assert runtime // 1000 == int(torch.version.cuda.split(".")[0]), (info, torch.version.cuda)


def test_ops_have_no_cpu_kernel():
    _require_built_extension()
    x = torch.randn(2, 3, 4)
    with pytest.raises(NotImplementedError):
        torch.ops.fastnets_cuda.bn_stats(x, False, 1e-5)


@pytest.mark.skipif(GPU, reason="checks how the backend reports itself on a machine without a GPU")
def test_cuda_backend_without_gpu_says_so():
    _require_built_extension()
    assert fastnets.backends.unavailable_reason("cuda", "cuda") == "no CUDA GPU is available to torch"


# ---------------------------------------------------------------------------------------------------
# GPU: each primitive against the reference


def gpu(test):
    """Marked `gpu` (the GPU run selects these) and skipped without a CUDA GPU."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
each_layout = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])

# (shape, which kernel path it exercises). S = product of the spatial sizes.
SHAPES = [
    ((4, 3, 5, 7), "C=3, S=35: NCHW tile of 3 channels"),
    ((8, 16, 1, 1), "1x1 spatial: S=1 goes down the channels_last path"),
    ((5, 2048, 7, 7), "ResNet's last stage: many channels per NCHW tile"),
    ((6, 5), "2-D input"),
    ((64, 256), "2-D input, vectorized channels"),
    ((3, 7, 11), "3-D input"),
    ((2, 4, 3, 2, 2), "5-D input"),
    ((3, 16, 8, 8), "channels_last vectorizable (C % 8 == 0)"),
    ((2, 8, 40, 40), "S=1600 > 1024: NCHW plane path, vectorizable"),
    ((3, 3, 33, 35), "S=1155: NCHW plane path, odd S (scalar loads)"),
    ((1, 2, 1500, 1400), "N=1 large planes: planes cut into chunks"),
    ((1000, 3, 3, 3), "many rows, few channels"),
]
SHAPE_IDS = ["x".join(map(str, s)) for s, _ in SHAPES]


def _layout(t, channels_last):
    """t in the (N, S, C) memory order when channels_last, for any number of dims."""
    if not channels_last or t.dim() == 2:
        return t.contiguous()
    perm = [0] + list(range(2, t.dim())) + [1]  # (N, spatial..., C)
    inv = [perm.index(i) for i in range(t.dim())]
    return t.permute(perm).contiguous().permute(inv)


def _rand(shape, dtype, channels_last, loc=0.0, scale=1.0):
    x = torch.randn(shape, device="cuda", dtype=torch.float32) * scale + loc
    return _layout(x.to(dtype), channels_last)


def _cuda():
    from fastnets.cuda_kernels import batch_norm as k

    return k


def _close(actual, expected, atol, rtol, what):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _f64_stats(x):
    """Ground truth: mean and biased variance per channel, in float64 from the same (rounded) values."""
    dims = [0] + list(range(2, x.dim()))
    xd = x.double()
    mean = xd.mean(dims)
    var = ((xd - mean.view([1, -1] + [1] * (x.dim() - 2))) ** 2).mean(dims)
    return mean, var


@gpu
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@each_layout
@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=SHAPE_IDS)
def test_stats_matches_float64(shape, channels_last, dtype):
    x = _rand(shape, dtype, channels_last, loc=0.5, scale=2.0)
    x, cl = _tensors.dense_layout(x)
    mean, invstd = _cuda().stats(x, cl, 1e-5)
    rmean, rinvstd = ref.stats(x, cl, 1e-5)
    assert mean.dtype == rmean.dtype and invstd.dtype == rinvstd.dtype and mean.shape == (shape[1],)
    tmean, tvar = _f64_stats(x)
    tight = dtype == torch.float64
    _close(mean, tmean, 1e-12 if tight else 2e-6, 1e-10 if tight else 2e-6, "mean")
    _close(invstd, torch.rsqrt(tvar + 1e-5), 1e-12 if tight else 0.0, 1e-10 if tight else 2e-5, "invstd")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@each_layout
@pytest.mark.parametrize("shape", [(64, 32, 7, 7), (8, 16, 40, 40), (512, 24), (2, 3, 1500, 1400)], ids=str)
def test_stats_of_large_mean_small_std(shape, channels_last, dtype):
    """mean 1e3, std 1: E[x^2] - E[x]^2 in float32 would lose every digit of the variance."""
    x = _rand(shape, dtype, channels_last, loc=1e3, scale=1.0)
    x, cl = _tensors.dense_layout(x)
    mean, invstd = _cuda().stats(x, cl, 1e-5)
    tmean, tvar = _f64_stats(x)
    _close(mean, tmean, 0.0, 1e-6, "mean")
    _close(invstd, torch.rsqrt(tvar + 1e-5), 0.0, 1e-3, "invstd")


@gpu
def test_stats_is_deterministic():
    x = torch.randn(16, 64, 28, 28, device="cuda")
    for cl in (False, True):
        xx = x.to(memory_format=torch.channels_last) if cl else x
        a = _cuda().stats(xx, cl, 1e-5)
        b = _cuda().stats(xx, cl, 1e-5)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _scale_shift(c, dtype):
    acc = _tensors.acc_dtype(dtype)
    scale = torch.rand(c, device="cuda", dtype=acc) + 0.5
    shift = torch.randn(c, device="cuda", dtype=acc)
    return scale, shift


@gpu
@pytest.mark.parametrize("mode", ["plain", "relu", "residual", "relu+residual"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@each_layout
@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=SHAPE_IDS)
def test_apply_matches_reference(shape, channels_last, dtype, mode):
    relu, has_res = "relu" in mode, "residual" in mode
    x, cl = _tensors.dense_layout(_rand(shape, dtype, channels_last))
    res = _rand(shape, dtype, channels_last) if has_res else None
    scale, shift = _scale_shift(shape[1], dtype)
    y = _cuda().apply(x, scale, shift, res, relu, cl)
    expected = ref.apply(x, scale, shift, res, relu, cl)
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
    atol, rtol = TOL[dtype]
    _close(y, expected, atol, rtol, "y")
    if relu:
        assert bool((y >= 0).all())


def _misaligned(shape, dtype, channels_last):
    """A dense tensor whose data pointer is 1 element past a 16-byte boundary: forces the scalar paths."""
    n = 1
    for s in shape:
        n *= s
    flat = torch.randn(n + 1, device="cuda").to(dtype)[1:]
    if channels_last and len(shape) > 2:
        perm_shape = [shape[0]] + list(shape[2:]) + [shape[1]]
        inv = [0, len(shape) - 1] + list(range(1, len(shape) - 1))
        t = flat.view(perm_shape).permute(inv)
    else:
        t = flat.view(shape)
    assert t.data_ptr() % 16 != 0
    return t


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@each_layout
@pytest.mark.parametrize("shape", [(3, 16, 8, 8), (2, 8, 40, 40), (64, 256), (5, 24, 7, 7)], ids=str)
def test_unaligned_pointers_use_the_scalar_paths(shape, channels_last, dtype):
    x, cl = _tensors.dense_layout(_misaligned(shape, dtype, channels_last))
    dy = _layout(torch.randn(shape, device="cuda").to(dtype), cl)
    dy = _misaligned(shape, dtype, cl).copy_(dy)
    mean, invstd = _cuda().stats(x, cl, 1e-5)
    tmean, tvar = _f64_stats(x)
    _close(mean, tmean, 2e-6, 2e-6, "mean")
    _close(invstd, torch.rsqrt(tvar + 1e-5), 0.0, 2e-5, "invstd")
    scale, shift = _scale_shift(shape[1], dtype)
    y = _cuda().apply(x, scale, shift, None, True, cl)
    atol, rtol = TOL[dtype]
    _close(y, ref.apply(x, scale, shift, None, True, cl), atol, rtol, "y")
    _check_sums(_cuda().backward_reduce(dy, x, y, mean, True, cl), dy, x, y, mean, True)
    dx, g = _cuda().backward_apply(dy, x, y, scale, shift, invstd, mean, True, True, True, cl)
    rdx, rg = ref.backward_apply(dy, x, y, scale, shift, invstd, mean, True, True, True, cl)
    _close(dx, rdx, atol, rtol, "dx")
    assert torch.equal(g, rg)


def _check_sums(sums, dy, x, y, mean, relu):
    """backward_reduce's sums against the reference's; returns the reference's."""
    rsums = ref.backward_reduce(dy, x, y, mean, relu, False)
    # Error bound of a float32 sum: relative to the sum of the magnitudes of its terms.
    g = ref._relu_mask(dy, y, relu).double()
    xc = x.double() - mean.double().view([1, -1] + [1] * (x.dim() - 2))
    dims = [0] + list(range(2, x.dim()))
    mags = (g.abs().sum(dims), (g * xc).abs().sum(dims))
    eps = 1e-12 if x.dtype == torch.float64 else 2e-6
    for got, want, mag, what in zip(sums, rsums, mags, ("sum_g", "sum_gxmu")):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert bool(((got.double() - want.double()).abs() <= eps * (mag + 1)).all()), f"{what}: {got} vs {want}"
    return rsums


@gpu
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "relu"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@each_layout
@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=SHAPE_IDS)
def test_backward_primitives_match_reference(shape, channels_last, dtype, relu):
    x, cl = _tensors.dense_layout(_rand(shape, dtype, channels_last))
    dy = _layout(torch.randn(shape, device="cuda").to(dtype), cl)
    mean, invstd = ref.stats(x, cl, 1e-5)
    y = _tensors.match_layout(ref.apply(x, invstd, -mean * invstd, None, True, cl), x) if relu else None
    k = _cuda()

    sums = k.backward_reduce(dy, x, y, mean, relu, cl)
    rsums = _check_sums(sums, dy, x, y, mean, relu)

    count = x.numel() // x.shape[1]
    a = invstd * (torch.rand_like(invstd) + 0.5)
    b = -a * invstd * invstd * rsums[1] / count
    d = -a * rsums[0] / count
    atol, rtol = TOL[dtype]
    for train in (False, True):
        for write_g in (False, True):
            dx, gout = k.backward_apply(dy, x, y, a, b, d, mean, relu, train, write_g, cl)
            rdx, rg = ref.backward_apply(dy, x, y, a, b, d, mean, relu, train, write_g, cl)
            assert dx.dtype == x.dtype and dx.stride() == x.stride()
            _close(dx, rdx, atol, rtol, f"dx (train={train}, write_g={write_g})")
            if write_g:
                assert gout.stride() == x.stride() and torch.equal(gout, rg)
            else:
                assert gout is None


@gpu
@pytest.mark.parametrize("mode", ["bn", "relu", "relu+residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@each_layout
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (5, 2048, 7, 7), (2, 8, 40, 40), (6, 5), (3, 7, 11)], ids=str)
def test_op_and_all_gradients_match_reference(shape, channels_last, dtype, training, mode):
    """The whole op, forward and backward (x, weight, bias, residual), cuda backend against the reference."""
    relu, has_res = "relu" in mode, "residual" in mode
    c = shape[1]
    base_x = _rand(shape, dtype, channels_last, loc=3.0)
    base_res = _rand(shape, dtype, channels_last) if has_res else None
    grad = (_rand(shape, dtype, channels_last).float() * 0.5 + 0.3 + 0.5 * base_x.float()).to(dtype)  # biting: correlated, non-zero mean
    w0 = torch.rand(c, device="cuda") + 0.5
    b0 = torch.randn(c, device="cuda")
    rm0 = torch.randn(c, device="cuda") + 3.0
    rv0 = torch.rand(c, device="cuda") + 0.5
    results = {}
    for backend in ("reference", "cuda"):
        x = base_x.clone().requires_grad_()
        res = base_res.clone().requires_grad_() if has_res else None
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        rm, rv = rm0.clone(), rv0.clone()
        y = batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, residual=res, relu=relu, backend=backend)
        y.backward(grad)
        results[backend] = [y, x.grad, w.grad, b.grad, rm, rv] + ([res.grad] if has_res else [])
    # against torch's float64 BatchNorm on the same inputs (not the reference backend with 10x its tolerance)
    want_y, wg, want_rm, want_rv = bn_truth(base_x, rm0, rv0, w0, b0, training, 0.1, 1e-5, residual=base_res,
                                           relu=relu, grad=grad)
    y, gx, gw, gb, rm, rv = results["cuda"][:6]
    assert_rel(y, want_y, msg="y")
    assert_rel(gx, wg["x"], ref=grad, msg="grad_x")
    assert_rel(gw, wg["weight"], msg="grad_weight")
    assert_rel(gb, wg["bias"], msg="grad_bias")
    assert_rel(rm, want_rm.float(), msg="running_mean")
    assert_rel(rv, want_rv.float(), msg="running_var")
    if has_res:
        assert_rel(results["cuda"][6], wg["residual"], msg="grad_residual")
    assert results["cuda"][0].stride() == base_x.stride()


@gpu
def test_bad_arguments_name_the_argument():
    k = torch.ops.fastnets_cuda
    x = torch.randn(2, 8, 4, 4, device="cuda")
    s = torch.ones(8, device="cuda")
    with pytest.raises(RuntimeError, match="x must be dense in channels_last"):
        k.bn_stats(x, True, 1e-5)
    with pytest.raises(RuntimeError, match="x must be dense in contiguous"):
        k.bn_stats(x.to(memory_format=torch.channels_last), False, 1e-5)
    with pytest.raises(RuntimeError, match="scale must be"):
        k.bn_apply(x, s.double(), s, None, 0, 0.0, False)
    with pytest.raises(RuntimeError, match=r"shift must have shape \(8,\)"):
        k.bn_apply(x, s, torch.ones(7, device="cuda"), None, 0, 0.0, False)
    with pytest.raises(RuntimeError, match="residual must have x's strides"):
        k.bn_apply(x, s, s, x.to(memory_format=torch.channels_last), 0, 0.0, False)
    with pytest.raises(RuntimeError, match="dy has dtype"):
        k.bn_backward_reduce(x.half(), x, None, None, None, None, s, 0, 0.0, False)
    with pytest.raises(RuntimeError, match="y .the forward output. is required"):
        k.bn_backward_apply(x, x, None, None, None, None, s, s, s, s, 1, 0.0, True, False, False)
    with pytest.raises(RuntimeError, match="mean is on"):
        k.bn_backward_reduce(x, x, None, None, None, None, s.cpu(), 0, 0.0, False)


def _free_gpu_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@gpu
@pytest.mark.slow
@each_layout
def test_apply_over_2_31_elements(channels_last):
    """bf16 x and residual with over 2^31 elements: int64 indexing, C=3 channel tracking past 2^31."""
    shape = (2, 3, 1024, 350211)  # 2^31 + 4212736 elements
    numel = 2 * 3 * 1024 * shape[3]
    assert numel > 2**31
    need = 3 * numel * 2 + (2 << 30)  # x, residual, y in bf16 + room for the chunked checks
    if _free_gpu_bytes() < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    x = _layout(torch.empty(shape, device="cuda", dtype=torch.bfloat16).normal_(), channels_last)
    res = _layout(torch.empty(shape, device="cuda", dtype=torch.bfloat16).normal_(), channels_last)
    x, cl = _tensors.dense_layout(x)
    scale = torch.tensor([0.5, 2.0, -1.0], device="cuda")
    shift = torch.tensor([1.0, -3.0, 0.25], device="cuda")
    y = _cuda().apply(x, scale, shift, res, True, cl)
    assert y.stride() == x.stride()
    # Check every element, in chunks along the last dim (channel structure kept, memory bounded).
    step = shape[3] // 16 + 1
    for lo in range(0, shape[3], step):
        sl = (slice(None), slice(None), slice(None), slice(lo, lo + step))
        want = ref.apply(x[sl], scale, shift, res[sl], True, cl)
        torch.testing.assert_close(y[sl], want, atol=6e-2, rtol=5e-2, msg=lambda m: f"chunk at {lo}: {m}")
    del y, res
    # The statistics over the same > 2^31 elements, against a chunked float64 computation.
    mean, invstd = _cuda().stats(x, cl, 1e-5)
    count = numel // 3
    tsum = torch.zeros(3, device="cuda", dtype=torch.float64)
    for lo in range(0, shape[3], step):
        tsum += x[..., lo:lo + step].double().sum((0, 2, 3))
    tmean = tsum / count
    tm2 = torch.zeros(3, device="cuda", dtype=torch.float64)
    for lo in range(0, shape[3], step):
        tm2 += ((x[..., lo:lo + step].double() - tmean.view(1, 3, 1, 1)) ** 2).sum((0, 2, 3))
    _close(mean, tmean, 1e-5, 0.0, "mean")
    _close(invstd, torch.rsqrt(tm2 / count + 1e-5), 0.0, 1e-4, "invstd")
