"""Chained Conv -> BN -> act -> Conv -> BN -> act ...: in training each BatchNorm's apply and activation move
into the NEXT convolution's prologue (fastnets.ops.conv_prologue.bn_act_conv2d), so y = act(bn(z)) is never
stored (one full-size tensor per layer less saved for backward; the MLPerf ResNet recipe). In eval every
Conv -> BN -> act runs as today's folded conv_bn_act (the BatchNorm folded into the convolution's epilogue).

The pieces work on torch's own modules (their parameters and buffers as they are, so torchvision state_dicts
load): a producer returns a `Deferred(z, scale, shift, act)`: "act(z * scale + shift), not computed yet",
with scale/shift computed by torch ops from z's batch statistics (so autograd flows through them, exactly
BatchNorm's training backward) and the running statistics updated in place as torch.nn.BatchNorm2d does
(momentum, unbiased variance, num_batches_tracked, momentum=None); a consumer convolution reads it in its
prologue. Every function also takes a plain tensor, and returns a plain tensor where deferring cannot apply
(eval mode with running statistics, SyncBatchNorm, unbatched input, a convolution fastnets cannot run), so a
chain degrades to the unfused computation, never to a different one.

  conv_bn_deferred(conv, bn, x, act)   Deferred of act(bn(conv(x)));  x: tensor or Deferred
  bn_deferred(bn, x, act)              Deferred of act(bn(x))  (pre-activation blocks: DenseNet)
  conv_bn_act_chained(conv, bn, x, residual, act)   act(bn(conv(x)) [+ residual]): the end of a chain
  conv_chained(conv, x)                conv(x) of a possibly Deferred x (DenseNet's conv2)
  max_pool_deferred(pool, x)           pool(act(bn(z))) saving z and the indices, not act(bn(z))
  materialize(x)                       the tensor of a Deferred (for any other consumer)
  ChainedSequential                    nn.Sequential whose forward chains its Conv/BN/ReLU runs (VGG)

What is saved for backward, per chained layer: z (the convolution's output, the BatchNorm's input, needed
by the BatchNorm backward and read again by the next prologue) and per-channel vectors; a block's input is
saved by its first convolution. That is the floor with ReLU: every BatchNorm's input and every block's input.
"""
from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import activations
from ..backends import current_backend
from ..ops import _native_cpu
from ..ops.batch_norm import update_running_stats
from ..ops.conv import _autocast
from ..ops.conv_prologue import bn_act_conv2d
from .._tensors import acc_dtype
from .batch_norm import batch_stats_args, bn_act
from ._sequential import sequential_runs
from .conv import _fastnets_padding, _zero_padding, conv_bn_act


class Deferred(NamedTuple):
    """act(z * scale[c] + shift[c]), not yet computed: what a chained BatchNorm hands to the next convolution.
    scale/shift are in the accumulation dtype and carry autograd through the batch statistics."""

    z: Tensor
    scale: Tensor
    shift: Tensor
    act: Tuple[str, float]


def _view(v):
    return v.view(1, -1, 1, 1)


def materialize(x):
    """The tensor act(z * scale + shift) of a Deferred (a plain tensor is returned as it is), with torch ops."""
    if not isinstance(x, Deferred):
        return x
    acc = acc_dtype(x.z)
    v = x.z.to(acc) * _view(x.scale) + _view(x.shift)
    return activations.forward(v, *x.act).to(x.z.dtype)


class _BatchStats(torch.autograd.Function):
    """(mean, var) of z per channel over N, H, W (var biased), computed elsewhere (a convolution's statistics
    epilogue) and passed in; the backward is their derivative with respect to z:
    dz = dmean / M + dvar * 2 (z - mean) / M. Saves z (which the next prologue saves anyway) and mean."""

    @staticmethod
    def forward(ctx, z, mean, var):
        ctx.save_for_backward(z, mean)
        return mean.clone(), var.clone()

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        z, mean = ctx.saved_tensors
        count = z.numel() // z.shape[1]
        acc = mean.dtype
        g = None
        if grad_var is not None:
            g = (z.to(acc) - _view(mean)) * _view(grad_var * (2.0 / count))
        if grad_mean is not None:
            g = _view(grad_mean / count) if g is None else g + _view(grad_mean / count)
        if g is None:
            return None, None, None
        return g.expand(z.shape).to(z.dtype), None, None


