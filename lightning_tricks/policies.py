"""Image augmentation policies as batched tensor ops, every draw per sample from an explicit generator.

A *policy* turns a batch of images ``x`` of shape ``(N, C, H, W)`` with pixels in ``[0, 1]`` into a batch of
the same shape, dtype and range; every sample gets its own random parameters, all drawn on the CPU from
the ``torch.Generator`` the caller passes (``N`` numbers per draw, moved to ``x``'s device without a host
sync), so a fixed generator reproduces a batch exactly, a saved seed resumes it, and the work runs as a
few batched kernels on whatever device ``x`` is on. torchvision's transforms draw one parameter set per
call (the same for a whole batch in ``transforms.v2``) and torchvision does not load beside every torch
build, hence these hand-written batched versions. The data modules (:mod:`lightning_tricks.data`) apply
them to training batches after transfer (``data.augment=NAME``); they never touch evaluation batches.

Pixel space: the ops assume pixels in ``[0, 1]`` (black is 0): brightness, contrast, posterize and solarize
are defined there, and geometric ops fill the uncovered area with black, as torchvision does before its
``Normalize``. The data modules keep their tensors normalized and convert each training batch to pixel
space and back around the policy (:class:`lightning_tricks.data.TensorDataModule`).

Policies (``POLICIES``):

- ``none``: the identity.
- ``crop_flip``: zero-pad by ``padding`` and crop back at a uniform offset, flip horizontally with
  probability 1/2 when ``flip`` (:func:`lightning_tricks.augment.random_crop_flip`).
- ``random_resized_crop``: a box of area ``s * H * W``, ``s ~ U(scale)``, aspect ``w / h = r`` with
  ``log r ~ U(log ratio)``, at a uniform position, resized to ``H x W`` (bilinear), and flipped with
  probability 1/2 when ``flip`` (Szegedy et al. 2015, arXiv:1409.4842). Boxes are drawn as torchvision's
  ``RandomResizedCrop.get_params`` draws them: whole pixels, a box that does not fit redrawn up to 10
  times, then the central crop with the aspect clamped to the range (:func:`resized_crop_boxes`).
- ``color_jitter``: brightness, contrast and saturation factors ``U(max(0, 1 - a), 1 + a)`` per sample,
  applied in that fixed order (torchvision shuffles the order per call). Saturation on 1-channel images
  is the identity, so there it is refused when asked for and off by default.
- ``randaugment``: ``num_ops`` ops per sample, each uniform over :data:`OPS`, at magnitude ``M`` on a
  0-30 scale with a random sign (Cubuk, Zoph, Shlens, Le 2020, arXiv:1909.13719; torchvision's ranges).
  ``magnitude_std > 0`` draws ``M`` per sample from ``N(M, std)`` clipped to ``[0, 30]``.
- ``trivialaugment``: one op per sample, uniform over :data:`OPS`, at a magnitude uniform over the 31
  bins, with the "wide" ranges (Müller, Hutter 2021, arXiv:2103.10158).
- ``random_erasing``: with probability ``p`` per sample, a rectangle of area ``U(scale) * H * W`` and
  aspect ``h / w = r``, ``log r ~ U(log ratio)``, at a uniform position, filled with uniform noise (or a
  constant) (Zhong, Zheng, Kang, Li, Yang 2020, arXiv:1708.04896). A rectangle larger than the image is
  clipped to it (torchvision retries 10 times, then erases nothing).

Example:
    >>> policy = AugmentPolicy("trivialaugment")
    >>> x = torch.rand(4, 3, 8, 8)
    >>> out = policy(x, torch.Generator().manual_seed(0))
    >>> out.shape, bool(out.min() >= 0) and bool(out.max() <= 1)
    (torch.Size([4, 3, 8, 8]), True)
    >>> torch.equal(out, policy(x, torch.Generator().manual_seed(0)))
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tricks.augment import random_crop_flip

__all__ = [
    "POLICIES",
    "NORMALIZATIONS",
    "OPS",
    "MAX_MAGNITUDE",
    "OpRanges",
    "RANDAUGMENT_RANGES",
    "TRIVIALAUGMENT_RANGES",
    "PolicyOptions",
    "AugmentPolicy",
    "check_policy_names",
    "batch_seed",
    "grayscale",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_sharpness",
    "autocontrast",
    "equalize",
    "posterize",
    "solarize",
    "affine",
    "rotate_matrix",
    "shear_matrix",
    "translate_matrix",
    "apply_ops",
    "resized_crop",
    "resized_crop_boxes",
    "erase",
    "erasing_boxes",
    "crop_flip",
    "random_resized_crop",
    "color_jitter",
    "randaugment",
    "trivialaugment",
    "random_erasing",
]

POLICIES = (
    "none",
    "crop_flip",
    "random_resized_crop",
    "color_jitter",
    "randaugment",
    "trivialaugment",
    "random_erasing",
)
NORMALIZATIONS = ("zscore", "minmax", "zca", "none")
#: the RandAugment / TrivialAugment ops, in the order of their indices in :func:`apply_ops`
OPS = (
    "identity",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
)
_GEOMETRIC = (1, 2, 3, 4, 5)  # indices in OPS of the ops done by one affine resampling
#: magnitudes are on torchvision's scale: 31 bins, 0 (identity) .. 30 (the strongest)
MAX_MAGNITUDE = 30


# -- small helpers ------------------------------------------------------------------------------------------


def _check_images(x: Tensor, what: str) -> tuple[int, int, int, int]:
    if x.ndim != 4 or not x.dtype.is_floating_point:
        raise ValueError(f"{what} needs float images (N, C, H, W), got shape {tuple(x.shape)} and dtype {x.dtype}")
    n, c, h, w = x.shape
    return n, c, h, w


def _per_sample(value: Tensor | float, x: Tensor) -> Tensor:
    """A scalar or ``(N,)`` tensor as ``(N, 1, 1, 1)`` on ``x``'s device and dtype (no host sync)."""
    t = value if isinstance(value, Tensor) else torch.tensor(float(value))
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"per-sample values must have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t.to(device=x.device, dtype=x.dtype, non_blocking=True).view(-1, 1, 1, 1)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    """``n`` draws of ``U(low, high)`` in float64 on the CPU."""
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _noise_generator(x: Tensor, generator: torch.Generator | None) -> torch.Generator:
    """A generator on ``x``'s device seeded by one draw of ``generator`` (the same draw on every device)."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return torch.Generator(device=x.device).manual_seed(seed)


