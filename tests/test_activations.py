"""Fused activations (fastnets.activations) in every op family and backend, against torch's own activation
in float64: BatchNorm (train/eval, + residual), the conv epilogue (bias -> act, folded BN), the conv+BN
training block (conv2d_stats + bn_apply_train) and squeeze-excite (inner activation and gate). Forward and
every gradient, inputs placed exactly at each kink, NaN/inf inputs, in-place modules, and the parsing of
activations given as modules, functions, names and pairs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnets
from fastnets import activations as A
from fastnets.nn import BatchNormAct2d, SqueezeExcite, bn_act, conv_bn_act
from fastnets.ops.batch_norm import batch_norm
from fastnets.ops.squeeze_excite import squeeze_excite

from conftest import DTYPES, GPU, assert_rel, backend_params, device_for

ACTS = [("identity", 0.0), ("relu", 0.0), ("relu6", 0.0), ("leaky_relu", 0.2), ("silu", 0.0), ("hardswish", 0.0),
        ("gelu", 0.0), ("gelu_tanh", 0.0)]
ACT_IDS = [a for a, _ in ACTS]
KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "leaky_relu": (0.0,), "hardswish": (-3.0, 3.0)}
# torch's own gradient at a NaN input differs between its scalar and vectorized CPU kernels for these two
# (hardtanh_backward, hardswish_backward); there fastnets follows the scalar (documented) formula.
NAN_GRAD_AMBIGUOUS = ("relu6", "hardswish")
# fp32 activations against the float64 truth: torch's own fp32 gelu (the reference backend) is up to 5.3e-7
# absolute (1.3e-4 relative) off at -3 with its AVX-512 erf (2-core EPYC, torch 2.14.1), 4e-5 relative on
# AVX2; 2^-20 absolute is eight fp32 ulps of |x| = 3.
FP32_ACT_TOL = dict(atol=2.0 ** -20, rtol=1e-4)


def torch_act(v, act):
    name, p = act
    return {
        "identity": lambda t: t, "relu": torch.relu, "relu6": F.relu6, "leaky_relu": lambda t: F.leaky_relu(t, p),
        "silu": F.silu, "hardswish": F.hardswish, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    }[name](v)


def off_kinks(dy, pre, act, dtype):
    """dy zeroed where the float64 pre-activation is so near a kink that the rounding of a low-precision
    input may put it on either side (the derivative jumps there)."""
    width = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    near = torch.zeros_like(pre, dtype=torch.bool)
    for k in KINKS.get(act[0], ()):
        near |= (pre.detach() - k).abs() < width * (1 + abs(k))
    return torch.where(near.to(dy.device), torch.zeros((), dtype=dy.dtype, device=dy.device), dy)


def _input(shape, dtype, device, cl, scale=2.5, loc=0.4):
    x = torch.randn(shape) * scale + loc
    if cl:
        x = x.to(memory_format=torch.channels_last)
    return x.to(device=device, dtype=dtype)


def _check_grads(got, want, dtypes, refs=None):
    for i, (g, w, dt) in enumerate(zip(got, want, dtypes)):
        assert_rel(g, w, dtype=dt, ref=None if refs is None else refs[i], msg=f"grad {i}")


# ------------------------------------------------------------------------------------------------- BatchNorm


@pytest.mark.parametrize("backend", backend_params("batch_norm"))
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_act(backend, act, training):
    """act(bn(x) + residual) and its gradients (x, weight, bias, residual) in fp32/fp16/bf16, NCHW and
    channels_last, against torch in float64."""
    device = device_for(backend)
    for dtype, cl, res in ((torch.float32, False, True), (torch.float16, True, True), (torch.bfloat16, False, False)):
        x = _input((3, 5, 4, 3), dtype, device, cl).requires_grad_()
        w = (torch.rand(5, device=device) + 0.5).requires_grad_()
        b = (torch.randn(5, device=device) * 0.5).requires_grad_()
        r = _input((3, 5, 4, 3), dtype, device, cl, 1.0, 0.0).requires_grad_() if res else None
        rm, rv = torch.randn(5, device=device) * 0.3, torch.rand(5, device=device) + 0.5
        ins = [x, w, b] + ([r] if res else [])
        ins64 = [t.detach().double().requires_grad_() for t in ins]
        rm64, rv64 = rm.double(), rv.double()
        pre = F.batch_norm(ins64[0], rm64, rv64, ins64[1], ins64[2], training, 0.1, 1e-5)
        if res:
            pre = pre + ins64[3]
        want = torch_act(pre, act)
        y = batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, residual=r, act=act, backend=backend)
        assert_rel(y, want, msg="forward")
        if training:
            assert_rel(rm, rm64.float(), dtype=torch.float32, msg="running_mean")
        dy = off_kinks(torch.randn_like(want) + 0.3, pre, act, dtype).to(dtype).double()  # exact in dtype
        got = torch.autograd.grad(y, ins, dy.to(dtype))
        exp = torch.autograd.grad(want, ins64, dy)
        _check_grads(got, exp, [dtype, torch.float32, torch.float32, dtype], refs=[dy, None, None, dy])


@pytest.mark.parametrize("backend", backend_params("batch_norm"))
def test_batch_norm_act_float64_kinks_and_nan(backend):
    """Inputs exactly at each kink, and NaN/inf, through the BN apply with scale 1 and shift 0 (eval,
    running var 1 - eps): the output and gradient are exactly torch's activation and its backward."""
    device = device_for(backend)
    special = [0.0, -3.0, 3.0, 6.0, -6.0, 1e-3, -1e-3, float("nan"), float("inf"), float("-inf"), -20.0, 20.0]
    eps = 2.0 ** -10
    for name, p in ACTS:
        for dtype in (torch.float64, torch.float32):
            x = torch.tensor(special, dtype=dtype).view(1, 1, -1, 1).repeat(2, 3, 1, 1).to(device).requires_grad_()
            ones = torch.ones(3, device=device, dtype=dtype)
            rm, rv = torch.zeros(3, device=device, dtype=dtype), torch.full((3,), 1 - eps, device=device, dtype=dtype)
            y = batch_norm(x, rm, rv, ones, ones * 0, False, 0.1, eps, act=(name, p), backend=backend)
            x_ref = x.detach().double()  # the truth in float64 (torch's own fp32 gelu loses digits near -3)
            want = torch_act(x_ref, (name, p)).to(dtype)
            if dtype == torch.float32:  # torch's vectorised AVX-512 fp32 gelu gives NaN at +inf (the truth: inf);
                own = torch_act(x.detach(), (name, p))  # the reference backend is torch's kernel: either is torch's
                quirk = torch.isinf(x.detach()) & own.isnan() & ~want.isnan() & y.detach().isnan()
                want = torch.where(quirk, own, want)
            tol = FP32_ACT_TOL if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(y, want, equal_nan=True, **tol, msg=f"{name} {dtype} forward")
            (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
            # torch's own scalar-kernel gradient (a tensor shorter than one vector): one value at a time
            gw = torch.stack([_scalar_grad(v, (name, p)) for v in x_ref.view(-1)]).view_as(x).to(dtype)
            if name in NAN_GRAD_AMBIGUOUS:
                keep = ~x.detach().isnan()
                gx, gw = gx[keep], gw[keep]
            torch.testing.assert_close(gx, gw, equal_nan=True, **tol, msg=f"{name} {dtype} gradient")


def _scalar_grad(v, act):
    t = v.detach().clone().view(1).requires_grad_()
    (g,) = torch.autograd.grad(torch_act(t, act), t, torch.ones(1, dtype=t.dtype, device=t.device))
    return g[0]


def test_batch_norm_act_module_and_inplace_variants():
    """BatchNormAct2d / bn_act with activations given as modules (in-place ones too), functions, names and
    pairs equal torch's BatchNorm2d followed by the same module; BatchNormAct2d loads a BatchNorm2d
    state_dict."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3) * 2
    ref_bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        ref_bn.weight.uniform_(0.5, 1.5)
        ref_bn.bias.normal_()
    for module in (nn.ReLU(inplace=True), nn.ReLU6(inplace=True), nn.Hardswish(inplace=True), nn.SiLU(inplace=True),
                   nn.LeakyReLU(0.3, inplace=True), nn.GELU(approximate="tanh"), nn.Hardtanh(0.0, 6.0), nn.Identity()):
        m = BatchNormAct2d(4, act=module)
        m.load_state_dict(ref_bn.state_dict())
        bn2 = nn.BatchNorm2d(4)
        bn2.load_state_dict(ref_bn.state_dict())
        torch.testing.assert_close(m(x), module(bn2(x)), msg=repr(module))
        torch.testing.assert_close(m.running_mean, bn2.running_mean)
        assert int(m.num_batches_tracked) == int(bn2.num_batches_tracked) == 1
    bn = nn.BatchNorm2d(4).eval()
    for act, fn in ((F.silu, F.silu), (torch.relu, torch.relu), ("hardswish", F.hardswish),
                    (("leaky_relu", 0.05), lambda t: F.leaky_relu(t, 0.05)), (F.relu6, F.relu6)):
        torch.testing.assert_close(bn_act(bn, x, act=act), fn(bn(x)))
    # act wins over relu; relu=True alone is relu
    torch.testing.assert_close(bn_act(bn, x, relu=True, act="identity"), bn(x))
    torch.testing.assert_close(bn_act(bn, x, relu=True), torch.relu(bn(x)))


def test_canonical_parsing_and_errors():
    assert A.canonical(None) == ("identity", 0.0) and A.canonical(True) == ("relu", 0.0)
    assert A.canonical(nn.LeakyReLU(0.25)) == ("leaky_relu", 0.25)
    assert A.canonical(nn.GELU()) == ("gelu", 0.0) and A.canonical(nn.GELU(approximate="tanh")) == ("gelu_tanh", 0.0)
    assert A.canonical(nn.Hardtanh(0, 6)) == ("relu6", 0.0)
    assert A.canonical("swish") == ("silu", 0.0) and A.canonical(F.relu6) == ("relu6", 0.0)
    assert A.canonical_gate(nn.Hardsigmoid()) == "hardsigmoid" and A.canonical_gate(torch.sigmoid) == "sigmoid"
    assert A.fusable(nn.ReLU()) and not A.fusable(nn.Tanh()) and not A.fusable(nn.Hardtanh(-1, 1))
    for bad in (nn.Tanh(), "tanh", nn.ELU(), 3, ("gelu", "x")):
        with pytest.raises(ValueError, match="act"):
            A.canonical(bad)
    with pytest.raises(ValueError, match="act"):
        BatchNormAct2d(3, act=nn.Mish())
    with pytest.raises(ValueError, match="gate"):
        SqueezeExcite(4, 2, gate=nn.ReLU())
    with pytest.raises(ValueError, match="inner_act"):
        SqueezeExcite(4, 2, inner_act="tanh")

    class MyReLU(nn.ReLU):  # a subclass may change forward: not assumed to be relu
        pass

    assert not A.fusable(MyReLU())


# ------------------------------------------------------------------------------------------------- convolution


@pytest.mark.parametrize("backend", backend_params("conv"))
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_conv_epilogue_act(backend, act):
    """Conv (+bias) -> act with no BatchNorm (VGG/AlexNet), eval Conv -> BN folded -> [+res] -> act, and the
    training Conv -> BN -> [+res] -> act block, against torch in float64: output, every gradient, running
    statistics."""
    device = device_for(backend)
    for dtype, cl in ((torch.float32, True), (torch.bfloat16, False)):
        for mode in ("bias", "eval", "train"):
            conv = nn.Conv2d(3, 5, 3, padding=1, bias=(mode == "bias")).to(device)
            bn = nn.BatchNorm2d(5).to(device)
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_()
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
            bn.train(mode == "train")
            conv64 = nn.Conv2d(3, 5, 3, padding=1, bias=(mode == "bias")).double()
            conv64.load_state_dict(conv.state_dict())
            bn64 = nn.BatchNorm2d(5).double()
            bn64.load_state_dict(bn.state_dict())
            bn64.train(mode == "train")
            conv.to(dtype)
            x = _input((2, 3, 5, 4), dtype, device, cl).requires_grad_()
            res = mode != "bias"
            r = _input((2, 5, 5, 4), dtype, device, cl, 1.0, 0.0).requires_grad_() if res else None
            x64 = x.detach().double().requires_grad_()
            r64 = r.detach().double().requires_grad_() if res else None
            with fastnets.use_backend(backend):
                y = conv_bn_act(conv, None if mode == "bias" else bn, x, residual=r, act=act)
            pre = conv64(x64) if mode == "bias" else bn64(conv64(x64))
            if res:
                pre = pre + r64
            want = torch_act(pre, act)
            assert_rel(y, want, scale=4, msg=f"{mode} forward")  # the convolution's own rounding (bf16 operands)
            if mode == "train":
                assert_rel(bn.running_mean, bn64.running_mean, dtype=torch.float32, scale=4)
                assert_rel(bn.running_var, bn64.running_var, dtype=torch.float32, scale=4)
            dy = off_kinks(torch.randn_like(want) + 0.2, pre, act, dtype).to(dtype).double()
            ins = [x, conv.weight] + ([r] if res else []) + ([conv.bias] if mode == "bias" else [bn.weight, bn.bias])
            ins64 = [x64, conv64.weight] + ([r64] if res else []) + (
                [conv64.bias] if mode == "bias" else [bn64.weight, bn64.bias])
            got = torch.autograd.grad(y, ins, dy.to(dtype))
            exp = torch.autograd.grad(want, ins64, dy)
            for i, (g, w) in enumerate(zip(got, exp)):
                # bf16 operands bound every gradient (the folded scale's gradient sums bf16 products too)
                assert_rel(g, w, dtype=dtype if dtype == torch.bfloat16 else g.dtype, scale=4,
                           ref=dy if i == 0 else None, msg=f"{mode} grad {i}")


@pytest.mark.parametrize("backend", backend_params("conv"))
def test_conv_epilogue_kinks(backend):
    """A 1x1 identity convolution puts the pre-activation exactly at each kink: output and gradient are
    torch's activation and backward exactly (NaN is left out: 0 * NaN spreads it across channels)."""
    device = device_for(backend)
    vals = torch.tensor([0.0, -3.0, 3.0, 6.0, -6.0, 0.5, -0.5, 7.0], dtype=torch.float32)
    x = vals.view(1, 1, 2, 4).repeat(2, 3, 1, 1).to(device).requires_grad_()
    w = torch.eye(3, device=device).view(3, 3, 1, 1)
    for name, p in ACTS:
        with fastnets.use_backend(backend):
            y = fastnets.ops.conv2d(x, w, act=(name, p))
        xr = x.detach().clone().requires_grad_()
        want = torch_act(xr, (name, p))
        truth = torch_act(x.detach().double(), (name, p)).float()
        torch.testing.assert_close(y, truth, **FP32_ACT_TOL, msg=name)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        (gw,) = torch.autograd.grad(want, xr, torch.ones_like(want))
        torch.testing.assert_close(gx, gw, atol=1e-7, rtol=1e-4, msg=f"{name} gradient")


# ------------------------------------------------------------------------------------------------- squeeze-excite


@pytest.mark.parametrize("backend", backend_params("squeeze_excite"))
@pytest.mark.parametrize("inner", ACTS, ids=ACT_IDS)
def test_squeeze_excite_inner_act_and_gate(backend, inner):
    """x * gate(fc2(inner(fc1(mean(x))))) [+ res, relu] with both gates, against torch in float64: output
    and the gradients of x, the four weights and the residual."""
    device = device_for(backend)
    for gate, dtype, cl in (("sigmoid", torch.float32, False), ("hardsigmoid", torch.float16, True),
                            ("hardsigmoid", torch.float32, False)):
        x = _input((2, 6, 3, 5), dtype, device, cl, 1.5, 0.3).requires_grad_()
        ws = [torch.randn(3, 6, 1, 1, device=device), torch.randn(3, device=device), torch.randn(6, 3, 1, 1, device=device),
              torch.randn(6, device=device)]
        ws = [w.requires_grad_() for w in ws]
        r = _input((2, 6, 3, 5), dtype, device, cl, 1.0, 0.0).requires_grad_()
        y = squeeze_excite(x, *ws, residual=r, relu=True, inner_act=inner, gate=gate, backend=backend)
        ins = [x] + ws + [r]
        ins64 = [t.detach().double().requires_grad_() for t in ins]
        z1 = F.conv2d(ins64[0].mean((2, 3), keepdim=True), ins64[1], ins64[2])
        z2 = F.conv2d(torch_act(z1, inner), ins64[3], ins64[4])
        g = torch.sigmoid(z2) if gate == "sigmoid" else F.hardsigmoid(z2)
        want = torch.relu(ins64[0] * g + ins64[5])
        assert_rel(y, want, msg=f"{gate} forward")
        dy = torch.randn_like(want).to(dtype).double()
        got = torch.autograd.grad(y, ins, dy.to(dtype))
        exp = torch.autograd.grad(want, ins64, dy)
        for i, (a, e) in enumerate(zip(got, exp)):
            assert_rel(a, e, dtype=dtype if i in (0, 5) else torch.float32, scale=2, msg=f"{gate} grad {i}")


def test_squeeze_excite_module_matches_torchvision():
    """SqueezeExcite(inner_act=nn.SiLU, gate=hardsigmoid) loads torchvision's SqueezeExcitation and matches it."""
    tv = pytest.importorskip("torchvision.ops")
    for act, gate in ((nn.SiLU, nn.Sigmoid), (nn.ReLU, nn.Hardsigmoid)):
        ref = tv.SqueezeExcitation(8, 3, activation=act, scale_activation=gate)
        se = SqueezeExcite(8, 3, inner_act=act(), gate=gate())
        se.load_state_dict(ref.state_dict())
        x = torch.randn(2, 8, 4, 4, requires_grad=True)
        torch.testing.assert_close(se(x), ref(x))
        assert f"gate={A.canonical_gate(gate())}" in repr(se) or gate is nn.Sigmoid
