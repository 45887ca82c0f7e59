"""No host synchronisation inside ops: after its first call (caches filled, conv's `auto` measured once per
key), no public op reads a device value on the host, in its forward or its backward. A host read waits for
the GPU (a sync per call), cannot be captured in a CUDA graph and breaks torch.compile's graph.

On the CPU a host read costs nothing, so it is caught by what fastnets' own code calls: every Tensor method
and torch function that hands a value to Python (item, tolist, bool/int/float/index conversion, numpy, cpu,
nonzero/unique/masked_select and boolean-mask indexing, whose output size is data-dependent) and every tensor
built from host data (torch.tensor / as_tensor of Python values: an upload per call on a GPU), counted when
the caller is a module of the fastnets package (the Triton interpreter's own copies are not). What torch does
inside its C++ ops (linalg.solve's error check, say) only a GPU shows: test_no_sync_on_a_gpu runs the same
steps under torch.cuda.set_sync_debug_mode("error"), which raises on any synchronising CUDA call.

The backends run are those that run on a GPU (Triton here under the interpreter; Triton, CUDA and `auto` on a
GPU); the reference backend (the oracle) and `native` (torch's CPU kernels, CPU only) are not held to it."""
import os
import sys

import pytest
import torch

import fastnets
import fastnets.augment as A
from fastnets import nn as fnn
from fastnets.ops import augment as aug_ops
from fastnets.ops import batch_norm, bn_act_conv2d, conv2d, conv2d_batch_norm, se_excite, se_scale, se_squeeze
from fastnets.ops import squeeze_excite
from fastnets.nn.conv_chain import ChainedSequential

from conftest import GPU, backends_here

FASTNETS_DIR = os.path.dirname(os.path.abspath(fastnets.__file__)) + os.sep
DEV = "cuda" if GPU else "cpu"

# Tensor methods that hand a device value to the host, and torch functions with data-dependent output sizes
READ_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero",
                "unique", "masked_select")
READ_FUNCTIONS = ("nonzero", "unique", "masked_select")
UPLOADS = ("tensor", "as_tensor")


class HostReads:
    """Counts host reads made by fastnets code while `active` (see the module docstring)."""

    def __init__(self, monkeypatch):
        self.active = False
        self.reads = []
        for name in READ_METHODS:
            self._wrap(monkeypatch, torch.Tensor, name, lambda *a, **k: True)
        for name in READ_FUNCTIONS:
            self._wrap(monkeypatch, torch, name, lambda *a, **k: True)
        for name in UPLOADS:  # a tensor built from Python values (not from a tensor)
            self._wrap(monkeypatch, torch, name, lambda data, *a, **k: not isinstance(data, torch.Tensor))
        self._wrap(monkeypatch, torch.Tensor, "__getitem__", lambda self_, index: _bool_mask(index))
        self._wrap(monkeypatch, torch.Tensor, "to", lambda self_, *a, **k: _to_cpu(a, k))

    def _wrap(self, monkeypatch, owner, name, counts):
        real = getattr(owner, name)
        reads = self

        def wrapper(*args, **kwargs):
            if reads.active:
                caller = sys._getframe(1).f_code
                if caller.co_filename.startswith(FASTNETS_DIR) and counts(*args, **kwargs):
                    where = os.path.relpath(caller.co_filename, FASTNETS_DIR)
                    reads.reads.append(f"{name} in fastnets/{where}:{sys._getframe(1).f_lineno} ({caller.co_name})")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    def count(self, fn):
        self.reads = []
        self.active = True
        try:
            fn()
        finally:
            self.active = False
        return self.reads


def _bool_mask(index):
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _to_cpu(args, kwargs):
    dev = kwargs.get("device", args[0] if args and isinstance(args[0], (str, torch.device)) else None)
    return dev is not None and torch.device(dev).type == "cpu"


