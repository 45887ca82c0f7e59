"""The statistics kernels' sm_90 PTX holds no approximate division or square root.

Means, variances and invstd land in outputs as they are, and the CUDA C++ kernels compute them with
__fdiv_rn / __frsqrt_rn (csrc/common.cuh); Triton's `/` and tl.sqrt on fp32 compile to div.full.f32 /
sqrt.approx.f32 (2 ulp), so the Triton kernels use triton_kernels/_common.div_rn / rsqrt_rn. The interpreter
divides with numpy (IEEE either way), so only the compiled code shows the difference: this script records
the launches of the statistics kernels (BatchNorm stats + finalize, the conv forward's BN-statistics epilogue
and its Chan merge, squeeze-excite's pooled mean) on meta tensors with tests/triton_aot.py's recorder,
compiles each variant for sm_90 (Triton + ptxas, no GPU) and greps the PTX.

Usage: python tests/stats_ptx.py [--verbose]. Last stdout line: one JSON object. Exit status 0: clean;
1: an approximate instruction (or a missing correctly rounded one) in some kernel; 77: nothing can be
compiled here (as tests/triton_aot.py).
"""
import json
import os
import re
import sys

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fastnets

import triton_aot as aot  # noqa: E402  (sets TRITON_INTERPRET=0, records launches; exits 77 if it cannot compile)

F32, BF16, F64 = aot.F32, aot.BF16, aot.F64
APPROX = re.compile(r"\b(?:div\.(?:full|approx)|sqrt\.approx|rsqrt\.approx|rcp\.approx|ex2\.approx)(?:\.ftz)?\.f\d+")
ROUNDED = re.compile(r"\bdiv\.rn(?:\.ftz)?\.f(?:32|64)\b")

# kernel name -> the launches of it that compute statistics (a kernel that also serves other work is
# checked in its statistics variant only: the conv forward's other epilogues may hold activations' math)
STATS = {
    "_stats_cl_kernel": lambda kw: True,
    "_stats_nchw_kernel": lambda kw: True,
    "_stats_finalize_kernel": lambda kw: True,
    "_stats_merge_kernel": lambda kw: True,
    "_conv_fwd_kernel": lambda kw: kw.get("STATS") is True,
    "_reduce_kernel": lambda kw: kw.get("MEAN") is True,
}


def record():
    os.environ["FASTNETS_CONV_TUNE"] = "fixed"  # one configuration: the statistics code is the same in all
    import fastnets.triton_kernels.batch_norm as bn
    import fastnets.triton_kernels.conv as cv
    import fastnets.triton_kernels.squeeze_excite as se

    aot._with_cuda_device(bn, "_target_programs")
    aot._with_cuda_device(se, "sm_count")
    aot._with_cuda_device(se, "_split")
    with aot.launches("batch_norm stats"):
        bn.stats(aot.meta((32, 64, 28, 28), F32, True), True, 1e-5)
        bn.stats(aot.meta((32, 64, 28, 28), BF16, False), False, 1e-5)
        bn.stats(aot.meta((8, 16, 5, 5), F64, False), False, 1e-5)
    with aot.launches("conv forward_stats"):
        n, c, h, w, cout = 8, 32, 14, 14, 64
        x = aot.meta((n, c, h, w), F32, True)
        cv.forward_stats(x, aot.meta((cout, c, 3, 3), F32), aot.meta((cout,), F32), (1, 1), (1, 1), (1, 1),
                         aot.meta((n, cout, h, w), F32, True))
    with aot.launches("squeeze_excite pool"):
        se.pool(aot.meta((2, 64, 7, 7), F32, False), False)
    return [(ln.fn, ln.args, ln.kwargs) for ln in aot.REC.launches
            if ln.fn.__name__ in STATS and STATS[ln.fn.__name__](ln.kwargs)]


def ptx_rounding(kernel):
    """Runs in the compiling child: the approximate and the correctly rounded divisions in the PTX."""
    ptx = kernel.asm["ptx"]
    return {"approx": sorted(set(APPROX.findall(ptx))), "rounded": len(ROUNDED.findall(ptx))}


def main(argv):
    records = record()
    variants = {}
    for fn, args, kw in records:
        variants.setdefault(aot.variant_key(fn, args, kw), (fn, args, kw))
    work = list(variants.values())
    results = aot.compile_variants(work, aot.TARGET, 1, analyse=ptx_rounding)
    failures = []
    for (fn, args, kw), r in zip(work, results):
        what = aot.describe(fn, args, kw)
        if "--verbose" in argv:
            print(f"{what}: {r}", file=sys.stderr)
        if "error" in r:
            failures.append(f"{what}: does not compile: {r['error']}")
        elif r["approx"]:
            failures.append(f"{what}: approximate {r['approx']} in the PTX")
        elif r["rounded"] == 0:
            failures.append(f"{what}: no correctly rounded division (div.rn) in the PTX: is this still a "
                            "statistics kernel?")
    names = sorted({fn.__name__ for fn, _, _ in work})
    print(json.dumps({"triton": aot.triton.__version__, "variants": len(work), "kernels": names,
                      "failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
