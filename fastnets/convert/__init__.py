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

The package's parts: fx_rewrite (the torch.fx pattern rewriter), registry (fused forwards of known blocks),
report (ConversionReport), runtime (the fused calls that rewritten graphs make).
"""
import copy

import torch
from torch import nn

from ..nn.batch_norm import BatchNorm2d as FastBatchNorm2d
from ..nn.conv import Conv2d as FastConv2d
from . import acts
from .fx_rewrite import _cuda_devices, _has_hooks, _install_forward, _is_fastnets, _rewrite, _trace
from .registry import _REGISTRY, _ensure_registry, register_block
from .report import ConversionReport

__all__ = ["convert", "ConversionReport", "register_block"]


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
    if isinstance(module, torch.jit.ScriptModule):
        report.skipped.append((prefix or "<model>", "a TorchScript module (left as it is)"))
        return
    if _is_fastnets(module) or not list(module.children()) or acts.is_mode_dependent_leaf(module):
        return  # fastnets' own modules, leaf layers (swapped later when they are BatchNorm2d/Conv2d), drop-path
    fwd = _registry_forward(module, cache)
    if fwd is not None:
        if callable(fwd):
            _install_forward(module, fwd, "registry")
            report.registry.append((prefix, f"{type(module).__module__.split('.')[0]} {type(module).__name__}"))
            _record_registry_block(module, prefix, report, fwd)
            return
        report.skipped.append((prefix or "<model>", f"registry block not converted: {fwd}"))
    elif _has_forward(module):
        # known blocks that do not trace are leaves of the trace, converted from the registry
        leaves = [(n, m) for n, m in module.named_modules()
                  if m is not module and type(m) in _REGISTRY and callable(_registry_forward(m, cache))]
        called = _rewrite(module, prefix, report, leaf_names=[n for n, _ in leaves])
        if called is not None:
            # leaves of the trace that hold modules of their own: registry blocks, modules with hooks
            for name in called:
                m = module.get_submodule(name)
                if list(m.children()):
                    _convert(m, f"{prefix}.{name}" if prefix else name, report, cache)
            return
    for name, child in module.named_children():
        _convert(child, f"{prefix}.{name}" if prefix else name, report, cache)


def _record_registry_block(block, prefix, report, fwd=None):
    """A registry forward fuses every BatchNorm, activation and squeeze-excite of its block, and chains the
    (bn, conv) pairs its `chains` attribute names (fastnets.models' block forwards)."""
    for bn, conv in getattr(fwd, "chains", ()):
        report.add_chain(f"{prefix}.{bn}" if prefix else bn, f"{prefix}.{conv}" if prefix else conv)
    for name, m in block.named_modules():
        full = f"{prefix}.{name}" if prefix and name else prefix or name
        if isinstance(m, nn.BatchNorm2d):
            report.add("batchnorm", full, fused=True)
        elif type(m) is nn.ReLU:
            report.add("activation", full, fused=True)
        elif acts.is_se_module(m):
            report.add("se", full, fused=True)


def _swap_layers(model, report):
    for name, m in model.named_modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = FastBatchNorm2d
            report.swapped["BatchNorm2d"].append(name)
        elif type(m) is nn.Conv2d:
            m.__class__ = FastConv2d
            report.swapped["Conv2d"].append(name)


def convert(model, inplace=False, return_report=False, verbose=False, sync_bn=False, process_group=None):
    """Return `model` with its BatchNorm2d, Conv -> BN (-> ReLU), BN -> ReLU, BN -> add -> ReLU and
    squeeze-excite patterns on fastnets kernels (see the module docstring). `inplace=False` converts a deep
    copy (the original is untouched); a model with nothing to replace is returned as it is (the same object).
    `return_report=True` returns (model, ConversionReport); `verbose=True` prints the report.
    `sync_bn=True` then turns every BatchNorm into fastnets.nn.SyncBatchNorm (fused ones keep their fusion)
    reducing over `process_group` (default: the whole world), for training under DDP."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("convert expects an eager torch.nn.Module, got a TorchScript module "
                        f"({type(model).__name__}); convert the eager model first, then script the result")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    _ensure_registry()
    with torch.random.fork_rng(devices=_cuda_devices()):  # nothing here may draw from the user's RNG
        work = model if inplace else copy.deepcopy(model)
        report = ConversionReport(type(model).__name__)
        _convert(work, "", report, {})
        _swap_layers(work, report)
        report.finish(work)
        synced = _sync_batch_norms(work, process_group, report) if sync_bn else []
        if sync_bn and isinstance(work, nn.modules.batchnorm._BatchNorm):
            from ..nn.sync_batch_norm import SyncBatchNorm

            work, synced = SyncBatchNorm.convert_sync_batchnorm(work, process_group), [""]
    result = work if report.changed or synced else model
    if verbose:
        print(report)
    return (result, report) if return_report else result


def _sync_batch_norms(model, process_group, report):
    """convert(sync_bn=True): every BatchNorm whose own forward is torch's or fastnets' BatchNorm forward,
    or whose forward no longer runs because a fused call uses it as its state, becomes a SyncBatchNorm
    sharing its parameters and buffers. A BatchNorm subclass with a forward of its own that still runs
    (it would lose what that forward adds) is refused, never left silently per-rank."""
    from ..nn.sync_batch_norm import SyncBatchNorm

    known = (nn.BatchNorm1d.forward, nn.BatchNorm2d.forward, nn.BatchNorm3d.forward,
             nn.SyncBatchNorm.forward)
    targets, refused = [], []
    for name, m in model.named_modules():
        if not name or not isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, SyncBatchNorm):
            continue  # (a model that is itself a BatchNorm is converted by convert())
        runs_fused = name in report.layers["batchnorm"] and report.layers["batchnorm"][name] is None
        if runs_fused or type(m).forward in known or _is_fastnets(m):
            targets.append(name)
        else:
            refused.append(f"{name} ({type(m).__module__}.{type(m).__name__})")
    if refused:
        raise ValueError(
            "convert(sync_bn=True) cannot synchronise these BatchNorm layers, whose classes have their own "
            f"forward that still runs unfused: {', '.join(refused)}; convert them with their library's own "
            "SyncBatchNorm conversion first (e.g. timm.layers.convert_sync_batchnorm)"
        )
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, SyncBatchNorm.convert_sync_batchnorm(getattr(parent, attr), process_group))
    report.synced = targets
    return targets
