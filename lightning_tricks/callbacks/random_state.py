"""RandomState: the owner of the global RNG states in checkpoints.

A resumed run draws what the uninterrupted one drew.

The states themselves are collected and set by the pure core :mod:`lightning_tricks.random_state`
(torch CPU, every CUDA device, numpy, Python ``random``). This callback only decides *when*.

When they are saved: in :meth:`RandomState.state_dict`, which Lightning calls while it builds a
checkpoint (``Trainer.save_checkpoint`` -> ``_CheckpointConnector.dump_checkpoint`` ->
``call._call_callbacks_state_dict``), so the saved state is the one at the moment the checkpoint is
written: at ``on_validation_end`` / ``on_train_epoch_end`` for epoch checkpoints (after that epoch's
validation loader was iterated) or at ``on_train_batch_end`` for ``every_n_train_steps``.

When they are restored: in :meth:`RandomState.on_fit_start`, not in ``load_state_dict``. In
pytorch_lightning 2.6 ``Trainer._run`` restores callback states (``_restore_modules_and_callbacks``)
*before* ``strategy.setup`` and the ``on_fit_start`` hooks, and ``FitLoop.setup_data`` creates the
first training iterator (``iter(self._data_fetcher)``, which for a torch ``DataLoader`` draws its
base seed from the global torch RNG) *after* them. In the uninterrupted run that same draw happens at
the start of the next epoch (``_TrainingEpochLoop.on_run_start``), right after the checkpoint was
written, so the states must be back in place before ``setup_data`` and after everything that only a
fresh start does. ``on_fit_start`` is the last callback hook before ``setup_data`` that is not inside
``isolate_rng`` (the sanity check is, so anything set there would be undone; it leaves the RNG as it
found it either way). Draws made after this callback's ``on_fit_start`` and before training (another
callback's ``on_fit_start`` listed after this one, ``LightningModule.on_fit_start``, a
``train_dataloader()`` that draws) happen only in the resumed run and shift its stream; the tricks of
this library that draw at fit start do so under ``torch.random.fork_rng``.

DDP: Lightning builds the checkpoint on every rank and writes rank zero's. ``state_dict`` therefore
gathers every rank's states (``torch.distributed.all_gather_object``; it is called on all ranks at
the same time, as Lightning does) and each rank restores its own. A resume on a different world size
restores nothing and warns (the data sharding changes, so the run cannot be the same anyway).

Mid-epoch resume (``ModelCheckpoint(every_n_train_steps=...)``): exact with a loader that has
``state_dict``/``load_state_dict`` (:class:`lightning_tricks.data.TensorBatchLoader`, torchdata's
``StatefulDataLoader``); Lightning saves and reloads its position. A plain torch ``DataLoader`` is
not resumable: Lightning warns and starts a *new* pass (a new shuffle) for the rest of the epoch,
so the data and the draws differ from the uninterrupted run. A ``DataLoader`` with
``persistent_workers=True`` draws its base seed once per loader, not once per epoch: the resumed run
draws it once more at its start, so even epoch-end resume is shifted by that draw (use
``num_workers=0``, non-persistent workers, or the resident loader).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lightning_tricks._lightning import (
    Callback,
    LightningModule,
    Trainer,
    rank_zero_warn,
)
from lightning_tricks.random_state import (
    check_rng_states,
    get_rng_states,
    set_rng_states,
)

__all__ = ["RandomState"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RandomState(Callback):
    """Save the global RNG states (torch CPU/CUDA, numpy, Python) in checkpoints; restore them on resume.

    With it, a run killed and resumed from a checkpoint ends bit-identical to the uninterrupted run
    even with dropout, drop path, DropConnect or a shuffling ``DataLoader`` (for mid-epoch
    checkpoints the loader must be resumable too, see the module docstring). Tricks with their own
    generator (Mixup, CutMix, Cutout) keep their state in their own ``state_dict``.

    Cost: one collection of ~5 KB of state per checkpoint (and a gather of it under DDP); nothing per step.

    Args:
        cuda: also save and restore the CUDA generators; ``None`` = when CUDA is available.

    Example:
        >>> cb = RandomState()   # Trainer(callbacks=[cb]); trainer.fit(model, ckpt_path="last.ckpt")
        >>> sorted(cb.state_dict())
        ['ranks', 'world_size']
    """

    def __init__(self, cuda: bool | None = None) -> None:
        if cuda is not None and not isinstance(cuda, bool):
            raise ValueError(f"cuda must be True, False or None (when available), got {cuda!r}")
        self.cuda = cuda
        self._pending: dict[str, Any] | None = None  # loaded from a checkpoint, set at on_fit_start
        self.restored = False  # whether the last fit started from restored states

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        states = get_rng_states(self.cuda)
        if _distributed():
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, states)
        else:
            ranks = [states]
        return {"world_size": len(ranks), "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks")
        if not isinstance(ranks, (list, tuple)) or not ranks:
            raise ValueError(
                f"RandomState: the checkpoint's state has no 'ranks' list of RNG states, "
                f"got keys {sorted(map(str, state_dict))}"
            )
        for i, states in enumerate(ranks):
            try:
                check_rng_states(states)
            except (ValueError, TypeError) as e:
                raise type(e)(f"RandomState: rank {i} in the checkpoint: {e}") from None
        self._pending = {"world_size": int(state_dict.get("world_size", len(ranks))), "ranks": list(ranks)}

    # -- hooks ---------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pending, self._pending = self._pending, None
        self.restored = False
        if pending is None:
            if trainer.ckpt_path is not None:
                rank_zero_warn(
                    f"RandomState: the checkpoint {trainer.ckpt_path} has no RNG states (saved without "
                    "RandomState), so the resumed run draws differently from the uninterrupted one"
                )
            return
        world, rank = int(trainer.world_size), int(trainer.global_rank)
        if pending["world_size"] != world or len(pending["ranks"]) != world:
            rank_zero_warn(
                f"RandomState: the checkpoint holds RNG states of {pending['world_size']} rank(s), this run "
                f"has world_size={world}; the RNG states are not restored"
            )
            return
        states = pending["ranks"][rank]
        n_cuda = set_rng_states(states, self.cuda)
        if self.cuda is not False and n_cuda < len(states["cuda"]):
            rank_zero_warn(
                f"RandomState: the checkpoint has {len(states['cuda'])} CUDA generator state(s), "
                f"{n_cuda} restored (visible CUDA devices: {_cuda_count()})"
            )
        self.restored = True

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._pending = None  # states loaded for validate/test (not fit) must not leak into a later fit


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
