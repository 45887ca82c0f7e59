"""Bad and edge-case input for squeeze-excite (+ add + ReLU), one table, every backend here. Each row names
the expected exception type and a message fragment, or checks the output and every gradient against the
eager block in float64 (NaN/Inf positions must coincide)."""
import pytest
import torch

import fastnets
from fastnets.nn import SqueezeExcite
from fastnets.ops import se_excite, se_scale, squeeze_excite

from conftest import bad_input_tests, assert_grads, assert_rel, backend_params, device_for, se_truth

BACKENDS = backend_params("squeeze_excite")


def _x(*shape, dtype=torch.float32, device="cpu", loc=0.3):
    return (torch.randn(*shape) + loc).to(dtype).to(device)


def _ws(c, r, dtype=torch.float32, device="cpu"):
    ws = [torch.randn(r, c, 1, 1) / c**0.5, torch.randn(r) * 0.5, torch.randn(c, r, 1, 1) / r**0.5, torch.randn(c) * 0.5]
    return [t.to(dtype).to(device) for t in ws]


def _matches(x, ws, residual=None, relu=False, grad=True, gout=None, round_truth=False):
    leaves = [t.detach().clone().requires_grad_() for t in [x] + ws] + (
        [residual.detach().clone().requires_grad_()] if residual is not None else [])
    y = squeeze_excite(leaves[0], *leaves[1:5], residual=leaves[5] if residual is not None else None, relu=relu)
    want, _ = se_truth(*leaves[:5], residual=leaves[5] if residual is not None else None, relu=relu)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_rel(y, want.to(x.dtype) if round_truth else want, msg="output")
    if grad:
        g = (torch.randn(y.shape) + 0.2).to(y.dtype).to(y.device) if gout is None else gout
        names = ["x", "w1", "b1", "w2", "b2", "residual"][: len(leaves)]
        got = dict(zip(names, torch.autograd.grad(y, leaves, g)))
        _, wg = se_truth(*leaves[:5], residual=leaves[5] if residual is not None else None, relu=relu, grad=g)
        assert_grads(got, wg)


def _nan_at(t, *idx, value=float("nan")):
    t = t.clone()
    t[idx] = value
    return t


def _call(x, ws, **kw):
    return squeeze_excite(x, *ws, **kw)


