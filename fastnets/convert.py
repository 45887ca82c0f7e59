"""`fastnets.convert(model)`: run an existing CNN's BatchNorm, Conv -> BN (-> ReLU), BN -> ReLU,
BN -> add -> ReLU and squeeze-excite patterns on fastnets kernels, keeping its parameters, buffers,
state_dict keys and outputs (train and eval).

How:
  1. torch.fx. A module whose forward traces with `torch.fx.symbolic_trace` (torch.nn layers as leaves) and
     traces to the same graph in train and eval mode (so no `if self.training:` branch is frozen) has its
     graph searched for the patterns; each match becomes one call of a fastnets function that receives the
     ORIGINAL Conv2d / BatchNorm2d modules (`conv_bn_act(conv, bn, x, residual, relu)`, `bn_act(bn, x, ...)`,
     the fused squeeze-excite op with the SE's fc1/fc2 weights). The module keeps its class (a subclass of it
     is made whose forward is the rewritten graph's code), its submodules, parameters and buffers, so
     `state_dict()` is unchanged and optimizers holding its parameters keep working.
  2. Modules that do not trace (data-dependent control flow, mode-dependent branches) are not rewritten;
     their children are converted one by one, and known block classes are converted from a registry of
     fused forwards: torchvision's BasicBlock, Bottleneck, _DenseLayer, BasicConv2d (GoogLeNet), timm's
     ResNet Bottleneck and BasicBlock (with or without SE).
  3. Every remaining plain torch.nn.BatchNorm2d / Conv2d module becomes fastnets' drop-in subclass (the
     instance's class is swapped; nothing else about it changes).

A pattern is fused only when doing so cannot change what the model computes: each intermediate result has
no other user, the modules have no hooks (hooks would no longer run), and at run time a residual whose
shape or dtype does not match falls back to the unfused add. What was done, and what was left and why, is in
the ConversionReport (`convert(model, return_report=True)`, or `verbose=True` to print it).

Limits: Python attributes that a traced forward reads (e.g. `self.use_aux`) are frozen at conversion time;
a converted model is saved with `state_dict()` (its rewritten classes are made at run time, so pickling the
whole module object is not supported).
"""
import copy
import operator
from collections import OrderedDict

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .nn.batch_norm import BatchNorm2d as FastBatchNorm2d
from .nn.batch_norm import bn_act
from .nn.conv import Conv2d as FastConv2d
from .nn.conv import conv_bn_act
from .ops.squeeze_excite import squeeze_excite

__all__ = ["convert", "ConversionReport", "register_block"]

# --------------------------------------------------------------------------------------------------------
# run-time helpers called by rewritten graphs and registry forwards


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


# --------------------------------------------------------------------------------------------------------
# report


