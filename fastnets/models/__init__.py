"""Reference CNN architectures built from fastnets modules (every fused kernel that applies is used).

All but LeNet-5 and U-Net have exactly the state_dict keys and shapes of torchvision's model of the same
name (timm's `seresnet50` for `se_resnet50`), so their weights load with `load_state_dict`."""
from .alexnet import AlexNet, alexnet
from .densenet import DenseNet, densenet121
from .googlenet import GoogLeNet, GoogLeNetOutputs, googlenet
from .lenet import LeNet5, lenet5
from .resnet import ResNet, resnet18, resnet34, resnet50, resnet101
from .se_resnet import se_resnet50
from .unet import UNet, unet
from .vgg import VGG, vgg11, vgg11_bn, vgg16, vgg16_bn

__all__ = [
    "lenet5", "alexnet", "vgg11", "vgg16", "vgg11_bn", "vgg16_bn", "googlenet", "resnet18", "resnet34",
    "resnet50", "resnet101", "densenet121", "se_resnet50", "unet",
    "LeNet5", "AlexNet", "VGG", "GoogLeNet", "GoogLeNetOutputs", "ResNet", "DenseNet", "UNet",
]
