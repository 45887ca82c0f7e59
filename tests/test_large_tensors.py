"""Tensors of more than 2^31 elements (int64 offsets), GPU only, marker `slow`: BatchNorm train forward and
backward, BatchNorm + add + ReLU, a 1x1 convolution forward and backward, squeeze-excite forward and
backward. Expected values are computed independently of the kernels: by torch in float64, chunk by chunk
(per-channel sums accumulated over chunks), and EVERY output is checked (y, grad_x, grad_weight, grad_bias,
grad_residual, running_mean, running_var, SE weight gradients), chunk by chunk with conftest.assert_rel."""
import pytest
import torch
import torch.nn.functional as F

from fastnets.ops import squeeze_excite
from fastnets.ops.batch_norm import batch_norm
from fastnets.ops.conv import conv2d

from conftest import GPU, assert_rel, backend_params, se_truth

pytestmark = [pytest.mark.slow, pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (tensors over 2^31 elements)")]


def _need(nbytes):
    if torch.cuda.mem_get_info()[0] < nbytes:
        pytest.skip(f"needs {nbytes / 2**30:.0f} GiB of free GPU memory")


def _gpu_backends(family):
    return [p for p in backend_params(family) if p.values[0] != "reference"]


def _chunks(n, parts=16):
    step = -(-n // parts)
    return [slice(lo, min(lo + step, n)) for lo in range(0, n, step)]


@pytest.mark.parametrize("backend", _gpu_backends("batch_norm"))
@pytest.mark.parametrize("mode", ["bn", "bn+add+relu"])
def test_batch_norm_train_forward_backward_over_2_31(backend, mode):
    relu = residual = mode != "bn"
    c, hw = 8, 64
    n = (2**31 + 2**22) // (c * hw * hw) + 1
    shape = (n, c, hw, hw)
    numel = n * c * hw * hw
    assert numel > 2**31
    _need(7 * numel * 2 + (4 << 30))
    torch.manual_seed(0)
    loc = torch.linspace(-2, 30, c, device="cuda").view(1, c, 1, 1)
    x = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) + loc.bfloat16()).requires_grad_()
    res = torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_() if residual else None
    w = (torch.rand(c, device="cuda") + 0.5).requires_grad_()
    b = torch.randn(c, device="cuda").requires_grad_()
    rm0, rv0 = torch.randn(c, device="cuda") + 5, torch.rand(c, device="cuda") + 3
    rm, rv = rm0.clone(), rv0.clone()
    y = batch_norm(x, rm, rv, w, b, True, 0.3, 1e-5, residual=res, relu=relu, backend=backend)
    # a gradient correlated with x, of non-zero mean, so every backward term matters
    g = (0.4 * x.detach() + 0.3 + torch.randn_like(y)).to(torch.bfloat16)
    got = torch.autograd.grad(y, [x, w, b] + ([res] if residual else []), g)

    # ground truth, float64, in chunks over N: per-channel mean and M2 (two passes), then y and the grads
    count = numel // c
    chunks = _chunks(n)
    dims = (0, 2, 3)
    s = sum(x.detach()[k].double().sum(dims) for k in chunks)
    mean = s / count
    m2 = sum(((x.detach()[k].double() - mean.view(1, c, 1, 1)) ** 2).sum(dims) for k in chunks)
    var = m2 / count
    invstd = torch.rsqrt(var + 1e-5)
    assert_rel(rm, (0.7 * rm0.double() + 0.3 * mean).float(), msg="running_mean")
    assert_rel(rv, (0.7 * rv0.double() + 0.3 * var * count / (count - 1)).float(), msg="running_var")
    a, sh = (w.detach().double() * invstd).view(1, c, 1, 1), (b.detach().double() - mean * w.detach().double() * invstd).view(1, c, 1, 1)

    def pre(k):
        p = x.detach()[k].double() * a + sh
        return p + res.detach()[k].double() if residual else p

    sum_g = torch.zeros(c, device="cuda", dtype=torch.float64)
    sum_gxhat = torch.zeros_like(sum_g)
    for k in chunks:
        p = pre(k)
        assert_rel(y[k], torch.relu(p) if relu else p, msg=f"y chunk {k}")
        gm = g[k].double() * (p > 0) if relu else g[k].double()
        sum_g += gm.sum(dims)
        sum_gxhat += (gm * (x.detach()[k].double() - mean.view(1, c, 1, 1)) * invstd.view(1, c, 1, 1)).sum(dims)
    assert_rel(got[1], (sum_gxhat).float(), msg="grad_weight")
    assert_rel(got[2], sum_g.float(), msg="grad_bias")
    for k in chunks:
        p = pre(k)
        gm = g[k].double() * (p > 0) if relu else g[k].double()
        xhat = (x.detach()[k].double() - mean.view(1, c, 1, 1)) * invstd.view(1, c, 1, 1)
        dx = a * (gm - sum_g.view(1, c, 1, 1) / count - xhat * sum_gxhat.view(1, c, 1, 1) / count)
        assert_rel(got[0][k], dx, ref=g[k], msg=f"grad_x chunk {k}")
        if residual:
            assert_rel(got[3][k], gm, msg=f"grad_residual chunk {k}")


