"""Bad and edge-case input for BatchNorm (+ add + ReLU), one table, every backend here. Each row names the
expected exception type and a fragment of its message, or checks the output against torch in float64
(NaN/Inf positions included: conftest.rel_error requires them to coincide)."""
import pytest
import torch
from torch import nn

import fastnets
from fastnets.nn import BatchNorm1d, BatchNorm2d, BatchNormReLU2d
from fastnets.ops.batch_norm import batch_norm

from conftest import bad_input_tests, assert_rel, backend_params, bn_truth, device_for

BACKENDS = backend_params("batch_norm")


def _x(*shape, dtype=torch.float32, device="cpu", loc=0.5):
    return (torch.randn(*shape) + loc).to(dtype).to(device)


def _empty_as_torch(x):
    """The functional batch_norm passes an empty input through as aten does (F.batch_norm returns an empty
    tensor of the input's shape; the modules refuse it, as torch's do not)."""
    y = batch_norm(x, None, None, training=True)
    want = torch.nn.functional.batch_norm(x.cpu(), None, None, training=True)
    assert y.shape == want.shape and y.numel() == 0 and y.dtype == want.dtype


def _vec(c, device, fill=None, dtype=torch.float32):
    t = torch.rand(c) + 0.5 if fill is None else torch.full((c,), float(fill))
    return t.to(dtype).to(device)


def _matches_torch(x, rm=None, rv=None, w=None, b=None, training=True, momentum=0.1, eps=1e-5, residual=None,
                   relu=False, grad=None, round_truth=False, stats_nonfinite_only=False):
    """Run fastnets (current backend) and torch float64 on the same inputs; compare output, running stats
    and (with grad) every input gradient."""
    leaves = [t.detach().clone().requires_grad_() if t is not None and grad is not None else t for t in (x, w, b, residual)]
    rm_o, rv_o = (None if rm is None else rm.clone()), (None if rv is None else rv.clone())
    y = batch_norm(leaves[0], rm_o, rv_o, leaves[1], leaves[2], training, momentum, eps, residual=leaves[3], relu=relu)
    want, wg, want_rm, want_rv = bn_truth(x, rm, rv, w, b, training, momentum, eps, residual, relu, grad=grad)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_rel(y, want.to(x.dtype) if round_truth else want, msg="output")
    if rm is not None and stats_nonfinite_only:
        # torch's two-pass mean of a channel holding Inf is Inf, a Welford/Chan mean is NaN: both non-finite
        assert torch.equal(torch.isfinite(rm_o).cpu(), torch.isfinite(want_rm).cpu()), (rm_o, want_rm)
        assert torch.equal(torch.isfinite(rv_o).cpu(), torch.isfinite(want_rv).cpu()), (rv_o, want_rv)
    elif rm is not None:
        assert_rel(rm_o, want_rm.to(rm.dtype), msg="running_mean")
        assert_rel(rv_o, want_rv.to(rv.dtype), msg="running_var")
        assert bool((rv_o[~torch.isnan(rv_o)] >= 0).all()), "running_var must never be negative"
    if grad is not None:
        names = ["x", "weight", "bias", "residual"]
        used = [(n, t) for n, t in zip(names, leaves) if t is not None]
        got = torch.autograd.grad(y, [t for _, t in used], grad)
        for (n, _), g in zip(used, got):
            assert_rel(g, wg[n], ref=grad if n == "x" else None, msg=f"grad {n}")
    return y


def _nan_at(t, *idx, value=float("nan")):
    t = t.clone()
    t[idx] = value
    return t


