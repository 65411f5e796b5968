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
- **mixup or CutMix, timm semantics** (:func:`mixup_cutmix_batch`, as ``timm.data.Mixup``): each batch
  (``mode="batch"``), pair of samples ``(i, N-1-i)`` (``"pair"``) or sample (``"elem"``) is mixed with
  probability ``prob``, by CutMix with probability ``switch_prob`` else by mixup, with its own ``lam``;
  sample ``i``'s partner is ``N-1-i`` (the loader shuffles); label smoothing folded into the targets.
- **random crop + flip**: pad by ``padding`` and crop back at a uniform offset (a translation by up
  to ``padding`` pixels), then flip horizontally with probability 1/2, per sample, in one gather.
- **soft targets in a user's batch** (:class:`MixedTargets`, :func:`labels_of`): what the callbacks put in
  place of ``y``; a label use of them raises instead of giving a wrong number.
- **test-time augmentation** (:func:`tta_predict`): the mean of the softmax over fixed views of the
  batch (identity, horizontal flip, shifted crops of the zero-padded images).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, MutableMapping
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tricks.checks import check_choice, check_float, check_int

__all__ = [
    "MixedTargets",
    "labels_of",
    "MixedBatch",
    "sample_beta",
    "soft_targets",
    "mixup_batch",
    "mixup_params",
    "mixup_apply",
    "mixup_draws",
    "random_permutations",
    "cutmix_batch",
    "cutmix_params",
    "cutmix_apply",
    "CutMixParams",
    "cutmix_box",
    "cutmix_boxes",
    "cutmix_draws",
    "box_centers",
    "kept_area",
    "cutout_size",
    "cutout_boxes",
    "cutout_batch",
    "cutout_centers",
    "cutout_images",
    "cutout_windows",
    "cutout_fill",
    "box_mask",
    "mix_pair",
    "paste_box",
    "MIX_MODES",
    "MixCutParams",
    "MixCutBatch",
    "check_mixup_cutmix",
    "sample_beta_n",
    "mixup_cutmix_params",
    "mixup_cutmix_batch",
    "random_crop_flip",
    "RandomCropFlip",
    "TTA_MODES",
    "check_tta",
    "tta_views",
    "tta_predict",
]


class MixedTargets(Tensor):
    """Soft targets ``(N, C)`` that a batch augmentation put where the loader's class labels were.

    For losses and arithmetic it is the plain tensor of the mixed label distributions (every result is a
    plain ``Tensor``; ``F.cross_entropy(logits, y)`` takes it as probabilities). ``labels`` holds the
    labels the loader gave, for metrics (see :func:`labels_of`). An operation that reads the soft
    targets as class labels raises a ``ValueError`` naming the augmentation instead of giving a wrong
    number: comparing them (``logits.argmax(1) == y``), casting them to an integer dtype, reshaping or
    viewing them (what ``torchmetrics`` does to a target shaped like the predictions: its multiclass
    ``Accuracy`` would read every soft row as C labels and log 0), ``one_hot``, ``bincount``, ``nll_loss``.
    ``to``, ``clone``, ``detach`` and float casts keep the protection.

    Example:
        >>> y = MixedTargets.wrap(torch.tensor([[0.7, 0.3]]), torch.tensor([0]), "Mixup")
        >>> y.labels.tolist(), round(F.cross_entropy(torch.zeros(1, 2), y).item(), 4)   # log 2
        ([0], 0.6931)
        >>> torch.tensor([0]) == y  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Mixup replaced the class labels of this training batch by soft targets of shape (1, 2); ...
    """

    labels: Tensor
    made_by: str

    @staticmethod
    def wrap(soft: Tensor, labels: Tensor, made_by: str) -> MixedTargets:
        """``soft`` (no copy) as :class:`MixedTargets` with the loader's ``labels``; ``made_by`` names the
        augmentation in the error messages."""
        out = soft.as_subclass(MixedTargets)
        out.labels = labels.labels if isinstance(labels, MixedTargets) else labels
        out.made_by = made_by
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def,override]
        # every use of the targets passes here (``y.dtype`` too): the common path is one lookup and the call
        kwargs = kwargs or {}
        if func in _READS_AS_LABELS:
            mine = _mixed_in(args, kwargs)
            raise ValueError(  # not TypeError: Tensor.__eq__ turns that into NotImplemented, then False
                f"{mine.made_by} replaced the class labels of this training batch by soft targets of shape "
                f"{tuple(mine.shape)}; {getattr(func, '__name__', func)} on them reads them as labels (as a metric "
                "or `preds == y` does), which would give a wrong number. Losses take them as they are "
                "(F.cross_entropy accepts probabilities); for a metric use lightning_tricks.augment.labels_of(y) "
                "(the loader's labels) or y.argmax(1) (the heavier label)"
            )
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func in _KEEPS_TARGETS and isinstance(out, Tensor) and not isinstance(out, MixedTargets):
            mine = _mixed_in(args, kwargs)
            if not out.dtype.is_floating_point:  # to(torch.long), type(torch.LongTensor): a cast to labels
                raise ValueError(f"{mine.made_by}: casting the soft targets to {out.dtype} reads them as labels")
            out = MixedTargets.wrap(out, mine.labels.to(out.device), mine.made_by)
        return out


def _mixed_in(args: tuple, kwargs: dict) -> MixedTargets:
    return next(a for a in (*args, *kwargs.values()) if isinstance(a, MixedTargets))


