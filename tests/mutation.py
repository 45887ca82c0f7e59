"""Mutation check: plant one bug at a time in a copy of the tree and prove that the test suite fails.

    python tests/mutation.py              # every mutant (docs/testing.md, "Mutation check": 140 s at -j 2 on an idle 2-core machine)
    python tests/mutation.py --fast       # the CI subset: one mutant per layer (tests/test_mutation.py runs it)
    python tests/mutation.py --only NAME[,NAME...]   --list   -j N   --timeout S

Each mutant is (name, file, an exact snippet that must occur exactly once, its replacement, the tests to run).
The harness copies the working tree (git's tracked and untracked-but-not-ignored files, plus the built
fastnets/_C*.so; no caches or build artefacts) into a temporary directory per worker, applies ONE mutant,
runs `python -m pytest -x -q` on the mutant's tests there with PYTHONPATH and the working directory on the
copy, then restores the file. A small pytest plugin records which files the fastnets modules were imported
from: a run in which fastnets did not come from the copy, or the mutated module was never imported, is an
error, not a kill. A mutant is killed when a test FAILS; a collection error, a timeout or pytest's usage
errors are not kills. Afterwards every test that killed a mutant is run once more on an unmutated copy and
must pass (a kill by a test that fails anyway proves nothing).

Exit status: 0 when every selected mutant was killed; 1 when one survived (or ran into an error); 2 when the
catalogue is stale (a snippet is missing or occurs more than once, e.g. after a refactoring: update the
entry). `file` may be a glob ("fastnets/convert*" finds the snippet in convert.py or anywhere in the
fastnets/convert/ package): the snippet must then occur exactly once among all matching .py files.

Written for a 2-core machine: run with -j 1 (the default); each mutant's tests are the few that target it,
followed by its family's test file (so a mutant the new tests miss still meets the old ones).
"""
import argparse
import dataclasses
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------------ tests

GRAD = "tests/test_gradients_exact.py"
RUN = "tests/test_running_stats.py"
SAFE = "tests/test_convert_safety.py"


def t(path, *names):
    """Node ids path::name for each test function name (all its parametrizations)."""
    return tuple(f"{path}::{n}" for n in names) if names else (path,)


BN_TRAIN = t(GRAD, "test_batch_norm_train_every_output")
BN_EVAL = t(GRAD, "test_batch_norm_eval_every_output")
RUNNING = t(RUN, "test_running_stats_follow_torch")
RUNNING_BF16 = t(RUN, "test_running_stats_in_bfloat16_buffers")
CONV_EPI = t(GRAD, "test_conv2d_epilogue_every_gradient")
CONV_BN_TRAIN = t(GRAD, "test_conv_bn_train_statistics_and_gradients")
CONV_BN_EVAL = t(GRAD, "test_conv_bn_eval_fold_every_gradient")
CONV_MODULE = t(GRAD, "test_conv2d_module_asymmetric_geometry")
SE_ALL = t(GRAD, "test_squeeze_excite_every_gradient")
SE_STAGES = t(GRAD, "test_squeeze_excite_stage_ops_gradients")
SE_MODULE = t(GRAD, "test_squeeze_excite_module_residual_relu")
CONVERT = t(SAFE)

STRIDED, LAUNCHES, INT64 = "tests/test_strided_args.py", "tests/test_triton_launches.py", "tests/test_offsets_int64.py"
PRO_FILE = "tests/test_conv_prologue.py"
PRO_PAD = (f"{PRO_FILE}::test_padded_pixels_stay_zero[relu-False-triton]",)
PRO_1X1 = (f"{PRO_FILE}::test_matches_torch_float64[1x1_nchw-triton]",)
PRO_TILES = (f"{PRO_FILE}::test_several_tiles_in_m_n_and_k[1x1_s2_c17-triton]",)
PRO_REF = (f"{PRO_FILE}::test_matches_torch_float64[3x3_p1_nchw-reference]",)
CHAIN_FILE = "tests/test_conv_chain.py"
CHAIN_RESNET = t(CHAIN_FILE, "test_resnet_bottleneck_matches_torchvision")
CHAIN_VGG = t(CHAIN_FILE, "test_vgg_bn_stack_matches_torch")
CHAIN_CONVERT = t(CHAIN_FILE, "test_convert_refuses_what_it_cannot_prove_and_says_why",
                  "test_converted_torchvision_resnet18_matches_and_reports_chains")
TF32, STATS_PTX, AUTOTUNE = "tests/test_tf32.py", "tests/test_stats_rounding.py", "tests/test_conv_autotune.py"
HOST_SYNC = t("tests/test_host_sync.py", "test_no_host_read_after_the_first_call",
              "test_augment_apply_compiles_without_a_graph_break")
BN_FILE, CONV_FILE, SE_FILE, CONVERT_FILE = (
    "tests/test_batch_norm.py", "tests/test_conv.py", "tests/test_squeeze_excite.py", "tests/test_convert.py")


PLANS_H = "csrc/launch_plans.h"
PLAN_LIMITS = t("tests/test_cuda_launch_plans.py", "test_plans_within_gpu_limits")
INDEX_WALKS = t("tests/test_cuda_launch_plans.py", "test_kernel_index_walks_match_division")


def only(backend):
    return ("-k", backend)


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root; may be a glob
    old: str  # must occur exactly once
    new: str
    tests: tuple  # pytest arguments
    fast: bool = False  # part of the CI subset


