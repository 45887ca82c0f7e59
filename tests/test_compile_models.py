"""fastnets under torch.compile with inductor (issue 31): a fastnets.convert-ed model or a fastnets.models model,
compiled with and without inductor's `freezing` (its CPU inference setting), in the default and max-autotune
modes, on the native backend (torch's CPU kernels: what `auto` runs on a CPU), the reference backend and the
Triton backend (interpreter), must
  - run (no BackendCompilerFailed: freezing used to crash in inductor, `sym_max ... got NoneType`),
  - trace with zero graph breaks (torch._dynamo's counters["graph_break"]),
  - compile no frame again after warm-up across batch sizes (counters["frames"]: the first two sizes are the
    warm-up, a static compile and torch's automatic-dynamic recompile; later sizes reuse the dynamic graph),
  - match eager: the ORIGINAL torch model (torchvision / timm / plain PyTorch, same weights) in float64.
On the CPU in CI: a small subset (about 3 minutes on 2 cores: inductor generates and compiles C++). The whole
zoo (tests/test_zoo.py's ZOO, every fastnets.models model) x {native with and without freezing, native
max-autotune, reference}: FASTNETS_ZOO_COMPILE=1 (hours on 2 cores). The Triton backend compiles: the custom ops
are opaque to inductor and run their kernels (here under TRITON_INTERPRET=1) inside the compiled graph."""
import copy
import os
import warnings

import pytest
import torch
import torch._inductor.config as inductor_config
from torch import nn
from torch._dynamo.utils import counters

import fastnets
from conftest import GPU, assert_rel, randomize

FULL = os.environ.get("FASTNETS_ZOO_COMPILE") == "1"
needs_cpu = pytest.mark.skipif(GPU, reason="the CPU (native backend) compile matrix; the GPU plan covers CUDA")


def compiled_runs(model, inputs, backend, freezing=False, mode=None, train=False, mark_dynamic=True):
    """Compile `model` with inductor and run it on each input in turn (under fastnets backend `backend`, with
    inductor's freezing on or off). Returns (outputs, graph breaks, frames compiled after warm-up). Warm-up:
    with mark_dynamic the first input, whose batch dimension is marked dynamic (one compile: CI time); without,
    the first two (a static compile, then torch's automatic-dynamic one, as a user's model sees them). In
    training each output's sum is backpropagated; the outputs are detached."""
    torch._dynamo.reset()
    counters.clear()
    outs, frames = [], None
    warmup = 1 if mark_dynamic else 2
    if mark_dynamic:
        torch._dynamo.mark_dynamic(inputs[0], 0)
    with fastnets.use_backend(backend), inductor_config.patch(freezing=freezing):
        compiled = torch.compile(model, mode=mode)
        for i, x in enumerate(inputs):
            if i == warmup:
                frames = counters["frames"]["total"]
            if train:
                y = _first(compiled(x))
                y.sum().backward()
            else:
                with torch.no_grad():
                    y = _first(compiled(x))
            outs.append(y.detach())
    breaks = {k.splitlines()[0][:200]: v for k, v in counters["graph_break"].items()}
    recompiles = None if frames is None else counters["frames"]["total"] - frames
    torch._dynamo.reset()
    return outs, breaks, recompiles


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _eager64(original, x):
    with torch.no_grad():
        return _first(original(x.double()))


def check_compiled(original, candidate, make_x, sizes, backend, freezing=False, mode=None, scale=10.0,
                   mark_dynamic=True):
    """The compile contract of `candidate` (a fastnets model computing what `original` computes, eval mode)."""
    inputs = [make_x(n) for n in sizes]
    outs, breaks, recompiles = compiled_runs(candidate, inputs, backend, freezing, mode, mark_dynamic=mark_dynamic)
    assert not breaks, f"graph breaks under torch.compile ({backend}, freezing={freezing}, mode={mode}): {breaks}"
    assert recompiles == 0, f"{recompiles} frame(s) compiled again after warm-up (batch sizes {sizes})"
    ref = copy.deepcopy(original).double().eval()
    for x, y in zip(inputs, outs):
        assert y.dtype == x.dtype and y.shape[0] == x.shape[0]
        assert_rel(y, _eager64(ref, x), scale=scale, msg=f"batch {x.shape[0]}")