def labels_of(y: Tensor) -> Tensor:
    """The class labels of a training batch's targets: ``y.labels`` for :class:`MixedTargets`, else ``y``.

    For metrics in a ``training_step`` that runs with Mixup, CutMix or MixupCutmix: those replace ``y``
    by soft targets on the batches they mix; ``labels_of(y)`` is the loader's labels on every batch.

    Example:
        >>> labels_of(torch.tensor([2, 0])).tolist()
        [2, 0]
    """
    return y.labels if isinstance(y, MixedTargets) else y


_READS_AS_LABELS = frozenset(
    {Tensor.__eq__, Tensor.__ne__, Tensor.eq, Tensor.ne, torch.eq, torch.ne, F.one_hot, F.nll_loss, torch.bincount}
    | {Tensor.bincount, Tensor.long, Tensor.int, Tensor.short, Tensor.byte, Tensor.char}
    | {Tensor.reshape, Tensor.view, Tensor.flatten, Tensor.view_as, Tensor.reshape_as, torch.reshape, torch.flatten}
)
_KEEPS_TARGETS = frozenset(
    {Tensor.to, Tensor.type, Tensor.cpu, Tensor.cuda, Tensor.clone, Tensor.detach, Tensor.float, Tensor.double}
    | {Tensor.half, Tensor.bfloat16, Tensor.contiguous}
)


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
    check_float("alpha", alpha, 0.0, math.inf, low_open=True, high_open=True)


def _check_lam(lam: float) -> None:
    check_float("lam", lam, 0.0, 1.0)


def sample_beta(alpha: float, generator: torch.Generator | None = None) -> float:
    """One draw of ``Beta(alpha, alpha)`` from ``generator``: :func:`sample_beta_n` with ``n = 1``, as a float.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> 0.0 <= sample_beta(0.4, g) <= 1.0
        True
    """
    return float(sample_beta_n(alpha, 1, generator)[0])


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
    # the values of F.one_hot(y, C).to(dtype) without one_hot's range check (a device-wide min/max); an
    # index out of range still raises (CPU) or asserts on the device (CUDA)
    if num_classes <= IDENTITY_CLASSES:  # rows of a kept identity: one gather, the kernel mixing runs anyway
        return _identity(num_classes, dtype, y.device).index_select(0, y.long())
    return torch.zeros((y.shape[0], num_classes), dtype=dtype, device=y.device).scatter_(1, y.long()[:, None], 1.0)


#: up to this many classes :func:`soft_targets` gathers rows of an identity it keeps per dtype and device
#: (at most 4 MB in float32); beyond, it scatters ones into zeros (two kernels, nothing kept)
IDENTITY_CLASSES = 1024


