"""Convolution and fused Conv -> BatchNorm -> [add] -> [ReLU]: every backend on this machine, against torch.

Every comparison is conftest.assert_rel (||a - b|| / ||b||) against a float64 torch computation on the same
(rounded) inputs, with the bound of the result's dtype (fp32 on a GPU with TF32 allowed uses the fp16 bound:
TF32 keeps 10 mantissa bits, as fp16 does). Weights are scaled by 1/sqrt(fan_in) so outputs are O(1).
Under the Triton interpreter the shapes are small; the multi-tile tests run a small fixed tile (16x16x16)
so that M, N and K all span several tiles at C = 32, and on a GPU every curated autotune configuration runs
once."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnets
from fastnets.nn import Conv2d, ConvBNReLU2d, conv_bn_act
from fastnets.ops.conv import conv2d, conv2d_batch_norm

from conftest import (DTYPES, GPU, TOL, assert_rel, away_from_kink, backend_params, backends_here, biting_grad,
                      device_for, fp32_bound_dtype, randomize)

# conv's `cuda` entry is the reference module (cuDNN): only the BatchNorm-fused tests run it (its BN parts
# are the CUDA C++ kernels), the plain-convolution tests would compare F.conv2d with F.conv2d.
BACKENDS = backend_params("conv")
BN_BACKENDS = backend_params("conv", dedupe=False)


# name: (N, Cin, H, W, Cout, kernel, stride, padding, dilation, bias, grad_x)
CASES = {
    "c3_3x3": (2, 3, 7, 9, 8, 3, 1, 1, 1, True, True),
    "1x1": (2, 8, 5, 5, 16, 1, 1, 0, 1, False, True),
    "1x1_s2_odd": (2, 8, 7, 9, 8, 1, 2, 0, 1, False, True),
    "3x3_s2_odd": (2, 16, 7, 7, 8, 3, 2, 1, 1, False, True),
    "1x1_spatial_out": (2, 8, 3, 3, 8, 3, 1, 0, 1, True, True),
    "dilated": (2, 4, 9, 9, 8, 3, 1, 2, 2, False, True),
    "stem_7x7_s2": (2, 3, 11, 11, 8, 7, 2, 3, 1, False, False),
    "alexnet_11x11_s4": (1, 3, 15, 15, 8, 11, 4, 2, 1, True, False),
}
# The dtype x layout sweep runs on these (all cases run in float32, both layouts).
SWEEP = ["c3_3x3", "1x1_s2_odd", "3x3_s2_odd"]


def _bound_dtype(dtype):
    return fp32_bound_dtype(dtype)  # fp16's bound where TF32 is on (never inside conftest's IEEE fixture)


def _close(actual, expected, dtype=None, scale=1.0, msg="", ref=None):
    """assert_rel with the bound of `dtype` (default: actual's), TF32-aware."""
    return assert_rel(actual, expected, _bound_dtype(dtype or actual.dtype), scale=scale, ref=ref, msg=msg)


def _inputs(case, dtype, channels_last, device):
    n, cin, h, w, cout, k, s, p, d, bias, _ = CASES[case]
    x = torch.randn(n, cin, h, w, device=device)
    wt = torch.randn(cout, cin, k, k, device=device) / (cin * k * k) ** 0.5
    b = torch.randn(cout, device=device) * 0.5 if bias else None
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        wt = wt.to(memory_format=torch.channels_last)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(wt), cast(b), (s, p, d)


# The big-kernel stems are slow under the interpreter: their NCHW variant runs on the reference (and GPU) only.
SLOW_UNDER_INTERPRETER = {("stem_7x7_s2", False), ("alexnet_11x11_s4", False)}


def _params():
    out = []
    for case in CASES:
        for cl in (False, True):
            out.append((case, torch.float32, cl))
    for case in SWEEP:
        for dtype in DTYPES[1:]:
            for cl in (False, True):
                out.append((case, dtype, cl))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,dtype,channels_last", _params(), ids=lambda v: str(v).replace("torch.", ""))
def test_conv2d_matches_torch(backend, case, dtype, channels_last):
    if backend == "triton" and not GPU and (case, channels_last) in SLOW_UNDER_INTERPRETER:
        pytest.skip("slow under the Triton interpreter; the channels_last variant covers this shape")
    device = device_for(backend)
    x, w, b, (s, p, d) = _inputs(case, dtype, channels_last, device)
    grad_x = CASES[case][-1]
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None and (t is not x or grad_x)]
    y = conv2d(x, w, b, s, p, d, backend=backend)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b) if t is not None]
    xr, wr = ref_leaves[:2]
    br = ref_leaves[2] if b is not None else None
    yr = F.conv2d(xr, wr, br, s, p, d)
    assert y.shape == yr.shape
    _close(y, yr, dtype, msg=f"output {case}")

    g = biting_grad(y).to(dtype)
    grads = torch.autograd.grad(y, leaves, g)
    want = torch.autograd.grad(yr, [r for r, t in zip(ref_leaves, [x, w, b]) if t is not None and (t is not x or grad_x)],
                               g.double())
    for got, exp, name in zip(grads, want, ["x", "weight", "bias"] if grad_x else ["weight", "bias"]):
        assert got.dtype == dtype, name
        _close(got, exp, dtype, msg=f"grad {name} {case}")


