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

# The one error measure for comparisons against float64 ground truth: ||a - b|| / ||b|| (2-norm over all
# elements, computed in float64), with one bound per dtype OF THE RESULT, written once. A result stored in
# bf16 carries its rounding (unit roundoff 2^-9, rms about 2.3e-3 relative); an fp32 result (statistics,
# weight gradients of fp32 parameters) is held to fp32 accuracy whatever the activation dtype. Every bound
# is below 1e-2 so that a 1 % scale error in any output fails. Where the true value can be near zero (an
# input gradient with two values per channel is exactly 0), pass `ref=` (e.g. grad_out): the error may
# then also be bounded relative to ||ref||.
REL_BOUND = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 8e-3,
}


def rel_error(actual, expected):
    """||actual - expected|| / ||expected|| in float64; inf when NaN/Inf positions or shapes differ."""
    a, b = actual.detach().to("cpu", torch.float64), expected.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        return float("inf")
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb) or not torch.equal(a[~fa].nan_to_num(), b[~fb].nan_to_num()):
        return float("inf")
    diff = (a[fa] - b[fb]).norm().item()
    den = b[fb].norm().item()
    return diff / den if den > 0 else diff


def assert_rel(actual, expected, dtype=None, scale=1.0, ref=None, msg=""):
    """Fails when rel_error(actual, expected) exceeds the bound of `dtype` (default: actual's) x `scale`,
    unless `ref` is given and ||actual - expected|| <= bound x ||ref|| (true value near zero)."""
    bound = REL_BOUND[dtype or actual.dtype] * scale
    err = rel_error(actual, expected)
    if err <= bound:
        return err
    if ref is not None and err != float("inf"):
        den = expected.detach().double().norm().item()
        absolute = err * den if den > 0 else err
        ref_norm = ref.detach().double().norm().item()
        if absolute <= bound * ref_norm:
            return err
    raise AssertionError(f"{msg + ': ' if msg else ''}relative error {err:.3e} > bound {bound:.1e} "
                         f"({dtype or actual.dtype}{', also vs ||ref||' if ref is not None else ''})")

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