# ------------------------------------------------------------------------------------------------ the steps
# Each factory builds its modules and inputs once (building them uploads from the host) and returns the step:
# one forward and backward of the op.


def _leaf(*shape, cl=False, scale=1.0, shift=0.0):
    t = torch.randn(*shape, device=DEV) * scale + shift
    if cl:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_()


def _backward(y, *leaves):
    torch.autograd.grad(y.float().square().sum(), [t for t in leaves if t.requires_grad], allow_unused=True)


def _bn_train():
    x, w, b, r = _leaf(2, 6, 5, 7, cl=True, shift=2.0), _leaf(6, shift=1.0), _leaf(6), _leaf(2, 6, 5, 7, cl=True)
    rm, rv = torch.zeros(6, device=DEV), torch.ones(6, device=DEV)

    def step():
        _backward(batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, residual=r, relu=True), x, w, b, r)
        _backward(batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, act="silu"), x, w, b)
    return step


def _bn_eval():
    x, w, b = _leaf(2, 6, 5, 7, shift=2.0), _leaf(6, shift=1.0), _leaf(6)
    rm, rv = torch.randn(6, device=DEV), torch.rand(6, device=DEV) + 0.5
    return lambda: _backward(batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, act="hardswish"), x, w, b)


def _bn_module_cumulative():
    m = fnn.BatchNormReLU2d(6, momentum=None).to(DEV).train()  # momentum=None: 1 / num_batches_tracked
    x = _leaf(2, 6, 5, 7, shift=1.0)
    return lambda: _backward(m(x), x, m.weight, m.bias)


def _conv():
    x, w, b = _leaf(2, 5, 7, 6, cl=True), _leaf(4, 5, 3, 3, scale=0.2), _leaf(4)
    sc, sh, r = _leaf(4, shift=1.0), _leaf(4), _leaf(2, 4, 7, 6, cl=True)
    x2, w2 = _leaf(2, 5, 7, 6), _leaf(4, 5, 1, 1, scale=0.3)

    def step():
        _backward(conv2d(x, w, b, 1, 1, scale=sc, shift=sh, residual=r, relu=True), x, w, b, sc, sh, r)
        _backward(conv2d(x2, w2, None, 2, 0, act="silu"), x2, w2)  # 1x1 stride 2: grad input as a strided GEMM
    return step


def _conv_bn():
    x, w = _leaf(2, 5, 7, 6), _leaf(4, 5, 3, 3, scale=0.2)
    g, b = _leaf(4, shift=1.0), _leaf(4)
    rm, rv = torch.zeros(4, device=DEV), torch.ones(4, device=DEV)

    def step():
        _backward(conv2d_batch_norm(x, w, None, rm, rv, g, b, True, 0.1, padding=1), x, w, g, b)
        _backward(conv2d_batch_norm(x, w, None, rm, rv, g, b, False, 0.1, padding=1), x, w, g, b)
    return step


def _conv_bn_module_cumulative():
    m = fnn.ConvBNReLU2d(5, 4, 3, padding=1, momentum=None).to(DEV).train()
    x = _leaf(2, 5, 7, 6)
    return lambda: _backward(m(x), x, m.conv.weight, m.bn.weight)


def _conv_prologue():
    z, sc, sh = _leaf(2, 5, 7, 6, cl=True, shift=0.5), _leaf(5, shift=1.0), _leaf(5)
    w, b = _leaf(4, 5, 3, 3, scale=0.2), _leaf(4)
    def step():
        _backward(bn_act_conv2d(z, sc, sh, w, b, padding=1, activation="relu"), z, sc, sh, w, b)
        out, mean, var = bn_act_conv2d(z, sc, sh, w, b, padding=1, activation="silu", stats=True)
        _backward(out, z, sc, sh, w, b)
    return step


def _chain():
    m = ChainedSequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4, momentum=None), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).to(DEV).train()
    x = _leaf(2, 3, 6, 5)
    return lambda: _backward(m(x), x, *m.parameters())


