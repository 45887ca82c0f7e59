"""Per-sample augmentation throughput (images/s): fastnets.augment's one fused kernel against torchvision v2
applied image by image (the only way v2 gives every image its own parameters), torchvision v2 on the whole
batch (ONE parameter set for all images: what v2 does with a batched tensor, shown for scale, not a fair
competitor) and kornia's per-sample augmentation when it is importable.

Pipeline (the usual training pipeline): RandomResizedCrop(size), RandomHorizontalFlip, ColorJitter(0.4, 0.4,
0.4), Normalize(ImageNet mean/std), from uint8 NCHW images; fastnets writes bf16 channels_last on a GPU
(float32 NCHW on the CPU), the others float32 NCHW. Sizes: CIFAR-10 (32x32 -> 32x32) and ImageNet-like
(256x256 -> 224x224).

    python benchmarks/bench_augment.py --out benchmarks/results          # on a GPU
    python benchmarks/bench_augment.py --cpu --out benchmarks/results    # CPU numbers (small batches)
Without a GPU and without --cpu it says so and exits 0 (nothing measured).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastnets  # noqa: E402
import fastnets.augment as A  # noqa: E402
from fastnets._timing import time_iterations  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
GPU_SHAPES = [("cifar10", 256, 32, 32), ("imagenet", 128, 256, 224)]
CPU_SHAPES = [("cifar10", 64, 32, 32), ("imagenet", 8, 256, 224)]


def timed(fn, device, reps):
    """Seconds per call of fn: the upper median of `reps` single calls after two warm-up calls."""
    times = sorted(time_iterations(fn, device, warmup=2, iters=1, repeats=reps))
    return times[len(times) // 2]


def variants(device, size):
    out = {}
    g = torch.Generator(device=device).manual_seed(0)
    aug = A.Augment([A.RandomResizedCrop(size), A.RandomHorizontalFlip(), A.ColorJitter(0.4, 0.4, 0.4),
                     A.Normalize(MEAN, STD)],
                    out_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                    memory_format=torch.channels_last if device == "cuda" else torch.contiguous_format, generator=g)
    out["fastnets (fused, per sample)"] = aug
    try:
        from torchvision.transforms import v2

        pipe = v2.Compose([v2.RandomResizedCrop(size, antialias=False), v2.RandomHorizontalFlip(),
                           v2.ColorJitter(0.4, 0.4, 0.4), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(MEAN, STD)])
        out["torchvision v2, per image"] = lambda x: torch.stack([pipe(im) for im in x])
        out["torchvision v2, whole batch (one parameter set)"] = pipe
    except ImportError:
        pass
    try:
        import kornia.augmentation as K

        k = torch.nn.Sequential(K.RandomResizedCrop((size, size)), K.RandomHorizontalFlip(),
                                K.ColorJitter(0.4, 0.4, 0.4, p=1.0), K.Normalize(torch.tensor(MEAN), torch.tensor(STD)))
        k = k.to(device)
        out["kornia (per sample)"] = lambda x: k(x.float() / 255)
    except ImportError:
        pass
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="measure on the CPU (small batches)")
    p.add_argument("--out", default=None, help="directory for augment_<device>.json")
    p.add_argument("--reps", type=int, default=None)
    a = p.parse_args(argv)
    if not a.cpu and not torch.cuda.is_available():
        print("bench_augment: no CUDA GPU visible and --cpu not given: nothing measured")
        return 0
    device = "cpu" if a.cpu else "cuda"
    reps = a.reps or (5 if a.cpu else 50)
    rows = []
    for name, n, src, size in (CPU_SHAPES if a.cpu else GPU_SHAPES):
        x = torch.randint(0, 256, (n, 3, src, src), dtype=torch.uint8, device=device)
        for label, fn in variants(device, size).items():
            sec = timed(lambda: fn(x), device, reps)
            rows.append({"shape": name, "batch": n, "input": [src, src], "output": [size, size], "variant": label,
                         "seconds_per_batch": sec, "images_per_s": n / sec})
            print(f"{name:9s} batch {n:4d} {src}->{size}  {label:48s} {n / sec:12.0f} images/s", flush=True)
    for r in rows:
        base = [q for q in rows if q["shape"] == r["shape"] and q["variant"] == "torchvision v2, per image"]
        if base:
            r["speedup_vs_v2_per_image"] = base[0]["seconds_per_batch"] / r["seconds_per_batch"]
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "backend": fastnets.current_backend(), "rows": rows}
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, f"augment_{device}.json")
        with open(path, "w") as f:
            json.dump(info, f, indent=1)
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
