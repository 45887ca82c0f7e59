"""torch.library contracts (opcheck), torch.compile(fullgraph=True), AMP autocast and (GPU) CUDA-graph
capture of a training step, for every op family on every backend that runs here. Results are compared with
torch's own float64 computation (conftest.assert_rel), never with the backend itself."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnets
from fastnets.nn import BatchNorm2d, BatchNormReLU2d, ConvBNReLU2d, SqueezeExcite
from fastnets.ops.conv import conv2d, conv2d_batch_norm

from conftest import (GPU, assert_grads, assert_rel, backend_params, backends_here, biting_grad, biting_input,
                      bn_truth, device_for, far_running_stats, randomize, se_truth)

BN_BACKENDS = backend_params("batch_norm")
CONV_BACKENDS = backend_params("conv")
CONV_BN_BACKENDS = backend_params("conv", dedupe=False)  # conv's cuda = cuDNN + the CUDA C++ BatchNorm parts
SE_BACKENDS = backend_params("squeeze_excite")
ops = torch.ops.fastnets


def test_ci_runs_the_triton_tests():
    """In CI (CI=true) the Triton kernels must run (interpreter on CPU): a missing Triton would otherwise
    turn every Triton test into a skip and CI would stay green."""
    if os.environ.get("CI", "").lower() != "true":
        pytest.skip("only checked in CI (CI=true)")
    for family in ("batch_norm", "conv", "squeeze_excite"):
        assert "triton" in backends_here(family), (
            f"CI must run the Triton {family} tests: {fastnets.backends.unavailable_reason('triton', device_for('triton'))}")


# ------------------------------------------------------------------------------------------------- opcheck


def _recorded_calls(fn):
    """Every torch.ops.fastnets call that fn() makes (forward and backward), with its arguments: opcheck then
    runs on exactly what the public API passes (and follows the ops' schemas as they change)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "fastnets":
                calls.append((func, torch.utils._pytree.tree_map(
                    lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, (args, kwargs or {}))))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    assert calls, "no fastnets op was called"
    return calls


def _opcheck_all(fn):
    seen = set()
    for func, (args, kwargs) in _recorded_calls(fn):
        if func in seen:
            continue
        seen.add(func)
        if "backward" not in func.name():  # ops with autograd: let opcheck check its registration
            args = torch.utils._pytree.tree_map(
                lambda t: t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, args)
        torch.library.opcheck(func, args, kwargs)
    return seen


@pytest.mark.parametrize("backend", BN_BACKENDS)
def test_opcheck_batch_norm(backend):
    from fastnets.ops.batch_norm import batch_norm

    device = device_for(backend)
    x = torch.randn(3, 5, 4, 3, device=device) + 1
    w, b = torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)
    for xx, res, training in ((x, torch.randn_like(x), True), (x.to(memory_format=torch.channels_last), None, False)):
        leaves = [t.clone().requires_grad_() for t in (xx, w, b)] + ([res.clone().requires_grad_()] if res is not None else [])

        def run():
            rm, rv = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
            y = batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training, 0.1, 1e-5,
                           residual=leaves[3] if res is not None else None, relu=True, backend=backend)
            y.backward(torch.randn_like(y))

        names = {f.name() for f in _opcheck_all(run)}
        assert any("backward" in n for n in names), names


