"""What the audit compiles and the traffic model counts: the kernels that real training steps launch.

A network (fastnets.models' ResNet-50, SE-ResNet-50, VGG-16: every fused kernel that applies is used) runs a
forward and a backward pass on `meta` tensors at batch 256, on fastnets' Triton kernels, as on an H100:

  - the custom ops' bodies run instead of their fake kernels, with the Triton backend resolved as on a CUDA
    device (`on_meta`), so the ops compose their primitives and torch's own small kernels exactly as on a
    GPU, autograd included;
  - every Triton launch is recorded (compile.Recorder), never run; the launch plans see an H100's 132 SMs;
  - every torch (aten) operation is recorded too, by a dispatch mode, with its tensors (the traffic model
    prices them as torch's kernels);
  - conv's autotuned launches record (configs="all") every configuration the autotuner keeps after pruning
    (one group: the alternatives it would time), the FASTNETS_CONV_TUNE=fixed and `quick` configurations;
    configs="first": the fixed one and the first kept one; configs="model": only the first kept one (the
    traffic model's choice: the autotuner's pick is known only on a GPU).

Eager PyTorch's step is recorded the same way (torchvision / timm's models, torch's kernels): the model's
baseline.
"""
import contextlib
import importlib
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _ac():
    """fastnets.audit.compile, imported when first needed: it needs TRITON_INTERPRET=0, while the op cases
    below also serve python -m fastnets.audit.measure, which runs them for real (the GPU check's dry run
    under the interpreter)."""
    from . import compile

    return compile


BATCH = 256
NETS = ("resnet50", "se_resnet50", "vgg16")
# dtype/layout combinations the audit covers: name -> (dtype, channels_last)
COMBOS = {
    "bf16-cl": (torch.bfloat16, True),
    "fp16-cl": (torch.float16, True),
    "bf16-nchw": (torch.bfloat16, False),
    "fp32-cl": (torch.float32, True),  # TF32 tensor cores (cuDNN's conv fp32_precision flag, torch's default)
}
# the plan functions of the Triton modules that ask the device for its SM count (or whether it is a GPU)
PLAN_FUNCTIONS = ("_target_programs", "_wgrad_target_programs", "_split", "sm_count")
TRITON_MODULES = ("batch_norm", "squeeze_excite", "conv", "conv_prologue", "augment")

# torch operations that launch no kernel on a GPU
VIEW_OPS = {
    "aten.view", "aten._unsafe_view", "aten.t", "aten.expand", "aten.as_strided", "aten.squeeze", "aten.unsqueeze",
    "aten.detach", "aten.alias", "aten.permute", "aten.transpose", "aten.slice", "aten.select", "aten.reshape",
    "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
    "aten.lift_fresh", "aten._reshape_alias", "aten.split", "aten.split_with_sizes", "aten.unbind", "aten.narrow",
    "aten.as_strided_", "aten.is_same_size", "aten.sym_size", "aten.sym_stride", "aten.sym_numel", "aten.flatten",
    "aten.unflatten", "aten.squeeze_", "aten.unsqueeze_", "aten._local_scalar_dense", "aten.set_", "aten.resize_",
}


class AtenOp:
    """One torch operation run inside the step: its name (aten.mul), the tensors it read and wrote (shape,
    dtype, numel of the elements actually addressed) and what it computed (conv/mm FLOPs)."""

    __slots__ = ("name", "inputs", "outputs", "args", "context")

    def __init__(self, name, inputs, outputs, args, context):
        self.name, self.inputs, self.outputs, self.args, self.context = name, inputs, outputs, args, context


def _tensors(x):
    out = []
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for v in x:
            out.extend(_tensors(v))
    elif isinstance(x, dict):
        for v in x.values():
            out.extend(_tensors(v))
    return out


