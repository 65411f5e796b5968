"""SWA: an equal average of the weights from a start epoch on, with BatchNorm statistics recomputed.

Formulas: :mod:`lightning_tricks.averaging`; what it owns and shares: ``docs/method_cards.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from lightning_tricks._lightning import LightningModule, Trainer, trainer_datamodule
from lightning_tricks.averaging import (
    AVERAGE_STATE_KEY,
    as_list,
    bn_buffers,
    bn_modules,
    check_start_in_run,
    check_swa_args,
    restore_,
    swa_label,
    swa_phase,
    swa_start_epoch,
    swa_weight,
    untouched,
    update_bn,
)
from lightning_tricks.callbacks._averaging import _Averaging
from lightning_tricks.callbacks._common import StepWatch
from lightning_tricks.callbacks._weights import RAW, weights_of
from lightning_tricks.callbacks.lr_schedule import LRSchedule
from lightning_tricks.checks import check_choice, check_int
from lightning_tricks.schedules import SWALRPhase

__all__ = ["SWA"]


class SWA(_Averaging):
    r"""Stochastic Weight Averaging (Izmailov et al. 2018, arXiv:1803.05407).

    From epoch ``start`` on, :math:`\bar w_{n+1} = \bar w_n + (w - \bar w_n) / (n + 1)` at each epoch end
    or optimizer step. ``swa_lr`` adds an ``SWALR``-like phase to the run's
    :class:`~lightning_tricks.callbacks.LRSchedule`; BatchNorm statistics are recomputed before the
    average is evaluated. Details: ``docs/method_cards.md``.

    Args:
        start: first averaged epoch: a fraction in (0, 1) of ``max_epochs`` (``int(start * max_epochs)``)
            or an int epoch index >= 0. It must fall inside the run.
        swa_lr: the SWA learning rate (same for all groups), or None to leave the LR alone.
        anneal_epochs: anneal to ``swa_lr`` over this many epochs (LR changed at epoch starts, as
            ``SWALR`` stepped once per epoch). Exclusive with ``anneal_steps``.
        anneal_steps: anneal to ``swa_lr`` over this many optimizer steps (LR changed every step).
        anneal: ``"cos"`` or ``"linear"``.
        update_every: ``"epoch"`` (average at the last optimizer step of each epoch) or ``"step"``.
        bn_update: recompute BatchNorm statistics of the average before evaluating it.
        bn_update_batches: at most this many training batches for the recompute (None: the whole
            training pass, ``limit_train_batches`` respected).
        evaluate: ``"average"``, ``"raw"`` or ``"both"`` (see :class:`EMA`). Before the first update
            the raw weights are evaluated.
        on_cpu, average_at_end, raw_suffix: as in :class:`EMA`.

    Example:
        >>> SWA(start=0.75, swa_lr=0.01, anneal_epochs=2).state_key
        "SWA{'start': 0.75, 'update_every': 'epoch'}"
    """

    def __init__(
        self,
        start: float | int = 0.75,
        swa_lr: float | None = None,
        anneal_epochs: int | None = None,
        anneal_steps: int | None = None,
        anneal: str = "cos",
        update_every: str = "epoch",
        bn_update: bool = True,
        bn_update_batches: int | None = None,
        evaluate: str = "average",
        on_cpu: bool = False,
        average_at_end: bool = True,
        raw_suffix: str = "_raw",
    ) -> None:
        super().__init__(evaluate, average_at_end, on_cpu, raw_suffix)
        check_swa_args(start, swa_lr, anneal_epochs, anneal_steps)
        check_choice("anneal", anneal, ("cos", "linear"))
        check_choice("update_every", update_every, ("epoch", "step"))
        check_int("bn_update_batches", bn_update_batches, 1, allow_none=True)
        self.start = start
        self.swa_lr = None if swa_lr is None else float(swa_lr)
        self.anneal_epochs = anneal_epochs
        self.anneal_steps = anneal_steps
        self.anneal = anneal
        self.update_every = update_every
        self.bn_update = bool(bn_update)
        self.bn_update_batches = bn_update_batches
        self.start_epoch: int | None = None  # resolved in setup
        self.num_averaged = 0
        self._steps = StepWatch()  # did an optimizer step happen in this batch?
        self._last_epoch_averaged = -1
        self._lr_owner: LRSchedule | None = None  # the LR owner SWA's phase goes to (with swa_lr)
        self._bn_state: dict[str, Tensor] | None = None  # BN statistics recomputed for the average
        self._bn_version = -1  # num_averaged the BN statistics belong to

    @property
    def state_key(self) -> str:
        return self._generate_state_key(start=self.start, update_every=self.update_every)

    def resolve_start_epoch(self, max_epochs: int | None) -> int:
        """The first averaged epoch for a run of ``max_epochs`` epochs (checks it is inside the run)."""
        return swa_start_epoch(self.start, max_epochs)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # evaluate='both' needs the module's evaluation_outputs
        if stage == "fit":
            self.start_epoch = self.resolve_start_epoch(trainer.max_epochs)
            if self.swa_lr is not None:
                self._lr_owner = LRSchedule.of(trainer, self._lr_name())

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.start_epoch is None:
            self.start_epoch = self.resolve_start_epoch(trainer.max_epochs)
        self._steps.start(trainer.global_step)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # not at fit start: reading the batches per epoch there sets up the train data before a checkpoint's
        # RNG state is back, and a resumed run's first epoch would be shuffled differently
        if self.swa_lr is not None:
            if self._lr_owner is None:  # setup did not run (the hook called by hand)
                self._lr_owner = LRSchedule.of(trainer, self._lr_name())
            self._lr_owner.add_phase(self._lr_name(), self.lr_phase(trainer))
        check_start_in_run(
            self.start_epoch,
            trainer.estimated_stepping_batches,
            trainer.num_training_batches,
            trainer.accumulate_grad_batches,
        )

    def _in_swa(self, trainer: Trainer) -> bool:
        return self.start_epoch is not None and trainer.current_epoch >= self.start_epoch

    def _lr_name(self) -> str:
        return swa_label(self.swa_lr, self.anneal_epochs, self.anneal_steps)

    def lr_phase(self, trainer: Trainer) -> SWALRPhase:
        """SWA's LR phase for this fit: from the first optimizer step of the start epoch, with
        ``steps_per_epoch = ceil(num_training_batches / accumulate_grad_batches)``."""
        assert self.swa_lr is not None and self.start_epoch is not None
        return swa_phase(
            self.swa_lr,
            self.start_epoch,
            trainer.num_training_batches,
            trainer.accumulate_grad_batches,
            self.anneal,
            self.anneal_steps,
            self.anneal_epochs,
        )

    def _update(self, trainer: Trainer) -> None:
        assert self._average is not None
        self._average.update_(swa_weight(self.num_averaged))
        self.num_averaged += 1
        self._started = True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._steps.stepped(trainer.global_step):
            return  # no optimizer step in this batch
        if not self._in_swa(trainer):
            return
        if self.update_every == "step":
            self._update(trainer)
        elif trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches:
            self._update(trainer)
            self._last_epoch_averaged = trainer.current_epoch

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # safety net: an epoch whose last batch was not recognised is still averaged once
        if self.update_every == "epoch" and self._in_swa(trainer) and self._last_epoch_averaged < trainer.current_epoch:
            self._update(trainer)
            self._last_epoch_averaged = trainer.current_epoch

    def _extra_targets(self, pl_module: LightningModule) -> dict[str, Tensor]:
        return bn_buffers(pl_module) if self.bn_update else {}

    def _after_average_loaded(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.bn_update or not bn_modules(pl_module):
            return
        buffers = bn_buffers(pl_module)
        if self._bn_state is not None and self._bn_version == self.num_averaged:
            restore_(list(buffers.values()), [self._bn_state[n] for n in buffers])
            return
        loader = trainer.train_dataloader
        datamodule = trainer_datamodule(trainer)
        if loader is None and datamodule is not None:
            loader = datamodule.train_dataloader()
        loaders = as_list(loader)
        if not loaders:
            self._warn_once(
                "no-bn-data",
                "SWA: no training data to recompute the BatchNorm statistics of "
                "the average; evaluating it with the raw model's statistics",
            )
            return
        limit = trainer.num_training_batches if trainer.train_dataloader is not None else float("inf")
        if self.bn_update_batches is not None:
            limit = min(limit, self.bn_update_batches)

        def batches() -> Iterator[Any]:
            for b in loaders[0]:
                yield trainer.strategy.batch_to_device(b)

        def forward(batch: Any) -> Any:
            return pl_module(batch[0] if isinstance(batch, (list, tuple)) else batch)

        with untouched(pl_module, loaders), torch.no_grad():
            update_bn(pl_module, batches(), forward, max_batches=limit)
            if trainer.world_size > 1:
                # each rank saw its shard: average the statistics so every rank evaluates the same model
                for b in buffers.values():
                    if b.is_floating_point():
                        b.copy_(trainer.strategy.reduce(b.clone(), reduce_op="mean"))
        self._bn_state = {n: b.detach().clone() for n, b in buffers.items()}
        self._bn_version = self.num_averaged

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._started and self._bn_state is not None and self._bn_version == self.num_averaged:
            # the averaged weights as evaluated: with the BatchNorm statistics recomputed for them
            state[AVERAGE_STATE_KEY].update({n: t.clone() for n, t in self._bn_state.items()})
        return state

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        weights = weights_of(pl_module)
        if (
            isinstance(state, dict)
            and self._started
            and self.evaluate != "raw"
            and self.bn_update
            and self._bn_version != self.num_averaged
            and weights.held == RAW
            and bn_modules(pl_module)
        ):
            # no evaluation since the last update (a save at a training epoch end, say): recompute the
            # BatchNorm statistics now, so the checkpoint's state dict is the model an evaluation runs on
            with weights.keep():
                self._hold_average(trainer, pl_module)
            if self._bn_state is not None and self._bn_version == self.num_averaged:
                state[AVERAGE_STATE_KEY].update({n: t.clone() for n, t in self._bn_state.items()})
                state.update(bn_state=self._bn_state, bn_version=self._bn_version)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def _extra_state(self) -> dict[str, Any]:
        return {
            "num_averaged": self.num_averaged,
            "start_epoch": self.start_epoch,
            "last_step": self._steps.last,
            "last_epoch_averaged": self._last_epoch_averaged,
            "bn_state": self._bn_state,
            "bn_version": self._bn_version,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.num_averaged = int(state.get("num_averaged", 0))
        start_epoch = state.get("start_epoch")
        if start_epoch is not None and self.start_epoch is None:
            self.start_epoch = int(start_epoch)
        self._steps.last = int(state.get("last_step", -1))
        self._last_epoch_averaged = int(state.get("last_epoch_averaged", -1))
        self._bn_state = state.get("bn_state")
        self._bn_version = int(state.get("bn_version", -1))
