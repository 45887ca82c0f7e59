"""Which activations, squeeze-excite gates and mode-dependent layers convert recognises, and which of them
the fused ops of this build can take.

Activations are named as fastnets.activations names them, (name, param). relu is fused by every build; the
others switch on once `fastnets.activations` exists, says the activation is fusable, and the wrapper that
would run it (bn_act, conv_bn_act, squeeze_excite) takes an `act=` / `inner_act=` argument.
"""
import functools
import importlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn

RELU = ("relu", 0.0)
IDENTITY = ("identity", 0.0)


@functools.lru_cache(maxsize=None)
def _activations():
    try:
        return importlib.import_module("fastnets.activations")
    except ImportError:
        return None


def _accepts(fn, arg):
    try:
        return arg in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def wrapper_takes(kind):
    """Whether this build's wrapper for `kind` fuses activations other than relu: "bn" (bn_act), "conv_bn"
    (conv_bn_act), "conv" (conv_bn_act with bn=None), "se" (squeeze_excite's inner_act and gate)."""
    if _activations() is None:
        return False
    from ..nn.batch_norm import bn_act
    from ..nn.conv import conv_bn_act
    from ..ops.squeeze_excite import squeeze_excite

    if kind == "bn":
        return _accepts(bn_act, "act")
    if kind in ("conv_bn", "conv"):
        return _accepts(conv_bn_act, "act")
    if kind == "se":
        return _accepts(squeeze_excite, "inner_act") and _accepts(squeeze_excite, "gate")
    raise ValueError(f"kind must be 'bn', 'conv_bn', 'conv' or 'se', got {kind!r}")


def why_not_fusable(act, kind):
    """None when the fused op of `kind` runs activation `act` ((name, param)), else the reason."""
    if act in (RELU, IDENTITY) or act[0] in ("relu", "identity"):
        return None
    if _activations() is None:
        return f"{act[0]}: this build of fastnets fuses only relu (no fastnets.activations)"
    if not wrapper_takes(kind):
        return f"{act[0]}: this build's {kind} wrapper takes no act= argument yet"
    return None


# ---- activation modules and calls

# a few forms understood without fastnets.activations (so relu is recognised by every build)
_RELU_FUNCS = (F.relu, torch.relu, torch.relu_, F.relu_)
# functional activations: function -> (name, names of its positional parameters after the input)
_FUNCTIONS = {
    F.relu: ("relu", ("inplace",)), torch.relu: ("relu", ()), torch.relu_: ("relu", ()), F.relu_: ("relu", ()),
    F.relu6: ("relu6", ("inplace",)), F.silu: ("silu", ("inplace",)), F.hardswish: ("hardswish", ("inplace",)),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")), F.gelu: ("gelu", ("approximate",)),
}
_METHODS = {"relu": "relu", "relu_": "relu"}


def of_module(m):
    """(name, param) when module `m` is an activation convert recognises (no hooks), else None."""
    if _has_hooks(m):
        return None
    if type(m) is nn.ReLU:
        return RELU
    acts = _activations()
    if acts is None or type(m) in (nn.Identity,) or not acts.fusable(m):
        return None
    return acts.canonical(m)


def of_call(node_op, target, args, kwargs):
    """(name, param) when an fx call (op, target, args after the input, kwargs) is an activation of its
    first argument, else None."""
    if node_op == "call_method":
        if target in _METHODS and not args and not kwargs:
            return RELU
        return None
    if node_op != "call_function" or target not in _FUNCTIONS:
        return None
    name, params = _FUNCTIONS[target]
    if len(args) > len(params) or not set(kwargs) <= set(params):
        return None
    bound = dict(zip(params, args), **kwargs)
    if name == "relu":
        return RELU
    if _activations() is None:
        return None
    if name == "leaky_relu":
        slope = bound.get("negative_slope", 0.01)
        return ("leaky_relu", float(slope)) if isinstance(slope, (int, float)) else None
    if name == "gelu":
        approximate = bound.get("approximate", "none")
        return {"none": ("gelu", 0.0), "tanh": ("gelu_tanh", 0.0)}.get(approximate)
    return (name, 0.0)


def gate_of_module(m):
    """'sigmoid' / 'hardsigmoid' when module `m` is a squeeze-excite gate convert recognises, else None."""
    if m is None or _has_hooks(m):
        return None
    if type(m) is nn.Sigmoid or (type(m).__module__ == "timm.layers.activations" and type(m).__name__ == "Sigmoid"):
        return "sigmoid"
    acts = _activations()
    if acts is None:
        return None
    try:
        return acts.canonical_gate(m)
    except ValueError:
        return None


def gate_of_call(node_op, target, args, kwargs):
    if args or kwargs:
        return None
    if node_op == "call_function" and target in (torch.sigmoid, F.sigmoid):
        return "sigmoid"
    if node_op == "call_method" and target in ("sigmoid", "sigmoid_"):
        return "sigmoid"
    if node_op == "call_function" and target is F.hardsigmoid and _activations() is not None:
        return "hardsigmoid"
    return None


def apply(y, act):
    """act(y) with torch's own functions (the unfused fallback)."""
    if act is None or act[0] == "identity":
        return y
    if act[0] == "relu":
        return torch.relu(y)
    return _activations().forward(y, act[0], act[1])


def _has_hooks(m):
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None) or getattr(m, "_forward_hooks_with_kwargs", None))


# ---- timm / torchvision classes, by module and class name (neither library is imported by fastnets)


def is_class(m, module_name, class_name):
    """Whether `m` is an instance of module_name.class_name or of a subclass of it."""
    return any(c.__name__ == class_name and c.__module__ == module_name for c in type(m).__mro__)


def is_batch_norm_act(m):
    """timm's BatchNormAct2d or a subclass of it (BatchNorm2d -> drop -> act in one module)."""
    return is_class(m, "timm.layers.norm_act", "BatchNormAct2d")


# layers whose forward branches on self.training and that convert keeps as they are: leaves of the trace,
# so the graph around them is the same in train and eval mode and is fused around them
MODE_DEPENDENT_LEAVES = (
    ("timm.layers.drop", "DropPath"),
    ("timm.layers.drop", "DropBlock2d"),
    ("torchvision.ops.stochastic_depth", "StochasticDepth"),
)


def is_mode_dependent_leaf(m):
    return is_batch_norm_act(m) or any(is_class(m, mod, cls) for mod, cls in MODE_DEPENDENT_LEAVES)


# squeeze-excite modules counted in the report (found by class)
SE_CLASSES = (
    ("torchvision.ops.misc", "SqueezeExcitation"),
    ("timm.layers.squeeze_excite", "SEModule"),
    ("timm.layers.squeeze_excite", "EffectiveSEModule"),
    ("timm.models._efficientnet_blocks", "SqueezeExcite"),
)


def is_se_module(m):
    return any(is_class(m, mod, cls) for mod, cls in SE_CLASSES)
