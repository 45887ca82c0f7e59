"""Trained accuracy on real data: the same model trained with eager PyTorch and with fastnets from the same
seed (same initial weights), the same data order, the same augmentation and the same budget.

Augmentation (CIFAR-10): torchvision transforms v2 on GPU tensors, per image, a random 32x32 crop of the
image padded by 4 and a random horizontal flip; each epoch's augmented copy is made once from a seeded RNG
and used by every model and backend, so all runs see identical data; its time is reported apart from the
training time. `--train-augment fastnets`: the same crop and flip drawn per batch on the device by
fastnets.augment (counted in the training time); `none`: no augmentation. MNIST (LeNet-5) is not augmented. Optimizer: SGD, Nesterov momentum 0.9, weight decay 5e-4,
peak learning rate 0.1 x batch/256 (CIFAR-10) or 0.1 (MNIST), linear warm-up over the first 15% of steps then linear decay to 0.
Training time counts the training steps only (synchronised at the end of each epoch); one-time warm-up
(kernel compilation, autotuning, torch.compile) is run on a throwaway copy first and reported apart; test
evaluations after each epoch are not counted.
"""
import copy
import time

import torch
from torchvision.transforms import v2

from . import model_specs as M
from . import timing
from .progress import progress_bar
from .throughput import free_memory, is_oom, memory_format


AUGMENT_MODES = ("v2", "fastnets", "none")
AUGMENT_LABELS = {
    "v2": "random crop 32 (pad 4) + horizontal flip, torchvision v2, per image",
    "fastnets": "random crop 32 (pad 4) + horizontal flip, fastnets.augment, per batch on the device",
    "none": "none",
}


class AugmentedEpochs:
    """The training images of each epoch, on `device`. augment="v2" (or True): augmented once per epoch from
    seed (seed, epoch) with torchvision v2, image by image; "fastnets": the same crop and flip drawn per batch
    on the device by fastnets.augment (one fused call that also normalises; its generator restarts from
    (seed, epoch) each epoch, so every backend sees the same images); "none" (or False): not augmented."""

    def __init__(self, dataset, device, seed, augment, show_progress=True):
        if augment is True or augment is False:
            augment = "v2" if augment else "none"
        if augment not in AUGMENT_MODES:
            raise ValueError(f"augment must be one of {AUGMENT_MODES} (or a bool), got {augment!r}")
        self.ds, self.device, self.seed, self.mode = dataset, device, seed, augment
        self.augment = augment != "none"
        self.show_progress = show_progress
        self._fused, self._gen = {}, None
        x = dataset.train.x.to(device)
        if x.shape[-1] == 28:  # MNIST -> LeNet-5's 32x32
            x = v2.Pad(2)(x)
        self.x = x
        self.y = dataset.train.y.to(device)
        self.cache = {}
        self.aug_s = 0.0

    def epoch(self, e):
        if self.mode == "fastnets":
            self._gen = torch.Generator(device=self.device).manual_seed(self.seed * 1000 + e)
        if self.mode != "v2":
            return self.x
        if e not in self.cache:
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1000 + e)
                padded = v2.Pad(4)(self.x)
                crop, flip = v2.RandomCrop(self.x.shape[-2:]), v2.RandomHorizontalFlip(0.5)
                out = torch.empty_like(self.x)
                n, chunk = len(self.x), 1024
                bar = progress_bar(range(0, n, chunk), desc=f"augment epoch {e + 1}", disable=not self.show_progress)
                for i in bar:
                    out[i:i + chunk] = torch.stack([flip(crop(im)) for im in padded[i:i + chunk]])
            if torch.device(self.device).type == "cuda":
                torch.cuda.synchronize(self.device)
            self.aug_s += time.perf_counter() - t0
            self.cache[e] = out
        return self.cache[e]

    def order(self, e):
        g = torch.Generator().manual_seed(self.seed * 1000 + e)
        return torch.randperm(len(self.y), generator=g).to(self.device)

    def batch(self, x_u8, mean, std, fmt):
        """A training batch: uint8 images -> the model's normalised float input (augmented per batch in
        "fastnets" mode; the time counts as training time, as it would in a real training loop)."""
        if self.mode != "fastnets":
            return normalize(x_u8, mean, std).contiguous(memory_format=fmt)
        key = (tuple(mean), tuple(std), fmt)
        if key not in self._fused:
            import fastnets.augment as A

            self._fused[key] = A.Augment([A.RandomCrop(tuple(x_u8.shape[-2:]), padding=4), A.RandomHorizontalFlip(),
                                          A.Normalize(list(mean), list(std))], memory_format=fmt)
        if self._gen is None:
            self._gen = torch.Generator(device=self.device).manual_seed(self.seed * 1000)
        return self._fused[key](x_u8, generator=self._gen)


def _test_input(dataset, device):
    x = dataset.test.x.to(device)
    if x.shape[-1] == 28:
        x = v2.Pad(2)(x)
    return x, dataset.test.y.to(device)


