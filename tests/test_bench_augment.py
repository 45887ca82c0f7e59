"""`python -m fastnets.bench --augment` (fastnets/bench/augment_throughput.py) at tiny sizes: the report's
rows, the speedups against the per-image baseline, and bad arguments naming their flag."""
import json
import os

import pytest

from fastnets.bench import augment_throughput as AT
from fastnets.bench.__main__ import main

ARGS = ["--augment", "--augment-sizes", "cifar10", "--batch-size", "3", "--repeats", "2", "--warmup", "0"]


def test_augment_flag_writes_rows(tmp_path, capsys):
    assert main(ARGS + ["--out", str(tmp_path)]) == 0
    with open(os.path.join(tmp_path, "augment-throughput_cpu.json")) as f:
        rep = json.load(f)
    assert os.path.isfile(os.path.join(tmp_path, "augment-throughput_cpu.md"))
    rows = {r["variant"]: r for r in rep["rows"]}
    assert set(rows) == set(AT.VARIANTS)
    for name in ("fastnets", "tv2-per-image", "tv2-batch"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["batch"] == 3 and r["input"] == [32, 32] and r["output"] == [32, 32]
        assert r["min_seconds"] <= r["seconds_per_batch"] <= r["max_seconds"]
        assert r["images_per_s"] == pytest.approx(3 / r["seconds_per_batch"])
        assert r["speedup_vs_tv2_per_image"] == pytest.approx(
            rows["tv2-per-image"]["seconds_per_batch"] / r["seconds_per_batch"])
    assert rows["tv2-per-image"]["speedup_vs_tv2_per_image"] == 1.0
    for r in rows.values():  # every variant either ran or says why not
        assert r["status"] == "ok" or (r["status"] == "unavailable" and r["reason"])
    assert "load_average" in rep["environment"]
    assert "| cifar10 32->32 | 3 | fastnets |" in capsys.readouterr().out


def test_measure_two_sizes_selected_variants():
    rows = AT.measure("cpu", sizes=("cifar10", "imagenet"), batch=1, rounds=1, warmup=0,
                      variants=("fastnets", "tv2-per-image"))
    assert [(r["size"], r["variant"]) for r in rows] == [
        ("cifar10", "fastnets"), ("cifar10", "tv2-per-image"), ("imagenet", "fastnets"), ("imagenet", "tv2-per-image")]
    assert rows[2]["input"] == [256, 256] and rows[2]["output"] == [224, 224]
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in rows)


def _assert_usage_error(main_fn, argv, flag, capsys):
    """main_fn(argv) stops with argparse's usage status (2) and names `flag`, the one with the refused value."""
    with pytest.raises(SystemExit) as e:
        main_fn(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


# each a flag and a value it refuses
@pytest.mark.parametrize("extra", [["--batch-size", "0"], ["--repeats", "0"], ["--warmup", "-1"],
                                   ["--augment-sizes", "cifar10,mnist"], ["--augment-sizes", " , "],
                                   ["--device", "tpu"]])
def test_bad_arguments_name_the_flag(tmp_path, capsys, extra):
    _assert_usage_error(main, ARGS + extra + ["--out", str(tmp_path)], extra[0], capsys)


def test_measure_bad_input():
    with pytest.raises(ValueError, match="sizes"):
        AT.measure("cpu", sizes=("mnist",))
    with pytest.raises(ValueError, match="rounds"):
        AT.measure("cpu", rounds=0)
    with pytest.raises(ValueError, match="variants"):
        AT.measure("cpu", sizes=("cifar10",), batch=1, rounds=1, warmup=0, variants=("albumentations",))


# ------------------------------------------------------------- training with fastnets.augment per batch

def _tiny_cifar(n_train=48, n_test=24):
    import torch

    from fastnets.bench.datasets import Dataset, Split

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(n_train + n_test) % 10
    return Dataset("cifar10", Split(x[:n_train], y[:n_train], "synthetic"), Split(x[n_train:], y[n_train:], "synthetic"),
                   "synthetic")


def test_fastnets_mode_is_a_padded_crop_and_flip_per_sample():
    import torch
    import torch.nn.functional as F

    from fastnets.bench import train as TR

    ds = _tiny_cifar()
    data = TR.AugmentedEpochs(ds, "cpu", seed=3, augment="fastnets", show_progress=False)
    x = ds.train.x[:6]
    assert data.epoch(0) is data.x  # no per-epoch copy: augmentation happens per batch
    out = data.batch(x, ds.mean, ds.std, torch.contiguous_format)
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    mean, std = torch.tensor(ds.mean).view(3, 1, 1), torch.tensor(ds.std).view(3, 1, 1)
    padded = F.pad(x.double() / 255, (4, 4, 4, 4))  # v2.Pad(4): fill 0 before normalisation
    seen = set()
    for i in range(6):  # each output is exactly one of the 81 crops x 2 flips of its padded image
        best = min(((float((((c.flip(-1) if f else c) - mean) / std - out[i]).abs().max()), (t, l, f))
                    for t in range(9) for l in range(9) for f in (False, True)
                    for c in [padded[i, :, t:t + 32, l:l + 32]]), key=lambda r: r[0])
        assert best[0] < 1e-5, (i, best)
        seen.add(best[1])
    assert len(seen) > 1  # not one parameter set for the whole batch
    data.epoch(0)
    assert torch.equal(data.batch(x, ds.mean, ds.std, torch.contiguous_format), out)  # replayed per epoch
    data.epoch(1)
    assert not torch.equal(data.batch(x, ds.mean, ds.std, torch.contiguous_format), out)
    plain = TR.AugmentedEpochs(ds, "cpu", 3, augment="none", show_progress=False)
    assert torch.equal(plain.batch(x, ds.mean, ds.std, torch.contiguous_format), TR.normalize(x, ds.mean, ds.std))
    with pytest.raises(ValueError, match="augment"):
        TR.AugmentedEpochs(ds, "cpu", 0, augment="kornia")


def test_compare_same_budget_with_and_without_augmentation():
    from fastnets.bench import augment_training as AG

    rows = AG.compare(_tiny_cifar(), modes=("none", "fastnets"), epochs=1, batch_size=16, seed=0)
    assert [r["augment_mode"] for r in rows] == ["none", "fastnets"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["steps"] == 3 and r["train_images"] == 48 and r["test_images"] == 24
        assert 0 <= r["test_accuracy"] <= 1 and r["seconds_per_epoch"] > 0
    assert "fastnets.augment" in rows[1]["augmentation"] and rows[0]["augmentation"] == "none"
    with pytest.raises(ValueError, match="modes"):
        AG.compare(_tiny_cifar(), modes=("autoaugment",))


@pytest.mark.parametrize("extra", [["--modes", "none,cutmix"], ["--epochs", "0"], ["--batch-size", "1"],
                                   ["--max-train-images", "0"], ["--model", "lenet5"],
                                   ["--data", "/nonexistent/folder"]])
def test_augment_training_bad_arguments(tmp_path, capsys, extra):
    from fastnets.bench import augment_training as AG

    _assert_usage_error(AG.main, ["--out", str(tmp_path)] + extra, extra[0], capsys)
