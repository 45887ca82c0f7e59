"""TF32 (docs/tf32.md): fastnets' Triton convolution rounds fp32 operands to TF32 exactly when cuDNN's fp32
convolutions may, i.e. it reads the flag cuDNN reads (torch.backends.cudnn.conv.fp32_precision, inheriting
from torch.backends.cudnn.fp32_precision and torch.backends.fp32_precision; the legacy
torch.backends.cudnn.allow_tf32 sets the same state). Every other test runs with TF32 off (conftest's
_ieee_fp32), so that fp32 comparisons are IEEE on a GPU too; here TF32 is turned on explicitly.

On the CPU the interpreter's tl.dot is a float32 numpy matmul whatever input_precision says, so what is
checked here is that the flag reaches every convolution launch's input_precision (PREC); that TF32 really
rounds, and stays within TF32 bounds, only a GPU shows (test_tf32_on_a_gpu_rounds_within_tf32_bounds)."""
import pytest
import torch
import torch.nn.functional as F

from fastnets._tensors import conv_allows_tf32
from fastnets.ops import _conv_auto
from fastnets.triton_kernels import conv as tri

from conftest import GPU, REL_BOUND, assert_rel, backends_here, rel_error

NEW_API = hasattr(torch.backends, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")
DEV = "cuda" if GPU else "cpu"


@pytest.fixture
def restore_flags():
    """Put back every fp32_precision flag these tests touch (parents first: setting one overwrites its
    children) and the legacy cuDNN flag, whatever the test set."""
    b = torch.backends
    slots = [(b, "fp32_precision"), (b.cudnn, "fp32_precision"), (b.cudnn.conv, "fp32_precision"),
             (b.cudnn.rnn, "fp32_precision"), (b.cuda.matmul, "fp32_precision"), (b.mkldnn, "fp32_precision"),
             (b.mkldnn.conv, "fp32_precision"), (b.mkldnn.matmul, "fp32_precision"),
             (b.mkldnn.rnn, "fp32_precision")] if NEW_API else []
    saved = [(obj, name, getattr(obj, name)) for obj, name in slots]
    legacy = None if NEW_API else b.cudnn.allow_tf32
    yield
    b.cudnn.allow_tf32 = True if legacy is None else legacy  # the tests set the legacy flag last, if at all
    for obj, name, value in saved:
        setattr(obj, name, value)


def _set_conv(on):
    torch.backends.cudnn.conv.fp32_precision = "tf32" if on else "ieee"


def _set_cudnn(on):
    torch.backends.cudnn.fp32_precision = "tf32" if on else "ieee"
    torch.backends.cudnn.conv.fp32_precision = "none"  # inherit from cuDNN's own flag


def _set_generic(on):
    torch.backends.fp32_precision = "tf32" if on else "ieee"
    torch.backends.cudnn.fp32_precision = "none"
    torch.backends.cudnn.conv.fp32_precision = "none"  # inherit twice: from the generic flag


def _set_legacy(on):
    torch.backends.cudnn.allow_tf32 = on


WAYS = {"legacy_allow_tf32": _set_legacy}
if NEW_API:
    WAYS.update({"cudnn.conv.fp32_precision": _set_conv, "cudnn.fp32_precision": _set_cudnn,
                 "backends.fp32_precision": _set_generic})


def _record_prec(monkeypatch):
    """Every Triton convolution launch's input_precision, in order."""
    seen = []
    real = tri._launch

    def launch(tuned, raw, grid, *args, **kwargs):
        seen.append(kwargs["PREC"])
        return real(tuned, raw, grid, *args, **kwargs)

    monkeypatch.setattr(tri, "_launch", launch)
    return seen


def _conv_case(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 5, 7, 6, generator=g) + 0.5).to(device, dtype)
    w = (torch.randn(6, 5, 3, 3, generator=g) / 45 ** 0.5).to(device, dtype)
    b = torch.randn(6, generator=g).to(device, dtype)
    return x, w, b


