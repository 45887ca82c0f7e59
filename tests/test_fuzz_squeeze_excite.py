"""Property-based fuzzing of squeeze-excite (+ add + ReLU) against the float64 eager block, every backend
here: shapes (C=1, R=1, R > C, 1x1 spatial, primes, N=1), layouts (contiguous, channels_last, non-dense
views), dtypes, weights in fp32 or the activation dtype, residual, ReLU; output and all six gradients.
Profiles: HYPOTHESIS_PROFILE=ci (default, derandomized) or gpu (tests/conftest.py)."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import strategies as st  # noqa: E402

from fastnets.ops import squeeze_excite  # noqa: E402

from conftest import in_layout, assert_grads, assert_rel, away_from_kink, backend_params, device_for, run_fuzz, se_truth  # noqa: E402

BACKENDS = backend_params("squeeze_excite")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def se_cases(draw):
    return dict(
        shape=(draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 3, 5, 7])),
               draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 2, 3]))),
        r=draw(st.sampled_from([1, 2, 3, 8])),
        dtype=draw(st.sampled_from(DTYPES)),
        fp32_weights=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
        residual=draw(st.booleans()),
        relu=draw(st.booleans()),
        loc=draw(st.sampled_from([0.0, 2.0, -5.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def run_case(case, backend):
    device = device_for(backend)
    g = torch.Generator().manual_seed(case["seed"])
    n, c, h, w = case["shape"]
    r, dtype = case["r"], case["dtype"]
    wdtype = torch.float32 if case["fp32_weights"] and dtype in (torch.float16, torch.bfloat16) else dtype
    x = in_layout((torch.randn(case["shape"], generator=g) + case["loc"]).to(dtype).to(device), case["layout"]).requires_grad_()
    # fc1 scaled by the input's offset: a saturated gate (sigmoid' ~ 1e-6) is ill-conditioned in any fp32
    # formula, eager torch's included (1 - gate rounds), so the fuzz keeps gates away from saturation
    ws = [torch.randn(r, c, 1, 1, generator=g) / (c**0.5 * (1 + abs(case["loc"]))), torch.randn(r, generator=g) * 0.5,
          torch.randn(c, r, 1, 1, generator=g) / r**0.5, torch.randn(c, generator=g) * 0.5]
    ws = [t.to(wdtype).to(device).requires_grad_() for t in ws]
    res = None
    if case["residual"]:
        res = in_layout(torch.randn(case["shape"], generator=g).to(dtype).to(device), case["layout"]).requires_grad_()
    y = squeeze_excite(x, *ws, residual=res, relu=case["relu"], backend=backend)
    assert y.dtype == dtype and y.shape == x.shape
    want, _ = se_truth(x, *ws, residual=res, relu=case["relu"])
    # x * gate + residual cancels where they nearly meet (relu keeps only such elements when x is far below
    # zero): then the error is measured against the terms' size, ||x|| (gate < 1)
    assert_rel(y, want, ref=x.detach(), msg=f"output {case}")
    dy = (torch.randn(case["shape"], generator=g) + 0.3).to(dtype).to(device) + 0.5 * x.detach()
    if case["relu"]:
        pre, _ = se_truth(x, *ws, residual=res)
        dy = away_from_kink(dy, pre, 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4)
    leaves = [x] + ws + ([res] if res is not None else [])
    names = ["x", "w1", "b1", "w2", "b2", "residual"][: len(leaves)]
    got = dict(zip(names, torch.autograd.grad(y, leaves, dy)))
    _, wg = se_truth(x, *ws, residual=res, relu=case["relu"], grad=dy)
    # fp32 weights with a low-precision x: their gradients are fp32 sums of low-precision products
    lowp = {k: dtype for k in ("w1", "b1", "w2", "b2")} if wdtype != dtype else None
    assert_grads(got, wg, dtypes=lowp, refs=_abs_term_scales(x, ws, dy), msg=str(case))


def _abs_term_scales(x, ws, dy):
    """Sums of |terms| of fc1's gradients (the true sums cancel across samples and can be ~0): the first
    FC's gradient is sum_n dz1[n] * pooled[n], bounded by sum_n |dz1[n]| * |pooled[n]|."""
    xd, dyd = x.detach().double().cpu(), dy.detach().double().cpu()
    w1, b1, w2, b2 = [t.detach().double().cpu().flatten(1) if t.dim() == 4 else t.detach().double().cpu() for t in ws]
    p = xd.mean((2, 3))
    h = torch.relu(p @ w1.t() + b1)
    gate = torch.sigmoid(h @ w2.t() + b2)
    dz2 = (dyd.abs() * xd.abs()).sum((2, 3)) * gate * (1 - gate)
    dz1 = dz2 @ w2.abs()
    return {"w1": (dz1.t() @ p.abs()).view_as(ws[0]), "b1": dz1.sum(0)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_squeeze_excite(backend):
    run_fuzz(se_cases(), run_case, backend)
