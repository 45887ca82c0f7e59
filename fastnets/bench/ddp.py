"""`torchrun --nproc_per_node=N -m fastnets.bench --ddp`: data-parallel training throughput with SyncBatchNorm.

For each model (`--models`: the bench's models or tiny_cnn; default resnet50 on GPUs, tiny_cnn on CPU),
the eager (torchvision) network with its BatchNorms converted by fastnets.nn.SyncBatchNorm's
convert_sync_batchnorm, trained under DistributedDataParallel on synthetic batches of `--batch-size`
images per rank, reports:
  * images/s per GPU (rank) and in total, at N ranks;
  * the same model on one rank alone (SyncBatchNorm over a one-rank group, i.e. fastnets' single-GPU
    BatchNorm, no DDP), and the scaling efficiency = (images/s per rank at N) / (images/s on one rank);
  * SyncBatchNorm time per training step: every SyncBatchNorm layer of the model timed alone (forward and
    backward, at the input shapes it sees in the model, collectives included), fastnets' against
    torch.nn.SyncBatchNorm's (CUDA only: torch's SyncBatchNorm kernels do not run on CPU);
  * the whole DDP training step with torch.nn.SyncBatchNorm instead (CUDA only).
NCCL on GPUs (one per rank, LOCAL_RANK), gloo on CPU. Rank 0 prints a table and writes ddp.json to --out.
Without torchrun it runs as a world of one.
"""
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from .timing import autocast, loss_fn

CPU_DEFAULT = dict(models=["tiny_cnn"], batch=8, warmup=1, iters=2, repeats=2)
TINY = "tiny_cnn"  # conv-BN-ReLU x 2 on 1x28x28 (CPU smoke runs and tests), besides the bench's models


def _tiny_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def _build(name, batch, device, generator):
    from .model_specs import build_eager, example_batch, spec

    if name == TINY:
        x = torch.randn(batch, 1, 28, 28, device=device, generator=generator)
        return _tiny_cnn(), x, torch.randint(0, 10, (batch,), device=device, generator=generator)
    spec(name)
    eager = build_eager(name)
    return (eager,) + tuple(example_batch(name, batch, device, generator=generator))
GPU_DEFAULT = dict(models=["resnet50"], batch=64, warmup=3, iters=10, repeats=3)


