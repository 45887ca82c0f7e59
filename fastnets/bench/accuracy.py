"""Fidelity: with the same weights, fastnets' logits against eager's on real images, in eval and train mode.

Metrics per (model, mode): max relative difference = max |fastnets - eager| / max |eager| over all logits;
max absolute difference; top-1 agreement = share of images (pixels for U-Net) where both pick the same
class; disagreements, near ties (images whose eager top-1/top-2 logit margin is within twice the median over
images of their largest logit difference, where a flip is rounding, not a bug) and disagreements outside near ties; and how many distinct
classes eager predicts (when random weights predict one class for every image, agreement says little).
"""
import copy

import torch
from torchvision.transforms import v2

from . import model_specs as M
from . import timing


def to_model_input(images_u8, spec, mean, std, device):
    """uint8 (N, C, H, W) images -> normalised float inputs of the model's channels and size."""
    x = images_u8.to(device)
    c = x.shape[1]
    if spec.in_channels == 1 and c == 3:
        x = v2.Grayscale(1)(x)
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    elif spec.in_channels == 3 and c == 1:
        x = x.expand(-1, 3, -1, -1)
        mean, std = mean * 3, std * 3
    size = spec.image_size
    if x.shape[-1] != size or x.shape[-2] != size:
        if spec.name == "lenet5" and x.shape[-1] == 28 and size == 32:
            x = v2.Pad(2)(x)
        else:
            x = v2.Resize((size, size), antialias=True)(x)
    x = v2.ToDtype(torch.float32, scale=True)(x)
    return v2.Normalize(list(mean), list(std))(x)


@torch.no_grad()
def calibrate_bn(model, batches):
    """Set BatchNorm running statistics to the exact averages over `batches` (random weights otherwise give
    meaningless eval-mode activations)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for x in batches:
        model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return len(bns)


@torch.no_grad()
def logits(model, batches, device, precision, train, seed):
    model.train(train)
    outs = []
    for i, x in enumerate(batches):
        torch.manual_seed(seed + i)  # the same dropout masks for both models in train mode
        with timing.autocast(device, precision):
            out = model(x)
        outs.append(out.float())
    return torch.cat(outs)


def compare(a, b):
    """Metrics of fastnets' logits `b` against eager's `a` (N, classes[, H, W])."""
    diff = (a - b).abs()
    scale = a.abs().max().clamp_min(1e-30)
    top_a, top_b = a.argmax(1), b.argmax(1)
    disagree = top_a != top_b
    if a.shape[1] > 1:
        # rounding noise: twice the median over images of each image's largest logit difference; a flip
        # where eager's top-1/top-2 margin is within it is a near tie, not a wrong result
        per_image = diff.flatten(2).amax(2) if diff.dim() > 2 else diff
        noise = 2 * torch.quantile(per_image.amax(1).double(), 0.5).float()
        top2 = a.topk(2, dim=1).values
        near_tie = (top2[:, 0] - top2[:, 1]) <= noise
    else:
        near_tie = torch.zeros_like(disagree)
    return {
        "max_rel_diff": float(diff.max() / scale),
        "max_abs_diff": float(diff.max()),
        "top1_agreement": float((~disagree).float().mean()),
        "disagreements": int(disagree.sum()),
        "near_ties": int(near_tie.sum()),
        "disagreements_not_near_tie": int((disagree & ~near_tie).sum()),
        "distinct_eager_top1": int(top_a.unique().numel()),
        "finite": bool(torch.isfinite(b).all()),
    }


def fidelity(name, eager, fast, images_u8, mean, std, *, device, precision, batch_size, weights, image_source,
             calibrate=True, fastnets_layout="channels_last", seed=0):
    """Rows for eval and train mode. `eager` and `fast` hold the same weights; if `calibrate`, BN statistics
    are first set from the images (on eager, then copied to fastnets)."""
    import fastnets

    from .throughput import memory_format

    spec = M.spec(name)
    rows = []
    base = {"model": name, "weights": weights, "images": int(len(images_u8)), "image_source": image_source,
            "precision": precision, "device": str(device)}
    if fast is None:
        return [dict(base, mode=m, status="unavailable") for m in ("eval", "train")]
    try:
        e = copy.deepcopy(eager).to(device)
        f = copy.deepcopy(fast).to(device, memory_format=memory_format("fastnets", device, fastnets_layout))
        batches = [to_model_input(images_u8[i:i + batch_size], spec, mean, std, device)
                   for i in range(0, len(images_u8), batch_size)]
        if calibrate:
            calibrate_bn(e, batches)
        M.copy_weights(e, f)
        fb = [x.contiguous(memory_format=memory_format("fastnets", device, fastnets_layout)) for x in batches]
        with fastnets.use_backend("auto"):
            for mode in ("eval", "train"):
                # train mode updates running statistics: compare from identical copies
                e2, f2 = (copy.deepcopy(e), copy.deepcopy(f)) if mode == "train" else (e, f)
                a = logits(e2, batches, device, precision, mode == "train", seed)
                b = logits(f2, fb, device, precision, mode == "train", seed)
                rows.append(dict(base, mode=mode, status="ok", **compare(a, b)))
    except Exception as ex:  # noqa: BLE001
        from .throughput import is_oom

        status = "oom" if is_oom(ex) else "error"
        done = {r["mode"] for r in rows}
        rows += [dict(base, mode=m, status=status, reason=f"{type(ex).__name__}: {str(ex)[:300]}")
                 for m in ("eval", "train") if m not in done]
    return rows
