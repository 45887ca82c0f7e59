"""fastnets.convert on a zoo of real timm and torchvision CNNs (random weights, float64, small inputs, the
reference backend):
  - convert never changes the model: parameters, buffers (num_batches_tracked included), the torch RNG
    state, every module's training mode, class and hooks are the same before and after;
  - the converted model equals the original in eval and in train mode, with the same RNG state for dropout
    and drop-path: outputs, the input gradient, every parameter gradient and every buffer after the step;
  - a model whose layers fastnets cannot fuse still comes back numerically identical.
With FASTNETS_ZOO_OUT=<dir> each model's fused shares (report.shares()) are written there as JSON, the input
of tools/zoo_table.py (the table in docs/convert-and-zoo.md). torch.compile(fullgraph=True): a handful here, every model with
FASTNETS_ZOO_COMPILE=1 (slow)."""
import json
import os
import warnings

import pytest
import torch
from torch import nn

import fastnets
from conftest import assert_rel, randomize

torchvision = pytest.importorskip("torchvision")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    timm = pytest.importorskip("timm")


def _tv(name, **kw):
    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(torchvision.models, name)(weights=None, num_classes=10, **kw)
    return build


def _timm(name, **kw):
    def build():
        return timm.create_model(name, pretrained=False, num_classes=10, **kw)
    return build


def _small_head(build):
    """VGG / AlexNet: their 100M-parameter Linear classifiers hold nothing to convert; a small head of the
    same kind keeps the test fast."""
    def small():
        model = build()
        width = next(m for m in model.classifier if isinstance(m, nn.Linear)).in_features
        model.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(width, 16), nn.ReLU(inplace=True),
                                         nn.Dropout(0.5), nn.Linear(16, 10))
        return model
    return small


def _tv_resnet(block, layers, **kw):
    """A torchvision ResNet family member with fewer blocks (ResNeXt, Wide ResNet are width settings)."""
    def build():
        from torchvision.models.resnet import Bottleneck, ResNet
        return ResNet(Bottleneck if block == "bottleneck" else block, layers, num_classes=10, **kw)
    return build


# name -> (builder, input side). The smallest variant of each family that runs at a small size. In train
# mode a BatchNorm over 2 images at 1x1 spatial size is ill-conditioned (densenet121 and regnet at 32 px: the
# original itself moves by 1e-7 .. 3e-4 when its input moves by 1e-15), so those take 64 px (2x2 at the end).
ZOO = {
    "tv_resnext_1111": (_tv_resnet("bottleneck", [1, 1, 1, 1], groups=32, width_per_group=4), 32),
    "tv_wide_resnet_1111": (_tv_resnet("bottleneck", [1, 1, 1, 1], width_per_group=128), 32),
    "tv_vgg11_bn": (_small_head(_tv("vgg11_bn")), 32),
    "tv_alexnet": (_small_head(_tv("alexnet")), 64),
    "tv_squeezenet1_1": (_tv("squeezenet1_1"), 48),
    "tv_googlenet": (_tv("googlenet", aux_logits=False, init_weights=True), 32),
    "tv_densenet121": (_tv("densenet121"), 64),
    "tv_mobilenet_v2": (_tv("mobilenet_v2", width_mult=0.5), 32),
    "tv_regnet_x_400mf": (_tv("regnet_x_400mf"), 64),
    "res2net50_14w_8s": (_timm("res2net50_14w_8s"), 64),
    "densenet121": (_timm("densenet121"), 64),
    "efficientnet_b0": (_timm("efficientnet_b0", drop_path_rate=0.2), 32),
    "inception_v3": (_timm("inception_v3"), 75),
    "convnext_atto": (_timm("convnext_atto", drop_path_rate=0.1), 32),
    # the rest: built by name with their defaults, at 32 px
    **{f"tv_{name}": (_tv(name), 32) for name in (
        "resnet18", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5", "mnasnet0_5",
    )},
    **{name: (_timm(name), 32) for name in (
        "resnet10t", "seresnet18", "ecaresnet26t", "skresnet18", "resnext26ts", "dla46_c", "cs3darknet_focus_s",
        "regnetx_002", "regnety_002", "tinynet_e", "mobilenetv2_050", "mobilenetv3_small_050", "lcnet_050",
        "ghostnet_050", "repvgg_a0", "ese_vovnet19b_slim_dw", "nf_resnet26",
    )},
}
# compiled with fullgraph=True in every run (the rest with FASTNETS_ZOO_COMPILE=1)
COMPILE_IN_CI = ("resnet10t", "tv_mobilenet_v3_small", "lcnet_050")


