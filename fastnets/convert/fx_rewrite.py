"""The torch.fx pattern rewriter: trace a meta copy of a module (torch.nn layers, fastnets modules, hooked
modules, registry blocks and mode-dependent layers such as drop-path and timm's BatchNormAct2d as leaves; the
same graph in train and eval mode), replace each matched pattern with one call of a run-time helper, and
install the rewritten graph's code as the module's forward.

Patterns (each intermediate result used once, no hooks on the modules involved):
  [conv ->] bn [-> + r] [-> act]           fused_conv_bn / fused_bn   (bn: BatchNorm2d or timm BatchNormAct2d,
                                                                       whose own act and drop are kept)
  conv(+bias) [-> + r] -> act              fused_conv_act             (no BatchNorm: AlexNet, VGG, SqueezeNet)
  x * gate(fc2(act(fc1(pool(x))))) [+ r] [-> relu]   fused_se         (torchvision / timm / hand-written SE)
Every BatchNorm, activation and squeeze-excite seen but left unfused is recorded in the report with why.

Then chains (fastnets.nn.conv_chain): a fused [conv ->] bn [-> act] with no add whose output has exactly one
user, and that user a convolution (fused with its own BatchNorm or not) or a max-pool reading it as its
input, becomes chain_conv_bn / chain_bn, and the user chained_conv_bn / chained_conv / chained_max_pool: in
training the BatchNorm-apply and act run in the user's prologue and their output is never stored. Every
other fused BatchNorm is listed in report.unchained with the reason.
"""
import copy
import operator
from collections import OrderedDict

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..nn.batch_norm import BatchNorm2d as FastBatchNorm2d
from ..nn.conv import Conv2d as FastConv2d
from ..nn.conv import _fastnets_padding, _zero_padding
from . import acts
from . import runtime
from .runtime import fused_bn, fused_conv_act, fused_conv_bn, fused_se

_ADD_FUNCS = (operator.add, operator.iadd, torch.add)
_MUL_FUNCS = (operator.mul, operator.imul, torch.mul)

_has_hooks = acts._has_hooks


def _is_bn2d(m):
    return type(m) in (nn.BatchNorm2d, FastBatchNorm2d)


def _is_fusable_bn_act(m):
    """timm's BatchNormAct2d, or a subclass keeping its forward (torch's BatchNorm, then drop, then act)."""
    if not acts.is_batch_norm_act(m):
        return False
    base = next(c for c in type(m).__mro__ if c.__name__ == "BatchNormAct2d")
    return type(m).forward is base.forward


def _is_conv2d(m):
    return type(m) in (nn.Conv2d, FastConv2d)


def pattern_name(with_conv, bn, residual, act):
    """conv_bn / bn / conv, then _add, then _<act name>: conv_bn_add_relu, bn_silu, conv_relu, ..."""
    name = ("conv_bn" if bn else "conv") if with_conv else "bn"
    return name + ("_add" if residual is not None else "") + (f"_{act[0]}" if act is not None else "")


