"""Shared benchmark plumbing: timing, the ceilings measured in the same run, and result files.

Speed is claimed only against a baseline measured in the same run on the same card, and reported against
ceilings measured in that run: device-to-device copy bandwidth and a large bf16 matmul rate.
"""
import datetime
import json
import os
import platform
import statistics

import torch

from fastnets._timing import time_iterations


def require_cuda(dry_run=False):
    """The device to measure on: the GPU; with dry_run (the GPU check's CPU dry run), the CPU, where the
    numbers only prove the plumbing."""
    if dry_run:
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (none is visible to torch); nothing was measured")
    return "cuda"


def add_common_args(parser):
    parser.add_argument("--variants", choices=("all", "fastnets", "compile"), default="all",
                        help="fastnets: everything but the torch.compile baselines; compile: only those (the GPU "
                             "check measures them last; benchmarks/summarize.py matches the rows)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU, torch.compile with the eager backend: the plumbing only")


def kernel_bench_parser(description, quick_help):
    """The command line of a bench_<family>.py: --out, --quick and add_common_args' --variants, --dry-run."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    add_common_args(parser)
    return parser


def compile_module(mod, dry_run=False, **kwargs):
    return torch.compile(mod, backend="eager", **kwargs) if dry_run else torch.compile(mod, **kwargs)


class LiveRows(list):
    """A list of result rows that rewrites its JSON file (atomically) after every append, so that a step
    stopped at its limit leaves every row measured so far."""

    def __init__(self, out_dir, name, ceilings, part=None, extra=None):
        super().__init__()
        self.out_dir, self.name, self.ceilings, self.part, self.extra = out_dir, name, ceilings, part, dict(extra or {})
        self.path = None

    def append(self, row):
        super().append(row)
        self.flush()

    def flush(self, extra=None):
        if extra:
            self.extra.update(extra)
        self.path = write_results(self.out_dir, self.name, list(self), self.ceilings, self.extra, part=self.part)
        return self.path


def time_ms(fn, warmup=10, reps=50):
    """Median milliseconds of `fn()` over `reps` runs, each timed with CUDA events, after `warmup` runs
    (fastnets/_timing.py). The L2 cache is not flushed: the shapes measured here are far larger than L2.
    Without a GPU (dry run): a host timer, one warm-up run, few repetitions."""
    if not torch.cuda.is_available():
        return statistics.median(time_iterations(fn, "cpu", warmup=1, iters=1, repeats=min(reps, 3))) * 1e3
    return statistics.median(time_iterations(fn, "cuda", warmup=warmup, iters=1, repeats=reps)) * 1e3


def time_ms_and_peak_mib(fn, warmup=5, reps=20):
    """(median ms of fn, peak memory in MiB that fn allocated above what was allocated before it)."""
    if not torch.cuda.is_available():
        return time_ms(fn, warmup=warmup, reps=reps), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = time_ms(fn, warmup=warmup, reps=reps)
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbs(nbytes=1 << 30):
    """Device-to-device copy, GB/s counted as bytes read + bytes written."""
    if not torch.cuda.is_available():
        nbytes = 1 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda" if torch.cuda.is_available() else "cpu")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=5, reps=20)
    return 2 * nbytes / ms / 1e6


def bf16_matmul_tflops(n=8192):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = n if device == "cuda" else 64
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, warmup=5, reps=20)
    return 2 * n**3 / ms / 1e9


def environment():
    import fastnets

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "fastnets": fastnets.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": fastnets.available_backends(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def gpu_tag():
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-").lower()


_ENV = None


def write_results(out_dir, name, rows, ceilings, extra=None, part=None):
    """Write {name}[-{part}]_{gpu}.json under out_dir with environment, ceilings and rows (atomically: a
    reader never sees half a file); return its path."""
    global _ENV
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}{'-' + part if part else ''}_{gpu_tag()}.json")
    if _ENV is None:
        _ENV = environment()
    payload = {"benchmark": name, "part": part, "environment": _ENV, "ceilings": ceilings, "rows": rows}
    if extra:
        payload.update(extra)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def add_speedups(rows, group, baselines=("eager", "compile")):
    """Give each measured row `vs_<baseline>` = baseline ms / its ms, against the baseline variant's row
    with the same values of the `group` fields (same shape, pass, ...) measured in the same run."""
    base = {}
    for r in rows:
        if "ms" in r and r["variant"] in baselines:
            base[tuple(r.get(k) for k in group) + (r["variant"],)] = r["ms"]
    for r in rows:
        if "ms" not in r:
            continue
        key = tuple(r.get(k) for k in group)
        for b in baselines:
            if key + (b,) in base:
                r[f"vs_{b}"] = base[key + (b,)] / r["ms"]


def print_table(rows, columns):
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "-" if v is None else str(v)
