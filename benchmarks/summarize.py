"""The GPU check's verdict: read what benchmarks/gpu_check.sh left in its work folder (steps.tsv, junit XML of
the pytest steps, benchmark JSON, logs) and write at most five files into OUT:

  OUT/summary.json      per step: verdict, seconds, limit; per op family x backend x config (dtype-layout):
                        passed/failed/skipped counts and the worst error (err/bound ratio too); the sanitizer
                        (CUDA C++ memcheck/racecheck, Triton memcheck) and 2^31 tests' counts; the predicted
                        seconds of every step (`budget`) and the plan's workers; every benchmark row with vs_eager/vs_compile/vs_cudnn and its
                        ratio against each target; `ok` (every step passed)
  OUT/benchmarks.json   every kernel benchmark row (merged from bench_*.py's JSON, with the ratios)
  OUT/models.json       the model benchmark's report (python -m fastnets.bench), when it ran
  OUT/logs.txt          every step's log, tail-trimmed, concatenated
  OUT/table.txt         the compact table that --print prints
No torch import: it runs in a second after every step, so a timeout anywhere still leaves a verdict.

    python3 benchmarks/summarize.py --work WORK --out OUT [--print]
    python3 benchmarks/summarize.py FOLDER          (older use: the speed table of a folder of bench JSON)
"""
import glob
import json
import math
import os
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

LOG_TAIL_BYTES = 24_000  # per step, in logs.txt
TABLE_LIMIT = 11_000  # characters of the printed table (the device call returns the last 12,000)

# Speed targets: (benchmark, pass_ (None: any), variant prefix, metric, need, name)
TARGETS = [
    ("batch_norm", None, "fastnets", "vs_eager", 1.0, "BN >= eager"),
    ("batch_norm", None, "fastnets", "vs_compile", 1.0, "BN >= torch.compile"),
    ("conv", "conv", "fastnets", "vs_cudnn", 0.95, "conv >= 0.95x cuDNN"),
    ("conv", "eval_fwd", "fastnets", "vs_cudnn", 1.0, "eval block >= cuDNN conv alone"),
    ("conv", "train_fwdbwd", "fastnets", "vs_eager", 1.25, "train fwd+bwd >= 1.25x eager"),
    ("conv", "train_fwdbwd", "fastnets", "vs_compile", 1.0, "train fwd+bwd >= torch.compile"),
    ("squeeze_excite", "fwd+bwd", "fastnets", "vs_eager", 3.0, "SE fwd+bwd >= 3x eager"),
    ("squeeze_excite", "fwd+bwd", "fastnets", "vs_compile", 1.0, "SE fwd+bwd >= torch.compile"),
]
BASELINES = {"eager": "vs_eager", "compile": "vs_compile", "cudnn": "vs_cudnn"}


def _gmean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _read_json(path):
    """The JSON in `path`, or None when the file is missing or not (yet) whole JSON: a step killed at its
    limit may leave any of them absent or half written."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- steps


def read_steps(work):
    steps = []
    path = os.path.join(work, "steps.tsv")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 4:
                    steps.append({"step": parts[0], "verdict": parts[1], "seconds": int(parts[2]),
                                  "limit": int(parts[3]), "rc": parts[4] if len(parts) > 4 else ""})
    return steps


# ---------------------------------------------------------------------------------------------- junit


def read_junit(path):
    """[(name, outcome, properties, message)] of every testcase in a junit XML file (pytest's)."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        return None, f"{os.path.basename(path)}: unreadable ({e})"
    out = []
    for tc in root.iter("testcase"):
        props = {p.get("name"): p.get("value") for p in tc.iter("property")}
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                message = (el.get("message") or "")[:300]
                break
        out.append((tc.get("name", ""), outcome, props, message))
    return out, None


def plan_table(cases):
    """{family/backend/config: counts and the worst error} from the plan's testcases."""
    groups = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0, "worst_ratio": None,
                                  "worst_error": None, "worst_what": None, "failures": []})
    for name, outcome, props, message in cases:
        if "family" not in props:
            continue
        g = groups[f"{props['family']}/{props['backend']}/{props['config']}"]
        g[outcome] += 1
        if outcome == "failed" and len(g["failures"]) < 3:
            g["failures"].append(f"{name}: {message}")
        if props.get("worst_ratio") is not None:
            ratio = float(props["worst_ratio"])
            if g["worst_ratio"] is None or ratio > g["worst_ratio"]:
                g.update(worst_ratio=ratio, worst_error=float(props["worst_error"]),
                         worst_what=f"{props['worst_what']} ({props.get('mode')}, {name.split('[')[-1].rstrip(']')})")
    return dict(sorted(groups.items()))


def counts(cases):
    c = {"passed": 0, "failed": 0, "skipped": 0}
    for _, outcome, _, _ in cases:
        c[outcome] += 1
    c["failures"] = [f"{n}: {m}" for n, o, _, m in cases if o == "failed"][:5]
    return c


# ---------------------------------------------------------------------------------------------- benchmarks