class _Graph:
    def __init__(self, gm, prefix, report):
        self.gm, self.graph, self.prefix, self.report = gm, gm.graph, prefix, report
        self.modules = dict(gm.named_modules())
        self.acts_done = set()  # activation nodes already recorded (fused or not)

    def mod(self, node):
        if isinstance(node, fx.Node) and node.op == "call_module":
            return self.modules.get(node.target)
        return None

    def name(self, target):
        return f"{self.prefix}.{target}" if self.prefix else target

    def site(self, node):
        """The report's name of a call: the module's qualified name, or <module>:<node> for a function."""
        if node.op == "call_module":
            return self.name(node.target)
        return f"{self.prefix or '<model>'}:{node.name}"

    def only_user(self, node):
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    # ---- activations

    def activation(self, node):
        """(act, input) when node is an activation convert recognises ((name, param), its input node), else
        (None, None). In-place forms count: the fused output equals them."""
        if node.op == "call_module":
            m = self.mod(node)
            if m is None or len(node.args) != 1 or node.kwargs:
                return None, None
            act = acts.of_module(m)
        elif node.op in ("call_function", "call_method") and node.args:
            act = acts.of_call(node.op, node.target, node.args[1:], node.kwargs)
        else:
            return None, None
        if act is None or not isinstance(node.args[0], fx.Node):
            return None, None
        return act, node.args[0]

    def act_of(self, node, x, kind):
        """The activation node computes of x, when the fused op `kind` can run it; else None (recording an
        activation it cannot fuse)."""
        act, src = self.activation(node)
        if act is None or src is not x:
            return None
        why = acts.why_not_fusable(act, kind)
        if why is not None:
            self.unfused_act(node, why)
            return None
        return act

    def fused_act(self, node):
        self.acts_done.add(node)
        self.report.add("activation", self.site(node), fused=True)

    def unfused_act(self, node, reason):
        if node not in self.acts_done:
            self.acts_done.add(node)
            self.report.add("activation", self.site(node), fused=False, reason=reason)

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

    def tail(self, node, kind, only_relu=False):
        """(residual, act, chain): the add and/or activation that consume `node` alone (act None when there is
        none, or the fused op `kind` cannot run it), chain = those nodes in order."""
        user = self.only_user(node)
        if user is None:
            return None, None, []
        act = self.act_of(user, node, kind)
        if act is not None and (not only_relu or act == acts.RELU):
            return None, act, [user]
        r = self.residual_of_add(user, node)
        if r is not None:
            nxt = self.only_user(user)
            act = self.act_of(nxt, user, kind) if nxt is not None else None
            if act is not None and (not only_relu or act == acts.RELU):
                return r, act, [user, nxt]
            return r, None, [user]
        return None, None, []

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
        if (node.op == "call_method" and node.target == "mean") or (
                node.op == "call_function" and node.target is torch.mean):
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

    def _se_conv(self, node):
        m = self.mod(node)
        if not (_is_conv2d(m) and not _has_hooks(m) and m.kernel_size == (1, 1) and m.stride == (1, 1)
                and m.padding in ((0, 0), "valid") and m.dilation == (1, 1) and m.groups == 1
                and m.bias is not None and m.padding_mode == "zeros" and len(node.args) == 1 and not node.kwargs):
            return None
        return m

    def _gate(self, node):
        """'sigmoid' / 'hardsigmoid' when node is a squeeze-excite gate convert recognises."""
        if len(node.args) != 1 or node.kwargs:
            return None
        if node.op == "call_module":
            return acts.gate_of_module(self.mod(node))
        if node.op in ("call_function", "call_method"):
            return acts.gate_of_call(node.op, node.target, node.args[1:], node.kwargs)
        return None

    def squeeze_excite(self):
        """x * gate(fc2(act(fc1(pool(x))))) [+ r] [-> relu]  ->  fused_se(fc1, fc2, x, r, ...)."""
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
                    fc = self._single_fc_gate(gate, x)
                    if fc is not None:
                        self.report.add("se", self.name(fc.rsplit(".", 1)[0] if "." in fc else fc), fused=False,
                                        reason="one FC layer (EffectiveSEModule): the fused squeeze-excite has two")
                    continue
                fc1, fc2, inner, gate_name, dead, inner_node = chain
                se_name = self.name(fc1.rsplit(".", 1)[0] if "." in fc1 else fc1)
                why = acts.why_not_fusable(inner, "se")
                if why is None and gate_name != "sigmoid" and not acts.wrapper_takes("se"):
                    why = f"gate {gate_name}: this build's squeeze_excite takes no gate= argument yet"
                if why is not None:
                    self.report.add("se", se_name, fused=False, reason=why)
                    self.unfused_act(inner_node, f"inside an unfused squeeze-excite ({why})")
                    break
                if mul.target in (operator.imul,) and x is mul.args[0] and len(x.users) > 1:
                    self.report.add("se", se_name, fused=False, reason="x *= gate modifies x for its other users")
                    break
                residual, act, after = self.tail(mul, "se", only_relu=True)
                last = after[-1] if after else mul
                fc1_node = self.getattr_node(fc1, last)
                fc2_node = self.getattr_node(fc2, last)
                self.replace(last, after[::-1] + [mul] + dead, fused_se, (fc1_node, fc2_node, x),
                             {"residual": residual, "relu": act is not None, "inner_act": inner, "gate": gate_name})
                self.fused_act(inner_node)
                if act is not None:
                    self.fused_act(after[-1])
                self.report.fused_pattern("se" + ("_add" if residual is not None else "")
                                          + ("_relu" if act is not None else ""), se_name)
                self.report.add("se", se_name, fused=True)
                break

    def _match_gate(self, gate, x):
        """(fc1_target, fc2_target, inner act, gate name, dead nodes last-to-first, the inner act's node) if
        gate = gate_fn(fc2(act(fc1(pool(x))))) with every intermediate used once."""
        if len(gate.users) != 1:
            return None
        gate_name = self._gate(gate)
        if gate_name is None:
            return None
        fc2 = gate.args[0]
        if not isinstance(fc2, fx.Node) or len(fc2.users) != 1 or self._se_conv(fc2) is None:
            return None
        act_node = fc2.args[0]
        if not isinstance(act_node, fx.Node) or len(act_node.users) != 1:
            return None
        inner, fc1 = self.activation(act_node)
        if inner is None or not isinstance(fc1, fx.Node):
            return None
        if len(fc1.users) != 1 or self._se_conv(fc1) is None:
            return None
        pool = fc1.args[0]
        if not isinstance(pool, fx.Node) or len(pool.users) != 1 or self._pool_input(pool) is not x:
            return None
        m1, m2 = self.mod(fc1), self.mod(fc2)
        if m1.out_channels != m2.in_channels or m2.out_channels != m1.in_channels:
            return None
        return fc1.target, fc2.target, inner, gate_name, [gate, fc2, act_node, fc1, pool], act_node

    def _single_fc_gate(self, gate, x):
        """fc's target if gate = gate_fn(fc(pool(x))) (timm's EffectiveSEModule), else None."""
        if self._gate(gate) is None or not isinstance(gate.args[0], fx.Node) or self._se_conv(gate.args[0]) is None:
            return None
        pool = gate.args[0].args[0]
        if isinstance(pool, fx.Node) and self._pool_input(pool) is x:
            return gate.args[0].target
        return None

    def _bn_act_inner(self, bn_node, bn):
        """For a timm BatchNormAct2d: (its act when it can be fused into the BN, the calls to keep after the
        fused BN: its drop and/or act submodules). For a plain BatchNorm2d: (None, [])."""
        if not acts.is_batch_norm_act(bn):
            return None, []
        keep = []
        drop_plain = type(bn.drop) is nn.Identity and not _has_hooks(bn.drop)
        if not drop_plain:
            keep.append("drop")
        act = acts.of_module(bn.act) if type(bn.act) is not nn.Identity else acts.IDENTITY
        site = self.name(bn_node.target) + ".act"
        if type(bn.act) is nn.Identity and not _has_hooks(bn.act):
            return None, keep
        why = (f"after the BatchNormAct2d's drop ({type(bn.drop).__name__})" if not drop_plain else
               f"{type(bn.act).__name__} is not an activation fastnets fuses" if act is None else
               acts.why_not_fusable(act, "conv_bn"))
        if why is None:
            self.report.add("activation", site, fused=True)
            return act, keep
        self.report.add("activation", site, fused=False, reason=why)
        return None, keep + ["act"]

    def batch_norms(self):
        """[conv ->] bn [-> + r] [-> act]  ->  fused_conv_bn / fused_bn."""
        for bn_node in list(self.graph.nodes):
            if bn_node.graph is None or bn_node.op != "call_module":
                continue
            bn = self.mod(bn_node)
            if not (_is_bn2d(bn) or acts.is_batch_norm_act(bn)):
                continue
            bn_name = self.name(bn_node.target)
            if acts.is_batch_norm_act(bn) and not _is_fusable_bn_act(bn):
                self.report.add("batchnorm", bn_name, fused=False,
                                reason=f"{type(bn).__name__}: a BatchNormAct2d subclass with a forward of its own")
                continue
            if _has_hooks(bn):
                self.report.add("batchnorm", bn_name, fused=False, reason="has hooks (they would not run if fused)")
                continue
            if len(bn_node.args) != 1 or bn_node.kwargs or not isinstance(bn_node.args[0], fx.Node):
                self.report.add("batchnorm", bn_name, fused=False, reason="called with unusual arguments")
                continue
            src = bn_node.args[0]
            conv = self.mod(src)
            with_conv = (_is_conv2d(conv) and not _has_hooks(conv) and len(src.users) == 1
                         and len(src.args) == 1 and not src.kwargs and conv.out_channels == bn.num_features)
            if _is_conv2d(conv) and not with_conv:
                reason = ("has hooks" if _has_hooks(conv) else
                          "its output has other users" if len(src.users) != 1 else "unusual call")
                self.report.skipped.append((f"{self.name(src.target)} -> {bn_name}", f"conv not fused: {reason}"))
            inner, keep = self._bn_act_inner(bn_node, bn)
            if inner is not None or keep:
                residual, act, after = None, inner, []  # the module's own act ends the pattern
            else:
                residual, act, after = self.tail(bn_node, "conv_bn" if with_conv else "bn")
            if not with_conv and residual is None and act is None:
                self.report.add("batchnorm", bn_name, fused=False,
                                reason="alone: no convolution before it, no activation or add after it "
                                       "(runs as fastnets.nn.BatchNorm2d)" if _is_bn2d(bn) else
                                       "alone: no convolution before it, no activation after it")
                continue
            last = after[-1] if after else bn_node
            act_site = self.site(last) if after and act is not None else None
            dead = after[::-1] + [bn_node]
            bn_attr = self.getattr_node(bn_node.target, last)
            kwargs = {"residual": residual, "act": act}
            if with_conv:
                dead.append(src)
                conv_attr = self.getattr_node(src.target, last)
                new = self.replace(last, dead, fused_conv_bn, (conv_attr, bn_attr, src.args[0]), kwargs)
                label = f"{self.name(src.target)}+{bn_node.target.rsplit('.', 1)[-1]}"
            else:
                new = self.replace(last, dead, fused_bn, (bn_attr, src), kwargs)
                label = bn_name
            self._call_after(new, [f"{bn_node.target}.{k}" for k in keep])
            self.report.fused_pattern(pattern_name(with_conv, True, residual, act), label)
            self.report.add("batchnorm", bn_name, fused=True)
            if act_site is not None:
                self.report.add("activation", act_site, fused=True)

    def _call_after(self, node, targets):
        """Make node's users read targets[-1](...(targets[0](node))): the BatchNormAct2d parts kept as calls."""
        if not targets:
            return
        users = list(node.users)
        cur = node
        for t in targets:
            with self.graph.inserting_after(cur):
                cur = self.graph.call_module(t, (cur,))
        for u in users:
            u.replace_input_with(node, cur)

    def conv_activations(self):
        """conv(+bias) [-> + r] -> act, with no BatchNorm  ->  fused_conv_act."""
        for conv_node in list(self.graph.nodes):
            if conv_node.graph is None or conv_node.op != "call_module":
                continue
            conv = self.mod(conv_node)
            if not _is_conv2d(conv) or _has_hooks(conv) or len(conv_node.args) != 1 or conv_node.kwargs:
                continue
            residual, act, after = self.tail(conv_node, "conv")
            if act is None:
                continue
            if _fastnets_padding(conv) is None:
                self.unfused_act(after[-1], "after a grouped convolution (or padding) that fastnets' "
                                            "convolution does not run")
                continue
            conv_attr = self.getattr_node(conv_node.target, after[-1])
            act_node = after[-1]
            site = self.site(act_node)
            self.replace(after[-1], after[::-1] + [conv_node], fused_conv_act,
                         (conv_attr, conv_node.args[0]), {"residual": residual, "act": act})
            self.report.fused_pattern(pattern_name(True, False, residual, act), self.name(conv_node.target))
            self.report.add("activation", site, fused=True)

    # ---- chains

    _PRODUCERS = {fused_conv_bn: runtime.chain_conv_bn, fused_bn: runtime.chain_bn}

    def _chain_consumer(self, node, src):
        """(new target, new args, new kwargs, label) when `node` can read the Deferred output of `src` in its
        prologue (src its only input that is src), else (None, reason)."""
        if node.op == "call_function" and node.target in (fused_conv_bn, runtime.chain_conv_bn):
            conv_attr, bn_attr, x = node.args[:3]
            others = list(node.args[3:]) + list(node.kwargs.values())
            if node.kwargs.get("residual") is src:
                return None, f"it is the residual added after {self.name(conv_attr.target)}"
            if x is not src or any(o is src for o in others):
                return None, "its user reads it other than as a convolution's input"
            conv = self.gm.get_submodule(conv_attr.target)
            if _zero_padding(conv) is None:
                return None, "the next convolution's padding is not one the prologue runs"
            target = runtime.chained_conv_bn if node.target is fused_conv_bn else node.target
            return (target, node.args, node.kwargs, self.name(conv_attr.target)), None
        m = self.mod(node)
        if m is None:
            what = getattr(node.target, "__name__", str(node.target)) if node.op != "output" else "the output"
            return None, f"its user is {what}, not a convolution or max-pool"
        if len(node.args) != 1 or node.kwargs or node.args[0] is not src:
            return None, f"its user {self.name(node.target)} is called with unusual arguments"
        if _has_hooks(m):
            return None, f"its user {self.name(node.target)} has hooks"
        if _is_conv2d(m):
            if _zero_padding(m) is None:
                return None, "the next convolution's padding is not one the prologue runs"
            fn = runtime.chained_conv
        elif type(m) is nn.MaxPool2d and not m.return_indices:
            fn = runtime.chained_max_pool
        else:
            return None, f"its user is {type(m).__name__}, not a convolution or max-pool"
        return (fn, None, None, self.name(node.target)), None

    def chains(self):
        """fused [conv ->] bn [-> act] -> (its only user) conv / conv_bn / max-pool  ->  chained calls."""
        plan = []
        for node in list(self.graph.nodes):
            if node.op != "call_function" or node.target not in self._PRODUCERS:
                continue
            bn_attr = node.args[1] if node.target is fused_conv_bn else node.args[0]
            bn_name = self.name(bn_attr.target)
            if node.kwargs.get("residual") is not None:
                self.report.add_chain(bn_name, None, reason="followed by an add: a chain's last BatchNorm stays "
                                      "fused with the add and activation")
                continue
            if not _is_bn2d(self.gm.get_submodule(bn_attr.target)):
                self.report.add_chain(bn_name, None, reason="not a plain BatchNorm2d")
                continue
            users = list(node.users)
            if len(users) != 1:
                self.report.add_chain(bn_name, None, reason=f"its output has {len(users)} users "
                                      f"({', '.join(u.name for u in users[:4])})")
                continue
            got, why = self._chain_consumer(users[0], node)
            if got is None:
                self.report.add_chain(bn_name, None, reason=why)
                continue
            plan.append((node, users[0], got, bn_name))
        producers = {node for node, *_ in plan}
        for node, user, (fn, args, kwargs, label), bn_name in plan:
            if args is None:  # a call_module conv / max-pool becomes a call of the chained function
                with self.graph.inserting_before(user):
                    attr = self.graph.get_attr(user.target)
                    new = self.graph.call_function(fn, (attr, node))
                user.replace_all_uses_with(new)
                self.graph.erase_node(user)
            elif user not in producers:  # (a producer's chain_conv_bn takes a Deferred input too)
                user.target = fn
            self.report.add_chain(bn_name, label)
        for node in producers:
            node.target = self._PRODUCERS[node.target]

    def remaining_activations(self):
        """Record each activation left in the graph as unfused, with why."""
        for node in self.graph.nodes:
            act, src = self.activation(node)
            if act is None or node in self.acts_done:
                continue
            producer = self.mod(src)
            what = (type(producer).__name__ if producer is not None else
                    getattr(src.target, "__name__", str(src.target)) if src.op != "placeholder" else "the input")
            self.unfused_act(node, f"follows {what}, not a BatchNorm or convolution it could be fused into"
                             if len(src.users) == 1 else f"its input ({what}) has other users")


