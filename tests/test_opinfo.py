"""fastnets.ops.conv2d and fastnets.ops.batch_norm as drop-ins for F.conv2d and F.batch_norm, on every
sample of torch's own OpInfo entries (torch.testing._internal.common_methods_invocations.op_db): string
padding, groups, unbatched inputs, missing bias/weight/running statistics. Output, the gradient of every
input that requires one, and the running statistics, against torch, on each backend here."""
import pytest
import torch
import torch.nn.functional as F

import fastnets
from fastnets.ops import batch_norm, conv2d

from conftest import assert_rel, backend_params, device_for

pytest.importorskip("expecttest", reason="torch's OpInfo database needs expecttest (pip install expecttest)")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

# Importing torch's internal test utilities calls torch.backends.disable_global_flags(), which makes every later
# `torch.backends.cudnn.allow_tf32 = ...` in this process raise; the rest of the suite (and users' code under
# test) sets those flags, so allow it again.
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True


def _samples(name, device, dtype):
    op = next(o for o in op_db if o.name == name and o.variant_test_name == "")
    return list(op.sample_inputs(device, dtype, requires_grad=True))


def _clone(v):
    if isinstance(v, torch.Tensor):
        c = v.detach().clone()
        return c.requires_grad_(v.requires_grad)
    return v


def _run(fn, sample):
    inp = _clone(sample.input)
    args = [_clone(a) for a in sample.args]
    kwargs = {k: _clone(v) for k, v in sample.kwargs.items()}
    out = fn(inp, *args, **kwargs)
    leaves = [t for t in [inp, *args, *kwargs.values()] if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out) + 0.1 * torch.arange(out.numel(), device=out.device,
                                                                                       dtype=out.dtype).view_as(out).sin())
    buffers = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor) and not t.requires_grad]
    return out, grads, buffers


FP64_FP32 = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])


def _check_samples(op, torch_op, samples, backend, input_grad_ref=None):
    """Each sample through fastnets' `op` on `backend` and through torch's `torch_op`: the output, every
    gradient and every tensor the op updates in place (BatchNorm's running statistics) must agree.
    input_grad_ref(w): the scale to judge the input's gradient w by, where its true value is near zero."""
    for i, s in enumerate(samples):
        with fastnets.use_backend(backend):
            out, grads, bufs = _run(op, s)
        want, wgrads, wbufs = _run(torch_op, s)
        desc = f"sample {i}: input {tuple(s.input.shape)}, {s.kwargs}"
        assert out.shape == want.shape, desc
        assert_rel(out, want, msg=desc)
        for j, (g, w) in enumerate(zip(grads, wgrads)):
            ref = input_grad_ref(w) if j == 0 and input_grad_ref is not None else None
            assert_rel(g, w, scale=4, ref=ref, msg=f"{desc} grad {j}")
        for j, (b, w) in enumerate(zip(bufs, wbufs)):
            assert_rel(b, w, msg=f"{desc} buffer {j}")


@pytest.mark.parametrize("backend", backend_params("conv"))
@FP64_FP32
def test_conv2d_opinfo_samples(backend, dtype):
    samples = _samples("nn.functional.conv2d", device_for(backend), dtype)
    assert len(samples) >= 20
    _check_samples(conv2d, F.conv2d, samples, backend)
    kinds = {("str-padding" if isinstance(s.kwargs.get("padding"), str) else "int-padding",
              "grouped" if s.kwargs.get("groups", 1) != 1 else "dense", s.input.dim()) for s in samples}
    # the samples cover what the issue reported broken: string padding, groups, unbatched input
    assert {k[0] for k in kinds} == {"str-padding", "int-padding"} and {k[1] for k in kinds} == {"grouped", "dense"}
    assert {k[2] for k in kinds} == {3, 4}


@pytest.mark.parametrize("backend", backend_params("batch_norm"))
@FP64_FP32
def test_batch_norm_opinfo_samples(backend, dtype):
    samples = _samples("nn.functional.batch_norm", device_for(backend), dtype)
    assert len(samples) >= 8
    # the input's gradient can be near zero (training removes the mean of the upstream gradient): unit scale
    _check_samples(batch_norm, F.batch_norm, samples, backend, input_grad_ref=torch.ones_like)


def test_conv2d_bad_arguments_name_them():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="padding"):
        conv2d(x, w, groups=2, padding="full")
    with pytest.raises(ValueError, match="padding='same'"):
        conv2d(x, w, groups=2, padding="same", stride=2)
    with pytest.raises(ValueError, match="groups"):
        conv2d(x, w, groups=3)
    with pytest.raises(ValueError, match="groups"):
        conv2d(x, w, groups=0)
    with pytest.raises(TypeError, match="groups"):
        conv2d(x, w, groups=2.0)
    with pytest.raises(ValueError, match="stride"):
        conv2d(x, w, groups=2, stride=(1, 2, 3))
    with pytest.raises(ValueError, match="input"):
        conv2d(x[0, 0], w, groups=2)
