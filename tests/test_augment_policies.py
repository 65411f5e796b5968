"""Augmentation policies (lightning_tricks/policies.py) and their wiring in the data modules.

The pixel ops are checked against PIL (8-bit, so within rounding) or their formula; the geometric ops
against exact permutations (rot90, shifts, pixel repetition); the random policies against a replay of
their documented draws; the data modules for normalization, flip defaults, eval batches left alone,
exact resume, and one-line errors; and a tiny training run per policy with both loaders.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, compose_train
from PIL import Image, ImageEnhance, ImageOps

from lightning_tricks import policies as P
from lightning_tricks.augment import random_crop_flip
from lightning_tricks.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
)
from lightning_tricks.train import ConfigError, _instantiate, train

POLICY_NAMES = [p for p in P.POLICIES if p != "none"]


def _images(n=6, c=3, h=10, w=12, seed=0, levels=True):
    """Random images in [0, 1]; on the 8-bit grid (``v / 255``) when ``levels``."""
    g = torch.Generator().manual_seed(seed)
    if levels:
        return torch.randint(0, 256, (n, c, h, w), generator=g).float() / 255.0
    return torch.rand(n, c, h, w, generator=g)


def _to_pil(img: torch.Tensor) -> Image.Image:
    arr = (img * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, mode="L" if arr.shape[2] == 1 else "RGB")


def _from_pil(im: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(im).copy()).float() / 255.0
    return arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)


# -- pixel ops against PIL and formulas ----------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_equalize_posterize_solarize_autocontrast_match_pil(channels):
    x = _images(n=4, c=channels, h=9, w=7)
    x[1] = ((x[1] * 0.3 + 0.2) * 255).round() / 255  # low contrast: autocontrast and equalize have work to do
    x[2] = 128 / 255  # a flat image: both leave it unchanged
    bits = torch.tensor([1, 3, 5, 8])
    thresholds = torch.tensor([0.0, 0.25, 0.5, 1.0])
    eq, po, so, ac = P.equalize(x), P.posterize(x, bits), P.solarize(x, thresholds), P.autocontrast(x)
    for i in range(4):
        im = _to_pil(x[i])
        torch.testing.assert_close(eq[i], _from_pil(ImageOps.equalize(im)), atol=0, rtol=0)
        torch.testing.assert_close(po[i], _from_pil(ImageOps.posterize(im, int(bits[i]))), atol=0, rtol=0)
        t = round(float(thresholds[i]) * 255)
        torch.testing.assert_close(so[i], _from_pil(ImageOps.solarize(im, t)), atol=1e-6, rtol=0)
        # PIL's autocontrast truncates each level to 8 bits, int(v * s - lo * s) with s = 255 / (hi - lo) in
        # double precision, where 254.99999... becomes 254: within one level of the exact stretch
        ref = _from_pil(ImageOps.autocontrast(im))
        torch.testing.assert_close((ac[i] * 255 + 1e-4).floor() / 255, ref, atol=1 / 255 + 1e-6, rtol=0)
        low, high = x[i].amin(dim=(1, 2), keepdim=True), x[i].amax(dim=(1, 2), keepdim=True)
        exact = torch.where(high > low, (x[i] - low) / (high - low).clamp_min(1e-12), x[i])
        torch.testing.assert_close(ac[i], exact)


@pytest.mark.parametrize("channels", [1, 3])
def test_enhance_ops_match_pil(channels):
    x = _images(n=4, c=channels, h=8, w=9, seed=1)
    factors = torch.tensor([0.0, 0.4, 1.0, 1.8])
    ops = {
        "brightness": (P.adjust_brightness, ImageEnhance.Brightness),
        "contrast": (P.adjust_contrast, ImageEnhance.Contrast),
        "color": (P.adjust_saturation, ImageEnhance.Color),
        "sharpness": (P.adjust_sharpness, ImageEnhance.Sharpness),
    }
    for name, (ours, pil) in ops.items():
        out = ours(x, factors)
        assert out.shape == x.shape and out.dtype == x.dtype
        for i in range(4):
            ref = _from_pil(pil(_to_pil(x[i])).enhance(float(factors[i])))
            # PIL works on 8 bits: the degenerate image (contrast: its integer mean) and the blend are rounded
            torch.testing.assert_close(out[i], ref, atol=2.5 / 255, rtol=0, msg=f"{name} factor {factors[i]}")


def test_enhance_ops_formulas_exactly():
    x = _images(n=3, c=3, levels=False, seed=2)
    f = torch.tensor([0.5, 1.0, 1.5])
    fv = f.view(-1, 1, 1, 1)
    gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    torch.testing.assert_close(P.grayscale(x), gray)
    torch.testing.assert_close(P.adjust_brightness(x, f), (x * fv).clamp(0, 1))
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(P.adjust_contrast(x, f), (mean + fv * (x - mean)).clamp(0, 1))
    torch.testing.assert_close(P.adjust_saturation(x, f), (gray + fv * (x - gray)).clamp(0, 1))
    one = x[:, :1]
    assert torch.equal(P.adjust_saturation(one, f), one)  # 1 channel: the identity
    # sharpness at factor 0 is the smoothed image: interior by the 3x3 kernel / 13, border kept
    k = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    blurred = x.clone()
    for r in range(1, x.shape[2] - 1):
        for c in range(1, x.shape[3] - 1):
            blurred[:, :, r, c] = (x[:, :, r - 1 : r + 2, c - 1 : c + 2] * k).sum(dim=(2, 3))
    torch.testing.assert_close(P.adjust_sharpness(x, 0.0), blurred)
    torch.testing.assert_close(P.adjust_sharpness(x, 1.0), x)


# -- geometry -----------------------------------------------------------------------------------------------


def test_affine_rotate_translate_shear_exact():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5) + 1
    out = P.affine(x, P.rotate_matrix(torch.tensor([90.0, -90.0])), "nearest")
    torch.testing.assert_close(out[0], torch.rot90(x[0], 1, (1, 2)))  # counter-clockwise on screen
    torch.testing.assert_close(out[1], torch.rot90(x[1], -1, (1, 2)))
    # translate by (2, -1): content moves 2 right and 1 up, black enters
    out = P.affine(x, P.translate_matrix(torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 0.0])), "nearest")
    expected = torch.zeros_like(x[0])
    expected[:, :4, 2:] = x[0, :, 1:, :3]
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out[1], x[1])
    # shear_x with s = 1 about the center: row r takes input column c + (r - 2)
    out = P.affine(x, P.shear_matrix(torch.tensor([1.0, 1.0]), "x"), "nearest")
    expected = torch.zeros_like(x[0])
    for r in range(5):
        for c in range(5):
            if 0 <= c + r - 2 < 5:
                expected[0, r, c] = x[0, 0, r, c + r - 2]
    torch.testing.assert_close(out[0], expected)
    out = P.affine(x, P.shear_matrix(torch.tensor([1.0, 1.0]), "y"), "nearest")
    expected_y = torch.zeros_like(x[0])
    for r in range(5):
        for c in range(5):
            if 0 <= r + c - 2 < 5:
                expected_y[0, r, c] = x[0, 0, r + c - 2, c]
    torch.testing.assert_close(out[0], expected_y)
    with pytest.raises(ValueError, match="axis must be 'x' or 'y', got 'z'"):
        P.shear_matrix(torch.tensor([1.0]), "z")


def test_resized_crop_identity_zoom_and_flip():
    x = _images(n=3, c=2, h=4, w=4, levels=False)
    whole = torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 3)
    torch.testing.assert_close(P.resized_crop(x, whole), x)
    flips = torch.tensor([True, False, True])
    out = P.resized_crop(x, whole, flips)
    torch.testing.assert_close(out[0], x[0].flip(-1))
    torch.testing.assert_close(out[1], x[1])
    # the top-left 2x2 box, nearest: each pixel repeated 2x2
    corner = torch.tensor([[0.0, 0.0, 2.0, 2.0]] * 3)
    zoom = x[:, :, :2, :2].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(P.resized_crop(x, corner, interpolation="nearest"), zoom)


def test_resized_crop_boxes_follow_scale_ratio_and_fit():
    g = torch.Generator().manual_seed(0)
    boxes = P.resized_crop_boxes(4000, 30, 30, (0.1, 0.3), (0.5, 2.0), g)  # sides <= 23: never clipped
    top, left, bh, bw = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= 30).all() and (left + bw <= 30).all()
    area, ratio = bh * bw / 900, bw / bh
    assert area.min() >= 0.1 - 1e-9 and area.max() <= 0.3 + 1e-9
    assert ratio.min() >= 0.5 - 1e-9 and ratio.max() <= 2.0 + 1e-9
    assert abs(area.mean().item() - 0.2) < 0.005  # uniform over the scale range
    assert abs(torch.log(ratio).mean().item()) < 0.02  # log-uniform around 1
    assert abs((top / (30 - bh)).mean().item() - 0.5) < 0.02  # uniform position
    # a box larger than the image is clipped to it
    big = P.resized_crop_boxes(100, 10, 10, (1.0, 1.0), (4.0, 4.0), g)
    assert (big[:, 3] == 10).all() and (big[:, 2] == 5).all() and (big[:, 1] == 0).all()


def test_erasing_boxes_and_erase():
    g = torch.Generator().manual_seed(0)
    boxes = P.erasing_boxes(4000, 16, 20, 0.3, (0.05, 0.2), (0.5, 2.0), g)
    erased = boxes[:, 2] > boxes[:, 0]
    assert abs(erased.float().mean().item() - 0.3) < 0.03
    b = boxes[erased]
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 16).all() and (b[:, 3] <= 20).all()
    area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).float() / 320
    assert area.min() > 0.02 and area.max() < 0.26  # 0.05..0.2 up to rounding of the sides
    assert (boxes[~erased] == 0).all()
    x = torch.ones(2, 3, 4, 5)
    out = P.erase(x, torch.tensor([[1, 2, 3, 4], [0, 0, 0, 0]]), 0.25)
    expected = torch.ones(2, 3, 4, 5)
    expected[0, :, 1:3, 2:4] = 0.25
    assert torch.equal(out, expected)


# -- RandAugment / TrivialAugment ops ------------------------------------------------------------------------


def test_apply_ops_uses_each_op_with_its_magnitude():
    x = _images(n=len(P.OPS), c=3, h=8, w=8, seed=3)
    ops = torch.arange(len(P.OPS))
    mag = torch.full((len(P.OPS),), 0.5)
    ranges = P.OpRanges(shear=0.4, translate=0.25, rotate=180.0, enhance=0.8, posterize_drop=4)
    out = P.apply_ops(x, ops, mag, ranges, "nearest")
    one = torch.ones(1, dtype=torch.float64)
    expected = {
        "identity": x[0:1],
        "shear_x": P.affine(x[1:2], P.shear_matrix(0.2 * one, "x"), "nearest"),
        "shear_y": P.affine(x[2:3], P.shear_matrix(0.2 * one, "y"), "nearest"),
        "translate_x": P.affine(x[3:4], P.translate_matrix(one, 0 * one), "nearest"),
        "translate_y": P.affine(x[4:5], P.translate_matrix(0 * one, one), "nearest"),
        "rotate": torch.rot90(x[5:6], 1, (2, 3)),  # 0.5 * 90 degrees = a quarter turn
        "brightness": P.adjust_brightness(x[6:7], 1.4),
        "color": P.adjust_saturation(x[7:8], 1.4),
        "contrast": P.adjust_contrast(x[8:9], 1.4),
        "sharpness": P.adjust_sharpness(x[9:10], 1.4),
        "posterize": P.posterize(x[10:11], 6),
        "solarize": P.solarize(x[11:12], 0.5),
        "autocontrast": P.autocontrast(x[12:13]),
        "equalize": P.equalize(x[13:14]),
    }
    for i, name in enumerate(P.OPS):
        torch.testing.assert_close(out[i : i + 1], expected[name], msg=name)


def test_randaugment_is_its_draws_replayed():
    x = _images(n=12, c=3, h=8, w=8, seed=4)
    out = P.randaugment(x, torch.Generator().manual_seed(5), num_ops=2, magnitude=12)
    g = torch.Generator().manual_seed(5)
    expected = x
    for _ in range(2):
        ops = torch.randint(0, len(P.OPS), (12,), generator=g)
        signs = torch.randint(0, 2, (12,), generator=g, dtype=torch.float64) * 2 - 1
        expected = P.apply_ops(expected, ops, signs * 12 / 30, P.RANDAUGMENT_RANGES, "nearest")
    assert torch.equal(out, expected)


def test_trivialaugment_is_its_draws_replayed_one_sample_at_a_time():
    x = _images(n=12, c=1, h=8, w=8, seed=6)
    out = P.trivialaugment(x, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    ops = torch.randint(0, len(P.OPS), (12,), generator=g)
    signs = torch.randint(0, 2, (12,), generator=g, dtype=torch.float64) * 2 - 1
    bins = torch.randint(0, 31, (12,), generator=g, dtype=torch.float64)
    for i in range(12):  # each sample alone gives what it got inside the batch
        alone = P.apply_ops(
            x[i : i + 1], ops[i : i + 1], signs[i : i + 1] * bins[i : i + 1] / 30, P.TRIVIALAUGMENT_RANGES
        )
        torch.testing.assert_close(out[i : i + 1], alone, atol=1e-6, rtol=0)


def test_randaugment_magnitude_std_draws_per_sample_magnitudes():
    x = torch.full((64, 1, 8, 8), 0.5)
    g = torch.Generator().manual_seed(0)
    # only brightness: with a random magnitude per sample the 64 identical images get many factors
    out = P.randaugment(x, g, num_ops=1, magnitude=15, magnitude_std=5.0)
    g = torch.Generator().manual_seed(0)
    ops = torch.randint(0, len(P.OPS), (64,), generator=g)
    signs = torch.randint(0, 2, (64,), generator=g, dtype=torch.float64) * 2 - 1
    m = (15 + 5 * torch.randn(64, generator=g, dtype=torch.float64)).clamp(0, 30)
    assert torch.equal(out, P.apply_ops(x, ops, signs * m / 30, P.RANDAUGMENT_RANGES))
    bright = out[ops == 6][:, 0, 0, 0]
    assert len(torch.unique(bright)) == len(bright) > 1


# -- every policy: shape, dtype, range, per-sample draws, reproducible -------------------------------------


@pytest.mark.parametrize("name", POLICY_NAMES)
@pytest.mark.parametrize("channels", [1, 3])
def test_policy_shape_dtype_range_reproducible(name, channels):
    policy = P.AugmentPolicy(name, flip=True, channels=channels)
    x = _images(n=16, c=channels, h=12, w=12, seed=8, levels=False)
    a = policy(x, torch.Generator().manual_seed(0))
    b = policy(x, torch.Generator().manual_seed(0))
    c = policy(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)  # a fixed generator reproduces the batch exactly
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)
    if channels == 3:  # float64 in, float64 out
        assert policy(x.double(), torch.Generator().manual_seed(0)).dtype == torch.float64


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_policy_draws_differ_per_sample(name):
    """A batch of one image repeated: the samples come out different (their own draws)."""
    policy = P.AugmentPolicy(name, flip=True, channels=3)
    x = _images(n=1, c=3, h=12, w=12, seed=9, levels=False).expand(16, -1, -1, -1).contiguous()
    out = policy(x, torch.Generator().manual_seed(0))
    distinct = len({tuple(o.flatten().tolist()) for o in out})
    assert distinct >= 8, f"{name}: only {distinct} distinct outputs of 16"


def test_crop_flip_is_random_crop_flip_with_a_black_border():
    x = _images(n=8, c=3, h=6, w=6, levels=False)
    out = P.crop_flip(x, torch.Generator().manual_seed(3), padding=2, flip=True)
    assert torch.equal(out, random_crop_flip(x, 2, True, torch.Generator().manual_seed(3), fill=0.0))
    policy = P.AugmentPolicy("crop_flip", flip=False, options={"padding": 2})
    noflip = policy(x, torch.Generator().manual_seed(3))
    assert torch.equal(noflip, random_crop_flip(x, 2, False, torch.Generator().manual_seed(3)))


def test_color_jitter_factors_are_uniform_draws_in_order():
    x = _images(n=5, c=3, levels=False, seed=10)
    out = P.color_jitter(x, torch.Generator().manual_seed(2), brightness=0.3, contrast=0.0, saturation=0.5)
    g = torch.Generator().manual_seed(2)
    b = 0.7 + 0.6 * torch.rand(5, generator=g, dtype=torch.float64)
    s = 0.5 + 1.0 * torch.rand(5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(out, P.adjust_saturation(P.adjust_brightness(x, b), s))


def test_random_erasing_fills_noise_or_a_value():
    x = torch.full((32, 3, 8, 8), 0.5)
    out = P.random_erasing(x, torch.Generator().manual_seed(0), p=1.0, value=0.0)
    boxes = P.erasing_boxes(32, 8, 8, 1.0, (0.02, 0.33), (0.3, 3.3), torch.Generator().manual_seed(0))
    assert torch.equal(out, P.erase(x, boxes, 0.0))
    noisy = P.random_erasing(x, torch.Generator().manual_seed(0), p=1.0)
    changed = noisy != 0.5
    assert torch.equal(changed.any(1), (out == 0).all(1))  # the same rectangles, now noise
    assert 0 <= noisy.min() and noisy.max() < 1


# -- bad options: one line naming the value and what is allowed ---------------------------------------------


@pytest.mark.parametrize(
    "augment, options, match",
    [
        ("autoaugment", {}, r"augment must be one of \('none', 'crop_flip', .*\) or a list of them, got 'autoaugment'"),
        (["crop_flip", "mixup"], {}, r"augment must be one of .* got 'mixup'"),
        ("randaugment", {"magnitude": 31}, r"magnitude must be a number in \[0.0, 30\], got 31"),
        ("randaugment", {"magnitude": -1}, r"magnitude must be a number in \[0.0, 30\], got -1"),
        ("randaugment", {"num_ops": 0}, r"num_ops must be an int in \[1, 14\], got 0"),
        (
            "random_resized_crop",
            {"crop_scale": [1.0, 0.5]},
            r"crop_scale must be \[low, high\] with 0.0 < low <= high <= 1.0, got \[1.0, 0.5\]",
        ),
        (
            "random_resized_crop",
            {"crop_ratio": [0.0, 1.0]},
            r"crop_ratio must be \[low, high\] with 0.0 < low <= high, got \[0.0, 1.0\]",
        ),
        ("random_erasing", {"erase_p": 1.5}, r"erase_p must be a number in \[0.0, 1.0\], got 1.5"),
        ("random_erasing", {"erase_scale": [0.3, 0.1]}, r"erase_scale must be \[low, high\] .* got \[0.3, 0.1\]"),
        (
            "random_erasing",
            {"erase_value": "black"},
            r"erase_value must be 'random' or a number in \[0.0, 1.0\], got 'black'",
        ),
        ("color_jitter", {"brightness": -0.1}, r"brightness must be a number in >= 0.0, got -0.1"),
        ("crop_flip", {"padding": -1}, r"padding must be an int >= 0, got -1"),
        ("crop_flip", {"magnitud": 3}, r"augment_options has no option 'magnitud'; choose from \('padding', "),
    ],
)
def test_bad_policy_options_fail_in_one_line(augment, options, match):
    with pytest.raises(ValueError, match=match) as info:
        P.AugmentPolicy(augment, options=options)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=match):  # and from a data module, at construction
        DigitsDataModule(augment=augment, augment_options=options)


def test_saturation_on_grey_images_is_refused_and_off_by_default():
    with pytest.raises(ValueError, match=r"saturation=0.4 needs colour images, but these have 1 channel"):
        DigitsDataModule(augment="color_jitter", augment_options={"saturation": 0.4})
    assert DigitsDataModule(augment="color_jitter").augment_policy.saturation == 0.0
    assert P.AugmentPolicy("color_jitter", channels=3).saturation == 0.4
    with pytest.raises(ValueError, match="crop_flip with padding=0 and flip=false does nothing"):
        DigitsDataModule(augment="crop_flip", augment_options={"padding": 0})
    with pytest.raises(ValueError, match="normalize must be one of \\('zscore', 'minmax', 'none'\\), got 'l2'"):
        DigitsDataModule(normalize="l2")
    with pytest.raises(ValueError, match="flip must be a bool .* got 'yes'"):
        DigitsDataModule(flip="yes")


def test_bad_value_from_the_config_fails_before_training(make_cfg):
    for overrides, match in [
        (["data.augment=cutmixx"], "data: augment must be one of"),
        (["data.augment=randaugment", "data.augment_options.magnitude=40"], r"data: magnitude .* \[0.0, 30\], got 40"),
        (["data.augment_options.crop_scale=[0.9,0.2]"], r"data: crop_scale must be \[low, high\]"),
        (["data.normalize=unit"], r"data: normalize must be one of \('zscore', 'minmax', 'none'\), got 'unit'"),
    ]:
        cfg = make_cfg(*overrides)
        with pytest.raises(ConfigError, match=match):
            _instantiate(cfg.data, "data")


# -- data modules: normalization, flip defaults, pixel space, eval untouched, resume --------------------------


def test_flip_defaults_per_dataset(tmp_path):
    assert DigitsDataModule().flip is False
    assert MNISTDataModule(str(tmp_path)).flip is False
    assert FashionMNISTDataModule(str(tmp_path)).flip is True
    assert CIFAR10DataModule(str(tmp_path)).flip is True
    assert FashionMNISTDataModule(str(tmp_path), flip=False).flip is False
    assert DigitsDataModule(flip=True, augment="crop_flip").augment_policy.flip is True
    for name in ("digits", "mnist", "fashion_mnist", "cifar10"):
        cfg = compose_train([f"data={name}"])
        assert cfg.data.flip is (name in ("fashion_mnist", "cifar10")) and cfg.data.augment == "none"


def test_normalize_zscore_minmax_none_from_the_training_split():
    from sklearn.datasets import load_digits

    pixels = {}
    for mode in ("zscore", "minmax", "none"):
        dm = DigitsDataModule(normalize=mode, batch_size=32)
        dm.setup()
        pixels[mode] = dm
    train_z = pixels["zscore"].splits["train"][0]
    assert abs(train_z.mean().item()) < 1e-5 and abs(train_z.std().item() - 1) < 1e-5
    train_m = pixels["minmax"].splits["train"][0]
    assert train_m.min().item() == 0.0 and train_m.max().item() == 1.0
    raw = pixels["none"]
    assert raw.norm_shift is None
    values = torch.unique(torch.cat([raw.splits[s][0].flatten() for s in ("train", "val", "test")]))
    assert torch.equal(values, torch.arange(17.0) / 16)  # the 17 grey levels of load_digits as v / 16
    assert len(load_digits().target) == sum(len(raw.splits[s][1]) for s in ("train", "val", "test"))
    # val and test are mapped with the training split's shift and scale
    for s in ("val", "test"):
        torch.testing.assert_close(
            pixels["zscore"].splits[s][0],
            (raw.splits[s][0] - pixels["zscore"].norm_shift) / pixels["zscore"].norm_scale,
        )


@pytest.mark.parametrize("normalize", ["zscore", "minmax", "none"])
def test_policy_runs_in_pixel_space(normalize):
    dm = DigitsDataModule(normalize=normalize, augment="color_jitter", augment_options={"brightness": 0.5})
    dm.setup()
    x = dm.splits["train"][0][:16]
    out = dm.apply_policy(x, torch.Generator().manual_seed(0))
    shift = dm.norm_shift if dm.norm_shift is not None else torch.zeros(())
    scale = dm.norm_scale if dm.norm_scale is not None else torch.ones(())
    pixels = x * scale + shift
    expected = (dm.augment_policy(pixels, torch.Generator().manual_seed(0)) - shift) / scale
    torch.testing.assert_close(out, expected)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6  # the policy saw pixels in [0, 1]


class _Trainer:
    """What on_after_batch_transfer reads from a Trainer."""

    def __init__(self, training: bool, global_rank: int = 0):
        self.training, self.global_rank = training, global_rank


@pytest.mark.parametrize("loader", ["dataloader", "resident"])
def test_only_training_batches_are_augmented(loader):
    dm = DigitsDataModule(augment="trivialaugment", loader=loader, batch_size=16, augment_seed=0)
    dm.setup()
    for split_loader in (dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(split_loader))
        dm.trainer = _Trainer(training=False)
        out = dm.on_after_batch_transfer(batch, 0)
        assert out is batch  # untouched, not even copied
    assert dm.augment_batches == 0
    dm.trainer = None
    x, y = next(iter(dm.train_dataloader()))
    dm.trainer = _Trainer(training=True)
    ax, ay = dm.on_after_batch_transfer([x, y], 0)
    assert ax.shape == x.shape and torch.equal(ay, y) and not torch.equal(ax, x) and dm.augment_batches == 1
    expected = dm.apply_policy(x, torch.Generator().manual_seed(P.batch_seed(0, 0, 0)))
    assert torch.equal(ax, expected)


def test_draws_resume_exactly_and_differ_per_rank():
    dm = DigitsDataModule(augment=["crop_flip", "random_erasing"], flip=True, augment_seed=3)
    dm.setup()
    x = dm.splits["train"][0][:32]
    first = dm.augment_batch(x)
    state = dm.state_dict()
    assert state == {"augment_seed": 3, "augment_batches": 1}
    later = [dm.augment_batch(x) for _ in range(2)]
    resumed = DigitsDataModule(augment=["crop_flip", "random_erasing"], flip=True)
    resumed.setup()
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.augment_batch(x)) for a in later)
    assert not torch.equal(first, later[0])  # a new draw every batch
    other_rank = DigitsDataModule(augment=["crop_flip", "random_erasing"], flip=True, augment_seed=3)
    other_rank.setup()
    assert not torch.equal(other_rank.augment_batch(x, rank=1), first)
    assert DigitsDataModule().state_dict() == {}  # no augmentation: checkpoints unchanged


def test_batch_augment_runs_after_the_policy_and_its_generator_is_saved():
    from lightning_tricks.augment import RandomCropFlip

    dm = DigitsDataModule(augment="color_jitter", batch_augment=RandomCropFlip(padding=1, flip=False, seed=5))
    dm.setup()
    x, y = dm.splits["train"][0][:8], dm.splits["train"][1][:8]
    state = dm.state_dict()
    assert torch.equal(state["batch_augment_generator"], torch.Generator().manual_seed(5).get_state())
    dm.trainer = _Trainer(training=True)
    out, _ = dm.on_after_batch_transfer([x, y], 0)
    policy_out = dm.apply_policy(x, torch.Generator().manual_seed(P.batch_seed(dm.augment_seed, 0, 0)))
    assert torch.equal(out, random_crop_flip(policy_out, 1, False, torch.Generator().manual_seed(5)))
    again = DigitsDataModule(augment="color_jitter", batch_augment=RandomCropFlip(padding=1, flip=False, seed=5))
    again.setup()
    again.load_state_dict(dm.state_dict())  # both generators continue where they were
    again.trainer = _Trainer(training=True)
    assert torch.equal(again.on_after_batch_transfer([x, y], 0)[0], dm.on_after_batch_transfer([x, y], 0)[0])


def test_seed_defaults_to_the_run_seed():
    torch.manual_seed(1234)
    dm = DigitsDataModule(augment="color_jitter")
    dm.setup()
    dm.augment_batch(dm.splits["train"][0][:4])
    assert dm.augment_seed == 1234


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # resumed in place
def test_checkpoint_carries_the_state_and_resume_continues_the_draws(tmp_path):
    """A run resumed from its step-3 checkpoint augments steps 4 and 5 exactly as the whole run did."""
    from lightning_tricks._lightning import Callback, ModelCheckpoint, Trainer, seed_everything
    from lightning_tricks.mixins import Classifier
    from lightning_tricks.models import MLP

    class Record(Callback):
        def __init__(self):
            self.inputs = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.inputs.append(batch[0].clone())

    def fit(ckpt=None):
        seed_everything(0)
        dm = DigitsDataModule(batch_size=64, augment="randaugment", loader="resident")
        module = Classifier(MLP((1, 8, 8), num_classes=10, hidden=[16]), num_classes=10)
        rec = Record()
        every3 = ModelCheckpoint(
            dirpath=tmp_path / "ckpt",
            filename="{step}",
            every_n_train_steps=3,
            save_top_k=-1,
        )
        trainer = Trainer(
            max_steps=5,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[rec, every3],
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        return dm, rec

    whole, rec_whole = fit()
    path = tmp_path / "ckpt" / "step=3.ckpt"
    assert torch.load(path, weights_only=True)["DigitsDataModule"] == {"augment_seed": 0, "augment_batches": 3}
    resumed, rec_resumed = fit(str(path))
    assert resumed.augment_batches == whole.augment_batches == 5
    assert len(rec_resumed.inputs) == 2
    for a, b in zip(rec_resumed.inputs, rec_whole.inputs[3:]):
        assert torch.equal(a, b)


# -- training runs: every policy with both loaders ----------------------------------------------------------


@pytest.mark.parametrize("loader", ["dataloader", "resident"])
@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_trains_with_both_loaders(make_cfg, name, loader):
    cfg = make_cfg(
        f"data.augment={name}",
        f"data.loader={loader}",
        "trainer.max_epochs=1",
        "logger=none",
        "~callbacks.model_checkpoint",
        "test=false",
    )
    metrics, objects = train(cfg)
    dm = objects["datamodule"]
    assert dm.augment == (name,) and dm.augment_batches == objects["trainer"].global_step == 3
    assert math.isfinite(metrics["val/loss"])


@pytest.mark.skipif(not (SHARED_DATA / "fashion_mnist").is_dir(), reason="shared Fashion-MNIST not present")
def test_fashion_mnist_trivialaugment_runs(make_cfg):
    cfg = make_cfg(
        "data=fashion_mnist",
        f"data.data_dir={SHARED_DATA / 'fashion_mnist'}",
        "data.augment=[crop_flip,trivialaugment]",
        "data.limit_train=512",
        "data.limit_test=256",
        "trainer.max_epochs=1",
        "logger=none",
        "~callbacks.model_checkpoint",
    )
    metrics, objects = train(cfg)
    assert objects["datamodule"].augment == ("crop_flip", "trivialaugment") and objects["datamodule"].flip
    assert 0.0 <= metrics["test/acc"] <= 1.0
