"""Maps a requested backend name to the module that implements an op family's primitives."""
import importlib
import warnings

import torch

from .. import backends

# family -> ({backend: module path}, auto order); modules are imported lazily: Triton is optional and the
# extension may be absent or older than the op family.
_MODULES = {}
_AUTO_POLICY = {}  # family -> (module path, backends it needs): the family's own `auto` on a GPU
_loaded = {}
_broken = {}


# What `auto` prefers on a GPU. Triton first: its kernels are the ones the test suite runs everywhere (under
# the interpreter on CPU); the CUDA C++ kernels have so far only been compiled, never run on a GPU. Revisit
# with the first GPU validation's measurements ("the fastest correct backend").
DEFAULT_AUTO_ORDER = ("triton", "cuda", "reference")


def register_family(family, modules, auto_order=DEFAULT_AUTO_ORDER, auto_policy=None, auto_needs=()):
    """`modules`: backend name -> module path of the primitives; `auto_order`: what `auto` prefers on a GPU.
    `auto_policy` (optional): the module path of a policy that runs `auto` on a CUDA device where every
    backend in `auto_needs` can run, in place of the order (conv: per shape, Triton or cuDNN, measured); it
    implements the family's primitives like any backend module."""
    _MODULES[family] = (dict(modules), tuple(auto_order))
    if auto_policy is None:
        _AUTO_POLICY.pop(family, None)
    else:
        _AUTO_POLICY[family] = (auto_policy, tuple(auto_needs))


def _import(family, name):
    key = (family, name)
    if key not in _loaded:
        path = _AUTO_POLICY[family][0] if name == "auto" else _MODULES[family][0][name]
        _loaded[key] = importlib.import_module(path, package="fastnets")
    return _loaded[key]


def kernels(family, backend, device):
    """The module of primitives that runs `family` on `device` for the requested backend name.

    A backend asked for by name that fails to import raises. Under `auto`, one that fails to import (say,
    a compiled extension older than this op family) is skipped for the next in the family's order, with
    a warning once. A family's `auto_policy`, where it can run, is `auto` on a GPU."""
    modules, auto_order = _MODULES[family]
    if backend != "auto":
        return _import(family, backends.resolve(backend, device, implemented=tuple(modules)))
    if family in _AUTO_POLICY and torch.device(device).type == "cuda":
        needs = _AUTO_POLICY[family][1]
        if all(backends.unavailable_reason(n, device) is None for n in needs):
            return _import(family, "auto")
    usable = tuple(m for m in modules if (family, m) not in _broken)
    while True:
        name = backends.resolve("auto", device, implemented=usable, auto_order=auto_order)
        try:
            return _import(family, name)
        except ImportError as e:
            if name == "reference":
                raise
            _broken[(family, name)] = str(e)
            warnings.warn(f"fastnets: {family} falls back from its {name} backend under auto: {e}", RuntimeWarning)
            usable = tuple(m for m in usable if m != name)


def implemented(family):
    return tuple(_MODULES[family][0])
