"""RandomState: the owner of the global RNG states in checkpoints, so a resumed run draws what the
uninterrupted one drew.

The core :mod:`lightning_tricks.random_state` collects and sets the states; this callback decides
when: saved in :meth:`RandomState.state_dict`, restored at ``on_fit_start`` (before Lightning's
``setup_data`` draws the first loader seed). Why there: ``docs/method_cards.md`` (exact resume).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lightning_tricks._lightning import Callback, LightningModule, Trainer, rank_zero_warn
from lightning_tricks.random_state import check_checkpoint_states, get_rng_states, set_rng_states

__all__ = ["RandomState"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RandomState(Callback):
    """Save the global RNG states (torch CPU/CUDA, numpy, Python) in checkpoints; restore them on resume.

    A resumed run then ends bit-identical to the uninterrupted one, dropout and shuffling included
    (mid-epoch: the loader must be resumable too). Cost: ~5 KB per checkpoint, nothing per step.

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

    def state_dict(self) -> dict[str, Any]:
        states = get_rng_states(self.cuda)
        if _distributed():
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, states)
        else:
            ranks = [states]
        return {"world_size": len(ranks), "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = check_checkpoint_states(state_dict)

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
