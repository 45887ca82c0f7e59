"""Compile every fastnets Triton kernel ahead of time for an H100 (CUDA sm_90), on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, which the test suite uses on CPU) never compiles a kernel, so type
mismatches of loop-carried values, constexpr misuse, shapes tl.dot rejects or too much shared memory only
show up on a GPU. This script, run in a fresh process (tests/test_triton_compile.py does), compiles them
with Triton's own compiler and ptxas for the target, without a driver:

 1. JITFunction.run is replaced by a recorder and the real Python launchers (batch_norm.stats/apply/...,
    squeeze_excite.pool/excite/..., conv.forward/grad_input/grad_weight) are called on `meta` tensors of
    representative shapes, so the launch plans pick their block sizes, grids and flags exactly as they would
    on a GPU. The plan functions that ask the device for its SM count see torch.device("cuda") and an H100's
    132 SMs.
 2. Each distinct variant (a key mirroring Triton's specialization: constexprs, dtypes, ints equal to 1,
    16-divisibility) is replayed through the original JITFunction.run(..., warmup=True) with an offline
    driver whose target is GPUTarget("cuda", 90, 32): Triton's own binder specializes it as at a real launch
    and compiles it (TTIR -> TTGIR -> LLVM -> PTX -> cubin with ptxas) without loading or launching it. Each
    variant compiles in a forked child (an MLIR assertion fails one variant, not the run), os.cpu_count() at
    a time, into a fresh cache directory. The same works with Triton 3.6 (the GPU machine's) and 3.8.
 3. Autotuned conv kernels: every curated config that the launcher's pruning keeps for a shape (what the
    autotuner would compile), the `quick` list and the fixed config (FASTNETS_CONV_TUNE=fixed) are compiled.
    A launch with a single configuration must fit an H100's shared memory; an autotuned launch needs at least
    one fitting config (the autotuner skips the others, as it does on a GPU).

Usage: python tests/triton_aot.py [batch_norm|squeeze_excite|conv ...] [--jobs N] [--list (print the variants only)] [--verbose]
Prints one JSON object on the last line of stdout. Exit status 0: everything compiled; 1: failures (listed);
77: nothing can be compiled here (no CUDA backend or ptxas, or a Triton without the APIs used), with the reason.
"""
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"  # must precede the first import of triton and fastnets
# this checkout's fastnets, not an installed one (a script's sys.path starts at tests/, not the repository)
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["FASTNETS_POISON_OUTPUTS"] = "0"
os.environ.pop("FASTNETS_CONV_TUNE", None)  # the autotuned path, as on a GPU by default
# A fresh, empty Triton cache per run (FASTNETS_AOT_CACHE_DIR keeps one between runs while debugging: Triton
# never caches a failed compile, so it cannot hide one).
_KEEP_CACHE = os.environ.get("FASTNETS_AOT_CACHE_DIR")
_CACHE = _KEEP_CACHE or tempfile.mkdtemp(prefix="fastnets-triton-aot-")
os.environ["TRITON_CACHE_DIR"] = _CACHE
if not _KEEP_CACHE:
    import atexit

    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import torch  # noqa: E402

from fp32_flags import set_fp32_precision  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fastnets
from fastnets.audit.compile import (  # noqa: E402  (the recording and compiling machinery, shared with the audit)
    BF16, F16, F32, F64, H100_SHARED, Recorder, Unavailable, acc_of, compile_variants, describe, meta,
    simulate_h100, target, variant_key, with_cuda_device,
)

FAMILIES = ("batch_norm", "squeeze_excite", "conv_prologue", "conv", "augment")  # conv_prologue restores conv._launch


def _unavailable(reason):
    print(json.dumps({"unavailable": reason}))
    sys.exit(77)


try:
    import triton

    TARGET = target(90)
except (Unavailable, ImportError) as e:
    _unavailable(str(e))


# ------------------------------------------------------------------------------------------- recording

REC = Recorder().__enter__()  # every fn[grid](...) now records instead of launching
_with_cuda_device = with_cuda_device
simulate_h100()


def launches(what):
    """Context: launches recorded inside are labelled `what`."""
    return REC.label(what)


