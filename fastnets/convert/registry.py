"""The block registry: fused forwards for known torchvision / timm blocks, used where torch.fx cannot
trace them."""
from torch import nn

from ..nn.batch_norm import BatchNorm2d as FastBatchNorm2d
from ..nn.conv import Conv2d as FastConv2d
from .fx_rewrite import _has_hooks
from .runtime import chain_conv_bn, chained_conv_bn, fused_conv_bn, fused_se

_REGISTRY = {}  # block class -> function(module) -> fused forward function, or a string saying why not


def register_block(cls, make_forward):
    """Register a fused forward for a block class that torch.fx cannot trace: `make_forward(module)` returns
    a function forward(self, *args) for that instance, or a string saying why this instance is not supported."""
    _REGISTRY[cls] = make_forward


def _plain(m, *types_):
    return type(m) in types_ and not _has_hooks(m)


def _conv_bn_ok(conv, bn):
    return _plain(conv, nn.Conv2d, FastConv2d) and _plain(bn, nn.BatchNorm2d, FastBatchNorm2d)


def _shortcut(block, x):
    ds = block.downsample
    if ds is None:
        return x
    if type(ds) is nn.Sequential and len(ds) == 2 and _conv_bn_ok(ds[0], ds[1]):
        return fused_conv_bn(ds[0], ds[1], x)
    return ds(x)


def _tv_resnet_block(m):
    """torchvision's BasicBlock / Bottleneck run fastnets.models.resnet's own block forwards (the same
    attribute names: conv1, bn1, ..., downsample)."""
    from ..models import resnet

    names = ["conv1", "bn1", "conv2", "bn2"] + (["conv3", "bn3"] if hasattr(m, "conv3") else [])
    if not all(_conv_bn_ok(getattr(m, c), getattr(m, b)) for c, b in zip(names[::2], names[1::2])):
        return "its conv/bn layers are not plain Conv2d/BatchNorm2d"
    if not _plain(m.relu, nn.ReLU):
        return "relu is not an nn.ReLU"
    return resnet.Bottleneck.forward if hasattr(m, "conv3") else resnet.BasicBlock.forward


def _tv_dense_layer(m):
    """torchvision's _DenseLayer runs fastnets.models.densenet's _DenseLayer forward."""
    from ..models import densenet

    if not (_conv_bn_ok(m.conv1, m.norm2) and _plain(m.norm1, nn.BatchNorm2d, FastBatchNorm2d)
            and _plain(m.conv2, nn.Conv2d, FastConv2d) and _plain(m.relu1, nn.ReLU) and _plain(m.relu2, nn.ReLU)):
        return "unexpected layers"
    if getattr(m, "memory_efficient", False):
        return "memory_efficient=True (checkpointed) is not supported"
    return densenet._DenseLayer.forward


def _tv_basic_conv(m):
    """torchvision's GoogLeNet BasicConv2d runs fastnets.models.googlenet's BasicConv2d forward."""
    from ..models import googlenet

    if not _conv_bn_ok(m.conv, m.bn):
        return "unexpected layers"
    return googlenet.BasicConv2d.forward


def _is_sigmoid_module(g):
    """torch's nn.Sigmoid or timm's layers.activations.Sigmoid (x.sigmoid(), in place or not), without hooks."""
    if g is None or _has_hooks(g):
        return False
    return type(g) is nn.Sigmoid or (type(g).__module__ == "timm.layers.activations" and type(g).__name__ == "Sigmoid")


def _timm_resnet_block(m):
    bottleneck = hasattr(m, "conv3")
    pairs = [("conv1", "bn1"), ("conv2", "bn2")] + ([("conv3", "bn3")] if bottleneck else [])
    if not all(_conv_bn_ok(getattr(m, c), getattr(m, b)) for c, b in pairs):
        return "its conv/bn layers are not plain Conv2d/BatchNorm2d"
    acts = ["act1", "act2"] + (["act3"] if bottleneck else [])
    if not all(_plain(getattr(m, a), nn.ReLU) for a in acts):
        return "activations are not nn.ReLU"
    for name in ("drop_block", "aa"):
        if not _plain(getattr(m, name, nn.Identity()), nn.Identity):
            return f"{name} is not Identity"
    if getattr(m, "drop_path", None) is not None:
        return "drop_path is set"
    se = getattr(m, "se", None)
    if se is not None:
        ok = (type(se).__name__ == "SEModule" and not getattr(se, "add_maxpool", False)
              and _plain(getattr(se, "bn", None), nn.Identity) and _plain(getattr(se, "act", None), nn.ReLU)
              and _is_sigmoid_module(getattr(se, "gate", None)) and hasattr(se, "fc1") and hasattr(se, "fc2"))
        if not ok:
            return "its se module is not a plain SEModule (ReLU, sigmoid gate)"

    def tail(self, out, shortcut):
        if self.se is None:
            return None
        return fused_se(self.se.fc1, self.se.fc2, out, residual=shortcut, relu=True)

    # chained: in training bn1's (and bn2's) apply + ReLU run in the next convolution's prologue
    relu = ("relu", 0.0)
    if bottleneck:
        def forward(self, x):
            shortcut = _shortcut(self, x)
            out = chain_conv_bn(self.conv1, self.bn1, x, act=relu)
            out = chain_conv_bn(self.conv2, self.bn2, out, act=relu)
            if self.se is None:
                return chained_conv_bn(self.conv3, self.bn3, out, residual=shortcut, relu=True)
            return tail(self, chained_conv_bn(self.conv3, self.bn3, out), shortcut)
        forward.chains = (("bn1", "conv2"), ("bn2", "conv3"))
    else:
        def forward(self, x):
            shortcut = _shortcut(self, x)
            out = chain_conv_bn(self.conv1, self.bn1, x, act=relu)
            if self.se is None:
                return chained_conv_bn(self.conv2, self.bn2, out, residual=shortcut, relu=True)
            return tail(self, chained_conv_bn(self.conv2, self.bn2, out), shortcut)
        forward.chains = (("bn1", "conv2"),)
    return forward


def _ensure_registry():
    """Register the known torchvision/timm blocks, once each library is imported (a model holding their
    blocks has imported them; fastnets itself never imports either)."""
    import importlib
    import sys

    if "torchvision" in sys.modules and "torchvision" not in _registered_libs:
        _registered_libs.add("torchvision")
        try:
            densenet, googlenet, resnet = (importlib.import_module(f"torchvision.models.{n}")
                                           for n in ("densenet", "googlenet", "resnet"))
        except Exception:  # noqa: BLE001
            pass
        else:
            register_block(resnet.BasicBlock, _tv_resnet_block)
            register_block(resnet.Bottleneck, _tv_resnet_block)
            register_block(densenet._DenseLayer, _tv_dense_layer)
            register_block(googlenet.BasicConv2d, _tv_basic_conv)
    if "timm" in sys.modules and "timm" not in _registered_libs:
        _registered_libs.add("timm")
        try:
            timm_resnet = importlib.import_module("timm.models.resnet")
        except Exception:  # noqa: BLE001
            pass
        else:
            register_block(timm_resnet.Bottleneck, _timm_resnet_block)
            register_block(timm_resnet.BasicBlock, _timm_resnet_block)


_registered_libs = set()
