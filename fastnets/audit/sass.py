"""Reading SASS: the machine code of a cubin, as nvdisasm prints it, turned into the audit's numbers.

nvdisasm (shipped with Triton, in triton/backends/nvidia/bin, and with the CUDA toolkit) prints each function
with labels for branch targets; cuobjdump -res-usage gives each function's registers, stack, shared and
local memory. From the instructions this module builds the control-flow graph, finds the loops (natural
loops: a back edge to a block that dominates it) and picks the main loop: the innermost loop that issues
tensor-core MMAs, else the innermost loop that touches global memory. What is counted, and why, is in
docs/audit.md; in short:

  - registers, stack/local bytes (cuobjdump -res-usage); spills = local-memory instructions STL/LDL (their
    count and bytes, static: the sum of their widths, as ptxas's "bytes spill stores/loads"), in the whole
    function and inside the main loop;
  - MMA kind: HGMMA (Hopper's warpgroup MMA, wgmma.mma_async: "async" when the loop waits for all but >= 1
    group of them, "sync" when it waits for every group it issued in the same iteration), HMMA (mma.sync,
    per warp), DMMA (fp64), UTC*MMA (Blackwell's tcgen05.mma, issued by one thread);
  - TMA (UTMALDG / UTMASTG / UBLKCP ...) and cp.async (LDGSTS) use;
  - global loads and stores by width in bytes (LDG/STG/LDGSTS/RED/ATOMG: .128 = 16, .64 = 8, none = 4, .U16 =
    2, ...), in the loop and in the whole function;
  - main-loop instructions per iteration (the static count of the instructions laid out between the loop's
    header and its back edge: both sides of a branch inside the loop count; blocks the compiler placed out of
    line after the loop, slow paths and waits, do not; a subroutine CALLed from the loop body counts), its
    barriers (BAR.*) and its MMA shape, and from them MMA/issue (`mma_per_issue`).
"""
import os
import re

from . import hardware
import shutil
import subprocess
import tempfile
from collections import Counter

# ----------------------------------------------------------------------------------------------- the tools


def tool(name):
    """Path of nvdisasm / cuobjdump: TRITON's bundled copy first (it ships with every Triton wheel), then
    the CUDA toolkit's (CUDA_HOME, PATH). None when neither is there."""
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", name), os.X_OK):
            return os.path.join(root, "bin", name)
    return shutil.which(name)


def missing_tools():
    """The reason SASS cannot be read here, or None."""
    gone = [n for n in ("nvdisasm", "cuobjdump") if tool(n) is None]
    return f"{' and '.join(gone)} not found (Triton ships them; or set CUDA_HOME)" if gone else None


def _run(args):
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{os.path.basename(args[0])} failed ({p.returncode}): {p.stderr.strip()[:500]}")
    return p.stdout


def disassemble(cubin_path):
    """nvdisasm's text of a cubin file (code sections only, branch targets labelled)."""
    return _run([tool("nvdisasm"), "-c", cubin_path])


def resource_usage(binary_path):
    """{function name: {"REG": n, "STACK": n, "SHARED": n, "LOCAL": n, ...}} from cuobjdump -res-usage (a cubin,
    or a fat binary / shared library: one dict per function and arch, later arches overwrite earlier ones
    unless `arch` is filtered by the caller through extract_cubins)."""
    text = _run([tool("cuobjdump"), "-res-usage", binary_path])
    out = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            out[name] = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            name = None
    return out


def max_threads(elf_text):
    """{function name: the __launch_bounds__ its cubin records (EIATTR_MAX_THREADS, threads) or None} from the
    text of `cuobjdump -elf`."""
    out = {}
    for block in re.split(r"\n(?=\.nv\.info\.)", elf_text):
        m = re.match(r"\.nv\.info\.(\S+)", block)
        if not m:
            continue
        t = re.search(r"EIATTR_MAX_THREADS\s*\n\s*Format:\s*\S+\s*\n\s*Value:\s*(0x[0-9a-f]+) (0x[0-9a-f]+) (0x[0-9a-f]+)",
                      block)
        out[m.group(1)] = int(t.group(1), 16) * int(t.group(2), 16) * int(t.group(3), 16) if t else None
    return out


