"""The generated blocks of the documentation: each is a table a script writes between two markers of one
docs page, never typed in. One place names them, so that the writers and tests/test_docs.py agree.

    python tools/docs_block.py NAME [--page PATH] < table.md    # replace block NAME's text with stdin
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (the page it lives on, relative to the repository root; begin marker; end marker; who writes it)
BLOCKS = {
    "bench-results": ("docs/results.md", "<!-- bench-results:start -->", "<!-- bench-results:end -->",
                      "benchmarks/update_results.py"),
    "zoo-table": ("docs/convert-and-zoo.md", "<!-- zoo-table:begin (tools/zoo_table.py) -->",
                  "<!-- zoo-table:end -->", "tools/zoo_table.py"),
    "wheel-matrix": ("docs/install.md", "<!-- wheel-matrix:begin (tools/wheel_matrix.sh) -->",
                     "<!-- wheel-matrix:end -->", "tools/wheel_matrix.sh"),
}


def page(name):
    """The absolute path of the page that holds block `name`."""
    return os.path.join(ROOT, BLOCKS[name][0])


def read(name, path=None):
    """The text between block `name`'s markers (without them)."""
    _, begin, end, _ = BLOCKS[name]
    with open(path or page(name)) as f:
        text = f.read()
    return _split(text, begin, end, path or page(name))[1]


def _split(text, begin, end, path):
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"{path} must hold {begin} then {end}, once each")
    head, rest = text.split(begin, 1)
    body, tail = rest.split(end, 1)
    return head, body, tail


def replace(name, body, path=None):
    """Replace block `name`'s text with `body` in its page, or in `path`: the begin marker, its own line,
    the body, a blank line, the end marker (Markdown then ends a table or list before the marker)."""
    _, begin, end, _ = BLOCKS[name]
    path = path or page(name)
    with open(path) as f:
        text = f.read()
    head, _, tail = _split(text, begin, end, path)
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{body.strip(chr(10))}\n\n{end}{tail}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(BLOCKS))
    parser.add_argument("--page", help="the page to write (default: the block's own page)")
    args = parser.parse_args(argv)
    replace(args.name, sys.stdin.read(), args.page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
