"""The launch checker: every Triton launch the test suite makes is recorded and checked against what a GPU
enforces and the interpreter ignores (issue 28, items 2 and 4). tests/conftest.py installs it for the whole
suite; a launch that breaks a rule fails the test that made it, with the kernel and the rule in the message.

Per launch (JITFunction.run on a GPU, InterpretedFunction.run under TRITON_INTERPRET=1; an autotuned kernel
reaches them once per configuration it runs):
  limits   the grid (a grid function evaluated on the launch's arguments and its config's meta-parameters),
           num_warps * 32 threads per block and the shared memory of the chosen config, against
           tests/launch_limits.py (sm_90). Shared memory: on a GPU the compiled kernel's own
           (metadata.shared); under the interpreter nothing is compiled, so GEMM-shaped launches (BLOCK_M,
           BLOCK_N, BLOCK_K) are estimated as num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K * operand size, which
           tests/triton_aot.py checks against the compiled kernels; other launches are compiled and
           checked there.
  device   all tensor arguments on one device, and that device made current by fastnets' device guard
           (fastnets._tensors.device_guard, read through guarded_device(): checked on any machine); on a GPU
           also torch.cuda.current_device() itself.

`recording()` collects the launches made inside it; `dry_run()` records and checks launches WITHOUT running
them, so the real launchers can be called on `meta` tensors of any size (extreme shapes; no memory, no
interpreter). The checks cost a few microseconds per launch (a grid evaluation and a dict), nothing beside a
Triton launch.
"""
import contextlib
import dataclasses
from typing import Optional

import torch

from launch_limits import launch_problems

DEFAULT_NUM_WARPS = 4  # Triton's defaults on CUDA when a launch gives none
DEFAULT_NUM_STAGES = 3

_recorders = []
_dry = []
_installed = []
stats = {"launches": 0}


@dataclasses.dataclass
class Launch:
    kernel: str
    grid: tuple
    threads: int
    shared_bytes: Optional[int]  # compiled (GPU) or estimated (GEMM configs); None: not known here
    shared_source: str  # "compiled", "estimate" or "unknown"
    devices: tuple  # the devices of the tensor arguments
    guarded: Optional[torch.device]  # what fastnets' device guard made current
    current_cuda: Optional[int]  # torch.cuda.current_device() on a GPU
    streams: Optional[tuple]  # on a GPU: (the stream Triton launches on, torch's current stream of the device)
    args: dict  # the named arguments (tensors, ints, constexprs) and launch options

    def problems(self):
        out = launch_problems(self.grid, self.threads, self.shared_bytes)
        if len(self.devices) > 1:
            out.append(f"tensor arguments on several devices {[str(d) for d in self.devices]}")
        if self.devices:
            dev = self.devices[0]
            if self.guarded is None:
                out.append(f"launched outside fastnets' device guard (tensors on {dev})")
            elif self.guarded != dev:
                out.append(f"the device guard made {self.guarded} current but the tensors are on {dev}")
            if dev.type == "cuda" and self.current_cuda is not None and self.current_cuda != dev.index:
                out.append(f"cuda:{self.current_cuda} is current but the tensors are on {dev}")
            if self.streams is not None and self.streams[0] != self.streams[1]:
                out.append(f"Triton launches on stream {self.streams[0]:#x}, not on torch's current stream "
                           f"{self.streams[1]:#x} of {dev}")
        return out


