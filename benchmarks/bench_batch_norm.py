"""BatchNorm and fused BatchNorm + add + ReLU on ResNet-50's BatchNorm shapes at batch 256.

fastnets `cuda` and `triton` against torch eager (cuDNN) and torch.compile of the same module or chain, in
bf16 channels_last and fp32 NCHW, training forward and forward+backward. Reports time, achieved GB/s
(the bytes the fused two-pass algorithm must move, the same count for every variant, so GB/s compares
like with like), the fraction of the device-to-device copy bandwidth measured in this run, and peak memory.

    python benchmarks/bench_batch_norm.py --out benchmarks/results [--quick]
"""
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import LiveRows, add_speedups, bf16_matmul_tflops, compile_module, copy_bandwidth_gbs, kernel_bench_parser, print_table, require_cuda, time_ms_and_peak_mib  # noqa: E402

import fastnets  # noqa: E402
from fastnets.nn import BatchNorm2d, BatchNormReLU2d  # noqa: E402

# (C, H, W) of every distinct BatchNorm input in torchvision's ResNet-50 (v1.5: stride in the 3x3 conv).
RESNET50_BN_SHAPES = [
    (64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28), (512, 28, 28),
    (256, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14), (512, 7, 7), (2048, 7, 7),
]
QUICK_SHAPES = [(64, 112, 112), (256, 56, 56), (1024, 14, 14), (2048, 7, 7)]
DRY_SHAPES = [(8, 5, 5)]  # --dry-run: batch 2 on the CPU
CONFIGS = {"bf16-nhwc": (torch.bfloat16, torch.channels_last), "fp32-nchw": (torch.float32, torch.contiguous_format)}


class EagerChain(nn.Module):
    """What BatchNormReLU2d replaces: BatchNorm2d, add, ReLU as three eager kernels."""

    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x, residual=None):
        y = self.bn(x)
        if residual is not None:
            y = y + residual
        return torch.relu(y)


class FastnetsFused(nn.Module):
    def __init__(self, c, backend):
        super().__init__()
        self.bn, self.backend = BatchNormReLU2d(c), backend

    def forward(self, x, residual=None):
        with fastnets.use_backend(self.backend):
            return self.bn(x, residual)


class FastnetsBN(nn.Module):
    def __init__(self, c, backend):
        super().__init__()
        self.bn, self.backend = BatchNorm2d(c), backend

    def forward(self, x):
        with fastnets.use_backend(self.backend):
            return self.bn(x)


def _variants(family, c, device, which, dry_run):
    out = {}
    eager = nn.BatchNorm2d if family == "bn" else EagerChain
    fused = FastnetsBN if family == "bn" else FastnetsFused
    if which != "compile":
        out["eager"] = eager(c)
        for b in ("cuda", "triton") + (("reference",) if dry_run else ()):
            if b in fastnets.available_backends(device):
                out[f"fastnets-{b}"] = fused(c, b)
    if which != "fastnets":
        out["compile"] = compile_module(eager(c), dry_run, dynamic=False)
    return out


def _bytes(family, numel, elt, backward):
    # forward: stats pass reads x; apply pass reads x (+ residual) and writes y
    fwd = (3 if family == "bn" else 4) * numel * elt
    if not backward:
        return fwd
    # backward: reduce reads dy, x (+ y for the ReLU mask); apply reads the same and writes dx (+ d residual)
    bwd = (4 if family == "bn" else 8) * numel * elt
    return fwd + bwd


def run(shapes, out_dir, families=("bn", "bn_add_relu"), device="cuda", which="all", dry_run=False):
    copy_gbs = copy_bandwidth_gbs()
    ceilings = {"copy_GBps": copy_gbs, "bf16_matmul_TFLOPs": bf16_matmul_tflops()}
    print(f"ceilings: copy {copy_gbs:.0f} GB/s, bf16 matmul {ceilings['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    batch = 2 if dry_run else 256
    rows = LiveRows(out_dir, "batch_norm", ceilings, part=None if which == "all" else which)
    configs = CONFIGS
    if which == "compile" and len(shapes) <= len(QUICK_SHAPES):  # --quick: inductor compiles are slow
        configs, shapes = {"bf16-nhwc": CONFIGS["bf16-nhwc"]}, shapes[:2]
    for family in families:
        for cfg, (dtype, fmt) in configs.items():
            for (c, h, w) in shapes:
                x = torch.randn(batch, c, h, w, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_()
                res = torch.randn_like(x) if family != "bn" else None
                args = (x,) if res is None else (x, res)
                for name, mod in _variants(family, c, device, which, dry_run).items():
                    mod = mod.to(device).train()
                    for backward in (False, True):
                        grad = torch.randn_like(x)

                        def step():
                            y = mod(*args)
                            if backward:
                                y.backward(grad)

                        try:
                            ms, peak = time_ms_and_peak_mib(step)
                        except Exception as e:  # report and go on: one failing variant must not hide the rest
                            print(f"{family} {cfg} {c}x{h}x{w} {name}: FAILED {type(e).__name__}: {e}")
                            rows.append(dict(family=family, config=cfg, shape=f"{batch}x{c}x{h}x{w}", variant=name,
                                             pass_="fwd+bwd" if backward else "fwd", error=str(e)[:300]))
                            continue
                        nbytes = _bytes(family, x.numel(), x.element_size(), backward)
                        gbs = nbytes / ms / 1e6
                        rows.append(dict(family=family, config=cfg, shape=f"{batch}x{c}x{h}x{w}", variant=name,
                                         pass_="fwd+bwd" if backward else "fwd", ms=ms, GBps=gbs,
                                         copy_fraction=gbs / copy_gbs, peak_MiB=peak))
                        x.grad = None
                del x, res
    add_speedups(rows, group=("family", "config", "shape", "pass_"))
    path = rows.flush()
    print_table(rows, ["family", "config", "shape", "variant", "pass_", "ms", "GBps", "copy_fraction", "peak_MiB", "vs_eager", "vs_compile"])
    print(f"wrote {path}")
    return rows


def main():
    args = kernel_bench_parser(__doc__, "four representative shapes instead of all twelve").parse_args()
    device = require_cuda(args.dry_run)
    shapes = DRY_SHAPES if args.dry_run else QUICK_SHAPES if args.quick else RESNET50_BN_SHAPES
    run(shapes, args.out, device=device, which=args.variants, dry_run=args.dry_run)


if __name__ == "__main__":
    main()