def batch_seed(seed: int, rank: int, count: int) -> int:
    """A 63-bit seed for batch ``count`` on DDP rank ``rank``: three rounds of splitmix64 (Steele et al. 2014).

    Different for every ``(seed, rank, count)`` in practice, a few integer operations (no allocation), so a
    generator reseeded with it per batch needs only ``seed`` and ``count`` to resume, and ranks differ.

    Example:
        >>> batch_seed(0, 0, 0) != batch_seed(0, 0, 1) != batch_seed(0, 1, 1)
        True
    """
    mask = (1 << 64) - 1
    z = 0
    for word in (seed, rank, count):
        z = (z ^ (word & mask)) + 0x9E3779B97F4A7C15 & mask
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & mask
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & mask
        z ^= z >> 31
    return z >> 1


# -- pixel ops (deterministic; x in [0, 1], one factor per sample) -------------------------------------------


def grayscale(x: Tensor) -> Tensor:
    """``(N, 1, H, W)`` luma: ``0.299 R + 0.587 G + 0.114 B`` (ITU-R 601, as PIL) for 3 channels, else the
    channel mean (the image itself for 1 channel)."""
    if x.shape[1] == 3:
        return x[:, 0:1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114
    return x.mean(dim=1, keepdim=True)


def adjust_brightness(x: Tensor, factor: Tensor | float) -> Tensor:
    """``clamp(f * x, 0, 1)`` per sample (``f = 0``: black, ``1``: unchanged)."""
    return (x * _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor | float) -> Tensor:
    """``clamp(m + f * (x - m), 0, 1)`` with ``m`` the mean luma of each image (``f = 0``: flat grey)."""
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return torch.lerp(mean.expand_as(x), x, _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_saturation(x: Tensor, factor: Tensor | float) -> Tensor:
    """``clamp(g + f * (x - g), 0, 1)`` with ``g`` the luma of each pixel (``f = 0``: grey; 1 channel: identity)."""
    if x.shape[1] == 1:
        return x.clone()
    return torch.lerp(grayscale(x).expand_as(x), x, _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_sharpness(x: Tensor, factor: Tensor | float) -> Tensor:
    """``clamp(b + f * (x - b), 0, 1)`` with ``b`` the image smoothed by PIL's 3x3 kernel
    ``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13`` inside and the border pixels kept (``f > 1`` sharpens)."""
    n, c, h, w = x.shape
    if h < 3 or w < 3:
        return x.clone()
    kernel = torch.ones(1, 1, 3, 3, dtype=x.dtype, device=x.device)
    kernel[0, 0, 1, 1] = 5.0
    inner = F.conv2d(x.reshape(n * c, 1, h, w), kernel / 13.0).view(n, c, h - 2, w - 2)
    blurred = x.clone()
    blurred[:, :, 1:-1, 1:-1] = inner
    return torch.lerp(blurred, x, _per_sample(factor, x)).clamp_(0.0, 1.0)


def autocontrast(x: Tensor) -> Tensor:
    """Stretch each channel of each image to ``[0, 1]``: ``(x - min) / (max - min)``; flat channels unchanged."""
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    span = high - low
    return torch.where(span > 0, (x - low) / span.clamp_min(1e-12), x).clamp_(0.0, 1.0)


def equalize(x: Tensor) -> Tensor:
    """Histogram equalization of each channel of each image on 256 levels, PIL's rule, batched.

    With ``h`` the histogram of ``v = round(255 x)``, ``step = (H W - h[last non-empty level]) // 255``
    and ``lut[i] = min(255, (step // 2 + sum(h[:i])) // step)``; a channel with ``step = 0`` (one or two
    levels) is unchanged. Output ``lut[v] / 255``.
    """
    n, c, h, w = x.shape
    levels = (x.reshape(n * c, h * w) * 255.0).round_().clamp_(0, 255).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, levels, torch.ones_like(levels))
    last = 255 - (hist > 0).flip(1).long().argmax(dim=1, keepdim=True)  # last non-empty level
    step = (h * w - hist.gather(1, last)) // 255  # (N*C, 1)
    before = hist.cumsum(dim=1) - hist  # pixels below each level
    lut = ((before + step // 2) // step.clamp_min(1)).clamp_(max=255)
    out = lut.gather(1, levels).to(x.dtype) / 255.0
    return torch.where(step > 0, out, x.reshape(n * c, h * w)).view(n, c, h, w)


def posterize(x: Tensor, bits: Tensor | int) -> Tensor:
    """Keep the top ``bits`` (1..8) of each 8-bit pixel ``round(255 x)``; output ``(v & mask) / 255``."""
    b = bits if isinstance(bits, Tensor) else torch.tensor(int(bits))
    if b.ndim == 0:
        b = b.expand(x.shape[0])
    mask = (0xFF << (8 - b.long())) & 0xFF
    values = (x * 255.0).round_().clamp_(0, 255).to(torch.int32)
    mask = mask.to(device=x.device, dtype=torch.int32, non_blocking=True).view(-1, 1, 1, 1)
    return (values & mask).to(x.dtype) / 255.0


def solarize(x: Tensor, threshold: Tensor | float) -> Tensor:
    """Invert the pixels at or above ``threshold`` (PIL's rule): ``where(x >= t, 1 - x, x)``."""
    return torch.where(x >= _per_sample(threshold, x), 1.0 - x, x)


# -- geometry -----------------------------------------------------------------------------------------------


def rotate_matrix(degrees: Tensor) -> Tensor:
    """``(N, 2, 3)`` inverse maps (output -> input pixel, centered coordinates, y down) of a rotation of the
    content by ``degrees`` counter-clockwise as seen on screen."""
    a = torch.deg2rad(degrees.to(torch.float64))
    cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    return torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)


def shear_matrix(shear: Tensor, axis: str) -> Tensor:
    """``(N, 2, 3)`` inverse maps of a shear about the image center: ``x_in = x + s y`` for ``axis="x"``,
    ``y_in = y + s x`` for ``axis="y"``."""
    s = shear.to(torch.float64)
    m = torch.zeros(s.shape[0], 2, 3, dtype=torch.float64)
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    if axis == "x":
        m[:, 0, 1] = s
    elif axis == "y":
        m[:, 1, 0] = s
    else:
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
    return m


def translate_matrix(dx: Tensor, dy: Tensor) -> Tensor:
    """``(N, 2, 3)`` inverse maps of a translation of the content by ``(dx, dy)`` pixels (right, down)."""
    m = torch.zeros(dx.shape[0], 2, 3, dtype=torch.float64)
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    m[:, 0, 2] = -dx.to(torch.float64)
    m[:, 1, 2] = -dy.to(torch.float64)
    return m


def affine(x: Tensor, matrix: Tensor, interpolation: str = "bilinear", padding_mode: str = "zeros") -> Tensor:
    """Resample every image with its own affine map, in one ``affine_grid`` + ``grid_sample``.

    Args:
        x: images ``(N, C, H, W)``.
        matrix: ``(N, 2, 3)`` inverse maps in pixel units around the image center: output pixel ``p``
            (``(col, row) - ((W - 1) / 2, (H - 1) / 2)``) takes input pixel ``A p + t``
            (see :func:`rotate_matrix`, :func:`shear_matrix`, :func:`translate_matrix`).
        interpolation: ``"bilinear"`` or ``"nearest"``.
        padding_mode: ``"zeros"`` (black outside the image) or ``"border"``.
    """
    n, c, h, w = _check_images(x, "affine")
    if matrix.shape != (n, 2, 3):
        raise ValueError(f"matrix must have shape ({n}, 2, 3), got {tuple(matrix.shape)}")
    # to grid_sample's normalized coordinates (align_corners=False): p = D u with D = diag(W / 2, H / 2)
    m = matrix.to(torch.float64)
    theta = m.clone()
    theta[:, 0, 1] = m[:, 0, 1] * h / w
    theta[:, 1, 0] = m[:, 1, 0] * w / h
    theta[:, 0, 2] = m[:, 0, 2] * 2.0 / w
    theta[:, 1, 2] = m[:, 1, 2] * 2.0 / h
    theta = theta.to(device=x.device, dtype=x.dtype, non_blocking=True)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode=interpolation, padding_mode=padding_mode, align_corners=False)


def resized_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    tries: int = 10,
) -> Tensor:
    """``(N, 4)`` float64 boxes ``(top, left, box_height, box_width)`` in whole pixels for :func:`resized_crop`,
    drawn as torchvision's ``RandomResizedCrop.get_params``.

    Each of ``tries`` attempts draws an area ``s * H * W`` with ``s ~ U(scale)`` and an aspect ``w / h = r``
    with ``log r ~ U(log ratio)``, and rounds the sides to whole pixels, ``w = round(sqrt(area * r))``,
    ``h = round(sqrt(area / r))``; the first attempt with ``0 < w <= W`` and ``0 < h <= H`` is taken, at a
    uniform whole-pixel position (``top ~ U{0, ..., H - h}``). When no attempt fits, the fallback is the
    central crop of the whole image with its aspect clamped to ``ratio`` (``w = W, h = round(W / max ratio)``
    if ``W / H`` is below the range; ``h = H, w = round(H * max ratio)`` if above; the whole image inside).
    A box that does not fit is thus redrawn, never clipped, so the crop's area follows the distribution a
    torchvision user expects. All ``tries`` attempts are drawn for every sample (``s``, then ``r``, each
    ``(N, tries)``, then top and left): the same distribution as torchvision's draw-until-accepted loop.
    """
    tries = int(tries)
    area = (
        height
        * width
        * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, generator=generator, dtype=torch.float64))
    )
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, tries, generator=generator, dtype=torch.float64))
    box_w, box_h = torch.round(torch.sqrt(area * r)), torch.round(torch.sqrt(area / r))
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first attempt that fits (0 if none)
    box_w, box_h = box_w.gather(1, first).squeeze(1), box_h.gather(1, first).squeeze(1)
    fell_back = ~fits.any(dim=1)
    fallback_h, fallback_w = _central_crop_size(height, width, ratio)
    box_w = torch.where(fell_back, float(fallback_w), box_w)
    box_h = torch.where(fell_back, float(fallback_h), box_h)
    top = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (height - box_h + 1))
    left = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (width - box_w + 1))
    top = torch.where(fell_back, torch.div(height - box_h, 2, rounding_mode="floor"), top)
    left = torch.where(fell_back, torch.div(width - box_w, 2, rounding_mode="floor"), left)
    return torch.stack([top, left, box_h, box_w], dim=1)


