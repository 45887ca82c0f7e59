"""SE-ResNet-50 (Hu et al., 2018) in timm's layout (`timm.create_model("seresnet50")`): torchvision's
ResNet-50 keys plus `layerX.Y.se.fc1` / `se.fc2` (1x1 convolutions with bias, reduced width C / 16), the
squeeze-excite applied after bn3 and before the residual add. The excite, residual add and ReLU run as one
fused `SqueezeExcite(x, residual, relu=True)` call."""
from .resnet import Bottleneck, ResNet


def se_resnet50(num_classes=1000, in_channels=3, cifar_stem=False, zero_init_last=True, reduction=16):
    """SE-ResNet-50; state_dict compatible with timm's `seresnet50`. Like timm, the last BatchNorm of every
    block starts at weight 0 (`zero_init_last`)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels,
                  cifar_stem=cifar_stem, zero_init_residual=zero_init_last, se_reduction=reduction)
