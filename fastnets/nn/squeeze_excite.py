"""SqueezeExcite: the squeeze-and-excitation block (Hu, Shen and Sun, 2017) in fused fastnets kernels, with
an optional residual add and ReLU fused into its output pass (the tail of an SE-ResNet bottleneck)."""
from torch import nn

from .. import _checks, activations
from ..ops.squeeze_excite import squeeze_excite


class SqueezeExcite(nn.Module):
    """y = [relu](x * gate(fc2(inner_act(fc1(avgpool(x))))) [+ residual]) in three fused kernels.

    Args:
        channels: C, the channels of the input.
        reduced_channels: R, the width of the bottleneck (SE-ResNet uses C // 16); any R >= 1.
        inner_act: the activation between fc1 and fc2, any of fastnets.activations (default relu;
            torchvision's EfficientNet uses nn.SiLU, MobileNetV3 relu).
        gate: "sigmoid" (default) or "hardsigmoid" (MobileNetV3), or nn.Sigmoid / nn.Hardsigmoid.

    forward(x, residual=None, relu=False): x is (N, C, H, W), NCHW or channels_last, float32, float16 or
    bfloat16 (the weights may stay float32 under autocast); `residual`, if given, must have x's shape, dtype
    and device. `forward(x)` is torchvision's SqueezeExcitation; `forward(x, residual=shortcut, relu=True)`
    is the end of an SE-ResNet bottleneck: relu(se(x) + shortcut).

    Weights. `fc1` = Conv2d(C, R, 1) and `fc2` = Conv2d(R, C, 1), both with bias, so the state_dict keys are
    fc1.weight [R, C, 1, 1], fc1.bias [R], fc2.weight [C, R, 1, 1], fc2.bias [C]: exactly those of
    `torchvision.ops.SqueezeExcitation(C, R)` (whose avgpool and activations have no state), which loads
    unchanged with `load_state_dict`.

    timm: the `se` module of each bottleneck of timm's SE-ResNets (`timm.create_model("seresnet50")`,
    `model.layer1[0].se`, a timm.layers.SEModule with its `bn` an Identity) holds the same four keys
    `fc1.weight`, `fc1.bias`, `fc2.weight`, `fc2.bias` with the same shapes (R = C // 16 for seresnet50), so
    its weights load as they are::

        se = fastnets.nn.SqueezeExcite(C, R)
        se.load_state_dict(timm_block.se.state_dict())
        # or, from a whole timm state_dict, for the block at prefix "layer1.0.":
        se.load_state_dict({k[len("layer1.0.se."):]: v for k, v in sd.items() if k.startswith("layer1.0.se.")})

    and timm's `act3(se(bn3(conv3(x))) + shortcut)` becomes `se(bn3(conv3(x)), residual=shortcut, relu=True)`.
    """

    def __init__(self, channels, reduced_channels, inner_act="relu", gate="sigmoid"):
        super().__init__()
        self.inner_act, self.inner_param = activations.canonical(inner_act, "inner_act")
        self.gate = activations.canonical_gate(gate, "gate")
        if int(channels) < 1 or int(reduced_channels) < 1:
            raise ValueError(f"channels and reduced_channels must be >= 1, got {channels} and {reduced_channels}")
        self.channels = int(channels)
        self.reduced_channels = int(reduced_channels)
        self.fc1 = nn.Conv2d(self.channels, self.reduced_channels, 1)
        self.fc2 = nn.Conv2d(self.reduced_channels, self.channels, 1)

    def forward(self, x, residual=None, relu=False):
        _checks.check_float(x, "input")
        _checks.check_ndim(x, "input", (4,))
        if x.shape[1] != self.channels:
            raise ValueError(
                f"input has {x.shape[1]} channels (dim 1 of shape {tuple(x.shape)}) but SqueezeExcite "
                f"expects channels={self.channels}"
            )
        return squeeze_excite(
            x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, residual=residual, relu=relu,
            inner_act=(self.inner_act, self.inner_param), gate=self.gate,
        )

    def extra_repr(self):
        extra = ""
        if (self.inner_act, self.gate) != ("relu", "sigmoid"):
            extra = f", inner_act={self.inner_act}, gate={self.gate}"
        return f"channels={self.channels}, reduced_channels={self.reduced_channels}{extra}"
