"""`python -m fastnets.bench --augment`: images/s of per-sample augmentation, fastnets' fused kernel against
the per-sample alternatives, at CIFAR-10 and ImageNet sizes.

The pipeline (the usual training one, every image its own parameters): RandomResizedCrop(size) (scale
0.08-1, ratio 3/4-4/3), RandomHorizontalFlip(0.5), ColorJitter(brightness, contrast, saturation 0.4),
Normalize (ImageNet mean/std), from a uint8 (N, 3, H, W) batch already on the device, to float32 NCHW (or
bf16 channels_last for fastnets on a GPU, the model's input; --fastnets-out fp32 to compare like for like).

Variants, each timed on the same input batch, interleaved round by round, median of the rounds:
  fastnets          fastnets.augment.Augment: one kernel (Triton on a GPU; on the CPU its torch reference
                    path: grid_sample and colour ops as separate torch ops)
  tv2-per-image     torchvision.transforms.v2 applied image by image and stacked: v2's only way to give
                    every image its own parameters (the per-sample baseline; speedups are against it)
  tv2-batch         v2 on the whole batch tensor: ONE parameter set for all images (pytorch/vision#8484);
                    shown for scale, it is not the same augmentation
  kornia            kornia.augmentation (per sample), when kornia is importable (an optional benchmark
                    dependency: `pip install kornia`)
  dali              NVIDIA DALI (random_resized_crop, color_twist, crop_mirror_normalize; its GPU operators
                    on a GPU, its CPU operators on the CPU), when nvidia.dali is importable (the pip wheels
                    nvidia-dali-cuda120/130; optional), otherwise reported as unavailable with the reason

Sizes: cifar10 = 32x32 -> 32x32, imagenet = 256x256 -> 224x224 (the crop from a larger source).
"""
import importlib.util
import os
import sys
import time

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# name: (source side, output side, batch on a GPU, batch on the CPU)
SIZES = {"cifar10": (32, 32, 512, 64), "imagenet": (256, 224, 128, 8)}
VARIANTS = ("fastnets", "tv2-per-image", "tv2-batch", "kornia", "dali")
BASELINE = "tv2-per-image"


class Unavailable(Exception):
    """A variant that cannot run here; the message says why."""


def _fastnets(device, size, out_dtype, seed):
    import torch

    import fastnets.augment as A

    cuda = torch.device(device).type == "cuda"
    g = torch.Generator(device=device).manual_seed(seed)
    aug = A.Augment([A.RandomResizedCrop(size), A.RandomHorizontalFlip(), A.ColorJitter(0.4, 0.4, 0.4),
                     A.Normalize(list(MEAN), list(STD))], out_dtype=out_dtype,
                    memory_format=torch.channels_last if cuda and out_dtype == torch.bfloat16 else torch.contiguous_format,
                    generator=g)
    return aug, f"fastnets.augment, one fused kernel ({'Triton' if cuda else 'CPU: torch reference path'}), " \
                f"out {str(out_dtype).replace('torch.', '')}"


def _tv2(size):
    import torch
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, antialias=False), v2.RandomHorizontalFlip(),
                       v2.ColorJitter(0.4, 0.4, 0.4), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(MEAN), list(STD))])


def _kornia(device, size):
    if importlib.util.find_spec("kornia") is None:
        raise Unavailable("kornia is not installed (`pip install kornia`, an optional benchmark dependency)")
    import kornia
    import kornia.augmentation as K
    import torch

    k = torch.nn.Sequential(K.RandomResizedCrop((size, size)), K.RandomHorizontalFlip(),
                            K.ColorJitter(0.4, 0.4, 0.4, p=1.0),
                            K.Normalize(torch.tensor(MEAN), torch.tensor(STD))).to(device)
    return (lambda x: k(x.float().div_(255))), f"kornia {kornia.__version__} augmentation, per sample, float32 in"


