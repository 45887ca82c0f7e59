"""A U-Net-style encoder-decoder for reconstruction, built from fastnets' fused Conv-BN-ReLU blocks.

Encoder: level 0 at full resolution, each further level halves H and W with a stride-2 3x3 ConvBNReLU2d;
every level is two ConvBNReLU2d blocks of `widths[i]` channels. Bottleneck: a stride-2 block down to
`latent_channels` (the code: latent_channels x ceil(H/2^L) x ceil(W/2^L) numbers). Decoder: nearest
upsampling to the matching encoder level's size, two ConvBNReLU2d blocks, and a 1x1 conv + sigmoid head
(images are in [0, 1]).

`skips=False`: a plain bottleneck autoencoder; everything it reconstructs must pass through the code.
`skips=True`: the U-Net's skip connections (encoder level i concatenated into decoder level i). They can copy
the input and hide an anomaly, which is why such a model is trained on corrupted inputs (see protocol.py).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..nn.conv import Conv2d, ConvBNReLU2d


def _block(cin, cout, stride=1):
    return ConvBNReLU2d(cin, cout, 3, stride=stride, padding=1)


class ReconstructionAE(nn.Module):
    def __init__(self, in_channels=1, widths=(8, 16, 32), latent_channels=2, skips=False):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be a non-empty sequence of positive channel counts, got {widths}")
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
        self.in_channels, self.widths, self.latent_channels, self.skips = in_channels, widths, latent_channels, bool(skips)
        self.encoders = nn.ModuleList()
        prev = in_channels
        for i, w in enumerate(widths):
            self.encoders.append(nn.Sequential(_block(prev, w, stride=1 if i == 0 else 2), _block(w, w)))
            prev = w
        self.bottleneck = _block(prev, latent_channels, stride=2)
        self.decoders = nn.ModuleList()
        prev = latent_channels
        for w in reversed(widths):
            cin = prev + (w if self.skips else 0)
            self.decoders.append(nn.Sequential(_block(cin, w), _block(w, w)))
            prev = w
        self.head = Conv2d(prev, in_channels, 1)

    def encode(self, x):
        """(the code: the bottleneck's output, every encoder level's features for the skips)."""
        features = []
        for enc in self.encoders:
            x = enc(x)
            features.append(x)
        return self.bottleneck(x), features

    def forward(self, x):
        x, features = self.encode(x)
        for dec, skip in zip(self.decoders, reversed(features)):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            if self.skips:
                x = torch.cat([x, skip], dim=1)
            x = dec(x)
        return torch.sigmoid(self.head(x))