def extract_cubins(binary_path, workdir):
    """Every embedded cubin of a fat binary or shared library (cuobjdump -xelf all), as {file name: path}."""
    before = set(os.listdir(workdir))
    subprocess.run([tool("cuobjdump"), "-xelf", "all", os.path.abspath(binary_path)], cwd=workdir,
                   capture_output=True, text=True, check=True)
    return {f: os.path.join(workdir, f) for f in sorted(set(os.listdir(workdir)) - before) if f.endswith(".cubin")}


def demangle(names):
    """C++ names demangled with c++filt when it is installed, else unchanged."""
    names = list(names)
    exe = shutil.which("c++filt")
    if not exe or not names:
        return {n: n for n in names}
    p = subprocess.run([exe], input="\n".join(names), capture_output=True, text=True)
    out = p.stdout.splitlines()
    return dict(zip(names, out)) if p.returncode == 0 and len(out) == len(names) else {n: n for n in names}


# ----------------------------------------------------------------------------------------------- parsing

_LABEL = re.compile(r"^([.$\w]+):$")
_TARGET = re.compile(r"`\((\.L_x_\d+|[$\w.]+)\)")


class Instr:
    __slots__ = ("addr", "pred", "op", "base", "mods", "operands", "target")

    def __init__(self, addr, pred, op, operands):
        self.addr, self.pred, self.op, self.operands = addr, pred, op, operands
        parts = op.split(".")
        self.base, self.mods = parts[0], parts[1:]
        t = _TARGET.search(operands)
        self.target = t.group(1) if t else None

    def __repr__(self):
        return f"{self.addr:04x} {self.pred or ''} {self.op} {self.operands}"


def _instruction(line):
    """An Instr from one nvdisasm code line (`/*0420*/  @!P0 IMAD.SHL.U32 R9, R9, 0x8, RZ ;`), else None."""
    a = line.find("/*")
    b = line.find("*/", a + 2)
    if a < 0 or b < 0 or line[:a].strip():
        return None
    addr = line[a + 2:b]
    rest = line[b + 2:].strip()
    if not rest or not all(c in "0123456789abcdef" for c in addr):
        return None
    rest = rest.rstrip(";").rstrip()
    pred = None
    if rest.startswith("@"):
        pred, _, rest = rest.partition(" ")
        rest = rest.lstrip()
    op, _, operands = rest.partition(" ")
    if not op[:1].isupper():
        return None
    return Instr(int(addr, 16), pred, op, operands.strip())


def parse(text):
    """nvdisasm text -> {function name: (instructions, {label: index of the instruction it labels})}."""
    funcs = {}
    name = None
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        if "/*" in line:
            if name is not None:
                ins = _instruction(line)
                if ins is not None:
                    for lab in pending:
                        labels[lab] = len(instrs)
                    pending = []
                    instrs.append(ins)
            continue
        if ".section" in line:
            m = re.match(r"^\s*\.section\s+\.text\.([^,\s]+)", line)
            if m:
                name = m.group(1)
                instrs, labels, pending = [], {}, []
                funcs[name] = (instrs, labels)
            continue
        if name is not None and line.endswith(":"):
            m = _LABEL.match(line.strip())
            if m:
                pending.append(m.group(1))
    return funcs


# --------------------------------------------------------------------------------------- control flow

_ENDS = {"EXIT", "RET", "BRX", "JMX", "KILL", "BPT"}


