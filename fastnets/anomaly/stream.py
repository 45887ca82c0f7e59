"""Streaming anomaly scoring with a moving-average threshold (the notes' 3.4: "use auto-encoder reconstruction
error and use moving averages ... and set time window").

StreamingDetector keeps an exponential moving average of the mean and variance of the scores it judged
NORMAL, and flags a score as anomalous when it exceeds mean + k * std. Only normal scores update the
averages, so a burst of anomalies (a rising anomaly rate) does not drag the threshold up after them, while a
slow drift of the normal scores (a changing camera, a model that ages) is followed. The first batch starts
the averages from its median and MAD (robust to the anomalies it may hold).
"""
import math

import torch


class StreamingDetector:
    def __init__(self, k=3.0, momentum=0.05):
        if not (k > 0 and math.isfinite(k)):
            raise ValueError(f"k must be a positive finite number of standard deviations, got {k}")
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.k, self.momentum = float(k), float(momentum)
        self.mean = None
        self.var = None
        self.thresholds = []  # the threshold each batch was judged against

    @property
    def threshold(self):
        return None if self.mean is None else self.mean + self.k * math.sqrt(self.var)

    def update(self, scores):
        """Judge one mini-batch of per-item scores (1-D, or per-image maps reduced by the caller); returns a
        bool tensor, True = anomalous, and updates the moving averages with the items judged normal."""
        if not isinstance(scores, torch.Tensor):
            scores = torch.as_tensor(scores)
        if scores.dim() != 1:
            raise ValueError(f"scores must be 1-D (one score per item), got shape {tuple(scores.shape)}")
        if scores.numel() == 0:
            raise ValueError("scores must not be empty (a mini-batch with no items)")
        s = scores.detach().double().cpu()
        if not torch.isfinite(s).all():
            raise ValueError("scores must be finite (got NaN or Inf)")
        if self.mean is None:
            med = s.median().item()
            mad = (s - med).abs().median().item() * 1.4826  # the std of a normal distribution
            self.mean, self.var = med, max(mad * mad, 1e-12)
        thr = self.threshold
        self.thresholds.append(thr)
        flags = s > thr
        normal = s[~flags]
        if normal.numel():
            m = self.momentum
            bm = normal.mean().item()
            bv = ((normal - self.mean) ** 2).mean().item()
            # The normal scores are truncated at the threshold; at k >= 2 that loses under 5 % of the variance.
            self.mean = (1 - m) * self.mean + m * bm
            self.var = max((1 - m) * self.var + m * bv, 1e-12)
        return flags.to(scores.device)
