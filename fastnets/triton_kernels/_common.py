"""What the Triton kernel modules share: whether they run under the interpreter, the Triton spelling of the
accumulation dtype, the correctly rounded division and inverse square root of the statistics, the device
guard every launcher runs under, the argument normalisation of per-channel vectors, and the shared-memory
budget configurations are pruned by. (The SM count their launch plans are sized by is
fastnets._tensors.sm_count, shared with the CUDA backend.)"""
import functools
import os

import torch
import triton
import triton.language as tl

from .._tensors import acc_dtype, device_guard

# Read once at import, as Triton reads it when the kernels are defined (tests/conftest.py sets it first).
# Under the interpreter the launchers pick small fixed tiles and upcast bf16 before tl.dot.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Dynamic shared memory a block may opt in to on sm_90 (227 KiB): the budget off a GPU (the offline sm_90
# compile, tests/triton_aot.py). On a GPU the device's own opt-in limit is used. tests/launch_limits.py holds
# the same number for the launch checker; tests/test_launch_limits.py keeps the two equal.
SM90_SHARED_BYTES = 232448


def _backport_interpreter_loop_bounds():
    """Triton 3.6's interpreter (and older) turns a runtime loop bound, a scalar held as a 1-element array,
    into an int with int(array), which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted
    to Python scalars"): every `range(lo, hi)` whose bounds are not constexpr fails. Triton 3.8 squeezes
    the array first; this does the same, and only where the interpreter still has the old line."""
    import inspect

    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "fastnets_backport", False):
        return False
    try:
        source = inspect.getsource(patch)
    except (OSError, TypeError):
        return False
    if "int(self.handle.data))" not in source:
        return False

    def patch_lang_tensor(tensor, *args, **kwargs):
        out = patch(tensor, *args, **kwargs)
        # after Triton's own patch, which recorded the attribute's original value for its restore
        tensor.__index__ = lambda self: int(self.handle.data.squeeze())
        return out

    patch_lang_tensor.fastnets_backport = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


INTERPRETER_BACKPORT = INTERPRET and _backport_interpreter_loop_bounds()


def tl_acc_dtype(x):
    """fastnets._tensors.acc_dtype(x) as a Triton dtype (x a tensor or a torch dtype): tl.float64 for
    float64, tl.float32 otherwise."""
    return tl.float64 if acc_dtype(x) == torch.float64 else tl.float32


# Statistics that land in outputs (means, variances, invstd) are correctly rounded, as the CUDA C++ kernels'
# __fdiv_rn / __frsqrt_rn and torch's own: Triton's `/` and tl.sqrt on fp32 compile to the approximate
# div.full.f32 / sqrt.approx.f32 on NVIDIA GPUs. fp64 `/` and sqrt are IEEE already (div_rn/sqrt_rn are
# fp32-only). tests/test_stats_rounding.py compiles the statistics kernels for sm_90 and reads their PTX.
@triton.jit
def div_rn(a, b):
    """a / b rounded to nearest; a an fp32 or fp64 tensor, b a tensor or number (converted as `/` does)."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.math.div_rn(a, b + tl.zeros_like(a))  # an int b (a count; 1 specialises to a constexpr) as fp32


@triton.jit
def rsqrt_rn(v):
    """1 / sqrt(v) from a correctly rounded square root and division (within 1 ulp of the exact value; the
    CUDA path's __frsqrt_rn rounds once, which Triton's interpreter cannot call)."""
    if v.dtype == tl.float64:
        return 1.0 / tl.sqrt(v)
    else:
        return tl.math.div_rn(1.0, tl.math.sqrt_rn(v))


def on_tensor_device(launcher):
    """Decorator of a Triton primitive: its launches run with the device of its first tensor argument
    current (fastnets._tensors.device_guard), and so on that device's current stream."""

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor):
                with device_guard(a.device):
                    return launcher(*args, **kwargs)
        raise TypeError(f"{launcher.__name__}: no tensor argument to take the device from")

    return guarded


def vector(t):
    """A per-channel vector (or a small [N, C] matrix) as the kernels index it: contiguous, so that element
    i is at ptr + i. Kernels read these with unit stride; a strided view (v[::2], a column of a matrix)
    would otherwise read its neighbours."""
    return None if t is None else t.contiguous()


def max_shared_bytes(device):
    """The shared memory one block may use on `device`: the GPU's opt-in limit, sm_90's off a GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return getattr(props, "shared_memory_per_block_optin", SM90_SHARED_BYTES)
    return SM90_SHARED_BYTES
