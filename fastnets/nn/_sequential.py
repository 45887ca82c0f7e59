"""How a Sequential's children split into the runs its fused forwards replace (models/_common.FusedSequential,
nn/conv_chain.ChainedSequential): both must find the same runs, so they share this one scan."""
from torch import nn

_RELU = nn.ReLU()


def sequential_runs(seq, relu_after, is_conv, is_bn, is_relu):
    """The children of `seq` as runs (kind, modules, relu, after): kind "conv_bn" (Conv2d -> BatchNorm2d
    [-> ReLU]; relu says whether the ReLU is there), "bn_relu" (BatchNorm2d -> ReLU) or "single" (any other
    child); after is the child that follows the run, or None. `relu_after=True`: as if an nn.ReLU followed the
    last child. The runs are found at each call, so editing the Sequential keeps its forward right."""
    mods = list(seq._modules.values())
    if relu_after:
        mods.append(_RELU)
    i, n = 0, len(mods)
    while i < n:
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < n else None
        if is_conv(m) and nxt is not None and is_bn(nxt):
            relu = i + 2 < n and is_relu(mods[i + 2])
            kind, run = "conv_bn", (m, nxt)
            i += 3 if relu else 2
        elif is_bn(m) and nxt is not None and is_relu(nxt):
            kind, run, relu = "bn_relu", (m,), True
            i += 2
        else:
            kind, run, relu = "single", (m,), False
            i += 1
        yield kind, run, relu, mods[i] if i < n else None