def _dali(device, size, n, src):
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        raise Unavailable("NVIDIA DALI is not installed (pip wheels nvidia-dali-cuda120/130; an optional benchmark "
                          "dependency)")
    import nvidia.dali
    import torch
    from nvidia.dali import fn, pipeline_def, types

    cuda = torch.device(device).type == "cuda"
    holder = {}

    @pipeline_def(batch_size=n, num_threads=max(1, torch.get_num_threads()),
                  device_id=torch.cuda.current_device() if cuda else None, seed=0)
    def pipe():
        imgs = fn.external_source(source=lambda: holder["x"], device="gpu" if cuda else "cpu", layout="HWC",
                                  batch=True)
        imgs = fn.random_resized_crop(imgs, size=(size, size), random_area=(0.08, 1.0),
                                      random_aspect_ratio=(3 / 4, 4 / 3), antialias=False)
        imgs = fn.color_twist(imgs, brightness=fn.random.uniform(range=(0.6, 1.4)),
                              contrast=fn.random.uniform(range=(0.6, 1.4)),
                              saturation=fn.random.uniform(range=(0.6, 1.4)))
        return fn.crop_mirror_normalize(imgs, dtype=types.FLOAT, output_layout="CHW", mirror=fn.random.coin_flip(),
                                        mean=[255 * m for m in MEAN], std=[255 * s for s in STD])

    p = pipe()
    p.build()

    def run(x):
        # DALI takes a batch of HWC images; the output goes back into a torch tensor (counted in the time)
        hwc = x.permute(0, 2, 3, 1).contiguous()
        holder["x"] = hwc if cuda else hwc.numpy()
        (out,) = p.run()
        if cuda:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = out.as_tensor()
            res = torch.empty(t.shape(), dtype=torch.float32, device=device)
            feed_ndarray(t, res, cuda_stream=torch.cuda.current_stream())
            return res
        return torch.from_numpy(out.as_array())

    where = "GPU operators" if cuda else "CPU operators"
    return run, (f"NVIDIA DALI {nvidia.dali.__version__} ({where}: random_resized_crop, color_twist, "
                 f"crop_mirror_normalize), per sample")