def _x(shape, seed=0):
    g = torch.Generator().manual_seed(seed + shape[0])
    return torch.randn(*shape, generator=g) + 0.5


# ------------------------------------------------------------------------------------------- models


def _lenet_pair():
    from fastnets.bench.model_specs import LeNet5
    from fastnets.models import lenet5

    torch.manual_seed(0)
    original = LeNet5()
    ours = lenet5()
    ours.load_state_dict(original.state_dict())
    return original.eval(), ours.eval()


class TinyResNet(nn.Module):
    """Conv-BN-ReLU, a residual Conv-BN-add-ReLU, a depthwise Conv-BN-SiLU and a head: every fused native
    path (the fold, the binary add post-op, the grouped fold) in a model that compiles in seconds."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.b3 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)) + y)
        y = nn.functional.silu(self.b3(self.dw(y)))
        return self.fc(y.mean((2, 3)))


def _tiny_pair():
    torch.manual_seed(0)
    original = randomize(TinyResNet()).eval()
    return original, fastnets.convert(original)


def _zoo_pair(name):
    from test_zoo import ZOO

    build, side = ZOO[name]
    torch.manual_seed(0)
    original = randomize(build()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return original, fastnets.convert(original), side


def _models_pair(name):
    """A fastnets.models model with the weights of the bench's eager counterpart (torchvision / plain PyTorch)."""
    from fastnets.bench import model_specs as M
    from fastnets.models import unet

    torch.manual_seed(0)
    if name == "unet":  # a small U-Net: the same graph as the bench's 64-wide, 4-deep one
        original = M.UNet(num_classes=2, in_channels=1, base_channels=8, depth=2)
        ours = unet(num_classes=2, in_channels=1, base_channels=8, depth=2)
    else:
        original = M.build_eager(name)
        ours = M.build_fastnets(name)
    randomize(original)
    M.copy_weights(original, ours)
    return original.eval(), ours.eval()


# ------------------------------------------------------------------------------------------- CI subset


@needs_cpu
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("which", ["tiny_resnet", "lenet5"])
def test_native_paths_trace_in_one_graph(which, train):
    """Dynamo alone (aot_eager: no code generation, seconds): every native path (the BatchNorm fold and the
    plain F.conv2d it emits under compile, the grouped fold, F.conv2d + F.batch_norm in training, the pooling
    fast path's fallback) traces as ONE graph (fullgraph=True raises on a graph break) and is not traced again
    for later batch sizes. The inductor tests below run the same models end to end."""
    original, ours = _tiny_pair() if which == "tiny_resnet" else _lenet_pair()
    shape = (3, 8, 8) if which == "tiny_resnet" else (1, 32, 32)
    ours.train(train)
    torch._dynamo.reset()
    counters.clear()
    with fastnets.use_backend("auto"):
        compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
        for i, n in enumerate((2, 3, 4, 5)):
            if i == 2:
                frames = counters["frames"]["total"]
            with torch.set_grad_enabled(train):
                y = compiled(_x((n,) + shape))
            if train:
                y.sum().backward()
    assert counters["frames"]["total"] == frames, "traced again after warm-up"
    assert not counters["graph_break"]
    torch._dynamo.reset()


@needs_cpu
def test_lenet5_native_freezing_automatic_dynamic():
    """fastnets.models.lenet5 as a user compiles it (no mark_dynamic): batch 2, then 3 (torch's automatic
    dynamic recompile), then 4 and 5 on the same graph; inductor's freezing on."""
    original, ours = _lenet_pair()
    check_compiled(original, ours, lambda n: _x((n, 1, 32, 32)), (2, 3, 4, 5), "auto", freezing=True,
                   mark_dynamic=False)


@needs_cpu
@pytest.mark.parametrize("freezing", [True, False], ids=["freezing", "no-freezing"])
def test_tiny_resnet_native(freezing):
    original, ours = _tiny_pair()
    check_compiled(original, ours, lambda n: _x((n, 3, 8, 8)), (2, 3, 5), "auto", freezing=freezing)


