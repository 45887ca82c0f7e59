"""Autotuning and conv's `auto` do not re-tune inside a training loop (docs/conv_autotune.md).

The Triton convolution's autotune keys hold M's power-of-two bucket and the operands' layouts
(triton_kernels/conv.py: TUNE_KEY) instead of M, H and W, plus every epilogue flag; conv's `auto` policy
(ops/_conv_auto.py) keys its measured Triton-or-cuDNN choice on the batch size's bucket. Batch sizes 256,
255 (a ragged last batch), 128 and 64 (new eval batch sizes) then benchmark three times, not four, and a
second epoch not at all. Deterministic mode (FASTNETS_DETERMINISTIC=1 or torch.use_deterministic_algorithms)
measures nothing: a fixed rule and one fixed tile configuration.

Without a GPU Triton's autotuner is driven through the real launchers with its timer replaced and the kernel
launches recorded instead of run (what is counted is its benchmark calls and key misses), and conv's `auto`
with its timer replaced, as tests/test_conv.py does."""
import pytest
import torch

from fastnets.ops import _conv_auto
from fastnets.triton_kernels import conv as tri

from conftest import backends_here

pytestmark = pytest.mark.skipif("triton" not in backends_here("conv"), reason="needs the Triton backend")
BATCHES = (256, 255, 128, 64)
TRITON_FORWARD = tri.forward  # auto_timer stubs tri.forward for conv's `auto`; the autotune tests call this
DEV = "cuda" if torch.cuda.is_available() else "cpu"


