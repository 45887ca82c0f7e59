"""The `native` backend (auto on CPU tensors): torch's native kernels at the wrapper level, BatchNorm folded
into one oneDNN convolution in eval, the fold cache. Checked against torch.nn in float64 and against the
reference backend (the oracle), every gradient and running statistic included."""
import copy

import pytest
import torch
from torch import nn

import fastnets
from fastnets.nn.batch_norm import bn_act
from fastnets.nn.conv import conv_bn_act
from fastnets.ops import _native_cpu, _native_fast
from fastnets.ops.batch_norm import batch_norm
from fastnets.ops.squeeze_excite import squeeze_excite

from conftest import assert_rel


def _pair(cin=5, cout=7, k=3, stride=1, padding=1, bias=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias).to(dtype)
    bn = nn.BatchNorm2d(cout).to(dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=dtype) * 0.3)
        if bias:
            conv.bias.copy_(torch.randn(cout, generator=g, dtype=dtype))
        bn.weight.copy_(torch.rand(cout, generator=g, dtype=dtype) + 0.5)
        bn.bias.copy_(torch.randn(cout, generator=g, dtype=dtype))
        bn.running_mean.copy_(torch.randn(cout, generator=g, dtype=dtype) * 2 + 1)
        bn.running_var.copy_(torch.rand(cout, generator=g, dtype=dtype) * 3 + 0.2)
    return conv, bn


def _x(shape, dtype=torch.float64, cl=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)  # non-zero mean
    return x.contiguous(memory_format=torch.channels_last) if cl else x


def _torch_block(conv, bn, x, residual, act):
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    return fastnets.activations.forward(y, *fastnets.activations.canonical(act))


def test_auto_is_native_on_cpu_and_reported():
    assert "native" in fastnets.available_backends("cpu")
    from fastnets import info
    assert "native" in info.report()
    from fastnets import backends
    assert backends.resolve("auto", "cpu", implemented=("native", "reference")) == "native"
    # fastnets' custom ops have no native kernels: auto/native inside them is the reference
    assert backends.resolve("auto", "cpu", implemented=("reference", "triton")) == "reference"
    assert backends.resolve("native", "cpu", implemented=("reference", "triton")) == "reference"
    with pytest.raises(fastnets.BackendUnavailableError, match="native"):
        backends.resolve("native", "meta", implemented=("reference",))


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("act", ["relu", "identity", "silu", "leaky_relu"])
@pytest.mark.parametrize("with_res", [False, True], ids=["", "res"])
def test_conv_bn_eval_matches_torch_float64_and_reference(cl, act, with_res):
    conv, bn = _pair(bias=True)
    conv.eval(), bn.eval()
    x = _x((2, 5, 9, 7), cl=cl)
    res = _x((2, 7, 9, 7), cl=cl, seed=2) if with_res else None
    want = _torch_block(conv, bn, x, res, act)
    with fastnets.use_backend("auto"):
        got = conv_bn_act(conv, bn, x, residual=res, act=act)
    assert_rel(got, want)
    with fastnets.use_backend("reference"):
        ref = conv_bn_act(conv, bn, x, residual=res, act=act)
    assert_rel(got, ref)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("act", ["relu", "relu6", "hardswish", "gelu", "silu"])
@pytest.mark.parametrize("with_res", [False, True], ids=["", "res"])
def test_onednn_fused_inference_fp32(cl, act, with_res):
    """The no-grad fp32 path is oneDNN's fused convolution: each post-op against torch (float64 truth)."""
    conv, bn = _pair(cin=8, cout=13, stride=2, dtype=torch.float32)
    conv.eval(), bn.eval()
    x = _x((3, 8, 11, 10), dtype=torch.float32, cl=cl)
    out_hw = (6, 5)
    res = _x((3, 13) + out_hw, dtype=torch.float32, cl=cl, seed=3) if with_res else None
    c64, b64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    want = _torch_block(c64, b64, x.double(), None if res is None else res.double(), act)
    with torch.no_grad():
        got = conv_bn_act(conv, bn, x, residual=res, act=act)
    assert got.dtype == torch.float32
    assert_rel(got, want)


