"""Images/s of training steps and of inference for each backend.

Backends:
  eager                 the standard PyTorch model (torchvision / timm / plain), NCHW
  eager-channels-last   the same in channels_last memory format
  compile               torch.compile of the eager model, channels_last
  fastnets              fastnets.models.<arch> with the same weights, fastnets backend "auto"
  fastnets-compile      torch.compile of the fastnets model
torch.compile runs inductor with COMPILE_CONFIG: `freezing` for inference (as users set it for inference),
the defaults for training; recorded in each compiled row (`compile`).
"""
import copy
import gc
import time

import torch

from . import model_specs as M
from . import timing

BACKENDS = ("eager", "eager-channels-last", "compile", "fastnets", "fastnets-compile")
COMPILED = ("compile", "fastnets-compile")
# torch._inductor.config per mode for the compiled backends: inductor's freezing for inference (parameters as
# constants: BatchNorm folded into the convolutions, oneDNN weights prepacked on a CPU), defaults for training
COMPILE_CONFIG = {"infer": {"freezing": True}, "train": {}}


def compile_setting(mode):
    """How the compiled backends of `mode` are compiled (recorded in the rows and the block)."""
    cfg = COMPILE_CONFIG.get(mode, {})
    return {"backend": "inductor", "mode": "default", "inductor_config": dict(cfg),
            "label": "inductor, freezing" if cfg.get("freezing") else "inductor, defaults"}


def compile_config(mode):
    """The context a compiled `mode` measurement runs in (tracing, warm-up and timing): torch._inductor.config
    patched with COMPILE_CONFIG[mode]. Dynamo reads `freezing` when it traces, so torch.compile(options=
    {"freezing": True}) alone leaves the parameters as graph inputs and folds nothing."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(**COMPILE_CONFIG.get(mode, {}))


class UnknownBackendError(ValueError):
    pass


def check_backends(names):
    bad = [n for n in names if n not in BACKENDS]
    if bad:
        raise UnknownBackendError(f"unknown backend(s) {', '.join(map(repr, bad))}; valid backends: {', '.join(BACKENDS)}")
    return names


def memory_format(backend, device, fastnets_layout):
    if backend in ("eager-channels-last", "compile"):
        return torch.channels_last
    if backend.startswith("fastnets"):
        return torch.channels_last if fastnets_layout == "channels_last" else torch.contiguous_format
    return torch.contiguous_format


def prepare(backend, eager, fast, device, fastnets_layout):
    """A fresh copy of the model for `backend` on `device`, in its memory format, compiled if asked."""
    base = fast if backend.startswith("fastnets") else eager
    if base is None:
        raise M.FastnetsUnavailable("no fastnets model")
    fmt = memory_format(backend, device, fastnets_layout)
    model = copy.deepcopy(base).to(device=device, memory_format=fmt)
    if backend in COMPILED:
        model = torch.compile(model)
    return model, fmt


def is_oom(e):
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def measure(name, backend, mode, eager, fast, *, device, precision, batch_size, warmup, iters, repeats,
            fastnets_layout="channels_last"):
    """One row: images/s of `mode` ("train" or "infer") for model `name` under `backend`."""
    import fastnets

    row = {"model": name, "backend": backend, "mode": mode, "batch_size": batch_size, "precision": precision,
           "device": str(device), "status": "ok", "warmup": warmup, "iters": iters, "repeats": repeats}
    if backend in COMPILED:
        row["compile"] = compile_setting(mode)
    if backend.startswith("fastnets") and fast is None:
        row.update(status="unavailable")
        return row
    model = None
    t0 = time.perf_counter()
    try:
        with fastnets.use_backend("auto"), compile_config(mode):
            model, fmt = prepare(backend, eager, fast, device, fastnets_layout)
            row["memory_format"] = "channels_last" if fmt == torch.channels_last else "contiguous"
            x, y = M.example_batch(name, batch_size, device)
            x = x.contiguous(memory_format=fmt)
            if mode == "train":
                model.train()
                fn = timing.train_step_fn(model, x, y, device, precision)
            else:
                model.eval()
                fn = timing.infer_step_fn(model, x, device, precision)
            times = timing.time_iterations(fn, device, warmup, iters, repeats)
        row.update(timing.summarize(times, batch_size))
        if torch.device(device).type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except Exception as e:  # noqa: BLE001 - a failure of one model/backend must not stop the run
        if is_oom(e):
            row.update(status="oom", reason=f"batch size {batch_size} does not fit in memory for {name} "
                       f"({backend}, {mode}): {str(e).splitlines()[0][:200]}")
        else:
            row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    finally:
        del model
        free_memory(device)
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    row["wall_s"] = time.perf_counter() - t0
    return row
