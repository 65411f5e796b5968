"""Augmentation policies (lightning_tricks/policies.py) and their wiring in the data modules.

The pixel ops are checked against PIL (8-bit, so within rounding) or their formula; the geometric ops
against exact permutations (rot90, shifts, pixel repetition) at both signs of their magnitude; the random
policies against their documented draws applied by each op's definition written out in this file; the
data modules for normalization, flip defaults, eval batches left alone, exact resume, and one-line errors;
and a tiny training run per policy with both loaders.
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
    boxes = P.resized_crop_boxes(4000, 30, 30, (0.1, 0.3), (0.5, 2.0), g)  # sides <= 23: the first try fits
    assert torch.equal(boxes, boxes.round())  # whole pixels, as torchvision's get_params
    top, left, bh, bw = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= 30).all() and (left + bw <= 30).all()
    area, ratio = bh * bw / 900, bw / bh
    # each side is rounded to a whole pixel: the area within (side + 0.5)^2 of its range, the ratio near its own
    assert area.min() >= 0.1 - 24 / 900 and area.max() <= 0.3 + 24 / 900
    assert ratio.min() >= 0.5 * 6 / 7 and ratio.max() <= 2.0 * 7 / 6  # the shortest side is about 6.7 px
    assert abs(area.mean().item() - 0.2) < 0.01  # uniform over the scale range
    assert abs(torch.log(ratio).mean().item()) < 0.03  # log-uniform around 1
    assert abs((top / (30 - bh)).mean().item() - 0.5) < 0.03  # uniform position
    # no try fits (every box wider than the image): the central crop, aspect clamped to the ratio range,
    # w = W and h = round(W / 4) = round(2.5) = 2 (torchvision's fallback)
    big = P.resized_crop_boxes(100, 10, 10, (1.0, 1.0), (4.0, 4.0), g)
    assert (big[:, 3] == 10).all() and (big[:, 2] == 2).all() and (big[:, 1] == 0).all() and (big[:, 0] == 4).all()


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


def _nearest_affine(img: torch.Tensor, a: list[list[float]], t: tuple[float, float]) -> torch.Tensor:
    """Nearest-neighbour resampling written out pixel by pixel: output pixel ``p = (col - cx, row - cy)``
    takes input pixel ``a p + t`` (rounded; black outside the image)."""
    c, h, w = img.shape
    cx, cy = (w - 1) / 2, (h - 1) / 2
    out = torch.zeros_like(img)
    for row in range(h):
        for col in range(w):
            px, py = col - cx, row - cy
            src_col = round(a[0][0] * px + a[0][1] * py + t[0] + cx)
            src_row = round(a[1][0] * px + a[1][1] * py + t[1] + cy)
            if 0 <= src_row < h and 0 <= src_col < w:
                out[:, row, col] = img[:, src_row, src_col]
    return out


def _luma(img: torch.Tensor) -> torch.Tensor:
    if img.shape[0] == 3:
        return 0.299 * img[0:1] + 0.587 * img[1:2] + 0.114 * img[2:3]
    return img.mean(0, keepdim=True)


def _reference_op(img: torch.Tensor, name: str, m: float, r: P.OpRanges) -> torch.Tensor:
    """One op on one image ``(C, H, W)`` at signed magnitude ``m``, from its definition (the paper's ops on
    torchvision's ranges): geometric ops by :func:`_nearest_affine`, pixel ops by their formulas or PIL."""
    _, h, w = img.shape
    f = 1.0 + m * r.enhance
    if name == "identity":
        return img.clone()
    if name in ("shear_x", "shear_y"):  # x_in = x + s y (shear_x), y_in = y + s x (shear_y), about the center
        s = m * r.shear
        return _nearest_affine(img, [[1, s], [0, 1]] if name == "shear_x" else [[1, 0], [s, 1]], (0.0, 0.0))
    if name == "translate_x":  # the content moves right by m * translate * W pixels
        return _nearest_affine(img, [[1, 0], [0, 1]], (-m * r.translate * w, 0.0))
    if name == "translate_y":  # ... down by m * translate * H pixels
        return _nearest_affine(img, [[1, 0], [0, 1]], (0.0, -m * r.translate * h))
    if name == "rotate":  # counter-clockwise on screen (y down) by m * rotate degrees
        a = math.radians(m * r.rotate)
        return _nearest_affine(img, [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], (0.0, 0.0))
    if name == "brightness":
        return (f * img).clamp(0, 1)
    if name == "color":
        return img.clone() if img.shape[0] == 1 else (_luma(img) + f * (img - _luma(img))).clamp(0, 1)
    if name == "contrast":
        mean = _luma(img).mean()
        return (mean + f * (img - mean)).clamp(0, 1)
    if name == "sharpness":
        k = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
        blurred = img.clone()
        for row in range(1, h - 1):
            for col in range(1, w - 1):
                blurred[:, row, col] = (img[:, row - 1 : row + 2, col - 1 : col + 2] * k).sum(dim=(1, 2))
        return (blurred + f * (img - blurred)).clamp(0, 1)
    if name == "posterize":
        bits = 8 - round(abs(m) * r.posterize_drop)
        return _from_pil(ImageOps.posterize(_to_pil(img), bits))
    if name == "solarize":
        return torch.where(img >= 1 - abs(m) * r.solarize, 1 - img, img)
    if name == "autocontrast":
        low, high = img.amin(dim=(1, 2), keepdim=True), img.amax(dim=(1, 2), keepdim=True)
        return torch.where(high > low, (img - low) / (high - low).clamp_min(1e-12), img)
    assert name == "equalize"  # PIL's; a channel it leaves as it is (one or two levels) keeps its exact values
    levels, equalized = _from_pil(_to_pil(img)), _from_pil(ImageOps.equalize(_to_pil(img)))
    kept = (levels == equalized).all(dim=(1, 2), keepdim=True)
    return torch.where(kept, img, equalized)


def _one_bright_pixel(h: int, w: int, row: int, col: int) -> torch.Tensor:
    img = torch.zeros(1, 1, h, w)
    img[0, 0, row, col] = 1.0
    return img


def _bright_at(img: torch.Tensor) -> tuple[int, int]:
    assert img.sum() == 1.0, "the bright pixel must survive the op exactly once"
    row, col = (img[0, 0] == 1).nonzero()[0].tolist()
    return row, col


SIGN_RANGES = P.OpRanges(shear=1.0, translate=0.25, rotate=90.0, enhance=0.5, posterize_drop=4)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_geometric_ops_keep_the_sign_of_their_magnitude(sign):
    """Each geometric op at magnitude +1 and -1 (so shear +-1, translate +-2 px on 8 px, rotate +-90 deg)
    against expectations built here: a bright pixel where the formula puts it, rolls with a black fill,
    torch.rot90."""

    def op(x, name, m=sign):
        return P.apply_ops(x, torch.tensor([P.OPS.index(name)]), torch.tensor([m]), SIGN_RANGES, "nearest")

    s = int(sign)
    # translate: the content moves 2 pixels right (down) for +1, left (up) for -1, black enters
    x = _images(n=1, c=2, h=8, w=8, seed=11) + 0.01  # no black pixel in the image: only the fill is black
    for name, dim in (("translate_x", 3), ("translate_y", 2)):
        expected = torch.roll(x, 2 * s, dims=dim)
        index = torch.arange(8)
        entered = (index < 2) if s > 0 else (index >= 6)
        expected = expected.masked_fill(entered.view(1, 1, -1, 1) if dim == 2 else entered.view(1, 1, 1, -1), 0.0)
        assert torch.equal(op(x, name), expected), name
    # half the magnitude: one pixel
    shifted = op(x, "translate_x", 0.5 * sign)
    assert torch.equal(shifted[..., 1:-1], torch.roll(x, s, dims=3)[..., 1:-1])
    # rotate: +90 degrees is a quarter turn counter-clockwise (torch.rot90 with k = 1), -90 clockwise
    square = _images(n=1, c=1, h=7, w=7, seed=12)
    assert torch.equal(op(square, "rotate"), torch.rot90(square, s, dims=(2, 3)))
    # a bright pixel in the top-right corner region goes to the top-left (+90) or bottom-right (-90)
    assert _bright_at(op(_one_bright_pixel(7, 7, 1, 5), "rotate")) == ((1, 1) if s > 0 else (5, 5))
    # shear_x (x_in = x + s y about the center): a pixel 2 rows above the center moves 2 columns right
    # for s = +1 (left for -1); one 2 rows below moves the other way; the center row stays
    assert _bright_at(op(_one_bright_pixel(7, 7, 1, 3), "shear_x")) == (1, 3 + 2 * s)
    assert _bright_at(op(_one_bright_pixel(7, 7, 5, 3), "shear_x")) == (5, 3 - 2 * s)
    assert _bright_at(op(_one_bright_pixel(7, 7, 3, 3), "shear_x")) == (3, 3)
    # shear_y (y_in = y + s x): a pixel 2 columns left of the center moves 2 rows down for s = +1
    assert _bright_at(op(_one_bright_pixel(7, 7, 3, 1), "shear_y")) == (3 + 2 * s, 1)
    assert _bright_at(op(_one_bright_pixel(7, 7, 3, 5), "shear_y")) == (3 - 2 * s, 5)


def test_randaugment_geometric_ops_go_both_ways():
    """Through the policy: over many samples, a one-pixel image is translated, rotated and sheared both ways
    (the policy draws a sign per sample and op)."""
    x = _one_bright_pixel(7, 7, 1, 3).expand(400, -1, -1, -1).contiguous()
    out = P.randaugment(x, torch.Generator().manual_seed(0), num_ops=1, magnitude=30)
    g = torch.Generator().manual_seed(0)
    ops = torch.randint(0, len(P.OPS), (400,), generator=g)
    cols = {name: set() for name in ("shear_x", "translate_x")}
    for i in range(400):
        name = P.OPS[int(ops[i])]
        if name in cols and out[i].sum() == 1:
            cols[name].add(_bright_at(out[i : i + 1])[1])
    assert min(cols["shear_x"]) < 3 < max(cols["shear_x"]), cols  # left and right of where it was
    assert min(cols["translate_x"]) < 3 < max(cols["translate_x"]), cols


def test_apply_ops_matches_each_ops_definition_at_both_signs():
    x = _images(n=2 * len(P.OPS), c=3, h=8, w=8, seed=3)
    ops = torch.arange(len(P.OPS)).repeat(2)
    mag = torch.tensor([0.5] * len(P.OPS) + [-0.5] * len(P.OPS), dtype=torch.float64)
    ranges = P.OpRanges(shear=0.4, translate=0.25, rotate=180.0, enhance=0.8, posterize_drop=4)
    out = P.apply_ops(x, ops, mag, ranges, "nearest")
    for i in range(len(ops)):
        name = P.OPS[int(ops[i])]
        expected = _reference_op(x[i], name, float(mag[i]), ranges)
        torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=0, msg=f"{name} at {float(mag[i])}")
    # the quarter turns, by torch.rot90: +0.5 of 180 degrees counter-clockwise, -0.5 clockwise
    rot = P.OPS.index("rotate")
    torch.testing.assert_close(out[rot], torch.rot90(x[rot], 1, (1, 2)))
    torch.testing.assert_close(out[rot + len(P.OPS)], torch.rot90(x[rot + len(P.OPS)], -1, (1, 2)))


