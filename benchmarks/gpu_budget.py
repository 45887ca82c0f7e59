"""The GPU check's time on an H100 machine, PREDICTED before a GPU runs it: each step's seconds from what it
does (the bytes and FLOPs of the plan's cases and of the 2^31-element tests, the Triton kernel variants it
compiles, the processes it starts) under the stated assumptions below, against the one call's 360 s.

    python3 benchmarks/gpu_budget.py [--json PATH]

The check's `info` step writes it to summary.json ("budget") and its table prints it beside each step's
measured seconds, so that a GPU run corrects the assumptions; the CPU dry run (CI) prints it too. Every
number here is an estimate: the assumptions are named constants, the counts come from tests/gpu_plan.py.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

CALL_SECONDS = 360  # the one GPU call, the build included
BUDGET_SECONDS = 345  # gpu_check.sh's FASTNETS_GPU_CHECK_SECONDS default: the steps' share of the call

# ---- assumptions (an H100 SXM 80 GB machine with 16 CPU cores); change them when a GPU run disagrees
BANDWIDTH = 2.0e12  # B/s: torch's and our element-wise/reduction kernels, ~60 % of the HBM3's 3.35 TB/s
FLOPS = {  # convolution FLOP/s by the dtype it computes in
    "float64": 5e12,  # cuDNN's float64 convolutions (no tensor cores; ~15 % of 34 TFLOP/s FP64)
    "float32": 25e12,  # IEEE float32 (TF32 off), ~40 % of 67 TFLOP/s FP32
    "float16": 300e12, "bfloat16": 300e12,  # tensor cores, ~30 % of 989 TFLOP/s dense
}
# each tensor a case holds is written and read about 10 times in all: generated, copied to the reference
# dtype, our forward and backward, the reference's, the error measure's float64 chunks
PASSES = 10
CASE_SECONDS = 0.5  # per plan case: Python, ~50 launches, allocations, empty_cache, cuDNN's heuristics
START_SECONDS = 8  # a python3 (or pytest worker) importing torch, Triton, fastnets and starting CUDA
SANITIZER_START_SECONDS = 15  # compute-sanitizer's start and the instrumented CUDA context, per run
SANITIZER_CASE_SECONDS = 1.0  # per small case under memcheck/racecheck (every launch instrumented)
# One Triton kernel variant compiled for sm_90 on one core: half the 6.2 s per variant measured with
# `tests/triton_aot.py squeeze_excite --jobs 1` (132 variants in 819 s, Triton 3.8) on the shared, loaded
# 2-core CPU machine the project develops on.
COMPILE_SECONDS = 3.1
JOBS = 16
# Distinct Triton kernel variants the warm-up compiles. The triton-small tier's: 46 (its 12 cases recorded
# on the CPU with the warm-up's recorder, 53 launches). The full tier's are not counted: recording it needs
# its full-size tensors (a GPU; on the CPU it did not finish in 25 minutes here). Until a GPU run's
# warmup.json gives them (`variants`), 4 per Triton case, as the small tier's 3.8.
FULL_VARIANTS = None
SMALL_VARIANTS = 46
# The 2^31-element tests' Triton launches take int64 sizes, variants no warm-up compiles: about 4 per
# Triton test (BN: stats, finalize, apply, 2 backward; conv: forward, grad input, grad weight; SE: 5),
# compiled one at a time in the test process.
SLOW_TRITON_VARIANTS = 24
# The CUDA extension: nvcc for sm_90, one translation unit per csrc/*.cu on 16 processes, so the longest
# one (BUILD_LONGEST_TU) plus the link and pip's editable install (BUILD_OTHER).
BUILD_LONGEST_TU = 60
BUILD_OTHER = 20
# Steps that size their own work to their limit: the benchmarks time fixed shapes for a fixed number of
# repetitions after compiling their kernels (not in the warm-up's cache), the model benchmark gets
# --time-budget = limit - 20. Their prediction is their limit.
LIMITED = ("bn", "se", "conv", "bn_compile", "se_compile", "conv_compile", "models", "traffic")


def step_limits(script=os.path.join(HERE, "gpu_check.sh")):
    """{step: limit seconds} from gpu_check.sh's `step NAME LIMIT ...` lines, in their order."""
    limits = {}
    with open(script) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "step" and parts[2].isdigit():
                limits[parts[1]] = int(parts[2])
    return limits


