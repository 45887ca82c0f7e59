"""Loads the compiled CUDA C++ extension `fastnets._C`, if it is there and matches this torch.

A missing extension, or one built for another torch, never breaks `import fastnets`: we warn once and
the `cuda` backend reports itself unavailable, with the reason.
"""
import glob
import os
import warnings

import torch

_state = {"loaded": False, "reason": "not tried yet"}


def _find_library():
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    return found[0] if found else None


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
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError, ImportError) as e:
        _state["reason"] = f"fastnets._C at {path} did not load (built for another torch or CUDA?): {e}"
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
    return torch.ops.fastnets.cuda_build_info()
