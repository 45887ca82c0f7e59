"""Memory of a training step: the bytes of every tensor saved for backward in one training forward (exact on
any device: a torch.autograd.graph.saved_tensors_hooks count, each storage once), per image; and on a GPU the
peak memory of a whole step (torch.cuda.max_memory_allocated) and the largest batch that fits.

Saved bytes. Every tensor autograd saves passes through the pack hook; it is counted by its storage
(untyped_storage: data_ptr, nbytes), so a view, a tensor saved by two nodes (a ReLU output that the next
convolution saves too) and a parameter saved by every use count once, each with its whole storage. Storages
of the model's parameters and buffers are counted apart (`parameter_bytes`: they do not grow with the
batch). Per image is the difference of two batch sizes divided by their difference, so anything that does not
grow with the batch (parameters, casts or folds of weights, per-channel statistics) drops out exactly.
"""
import copy
import gc

import torch

MIB = 2 ** 20


class SavedTensorCounter:
    """Context manager: counts the storages of the tensors autograd saves inside it.

    `param_ptrs`: data_ptrs of storages to count as parameters (not per image). After the block:
    total_bytes, parameter_bytes, n_saved (pack calls) and n_storages (distinct storages)."""

    def __init__(self, param_ptrs=()):
        self.param_ptrs = set(param_ptrs)
        self.storages = {}  # (device, data_ptr) -> (nbytes, is_parameter); first sight wins
        self.keep = []  # the saved tensors stay alive (the graph holds them anyway): no address is reused
        self.n_saved = 0

    def _pack(self, t):
        self.n_saved += 1
        try:
            st = t.untyped_storage()
            key, nbytes = (str(t.device), st.data_ptr()), st.nbytes()
        except (RuntimeError, NotImplementedError):  # no storage (a wrapper subclass): its own bytes
            key, nbytes = ("id", id(t)), t.numel() * t.element_size()
        if nbytes and key not in self.storages:
            self.storages[key] = (nbytes, key[1] in self.param_ptrs)
            self.keep.append(t)
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self.keep = []
        return False

    @property
    def total_bytes(self):
        return sum(n for n, _ in self.storages.values())

    @property
    def parameter_bytes(self):
        return sum(n for n, p in self.storages.values() if p)

    @property
    def n_storages(self):
        return len(self.storages)


def _state_ptrs(model):
    return {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}


def _autocast(device, precision):
    from .timing import autocast

    return autocast(device, precision)


def saved_bytes(model, x, precision="fp32"):
    """Saved-for-backward bytes of one training forward of `model` on batch `x` (model.train()); the model's
    buffers (running statistics, num_batches_tracked) and training mode are restored afterwards, and the RNG
    is forked (dropout). Returns {"total_bytes", "parameter_bytes", "n_saved", "n_storages"}."""
    was_training = model.training
    buffers = [b.detach().clone() for b in model.buffers()]
    counter = SavedTensorCounter(_state_ptrs(model))
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            with counter, _autocast(x.device, precision):
                out = model(x)
            del out
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        model.train(was_training)
    return {"total_bytes": counter.total_bytes, "parameter_bytes": counter.parameter_bytes,
            "n_saved": counter.n_saved, "n_storages": counter.n_storages}


