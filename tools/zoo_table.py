"""The README's table of how much of each zoo model fastnets.convert fuses, from the zoo test's output.

    FASTNETS_ZOO_OUT=zoo_out python -m pytest tests/test_zoo.py
    python tools/zoo_table.py zoo_out            # print the table
    python tools/zoo_table.py zoo_out --readme README.md   # replace it between the README's markers

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

BEGIN = "<!-- zoo-table:begin (tools/zoo_table.py) -->"
END = "<!-- zoo-table:end -->"


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


def replace_in_readme(path, text):
    with open(path) as f:
        readme = f.read()
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(head + BEGIN + "\n" + text + "\n" + END + tail)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="FASTNETS_ZOO_OUT of the zoo test run")
    parser.add_argument("--readme", help="replace the table in this README between its markers")
    args = parser.parse_args(argv)
    text = table(load(args.directory))
    if args.readme:
        replace_in_readme(args.readme, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
