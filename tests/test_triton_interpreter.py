"""The Triton interpreter the CPU tests run on, under every Triton version CI tests (3.8, and 3.6 of the GPU
machine in CI's second leg): loops whose bounds are runtime values, as fastnets' kernels write them."""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton interpreter only")


def test_runtime_loop_bounds_run_under_the_interpreter():
    """`range(lo, hi)` with bounds from program_id, kernel arguments and tl.minimum (BatchNorm's split
    ranges): Triton 3.6's interpreter converts them with int() of a 1-element array, which NumPy >= 2.4
    refuses; fastnets.triton_kernels._common backports Triton 3.8's squeeze where the old line is found."""
    import triton
    import triton.language as tl

    from fastnets._tensors import device_guard
    from fastnets.triton_kernels import _common  # noqa: F401  (applies the backport under the interpreter)

    @triton.jit
    def split_sums(x_ptr, out_ptr, n, per_split):
        split = tl.program_id(0).to(tl.int64)
        lo = split * per_split
        hi = tl.minimum(lo + per_split, n)
        acc = 0.0
        for i in range(lo, hi):
            acc += tl.load(x_ptr + i)
        for i in range(0, n, per_split):  # a bound that is a plain argument
            acc += 0.0 * tl.load(x_ptr + i)
        tl.store(out_ptr + split, acc)

    x = torch.arange(10, dtype=torch.float32)
    out = torch.full((4,), float("nan"))
    with device_guard(x.device):  # as every fastnets launch (tests/launch_checker.py asserts it)
        split_sums[(4,)](x, out, 10, 3)
    torch.testing.assert_close(out, torch.tensor([3.0, 12.0, 21.0, 9.0]))