def _blocks(instrs, labels):
    """Basic blocks as (first index, last index), and successor lists (indices of blocks)."""
    leaders = {0} | set(labels.values())
    for i, ins in enumerate(instrs):
        if ins.base in ("BRA", "JMP", "CALL") or ins.base in _ENDS:
            leaders.add(i + 1)
    leaders = sorted(x for x in leaders if x < len(instrs))
    bounds = [(a, (leaders[j + 1] if j + 1 < len(leaders) else len(instrs)) - 1) for j, a in enumerate(leaders)]
    start_of = {a: j for j, (a, _) in enumerate(bounds)}
    succ = []
    for j, (a, b) in enumerate(bounds):
        last = instrs[b]
        s = []
        # `@P0 BRA`, or a predicate operand before the target (`BRA.U !UP0, `(.L_x_3)`)
        conditional = (last.pred is not None and last.pred not in ("@PT", "@UPT")) or bool(
            re.search(r"!?U?P[0-9]", last.operands.split("`")[0]))
        if last.base in ("BRA", "JMP") and last.target in labels:
            s.append(start_of[labels[last.target]])
            if conditional:
                s.append(j + 1)
        elif last.base in _ENDS:
            if conditional:
                s.append(j + 1)
        else:
            s.append(j + 1)
        succ.append([x for x in s if x < len(bounds)])
    return bounds, succ


def _dominators(n, succ):
    preds = [[] for _ in range(n)]
    for u, ss in enumerate(succ):
        for v in ss:
            preds[v].append(u)
    full = set(range(n))
    dom = [full] * n
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for v in range(1, n):
            ps = [dom[p] for p in preds[v]]
            new = ({v} | set.intersection(*ps)) if ps else {v}
            if new != dom[v]:
                dom[v] = new
                changed = True
    return dom, preds


class Loop:
    """A natural loop: header block, latch blocks (back-edge sources) and its body (block indices); `inline` is
    the body's blocks laid out between the header and the last latch (what runs every iteration, modulo
    branches inside), the rest were placed out of line (slow paths, waits)."""

    def __init__(self, header, latches, body, bounds):
        self.header, self.latches, self.body = header, latches, body
        lo, hi = bounds[header][0], max(bounds[b][1] for b in latches)
        self.span = (lo, hi)
        self.inline = sorted(b for b in body if lo <= bounds[b][0] and bounds[b][1] <= hi)

    def indices(self, bounds, inline=True):
        blocks = self.inline if inline else sorted(self.body)
        return [i for b in blocks for i in range(bounds[b][0], bounds[b][1] + 1)]


def loops(instrs, labels):
    """The natural loops of a function (one per header; back edges to the same header merged)."""
    if not instrs:
        return [], []
    bounds, succ = _blocks(instrs, labels)
    dom, preds = _dominators(len(bounds), succ)
    by_header = {}
    for u, ss in enumerate(succ):
        for h in ss:
            if h in dom[u]:  # a back edge u -> h
                by_header.setdefault(h, set()).add(u)
    out = []
    for h, latches in by_header.items():
        body, stack = {h}, [u for u in latches]
        while stack:
            x = stack.pop()
            if x not in body:
                body.add(x)
                stack.extend(preds[x])
        # a one-instruction self loop after EXIT (the trap `BRA .` ptxas appends) is no loop of the program
        if len(body) == 1 and bounds[h][0] == bounds[h][1]:
            continue
        out.append(Loop(h, sorted(latches), body, bounds))
    return out, bounds


# --------------------------------------------------------------------------------------- instruction kinds

_WIDTH_MODS = {"128": 16, "64": 8, "256": 32, "U16": 2, "S16": 2, "U8": 1, "S8": 1, "32": 4}


def access_width(ins):
    """Bytes one lane moves with a memory instruction (LDG.E.128 -> 16; LDG.E -> 4; LDG.E.U16 -> 2)."""
    for m in reversed(ins.mods):
        if m in _WIDTH_MODS:
            return _WIDTH_MODS[m]
    return 4


GLOBAL_LOADS = {"LDG", "LD"}
GLOBAL_STORES = {"STG", "ST"}
GLOBAL_ATOMICS = {"RED", "REDG", "ATOMG", "ATOM"}
TMA = {"UTMALDG", "UTMASTG", "UBLKCP", "UTMAPF", "UTMACCTL", "UTMAREDG", "UBLKRED", "UBLKPF"}
MMA_BASES = {"HGMMA", "HMMA", "DMMA", "IMMA", "QGMMA", "IGMMA", "BGMMA", "HMMA2", "QMMA",
             "UTCHMMA", "UTCQMMA", "UTCIMMA", "UTCOMMA", "UTCMMA"}
