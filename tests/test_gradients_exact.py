"""Every output and every gradient of each op family against torch in float64, on inputs under which every
term of the formulas matters: channels with large, different means and small spread plus a per-sample
offset (so the tiles of a reduction see different means and Chan's merge terms count), upstream gradients
with a non-zero mean that are correlated with the output (so sum(g) and sum(g * xhat) both count), running
statistics far from the batch's, eps large enough to matter, non-square shapes and kernels, and shapes with
several tiles in M, N and K, tails and split reductions. These are the tests that kill the planted bugs of
tests/mutation.py (docs/testing.md, "Mutation check"). Errors are conftest's ||a - b|| / ||b|| with one bound per
dtype; float32 throughout (TF32 off on a GPU), so a 1 % error in any output fails."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnets
from fastnets.nn import Conv2d, SqueezeExcite, conv_bn_act
from fastnets.ops.batch_norm import batch_norm
from fastnets.ops.conv import conv2d
from fastnets.ops.squeeze_excite import se_scale, se_squeeze, squeeze_excite

from conftest import GPU, assert_rel, backends_here

DEV = "cuda" if GPU else "cpu"
EPS = 0.05  # large enough that a forgotten or misplaced eps fails


def gen(seed):
    return torch.Generator().manual_seed(seed)


def leaf(t, cl=False):
    """A float32 leaf on the test device (channels_last when asked)."""
    t = t.detach().to(DEV, torch.float32)
    if cl:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(True)


def f64(t):
    return t.detach().cpu().double().requires_grad_(True)


def offset_input(shape, g, mean=(-4.0, 6.0), spread=(0.25, 0.75), per_sample=0.75):
    """Per-channel means spread over `mean`, small per-channel std in `spread`, and sample n shifted by
    n * per_sample."""
    n, c = shape[:2]
    view = [1, c] + [1] * (len(shape) - 2)
    means = torch.linspace(mean[0], mean[1], c).view(view)
    stds = (torch.rand(c, generator=g) * (spread[1] - spread[0]) + spread[0]).view(view)
    offs = torch.arange(n, dtype=torch.float32).view([n] + [1] * (len(shape) - 1)) * per_sample
    return torch.randn(shape, generator=g) * stds + means + offs


def upstream(y, g):
    """A gradient with a non-zero mean, correlated with the output y."""
    yd = y.detach().cpu().double()
    yd = (yd - yd.mean()) / (yd.std() + 1e-12)
    return (torch.randn(y.shape, generator=g, dtype=torch.float64) + 0.4 + 0.5 * yd).float()


def backward_both(y, y64, g):
    dy = upstream(y64, g)
    y.backward(dy.to(DEV))
    y64.backward(dy.double())
    return dy


def check(pairs, ref=None):
    """pairs: name -> (fastnets tensor, float64 truth); `ref` (name -> tensor) gives the second bound of
    values whose truth can be near zero."""
    for name, (a, b) in pairs.items():
        assert a is not None, f"{name}: no gradient"
        assert_rel(a, b, dtype=torch.float32, ref=(ref or {}).get(name), msg=name)


# ------------------------------------------------------------------------------------------------ BatchNorm

BN_BACKENDS = backends_here("batch_norm")
# name: (shape, channels_last). Under the Triton interpreter (2 programs, 16384-element tiles):
BN_CASES = {
    "nchw-3x5x7x13": ((3, 5, 7, 13), False),  # NCHW: images split in two, two images merged in one split, spatial tail
    "nhwc-3x100x7x13": ((3, 100, 7, 13), True),  # 273 rows of 128-row tiles: two tiles merged, then a 17-row split
    "2d-37x6": ((37, 6), False),  # (N, C): one value per tile, 19 merges per split
}


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("case", list(BN_CASES))
@pytest.mark.parametrize("tail", ["bn", "add_relu"])
def test_batch_norm_train_every_output(backend, case, tail):
    shape, cl = BN_CASES[case]
    if tail == "add_relu" and len(shape) != 4:
        pytest.skip("the fused add + ReLU is tested on 4-D inputs")
    g = gen(11)
    c = shape[1]
    x = offset_input(shape, g)
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    res = torch.randn(shape, generator=g) if tail == "add_relu" else None
    rm, rv = torch.randn(c, generator=g) * 3, torch.rand(c, generator=g) * 4 + 2
    relu = tail == "add_relu"

    xs, ws, bs = leaf(x, cl), leaf(w), leaf(b)
    rs = None if res is None else leaf(res, cl)
    rm_f, rv_f = rm.clone().to(DEV), rv.clone().to(DEV)
    y = batch_norm(xs, rm_f, rv_f, ws, bs, training=True, momentum=0.3, eps=EPS, residual=rs, relu=relu,
                   backend=backend)

    x64, w64, b64 = f64(x), f64(w), f64(b)
    r64 = None if res is None else f64(res)
    rm64, rv64 = rm.double(), rv.double()
    y64 = F.batch_norm(x64, rm64, rv64, w64, b64, training=True, momentum=0.3, eps=EPS)
    if relu:
        y64 = torch.relu(y64 + r64)
    dy = backward_both(y, y64, g)
    pairs = {"y": (y, y64), "grad_x": (xs.grad, x64.grad), "grad_weight": (ws.grad, w64.grad),
             "grad_bias": (bs.grad, b64.grad), "running_mean": (rm_f, rm64), "running_var": (rv_f, rv64)}
    if res is not None:
        pairs["grad_residual"] = (rs.grad, r64.grad)
    check(pairs, ref={"grad_x": dy})


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
def test_batch_norm_eval_every_output(backend, cl):
    """Eval: running statistics far from the batch's (the backward uses them, not the batch's), eps = 0.05."""
    g = gen(12)
    shape = (4, 6, 5, 7)
    x = offset_input(shape, g)
    c = shape[1]
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    res = torch.randn(shape, generator=g)
    rm, rv = torch.randn(c, generator=g) + 2, torch.rand(c, generator=g) * 2 + 0.5
    xs, ws, bs, rs = leaf(x, cl), leaf(w), leaf(b), leaf(res, cl)
    y = batch_norm(xs, rm.to(DEV), rv.to(DEV), ws, bs, training=False, eps=EPS, residual=rs, relu=True,
                   backend=backend)
    x64, w64, b64, r64 = f64(x), f64(w), f64(b), f64(res)
    y64 = torch.relu(F.batch_norm(x64, rm.double(), rv.double(), w64, b64, training=False, eps=EPS) + r64)
    backward_both(y, y64, g)
    check({"y": (y, y64), "grad_x": (xs.grad, x64.grad), "grad_weight": (ws.grad, w64.grad),
           "grad_bias": (bs.grad, b64.grad), "grad_residual": (rs.grad, r64.grad)})


# ------------------------------------------------------------------------------------------------ convolution

CONV_BACKENDS = backends_here("conv")
# name: (x shape, weight shape, stride, padding, dilation, channels_last). The interpreter's tile is
# 32 (pixels) x 16 (output channels) x 16 (reduction); shapes are as small as covers it (each tap-iteration is slow).
CONV_CASES = {
    # 48 output pixels (2 M tiles, a tail), 20 output channels (2 N tiles), 20 input channels (2 K blocks);
    # stride 2 (grad input masks the taps that do not divide), asymmetric padding
    "3x3-s2-tiles-nhwc": ((2, 20, 7, 9), (20, 20, 3, 3), (2, 2), (1, 2), (1, 1), True),
    "3x3-dilated-nchw": ((1, 17, 6, 7), (18, 17, 3, 3), (1, 1), (2, 1), (2, 1), False),
    # few input channels: the flattened (kh, kw, c) reduction, with a non-square kernel and stride
    "stem-3x2-nhwc": ((2, 3, 9, 8), (18, 3, 3, 2), (1, 2), (1, 1), (1, 1), True),
    # 1x1 stride 2: grad input through a strided view of a zeroed output; 24 input channels (2 K blocks)
    "1x1-s2-nchw": ((2, 24, 9, 7), (20, 24, 1, 1), (2, 2), (0, 0), (1, 1), False),
    "1x1-s2-nhwc": ((2, 24, 9, 7), (20, 24, 1, 1), (2, 2), (0, 0), (1, 1), True),
    # 1152 output pixels (> 1024): the grad-weight reduction is split in two
    "1x1-split-wgrad-nchw": ((2, 4, 24, 24), (8, 4, 1, 1), (1, 1), (0, 0), (1, 1), False),
}


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_epilogue_every_gradient(backend, case):
    """y = relu((conv(x, W) + bias) * scale + shift + residual): y and the gradients of all six inputs."""
    xs_shape, w_shape, stride, padding, dilation, cl = CONV_CASES[case]
    g = gen(21)
    cout, cin, kh, kw = w_shape
    x = torch.randn(xs_shape, generator=g) + 0.3
    w = torch.randn(w_shape, generator=g) / (cin * kh * kw) ** 0.5
    bias, scale, shift = torch.randn(cout, generator=g), torch.rand(cout, generator=g) + 0.5, torch.randn(cout, generator=g)
    out_shape = F.conv2d(x, w, None, stride, padding, dilation).shape
    res = torch.randn(out_shape, generator=g)

    leaves = [leaf(x, cl), leaf(w, cl), leaf(bias), leaf(scale), leaf(shift), leaf(res, cl)]
    y = conv2d(leaves[0], leaves[1], leaves[2], stride, padding, dilation, scale=leaves[3], shift=leaves[4],
               residual=leaves[5], relu=True, backend=backend)
    t = [f64(v) for v in (x, w, bias, scale, shift, res)]
    z = F.conv2d(t[0], t[1], t[2], stride, padding, dilation)
    y64 = torch.relu(z * t[3].view(1, -1, 1, 1) + t[4].view(1, -1, 1, 1) + t[5])
    backward_both(y, y64, g)
    names = ["grad_x", "grad_weight", "grad_bias", "grad_scale", "grad_shift", "grad_residual"]
    pairs = {"y": (y, y64)}
    pairs.update({n: (a.grad, b.grad) for n, a, b in zip(names, leaves, t)})
    check(pairs)


def _conv_bn_pair(cin, cout, momentum, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=True)
    bn = nn.BatchNorm2d(cout, eps=EPS, momentum=momentum)
    g = gen(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(cout, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(cout, generator=g))
        bn.running_mean.copy_(torch.randn(cout, generator=g) * 3)
        bn.running_var.copy_(torch.rand(cout, generator=g) * 4 + 2)
        conv.bias.copy_(torch.randn(cout, generator=g) * 2)
    return conv, bn


def _params_grads(conv, bn):
    return {"grad conv.weight": conv.weight.grad, "grad conv.bias": conv.bias.grad,
            "grad bn.weight": bn.weight.grad, "grad bn.bias": bn.bias.grad}


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
def test_conv_bn_train_statistics_and_gradients(backend, cl):
    """relu(bn(conv(x)) + residual) in training, two steps with momentum=None (cumulative average): 70
    output pixels per channel (two 32-row tiles and a 6-row tail, the two images' means apart) on a 5 x 7
    (non-square) output, conv bias (the epilogue's statistics include it), 18 output channels (2 N tiles)."""
    conv, bn = _conv_bn_pair(4, 18, None, 31)
    conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    conv, bn = conv.to(DEV), bn.to(DEV)
    if cl:
        conv = conv.to(memory_format=torch.channels_last)
    g = gen(32)
    for step in range(2):
        x = offset_input((2, 4, 5, 7), g, per_sample=1.5)
        res = torch.randn(2, 18, 5, 7, generator=g)
        for m in (conv, bn, conv64, bn64):
            m.zero_grad()
        xs, rs = leaf(x, cl), leaf(res, cl)
        with fastnets.use_backend(backend):
            y = conv_bn_act(conv, bn, xs, residual=rs, relu=True)
        x64, r64 = f64(x), f64(res)
        y64 = torch.relu(bn64(conv64(x64)) + r64)
        dy = backward_both(y, y64, g)
        ours, truth = _params_grads(conv, bn), _params_grads(conv64, bn64)
        pairs = {"y": (y, y64), "grad_x": (xs.grad, x64.grad), "grad_residual": (rs.grad, r64.grad),
                 "running_mean": (bn.running_mean, bn64.running_mean),
                 "running_var": (bn.running_var, bn64.running_var)}
        pairs.update({k: (ours[k], truth[k]) for k in ours})
        # the conv bias's true gradient is 0 (BatchNorm removes the mean): bounded relative to bn.bias's
        check(pairs, ref={"grad conv.bias": bn64.bias.grad, "grad_x": dy})
        assert int(bn.num_batches_tracked) == int(bn64.num_batches_tracked) == step + 1


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
def test_conv_bn_eval_fold_every_gradient(backend, cl):
    """Eval: the BatchNorm folded into the convolution's epilogue, conv bias, eps = 0.05, running statistics
    far from the batch's; y and the gradients of x, conv.weight, conv.bias, bn.weight, bn.bias, residual."""
    conv, bn = _conv_bn_pair(17, 18, 0.1, 41)
    conv64, bn64 = copy.deepcopy(conv).double().eval(), copy.deepcopy(bn).double().eval()
    conv, bn = conv.to(DEV).eval(), bn.to(DEV).eval()
    g = gen(42)
    x = torch.randn(1, 17, 5, 6, generator=g) + 0.5
    res = torch.randn(1, 18, 5, 6, generator=g)
    xs, rs = leaf(x, cl), leaf(res, cl)
    with fastnets.use_backend(backend):
        y = conv_bn_act(conv, bn, xs, residual=rs, relu=True)
    x64, r64 = f64(x), f64(res)
    y64 = torch.relu(bn64(conv64(x64)) + r64)
    backward_both(y, y64, g)
    ours, truth = _params_grads(conv, bn), _params_grads(conv64, bn64)
    pairs = {"y": (y, y64), "grad_x": (xs.grad, x64.grad), "grad_residual": (rs.grad, r64.grad)}
    pairs.update({k: (ours[k], truth[k]) for k in ours})
    check(pairs)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_conv2d_module_asymmetric_geometry(backend):
    """fastnets.nn.Conv2d with a different padding, stride and dilation per axis and a non-square kernel."""
    torch.manual_seed(51)
    m = Conv2d(5, 7, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    m64 = copy.deepcopy(m).double()
    m = m.to(DEV)
    x = torch.randn(2, 5, 9, 8, generator=gen(52))
    xs, x64 = leaf(x), f64(x)
    with fastnets.use_backend(backend):
        y = m(xs)
    y64 = F.conv2d(x64, m64.weight, m64.bias, (2, 1), (1, 2), (1, 2))
    backward_both(y, y64, gen(53))
    check({"y": (y, y64), "grad_x": (xs.grad, x64.grad), "grad_weight": (m.weight.grad, m64.weight.grad)})


# ------------------------------------------------------------------------------------------------ squeeze-excite

SE_BACKENDS = backends_here("squeeze_excite")
# name: (x shape, R). Non-square spatial sizes (the pooling gradient divides by H * W).
SE_CASES = {
    "3x40x5x7-r36": ((3, 40, 5, 7), 36),  # R > 32: two hidden blocks in both FC layers
    "2x130x3x2-r9": ((2, 130, 3, 2), 9),  # C > 128: two channel blocks
}


def _se_weights(c, r, g):
    return (torch.randn(r, c, 1, 1, generator=g) / c**0.5 * 2, torch.randn(r, generator=g) * 0.5,
            torch.randn(c, r, 1, 1, generator=g) / r**0.5 * 2, torch.randn(c, generator=g) * 0.5)


def _se_eager(x, w1, b1, w2, b2, res, relu):
    p = x.mean((2, 3), keepdim=True)
    gate = torch.sigmoid(F.conv2d(torch.relu(F.conv2d(p, w1, b1)), w2, b2))
    y = x * gate
    if res is not None:
        y = y + res
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("backend", SE_BACKENDS)
@pytest.mark.parametrize("case", list(SE_CASES))
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("tail", ["se", "add_relu"])
def test_squeeze_excite_every_gradient(backend, case, cl, tail):
    shape, r = SE_CASES[case]
    g = gen(61)
    x = torch.randn(shape, generator=g) * 2 + 0.5
    ws = _se_weights(shape[1], r, g)
    res = torch.randn(shape, generator=g) if tail == "add_relu" else None
    relu = tail == "add_relu"
    xs = leaf(x, cl)
    wl = [leaf(t) for t in ws]
    rs = None if res is None else leaf(res, cl)
    y = squeeze_excite(xs, *wl, residual=rs, relu=relu, backend=backend)
    x64, w64 = f64(x), [f64(t) for t in ws]
    r64 = None if res is None else f64(res)
    y64 = _se_eager(x64, *w64, r64, relu)
    dy = backward_both(y, y64, g)
    names = ["grad fc1.weight", "grad fc1.bias", "grad fc2.weight", "grad fc2.bias"]
    pairs = {"y": (y, y64), "grad_x": (xs.grad, x64.grad)}
    pairs.update({n: (a.grad, b.grad) for n, a, b in zip(names, wl, w64)})
    if res is not None:
        pairs["grad_residual"] = (rs.grad, r64.grad)
    check(pairs, ref={"grad_x": dy})


@pytest.mark.parametrize("backend", SE_BACKENDS)
def test_squeeze_excite_stage_ops_gradients(backend):
    """se_squeeze (mean over a 5 x 7 plane) and se_scale (+ residual, ReLU): outputs and every gradient."""
    g = gen(71)
    x = torch.randn(3, 9, 5, 7, generator=g) + 0.5
    xs, x64 = leaf(x), f64(x)
    p = se_squeeze(xs, backend=backend)
    p64 = x64.mean((2, 3))
    backward_both(p, p64, g)
    check({"pooled": (p, p64), "grad_x": (xs.grad, x64.grad)})

    gate, res = torch.rand(3, 9, generator=g), torch.randn(3, 9, 5, 7, generator=g)
    xs, gs, rs = leaf(x), leaf(gate), leaf(res)
    y = se_scale(xs, gs, residual=rs, relu=True, backend=backend)
    x64, g64, r64 = f64(x), f64(gate), f64(res)
    y64 = torch.relu(x64 * g64[:, :, None, None] + r64)
    backward_both(y, y64, g)
    check({"y": (y, y64), "grad_x": (xs.grad, x64.grad), "grad_gate": (gs.grad, g64.grad),
           "grad_residual": (rs.grad, r64.grad)})


@pytest.mark.parametrize("backend", SE_BACKENDS)
def test_squeeze_excite_module_residual_relu(backend):
    torch.manual_seed(81)
    m = SqueezeExcite(12, 5)
    m64 = copy.deepcopy(m).double()
    m = m.to(DEV)
    g = gen(82)
    x, res = torch.randn(2, 12, 4, 3, generator=g), torch.randn(2, 12, 4, 3, generator=g)
    xs, rs, x64, r64 = leaf(x), leaf(res), f64(x), f64(res)
    with fastnets.use_backend(backend):
        y = m(xs, residual=rs, relu=True)
    y64 = _se_eager(x64, m64.fc1.weight, m64.fc1.bias, m64.fc2.weight, m64.fc2.bias, r64, True)
    backward_both(y, y64, g)
    check({"y": (y, y64), "grad_x": (xs.grad, x64.grad), "grad_residual": (rs.grad, r64.grad),
           "grad fc1.weight": (m.fc1.weight.grad, m64.fc1.weight.grad),
           "grad fc2.bias": (m.fc2.bias.grad, m64.fc2.bias.grad)})