# Every family has a sweep shape, on which every dtype and every flag combination is compiled, and other
# shapes (other block sizes, splits and int specializations) compiled in bf16 with every flag on; with
# FASTNETS_AOT_FULL=1 every shape gets the full sweep.
FULL = os.environ.get("FASTNETS_AOT_FULL", "0") == "1"
ALL_DTYPES = (F32, F16, BF16, F64)


def _sweep(shape, sweep_shape):
    return FULL or shape == sweep_shape


def _flags(sweep, *choices):
    """Every combination of the flag choices when sweeping, else only the last (all on) of each."""
    import itertools

    return itertools.product(*choices) if sweep else [tuple(c[-1] for c in choices)]


# ------------------------------------------------------------------------------------------- batch_norm

# (N, C, H, W) or (N, C): ResNet-50/VGG-16 training batches, a small inference batch, CIFAR/LeNet sizes and a
# 2-D (BatchNorm1d) input.
BN_SHAPES = [(256, 256, 56, 56), (256, 64, 112, 112), (256, 2048, 7, 7), (32, 512, 28, 28), (1, 64, 112, 112),
             (128, 16, 10, 10), (256, 512)]


# Activation codes (fastnets/activations.py) compiled besides identity/relu on the sweep shape: every forward
# in bf16 NCHW, the backward (pre-activation recomputed, with a residual) for three of them, one code in
# channels_last, gelu in fp64.
ACT_CODES = (2, 3, 4, 5, 6, 7)
ACT_BWD_CODES = (4, 6, 7)


def _act_codes(codes, cl, dtype):
    """All `codes` (bf16, NCHW); one of them in channels_last and in float64: the activation code changes
    only the element-wise epilogue, so a few variants per kernel show that it compiles."""
    if FULL:
        return codes
    if dtype == F64:
        return (6,)  # erf in float64
    return codes if not cl else codes[-1:]


def batch_norm_launches():
    import fastnets.triton_kernels.batch_norm as bn

    _with_cuda_device(bn, "_target_programs")
    for shape in BN_SHAPES:
        sweep = _sweep(shape, BN_SHAPES[0])
        for cl in ((False, True) if len(shape) == 4 else (False,)):
            for dtype in (ALL_DTYPES if sweep else (BF16,)):
                acc = acc_of(dtype)
                c = shape[1]
                x = meta(shape, dtype, cl)
                vec = meta((c,), acc)
                with launches(f"batch_norm {shape} {dtype} channels_last={cl}"):
                    bn.stats(x, cl, 1e-5)
                    for res, relu in _flags(sweep, (None, x), (False, True)):
                        bn.apply(x, vec, vec, res, relu, cl)
                    for relu, train, write_g in _flags(sweep, (False, True), (False, True), (False, True)):
                        y = x if relu else None
                        if not write_g:
                            bn.backward_reduce(x, x, y, vec, relu, cl)
                        if relu or not write_g:  # the ops write g only where ReLU masks it
                            bn.backward_apply(x, x, y, vec, vec, vec, vec, relu, train, write_g, cl)
                    if sweep and (dtype == BF16 or (dtype == F64 and not cl)):  # the other activations
                        for act in _act_codes(ACT_CODES, cl, dtype):
                            bn.apply(x, vec, vec, x, act, cl, 0.1)
                        for act in _act_codes(ACT_BWD_CODES, cl, dtype):
                            pre = dict(act_param=0.1, scale=vec, shift=vec, residual=x)
                            bn.backward_reduce(x, x, None, vec, act, cl, **pre)
                            bn.backward_apply(x, x, None, vec, vec, vec, vec, act, True, True, cl, **pre)


# ------------------------------------------------------------------------------------------- squeeze_excite

# SE-ResNet-50 stages (reduction 16) at training batch sizes and one inference image, and a CIFAR-sized one.
SE_SHAPES = [(256, 256, 56, 56), (256, 2048, 7, 7), (32, 512, 28, 28), (1, 1024, 14, 14), (128, 64, 32, 32)]


