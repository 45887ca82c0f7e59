"""BatchNorm and fused BatchNorm + residual add + ReLU, every backend on this machine, against torch."""
import math

import pytest
import torch
from torch import nn

import fastnets
from fastnets.nn import BatchNorm1d, BatchNorm2d, BatchNormReLU2d
from fastnets.ops.batch_norm import batch_norm

from conftest import (DTYPES, GPU, assert_close, away_from_kink, assert_grads, assert_rel, backend_params, biting_grad, biting_input,
                      bn_truth, device_for, far_running_stats, randomize)

BACKENDS = backend_params("batch_norm")
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


def _step_and_check(ours, backend, x, res, mode, training, what, grad=None):
    """One forward+backward of `ours` (module or functional) against torch's F.batch_norm in float64 on the
    same rounded inputs and the same running statistics: output, every gradient, running_mean, running_var,
    num_batches_tracked."""
    relu, has_res = "relu" in mode, "residual" in mode
    rm0, rv0 = ours.running_mean.clone(), ours.running_var.clone()
    nbt0 = int(ours.num_batches_tracked)
    momentum = ours.momentum if ours.momentum is not None else 1.0 / (nbt0 + 1)
    want_y, _, want_rm, want_rv = bn_truth(x, rm0, rv0, ours.weight, ours.bias, training, momentum, ours.eps,
                                           residual=res, relu=relu)
    with fastnets.use_backend(backend):
        if mode == "residual":  # BN + add without ReLU: through the functional op
            y = batch_norm(x, ours.running_mean, ours.running_var, ours.weight, ours.bias, training,
                           momentum, ours.eps, residual=res)
            if training:
                ours.num_batches_tracked += 1
        elif mode == "bn":
            y = ours(x)
        else:
            y = ours(x, res) if has_res else ours(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.stride() == x.stride(), "output must keep the input's memory layout"
    assert_rel(y, want_y, msg=f"output, {what}")
    g = biting_grad(y, x) if grad is None else grad
    if relu:
        pre, _, _, _ = bn_truth(x, rm0, rv0, ours.weight, ours.bias, training, momentum, ours.eps, residual=res)
        g = away_from_kink(g, pre)
    leaves = {"x": x, "weight": ours.weight, "bias": ours.bias}
    if has_res:
        leaves["residual"] = res
    got = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), g)))
    _, want, _, _ = bn_truth(x, rm0, rv0, ours.weight, ours.bias, training, momentum, ours.eps,
                             residual=res, relu=relu, grad=g)
    # grad_x of a channel with few values can be ~0 in truth: also bounded relative to ||grad_out||
    assert_grads(got, want, refs={"x": g}, msg=what)
    assert_rel(ours.running_mean, want_rm.float(), msg=f"running_mean, {what}")
    assert_rel(ours.running_var, want_rv.float(), msg=f"running_var, {what}")
    assert int(ours.num_batches_tracked) == nbt0 + int(training)
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", MODES)
def test_matches_torch_float64_train_then_eval(backend, channels_last, dtype, shape, mode):
    """Channels with a large mean and a small spread, running statistics far from the batch's, an upstream
    gradient with a non-zero mean correlated with x: two training steps, then eval."""
    device = device_for(backend)
    c = shape[1]
    ours = BatchNorm2d(c) if mode == "bn" else BatchNormReLU2d(c)
    randomize(ours)
    ours.to(device)
    for step in range(3):
        training = step < 2
        ours.train(training)
        x = biting_input(shape, dtype, channels_last, device).requires_grad_()
        if step == 0:
            rm, rv = far_running_stats(x)
            with torch.no_grad():
                ours.running_mean.copy_(rm)
                ours.running_var.copy_(rv)
        res = _make(shape, dtype, channels_last, device, loc=0.5).requires_grad_() if "residual" in mode else None
        _step_and_check(ours, backend, x, res, mode, training, f"step {step}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "relu"])
def test_float64_matches_torch(backend, training, relu):
    """float64 end to end against torch's float64 BatchNorm (not gradcheck of a backend against its own
    finite differences): output, all four gradients and both running statistics to 1e-10."""
    device = device_for(backend)
    x = biting_input((3, 4, 3, 2), torch.float64, False, device).requires_grad_()
    res = torch.randn_like(x, requires_grad=True)
    w = (torch.rand(4, device=device, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, device=device, dtype=torch.float64, requires_grad=True)
    rm, rv = [t.double() for t in far_running_stats(x)]
    rm_ours, rv_ours = rm.clone(), rv.clone()
    y = batch_norm(x, rm_ours, rv_ours, w, b, training, 0.1, 1e-5, residual=res, relu=relu, backend=backend)
    g = biting_grad(y, x)
    got = dict(zip(["x", "weight", "bias", "residual"], torch.autograd.grad(y, (x, w, b, res), g)))
    want_y, want, want_rm, want_rv = bn_truth(x, rm, rv, w, b, training, 0.1, 1e-5, residual=res, relu=relu, grad=g)
    assert_rel(y, want_y)
    assert_grads(got, want, refs={"x": g})
    assert_rel(rm_ours, want_rm)
    assert_rel(rv_ours, want_rv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_small_std_is_exact(backend):
    """mean 1e3, std 1: E[x^2] - E[x]^2 in fp32 would lose the variance entirely."""
    device = device_for(backend)
    for channels_last in (False, True):
        x = _make((8, 4, 16, 16), torch.float32, channels_last, device, loc=1000.0)
        rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
        batch_norm(x, rm, rv, None, None, True, 1.0, 0.0, backend=backend)
        x64 = x.double()
        assert_rel(rv, x64.var(dim=(0, 2, 3), unbiased=True), scale=5.0)  # 1e-4: fp32 sums of 2048 values
        assert_rel(rm, x64.mean(dim=(0, 2, 3)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 1, 2500), (3, 2, 41, 50), (1, 1, 1, 2048)], ids=lambda s: "x".join(map(str, s)))
def test_statistics_of_planes_longer_than_a_tile(backend, shape):
    """NCHW planes of more than one 1024-element tile, the last one partial (2500 = 2 * 1024 + 452,
    2050 = 2 * 1024 + 2) or not: the Triton kernel's positions past the last tile's end take one value fewer
    per plane than the others, and its Welford weights and merge must count them so."""
    device = device_for(backend)
    x = _make(shape, torch.float32, False, device, loc=3.0, scale=2.0)
    c = shape[1]
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    batch_norm(x, rm, rv, None, None, True, 1.0, 0.0, backend=backend)
    x64 = x.double()
    assert_rel(rm, x64.mean(dim=(0, 2, 3)))
    assert_rel(rv, x64.var(dim=(0, 2, 3), unbiased=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_batchnorm1d_2d_and_3d_inputs(backend, ndim, layout):
    device = device_for(backend)
    shape = (9, 5) if ndim == 2 else (4, 5, 7)
    x = biting_input(shape, torch.float32, device=device)
    if layout == "transposed":
        if ndim == 2:
            pytest.skip("a 2-D (N, C) input has one dense layout")
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # (N, C, L) stored as (N, L, C)
    x.requires_grad_()
    ours = randomize(BatchNorm1d(5)).to(device)
    for step, training in enumerate((True, True, False)):
        ours.train(training)
        _step_and_check(ours, backend, x, None, "bn", training, f"{ndim}-D step {step}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [dict(momentum=None), dict(track_running_stats=False), dict(affine=False), dict(bias=False),
     dict(eps=1e-3, momentum=0.3), dict(momentum=1.0), dict(momentum=0.0)],
    ids=["momentum-none", "no-running-stats", "no-affine", "no-bias", "eps-momentum", "momentum-1", "momentum-0"],
)
def test_constructor_options(backend, kwargs):
    """Module options against torch's own module run in float64 (state loaded from ours): output, input
    gradient, every buffer (momentum=None is the cumulative average over num_batches_tracked)."""
    device = device_for(backend)
    try:
        ref = nn.BatchNorm2d(6, **kwargs)
    except TypeError:
        pytest.skip(f"this torch's BatchNorm2d has no {kwargs}")
    ours = BatchNorm2d(6, **kwargs)
    randomize(ours)
    if ours.running_mean is not None:
        with torch.no_grad():
            ours.running_mean.add_(3.0)
            ours.running_var.mul_(4.0)
    ref.load_state_dict(ours.state_dict())
    ref = ref.double()
    ours.to(device)
    with fastnets.use_backend(backend):
        for step in range(4):
            ref.train(step < 3)
            ours.train(step < 3)
            x = biting_input((3, 6, 4, 5), torch.float32, device=device).requires_grad_()
            y = ours(x)
            x64 = x.detach().double().cpu().requires_grad_()
            want = ref(x64)
            assert_rel(y, want, msg=f"output, step {step}")
            g = biting_grad(y, x)
            assert_rel(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(want, x64, g.double().cpu())[0],
                       ref=g, msg=f"grad x, step {step}")
            for (name, a), (_, b) in zip(ours.named_buffers(), ref.named_buffers()):
                if a.is_floating_point():
                    assert_rel(a, b.float(), msg=f"{name}, step {step}")
                else:
                    assert torch.equal(a.cpu(), b), name


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
@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "reference"])
@pytest.mark.parametrize("shape", [(64, 2048, 7, 7), (32, 64, 112, 112), (256, 256, 14, 14)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_shapes_gpu(backend, shape, channels_last):
    """Every output (y, grad_x, grad_weight, grad_bias, grad_residual, running stats) of a bf16 train step
    and an eval step at ResNet shapes, against float64 torch, with a biting upstream gradient."""
    ours = randomize(BatchNormReLU2d(shape[1])).cuda()
    for step, training in enumerate((True, False)):
        ours.train(training)
        x = biting_input(shape, torch.bfloat16, channels_last, "cuda").requires_grad_()
        if step == 0:
            rm, rv = far_running_stats(x)
            with torch.no_grad():
                ours.running_mean.copy_(rm)
                ours.running_var.copy_(rv)
        res = _make(shape, torch.bfloat16, channels_last, "cuda").requires_grad_()
        _step_and_check(ours, backend, x, res, "relu+residual", training, f"{shape} step {step}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_in_the_other_layout(backend):
    """A channels_last residual with an NCHW input (and the reverse) is handled, not refused."""
    device = device_for(backend)
    ours = randomize(BatchNormReLU2d(5)).to(device)
    for x_cl in (False, True):
        x = biting_input((3, 5, 4, 6), torch.float32, x_cl, device).requires_grad_()
        res = _make((3, 5, 4, 6), torch.float32, not x_cl, device).requires_grad_()
        _step_and_check(ours, backend, x, res, "relu+residual", True, f"x channels_last={x_cl}")


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