@pytest.mark.parametrize("backend", CONV_BN_BACKENDS)
def test_opcheck_conv(backend):
    device = device_for(backend)
    f = dict(dtype=torch.float32, device=device)
    x = torch.randn(2, 3, 6, 5, **f)
    w = torch.randn(4, 3, 3, 3, **f)
    b = torch.randn(4, **f)
    sc, sh = torch.rand(4, **f) + 0.5, torch.randn(4, **f)
    r = torch.randn(2, 4, 3, 3, **f)
    gamma, beta = torch.rand(4, **f) + 0.5, torch.randn(4, **f)

    def run():
        for xx in (x, x.to(memory_format=torch.channels_last)):
            leaves = [t.clone().requires_grad_() for t in (xx, w, b, sc, sh, r, gamma, beta)]
            y = conv2d(*leaves[:3], 2, 1, 1, scale=leaves[3], shift=leaves[4], residual=leaves[5], relu=True,
                       backend=backend)
            y2 = conv2d_batch_norm(leaves[0], leaves[1], None, torch.zeros(4, **f), torch.ones(4, **f), leaves[6],
                                   leaves[7], training=True, stride=2, padding=1, residual=leaves[5], backend=backend)
            (y.square().sum() + (y2 * y).sum()).backward()

    names = {f.name() for f in _opcheck_all(run)}
    assert {"fastnets::conv2d", "fastnets::conv2d_stats", "fastnets::bn_apply_train"} <= names, names


@pytest.mark.parametrize("backend", SE_BACKENDS)
def test_opcheck_squeeze_excite(backend):
    from fastnets.ops import se_excite, se_scale, se_squeeze, squeeze_excite

    device = device_for(backend)
    x = torch.randn(2, 6, 3, 4, device=device).to(memory_format=torch.channels_last)
    res = torch.randn(2, 6, 3, 4, device=device).to(memory_format=torch.channels_last)
    ws = [torch.randn(2, 6, 1, 1, device=device) / 3, torch.randn(2, device=device),
          torch.randn(6, 2, 1, 1, device=device), torch.randn(6, device=device)]

    def run():
        leaves = [t.clone().requires_grad_() for t in [x, res] + ws]
        y = squeeze_excite(leaves[0], *leaves[2:], residual=leaves[1], relu=True, backend=backend)
        p = se_squeeze(leaves[0], backend=backend)
        h, g = se_excite(p, *leaves[2:], backend=backend)
        y2 = se_scale(leaves[0], g, residual=leaves[1], relu=True, backend=backend)
        (y.square().sum() + (y2 * y).sum() + h.sum()).backward()

    names = {f.name() for f in _opcheck_all(run)}
    assert len(names) >= 5, names


# ------------------------------------------------------------------------------------- torch.compile


def _compiled(fn):
    torch._dynamo.reset()
    # aot_eager traces exactly what inductor would (fullgraph: no graph break allowed) without compiling C++
    # on a 2-core CPU; on a GPU inductor itself runs.
    return torch.compile(fn, fullgraph=True, backend="inductor" if GPU else "aot_eager")


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_batch_norm(backend, training):
    device = device_for(backend)
    ours = randomize(BatchNormReLU2d(6)).to(device).train(training)
    x = biting_input((3, 6, 4, 5), torch.float32, True, device).requires_grad_()
    res = torch.randn_like(x).requires_grad_()
    with torch.no_grad():
        rm, rv = far_running_stats(x)
        ours.running_mean.copy_(rm)
        ours.running_var.copy_(rv)
    with fastnets.use_backend(backend):
        y = _compiled(lambda x, r: ours(x, r))(x, res)
    want, _, want_rm, want_rv = bn_truth(x, rm, rv, ours.weight, ours.bias, training, 0.1, ours.eps, res, True)
    assert_rel(y, want)
    g = biting_grad(y, x)
    got = dict(zip(["x", "weight", "bias", "residual"], torch.autograd.grad(y, (x, ours.weight, ours.bias, res), g)))
    _, wg, _, _ = bn_truth(x, rm, rv, ours.weight, ours.bias, training, 0.1, ours.eps, res, True, grad=g)
    assert_grads(got, wg, refs={"x": g})
    assert_rel(ours.running_mean, want_rm.float())
    assert_rel(ours.running_var, want_rv.float())
    assert int(ours.num_batches_tracked) == int(training)


