"""Shared DataModule logic: splits, normalization, resident-tensor or DataLoader loading, on-device augmentation.

Pixels, normalization and augmentation: :meth:`TensorDataModule.load` returns images with pixels in
``[0, 1]``; :meth:`~TensorDataModule.setup` carves the validation split and then normalizes every split
per channel with statistics of the *training split only* (``normalize="zscore"``: mean and std;
``"minmax"``: min and max; ``"none"``: unchanged), so the tensors in ``splits`` (and every batch, training
or evaluation) are normalized. The augmentation policy (``augment=NAME``, :mod:`lightning_tricks.policies`)
acts on training batches after transfer, on the device, in pixel space: each batch is mapped back to
``[0, 1]`` (``x * scale + shift``), augmented, and normalized again, so brightness, contrast, solarize or a
black border mean the same on every dataset and with every normalization.

Randomness of the policy: a CPU ``torch.Generator`` reseeded for every training batch from
``(augment_seed, global rank, batch count)`` (:func:`lightning_tricks.policies.batch_seed`); the seed and
the count are the module's ``state_dict``, which Lightning saves in every checkpoint (under the class
name) and loads on resume, so a resumed run draws what the uninterrupted run drew and DDP ranks draw
differently. ``augment_seed=None`` takes ``torch.initial_seed()`` (``seed_everything``'s seed) at the first
training batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks._lightning import LightningDataModule
from lightning_tricks.checks import check_float
from lightning_tricks.data.loader import TensorBatchLoader
from lightning_tricks.policies import NORMALIZATIONS, AugmentPolicy, batch_seed
from lightning_tricks.whitening import ZCA

LOADERS = ("dataloader", "resident")


class TensorDataModule(LightningDataModule):
    """A DataModule whose splits are in-memory tensors ``x`` (float, normalized) and ``y`` (int64).

    Subclasses implement :meth:`load` returning ``{"train": (x, y), "test": (x, y)}`` with pixels in
    ``[0, 1]``; a validation split is carved from train (``val_fraction``, fixed ``split_seed``) unless
    ``load`` gives one; then every split is normalized with the training split's statistics.

    Args:
        batch_size: per-device batch size.
        val_fraction: fraction of the training set held out for validation, in ``[0, 1)``.
        loader: ``"dataloader"`` (a ``DataLoader`` over a ``TensorDataset``, ``num_workers`` workers) or
            ``"resident"`` (tensors kept on the training device, batches are index lookups, no workers).
        num_workers: DataLoader workers for ``loader="dataloader"``.
        batch_augment: a callable ``(x) -> x`` applied to (normalized) training batches on the device after
            transfer and after ``augment`` (e.g. :class:`lightning_tricks.augment.RandomCropFlip`); never
            applied in eval. A ``generator`` attribute of it (a ``torch.Generator``) is saved in the state.
        split_seed: seed of the train/val split.
        augment: the augmentation policy of training batches, a name in
            :data:`lightning_tricks.policies.POLICIES` or a list of them applied in order (``"none"``: off).
        augment_options: the policies' options (:class:`lightning_tricks.policies.PolicyOptions`):
            ``padding``, ``crop_scale``, ``crop_ratio``, ``brightness``, ``contrast``, ``saturation``,
            ``num_ops``, ``magnitude``, ``magnitude_std``, ``erase_p``, ``erase_scale``, ``erase_ratio``,
            ``erase_value``.
        flip: whether the policies flip images horizontally; ``None`` takes the dataset's
            :attr:`default_flip` (on for CIFAR-10 and Fashion-MNIST, off for digits and MNIST, where a
            mirror image can change the class). Test-time augmentation reads ``datamodule.flip``.
        normalize: ``"zscore"`` (per-channel mean and std of the training split), ``"minmax"`` (per-channel
            min and max of the training split, to ``[0, 1]``), ``"zca"`` (ZCA whitening of whole images,
            :class:`lightning_tricks.whitening.ZCA`, fitted on the training split's pixels) or ``"none"``
            (pixels in ``[0, 1]``).
        zca_eps: ``normalize="zca"``: added to every eigenvalue of the training pixels' covariance, > 0.
        augment_seed: base seed of the policy's draws; ``None``: ``torch.initial_seed()`` at the first batch.
    """

    num_classes: int
    input_shape: tuple[int, ...]
    #: whether horizontal flips keep the class (the ``flip`` default)
    default_flip: bool = False

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        loader: str = "dataloader",
        num_workers: int = 0,
        batch_augment: Callable[[Tensor], Tensor] | None = None,
        split_seed: int = 0,
        augment: str | Sequence[str] | None = "none",
        augment_options: Mapping[str, Any] | None = None,
        flip: bool | None = None,
        normalize: str = "zscore",
        augment_seed: int | None = None,
        zca_eps: float = 1e-2,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if loader not in LOADERS:
            raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.loader = loader
        self.num_workers = num_workers
        self.batch_augment = batch_augment
        self.split_seed = split_seed
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.normalize = normalize
        check_float("zca_eps", zca_eps, 0.0, low_open=True)
        self.zca_eps = float(zca_eps)
        self.zca: ZCA | None = None  # normalize="zca": fitted in setup on the training split
        if flip is None:
            flip = type(self).default_flip
        if not isinstance(flip, bool):
            raise ValueError(f"flip must be a bool (or null for the dataset's default), got {flip!r}")
        self.flip = flip
        shape = getattr(type(self), "input_shape", None)
        self.augment_policy = AugmentPolicy(
            augment, flip=flip, channels=shape[0] if shape else None, options=augment_options
        )
        self.augment = self.augment_policy.names
        if augment_seed is not None and (
            isinstance(augment_seed, bool) or not isinstance(augment_seed, int) or augment_seed < 0
        ):
            raise ValueError(f"augment_seed must be an int >= 0 or None, got {augment_seed!r}")
        self.augment_seed = augment_seed
        self.augment_batches = 0  # training batches augmented so far (the per-batch seed)
        self._augment_generator = torch.Generator()
        self.norm_shift: Tensor | None = None  # (1, C, 1, 1): pixel = x * norm_scale + norm_shift
        self.norm_scale: Tensor | None = None
        self._norm_on: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    # -- subclass API ---------------------------------------------------------------------------
    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        raise NotImplementedError

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        splits = dict(self.load())
        if "val" not in splits:
            x, y = splits["train"]
            g = torch.Generator().manual_seed(self.split_seed)
            perm = torch.randperm(len(y), generator=g)
            n_val = int(round(len(y) * self.val_fraction))
            splits["train"] = (x[perm[n_val:]], y[perm[n_val:]])
            splits["val"] = (x[perm[:n_val]], y[perm[:n_val]])
        self._check(splits)
        self.splits = self._normalized(splits)

    def _normalized(self, splits: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
        """Every split mapped by ``(x - shift) / scale``, per channel, from the training split's statistics."""
        x = splits["train"][0]
        if self.normalize == "zca":  # the training split's pixels only; val and test are mapped, never seen
            self.norm_shift = self.norm_scale = None
            self.zca = ZCA.fit(x, self.zca_eps)
            return {name: (self.zca(xs), ys) for name, (xs, ys) in splits.items()}
        if self.normalize == "none" or not x.dtype.is_floating_point or x.ndim < 2 or len(x) == 0:
            self.norm_shift = self.norm_scale = None
            return splits
        dims = [d for d in range(x.ndim) if d != 1]
        if self.normalize == "zscore":
            shift = x.mean(dim=dims, keepdim=True)
            scale = x.std(dim=dims, keepdim=True)
        else:  # minmax
            shift = x.amin(dim=dims, keepdim=True)
            scale = x.amax(dim=dims, keepdim=True) - shift
        scale = scale.clamp_min(1e-6)
        self.norm_shift, self.norm_scale = shift, scale
        self._norm_on.clear()
        return {name: ((xs - shift) / scale, ys) for name, (xs, ys) in splits.items()}

    def _check(self, splits: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Labels in ``[0, num_classes)``, finite inputs, one input shape, a non-empty test split and a training
        split of at least one batch, said before training."""
        name = type(self).__name__
        _check_values(name, splits)
        for split, (_, y) in splits.items():
            if len(y):
                low, high = int(y.min()), int(y.max())
                if low < 0 or high >= self.num_classes:
                    bad = low if low < 0 else high
                    raise ValueError(
                        f"{name}: the {split} split has label {bad}, outside 0..{self.num_classes - 1} "
                        f"(num_classes={self.num_classes}); check the data files or num_classes"
                    )
        n = len(splits["train"][1])
        if n < self.batch_size:
            raise ValueError(
                f"{name}: the training split has {n} sample(s), fewer than batch_size={self.batch_size} "
                "(training batches drop the incomplete last one, so no step would run); lower "
                "data.batch_size or data.val_fraction"
            )

    def _loader(self, split: str, train: bool) -> Any:
        if not self.splits:
            self.setup()
        x, y = self.splits[split]
        if len(y) == 0:
            return []
        if self.loader == "resident":
            trainer = getattr(self, "trainer", None)
            device = trainer.strategy.root_device if trainer is not None else None
            rank = trainer.global_rank if trainer is not None else 0
            world = trainer.world_size if trainer is not None else 1
            return TensorBatchLoader(
                x,
                y,
                batch_size=self.batch_size,
                shuffle=train,
                drop_last=train,
                device=device,
                rank=rank,
                world_size=world,
                seed=self.split_seed,
            )
        return DataLoader(
            TensorDataset(x, y),
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> Any:
        return self._loader("train", train=True)

    def val_dataloader(self) -> Any:
        return self._loader("val", train=False)

    def test_dataloader(self) -> Any:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> Any:
        return self._loader("test", train=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.training or (not self.augment_policy and self.batch_augment is None):
            return batch
        x, *rest = batch
        if self.augment_policy:
            x = self.augment_batch(x, rank=trainer.global_rank)
        if self.batch_augment is not None:
            x = self.batch_augment(x)
        return [x, *rest]

    # -- augmentation -----------------------------------------------------------------------------------
    def augment_batch(self, x: Tensor, rank: int = 0) -> Tensor:
        """The policy applied to the normalized training batch ``x``, with this batch's generator (seeded
        from ``(augment_seed, rank, augment_batches)``); counts the batch."""
        if self.augment_seed is None:
            self.augment_seed = int(torch.initial_seed()) & ((1 << 63) - 1)
        generator = self._augment_generator.manual_seed(batch_seed(self.augment_seed, rank, self.augment_batches))
        self.augment_batches += 1
        return self.apply_policy(x, generator)

    def apply_policy(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The policy applied in pixel space: ``x * scale + shift``, the policy, then ``(x - shift) / scale``
        (with ZCA: its inverse, the policy, ZCA)."""
        if self.zca is not None:
            return self.zca(self.augment_policy(self.zca.inverse(x), generator))
        if self.norm_shift is None or self.norm_scale is None:
            return self.augment_policy(x, generator)
        key = (x.device, x.dtype)
        if key not in self._norm_on:
            self._norm_on[key] = (self.norm_shift.to(x.device, x.dtype), self.norm_scale.to(x.device, x.dtype))
        shift, scale = self._norm_on[key]
        return (self.augment_policy(torch.addcmul(shift, x, scale), generator) - shift) / scale

    def state_dict(self) -> dict[str, Any]:
        """The augmentation's resume state: ``augment_seed`` and ``augment_batches`` (and the state of a
        ``batch_augment`` generator); empty without augmentation, so checkpoints stay as they were."""
        state: dict[str, Any] = {}
        if self.augment_policy:
            state["augment_seed"] = self.augment_seed
            state["augment_batches"] = self.augment_batches
        generator = getattr(self.batch_augment, "generator", None)
        if isinstance(generator, torch.Generator):
            state["batch_augment_generator"] = generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        seed = state_dict.get("augment_seed")
        if seed is not None:
            self.augment_seed = int(seed)
        self.augment_batches = int(state_dict.get("augment_batches", 0))
        generator = getattr(self.batch_augment, "generator", None)
        saved = state_dict.get("batch_augment_generator")
        if isinstance(generator, torch.Generator) and isinstance(saved, Tensor):
            generator.set_state(saved)


def _check_values(name: str, splits: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Inputs finite and of the training split's shape, labels whole numbers, a test split that is not empty."""
    shape = tuple(splits["train"][0].shape[1:])
    for split, (x, y) in splits.items():
        if split == "test" and len(y) == 0:
            raise ValueError(f"{name}: the test split is empty; check the test files")
        if tuple(x.shape[1:]) != shape and len(x):
            raise ValueError(
                f"{name}: the {split} split's inputs are {tuple(x.shape[1:])}, the training split's {shape}; "
                "every split must have one input shape"
            )
        if x.dtype.is_floating_point and len(x):
            bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
            if bool(bad.any()):
                raise ValueError(
                    f"{name}: the {split} split has {int(bad.sum())} sample(s) with NaN or Inf inputs, the first "
                    f"is sample {int(bad.int().argmax())}; inputs must be finite"
                )
        if y.dtype.is_floating_point and len(y):
            whole = torch.isfinite(y) & (y == y.round())
            if not bool(whole.all()):
                i = int((~whole).int().argmax())
                raise ValueError(f"{name}: the {split} split has label {float(y[i])} at index {i}, not a class index")


def standardize(train_x: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """Normalize per channel (dim 1) with the training set's mean and std."""
    dims = [d for d in range(train_x.ndim) if d != 1]
    mean = train_x.mean(dim=dims, keepdim=True)
    std = train_x.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return tuple((t - mean) / std for t in (train_x, *others))
