"""The traffic model: a PREDICTION of each kernel's time on an H100 from the bytes it moves and the tensor-core
work it does, for every op case (workload.OPS) and one ResNet-50 training step, fastnets against eager PyTorch.

The kernels are the ones the step really launches (workload.trace_*: fastnets' ops run their real bodies on
meta tensors, eager's torch ops run as they are), in order. For each kernel:

  bytes  - a Triton kernel: every tensor its TTIR loads from counts once, every tensor it stores to counts
           once (ttir.py follows each pointer argument to its loads and stores; a placeholder pointer a
           constexpr disables counts as neither), at the size of the tensor bound to it in the recorded
           launch (the launch plan's partial buffers included). Re-reads of a tile by other programs are
           assumed to hit L2 (so the convolutions' operand re-reads are not counted).
           A torch kernel: each distinct input and output tensor once (broadcast dimensions once), except the
           passes torch is known to make twice (MULTI_PASS): BatchNorm's training forward reads its input
           twice (statistics, then normalisation), its backward reads grad_out and input twice, a conv
           backward reads grad_output once per gradient it computes.
  FLOPs  - tensor-core work: a Triton conv kernel's tl.dot multiply-adds per loop iteration (TTIR) x its
           iterations (from the launch's tile sizes and geometry) x programs (grid), padding included; a
           torch convolution / matmul its 2*M*N*K.
  time   - max(bytes / (3.35 TB/s x BANDWIDTH_EFFICIENCY), FLOPs / (989 TFLOP/s bf16, 495 TF32, x
           TENSOR_EFFICIENCY)), and at least LAUNCH_FLOOR_US: a kernel is bandwidth-bound when the first
           term wins.
The op's minimum is each of its inputs (activations, residual, parameters, the output gradient) read once and
each of its outputs (activation, input and parameter gradients) written once. Everything here is a model,
never a measurement: measured times come from the GPU check (python -m fastnets.audit.measure), shown
beside the prediction when given.
"""
import math

import torch

from . import hardware

BANDWIDTH_EFFICIENCY = 0.85  # a streaming kernel's share of HBM3's 3.35 TB/s on an H100
TENSOR_EFFICIENCY = 0.70  # a well-tuned GEMM's share of the dense tensor-core peak
LAUNCH_FLOOR_US = 2.0  # the shortest a kernel takes on the GPU (launch, ramp-up and tail)

# torch ops that read some input more than once on a GPU: name -> function(args) -> {input index: passes}
MULTI_PASS = {
    "aten.native_batch_norm": lambda a: {0: 2 if a[5] else 1},
    "aten._native_batch_norm_legit": lambda a: {0: 2 if a[5] else 1},
    "aten._native_batch_norm_legit_functional": lambda a: {0: 2 if a[5] else 1},
    "aten.cudnn_batch_norm": lambda a: {0: 2 if a[5] else 1},
    "aten.native_batch_norm_backward": lambda a: {0: 2, 1: 2} if a[7] else {},
    "aten.cudnn_batch_norm_backward": lambda a: {0: 2, 1: 2},
    "aten.convolution_backward": lambda a: {0: sum(bool(m) for m in a[10][:2])},
}
FILLS = {"aten.zeros", "aten.zero_", "aten.fill_", "aten.ones_like", "aten.zeros_like", "aten.new_zeros",
         "aten.full", "aten.ones", "aten.new_ones", "aten.full_like", "aten.new_full", "aten.scalar_tensor",
         "aten.arange"}


