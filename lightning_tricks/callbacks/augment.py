"""Mixup, CutMix, MixupCutmix and Cutout as callbacks: batch-level augmentation on the device, after transfer.

The math is in :mod:`lightning_tricks.augment`; these classes only decide when to act, draw the
randomness and put the new tensors into the batch.

How the batch is replaced: Lightning calls ``Callback.on_train_batch_start(trainer, module, batch,
batch_idx)`` after the batch is on the device and then passes *the same batch object* to
``training_step``. The callbacks replace the inputs (and, for Mixup/CutMix, the targets, which become
float soft targets ``(N, C)``) inside that object, so it must be mutable: a ``list`` (what
``DataLoader`` with the default collate yields for ``(x, y)`` samples) or a ``dict`` (use
``input_key`` / ``target_key``). A ``tuple`` batch raises a ``TypeError`` at the first batch: the
targets cannot change dtype and shape in place, and writing into the input tensor could corrupt a
dataset that yields views of resident tensors. Nothing is needed in the LightningModule beyond a loss
that takes soft targets: ``F.cross_entropy(logits, y)`` accepts ``(N, C)`` probabilities, and
:func:`lightning_tricks.mixins.classification_loss` (used by ``Classifier``) does too and applies
label smoothing to them. Users whose batches are tuples can call the pure functions
(:func:`~lightning_tricks.augment.mixup_batch`, ...) in their ``training_step`` instead.

They act in training only (the hook is not called in validation, test or predict), with probability
``p`` per batch, and can switch off for good at ``until_epoch`` or for the last ``off_last_epochs``
epochs (Yun et al. and later recipes train the last epochs on clean data).

Randomness: one CPU ``torch.Generator`` per callback, never the global RNG (so they need nothing from
:class:`~lightning_tricks.callbacks.RandomState`). Mixup, CutMix and Cutout make their draws
:data:`DRAW_BLOCK` batches at a time: the draws of batches ``256 b .. 256 b + 255`` come from the generator
seeded with ``numpy.random.SeedSequence([seed, global_rank, b]).generate_state(1, uint64)``, in the order
each ``draw`` method documents, so DDP ranks draw differently, runs are reproducible, and resuming from a
checkpoint continues the same draws: the state is just ``seed`` and the batch count, which are equal on
all ranks (a saved generator state would be rank zero's only, as Lightning saves the checkpoint on rank
zero). A batch then costs no draw kernels and no host-to-device copy: what is left per batch is the tensor
arithmetic (Mixup: two gathers and two ``lerp``; CutMix: the same with a 0/1 box weight; Cutout: one
``lerp`` with 0/1 square weights, made a chunk of batches at a time), which ``benchmarks/overhead.py``
measures against its floor. :class:`MixupCutmix` reseeds its generator per batch with
``SeedSequence([seed, global_rank, batch count])`` (seeds computed :data:`SEED_BLOCK` batches at a time by
a vectorized copy of ``SeedSequence``'s hash, :func:`seed_states`, checked against ``SeedSequence`` itself).
Draws made before this scheme (per-batch seeds for every callback) differ, so a run resumed from an older
checkpoint continues with other, equally distributed draws.

Stacked (e.g. ``Cutout`` and ``Mixup`` in one Trainer), they act in one fixed order whatever the order
of the callback list: Cutout, then the label-mixing one (same class: by ``state_key``). The first of them
in that order applies all of them, each with its own state, in its ``on_train_batch_start``. At most one
label-mixing callback (``Mixup``, ``CutMix``, ``MixupCutmix``) is allowed: two would mix every batch
twice, so ``setup`` refuses them and points to :class:`MixupCutmix`, which picks mixup or CutMix per
batch, pair or sample (timm's ``Mixup``).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, NamedTuple

import numpy as np
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
    check_mixup_cutmix,
    cutmix_box,
    cutout_size,
    cutout_windows,
    mix_pair,
    mixup_cutmix_batch,
    mixup_cutmix_params,
    sample_beta_n,
    soft_targets,
)
from lightning_tricks.callbacks._common import MemoStateKey, check_int

__all__ = ["Mixup", "CutMix", "MixupCutmix", "Cutout", "seed_states"]

#: batches whose generator seeds are computed at once
SEED_BLOCK = 256
#: batches whose random draws (Mixup, CutMix, Cutout) are made at once, from one generator seeded per block
DRAW_BLOCK = 256

_M32 = 0xFFFFFFFF
# numpy.random.SeedSequence's constants (numpy/random/bit_generator.pyx)
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R, _XSHIFT, _POOL_SIZE = 0xCA01F9DD, 0x4973F715, 16, 4


def _uint32_words(n: int) -> list[int]:
    """An int >= 0 as SeedSequence's entropy words: little-endian 32-bit chunks, ``[0]`` for 0."""
    if n == 0:
        return [0]
    words = []
    while n > 0:
        words.append(n & _M32)
        n >>= 32
    return words