class _Tracer(fx.Tracer):
    """torch.nn layers, fastnets' modules, modules with hooks, TorchScript modules, mode-dependent layers
    (drop-path, DropBlock, timm's BatchNormAct2d) and the modules named in `leaf_names` (qualified names:
    registry blocks) are leaves."""

    def __init__(self, leaf_names=()):
        super().__init__()
        self.leaf_names = set(leaf_names)

    def is_leaf_module(self, m, qualname):
        if (_is_fastnets(m) or _has_hooks(m) or isinstance(m, torch.jit.ScriptModule)
                or acts.is_mode_dependent_leaf(m) or qualname in self.leaf_names):
            return True
        return super().is_leaf_module(m, qualname)


def _is_fastnets(m):
    return type(m).__module__.startswith("fastnets.") or getattr(type(m), "_fastnets_converted", False)


def meta_copy(module):
    """A deep copy of `module` whose parameters and buffers are meta tensors (no data is copied). Tracing
    runs the Python of a forward, which may update buffers it reads (timm's BatchNormAct2d counts
    num_batches_tracked), so only this copy is ever traced."""
    memo = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = b.detach().to("meta")
    return copy.deepcopy(module, memo)


def _trace(module, leaf_names=()):
    """(GraphModule, None), or (None, reason). Traces a meta copy of `module` in train and eval mode and
    requires the same code; the torch RNG state is restored afterwards. The GraphModule's root is the copy:
    only its graph and code (naming `module`'s own submodules and parameters by their qualified names) are used."""
    codes, gm = [], None
    with torch.random.fork_rng(devices=_cuda_devices()):
        try:
            probe = meta_copy(module)
            for mode in (True, False):
                probe.train(mode)
                tracer = _Tracer(leaf_names)
                graph = tracer.trace(probe)
                gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
                codes.append(gm.code)
        except Exception as e:  # noqa: BLE001  (anything a forward does with a Proxy can fail)
            return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    if codes[0] != codes[1]:
        return None, "its forward differs between train and eval mode"
    return gm, None


