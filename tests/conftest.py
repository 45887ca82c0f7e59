"""Shared test setup. On a machine without a GPU the Triton kernels run under the interpreter
(TRITON_INTERPRET=1 must be set before Triton kernels are defined, so before fastnets is imported)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The tests' tensors are tiny: OpenMP synchronisation dominates, and on a shared 2-core machine two
    # intra-op threads made the suite several times slower than one.
    torch.set_num_threads(1)
os.environ.setdefault("FASTNETS_POISON_OUTPUTS", "1")  # see fastnets._checks.new_output
# Convolution tests use one fixed Triton tile configuration instead of autotuning every tiny shape.
os.environ.setdefault("FASTNETS_CONV_TUNE", "fixed")

import pytest  # noqa: E402

import fastnets  # noqa: E402

# Tolerances per dtype, written down once: (atol, rtol) for outputs compared with torch/reference.
# fp16/bf16 outputs are rounded once by fastnets but several times by an eager chain of ops.
TOL = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (6e-2, 5e-2),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU = torch.cuda.is_available()


def tol(dtype):
    atol, rtol = TOL[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close(actual, expected, dtype=None, scale=1.0, msg=""):
    """torch.testing.assert_close with the tolerance of `dtype` (default: expected's), multiplied by `scale`."""
    atol, rtol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol * scale, rtol=rtol * scale, msg=msg or None)


def backends_here(family="batch_norm"):
    """The concrete backends to test on this machine: the reference always; Triton under the interpreter
    on CPU or on a GPU; the CUDA C++ extension on a GPU."""
    from fastnets.ops._registry import implemented

    device = "cuda" if GPU else "cpu"
    return [b for b in implemented(family) if b in fastnets.available_backends(device)]


def device_for(backend):
    return "cuda" if GPU else "cpu"


def randomize(model, seed=1):
    """Non-trivial BatchNorm affine parameters and running statistics (zero/one inits would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