def seed_states(seed: int, rank: int, counts: np.ndarray) -> np.ndarray:
    """``SeedSequence([seed, rank, c]).generate_state(1, np.uint64)[0]`` for every ``c`` in ``counts``, at once.

    A vectorized transcription of ``numpy.random.SeedSequence`` (pool size 4, no spawn key): entropy
    mixing with ``hashmix`` / ``mix``, then two 32-bit output words joined little-endian. Every ``c``
    must be below ``2**32`` (one entropy word). Exact: the tests compare it with ``SeedSequence``.

    Example:
        >>> int(seed_states(7, 0, np.array([5]))[0]) == int(
        ...     np.random.SeedSequence([7, 0, 5]).generate_state(1, dtype=np.uint64)[0])
        True
    """
    c = np.asarray(counts, dtype=np.uint64)
    if c.size and int(c.max()) > _M32:
        raise ValueError("seed_states needs counts below 2**32")
    n = c.shape[0]
    m32, shift = np.uint64(_M32), np.uint64(_XSHIFT)
    entropy = [np.full(n, w, dtype=np.uint64) for w in _uint32_words(seed) + _uint32_words(rank)] + [c]
    hash_const = _INIT_A

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal hash_const
        value = value ^ np.uint64(hash_const)
        hash_const = (hash_const * _MULT_A) & _M32
        value = (value * np.uint64(hash_const)) & m32
        return value ^ (value >> shift)

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:  # uint64 wraps; only the low 32 bits are kept
        r = (np.uint64(_MIX_MULT_L) * x - np.uint64(_MIX_MULT_R) * y) & m32
        return r ^ (r >> shift)

    zero = np.zeros(n, dtype=np.uint64)
    mixer = [hashmix(entropy[i] if i < len(entropy) else zero) for i in range(_POOL_SIZE)]
    for src in range(_POOL_SIZE):
        for dst in range(_POOL_SIZE):
            if src != dst:
                mixer[dst] = mix(mixer[dst], hashmix(mixer[src]))
    for src in range(_POOL_SIZE, len(entropy)):
        for dst in range(_POOL_SIZE):
            mixer[dst] = mix(mixer[dst], hashmix(entropy[src]))
    hash_const = _INIT_B
    words = []
    for i in range(2):
        value = mixer[i % _POOL_SIZE] ^ np.uint64(hash_const)
        hash_const = (hash_const * _MULT_B) & _M32
        value = (value * np.uint64(hash_const)) & m32
        words.append(value ^ (value >> shift))
    return words[0] | (words[1] << np.uint64(32))


def _reference_state(seed: int, rank: int, count: int) -> int:
    return int(np.random.SeedSequence([seed, rank, count]).generate_state(1, dtype=np.uint64)[0])


def _check_alpha(alpha: Any) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")


class _MixDraws(NamedTuple):
    """The draws of a block of :data:`DRAW_BLOCK` batches for Mixup / CutMix (one entry per batch)."""

    u: list[float]  # the p decisions
    lam: list[float]  # Beta(alpha, alpha)
    partners: list[Tensor]  # partner permutations (N,), on the batch's device
    boxes: list[tuple[int, int, int, int]] | None  # CutMix boxes (top, left, bottom, right), clipped
    kept: list[float] | None  # CutMix: the area outside the box, the label weight of the batch's own targets
    masks: list[Tensor | None]  # CutMix: the box as 0/1 weights (1, 1, H, W), made a chunk at a time


class _CutoutDraws(NamedTuple):
    """The draws of a block of :data:`DRAW_BLOCK` batches for Cutout."""

    u: list[float]  # the p decisions
    rows: Tensor  # square center rows (DRAW_BLOCK, N, count), on the batch's device
    cols: Tensor  # square center columns (DRAW_BLOCK, N, count)
    row_windows: Tensor  # cutout_windows(side, H) as 0/1 weights of the batch's dtype
    col_windows: Tensor  # cutout_windows(side, W)
    fill: Tensor  # the fill value, 0-dim, in the batch's dtype and on its device
    masks: list[Tensor | None]  # the squares as 0/1 weights (N, 1, H, W), made a chunk at a time


#: bytes of 0/1 weight masks (CutMix boxes, Cutout squares) made at once, a chunk of a block's batches
MASK_CHUNK_BYTES = 4 << 20


