"""fastnets.convert on torchvision's (and timm's) CNNs and on hand-written models: state_dict unchanged,
outputs, gradients and running statistics equal to the original's in train and eval mode (float64, CPU,
reference backend), the report's counts, and the cases that must not be fused."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnets
from conftest import assert_close, randomize
from fastnets.convert import ConversionReport

torchvision = pytest.importorskip("torchvision")
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import timm
except Exception:  # noqa: BLE001
    timm = None


@pytest.fixture(autouse=True)
def _reference_backend():
    with fastnets.use_backend("reference"):
        yield


def tv(name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return randomize(getattr(torchvision.models, name)(weights=None, **kw)).double()


def first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def loss_of(out, target):
    if isinstance(out, torch.Tensor):
        return F.cross_entropy(out, target) if out.dim() == 2 else out.square().mean()
    return sum(F.cross_entropy(o, target) for o in out)


def check_equivalent(original, converted, x, target, steps=2):
    """Eval outputs; then `steps` SGD steps in train mode: outputs, first-step gradients, and every
    state_dict entry (parameters, running statistics, num_batches_tracked) after the steps."""
    assert list(converted.state_dict()) == list(original.state_dict())
    for k, v in original.state_dict().items():
        assert torch.equal(converted.state_dict()[k], v), k
    original.eval(), converted.eval()
    with torch.no_grad():
        assert_close(first(converted(x)), first(original(x)))
    results = []
    for model in (original, converted):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        outs, grads = [], None
        for _ in range(steps):
            torch.manual_seed(3)  # equal dropout masks
            out = model(x)
            outs.append(first(out).detach())
            opt.zero_grad()
            loss_of(out, target).backward()
            if grads is None:
                grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
            opt.step()
        results.append((outs, grads, model.state_dict()))
    (outs_a, grads_a, sd_a), (outs_b, grads_b, sd_b) = results
    for a, b in zip(outs_b, outs_a):
        assert_close(a, b, scale=100)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        assert_close(grads_b[k], grads_a[k], scale=100, msg=lambda m, k=k: f"grad {k}: {m}")
    for k in sd_a:
        if sd_a[k].is_floating_point():
            assert_close(sd_b[k], sd_a[k], scale=1e3, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(sd_b[k], sd_a[k]), k


# name -> (input side, expected fused counts)
TORCHVISION = {
    "resnet18": (32, {"conv_bn_relu": 9, "conv_bn_add_relu": 8, "conv_bn": 3}),
    "resnet50": (32, {"conv_bn_relu": 33, "conv_bn_add_relu": 16, "conv_bn": 4}),
    "vgg11_bn": (32, {"conv_bn_relu": 8}),
    "alexnet": (64, {"conv_relu": 5}),
    "googlenet": (32, {"conv_bn_relu": 59}),
    "densenet121": (32, {"conv_bn_relu": 59, "bn_relu": 62}),
}


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_convert_torchvision(name):
    side, expected = TORCHVISION[name]
    original = tv(name, num_classes=10)
    if name in ("alexnet", "vgg11_bn"):
        # their 100M-parameter torch.nn.Linear classifiers take minutes in float64 on a CPU and hold nothing
        # to convert: a small head of the same kind
        width = original.classifier[1 if name == "alexnet" else 0].in_features
        original.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(width, 10), nn.ReLU(inplace=True),
                                            nn.Linear(10, 10)).double()
    before = copy.deepcopy(original.state_dict())
    converted, report = fastnets.convert(original, return_report=True)
    assert converted is not original
    # the original is untouched (inplace=False)
    assert all(type(m).__module__.startswith(("torch.", "torchvision.")) for m in original.modules())
    assert not hasattr(type(original), "_fastnets_converted")
    for k, v in original.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {k: len(v) for k, v in report.fused.items() if v} == expected
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in original.modules())
    n_conv = sum(isinstance(m, nn.Conv2d) for m in original.modules())
    assert len(report.swapped["BatchNorm2d"]) == n_bn and len(report.swapped["Conv2d"]) == n_conv
    assert all(type(m) is not nn.BatchNorm2d for m in converted.modules())
    assert report.changed and "fastnets.convert" in str(report)
    if name == "googlenet":  # its forward has `if self.training` branches: not traced as a whole
        assert report.untraced[0][0] == "" and "train and eval" in report.untraced[0][1]
    x = torch.randn(4, 3, side, side, dtype=torch.float64)
    target = torch.tensor([1, 2, 3, 3])
    check_equivalent(original, converted, x, target)


@pytest.mark.skipif(timm is None, reason="timm not importable")
def test_convert_timm_seresnet50():
    original = randomize(timm.create_model("seresnet50", num_classes=10)).double()
    converted, report = fastnets.convert(original, return_report=True)
    counts = {k: len(v) for k, v in report.fused.items() if v}
    assert counts == {"conv_bn_relu": 33, "conv_bn": 20, "se_add_relu": 16}
    assert report.fused["se_add_relu"][0] == "layer1.0.se"
    check_equivalent(original, converted, torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 2]))


# ---- hand-written models


class SE(nn.Module):
    """A user's squeeze-excite, written inline with torch functions."""

    def __init__(self, c, r):
        super().__init__()
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.se = SE(c, 2)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.se(self.bn2(self.conv2(out)))
        return torch.relu(out + x)


