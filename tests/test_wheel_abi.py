"""fastnets._C is on the LibTorch stable ABI, so that one binary loads on every torch >= its target (2.10).

Read from the built library itself (nm, readelf), not from our build flags: it imports no C++-mangled
torch/c10/ATen symbol (those change with every torch release), only C shims that torch 2.10 already has
(tests/stable_abi_shim_versions.txt: torch's own list of when each shim appeared; plus the version guards
of the running torch's torch/csrc/stable/c/shim.h, which name shims newer than that list), and it does not
depend on the shared CUDA runtime (linked statically: torch 2.10's CUDA 12.8 cannot provide libcudart.so.13).
"""
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

import fastnets
from fastnets import _extension
from fastnets.audit import sass

HERE = os.path.dirname(os.path.abspath(__file__))
ABI_TARGET = (2, 10)
TORCH_NAMESPACES = ("c10::", "at::", "torch::", "caffe2::", "aoti::")


def _library():
    if torch.version.cuda is None:
        pytest.skip("torch has no CUDA, so setup.py builds no extension")
    if not (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")):
        pytest.skip("no nvcc on this machine, so setup.py builds no extension")
    if os.environ.get("FASTNETS_BUILD_CUDA", "1") == "0":
        pytest.skip("FASTNETS_BUILD_CUDA=0: installed without the extension")
    for tool in ("nm", "readelf", "c++filt"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (binutils) is not installed")
    libs = glob.glob(os.path.join(os.path.dirname(fastnets.__file__), "_C*.so"))
    assert libs, "nvcc and a CUDA torch are here but fastnets._C was not built"
    assert len(libs) == 1, f"several builds of fastnets._C side by side (stale ones?): {libs}"
    return libs[0]


def _undefined(lib):
    out = subprocess.run(["nm", "-D", "--undefined-only", lib], check=True, capture_output=True, text=True).stdout
    return [line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()]


def _version_of(tag):  # "TORCH_VERSION_2_11_0" -> (2, 11)
    m = re.fullmatch(r"TORCH_VERSION_(\d+)_(\d+)_\d+", tag)
    assert m, tag
    return int(m.group(1)), int(m.group(2))


def _shims_newer_than_target():
    """{shim: version} for every shim that appeared after the ABI target."""
    newer = {}
    with open(os.path.join(HERE, "stable_abi_shim_versions.txt")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, tag = (s.strip() for s in line.split(":"))
                if _version_of(tag) > ABI_TARGET:
                    newer[name] = tag
    # Shims newer than that copy: the running torch's header declares them inside a version guard.
    header = os.path.join(os.path.dirname(torch.__file__), "include", "torch", "csrc", "stable", "c", "shim.h")
    if os.path.exists(header):
        guards = []  # one entry per open #if: its version, or None for other conditions
        for line in open(header):
            m = re.match(r"\s*#\s*if TORCH_FEATURE_VERSION >= (TORCH_VERSION_\d+_\d+_\d+)", line)
            if m:
                guards.append(_version_of(m.group(1)))
            elif re.match(r"\s*#\s*if", line):
                guards.append(None)
            elif re.match(r"\s*#\s*endif", line) and guards:
                guards.pop()
            else:
                active = max((g for g in guards if g), default=None)
                if active and active > ABI_TARGET:
                    for name in re.findall(r"\b((?:aoti_)?torch_\w+)\s*\(", line):
                        newer.setdefault(name, "TORCH_VERSION_%d_%d_0" % active)
    return newer


def test_shim_list_names_the_shims_torch_2_10_lacks():
    newer = _shims_newer_than_target()
    # the symbol the issue saw break torch 2.10/2.11 when targeting 2.14
    assert newer.get("torch_exception_get_what_without_backtrace") == "TORCH_VERSION_2_13_0"
    assert "torch_library_impl" not in newer  # a 2.10 shim: allowed


def test_imports_no_mangled_torch_symbol():
    lib = _library()
    mangled = [s for s in _undefined(lib) if s.startswith("_Z")]
    demangled = subprocess.run(["c++filt"], input="\n".join(mangled), check=True, capture_output=True,
                               text=True).stdout.splitlines()
    bad = [d for d in demangled if d.startswith(TORCH_NAMESPACES) or " c10::" in d or " at::" in d]
    assert not bad, f"{lib} uses torch's C++ ABI (breaks on other torch versions): {bad[:20]}"


def test_imports_only_shims_torch_2_10_has():
    lib = _library()
    shims = [s for s in _undefined(lib) if s.startswith(("aoti_torch_", "torch_"))]
    assert shims, "no stable-ABI shim imported at all: is this really the stable-ABI build?"
    newer = _shims_newer_than_target()
    too_new = {s: newer[s] for s in shims if s in newer}
    assert not too_new, f"{lib} needs shims that torch 2.10 does not have: {too_new}"


def test_cuda_runtime_is_linked_statically():
    lib = _library()
    out = subprocess.run(["readelf", "-d", lib], check=True, capture_output=True, text=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    assert needed, out
    assert not [n for n in needed if n.startswith("libcudart.so")], needed
    assert "libtorch_python.so" not in needed, needed  # no Python binding module: the ops go through shims
    # ...and the runtime really is inside (the launches call it)
    assert "cudaLaunchKernel" not in _undefined(lib)


def test_library_stamp_names_abi_target_build_torch_cuda_archs():
    lib = _library()
    stamp = _extension.stamp(lib)
    assert stamp is not None, "no FASTNETS_BUILD_STAMP in the library"
    assert stamp["abi_target"] == "%d.%d" % ABI_TARGET
    assert stamp["cuda"] == torch.version.cuda
    assert re.fullmatch(r"\d+\.\d+.*", stamp["torch"]), stamp
    assert "8.0" in stamp["archs"].split(";") and "9.0" in stamp["archs"].split(";"), stamp
    assert _extension.torch_supported(stamp)[0]


def test_library_holds_machine_code_for_the_archs_its_stamp_names():
    """Every .cu file's device code is there as a cubin for each arch of the stamp, plus PTX for the '+PTX'
    one, and for no other arch: the stamp is read from our defines, the cubins from what nvcc really built
    (once, a define containing "arch" made cpp_extension drop every -gencode flag: sm_75 alone was built)."""
    lib = _library()
    tool = sass.tool("cuobjdump")
    if tool is None:
        pytest.skip("no cuobjdump here (CUDA toolkit or Triton's copy) to list the library's cubins")
    out = subprocess.run([tool, "-lelf", "-lptx", lib], check=True, capture_output=True, text=True).stdout
    cubins = set(re.findall(r"ELF file\s+\d+: (\w+)\.sm_(\w+)\.cubin", out))
    ptx = set(re.findall(r"PTX file\s+\d+: (\w+)\.sm_(\w+)\.ptx", out))
    sources = {name for name, _ in cubins}
    assert sources == {"batch_norm", "squeeze_excite"}, out
    archs = _extension.stamp(lib)["archs"].split(";")
    want_sm = {a.split("+")[0].replace(".", "") for a in archs}
    want_ptx = {a.split("+")[0].replace(".", "") for a in archs if a.endswith("+PTX")}
    for source in sources:
        assert {sm for name, sm in cubins if name == source} == want_sm, (source, archs, out)
        assert {sm for name, sm in ptx if name == source} == want_ptx, (source, archs, out)


def test_older_torch_is_refused_with_a_clear_message(monkeypatch):
    lib = _library()
    stamp = _extension.stamp(lib)
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    ok, why = _extension.torch_supported(stamp)
    assert not ok
    assert "needs torch >= 2.10" in why and "2.9.1" in why and "undefined symbol" not in why
