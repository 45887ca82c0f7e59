"""Throughput measurement: warm-up excluded, each repeat timed with CUDA events on a GPU (or a
synchronised perf_counter on the CPU), the median of the repeats reported."""
import statistics
import time

import torch
import torch.nn.functional as F


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(fn, device, warmup, iters, repeats):
    """Run `fn` `warmup` times untimed, then `repeats` times `iters` runs; return the per-iteration seconds
    of each repeat."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    cuda = torch.device(device).type == "cuda"
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) / iters)
    return times


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
