"""fastnets: hand-written Triton and CUDA C++ kernels for classic CNNs, behind drop-in torch.nn modules."""
from .version import __version__
from . import _extension
from .backends import BackendUnavailableError, available_backends, current_backend, use_backend

_extension.load()  # warns once (and carries on) when the compiled extension is missing or mismatched

from . import ops, nn  # noqa: E402  (ops register themselves in torch.ops.fastnets)
from . import models  # noqa: E402
from .convert import convert  # noqa: E402

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "available_backends",
    "current_backend",
    "use_backend",
    "ops",
    "nn",
    "models",
    "convert",
]
