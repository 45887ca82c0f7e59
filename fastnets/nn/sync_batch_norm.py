"""Drop-in torch.nn.SyncBatchNorm on fastnets kernels, and the fused SyncBatchNormReLU2d / SyncBatchNormAct2d
(SyncBN + residual add + ReLU / any activation of fastnets.activations, in one pass each way).

Same constructor (process_group included), attributes, state_dict keys and `convert_sync_batchnorm` as
torch.nn.SyncBatchNorm. In training with more than one rank in the group, the statistics of the whole
group's batch are used (fastnets/ops/sync_batch_norm.py); in eval mode, or when torch.distributed is not
initialised or the group has one rank, it runs exactly as fastnets' single-GPU BatchNorm (bn_act).

Two deliberate differences from torch's class: it also runs on CPU tensors (gloo), and it is not a
subclass of torch.nn.SyncBatchNorm, because DDP refuses CPU modules that contain one ("SyncBatchNorm
layers only work with GPU modules").
"""
import inspect

import torch
import torch.distributed as dist
from torch import nn

from .. import _checks, activations
from ..ops.sync_batch_norm import check_group_agrees, sync_batch_norm
from .batch_norm import BatchNormAct2d, BatchNormReLU2d, bn_act

_BatchNorm = nn.modules.batchnorm._BatchNorm
# torch added the `bias` keyword to the BatchNorm constructors recently; older ones get it emulated
_TORCH_HAS_BIAS_ARG = "bias" in inspect.signature(_BatchNorm.__init__).parameters


def _sync_devices():
    return ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name(), "cpu")


class SyncBatchNorm(_BatchNorm):
    """torch.nn.SyncBatchNorm on fastnets kernels: input (N, C, *) with 1 to 3 trailing dims, NCHW or
    channels_last; the per-rank batch sizes may differ and a rank's batch may be empty."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, bias=True):
        kw = {"device": device, "dtype": dtype}
        if _TORCH_HAS_BIAS_ARG:
            kw["bias"] = bias
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kw)
        if not _TORCH_HAS_BIAS_ARG and affine and not bias:
            self.register_parameter("bias", None)
        self.process_group = process_group
        # id of the group whose ranks were checked to agree on the channel count (an id, not the group
        # object, so that copy.deepcopy and pickling of the module keep working as for torch's class)
        self._agreed_group = None

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.dim() > 5:
            raise ValueError(f"fastnets SyncBatchNorm supports 2D to 5D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _check(self, input, residual):
        _checks.check_float(input, "input")
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"input has {input.shape[1]} channels (dim 1 of shape {tuple(input.shape)}) but "
                f"{type(self).__name__} expects num_features={self.num_features}"
            )
        if residual is not None:
            _checks.check_like(residual, "residual", input, "input")

    def group(self):
        """The process group the statistics are reduced over (torch's rule: the whole world by default)."""
        return self.process_group if self.process_group else dist.group.WORLD

    def sync_statistics(self):
        """Whether a forward now reduces statistics across ranks: in training, with torch.distributed
        initialised and more than one rank in the group (torch.nn.SyncBatchNorm's rule). Otherwise the
        layer is fastnets' single-GPU BatchNorm."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.group()) > 1

    def sync_forward(self, input, residual=None, relu=False, act=None):
        """act(sync_batch_norm(input) [+ residual]) across ranks, for when sync_statistics() is True
        (fastnets.nn.bn_act and conv_bn_act call it for a SyncBatchNorm `bn`)."""
        self._check(input, residual)
        return self._sync(input, residual, activations.resolve(act, relu))

    def _sync(self, input, residual, act):
        if input.device.type not in _sync_devices():
            raise ValueError(f"SyncBatchNorm expected input tensor to be on GPU or XPU or "
                             f"{torch._C._get_privateuse1_backend_name()} or CPU")
        group = self.group()
        world_size = dist.get_world_size(group)
        if self._agreed_group != id(group):
            check_group_agrees(input, group, world_size)
            self._agreed_group = id(group)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average; a device tensor, so no host read
                factor = 1.0 / self.num_batches_tracked.double()
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        return sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, factor, self.eps,
                               group, world_size, residual=residual, act=act)

    def _forward(self, input, residual, act):
        self._check(input, residual)
        if self.sync_statistics():
            return self._sync(input, residual, act)
        if input.numel() == 0:  # torch's behaviour: an empty output in eval, its ValueError in training
            return _BatchNorm.forward(self, input)
        return bn_act(self, input, residual=residual, act=act)

    def forward(self, input):
        return self._forward(input, None, ("identity", 0.0))

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Every BatchNorm layer of `module` (torch's BatchNorm1d/2d/3d and SyncBatchNorm, fastnets'
        BatchNorm1d/2d, any _BatchNorm subclass) becomes a fastnets SyncBatchNorm sharing its parameters and
        buffers; the fused BatchNormReLU2d and BatchNormAct2d become SyncBatchNormReLU2d and SyncBatchNormAct2d
        (same activation, still fused). Returns `module` converted in place, or the new layer when `module`
        itself is a BatchNorm (torch's contract)."""
        module_output = module
        if isinstance(module, _BatchNorm) and not isinstance(module, nn.modules.lazy.LazyModuleMixin):
            kw = {}
            if isinstance(module, (BatchNormReLU2d, SyncBatchNormReLU2d)):
                target = SyncBatchNormReLU2d
            elif isinstance(module, (BatchNormAct2d, SyncBatchNormAct2d)):
                target, kw = SyncBatchNormAct2d, {"act": (module.act_name, module.act_param)}
            else:  # never turn a plain BatchNorm into a fused one
                target = SyncBatchNorm
            if issubclass(cls, target) and (target is not SyncBatchNorm or not issubclass(cls, _FUSED)):
                target = cls  # a user's subclass of the target (never a fused class for a plain BatchNorm)
            module_output = target(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                process_group, bias=module.bias is not None, **kw,
            )
            if module.affine:
                with torch.no_grad():
                    module_output.weight = module.weight
                    module_output.bias = module.bias
            module_output.running_mean = module.running_mean
            module_output.running_var = module.running_var
            module_output.num_batches_tracked = module.num_batches_tracked
            module_output.training = module.training
            if hasattr(module, "qconfig"):
                module_output.qconfig = module.qconfig
        for name, child in module.named_children():
            module_output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return module_output


class SyncBatchNormReLU2d(SyncBatchNorm):
    """relu(sync_batch_norm(x) [+ residual]) in one fused pass each way; state_dict of a BatchNorm2d."""

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")

    def forward(self, input, residual=None):
        return self._forward(input, residual, ("relu", 0.0))


class SyncBatchNormAct2d(SyncBatchNorm):
    """act(sync_batch_norm(x) [+ residual]) fused, for any activation of fastnets.activations (`act`: a
    name, a (name, param) pair, an nn.Module or a torch function), as fastnets.nn.BatchNormAct2d;
    state_dict of a BatchNorm2d."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, act="relu", device=None, dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype,
                         bias=bias)
        self.act_name, self.act_param = activations.canonical(act, "act")

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")

    def forward(self, input, residual=None):
        return self._forward(input, residual, (self.act_name, self.act_param))

    def extra_repr(self):
        act = self.act_name if self.act_name != "leaky_relu" else f"leaky_relu({self.act_param})"
        return super().extra_repr() + f", act={act}"


_FUSED = (SyncBatchNormReLU2d, SyncBatchNormAct2d)
