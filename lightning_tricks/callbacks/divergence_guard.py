"""DivergenceGuard: the first non-finite loss or weight stops the run before it reaches averages or checkpoints."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_tricks._lightning import Callback, LightningModule, Trainer
from lightning_tricks.callbacks._common import check_bool
from lightning_tricks.sanity import Diverged, divergence_message

__all__ = ["DivergenceGuard", "Diverged"]


class DivergenceGuard(Callback):
    """Stop training at the first non-finite training loss or weight, with one line naming step, epoch, LR.

    Two checks, both raising :class:`~lightning_tricks.sanity.Diverged`:

    - the loss, in ``on_before_backward`` (one scalar read per step): a non-finite loss never reaches the
      backward pass or the optimizer, so the weights stay as they were;
    - the weights, right after each optimizer step (a ``torch.optim.Optimizer`` step post-hook, so before
      any callback's ``on_train_batch_end`` whatever the callback order; one multi-tensor norm over the
      parameters and one scalar read per step; ``check_weights=False`` turns it off). An LR so large
      that a finite gradient overflows the weights is caught here, before the EMA/SWA averages, early
      stopping's best copy or a checkpoint can take the non-finite values (the module's own weights are
      then the overflowed ones: no copy is kept to roll back).

    ``python -m lightning_tricks.train`` has it on by default (``callbacks.divergence_guard``): the run
    ends with ``status: diverged`` in ``metrics.json``, no test is run, the sweep summary shows the status,
    and the Hydra main returns the worst value of the monitor so sweepers rank the job last. Turn it off
    with ``~callbacks.divergence_guard``.

    Args:
        check_weights: also check that the weights are finite after each optimizer step.
    """

    def __init__(self, check_weights: bool = True) -> None:
        self.check_weights = check_bool("check_weights", check_weights)
        self._handles: list[Any] = []
        self._trainer: Trainer | None = None

    def __getstate__(self) -> dict[str, Any]:  # hooks and the trainer do not travel (pickling, ddp_spawn)
        return {**self.__dict__, "_handles": [], "_trainer": None}

    def _stop(self, trainer: Trainer, what: str, value: float) -> None:
        lrs = [float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups]
        step, epoch = trainer.global_step, trainer.current_epoch
        raise Diverged(divergence_message(what, value, step, epoch, lrs), step, epoch, lrs)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if trainer.sanity_checking or not pl_module.training:
            return
        value = float(loss.detach())
        if not math.isfinite(value):
            self._stop(trainer, "loss", value)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove()
        if not self.check_weights:
            return
        self._trainer = trainer
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(self._after_step))

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if not params or self._trainer is None:
            return
        total = float(torch.stack(torch._foreach_norm(params)).sum())
        if not math.isfinite(total):
            self._stop(self._trainer, "weight norm after the update", total)

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._trainer = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove()
