"""A batch loader over tensors that already live on the training device (no workers, no collate).

For small datasets (digits, Fashion-MNIST, CIFAR-10 fit in GPU memory) this removes the DataLoader
from the step entirely: each batch is an index into resident tensors. Under DDP each rank takes its
own shard of every epoch's permutation, like ``DistributedSampler``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor


class TensorBatchLoader:
    """Iterate ``(x[idx], y[idx])`` batches over equal-length tensors.

    Args:
        tensors: tensors with the same first dimension (moved to ``device`` once).
        batch_size: samples per batch on this rank.
        shuffle: draw a new permutation each epoch from ``seed + epoch`` (same on every rank).
        drop_last: drop the last incomplete batch.
        device: where the tensors live; ``None`` keeps them where they are.
        rank, world_size: this process's shard (each rank sees ``ceil(N / world_size)`` samples,
            padded by wrap-around as ``DistributedSampler`` does).
        seed: base seed of the shuffling.
    """

    def __init__(
        self, *tensors: Tensor, batch_size: int, shuffle: bool = False, drop_last: bool = False,
        device: torch.device | str | None = None, rank: int = 0, world_size: int = 1, seed: int = 0,
    ) -> None:
        if not tensors:
            raise ValueError("TensorBatchLoader needs at least one tensor")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError(f"all tensors need the same length, got {[t.shape[0] for t in tensors]}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        self.tensors = tuple(t.to(device) if device is not None else t for t in tensors)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.epoch = 0
        self.num_samples = math.ceil(n / world_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use epoch ``epoch``'s permutation (Lightning calls this through ``sampler``)."""
        self.epoch = epoch

    @property
    def sampler(self) -> TensorBatchLoader:
        # Lightning calls ``loader.sampler.set_epoch(epoch)`` before each epoch: exposing ourselves as the
        # sampler makes the shuffle order a function of the epoch, so a resumed run draws the same batches
        return self

    batch_sampler = None  # read by Lightning's DataLoader checks; there is no separate batch sampler

    def _indices(self) -> Tensor:
        n = self.tensors[0].shape[0]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:
            idx = torch.cat([idx, idx[: total - n]])
        return idx[self.rank : total : self.world_size].to(self.tensors[0].device)

    def __iter__(self) -> Iterator[list[Tensor]]:
        idx = self._indices()
        self.epoch += 1  # the next pass draws a new permutation even if set_epoch is never called
        for b in range(len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            yield [t[sel] for t in self.tensors]  # a list, like DataLoader's collate: callbacks may replace items
