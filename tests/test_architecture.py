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
