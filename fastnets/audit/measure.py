"""Measure on a GPU the rows the traffic model predicts: each op case (workload.OPS, forward + backward) and,
with --step, one ResNet-50 training step, fastnets (its Triton kernels: FASTNETS_BACKEND=triton) against eager
PyTorch, with the one timer (fastnets._timing, CUDA events, medians of repeats). The GPU check runs it
(benchmarks/gpu_check.sh, step `traffic`); `python -m fastnets.audit --model-only --measured FILE` then shows
measured beside predicted.

    python -m fastnets.audit.measure --out traffic.json [--step] [--ops bn_relu,conv3x3] [--dry-run]

Writes {"benchmark": "traffic", "rows": [{op, variant: fastnets|eager, ms, ...}]} after every row (a step
stopped at its limit keeps the rows measured so far). --dry-run: batch 2 on the CPU (torch's own kernels on
both sides: the plumbing, not a measurement).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch


def _write(path, rows, env):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"benchmark": "traffic", "environment": env, "rows": rows}, f, indent=1)
    os.replace(tmp, path)


def _time(fn, device, dry):
    from fastnets._timing import time_iterations

    warmup, iters, repeats = (1, 1, 2) if dry else (3, 5, 5)
    return statistics.median(time_iterations(fn, device, warmup, iters, repeats)) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastnets.audit.measure", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--ops", default=None, help="comma-separated op cases (default: all)")
    p.add_argument("--step", action="store_true", help="also a ResNet-50 training step (bf16 channels_last, "
                   "batch 256; compiles every conv variant it needs first)")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("fastnets.audit.measure needs a CUDA GPU (none is visible to torch); nothing was measured")
    os.environ.setdefault("FASTNETS_CONV_TUNE", "fixed")  # no autotuning inside a timed call
    import fastnets
    from fastnets.audit import workload

    device = "cpu" if args.dry_run else "cuda"
    batch = 2 if args.dry_run else workload.BATCH
    dtype, cl = workload.COMBOS["bf16-cl"]
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
           "torch": torch.__version__, "fastnets": fastnets.__version__, "batch": batch,
           "conv_tune": os.environ.get("FASTNETS_CONV_TUNE")}
    names = args.ops.split(",") if args.ops else list(workload.OPS)
    if args.dry_run:
        names = names[:2]
    rows = []
    backend = "auto" if args.dry_run else "triton"
    for name in names:
        sides = ("fastnets",) if name == "augment" else ("fastnets", "eager")
        for side in sides:
            t0 = time.time()
            try:
                mod = workload.op_module(name, device, dtype, cl, fast=side == "fastnets")
                inputs = workload.op_inputs(name, device, dtype, cl, batch)
                for t in inputs:
                    if t.is_floating_point():
                        with torch.no_grad():
                            t.normal_()
                with fastnets.use_backend(backend if side == "fastnets" else "auto"):
                    ms = _time(lambda: workload.op_step(mod, inputs, workload.OPS[name][3]), device, args.dry_run)
                rows.append({"op": name, "family": name, "config": "bf16-cl", "shape": f"batch {batch}",
                             "pass_": "fwd+bwd" if workload.OPS[name][3] else "fwd", "variant": side, "ms": ms,
                             "seconds": round(time.time() - t0, 1)})
            except Exception as e:  # one row's failure is a row, not the end of the step
                rows.append({"op": name, "variant": side, "ms": None, "error": f"{type(e).__name__}: {e}"[:500]})
            _write(args.out, rows, env)
            print(json.dumps(rows[-1]), flush=True)
    if args.step:
        for side in ("eager", "fastnets"):
            try:
                model = workload.build("resnet50", eager=side == "eager")
                model = model.to(device=device, dtype=dtype, memory_format=torch.channels_last).train()
                x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype).to(memory_format=torch.channels_last)
                params = [q for q in model.parameters() if q.requires_grad]

                def one_step():
                    out = model(x)
                    torch.autograd.grad(out, params, torch.ones_like(out))

                with fastnets.use_backend(backend if side == "fastnets" else "auto"):
                    ms = _time(one_step, device, args.dry_run)
                rows.append({"op": "resnet50_step", "family": "resnet50_step", "config": "bf16-cl",
                             "shape": f"batch {batch}", "pass_": "fwd+bwd", "variant": side, "ms": ms})
            except Exception as e:
                rows.append({"op": "resnet50_step", "variant": side, "ms": None, "error": f"{type(e).__name__}: {e}"[:500]})
            _write(args.out, rows, env)
            print(json.dumps(rows[-1]), flush=True)
    failed = [r for r in rows if r.get("ms") is None]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