@functools.lru_cache(maxsize=8)
def _identity(num_classes: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.eye(num_classes, dtype=dtype, device=device)


def random_permutations(batches: int, n: int, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
    """``(batches, n)`` int64 on ``device``: a uniform random permutation of ``range(n)`` per row, the ``argsort``
    of ``batches x n`` float64 uniforms from ``generator`` (one draw for a whole block of batches; two equal
    keys, which would favour the lower index, have probability below ``n**2 * 2**-54``).

    Example:
        >>> sorted(random_permutations(2, 4, torch.Generator().manual_seed(0))[1].tolist())
        [0, 1, 2, 3]
    """
    keys = torch.rand((batches, n), generator=generator, dtype=torch.float64)
    perms = keys.argsort(dim=1)
    return perms if device is None else perms.to(device)


def _partner_index(n: int, index: Tensor | None, generator: torch.Generator | None, device: torch.device) -> Tensor:
    if index is None:
        return random_permutations(1, n, generator, device)[0]
    if index.shape != (n,):
        raise ValueError(f"index must have shape ({n},), got {tuple(index.shape)}")
    return index if index.device == device else index.to(device, non_blocking=True)


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
    return mixup_apply(x, y, num_classes, *mixup_params(x, alpha, lam, index, generator))


def mixup_params(
    x: Tensor,
    alpha: float = 1.0,
    lam: float | None = None,
    index: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[float, Tensor]:
    """``(lam, index)`` for a batch of inputs ``x``: those not given drawn in this order, ``lam ~ Beta(alpha,
    alpha)``, then a random permutation of the batch (on ``x``'s device); with neither given, the draws of
    :func:`mixup_draws` for one batch."""
    _check_float_inputs(x, "mixup")
    if lam is None:
        lam = sample_beta(alpha, generator)
    else:
        _check_alpha(alpha)
        _check_lam(lam)
    return float(lam), _partner_index(x.shape[0], index, generator, x.device)


def mixup_draws(
    x: Tensor, alpha: float, batches: int, generator: torch.Generator | None = None
) -> list[tuple[float, Tensor]]:
    """:func:`mixup_params` for ``batches`` batches shaped as ``x`` at once: their ``lam`` (one
    :func:`sample_beta_n`), then their permutations (one :func:`random_permutations`)."""
    _check_float_inputs(x, "mixup")
    lams = sample_beta_n(alpha, batches, generator).tolist()
    return list(zip(lams, random_permutations(batches, x.shape[0], generator, x.device).unbind(0)))


def _check_float_inputs(x: Tensor, name: str) -> None:
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} needs floating point inputs, got dtype {x.dtype}")


def mixup_apply(x: Tensor, y: Tensor, num_classes: int | None, lam: float, index: Tensor) -> MixedBatch:
    """Mixup's arithmetic with the draws given (:func:`mixup_params`): :func:`mix_pair` of ``x`` and the soft
    targets of ``y``."""
    new_x, new_y = mix_pair(x, soft_targets(y, num_classes, _target_dtype(x)), lam, index)
    return MixedBatch(new_x, new_y, lam, index, None)


def mix_pair(x: Tensor, q: Tensor, lam: float, index: Tensor) -> tuple[Tensor, Tensor]:
    """``(lam x + (1 - lam) x[index], lam q + (1 - lam) q[index])``: mixup's arithmetic with every draw given.

    Four kernels and two new tensors: ``index_select`` (the same values as ``x[index]`` without advanced
    indexing's general path) then an in-place ``lerp_`` into the gathered copy, for ``x`` and for the
    soft targets ``q`` ``(N, C)``. The values are ``torch.lerp(x[index], x, lam)``'s.

    Example:
        >>> x, q = torch.tensor([[0.0], [4.0]]), torch.eye(2)
        >>> new_x, new_q = mix_pair(x, q, 0.75, torch.tensor([1, 0]))
        >>> new_x.tolist(), new_q.tolist()
        ([[1.0], [3.0]], [[0.75, 0.25], [0.25, 0.75]])
    """
    return x.index_select(0, index).lerp_(x, lam), q.index_select(0, index).lerp_(q, lam)


def cutmix_box(
    height: int,
    width: int,
    lam: float,
    generator: torch.Generator | None = None,
    center: tuple[int, int] | None = None,
) -> tuple[int, int, int, int]:
    """The CutMix box ``(top, left, bottom, right)`` for a target mixing weight ``lam``: :func:`cutmix_boxes` of
    one box, its center drawn by :func:`box_centers` unless given as ``(row, col)``."""
    _check_lam(lam)
    centers = box_centers(1, height, width, generator) if center is None else torch.tensor([center]).long()
    lams = torch.tensor([lam], dtype=torch.float64)
    top, left, bottom, right = cutmix_boxes(lams, height, width, centers)[0].tolist()
    return top, left, bottom, right


def box_centers(batches: int, height: int, width: int, generator: torch.Generator | None = None) -> Tensor:
    """``(batches, 2)`` int64 (row, col) box centers uniform over an ``height x width`` image: the rows, then
    the columns, from ``generator``."""
    rows = torch.randint(0, height, (batches,), generator=generator)
    return torch.stack([rows, torch.randint(0, width, (batches,), generator=generator)], 1)


def cutmix_boxes(lam: Tensor, height: int, width: int, centers: Tensor) -> Tensor:
    """``(B, 4)`` int64 CutMix boxes ``(top, left, bottom, right)``, end-exclusive, for float64 mixing weights
    ``lam`` ``(B,)`` and (row, col) ``centers`` ``(B, 2)``.

    Sides ``int(H * sqrt(1 - lam))`` and ``int(W * sqrt(1 - lam))`` around the center, clipped at the border;
    so the area can be smaller than ``(1 - lam) * H * W``, which is why CutMix takes ``lam`` from the box
    (:func:`kept_area`). Yun et al. 2019, arXiv:1905.04899.

    Example:
        >>> cutmix_boxes(torch.tensor([0.75], dtype=torch.float64), 8, 8, torch.tensor([[0, 4]])).tolist()
        [[0, 2, 2, 6]]
    """
    side = torch.sqrt(1.0 - lam)  # float64, as math.sqrt: the int() of the paper's sides
    cut_h, cut_w = (height * side).long(), (width * side).long()
    top, left = centers[:, 0] - cut_h // 2, centers[:, 1] - cut_w // 2
    ends = (top + cut_h).clamp(0, height), (left + cut_w).clamp(0, width)
    return torch.stack([top.clamp(0, height), left.clamp(0, width), *ends], 1)


def kept_area(boxes: Tensor, height: int, width: int) -> Tensor:
    """``(B,)`` float64: the share of an ``height x width`` image outside each box ``(B, 4)``, CutMix's ``lam``."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return 1.0 - area.to(torch.float64) / (height * width)


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
    return cutmix_apply(x, y, num_classes, cutmix_params(x, alpha, lam, index, generator, center))


class CutMixParams(NamedTuple):
    """What :func:`cutmix_apply` needs: the draws of :func:`cutmix_params` and what follows from them."""

    lam: float  # the kept area fraction: the weight of each sample's own label
    index: Tensor  # type: ignore[assignment]  # shadows tuple.index: the partner of each sample
    box: tuple[int, int, int, int]  # the pasted box (top, left, bottom, right), end-exclusive
    inside: Tensor  # (H, W): 1 inside the box, 0 outside (see box_inside)


def cutmix_params(
    x: Tensor,
    alpha: float = 1.0,
    lam: float | None = None,
    index: Tensor | None = None,
    generator: torch.Generator | None = None,
    center: tuple[int, int] | None = None,
) -> CutMixParams:
    """CutMix's draws for images shaped as ``x`` ``(N, C, H, W)``, those not given and in this order:
    ``lam ~ Beta(alpha, alpha)``, the partner permutation, the box center; then the box
    (:func:`cutmix_boxes`), the kept area as ``lam`` and the box's 0/1 map. With none given, the draws of
    :func:`cutmix_draws` for one batch."""
    _check_images(x)
    lam, idx = mixup_params(x, alpha, lam, index, generator)  # the same first two draws
    h, w = x.shape[-2:]
    centers = box_centers(1, h, w, generator) if center is None else torch.tensor([center]).long()
    return _cutmix_block(x, torch.tensor([lam], dtype=torch.float64), idx[None], centers)[0]


def cutmix_draws(x: Tensor, alpha: float, batches: int, generator: torch.Generator | None = None) -> list[CutMixParams]:
    """:func:`cutmix_params` for ``batches`` batches shaped as ``x`` at once: their ``lam`` (one
    :func:`sample_beta_n`), their permutations (one :func:`random_permutations`), their box centers (one
    :func:`box_centers`)."""
    _check_images(x)
    lams = sample_beta_n(alpha, batches, generator)
    indexes = random_permutations(batches, x.shape[0], generator, x.device)
    return _cutmix_block(x, lams, indexes, box_centers(batches, x.shape[-2], x.shape[-1], generator))


def _check_images(x: Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"cutmix needs images (N, C, H, W), got shape {tuple(x.shape)}")
    _check_float_inputs(x, "cutmix")


def _cutmix_block(x: Tensor, lams: Tensor, indexes: Tensor, centers: Tensor) -> list[CutMixParams]:
    h, w = x.shape[-2:]
    boxes = cutmix_boxes(lams, h, w, centers)
    maps = box_mask(boxes.to(x.device), h, w).to(_target_dtype(x))
    rows = zip(kept_area(boxes, h, w).tolist(), indexes.unbind(0), boxes.tolist(), maps.unbind(0))
    return [
        CutMixParams(lam, index, (top, left, bottom, right), inside)
        for lam, index, (top, left, bottom, right), inside in rows
    ]


def cutmix_apply(x: Tensor, y: Tensor, num_classes: int | None, params: CutMixParams) -> MixedBatch:
    """CutMix's arithmetic with every draw given (``params`` from :func:`cutmix_params`): the box of each image
    from its partner, ``y' = lam * q + (1 - lam) * q[index]``."""
    q = soft_targets(y, num_classes, _target_dtype(x))
    out = paste_box(x, params.index, params.box, params.inside)
    return MixedBatch(out, q.index_select(0, params.index).lerp_(q, params.lam), params.lam, params.index, params.box)


def paste_box(x: Tensor, index: Tensor, box: tuple[int, int, int, int], inside: Tensor | None = None) -> Tensor:
    """A copy of float images ``x`` ``(N, C, H, W)`` whose ``box`` ``(top, left, bottom, right)`` holds ``x[index]``'s.

    ``lerp(x, x[index], inside)`` with ``inside`` the box's 0/1 map ``(H, W)`` (the one :func:`box_mask` gives,
    made unless given): exact, since ``lerp`` gives its ends at weights 0 and 1 (for finite pixels).
    """
    if inside is None:  # one box on the per-batch path (MixupCutmix's batch mode): two kernels, not box_mask's ten
        top, left, bottom, right = box
        inside = torch.zeros(x.shape[-2:], dtype=x.dtype, device=x.device)
        inside.narrow(0, top, bottom - top).narrow(1, left, right - left).fill_(1.0)
    return torch.lerp(x, x.index_select(0, index), inside)


# -- mixup or CutMix, timm semantics ------------------------------------------------------------

#: how :func:`mixup_cutmix_batch` draws: one set of parameters per batch, per pair ``(i, N-1-i)``, per sample
MIX_MODES = ("batch", "pair", "elem")


class MixCutParams(NamedTuple):
    """The draws of :func:`mixup_cutmix_params`, one row per sample (CPU tensors).

    Attributes:
        lam: ``(N,)`` float64, the weight of each sample's own label, equal to the share of its own
            image in the result: mixup's ``lam``, CutMix's kept area ``1 - box_area / (H * W)`` (after
            clipping the box), 1 for a sample left as it is.
        use_cutmix: ``(N,)`` bool, the samples mixed by CutMix (the others by mixup, or not at all).
        boxes: ``(N, 4)`` int64 CutMix boxes ``(top, left, bottom, right)``, end-exclusive; all zero
            (empty) for samples not mixed by CutMix.
        index: ``(N,)`` int64, the partner of each sample: ``N - 1 - i``.
    """

    lam: Tensor
    use_cutmix: Tensor
    boxes: Tensor
    index: Tensor  # type: ignore[assignment]  # shadows tuple.index: the partner of each sample

    @property
    def mixed(self) -> bool:
        """Whether any sample is changed (some ``lam < 1``); decided on the host, no device sync."""
        return bool((self.lam < 1.0).any())


class MixCutBatch(NamedTuple):
    """The result of :func:`mixup_cutmix_batch`.

    Attributes:
        x: the mixed inputs (the input tensor itself when no sample is mixed).
        y: soft targets ``(N, num_classes)``, label smoothing folded in.
        params: the draws used (:class:`MixCutParams`): ``params.lam`` is each sample's label weight.
    """

    x: Tensor
    y: Tensor
    params: MixCutParams


def check_mixup_cutmix(
    mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float, mode: str, label_smoothing: float
) -> None:
    """Raise a one-line ``ValueError`` naming the first bad argument of :func:`mixup_cutmix_batch`."""
    check_float("mixup_alpha", mixup_alpha, 0.0, math.inf, high_open=True)  # 0 turns mixup off
    check_float("cutmix_alpha", cutmix_alpha, 0.0, math.inf, high_open=True)
    if mixup_alpha == 0 and cutmix_alpha == 0:
        raise ValueError("mixup_alpha and cutmix_alpha are both 0, so nothing is mixed; set one of them > 0")
    check_float("prob", prob, 0.0, 1.0)
    check_float("switch_prob", switch_prob, 0.0, 1.0)
    check_choice("mode", mode, MIX_MODES)
    check_float("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)


def sample_beta_n(alpha: float, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` draws of ``Beta(alpha, alpha)`` (float64, CPU), each as ``G1 / (G1 + G2)`` with ``Gi ~ Gamma(alpha)``.

    For a tiny ``alpha`` both gamma draws can underflow to zero; then the limit distribution (0 or 1 with
    probability 1/2) is used.

    Example:
        >>> lam = sample_beta_n(1.0, 3, torch.Generator().manual_seed(0))
        >>> lam.shape, bool(((0 <= lam) & (lam <= 1)).all())
        (torch.Size([3]), True)
    """
    _check_alpha(alpha)
    gammas = torch._standard_gamma(torch.full((2, n), float(alpha), dtype=torch.float64), generator=generator)
    total = gammas.sum(dim=0)
    lam = gammas[0] / total
    zero = total == 0  # both gamma draws underflowed (tiny alpha): the limit, 0 or 1 with probability 1/2
    if bool(zero.any()):
        coin = torch.randint(0, 2, (n,), generator=generator).to(torch.float64)
        lam = torch.where(zero, coin, lam)
    return lam


def _partner_of(n: int) -> Tensor:
    return torch.arange(n - 1, -1, -1)


def mixup_cutmix_params(
    n: int,
    image_size: tuple[int, int] | None,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    mode: str = "batch",
    generator: torch.Generator | None = None,
) -> MixCutParams:
    """Draw the mixing of a batch of ``n`` samples, as ``timm.data.Mixup`` decides it.

    A *slot* is the whole batch (``mode="batch"``), a pair ``(i, N-1-i)`` for ``i < N // 2``
    (``"pair"``) or one sample (``"elem"``). For every slot, in this order and from ``generator``:
    ``apply = U < prob``; ``cutmix = U < switch_prob`` when both alphas are > 0 (else the one that is
    > 0); ``lam ~ Beta(alpha, alpha)`` of the chosen method; a box center uniform over the image (when
    ``cutmix_alpha > 0``). A CutMix box has sides ``int(sqrt(1 - lam) * (H, W))`` around its center
    (as :func:`cutmix_box`), is clipped at the border, and ``lam`` becomes its kept area
    ``1 - box_area / (H * W)``. A slot that does not apply has ``lam = 1`` (``prob = 0`` draws nothing).
    Both samples of a pair share their slot's ``lam`` and box; with an odd ``N`` in pair mode the middle
    sample is left as it is.

    Args:
        n: batch size.
        image_size: ``(H, W)``; may be ``None`` only when ``cutmix_alpha == 0``.
        mixup_alpha, cutmix_alpha: Beta concentrations, >= 0; 0 turns that method off.
        prob: probability that a slot is mixed, in [0, 1].
        switch_prob: probability of CutMix rather than mixup when both are on, in [0, 1].
        mode: ``"batch"``, ``"pair"`` or ``"elem"``.
        generator: the source of every draw (CPU).

    Example:
        >>> p = mixup_cutmix_params(4, (8, 8), mixup_alpha=1.0, cutmix_alpha=0.0, mode="pair",
        ...                         generator=torch.Generator().manual_seed(0))
        >>> p.index.tolist(), bool(p.lam[0] == p.lam[3]), bool(p.lam[1] == p.lam[2])
        ([3, 2, 1, 0], True, True)
    """
    check_mixup_cutmix(mixup_alpha, cutmix_alpha, prob, switch_prob, mode, 0.0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if cutmix_alpha > 0 and image_size is None:
        raise ValueError("cutmix needs the image size (H, W), got image_size=None")
    f64 = torch.float64
    if prob == 0.0:  # no slot applies: nothing to draw
        return MixCutParams(
            torch.ones(n, dtype=f64),
            torch.zeros(n, dtype=torch.bool),
            torch.zeros((n, 4), dtype=torch.long),
            _partner_of(n),
        )
    slots = 1 if mode == "batch" else n if mode == "elem" else n // 2
    apply = torch.rand(slots, generator=generator, dtype=f64) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        cut = torch.rand(slots, generator=generator, dtype=f64) < switch_prob
    else:
        cut = torch.full((slots,), cutmix_alpha > 0, dtype=torch.bool)
    lam_mix = sample_beta_n(mixup_alpha, slots, generator) if mixup_alpha > 0 else torch.ones(slots, dtype=f64)
    lam_cut = sample_beta_n(cutmix_alpha, slots, generator) if cutmix_alpha > 0 else torch.ones(slots, dtype=f64)
    lam = torch.where(apply, torch.where(cut, lam_cut, lam_mix), torch.ones((), dtype=f64))
    cut = cut & apply
    boxes = torch.zeros((slots, 4), dtype=torch.long)
    if cutmix_alpha > 0:
        assert image_size is not None
        h, w = (int(s) for s in image_size)
        boxes = torch.where(cut[:, None], cutmix_boxes(lam, h, w, box_centers(slots, h, w, generator)), boxes)
        lam = torch.where(cut, kept_area(boxes, h, w), lam)
    # slot of each sample; the extra last slot leaves a sample as it is (the middle one of an odd pair batch)
    lam = torch.cat([lam, torch.ones(1, dtype=f64)])
    cut = torch.cat([cut, torch.zeros(1, dtype=torch.bool)])
    boxes = torch.cat([boxes, torch.zeros((1, 4), dtype=torch.long)])
    if mode == "batch":
        slot_of = torch.zeros(n, dtype=torch.long)
    elif mode == "elem":
        slot_of = torch.arange(n)
    else:
        first = torch.arange(n // 2)
        middle = torch.full((n % 2,), slots, dtype=torch.long)
        slot_of = torch.cat([first, middle, first.flip(0)])
    return MixCutParams(lam[slot_of], cut[slot_of], boxes[slot_of], _partner_of(n))


def mixup_cutmix_batch(
    x: Tensor,
    y: Tensor,
    num_classes: int | None = None,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    mode: str = "batch",
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
    params: MixCutParams | None = None,
) -> MixCutBatch:
    """Mixup or CutMix per batch, pair or sample, with ``timm.data.Mixup``'s semantics.

    The draws are :func:`mixup_cutmix_params` (or given as ``params``); sample ``i`` is mixed with
    sample ``j = N - 1 - i``. Mixup: ``x'_i = lam_i x_i + (1 - lam_i) x_j``; CutMix: ``x'_i`` is ``x_i``
    with the box's pixels taken from ``x_j``. Labels:
    ``y'_i = lam_i s(q_i) + (1 - lam_i) s(q_j)`` with ``q`` the one-hot (or given soft) targets and
    ``s(q) = (1 - eps) q + eps / C`` the label smoothing folded in (timm's ``on = 1 - eps + eps / C``,
    ``off = eps / C``). So each sample's label weight equals the share of its own image in ``x'_i``.
    One weighted ``lerp`` for the batch: no per-sample Python loop. Zhang et al. 2018 (arXiv:1710.09412),
    Yun et al. 2019 (arXiv:1905.04899); timm's ``Mixup`` (Wightman 2019) for the batch/pair/elem modes.

    Args:
        x: inputs ``(N, C, H, W)``, floating point (any ``(N, ...)`` when ``cutmix_alpha == 0``).
        y: class indices ``(N,)`` or soft targets ``(N, C)``.
        num_classes: needed when ``y`` holds class indices.
        mixup_alpha, cutmix_alpha, prob, switch_prob, mode: see :func:`mixup_cutmix_params`.
        label_smoothing: ``eps`` in [0, 1), folded into the targets (then the loss must not smooth again).
        generator: the source of the draws (CPU).
        params: fixed draws instead (``len == N``).

    Example:
        >>> x, y = torch.arange(4.0).view(2, 2), torch.tensor([0, 1])
        >>> out = mixup_cutmix_batch(x, y, 2, mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.2,
        ...                          params=MixCutParams(torch.tensor([0.75, 0.75], dtype=torch.float64),
        ...                              torch.zeros(2, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.long),
        ...                              torch.tensor([1, 0])))
        >>> out.x.tolist(), [[round(v, 4) for v in row] for row in out.y.tolist()]
        ([[0.5, 1.5], [1.5, 2.5]], [[0.7, 0.3], [0.3, 0.7]])
    """
    check_mixup_cutmix(mixup_alpha, cutmix_alpha, prob, switch_prob, mode, label_smoothing)
    _check_batch(x, y)
    if not x.dtype.is_floating_point:
        raise ValueError(f"mixup/cutmix needs floating point inputs, got dtype {x.dtype}")
    n = x.shape[0]
    if cutmix_alpha > 0 and x.ndim != 4:
        raise ValueError(f"cutmix needs images (N, C, H, W), got shape {tuple(x.shape)}; or set cutmix_alpha=0")
    if params is None:
        size = (x.shape[-2], x.shape[-1]) if x.ndim == 4 else None
        params = mixup_cutmix_params(n, size, mixup_alpha, cutmix_alpha, prob, switch_prob, mode, generator)
    if params.lam.shape != (n,):
        raise ValueError(f"params are for {params.lam.shape[0]} samples, the batch has {n}")
    q = soft_targets(y, num_classes, _target_dtype(x))
    if label_smoothing:
        q = q * (1.0 - label_smoothing) + label_smoothing / q.shape[1]
    if not params.mixed:
        return MixCutBatch(x, q, params)
    device = x.device
    idx = params.index.to(device, non_blocking=True)
    lam = params.lam.to(device, non_blocking=True)
    view = (n,) + (1,) * (x.ndim - 1)
    if bool(params.use_cutmix.all()) and bool((params.boxes == params.boxes[0]).all()):
        top, left, bottom, right = params.boxes[0].tolist()  # one box for every sample (batch mode)
        x_out = paste_box(x, idx, (top, left, bottom, right))
    elif bool(params.use_cutmix.any()):
        in_box = box_mask(params.boxes.to(device, non_blocking=True), x.shape[-2], x.shape[-1])  # (N, H, W)
        own = torch.where(params.use_cutmix.to(device, non_blocking=True), torch.ones_like(lam), lam)
        # CutMix samples: weight 1 outside the box, 0 inside; mixup samples: lam everywhere
        weight = torch.where(in_box, torch.zeros((), dtype=x.dtype, device=device), own.to(x.dtype)[:, None, None])
        # lerp(a, b, w) is exactly b at w = 1 and exactly a at w = 0: pasted pixels are the partner's own values
        x_out = torch.lerp(x.index_select(0, idx), x, weight[:, None])
    else:
        x_out = torch.lerp(x.index_select(0, idx), x, lam.to(x.dtype).view(view))
    y_out = torch.lerp(q.index_select(0, idx), q, lam.to(q.dtype)[:, None])
    return MixCutBatch(x_out, y_out, params)


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
    check_int("count", count, 1)
    if centers is None:
        centers = cutout_centers(x, count, generator)
    out = cutout_images(x, size, centers, value)
    n, _, h, w = x.shape
    return out, cutout_boxes(n, count, cutout_size(size, h, w), h, w, centers=centers)


def cutout_centers(x: Tensor, count: int, generator: torch.Generator | None = None, batches: int = 1) -> Tensor:
    """The ``(batches * N, count, 2)`` (row, col) square centers :func:`cutout_batch` draws for ``batches``
    batches of images shaped as ``x``: rows, then columns, uniform over the image, from ``generator``."""
    if x.ndim != 4:
        raise ValueError(f"cutout needs images (N, C, H, W), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (batches * n, count), generator=generator)
    cx = torch.randint(0, w, (batches * n, count), generator=generator)
    return torch.stack([cy, cx], dim=-1)


def cutout_images(x: Tensor, size: int | float, centers: Tensor, value: float = 0.0) -> Tensor:
    """The images of :func:`cutout_batch` without its boxes (what a training step needs): squares of side
    ``size`` at ``centers`` ``(N, count, 2)`` set to ``value``; :func:`cutout_fill` of :func:`cutout_windows`.

    Example:
        >>> int(cutout_images(torch.ones(1, 1, 4, 4), 2, torch.tensor([[[0, 0]]])).sum())
        15
    """
    return cutout_fill(x, cutout_windows(x, size, centers), value)


def cutout_windows(x: Tensor, size: int | float, centers: Tensor) -> tuple[Tensor, Tensor]:
    """``(in_rows, in_cols)``, ``(N, count, H)`` and ``(N, count, W)`` 0/1 in ``x``'s float dtype on its device: the
    rows and the columns each square at ``centers`` ``(N, count, 2)`` covers in images shaped as ``x``
    ``(N, C, H, W)``, clipped as :func:`cutout_boxes` clips."""
    if x.ndim != 4:
        raise ValueError(f"cutout needs images (N, C, H, W), got shape {tuple(x.shape)}")
    height, width, dtype, device = x.shape[-2], x.shape[-1], _target_dtype(x), x.device
    side = cutout_size(size, height, width)
    n, count = centers.shape[:2]
    cy, cx = centers.to(device).reshape(n * count, 2).long().unbind(1)
    in_rows = _windows(side, height, device, dtype).index_select(0, cy).view(n, count, height)
    return in_rows, _windows(side, width, device, dtype).index_select(0, cx).view(n, count, width)


def cutout_fill(x: Tensor, windows: tuple[Tensor, Tensor], value: float = 0.0) -> Tensor:
    """Images ``x`` ``(N, C, H, W)`` with the squares of ``windows`` (:func:`cutout_windows`) set to ``value``.

    One ``lerp(x, value, cut)`` with ``cut`` the 0/1 squares (float: it runs vectorized where a boolean
    ``where`` over a broadcast mask does not): exactly ``x`` outside the squares and ``value`` inside for
    finite pixels.
    """
    in_rows, in_cols = windows
    n, count, h = in_rows.shape
    cut = in_rows.view(n, count, h, 1) * in_cols.view(n, count, 1, in_cols.shape[-1])
    if count > 1:
        cut = cut.amax(dim=1, keepdim=True)
    return torch.lerp(x if x.dtype == cut.dtype else x.to(cut.dtype), _scalar(float(value), cut.dtype, x.device), cut)


@functools.lru_cache(maxsize=16)
def _windows(side: int, length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(length, length)`` 0/1: row ``c`` is 1 on ``[c - side // 2, c - side // 2 + side)``, clipped to the
    image."""
    pos = torch.arange(length, device=device)
    start = pos[:, None] - side // 2
    return ((pos[None, :] >= start) & (pos[None, :] < start + side)).to(dtype)


@functools.lru_cache(maxsize=16)
def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.full((), value, dtype=dtype, device=device)


def box_mask(boxes: Tensor, height: int, width: int) -> Tensor:
    """``(..., H, W)`` bool: set inside each box ``(top, left, bottom, right)`` (end-exclusive) of ``(..., 4)``.

    Example:
        >>> box_mask(torch.tensor([[0, 1, 2, 3]]), 3, 4).int().tolist()
        [[[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]]
    """
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    in_rows = (rows >= boxes[..., 0, None]) & (rows < boxes[..., 2, None])  # (..., H)
    in_cols = (cols >= boxes[..., 1, None]) & (cols < boxes[..., 3, None])  # (..., W)
    return in_rows[..., :, None] & in_cols[..., None, :]


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


# -- test-time augmentation ---------------------------------------------------------------------

#: the views :func:`tta_predict` averages over (see :func:`tta_views`)
TTA_MODES = ("none", "flip", "crop", "flip_crop")


def check_tta(mode: str, flip_keeps_class: bool = True, data: str = "the data") -> str:
    """``mode`` if it is one of :data:`TTA_MODES` and allowed for the data, else a one-line ``ValueError``.

    A mode with a horizontal flip is refused when ``flip_keeps_class`` is False (the data module's
    ``flip`` attribute: mirror images change the class, as for digits).
    """
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {mode!r}")
    if "flip" in mode and not flip_keeps_class:
        raise ValueError(
            f"tta={mode!r} averages over horizontally flipped images, but {data} has flip=False "
            "(a mirror image can change the class); use tta='none' or tta='crop'"
        )
    return mode


def tta_views(x: Tensor, mode: str, padding: int = 2) -> list[Tensor]:
    """The views of a batch of images ``(N, C, H, W)`` that test-time augmentation averages over.

    - ``"none"``: ``[x]``;
    - ``"flip"``: ``[x, flip(x)]`` (horizontal flip, the last dimension);
    - ``"crop"``: ``x`` and its 4 crops shifted by ``(±padding, ±padding)`` pixels (zero padding, as
      :func:`random_crop_flip` with the corner offsets), 5 views;
    - ``"flip_crop"``: the 5 crops and their flips, 10 views (Krizhevsky et al. 2012's ten crops, as
      shifts of the padded image).

    Example:
        >>> x = torch.arange(4.0).view(1, 1, 2, 2)
        >>> [v.flatten().tolist() for v in tta_views(x, "flip")]
        [[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 3.0, 2.0]]
    """
    check_tta(mode)
    if mode == "none":
        return [x]
    if x.ndim != 4:
        raise ValueError(f"tta={mode!r} needs images (N, C, H, W), got shape {tuple(x.shape)}")
    views = [x]
    if "crop" in mode:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 1:
            raise ValueError(f"padding must be an int >= 1 for crops, got {padding!r}")
        n = x.shape[0]
        no_flip = torch.zeros(n, dtype=torch.bool, device=x.device)
        for dy, dx in ((0, 0), (0, 2 * padding), (2 * padding, 0), (2 * padding, 2 * padding)):
            offsets = torch.tensor([dy, dx], device=x.device).expand(n, 2)
            views.append(random_crop_flip(x, padding, offsets=offsets, flips=no_flip))
    if "flip" in mode:
        views += [v.flip(-1) for v in views]
    return views


def tta_predict(model_fn: Callable[[Tensor], Tensor], x: Tensor, mode: str = "none", padding: int = 2) -> Tensor:
    """Class probabilities with test-time augmentation: the mean of ``softmax(model_fn(view))`` over the views.

    ``p(y | x) = (1 / V) * sum_v softmax(f(view_v(x)))`` over the :func:`tta_views` of ``mode``, in
    float32; ``mode="none"`` is ``softmax(f(x))``. One forward per view (memory stays one batch).
    Flip views suit data whose classes survive a mirror image (CIFAR-10, Fashion-MNIST), not digits.

    Args:
        model_fn: inputs -> logits ``(N, classes)``, in eval mode.
        x: the batch (images ``(N, C, H, W)`` unless ``mode="none"``).
        mode: one of :data:`TTA_MODES`.
        padding: the shift of the crops, in pixels.

    Example:
        >>> f = lambda v: v.flatten(1)[:, :2]   # logits = the first two pixels
        >>> x = torch.tensor([[[[0.0, 2.0]]]])
        >>> tta_predict(f, x, "flip").tolist() == ((f(x).softmax(-1) + f(x.flip(-1)).softmax(-1)) / 2).tolist()
        True
    """
    views = tta_views(x, mode, padding)
    total = model_fn(views[0]).float().softmax(dim=-1)
    for view in views[1:]:
        total = total + model_fn(view).float().softmax(dim=-1)
    return total / len(views) if len(views) > 1 else total


# ------------------------------------------------------------------------------------------------
# what the batch callbacks decide without a Trainer: seeds, epochs on, batch entries
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def rank_seed(seed: int, rank: int) -> int:
    """``SeedSequence([seed, rank])``'s first word: batch ``count`` draws from the seed ``rank_seed + count``
    (mod 2**64), numbers every rank knows, so a checkpoint (rank zero's) resumes every rank's draws.

    Example:
        >>> rank_seed(0, 0) == rank_seed(0, 0) != rank_seed(0, 1)
        True
    """
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0])


def check_batch_keys(input_key: Any, target_key: Any) -> None:
    """``ValueError`` unless both are list positions (int) or dict keys (str), and differ."""
    for what, key in (("input_key", input_key), ("target_key", target_key)):
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise ValueError(f"{what} must be an int (list position) or a str (dict key), got {key!r}")
    if input_key == target_key:
        raise ValueError(f"input_key and target_key must differ, got {input_key!r} for both")


def active_in(epoch: int, max_epochs: int | None, until_epoch: int | None, off_last_epochs: int) -> bool:
    """Whether an augmentation is on in ``epoch`` (0-based): before ``until_epoch`` and the last ``off_last_epochs``.

    Example:
        >>> [active_in(e, 10, None, 2) for e in (7, 8)]
        [True, False]
    """
    if until_epoch is not None and epoch >= until_epoch:
        return False
    return not (off_last_epochs and max_epochs is not None and epoch >= max_epochs - off_last_epochs)


def read_batch(batch: Any, input_key: int | str, target_key: int | str, name: str, needs_y: bool) -> tuple[Tensor, Any]:
    """``(batch[input_key], batch[target_key] or None)``; ``TypeError`` naming ``name`` and the fix otherwise."""
    if not isinstance(batch, (list, MutableMapping)):
        raise TypeError(
            f"{name} replaces tensors inside the batch, so the batch must be a list or a dict; got a "
            f"{type(batch).__name__}. Make the train loader (or on_after_batch_transfer) return a list, or "
            "call lightning_tricks.augment's functions in training_step"
        )
    try:
        x = batch[input_key]  # type: ignore[index]
        y = batch[target_key] if needs_y else None  # type: ignore[index]
    except (IndexError, KeyError) as err:
        raise TypeError(
            f"{name}: the batch has no entry {err} (input_key={input_key!r}, target_key={target_key!r})"
        ) from None
    if not isinstance(x, Tensor) or (needs_y and not isinstance(y, Tensor)):
        raise TypeError(f"{name}: batch[{input_key!r}] and batch[{target_key!r}] must be tensors")
    return x, y
