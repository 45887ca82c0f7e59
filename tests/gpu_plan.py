"""The GPU test plan: every op family on every GPU backend, on real ResNet-50 / SE-ResNet-50 shapes, against
float64 references computed by torch itself. tests/test_gpu_plan.py runs it under pytest; the Triton warm-up
(benchmarks/triton_warmup.py) runs the same cases with kernel launches recorded, to compile them in parallel.

Tiers (FASTNETS_GPU_PLAN; default `full` on a GPU, `dry` on a CPU):
  full   batch 256, bf16 channels_last on every shape, plus fp16, fp32 and NCHW on fewer shapes; backends
         triton and cuda.
  small  tiny odd shapes (C=1, primes, 1x1 spatial) of every family, for compute-sanitizer; triton and cuda.
  triton-small  a few of those on Triton only (every family, NHWC and NCHW kernels, a strided 1x1 conv
         with C=1): the Triton kernels under compute-sanitizer memcheck, kept under a minute.
  dry    tiny shapes on the CPU: the reference backend and Triton under the interpreter (the plumbing of
         the plan, checked by CI).
Every case checks the forward output and, in train and eval, every gradient (input, residual, weights,
biases, BatchNorm affine parameters, fused scale/shift) and, in train, the running statistics.
Errors are ||a - b|| / ||b|| with the per-dtype bounds of tests/conftest.py (REL_BOUND): conftest.rel_error,
computed on the device in float64 chunks.
"""
import dataclasses
import os

import torch
import torch.nn.functional as F

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPE_NAMES = {F16: "fp16", BF16: "bf16", F32: "fp32", F64: "fp64"}
FAMILIES = ("batch_norm", "bn_add_relu", "conv", "conv_bn", "conv_prologue", "squeeze_excite")
CONV_EPILOGUES = ("plain", "bias", "bias_relu", "bn_fold", "bn_fold_res_relu")
TIERS = ("full", "small", "triton-small", "dry")


def tier():
    default = "full" if torch.cuda.is_available() else "dry"
    t = os.environ.get("FASTNETS_GPU_PLAN", default).strip().lower() or default
    if t not in TIERS:
        raise ValueError(f"FASTNETS_GPU_PLAN must be one of {', '.join(TIERS)}, got {t!r}")
    return t


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    backend: str
    dtype: torch.dtype
    channels_last: bool
    train: bool
    shape: tuple  # BN/SE: (N, C, H, W[, R]); conv: (N, Cin, H, Cout, k, stride, pad)
    epilogue: str = ""  # conv only
    act: str = ""  # batch_norm only: y = act(bn(x) + residual) with this fastnets.activations name

    @property
    def config(self):
        return f"{DTYPE_NAMES[self.dtype]}-{'nhwc' if self.channels_last else 'nchw'}"

    @property
    def id(self):
        parts = [self.family, self.backend, self.config, "train" if self.train else "eval",
                 "x".join(map(str, self.shape))]
        if self.epilogue:
            parts.append(self.epilogue)
        if self.act:
            parts.append(self.act)
        return "-".join(parts)


# ---------------------------------------------------------------------------------------------- shapes

# (N, C, H, W): ResNet-50's BatchNorm inputs at batch 256: the stem, stage 1, stage 2 and the last stage.
BN_FULL = [(256, 64, 112, 112), (256, 256, 56, 56), (256, 512, 28, 28), (256, 2048, 7, 7)]
BN_FEW = [(256, 256, 56, 56)]
# (N, Cin, H, Cout, k, stride, pad): the stem, stage 1's 1x1 reduce, stage 2's 1x1 and 3x3 (at 28x28, of the
# 256x512x28x28 blocks), stage 2's strided 3x3, the last stage's strided 1x1 downsample.
CONV_FULL = [(256, 3, 224, 64, 7, 2, 3), (256, 256, 56, 64, 1, 1, 0), (256, 512, 28, 128, 1, 1, 0),
             (256, 128, 28, 128, 3, 1, 1), (256, 128, 56, 128, 3, 2, 1), (256, 1024, 14, 2048, 1, 2, 0)]
