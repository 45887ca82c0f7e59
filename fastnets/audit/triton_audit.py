"""The Triton half of the audit: record the launches of the shape set (workload.py), compile each distinct
variant for the target (compile.py) and read its machine code (sass.py) and its TTIR (ttir.py).

Rows: one per compiled variant (kernel, dtypes, constexprs, configuration, integer specialization), with the
launches it serves. Conv launches: one per autotuned launch site (kernel, op, layer geometry), the variants
its autotuner would choose between, the FASTNETS_CONV_TUNE=fixed variant beside them.
"""
import hashlib
import json
import os
import time

import torch

from . import compile as ac
from . import hardware, sass, ttir, workload

# The shape set. ResNet-50's training step in bf16 channels_last (what fastnets is tuned for) compiles every
# configuration each autotuned conv launch's pruning keeps ("all"); SE-ResNet-50's and VGG-16's training steps
# and ResNet-50's inference the fixed and the first kept one ("first"); ResNet-50's training step in fp16
# channels_last, bf16 NCHW and fp32 (TF32) channels_last the traffic model's pick among the kept ones
# ("model"): their machine code differs from bf16's in operand types and strides, not in tiles, and every
# configuration of every combination would take hours of ptxas on two cores.
FULL = [
    ("resnet50", "bf16-cl", True, "all"),
    ("se_resnet50", "bf16-cl", True, "first"),
    ("vgg16", "bf16-cl", True, "first"),
    ("resnet50", "bf16-cl", False, "first"),
    ("resnet50", "fp16-cl", True, "model"),
    ("resnet50", "bf16-nchw", True, "model"),
    ("resnet50", "fp32-cl", True, "model"),
]
SM100 = [("resnet50", "bf16-cl", True, "model")]  # sm_100: what tcgen05 makes of the training step
QUICK = [("resnet50", "bf16-cl", True, "first")]  # filtered by quick_launch


def quick_launch(ln):
    """--quick's subset of ResNet-50's training step: every non-conv kernel, and the convolutions of two layer1
    geometries (the 3x3 64->64 with its BatchNorm-ReLU prologue, the 1x1 64->256 downsample), forward, grad
    input and grad weight, at the fixed and the first kept configuration."""
    a = ln.named
    if "C" not in a or "Cout" not in a or "KH" not in a:
        return True
    return a.get("H") == 56 and (a["KH"], a["C"], a["Cout"]) in ((3, 64, 64), (1, 64, 256)) and (
        a["KH"] == 3 or not a.get("PRO", False))


def shape_label(ln):
    """The layer geometry of a launch (conv: Cin x H x W -> Cout, kernel, stride) or its tensors' shapes."""
    a = ln.named
    if all(k in a for k in ("C", "H", "W", "Cout", "KH", "KW", "stride_h")):
        return f"{a['C']}x{a['H']}x{a['W']}->{a['Cout']} k{a['KH']}x{a['KW']} s{a['stride_h']}"
    shapes = []
    for v in ln.args:
        if isinstance(v, torch.Tensor) and tuple(v.shape) not in shapes and v.dim() >= 2:
            shapes.append(tuple(v.shape))
    return " ".join("x".join(map(str, s)) for s in shapes[:2])


def _dtype(ln):
    for v in ln.args:
        if isinstance(v, torch.Tensor):
            return str(v.dtype).replace("torch.", "")
    return "?"


def _layout(ln):
    for v in ln.args:
        if isinstance(v, torch.Tensor) and v.dim() == 4:
            return "cl" if v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous() else "nchw"
    return ""


def config_label(kwargs):
    """128x256x64 w8 s3 (conv tiles, warps, stages), else the block constexprs."""
    w, s = kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)
    if all(k in kwargs for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")):
        return f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}x{kwargs['BLOCK_K']} w{w} s{s}"
    blocks = [f"{k[6:]}={v}" for k, v in sorted(kwargs.items()) if k.startswith("BLOCK")]
    return " ".join(blocks + [f"w{w}"])