def read_benchmarks(work):
    """Every row of the kernel benchmarks' JSON, with the environment and ceilings of each file."""
    rows, meta = [], {}
    for path in sorted(glob.glob(os.path.join(work, "bench", "*.json"))):
        data = _read_json(path)
        if data is None:
            continue  # a file being rewritten at the moment of a kill: the next summary reads it
        name = data.get("benchmark", os.path.basename(path))
        meta.setdefault(name, {"environment": data.get("environment"), "ceilings": data.get("ceilings")})
        for r in data.get("rows") or []:
            rows.append(dict(r, benchmark=name))
    return rows, meta


def add_ratios_and_targets(rows):
    """vs_<baseline> for every measured row against the same benchmark/family/config/shape/pass rows of the
    baseline variants (measured in the same run, perhaps in another step), then each fastnets row's ratio
    value / need against every target that applies to it."""
    def key(r):
        return tuple(str(r.get(k, "")) for k in ("benchmark", "family", "config", "shape", "pass_"))

    base = {}
    for r in rows:
        if r.get("ms") and r.get("variant") in BASELINES:
            base[key(r) + (r["variant"],)] = r["ms"]
    for r in rows:
        if not r.get("ms"):
            continue
        for variant, metric in BASELINES.items():
            b = base.get(key(r) + (variant,))
            if b:
                r[metric] = b / r["ms"]
        targets = []
        for bench, pass_, prefix, metric, need, name in TARGETS:
            if r["benchmark"] != bench or not str(r.get("variant", "")).startswith(prefix):
                continue
            if pass_ is not None and r.get("pass_") != pass_:
                continue
            if name.startswith("conv >=") and r.get("k") != 1:
                continue  # the 1x1 target
            value = r.get(metric)
            if value is not None:
                targets.append({"target": name, "value": round(value, 4), "need": need,
                                "ratio": round(value / need, 4), "pass": value >= need})
        if targets:
            r["targets"] = targets
    return rows


def target_table(rows):
    """Per target and variant: rows met / rows, and the geometric mean of value / need."""
    groups = defaultdict(list)
    for r in rows:
        for t in r.get("targets", []):
            groups[(t["target"], r["variant"])].append(t)
    return [{"target": tg, "variant": v, "met": sum(t["pass"] for t in ts), "rows": len(ts),
             "gmean_ratio": round(_gmean([t["ratio"] for t in ts]) or 0, 3)}
            for (tg, v), ts in sorted(groups.items())]


# ---------------------------------------------------------------------------------------------- output


def trimmed_logs(work):
    parts = []
    for path in sorted(glob.glob(os.path.join(work, "logs", "*.log")), key=os.path.getmtime):
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - LOG_TAIL_BYTES))
            text = f.read().decode("utf-8", "replace")
        head = f"===== {os.path.basename(path)} ({size} bytes" + (", tail only" if size > LOG_TAIL_BYTES else "") + ")"
        parts.append(head + "\n" + text)
    return "\n".join(parts)


def build(work):
    steps = read_steps(work)
    # ok: no step failed or timed out (a step the budget left out is listed in `skipped`, not a failure)
    summary = {"steps": steps, "ok": bool(steps) and all(s["verdict"] in ("PASS", "SKIP(budget)") for s in steps),
               "skipped": [s["step"] for s in steps if s["verdict"] == "SKIP(budget)"]}
    environment = _read_json(os.path.join(work, "environment.json"))
    if environment is not None:
        summary["environment"] = environment
    problems = []
    for label, pattern in (("plan", "plan.xml"), ("sanitizer_memcheck", "memcheck.xml"),
                           ("sanitizer_memcheck_triton", "memcheck-triton.xml"),
                           ("sanitizer_racecheck", "racecheck.xml"), ("slow", "slow.xml")):
        path = os.path.join(work, pattern)
        if not os.path.exists(path):
            continue
        cases, err = read_junit(path)
        if err:
            problems.append(err)
            continue
        summary[label] = counts(cases)
        if label == "plan":
            summary["plan_by_family"] = plan_table(cases)
    budget = _read_json(os.path.join(work, "budget.json"))  # benchmarks/gpu_budget.py's prediction
    if budget is not None:
        summary["budget"] = budget
    try:
        with open(os.path.join(work, "plan_workers")) as f:
            summary["plan_workers"] = int(f.readline())
    except (OSError, ValueError):
        pass
    warmup = _read_json(os.path.join(work, "warmup.json"))
    if warmup is not None:
        summary["triton_warmup"] = warmup
    rows, meta = read_benchmarks(work)
    rows = add_ratios_and_targets(rows)
    summary["benchmarks"] = {"meta": meta, "targets": target_table(rows), "rows": rows}
    if problems:
        summary["problems"] = problems
    return summary, rows