CONV_FEW = [(256, 64, 56, 64, 3, 1, 1)]
CONV_FP32 = [(32, 64, 56, 64, 3, 1, 1)]  # IEEE fp32 (no TF32) runs on FMA units: a smaller batch
# (N, C, H, W, R): SE-ResNet-50's SE blocks (R = C / 16) at batch 256.
SE_FULL = [(256, 256, 56, 56, 16), (256, 512, 28, 28, 32), (256, 1024, 14, 14, 64), (256, 2048, 7, 7, 128)]
SE_FEW = [(256, 256, 56, 56, 16)]

# small / dry: odd and tiny shapes (C=1, primes, 1x1 spatial); the last BN and SE shapes have C % 8 == 0 and
# S % 8 == 0, so that compute-sanitizer also meets the CUDA C++ kernels' 16-byte vector paths
BN_SMALL = [(3, 5, 7, 9), (2, 1, 1, 1 + 2), (4, 67, 3, 5), (2, 16, 3, 8)]
CONV_SMALL = [(2, 5, 9, 7, 3, 1, 1), (3, 1, 7, 3, 1, 2, 0), (2, 8, 6, 16, 3, 2, 1)]
SE_SMALL = [(3, 5, 7, 9, 2), (2, 1, 1, 1, 1), (2, 33, 4, 3, 3), (2, 16, 4, 4, 4)]

# The fused activations of the CUDA C++ BatchNorm kernels (the cuda backend, train), on shapes that reach every
# compiled instantiation (csrc/batch_norm.cu): per activation, the vectorized paths of bf16, fp16 and fp32
# (rows in channels_last; NCHW planes with the tile and the plane reduction), and the run-time-switch
# kernels (C % 8 != 0 and S < 8 in bf16, an odd S > 1024 in fp32, every path in fp64). (dtype, channels_last,
# shape, train); bf16-nhwc shapes have the plan's batch of 256.
ACT_CASES = [
    (BF16, True, (256, 16, 5, 5), True), (BF16, True, (256, 16, 5, 5), False),
    (BF16, False, (4, 16, 7, 7), True), (BF16, False, (2, 4, 40, 40), True),
    (F16, True, (8, 24, 5, 5), True), (F16, False, (4, 16, 7, 7), True), (F16, False, (2, 4, 40, 40), True),
    (F32, True, (8, 12, 5, 5), True), (F32, False, (4, 16, 7, 7), True), (F32, False, (2, 4, 40, 40), True),
    (BF16, True, (256, 5, 3, 3), True), (BF16, False, (4, 6, 2, 3), True), (F32, False, (2, 3, 35, 33), True),
    (F64, True, (3, 8, 5, 5), True), (F64, False, (4, 6, 7, 7), True), (F64, False, (2, 4, 40, 40), True),
]
ACT_PARAM = {"leaky_relu": 0.1}
BN_DRY = [(3, 5, 4, 3)]
CONV_DRY = [(2, 3, 5, 4, 3, 1, 1)]
SE_DRY = [(2, 6, 3, 5, 2)]


def backends_for(t):
    import fastnets

    if t == "dry":
        want = ("reference", "triton")
        device = "cpu"
    elif t == "triton-small":
        return ["triton"]
    else:
        want = ("triton", "cuda")
        device = "cuda"
    have = fastnets.available_backends(device) if (device == "cpu" or torch.cuda.is_available()) else []
    # a wanted backend that cannot run here is still planned: its cases fail (and say why) rather than vanish
    return [b for b in want if b in have or t != "dry"]