def squeeze_excite_launches():
    import fastnets.triton_kernels.squeeze_excite as se

    _with_cuda_device(se, "sm_count")
    _with_cuda_device(se, "_split")
    for shape in SE_SHAPES:
        sweep = _sweep(shape, SE_SHAPES[0])
        n, c = shape[:2]
        r = c // 16
        for cl in (False, True):
            for dtype in (ALL_DTYPES if sweep else (BF16,)):
                acc = acc_of(dtype)
                x = meta(shape, dtype, cl)
                gate = meta((n, c), acc)
                with launches(f"squeeze_excite {shape} {dtype} channels_last={cl}"):
                    pooled = se.pool(x, cl)
                    if not cl:  # the excite launch does not depend on x's layout
                        # weights in the model's dtype (the pooled activations are in the accumulation dtype)
                        se.excite(pooled, meta((r, c), dtype), meta((r,), dtype), meta((c, r), dtype),
                                  meta((c,), dtype))
                        if sweep and dtype == BF16:  # other inner activations, the hardsigmoid gate
                            for inner, gate_code in ((4, 1), (5, 0)):
                                se.excite(pooled, meta((r, c), dtype), meta((r,), dtype), meta((c, r), dtype),
                                          meta((c,), dtype), inner, 0.0, gate_code)
                    for res, relu in _flags(sweep, (None, x), (False, True)):
                        se.scale(x, gate, res, relu, cl)
                    for relu, gp, write_g in _flags(sweep, (False, True), (None, gate), (False, True)):
                        y = x if relu else None
                        if gp is None and not write_g:
                            se.backward_reduce(x, x, y, relu, cl)
                        if relu or not write_g:
                            se.backward_apply(x, y, gate, gp, relu, write_g, cl)


# ------------------------------------------------------------------------------------------- conv

# (N, C, H, W, Cout, K, stride, padding): ResNet-50 (3x3, 1x1, strided 1x1/3x3, the 7x7 stem, last stage),
# VGG-16's first and a late layer, LeNet-5's two convolutions.
CONV_SHAPES = [
    (32, 64, 56, 56, 64, 3, 1, 1),
    (32, 256, 56, 56, 512, 1, 2, 0),
    (32, 3, 224, 224, 64, 7, 2, 3),
    (32, 256, 56, 56, 64, 1, 1, 0),
    (32, 128, 56, 56, 128, 3, 2, 1),
    (32, 512, 7, 7, 512, 3, 1, 1),
    (32, 3, 224, 224, 64, 3, 1, 1),
    (32, 512, 14, 14, 512, 3, 1, 1),
    (128, 1, 32, 32, 6, 5, 1, 0),
    (128, 6, 14, 14, 16, 5, 1, 0),
]
# Without FASTNETS_AOT_FULL: the sweep shape in every dtype (bar fp16: bf16's MMA path) with the fixed tile
# configuration (what the GPU test suite runs), its flags all off or all on; the autotuned configurations in
# bf16 for the sweep shape's forward, grad input and grad weight, the strided 1x1 GEMM's forward and grad
# weight and the FLAT stem's forward (between them every curated configuration survives the pruning somewhere).
CONV_TUNED_DEFAULT = {CONV_SHAPES[0]: ("forward", "grad_input", "grad_weight"),
                      CONV_SHAPES[1]: ("forward", "grad_weight"), CONV_SHAPES[2]: ("forward",)}


def _config_lists_under(tune):
    """The conv module's (_GEMM_CONFIGS, _WGRAD_CONFIGS) as FASTNETS_CONV_TUNE=`tune` defines them."""
    spec = importlib.util.find_spec("fastnets.triton_kernels.conv")
    mod = importlib.util.module_from_spec(spec)
    os.environ["FASTNETS_CONV_TUNE"] = tune
    try:
        spec.loader.exec_module(mod)
    finally:
        os.environ.pop("FASTNETS_CONV_TUNE", None)
    return mod._GEMM_CONFIGS, mod._WGRAD_CONFIGS


def _conv_operands(shape, dtype, channels_last):
    """Meta input, weight, output and bias of a convolution `shape` (n, c, h, w, cout, k, s, p), and its
    (stride, padding, dilation)."""
    n, c, h, w, cout, k, s, p = shape
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    return (meta((n, c, h, w), dtype, channels_last), meta((cout, c, k, k), dtype),
            meta((n, cout, oh, ow), dtype, channels_last), meta((cout,), dtype), ((s, s), (p, p), (1, 1)))


