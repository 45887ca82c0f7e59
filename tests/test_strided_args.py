"""Every tensor argument of every public op and module, passed as a strided view, gives the outputs, gradients
and in-place running-statistics updates of contiguous tensors (issue 28, item 1).

Each case replaces ONE tensor argument by a view with the same values: a slice in W (`x[..., 2:2 + W]` of a
wider buffer, dense in no layout), a slice in C (every other channel of a channels_last buffer), every other
element (`v[::2]`: per-channel vectors, [N, C] gates and boxes, a weight's last dimension) or a transposed
weight (dense, permuted strides). The buffer around the view holds NaN, so a kernel that reads a neighbour
instead of the element (a per-channel vector loaded as if contiguous) fails loudly; running statistics keep a
finite sentinel around them, so an update that lands beside the view fails too. The truth is torch in float64
on the contiguous values (conftest helpers); augmentation, whose oracle is the float64 reference (validated
against torchvision v2 in test_augment.py), and its noise (a backend's own random stream) are compared
with the same call on contiguous arguments.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastnets
from fastnets.nn import BatchNormAct2d, Conv2d, SqueezeExcite, conv_bn_act
from fastnets.ops.augment import augment_apply
from fastnets.ops.batch_norm import batch_norm
from fastnets.ops.conv import conv2d, conv2d_batch_norm
from fastnets.ops.conv_prologue import bn_act_conv2d
from fastnets.ops.squeeze_excite import se_excite, se_scale, se_squeeze, squeeze_excite

from conftest import GPU, assert_rel, backend_params, biting_input, bn_truth, se_truth

DEV = "cuda" if GPU else "cpu"
NAN = float("nan")
SENTINEL = 1234.5  # around in-place buffers: must survive the update
EPS = 0.05
MOMENTUM = 0.3


@pytest.fixture(autouse=True)
def _ieee_fp32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


# ------------------------------------------------------------------------------------------------ views


def strided(t, kind, fill=NAN):
    """A view holding t's values with the strides of `kind`; the rest of its buffer is `fill`."""
    t = t.detach()
    if kind == "w_slice":  # a window in W of a wider NCHW buffer
        buf = torch.full(t.shape[:-1] + (t.shape[-1] + 3,), fill, dtype=t.dtype, device=t.device)
        view = buf[..., 2:2 + t.shape[-1]]
    elif kind == "c_slice":  # every other channel of a channels_last buffer
        shape = (t.shape[0], 2 * t.shape[1]) + tuple(t.shape[2:])
        buf = torch.full(shape, fill, dtype=t.dtype, device=t.device).contiguous(memory_format=torch.channels_last)
        view = buf[:, 1::2]
    elif kind == "every_other":  # v[::2] in the last dimension
        buf = torch.full(t.shape[:-1] + (2 * t.shape[-1],), fill, dtype=t.dtype, device=t.device)
        view = buf[..., ::2]
    elif kind == "offset":  # a one-element tensor that does not start its storage
        buf = torch.full((t.numel() + 3,), fill if t.is_floating_point() else 0, dtype=t.dtype, device=t.device)
        view = buf[3:].view(t.shape)
    elif kind == "transposed":  # dims 0 and 1 swapped in memory: dense, permuted strides
        view = t.transpose(0, 1).contiguous().transpose(0, 1)
        buf = view
    else:
        raise ValueError(kind)
    with torch.no_grad():
        view.copy_(t)
    if kind not in ("transposed", "offset"):  # dense in no layout: an op must copy it or index it as it is
        assert not view.is_contiguous()
        assert view.dim() != 4 or not view.is_contiguous(memory_format=torch.channels_last)
    return view, buf


def leaf(t):
    return t.detach().requires_grad_(t.is_floating_point())


def replace(args, name, kind, grads=True):
    """args with args[name] replaced by its strided view (a leaf of its own when it takes gradients)."""
    out = dict(args)
    view, _ = strided(args[name], kind)
    out[name] = leaf(view) if (grads and args[name].requires_grad) else view
    return out