def triton_small_cases():
    """The `triton-small` tier: Triton's kernels of every family at tiny odd shapes, each kernel path once
    (NHWC and NCHW BatchNorm/SE, train and eval, a KxK conv with every epilogue gradient, a strided 1x1 conv
    of one input channel, conv + BatchNorm, the BN-apply prologue), for compute-sanitizer memcheck."""
    bn, bn_wide, se, se_wide = BN_SMALL[0], BN_SMALL[2], SE_SMALL[0], SE_SMALL[2]
    conv3, conv1, conv_s2 = CONV_SMALL
    return [
        Case("batch_norm", "triton", BF16, True, True, bn), Case("batch_norm", "triton", BF16, True, False, bn),
        Case("batch_norm", "triton", F32, False, True, bn),
        Case("bn_add_relu", "triton", BF16, True, True, bn_wide), Case("bn_add_relu", "triton", F32, False, True, bn),
        Case("conv", "triton", BF16, True, True, conv3, "bn_fold_res_relu"),
        Case("conv", "triton", BF16, True, True, conv1, "bias"),
        Case("conv_bn", "triton", BF16, True, True, conv_s2), Case("conv_bn", "triton", BF16, True, False, conv3),
        Case("conv_prologue", "triton", BF16, True, True, conv3),
        Case("squeeze_excite", "triton", BF16, True, True, se_wide), Case("squeeze_excite", "triton", F32, False, True, se),
    ]


def cases(t=None):
    t = t or tier()
    if t == "triton-small":
        return triton_small_cases()
    out = []
    bks = backends_for(t)

    def add(family, configs, shapes_for, modes=(True, False), epilogues=("",)):
        for b in bks:
            for dtype, cl, shapes in configs:
                for shape in shapes:
                    for train in modes:
                        for ep in epilogues:
                            out.append(Case(family, b, dtype, cl, train, shape, ep))

    if t == "full":
        bn = [(BF16, True, BN_FULL), (F16, True, BN_FEW), (F32, False, BN_FEW), (BF16, False, BN_FEW)]
        conv = [(BF16, True, CONV_FULL), (F16, True, CONV_FEW), (BF16, False, CONV_FEW), (F32, False, CONV_FP32)]
        se = [(BF16, True, SE_FULL), (F16, True, SE_FEW), (F32, False, SE_FEW), (BF16, False, SE_FEW)]
    elif t == "small":
        bn = [(BF16, True, BN_SMALL), (F32, False, BN_SMALL[:1]), (F16, True, BN_SMALL[:1])]
        conv = [(BF16, True, CONV_SMALL), (F32, False, CONV_SMALL[:1])]
        se = [(BF16, True, SE_SMALL), (F32, False, SE_SMALL[:1]), (F16, True, SE_SMALL[:1])]
    else:
        bn = [(BF16, True, BN_DRY), (F32, False, BN_DRY)]
        conv = [(BF16, True, CONV_DRY)]  # the interpreter is slow on convolutions
        se = [(BF16, True, SE_DRY), (F32, False, SE_DRY)]
    add("batch_norm", bn, None)
    add("bn_add_relu", bn, None)
    # conv forward with every epilogue; its backward (grad input, grad weight, every epilogue gradient) in
    # train mode. Eval-mode conv is the same kernels (no statistics), so the conv family runs train only;
    # the eval Conv-BN fold is conv_bn's eval case.
    conv_eps = CONV_EPILOGUES if t != "dry" else ("bn_fold_res_relu",)
    add("conv", conv[:1], None, modes=(True,), epilogues=conv_eps)
    add("conv", conv[1:], None, modes=(True,), epilogues=("bn_fold_res_relu",))
    add("conv_bn", conv, None)
    # BN-apply + ReLU in the convolution's prologue, with the output-statistics epilogue (train only: eval
    # folds the BatchNorm into the weights instead)
    add("conv_prologue", conv, None, modes=(True,))
    add("squeeze_excite", se, None)
    if t == "full" and "cuda" in bks:
        from fastnets.activations import ACTIVATIONS

        for act in ACTIVATIONS:
            for dtype, cl, shape, train in ACT_CASES:
                out.append(Case("batch_norm", "cuda", dtype, cl, train, shape, act=act))
    # interleaved: the first case of every family and backend, then the second, ... so that a step cut by
    # its deadline still has every family's most valuable cases (bf16 channels_last, the first shapes)
    rank, seen = {}, {}
    for c in out:
        g = (c.family, c.backend)
        rank[c] = seen[g] = seen.get(g, -1) + 1
    return sorted(out, key=lambda c: rank[c])


