"""The README and docs/ stay true and short: the README is a five-minute read; every link and every path they
cite exists; its ops table is the registered ops; its example runs; every headline number is on the page it
links to, with the machine it ran on; the generated tables sit between their markers on their docs pages,
are what their writers produce, and their writers write there; the result tables hold the numbers of the
result files they cite."""
import ast
import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import docs_block  # noqa: E402

README_MAX_LINES = 300
# Pages that the README links to and another branch of issue 31 writes; a link to one of these may dangle
# until that branch is merged (then it is checked like every other).
PENDING_PAGES = set()
# The machines a headline number may name; each bullet of the README's headline results names one.
MACHINES = ("2-core AMD EPYC CPU machine", "H100", "H200")


def _read(rel):
    with open(os.path.join(ROOT, rel)) as f:
        return f.read()


def _pages():
    return ["README.md", "ARCHITECTURE.md"] + sorted(os.path.relpath(p, ROOT)
                                                     for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _section(text, heading):
    """The body of the `## heading` section of a Markdown text."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, f"no '## {heading}' section"
    return m.group(1)


def _slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _table(text, first_header):
    """The rows (lists of cells) of the Markdown table whose header starts with `| first_header |`."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_readme_is_a_five_minute_read():
    n = len(_read("README.md").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move the detail into a docs/ page"
    for heading in ("Two commands", "A short example", "Ops and backends", "Headline results", "GPU readiness",
                    "More"):
        _section(_read("README.md"), heading)


def test_every_docs_page_is_listed():
    pages = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))} - {"README.md"}
    pages |= {os.path.basename(p) for p in PENDING_PAGES}
    index, more = _read("docs/README.md"), _section(_read("README.md"), "More")
    for page in sorted(pages):
        assert f"]({page})" in index, f"docs/README.md does not list {page}"
        assert f"](docs/{page})" in more, f"the README's 'More' list does not link docs/{page}"


@pytest.mark.parametrize("page", _pages())
def test_links_resolve(page):
    """Every relative link points at a file of the repository, and an anchor at one of its headings."""
    text = re.sub(r"```.*?```", "", _read(page), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        rel = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if rel in PENDING_PAGES and not os.path.exists(os.path.join(ROOT, rel)):
            continue
        assert os.path.exists(os.path.join(ROOT, rel)), f"{page}: link to {target}: {rel} does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", _read(rel), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page}: link to {target}: no such heading in {rel}"


def _expand_braces(s):
    m = re.search(r"\{([^{}]*)\}", s)
    if not m:
        return [s]
    return [x for alt in m.group(1).split(",") for x in _expand_braces(s[:m.start()] + alt + s[m.end():])]


@pytest.mark.parametrize("page", _pages())
def test_cited_files_exist(page):
    """A repository path in backticks (benchmarks/results/cpu/anomaly_mnist.{md,json}, tests/conftest.py,
    ...) names a file or folder that exists, so a result cited as evidence cannot silently go missing."""
    roots = ("benchmarks/", "tests/", "tools/", "fastnets/", "csrc/", "docs/", ".ci/")
    missing = []
    for cited in re.findall(r"`([\w./{},\-]+)`", _read(page)):
        for path in _expand_braces(cited):
            if path.startswith(roots) and not os.path.exists(os.path.join(ROOT, path)):
                missing.append(path)
    assert not missing, f"{page} cites files that do not exist: {missing}"


def test_readme_ops_table_is_the_registered_ops():
    import torch

    import fastnets
    import fastnets.augment
    import fastnets.nn
    from fastnets.ops import _registry

    rows = _table(_section(_read("README.md"), "Ops and backends"), "family")
    families = {r[0]: r for r in rows}
    listed_ops = set()
    for family, _, ops, modules, backends in rows:
        listed_ops |= set(re.findall(r"`(\w+)`", ops))
        for name in re.findall(r"`(\w+)`", modules):
            assert hasattr(fastnets.nn, name) or hasattr(fastnets.augment, name), (family, name)
        named = set(re.findall(r"`(\w+)`", backends)) - {"auto"}
        if family in _registry._MODULES:
            assert named == set(_registry.implemented(family)), (family, named, _registry.implemented(family))
        else:
            assert not named and "batch_norm's" in backends, (family, backends)
    registered = {n for n in dir(torch.ops.fastnets) if isinstance(getattr(torch.ops.fastnets, n),
                                                                   torch._ops.OpOverloadPacket)}
    assert listed_ops == registered, (sorted(listed_ops - registered), sorted(registered - listed_ops))
    assert set(_registry._MODULES) <= set(families)
    arch = re.findall(r"^\| (\w+) \|", _read("ARCHITECTURE.md"), flags=re.M)
    assert set(families) == set(arch) - {"family"}, "the README's families are ARCHITECTURE.md's"
    backend_names = {r[0].strip("`") for r in _table(_section(_read("README.md"), "Ops and backends"), "name")}
    assert backend_names == set(fastnets.backends.CONCRETE), backend_names


