"""Shared DataModule logic: splits, resident-tensor or DataLoader loading, on-device batch augmentation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks._lightning import LightningDataModule
from lightning_tricks.data.loader import TensorBatchLoader

LOADERS = ("dataloader", "resident")


class TensorDataModule(LightningDataModule):
    """A DataModule whose splits are in-memory tensors ``x`` (float, normalized) and ``y`` (int64).

    Subclasses implement :meth:`load` returning ``{"train": (x, y), "test": (x, y)}``; a validation
    split is carved from train (``val_fraction``, fixed ``split_seed``) unless ``load`` gives one.

    Args:
        batch_size: per-device batch size.
        val_fraction: fraction of the training set held out for validation, in ``[0, 1)``.
        loader: ``"dataloader"`` (a ``DataLoader`` over a ``TensorDataset``, ``num_workers`` workers) or
            ``"resident"`` (tensors kept on the training device, batches are index lookups, no workers).
        num_workers: DataLoader workers for ``loader="dataloader"``.
        batch_augment: a callable ``(x) -> x`` applied to training batches on the device after transfer
            (e.g. :class:`lightning_tricks.augment.RandomCropFlip`); never applied in eval.
        split_seed: seed of the train/val split.
    """

    num_classes: int
    input_shape: tuple[int, ...]

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        loader: str = "dataloader",
        num_workers: int = 0,
        batch_augment: Callable[[Tensor], Tensor] | None = None,
        split_seed: int = 0,
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
        self.splits = splits

    def _check(self, splits: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Labels in ``[0, num_classes)`` and a training split of at least one batch, said before training."""
        name = type(self).__name__
        for split, (_, y) in splits.items():
            if len(y) and not y.dtype.is_floating_point:
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
        if self.batch_augment is not None and trainer is not None and trainer.training:
            x, *rest = batch
            batch = [self.batch_augment(x), *rest]
        return batch


def standardize(train_x: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """Normalize per channel (dim 1) with the training set's mean and std."""
    dims = [d for d in range(train_x.ndim) if d != 1]
    mean = train_x.mean(dim=dims, keepdim=True)
    std = train_x.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return tuple((t - mean) / std for t in (train_x, *others))
