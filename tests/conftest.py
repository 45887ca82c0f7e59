"""Shared test setup. On a machine without a GPU the Triton kernels run under the interpreter
(TRITON_INTERPRET=1 must be set before Triton kernels are defined, so before fastnets is imported)."""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The tests' tensors are tiny: OpenMP synchronisation dominates, and on a shared 2-core machine two
    # intra-op threads made the suite several times slower than one.
    torch.set_num_threads(1)
os.environ.setdefault("FASTNETS_POISON_OUTPUTS", "1")  # see fastnets._tensors.new_output
# Convolution tests use one fixed Triton tile configuration instead of autotuning every tiny shape.
os.environ.setdefault("FASTNETS_CONV_TUNE", "fixed")

import pytest  # noqa: E402

import fastnets  # noqa: E402
from fp32_flags import fp32_precision  # noqa: E402,F401  (re-exported for the test files)
import launch_checker  # noqa: E402

# Every Triton launch of the suite is checked against the GPU's launch limits and the device guard
# (tests/launch_checker.py): a launch that breaks one fails its test, under the interpreter too.
launch_checker.install()

# Tolerances per dtype, written down once: (atol, rtol) for outputs compared with torch/reference.
# fp16/bf16 outputs are rounded once by fastnets but several times by an eager chain of ops.
TOL = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (6e-2, 5e-2),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# The one error measure for comparisons against float64 ground truth: ||a - b|| / ||b|| (2-norm over all
# elements, computed in float64), with one bound per dtype OF THE RESULT, written once. A result stored in
# bf16 carries its rounding (unit roundoff 2^-9, rms about 2.3e-3 relative); an fp32 result (statistics,
# weight gradients of fp32 parameters) is held to fp32 accuracy whatever the activation dtype. Every bound
# is below 1e-2 so that a 1 % scale error in any output fails. Where the true value can be near zero (an
# input gradient with two values per channel is exactly 0), pass `ref=` (e.g. grad_out): the error may
# then also be bounded relative to ||ref||.
REL_BOUND = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,  # fp32 BatchNorm of a channel with |mean| / std ~ 500 loses eps32 * 500 = 6e-5
    torch.float16: 2e-3,
    torch.bfloat16: 8e-3,
}


# Elements per float64 chunk of rel_error: a 2^31-element tensor is compared without a float64 copy of the
# whole of it (128 MiB per temporary).
REL_CHUNK = 1 << 24


