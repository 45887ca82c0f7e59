"""Python wrappers over the compiled CUDA C++ kernels: the internal ops torch.ops.fastnets_cuda.* of
fastnets._C, which users never call (their ops are torch.ops.fastnets.*)."""
import torch

from .. import _extension


def require_ops(op, schema_op, schema_fragment, rebuild_why):
    """torch.ops.fastnets_cuda, or ImportError (the registry then leaves the cuda backend out) when fastnets._C
    is not loaded or is too old: it has no `op`, or `schema_op`'s schema lacks `schema_fragment` (an argument
    added later). `rebuild_why` says what the old build lacks."""
    if not _extension.load():  # the registry imports the backend modules only when the backend is available
        raise ImportError(f"fastnets cuda backend: {_extension.reason()}")
    ops = torch.ops.fastnets_cuda
    if not hasattr(ops, op) or schema_fragment not in str(getattr(ops, schema_op).default._schema):
        raise ImportError(f"fastnets cuda backend: the compiled extension fastnets._C {rebuild_why}; rebuild with "
                          "`pip install --no-build-isolation -e .`")
    return ops
