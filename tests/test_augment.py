"""fastnets.augment: the fused per-sample augmentation kernel against its torch reference (grid_sample + colour
ops) and against torchvision v2's functional ops applied per image with the same parameters; parameter
distributions, determinism under a seed, per-sample independence, bad input."""
import math

import pytest
import torch

import fastnets
import fastnets.augment as A
from fastnets.ops.augment import augment_apply
from fastnets.reference import augment as ref

from conftest import REL_BOUND, assert_rel, backends_here, device_for, rel_error

tv2 = pytest.importorskip("torchvision.transforms.v2.functional")

BACKENDS = backends_here("augment")
DEV = device_for("triton")


def _gen(seed=0, device=DEV):
    return torch.Generator(device=device).manual_seed(seed)


def _image(n=3, c=3, h=13, w=17, dtype=torch.float64, seed=0):
    """Smooth non-constant images in [0, 1] (bilinear comparisons of white noise would only test rounding)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h, dtype=torch.float64), torch.linspace(0, 1, w, dtype=torch.float64),
                            indexing="ij")
    phase = torch.rand(n, c, 1, 1, generator=g, dtype=torch.float64) * 6
    img = 0.5 + 0.3 * torch.sin(3 * xx + 2 * yy + phase) + 0.15 * torch.rand(n, c, h, w, generator=g, dtype=torch.float64)
    img = img.clamp(0, 1)
    if dtype == torch.uint8:
        return (img * 255).round().to(torch.uint8).to(DEV)
    return img.to(dtype).to(DEV)


def _run(aug, x, params, backend):
    with fastnets.use_backend(backend):
        return aug.apply(x, params)


FULL = [
    A.RandomResizedCrop((11, 13), scale=(0.3, 1.0)), A.RandomHorizontalFlip(), A.RandomVerticalFlip(0.3),
    A.RandomAffine(25, translate=(0.1, 0.2), scale=(0.8, 1.2), shear=(-10, 10, -5, 5)), A.RandomPerspective(0.4, p=0.7),
    A.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5), A.Normalize([0.4, 0.5, 0.6], [0.2, 0.25, 0.3]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dtype,channels_last,interpolation,c", [
    (torch.uint8, False, "bilinear", 3), (torch.float32, True, "bilinear", 3), (torch.float16, False, "nearest", 3),
    (torch.uint8, True, "nearest", 1),
])
def test_full_pipeline_matches_float64_reference(backend, in_dtype, channels_last, interpolation, c):
    x = _image(4, c, 13, 17, in_dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    norm = A.Normalize([0.5] * c, [0.25] * c) if c != 3 else FULL[-1]
    aug = A.Augment(FULL[:-1] + [norm], interpolation=interpolation, fill=0.3 * (255 if in_dtype == torch.uint8 else 1))
    p = aug.sample(x, _gen(1))
    y = _run(aug, x, p, backend)
    assert y.shape == (4, c, 11, 13) and y.dtype == torch.float32
    x64 = x.double() / 255 if in_dtype == torch.uint8 else x.double()
    aug64 = A.Augment(aug.transforms, interpolation=interpolation, fill=0.3)
    expected = _run(aug64, x64, p, "reference")  # float64 arithmetic from the same (float32) parameters
    if interpolation == "nearest":
        # fp32 source positions may round the other way within ~1e-6 of a tie: allow a few pixels
        bad = ((y.double() - expected).abs() > 1e-2).float().mean().item()
        assert bad < 0.01, f"{bad:.3%} of the nearest-sampled values differ"
    else:
        assert_rel(y, expected, torch.float32, msg=f"{backend} {in_dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_channels_last_output(backend):
    x = _image(3, 3, 12, 12, torch.uint8)
    aug32 = A.Augment(FULL)
    aug16 = A.Augment(FULL, out_dtype=torch.bfloat16, memory_format=torch.channels_last)
    p = aug32.sample(x, _gen(2))
    y32, y16 = _run(aug32, x, p, backend), _run(aug16, x, p, backend)
    assert y16.dtype == torch.bfloat16 and y16.is_contiguous(memory_format=torch.channels_last)
    assert_rel(y16, y32)


# ------------------------------------------------------------------------- against torchvision v2, per image


def _both(aug, x, p):
    """The reference (float64) and every backend's result."""
    return {b: _run(aug, x, p, b) for b in BACKENDS}


def _check_v2(aug, x, p, v2_images):
    expected = torch.stack(v2_images)
    for b, y in _both(aug, x, p).items():
        assert y.shape == expected.shape, (b, y.shape, expected.shape)
        assert_rel(y, expected, torch.float32, msg=f"{b} against torchvision v2")


