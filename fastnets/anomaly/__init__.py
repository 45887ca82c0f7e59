"""One-class anomaly detection by reconstruction (the project notes' 3.3.3 and 3.4).

The protocol of Ruff et al. (2018, Deep SVDD, ICML): for each class c, an autoencoder is trained on the
training images of class c only; every test image is scored by its reconstruction error, and the AUROC of
"not c" (positive, anomalous) against "c" (normal) is reported per class, with the mean over classes and
seeds. `python -m fastnets.anomaly` runs it (see __main__.py).

Parts:
  model.py     ReconstructionAE: a U-Net-style encoder-decoder of fastnets ConvBNReLU2d blocks, with a narrow
               bottleneck and no skips, or with skips (trained on corrupted inputs so it cannot just copy).
  scores.py    per-pixel and per-image scores: squared error (L2), 1 - SSIM, and their mix; AUROC, ROC curve.
  svdd.py      scores of where an image's code lies: k-NN distance to the normal class's codes, One-class
               Deep SVDD (Ruff et al.) trained from the autoencoder's encoder, and their mix.
  protocol.py  load a data set (optionally contrast-normalised), train one model per class, score, AUROC
               tables (JSON + markdown), plots.
  stream.py    StreamingDetector: scores mini-batches as they arrive against a moving-average threshold.
"""
from .model import ReconstructionAE
from .scores import auroc, roc_curve, pixel_scores, image_scores, ssim_map
from .stream import StreamingDetector
from .protocol import (CodeScorer, contrast_normalize, load_dataset, merge_results, run_protocol, score_images,
                       train_autoencoder)
from .svdd import DeepSVDD, encode, knn_distance, train_deep_svdd

__all__ = [
    "ReconstructionAE", "auroc", "roc_curve", "pixel_scores", "image_scores", "ssim_map", "StreamingDetector",
    "contrast_normalize", "load_dataset", "merge_results", "run_protocol", "train_autoencoder", "score_images",
    "CodeScorer", "DeepSVDD", "encode", "knn_distance", "train_deep_svdd",
]