def test_readme_example_runs():
    """The README's example, on this machine's device, and the block's output against torch's own."""
    import torch

    blocks = re.findall(r"```python\n(.*?)\n```", _section(_read("README.md"), "A short example"), flags=re.S)
    assert len(blocks) == 1
    scope = {}
    exec(compile(blocks[0], "README.md example", "exec"), scope)
    bn, x, y, y_ref = scope["bn"], scope["x"], scope["y"], scope["y_ref"]
    with torch.no_grad():
        ref = torch.relu(torch.nn.functional.batch_norm(x.double(), None, None, training=True) + x.double())
    assert bn.num_batches_tracked.item() == 2
    assert torch.allclose(y.double(), ref, atol=1e-4) and torch.allclose(y_ref.double(), ref, atol=1e-4)
    assert scope["report"].shares()["batchnorm"][0] > 0


def test_headline_numbers_are_on_the_pages_they_link():
    """Each headline bullet names the machine it ran on, links a docs page, and every number it states is
    on that page (the page's tables are in turn checked against the result files below)."""
    bullets = re.split(r"^- ", _section(_read("README.md"), "Headline results"), flags=re.M)[1:]
    assert len(bullets) >= 5
    for bullet in bullets:
        flat = " ".join(bullet.split())
        assert any(m in flat for m in MACHINES), f"names no machine: {flat[:80]}"
        links = re.findall(r"\]\((docs/[\w\-]+\.md)\)", flat)
        assert links, f"links no docs page: {flat[:80]}"
        page = " ".join(" ".join(_read(l).split()) for l in links).replace("**", "")
        prose = re.sub(r"\[[^\]]*\]\([^)]*\)|`[^`]*`", "", flat)
        for number in re.findall(r"\d+(?:[.,/]\d+)*x?(?: ± \d+\.\d+)?", prose):
            assert number in page, f"{number!r} (headline '{flat[:60]}...') is not on {links}"


def test_generated_blocks_sit_on_their_pages():
    readme = _read("README.md")
    for name, (page, begin, end, writer) in docs_block.BLOCKS.items():
        text = _read(page)
        assert text.count(begin) == 1 and text.count(end) == 1 and text.index(begin) < text.index(end), name
        assert begin not in readme and end not in readme, f"{name} belongs on {page}, not in the README"
        assert os.path.exists(os.path.join(ROOT, writer)), writer
        assert docs_block.read(name).strip(), name


def test_results_block_is_generated_from_its_json(monkeypatch):
    """docs/results.md's table is exactly what benchmarks/update_results.py makes of the JSON it names."""
    # for this test only: left on sys.path, benchmarks/ would shadow tests/conftest.py for every process this
    # worker starts later (the SyncBatchNorm ranks import `conftest` by name)
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import update_results

    body = docs_block.read("bench-results")
    source = re.search(r"generated by benchmarks/update_results.py from (\S+) -->", body).group(1)
    with open(os.path.join(ROOT, source)) as f:
        report = json.load(f)
    assert body.strip("\n") == update_results.block(report, source)


def test_update_results_writes_the_docs_page(tmp_path):
    page = tmp_path / "results.md"
    page.write_text("# Results\n\n<!-- bench-results:start -->\nOLD-TABLE\n<!-- bench-results:end -->\ntail\n")
    json_path = os.path.join(ROOT, "benchmarks/results/cpu/fastnets-bench_cpu.json")
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks/update_results.py"), json_path,
                    "--page", str(page)], check=True, cwd=tmp_path)
    text = page.read_text()
    assert "OLD-TABLE" not in text and text.startswith("# Results\n") and text.endswith("<!-- bench-results:end -->\ntail\n")
    assert "from benchmarks/results/cpu/fastnets-bench_cpu.json -->" in text
    assert "| ResNet-50 | 25.6 |" in text
    assert os.path.abspath(docs_block.page("bench-results")) == os.path.join(ROOT, "docs", "results.md")


