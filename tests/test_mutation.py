"""The mutation check in CI (tests/mutation.py; docs/testing.md, "Mutation check"): the catalogue is current (every
snippet occurs exactly once, every selected test exists, every layer has mutants), and the fast subset's
planted bugs - one per layer - are each killed by the suite."""
import re
import subprocess
import sys
from pathlib import Path

import mutation

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("fastnets/reference/", "fastnets/triton_kernels/", "fastnets/ops/", "fastnets/nn/", "fastnets/convert")


def test_catalogue_snippets_occur_exactly_once():
    assert mutation.check_catalogue(mutation.MUTANTS) == []


def test_catalogue_covers_every_layer():
    assert len(mutation.MUTANTS) >= 30
    for subset in (mutation.MUTANTS, [m for m in mutation.MUTANTS if m.fast]):
        files = [mutation.locate(m)[0] or m.file for m in subset]
        for layer in LAYERS:
            assert any(f.startswith(layer) for f in files), f"no mutant in {layer}"
    assert 6 <= sum(m.fast for m in mutation.MUTANTS) <= 8


def test_selected_tests_exist():
    """A renamed test would make pytest exit with a usage error (an error, never a kill); catch it here."""
    for m in mutation.MUTANTS:
        for arg in m.tests:
            if not arg.startswith("tests/"):
                continue
            path, _, name = arg.partition("::")
            assert (ROOT / path).is_file(), f"{m.name}: {path} is missing"
            if name:
                func = name.split("[")[0]  # a parametrized id names its function before the "["
                assert re.search(rf"^def {re.escape(func)}\(", (ROOT / path).read_text(), re.M), f"{m.name}: {arg}"


def test_fast_subset_is_killed():
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "mutation.py"), "--fast"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    n = sum(m.fast for m in mutation.MUTANTS)
    assert proc.returncode == 0 and f"killed {n}/{n} mutants" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
