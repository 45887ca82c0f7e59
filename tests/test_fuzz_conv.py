"""Property-based fuzzing of the convolution family against torch in float64, every backend here:
fastnets.ops.conv2d with its epilogue (bias, per-channel scale/shift, residual, activation) and
fastnets.ops.conv2d_batch_norm in training (batch statistics, running statistics and momentum; momentum=None is the modules' business, fuzzed
through BatchNorm) and
eval (folded BatchNorm). Shapes with C=1, 1x1 inputs and kernels, primes, N=1 where legal; stride, padding
(ints and 'same'/'valid'), dilation, groups; NCHW, channels_last and non-dense views; fp32/fp64.
Output, every gradient and the running statistics. Profiles: HYPOTHESIS_PROFILE=ci|gpu (tests/conftest.py)."""
import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastnets.ops.conv import conv2d, conv2d_batch_norm  # noqa: E402

from conftest import in_layout, assert_grads, assert_rel, away_from_kink, backend_params, device_for, fuzz_examples, run_fuzz  # noqa: E402

# plus `native` (torch's CPU kernels, dispatched before fastnets' custom ops, so not in the registry)
BACKENDS = backend_params("conv") + ([] if device_for("reference") == "cuda" else [pytest.param("native", id="native")])
# fp32/fp64 only: a handful of fp16/bf16-rounded values per channel (the fuzz's shapes) normalised or
# differentiated through a curved activation is ill-conditioned beyond any per-dtype bound (measured 5e-2
# in bf16 on 4 values); half precision is covered on larger shapes by test_conv.py and test_activations.py
DTYPES = [torch.float32, torch.float64]
# torch's own functions: the ground truth never goes through fastnets.activations
ACTS = {
    "identity": lambda v: v,
    "relu": F.relu,
    "leaky_relu": lambda v: F.leaky_relu(v, 0.1),
    "silu": F.silu,
    "gelu": F.gelu,
}
ACT_ARG = {"leaky_relu": ("leaky_relu", 0.1)}
KINKED = ("relu", "leaky_relu")
# the Triton interpreter runs three kernels per example (forward, grad input, grad weight)
EXAMPLES_CAP = {"triton": 50, "native": 500}


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
    cin = groups * draw(st.sampled_from([1, 2, 3, 5]))
    cout = groups * draw(st.sampled_from([1, 2, 3, 7]))
    k = (draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 3])))
    padding = draw(st.sampled_from([0, 1, 2, (1, 0), "same", "valid"]))
    stride = 1 if padding == "same" else draw(st.sampled_from([1, 2, (2, 1)]))
    return dict(
        n=draw(st.sampled_from([1, 2, 3])), cin=cin, cout=cout, groups=groups,
        hw=(draw(st.sampled_from([1, 2, 5, 7])), draw(st.sampled_from([1, 3, 4]))),
        k=k, stride=stride, padding=padding, dilation=draw(st.sampled_from([1, 1, 2])),
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
        bias=draw(st.booleans()), epilogue=draw(st.sampled_from(["none", "scale_shift", "batch_norm"])),
        training=draw(st.booleans()), momentum=draw(st.sampled_from([0.1, 0.5, 1.0])),
        residual=draw(st.booleans()), act=draw(st.sampled_from(sorted(ACTS))),
        loc=draw(st.sampled_from([0.0, 3.0, -2.0])), seed=draw(st.integers(0, 2**16)),
    )