@pytest.mark.parametrize("backend", CONV_BN_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_conv_bn_relu(backend, training):
    device = device_for(backend)
    m = ConvBNReLU2d(3, 8, 3, stride=2, padding=1).train(training)
    randomize(m)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8)).train(training)
    ref.load_state_dict({k.replace("conv.", "0.").replace("bn.", "1."): v for k, v in m.state_dict().items()})
    ref = ref.double()
    m.to(device)
    x = (torch.randn(2, 3, 9, 9) + 0.5).to(device)
    r = torch.randn(2, 8, 5, 5).to(device)
    xa = x.clone().requires_grad_()
    with fastnets.use_backend(backend):
        y = _compiled(lambda x, r: m(x, r))(xa, r)
    xb = x.detach().double().cpu().requires_grad_()
    want = torch.relu(ref(xb) + r.double().cpu())
    assert_rel(y, want)
    g = biting_grad(y)
    got = torch.autograd.grad(y, [xa] + list(m.parameters()), g)
    exp = torch.autograd.grad(want, [xb] + list(ref.parameters()), g.double().cpu())
    for name, a, b in zip(["x"] + [n for n, _ in m.named_parameters()], got, exp):
        assert_rel(a, b, msg=f"grad {name}")
    assert_rel(m.bn.running_mean, ref[1].running_mean.float())
    assert_rel(m.bn.running_var, ref[1].running_var.float())


@pytest.mark.parametrize("backend", SE_BACKENDS)
def test_compile_squeeze_excite(backend):
    device = device_for(backend)
    m = SqueezeExcite(8, 2).to(device)
    x = biting_input((2, 8, 5, 5), torch.float32, True, device).requires_grad_()
    res = torch.randn_like(x).requires_grad_()
    with fastnets.use_backend(backend):
        y = _compiled(lambda x, r: m(x, residual=r, relu=True))(x, res)
    ws = [m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias]
    g = biting_grad(y, x)
    want, wg = se_truth(x, *ws, residual=res, relu=True, grad=g)
    assert_rel(y, want)
    got = dict(zip(["x", "w1", "b1", "w2", "b2", "residual"], torch.autograd.grad(y, [x] + ws + [res], g)))
    assert_grads(got, wg)


# ------------------------------------------------------------------------------------------------- autocast


def _autocast_device():
    return "cuda" if GPU else "cpu"


@pytest.mark.parametrize("backend", CONV_BN_BACKENDS)
def test_autocast_conv_then_batch_norm(backend):
    """fp32 inputs and parameters under torch.autocast(bf16): the conv runs in bf16 as F.conv2d would and
    the BatchNorm takes the bf16 activation with fp32 parameters and statistics, as torch's does."""
    device = device_for(backend)
    x = torch.randn(2, 3, 6, 6, device=device) + 0.5
    conv = nn.Conv2d(3, 8, 3, padding=1).to(device)
    bn = randomize(BatchNorm2d(8)).to(device)
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    with torch.autocast(_autocast_device(), dtype=torch.bfloat16), fastnets.use_backend(backend):
        z = conv2d(x, conv.weight, conv.bias, 1, 1)
        y = bn(z)
    assert z.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    # the conv in bf16 on bf16-rounded operands (accumulated in fp32), then BN in float64 on that z
    want_z = F.conv2d(x.bfloat16().double(), conv.weight.bfloat16().double(), conv.bias.bfloat16().double(), 1, 1)
    assert_rel(z, want_z)
    want_y, _, want_rm, want_rv = bn_truth(z, rm0, rv0, bn.weight, bn.bias, True, 0.1, bn.eps)
    assert_rel(y, want_y)
    assert_rel(bn.running_mean, want_rm.float())
    assert_rel(bn.running_var, want_rv.float())


