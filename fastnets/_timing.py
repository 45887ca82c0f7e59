"""The one timer of fastnets: the benchmark CLI (fastnets/bench/timing.py), the kernel benchmarks
(benchmarks/common.py, benchmarks/bench_augment.py) and the conv family's measured `auto` policy time with it.

On a CUDA device each timed repeat is bracketed by CUDA events (the GPU's time for the work queued between
them, not the host's); elsewhere by time.perf_counter (the calls are synchronous). The warm-up calls are not
timed and are waited for before the first repeat. Callers pick their own statistic of the repeats (the
median, mostly). It sits at the package root so that every layer can import it without climbing back up.
"""
import time

import torch


def synchronize(device):
    """Wait for the work queued on `device` (a no-op off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(fn, device, warmup, iters, repeats):
    """Run `fn` `warmup` times untimed, then `repeats` times `iters` runs; return the per-iteration seconds
    of each repeat (a list of `repeats` floats)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    cuda = torch.device(device).type == "cuda"
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) / iters)
    return times