M = Mutant
MUTANTS = [
    # ---------------------------------------------------------------- reference/ (the CPU path and oracle)
    M("ref-bn-stats-unbiased", "fastnets/reference/batch_norm.py",
      "torch.var_mean(xf, dim=_reduce_dims(x), unbiased=False)", "torch.var_mean(xf, dim=_reduce_dims(x), unbiased=True)",
      BN_TRAIN + only("reference") + (BN_FILE,)),
    M("ref-bn-grad-x-drops-sum-g", "fastnets/reference/batch_norm.py",
      "dx = dx + (x.to(a.dtype) - _per_channel(mean, x)) * _per_channel(b, x) + _per_channel(d, x)",
      "dx = dx + (x.to(a.dtype) - _per_channel(mean, x)) * _per_channel(b, x)",
      BN_TRAIN + only("reference") + (BN_FILE,), fast=True),
    M("ref-bn-reduce-forgets-mean", "fastnets/reference/batch_norm.py",
      "return g.sum(dims), (g * (x.to(mean.dtype) - _per_channel(mean, x))).sum(dims)",
      "return g.sum(dims), (g * x.to(mean.dtype)).sum(dims)",
      BN_TRAIN + only("reference") + (BN_FILE,)),
    M("ref-conv-stats-unbiased", "fastnets/reference/conv.py",
      "dim=(0, 2, 3), unbiased=False)", "dim=(0, 2, 3), unbiased=True)",
      CONV_BN_TRAIN + only("reference") + (CONV_FILE,)),
    M("ref-se-pool-off-by-one", "fastnets/reference/squeeze_excite.py",
      "return x.to(acc_dtype(x)).mean(dim=(2, 3))",
      "return x.to(acc_dtype(x)).sum(dim=(2, 3)) / (x.shape[2] * x.shape[3] + 1)",
      SE_ALL + only("reference") + (SE_FILE,)),
    # ---------------------------------------------------------------- ops/batch_norm.py
    M("bn-grad-weight-1pct", "fastnets/ops/batch_norm.py",
      "grad_w = (sum_gxmu * invstd).to(weight.dtype)", "grad_w = (sum_gxmu * invstd * 1.01).to(weight.dtype)",
      BN_TRAIN + (BN_FILE,)),
    M("bn-grad-bias-1pct", "fastnets/ops/batch_norm.py",
      "grad_b = sum_g.to(weight.dtype)", "grad_b = (sum_g * 1.01).to(weight.dtype)",
      BN_TRAIN + (BN_FILE,)),
    M("bn-grad-x-count-minus-one", "fastnets/ops/batch_norm.py",
      "b = -a * invstd * invstd * sum_gxmu / count", "b = -a * invstd * invstd * sum_gxmu / (count - 1)",
      BN_TRAIN + (BN_FILE,), fast=True),
    M("bn-grad-x-sum-g-count", "fastnets/ops/batch_norm.py",
      "d = -a * sum_g / count", "d = -a * sum_g / (count + 1)",
      BN_TRAIN + (BN_FILE,)),
    M("bn-running-var-biased", "fastnets/ops/batch_norm.py",
      "unbiased = var * (count / (count - 1))", "unbiased = var",
      RUNNING + (BN_FILE,)),
    M("bn-momentum-swapped", "fastnets/ops/batch_norm.py",
      "running_mean.lerp_(mean, momentum)", "running_mean.lerp_(mean, 1 - momentum)",
      RUNNING + (BN_FILE,)),
    M("bn-momentum-swapped-buffer-dtype", "fastnets/ops/batch_norm.py",
      "running_var.copy_(momentum * unbiased + (1 - momentum) * running_var.to(unbiased.dtype))",
      "running_var.copy_((1 - momentum) * unbiased + momentum * running_var.to(unbiased.dtype))",
      RUNNING_BF16 + (BN_FILE,)),
    M("bn-running-var-keeps-eps", "fastnets/ops/batch_norm.py",
      "invstd.pow(-2) - eps", "invstd.pow(-2)",
      RUNNING + (BN_FILE,)),
    M("bn-eval-backward-zero-mean", "fastnets/ops/batch_norm.py",
      "mean, invstd = running_mean.to(acc), torch.rsqrt(running_var.to(acc) + ctx.eps)",
      "mean, invstd = torch.zeros_like(running_mean, dtype=acc), torch.rsqrt(running_var.to(acc) + ctx.eps)",
      BN_EVAL + (BN_FILE,)),
    M("bn-fold-shift-ignores-weight", "fastnets/ops/batch_norm.py",
      "shift = -mean * scale", "shift = -mean * invstd",
      BN_EVAL + (BN_FILE,)),
    # ---------------------------------------------------------------- nn/
    M("nn-momentum-none-off-by-one", "fastnets/nn/batch_norm.py",
      "factor = 1.0 / bn.num_batches_tracked.double()",
      "factor = 1.0 / (bn.num_batches_tracked.double() + 1)",
      RUNNING + (BN_FILE,), fast=True),
    M("nn-num-batches-tracked-twice", "fastnets/nn/batch_norm.py",
      "bn.num_batches_tracked.add_(1)", "bn.num_batches_tracked.add_(2)",
      RUNNING + (BN_FILE,)),
    M("nn-eval-without-running-stats", "fastnets/nn/batch_norm.py",
      "use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)",
      "use_batch_stats = bn.training",
      t(RUN, "test_no_running_stats_uses_batch_statistics_in_eval") + (BN_FILE,)),
    M("nn-conv-bn-momentum-none", "fastnets/nn/conv.py",
      "momentum=factor,", "momentum=bn.momentum or 0.1,",
      CONV_BN_TRAIN + (CONV_FILE,)),
    M("nn-conv-padding-swapped", "fastnets/nn/conv.py",
      "return tuple(conv.padding)", "return tuple(conv.padding)[::-1]",
      CONV_MODULE + (CONV_FILE,)),
    # ---------------------------------------------------------------- triton_kernels/batch_norm.py
    M("triton-bn-chan-m2-count", "fastnets/triton_kernels/batch_norm.py",
      "m2 = m2 + tile_m2 + delta * delta * (count * w)", "m2 = m2 + tile_m2 + delta * delta * w",
      BN_TRAIN + only("triton") + (BN_FILE,), fast=True),
    M("triton-bn-split-count-assumed-full", "fastnets/triton_kernels/batch_norm.py",
      "count = tl.zeros([BLOCK_C], ACC) + n_rows.to(ACC)", "count = tl.zeros([BLOCK_C], ACC) + rows_per_split",
      BN_TRAIN + only("triton") + (BN_FILE,)),
    M("triton-bn-cl-tail-count", "fastnets/triton_kernels/batch_norm.py",
      "(slot < n_rows % BLOCK_R).to(tl.int64)", "(slot <= n_rows % BLOCK_R).to(tl.int64)",
      BN_TRAIN + only("triton") + (BN_FILE,)),
    M("triton-bn-cl-welford-weight-off-by-one", "fastnets/triton_kernels/batch_norm.py",
      "inv = div_rn(tl.full([], 1.0, ACC), t)", "inv = div_rn(tl.full([], 1.0, ACC), t + 1.0)",
      BN_TRAIN + only("triton") + (BN_FILE,)),
    M("triton-bn-nchw-tail-count", "fastnets/triton_kernels/batch_norm.py",
      "full = (slot < (s_hi - s_lo) - (n_chunks - 1) * BLOCK_S)[None, :]",
      "full = (slot <= (s_hi - s_lo) - (n_chunks - 1) * BLOCK_S)[None, :]",
      BN_TRAIN + only("triton") + (BN_FILE,)),
    M("triton-bn-nchw-short-slots-counted-in-last-chunk", "fastnets/triton_kernels/batch_norm.py",
      "seen_short += tl.where(s0 + BLOCK_S < s_hi, 1.0, 0.0)", "seen_short += 1.0",
      t("tests/test_batch_norm.py", "test_statistics_of_planes_longer_than_a_tile") + (BN_FILE,)),
    M("triton-bn-cl-mask-off-by-one", "fastnets/triton_kernels/batch_norm.py",
      "mask = cmask[None, :] & (rows < r_hi)[:, None]", "mask = cmask[None, :] & (rows < r_hi - 1)[:, None]",
      BN_TRAIN + only("triton") + (BN_FILE,)),
    M("triton-bn-second-stage-drops-splits", "fastnets/triton_kernels/batch_norm.py",
      "return psum_g.sum(0), psum_gx.sum(0)", "return psum_g[0], psum_gx.sum(0)",
      BN_TRAIN + only("triton") + (BN_FILE,)),
    M("triton-bn-grad-x-forgets-mean", "fastnets/triton_kernels/batch_norm.py",
      "dx += _per_channel(b_ptr, c, cmask, CL) * (x - _per_channel(mean_ptr, c, cmask, CL))",
      "dx += _per_channel(b_ptr, c, cmask, CL) * x",
      BN_TRAIN + only("triton") + (BN_FILE,)),
    M("triton-bn-residual-after-activation", "fastnets/triton_kernels/batch_norm.py",
      "    if HAS_RES:\n        v += tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)\n    v = act_fwd(v, ACT, act_param)\n",
      "    v = act_fwd(v, ACT, act_param)\n    if HAS_RES:\n        v += tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)\n",
      BN_TRAIN + only("triton") + (BN_FILE,)),
    # ---------------------------------------------------------------- triton_kernels/conv.py
    M("triton-conv-epilogue-tail-count", "fastnets/triton_kernels/conv.py",
      "cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(v.dtype)",
      "cnt = tl.minimum(M - pid_m * BLOCK_M + 1, BLOCK_M).to(v.dtype)",
      CONV_BN_TRAIN + only("triton") + (CONV_FILE,), fast=True),
    M("triton-conv-merge-mean-ignores-tail", "fastnets/triton_kernels/conv.py",
      "total += tl.sum(pm * cnt[:, None], axis=0)", "total += tl.sum(pm * BLOCK_ROWS, axis=0)",
      CONV_BN_TRAIN + only("triton") + (CONV_FILE,)),
    M("triton-conv-chan-m2-count", "fastnets/triton_kernels/conv.py",
      "m2 += tl.sum(p2 + d * d * cnt[:, None], axis=0)", "m2 += tl.sum(p2 + d * d, axis=0)",
      CONV_BN_TRAIN + only("triton") + (CONV_FILE,)),
    M("triton-conv-stats-without-bias", "fastnets/triton_kernels/conv.py",
      "vm = tl.where(mask_m[:, None], v, 0.0)", "vm = tl.where(mask_m[:, None], acc, 0.0)",
      CONV_BN_TRAIN + only("triton") + (CONV_FILE,)),
    M("triton-conv-stats-unmasked-rows", "fastnets/triton_kernels/conv.py",
      "dev = tl.where(mask_m[:, None], v - t_mean[None, :], 0.0)", "dev = v - t_mean[None, :]",
      CONV_BN_TRAIN + only("triton") + (CONV_FILE,)),
    M("triton-conv-shift-before-scale", "fastnets/triton_kernels/conv.py",
      "    if HAS_SCALE:\n        v = v * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(v.dtype)[None, :]\n"
      "    if HAS_SHIFT:\n        v += tl.load(shift_ptr + offs_n, mask=mask_n, other=0.0).to(v.dtype)[None, :]\n",
      "    if HAS_SHIFT:\n        v += tl.load(shift_ptr + offs_n, mask=mask_n, other=0.0).to(v.dtype)[None, :]\n"
      "    if HAS_SCALE:\n        v = v * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(v.dtype)[None, :]\n",
      CONV_BN_EVAL + only("triton") + (CONV_FILE,)),
    M("triton-conv-wgrad-first-split-only", "fastnets/triton_kernels/conv.py",
      "dw = part[0] if splits == 1 else part.sum(0)", "dw = part[0]",
      CONV_EPI + only("triton and split") + (CONV_FILE,)),
    M("triton-conv-wgrad-mask-off-by-one", "fastnets/triton_kernels/conv.py",
      "mk = offs_k < m_end", "mk = offs_k < m_end - 1",
      CONV_EPI + only("triton") + (CONV_FILE,)),
    M("triton-conv-dgrad-stride-divisibility", "fastnets/triton_kernels/conv.py",
      "ok = mask_m & (th >= 0) & (thc - oh * stride_h == 0) & (oh < OH)", "ok = mask_m & (th >= 0) & (oh < OH)",
      CONV_EPI + only("triton") + (CONV_FILE,)),
    M("triton-conv-flat-taps-kh-for-kw", "fastnets/triton_kernels/conv.py",
      "r = rs // KW", "r = rs // KH",
      CONV_EPI + only("triton and stem") + (CONV_FILE,)),
    M("triton-conv-1x1-dgrad-not-zeroed", "fastnets/triton_kernels/conv.py",
      "out.zero_()  # the pixels no output reads from get zero gradient", "pass",
      CONV_EPI + only("triton and 1x1") + (CONV_FILE,)),
    M("triton-conv-group-m-tail", "fastnets/triton_kernels/conv.py",
      "size_m = tl.minimum(num_m - first_m, GROUP_M)", "size_m = GROUP_M",
      CONV_EPI + only("triton") + (CONV_FILE,)),
    M("triton-conv-k-blocks", "fastnets/triton_kernels/conv.py",
      "n_cb = tl.cdiv(C, BLOCK_K)", "n_cb = tl.cdiv(C, 2 * BLOCK_K)",
      CONV_EPI + only("triton") + (CONV_FILE,)),
    # ---------------------------------------------------------------- conv_prologue (BN-apply + act in the conv)
    M("triton-prologue-transforms-padding", "fastnets/triton_kernels/conv.py",
      "return tl.where(ok, v, 0.0).to(a.dtype)", "return v.to(a.dtype)",
      PRO_PAD + (PRO_FILE,)),
    M("triton-prologue-wgrad-shift-is-scale", "fastnets/triton_kernels/conv.py",
      "xt = _bn_act_tile(xt, ok[:, None] & mask_c[None, :], offs_c[None, :], mask_c[None, :], pro_scale_ptr,\n"
      "                              pro_shift_ptr,",
      "xt = _bn_act_tile(xt, ok[:, None] & mask_c[None, :], offs_c[None, :], mask_c[None, :], pro_scale_ptr,\n"
      "                              pro_scale_ptr,",
      PRO_1X1 + (PRO_FILE,)),
    M("triton-prologue-dscale-drops-z", "fastnets/triton_kernels/conv.py",
      "tl.store(pdscale_ptr + p_off, tl.sum(acc * zf, axis=0), mask=mask_n)",
      "tl.store(pdscale_ptr + p_off, tl.sum(acc, axis=0), mask=mask_n)",
      PRO_1X1 + (PRO_FILE,)),
    M("triton-prologue-dshift-first-tile-only", "fastnets/triton_kernels/conv.py",
      "return pds[:tiles].sum(0), pdh[:tiles].sum(0)", "return pds[:tiles].sum(0), pdh[0]",
      PRO_TILES + (PRO_FILE,)),
    M("ref-prologue-relu-mask-from-z", "fastnets/reference/conv_prologue.py",
      "dpre = activations.backward(dy.to(acc), v, y.to(acc), act, act_param)",
      "dpre = activations.backward(dy.to(acc), v, z.to(acc), act, act_param)",
      PRO_REF + (PRO_FILE,)),
    # ---------------------------------------------------------------- nn/conv_chain.py (the chained models)
    M("chain-batch-stats-grad-var-half", "fastnets/nn/conv_chain.py",
      "_view(grad_var * (2.0 / count))", "_view(grad_var * (1.0 / count))",
      CHAIN_RESNET + (CHAIN_FILE,)),
    M("chain-defer-running-var-count-off-by-one", "fastnets/nn/conv_chain.py",
      "mean.detach(), var.detach(), factor, count)", "mean.detach(), var.detach(), factor, count + 1)",
      CHAIN_RESNET + (CHAIN_FILE,)),
    M("chain-end-skips-running-stats", "fastnets/nn/conv_chain.py",
      "        update_running_stats(running_mean, running_var, mean, var, factor, count)\n",
      "        pass\n",
      CHAIN_RESNET + (CHAIN_FILE,), fast=True),
    M("chain-pool-offset-kernel-height", "fastnets/nn/conv_chain.py",
      "return (rows * kernel[1] + cols).to(torch.uint8)", "return (rows * kernel[0] + cols).to(torch.uint8)",
      CHAIN_VGG + (CHAIN_FILE,)),
    M("chain-pool-dscale-drops-z", "fastnets/nn/conv_chain.py",
      "dscale = (dpre * z.to(acc)).sum(dim=(0, 2, 3))", "dscale = dpre.sum(dim=(0, 2, 3))",
      CHAIN_VGG + (CHAIN_FILE,)),
    M("convert-chain-ignores-other-users", "fastnets/convert*",
      "if len(users) != 1:", "if not users:",
      CHAIN_CONVERT + (CHAIN_FILE,)),
    M("convert-chain-residual-as-input", "fastnets/convert*",
      'if node.kwargs.get("residual") is src:', "if False:",
      CHAIN_CONVERT + (CHAIN_FILE,)),
    # ---------------------------------------------------------------- ops/conv.py
    M("conv-grad-bias-ignores-scale", "fastnets/ops/conv.py",
      "grad_b = sum_g if scale is None else sum_g * scale.to(acc)", "grad_b = sum_g",
      CONV_BN_EVAL + (CONV_FILE,)),
    M("conv-grad-scale-drops-bias", "fastnets/ops/conv.py",
      "grad_scale = grad_scale + bias.to(acc) * sum_g", "grad_scale = grad_scale",
      CONV_BN_EVAL + (CONV_FILE,)),
    M("conv-grad-weight-1pct", "fastnets/ops/conv.py",
      "grad_w = (dwg if scale is None else", "grad_w = (1.01 * dwg if scale is None else",
      CONV_BN_TRAIN + (CONV_FILE,)),
    M("conv-grad-x-2pct", "fastnets/ops/conv.py",
      "grad_x = k.grad_input(g, w, _new_out(x, tuple(x.shape)), stride, padding, dilation)",
      "grad_x = k.grad_input(g, w, _new_out(x, tuple(x.shape)), stride, padding, dilation) * 1.02",
      CONV_EPI + (CONV_FILE,)),
    M("conv-bn-count-non-square", "fastnets/ops/conv.py",
      "count = shape[0] * shape[2] * shape[3]", "count = shape[0] * shape[2] * shape[2]",
      CONV_BN_TRAIN + (CONV_FILE,)),
    M("conv-bn-eval-eps-ignored", "fastnets/ops/conv.py",
      "running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps))",
      "running_mean.to(acc), torch.rsqrt(running_var.to(acc) + 1e-5))",
      CONV_BN_EVAL + (CONV_FILE,)),
    # ---------------------------------------------------------------- ops/squeeze_excite.py (and its gate)
    M("se-pool-grad-h-for-w", "fastnets/ops/squeeze_excite.py",
      "(grad_p / (x.shape[2] * x.shape[3]))", "(grad_p / (x.shape[2] * x.shape[2]))",
      SE_ALL + (SE_FILE,)),
    M("se-sigmoid-grad-2pct", "fastnets/activations.py",
      "return torch.ops.aten.sigmoid_backward(g, out)", "return g * out * (1.02 - out)",
      SE_ALL + (SE_FILE,), fast=True),
    M("se-grad-w2-1pct", "fastnets/ops/squeeze_excite.py",
      "grad_w2 = dz2.t() @ hidden", "grad_w2 = 1.01 * (dz2.t() @ hidden)",
      SE_ALL + (SE_FILE,)),
    M("se-grad-b1-1pct", "fastnets/ops/squeeze_excite.py",
      "grad_b1 = dz1.sum(0)", "grad_b1 = 1.01 * dz1.sum(0)",
      SE_ALL + (SE_FILE,)),
    M("se-squeeze-op-grad-h-for-w", "fastnets/ops/squeeze_excite.py",
      "g = (grad_pooled / (h * w)).to(ctx.x_dtype)", "g = (grad_pooled / (h * h)).to(ctx.x_dtype)",
      SE_STAGES + (SE_FILE,)),
    # ---------------------------------------------------------------- triton_kernels/squeeze_excite.py
    M("triton-se-reduce-mask-off-by-one", "fastnets/triton_kernels/squeeze_excite.py",
      "mask = cmask[:, None] & (ss < s_end)[None, :]", "mask = cmask[:, None] & (ss < s_end - 1)[None, :]",
      SE_ALL + only("triton") + (SE_FILE,)),
    M("triton-se-excite-first-hidden-block", "fastnets/triton_kernels/squeeze_excite.py",
      "        for r0 in range(0, R, BLOCK_R):\n            rs = r0 + tl.arange(0, BLOCK_R)\n            rmask = rs < R\n"
      "            h = tl.load(",
      "        for r0 in range(0, BLOCK_R, BLOCK_R):\n            rs = r0 + tl.arange(0, BLOCK_R)\n            rmask = rs < R\n"
      "            h = tl.load(",
      SE_ALL + only("triton and r36") + (SE_FILE,)),
    # ---------------------------------------------------------------- the static audit (issue 29): performance-only
    # regressions that compute the same values, which only `python -m fastnets.audit --check` sees
    M("audit-conv-epilogue-spills", "fastnets/triton_kernels/conv.py",
      "    v = act_fwd(v, ACT, act_param)\n    tl.store(y_ptr + y_off, v.to(y_ptr.dtype.element_ty), mask=mask)",
      "    v = act_fwd(v, ACT, act_param) + tl.cumsum(acc, axis=0) * 0.0\n"
      "    tl.store(y_ptr + y_off, v.to(y_ptr.dtype.element_ty), mask=mask)",
      ("tests/test_audit.py::test_quick_check_against_committed_baseline[_conv_fwd_kernel-128x256x64]",)),
    M("audit-bn-apply-scalar-loads", "fastnets/triton_kernels/batch_norm.py",
      "    offs = o[:, None] * INNER + i[None, :]\n", "    offs = o[:, None] * INNER + i[None, :] * (INNER // INNER)\n",
      ("tests/test_audit.py::test_quick_check_against_committed_baseline[_apply_kernel-I=64]",)),
    # ---------------------------------------------------------------- convert (module or package)
    M("convert-conv-bn-other-users", "fastnets/convert*",
      "with_conv = (_is_conv2d(conv) and not _has_hooks(conv) and len(src.users) == 1",
      "with_conv = (_is_conv2d(conv) and not _has_hooks(conv)",
      CONVERT + (CONVERT_FILE,), fast=True),
    M("convert-tail-ignores-other-users", "fastnets/convert*",
      "return users[0] if len(users) == 1 else None", "return users[0] if users else None",
      CONVERT + (CONVERT_FILE,)),
    M("convert-se-gate-other-users", "fastnets/convert*",
      "if len(gate.users) != 1:", "if False:",
      CONVERT + (CONVERT_FILE,)),
    M("convert-mode-dependent-forward", "fastnets/convert*",
      "if codes[0] != codes[1]:", "if False:",
      CONVERT + (CONVERT_FILE,)),
    # ---------------------------------------------------------------- numerics (issue 28 items 5-8: TF32, host
    # syncs, autotune keys, correctly rounded statistics)
    M("tf32-flag-ignored", "fastnets/triton_kernels/conv.py",
      'prec = "tf32" if x.dtype != torch.float32 or _tensors.conv_allows_tf32() else "ieee"',
      'prec = "tf32" if x.dtype != torch.float32 else "ieee"',
      (TF32,)),
    M("tf32-none-read-as-tf32", "fastnets/_tensors.py",
      'return conv.fp32_precision == "tf32"', 'return conv.fp32_precision != "ieee"',
      (TF32,)),
    M("host-sync-in-conv-bn", "fastnets/ops/conv.py",
      "        invstd = torch.rsqrt(var + eps)\n",
      "        invstd = torch.rsqrt(var + eps) if bool((var >= 0).all()) else var\n",
      HOST_SYNC),
    M("host-sync-augment-finite-check", "fastnets/ops/augment.py",
      '_check_tensor(matrix, "matrix", (n, 3, 3), x.device)  # values are not read on the host: see the docstring',
      '_check_tensor(matrix, "matrix", (n, 3, 3), x.device)\n    assert torch.isfinite(matrix).all()',
      HOST_SYNC),
    M("host-sync-cumulative-momentum", "fastnets/nn/batch_norm.py",
      "factor = 1.0 / bn.num_batches_tracked.double()", "factor = 1.0 / float(bn.num_batches_tracked)",
      HOST_SYNC),
    M("augment-invalid-sample-not-nan", "fastnets/triton_kernels/augment.py",
      'v = tl.where(ok, v, float("nan"))', "v = v",
      t("tests/test_augment.py", "test_invalid_parameters_give_nan_samples_without_a_host_check")),
    M("stats-approx-division-conv-merge", "fastnets/triton_kernels/conv.py",
      "    mean = div_rn(total, M)\n", "    mean = total / M\n",
      (STATS_PTX,)),
    M("stats-approx-rsqrt", "fastnets/triton_kernels/_common.py",
      "return tl.math.div_rn(1.0, tl.math.sqrt_rn(v))", "return 1.0 / tl.sqrt(v)",
      (STATS_PTX,)),
    M("autotune-key-exact-m", "fastnets/triton_kernels/conv.py",
      "bucket = max(int(m) - 1, 1).bit_length()", "bucket = int(m)",
      (AUTOTUNE,)),
    M("autotune-key-drops-layout", "fastnets/triton_kernels/conv.py",
      "return bucket * 16 + sum(int(bool(cl)) << i for i, cl in enumerate(channels_last))", "return bucket * 16",
      (AUTOTUNE,)),
    M("auto-key-exact-batch", "fastnets/ops/_conv_auto.py",
      'batch = f"N<={1 << max(x.shape[0] - 1, 1).bit_length()}"', 'batch = f"N={x.shape[0]}"',
      (AUTOTUNE,)),
    M("deterministic-mode-still-autotunes", "fastnets/triton_kernels/conv.py",
      'if os.environ.get("FASTNETS_CONV_TUNE", "") == "fixed" or _tensors.deterministic_mode():',
      'if os.environ.get("FASTNETS_CONV_TUNE", "") == "fixed":',
      (AUTOTUNE,)),
    # ---------------------------------------------------------------- CUDA C++ launch plans (issue 28): the
    # GPU limits and the coverage of csrc/launch_plans.h, which tests/test_cuda_launch_plans.py compiles on its
    # own (the copied fastnets._C keeps the unmutated plans; the test checks both)
    M("cuda-plan-rows-grid-y-uncapped", PLANS_H,
      "l.grid[1] = std::max<int64_t>(1, std::min(items, kGridYZMax));", "l.grid[1] = std::max<int64_t>(1, items);",
      PLAN_LIMITS),
    M("cuda-plan-se-reduce-grid-x-uncapped", PLANS_H,
      "l.grid[0] = std::max<int64_t>(1, std::min(ceil_div(items, kSeReduceThreads / kWarp), kGridXMax));",
      "l.grid[0] = std::max<int64_t>(1, ceil_div(items, kSeReduceThreads / kWarp));", PLAN_LIMITS),
    M("cuda-plan-se-cl-reduce-grid-y-uncapped", PLANS_H,
      "l.grid[1] = std::max<int64_t>(1, std::min(N * splits, kGridYZMax));", "l.grid[1] = std::max<int64_t>(1, N * splits);",
      PLAN_LIMITS),
    M("cuda-plan-excite-grid-uncapped", PLANS_H,
      "l.grid[0] = std::max<int64_t>(1, std::min(ceil_div(N, bn), kGridXMax));", "l.grid[0] = ceil_div(N, bn);",
      PLAN_LIMITS),
    M("cuda-plan-bn-tile-over-1024-threads", PLANS_H,
      "std::min<int64_t>(C, kBnTileMax / S)", "std::min<int64_t>(C, 2 * kBnTileMax / S)", PLAN_LIMITS),
    M("cuda-plan-rows-chunks-miss-rows", PLANS_H,
      "p.chunks = ceil_div(rows, p.chunk_len);", "p.chunks = std::max<int64_t>(1, rows / p.chunk_len);", PLAN_LIMITS),
    M("cuda-plan-bn-planes-vector-over-two-planes", PLANS_H,
      "p.by_planes = planes_elementwise(N * C * S, S, groups * C, (vec_ok && S >= VEC) ? VEC : 1, d);",
      "p.by_planes = planes_elementwise(N * C * S, S, groups * C, vec_ok ? VEC : 1, d);",
      PLAN_LIMITS),
    # the kernels' index arithmetic without 64-bit division (plan::PlaneCursor, PlanesStep, group_of_item),
    # walked on the host against plain division (issue 30)
    M("cuda-walk-carry-off-by-one", PLANS_H,
      "    if (r >= S) {\n      r -= S;", "    if (r > S) {\n      r -= S;", INDEX_WALKS),
    M("cuda-walk-start-plane-off-by-one", PLANS_H,
      "const int64_t p = S > i ? 0 :", "const int64_t p = S >= i ? 0 :", INDEX_WALKS),
    M("cuda-walk-vector-cut-off-by-one", PLANS_H,
      "return S - r < vec ? static_cast<int>(S - r) : vec;", "return S - r < vec ? static_cast<int>(S - r - 1) : vec;",
      INDEX_WALKS),
    M("cuda-walk-step-remainder", PLANS_H, "p.step.r = p.step.elems % S;", "p.step.r = p.step.elems % S + 1;",
      INDEX_WALKS),
    M("cuda-walk-tail-channel", PLANS_H, "p.step.tail_chan = numel >= S ? (numel / S - 1) % M : 0;",
      "p.step.tail_chan = numel >= S ? (numel / S) % M : 0;", INDEX_WALKS),
    M("cuda-rows-group-of-item", PLANS_H, "int64_t(static_cast<uint32_t>(item) / static_cast<uint32_t>(chunks))",
      "int64_t((static_cast<uint32_t>(item) + 1) / static_cast<uint32_t>(chunks))", INDEX_WALKS),
    M("cuda-plan-se-reduce-vector-past-plane", PLANS_H,
      "p.vec = (vec_ok && S % VEC == 0) ? VEC : 1;\n    p.s_per_split", "p.vec = vec_ok ? VEC : 1;\n    p.s_per_split",
      PLAN_LIMITS),
    # ---------------------------------------------------------------- GPU pre-flight (issue 28 items 1-4): strided
    # arguments, launch limits, int64 indices, the device guard (tests/test_strided_args.py,
    # tests/test_triton_launches.py, tests/test_offsets_int64.py; the launch checker is tests/launch_checker.py).
    # Each is killed by the test that targets it (the strided-vector ones by a public op on a strided view, the
    # grid ones by the launch checker on meta tensors of extreme shapes, the int64 ones by interpreter probes
    # past 2**31), so no family file follows them.
    M("triton-strided-vector-conv-epilogue", "fastnets/triton_kernels/conv.py",
      "    bias, scale, shift = vector(bias), vector(scale), vector(shift)  # the epilogue reads them at ptr + "
      "channel\n",
      "",
      (f"{STRIDED}::test_conv2d_epilogue[bias-every_other-triton]",
       f"{STRIDED}::test_conv2d_epilogue[scale-every_other-triton]")),
    M("triton-strided-vector-bn-backward-mean", "fastnets/triton_kernels/batch_norm.py",
      "    mean, scale, shift = vector(mean), vector(scale), vector(shift)\n", "",
      (f"{STRIDED}::test_batch_norm_add_act[eval-running_mean-every_other-triton]",)),
    M("triton-strided-vector-augment-normalize", "fastnets/triton_kernels/augment.py",
      "    scale, shift = vector(scale), vector(shift)\n", "",
      (f"{STRIDED}::test_augment_apply[scale-every_other-triton]",
       f"{STRIDED}::test_augment_apply[shift-every_other-triton]")),
    M("triton-int32-augment-noise-index", "fastnets/triton_kernels/augment.py",
      "idx = (n.to(tl.int64) * C + c[None, :]) * (OH * OW) + p[:, None]",
      "idx = (n * C + c[None, :]) * (OH * OW) + p[:, None]",
      t(INT64, "test_augment_noise_index_past_2_32") + (INT64,)),
    M("triton-int32-conv-forward-rows", "fastnets/triton_kernels/conv.py",
      "    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)\n"
      "    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n    mask_m = offs_m < M\n    mask_n = offs_n < Cout\n",
      "    offs_m = pid_m.to(tl.int32) * BLOCK_M + tl.arange(0, BLOCK_M)\n"
      "    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n    mask_m = offs_m < M\n    mask_n = offs_n < Cout\n",
      t(INT64, "test_conv_forward_rows_past_2_31") + (INT64,)),
    M("triton-int32-conv-wgrad-unsliced", "fastnets/triton_kernels/conv.py",
      "    if m > WGRAD_MAX_ROWS:\n", "    if False:\n",
      t(LAUNCHES, "test_conv_launches_at_extreme_shapes") + (INT64,)),
    M("triton-dropped-device-guard", "fastnets/triton_kernels/batch_norm.py",
      "@on_tensor_device\ndef apply(x, scale, shift, residual, act, channels_last, act_param=0.0):",
      "def apply(x, scale, shift, residual, act, channels_last, act_param=0.0):",
      (f"{STRIDED}::test_batch_norm_add_act[train-weight-every_other-triton]", LAUNCHES)),
    M("device-guard-leaves-the-current-device", "fastnets/_tensors.py",
      "            with torch.cuda.device(device):\n", "            with contextlib.nullcontext():\n",
      t(LAUNCHES, "test_device_guard_makes_the_tensors_device_current") + (LAUNCHES,)),
    M("triton-bn-grid-over-65535", "fastnets/triton_kernels/batch_norm.py",
      "grid = (triton.cdiv(outer, block_o) * triton.cdiv(inner, block_i),)",
      "grid = (triton.cdiv(outer, block_o), triton.cdiv(inner, block_i))",
      t(LAUNCHES, "test_batch_norm_launches_at_extreme_shapes") + (LAUNCHES,)),
    M("triton-augment-grid-over-65535", "fastnets/triton_kernels/augment.py",
      "grid = (n * n_tiles,)", "grid = (n, n_tiles)",
      t(LAUNCHES, "test_augment_launches_at_extreme_shapes") + (LAUNCHES,)),
    M("triton-conv-prune-ignores-shared-memory", "fastnets/triton_kernels/conv.py",
      "        configs = _fitting(configs, named_args[operand], bool(kwargs.get(\"PRO\", named_args.get(\"PRO\", "
      "False))))\n",
      "",
      t(LAUNCHES, "test_conv_pruning_keeps_only_configs_that_fit") + (LAUNCHES,)),
    # ---------------------------------------------------------------- issue 31: native CPU, torch.compile, bench
    # (the bug: the probe dynamo cannot trace, asked before the compile check)
    M("native-mkldnn-probe-under-compile", "fastnets/ops/_native_cpu.py",
      "    if torch.compiler.is_compiling():\n        return False\n    if not torch.backends.mkldnn.is_available()",
      "    if not torch.backends.mkldnn.is_available():\n        return False\n"
      "    if torch.compiler.is_compiling():\n        return False\n    if not torch.backends.mkldnn.is_available()",
      t("tests/test_compile_models.py", "test_native_paths_trace_in_one_graph")),
    M("native-avgpool-rows-first", "fastnets/ops/_native_fast.py",
      "y = top[..., 0::2] + top[..., 1::2]\n        y += bottom[..., 0::2]",
      "y = top[..., 0::2] + bottom[..., 0::2]\n        y += top[..., 1::2]",
      t("tests/test_native_cpu.py", "test_avg_pool2x2_fast_path_matches_torch",
        "test_lenet5_training_on_auto_is_eagers_run_bit_for_bit")),
    M("native-grouped-fold-default-eps", "fastnets/nn/conv.py",
      "training=False, eps=bn.eps, stride=conv.stride, padding=_zero_padding(conv)",
      "training=False, eps=1e-5, stride=conv.stride, padding=_zero_padding(conv)",
      t("tests/test_native_cpu.py", "test_grouped_conv_bn_eval_folds_on_native")),
    M("native-bn-dtype-check-lets-fp64-through", "fastnets/ops/_native_cpu.py",
      "if x.dtype in _REDUCED and all(d == torch.float32 for d in given.values()):",
      "if all(d == torch.float32 for d in given.values()):",
      t("tests/test_native_cpu.py", "test_batch_norm_dtype_mismatch_names_the_arguments")),
    M("bench-compile-without-freezing", "fastnets/bench/cpu_ratios.py",
      'with fastnets.use_backend("auto"), compile_config(mode):', 'with fastnets.use_backend("auto"):',
      t("tests/test_native_cpu.py", "test_cpu_ratios_compiled_variants_run_with_freezing")),
    M("bench-results-keep-machine-paths", "fastnets/bench/report.py",
      'return _ABSOLUTE.sub(lambda m: os.path.basename(m.group(0).rstrip("/")), value)', "return value",
      t("tests/test_project.py", "test_portable_strips_machine_paths")),
]


