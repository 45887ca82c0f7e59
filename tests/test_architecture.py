"""ARCHITECTURE.md stays true: every op family in its table has the files it names, each ops/ module
registers the family with the backends the table lists, and every family registered in the code is in the
table."""
import importlib
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLACES = ("nn", "ops", "reference", "triton_kernels", "cuda_kernels", "csrc")


def _families():
    text = open(os.path.join(ROOT, "ARCHITECTURE.md")).read()
    rows = re.findall(r"^\| (\w+) \|(.*)\|$", text, flags=re.M)
    table = {}
    for name, rest in rows:
        cells = [c.strip() for c in rest.split("|")]
        if name == "family":
            assert cells == list(PLACES), cells
            continue
        assert len(cells) == len(PLACES), (name, cells)
        table[name] = dict(zip(PLACES, cells))
    return table


def test_every_family_in_the_table_has_its_files():
    table = _families()
    assert {"batch_norm", "conv", "squeeze_excite"} <= set(table)
    for family, places in table.items():
        for place, path in places.items():
            if path == "-":
                continue
            assert path.startswith(place + "/"), (family, place, path)
            full = os.path.join(ROOT, path if place == "csrc" else os.path.join("fastnets", path))
            assert os.path.isfile(full), f"ARCHITECTURE.md names {path} for {family}, which does not exist"


def test_registered_families_match_the_table():
    from fastnets.ops import _registry

    table = _families()
    for family, places in table.items():
        importlib.import_module(f"fastnets.{places['ops'][:-3].replace('/', '.')}")
    for family, (modules, _order) in _registry._MODULES.items():
        if family.startswith("_"):
            continue  # registered by a test (e.g. a deliberately broken backend in test_project.py)
        assert family in table, f"family {family!r} is registered but missing from ARCHITECTURE.md's table"
        for backend, module in modules.items():
            place = {"reference": "reference", "triton": "triton_kernels", "cuda": "cuda_kernels"}.get(backend)
            expected = table[family].get(place)
            if expected and expected != "-":
                assert module == "." + expected[:-3].replace("/", "."), (family, backend, module)


# folder -> the fastnets folders it must not import (ARCHITECTURE.md, "The layers"): the fast backends do
# not depend on the oracle or on the layers above them, and the oracle depends on no backend.
FORBIDDEN_IMPORTS = {
    "triton_kernels": ("reference", "ops", "nn", "cuda_kernels"),
    "cuda_kernels": ("reference", "ops", "nn", "triton_kernels"),
    "reference": ("triton_kernels", "cuda_kernels", "ops", "nn"),
}


def _fastnets_imports(path, package):
    """The fastnets modules a file imports (anywhere in it, functions included), as dotted names."""
    import ast

    out = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out += [base] + [f"{base}.{a.name}" for a in node.names]
    return [m for m in out if m == "fastnets" or m.startswith("fastnets.")]


def test_backend_folders_import_no_layer_above_and_not_the_oracle():
    bad = []
    for folder, forbidden in FORBIDDEN_IMPORTS.items():
        root = os.path.join(ROOT, "fastnets", folder)
        for name in sorted(os.listdir(root)):
            if not name.endswith(".py"):
                continue
            for mod in _fastnets_imports(os.path.join(root, name), f"fastnets.{folder}"):
                top = mod.split(".")[1] if "." in mod else ""
                if top in forbidden:
                    bad.append(f"fastnets/{folder}/{name} imports {mod}")
    assert not bad, "imports that climb the layers or reach the oracle:\n" + "\n".join(bad)


def test_the_layer_check_sees_relative_imports():
    """The check above parses `from ..reference.batch_norm import x` as fastnets.reference.batch_norm."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write("def f():\n    from ..reference.batch_norm import acc_dtype\n    from . import conv\n")
    try:
        mods = _fastnets_imports(f.name, "fastnets.triton_kernels")
    finally:
        os.remove(f.name)
    assert "fastnets.reference.batch_norm" in mods and "fastnets.triton_kernels.conv" in mods