def build_variants(device, size, n, src, out_dtype, seed=0, only=None):
    """{variant: (callable, description) or Unavailable}."""
    out = {}
    for name in only or VARIANTS:
        try:
            if name == "fastnets":
                out[name] = _fastnets(device, size, out_dtype, seed)
            elif name == "tv2-per-image":
                t = _tv2(size)
                out[name] = ((lambda x, t=t: __import__("torch").stack([t(im) for im in x])),
                             "torchvision v2, image by image, stacked")
            elif name == "tv2-batch":
                out[name] = (_tv2(size), "torchvision v2 on the batch tensor: one parameter set for all images")
            elif name == "kornia":
                out[name] = _kornia(device, size)
            elif name == "dali":
                out[name] = _dali(device, size, n, src)
            else:
                raise ValueError(f"variants: unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        except Unavailable as e:
            out[name] = e
        except ImportError as e:
            out[name] = Unavailable(f"import failed: {e}")
    return out


def _sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(device="cpu", sizes=("cifar10", "imagenet"), batch=None, rounds=5, warmup=2, variants=None,
            out_dtype=None, seed=0):
    """Rows {size, batch, input, output, variant, images_per_s, seconds_per_batch (median), ...}; variants
    are timed interleaved (one call of each per round) so that a change of machine load hits all alike."""
    import torch

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        raise ValueError(f"sizes: unknown size(s) {bad}; known: {', '.join(SIZES)}")
    cuda = torch.device(device).type == "cuda"
    if out_dtype is None:
        out_dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for size_name in sizes:
        src, size, gpu_batch, cpu_batch = SIZES[size_name]
        n = batch or (gpu_batch if cuda else cpu_batch)
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 256, (n, 3, src, src), dtype=torch.uint8, generator=g).to(device)
        built = build_variants(device, size, n, src, out_dtype, seed, variants)
        runnable = {k: v for k, v in built.items() if not isinstance(v, Exception)}
        times = {k: [] for k in runnable}
        for k, (fn, _) in runnable.items():
            for _ in range(warmup):
                fn(x)
        _sync(device)
        for _ in range(rounds):
            for k, (fn, _) in runnable.items():
                _sync(device)
                t0 = time.perf_counter()
                y = fn(x)
                _sync(device)
                times[k].append(time.perf_counter() - t0)
                if y.shape != (n, 3, size, size):
                    raise RuntimeError(f"{k} returned shape {tuple(y.shape)}, expected {(n, 3, size, size)}")
        base = None
        if BASELINE in times:
            base = sorted(times[BASELINE])[len(times[BASELINE]) // 2]
        for k, v in built.items():
            row = {"size": size_name, "batch": n, "input": [src, src], "output": [size, size], "variant": k}
            if isinstance(v, Exception):
                row.update(status="unavailable", reason=str(v))
            else:
                ts = sorted(times[k])
                med = ts[len(ts) // 2]
                row.update(status="ok", description=v[1], seconds_per_batch=med, images_per_s=n / med,
                           min_seconds=ts[0], max_seconds=ts[-1], rounds=rounds,
                           speedup_vs_tv2_per_image=None if base is None else base / med)
            rows.append(row)
    return rows


def environment(device):
    import platform

    import torch

    import fastnets

    cuda = torch.device(device).type == "cuda"
    env = {"device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})",
           "torch": torch.__version__, "fastnets_backend": fastnets.current_backend(),
           "torch_threads": torch.get_num_threads(), "cpu_cores": os.cpu_count()}
    try:
        env["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return env


def markdown(report):
    lines = ["| size | batch | variant | images/s | x tv2 per image | note |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        shape = f"{r['size']} {r['input'][0]}->{r['output'][0]}"
        if r["status"] == "ok":
            sp = r["speedup_vs_tv2_per_image"]
            lines.append(f"| {shape} | {r['batch']} | {r['variant']} | {r['images_per_s']:,.0f} | "
                         f"{'' if sp is None else f'{sp:.2f}'} | {r['description']} |")
        else:
            lines.append(f"| {shape} | {r['batch']} | {r['variant']} | - | - | unavailable: {r['reason']} |")
    env = report["environment"]
    lines += ["", f"{env['device']}, torch {env['torch']}, {env['torch_threads']} torch thread(s), load average at "
              f"start {', '.join(f'{v:.2f}' for v in env.get('load_average', []))}; median of "
              f"{report['settings']['rounds']} interleaved rounds."]
    return "\n".join(lines) + "\n"


def check_args(args):
    """The --augment arguments' problems, each naming its flag (empty when all is well)."""
    problems = []
    if args.batch_size is not None and args.batch_size < 1:
        problems.append(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.repeats is not None and args.repeats < 1:
        problems.append(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup is not None and args.warmup < 0:
        problems.append(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads must be >= 1, got {args.threads}")
    sizes = [s.strip() for s in (args.augment_sizes or ",".join(SIZES)).split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        problems.append(f"--augment-sizes takes a comma-separated list of {', '.join(SIZES)}, got {args.augment_sizes!r}")
    if args.device is not None and args.device.split(":")[0] not in ("cpu", "cuda"):
        problems.append(f"--device must be cpu or cuda, got {args.device!r}")
    return problems, sizes


def main(args, parser=None):
    """Run from `python -m fastnets.bench --augment` with the parsed arguments (device, out, batch_size,
    repeats, warmup, threads, seed, augment_sizes); writes augment-throughput_<device>.json and .md into
    args.out. Bad arguments: parser.error naming the flag (exit 2), or ValueError without a parser."""
    import torch

    problems, sizes = check_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not problems and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA GPU is visible to torch")
    if problems:
        if parser is not None:
            parser.error("; ".join(problems))
        raise ValueError("; ".join(problems))
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.repeats or 5
    rows = measure(device, sizes=sizes, batch=args.batch_size, rounds=rounds,
                   warmup=2 if args.warmup is None else args.warmup, seed=args.seed)
    report = {"kind": "augment-throughput", "environment": environment(device), "rows": rows,
              "settings": {"device": device, "sizes": sizes, "batch": args.batch_size, "rounds": rounds,
                           "pipeline": "RandomResizedCrop + RandomHorizontalFlip + ColorJitter(0.4, 0.4, 0.4) + "
                                       "Normalize, uint8 input on the device"}}
    from .report import write_json_and_markdown

    tag = "cuda" if torch.device(device).type == "cuda" else "cpu"
    write_json_and_markdown(report, args.out, f"augment-throughput_{tag}", markdown)
    return 0
