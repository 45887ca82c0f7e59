"""Throughput measurement: warm-up excluded, each repeat timed with CUDA events on a GPU (or a
synchronised perf_counter on the CPU), the median of the repeats reported. The timer itself is
fastnets/_timing.py, shared with the kernel benchmarks and the conv family's `auto` policy."""
import statistics

import torch
import torch.nn.functional as F

from .._timing import synchronize, time_iterations  # noqa: F401  (train.py and throughput.py use them from here)


def autocast(device, precision):
    """The autocast context for `precision` ("bf16" autocast or "fp32")."""
    dev = torch.device(device).type
    if precision == "bf16":
        return torch.autocast(dev, dtype=torch.bfloat16)
    return torch.autocast(dev, enabled=False)


def loss_fn(out, y):
    return F.cross_entropy(out.float(), y)


def train_step_fn(model, x, y, device, precision, lr=1e-3):
    """One SGD training step (forward, loss, backward, optimizer step, zero_grad) as a closure. The learning
    rate is small so that the weights stay sane over the timed steps."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step():
        with autocast(device, precision):
            out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def infer_step_fn(model, x, device, precision):
    def step():
        with torch.no_grad(), autocast(device, precision):
            model(x)

    return step


def summarize(times, batch_size):
    med = statistics.median(times)
    return {
        "ms_per_iter": med * 1e3,
        "ms_per_iter_repeats": [t * 1e3 for t in times],
        "images_per_s": batch_size / med,
    }
