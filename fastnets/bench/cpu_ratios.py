"""Same-run CPU ratios fastnets / eager (issue 19's targets): the CPU profile's throughput phase
(`python -m fastnets.bench` without a GPU) and `python -m fastnets.bench.cpu_ratios` on its own.

On a CPU, and more so on a shared one, two backends timed one after the other see different machines. Here
every variant of one model and mode is built first, then timed INTERLEAVED: repeat r runs `iters` steps of each
variant in turn (the order reversed on every other repeat), so that a change in load hits all alike; each
variant's figure is the median over the repeats, and the ratios are of those medians. Each repeat is timed
twice: wall clock (perf_counter, what images/s means) and the process's CPU time (process_time), which a busy
machine disturbs less (time spent descheduled does not count); the spread of the repeats and the load average
before and after each block are recorded with it.

Variants: eager (the torch.nn / torchvision model, NCHW, as a user runs it), fastnets in NCHW and in
channels_last (the layout is a measured decision per model and mode, recorded in the row: `layout_decision`),
torch.compile of the eager model and fastnets + torch.compile (NCHW, inductor's CPU backend), and
eager-channels-last when asked for.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import time

import torch

from . import model_specs as M
from . import timing

MODELS = {"lenet5": 64, "resnet18_cifar": 8, "resnet50": 8}
ITERS = {"lenet5": 10}  # steps per timed repeat (a LeNet-5 step takes milliseconds); 1 for the others
TARGETS = {"train": 1.0, "infer": 1.15}  # fastnets / eager, issue 19
LAYOUTS = ("contiguous", "channels_last")


def load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _prepared(variant, eager, fast):
    """(model, memory format) of `variant`: a fresh copy, compiled where asked."""
    if variant.startswith("fastnets"):
        if fast is None:
            raise M.FastnetsUnavailable("no fastnets model")
        base = fast
    else:
        base = eager
    cl = variant in ("fastnets-channels_last", "eager-channels-last")
    fmt = torch.channels_last if cl else torch.contiguous_format
    model = copy.deepcopy(base).to(memory_format=fmt)
    if variant in ("compile", "fastnets-compile"):
        model = torch.compile(model)
    return model, fmt


def _step(variant, eager, fast, name, batch, mode, precision):
    model, fmt = _prepared(variant, eager, fast)
    x, y = M.example_batch(name, batch, "cpu", generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=fmt)
    if mode == "train":
        model.train()
        return timing.train_step_fn(model, x, y, "cpu", precision)
    model.eval()
    return timing.infer_step_fn(model, x, "cpu", precision)


def _stats(times):
    med = statistics.median(times)
    return med, (max(times) - min(times)) / med if med > 0 else None


def measure(name, batch, mode, precision, variants, repeats, iters, warmup=2, eager=None, fast=None, why=None):
    """One interleaved block: {variant: result} for model `name` in `mode`, and the block's metadata."""
    import fastnets

    if eager is None:
        eager, fast, why = M.make_pair(name, 0)
    meta = {"model": name, "mode": mode, "batch_size": batch, "precision": precision, "repeats": repeats,
            "iters": iters, "warmup": warmup, "threads": torch.get_num_threads(), "load_before": load_average(),
            "uptime_before": uptime()}
    fns, out = {}, {}
    with fastnets.use_backend("auto"):
        for v in variants:
            t0 = time.perf_counter()
            try:
                fn = _step(v, eager, fast, name, batch, mode, precision)
                for _ in range(warmup):  # oneDNN primitive and fold caches; torch.compile compiles here
                    fn()
                fns[v] = fn
                out[v] = {"status": "ok", "warmup_s": time.perf_counter() - t0}
            except M.FastnetsUnavailable as e:
                out[v] = {"status": "unavailable", "reason": why or str(e)}
            except Exception as e:  # noqa: BLE001 - one variant failing must not stop the block
                msg = str(e).splitlines()[0][:300] if str(e) else ""
                out[v] = {"status": "error", "reason": f"{type(e).__name__}: {msg}"}
        wall = {v: [] for v in fns}
        cpu = {v: [] for v in fns}
        order = list(fns)
        for r in range(repeats):
            for v in (order if r % 2 == 0 else order[::-1]):
                fn = fns[v]
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(iters):
                    fn()
                wall[v].append((time.perf_counter() - t0) / iters)
                cpu[v].append((time.process_time() - c0) / iters)
    meta["load_after"] = load_average()
    meta["uptime_after"] = uptime()
    for v in fns:
        med, spread = _stats(wall[v])
        cmed, cspread = _stats(cpu[v])
        out[v].update(images_per_s=batch / med, ms_per_iter=med * 1e3, ms_per_iter_repeats=[t * 1e3 for t in wall[v]],
                      spread=spread, cpu_ms_per_iter=cmed * 1e3, cpu_ms_per_iter_repeats=[t * 1e3 for t in cpu[v]],
                      cpu_spread=cspread)
    base = out.get("eager", {})
    for v, r in out.items():
        if r["status"] == "ok" and base.get("status") == "ok" and v != "eager":
            r["vs_eager"] = base["ms_per_iter"] / r["ms_per_iter"]
            r["vs_eager_cpu"] = base["cpu_ms_per_iter"] / r["cpu_ms_per_iter"]
    return out, meta


