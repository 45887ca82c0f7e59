"""SyncBatchNorm (+ residual add + activation) across the ranks of a torch.distributed process group.

  y = act(batch_norm(x) [+ residual]), with the batch statistics of the whole group's batch; `act` is any
  activation of fastnets/activations.py (identity, relu, silu, ...), fused as in the single-GPU op.

Each rank's work runs on fastnets' single-GPU BatchNorm primitives through the backend registry (the
`stats`, `apply`, `backward_reduce` and `backward_apply` of fastnets/reference/batch_norm.py: Triton or
CUDA C++ on a GPU, the reference on CPU); only the per-channel vectors cross ranks:
  forward:  one all_gather of each rank's packed [count, mean (C), M2 (C)], merged with Chan's formula
            (never sum and sum of squares, which cancel catastrophically for large means);
  backward: one all_reduce(SUM) of the packed [sum g (C), sum g * (x - mean) (C)], only when the input
            needs a gradient (as torch.nn.SyncBatchNorm). Weight and bias gradients stay per rank: DDP
            reduces them with the other parameters.
Collectives are issued on the current stream with async_op=False, which for NCCL orders them on the
stream without a host wait; nothing reads a tensor value on the host, so per-rank counts (unequal or zero)
are handled by arithmetic, not branches. Running statistics are updated outside the autograd function,
exactly as torch.nn.SyncBatchNorm does (unbiased with the global count).
"""
import torch
import torch.distributed as dist

from .. import _tensors, activations
from ..backends import requested_backend
from .._tensors import acc_dtype
from ._registry import kernels
from .batch_norm import fold_scale_shift


def _fail(what, group, world_size, error):
    return RuntimeError(
        f"fastnets SyncBatchNorm: the {what} over a process group of {world_size} ranks failed (backend "
        f"{dist.get_backend(group)}). A rank may have died, never reached this layer, or run a different "
        f"model; every rank must run the same SyncBatchNorm layers in the same order. Cause: {error}"
    )


def _all_gather(buf, group, world_size, what="all_gather of the batch statistics"):
    """(world_size, buf.numel()) with every rank's `buf`, in rank order."""
    try:
        if dist.get_backend(group) == "gloo":  # gloo has no all_gather_into_tensor
            parts = [torch.empty_like(buf) for _ in range(world_size)]
            dist.all_gather(parts, buf, group)
            return torch.stack(parts)
        out = buf.new_empty(world_size, buf.numel())
        dist.all_gather_into_tensor(out, buf, group)
        return out
    except RuntimeError as e:
        raise _fail(what, group, world_size, e) from e


def _all_reduce(buf, group, world_size):
    try:
        dist.all_reduce(buf, dist.ReduceOp.SUM, group)
    except RuntimeError as e:
        raise _fail("all_reduce of the gradient sums", group, world_size, e) from e
    return buf


def check_group_agrees(x, group, world_size):
    """Once per layer and group: every rank must hold the same number of channels and statistics dtype,
    else the statistics collective would mismatch (gloo: an obscure error; NCCL: garbage or a hang). This
    one small all_gather reads its result on the host, so it is done on the first call only."""
    code = {torch.float32: 0, torch.float64: 1}[acc_dtype(x)]
    mine = torch.tensor([x.shape[1], code], dtype=torch.int64, device=x.device)
    theirs = _all_gather(mine, group, world_size, "check that the ranks agree on the channel count").cpu().tolist()
    if any(t != theirs[0] for t in theirs):
        desc = ", ".join(f"rank {r}: {c} channels ({'float64' if k else 'float32'} statistics)"
                         for r, (c, k) in enumerate(theirs))
        raise ValueError(f"fastnets SyncBatchNorm: ranks of the process group disagree on the input: {desc}; "
                         f"every rank must run the same layer on inputs with the same number of channels and dtype")


def local_moments(k, x, channels_last):
    """This rank's [count, mean (C), M2 (C)] per channel in the accumulation dtype; all zeros for an
    empty batch (it still takes part in the collective, and a zero count drops out of the merge)."""
    c = x.shape[1]
    n = x.numel() // c
    if n == 0:
        return torch.zeros(2 * c + 1, dtype=acc_dtype(x), device=x.device)
    mean, invstd = k.stats(x, channels_last, 0.0)  # eps = 0: var = invstd^-2 without eps cancellation
    m2 = invstd.pow(-2) * n  # rsqrt(0) = inf -> var 0 for a constant channel
    return torch.cat([mean.new_full((1,), n), mean, m2])


def merge_moments(gathered, channels):
    """Chan et al.'s parallel variance formula over all ranks at once: with n = sum n_i and mean =
    sum n_i mean_i / n, M2 = sum M2_i + sum n_i (mean_i - mean)^2 (equal to folding Chan's pairwise
    update M2_a + M2_b + d^2 n_a n_b / n over the ranks, with deviations taken from the global mean).
    Ranks with n_i = 0 contribute nothing; returns (count (1,), mean (C), biased var (C))."""
    n_i = gathered[:, :1]
    mean_i = gathered[:, 1:channels + 1]
    m2_i = gathered[:, channels + 1:]
    count = n_i.sum(0)
    safe = count.clamp_min(1)
    mean = (n_i * mean_i).sum(0) / safe
    m2 = m2_i.sum(0) + (n_i * (mean_i - mean).square()).sum(0)
    return count, mean, m2 / safe


class SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, act, act_param, eps, group, world_size, backend):
        k = kernels("batch_norm", backend, x.device)
        x, cl = _tensors.dense_layout(x)
        c = x.shape[1]
        gathered = _all_gather(local_moments(k, x, cl), group, world_size)
        count, mean, var = merge_moments(gathered, c)
        invstd = torch.rsqrt(var + eps)
        if x.numel() > 0:
            scale, shift = fold_scale_shift(weight, bias, mean, invstd)
            res = None if residual is None else _tensors.match_layout(residual, x)
            y = _tensors.match_layout(k.apply(x, scale, shift, res, activations.code(act), cl, act_param), x)
        else:
            y = torch.empty_like(x)
        ctx.act, ctx.act_param, ctx.backend, ctx.group, ctx.world_size = act, act_param, backend, group, world_size
        # relu's gradient mask comes from y; the other activations recompute x * scale + shift [+ residual]
        pre = act not in activations.FROM_OUTPUT
        ctx.save_for_backward(x, y if act == "relu" else None, residual if pre else None, weight,
                              bias if pre else None, mean, invstd, count)
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var, _grad_count):
        x, y, residual, weight, bias, mean, invstd, count = ctx.saved_tensors
        need_x, need_w, need_b, need_res = ctx.needs_input_grad[:4]
        code = activations.code(ctx.act)
        k = kernels("batch_norm", ctx.backend, x.device)
        x, cl, dy, y = _tensors.grad_layouts(grad_y, x, y, code == 1)
        c = x.shape[1]
        empty = x.numel() == 0
        extra = {}
        if ctx.act not in activations.FROM_OUTPUT and not empty:
            scale, shift = fold_scale_shift(weight, bias, mean, invstd)
            res = None if residual is None else _tensors.match_layout(residual, x)
            extra = dict(act_param=ctx.act_param, scale=scale, shift=shift, residual=res)
        if empty:
            sum_g = sum_gxmu = mean.new_zeros(c)
        else:
            sum_g, sum_gxmu = k.backward_reduce(dy, x, y, mean, code, cl, **extra)
        grad_w = grad_b = None
        if weight is not None:
            # zeros rather than None on an empty rank, so DDP's gradient hooks fire on every rank
            grad_w = (sum_gxmu * invstd).to(weight.dtype) if need_w else None
            grad_b = sum_g.to(weight.dtype) if need_b else None
        grad_x = grad_res = None
        write_g = code != 0 and need_res
        if need_x:
            packed = _all_reduce(torch.cat([sum_g, sum_gxmu]), ctx.group, ctx.world_size)
            sum_g, sum_gxmu = packed[:c], packed[c:]
        if (need_x or write_g) and not empty:
            a = invstd if weight is None else invstd * weight.to(invstd.dtype)
            # dx = a * (g - sum_g / M - xhat * sum(g * xhat) / M) with M and both sums over all ranks
            b = -a * invstd * invstd * sum_gxmu / count
            d = -a * sum_g / count
            grad_x, grad_res = k.backward_apply(dy, x, y, a, b, d, mean, code, True, write_g, cl, **extra)
        elif empty:
            grad_x = torch.zeros_like(x) if need_x else None
            grad_res = torch.zeros_like(x) if write_g else None
        if need_res and code == 0:
            grad_res = grad_y
        return (grad_x if need_x else None, grad_w, grad_b, grad_res if need_res else None,
                None, None, None, None, None, None)


def update_running_stats(running_mean, running_var, mean, var, count, factor):
    """As torch.nn.SyncBatchNorm (batch_norm_gather_stats_with_counts): new = (1 - f) * old + f * batch,
    the variance made unbiased with the global count. `factor` is a float or a 0-d tensor (momentum=None:
    1 / num_batches_tracked, kept on the device so that nothing waits for the host)."""
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        for buf, batch in ((running_mean, mean), (running_var, unbiased)):
            if buf is None:
                continue
            f = factor.to(batch.dtype) if isinstance(factor, torch.Tensor) else factor
            buf.copy_((1 - f) * buf.to(batch.dtype) + f * batch)


def sync_batch_norm(input, running_mean, running_var, weight, bias, factor, eps, group, world_size,
                    residual=None, relu=False, act=None, backend=None):
    """Training-mode act(BatchNorm(x) [+ residual]) over `group` (world_size > 1); running statistics
    (when given) updated in place with `factor` as torch.nn.SyncBatchNorm does. `act` as in
    fastnets.ops.batch_norm (wins over `relu`). Validation is the caller's (fastnets.nn)."""
    backend = requested_backend(backend)
    act_name, act_param = activations.resolve(act, relu)
    y, mean, var, count = _sync_apply(input, weight, bias, residual, act_name, float(act_param), float(eps),
                                      group, world_size, backend)
    if running_mean is not None or running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, count, factor)
    return y


# Collectives on a ProcessGroup object are not traced by torch.compile: the cross-rank path runs eagerly
# (a graph break); eval and world size 1 take the single-GPU custom ops, which compile with fullgraph=True.
# torch._disable_dynamo is torch.compiler.disable that imports torch._dynamo (seconds) on first call only.
@torch._disable_dynamo
def _sync_apply(*args):
    return SyncBatchNormFunction.apply(*args)

