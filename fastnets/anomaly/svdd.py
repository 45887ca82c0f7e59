"""One-class scores in the autoencoder's code space: nearest-neighbour distance and Deep SVDD.

Reconstruction errors rank images by how hard they are to reconstruct, so on CIFAR-10 the busy classes
(automobile, truck) score their anomalies as more normal than themselves. Two scores that look at where an
image's code lies instead:

- `knn_distance`: the mean Euclidean distance of a code to its k nearest codes of the normal training images
  (the bottleneck of the trained autoencoder, eval mode; no further training).
- `DeepSVDD` / `train_deep_svdd` (Ruff et al. 2018, One-class Deep SVDD): the encoder, initialised from the
  autoencoder's, trained to map the normal class close to a centre c (the mean code of the normal images
  before training, coordinates nearer to 0 than `eps` pushed out to +-eps); the score is ||phi(x) - c||^2.
  A trainable bias lets the network map every input onto c (their Proposition 2, "hypersphere collapse").
  The convolutions have none, and the BatchNorm shift is one, so BatchNorm is frozen: eval mode (the running
  statistics the autoencoder was recalibrated with), weight and bias without gradients.
"""
import copy

import torch
from torch import nn

from .model import ReconstructionAE


@torch.no_grad()
def in_batches(fn, x, batch_size=500):
    """torch.cat of fn over slices of x of batch_size images (bounded memory), without autograd."""
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _check_autoencoder(autoencoder):
    if not isinstance(autoencoder, ReconstructionAE):
        raise TypeError(f"autoencoder must be a ReconstructionAE, got {type(autoencoder).__name__}")


def encode(autoencoder, x, batch_size=500):
    """The autoencoder's bottleneck codes of images x (float, [0, 1]), flattened: (N, D), eval mode."""
    _check_autoencoder(autoencoder)
    autoencoder.eval()
    return in_batches(lambda b: autoencoder.encode(b)[0].flatten(1), x, batch_size)


@torch.no_grad()
def knn_distance(queries, bank, k=5, exclude_self=False, batch_size=1000):
    """Mean Euclidean distance of each row of queries (Q, D) to its k nearest rows of bank (B, D). With
    exclude_self, query i is bank row i (the first Q rows of the bank) and does not count as its own
    neighbour (scores of the training images themselves)."""
    if queries.dim() != 2 or bank.dim() != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries and bank must be 2-D with the same width, got {tuple(queries.shape)} and "
                         f"{tuple(bank.shape)}")
    if exclude_self and queries.shape[0] > bank.shape[0]:
        raise ValueError(f"exclude_self needs queries to be the first rows of bank, got {queries.shape[0]} "
                         f"queries for a bank of {bank.shape[0]}")
    avail = bank.shape[0] - (1 if exclude_self else 0)
    if not 1 <= k <= avail:
        raise ValueError(f"k must be in 1..{avail} (the bank's size{' less the query' if exclude_self else ''}), "
                         f"got {k}")
    out = []
    for i in range(0, queries.shape[0], batch_size):
        d = torch.cdist(queries[i:i + batch_size].double(), bank.double())
        if exclude_self:
            rows = torch.arange(d.shape[0])
            d[rows, rows + i] = float("inf")
        out.append(d.topk(k, dim=1, largest=False).values.mean(1).float())
    return torch.cat(out)


class DeepSVDD(nn.Module):
    """phi: the autoencoder's encoder and bottleneck (copied), BatchNorm frozen; `center` c; score(x) =
    ||phi(x) - c||^2 per image."""

    def __init__(self, autoencoder):
        super().__init__()
        _check_autoencoder(autoencoder)
        self.phi = nn.Sequential(*copy.deepcopy(autoencoder.encoders), copy.deepcopy(autoencoder.bottleneck),
                                 nn.Flatten())
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.requires_grad_(False)
        self.register_buffer("center", torch.zeros(0))
        self.train(False)

    def train(self, mode=True):
        # BatchNorm stays in eval mode whatever is asked: batch statistics would be a trainable shift again.
        return super().train(False)

    def forward(self, x):
        return self.phi(x)

    def score(self, x, batch_size=500):
        if self.center.numel() == 0:
            raise RuntimeError("DeepSVDD has no center yet: build it with train_deep_svdd")
        return in_batches(lambda b: ((self(b) - self.center) ** 2).sum(1), x, batch_size)


def train_deep_svdd(autoencoder, x, epochs=4, lr=1e-4, weight_decay=1e-6, batch_size=64, eps=0.1, seed=0):
    """A DeepSVDD initialised from `autoencoder`, trained on the normal images x (float in [0, 1]) with Adam on
    the mean of ||phi(x) - c||^2 (plus weight decay)."""
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    model = DeepSVDD(autoencoder)
    c = in_batches(model, x).mean(0)
    near = c.abs() < eps
    c[near] = torch.where(c[near] < 0, -eps, eps)
    model.center = c
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            z = model(x[perm[i:i + batch_size]])
            loss = ((z - model.center) ** 2).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model