def _variants(backends, layouts):
    vs = []
    for b in backends:
        if b == "fastnets":
            vs += [f"fastnets-{f}" for f in layouts]
        else:
            vs.append(b)
    return vs


def rows_from_block(out, meta, device="cpu"):
    """Throughput rows (the bench report's format) of one block: one per backend; `fastnets` is the faster of
    its measured layouts, both kept under `layouts` with the decision."""
    rows = []
    common = {k: meta[k] for k in ("model", "mode", "batch_size", "precision")}
    common.update(device=device, interleaved=True, repeats=meta["repeats"], iters=meta["iters"],
                  warmup=meta["warmup"], threads=meta["threads"], load_before=meta["load_before"],
                  load_after=meta["load_after"])
    fast = {v.split("-", 1)[1]: r for v, r in out.items() if v in ("fastnets-contiguous", "fastnets-channels_last")}
    for v, r in out.items():
        if v in ("fastnets-contiguous", "fastnets-channels_last"):
            continue
        fmt = "channels_last" if v == "eager-channels-last" else "contiguous"
        rows.append(dict(common, backend=v, memory_format=fmt, **r))
    if fast:
        ok = {f: r for f, r in fast.items() if r["status"] == "ok"}
        if ok:
            chosen = min(ok, key=lambda f: ok[f]["ms_per_iter"])
            decision = {"chosen": chosen, "by": "median wall time, same run",
                        "images_per_s": {f: r["images_per_s"] for f, r in ok.items()},
                        "vs_eager": {f: r.get("vs_eager") for f, r in ok.items()}}
            rows.append(dict(common, backend="fastnets", memory_format=chosen, layout_decision=decision,
                             layouts={f: {k: x for k, x in r.items()} for f, r in fast.items()}, **ok[chosen]))
        else:
            r = next(iter(fast.values()))
            rows.append(dict(common, backend="fastnets", **r))
    order = {"eager": 0, "eager-channels-last": 1, "compile": 2, "fastnets": 3, "fastnets-compile": 4}
    return sorted(rows, key=lambda r: order.get(r["backend"], 9))


def measure_throughput(report, plan, pairs, settings, budget, desc, show_progress):
    """The bench's throughput phase on a CPU (fastnets/bench/__main__.py hands it over): interleaved blocks,
    one per (model, mode), the backends of `plan` side by side."""
    from .progress import progress_bar

    if not settings["modes"] or not plan:
        return
    layouts = LAYOUTS if settings.get("fastnets_layout_measured", True) else (settings["fastnets_layout"],)
    tasks = [(m, bs, mode) for m, bs in plan for mode in settings["modes"]]
    info = report["run"].setdefault("cpu_interleaved", {
        "method": "variants of one (model, mode) timed interleaved, median of repeats; ratios of medians; wall "
                  "clock and process CPU time", "blocks": []})
    for name, backends, mode in progress_bar(tasks, desc=desc, disable=not show_progress):
        variants = _variants(backends, layouts)
        if not budget.allows(5 * len(variants)):
            report["throughput"] += [{"model": name, "backend": b, "mode": mode, "status": "skipped",
                                      "batch_size": settings["batch_size"][name], "device": "cpu",
                                      "precision": settings["precision"],
                                      "reason": f"time budget of {settings['time_budget_s']} s"} for b in backends]
            continue
        only = settings.get("compile_models")
        if only is not None and name not in only:
            for v in [v for v in variants if v in ("compile", "fastnets-compile")]:
                variants.remove(v)
                report["throughput"].append({"model": name, "backend": v, "mode": mode, "status": "skipped",
                                             "batch_size": settings["batch_size"][name], "device": "cpu",
                                             "precision": settings["precision"],
                                             "reason": "torch.compile of this model takes many minutes on a small "
                                                       "CPU; not in the profile's compile_models (ask with --models "
                                                       f"{name} --backends ...compile)"})
        compiled = [v for v in variants if v in ("compile", "fastnets-compile")]
        if compiled and not budget.allows(120 * len(compiled)):
            variants = [v for v in variants if v not in compiled]
            for v in compiled:
                report["throughput"].append({"model": name, "backend": v, "mode": mode, "status": "skipped",
                                             "batch_size": settings["batch_size"][name], "device": "cpu",
                                             "precision": settings["precision"],
                                             "reason": f"time budget of {settings['time_budget_s']} s"})
        eager, fast, why = pairs.get(name)
        iters = settings["iters"] * ITERS.get(name, 1)
        out, meta = measure(name, settings["batch_size"][name], mode, settings["precision"], variants,
                            settings["repeats"], iters, warmup=max(2, settings["warmup"]), eager=eager, fast=fast,
                            why=why)
        info["blocks"].append(meta)
        report["throughput"] += rows_from_block(out, meta)
        if compiled:
            torch._dynamo.reset()


