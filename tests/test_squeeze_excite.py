"""Squeeze-and-excitation (+ residual add + ReLU), every backend on this machine, against the eager block:
pool, fc1 (1x1 conv), ReLU, fc2 (1x1 conv), sigmoid, multiply, add, ReLU."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnets
from fastnets.nn import SqueezeExcite
from fastnets.ops import se_excite, se_scale, se_squeeze, squeeze_excite

from conftest import (DTYPES, GPU, assert_grads, assert_rel, away_from_kink, backend_params, biting_grad,
                      backends_here, biting_input, device_for, se_truth)

se_ops = importlib.import_module("fastnets.ops.squeeze_excite")
BACKENDS = backend_params("squeeze_excite")

# (N, C, H, W, R, residual, relu, weights in the activation dtype rather than float32)
CASES = [
    (2, 3, 1, 1, 1, True, True, False),  # C=3, R=1, 1x1 spatial
    (2, 67, 3, 5, 4, False, False, True),  # C not a multiple of any block
    (3, 32, 4, 4, 2, True, False, False),
    (2, 16, 5, 3, 16, True, True, True),  # R = C
]


def _ids(case):
    n, c, h, w, r, res, relu, wm = case
    return f"{n}x{c}x{h}x{w}-r{r}" + ("-res" if res else "") + ("-relu" if relu else "") + ("-wmatch" if wm else "")


def _make(shape, dtype, channels_last, device, scale=1.0):
    x = torch.randn(shape, device=device) * scale
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.to(dtype)


def _weights(c, r, dtype, device):
    w1 = torch.randn(r, c, 1, 1, device=device) / c**0.5
    b1 = torch.randn(r, device=device) * 0.5
    w2 = torch.randn(c, r, 1, 1, device=device) / r**0.5
    b2 = torch.randn(c, device=device) * 0.5
    return [t.to(dtype) for t in (w1, b1, w2, b2)]


def eager_block(x, w1, b1, w2, b2, residual=None, relu=False):
    """The eager SE block the fused op replaces."""
    p = x.mean((2, 3), keepdim=True)
    h = torch.relu(F.conv2d(p, w1, b1))
    g = torch.sigmoid(F.conv2d(h, w2, b2))
    y = x * g
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def _leaf(t):
    return t.detach().clone().requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_block_matches_eager(backend, channels_last, dtype, case):
    n, c, h, w, r, has_res, relu, wmatch = case
    device = device_for(backend)
    wdtype = dtype if wmatch else torch.float32
    x = biting_input((n, c, h, w), dtype, channels_last, device, big_mean=4.0)
    res = _make((n, c, h, w), dtype, channels_last, device) if has_res else None
    ws = _weights(c, r, wdtype, device)
    ins = [_leaf(x)] + [_leaf(t) for t in ws] + ([_leaf(res)] if has_res else [])
    y = squeeze_excite(*ins[:5], residual=ins[5] if has_res else None, relu=relu, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    _check_against_truth(y, ins, has_res, relu)


def _check_against_truth(y, ins, has_res, relu, msg=""):
    """Output and every gradient (x, w1, b1, w2, b2, residual) against the eager block in float64 on the
    same rounded inputs, with an upstream gradient correlated with x and of non-zero mean."""
    res = ins[5] if has_res else None
    pre, _ = se_truth(*ins[:5], residual=res)
    want, _ = se_truth(*ins[:5], residual=res, relu=relu)
    assert_rel(y, want, msg=f"{msg} output")
    dy = biting_grad(y, ins[0])
    if relu:
        dy = away_from_kink(dy, pre, 1e-2 if y.dtype != torch.float32 else 1e-4)
    names = ["x", "w1", "b1", "w2", "b2", "residual"][: len(ins)]
    got = dict(zip(names, torch.autograd.grad(y, ins, dy)))
    for name, t in zip(names, ins):
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
    _, want_grads = se_truth(*ins[:5], residual=res, relu=relu, grad=dy)
    assert_grads(got, want_grads, msg=msg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_three_stage_ops_match_torch(backend, channels_last):
    device = device_for(backend)
    x = _leaf(_make((3, 10, 4, 3), torch.float32, channels_last, device))
    w1, b1, w2, b2 = [_leaf(t) for t in _weights(10, 3, torch.float32, device)]
    res = _leaf(_make((3, 10, 4, 3), torch.float32, channels_last, device))
    pooled = se_squeeze(x, backend=backend)
    hidden, gate = se_excite(pooled, w1, b1, w2, b2, backend=backend)
    y = se_scale(x, gate, residual=res, relu=True, backend=backend)

    xr, w1r, b1r, w2r, b2r, resr = [_leaf(t.double()) for t in (x, w1, b1, w2, b2, res)]
    pr = xr.mean((2, 3))
    hr = torch.relu(F.linear(pr, w1r.flatten(1), b1r))
    gr = torch.sigmoid(F.linear(hr, w2r.flatten(1), b2r))
    yr = torch.relu(xr * gr[:, :, None, None] + resr)
    for name, a, b in (("pooled", pooled, pr), ("hidden", hidden, hr), ("gate", gate, gr), ("y", y, yr)):
        assert_rel(a, b, msg=name)
    gy, gh = biting_grad(y, x), biting_grad(hidden) + 0.2
    ga = torch.autograd.grad((y * gy).sum() + (hidden * gh).sum(), [x, w1, b1, w2, b2, res])
    gb = torch.autograd.grad((yr * gy.double()).sum() + (hr * gh.double()).sum(), [xr, w1r, b1r, w2r, b2r, resr])
    for name, a, b in zip("x w1 b1 w2 b2 residual".split(), ga, gb):
        assert_rel(a, b, msg=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [False, True])
def test_float64_matches_torch(backend, channels_last, relu):
    """float64 end to end against the float64 eager block (not gradcheck against the backend's own finite
    differences): output and all six gradients to the float64 bound."""
    device = device_for(backend)
    n, c, h, w, r = 2, 5, 3, 2, 2
    x = _leaf(biting_input((n, c, h, w), torch.float64, channels_last, device, big_mean=4.0))
    res = _leaf(_make((n, c, h, w), torch.float64, channels_last, device))
    ws = [_leaf(t) for t in _weights(c, r, torch.float64, device)]
    y = squeeze_excite(x, *ws, residual=res, relu=relu, backend=backend)
    _check_against_truth(y, [x] + ws + [res], True, relu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_split_reductions_and_excite_blocks(backend):
    """The reductions split over space (partial sums, then a sum) and the Triton excite kernel's sample
    blocks, forced on small shapes."""
    if backend == "reference":
        pytest.skip("the reference has no tiling")
    k = importlib.import_module(f"fastnets.{'triton' if backend == 'triton' else 'cuda'}_kernels.squeeze_excite")
    ref = importlib.import_module("fastnets.reference.squeeze_excite")
    device = device_for(backend)
    for cl in (False, True):
        x = _make((3, 37, 7, 9), torch.bfloat16, cl, device)
        dy = _make((3, 37, 7, 9), torch.bfloat16, cl, device)
        y = _make((3, 37, 7, 9), torch.bfloat16, cl, device)
        for split in (1, 2, 5):
            torch.testing.assert_close(k.pool(x, cl, split=split), ref.pool(x, cl), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                k.backward_reduce(dy, x, y, True, cl, split=split), ref.backward_reduce(dy, x, y, True, cl),
                atol=1e-4, rtol=1e-4,
            )
    p = torch.randn(13, 70, device=device)
    w1, b1, w2, b2 = [t.flatten(1) if t.dim() == 4 else t for t in _weights(70, 37, torch.bfloat16, device)]
    h_ref, g_ref = ref.excite(p, w1, b1, w2, b2)
    for bn in (1, 4, 8) if backend == "triton" else (None,):
        h, g = k.excite(p, w1, b1, w2, b2, block_n=bn) if bn else k.excite(p, w1, b1, w2, b2)
        torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_kernels_are_the_ones_run(backend, monkeypatch):
    """The requested backend's primitives run (no silent fallback to the reference)."""
    from fastnets.ops._registry import kernels

    device = device_for(backend)
    mod = kernels("squeeze_excite", backend, device)
    expected = {"reference": "reference", "triton": "triton_kernels", "cuda": "cuda_kernels"}[backend]
    assert mod.__name__ == f"fastnets.{expected}.squeeze_excite"
    calls = []
    for name in ("pool", "excite", "scale", "backward_reduce", "backward_apply"):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _n=name, **kw: calls.append(_n) or _fn(*a, **kw))
    x = _leaf(_make((2, 8, 3, 3), torch.float32, False, device))
    ws = _weights(8, 2, torch.float32, device)
    squeeze_excite(x, *ws, relu=True, backend=backend).sum().backward()
    assert calls == ["pool", "excite", "scale", "backward_reduce", "backward_apply"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_unaligned_storage_and_vector_tails(backend, dtype):
    """Tensors whose data starts 2 bytes past an alignment boundary (the CUDA kernels' scalar fallback) and
    element counts that are and are not a multiple of the 16-byte vector width."""
    device = device_for(backend)
    for shape in [(2, 16, 4, 4), (2, 13, 3, 5)]:
        numel = 1
        for d in shape:
            numel *= d
        x = torch.randn(numel + 1, device=device).to(dtype)[1:].view(shape)
        res = torch.randn(numel + 1, device=device).to(dtype)[1:].view(shape)
        ws = _weights(shape[1], 3, torch.float32, device)
        ins = [_leaf(x), _leaf(res)] + [_leaf(t) for t in ws]
        y = squeeze_excite(ins[0], *ins[2:], residual=ins[1], relu=True, backend=backend)
        _check_against_truth(y, [ins[0]] + ins[2:] + [ins[1]], True, True, msg=str(shape))


def test_saves_no_more_than_eager():
    x = _leaf(torch.randn(4, 32, 8, 8))
    res = _leaf(torch.randn(4, 32, 8, 8))
    ws = [_leaf(t) for t in _weights(32, 2, torch.float32, "cpu")]

    def saved_bytes(fn):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(total)

    for relu in (False, True):
        ours = saved_bytes(lambda: squeeze_excite(x, *ws, residual=res, relu=relu, backend="reference"))
        eager = saved_bytes(lambda: eager_block(x, *ws, residual=res, relu=relu))
        assert ours <= eager, (relu, ours, eager)


# ----------------------------------------------------------------------------------------------------------
# nn.SqueezeExcite


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_loads_torchvision_state_dict(backend):
    torchvision = pytest.importorskip("torchvision")
    device = device_for(backend)
    tv = torchvision.ops.SqueezeExcitation(24, 6).to(device)
    ours = SqueezeExcite(24, 6).to(device)
    assert set(ours.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 24, 5, 6, device=device)
    with fastnets.use_backend(backend):
        torch.testing.assert_close(ours(x), tv(x), atol=1e-5, rtol=1e-5)
        res = torch.randn_like(x)
        torch.testing.assert_close(ours(x, res, relu=True), torch.relu(tv(x) + res), atol=1e-5, rtol=1e-5)


def test_module_loads_timm_se_weights():
    timm = pytest.importorskip("timm")
    from timm.layers import SEModule

    se = SEModule(64, rd_channels=4)
    ours = SqueezeExcite(64, 4)
    ours.load_state_dict(se.state_dict())
    x = torch.randn(2, 64, 5, 5)
    torch.testing.assert_close(ours(x), se(x), atol=1e-5, rtol=1e-5)


def test_module_autocast_style_weights():
    """float32 parameters with bfloat16 activations (as under autocast): gradients land in float32."""
    m = SqueezeExcite(16, 4)
    x = _leaf(torch.randn(2, 16, 3, 3).to(torch.bfloat16))
    y = m(x, relu=True)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.fc1.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    # real autocast (fp32 input through a conv): tests/test_compile_opcheck.py


def test_module_constructor_and_repr():
    m = SqueezeExcite(2048, 128)
    assert m.fc1.weight.shape == (128, 2048, 1, 1) and m.fc2.weight.shape == (2048, 128, 1, 1)
    assert "channels=2048, reduced_channels=128" in repr(m)
    with pytest.raises(ValueError, match="reduced_channels"):
        SqueezeExcite(8, 0)


# ----------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_clear_errors():
    m = SqueezeExcite(8, 2)
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match="input has 6 channels.*channels=8"):
        m(torch.randn(2, 6, 4, 4))
    with pytest.raises(ValueError, match="input must be 4-D"):
        m(torch.randn(2, 8, 4))
    with pytest.raises(TypeError, match="input must be float16"):
        m(torch.ones(2, 8, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="residual has shape"):
        m(x, residual=torch.randn(2, 8, 4, 5))
    with pytest.raises(TypeError, match="residual has dtype"):
        m(x, residual=torch.randn(2, 8, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="residual is on meta"):
        m(x, residual=torch.randn(2, 8, 4, 4, device="meta"))
    w1, b1, w2, b2 = _weights(8, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="input has 7 channels"):
        squeeze_excite(torch.randn(2, 7, 4, 4), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="w2"):
        squeeze_excite(x, w1, b1, w2[:, :1], b2)
    with pytest.raises(ValueError, match="b1"):
        squeeze_excite(x, w1, b2, w2, b2)
    with pytest.raises(ValueError, match="w1 .*1x1 conv"):
        squeeze_excite(x, torch.randn(2, 8, 3, 3), b1, w2, b2)
    with pytest.raises(TypeError, match="weights are torch.float16 but input is torch.float32"):
        squeeze_excite(x, *(t.half() for t in (w1, b1, w2, b2)))
    with pytest.raises(TypeError, match="share one dtype"):
        squeeze_excite(x, w1, b1.double(), w2, b2)
    with pytest.raises(ValueError, match="non-empty"):
        squeeze_excite(torch.randn(0, 8, 4, 4), w1, b1, w2, b2)
    with pytest.raises(TypeError, match="float64 pooled needs float64 weights"):
        se_excite(torch.rand(2, 8, dtype=torch.float64), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="gate must have shape"):
        se_scale(x, torch.rand(2, 7))
    with pytest.raises(ValueError, match="fastnets backend must be one of"):
        squeeze_excite(x, w1, b1, w2, b2, backend="nope")
    if not GPU:
        with pytest.raises(fastnets.BackendUnavailableError):
            squeeze_excite(x, w1, b1, w2, b2, backend="cuda")


def test_nan_propagates_like_torch():
    x = torch.randn(2, 4, 3, 3)
    x[0, 1, 0, 0] = float("nan")
    ws = _weights(4, 2, torch.float32, "cpu")
    for backend in backends_here("squeeze_excite"):
        y = squeeze_excite(x.to(device_for(backend)), *(t.to(device_for(backend)) for t in ws), relu=True, backend=backend)
        y_ref = eager_block(x, *ws, relu=True)
        assert torch.equal(torch.isnan(y.cpu()), torch.isnan(y_ref)), backend


# ----------------------------------------------------------------------------------------------------------
# The compiled extension (no GPU needed to check that the ops are registered)

CUDA_SCHEMAS = {  # internal ops of the cuda backend: their own namespace, apart from the user ops
    "se_reduce": "fastnets_cuda::se_reduce(Tensor x, Tensor? dy, Tensor? y, Tensor(a!) out, "
    "bool channels_last, bool relu, bool mean) -> ()",
    "se_excite": "fastnets_cuda::se_excite(Tensor pooled, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
    "Tensor(a!) hidden, Tensor(b!) gate, int inner_act=1, float inner_param=0., int gate=0) -> ()",
    "se_apply": "fastnets_cuda::se_apply(Tensor src, Tensor gate, Tensor? aux, Tensor? gp, Tensor(a!) out, "
    "Tensor(b!)? g_out, bool channels_last, bool grad, bool relu) -> ()",
}


def test_extension_registers_squeeze_excite_ops():
    from fastnets import _extension

    if not _extension.is_loaded():
        pytest.skip(f"the compiled extension is not loaded here: {_extension.reason()}")
    for name, schema in CUDA_SCHEMAS.items():
        assert hasattr(torch.ops.fastnets_cuda, name), (
            f"torch.ops.fastnets_cuda.{name} is not registered: fastnets._C was built without csrc/squeeze_excite.cu; "
            "rebuild with `pip install --no-build-isolation -e .`"
        )
        assert str(getattr(torch.ops.fastnets_cuda, name).default._schema) == schema