# ------------------------------------------------------------------------------------------------ locating


def candidate_files(pattern, root=ROOT):
    """The .py files `pattern` names under root: a file, or a glob whose matches may be directories. A pattern
    that names one existing file exactly may be of any kind (csrc/launch_plans.h, which tests compile)."""
    if (root / pattern).is_file():
        return [root / pattern]
    out = []
    for p in sorted(root.glob(pattern)):
        if p.is_dir():
            out.extend(q for q in sorted(p.rglob("*.py")) if "__pycache__" not in q.parts)
        elif p.suffix == ".py":
            out.append(p)
    return out


def locate(mutant, root=ROOT):
    """(relative path, None) when the snippet occurs exactly once among the candidate files, else
    (None, reason)."""
    hits = []
    for p in candidate_files(mutant.file, root):
        n = p.read_text().count(mutant.old)
        if n:
            hits.append((p, n))
    total = sum(n for _, n in hits)
    if total == 1:
        return hits[0][0].relative_to(root).as_posix(), None
    if total == 0:
        return None, f"snippet not found in {mutant.file}"
    where = ", ".join(f"{p.relative_to(root)} x{n}" for p, n in hits)
    return None, f"snippet occurs {total} times ({where})"


def check_catalogue(mutants, root=ROOT):
    """Problems of the catalogue: duplicate names, stale snippets, replacements that do not compile or
    change nothing."""
    problems = []
    seen = set()
    for m in mutants:
        if m.name in seen:
            problems.append(f"{m.name}: duplicate name")
        seen.add(m.name)
        if m.old == m.new:
            problems.append(f"{m.name}: the replacement equals the snippet")
            continue
        path, why = locate(m, root)
        if path is None:
            problems.append(f"{m.name}: {why}")
            continue
        src = (root / path).read_text().replace(m.old, m.new)
        if not path.endswith(".py"):
            continue  # C++ (csrc/launch_plans.h): its test compiles it
        try:
            compile(src, path, "exec")
        except SyntaxError as e:
            problems.append(f"{m.name}: the mutated {path} does not compile: {e}")
    return problems