def distinct_bytes(t):
    """Bytes of the distinct elements a tensor addresses (a broadcast, stride-0 dimension once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _unique(ts):
    out, seen = [], set()
    for t in ts:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


# ------------------------------------------------------------------------------------------ torch kernels


def _conv_flops(inp, weight, out, transposed=False):
    n, cout, oh, ow = out.shape
    return 2 * n * cout * oh * ow * weight.shape[1] * weight.shape[2] * weight.shape[3]


def aten_cost(op):
    """(bytes, FLOPs, compute dtype) of one torch kernel."""
    name = op.name.rsplit(".", 1)[0] if op.name.count(".") >= 2 else op.name
    base = ".".join(op.name.split(".")[:2])
    args, _ = op.args
    flops = 0
    if base in FILLS:
        return sum(distinct_bytes(t) for t in _unique(op.outputs)), 0, None
    passes = MULTI_PASS.get(base, lambda a: {})(args)
    read = 0
    arg_tensors = [a if isinstance(a, torch.Tensor) else None for a in args]
    counted = set()
    for i, t in enumerate(arg_tensors):
        if t is not None and id(t) not in counted:
            counted.add(id(t))
            read += distinct_bytes(t) * passes.get(i, 1)
    for t in op.inputs:  # tensors inside lists / kwargs
        if id(t) not in counted:
            counted.add(id(t))
            read += distinct_bytes(t)
    written = sum(distinct_bytes(t) for t in _unique(op.outputs))
    dtype = None
    if base == "aten.convolution":
        flops = _conv_flops(args[0], args[1], op.outputs[0])
        dtype = args[0].dtype
    elif base == "aten.convolution_backward":
        grad_out, inp, weight, mask = args[0], args[1], args[2], args[10]
        flops = _conv_flops(inp, weight, grad_out) * (int(bool(mask[0])) + int(bool(mask[1])))
        dtype = grad_out.dtype
    elif base in ("aten.mm", "aten.addmm", "aten.bmm", "aten.matmul", "aten.linear"):
        a, b = (args[1], args[2]) if base == "aten.addmm" else (args[0], args[1])
        m = a.numel() // a.shape[-1]
        flops = 2 * m * a.shape[-1] * b.shape[-1]
        dtype = a.dtype
    del name
    return read + written, flops, dtype


# ------------------------------------------------------------------------------------------ Triton kernels


def _cdiv(a, b):
    return -(-a // b)


def conv_iterations(kernel, a):
    """Main-loop iterations of one program of a conv kernel (the sum over programs for wgrad's splits)."""
    if kernel == "_conv_fwd_kernel":
        if a.get("FLAT"):
            return _cdiv(a["C"] * a["KH"] * a["KW"], a["BLOCK_K"])
        return a["KH"] * a["KW"] * _cdiv(a["C"], a["BLOCK_K"])
    if kernel == "_conv_dgrad_kernel":
        return a["KH"] * a["KW"] * _cdiv(a["Cout"], a["BLOCK_K"])
    if kernel == "_conv_wgrad_kernel":
        return _cdiv(a["rows_per_split"], a["BLOCK_K"])
    return None


def triton_cost(ln, ttir):
    """(bytes, FLOPs, compute dtype) of one recorded Triton launch (compile.Launch: fn, args, named, grid),
    given its variant's TTIR summary."""
    a = ln.named
    reads = _unique([a[p] for p in ttir["reads"] if isinstance(a.get(p), torch.Tensor)])
    writes = _unique([a[p] for p in ttir["writes"] if isinstance(a.get(p), torch.Tensor)])
    nbytes = sum(distinct_bytes(t) for t in reads) + sum(distinct_bytes(t) for t in writes)
    flops, dtype = 0, None
    if ttir["loop_dot_fma"]:
        it = conv_iterations(ln.fn.__name__, a)
        if it is None:
            raise ValueError(f"{ln.fn.__name__} has tl.dot in a loop but the model has no iteration count for it")
        programs = ln.grid[0] * ln.grid[1] * ln.grid[2]
        if ln.fn.__name__ == "_conv_wgrad_kernel":  # the last split is shorter
            splits = ln.grid[2]
            total_rows = a["M"]
            it_total = sum(_cdiv(min(a["rows_per_split"], total_rows - s * a["rows_per_split"]), a["BLOCK_K"])
                           for s in range(splits))
            flops = 2 * ttir["loop_dot_fma"] * it_total * ln.grid[0] * ln.grid[1]
        else:
            flops = 2 * ttir["loop_dot_fma"] * it * programs
        x = next(v for v in ln.args if isinstance(v, torch.Tensor))
        dtype = torch.float32 if (x.dtype == torch.float32 and a.get("PREC") == "tf32") else x.dtype
        if x.dtype == torch.float32 and a.get("PREC") != "tf32":
            dtype = "fp32-ieee"
    return nbytes, flops, dtype


def predict_us(nbytes, flops, dtype):
    """(predicted microseconds, bound) of one kernel on an H100 (see the module docstring)."""
    t_mem = nbytes / (hardware.H100_HBM_BYTES_PER_S * BANDWIDTH_EFFICIENCY) * 1e6
    peak = hardware.H100_BF16_FLOP_PER_S
    if dtype == torch.float32:
        peak = hardware.H100_TF32_FLOP_PER_S
    elif dtype in ("fp32-ieee", torch.float64):
        peak = 67e12  # no tensor cores: FP32 FMA units (H100 SXM 67 TFLOP/s; FP64 likewise)
    t_mma = flops / (peak * TENSOR_EFFICIENCY) * 1e6 if flops else 0.0
    t = max(t_mem, t_mma, LAUNCH_FLOOR_US)
    bound = "launch" if t == LAUNCH_FLOOR_US and max(t_mem, t_mma) < LAUNCH_FLOOR_US else (
        "bandwidth" if t_mem >= t_mma else "tensor cores")
    return t, bound


# ------------------------------------------------------------------------------------------ pricing traces


def ttir_of_variants(traces, ttir_cache, jobs=1, progress=False):
    """TTIR summaries of every distinct Triton variant in `traces`, compiling (sm_90, Triton's cache) those
    not in `ttir_cache` ({variant id: summary}), which is updated and returned."""
    from . import compile as ac
    from . import triton_audit, ttir

    todo = {}
    for tr in traces:
        for kind, ln, *_ in tr.events:
            if kind == "triton":
                vid = triton_audit.variant_id(90, ln)
                if vid not in ttir_cache:
                    todo.setdefault(vid, ln)
    if todo:
        ids = list(todo)
        work = [(todo[i].fn, todo[i].args, todo[i].kwargs) for i in ids]

        def analyse(k):
            t = ttir.analyse(k.asm["ttir"])
            return {"ttir": {x: t[x] for x in ("reads", "writes", "loop_dot_fma", "dots")}}

        def tell(i, r):
            if progress:
                print(f"[model: compiled {ids[i]}] {'ok' if 'error' in r and False or 'ttir' in r else r}", flush=True)

        for vid, r in zip(ids, ac.compile_variants(work, ac.target(90), jobs, analyse=analyse, progress=tell)):
            if "error" in r:
                raise RuntimeError(f"the model could not compile {vid}: {r['error'][:500]}")
            ttir_cache[vid] = r["ttir"]
    return ttir_cache


def price(trace, ttir_cache):
    """[{kernel, op, bytes, flops, us, bound}] for every kernel of a trace."""
    from . import triton_audit

    out = []
    for ev in trace.events:
        if ev[0] == "triton":
            ln, op = ev[1], ev[2]
            nbytes, flops, dtype = triton_cost(ln, ttir_cache[triton_audit.variant_id(90, ln)])
            name = ln.fn.__name__
        else:
            a = ev[1]
            nbytes, flops, dtype = aten_cost(a)
            name, op = a.name, a.context
        us, bound = predict_us(nbytes, flops, dtype)
        out.append({"kernel": name, "op": op or "", "bytes": nbytes, "flops": flops, "us": us, "bound": bound})
    return out


def totals(kernels):
    us = sum(k["us"] for k in kernels)
    return {
        "kernels": len(kernels),
        "bytes": sum(k["bytes"] for k in kernels),
        "flops": sum(k["flops"] for k in kernels),
        "us": us,
        "bandwidth_bound_us": sum(k["us"] for k in kernels if k["bound"] == "bandwidth"),
        "tensor_bound_us": sum(k["us"] for k in kernels if k["bound"] == "tensor cores"),
        "launch_bound_us": sum(k["us"] for k in kernels if k["bound"] == "launch"),
    }


def op_minimum_bytes(name, combo="bf16-cl"):
    """Each input (activations, residual, parameters, output gradient) read once, each output (activation,
    input and parameter gradients) written once, for one forward + backward of an op case."""
    from . import workload

    dtype, cl = workload.COMBOS[combo]
    mod = workload.op_module(name, "meta", dtype, cl, fast=False)
    inputs = workload.op_inputs(name, "meta", dtype, cl)
    out = mod(*inputs)
    params = [p for p in mod.parameters() if p.requires_grad]
    total = sum(distinct_bytes(t) for t in inputs) + distinct_bytes(out)
    if workload.OPS[name][3]:
        total += distinct_bytes(out)  # the output gradient, read
        total += sum(distinct_bytes(t) for t in inputs if t.requires_grad)  # input gradients
        total += 2 * sum(distinct_bytes(p) for p in params)  # parameters read, their gradients written
    else:
        total += sum(distinct_bytes(p) for p in params)
    return total


def group(kernels, key):
    out = {}
    for k in kernels:
        g = out.setdefault(key(k), {"kernels": 0, "bytes": 0, "flops": 0, "us": 0.0, "bandwidth_us": 0.0})
        g["kernels"] += 1
        g["bytes"] += k["bytes"]
        g["flops"] += k["flops"]
        g["us"] += k["us"]
        if k["bound"] == "bandwidth":
            g["bandwidth_us"] += k["us"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["us"]))