def _central_crop_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """``(h, w)`` of torchvision's fallback: the whole image with its aspect ``w / h`` clamped to ``ratio``."""
    if width / height < min(ratio):
        return round(width / min(ratio)), width
    if width / height > max(ratio):
        return height, round(height * max(ratio))
    return height, width


def resized_crop(x: Tensor, boxes: Tensor, flips: Tensor | None = None, interpolation: str = "bilinear") -> Tensor:
    """Crop box ``(top, left, box_height, box_width)`` (pixels, sub-pixel allowed) of every image and resize
    it to ``H x W``, mirrored left-right where ``flips``; one ``grid_sample``, border pixels repeated."""
    n, _, h, w = _check_images(x, "resized_crop")
    b = boxes.to(torch.float64)
    if b.shape != (n, 4):
        raise ValueError(f"boxes must have shape ({n}, 4), got {tuple(b.shape)}")
    sx, sy = b[:, 3] / w, b[:, 2] / h
    if flips is not None:
        sx = torch.where(flips.cpu(), -sx, sx)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    theta[:, 0, 2] = 2.0 * (b[:, 1] + b[:, 3] / 2) / w - 1.0
    theta[:, 1, 2] = 2.0 * (b[:, 0] + b[:, 2] / 2) / h - 1.0
    theta = theta.to(device=x.device, dtype=x.dtype, non_blocking=True)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=interpolation, padding_mode="border", align_corners=False)


