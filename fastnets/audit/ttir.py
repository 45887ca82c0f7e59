"""What a compiled Triton kernel reads, writes and multiplies, from its TTIR (Triton's first IR, SSA, with the
Python parameter names as argument names).

Each pointer argument's uses are followed forward through the SSA values (tt.splat, tt.addptr, loop-carried
iter_args, ...): a tt.load (or descriptor/TMA load) of a value derived from `x_ptr` reads the tensor bound to
x_ptr, a tt.store writes it, an atomic does both. Loads whose branch a constexpr removed are gone from the
TTIR, so a pointer passed only as a placeholder counts as neither. tt.dot shapes inside scf.for loops give the
multiply-adds one loop iteration issues.
"""
import re

_FUNC = re.compile(r"tt\.func\s+(?:public\s+|private\s+)?@(\w+)\((.*)\)\s*(?:attributes.*)?\{\s*$")
_ARG = re.compile(r"%([\w.$-]+):\s*(!tt\.ptr<[^>]*>|[^\s{,]+)")
_VAL = re.compile(r"%([\w.$#-]+)")
_DOT = re.compile(r"tensor<(\d+)x(\d+)x\w+>\s*\*\s*tensor<(\d+)x(\d+)x\w+>")


def _strip_loc(line):
    return re.sub(r"\s*loc\((?:[^()]|\([^()]*\))*\)", "", line)


def analyse(text):
    """{"kernel": name, "args": [parameter names], "pointers": [...], "reads": [...], "writes": [...],
    "loop_dot_fma": multiply-adds of the tt.dot ops inside loops per iteration (summed over loops),
    "dots": [[m, n, k, loop depth], ...]}."""
    name, args, pointers = None, [], []
    taint = {}
    reads, writes = set(), set()
    dots = []
    stack = []  # the op that opened each region brace still open

    def origin_of(v):
        return taint.get(v, set()) | taint.get(v.split("#")[0], set())

    for raw in text.splitlines():
        line = _strip_loc(raw).strip()
        if name is None:
            m = _FUNC.search(line)
            if m:
                name = m.group(1)
                for a, ty in _ARG.findall(m.group(2)):
                    args.append(a)
                    if ty.startswith("!tt.ptr"):
                        pointers.append(a)
                        taint[a] = {a}
                stack.append("tt.func")
            continue
        if not stack:
            break  # the end of the kernel's function
        if line.startswith("}"):
            stack.pop()
            if not stack:
                break
        m = re.match(r"^((?:%[\w.$#-]+(?::\d+)?\s*,?\s*)+)=\s*(.*)$", line)
        lhs, rhs = (m.group(1), m.group(2)) if m else ("", line.lstrip("} ").strip())
        results = [r.split(":")[0] for r in _VAL.findall(lhs)]
        op = rhs.split()[0].strip('"') if rhs.split() else ""
        operands = _VAL.findall(rhs)
        origin = set()
        for v in operands:
            origin |= origin_of(v)
        if op == "scf.for" and "iter_args" in rhs:
            for blk, init in re.findall(r"%([\w.$-]+)\s*=\s*%([\w.$#-]+)", rhs.split("iter_args", 1)[1]):
                taint[blk] = set(origin_of(init))
        if op in ("tt.load", "tt.descriptor_load", "tt.experimental_descriptor_load", "tt.gather"):
            for v in operands[:1]:
                reads |= origin_of(v)
            origin = set()  # loaded data is not an address
        elif op in ("tt.store", "tt.descriptor_store", "tt.experimental_descriptor_store"):
            for v in operands[:1]:
                writes |= origin_of(v)
        elif op.startswith("tt.atomic"):
            for v in [v for v in operands if origin_of(v)][:1]:
                reads |= origin_of(v)
                writes |= origin_of(v)
            origin = set()
        elif op == "tt.dot":
            d = _DOT.search(rhs)
            if d:
                m_, k_, _, n_ = (int(x) for x in d.groups())
                dots.append([m_, n_, k_, sum(1 for o in stack if o in ("scf.for", "scf.while"))])
        for r in results:
            taint[r] = set(origin)
        if line.endswith("{"):
            stack.append(op if op else (stack[-1] if stack else ""))
    pointers_set = set(pointers)
    return {
        "kernel": name,
        "args": args,
        "pointers": pointers,
        "reads": sorted(reads & pointers_set, key=pointers.index),
        "writes": sorted(writes & pointers_set, key=pointers.index),
        "dots": dots,
        "loop_dot_fma": sum(m * n * k for m, n, k, d in dots if d > 0),
    }
