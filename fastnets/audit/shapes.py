"""The shape set: the layers of ResNet-50, SE-ResNet-50 and VGG-16 at batch 256 (224x224 images), read from
the models themselves (torchvision's, timm's SE-ResNet-50) by forward hooks on meta tensors, not typed in."""
import torch
from torch import nn

BATCH = 256


def _eager(net):
    if net == "se_resnet50":
        import timm

        return timm.create_model("seresnet50")
    import torchvision

    return getattr(torchvision.models, net)()


def layers(net, batch=BATCH, size=224):
    """[{kind: conv|bn|se, shape: (N, C, H, W), ...conv: cout, k, stride, pad; count}] in first-use order,
    identical layers merged (count)."""
    with torch.device("meta"):
        model = _eager(net)
    found = {}

    def hook(mod, inp, out):
        x = inp[0]
        if isinstance(mod, nn.Conv2d):
            key = ("conv", tuple(x.shape), mod.out_channels, mod.kernel_size[0], mod.stride[0], mod.padding[0])
        elif isinstance(mod, nn.BatchNorm2d):
            key = ("bn", tuple(x.shape))
        else:
            key = ("se", tuple(x.shape))
        found[key] = found.get(key, 0) + 1

    handles = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or type(m).__name__ == "SEModule":
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.empty(batch, 3, size, size, device="meta"))
    for h in handles:
        h.remove()
    out = []
    for key, count in found.items():
        d = {"kind": key[0], "shape": list(key[1]), "count": count}
        if key[0] == "conv":
            d.update(cout=key[2], k=key[3], stride=key[4], pad=key[5])
        out.append(d)
    return out


def bn_shapes(net="resnet50", batch=BATCH):
    """The distinct (N, C, H, W) a network's BatchNorms see."""
    return [tuple(d["shape"]) for d in layers(net, batch) if d["kind"] == "bn"]