def test_zoo_table_lists_the_zoo_and_its_writer_writes_there(tmp_path):
    tree = ast.parse(_read("tests/test_zoo.py"))
    zoo = next(node.value for node in tree.body if isinstance(node, ast.Assign)
               and any(getattr(t, "id", None) == "ZOO" for t in node.targets))
    # the dict evaluated with its builders stubbed: the names without importing timm and torchvision
    builders = {n.func.id for n in ast.walk(zoo) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    names = set(eval(compile(ast.Expression(zoo), "tests/test_zoo.py", "eval"),
                     {b: lambda *args, **kwargs: None for b in builders}))
    listed = {r[0] for r in _table(docs_block.read("zoo-table"), "model")}
    assert listed == names, (sorted(listed - names), sorted(names - listed))

    out = tmp_path / "zoo_out"
    out.mkdir()
    (out / "m.json").write_text(json.dumps({"model": "m", "shares": {"batchnorm": [3, 4], "activation": [2, 2],
                                                                      "se": [0, 0]},
                                            "unfused": [["bn", "BatchNorm2d", "has hooks: (1)"]]}))
    page = tmp_path / "convert-and-zoo.md"
    page.write_text(_read("docs/convert-and-zoo.md"))
    subprocess.run([sys.executable, os.path.join(ROOT, "tools/zoo_table.py"), str(out), "--write", "--page",
                    str(page)], check=True)
    rows = _table(docs_block.read("zoo-table", str(page)), "model")
    assert rows == [["m", "3/4 (75%)", "2/2 (100%)", "-", "has hooks (1)"]]
    assert page.read_text().split("<!-- zoo-table:begin")[0] == _read("docs/convert-and-zoo.md").split(
        "<!-- zoo-table:begin")[0]


def test_wheel_matrix_writes_the_docs_page(tmp_path):
    """tools/wheel_matrix.sh with FASTNETS_MATRIX_WRITE=1 puts its table into the install page's block. A
    Python that cannot make a venv keeps it fast: each leg becomes an 'install failed' row."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\n[ \"$1 $2\" = \"-m venv\" ] && exit 1\nexec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    wheel = tmp_path / "fastnets-0.1.0-cp310-abi3-linux_x86_64.whl"
    wheel.write_bytes(b"")
    page = tmp_path / "install.md"
    page.write_text(_read("docs/install.md"))
    env = dict(os.environ, FASTNETS_PYTHON=str(fake), FASTNETS_MATRIX_WRITE="1", FASTNETS_MATRIX_PAGE=str(page),
               FASTNETS_MATRIX_DIR=str(tmp_path / "venvs"))
    run = subprocess.run(["bash", os.path.join(ROOT, "tools/wheel_matrix.sh"), str(wheel), "2.10.0", "2.15.0"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = _table(docs_block.read("wheel-matrix", str(page)), "torch")
    assert [r[:2] for r in rows] == [["2.10.0", "-"], ["2.15.0", "-"]], rows
    assert "install of torch 2.10.0 failed" in rows[0][2]
    assert os.path.abspath(docs_block.page("wheel-matrix")) == os.path.join(ROOT, "docs", "install.md")


def test_anomaly_numbers_are_the_result_files():
    """Every 'mean ± std' on the anomaly page is in one of the result tables it cites (a number typed
    wrong, or a result file replaced, fails)."""
    results = " ".join(_read(os.path.relpath(p, ROOT)) for p in
                       glob.glob(os.path.join(ROOT, "benchmarks/results/*/anomaly_*.md"))).replace("**", "")
    numbers = re.findall(r"\d+\.\d+ ± \d+\.\d+", _read("docs/anomaly-detection.md").replace("**", ""))
    assert len(numbers) > 200
    missing = sorted({n for n in numbers if n not in results})
    assert not missing, missing


def test_memory_table_is_its_json():
    rows = _table(_read("docs/ops-and-backends.md"), "model")
    with open(os.path.join(ROOT, "benchmarks/results/cpu/memory_reference_224.json")) as f:
        runs = {(r["model"].replace("_", ""), r["variant"]): r for r in json.load(f) if r["status"] == "ok"}
    assert len(rows) == 4
    for model, eager, models, ratio_m, convert, ratio_c, _target in rows:
        key = model.lower().replace("-", "")
        assert eager == f"{runs[key, 'eager']['saved_mib_per_image']:.2f}", model
        assert models == f"{runs[key, 'fastnets']['saved_mib_per_image']:.2f}", model
        assert ratio_m == f"{runs[key, 'fastnets']['per_image_vs_eager']:.2f}x", model
        assert convert == f"{runs[key, 'fastnets-convert']['saved_mib_per_image']:.2f}", model
        assert ratio_c == f"{runs[key, 'fastnets-convert']['per_image_vs_eager']:.2f}x", model


def test_mutation_numbers_are_the_result_file():
    with open(os.path.join(ROOT, "benchmarks/results/cpu/mutation_full.json")) as f:
        run = json.load(f)
    assert run["confirmed"]
    text = " ".join(_read("docs/testing.md").split())
    assert f"{run['killed']}/{run['total']} killed in {run['seconds']} s" in text