@pytest.mark.parametrize("backend", CONV_BN_BACKENDS)
def test_autocast_fused_conv_bn(backend):
    device = device_for(backend)
    x = torch.randn(2, 3, 6, 6, device=device)
    conv = nn.Conv2d(3, 4, 3, padding=1).to(device)
    bn = randomize(nn.BatchNorm2d(4)).to(device).eval()
    with torch.autocast(_autocast_device(), dtype=torch.bfloat16):
        block = conv2d_batch_norm(x, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                  training=False, padding=1, backend=backend)
    assert block.dtype == torch.bfloat16
    z = F.conv2d(x.bfloat16().double(), conv.weight.bfloat16().double(), conv.bias.bfloat16().double(), 1, 1)
    want, _, _, _ = bn_truth(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps, relu=True)
    assert_rel(block, want)


@pytest.mark.parametrize("backend", SE_BACKENDS)
def test_autocast_conv_then_squeeze_excite(backend):
    """Under autocast the conv output is bf16 and the SE weights stay fp32 (the autocast-style contract);
    the weight gradients land in fp32."""
    device = device_for(backend)
    x = torch.randn(2, 8, 5, 5, device=device)
    conv = nn.Conv2d(8, 8, 1).to(device)
    se = SqueezeExcite(8, 2).to(device)
    with torch.autocast(_autocast_device(), dtype=torch.bfloat16), fastnets.use_backend(backend):
        z = conv(x)
        y = se(z, relu=True)
    assert z.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    ws = [se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias]
    g = biting_grad(y)
    grads = torch.autograd.grad(y, [z] + ws, g)
    assert all(t.dtype == torch.float32 for t in grads[1:]) and grads[0].dtype == torch.bfloat16
    want, wg = se_truth(z, *ws, relu=True, grad=g)
    assert_rel(y, want)
    # under autocast the excite's small matmuls run in bf16, as eager's autocast would run the FC convs
    bf = torch.bfloat16
    assert_grads(dict(zip(["x", "w1", "b1", "w2", "b2"], grads)), wg, dtypes=dict(w1=bf, b1=bf, w2=bf, b2=bf))


# ------------------------------------------------------------------------------------ CUDA graphs (GPU)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (CUDA-graph capture)")
@pytest.mark.parametrize("backend", [p for p in CONV_BN_BACKENDS if p.values[0] != "reference"])
def test_cuda_graph_training_step(backend):
    """A whole training step (fused Conv-BN-ReLU, BN+add+ReLU, SE, backward, SGD) captured once in a CUDA
    graph and replayed: each replay matches the same step run eagerly, running statistics included."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.cbr = ConvBNReLU2d(8, 16, 3, padding=1)
            self.bn = BatchNormReLU2d(16)
            self.se = SqueezeExcite(16, 4)

        def forward(self, x):
            h = self.cbr(x)
            return self.se(self.bn(h, residual=h), relu=True)

    eager, graphed = Net().cuda(), Net().cuda()
    graphed.load_state_dict(eager.state_dict())
    xs = [torch.randn(4, 8, 12, 12, device="cuda") + 0.5 for _ in range(3)]
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.1)
    static_x = xs[0].clone()

    def step(model, opt, x):
        opt.zero_grad(set_to_none=False)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    with fastnets.use_backend(backend):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm up (autotuning, allocations) outside the capture, on a copy
            warm = Net().cuda()
            warm.load_state_dict(graphed.state_dict())
            step(warm, torch.optim.SGD(warm.parameters(), lr=0.1), static_x)
        torch.cuda.current_stream().wait_stream(s)
        for p in graphed.parameters():
            p.grad = torch.zeros_like(p)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = step(graphed, opt_g, static_x)
        # capture ran nothing; replay each batch and compare with the eager step
        for x in xs:
            static_x.copy_(x)
            graph.replay()
            loss = step(eager, opt_e, x)
            torch.cuda.synchronize()
            assert_rel(static_loss, loss.detach(), scale=10)
            for (n, a), (_, b) in zip(graphed.state_dict().items(), eager.state_dict().items()):
                if a.is_floating_point():
                    assert_rel(a, b, scale=10, msg=n)
                else:
                    assert torch.equal(a, b), n