def _mask(masks: list[Tensor | None], i: int, per_batch_bytes: int, make: Any) -> Tensor:
    """``masks[i]``, making it first with the rest of its chunk: ``make(start, stop)`` returns the masks of
    batches ``start .. stop - 1`` stacked, in one set of kernels for the whole chunk."""
    mask = masks[i]
    if mask is None:
        chunk = max(1, min(DRAW_BLOCK, MASK_CHUNK_BYTES // max(1, per_batch_bytes)))
        start = i - i % chunk
        stop = min(start + chunk, DRAW_BLOCK)
        masks[start:stop] = list(make(start, stop).unbind(0))
        mask = masks[i]
        assert mask is not None
    return mask


# the fixed order of stacked batch augmentations (by ``name``): occlusion first, then the label-mixing ones
_ORDER = ("cutout", "mixup_cutmix", "cutmix", "mixup")


class _BatchAugment(MemoStateKey, Callback):
    """Shared wiring: when to act, the per-batch generator, putting tensors back into the batch."""

    name = "augment"
    changes_targets = True

    def __init__(
        self,
        p: float = 1.0,
        until_epoch: int | None = None,
        off_last_epochs: int = 0,
        seed: int | None = None,
        input_key: int | str = 0,
        target_key: int | str = 1,
    ) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"p must be in (0, 1], got {p!r}")
        check_int("until_epoch", until_epoch, 1, allow_none=True)
        check_int("off_last_epochs", off_last_epochs, 0)
        check_int("seed", seed, 0, allow_none=True)
        for what, key in (("input_key", input_key), ("target_key", target_key)):
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise ValueError(f"{what} must be an int (list position) or a str (dict key), got {key!r}")
        if input_key == target_key:
            raise ValueError(f"input_key and target_key must differ, got {input_key!r} for both")
        self.p = float(p)
        self.until_epoch = until_epoch
        self.off_last_epochs = off_last_epochs
        self.seed = seed
        self.input_key = input_key
        self.target_key = target_key
        self.batches = 0  # training batches seen (the per-batch seed)
        self._resolved_seed: int | None = seed
        self._rank = 0
        self._generator = torch.Generator()
        self._states: list[int] = []  # generator seeds of batches _states_from, _states_from + 1, ...
        self._states_from = 0
        self._states_key: tuple[int, int] | None = None  # (seed, rank) the block was computed for
        self._fast_seeds = True  # False if seed_states ever disagreed with SeedSequence (then: SeedSequence)
        self._announced_off = False
        self._peers: list[_BatchAugment] | None = None  # set at setup: the stack this one applies (leader) or []
        self._blocks: dict[tuple, tuple[int, Any]] = {}  # (batch shape, device) -> (block, its draws)
        self._epoch_active: bool | None = None  # active() in this epoch (set at epoch start), None: ask

    # -- state ---------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._key_args())

    def _key_args(self) -> dict[str, Any]:
        return {"p": self.p}

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self._resolved_seed, "batches": self.batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches = int(state_dict.get("batches", 0))
        seed = state_dict.get("seed")
        if seed is not None:
            self._resolved_seed = int(seed)

    # -- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        stack = sorted(
            (c for c in getattr(trainer, "callbacks", [self]) if isinstance(c, _BatchAugment)),
            key=lambda c: (_ORDER.index(type(c).name) if type(c).name in _ORDER else len(_ORDER), c.state_key),
        )
        mixers = [type(c).__name__ for c in stack if c.changes_targets]
        if len(mixers) > 1:
            raise ValueError(
                f"{' and '.join(mixers)} both mix the labels, so every batch would be mixed twice; use one "
                "MixupCutmix(mixup_alpha=..., cutmix_alpha=..., switch_prob=...) instead, which picks mixup or "
                "CutMix per batch, pair or sample (timm's Mixup)"
            )
        self._peers = stack if stack and stack[0] is self else []
        if self._resolved_seed is None:
            self._resolved_seed = int(torch.initial_seed())
        self._rank = int(trainer.global_rank)
        if self.off_last_epochs:
            max_epochs = trainer.max_epochs
            if max_epochs is None or max_epochs < 0:
                raise ValueError(
                    f"{type(self).__name__}(off_last_epochs={self.off_last_epochs}) needs "
                    f"Trainer(max_epochs=...), got max_epochs={max_epochs!r}"
                )
            if self.off_last_epochs >= max_epochs:
                rank_zero_warn(
                    f"{type(self).__name__}: off_last_epochs={self.off_last_epochs} >= "
                    f"max_epochs={max_epochs}, so it never acts"
                )
        self._setup(trainer, pl_module)

    def _setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Subclass checks that need the Trainer."""

    def active(self, epoch: int, max_epochs: int | None) -> bool:
        """Whether the augmentation is on in ``epoch`` (0-based)."""
        if self.until_epoch is not None and epoch >= self.until_epoch:
            return False
        if self.off_last_epochs and max_epochs is not None and epoch >= max_epochs - self.off_last_epochs:
            return False
        return True

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # alone (or before setup): act; stacked: the first in the fixed order applies the whole stack
        for augment in [self] if self._peers is None else self._peers:
            augment._augment(trainer, pl_module, batch)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._peers = None  # drop the references to the other callbacks
            self._epoch_active = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_active = self.active(trainer.current_epoch, trainer.max_epochs)  # read once per epoch

    def _augment(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        count = self.batches
        self.batches += 1
        on = self._epoch_active
        if on is None:  # the hook called outside a Trainer's epoch (or before its start)
            on = self.active(trainer.current_epoch, trainer.max_epochs)
        if not on:
            if not self._announced_off:
                rank_zero_info(f"{type(self).__name__} is off from epoch {trainer.current_epoch}")
                self._announced_off = True
            return
        x, y = self._read(batch)
        draws, i = self._block_draws(count, x)
        if self.p < 1.0 and draws.u[i] >= self.p:
            return
        new_x, new_y = self.apply(x, y, draws, i)
        self._write(batch, new_x, new_y)

    def _block_draws(self, count: int, x: Tensor) -> tuple[Any, int]:
        """The draws of batch ``count`` as ``(block draws, position in the block)``.

        Batches ``DRAW_BLOCK * b .. DRAW_BLOCK * (b + 1) - 1`` take their draws from one block, made at once by
        :meth:`draw` from the generator seeded for block ``b`` (``SeedSequence([seed, rank, b])``), so a
        batch's draws depend only on ``(seed, rank, count)`` and the batch's shape: resume and every rank
        reproduce them, and a batch costs no draw kernels. Blocks are kept per batch shape and device (the
        last, smaller batch of an epoch has its own), the latest few.
        """
        block, i = divmod(count, DRAW_BLOCK)
        key = (x.shape, x.get_device())  # get_device: an int, cheaper than building a torch.device
        cached = self._blocks.get(key)
        if cached is None or cached[0] != block:
            if cached is None and len(self._blocks) >= 4:
                self._blocks.pop(next(iter(self._blocks)))  # the oldest shape
            cached = self._blocks[key] = (block, self.draw(self._seed_generator(block), x))
        return cached[1], i

    def draw(self, generator: torch.Generator, x: Tensor) -> Any:
        """The draws of ``DRAW_BLOCK`` batches shaped like ``x`` (an object with ``u``: the ``p`` decisions)."""
        raise NotImplementedError

    def apply(self, x: Tensor, y: Tensor | None, draws: Any, i: int) -> tuple[Tensor, Tensor | None]:
        """The augmented ``(x, y)`` of the ``i``-th batch of a block; ``y`` is ``None`` for augmentations that
        leave targets alone."""
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------------
    def _seed_generator(self, count: int) -> torch.Generator:
        return self._generator.manual_seed(self._batch_seed(count))

    def _batch_seed(self, count: int) -> int:
        """``SeedSequence([seed, rank, count]).generate_state(1, uint64)[0]``, from a block computed ahead."""
        seed = self._resolved_seed if self._resolved_seed is not None else 0
        key = (seed, self._rank)
        i = count - self._states_from
        if key == self._states_key and 0 <= i < len(self._states):
            return self._states[i]
        if not self._fast_seeds or count + SEED_BLOCK > _M32:
            return _reference_state(seed, self._rank, count)
        states = seed_states(seed, self._rank, np.arange(count, count + SEED_BLOCK, dtype=np.uint64)).tolist()
        if states[0] != _reference_state(seed, self._rank, count):  # guards against a changed SeedSequence
            self._fast_seeds = False
            return _reference_state(seed, self._rank, count)
        self._states, self._states_from, self._states_key = states, count, key
        return states[0]

    def _read(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, tuple):
            raise TypeError(
                f"{type(self).__name__} replaces tensors inside the batch, so the batch must be a list or a dict; "
                "got a tuple. Make the train loader (or on_after_batch_transfer) return a list "
                "(DataLoader's default collate already does for (x, y) samples), or call "
                "lightning_tricks.augment's functions in training_step instead."
            )
        if not isinstance(batch, (list, MutableMapping)):
            raise TypeError(f"{type(self).__name__} needs a list or dict batch, got {type(batch).__name__}")
        try:
            x = batch[self.input_key]  # type: ignore[index]  # int for a list batch, str for a dict batch
            y = batch[self.target_key] if self.changes_targets else None  # type: ignore[index]
        except (IndexError, KeyError) as err:
            raise TypeError(
                f"{type(self).__name__}: the batch has no entry {err} (input_key={self.input_key!r}, "
                f"target_key={self.target_key!r})"
            ) from None
        if not isinstance(x, Tensor) or (self.changes_targets and not isinstance(y, Tensor)):
            raise TypeError(
                f"{type(self).__name__}: batch[{self.input_key!r}] and batch[{self.target_key!r}] must be tensors"
            )
        return x, y

    def _write(self, batch: Any, x: Tensor, y: Tensor | None) -> None:
        batch[self.input_key] = x
        if self.changes_targets:
            batch[self.target_key] = y


class _Labels(_BatchAugment):
    """A batch augmentation that mixes labels: finds ``num_classes`` at setup to make soft targets."""

    _classes: int | None = None
    _eye: Tensor | None = None  # one-hot rows of the classes, in the batch's dtype and on its device
    _eye_device = -2  # _eye.get_device() (-1: the CPU)

    def _setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._classes is None:
            found = getattr(pl_module, "num_classes", None) or getattr(trainer_datamodule(trainer), "num_classes", None)
            self._classes = int(found) if found is not None else None

    def _soft_targets(self, x: Tensor, y: Tensor) -> Tensor:
        """``y`` as float ``(N, C)`` targets in ``x``'s dtype: class indices gather rows of a cached identity
        (one kernel; the values of ``one_hot``), soft targets are checked and cast."""
        eye = self._eye
        if (  # the common case, checked in a few attribute reads: int64 class indices, the identity made
            eye is not None
            and y.dtype == torch.int64
            and y.ndim == 1
            and y.shape[0] == x.shape[0]
            and eye.dtype == x.dtype
            and self._eye_device == x.get_device()
        ):
            return eye.index_select(0, y)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"x and y need the same batch size, got {x.shape[0]} and {y.shape[0]}")
        dtype = x.dtype
        if y.dtype.is_floating_point or y.ndim != 1:
            return soft_targets(y, self._need_classes(y), dtype)
        classes = self._need_classes(y)
        assert classes is not None  # _need_classes raises for class indices without num_classes
        if eye is None or eye.shape[0] != classes or eye.dtype != dtype or eye.device != y.device:
            eye = self._eye = torch.eye(classes, dtype=dtype, device=y.device)
            self._eye_device = y.get_device()
        return eye.index_select(0, y if y.dtype in (torch.int64, torch.int32) else y.long())

    def _need_classes(self, y: Tensor) -> int | None:
        if self._classes is None and not y.dtype.is_floating_point:
            raise ValueError(
                f"{type(self).__name__} needs num_classes to make soft targets from class indices: "
                f"pass {type(self).__name__}(num_classes=...) or give the LightningModule or "
                "DataModule a num_classes attribute"
            )
        return self._classes


class _Mix(_Labels):
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
        _check_alpha(alpha)
        check_int("num_classes", num_classes, 2, allow_none=True)
        self.alpha = float(alpha)
        self.num_classes = num_classes
        self._classes: int | None = num_classes

    def _key_args(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "p": self.p}

    _boxes = False  # CutMix: also draw a box center per batch

    def draw(self, generator: torch.Generator, x: Tensor) -> _MixDraws:
        """Per batch of the block, in this order: the ``p`` decision ``u ~ U(0, 1)``, ``lam ~ Beta(alpha,
        alpha)`` (:func:`~lightning_tricks.augment.sample_beta_n`), a permutation (``argsort`` of ``N`` uniform
        float64 draws), and for CutMix the box center row then column (uniform over the image), whose box
        :func:`~lightning_tricks.augment.cutmix_box` makes from ``lam``."""
        if x.ndim < 2:
            raise ValueError(f"{type(self).__name__} needs a batch (N, ...), got input shape {tuple(x.shape)}")
        if self._boxes and x.ndim != 4:
            raise ValueError(f"{type(self).__name__} needs images (N, C, H, W), got shape {tuple(x.shape)}")
        u = torch.rand(DRAW_BLOCK, generator=generator, dtype=torch.float64).tolist()
        lam = sample_beta_n(self.alpha, DRAW_BLOCK, generator).tolist()
        keys = torch.rand((DRAW_BLOCK, x.shape[0]), generator=generator, dtype=torch.float64)
        index = list(keys.argsort(dim=1).to(x.device, non_blocking=True).unbind(0))
        boxes = kept = None
        if self._boxes:
            h, w = x.shape[-2:]
            rows = torch.randint(0, h, (DRAW_BLOCK,), generator=generator).tolist()
            cols = torch.randint(0, w, (DRAW_BLOCK,), generator=generator).tolist()
            boxes = [cutmix_box(h, w, la, center=c) for la, c in zip(lam, zip(rows, cols))]
            kept = [1.0 - (b - t) * (r - le) / (h * w) for t, le, b, r in boxes]  # the label weight, after clipping
        return _MixDraws(u, lam, index, boxes, kept, [None] * DRAW_BLOCK)


class Mixup(_Mix):
    """Mixup on training batches: ``x' = lam x + (1-lam) x[perm]``, ``y' = lam q + (1-lam) q[perm]``.

    ``lam ~ Beta(alpha, alpha)`` per batch, ``perm`` a random permutation, ``q`` one-hot targets.
    Zhang, Cisse, Dauphin, Lopez-Paz, "mixup: Beyond Empirical Risk Minimization", 2018,
    arXiv:1710.09412. The targets become float ``(N, C)``; the loss must accept soft targets (see the
    module docstring for how the batch is replaced).

    Args:
        alpha: Beta concentration, > 0 (the paper: 0.2 on ImageNet, 1.0 on CIFAR-10).
        p: probability of mixing a batch, in (0, 1].
        until_epoch: mix only in epochs ``< until_epoch`` (0-based); ``None`` = always.
        off_last_epochs: do not mix in the last ``off_last_epochs`` epochs of ``max_epochs``.
        num_classes: number of classes; ``None`` takes ``num_classes`` from the LightningModule or the
            DataModule.
        seed: base seed of the draws; ``None`` takes ``torch.initial_seed()`` (set by ``seed_everything``).
        input_key, target_key: where ``x`` and ``y`` are in the batch (list positions or dict keys).

    Not together with :class:`CutMix` (refused at ``setup``): :class:`MixupCutmix` switches between them.

    Example:
        >>> cb = Mixup(alpha=0.2, off_last_epochs=2)   # Trainer(callbacks=[cb], max_epochs=10)
        >>> [cb.active(epoch, max_epochs=10) for epoch in (0, 7, 8, 9)]
        [True, True, False, False]
    """

    name = "mixup"

    def apply(self, x: Tensor, y: Tensor | None, draws: Any, i: int) -> tuple[Tensor, Tensor | None]:
        assert y is not None  # changes_targets: _read gives the targets
        if not x.dtype.is_floating_point:
            raise ValueError(f"Mixup needs floating point inputs, got dtype {x.dtype}")
        return mix_pair(x, self._soft_targets(x, y), draws.lam[i], draws.partners[i])


class CutMix(_Mix):
    """CutMix on training batches: paste a box of ``x[perm]`` and mix labels by the pasted area.

    ``lam ~ Beta(alpha, alpha)`` sets the box (sides ``sqrt(1 - lam) * (H, W)``, uniform center,
    clipped), then ``lam = 1 - box_area / (H W)`` and ``y' = lam q + (1 - lam) q[perm]``.
    Yun, Han, Oh, Chun, Choe, Yoo, "CutMix: Regularization Strategy to Train Strong Classifiers with
    Localizable Features", 2019, arXiv:1905.04899. Images ``(N, C, H, W)`` only. Arguments as
    :class:`Mixup` (the paper uses ``alpha=1``). Not together with :class:`Mixup` (refused at ``setup``):
    :class:`MixupCutmix` switches between them.

    Example:
        >>> cb = CutMix(alpha=1.0, p=0.5)
    """

    name = "cutmix"
    _boxes = True

    def apply(self, x: Tensor, y: Tensor | None, draws: Any, i: int) -> tuple[Tensor, Tensor | None]:
        assert y is not None  # changes_targets: _read gives the targets
        q, index, lam = self._soft_targets(x, y), draws.partners[i], draws.kept[i]
        box = draws.masks[i]
        if box is None:
            size = x.shape[-2] * x.shape[-1] * x.element_size()
            box = _mask(draws.masks, i, size, lambda a, b: _box_masks(draws.boxes[a:b], x))
        # weights exactly 0 or 1: x outside the box, x[index] inside (paste_box's values, in two kernels)
        return torch.lerp(x, x.index_select(0, index), box), q.index_select(0, index).lerp_(q, lam)


def _box_masks(boxes: list[tuple[int, int, int, int]], x: Tensor) -> Tensor:
    """``(len(boxes), 1, 1, H, W)`` weights of ``x``'s dtype: 1 inside each box, else 0."""
    h, w = x.shape[-2:]
    t, le, b, r = torch.tensor(boxes, device=x.device).unbind(1)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows >= t[:, None]) & (rows < b[:, None])
    in_cols = (cols >= le[:, None]) & (cols < r[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :]).to(x.dtype)[:, None, None]


