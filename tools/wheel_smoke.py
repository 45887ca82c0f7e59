"""The installed fastnets wheel on the running torch: prints one Markdown table row, exits 1 on failure.

Run by tools/wheel_matrix.sh and .ci/run from outside the source tree: import, the extension loads (or,
below its ABI target, is refused with a clear reason), every op registered with its schema,
`fastnets.info`, opcheck of the op families' fake kernels on CPU tensors (no GPU needed).
"""
import os
import sys

import torch

import fastnets
from fastnets import _extension, info

# The compiled extension's internal ops (the cuda backend's primitives), in their own namespace apart from the
# user ops of torch.ops.fastnets.
OPS = {
    "bn_stats": "(Tensor x, bool channels_last, float eps) -> (Tensor mean, Tensor invstd)",
    "bn_apply": "(Tensor x, Tensor scale, Tensor shift, Tensor? residual, int act, float act_param, "
    "bool channels_last) -> Tensor",
    "bn_backward_reduce": "(Tensor dy, Tensor x, Tensor? y, Tensor? residual, Tensor? scale, Tensor? shift, "
    "Tensor mean, int act, float act_param, bool channels_last) -> (Tensor sum_g, Tensor sum_gxmu)",
    "bn_backward_apply": "(Tensor dy, Tensor x, Tensor? y, Tensor? residual, Tensor? scale, Tensor? shift, "
    "Tensor a, Tensor b, Tensor d, Tensor mean, int act, float act_param, bool train, bool write_g, "
    "bool channels_last) -> (Tensor dx, Tensor g)",
    "se_reduce": "(Tensor x, Tensor? dy, Tensor? y, Tensor(a!) out, bool channels_last, bool relu, "
    "bool mean) -> ()",
    "se_excite": "(Tensor pooled, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor(a!) hidden, "
    "Tensor(b!) gate, int inner_act=1, float inner_param=0., int gate=0) -> ()",
    "se_apply": "(Tensor src, Tensor gate, Tensor? aux, Tensor? gp, Tensor(a!) out, Tensor(b!)? g_out, "
    "bool channels_last, bool grad, bool relu) -> ()",
    "build_info": "() -> str",
}


def main():
    v = torch.__version__
    where = os.path.dirname(os.path.abspath(fastnets.__file__))
    if not where.startswith(os.path.abspath(sys.prefix) + os.sep):
        print(f"| {v} | FAIL | imported fastnets from {where}, not from this environment's wheel ({sys.prefix}) |")
        return 1
    if _extension.stamp() is None and not os.environ.get("FASTNETS_SMOKE_REQUIRE_EXTENSION"):
        print(f"| {v} | ok (pure) | no compiled extension in this wheel: {_extension.reason()} |")
        return 0
    report = info.report()  # must not raise, whatever the torch
    ok, why = _extension.torch_supported()
    if not ok:
        loaded = _extension.is_loaded()
        good = not loaded and "needs torch >=" in _extension.reason() and "undefined symbol" not in report
        print(f"| {v} | {'refused (ok)' if good else 'FAIL'} | {_extension.reason()} |")
        return 0 if good else 1
    if not _extension.is_loaded():
        print(f"| {v} | FAIL | {_extension.reason()} |")
        return 1
    for name, schema in OPS.items():
        got = str(getattr(torch.ops.fastnets_cuda, name).default._schema)
        if got != f"fastnets_cuda::{name}{schema}":
            print(f"| {v} | FAIL | schema of {name}: {got} |")
            return 1
    # the extension's ops once sat in the user namespace as fastnets::cuda_*
    leaked = [n for n in info.registered_ops("fastnets") if n.startswith("cuda_")]
    if leaked:
        print(f"| {v} | FAIL | internal ops in the user namespace torch.ops.fastnets: {leaked} |")
        return 1
    build = torch.ops.fastnets_cuda.build_info()
    # opcheck of the Python fake kernels (schema, FakeTensor, AOT dispatch) of the op families on the CPU
    from torch.library import opcheck

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, generator=g) + 1.0
    w, b = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    w1, b1 = torch.randn(2, 3, generator=g), torch.randn(2, generator=g)
    w2, b2 = torch.randn(3, 2, generator=g), torch.randn(3, generator=g)
    checks = [
        (torch.ops.fastnets.batch_norm_train.default, (x, w, b, None, "relu", 0.0, 1e-5, "reference")),
        (torch.ops.fastnets.squeeze_excite.default, (x, w1, b1, w2, b2, None, True, "reference")),
    ]
    for op, args in checks:
        opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    n_checked = len(checks)
    print(f"| {v} | ok | loaded; {len(OPS)} internal ops with their schemas; {build}; opcheck on {n_checked} fake "
          "kernels |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
