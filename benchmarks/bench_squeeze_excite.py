"""The squeeze-and-excitation blocks of SE-ResNet-50 at batch 256, bf16 channels_last, with the SE-ResNet tail
(y = relu(se(x) + shortcut)): fastnets `cuda` and `triton` against torch eager and torch.compile of the same
eager block (pool, fc1, ReLU, fc2, sigmoid, multiply, add, ReLU), forward and forward+backward (gradients of
x, the shortcut and the four parameters).

Reports time, the achieved GB/s of the bytes the fused algorithm must move (the same count for every variant,
so GB/s compares like with like), the fraction of the device-to-device copy bandwidth measured in this run,
peak memory, speedups against eager and compile, and the largest difference of the fastnets output and
input gradient from eager's. The target: forward+backward >= 3x eager and >= torch.compile.

Traffic model, in units of one pass over x (numel * 2 bytes): the fused block moves 4 forward (pool reads
x; scale reads x and the shortcut, writes y) + 7 backward (reduce reads dy, x, y; apply reads dy, y, writes
dx and d shortcut) = 11. Eager moves about 8 forward (mean 1, x*s 2, +shortcut 3, relu 2) + 13 backward
(relu backward 3, x*s backward 2 + 4, mean backward and the sum of x's two gradients 4) = 21, plus ~25
kernel launches. So against an eager whose kernels all run at full bandwidth the fused block can be at
most ~1.9x faster on the big shapes; beyond that only eager's inefficiencies (launch gaps on the small
stage-4 tensors, slow strided reductions) count. torch.compile can reach the same 11 units.

    python benchmarks/bench_squeeze_excite.py --out benchmarks/results [--quick]
"""
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import LiveRows, add_speedups, compile_module, copy_bandwidth_gbs, kernel_bench_parser, print_table, require_cuda, time_ms_and_peak_mib  # noqa: E402

import fastnets  # noqa: E402
from fastnets.nn import SqueezeExcite  # noqa: E402

BATCH = 256
# (C, H, W, R, blocks in SE-ResNet-50): the SE module sits on the bottleneck output, R = C / 16.
SE_RESNET50_SHAPES = [(256, 56, 56, 16, 3), (512, 28, 28, 32, 4), (1024, 14, 14, 64, 6), (2048, 7, 7, 128, 3)]
QUICK_SHAPES = [SE_RESNET50_SHAPES[0], SE_RESNET50_SHAPES[3]]
DRY_SHAPES = [(16, 4, 4, 2, 1)]  # --dry-run: batch 2 on the CPU


class EagerSE(nn.Module):
    """torchvision/timm's SE block and the bottleneck tail, as eager kernels."""

    def __init__(self, c, r):
        super().__init__()
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)

    def forward(self, x, residual):
        s = x.mean((2, 3), keepdim=True)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return torch.relu(x * s + residual)


class FastnetsSE(nn.Module):
    def __init__(self, c, r, backend):
        super().__init__()
        self.se, self.backend = SqueezeExcite(c, r), backend

    def forward(self, x, residual):
        with fastnets.use_backend(self.backend):
            return self.se(x, residual=residual, relu=True)


def _variants(c, r, device="cuda", which="all", dry_run=False):
    torch.manual_seed(0)  # the same weights in the fastnets and the compile step
    eager = EagerSE(c, r)
    state = eager.state_dict()
    out = {"eager": eager}  # the first variant is the correctness reference of the others
    if which != "compile":
        for b in ("cuda", "triton") + (("reference",) if dry_run else ()):
            if b in fastnets.available_backends(device):
                out[f"fastnets-{b}"] = FastnetsSE(c, r, b)
    if which != "fastnets":
        out["compile"] = compile_module(EagerSE(c, r), dry_run, dynamic=False)
    for name, m in out.items():
        (m.se if isinstance(m, FastnetsSE) else getattr(m, "_orig_mod", m)).load_state_dict(state)
    return out


def _bytes(numel, elt, backward):
    # forward: pool reads x; scale reads x and the shortcut, writes y
    fwd = 4 * numel * elt
    if not backward:
        return fwd
    # backward: reduce reads dy, x, y (ReLU mask); apply reads dy, y, writes dx and d shortcut
    return fwd + 7 * numel * elt