def erasing_boxes(
    n: int,
    height: int,
    width: int,
    p: float = 0.5,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """``(N, 4)`` int64 rectangles ``(top, left, bottom, right)`` (end-exclusive) for :func:`erase`.

    With probability ``p`` a rectangle of area ``U(scale) * H * W`` and aspect ``h / w = r``
    (``log r ~ U(log ratio)``), sides ``round(sqrt(area * r))`` and ``round(sqrt(area / r))`` clipped to
    ``[1, H]`` and ``[1, W]``, at a uniform position; otherwise the empty box ``(0, 0, 0, 0)``.
    Draws: erase or not, area, aspect, top, left.
    """
    do = torch.rand(n, generator=generator) < p
    area = height * width * _uniform(n, scale[0], scale[1], generator)
    r = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator))
    eh = torch.sqrt(area * r).round().clamp(1, height).long()
    ew = torch.sqrt(area / r).round().clamp(1, width).long()
    top = (torch.rand(n, generator=generator, dtype=torch.float64) * (height - eh + 1)).long().clamp(max=height - eh)
    left = (torch.rand(n, generator=generator, dtype=torch.float64) * (width - ew + 1)).long().clamp(max=width - ew)
    return torch.stack([top, left, top + eh, left + ew], dim=1) * do[:, None]


