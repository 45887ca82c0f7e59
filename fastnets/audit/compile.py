"""Record the real launchers' Triton launches on `meta` tensors and compile each distinct variant ahead of time
for a GPU target (sm_90, sm_100) without a GPU. Shared by the static audit (python -m fastnets.audit) and the
sm_90 compile test (tests/triton_aot.py).

 1. `Recorder` replaces JITFunction.run: the Python launchers (batch_norm.stats, conv.forward, ...) called on
    meta tensors pick block sizes, grids and flags exactly as they would on a GPU, and every `fn[grid](...)`
    is recorded instead of launched. `simulate_h100()` makes torch report an H100's 132 SMs and
    `with_cuda_device` makes a plan function see a CUDA device.
 2. `variant_key` mirrors Triton's specialization (constexprs and options by value; tensors by dtype and
    16-byte alignment; ints by value 1, 16-divisibility and 32-bit range), so each distinct variant compiles once.
 3. `compile_variants` replays each variant through the original JITFunction.run(..., warmup=True) with the
    offline driver (fastnets/audit/offline.py) for the target: Triton's own binder specializes it as at a real
    launch and compiles it (TTIR -> TTGIR -> LLVM -> PTX -> cubin with ptxas) without loading or launching it.
    Each variant compiles in a forked child (an MLIR assertion fails one variant, not the run), `jobs` at a time.

TRITON_INTERPRET must be 0 before Triton is first imported (the interpreter's kernels never compile); this
module refuses to load otherwise.
"""
import os
import sys
import time
import types

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise ImportError("fastnets.audit.compile needs TRITON_INTERPRET=0 before Triton is imported (the interpreter "
                      "compiles nothing); run the audit in its own process: python -m fastnets.audit")

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from .offline import OfflineDriver, int_specialization, variant_key as _variant_key  # noqa: E402

H100_SMS = 132
H100_SHARED = 232448  # bytes of shared memory a block may opt in to on sm_90 (227 KiB)
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

_ORIGINAL_RUN = JITFunction.run  # the real launch path (warmup=True compiles without launching)


class Unavailable(RuntimeError):
    """Nothing can be compiled for the target here (no NVIDIA backend or ptxas); the message says why."""


