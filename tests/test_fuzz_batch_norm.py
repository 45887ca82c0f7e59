"""Property-based fuzzing of BatchNorm (+ add + ReLU) against torch's float64 BatchNorm, every backend here.

Each example draws a tiny input (C=1, 1x1 spatial, primes, N=1 where legal), its rank (2-D/3-D/4-D),
layout (contiguous, channels_last, a non-dense strided view), dtype, momentum (None included), eps,
affine/track_running_stats flags, residual, ReLU, parameters in fp32 or the activation dtype, and a
train/eval sequence; output, every gradient, running_mean, running_var and num_batches_tracked must match.
Profiles (tests/conftest.py): HYPOTHESIS_PROFILE=ci (default, derandomized: the same examples every run,
a failure prints the example and a reproduce blob) or gpu (more, random examples).
"""
import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import strategies as st  # noqa: E402

import fastnets  # noqa: E402
from fastnets.nn.batch_norm import bn_act  # noqa: E402

from conftest import (in_layout, REL_BOUND, assert_rel, away_from_kink, backend_params, biting_grad, device_for,  # noqa: E402
                      run_fuzz)

BACKENDS = backend_params("batch_norm")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def bn_cases(draw):
    ndim = draw(st.sampled_from([2, 3, 4, 4]))
    n = draw(st.sampled_from([1, 2, 3]))
    c = draw(st.sampled_from([1, 2, 3, 5, 7]))
    spatial = [draw(st.sampled_from([1, 2, 3, 5])) for _ in range(ndim - 2)]
    shape = (n, c, *spatial)
    steps = draw(st.lists(st.booleans(), min_size=1, max_size=3))  # True = a training step
    count = n * (spatial[0] if spatial else 1) * (spatial[1] if len(spatial) > 1 else 1)
    track = draw(st.booleans())
    if count <= 1:  # one value per channel: legal in eval with running statistics only (as in torch)
        steps, track = [False] * len(steps), True
    return dict(
        shape=shape,
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
        momentum=draw(st.sampled_from([None, 0.1, 0.5, 1.0, 0.0])),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        affine=draw(st.booleans()),
        track=track,
        residual=draw(st.booleans()),
        relu=draw(st.booleans()),
        lowp_params=draw(st.booleans()),
        steps=steps,
        loc=draw(st.sampled_from([0.0, 3.0, -20.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def run_case(case, backend):
    device = device_for(backend)
    g = torch.Generator().manual_seed(case["seed"])
    shape, dtype, c = case["shape"], case["dtype"], case["shape"][1]
    cls = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d
    ours = cls(c, eps=case["eps"], momentum=case["momentum"], affine=case["affine"],
                          track_running_stats=case["track"])
    if case["affine"]:
        with torch.no_grad():
            ours.weight.copy_(torch.rand(c, generator=g) + 0.5)
            ours.bias.copy_(torch.randn(c, generator=g))
    if case["track"]:
        with torch.no_grad():
            ours.running_mean.copy_(torch.randn(c, generator=g) + case["loc"] + 2)
            ours.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.5)
    pdtype = dtype if case["lowp_params"] or dtype == torch.float64 else torch.float32
    ours = ours.to(pdtype)
    truth = cls(c, eps=case["eps"], momentum=case["momentum"], affine=case["affine"],
                           track_running_stats=case["track"]).double()
    truth.load_state_dict(ours.state_dict())
    ours = ours.to(device)
    for i, training in enumerate(case["steps"]):
        ours.train(training)
        truth.train(training)
        base = (torch.randn(shape, generator=g) * (torch.rand(c, generator=g) + 0.2).view([1, c] + [1] * (len(shape) - 2))
                + case["loc"]).to(dtype)
        x = in_layout(base.to(device), case["layout"]).requires_grad_()
        res = None
        if case["residual"]:
            res = in_layout(torch.randn(shape, generator=g).to(dtype).to(device), case["layout"]).requires_grad_()
        with fastnets.use_backend(backend):
            y = bn_act(ours, x, residual=res, relu=case["relu"])
        assert y.shape == x.shape and y.dtype == dtype
        x64 = x.detach().double().cpu().requires_grad_()
        r64 = None if res is None else res.detach().double().cpu().requires_grad_()
        pre = truth(x64)
        pre = pre + r64 if r64 is not None else pre
        want = torch.relu(pre) if case["relu"] else pre
        what = f"{case} step {i}"
        dy = biting_grad(y, x)
        if case["relu"]:
            dy = away_from_kink(dy, pre, 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4)
        leaves = [x] + ([res] if res is not None else []) + ([ours.weight, ours.bias] if case["affine"] else [])
        wleaves = [x64] + ([r64] if r64 is not None else []) + ([truth.weight, truth.bias] if case["affine"] else [])
        names = ["x"] + (["residual"] if res is not None else []) + (["weight", "bias"] if case["affine"] else [])
        # grad_x's terms are of size |weight| * invstd * |dy| and cancel (exactly, for 2 values per channel):
        # its fallback scale is that, not ||dy|| alone
        view = [1, c] + [1] * (len(shape) - 2)
        dims = [0] + list(range(2, len(shape)))
        var = x64.detach().var(dims, unbiased=False) if (training or not case["track"]) else truth.running_var
        a = torch.rsqrt(var + case["eps"]) * (truth.weight.detach().abs() if case["affine"] else 1.0)
        # x - mean loses eps * |mean| of x's precision: relative to the spread, that is what a channel with a
        # large mean and a tiny spread (two close values: grad x is exactly 0) carries into x_hat; beyond the
        # dtype's bound it widens the fallback scale by that condition number
        mean_abs = (x64.detach().mean(dims) if (training or not case["track"]) else truth.running_mean).abs()
        cond = 1 + mean_abs * torch.rsqrt(var + case["eps"]) * torch.finfo(dtype).eps / REL_BOUND[dtype]
        dx_scale = dy.double().cpu() * (a * cond).view(view)
        # the output carries the same condition number (x_hat = (x - mean) * invstd)
        assert_rel(y, want, ref=want.detach().abs() * cond.view(view), msg=f"output {what}")
        got = torch.autograd.grad(y, leaves, dy)
        exp = torch.autograd.grad(want, wleaves, dy.double().cpu())
        for name, a, e in zip(names, got, exp):
            assert a.dtype == (dtype if name in ("x", "residual") else pdtype), name
            assert_rel(a, e, ref=dx_scale if name == "x" else None, msg=f"grad {name} {what}")
        for (name, a), (_, b) in zip(ours.named_buffers(), truth.named_buffers()):
            if a.is_floating_point():
                assert_rel(a, b, msg=f"{name} {what}")
                if name == "running_var":
                    assert bool((a >= 0).all()), f"negative running_var {what}"
            else:
                assert torch.equal(a.cpu(), b), f"{name} {what}"
        with torch.no_grad():  # the next step starts from the statistics as stored (bf16/fp16 when so)
            for (_, a), (_, b) in zip(ours.named_buffers(), truth.named_buffers()):
                b.copy_(a.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_batch_norm(backend):
    run_fuzz(bn_cases(), run_case, backend)
