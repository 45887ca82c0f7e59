"""fastnets.convert must not fuse a pattern whose intermediate result has another user, nor rewrite a
forward that differs between train and eval mode: each model here is converted, then compared with the
original in float64 (reference backend) in training (outputs, gradients, running statistics) and in eval.
These tests kill tests/mutation.py's convert mutants (docs/testing.md, "Mutation check")."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnets

from conftest import assert_rel, randomize


@pytest.fixture(autouse=True)
def _reference_backend():
    with fastnets.use_backend("reference"):
        yield


class BNTwoUsers(nn.Module):
    """BatchNorm output used by the ReLU and again by the add: bn -> relu must not be fused."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(x)
        return F.relu(y) + y


class ConvTwoUsers(nn.Module):
    """Conv output used by the BatchNorm and again afterwards: conv -> bn must not be fused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        z = self.conv(x)
        return torch.relu(self.bn(z)) * z


class GateTwoUsers(nn.Module):
    """The squeeze-excite gate used by the multiply and again by the add: not a fusable SE."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Conv2d(4, 2, 1)
        self.fc2 = nn.Conv2d(2, 4, 1)

    def forward(self, x):
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * s + s


class ModeDependent(nn.Module):
    """A forward with an eval-only ReLU: a trace in one mode would freeze that mode's branch (and the eval
    trace, the last one taken, has a BN -> ReLU to fuse)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if self.training:
            return self.bn(x)
        return F.relu(self.bn(x))


MODELS = {"bn-two-users": BNTwoUsers, "conv-two-users": ConvTwoUsers, "gate-two-users": GateTwoUsers,
          "mode-dependent": ModeDependent}


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_keeps_what_the_model_computes(name):
    original = randomize(MODELS[name]()).double()
    converted = fastnets.convert(original)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64) + 0.5
    for mode in (True, False, True):
        original.train(mode), converted.train(mode)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = original(xa), converted(xb)
        assert_rel(yb, ya, msg=f"train={mode}: y")
        dy = torch.randn_like(ya) + 0.3
        ya.backward(dy), yb.backward(dy)
        assert_rel(xb.grad, xa.grad, msg=f"train={mode}: grad_x")
        pa, pb = dict(original.named_parameters()), dict(converted.named_parameters())
        for k in pa:
            assert_rel(pb[k].grad, pa[k].grad, msg=f"train={mode}: grad {k}")
            pa[k].grad = pb[k].grad = None
        sa, sb = original.state_dict(), converted.state_dict()
        assert list(sa) == list(sb)
        for k in sa:
            if sa[k].is_floating_point():
                assert_rel(sb[k], sa[k], msg=f"train={mode}: {k}")
            else:
                assert torch.equal(sb[k], sa[k]), k


def test_convert_reports_why_it_did_not_fuse():
    _, report = fastnets.convert(randomize(ConvTwoUsers()).double(), return_report=True)
    assert not report.fused["conv_bn_relu"] and not report.fused["conv_bn"]
    assert any("other users" in why for _, why in report.skipped), report
    _, report = fastnets.convert(randomize(BNTwoUsers()).double(), return_report=True)
    assert not report.fused["bn_relu"], report
    _, report = fastnets.convert(GateTwoUsers().double(), return_report=True)
    assert not any(report.fused[p] for p in ("se", "se_add", "se_add_relu")), report
    _, report = fastnets.convert(copy.deepcopy(ModeDependent()).double(), return_report=True)
    assert any("train and eval" in why for _, why in report.untraced), report
