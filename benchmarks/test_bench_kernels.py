"""The kernels against their eager and torch.compile baselines, as pytest-benchmark suites (one group per
op and shape: compare the variants within a group). ResNet-50 / SE-ResNet-50 shapes at batch 256, bf16
channels_last, training forward+backward."""
import pytest
import torch
from torch import nn

from benchmarks.bench_batch_norm import EagerChain, FastnetsFused
from benchmarks.bench_squeeze_excite import EagerSE, FastnetsSE

VARIANTS = ["eager", "compile", "fastnets-triton", "fastnets-cuda"]


def _backend_or_skip(variant):
    import fastnets

    b = variant.split("-", 1)[1]
    if b not in fastnets.available_backends("cuda"):
        pytest.skip(f"backend {b} is not available here")
    return b


def _input(shape):
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(256, 64, 112, 112), (256, 256, 56, 56), (256, 2048, 7, 7)], ids=str)
def test_bn_add_relu_train(synced, benchmark, shape, variant):
    benchmark.group = f"bn_add_relu train fwd+bwd {shape}"
    c = shape[1]
    if variant.startswith("fastnets"):
        mod = FastnetsFused(c, _backend_or_skip(variant))
    else:
        mod = EagerChain(c)
        if variant == "compile":
            mod = torch.compile(mod, dynamic=False)
    mod = mod.cuda().train()
    x, res = _input(shape), torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    synced(lambda: mod(x, res).backward(grad))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(256, 256, 56, 56, 16), (256, 2048, 7, 7, 128)], ids=str)
def test_squeeze_excite_train(synced, benchmark, shape, variant):
    benchmark.group = f"squeeze_excite train fwd+bwd {shape}"
    n, c, h, w, r = shape
    if variant.startswith("fastnets"):
        mod = FastnetsSE(c, r, _backend_or_skip(variant))
    else:
        mod = EagerSE(c, r)
        if variant == "compile":
            mod = torch.compile(mod, dynamic=False)
    mod = mod.to("cuda", torch.bfloat16).train()
    x, res = _input((n, c, h, w)), _input((n, c, h, w))
    grad = torch.randn_like(x)
    synced(lambda: mod(x, res).backward(grad))


@pytest.mark.parametrize("variant", ["cudnn", "compile", "fastnets-triton", "fastnets-auto"])
@pytest.mark.parametrize("shape", [(256, 256, 56, 64, 1, 1, 0), (256, 128, 28, 128, 3, 1, 1)], ids=str)
def test_conv_bn_relu_train(synced, benchmark, shape, variant):
    """The Conv -> BN -> ReLU block, training forward+backward; `cudnn` is the eager nn.Sequential."""
    import fastnets
    from fastnets.nn import ConvBNReLU2d

    benchmark.group = f"conv_bn_relu train fwd+bwd {shape}"
    n, cin, h, cout, k, s, p = shape
    x = _input((n, cin, h, h))
    if variant.startswith("fastnets"):
        backend = variant.split("-", 1)[1]
        block = ConvBNReLU2d(cin, cout, k, stride=s, padding=p)
    else:
        backend = None
        block = nn.Sequential(nn.Conv2d(cin, cout, k, s, p, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        if variant == "compile":
            block = torch.compile(block)
    block = block.to("cuda", torch.bfloat16).to(memory_format=torch.channels_last).train()
    o = (h + 2 * p - k) // s + 1
    grad = torch.randn(n, cout, o, o, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)

    def step():
        if backend is None:
            block(x).backward(grad)
        else:
            with fastnets.use_backend(backend):
                block(x).backward(grad)

    synced(step)
