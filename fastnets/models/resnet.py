"""ResNet-18/34/50/101 in torchvision's layout (`torchvision.models.resnet*`): same state_dict keys and
shapes, same outputs. Every Conv -> BN [-> add] [-> ReLU] of a block runs as one fused `conv_bn_act` call
(the residual add and ReLU fused into the second/third BatchNorm's pass), the downsample Conv -> BN too.
In training the blocks are chained (fastnets.nn.conv_chain): bn1's (and bn2's) apply + ReLU run in the next
convolution's prologue and the stem's BN-ReLU inside the max-pool, so those activations are never stored;
the last BatchNorm stays fused with the add and ReLU. Eval: the folded convolutions, as before.

`cifar_stem=True` swaps the 7x7 stride-2 stem and its max-pool for a 3x3 stride-1 convolution and no
max-pool, for 32x32 inputs (CIFAR-10); `conv1.weight` is then (64, in_channels, 3, 3).
SE-ResNets (`se_resnet.py`) are these blocks with a squeeze-excite module `se` after the last BatchNorm.
"""
import torch
from torch import nn

from ..nn.batch_norm import BatchNorm2d
from ..nn.conv import Conv2d, conv_bn_act
from ..nn.conv_chain import conv_bn_act_chained, conv_bn_deferred, max_pool_deferred
from ..nn.squeeze_excite import SqueezeExcite
from ._common import init_conv_bn_linear


def conv3x3(in_planes, out_planes, stride=1):
    return Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def make_divisible(v, divisor=8):
    """timm's make_divisible(v, divisor, round_limit=0.0): SE reduction widths of timm's SE-ResNets."""
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


def _shortcut(block, x):
    ds = block.downsample
    if ds is None:
        return x
    if isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d) and isinstance(ds[1], nn.BatchNorm2d):
        return conv_bn_act(ds[0], ds[1], x, relu=False)
    return ds(x)


def _tail(block, bn_conv, bn, out, identity):
    """relu(bn(conv(out)) [-> se] + identity), fused; `out` may be a Deferred (the previous BatchNorm-apply
    and ReLU then run in this convolution's prologue). (fastnets.convert runs these blocks' forwards on
    torchvision's BasicBlock / Bottleneck too, which have no `se`.)"""
    se = getattr(block, "se", None)
    if se is None:
        return conv_bn_act_chained(bn_conv, bn, out, residual=identity, act="relu")
    out = conv_bn_act_chained(bn_conv, bn, out, act=None)
    return se(out, residual=identity, relu=True)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, se_channels=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = BatchNorm2d(planes)
        self.se = None if se_channels is None else SqueezeExcite(planes, se_channels)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = _shortcut(self, x)
        out = conv_bn_deferred(self.conv1, self.bn1, x, act="relu")  # in training: applied in conv2's prologue
        return _tail(self, self.conv2, self.bn2, out, identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet V1.5 bottleneck (stride on the 3x3 convolution)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, se_channels=None):
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = BatchNorm2d(planes * self.expansion)
        self.se = None if se_channels is None else SqueezeExcite(planes * self.expansion, se_channels)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = _shortcut(self, x)
        out = conv_bn_deferred(self.conv1, self.bn1, x, act="relu")  # in training: applied in conv2's prologue
        out = conv_bn_deferred(self.conv2, self.bn2, out, act="relu")  # ... and in conv3's
        return _tail(self, self.conv3, self.bn3, out, identity)


# The BatchNorm -> convolution pairs whose BN-apply + ReLU run in the next convolution's prologue in training
# (read by fastnets.convert's report for the torchvision blocks it runs on these forwards).
BasicBlock.forward.chains = (("bn1", "conv2"),)
Bottleneck.forward.chains = (("bn1", "conv2"), ("bn2", "conv3"))


class ResNet(nn.Module):
    """torchvision.models.ResNet with fused blocks. `se_reduction`: add a squeeze-excite module to every block
    (timm's SE-ResNet layout, reduced width make_divisible(C / se_reduction, 8))."""

    def __init__(self, block, layers, num_classes=1000, in_channels=3, zero_init_residual=False,
                 cifar_stem=False, se_reduction=None):
        super().__init__()
        self.inplanes = 64
        self.se_reduction = se_reduction
        if cifar_stem:
            self.conv1 = Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = BatchNorm2d(64)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        init_conv_bn_linear(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride), BatchNorm2d(planes * block.expansion)
            )
        se = None
        if self.se_reduction is not None:
            se = make_divisible(planes * block.expansion / self.se_reduction)
        layers = [block(self.inplanes, planes, stride, downsample, se_channels=se)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, se_channels=se))
        return nn.Sequential(*layers)

    def forward_features(self, x):
        if type(self.maxpool) is nn.MaxPool2d:  # in training the stem's BN-ReLU is pooled, never stored
            x = max_pool_deferred(self.maxpool, conv_bn_deferred(self.conv1, self.bn1, x, act="relu"))
        else:
            x = self.maxpool(conv_bn_act(self.conv1, self.bn1, x, relu=True))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x):
        x = self.forward_features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _resnet(block, layers, num_classes, in_channels, cifar_stem, zero_init_residual):
    return ResNet(block, layers, num_classes=num_classes, in_channels=in_channels, cifar_stem=cifar_stem,
                  zero_init_residual=zero_init_residual)


def resnet18(num_classes=1000, in_channels=3, cifar_stem=False, zero_init_residual=False):
    """ResNet-18; state_dict compatible with torchvision.models.resnet18 (cifar_stem: 3x3 stride-1 stem, no max-pool)."""
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, cifar_stem, zero_init_residual)


def resnet34(num_classes=1000, in_channels=3, cifar_stem=False, zero_init_residual=False):
    """ResNet-34; state_dict compatible with torchvision.models.resnet34."""
    return _resnet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels, cifar_stem, zero_init_residual)


def resnet50(num_classes=1000, in_channels=3, cifar_stem=False, zero_init_residual=False):
    """ResNet-50 (V1.5); state_dict compatible with torchvision.models.resnet50."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, cifar_stem, zero_init_residual)


def resnet101(num_classes=1000, in_channels=3, cifar_stem=False, zero_init_residual=False):
    """ResNet-101 (V1.5); state_dict compatible with torchvision.models.resnet101."""
    return _resnet(Bottleneck, [3, 4, 23, 3], num_classes, in_channels, cifar_stem, zero_init_residual)
