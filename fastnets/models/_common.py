"""Pieces shared by the model zoo."""
from torch import nn

from ..nn.batch_norm import bn_act
from ..nn.conv import conv_bn_act
from ..nn._sequential import sequential_runs


def _is_conv2d(m):
    return isinstance(m, nn.Conv2d)


def _is_bn2d(m):
    return isinstance(m, nn.BatchNorm2d)


def _is_relu(m):
    return type(m) is nn.ReLU


class FusedSequential(nn.Sequential):
    """nn.Sequential (same children, same state_dict keys) whose forward runs each Conv2d -> BatchNorm2d
    [-> ReLU] run as one fused `conv_bn_act` call and each BatchNorm2d -> ReLU as one `bn_act` call; every
    other child runs as it is. The runs are found from the children at each call, so editing the
    Sequential keeps its forward right."""

    def forward(self, x, relu_after=False):
        """`relu_after=True`: as if an nn.ReLU followed the last child (fused into it when it is a BN)."""
        for kind, run, relu, _ in sequential_runs(self, relu_after, _is_conv2d, _is_bn2d, _is_relu):
            if kind == "conv_bn":
                x = conv_bn_act(run[0], run[1], x, relu=relu)
            elif kind == "bn_relu":
                x = bn_act(run[0], x, relu=True)
            else:
                x = run[0](x)
        return x


def init_conv_bn_linear(model, conv_mode="fan_out"):
    """torchvision's initialisation for ResNets, VGGs, DenseNets: Kaiming-normal convolutions, BatchNorm
    weight 1 and bias 0, Linear N(0, 0.01) (VGG) or torch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=conv_mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
