"""Loads the compiled CUDA C++ extension `fastnets._C`, if it is there and this torch can load it.

`_C` is built on the LibTorch stable ABI for torch >= its ABI target (setup.py: 2.10), so one binary serves
every newer torch. A missing extension, a torch older than the target, or a library that fails to load
never breaks `import fastnets`: the `cuda` backend reports itself unavailable, with the reason (a torch below
the target is refused before loading, so the reason is never a raw "undefined symbol").
"""
import glob
import os
import re
import warnings

import torch

_state = {"loaded": False, "reason": "not tried yet"}
_STAMP = re.compile(rb"FASTNETS_BUILD_STAMP\{([^}]*)\}")


def _find_library():
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    return found[0] if found else None


def _version_tuple(v):
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def stamp(path=None):
    """What the library says it was built for, read from its file without loading it: a dict with
    abi_target, torch, cuda, archs (strings), or None when there is no library or no stamp."""
    path = path or _find_library()
    if path is None:
        return None
    with open(path, "rb") as f:
        m = _STAMP.search(f.read())
    if m is None:
        return None
    fields = dict(kv.split("=", 1) for kv in m.group(1).decode().split(",") if "=" in kv)
    return fields


def torch_supported(build=None):
    """(ok, why): whether the running torch is inside the range the library supports (>= its ABI target)."""
    build = build if build is not None else stamp()
    if not build or "abi_target" not in build:
        return False, "the library carries no build stamp (built before the stable-ABI port?); rebuild it"
    target = _version_tuple(build["abi_target"])
    running = _version_tuple(torch.__version__)
    if running < target:
        return False, (
            f"fastnets._C targets the LibTorch stable ABI of torch {build['abi_target']} and needs torch >= "
            f"{build['abi_target']}; this is torch {torch.__version__}. The reference and triton backends still "
            f"work; for the cuda backend upgrade torch"
        )
    return True, f"torch {torch.__version__} >= the ABI target {build['abi_target']}"


def load():
    """Try once; return True when the extension's ops are registered."""
    if _state["reason"] != "not tried yet":
        return _state["loaded"]
    if os.environ.get("FASTNETS_DISABLE_CUDA_EXTENSION", "0") == "1":
        _state["reason"] = "disabled by FASTNETS_DISABLE_CUDA_EXTENSION=1"
        return False
    path = _find_library()
    if path is None:
        _state["reason"] = (
            "fastnets._C was not built (no CUDA toolkit or CUDA torch at install time, or "
            "FASTNETS_BUILD_CUDA=0); reinstall with `pip install --no-build-isolation .`"
        )
        return False
    build = stamp(path)
    if build is not None:  # a library without a stamp (an older build, a broken file) is simply tried
        ok, why = torch_supported(build)
        if not ok:
            _state["reason"] = f"fastnets._C at {path} not loaded: {why}"
            warnings.warn(f"fastnets: CUDA C++ backend unavailable: {_state['reason']}", RuntimeWarning, stacklevel=3)
            return False
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError, ImportError) as e:
        msg = str(e)
        if "undefined symbol" in msg:
            msg = (
                f"this torch ({torch.__version__}) lacks a stable-ABI function the library needs ({msg}); "
                "it was built for a newer ABI target than it says, or torch is broken. Rebuild with "
                "`pip install --no-build-isolation .`"
            )
        _state["reason"] = f"fastnets._C at {path} did not load: {msg}"
        warnings.warn(f"fastnets: CUDA C++ backend unavailable: {_state['reason']}", RuntimeWarning, stacklevel=3)
        return False
    _state["loaded"] = True
    _state["reason"] = f"loaded from {path}"
    return True


def is_loaded():
    return load()


def reason():
    load()
    return _state["reason"]


def build_info():
    """(compiled CUDA archs, CUDA runtime version at build) as the extension reports them, or None."""
    if not load():
        return None
    if not hasattr(torch.ops.fastnets_cuda, "build_info"):  # a library built before the fastnets_cuda namespace
        return "unknown (the library predates the fastnets_cuda namespace of its ops; rebuild it)"
    return torch.ops.fastnets_cuda.build_info()