def erase(x: Tensor, boxes: Tensor, value: Tensor | float) -> Tensor:
    """Set the rectangle ``(top, left, bottom, right)`` of every image to ``value`` (a number, or a tensor
    of ``x``'s shape such as noise); empty boxes leave the image unchanged."""
    n, _, h, w = _check_images(x, "erase")
    if boxes.shape != (n, 4):
        raise ValueError(f"boxes must have shape ({n}, 4), got {tuple(boxes.shape)}")
    b = boxes.to(x.device, non_blocking=True)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= b[:, 0, None]) & (rows < b[:, 2, None])  # (N, H)
    in_cols = (cols >= b[:, 1, None]) & (cols < b[:, 3, None])  # (N, W)
    mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (N, 1, H, W)
    fill = value if isinstance(value, Tensor) else x.new_full((), value)
    return torch.where(mask, fill, x)


# -- RandAugment / TrivialAugment ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OpRanges:
    """The strongest magnitude of each op (at magnitude 30 of 30; a magnitude ``m`` takes ``m / 30`` of it).

    Attributes:
        shear: shear coefficient.
        translate: translation as a fraction of the image side.
        rotate: rotation in degrees.
        enhance: brightness / color / contrast / sharpness factor is ``1 +- enhance``.
        posterize_drop: bits dropped (``8 - bits``).
        solarize: the threshold falls from 1 to ``1 - solarize``.
    """

    shear: float
    translate: float
    rotate: float
    enhance: float
    posterize_drop: int
    solarize: float = 1.0


#: torchvision's RandAugment ranges (translate 150/331 of the side: 150 px on ImageNet's 331)
RANDAUGMENT_RANGES = OpRanges(shear=0.3, translate=150 / 331, rotate=30.0, enhance=0.9, posterize_drop=4)
#: TrivialAugment's "wide" ranges (translate 32 px on CIFAR's 32: the whole side)
TRIVIALAUGMENT_RANGES = OpRanges(shear=0.99, translate=1.0, rotate=135.0, enhance=0.99, posterize_drop=6)


def apply_ops(
    x: Tensor,
    ops: Tensor,
    magnitudes: Tensor,
    ranges: OpRanges = RANDAUGMENT_RANGES,
    interpolation: str = "nearest",
) -> Tensor:
    """Apply op ``OPS[ops[i]]`` at signed magnitude ``magnitudes[i]`` (in ``[-1, 1]``, a fraction of
    ``ranges``) to image ``i``; one resampling for all geometric ops, one kernel per pixel op.

    The signs matter for the shear, translate, rotate and enhance ops; posterize, solarize use
    ``|m|``; identity, autocontrast and equalize ignore it. ``color`` (saturation) is the identity on
    1-channel images, as in torchvision. Geometric ops fill with black (pixel 0). ``ops`` and
    ``magnitudes`` are CPU tensors (the subsets are found without a device sync).

    Example:
        >>> x = torch.rand(2, 1, 4, 4)
        >>> out = apply_ops(x, torch.tensor([0, 6]), torch.tensor([0.0, -1.0]), RANDAUGMENT_RANGES)
        >>> torch.equal(out[0], x[0]), torch.allclose(out[1], 0.1 * x[1])
        (True, True)
    """
    n, _, h, w = _check_images(x, "apply_ops")
    ops, mag = ops.cpu().long(), magnitudes.cpu().to(torch.float64)
    if ops.shape != (n,) or mag.shape != (n,):
        raise ValueError(f"ops and magnitudes must have shape ({n},), got {tuple(ops.shape)}, {tuple(mag.shape)}")
    out = x.clone()

    def put(idx: Tensor, fn: Any) -> None:
        dev = idx.to(x.device, non_blocking=True)
        out.index_copy_(0, dev, fn(x.index_select(0, dev), idx))

    geo = torch.zeros(n, dtype=torch.bool)
    for op in _GEOMETRIC:
        geo |= ops == op
    if bool(geo.any()):
        idx = geo.nonzero().squeeze(1)
        kinds, m = ops[idx], mag[idx]
        matrix = torch.zeros(len(idx), 2, 3, dtype=torch.float64)
        matrix[:, 0, 0] = matrix[:, 1, 1] = 1.0
        s, t, r = m * ranges.shear, m * ranges.translate, m * ranges.rotate
        zero = torch.zeros_like(m)
        for kind, mats in (
            (1, shear_matrix(s, "x")),
            (2, shear_matrix(s, "y")),
            (3, translate_matrix(t * w, zero)),
            (4, translate_matrix(zero, t * h)),
            (5, rotate_matrix(r)),
        ):
            chosen = kinds == kind
            matrix[chosen] = mats[chosen]
        put(idx, lambda xs, i: affine(xs, matrix, interpolation, "zeros"))
    pixel_ops: dict[int, Any] = {
        6: lambda xs, i: adjust_brightness(xs, 1.0 + mag[i] * ranges.enhance),
        7: lambda xs, i: adjust_saturation(xs, 1.0 + mag[i] * ranges.enhance),
        8: lambda xs, i: adjust_contrast(xs, 1.0 + mag[i] * ranges.enhance),
        9: lambda xs, i: adjust_sharpness(xs, 1.0 + mag[i] * ranges.enhance),
        10: lambda xs, i: posterize(xs, 8 - (mag[i].abs() * ranges.posterize_drop).round().long()),
        11: lambda xs, i: solarize(xs, 1.0 - mag[i].abs() * ranges.solarize),
        12: lambda xs, i: autocontrast(xs),
        13: lambda xs, i: equalize(xs),
    }
    for kind, fn in pixel_ops.items():
        picked = ops == kind
        if bool(picked.any()):
            put(picked.nonzero().squeeze(1), fn)
    return out


