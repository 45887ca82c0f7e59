"""Drop-in replacements for torch.nn.BatchNorm1d/2d, BatchNormReLU2d (BatchNorm + residual add + ReLU) and
BatchNormAct2d (BatchNorm + residual add + any fused activation of fastnets.activations).

They subclass torch's BatchNorm classes, so constructor arguments, attributes, state_dict keys (including
`num_batches_tracked`), loading of torch state_dicts and `repr` are torch's own; only `forward` runs the
fastnets ops.
"""
from torch import nn

from .. import _checks, activations
from ..ops.batch_norm import batch_norm


def batch_stats_args(bn):
    """What torch's _BatchNorm.forward passes to F.batch_norm, for a torch BatchNorm module `bn`:
    (running_mean, running_var, use_batch_stats, momentum factor). In training it counts the batch in
    num_batches_tracked, and momentum=None means a cumulative average over the batches seen: the factor is
    then 1 / num_batches_tracked as a 0-d device tensor (torch reads it on the host, a sync every batch)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / bn.num_batches_tracked.double()
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not bn.training or bn.track_running_stats
    return (
        bn.running_mean if keep_running else None,
        bn.running_var if keep_running else None,
        use_batch_stats,
        factor,
    )


def bn_act(bn, x, residual=None, relu=False, act=None):
    """act(bn(x) [+ residual]) for a torch BatchNorm module `bn` (any _BatchNorm), exactly as its own
    forward would update its running statistics, on fastnets' op. `act` is any activation
    fastnets.activations.canonical accepts (it wins over `relu`; without it, relu or identity). Models
    whose state_dict must stay torchvision's call this with their own `bn1`-style attributes."""
    act = activations.resolve(act, relu)
    if getattr(bn, "sync_statistics", None) is not None and bn.sync_statistics():  # fastnets.nn.SyncBatchNorm
        return bn.sync_forward(x, residual=residual, act=act)  # (a rank may hold an empty batch, as in torch)
    if x.numel() == 0:  # the modules reject what the functional batch_norm passes through as torch does
        raise ValueError(f"input must be non-empty, got shape {tuple(x.shape)}")
    running_mean, running_var, use_batch_stats, factor = batch_stats_args(bn)
    return batch_norm(
        x, running_mean, running_var, bn.weight, bn.bias, use_batch_stats, factor, bn.eps,
        residual=residual, act=act,
    )


def _check_channels(bn, x, ndims):
    _checks.check_float(x, "input")
    _checks.check_ndim(x, "input", ndims)
    if x.shape[1] != bn.num_features:
        raise ValueError(
            f"input has {x.shape[1]} channels (dim 1 of shape {tuple(x.shape)}) but {type(bn).__name__} "
            f"expects num_features={bn.num_features}"
        )


class BatchNorm1d(nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on fastnets kernels: input (N, C) or (N, C, L)."""

    def forward(self, input):
        _check_channels(self, input, (2, 3))
        return bn_act(self, input)


class BatchNorm2d(nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on fastnets kernels: input (N, C, H, W), NCHW or channels_last."""

    def forward(self, input):
        _check_channels(self, input, (4,))
        return bn_act(self, input)


class BatchNormReLU2d(nn.modules.batchnorm._BatchNorm):
    """relu(batch_norm(x) [+ residual]) in one fused pass. Its state_dict is a BatchNorm2d's, so torchvision
    and timm BatchNorm weights load unchanged."""

    def forward(self, input, residual=None):
        _check_channels(self, input, (4,))
        return bn_act(self, input, residual=residual, relu=True)

    def _check_input_dim(self, input):
        _checks.check_ndim(input, "input", (4,))


class BatchNormAct2d(nn.modules.batchnorm._BatchNorm):
    """act(batch_norm(x) [+ residual]) in one fused pass each way, for any activation of
    fastnets.activations (`act`: a name, a (name, param) pair, an nn.Module such as nn.SiLU() or
    nn.LeakyReLU(0.2), or a torch function). Its state_dict is a BatchNorm2d's (timm's BatchNormAct2d
    has the same keys)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, act="relu",
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.act_name, self.act_param = activations.canonical(act, "act")

    def forward(self, input, residual=None):
        _check_channels(self, input, (4,))
        return bn_act(self, input, residual=residual, act=(self.act_name, self.act_param))

    def _check_input_dim(self, input):
        _checks.check_ndim(input, "input", (4,))

    def extra_repr(self):
        act = self.act_name if self.act_name != "leaky_relu" else f"leaky_relu({self.act_param})"
        return super().extra_repr() + f", act={act}"
