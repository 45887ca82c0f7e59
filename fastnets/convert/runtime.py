"""Run-time helpers that the rewritten graphs and the registry's block forwards call: one fused fastnets
call per matched pattern, falling back to the unfused computation where the fused op cannot take the input
(unbatched input, a residual of another shape or dtype).

Each takes the activation as `act` ((name, param) as fastnets.activations names it; None: none) or, as
before, `relu=True`. convert only emits an activation other than relu when this build's wrapper fuses it
(acts.why_not_fusable), so relu is passed as `relu=True` and only the others as `act=`."""
import torch

from ..nn import conv_chain
from ..nn.batch_norm import bn_act
from ..nn.conv import _fastnets_padding, conv_bn_act
from ..ops.conv import conv2d
from ..ops.squeeze_excite import squeeze_excite
from . import acts


def _conv_out_shape(conv, x):
    n, _, h, w = x.shape
    if isinstance(conv.padding, str):
        if conv.padding == "same":
            return (n, conv.out_channels, h, w)
        pad = (0, 0)
    else:
        pad = conv.padding
    out = [n, conv.out_channels]
    for size, k, s, p, d in zip((h, w), conv.kernel_size, conv.stride, pad, conv.dilation):
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return tuple(out)


def _residual_fits(residual, shape, dtype, device):
    return (
        isinstance(residual, torch.Tensor)
        and tuple(residual.shape) == tuple(shape)
        and residual.dtype == dtype
        and residual.device == device
    )


def _result_dtype(x):
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _act(act, relu):
    """The activation as (name, param), None for none."""
    if act is None:
        return acts.RELU if relu else None
    return None if act[0] == "identity" else tuple(act)


def _act_kwargs(act):
    """The wrapper's arguments for activation `act`: relu as the legacy bool, the others as act=."""
    if act is None:
        return {"relu": False}
    if act[0] == "relu":
        return {"relu": True}
    return {"act": act}


def _add_act(y, residual, act):
    if residual is not None:
        y = y + residual
    return acts.apply(y, act)


def fused_conv_bn(conv, bn, x, residual=None, relu=False, act=None):
    """act(bn(conv(x)) [+ residual]) with conv_bn_act; a residual that cannot be fused (another shape or
    dtype: broadcasting, autocast promotion) is added after, as the original model did."""
    act = _act(act, relu)
    if x.dim() != 4:  # unbatched input: the modules as they are
        return _add_act(bn(conv(x)), residual, act)
    if residual is not None and not _residual_fits(residual, _conv_out_shape(conv, x), _result_dtype(x), x.device):
        return _add_act(conv_bn_act(conv, bn, x, relu=False), residual, act)
    return conv_bn_act(conv, bn, x, residual=residual, **_act_kwargs(act))


def fused_bn(bn, x, residual=None, relu=False, act=None):
    """act(bn(x) [+ residual]) with bn_act (same fallback for a residual that does not fit)."""
    act = _act(act, relu)
    if x.dim() != 4:
        return _add_act(bn(x), residual, act)
    if residual is not None and not _residual_fits(residual, x.shape, x.dtype, x.device):
        return _add_act(bn_act(bn, x), residual, act)
    return bn_act(bn, x, residual=residual, **_act_kwargs(act))


def fused_conv_act(conv, x, residual=None, act=acts.RELU):
    """act(conv(x) [+ residual]) for a convolution with no BatchNorm (its bias and the activation in the
    convolution's epilogue). relu runs on fastnets.ops.conv2d's epilogue in every build; other activations
    through conv_bn_act(conv, None, x, act=...) once this build has it."""
    act = _act(act, False)
    fits = residual is None or _residual_fits(residual, _conv_out_shape(conv, x), _result_dtype(x), x.device)
    if act is not None and act[0] != "relu" and x.dim() == 4 and fits:
        return conv_bn_act(conv, None, x, residual=residual, act=act)
    padding = _fastnets_padding(conv)
    if x.dim() != 4 or not fits or padding is None or act is None:
        return _add_act(conv(x), residual, act)
    return conv2d(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, residual=residual, relu=True)


def fused_se(fc1, fc2, x, residual=None, relu=False, act=None, inner_act=acts.RELU, gate="sigmoid"):
    """act(x * gate(fc2(inner_act(fc1(mean_hw(x))))) [+ residual]) with fastnets' fused squeeze-excite."""
    act = _act(act, relu)
    extra = {}
    if tuple(inner_act) != acts.RELU or gate != "sigmoid":
        extra = {"inner_act": tuple(inner_act), "gate": gate}
    if residual is not None and not _residual_fits(residual, x.shape, x.dtype, x.device):
        y = squeeze_excite(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, **extra)
        return _add_act(y, residual, act)
    if act is not None and act[0] != "relu":
        y = squeeze_excite(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, residual=residual, **extra)
        return acts.apply(y, act)
    return squeeze_excite(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, residual=residual,
                          relu=act is not None, **extra)


# ------------------------------------------------------------------------------------------------ chains
# A chain's producer returns, in training, a conv_chain.Deferred (BN-apply + act not computed) that its one
# user, a convolution or a max-pool, reads in its prologue; in eval (or where deferring cannot apply) a plain
# tensor, and the consumers take both. The rewriter only emits these where the producer's output has that
# single user.


def _act_arg(act):
    return acts.IDENTITY if act is None else tuple(act)


def chain_conv_bn(conv, bn, x, residual=None, act=None):
    """act(bn(conv(x))) for a chain: a Deferred in training (x may be one too), else the fused tensor.
    (`residual` is always None: a BatchNorm followed by an add ends a chain.)"""
    if residual is not None or (isinstance(x, torch.Tensor) and x.dim() != 4):
        x = conv_chain.materialize(x)
        return fused_conv_bn(conv, bn, x, residual=residual, act=act)
    if isinstance(x, torch.Tensor) and x.dim() != 4:
        return fused_conv_bn(conv, bn, x, act=act)
    return conv_chain.conv_bn_deferred(conv, bn, x, act=_act_arg(act))


def chain_bn(bn, x, residual=None, act=None):
    """act(bn(x)) for a chain (a BatchNorm before a convolution: DenseNet's pre-activation layers)."""
    if residual is not None or (isinstance(x, torch.Tensor) and x.dim() != 4):
        return fused_bn(bn, conv_chain.materialize(x), residual=residual, act=act)
    return conv_chain.bn_deferred(bn, x, act=_act_arg(act))


def chained_conv_bn(conv, bn, x, residual=None, relu=False, act=None):
    """fused_conv_bn of an x that may be Deferred (read in this convolution's prologue): the end of a chain."""
    if not isinstance(x, conv_chain.Deferred):
        return fused_conv_bn(conv, bn, x, residual=residual, relu=relu, act=act)
    return conv_chain.conv_bn_act_chained(conv, bn, x, residual=residual, act=_act_arg(_act(act, relu)))


def chained_conv(conv, x):
    """conv(x) of an x that may be Deferred."""
    return conv_chain.conv_chained(conv, x)


def chained_max_pool(pool, x):
    """pool(x) (an nn.MaxPool2d) of an x that may be Deferred, pooled without storing act(bn(z))."""
    return conv_chain.max_pool_deferred(pool, x)