def _conv_flops(case):
    n, cin, h, cout, k, s, p = case.shape
    o = (h + 2 * p - k) // s + 1
    return 2.0 * n * cout * o * o * cin * k * k


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def case_gpu_seconds(case, compare=True):
    """One plan case's GPU time: PASSES over the tensors it holds at BANDWIDTH, plus the convolutions'
    forward, grad-input and grad-weight FLOPs (ours and, with `compare`, the reference's)."""
    import gpu_plan

    if compare:
        nbytes = gpu_plan.tensor_bytes(case)
    else:  # the warm-up's recording: our side only, the activation-dtype tensors
        (a_in, _), (a_out, _) = gpu_plan.TENSORS[case.family]
        n_in, n_out = gpu_plan.io_elements(case)
        nbytes = (a_in * n_in + a_out * n_out) * case.dtype.itemsize
    t = PASSES * nbytes / BANDWIDTH
    if case.family in ("conv", "conv_bn", "conv_prologue"):
        t += 3 * _conv_flops(case) / FLOPS[_dtype_name(case.dtype)]
        if compare:
            t += 3 * _conv_flops(case) / FLOPS[_dtype_name(gpu_plan.conv_reference_dtype(case))]
    return t


def estimate(card_bytes=80e9, limits=None):
    """[(step, seconds, basis)] in the check's order, with the plan's workers for a card of `card_bytes`."""
    import gpu_plan

    full = gpu_plan.cases("full")
    small = gpu_plan.cases("small")
    tri_small = gpu_plan.cases("triton-small")
    workers, big = gpu_plan.plan_workers(card_bytes, full)
    rows = []
    rows.append(("build", BUILD_LONGEST_TU + BUILD_OTHER,
                 f"nvcc sm_90: the longest of the csrc/*.cu units ({BUILD_LONGEST_TU} s) + link and pip "
                 f"({BUILD_OTHER} s); a carried wheel that loads takes ~5 s"))
    rows.append(("info", START_SECONDS + 2, "one python3 start + nvidia-smi"))
    tri_full = [c for c in full if c.backend == "triton"]
    record = START_SECONDS + sum(case_gpu_seconds(c, compare=False) + CASE_SECONDS for c in tri_full + tri_small)
    variants = (FULL_VARIANTS or 4 * len(tri_full)) + (SMALL_VARIANTS or 4 * len(tri_small))
    compile_s = START_SECONDS + variants * COMPILE_SECONDS / JOBS
    rows.append(("warmup", record + compile_s,
                 f"record {len(tri_full) + len(tri_small)} Triton cases ({record:.0f} s) + compile {variants} "
                 f"variants x {COMPILE_SECONDS} s / {JOBS} processes ({compile_s:.0f} s)"))
    gpu = sum(case_gpu_seconds(c) for c in full)
    cpu = sum(CASE_SECONDS for c in full)
    plan = START_SECONDS + max(gpu, (gpu + cpu) / workers)
    rows.append(("plan", plan,
                 f"{len(full)} cases: {gpu:.0f} s of GPU (bytes / {BANDWIDTH / 1e12:.1f} TB/s, conv FLOPs) + "
                 f"{CASE_SECONDS} s each, on {workers} workers (largest case {gpu_plan.peak_bytes(big) / 1e9:.1f} GB)"))
    cxx = [c for c in small if c.backend == "cuda" and c.family not in ("conv",)]
    san = 3 * SANITIZER_START_SECONDS + (2 * len(cxx) + len(tri_small)) * SANITIZER_CASE_SECONDS
    rows.append(("sanitizer", san,
                 f"memcheck + racecheck on {len(cxx)} CUDA C++ cases, memcheck on {len(tri_small)} Triton cases: "
                 f"3 x {SANITIZER_START_SECONDS} s start + {SANITIZER_CASE_SECONDS} s per case"))
    elements = 2**31 + 2**22
    data = 12 * (7 * elements * 2 * PASSES + 16 * 10 * (elements // 16) * 8) / BANDWIDTH
    compile_slow = SLOW_TRITON_VARIANTS * COMPILE_SECONDS
    rows.append(("slow", START_SECONDS + data + compile_slow,
                 f"12 tests over 2^31 elements: ~{data:.0f} s of bandwidth (7 bf16 tensors, float64 chunks on the "
                 f"GPU) + {SLOW_TRITON_VARIANTS} int64 Triton variants compiled serially ({compile_slow:.0f} s)"))
    limits = limits or step_limits()
    for step in LIMITED:
        rows.append((step, limits.get(step, 0), "allowance: its limit (the step sizes its work to it)"))
    order = list(limits)  # gpu_check.sh's order
    rows.sort(key=lambda r: order.index(r[0]) if r[0] in order else len(order))
    return rows, workers


def schedule(rows, limits=None):
    """[(step, estimate, limit, counted, basis, note)]: each step counted at min(estimate, its limit), as
    gpu_check.sh cuts it, and skipped once the budget is spent (its `left < 10` rule)."""
    limits = limits or step_limits()
    out, used = [], 0.0
    for step, seconds, basis in rows:
        limit = limits.get(step, seconds)
        left = BUDGET_SECONDS - used - 5
        if left < 10:
            out.append((step, seconds, limit, 0.0, basis, "skipped: the budget is spent"))
            continue
        counted = min(seconds, limit, left)
        note = "" if counted == seconds else ("cut at its limit" if counted == limit else "cut by the budget")
        used += counted
        out.append((step, seconds, limit, counted, basis, note))
    return out


def table(rows):
    lines = ["PREDICTED GPU seconds per step (benchmarks/gpu_budget.py: an estimate for an H100 machine, not a measurement)",
             "step          estimate  limit  counted  cumulative  basis"]
    used = 0.0
    for step, seconds, limit, counted, basis, note in schedule(rows):
        used += counted
        lines.append(f"{step:<13} {seconds:>6.0f} s {limit:>5} {counted:>6.0f} s {used:>8.0f} s  {basis}"
                     + (f"  [{note}]" if note else ""))
    total = sum(t for _, t, _ in rows)
    lines.append(f"every step in full: {total:.0f} s; within the call: {used:.0f} s of the steps' {BUDGET_SECONDS} s "
                 f"budget (the {CALL_SECONDS} s call)")
    return "\n".join(lines)


def as_json(rows, workers):
    return {"steps": [{"step": s, "estimate_seconds": round(t, 1), "limit": lim, "counted_seconds": round(c, 1),
                       "note": n, "basis": b} for s, t, lim, c, b, n in schedule(rows)],
            "total_seconds": round(sum(t for _, t, _ in rows), 1), "call_seconds": CALL_SECONDS,
            "budget_seconds": BUDGET_SECONDS, "plan_workers": workers, "predicted": True}


def main(argv):
    """--card-bytes B (default: this GPU's memory, else 80 GB), --json PATH (the prediction),
    --workers-file PATH (the plan's pytest workers for this card, as `tests/gpu_plan.py workers` prints)."""
    import torch

    import gpu_plan

    if "--card-bytes" in argv:
        card = float(argv[argv.index("--card-bytes") + 1])
    else:
        card = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80e9
    rows, workers = estimate(card)
    print(table(rows))
    if "--json" in argv:
        with open(argv[argv.index("--json") + 1], "w") as f:
            json.dump(as_json(rows, workers), f, indent=1)
    if "--workers-file" in argv:
        _, big = gpu_plan.plan_workers(card, gpu_plan.cases("full"))
        with open(argv[argv.index("--workers-file") + 1], "w") as f:
            f.write(f"{workers}\nplan workers: {workers} (largest case {big.id}: about "
                    f"{gpu_plan.peak_bytes(big) / 1e9:.1f} GB at its peak with its worker; {workers} x that <= "
                    f"{gpu_plan.MEMORY_FRACTION:.0%} of {card / 1e9:.1f} GB)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
