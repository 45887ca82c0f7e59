"""Build fastnets, with its CUDA C++ extension `fastnets._C` when a CUDA toolkit and a CUDA torch are present.

`fastnets._C` is built on the LibTorch stable ABI (torch/csrc/stable + torch/headeronly headers only,
TORCH_TARGET_VERSION = torch 2.10) with the static CUDA runtime and Python's limited API, so that ONE
`cp310-abi3` wheel loads on every torch from 2.10 on (tools/wheel_matrix.sh checks 2.10, 2.11, 2.14, 2.15).

FASTNETS_BUILD_CUDA=0 forces a pure-Python install (reference and Triton backends only).
TORCH_CUDA_ARCH_LIST is honoured. Without it a wheel (bdist_wheel: `pip wheel`, `python -m build`) gets
sm_80, sm_90, sm_100, sm_110 and sm_120 cubins plus compute_120 PTX for later GPUs; an in-place
development build (`pip install -e .`) gets sm_80 and sm_90 only, which compiles in a third of the time.
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEV_ARCHS = "8.0;9.0"
WHEEL_ARCHS = "8.0;9.0;10.0;11.0;12.0+PTX"
# The oldest torch whose stable ABI the extension targets; fastnets/_extension.py reads it from the built
# library's stamp (build_info.cpp) to refuse a torch below it with a clear message.
ABI_TARGET = (2, 10)
ABI_TARGET_HEX = "0x%02x%02x000000000000" % ABI_TARGET


def _version():
    with open(os.path.join(HERE, "fastnets", "version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def _has_cudart(root):
    return root and any(
        glob.glob(os.path.join(root, d, "libcudart.so*")) for d in ("lib64", "lib", "targets/x86_64-linux/lib")
    )


def _find_cuda_home():
    """Where the CUDA toolkit really is. `/usr/local/bin/nvcc` may be a wrapper script, from which torch
    guesses CUDA_HOME=/usr/local and the link fails for want of libcudart: prefer a root that has it."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        # A wrapper script: look for the path it execs.
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if not head.startswith(b"\x7fELF"):
                m = re.search(rb"(/\S+)/bin/nvcc", head)
                if m:
                    candidates.append(m.group(1).decode())
        except OSError:
            pass
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")) and _has_cudart(root):
            return root
    return None


def _pip_cuda_include_dirs():
    """torch's CUDA headers include cusparse.h, cublas_v2.h, ... which pip's `nvidia-*` packages ship
    (site-packages/nvidia/cu13/include, or nvidia/<lib>/include for CUDA 12 wheels)."""
    import site

    roots = list(site.getsitepackages()) + [site.getusersitepackages()]
    dirs = []
    for root in roots:
        dirs += sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
    seen, out = set(), []
    for d in dirs:
        if os.path.isdir(d) and d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _cuda_extension():
    if os.environ.get("FASTNETS_BUILD_CUDA", "1") == "0":
        print("fastnets: FASTNETS_BUILD_CUDA=0, pure-Python install", file=sys.stderr)
        return None, {}
    try:
        import torch
    except ImportError:
        print("fastnets: torch not importable at build time, pure-Python install", file=sys.stderr)
        return None, {}
    if torch.version.cuda is None:
        print("fastnets: torch has no CUDA, pure-Python install", file=sys.stderr)
        return None, {}
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        print("fastnets: no CUDA toolkit (nvcc + libcudart) found, pure-Python install", file=sys.stderr)
        return None, {}
    os.environ["CUDA_HOME"] = cuda_home
    building_wheel = any(a in ("bdist_wheel", "bdist") for a in sys.argv)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", WHEEL_ARCHS if building_wheel else DEV_ARCHS)
    import torch.utils.cpp_extension as cpp_ext

    cpp_ext.CUDA_HOME = cuda_home  # torch resolved it at import time, possibly wrongly
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    print(f"fastnets: building fastnets._C with CUDA_HOME={cuda_home} for {archs}", file=sys.stderr)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    # The toolkit's own headers first; pip's nvidia include folders only fill in what it lacks.
    include_dirs = [os.path.join(HERE, "csrc"), os.path.join(cuda_home, "include")] + _pip_cuda_include_dirs()
    stamp = (
        f"abi_target={ABI_TARGET[0]}.{ABI_TARGET[1]},torch={torch.__version__},"
        f"cuda={torch.version.cuda},archs={archs}"
    )
    defines = [
        f'-DFASTNETS_CUDA_ARCHS="{archs}"',
        f'-DFASTNETS_BUILD_STAMP="{stamp}"',
        # The stable ABI: only shims that torch 2.10 has (newer APIs are compiled out), and the CUDA parts
        # of the shim headers (aoti_torch_get_current_cuda_stream).
        f"-DTORCH_TARGET_VERSION={ABI_TARGET_HEX}",
        "-DUSE_CUDA",
        "-DPy_LIMITED_API=0x030a0000",
    ]
    # The -gencode flags, explicitly: cpp_extension adds its own only when no compile flag contains "arch",
    # and the two defines above do, so without these nvcc compiled for its default arch (sm_75) alone and the
    # library's stamp named archs it did not hold (tests/test_wheel_abi.py reads the cubins back).
    gencode = cpp_ext._get_cuda_arch_flags()
    ext = cpp_ext.CUDAExtension(
        name="fastnets._C",
        sources=sources,
        include_dirs=include_dirs,
        py_limited_api=True,
        extra_compile_args={
            # No -std flag: BuildExtension adds the one this torch's headers need (c++17 on older torch, c++20 on newer).
            "cxx": ["-O3"] + defines,
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo"] + defines + gencode,
        },
        # The static CUDA runtime: a libcudart.so.13 dependency would not load next to torch 2.10's CUDA 12.8.
        extra_link_args=["-l:libcudart_static.a", "-ldl", "-lrt", "-lpthread"],
    )
    # CUDAExtension links the shared cudart and torch_python; the ops need neither (no Python binding:
    # they register through the stable torch.library C shims).
    ext.libraries = [lib for lib in ext.libraries if lib not in ("cudart", "torch_python")]
    return ext, {"build_ext": cpp_ext.BuildExtension.with_options(use_ninja=True)}


ext, cmdclass = _cuda_extension()
setup(
    name="fastnets",
    version=_version(),
    packages=find_packages(include=["fastnets", "fastnets.*"]),
    ext_modules=[ext] if ext is not None else [],
    cmdclass=cmdclass,
    # One wheel for CPython >= 3.10 (the library holds no Python C-API code; Py_LIMITED_API guards that);
    # a pure-Python build stays py3-none-any.
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext is not None else {},
)
