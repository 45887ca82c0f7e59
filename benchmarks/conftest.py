"""pytest-benchmark suites of the kernels: `python -m pytest benchmarks --benchmark-only` (add
--benchmark-autosave or --benchmark-json FILE, and --benchmark-compare to hold a run against an earlier one
or another card). Every timed call ends with torch.cuda.synchronize(), so the timer sees the device's work.
Without a GPU every benchmark is skipped. Not collected by the plain `python -m pytest` (testpaths=tests)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if GPU:
        return
    skip = pytest.mark.skip(reason="the kernel benchmarks need a CUDA GPU")
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.path).startswith(here + os.sep):  # only this folder's benchmarks
            item.add_marker(skip)


@pytest.fixture
def synced(benchmark):
    """benchmark(fn) with device-synchronised timing: each round runs fn() then waits for the GPU."""

    def run(fn, rounds=20, warmup_rounds=3):
        def call():
            fn()
            torch.cuda.synchronize()

        return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)

    return run
