"""Mixup, CutMix, MixupCutmix and Cutout as callbacks over :mod:`lightning_tricks.augment`.

How they draw, stack and resume: ``docs/method_cards.md``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_tricks._lightning import (
    Callback,
    LightningModule,
    Trainer,
    rank_zero_info,
    rank_zero_warn,
    trainer_datamodule,
)
from lightning_tricks.augment import (
    CutMixParams,
    MixCutParams,
    MixedTargets,
    active_in,
    check_batch_keys,
    check_mixup_cutmix,
    cutmix_apply,
    cutmix_draws,
    cutout_centers,
    cutout_fill,
    cutout_size,
    cutout_windows,
    mixup_apply,
    mixup_cutmix_batch,
    mixup_cutmix_params,
    mixup_draws,
    rank_seed,
    read_batch,
)
from lightning_tricks.callbacks._common import MemoStateKey, check_float, check_int

__all__ = ["BatchAugment", "Mixup", "CutMix", "MixupCutmix", "Cutout", "ORDER", "rank_seed"]

#: the order stacked augmentations act in, whatever the list order: occlude the clean images, then mix labels
ORDER = ("Cutout", "Mixup", "CutMix", "MixupCutmix")

#: training batches whose draws are made together, from one seed: a draw's kernels run cold right after a
#: training step (tens of µs each on a CPU) and warm in a loop
BLOCK = 64


def _place(augment: BatchAugment) -> int:  # the position of its class (or first listed base) in ORDER
    return next((ORDER.index(k.__name__) for k in type(augment).__mro__ if k.__name__ in ORDER), len(ORDER))


class BatchAugment(MemoStateKey, Callback):
    """The wiring shared by the batch augmentations: when to act, the draws, the batch; a subclass gives
    :meth:`draw` and :meth:`transform` (calls of the core) and ``mixes_labels`` (it replaces the targets)."""

    mixes_labels = True

    def __init__(
        self,
        p: float = 1.0,
        until_epoch: int | None = None,
        off_last_epochs: int = 0,
        seed: int | None = None,
        input_key: int | str = 0,
        target_key: int | str = 1,
    ) -> None:
        check_float("p", p, 0.0, 1.0, low_open=True)
        check_int("until_epoch", until_epoch, 1, allow_none=True)
        check_int("off_last_epochs", off_last_epochs, 0)
        check_int("seed", seed, 0, allow_none=True)
        check_batch_keys(input_key, target_key)
        self.p = float(p)
        self.until_epoch = until_epoch
        self.off_last_epochs = off_last_epochs
        self.seed = seed
        self.input_key = input_key
        self.target_key = target_key
        self.batches = 0  # training batches seen: with the seed and the rank, what each batch draws from
        self._seed = seed
        self._rank = 0
        self._generator = torch.Generator()
        self._block_key: tuple[int, int, int] | None = None  # (seed, rank, block) of the draws in _blocks
        self._blocks: dict[tuple[Any, ...], list[Any]] = {}  # a block's draws per input shape, dtype and device
        self._classes: int | None = None
        self._stack: list[BatchAugment] | None = None  # what this callback's hook applies (None: itself)
        self._announced_off = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._key_args())

    def _key_args(self) -> dict[str, Any]:
        return {"p": self.p}

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self._seed, "batches": self.batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches = int(state_dict.get("batches", 0))
        if state_dict.get("seed") is not None:
            self._seed = int(state_dict["seed"])

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        listed = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, BatchAugment)] or [self]
        mixers = [type(c).__name__ for c in sorted(listed, key=_place, reverse=True) if c.mixes_labels]
        if len(mixers) > 1:
            raise ValueError(
                f"{' and '.join(mixers)} both mix the labels, so every batch would be mixed twice; use one "
                "MixupCutmix(mixup_alpha=..., cutmix_alpha=..., switch_prob=...) instead, which picks mixup or "
                "CutMix per batch, pair or sample (timm's Mixup)"
            )
        # Lightning gives callbacks one hook before training_step, called in list order: the first
        # augmentation in the list applies the whole stack in ORDER, so the list order does not matter
        self._stack = sorted(listed, key=_place) if listed[0] is self else []
        if self._seed is None:
            self._seed = int(torch.initial_seed())
        self._rank = int(trainer.global_rank)
        if self._classes is None:
            found = getattr(pl_module, "num_classes", None) or getattr(trainer_datamodule(trainer), "num_classes", None)
            self._classes = int(found) if found is not None else None
        name, last, max_epochs = type(self).__name__, self.off_last_epochs, trainer.max_epochs
        if last and (max_epochs is None or max_epochs < 0):
            raise ValueError(
                f"{name}(off_last_epochs={last}) needs Trainer(max_epochs=...), got max_epochs={max_epochs!r}"
            )
        if last and max_epochs is not None and last >= max_epochs:
            rank_zero_warn(f"{name}: off_last_epochs={last} >= max_epochs={max_epochs}, so it never acts")
        self._setup(trainer, pl_module)

    def _setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Subclass checks that need the Trainer."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        for augment in [self] if self._stack is None else self._stack:
            augment.augment(trainer, batch)

    def active(self, epoch: int, max_epochs: int | None) -> bool:
        """Whether the augmentation is on in ``epoch`` (0-based)."""
        return active_in(epoch, max_epochs, self.until_epoch, self.off_last_epochs)

    def augment(self, trainer: Trainer, batch: Any) -> None:
        """Augment ``batch`` in place with the draws of training batch ``self.batches`` (see :meth:`draws_of`)."""
        count = self.batches
        self.batches += 1
        on = self.active(trainer.current_epoch, trainer.max_epochs)
        if not on and not self._announced_off:
            rank_zero_info(f"{type(self).__name__} is off from epoch {trainer.current_epoch}")
            self._announced_off = True
        if not on and not self._acts_when_off():
            return
        x, y = read_batch(batch, self.input_key, self.target_key, type(self).__name__, self.mixes_labels)
        draws = self.draws_of(count, x)
        if draws is None:  # not applied to this batch (p)
            return
        new_x, new_y = self.transform(x, y, draws, on)
        if new_x is not x:
            batch[self.input_key] = new_x
        if new_y is not y:
            batch[self.target_key] = MixedTargets.wrap(new_y, y, type(self).__name__)

    def draws_of(self, count: int, x: Tensor) -> Any:
        """The draws of training batch ``count`` (``None``: not applied): row ``count % BLOCK`` of block
        ``count // BLOCK``, drawn from the seed ``rank_seed(seed, rank) + block``: ``BLOCK`` uniforms for
        ``U < p`` (when ``p < 1``), then :meth:`draw` for ``BLOCK`` batches; made once per input shape, dtype
        and device."""
        block, row = divmod(count, BLOCK)
        key = (self._seed or 0, self._rank, block)
        if key != self._block_key:
            self._block_key, self._blocks = key, {}
        like = (x.shape, x.dtype, x.device)  # draws can hold tensors made for the inputs (Cutout's squares)
        draws = self._blocks.get(like)
        if draws is None:
            generator = self._generator.manual_seed((rank_seed(key[0], key[1]) + block) % 2**64)
            applied = [True] * BLOCK
            if self.p < 1.0:
                applied = (torch.rand(BLOCK, generator=generator, dtype=torch.float64) < self.p).tolist()
            drawn = self.draw(x, BLOCK, generator)
            draws = self._blocks[like] = [d if a else None for d, a in zip(drawn, applied)]
        return draws[row]

    def draw(self, x: Tensor, batches: int, generator: torch.Generator) -> list[Any]:
        """The draws of ``batches`` batches shaped as ``x``, from ``generator`` (a call of the core)."""
        raise NotImplementedError

    def transform(self, x: Tensor, y: Tensor, draws: Any, on: bool) -> tuple[Tensor, Tensor]:
        """The augmented ``(x, y)`` with ``draws`` (from :meth:`draw`); ``on``: False in an epoch off (MixupCutmix)."""
        raise NotImplementedError

    def _acts_when_off(self) -> bool:
        return False

    def _num_classes(self, y: Tensor) -> int | None:
        if self._classes is None and not y.dtype.is_floating_point:
            name = type(self).__name__
            raise ValueError(
                f"{name} needs num_classes to make soft targets from class indices: pass "
                f"{name}(num_classes=...) or give the LightningModule or DataModule a num_classes attribute"
            )
        return self._classes


class _Mix(BatchAugment):
    """Mixup's and CutMix's arguments."""

    def __init__(
        self,
        alpha: float = 1.0,
        p: float = 1.0,
        until_epoch: int | None = None,
        off_last_epochs: int = 0,
        num_classes: int | None = None,
        seed: int | None = None,
        input_key: int | str = 0,
        target_key: int | str = 1,
    ) -> None:
        super().__init__(p, until_epoch, off_last_epochs, seed, input_key, target_key)
        check_float("alpha", alpha, 0.0, float("inf"), low_open=True, high_open=True)
        check_int("num_classes", num_classes, 2, allow_none=True)
        self.alpha = float(alpha)
        self.num_classes = self._classes = num_classes

    def _key_args(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "p": self.p}


class Mixup(_Mix):
    """Mixup on training batches (Zhang et al. 2018, arXiv:1710.09412): :func:`~lightning_tricks.augment.mixup_batch`.

    The targets become soft :class:`~lightning_tricks.augment.MixedTargets` ``(N, C)``.

    Args:
        alpha: Beta concentration, > 0 (the paper: 0.2 on ImageNet, 1.0 on CIFAR-10).
        p: probability of mixing a batch, in (0, 1].
        until_epoch: mix only in epochs ``< until_epoch`` (0-based); ``None`` = always.
        off_last_epochs: do not mix in the last ``off_last_epochs`` epochs of ``max_epochs``.
        num_classes: number of classes; ``None``: the LightningModule's or DataModule's ``num_classes``.
        seed: base seed of the draws; ``None``: ``torch.initial_seed()``.
        input_key, target_key: where ``x`` and ``y`` are in the batch (list positions or dict keys).

    Example:
        >>> cb = Mixup(alpha=0.2, off_last_epochs=2)   # Trainer(callbacks=[cb], max_epochs=10)
        >>> [cb.active(epoch, max_epochs=10) for epoch in (0, 7, 8, 9)]
        [True, True, False, False]
    """

    def draw(self, x: Tensor, batches: int, generator: torch.Generator) -> list[tuple[float, Tensor]]:
        return mixup_draws(x, self.alpha, batches, generator)

    def transform(self, x: Tensor, y: Tensor, draws: tuple[float, Tensor], on: bool) -> tuple[Tensor, Tensor]:
        return mixup_apply(x, y, self._num_classes(y), *draws)[:2]


class CutMix(_Mix):
    """CutMix on training batches (Yun et al. 2019, arXiv:1905.04899): :func:`~lightning_tricks.augment.cutmix_batch`.

    Images ``(N, C, H, W)`` only. Arguments as :class:`Mixup` (the paper uses ``alpha=1``).
    """

    def draw(self, x: Tensor, batches: int, generator: torch.Generator) -> list[CutMixParams]:
        return cutmix_draws(x, self.alpha, batches, generator)

    def transform(self, x: Tensor, y: Tensor, draws: CutMixParams, on: bool) -> tuple[Tensor, Tensor]:
        return cutmix_apply(x, y, self._num_classes(y), draws)[:2]


class MixupCutmix(BatchAugment):
    """Mixup or CutMix on training batches, chosen per batch, pair or sample: timm's ``Mixup`` as a callback.

    :func:`~lightning_tricks.augment.mixup_cutmix_batch`; a module with its own ``label_smoothing > 0``
    is refused (the targets would be smoothed twice).

    Args:
        mixup_alpha: mixup's Beta concentration, >= 0 (0 turns mixup off).
        cutmix_alpha: CutMix's Beta concentration, >= 0 (0 turns CutMix off; images ``(N, C, H, W)``
            are needed when it is > 0). Not both 0.
        prob: probability that a slot is mixed, in [0, 1].
        switch_prob: probability of CutMix instead of mixup when both are on, in [0, 1].
        mode: ``"batch"`` (one ``lam`` and box for the batch), ``"pair"`` or ``"elem"`` (per sample).
        label_smoothing: ``eps`` in [0, 1) folded into the soft targets (it goes on after ``until_epoch``).
        until_epoch: mix only in epochs ``< until_epoch`` (0-based; timm's ``mixup_off_epoch``).
        off_last_epochs, num_classes, seed, input_key, target_key: as :class:`Mixup`.

    Example:
        >>> cb = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", until_epoch=90)
        >>> cb.active(89, max_epochs=100), cb.active(90, max_epochs=100)
        (True, False)
    """

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        label_smoothing: float = 0.0,
        until_epoch: int | None = None,
        off_last_epochs: int = 0,
        num_classes: int | None = None,
        seed: int | None = None,
        input_key: int | str = 0,
        target_key: int | str = 1,
    ) -> None:
        super().__init__(1.0, until_epoch, off_last_epochs, seed, input_key, target_key)
        check_mixup_cutmix(mixup_alpha, cutmix_alpha, prob, switch_prob, mode, label_smoothing)
        check_int("num_classes", num_classes, 2, allow_none=True)
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob, self.mode = float(prob), float(switch_prob), mode
        self.label_smoothing = float(label_smoothing)
        self.num_classes = self._classes = num_classes

    def _key_args(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("mixup_alpha", "cutmix_alpha", "prob", "switch_prob", "mode")}

    def _setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        smoothing = getattr(pl_module, "label_smoothing", 0.0)
        if self.label_smoothing and isinstance(smoothing, (int, float)) and smoothing > 0:
            raise ValueError(
                f"MixupCutmix(label_smoothing={self.label_smoothing}) and the module's label_smoothing={smoothing} "
                "would smooth the targets twice; set one of them to 0 (they give the same targets)"
            )

    def _acts_when_off(self) -> bool:
        return self.label_smoothing > 0  # the smoothing stays after the mixing stops

    def draw(self, x: Tensor, batches: int, generator: torch.Generator) -> list[MixCutParams]:
        if self.cutmix_alpha > 0 and x.ndim != 4:
            raise ValueError(
                f"MixupCutmix(cutmix_alpha={self.cutmix_alpha}) needs images (N, C, H, W), got shape "
                f"{tuple(x.shape)}; or set cutmix_alpha=0"
            )
        size = (x.shape[-2], x.shape[-1]) if x.ndim == 4 else None
        mixing = (self.mixup_alpha, self.cutmix_alpha, self.prob, self.switch_prob, self.mode)
        return [mixup_cutmix_params(x.shape[0], size, *mixing, generator) for _ in range(batches)]

    def transform(self, x: Tensor, y: Tensor, draws: MixCutParams, on: bool) -> tuple[Tensor, Tensor]:
        # off (the smoothing goes on): prob 0 mixes nothing and draws nothing
        mixing = (self.mixup_alpha, self.cutmix_alpha, self.prob if on else 0.0, self.switch_prob, self.mode)
        params = draws if on else None
        out = mixup_cutmix_batch(x, y, self._num_classes(y), *mixing, self.label_smoothing, params=params)
        if not self.label_smoothing and not out.params.mixed:
            return x, y  # nothing mixed: the batch stays exactly as it is
        return out.x, out.y


class Cutout(BatchAugment):
    """Cutout on training batches (DeVries and Taylor 2017, arXiv:1708.04552): ``count`` squares per image
    set to ``value``, by :func:`~lightning_tricks.augment.cutout_batch`; labels are unchanged.

    Args:
        size: side in pixels (int >= 1) or as a fraction of ``min(H, W)`` (float in (0, 1]).
        count: squares per image, >= 1.
        value: fill value (0 is the mean of standardized data).
        p, until_epoch, off_last_epochs, seed, input_key: as :class:`Mixup`.
    """

    mixes_labels = False

    def __init__(
        self,
        size: int | float = 0.5,
        count: int = 1,
        value: float = 0.0,
        p: float = 1.0,
        until_epoch: int | None = None,
        off_last_epochs: int = 0,
        seed: int | None = None,
        input_key: int | str = 0,
        target_key: int | str = 1,
    ) -> None:
        super().__init__(p, until_epoch, off_last_epochs, seed, input_key, target_key)
        check_int("size", size, 1) if isinstance(size, int) else check_float("size", size, 0.0, 1.0, low_open=True)
        check_int("count", count, 1)
        self.size, self.count = size, count
        check_float("value", value)
        self.value = float(value)

    def _key_args(self) -> dict[str, Any]:
        return {"size": self.size, "count": self.count, "p": self.p}

    def _setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        shape = getattr(trainer_datamodule(trainer), "input_shape", None)
        if shape is not None and len(shape) == 3:
            cutout_size(self.size, int(shape[1]), int(shape[2]))  # raises if it does not fit

    def draw(self, x: Tensor, batches: int, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        # the squares' rows and columns, ready to fill: made with the block's draws, not per batch
        rows, cols = cutout_windows(x, self.size, cutout_centers(x, self.count, generator, batches))
        return list(zip(rows.split(x.shape[0]), cols.split(x.shape[0])))

    def transform(self, x: Tensor, y: Tensor, draws: tuple[Tensor, Tensor], on: bool) -> tuple[Tensor, Tensor]:
        return cutout_fill(x, draws, self.value), y