def _signs(n: int, generator: torch.Generator | None) -> Tensor:
    return torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2.0 - 1.0


# -- the policies: (x, generator, options) -> x -------------------------------------------------------------


def crop_flip(x: Tensor, generator: torch.Generator | None = None, padding: int = 4, flip: bool = True) -> Tensor:
    """Random translation by up to ``padding`` pixels (black border) and, with ``flip``, a horizontal flip
    with probability 1/2, per sample (:func:`lightning_tricks.augment.random_crop_flip` on the CPU draws)."""
    _check_images(x, "crop_flip")
    if generator is None:
        generator = torch.default_generator
    return random_crop_flip(x, padding, flip, generator, fill=0.0)


def random_resized_crop(
    x: Tensor,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = False,
) -> Tensor:
    """Per-sample random resized crop (:func:`resized_crop_boxes`, :func:`resized_crop`, bilinear), then
    a horizontal flip with probability 1/2 when ``flip``.

    Example:
        >>> x = torch.rand(3, 1, 6, 6)
        >>> torch.allclose(random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0)), x, atol=1e-6)
        True
    """
    n, _, h, w = _check_images(x, "random_resized_crop")
    boxes = resized_crop_boxes(n, h, w, scale, ratio, generator)
    flips = torch.randint(0, 2, (n,), generator=generator).bool() if flip else None
    return resized_crop(x, boxes, flips, "bilinear")


def color_jitter(
    x: Tensor,
    generator: torch.Generator | None = None,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
) -> Tensor:
    """Brightness, then contrast, then saturation, each with a factor ``U(max(0, 1 - a), 1 + a)`` per
    sample (an amount ``a = 0`` skips that op and its draw)."""
    n = _check_images(x, "color_jitter")[0]
    out = x
    for amount, op in ((brightness, adjust_brightness), (contrast, adjust_contrast), (saturation, adjust_saturation)):
        if amount > 0:
            out = op(out, _uniform(n, max(0.0, 1.0 - amount), 1.0 + amount, generator))
    return out if out is not x else x.clone()


def randaugment(
    x: Tensor,
    generator: torch.Generator | None = None,
    num_ops: int = 2,
    magnitude: float = 9,
    magnitude_std: float = 0.0,
) -> Tensor:
    """RandAugment: ``num_ops`` rounds; in each, every sample draws an op uniformly from :data:`OPS` and a
    sign, at magnitude ``magnitude`` of 30 (per sample ``N(magnitude, magnitude_std)`` clipped to
    ``[0, 30]`` when ``magnitude_std > 0``), with :data:`RANDAUGMENT_RANGES`. Draws per round: ops, signs,
    then the magnitudes (only with ``magnitude_std > 0``)."""
    n = _check_images(x, "randaugment")[0]
    out = x
    for _ in range(num_ops):
        ops = torch.randint(0, len(OPS), (n,), generator=generator)
        signs = _signs(n, generator)
        m = torch.full((n,), float(magnitude), dtype=torch.float64)
        if magnitude_std > 0:
            m = (m + magnitude_std * torch.randn(n, generator=generator, dtype=torch.float64)).clamp(0, MAX_MAGNITUDE)
        out = apply_ops(out, ops, signs * m / MAX_MAGNITUDE, RANDAUGMENT_RANGES, "nearest")
    return out if out is not x else x.clone()


