"""ConversionReport: what `convert` fused, swapped, rewrote, and every BatchNorm / activation /
squeeze-excite it left unfused, with the reason."""
from collections import OrderedDict

from torch import nn

from . import acts

KINDS = ("batchnorm", "activation", "se")


class ConversionReport:
    """What `convert` did. `print(report)` gives a summary; the attributes hold the details:
    fused: pattern -> list of the module names of each match (conv_bn_relu, conv_bn_add_relu, bn_silu, conv_relu,
    se_add_relu, ...); swapped: "BatchNorm2d"/"Conv2d" -> names of modules whose class became fastnets';
    traced: modules rewritten with torch.fx ("" is the model); registry: (name, block class) converted from the
    registry; untraced: (name, reason) modules that did not trace (their children were converted instead);
    skipped: (what, reason) candidates left as they were; layers: kind -> {name: None when it runs fused, else
    the reason it does not} for every BatchNorm2d, activation (each call of one) and squeeze-excite module;
    chained: "bn -> consumer" for every fused BatchNorm whose apply + act run, in training, in the next
    convolution's (or max-pool's) prologue (fastnets.nn.conv_chain); unchained: (bn, reason) for every fused
    BatchNorm that is not (its output has another user, it ends in an add, ...)."""

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
        self.synced = []  # BatchNorms made SyncBatchNorm by convert(sync_bn=True)
        self.layers = {k: OrderedDict() for k in KINDS}
        self.chained = []
        self.unchained = []

    # ---- recording (used by the rewriter, the registry and convert)

    def fused_pattern(self, pattern, label):
        self.fused.setdefault(pattern, []).append(label)

    def n_fused(self):
        return sum(len(v) for v in self.fused.values())

    def add_chain(self, bn, consumer, reason=None):
        """BatchNorm `bn`'s apply runs in `consumer`'s prologue (consumer None: it does not, because `reason`)."""
        if consumer is not None:
            self.chained.append(f"{bn} -> {consumer}")
        else:
            self.unchained.append((bn, reason))

    def add(self, kind, name, fused, reason=None):
        """Record that layer `name` of `kind` runs fused (or not, and why). A layer called more than once
        is fused only if every call is."""
        if kind not in self.layers:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if fused:
            self.layers[kind].setdefault(name, None)
        elif self.layers[kind].get(name) is None:
            self.layers[kind][name] = reason or "not matched"

    def finish(self, model):
        """Record every BatchNorm2d, activation module and squeeze-excite module of the converted `model` that
        no pattern saw, with the reason (the module above it that did not trace, a TorchScript module, ...)."""
        untraced = dict(self.untraced)
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                kind = "batchnorm"
            elif _is_activation_module(m):
                kind = "activation"
            elif acts.is_se_module(m):
                kind = "se"
            else:
                continue
            if name in self.layers[kind] or (kind == "se" and any(n.startswith(name + ".")
                                                                   for n in self.layers["se"])):
                continue
            self.add(kind, name, fused=False, reason=_why_unseen(name, untraced, self.skipped))
        for kind in KINDS:
            self.layers[kind] = OrderedDict(sorted(self.layers[kind].items()))

    # ---- reading

    @property
    def changed(self):
        return any(self.fused.values()) or any(self.swapped.values()) or bool(self.registry)

    def counts(self):
        out = {k: len(v) for k, v in self.fused.items() if v}
        out.update({f"{k} (module)": len(v) for k, v in self.swapped.items() if v})
        return out

    @property
    def unfused(self):
        """[(kind, name, reason)] for every BatchNorm, activation and squeeze-excite left unfused."""
        return [(k, n, r) for k in KINDS for n, r in self.layers[k].items() if r is not None]

    def shares(self):
        """kind -> (fused, total): how many of the model's BatchNorms, activations and SEs run fused."""
        return {k: (sum(r is None for r in self.layers[k].values()), len(self.layers[k])) for k in KINDS}

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
        shares = self.shares()
        if any(total for _, total in shares.values()):
            lines.append("  running fused: " + ", ".join(f"{k} {f}/{t}" for k, (f, t) in shares.items() if t))
        if self.chained:
            lines.append(f"  chained (BN-apply + act in the next conv's prologue in training) x{len(self.chained)}: "
                         f"e.g. {', '.join(self.chained[:3])}")
        if self.unchained:
            lines.append(f"  not chained ({len(self.unchained)}): "
                         + "; ".join(f"{n}: {r}" for n, r in self.unchained[:4])
                         + (f" (+{len(self.unchained) - 4} more in report.unchained)" if len(self.unchained) > 4 else ""))
        if self.untraced:
            lines.append(f"  not traceable ({len(self.untraced)}), children converted instead: "
                         + "; ".join(f"{n or '<model>'}: {r}" for n, r in self.untraced[:4]))
        if self.skipped:
            lines.append(f"  left as they were ({len(self.skipped)}): "
                         + "; ".join(f"{w}: {r}" for w, r in self.skipped[:6]))
        unfused = self.unfused
        if unfused:
            lines.append(f"  unfused ({len(unfused)}):")
            for kind, name, reason in unfused[:12]:
                lines.append(f"    {kind} {name or '<model>'}: {reason}")
            if len(unfused) > 12:
                lines.append(f"    ... (+{len(unfused) - 12} more in report.unfused)")
        return "\n".join(lines)

    __repr__ = __str__


_NOT_ACTIVATIONS = ("Sigmoid", "Hardsigmoid", "HardSigmoid", "Softmax", "Softmax2d", "LogSoftmax", "Softmin",
                    "MultiheadAttention", "Threshold", "GLU", "Identity")


def _is_activation_module(m):
    """An activation layer (torch.nn's or timm's), squeeze-excite gates and softmaxes excepted."""
    mod = type(m).__module__
    if not (mod == "torch.nn.modules.activation" or mod.startswith("timm.layers.activations")):
        return False
    return type(m).__name__ not in _NOT_ACTIVATIONS


def _why_unseen(name, untraced, skipped):
    """Why a layer no pattern saw was left: the nearest module above it that did not trace, or a skip."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        parent = ".".join(parts[:i])
        if parent in untraced:
            return f"inside {parent or '<model>'}, which does not trace ({untraced[parent]})"
    for what, why in skipped:
        if what == "<model>" and not name or name.startswith(what + ".") or what == name:
            return f"inside {what}: {why}"
    return "not reached by any pattern"