@needs_cpu
def test_converted_timm_resnet_native_freezing():
    """A converted timm model (resnet10t: the ResNet-D stem, BasicBlocks) with freezing, the issue's crash."""
    original, ours, side = _zoo_pair("resnet10t")
    check_compiled(original, ours, lambda n: _x((n, 3, side, side)), (2, 3, 4), "auto", freezing=True)


@needs_cpu
def test_max_autotune_native_freezing():
    original, ours = _tiny_pair()
    check_compiled(original, ours, lambda n: _x((n, 3, 8, 8)), (2, 3, 4), "auto", freezing=True, mode="max-autotune")


@needs_cpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_tiny_resnet_other_backends_freezing(backend):
    """The reference and Triton backends' custom ops inside an inductor graph (opaque to it), freezing on."""
    if fastnets.backends.unavailable_reason(backend, "cpu"):
        pytest.skip(fastnets.backends.unavailable_reason(backend, "cpu"))
    original, ours = _tiny_pair()
    check_compiled(original, ours, lambda n: _x((n, 3, 6, 6)), (2, 3, 4), backend, freezing=True)


@needs_cpu
def test_training_step_native_compiled():
    """A compiled training step (no freezing: it applies to inference) on the native backend: outputs,
    input and parameter gradients and running statistics against the original in float64, no graph break,
    no recompile after warm-up."""
    original, ours = _tiny_pair()
    original.train()
    ours.train()
    ref = copy.deepcopy(original).double()
    inputs = [_x((n, 3, 8, 8)) for n in (2, 3, 4)]
    before = copy.deepcopy(ours.state_dict())
    outs, breaks, recompiles = compiled_runs(ours, inputs, "auto", train=True)
    assert not breaks and recompiles == 0, (breaks, recompiles)
    # the same three steps in float64 on the original (gradients accumulate over the steps in both)
    ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in before.items()})
    for x, y in zip(inputs, outs):
        want = ref(x.double())
        want.sum().backward()
        assert_rel(y, want.detach(), msg=f"batch {x.shape[0]}")
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_rel(p.grad, q.grad, scale=10, msg=f"grad {name}")
    for (name, b), c in zip(ours.named_buffers(), ref.buffers()):
        if b.is_floating_point():
            assert_rel(b, c, msg=name)
        else:
            assert torch.equal(b, c), name


# --------------------------------------------------------------------------- whole zoo (opt-in)

CONFIGS = [("auto", True, None), ("auto", False, None), ("auto", True, "max-autotune"), ("reference", True, None)]
CONFIG_IDS = ["native-freezing", "native", "native-freezing-max-autotune", "reference-freezing"]


def _zoo_names():
    from test_zoo import ZOO

    return list(ZOO)


MODELS = ["lenet5", "resnet18_cifar", "resnet50", "vgg11_bn_cifar", "densenet121_cifar", "googlenet_cifar",
          "se_resnet50_cifar", "alexnet", "unet"]


@needs_cpu
@pytest.mark.skipif(not FULL, reason="the whole zoo under torch.compile: FASTNETS_ZOO_COMPILE=1 (hours on 2 cores)")
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("name", _zoo_names())
def test_zoo_compiled(name, config):
    backend, freezing, mode = config
    original, ours, side = _zoo_pair(name)
    check_compiled(original, ours, lambda n: _x((n, 3, side, side)), (2, 3, 4), backend, freezing, mode, scale=100)


@needs_cpu
@pytest.mark.skipif(not FULL, reason="every fastnets.models model under torch.compile: FASTNETS_ZOO_COMPILE=1")
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("name", MODELS)
def test_models_compiled(name, config):
    from fastnets.bench import model_specs as M

    backend, freezing, mode = config
    original, ours = _models_pair(name)
    if name == "unet":
        shape = (1, 32, 32)
    else:
        spec = M.spec(name)
        side = 64 if spec.image_size > 32 else 32  # ImageNet models at 64 px: the same graph, smaller
        shape = (spec.in_channels, 32 if name == "lenet5" else side, 32 if name == "lenet5" else side)
    check_compiled(original, ours, lambda n: _x((n,) + shape), (2, 3, 4), backend, freezing, mode, scale=100)