@pytest.mark.parametrize("backend", _gpu_backends("conv"))
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_conv_1x1_forward_backward_over_2_31(backend, channels_last):
    """x and y of 1 x 64 x 5800 x 5800 bf16 (2.15e9 elements each), a 1x1 convolution: y, grad_x and
    grad_weight against float64 torch, in chunks of rows."""
    c, hw = 64, 5800
    _need(6 * c * hw * hw * 2 + (4 << 30))
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(1, c, hw, hw, device="cuda", dtype=torch.bfloat16) + 0.5).contiguous(memory_format=fmt).requires_grad_()
    w = (torch.randn(c, c, 1, 1, device="cuda") / 8).to(torch.bfloat16).requires_grad_()
    y = conv2d(x, w, backend=backend)
    assert y.numel() > 2**31
    g = (torch.randn_like(y) + 0.2).to(torch.bfloat16)
    gx, gw = torch.autograd.grad(y, [x, w], g)
    w64 = w.detach().double()
    want_gw = torch.zeros(c, c, device="cuda", dtype=torch.float64)
    for k in _chunks(hw, 32):
        xk = x.detach()[:, :, k].double()
        assert_rel(y[:, :, k], F.conv2d(xk, w64), msg=f"y rows {k}")
        gk = g[:, :, k].double()
        assert_rel(gx[:, :, k], F.conv_transpose2d(gk, w64), msg=f"grad_x rows {k}")
        want_gw += torch.einsum("nohw,nchw->oc", gk, xk)
    assert_rel(gw, want_gw.view(c, c, 1, 1), msg="grad_weight")


@pytest.mark.parametrize("backend", _gpu_backends("squeeze_excite"))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_squeeze_excite_forward_backward_over_2_31(backend, channels_last):
    """x of 64 x 64 x 725 x 725 bf16 (2.15e9 elements) with a residual and ReLU: the block works per
    sample, so the float64 eager block on a few samples at a time gives y, grad_x and grad_residual of
    those samples, and the weight gradients are the sum over all chunks."""
    n, c, hw, r = 64, 64, 725, 4
    _need(6 * n * c * hw * hw * 2 + (4 << 30))
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(n, c, hw, hw, device="cuda", dtype=torch.bfloat16) + 0.3).contiguous(memory_format=fmt).requires_grad_()
    res = torch.randn(n, c, hw, hw, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=fmt).requires_grad_()
    assert x.numel() > 2**31
    ws = [(torch.randn(r, c, 1, 1, device="cuda") / 8).requires_grad_(), torch.randn(r, device="cuda").requires_grad_(),
          (torch.randn(c, r, 1, 1, device="cuda") / 2).requires_grad_(), torch.randn(c, device="cuda").requires_grad_()]
    y = squeeze_excite(x, *ws, residual=res, relu=True, backend=backend)
    g = (0.5 * x.detach() + torch.randn_like(y) + 0.2).to(torch.bfloat16)
    got = torch.autograd.grad(y, [x, res] + ws, g)
    wsum = [torch.zeros_like(t, dtype=torch.float64) for t in ws]
    for k in _chunks(n):
        want, wg = se_truth(x[k], *ws, residual=res[k], relu=True, grad=g[k])
        assert_rel(y[k], want, msg=f"y samples {k}")
        assert_rel(got[0][k], wg["x"], msg=f"grad_x samples {k}")
        assert_rel(got[1][k], wg["residual"], msg=f"grad_residual samples {k}")
        for acc, name in zip(wsum, ["w1", "b1", "w2", "b2"]):
            acc += wg[name]
    for name, a, e in zip(["w1", "b1", "w2", "b2"], got[2:], wsum):
        assert_rel(a, e, msg=f"grad {name}")