def test_frozen_bn_gradients_exact():
    """Eval-mode BN with autograd (frozen-BN fine-tuning): every gradient as torch's unfolded chain."""
    conv, bn = _pair(bias=True)
    conv.eval(), bn.eval()
    x = _x((2, 5, 8, 8)).requires_grad_()
    res = _x((2, 7, 8, 8), seed=4).requires_grad_()
    gy = _x((2, 7, 8, 8), seed=5)
    c2, b2 = copy.deepcopy(conv), copy.deepcopy(bn)
    x2, r2 = x.detach().clone().requires_grad_(), res.detach().clone().requires_grad_()
    conv_bn_act(conv, bn, x, residual=res, act="relu").backward(gy)
    _torch_block(c2, b2, x2, r2, "relu").backward(gy)
    for a, b in ((x.grad, x2.grad), (res.grad, r2.grad), (conv.weight.grad, c2.weight.grad),
                 (conv.bias.grad, c2.bias.grad), (bn.weight.grad, b2.weight.grad), (bn.bias.grad, b2.bias.grad)):
        assert_rel(a, b)
    assert torch.equal(bn.running_mean, b2.running_mean) and torch.equal(bn.running_var, b2.running_var)


def _grouped_pair(channels=12, groups=12, stride=1, eps=1e-3, dtype=torch.float64):
    """A grouped (depthwise by default) Conv2d + BatchNorm2d with a non-default eps, randomised."""
    g = torch.Generator().manual_seed(7)
    conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=groups, bias=True).to(dtype)
    bn = nn.BatchNorm2d(channels, eps=eps).to(dtype)
    with torch.no_grad():
        for t, v in ((conv.weight, torch.randn(conv.weight.shape, generator=g) * 0.3),
                     (conv.bias, torch.randn(channels, generator=g)), (bn.weight, torch.rand(channels, generator=g) + 0.5),
                     (bn.bias, torch.randn(channels, generator=g)), (bn.running_mean, torch.randn(channels, generator=g)),
                     (bn.running_var, torch.rand(channels, generator=g) * 0.01 + 1e-3)):  # var ~ eps: eps matters
            t.copy_(v.to(dtype))
    return conv.eval(), bn.eval()


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("groups,stride,act,with_res", [(12, 1, "silu", False), (12, 2, "relu", False),
                                                        (3, 1, "relu", True), (12, 1, "hardswish", True)])
def test_grouped_conv_bn_eval_folds_on_native(cl, groups, stride, act, with_res):
    """A grouped / depthwise Conv -> BN (eval) -> [add] -> act on the native backend is ONE oneDNN
    convolution of the folded weights (the fold cached for the conv module), in fp32 against torch.nn in
    float64; with autograd (frozen BN) every gradient as torch's unfolded chain."""
    conv, bn = _grouped_pair(groups=groups, stride=stride, dtype=torch.float32)
    x = _x((2, 12, 9, 8), dtype=torch.float32, cl=cl)
    out = (2, 12, 9 if stride == 1 else 5, 8 if stride == 1 else 4)
    res = _x(out, dtype=torch.float32, cl=cl, seed=3) if with_res else None
    c64, b64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    want = _torch_block(c64, b64, x.double(), None if res is None else res.double(), act)
    with fastnets.use_backend("auto"), torch.no_grad():
        got = conv_bn_act(conv, bn, x, residual=res, act=act)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_rel(got, want)
    assert conv in _native_cpu._FOLDS  # the folded path ran (not a separate F.batch_norm)
    # autograd through the fold (frozen BatchNorm), float64 against torch's unfolded chain
    conv, bn, x = c64, b64, x.double().requires_grad_()
    c2, b2 = copy.deepcopy(conv), copy.deepcopy(bn)
    x2 = x.detach().clone().requires_grad_()
    gy = _x(out, seed=5)
    with fastnets.use_backend("auto"):
        conv_bn_act(conv, bn, x, residual=None if res is None else res.double(), act=act).backward(gy)
    _torch_block(c2, b2, x2, None if res is None else res.double(), act).backward(gy)
    for a, b in ((x.grad, x2.grad), (conv.weight.grad, c2.weight.grad), (conv.bias.grad, c2.bias.grad),
                 (bn.weight.grad, b2.weight.grad), (bn.bias.grad, b2.bias.grad)):
        assert_rel(a, b)