ROWS = [
    # ranks and shapes
    ("1-D input", lambda d: _call(_x(8, device=d), _ws(8, 2, device=d)), (ValueError, "input must be 4-D")),
    ("5-D input", lambda d: _call(_x(2, 8, 3, 3, 1, device=d), _ws(8, 2, device=d)), (ValueError, "input must be 4-D")),
    ("3-D input", lambda d: SqueezeExcite(8, 2).to(d)(_x(8, 3, 3, device=d)), (ValueError, "input must be 4-D")),
    ("channel mismatch", lambda d: _call(_x(2, 7, 3, 3, device=d), _ws(8, 2, device=d)), (ValueError, "input has 7 channels")),
    ("w1 not 1x1", lambda d: _call(_x(2, 8, 3, 3, device=d), [torch.randn(2, 8, 3, 3, device=d)] + _ws(8, 2, device=d)[1:]), (ValueError, "1x1 conv")),
    ("w2 wrong shape", lambda d: _call(_x(2, 8, 3, 3, device=d), _ws(8, 2, device=d)[:2] + [torch.randn(8, 1, 1, 1, device=d), torch.randn(8, device=d)]), (ValueError, "w2 (fc2.weight) must be [8, 2")),
    ("b1 wrong length", lambda d: _call(_x(2, 8, 3, 3, device=d), [_ws(8, 2, device=d)[0], torch.randn(3, device=d)] + _ws(8, 2, device=d)[2:]), (ValueError, "b1 (fc1.bias) must have shape (2,)")),
    ("b2 wrong length", lambda d: _call(_x(2, 8, 3, 3, device=d), _ws(8, 2, device=d)[:3] + [torch.randn(7, device=d)]), (ValueError, "b2 (fc2.bias) must have shape (8,)")),
    ("C=0", lambda d: _call(_x(2, 0, 3, 3, device=d), [torch.randn(2, 0, 1, 1, device=d), torch.randn(2, device=d), torch.randn(0, 2, 1, 1, device=d), torch.randn(0, device=d)]), (ValueError, "at least one")),
    ("H=0", lambda d: _call(_x(2, 8, 0, 3, device=d), _ws(8, 2, device=d)), (ValueError, "non-empty")),
    ("N=0", lambda d: _call(_x(0, 8, 3, 3, device=d), _ws(8, 2, device=d)), (ValueError, "non-empty")),
    ("N=1", lambda d: _matches(_x(1, 8, 3, 3, device=d), _ws(8, 2, device=d), relu=True), None),
    ("1x1 spatial, C=1, R=1", lambda d: _matches(_x(3, 1, 1, 1, device=d), _ws(1, 1, device=d), _x(3, 1, 1, 1, device=d)), None),
    ("R > C", lambda d: _matches(_x(2, 3, 4, 5, device=d), _ws(3, 7, device=d), relu=True), None),
    # dtypes
    ("int64 input", lambda d: _call(torch.ones(2, 8, 3, 3, dtype=torch.long, device=d), _ws(8, 2, device=d)), (TypeError, "input must be float16")),
    ("fp16 weights, fp32 input", lambda d: _call(_x(2, 8, 3, 3, device=d), _ws(8, 2, dtype=torch.float16, device=d)), (TypeError, "weights are torch.float16 but input is torch.float32")),
    ("weights of mixed dtypes", lambda d: _call(_x(2, 8, 3, 3, device=d), [w.double() if i == 1 else w for i, w in enumerate(_ws(8, 2, device=d))]), (TypeError, "share one dtype")),
    ("int weights", lambda d: _call(_x(2, 8, 3, 3, device=d), [w.long() for w in _ws(8, 2, device=d)]), (TypeError, "w1 (fc1.weight) must be float")),
    ("residual dtype differs", lambda d: _call(_x(2, 8, 3, 3, device=d), _ws(8, 2, device=d), residual=_x(2, 8, 3, 3, dtype=torch.float64, device=d)), (TypeError, "residual has dtype")),
    ("bf16 input, fp32 weights (autocast style)", lambda d: _matches(_x(2, 8, 3, 3, dtype=torch.bfloat16, device=d), _ws(8, 2, device=d), _x(2, 8, 3, 3, dtype=torch.bfloat16, device=d), relu=True), None),
    ("fp16 input, fp16 weights", lambda d: _matches(_x(2, 8, 3, 3, dtype=torch.float16, device=d), _ws(8, 2, dtype=torch.float16, device=d)), None),
    ("float64 pooled with fp32 weights", lambda d: se_excite(torch.rand(2, 8, dtype=torch.float64, device=d), *_ws(8, 2, device=d)), (TypeError, "float64 pooled needs float64 weights")),
    ("se_scale gate wrong shape", lambda d: se_scale(_x(2, 8, 3, 3, device=d), torch.rand(2, 7, device=d)), (ValueError, "gate must have shape (2, 8)")),
    ("residual shape differs", lambda d: _call(_x(2, 8, 3, 3, device=d), _ws(8, 2, device=d), residual=_x(2, 8, 3, 4, device=d)), (ValueError, "residual has shape")),
    # values
    ("NaN in x propagates as torch", lambda d: _matches(_nan_at(_x(2, 4, 3, 3, device=d), 0, 1, 0, 0), _ws(4, 2, device=d), relu=True, grad=False), None),
    ("Inf in x propagates as torch", lambda d: _matches(_nan_at(_x(2, 4, 3, 3, device=d), 1, 2, 1, 1, value=float("inf")), _ws(4, 2, device=d), grad=False), None),
    ("NaN in grad_out propagates as torch", lambda d: _matches(_x(2, 4, 3, 3, device=d), _ws(4, 2, device=d), gout=_nan_at(torch.randn(2, 4, 3, 3, device=d), 0, 3, 2, 1)), None),
    ("fp16 near overflow (6e4)", lambda d: _matches((torch.rand(2, 4, 3, 3) * 1e3 + 5.9e4).half().to(d), _ws(4, 2, device=d), grad=False), None),
    ("fp16 residual add overflows as torch rounds", lambda d: _matches(torch.full((2, 4, 3, 3), 6.0e4).half().to(d), [w * 0 + 10 for w in _ws(4, 2, device=d)], torch.full((2, 4, 3, 3), 3.0e4).half().to(d), grad=False, round_truth=True), None),
    ("constant input (pooled = x)", lambda d: _matches(torch.full((2, 4, 3, 3), 1.5, device=d), _ws(4, 2, device=d), relu=True), None),
    # layouts and devices
    ("non-dense strided input", lambda d: _matches(_x(2, 8, 3, 8, device=d)[..., ::2], _ws(8, 2, device=d), _x(2, 8, 3, 4, device=d)), None),
    ("channels_last x, NCHW residual", lambda d: _matches(_x(2, 8, 3, 4, device=d).to(memory_format=torch.channels_last), _ws(8, 2, device=d), _x(2, 8, 3, 4, device=d), relu=True), None),
    ("weights on meta", lambda d: _call(_x(2, 8, 3, 3, device=d), [w.to("meta") for w in _ws(8, 2)]), (ValueError, "is on meta")),
    ("residual on meta", lambda d: _call(_x(2, 8, 3, 3, device=d), _ws(8, 2, device=d), residual=torch.randn(2, 8, 3, 3, device="meta")), (ValueError, "residual is on meta")),
    ("unknown backend", lambda d: _call(_x(2, 8, 3, 3, device=d), _ws(8, 2, device=d), backend="nope"), (ValueError, "fastnets backend must be one of")),
    ("unknown backend, se_scale", lambda d: se_scale(_x(2, 8, 3, 3, device=d), torch.rand(2, 8, device=d), backend="nope"), (ValueError, "fastnets backend must be one of")),
]


test_bad_input, test_catalogue_size = bad_input_tests(ROWS, BACKENDS)