def _out_shape(case):
    probe = F.conv2d(torch.empty(1, case["cin"], *case["hw"], device="meta"),
                     torch.empty(case["cout"], case["cin"] // case["groups"], *case["k"], device="meta"),
                     None, case["stride"], case["padding"], case["dilation"], case["groups"])
    return (case["n"], case["cout"], *probe.shape[2:])


def run_case(case, backend):
    dev, dtype = device_for(backend), case["dtype"]
    # a padding larger than the dilated kernel allows is refused by torch too; an empty output is not fuzzed
    assume(isinstance(case["padding"], str) or max(_pair(case["padding"])) <= min(case["k"]) // 2 * case["dilation"] or
           max(_pair(case["padding"])) <= 1)
    try:
        out_shape = _out_shape(case)
    except RuntimeError:
        assume(False)
    assume(min(out_shape[2:]) >= 1)
    bn = case["epilogue"] == "batch_norm"
    if bn and case["training"]:
        assume(out_shape[0] * out_shape[2] * out_shape[3] > 1)  # torch refuses one value per channel
    if bn:
        assume(case["groups"] == 1)  # conv2d_batch_norm takes no groups (grouped convs + BN go through torch)
    g = torch.Generator().manual_seed(case["seed"])
    cin, cout = case["cin"], case["cout"]

    def make(shape, loc=0.0, s=1.0):
        return (torch.randn(shape, generator=g) * s + loc).to(dtype)

    x = in_layout(make((case["n"], cin, *case["hw"]), case["loc"]).to(dev), case["layout"]).requires_grad_()
    w = make((cout, cin // case["groups"], *case["k"]), s=(cin * case["k"][0] * case["k"][1]) ** -0.5)
    w = w.to(dev).requires_grad_()
    b = make((cout,), 0.2).to(dev).requires_grad_() if case["bias"] else None
    res = make(out_shape, -0.3).to(dev).requires_grad_() if case["residual"] else None
    act = ACT_ARG.get(case["act"], case["act"])
    kw = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"])
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = {"x": x, "w": w} | ({"b": b} if b is not None else {}) | ({"residual": res} if res is not None else {})
    rm = rv = None
    if bn:
        gamma = (torch.rand(cout, generator=g) + 0.5).to(pdt).to(dev).requires_grad_()
        beta = (torch.randn(cout, generator=g) * 0.3).to(pdt).to(dev).requires_grad_()
        rm = (torch.randn(cout, generator=g) * 2).to(pdt).to(dev)
        rv = (torch.rand(cout, generator=g) * 3 + 0.2).to(pdt).to(dev)
        rm0, rv0 = rm.clone(), rv.clone()
        leaves |= {"gamma": gamma, "beta": beta}
        padding = case["padding"]
        if isinstance(padding, str):
            assume(padding == "valid" or all(case["dilation"] * (k - 1) % 2 == 0 for k in case["k"]))
            padding = 0 if padding == "valid" else tuple(case["dilation"] * (k - 1) // 2 for k in case["k"])
        y = conv2d_batch_norm(x, w, b, rm, rv, gamma, beta, training=case["training"],
                              momentum=case["momentum"], eps=1e-3, stride=case["stride"], padding=padding,
                              dilation=case["dilation"], residual=res, backend=backend, act=act)
    else:
        scale = shift = None
        if case["epilogue"] == "scale_shift":
            scale = (torch.rand(cout, generator=g) + 0.5).to(dev)
            shift = torch.randn(cout, generator=g).to(dev)
        y = conv2d(x, w, b, groups=case["groups"], scale=scale, shift=shift, residual=res, backend=backend,
                   act=act, **kw)
    assert y.shape == out_shape and y.dtype == dtype, (y.shape, y.dtype, case)

    # float64 truth from torch on the same rounded inputs
    d = {k: v.detach().double().cpu().requires_grad_() for k, v in leaves.items()}
    conv_kw = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"])
    z0 = F.conv2d(d["x"], d["w"], d.get("b"), **conv_kw)
    z = z0
    if bn:
        rmd, rvd = rm0.double().cpu(), rv0.double().cpu()
        z = F.batch_norm(z, rmd, rvd, d["gamma"], d["beta"], case["training"], case["momentum"], 1e-3)
    elif case["epilogue"] == "scale_shift":
        z = z * scale.double().cpu().view(1, -1, 1, 1) + shift.double().cpu().view(1, -1, 1, 1)
    if res is not None:
        z = z + d["residual"]
    want = ACTS[case["act"]](z)
    # an activation's output can be ~0 where its input is not (gelu's and silu's negative tails, computed by
    # torch's fp32 formulas with cancellation): the output error is also bounded relative to ||pre-activation||
    assert_rel(y, want, ref=z, msg=f"output {case}")
    if bn:
        # (rounding z by u|z| moves a mean by u|z| and a variance by about 2 u |z| std <= u (var + mean^2))
        assert_rel(rm, rmd.to(rm.dtype), ref=rmd.abs() + rvd.sqrt(), msg=f"running_mean {case}")
        assert_rel(rv, rvd.to(rv.dtype), ref=rvd + rmd**2, msg=f"running_var {case}")

    dy = (torch.randn(out_shape, generator=g) + 0.4).to(dtype).to(dev) + 0.3 * y.detach()
    if case["act"] in KINKED:
        dy = away_from_kink(dy, z, 1e-4)
    got = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy)))
    *true, dz = torch.autograd.grad(want, list(d.values()) + [z0], dy.double().cpu())
    wants = dict(zip(d, true))
    # Where the true gradient cancels to ~0 (a training BatchNorm makes the conv's output scale- and
    # shift-invariant: grad b is exactly 0, grad w can be; or a few terms of mixed sign), the error is also
    # bounded relative to the sums of |terms|: conv's weight gradient of |x| and |dz| (dz = the true
    # gradient at the conv's output, plus the BatchNorm backward's terms in training).
    # The same for any reduction whose terms cancel (few terms, mixed signs): grad x against conv's input
    # gradient of |w| and |dz|.
    # |act'| <= 1.2 for every fuzzed act (gelu 1.13, silu 1.1); torch's fp32 gelu'/silu' in the negative tail
    # are inaccurate in absolute terms, so the terms are |dy| * 1.2, not |dy * act'|
    dya = dy.detach().double().cpu().abs() * 1.2
    terms = dz.abs() + dya
    if bn:  # through the BatchNorm: gamma * invstd * |dy| each (its backward's own terms in training)
        var = z0.detach().var((0, 2, 3), unbiased=False) if case["training"] else rv0.double().cpu()
        gain = d["gamma"].detach() * (var + 1e-3).rsqrt()
        terms = dz.abs() + dya * gain.view(1, -1, 1, 1)
    xa, wa = d["x"].detach().abs().requires_grad_(), d["w"].detach().abs().requires_grad_()
    ref_x, ref_w = torch.autograd.grad(F.conv2d(xa, wa, None, **conv_kw), (xa, wa), terms)
    refs = {"x": ref_x, "w": ref_w, "b": terms.sum((0, 2, 3)), "residual": dya}  # residual: dy * act'(pre)
    if bn:  # gamma's and beta's gradients: per-channel sums of dy * act' * x_hat and of dy * act'
        if case["training"]:
            mean, var = z0.detach().mean((0, 2, 3)), z0.detach().var((0, 2, 3), unbiased=False)
        else:
            mean, var = rm0.double().cpu(), rv0.double().cpu()
        xhat = (z0.detach() - mean.view(1, -1, 1, 1)) * (var + 1e-3).rsqrt().view(1, -1, 1, 1)
        refs |= {"gamma": (dya * xhat.abs()).sum((0, 2, 3)), "beta": dya.sum((0, 2, 3))}
    assert_grads(got, wants, refs=refs, msg=str(case))


def _pair(p):
    return p if isinstance(p, tuple) else (p, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_conv(backend):
    n = EXAMPLES_CAP[backend] if backend == "native" else min(fuzz_examples(backend), EXAMPLES_CAP.get(backend, 10**9))
    n = int(os.environ.get("FASTNETS_FUZZ_EXAMPLES", n))  # a quick local run

    run_fuzz(conv_cases(), run_case, backend, examples=n)
