"""Small hand-written kernels whose machine code is known, compiled for sm_90 and read by fastnets.audit's SASS
and TTIR parsers (tests/test_audit.py checks what they report). Runs in its own process (the test suite's
TRITON_INTERPRET=1 would make these kernels interpreted, never compiled).

    python tests/audit_calibration.py [--cuda]     # one JSON object on the last line of stdout
Exit status 77 with {"unavailable": reason} when nothing can be compiled here.

Triton kernels (fp32 unless said, 4 warps, sizes divisible by 16 so that Triton may vectorise):
  copy          y[i] = x[i], BLOCK 1024: each thread moves 8 floats = two 128-bit loads and two 128-bit stores
  strided_copy  y[i] = x[i * stride] with a run-time stride: the loads are scalar (8 x 32-bit), stores 128-bit
  row_sum       a loop over row blocks of a [rows, 64] matrix, 128-bit loads inside the loop
  divide        y[i] = x[i // d] with a run-time d: an integer division by a value known only at run time
  dot           C = A @ B, bf16, 128x128x64 tiles, 4 warps (one warpgroup), 3 stages: per K step 8
                HGMMA.64x128x16 (2 row halves x 4 k16 steps), pipelined (async)
  dot_1stage    the same with num_stages=1: no pipelining, each iteration waits for its own MMAs (sync)
  dot_2warps    the same tile with 2 warps: no warpgroup, warp-level HMMA.16816
  dot_spill     `dot` limited to 128 registers per thread (maxnreg; it needs 168): it spills
  flag_load     loads z_ptr only under a constexpr flag (off): the TTIR reads x_ptr, writes y_ptr, never z_ptr
With --cuda, nvcc (when present) builds a tiny CUDA C++ library: vec4_copy (float4 loads/stores in a
grid-stride loop) and spill_local (a local array indexed at run time, in local memory), read through the same
path as the extension's kernels (fastnets/audit/cuda.py).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _unavailable(reason):
    print(json.dumps({"unavailable": reason}))
    sys.exit(77)


try:
    import torch
    import triton
    import triton.language as tl

    from fastnets.audit import compile as ac
    from fastnets.audit import sass, ttir

    TARGET = ac.target(90)
    if sass.missing_tools():
        _unavailable(sass.missing_tools())
except (ImportError, Exception) as e:  # no Triton, no NVIDIA backend, no ptxas
    _unavailable(f"{type(e).__name__}: {e}")


@triton.jit
def copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m), mask=m)


@triton.jit
def strided_copy(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs * stride, mask=m), mask=m)


@triton.jit
def row_sum(x_ptr, y_ptr, rows, C: tl.constexpr, BLOCK_R: tl.constexpr):
    cols = tl.arange(0, C)
    acc = tl.zeros([C], tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        acc += tl.sum(tl.load(x_ptr + r[:, None] * C + cols[None, :], mask=(r < rows)[:, None], other=0.0), axis=0)
    tl.store(y_ptr + cols, acc)


@triton.jit
def divide(x_ptr, y_ptr, n, d, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs // d, mask=m), mask=m)


@triton.jit
def dot(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def flag_load(x_ptr, z_ptr, y_ptr, n, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    v = tl.load(x_ptr + offs, mask=m)
    if FLAG:
        v += tl.load(z_ptr + offs, mask=m)
    tl.store(y_ptr + offs, v, mask=m)


def _t(shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


N, F32, BF16 = 4096, torch.float32, torch.bfloat16
KERNELS = {
    "copy": (copy, (_t(N), _t(N), N), dict(BLOCK=1024)),
    "strided_copy": (strided_copy, (_t(2 * N), _t(N), N, 2), dict(BLOCK=1024)),
    "row_sum": (row_sum, (_t((N, 64)), _t(64), N), dict(C=64, BLOCK_R=32)),
    "divide": (divide, (_t(N), _t(N), N, 3), dict(BLOCK=1024)),
    "dot": (dot, (_t((128, 1024), BF16), _t((1024, 128), BF16), _t((128, 128)), 1024),
            dict(BM=128, BN=128, BK=64, num_warps=4, num_stages=3)),
    "dot_1stage": (dot, (_t((128, 1024), BF16), _t((1024, 128), BF16), _t((128, 128)), 1024),
                   dict(BM=128, BN=128, BK=64, num_warps=4, num_stages=1)),
    "dot_2warps": (dot, (_t((128, 1024), BF16), _t((1024, 128), BF16), _t((128, 128)), 1024),
                   dict(BM=128, BN=128, BK=64, num_warps=2, num_stages=3)),
    "dot_spill": (dot, (_t((128, 1024), BF16), _t((1024, 128), BF16), _t((128, 128)), 1024),
                  dict(BM=128, BN=128, BK=64, num_warps=4, num_stages=3, maxnreg=128)),
    "flag_load": (flag_load, (_t(N), _t(N), _t(N), N), dict(FLAG=False, BLOCK=1024)),
}


def analyse(k):
    t = ttir.analyse(k.asm["ttir"])
    s = sass.analyse_cubin(k.asm["cubin"], k.metadata.name, 90, k.metadata.num_warps, t["loop_dot_fma"] or None)
    return {"sass": s[k.metadata.name], "ttir": t, "num_warps": k.metadata.num_warps}


CUDA_SRC = r"""
extern "C" __global__ void vec4_copy(const float4* __restrict__ x, float4* __restrict__ y, long n) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) y[i] = x[i];
}
extern "C" __global__ void spill_local(const float* __restrict__ x, float* __restrict__ y, const int* idx, int n) {
  float buf[64];
  for (int j = 0; j < 64; ++j) buf[j] = x[threadIdx.x * 64 + j];
  float s = 0.f;
  for (int i = 0; i < n; ++i) s += buf[idx[i] & 63];
  y[threadIdx.x] = s;
}
"""


def cuda_rows():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "nvcc not found"
    from fastnets.audit import cuda

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "calib.cu")
        lib = os.path.join(tmp, "calib.so")
        with open(src, "w") as f:
            f.write(CUDA_SRC)
        p = subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-arch=sm_90", "-O3", "-o", lib, src],
                           capture_output=True, text=True)
        if p.returncode != 0:
            return None, f"nvcc failed: {p.stderr[-500:]}"
        rows, why = cuda.audit(lib)
        return {r["kernel"]: r for r in rows}, why


def main(argv):
    names = list(KERNELS)
    work = [(KERNELS[n][0], KERNELS[n][1], KERNELS[n][2]) for n in names]
    results = ac.compile_variants(work, TARGET, jobs=int(os.environ.get("FASTNETS_AUDIT_JOBS", "2")), analyse=analyse)
    out = {"triton": dict(zip(names, results))}
    if "--cuda" in argv:
        out["cuda"], out["cuda_unavailable"] = cuda_rows()
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