def _each_config(launch, tuned, quick=None):
    """A stand-in for conv._launch (`launch`) that records what the launcher compiles on a GPU: the fixed
    configuration (float64, FASTNETS_CONV_TUNE=fixed) and, while tuned["on"], every configuration the autotuner
    keeps after pruning, plus quick(raw kernel)'s list when `quick` is given."""

    def each_config(autotuner, raw, grid, *args, **kwargs):
        what = REC.what
        os.environ["FASTNETS_CONV_TUNE"] = "fixed"
        try:
            REC.what = f"{what} {raw.__name__} fixed config"
            cfg = launch(autotuner, raw, grid, *args, **kwargs)
        finally:
            os.environ.pop("FASTNETS_CONV_TUNE", None)
        if kwargs["FP64"] or not tuned["on"]:
            REC.what = what
            return cfg
        named = dict(zip(raw.arg_names, args))
        lists = [("autotuned", autotuner.early_config_prune(autotuner.configs, named, **kwargs))]
        if quick is not None:
            lists.append(("quick", quick(raw)))
        for label, configs in lists:
            REC.what = f"{what} {raw.__name__} {label}"
            REC._group = (len(REC.launches), label)
            for c in configs:
                raw[grid(c.kwargs)](*args, **kwargs, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            REC._group = None
        REC.what = what
        return cfg

    return each_config


def conv_launches():
    import fastnets.triton_kernels.conv as cv

    _with_cuda_device(cv, "_wgrad_target_programs")
    quick_gemm, quick_wgrad = _config_lists_under("quick")
    tuned = {"on": True}
    cv._launch = _each_config(cv._launch, tuned,
                              quick=lambda raw: quick_wgrad if raw is cv._conv_wgrad_kernel else quick_gemm)
    sweep_shape = CONV_SHAPES[0]
    for shape in CONV_SHAPES:
        n, c, h, w, cout, k, s, p = shape
        sweep = _sweep(shape, sweep_shape)
        if not (sweep or shape in CONV_TUNED_DEFAULT):
            continue
        for cl in ((False, True) if FULL else (True,)):
            for dtype in (ALL_DTYPES if sweep else (BF16,)):
                if not FULL and sweep and dtype == F16:
                    continue
                tuned_calls = ("forward", "grad_input", "grad_weight") if FULL else (
                    CONV_TUNED_DEFAULT.get(shape, ()) if dtype == BF16 else ())
                for tf32 in ((True, False) if dtype == F32 else (True,)):
                    set_fp32_precision("tf32" if tf32 else "ieee")  # the flag cuDNN and the Triton conv read
                    x, wt, y, bias, conf = _conv_operands(shape, dtype, cl)
                    vec = meta((cout,), acc_of(dtype))
                    with launches(f"conv {(n, c, h, w)} -> {cout} k{k} s{s} p{p} {dtype} channels_last={cl} "
                                  f"tf32={tf32}"):
                        # epilogues: plain conv (+bias), eval conv-BN (+residual) (+ReLU)
                        flags = _flags(FULL, (None, bias), (None, vec), (None, y), (False, True))
                        for b, sc, res, relu in flags if FULL else [(None, None, None, False), (bias, vec, y, True)]:
                            tuned["on"] = "forward" in tuned_calls and (FULL or relu)
                            cv.forward(x, wt, b, sc, sc, res, *conf, relu, y)
                        if sweep and dtype in (BF16, F32):  # other activations, the pre-activation saved
                            tuned["on"] = False
                            for act in (5, 7):
                                cv.forward(x, wt, bias, sc, sc, y, *conf, act, y, act_param=0.0, pre=y)
                        tuned["on"] = "forward" in tuned_calls and (FULL or sweep)
                        cv.forward_stats(x, wt, None if dtype == F64 else bias, *conf, y)
                        tuned["on"] = "grad_input" in tuned_calls
                        cv.grad_input(y, wt, meta((n, c, h, w), dtype, cl), *conf)
                        tuned["on"] = "grad_weight" in tuned_calls
                        cv.grad_weight(y, x, (cout, c, k, k), *conf)
    set_fp32_precision("tf32")  # torch's default


# ------------------------------------------------------------------------------------------- conv_prologue

# BatchNorm-apply + ReLU in the next convolution's prologue (fastnets/triton_kernels/conv_prologue.py: the conv
# kernels with PRO / EPI): ResNet-50 bottleneck convolutions. The sweep shape compiles bf16/fp32/fp64 with the
# fixed configuration (forward with and without the statistics epilogue, grad input with its epilogue, grad
# weight), silu in bf16, and the bf16 forward with every autotuned configuration the pruning keeps.
CONV_PROLOGUE_SHAPES = [
    (32, 64, 56, 56, 64, 3, 1, 1),
    (32, 256, 56, 56, 64, 1, 1, 0),
    (32, 128, 56, 56, 128, 3, 2, 1),
    (32, 256, 56, 56, 512, 1, 2, 0),
]


def conv_prologue_launches():
    import fastnets.triton_kernels.conv as cv
    import fastnets.triton_kernels.conv_prologue as cp

    _with_cuda_device(cv, "_wgrad_target_programs")
    launch = cv._launch
    tuned = {"on": False}
    cv._launch = _each_config(launch, tuned)
    try:
        for shape in CONV_PROLOGUE_SHAPES:
            n, c, h, w, cout, k, s, p = shape
            sweep = _sweep(shape, CONV_PROLOGUE_SHAPES[0])
            for dtype in ((BF16, F32, F64) if sweep else (BF16,)):
                z, wt, out, bias, conf = _conv_operands(shape, dtype, True)
                vec = meta((c,), acc_of(dtype))
                with launches(f"conv_prologue {(n, c, h, w)} -> {cout} k{k} s{s} p{p} {dtype} channels_last"):
                    tuned["on"] = sweep and dtype == BF16
                    cp.forward(z, vec, vec, wt, bias, *conf, 1, "relu", 0.0, out, stats=True)
                    tuned["on"] = False
                    if sweep:
                        cp.forward(z, vec, vec, wt, None, *conf, 1, "relu", 0.0, out)
                    cp.grad_input(out, wt, z, vec, vec, *conf, 1, "relu", 0.0, meta((n, c, h, w), dtype, True))
                    cp.grad_weight(out, z, vec, vec, (cout, c, k, k), *conf, 1, "relu", 0.0)
                    if sweep and dtype == BF16:  # another activation: the smooth act / act_grad branches
                        cp.forward(z, vec, vec, wt, bias, *conf, 1, "silu", 0.0, out)
                        cp.grad_input(out, wt, z, vec, vec, *conf, 1, "silu", 0.0, meta((n, c, h, w), dtype, True))
                        cp.grad_weight(out, z, vec, vec, (cout, c, k, k), *conf, 1, "silu", 0.0)
    finally:
        cv._launch = launch


# ------------------------------------------------------------------------------------------- compiling


U8 = torch.uint8
# (input shape, output size): CIFAR-10 training batches (crop/flip at 32x32), ImageNet-sized decoded images
# to a 224x224 RandomResizedCrop, MNIST (one channel).
AUG_SHAPES = [((256, 3, 32, 32), (32, 32)), ((128, 3, 375, 500), (224, 224)), ((256, 1, 28, 28), (28, 28))]


def augment_launches():
    import fastnets.triton_kernels.augment as aug

    for (shape, (oh, ow)) in AUG_SHAPES:
        n, c = shape[:2]
        mat = meta((n, 3, 3), F32)
        box = meta((n, 4), F32)
        col = meta((n, 3), F32)
        seed = meta((1,), torch.int64)
        vec = meta((c,), F32)
        sweep = shape == AUG_SHAPES[0][0]
        if FULL:  # every input/output dtype and layout and both interpolations on every shape
            combos = [(i, o, nr) for i in ((U8, False), (U8, True), (F32, False), (F16, True))
                      for o in ((BF16, True), (F32, False)) for nr in (False, True)]
        elif sweep:  # a few representative combinations (each variant takes seconds of ptxas on 2 cores)
            combos = [((U8, False), (BF16, True), False), ((U8, False), (BF16, True), True),
                      ((F16, True), (F32, False), False)]
        else:
            combos = [((U8, False), (BF16, True), False)]
        for (in_dtype, in_cl), (out_dtype, out_cl), nearest in combos:
            x = meta(shape, in_dtype, in_cl)
            out = meta((n, c, oh, ow), out_dtype, out_cl)
            with launches(f"augment {shape}->{(oh, ow)} {in_dtype} cl={in_cl} -> {out_dtype} cl={out_cl} "
                          f"nearest={nearest}"):
                # everything on (the contrast statistics pass included), then the plain resample
                aug.apply(x, mat, box, col, True, True, True, seed, 0.0, 0.1, True, vec, vec, nearest, 0.0, out)
                if sweep or FULL:
                    aug.apply(x, mat, None, None, False, False, False, None, 0.0, 0.0, True, None, None, nearest,
                              0.0, out)


_VERBOSE = False


def _progress(work):
    """Tell stderr about failures (and progress, with --verbose) as each variant finishes."""
    def tell(i, r):
        if "error" in r or _VERBOSE:
            fn, args, kwargs = work[i]
            state = "FAILED " + r["error"][:1500] if "error" in r else f"ok shared={r['shared']}"
            print(f"[{i + 1}/{len(work)} {r['seconds']:.1f}s] {describe(fn, args, kwargs)}: {state}",
                  file=sys.stderr, flush=True)
    return tell


def main(argv):
    jobs = os.cpu_count() or 1
    if "--jobs" in argv:
        i = argv.index("--jobs")
        jobs = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    global _VERBOSE
    list_only = "--list" in argv
    _VERBOSE = "--verbose" in argv
    argv = [a for a in argv if a not in ("--list", "--verbose")]
    families = argv or list(FAMILIES)
    t0 = time.time()
    for fam in families:
        globals()[f"{fam}_launches"]()
    variants = {}  # key -> (fn, args, kwargs, first launch's label)
    launch_keys = []
    for ln in REC.launches:
        fn, args, kwargs, what, group = ln.fn, ln.args, ln.kwargs, ln.what, ln.group
        key = variant_key(fn, args, kwargs)
        variants.setdefault(key, (fn, args, kwargs, what))
        launch_keys.append((key, what, group))
    t_record = time.time() - t0
    if list_only:
        for fn, args, kwargs, what in variants.values():
            print(what, "|", describe(fn, args, kwargs))
        return 0
    keys = list(variants)
    work = [variants[k][:3] for k in keys]
    results = compile_variants(work, TARGET, jobs, progress=_progress(work))
    result = dict(zip(keys, results))

    failures = []
    for k in keys:
        if "error" in result[k]:
            fn, args, kwargs, what = variants[k]
            failures.append({"kernel": describe(fn, args, kwargs), "launch": what, "error": result[k]["error"]})
    # Every launch must fit, autotuned configurations included: the conv pruning drops the configurations
    # that do not fit before anything compiles. The launch checker's shared-memory estimate of GEMM-shaped
    # launches (what it checks under the interpreter, and what the pruning computes) must not under-count
    # the compiled kernel's.
    from launch_checker import DEFAULT_NUM_STAGES, DEFAULT_NUM_WARPS, estimate_shared_bytes

    for key, what, group in launch_keys:
        if "error" in result[key]:
            continue
        fn, args, kwargs, _ = variants[key]
        shared = result[key]["shared"]
        if shared > H100_SHARED:
            failures.append({"kernel": describe(fn, args, kwargs), "launch": what,
                             "error": f"needs {shared} bytes of shared memory, an H100 has {H100_SHARED}"
                                      + (" (an autotuned configuration the pruning kept)" if group else "")})
        named = dict(zip(fn.arg_names, args), **kwargs)
        estimate = estimate_shared_bytes(named, kwargs.get("num_stages") or DEFAULT_NUM_STAGES,
                                         kwargs.get("num_warps") or DEFAULT_NUM_WARPS)
        if estimate is not None and not kwargs.get("FP64") and estimate < shared:
            failures.append({"kernel": describe(fn, args, kwargs), "launch": what,
                             "error": f"the launch checker estimates {estimate} bytes of shared memory, the "
                                      f"compiled kernel uses {shared}"})
    slowest = sorted(((r["seconds"], r["name"]) for r in results), reverse=True)[:3]
    print(json.dumps({
        "triton": triton.__version__, "target": "cuda sm_90", "families": families, "launches": len(REC.launches),
        "variants": len(keys), "failures": failures, "record_seconds": round(t_record, 1),
        "seconds": round(time.time() - t0, 1), "slowest": [[round(s, 1), n] for s, n in slowest],
    }))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
