"""The GPU test plan (tests/gpu_plan.py) as pytest cases, marked `gpu_plan`.

On a GPU it runs every op family x GPU backend on real ResNet-50 / SE-ResNet-50 shapes (FASTNETS_GPU_PLAN=full,
the default there; `small` for compute-sanitizer). On a CPU it runs only when FASTNETS_GPU_PLAN=dry is set
(the GPU check's dry run, which CI runs): tiny shapes on the reference backend and the Triton interpreter.
Each case records family, backend, config and its worst error as junit properties, which
benchmarks/summarize.py turns into the per family x backend x dtype table of summary.json. Only the cases
are marked `gpu_plan`; the other tests here check the plan's own parts (error measure, memory estimate).
"""
import os
import time

import pytest
import torch

import fastnets
import gpu_plan
from conftest import REL_BOUND, norm64, rel_error

# on a CPU: the dry tier, or the Triton tier under the interpreter (the GPU check's dry run runs both)
ENABLED = torch.cuda.is_available() or os.environ.get("FASTNETS_GPU_PLAN", "").strip().lower() in ("dry", "triton-small")
CASES = gpu_plan.cases() if ENABLED else []
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.gpu_plan
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


def _whole_rel_error(a, b):
    """The measure written directly over whole tensors on the host: ||a - b|| / ||b|| over the finite
    elements in float64 (inf where NaN/Inf positions differ)."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb):
        return float("inf")
    return (torch.linalg.vector_norm(a[fa] - b[fb]) / torch.linalg.vector_norm(b[fb])).item()


def test_rel_error_in_chunks_is_the_whole_tensor_measure():
    """conftest.rel_error, as the plan and the 2^31 tests use it (float64 chunks on the tensors' device), is
    ||a - b|| / ||b|| over the whole tensors whatever the chunk: non-contiguous and bf16 inputs, a leading
    dimension of 1, NaN/Inf positions and values, shapes."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(7, 5, 3, 4, generator=g)
    b = a + 1e-3 * torch.randn(7, 5, 3, 4, generator=g)
    cl = b.contiguous(memory_format=torch.channels_last)
    for chunk in (1, 7, 50, 1 << 24):
        for x, y in ((a, b), (a.bfloat16(), b), (a, cl), (a[:1], b[:1]), (a[0, 0, 0, 0], b[0, 0, 0, 0])):
            assert rel_error(x, y, chunk) == pytest.approx(_whole_rel_error(x, y), rel=1e-12), (chunk, x.shape)
        nan = b.clone()
        nan[6, 4, 2, 3] = float("nan")  # in the last chunk
        assert rel_error(a, nan, chunk) == float("inf")
        both = a.clone()
        both[6, 4, 2, 3] = float("nan")
        assert rel_error(both, nan, chunk) == pytest.approx(_whole_rel_error(both, nan), rel=1e-12)
        inf = nan.clone()
        inf[6, 4, 2, 3] = float("inf")
        both[6, 4, 2, 3] = -float("inf")  # same position, other value
        assert rel_error(both, inf, chunk) == float("inf")
    assert rel_error(a[:3], b) == float("inf")
    assert norm64(b, 7) == pytest.approx(torch.linalg.vector_norm(b.double()).item(), rel=1e-12)
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
    # the sanitizer's Triton tier: Triton only, every family, both layouts, a few tiny cases of the small tier
    tri = gpu_plan.cases("triton-small")
    small = {(c.family, c.dtype, c.channels_last, c.shape) for c in gpu_plan.cases("small")}
    assert {c.backend for c in tri} == {"triton"} and {c.family for c in tri} == set(gpu_plan.FAMILIES)
    assert {c.channels_last for c in tri} == {True, False} and len(tri) <= 12
    assert all((c.family, c.dtype, c.channels_last, c.shape) in small for c in tri)


def _measured_tensor_bytes(case):
    """The CPU allocator's peak above its starting point while a case runs on the CPU: every allocation and
    free that torch's profiler records (attributed to the op that made it), in time order. The legacy
    profiler: Kineto's takes 16 s here to look for a GPU first."""
    with torch.autograd.profiler.profile(profile_memory=True, use_kineto=False) as prof:
        gpu_plan.run_case(case, "cpu")
    now = peak = 0
    events = (e for e in prof.function_events if e.self_cpu_memory_usage)
    for e in sorted(events, key=lambda e: e.time_range.start):
        now += e.self_cpu_memory_usage
        peak = max(peak, now)
    return peak


# (case, tight): the estimate must bound the measured peak; `tight` ones, the fullest variant of each
# family, also within 35 %. Shapes with the input larger than the output and the reverse (conv's two counts).
PEAK_CASES = [
    (gpu_plan.Case("batch_norm", "reference", gpu_plan.BF16, True, True, (8, 16, 32, 32)), True),
    (gpu_plan.Case("batch_norm", "reference", gpu_plan.F32, False, False, (8, 16, 32, 32)), True),
    (gpu_plan.Case("bn_add_relu", "reference", gpu_plan.BF16, True, True, (8, 16, 32, 32)), True),
    (gpu_plan.Case("squeeze_excite", "reference", gpu_plan.BF16, True, True, (8, 16, 32, 32, 4)), True),
    (gpu_plan.Case("conv", "reference", gpu_plan.BF16, True, True, (8, 4, 32, 16, 3, 1, 1), "bn_fold_res_relu"), True),
    (gpu_plan.Case("conv", "reference", gpu_plan.BF16, True, True, (8, 32, 32, 8, 1, 1, 0), "bn_fold_res_relu"), True),
    (gpu_plan.Case("conv", "reference", gpu_plan.BF16, True, True, (8, 32, 32, 8, 1, 1, 0), "plain"), False),
    (gpu_plan.Case("conv_bn", "reference", gpu_plan.BF16, True, True, (8, 4, 32, 16, 3, 1, 1)), True),
    (gpu_plan.Case("conv_bn", "reference", gpu_plan.BF16, True, False, (8, 32, 32, 8, 1, 1, 0)), True),
    (gpu_plan.Case("conv_prologue", "reference", gpu_plan.BF16, True, True, (8, 4, 32, 16, 3, 1, 1)), True),
    (gpu_plan.Case("conv_prologue", "reference", gpu_plan.BF16, True, True, (8, 32, 32, 8, 1, 1, 0)), True),
]


@pytest.mark.parametrize("case,tight", PEAK_CASES, ids=[c.id for c, _ in PEAK_CASES])
def test_peak_estimate_bounds_the_measured_peak(case, tight, monkeypatch):
    """gpu_plan.tensor_bytes, from which the GPU check caps its plan workers, against the peak the CPU
    allocator records for the same case (the reference backend; its float64 reference is the GPU's). The
    error measure's float64 chunks are made as small, relative to these tensors, as they are on a GPU's."""
    import conftest

    monkeypatch.setattr(conftest, "REL_CHUNK", 1024)
    est, got = gpu_plan.tensor_bytes(case), _measured_tensor_bytes(case)
    assert got > 0.5 * sum(gpu_plan.io_elements(case)) * 8, "the profiler recorded no tensors"
    assert est >= got, f"estimate {est} below the measured peak {got}"
    if tight:
        assert est <= 1.35 * got, f"estimate {est} over 1.35 x the measured peak {got}"


def test_plan_workers_keep_their_peaks_within_the_card():
    full = gpu_plan.cases("full")
    workers, big = gpu_plan.plan_workers(80e9, full)
    assert big.shape[0] == 256 and workers * gpu_plan.peak_bytes(big) <= 0.7 * 80e9
    assert (workers + 1) * gpu_plan.peak_bytes(big) > 0.7 * 80e9 or workers == 4
    assert gpu_plan.plan_workers(80e9, gpu_plan.cases("small"))[0] == 4  # tiny cases: the wanted 4
    assert gpu_plan.plan_workers(10e9, full)[0] == 1  # a card too small for two still runs one
    # the 205M-element bf16 BatchNorm + add + ReLU case: 12-20 GB (the estimate issue 28 started from)
    case = gpu_plan.Case("bn_add_relu", "triton", gpu_plan.BF16, True, True, (256, 256, 56, 56))
    assert 12e9 <= gpu_plan.tensor_bytes(case) <= 20e9
