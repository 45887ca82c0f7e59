"""PNG charts (matplotlib, Agg backend):
(a) published ImageNet top-1 against inference throughput, bubble area by parameter count, one marker per
    backend, an arrow from eager to fastnets; models without an ImageNet top-1 in a strip below;
(b) the same for training throughput;
(c) trained test accuracy against training time on CIFAR-10 (MNIST when no CIFAR-10 run), eager and fastnets
    joined by an arrow;
(d) memory: the bytes saved for backward per image of each model, eager against fastnets.models and
    fastnets.convert (fastnets/bench/memory.py), with the ratio to eager on each bar.
"""
import math

MARKERS = {"eager": "o", "eager-channels-last": "s", "compile": "D", "fastnets": "*", "fastnets-compile": "P"}
COLORS = {"eager": "#7f7f7f", "eager-channels-last": "#1f77b4", "compile": "#ff7f0e", "fastnets": "#d62728",
          "fastnets-compile": "#9467bd"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _area(params, pmax):
    return 60 + 1400 * params / pmax


def _run_precision(report):
    prec = report.get("settings", {}).get("precision")
    return [r for r in report["throughput"] if prec is None or r.get("precision", prec) == prec]


def missing_note(report, mode):
    """The variants of `mode` that did not run (skipped, error, out of memory), grouped by reason: the chart
    says what it does not show instead of leaving them out silently."""
    models = {m["name"]: m.get("label", m["name"]) for m in report["models"]}
    ok = {(r["model"], r["backend"]) for r in _run_precision(report) if r["mode"] == mode and r["status"] == "ok"}
    groups = {}
    for r in _run_precision(report):
        if r["mode"] != mode or r["status"] in ("ok",) or (r["model"], r["backend"]) in ok:
            continue
        reason = (r.get("reason") or "").split(";")[0].split(" (ask with")[0][:90]
        key = f"{r['status']}" + (f": {reason}" if reason else "")
        item = f"{models.get(r['model'], r['model'])} {r['backend']}"
        groups.setdefault(key, [])
        if item not in groups[key]:
            groups[key].append(item)
    if not groups:
        return ""
    return "not shown: " + "; ".join(f"{', '.join(items)} ({why})" for why, items in groups.items())


def throughput_chart(report, mode, path):
    plt = _plt()
    models = {m["name"]: m for m in report["models"]}
    rows = [r for r in _run_precision(report) if r["mode"] == mode and r["status"] == "ok"]
    if not rows:
        return None
    pmax = max(models[r["model"]]["params"] for r in rows)
    no_top1 = sorted({r["model"] for r in rows if models[r["model"]].get("published_top1") is None})
    with_top1 = {r["model"] for r in rows} - set(no_top1)
    if with_top1 and no_top1:
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 8), sharex=True,
                                      gridspec_kw={"height_ratios": [5, max(1, len(no_top1) // 2)]})
    elif with_top1:
        fig, ax = plt.subplots(figsize=(11, 7))
        ax2 = None
    else:
        fig, ax2 = plt.subplots(figsize=(11, 3.5))
        ax = None
    ypos = {n: i for i, n in enumerate(no_top1)}

    def y_of(name):
        p = models[name].get("published_top1")
        return (ax, p["top1"]) if p else (ax2, ypos[name])

    seen = set()
    for r in rows:
        axis, y = y_of(r["model"])
        b = r["backend"]
        axis.scatter(r["images_per_s"], y, s=_area(models[r["model"]]["params"], pmax), marker=MARKERS.get(b, "o"),
                     c=COLORS.get(b, "k"), alpha=0.55, edgecolors="k", linewidths=0.5, zorder=3)
        seen.add(b)
    by = {(r["model"], r["backend"]): r for r in rows}
    for name in sorted({r["model"] for r in rows}):
        axis, y = y_of(name)
        e, f = by.get((name, "eager")), by.get((name, "fastnets"))
        anchor = e or by.get((name, "eager-channels-last"))
        if anchor and f:
            axis.annotate("", xy=(f["images_per_s"], y), xytext=(anchor["images_per_s"], y),
                          arrowprops={"arrowstyle": "->", "color": COLORS["fastnets"], "lw": 1.2}, zorder=2)
        xs = [r["images_per_s"] for (n, _), r in by.items() if n == name]
        axis.annotate(models[name]["label"], (max(xs), y), xytext=(12, 6), textcoords="offset points", fontsize=8)
    handles = [plt.Line2D([], [], marker=MARKERS.get(b, "o"), color="w", markerfacecolor=COLORS.get(b, "k"),
                          markeredgecolor="k", markersize=9, label=b) for b in report["settings"]["backends"] if b in seen]
    top, bottom = ax or ax2, ax2 or ax
    for a in (ax, ax2):
        if a is not None:
            a.set_xscale("log")
            a.grid(True, which="both", alpha=0.3)
    if ax is not None:
        ax.margins(y=0.1)
        ax.set_ylabel("published ImageNet-1k top-1 (%)\n(literature value, not measured here)")
    if ax2 is not None:
        ax2.set_yticks(range(len(no_top1)))
        ax2.set_yticklabels([models[n]["label"] for n in no_top1], fontsize=8)
        ax2.set_ylim(-0.8, len(no_top1) - 0.2)
        ax2.set_title("no published ImageNet top-1 (placed apart)", fontsize=8, loc="left")
    top.legend(handles=handles, title="backend (bubble area ~ parameters)", fontsize=8, loc="lower right")
    what = "training" if mode == "train" else "inference"
    s = report["settings"]
    bottom.set_xlabel(f"{what} throughput (images/s, log scale; batch size per model in the JSON, {s['precision']})")
    # a figure title: the lower panel's own title ("placed apart") may sit on the same axes
    fig.suptitle(f"{_device_label(report)}: accuracy against {what} throughput; arrow: eager -> fastnets")
    note = missing_note(report, mode)
    if note:
        import textwrap

        fig.text(0.01, 0.005, textwrap.fill(note, 160), fontsize=7, va="bottom", ha="left", color="#444444")
        fig.tight_layout(rect=(0, 0.035 * (1 + len(note) // 160), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def trained_chart(report, path):
    plt = _plt()
    rows = [r for r in report["trained"] if r["status"] == "ok"]
    if any(r["dataset"] == "cifar10" for r in rows):
        rows = [r for r in rows if r["dataset"] == "cifar10"]  # the chart is CIFAR-10's; MNIST is in the table
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 6))
    names = sorted({r["model"] for r in rows})
    cmap = plt.get_cmap("tab10")
    labels = {m["name"]: m["label"] for m in report["models"]}
    for i, name in enumerate(names):
        color = cmap(i % 10)
        by = {r["backend"]: r for r in rows if r["model"] == name}
        for b, r in by.items():
            hx = [h["train_s"] for h in r["history"]]
            hy = [100 * h["test_accuracy"] for h in r["history"]]
            ax.plot(hx, hy, ls="-" if b.startswith("fastnets") else "--", color=color, alpha=0.5, lw=1)
            ax.scatter(r["train_s"], 100 * r["test_accuracy"], marker=MARKERS.get(b, "o"), s=120, color=color,
                       edgecolors="k", zorder=3)
        base = next((by[b] for b in ("eager-channels-last", "eager") if b in by), None)
        f = by.get("fastnets")
        if base and f:
            ax.annotate("", xy=(f["train_s"], 100 * f["test_accuracy"]),
                        xytext=(base["train_s"], 100 * base["test_accuracy"]),
                        arrowprops={"arrowstyle": "->", "color": color, "lw": 1.2})
        last = max(by.values(), key=lambda r: r["train_s"])
        several = len({r["dataset"] for r in rows}) > 1
        ax.annotate(labels.get(name, name) + (f" ({last['dataset']})" if several else ""), (last["train_s"], 100 * last["test_accuracy"]),
                    xytext=(6, -10), textcoords="offset points", fontsize=8, color=color)
    for b in sorted({r["backend"] for r in rows}):
        ax.scatter([], [], marker=MARKERS.get(b, "o"), color="w", edgecolors="k", s=80, label=b)
    ax.legend(title="backend (dashed: eager curve)", fontsize=8)
    xs = [r["train_s"] for r in rows]
    if max(xs) / max(min(xs), 1e-9) > 20:
        ax.set_xscale("log")
    datasets = ", ".join(sorted({r["dataset"] for r in rows}))
    ax.set_xlabel("training time (s, training steps only; same seed, data order and budget per pair)")
    ax.set_ylabel("test accuracy (%) after the budget (curves: after each epoch)")
    ax.set_title(f"{_device_label(report)}: trained accuracy against training time ({datasets})")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _device_label(report):
    env = report["environment"]
    return env["gpu"] if env.get("gpu") else f"CPU run ({env.get('cpu') or 'CPU'})"


def _finite(v):
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def memory_labels(rows, models, labels):
    """(title, tick labels) of the memory chart: one input size in the title when every model ran at it,
    else each model's size under its name."""
    sizes = {m: next((r.get("image_size") for r in rows if r["model"] == m and r.get("image_size")), None)
             for m in models}
    one_size = len(set(sizes.values())) == 1
    ticks = [labels.get(m, m) + ("" if one_size or sizes[m] is None else f"\n{sizes[m]} px") for m in models]
    px = f"{sizes[models[0]]} px" if one_size else "each model at its input size (under its name)"
    return f"Training memory: tensors saved for backward ({rows[0].get('precision')}, {px}, exact count)", ticks


def memory_chart(report, path):
    """(d): saved-for-backward MiB per image, one group of bars per model (eager, fastnets, convert)."""
    rows = [r for r in report.get("memory", []) if r.get("status") == "ok"]
    if not rows:
        return None
    plt = _plt()
    models = list(dict.fromkeys(r["model"] for r in rows))
    variants = [v for v in ("eager", "fastnets", "fastnets-convert") if any(r["variant"] == v for r in rows)]
    colors = {"eager": COLORS["eager"], "fastnets": COLORS["fastnets"], "fastnets-convert": COLORS["fastnets-compile"]}
    by = {(r["model"], r["variant"]): r for r in rows}
    labels = {m["name"]: m.get("label", m["name"]) for m in report.get("models", [])}
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(models) + 2), 4.5))
    for j, v in enumerate(variants):
        xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(models))]
        ys = [by[(m, v)]["saved_mib_per_image"] if (m, v) in by else 0 for m in models]
        ax.bar(xs, ys, width, label=v, color=colors.get(v, "k"), alpha=0.8, edgecolor="k", linewidth=0.5)
        for x, y, m in zip(xs, ys, models):
            r = by.get((m, v))
            if r is not None and v != "eager" and r.get("per_image_vs_eager") is not None:
                ax.annotate(f"{r['per_image_vs_eager']:.2f}x", (x, y), ha="center", va="bottom", fontsize=7)
    title, ticks = memory_labels(rows, models, labels)
    ax.set_xticks(range(len(models)), ticks, rotation=20, ha="right")
    ax.set_ylabel("MiB saved for backward per image")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