@pytest.fixture(autouse=True)
def _reference_backend():
    with fastnets.use_backend("reference"):
        yield


def snapshot(model):
    """Everything convert must leave as it was: state (values), each module's class, mode and hooks, RNG."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "params": [id(p) for p in model.parameters()],
        "modules": [(n, type(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks),
                     len(m._backward_hooks)) for n, m in model.named_modules()],
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
    }


def assert_same_snapshot(before, after):
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"convert changed {k}"
    assert after["params"] == before["params"]
    assert after["modules"] == before["modules"]
    assert torch.equal(after["rng"], before["rng"]), "convert used the torch RNG"
    if before["cuda_rng"] is not None:
        assert all(torch.equal(a, b) for a, b in zip(after["cuda_rng"], before["cuda_rng"]))


def step(model, x, weight, seed):
    """One forward + backward with a fixed RNG state: (output, input grad, parameter grads, buffers)."""
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    out = out if isinstance(out, torch.Tensor) else out[0]
    (out * weight).sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    return out.detach(), x.grad, grads, buffers


def assert_same_step(got, want, what, scale):
    """`scale` x float64's bound: deep nets grow the fused kernels' rounding differences through ~50 layers."""
    (out_a, gx_a, g_a, b_a), (out_b, gx_b, g_b, b_b) = got, want
    assert_rel(out_a, out_b, scale=scale, msg=f"{what} output")
    assert_rel(gx_a, gx_b, scale=scale, msg=f"{what} input grad")
    assert g_a.keys() == g_b.keys(), f"{what}: parameters with gradients differ"
    for k in g_b:
        # a bias followed by a train-mode BatchNorm has a true gradient of 0: judged against its weight's
        sibling = k[: -len("bias")] + "weight" if k.endswith("bias") else None
        assert_rel(g_a[k], g_b[k], scale=scale, ref=g_b.get(sibling), msg=f"{what} grad {k}")
    assert b_a.keys() == b_b.keys()
    for k in b_b:
        if b_b[k].is_floating_point():
            assert_rel(b_a[k], b_b[k], scale=scale, msg=f"{what} buffer {k}")
        else:
            assert torch.equal(b_a[k], b_b[k]), f"{what} buffer {k}"


def _write_shares(name, report):
    out = os.environ.get("FASTNETS_ZOO_OUT")
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"model": name, "shares": report.shares(),
                   "unfused": [list(u) for u in report.unfused]}, f, indent=1)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo(name):
    build, side = ZOO[name]
    torch.manual_seed(0)
    original = randomize(build()).double()
    original.register_forward_hook(lambda m, i, o: None)  # a hook on the model itself must survive too
    before = snapshot(original)
    converted, report = fastnets.convert(original, return_report=True)
    assert_same_snapshot(before, snapshot(original))
    assert list(converted.state_dict()) == list(original.state_dict())
    _write_shares(name, report)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, side, side, dtype=torch.float64, generator=g) + 0.5
    with torch.no_grad():
        weight = torch.randn_like(converted.eval()(x))
    for mode in ("eval", "train"):  # train second: it updates the running statistics of both
        original.train(mode == "train")
        converted.train(mode == "train")
        assert_same_step(step(converted, x, weight, seed=7), step(original, x, weight, seed=7), f"{name} {mode}",
                         scale=1e4)

    if name in COMPILE_IN_CI or os.environ.get("FASTNETS_ZOO_COMPILE") == "1":
        torch._dynamo.reset()
        converted.eval()
        compiled = torch.compile(converted, fullgraph=True, backend="eager")
        with torch.no_grad():
            assert_rel(compiled(x), converted(x), scale=10, msg=f"{name} compiled")