_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)$")


def mma_shape(ins):
    """(m, n, k) of one MMA instruction as its opcode states it, or None (tcgen05's shape lives in a runtime
    instruction descriptor). HGMMA.64x128x16 -> (64, 128, 16); HMMA.16816 -> (16, 8, 16); HMMA.1688 ->
    (16, 8, 8); DMMA.884 -> (8, 8, 4)."""
    for m in ins.mods:
        s = _SHAPE.match(m)
        if s:
            return tuple(int(x) for x in s.groups())
        if m.isdigit() and len(m) in (3, 4, 5):
            if len(m) == 5:  # 16816
                return int(m[:2]), int(m[2]), int(m[3:])
            if len(m) == 4:  # 1688
                return int(m[:2]), int(m[2]), int(m[3])
            return int(m[0]), int(m[1]), int(m[2])  # 884
    return None


def mma_input_type(ins):
    """The operand type of an MMA (BF16, F16, TF32, E4M3, F64, ...): the last type modifier."""
    types = [m for m in ins.mods if m in ("BF16", "F16", "TF32", "E4M3", "E5M2", "F64", "S8", "U8", "F32")]
    return types[-1] if types else "?"


def mma_fma(ins):
    """Multiply-adds one MMA instruction issues for the warp(s) it belongs to, as a share of one warp: a
    warpgroup MMA (HGMMA m64nNk, one instruction issued by each of the warpgroup's four warps) counts
    m*n*k/4 per warp; a warp MMA (HMMA/DMMA) m*n*k. None when the opcode does not state the shape."""
    shape = mma_shape(ins)
    if shape is None:
        return None
    m, n, k = shape
    return m * n * k / (4 if ins.base.endswith("GMMA") else 1)


def mma_kind(instrs, loop_idx):
    """'HGMMA async' / 'HGMMA sync' / 'HMMA' / 'DMMA' / 'tcgen05' / '' for the MMAs of a loop (or a function).
    HGMMA is async when the loop's warpgroup waits (WARPGROUP.DEPBAR.LE gsb0, N) leave >= 1 group in flight."""
    bases = Counter(instrs[i].base for i in loop_idx if instrs[i].base in MMA_BASES)
    if not bases:
        return ""
    if any(b.startswith("UTC") for b in bases):
        return "tcgen05"
    if any(b.endswith("GMMA") for b in bases):
        waits = [instrs[i] for i in loop_idx if instrs[i].op.startswith("WARPGROUP.DEPBAR")]
        levels = [int(w.operands.split(",")[-1].strip(), 0) for w in waits if "," in w.operands]
        return "HGMMA async" if levels and max(levels) >= 1 else "HGMMA sync"
    return bases.most_common(1)[0][0]


# ----------------------------------------------------------------------------------------------- summary


def _mem_histogram(instrs, idx, bases):
    h = Counter()
    for i in idx:
        ins = instrs[i]
        if ins.base in bases:
            h[str(access_width(ins))] += 1
    return dict(sorted(h.items(), key=lambda kv: -int(kv[0])))


def _callee_indices(instrs, labels, idx):
    """Indices of the subroutines CALLed from `idx` (from the callee's label to its first RET)."""
    extra = []
    for i in idx:
        ins = instrs[i]
        if ins.base == "CALL" and ins.target in labels:
            j = labels[ins.target]
            while j < len(instrs):
                extra.append(j)
                if instrs[j].base == "RET":
                    break
                j += 1
    return extra