class ConversionReport:
    """What `convert` did. `print(report)` gives a summary; the attributes hold the details:
    fused: pattern -> list of the module names of each match; swapped: "BatchNorm2d"/"Conv2d" -> names of
    modules whose class became fastnets'; traced: modules rewritten with torch.fx ("" is the model);
    registry: (name, block class) converted from the registry; untraced: (name, reason) modules that did not
    trace (their children were converted instead); skipped: (what, reason) candidates left as they were."""

    PATTERNS = ("conv_bn_add_relu", "conv_bn_relu", "conv_bn_add", "conv_bn", "bn_add_relu", "bn_relu",
                "bn_add", "se_add_relu", "se_add", "se")

    def __init__(self, model_name):
        self.model_name = model_name
        self.fused = OrderedDict((p, []) for p in self.PATTERNS)
        self.swapped = OrderedDict((("BatchNorm2d", []), ("Conv2d", [])))
        self.traced = []
        self.registry = []
        self.untraced = []
        self.skipped = []

    @property
    def changed(self):
        return any(self.fused.values()) or any(self.swapped.values()) or bool(self.registry)

    def counts(self):
        out = {k: len(v) for k, v in self.fused.items() if v}
        out.update({f"{k} (module)": len(v) for k, v in self.swapped.items() if v})
        return out

    def __str__(self):
        if not self.changed:
            lines = [f"fastnets.convert({self.model_name}): nothing to replace; the model is returned unchanged."]
        else:
            lines = [f"fastnets.convert({self.model_name}):"]
            for pattern, names in self.fused.items():
                if names:
                    lines.append(f"  fused {pattern:<17} x{len(names):<4} e.g. {', '.join(names[:3])}")
            for kind, names in self.swapped.items():
                if names:
                    lines.append(f"  {kind + ' modules':<23} x{len(names):<4} now fastnets.nn.{kind} "
                                 f"(drop-in subclass; e.g. {', '.join(names[:3])})")
            if self.traced:
                lines.append(f"  rewritten with torch.fx: {', '.join(n or '<model>' for n in self.traced[:6])}"
                             + (f" (+{len(self.traced) - 6} more)" if len(self.traced) > 6 else ""))
            if self.registry:
                lines.append(f"  from the block registry: {len(self.registry)} blocks ("
                             + ", ".join(sorted({c for _, c in self.registry})) + ")")
        if self.untraced:
            lines.append(f"  not traceable ({len(self.untraced)}), children converted instead: "
                         + "; ".join(f"{n or '<model>'}: {r}" for n, r in self.untraced[:4]))
        if self.skipped:
            lines.append(f"  left as they were ({len(self.skipped)}): "
                         + "; ".join(f"{w}: {r}" for w, r in self.skipped[:6]))
        return "\n".join(lines)

    __repr__ = __str__


# --------------------------------------------------------------------------------------------------------
# graph patterns

_ADD_FUNCS = (operator.add, operator.iadd, torch.add)
_RELU_FUNCS = (F.relu, torch.relu, torch.relu_, F.relu_)
_SIGMOID_FUNCS = (torch.sigmoid, F.sigmoid)
_MUL_FUNCS = (operator.mul, operator.imul, torch.mul)


def _has_hooks(m):
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None) or getattr(m, "_forward_hooks_with_kwargs", None))


def _is_bn2d(m):
    return type(m) in (nn.BatchNorm2d, FastBatchNorm2d)


def _is_conv2d(m):
    return type(m) in (nn.Conv2d, FastConv2d)