class Hand(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.block = Block(8)
        self.pre = nn.BatchNorm2d(8)          # BN -> ReLU (method call)
        self.lone = nn.BatchNorm2d(8)         # a lone BatchNorm
        self.shared = nn.Conv2d(8, 8, 1, bias=False)  # its output is used twice: conv not fused with bn
        self.bn_shared = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.block(self.stem(x))
        x = self.pre(x).relu()
        x = self.lone(x)
        y = self.shared(x)
        x = F.relu(self.bn_shared(y) + y)      # BN -> add -> ReLU, residual = the conv output
        return self.head(x.mean((2, 3)))


def test_convert_hand_written_model():
    original = randomize(Hand()).double()
    converted, report = fastnets.convert(original, return_report=True)
    counts = {k: len(v) for k, v in report.fused.items() if v}
    assert counts == {"conv_bn_relu": 2, "conv_bn": 1, "se_add_relu": 1, "bn_relu": 1, "bn_add_relu": 1}, report
    assert report.fused["se_add_relu"] == ["block.se"]
    assert report.fused["bn_add_relu"] == ["bn_shared"]
    assert any("shared" in what and "other users" in why for what, why in report.skipped)
    assert report.traced == [""]
    assert "lone" in report.swapped["BatchNorm2d"]
    text = str(report)
    assert "conv_bn_relu" in text and "se_add_relu" in text and "left as they were" in text
    check_equivalent(original, converted, torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3]))


def test_convert_keeps_hooked_modules_unfused():
    model = randomize(Hand()).double()
    calls = []
    model.block.bn1.register_forward_hook(lambda m, i, o: calls.append(1))
    converted, report = fastnets.convert(model, return_report=True)
    assert "block.conv1+bn1" not in report.fused["conv_bn_relu"]
    assert [(k, r) for k, n, r in report.unfused if n == "block.bn1"] == [
        ("batchnorm", "has hooks (they would not run if fused)")]
    converted.eval()(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert calls  # the hook still runs


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it; its torchvision blocks come from the registry,
    its Sequential is traced on its own."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.blocks = nn.Sequential(torchvision.models.resnet.BasicBlock(64, 64),
                                    torchvision.models.resnet.Bottleneck(64, 16))
        self.bn = nn.BatchNorm2d(64)

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:  # data-dependent
            x = self.blocks(x)
        return F.relu(self.bn(x))


def test_convert_untraceable_model_uses_registry():
    original = randomize(Untraceable()).double()
    converted, report = fastnets.convert(original, return_report=True)
    assert report.untraced and report.untraced[0][0] == ""
    # the Sequential `blocks` traces (BasicBlock and Bottleneck inlined) and so does `stem`
    counts = {k: len(v) for k, v in report.fused.items() if v}
    assert counts == {"conv_bn_relu": 4, "conv_bn_add_relu": 2}, report
    assert "bn" in report.swapped["BatchNorm2d"]
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64).abs()
    check_equivalent(original, converted, x, torch.tensor([0, 1, 2, 3]))