def variant_id(arch, ln):
    key = repr(ac.variant_key(ln.fn, ln.args, ln.kwargs))
    return f"sm{arch}-{ln.fn.__name__}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def _flags(kwargs):
    """The kernel's constexprs that are not tile sizes or launch options (flags, activation codes, dtypes)."""
    skip = ("BLOCK", "GROUP_M", "num_warps", "num_stages")
    return {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in sorted(kwargs.items())
            if not k.startswith(skip)}


STANDALONE_BN = ("bf16-cl", "fp16-cl", "bf16-nchw")  # standalone BatchNorm at ResNet-50's BatchNorm shapes
QUICK_BN_SHAPES = ((256, 64, 112, 112), (256, 256, 56, 56))


def record(spec, quick=False, kernel=None, standalone=True):
    """Record the launches of `spec` [(net, combo, train, configs)], the standalone BatchNorm launches and
    augment's (standalone); with --quick the quick subset (quick_launch; BatchNorm at QUICK_BN_SHAPES, bf16
    channels_last); with a `kernel` name, only that kernel's launches are kept."""
    launches = []
    for net, combo, train, configs in spec:
        rec = ac.Recorder()
        workload.record_network(rec, net, combo, train, configs)
        for ln in rec.launches:
            ln.what = f"{net} {combo} {'train' if train else 'eval'} configs={configs}|{ln.what}"
            ln.group = None if ln.group is None else (net, combo, train) + tuple(ln.group)
        launches += [ln for ln in rec.launches if not quick or quick_launch(ln)]
    if quick or standalone:
        for combo in STANDALONE_BN[:1] if quick else STANDALONE_BN:
            rec = ac.Recorder()
            workload.record_batch_norm(rec, combo=combo, shapes=QUICK_BN_SHAPES if quick else None)
            for ln in rec.launches:
                ln.what = f"standalone {combo}|{ln.what}"
            launches += rec.launches
    if standalone and not quick:
        rec = ac.Recorder()
        workload.augment_launches(rec)
        for ln in rec.launches:
            ln.what = f"standalone|{ln.what}"
        launches += rec.launches
    if kernel:  # the kernel of that exact name, else every kernel whose name contains it
        launches = ([ln for ln in launches if ln.fn.__name__ == kernel]
                    or [ln for ln in launches if kernel in ln.fn.__name__])
    return launches


def _analyse(arch):
    def analyse(k):
        t = ttir.analyse(k.asm["ttir"])
        name = k.metadata.name
        s = sass.analyse_cubin(k.asm["cubin"], name, arch, k.metadata.num_warps, t["loop_dot_fma"] or None)
        return {"sass": s.get(name), "ttir": {x: t[x] for x in ("reads", "writes", "loop_dot_fma", "dots")},
                "num_stages": k.metadata.num_stages}

    return analyse