def table(summary):
    lines = []
    env = summary.get("environment") or {}
    lines.append(f"==== GPU check: {'PASS' if summary['ok'] else 'FAIL'}  gpu={env.get('gpu')} torch={env.get('torch')} "
                 f"triton={env.get('triton')} dry_run={env.get('dry_run')}")
    budget = summary.get("budget") or {}
    predicted = {b["step"]: b["estimate_seconds"] for b in budget.get("steps", [])}
    lines.append("step        verdict       seconds  limit  predicted on a GPU")
    for s in summary["steps"]:
        p = predicted.get(s["step"])
        lines.append(f"{s['step']:<11} {s['verdict']:<13} {s['seconds']:>7}  {s['limit']:>5}  "
                     f"{'-' if p is None else f'{p:.0f}':>9}")
    if budget:
        lines.append(f"predicted GPU time of every step (benchmarks/gpu_budget.py, an estimate): "
                     f"{budget['total_seconds']:.0f} s against the {budget['call_seconds']} s call; plan workers "
                     f"{summary.get('plan_workers', budget.get('plan_workers'))}")
    w = summary.get("triton_warmup")
    if w:
        lines.append(f"triton warm-up: {w.get('compiled')} of {w.get('variants')} variants in "
                     f"{w.get('compile_seconds')} s on {w.get('jobs')} processes, {len(w.get('failures', []))} failures")
    fam = summary.get("plan_by_family")
    if fam:
        lines.append("")
        lines.append("family/backend/config                pass fail skip  worst err  err/bound  where")
        for k, g in fam.items():
            we = "-" if g["worst_error"] is None else f"{g['worst_error']:.2e}"
            wr = "-" if g["worst_ratio"] is None else f"{g['worst_ratio']:.3f}"
            lines.append(f"{k:<36} {g['passed']:>4} {g['failed']:>4} {g['skipped']:>4}  {we:>9}  {wr:>9}  "
                         f"{(g['worst_what'] or '')[:60]}")
    for label in ("plan", "sanitizer_memcheck", "sanitizer_memcheck_triton", "sanitizer_racecheck", "slow"):
        c = summary.get(label)
        if c:
            lines.append(f"{label}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped")
            for f in c["failures"][:3]:
                lines.append(f"  FAILED {f[:200]}")
    tg = summary.get("benchmarks", {}).get("targets")
    if tg:
        lines.append("")
        lines.append("target                              variant            met/rows  gmean(value/need)")
        for t in tg:
            lines.append(f"{t['target']:<35} {t['variant']:<18} {t['met']:>3}/{t['rows']:<4}  {t['gmean_ratio']:.3f}")
    rows = summary.get("benchmarks", {}).get("rows") or []
    errors = [r for r in rows if "error" in r]
    if errors:
        lines.append(f"benchmark rows that failed: {len(errors)}")
        for r in errors[:3]:
            lines.append(f"  {r['benchmark']} {r.get('shape')} {r.get('variant')}: {str(r['error'])[:150]}")
    for p in summary.get("problems", []):
        lines.append(f"problem: {p}")
    text = "\n".join(lines)
    if len(text) > TABLE_LIMIT:
        text = text[:TABLE_LIMIT // 2] + "\n...(cut)...\n" + text[-TABLE_LIMIT // 2:]
    return text


def write(work, out):
    os.makedirs(out, exist_ok=True)
    summary, rows = build(work)
    _dump(os.path.join(out, "summary.json"), summary)
    if rows:
        _dump(os.path.join(out, "benchmarks.json"), {"rows": rows, "meta": summary["benchmarks"]["meta"]})
    models = sorted(glob.glob(os.path.join(work, "models", "*.json")))
    if models:
        with open(models[0]) as f:
            text = f.read()
        with open(os.path.join(out, "models.json"), "w") as f:
            f.write(text)
    logs = trimmed_logs(work)
    with open(os.path.join(out, "logs.txt"), "w") as f:
        f.write(logs)
    text = table(summary)
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(text + "\n")
    return summary, text


def _dump(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def legacy(folder):
    """The speed table of a folder of bench JSON files (bench_*.py --out FOLDER)."""
    lines = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        rows = data.get("rows")
        if not isinstance(rows, list) or not rows:
            continue
        env = data.get("environment", {})
        lines.append(f"{data.get('benchmark', os.path.basename(path))} on {env.get('gpu')} (torch {env.get('torch')}):")
        groups = defaultdict(list)
        for r in rows:
            groups[tuple(str(r.get(k, "")) for k in ("family", "config", "pass_", "variant"))].append(r)
        for key, rs in sorted(groups.items()):
            parts = []
            for metric in ("vs_eager", "vs_compile", "copy_fraction", "matmul_fraction"):
                g = _gmean([r.get(metric) for r in rs])
                if g is not None:
                    parts.append(f"{metric}={g:.2f}")
            if any("error" in r for r in rs):
                parts.append(f"errors={sum(1 for r in rs if 'error' in r)}")
            lines.append("  " + " ".join(k for k in key if k) + ": " + (", ".join(parts) or "-"))
    return "\n".join(lines)


def main(argv):
    if "--work" in argv:
        work = argv[argv.index("--work") + 1]
        out = argv[argv.index("--out") + 1]
        summary, text = write(work, out)
        if "--print" in argv:
            print(text)
        return 0 if summary["ok"] else 1
    print(legacy(argv[0] if argv else "benchmarks/results"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