def trivialaugment(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """TrivialAugment (wide): one op per sample uniform over :data:`OPS`, a sign, and a magnitude uniform over
    the bins ``0..30``, with :data:`TRIVIALAUGMENT_RANGES`. Draws: ops, signs, bins."""
    n = _check_images(x, "trivialaugment")[0]
    ops = torch.randint(0, len(OPS), (n,), generator=generator)
    signs = _signs(n, generator)
    bins = torch.randint(0, MAX_MAGNITUDE + 1, (n,), generator=generator, dtype=torch.float64)
    return apply_ops(x, ops, signs * bins / MAX_MAGNITUDE, TRIVIALAUGMENT_RANGES, "nearest")


def random_erasing(
    x: Tensor,
    generator: torch.Generator | None = None,
    p: float = 0.5,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float | str = "random",
) -> Tensor:
    """Random erasing (:func:`erasing_boxes`, :func:`erase`): ``value="random"`` fills with ``U(0, 1)``
    noise drawn on ``x``'s device from a generator seeded by one more draw of ``generator``."""
    n, _, h, w = _check_images(x, "random_erasing")
    boxes = erasing_boxes(n, h, w, p, scale, ratio, generator)
    if value == "random":
        fill: Tensor | float = torch.rand(x.shape, generator=_noise_generator(x, generator), device=x.device).to(
            x.dtype
        )
    else:
        fill = float(value)
    return erase(x, boxes, fill)


# -- options, names, the composed policy ---------------------------------------------------------------------


def _pair(name: str, value: Any, low: float, high: float | None, *, low_open: bool = True) -> tuple[float, float]:
    """``value`` as ``(a, b)`` with ``low < a <= b`` (``<=`` when not ``low_open``) and ``b <= high``."""
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
    pair = tuple(value) if ok else ()
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pair)
    if ok:
        a, b = float(pair[0]), float(pair[1])
        ok = (a > low if low_open else a >= low) and a <= b and (high is None or b <= high)
    if not ok:
        lo = f"{low} < low" if low_open else f"{low} <= low"
        hi = f" <= {high}" if high is not None else ""
        shown = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
        raise ValueError(f"{name} must be [low, high] with {lo} <= high{hi}, got {shown!r}")
    return a, b


def _number(name: str, value: Any, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        ok = False
    else:
        ok = value >= low and (high is None or value <= high)
    if not ok:
        where = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a number in {where}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class PolicyOptions:
    """The options of every policy (``data.augment_options.NAME`` in the configs); each is checked when set.

    Attributes:
        padding: ``crop_flip``: maximum translation in pixels, int >= 0.
        crop_scale: ``random_resized_crop``: area fraction range ``[low, high]``, ``0 < low <= high <= 1``.
        crop_ratio: ``random_resized_crop``: aspect ratio (w / h) range, ``0 < low <= high``.
        brightness, contrast: ``color_jitter`` amounts ``>= 0`` (factor ``U(max(0, 1 - a), 1 + a)``).
        saturation: ``color_jitter`` amount ``>= 0``; ``None``: 0.4 on colour images, 0 on 1-channel ones
            (where saturation is the identity; a value > 0 there is refused).
        num_ops: ``randaugment``: ops per sample, int in ``[1, 14]``.
        magnitude: ``randaugment``: magnitude in ``[0, 30]`` (torchvision's scale; 9 in the paper's ImageNet runs).
        magnitude_std: ``randaugment``: per-sample magnitude noise, ``>= 0`` (0: a fixed magnitude).
        erase_p: ``random_erasing``: probability per sample, in ``[0, 1]``.
        erase_scale: ``random_erasing``: area fraction range, ``0 < low <= high <= 1``.
        erase_ratio: ``random_erasing``: aspect ratio (h / w) range, ``0 < low <= high``.
        erase_value: ``random_erasing``: ``"random"`` (uniform noise) or a pixel value in ``[0, 1]``.
    """

    padding: int = 4
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float | None = None
    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.0
    erase_p: float = 0.5
    erase_scale: tuple[float, float] = (0.02, 0.33)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    erase_value: float | str = "random"

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or self.padding < 0:
            raise ValueError(f"padding must be an int >= 0, got {self.padding!r}")
        put("crop_scale", _pair("crop_scale", self.crop_scale, 0.0, 1.0))
        put("crop_ratio", _pair("crop_ratio", self.crop_ratio, 0.0, None))
        put("brightness", _number("brightness", self.brightness, 0.0))
        put("contrast", _number("contrast", self.contrast, 0.0))
        if self.saturation is not None:
            put("saturation", _number("saturation", self.saturation, 0.0))
        if isinstance(self.num_ops, bool) or not isinstance(self.num_ops, int) or not 1 <= self.num_ops <= len(OPS):
            raise ValueError(f"num_ops must be an int in [1, {len(OPS)}], got {self.num_ops!r}")
        put("magnitude", _number("magnitude", self.magnitude, 0.0, MAX_MAGNITUDE))
        put("magnitude_std", _number("magnitude_std", self.magnitude_std, 0.0))
        put("erase_p", _number("erase_p", self.erase_p, 0.0, 1.0))
        put("erase_scale", _pair("erase_scale", self.erase_scale, 0.0, 1.0))
        put("erase_ratio", _pair("erase_ratio", self.erase_ratio, 0.0, None))
        if self.erase_value != "random":
            try:
                put("erase_value", _number("erase_value", self.erase_value, 0.0, 1.0))
            except ValueError:
                raise ValueError(
                    f"erase_value must be 'random' or a number in [0.0, 1.0], got {self.erase_value!r}"
                ) from None

    @classmethod
    def from_mapping(cls, options: PolicyOptions | Mapping[str, Any] | None) -> PolicyOptions:
        """Options from a mapping (a Hydra ``DictConfig`` too); an unknown key fails naming the known ones."""
        if options is None:
            return cls()
        if isinstance(options, PolicyOptions):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"augment_options must be a mapping of option -> value, got {options!r}")
        known = tuple(f.name for f in fields(cls))
        for key in options:
            if key not in known:
                raise ValueError(f"augment_options has no option {key!r}; choose from {known}")
        return cls(**{str(k): _plain(v) for k, v in options.items()})


