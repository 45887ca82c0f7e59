"""`python -m fastnets.bench.cpu_ratios`: same-run CPU ratios fastnets / eager (issue 19's targets).

For each model and mode, eager and fastnets steps are INTERLEAVED (eager repeat, fastnets repeat, ...) so that
a machine whose load changes hits both alike; the ratio is of the medians. fastnets runs in both memory
formats (NCHW and channels_last; eager NCHW as a user runs it) so the layout choice is measured, not assumed.
Writes benchmarks/results/cpu/native_ratios.json and .md (or --out).
"""
import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch

from . import model_specs as M
from . import timing

MODELS = {"lenet5": 64, "resnet18_cifar": 8, "resnet50": 8}
ITERS_SCALE = {"lenet5": 25}  # a LeNet-5 step takes milliseconds: more of them per timed repeat


def _step(model, x, y, mode, precision):
    if mode == "train":
        model.train()
        return timing.train_step_fn(model, x, y, "cpu", precision)
    model.eval()
    return timing.infer_step_fn(model, x, "cpu", precision)


def measure(name, batch, mode, precision, repeats, iters, layouts):
    import fastnets

    eager, fast, why = M.make_pair(name, 0)
    if fast is None:
        return {"model": name, "mode": mode, "status": "unavailable", "reason": why}
    x, y = M.example_batch(name, batch, "cpu")
    fns = {"eager": _step(copy.deepcopy(eager), x, y, mode, precision)}
    for fmt in layouts:
        mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        fns[f"fastnets-{fmt}"] = _step(copy.deepcopy(fast).to(memory_format=mf), x.contiguous(memory_format=mf), y,
                                       mode, precision)
    times = {k: [] for k in fns}
    with fastnets.use_backend("auto"):
        for fn in fns.values():  # warm-up (oneDNN primitive caches, fold caches)
            fn()
            fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                times[k].append((time.perf_counter() - t0) / iters)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"model": name, "mode": mode, "batch": batch, "precision": precision, "status": "ok",
           "images_per_s": {k: batch / v for k, v in med.items()},
           "ms_repeats": {k: [t * 1e3 for t in v] for k, v in times.items()}}
    row["ratio"] = {k: med["eager"] / v for k, v in med.items() if k != "eager"}
    return row


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastnets.bench.cpu_ratios", description=__doc__)
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--modes", nargs="*", default=["train", "infer"])
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--layouts", nargs="*", default=["contiguous", "channels_last"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu", "native_ratios"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = []
    for name in a.models:
        for mode in a.modes:
            row = measure(name, MODELS[name], mode, a.precision, a.repeats, a.iters * ITERS_SCALE.get(name, 1),
                          a.layouts)
            rows.append(row)
            if row["status"] == "ok":
                print(name, mode, " ".join(f"{k} {v:.3f}x" for k, v in row["ratio"].items()), flush=True)
            else:
                print(name, mode, row["status"], row.get("reason"), flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
            "loadavg_start": load, "loadavg_end": os.getloadavg()[0], "repeats": a.repeats, "iters": a.iters,
            "precision": a.precision, "mkldnn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported()}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"CPU ratios fastnets/eager (same run, interleaved, median of {a.repeats} repeats x {a.iters} steps; "
             f"{a.precision}; {meta['threads']} threads; load average {load:.1f} -> {meta['loadavg_end']:.1f})", "",
             "| model | mode | eager img/s | " + " | ".join(f"fastnets {f} (ratio)" for f in a.layouts) + " |",
             "|---|---|---|" + "---|" * len(a.layouts)]
    for r in rows:
        if r["status"] != "ok":
            continue
        ips = r["images_per_s"]
        cells = [f"{ips['fastnets-' + f]:.1f} ({r['ratio']['fastnets-' + f]:.2f}x)" for f in a.layouts]
        lines.append(f"| {r['model']} | {r['mode']} | {ips['eager']:.1f} | " + " | ".join(cells) + " |")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
