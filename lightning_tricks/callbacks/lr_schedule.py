"""LRSchedule: the one writer of the learning rate (and momentum) during fit.

The rules (schedule, plateau, phases, base-LR changes, conflicts) are in the pure
:class:`lightning_tricks.lr_plan.LRPlan`; this callback captures the base LRs at train start, writes
``plan.group_lrs(i, t)`` before each optimizer step, steps the plateau after each validation, and
refuses any other writer of ``param_group["lr"]`` in one place (:meth:`LRSchedule._write`).
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
    rank_zero_info,
    rank_zero_warn,
    should_log_step,
    trainer_callbacks,
)
from lightning_tricks.checks import check_int
from lightning_tricks.lr_plan import LRPlan, ScheduleFn, ends_in_plateau, run_length
from lightning_tricks.schedules import SWALRPhase

__all__ = ["LRSchedule", "change_base_lrs"]


class LRSchedule(Callback):
    """Set every parameter group's LR to ``base_lr * schedule(t, T)`` before each optimizer step.

    ``t`` counts the optimizer's steps: ``trainer.global_step`` under automatic optimization (so
    ``accumulate_grad_batches=k`` moves the schedule once per ``k`` batches), and under manual
    optimization the number of ``step()`` calls of that optimizer, so two optimizers stepping once per
    batch (a GAN) each run over the whole schedule. ``T`` is ``total_steps`` or
    ``trainer.estimated_stepping_batches`` (one step per batch and optimizer); an optimizer stepping more
    often needs ``total_steps``, and a run going past ``T`` is warned about once. ``base_lr`` is each
    group's ``initial_lr`` (else ``lr``) at train start, kept in the checkpoint so a resumed run continues
    on the same curve. Between steps the groups hold the LR of the next step.

    Other tricks change the LR only through the :class:`~lightning_tricks.lr_plan.LRPlan` of the one
    LRSchedule in ``trainer.callbacks`` (:meth:`of`), from ``on_fit_start`` or ``on_train_start``:
    ``SWA(swa_lr=...)`` adds a phase, ``SnapshotEnsemble`` sets the schedule (only where this callback has
    none: ``LRSchedule()``), ``LinearScaling`` and ``LRRangeTest`` change base LRs (:func:`change_base_lrs`,
    which needs no LRSchedule before training), ``FreezeUnfreeze``'s new groups join with their
    ``initial_lr``. A trick that changes the LR during fit refuses to run without an LRSchedule; nothing
    adds to or reorders ``trainer.callbacks``, and the result does not depend on the callback order.

    With a :class:`~lightning_tricks.schedules.Plateau` (alone or after warmups) the metric
    ``plateau.monitor`` is read at the end of each validation during fit (rank 0's value, broadcast) and
    the LRs are torch ``ReduceLROnPlateau``'s. With ``momentum`` each group's ``momentum`` or Adam
    ``beta1`` is set to ``momentum(t, T)``. The LR (and momentum) is logged with ``pl_module.log`` on the
    steps the loggers write (``log_every_n_steps``) as ``log_name``, or ``log_name/<group>`` when groups
    have different base LRs.

    Refused before the first step: two LRSchedules driving one optimizer, an LRSchedule beside the
    module's own LR scheduler on the same optimizer, conflicting contributions, a schedule that needs a
    run length where none is known, a Plateau with validation off. Anything else that writes ``lr``
    during fit raises a ``RuntimeError`` at the next write.

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
        for name, fn in (("schedule", schedule), ("momentum", momentum)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be None or callable as {name}(step, total_steps), got {fn!r}")
        if momentum is not None and ends_in_plateau(momentum):
            raise ValueError(
                f"momentum={momentum!r}: a Plateau reduces the learning rate; it cannot be a momentum schedule"
            )
        self.total_steps = check_int("total_steps", total_steps, 1, allow_none=True)
        if optimizers is not None:
            idx = [optimizers] if isinstance(optimizers, int) else list(optimizers)
            if not idx:
                raise ValueError("optimizers must be None, an index >= 0 or a non-empty list of them, got []")
            optimizers = sorted({check_int("optimizers", i, 0) for i in idx})  # type: ignore[misc]
        if not isinstance(log_name, str) or not log_name:
            raise ValueError(f"log_name must be a non-empty string, got {log_name!r}")
        self.schedule, self.momentum, self.optimizers = schedule, momentum, optimizers
        self.log_lr = bool(log)  # not ``self.log``: Lightning sets ``callback.log = module.log`` at fit start
        self.log_name = log_name
        self.plan = LRPlan(schedule, momentum)
        self._loaded: dict[str, Any] | None = None
        self._started = False
        self._automatic = True
        self._counts: dict[int, int] = {}  # manual optimization: steps taken by each driven optimizer
        self._written: dict[int, tuple[int, list[float]]] = {}  # optimizer -> (step, LRs written)
        self._keys: dict[int, list[str | None]] = {}
        self._warned_past_end = False
        self._plateau_steps = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(schedule=repr(self.schedule), optimizers=self.optimizers)

    def __repr__(self) -> str:
        opts = "" if self.optimizers is None else f", optimizers={self.optimizers}"
        return f"LRSchedule({'' if self.schedule is None else repr(self.schedule)}{opts})"

    # -- finding the owner (the public way in for other tricks) -----------------------------------
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

    # -- Lightning hooks --------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit: contributions arrive from on_fit_start on
            self.plan = LRPlan(self.schedule, self.momentum)
            self._started, self._written, self._counts, self._plateau_steps = False, {}, {}, 0
            self._warned_past_end = False

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
            raise ValueError(f"{self!r} cannot run {total} steps: {e}{self._why_no_length(trainer, total)}") from e
        loaded, self._loaded = self._loaded or {}, None
        for problem in self.plan.load_state_dict(loaded):
            rank_zero_warn(f"LRSchedule: {problem}")
        for i, bs in self.plan.base.items():
            for group, b in zip(optimizers[i].param_groups, bs):
                group["initial_lr"] = b
        self._automatic = pl_module.automatic_optimization
        counts = loaded.get("steps") or {}
        self._counts = {i: int(counts.get(i, trainer.global_step // len(indices))) for i in indices}
        self._keys = self._log_keys(optimizers)
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
                f"{self.plan.total}); it trains on at the schedule's last values (LR "
                f"{optimizer.param_groups[0]['lr']:.4g}). Set LRSchedule(total_steps=...) to the run's real "
                "number of steps, or stop the run there"
            )
        if self.log_lr and should_log_step(trainer):
            groups = optimizer.param_groups
            for j, key in enumerate(self._keys.get(i, [])):
                if key is not None:
                    pl_module.log(key, float(groups[j]["lr"]), on_step=True, on_epoch=False)
                    if self.plan.momentum is not None:
                        g = groups[j]
                        value = g["betas"][0] if "betas" in g else g["momentum"]
                        key = key.replace(self.log_name, "momentum", 1)
                        pl_module.log(key, float(value), on_step=True, on_epoch=False)
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
                f"{self!r} never took a step: no validation ended after step {start} of this fit "
                "(no val_dataloader, or check_val_every_n_epoch longer than the run?), so the LR was never reduced"
            )

    # -- the one writer ---------------------------------------------------------------------------
    def _step(self, trainer: Trainer, i: int) -> int:
        return trainer.global_step if self._automatic else self._counts[i]

    def _write(self, trainer: Trainer, i: int) -> None:
        """Check that optimizer ``i``'s groups still hold what was written last, then write this step's LRs."""
        optimizer = trainer.optimizers[i]
        groups = optimizer.param_groups
        step = self._step(trainer, i)
        last_step, written = self._written.get(i, (-1, []))
        for j, (group, value) in enumerate(zip(groups, written)):
            if group["lr"] != value:
                name = group.get("name")
                raise RuntimeError(
                    f"{self!r} owns the learning rate, but optimizer {i} ({type(optimizer).__name__}) group {j}"
                    f"{'' if name is None else f' ({name!r})'} has lr={group['lr']!r} where it wrote {value!r} for "
                    f"step {last_step}: something else set param_group['lr'] during fit. Change the LR through "
                    "LRSchedule (LRSchedule.of(trainer).plan), or remove the other writer (a callback, a module "
                    "hook, a torch LR scheduler stepped by hand)."
                )
        if step == last_step and len(groups) == len(written):
            return
        base = self.plan.base[i]
        if len(groups) > len(base):  # groups added during training (an unfrozen backbone) join the plan
            self.plan.add_groups(i, [g.get("initial_lr", g["lr"]) for g in groups[len(base) :]])
            for group, b in zip(groups, base):
                group["initial_lr"] = b
            self._keys = self._log_keys(trainer.optimizers)
        lrs = self.plan.group_lrs(i, step)
        momentum = self.plan.momentum_at(step)
        for group, lr in zip(groups, lrs):
            group["lr"] = lr
            if momentum is not None:
                if "betas" in group:
                    group["betas"] = (momentum, *tuple(group["betas"])[1:])
                else:
                    group["momentum"] = momentum
        self._written[i] = (step, lrs)

    # -- checks -----------------------------------------------------------------------------------
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
        if self.momentum is not None:
            for i in indices:
                for j, group in enumerate(optimizers[i].param_groups):
                    if "betas" not in group and "momentum" not in group:
                        raise MisconfigurationException(
                            f"LRSchedule(momentum={self.momentum!r}): optimizer {i} ({type(optimizers[i]).__name__}) "
                            f"group {j} has neither 'momentum' nor 'betas' to schedule"
                        )
        if ends_in_plateau(self.plan.schedule) and trainer.limit_val_batches == 0:
            raise MisconfigurationException(
                f"{self!r} reduces the LR when its Plateau's metric stops improving, at each validation, but "
                "validation is off (trainer limit_val_batches=0): it would never act. Turn validation on, or use a "
                "schedule that is a function of the step"
            )
        return indices

    @staticmethod
    def _why_no_length(trainer: Trainer, total: int | None) -> str:
        if total is not None:
            return ""
        if trainer.max_epochs == -1 and trainer.max_steps == -1:
            cause = "the Trainer sets no end (max_steps=-1 and max_epochs=-1)"
        else:
            cause = (
                f"the train loader has no length (num_training_batches={trainer.num_training_batches}, e.g. an "
                f"IterableDataset), so max_epochs={trainer.max_epochs} gives no step count"
            )
        return f" ({cause}; pass LRSchedule(total_steps=...) or Trainer(max_steps=...))"

    def _log_keys(self, optimizers: list) -> dict[int, list[str | None]]:
        """One key when all driven groups share a base LR, else one per group (``name/<group name>``)."""
        base = self.plan.base
        if len({b for bs in base.values() for b in bs}) <= 1:
            first = min(base)
            return {
                i: [self.log_name if (i == first and j == 0) else None for j in range(len(bs))]
                for i, bs in base.items()
            }
        keys: dict[int, list[str | None]] = {}
        for i, bs in base.items():
            labels = [str(g.get("name", f"pg{j}")) for j, g in enumerate(optimizers[i].param_groups[: len(bs)])]
            prefix = f"opt{i}/" if len(base) > 1 else ""
            keys[i] = [f"{self.log_name}/{prefix}{label}" for label in labels]
            keys[i] = [k if keys[i].count(k) == 1 else f"{k}_{j}" for j, k in enumerate(keys[i])]
        return keys

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**self.plan.state_dict(), "steps": dict(self._counts) if not self._automatic else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)  # applied at train start, once the optimizers and groups exist


def change_base_lrs(trainer: Trainer, fn: Callable[[int, int, float], float]) -> list[tuple[int, int, float, float]]:
    """Set each group's base LR to ``fn(optimizer index, group index, base LR)``; returns ``(i, j, old, new)``.

    After an LRSchedule has started, through its plan. Before training (LinearScaling, the range test's
    hand-off) the groups' starting LR (``lr`` and ``initial_lr``) and the base LRs of the module's own torch
    schedulers are set: nothing writes the LR during fit yet, and an LRSchedule captures them at train start.
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