def target(arch):
    """The GPUTarget of sm_<arch> (90: H100, 100: B200), after checking that Triton can compile for it here."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        t = GPUTarget("cuda", int(arch), 32)
        make_backend(t)  # raises without the NVIDIA backend
    except Exception as e:  # a Triton without the NVIDIA backend or these APIs
        raise Unavailable(f"Triton {getattr(sys.modules.get('triton'), '__version__', '?')} cannot compile for "
                          f"sm_{arch} here: {type(e).__name__}: {e}") from e
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        try:
            get_ptxas_version(int(arch))  # runs ptxas --version: Triton's own (ptxas-blackwell for sm_100+)
        except TypeError:  # Triton before 3.4: one ptxas for every arch
            get_ptxas_version()
    except Exception as e:
        raise Unavailable(f"no ptxas for sm_{arch} (Triton ships one; else set TRITON_PTXAS_PATH): "
                          f"{type(e).__name__}: {e}") from e
    del triton
    return t


# ------------------------------------------------------------------------------------------- recording


class Launch:
    """One recorded launch: the JITFunction, its arguments, its grid (a tuple), a label and an autotune group
    (launches of one group are alternatives the autotuner chooses between; None: a launch of its own)."""

    __slots__ = ("fn", "args", "kwargs", "grid", "what", "group")

    def __init__(self, fn, args, kwargs, grid, what, group):
        self.fn, self.args, self.kwargs, self.grid, self.what, self.group = fn, args, kwargs, grid, what, group

    @property
    def named(self):
        """Every argument by name (positional ones by the kernel's parameter names, then constexprs/options)."""
        return dict(zip(self.fn.arg_names, self.args), **self.kwargs)


class Recorder:
    """Inside `with Recorder() as rec:`, every Triton launch is appended to rec.launches instead of running;
    `rec.label(what)` / `rec.group(name)` label the launches made inside them."""

    def __init__(self):
        self.launches = []
        self.what = ""
        self._group = None
        self.on_launch = None  # called with each Launch as it is recorded

    def _record(self, fn, args, grid, kwargs):
        if callable(grid):
            grid = grid(dict(zip(fn.arg_names, args), **kwargs))
        grid = tuple(grid) + (1,) * (3 - len(tuple(grid)))
        self.launches.append(Launch(fn, args, dict(kwargs), grid, self.what, self._group))
        if self.on_launch is not None:
            self.on_launch(self.launches[-1])

    def __enter__(self):
        rec = self

        def run(self, *args, grid, warmup, **kwargs):
            rec._record(self, args, grid, kwargs)
            return None

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = _ORIGINAL_RUN
        return False

    class _Label:
        def __init__(self, rec, attr, value):
            self.rec, self.attr, self.value = rec, attr, value

        def __enter__(self):
            self.saved = getattr(self.rec, self.attr)
            setattr(self.rec, self.attr, self.value)

        def __exit__(self, *exc):
            setattr(self.rec, self.attr, self.saved)

    def label(self, what):
        return Recorder._Label(self, "what", what)

    def group(self, name):
        """Launches inside are alternatives of one autotuned launch (keyed by `name` and the launch count)."""
        return Recorder._Label(self, "_group", (len(self.launches), name))


def with_cuda_device(module, name):
    """Wrap module.name so that every torch.device argument reads as a CUDA device (an H100, simulate_h100)."""
    fn = getattr(module, name)
    if getattr(fn, "_fastnets_audit_wrapped", False):
        return

    def wrapped(*args, **kwargs):
        fix = lambda v: torch.device("cuda", 0) if isinstance(v, torch.device) else v  # noqa: E731
        return fn(*map(fix, args), **{k: fix(v) for k, v in kwargs.items()})

    wrapped._fastnets_audit_wrapped = True
    setattr(module, name, wrapped)


def simulate_h100():
    """torch.cuda.get_device_properties reports an H100 (132 SMs), for the launch plans that ask."""
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(
        multi_processor_count=H100_SMS, name="NVIDIA H100 80GB HBM3 (simulated)", major=9, minor=0)


def meta(shape, dtype, cl=False):
    fmt = torch.channels_last if (cl and len(shape) == 4) else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


def acc_of(dtype):
    return F64 if dtype == F64 else F32


def variant_key(fn, args, kwargs):
    """What Triton specializes a launch on: constexprs and options by value; tensors by dtype and 16-byte
    alignment; ints by value 1, by 16-divisibility and by 32/64-bit range; floats and bools by type."""

    def spec(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", str(v.dtype), v.data_ptr() % 16 == 0)
        if isinstance(v, int) and not isinstance(v, bool):
            return int_specialization(v)
        return (type(v).__name__,)

    return _variant_key(fn, args, kwargs, spec)


def describe(fn, args, kwargs):
    """The kernel, its constexprs and options, and its pointer dtypes."""
    names = fn.arg_names
    ptrs = {n: str(v.dtype).replace("torch.", "") for n, v in zip(names, args) if isinstance(v, torch.Tensor)}
    consts = {k: (v if isinstance(v, (int, float, bool, str)) else str(v)) for k, v in kwargs.items()}
    return f"{fn.__name__} {consts} pointers={ptrs}"


def distinct(launches):
    """{variant key: first launch with it}, in recording order."""
    out = {}
    for ln in launches:
        out.setdefault(variant_key(ln.fn, ln.args, ln.kwargs), ln)
    return out


# ------------------------------------------------------------------------------------------- compiling

_WORK = []  # (JITFunction, args, kwargs, target, analyse) per variant; forked workers read it by index


def _compile(i):
    """Specialize and compile one launch as JITFunction.run does on a GPU, for its target, without launching;
    then `analyse(compiled kernel)` (in the child, so that the SASS is read in parallel too)."""
    from triton.runtime.driver import driver

    fn, args, kwargs, tgt, analyse = _WORK[i]
    t0 = time.time()
    driver.set_active(OfflineDriver(tgt))
    try:
        k = _ORIGINAL_RUN(fn, *args, grid=None, warmup=True, **kwargs)
        out = {"shared": k.metadata.shared, "num_warps": k.metadata.num_warps, "name": fn.__name__}
        if analyse is not None:
            out.update(analyse(k))
        out["seconds"] = time.time() - t0
        return out
    except Exception as e:  # a compile failure: report it with the variant, go on with the others
        msg = f"{type(e).__name__}: {e}"
        return {"error": msg[:3000], "seconds": time.time() - t0, "name": fn.__name__}


def _run_isolated(task, count, jobs, progress=None):
    """[task(i) for i in range(count)], each in a forked child, `jobs` at a time: a compiler that aborts (an
    MLIR assertion) or crashes fails its own variant, not the run. progress(i, result) after each."""
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("fork")
    results = [None] * count
    running = {}  # sentinel -> (index, process, receiving end)

    def child(i, conn):
        conn.send(task(i))
        conn.close()

    todo = list(range(count))
    while todo or running:
        while todo and len(running) < max(1, jobs):
            i = todo.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=child, args=(i, send))
            proc.start()
            send.close()
            running[proc.sentinel] = (i, proc, recv)
        for sentinel in wait(list(running)):
            i, proc, recv = running.pop(sentinel)
            try:
                results[i] = recv.recv()
            except EOFError:
                results[i] = {"error": f"the compiler crashed (exit code {proc.exitcode}; see stderr)",
                              "seconds": 0.0, "name": _WORK[i][0].__name__}
            proc.join()
            recv.close()
            if progress is not None:
                progress(i, results[i])
    return results


def compile_variants(work, tgt, jobs=None, analyse=None, progress=None):
    """Compile each (fn, args, kwargs) of `work` for the GPUTarget `tgt` in forked children, `jobs` at a time
    (default: every core); returns one dict per item: shared, num_warps, name, seconds and analyse(kernel)'s
    keys, or error. progress(i, result) is called as each finishes."""
    _WORK[:] = [(fn, args, kwargs, tgt, analyse) for fn, args, kwargs in work]
    try:
        return _run_isolated(_compile, len(_WORK), jobs or os.cpu_count() or 1, progress)
    finally:
        _WORK[:] = []
