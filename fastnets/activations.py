"""The activations fastnets fuses into its kernels, with exactly torch's semantics.

Every fused op takes an activation as a name and one float parameter (`act: str, act_param: float` in the
op schemas); the kernels see it as an integer code (`code(name)`), a compile-time constant (tl.constexpr in
Triton, a template parameter of the vectorized CUDA C++ kernels, whose scalar fallbacks switch on it at run
time).

  identity, relu, relu6, leaky_relu (param: negative_slope), silu, hardswish, gelu (erf), gelu_tanh
  gates of squeeze-excite: sigmoid, hardsigmoid

Gradients follow torch's backward formulas (aten's derivatives.yaml), kinks included:
  relu:       threshold_backward(grad, result, 0)  -> 0 where the output is <= 0 (so 0 at x = 0), and
              grad where the output is NaN
  relu6:      hardtanh_backward(grad, x, 0, 6)     -> 0 where x <= 0 or x >= 6 (0 at both kinks)
  leaky_relu: leaky_relu_backward                  -> grad where x > 0, grad * slope elsewhere (x = 0 too)
  hardswish:  hardswish_backward                   -> 0 for x < -3, grad * (x / 3 + 0.5) for x <= 3 (so
              -0.5 grad at x = -3 and 1.5 grad at x = 3), grad above (and for NaN)
  hardsigmoid: hardsigmoid_backward                -> grad / 6 for -3 < x < 3, 0 elsewhere
  silu, gelu, gelu_tanh: smooth; silu_backward, gelu_backward(approximate=...).
The reference backend calls those aten functions themselves; the Triton and CUDA C++ kernels restate them.
In-place variants (nn.ReLU(inplace=True), F.relu_, ...) compute the same function and are accepted.
"""
import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("identity", "relu", "relu6", "leaky_relu", "silu", "hardswish", "gelu", "gelu_tanh")
GATES = ("sigmoid", "hardsigmoid")

# Kernel codes: the position in ACTIVATIONS / GATES. identity = 0 and relu = 1, so a legacy `relu` bool
# passed where a code is expected means the same thing.
CODES = {name: i for i, name in enumerate(ACTIVATIONS)}
GATE_CODES = {name: i for i, name in enumerate(GATES)}

# Activations whose gradient the kernels take from the saved output (no pre-activation needed).
FROM_OUTPUT = ("identity", "relu")

_ALIASES = {
    "none": "identity", "linear": "identity", "swish": "silu", "hard_swish": "hardswish",
    "gelu_erf": "gelu", "gelu_approx_tanh": "gelu_tanh", "hardtanh_0_6": "relu6", "leakyrelu": "leaky_relu",
}
_GATE_ALIASES = {"hard_sigmoid": "hardsigmoid"}

_FUNCTIONS = {
    F.relu: ("relu", 0.0), torch.relu: ("relu", 0.0), F.relu_: ("relu", 0.0), torch.relu_: ("relu", 0.0),
    F.relu6: ("relu6", 0.0), F.silu: ("silu", 0.0), F.hardswish: ("hardswish", 0.0),
    F.leaky_relu: ("leaky_relu", 0.01), F.leaky_relu_: ("leaky_relu", 0.01),
    torch.Tensor.relu: ("relu", 0.0), torch.Tensor.relu_: ("relu", 0.0),
}
_GATE_FUNCTIONS = {torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid",
                   F.hardsigmoid: "hardsigmoid"}

# timm.layers.activations / activations_me classes, by class name (timm is optional)
_TIMM_ACTS = {"Swish": "silu", "SwishMe": "silu", "HardSwish": "hardswish", "HardSwishMe": "hardswish",
              "GELU": "gelu", "GELUTanh": "gelu_tanh", "ReLU6": "relu6"}
_TIMM_GATES = {"Sigmoid": "sigmoid", "HardSigmoid": "hardsigmoid", "HardSigmoidMe": "hardsigmoid"}


def _is_timm(m):
    return type(m).__module__.startswith("timm.")


def _module(act):
    t = type(act)
    if t is nn.Identity:
        return ("identity", 0.0)
    if t is nn.ReLU:
        return ("relu", 0.0)
    if t is nn.ReLU6:
        return ("relu6", 0.0)
    if t is nn.Hardtanh and float(act.min_val) == 0.0 and float(act.max_val) == 6.0:
        return ("relu6", 0.0)
    if t is nn.LeakyReLU:
        return ("leaky_relu", float(act.negative_slope))
    if t is nn.SiLU:
        return ("silu", 0.0)
    if t is nn.Hardswish:
        return ("hardswish", 0.0)
    if t is nn.GELU:
        return ("gelu_tanh", 0.0) if act.approximate == "tanh" else ("gelu", 0.0)
    if _is_timm(act) and t.__name__ in _TIMM_ACTS:
        return (_TIMM_ACTS[t.__name__], 0.0)
    return None