def _run_every_primitive(x, w, b):
    """forward (with a BN epilogue), forward with statistics, grad input (the KxK implicit GEMM and the 1x1
    GEMM path) and grad weight, on the Triton module directly."""
    geo = ([1, 1], [1, 1], [1, 1])
    y = torch.empty(2, 6, 7, 6, device=x.device, dtype=x.dtype)
    scale = torch.rand(6, device=x.device) + 0.5
    tri.forward(x, w, b, scale, scale, None, *geo, True, y)
    tri.forward_stats(x, w, b, *geo, torch.empty_like(y))
    g = torch.randn_like(y)
    tri.grad_input(g, w, torch.empty_like(x), *geo)
    tri.grad_input(g, w[:, :, :1, :1].contiguous(), torch.empty(2, 5, 7, 6, device=x.device, dtype=x.dtype),
                   [1, 1], [0, 0], [1, 1])
    tri.grad_weight(g, x, tuple(w.shape), *geo)
    return y


@pytest.mark.skipif("triton" not in backends_here("conv"), reason="needs the Triton backend (GPU or interpreter)")
@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("on", [True, False], ids=["tf32", "ieee"])
def test_triton_conv_reads_the_flag_cudnn_reads(way, on, restore_flags, monkeypatch):
    """Each way of setting cuDNN's convolution TF32 flag reaches every Triton convolution launch (forward,
    statistics, both grad-input paths, grad weight) as input_precision, and conv's `auto` keys on it."""
    WAYS[way](not on)
    assert conv_allows_tf32() is (not on)
    WAYS[way](on)
    assert conv_allows_tf32() is on
    seen = _record_prec(monkeypatch)
    _run_every_primitive(*_conv_case(DEV))
    assert len(seen) == 5, seen
    assert seen == ["tf32" if on else "ieee"] * 5
    x = _conv_case(DEV)[0]
    key = _conv_auto._key("fwd", x, (6, 5, 3, 3), (1, 1), (1, 1), (1, 1))
    assert ("float32-tf32" if on else "float32-ieee") in key


def test_half_precisions_and_float64_are_not_affected(restore_flags, monkeypatch):
    monkeypatch.setattr(tri, "INTERPRET", False)  # the launch flags a GPU gets
    for on in (True, False):
        _set_legacy(on)
        assert tri._math_flags(torch.empty(1, dtype=torch.bfloat16))["UPCAST"] is False  # never upcast on a GPU
        assert tri._math_flags(torch.empty(1, dtype=torch.float16))["PREC"] == "tf32"  # fp16 operands: ignored
        assert tri._math_flags(torch.empty(1, dtype=torch.float64))["FP64"] is True  # no tl.dot at all


def test_the_suite_runs_fp32_as_ieee():
    """conftest's autouse _ieee_fp32: without it every fp32 comparison on a GPU would meet TF32 rounding."""
    assert conv_allows_tf32() is False
    if NEW_API:
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    else:
        assert torch.backends.cuda.matmul.allow_tf32 is False


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="TF32 rounding needs a GPU's tensor cores (the interpreter's tl.dot ignores it)")
def test_tf32_on_a_gpu_rounds_within_tf32_bounds(restore_flags):
    """With the flag on, the Triton convolution and cuDNN both round to TF32: within fp16's bound (TF32 has
    fp16's 10-bit mantissa) of float64 torch, and measurably worse than IEEE fp32 (so TF32 is really on);
    with it off both are within the fp32 bound."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 256, 14, 14, device="cuda", generator=g) + 0.5
    w = torch.randn(128, 256, 3, 3, device="cuda", generator=g) / (256 * 9) ** 0.5
    truth = F.conv2d(x.double(), w.double(), None, 1, 1)
    errors = {}
    for on in (True, False):
        _set_legacy(on) if not NEW_API else _set_conv(on)
        out = torch.empty(4, 128, 14, 14, device="cuda")
        y = tri.forward(x, w, None, None, None, None, [1, 1], [1, 1], [1, 1], False, out)
        errors[on] = rel_error(y, truth)
        assert_rel(y, truth, torch.float16 if on else torch.float32, msg=f"triton tf32={on}")
        assert_rel(F.conv2d(x, w, None, 1, 1), truth, torch.float16 if on else torch.float32, msg=f"cuDNN tf32={on}")
    assert errors[True] > 4 * errors[False], f"TF32 on gives {errors[True]:.2e}, off {errors[False]:.2e}"
    assert errors[False] <= REL_BOUND[torch.float32]