def run(ops=None, step=True, jobs=1, progress=True, ttir_cache=None, combo="bf16-cl"):
    """The model's results: per op case and for the ResNet-50 training step, fastnets and eager."""
    from . import workload

    ops = list(workload.OPS) if ops is None else ops
    traces = {}
    for name in ops:
        traces[(name, "fastnets")] = workload.trace_op(name, combo)
        if name != "augment":
            traces[(name, "eager")] = workload.trace_op(name, combo, eager=True)
    if step:
        traces[("resnet50_step", "fastnets")] = workload.trace_network("resnet50", combo)
        traces[("resnet50_step", "eager")] = workload.trace_network("resnet50", combo, eager=True)
    cache = ttir_of_variants(traces.values(), dict(ttir_cache or {}), jobs, progress)
    result = {"params": {"bandwidth_efficiency": BANDWIDTH_EFFICIENCY, "tensor_efficiency": TENSOR_EFFICIENCY,
                         "launch_floor_us": LAUNCH_FLOOR_US, "hbm_bytes_per_s": hardware.H100_HBM_BYTES_PER_S,
                         "bf16_flop_per_s": hardware.H100_BF16_FLOP_PER_S, "combo": combo,
                         "batch": workload.BATCH},
              "ops": {}, "step": None}
    for name in ops:
        fast = price(traces[(name, "fastnets")], cache)
        eager = price(traces[(name, "eager")], cache) if (name, "eager") in traces else None
        result["ops"][name] = {
            "what": workload.OPS[name][0],
            "minimum_bytes": op_minimum_bytes(name, combo) if name != "augment" else None,
            "fastnets": dict(totals(fast), by_kernel=group(fast, lambda k: k["kernel"])),
            "eager": None if eager is None else dict(totals(eager), by_kernel=group(eager, lambda k: k["kernel"])),
        }
    if step:
        fast = price(traces[("resnet50_step", "fastnets")], cache)
        eager = price(traces[("resnet50_step", "eager")], cache)
        result["step"] = {
            "what": f"ResNet-50 training step (forward + backward), {combo}, batch {workload.BATCH}",
            "fastnets": dict(totals(fast), by_op=group(fast, lambda k: k["op"] or "(torch, outside fastnets ops)"),
                             by_kernel=group(fast, lambda k: f"{k['op'] or '-'} / {k['kernel']}")),
            "eager": dict(totals(eager), by_kernel=group(eager, lambda k: k["kernel"])),
        }
    return result, cache


def ratio(a, b):
    return a / b if b else math.nan
