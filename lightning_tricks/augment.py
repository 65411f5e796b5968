"""Batch-level data augmentation on the device: mixup, CutMix, Cutout, random crop + flip.

Pure functions over a batch ``x`` of shape ``(N, C, H, W)`` (mixup accepts any ``(N, ...)``) and
labels ``y`` (class indices ``(N,)`` or soft targets ``(N, C)``). Every random draw comes from the
``torch.Generator`` the caller passes (a CPU generator; the few drawn numbers are moved to ``x``'s
device without a host sync), or is given explicitly (``lam``, ``index``, ``centers``), so tests can fix
every draw and DDP ranks can differ on purpose. The Lightning wiring lives in
:mod:`lightning_tricks.callbacks.augment`.

- **mixup** (Zhang, Cisse, Dauphin, Lopez-Paz 2018, arXiv:1710.09412):
  ``x' = lam * x + (1 - lam) * x[index]``, ``y' = lam * onehot(y) + (1 - lam) * onehot(y[index])``,
  ``lam ~ Beta(alpha, alpha)``.
- **CutMix** (Yun, Han, Oh, Chun, Choe, Yoo 2019, arXiv:1905.04899): paste a box of
  ``x[index]`` into ``x``; the box has sides ``sqrt(1 - lam) * (H, W)`` around a uniform center and is
  clipped at the border, and ``lam`` is then corrected to the kept area
  ``lam = 1 - box_area / (H * W)`` before mixing the labels.
- **Cutout** (DeVries, Taylor 2017, arXiv:1708.04552): zero ``count`` squares of side ``size`` per
  image, each around a uniform center (clipped at the border). Labels are unchanged.
- **random crop + flip**: pad by ``padding`` and crop back at a uniform offset (a translation by up
  to ``padding`` pixels), then flip horizontally with probability 1/2, per sample, in one gather.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MixedBatch",
    "sample_beta",
    "soft_targets",
    "mixup_batch",
    "cutmix_batch",
    "cutmix_box",
    "cutout_size",
    "cutout_boxes",
    "cutout_batch",
    "random_crop_flip",
    "RandomCropFlip",
]


class MixedBatch(NamedTuple):
    """The result of :func:`mixup_batch` / :func:`cutmix_batch`.

    Attributes:
        x: the mixed inputs, same shape and dtype as the input.
        y: soft targets ``(N, num_classes)``.
        lam: weight of each sample's own label (CutMix: the kept area fraction).
        index: the partner of each sample: sample ``i`` is mixed with sample ``index[i]``.
        box: CutMix's pasted box ``(top, left, bottom, right)`` (end-exclusive); ``None`` for mixup.
    """

    x: Tensor
    y: Tensor
    lam: float
    index: Tensor  # type: ignore[assignment]  # shadows tuple.index: the partner of each sample
    box: tuple[int, int, int, int] | None = None


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")


def _check_lam(lam: float) -> None:
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam!r}")


def sample_beta(alpha: float, generator: torch.Generator | None = None) -> float:
    """One draw of ``Beta(alpha, alpha)`` from ``generator``, as ``G1 / (G1 + G2)`` with ``Gi ~ Gamma(alpha)``.

    Drawn on the CPU in float64 (no device sync). For a tiny ``alpha`` both gamma draws can underflow
    to zero; then the limit distribution (0 or 1 with probability 1/2) is used.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> 0.0 <= sample_beta(0.4, g) <= 1.0
        True
    """
    _check_alpha(alpha)
    gammas = torch._standard_gamma(_alpha_pair(float(alpha)), generator=generator)
    g1, g2 = gammas.tolist()
    if g1 + g2 == 0.0:
        return float(torch.randint(0, 2, (1,), generator=generator).item())
    return g1 / (g1 + g2)


@functools.lru_cache(maxsize=16)
def _alpha_pair(alpha: float) -> Tensor:
    """``[alpha, alpha]`` in float64, made once per alpha (read only: ``_standard_gamma`` does not write it)."""
    return torch.full((2,), alpha, dtype=torch.float64)


def soft_targets(y: Tensor, num_classes: int | None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``y`` as a float ``(N, C)`` distribution: one-hot for class indices, unchanged for soft targets."""
    if y.dtype.is_floating_point:
        if y.ndim != 2 or (num_classes is not None and y.shape[1] != num_classes):
            raise ValueError(f"soft targets must have shape (N, num_classes={num_classes}), got {tuple(y.shape)}")
        return y.to(dtype)
    if y.ndim != 1:
        raise ValueError(f"class-index targets must have shape (N,), got {tuple(y.shape)}")
    if num_classes is None:
        raise ValueError("num_classes is needed to turn class indices into soft targets, got None")
    # the values of F.one_hot(y, C).to(dtype), in one kernel and without one_hot's range check (a
    # device-wide min/max); an index out of range still raises (CPU) or asserts on the device (CUDA)
    return torch.zeros((y.shape[0], num_classes), dtype=dtype, device=y.device).scatter_(1, y.long()[:, None], 1.0)


