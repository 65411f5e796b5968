"""Apply any :mod:`lightning_tricks.schedules` schedule per optimizer step, resumably: the one LR owner.

:class:`LRSchedule` is the only component that writes ``param_group["lr"]`` (and momentum) during fit.
Other tricks contribute to the LR through it (:func:`lr_owner` finds or adds it), never by writing the
groups themselves; see the class docstring for who contributes what.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_tricks._lightning import (
    Callback,
    FitClock,
    LightningModule,
    MisconfigurationException,
    Trainer,
    global_step_of,
    publish_step_metrics,
    rank_zero_info,
    rank_zero_warn,
    should_log_step,
    trainer_callbacks,
)
from lightning_tricks.callbacks._common import MemoStateKey
from lightning_tricks.schedules import Constant, Plateau, Warmup, plateau_of

__all__ = ["LRSchedule", "lr_owner"]

ScheduleFn = Callable[[int, "int | None"], float]


#: steps of the schedule computed at once, ahead of the run (see LRSchedule._factor)
FACTOR_TABLE_STEPS = 256


def _plateau_in(schedule: object) -> Plateau | None:
    """The :class:`~lightning_tricks.schedules.Plateau` a schedule is or ends in (after warmups), else ``None``."""
    while isinstance(schedule, Warmup):
        schedule = schedule.then
    return schedule if isinstance(schedule, Plateau) else None


def lr_owner(trainer: Trainer, by: str) -> LRSchedule:
    """The :class:`LRSchedule` that owns the LR in ``trainer``; one is added when there is none.

    Call it from a callback's ``setup`` (before Lightning restores callback states, so an added owner
    gets its checkpoint state back on resume). The owner is found with ``isinstance``, never by name.
    With several LRSchedules, the one that drives optimizer 0 (``optimizers=None`` or containing 0)
    is returned. With none, ``LRSchedule(Constant(), log=False)`` is appended to ``trainer_callbacks(trainer)``
    (said once on rank zero); if the module turns out to configure its own torch LR scheduler, that
    added owner steps aside for the scheduler's optimizers at fit start (base-LR changes then go to the
    scheduler's ``base_lrs``; phases and schedules are refused there).

    Args:
        trainer: the Trainer.
        by: who asks, e.g. ``"SWA(swa_lr=0.01)"`` (used in messages).
    """
    owners = [cb for cb in trainer_callbacks(trainer) if isinstance(cb, LRSchedule)]
    if owners:
        first = [cb for cb in owners if cb.optimizers is None or 0 in cb.optimizers]
        return (first or owners)[0]
    owner = LRSchedule(Constant(), log=False)
    owner._implicit = True
    trainer_callbacks(trainer).append(owner)
    rank_zero_info(
        f"{by} changes the learning rate through LRSchedule, and there was none: added "
        "LRSchedule(Constant()) to own the LR (add your own LRSchedule to choose the schedule)"
    )
    return owner


class LRSchedule(MemoStateKey, Callback):
    """Set every parameter group's LR to ``base_lr * schedule(t, T)`` before each optimizer step; the LR owner.

    ``t`` is ``trainer.global_step``, the number of optimizer steps done so far, so gradient
    accumulation is respected (``accumulate_grad_batches=k`` moves the schedule once per ``k``
    batches) and ``t = 0`` is the first step; ``T`` is ``total_steps`` or
    ``trainer.estimated_stepping_batches``. ``base_lr`` is each group's LR when training starts
    (``group["initial_lr"]`` if the group has one, the torch convention, else ``group["lr"]``), stored
    in ``group["initial_lr"]`` and in this callback's checkpoint state, so a resumed run continues on the
    same curve.

    **What it owns.** During fit this callback is the only writer of ``param_group["lr"]`` (and of the
    momentum / ``beta1`` with a ``momentum`` schedule) of the optimizers it drives, as timm's
    ``Scheduler.update_groups`` is for timm (one writer, base values in ``initial_lr``). The result does
    not depend on the order of the callback list. Other tricks contribute through its methods, found
    with :func:`lr_owner` (which adds an ``LRSchedule(Constant())`` when the user gave none):

    - :class:`~lightning_tricks.callbacks.SWA` (``swa_lr``): a phase over the tail of the schedule,
      :class:`~lightning_tricks.schedules.SWALRPhase`, via :meth:`add_phase`. From its start step each
      group anneals from ``base_lr * schedule(start, T)`` to ``swa_lr``; before it, the schedule rules.
    - :class:`~lightning_tricks.callbacks.SnapshotEnsemble` (``schedule=True``): the schedule itself,
      its :class:`~lightning_tricks.schedules.CosineRestarts`, via :meth:`set_schedule`; refused when the
      user's LRSchedule has another schedule.
    - :class:`~lightning_tricks.callbacks.LinearScaling`: :meth:`scale_base_lrs`;
      :class:`~lightning_tricks.callbacks.LRRangeTest` (``apply_to``): :meth:`set_base_lrs`. Base-LR
      changes made before training starts go to the groups' ``lr``/``initial_lr`` and are captured
      with them; on resume the checkpoint's base LRs stand (no double scaling).
    - :class:`~lightning_tricks.callbacks.FreezeUnfreeze`: parameter groups added during training join
      the schedule with their ``initial_lr`` (else their LR at that moment) as base LR.

    **Reduce on plateau.** With a :class:`~lightning_tricks.schedules.Plateau` as the schedule, or as the
    ``then`` of a :class:`~lightning_tricks.schedules.Warmup` (``Warmup(steps=0.05, then=Plateau())``), this
    callback steps it at the end of every validation during fit (each epoch, or every ``val_check_interval``
    steps: once per validation, never in the sanity check) with ``trainer.callback_metrics[plateau.monitor]``
    (rank 0's value, broadcast, so every DDP rank reduces together), and from then on each group's LR is
    ``plateau.lrs(base_lrs)``: torch ``ReduceLROnPlateau``'s LRs, ``min_lr`` and ``eps`` included. A missing
    metric fails with one line naming it and the logged ones, as Lightning's plateau scheduler does;
    validation switched off (``limit_val_batches=0``) is refused at fit start. Behind a warmup the plateau
    governs from the warmup's last step on: validations that end before it are not counted, and the factor
    multiplies the LR after the warmup. The plateau's state (best, bad validations, cooldown, reductions,
    current factor) is part of this callback's checkpoint state, so a resumed run reduces at the same
    validations. With contributors: base-LR changes (LinearScaling, the range test, unfrozen groups) are the
    LRs the reductions start from; SWA's phase starts from the plateau's LRs at its start step, and the
    plateau stops counting once the phase has begun (the phase owns the tail); SnapshotEnsemble's cycles
    replace the schedule, so beside a Plateau they are refused (use ``SnapshotEnsemble(schedule=False)``).

    Pairs that cannot compose are refused at fit start with one message naming both: two LRSchedules
    driving the same optimizer; an LRSchedule beside the module's own LR scheduler for the same
    optimizer; a phase or schedule contributed where a module scheduler owns the LR; a second
    contributor of a schedule or phase. Anything else that writes ``lr`` during fit is caught right
    before the optimizer step: a ``RuntimeError`` names the optimizer, the group, the value found and
    the value written.

    With a ``momentum`` schedule (e.g. ``OneCycle(...).momentum()``), each group's SGD/RMSprop
    ``momentum`` or Adam ``beta1`` is set to ``momentum(t, T)`` (a value, not a multiplier).

    When the LR is written: once per optimizer step, in the first of ``on_train_start``,
    ``on_train_batch_end`` and ``on_before_optimizer_step`` that sees a new ``trainer.global_step``
    (always ``schedule(trainer.global_step)``, so between steps the optimizer holds the LR of the *next*
    step: step 0's before the first batch, the same value through an accumulation window, and a
    ``LearningRateMonitor`` or the forward pass reads the right value whatever the callback order).
    Each of the two per-step calls first compares the groups' ``lr`` with what was
    written (a few float comparisons, no allocation, no device sync), so another writer is caught at
    the latest in the hook after its write; one in ``on_before_optimizer_step`` that runs after this
    callback's is caught one step late, at the next ``on_train_batch_end``. The LR of an optimizer step
    is logged in ``on_before_optimizer_step`` on the steps the loggers write (``trainer.log_every_n_steps``,
    as Lightning's ``LearningRateMonitor``) as ``log_name`` (``"lr"``; ``"lr/<group name>"`` per group when
    groups have different base LRs; ``"momentum"`` likewise): written to the loggers (rank zero) at the
    step Lightning logs that batch under and put in ``trainer.callback_metrics`` as a CPU tensor
    (:func:`~lightning_tricks._lightning.publish_step_metrics`; ``LightningModule.log`` costs about 1 ms of
    host time per call). Host time per step (``benchmarks/overhead.py``, CPU): under 30 µs, logging
    included; the schedule's values come from a table computed 256 steps ahead (a schedule is a pure
    function of ``(step, T)``; one with a :class:`~lightning_tricks.schedules.Plateau` is called per step),
    ``global_step`` and the log test from the fit's counters (:class:`~lightning_tricks._lightning.FitClock`).

    Args:
        schedule: any callable ``schedule(step, total_steps) -> multiplier``, e.g.
            ``Warmup(steps=0.05, then=Cosine())``.
        momentum: optional momentum schedule ``(step, total_steps) -> momentum``.
        total_steps: run length in optimizer steps; default ``trainer.estimated_stepping_batches``.
        optimizers: index or indices of the optimizers to drive; default all.
        log: log the LR (and momentum) every ``trainer.log_every_n_steps`` optimizer steps (the attribute
            is ``log_lr``: Lightning sets every callback's ``log`` to the module's ``log`` method).
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
        if momentum is not None and _plateau_in(momentum) is not None:
            raise ValueError(
                f"momentum={momentum!r}: a Plateau reduces the learning rate; it cannot be a momentum schedule"
            )
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
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
        # not ``self.log``: Lightning sets ``callback.log = module.log`` on every callback at fit start
        self.log_lr = bool(log)
        self.log_name = log_name
        self._initial_schedule = schedule
        self._key_schedule = repr(schedule)  # the state key stays the same when a contributor sets the schedule
        self._implicit = False  # added by lr_owner(), not by the user
        # contributions (per fit)
        self._phases: dict[str, Any] = {}  # contributor -> phase (at most one)
        self._schedule_by: str | None = None  # contributor that set the schedule
        self._hints: dict[str, str] = {}  # contributor -> its own way out, added to a refusal
        # runtime state (per fit)
        self._prepared = False
        self._indices: list[int] = []
        self._deferred: dict[int, str] = {}  # optimizer index -> the module's scheduler that owns its LR
        self._total: int | None = None
        self._base: dict[int, list[float]] | None = None
        self._loaded: dict[str, Any] | None = None
        self._phase_factor: dict[str, float] = {}  # contributor -> schedule(start_step, T)
        self._lr_keys: dict[int, list[str | None]] = {}
        self._momentum_keys: dict[int, list[str | None]] = {}
        self._written_step = -1  # global_step of the last write, -1: write at the next call
        self._written: dict[int, list[float]] = {}  # optimizer index -> the lr written in each group
        # (schedule, T, first step, [schedule(t, T) for the next steps]): see _factor
        self._factor_table: tuple[Any, int | None, int, list[float]] = (None, None, 0, [])
        self._clock: FitClock | None = None  # global_step and the log test, cheaply (set at train start)
        self._driven: dict[int, int] = {}  # id(optimizer) -> its index, for the driven optimizers
        # reduce on plateau (an event-driven schedule this callback steps at validation end)
        self._plateau: Plateau | None = _plateau_in(schedule)
        self._plateau_start = 0  # first optimizer step the plateau governs (after the warmups)
        self._plateau_cache: dict[int, tuple[int, list[float], list[float]]] = {}  # i -> (reductions, base, lrs)
        self._plateau_steps = 0  # validations the plateau took in this fit

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            schedule=self._key_schedule, momentum=repr(self.momentum), optimizers=self.optimizers
        )

    @property
    def added(self) -> bool:
        """Whether :func:`lr_owner` added this LRSchedule (no user gave one); its schedule is then free for a
        contributor to set (:meth:`set_schedule`) and it steps aside where the module has its own scheduler."""
        return self._implicit

    def _name(self) -> str:
        added = " (added by lr_owner)" if self._implicit else ""
        opts = "" if self.optimizers is None else f", optimizers={self.optimizers}"
        return f"LRSchedule({self.schedule!r}{opts}){added}"

    # -- the rule ---------------------------------------------------------------------------------
    @property
    def run_length(self) -> int | None:
        """``T`` of this fit (``None`` before fit start or for an endless run)."""
        return self._total

    def lr_at(self, step: int) -> dict[int, list[float]]:
        """The LR of every driven group at optimizer step ``step``: ``{optimizer index: [lr per group]}``.

        With a :class:`~lightning_tricks.schedules.Plateau`, under its state now (the reductions so far).
        """
        if self._base is None:
            raise RuntimeError("LRSchedule has no base LRs yet: they are captured when training starts")
        phase = self._active_phase(step)
        factor = float(self.schedule(step, self._total))
        return {i: list(self._lrs(i, base, step, factor, phase)) for i, base in self._base.items()}

    def _lrs(self, i: int, base: list[float], step: int, factor: float, phase: tuple[str, Any] | None) -> list[float]:
        """The LR of each of optimizer ``i``'s groups at ``step`` (``factor``: ``schedule(step, T)``)."""
        if phase is None:
            if self._plateau_governs(step):
                return self._plateau_lrs(i, base)
            return [b * factor for b in base]
        name, p = phase
        if self._plateau_governs(p.start_step):  # the plateau's LRs at the start (it stops stepping in the phase)
            start = self._plateau_lrs(i, base)
        else:
            f0 = self._start_factor(name, p)
            start = [b * f0 for b in base]
        return [p.lr(step, s) for s in start]

    def _plateau_governs(self, step: int) -> bool:
        return self._plateau is not None and step >= self._plateau_start

    def _plateau_lrs(self, i: int, base: list[float]) -> list[float]:
        """``plateau.lrs(base)``, recomputed only after a reduction or a change of the base LRs."""
        assert self._plateau is not None
        cached = self._plateau_cache.get(i)
        reductions = self._plateau.reductions
        if cached is not None and cached[0] == reductions and cached[1] == base:
            return cached[2]
        lrs = self._plateau.lrs(base)
        self._plateau_cache[i] = (reductions, list(base), lrs)
        return lrs

    def _active_phase(self, step: int) -> tuple[str, Any] | None:
        for name, phase in self._phases.items():
            if phase.active(step):
                return name, phase
        return None

    def _start_factor(self, name: str, phase: Any) -> float:
        f = self._phase_factor.get(name)
        if f is None:
            f = float(self.schedule(phase.start_step, self._total))
            self._phase_factor[name] = f
        return f

    # -- contributions (the public API other callbacks use) ---------------------------------------
    def add_phase(self, by: str, phase: Any, hint: str = "") -> None:
        """Put ``phase`` over the tail of the schedule for every driven group (SWA's SWA-LR phase).

        ``phase`` has ``start_step``, ``active(step)`` and ``lr(step, lr_at_start)`` (e.g.
        :class:`~lightning_tricks.schedules.SWALRPhase`); from ``start_step`` on a group's LR is
        ``phase.lr(step, base_lr * schedule(start_step, T))``. Call it in ``on_fit_start`` or
        ``on_train_start`` (this callback's ``setup`` clears the contributions of the previous fit), before
        the phase starts. One phase per fit: a second contributor is refused, and so is a
        phase where the module's own LR scheduler owns the LR (checked at fit start). ``by`` names the
        contributor in messages; ``hint`` is added to a refusal (the contributor's own way out).
        """
        for other in self._phases:
            if other != by:
                raise MisconfigurationException(
                    f"{by} and {other} both put an LR phase over {self._name()}; only one can own the tail of "
                    f"the LR curve. Keep the LR argument of one of them.{_hint(hint)}"
                )
        self._phases[by] = phase
        self._hints[by] = hint
        self._phase_factor.pop(by, None)
        self._written_step = -1
        if self._prepared:
            self._check_contributions(by, hint)

    def set_schedule(self, by: str, schedule: ScheduleFn, hint: str = "") -> None:
        """Let ``by`` choose the schedule (SnapshotEnsemble's cosine cycles); call it in ``on_fit_start``.

        Accepted when this owner was added by :func:`lr_owner` or its schedule already equals
        ``schedule``; refused (with one message naming both) when the user's LRSchedule has another
        schedule, when another contributor set one, or where the module's own LR scheduler owns the LR.
        """
        if self._schedule_by is not None and self._schedule_by != by:
            raise MisconfigurationException(
                f"{by} and {self._schedule_by} both set the schedule of {self._name()}; keep one of them.{_hint(hint)}"
            )
        if not self._implicit and self._schedule_by is None:
            if schedule != self.schedule:
                raise MisconfigurationException(
                    f"{by} sets the LR schedule to {schedule!r}, but {self._name()} has its own schedule: two "
                    f"schedules cannot both own the LR. Remove the LRSchedule callback, or give it exactly "
                    f"{schedule!r}.{_hint(hint)}"
                )
            return
        self.schedule = schedule
        self._schedule_by = by
        self._hints[by] = hint
        self._phase_factor = {}
        self._written_step = -1
        self._plateau, self._plateau_cache = _plateau_in(schedule), {}
        if self._prepared:
            self._check_contributions(by, hint)
            self._check_schedule("schedule", schedule)
            self._prepare_plateau(trainer=None)

    def scale_base_lrs(self, trainer: Trainer, factor: float, by: str) -> list[tuple[int, int, float, float]]:
        """Multiply every group's base LR by ``factor`` (LinearScaling); return ``(opt, group, old, new)``.

        Before training starts this scales ``group["lr"]`` and, if present, ``group["initial_lr"]`` of
        every optimizer (captured as base LRs at train start); afterwards the stored base LRs. Where the
        module's own torch LR scheduler owns the LR (this owner was added and stepped aside), that
        scheduler's ``base_lrs`` are scaled too.
        """
        return self._change_base(trainer, by, lambda i, j, x: x * factor)

    def set_base_lrs(
        self, trainer: Trainer, lrs: dict[int, Sequence[float]], by: str
    ) -> list[tuple[int, int, float, float]]:
        """Set the base LR of the groups of the given optimizers (the range test's hand-off).

        ``lrs`` maps an optimizer index to one LR per group. Applied as :meth:`scale_base_lrs` is;
        returns ``(opt, group, old, new)``.
        """
        optimizers = trainer.optimizers
        for i, values in lrs.items():
            if not 0 <= i < len(optimizers) or len(values) != len(optimizers[i].param_groups):
                raise ValueError(
                    f"{by}: set_base_lrs got {len(values)} LR(s) for optimizer {i}, which has "
                    f"{len(optimizers[i].param_groups) if 0 <= i < len(optimizers) else 'no'} group(s)"
                )
        return self._change_base(trainer, by, lambda i, j, x: float(lrs[i][j]) if i in lrs else x)

    def _change_base(
        self, trainer: Trainer, by: str, fn: Callable[[int, int, float], float]
    ) -> list[tuple[int, int, float, float]]:
        self._prepare(trainer)
        changes: list[tuple[int, int, float, float]] = []
        for i, opt in enumerate(trainer.optimizers):
            base = None if self._base is None else self._base.get(i)
            for j, group in enumerate(opt.param_groups):
                if base is not None and j < len(base):  # after capture: the stored base LR
                    old = base[j]
                    base[j] = fn(i, j, old)
                    group["initial_lr"] = base[j]
                    changes.append((i, j, old, base[j]))
                    continue
                old = group["lr"]
                new = fn(i, j, old)
                if "initial_lr" in group:
                    group["initial_lr"] = fn(i, j, group["initial_lr"])
                group["lr"] = new
                changes.append((i, j, old, new))
        for config in trainer.lr_scheduler_configs:
            scheduled = getattr(config.scheduler, "optimizer", None)
            index = next((i for i, o in enumerate(trainer.optimizers) if o is scheduled), None)
            base_lrs = getattr(config.scheduler, "base_lrs", None)
            if index is not None and index not in self._indices and isinstance(base_lrs, list):
                config.scheduler.base_lrs = [fn(index, j, b) for j, b in enumerate(base_lrs)]
        self._written_step = -1
        return changes

    # -- checks -----------------------------------------------------------------------------------
    def _prepare(self, trainer: Trainer) -> None:
        """Resolve the driven optimizers, the run length and the contributions; once per fit."""
        if self._prepared:
            return
        optimizers = trainer.optimizers
        if not optimizers:
            raise MisconfigurationException(
                "LRSchedule found no optimizer: configure_optimizers must return one for the schedule to drive"
            )
        indices = list(range(len(optimizers))) if self.optimizers is None else list(self.optimizers)
        bad = [i for i in indices if i >= len(optimizers)]
        if bad:
            raise ValueError(
                f"LRSchedule(optimizers={self.optimizers!r}): index {bad[0]} is out of range; "
                f"the module has {len(optimizers)} optimizer(s)"
            )
        for other in trainer_callbacks(trainer):
            if other is self or not isinstance(other, LRSchedule):
                continue
            theirs = range(len(optimizers)) if other.optimizers is None else other.optimizers
            common = sorted(set(theirs) & set(indices))
            if common:
                raise MisconfigurationException(
                    f"{self._name()} and {other._name()} both drive optimizer {common[0]}: one LR owner per "
                    "optimizer. Keep one LRSchedule, or split the optimizers with LRSchedule(optimizers=...)"
                )
        self._deferred = {}
        driven = {id(optimizers[i]): i for i in indices}
        for config in trainer.lr_scheduler_configs:
            opt = getattr(config.scheduler, "optimizer", None)
            if opt is None or id(opt) not in driven:
                continue
            i, name = driven[id(opt)], type(config.scheduler).__name__
            if not self._implicit:
                raise MisconfigurationException(
                    f"{self._name()} and the module's own LR scheduler {name} would both set the LR of optimizer "
                    f"{i} ({type(opt).__name__}). Use one: return only the optimizer from configure_optimizers, "
                    "or drop the LRSchedule callback (or pass LRSchedule(optimizers=...) to drive the others)."
                )
            self._deferred[i] = name  # added by lr_owner: the module's scheduler owns this optimizer's LR
        indices = [i for i in indices if i not in self._deferred]
        if self.momentum is not None:
            for i in indices:
                for j, group in enumerate(optimizers[i].param_groups):
                    if "betas" not in group and "momentum" not in group:
                        raise MisconfigurationException(
                            f"LRSchedule(momentum={self.momentum!r}): optimizer {i} ({type(optimizers[i]).__name__}) "
                            f"group {j} has neither 'momentum' nor 'betas' to schedule; use SGD/RMSprop/Adam(W) or "
                            "drop the momentum schedule"
                        )
        self._indices = indices
        self._total = self._run_length(trainer)
        self._prepared = True
        for name, fn in (("schedule", self.schedule), ("momentum", self.momentum)):
            if fn is not None:
                self._check_schedule(name, fn)
        for by in [*self._phases, *([self._schedule_by] if self._schedule_by else [])]:
            self._check_contributions(by, self._hints.get(by, ""))
        self._prepare_plateau(trainer)

    def _prepare_plateau(self, trainer: Trainer | None) -> None:
        """Where the plateau starts governing; refuse a run whose validation is off or whose groups do not
        match a per-group ``min_lr``."""
        found = plateau_of(self.schedule, self._total)
        self._plateau_start = 0 if found is None else found[1]
        if self._plateau is None or trainer is None:
            return
        if trainer.limit_val_batches == 0:
            raise MisconfigurationException(
                f"{self._name()} reduces the LR when {self._plateau.monitor!r} stops improving, at each validation, "
                "but validation is off (trainer limit_val_batches=0): it would never act. Turn validation on, "
                "or use a schedule that is a function of the step"
            )
        for i in self._indices:
            groups = len(trainer.optimizers[i].param_groups)
            try:
                self._plateau.min_lrs(groups)
            except ValueError as e:
                raise ValueError(f"{self._name()}, optimizer {i}: {e}") from e

    def _check_schedule(self, name: str, fn: ScheduleFn) -> None:
        try:
            check = getattr(fn, "check", None)
            check(self._total) if check is not None else fn(0, self._total)
        except ValueError as e:
            hint = (
                ""
                if self._total is not None
                else (
                    " (the Trainer gives no run length: max_steps=-1 and max_epochs=-1; "
                    "pass LRSchedule(total_steps=...))"
                )
            )
            raise ValueError(f"LRSchedule {name} {fn!r} cannot run {self._total} steps: {e}{hint}") from e

    def _check_contributions(self, by: str, hint: str) -> None:
        if self._deferred:
            i, name = next(iter(self._deferred.items()))
            what = "an LR phase" if by in self._phases else "the LR schedule"
            raise MisconfigurationException(
                f"{by} sets {what} through LRSchedule, but the module's own LR scheduler {name} owns the LR of "
                f"optimizer {i}: one would silently override the other. Either drop {by}'s LR argument (the LR "
                f"stays with {name}), or return only the optimizer from configure_optimizers and give the "
                f"schedule to an LRSchedule callback.{_hint(hint)}"
            )

    def _run_length(self, trainer: Trainer) -> int | None:
        if self.total_steps is not None:
            return self.total_steps
        estimate = trainer.estimated_stepping_batches
        if estimate is None or not math.isfinite(estimate) or estimate < 1:
            return None
        return int(estimate)

    # -- writing and checking the groups ----------------------------------------------------------
    def _factor(self, step: int) -> float:
        """``schedule(step, T)``, from a table of the next :data:`FACTOR_TABLE_STEPS` steps computed at once.

        A schedule is a pure function of ``(step, T)``, so its values ahead can be computed in one warm
        loop instead of one cold call per step (a ``Warmup(Cosine())`` call costs ~20 µs of host time right
        after a training step, the table lookup ~1). A schedule with a :class:`Plateau` depends on the
        validations so far and is called per step. The table is keyed by the schedule object and ``T``.
        """
        schedule, total = self.schedule, self._total
        if self._plateau is not None:
            return float(schedule(step, total))
        table_schedule, table_total, start, table = self._factor_table
        k = step - start
        if table_schedule is schedule and table_total == total and 0 <= k < len(table):
            return table[k]
        stop = step + FACTOR_TABLE_STEPS if total is None or step >= total else min(step + FACTOR_TABLE_STEPS, total)
        table = [float(schedule(t, total)) for t in range(step, stop)]
        self._factor_table = (schedule, total, step, table)
        return table[0]

    def _write(self, trainer: Trainer, step: int, optimizers: list | None = None) -> None:
        """Write the LRs of ``step`` into every driven group, first checking that each group still holds what
        was written last (one pass over the groups)."""
        assert self._base is not None
        phase = self._active_phase(step) if self._phases else None
        table_schedule, table_total, start, table = self._factor_table
        k = step - start
        if table_schedule is self.schedule and table_total == self._total and 0 <= k < len(table):
            factor = table[k]  # _factor's lookup, inlined on the per-step path
        else:
            factor = self._factor(step)
        plain = phase is None and self._plateau is None
        mom = None if self.momentum is None else float(self.momentum(step, self._total))
        optimizers = trainer.optimizers if optimizers is None else optimizers
        last = self._written_step
        for i, base in self._base.items():
            groups = optimizers[i].param_groups
            if len(groups) != len(base):
                base = self._regroup(trainer, i)
            written = self._written.get(i)
            check = written is not None and len(written) == len(groups)
            if not check:
                written = self._written[i] = [0.0] * len(base)
            assert written is not None
            lrs = base if plain else self._lrs(i, base, step, factor, phase)
            scale = factor if plain else 1.0  # plain: lr = base * schedule(step, T), computed in the loop
            for j, group in enumerate(groups):
                if check and group["lr"] != written[j]:
                    self._foreign_write(optimizers[i], i, j, group["lr"], written[j], last)
                group["lr"] = written[j] = lrs[j] * scale
                if mom is not None:
                    if "betas" in group:
                        group["betas"] = (mom, *tuple(group["betas"])[1:])
                    else:
                        group["momentum"] = mom
        self._written_step = step

    def _sync(self, trainer: Trainer) -> int:
        """Check that nobody else wrote the LR since the last write; write it if the step changed. Returns
        ``trainer.global_step``."""
        clock = self._clock
        if clock is not None and clock.steps is not None and clock.trainer is trainer:
            step = clock.steps.completed  # trainer.global_step, read from its counter
        else:
            step = global_step_of(trainer, clock)
        if self._base is None:
            return step
        optimizers = trainer.optimizers
        if step != self._written_step:
            self._write(trainer, step, optimizers)
            return step
        for i, written in self._written.items():
            groups = optimizers[i].param_groups
            if len(groups) != len(written):  # groups were added (e.g. an unfrozen backbone): they join now
                self._write(trainer, step, optimizers)
                return step
            for j, value in enumerate(written):
                if groups[j]["lr"] != value:
                    self._foreign_write(optimizers[i], i, j, groups[j]["lr"], value, step)
        return step

    def _foreign_write(
        self, optimizer: torch.optim.Optimizer, i: int, j: int, found: float, written: float, step: int
    ) -> None:
        name = optimizer.param_groups[j].get("name")
        label = f"group {j}" + (f" ({name!r})" if name is not None else "")
        raise RuntimeError(
            f"{self._name()} owns the learning rate, but optimizer {i} ({type(optimizer).__name__}) {label} has "
            f"lr={found!r} where it wrote {written!r} for step {step}: something else set param_group['lr'] "
            "during fit. Contribute to the LR through LRSchedule instead (lr_owner(trainer).add_phase / "
            "set_schedule / scale_base_lrs / set_base_lrs), or remove the other writer (a callback, a module "
            "hook, a torch LR scheduler stepped by hand)."
        )

    def _regroup(self, trainer: Trainer, i: int) -> list[float]:
        """Groups were added to optimizer ``i`` during training (e.g. by unfreezing a backbone): they join
        the schedule with their ``initial_lr`` (else their LR at this moment) as base LR."""
        assert self._base is not None
        groups = trainer.optimizers[i].param_groups
        base = self._base[i][: len(groups)]
        for group in groups[len(base) :]:
            b = float(group.get("initial_lr", group["lr"]))
            group["initial_lr"] = b
            base.append(b)
        self._base[i] = base
        self._lr_keys = self._keys(trainer.optimizers, self._base, self.log_name)
        if self.momentum is not None:
            self._momentum_keys = self._keys(
                trainer.optimizers, {j: [0.0] * len(b) for j, b in self._base.items()}, "momentum"
            )
        return base

    # -- Lightning hooks --------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._base, self._total, self._loaded, self._indices = None, None, None, []
            self._prepared, self._deferred, self._phase_factor = False, {}, {}
            self._phases, self._schedule_by, self._hints = {}, None, {}
            self._written_step, self._written, self._clock = -1, {}, None
            if self._implicit:
                self.schedule = self._initial_schedule
            self._plateau, self._plateau_cache, self._plateau_steps = _plateau_in(self.schedule), {}, 0
            if self._plateau is not None:
                self._plateau.reset()  # a new fit; a resumed one gets its state back at train start

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._prepare(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizers = trainer.optimizers
        self._prepare(trainer)  # a no-op unless on_fit_start did not run (the hook called by hand)
        base: dict[int, list[float]] = {}
        loaded = (self._loaded or {}).get("base_lrs")
        for i in self._indices:
            groups = optimizers[i].param_groups
            saved = loaded.get(i) if isinstance(loaded, dict) else None
            if saved is not None and len(saved) == len(groups):
                base[i] = [float(b) for b in saved]
            else:
                if saved is not None:
                    rank_zero_warn(
                        f"LRSchedule: the checkpoint has {len(saved)} base LR(s) for optimizer {i} but "
                        f"it has {len(groups)} group(s) now; using the groups' current LRs"
                    )
                base[i] = [float(g.get("initial_lr", g["lr"])) for g in groups]
            for group, b in zip(groups, base[i]):
                group["initial_lr"] = b
        saved_total = (self._loaded or {}).get("total_steps")
        if saved_total is not None and saved_total != self._total:
            rank_zero_warn(
                f"LRSchedule: the checkpoint's run was {saved_total} steps long, this run is "
                f"{self._total}; the LR curve continues on the new length from step {trainer.global_step}"
            )
        saved_phases = (self._loaded or {}).get("phases") or {}
        for name, phase in self._phases.items():
            saved = saved_phases.get(name)
            if saved is None:
                continue
            if int(saved.get("start_step", -1)) != phase.start_step:
                rank_zero_warn(
                    f"LRSchedule: the checkpoint's {name} phase started at step {saved.get('start_step')}, "
                    f"this run's starts at {phase.start_step}"
                )
            elif saved.get("factor_at_start") is not None:
                self._phase_factor[name] = float(saved["factor_at_start"])
        saved_plateau = (self._loaded or {}).get("plateau")
        if self._plateau is not None and saved_plateau:
            self._plateau.load_state_dict(saved_plateau)
        self._base = base
        self._loaded = None
        self._lr_keys = self._keys(optimizers, base, self.log_name)
        if self.momentum is not None:
            self._momentum_keys = self._keys(optimizers, {i: [0.0] * len(b) for i, b in base.items()}, "momentum")
        self._written_step, self._written = -1, {}
        self._clock = FitClock(trainer)  # the loop state is restored by now
        self._driven = {id(optimizers[i]): i for i in base}
        self._sync(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sync(trainer)  # after a step: the optimizer now holds the LR of the next one

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._base is None:
            return
        index = self._driven.get(id(optimizer))
        clock = self._clock
        if clock is None or clock.trainer is not trainer or not clock.fast or index is None:
            self._sync(trainer)  # outside a fit's training loop, or an optimizer this callback does not drive
            if index is None or not self.log_lr or not should_log_step(trainer):
                return
        else:
            written = self._written.get(index)
            groups = optimizer.param_groups
            if written is None or len(groups) != len(written) or clock.steps.completed != self._written_step:
                self._sync(trainer)  # a write is due: the full check and write
            else:  # the guard, right before the update that uses the LR: the groups still hold what was written
                for j, value in enumerate(written):
                    if groups[j]["lr"] != value:
                        self._foreign_write(optimizer, index, j, groups[j]["lr"], value, self._written_step)
            every = clock.every
            if (
                not self.log_lr
                or not every
                or ((clock.loop._batches_that_stepped + 1) % every and not trainer.should_stop)
            ):
                return  # the loggers do not write this step (should_log_step's test, inlined)
        groups = optimizer.param_groups
        metrics = {key: float(groups[j]["lr"]) for j, key in enumerate(self._lr_keys[index]) if key is not None}
        for j, key in enumerate(self._momentum_keys.get(index, [])):
            if key is not None:
                g = groups[j]
                metrics[key] = float(g["betas"][0] if "betas" in g else g["momentum"])
        publish_step_metrics(trainer, metrics)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        plateau = self._plateau
        if plateau is None or self._base is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        step = trainer.global_step
        if step < self._plateau_start or self._active_phase(step) is not None:
            return  # in the warmup: not counted; in a phase (SWA): the phase owns the LR
        metrics = trainer.callback_metrics
        if plateau.monitor not in metrics:
            raise MisconfigurationException(
                f"{self._name()} is conditioned on metric {plateau.monitor!r}, which is not available at the end of "
                f"validation. Available metrics are: {sorted(metrics)}. Log it, or set the Plateau's monitor to "
                "one of these"
            )
        value = trainer.strategy.broadcast(float(metrics[plateau.monitor]), src=0)  # every rank decides alike
        before = plateau.reductions
        plateau.step(value)
        self._plateau_steps += 1
        if plateau.reductions != before:
            rank_zero_info(
                f"LRSchedule: {plateau.monitor} has not improved on {plateau.best:.6g} for more than "
                f"patience={plateau.patience} validation(s): LR x {plateau.factor:g} from step {step} "
                f"(reduction {plateau.reductions}, factor now {plateau.current_factor:.6g})"
            )
            self._written_step = -1
            self._sync(trainer)  # the next step's LR, written now (after checking nobody else wrote it)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._plateau is not None and self._plateau_steps == 0 and trainer.global_step > self._plateau_start:
            rank_zero_warn(
                f"{self._name()} never took a step: no validation ended after step {self._plateau_start} of this "
                "fit (no val_dataloader, or check_val_every_n_epoch longer than the run?), so the LR was never "
                "reduced"
            )

    @staticmethod
    def _keys(optimizers: list, base: dict[int, list[float]], name: str) -> dict[int, list[str | None]]:
        """One key when all driven groups share a base LR, else one per group (``name/<group name>``)."""
        values = {b for bs in base.values() for b in bs}
        if not base:
            return {}
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
        return {
            "base_lrs": None if self._base is None else {i: list(b) for i, b in self._base.items()},
            "total_steps": self._total,
            "phases": {
                name: {"start_step": int(p.start_step), "factor_at_start": self._phase_factor.get(name)}
                for name, p in self._phases.items()
            },
            "plateau": None if self._plateau is None else self._plateau.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        base = state_dict.get("base_lrs")
        self._loaded = {
            "base_lrs": None if base is None else {int(i): [float(x) for x in b] for i, b in base.items()},
            "total_steps": state_dict.get("total_steps"),
            "phases": dict(state_dict.get("phases") or {}),
            "plateau": state_dict.get("plateau"),
        }


def _hint(hint: str) -> str:
    return f" {hint}" if hint else ""
