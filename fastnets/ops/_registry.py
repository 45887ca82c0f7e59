"""Maps a requested backend name to the module that implements an op family's primitives."""
import importlib

from .. import backends

# family -> backend -> module path (imported lazily: Triton is optional, the extension may be absent)
_MODULES = {}
_loaded = {}


def register_family(family, modules, auto_order=("cuda", "triton", "reference")):
    _MODULES[family] = (dict(modules), tuple(auto_order))


def kernels(family, backend, device):
    """The module of primitives that runs `family` on `device` for the requested backend name."""
    modules, auto_order = _MODULES[family]
    name = backends.resolve(backend, device, implemented=tuple(modules), auto_order=auto_order)
    key = (family, name)
    if key not in _loaded:
        _loaded[key] = importlib.import_module(modules[name], package="fastnets")
    return _loaded[key]


def implemented(family):
    return tuple(_MODULES[family][0])