def _fmt_ratio(r, key="vs_eager"):
    if r is None or r.get("status") != "ok" or r.get(key) is None:
        return "–" if r is None else (r.get("status", "–") if r.get("status") != "ok" else "–")
    return f"{r[key]:.2f}x"


def markdown_section(report):
    """The same-run ratio table (with the targets and the load) when the run's throughput rows are interleaved
    CPU rows; an empty list otherwise."""
    rows = [r for r in report["throughput"] if r.get("interleaved")]
    if not rows:
        return []
    by = {(r["model"], r["mode"], r["backend"]): r for r in rows}
    blocks = sorted({(r["model"], r["mode"]) for r in rows}, key=lambda k: (list(MODELS).index(k[0])
                                                                             if k[0] in MODELS else 9, k[1] != "train"))
    r0 = rows[0]
    lines = ["", f"Same-run ratios fastnets / eager on the CPU ({r0['precision']}, {r0['threads']} thread(s)): the "
             "variants of each row timed interleaved, the median of "
             f"{r0['repeats']} repeats each; wall clock (spread: (max - min) / median of the repeats) and process "
             "CPU time; fastnets' layout is the faster of NCHW / channels_last measured in the same block.", "",
             "| model | mode | batch | eager img/s | fastnets img/s (layout) | fastnets / eager | (CPU time) | "
             "NCHW / CL | target | met | compile / eager | fastnets+compile / eager | load before → after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, mode in blocks:
        e, f = by.get((model, mode, "eager")), by.get((model, mode, "fastnets"))
        if e is None or f is None or e.get("status") != "ok" or f.get("status") != "ok":
            continue
        need = TARGETS[mode]
        ratio = f.get("vs_eager")
        lay = f.get("layout_decision", {}).get("vs_eager", {})
        nc = "/".join("–" if lay.get(k) is None else f"{lay[k]:.2f}" for k in LAYOUTS)
        met = "–" if ratio is None else ("yes" if ratio >= need else f"**no** ({100 * (ratio / need - 1):+.0f}%)")
        lb, la = f.get("load_before"), f.get("load_after")
        load = "–" if not lb or not la else f"{lb[0]:.1f} → {la[0]:.1f}"
        lines.append(
            f"| {model} | {mode} | {f['batch_size']} | {e['images_per_s']:.3g} | {f['images_per_s']:.3g} "
            f"({f['memory_format']}) | {ratio:.2f}x (±{100 * f['spread'] / 2:.0f}%) | {_fmt_ratio(f, 'vs_eager_cpu')} | "
            f"{nc} | >= {need} | {met} | {_fmt_ratio(by.get((model, mode, 'compile')))} | "
            f"{_fmt_ratio(by.get((model, mode, 'fastnets-compile')))} | {load} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastnets.bench.cpu_ratios", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--modes", nargs="*", default=["train", "infer"])
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--iters", type=int, default=1, help="steps per repeat (x10 for LeNet-5)")
    p.add_argument("--backends", nargs="*", default=["eager", "fastnets"],
                   help="eager, eager-channels-last, compile, fastnets, fastnets-compile")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu", "native_ratios"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows, blocks = [], []
    for name in a.models:
        eager, fast, why = M.make_pair(name, 0)
        for mode in a.modes:
            out, meta = measure(name, MODELS[name], mode, a.precision, _variants(a.backends, LAYOUTS), a.repeats,
                                a.iters * ITERS.get(name, 1), eager=eager, fast=fast, why=why)
            blocks.append(meta)
            rows += rows_from_block(out, meta)
            f = next(r for r in rows[::-1] if r["backend"] == "fastnets")
            print(name, mode, f.get("status"), f"{f.get('vs_eager', 0):.3f}x wall, {f.get('vs_eager_cpu', 0):.3f}x CPU, "
                  f"layout {f.get('memory_format')}; load {meta['load_before']} -> {meta['load_after']}", flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
            "precision": a.precision, "mkldnn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(), "blocks": blocks}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    lines = markdown_section({"throughput": rows})
    with open(a.out + ".md", "w") as fh:
        fh.write("\n".join(lines).strip() + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
