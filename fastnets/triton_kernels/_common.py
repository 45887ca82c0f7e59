"""What the Triton kernel modules share: whether they run under the interpreter, the Triton spelling of the
accumulation dtype, the device guard every launcher runs under, the argument normalisation of per-channel
vectors, and the shared-memory budget configurations are pruned by. (The SM count their launch plans are
sized by is fastnets._tensors.sm_count, shared with the CUDA backend.)"""
import functools
import os

import torch
import triton.language as tl

from .._tensors import acc_dtype, device_guard

# Read once at import, as Triton reads it when the kernels are defined (tests/conftest.py sets it first).
# Under the interpreter the launchers pick small fixed tiles and upcast bf16 before tl.dot.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Dynamic shared memory a block may opt in to on sm_90 (227 KiB): the budget off a GPU (the offline sm_90
# compile, tests/triton_aot.py). On a GPU the device's own opt-in limit is used. tests/launch_limits.py holds
# the same number for the launch checker; tests/test_launch_limits.py keeps the two equal.
SM90_SHARED_BYTES = 232448


def tl_acc_dtype(x):
    """fastnets._tensors.acc_dtype(x) as a Triton dtype (x a tensor or a torch dtype): tl.float64 for
    float64, tl.float32 otherwise."""
    return tl.float64 if acc_dtype(x) == torch.float64 else tl.float32


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
