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


@pytest.mark.parametrize("extra, flag", [
    (["--batch-size", "0"], "--batch-size"),
    (["--repeats", "0"], "--repeats"),
    (["--warmup", "-1"], "--warmup"),
    (["--augment-sizes", "cifar10,mnist"], "--augment-sizes"),
    (["--augment-sizes", " , "], "--augment-sizes"),
    (["--device", "tpu"], "--device"),
])
def test_bad_arguments_name_the_flag(tmp_path, capsys, extra, flag):
    with pytest.raises(SystemExit) as e:
        main(ARGS + extra + ["--out", str(tmp_path)])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_measure_bad_input():
    with pytest.raises(ValueError, match="sizes"):
        AT.measure("cpu", sizes=("mnist",))
    with pytest.raises(ValueError, match="rounds"):
        AT.measure("cpu", rounds=0)
    with pytest.raises(ValueError, match="variants"):
        AT.measure("cpu", sizes=("cifar10",), batch=1, rounds=1, warmup=0, variants=("albumentations",))
