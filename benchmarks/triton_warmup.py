"""Compile the GPU test plan's Triton kernels in parallel before the plan runs, and say how long it took.

Run on the GPU machine before `pytest tests/test_gpu_plan.py`, with the same TRITON_CACHE_DIR:
  1. record: this process runs every `triton` case of tests/gpu_plan.py (its fastnets forward and backward,
     no reference; the plan's tier and the sanitizer's triton-small tier) with JITFunction.run replaced by a
     recorder, so the real launchers pick block sizes, grids and flags exactly as in the tests; each
     distinct variant (Triton's specialization: constexprs, dtypes, 16-byte alignment, ints equal to 1 or
     divisible by 16) is kept once.
  2. compile: a fresh process (one that never touched CUDA) replays each variant through the original
     JITFunction.run(..., warmup=True) for the GPU's target in forked children, --jobs at a time, on meta
     tensors with the offline driver of tests/triton_offline.py (shared with tests/triton_aot.py). Triton
     writes each compiled kernel to its on-disk cache under the same key the tests' launches look up, so they
     load instead of compiling.
With FASTNETS_GPU_CHECK_DRYRUN=1 (the CPU dry run) it records the `dry` tier on the CPU and compiles at most
--max-variants of them for sm_90: the plumbing, not the speed.

    python3 benchmarks/triton_warmup.py [--jobs 16] [--max-variants N]
Prints one JSON line last: variants, compiled, failures, record/compile seconds.
"""
import importlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DRY = os.environ.get("FASTNETS_GPU_CHECK_DRYRUN", "") == "1"


def _spec(v):
    import torch

    if isinstance(v, torch.Tensor):
        return ("__tensor__", str(v.dtype).replace("torch.", ""), v.data_ptr() % 16 == 0)
    return v


def _key(fn, args, kwargs):
    from triton_offline import int_specialization, variant_key

    def k(v):
        if isinstance(v, tuple) and v and v[0] == "__tensor__":
            return v
        if isinstance(v, int) and not isinstance(v, bool):
            return int_specialization(v)
        return ("v", repr(v))

    return variant_key(fn, args, kwargs, k)


def record():
    """Run the plan's triton cases with launches recorded; return the distinct variants (picklable)."""
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["FASTNETS_POISON_OUTPUTS"] = "0"
    os.environ.setdefault("FASTNETS_CONV_TUNE", "fixed")
    if DRY:
        os.environ["FASTNETS_GPU_PLAN"] = "dry"
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)
    from triton.runtime.jit import JITFunction

    records = []

    def recorder(self, *args, grid, warmup, **kwargs):
        records.append((self, tuple(_spec(a) for a in args), {k: _spec(v) for k, v in kwargs.items()}))

    JITFunction.run = recorder
    import torch

    import fastnets
    import gpu_plan

    if DRY:  # Triton's launchers on CPU tensors, recorded (never run): allowed only for the recording
        fastnets.backends._triton_interpreting = lambda: True
        fastnets.backends._triton_import_problem.cache_clear()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    errors = []
    cases = [c for c in gpu_plan.cases() if c.backend == "triton"]
    if not DRY:  # the sanitizer step's Triton tier too: compute-sanitizer then loads them from the cache
        cases += gpu_plan.cases("triton-small")
    for case in cases:
        try:
            gpu_plan.run_case(case, device, compare=False)
        except Exception as e:  # the tests will report it; the warm-up goes on
            errors.append(f"{case.id}: {type(e).__name__}: {str(e)[:200]}")
    variants = {}
    for fn, args, kwargs in records:
        variants.setdefault(_key(fn, args, kwargs), (fn.__module__, fn.__name__, args, kwargs))
    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    return list(variants.values()), len(cases), len(records), errors, cap[0] * 10 + cap[1]


# ---------------------------------------------------------------------------------------------- compiling

_WORK = []