def test_registry_blocks_convert_when_fx_cannot_trace(monkeypatch):
    """Force the trace to fail: the registry's fused forwards then convert the known blocks."""
    import sys

    conv_mod = sys.modules["fastnets.convert"]
    real_trace = conv_mod._trace
    monkeypatch.setattr(conv_mod, "_trace", lambda module, extra_leaves=(): (None, "forced")
                        if type(module).__module__.startswith(("torchvision", "timm")) else real_trace(module, extra_leaves))
    original = randomize(Untraceable()).double()
    converted, report = fastnets.convert(original, return_report=True)
    assert sorted(c for _, c in report.registry) == ["torchvision BasicBlock", "torchvision Bottleneck"]
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64).abs()
    check_equivalent(original, converted, x, torch.tensor([0, 1, 2, 3]))

    dense = tv("densenet121", num_classes=10)
    converted, report = fastnets.convert(dense, return_report=True)
    kinds = {c for _, c in report.registry}
    assert kinds == {"torchvision _DenseLayer"} and len(report.registry) == 58
    check_equivalent(dense, converted, torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3]), steps=1)

    if timm is not None:
        se = randomize(timm.create_model("seresnet50", num_classes=10)).double()
        converted, report = fastnets.convert(se, return_report=True)
        assert {c for _, c in report.registry} == {"timm Bottleneck"} and len(report.registry) == 16
        check_equivalent(se, converted, torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3]),
                         steps=1)


def test_nothing_to_replace_returns_model_unchanged():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 2))
    out, report = fastnets.convert(mlp, return_report=True)
    assert out is mlp
    assert not report.changed
    assert "nothing to replace" in str(report)
    # fastnets' own models are already fused
    model = fastnets.models.resnet18(num_classes=10)
    assert fastnets.convert(model) is model


def test_inplace_keeps_parameter_objects():
    model = randomize(Hand()).double()
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = fastnets.convert(model, inplace=True)
    assert out is model
    assert [id(p) for p in out.parameters()] == [id(p) for p in params]
    out(torch.randn(2, 3, 8, 8, dtype=torch.float64)).sum().backward()
    opt.step()  # the optimizer still updates the converted model's parameters


def test_converted_channels_last_float32_and_compile():
    original = randomize(Hand())
    converted = fastnets.convert(original).eval()
    original.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = original(x)
    cl = converted.to(memory_format=torch.channels_last)
    assert_close(cl(x.to(memory_format=torch.channels_last)), expected, scale=10)
    compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), expected, scale=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = converted(x), original(x)
    assert_close(a.float(), b.float(), dtype=torch.bfloat16, scale=4)


def test_report_is_a_conversion_report():
    _, report = fastnets.convert(randomize(Hand()), return_report=True)
    assert isinstance(report, ConversionReport)
    assert report.counts()["conv_bn_relu"] == 2
    assert repr(report) == str(report)


def test_convert_keeps_each_module_mode_and_converts_inside_hooked_blocks():
    """A BatchNorm frozen in eval mode inside a training model stays so; a block with a hook is a leaf of
    the model's trace (its hook must run) but is converted inside."""
    original = randomize(Hand()).double().train()
    original.stem[1].eval()  # frozen BN
    seen = []
    original.block.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    converted, report = fastnets.convert(original, return_report=True)
    assert converted.training and not converted.stem[1].training
    assert "block" in report.traced and "block.conv1+bn1" in report.fused["conv_bn_relu"]
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    torch.manual_seed(0)
    a = converted(x)
    torch.manual_seed(0)
    b = original(x)
    assert_close(a, b)
    assert len(seen) == 2
    sd_a, sd_b = converted.state_dict(), original.state_dict()
    for k in sd_b:
        assert_close(sd_a[k].double(), sd_b[k].double(), msg=lambda m, k=k: f"{k}: {m}")


# ---- no side effects; bad input


@pytest.mark.skipif(timm is None, reason="timm not importable")
@pytest.mark.parametrize("inplace", [False, True])
def test_convert_changes_nothing_in_the_model(inplace):
    """timm's BatchNormAct2d counts num_batches_tracked in its forward's Python: tracing the model itself
    used to advance it. Tracing now runs on a meta copy, under a restored RNG state."""
    model = randomize(timm.create_model("resnext26ts", num_classes=10)).double()
    model.stem.conv1.bn.eval()  # a frozen BatchNorm inside a training model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    converted, report = fastnets.convert(model, inplace=inplace, return_report=True)
    assert (converted is model) == inplace
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert report.shares()["batchnorm"] == (31, 31)


