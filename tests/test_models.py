"""fastnets.models against torchvision (and timm for SE-ResNet-50): state_dict keys and shapes, outputs with
shared weights in train and eval mode, gradients, running statistics after a few SGD steps. float64 on the
CPU reference backend (tight tolerances); float32, Triton-under-interpreter, channels_last, autocast and
torch.compile on small models."""
import copy

import pytest
import torch
from torch import nn

import fastnets
import fastnets.models as M
# the benchmarks' eager U-Net: torch.nn only, unfused, written apart from fastnets.models.unet (same attribute names)
from fastnets.bench.model_specs import UNet as PlainUNet
from conftest import assert_close, randomize

torchvision = pytest.importorskip("torchvision")

try:  # timm is optional: SE-ResNet-50 is then checked against a written-down list of timm's keys
    import timm
except Exception:  # noqa: BLE001  (timm may fail to import on a torch it does not support)
    timm = None


def _quiet(fn, *a, **k):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def reference_model(name, **kw):
    """torchvision's (timm's for se_resnet50) model of that name, without weights."""
    if name == "se_resnet50":
        return timm.create_model("seresnet50", **kw)
    return _quiet(getattr(torchvision.models, name), weights=None, **kw)


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def fill(model, seed=1):
    """Deterministic weights, fast (torch's and torchvision's inits of the big Linear layers take seconds):
    He-scaled normal weights, small biases, then randomize()'s BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return randomize(model, seed)


def build(fn, dtype, **kw):
    """fn(**kw) built on the meta device (no initialisation cost), then materialized on the CPU."""
    with torch.device("meta"):
        model = _quiet(fn, **kw)
    return model.to_empty(device="cpu").to(dtype)


def logits(out):
    return out if isinstance(out, torch.Tensor) else torch.cat([o for o in out], 1)


def pair(name, dtype=torch.float64, **kw):
    """(ours, theirs) with the same weights, fastnets' loaded from the reference's state_dict."""
    theirs = fill(build(reference_model, dtype, name=name, **kw))
    for b in theirs.buffers():  # num_batches_tracked
        if not b.is_floating_point():
            b.zero_()
    ours = build(getattr(M, name), dtype, **kw)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


# name -> input side. Every architecture: state_dict, and an eval-mode forward in float32 with shared weights.
ARCHS = {
    "alexnet": 64, "vgg11": 32, "vgg11_bn": 32, "vgg16": 32, "vgg16_bn": 32, "googlenet": 32, "resnet18": 32,
    "resnet34": 32, "resnet50": 32, "resnet101": 32, "densenet121": 32, "se_resnet50": 32,
}
# Train mode, gradients and running statistics after SGD steps, in float64. The AlexNet/VGG classifiers are
# plain torch.nn.Linear layers of 100M parameters (minutes in float64 on a CPU), so for those the fused part,
# `features`, is what is trained and compared.
TRAIN = ["resnet18", "resnet34", "resnet50", "densenet121", "googlenet", "se_resnet50", "alexnet", "vgg11_bn"]
FEATURES_ONLY = {"alexnet", "vgg11_bn"}


# timm's seresnet50 state_dict, written down (used only when timm is not importable): per bottleneck,
# conv1/bn1 (width), conv2/bn2 (width, 3x3), conv3/bn3 (4*width), se.fc1/fc2 (4*width -> 4*width/16 -> ...)
def _timm_seresnet50_shapes(num_classes=1000):
    out = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, c):
        out.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                    f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    bn("bn1", 64)
    inplanes = 64
    for li, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for b in range(blocks):
            p, c = f"layer{li + 1}.{b}", planes * 4
            out[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            out[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            out[f"{p}.conv3.weight"] = (c, planes, 1, 1)
            bn(f"{p}.bn3", c)
            out[f"{p}.se.fc1.weight"] = (c // 16, c, 1, 1)
            out[f"{p}.se.fc1.bias"] = (c // 16,)
            out[f"{p}.se.fc2.weight"] = (c, c // 16, 1, 1)
            out[f"{p}.se.fc2.bias"] = (c,)
            if b == 0:
                out[f"{p}.downsample.0.weight"] = (c, inplanes, 1, 1)
                bn(f"{p}.downsample.1", c)
            inplanes = c
    out["fc.weight"] = (num_classes, 2048)
    out["fc.bias"] = (num_classes,)
    return out


@pytest.fixture(autouse=True)
def _reference_backend():
    with fastnets.use_backend("reference"):
        yield


def test_lenet5_parameter_count_and_shape():
    model = M.lenet5()
    assert sum(p.numel() for p in model.parameters()) == 61706
    assert [tuple(p.shape) for p in model.parameters()] == [
        (6, 1, 5, 5), (6,), (16, 6, 5, 5), (16,), (120, 400), (120,), (84, 120), (84,), (10, 84), (10,)]
    assert isinstance(model.conv1, fastnets.nn.conv.Conv2d)
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 10)
    with pytest.raises(ValueError, match="32x32"):
        model(torch.randn(3, 1, 28, 28))


def test_lenet5_matches_plain_torch():
    """The same network written with torch.nn (the notes' code) gives the same outputs and gradients."""
    ours = M.lenet5().double()
    ref = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    ref = ref.double()
    for (k, p), q in zip(ours.named_parameters(), ref.parameters()):
        q.data.copy_(p.data)
    x = torch.randn(4, 1, 32, 32, dtype=torch.float64)
    y, r = ours(x), ref(x)
    assert_close(y, r)
    y.square().sum().backward()
    r.square().sum().backward()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert_close(p.grad, q.grad)


@pytest.mark.parametrize("name", list(ARCHS))
def test_state_dict_matches_reference(name):
    with torch.device("meta"):
        ours = getattr(M, name)()
        if name == "se_resnet50" and timm is None:
            expected = _timm_seresnet50_shapes()
        else:
            expected = shapes(reference_model(name))
    assert list(shapes(ours)) == list(expected)  # same keys, same order
    assert shapes(ours) == expected


def test_load_state_dict_strict():
    """The issue's example: torchvision's state_dict loads into fastnets' model (strict)."""
    ours = M.resnet50()
    result = ours.load_state_dict(torchvision.models.resnet50().state_dict())
    assert not result.missing_keys and not result.unexpected_keys


def _train_steps(model, x, target, steps, lr=0.01):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    outs = []
    for _ in range(steps):
        torch.manual_seed(123)  # dropout masks: the same random stream for both models
        out = model(x)
        outs.append(logits(out).detach())
        loss = nn.functional.cross_entropy(out if isinstance(out, torch.Tensor) else out[0], target)
        if not isinstance(out, torch.Tensor):
            loss = loss + 0.3 * sum(nn.functional.cross_entropy(o, target) for o in out[1:])
        opt.zero_grad()
        loss.backward()
        if not outs[1:]:
            grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return outs, grads


@pytest.mark.parametrize("name", TRAIN)
def test_train_and_eval_match_reference(name):
    """Outputs with shared weights (eval, then two SGD steps in train mode with equal dropout masks), the
    gradients of the first step, and parameters and running statistics after the steps."""
    if name == "se_resnet50" and timm is None:
        pytest.skip("timm not importable: SE-ResNet-50's state_dict is checked against a written list only")
    side = ARCHS[name]
    ours, theirs = pair(name, num_classes=10)
    # batch 4: with 2 samples a BatchNorm over 1x1 maps normalizes pairs to +-1 and its gradients are
    # differences of nearly equal numbers, which amplifies rounding far past any useful tolerance
    x = torch.randn(4, 3, side, side, dtype=torch.float64)
    target = torch.tensor([1, 7, 3, 3])
    if name in FEATURES_ONLY:
        ours, theirs = ours.features, theirs.features
        # a 10-class linear head on the flattened features, shared (plain torch)
        with torch.no_grad():
            width = theirs.eval()(x).flatten(1).shape[1]
        head = nn.Linear(width, 10).double()
        ours, theirs = nn.Sequential(ours, nn.Flatten(), head), nn.Sequential(theirs, nn.Flatten(), copy.deepcopy(head))

    ours.eval(), theirs.eval()
    assert_close(ours(x), theirs(x))

    ours.train(), theirs.train()
    outs_a, grads_a = _train_steps(ours, x, target, 2)
    outs_b, grads_b = _train_steps(theirs, x, target, 2)
    for a, b in zip(outs_a, outs_b):
        assert_close(a, b, scale=100)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for k in grads_a:
        assert_close(grads_a[k], grads_b[k], scale=100, msg=lambda m, k=k: f"gradient of {k}: {m}")
    sd_a, sd_b = ours.state_dict(), theirs.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_b:
        if sd_b[k].is_floating_point():
            assert_close(sd_a[k], sd_b[k], scale=1e3, msg=lambda m, k=k: f"{k} after two SGD steps: {m}")
        else:
            assert torch.equal(sd_a[k], sd_b[k]), k
    if name != "alexnet":
        assert any(k.endswith("running_var") for k in sd_b)


@pytest.mark.parametrize("name", list(ARCHS))
def test_eval_float32_matches_reference(name):
    side = ARCHS[name]
    ours, theirs = pair(name, dtype=torch.float32, num_classes=10)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        assert_close(ours(x), theirs(x), scale=10)


def test_googlenet_without_aux_logits():
    ours, theirs = pair("googlenet", num_classes=10, aux_logits=False)
    assert not any(k.startswith("aux") for k in ours.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ours.train(), theirs.train()
    torch.manual_seed(5)
    a = ours(x)
    torch.manual_seed(5)
    b = theirs(x)
    assert isinstance(a, torch.Tensor)
    assert_close(a, b, scale=1e-2)


def test_googlenet_train_outputs_are_named_like_torchvision():
    model = M.googlenet(num_classes=10).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out._fields == ("logits", "aux_logits2", "aux_logits1")
    assert all(o.shape == (2, 10) for o in out)


def test_resnet_cifar_stem():
    model = M.resnet18(num_classes=10, cifar_stem=True)
    assert model.conv1.weight.shape == (64, 3, 3, 3) and isinstance(model.maxpool, nn.Identity)
    ref = _quiet(torchvision.models.resnet18, weights=None, num_classes=10)
    ref.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    ref.maxpool = nn.Identity()
    randomize(ref)
    model.load_state_dict(ref.state_dict())
    model.double(), ref.double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_close(model(x), ref(x), scale=1e-2)
    model.eval(), ref.eval()
    assert_close(model(x), ref(x), scale=1)
    assert model.layer4(model.layer3(model.layer2(model.layer1(torch.randn(1, 64, 32, 32, dtype=torch.float64))))).shape[-1] == 4


@pytest.mark.parametrize("size", [(32, 32), (20, 27)])
def test_unet_matches_plain_torch(size):
    ours = M.unet(num_classes=3, in_channels=2, base_channels=8, depth=3).double()
    ref = randomize(PlainUNet(3, 2, 8, 3)).double()
    assert shapes(ours) == shapes(ref)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 2, *size, dtype=torch.float64)
    target = torch.randn(2, 3, *size, dtype=torch.float64)
    y, r = ours(x), ref(x)
    assert y.shape == (2, 3, *size)
    assert_close(y, r, scale=1)
    nn.functional.mse_loss(y, target).backward()
    nn.functional.mse_loss(r, target).backward()
    for (k, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, scale=1e-2, msg=lambda m, k=k: f"{k}: {m}")
    for k, v in ref.state_dict().items():
        assert_close(ours.state_dict()[k].double(), v.double(), msg=lambda m, k=k: f"{k}: {m}")
    ours.eval(), ref.eval()
    assert_close(ours(x), ref(x), scale=1)


def test_models_use_fastnets_modules():
    """The zoo is built from fastnets modules (so every fused kernel applies)."""
    from fastnets.nn.conv import Conv2d

    for name in ["alexnet", "vgg11_bn", "resnet18", "densenet121", "se_resnet50", "googlenet", "unet"]:
        with torch.device("meta"):
            model = getattr(M, name)()
        for mod_name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and not mod_name.endswith(("se.fc1", "se.fc2")):
                assert isinstance(m, Conv2d), f"{name}.{mod_name} is a plain torch Conv2d"
            if isinstance(m, nn.BatchNorm2d):
                assert isinstance(m, fastnets.nn.BatchNorm2d), f"{name}.{mod_name}"
        if name == "se_resnet50":
            assert isinstance(model.layer1[0].se, fastnets.nn.SqueezeExcite)


def test_float32_channels_last_and_autocast():
    ours, theirs = pair("resnet18", dtype=torch.float32, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    ours.train(), theirs.train()
    cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    y_cl = cl(x.to(memory_format=torch.channels_last))
    expected = theirs(x)
    assert_close(ours(x), expected, scale=10)
    assert_close(y_cl, expected, scale=10)
    ours.eval(), theirs.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours(x), theirs(x)
    assert a.dtype == b.dtype == torch.bfloat16
    assert_close(a.float(), b.float(), dtype=torch.bfloat16, scale=4)


def test_triton_backend_under_interpreter():
    """One small model on the Triton backend (interpreted on CPU): a tiny U-Net, conv-BN-ReLU throughout."""
    if "triton" not in fastnets.available_backends("cuda" if torch.cuda.is_available() else "cpu"):
        pytest.skip("Triton backend not available here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = randomize(PlainUNet(2, 1, 4, 1)).to(device)
    ours = M.unet(num_classes=2, in_channels=1, base_channels=4, depth=1).to(device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 1, 8, 8, device=device)
    with fastnets.use_backend("triton"):
        y = ours(x)
        y.sum().backward()
    r = ref(x)
    r.sum().backward()
    assert_close(y, r, scale=10)
    for (k, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, scale=10, msg=lambda m, k=k: f"{k}: {m}")


def test_torch_compile_fullgraph():
    model = M.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(x), model(x), scale=10)