# ------------------------------------------------------------------------------------------------ the copy


EXCLUDE_DIRS = {".git", "__pycache__", ".pytest_cache", "build", "dist", ".hypothesis", ".data"}


def tree_files(root=ROOT):
    """The working tree's files: git's tracked and untracked-but-not-ignored ones, plus the built extension."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                             capture_output=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in EXCLUDE_DIRS and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames]
    files = [f for f in files if not (set(Path(f).parts) & EXCLUDE_DIRS) and (root / f).is_file()]
    files += [p.relative_to(root).as_posix() for p in (root / "fastnets").glob("_C*.so")]
    return sorted(set(files))


def make_copy(dest, root=ROOT):
    for f in tree_files(root):
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, target)
    return dest


GUARD = """
import json, os, sys

def pytest_unconfigure(config):
    mods = {name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())
            if name == "fastnets" or name.startswith("fastnets.")}
    with open(os.environ["FASTNETS_MUTATION_REPORT"], "w") as f:
        json.dump(mods, f)
"""


def module_name(path):
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def preload():
    """Fork mode: import what every run imports and that fastnets does not define (torch, and torch._dynamo,
    which the first custom-op call imports: about half of a short run's CPU time), once, in the parent.
    torch._dynamo imports Triton, whose own @jit helpers (tl.zeros, ...) are interpreted only if
    TRITON_INTERPRET is set when Triton is imported: set it first, by tests/conftest.py's rule."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import pytest  # noqa: F401
    import torch._dynamo  # noqa: F401


class Run:
    """One pytest process on a worker's copy: spawned (a fresh interpreter) or forked from the preloaded
    harness. poll() is None while it runs, then its exit status."""

    def __init__(self, worker, args, timeout, fork):
        self.worker, self.deadline, self.start = worker, time.time() + timeout, time.time()
        self.out_path = worker.dir / "pytest.out"
        if worker.report.exists():
            worker.report.unlink()
        env = {"FASTNETS_MUTATION_REPORT": str(worker.report), "PYTHONDONTWRITEBYTECODE": "1"}
        pytest_args = ["-x", "-q", "-rf", "--no-header", "-p", "no:cacheprovider", "-p", "_fastnets_mutation_guard",
                       *args]
        plugins, tree = str(worker.dir / "plugins"), str(worker.tree)
        self.timed_out, self.rc = False, None
        out = open(self.out_path, "w")
        if not fork:
            full = dict(os.environ, **env, PYTHONPATH=os.pathsep.join([plugins, tree]))
            full.pop("PYTEST_ADDOPTS", None)  # a CI run's -n/--dist must not reach the mutant's pytest
            self.proc = subprocess.Popen([sys.executable, "-m", "pytest", *pytest_args], cwd=tree, env=full,
                                         stdout=out, stderr=subprocess.STDOUT)
            self.pid = None
            out.close()
            return
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: the copy first on sys.path, nothing of the original tree
            code = 3
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                os.chdir(tree)
                os.environ.update(env)
                os.environ.pop("PYTEST_ADDOPTS", None)
                sys.dont_write_bytecode = True
                here = {str(ROOT), str(ROOT / "tests"), ""}
                sys.path[:] = [plugins, tree] + [q for q in sys.path if q not in here and os.path.realpath(q) not in here]
                import pytest

                code = int(pytest.main(pytest_args))
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
        out.close()
        self.proc, self.pid = None, pid

    def poll(self):
        if self.rc is not None:
            return self.rc
        if time.time() > self.deadline:
            self.kill()
            self.timed_out = True
        if self.proc is not None:
            rc = self.proc.wait() if self.timed_out else self.proc.poll()
        else:
            pid, status = os.waitpid(self.pid, 0 if self.timed_out else os.WNOHANG)
            rc = None if pid == 0 else os.waitstatus_to_exitcode(status)
        if rc is not None:
            self.rc = rc
            self.seconds = time.time() - self.start
        return rc

    def kill(self):
        try:
            if self.proc is not None:
                self.proc.kill()
            else:
                os.kill(self.pid, 9)
        except (OSError, ProcessLookupError):
            pass

    def result(self):
        """(exit status or None on timeout, output, {module: file} of the fastnets modules imported)."""
        out = self.out_path.read_text(errors="replace")
        imported = json.loads(self.worker.report.read_text()) if self.worker.report.exists() else None
        return (None if self.timed_out else self.rc), out, imported


class Worker:
    """A copy of the tree and the guard plugin next to it; one run at a time."""

    def __init__(self, base):
        self.dir = Path(tempfile.mkdtemp(prefix="worker-", dir=base))
        self.tree = make_copy(self.dir / "tree")
        (self.dir / "plugins").mkdir()
        (self.dir / "plugins" / "_fastnets_mutation_guard.py").write_text(GUARD)
        self.report = self.dir / "imported.json"
        self.restore = None

    def check_imports(self, imported, mutated=None):
        """None when every fastnets module came from the copy (and the mutated one was imported), else why."""
        if imported is None:
            return "pytest did not report its imports"
        tree = os.path.realpath(self.tree) + os.sep
        stray = [f"{n} from {f}" for n, f in imported.items() if f and not os.path.realpath(f).startswith(tree)]
        if stray or "fastnets" not in imported:
            return "fastnets was not imported from the copy: " + ("; ".join(stray[:3]) or "not imported")
        if mutated is not None and mutated.endswith(".py") and module_name(mutated) not in imported:
            return f"the mutated module {module_name(mutated)} was never imported by these tests"
        return None

    def apply(self, mutant):
        path, why = locate(mutant, self.tree)
        if path is None:
            raise RuntimeError(f"{mutant.name}: {why}")
        target = self.tree / path
        original = target.read_text()
        target.write_text(original.replace(mutant.old, mutant.new))
        self.restore = (target, original)
        return path

    def unapply(self):
        if self.restore is not None:
            target, original = self.restore
            target.write_text(original)
            self.restore = None


FAILED = re.compile(r"^FAILED (\S+?)(?: - .*)?$", re.M)


def outcome(worker, mutant, path, run):
    rc, out, imported = run.result()
    killers = FAILED.findall(out)
    problem = worker.check_imports(imported, path)
    if rc is None:
        status, problem = "timeout", "ran past --timeout (not counted as a kill)"
    elif problem is not None:
        status = "error"
    elif rc == 1 and killers:
        status = "killed"
    elif rc == 0:
        status = "survived"
    else:
        last = out.strip().splitlines()[-1][:200] if out.strip() else ""
        status, problem = "error", f"pytest exit status {rc} (a collection or usage error, not a kill): {last}"
    return {"name": mutant.name, "file": path, "status": status, "seconds": round(run.seconds, 1),
            "killed_by": killers[:1], "problem": problem, "tail": "" if status == "killed" else out[-3000:]}


def run_all(mutants, jobs, timeout, fork, report):
    """Run each mutant on a free worker (at most `jobs` at once); then confirm the kills. Returns
    (results, confirmed, confirmation output)."""
    base = Path(tempfile.mkdtemp(prefix="fastnets-mutation-"))
    free, running, results = [], [], []
    pending = list(mutants)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                worker = free.pop() if free else Worker(base)
                mutant = pending.pop(0)
                path = worker.apply(mutant)
                running.append((worker, mutant, path, Run(worker, mutant.tests, timeout, fork)))
            time.sleep(0.2)
            for item in list(running):
                worker, mutant, path, run = item
                if run.poll() is None:
                    continue
                running.remove(item)
                worker.unapply()
                free.append(worker)
                results.append(outcome(worker, mutant, path, run))
                report(results[-1], len(results))
        killers = sorted({k for r in results if r["status"] == "killed" for k in r["killed_by"]})
        if not killers:
            return results, True, ""
        worker = free[0] if free else Worker(base)
        run = Run(worker, killers, timeout, fork)
        while run.poll() is None:
            time.sleep(0.2)
        rc, out, imported = run.result()
        problem = worker.check_imports(imported)
        return results, rc == 0 and problem is None, (problem or "") + "\n" + out[-3000:]
    finally:
        for worker, _, _, run in running:
            run.kill()
            worker.unapply()
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ main


def select(args):
    mutants = MUTANTS
    if args.fast:
        mutants = [m for m in mutants if m.fast]
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if not any(fnmatch.fnmatch(m.name, n) for m in MUTANTS)]
        if unknown:
            sys.exit(f"mutation: unknown mutant(s) {unknown}; see --list")
        mutants = [m for m in mutants if any(fnmatch.fnmatch(m.name, n) for n in names)]
    return mutants


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true", help="the CI subset (one mutant per layer)")
    ap.add_argument("--only", help="comma-separated mutant names (fnmatch patterns)")
    ap.add_argument("--list", action="store_true", help="list the mutants and whether each snippet is found once")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="mutants run in parallel (default 1)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per mutant (default 900)")
    ap.add_argument("--spawn", action="store_true",
                    help="a fresh interpreter per run instead of forking the preloaded harness (slower)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    mutants = select(args)

    problems = check_catalogue(mutants)
    if args.list:
        for m in mutants:
            path, why = locate(m)
            print(f"{m.name:<40} {'fast ' if m.fast else '     '}{path or m.file:<42} {why or 'ok'}")
            print(f"{'':<46}tests: {' '.join(m.tests)}")
        print(f"{len(mutants)} mutants ({sum(m.fast for m in mutants)} in --fast); "
              f"{len(problems)} catalogue problem(s)")
        return 2 if problems else 0
    if problems:
        print("mutation: the catalogue is stale:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if not mutants:
        sys.exit("mutation: no mutant selected")

    fork = hasattr(os, "fork") and not args.spawn
    start = time.time()
    if fork:
        preload()

    def report(r, done):
        extra = f" by {r['killed_by'][0]}" if r["killed_by"] else (f": {r['problem']}" if r["problem"] else "")
        print(f"[{done:>2}/{len(mutants)}] {r['status']:<8} {r['seconds']:>6.1f}s  {r['name']}{extra}", flush=True)

    results, ok, out = run_all(mutants, max(1, args.jobs), args.timeout, fork, report)
    order = {m.name: i for i, m in enumerate(mutants)}
    results.sort(key=lambda r: order[r["name"]])
    killed = sum(r["status"] == "killed" for r in results)
    elapsed = time.time() - start
    for r in results:
        if r["status"] != "killed":
            print(f"\n--- {r['name']} ({r['file']}): {r['status']} {r['problem'] or ''}\n{r['tail']}")
    if not ok:
        print("\nmutation: a test that killed a mutant also fails on the unmutated tree:\n" + out)
    print(f"\nmutation: killed {killed}/{len(results)} mutants in {elapsed:.0f} s (-j {args.jobs}, "
          f"{'fork' if fork else 'spawn'}); kills {'confirmed on the unmutated tree' if ok else 'NOT confirmed'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"killed": killed, "total": len(results), "seconds": round(elapsed),
                                               "confirmed": ok, "results": results}, indent=1))
    return 0 if killed == len(results) and ok else 1


if __name__ == "__main__":
    sys.exit(main())