class MixupCutmix(_Labels):
    """Mixup or CutMix on training batches, chosen per batch, pair or sample: timm's ``Mixup`` as a callback.

    For each *slot* (the batch with ``mode="batch"``, the pair ``(i, N-1-i)`` with ``"pair"``, the sample
    with ``"elem"``): with probability ``prob`` it is mixed, by CutMix with probability ``switch_prob``
    (when both alphas are > 0) else by mixup, with ``lam ~ Beta(alpha, alpha)`` of that method. Sample
    ``i`` is mixed with sample ``N-1-i`` (as timm: the loader's shuffle makes the partner random). CutMix
    pastes a box of the partner (sides ``sqrt(1 - lam) * (H, W)``, clipped) and its label weight is the
    kept area ``1 - box_area / (H W)``, per sample in ``"elem"`` mode. Targets become
    ``y'_i = lam_i s(q_i) + (1 - lam_i) s(q_{N-1-i})`` with ``s(q) = (1 - eps) q + eps / C`` (label
    smoothing folded in, as timm's ``mixup_target``); with ``label_smoothing > 0`` every training batch
    gets smoothed soft targets, mixed or not (timm does the same), so the module must not smooth again:
    ``setup`` refuses a module with its own ``label_smoothing > 0`` (the two are equivalent; use one).
    The math is :func:`lightning_tricks.augment.mixup_cutmix_batch`; the draws come from this callback's
    generator, reseeded per batch from ``(seed, rank, batch count)`` like :class:`Mixup`'s, so resume
    continues the same draws. It cannot be stacked with :class:`Mixup` or :class:`CutMix` (refused at
    ``setup``); :class:`Cutout` acts first.

    Zhang et al. 2018 (arXiv:1710.09412); Yun et al. 2019 (arXiv:1905.04899); the batch/pair/elem
    switch is Wightman's ``timm.data.Mixup`` (DeiT, Touvron et al. 2021, arXiv:2012.12877, uses
    ``mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1``).

    Args:
        mixup_alpha: mixup's Beta concentration, >= 0 (0 turns mixup off).
        cutmix_alpha: CutMix's Beta concentration, >= 0 (0 turns CutMix off; images ``(N, C, H, W)``
            are needed when it is > 0). Not both 0.
        prob: probability that a slot is mixed, in [0, 1].
        switch_prob: probability of CutMix instead of mixup when both are on, in [0, 1].
        mode: ``"batch"`` (one ``lam`` and box for the batch), ``"pair"`` or ``"elem"`` (per sample).
        label_smoothing: ``eps`` in [0, 1) folded into the soft targets.
        until_epoch: mix only in epochs ``< until_epoch`` (0-based; timm's ``mixup_off_epoch``);
            ``None`` = always. Label smoothing goes on after it.
        off_last_epochs, num_classes, seed, input_key, target_key: as :class:`Mixup`.

    Example:
        >>> cb = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", until_epoch=90)
        >>> cb.active(89, max_epochs=100), cb.active(90, max_epochs=100)
        (True, False)
    """

    name = "mixup_cutmix"

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
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.mode = mode
        self.label_smoothing = float(label_smoothing)
        self.num_classes = num_classes
        self._classes = num_classes

    def _key_args(self) -> dict[str, Any]:
        return {
            "mixup_alpha": self.mixup_alpha,
            "cutmix_alpha": self.cutmix_alpha,
            "prob": self.prob,
            "switch_prob": self.switch_prob,
            "mode": self.mode,
        }

    def _setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super()._setup(trainer, pl_module)
        smoothing = getattr(pl_module, "label_smoothing", 0.0)
        if self.label_smoothing and isinstance(smoothing, (int, float)) and smoothing > 0:
            raise ValueError(
                f"MixupCutmix(label_smoothing={self.label_smoothing}) and the module's "
                f"label_smoothing={smoothing} would smooth the targets twice; set one of them to 0 "
                "(they give the same targets)"
            )

    def _augment(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        count = self.batches
        self.batches += 1
        mixing = self.active(trainer.current_epoch, trainer.max_epochs)
        if not mixing:
            if not self._announced_off:
                rank_zero_info(f"MixupCutmix is off from epoch {trainer.current_epoch} (label smoothing stays)")
                self._announced_off = True
            if not self.label_smoothing:
                return
        x, y = self._read(batch)
        assert y is not None  # changes_targets: _read gives the targets
        if self.cutmix_alpha > 0 and x.ndim != 4:
            raise ValueError(
                f"MixupCutmix(cutmix_alpha={self.cutmix_alpha}) needs images (N, C, H, W), got shape "
                f"{tuple(x.shape)}; set cutmix_alpha=0 for other inputs"
            )
        size = (x.shape[-2], x.shape[-1]) if x.ndim == 4 else None
        params = mixup_cutmix_params(
            x.shape[0],
            size,
            self.mixup_alpha,
            self.cutmix_alpha,
            self.prob if mixing else 0.0,
            self.switch_prob,
            self.mode,
            self._seed_generator(count),
        )
        if not self.label_smoothing and not params.mixed:
            return  # nothing to do: the batch stays exactly as it is
        out = mixup_cutmix_batch(
            x,
            y,
            self._need_classes(y),
            self.mixup_alpha,
            self.cutmix_alpha,
            label_smoothing=self.label_smoothing,
            mode=self.mode,
            params=params,
        )
        self._write(batch, out.x, out.y)


class Cutout(_BatchAugment):
    """Cutout on training batches: ``count`` squares of side ``size`` per image set to ``value``.

    Each square is centered uniformly over the image and clipped at the border; labels are unchanged.
    DeVries and Taylor, "Improved Regularization of Convolutional Neural Networks with Cutout", 2017,
    arXiv:1708.04552 (16x16 on CIFAR-10).

    Args:
        size: side in pixels (int >= 1) or as a fraction of ``min(H, W)`` (float in (0, 1]); a square
            larger than the image raises ``ValueError`` (at ``setup`` when the DataModule has
            ``input_shape``, else at the first batch).
        count: squares per image, >= 1.
        value: fill value (0 is the mean of standardized data).
        p, until_epoch, off_last_epochs, seed, input_key: as :class:`Mixup`.

    Example:
        >>> cb = Cutout(size=16, count=1)
    """

    name = "cutout"
    changes_targets = False

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
        if isinstance(size, bool) or not isinstance(size, (int, float)):
            raise ValueError(f"size must be an int (pixels) or a float fraction in (0, 1], got {size!r}")
        if isinstance(size, int) and size < 1:
            raise ValueError(f"size must be >= 1 pixel, got {size!r}")
        if isinstance(size, float) and not 0.0 < size <= 1.0:
            raise ValueError(f"size as a fraction must be in (0, 1], got {size!r}")
        check_int("count", count, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"value must be a number, got {value!r}")
        self.size = size
        self.count = count
        self.value = float(value)

    def _key_args(self) -> dict[str, Any]:
        return {"size": self.size, "count": self.count, "p": self.p}

    def _setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        shape = getattr(trainer_datamodule(trainer), "input_shape", None)
        if shape is not None and len(shape) == 3:
            cutout_size(self.size, int(shape[1]), int(shape[2]))  # raises if it does not fit

    def draw(self, generator: torch.Generator, x: Tensor) -> _CutoutDraws:
        """Per batch of the block: the ``p`` decision ``u ~ U(0, 1)``; then the square centers' rows
        ``(N, count)`` of every batch of the block, then their columns, uniform over the image."""
        if x.ndim != 4:
            raise ValueError(f"Cutout needs images (N, C, H, W), got shape {tuple(x.shape)}")
        n, _, h, w = x.shape
        side = cutout_size(self.size, h, w)
        u = torch.rand(DRAW_BLOCK, generator=generator, dtype=torch.float64).tolist()
        rows = torch.randint(0, h, (DRAW_BLOCK, n, self.count), generator=generator)
        cols = torch.randint(0, w, (DRAW_BLOCK, n, self.count), generator=generator)
        device = x.device
        return _CutoutDraws(
            u,
            rows.to(device, non_blocking=True),
            cols.to(device, non_blocking=True),
            cutout_windows(side, h, device).to(x.dtype),
            cutout_windows(side, w, device).to(x.dtype),
            torch.tensor(self.value, dtype=x.dtype, device=device),
            [None] * DRAW_BLOCK,
        )

    def apply(self, x: Tensor, y: Tensor | None, draws: Any, i: int) -> tuple[Tensor, Tensor | None]:
        weights = draws.masks[i]
        if weights is None:
            weights = _mask(draws.masks, i, x[0, 0].numel() * x.shape[0] * x.element_size(), self._squares(draws, x))
        # weights exactly 0 or 1: x outside the squares, the fill inside (fill_mask's values for finite x)
        return torch.lerp(x, draws.fill, weights), y

    def _squares(self, draws: _CutoutDraws, x: Tensor) -> Any:
        """``make(start, stop)``: the squares of batches ``start .. stop - 1`` as 0/1 weights, cutout_mask's."""
        n, _, h, w = x.shape
        count = self.count

        def make(start: int, stop: int) -> Tensor:
            in_rows = draws.row_windows.index_select(0, draws.rows[start:stop].reshape(-1))
            in_cols = draws.col_windows.index_select(0, draws.cols[start:stop].reshape(-1))
            squares = in_rows[:, :, None] * in_cols[:, None, :]  # (batches * N * count, H, W), 0 or 1
            if count > 1:
                squares = squares.view(-1, count, h, w).amax(dim=1)
            return squares.view(stop - start, n, 1, h, w)

        return make
