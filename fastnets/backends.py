"""Backend selection: `native` (torch's native CPU kernels), `reference` (pure PyTorch, any device), `triton`,
`cuda` (compiled extension), `auto`.

`auto` is `native` on CPU tensors and the fastest fastnets kernels on a GPU. `native` is dispatched at the
Python wrapper level (fastnets.ops.batch_norm / conv2d / conv2d_batch_norm / squeeze_excite and the nn
modules): F.batch_norm (running statistics updated natively, torch's semantics), oneDNN convolution with
BatchNorm folded into it in inference, in-place add/activation where autograd allows; autograd is torch's
own. fastnets' custom ops (torch.ops.fastnets.*) have no native kernels: given `native` or `auto` on a CPU
tensor they run the `reference` backend, which stays the pure-PyTorch oracle the tests compare against.

The selection is process-wide state set by `use_backend(...)` (a function and a context manager) or the
environment variable FASTNETS_BACKEND. Ops receive the selected name as a plain string argument, so
torch.compile sees a constant; the name is resolved to a concrete backend inside the op, at run time.
"""
import functools
import os

import torch

from . import _extension

NAMES = ("auto", "native", "reference", "triton", "cuda")
CONCRETE = ("native", "reference", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name and cannot run here; the message says what is missing."""


def _check_name(name, source="fastnets backend"):
    if name not in NAMES:
        raise ValueError(f"{source} must be one of {NAMES}, got {name!r}")
    return name


_current = _check_name(os.environ.get("FASTNETS_BACKEND", "auto").strip().lower() or "auto", "FASTNETS_BACKEND")


def current_backend():
    """The selected backend name (possibly 'auto')."""
    return _current


def requested_backend(backend=None):
    """The backend name an op wrapper's `backend=` argument asks for: the selected one when None. Every
    public wrapper calls this first, so a misspelt name raises (ValueError) on every path, including those
    that never reach a custom op (torch's own kernels, grouped convolutions, empty inputs)."""
    return _current if backend is None else _check_name(backend)


class use_backend:
    """`fastnets.use_backend("triton")` selects a backend at once; used as `with use_backend(...):` it
    restores the previous selection on exit."""

    def __init__(self, name):
        global _current
        self._previous = _current
        _current = _check_name(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _current
        _current = self._previous
        return False


def _triton_interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_problem():
    try:
        import triton
    except ImportError as e:
        return f"triton is not installed ({e}); `pip install triton>=3.6`"
    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    if (major, minor) < (3, 1):
        return f"triton {triton.__version__} is too old; fastnets needs triton >= 3.1"
    return None


def unavailable_reason(name, device):
    """None when backend `name` can run on `device`, else a sentence saying why not."""
    device = torch.device(device)
    if name == "native":
        return None if device.type == "cpu" else f"the native backend is fastnets' CPU path; got a {device.type} tensor"
    if name == "reference":
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU is available to torch"
        return None
    if name == "triton":
        problem = _triton_import_problem()
        if problem:
            return problem
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA GPU is available to torch"
        if device.type == "cpu":
            if _triton_interpreting():
                return None
            return "Triton runs CPU tensors only under the interpreter; set TRITON_INTERPRET=1 before importing fastnets"
        return f"Triton does not run on {device.type} tensors"
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got a {device.type} tensor"
        if not torch.cuda.is_available():
            return "no CUDA GPU is available to torch"
        if not _extension.is_loaded():
            return _extension.reason()
        return None
    raise ValueError(f"fastnets backend must be one of {NAMES}, got {name!r}")


def available_backends(device=None):
    """Concrete backends that can run on `device` here (default: the GPU if there is one, else the CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [n for n in CONCRETE if unavailable_reason(n, device) is None]


def resolve(name, device, implemented=CONCRETE, auto_order=("cuda", "triton", "reference")):
    """Turn a requested name into the concrete backend that runs an op on `device`.

    `implemented` lists the backends this op has; `auto_order` is its preference on a GPU.
    `auto` is native on the CPU where the op implements it, else the reference; `native` asked of an op
    without native kernels (fastnets' custom ops: native is dispatched before them) runs the reference.
    """
    device = torch.device(device)
    _check_name(name)
    if name == "auto":
        if device.type != "cuda":
            return "native" if (device.type == "cpu" and "native" in implemented) else "reference"
        for cand in auto_order:
            if cand in implemented and unavailable_reason(cand, device) is None:
                return cand
        return "reference"
    if name == "native" and "native" not in implemented:
        why = unavailable_reason(name, device)
        if why is not None:
            raise BackendUnavailableError(f"fastnets backend 'native' is unavailable: {why}")
        return "reference"
    if name not in implemented:
        raise BackendUnavailableError(f"this op has no {name!r} implementation; it has {tuple(implemented)}")
    why = unavailable_reason(name, device)
    if why is not None:
        raise BackendUnavailableError(f"fastnets backend {name!r} is unavailable: {why}")
    return name
