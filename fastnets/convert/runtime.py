"""Run-time helpers that the rewritten graphs and the registry's block forwards call: one fused fastnets
call per matched pattern, falling back to the unfused computation where the fused op cannot take the input
(unbatched input, a residual of another shape or dtype)."""
import torch

from ..nn.batch_norm import bn_act
from ..nn.conv import conv_bn_act
from ..ops.squeeze_excite import squeeze_excite

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


def _add_relu(y, residual, relu):
    y = y + residual
    return torch.relu(y) if relu else y


def fused_conv_bn(conv, bn, x, residual=None, relu=False):
    """[relu](bn(conv(x)) [+ residual]) with conv_bn_act; a residual that cannot be fused (another shape or
    dtype: broadcasting, autocast promotion) is added after, as the original model did."""
    if x.dim() != 4:  # unbatched input: the modules as they are
        y = bn(conv(x))
        y = y + residual if residual is not None else y
        return torch.relu(y) if relu else y
    if residual is not None and not _residual_fits(residual, _conv_out_shape(conv, x), _result_dtype(x), x.device):
        return _add_relu(conv_bn_act(conv, bn, x, relu=False), residual, relu)
    return conv_bn_act(conv, bn, x, residual=residual, relu=relu)


def fused_bn(bn, x, residual=None, relu=False):
    """[relu](bn(x) [+ residual]) with bn_act (same fallback for a residual that does not fit)."""
    if x.dim() != 4:
        y = bn(x)
        y = y + residual if residual is not None else y
        return torch.relu(y) if relu else y
    if residual is not None and not _residual_fits(residual, x.shape, x.dtype, x.device):
        return _add_relu(bn_act(bn, x), residual, relu)
    return bn_act(bn, x, residual=residual, relu=relu)


def fused_se(fc1, fc2, x, residual=None, relu=False):
    """[relu](x * sigmoid(fc2(relu(fc1(mean_hw(x))))) [+ residual]) with fastnets' fused squeeze-excite."""
    if residual is not None and not _residual_fits(residual, x.shape, x.dtype, x.device):
        return _add_relu(squeeze_excite(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias), residual, relu)
    return squeeze_excite(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, residual=residual, relu=relu)
