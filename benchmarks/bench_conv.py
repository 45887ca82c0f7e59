"""Convolution and the fused Conv -> BatchNorm -> ReLU block, bf16 channels_last, on every distinct conv shape
of ResNet-50 at batch 256 (its 1x1 shapes among them) and the 3x3 shapes of VGG-16 (batch 64 by default).

Per shape, measured in this run on this card:
  conv (forward, the convolution alone): cuDNN (F.conv2d), fastnets `triton`, fastnets `auto` (hybrid)
  eval_fwd, train_fwd, train_fwdbwd of the block: eager nn.Sequential(Conv2d, BatchNorm2d, ReLU),
      torch.compile of that Sequential, fastnets ConvBNReLU2d under `auto` and under `triton`
Each row has the median time, the convolution's TFLOP/s (forward 2*N*Cout*OH*OW*Cin*K*K; forward+backward
adds grad weight and, except for the C=3 stem whose input needs no gradient, grad input) and its fraction of
the bf16 matmul rate measured in the same run, and speed-ups vs cuDNN's conv alone, vs eager and vs compile.
The targets of the issue are checked at the end: 1x1 conv >= 0.95x cuDNN's speed, eval block at least as fast
as cuDNN's conv alone, training fwd+bwd >= 1.25x eager.

Then a ResNet-50 bottleneck block's training step (forward + backward, bf16 channels_last, batch --batch): eager
torchvision-style modules; fastnets unfused (conv_bn_act per Conv -> BN -> ReLU: the statistics in the conv's
epilogue, y = relu(bn(z)) stored); fastnets with the BN-apply + ReLU in the next convolution's prologue
(fastnets.nn.conv_chain: bn_act_conv2d, y never stored), each under `auto` and `triton`, with the bytes saved for
backward per step (saved_tensors_hooks, each storage once). Target (issue 17): the prologue block faster than
the unfused fastnets block.

    python benchmarks/bench_conv.py --out benchmarks/results [--quick] [--no-compile] [--batch 256]

--quick: 3 shapes, one fixed tile configuration per kernel instead of autotuning (FASTNETS_CONV_TUNE=quick,
so its Triton numbers are a lower bound), fewer repetitions, torch.compile of the training forward+backward of
the first shape only; meant to finish in about 90 s on an H100 including Triton and inductor compilation.
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _conv_out(h, k, s, p):
    return (h + 2 * p - k) // s + 1


def resnet50_shapes(batch):
    """(name, N, Cin, H, Cout, k, stride, pad) of every distinct conv in torchvision's ResNet-50 (v1.5)."""
    shapes = [("stem7x7", batch, 3, 224, 64, 7, 2, 3)]
    # (in_channels, width, out_channels, H of the stage input, first-block stride)
    stages = [(64, 64, 256, 56, 1), (256, 128, 512, 56, 2), (512, 256, 1024, 28, 2), (1024, 512, 2048, 14, 2)]
    seen = set()
    for cin, width, cout, h, s in stages:
        ho = h // s
        cand = [
            (cin, h, width, 1, 1, 0), (width, h, width, 3, s, 1), (width, ho, cout, 1, 1, 0),  # first block
            (cin, h, cout, 1, s, 0),  # downsample
            (cout, ho, width, 1, 1, 0), (width, ho, width, 3, 1, 1),  # later blocks
        ]
        for c_in, hh, c_out, k, st, p in cand:
            key = (c_in, hh, c_out, k, st, p)
            if key in seen:
                continue
            seen.add(key)
            shapes.append((f"{k}x{k}s{st}_{c_in}to{c_out}@{hh}", batch, c_in, hh, c_out, k, st, p))
    return shapes


def vgg16_shapes(batch):
    spec = [(3, 64, 224), (64, 64, 224), (64, 128, 112), (128, 128, 112), (128, 256, 56), (256, 256, 56),
            (256, 512, 28), (512, 512, 28), (512, 512, 14)]
    return [(f"vgg3x3_{ci}to{co}@{h}", batch, ci, h, co, 3, 1, 1) for ci, co, h in spec]


