"""FLOPs per image counted by torch.utils.flop_counter.FlopCounterMode.

FlopCounterMode counts matrix products and convolutions (forward and backward) as 2 x multiply-adds, so
these are FLOPs, not MACs; element-wise work (BatchNorm, ReLU, pooling, additions) is not counted, as in
the published GFLOPs/GMACs tables. The model is built on the `meta` device, so nothing is computed.
FLOPs are counted on the eager model: the architecture's FLOPs are the same for every backend, and
FlopCounterMode only counts operators it has formulas for (fastnets' custom ops have none registered).
"""
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from . import model_specs as M


def count_flops(model, x, target=None, train=False):
    """FLOPs of one forward (train=False) or one forward + backward (train=True) of `model` on `x`."""
    counter = FlopCounterMode(display=False)
    if train:
        model.train()
        with counter:
            out = model(x)
            loss = F.cross_entropy(out, target)
            loss.backward()
    else:
        model.eval()
        with counter, torch.no_grad():
            model(x)
    return counter.get_total_flops()


def model_flops(name, batch_size=1):
    """{"params", "forward_flops", "train_flops"} per image for model `name`, counted on the meta device."""
    with torch.device("meta"):
        model = M.build_eager(name)
        x, y = M.example_batch(name, batch_size, "meta")
    params = M.count_params(model)
    fwd = count_flops(model, x)
    x = x.detach().requires_grad_(False)
    train = count_flops(model, x, y, train=True)
    return {"params": params, "forward_flops": fwd / batch_size, "train_flops": train / batch_size}
