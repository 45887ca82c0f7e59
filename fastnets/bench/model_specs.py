"""The models the benchmark knows: how to build the eager baseline (torchvision, or timm / plain PyTorch
where torchvision has none) and the fastnets model, their input shapes, and published ImageNet top-1.

"eager" is always a standard PyTorch model; "fastnets" is `fastnets.models.<name>` with the eager model's
weights loaded, so that both compute the same function.
"""
import copy
import inspect
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

TV_DOCS = "https://docs.pytorch.org/vision/stable/models/generated/torchvision.models.{}.html"
TIMM_RESULTS = "https://github.com/huggingface/pytorch-image-models/blob/main/results/results-imagenet.csv"


@dataclass(frozen=True)
class Published:
    """A literature value, not measured here: ImageNet-1k validation top-1 (%) of the named weights."""

    top1: float
    weights: str
    source: str
    note: str = ""


# Values of torchvision's IMAGENET1K_V1 weights are those in each weights enum's meta["_metrics"] (the
# numbers the linked documentation pages show); tests/test_bench.py checks them against the installed
# torchvision. SE-ResNet-50: timm's results table, row `seresnet50.a1_in1k,224` (80.012; the model card's
# 81.1 is at 288 px). It was trained with timm's A1 recipe (600 epochs, LAMB, strong augmentation), not
# torchvision's 2017 recipe, so its top-1 is not comparable with the ResNet-50 V1 number as an
# architecture-only effect.
PUBLISHED = {
    "alexnet": Published(56.522, "torchvision AlexNet_Weights.IMAGENET1K_V1", TV_DOCS.format("alexnet")),
    "vgg11": Published(69.020, "torchvision VGG11_Weights.IMAGENET1K_V1", TV_DOCS.format("vgg11")),
    "vgg16": Published(71.592, "torchvision VGG16_Weights.IMAGENET1K_V1", TV_DOCS.format("vgg16")),
    "vgg11_bn": Published(70.370, "torchvision VGG11_BN_Weights.IMAGENET1K_V1", TV_DOCS.format("vgg11_bn")),
    "vgg16_bn": Published(73.360, "torchvision VGG16_BN_Weights.IMAGENET1K_V1", TV_DOCS.format("vgg16_bn")),
    "googlenet": Published(69.778, "torchvision GoogLeNet_Weights.IMAGENET1K_V1", TV_DOCS.format("googlenet")),
    "resnet18": Published(69.758, "torchvision ResNet18_Weights.IMAGENET1K_V1", TV_DOCS.format("resnet18")),
    "resnet34": Published(73.314, "torchvision ResNet34_Weights.IMAGENET1K_V1", TV_DOCS.format("resnet34")),
    "resnet50": Published(76.130, "torchvision ResNet50_Weights.IMAGENET1K_V1", TV_DOCS.format("resnet50")),
    "resnet101": Published(77.374, "torchvision ResNet101_Weights.IMAGENET1K_V1", TV_DOCS.format("resnet101")),
    "densenet121": Published(74.434, "torchvision DenseNet121_Weights.IMAGENET1K_V1", TV_DOCS.format("densenet121")),
    "se_resnet50": Published(
        80.012, "timm seresnet50.a1_in1k (224 px)", TIMM_RESULTS,
        "timm A1 training recipe (Wightman et al. 2021), stronger than torchvision V1's; 81.114 at 288 px",
    ),
}


@dataclass(frozen=True)
class Spec:
    name: str  # the CLI name
    arch: str  # the fastnets.models function
    label: str
    image_size: int
    in_channels: int = 3
    num_classes: int = 1000
    cifar_stem: bool = False
    task: str = "classification"  # or "segmentation"
    published: Optional[Published] = None
    extra: dict = field(default_factory=dict)
    # where the model comes from: "fastnets.models" (eager: torchvision / plain PyTorch, fastnets: the
    # fastnets.models architecture) or "timm" (eager: timm.create_model(arch), fastnets: fastnets.convert of it)
    source: str = "fastnets.models"


def _imagenet(name, label):
    return Spec(name, name, label, 224, published=PUBLISHED.get(name))


