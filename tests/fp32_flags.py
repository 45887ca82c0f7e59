"""The TF32 flags of torch's fp32 convolutions and matmuls, set for a block of code (no other side effects: the
GPU plan, tests/triton_aot.py and benchmarks/triton_warmup.py import it without the test suite's conftest).
docs/tf32.md has the policy: fastnets' Triton convolution follows the flag cuDNN's convolutions follow."""
import torch


def _new_api():
    return hasattr(torch.backends, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")  # torch >= 2.9


def get_fp32_precision():
    """(conv, matmul) as torch's fp32_precision API spells them (legacy flags read as "tf32"/"ieee")."""
    b = torch.backends
    if _new_api():
        return b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision
    return ("tf32" if b.cudnn.allow_tf32 else "ieee"), ("tf32" if b.cuda.matmul.allow_tf32 else "ieee")


def set_fp32_precision(conv, matmul=None):
    """fp32 convolutions (cuDNN and fastnets' Triton convolution, which reads the same flag) at `conv`
    precision, cuBLAS matmuls at `matmul` ("ieee", "tf32"; None leaves it), with torch's fp32_precision API
    (torch >= 2.9; the legacy allow_tf32 flags before)."""
    b = torch.backends
    if _new_api():
        b.cudnn.conv.fp32_precision = conv
        if matmul is not None:
            b.cuda.matmul.fp32_precision = matmul
    else:
        b.cudnn.allow_tf32 = conv == "tf32"
        if matmul is not None:
            b.cuda.matmul.allow_tf32 = matmul == "tf32"


class fp32_precision:
    """Context: set_fp32_precision(conv, matmul) inside, the previous state restored on exit."""

    def __init__(self, conv="ieee", matmul="ieee"):
        self.conv, self.matmul = conv, matmul

    def __enter__(self):
        self.old = get_fp32_precision()
        set_fp32_precision(self.conv, self.matmul)
        return self

    def __exit__(self, *exc):
        set_fp32_precision(*self.old)