def _chunks(t, chunk):
    """`t` in views of about `chunk` elements along its first dimension of size > 1 (no copy)."""
    while t.dim() > 1 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 0:
        return [t.reshape(1)]
    rows = max(1, chunk // max(1, math.prod(t.shape[1:])))
    return [t[lo:lo + rows] for lo in range(0, t.shape[0], rows)] or [t]


def rel_error(actual, expected, chunk=None):
    """||actual - expected|| / ||expected|| in float64; inf when NaN/Inf positions or values, or shapes, differ.
    Computed where `expected` is (on a GPU for the GPU tests: nothing is copied to the host) and `chunk`
    elements at a time."""
    chunk = chunk or REL_CHUNK
    b = expected.detach()
    a = actual.detach().to(b.device)
    if a.shape != b.shape:
        return float("inf")
    diff2 = torch.zeros((), dtype=torch.float64, device=b.device)
    den2 = torch.zeros_like(diff2)
    for ac, bc in zip(_chunks(a, chunk), _chunks(b, chunk)):
        ac, bc = ac.to(torch.float64), bc.to(torch.float64)
        fa, fb = torch.isfinite(ac), torch.isfinite(bc)
        if not torch.equal(fa, fb) or not torch.equal(ac[~fa].nan_to_num(), bc[~fb].nan_to_num()):
            return float("inf")
        diff2 += torch.where(fa, ac - bc, 0.0).square().sum()
        den2 += torch.where(fb, bc, 0.0).square().sum()
    diff, den = diff2.sqrt().item(), den2.sqrt().item()
    return diff / den if den > 0 else diff


def norm64(t, chunk=None):
    """||t|| in float64, where t is, `chunk` elements at a time."""
    s = torch.zeros((), dtype=torch.float64, device=t.device)
    for c in _chunks(t.detach(), chunk or REL_CHUNK):
        s += c.to(torch.float64).square().sum()
    return s.sqrt().item()


def assert_rel(actual, expected, dtype=None, scale=1.0, ref=None, msg=""):
    """Fails when rel_error(actual, expected) exceeds the bound of `dtype` (default: actual's) x `scale`,
    unless `ref` is given and ||actual - expected|| <= bound x ||ref|| (true value near zero)."""
    bound = REL_BOUND[dtype or actual.dtype] * scale
    err = rel_error(actual, expected)
    if err <= bound:
        return err
    if ref is not None and err != float("inf"):
        den = norm64(expected)
        absolute = err * den if den > 0 else err
        if absolute <= bound * norm64(ref):
            return err
    raise AssertionError(f"{msg + ': ' if msg else ''}relative error {err:.3e} > bound {bound:.1e} "
                         f"({dtype or actual.dtype}{', also vs ||ref||' if ref is not None else ''})")

GPU = torch.cuda.is_available()


def tol(dtype):
    atol, rtol = TOL[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close(actual, expected, dtype=None, scale=1.0, msg=""):
    """torch.testing.assert_close with the tolerance of `dtype` (default: expected's), multiplied by `scale`."""
    atol, rtol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol * scale, rtol=rtol * scale, msg=msg or None)


def backends_here(family="batch_norm"):
    """The concrete backends to test on this machine: the reference always; Triton under the interpreter
    on CPU or on a GPU; the CUDA C++ extension on a GPU."""
    from fastnets.ops._registry import implemented

    device = "cuda" if GPU else "cpu"
    return [b for b in implemented(family) if b in fastnets.available_backends(device)]


# backend modules that only re-export another's primitives (ops/_cudnn_conv.py: the reference's F.conv2d,
# i.e. cuDNN on a GPU): the same code, tested once when deduplicating
_SAME_CODE = {".ops._cudnn_conv": ".reference.conv"}


def backend_params(family="batch_norm", exclude=(), dedupe=True):
    """Every backend the family implements, as pytest params: one that cannot run here is SKIPPED with the
    reason (never silently dropped from the collection, so a missing Triton shows in the summary)."""
    from fastnets import backends
    from fastnets.ops._registry import _MODULES, implemented

    device = "cuda" if GPU else "cpu"
    out, seen = [], set()
    for b in implemented(family):
        module = _MODULES[family][0][b]
        module = _SAME_CODE.get(module, module)
        if b in exclude or (dedupe and module in seen):
            continue  # conv's `cuda` entry is the reference's code (cuDNN): testing it twice compares torch with torch
        seen.add(module)
        why = backends.unavailable_reason(b, device)
        out.append(pytest.param(b, id=b, marks=[pytest.mark.skip(reason=f"{b} backend unavailable: {why}")] if why else []))
    return out


def device_for(backend):
    return "cuda" if GPU else "cpu"


def randomize(model, seed=1):
    """Non-trivial BatchNorm affine parameters and running statistics (zero/one inits would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                new = {"weight": torch.rand(c, generator=g) + 0.5, "bias": torch.randn(c, generator=g) * 0.2,
                       "running_mean": torch.randn(c, generator=g) * 0.1, "running_var": torch.rand(c, generator=g) + 0.5}
                for name, value in new.items():
                    t = getattr(m, name, None)
                    if t is not None:  # affine=False / bias=False / track_running_stats=False leave None
                        t.copy_(value)
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """Every test compares fp32 results as IEEE fp32: on a GPU torch's default lets cuDNN convolutions (and so
    fastnets' Triton convolution) round fp32 operands to TF32 (10 mantissa bits), which the fp32 bounds do not
    allow. tests/test_tf32.py turns TF32 on explicitly and holds it to TF32 bounds."""
    with fp32_precision("ieee", "ieee"):
        yield


def fp32_bound_dtype(dtype):
    """The dtype whose REL_BOUND holds an fp32 convolution's result: fp16's (TF32 operands have fp16's 10-bit
    mantissa) where TF32 is on for convolutions on a GPU, else `dtype` itself."""
    from fastnets._tensors import conv_allows_tf32

    if dtype == torch.float32 and GPU and conv_allows_tf32():
        return torch.float16
    return dtype


# ------------------------------------------------------------------------------------------------------
# Inputs under which every term of a formula matters, and float64 ground truth computed by torch itself.


def biting_input(shape, dtype, channels_last=False, device="cpu", big_mean=None):
    """Per-channel means and spreads that differ (one channel with a large mean and a small spread), so a
    statistic computed over the wrong axis, a missing mean subtraction or E[x^2]-E[x]^2 shows."""
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    loc = torch.linspace(-2.0, 3.0, c).view(view)
    spread = torch.linspace(0.5, 2.0, c).flip(0).view(view)
    if big_mean is None:
        big_mean = 100.0 if dtype in (torch.float32, torch.float64) else 16.0
    if c > 1:
        loc = loc.clone()
        loc.view(-1)[c // 2] = big_mean
    x = torch.randn(shape) * spread + loc
    x = x.to(device)
    if channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    return x.to(dtype)


def biting_grad(y, x=None, corr=0.7):
    """An upstream gradient with a non-zero per-channel mean and correlated with x: the backward's mean and
    projection terms are then O(1) (with a zero-mean random gradient they are O(1/sqrt(M)) and vanish)."""
    shape = y.shape
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    g = torch.randn(shape, device=y.device) * 0.5 + torch.linspace(0.3, -0.6, c, device=y.device).view(view)
    if x is not None and x.shape == y.shape:
        dims = [0] + list(range(2, x.dim()))
        xd = x.detach().double()
        xhat = (xd - xd.mean(dims, keepdim=True)) / (xd.std(dims, keepdim=True, unbiased=False) + 1e-3)
        g = g + corr * xhat.to(g.dtype)
    return g.to(y.dtype).contiguous(memory_format=torch.channels_last) if (
        y.dim() == 4 and not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last)
    ) else g.to(y.dtype)


def away_from_kink(grad, pre, kink=1e-3):
    """grad with zeros where the true pre-activation is within `kink` of ReLU's kink: there the derivative
    is undefined and a last-bit rounding difference may put the element on either side."""
    near = (pre.detach().abs() < kink).to(grad.device)
    return torch.where(near, torch.zeros((), dtype=grad.dtype, device=grad.device), grad)


def far_running_stats(x, seed=3):
    """Running statistics far from the batch's (a kernel that ignores or overwrites them fails)."""
    g = torch.Generator().manual_seed(seed)
    dims = [0] + list(range(2, x.dim()))
    c = x.shape[1]
    xd = x.detach().double()
    rm = (xd.mean(dims).cpu() + 3.0 + torch.rand(c, generator=g, dtype=torch.float64)).float()
    rv = (xd.var(dims).cpu() * 4.0 + 0.5 + torch.rand(c, generator=g, dtype=torch.float64)).float()
    return rm.to(x.device), rv.to(x.device)


def leaf64(t):
    return None if t is None else t.detach().to(torch.float64).requires_grad_(t.requires_grad)


def _leaves64(**tensors):
    """The given tensors (None left out) as float64 leaves that need gradients: the truth functions' inputs."""
    return {k: v.detach().double().requires_grad_() for k, v in tensors.items() if v is not None}


def _add_act_grads64(y, leaves, relu, grad):
    """(y [+ leaves["residual"]] [-> ReLU], {name: gradient of every leaf for `grad`}): the epilogue and the
    backward the truth functions share."""
    if "residual" in leaves:
        y = y + leaves["residual"]
    if relu:
        y = torch.relu(y)
    grads = {}
    if grad is not None:
        names = list(leaves)
        grads = dict(zip(names, torch.autograd.grad(y, [leaves[n] for n in names], grad.double())))
    return y.detach(), grads


def bn_truth(x, running_mean, running_var, weight, bias, training, momentum, eps, residual=None, relu=False,
             grad=None):
    """torch's own F.batch_norm (+ add + relu) in float64 on the same rounded inputs. Returns
    (y, {name: grad}, running_mean, running_var) with grads for x, weight, bias, residual (those given)."""
    import torch.nn.functional as F

    leaves = _leaves64(x=x, weight=weight, bias=bias, residual=residual)
    rm = None if running_mean is None else running_mean.detach().double().clone()
    rv = None if running_var is None else running_var.detach().double().clone()
    y = F.batch_norm(leaves["x"], rm, rv, leaves.get("weight"), leaves.get("bias"), training, momentum, eps)
    return _add_act_grads64(y, leaves, relu, grad) + (rm, rv)


def se_truth(x, w1, b1, w2, b2, residual=None, relu=False, grad=None):
    """The eager squeeze-excite block in float64 (torch's mean, conv/linear, ReLU, sigmoid)."""
    import torch.nn.functional as F

    leaves = _leaves64(x=x, w1=w1, b1=b1, w2=w2, b2=b2, residual=residual)
    p = leaves["x"].mean((2, 3))
    h = torch.relu(F.linear(p, leaves["w1"].flatten(1), leaves["b1"]))
    gate = torch.sigmoid(F.linear(h, leaves["w2"].flatten(1), leaves["b2"]))
    return _add_act_grads64(leaves["x"] * gate[:, :, None, None], leaves, relu, grad)


def assert_grads(got, want, refs=None, dtypes=None, scale=1.0, msg=""):
    """Every gradient in `want` must be in `got`, each within the bound of its own dtype (or dtypes[name]),
    with ||ref|| as the fallback scale where given (refs[name])."""
    assert set(got) == set(want), f"{msg}: gradients {sorted(got)} but expected {sorted(want)}"
    for name in want:
        g = got[name]
        assert g is not None, f"{msg}: no gradient for {name}"
        assert g.shape == want[name].shape, f"{msg}: grad {name} shape {tuple(g.shape)}"
        assert_rel(g, want[name], (dtypes or {}).get(name), scale=scale, ref=(refs or {}).get(name),
                   msg=f"{msg} grad {name}")


# ------------------------------------------------------------------------------------------------------
# hypothesis: a derandomized 'ci' profile (the default; a failure reproduces from the printed example and
# blob) and a larger randomized 'gpu' profile; pick with HYPOTHESIS_PROFILE=ci|gpu (HYPOTHESIS_SEED for gpu).
try:
    from hypothesis import HealthCheck, settings

    _quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True,
                              suppress_health_check=_quiet)
    settings.register_profile("gpu", derandomize=False, deadline=None, database=None, print_blob=True,
                              suppress_health_check=_quiet)
    HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    settings.load_profile(HYPOTHESIS_PROFILE)