class Trace:
    """The kernels one step launches, in order: ("triton", compile.Launch, op context) and ("aten", AtenOp)."""

    def __init__(self):
        self.events = []
        self.context = []  # the custom ops (fastnets::conv2d_stats, ...) the current kernels run inside

    def op_name(self):
        """The fastnets op the current kernels run in, else, in a backward pass, the autograd node running
        them (backward of a torch op or of a Python autograd.Function: `_BatchStatsBackward`), else ""."""
        if self.context:
            return self.context[-1]
        node = torch._C._current_autograd_node() if hasattr(torch._C, "_current_autograd_node") else None
        return f"autograd: {type(node).__name__}" if node is not None else ""


class _AtenRecorder(TorchDispatchMode):
    def __init__(self, trace):
        super().__init__()
        self.trace = trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket)
        ins, outs = _tensors(args) + _tensors(kwargs), _tensors(out)
        # a non-mutating op that returns its own input (x.to(x.dtype), x.contiguous()) launches nothing
        returns_input = not name.endswith("_") and outs and all(any(o is i for i in ins) for o in outs)
        if not name.startswith("fastnets") and name not in VIEW_OPS and not returns_input:
            self.trace.events.append(("aten", AtenOp(str(func), ins, outs, (args, kwargs), self.trace.op_name())))
        return out


# ------------------------------------------------------------------------------------------ the patches