def _cuda_devices():
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def _install_forward(module, forward, tag):
    cls = type(module)
    new_cls = type(cls.__name__, (cls,), {"forward": forward, "_fastnets_converted": tag,
                                           "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    module.__class__ = new_cls


def _copy_constants(gm, module):
    """Tensors the tracer stored on the traced copy (`_tensor_constant0`, ...) onto `module`."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "." not in node.target and not hasattr(module, node.target):
            setattr(module, node.target, getattr(gm, node.target))


def _rewrite(module, prefix, report, leaf_names=()):
    """Trace `module` and fuse its patterns. Returns None when it does not trace, else the names of the
    submodules its graph still calls (leaves of the trace)."""
    gm, reason = _trace(module, leaf_names)
    if gm is None:
        report.untraced.append((prefix, reason))
        return None
    called = OrderedDict.fromkeys(n.target for n in gm.graph.nodes if n.op == "call_module")
    g = _Graph(gm, prefix, report)
    before = report.n_fused()
    g.drop_identities()
    g.squeeze_excite()
    g.batch_norms()
    g.conv_activations()
    g.chains()
    g.remaining_activations()
    if report.n_fused() == before:
        return list(called)
    gm.graph.lint()
    gm.recompile()
    _copy_constants(gm, module)
    _install_forward(module, type(gm).forward, "fx")
    module._fastnets_code = gm.code
    report.traced.append(prefix)
    return list(called)