def _se():
    x, r = _leaf(2, 8, 5, 4, cl=True, shift=0.3), _leaf(2, 8, 5, 4, cl=True)
    w1, b1, w2, b2 = _leaf(2, 8, scale=0.3), _leaf(2), _leaf(8, 2, scale=0.3), _leaf(8)
    m = fnn.SqueezeExcite(8, 2).to(DEV)

    def step():
        _backward(squeeze_excite(x, w1, b1, w2, b2, residual=r, relu=True), x, w1, b1, w2, b2, r)
        _, gate = se_excite(se_squeeze(x), w1, b1, w2, b2)
        _backward(se_scale(x, gate), x, w1, b1, w2, b2)
        _backward(m(x), x, *m.parameters())
    return step


def _augment():
    aug = A.Augment([
        A.RandomResizedCrop((7, 8)), A.RandomHorizontalFlip(), A.RandomAffine(10, translate=(0.1, 0.1)),
        A.RandomPerspective(0.3, p=0.5), A.RandomRotation(5), A.RandomCrop(7, padding=1), A.CenterCrop(6),
        A.ColorJitter(0.3, 0.3, 0.3), A.GaussianNoise(sigma=0.05), A.Normalize([0.4, 0.5, 0.6], [0.2, 0.2, 0.2])],
        out_dtype=torch.bfloat16, memory_format=torch.channels_last)
    x = (torch.rand(3, 3, 9, 11, device=DEV) * 255).to(torch.uint8)
    g = torch.Generator(device=DEV).manual_seed(0)

    def step():
        aug(x, g)  # sampling every transform's parameters on the device, then the fused kernel
        p = aug.sample(x, g)
        aug_ops.augment_apply(x, p["matrix"], p["out_hw"], box=p["box"], colour=p["colour"], brightness=True,
                              contrast=True, saturation=True, noise_seed=p["noise_seed"], noise_std=0.1)
    return step


STEPS = {"batch_norm_train": _bn_train, "batch_norm_eval": _bn_eval,
         "BatchNormReLU2d_momentum_none": _bn_module_cumulative, "conv2d": _conv, "conv2d_batch_norm": _conv_bn,
         "ConvBNReLU2d_momentum_none": _conv_bn_module_cumulative, "bn_act_conv2d": _conv_prologue,
         "ChainedSequential": _chain, "squeeze_excite": _se, "augment": _augment}
BACKENDS = [b for b in ("triton", "cuda") if b in backends_here("batch_norm")] + (["auto"] if GPU else [])
NO_CUDA_KERNELS = ("conv2d", "ChainedSequential", "augment")  # conv's `cuda` is cuDNN; augment has no CUDA C++


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step", list(STEPS))
def test_no_host_read_after_the_first_call(step, backend, monkeypatch):
    if backend == "cuda" and step in NO_CUDA_KERNELS:
        pytest.skip(f"{step} has no CUDA C++ kernels (conv's `cuda` name is cuDNN; tested under `auto`)")
    reads = HostReads(monkeypatch)
    with fastnets.use_backend(backend):
        run = STEPS[step]()
        reads.count(run)  # the first call may fill caches (conv's `auto` measures each key once)
        again = reads.count(run)
    assert again == [], f"{step} on {backend}: host reads on a repeated call:\n  " + "\n  ".join(again)