def run(shapes, out_dir, reps, device="cuda", which="all", dry_run=False):
    copy_gbs = copy_bandwidth_gbs()
    ceilings = {"copy_GBps": copy_gbs}
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, copy bandwidth {copy_gbs:.0f} GB/s")
    batch = 2 if dry_run else BATCH
    extra = {"batch": batch, "dtype": "bfloat16", "layout": "channels_last", "traffic_units": {"fused": 11, "eager": 21}}
    rows = LiveRows(out_dir, "squeeze_excite", ceilings, part=None if which == "all" else which, extra=extra)
    dtype = torch.bfloat16
    for (c, h, w, r, count) in shapes:
        shape = f"{batch}x{c}x{h}x{w}/r{r}"
        x = torch.randn(batch, c, h, w, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        res = torch.randn_like(x)
        x.requires_grad_()
        res.requires_grad_()
        grad = torch.randn_like(x)
        ref = None
        for name, mod in _variants(c, r, device, which, dry_run).items():
            mod = mod.to(device=device, dtype=dtype).train()
            # correctness against eager (first variant) on this shape
            y = mod(x, res)
            y.backward(grad)
            got = (y.detach().float(), x.grad.float(), res.grad.float())
            if ref is None:
                ref = got
            err_y = (got[0] - ref[0]).abs().max().item()
            err_dx = (got[1] - ref[1]).abs().max().item()
            x.grad = res.grad = None
            del y, got
            for backward in (False, True):

                def step():
                    y = mod(x, res)
                    if backward:
                        y.backward(grad)

                try:
                    ms, peak = time_ms_and_peak_mib(step, warmup=3, reps=reps)
                except Exception as e:  # report and go on: one failing variant must not hide the rest
                    print(f"{shape} {name}: FAILED {type(e).__name__}: {e}")
                    rows.append(dict(shape=shape, variant=name, pass_="fwd+bwd" if backward else "fwd", error=str(e)[:300]))
                    continue
                finally:
                    x.grad = res.grad = None
                    for p in mod.parameters():
                        p.grad = None
                gbs = _bytes(x.numel(), x.element_size(), backward) / ms / 1e6
                rows.append(dict(shape=shape, blocks=count, variant=name, pass_="fwd+bwd" if backward else "fwd",
                                 ms=ms, GBps=gbs, copy_fraction=gbs / copy_gbs, peak_MiB=peak,
                                 max_err_y=err_y, max_err_dx=err_dx))
        del x, res, grad, ref
        if device == "cuda":
            torch.cuda.empty_cache()
    add_speedups(rows, group=("shape", "pass_"))
    rows.extend(_network_totals(rows, shapes))
    path = rows.flush()
    print_table(rows, ["shape", "variant", "pass_", "ms", "GBps", "copy_fraction", "peak_MiB", "vs_eager", "vs_compile", "max_err_y", "max_err_dx"])
    for r in rows:
        if r.get("pass_") == "fwd+bwd" and r["variant"].startswith("fastnets") and "vs_eager" in r:
            ok = r["vs_eager"] >= 3 and r.get("vs_compile", 0) >= 1
            print(f"target (fwd+bwd >= 3x eager and >= compile) {r['shape']} {r['variant']}: "
                  f"{r['vs_eager']:.2f}x eager, {r.get('vs_compile', float('nan')):.2f}x compile -> {'MET' if ok else 'NOT MET'}")
    print(f"wrote {path}")
    return rows


def _network_totals(rows, shapes):
    """All 16 SE blocks of SE-ResNet-50 (each shape times its block count), when every shape was measured."""
    if len(shapes) != len(SE_RESNET50_SHAPES):
        return []
    totals = {}
    for r in rows:
        if "ms" in r:
            key = (r["variant"], r["pass_"])
            totals.setdefault(key, []).append(r["ms"] * r["blocks"])
    out = [dict(shape="SE-ResNet-50 (16 blocks)", variant=v, pass_=p, ms=sum(t)) for (v, p), t in totals.items() if len(t) == len(shapes)]
    add_speedups(out, group=("shape", "pass_"))
    return out


def main():
    args = kernel_bench_parser(__doc__, "the first and last stage's shapes, fewer repetitions").parse_args()
    device = require_cuda(args.dry_run)
    shapes = DRY_SHAPES if args.dry_run else QUICK_SHAPES if args.quick else SE_RESNET50_SHAPES
    run(shapes, args.out, reps=10 if args.quick else 30, device=device, which=args.variants, dry_run=args.dry_run)


if __name__ == "__main__":
    main()
