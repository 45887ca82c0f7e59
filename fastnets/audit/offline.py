"""Compiling Triton launches without a GPU, shared by the static audit (fastnets/audit/compile.py),
tests/triton_aot.py (the sm_90 compile test) and benchmarks/triton_warmup.py (the GPU check's cache warm-up):
an offline driver and the key of a launch variant. It imports neither torch nor Triton, so each caller keeps
its own import order (TRITON_INTERPRET must be set before the first import of Triton)."""


class OfflineDriver:
    """Enough of a Triton driver for JITFunction.run(..., warmup=True) to specialize and compile a launch for
    `target` (a triton.backends.compiler.GPUTarget) without a GPU (warmup never launches or loads the kernel)."""

    def __init__(self, target):
        self._target = target

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self._target

    def __getattr__(self, name):
        if name.startswith("_"):  # attribute lookups of the object itself (pickling, copying)
            raise AttributeError(name)
        raise AttributeError(f"the offline sm_{self._target.arch} driver has no {name} (Triton wanted a GPU for this)")


def int_specialization(v):
    """What Triton specializes an int argument on: equal to 1, divisible by 16, fits in 32 bits."""
    return ("int", v == 1, v % 16 == 0, -2**31 <= v < 2**31)


def variant_key(fn, args, kwargs, spec):
    """The key of one launch variant of the JITFunction `fn`: its constexprs and launch options by value, each
    other argument as `spec(value)` describes it (dtype and alignment of a tensor, int_specialization, ...)."""
    const = [p.is_constexpr for p in fn.params]
    return (fn.__module__, fn.__name__, tuple(repr(v) if c else spec(v) for v, c in zip(args, const)),
            tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