def estimate_shared_bytes(named, num_stages, num_warps=DEFAULT_NUM_WARPS):
    """The shared memory of a GEMM-shaped launch (BLOCK_M, BLOCK_N, BLOCK_K): num_stages pipeline buffers of
    an A tile (BLOCK_M x BLOCK_K) and a B tile (BLOCK_K x BLOCK_N) in the dtype of its first tensor argument
    (the operand), plus, when a prologue transforms a loaded tile in registers before tl.dot (a true PRO
    constexpr), a layout-conversion scratch of (16 * num_warps + 16) x BLOCK_K operands; None for other
    launches. tests/triton_aot.py checks that it bounds the compiled kernels' shared memory."""
    if not all(k in named for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")):
        return None
    operand = next((v for v in named.values() if isinstance(v, torch.Tensor)), None)
    if operand is None:
        return None
    size = operand.element_size()
    pipeline = num_stages * (named["BLOCK_M"] + named["BLOCK_N"]) * named["BLOCK_K"] * size
    return pipeline + ((16 * num_warps + 16) * named["BLOCK_K"] * size if named.get("PRO") else 0)


def _guarded_device():
    from fastnets import _tensors

    return _tensors.guarded_device()


def describe(fn, args, kwargs, grid):
    """The Launch of fn[grid](*args, **kwargs)."""
    named = dict(zip(fn.arg_names, args))
    named.update(kwargs)
    g = grid(named) if callable(grid) else grid
    g = tuple(int(v) for v in g)
    warps = kwargs.get("num_warps") or DEFAULT_NUM_WARPS
    stages = kwargs.get("num_stages") or DEFAULT_NUM_STAGES
    shared = estimate_shared_bytes(named, stages, warps)
    tensors = [v for v in named.values() if isinstance(v, torch.Tensor)]
    devices = tuple(dict.fromkeys(t.device for t in tensors))
    current = streams = None
    if len(devices) == 1 and devices[0].type == "cuda" and torch.cuda.is_available():
        from triton.runtime.driver import driver

        current = torch.cuda.current_device()
        streams = (driver.active.get_current_stream(driver.active.get_current_device()),
                   torch.cuda.current_stream(devices[0]).cuda_stream)
    return Launch(kernel=getattr(fn, "__name__", repr(fn)), grid=g, threads=int(warps) * 32, shared_bytes=shared,
                  shared_source="unknown" if shared is None else "estimate", devices=devices,
                  guarded=_guarded_device(), current_cuda=current, streams=streams, args=named)


def check(launch):
    problems = launch.problems()
    assert not problems, (f"Triton launch of {launch.kernel} grid={launch.grid} threads={launch.threads} "
                          f"shared={launch.shared_bytes} ({launch.shared_source}): " + "; ".join(problems))


def _wrap(run):
    def checked_run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        launch = describe(self, args, kwargs, grid)
        stats["launches"] += 1
        for r in _recorders:
            r.append(launch)
        check(launch)
        if _dry:
            return None
        kernel = run(self, *args, grid=grid, warmup=warmup, **kwargs)
        meta = getattr(kernel, "metadata", None)  # a GPU launch: the compiled kernel's own numbers
        if meta is not None and getattr(meta, "shared", None) is not None:
            launch.shared_bytes, launch.shared_source = int(meta.shared), "compiled"
            launch.threads = int(getattr(meta, "num_warps", launch.threads // 32)) * 32
            check(launch)
        return kernel

    checked_run.launch_checker = True
    return checked_run


def install():
    """Wrap the launch entry points of Triton's JIT and interpreter (idempotent)."""
    if _installed:
        return
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:
        pass
    for cls in classes:
        if not getattr(cls.run, "launch_checker", False):
            cls.run = _wrap(cls.run)
    _installed.append(True)


def installed():
    """True when every launch entry point is wrapped (the suite's conftest installs the checker)."""
    from triton.runtime.jit import JITFunction

    return bool(_installed) and getattr(JITFunction.run, "launch_checker", False)


@contextlib.contextmanager
def recording():
    """The launches made inside, in order (a list filled as they happen)."""
    out = []
    _recorders.append(out)
    try:
        yield out
    finally:
        _recorders.remove(out)


@contextlib.contextmanager
def dry_run():
    """Record and check launches without running them (the launchers may then take `meta` tensors)."""
    _dry.append(True)
    try:
        with recording() as out:
            yield out
    finally:
        _dry.pop()
