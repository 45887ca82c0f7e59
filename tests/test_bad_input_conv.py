"""Bad and edge-case input for the convolution family (conv2d with epilogues, Conv -> BN -> [add] -> ReLU),
one table, every backend here. Each row names the expected exception type and a message fragment, or checks
the output (and gradients) against torch in float64 (NaN/Inf positions must coincide)."""
import pytest
import torch
import torch.nn.functional as F

import fastnets
from fastnets.nn import ConvBNReLU2d
from fastnets.ops.conv import conv2d, conv2d_batch_norm

from conftest import bad_input_tests, assert_rel, backend_params, device_for

BACKENDS = backend_params("conv", dedupe=False)


def _x(*shape, dtype=torch.float32, device="cpu", loc=0.3):
    return (torch.randn(*shape) + loc).to(dtype).to(device)


def _w(cout, cin, k=3, dtype=torch.float32, device="cpu"):
    return (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).to(dtype).to(device)


def _conv_matches(x, w, b=None, stride=1, padding=0, dilation=1, grad=True, round_truth=False, gout=None, **kw):
    """fastnets conv2d against float64 F.conv2d on the same inputs: output, and grads of x, w, b."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = conv2d(leaves[0], leaves[1], leaves[2], stride, padding, dilation, **kw)
    r = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    want = F.conv2d(r[0], r[1], r[2], stride, padding, dilation)
    assert y.dtype == x.dtype and y.shape == want.shape
    assert_rel(y, want.to(x.dtype) if round_truth else want, msg="output")
    if grad:
        g = (torch.randn(y.shape) + 0.2).to(y.dtype).to(y.device) if gout is None else gout
        used = [(n, a, e) for n, a, e in zip("x weight bias".split(), leaves, r) if a is not None]
        got = torch.autograd.grad(y, [a for _, a, _ in used], g)
        exp = torch.autograd.grad(want, [e for _, _, e in used], g.double())
        for (n, _, _), a, e in zip(used, got, exp):
            assert_rel(a, e, msg=f"grad {n}")
    return y


def _nan_at(t, *idx, value=float("nan")):
    t = t.clone()
    t[idx] = value
    return t


def _block_train(x, w, rm, rv, **kw):
    return conv2d_batch_norm(x, w, None, rm, rv, None, None, training=True, **kw)


ROWS = [
    # ranks and shapes
    ("1-D input", lambda d: conv2d(_x(8, device=d), _w(4, 3, device=d)), (ValueError, "input must be")),
    ("5-D input", lambda d: conv2d(_x(2, 3, 8, 8, 1, device=d), _w(4, 3, device=d)), (ValueError, "got a 5-D tensor")),
    ("3-D weight", lambda d: conv2d(_x(2, 3, 8, 8, device=d), torch.randn(4, 3, 3, device=d)), (ValueError, "weight must be 4-D")),
    ("channel mismatch", lambda d: conv2d(_x(2, 5, 8, 8, device=d), _w(4, 3, device=d)), (ValueError, "input has 5 channels")),
    ("kernel larger than padded input", lambda d: conv2d(_x(2, 3, 2, 8, device=d), _w(4, 3, device=d)), (ValueError, "larger than the padded input")),
    ("unbatched 3-D input", lambda d: _conv_matches(_x(3, 6, 5, device=d), _w(4, 3, device=d), padding=1), None),
    ("C_in=0", lambda d: conv2d(_x(2, 0, 8, 8, device=d), torch.randn(4, 0, 3, 3, device=d)), (ValueError, "non-empty")),
    ("H=0 (as torch: the kernel exceeds the input)", lambda d: conv2d(_x(2, 3, 0, 8, device=d), _w(4, 3, k=1, device=d)), (ValueError, "padded input (0 x 8)")),
    ("H=0 with a 3x3 kernel", lambda d: conv2d(_x(2, 3, 0, 8, device=d), _w(4, 3, device=d), padding=1), (ValueError, "larger than the padded input")),
    ("N=0", lambda d: conv2d(_x(0, 3, 8, 8, device=d), _w(4, 3, device=d)), (ValueError, "non-empty")),
    ("1x1 output from 3x3", lambda d: _conv_matches(_x(2, 3, 3, 3, device=d), _w(5, 3, device=d), torch.randn(5, device=d)), None),
    ("C=1 in and out", lambda d: _conv_matches(_x(2, 1, 5, 4, device=d), _w(1, 1, device=d), padding=1), None),
    # dtypes
    ("int64 input", lambda d: conv2d(torch.ones(2, 3, 8, 8, dtype=torch.long, device=d), _w(4, 3, device=d)), (TypeError, "input must be float16")),
    ("weight fp16, input fp32", lambda d: conv2d(_x(2, 3, 8, 8, device=d), _w(4, 3, dtype=torch.float16, device=d)), (TypeError, "weight has dtype torch.float16 but input has dtype torch.float32")),
    ("bias fp64, input fp32", lambda d: conv2d(_x(2, 3, 8, 8, device=d), _w(4, 3, device=d), torch.randn(4, dtype=torch.float64, device=d)), (TypeError, "bias has dtype")),
    ("residual bf16, input fp32", lambda d: conv2d(_x(2, 3, 8, 8, device=d), _w(4, 3, device=d), padding=1, residual=_x(2, 4, 8, 8, dtype=torch.bfloat16, device=d)), (TypeError, "residual has dtype")),
    ("int running_mean", lambda d: _block_train(_x(2, 3, 8, 8, device=d), _w(4, 3, device=d), torch.zeros(4, dtype=torch.long, device=d), torch.ones(4, device=d)), (TypeError, "running_mean must be float")),
    ("running_var requires grad", lambda d: _block_train(_x(2, 3, 8, 8, device=d), _w(4, 3, device=d), torch.zeros(4, device=d), torch.ones(4, device=d, requires_grad=True)), (ValueError, "running_var must not require grad")),
    ("bf16 activations, fp32 BN stats", lambda d: _block_matches(_x(2, 3, 7, 7, dtype=torch.bfloat16, device=d), _w(4, 3, dtype=torch.bfloat16, device=d)), None),
    # vectors
    ("bias wrong length", lambda d: conv2d(_x(2, 3, 8, 8, device=d), _w(4, 3, device=d), torch.randn(5, device=d)), (ValueError, "bias must have shape")),
    ("scale wrong length", lambda d: conv2d(_x(2, 3, 8, 8, device=d), _w(4, 3, device=d), scale=torch.ones(3, device=d)), (ValueError, "scale must have shape")),
    ("residual wrong shape", lambda d: conv2d(_x(2, 3, 8, 8, device=d), _w(4, 3, device=d), residual=_x(2, 4, 8, 8, device=d)), (ValueError, "residual has shape")),
    ("bn running_var wrong length", lambda d: _block_train(_x(2, 3, 8, 8, device=d), _w(4, 3, device=d), torch.zeros(4, device=d), torch.ones(3, device=d)), (ValueError, "running_var must have shape (4,)")),
    ("eval without running stats", lambda d: conv2d_batch_norm(_x(2, 3, 8, 8, device=d), _w(4, 3, device=d), None, None, None, training=False), (ValueError, "running_mean and running_var are required")),
    # arguments
    ("stride 0", lambda d: conv2d(_x(2, 3, 8, 8, device=d), _w(4, 3, device=d), stride=0), (ValueError, "stride must be >= 1")),
    ("negative padding", lambda d: conv2d(_x(2, 3, 8, 8, device=d), _w(4, 3, device=d), padding=-1), (ValueError, "padding")),
    ("dilation 0", lambda d: conv2d(_x(2, 3, 8, 8, device=d), _w(4, 3, device=d), dilation=0), (ValueError, "dilation")),
    ("stride/padding/dilation mix", lambda d: _conv_matches(_x(2, 3, 11, 9, device=d), _w(4, 3, device=d), torch.randn(4, device=d), (2, 1), (2, 1), (2, 1)), None),
    ("unknown backend", lambda d: conv2d(_x(2, 3, 8, 8, device=d), _w(4, 3, device=d), backend="fast"), (ValueError, "fastnets backend must be one of")),
    ("unknown backend, groups=3", lambda d: conv2d(_x(2, 3, 8, 8, device=d), _w(3, 1, device=d), groups=3, backend="fast"), (ValueError, "fastnets backend must be one of")),
    ("unknown backend, conv + BN", lambda d: _block_train(_x(2, 3, 8, 8, device=d), _w(4, 3, device=d), None, None, backend="fast"), (ValueError, "fastnets backend must be one of")),
    # N=1 in training
    ("N=1, 1x1 output in training", lambda d: _block_train(_x(1, 3, 3, 3, device=d), _w(4, 3, device=d), torch.zeros(4, device=d), torch.ones(4, device=d)), (ValueError, "Expected more than 1 value per channel")),
    ("N=1 with spatial in training", lambda d: _block_matches(_x(1, 3, 6, 5, device=d), _w(4, 3, device=d)), None),
    ("ConvBNReLU2d channel mismatch", lambda d: ConvBNReLU2d(3, 4, 3).to(d)(_x(2, 4, 8, 8, device=d)), (ValueError, "input has 4 channels")),
    # values
    ("NaN in x propagates as torch", lambda d: _conv_matches(_nan_at(_x(2, 3, 6, 6, device=d), 0, 1, 2, 2), _w(4, 3, device=d), padding=1, grad=False), None),
    ("Inf in x propagates as torch", lambda d: _conv_matches(_nan_at(_x(2, 3, 6, 6, device=d), 1, 0, 0, 0, value=float("inf")), _w(4, 3, device=d).abs(), padding=1, grad=False), None),
    ("NaN in grad_out propagates as torch", lambda d: _conv_matches(_x(2, 3, 6, 6, device=d), _w(4, 3, device=d), padding=1, gout=_nan_at(torch.randn(2, 4, 6, 6, device=d), 0, 2, 3, 3)), None),
    ("fp16 near overflow (sums to 3e4)", lambda d: _conv_matches(torch.full((2, 4, 5, 5), 60.0, dtype=torch.float16, device=d) + _x(2, 4, 5, 5, dtype=torch.float16, device=d), torch.full((8, 4, 3, 3), 14.0, dtype=torch.float16, device=d), grad=False), None),
    ("fp16 overflow to inf as torch rounds", lambda d: _conv_matches(torch.full((2, 4, 5, 5), 300.0, dtype=torch.float16, device=d), torch.full((8, 4, 3, 3), 10.0, dtype=torch.float16, device=d), grad=False, round_truth=True), None),
    ("constant input: zero-variance channels", lambda d: _block_matches(torch.full((2, 3, 6, 6), 2.0, device=d), _w(4, 3, device=d)), None),
    # layouts and devices
    ("non-dense strided input", lambda d: _conv_matches(_x(2, 3, 7, 16, device=d)[..., ::2], _w(4, 3, device=d), padding=1), None),
    ("non-dense weight", lambda d: _conv_matches(_x(2, 3, 7, 8, device=d), _w(8, 3, device=d)[::2], padding=1), None),
    ("weight on meta", lambda d: conv2d(_x(2, 3, 8, 8, device=d), torch.randn(4, 3, 3, 3, device="meta")), (ValueError, "weight is on meta")),
    ("residual on meta", lambda d: conv2d(_x(2, 3, 8, 8, device=d), _w(4, 3, device=d), padding=1, residual=torch.randn(2, 4, 8, 8, device="meta")), (ValueError, "residual is on meta")),
    ("all on meta: shapes only", lambda d: _meta_shapes(), None),
]


def _block_matches(x, w, momentum=0.1):
    """Training Conv -> BN -> ReLU against float64 torch: output and running statistics."""
    c = w.shape[0]
    rm, rv = torch.randn(c, device=x.device) + 1, torch.rand(c, device=x.device) + 2
    rm_t, rv_t = rm.double().cpu(), rv.double().cpu()
    y = conv2d_batch_norm(x, w, None, rm, rv, None, None, training=True, momentum=momentum, padding=1)
    z = F.conv2d(x.double().cpu(), w.double().cpu(), None, 1, 1)
    want = torch.relu(F.batch_norm(z, rm_t, rv_t, None, None, True, momentum, 1e-5))
    assert_rel(y, want, msg="output")
    assert_rel(rm, rm_t.float(), msg="running_mean")
    assert_rel(rv, rv_t.float(), msg="running_var")
    assert bool((rv >= 0).all())


def _meta_shapes():
    x = torch.empty(2, 3, 9, 9, device="meta").to(memory_format=torch.channels_last)
    y = conv2d(x, torch.empty(4, 3, 3, 3, device="meta"), None, 2, 1)
    assert y.device.type == "meta" and y.shape == (2, 4, 5, 5)


test_bad_input, test_catalogue_size = bad_input_tests(ROWS, BACKENDS)
