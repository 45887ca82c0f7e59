"""Triton launches within the GPU's limits, on the tensors' device, without a GPU (issue 28, items 2 and 4).

tests/launch_checker.py checks every launch of the suite; this file shows that the checker can fail (each rule
on a launch that breaks it), and runs the real launchers on `meta` tensors of extreme shapes (past 2**31
elements, more than 64 Mi pixels per channel, images of more than a million output pixels at C >= 64), with
the launch plans a GPU makes (an H100's 132 SMs, the GPU tile sizes, and every autotuned configuration the
pruning keeps) and no kernel run: the recorded grids, threads and shared memory must fit sm_90.
"""
import types

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import launch_checker  # noqa: E402
import launch_limits  # noqa: E402
from fastnets import _tensors  # noqa: E402

H100_SMS = 132
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def meta(shape, dtype=F32, cl=False):
    fmt = torch.channels_last if cl and len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


# ------------------------------------------------------------------------------------------ the checker


@triton.jit
def _probe_kernel(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32))


@triton.jit
def _probe_gemm_kernel(x_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK_M), tl.zeros([BLOCK_M], tl.float32))


def test_the_suite_runs_under_the_checker():
    assert launch_checker.installed(), "tests/conftest.py must install tests/launch_checker.py"
    from fastnets.triton_kernels import _common

    # fastnets' shared-memory budget off a GPU is the checker's limit, not a second opinion
    assert _common.SM90_SHARED_BYTES == launch_limits.SHARED_BYTES_MAX


