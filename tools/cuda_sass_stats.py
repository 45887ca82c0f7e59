"""Per-kernel resource and load statistics of the compiled extension fastnets._C, read from its SASS (no GPU).

    python tools/cuda_sass_stats.py [fastnets/_C.abi3.so] [--arch sm_90] [--json out.json] [--filter REGEX]
    python tools/cuda_sass_stats.py --compare before.json after.json     # a before/after markdown table

For each kernel instantiation: registers, stack and local bytes, spill instructions (STL/LDL), the
__launch_bounds__ the cubin records (EIATTR_MAX_THREADS), the occupancy those registers allow at that block
size, and the global loads by width (LDG .128/.64/.32/.16), all and inside innermost loops (a loop is the
address range of a backward branch; innermost: holding no other loop, so an outer work-item loop whose
per-item loads are hoisted out of the hot loop does not count). The hand record benchmarks/results/sm90-static/cuda_kernels_before_after.md
was made with it. cuobjdump is CUDA's: on the PATH, in /usr/local/cuda/bin, or the copy Triton ships.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fastnets
from fastnets.audit.sass import max_threads, tool as audit_tool  # noqa: E402

REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048  # sm_80 and sm_90
MAX_BLOCKS_PER_SM = 32


def cuobjdump():
    return audit_tool("cuobjdump") or sys.exit("no cuobjdump found")


def _run(args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def short_name(mangled):
    """`reduce_cl_kernel<StatsOp<BFloat16, float>, 8>` from the mangled name: namespaces and arguments off."""
    d = subprocess.run(["c++filt"], input=mangled, capture_output=True, text=True).stdout.strip() or mangled
    d = re.sub(r"\(anonymous namespace\)::", "", d)
    d = re.sub(r"\b(fastnets|bn|se|act|c10|torch|headeronly)::", "", d)
    # drop the parameter list of the function (the last top-level parenthesis group)
    depth, cut = 0, len(d)
    for i, ch in enumerate(d):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    d = d[:cut]
    return re.sub(r"\s+", " ", d).replace("void ", "", 1)


def occupancy(regs, threads, shared):
    if not threads:
        return None
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // warps
    by_threads = MAX_THREADS_PER_SM // (warps * 32)
    by_smem = (233472 // shared) if shared else MAX_BLOCKS_PER_SM
    blocks = min(by_regs, by_threads, by_smem, MAX_BLOCKS_PER_SM)
    return blocks * warps * 32 / MAX_THREADS_PER_SM


LDG_RE = re.compile(r"\bLDG\.E(?:\.(?P<w>128|64|U16|S16|U8|S8))?")


def sass_stats(sass_text):
    """{mangled: {ldg: {width: n}, ldg_loop: {...}, stl, ldl, insts}} from `cuobjdump -sass` output."""
    out = {}
    for block in re.split(r"\n\s*Function : ", sass_text)[1:]:
        name = block.split("\n", 1)[0].strip()
        insts = []  # (address, text)
        for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", block):
            insts.append((int(m.group(1), 16), m.group(2).strip()))
        loops = []
        for addr, text in insts:
            b = re.search(r"\bBRA(?:\.\w+)* (?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", text)
            if b and b.group(1) and int(b.group(1), 16) <= addr:
                loops.append((int(b.group(1), 16), addr))
        # innermost loops: those holding no other loop (the hot loops; an outer work-item loop is not one)
        inner = [(lo, hi) for lo, hi in loops
                 if not any((lo2, hi2) != (lo, hi) and lo <= lo2 and hi2 <= hi for lo2, hi2 in loops)]
        ldg, ldg_loop = {}, {}
        stl = ldl = spill_loop = 0
        for addr, text in insts:
            op = text.split()[0] if not text.startswith("@") else text.split()[1]
            if op.startswith(("STL", "LDL")):
                stl += op.startswith("STL")
                ldl += op.startswith("LDL")
                spill_loop += any(lo <= addr <= hi for lo, hi in inner)
            m = LDG_RE.search(op)
            if m and op.startswith("LDG"):
                w = {"128": "128", "64": "64", "U16": "16", "S16": "16", "U8": "8", "S8": "8", None: "32"}[m.group("w")]
                ldg[w] = ldg.get(w, 0) + 1
                if any(lo <= addr <= hi for lo, hi in inner):
                    ldg_loop[w] = ldg_loop.get(w, 0) + 1
        out[name] = {"ldg": ldg, "ldg_loop": ldg_loop, "stl": stl, "ldl": ldl, "spill_loop": spill_loop,
                     "insts": len(insts)}
    return out


def res_usage(text):
    out = {}
    for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text):
        out[m.group(1)] = {"regs": int(m.group(2)), "stack": int(m.group(3)), "shared": int(m.group(4)),
                           "local": int(m.group(5))}
    return out


def collect(lib, arch):
    tool = cuobjdump()
    res = res_usage(_run([tool, "-res-usage", "-arch", arch, lib]))
    sass = sass_stats(_run([tool, "-sass", "-arch", arch, lib]))
    bounds = max_threads(_run([tool, "-elf", "-arch", arch, lib]))
    kernels = {}
    for mangled, r in res.items():
        s = sass.get(mangled, {})
        bound = bounds.get(mangled)
        kernels[short_name(mangled)] = dict(r, **s, bound=bound, occupancy=occupancy(r["regs"], bound, r["shared"]))
    return {"lib": lib, "arch": arch, "size_bytes": os.path.getsize(lib), "kernels": kernels}


def _fmt_ldg(d):
    return "/".join(str(d.get(w, 0)) for w in ("128", "64", "32", "16"))


def table(stats, flt=None):
    rows = ["| kernel | regs | stack | STL/LDL (in inner loops) | bound | occupancy | LDG 128/64/32/16 in inner loops | all |",
            "|---|---|---|---|---|---|---|---|"]
    for name, k in sorted(stats["kernels"].items()):
        if flt and not re.search(flt, name):
            continue
        occ = "-" if k["occupancy"] is None else f"{k['occupancy']:.0%}"
        rows.append(f"| `{name}` | {k['regs']} | {k['stack']} | {k['stl']}/{k['ldl']} ({k.get('spill_loop', '?')}) "
                    f"| {k['bound'] or 'none'} | {occ} "
                    f"| {_fmt_ldg(k['ldg_loop'])} | {_fmt_ldg(k['ldg'])} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lib", nargs="?")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--json")
    p.add_argument("--filter")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    a = p.parse_args()
    if a.compare:
        for path in a.compare:
            s = json.load(open(path))
            print(f"\n### {path}: {s['lib']} ({s['arch']}, {s['size_bytes'] / 2**20:.1f} MiB, {len(s['kernels'])} kernels)\n")
            print(table(s, a.filter))
        return
    lib = a.lib or (glob.glob(os.path.join(os.path.dirname(__file__), "..", "fastnets", "_C*.so")) or [None])[0]
    if not lib:
        sys.exit("no fastnets/_C*.so: build it first")
    stats = collect(lib, a.arch)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(stats, f, indent=1, sort_keys=True)
    print(table(stats, a.filter))


if __name__ == "__main__":
    main()