def test_flips_match_v2():
    x = _image(6)
    aug = A.Augment([A.RandomHorizontalFlip(0.5), A.RandomVerticalFlip(0.5)])
    p = aug.sample(x, _gen(3))
    hf, vf = p["steps"][0].params["flip"], p["steps"][1].params["flip"]
    assert hf.any() and not hf.all()
    imgs = []
    for i in range(x.shape[0]):
        im = x[i]
        im = tv2.horizontal_flip(im) if hf[i] else im
        imgs.append(tv2.vertical_flip(im) if vf[i] else im)
    _check_v2(aug, x, p, imgs)


def test_resized_crop_then_flip_matches_v2():
    x = _image(5, 3, 16, 20)
    aug = A.Augment([A.RandomResizedCrop((9, 14), scale=(0.2, 1.0)), A.RandomHorizontalFlip()])
    p = aug.sample(x, _gen(4))
    s, f = p["steps"][0].params, p["steps"][1].params["flip"]
    imgs = []
    for i in range(x.shape[0]):
        im = tv2.resized_crop(x[i], int(s["top"][i]), int(s["left"][i]), int(s["height"][i]), int(s["width"][i]),
                              [9, 14], antialias=False)
        imgs.append(tv2.horizontal_flip(im) if f[i] else im)
    _check_v2(aug, x, p, imgs)


def test_rotation_matches_v2():
    x = _image(4)
    aug = A.Augment([A.RandomRotation(40)])
    p = aug.sample(x, _gen(5))
    a = p["steps"][0].params["angle"]
    _check_v2(aug, x, p, [tv2.rotate(x[i], float(a[i]), interpolation=tv2.InterpolationMode.BILINEAR, fill=0.0)
                          for i in range(x.shape[0])])


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_affine_matches_v2(interpolation):
    x = _image(4)
    aug = A.Augment([A.RandomAffine(30, translate=(0.2, 0.1), scale=(0.7, 1.3), shear=(-15, 15, -10, 10))],
                    interpolation=interpolation, fill=0.25)
    p = aug.sample(x, _gen(6))
    s = p["steps"][0].params
    mode = tv2.InterpolationMode.BILINEAR if interpolation == "bilinear" else tv2.InterpolationMode.NEAREST
    imgs = [tv2.affine(x[i], float(s["angle"][i]), [float(s["translate_x"][i]), float(s["translate_y"][i])],
                       float(s["scale"][i]), [float(s["shear_x"][i]), float(s["shear_y"][i])], interpolation=mode,
                       fill=0.25) for i in range(x.shape[0])]
    if interpolation == "bilinear":
        _check_v2(aug, x, p, imgs)
    else:
        for b, y in _both(aug, x, p).items():
            bad = ((y.double() - torch.stack(imgs)).abs() > 1e-6).float().mean().item()
            assert bad < 0.01, f"{b}: {bad:.3%} of nearest-sampled values differ from v2"


def test_perspective_matches_v2():
    x = _image(4)
    aug = A.Augment([A.RandomPerspective(0.6, p=0.75)])
    p = aug.sample(x, _gen(7))
    s = p["steps"][0].params
    imgs = []
    for i in range(x.shape[0]):
        if s["apply"][i]:
            imgs.append(tv2.perspective(x[i], s["startpoints"][i].long().tolist(), s["endpoints"][i].long().tolist(),
                                        interpolation=tv2.InterpolationMode.BILINEAR, fill=0.0))
        else:
            imgs.append(x[i])
    _check_v2(aug, x, p, imgs)


def test_padded_random_crop_matches_v2():
    x = _image(4, 3, 10, 12)
    aug = A.Augment([A.RandomCrop((10, 12), padding=3)], fill=0.7)
    p = aug.sample(x, _gen(8))
    s = p["steps"][0].params
    imgs = [tv2.crop(tv2.pad(x[i], [3], fill=0.7), int(s["top"][i]), int(s["left"][i]), 10, 12)
            for i in range(x.shape[0])]
    _check_v2(aug, x, p, imgs)


@pytest.mark.parametrize("c", [1, 3])
def test_color_jitter_noise_free_normalize_match_v2(c):
    x = _image(5, c)
    mean, std = [0.3] * c, [0.2] * c
    aug = A.Augment([A.ColorJitter(brightness=0.6, contrast=0.7, saturation=0.8), A.Normalize(mean, std)])
    p = aug.sample(x, _gen(9))
    f = p["colour"].double()
    imgs = []
    for i in range(x.shape[0]):
        im = tv2.adjust_brightness(x[i], float(f[i, 0]))
        im = tv2.adjust_contrast(im, float(f[i, 1]))
        im = tv2.adjust_saturation(im, float(f[i, 2]))
        imgs.append(tv2.normalize(im, mean, std))
    _check_v2(aug, x, p, imgs)