class _Graph:
    def __init__(self, gm, prefix, report):
        self.gm, self.graph, self.prefix, self.report = gm, gm.graph, prefix, report
        self.modules = dict(gm.named_modules())

    def mod(self, node):
        if isinstance(node, fx.Node) and node.op == "call_module":
            return self.modules.get(node.target)
        return None

    def name(self, target):
        return f"{self.prefix}.{target}" if self.prefix else target

    def only_user(self, node):
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def is_relu_of(self, node, x):
        """node computes relu(x) (module, function or method; in place or not) and nothing else."""
        if node.op == "call_module":
            m = self.mod(node)
            return type(m) is nn.ReLU and not _has_hooks(m) and node.args == (x,) and not node.kwargs
        if node.op == "call_function" and node.target in _RELU_FUNCS:
            return node.args[:1] == (x,) and len(node.args) <= 2 and set(node.kwargs) <= {"inplace"}
        if node.op == "call_method" and node.target in ("relu", "relu_"):
            return node.args == (x,) and not node.kwargs
        return False

    def residual_of_add(self, node, x):
        """If node is x + r (or r + x, x += r), return r; else None. An in-place add into r is not matched:
        r would be modified for its later users."""
        if node.kwargs:
            return None
        if node.op == "call_function" and node.target in _ADD_FUNCS and len(node.args) == 2:
            a, b = node.args
        elif node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2:
            a, b = node.args
        else:
            return None
        inplace = node.target in (operator.iadd, "add_")
        if a is x and isinstance(b, fx.Node) and b is not x:
            return b
        if b is x and isinstance(a, fx.Node) and a is not x and not inplace:
            return a
        return None

    def tail(self, node):
        """(residual, relu, chain): the add and/or ReLU that consume `node` alone, chain = those nodes in
        order (empty when there are none)."""
        user = self.only_user(node)
        if user is None:
            return None, False, []
        if self.is_relu_of(user, node):
            return None, True, [user]
        r = self.residual_of_add(user, node)
        if r is not None:
            nxt = self.only_user(user)
            if nxt is not None and self.is_relu_of(nxt, user):
                return r, True, [user, nxt]
            return r, False, [user]
        return None, False, []

    def replace(self, last, dead, fn, args, kwargs):
        with self.graph.inserting_before(last):
            new = self.graph.call_function(fn, args, kwargs)
        last.replace_all_uses_with(new)
        for n in dead:  # from the last to the first
            self.graph.erase_node(n)
        return new

    def getattr_node(self, target, before):
        with self.graph.inserting_before(before):
            return self.graph.get_attr(target)

    # ---- passes

    def drop_identities(self):
        for node in list(self.graph.nodes):
            m = self.mod(node)
            if (type(m) is nn.Identity and not _has_hooks(m) and len(node.args) == 1 and not node.kwargs
                    and isinstance(node.args[0], fx.Node)):
                node.replace_all_uses_with(node.args[0])
                self.graph.erase_node(node)

    def _pool_input(self, node):
        """x if node is a global average pool of x keeping dims (mean over H, W / AdaptiveAvgPool2d(1))."""
        if node.op == "call_method" and node.target == "mean":
            args, kw = list(node.args), dict(node.kwargs)
            x = args[0]
            dims = args[1] if len(args) > 1 else kw.get("dim")
            keep = args[2] if len(args) > 2 else kw.get("keepdim", False)
        elif node.op == "call_function" and node.target is torch.mean:
            args, kw = list(node.args), dict(node.kwargs)
            x = args[0]
            dims = args[1] if len(args) > 1 else kw.get("dim")
            keep = args[2] if len(args) > 2 else kw.get("keepdim", False)
        elif node.op == "call_function" and node.target in (F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d):
            x = node.args[0]
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            return x if size in (1, (1, 1), [1, 1]) else None
        elif node.op == "call_module":
            m = self.mod(node)
            if type(m) is nn.AdaptiveAvgPool2d and m.output_size in (1, (1, 1)) and not _has_hooks(m):
                return node.args[0] if len(node.args) == 1 else None
            return None
        else:
            return None
        if keep is True and isinstance(dims, (tuple, list)) and sorted(d % 4 if d < 0 else d for d in dims) == [2, 3]:
            return x
        return None

    def _se_conv(self, node, channels_in=None):
        m = self.mod(node)
        if not (_is_conv2d(m) and not _has_hooks(m) and m.kernel_size == (1, 1) and m.stride == (1, 1)
                and m.padding in ((0, 0), "valid") and m.dilation == (1, 1) and m.groups == 1
                and m.bias is not None and m.padding_mode == "zeros" and len(node.args) == 1 and not node.kwargs):
            return None
        return m

    def squeeze_excite(self):
        """x * sigmoid(fc2(relu(fc1(pool(x))))) [+ r] [-> relu]  ->  fused_se(fc1, fc2, x, r, relu)."""
        for mul in list(self.graph.nodes):
            if mul.graph is None or mul.op not in ("call_function", "call_method") or mul.kwargs:
                continue
            if not ((mul.op == "call_function" and mul.target in _MUL_FUNCS) or
                    (mul.op == "call_method" and mul.target == "mul")) or len(mul.args) != 2:
                continue
            for x, gate in (mul.args, mul.args[::-1]):
                if not (isinstance(x, fx.Node) and isinstance(gate, fx.Node)):
                    continue
                chain = self._match_gate(gate, x)
                if chain is None:
                    continue
                fc1, fc2, dead = chain
                if mul.target in (operator.imul,) and x is mul.args[0] and len(x.users) > 1:
                    continue  # x *= gate modifies x for its other users
                residual, relu, after = self.tail(mul)
                last = after[-1] if after else mul
                fc1_node = self.getattr_node(fc1, last)
                fc2_node = self.getattr_node(fc2, last)
                self.replace(last, after[::-1] + [mul] + dead, fused_se, (fc1_node, fc2_node, x),
                             {"residual": residual, "relu": relu})
                pattern = "se" + ("_add" if residual is not None else "") + ("_relu" if relu else "")
                self.report.fused[pattern].append(self.name(fc1.rsplit(".", 1)[0] if "." in fc1 else fc1))
                break

    def _match_gate(self, gate, x):
        """(fc1_target, fc2_target, dead nodes last-to-first) if gate = sigmoid(fc2(relu(fc1(pool(x)))))
        with every intermediate used once."""
        if len(gate.users) != 1:
            return None
        if gate.op == "call_module":
            m = self.mod(gate)
            if type(m) is not nn.Sigmoid or _has_hooks(m):
                return None
        elif not ((gate.op == "call_function" and gate.target in _SIGMOID_FUNCS) or
                  (gate.op == "call_method" and gate.target in ("sigmoid", "sigmoid_"))):
            return None
        if len(gate.args) != 1 or gate.kwargs:
            return None
        fc2 = gate.args[0]
        if not isinstance(fc2, fx.Node) or len(fc2.users) != 1 or self._se_conv(fc2) is None:
            return None
        act = fc2.args[0]
        if not isinstance(act, fx.Node) or len(act.users) != 1:
            return None
        fc1 = act.args[0] if act.args else None
        if not isinstance(fc1, fx.Node) or not self.is_relu_of(act, fc1):
            return None
        if len(fc1.users) != 1 or self._se_conv(fc1) is None:
            return None
        pool = fc1.args[0]
        if not isinstance(pool, fx.Node) or len(pool.users) != 1 or self._pool_input(pool) is not x:
            return None
        m1, m2 = self.mod(fc1), self.mod(fc2)
        if m1.out_channels != m2.in_channels or m2.out_channels != m1.in_channels:
            return None
        return fc1.target, fc2.target, [gate, fc2, act, fc1, pool]

    def batch_norms(self):
        """[conv ->] bn [-> + r] [-> relu]  ->  fused_conv_bn / fused_bn."""
        for bn_node in list(self.graph.nodes):
            if bn_node.graph is None or bn_node.op != "call_module":
                continue
            bn = self.mod(bn_node)
            if not _is_bn2d(bn):
                continue
            if _has_hooks(bn):
                self.report.skipped.append((self.name(bn_node.target), "has hooks (they would not run if fused)"))
                continue
            if len(bn_node.args) != 1 or bn_node.kwargs or not isinstance(bn_node.args[0], fx.Node):
                continue
            src = bn_node.args[0]
            conv = self.mod(src)
            with_conv = (_is_conv2d(conv) and not _has_hooks(conv) and len(src.users) == 1
                         and len(src.args) == 1 and not src.kwargs and conv.out_channels == bn.num_features)
            if _is_conv2d(conv) and not with_conv:
                reason = ("has hooks" if _has_hooks(conv) else
                          "its output has other users" if len(src.users) != 1 else "unusual call")
                self.report.skipped.append((f"{self.name(src.target)} -> {self.name(bn_node.target)}",
                                            f"conv not fused: {reason}"))
            residual, relu, after = self.tail(bn_node)
            if not with_conv and residual is None and not relu:
                continue  # a lone BatchNorm2d: its class is swapped later
            last = after[-1] if after else bn_node
            dead = after[::-1] + [bn_node]
            bn_attr = self.getattr_node(bn_node.target, last)
            if with_conv:
                dead.append(src)
                conv_attr = self.getattr_node(src.target, last)
                self.replace(last, dead, fused_conv_bn, (conv_attr, bn_attr, src.args[0]),
                             {"residual": residual, "relu": relu})
                pattern = "conv_bn"
                label = f"{self.name(src.target)}+{bn_node.target.rsplit('.', 1)[-1]}"
            else:
                self.replace(last, dead, fused_bn, (bn_attr, src), {"residual": residual, "relu": relu})
                pattern = "bn"
                label = self.name(bn_node.target)
            pattern += ("_add" if residual is not None else "") + ("_relu" if relu else "")
            self.report.fused[pattern].append(label)