# ---------------------------------------------------------------------------------------------- memory

# Full-size tensors a case holds at its peak, per element of its input (x, or z for conv_prologue) and per
# element of its output (y; BatchNorm and SE count everything on the input), as (tensors in the activation
# dtype, tensors in the reference dtype): the inputs, upstream gradient, outputs and gradients the case keeps
# to compare, the backend's temporaries, the reference's forward intermediates and backward gradients
# (relu(z * scale + shift + res) keeps each of its steps). tests/test_gpu_plan.py holds these counts to the
# CPU allocator's measured peak of the same cases on the reference backend (estimate / measured in [1, 1.35]).
TENSORS = {
    "batch_norm": ((5, 4), (0, 0)),
    "bn_add_relu": ((7, 6), (0, 0)),
    "squeeze_excite": ((7, 6), (0, 0)),
    "conv": ((2, 2), (4, 6)),
    "conv_bn": ((2, 2), (5, 6)),
    "conv_prologue": ((2, 5), (2, 2)),
}
# Per pytest worker on a GPU, beside its tensors: the CUDA context, cuBLAS/cuDNN handles and workspaces,
# the Triton kernels it loaded, the error measure's float64 chunks (conftest.REL_CHUNK: ~0.6 GB), the
# caching allocator's rounding.
WORKER_BYTES = 5 << 29
MEMORY_FRACTION = 0.7  # of the card, for all plan workers together


def io_elements(case):
    """(input elements, output elements) of a case (BatchNorm/SE: (N*C*H*W, 0))."""
    if case.family in ("conv", "conv_bn", "conv_prologue"):
        n, cin, h, cout, k, s, p = case.shape
        o = (h + 2 * p - k) // s + 1
        return n * cin * h * h, n * cout * o * o
    n, c, h, w = case.shape[:4]
    return n * c * h * w, 0


def tensor_bytes(case):
    """The bytes of the full-size tensors a case holds at its peak (TENSORS), without the worker's own."""
    act = torch.empty((), dtype=case.dtype).element_size()
    ref = 8 if case.family not in ("conv", "conv_bn", "conv_prologue") else \
        torch.empty((), dtype=conv_reference_dtype(case)).element_size()
    (a_in, r_in), (a_out, r_out) = TENSORS[case.family]
    n_in, n_out = io_elements(case)
    return n_in * (a_in * act + r_in * ref) + n_out * (a_out * act + r_out * ref)


def peak_bytes(case):
    """A case's estimated peak GPU memory in one pytest worker: its tensors and the worker's own."""
    return tensor_bytes(case) + WORKER_BYTES


