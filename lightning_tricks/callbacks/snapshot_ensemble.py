"""Snapshot ensembles: M cosine LR cycles in one run, a snapshot at each cycle end, evaluated as an ensemble.

The cycles are :class:`lightning_tricks.schedules.CosineRestarts` with ``T_0 = ceil(T / M)``; the
evaluation is :func:`lightning_tricks.ensemble.evaluate_members`. Details: ``docs/method_cards.md``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_tricks._lightning import (
    Callback,
    LightningModule,
    Trainer,
    rank_zero_warn,
    trainer_callbacks,
    trainer_datamodule,
)
from lightning_tricks.augment import check_tta
from lightning_tricks.averaging import as_list, untouched
from lightning_tricks.callbacks._common import MemoStateKey, StepWatch
from lightning_tricks.callbacks._weights import weights_of
from lightning_tricks.callbacks.lr_schedule import LRSchedule
from lightning_tricks.checks import check_choice, check_int
from lightning_tricks.ensemble import CheckpointEnsemble, Template, check_cycles_match, evaluate_members, snapshot_steps
from lightning_tricks.schedules import CosineRestarts

__all__ = ["SnapshotEnsemble", "snapshot_steps"]


class SnapshotEnsemble(MemoStateKey, Callback):
    """Train ``M`` cosine LR cycles, keep a snapshot at each cycle end, evaluate the snapshots' ensemble.

    With ``schedule=True`` the cycles become the schedule of the run's
    :class:`~lightning_tricks.callbacks.LRSchedule` (which must have no schedule of its own); with
    ``schedule=False`` the LR is yours and its cycle ends must match. At test time each snapshot and the
    mean-of-softmax ensemble are logged as ``test/snapshot_<k>/<metric>`` and ``test/ensemble/<metric>``.
    Huang et al. 2017, arXiv:1704.00109; details in ``docs/method_cards.md``.

    Args:
        cycles: the number of cycles and snapshots ``M`` (at least 1, at most the number of epochs).
        keep: ``"memory"`` (host copies, also stored in checkpoints) or ``"disk"`` (files in
            ``dirpath``; checkpoints store the paths).
        dirpath: where ``keep="disk"`` writes (default ``<trainer.log_dir or default_root_dir>/snapshots``).
        schedule: drive the cosine cycles of the LR.
        evaluate: evaluate and log the snapshots and their ensemble at test time.
        metrics: ``{name: torchmetrics.Metric}`` updated with ``(probs, target)``; default accuracy and
            negative log-likelihood.
        tta: test-time augmentation of the snapshots' evaluation (``"none"``, ``"flip"``, ``"crop"``,
            ``"flip_crop"``); ``None`` takes the module's ``tta`` attribute (``"none"`` if it has none).

    Example:
        >>> SnapshotEnsemble(cycles=4).state_key
        "SnapshotEnsemble{'cycles': 4}"
    """

    def __init__(
        self,
        cycles: int,
        keep: str = "memory",
        dirpath: str | Path | None = None,
        schedule: bool = True,
        evaluate: bool = True,
        metrics: dict[str, Any] | None = None,
        tta: str | None = None,
    ) -> None:
        check_int("cycles", cycles, 1)
        if tta is not None:
            check_tta(tta)
        check_choice("keep", keep, ("memory", "disk"))
        self.cycles = cycles
        self.keep = keep
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.schedule = bool(schedule)
        self.evaluate = bool(evaluate)
        self.metrics = metrics
        self.tta = tta
        self.total_steps: int | None = None
        self.steps: list[int] = []  # optimizer-step counts that end a cycle
        self._snapshots: list[dict[str, Tensor] | str] = []
        self._taken: list[int] = []
        self._lr_owner: LRSchedule | None = None  # the LR owner the cycles go to (schedule=True)
        self._steps = StepWatch()  # did an optimizer step happen in this batch?
        self._cosine: CosineRestarts | None = None
        self.results: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(cycles=self.cycles)

    @property
    def snapshots(self) -> list[dict[str, Tensor] | str]:
        """The snapshots taken so far: state dicts (``keep="memory"``) or file paths (``"disk"``)."""
        return list(self._snapshots)

    def ensemble(
        self, template: Template, device: torch.device | str | None = None, tta: str | None = None
    ) -> CheckpointEnsemble:
        """A :class:`CheckpointEnsemble` of the snapshots (``template``: the module or a factory).

        ``tta``: the ensemble's test-time augmentation; ``None`` takes this callback's ``tta``, else the
        template's own (see :class:`CheckpointEnsemble`).
        """
        if not self._snapshots:
            raise ValueError("no snapshot has been taken yet")
        tta = tta if tta is not None else self.tta
        return CheckpointEnsemble(template, self._snapshots, use_average=False, device=device, tta=tta)

    def _owner_label(self) -> str:
        return f"SnapshotEnsemble(cycles={self.cycles}, schedule=True)"

    def _tta_for(self, pl_module: LightningModule) -> str:
        return check_tta(self.tta if self.tta is not None else str(getattr(pl_module, "tta", "none")))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        datamodule = trainer_datamodule(trainer)
        check_tta(
            self._tta_for(pl_module),
            bool(getattr(datamodule, "flip", True)),
            f"the DataModule {type(datamodule).__name__}",
        )
        if (
            stage == "fit"
            and trainer.max_epochs is not None
            and trainer.max_epochs > 0
            and self.cycles > trainer.max_epochs
        ):
            raise ValueError(
                f"SnapshotEnsemble cycles={self.cycles} is larger than the number of epochs "
                f"(max_epochs={trainer.max_epochs}); use at most one cycle per epoch"
            )
        if stage == "fit" and self.schedule:
            self._lr_owner = LRSchedule.of(trainer, self._owner_label())

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # not at fit start: reading the run length there sets up the train data before a checkpoint's RNG
        # state is back, and a resumed run's first epoch would be shuffled differently
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("SnapshotEnsemble needs a finite run (max_epochs or max_steps) to place its cycles")
        self.total_steps = int(total)
        if self.cycles > self.total_steps:
            raise ValueError(
                f"SnapshotEnsemble cycles={self.cycles} is larger than the run's {self.total_steps} optimizer steps"
            )
        self.steps = snapshot_steps(self.total_steps, self.cycles)
        self._cosine = CosineRestarts(T_0=math.ceil(self.total_steps / self.cycles), T_mult=1, min_factor=0.0)
        if self.schedule:
            if self._lr_owner is None:  # setup did not run (the hook called by hand)
                self._lr_owner = LRSchedule.of(trainer, self._owner_label())
            self._lr_owner.set_schedule(f"SnapshotEnsemble(cycles={self.cycles}, schedule=True)", self._cosine)
        else:
            others = [c for c in trainer_callbacks(trainer) if isinstance(c, LRSchedule)]
            for cb in others:
                check_cycles_match(self._cosine, getattr(cb, "schedule", None), self.total_steps, self.steps)
            if not others and not trainer.lr_scheduler_configs:
                rank_zero_warn(
                    "SnapshotEnsemble(schedule=False) with no LR schedule: nothing restarts the LR, "
                    "so the snapshots are just checkpoints of one descent"
                )
        self._steps.start(trainer.global_step)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._steps.stepped(step):
            return
        if step in self.steps and step not in self._taken:
            self._take(trainer, pl_module, step)

    def _take(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        # the raw (training) weights, wherever they are (weights service); copies on the host
        state = {k: v.detach().to("cpu", copy=True) for k, v in weights_of(pl_module).raw_tensors().items()}
        k = len(self._snapshots) + 1
        if self.keep == "memory":
            self._snapshots.append(state)
        else:
            root = self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "snapshots"
            path = root / f"snapshot_{k}-step={step}.pt"
            if trainer.is_global_zero:
                root.mkdir(parents=True, exist_ok=True)
                torch.save(state, path)
            trainer.strategy.barrier("snapshot")
            self._snapshots.append(str(path))
        self._taken.append(step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if len(self._snapshots) < self.cycles:
            rank_zero_warn(
                f"SnapshotEnsemble took {len(self._snapshots)} of {self.cycles} snapshots (the run "
                f"stopped at step {trainer.global_step}; cycles end after steps {self.steps})"
            )

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.evaluate:
            return
        if not self._snapshots:
            rank_zero_warn("SnapshotEnsemble: no snapshots to evaluate (fit first, or load a checkpoint with them)")
            return
        self.results = {}
        loaders = as_list(trainer.test_dataloaders)
        limits = trainer.num_test_batches
        weights = weights_of(pl_module)
        for i, loader in enumerate(loaders):
            limit = limits[i] if i < len(limits) else float("inf")

            def batches(loader: Any = loader, limit: float = limit, i: int = i) -> Any:
                for b, batch in enumerate(loader):
                    if b >= limit:
                        break
                    yield trainer.strategy.batch_to_device(batch, dataloader_idx=i)

            def load(m: int, state: Any) -> None:
                weights.hold(f"snapshot_{m + 1}", state)

            # each member is held as "snapshot_<k>"; afterwards the module holds what it held before
            with untouched(pl_module, loaders), weights.keep():
                out = evaluate_members(
                    pl_module,
                    self._snapshots,
                    batches,
                    metrics=self.metrics,
                    use_average=False,
                    restore=False,
                    load=load,
                    tta=self._tta_for(pl_module),
                )
            suffix = f"/dataloader_idx_{i}" if len(loaders) > 1 else ""
            for k, member in enumerate(out["members"], start=1):
                for name, value in member.items():
                    self.results[f"test/snapshot_{k}/{name}{suffix}"] = value
            for name, value in out["ensemble"].items():
                self.results[f"test/ensemble/{name}{suffix}"] = value
        for key, value in self.results.items():
            pl_module.log(key, value, on_step=False, on_epoch=True, add_dataloader_idx=False)

    def state_dict(self) -> dict[str, Any]:
        return {
            "snapshots": list(self._snapshots),
            "taken": list(self._taken),
            "last_step": self._steps.last,
            "keep": self.keep,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._snapshots = list(state_dict.get("snapshots", []))
        self._taken = [int(s) for s in state_dict.get("taken", [])]
        self._steps.last = int(state_dict.get("last_step", -1))
