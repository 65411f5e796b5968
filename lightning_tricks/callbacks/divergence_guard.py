"""DivergenceGuard: the first non-finite loss or weight stops the run before it reaches averages or checkpoints."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from lightning_tricks._lightning import Callback, LightningModule, Trainer
from lightning_tricks.callbacks._common import check_bool, check_int
from lightning_tricks.sanity import Diverged, divergence_message, non_finite_val_loss, val_divergence_message

__all__ = ["DivergenceGuard", "Diverged"]


class DivergenceGuard(Callback):
    """Stop training at the first non-finite training loss or weight, with one line naming step, epoch, LR.

    Raises :class:`~lightning_tricks.sanity.Diverged` before the weights, averages or checkpoints take
    the bad value; where each check runs and its cost: ``docs/method_cards.md``.

    Args:
        check_weights: also check that the weights are finite after optimizer steps.
        check_val_loss: also stop at a non-finite validation loss.
        every_n_steps: check the weights (and, on an accelerator, read the summed losses) every this many
            optimizer steps, >= 1; 1 checks every step.
    """

    #: read a CPU loss every step (no sync there); tests turn it off to run the accelerator's deferred path
    _read_cpu = True

    def __init__(self, check_weights: bool = True, every_n_steps: int = 1, check_val_loss: bool = True) -> None:
        self.check_weights = check_bool("check_weights", check_weights)
        self.check_val_loss = check_bool("check_val_loss", check_val_loss)
        every = check_int("every_n_steps", every_n_steps, 1)
        assert every is not None
        self.every_n_steps: int = every
        self._handles: list[Any] = []
        self._trainer: Trainer | None = None
        self._loss_sum: Tensor | None = None  # the losses since the last read, on the accelerator
        self._window = 0  # first optimizer step whose loss is in _loss_sum
        self._pending = False  # _loss_sum holds losses not read yet

    def __getstate__(self) -> dict[str, Any]:  # hooks and the trainer do not travel (pickling, ddp_spawn)
        return {**self.__dict__, "_handles": [], "_trainer": None, "_loss_sum": None}

    def _stop(
        self, trainer: Trainer, what: str, value: float, since: int | None = None, step: int | None = None
    ) -> None:
        lrs = [float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups]
        step = trainer.global_step if step is None else step
        epoch = trainer.current_epoch
        raise Diverged(divergence_message(what, value, step, epoch, lrs, since), step, epoch, lrs)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if not pl_module.training:  # (never in the sanity check: validation has no backward)
            return
        if self.every_n_steps == 1 or (loss.is_cpu and self._read_cpu):
            value = loss.item()
            if not math.isfinite(value):
                self._stop(trainer, "loss", value)
            return
        loss = loss.detach()
        total = self._loss_sum
        if total is None or total.device != loss.device:
            total = self._loss_sum = torch.zeros((), dtype=torch.float32, device=loss.device)
        total.add_(loss)  # no sync: read every every_n_steps steps
        self._pending = True
        step = trainer.global_step
        if step % self.every_n_steps == 0:
            self._read_losses(trainer, step)

    def _read_losses(self, trainer: Trainer, step: int) -> None:
        """Read the summed losses of steps ``_window .. step`` (one host sync) and start a new window."""
        if not self._pending or self._loss_sum is None:
            return
        value = float(self._loss_sum)
        since = self._window
        self._loss_sum.zero_()
        self._pending, self._window = False, step + 1
        if not math.isfinite(value):
            self._stop(trainer, "loss" if since >= step else "sum of the losses", value, since, step)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove()
        self._trainer = trainer
        self._window, self._pending = trainer.global_step, False
        if self._loss_sum is not None:
            self._loss_sum.zero_()
        if not self.check_weights:
            return
        for optimizer in trainer.optimizers:
            # each optimizer's step count in a one-element list: the weight check's counter, cheap to bump
            hook = functools.partial(self._after_step, [trainer.global_step])
            self._handles.append(optimizer.register_step_post_hook(hook))

    def _after_step(self, count: list[int], optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        step = count[0]
        count[0] = step + 1
        if step % self.every_n_steps == 0 and self._trainer is not None:
            self._check_weights(self._trainer, [optimizer])

    def _check_weights(self, trainer: Trainer, optimizers: list) -> None:
        params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
        if not params:
            return
        with torch.no_grad():
            total = float(torch.stack(torch._foreach_norm(params)).sum())
        if not math.isfinite(total):
            self._stop(trainer, "weight norm after the update", total)

    def _flush(self, trainer: Trainer) -> None:
        """With ``every_n_steps > 1``: read the losses not read yet and check the weights now."""
        if self.every_n_steps == 1 or self._trainer is not trainer:
            return
        self._read_losses(trainer, max(self._window, trainer.global_step - 1))
        if self.check_weights:
            self._check_weights(trainer, list(trainer.optimizers))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A non-finite validation loss ends the run too, before a checkpoint or early stopping acts on it
        (Lightning runs checkpoint callbacks' hooks after every other callback's)."""
        if not self.check_val_loss or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        bad = non_finite_val_loss(trainer.callback_metrics)
        if bad is not None:
            lrs = [float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups]
            step, epoch = trainer.global_step, trainer.current_epoch
            raise Diverged(val_divergence_message(*bad, step, epoch, lrs), step, epoch, lrs)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._flush(trainer)  # raising here keeps a diverged run from writing the checkpoint

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._trainer = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)
        self._remove()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove()
