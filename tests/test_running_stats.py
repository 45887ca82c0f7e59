"""Running statistics and num_batches_tracked of fastnets' BatchNorm modules, step by step against
torch.nn.BatchNorm in float64: momentum 0.3 and None (the cumulative average), eps large enough to matter,
buffers that start far from the batch statistics, buffers in the activation dtype (bfloat16: torch's
update in another dtype than the statistics), and track_running_stats=False in eval (batch statistics).
These tests kill tests/mutation.py's running-statistics mutants (docs/testing.md, "Mutation check")."""
import copy

import pytest
import torch
from torch import nn

import fastnets

from conftest import GPU, assert_rel, backends_here

DEV = "cuda" if GPU else "cpu"
BACKENDS = backends_here("batch_norm")
EPS = 0.05

# fastnets module -> (torch module it replaces, input shape, applies ReLU)
MODULES = {
    "BatchNorm2d": (nn.BatchNorm2d, (3, 5, 4, 7), False),
    "BatchNormReLU2d": (nn.BatchNorm2d, (2, 6, 3, 5), True),
    "BatchNorm1d": (nn.BatchNorm1d, (9, 4, 5), False),
}


def _batch(shape, step):
    """Channels with different means and spreads, a different batch every step."""
    g = torch.Generator().manual_seed(100 + step)
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    return (torch.randn(shape, generator=g) * (torch.rand(c, generator=g) + 0.2).view(view)
            + torch.linspace(-3, 5, c).view(view) + step)


def _far_buffers(*modules, c, seed=7):
    g = torch.Generator().manual_seed(seed)
    rm, rv = torch.randn(c, generator=g) * 3, torch.rand(c, generator=g) * 4 + 2
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    with torch.no_grad():
        for m in modules:
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
            m.weight.copy_(w)
            m.bias.copy_(b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("momentum", [0.3, None], ids=["m0.3", "cumulative"])
def test_running_stats_follow_torch(backend, name, momentum):
    torch_cls, shape, relu = MODULES[name]
    c = shape[1]
    ours = getattr(fastnets.nn, name)(c, eps=EPS, momentum=momentum)
    truth = torch_cls(c, eps=EPS, momentum=momentum).double()
    _far_buffers(ours, truth, c=c)
    ours = ours.to(DEV)
    with fastnets.use_backend(backend):
        for step in range(3):
            x = _batch(shape, step)
            y = ours(x.to(DEV))
            y64 = truth(x.double())
            y64 = torch.relu(y64) if relu else y64
            assert_rel(y, y64, msg=f"step {step}: y")
            assert_rel(ours.running_mean, truth.running_mean, msg=f"step {step}: running_mean")
            assert_rel(ours.running_var, truth.running_var, msg=f"step {step}: running_var")
            assert int(ours.num_batches_tracked) == int(truth.num_batches_tracked) == step + 1
        ours.eval(), truth.eval()
        x = _batch(shape, 9)
        y64 = truth(x.double())
        assert_rel(ours(x.to(DEV)), torch.relu(y64) if relu else y64, msg="eval y")
    assert int(ours.num_batches_tracked) == 3  # eval does not count


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
def test_running_stats_in_bfloat16_buffers(backend, cl):
    """A module converted to bfloat16 keeps bfloat16 buffers; the statistics are fp32: the update is
    computed in fp32 and rounded once into the buffer, as torch does."""
    shape, c, momentum = (4, 6, 5, 3), 6, 0.3
    ours = fastnets.nn.BatchNorm2d(c, eps=EPS, momentum=momentum)
    _far_buffers(ours, c=c)
    ours = ours.to(DEV, torch.bfloat16)
    rm = ours.running_mean.double().cpu()
    rv = ours.running_var.double().cpu()
    with fastnets.use_backend(backend):
        for step in range(2):
            x = _batch(shape, step).to(torch.bfloat16)
            xd = x.to(DEV)
            if cl:
                xd = xd.contiguous(memory_format=torch.channels_last)
            ours(xd)
            x64 = x.double()
            m = x64.mean((0, 2, 3))
            v = x64.var((0, 2, 3), unbiased=True)
            rm = (1 - momentum) * rm + momentum * m
            rv = (1 - momentum) * rv + momentum * v
            assert_rel(ours.running_mean, rm, msg=f"step {step}: running_mean")
            assert_rel(ours.running_var, rv, msg=f"step {step}: running_var")
            rm, rv = ours.running_mean.double().cpu(), ours.running_var.double().cpu()  # rounded, as stored


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_running_stats_uses_batch_statistics_in_eval(backend):
    ours = fastnets.nn.BatchNorm2d(5, eps=EPS, track_running_stats=False)
    truth = copy.deepcopy(nn.BatchNorm2d(5, eps=EPS, track_running_stats=False)).double()
    with torch.no_grad():
        ours.weight.copy_(torch.linspace(0.5, 1.5, 5))
        truth.weight.copy_(torch.linspace(0.5, 1.5, 5))
    ours, truth = ours.to(DEV).eval(), truth.eval()
    x = _batch((3, 5, 4, 6), 0)
    with fastnets.use_backend(backend):
        assert_rel(ours(x.to(DEV)), truth(x.double()))
    assert ours.running_mean is None and ours.num_batches_tracked is None