def _replay(x: torch.Tensor, ops: torch.Tensor, magnitudes: torch.Tensor, ranges: P.OpRanges) -> torch.Tensor:
    """The policy's documented draws applied one sample at a time by :func:`_reference_op`."""
    return torch.stack([_reference_op(x[i], P.OPS[int(ops[i])], float(magnitudes[i]), ranges) for i in range(len(x))])


def test_randaugment_is_its_draws_applied_by_each_ops_definition():
    x = _images(n=24, c=3, h=8, w=8, seed=4)
    out = P.randaugment(x, torch.Generator().manual_seed(5), num_ops=2, magnitude=12)
    g = torch.Generator().manual_seed(5)
    expected = x
    for _ in range(2):
        ops = torch.randint(0, len(P.OPS), (24,), generator=g)
        signs = torch.randint(0, 2, (24,), generator=g, dtype=torch.float64) * 2 - 1
        expected = _replay(expected, ops, signs * 12 / 30, P.RANDAUGMENT_RANGES)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_trivialaugment_is_its_draws_applied_by_each_ops_definition():
    x = _images(n=24, c=1, h=8, w=8, seed=6)
    out = P.trivialaugment(x, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    ops = torch.randint(0, len(P.OPS), (24,), generator=g)
    signs = torch.randint(0, 2, (24,), generator=g, dtype=torch.float64) * 2 - 1
    bins = torch.randint(0, 31, (24,), generator=g, dtype=torch.float64)
    assert (signs > 0).any() and (signs < 0).any()
    torch.testing.assert_close(out, _replay(x, ops, signs * bins / 30, P.TRIVIALAUGMENT_RANGES), atol=1e-5, rtol=0)


def test_randaugment_magnitude_std_draws_per_sample_magnitudes():
    x = torch.full((64, 1, 8, 8), 0.5)
    g = torch.Generator().manual_seed(0)
    # only brightness: with a random magnitude per sample the 64 identical images get many factors
    out = P.randaugment(x, g, num_ops=1, magnitude=15, magnitude_std=5.0)
    g = torch.Generator().manual_seed(0)
    ops = torch.randint(0, len(P.OPS), (64,), generator=g)
    signs = torch.randint(0, 2, (64,), generator=g, dtype=torch.float64) * 2 - 1
    m = (15 + 5 * torch.randn(64, generator=g, dtype=torch.float64)).clamp(0, 30)
    torch.testing.assert_close(out, _replay(x, ops, signs * m / 30, P.RANDAUGMENT_RANGES), atol=1e-6, rtol=0)
    bright = out[ops == 6][:, 0, 0, 0]
    assert len(torch.unique(bright)) == len(bright) > 1
    # brightness factor 1 + 0.9 m / 30 per sample: the flat 0.5 image becomes 0.5 times it
    torch.testing.assert_close(bright.double(), (0.5 * (1 + 0.9 * signs * m / 30))[ops == 6].clamp(0, 1))


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
    # the documented draws (offsets dy, dx in 0..4, then a flip each), applied by padding and slicing
    g = torch.Generator().manual_seed(3)
    offsets = torch.randint(0, 5, (8, 2), generator=g)
    flips = torch.randint(0, 2, (8,), generator=g).bool()
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=0.0)
    for i in range(8):
        dy, dx = offsets[i].tolist()
        crop = padded[i, :, dy : dy + 6, dx : dx + 6]
        assert torch.equal(out[i], crop.flip(-1) if flips[i] else crop), i
    assert flips.any() and not flips.all()
    policy = P.AugmentPolicy("crop_flip", flip=False, options={"padding": 2})
    noflip = policy(x, torch.Generator().manual_seed(3))
    assert torch.equal(noflip, random_crop_flip(x, 2, False, torch.Generator().manual_seed(3)))