def plan_workers(card_bytes, cs=None, want=4):
    """(workers, largest case): the most pytest workers, at most `want` and at least 1, for which workers x
    the largest case's peak stays within MEMORY_FRACTION of a card of `card_bytes` (any worker may draw
    the largest case, so the bound holds whatever the order)."""
    cs = cs if cs is not None else cases()
    big = max(cs, key=peak_bytes)
    return max(1, min(want, int(MEMORY_FRACTION * card_bytes // peak_bytes(big)))), big


# ---------------------------------------------------------------------------------------------- errors


def check(results, what, actual, expected, dtype, ref=None):
    """Record (what, error, bound) for one compared tensor; `ref` as in conftest.assert_rel (true value can
    be near zero: the error may also be bounded relative to ||ref||). Errors are conftest.rel_error's, computed
    on the tensors' device."""
    from conftest import REL_BOUND, norm64, rel_error

    bound = REL_BOUND[dtype]
    err = rel_error(actual, expected)
    if err > bound and ref is not None and err != float("inf"):
        den = norm64(expected)
        absolute = err * den if den > 0 else err
        ref_norm = norm64(ref)
        if absolute <= bound * ref_norm:
            err = min(err, absolute / ref_norm) if ref_norm > 0 else err
    results.append((what, err, bound))


# ---------------------------------------------------------------------------------------------- inputs


def _gen(device, seed):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _randn(shape, g, device, dtype, mean=0.0, std=1.0, cl=False):
    t = torch.randn(shape, generator=g, device=device, dtype=F32).mul_(std).add_(mean).to(dtype)
    if cl and len(shape) == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _channel_mean(c, g, device):
    return torch.randn(c, generator=g, device=device) * 0.5 + 0.3  # non-zero mean, different per channel


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _ref(t, dtype=F64):
    """A leaf copy for the reference in `dtype` (NCHW: the reference's layout does not matter)."""
    return t.detach().to(dtype).contiguous().requires_grad_(t.requires_grad)


def conv_reference_dtype(case):
    """float64, except for the large half-precision convolutions: there IEEE float32 (TF32 off, ~1e-6
    relative, far below the fp16/bf16 bounds), since cuDNN's float64 convolutions are slow."""
    n, cin, h, cout, k, s, p = case.shape
    o = (h + 2 * p - k) // s + 1
    flops = 2.0 * n * cout * o * o * cin * k * k
    return F64 if case.dtype in (F32, F64) or flops < 2e10 else F32


# ---------------------------------------------------------------------------------------------- runner


def run_case(case, device, compare=True):
    """Run one case's fastnets forward and backward; with `compare`, also torch's float64 reference, and
    return [(what, rel_error, bound)]."""
    torch.manual_seed(0)
    fn = {"batch_norm": _bn, "bn_add_relu": _bn, "conv": _conv, "conv_bn": _conv_bn,
          "conv_prologue": _conv_prologue, "squeeze_excite": _se}[case.family]
    # fp32 results are held to fp32 accuracy: no TF32 in fastnets' fp32 convolutions nor in the references
    from fp32_flags import fp32_precision

    with fp32_precision("ieee", "ieee"):
        return fn(case, device, compare)


# torch's own activations, for the reference of the `act` cases
TORCH_ACTS = {
    "identity": lambda v: v, "relu": torch.relu, "relu6": F.relu6,
    "leaky_relu": lambda v: F.leaky_relu(v, ACT_PARAM["leaky_relu"]), "silu": F.silu, "hardswish": F.hardswish,
    "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
}


def _bn(case, device, compare):
    from fastnets.ops import batch_norm

    n, c, h, w = case.shape
    g = _gen(device, 1)
    fused = case.family == "bn_add_relu" or bool(case.act)
    vdt = F64 if case.dtype == F64 else F32  # weights and running statistics
    mu = _channel_mean(c, g, device).view(1, c, 1, 1)
    x = _leaf(_randn((n, c, h, w), g, device, case.dtype, cl=case.channels_last).add_(mu.to(case.dtype)))
    res = _leaf(_randn((n, c, h, w), g, device, case.dtype, cl=case.channels_last)) if fused else None
    weight = _leaf((torch.rand(c, generator=g, device=device) + 0.5).to(vdt))
    bias = _leaf((torch.randn(c, generator=g, device=device) * 0.2).to(vdt))
    rm = (torch.randn(c, generator=g, device=device) * 0.1).to(vdt)
    rv = (torch.rand(c, generator=g, device=device) + 0.5).to(vdt)
    dy = _randn((n, c, h, w), g, device, case.dtype, cl=case.channels_last)
    rm_f, rv_f = rm.clone(), rv.clone()
    act = (case.act, ACT_PARAM.get(case.act, 0.0)) if case.act else None
    y = batch_norm(x, rm_f, rv_f, weight, bias, training=case.train, momentum=0.1, eps=1e-5, residual=res,
                   relu=fused and not case.act, backend=case.backend, act=act)
    y.backward(dy)
    if not compare:
        return []
    x64, w64, b64 = _ref(x), _ref(weight), _ref(bias)
    rm64, rv64 = rm.to(F64), rv.to(F64)
    y64 = F.batch_norm(x64, rm64, rv64, w64, b64, training=case.train, momentum=0.1, eps=1e-5)
    res64 = None
    if fused:
        res64 = _ref(res)
        y64 = TORCH_ACTS[case.act or "relu"](y64 + res64)
    y64.backward(dy.to(F64))
    out = []
    check(out, "y", y, y64, case.dtype)
    check(out, "grad_x", x.grad, x64.grad, case.dtype, ref=dy)
    check(out, "grad_weight", weight.grad, w64.grad, F32)
    check(out, "grad_bias", bias.grad, b64.grad, F32)
    if fused:
        check(out, "grad_residual", res.grad, res64.grad, case.dtype, ref=dy)
    check(out, "running_mean", rm_f, rm64, F32)
    check(out, "running_var", rv_f, rv64, F32)
    return out


def _conv_inputs(case, device):
    n, cin, h, cout, k, s, p = case.shape
    oh = (h + 2 * p - k) // s + 1
    g = _gen(device, 2)
    x = _leaf(_randn((n, cin, h, h), g, device, case.dtype, mean=0.2, cl=case.channels_last))
    weight = _leaf(_randn((cout, cin, k, k), g, device, case.dtype, std=(cin * k * k) ** -0.5))
    dy = _randn((n, cout, oh, oh), g, device, case.dtype, cl=case.channels_last)
    return g, x, weight, dy, (n, cout, oh, oh), s, p


def _conv(case, device, compare):
    from fastnets.ops import conv2d

    g, x, weight, dy, out_shape, s, p = _conv_inputs(case, device)
    cout = out_shape[1]
    ep = case.epilogue
    bias = _leaf(_randn((cout,), g, device, case.dtype, std=0.3)) if "bias" in ep else None
    scale = _leaf(torch.rand(cout, generator=g, device=device) + 0.5) if "bn_fold" in ep else None
    shift = _leaf(torch.randn(cout, generator=g, device=device) * 0.2) if "bn_fold" in ep else None
    res = _leaf(_randn(out_shape, g, device, case.dtype, cl=case.channels_last)) if "res" in ep else None
    relu = "relu" in ep
    y = conv2d(x, weight, bias, stride=s, padding=p, scale=scale, shift=shift, residual=res, relu=relu,
               backend=case.backend)
    y.backward(dy)
    if not compare:
        return []
    rdt = conv_reference_dtype(case)
    x64, w64 = _ref(x, rdt), _ref(weight, rdt)
    b64 = None if bias is None else _ref(bias, rdt)
    y64 = F.conv2d(x64, w64, b64, s, p)
    if scale is not None:
        sc64, sh64 = _ref(scale, rdt), _ref(shift, rdt)
        y64 = y64 * sc64.view(1, -1, 1, 1) + sh64.view(1, -1, 1, 1)
    if res is not None:
        res64 = _ref(res, rdt)
        y64 = y64 + res64
    if relu:
        y64 = torch.relu(y64)
    y64.backward(dy.to(rdt))
    out = []
    check(out, "y", y, y64, case.dtype)
    check(out, "grad_x", x.grad, x64.grad, case.dtype)
    check(out, "grad_weight", weight.grad, w64.grad, case.dtype)
    if bias is not None:
        check(out, "grad_bias", bias.grad, b64.grad, case.dtype)
    if scale is not None:
        # grad_scale contracts the weight gradient, which a backend may hold in the activation dtype
        check(out, "grad_scale", scale.grad, sc64.grad, case.dtype)
        check(out, "grad_shift", shift.grad, sh64.grad, F32)
    if res is not None:
        check(out, "grad_residual", res.grad, res64.grad, case.dtype, ref=dy)
    return out


def _conv_bn(case, device, compare):
    from fastnets.ops import conv2d_batch_norm

    g, x, weight, dy, out_shape, s, p = _conv_inputs(case, device)
    cout = out_shape[1]
    bn_w = _leaf(torch.rand(cout, generator=g, device=device) + 0.5)
    bn_b = _leaf(torch.randn(cout, generator=g, device=device) * 0.2)
    rm = torch.randn(cout, generator=g, device=device) * 0.1
    rv = torch.rand(cout, generator=g, device=device) + 0.5
    res = _leaf(_randn(out_shape, g, device, case.dtype, cl=case.channels_last))
    rm_f, rv_f = rm.clone(), rv.clone()
    y = conv2d_batch_norm(x, weight, None, rm_f, rv_f, bn_w, bn_b, training=case.train, momentum=0.1, eps=1e-5,
                          stride=s, padding=p, residual=res, relu=True, backend=case.backend)
    y.backward(dy)
    if not compare:
        return []
    rdt = conv_reference_dtype(case)
    x64, w64, bw64, bb64, res64 = (_ref(t, rdt) for t in (x, weight, bn_w, bn_b, res))
    rm64, rv64 = rm.to(rdt), rv.to(rdt)
    z64 = F.conv2d(x64, w64, None, s, p)
    y64 = torch.relu(F.batch_norm(z64, rm64, rv64, bw64, bb64, training=case.train, momentum=0.1, eps=1e-5) + res64)
    y64.backward(dy.to(rdt))
    out = []
    # z is rounded to the activation dtype before it is normalized (as eager's conv output is): y carries
    # that rounding scaled by |z - mean| / std, within the same per-dtype bound for these inputs.
    check(out, "y", y, y64, case.dtype)
    check(out, "grad_x", x.grad, x64.grad, case.dtype, ref=dy)
    check(out, "grad_weight", weight.grad, w64.grad, case.dtype)
    # grad_bn_weight contracts g with the rounded z (train) or the weight gradient (eval, folded)
    check(out, "grad_bn_weight", bn_w.grad, bw64.grad, case.dtype)
    check(out, "grad_bn_bias", bn_b.grad, bb64.grad, F32)
    check(out, "grad_residual", res.grad, res64.grad, case.dtype, ref=dy)
    # the batch statistics of z: a backend may take them from z rounded to the activation dtype (as eager
    # does: cuDNN's conv output, then BatchNorm), so they are held to that dtype's bound
    check(out, "running_mean", rm_f, rm64, case.dtype)
    check(out, "running_var", rv_f, rv64, case.dtype)
    return out


def _conv_prologue(case, device, compare):
    """bn_act_conv2d: conv2d(relu(z * scale + shift)) + bias with the output's batch statistics; the input
    is the previous convolution's output z (non-zero mean), scale/shift a folded BatchNorm (fp32)."""
    from fastnets.ops.conv_prologue import bn_act_conv2d

    g, z, weight, dy, out_shape, s, p = _conv_inputs(case, device)
    cin, cout = z.shape[1], out_shape[1]
    scale = _leaf(torch.rand(cin, generator=g, device=device) + 0.5)
    shift = _leaf(torch.randn(cin, generator=g, device=device) * 0.5)
    bias = _leaf(_randn((cout,), g, device, case.dtype, std=0.3))
    y, mean, var = bn_act_conv2d(z, scale, shift, weight, bias, stride=s, padding=p, backend=case.backend,
                                 stats=True)
    y.backward(dy)
    if not compare:
        return []
    rdt = conv_reference_dtype(case)
    z64, w64, b64, sc64, sh64 = (_ref(t, rdt) for t in (z, weight, bias, scale, shift))
    y64 = F.conv2d(torch.relu(z64 * sc64.view(1, -1, 1, 1) + sh64.view(1, -1, 1, 1)), w64, b64, s, p)
    y64.backward(dy.to(rdt))
    v64, m64 = torch.var_mean(y64.detach(), dim=(0, 2, 3), unbiased=False)
    out = []
    check(out, "y", y, y64, case.dtype)
    check(out, "grad_z", z.grad, z64.grad, case.dtype, ref=dy)
    check(out, "grad_weight", weight.grad, w64.grad, case.dtype)
    check(out, "grad_bias", bias.grad, b64.grad, case.dtype)
    # sums over N, H, W of dpre * z and dpre, where dpre may come from a grad input rounded to the activation
    # dtype (cuDNN's, as eager's): they cancel, so the error may also be bounded by the rounding of each term,
    # ||(sum of squared terms) ** 0.5|| per channel
    dpre64 = z64.grad / sc64.detach().view(1, -1, 1, 1)
    terms_scale = (dpre64 * z64.detach()).square().sum((0, 2, 3)).sqrt()
    terms_shift = dpre64.square().sum((0, 2, 3)).sqrt()
    check(out, "grad_scale", scale.grad, sc64.grad, case.dtype, ref=terms_scale)
    check(out, "grad_shift", shift.grad, sh64.grad, case.dtype, ref=terms_shift)
    # the statistics of y as stored (rounded to the activation dtype), as conv_bn's
    check(out, "mean", mean, m64, case.dtype)
    check(out, "var", var, v64, case.dtype)
    return out


def _se(case, device, compare):
    from fastnets.ops import squeeze_excite

    n, c, h, w, r = case.shape
    g = _gen(device, 3)
    x = _leaf(_randn((n, c, h, w), g, device, case.dtype, mean=0.3, cl=case.channels_last))
    res = _leaf(_randn((n, c, h, w), g, device, case.dtype, cl=case.channels_last))
    # fp32 weights with half activations (autocast style), the model's dtype otherwise
    wdt = F32 if case.dtype in (F16, BF16) else case.dtype
    w1 = _leaf(torch.randn(r, c, 1, 1, generator=g, device=device).mul_(c ** -0.5).to(wdt))
    b1 = _leaf((torch.randn(r, generator=g, device=device) * 0.1).to(wdt))
    w2 = _leaf(torch.randn(c, r, 1, 1, generator=g, device=device).mul_(r ** -0.5).to(wdt))
    b2 = _leaf((torch.randn(c, generator=g, device=device) * 0.1).to(wdt))
    dy = _randn((n, c, h, w), g, device, case.dtype, cl=case.channels_last)
    if case.train:
        y = squeeze_excite(x, w1, b1, w2, b2, residual=res, relu=True, backend=case.backend)
        y.backward(dy)
    else:
        with torch.no_grad():
            y = squeeze_excite(x, w1, b1, w2, b2, residual=res, relu=True, backend=case.backend)
    if not compare:
        return []
    x64, res64 = _ref(x), _ref(res)
    p64 = [_ref(t) for t in (w1, b1, w2, b2)]
    s64 = x64.mean((2, 3), keepdim=True)
    s64 = torch.sigmoid(F.conv2d(torch.relu(F.conv2d(s64, p64[0], p64[1])), p64[2], p64[3]))
    y64 = torch.relu(x64 * s64 + res64)
    out = []
    check(out, "y", y, y64, case.dtype)
    if case.train:
        y64.backward(dy.to(F64))
        check(out, "grad_x", x.grad, x64.grad, case.dtype, ref=dy)
        check(out, "grad_residual", res.grad, res64.grad, case.dtype, ref=dy)
        for name, t, t64 in zip(("grad_w1", "grad_b1", "grad_w2", "grad_b2"), (w1, b1, w2, b2), p64):
            check(out, name, t.grad, t64.grad, wdt)
    return out


def main(argv):
    """python3 tests/gpu_plan.py workers [--want 4] [--card-bytes B] [--tier T]: the plan's pytest workers for
    this card (its total memory, read here; --card-bytes for another, e.g. the dry run's 80 GB) on stdout, the
    reason on stderr."""
    import sys

    if not argv or argv[0] != "workers":
        print(main.__doc__, file=sys.stderr)
        return 2
    opt = dict(zip(argv[1::2], argv[2::2]))
    if "--card-bytes" in opt:
        card = int(float(opt["--card-bytes"]))
    else:
        card = torch.cuda.get_device_properties(0).total_memory
    workers, big = plan_workers(card, cases(opt.get("--tier")), int(opt.get("--want", 4)))
    print(workers)
    print(f"plan workers: {workers} (largest case {big.id}: about {peak_bytes(big) / 1e9:.1f} GB at its peak "
          f"with its worker; {workers} x that <= {MEMORY_FRACTION:.0%} of {card / 1e9:.1f} GB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main(sys.argv[1:]))