# (id, fn(device) -> anything, expected) with expected = (ExceptionType, "message fragment") or None
# (None: fn itself checks the output against torch).
ROWS = [
    # ranks
    ("1-D input", lambda d: batch_norm(_x(5, device=d), None, None, training=True), (ValueError, "input must be 2-D")),
    ("6-D input", lambda d: batch_norm(_x(2, 3, 2, 2, 2, 2, device=d), None, None, training=True), (ValueError, "got a 6-D tensor")),
    ("5-D input trains like torch", lambda d: _matches_torch(_x(2, 3, 2, 3, 2, device=d), _vec(3, d, 0), _vec(3, d, 1)), None),
    ("2-D (N, C) input", lambda d: _matches_torch(_x(4, 3, device=d), _vec(3, d, 1), _vec(3, d, 2), grad=torch.randn(4, 3, device=d) + 1), None),
    ("BatchNorm2d given 3-D", lambda d: BatchNorm2d(4).to(d)(_x(2, 4, 3, device=d)), (ValueError, "input must be 4-D")),
    ("BatchNorm1d given 4-D", lambda d: BatchNorm1d(4).to(d)(_x(2, 4, 3, 3, device=d)), (ValueError, "input must be 2-D or 3-D")),
    ("channel count mismatch", lambda d: BatchNorm2d(4).to(d)(_x(2, 5, 3, 3, device=d)), (ValueError, "num_features=4")),
    # dtypes
    ("int64 input", lambda d: batch_norm(torch.ones(2, 4, 3, 3, dtype=torch.long, device=d), None, None, training=True), (TypeError, "input must be float16")),
    ("complex input", lambda d: batch_norm(torch.ones(2, 4, 3, 3, dtype=torch.complex64, device=d), None, None, training=True), (TypeError, "complex64")),
    ("int64 running_mean", lambda d: batch_norm(_x(2, 4, 3, 3, device=d), torch.zeros(4, dtype=torch.long, device=d), _vec(4, d), training=True), (TypeError, "running_mean must be float")),
    ("int32 running_var", lambda d: batch_norm(_x(2, 4, 3, 3, device=d), _vec(4, d), torch.ones(4, dtype=torch.int32, device=d), training=False), (TypeError, "running_var must be float")),
    ("running_mean requires grad", lambda d: batch_norm(_x(2, 4, 3, 3, device=d), _vec(4, d).requires_grad_(), _vec(4, d), training=True), (ValueError, "running_mean must not require grad")),
    ("running_var requires grad", lambda d: batch_norm(_x(2, 4, 3, 3, device=d), _vec(4, d), _vec(4, d).requires_grad_(), training=False), (ValueError, "running_var must not require grad")),
    ("residual dtype differs", lambda d: batch_norm(_x(2, 4, 3, 3, device=d), None, None, training=True, residual=_x(2, 4, 3, 3, dtype=torch.float64, device=d)), (TypeError, "residual has dtype torch.float64")),
    ("bf16 x, fp32 params and stats (AMP)", lambda d: _matches_torch(_x(3, 4, 3, 3, dtype=torch.bfloat16, device=d), _vec(4, d, 0), _vec(4, d, 1), _vec(4, d), _vec(4, d), relu=True), None),
    ("fp16 x, fp16 running stats", lambda d: _matches_torch(_x(3, 4, 3, 3, dtype=torch.float16, device=d), _vec(4, d, 0.5, torch.float16), _vec(4, d, 2, torch.float16)), None),
    ("fp32 x, fp16 weight, fp64 bias", lambda d: _matches_torch(_x(3, 4, 3, 3, device=d), None, None, _vec(4, d, dtype=torch.float16), _vec(4, d, dtype=torch.float64)), None),
    # shapes of the vectors
    ("running_var wrong length", lambda d: batch_norm(_x(2, 4, 3, 3, device=d), _vec(4, d), _vec(3, d), training=True), (ValueError, "running_var must have shape (4,)")),
    ("weight 2-D", lambda d: batch_norm(_x(2, 4, 3, 3, device=d), None, None, torch.ones(4, 1, device=d), training=True), (ValueError, "weight must have shape (4,)")),
    ("bias wrong length", lambda d: batch_norm(_x(2, 4, 3, 3, device=d), None, None, None, _vec(5, d), training=True), (ValueError, "bias must have shape (4,)")),
    ("residual shape differs", lambda d: BatchNormReLU2d(4).to(d)(_x(2, 4, 3, 3, device=d), _x(2, 4, 3, 2, device=d)), (ValueError, "residual has shape (2, 4, 3, 2)")),
    ("eval without running stats", lambda d: batch_norm(_x(2, 4, 3, 3, device=d), None, None, training=False), (ValueError, "running_mean and running_var are required")),
    # empty and tiny
    ("C=0", lambda d: _empty_as_torch(_x(2, 0, 3, 3, device=d)), None),
    ("H=0", lambda d: _empty_as_torch(_x(2, 4, 0, 3, device=d)), None),
    ("N=0", lambda d: _empty_as_torch(_x(0, 4, 3, 3, device=d)), None),
    ("N=1 1x1 in training", lambda d: batch_norm(_x(1, 4, 1, 1, device=d), None, None, training=True), (ValueError, "Expected more than 1 value per channel when training")),
    ("N=1 with spatial in training", lambda d: _matches_torch(_x(1, 3, 2, 3, device=d), _vec(3, d, 5), _vec(3, d, 9), _vec(3, d), _vec(3, d), grad=torch.randn(1, 3, 2, 3, device=d) + 0.5), None),
    ("N=1 1x1 in eval", lambda d: _matches_torch(_x(1, 4, 1, 1, device=d), _vec(4, d, 1), _vec(4, d, 2), training=False), None),
    ("two values per channel (grad_x is 0)", lambda d: _matches_torch(_x(2, 3, 1, 1, device=d), _vec(3, d, 0), _vec(3, d, 1), _vec(3, d), _vec(3, d), grad=torch.randn(2, 3, 1, 1, device=d) + 1), None),
    # values
    ("NaN in x propagates as torch", lambda d: _matches_torch(_nan_at(_x(2, 3, 4, 4, device=d), 0, 1, 2, 2), _vec(3, d, 0), _vec(3, d, 1)), None),
    ("Inf in x propagates as torch", lambda d: _matches_torch(_nan_at(_x(2, 3, 4, 4, device=d), 1, 2, 0, 0, value=float("inf")), _vec(3, d, 0), _vec(3, d, 1), stats_nonfinite_only=True), None),
    ("NaN in x, eval", lambda d: _matches_torch(_nan_at(_x(2, 3, 4, 4, device=d), 0, 1, 2, 2), _vec(3, d, 0), _vec(3, d, 1), training=False, relu=True), None),
    ("NaN in grad_out propagates as torch", lambda d: _matches_torch(_x(2, 3, 4, 4, device=d), None, None, _vec(3, d), _vec(3, d), grad=_nan_at(torch.randn(2, 3, 4, 4, device=d), 1, 0, 1, 1)), None),
    ("NaN running_var in eval", lambda d: _matches_torch(_x(2, 3, 4, 4, device=d), _vec(3, d, 0), _nan_at(_vec(3, d, 1), 1), training=False), None),
    ("zero-variance channel", lambda d: _matches_torch(torch.cat([torch.full((3, 1, 4, 4), 7.0), torch.randn(3, 2, 4, 4)], 1).to(d), _vec(3, d, 2), _vec(3, d, 3), _vec(3, d), _vec(3, d), momentum=1.0, grad=torch.randn(3, 3, 4, 4, device=d)), None),
    ("constant bf16 input, running_var stays >= 0", lambda d: _matches_torch(torch.full((4, 2, 3, 3), 3.14, dtype=torch.bfloat16, device=d), _vec(2, d, 0), _vec(2, d, 1e-3), _vec(2, d), _vec(2, d), momentum=1.0), None),
    ("fp16 near overflow (6e4, spread 8)", lambda d: _matches_torch((torch.randn(3, 2, 4, 4) * 8 + 6.0e4).half().to(d), _vec(2, d, 0), _vec(2, d, 1), relu=True), None),
    ("fp16 output overflows to inf as torch", lambda d: _matches_torch(_x(3, 2, 4, 4, dtype=torch.float16, device=d), None, None, _vec(2, d, 4e4), _vec(2, d, 3e4), round_truth=True), None),
    # layouts and devices
    ("non-dense strided view", lambda d: _matches_torch(_x(2, 3, 4, 8, device=d)[..., ::2], _vec(3, d, 0), _vec(3, d, 1), grad=torch.randn(2, 3, 4, 4, device=d) + 0.3), None),
    ("permuted (neither layout)", lambda d: _matches_torch(_x(3, 4, 2, 5, device=d).permute(0, 1, 3, 2), _vec(4, d, 0), _vec(4, d, 1)), None),
    ("weight on meta", lambda d: batch_norm(_x(2, 4, 3, 3, device=d), None, None, torch.ones(4, device="meta"), training=True), (ValueError, "weight is on meta")),
    ("running_mean on meta", lambda d: batch_norm(_x(2, 4, 3, 3, device=d), torch.zeros(4, device="meta"), _vec(4, d), training=True), (ValueError, "running_mean is on meta")),
    ("residual on meta", lambda d: batch_norm(_x(2, 4, 3, 3, device=d), None, None, training=True, residual=torch.ones(2, 4, 3, 3, device="meta")), (ValueError, "residual is on meta")),
    ("all on meta: shapes only", lambda d: _meta_shapes(), None),
    # arguments
    ("unknown backend", lambda d: batch_norm(_x(2, 4, 3, 3, device=d), None, None, training=True, backend="fast"), (ValueError, "fastnets backend must be one of")),
    ("unknown backend, empty input", lambda d: batch_norm(_x(0, 4, 3, 3, device=d), None, None, training=True, backend="fast"), (ValueError, "fastnets backend must be one of")),
]


def _meta_shapes():
    x = torch.empty(2, 4, 3, 3, device="meta").to(memory_format=torch.channels_last)
    rm, rv = torch.zeros(4, device="meta"), torch.ones(4, device="meta")
    y = batch_norm(x, rm, rv, torch.ones(4, device="meta"), None, True, 0.1, 1e-5, relu=True)
    assert y.device.type == "meta" and y.shape == x.shape and y.stride() == x.stride()


test_bad_input, test_catalogue_size = bad_input_tests(ROWS, BACKENDS)