# ------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_under_a_seed(backend):
    x = _image(4, 3, 12, 12, torch.uint8)
    aug = A.Augment(FULL[:-1] + [A.GaussianNoise(sigma=0.1), FULL[-1]])
    with fastnets.use_backend(backend):
        a = aug(x, _gen(11))
        b = aug(x, _gen(11))
        c = aug(x, _gen(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_parameters_per_sample_follow_v2_distributions():
    n = 4000
    x = torch.zeros(n, 1, 32, 48, dtype=torch.uint8, device=DEV)
    aug = A.Augment([A.RandomResizedCrop(24, scale=(0.2, 0.9), ratio=(0.5, 2.0)), A.RandomHorizontalFlip(0.3),
                     A.RandomRotation((-10, 30)), A.ColorJitter(brightness=0.4)])
    p = aug.sample(x, _gen(13))
    s = p["steps"][0].params
    area = (s["height"] * s["width"]) / (32 * 48)
    ratio = s["width"] / s["height"]
    assert area.min() >= 0.2 - 0.02 and area.max() <= 0.9 + 0.02  # rounding of h and w
    assert ratio.min() >= 0.5 * 0.9 and ratio.max() <= 2.0 * 1.1
    assert (s["top"] >= 0).all() and (s["top"] + s["height"] <= 32).all()
    assert (s["left"] >= 0).all() and (s["left"] + s["width"] <= 48).all()
    flips = p["steps"][1].params["flip"].double()
    sd = math.sqrt(0.3 * 0.7 / n)
    assert abs(flips.mean().item() - 0.3) < 4 * sd
    angle = p["steps"][2].params["angle"]
    assert angle.min() >= -10 and angle.max() <= 30 and abs(angle.mean().item() - 10) < 4 * 40 / math.sqrt(12 * n)
    b = p["colour"][:, 0].double()
    assert b.min() >= 0.6 and b.max() <= 1.4 and abs(b.mean().item() - 1.0) < 4 * 0.8 / math.sqrt(12 * n)
    # independent per sample: neighbouring samples' draws are uncorrelated
    for v in (angle, b, flips, area):
        v = (v - v.mean()) / v.std()
        assert abs((v[1:] * v[:-1]).mean().item()) < 4 / math.sqrt(n)
    assert abs(torch.corrcoef(torch.stack([angle, b]))[0, 1].item()) < 4 / math.sqrt(n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_distribution_and_independence(backend):
    x = torch.full((6, 3, 16, 16), 0.5, device=DEV)
    sigma = 0.05
    with fastnets.use_backend(backend):
        y = A.Augment([A.GaussianNoise(mean=0.01, sigma=sigma)])(x, _gen(14))
    d = (y - x).double()
    assert abs(d.mean().item() - 0.01) < 4 * sigma / math.sqrt(d.numel())
    assert abs(d.std().item() / sigma - 1) < 0.1
    assert not torch.equal(d[0], d[1])
    assert abs(torch.corrcoef(torch.stack([d[0].flatten(), d[1].flatten()]))[0, 1].item()) < 0.15


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_pipeline_is_exact_and_keeps_layouts(backend):
    x = _image(2, 3, 7, 9, torch.uint8).to(memory_format=torch.channels_last)
    with fastnets.use_backend(backend):
        y = A.Augment([])(x)
    torch.testing.assert_close(y, x.float() / 255, atol=1e-7, rtol=0)


def test_opcheck_reference():
    x = _image(2, 3, 8, 8, torch.uint8)
    aug = A.Augment(FULL)
    p = aug.sample(x, _gen(15))
    scale = torch.full((3,), 2.0, device=DEV)
    shift = torch.full((3,), -1.0, device=DEV)
    args = (x, p["matrix"], p["box"], p["colour"], True, True, True, None, 0.0, 0.0, True, scale, shift, 11, 13,
            False, 0.0, torch.float32, False, "reference")
    torch.library.opcheck(torch.ops.fastnets.augment_apply.default, args)


# ------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    x = _image(2, 3, 8, 8, torch.uint8)
    aug = A.Augment([A.RandomHorizontalFlip()])
    with pytest.raises(TypeError, match="input"):
        aug(x.to(torch.int32))
    with pytest.raises(ValueError, match="input must be 4-D"):
        aug(x[0])
    with pytest.raises(ValueError, match="empty batch"):
        aug(x[:0])
    with pytest.raises(ValueError, match="requires grad"):
        aug(x.float().requires_grad_())
    with pytest.raises(TypeError, match="generator"):
        aug(x, 0)
    if DEV != "cpu":
        with pytest.raises(ValueError, match="generator"):
            aug(x, torch.Generator())
    with pytest.raises(ValueError, match="contrast and saturation need 1 or 3 channels"):
        A.Augment([A.ColorJitter(contrast=0.3)])(_image(2, 2, 8, 8))
    with pytest.raises(ValueError, match="Normalize"):
        A.Augment([A.Normalize([0.5, 0.5], [0.2, 0.2])])(x)
    p = aug.sample(x)
    with pytest.raises(ValueError, match="matrix must have shape"):
        augment_apply(x, p["matrix"][:1], (8, 8))
    with pytest.raises(TypeError, match="matrix must be"):
        augment_apply(x, p["matrix"].double(), (8, 8))
    with pytest.raises(ValueError, match="out_hw"):
        augment_apply(x, p["matrix"], (0, 8))
    with pytest.raises(ValueError, match="noise_seed"):
        augment_apply(x, p["matrix"], (8, 8), noise_std=0.1)
    with pytest.raises(ValueError, match="colour"):
        augment_apply(x, p["matrix"], (8, 8), brightness=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["matrix_nan", "matrix_inf", "box_nan", "brightness_negative", "contrast_nan",
                                 "saturation_negative"])
def test_invalid_parameters_give_nan_samples_without_a_host_check(backend, bad):
    """Parameter values are not read on the host (a sync every batch): a sample with a non-finite matrix or box,
    or a negative/NaN factor of an enabled colour op, is all NaN; the other samples are untouched (float64
    torch reference of the valid ones). A factor of a colour op that is off does not matter."""
    x = _image(3, 3, 9, 11, torch.uint8)
    aug = A.Augment([A.RandomResizedCrop((7, 8)), A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)])
    p = aug.sample(x, _gen(5))
    what, kind = bad.split("_")
    value = {"nan": float("nan"), "inf": float("inf"), "negative": -0.5}[kind]
    if what == "matrix":
        p["matrix"][1, 0, 1] = value
    elif what == "box":
        p["box"][1, 2] = value
    else:
        p["colour"][1, ("brightness", "contrast", "saturation").index(what)] = value
    out = _run(aug, x, p, backend)
    assert torch.isnan(out[1]).all(), f"{bad}: the invalid sample is not NaN"
    keep = [0, 2]
    want = ref.apply(x[keep].cpu(), p["matrix"][keep].cpu().double(), p["box"][keep].cpu().double(),
                     p["colour"][keep].cpu().double(), True, True, True, None, 0.0, 0.0, True, None, None, False, 0.0,
                     torch.empty(2, 3, 7, 8, dtype=torch.float64))
    assert_rel(out[keep], want, torch.float32, msg=bad)
    jitter_off = A.Augment([A.RandomResizedCrop((7, 8)), A.ColorJitter(brightness=0.4)])
    p2 = jitter_off.sample(x, _gen(5))
    p2["colour"][1, 1:] = -1.0  # contrast and saturation are off: their factors are not used
    assert not torch.isnan(_run(jitter_off, x, p2, backend)).any()


@pytest.mark.parametrize("make,match", [
    (lambda: A.RandomHorizontalFlip(1.5), "p must be a probability"),
    (lambda: A.RandomResizedCrop(8, scale=(0.9, 0.1)), "scale must be"),
    (lambda: A.RandomResizedCrop(8, ratio=(0, 1)), "scale and ratio must be positive"),
    (lambda: A.RandomResizedCrop(0), "size must be positive"),
    (lambda: A.RandomRotation(-5), "degrees must be non-negative"),
    (lambda: A.RandomAffine(0, translate=(1.5, 0)), "translate"),
    (lambda: A.RandomAffine(0, scale=(0, 1)), "scale values must be positive"),
    (lambda: A.RandomAffine(0, shear=(1, 2, 3)), "shear"),
    (lambda: A.RandomPerspective(distortion_scale=2), "distortion_scale"),
    (lambda: A.RandomCrop(8, padding=-1), "padding must be non-negative"),
    (lambda: A.RandomCrop(8, padding_mode="reflect"), "padding_mode"),
    (lambda: A.ColorJitter(brightness=-0.1), "brightness must be non-negative"),
    (lambda: A.ColorJitter(hue=0.1), "hue"),
    (lambda: A.GaussianNoise(sigma=-1), "sigma"),
    (lambda: A.Normalize([0.5], [0.0]), "std must be positive"),
    (lambda: A.Augment([A.Normalize([0.5], [0.5]), A.ColorJitter(0.1)]), "ColorJitter must come before"),
    (lambda: A.Augment([object()]), "transforms"),
    (lambda: A.Augment([], interpolation="bicubic"), "interpolation"),
    (lambda: A.Augment([], out_dtype=torch.int8), "out_dtype"),
])
def test_bad_arguments_name_themselves(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()