def main_loop(instrs, labels):
    """(Loop, its instruction indices, bounds) of the main loop, or (None, [], bounds)."""
    found, bounds = loops(instrs, labels)
    if not found:
        return None, [], bounds

    def idx(lp):
        return lp.indices(bounds, inline=False)

    def has(lp, pred):
        return any(pred(instrs[i]) for i in idx(lp))

    for pick in (lambda s: s.base in MMA_BASES,
                 lambda s: s.base in GLOBAL_LOADS | GLOBAL_STORES | GLOBAL_ATOMICS | TMA or s.base == "LDGSTS"):
        cands = [lp for lp in found if has(lp, pick)]
        if cands:
            inner = [lp for lp in cands if not any(o is not lp and o.body < lp.body for o in cands)]
            inner.sort(key=lambda lp: (-sum(1 for i in lp.indices(bounds) if pick(instrs[i])),
                                       -len(lp.indices(bounds))))
            lp = inner[0]
            return lp, lp.indices(bounds), bounds
    return None, [], bounds


def summarize(instrs, labels, res=None, arch=90, warps=None, cta_fma_per_iteration=None):
    """The audit's numbers for one function (instructions and labels from parse, res from resource_usage).

    MMA/issue (docs/audit.md): per main-loop iteration, the clocks the SM's tensor cores need for the loop's
    MMAs divided by the clocks its four schedulers need to issue the loop's instructions (one warp-instruction
    per scheduler per clock, every warp of the block running the loop):
        (block's multiply-adds per iteration / tensor-core multiply-adds per SM per clock)
        / (instructions per iteration x warps per block / 4).
    The block's multiply-adds come from the SASS MMA shapes (HGMMA/HMMA/DMMA: per warp share x warps), or,
    where the opcode does not state them (Blackwell's tcgen05), from `cta_fma_per_iteration` (the tl.dot
    shapes of the TTIR). With the SASS shapes the warps cancel out; below 1, the loop cannot issue fast
    enough to keep the tensor cores busy, however many blocks share the SM."""
    res = res or {}
    every = list(range(len(instrs)))
    lp, loop_idx, bounds = main_loop(instrs, labels)
    if lp is None:  # no loop (one tile per program): the whole function is what each program runs
        loop_idx = [i for i in every if instrs[i].base != "NOP"]
    loop_all = loop_idx + _callee_indices(instrs, labels, loop_idx)
    ops = Counter(instrs[i].base for i in every)

    def count(idx, bases):
        return sum(1 for i in idx if instrs[i].base in bases)

    def local_bytes(idx, base):
        return sum(access_width(instrs[i]) for i in idx if instrs[i].base == base)

    mma_fmas = [mma_fma(instrs[i]) for i in loop_all if instrs[i].base in MMA_BASES]
    mma_types = Counter(mma_input_type(instrs[i]) for i in loop_all if instrs[i].base in MMA_BASES)
    shapes = Counter(".".join([instrs[i].base] + [m for m in instrs[i].mods if _SHAPE.match(m) or m.isdigit()][:1]
                              + [t for t in [mma_input_type(instrs[i])] if t != "?"])
                     for i in loop_all if instrs[i].base in MMA_BASES)
    n_loop = len(loop_all)
    glob = GLOBAL_LOADS | GLOBAL_STORES | GLOBAL_ATOMICS
    loop_bytes = sum(32 * access_width(instrs[i]) for i in loop_all if instrs[i].base in glob | {"LDGSTS"})
    out = {
        "instructions": len(instrs),
        "registers": res.get("REG"),
        "stack_bytes": res.get("STACK"),
        "local_bytes": res.get("LOCAL"),
        "static_shared_bytes": res.get("SHARED"),
        "spill_stores": ops.get("STL", 0),
        "spill_loads": ops.get("LDL", 0),
        "spill_store_bytes": local_bytes(every, "STL"),
        "spill_load_bytes": local_bytes(every, "LDL"),
        "mma_kind": mma_kind(instrs, loop_all if loop_all else every),
        "mma_instructions": count(every, MMA_BASES),
        "tma_instructions": count(every, TMA),
        "cp_async_instructions": ops.get("LDGSTS", 0),
        "global_loads": _mem_histogram(instrs, every, GLOBAL_LOADS),
        "global_stores": _mem_histogram(instrs, every, GLOBAL_STORES),
        "global_atomics": count(every, GLOBAL_ATOMICS),
        "cp_async": _mem_histogram(instrs, every, {"LDGSTS"}),
        "barriers": sum(1 for i in every if instrs[i].base == "BAR"),
        "loops": len(loops(instrs, labels)[0]),
        "loop": None,
    }
    if loop_idx:
        known = mma_fmas and all(f is not None for f in mma_fmas)
        per_warp_fma = sum(mma_fmas) if known else None
        cta_fma = per_warp_fma * warps if known and warps else (cta_fma_per_iteration if mma_fmas else None)
        rate = hardware.FMA_PER_CLOCK_PER_SM.get(arch, hardware.FMA_PER_CLOCK_PER_SM[90])
        per_sm_clock = rate.get(mma_types.most_common(1)[0][0], rate["BF16"]) if mma_types else rate["BF16"]
        if known:  # warps cancel: (fma/warp x warps / rate) / (n x warps / 4)
            mma_per_issue = per_warp_fma / (per_sm_clock / hardware.SUBPARTITIONS) / n_loop if n_loop else None
        elif cta_fma and warps and n_loop:
            mma_per_issue = (cta_fma / per_sm_clock) / (n_loop * warps / hardware.SUBPARTITIONS)
        else:
            mma_per_issue = None
        out["loop"] = {
            "whole_function": lp is None,
            "instructions": n_loop,
            "out_of_line_instructions": len(lp.indices(bounds, inline=False)) - len(loop_idx) if lp else 0,
            "mma": dict(shapes),
            "mma_instructions": len(mma_fmas),
            "block_fma_per_iteration": cta_fma,  # multiply-adds the whole block's MMAs do per iteration
            "tensor_cycles_per_warp": round(per_warp_fma / (per_sm_clock / hardware.SUBPARTITIONS), 2) if known else None,
            "spill_stores": count(loop_all, {"STL"}),
            "spill_loads": count(loop_all, {"LDL"}),
            "global_loads": _mem_histogram(instrs, loop_all, GLOBAL_LOADS),
            "global_stores": _mem_histogram(instrs, loop_all, GLOBAL_STORES),
            "cp_async": _mem_histogram(instrs, loop_all, {"LDGSTS"}),
            "tma_instructions": count(loop_all, TMA),
            "barriers": sum(1 for i in loop_all if instrs[i].base == "BAR"),
            "shared_loads": count(loop_all, {"LDS", "LDSM"}),
            "shared_stores": count(loop_all, {"STS", "STSM"}),
            "integer_divisions": _division_sequences(instrs, loop_all),
            "calls": count(loop_idx, {"CALL"}),
            # bytes a warp's global loads/stores/cp.async in one iteration move (every lane active) per
            # instruction the warp issues in the iteration
            "bytes_per_warp_instruction": round(loop_bytes / n_loop, 2) if n_loop else None,
        }
        out["loop"]["mma_per_issue"] = round(mma_per_issue, 3) if mma_per_issue is not None else None
    return out