@pytest.mark.parametrize("what,launch,fragment", [
    ("grid y", lambda x: _probe_kernel[(1, 65536)](x, BLOCK=16), "grid y 65536 > 65535"),
    ("grid z", lambda x: _probe_kernel[(1, 1, 70000)](x, BLOCK=16), "grid z 70000 > 65535"),
    ("grid x", lambda x: _probe_kernel[(2**31,)](x, BLOCK=16), "grid x 2147483648 > 2147483647"),
    ("grid function", lambda x: _probe_kernel[lambda meta: (1, 2 ** 20 // meta["BLOCK"])](x, BLOCK=8),
     "grid y 131072 > 65535"),
    ("threads", lambda x: _probe_kernel[(1,)](x, BLOCK=16, num_warps=64), "2048 threads per block > 1024"),
    ("shared memory", lambda x: _probe_gemm_kernel[(1,)](x, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_stages=3),
     "294912 bytes of shared memory > 232448"),
])
def test_checker_refuses_each_limit(what, launch, fragment):
    x = torch.empty(256, device="meta")
    with launch_checker.dry_run(), _tensors.device_guard(x.device):
        with pytest.raises(AssertionError, match=fragment.replace("(", r"\(")):
            launch(x)
        _probe_gemm_kernel[(1,)](x, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_stages=4)  # 128 KiB: fits


def test_checker_refuses_launches_outside_the_device_guard():
    x = torch.empty(16, device="meta")
    with launch_checker.dry_run() as launches:
        with pytest.raises(AssertionError, match="outside fastnets' device guard"):
            _probe_kernel[(1,)](x, BLOCK=16)
        with _tensors.device_guard("cpu"), pytest.raises(AssertionError, match="made cpu current"):
            _probe_kernel[(1,)](x, BLOCK=16)
        with pytest.raises(AssertionError, match="several devices"), _tensors.device_guard(x.device):
            _two_pointer_kernel[(1,)](x, torch.empty(16), BLOCK=16)
    assert len(launches) == 3


@triton.jit
def _two_pointer_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    tl.store(y_ptr + tl.arange(0, BLOCK), tl.load(x_ptr + tl.arange(0, BLOCK)))


def test_every_launch_of_a_real_op_is_recorded_and_guarded():
    """One op of each family (forward and backward) on the interpreter or a GPU: the checker sees every
    launch, each inside the device guard of its tensors' device."""
    from conftest import GPU

    dev = torch.device("cuda", torch.cuda.current_device()) if GPU else torch.device("cpu")
    with launch_checker.recording() as launches:
        _every_family_on(dev)
    names = {launch.kernel for launch in launches}
    assert {"_stats_nchw_kernel", "_apply_kernel", "_bwd_apply_kernel", "_conv_fwd_kernel", "_conv_dgrad_kernel",
            "_conv_wgrad_kernel", "_excite_kernel", "_augment_kernel"} <= names
    assert all(launch.guarded == dev and launch.devices == (dev,) for launch in launches)


# ------------------------------------------------------------------------------------------ device guard


class _FakeCuda:
    """torch.cuda.device / current_device on a machine without a GPU: records which device is current."""

    def __init__(self):
        self.current = 0
        self.entered = []

    def device(self, device):
        fake = self

        class _Ctx:
            def __enter__(self):
                self.prev = fake.current
                fake.current = torch.device(device).index
                fake.entered.append(fake.current)

            def __exit__(self, *exc):
                fake.current = self.prev
                return False

        return _Ctx()


def test_device_guard_makes_the_tensors_device_current(monkeypatch):
    fake = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    assert _tensors.guarded_device() is None
    with _tensors.device_guard(torch.device("cuda", 1)):
        assert fake.current == 1, "device_guard must make cuda:1 current (Triton launches on the current device)"
        assert _tensors.guarded_device() == torch.device("cuda", 1)
        with _tensors.device_guard(torch.device("cuda", 0)):
            assert fake.current == 0
        assert fake.current == 1
    assert fake.current == 0 and _tensors.guarded_device() is None
    with _tensors.device_guard("cpu"):  # nothing to make current off a GPU
        assert fake.current == 0 and _tensors.guarded_device() == torch.device("cpu")
    assert fake.entered == [1, 0]


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (what the guard reads)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def _contract_primitives():
    """(family, name, Triton module) of every primitive of the family contracts: the public functions of
    reference/<family>.py that triton_kernels/<family>.py implements."""
    import importlib

    import fastnets.ops.augment  # noqa: F401  (registers its family, imported lazily elsewhere)
    from fastnets.ops._registry import _MODULES

    out = []
    for family, (mods, _order) in sorted(_MODULES.items()):
        if "triton" not in mods or "reference" not in mods or family.startswith("_"):
            continue
        ref = importlib.import_module(mods["reference"], "fastnets")
        tri = importlib.import_module(mods["triton"], "fastnets")
        out += [(family, name, tri) for name, fn in vars(ref).items()
                if callable(fn) and not name.startswith("_") and getattr(fn, "__module__", None) == ref.__name__
                and hasattr(tri, name)]
    return out


PRIMITIVES = _contract_primitives()


def test_the_contract_lists_every_family():
    assert {f for f, _, _ in PRIMITIVES} == {"batch_norm", "conv", "conv_prologue", "squeeze_excite", "augment"}
    assert len(PRIMITIVES) == 17


@pytest.mark.parametrize("family,name,mod", PRIMITIVES, ids=[f"{f}.{n}" for f, n, _ in PRIMITIVES])
def test_every_triton_primitive_runs_under_the_guard_of_its_first_tensor(monkeypatch, family, name, mod):
    """The primitives of the family contracts (what ops/, SyncBatchNorm, the conv auto policy and conv chains
    call) enter device_guard with their first tensor's device before anything else."""
    from fastnets.triton_kernels import _common

    seen = []

    class Entered(Exception):
        pass

    def guard(device):  # stands in for device_guard; stops before the launcher body runs
        seen.append(torch.device(device))
        raise Entered

    monkeypatch.setattr(_common, "device_guard", guard)
    x = torch.empty(1).as_subclass(_OnCuda1)
    with pytest.raises(Entered):
        getattr(mod, name)(x, torch.empty(1))
    assert seen == [torch.device("cuda", 1)], f"{family}.{name} does not run under device_guard"


def _every_family_on(device):
    """One op of every Triton family on `device`, forward and backward."""
    from fastnets.ops.augment import augment_apply
    from fastnets.ops.batch_norm import batch_norm
    from fastnets.ops.conv import conv2d
    from fastnets.ops.conv_prologue import bn_act_conv2d
    from fastnets.ops.squeeze_excite import squeeze_excite

    x = torch.randn(2, 4, 6, 5, device=device, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, device=device, requires_grad=True)
    vec = torch.rand(4, device=device) + 0.5
    y = batch_norm(x, None, None, training=True, relu=True, backend="triton")
    y = conv2d(y, w, padding=1, backend="triton")
    y = bn_act_conv2d(x, vec, vec, w, padding=1, backend="triton") + y
    se = squeeze_excite(x, torch.randn(2, 4, device=device), torch.zeros(2, device=device),
                        torch.randn(4, 2, device=device), torch.zeros(4, device=device), backend="triton")
    (y.sum() + se.sum()).backward()
    augment_apply(torch.rand(2, 3, 6, 5, device=device), torch.eye(3, device=device).repeat(2, 1, 1), (4, 4),
                  backend="triton")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_launches_run_on_the_tensors_gpu_not_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current: every launch (the checker compares the current device with
    the tensors' at each one) runs with cuda:1 current, on its current stream."""
    torch.cuda.set_device(0)
    with launch_checker.recording() as launches:
        _every_family_on(torch.device("cuda", 1))
    torch.cuda.synchronize(1)
    assert launches and all(la.current_cuda == 1 and la.devices == (torch.device("cuda", 1),) for la in launches)
    assert torch.cuda.current_device() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_launches_run_on_torchs_current_stream():
    s = torch.cuda.Stream()
    with torch.cuda.stream(s), launch_checker.recording() as launches:
        _every_family_on(torch.device("cuda", torch.cuda.current_device()))
    torch.cuda.synchronize()
    assert launches and all(la.streams == (s.cuda_stream, s.cuda_stream) for la in launches)


# ------------------------------------------------------------------------------------------ extreme shapes


@pytest.fixture
def gpu_plans(monkeypatch):
    """The launch plans of an H100 in this process: GPU tile sizes (INTERPRET off in the plan functions), 132
    SMs, the fixed conv configuration plus every configuration the autotuner's pruning keeps."""
    import fastnets.triton_kernels.batch_norm as bn
    import fastnets.triton_kernels.conv as cv
    import fastnets.triton_kernels.squeeze_excite as se

    monkeypatch.setattr(bn, "INTERPRET", False)
    monkeypatch.setattr(bn, "_target_programs", lambda device: 4 * H100_SMS)
    monkeypatch.setattr(se, "sm_count", lambda device: H100_SMS)
    split = se._split
    monkeypatch.setattr(se, "_split", lambda n, cb, s, bs, device, sp: split(n, cb, s, bs, torch.device("cuda"), sp))
    monkeypatch.setattr(cv, "INTERPRET", False)
    monkeypatch.setattr(cv, "_wgrad_target_programs", lambda device: 2 * H100_SMS)
    monkeypatch.setenv("FASTNETS_CONV_TUNE", "fixed")
    launch = cv._launch

    def every_config(tuned, raw, grid, *args, **kwargs):
        cfg = launch(tuned, raw, grid, *args, **kwargs)
        if not kwargs["FP64"]:
            for c in tuned.early_config_prune(tuned.configs, dict(zip(raw.arg_names, args)), **kwargs):
                raw[grid(c.kwargs)](*args, **kwargs, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        return cfg

    monkeypatch.setattr(cv, "_launch", every_config)
    with launch_checker.dry_run() as launches:
        yield launches


BIG_PLANE = (2, 3, 8200, 8200)  # 67.2 Mi pixels per channel and image (> 65,535 blocks of 1,024)


@pytest.mark.parametrize("shape,cl", [(BIG_PLANE, False), (BIG_PLANE, True), ((64, 256, 512, 512), False),
                                      ((3, 2**24 + 3, 1, 2), True), ((2**31 // 64 + 5, 64), False)])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_batch_norm_launches_at_extreme_shapes(gpu_plans, shape, cl, dtype):
    import fastnets.triton_kernels.batch_norm as bn

    x = meta(shape, dtype, cl)
    acc = torch.float32
    vec = meta((shape[1],), acc)
    bn.stats(x, cl, 1e-5)
    bn.apply(x, vec, vec, x, 1, cl)
    bn.backward_reduce(x, x, x, vec, 1, cl)
    bn.backward_apply(x, x, x, vec, vec, vec, vec, 1, True, True, cl)
    bn.backward_apply(x, x, None, vec, vec, vec, vec, 6, True, True, cl, 0.0, vec, vec, x)  # gelu: recompute
    kinds = {launch.kernel for launch in gpu_plans}
    assert {"_apply_kernel", "_bwd_apply_kernel", "_stats_finalize_kernel"} <= kinds
    assert max(launch.grid[0] for launch in gpu_plans) > 65535  # the element-wise grid is in x


@pytest.mark.parametrize("shape,cl", [((2, 64, 8200, 8200), False), ((2, 64, 8200, 8200), True),
                                      ((4096, 2048, 7, 7), True), ((1, 2**20, 1, 1), False)])
def test_squeeze_excite_launches_at_extreme_shapes(gpu_plans, shape, cl):
    import fastnets.triton_kernels.squeeze_excite as se

    n, c = shape[:2]
    r = max(1, c // 16)
    x = meta(shape, BF16, cl)
    gate = meta((n, c))
    pooled = se.pool(x, cl)
    se.excite(meta((n, c)), meta((r, c), BF16), meta((r,), BF16), meta((c, r), BF16), meta((c,), BF16))
    se.scale(x, gate, x, True, cl)
    se.backward_reduce(x, x, x, True, cl)
    se.backward_apply(x, x, gate, gate, True, True, cl)
    assert pooled.shape == (n, c) and len(gpu_plans) >= 5


# (N, C, H, W, Cout, K, stride, padding): N*OH*OW output rows past 2**31, a 1x1 and a 3x3 convolution
CONV_EXTREME = [(2049, 8, 1024, 1024, 16, 1, 1, 0), (2049, 16, 1024, 1024, 32, 3, 1, 1),
                (128, 3, 8200, 8200, 64, 7, 2, 3)]


@pytest.mark.parametrize("shape", CONV_EXTREME)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_conv_launches_at_extreme_shapes(gpu_plans, shape, dtype):
    """Forward (with the statistics epilogue), grad input and grad weight past 2**31 rows, every pruned config:
    grids, threads and shared memory within sm_90's limits, and no weight-gradient launch whose int32 row
    indices (split * rows_per_split + BLOCK_K) could pass 2**31."""
    import fastnets.triton_kernels.conv as cv

    n, c, h, w, cout, k, s, p = shape
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    x = meta((n, c, h, w), dtype, True)
    wt = meta((cout, c, k, k), dtype)
    y = meta((n, cout, oh, ow), dtype, True)
    conf = ((s, s), (p, p), (1, 1))
    assert n * oh * ow > 2**31
    cv.forward(x, wt, meta((cout,), dtype), meta((cout,)), meta((cout,)), y, *conf, 1, y)
    cv.forward_stats(x, wt, None, *conf, y)
    cv.grad_input(y, wt, meta((n, c, h, w), dtype, True), *conf)
    cv.grad_weight(y, x, (cout, c, k, k), *conf)
    wgrad = [launch for launch in gpu_plans if launch.kernel == "_conv_wgrad_kernel"]
    assert wgrad and len({launch.args["M"] for launch in wgrad}) > 1  # the batch was sliced
    for launch in wgrad:
        rows = launch.grid[2] * launch.args["rows_per_split"] + launch.args["BLOCK_K"]
        assert rows < 2**31 and launch.args["M"] < 2**31, f"wgrad launch of {launch.args['M']} rows: int32 overflow"
    kernels = {"_conv_fwd_kernel", "_stats_merge_kernel"} | ({"_conv_dgrad_kernel"} if k > 1 else set())
    assert kernels <= {la.kernel for la in gpu_plans}  # (a 1x1 grad input is the forward kernel)


@pytest.mark.parametrize("in_shape,out_hw,c_dtype", [((2, 64, 8, 8), (1100, 1000), torch.uint8),
                                                     ((2, 128, 8, 8), (1025, 1025), F32),
                                                     ((100000, 3, 32, 32), (32, 32), torch.uint8)])
def test_augment_launches_at_extreme_shapes(gpu_plans, in_shape, out_hw, c_dtype):
    """More than 1,048,560 output pixels at C >= 64 (the old grid's y passed 65,535), and 100,000 samples."""
    import fastnets.triton_kernels.augment as aug

    n, c = in_shape[:2]
    x = meta(in_shape, c_dtype)
    out = meta((n, c) + out_hw, BF16, True)
    col = meta((n, 3))
    rgb = c == 3
    aug.apply(x, meta((n, 3, 3)), meta((n, 4)), col, True, rgb, rgb, meta((1,), torch.int64), 0.0, 0.1, True,
              meta((c,)), meta((c,)), False, 0.0, out)
    assert len(gpu_plans) == (2 if rgb else 1)


# ------------------------------------------------------------------------------------------ config pruning


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("kernel", ["fwd", "fwd_prologue", "dgrad", "wgrad"])
def test_conv_pruning_keeps_only_configs_that_fit(kernel, dtype):
    """The autotuner compiles only what the pruning keeps: every kept config fits sm_90's shared memory (the
    launch checker's estimate, which tests/triton_aot.py checks against the compiled kernels), and fp32 drops
    the 128x256x64 / 3-stage configs that do not fit (288 KiB) while bf16 keeps them."""
    import fastnets.triton_kernels.conv as cv

    pro = kernel == "fwd_prologue"
    tuned = {"fwd": cv._fwd_tuned, "fwd_prologue": cv._fwd_tuned, "dgrad": cv._dgrad_tuned,
             "wgrad": cv._wgrad_tuned}[kernel]
    operand = meta((32, 256, 56, 56), dtype, True)
    named = {"x_ptr": operand, "g_ptr": operand, "C": 256, "Cout": 256}
    kept = tuned.early_config_prune(tuned.configs, named, PRO=pro)
    sizes = {}
    for c in kept:
        est = launch_checker.estimate_shared_bytes(dict(c.kwargs, x=operand, PRO=pro), c.num_stages, c.num_warps)
        sizes[(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages)] = est
        assert est == cv.shared_bytes(c, operand.element_size(), pro)
        assert est <= launch_limits.SHARED_BYTES_MAX, f"{kernel} {dtype}: kept {c} needs {est} bytes"
    assert kept
    size = operand.element_size()
    too_big = [c for c in tuned.configs if cv.shared_bytes(c, size, pro) > launch_limits.SHARED_BYTES_MAX]
    if kernel != "wgrad":
        assert bool(too_big) == (dtype == F32)
        if dtype != F32:
            assert (128, 256, 64, 3) in sizes


def test_conv_pruning_uses_the_gpus_own_limit(monkeypatch):
    """On a GPU the budget is the device's opt-in shared memory (an A100's 163 KiB drops more fp32 configs)."""
    import fastnets.triton_kernels.conv as cv
    from fastnets.triton_kernels import _common

    props = types.SimpleNamespace(shared_memory_per_block_optin=166912)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert _common.max_shared_bytes(torch.device("cuda", 0)) == 166912
    assert _common.max_shared_bytes("meta") == _common.SM90_SHARED_BYTES

    class _Cuda:
        device = torch.device("cuda", 0)

        def element_size(self):
            return 4

    kept = cv._fitting(cv._fwd_tuned.configs, _Cuda())
    assert kept and all(cv.shared_bytes(c, 4) <= 166912 for c in kept)
    assert len(kept) < len(cv._fitting(cv._fwd_tuned.configs, meta((1,))))
