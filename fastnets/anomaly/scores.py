"""Anomaly scores of reconstructions, and the AUROC.

Per pixel (N, H, W): squared error averaged over channels ("l2"), 1 - SSIM ("ssim"; Wang et al. 2004, 11x11
Gaussian window, sigma 1.5, C1 = 0.01^2, C2 = 0.03^2 for images in [0, 1]), and their mix ("mix":
l2 / l2_scale + ssim / ssim_scale, halves, with the scales taken on normal training images so neither term
dominates). Per image: the mean of the per-pixel map.

AUROC: the Mann-Whitney statistic, P(score of a random positive > score of a random negative) + 1/2 P(tie),
computed from average ranks (exact with ties).
"""
import numpy as np
import torch
import torch.nn.functional as F

RECONSTRUCTION_SCORES = ("l2", "ssim", "mix")
# Scores of where an image's code lies (svdd.py): k-NN distance, Deep SVDD distance, and their mix ("combo").
CODE_SCORES = ("knn", "svdd", "combo")
SCORES = RECONSTRUCTION_SCORES + CODE_SCORES
# Each mixed score is the mean of its two parts, each divided by its scale (its mean on normal training images).
MIXES = {"mix": ("l2", "ssim"), "combo": ("knn", "svdd")}


def mix_scores(parts, kind, scales=None):
    """The mixed score `kind` of MIXES from parts {name: scores}; scales None = every part at scale 1."""
    a, b = MIXES[kind]
    scales = scales or {a: 1.0, b: 1.0}
    missing = [n for n in (a, b) if n not in scales]
    if missing:
        raise ValueError(f"scales must hold {a!r} and {b!r} for {kind!r}, missing {missing}")
    return 0.5 * parts[a] / scales[a] + 0.5 * parts[b] / scales[b]


def _gaussian_window(size=11, sigma=1.5, dtype=torch.float32, device=None):
    t = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(t * t) / (2 * sigma * sigma))
    return g / g.sum()


def ssim_map(x, y, window=11, sigma=1.5, c1=0.01**2, c2=0.03**2):
    """Per-pixel SSIM of images x, y (N, C, H, W) in [0, 1], averaged over channels: (N, H, W). Local
    statistics use a separable Gaussian window with reflection padding (the map has the images' size); the
    window shrinks to fit images smaller than it."""
    _check_pair(x, y)
    h, w = x.shape[-2:]
    window = min(window, 2 * (min(h, w) // 2) - 1) if min(h, w) < window else window
    g = _gaussian_window(window, sigma, dtype=x.dtype, device=x.device)
    c = x.shape[1]
    pad = window // 2

    def blur(t):
        if pad:
            t = F.pad(t, (pad, pad, pad, pad), mode="reflect")
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(c, 1, 1, window), groups=c)
        return F.conv2d(t, g.view(1, 1, -1, 1).expand(c, 1, window, 1), groups=c)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean(1)


def _check_pair(x, y):
    for name, t in (("images", x), ("reconstructions", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor in [0, 1], got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"images {tuple(x.shape)} and reconstructions {tuple(y.shape)} must have one shape")


def pixel_scores(x, recon, kind="l2", scales=None):
    """Per-pixel anomaly map (N, H, W) of `kind` in RECONSTRUCTION_SCORES; `scales` = {"l2": s, "ssim": s} for "mix"."""
    _check_pair(x, recon)
    if kind == "l2":
        return ((x - recon) ** 2).mean(1)
    if kind == "ssim":
        return 1 - ssim_map(x, recon)
    if kind == "mix":
        return mix_scores({k: pixel_scores(x, recon, k) for k in MIXES["mix"]}, "mix", scales)
    raise ValueError(f"kind must be one of {RECONSTRUCTION_SCORES} (per-pixel scores), got {kind!r}")


def image_scores(x, recon, kind="l2", scales=None):
    """Per-image anomaly score (N,): the mean of pixel_scores."""
    return pixel_scores(x, recon, kind, scales).flatten(1).mean(1)


def _as_arrays(scores, labels):
    s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64).ravel()
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) must have one length")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (got NaN or Inf)")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("labels must contain both normal (0) and anomalous (1) items for an AUROC")
    return s, y


def auroc(scores, labels):
    """Area under the ROC curve of `scores` (higher = more anomalous) for binary `labels` (1 = anomalous)."""
    s, y = _as_arrays(scores, labels)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first occurrence
    ranks = (first + (counts + 1) / 2.0)[inverse]  # average 1-based rank over ties
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(scores, labels):
    """(false positive rates, true positive rates) at every distinct threshold, from (0, 0) to (1, 1)."""
    s, y = _as_arrays(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # the last index of each run of equal scores
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]
