"""LRSchedule: the one writer of the learning rate (and momentum) during fit.

The rules are the pure :class:`lightning_tricks.lr_plan.LRPlan`; this callback captures the base LRs,
writes the plan's LRs before each optimizer step, steps the plateau and refuses other writers (:meth:`_write`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_tricks._lightning import (
    Callback,
    LightningModule,
    MisconfigurationException,
    Trainer,
    publish_step_metrics,
    rank_zero_info,
    rank_zero_warn,
    should_log_step,
    trainer_callbacks,
)
from lightning_tricks.lr_plan import (
    LRPlan,
    ScheduleFn,
    check_schedule_args,
    ends_in_plateau,
    foreign_write_message,
    log_keys,
    lr_metrics,
    no_length_reason,
    run_length,
    set_momentum,
)
from lightning_tricks.schedules import SWALRPhase

__all__ = ["LRSchedule", "change_base_lrs"]


class LRSchedule(Callback):
    """Set every parameter group's LR to ``base_lr * schedule(t, T)`` before each optimizer step.

    ``t`` is ``trainer.global_step`` (under manual optimization, each optimizer's own ``step()`` count),
    ``T`` is ``total_steps`` or ``trainer.estimated_stepping_batches``, ``base_lr`` each group's
    ``initial_lr`` (else ``lr``) at train start. The rules are the pure
    :class:`~lightning_tricks.lr_plan.LRPlan`; other tricks reach it through :meth:`of`. What is refused
    and how the LR is logged: ``docs/method_cards.md``.

    Args:
        schedule: ``schedule(step, total_steps) -> multiplier``, e.g. ``Warmup(steps=0.05, then=Cosine())``;
            ``None``: the base LR (a trick such as ``SnapshotEnsemble`` may set the schedule).
        momentum: optional momentum schedule ``(step, total_steps) -> momentum``.
        total_steps: run length in optimizer steps (of each optimizer); default the Trainer's estimate.
        optimizers: index or indices of the optimizers to drive; default all.
        log: log the LR every ``log_every_n_steps`` (the attribute is ``log_lr``).
        log_name: key of the logged LR.

    Example:
        >>> from lightning_tricks.schedules import OneCycle
        >>> one_cycle = OneCycle(pct_start=0.25)
        >>> callback = LRSchedule(one_cycle, momentum=one_cycle.momentum())
    """

    def __init__(
        self,
        schedule: ScheduleFn | None = None,
        momentum: ScheduleFn | None = None,
        total_steps: int | None = None,
        optimizers: int | Sequence[int] | None = None,
        log: bool = True,
        log_name: str = "lr",
    ) -> None:
        self.total_steps, optimizers = check_schedule_args(schedule, momentum, total_steps, optimizers, log_name)
        self.schedule, self.momentum, self.optimizers = schedule, momentum, optimizers
        self.log_lr = bool(log)  # not ``self.log``: Lightning sets ``callback.log = module.log`` at fit start
        self.log_name = log_name
        self.plan = LRPlan(schedule, momentum)
        self._loaded: dict[str, Any] | None = None
        self._started, self._automatic = False, True
        self._counts: dict[int, int] = {}  # manual optimization: steps taken by each driven optimizer
        self._written: dict[int, tuple[int, list[float]]] = {}  # optimizer -> (step, LRs written)
        self._keys: dict[int, list[str | None]] = {}
        self._warned_past_end, self._plateau_steps = False, 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(schedule=repr(self.schedule), optimizers=self.optimizers)

    def __repr__(self) -> str:
        opts = "" if self.optimizers is None else f", optimizers={self.optimizers}"
        return f"LRSchedule({'' if self.schedule is None else repr(self.schedule)}{opts})"

    @staticmethod
    def find(trainer: Trainer, optimizer: int = 0) -> LRSchedule | None:
        """The LRSchedule in ``trainer.callbacks`` that drives optimizer ``optimizer``, else ``None``."""
        for cb in trainer_callbacks(trainer):
            if isinstance(cb, LRSchedule) and (cb.optimizers is None or optimizer in cb.optimizers):
                return cb
        return None

    @classmethod
    def of(cls, trainer: Trainer, by: str) -> LRSchedule:
        """The LR owner for ``by``, a trick that changes the LR during fit; refused when there is none."""
        owner = cls.find(trainer)
        if owner is None:
            raise MisconfigurationException(
                f"{by} changes the learning rate during fit, which only an LRSchedule callback does, and "
                "trainer.callbacks has none: add lightning_tricks.callbacks.LRSchedule() (the base LR, which "
                f"{by} then changes) or LRSchedule(<your schedule>) to the callbacks"
            )
        return owner

    def set_schedule(self, by: str, schedule: ScheduleFn) -> None:
        """Let ``by`` choose the schedule (SnapshotEnsemble's cycles); see :meth:`LRPlan.set_schedule`."""
        self._contribute(lambda: self.plan.set_schedule(by, schedule, owner=repr(self)))

    def add_phase(self, by: str, phase: SWALRPhase) -> None:
        """Put ``phase`` over the tail of the LR curve (SWA's SWA-LR); see :meth:`LRPlan.add_phase`."""
        self._contribute(lambda: self.plan.add_phase(by, phase))

    def _contribute(self, change: Callable[[], None]) -> None:
        try:
            change()
        except ValueError as e:
            raise MisconfigurationException(str(e)) from e
        self._invalidate()

    def _invalidate(self) -> None:
        """The plan changed: every driven optimizer gets its LRs rewritten at the next write."""
        self._written = {i: (-1, lrs) for i, (_, lrs) in self._written.items()}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit: contributions arrive from on_fit_start on
            self.plan = LRPlan(self.schedule, self.momentum)
            self._started, self._plateau_steps, self._warned_past_end = False, 0, False
            self._written, self._counts = {}, {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here, not at fit start: the train data is set up and the checkpoint's RNG and loop states are back,
        # so reading the run length cannot make the first batches of a resumed run differ.
        optimizers = trainer.optimizers
        indices = self._check(trainer)
        total = self.total_steps or run_length(trainer.estimated_stepping_batches)
        base = {i: [float(g.get("initial_lr", g["lr"])) for g in optimizers[i].param_groups] for i in indices}
        try:
            self.plan.start(base, total)
        except ValueError as e:
            why = "" if total else no_length_reason(trainer.max_epochs, trainer.max_steps, trainer.num_training_batches)
            raise ValueError(f"{self!r} cannot run {total} steps: {e}{why}") from e
        loaded, self._loaded = self._loaded or {}, None
        for problem in self.plan.load_state_dict(loaded):
            rank_zero_warn(f"LRSchedule: {problem}")
        for i, bs in self.plan.base.items():
            for group, b in zip(optimizers[i].param_groups, bs):
                group["initial_lr"] = b
        self._automatic = pl_module.automatic_optimization
        counts = loaded.get("steps") or {}
        self._counts = {i: int(counts.get(i, trainer.global_step // len(indices))) for i in indices}
        self._keys = self._keys_for(optimizers)
        self._started = True
        for i in indices:
            self._write(trainer, i)

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        i = next((k for k in self._written if trainer.optimizers[k] is optimizer), None)
        if i is None:
            return  # an optimizer this callback does not drive (or outside a fit's training)
        self._write(trainer, i)
        step = self._step(trainer, i)
        if not self._warned_past_end and self.plan.past_end(step):
            self._warned_past_end = True
            rank_zero_warn(
                f"{self!r}: optimizer {i} takes step {step}, past the end of the schedule (total_steps="
                f"{self.plan.total}), at LR {optimizer.param_groups[0]['lr']:.4g}; set total_steps to the run's length"
            )
        if self.log_lr and should_log_step(trainer):  # the loggers write this step
            momentum = self.plan.momentum is not None
            metrics = lr_metrics(self._keys.get(i, []), optimizer.param_groups, self.log_name, momentum)
            publish_step_metrics(trainer, metrics)  # what pl_module.log does for a number, at a fraction of its cost
        if not self._automatic:
            self._counts[i] += 1  # this optimizer's step is taken right after this hook

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for i in list(self._written):
            self._write(trainer, i)  # the next step's LR, so readers between steps see it

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        plateau = self.plan.plateau
        if plateau is None or not self._started or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        if plateau.monitor not in metrics:
            raise MisconfigurationException(
                f"{self!r} is conditioned on metric {plateau.monitor!r}, which is not available at the end of "
                f"validation. Available metrics are: {sorted(metrics)}. Log it, or set the Plateau's monitor"
            )
        value = trainer.strategy.broadcast(float(metrics[plateau.monitor]), src=0)  # every rank decides alike
        step = self._step(trainer, min(self._written))
        reduced = self.plan.step_plateau(step, value)
        if reduced is None:
            return
        self._plateau_steps += 1
        if reduced:
            rank_zero_info(
                f"LRSchedule: {plateau.monitor} has not improved on {plateau.best:.6g} for more than "
                f"patience={plateau.patience} validation(s): LR x {plateau.factor:g} from step {step}"
            )
            self._invalidate()
            self.on_train_batch_end(trainer, pl_module, None, None, 0)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        start = self.plan.plateau_start
        if self.plan.plateau is not None and self._plateau_steps == 0 and trainer.global_step > start:
            rank_zero_warn(
                f"{self!r} never took a step: no validation ended after step {start} (no val_dataloader, or "
                "check_val_every_n_epoch longer than the run?), so the LR was never reduced"
            )

    def _step(self, trainer: Trainer, i: int) -> int:  # optimizer i's steps so far
        return trainer.global_step if self._automatic else self._counts[i]

    def _write(self, trainer: Trainer, i: int) -> None:
        """Check that optimizer ``i``'s groups still hold what was written last, then write this step's LRs."""
        optimizer = trainer.optimizers[i]
        groups = optimizer.param_groups
        step = self._step(trainer, i)
        last_step, written = self._written.get(i, (-1, []))
        for j, (group, value) in enumerate(zip(groups, written)):
            if group["lr"] != value:
                where = f"optimizer {i} ({type(optimizer).__name__}) group {j}"
                raise RuntimeError(foreign_write_message(repr(self), where, group, value, last_step))
        if step == last_step and len(groups) == len(written):
            return
        base = self.plan.base[i]
        if len(groups) > len(base):  # groups added during training (an unfrozen backbone) join the plan
            self.plan.add_groups(i, [g.get("initial_lr", g["lr"]) for g in groups[len(base) :]])
            for group, b in zip(groups, base):
                group["initial_lr"] = b
            self._keys = self._keys_for(trainer.optimizers)
        lrs = self.plan.group_lrs(i, step)
        momentum = self.plan.momentum_at(step)
        for j, (group, lr) in enumerate(zip(groups, lrs)):
            group["lr"] = lr
            if momentum is not None and not set_momentum(group, momentum):  # first met at train start
                raise MisconfigurationException(
                    f"LRSchedule(momentum={self.momentum!r}): optimizer {i} ({type(optimizer).__name__}) "
                    f"group {j} has neither 'momentum' nor 'betas' to schedule"
                )
        self._written[i] = (step, lrs)

    def _check(self, trainer: Trainer) -> list[int]:
        """The driven optimizer indices; refuse the set-ups in the class docstring."""
        optimizers = trainer.optimizers
        if not optimizers:
            raise MisconfigurationException("LRSchedule found no optimizer: configure_optimizers must return one")
        indices = list(range(len(optimizers))) if self.optimizers is None else list(self.optimizers)
        if indices[-1] >= len(optimizers):
            raise ValueError(
                f"LRSchedule(optimizers={self.optimizers!r}): index {indices[-1]} is out of range; "
                f"the module has {len(optimizers)} optimizer(s)"
            )
        for other in trainer_callbacks(trainer):
            if other is not self and isinstance(other, LRSchedule):
                theirs = range(len(optimizers)) if other.optimizers is None else other.optimizers
                common = sorted(set(theirs) & set(indices))
                if common:
                    raise MisconfigurationException(
                        f"{self!r} and {other!r} both drive optimizer {common[0]}: one LR owner per optimizer. "
                        "Keep one LRSchedule, or split the optimizers with LRSchedule(optimizers=...)"
                    )
        for config in trainer.lr_scheduler_configs:
            opt = getattr(config.scheduler, "optimizer", None)
            if any(opt is optimizers[i] for i in indices):
                raise MisconfigurationException(
                    f"{self!r} and the module's own LR scheduler {type(config.scheduler).__name__} would both set "
                    "the LR. Use one: return only the optimizer from configure_optimizers, or drop the LRSchedule "
                    "callback (or pass LRSchedule(optimizers=...) to drive the others)."
                )
        if ends_in_plateau(self.plan.schedule) and trainer.limit_val_batches == 0:
            raise MisconfigurationException(
                f"{self!r} reduces the LR when its Plateau's metric stops improving, at each validation, but "
                "validation is off (trainer limit_val_batches=0): it would never act. Turn validation on, or use a "
                "schedule that is a function of the step"
            )
        return indices

    def _keys_for(self, optimizers: list) -> dict[int, list[str | None]]:
        names = {i: [g.get("name") for g in optimizers[i].param_groups] for i in self.plan.base}
        return log_keys(self.plan.base, self.log_name, names)

    def state_dict(self) -> dict[str, Any]:
        return {**self.plan.state_dict(), "steps": dict(self._counts) if not self._automatic else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)  # applied at train start, once the optimizers and groups exist


def change_base_lrs(trainer: Trainer, fn: Callable[[int, int, float], float]) -> list[tuple[int, int, float, float]]:
    """Set each group's base LR to ``fn(optimizer index, group index, base LR)``; returns ``(i, j, old, new)``.

    After an LRSchedule has started, through its plan; before training, the groups' ``lr`` and ``initial_lr``
    and the ``base_lrs`` of the module's own torch schedulers (an LRSchedule captures them at train start).
    """
    owner = LRSchedule.find(trainer)
    if owner is not None and owner._started:
        changes = owner.plan.change_base(fn)
        for i, bs in owner.plan.base.items():
            for group, b in zip(trainer.optimizers[i].param_groups, bs):
                group["initial_lr"] = b
        owner._invalidate()
        return changes
    changes = []
    for i, opt in enumerate(trainer.optimizers):
        for j, group in enumerate(opt.param_groups):
            old = group["lr"]
            group["lr"] = fn(i, j, old)
            if "initial_lr" in group:
                group["initial_lr"] = fn(i, j, group["initial_lr"])
            changes.append((i, j, old, group["lr"]))
    for config in trainer.lr_scheduler_configs:
        index = next((i for i, o in enumerate(trainer.optimizers) if o is config.scheduler.optimizer), None)
        base_lrs = getattr(config.scheduler, "base_lrs", None)
        if index is not None and isinstance(base_lrs, list):
            config.scheduler.base_lrs = [fn(index, j, b) for j, b in enumerate(base_lrs)]
    return changes
