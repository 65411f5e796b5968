"""Random resized crop boxes drawn as torchvision's ``RandomResizedCrop.get_params`` draws them.

The reference is a small numpy reimplementation of that rule written here, one sample at a time as
torchvision loops (up to 10 tries of an area fraction ``s ~ U(scale)`` and ``log r ~ U(log ratio)``, the
sides rounded to whole pixels, accepted if the box fits; else the central crop with the aspect clamped).
Mean crop areas over many draws must agree within four standard errors of the difference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_tricks.policies import random_resized_crop, resized_crop_boxes


def reference_box(rng: np.random.Generator, h: int, w: int, scale, ratio) -> tuple[int, int, int, int]:
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        bw, bh = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < bw <= w and 0 < bh <= h:
            return int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw
    if w / h < min(ratio):
        bw, bh = w, round(w / min(ratio))
    elif w / h > max(ratio):
        bh, bw = h, round(h * max(ratio))
    else:
        bh, bw = h, w
    return (h - bh) // 2, (w - bw) // 2, bh, bw


def clipped_box_area(rng: np.random.Generator, n: int, h: int, w: int, scale, ratio) -> np.ndarray:
    """The rule this replaces: one draw, each side clipped to the image (an area fraction per sample)."""
    target = h * w * rng.uniform(scale[0], scale[1], n)
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), n))
    return np.minimum(np.sqrt(target * aspect), w) * np.minimum(np.sqrt(target / aspect), h) / (h * w)


def _mean_se(a: np.ndarray) -> tuple[float, float]:
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a)))


@pytest.mark.parametrize(("h", "w"), [(32, 32), (24, 32)])
def test_mean_crop_area_matches_torchvisions_rule(h, w):
    scale, ratio, n = (0.08, 1.0), (3 / 4, 4 / 3), 40000
    boxes = resized_crop_boxes(n, h, w, scale, ratio, torch.Generator().manual_seed(0)).numpy()
    ours = boxes[:, 2] * boxes[:, 3] / (h * w)
    rng = np.random.default_rng(1)
    ref = np.array([reference_box(rng, h, w, scale, ratio) for _ in range(n)], dtype=np.float64)
    expected = ref[:, 2] * ref[:, 3] / (h * w)
    (m1, se1), (m2, se2) = _mean_se(ours), _mean_se(expected)
    assert abs(m1 - m2) < 4 * math.hypot(se1, se2), (m1, m2)
    # the test can tell the clipped rule apart: its mean is many standard errors away
    clipped, se3 = _mean_se(clipped_box_area(rng, n, h, w, scale, ratio))
    assert abs(clipped - m1) > 10 * math.hypot(se1, se3)
    # whole pixels, inside the image, every position reachable
    top, left, bh, bw = boxes.T
    assert np.all(boxes == np.round(boxes)) and np.all(top >= 0) and np.all(left >= 0)
    assert np.all(top + bh <= h) and np.all(left + bw <= w)
    free = h - bh
    assert abs(np.mean(top[free > 0] / free[free > 0]) - 0.5) < 0.01
    assert np.any((top == free) & (free > 0)) and np.any((top == 0) & (free > 0))


def test_fallback_rate_matches_the_ten_tries():
    # on 24x32 a square-ish box of 90-100% of the area rarely fits in height: most samples fall back
    h, w, scale, ratio, n = 24, 32, (0.9, 1.0), (0.9, 1.5), 20000
    boxes = resized_crop_boxes(n, h, w, scale, ratio, torch.Generator().manual_seed(2)).numpy()
    fallback = (24, 32)  # W/H = 1.33 lies inside the ratio range: the whole image
    ours = np.mean((boxes[:, 2] == fallback[0]) & (boxes[:, 3] == fallback[1]))
    rng = np.random.default_rng(3)
    ref = np.array([reference_box(rng, h, w, scale, ratio)[2:] for _ in range(n)])
    expected = np.mean((ref[:, 0] == fallback[0]) & (ref[:, 1] == fallback[1]))
    assert 0.05 < expected < 0.95
    se = math.sqrt(expected * (1 - expected) / n)
    assert abs(ours - expected) < 4 * math.sqrt(2) * se


@pytest.mark.parametrize(
    ("h", "w", "ratio", "box"),
    [
        (10, 10, (4.0, 4.0), (4, 0, 2, 10)),  # W/H = 1 below the range: w = W, h = round(10 / 4) = 2
        (10, 10, (0.25, 0.25), (0, 4, 10, 2)),  # above it: h = H, w = round(10 * 0.25) = 2
        (24, 32, (1.0, 1.0), (0, 4, 24, 24)),  # W/H = 4/3 above 1: h = 24, w = 24, centred
    ],
)
def test_central_crop_fallback_when_no_try_fits(h, w, ratio, box):
    boxes = resized_crop_boxes(50, h, w, (1.0, 1.0), ratio, torch.Generator().manual_seed(0))
    assert torch.equal(boxes, torch.tensor([box], dtype=torch.float64).expand(50, 4))
    rng = np.random.default_rng(0)
    assert reference_box(rng, h, w, (1.0, 1.0), ratio) == box


def test_whole_image_box_is_the_identity_and_draws_repeat():
    x = torch.rand(5, 3, 24, 32)
    g = torch.Generator().manual_seed(4)
    a = random_resized_crop(x, g, scale=(0.3, 1.0))
    b = random_resized_crop(x, torch.Generator().manual_seed(4), scale=(0.3, 1.0))
    assert torch.equal(a, b)
    # a box that fits exactly (16x16 of 16x16, ratio 1) is the image itself
    y = torch.rand(4, 1, 16, 16)
    torch.testing.assert_close(random_resized_crop(y, g, scale=(1.0, 1.0), ratio=(1.0, 1.0)), y, atol=1e-6, rtol=0)