EPILOGUE_PARAMS = [
    (torch.float32, False, True), (torch.float32, True, False), (torch.bfloat16, True, True), (torch.bfloat16, False, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,channels_last,relu", EPILOGUE_PARAMS, ids=lambda v: str(v).replace("torch.", ""))
def test_epilogue_forward_backward(backend, dtype, channels_last, relu):
    """y = relu((conv + bias) * scale + shift + residual): output and gradients of all six inputs."""
    device = device_for(backend)
    x, w, b, (s, p, d) = _inputs("c3_3x3", dtype, channels_last, device)
    cout = w.shape[0]
    scale = torch.rand(cout, device=device) + 0.5
    shift = torch.randn(cout, device=device) * 0.5
    res = torch.randn(2, cout, 7, 9, device=device).to(dtype)
    if channels_last:
        res = res.to(memory_format=torch.channels_last)
    ins = [t.requires_grad_() for t in (x, w, b, scale, shift, res)]
    y = conv2d(x, w, b, s, p, d, scale=scale, shift=shift, residual=res, relu=relu, backend=backend)
    refs = [t.detach().double().requires_grad_() for t in ins]
    xr, wr, br, scr, shr, rr = refs
    yr = (F.conv2d(xr, wr, br, s, p, d) * scr.view(1, -1, 1, 1) + shr.view(1, -1, 1, 1)) + rr
    if relu:
        yr = torch.relu(yr)
    _close(y, yr, dtype)
    g = biting_grad(y).to(dtype)
    # keep the gradient away from ReLU's kink: elements within rounding of 0 may flip in low precision
    if relu:
        g = away_from_kink(g, yr, 1e-2 if dtype != torch.float32 else 1e-3)
    got = torch.autograd.grad(y, ins, g)
    want = torch.autograd.grad(yr, refs, g.double())
    for gt, ex, name in zip(got, want, ["x", "weight", "bias", "scale", "shift", "residual"]):
        assert gt.dtype == {"scale": torch.float32, "shift": torch.float32}.get(name, dtype), name
        # scale/shift grads are fp32 sums of the low-precision conv output: that output's bound
        _close(gt, ex, dtype, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_training_statistics_are_exact_with_large_mean(backend, channels_last):
    """The epilogue's statistics merge per-tile (mean, M2) with Chan's formula: a channel mean of 1e3 with
    unit spread keeps its variance to float32 precision (E[x^2] - E[x]^2 in float32 would lose it all)."""
    device = device_for(backend)
    x, w, _, (s, p, d) = _inputs("1x1_s2_odd", torch.float32, channels_last, device)
    b = torch.full((w.shape[0],), 1000.0, device=device)
    z, mean, var = torch.ops.fastnets.conv2d_stats(x, w, b, [s, s], [p, p], [d, d], backend)
    zr = F.conv2d(x.double(), w.double(), b.double(), s, p, d)
    vr, mr = torch.var_mean(zr, dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(z.double(), zr, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(mean.double(), mr, atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(var.double(), vr, atol=1e-6, rtol=1e-3)


def _sequential(cin, cout, k, s, p, d, bias, device):
    seq = nn.Sequential(nn.Conv2d(cin, cout, k, s, p, d, bias=bias), nn.BatchNorm2d(cout), nn.ReLU()).to(device)
    with torch.no_grad():
        seq[1].weight.uniform_(0.5, 1.5)
        seq[1].bias.uniform_(-0.5, 0.5)
    return seq


def _fused_from(seq, cin, cout, k, s, p, d, bias, device):
    m = ConvBNReLU2d(cin, cout, k, stride=s, padding=p, dilation=d, bias=bias).to(device)
    state = {k.replace("0.", "conv.", 1).replace("1.", "bn.", 1): v.clone() for k, v in seq.state_dict().items()}
    m.load_state_dict(state)
    return m


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_conv_bn_relu_matches_sequential_train_and_eval(backend, channels_last, residual):
    """The fused block against torch's Conv2d -> BatchNorm2d -> [add] -> ReLU in float64 (same weights, same
    SGD steps): output, grad x, grad residual, every parameter gradient, every buffer after every step."""
    device = device_for(backend)
    cin, cout, k, s, p, d, bias = 3, 8, 3, 2, 1, 1, residual  # bias=True exercised with the residual
    seq = randomize(_sequential(cin, cout, k, s, p, d, bias, "cpu"))
    with torch.no_grad():
        seq[1].running_mean.add_(2.0)  # far from the batch's statistics
        seq[1].running_var.mul_(3.0)
    fused = _fused_from(seq, cin, cout, k, s, p, d, bias, device)
    seq = seq.double()
    assert list(fused.state_dict()) == [
        key.replace("0.", "conv.", 1).replace("1.", "bn.", 1) for key in seq.state_dict()
    ]
    opt_a = torch.optim.SGD(seq.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(fused.parameters(), lr=0.1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with fastnets.use_backend(backend):
        # several training steps (running statistics accumulate), then eval; fewer under the interpreter
        modes = ("train", "train", "eval") if backend == "triton" and not GPU else ("train",) * 3 + ("eval",) * 2
        for mode in modes:
            seq.train(mode == "train")
            fused.train(mode == "train")
            x = (torch.randn(2, cin, 9, 7) * 2 + 1).contiguous(memory_format=fmt)
            r = torch.randn(2, cout, 5, 4).contiguous(memory_format=fmt) if residual else None
            xa, xb = x.detach().double().requires_grad_(), x.detach().clone().to(device).requires_grad_()
            ra = rb = None
            if residual:
                ra, rb = r.double().requires_grad_(), r.clone().to(device).requires_grad_()
                pre = seq[1](seq[0](xa)) + ra
            else:
                pre = seq[1](seq[0](xa))
            ya = torch.relu(pre)
            yb = fused(xb, rb)
            _close(yb, ya, msg=mode)
            g = away_from_kink(biting_grad(yb), pre)
            opt_a.zero_grad()
            opt_b.zero_grad()
            ya.backward(g.double().cpu())
            yb.backward(g)
            _close(xb.grad, xa.grad, msg=f"grad x {mode}")
            if residual:
                _close(rb.grad, ra.grad, msg=f"grad residual {mode}")
            for (na, pa), (nb, pb) in zip(seq.named_parameters(), fused.named_parameters()):
                # a conv bias before a training BatchNorm has zero gradient: bounded by ||grad bn.bias||
                ref = seq[1].bias.grad if (nb == "conv.bias" and mode == "train") else None
                _close(pb.grad, pa.grad, ref=ref, msg=f"grad {nb} {mode}")
            opt_a.step()
            opt_b.step()
            for (na, ba), (nb, bb) in zip(seq.named_buffers(), fused.named_buffers()):
                if ba.is_floating_point():
                    _close(bb, ba, msg=f"{nb} after {mode}")
                else:
                    assert torch.equal(bb.cpu(), ba), nb
    assert int(fused.bn.num_batches_tracked) == modes.count("train")


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_conv_bn_relu_bfloat16_channels_last(backend):
    """bf16 activations and weights (fp32 BN statistics) against the float64 block on the same rounded
    weights and inputs."""
    device = device_for(backend)
    seq = randomize(_sequential(8, 16, 1, 1, 0, 1, False, "cpu")).to(torch.bfloat16)
    fused = _fused_from(seq, 8, 16, 1, 1, 0, 1, False, device).to(torch.bfloat16)
    seq = seq.double()
    x = torch.randn(2, 8, 5, 5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with fastnets.use_backend(backend):
        for train in (True, False):
            seq.train(train)
            fused.train(train)
            xa, xb = x.detach().double().requires_grad_(), x.detach().clone().to(device).requires_grad_()
            pre = seq[1](seq[0](xa))
            ya, yb = torch.relu(pre), fused(xb)
            assert yb.dtype == torch.bfloat16 and yb.is_contiguous(memory_format=torch.channels_last)
            _close(yb, ya)
            g = away_from_kink(biting_grad(yb), pre, 1e-2)
            ya.backward(g.double().cpu())
            yb.backward(g)
            _close(xb.grad, xa.grad)
            xa.grad = xb.grad = None
            for (n, pa), (_, pb) in zip(seq.named_parameters(), fused.named_parameters()):
                _close(pb.grad, pa.grad, msg=f"grad {n}")
                pa.grad = pb.grad = None
    _close(fused.bn.running_mean, seq[1].running_mean)
    _close(fused.bn.running_var, seq[1].running_var)


class _TorchvisionStyle(nn.Module):
    """The model zoo's shape: torchvision attribute names, conv_bn_act called on them."""

    def __init__(self, momentum=0.1, track=True, groups=1):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1, bias=False, groups=groups)
        self.bn1 = nn.BatchNorm2d(8, momentum=momentum, track_running_stats=track)

    def forward(self, x, residual=None):
        return conv_bn_act(self.conv1, self.bn1, x, residual=residual)


@pytest.mark.parametrize("kw", [{"momentum": None}, {"track": False}, {"groups": 2}], ids=["cumulative", "no-running", "grouped"])
def test_conv_bn_act_on_plain_torch_modules(kw):
    m = _TorchvisionStyle(**kw)
    ref = _TorchvisionStyle(**kw)
    ref.load_state_dict(m.state_dict())
    for train in (True, True, False):
        m.train(train)
        ref.train(train)
        x = torch.randn(2, 4, 6, 5) + 0.5
        with fastnets.use_backend("reference"):
            y = m(x)
        yr = torch.relu(ref.bn1(ref.conv1(x)))
        _close(y, yr, torch.float32)
    for (n, a), (_, b) in zip(m.named_buffers(), ref.named_buffers()):
        if a.is_floating_point():
            _close(a, b, msg=n)
        else:
            assert torch.equal(a, b), n


def test_conv2d_module_is_drop_in():
    for kw in ({}, {"padding": "same", "dilation": 2}, {"padding": "valid", "bias": False}, {"stride": (2, 1), "padding": (1, 0)},
               {"groups": 2}, {"padding_mode": "reflect", "padding": 1}, {"kernel_size": 2, "padding": "same"}):
        args = {"kernel_size": 3, **kw}
        torch.manual_seed(1)
        ref = nn.Conv2d(4, 6, **args)
        torch.manual_seed(1)
        ours = Conv2d(4, 6, **args)
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict())
        assert repr(ours).replace("Conv2d", "") == repr(ref).replace("Conv2d", "")
        x = torch.randn(2, 4, 7, 6)
        with fastnets.use_backend("reference"):
            _close(ours(x), ref(x), torch.float32, msg=str(kw))
            _close(ours(x[0]), ref(x[0]), torch.float32, msg=f"unbatched {kw}")


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="input has 5 channels.*weight"):
        conv2d(torch.randn(2, 5, 8, 8), w)
    with pytest.raises(ValueError, match="input must be (3-D .unbatched. or )?4-D"):
        conv2d(torch.randn(2, 3, 8, 8, 1), w)
    with pytest.raises(ValueError, match="weight must be 4-D"):
        conv2d(x, torch.randn(4, 3, 3))
    with pytest.raises(ValueError, match="kernel size.*larger than the padded input"):
        conv2d(torch.randn(2, 3, 2, 8), w)
    with pytest.raises(ValueError, match="input must be non-empty"):
        conv2d(torch.randn(0, 3, 8, 8), w)
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but input has dtype torch.float32"):
        conv2d(x, w.half())
    with pytest.raises(TypeError, match="bias has dtype"):
        conv2d(x, w, torch.randn(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias must have shape"):
        conv2d(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="weight is on meta but input is on cpu"):
        conv2d(x, w.to("meta"))
    with pytest.raises(ValueError, match="residual has shape"):
        conv2d(x, w, residual=torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        conv2d(x, w, stride=0)
    with pytest.raises(TypeError, match="input must be float16"):
        conv2d(x.long(), w)
    m = ConvBNReLU2d(3, 4, 3)
    with pytest.raises(ValueError, match="input has 4 channels.*weight"):
        m(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="input must be 3-D or 4-D"):
        m(torch.randn(8, 8))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        m(torch.randn(1, 3, 3, 3))
    with pytest.raises(ValueError, match="bn has num_features=5 but conv has out_channels=4"):
        conv_bn_act(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5), x)


def test_eval_fold_leaves_module_untouched():
    m = ConvBNReLU2d(3, 8, 3, padding=1).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 3, 6, 6)
    with fastnets.use_backend("reference"):
        y1 = m(x)
        with torch.no_grad():
            m.bn.running_var.mul_(4)  # a changed statistic is seen at once: no stale fold
        y2 = m(x)
    assert not torch.allclose(y1, y2)
    before["bn.running_var"].mul_(4)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------------------------- hybrid (auto)

@pytest.mark.skipif("triton" not in backends_here("conv"), reason="needs the Triton backend (GPU or interpreter)")
@pytest.mark.parametrize("winner", ["triton", "cudnn"])
def test_hybrid_runs_the_measured_winner(monkeypatch, winner):
    """`auto`'s measured policy (ops/_conv_auto.py): measured once per key, cached, and either winner gives the right answer (on the CPU
    the timer is replaced, so both branches run under the interpreter / the CPU reference)."""
    from fastnets.triton_kernels import conv as tri
    from fastnets.ops import _conv_auto as hy

    timed = []

    def fake_time(fn, reps=5):
        fn()
        timed.append(fn)
        return {"triton": 1.0, "cudnn": 2.0}[winner] if len(timed) % 2 else {"triton": 2.0, "cudnn": 1.0}[winner]

    monkeypatch.setattr(hy, "_time_ms", fake_time)
    monkeypatch.setattr(hy, "choices", {})
    calls = []
    real = tri.forward
    monkeypatch.setattr(tri, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    device = device_for("triton")
    x, w, b, (s, p, d) = _inputs("c3_3x3", torch.float32, True, device)
    sc, sh = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)
    res = torch.randn(2, 8, 7, 9, device=device).contiguous(memory_format=torch.channels_last)
    args = (x, w, b, sc, sh, res, [s, s], [p, p], [d, d], True)
    for _ in range(2):
        out = torch.empty(2, 8, 7, 9, device=device).contiguous(memory_format=torch.channels_last)
        y = hy.forward(*args, out)
        yr = torch.relu((F.conv2d(x, w, b, s, p, d) * sc.view(1, -1, 1, 1) + sh.view(1, -1, 1, 1)) + res)
        _close(y, yr, torch.float32)
        assert y.stride() == out.stride()
    assert len(timed) == 2, "measured once per key, then cached"
    assert list(hy.choices.values()) == [winner]
    assert len(calls) == 1 + (2 if winner == "triton" else 0)
    out = torch.empty(2, 8, 7, 9, device=device).contiguous(memory_format=torch.channels_last)
    z, mean, var = hy.forward_stats(x, w, b, [s, s], [p, p], [d, d], out)
    vr, mr = torch.var_mean(F.conv2d(x.double(), w.double(), b.double(), s, p, d), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), mr, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(var.double(), vr, atol=1e-4, rtol=1e-4)


def test_auto_on_a_gpu_is_the_measured_policy(monkeypatch):
    """The registry picks conv's registered `auto` policy on a CUDA device where Triton runs, the family's
    order where it does not, and never for a backend asked for by name."""
    from fastnets import backends
    from fastnets.ops import _conv_auto, _cudnn_conv, _registry
    from fastnets.reference import conv as ref

    cuda = torch.device("cuda")
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: None)
    assert _registry.kernels("conv", "auto", cuda) is _conv_auto
    assert _registry.kernels("conv", "cuda", cuda) is _cudnn_conv
    assert _registry.kernels("conv", "auto", "cpu") is ref
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: "no" if name == "triton" else None)
    assert _registry.kernels("conv", "auto", cuda) is ref
    assert _cudnn_conv.forward is ref.forward and _cudnn_conv.grad_weight is ref.grad_weight


@pytest.mark.skipif("triton" not in backends_here("conv"), reason="needs the Triton backend (GPU or interpreter)")
def test_hybrid_falls_back_to_cudnn_when_triton_fails(monkeypatch):
    from fastnets.triton_kernels import conv as tri
    from fastnets.ops import _conv_auto as hy

    def boom(*a, **k):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(hy, "_time_ms", lambda fn, reps=5: (fn(), 1.0)[1])
    monkeypatch.setattr(hy, "choices", {})
    monkeypatch.setattr(tri, "grad_weight", boom)
    device = device_for("triton")
    x, w, _, (s, p, d) = _inputs("1x1", torch.float32, False, device)
    g = torch.randn(2, 16, 5, 5, device=device)
    with pytest.warns(UserWarning, match="Triton kernel failed"):
        dw = hy.grad_weight(g, x, tuple(w.shape), [s, s], [p, p], [d, d])
    want = torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [p, p], [d, d], False, [0, 0], 1,
                                               [False, True, False])[1]
    torch.testing.assert_close(dw, want)
    assert list(hy.choices.values()) == ["cudnn"]


# ---------------------------------------------------------------------------- float64 against torch


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_float64_matches_torch(backend):
    """float64 end to end against torch's float64 F.conv2d / BatchNorm (not gradcheck of a backend against
    its own finite differences): the epilogue conv and the training Conv -> BN -> add -> ReLU block, every
    output and gradient to the float64 bound."""
    device = device_for(backend)
    f = dict(dtype=torch.float64, device=device)
    x = (torch.randn(2, 3, 5, 4, **f) + 0.5).requires_grad_()
    w = torch.randn(4, 3, 3, 3, **f, requires_grad=True)
    b = torch.randn(4, **f, requires_grad=True)
    sc = (torch.rand(4, **f) + 0.5).requires_grad_()
    sh = torch.randn(4, **f, requires_grad=True)
    r = torch.randn(2, 4, 3, 2, **f, requires_grad=True)
    with fastnets.use_backend(backend):
        y = conv2d(x, w, b, 2, 1, 1, scale=sc, shift=sh, residual=r, relu=True)
    pre = F.conv2d(x, w, b, 2, 1, 1) * sc.view(1, -1, 1, 1) + sh.view(1, -1, 1, 1) + r
    want = torch.relu(pre)
    _close(y, want)
    g = away_from_kink(biting_grad(y), pre, 1e-6)
    for name, a, e in zip("x w b scale shift residual".split(), torch.autograd.grad(y, (x, w, b, sc, sh, r), g),
                          torch.autograd.grad(want, (x, w, b, sc, sh, r), g)):
        _close(a, e, msg=f"grad {name}")

    gamma = (torch.rand(4, **f) + 0.5).requires_grad_()
    beta = torch.randn(4, **f, requires_grad=True)
    rm, rv = torch.randn(4, **f) + 2, torch.rand(4, **f) + 3
    rm_t, rv_t = rm.clone(), rv.clone()
    with fastnets.use_backend(backend):
        y = conv2d_batch_norm(x, w, None, rm, rv, gamma, beta, training=True, stride=2, padding=1, residual=r)
    pre = F.batch_norm(F.conv2d(x, w, None, 2, 1), rm_t, rv_t, gamma, beta, True, 0.1, 1e-5) + r
    want = torch.relu(pre)
    _close(y, want)
    _close(rm, rm_t, msg="running_mean")
    _close(rv, rv_t, msg="running_var")
    g = away_from_kink(biting_grad(y), pre, 1e-6)
    for name, a, e in zip("x w gamma beta residual".split(), torch.autograd.grad(y, (x, w, gamma, beta, r), g),
                          torch.autograd.grad(want, (x, w, gamma, beta, r), g)):
        _close(a, e, ref=g if name == "x" else None, msg=f"block grad {name}")


# ------------------------------------------------------------------------ several tiles in M, N and K

# (N, Cin, H, W, Cout, kernel, stride, padding, dilation): C_in and C_out of 32 or more, twice the 16-wide
# tile used below, so every launch has several N tiles and several K blocks per tap; M = N*OH*OW spans
# several 16-row tiles (and, for the 1x1 case with M > 1024, the weight gradient's split reduction runs).
MULTI_TILE = {  # name: (shape..., dtype, channels_last), one dtype/layout each (the interpreter is slow)
    "1x1_splitk": (2, 32, 23, 23, 32, 1, 1, 0, 1, torch.float32, True),
    "3x3_s2_p1": (2, 32, 7, 7, 33, 3, 2, 1, 1, torch.bfloat16, False),
    "3x3_dil2_p2": (1, 32, 6, 6, 32, 3, 1, 2, 2, torch.float32, False),
    "1x1_s2": (2, 33, 9, 9, 32, 1, 2, 0, 1, torch.bfloat16, True),
    "5x3_s21_p21": (1, 32, 7, 6, 32, (5, 3), (2, 1), (2, 1), 1, torch.float16, True),
}


@pytest.fixture
def small_tiles(monkeypatch):
    """A small fixed tile (16 x 16 x 16) for the Triton kernels: under the interpreter it replaces the
    interpreter's 32x16x16; with FASTNETS_CONV_TUNE=fixed on a GPU the fixed GPU configuration."""
    from fastnets.triton_kernels import conv as tri

    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
    monkeypatch.setattr(tri, "_INTERP_CONFIG", cfg)
    monkeypatch.setattr(tri, "_FIXED_GPU_CONFIG", cfg)
    monkeypatch.setenv("FASTNETS_CONV_TUNE", "fixed")
    return cfg


def _multi_tile_case(case, device, dtype=None, channels_last=None):
    n, cin, h, w, cout, k, s, p, d, dt, cl = MULTI_TILE[case]
    dtype = dt if dtype is None else dtype
    channels_last = cl if channels_last is None else channels_last
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, cin, h, w) + 0.3
    wt = torch.randn(cout, cin, kh, kw) / (cin * kh * kw) ** 0.5
    b = torch.randn(cout) * 0.5
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, wt = x.contiguous(memory_format=fmt), wt.contiguous(memory_format=fmt)
    return [t.to(device=device, dtype=dtype) for t in (x, wt, b)], (s, p, d)


def _check_conv_all(backend, x, w, b, conv, relu, what):
    """Forward with bias+scale+shift+residual(+relu), then every gradient, against float64 torch."""
    s, p, d = conv
    device = x.device
    cout = w.shape[0]
    sc = torch.rand(cout, device=device) + 0.5
    sh = torch.randn(cout, device=device)
    ins = [t.detach().requires_grad_() for t in (x, w, b, sc, sh)]
    refs = [t.detach().double().requires_grad_() for t in ins]
    z = F.conv2d(refs[0], refs[1], refs[2], s, p, d)
    res = torch.randn(z.shape, device=device).to(x.dtype).requires_grad_()
    rref = res.detach().double().requires_grad_()
    pre = z * refs[3].view(1, -1, 1, 1) + refs[4].view(1, -1, 1, 1) + rref
    want = torch.relu(pre) if relu else pre
    y = conv2d(ins[0], ins[1], ins[2], s, p, d, scale=ins[3], shift=ins[4], residual=res, relu=relu, backend=backend)
    _close(y, want, msg=f"output {what}")
    g = biting_grad(y)
    if relu:
        g = away_from_kink(g, pre, 1e-2 if x.dtype != torch.float32 else 1e-3)
    got = torch.autograd.grad(y, ins + [res], g)
    exp = torch.autograd.grad(want, refs + [rref], g.double())
    for name, a, e in zip("x weight bias scale shift residual".split(), got, exp):
        _close(a, e, x.dtype, msg=f"grad {name} {what}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(MULTI_TILE))
def test_several_tiles_in_m_n_and_k(backend, case, small_tiles):
    device = device_for(backend)
    (x, w, b), conv = _multi_tile_case(case, device)
    n, cin, h, wd, cout = MULTI_TILE[case][:5]
    assert cin >= 2 * small_tiles["BLOCK_K"] and cout >= 2 * small_tiles["BLOCK_N"]
    _check_conv_all(backend, x, w, b, conv, relu=case.startswith("3x3"), what=case)


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_training_statistics_across_tiles(backend, channels_last, small_tiles):
    """conv2d_stats merges (mean, M2) over many 16-row tiles with a short last tile (M = 2*9*7 = 126)."""
    device = device_for(backend)
    (x, w, b), (s, p, d) = _multi_tile_case("3x3_s2_p1", device, torch.float32, channels_last)
    x = x * 0.1 + 5.0  # large mean, small spread
    z, mean, var = torch.ops.fastnets.conv2d_stats(x, w, b, [s, s], [p, p], [d, d], backend)
    zr = F.conv2d(x.double(), w.double(), b.double(), s, p, d)
    vr, mr = torch.var_mean(zr, dim=(0, 2, 3), unbiased=False)
    _close(z, zr)
    _close(mean, mr)
    _close(var, vr, scale=5.0)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (autotune configurations)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("index", range(8))
def test_every_curated_config_matches_cudnn(index, dtype, monkeypatch):
    """Each curated autotune configuration (forward/dgrad list and weight-gradient list), forced on every
    launch, on shapes with C_in, C_out = 512 (twice the largest tile) and M of several large tiles, against
    float64 cuDNN: output and every gradient."""
    from fastnets.triton_kernels import conv as tri

    gemm = tri._GEMM_CONFIGS[index % len(tri._GEMM_CONFIGS)]
    wgrad = tri._WGRAD_CONFIGS[index % len(tri._WGRAD_CONFIGS)]
    real = tri._launch

    def forced(tuned, raw, grid, *args, **kwargs):
        if kwargs.get("FP64"):
            return real(tuned, raw, grid, *args, **kwargs)
        cfg = wgrad if raw is tri._conv_wgrad_kernel else gemm
        meta = dict(cfg.kwargs)
        raw[grid(meta)](*args, **kwargs, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return meta

    monkeypatch.setattr(tri, "_launch", forced)  # fp32 is IEEE here (conftest's _ieee_fp32)
    for n, cin, h, w, cout, k, s, p, d in [(2, 512, 24, 24, 512, 3, 1, 1, 1), (4, 512, 28, 28, 512, 1, 2, 0, 1)]:
        x = (torch.randn(n, cin, h, w, device="cuda") + 0.3).to(dtype).contiguous(memory_format=torch.channels_last)
        wt = (torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5).to(dtype)
        b = (torch.randn(cout, device="cuda") * 0.5).to(dtype)
        try:
            _check_conv_all("triton", x, wt, b, (s, p, d), relu=True, what=f"config {gemm} / {wgrad} {k}x{k}")
        except Exception as e:  # an fp32 config too large for shared memory is skipped by the autotuner too
            if "out of resource" in str(e).lower() or "OutOfResources" in type(e).__name__:
                pytest.skip(f"{gemm} does not fit in shared memory for {dtype}: {e}")
            raise
