"""A batch loader over tensors that already live on the training device (no workers, no collate).

For small datasets (digits, Fashion-MNIST, CIFAR-10 fit in GPU memory) this removes the DataLoader
from the step entirely: each batch is an index into resident tensors. Under DDP each rank takes its
own shard of every epoch's permutation, like ``DistributedSampler``.

The loader is resumable: ``state_dict()`` is the pass in progress (its epoch and how many batches it
has yielded) and ``load_state_dict()`` makes the next pass continue it. Lightning saves this state in
every checkpoint (``FitLoop.on_save_checkpoint`` stores ``state_dict()`` of every train loader that
has both methods) and loads it before it creates the first iterator of a resumed fit
(``FitLoop.setup_data``), so a run resumed from a mid-epoch checkpoint (``every_n_train_steps``) goes
on with the next batch of the same permutation, exactly as the uninterrupted run did.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

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

    Example:
        >>> loader = TensorBatchLoader(torch.arange(10), batch_size=3, shuffle=True)
        >>> it = iter(loader); first = next(it)
        >>> state = loader.state_dict(); state
        {'epoch': 0, 'batches': 1}
        >>> again = TensorBatchLoader(torch.arange(10), batch_size=3, shuffle=True)
        >>> again.load_state_dict(state)
        >>> torch.equal(next(iter(again))[0], next(it)[0])   # continues with the same pass's next batch
        True
    """

    def __init__(
        self,
        *tensors: Tensor,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
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
        self.epoch = 0  # the epoch of the next pass
        self.num_samples = math.ceil(n / world_size)
        self._skip = 0  # batches the next pass skips (a pass resumed by load_state_dict)
        self._active: list[list[int]] = []  # [epoch, batches yielded] of the passes in progress, newest last

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use epoch ``epoch``'s permutation (Lightning calls this through ``sampler``).

        A pass resumed by :meth:`load_state_dict` is kept if ``epoch`` is its epoch and dropped otherwise
        (the epoch it was in had ended for the caller, e.g. after ``limit_train_batches`` batches).
        """
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """The pass in progress: ``{"epoch": its epoch, "batches": batches it has yielded}``.

        With no pass in progress, the next pass: ``{"epoch": self.epoch, "batches": 0}``. If several
        passes are open at once (an extra pass over the training data while the epoch's pass is
        suspended), the newest one counts.
        """
        if self._active:
            epoch, done = self._active[-1]
            return {"epoch": int(epoch), "batches": int(done)}
        return {"epoch": int(self.epoch), "batches": int(self._skip)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next pass continue the one described by ``state_dict`` (from :meth:`state_dict`)."""
        epoch, batches = state_dict.get("epoch"), state_dict.get("batches", 0)
        for name, value in (("epoch", epoch), ("batches", batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TensorBatchLoader.load_state_dict: {name} must be an int >= 0, got {value!r}")
        assert isinstance(epoch, int) and isinstance(batches, int)
        if batches >= len(self):  # that pass was complete: the next one is the next epoch's
            epoch, batches = epoch + 1, 0
        self.epoch, self._skip = epoch, batches

    @property
    def sampler(self) -> TensorBatchLoader:
        # Lightning calls ``loader.sampler.set_epoch(epoch)`` before each epoch: exposing ourselves as the
        # sampler makes the shuffle order a function of the epoch, so a resumed run draws the same batches
        return self

    batch_sampler = None  # read by Lightning's DataLoader checks; there is no separate batch sampler

    def _indices(self, epoch: int) -> Tensor:
        n = self.tensors[0].shape[0]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:
            idx = torch.cat([idx, idx[: total - n]])
        return idx[self.rank : total : self.world_size].to(self.tensors[0].device)

    def __iter__(self) -> Iterator[list[Tensor]]:
        # a generator: the epoch and the resume point are read at the first next(), after set_epoch
        epoch, start = self.epoch, self._skip
        self._skip = 0
        self.epoch = epoch + 1  # the next pass draws a new permutation even if set_epoch is never called
        idx = self._indices(epoch)
        progress = [epoch, start]
        self._active.append(progress)
        try:
            for b in range(start, len(self)):
                sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
                progress[1] = b + 1  # counted before the yield: a checkpoint taken while it is out includes it
                yield [t[sel] for t in self.tensors]  # a list, like DataLoader's collate: callbacks may replace items
        finally:
            self._active[:] = [p for p in self._active if p is not progress]