def normalize(x_u8, mean, std):
    return v2.Normalize(list(mean), list(std))(v2.ToDtype(torch.float32, scale=True)(x_u8))


@torch.no_grad()
def evaluate(model, x_u8, y, mean, std, fmt, device, precision, batch_size=1000):
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        x = normalize(x_u8[i:i + batch_size], mean, std).contiguous(memory_format=fmt)
        with timing.autocast(device, precision):
            out = model(x)
        correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
    return correct / len(y)


def build_for_backend(name, backend, seed, fastnets_layout, device):
    """The model for `backend` initialised from `seed` (fastnets: the eager model's weights), on `device`."""
    torch.manual_seed(seed)
    model = M.build_eager(name)
    if backend.startswith("fastnets"):
        model = M.build_fastnets(name, like=model)
    fmt = memory_format(backend, device, fastnets_layout)
    model = model.to(device=device, memory_format=fmt)
    return model, fmt


def train_run(name, backend, data, dataset, *, device, precision, epochs, batch_size, seed,
              fastnets_layout="channels_last", base_lr=0.1, show_progress=True, build=None):
    """Train model `name` with `backend`; return a result row (test accuracy, training time, history).
    `build(seed, device)` -> (model, memory format): a model that is not in the registry (named `name`)."""
    import fastnets

    row = {"model": name, "dataset": dataset.name, "data_source": dataset.source, "backend": backend,
           "epochs": epochs, "batch_size": batch_size, "precision": precision, "seed": seed, "device": str(device),
           "augmentation": AUGMENT_LABELS[data.mode],
           "status": "ok"}
    model = None
    try:
        with fastnets.use_backend("auto"):
            if build is None:
                model, fmt = build_for_backend(name, backend, seed, fastnets_layout, device)
            else:
                model, fmt = build(seed, device)
            if backend.endswith("compile"):
                model = torch.compile(model)
            n = len(data.y)
            steps_per_epoch = n // batch_size
            if steps_per_epoch < 1:
                raise ValueError(f"batch size {batch_size} exceeds the {n} training images")
            total = steps_per_epoch * epochs
            # CIFAR-10: the linear scaling rule from 0.1 at batch 256; MNIST (LeNet-5): 0.1 at any batch
            lr = base_lr * batch_size / 256 if dataset.name == "cifar10" else base_lr
            mean, std = dataset.mean, dataset.std
            test_x, test_y = _test_input(dataset, device)

            def make_opt(m):
                opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
                warm = max(1, int(0.15 * total))
                sched = torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
                return opt, sched

            def step(m, opt, sched, x, y):
                with timing.autocast(device, precision):
                    out = m(x)
                loss = timing.loss_fn(out, y)
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                return loss

            # warm-up on a throwaway copy: kernel compilation, autotuning, torch.compile
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                w = copy.deepcopy(model)
                wopt, wsched = make_opt(w)
                xb = normalize(data.x[:batch_size], mean, std).contiguous(memory_format=fmt)
                for _ in range(2):
                    step(w, wopt, wsched, xb, data.y[:batch_size])
                evaluate(w, test_x, test_y, mean, std, fmt, device, precision)
                del w, wopt, wsched
                timing.synchronize(device)
            row["warmup_s"] = time.perf_counter() - t0

            torch.manual_seed(seed + 1)  # dropout masks: the same for every backend
            opt, sched = make_opt(model)
            train_s, history, last_loss = 0.0, [], None
            for e in range(epochs):
                xs, order = data.epoch(e), data.order(e)
                model.train()
                timing.synchronize(device)
                t0 = time.perf_counter()
                bar = progress_bar(range(steps_per_epoch), desc=f"{name} {backend} epoch {e + 1}/{epochs}",
                                   disable=not show_progress, leave=False)
                for i in bar:
                    idx = order[i * batch_size:(i + 1) * batch_size]
                    x = data.batch(xs[idx], mean, std, fmt)
                    last_loss = step(model, opt, sched, x, data.y[idx]).detach()
                timing.synchronize(device)
                train_s += time.perf_counter() - t0
                acc = evaluate(model, test_x, test_y, mean, std, fmt, device, precision)
                history.append({"epoch": e + 1, "train_s": train_s, "test_accuracy": acc,
                                "last_loss": float(last_loss)})
            row.update(steps=total, lr_peak=lr, train_s=train_s, test_accuracy=history[-1]["test_accuracy"],
                       final_loss=history[-1]["last_loss"], history=history, train_images=n,
                       test_images=int(len(test_y)))
            row["_model"] = getattr(model, "_orig_mod", model)  # kept for the fidelity check; not serialised
    except Exception as ex:  # noqa: BLE001 - one failed run must not stop the others
        row.update(status="oom" if is_oom(ex) else "error",
                   reason=(f"batch size {batch_size} does not fit in memory: " if is_oom(ex) else "")
                   + f"{type(ex).__name__}: {str(ex).splitlines()[0][:300] if str(ex) else ''}")
    finally:
        model = None
        free_memory(device)
    return row