def _all_configs_launch(rec, configs, original):
    """conv._launch replaced: record the configurations the audit compiles (see the module docstring)."""
    import fastnets.triton_kernels.conv as cv

    quick = _config_lists_under("quick")

    def launch(tuned, raw, grid, *args, **kwargs):
        what = rec.what
        if kwargs["FP64"]:
            return original(tuned, raw, grid, *args, **kwargs)
        named = dict(zip(raw.arg_names, args))
        kept = tuned.early_config_prune(tuned.configs, named, **kwargs)
        if configs == "model":
            c = min(kept, key=lambda c: _padded_work(raw.__name__, named, kwargs, grid, c))
            with rec.label(f"{what} {raw.__name__} autotuned[0]"):
                raw[grid(c.kwargs)](*args, **kwargs, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            return dict(c.kwargs)
        os.environ["FASTNETS_CONV_TUNE"] = "fixed"
        try:
            with rec.label(f"{what} {raw.__name__} fixed"):
                cfg = original(tuned, raw, grid, *args, **kwargs)
        finally:
            os.environ.pop("FASTNETS_CONV_TUNE", None)
        q = quick[1] if raw is cv._conv_wgrad_kernel else quick[0]
        for label, cs in (("autotuned", kept), ("quick", q)) if configs == "all" else (("autotuned", kept[:1]),):
            with rec.label(f"{what} {raw.__name__} {label}"), rec.group(label):
                for c in cs:
                    raw[grid(c.kwargs)](*args, **kwargs, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        return cfg

    return launch


def _padded_work(kernel, named, kwargs, grid, cfg):
    """Multiply-adds the tiles of configuration `cfg` issue, padding included (the traffic model's choice
    among the kept configurations: the autotuner's pick is known only on a GPU; the least padded work,
    the first kept one on a tie)."""
    from .model import conv_iterations

    g = tuple(grid(cfg.kwargs)) + (1, 1)
    k = cfg.kwargs
    it = conv_iterations(kernel, dict(named, **kwargs, **k))
    return g[0] * g[1] * g[2] * k["BLOCK_M"] * k["BLOCK_N"] * k["BLOCK_K"] * (it or 1)


def _config_lists_under(tune):
    """The conv module's (_GEMM_CONFIGS, _WGRAD_CONFIGS) as FASTNETS_CONV_TUNE=`tune` defines them."""
    spec = importlib.util.find_spec("fastnets.triton_kernels.conv")
    mod = importlib.util.module_from_spec(spec)
    saved = os.environ.get("FASTNETS_CONV_TUNE")
    os.environ["FASTNETS_CONV_TUNE"] = tune
    try:
        spec.loader.exec_module(mod)
    finally:
        if saved is None:
            os.environ.pop("FASTNETS_CONV_TUNE", None)
        else:
            os.environ["FASTNETS_CONV_TUNE"] = saved
    return mod._GEMM_CONFIGS, mod._WGRAD_CONFIGS


@contextlib.contextmanager
def _patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@contextlib.contextmanager
def on_meta(rec, trace=None, configs="all"):
    """Inside: fastnets' ops on meta tensors run their real bodies on the Triton backend as on an H100, every
    Triton launch is recorded into `rec` (with the op it ran in, when `trace` is given)."""
    os.environ["FASTNETS_POISON_OUTPUTS"] = "0"
    import fastnets  # noqa: F401  (registers the ops)
    from torch._library.custom_ops import CustomOpDef

    from fastnets.ops import _registry

    _ac().simulate_h100()
    tk = {m: importlib.import_module(f"fastnets.triton_kernels.{m}") for m in TRITON_MODULES}
    with contextlib.ExitStack() as stack:
        for mod in tk.values():
            for name in PLAN_FUNCTIONS:
                if hasattr(mod, name):
                    stack.enter_context(_patched(mod, name, _cuda_device_wrapper(getattr(mod, name))))
        original_kernels = _registry.kernels

        def kernels(family, backend, device):
            return original_kernels(family, "triton", torch.device("cuda"))

        for name, mod in list(sys.modules.items()):
            if name.startswith("fastnets.") and getattr(mod, "kernels", None) is original_kernels:
                stack.enter_context(_patched(mod, "kernels", kernels))
        stack.enter_context(_patched(_registry, "kernels", kernels))
        import fastnets.backends as fb

        stack.enter_context(_patched(fb, "unavailable_reason", lambda name, device=None: None))
        is_autocast = torch.is_autocast_enabled
        stack.enter_context(_patched(torch, "is_autocast_enabled",
                                     lambda *a: False if a and a[0] == "meta" else is_autocast(*a)))
        cv = tk["conv"]
        stack.enter_context(_patched(cv, "_launch", _all_configs_launch(rec, configs, cv._launch)))
        for mname, mod in list(sys.modules.items()):
            if not mname.startswith("fastnets.ops"):
                continue
            for op in vars(mod).values():
                if isinstance(op, CustomOpDef) and op._namespace == "fastnets":
                    stack.enter_context(_patched(op, "_abstract_fn", _real_body(op, rec, trace)))
        stack.enter_context(rec)
        yield


def _cuda_device_wrapper(fn):
    def wrapped(*args, **kwargs):
        fix = lambda v: torch.device("cuda", 0) if isinstance(v, torch.device) and v.type == "meta" else v  # noqa: E731
        return fn(*map(fix, args), **{k: fix(v) for k, v in kwargs.items()})

    return wrapped


def _real_body(op, rec, trace):
    body = op._init_fn

    def run(*args, **kwargs):
        if trace is not None:
            trace.context.append(op._name)
        with rec.label(f"{rec.what} {op._name}".strip()):
            try:
                if trace is None:
                    return body(*args, **kwargs)
                with _AtenRecorder(trace):
                    return body(*args, **kwargs)
            finally:
                if trace is not None:
                    trace.context.pop()

    return run


# ------------------------------------------------------------------------------------------ networks


def build(net, eager=False):
    """The network: fastnets.models' (fastnets kernels everywhere) or, with eager, torchvision's / timm's."""
    if eager:
        if net == "se_resnet50":
            import timm

            return timm.create_model("seresnet50")
        import torchvision

        return getattr(torchvision.models, net)()
    import fastnets.models as fm

    return getattr(fm, net)()


def _to_meta(model, dtype, channels_last):
    with torch.device("meta"):
        model = model.to(device="meta", dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _input(dtype, channels_last, batch=BATCH, size=224):
    return _ac().meta((batch, 3, size, size), dtype, channels_last)


def step(model, x, train=True):
    """One training step's forward and backward (train: the gradients of the parameters, taken with
    autograd.grad, so that no .grad accumulation is recorded), or an inference forward."""
    if train:
        model.train()
        out = model(x.requires_grad_(False))
        params = [p for p in model.parameters() if p.requires_grad]
        torch.autograd.grad(out, params, torch.empty_like(out))
    else:
        model.eval()
        with torch.no_grad():
            model(x)


def _run(fn, rec, trace, configs):
    """fn() on fastnets' Triton kernels on meta tensors, launches into rec (and trace)."""
    conv = getattr(torch.backends.cudnn, "conv", None)  # torch >= 2.9: the flag cuDNN and the Triton conv read
    new_api = conv is not None and hasattr(torch.backends, "fp32_precision")
    old = conv.fp32_precision if new_api else torch.backends.cudnn.allow_tf32
    if new_api:
        conv.fp32_precision = "tf32"
    else:
        torch.backends.cudnn.allow_tf32 = True
    try:
        with on_meta(rec, trace, configs):
            if trace is None:
                fn()
            else:
                with _AtenRecorder(trace):
                    fn()
    finally:
        if new_api:
            conv.fp32_precision = old
        else:
            torch.backends.cudnn.allow_tf32 = old


def _network(net, combo, train, batch, eager):
    dtype, cl = COMBOS[combo]
    with torch.device("meta"):
        model = build(net, eager=eager)
    model = _to_meta(model, dtype, cl)
    x = _input(dtype, cl, batch)
    return lambda: step(model, x, train)


def record_network(rec, net, combo="bf16-cl", train=True, configs="all", batch=BATCH, trace=None):
    """Record the Triton launches (into rec) of one step of `net` at `batch` for the dtype/layout `combo`."""
    fn = _network(net, combo, train, batch, eager=False)
    with rec.label(f"{net} {combo} {'train' if train else 'eval'}"):
        _run(fn, rec, trace, configs)


def _trace(fn, eager):
    trace = Trace()
    if eager:
        with _AtenRecorder(trace):
            fn()
        return trace
    rec = _ac().Recorder()
    rec.on_launch = lambda ln: trace.events.append(("triton", ln, trace.op_name()))
    _run(fn, rec, trace, "model")
    return trace


def trace_network(net, combo="bf16-cl", train=True, eager=False, batch=BATCH):
    """The ordered kernels of one step (Trace): fastnets' (first kept conv configuration) or eager torch's."""
    return _trace(_network(net, combo, train, batch, eager), eager)


# ------------------------------------------------------------------------------------------ single ops
#
# Each op case builds, for a device, dtype and layout, a fastnets module and the eager torch module computing
# the same thing, and their inputs; one "step" of an op is its forward and its backward (against a given
# output gradient), or the forward only where the op has no backward. Shapes are ResNet-50's at batch 256.


class _BNAct(torch.nn.Module):
    def __init__(self, c, residual, fast):
        super().__init__()
        self.bn, self.residual, self.fast = torch.nn.BatchNorm2d(c), residual, fast

    def forward(self, x, r=None):
        if self.fast:
            from fastnets.nn import bn_act

            return bn_act(self.bn, x, residual=r, relu=True)
        y = self.bn(x)
        return torch.relu_(y + r if r is not None else y)  # in place, as torchvision's blocks


class _ConvBNAct(torch.nn.Module):
    def __init__(self, c, cout, k, fast):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, cout, k, padding=k // 2, bias=False)
        self.bn, self.fast = torch.nn.BatchNorm2d(cout), fast

    def forward(self, x):
        if self.fast:
            from fastnets.nn import conv_bn_act

            return conv_bn_act(self.conv, self.bn, x, relu=True)
        return torch.relu_(self.bn(self.conv(x)))


class _Conv(torch.nn.Module):
    def __init__(self, c, cout, k, fast):
        super().__init__()
        import fastnets.nn as fnn

        self.conv = (fnn.Conv2d if fast else torch.nn.Conv2d)(c, cout, k, padding=k // 2, bias=False)

    def forward(self, x):
        return self.conv(x)


class _SE(torch.nn.Module):
    def __init__(self, c, r, fast):
        super().__init__()
        self.fast = fast
        if fast:
            from fastnets.nn import SqueezeExcite

            self.se = SqueezeExcite(c, r)
        else:
            import timm

            self.se = timm.layers.SEModule(c, rd_channels=r)

    def forward(self, x, res):
        if self.fast:
            return self.se(x, residual=res, relu=True)
        return torch.relu_(self.se(x) + res)


def _bottleneck(fast):
    if fast:
        from fastnets.models.resnet import Bottleneck
    else:
        from torchvision.models.resnet import Bottleneck
    return Bottleneck(256, 64)


class _Augment(torch.nn.Module):
    """fastnets' augmentation op (random resized crop and flip, colour, noise) of decoded uint8 images to a
    bf16 channels_last batch; no eager torch op does the same in one call, so it has no eager row."""

    def forward(self, x):
        n = x.shape[0]
        f32 = torch.float32
        mat = torch.empty((n, 3, 3), dtype=f32, device=x.device)
        if x.is_meta:  # the op validates its matrices on the host: on meta tensors, its kernel's launcher
            import fastnets.triton_kernels.augment as aug

            out = _ac().meta((n, x.shape[1], 224, 224), torch.bfloat16, True)
            box, col = torch.empty((n, 4), dtype=f32, device="meta"), torch.empty((n, 3), dtype=f32, device="meta")
            seed, vec = torch.empty((1,), dtype=torch.int64, device="meta"), torch.empty((3,), dtype=f32, device="meta")
            aug.apply(x, mat, box, col, True, True, True, seed, 0.0, 0.0, True, vec, vec, False, 0.0, out)
            return out
        from fastnets.ops.augment import augment_apply

        return augment_apply(x, mat, (224, 224), box=torch.empty((n, 4), dtype=f32, device=x.device),
                             colour=torch.empty((n, 3), dtype=f32, device=x.device), brightness=True,
                             contrast=True, saturation=True, out_dtype=torch.bfloat16, channels_last=True)


# name -> (what, make(fast) -> module, input shapes (N, C, H, W) with their role, output grad?)
OPS = {
    "bn_relu": ("BatchNorm + ReLU, train", lambda fast: _BNAct(256, False, fast), [(BATCH, 256, 56, 56)], True),
    "bn_add_relu": ("BatchNorm + residual add + ReLU, train", lambda fast: _BNAct(256, True, fast),
                    [(BATCH, 256, 56, 56), (BATCH, 256, 56, 56)], True),
    "conv3x3": ("conv 3x3 64->64", lambda fast: _Conv(64, 64, 3, fast), [(BATCH, 64, 56, 56)], True),
    "conv1x1": ("conv 1x1 256->64", lambda fast: _Conv(256, 64, 1, fast), [(BATCH, 256, 56, 56)], True),
    "conv_bn_relu": ("conv 1x1 256->64 + BatchNorm + ReLU, train", lambda fast: _ConvBNAct(256, 64, 1, fast),
                     [(BATCH, 256, 56, 56)], True),
    "bottleneck": ("ResNet-50 bottleneck 256->64->256 at 56x56, train (BN-ReLU in the next conv's prologue)",
                   _bottleneck, [(BATCH, 256, 56, 56)], True),
    "squeeze_excite": ("squeeze-excite (C=256, R=16) + residual add + ReLU", lambda fast: _SE(256, 16, fast),
                       [(BATCH, 256, 56, 56), (BATCH, 256, 56, 56)], True),
    "augment": ("augmentation: uint8 375x500 -> bf16 224x224 channels_last", lambda fast: _Augment(),
                [(BATCH, 3, 375, 500)], False),
}


def op_inputs(name, device, dtype, cl, batch=None):
    _, _, shapes, _ = OPS[name]
    out = []
    for shp in shapes:
        shp = (batch or shp[0],) + tuple(shp[1:])
        if name == "augment":
            out.append(torch.empty(shp, dtype=torch.uint8, device=device))
            continue
        fmt = torch.channels_last if cl else torch.contiguous_format
        out.append(torch.empty(shp, dtype=dtype, device=device).to(memory_format=fmt).requires_grad_(True))
    return out


def op_module(name, device, dtype, cl, fast):
    _, make, _, _ = OPS[name]
    with torch.device("meta" if device == "meta" else "cpu"):
        mod = make(fast)
    mod = mod.to(device=device, dtype=dtype)
    if cl:
        mod = mod.to(memory_format=torch.channels_last)
    return mod.train()


def op_step(mod, inputs, backward):
    """Forward, and the backward to every input and parameter (autograd.grad: no .grad accumulation)."""
    out = mod(*inputs)
    if backward:
        wrt = [t for t in inputs if t.requires_grad] + [p for p in mod.parameters() if p.requires_grad]
        torch.autograd.grad(out, wrt, torch.empty_like(out))
    return out


def trace_op(name, combo="bf16-cl", eager=False, batch=BATCH):
    """The ordered kernels of one forward + backward of an op case (Trace), fastnets' or eager torch's."""
    dtype, cl = COMBOS[combo]
    mod = op_module(name, "meta", dtype, cl, fast=not eager)
    inputs = op_inputs(name, "meta", dtype, cl, batch)
    return _trace(lambda: op_step(mod, inputs, OPS[name][3]), eager)


def record_batch_norm(rec, net="resnet50", combo="bf16-cl", batch=BATCH, shapes=None):
    """The standalone BatchNorm launches (statistics, apply, backward) at every BatchNorm shape of `net`, with
    ReLU and with residual + ReLU, train (forward + backward) and eval (the networks fuse most BatchNorms into
    their convolutions; the standalone kernels serve every other model)."""
    from fastnets.nn import bn_act

    from .shapes import bn_shapes

    dtype, cl = COMBOS[combo]
    for shp in shapes or bn_shapes(net, batch):
        with torch.device("meta"):
            bn = torch.nn.BatchNorm2d(shp[1])
        bn = bn.to(dtype=dtype)
        fmt = torch.channels_last if cl else torch.contiguous_format

        def run():
            for residual in (False, True):
                x = torch.empty(shp, dtype=dtype, device="meta").to(memory_format=fmt).requires_grad_(True)
                r = torch.empty_like(x).requires_grad_(True) if residual else None
                bn.train()
                y = bn_act(bn, x, residual=r, relu=True)
                y.backward(torch.empty_like(y))
                bn.eval()
                with torch.no_grad():
                    bn_act(bn, x, residual=r, relu=True)

        with rec.label(f"batch_norm {combo} {'x'.join(map(str, shp))}"):
            _run(run, rec, None, "all")


def augment_launches(rec):
    """The augmentation kernel's launches: ImageNet-style decoded uint8 images to a bf16 channels_last 224x224
    batch (crop/flip/colour/noise on, and the plain resample), and CIFAR-10 (32x32), as in tests/triton_aot.py."""
    import fastnets.triton_kernels.augment as aug

    F32, U8, BF16 = torch.float32, torch.uint8, torch.bfloat16
    for shape, (oh, ow) in (((BATCH, 3, 375, 500), (224, 224)), ((BATCH, 3, 32, 32), (32, 32))):
        n, c = shape[:2]
        ac = _ac()
        x = ac.meta(shape, U8)
        out = ac.meta((n, c, oh, ow), BF16, True)
        mat, box, col = ac.meta((n, 3, 3), F32), ac.meta((n, 4), F32), ac.meta((n, 3), F32)
        seed, vec = ac.meta((1,), torch.int64), ac.meta((c,), F32)
        with rec, rec.label(f"augment {shape}->{(oh, ow)} uint8 -> bf16 channels_last"):
            for nearest in (False, True):
                aug.apply(x, mat, box, col, True, True, True, seed, 0.0, 0.1, True, vec, vec, nearest, 0.0, out)
            aug.apply(x, mat, None, None, False, False, False, None, 0.0, 0.0, True, None, None, False, 0.0, out)