def _stats_of(z):
    """(mean, var) of z per channel, without autograd (what _BatchStats then differentiates)."""
    with torch.no_grad():
        var, mean = torch.var_mean(z.to(acc_dtype(z)), dim=(0, 2, 3), correction=0)
    return mean, var


def _uses_batch_stats(bn):
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _can_defer(bn, x):
    """Deferring needs batch statistics (training, or no running statistics) of a per-rank BatchNorm."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not _uses_batch_stats(bn):
        return False
    if getattr(bn, "sync_statistics", None) is not None and bn.sync_statistics():
        return False  # SyncBatchNorm: statistics across ranks, its own path
    z = x.z if isinstance(x, Deferred) else x
    if isinstance(z, Tensor) and _native_cpu.active(current_backend(), z):
        return False  # native CPU: torch's conv + F.batch_norm as eager (the prologue op is the reference there)
    return isinstance(z, Tensor) and z.dim() == 4 and z.numel() > 0


def _defer(bn, z, mean, var, act):
    """Deferred(z, scale, shift, act) from z's batch statistics (mean, biased var: non-differentiable
    inputs, made differentiable in z by _BatchStats), running statistics updated as torch does."""
    count = z.numel() // z.shape[1]
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(z.shape)}")
    running_mean, running_var, _, factor = batch_stats_args(bn)
    if running_mean is not None or running_var is not None:
        update_running_stats(running_mean, running_var, mean.detach(), var.detach(), factor, count)
    mean, var = _BatchStats.apply(z, mean, var)
    invstd = torch.rsqrt(var + bn.eps)
    acc = invstd.dtype
    scale = invstd if bn.weight is None else bn.weight.to(acc) * invstd
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(acc)
    return Deferred(z, scale, shift, act)


def _prologue_conv(conv, d, stats):
    """conv(act(d.z * d.scale + d.shift)) through bn_act_conv2d, the BatchNorm-apply in its prologue; with
    stats, (out, mean, var) with out's batch statistics. None when d is a tensor (not a Deferred) or the
    convolution cannot take it."""
    padding = _zero_padding(conv)
    if not isinstance(d, Deferred) or padding is None:
        return None
    return bn_act_conv2d(d.z, d.scale, d.shift, conv.weight, conv.bias, conv.stride, padding, conv.dilation,
                         conv.groups, activation=d.act, backend=current_backend(), stats=stats)


def _conv_with_stats(conv, x):
    """(z, mean, var): conv(x) of a tensor or Deferred x and z's batch statistics (non-differentiable)."""
    got = _prologue_conv(conv, x, stats=True)
    if got is not None:
        return got
    x = materialize(x)
    padding = _fastnets_padding(conv)
    if padding is None or _native_cpu.active(current_backend(), x):
        z = conv(x)  # torch's (or oneDNN's) convolution; the statistics in a pass of their own
        return (z,) + _stats_of(z)
    x, weight, bias, _ = _autocast(x, conv.weight, conv.bias, None)
    return torch.ops.fastnets.conv2d_stats(x, weight, bias, list(conv.stride), list(padding), list(conv.dilation),
                                           current_backend())


def _act(act):
    return activations.canonical(act, "act")


def conv_bn_deferred(conv, bn, x, act="relu"):
    """act(bn(conv(x))) as a Deferred in training (z = conv(x) with its batch statistics; the apply left to
    the next convolution's prologue), else the tensor conv_bn_act computes (eval: the folded convolution).
    x: a tensor or a Deferred (whose apply runs in this convolution's prologue)."""
    act = _act(act)
    if not _can_defer(bn, x):
        return conv_bn_act(conv, bn, materialize(x), act=act)
    z, mean, var = _conv_with_stats(conv, x)
    return _defer(bn, z, mean, var, act)


def bn_deferred(bn, x, act="relu"):
    """act(bn(x)) as a Deferred in training (x with its batch statistics), else the tensor bn_act computes.
    For pre-activation layers (DenseNet's norm1 -> relu1 -> conv1 on the concatenated features)."""
    act = _act(act)
    x = materialize(x)
    if not _can_defer(bn, x):
        return bn_act(bn, x, act=act)
    mean, var = _stats_of(x)
    return _defer(bn, x, mean, var, act)


