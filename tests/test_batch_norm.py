"""BatchNorm and fused BatchNorm + residual add + ReLU, every backend on this machine, against torch."""
import math

import pytest
import torch
from torch import nn

import fastnets
from fastnets.nn import BatchNorm1d, BatchNorm2d, BatchNormReLU2d
from fastnets.ops.batch_norm import batch_norm

from conftest import DTYPES, GPU, assert_close, backends_here, device_for

BACKENDS = backends_here("batch_norm")
SHAPES = [(4, 3, 5, 7), (2, 70, 3, 1), (5, 16, 1, 1), (3, 33, 9, 11)]
MODES = ["bn", "relu", "relu+residual", "residual"]


def _make(shape, dtype, channels_last, device, loc=0.0, scale=1.0):
    x = torch.randn(shape, device=device) * scale + loc
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.to(dtype)


def _torch_bn(c, device):
    bn = nn.BatchNorm2d(c).to(device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def _eager(bn, x, residual, relu):
    """The eager chain the fused module replaces, in fp32 (x upcast): torch's BatchNorm2d, add, ReLU."""
    y = bn(x.float())
    if residual is not None:
        y = y + residual.float()
    return torch.relu(y) if relu else y


def _ours(c, mode):
    return BatchNorm2d(c) if mode == "bn" else (BatchNormReLU2d(c) if "relu" in mode else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", MODES)
def test_matches_eager_train_then_eval(backend, channels_last, dtype, shape, mode):
    device = device_for(backend)
    c = shape[1]
    relu, has_res = "relu" in mode, "residual" in mode
    ref = _torch_bn(c, device)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    ours = BatchNorm2d(c) if mode == "bn" else BatchNormReLU2d(c)
    ours.to(device).load_state_dict(state)
    params = (ours.weight, ours.bias)
    with fastnets.use_backend(backend):
        for step in range(3):  # several steps of running statistics, then eval
            training = step < 2
            ref.train(training)
            ours.train(training)
            x = _make(shape, dtype, channels_last, device, loc=step).requires_grad_()
            res = _make(shape, dtype, channels_last, device).requires_grad_() if has_res else None
            if mode == "residual":  # BN + add without ReLU: through the functional op
                y = batch_norm(x, ours.running_mean, ours.running_var, ours.weight, ours.bias, training,
                               ours.momentum, ours.eps, residual=res)
                if training:
                    ours.num_batches_tracked += 1
            elif mode == "bn":
                y = ours(x)
            else:
                y = ours(x, res) if has_res else ours(x)
            expected = _eager(ref, x, res, relu)
            assert y.dtype == dtype and y.shape == x.shape
            assert y.stride() == x.stride(), "output must keep the input's memory layout"
            assert_close(y, expected, dtype, msg=f"output, step {step}")
            grad = torch.randn_like(y)
            inputs = [x] + ([res] if has_res else [])
            got = torch.autograd.grad(y, inputs + list(params), grad)
            want = torch.autograd.grad(expected, inputs + [ref.weight, ref.bias], grad.float())
            for name, g1, g2 in zip(["x", "residual", "weight", "bias"][: len(inputs)] + ["weight", "bias"], got, want):
                # weight/bias grads are sums over N*H*W rounded products: scale the tolerance with the count
                scale = 1.0 if name in ("x", "residual") else max(1.0, math.sqrt(x.numel() / c))
                assert_close(g1, g2, dtype, scale=scale, msg=f"grad {name}, step {step}")
            assert_close(ours.running_mean, ref.running_mean, torch.float32, msg="running_mean")
            assert_close(ours.running_var, ref.running_var, torch.float32, msg="running_var")
            assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backends_agree_with_reference(backend, dtype):
    """Every backend against the reference backend in the same dtype, NCHW and channels_last."""
    device = device_for(backend)
    for channels_last in (False, True):
        x = _make((6, 19, 5, 3), dtype, channels_last, device, loc=2.0)
        res = _make((6, 19, 5, 3), dtype, channels_last, device)
        w = torch.rand(19, device=device) + 0.5
        b = torch.randn(19, device=device)
        outs = {}
        for name in ("reference", backend):
            rm, rv = torch.zeros(19, device=device), torch.ones(19, device=device)
            y = batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, residual=res, relu=True, backend=name)
            outs[name] = (y, rm, rv)
        for a, b_ in zip(outs[backend], outs["reference"]):
            assert_close(a, b_, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_small_std_is_exact(backend):
    """mean 1e3, std 1: E[x^2] - E[x]^2 in fp32 would lose the variance entirely."""
    device = device_for(backend)
    for channels_last in (False, True):
        x = _make((8, 4, 16, 16), torch.float32, channels_last, device, loc=1000.0)
        rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
        batch_norm(x, rm, rv, None, None, True, 1.0, 0.0, backend=backend)
        x64 = x.double()
        want_var = x64.var(dim=(0, 2, 3), unbiased=True)
        torch.testing.assert_close(rv.double(), want_var, rtol=1e-4, atol=0)
        torch.testing.assert_close(rm.double(), x64.mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_batchnorm1d_2d_and_3d_inputs(backend, ndim, layout):
    device = device_for(backend)
    shape = (9, 5) if ndim == 2 else (4, 5, 7)
    x = torch.randn(shape, device=device) * 3 + 1
    if layout == "transposed":
        if ndim == 2:
            pytest.skip("a 2-D (N, C) input has one dense layout")
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # (N, C, L) stored as (N, L, C)
    x.requires_grad_()
    ref = nn.BatchNorm1d(5).to(device)
    ours = BatchNorm1d(5).to(device)
    ours.load_state_dict(ref.state_dict())
    with fastnets.use_backend(backend):
        y = ours(x)
        assert y.stride() == x.stride()
        want = ref(x)
        assert_close(y, want, torch.float32)
        g = torch.randn_like(y)
        for a, b in zip(torch.autograd.grad(y, (x, ours.weight), g), torch.autograd.grad(want, (x, ref.weight), g)):
            assert_close(a, b, torch.float32)
    assert_close(ours.running_var, ref.running_var, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [dict(momentum=None), dict(track_running_stats=False), dict(affine=False), dict(bias=False), dict(eps=1e-3, momentum=0.3)],
    ids=["momentum-none", "no-running-stats", "no-affine", "no-bias", "eps-momentum"],
)
def test_constructor_options(backend, kwargs):
    device = device_for(backend)
    try:
        ref = nn.BatchNorm2d(6, **kwargs).to(device)
    except TypeError:
        pytest.skip(f"this torch's BatchNorm2d has no {kwargs}")
    ours = BatchNorm2d(6, **kwargs).to(device)
    ours.load_state_dict(ref.state_dict())
    with fastnets.use_backend(backend):
        for step in range(4):
            ref.train(step < 3)
            ours.train(step < 3)
            x = torch.randn(3, 6, 4, 5, device=device) + step
            assert_close(ours(x), ref(x), torch.float32, msg=f"step {step}")
            if ref.running_mean is not None:
                assert_close(ours.running_mean, ref.running_mean, torch.float32)
                assert_close(ours.running_var, ref.running_var, torch.float32)


def test_module_is_torchs_drop_in():
    ref = nn.BatchNorm2d(7, eps=1e-3, momentum=0.2)
    ours = BatchNorm2d(7, eps=1e-3, momentum=0.2)
    assert repr(ours) == repr(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert isinstance(ours, nn.BatchNorm2d)
    with torch.no_grad():
        ref.running_mean.normal_()
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours.running_mean, ref.running_mean)
    fused = BatchNormReLU2d(7)
    assert list(fused.state_dict()) == list(nn.BatchNorm2d(7).state_dict())
    fused.load_state_dict(nn.BatchNorm2d(7).state_dict())
    assert repr(fused).startswith("BatchNormReLU2d(7, eps=1e-05")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_like_torch(backend):
    device = device_for(backend)
    x = torch.randn(2, 3, 4, 4, device=device)
    x[0, 1, 2, 2] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    ref, ours = nn.BatchNorm2d(3).to(device), BatchNorm2d(3).to(device)
    with fastnets.use_backend(backend):
        y = ours(x)
        ours.eval()
        y_eval = ours(x)  # running statistics now hold NaN/Inf for channels 1 and 2, as torch's do
    want = ref(x)
    ref.eval()
    want_eval = ref(x)
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    assert torch.equal(torch.isnan(ours.running_var), torch.isnan(ref.running_var))
    assert torch.equal(torch.isnan(y_eval), torch.isnan(want_eval))
    assert torch.equal(torch.isinf(y_eval), torch.isinf(want_eval))
    # the fused ReLU keeps NaN as torch.relu does
    fused = BatchNormReLU2d(3).to(device).eval()
    with fastnets.use_backend(backend):
        assert torch.isnan(fused(x)[0, 1, 2, 2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "relu"])
def test_gradcheck_float64(backend, training, relu):
    device = device_for(backend)
    x = (torch.randn(3, 4, 3, 2, device=device, dtype=torch.float64) + 0.5).requires_grad_()
    res = torch.randn_like(x, requires_grad=True)
    w = (torch.rand(4, device=device, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, device=device, dtype=torch.float64, requires_grad=True)
    rm = torch.randn(4, device=device, dtype=torch.float64)
    rv = torch.rand(4, device=device, dtype=torch.float64) + 0.5

    def f(x, res, w, b):
        return batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, residual=res, relu=relu, backend=backend)

    assert torch.autograd.gradcheck(f, (x, res, w, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    device = device_for(backend)
    x = torch.randn(3, 5, 4, 3, device=device) + 1
    res = torch.randn_like(x)
    w, b = torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)
    rm, rv = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
    ops = torch.ops.fastnets
    for xx, rr in ((x, res), (x.to(memory_format=torch.channels_last), None)):
        xx = xx.clone().requires_grad_()
        torch.library.opcheck(ops.batch_norm_train, (xx, w, b, rr, True, 1e-5, backend))
        torch.library.opcheck(ops.batch_norm_eval, (xx, w, b, rr, rm, rv, rr is not None, 1e-5, backend))
        y, mean, invstd = ops.batch_norm_train(xx.detach(), w, b, rr, True, 1e-5, backend)
        torch.library.opcheck(
            ops.batch_norm_backward,
            (torch.randn_like(y), xx.detach(), y, w, mean, invstd, True, True, True, True, rr is not None, backend),
        )


def test_torch_compile_fullgraph():
    """A model with BatchNorm2d and BatchNormReLU2d traces with no graph break and matches eager."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = BatchNorm2d(8)
            self.bnrelu = BatchNormReLU2d(8)

        def forward(self, x):
            h = self.bn(self.conv(x))
            return self.bnrelu(h, residual=h)

    torch.manual_seed(0)
    eager = Block()
    compiled_model = Block()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with fastnets.use_backend("reference"):
        y1 = eager(x)
        y2 = compiled(x)
        assert_close(y2, y1, torch.float32)
        g1 = torch.autograd.grad(y1.sum(), x)[0]
        g2 = torch.autograd.grad(y2.sum(), x)[0]
    assert_close(g2, g1, torch.float32)
    assert_close(compiled_model.bn.running_var, eager.bn.running_var, torch.float32)
    assert compiled_model.bnrelu.num_batches_tracked.item() == 1


# ---------------------------------------------------------------- bad input


def _bad(fn, exc, *words):
    with pytest.raises(exc) as info:
        fn()
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


def test_bad_input_raises_clear_errors():
    bn = BatchNorm2d(4)
    _bad(lambda: bn(torch.randn(2, 4, 3)), ValueError, "input", "4-D")
    _bad(lambda: bn(torch.randn(2, 5, 3, 3)), ValueError, "5 channels", "num_features=4")
    _bad(lambda: bn(torch.randint(0, 5, (2, 4, 3, 3))), TypeError, "input", "int64")
    _bad(lambda: bn(torch.randn(2, 4, 3, 3, dtype=torch.complex64)), TypeError, "input", "complex64")
    _bad(lambda: bn(torch.randn(0, 4, 3, 3)), ValueError, "non-empty")
    _bad(lambda: bn(torch.randn(1, 4, 1, 1)), ValueError, "Expected more than 1 value per channel when training")
    bn.eval()
    assert bn(torch.randn(1, 4, 1, 1)).shape == (1, 4, 1, 1)  # one value per channel is fine in eval
    fused = BatchNormReLU2d(4)
    x = torch.randn(2, 4, 3, 3)
    _bad(lambda: fused(x, torch.randn(2, 4, 3, 2)), ValueError, "residual", "(2, 4, 3, 2)", "(2, 4, 3, 3)")
    _bad(lambda: fused(x, torch.randn(2, 4, 3, 3, dtype=torch.float64)), TypeError, "residual", "float64")
    _bad(lambda: batch_norm(x, torch.zeros(3), torch.ones(3), training=True), ValueError, "running_mean", "(4,)")
    _bad(lambda: batch_norm(x, None, None, weight=torch.ones(4, 1), training=True), ValueError, "weight")
    _bad(lambda: batch_norm(x, None, None, training=False), ValueError, "running_mean")
    _bad(lambda: batch_norm(x, None, None, training=True, backend="fast"), ValueError, "backend")
    _bad(lambda: fastnets.use_backend("gpu"), ValueError, "backend", "auto")
    _bad(lambda: batch_norm(x, None, None, training=True, backend="cuda"), fastnets.BackendUnavailableError, "cuda")


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_mixed_devices_rejected():
    x = torch.randn(2, 4, 3, 3, device="cuda")
    _bad(lambda: batch_norm(x, None, None, weight=torch.ones(4), training=True), ValueError, "weight", "cpu", "cuda")


def test_mixed_devices_rejected_on_meta():
    x = torch.randn(2, 4, 3, 3, device="meta")
    _bad(lambda: batch_norm(x, None, None, weight=torch.ones(4), training=True), ValueError, "weight", "cpu", "meta")


def test_backend_selection():
    assert "reference" in fastnets.available_backends("cpu")
    prev = fastnets.current_backend()
    with fastnets.use_backend("reference"):
        assert fastnets.current_backend() == "reference"
    assert fastnets.current_backend() == prev


# ---------------------------------------------------------------- GPU only: large shapes


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("shape", [(64, 2048, 7, 7), (32, 64, 112, 112), (256, 256, 14, 14)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_shapes_gpu(backend, shape, channels_last):
    x = _make(shape, torch.bfloat16, channels_last, "cuda", loc=1.0).requires_grad_()
    res = _make(shape, torch.bfloat16, channels_last, "cuda")
    ref = _torch_bn(shape[1], "cuda")
    ours = BatchNormReLU2d(shape[1]).cuda()
    ours.load_state_dict(ref.state_dict())
    with fastnets.use_backend(backend):
        y = ours(x, res)
    want = _eager(ref, x, res, True)
    assert_close(y, want, torch.bfloat16)
    g = torch.randn_like(y)
    with fastnets.use_backend(backend):
        gx = torch.autograd.grad(y, x, g)[0]
    assert_close(gx, torch.autograd.grad(want, x, g.float())[0], torch.bfloat16)
    assert_close(ours.running_var, ref.running_var, torch.float32)


@pytest.mark.slow
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_over_2_31_elements_gpu(backend):
    """int64 offsets: a bf16 tensor of 2^31 + 2^20 elements (4 GiB), train forward and backward."""
    numel = 2**31 + 2**20
    if torch.cuda.mem_get_info()[0] < 6 * numel * 2 + (1 << 30):
        pytest.skip("not enough free GPU memory for a 2^31-element test")
    c = 8
    x = torch.randn(numel // (c * 64), c, 8, 8, device="cuda", dtype=torch.bfloat16)
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    y = batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5, relu=True, backend=backend)
    tail = x[-4:].float()  # the last elements are the ones an int32 offset would miss
    want_tail = torch.relu((tail - rm.view(1, -1, 1, 1)) / torch.sqrt(rv.view(1, -1, 1, 1) * (x.numel() / c - 1) / (x.numel() / c) + 1e-5))
    assert_close(y[-4:], want_tail, torch.bfloat16)
    assert torch.allclose(rm, x.float().mean(dim=(0, 2, 3)), atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_in_the_other_layout(backend):
    """A channels_last residual with an NCHW input (and the reverse) is handled, not refused."""
    device = device_for(backend)
    ref = _torch_bn(5, device)
    ours = BatchNormReLU2d(5).to(device)
    ours.load_state_dict(ref.state_dict())
    for x_cl in (False, True):
        x = _make((3, 5, 4, 6), torch.float32, x_cl, device).requires_grad_()
        res = _make((3, 5, 4, 6), torch.float32, not x_cl, device).requires_grad_()
        with fastnets.use_backend(backend):
            y = ours(x, res)
        want = _eager(ref, x, res, True)
        assert y.stride() == x.stride()
        assert_close(y, want, torch.float32)
        g = torch.randn_like(y)
        for a, b in zip(torch.autograd.grad(y, (x, res), g), torch.autograd.grad(want, (x, res), g)):
            assert_close(a, b, torch.float32)


def test_info_and_env_selection(tmp_path):
    import subprocess
    import sys

    env = dict(__import__("os").environ, FASTNETS_BACKEND="reference")
    out = subprocess.run([sys.executable, "-m", "fastnets.info"], env=env, capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "selected backend: reference" in out
    for name in ("reference", "triton", "cuda"):
        assert f"  {name}" in out
    env["FASTNETS_BACKEND"] = "nonsense"
    bad = subprocess.run([sys.executable, "-c", "import fastnets"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "FASTNETS_BACKEND must be one of" in bad.stderr


def test_auto_skips_a_backend_that_fails_to_import(monkeypatch):
    """Under auto, a backend module that fails to import (an extension older than the op family) is skipped
    with a warning; asked for by name, it raises."""
    from fastnets import backends
    from fastnets.ops import _registry

    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: None)
    _registry.register_family("_test_broken", {"reference": ".reference.batch_norm", "cuda": ".no_such_module"})
    with pytest.warns(RuntimeWarning, match="falls back from its cuda backend"):
        mod = _registry.kernels("_test_broken", "auto", torch.device("cuda"))
    assert mod.__name__ == "fastnets.reference.batch_norm"
    with pytest.raises(ImportError):
        _registry.kernels("_test_broken", "cuda", torch.device("cuda"))
