"""The table of how much of each zoo model fastnets.convert fuses (docs/convert-and-zoo.md), from the zoo
test's output.

    FASTNETS_ZOO_OUT=zoo_out python -m pytest tests/test_zoo.py
    python tools/zoo_table.py zoo_out            # print the table
    python tools/zoo_table.py zoo_out --write    # replace it between the markers of docs/convert-and-zoo.md

Each row: the architecture, the share of its BatchNorm layers, activations (each call of one) and
squeeze-excite modules that run fused after convert, and the most common reason for what was left.
"""
import argparse
import collections
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import docs_block  # noqa: E402


def load(directory):
    rows = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            rows.append(json.load(f))
    if not rows:
        raise SystemExit(f"no zoo results (*.json) in {directory}: run FASTNETS_ZOO_OUT={directory} "
                         "python -m pytest tests/test_zoo.py first")
    return rows


def share(pair):
    fused, total = pair
    return "-" if total == 0 else f"{fused}/{total} ({100 * fused / total:.0f}%)"


def _reason(unfused):
    """The most common reason left, shortened to its gist (names and counts removed)."""
    if not unfused:
        return ""
    gists = collections.Counter(re.sub(r"\(.*\)$", "", why).split(":")[0].strip()[:70] for _, _, why in unfused)
    gist, n = gists.most_common(1)[0]
    return f"{gist} ({n})"


def table(rows):
    lines = ["| model | BatchNorm fused | activations fused | squeeze-excite fused | most common reason left |",
             "|---|---|---|---|---|"]
    for row in rows:
        s = row["shares"]
        lines.append(f"| {row['model']} | {share(s['batchnorm'])} | {share(s['activation'])} | {share(s['se'])} "
                     f"| {_reason(row['unfused'])} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="FASTNETS_ZOO_OUT of the zoo test run")
    parser.add_argument("--write", action="store_true",
                        help=f"replace the table in {docs_block.BLOCKS['zoo-table'][0]} between its markers")
    parser.add_argument("--page", help="with --write: this page instead (a copy, say)")
    args = parser.parse_args(argv)
    text = table(load(args.directory))
    if args.write:
        docs_block.replace("zoo-table", text, args.page)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