def conv_chained(conv, x):
    """conv(x) for a tensor or a Deferred x (read in the convolution's prologue)."""
    got = _prologue_conv(conv, x, stats=False)
    return conv(materialize(x)) if got is None else got


def conv_bn_act_chained(conv, bn, x, residual=None, act="relu"):
    """act(bn(conv(x)) [+ residual]) for a tensor or a Deferred x: the last BatchNorm of a chain, fused with
    the add and the activation (the batch statistics from the prologue convolution's epilogue)."""
    act = _act(act)
    if not isinstance(x, Deferred):
        return conv_bn_act(conv, bn, x, residual=residual, act=act)
    if residual is not None and not (isinstance(residual, Tensor) and residual.shape == _out_shape(conv, x.z)
                                     and residual.dtype == _result_dtype(x.z) and residual.device == x.z.device):
        # a residual the fused add cannot take (broadcasting, another dtype): added after, as unfused
        y = conv_bn_act_chained(conv, bn, x, act=None)
        return activations.forward(y + residual, *act)
    if not _can_defer(bn, x) or _native_cpu.active(current_backend(), x.z):
        return bn_act(bn, conv_chained(conv, x), residual=residual, act=act)  # (eval BN, SyncBN, native CPU)
    got = _prologue_conv(conv, x, stats=True)
    if got is None:
        return bn_act(bn, conv(materialize(x)), residual=residual, act=act)
    z, mean, var = got
    count = z.numel() // z.shape[1]
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(z.shape)}")
    running_mean, running_var, _, factor = batch_stats_args(bn)
    if running_mean is not None or running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, factor, count)
    invstd = torch.rsqrt(var + bn.eps)
    return torch.ops.fastnets.bn_apply_train(z, bn.weight, bn.bias, residual, mean, invstd, act[0], act[1],
                                             current_backend())


def _out_shape(conv, z):
    from ..ops.conv import out_size

    pad = _zero_padding(conv) or (0, 0)
    return (z.shape[0], conv.out_channels) + tuple(
        out_size(z.shape[2 + i], conv.kernel_size[i], conv.stride[i], pad[i], conv.dilation[i]) for i in range(2))


def _result_dtype(z):
    if torch.is_autocast_enabled(z.device.type):
        return torch.get_autocast_dtype(z.device.type)
    return z.dtype


class _BNActMaxPool(torch.autograd.Function):
    """max_pool2d(act(z * scale + shift)) saving z, scale, shift and the position of each maximum inside its
    window as one uint8 (kernel area <= 256), not the activation nor torch's int64 indices: the backward
    rebuilds the indices, routes the gradient to them and recomputes act' from z."""

    @staticmethod
    def forward(ctx, z, scale, shift, act, act_param, kernel_size, stride, padding, dilation, ceil_mode):
        acc = acc_dtype(z)
        y = activations.forward(z.to(acc) * _view(scale) + _view(shift), act, act_param).to(z.dtype)
        out, idx = F.max_pool2d(y, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
        del y
        conf = (_pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation), ceil_mode)
        ctx.conf = (act, act_param) + conf
        ctx.save_for_backward(z, scale, shift, _window_offsets(idx, z.shape[3], *conf[:4]))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, scale, shift, local = ctx.saved_tensors
        act, act_param, kernel, stride, padding, dilation, ceil_mode = ctx.conf
        fmt = _layout(grad_out)
        idx = _window_indices(local, z.shape[3], kernel, stride, padding, dilation).contiguous(memory_format=fmt)
        gy = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_out.contiguous(memory_format=fmt), z, kernel, stride, padding, dilation, ceil_mode, idx)
        del idx
        acc = acc_dtype(z)
        v = z.to(acc) * _view(scale) + _view(shift)
        y = activations.forward(v, act, act_param).to(z.dtype).to(acc)
        dpre = activations.backward(gy.to(acc), v, y, act, act_param)
        dz = (dpre * _view(scale)).to(z.dtype) if ctx.needs_input_grad[0] else None
        dscale = (dpre * z.to(acc)).sum(dim=(0, 2, 3)) if ctx.needs_input_grad[1] else None
        dshift = dpre.sum(dim=(0, 2, 3)) if ctx.needs_input_grad[2] else None
        return (dz, dscale, dshift) + (None,) * 7