def test_grouped_conv_bn_train_and_other_backends_unchanged():
    """Training, and eval on the reference backend, of a grouped Conv -> BN stay the unfolded computation
    (torch's grouped convolution, then the BatchNorm), against torch.nn in float64."""
    conv, bn = _grouped_pair(groups=4)
    x = _x((3, 12, 6, 6))
    with fastnets.use_backend("reference"):
        got = conv_bn_act(conv, bn, x, act="relu")
    assert_rel(got, _torch_block(conv, bn, x, None, "relu"))
    c2, b2 = copy.deepcopy(conv).train(), copy.deepcopy(bn).train()
    conv.train(), bn.train()
    with fastnets.use_backend("auto"):
        got = conv_bn_act(conv, bn, x, act="relu")
    assert_rel(got, _torch_block(c2, b2, x, None, "relu"))
    assert torch.equal(bn.running_mean, b2.running_mean) and torch.equal(bn.running_var, b2.running_var)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batch_norm_dtype_mismatch_names_the_arguments(train):
    """torch's CPU BatchNorm refuses a float64 input with float32 parameters with "mixed dtype (CPU): all
    inputs must share same datatype." (no names); the native backend names each argument and its dtype."""
    bn = fastnets.nn.BatchNorm2d(3).train(train)
    with fastnets.use_backend("auto"), pytest.raises(TypeError) as e:
        bn(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    msg = str(e.value)
    assert "input torch.float64" in msg and "weight torch.float32" in msg and "running_var torch.float32" in msg
    with fastnets.use_backend("auto"), pytest.raises(TypeError, match="input torch.float32 with weight torch.float16"):
        batch_norm(torch.randn(2, 3, 4, 4), None, None, torch.ones(3, dtype=torch.float16), None, training=True)
    # what torch accepts still runs: one dtype, or a bf16 input with fp32 parameters (mixed precision)
    with fastnets.use_backend("auto"):
        assert bn(torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
        assert bn.double()(torch.randn(2, 3, 4, 4, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_train_running_stats_identical_to_torch(momentum, cl):
    conv, bn = _pair(cin=3, cout=6, dtype=torch.float32)
    bn.momentum = momentum
    c2, b2 = copy.deepcopy(conv), copy.deepcopy(bn)
    conv.train(), bn.train(), c2.train(), b2.train()
    for step in range(3):
        x = _x((4, 3, 7, 5), dtype=torch.float32, cl=cl, seed=10 + step)
        y = conv_bn_act(conv, bn, x, act="relu")
        y2 = torch.relu(b2(c2(x)))
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
        y.sum().backward()
        y2.sum().backward()
    # F.batch_norm itself updates them: bit-identical to torch.nn
    assert torch.equal(bn.running_mean, b2.running_mean)
    assert torch.equal(bn.running_var, b2.running_var)
    assert int(bn.num_batches_tracked) == int(b2.num_batches_tracked) == 3
    for a, b in ((conv.weight.grad, c2.weight.grad), (bn.weight.grad, b2.weight.grad), (bn.bias.grad, b2.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bn_act_and_functional_match_torch_and_reference():
    bn = nn.BatchNorm2d(7).double()
    _, bn_src = _pair()
    bn.load_state_dict(bn_src.state_dict())
    x = _x((3, 7, 4, 5)).requires_grad_()
    res = _x((3, 7, 4, 5), seed=7)
    b2 = copy.deepcopy(bn)
    x2 = x.detach().clone().requires_grad_()
    y = bn_act(bn, x, residual=res, relu=True)
    y2 = torch.relu(b2(x2) + res)
    assert_rel(y, y2)
    y.sum().backward()
    y2.sum().backward()
    assert_rel(x.grad, x2.grad)
    assert_rel(bn.weight.grad, b2.weight.grad)
    assert torch.equal(bn.running_var, b2.running_var) and int(bn.num_batches_tracked) == 1
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    with fastnets.use_backend("reference"):
        ref = batch_norm(x.detach(), rm.clone(), rv.clone(), bn.weight, bn.bias, True, 0.1, 1e-5, residual=res,
                         relu=True)
    got = batch_norm(x.detach(), rm.clone(), rv.clone(), bn.weight, bn.bias, True, 0.1, 1e-5, residual=res,
                     relu=True, backend="native")
    assert_rel(got, ref)


def test_squeeze_excite_native_matches_reference():
    x = _x((2, 6, 5, 3)).requires_grad_()
    g = torch.Generator().manual_seed(3)
    w1, b1 = torch.randn(3, 6, 1, 1, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    w2, b2 = torch.randn(6, 3, 1, 1, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    res = _x((2, 6, 5, 3), seed=8)
    got = squeeze_excite(x, w1, b1, w2, b2, residual=res, relu=True, backend="auto", inner_act="silu")
    x2 = x.detach().clone().requires_grad_()
    ref = squeeze_excite(x2, w1, b1, w2, b2, residual=res, relu=True, backend="reference", inner_act="silu")
    assert_rel(got, ref)
    got.sum().backward()
    ref.sum().backward()
    assert_rel(x.grad, x2.grad)


def test_fold_cache_invalidation_and_module_untouched():
    conv, bn = _pair(cin=4, cout=6, dtype=torch.float32)
    conv.eval(), bn.eval()
    x = _x((2, 4, 6, 6), dtype=torch.float32)
    before = {k: v.clone() for k, v in {**conv.state_dict(), **bn.state_dict()}.items()}

    def check():
        with torch.no_grad():
            got = conv_bn_act(conv, bn, x, act="relu")
            want = torch.relu(bn(conv(x)))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    check()
    assert conv in _native_cpu._FOLDS
    key = _native_cpu._FOLDS[conv][0]
    check()
    assert _native_cpu._FOLDS[conv][0] == key  # a hit
    for k, v in {**conv.state_dict(), **bn.state_dict()}.items():
        assert torch.equal(v, before[k]), k  # the modules' tensors are never modified
    with torch.no_grad():
        conv.weight.mul_(1.5)  # in place: the version counter moves
    check()
    with torch.no_grad():
        bn.running_var.add_(0.7)
        bn.running_mean.sub_(0.3)
    check()
    _, bn_new = _pair(cin=4, cout=6, dtype=torch.float32, seed=9)
    bn.load_state_dict(bn_new.state_dict())
    check()
    conv.weight.data = conv.weight.data * 0.5  # a new tensor: data_ptr moves
    check()
    with torch.inference_mode():
        with torch.no_grad():
            got = conv_bn_act(conv, bn, x, act="relu")
    torch.testing.assert_close(got, torch.relu(bn(conv(x))).detach(), rtol=1e-5, atol=1e-5)
    check()  # a fold computed under inference_mode stays usable outside it


def test_grad_enabled_eval_does_not_cache_graph():
    conv, bn = _pair(cin=4, cout=6, dtype=torch.float32, seed=11)
    conv.eval(), bn.eval()
    x = _x((2, 4, 6, 6), dtype=torch.float32)
    y = conv_bn_act(conv, bn, x, act="relu")
    assert y.requires_grad  # weights require grad: folded differentiably, not from the cache
    assert conv not in _native_cpu._FOLDS


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bf16(train):
    conv, bn = _pair(cin=6, cout=8, dtype=torch.float32, seed=12)
    conv.train(train), bn.train(train)
    x = _x((2, 6, 7, 7), dtype=torch.float32)
    c64, b64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    want = torch.relu(b64(c64(x.double())))
    convb, bnb = copy.deepcopy(conv).bfloat16(), copy.deepcopy(bn).bfloat16()
    with torch.no_grad():
        got = conv_bn_act(convb, bnb, x.bfloat16(), act="relu")
    assert got.dtype == torch.bfloat16
    assert_rel(got, want)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv_bn_act(conv, bn, x, act="relu")
    assert_rel(got, want)


def test_fold_cache_hits_under_autocast(monkeypatch):
    """Under CPU autocast the eval fold is computed once from the module's fp32 parameters and reused (the
    per-call bf16 copy of the weight must not be the cache key: that recomputed the fold and re-packed the
    weight every call, 0.85x eager in bf16 ResNet-18 inference); the result is the float64 truth to bf16."""
    conv, bn = _pair(cin=6, cout=8, dtype=torch.float32, seed=13)
    conv.eval(), bn.eval()
    x = _x((2, 6, 7, 7), dtype=torch.float32)

    def truth():
        c64, b64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
        return _torch_block(c64, b64, x.double(), None, "relu"), c64, b64

    want, _, _ = truth()
    folds = []
    real = _native_cpu.fold
    monkeypatch.setattr(_native_cpu, "fold", lambda *a: folds.append(a[-1]) or real(*a))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            got = conv_bn_act(conv, bn, x, act="relu")
            assert got.dtype == torch.bfloat16
            assert_rel(got, want)
    assert folds == [torch.bfloat16]  # folded once, into the autocast dtype
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bn.running_var.mul_(1.5)  # a buffer changed in place: the fold is recomputed
        want, _, _ = truth()
        assert_rel(conv_bn_act(conv, bn, x, act="relu"), want)
    assert len(folds) == 2
    # with autograd (frozen-BN fine-tuning under autocast): the fp32 weight's gradient through the bf16 fold
    want, c64, b64 = truth()
    want.sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv_bn_act(conv, bn, x, act="relu")
    assert y.dtype == torch.bfloat16 and y.requires_grad
    y.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32
    for name, a, b in (("conv.weight", conv.weight, c64.weight), ("bn.weight", bn.weight, b64.weight),
                       ("bn.bias", bn.bias, b64.bias)):
        assert_rel(a.grad, b.grad, dtype=torch.bfloat16, msg=name)


def test_explicit_backends_still_run_their_kernels():
    """use_backend('reference') still goes through fastnets' custom ops (the oracle), not torch's."""
    conv, bn = _pair(dtype=torch.float32)
    conv.eval(), bn.eval()
    x = _x((1, 5, 4, 4), dtype=torch.float32)
    with fastnets.use_backend("reference"), torch.no_grad():
        y = conv_bn_act(conv, bn, x)
    assert conv not in _native_cpu._FOLDS
    with torch.no_grad():
        assert_rel(y, torch.relu(bn(conv(x))), scale=10)


# ------------------------------------------------------------------ module-level fast paths (auto on CPU)

from fastnets.nn.conv import Conv2d as FastConv2d  # noqa: E402
from fastnets.nn.pooling import AvgPool2d as FastAvgPool2d  # noqa: E402


def _grads(y, leaves, gy):
    return torch.autograd.grad(y, [t for t in leaves if t is not None], gy)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("conf", [dict(), dict(stride=2, padding=1, bias=False), dict(groups=3, padding="same"),
                                  dict(padding=2, padding_mode="reflect", dilation=2)],
                         ids=["plain", "strided", "grouped-same", "reflect"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_conv2d_module_fast_path_matches_torch_and_reference(cl, conf, train, monkeypatch):
    """Conv2d under auto on a CPU tensor is torch.nn.Conv2d's own call: output and every gradient against
    torch.nn in float64 and against the reference backend; no fastnets wrapper is reached."""
    g = torch.Generator().manual_seed(21)
    ref = nn.Conv2d(6, 9, 3, **conf).double()
    fast = FastConv2d(6, 9, 3, **conf).double()
    fast.load_state_dict(ref.state_dict())
    fast.train(train), ref.train(train)
    x = _x((2, 6, 9, 7), cl=cl).requires_grad_()
    gy = torch.randn(ref(x).shape, generator=g, dtype=torch.float64)
    with fastnets.use_backend("reference"):
        oracle = fast(x)
        oracle_grads = _grads(oracle, [x, fast.weight, fast.bias], gy)

    def boom(*a, **k):
        raise AssertionError("the fast path must not reach fastnets' conv2d wrapper")

    monkeypatch.setattr("fastnets.nn.conv.conv2d", boom)
    with fastnets.use_backend("auto"):
        y = fast(x)
        grads = _grads(y, [x, fast.weight, fast.bias], gy)
    want = ref(x)
    want_grads = _grads(want, [x, ref.weight, ref.bias], gy)
    assert_rel(y, want)
    assert_rel(y, oracle)
    for a, b, c in zip(grads, want_grads, oracle_grads):
        assert_rel(a, b)
        assert_rel(a, c)
    with torch.no_grad(), fastnets.use_backend("auto"):
        assert_rel(fast(x), want)


def test_conv2d_module_fast_path_bad_input_still_named():
    conv = FastConv2d(3, 4, 3)
    with fastnets.use_backend("auto"):
        with pytest.raises(ValueError, match="input has 5 channels"):
            conv(torch.randn(2, 5, 8, 8))
        with pytest.raises(TypeError, match="input must be float"):
            conv(torch.ones(2, 3, 8, 8, dtype=torch.long))
        with pytest.raises(ValueError, match="larger than the padded input"):
            conv(torch.randn(2, 3, 2, 8))
        with pytest.raises(ValueError, match="non-empty"):
            conv(torch.randn(0, 3, 8, 8))
        with pytest.raises(TypeError, match="weight has dtype torch.float16"):
            FastConv2d(3, 4, 3).half()(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (1, 1, 2, 2), (3, 5, 14, 10)])
def test_avg_pool2x2_fast_path_matches_torch(cl, shape):
    """AvgPool2d(2, 2) under auto on the CPU (two strided adds): output, gradient and layout against
    torch.nn.AvgPool2d in float64, and fp32 against the float64 truth."""
    x = _x(shape, cl=cl).requires_grad_()
    gy = _x((shape[0], shape[1], shape[2] // 2, shape[3] // 2), cl=cl, seed=5)
    pool = FastAvgPool2d(2, stride=2)
    assert _native_fast.avg_pool2x2_ok(pool, x)
    with fastnets.use_backend("auto"):
        y = pool(x)
        (gx,) = torch.autograd.grad(y, x, gy)
    want = nn.AvgPool2d(2, stride=2)(x)
    (want_gx,) = torch.autograd.grad(want, x, gy)
    assert_rel(y, want)
    assert_rel(gx, want_gx)
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert gx.stride() == x.stride()
    x32 = x.detach().float()
    with fastnets.use_backend("auto"):
        assert_rel(pool(x32), want)
    # bit-identical to aten's (its summation order), in both dtypes: a model trained with it follows eager
    for xx in (x.detach() * 1e3 + 0.1, x32 * 1e3 + 0.1):
        with fastnets.use_backend("auto"):
            assert torch.equal(pool(xx), nn.AvgPool2d(2, stride=2)(xx))


def test_lenet5_training_on_auto_is_eagers_run_bit_for_bit():
    """fastnets.models.lenet5 and the bench's plain-PyTorch LeNet-5 from the same seed, trained on the same
    batches with SGD on the native backend: the same losses and weights, bit for bit (the bench's trained
    accuracy of the two is then the same number)."""
    from fastnets.bench import timing
    from fastnets.bench.train import build_for_backend

    runs = {}
    for backend in ("eager", "fastnets"):
        with fastnets.use_backend("auto"):
            model, _ = build_for_backend("lenet5", backend, 0, "contiguous", "cpu")
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
            g = torch.Generator().manual_seed(0)
            losses = []
            for _ in range(8):
                x, y = torch.randn(16, 1, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
                loss = timing.loss_fn(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
        runs[backend] = losses, [p.detach().clone() for p in model.parameters()]
    assert runs["fastnets"][0] == runs["eager"][0]
    assert all(torch.equal(a, b) for a, b in zip(runs["fastnets"][1], runs["eager"][1]))


@pytest.mark.parametrize("conf,shape,dtype", [
    (dict(kernel_size=2), (2, 3, 7, 6), torch.float32),                      # odd height: aten's floor mode
    (dict(kernel_size=2, ceil_mode=True), (2, 3, 8, 6), torch.float32),
    (dict(kernel_size=3, stride=2, padding=1), (2, 3, 8, 6), torch.float32),
    (dict(kernel_size=2, divisor_override=3), (2, 3, 8, 6), torch.float32),
    (dict(kernel_size=2), (2, 3, 8, 6), torch.bfloat16),                      # aten accumulates in fp32
    (dict(kernel_size=2), (3, 8, 6), torch.float32),                          # unbatched
])
def test_avg_pool2d_other_configurations_are_torch(conf, shape, dtype):
    fast, ref = FastAvgPool2d(**conf), nn.AvgPool2d(**conf)
    x = _x(shape).to(dtype)
    assert not _native_fast.avg_pool2x2_ok(fast, x)
    with fastnets.use_backend("auto"):
        assert torch.equal(fast(x), ref(x))


def test_lenet5_auto_matches_reference_backend():
    """The whole LeNet-5 (Conv2d and AvgPool2d fast paths) under auto against the reference backend in
    float64: logits and every parameter's gradient."""
    import fastnets.models as fm

    torch.manual_seed(0)
    model = fm.lenet5().double()
    x = _x((3, 1, 32, 32))
    outs = {}
    for backend in ("auto", "reference"):
        model.zero_grad()
        with fastnets.use_backend(backend):
            y = model(x)
        y.square().sum().backward()
        outs[backend] = (y.detach(), [p.grad.clone() for p in model.parameters()])
    assert_rel(outs["auto"][0], outs["reference"][0])
    for a, b in zip(outs["auto"][1], outs["reference"][1]):
        assert_rel(a, b)


def test_cpu_ratios_layout_decision_and_ratio_table():
    """The CPU profile's bookkeeping (no timing): fastnets' row is the faster measured layout with both kept,
    ratios are eager's median over the variant's, and the table states the target and by how much it is met."""
    from fastnets.bench import cpu_ratios as C

    def res(ms, cpu_ms):
        return {"status": "ok", "ms_per_iter": ms, "cpu_ms_per_iter": cpu_ms, "images_per_s": 8e3 / ms,
                "spread": 0.1, "ms_per_iter_repeats": [ms] * 3}

    out = {"eager": res(100.0, 90.0), "fastnets-contiguous": res(80.0, 75.0),
           "fastnets-channels_last": res(90.0, 70.0), "compile": {"status": "error", "reason": "x"}}
    for v in ("fastnets-contiguous", "fastnets-channels_last"):
        out[v]["vs_eager"] = 100.0 / out[v]["ms_per_iter"]
        out[v]["vs_eager_cpu"] = 90.0 / out[v]["cpu_ms_per_iter"]
    meta = {"model": "resnet50", "mode": "infer", "batch_size": 8, "precision": "fp32", "repeats": 3, "iters": 1,
            "warmup": 2, "threads": 1, "load_before": [2.0, 2.0, 2.0], "load_after": [3.0, 2.0, 2.0]}
    rows = C.rows_from_block(out, meta)
    by = {r["backend"]: r for r in rows}
    assert set(by) == {"eager", "compile", "fastnets"}
    f = by["fastnets"]
    assert f["memory_format"] == "contiguous" and f["layout_decision"]["chosen"] == "contiguous"
    assert f["vs_eager"] == pytest.approx(1.25) and set(f["layouts"]) == {"contiguous", "channels_last"}
    assert "vs_compile" not in f  # compile failed: no ratio against it
    table = "\n".join(C.markdown_section({"throughput": rows}))
    assert "| resnet50 | fp32 | infer | 8 |" in table and "1.25x" in table and "| yes |" in table
    assert "| resnet50 | fp32 | infer | error |" in table  # the compile table shows the variant's status
    out["fastnets-contiguous"]["vs_eager"] = 1.1
    out["fastnets-contiguous"]["ms_per_iter"] = 100 / 1.1
    out["fastnets-channels_last"].update(ms_per_iter=95.0, vs_eager=100 / 95)
    table = "\n".join(C.markdown_section({"throughput": C.rows_from_block(out, meta)}))
    assert "**no** (-4%)" in table  # 1.10 against the 1.15 inference target


def test_cpu_ratios_against_compile():
    """Issue 31's ratios from one block: fastnets / compile, fastnets+compile / the faster of the two (by
    name), their targets in the table, and the closing note quoting them."""
    from fastnets.bench import cpu_ratios as C

    def res(ms):
        return {"status": "ok", "ms_per_iter": ms, "cpu_ms_per_iter": ms * 0.9, "images_per_s": 8e3 / ms,
                "spread": 0.1, "ms_per_iter_repeats": [ms] * 3}

    out = {"eager": res(100.0), "fastnets-contiguous": res(80.0), "fastnets-channels_last": res(82.0),
           "compile": res(76.0), "fastnets-compile": res(78.0)}
    for v, r in out.items():
        if v != "eager":
            r["vs_eager"], r["vs_eager_cpu"] = 100.0 / r["ms_per_iter"], 90.0 / r["cpu_ms_per_iter"]
    for v in ("compile", "fastnets-compile"):
        out[v]["compile"] = C.compile_setting("infer")
    meta = {"model": "resnet18", "mode": "infer", "batch_size": 8, "precision": "bf16", "repeats": 3, "iters": 1,
            "warmup": 2, "threads": 2, "load_before": [0.1] * 3, "load_after": [0.2] * 3}
    by = {r["backend"]: r for r in C.rows_from_block(out, meta)}
    assert by["fastnets"]["vs_compile"] == pytest.approx(76.0 / 80.0)
    assert by["fastnets-compile"]["vs_best"] == pytest.approx(76.0 / 78.0)
    assert by["fastnets-compile"]["best_of"] == "compile"
    assert by["compile"]["compile"]["inductor_config"] == {"freezing": True}
    lines = C.markdown_section({"throughput": list(by.values())})
    table = "\n".join(lines)
    assert "inductor, freezing for inference" in table
    assert "0.95x" in table and "**no** (-5%)" in table  # fastnets / compile 0.95 against >= 1.0
    assert "0.97x" in table and "(compile)" in table  # fastnets+compile / compile
    assert lines[-1].startswith("Same-run ratios") and "resnet18 bf16 0.95x" in lines[-1]
    assert C.compile_setting("train")["inductor_config"] == {}


def test_cpu_ratios_compiled_variants_run_with_freezing(monkeypatch):
    """The compiled inference variants are traced and timed with torch._inductor.config.freezing set (dynamo
    reads it when it traces: torch.compile's options would not freeze), the training ones without."""
    import torch._inductor.config as inductor_config
    from fastnets.bench import cpu_ratios as C

    seen = {}

    class Recorded(nn.Module):  # what torch.compile returns: a module; records inductor's setting per call
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *a):
            seen.setdefault(mode, set()).add(inductor_config.freezing)
            return self.model(*a)

    def fake_compile(model, **kw):
        return Recorded(model)

    monkeypatch.setattr(torch, "compile", fake_compile)
    for mode in ("infer", "train"):
        out, meta = C.measure("lenet5", 4, mode, "fp32", ["eager", "compile"], repeats=1, iters=1, warmup=1)
        assert out["compile"]["status"] == "ok" and out["compile"]["compile"] == C.compile_setting(mode)
        assert meta["compile"] == C.compile_setting(mode)
    assert seen == {"infer": {True}, "train": {False}}
    assert inductor_config.freezing is False  # restored


def test_chained_sequential_is_eager_under_auto_on_cpu(monkeypatch):
    """ResNet's chained Conv->BN->ReLU (fastnets/nn/conv_chain.py) under auto on the CPU: no deferred
    BatchNorm (the prologue op is the reference there), torch's conv + F.batch_norm as eager; outputs, every
    gradient and the running statistics against torch.nn in float64."""
    from fastnets.nn import conv_chain

    def boom(*a, **k):
        raise AssertionError("auto on the CPU must not defer into bn_act_conv2d")

    monkeypatch.setattr(conv_chain, "bn_act_conv2d", boom)
    torch.manual_seed(3)
    ref = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                        nn.Conv2d(5, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.MaxPool2d(2)).double()
    ours = conv_chain.ChainedSequential(*copy.deepcopy(list(ref))).train()
    x = _x((2, 3, 6, 6))
    with fastnets.use_backend("auto"):
        y = ours(x)
    want = ref(x)
    assert_rel(y, want)
    y.square().sum().backward()
    want.square().sum().backward()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert_rel(a.grad, b.grad, msg=name)
    for a, b in zip(ours.buffers(), ref.buffers()):
        assert torch.equal(a, b)
