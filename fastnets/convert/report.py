"""ConversionReport: what `convert` fused, swapped, rewrote, and what it left and why."""
from collections import OrderedDict

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