def per_image(model, make_batch, batch_size, precision="fp32"):
    """Saved bytes at `batch_size` and at half of it: {"batch_size", "total_bytes", "parameter_bytes",
    "per_image_bytes", "fixed_bytes"}; per image = the difference over the difference of batch sizes (exact
    when the saved bytes grow linearly with the batch, as a CNN's do), fixed = what does not grow with it."""
    small = max(2, batch_size // 2)  # BatchNorm in training needs more than one value per channel
    if small >= batch_size:
        batch_size = small + 2
    big = saved_bytes(model, make_batch(batch_size), precision)
    little = saved_bytes(model, make_batch(small), precision)
    per = (big["total_bytes"] - little["total_bytes"]) / (batch_size - small)
    return {"batch_size": batch_size, "total_bytes": big["total_bytes"], "parameter_bytes": big["parameter_bytes"],
            "per_image_bytes": per, "fixed_bytes": big["total_bytes"] - per * batch_size,
            "n_saved": big["n_saved"], "n_storages": big["n_storages"]}


# ------------------------------------------------------------------------------------------------ GPU


def _train_step(model, x, y, precision):
    from .timing import loss_fn

    with _autocast(x.device, precision):
        out = model(x)
    loss = loss_fn(out, y)
    loss.backward()
    for p in model.parameters():
        p.grad = None


def peak_step_bytes(model, make_batch, batch_size, precision, device):
    """torch.cuda.max_memory_allocated over one training step (forward, loss, backward) above what was
    allocated before it (the model, the batch). One warm-up step first (cuDNN workspaces, caches)."""
    x, y = make_batch(batch_size)
    model.train()
    _train_step(model, x, y, precision)
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    _train_step(model, x, y, precision)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, torch.cuda.max_memory_allocated(device)


def _fits(model, make_batch, batch_size, precision, device):
    from .throughput import free_memory, is_oom

    try:
        x, y = make_batch(batch_size)
        _train_step(model, x, y, precision)
        torch.cuda.synchronize(device)
        return True
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        return False
    finally:
        x = y = None
        for p in model.parameters():
            p.grad = None
        free_memory(device)


def largest_batch(model, make_batch, precision, device, start=8, limit=8192):
    """The largest batch size whose training step fits on the GPU (doubling from `start`, then bisecting; at
    most `limit`). GPU only: on a CPU nothing runs out of memory the same way."""
    if torch.device(device).type != "cuda":
        raise ValueError("largest_batch needs a CUDA device")
    lo, hi = 0, None
    b = start
    while b <= limit:
        if _fits(model, make_batch, b, precision, device):
            lo, b = b, b * 2
        else:
            hi = b
            break
    if hi is None:
        return lo  # fits at the limit
    while hi - lo > max(1, lo // 32):  # within ~3%
        mid = (lo + hi) // 2
        if _fits(model, make_batch, mid, precision, device):
            lo = mid
        else:
            hi = mid
    return lo


# ------------------------------------------------------------------------------------ models, report


VARIANTS = ("eager", "fastnets", "fastnets-convert")


def build_variant(variant, eager, fast):
    """A fresh copy: the eager model, fastnets.models' model with its weights, or fastnets.convert(eager)."""
    if variant == "eager":
        return copy.deepcopy(eager)
    if variant == "fastnets":
        return None if fast is None else copy.deepcopy(fast)
    if variant == "fastnets-convert":
        import fastnets

        return fastnets.convert(eager)  # converts a copy
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def measure_model(name, eager, fast, *, device, precision="fp32", batch_size=4, image_size=None,
                  variants=VARIANTS, find_largest=False, fastnets_layout="contiguous", backend="auto"):
    """Rows for report["memory"]: one per variant, saved bytes (total at `batch_size`, per image, parameters),
    and on a GPU the peak of a training step and (find_largest) the largest batch that fits. `backend`: the
    fastnets backend the fastnets variants run on (auto: native on a CPU)."""
    import fastnets

    from . import model_specs as M

    s = M.spec(name)
    size = image_size or s.image_size
    cuda = torch.device(device).type == "cuda"
    rows = []
    for variant in variants:
        row = {"model": name, "variant": variant, "device": str(device), "precision": precision,
               "image_size": size, "batch_size": batch_size, "backend": backend, "status": "ok"}
        fmt = (torch.channels_last if variant != "eager" and fastnets_layout == "channels_last"
               else torch.contiguous_format)
        row["memory_format"] = "channels_last" if fmt == torch.channels_last else "contiguous"

        def make_batch(b, _fmt=fmt):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(b, s.in_channels, size, size, generator=g).to(device).contiguous(memory_format=_fmt)
            if s.task == "segmentation":
                y = torch.randint(0, s.num_classes, (b, size, size), generator=g).to(device)
            else:
                y = torch.randint(0, s.num_classes, (b,), generator=g).to(device)
            return x, y

        model = None
        try:
            with fastnets.use_backend(backend):
                model = build_variant(variant, eager, fast)
                if model is None:
                    row.update(status="unavailable", reason="no fastnets model")
                    rows.append(row)
                    continue
                model = model.to(device=device, memory_format=fmt)
                r = per_image(model, lambda b: make_batch(b)[0], batch_size, precision)
                row.update(r)
                row["saved_mib"] = r["total_bytes"] / MIB
                row["saved_mib_per_image"] = r["per_image_bytes"] / MIB
                if cuda:
                    peak, absolute = peak_step_bytes(model, make_batch, batch_size, precision, device)
                    row["peak_step_mib"] = peak / MIB
                    row["peak_allocated_mib"] = absolute / MIB
                    if find_largest:
                        row["largest_batch"] = largest_batch(model, make_batch, precision, device)
        except Exception as e:  # noqa: BLE001 - one model's failure must not stop the run
            row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        finally:
            del model
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)
    eager_row = next((r for r in rows if r["variant"] == "eager" and r["status"] == "ok"), None)
    for r in rows:
        if eager_row is not None and r["status"] == "ok" and eager_row["per_image_bytes"]:
            r["per_image_vs_eager"] = r["per_image_bytes"] / eager_row["per_image_bytes"]
    return rows


def measure(report, settings, pairs, show_progress=False, models=None, budget=None):
    """The benchmark's memory phase: report["memory"] rows for `models` (default: the run's models), at the
    settings' precision, batch `settings["memory_batch"]` (default 4) and image size
    `settings["memory_image_size"]` (default: the model's), the largest batch on a GPU only. A model the
    time budget has no room for gets a row with status "skipped"."""
    from .progress import progress_bar

    names = list(models if models is not None else settings["models"])
    device = settings["device"]
    cuda = torch.device(device).type == "cuda"
    rows = report.setdefault("memory", [])
    for name in progress_bar(names, desc="memory", disable=not show_progress):
        if budget is not None and not budget.allows(60 if cuda else 20):
            rows.append({"model": name, "variant": "eager", "device": str(device), "status": "skipped",
                         "reason": f"time budget of {settings.get('time_budget_s')} s"})
            continue
        eager, fast, why = pairs.get(name)
        got = measure_model(name, eager, fast, device=device, precision=settings.get("precision", "fp32"),
                            batch_size=settings.get("memory_batch", 4),
                            image_size=settings.get("memory_image_size"),
                            find_largest=cuda and settings.get("memory_largest_batch", True),
                            fastnets_layout=settings.get("fastnets_layout", "contiguous"))
        for r in got:
            if r["status"] == "unavailable" and why:
                r["reason"] = why
        rows.extend(got)
    return rows


def markdown_table(rows):
    """The saved-bytes table (docs/ops-and-backends.md, results.md): saved MiB per image, eager against each fastnets variant."""
    by = {(r["model"], r["variant"]): r for r in rows if r["status"] == "ok"}
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["| model | input px | eager MiB/image | fastnets.models | ratio | fastnets.convert | ratio |",
             "|---|---|---|---|---|---|---|"]
    for m in models:
        e = by.get((m, "eager"))
        px = next((r["image_size"] for r in rows if r["model"] == m and r.get("image_size")), "-")
        cells = [m, str(px), f"{e['saved_mib_per_image']:.2f}" if e else "-"]
        for v in ("fastnets", "fastnets-convert"):
            r = by.get((m, v))
            cells += ([f"{r['saved_mib_per_image']:.2f}", f"{r.get('per_image_vs_eager', float('nan')):.2f}x"]
                      if r else ["-", "-"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_section(rows):
    """results.md's memory section: the saved-bytes table and, from a GPU run, peak MiB per step and the
    largest batch."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return []
    r0 = ok[0]
    lines = ["", f"Memory of a training step: bytes of every tensor saved for backward per image (exact "
             f"saved_tensors_hooks count, each storage once; {r0['precision']}, each model at its input size, batches "
             f"{r0['batch_size']} and {max(2, r0['batch_size'] // 2)}; fastnets backend {r0.get('backend')}).", "",
             markdown_table(ok)]
    gpu = [r for r in ok if "peak_step_mib" in r]
    if gpu:
        lines += ["", "| model | variant | peak MiB per step | largest batch |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['variant']} | {r['peak_step_mib']:.0f} (batch {r['batch_size']}) | "
                  f"{r.get('largest_batch', '-')} |" for r in gpu]
    bad = [r for r in rows if r.get("status") != "ok"]
    lines += [f"- {r['model']} {r.get('variant')}: {r['status']} ({r.get('reason')})" for r in bad]
    return lines


def main(argv=None):
    """`python -m fastnets.bench.memory [--models ...] [--batch 4] [--image-size 128]`: the table, and the
    rows as JSON with --json."""
    import argparse
    import json

    from . import model_specs as M

    p = argparse.ArgumentParser(prog="python -m fastnets.bench.memory")
    p.add_argument("--models", default="resnet50,se_resnet50,vgg16_bn,densenet121")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--backend", default="auto", help="fastnets backend (default auto: native on a CPU)")
    p.add_argument("--json")
    p.add_argument("--chart", help="write the memory chart (PNG) here")
    a = p.parse_args(argv)
    rows = []
    for name in a.models.split(","):
        eager, fast, _ = M.make_pair(name)
        rows += measure_model(name, eager, fast, device=a.device, precision=a.precision, batch_size=a.batch,
                              image_size=a.image_size, find_largest=False, backend=a.backend)
        for r in rows[-3:]:
            print(f"{name:14s} {r['variant']:17s} {r['status']:5s} "
                  + (f"total {r['saved_mib']:8.1f} MiB  per image {r['saved_mib_per_image']:7.2f} MiB  "
                     f"params {r['parameter_bytes'] / MIB:7.1f} MiB  x{r.get('per_image_vs_eager', 0):.3f}"
                     if r["status"] == "ok" else r.get("reason", "")), flush=True)
    print(markdown_table(rows))
    if a.chart:
        from .charts import memory_chart

        memory_chart({"memory": rows, "models": [{"name": n, "label": M.spec(n).label} for n in a.models.split(",")]},
                     a.chart)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