def test_color_jitter_factors_are_uniform_draws_in_order():
    x = _images(n=5, c=3, levels=False, seed=10)
    out = P.color_jitter(x, torch.Generator().manual_seed(2), brightness=0.3, contrast=0.0, saturation=0.5)
    g = torch.Generator().manual_seed(2)
    b = 0.7 + 0.6 * torch.rand(5, generator=g, dtype=torch.float64)
    s = 0.5 + 1.0 * torch.rand(5, generator=g, dtype=torch.float64)
    bright = (x * b.float().view(-1, 1, 1, 1)).clamp(0, 1)  # brightness first, then saturation, by the formulas
    gray = 0.299 * bright[:, 0:1] + 0.587 * bright[:, 1:2] + 0.114 * bright[:, 2:3]
    torch.testing.assert_close(out, (gray + s.float().view(-1, 1, 1, 1) * (bright - gray)).clamp(0, 1))


def test_random_erasing_fills_noise_or_a_value():
    x = torch.full((32, 3, 8, 8), 0.5)
    out = P.random_erasing(x, torch.Generator().manual_seed(0), p=1.0, value=0.0)
    # the documented draws (erase or not, area, aspect h / w, top, left), each rectangle erased by slicing
    g = torch.Generator().manual_seed(0)
    do = torch.rand(32, generator=g) < 1.0
    area = 64 * (0.02 + 0.31 * torch.rand(32, generator=g, dtype=torch.float64))
    log_aspect = math.log(0.3) + (math.log(3.3) - math.log(0.3)) * torch.rand(32, generator=g, dtype=torch.float64)
    aspect = torch.exp(log_aspect)
    tops, lefts = torch.rand(32, generator=g, dtype=torch.float64), torch.rand(32, generator=g, dtype=torch.float64)
    expected = x.clone()
    for i in range(32):
        eh = min(max(round(math.sqrt(area[i] * aspect[i])), 1), 8)
        ew = min(max(round(math.sqrt(area[i] / aspect[i])), 1), 8)
        top, left = min(int(tops[i] * (8 - eh + 1)), 8 - eh), min(int(lefts[i] * (8 - ew + 1)), 8 - ew)
        if do[i]:
            expected[i, :, top : top + eh, left : left + ew] = 0.0
    assert torch.equal(out, expected)
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
    with pytest.raises(ValueError, match="normalize must be one of \\('zscore', 'minmax', 'zca', 'none'\\), got 'l2'"):
        DigitsDataModule(normalize="l2")
    with pytest.raises(ValueError, match="flip must be a bool .* got 'yes'"):
        DigitsDataModule(flip="yes")


def test_bad_value_from_the_config_fails_before_training(make_cfg):
    for overrides, match in [
        (["data.augment=cutmixx"], "data: augment must be one of"),
        (["data.augment=randaugment", "data.augment_options.magnitude=40"], r"data: magnitude .* \[0.0, 30\], got 40"),
        (["data.augment_options.crop_scale=[0.9,0.2]"], r"data: crop_scale must be \[low, high\]"),
        (["data.normalize=unit"], r"data: normalize must be one of \('zscore', 'minmax', 'zca', 'none'\), got 'unit'"),
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
