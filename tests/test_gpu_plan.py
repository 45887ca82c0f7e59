"""The GPU test plan (tests/gpu_plan.py) as pytest cases, marked `gpu_plan`.

On a GPU it runs every op family x GPU backend on real ResNet-50 / SE-ResNet-50 shapes (FASTNETS_GPU_PLAN=full,
the default there; `small` for compute-sanitizer). On a CPU it runs only when FASTNETS_GPU_PLAN=dry is set
(the GPU check's dry run, which CI runs): tiny shapes on the reference backend and the Triton interpreter.
Each case records family, backend, config and its worst error as junit properties, which
benchmarks/summarize.py turns into the per family x backend x dtype table of summary.json.
"""
import os
import time

import pytest
import torch

import fastnets
import gpu_plan
from conftest import REL_BOUND, rel_error

ENABLED = torch.cuda.is_available() or os.environ.get("FASTNETS_GPU_PLAN", "").strip().lower() == "dry"
pytestmark = pytest.mark.gpu_plan
CASES = gpu_plan.cases() if ENABLED else []
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not ENABLED, reason="the GPU plan needs a GPU (or FASTNETS_GPU_PLAN=dry on a CPU)")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_plan_case(case, record_property):
    # the GPU check's step deadline (epoch seconds): past it the remaining cases skip at once, so that pytest
    # (and its xdist workers) end cleanly and write the junit file before the step's SIGINT
    deadline = float(os.environ.get("FASTNETS_PLAN_DEADLINE", "inf"))
    if time.time() > deadline:
        pytest.skip("the GPU check's time for this step is spent")
    for key in ("family", "backend", "config"):
        record_property(key, getattr(case, key))
    record_property("mode", "train" if case.train else "eval")
    if case.family in ("conv", "conv_bn", "conv_prologue"):
        record_property("reference", str(gpu_plan.conv_reference_dtype(case)).replace("torch.", ""))
    why = fastnets.backends.unavailable_reason(case.backend, DEVICE)
    if why is not None:
        record_property("unavailable", why[:200])
        pytest.fail(f"backend {case.backend} cannot run here: {why}")
    try:
        results = gpu_plan.run_case(case, DEVICE)
    finally:
        if DEVICE == "cuda":  # the xdist workers share the GPU: hand a case's blocks back before the next
            torch.cuda.empty_cache()
    assert results, "the case compared nothing"
    worst = max(results, key=lambda r: r[1] / r[2])
    record_property("worst_what", worst[0])
    record_property("worst_error", f"{worst[1]:.3e}")
    record_property("worst_ratio", f"{worst[1] / worst[2]:.3f}")
    bad = [f"{w}: {e:.3e} > {b:.1e}" for w, e, b in results if not e <= b]
    assert not bad, "; ".join(bad)


def test_device_rel_error_is_conftests():
    """The plan's on-device error is conftest.rel_error (the same measure), NaN/Inf handling included."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(7, 5, generator=g)
    b = a + 1e-3 * torch.randn(7, 5, generator=g)
    assert gpu_plan.rel_error_device(a, b) == pytest.approx(rel_error(a, b), rel=1e-12)
    assert gpu_plan.rel_error_device(a.bfloat16(), b) == pytest.approx(rel_error(a.bfloat16(), b), rel=1e-12)
    nan = b.clone()
    nan[0, 0] = float("nan")
    assert gpu_plan.rel_error_device(a, nan) == rel_error(a, nan) == float("inf")
    both = a.clone()
    both[0, 0] = float("nan")
    assert gpu_plan.rel_error_device(both, nan) == pytest.approx(rel_error(both, nan), rel=1e-12)
    assert gpu_plan.rel_error_device(a[:3], b) == float("inf")
    results = []
    gpu_plan.check(results, "x", a * 1.02, a, torch.float32)  # a 2 % scale error fails every bound
    assert results[0][1] > REL_BOUND[torch.bfloat16]


def test_plan_covers_every_family_backend_and_mode():
    for tier in ("full", "small", "dry"):
        cs = gpu_plan.cases(tier)
        assert len({c.id for c in cs}) == len(cs), f"duplicate case ids in tier {tier}"
        for fam in gpu_plan.FAMILIES:
            got = {(c.backend, c.train) for c in cs if c.family == fam}
            modes = {True} if fam in ("conv", "conv_prologue") else {True, False}  # train only
            assert got == {(b, m) for b in gpu_plan.backends_for(tier) for m in modes}, (tier, fam, got)
    full = gpu_plan.cases("full")
    assert {c.epilogue for c in full if c.family == "conv"} == set(gpu_plan.CONV_EPILOGUES)
    assert {c.config for c in full} >= {"bf16-nhwc", "fp16-nhwc", "fp32-nchw", "bf16-nchw"}
    assert all(c.shape[0] == 256 for c in full if c.config == "bf16-nhwc")