def test_convert_rejects_torchscript():
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    with pytest.raises(TypeError, match="TorchScript"):
        fastnets.convert(scripted)
    # a scripted submodule of an eager model is left as it is, and said so
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), scripted)
    converted, report = fastnets.convert(model, return_report=True)
    assert isinstance(converted[3], torch.jit.ScriptModule)
    assert any("TorchScript" in why for _, why in report.skipped)
    assert report.fused["conv_bn_relu"] == ["0+1"]


def test_convert_is_idempotent():
    model = randomize(Hand()).double()
    once = fastnets.convert(model)
    twice, report = fastnets.convert(once, return_report=True)
    assert twice is once and not report.changed
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(twice.eval()(x), once.eval()(x))


def test_convert_meta_model():
    """A model on the meta device (built before its weights are loaded) converts to a meta model with the
    same state_dict keys; materialised and loaded it equals the converted real model."""
    real = randomize(tv("resnet18", num_classes=10)).eval()
    with torch.device("meta"):
        meta = torchvision.models.resnet18(weights=None, num_classes=10).double()
    converted, report = fastnets.convert(meta, return_report=True)
    assert report.fused["conv_bn_add_relu"] and all(p.is_meta for p in converted.parameters())
    assert list(converted.state_dict()) == list(real.state_dict())
    converted.to_empty(device="cpu").load_state_dict(real.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_close(converted.eval()(x), real(x), scale=100)


# ---- patterns


@pytest.mark.skipif(timm is None, reason="timm not importable")
def test_timm_batch_norm_act_and_drop_path():
    """Conv -> BatchNormAct2d (ReLU) fuses with the module's act; a DropPath (train/eval-dependent) stays a
    leaf and the block around it fuses; a BatchNormAct2d with a DropBlock keeps its drop after the fused BN."""
    from timm.layers import BatchNormAct2d, DropBlock2d, DropPath

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn1 = BatchNormAct2d(4, act_layer=nn.ReLU)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn2 = BatchNormAct2d(4, act_layer=nn.ReLU, drop_layer=lambda: DropBlock2d(0.3, 3))
            self.conv3 = nn.Conv2d(4, 4, 1, bias=False)
            self.bn3 = BatchNormAct2d(4, apply_act=False)
            self.drop_path = DropPath(0.5)

        def forward(self, x):
            y = self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))
            return torch.relu(self.drop_path(y) + x)

    original = randomize(Block()).double()
    converted, report = fastnets.convert(original, return_report=True)
    assert report.traced == [""]
    counts = {k: len(v) for k, v in report.fused.items() if v}
    assert counts == {"conv_bn_relu": 1, "conv_bn": 2}, report
    assert report.layers["activation"]["bn2.act"].startswith("after the BatchNormAct2d's drop")
    check_equivalent(original, converted, torch.randn(4, 4, 8, 8, dtype=torch.float64) + 0.3,
                     torch.tensor([0, 1, 2, 3]))


def test_conv_relu_without_batch_norm():
    """Conv(+bias) -> ReLU with no BatchNorm (AlexNet, VGG, SqueezeNet) runs on the conv epilogue; a grouped
    conv -> ReLU is left, with its reason."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 36, 4)).double()
    converted, report = fastnets.convert(model, return_report=True)
    assert report.fused["conv_relu"] == ["0"]
    assert "grouped" in report.layers["activation"]["3"]
    check_equivalent(model, converted, torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 3]))


def test_torchvision_squeeze_excitation():
    """torchvision's SqueezeExcitation (ReLU inner activation, sigmoid gate) in a MobileNet-style block."""
    from torchvision.ops import Conv2dNormActivation, SqueezeExcitation

    model = nn.Sequential(Conv2dNormActivation(3, 16, 3), SqueezeExcitation(16, 4),
                          Conv2dNormActivation(16, 16, 1, activation_layer=None),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).double()
    randomize(model)
    converted, report = fastnets.convert(model, return_report=True)
    assert report.fused["conv_bn_relu"] == ["0.0+1"] and report.fused["se"] == ["1"]
    assert report.layers["se"] == {"1": None}
    check_equivalent(model, converted, torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3]))
