"""What the Triton kernel modules share: whether they run under the interpreter, the Triton spelling of
the accumulation dtype, and the correctly rounded division and inverse square root of the statistics. (The
SM count their launch plans are sized by is fastnets._tensors.sm_count, shared with the CUDA backend.)"""
import os

import torch
import triton
import triton.language as tl

from .._tensors import acc_dtype

# Read once at import, as Triton reads it when the kernels are defined (tests/conftest.py sets it first).
# Under the interpreter the launchers pick small fixed tiles and upcast bf16 before tl.dot.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