def _plain(value: Any) -> Any:
    """A Hydra ``ListConfig`` (any non-string sequence) as a tuple; other values unchanged."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(value)
    return value


def check_policy_names(augment: str | Sequence[str] | None) -> tuple[str, ...]:
    """The policy names in ``augment`` (one name or a list, applied in order), without ``"none"``.

    Example:
        >>> check_policy_names(["crop_flip", "randaugment"]), check_policy_names("none")
        (('crop_flip', 'randaugment'), ())
        >>> check_policy_names("autoaugment")
        Traceback (most recent call last):
        ...
        ValueError: augment must be one of ('none', 'crop_flip', 'random_resized_crop', 'color_jitter', \
'randaugment', 'trivialaugment', 'random_erasing') or a list of them, got 'autoaugment'
    """
    if augment is None:
        return ()
    names = [augment] if isinstance(augment, str) else augment
    if not isinstance(names, Sequence):
        names = [names]  # type: ignore[list-item]  # reported below
    for name in names:
        if name not in POLICIES:
            raise ValueError(f"augment must be one of {POLICIES} or a list of them, got {name!r}")
    return tuple(str(name) for name in names if name != "none")


class AugmentPolicy:
    """The named policies applied in order to a batch in pixel space ``[0, 1]``: ``policy(x, generator)``.

    Args:
        augment: a name in :data:`POLICIES` or a list of them (e.g. ``["crop_flip", "random_erasing"]``).
        flip: whether ``crop_flip`` / ``random_resized_crop`` also flip horizontally (off where mirror
            images change the class: digits, MNIST).
        channels: channels of the images (1 or 3), to resolve ``saturation=None`` and refuse saturation on
            1-channel images; ``None``: unknown (saturation defaults to 0.4).
        options: :class:`PolicyOptions` or a mapping of them.

    Raises:
        ValueError: an unknown name or option, an option out of range, a ``crop_flip`` that does nothing, or
            saturation asked for on 1-channel images; one line naming the value and what is allowed.
    """

    def __init__(
        self,
        augment: str | Sequence[str] | None = "none",
        flip: bool = False,
        channels: int | None = None,
        options: PolicyOptions | Mapping[str, Any] | None = None,
    ) -> None:
        self.names = check_policy_names(augment)
        if not isinstance(flip, bool):
            raise ValueError(f"flip must be a bool, got {flip!r}")
        self.flip = flip
        self.channels = channels
        self.options = PolicyOptions.from_mapping(options)
        opts = self.options
        if "crop_flip" in self.names and opts.padding == 0 and not flip:
            raise ValueError("augment=crop_flip with padding=0 and flip=false does nothing; set padding >= 1")
        saturation = opts.saturation
        if saturation is None:
            saturation = 0.0 if channels == 1 else 0.4
        elif saturation > 0 and channels == 1 and "color_jitter" in self.names:
            raise ValueError(
                f"saturation={saturation} needs colour images, but these have 1 channel (saturation is the "
                "identity there); set augment_options.saturation to 0 or null"
            )
        self.saturation = saturation

    def __bool__(self) -> bool:
        return bool(self.names)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        o = self.options
        for name in self.names:
            if name == "crop_flip":
                x = crop_flip(x, generator, o.padding, self.flip)
            elif name == "random_resized_crop":
                x = random_resized_crop(x, generator, o.crop_scale, o.crop_ratio, self.flip)
            elif name == "color_jitter":
                x = color_jitter(x, generator, o.brightness, o.contrast, self.saturation)
            elif name == "randaugment":
                x = randaugment(x, generator, o.num_ops, o.magnitude, o.magnitude_std)
            elif name == "trivialaugment":
                x = trivialaugment(x, generator)
            else:  # random_erasing (names were checked)
                x = random_erasing(x, generator, o.erase_p, o.erase_scale, o.erase_ratio, o.erase_value)
        return x

    def __repr__(self) -> str:
        return f"AugmentPolicy({list(self.names) or 'none'}, flip={self.flip})"
