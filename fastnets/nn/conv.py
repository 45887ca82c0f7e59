"""Drop-in torch.nn.Conv2d, the fused Conv -> BatchNorm -> [add] -> [ReLU] block, and `conv_bn_act`.

`Conv2d` subclasses torch.nn.Conv2d (same arguments, attributes, state_dict keys, repr); its forward runs
fastnets' convolution where fastnets has one (groups=1, zero padding, symmetric) and torch's (cuDNN)
otherwise: grouped and depthwise convolutions, padding_mode other than 'zeros', asymmetric 'same' padding.

`conv_bn_act(conv, bn, x, residual=None, relu=True, act=None)` runs act(bn(conv(x)) [+ residual]) for any
torch.nn.Conv2d / BatchNorm2d pair (the model zoo calls it with torchvision's conv1/bn1 attributes), with
torch's BatchNorm semantics: batch statistics in training (running statistics and num_batches_tracked
updated exactly as torch does, momentum=None meaning a cumulative average), running statistics in eval.
With bn=None it is act(conv(x) [+ residual]) with the conv's bias and the activation in its epilogue
(VGG / AlexNet / SqueezeNet). `act` is any activation of fastnets.activations and wins over `relu`.
"""
from torch import nn

from .. import _checks, activations
from ..backends import current_backend
from ..ops import _native_cpu, _native_fast
from ..ops.conv import conv2d, conv2d_batch_norm
from .batch_norm import batch_stats_args, bn_act


def _fastnets_padding(conv):
    """The symmetric (ph, pw) padding fastnets runs for `conv`, or None when only torch can run it."""
    if conv.groups != 1:
        return None
    return _zero_padding(conv)


def _zero_padding(conv):
    """The symmetric (ph, pw) zero padding of `conv` (any groups), or None (other padding modes, 'same' with
    an odd total)."""
    if conv.padding_mode != "zeros" or len(conv.kernel_size) != 2:
        return None
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            return None  # torch pads the extra row/column on one side only
        return (total[0] // 2, total[1] // 2)
    return tuple(conv.padding)


class Conv2d(nn.Conv2d):
    """torch.nn.Conv2d on fastnets kernels (NCHW or channels_last input)."""

    def forward(self, input):
        if _native_fast.fast_auto(input) and input.numel():
            # auto on a CPU tensor: torch.nn.Conv2d's own call, nothing in front of it (as fast as eager)
            try:
                return self._conv_forward(input, self.weight, self.bias)
            except RuntimeError:
                pass  # torch rejected the input: fastnets' checks below name the bad argument
        padding = _fastnets_padding(self)
        if padding is None:
            return super().forward(input)
        return conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation)


def _check_pair(conv, bn):
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
    if bn is None:
        return
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"bn must be a torch.nn BatchNorm module, got {type(bn).__name__}")
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"bn has num_features={bn.num_features} but conv has out_channels={conv.out_channels}; they must match"
        )


def conv_bn_act(conv, bn, x, residual=None, relu=True, act=None):
    """act(bn(conv(x)) [+ residual]) on fused fastnets kernels, for a torch.nn.Conv2d `conv` and a
    BatchNorm2d `bn` (any module subclassing them; their parameters and buffers are used as they are), or
    act(conv(x) [+ residual]) when bn is None. `act`: any activation of fastnets.activations (wins over
    `relu`; without it relu=True means relu).

    Training (bn.training): the convolution produces the batch statistics in its epilogue, the fused BN
    kernel normalizes, adds and applies ReLU; running statistics are updated as torch updates them.
    Eval: the BatchNorm is folded into the convolution's epilogue (weights are not modified; gradients
    still flow to x, conv.weight, bn.weight, bn.bias and the residual)."""
    _check_pair(conv, bn)
    act = activations.resolve(act, relu)
    padding = _fastnets_padding(conv)
    if bn is None:
        if padding is None:  # grouped, non-zero padding modes: torch's convolution, fastnets' epilogue
            return _torch_epilogue(conv(x), residual, act)
        return conv2d(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, residual=residual, act=act)
    synced = getattr(bn, "sync_statistics", None) is not None and bn.sync_statistics()
    if padding is None and not synced and _native_grouped_eval(conv, bn, x):
        # grouped / depthwise in eval on the CPU: the BatchNorm folded into one oneDNN convolution as well
        return conv2d_batch_norm(x, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                 training=False, eps=bn.eps, stride=conv.stride, padding=_zero_padding(conv),
                                 dilation=conv.dilation, residual=residual, act=act, cache_owner=conv,
                                 groups=conv.groups)
    if padding is None or synced:
        return bn_act(bn, conv(x), residual=residual, act=act)  # (SyncBatchNorm: statistics across ranks)
    running_mean, running_var, use_batch_stats, factor = batch_stats_args(bn)
    return conv2d_batch_norm(
        x, conv.weight, conv.bias, running_mean, running_var, bn.weight, bn.bias,
        training=use_batch_stats,
        momentum=factor,
        eps=bn.eps,
        stride=conv.stride,
        padding=padding,
        dilation=conv.dilation,
        residual=residual,
        act=act,
        cache_owner=conv,
    )


def _native_grouped_eval(conv, bn, x):
    """A grouped convolution with zero padding before an eval-mode BatchNorm with running statistics, on the
    native backend: what conv2d_batch_norm folds (groups > 1 runs nowhere else)."""
    return (conv.groups != 1 and not bn.training and bn.running_mean is not None and bn.running_var is not None
            and _zero_padding(conv) is not None and _native_cpu.active(current_backend(), x))


def _torch_epilogue(y, residual, act):
    if residual is not None:
        y = y + residual
    return activations.forward(y, *act)


class ConvBNReLU2d(nn.Module):
    """nn.Sequential(Conv2d, BatchNorm2d, ReLU) as one fused block, with an optional residual added before the
    ReLU: forward(x, residual=None) = relu(bn(conv(x)) [+ residual]). Submodules `conv` and `bn`, so the
    state_dict keys are conv.weight[, conv.bias], bn.weight, bn.bias, bn.running_mean, bn.running_var,
    bn.num_batches_tracked, and torch checkpoints of the Sequential load after renaming 0. -> conv., 1. -> bn."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=False,
                 eps=1e-5, momentum=0.1, relu=True, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.conv = Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                           dilation=dilation, bias=bias, **kw)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **kw)
        self.relu = bool(relu)

    def forward(self, x, residual=None):
        _checks.check_float(x, "input")
        _checks.check_ndim(x, "input", (3, 4))
        return conv_bn_act(self.conv, self.bn, x, residual=residual, relu=self.relu)

    def extra_repr(self):
        return f"relu={self.relu}"