def _flops(n, cin, h, cout, k, s, p):
    o = _conv_out(h, k, s, p)
    return 2.0 * n * cout * o * o * cin * k * k


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--batch", type=int, default=256, help="ResNet-50 batch")
    parser.add_argument("--vgg-batch", type=int, default=64)
    from benchmarks.common import add_common_args

    add_common_args(parser)
    args = parser.parse_args()
    if args.variants == "fastnets":
        args.no_compile = True
    if args.quick:
        os.environ.setdefault("FASTNETS_CONV_TUNE", "quick")

    import torch

    from benchmarks.common import LiveRows, bf16_matmul_tflops, compile_module, print_table, require_cuda, time_ms

    device = require_cuda(args.dry_run)
    import torch.nn.functional as F
    from torch import nn

    import fastnets
    from fastnets.nn import ConvBNReLU2d
    from fastnets.ops.conv import conv2d

    try:
        torch._dynamo.config.cache_size_limit = 1024
        torch._dynamo.config.recompile_limit = 1024
    except AttributeError:
        pass

    t_start = time.time()
    matmul = bf16_matmul_tflops()
    print(f"bf16 matmul rate measured in this run: {matmul:.0f} TFLOP/s")
    if args.dry_run:
        shapes = [("resnet50", ("dry3x3", 2, 3, 6, 4, 3, 1, 1))]
        warmup, reps = 1, 2
    elif args.quick:
        rn = dict((s[0], s) for s in resnet50_shapes(args.batch))
        shapes = [("resnet50", rn["1x1s1_256to64@56"]), ("resnet50", rn["3x3s1_64to64@56"]),
                  ("resnet50", rn["1x1s2_512to1024@28"])]
        warmup, reps = 3, 10
    else:
        shapes = [("resnet50", s) for s in resnet50_shapes(args.batch)] + [("vgg16", s) for s in vgg16_shapes(args.vgg_batch)]
        warmup, reps = 5, 25

    dt, fmt = torch.bfloat16, torch.channels_last
    which = args.variants
    rows = LiveRows(args.out, "conv", {"bf16_matmul_tflops": matmul}, part=None if which == "all" else which,
                    extra={"quick": args.quick})

    def timed(fn):
        return time_ms(fn, warmup=warmup, reps=reps)

    for idx, (family, (name, n, cin, h, cout, k, s, p)) in enumerate(shapes):
        flops = _flops(n, cin, h, cout, k, s, p)
        do_compile = not args.no_compile and (not args.quick or idx == 0)
        torch._dynamo.reset()
        torch.manual_seed(0)
        x = torch.randn(n, cin, h, h, device=device, dtype=dt).contiguous(memory_format=fmt)
        eager = nn.Sequential(nn.Conv2d(cin, cout, k, s, p, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        eager = eager.to(device, dt).to(memory_format=fmt)
        fused = ConvBNReLU2d(cin, cout, k, stride=s, padding=p).to(device, dt).to(memory_format=fmt)
        fused.load_state_dict({kk.replace("0.", "conv.", 1).replace("1.", "bn.", 1): v for kk, v in eager.state_dict().items()})
        w = eager[0].weight.detach()
        base = {"family": family, "config": "bf16-nhwc", "shape": name, "N": n, "Cin": cin, "H": h, "Cout": cout,
                "k": k, "stride": s}

        def add(pass_, variant, ms, ref=None, err=None, conv_flops=flops):
            r = dict(base, pass_=pass_, variant=variant)
            if err is not None:
                r["error"] = err
            else:
                r["ms"] = ms
                r["tflops"] = conv_flops / ms / 1e9
                r["matmul_fraction"] = r["tflops"] / matmul
                r.update(ref or {})
            rows.append(r)
            return r

        def run(pass_, variant, fn, conv_flops=flops):
            try:
                ms = timed(fn)
                return add(pass_, variant, ms, conv_flops=conv_flops)
            except Exception as e:  # a variant that fails is reported, the others still run
                if device == "cuda":
                    torch.cuda.synchronize()
                return add(pass_, variant, None, err=f"{type(e).__name__}: {str(e)[:300]}")

        # ---- the convolution alone
        t_cudnn = None
        if which != "compile":
            with torch.no_grad():
                cud = run("conv", "cudnn", lambda: F.conv2d(x, w, None, s, p))
                tri = run("conv", "fastnets-triton", lambda: conv2d(x, w, None, s, p, backend="triton"))
                aut = run("conv", "fastnets-auto", lambda: conv2d(x, w, None, s, p, backend="auto"))
            t_cudnn = cud.get("ms")
            for r in (cud, tri, aut):
                if t_cudnn and r.get("ms"):
                    r["vs_cudnn"] = t_cudnn / r["ms"]

        # ---- the block: eval forward, train forward, train forward+backward
        bwd_flops = flops * (2 if cin == 3 else 3)
        grad_out = torch.randn(n, cout, _conv_out(h, k, s, p), _conv_out(h, k, s, p), device=device, dtype=dt)
        grad_out = grad_out.contiguous(memory_format=fmt)
        xg = x.detach().clone().requires_grad_(cin != 3)

        def fwd(mod):
            def f():
                with torch.no_grad():
                    mod(x)
            return f

        def train_fwd(mod):
            return lambda: mod(x)

        def fwdbwd(mod, params):
            def f():
                for q in params:
                    q.grad = None
                xg.grad = None
                mod(xg).backward(grad_out)
            return f

        # --quick compiles only the training forward+backward of its first shape (compilation is slow)
        compiled = {}
        if do_compile:
            modes = ("train_fwdbwd",) if args.quick else ("eval_fwd", "train_fwd", "train_fwdbwd")
            compiled = {m: compile_module(eager, args.dry_run) for m in modes}
        for pass_ in ("eval_fwd", "train_fwd", "train_fwdbwd"):
            train = pass_ != "eval_fwd"
            eager.train(train)
            fused.train(train)
            maker = {"eval_fwd": fwd, "train_fwd": train_fwd}.get(pass_)
            cf = bwd_flops if pass_ == "train_fwdbwd" else flops
            variants = [("eager", eager, None)] if which != "compile" else []
            if pass_ in compiled:
                variants.append(("compile", compiled[pass_], None))
            if which != "compile":
                variants += [("fastnets-auto", fused, "auto"), ("fastnets-triton", fused, "triton")]
            if not variants:
                continue
            got = {}
            for variant, mod, backend in variants:
                if maker is None:
                    params = list(eager.parameters()) if mod is not fused else list(fused.parameters())
                    fn = fwdbwd(mod, params)
                else:
                    fn = maker(mod)
                if backend is not None:
                    def fn_b(fn=fn, backend=backend):
                        with fastnets.use_backend(backend):
                            fn()
                    got[variant] = run(pass_, variant, fn_b, conv_flops=cf)
                else:
                    got[variant] = run(pass_, variant, fn, conv_flops=cf)
            te = got.get("eager", {}).get("ms")
            tc = got.get("compile", {}).get("ms")
            for r in got.values():
                if r.get("ms"):
                    if te:
                        r["vs_eager"] = te / r["ms"]
                    if tc:
                        r["vs_compile"] = tc / r["ms"]
                    if t_cudnn:
                        r["vs_cudnn"] = t_cudnn / r["ms"]
        del x, xg, grad_out, eager, fused, compiled
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"[{time.time() - t_start:6.1f}s] {name} done", flush=True)

    if which != "compile":
        bottleneck_rows(rows, args, device, timed)

    from fastnets.ops import _conv_auto

    targets = _targets(rows)
    print_table(rows, ["shape", "pass_", "variant", "ms", "tflops", "matmul_fraction", "vs_cudnn", "vs_eager", "vs_compile", "error"])
    print("\nTargets (speed ratios, higher is better):")
    for t in targets:
        print(f"  {t['target']}: {t['shape']} {t['variant']} = {t['value']:.3f} (need >= {t['need']}) {'PASS' if t['pass'] else 'FAIL'}")
    path = rows.flush(extra={"targets": targets, "hybrid_choices": {str(k): v for k, v in _conv_auto.choices.items()},
                             "seconds": time.time() - t_start})
    print(f"wrote {path} in {time.time() - t_start:.0f} s")


def _saved_bytes(fn):
    """Bytes of the tensors saved for backward while fn() runs (each storage once), and fn's result."""
    import torch

    saved = {}

    def pack(t):
        st = t.untyped_storage()
        saved[(st.device.type, st.data_ptr())] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved.values()), out