def _find(module, name):
    from triton.runtime.jit import JITFunction

    mod = importlib.import_module(module)
    for obj in vars(mod).values():
        for _ in range(4):  # Autotuner / Heuristics wrap a JITFunction in .fn
            if isinstance(obj, JITFunction):
                break
            obj = getattr(obj, "fn", None)
        if isinstance(obj, JITFunction) and obj.__name__ == name:
            return obj
    raise LookupError(f"no Triton kernel {name} in {module}")


def _compile_one(i, capability):
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton_offline import OfflineDriver

    module, name, args, kwargs = _WORK[i]

    def real(v):
        if isinstance(v, tuple) and v and v[0] == "__tensor__":
            return torch.empty(1, dtype=getattr(torch, v[1]), device="meta")
        return v

    t0 = time.time()
    driver.set_active(OfflineDriver(GPUTarget("cuda", capability, 32)))
    fn = _find(module, name)
    fn.run(*map(real, args), grid=None, warmup=True, **{k: real(v) for k, v in kwargs.items()})
    return time.time() - t0


def compile_all(path, jobs, capability):
    """Child process: compile every variant in `path` (a pickle), `jobs` forked children at a time."""
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, os.path.join(ROOT, "tests"))  # triton_offline, shared with tests/triton_aot.py
    sys.path.insert(0, ROOT)
    with open(path, "rb") as f:
        _WORK[:] = pickle.load(f)
    import multiprocessing

    import fastnets  # noqa: F401  (imports the kernel modules before forking)

    for module in sorted({w[0] for w in _WORK}):
        importlib.import_module(module)
    # the variants that need an unaligned pointer cannot be built from meta tensors: left to the tests
    todo = [i for i, w in enumerate(_WORK)
            if all(not (isinstance(a, tuple) and a and a[0] == "__tensor__" and not a[2])
                   for a in list(w[2]) + list(w[3].values()))]
    failures = []
    t0 = time.time()
    with multiprocessing.get_context("fork").Pool(max(1, jobs)) as pool:
        results = [(i, pool.apply_async(_compile_one, (i, capability))) for i in todo]
        for i, r in results:
            try:
                r.get(timeout=300)
            except Exception as e:
                failures.append(f"{_WORK[i][1]}: {type(e).__name__}: {str(e)[:300]}")
    return {"compiled": len(todo) - len(failures), "skipped_unaligned": len(_WORK) - len(todo),
            "failures": failures, "compile_seconds": round(time.time() - t0, 1)}


def main(argv):
    jobs = os.cpu_count() or 1
    max_variants = None
    if "--jobs" in argv:
        jobs = int(argv[argv.index("--jobs") + 1])
    if "--max-variants" in argv:
        max_variants = int(argv[argv.index("--max-variants") + 1])
    if "--compile" in argv:
        path = argv[argv.index("--compile") + 1]
        cap = int(argv[argv.index("--capability") + 1])
        print(json.dumps(compile_all(path, jobs, cap)))
        return 0
    t0 = time.time()
    variants, ncases, nlaunches, errors, cap = record()
    t_record = time.time() - t0
    if max_variants is not None:
        variants = variants[:max_variants]
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as f:
        pickle.dump(variants, f)
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")  # the compiler needs no GPU
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--compile", f.name, "--jobs", str(jobs),
                           "--capability", str(cap)], env=env, capture_output=True, text=True)
    os.unlink(f.name)
    sys.stderr.write(proc.stderr[-3000:])
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {
        "failures": [f"the compile process failed (exit {proc.returncode})"], "compiled": 0}
    result.update(cases=ncases, launches=nlaunches, variants=len(variants), record_seconds=round(t_record, 1),
                  jobs=jobs, target=f"sm_{cap}", case_errors=errors[:10],
                  seconds=round(time.time() - t0, 1))
    for e in errors[:10]:
        print("warm-up case error:", e)
    for e in result["failures"][:10]:
        print("warm-up compile failure:", e)
    print(f"Triton warm-up: {result['compiled']} of {result['variants']} kernel variants compiled in "
          f"{result.get('compile_seconds', '?')} s on {jobs} processes (recorded in {t_record:.1f} s)")
    print(json.dumps(result))
    return 1 if (result["failures"] or proc.returncode) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