def canonical(act, name="act"):
    """(name, param) for an activation given as None/False (identity), True (relu), a name, a (name, param)
    pair, an nn.Module or a torch function. Raises ValueError naming the argument when fastnets cannot fuse it."""
    if act is None or act is False:
        return ("identity", 0.0)
    if act is True:
        return ("relu", 0.0)
    if isinstance(act, str):
        key = act.lower()
        key = _ALIASES.get(key, key)
        if key in CODES:
            return (key, 0.01 if key == "leaky_relu" else 0.0)
        raise ValueError(f"{name} must be one of {ACTIVATIONS} (or a module/function of one), got {act!r}")
    if isinstance(act, tuple) and len(act) == 2 and isinstance(act[0], str):
        base = canonical(act[0], name)[0]
        try:
            param = float(act[1])
        except (TypeError, ValueError):
            raise ValueError(f"{name}: the parameter of {act[0]!r} must be a float, got {act[1]!r}") from None
        return (base, param if base == "leaky_relu" else 0.0)
    if isinstance(act, nn.Module):
        got = _module(act)
        if got is None:
            raise ValueError(f"{name}: fastnets cannot fuse the activation module {type(act).__name__} ({act!r})")
        return got
    try:
        if act in _FUNCTIONS:
            return _FUNCTIONS[act]
    except TypeError:  # unhashable
        pass
    raise ValueError(f"{name} must be one of {ACTIVATIONS}, a (name, param) pair, an nn.Module or a torch "
                     f"function of one, got {act!r}")


def fusable(act):
    try:
        canonical(act)
        return True
    except ValueError:
        return False


def canonical_gate(gate, name="gate"):
    """'sigmoid' or 'hardsigmoid' for a squeeze-excite gate given as a name, module or function."""
    if isinstance(gate, str):
        key = _GATE_ALIASES.get(gate.lower(), gate.lower())
        if key in GATE_CODES:
            return key
    elif isinstance(gate, nn.Module):
        t = type(gate)
        if t is nn.Sigmoid:
            return "sigmoid"
        if t is nn.Hardsigmoid:
            return "hardsigmoid"
        if _is_timm(gate) and t.__name__ in _TIMM_GATES:
            return _TIMM_GATES[t.__name__]
    else:
        try:
            if gate in _GATE_FUNCTIONS:
                return _GATE_FUNCTIONS[gate]
        except TypeError:
            pass
    raise ValueError(f"{name} must be one of {GATES} (or nn.Sigmoid / nn.Hardsigmoid / torch.sigmoid / "
                     f"F.hardsigmoid), got {gate!r}")


def resolve(act, relu, name="act"):
    """(name, param) for a wrapper's `act=` and legacy `relu=` arguments: `act` wins when given."""
    return canonical(relu if act is None else act, name)


def code(act):
    """The kernels' integer code of an activation name (or of a legacy relu bool)."""
    if isinstance(act, bool):
        return int(act)
    if isinstance(act, int):
        return act
    return CODES[act]


def name_of(c):
    return ACTIVATIONS[code(c)]


# ------------------------------------------------------------------------------------------- torch forms


def forward(v, act, param=0.0):
    """torch's own activation of v (any dtype)."""
    act = name_of(act)
    if act == "identity":
        return v
    if act == "relu":
        return torch.relu(v)
    if act == "relu6":
        return F.hardtanh(v, 0.0, 6.0)
    if act == "leaky_relu":
        return F.leaky_relu(v, param)
    if act == "silu":
        return F.silu(v)
    if act == "hardswish":
        return F.hardswish(v)
    return F.gelu(v, approximate="tanh" if act == "gelu_tanh" else "none")


def backward(g, v, y, act, param=0.0):
    """grad * act'(v) as torch's backward computes it; relu takes its mask from the output y (v unused)."""
    act = name_of(act)
    aten = torch.ops.aten
    if act == "identity":
        return g
    if act == "relu":
        return aten.threshold_backward(g, y, 0)
    if act == "relu6":
        return aten.hardtanh_backward(g, v, 0.0, 6.0)
    if act == "leaky_relu":
        return aten.leaky_relu_backward(g, v, param, False)
    if act == "silu":
        return aten.silu_backward(g, v)
    if act == "hardswish":
        return aten.hardswish_backward(g, v)
    return aten.gelu_backward(g, v, approximate="tanh" if act == "gelu_tanh" else "none")


def gate_forward(z, gate):
    return torch.sigmoid(z) if gate == "sigmoid" else F.hardsigmoid(z)


def gate_backward(g, z, out, gate):
    """grad of the gate: sigmoid from its output, hardsigmoid from its input, as torch."""
    if gate == "sigmoid":
        return torch.ops.aten.sigmoid_backward(g, out)
    return torch.ops.aten.hardsigmoid_backward(g, z)