def bottleneck_rows(rows, args, device, timed):
    """A ResNet-50 bottleneck block's training step: eager vs fastnets unfused vs fastnets prologue-fused."""
    import torch
    from torch import nn

    import fastnets
    from fastnets.nn import conv_bn_act
    from fastnets.nn.conv_chain import conv_bn_act_chained, conv_bn_deferred

    dt, fmt = torch.bfloat16, torch.channels_last
    if args.dry_run:  # the plumbing only, on the CPU (the Triton interpreter would take minutes)
        blocks = [("dry_block", 2, 16, 4, 6, 1)]
        backends = ("auto",)
    else:
        # (name, N, in = out channels, width, H, stride): stage 1's and stage 3's identity blocks
        blocks = [("bottleneck_256-64-256@56", args.batch, 256, 64, 56, 1),
                  ("bottleneck_1024-256-1024@14", args.batch, 1024, 256, 14, 1)]
        backends = ("auto", "triton")

    class Bottleneck(nn.Module):
        def __init__(self, cin, width):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, cin, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(cin)
            self.mode = "eager"

        def forward(self, x):
            if self.mode == "eager":
                y = torch.relu(self.bn1(self.conv1(x)))
                y = torch.relu(self.bn2(self.conv2(y)))
                return torch.relu(self.bn3(self.conv3(y)) + x)
            if self.mode == "unfused":
                y = conv_bn_act(self.conv1, self.bn1, x)
                y = conv_bn_act(self.conv2, self.bn2, y)
                return conv_bn_act(self.conv3, self.bn3, y, residual=x)
            d = conv_bn_deferred(self.conv1, self.bn1, x)
            d = conv_bn_deferred(self.conv2, self.bn2, d)
            return conv_bn_act_chained(self.conv3, self.bn3, d, residual=x)

    for name, n, cin, width, h, s in blocks:
        torch.manual_seed(0)
        block = Bottleneck(cin, width).to(device, dt).to(memory_format=fmt).train()
        x = torch.randn(n, cin, h, h, device=device, dtype=dt).contiguous(memory_format=fmt).requires_grad_()
        grad = torch.randn(n, cin, h, h, device=device, dtype=dt).contiguous(memory_format=fmt)
        flops = 2.0 * n * h * h * (cin * width + 9 * width * width + width * cin) * 3  # fwd + dgrad + wgrad
        base = {"family": "resnet50-block", "config": "bf16-nhwc", "shape": name, "N": n, "Cin": cin, "H": h,
                "Cout": cin, "k": 0, "stride": s, "pass_": "block_train_fwdbwd"}
        got = {}
        variants = [("eager", "eager", None)] + [(f"fastnets-{m}-{b}", m, b) for m in ("unfused", "prologue")
                                                  for b in backends]
        for variant, mode, backend in variants:
            block.mode = mode

            def step():
                x.grad = None
                for q in block.parameters():
                    q.grad = None
                block(x).backward(grad)

            def run(fn=step, backend=backend):
                if backend is None:
                    return fn()
                with fastnets.use_backend(backend):
                    return fn()

            r = dict(base, variant=variant)
            try:
                with torch.no_grad():
                    snapshot = {k: v.clone() for k, v in block.state_dict().items()}
                r["saved_bytes"] = _saved_bytes(lambda: run(lambda: block(x)))[0]
                r["ms"] = timed(run)
                r["tflops"] = flops / r["ms"] / 1e9
                block.load_state_dict(snapshot)  # the running statistics as before each variant
            except Exception as e:  # a variant that fails is reported, the others still run
                if device == "cuda":
                    torch.cuda.synchronize()
                r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(r)
            got[variant] = r
        te = got["eager"].get("ms")
        for variant, r in got.items():
            if not r.get("ms"):
                continue
            if te:
                r["vs_eager"] = te / r["ms"]
            if "-prologue-" in variant:
                tu = got.get(variant.replace("-prologue-", "-unfused-"), {}).get("ms")
                if tu:
                    r["vs_unfused"] = tu / r["ms"]
        del block, x, grad
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"{name}: " + ", ".join(f"{v} {r.get('ms', float('nan')):.2f} ms saved {r.get('saved_bytes', 0) / 2**20:.1f} MiB"
                                      for v, r in got.items()), flush=True)