def test_the_counter_sees_a_host_read(monkeypatch):
    """The counter itself: each kind of read counts when fastnets code makes it (code compiled under a file
    name in the fastnets package), not when this file does."""
    reads = HostReads(monkeypatch)
    t = torch.ones(3)
    assert reads.count(lambda: (bool((t > 0).all()), t.sum().item(), torch.tensor([1.0]))) == []
    kinds = {"item": "t.sum().item()", "__bool__": "bool((t > 0).all())", "__float__": "float(t[0])",
             "tolist": "t.tolist()", "cpu": "t.cpu()", "nonzero": "t.nonzero()", "__getitem__": "t[t > 0]",
             "tensor": "torch.tensor([1.0, 2.0])", "as_tensor": "torch.as_tensor(0.5)", "to": "t.to('cpu')"}
    for kind, code in kinds.items():
        planted = compile(code, FASTNETS_DIR + "planted.py", "eval")
        found = reads.count(lambda: eval(planted, {"t": t, "torch": torch}))
        assert found and found[0].startswith(kind + " in fastnets/planted.py"), (kind, found)
    harmless = compile("(t.to(torch.float64), torch.as_tensor(t), t[0:2], t.shape[0])", FASTNETS_DIR + "ok.py", "eval")
    assert reads.count(lambda: eval(harmless, {"t": t, "torch": torch})) == []


@pytest.mark.skipif("triton" not in backends_here("conv"), reason="needs the Triton backend")
def test_conv_auto_measures_once_per_key_then_reads_nothing(monkeypatch):
    """conv's `auto` policy (ops/_conv_auto.py, CUDA only; driven directly here with the timer replaced): the
    first call of a key benchmarks both implementations (host syncs, allowed once), the next reads nothing."""
    from fastnets.ops import _conv_auto

    timed = []

    def fake_time(fn, reps=5):
        fn()
        timed.append(fn)
        return float(len(timed))

    monkeypatch.setattr(_conv_auto, "_time_ms", fake_time)
    monkeypatch.setattr(_conv_auto, "choices", {})
    reads = HostReads(monkeypatch)
    x, w = torch.randn(2, 5, 7, 6, device=DEV), torch.randn(4, 5, 3, 3, device=DEV)
    g = torch.randn(2, 4, 7, 6, device=DEV)
    geo = ([1, 1], [1, 1], [1, 1])

    def step():
        _conv_auto.forward(x, w, None, None, None, None, *geo, 0, torch.empty_like(g))
        _conv_auto.grad_input(g, w, torch.empty_like(x), *geo)
        _conv_auto.grad_weight(g, x, tuple(w.shape), *geo)

    reads.count(step)
    assert len(timed) == 6, "each primitive's key measured once (Triton and cuDNN)"
    assert reads.count(step) == [] and len(timed) == 6


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="torch.cuda.set_sync_debug_mode needs a GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda", "auto"])
def test_no_sync_on_a_gpu(backend):
    """Every step, after two warm-up calls, under torch.cuda.set_sync_debug_mode("error"): any synchronising
    CUDA call (a device-to-host copy, a pageable upload, torch's own host checks) raises."""
    with fastnets.use_backend(backend):
        for name, make in STEPS.items():
            if backend == "cuda" and name in NO_CUDA_KERNELS:
                continue
            step = make()
            step()
            step()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            except RuntimeError as e:
                raise AssertionError(f"{name} on {backend} synchronises: {e}") from e
            finally:
                torch.cuda.set_sync_debug_mode("default")


def test_augment_apply_compiles_without_a_graph_break():
    """The augmentation op's wrapper reads no value (it read isfinite(matrix).all() and (colour < 0).any(): a
    graph break each): torch.compile traces it whole (aot_eager: what inductor would see, without C++)."""
    x = (torch.rand(2, 3, 9, 11, device=DEV) * 255).to(torch.uint8)
    aug = A.Augment([A.RandomResizedCrop((7, 8)), A.ColorJitter(0.3, 0.3, 0.3)])
    p = aug.sample(x, torch.Generator(device=DEV).manual_seed(0))

    def fn(x, matrix, box, colour):
        return aug_ops.augment_apply(x, matrix, (7, 8), box=box, colour=colour, brightness=True, contrast=True,
                                     saturation=True, backend="reference")

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, p["matrix"], p["box"], p["colour"]), fn(x, p["matrix"], p["box"], p["colour"]))
