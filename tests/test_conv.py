"""Convolution and fused Conv -> BatchNorm -> [add] -> [ReLU]: every backend on this machine, against torch.

Tolerances: outputs and gradients are compared with a float64 torch computation on the same (rounded)
inputs, with conftest.TOL of the input dtype (fp32 on a GPU with TF32 allowed uses the fp16 tolerance:
TF32 keeps 10 mantissa bits, as fp16 does). Weights are scaled by 1/sqrt(fan_in) so outputs are O(1).
Under the Triton interpreter the shapes are tiny (N <= 2, C <= 16, H, W <= 15)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnets
from fastnets.nn import Conv2d, ConvBNReLU2d, conv_bn_act
from fastnets.ops.conv import conv2d, conv2d_batch_norm

from conftest import DTYPES, GPU, TOL, backends_here, device_for

BACKENDS = backends_here("conv")


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


def _tol(dtype, scale=1.0):
    if dtype == torch.float32 and GPU and torch.backends.cudnn.allow_tf32:
        dtype = torch.float16
    atol, rtol = TOL[dtype]
    return {"atol": atol * scale, "rtol": rtol * scale}


def _close(actual, expected, dtype, scale=1.0, msg=""):
    torch.testing.assert_close(actual.double(), expected.double(), **_tol(dtype, scale), msg=msg or None)


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

    g = torch.randn_like(yr)
    grads = torch.autograd.grad(y, leaves, g.to(dtype))
    want = torch.autograd.grad(yr, [r for r, t in zip(ref_leaves, [x, w, b]) if t is not None and (t is not x or grad_x)], g)
    for got, exp, name in zip(grads, want, ["x", "weight", "bias"] if grad_x else ["weight", "bias"]):
        assert torch.isfinite(got).all(), name
        # gradients sum over N*OH*OW (weight, bias) or KH*KW*Cout (input) products: compare at their scale
        _close(got / exp.abs().max(), exp / exp.abs().max(), dtype, scale=2.0, msg=f"grad {name} {case}")


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
    g = torch.randn_like(yr)
    # keep the gradient away from ReLU's kink: elements within rounding of 0 may flip in low precision
    if relu:
        g = torch.where(yr.abs() < 0.1, torch.zeros_like(g), g)
    got = torch.autograd.grad(y, ins, g.to(dtype))
    want = torch.autograd.grad(yr, refs, g)
    for gt, ex, name in zip(got, want, ["x", "weight", "bias", "scale", "shift", "residual"]):
        assert gt.dtype == {"scale": torch.float32, "shift": torch.float32}.get(name, dtype), name
        _close(gt / ex.abs().max(), ex / ex.abs().max(), dtype, scale=2.0, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    device = device_for(backend)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    sc = (torch.rand(4, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    sh = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    r = torch.randn(2, 4, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    fast = backend != "reference"  # the interpreter is slow: random-projection gradcheck

    def f(x, w, b, sc, sh, r):
        return conv2d(x, w, b, 2, 1, 1, scale=sc, shift=sh, residual=r, relu=True, backend=backend)

    assert torch.autograd.gradcheck(f, (x, w, b, sc, sh, r), fast_mode=fast)

    gamma = (torch.rand(4, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    beta = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)

    def block(x, w, gamma, beta, r):  # training Conv -> BN (batch statistics) -> add -> ReLU
        return conv2d_batch_norm(x, w, None, None, None, gamma, beta, training=True, stride=2, padding=1,
                                 residual=r, relu=True, backend=backend)

    assert torch.autograd.gradcheck(block, (x, w, gamma, beta, r), fast_mode=fast)


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_conv_bn_relu_matches_sequential_train_and_eval(backend, channels_last, residual):
    device = device_for(backend)
    cin, cout, k, s, p, d, bias = 3, 8, 3, 2, 1, 1, residual  # bias=True exercised with the residual
    seq = _sequential(cin, cout, k, s, p, d, bias, device)
    fused = _fused_from(seq, cin, cout, k, s, p, d, bias, device)
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
            x = (torch.randn(2, cin, 9, 7, device=device) * 2 + 1).contiguous(memory_format=fmt)
            r = torch.randn(2, cout, 5, 4, device=device).contiguous(memory_format=fmt) if residual else None
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ra = rb = None
            if residual:
                ra, rb = r.clone().requires_grad_(), r.clone().requires_grad_()
                ya = torch.relu(seq[1](seq[0](xa)) + ra)
            else:
                ya = seq(xa)
            yb = fused(xb, rb)
            _close(yb, ya, torch.float32, msg=mode)
            g = torch.randn_like(ya)
            opt_a.zero_grad()
            opt_b.zero_grad()
            ya.backward(g)
            yb.backward(g)
            _close(xb.grad, xa.grad, torch.float32, scale=2, msg=f"grad x {mode}")
            if residual:
                _close(rb.grad, ra.grad, torch.float32, msg=f"grad residual {mode}")
            for (na, pa), (nb, pb) in zip(seq.named_parameters(), fused.named_parameters()):
                _close(pb.grad, pa.grad, torch.float32, scale=2, msg=f"grad {nb} {mode}")
            opt_a.step()
            opt_b.step()
            for (na, ba), (nb, bb) in zip(seq.named_buffers(), fused.named_buffers()):
                if ba.is_floating_point():
                    _close(bb, ba, torch.float32, msg=f"{nb} after {mode}")
                else:
                    assert torch.equal(bb, ba), nb
    assert int(fused.bn.num_batches_tracked) == modes.count("train")


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_relu_bfloat16_channels_last(backend):
    device = device_for(backend)
    seq = _sequential(8, 16, 1, 1, 0, 1, False, device).to(torch.bfloat16)
    fused = _fused_from(seq, 8, 16, 1, 1, 0, 1, False, device).to(torch.bfloat16)
    x = torch.randn(2, 8, 5, 5, device=device).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with fastnets.use_backend(backend):
        for train in (True, False):
            seq.train(train)
            fused.train(train)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            pre = seq[1](seq[0](xa))
            ya, yb = torch.relu(pre), fused(xb)
            assert yb.dtype == torch.bfloat16 and yb.is_contiguous(memory_format=torch.channels_last)
            _close(yb, ya, torch.bfloat16)
            # no gradient where the bf16 roundings of eager and fused may put ReLU's kink on either side
            g = torch.where(pre.abs() < 0.1, 0.0, torch.randn_like(ya).float()).to(ya.dtype)
            ya.backward(g)
            yb.backward(g)
            _close(xb.grad, xa.grad, torch.bfloat16, scale=2)
    _close(fused.bn.running_mean, seq[1].running_mean, torch.bfloat16)
    _close(fused.bn.running_var, seq[1].running_var, torch.bfloat16)


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
        assert torch.allclose(a.double(), b.double(), atol=1e-5), n


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
    with pytest.raises(ValueError, match="input must be 4-D"):
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


# ------------------------------------------------------------------------------------ torch.library, compile

def test_opcheck_reference():
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    sc = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    sh = torch.randn(4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    conv = [2, 2], [1, 1], [1, 1]
    ops = torch.ops.fastnets
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(ops.conv2d, (x, w, b, sc, sh, r, *conv, True, "reference"))
    torch.library.opcheck(ops.conv2d, (xc, w, None, None, None, None, *conv, False, "reference"))
    torch.library.opcheck(ops.conv2d_stats, (x, w, b, *conv, "reference"))
    g = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    y = torch.relu(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    torch.library.opcheck(
        ops.conv2d_backward,
        (g, x.detach(), w.detach(), y, b.detach(), sc.detach(), *conv, True, True, True, True, True, True, True, "reference"),
    )
    mean, invstd = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    z = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.bn_apply_train, (z, sc, sh, r, mean, invstd, True, "reference"))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph(train):
    torch._dynamo.reset()
    m = ConvBNReLU2d(3, 8, 3, stride=2, padding=1).train(train)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()).train(train)
    ref.load_state_dict({k.replace("conv.", "0.").replace("bn.", "1."): v for k, v in m.state_dict().items()})
    x = torch.randn(2, 3, 9, 9)
    r = torch.randn(2, 8, 5, 5)

    def step(x, r):
        return m(x, r).sum()

    with fastnets.use_backend("reference"):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if train else "inductor")
        xa = x.clone().requires_grad_()
        loss = compiled(xa, r)
        loss.backward()
    xb = x.clone().requires_grad_()
    lr = torch.relu(ref[1](ref[0](xb)) + r).sum()
    lr.backward()
    torch.testing.assert_close(loss, lr, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.conv.weight.grad, ref[0].weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.bn.running_mean, ref[1].running_mean)
    torch.testing.assert_close(m.bn.running_var, ref[1].running_var)


# ------------------------------------------------------------------------------------------- hybrid (auto)

@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton backend (GPU or interpreter)")
@pytest.mark.parametrize("winner", ["triton", "cudnn"])
def test_hybrid_runs_the_measured_winner(monkeypatch, winner):
    """`auto`'s hybrid: measured once per key, cached, and either winner gives the right answer (on the CPU
    the timer is replaced, so both branches run under the interpreter / the CPU reference)."""
    from fastnets.triton_kernels import conv as tri
    from fastnets.triton_kernels import conv_hybrid as hy

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


def test_fp32_follows_cudnn_tf32_flag(monkeypatch):
    from fastnets.triton_kernels import conv as tri

    monkeypatch.setattr(tri, "_INTERPRET", False)
    x = torch.empty(1, dtype=torch.float32)
    for flag, prec in ((True, "tf32"), (False, "ieee")):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", flag)
        assert tri._math_flags(x)["PREC"] == prec
    assert tri._math_flags(x.bfloat16())["UPCAST"] is False  # never upcast bf16 on a GPU


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton backend (GPU or interpreter)")
def test_hybrid_falls_back_to_cudnn_when_triton_fails(monkeypatch):
    from fastnets.triton_kernels import conv as tri
    from fastnets.triton_kernels import conv_hybrid as hy

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


@pytest.mark.slow
@pytest.mark.skipif(not GPU, reason="needs a GPU (a tensor of more than 2**31 elements)")
def test_int64_offsets_on_large_tensors():
    """x and y of 64 x 5800 x 5800 = 2.15e9 elements each: element offsets past 2**31 must not wrap."""
    x = torch.randn(1, 64, 5800, 5800, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(64, 64, 1, 1, device="cuda") / 8).to(torch.bfloat16)
    y = conv2d(x, w, backend="triton")
    tail = x[:, :, -3:, -3:]
    want = F.conv2d(tail.float(), w.float())
    _close(y[:, :, -3:, -3:], want, torch.bfloat16)
    del y
    y = conv2d(x.contiguous(), w, backend="triton")  # NCHW: the channel stride alone is 33.6e6
    _close(y[:, -2:, -3:, -3:], want[:, -2:], torch.bfloat16)


def test_autocast_runs_the_convolution_in_the_autocast_dtype():
    """Custom ops get no autocast of their own: the functional wrappers cast as F.conv2d's rule does."""
    x = torch.randn(2, 3, 6, 6)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    bn = torch.nn.BatchNorm2d(4).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = conv(x)
        got = conv2d(x, conv.weight, conv.bias, 1, 1, backend="reference")
        block = conv2d_batch_norm(x, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                  training=False, padding=1, backend="reference")
    assert want.dtype == got.dtype == block.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, **{"atol": TOL[torch.bfloat16][0], "rtol": TOL[torch.bfloat16][1]})
    torch.testing.assert_close(block.float(), torch.relu(bn(want.float())), atol=6e-2, rtol=5e-2)
