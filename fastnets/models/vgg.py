"""VGG-11/16, with and without BatchNorm, in torchvision's layout (`torchvision.models.vgg11`, `vgg16`,
`vgg11_bn`, `vgg16_bn`): same state_dict keys and shapes. With BatchNorm every Conv -> BN -> ReLU of
`features` runs as one fused kernel call, and in training `features` is chained (fastnets.nn.conv_chain):
each BN-ReLU runs in the next convolution's prologue, or inside the max-pool that follows it, so no BN-ReLU
output is stored for backward."""
import torch
from torch import nn

from ..nn.batch_norm import BatchNorm2d
from ..nn.conv import Conv2d
from ..nn.conv_chain import ChainedSequential
from ._common import FusedSequential, init_conv_bn_linear

CFGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def make_layers(cfg, batch_norm=False, in_channels=3):
    layers = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(Conv2d(in_channels, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            in_channels = v
    return ChainedSequential(*layers) if batch_norm else FusedSequential(*layers)


class VGG(nn.Module):
    def __init__(self, features, num_classes=1000, dropout=0.5, init_weights=True):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        if init_weights:
            init_conv_bn_linear(self)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _vgg(cfg, batch_norm, num_classes, in_channels, dropout):
    return VGG(make_layers(CFGS[cfg], batch_norm, in_channels), num_classes=num_classes, dropout=dropout)


def vgg11(num_classes=1000, in_channels=3, dropout=0.5):
    """VGG-11 (configuration A); state_dict compatible with torchvision.models.vgg11."""
    return _vgg("A", False, num_classes, in_channels, dropout)


def vgg11_bn(num_classes=1000, in_channels=3, dropout=0.5):
    """VGG-11 with BatchNorm; state_dict compatible with torchvision.models.vgg11_bn."""
    return _vgg("A", True, num_classes, in_channels, dropout)


def vgg16(num_classes=1000, in_channels=3, dropout=0.5):
    """VGG-16 (configuration D); state_dict compatible with torchvision.models.vgg16."""
    return _vgg("D", False, num_classes, in_channels, dropout)


def vgg16_bn(num_classes=1000, in_channels=3, dropout=0.5):
    """VGG-16 with BatchNorm; state_dict compatible with torchvision.models.vgg16_bn."""
    return _vgg("D", True, num_classes, in_channels, dropout)