SPECS = {
    s.name: s
    for s in [
        Spec("lenet5", "lenet5", "LeNet-5", 32, in_channels=1, num_classes=10),
        _imagenet("alexnet", "AlexNet"),
        _imagenet("vgg11", "VGG-11"),
        _imagenet("vgg16", "VGG-16"),
        _imagenet("vgg11_bn", "VGG-11-BN"),
        _imagenet("vgg16_bn", "VGG-16-BN"),
        _imagenet("googlenet", "GoogLeNet"),
        _imagenet("resnet18", "ResNet-18"),
        _imagenet("resnet34", "ResNet-34"),
        _imagenet("resnet50", "ResNet-50"),
        _imagenet("resnet101", "ResNet-101"),
        _imagenet("densenet121", "DenseNet-121"),
        _imagenet("se_resnet50", "SE-ResNet-50"),
        Spec("unet", "unet", "U-Net", 256, num_classes=2, task="segmentation"),
        # CIFAR-10 variants (32x32, 10 classes, 3x3 stride-1 stem without max-pool where the architecture has one)
        Spec("resnet18_cifar", "resnet18", "ResNet-18 (CIFAR)", 32, num_classes=10, cifar_stem=True),
        Spec("vgg11_bn_cifar", "vgg11_bn", "VGG-11-BN (CIFAR)", 32, num_classes=10),
        Spec("densenet121_cifar", "densenet121", "DenseNet-121 (CIFAR)", 32, num_classes=10, cifar_stem=True),
        Spec("se_resnet50_cifar", "se_resnet50", "SE-ResNet-50 (CIFAR)", 32, num_classes=10, cifar_stem=True),
        Spec("googlenet_cifar", "googlenet", "GoogLeNet (CIFAR)", 32, num_classes=10, cifar_stem=True),
        # a timm model as users run it, converted with fastnets.convert (the CPU profile's timm model;
        # depthwise convolutions, SiLU, squeeze-excite)
        Spec("efficientnet_b0_timm", "efficientnet_b0", "EfficientNet-B0 (timm)", 224, source="timm"),
    ]
}
# the default model list of the GPU profiles: the fastnets.models architectures at ImageNet size
IMAGENET_MODELS = [n for n, s in SPECS.items() if not n.endswith("_cifar") and s.source == "fastnets.models"]
CIFAR_MODELS = [n for n in SPECS if n.endswith("_cifar")]
TRAIN_MODELS = ["lenet5"] + CIFAR_MODELS


class UnknownModelError(ValueError):
    pass


def spec(name):
    if name not in SPECS:
        raise UnknownModelError(f"unknown model {name!r}; valid models: {', '.join(SPECS)}")
    return SPECS[name]


# ------------------------------------------------------------------------------------- eager baselines


class LeNet5(nn.Module):
    """Plain-PyTorch LeNet-5 with the layout of fastnets.models.lenet5 (same state_dict keys)."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.pool1 = nn.AvgPool2d(2, stride=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool2 = nn.AvgPool2d(2, stride=2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class SqueezeExcite(nn.Module):
    """timm's SEModule layout (fc1, fc2 1x1 convolutions with bias), reduction 16 rounded to a multiple of 8."""

    def __init__(self, channels, rd_channels):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


def _make_divisible(v, divisor=8):
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _plain_se_resnet50(num_classes):
    """torchvision's ResNet-50 with a squeeze-excite module after bn3 of every bottleneck, in timm's
    `seresnet50` layout (used when timm is not installed)."""
    from torchvision.models.resnet import Bottleneck, ResNet

    class SEBottleneck(Bottleneck):
        def __init__(self, inplanes, planes, *args, **kwargs):
            super().__init__(inplanes, planes, *args, **kwargs)
            ch = planes * self.expansion
            self.se = SqueezeExcite(ch, _make_divisible(ch / 16))

        def forward(self, x):
            identity = x
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.se(self.bn3(self.conv3(out)))
            if self.downsample is not None:
                identity = self.downsample(x)
            return self.relu(out + identity)

    return ResNet(SEBottleneck, [3, 4, 6, 3], num_classes=num_classes)


class DoubleConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))


