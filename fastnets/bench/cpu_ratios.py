"""Same-run CPU ratios (issues 19 and 31): the CPU profile's throughput phase (`python -m fastnets.bench`
without a GPU) and `python -m fastnets.bench.cpu_ratios` on its own.

On a CPU, and more so on a shared one, two backends timed one after the other see different machines. Here
every variant of one model, mode and precision is built first, then timed INTERLEAVED: repeat r runs `iters`
steps of each variant in turn (the order reversed on every other repeat), so that a change in load hits all
alike; each variant's figure is the median over the repeats, and the ratios are of those medians. Each repeat
is timed twice: wall clock (perf_counter, what images/s means) and the process's CPU time (process_time), which
a busy machine disturbs less (time spent descheduled does not count); the spread of the repeats and the load
average before and after each block are recorded with it.

Variants: eager (the torchvision / timm / plain PyTorch model, NCHW, as a user runs it), fastnets in NCHW and
in channels_last (the layout is a measured decision per model and mode, recorded in the row:
`layout_decision`), torch.compile of the eager model and fastnets + torch.compile (NCHW, inductor's CPU
backend), and eager-channels-last when asked for.

torch.compile is set as users set it on a CPU (COMPILE_CONFIG, recorded in every compiled row and block):
inference with inductor's `freezing` on (parameters become constants: BatchNorm folded into the
convolutions, oneDNN weights prepacked; the setting inductor's CPU documentation recommends for inference),
training with the defaults (freezing does not apply to training). The setting is torch._inductor.config,
patched around the whole block (tracing, warm-up and timing): dynamo reads `freezing` when it traces, so
torch.compile(options={"freezing": True}) alone leaves the parameters as graph inputs and folds nothing.

Ratios per block: fastnets / eager (issue 19's targets, TARGETS), and for inference fastnets / compile and
fastnets+compile / the faster of fastnets and compile (issue 31's: >= 1.0 each, COMPILE_TARGETS).
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
from .throughput import COMPILE_CONFIG, COMPILED, compile_config, compile_setting  # noqa: F401 (re-exported)

# model -> batch size: LeNet-5, ResNet-18 at CIFAR and ImageNet size, ResNet-50 and a timm model (issue 31)
MODELS = {"lenet5": 64, "resnet18_cifar": 8, "resnet18": 8, "resnet50": 4, "efficientnet_b0_timm": 8}
ITERS = {"lenet5": 10}  # steps per timed repeat (a LeNet-5 step takes milliseconds); 1 for the others
TARGETS = {"train": 1.0, "infer": 1.15}  # fastnets / eager, issue 19
COMPILE_TARGETS = {"infer": 1.0}  # fastnets / compile and fastnets+compile / best of the two, issue 31
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


def _prepared(variant, eager, fast, mode="infer"):
    """(model, memory format) of `variant`: a fresh copy, compiled where asked (inductor's settings: compile_config)."""
    if variant.startswith("fastnets"):
        if fast is None:
            raise M.FastnetsUnavailable("no fastnets model")
        base = fast
    else:
        base = eager
    cl = variant in ("fastnets-channels_last", "eager-channels-last")
    fmt = torch.channels_last if cl else torch.contiguous_format
    model = copy.deepcopy(base).to(memory_format=fmt)
    if variant in COMPILED:
        model = torch.compile(model)  # inductor's settings: compile_config(mode), around the block
    return model, fmt


def _step(variant, eager, fast, name, batch, mode, precision):
    model, fmt = _prepared(variant, eager, fast, mode)
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
    if any(v in COMPILED for v in variants):
        meta["compile"] = compile_setting(mode)
    fns, out = {}, {}
    with fastnets.use_backend("auto"), compile_config(mode):
        for v in variants:
            t0 = time.perf_counter()
            try:
                fn = _step(v, eager, fast, name, batch, mode, precision)
                for _ in range(warmup):  # oneDNN primitive and fold caches; torch.compile compiles here
                    fn()
                fns[v] = fn
                out[v] = {"status": "ok", "warmup_s": time.perf_counter() - t0}
                if v in COMPILED:
                    out[v]["compile"] = compile_setting(mode)
            except M.FastnetsUnavailable as e:
                out[v] = {"status": "unavailable", "reason": why or str(e)}
            except Exception as e:  # noqa: BLE001 - one variant failing must not stop the block
                msg = str(e).splitlines()[0][:300] if str(e) else ""
                out[v] = {"status": "error", "reason": f"{type(e).__name__}: {msg}"}
                if v in COMPILED:
                    out[v]["compile"] = compile_setting(mode)
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
    compile_ratios(rows)
    order = {"eager": 0, "eager-channels-last": 1, "compile": 2, "fastnets": 3, "fastnets-compile": 4}
    return sorted(rows, key=lambda r: order.get(r["backend"], 9))


def compile_ratios(rows):
    """Issue 31's same-run ratios, on the rows of one block: fastnets' `vs_compile` (fastnets / torch.compile)
    and fastnets-compile's `vs_best` (fastnets + compile / the faster of fastnets and torch.compile), both
    of wall-clock medians (`_cpu` of CPU-time medians)."""
    by = {r["backend"]: r for r in rows if r.get("status") == "ok"}
    f, c, fc = by.get("fastnets"), by.get("compile"), by.get("fastnets-compile")
    if f is not None and c is not None:
        f["vs_compile"] = c["ms_per_iter"] / f["ms_per_iter"]
        f["vs_compile_cpu"] = c["cpu_ms_per_iter"] / f["cpu_ms_per_iter"]
    if fc is not None and (f is not None or c is not None):
        best = min((r for r in (f, c) if r is not None), key=lambda r: r["ms_per_iter"])
        best_cpu = min(r["cpu_ms_per_iter"] for r in (f, c) if r is not None)
        fc["vs_best"] = best["ms_per_iter"] / fc["ms_per_iter"]
        fc["vs_best_cpu"] = best_cpu / fc["cpu_ms_per_iter"]
        fc["best_of"] = best["backend"]


def measure_throughput(report, plan, pairs, settings, budget, desc, show_progress):
    """The bench's throughput phase on a CPU (fastnets/bench/__main__.py hands it over): interleaved blocks,
    one per (model, mode), the backends of `plan` side by side."""
    from .progress import progress_bar

    if not settings["modes"] or not plan:
        return
    layouts = LAYOUTS if settings.get("fastnets_layout_measured", True) else (settings["fastnets_layout"],)
    precisions = settings.get("throughput_precisions") or [settings["precision"]]
    tasks = [(m, bs, prec, mode) for m, bs in plan for prec in precisions for mode in settings["modes"]]
    info = report["run"].setdefault("cpu_interleaved", {
        "method": "variants of one (model, precision, mode) timed interleaved, median of repeats; ratios of "
                  "medians; wall clock and process CPU time",
        "compile": {m: compile_setting(m) for m in settings["modes"]}, "blocks": []})
    for name, backends, precision, mode in progress_bar(tasks, desc=desc, disable=not show_progress):
        variants = _variants(backends, layouts)

        def skipped(backend, reason):
            row = {"model": name, "backend": backend, "mode": mode, "status": "skipped", "interleaved": True,
                   "batch_size": settings["batch_size"][name], "device": "cpu", "precision": precision,
                   "reason": reason}
            if backend in COMPILED:
                row["compile"] = compile_setting(mode)
            return row

        if not budget.allows(5 * len(variants)):
            report["throughput"] += [skipped(b, f"time budget of {settings['time_budget_s']} s") for b in backends]
            continue
        only = settings.get("compile_models")
        if only is not None and name not in only:
            for v in [v for v in variants if v in COMPILED]:
                variants.remove(v)
                report["throughput"].append(skipped(v, "torch.compile of this model takes many minutes on a small "
                                                       "CPU; not in the profile's compile_models (ask with --models "
                                                       f"{name} --backends ...compile)"))
        compiled = [v for v in variants if v in COMPILED]
        if compiled and not budget.allows(120 * len(compiled)):
            variants = [v for v in variants if v not in compiled]
            for v in compiled:
                report["throughput"].append(skipped(v, f"time budget of {settings['time_budget_s']} s"))
        eager, fast, why = pairs.get(name)
        iters = settings["iters"] * ITERS.get(name, 1)
        out, meta = measure(name, settings["batch_size"][name], mode, precision, variants,
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


def _met(ratio, need):
    if ratio is None:
        return "–"
    return "yes" if ratio >= need else f"**no** ({100 * (ratio / need - 1):+.0f}%)"


def _ips_cell(r):
    if r is None:
        return "–"
    if r.get("status") != "ok":
        return r.get("status", "–")
    return f"{r['images_per_s']:.3g}"


def _blocks(rows):
    order = list(MODELS)
    keys = {(r["model"], r.get("precision"), r["mode"]) for r in rows}
    return sorted(keys, key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[0],
                                       k[1] != "fp32", k[2] != "train"))


def _table(intro, columns):
    """The lines that open a markdown table: a blank line, the intro paragraph, a blank line, the header row
    of `columns` and its separator."""
    return ["", intro, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def markdown_section(report):
    """The same-run ratio tables (against eager, and against torch.compile), with the targets, the load and a
    closing note of the ratios, when the run's throughput rows are interleaved CPU rows; [] otherwise."""
    rows = [r for r in report["throughput"] if r.get("interleaved")]
    if not rows:
        return []
    measured = [r for r in rows if "threads" in r]  # (rows skipped before their block ran carry no timing)
    if not measured:
        return []
    by = {(r["model"], r.get("precision"), r["mode"], r["backend"]): r for r in rows}
    blocks = _blocks(rows)
    r0 = measured[0]
    precisions = sorted({r.get("precision") for r in rows}, key=lambda p: p != "fp32")
    lines = _table(f"Same-run ratios on the CPU ({', '.join(precisions)}; {r0['threads']} thread(s)): the variants "
                   f"of each row timed interleaved, the median of {r0['repeats']} repeats each; wall clock (spread: "
                   "(max - min) / median of the repeats) and process CPU time; fastnets' layout is the faster of "
                   "NCHW / channels_last measured in the same block.",
                   ["model", "precision", "mode", "batch", "eager img/s", "fastnets img/s (layout)",
                    "fastnets / eager", "(CPU time)", "NCHW / CL", "target", "met", "load before → after"])
    for model, prec, mode in blocks:
        e, f = by.get((model, prec, mode, "eager")), by.get((model, prec, mode, "fastnets"))
        if e is None or f is None or e.get("status") != "ok" or f.get("status") != "ok":
            continue
        need = TARGETS[mode]
        ratio = f.get("vs_eager")
        lay = f.get("layout_decision", {}).get("vs_eager", {})
        nc = "/".join("–" if lay.get(k) is None else f"{lay[k]:.2f}" for k in LAYOUTS)
        lb, la = f.get("load_before"), f.get("load_after")
        load = "–" if not lb or not la else f"{lb[0]:.1f} → {la[0]:.1f}"
        lines.append(
            f"| {model} | {prec} | {mode} | {f['batch_size']} | {e['images_per_s']:.3g} | {f['images_per_s']:.3g} "
            f"({f['memory_format']}) | {ratio:.2f}x (±{100 * f['spread'] / 2:.0f}%) | {_fmt_ratio(f, 'vs_eager_cpu')} | "
            f"{nc} | >= {need} | {_met(ratio, need)} | {load} |")
    compiled = [b for b in blocks if any((*b, v) in by for v in COMPILED)]
    if compiled:
        labels = sorted({compile_setting(mode)["label"] + f" for {'inference' if mode == 'infer' else 'training'}"
                         for _, _, mode in compiled}, key=lambda t: "training" in t)
        lines += _table(f"Against torch.compile ({'; '.join(labels)}), same blocks: fastnets / compile, and "
                        "fastnets + compile / the faster of fastnets and compile (its name in brackets); CPU-time "
                        "ratios in brackets after the wall-clock ones. A variant that did not run shows its status "
                        "(the reason is in the JSON).",
                        ["model", "precision", "mode", "compile img/s", "fastnets img/s", "fastnets+compile img/s",
                         "compile / eager", "fastnets / compile", "target", "met", "fastnets+compile / best",
                         "target", "met"])
        for model, prec, mode in compiled:
            e, f = by.get((model, prec, mode, "eager")), by.get((model, prec, mode, "fastnets"))
            c, fc = by.get((model, prec, mode, "compile")), by.get((model, prec, mode, "fastnets-compile"))
            need = COMPILE_TARGETS.get(mode)
            vc = f.get("vs_compile") if f else None
            vb = fc.get("vs_best") if fc and fc.get("status") == "ok" else None
            vc_cell = "–" if vc is None else f"{vc:.2f}x ({f['vs_compile_cpu']:.2f}x)"
            vb_cell = "–" if vb is None else f"{vb:.2f}x ({fc['vs_best_cpu']:.2f}x) ({fc['best_of']})"
            lines.append(
                f"| {model} | {prec} | {mode} | {_ips_cell(c)} | {_ips_cell(f)} | {_ips_cell(fc)} | "
                f"{_fmt_ratio(c)} | {vc_cell} | {'–' if need is None else f'>= {need}'} | "
                f"{'–' if need is None else _met(vc, need)} | {vb_cell} | {'–' if need is None else f'>= {need}'} | "
                f"{'–' if need is None else _met(vb, need)} |")
    note = closing_note(rows)
    if note:
        lines += ["", note]
    return lines


def closing_note(rows):
    """One sentence of the same-run ratios (what the README's closing note quotes)."""
    by = {(r["model"], r.get("precision"), r["mode"], r["backend"]): r for r in rows}
    parts = {"infer_compile": [], "infer_best": [], "train": []}
    for model, prec, mode in _blocks(rows):
        f, fc = by.get((model, prec, mode, "fastnets")), by.get((model, prec, mode, "fastnets-compile"))
        if mode == "infer" and f is not None and f.get("vs_compile") is not None:
            parts["infer_compile"].append(f"{model} {prec} {f['vs_compile']:.2f}x")
        if mode == "infer" and fc is not None and fc.get("vs_best") is not None:
            parts["infer_best"].append(f"{model} {prec} {fc['vs_best']:.2f}x")
        if mode == "train" and f is not None and f.get("vs_eager") is not None:
            parts["train"].append(f"{model} {prec} {f['vs_eager']:.2f}x")
    text = []
    if parts["infer_compile"]:
        text.append("inference fastnets / torch.compile (freezing): " + ", ".join(parts["infer_compile"]))
    if parts["infer_best"]:
        text.append("inference fastnets + compile / the faster of the two: " + ", ".join(parts["infer_best"]))
    if parts["train"]:
        text.append("training fastnets / eager: " + ", ".join(parts["train"]))
    return ("Same-run ratios (wall clock, interleaved; >= 1.0 is the target of each): " + "; ".join(text) + ".") \
        if text else ""


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastnets.bench.cpu_ratios", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--modes", nargs="*", default=["train", "infer"])
    p.add_argument("--precision", nargs="*", choices=["fp32", "bf16"], default=["fp32"],
                   help="one or more: each model and mode is measured in each (bf16: autocast around every variant)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--iters", type=int, default=1, help="steps per repeat (x10 for LeNet-5)")
    p.add_argument("--backends", nargs="*", default=["eager", "fastnets"],
                   help="eager, eager-channels-last, compile, fastnets, fastnets-compile (compiled: inductor with "
                   "freezing for inference, defaults for training)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu", "native_ratios"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows, blocks = [], []
    for name in a.models:
        eager, fast, why = M.make_pair(name, 0)
        for precision in a.precision:
            for mode in a.modes:
                out, meta = measure(name, MODELS.get(name, 8), mode, precision, _variants(a.backends, LAYOUTS),
                                    a.repeats, a.iters * ITERS.get(name, 1), eager=eager, fast=fast, why=why)
                blocks.append(meta)
                rows += rows_from_block(out, meta)
                if any(v in COMPILED for v in a.backends):
                    torch._dynamo.reset()
                f = next(r for r in rows[::-1] if r["backend"] == "fastnets")
                extra = f", {f['vs_compile']:.3f}x compile" if f.get("vs_compile") is not None else ""
                print(name, precision, mode, f.get("status"), f"{f.get('vs_eager', 0):.3f}x eager wall{extra}, "
                      f"{f.get('vs_eager_cpu', 0):.3f}x eager CPU, layout {f.get('memory_format')}; "
                      f"load {meta['load_before']} -> {meta['load_after']}", flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
            "precision": a.precision, "mkldnn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
            "compile": {m: compile_setting(m) for m in a.modes}, "blocks": blocks}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    lines = markdown_section({"throughput": rows})
    with open(a.out + ".md", "w") as fh:
        fh.write("\n".join(lines).strip() + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