def _division_sequences(instrs, idx):
    """Integer divisions / modulos by a value known only at run time: each is compiled to a reciprocal
    (MUFU.RCP of an I2F'd divisor, I2F.RP on 32 bits) and a correction; counted by their I2F.RP / I2F.U64.RP."""
    return sum(1 for i in idx if instrs[i].base == "I2F" and "RP" in instrs[i].mods)


# ----------------------------------------------------------------------------------------------- entry points


def analyse_cubin(cubin_bytes_or_path, name=None, arch=90, warps=None, cta_fma_per_iteration=None):
    """{function name: summary} for a cubin (bytes or a path); only `name` when given."""
    tmp = None
    path = cubin_bytes_or_path
    if isinstance(cubin_bytes_or_path, (bytes, bytearray)):
        fd, tmp = tempfile.mkstemp(suffix=".cubin")
        with os.fdopen(fd, "wb") as f:
            f.write(cubin_bytes_or_path)
        path = tmp
    try:
        funcs = parse(disassemble(path))
        res = resource_usage(path)
    finally:
        if tmp:
            os.unlink(tmp)
    return {fn: summarize(instrs, labels, res.get(fn), arch, warps, cta_fma_per_iteration)
            for fn, (instrs, labels) in funcs.items() if name is None or fn == name}