# --------------------------------------------------------------------------------------------------------
# tracing


_REGISTRY = {}  # block class -> function(module) -> fused forward function, or a string saying why not


def register_block(cls, make_forward):
    """Register a fused forward for a block class that torch.fx cannot trace: `make_forward(module)` returns
    a function forward(self, *args) for that instance, or a string saying why this instance is not supported."""
    _REGISTRY[cls] = make_forward


class _Tracer(fx.Tracer):
    def __init__(self, extra_leaves=()):
        super().__init__()
        self.extra_leaves = extra_leaves

    def is_leaf_module(self, m, qualname):
        if _is_fastnets(m) or _has_hooks(m) or any(m is e for e in self.extra_leaves):
            return True
        return super().is_leaf_module(m, qualname)


def _is_fastnets(m):
    return type(m).__module__.startswith("fastnets.") or getattr(type(m), "_fastnets_converted", False)


def _trace(module, extra_leaves=()):
    """(GraphModule, None), or (None, reason). Traces in train and eval mode and requires the same code."""
    modes = [(m, m.training) for m in module.modules()]  # each module's own mode (a frozen BN stays in eval)
    codes, gm = [], None
    try:
        for mode in (True, False):
            module.train(mode)
            tracer = _Tracer(extra_leaves)
            graph = tracer.trace(module)
            gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
            codes.append(gm.code)
    except Exception as e:  # noqa: BLE001  (anything a forward does with a Proxy can fail)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    finally:
        for m, mode in modes:
            m.training = mode
    if codes[0] != codes[1]:
        return None, "its forward differs between train and eval mode"
    return gm, None