def _partner_index(n: int, index: Tensor | None, generator: torch.Generator | None, device: torch.device) -> Tensor:
    if index is None:
        index = torch.randperm(n, generator=generator)
    if index.shape != (n,):
        raise ValueError(f"index must have shape ({n},), got {tuple(index.shape)}")
    return index.to(device, non_blocking=True)


def _target_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype.is_floating_point else torch.float32


def _check_batch(x: Tensor, y: Tensor) -> None:
    if x.ndim < 2:
        raise ValueError(f"x must be a batch (N, ...), got shape {tuple(x.shape)}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x and y need the same batch size, got {x.shape[0]} and {y.shape[0]}")


def mixup_batch(
    x: Tensor,
    y: Tensor,
    num_classes: int | None = None,
    alpha: float = 1.0,
    lam: float | None = None,
    index: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> MixedBatch:
    """Mixup of a batch with a permutation of itself.

    ``x' = lam * x + (1 - lam) * x[index]`` and ``y' = lam * q + (1 - lam) * q[index]`` with ``q`` the
    one-hot (or given soft) targets; ``lam ~ Beta(alpha, alpha)`` and ``index`` a random permutation,
    both drawn from ``generator`` unless given. Zhang et al. 2018, arXiv:1710.09412.

    Args:
        x: inputs ``(N, ...)``, floating point.
        y: class indices ``(N,)`` or soft targets ``(N, C)``.
        num_classes: needed when ``y`` holds class indices.
        alpha: Beta concentration, > 0 (0.2-0.4 on ImageNet, 1.0 on CIFAR in the paper).
        lam: a fixed mixing weight in ``[0, 1]`` instead of a draw.
        index: a fixed partner index ``(N,)`` instead of a random permutation.
        generator: the source of the draws (CPU generator).

    Example:
        >>> x, y = torch.arange(4.0).view(2, 2), torch.tensor([0, 1])
        >>> out = mixup_batch(x, y, num_classes=2, lam=0.75, index=torch.tensor([1, 0]))
        >>> out.x.tolist(), out.y.tolist()
        ([[0.5, 1.5], [1.5, 2.5]], [[0.75, 0.25], [0.25, 0.75]])
    """
    _check_batch(x, y)
    if not x.dtype.is_floating_point:
        raise ValueError(f"mixup needs floating point inputs, got dtype {x.dtype}")
    if lam is None:
        lam = sample_beta(alpha, generator)
    else:
        _check_alpha(alpha)
        _check_lam(lam)
    idx = _partner_index(x.shape[0], index, generator, x.device)
    q = soft_targets(y, num_classes, _target_dtype(x))
    # index_select: the same values as x[idx], without advanced indexing's slower general path
    return MixedBatch(
        torch.lerp(x.index_select(0, idx), x, lam), torch.lerp(q.index_select(0, idx), q, lam), float(lam), idx, None
    )


def cutmix_box(
    height: int,
    width: int,
    lam: float,
    generator: torch.Generator | None = None,
    center: tuple[int, int] | None = None,
) -> tuple[int, int, int, int]:
    """The CutMix box ``(top, left, bottom, right)`` for a target mixing weight ``lam``.

    Sides ``int(H * sqrt(1 - lam))`` and ``int(W * sqrt(1 - lam))`` around a center drawn uniformly over
    the image (or given as ``(row, col)``), clipped at the border; so the area can be smaller than
    ``(1 - lam) * H * W``, which is why :func:`cutmix_batch` recomputes ``lam`` from the box.
    """
    _check_lam(lam)
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    if center is None:
        cy = int(torch.randint(0, height, (1,), generator=generator).item())
        cx = int(torch.randint(0, width, (1,), generator=generator).item())
    else:
        cy, cx = (int(c) for c in center)
    top, bottom = min(max(cy - cut_h // 2, 0), height), min(max(cy - cut_h // 2 + cut_h, 0), height)
    left, right = min(max(cx - cut_w // 2, 0), width), min(max(cx - cut_w // 2 + cut_w, 0), width)
    return top, left, bottom, right


def cutmix_batch(
    x: Tensor,
    y: Tensor,
    num_classes: int | None = None,
    alpha: float = 1.0,
    lam: float | None = None,
    index: Tensor | None = None,
    generator: torch.Generator | None = None,
    center: tuple[int, int] | None = None,
) -> MixedBatch:
    """CutMix: paste one box of ``x[index]`` into every image and mix labels by the kept area.

    ``lam ~ Beta(alpha, alpha)`` (or given) sets the box size (see :func:`cutmix_box`); after clipping,
    ``lam = 1 - (bottom - top) * (right - left) / (H * W)`` and ``y' = lam * q + (1 - lam) * q[index]``.
    Yun et al. 2019, arXiv:1905.04899.

    Args:
        x: images ``(N, C, H, W)``.
        y: class indices ``(N,)`` or soft targets ``(N, C)``.
        num_classes, alpha, lam, index, generator: as in :func:`mixup_batch`.
        center: a fixed box center ``(row, col)`` instead of a uniform draw.

    Example:
        >>> x, y = torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])
        >>> x[1] = 1.0
        >>> out = cutmix_batch(x, y, 2, lam=0.75, index=torch.tensor([1, 0]), center=(1, 1))
        >>> out.box, out.lam, out.y[0].tolist()
        ((0, 0, 2, 2), 0.75, [0.75, 0.25])
    """
    _check_batch(x, y)
    if x.ndim != 4:
        raise ValueError(f"cutmix needs images (N, C, H, W), got shape {tuple(x.shape)}")
    if lam is None:
        lam = sample_beta(alpha, generator)
    else:
        _check_alpha(alpha)
        _check_lam(lam)
    h, w = x.shape[-2:]
    idx = _partner_index(x.shape[0], index, generator, x.device)
    top, left, bottom, right = box = cutmix_box(h, w, lam, generator, center)
    out = x.clone()
    out[:, :, top:bottom, left:right] = x[:, :, top:bottom, left:right].index_select(0, idx)
    lam = 1.0 - (bottom - top) * (right - left) / (h * w)
    q = soft_targets(y, num_classes, _target_dtype(x))
    return MixedBatch(out, torch.lerp(q.index_select(0, idx), q, lam), lam, idx, box)


def cutout_size(size: int | float, height: int, width: int) -> int:
    """The side in pixels: ``size`` itself for an int, ``round(size * min(H, W))`` for a fraction in (0, 1].

    Raises ``ValueError`` if the square does not fit in the image.
    """
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ValueError(f"cutout size must be an int (pixels) or a float fraction in (0, 1], got {size!r}")
    side = size if isinstance(size, int) else max(1, round(size * min(height, width)))
    if isinstance(size, float) and not 0.0 < size <= 1.0:
        raise ValueError(f"cutout size as a fraction must be in (0, 1], got {size!r}")
    if side < 1:
        raise ValueError(f"cutout size must be >= 1 pixel, got {size!r}")
    if side > min(height, width):
        raise ValueError(
            f"cutout size {side} is larger than the image ({height}x{width}); "
            f"use a size <= {min(height, width)} or a fraction in (0, 1]"
        )
    return side


def cutout_boxes(
    n: int,
    count: int,
    size: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    centers: Tensor | None = None,
) -> Tensor:
    """``(n, count, 4)`` int64 boxes ``(top, left, bottom, right)``, end-exclusive, clipped to the image.

    Box ``k`` of sample ``i`` spans rows ``[cy - size // 2, cy - size // 2 + size)`` (and columns
    likewise) around a center ``(cy, cx)`` drawn uniformly over the image, or given as ``centers``
    ``(n, count, 2)``.
    """
    if centers is None:
        cy = torch.randint(0, height, (n, count), generator=generator)
        cx = torch.randint(0, width, (n, count), generator=generator)
        centers = torch.stack([cy, cx], dim=-1)
    if centers.shape != (n, count, 2):
        raise ValueError(f"centers must have shape ({n}, {count}, 2), got {tuple(centers.shape)}")
    start = centers.long() - size // 2
    limit = torch.tensor([height, width], device=centers.device)
    zero = torch.zeros((), dtype=torch.long, device=centers.device)
    # (top, left) then (bottom, right), each clipped to [0, (H, W)]
    return torch.cat([start.clamp(zero, limit), (start + size).clamp(zero, limit)], dim=-1)


def cutout_batch(
    x: Tensor,
    size: int | float,
    count: int = 1,
    generator: torch.Generator | None = None,
    centers: Tensor | None = None,
    value: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Cutout: set ``count`` squares of side ``size`` per image to ``value`` (0 = the mean of standardized data).

    All samples at once: the boxes (see :func:`cutout_boxes`) become one boolean mask ``(N, 1, H, W)``.
    DeVries and Taylor 2017, arXiv:1708.04552.

    Args:
        x: images ``(N, C, H, W)``.
        size: side in pixels (int) or as a fraction of ``min(H, W)`` (float in (0, 1]).
        count: squares per image, >= 1.
        generator: the source of the centers.
        centers: fixed centers ``(N, count, 2)`` (row, col) instead of draws.
        value: the fill value.

    Returns:
        ``(x_out, boxes)`` with ``boxes`` the ``(N, count, 4)`` clipped boxes on ``x``'s device.

    Example:
        >>> out, boxes = cutout_batch(torch.ones(1, 1, 4, 4), 2, centers=torch.tensor([[[0, 0]]]))
        >>> boxes.tolist(), int(out.sum())
        ([[[0, 0, 1, 1]]], 15)
    """
    if x.ndim != 4:
        raise ValueError(f"cutout needs images (N, C, H, W), got shape {tuple(x.shape)}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    n, _, h, w = x.shape
    side = cutout_size(size, h, w)
    boxes = cutout_boxes(n, count, side, h, w, generator, centers).to(x.device, non_blocking=True)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= boxes[..., 0, None]) & (rows < boxes[..., 2, None])  # (N, count, H)
    in_cols = (cols >= boxes[..., 1, None]) & (cols < boxes[..., 3, None])  # (N, count, W)
    mask = in_rows[..., :, None] & in_cols[..., None, :]  # (N, count, H, W)
    mask = mask[:, 0] if count == 1 else mask.any(dim=1)  # (N, H, W)
    # where: the same values as masked_fill, faster for a mask broadcast over the channels
    # (new_full: a fill on x's device, not a host-to-device copy of a Python scalar)
    return torch.where(mask[:, None], x.new_full((), value), x), boxes


def random_crop_flip(
    x: Tensor,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
    offsets: Tensor | None = None,
    flips: Tensor | None = None,
    fill: float = 0.0,
) -> Tensor:
    """Per-sample random translation (zero-pad by ``padding``, crop at a uniform offset) and h-flip.

    One gather for the whole batch: output pixel ``(r, c)`` of sample ``i`` is padded pixel
    ``(r + dy_i, c' + dx_i)`` with ``dy_i, dx_i`` uniform in ``[0, 2 * padding]`` and ``c' = W - 1 - c``
    when sample ``i`` is flipped (probability 1/2), else ``c``.

    Args:
        x: images ``(N, C, H, W)``.
        padding: maximum shift in pixels, >= 0.
        flip: also flip horizontally with probability 1/2.
        generator: a CPU generator for the draws; ``None`` draws on ``x``'s device from the global RNG.
        offsets: fixed ``(N, 2)`` offsets ``(dy, dx)`` in ``[0, 2 * padding]`` instead of draws.
        flips: fixed ``(N,)`` booleans instead of draws.
        fill: value of the padded border.

    Example:
        >>> x = torch.arange(4.0).view(1, 1, 2, 2)
        >>> random_crop_flip(x, 1, offsets=torch.tensor([[1, 1]]), flips=torch.tensor([True])).tolist()
        [[[[1.0, 0.0], [3.0, 2.0]]]]
    """
    if x.ndim != 4:
        raise ValueError(f"random_crop_flip needs images (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    device = x.device if generator is None else torch.device("cpu")
    if offsets is None:
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=device)
    if flips is None:
        flips = (
            torch.randint(0, 2, (n,), generator=generator, device=device).bool()
            if flip
            else torch.zeros(n, dtype=torch.bool, device=device)
        )
    offsets = offsets.to(x.device, non_blocking=True)
    flips = flips.to(x.device, non_blocking=True)
    padded = F.pad(x, (padding,) * 4, value=fill) if padding else x
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flips[:, None], cols.flip(1), cols) + offsets[:, 1:2]  # (N, W)
    rows = torch.arange(h, device=x.device) + offsets[:, 0:1]  # (N, H)
    flat = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).view(n, 1, h * w)
    return padded.flatten(2).gather(2, flat.expand(n, c, h * w)).view(n, c, h, w)


class RandomCropFlip:
    """Batch transform ``x -> x`` for the data modules' ``batch_augment``: random translation + h-flip.

    Runs on the training device after transfer, vectorized over the batch (see
    :func:`random_crop_flip`). The classic CIFAR recipe is ``padding=4, flip=True``; for digits or
    (Fashion-)MNIST use ``flip=False`` if mirror images change the class.

    Args:
        padding: maximum translation in pixels, >= 0.
        flip: horizontal flip with probability 1/2.
        seed: ``None`` draws from the global RNG on the device (seeded by ``seed_everything``);
            an int uses a private CPU generator (reproducible independently of other code).

    Example:
        >>> aug = RandomCropFlip(padding=2, seed=0)
        >>> aug(torch.zeros(3, 1, 8, 8)).shape
        torch.Size([3, 1, 8, 8])
    """

    def __init__(self, padding: int = 4, flip: bool = True, seed: int | None = None) -> None:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be an int >= 0, got {padding!r}")
        if not isinstance(flip, bool):
            raise ValueError(f"flip must be a bool, got {flip!r}")
        if padding == 0 and not flip:
            raise ValueError("RandomCropFlip with padding=0 and flip=False does nothing; enable one of them")
        self.padding = padding
        self.flip = flip
        self.seed = seed
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def __call__(self, x: Tensor) -> Tensor:
        return random_crop_flip(x, self.padding, self.flip, self.generator)

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip}, seed={self.seed})"
