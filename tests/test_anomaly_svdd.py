"""fastnets.anomaly's code-space scores (svdd.py): the k-NN distance against brute force in numpy, Deep SVDD's
features against the same encoder rebuilt from torch.nn in float64, its centre rule, its frozen BatchNorm
(no trainable shift: the collapse of Ruff et al.'s Proposition 2), its training, the protocol's extra score
kinds, and bad input."""
import numpy as np
import pytest
import torch
from torch import nn

from fastnets.anomaly.model import ReconstructionAE
from fastnets.anomaly.protocol import CodeScorer, run_protocol, score_images, train_autoencoder
from fastnets.anomaly.svdd import DeepSVDD, encode, knn_distance, train_deep_svdd

from test_anomaly import _tiny_data


def _brute_knn(q, b, k, exclude_self):
    d = np.sqrt(((q[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    if exclude_self:
        d[np.arange(len(q)), np.arange(len(q))] = np.inf
    return np.sort(d, axis=1)[:, :k].mean(1)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_distance_matches_brute_force(exclude_self):
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(37, 5, generator=g) + 2.0
    q = bank[:23].clone() if exclude_self else torch.randn(23, 5, generator=g)
    got = knn_distance(q, bank, k=3, exclude_self=exclude_self, batch_size=7)  # several query batches
    want = _brute_knn(q.double().numpy(), bank.double().numpy(), 3, exclude_self)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-6)
    if not exclude_self:  # a query that is a bank row has distance 0 to itself
        assert knn_distance(bank[:1], bank, k=1).item() == 0


def _torch_encoder(ae):
    """The autoencoder's encoder rebuilt from torch.nn modules (Conv2d, BatchNorm2d in eval, ReLU) in float64."""
    layers = []
    blocks = [b for enc in ae.encoders for b in enc] + [ae.bottleneck]
    for b in blocks:
        conv = nn.Conv2d(b.conv.in_channels, b.conv.out_channels, b.conv.kernel_size, b.conv.stride,
                         b.conv.padding, bias=False).double()
        conv.weight.data.copy_(b.conv.weight.detach().double())
        bn = nn.BatchNorm2d(b.bn.num_features, eps=b.bn.eps).double()
        bn.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in b.bn.state_dict().items()})
        layers += [conv, bn, nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten()).eval()


def _trained_ae(c=0, epochs=4):
    xtr, ytr, xte, yte = _tiny_data()
    x = xtr[ytr == c].float() / 255
    return train_autoencoder(x, epochs=epochs, batch_size=16, widths=(4, 8), latent_channels=2, seed=0), x, xte, yte


def test_deep_svdd_features_center_and_frozen_batch_norm():
    ae, x, _, _ = _trained_ae()
    ref = _torch_encoder(ae)
    with torch.no_grad():
        want = ref(x.double())
    torch.testing.assert_close(encode(ae, x).double(), want, rtol=1e-5, atol=1e-6)
    svdd = train_deep_svdd(ae, x, epochs=0)
    torch.testing.assert_close(svdd(x).detach().double(), want, rtol=1e-5, atol=1e-6)
    mean = want.mean(0).float()
    eps = 0.1
    expected_c = torch.where(mean.abs() >= eps, mean, torch.where(mean < 0, -eps, eps))
    torch.testing.assert_close(svdd.center, expected_c, rtol=1e-5, atol=1e-6)
    assert (svdd.center.abs() >= eps - 1e-7).all()
    torch.testing.assert_close(svdd.score(x).double(), ((want - svdd.center.double()) ** 2).sum(1), rtol=1e-4,
                               atol=1e-6)
    bns = [m for m in svdd.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not p.requires_grad for m in bns for p in m.parameters())
    svdd.train()
    assert not any(m.training for m in svdd.modules())  # batch statistics would be a trainable shift
    assert all(p.requires_grad for n, p in svdd.named_parameters() if "conv" in n)
    assert not any(n.endswith("conv.bias") for n, _ in svdd.named_parameters())  # no bias to collapse with
    # the autoencoder itself is untouched
    torch.testing.assert_close(encode(ae, x).double(), want, rtol=1e-5, atol=1e-6)


def test_deep_svdd_training_pulls_the_normal_class_to_the_center():
    ae, x, xte, yte = _trained_ae()
    before = train_deep_svdd(ae, x, epochs=0, seed=0)
    after = train_deep_svdd(ae, x, epochs=6, lr=1e-3, seed=0)
    torch.testing.assert_close(after.center, before.center)  # the centre is fixed before training
    assert after.score(x).mean() < 0.9 * before.score(x).mean()  # 18 steps: 0.83x here
    frozen = {k: v for k, v in before.state_dict().items() if ".bn." in k}
    assert all(torch.equal(after.state_dict()[k], v) for k, v in frozen.items())
    again = train_deep_svdd(ae, x, epochs=6, lr=1e-3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(after.state_dict().values(), again.state_dict().values()))


def test_protocol_code_scores_and_scales():
    data = _tiny_data()
    a = run_protocol(data, classes=[0, 2], seeds=[0], epochs=8, batch_size=16, widths=(4, 8), latent_channels=2,
                     svdd_epochs=2)
    assert set(a["auroc"]) == {"l2", "ssim", "mix", "knn", "svdd", "combo"}
    assert a["config"]["knn_k"] == 5 and a["config"]["svdd_epochs"] == 2
    assert a["mean"]["knn"]["mean"] > 0.8 and a["mean"]["combo"]["mean"] > 0.8  # the toy classes are easy
    b = run_protocol(data, classes=[0], seeds=[0], epochs=1, batch_size=16, widths=(4, 8), code_scores=False)
    assert set(b["auroc"]) == {"l2", "ssim", "mix"} and "knn_k" not in b["config"]
    # combo is the mean of knn and svdd, each over its mean on normal training images
    ae, x, xte, _ = _trained_ae()
    scorer = CodeScorer(ae, x, k=3, svdd_epochs=1)
    tr = score_images(ae, x, code_scorer=scorer, train_images=True)
    np.testing.assert_allclose(tr["knn"].numpy(), _brute_knn(encode(ae, x).double().numpy(),
                                                             encode(ae, x).double().numpy(), 3, True), rtol=1e-5)
    scales = {k: tr[k].mean().item() for k in ("l2", "ssim", "knn", "svdd")}
    te = score_images(ae, xte, scales, code_scorer=scorer)
    torch.testing.assert_close(te["combo"], 0.5 * te["knn"] / scales["knn"] + 0.5 * te["svdd"] / scales["svdd"])
    torch.testing.assert_close(te["mix"], 0.5 * te["l2"] / scales["l2"] + 0.5 * te["ssim"] / scales["ssim"])


def test_code_scores_bad_input_names_the_argument():
    ae, x, _, _ = _trained_ae(epochs=1)
    with pytest.raises(ValueError, match="same width"):
        knn_distance(torch.zeros(3, 4), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="k must be in 1..4"):
        knn_distance(torch.zeros(2, 4), torch.zeros(5, 4), k=5, exclude_self=True)
    with pytest.raises(ValueError, match="exclude_self"):
        knn_distance(torch.zeros(6, 4), torch.zeros(5, 4), exclude_self=True)
    with pytest.raises(ValueError, match="k must be in"):
        CodeScorer(ae, x, k=x.shape[0])
    with pytest.raises(ValueError, match="epochs"):
        train_deep_svdd(ae, x, epochs=-1)
    with pytest.raises(ValueError, match="eps"):
        train_deep_svdd(ae, x, eps=-1)
    with pytest.raises(TypeError, match="autoencoder must be a ReconstructionAE"):
        DeepSVDD(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="scales must hold 'knn' and 'svdd' for 'combo'"):
        score_images(ae, x, {"l2": 1.0, "ssim": 1.0}, code_scorer=CodeScorer(ae, x, k=2, svdd_epochs=0))
    with pytest.raises(RuntimeError, match="no center"):
        DeepSVDD(ae).score(x)
    assert isinstance(ae, ReconstructionAE)
