"""CIFAR-10 training with and without augmentation at the same budget: the benchmark's training loop
(fastnets/bench/train.py: SGD Nesterov, warm-up then linear decay, same seed, same initial weights, same
data order) run once per augmentation mode, reporting test accuracy and training time per epoch.

    python -m fastnets.bench.augment_training --data ../shared/data --epochs 4 --max-train-images 10000

Modes: "none" (normalisation only) and "fastnets" (random 32x32 crop of the image padded by 4 + horizontal
flip, drawn per batch on the device by fastnets.augment, fused with the normalisation; its time is part of
the training time, as in a real loop); "v2" (the benchmark's default: torchvision v2 per image, once per
epoch, its time reported apart) on request. Model: `--model small_resnet` (the default), a ResNet-8 of He
et al. 2016's CIFAR family (16-32-64 channels, one BasicBlock per stage, fastnets' fused blocks) that a CPU
trains in minutes, or any trainable model of the benchmark (resnet18_cifar, ...; `fastnets.bench` itself
takes `--train-augment` too).
"""
import argparse
import os
import sys
import time

import torch
from torch import nn

MODES = ("none", "fastnets", "v2")


class SmallResNet(nn.Module):
    """ResNet-8 for 32x32 images: a 3x3 stem, one fastnets BasicBlock per stage (widths, strides 1, 2, 2, ...),
    global average pooling and a linear classifier; fastnets' fused Conv-BN[-add]-ReLU throughout."""

    def __init__(self, widths=(16, 32, 64), num_classes=10, in_channels=3):
        super().__init__()
        from fastnets.models._common import init_conv_bn_linear
        from fastnets.models.resnet import BasicBlock, conv1x1, conv3x3
        from fastnets.nn.batch_norm import BatchNorm2d

        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be positive channel counts, got {widths}")
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = BatchNorm2d(widths[0])
        layers, prev = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or prev != w:
                down = nn.Sequential(conv1x1(prev, w, stride), BatchNorm2d(w))
            layers.append(BasicBlock(prev, w, stride, down))
            prev = w
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        init_conv_bn_linear(self)

    def forward(self, x):
        from fastnets.nn.conv import conv_bn_act

        x = conv_bn_act(self.conv1, self.bn1, x, relu=True)
        x = self.layers(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _subset(split, cap, seed):
    from .datasets import Split

    if cap is None or cap >= len(split):
        return split
    keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:cap].sort().values
    return Split(split.x[keep], split.y[keep], split.source)


def compare(dataset, modes=("none", "fastnets"), model="small_resnet", epochs=4, batch_size=128, seed=0,
            device="cpu", precision="fp32", show_progress=False):
    """One train_run row per mode (same model, seed, order, epochs, batch): test accuracy, train_s, history,
    plus seconds_per_epoch. `dataset`: a fastnets.bench.datasets.Dataset (CIFAR-10, or any 3-channel
    32x32 one)."""
    from . import train as TR

    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty list of {MODES}, got {list(modes)}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2, got {batch_size}")
    build = None
    if model == "small_resnet":
        def build(s, dev):
            torch.manual_seed(s)
            return SmallResNet(num_classes=dataset.num_classes).to(dev), torch.contiguous_format
    rows = []
    for mode in modes:
        data = TR.AugmentedEpochs(dataset, device, seed, augment=mode, show_progress=show_progress)
        t0 = time.perf_counter()
        row = TR.train_run(model, "fastnets", data, dataset, device=device, precision=precision, epochs=epochs,
                           batch_size=batch_size, seed=seed, fastnets_layout="contiguous",
                           show_progress=show_progress, build=build)
        row.pop("_model", None)
        row["wall_s"] = time.perf_counter() - t0
        row["augment_mode"] = mode
        if mode == "v2":
            row["augmentation_s_outside_training"] = data.aug_s
        if row["status"] == "ok":
            row["seconds_per_epoch"] = row["train_s"] / epochs
        rows.append(row)
    return rows


def markdown(report):
    s = report["settings"]
    lines = [f"CIFAR-10, {s['model']}, {s['epochs']} epochs, batch {s['batch_size']}, {s['train_images']:,} training / "
             f"{s['test_images']:,} test images, seed {s['seed']}, {s['device']} ({s['threads']} torch thread(s)):", "",
             "| augmentation | test accuracy (%) | training s / epoch | per-epoch test accuracy (%) |",
             "|---|---|---|---|"]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['augmentation']} | {r['status']}: {r.get('reason', '')} | | |")
            continue
        hist = ", ".join(f"{h['test_accuracy'] * 100:.1f}" for h in r["history"])
        lines.append(f"| {r['augmentation']} | {r['test_accuracy'] * 100:.1f} | {r['seconds_per_epoch']:.0f} | {hist} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastnets.bench.augment_training", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.environ.get("FASTNETS_DATA"), help="folder holding cifar10_jpeg.npz")
    p.add_argument("--modes", default="none,fastnets", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--model", default="small_resnet", help="small_resnet or a trainable benchmark model")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-train-images", type=int, default=None, help="a fixed random subset of the training set")
    p.add_argument("--max-test-images", type=int, default=None, help="a fixed random subset of the test set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="fastnets-bench-results")
    a = p.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes takes a comma-separated list of {', '.join(MODES)}, got {a.modes!r}")
    if a.epochs < 1:
        p.error(f"--epochs must be >= 1, got {a.epochs}")
    if a.batch_size < 2:
        p.error(f"--batch-size must be >= 2, got {a.batch_size}")
    for flag, v in (("--max-train-images", a.max_train_images), ("--max-test-images", a.max_test_images)):
        if v is not None and v < 1:
            p.error(f"{flag} must be >= 1, got {v}")
    if a.threads is not None:
        if a.threads < 1:
            p.error(f"--threads must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    if a.model != "small_resnet":
        from .model_specs import TRAIN_MODELS

        if a.model not in TRAIN_MODELS or a.model == "lenet5":
            p.error(f"--model must be small_resnet or one of {', '.join(m for m in TRAIN_MODELS if m != 'lenet5')}, "
                    f"got {a.model!r}")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from .datasets import DataError, load_cifar10

    try:
        ds = load_cifar10(a.data, device=device)
    except DataError as e:
        p.error(f"--data: {e}")
    ds.train = _subset(ds.train, a.max_train_images, a.seed)
    ds.test = _subset(ds.test, a.max_test_images, a.seed)
    rows = compare(ds, modes, a.model, a.epochs, a.batch_size, a.seed, device,
                   precision="bf16" if device.startswith("cuda") else "fp32")
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    report = {"kind": "augment-training", "rows": rows, "settings": {
        "model": a.model, "epochs": a.epochs, "batch_size": a.batch_size, "train_images": len(ds.train),
        "test_images": len(ds.test), "seed": a.seed, "device": device, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "load_average_at_end": load}}
    from .report import write_json_and_markdown

    tag = "cuda" if device.startswith("cuda") else "cpu"
    write_json_and_markdown(report, a.out, f"augment-training_{tag}", markdown)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
