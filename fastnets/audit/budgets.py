"""Budgets and the regression check.

`metrics(row)` flattens one audit row (a Triton variant or a CUDA C++ kernel) into the numbers the budgets and
the regression check compare. Budgets live in a JSON file (benchmarks/results/sm90-static/budgets.json): each
selects rows (by kind, kernel/module name patterns, dtype, layout, kept) and states bounds on metrics, or, for
`conv_launches`, what the best configuration of every conv launch must reach. The regression check compares
each row with the row of the same id in the committed baseline: a row that got worse on any tracked metric is
a regression (CI fails); the budgets not yet met are listed (CI does not fail on them yet: issue 30).
"""
import fnmatch
import json

MMA_RANK = {"": 0, "HMMA": 1, "DMMA": 1, "HGMMA sync": 2, "HGMMA async": 3, "tcgen05": 3}


def metrics(row):
    """The flat numbers of one row (None where the row failed to compile)."""
    s = row.get("sass")
    if not s:
        return None
    lp = s.get("loop") or {}
    loads, stores, cpa = lp.get("global_loads", {}), lp.get("global_stores", {}), lp.get("cp_async", {})
    vector = loads.get("16", 0) + loads.get("32", 0) + stores.get("16", 0) + stores.get("32", 0) + cpa.get("16", 0)
    narrow = sum(n for w, n in loads.items() if int(w) < 16)
    widths = [int(w) for h in (loads, stores, cpa) for w in h]
    occ = row.get("occupancy") or row.get("occupancy_256_threads") or {}
    return {
        "spills": s["spill_stores"] + s["spill_loads"],
        "spill_bytes": s["spill_store_bytes"] + s["spill_load_bytes"],
        "loop_spills": (lp.get("spill_stores") or 0) + (lp.get("spill_loads") or 0),
        "registers": s["registers"],
        "occupancy": occ.get("warps_fraction"),
        "mma_kind": s["mma_kind"],
        "mma_rank": MMA_RANK.get(s["mma_kind"], 0),
        "mma_per_issue": lp.get("mma_per_issue"),
        "tma": s["tma_instructions"],
        "loop_instructions": lp.get("instructions"),
        "loop_barriers": lp.get("barriers"),
        "vector_accesses": vector,
        "narrow_loads": narrow,
        "narrow_loads_per_vector": (narrow / vector) if vector else (float("inf") if narrow else 0.0),
        "widest_access": max(widths) if widths else 0,
        "bytes_per_warp_instruction": lp.get("bytes_per_warp_instruction"),
    }


def load(path):
    with open(path) as f:
        return json.load(f)["budgets"]


def _selected(row, sel, kind):
    if sel.get("kind", kind) != kind:
        return False
    if "arch" in sel and row.get("arch") != sel["arch"]:
        return False
    for field in ("kernel", "module", "dtype", "layout"):
        pats = sel.get(field)
        if pats is None:
            continue
        pats = [pats] if isinstance(pats, str) else pats
        if not any(fnmatch.fnmatchcase(str(row.get(field, "")), p) for p in pats):
            return False
    if "kept" in sel and bool(row.get("kept", True)) != sel["kept"]:
        return False
    return True


def _violations(m, budget):
    out = []
    for k, bound in budget.get("max", {}).items():
        v = m.get(k)
        if v is None or v > bound:
            out.append(f"{k} {_fmt(v)} > {bound}")
    for k, bound in budget.get("min", {}).items():
        v = m.get(k)
        if v is None or v < bound:
            out.append(f"{k} {_fmt(v)} < {bound}")
    return out


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def evaluate(budgets, triton_rows, cuda_rows, conv_launches):
    """[{id, what, met, checked, failing: [(row description, reasons)]}] for every budget."""
    results = []
    for b in budgets:
        failing, checked = [], 0
        if b.get("applies_to") == "conv_launches":
            for site in conv_launches:
                if site.get("arch", 90) != b.get("arch", 90):
                    continue
                if b.get("every_kept_config", True) and not site.get("every_kept_config", True):
                    continue  # only one configuration of this launch was compiled: its best is unknown
                checked += 1
                best = None
                for vid in site["configs"]:
                    r = triton_rows.get(vid)
                    m = metrics(r) if r else None
                    if not m or m["spills"] or m["mma_kind"] not in b.get("mma_kind", [m["mma_kind"]]):
                        continue
                    if m["mma_per_issue"] is not None and (best is None or m["mma_per_issue"] > best):
                        best = m["mma_per_issue"]
                if best is None or best < b["min_mma_per_issue"]:
                    failing.append((f"{site['op']} {site['kernel']} {site['shape']} {site['dtype']} {site['layout']}",
                                    [f"best spill-free {'/'.join(b.get('mma_kind', []))} MMA/issue {_fmt(best)} < "
                                     f"{b['min_mma_per_issue']}"]))
        else:
            for kind, rows in (("triton", triton_rows.values()), ("cuda", cuda_rows)):
                for r in rows:
                    if not _selected(r, b.get("select", {}), kind):
                        continue
                    m = metrics(r)
                    checked += 1
                    reasons = ["does not compile"] if m is None else _violations(m, b)
                    if reasons:
                        failing.append((describe(r), reasons))
        results.append({"id": b["id"], "what": b["what"], "met": not failing and checked > 0, "checked": checked,
                        "failing": failing, "enforced": b.get("enforced", False)})
    return results


def describe(row):
    if "config" in row:
        return f"sm_{row['arch']} {row['kernel']} {row['dtype']} {row['layout']} {row['config']} [{row['id']}]"
    return f"sm_{row['arch']} {row['kernel']} [{row['family']}]"


# (metric, direction, relative tolerance): a row is worse when the metric moves against its direction by more
# than the tolerance. Exact metrics (spills, widths, counts) have none.
TRACKED = [
    ("spills", "lower", 0.0),
    ("spill_bytes", "lower", 0.0),
    ("loop_spills", "lower", 0.0),
    ("mma_rank", "higher", 0.0),
    ("mma_per_issue", "higher", 0.05),
    ("vector_accesses", "higher", 0.0),
    ("narrow_loads", "lower", 0.0),
    ("widest_access", "higher", 0.0),
    ("bytes_per_warp_instruction", "higher", 0.05),
    ("occupancy", "higher", 0.0),
]


def regressions(current, baseline):
    """Rows of `current` ({id: row}) worse than the row of the same id in `baseline`: [(description, [what])].
    Rows only in one of them are not compared (a changed kernel signature makes a new row: refresh the
    baseline with the full audit)."""
    out = []
    for vid, row in current.items():
        base = baseline.get(vid)
        if base is None:
            continue
        m, mb = metrics(row), metrics(base)
        if mb is None:
            continue
        if m is None:
            out.append((describe(row), [f"no longer compiles: {row.get('error', '')[:200]}"]))
            continue
        worse = []
        for k, direction, tol in TRACKED:
            a, b = m.get(k), mb.get(k)
            if a is None or b is None:
                continue
            if direction == "lower" and a > b * (1 + tol) + (0 if tol else 0):
                worse.append(f"{k} {_fmt(b)} -> {_fmt(a)}")
            elif direction == "higher" and a < b * (1 - tol):
                worse.append(f"{k} {_fmt(b)} -> {_fmt(a)}")
        if m["mma_kind"] != mb["mma_kind"] and m["mma_rank"] < mb["mma_rank"]:
            worse.append(f"MMA {mb['mma_kind']} -> {m['mma_kind'] or 'none'}")
        if worse:
            out.append((describe(row), worse))
    return out
