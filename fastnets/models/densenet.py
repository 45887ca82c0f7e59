"""DenseNet-121 (Huang et al., 2017) in torchvision's layout (`torchvision.models.densenet121`): same
state_dict keys and shapes, same outputs. Its pre-activation layers are BN -> ReLU -> Conv: each dense layer
runs as bn_act(norm1, relu) -> conv_bn_act(conv1, norm2, relu) -> conv2, i.e. two fused kernels and one
convolution; the stem's conv0 -> norm0 -> relu0, each transition's norm -> relu and the final norm5 -> ReLU
are fused too. In training the layers are chained (fastnets.nn.conv_chain): norm1 -> relu1 on the
concatenated features runs in conv1's prologue and norm2 -> relu2 in conv2's (each transition's norm -> relu
in its conv's, the stem's inside pool0), so BN-ReLU of the concatenation, the part of eager's memory that
grows quadratically with depth, is never stored: only the concatenation itself (conv1's input) is."""
import torch
import torch.nn.functional as F
from torch import nn

from ..nn.batch_norm import BatchNorm2d
from ..nn.conv import Conv2d
from ..nn.conv_chain import ChainedSequential, bn_deferred, conv_bn_deferred, conv_chained


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features, growth_rate, bn_size, drop_rate):
        super().__init__()
        self.norm1 = BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, input):
        x = torch.cat(input, 1) if isinstance(input, (list, tuple)) else input
        x = bn_deferred(self.norm1, x, act="relu")  # training: applied in conv1's prologue
        x = conv_bn_deferred(self.conv1, self.norm2, x, act="relu")  # ... and this one in conv2's
        x = conv_chained(self.conv2, x)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x


_DenseLayer.forward.chains = (("norm1", "conv1"), ("norm2", "conv2"))  # (read by fastnets.convert's report)


class _DenseBlock(nn.ModuleDict):
    _version = 2

    def __init__(self, num_layers, num_input_features, bn_size, growth_rate, drop_rate):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module("denselayer%d" % (i + 1), layer)

    def forward(self, init_features):
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(ChainedSequential):
    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.norm = BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4,
                 drop_rate=0.0, num_classes=1000, in_channels=3):
        super().__init__()
        self.features = ChainedSequential()
        self.features.add_module("conv0", Conv2d(in_channels, num_init_features, kernel_size=7, stride=2,
                                                 padding=3, bias=False))
        self.features.add_module("norm0", BatchNorm2d(num_init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate)
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module("transition%d" % (i + 1), _Transition(num_features, num_features // 2))
                num_features = num_features // 2
        self.features.add_module("norm5", BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        out = self.features(x, relu_after=True)  # torchvision: F.relu(self.features(x)), fused into norm5
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


def densenet121(num_classes=1000, in_channels=3, drop_rate=0.0):
    """DenseNet-121 (growth 32, blocks 6/12/24/16); state_dict compatible with torchvision.models.densenet121."""
    return DenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes, in_channels=in_channels, drop_rate=drop_rate)