except ImportError:  # the fuzz files importorskip hypothesis
    HYPOTHESIS_PROFILE = None

# examples per fuzz test, by profile and backend: the Triton interpreter costs ~50x the reference per example
FUZZ_EXAMPLES = {
    "ci": {"reference": 2000, "triton": 50, "cuda": 50},  # 200 Triton examples took 560 s on the shared 2-core CI machine
    "gpu": {"reference": 2000, "triton": 10000, "cuda": 10000},
}


def fuzz_examples(backend):
    return FUZZ_EXAMPLES.get(HYPOTHESIS_PROFILE or "ci", FUZZ_EXAMPLES["ci"])[backend]


def run_fuzz(cases, run_case, backend, examples=None):
    """run_case(case, backend) on hypothesis' draws from the strategy `cases`: `examples` of them, by default
    fuzz_examples(backend)."""
    from hypothesis import given, settings

    @settings(max_examples=examples or fuzz_examples(backend))
    @given(cases)
    def check(case):
        run_case(case, backend)

    check()


def pytest_report_header(config):
    seed = os.environ.get("HYPOTHESIS_SEED", "derandomized (seed from each test's name)")
    return f"fastnets: hypothesis profile {HYPOTHESIS_PROFILE}, seed {seed}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"


def in_layout(x, layout):
    """x laid out as "contiguous", "channels_last" (channels innermost, any rank >= 3) or "strided" (every
    other element of a twice-as-wide buffer: dense in no layout); the fuzz files share it."""
    if layout == "channels_last" and x.dim() >= 3:
        perm = [0] + list(range(2, x.dim())) + [1]
        inv = [perm.index(i) for i in range(x.dim())]
        return x.permute(perm).contiguous().permute(inv)
    if layout == "strided":
        wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        view = wide[..., ::2]
        view.copy_(x)
        return view
    return x


def check_bad_input_row(backend, row):
    """One row (name, fn(device), expected) of a bad-input catalogue on `backend`: expected is None (fn checks
    the output itself) or (exception type, message fragment)."""
    name, fn, expected = row
    device = device_for(backend)
    with fastnets.use_backend(backend):
        if expected is None:
            fn(device)
            return
        exc, fragment = expected
        with pytest.raises(exc) as info:
            fn(device)
    assert fragment in str(info.value), f"{name}: {fragment!r} not in {info.value}"


def bad_input_tests(rows, backends, min_rows=25):
    """The two tests every bad-input file has: each row of its catalogue on each backend, and the catalogue not
    shrinking below `min_rows`. Assign both at module level so pytest collects them."""

    @pytest.mark.parametrize("backend", backends)
    @pytest.mark.parametrize("row", rows, ids=[r[0] for r in rows])
    def test_bad_input(backend, row):
        check_bad_input_row(backend, row)

    def test_catalogue_size():
        assert len(rows) >= min_rows

    return test_bad_input, test_catalogue_size
