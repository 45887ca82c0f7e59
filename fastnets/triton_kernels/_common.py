"""What the Triton kernel modules share: whether they run under the interpreter and the Triton spelling of
the accumulation dtype. (The SM count their launch plans are sized by is fastnets._tensors.sm_count, shared
with the CUDA backend.)"""
import os

import torch
import triton.language as tl

from .._tensors import acc_dtype

# Read once at import, as Triton reads it when the kernels are defined (tests/conftest.py sets it first).
# Under the interpreter the launchers pick small fixed tiles and upcast bf16 before tl.dot.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def tl_acc_dtype(x):
    """fastnets._tensors.acc_dtype(x) as a Triton dtype (x a tensor or a torch dtype): tl.float64 for
    float64, tl.float32 otherwise."""
    return tl.float64 if acc_dtype(x) == torch.float64 else tl.float32
