"""The CUDA C++ half of the audit: every kernel of the built extension (fastnets/_C*.so), per arch it was
compiled for (TORCH_CUDA_ARCH_LIST; sm_100 appears when the extension is built with 10.0 in it), read from
the cubins cuobjdump extracts. No shapes are involved: each template instantiation is one kernel."""
import glob
import os
import re
import tempfile

from . import hardware, sass


def extension_path():
    """The compiled extension next to the fastnets package, or None."""
    import fastnets

    found = sorted(glob.glob(os.path.join(os.path.dirname(fastnets.__file__), "_C*.so")))
    return found[0] if found else None


def _short(demangled):
    """fastnets::bn::(anonymous namespace)::elementwise_kernel<fastnets::bn::(anonymous namespace)::ApplyOp<
    c10::BFloat16, float>, 8>(...) -> elementwise_kernel<ApplyOp<BFloat16, float>, 8>."""
    name = re.sub(r"\(anonymous namespace\)::", "", demangled)
    name = re.sub(r"\b(fastnets|bn|se|c10|at)::", "", name)
    depth, out = 0, []
    for ch in name:  # drop the parameter list: the first '(' at template depth 0
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            break
        out.append(ch)
    out = "".join(out).strip()
    return out[5:] if out.startswith("void ") else out


def _dtype(name):
    """The element type of a kernel instantiation: the first of BFloat16 / Half / float / double in its name."""
    m = re.search(r"\b(BFloat16|Half|float|double)\b", name)
    return {"BFloat16": "bfloat16", "Half": "float16", "float": "float32", "double": "float64"}[m.group(1)] if m else "?"


def audit(path=None, kernel=None, archs=None):
    """Rows for every kernel of the extension at `path` (default: the built one), for the cubins of `archs`
    (default every arch it holds); [] and a reason if none."""
    path = path or extension_path()
    if path is None:
        return [], "the CUDA extension fastnets/_C*.so is not built (pip install --no-build-isolation -e .)"
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastnets-audit-cubins-") as tmp:
        cubins = sass.extract_cubins(path, tmp)
        for fname, cubin in cubins.items():
            m = re.search(r"sm_(\d+)", fname)
            arch = int(m.group(1)) if m else 0
            if archs and arch not in archs:
                continue
            family = fname.split(".")[0]
            funcs = sass.parse(sass.disassemble(cubin))
            res = sass.resource_usage(cubin)
            names = sass.demangle(funcs)
            for fn, (instrs, labels) in funcs.items():
                short = _short(names[fn])
                if kernel and kernel not in short and kernel not in fn:
                    continue
                s = sass.summarize(instrs, labels, res.get(fn), arch)
                occ = hardware.occupancy(s["registers"], 8, s["static_shared_bytes"])
                rows.append({
                    # keyed by the demangled name: the mangled one holds the anonymous namespace's hash, which
                    # changes with every build, so no row would ever meet its baseline row (the regression check)
                    "id": f"sm{arch}-cuda-{family}-{short}", "arch": arch, "kernel": short, "mangled": fn,
                    "family": family,
                    "dtype": _dtype(short),
                    "sass": s,
                    # the block size is the launch's (not in the cubin): occupancy for 256 threads, the most common
                    "occupancy_256_threads": None if occ is None else {"blocks": occ[0], "warps_fraction": occ[1],
                                                                       "limit": occ[2]},
                })
    if not rows and archs:
        return [], f"the extension holds no cubin for sm_{'/sm_'.join(map(str, archs))} (TORCH_CUDA_ARCH_LIST)"
    return rows, None