def _install_forward(module, forward, tag):
    cls = type(module)
    new_cls = type(cls.__name__, (cls,), {"forward": forward, "_fastnets_converted": tag,
                                           "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    module.__class__ = new_cls


def _rewrite(module, prefix, report, extra_leaves=()):
    """Trace `module` and fuse its patterns. Returns None when it does not trace, else the names of the
    submodules its graph still calls (leaves of the trace)."""
    gm, reason = _trace(module, extra_leaves)
    if gm is None:
        report.untraced.append((prefix, reason))
        return None
    called = OrderedDict.fromkeys(n.target for n in gm.graph.nodes if n.op == "call_module")
    g = _Graph(gm, prefix, report)
    before = {k: len(v) for k, v in report.fused.items()}
    g.drop_identities()
    g.squeeze_excite()
    g.batch_norms()
    if {k: len(v) for k, v in report.fused.items()} == before:
        return list(called)
    gm.graph.lint()
    gm.recompile()
    _install_forward(module, type(gm).forward, "fx")
    module._fastnets_code = gm.code
    report.traced.append(prefix)
    return list(called)


def _has_forward(module):
    return type(module).forward is not nn.Module.forward


def _registry_forward(module, cache):
    """The registry's fused forward for a known block that fx cannot trace, else None (cached per module)."""
    key = id(module)
    if key not in cache:
        fwd = None
        if type(module) in _REGISTRY and not _has_hooks(module) and _trace(module)[0] is None:
            fwd = _REGISTRY[type(module)](module)
        cache[key] = fwd
    return cache[key]


def _convert(module, prefix, report, cache):
    if _is_fastnets(module) or not list(module.children()):
        return  # fastnets' own modules, and leaf layers (swapped later when they are BatchNorm2d/Conv2d)
    fwd = _registry_forward(module, cache)
    if fwd is not None:
        if callable(fwd):
            _install_forward(module, fwd, "registry")
            report.registry.append((prefix, f"{type(module).__module__.split('.')[0]} {type(module).__name__}"))
            return
        report.skipped.append((prefix or "<model>", f"registry block not converted: {fwd}"))
    elif _has_forward(module):
        # known blocks that do not trace are leaves of the trace, converted from the registry
        leaves = [(n, m) for n, m in module.named_modules()
                  if m is not module and type(m) in _REGISTRY and callable(_registry_forward(m, cache))]
        called = _rewrite(module, prefix, report, extra_leaves=[m for _, m in leaves])
        if called is not None:
            # leaves of the trace that hold modules of their own: registry blocks, modules with hooks
            for name in called:
                m = module.get_submodule(name)
                if list(m.children()):
                    _convert(m, f"{prefix}.{name}" if prefix else name, report, cache)
            return
    for name, child in module.named_children():
        _convert(child, f"{prefix}.{name}" if prefix else name, report, cache)


def _swap_layers(model, report):
    for name, m in model.named_modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = FastBatchNorm2d
            report.swapped["BatchNorm2d"].append(name)
        elif type(m) is nn.Conv2d:
            m.__class__ = FastConv2d
            report.swapped["Conv2d"].append(name)


def convert(model, inplace=False, return_report=False, verbose=False):
    """Return `model` with its BatchNorm2d, Conv -> BN (-> ReLU), BN -> ReLU, BN -> add -> ReLU and
    squeeze-excite patterns on fastnets kernels (see the module docstring). `inplace=False` converts a deep
    copy (the original is untouched); a model with nothing to replace is returned as it is (the same object).
    `return_report=True` returns (model, ConversionReport); `verbose=True` prints the report."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    _ensure_registry()
    work = model if inplace else copy.deepcopy(model)
    report = ConversionReport(type(model).__name__)
    _convert(work, "", report, {})
    _swap_layers(work, report)
    result = work if report.changed else model
    if verbose:
        print(report)
    return (result, report) if return_report else result


# --------------------------------------------------------------------------------------------------------
# registry: fused forwards of known torchvision / timm blocks (used where torch.fx cannot trace them)


def _plain(m, *types_):
    return type(m) in types_ and not _has_hooks(m)


def _conv_bn_ok(conv, bn):
    return _plain(conv, nn.Conv2d, FastConv2d) and _plain(bn, nn.BatchNorm2d, FastBatchNorm2d)


def _shortcut(block, x):
    ds = block.downsample
    if ds is None:
        return x
    if type(ds) is nn.Sequential and len(ds) == 2 and _conv_bn_ok(ds[0], ds[1]):
        return fused_conv_bn(ds[0], ds[1], x)
    return ds(x)


def _tv_resnet_block(m):
    names = ["conv1", "bn1", "conv2", "bn2"] + (["conv3", "bn3"] if hasattr(m, "conv3") else [])
    if not all(_conv_bn_ok(getattr(m, c), getattr(m, b)) for c, b in zip(names[::2], names[1::2])):
        return "its conv/bn layers are not plain Conv2d/BatchNorm2d"
    if not _plain(m.relu, nn.ReLU):
        return "relu is not an nn.ReLU"
    if hasattr(m, "conv3"):
        def forward(self, x):
            identity = _shortcut(self, x)
            out = fused_conv_bn(self.conv1, self.bn1, x, relu=True)
            out = fused_conv_bn(self.conv2, self.bn2, out, relu=True)
            return fused_conv_bn(self.conv3, self.bn3, out, residual=identity, relu=True)
    else:
        def forward(self, x):
            identity = _shortcut(self, x)
            out = fused_conv_bn(self.conv1, self.bn1, x, relu=True)
            return fused_conv_bn(self.conv2, self.bn2, out, residual=identity, relu=True)
    return forward


def _tv_dense_layer(m):
    if not (_conv_bn_ok(m.conv1, m.norm2) and _plain(m.norm1, nn.BatchNorm2d, FastBatchNorm2d)
            and _plain(m.conv2, nn.Conv2d, FastConv2d) and _plain(m.relu1, nn.ReLU) and _plain(m.relu2, nn.ReLU)):
        return "unexpected layers"
    if getattr(m, "memory_efficient", False):
        return "memory_efficient=True (checkpointed) is not supported"

    def forward(self, input):
        x = input if isinstance(input, torch.Tensor) else torch.cat(input, 1)
        x = fused_bn(self.norm1, x, relu=True)
        x = fused_conv_bn(self.conv1, self.norm2, x, relu=True)
        x = self.conv2(x)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x

    return forward


def _tv_basic_conv(m):
    if not _conv_bn_ok(m.conv, m.bn):
        return "unexpected layers"

    def forward(self, x):
        return fused_conv_bn(self.conv, self.bn, x, relu=True)

    return forward


def _is_sigmoid_module(g):
    """torch's nn.Sigmoid or timm's layers.activations.Sigmoid (x.sigmoid(), in place or not), without hooks."""
    if g is None or _has_hooks(g):
        return False
    return type(g) is nn.Sigmoid or (type(g).__module__ == "timm.layers.activations" and type(g).__name__ == "Sigmoid")


def _timm_resnet_block(m):
    bottleneck = hasattr(m, "conv3")
    pairs = [("conv1", "bn1"), ("conv2", "bn2")] + ([("conv3", "bn3")] if bottleneck else [])
    if not all(_conv_bn_ok(getattr(m, c), getattr(m, b)) for c, b in pairs):
        return "its conv/bn layers are not plain Conv2d/BatchNorm2d"
    acts = ["act1", "act2"] + (["act3"] if bottleneck else [])
    if not all(_plain(getattr(m, a), nn.ReLU) for a in acts):
        return "activations are not nn.ReLU"
    for name in ("drop_block", "aa"):
        if not _plain(getattr(m, name, nn.Identity()), nn.Identity):
            return f"{name} is not Identity"
    if getattr(m, "drop_path", None) is not None:
        return "drop_path is set"
    se = getattr(m, "se", None)
    if se is not None:
        ok = (type(se).__name__ == "SEModule" and not getattr(se, "add_maxpool", False)
              and _plain(getattr(se, "bn", None), nn.Identity) and _plain(getattr(se, "act", None), nn.ReLU)
              and _is_sigmoid_module(getattr(se, "gate", None)) and hasattr(se, "fc1") and hasattr(se, "fc2"))
        if not ok:
            return "its se module is not a plain SEModule (ReLU, sigmoid gate)"

    def tail(self, out, shortcut):
        if self.se is None:
            return None
        return fused_se(self.se.fc1, self.se.fc2, out, residual=shortcut, relu=True)

    if bottleneck:
        def forward(self, x):
            shortcut = _shortcut(self, x)
            out = fused_conv_bn(self.conv1, self.bn1, x, relu=True)
            out = fused_conv_bn(self.conv2, self.bn2, out, relu=True)
            if self.se is None:
                return fused_conv_bn(self.conv3, self.bn3, out, residual=shortcut, relu=True)
            return tail(self, fused_conv_bn(self.conv3, self.bn3, out), shortcut)
    else:
        def forward(self, x):
            shortcut = _shortcut(self, x)
            out = fused_conv_bn(self.conv1, self.bn1, x, relu=True)
            if self.se is None:
                return fused_conv_bn(self.conv2, self.bn2, out, residual=shortcut, relu=True)
            return tail(self, fused_conv_bn(self.conv2, self.bn2, out), shortcut)
    return forward


def _ensure_registry():
    """Register the known torchvision/timm blocks, once each library is imported (a model holding their
    blocks has imported them; fastnets itself never imports either)."""
    import importlib
    import sys

    if "torchvision" in sys.modules and "torchvision" not in _registered_libs:
        _registered_libs.add("torchvision")
        try:
            densenet, googlenet, resnet = (importlib.import_module(f"torchvision.models.{n}")
                                           for n in ("densenet", "googlenet", "resnet"))
        except Exception:  # noqa: BLE001
            pass
        else:
            register_block(resnet.BasicBlock, _tv_resnet_block)
            register_block(resnet.Bottleneck, _tv_resnet_block)
            register_block(densenet._DenseLayer, _tv_dense_layer)
            register_block(googlenet.BasicConv2d, _tv_basic_conv)
    if "timm" in sys.modules and "timm" not in _registered_libs:
        _registered_libs.add("timm")
        try:
            timm_resnet = importlib.import_module("timm.models.resnet")
        except Exception:  # noqa: BLE001
            pass
        else:
            register_block(timm_resnet.Bottleneck, _timm_resnet_block)
            register_block(timm_resnet.BasicBlock, _timm_resnet_block)


_registered_libs = set()
