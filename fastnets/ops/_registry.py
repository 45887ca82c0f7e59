"""Maps a requested backend name to the module that implements an op family's primitives."""
import importlib
import warnings

from .. import backends

# family -> ({backend: module path}, auto order); modules are imported lazily: Triton is optional and the
# extension may be absent or older than the op family.
_MODULES = {}
_loaded = {}
_broken = {}


# What `auto` prefers on a GPU. Triton first: its kernels are the ones the test suite runs everywhere (under
# the interpreter on CPU); the CUDA C++ kernels have so far only been compiled, never run on a GPU. Revisit
# with the first GPU validation's measurements ("the fastest correct backend").
DEFAULT_AUTO_ORDER = ("triton", "cuda", "reference")


def register_family(family, modules, auto_order=DEFAULT_AUTO_ORDER):
    _MODULES[family] = (dict(modules), tuple(auto_order))


def _import(family, name):
    key = (family, name)
    if key not in _loaded:
        _loaded[key] = importlib.import_module(_MODULES[family][0][name], package="fastnets")
    return _loaded[key]


def kernels(family, backend, device):
    """The module of primitives that runs `family` on `device` for the requested backend name.

    A backend asked for by name that fails to import raises. Under `auto`, one that fails to import (say,
    a compiled extension older than this op family) is skipped for the next in the family's order, with
    a warning once."""
    modules, auto_order = _MODULES[family]
    if backend != "auto":
        return _import(family, backends.resolve(backend, device, implemented=tuple(modules)))
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
