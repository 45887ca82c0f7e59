"""The torch.fx pattern rewriter: trace a module (torch.nn layers, fastnets modules, hooked modules and
registry blocks as leaves; the same graph in train and eval mode), replace each matched pattern with one call
of a run-time helper, and install the rewritten graph's code as the module's forward."""
import operator
from collections import OrderedDict

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..nn.batch_norm import BatchNorm2d as FastBatchNorm2d
from ..nn.conv import Conv2d as FastConv2d
from .runtime import fused_bn, fused_conv_bn, fused_se

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