class _NoLaunch:
    """Stands in for a kernel: kernel[grid](...) and kernel.run(...) record nothing and run nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None

    def run(self, *args, **kwargs):
        return None


@pytest.fixture
def autotuner(monkeypatch):
    """The autotuned launch path of a GPU (conv.py's _launch with INTERPRET off), with fresh autotune caches, a
    fake timer (the smallest tile wins) and no kernel run; returns the benchmark calls (kernel, config)."""
    monkeypatch.setattr(tri, "INTERPRET", False)
    monkeypatch.delenv("FASTNETS_CONV_TUNE", raising=False)
    monkeypatch.delenv("FASTNETS_DETERMINISTIC", raising=False)
    calls = []
    for tuned in (tri._fwd_tuned, tri._dgrad_tuned, tri._wgrad_tuned):
        monkeypatch.setattr(tuned, "cache", {})
        monkeypatch.setattr(tuned, "fn", _NoLaunch())  # what the autotuner launches with the best config

        def bench(*args, config, _name=tuned.base_fn.__name__, **kwargs):
            calls.append((_name, str(config)))
            k = config.kwargs
            return float(k["BLOCK_M"] * k["BLOCK_N"] * k["BLOCK_K"] + k["BLOCK_K"])

        monkeypatch.setattr(tuned, "_bench", bench)
    for raw in ("_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel", "_stats_merge_kernel"):
        monkeypatch.setattr(tri, raw, _NoLaunch())  # the untuned launches (FASTNETS_CONV_TUNE=fixed, deterministic)
    return calls


def _layer(n, channels_last=False, k=3):
    """A 64 -> 64 channel convolution on 2x2 images: every autotuned kernel keeps several configurations."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 64, 2, 2, generator=g).to(DEV)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(64, 64, k, k, generator=g) / (64 * k * k) ** 0.5).to(DEV)
    return x, w


def _train_step(x, w, residual=False):
    geo = ([1, 1], [1, 1], [1, 1])
    out = torch.empty(x.shape, device=x.device).contiguous(memory_format=_fmt(x))
    res = torch.zeros_like(out) if residual else None
    TRITON_FORWARD(x, w, None, None, None, res, *geo, False, out)
    tri.grad_input(out, w, torch.empty_like(x), *geo)
    tri.grad_weight(out, x, tuple(w.shape), *geo)


def _fmt(x):
    return torch.channels_last if (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format


def _rounds():
    return {t.base_fn.__name__: len(t.cache) for t in (tri._fwd_tuned, tri._dgrad_tuned, tri._wgrad_tuned)}


def test_batch_sizes_256_255_128_64_tune_three_times_and_a_second_epoch_never(autotuner):
    for n in BATCHES:
        _train_step(*_layer(n))
    assert autotuner, "the autotuner benchmarked nothing: the test does not reach it"
    first = len(autotuner)
    assert _rounds() == {"_conv_fwd_kernel": 3, "_conv_dgrad_kernel": 3, "_conv_wgrad_kernel": 3}, _rounds()
    for n in BATCHES:
        _train_step(*_layer(n))
    assert len(autotuner) == first, "a second epoch re-benchmarked"


def test_layout_and_epilogue_flags_are_part_of_the_key(autotuner):
    _train_step(*_layer(64))
    assert _rounds() == {"_conv_fwd_kernel": 1, "_conv_dgrad_kernel": 1, "_conv_wgrad_kernel": 1}
    _train_step(*_layer(64, channels_last=True))
    assert _rounds() == {"_conv_fwd_kernel": 2, "_conv_dgrad_kernel": 2, "_conv_wgrad_kernel": 2}, _rounds()
    _train_step(*_layer(64), residual=True)
    assert _rounds()["_conv_fwd_kernel"] == 3, _rounds()


def test_tune_key():
    assert tri._tune_key(4 * 256, False, False) == tri._tune_key(4 * 255, False, False)  # one bucket: 1024
    assert tri._tune_key(1024, False) != tri._tune_key(1025, False)  # 2048
    assert len({tri._tune_key(1000, a, b) for a in (False, True) for b in (False, True)}) == 4
    assert tri._tune_key(1, True) == tri._tune_key(2, True)  # small M: no bucket below 2


def _auto_forward(n, channels_last=False, relu=0):
    x, w = _layer(n, channels_last, k=1)
    out = torch.empty(x.shape, device=x.device).contiguous(memory_format=_fmt(x))
    return _conv_auto.forward(x, w, None, None, None, None, [1, 1], [0, 0], [1, 1], relu, out)


@pytest.fixture
def auto_timer(monkeypatch):
    """conv's `auto` policy with fresh choices, a fake timer (it runs each side once, then times) and the Triton
    side a stub (its correctness is tests/test_conv.py's); returns the timed calls."""
    monkeypatch.delenv("FASTNETS_DETERMINISTIC", raising=False)
    monkeypatch.setattr(tri, "forward", lambda *args, **kwargs: args[10])
    monkeypatch.setattr(_conv_auto, "choices", {})
    monkeypatch.setattr(_conv_auto, "_pinned", {})
    monkeypatch.setattr(_conv_auto, "_CACHE_PATH", None)
    timed = []

    def fake_time(fn, reps=5):
        fn()
        timed.append(fn)
        return float(len(timed) % 2)  # cuDNN (timed second) wins

    monkeypatch.setattr(_conv_auto, "_time_ms", fake_time)
    return timed


def test_conv_auto_measures_once_per_batch_bucket(auto_timer):
    for n in BATCHES:
        _auto_forward(n)
    assert len(auto_timer) == 2 * 3, f"{len(auto_timer) // 2} measurements for batch sizes {BATCHES}"
    for n in BATCHES:
        _auto_forward(n)
    assert len(auto_timer) == 2 * 3
    assert len(_conv_auto.choices) == 3 and set(_conv_auto.choices.values()) == {"cudnn"}
    _auto_forward(64, channels_last=True)  # layout and the activation are part of the key
    _auto_forward(64, relu=1)
    assert len(auto_timer) == 2 * 5


def test_deterministic_mode_measures_nothing_and_pins_triton(auto_timer, autotuner, monkeypatch):
    """FASTNETS_DETERMINISTIC=1: conv's `auto` takes Triton by rule (no timing, no cache), and the Triton
    convolution runs the one fixed configuration (no autotuning), whatever batch sizes come."""
    monkeypatch.setenv("FASTNETS_DETERMINISTIC", "1")
    seen = []
    real = tri._launch

    def launch(tuned, raw, grid, *args, **kwargs):
        seen.append(real(tuned, raw, grid, *args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(tri, "_launch", launch)
    for n in BATCHES:
        _auto_forward(n)
        _train_step(*_layer(n))
    assert auto_timer == [] and _conv_auto.choices == {}
    assert set(_conv_auto._pinned.values()) == {"triton"} and len(_conv_auto._pinned) == 3
    assert autotuner == [] and sum(_rounds().values()) == 0
    assert len(seen) == 3 * 4, "forward, grad input, grad weight per batch (auto's forward is a stub here)"
    assert all(cfg == tri._FIXED_GPU_CONFIG for cfg in seen)


def test_torch_deterministic_algorithms_turn_deterministic_mode_on(auto_timer, monkeypatch):
    from fastnets._tensors import deterministic_mode

    assert not deterministic_mode()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert deterministic_mode()
        _auto_forward(64)
    finally:
        torch.use_deterministic_algorithms(False)
    assert auto_timer == [] and list(_conv_auto._pinned.values()) == ["triton"]