class UNet(nn.Module):
    """Plain-PyTorch U-Net (Ronneberger et al. 2015) with padded convolutions and BatchNorm, in the layout of
    fastnets.models.unet (encoders, pool, upconvs, decoders, head; widths base * 2**i)."""

    def __init__(self, num_classes=2, in_channels=3, base_channels=64, depth=4):
        super().__init__()
        w = [base_channels * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList([DoubleConv(in_channels if i == 0 else w[i - 1], w[i]) for i in range(depth + 1)])
        self.pool = nn.MaxPool2d(2)
        self.upconvs = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in reversed(range(depth))])
        self.decoders = nn.ModuleList([DoubleConv(2 * w[i], w[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(w[0], num_classes, 1)

    def forward(self, x):
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.upconvs, self.decoders):
            skip, x = skips.pop(), up(x)
            dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
            if dh or dw:  # a size that does not halve evenly: the upsampled map padded to its skip's size
                x = F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
            x = dec(torch.cat([skip, x], 1))
        return self.head(x)


def _cifar_stem(model, arch, conv=nn.Conv2d):
    """Replace an ImageNet stem (7x7 stride-2 convolution + max-pool(s)) by a 3x3 stride-1 convolution
    without pooling, for 32x32 inputs. `conv` is the convolution class (fastnets.nn.Conv2d for fastnets)."""
    if arch.startswith("resnet") or arch.startswith("se_resnet"):
        model.conv1 = conv(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif arch == "densenet121":
        model.features.conv0 = conv(3, 64, 3, 1, 1, bias=False)
        model.features.pool0 = nn.Identity()
    elif arch == "googlenet":
        model.conv1.conv = conv(3, 64, 3, 1, 1, bias=False)
        model.maxpool1 = nn.Identity()
        model.maxpool2 = nn.Identity()
    else:
        raise ValueError(f"no CIFAR stem for {arch}")
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.in_channels == 3:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def eager_source(name):
    s = spec(name)
    if s.source == "timm":
        return f"timm {s.arch} (fastnets: fastnets.convert of it)"
    if s.arch == "lenet5" or s.arch == "unet":
        return "plain PyTorch (fastnets.bench.model_specs)"
    if s.arch == "se_resnet50":
        return "timm seresnet50" if _has_timm() else "plain PyTorch torchvision ResNet + SE (timm layout)"
    return f"torchvision.models.{s.arch}"


def _has_timm():
    try:
        import timm  # noqa: F401
    except Exception:
        return False
    return True


def build_eager(name):
    """The eager baseline for `name`, freshly initialised from torch's current RNG state."""
    import torchvision.models as tvm

    s = spec(name)
    if s.source == "timm":
        import timm

        return timm.create_model(s.arch, pretrained=False, num_classes=s.num_classes, in_chans=s.in_channels)
    if s.arch == "lenet5":
        return LeNet5(s.num_classes, s.in_channels)
    if s.arch == "unet":
        return UNet(s.num_classes, s.in_channels)
    if s.arch == "se_resnet50":
        if _has_timm():
            import timm

            m = timm.create_model("seresnet50", num_classes=s.num_classes, pretrained=False)
        else:
            m = _plain_se_resnet50(s.num_classes)
    elif s.arch == "googlenet":
        m = tvm.googlenet(weights=None, num_classes=s.num_classes, aux_logits=False, init_weights=True)
    else:
        m = getattr(tvm, s.arch)(weights=None, num_classes=s.num_classes)
    return _cifar_stem(m, s.arch) if s.cifar_stem else m


class FastnetsUnavailable(RuntimeError):
    pass


def build_fastnets(name, like=None):
    """fastnets.models.<arch> for `name`; with `like` (an eager model), its weights and buffers loaded. A timm
    model is fastnets.convert of the eager model (of `like`, which is left as it is)."""
    if spec(name).source == "timm":
        try:
            import fastnets
        except ImportError as e:
            raise FastnetsUnavailable(f"fastnets cannot be imported ({e})") from e
        return fastnets.convert(like if like is not None else build_eager(name))  # a converted deep copy
    try:
        import fastnets.models as fm
    except ImportError as e:
        raise FastnetsUnavailable(f"fastnets.models cannot be imported ({e})") from e
    s = spec(name)
    fn = getattr(fm, s.arch, None)
    if fn is None:
        raise FastnetsUnavailable(f"fastnets.models has no {s.arch}")
    params = inspect.signature(fn).parameters
    kwargs = {"num_classes": s.num_classes}
    if "in_channels" in params:
        kwargs["in_channels"] = s.in_channels
    if s.arch == "googlenet" and "aux_logits" in params:
        kwargs["aux_logits"] = False
    stem_here = False
    if s.cifar_stem:
        if "cifar_stem" in params:
            kwargs["cifar_stem"] = True
        else:
            stem_here = True  # the same stem swap as the eager model, with fastnets' Conv2d
    model = fn(**kwargs)
    if stem_here:
        from fastnets.nn.conv import Conv2d

        _cifar_stem(model, s.arch, conv=Conv2d)
    if like is not None:
        copy_weights(like, model)
    return model


def copy_weights(src, dst):
    """Load src's parameters and buffers into dst: by name when the state_dict keys agree, else in order
    when every entry's shape agrees (for layouts that name things differently); otherwise raise."""
    sd = src.state_dict()
    try:
        dst.load_state_dict(sd, strict=True)
        return "by name"
    except RuntimeError as by_name:
        dsd = dst.state_dict()
        if len(dsd) != len(sd) or any(a.shape != b.shape for a, b in zip(sd.values(), dsd.values())):
            raise RuntimeError(f"cannot load the eager model's weights into the fastnets model: {by_name}") from None
        dst.load_state_dict(dict(zip(dsd.keys(), sd.values())), strict=True)
        return "in order"


def make_pair(name, seed=0):
    """(eager, fastnets-or-None, why-not) built from seed `seed`, with identical weights."""
    torch.manual_seed(seed)
    eager = build_eager(name)
    try:
        fast = build_fastnets(name, like=eager)
        why = None
    except (FastnetsUnavailable, RuntimeError, TypeError) as e:
        fast, why = None, str(e)
    return eager, fast, why


def example_batch(name, batch_size, device, generator=None):
    """Random inputs and targets of the model's shape (for timing only)."""
    s = spec(name)
    x = torch.randn(batch_size, s.in_channels, s.image_size, s.image_size, device=device, generator=generator)
    if s.task == "segmentation":
        y = torch.randint(0, s.num_classes, (batch_size, s.image_size, s.image_size), device=device, generator=generator)
    else:
        y = torch.randint(0, s.num_classes, (batch_size,), device=device, generator=generator)
    return x, y


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def clone(model):
    return copy.deepcopy(model)
