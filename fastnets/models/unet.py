"""U-Net (Ronneberger, Fischer and Brox, 2015) with conv-BN-ReLU blocks, for segmentation
(`num_classes` logit maps) and reconstruction (`num_classes` = image channels, e.g. an autoencoder or a
denoiser). Padded 3x3 convolutions, so the output has the input's height and width (any size: an upsampled
map is padded to its skip connection's size, as in the common PyTorch ports of the paper).

Layout: `encoders[0..depth]` and `decoders[0..depth-1]` are DoubleConv blocks (conv1, bn1, conv2, bn2;
each conv -> BN -> ReLU one fused kernel call), `upconvs[i]` 2x2 stride-2 transposed convolutions, `head` the
1x1 output convolution. Channels: base_channels * 2**i at level i (64 ... 1024 in the paper)."""
import torch
import torch.nn.functional as F
from torch import nn

from ..nn.batch_norm import BatchNorm2d
from ..nn.conv import Conv2d, conv_bn_act
from ._common import init_conv_bn_linear


class DoubleConv(nn.Module):
    """(3x3 conv -> BN -> ReLU) twice, each pair one fused kernel call."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = BatchNorm2d(out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(out_channels)

    def forward(self, x):
        x = conv_bn_act(self.conv1, self.bn1, x, relu=True)
        return conv_bn_act(self.conv2, self.bn2, x, relu=True)


class UNet(nn.Module):
    def __init__(self, num_classes=2, in_channels=1, base_channels=64, depth=4):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.encoders = nn.ModuleList(
            [DoubleConv(in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(depth + 1)]
        )
        self.pool = nn.MaxPool2d(2)
        self.upconvs = nn.ModuleList(
            [nn.ConvTranspose2d(widths[i + 1], widths[i], kernel_size=2, stride=2) for i in reversed(range(depth))]
        )
        self.decoders = nn.ModuleList([DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(depth))])
        self.head = Conv2d(widths[0], num_classes, kernel_size=1)
        init_conv_bn_linear(self, conv_mode="fan_in")

    def forward(self, x):
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.upconvs, self.decoders):
            skip = skips.pop()
            x = up(x)
            dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
            if dh or dw:
                x = F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
            x = dec(torch.cat([skip, x], dim=1))
        return self.head(x)


def unet(num_classes=2, in_channels=1, base_channels=64, depth=4):
    """U-Net with BatchNorm: `num_classes` output maps (segmentation logits, or the channels of a
    reconstruction), `in_channels` input channels, `base_channels` at the first level, `depth` poolings."""
    return UNet(num_classes=num_classes, in_channels=in_channels, base_channels=base_channels, depth=depth)