def audit(launches, arch=90, jobs=1, progress=True):
    """Compile and analyse every distinct variant of `launches` for sm_<arch>; returns (rows, conv_launches)."""
    tgt = ac.target(arch)
    variants = {}
    for ln in launches:
        variants.setdefault(variant_id(arch, ln), ln)
    ids = list(variants)
    work = [(variants[i].fn, variants[i].args, variants[i].kwargs) for i in ids]
    t0 = time.time()
    done = [0]

    def tell(i, r):
        done[0] += 1
        if progress:
            ln = variants[ids[i]]
            state = ("FAILED " + r["error"][:300]) if "error" in r else "ok"
            print(f"[sm_{arch} {done[0]}/{len(ids)} {time.time() - t0:.0f}s] {ln.fn.__name__} "
                  f"{config_label(ln.kwargs)} {shape_label(ln)}: {state}", flush=True)

    results = dict(zip(ids, ac.compile_variants(work, tgt, jobs, analyse=_analyse(arch), progress=tell)))
    rows = {}
    for vid, ln in variants.items():
        r = results[vid]
        row = {
            "id": vid, "arch": arch, "kernel": ln.fn.__name__, "module": ln.fn.__module__,
            "dtype": _dtype(ln), "layout": _layout(ln), "config": config_label(ln.kwargs), "flags": _flags(ln.kwargs),
            "launches": [], "kept": False, "compile_seconds": round(r.get("seconds", 0.0), 1),
        }
        if "error" in r:
            row["error"] = r["error"]
        else:
            row.update(shared_bytes=r["shared"], num_warps=r["num_warps"], num_stages=r.get("num_stages"),
                       sass=r["sass"], ttir=r["ttir"])
            regs = (r["sass"] or {}).get("registers")
            occ = hardware.occupancy(regs, r["num_warps"], r["shared"])
            row["occupancy"] = None if occ is None else {"blocks": occ[0], "warps_fraction": occ[1], "limit": occ[2]}
        rows[vid] = row
    conv = {}
    for ln in launches:
        vid = variant_id(arch, ln)
        label = f"{ln.what.split('|')[0]}: {shape_label(ln)}"
        if label not in rows[vid]["launches"]:
            rows[vid]["launches"].append(label)
        if ln.group is None and "fixed" not in ln.what:
            rows[vid]["kept"] = True  # a launch of its own: always compiled and run
        if ln.group is not None and ln.group[-1] == "autotuned":
            rows[vid]["kept"] = True
        if ln.fn.__name__.startswith("_conv_") and ("autotuned" in ln.what or "fixed" in ln.what):
            site = (ln.fn.__name__, _op_of(ln.what), shape_label(ln), _dtype(ln), _layout(ln),
                    json.dumps(_flags(ln.kwargs), sort_keys=True))
            c = conv.setdefault(site, {"kernel": ln.fn.__name__, "op": _op_of(ln.what), "shape": shape_label(ln),
                                       "dtype": _dtype(ln), "layout": _layout(ln), "flags": _flags(ln.kwargs),
                                       "nets": [], "configs": [], "fixed": None, "every_kept_config": False})
            net, _, mode = ln.what.split("|")[0].partition(" configs=")
            c["every_kept_config"] |= mode == "all"  # else only the first kept (or the model's) was compiled
            if net not in c["nets"]:
                c["nets"].append(net)
            if "fixed" in ln.what:
                c["fixed"] = vid
            elif vid not in c["configs"]:
                c["configs"].append(vid)
    return rows, list(conv.values())


def _op_of(what):
    """The fastnets op a launch ran in (conv2d_stats, bn_act_conv2d_backward, ...) from its label."""
    words = what.split("|")[-1].split()
    ops = [w for w in words if not w.startswith("_") and w not in ("fixed", "autotuned", "quick", "train", "eval")
           and not w.startswith(("resnet", "se_", "vgg", "bf16", "fp16", "fp32"))]
    return ops[-1] if ops else ""


def conv_launch_summary(site, rows):
    """Best spill-free configuration (by MMA/issue) of one conv launch, and how many kept ones spill."""
    def metrics(vid):
        r = rows.get(vid, {})
        s = r.get("sass") or {}
        lp = s.get("loop") or {}
        return r, s, lp

    best, spilling = None, 0
    for vid in site["configs"]:
        r, s, lp = metrics(vid)
        if "error" in r or not s:
            continue
        if s["spill_stores"] or s["spill_loads"]:
            spilling += 1
            continue
        m = lp.get("mma_per_issue")
        if m is not None and (best is None or m > best[1]):
            best = (vid, m, s["mma_kind"])
    fixed = None
    if site["fixed"]:
        r, s, lp = metrics(site["fixed"])
        fixed = lp.get("mma_per_issue")
    return {"best": best, "spilling": spilling, "kept": len(site["configs"]), "fixed_mma_per_issue": fixed}


def environment():
    import triton

    from .compile import _ORIGINAL_RUN  # noqa: F401  (compile's import checks TRITON_INTERPRET)

    return {"triton": triton.__version__, "torch": torch.__version__, "batch": workload.BATCH,
            "cpu_count": os.cpu_count()}