def _window_starts(shape, stride, padding, device):
    """(row, column) of each output position's window origin in the input, broadcastable to (N, C, OH, OW)."""
    oh = torch.arange(shape[2], device=device).view(1, 1, -1, 1) * stride[0] - padding[0]
    ow = torch.arange(shape[3], device=device).view(1, 1, 1, -1) * stride[1] - padding[1]
    return oh, ow


def _window_offsets(idx, width, kernel, stride, padding, dilation):
    """torch's flat per-plane max-pool indices (h * W + w) as the maximum's offset inside its window,
    (h - h0) / dh * kw + (w - w0) / dw, in one uint8."""
    if kernel[0] * kernel[1] > 256:
        return idx
    oh, ow = _window_starts(idx.shape, stride, padding, idx.device)
    rows = torch.div(idx // width - oh, dilation[0], rounding_mode="floor")
    cols = torch.div(idx % width - ow, dilation[1], rounding_mode="floor")
    return (rows * kernel[1] + cols).to(torch.uint8)


def _window_indices(local, width, kernel, stride, padding, dilation):
    """The inverse of _window_offsets: torch's int64 indices."""
    if local.dtype != torch.uint8:
        return local
    oh, ow = _window_starts(local.shape, stride, padding, local.device)
    off = local.to(torch.int64)
    rows = oh + torch.div(off, kernel[1], rounding_mode="floor") * dilation[0]
    cols = ow + off % kernel[1] * dilation[1]
    return rows * width + cols


def _layout(t):
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _pair(v):
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


def max_pool_deferred(pool, x):
    """pool(x) for an nn.MaxPool2d and a tensor or Deferred x; for a Deferred, act(bn(z)) is pooled without
    being saved (z, already saved for the BatchNorm, and one byte per output, the maximum's place in its
    window, are)."""
    if not isinstance(x, Deferred):
        return pool(x)
    if type(pool) is not nn.MaxPool2d or pool.return_indices or pool._forward_hooks or pool._forward_pre_hooks:
        return pool(materialize(x))
    return _BNActMaxPool.apply(x.z, x.scale, x.shift, x.act[0], x.act[1], pool.kernel_size,
                               pool.stride if pool.stride is not None else pool.kernel_size, pool.padding,
                               pool.dilation, pool.ceil_mode)


# ------------------------------------------------------------------------------------------- Sequential


def _is_plain(m, *types):
    return type(m) in types and not (m._forward_hooks or m._forward_pre_hooks)


def _is_conv(m):
    from .conv import Conv2d

    return _is_plain(m, nn.Conv2d, Conv2d)


def _is_bn(m):
    from .batch_norm import BatchNorm2d

    return _is_plain(m, nn.BatchNorm2d, BatchNorm2d)


def _is_relu(m):
    return _is_plain(m, nn.ReLU)


class ChainedSequential(nn.Sequential):
    """nn.Sequential (same children, same state_dict keys) whose forward runs each Conv2d -> BatchNorm2d
    [-> ReLU] and BatchNorm2d -> ReLU run fused and, in training, CHAINED: when the next child is a Conv2d or
    a MaxPool2d the run's BatchNorm-apply and ReLU move into that child (bn_act_conv2d's prologue, or the
    pool), so their output is never stored. Every other child gets a plain tensor. The runs are found from the
    children at each call, so editing the Sequential keeps its forward right."""

    def forward(self, x, relu_after=False):
        """`relu_after=True`: as if an nn.ReLU followed the last child (fused into it when it is a BN)."""
        for kind, run, relu, after in sequential_runs(self, relu_after, _is_conv, _is_bn, _is_relu):
            m = run[0]
            if kind == "conv_bn":
                act = "relu" if relu else None
                if after is not None and (_is_conv(after) or _is_plain(after, nn.MaxPool2d)):
                    x = conv_bn_deferred(m, run[1], x, act=act)
                else:
                    x = conv_bn_act_chained(m, run[1], x, act=act)
            elif kind == "bn_relu":
                if after is not None and _is_conv(after):
                    x = bn_deferred(m, x, act="relu")
                else:
                    x = bn_act(m, materialize(x), relu=True)
            elif _is_conv(m):
                x = conv_chained(m, x)
            elif isinstance(x, Deferred) and _is_plain(m, nn.MaxPool2d):
                x = max_pool_deferred(m, x)
            else:
                x = m(materialize(x))
        return materialize(x)
