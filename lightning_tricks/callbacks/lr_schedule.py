"""Apply any :mod:`lightning_tricks.schedules` schedule per optimizer step, resumably."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_tricks._lightning import (
    Callback,
    LightningModule,
    MisconfigurationException,
    Trainer,
    rank_zero_warn,
)

ScheduleFn = Callable[[int, "int | None"], float]


class LRSchedule(Callback):
    """Set every parameter group's LR to ``base_lr * schedule(t, T)`` before each optimizer step.

    ``t`` is ``trainer.global_step``, the number of optimizer steps done so far, so gradient
    accumulation is respected (``accumulate_grad_batches=k`` moves the schedule once per ``k``
    batches) and ``t = 0`` is the first step; ``T`` is ``total_steps`` or
    ``trainer.estimated_stepping_batches``. ``base_lr`` is each group's LR when training starts
    (``group["initial_lr"]`` if the group has one, the torch convention, else ``group["lr"]``), stored
    in ``group["initial_lr"]`` and in this callback's checkpoint state, so a resumed run continues on the
    same curve. Callbacks that change base LRs at fit start (:class:`LinearScaling`,
    :class:`LRRangeTest`) act before the capture whatever their order in the callback list.

    Parameter groups added during training (e.g. when a backbone is unfrozen) join the schedule with the
    LR they were added with as their base LR.

    With a ``momentum`` schedule (e.g. ``OneCycle(...).momentum()``), each group's SGD/RMSprop
    ``momentum`` or Adam ``beta1`` is set to ``momentum(t, T)`` (a value, not a multiplier).

    When the LR is written: at ``on_train_start``, ``on_train_batch_start`` and ``on_train_batch_end``
    (always ``schedule(trainer.global_step)``, so between steps the optimizer holds the LR of the *next*
    step: step 0's before the first batch, the same value through an accumulation window, and a
    ``LearningRateMonitor`` or the forward pass reads the right value whatever the callback order), and
    in ``on_before_optimizer_step``, right before the update that uses it (this also covers manual
    optimization with several steps per batch). The LR set there is logged as ``log_name`` (``"lr"``;
    ``"lr/<group name>"`` per group when groups have different base LRs; ``"momentum"`` likewise), as a
    CPU tensor: no device transfer, no sync.

    A module whose ``configure_optimizers`` also returns an LR scheduler for a driven optimizer is
    refused with an error: two schedules would fight over the LR.

    Args:
        schedule: any callable ``schedule(step, total_steps) -> multiplier``, e.g.
            ``Warmup(steps=0.05, then=Cosine())``.
        momentum: optional momentum schedule ``(step, total_steps) -> momentum``.
        total_steps: run length in optimizer steps; default ``trainer.estimated_stepping_batches``.
        optimizers: index or indices of the optimizers to drive; default all.
        log: log the LR (and momentum) set at each optimizer step.
        log_name: key of the logged LR.

    Example:
        >>> from lightning_tricks.schedules import OneCycle
        >>> one_cycle = OneCycle(pct_start=0.25)
        >>> callback = LRSchedule(one_cycle, momentum=one_cycle.momentum())
        >>> # Trainer(callbacks=[callback]).fit(module)   # the module's optimizer LR is the peak LR
    """

    def __init__(
        self,
        schedule: ScheduleFn,
        momentum: ScheduleFn | None = None,
        total_steps: int | None = None,
        optimizers: int | Sequence[int] | None = None,
        log: bool = True,
        log_name: str = "lr",
    ) -> None:
        if not callable(schedule):
            raise ValueError(f"schedule must be callable as schedule(step, total_steps), got {schedule!r}")
        if momentum is not None and not callable(momentum):
            raise ValueError(f"momentum must be None or callable as momentum(step, total_steps), got {momentum!r}")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f"total_steps must be None or an int >= 1, got {total_steps!r}")
        if optimizers is not None:
            idx = [optimizers] if isinstance(optimizers, int) else list(optimizers)
            if not idx or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in idx):
                raise ValueError(f"optimizers must be None, an index >= 0 or a list of them, got {optimizers!r}")
            optimizers = sorted(set(idx))
        if not isinstance(log_name, str) or not log_name:
            raise ValueError(f"log_name must be a non-empty string, got {log_name!r}")
        self.schedule = schedule
        self.momentum = momentum
        self.total_steps = total_steps
        self.optimizers = optimizers
        self.log = bool(log)
        self.log_name = log_name
        # runtime state (per fit)
        self._indices: list[int] = []
        self._total: int | None = None
        self._base: dict[int, list[float]] | None = None
        self._loaded: dict[str, Any] | None = None
        self._lr_keys: dict[int, list[str | None]] = {}
        self._momentum_keys: dict[int, list[str | None]] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(schedule=repr(self.schedule), momentum=repr(self.momentum),
                                        optimizers=self.optimizers)

    # -- the rule ---------------------------------------------------------------------------------
    @property
    def run_length(self) -> int | None:
        """``T`` of this fit (``None`` before fit start or for an endless run)."""
        return self._total

    def lr_at(self, step: int) -> dict[int, list[float]]:
        """The LR of every driven group at optimizer step ``step``: ``{optimizer index: [lr per group]}``."""
        if self._base is None:
            raise RuntimeError("LRSchedule has no base LRs yet: they are captured when training starts")
        factor = self.schedule(step, self._total)
        return {i: [b * factor for b in base] for i, base in self._base.items()}

    def _apply(self, trainer: Trainer, step: int, only: int | None = None) -> tuple[float, float | None]:
        assert self._base is not None
        factor = float(self.schedule(step, self._total))
        mom = None if self.momentum is None else float(self.momentum(step, self._total))
        optimizers = trainer.optimizers
        for i, base in self._base.items():
            if only is not None and i != only:
                continue
            groups = optimizers[i].param_groups
            if len(groups) != len(base):
                base = self._regroup(trainer, i)
            for group, b in zip(groups, base):
                group["lr"] = b * factor
                if mom is not None:
                    if "betas" in group:
                        group["betas"] = (mom, *tuple(group["betas"])[1:])
                    else:
                        group["momentum"] = mom
        return factor, mom

    def _regroup(self, trainer: Trainer, i: int) -> list[float]:
        """Groups were added to optimizer ``i`` during training (e.g. by unfreezing a backbone): they join
        the schedule with their LR at this moment as base LR (or their ``initial_lr``)."""
        assert self._base is not None
        groups = trainer.optimizers[i].param_groups
        base = self._base[i][: len(groups)]
        for group in groups[len(base):]:
            b = float(group.get("initial_lr", group["lr"]))
            group["initial_lr"] = b
            base.append(b)
        self._base[i] = base
        self._lr_keys = self._keys(trainer.optimizers, self._base, self.log_name)
        if self.momentum is not None:
            self._momentum_keys = self._keys(trainer.optimizers, {j: [0.0] * len(b) for j, b in self._base.items()},
                                             "momentum")
        return base

    # -- Lightning hooks --------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._base, self._total, self._loaded, self._indices = None, None, None, []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizers = trainer.optimizers
        if not optimizers:
            raise MisconfigurationException(
                "LRSchedule found no optimizer: configure_optimizers must return one for the schedule to drive")
        indices = list(range(len(optimizers))) if self.optimizers is None else self.optimizers
        bad = [i for i in indices if i >= len(optimizers)]
        if bad:
            raise ValueError(f"LRSchedule(optimizers={self.optimizers!r}): index {bad[0]} is out of range; "
                             f"the module has {len(optimizers)} optimizer(s)")
        self._indices = list(indices)
        driven = {id(optimizers[i]): i for i in indices}
        for config in trainer.lr_scheduler_configs:
            opt = getattr(config.scheduler, "optimizer", None)
            if opt is not None and id(opt) in driven:
                raise MisconfigurationException(
                    f"LRSchedule({self.schedule!r}) and the module's own LR scheduler "
                    f"{type(config.scheduler).__name__} would both set the LR of optimizer {driven[id(opt)]} "
                    f"({type(opt).__name__}). Use one: return only the optimizer from configure_optimizers, "
                    "or drop the LRSchedule callback (or pass LRSchedule(optimizers=...) to drive the others).")
        if self.momentum is not None:
            for i in indices:
                for j, group in enumerate(optimizers[i].param_groups):
                    if "betas" not in group and "momentum" not in group:
                        raise MisconfigurationException(
                            f"LRSchedule(momentum={self.momentum!r}): optimizer {i} ({type(optimizers[i]).__name__}) "
                            f"group {j} has neither 'momentum' nor 'betas' to schedule; use SGD/RMSprop/Adam(W) or "
                            "drop the momentum schedule")
        self._total = self._run_length(trainer)
        for name, fn in (("schedule", self.schedule), ("momentum", self.momentum)):
            if fn is None:
                continue
            try:
                check = getattr(fn, "check", None)
                check(self._total) if check is not None else fn(0, self._total)
            except ValueError as e:
                hint = "" if self._total is not None else (
                    " (the Trainer gives no run length: max_steps=-1 and max_epochs=-1; "
                    "pass LRSchedule(total_steps=...))")
                raise ValueError(f"LRSchedule {name} {fn!r} cannot run {self._total} steps: {e}{hint}") from e

    def _run_length(self, trainer: Trainer) -> int | None:
        if self.total_steps is not None:
            return self.total_steps
        estimate = trainer.estimated_stepping_batches
        if estimate is None or not math.isfinite(estimate) or estimate < 1:
            return None
        return int(estimate)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizers = trainer.optimizers
        if not self._indices:  # on_fit_start did not run (e.g. the hook was called by hand)
            self.on_fit_start(trainer, pl_module)
        base: dict[int, list[float]] = {}
        loaded = (self._loaded or {}).get("base_lrs")
        for i in self._indices:
            groups = optimizers[i].param_groups
            saved = loaded.get(i) if isinstance(loaded, dict) else None
            if saved is not None and len(saved) == len(groups):
                base[i] = [float(b) for b in saved]
            else:
                if saved is not None:
                    rank_zero_warn(f"LRSchedule: the checkpoint has {len(saved)} base LR(s) for optimizer {i} but "
                                   f"it has {len(groups)} group(s) now; using the groups' current LRs")
                base[i] = [float(g.get("initial_lr", g["lr"])) for g in groups]
            for group, b in zip(groups, base[i]):
                group["initial_lr"] = b
        saved_total = (self._loaded or {}).get("total_steps")
        if saved_total is not None and saved_total != self._total:
            rank_zero_warn(f"LRSchedule: the checkpoint's run was {saved_total} steps long, this run is "
                           f"{self._total}; the LR curve continues on the new length from step {trainer.global_step}")
        self._base = base
        self._loaded = None
        self._lr_keys = self._keys(optimizers, base, self.log_name)
        if self.momentum is not None:
            self._momentum_keys = self._keys(optimizers, {i: [0.0] * len(b) for i, b in base.items()}, "momentum")
        self._apply(trainer, trainer.global_step)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._base is not None:
            self._apply(trainer, trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._base is not None:  # after a step: the optimizer now holds the LR of the next one
            self._apply(trainer, trainer.global_step)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._base is None:
            return
        index = next((i for i in self._base if trainer.optimizers[i] is optimizer), None)
        if index is None:
            return  # an optimizer this callback does not drive
        self._apply(trainer, trainer.global_step, only=index)
        if self.log:
            groups = optimizer.param_groups
            for j, key in enumerate(self._lr_keys[index]):
                if key is not None:
                    pl_module.log(key, torch.tensor(groups[j]["lr"], dtype=torch.float64), on_step=True,
                                  on_epoch=False, batch_size=1)
            for j, key in enumerate(self._momentum_keys.get(index, [])):
                if key is not None:
                    g = groups[j]
                    value = g["betas"][0] if "betas" in g else g["momentum"]
                    pl_module.log(key, torch.tensor(value, dtype=torch.float64), on_step=True, on_epoch=False,
                                  batch_size=1)

    @staticmethod
    def _keys(optimizers: list, base: dict[int, list[float]], name: str) -> dict[int, list[str | None]]:
        """One key when all driven groups share a base LR, else one per group (``name/<group name>``)."""
        values = {b for bs in base.values() for b in bs}
        if len(values) <= 1:
            first = min(base)
            return {i: [name if (i == first and j == 0) else None for j in range(len(bs))] for i, bs in base.items()}
        keys: dict[int, list[str | None]] = {}
        seen: set[str] = set()
        for i, bs in base.items():
            keys[i] = []
            for j, group in enumerate(optimizers[i].param_groups[: len(bs)]):
                label = str(group.get("name", f"pg{j}"))
                if len(base) > 1:
                    label = f"opt{i}/{label}"
                key = f"{name}/{label}"
                if key in seen:
                    key = f"{key}_{j}"
                seen.add(key)
                keys[i].append(key)
        return keys

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": None if self._base is None else {i: list(b) for i, b in self._base.items()},
                "total_steps": self._total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        base = state_dict.get("base_lrs")
        self._loaded = {
            "base_lrs": None if base is None else {int(i): [float(x) for x in b] for i, b in base.items()},
            "total_steps": state_dict.get("total_steps"),
        }
