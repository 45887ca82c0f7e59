"""The hardware numbers the static audit and the traffic model use, each with its source. All of them are
public specifications, not measurements; the audit's results are predictions made from them.

H100 SXM5 (sm_90), NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022) and the CUDA C++ Programming
Guide's compute-capability table:
  - 132 SMs; per SM 4 sub-partitions, each with one warp scheduler that issues one warp-instruction per
    clock and one tensor core;
  - dense tensor-core rate per SM per clock: 1024 FP16/BF16 FMA on A100, twice that on H100 (2048, i.e. 512
    per sub-partition); TF32 half of FP16; FP8 twice; FP64 (DMMA) 128 per SM. 989.4 TFLOP/s dense BF16 =
    132 SMs x 2048 FMA x 2 FLOP x 1.83 GHz;
  - 3.35 TB/s HBM3;
  - per SM: 65536 32-bit registers (allocated per warp in units of 256), 2048 threads, 32 resident blocks,
    228 KiB shared memory (227 KiB per block at most; 1 KiB of each block's is reserved by the system).
B200 (sm_100): 148 SMs, twice Hopper's dense FP16/BF16 rate per SM per clock (4096 FMA), 8 TB/s HBM3e, the
same per-SM limits (NVIDIA Blackwell datasheet, 2024).
"""

SUBPARTITIONS = 4

# dense tensor-core multiply-adds per clock per SM, by operand type
FMA_PER_CLOCK_PER_SM = {
    90: {"BF16": 2048, "F16": 2048, "TF32": 1024, "E4M3": 4096, "E5M2": 4096, "S8": 4096, "U8": 4096, "F64": 128},
    100: {"BF16": 4096, "F16": 4096, "TF32": 2048, "E4M3": 8192, "E5M2": 8192, "S8": 8192, "U8": 8192, "F64": 128},
}

SMS = {90: 132, 100: 148}
REGISTERS_PER_SM = 65536
REGISTER_ALLOCATION_UNIT = 256  # registers per warp
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32
SHARED_PER_SM = 233472  # 228 KiB
SHARED_RESERVED_PER_BLOCK = 1024

# the traffic model's H100
H100_HBM_BYTES_PER_S = 3.35e12
H100_BF16_FLOP_PER_S = 989.4e12
H100_TF32_FLOP_PER_S = 494.7e12
# HBM bytes per clock per SM at 1.755 GHz (the memory-bound kernels' clock): what each SM's loads must
# sustain for the whole GPU to stream at 3.35 TB/s
HBM_BYTES_PER_CLOCK_PER_SM = H100_HBM_BYTES_PER_S / (132 * 1.755e9)


def occupancy(registers, warps, shared_bytes):
    """(resident blocks per SM, resident warps / 64, the limiting resource) for a kernel of `warps` warps per
    block using `registers` per thread and `shared_bytes` of shared memory per block (sm_90 and sm_100).
    None where the register count is unknown."""
    if not registers or not warps:
        return None
    per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    limits = {
        "registers": (REGISTERS_PER_SM // per_warp) // warps,
        "threads": THREADS_PER_SM // (32 * warps),
        "blocks": BLOCKS_PER_SM,
    }
    if shared_bytes is not None:
        limits["shared memory"] = SHARED_PER_SM // (shared_bytes + SHARED_RESERVED_PER_BLOCK)
    blocks = min(limits.values())
    limit = min(limits, key=limits.get)
    return blocks, round(blocks * warps / 64, 3), limit
