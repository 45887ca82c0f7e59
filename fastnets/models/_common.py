"""Pieces shared by the model zoo."""
from torch import nn

from ..nn.batch_norm import bn_act
from ..nn.conv import conv_bn_act


def _is_bn2d(m):
    return isinstance(m, nn.BatchNorm2d)


def _is_relu(m):
    return type(m) is nn.ReLU


_RELU = nn.ReLU()


class FusedSequential(nn.Sequential):
    """nn.Sequential (same children, same state_dict keys) whose forward runs each Conv2d -> BatchNorm2d
    [-> ReLU] run as one fused `conv_bn_act` call and each BatchNorm2d -> ReLU as one `bn_act` call; every
    other child runs as it is. The runs are found from the children at each call, so editing the
    Sequential keeps its forward right."""

    def forward(self, x, relu_after=False):
        """`relu_after=True`: as if an nn.ReLU followed the last child (fused into it when it is a BN)."""
        mods = list(self._modules.values())
        if relu_after:
            mods.append(_RELU)
        i, n = 0, len(mods)
        while i < n:
            m = mods[i]
            nxt = mods[i + 1] if i + 1 < n else None
            if isinstance(m, nn.Conv2d) and nxt is not None and _is_bn2d(nxt):
                relu = i + 2 < n and _is_relu(mods[i + 2])
                x = conv_bn_act(m, nxt, x, relu=relu)
                i += 3 if relu else 2
            elif _is_bn2d(m) and nxt is not None and _is_relu(nxt):
                x = bn_act(m, x, relu=True)
                i += 2
            else:
                x = m(x)
                i += 1
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
