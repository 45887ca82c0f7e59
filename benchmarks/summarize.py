"""Print a compact table from the benchmark JSON files in a folder: per benchmark, family, config and pass,
the geometric mean over shapes of each variant's speed-up against eager and torch.compile and its fraction
of the copy bandwidth (or of the bf16 matmul rate), as measured in that run.

    python benchmarks/summarize.py benchmarks/results/gpu_check
"""
import glob
import json
import math
import os
import sys
from collections import defaultdict


def _gmean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(folder):
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
            key = tuple(str(r.get(k, "")) for k in ("family", "config", "pass_", "variant"))
            groups[key].append(r)
        for key, rs in sorted(groups.items()):
            parts = []
            for metric in ("vs_eager", "vs_compile", "copy_fraction", "matmul_fraction"):
                g = _gmean([r.get(metric) for r in rs])
                if g is not None:
                    parts.append(f"{metric}={g:.2f}")
            errors = sum(1 for r in rs if "error" in r)
            if errors:
                parts.append(f"errors={errors}")
            lines.append("  " + " ".join(k for k in key if k) + ": " + (", ".join(parts) or "-"))
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"))