def vec(c, lo, hi, g):
    return (torch.rand(c, generator=g, dtype=torch.float64) * (hi - lo) + lo).float().to(DEV)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def upstream(shape, g, like=None):
    """A non-zero-mean upstream gradient, correlated with `like` when given."""
    d = torch.randn(shape, generator=g, dtype=torch.float64) + 0.4
    if like is not None:
        ld = like.detach().cpu().double()
        d = d + 0.5 * (ld - ld.mean()) / (ld.std() + 1e-12)
    return d.float().to(DEV)


def grads_of(y, leaves, dy, kind=None):
    """{name: grad} of y for the leaves that require grad; the upstream gradient dy passed as a strided view
    of `kind` when given (the backward ops' grad_output argument)."""
    names = [k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    got = torch.autograd.grad(y, [leaves[k] for k in names], dy if kind is None else strided(dy, kind)[0])
    return dict(zip(names, got))


def check_all(got, want, what, refs=None):
    for name in want:
        assert name in got, f"{what}: no {name}"
        assert_rel(got[name], want[name], torch.float32, ref=(refs or {}).get(name), msg=f"{what} {name}")


def in_place_buffer(name, values, kind):
    """A running-statistics buffer as the user may pass it: contiguous, or a view of a larger buffer whose
    other elements hold SENTINEL (returned so that the test sees they stay)."""
    if kind is None:
        return values.clone(), None
    view, buf = strided(values, kind, fill=SENTINEL)
    return view, buf


def assert_sentinel_kept(buf, view, what):
    if buf is None:
        return
    mask = torch.ones_like(buf, dtype=torch.bool)
    mask.as_strided(view.shape, view.stride(), view.storage_offset() - buf.storage_offset()).fill_(False)
    assert (buf[mask] == SENTINEL).all(), f"{what}: the update wrote beside the strided running statistics"


# ------------------------------------------------------------------------------------------------ batch_norm

BN_SHAPE = (2, 3, 4, 5)
ACT_SHAPES = {"input": ("w_slice", "c_slice"), "residual": ("w_slice", "c_slice")}
VEC_KINDS = ("every_other",)


def _bn_args(g, training):
    x = biting_input(BN_SHAPE, torch.float32, device=DEV)
    c = BN_SHAPE[1]
    return {
        "input": leaf(x), "residual": leaf(torch.randn(BN_SHAPE, generator=g).to(DEV) + 0.5),
        "weight": leaf(vec(c, 0.5, 1.5, g)), "bias": leaf(vec(c, -0.5, 0.5, g)),
        "running_mean": vec(c, -1.0, 1.0, g), "running_var": vec(c, 0.5, 2.0, g),
    }


BN_CASES = [(mode, name, kind) for mode in ("train", "eval")
            for name, kinds in list(ACT_SHAPES.items()) + [(v, VEC_KINDS) for v in ("weight", "bias", "running_mean",
                                                                                       "running_var")]
            for kind in kinds if not (mode == "eval" and kind == "w_slice")] + [
    ("train", "grad_output", "c_slice"), ("eval", "grad_output", "w_slice")]


@pytest.mark.parametrize("backend", backend_params("batch_norm"))
@pytest.mark.parametrize("mode,name,kind", BN_CASES)
def test_batch_norm_add_act(backend, mode, name, kind):
    """batch_norm(input, running stats, weight, bias, residual, act): train with relu (bn+add+relu), eval with
    silu (its backward recomputes the pre-activation from the folded vectors)."""
    g = gen(1)
    training = mode == "train"
    act = "relu" if training else "silu"
    dense = _bn_args(g, training)
    args = dict(dense)
    bufs = {}
    for stat in ("running_mean", "running_var"):
        args[stat], bufs[stat] = in_place_buffer(stat, dense[stat], kind if name == stat else None)
    if name in ("input", "weight", "bias", "residual"):
        args = replace(args, name, kind)
    y = batch_norm(args["input"], args["running_mean"], args["running_var"], args["weight"], args["bias"], training,
                   MOMENTUM, EPS, residual=args["residual"], act=act, backend=backend)
    dy = upstream(y.shape, g, y)
    got = grads_of(y, {k: args[k] for k in ("input", "weight", "bias", "residual")}, dy,
                   kind if name == "grad_output" else None)

    x64 = {k: dense[k].detach().double().requires_grad_(k in ("input", "weight", "bias", "residual")) for k in dense}
    rm, rv = x64["running_mean"].clone(), x64["running_var"].clone()
    want = F.batch_norm(x64["input"], rm, rv, x64["weight"], x64["bias"], training, MOMENTUM, EPS) + x64["residual"]
    want = torch.relu(want) if act == "relu" else F.silu(want)
    names = ["input", "weight", "bias", "residual"]
    wgrads = dict(zip(names, torch.autograd.grad(want, [x64[k] for k in names], dy.double())))
    what = f"{backend} {mode} {name}={kind}"
    assert_rel(y, want, torch.float32, msg=f"{what} y")
    check_all(got, wgrads, what, refs={"input": dy, "residual": dy})
    assert_rel(args["running_mean"], rm, torch.float32, msg=f"{what} running_mean")
    assert_rel(args["running_var"], rv, torch.float32, msg=f"{what} running_var")
    for stat in ("running_mean", "running_var"):
        assert_sentinel_kept(bufs[stat], args[stat], f"{what} {stat}")


@pytest.mark.parametrize("backend", backend_params("batch_norm"))
def test_batch_norm_module_with_strided_parameters_and_buffers(backend):
    """A BatchNormAct2d whose weight, bias and running statistics are views of larger buffers (tied or packed
    parameters), on a W-sliced input and a C-sliced residual."""
    g = gen(2)
    dense = _bn_args(g, True)
    c = BN_SHAPE[1]
    m = BatchNormAct2d(c, eps=EPS, momentum=MOMENTUM, act="relu").to(DEV)
    w_view, _ = strided(dense["weight"], "every_other")
    b_view, _ = strided(dense["bias"], "every_other")
    m.weight = torch.nn.Parameter(w_view)
    m.bias = torch.nn.Parameter(b_view)
    rm, rm_buf = strided(dense["running_mean"], "every_other", fill=SENTINEL)
    rv, rv_buf = strided(dense["running_var"], "every_other", fill=SENTINEL)
    m.running_mean, m.running_var = rm, rv
    x = leaf(strided(dense["input"], "w_slice")[0])
    res = leaf(strided(dense["residual"], "c_slice")[0])
    with fastnets.use_backend(backend):
        y = m(x, residual=res)
    dy = upstream(y.shape, g, y)
    got = grads_of(y, {"input": x, "residual": res, "weight": m.weight, "bias": m.bias}, dy)
    want, wgrads, rm64, rv64 = bn_truth(dense["input"], dense["running_mean"], dense["running_var"],
                                        dense["weight"], dense["bias"], True, MOMENTUM, EPS,
                                        residual=dense["residual"], relu=True, grad=dy)
    assert_rel(y, want, torch.float32, msg="y")
    check_all(got, {"input": wgrads["x"], "residual": wgrads["residual"], "weight": wgrads["weight"],
                    "bias": wgrads["bias"]}, "module", refs={"input": dy, "residual": dy})
    assert_rel(m.running_mean, rm64, torch.float32, msg="running_mean")
    assert_rel(m.running_var, rv64, torch.float32, msg="running_var")
    assert_sentinel_kept(rm_buf, rm, "running_mean")
    assert_sentinel_kept(rv_buf, rv, "running_var")


def test_sync_batch_norm_single_process_group():
    """The cross-rank SyncBatchNorm path (its own autograd function on the batch_norm primitives, statistics
    through a collective) in a one-rank gloo group: strided input, weight, bias, residual and running
    statistics, on the reference and (under the interpreter or on a GPU) Triton."""
    import torch.distributed as dist

    from fastnets.ops.sync_batch_norm import sync_batch_norm

    if GPU or not dist.is_available():
        pytest.skip("the single-process gloo group holds CPU tensors")
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        for backend in ("reference", "triton"):
            g = gen(3)
            dense = _bn_args(g, True)
            rm, rm_buf = strided(dense["running_mean"], "every_other", fill=SENTINEL)
            rv, rv_buf = strided(dense["running_var"], "every_other", fill=SENTINEL)
            a = {"input": leaf(strided(dense["input"], "c_slice")[0]),
                 "residual": leaf(strided(dense["residual"], "w_slice")[0]),
                 "weight": leaf(strided(dense["weight"], "every_other")[0]),
                 "bias": leaf(strided(dense["bias"], "every_other")[0])}
            y = sync_batch_norm(a["input"], rm, rv, a["weight"], a["bias"], MOMENTUM, EPS, group, 1,
                                residual=a["residual"], relu=True, backend=backend)
            dy = upstream(y.shape, g, y)
            got = grads_of(y, a, dy)
            want, wgrads, rm64, rv64 = bn_truth(dense["input"], dense["running_mean"], dense["running_var"],
                                                dense["weight"], dense["bias"], True, MOMENTUM, EPS,
                                                residual=dense["residual"], relu=True, grad=dy)
            assert_rel(y, want, torch.float32, msg=f"{backend} y")
            check_all(got, {"input": wgrads["x"], "residual": wgrads["residual"], "weight": wgrads["weight"],
                            "bias": wgrads["bias"]}, backend, refs={"input": dy, "residual": dy})
            assert_rel(rm, rm64, torch.float32, msg=f"{backend} running_mean")
            assert_rel(rv, rv64, torch.float32, msg=f"{backend} running_var")
            assert_sentinel_kept(rm_buf, rm, "running_mean")
            assert_sentinel_kept(rv_buf, rv, "running_var")
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ conv

X_SHAPE, W_SHAPE = (2, 3, 5, 6), (4, 3, 3, 3)
Y_SHAPE = (2, 4, 5, 6)  # stride 1, padding 1


def _conv_args(g):
    cout = W_SHAPE[0]
    return {
        "input": leaf(biting_input(X_SHAPE, torch.float32, device=DEV, big_mean=4.0)),
        "weight": leaf((torch.randn(W_SHAPE, generator=g) * 0.3).to(DEV)),
        "bias": leaf(vec(cout, -0.5, 0.5, g)), "scale": leaf(vec(cout, 0.5, 1.5, g)),
        "shift": leaf(vec(cout, -0.5, 0.5, g)), "residual": leaf(torch.randn(Y_SHAPE, generator=g).to(DEV)),
    }


CONV_CASES = [("input", "w_slice"), ("input", "c_slice"), ("weight", "transposed"), ("weight", "every_other"),
              ("bias", "every_other"), ("scale", "every_other"), ("shift", "every_other"),
              ("residual", "w_slice"), ("residual", "c_slice"), ("grad_output", "c_slice"),
              ("grad_output", "w_slice")]


def _conv_truth(d, dy, act):
    x64 = {k: v.detach().double().requires_grad_() for k, v in d.items()}
    v = F.conv2d(x64["input"], x64["weight"], x64["bias"], 1, 1)
    v = v * x64["scale"].view(1, -1, 1, 1) + x64["shift"].view(1, -1, 1, 1) + x64["residual"]
    y = torch.relu(v) if act == "relu" else F.silu(v)
    return y.detach(), dict(zip(x64, torch.autograd.grad(y, list(x64.values()), dy.double())))


@pytest.mark.parametrize("backend", backend_params("conv"))
@pytest.mark.parametrize("name,kind", CONV_CASES)
def test_conv2d_epilogue(backend, name, kind):
    """conv2d(input, weight, bias, scale=, shift=, residual=, act=silu): the reported case (a strided bias or
    scale gave wrong per-channel results on Triton) and every other tensor argument."""
    g = gen(4)
    dense = _conv_args(g)
    args = replace(dense, name, kind) if name in dense else dense
    y = conv2d(args["input"], args["weight"], args["bias"], stride=1, padding=1, scale=args["scale"],
               shift=args["shift"], residual=args["residual"], act="silu", backend=backend)
    dy = upstream(y.shape, g, y)
    got = grads_of(y, args, dy, kind if name == "grad_output" else None)
    want, wgrads = _conv_truth(dense, dy, "silu")
    what = f"{backend} {name}={kind}"
    assert_rel(y, want, torch.float32, msg=f"{what} y")
    check_all(got, wgrads, what, refs={"input": dy, "residual": dy})


CONV_BN_CASES = [(mode, name, kind) for mode in ("train", "eval") for name, kind in [
    ("input", "c_slice"), ("weight", "transposed"), ("bias", "every_other"), ("running_mean", "every_other"),
    ("running_var", "every_other"), ("bn_weight", "every_other"), ("bn_bias", "every_other"),
    ("residual", "w_slice"), ("grad_output", "c_slice")]]


@pytest.mark.parametrize("backend", backend_params("conv"))
@pytest.mark.parametrize("mode,name,kind", CONV_BN_CASES)
def test_conv_batch_norm_act(backend, mode, name, kind):
    """conv2d_batch_norm (conv_bn_act's op): training runs the statistics epilogue and bn_apply_train, eval
    folds the BatchNorm into the convolution's epilogue; running statistics updated in place."""
    g = gen(5)
    training = mode == "train"
    d = _conv_args(g)
    cout = W_SHAPE[0]
    dense = {"input": d["input"], "weight": d["weight"], "bias": d["bias"], "residual": d["residual"],
             "bn_weight": leaf(vec(cout, 0.5, 1.5, g)), "bn_bias": leaf(vec(cout, -0.5, 0.5, g)),
             "running_mean": vec(cout, -1.0, 1.0, g), "running_var": vec(cout, 0.5, 2.0, g)}
    args = dict(dense)
    bufs = {}
    for stat in ("running_mean", "running_var"):
        args[stat], bufs[stat] = in_place_buffer(stat, dense[stat], kind if name == stat else None)
    if name in dense and name not in bufs:
        args = replace(args, name, kind)
    y = conv2d_batch_norm(args["input"], args["weight"], args["bias"], args["running_mean"], args["running_var"],
                          args["bn_weight"], args["bn_bias"], training, MOMENTUM, EPS, 1, 1,
                          residual=args["residual"], act="relu", backend=backend)
    dy = upstream(y.shape, g, y)
    leaves = {k: args[k] for k in ("input", "weight", "bias", "residual", "bn_weight", "bn_bias")}
    got = grads_of(y, leaves, dy, kind if name == "grad_output" else None)

    x64 = {k: dense[k].detach().double().requires_grad_(k in leaves) for k in dense}
    rm, rv = x64["running_mean"].clone(), x64["running_var"].clone()
    z = F.conv2d(x64["input"], x64["weight"], x64["bias"], 1, 1)
    want = torch.relu(F.batch_norm(z, rm, rv, x64["bn_weight"], x64["bn_bias"], training, MOMENTUM, EPS)
                      + x64["residual"])
    wgrads = dict(zip(leaves, torch.autograd.grad(want, [x64[k] for k in leaves], dy.double())))
    what = f"{backend} {mode} {name}={kind}"
    assert_rel(y, want, torch.float32, msg=f"{what} y")
    # a bias before a training-mode BatchNorm has an exactly zero gradient: bounded against ||dy||
    check_all(got, wgrads, what, refs={"input": dy, "residual": dy, "bias": dy})
    assert_rel(args["running_mean"], rm, torch.float32, msg=f"{what} running_mean")
    assert_rel(args["running_var"], rv, torch.float32, msg=f"{what} running_var")
    for stat in bufs:
        assert_sentinel_kept(bufs[stat], args[stat], f"{what} {stat}")


@pytest.mark.parametrize("backend", backend_params("conv"))
def test_conv_modules_on_strided_input(backend):
    """fastnets.nn.Conv2d (bias, W-sliced input) and conv_bn_act (eval fold, C-sliced input and residual)."""
    g = gen(6)
    d = _conv_args(g)
    conv = Conv2d(3, 4, 3, padding=1, bias=True).to(DEV)
    bn = torch.nn.BatchNorm2d(4, eps=EPS).to(DEV).eval()
    with torch.no_grad():
        conv.weight.copy_(d["weight"])
        conv.bias.copy_(d["bias"])
        bn.weight.copy_(d["scale"])
        bn.bias.copy_(d["shift"])
        bn.running_mean.uniform_(-1, 1, generator=torch.Generator(DEV).manual_seed(0))
    x = leaf(strided(d["input"], "w_slice")[0])
    res = leaf(strided(d["residual"], "c_slice")[0])
    with fastnets.use_backend(backend):
        y1 = conv(x)
        y2 = conv_bn_act(conv, bn, x, residual=res)
    x64 = d["input"].detach().double()
    z = F.conv2d(x64, conv.weight.detach().double(), conv.bias.detach().double(), 1, 1)
    assert_rel(y1, z, torch.float32, msg=f"{backend} Conv2d")
    want = torch.relu(F.batch_norm(z, bn.running_mean.double(), bn.running_var.double(), bn.weight.detach().double(),
                                   bn.bias.detach().double(), False, 0.0, EPS) + d["residual"].detach().double())
    assert_rel(y2, want, torch.float32, msg=f"{backend} conv_bn_act")


PRO_CASES = [("z", "w_slice"), ("z", "c_slice"), ("scale", "every_other"), ("shift", "every_other"),
             ("weight", "transposed"), ("weight", "every_other"), ("bias", "every_other"), ("grad_output", "c_slice")]


@pytest.mark.parametrize("backend", backend_params("conv_prologue"))
@pytest.mark.parametrize("name,kind", PRO_CASES)
def test_bn_act_conv2d(backend, name, kind):
    """bn_act_conv2d(z, scale, shift, weight, bias) (conv_prologue): out and the statistics epilogue's mean and
    variance, gradients of every argument."""
    g = gen(7)
    c, cout = X_SHAPE[1], W_SHAPE[0]
    dense = {"z": leaf(biting_input(X_SHAPE, torch.float32, device=DEV, big_mean=4.0)),
             "scale": leaf(vec(c, 0.3, 1.2, g)), "shift": leaf(vec(c, -0.5, 0.5, g)),
             "weight": leaf((torch.randn(W_SHAPE, generator=g) * 0.3).to(DEV)), "bias": leaf(vec(cout, -0.5, 0.5, g))}
    args = replace(dense, name, kind) if name in dense else dense
    out, mean, var = bn_act_conv2d(args["z"], args["scale"], args["shift"], args["weight"], args["bias"], padding=1,
                                   activation="relu", backend=backend, stats=True)
    dy = upstream(out.shape, g, out)
    got = grads_of(out, args, dy, kind if name == "grad_output" else None)
    x64 = {k: v.detach().double().requires_grad_() for k, v in dense.items()}
    a = torch.relu(x64["z"] * x64["scale"].view(1, -1, 1, 1) + x64["shift"].view(1, -1, 1, 1))
    want = F.conv2d(a, x64["weight"], x64["bias"], 1, 1)
    wgrads = dict(zip(x64, torch.autograd.grad(want, list(x64.values()), dy.double())))
    what = f"{backend} {name}={kind}"
    assert_rel(out, want, torch.float32, msg=f"{what} out")
    assert_rel(mean, want.detach().mean((0, 2, 3)), torch.float32, msg=f"{what} mean")
    assert_rel(var, want.detach().var((0, 2, 3), unbiased=False), torch.float32, msg=f"{what} var")
    check_all(got, wgrads, what, refs={"z": dy})


# ------------------------------------------------------------------------------------------------ squeeze_excite

SE_SHAPE, SE_R = (2, 4, 3, 5), 2


def _se_args(g):
    c, r = SE_SHAPE[1], SE_R
    return {"x": leaf(biting_input(SE_SHAPE, torch.float32, device=DEV, big_mean=3.0)),
            "w1": leaf((torch.randn(r, c, generator=g) * 0.5).to(DEV)), "b1": leaf(vec(r, -0.3, 0.3, g)),
            "w2": leaf((torch.randn(c, r, generator=g) * 0.5).to(DEV)), "b2": leaf(vec(c, -0.3, 0.3, g)),
            "residual": leaf(torch.randn(SE_SHAPE, generator=g).to(DEV))}


SE_CASES = [("x", "w_slice"), ("x", "c_slice"), ("w1", "transposed"), ("w1", "every_other"), ("b1", "every_other"),
            ("w2", "transposed"), ("b2", "every_other"), ("residual", "c_slice"), ("grad_output", "w_slice")]


@pytest.mark.parametrize("backend", backend_params("squeeze_excite"))
@pytest.mark.parametrize("name,kind", SE_CASES)
def test_squeeze_excite_block(backend, name, kind):
    g = gen(8)
    dense = _se_args(g)
    args = replace(dense, name, kind) if name in dense else dense
    y = squeeze_excite(args["x"], args["w1"], args["b1"], args["w2"], args["b2"], residual=args["residual"], relu=True,
                       backend=backend)
    dy = upstream(y.shape, g, y)
    got = grads_of(y, args, dy, kind if name == "grad_output" else None)
    want, wgrads = se_truth(dense["x"], dense["w1"], dense["b1"], dense["w2"], dense["b2"], dense["residual"],
                            relu=True, grad=dy)
    what = f"{backend} {name}={kind}"
    assert_rel(y, want, torch.float32, msg=f"{what} y")
    check_all(got, wgrads, what, refs={"x": dy, "residual": dy})


@pytest.mark.parametrize("backend", backend_params("squeeze_excite"))
def test_squeeze_excite_stage_ops_and_module(backend):
    """se_squeeze (W-sliced x), se_excite (every-other pooled, transposed 1x1-conv weights, strided biases),
    se_scale (C-sliced x, transposed gate, W-sliced residual) and the SqueezeExcite module on a C-sliced input."""
    g = gen(9)
    d = _se_args(g)
    x64 = d["x"].detach().double()
    pooled64 = x64.mean((2, 3))
    assert_rel(se_squeeze(strided(d["x"], "w_slice")[0], backend=backend), pooled64, torch.float32, msg="se_squeeze")

    p = leaf(pooled64.float().to(DEV))
    a = {"pooled": leaf(strided(p, "every_other")[0]),
         "w1": leaf(strided(d["w1"][:, :, None, None], "transposed")[0]),
         "b1": leaf(strided(d["b1"], "every_other")[0]),
         "w2": leaf(strided(d["w2"][:, :, None, None], "transposed")[0]),
         "b2": leaf(strided(d["b2"], "every_other")[0])}
    hidden, gate = se_excite(a["pooled"], a["w1"], a["b1"], a["w2"], a["b2"], backend=backend)
    dg = upstream(gate.shape, g)
    got = grads_of(gate, a, dg)
    l64 = {"pooled": p.detach().double().requires_grad_()}
    l64.update({k: d[k].detach().double().requires_grad_() for k in ("w1", "b1", "w2", "b2")})
    h64 = torch.relu(F.linear(l64["pooled"], l64["w1"], l64["b1"]))
    gate64 = torch.sigmoid(F.linear(h64, l64["w2"], l64["b2"]))
    assert_rel(hidden, h64, torch.float32, msg="se_excite hidden")
    assert_rel(gate, gate64, torch.float32, msg="se_excite gate")
    wgrads = dict(zip(l64, torch.autograd.grad(gate64, list(l64.values()), dg.double())))
    wgrads["w1"], wgrads["w2"] = wgrads["w1"][:, :, None, None], wgrads["w2"][:, :, None, None]
    check_all(got, wgrads, "se_excite")

    gt = leaf(gate64.detach().float())
    s = {"x": leaf(strided(d["x"], "c_slice")[0]), "gate": leaf(strided(gt, "transposed")[0]),
         "residual": leaf(strided(d["residual"], "w_slice")[0])}
    y = se_scale(s["x"], s["gate"], s["residual"], relu=True, backend=backend)
    dy = upstream(y.shape, g, y)
    got = grads_of(y, s, dy)
    s64 = {"x": x64.requires_grad_(), "gate": gate64.detach().requires_grad_(),
           "residual": d["residual"].detach().double().requires_grad_()}
    y64 = torch.relu(s64["x"] * s64["gate"][:, :, None, None] + s64["residual"])
    assert_rel(y, y64, torch.float32, msg="se_scale")
    check_all(got, dict(zip(s64, torch.autograd.grad(y64, list(s64.values()), dy.double()))), "se_scale",
              refs={"x": dy, "residual": dy})

    m = SqueezeExcite(SE_SHAPE[1], SE_R).to(DEV)
    with torch.no_grad():
        m.fc1.weight.copy_(d["w1"][:, :, None, None])
        m.fc1.bias.copy_(d["b1"])
        m.fc2.weight.copy_(d["w2"][:, :, None, None])
        m.fc2.bias.copy_(d["b2"])
    with fastnets.use_backend(backend):
        y = m(strided(d["x"], "c_slice")[0])
    want, _ = se_truth(d["x"], d["w1"], d["b1"], d["w2"], d["b2"])
    assert_rel(y, want, torch.float32, msg="SqueezeExcite module")


# ------------------------------------------------------------------------------------------------ augment

AUG_SHAPE, AUG_OUT = (2, 3, 6, 7), (5, 6)


def _aug_args(g):
    n, c = AUG_SHAPE[:2]
    ang = torch.tensor([0.3, -0.2], dtype=torch.float64)
    mat = torch.zeros(n, 3, 3, dtype=torch.float64)
    mat[:, 0, 0], mat[:, 0, 1], mat[:, 0, 2] = torch.cos(ang) * 1.1, -torch.sin(ang), 0.4
    mat[:, 1, 0], mat[:, 1, 1], mat[:, 1, 2] = torch.sin(ang), torch.cos(ang) * 0.9, -0.3
    mat[:, 2, 2] = 1.0
    mat[1, 2, 0] = 0.01  # a perspective row
    return {"x": torch.rand(AUG_SHAPE, generator=g).to(DEV), "matrix": mat.float().to(DEV),
            "box": torch.tensor([[0.5, 5.0, 0.2, 4.5], [-1.0, 7.0, -1.0, 6.0]], device=DEV),
            "colour": torch.tensor([[1.2, 0.7, 1.3], [0.8, 1.4, 0.6]], device=DEV),
            "scale": torch.tensor([2.0, 3.0, 4.0], device=DEV), "shift": torch.tensor([-1.0, -1.5, -2.0], device=DEV),
            "noise_seed": torch.tensor([12345], dtype=torch.int64, device=DEV)}


AUG_CASES = [("x", "w_slice"), ("x", "c_slice"), ("matrix", "transposed"), ("matrix", "every_other"),
             ("box", "every_other"), ("box", "transposed"), ("colour", "every_other"), ("scale", "every_other"),
             ("shift", "every_other"), ("noise_seed", "offset")]


def _augment(a, backend, noise_std, dtype=torch.float32):
    return augment_apply(a["x"], a["matrix"], AUG_OUT, box=a["box"], colour=a["colour"], brightness=True,
                         contrast=True, saturation=True, noise_seed=a["noise_seed"], noise_std=noise_std,
                         noise_clip=False, scale=a["scale"], shift=a["shift"], out_dtype=dtype, backend=backend)


@pytest.mark.parametrize("backend", backend_params("augment"))
@pytest.mark.parametrize("name,kind", AUG_CASES)
def test_augment_apply(backend, name, kind):
    """augment_apply with every colour op, a box, normalisation and noise: without noise against the float64
    reference on contiguous arguments; with noise (the backend's own random stream), equal to the same call
    on contiguous arguments."""
    dense = _aug_args(gen(10))
    args = replace(dense, name, kind, grads=False)
    x64 = dict(dense, x=dense["x"].double())
    if name != "noise_seed":
        want = _augment(x64, "reference", 0.0, torch.float64)
        assert_rel(_augment(args, backend, 0.0), want, torch.float32, msg=f"{backend} {name}={kind}")
    torch.testing.assert_close(_augment(args, backend, 0.2), _augment(dense, backend, 0.2), rtol=0, atol=0,
                               msg=f"{backend} {name}={kind} with noise")


@pytest.mark.parametrize("backend", backend_params("augment"))
def test_augment_module_on_strided_input(backend):
    import fastnets.augment as A

    x = _aug_args(gen(11))["x"]
    aug = A.Augment([A.RandomAffine(20, translate=(0.1, 0.1)), A.ColorJitter(0.3, 0.3, 0.3), A.GaussianNoise(0, 0.1),
                     A.Normalize([0.4, 0.5, 0.6], [0.2, 0.3, 0.4])])
    with fastnets.use_backend(backend):
        want = aug(x, torch.Generator(DEV).manual_seed(5))
        for kind in ("w_slice", "c_slice"):
            got = aug(strided(x, kind)[0], torch.Generator(DEV).manual_seed(5))
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=kind)
    assert math.isfinite(want.sum().item())


def test_avg_pool_module_on_strided_input():
    """fastnets.nn.AvgPool2d (its 2x2 / stride-2 fast path on CPU under auto, else torch's) on W- and C-sliced
    inputs, against torch in float64."""
    from fastnets.nn import AvgPool2d

    x = biting_input((2, 3, 6, 8), torch.float32, device=DEV)
    for kind in ("w_slice", "c_slice"):
        assert_rel(AvgPool2d(2)(strided(x, kind)[0]), F.avg_pool2d(x.double(), 2), torch.float32, msg=kind)