def _targets(rows):
    by = {(r["shape"], r["pass_"], r["variant"]): r for r in rows}
    out = []
    for (shape, pass_, variant), r in by.items():
        if "ms" not in r:
            continue
        if pass_ == "block_train_fwdbwd" and r.get("vs_unfused"):
            out.append({"target": "prologue block vs unfused fastnets block", "shape": shape, "variant": variant,
                        "value": r["vs_unfused"], "need": 1.0})
        if pass_ == "conv" and r["k"] == 1 and variant.startswith("fastnets") and r.get("vs_cudnn"):
            out.append({"target": "1x1 conv vs cuDNN", "shape": shape, "variant": variant, "value": r["vs_cudnn"], "need": 0.95})
        if pass_ == "eval_fwd" and variant.startswith("fastnets") and r.get("vs_cudnn"):
            out.append({"target": "eval Conv+BN+ReLU vs cuDNN conv alone", "shape": shape, "variant": variant,
                        "value": r["vs_cudnn"], "need": 1.0})
        if pass_ == "train_fwdbwd" and variant.startswith("fastnets") and r.get("vs_eager"):
            out.append({"target": "train fwd+bwd vs eager", "shape": shape, "variant": variant, "value": r["vs_eager"], "need": 1.25})
    for t in out:
        t["pass"] = t["value"] >= t["need"]
    groups = {}
    for t in out:
        groups.setdefault((t["target"], t["variant"]), []).append(t["value"])
    for (target, variant), vals in sorted(groups.items()):
        g = math.exp(sum(math.log(v) for v in vals) / len(vals))
        need = next(t["need"] for t in out if t["target"] == target)
        out.append({"target": target, "shape": "geomean", "variant": variant, "value": g, "need": need, "pass": g >= need})
    return out


if __name__ == "__main__":
    main()