def _init(device_arg):
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29511")):
        os.environ.setdefault(k, v)
    cuda = (device_arg or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": device} if cuda else {}))
    return device


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, warmup, iters, repeats):
    """Median seconds per call of fn() over `repeats` timed runs of `iters` calls (all ranks in step)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def _train_step(model, x, y, device, precision):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        with autocast(device, precision):
            out = model(x)
        loss_fn(out, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _bn_input_shapes(model, x, device, precision):
    """(layer, input shape, dtype) of every SyncBatchNorm layer, from one training forward."""
    from ..nn import SyncBatchNorm

    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append((m, a[0].shape, a[0].dtype)))
             for m in model.modules() if isinstance(m, SyncBatchNorm)]
    with autocast(device, precision):
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _syncbn_ms(layers, device, cls, warmup, iters, repeats, channels_last):
    """Milliseconds of forward + backward of every layer in `layers`, each as a `cls` SyncBatchNorm."""
    total = 0.0
    for m, shape, dtype in layers:
        bn = cls(m.num_features, eps=m.eps, momentum=m.momentum).to(device)
        x = torch.randn(shape, device=device, dtype=dtype)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        g = torch.randn_like(x)

        def fb():
            bn(x).backward(g)

        total += _time(fb, device, warmup, iters, repeats)
    return total * 1e3


def run(models, batch, precision, warmup, iters, repeats, device_arg=None, channels_last=None):
    from ..nn import SyncBatchNorm

    device = _init(device_arg)
    rank, world = dist.get_rank(), dist.get_world_size()
    cl = device.type == "cuda" if channels_last is None else channels_last
    solo_group = dist.new_group([0])  # every rank must create it; only rank 0 uses it
    rows = []
    for name in models:
        torch.manual_seed(0)
        eager, x, y = _build(name, batch, device, torch.Generator(device=device).manual_seed(1 + rank))
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        fmt = {"memory_format": torch.channels_last} if cl else {}
        model = SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(eager)).to(device, **fmt)
        n_bn = sum(isinstance(m, SyncBatchNorm) for m in model.modules())
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        step_s = _time(_train_step(ddp, x, y, device, precision), device, warmup, iters, repeats)
        layers = _bn_input_shapes(model, x, device, precision)
        fast_bn_ms = _syncbn_ms(layers, device, SyncBatchNorm, warmup, iters, repeats, cl)
        torch_bn_ms = torch_step_s = None
        if device.type == "cuda":
            tmodel = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(eager)).to(device, **fmt)
            tddp = nn.parallel.DistributedDataParallel(tmodel, device_ids=[device.index])
            torch_step_s = _time(_train_step(tddp, x, y, device, precision), device, warmup, iters, repeats)
            torch_bn_ms = _syncbn_ms(layers, device, nn.SyncBatchNorm, warmup, iters, repeats, cl)
        # one rank alone: the same network, its SyncBatchNorms over a one-rank group (single-GPU BatchNorm)
        solo_s = None
        if rank == 0:
            solo = SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(eager), solo_group).to(device, **fmt)
            step = _train_step(solo, x, y, device, precision)
            for _ in range(warmup):
                step()
            times = []
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(iters):
                    step()
                _sync(device)
                times.append((time.perf_counter() - t0) / iters)
            solo_s = statistics.median(times)
        dist.barrier()
        per_rank = batch / step_s
        rows.append({
            "model": name, "world_size": world, "batch_per_rank": batch, "precision": precision,
            "device": str(device.type), "backend": dist.get_backend(), "syncbn_layers": n_bn,
            "step_ms": step_s * 1e3, "images_per_s_per_rank": per_rank, "images_per_s_total": per_rank * world,
            "one_rank_images_per_s": None if solo_s is None else batch / solo_s,
            "scaling_efficiency": None if solo_s is None else per_rank / (batch / solo_s),
            "syncbn_ms_per_step_fastnets": fast_bn_ms, "syncbn_ms_per_step_torch": torch_bn_ms,
            "torch_syncbn_step_ms": None if torch_step_s is None else torch_step_s * 1e3,
        })
    return rows


def _fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)


def print_table(rows, file=sys.stdout):
    print(f"{'model':<16} {'ranks':>5} {'batch/rank':>10} {'img/s/rank':>10} {'img/s total':>11} "
          f"{'1-rank img/s':>12} {'scaling':>7} {'SyncBN ms/step':>14} {'torch SyncBN':>12} {'torch step ms':>13}",
          file=file)
    for r in rows:
        print(f"{r['model']:<16} {r['world_size']:>5} {r['batch_per_rank']:>10} {_fmt(r['images_per_s_per_rank']):>10} "
              f"{_fmt(r['images_per_s_total']):>11} {_fmt(r['one_rank_images_per_s']):>12} "
              f"{_fmt(r['scaling_efficiency'], '.0%'):>7} {_fmt(r['syncbn_ms_per_step_fastnets'], '.2f'):>14} "
              f"{_fmt(r['syncbn_ms_per_step_torch'], '.2f'):>12} {_fmt(r['torch_syncbn_step_ms']):>13}", file=file)
    print("scaling = images/s per rank at this world size / images/s of one rank alone; SyncBN ms/step = every "
          "SyncBatchNorm layer's forward+backward at its shapes in the model, collectives included; torch's "
          "SyncBatchNorm runs on CUDA only", file=file)


def main(args):
    """Entry from `python -m fastnets.bench --ddp` (the bench's parsed arguments)."""
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    d = GPU_DEFAULT if cuda else CPU_DEFAULT
    models = [m.strip() for m in args.models.split(",")] if args.models and args.models not in ("all", "none") else d["models"]
    precision = args.precision or ("bf16" if cuda else "fp32")
    if not cuda:
        torch.set_num_threads(args.threads or 1)
    rows = run(models, args.batch_size or d["batch"], precision,
               d["warmup"] if args.warmup is None else args.warmup, args.iters or d["iters"],
               args.repeats or d["repeats"], device_arg=args.device,
               channels_last=None if args.fastnets_layout is None else args.fastnets_layout == "channels_last")
    if dist.get_rank() == 0:
        print_table(rows)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "ddp.json")
        with open(path, "w") as f:
            json.dump({"ddp": rows}, f, indent=1)
        print(f"wrote:\n  {path}")
    dist.destroy_process_group()
    return 0
