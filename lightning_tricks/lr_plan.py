"""The learning-rate plan: what every parameter group's LR is at optimizer step ``t``, as a pure object.

One :class:`LRPlan` holds everything that decides the LR during a fit, and the rules by which the
tricks that change it compose:

- base LRs, per optimizer and parameter group (``base[i][j]``), changed only through
  :meth:`LRPlan.change_base` (linear scaling, a range-test hand-off) or :meth:`LRPlan.add_groups`
  (groups added during training, e.g. an unfrozen backbone);
- the schedule, a multiplier ``schedule(t, T)`` from :mod:`lightning_tricks.schedules` (``None``: 1),
  chosen by the user or contributed once by another trick (:meth:`LRPlan.set_schedule`, snapshot cycles);
- a :class:`~lightning_tricks.schedules.Plateau` (the schedule, or the ``then`` of warmups), stepped with
  a metric (:meth:`LRPlan.step_plateau`); from the end of the warmups it governs: ``plateau.lrs(base)``;
- at most one phase over the tail (:meth:`LRPlan.add_phase`, SWA's
  :class:`~lightning_tricks.schedules.SWALRPhase`): from its start step a group's LR is
  ``phase.lr(t, lr_at_start)`` with ``lr_at_start`` the LR the plan gives at the start step without the
  phase. The plateau stops counting once the phase has begun.

Conflicts are refused with a ``ValueError`` naming both parties: a contributed schedule beside a user's
own, two contributed schedules, two phases. No Lightning here: the callback
(:class:`lightning_tricks.callbacks.LRSchedule`) only captures the base LRs, writes :meth:`LRPlan.group_lrs`
before each optimizer step and steps the plateau.

Example:
    >>> from lightning_tricks.schedules import Cosine, SWALRPhase, Warmup
    >>> plan = LRPlan(Warmup(steps=2, then=Cosine()))
    >>> plan.start({0: [0.1]}, total_steps=10)
    >>> [round(plan.lrs(t)[0][0], 4) for t in (0, 1, 2, 9)]
    [0.0, 0.05, 0.1, 0.0038]
    >>> plan.add_phase("SWA", SWALRPhase(swa_lr=0.01, start_step=6))
    >>> round(plan.lrs(7)[0][0], 4)
    0.01
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from lightning_tricks.checks import check_int
from lightning_tricks.schedules import Plateau, SWALRPhase, Warmup, plateau_of

__all__ = [
    "LRPlan",
    "ScheduleFn",
    "check_schedule_args",
    "ends_in_plateau",
    "foreign_write_message",
    "log_keys",
    "lr_metrics",
    "no_length_reason",
    "run_length",
    "set_momentum",
]

ScheduleFn = Callable[[int, "int | None"], float]


class LRPlan:
    """The LR of every group at every step; see the module docstring for the rules.

    Args:
        schedule: the user's multiplier ``schedule(t, T)``, or ``None`` (no schedule of its own: the base
            LR, and another trick may contribute one).
        momentum: optional momentum (or Adam ``beta1``) schedule ``(t, T) -> value``.
    """

    def __init__(self, schedule: ScheduleFn | None = None, momentum: ScheduleFn | None = None) -> None:
        if momentum is not None and ends_in_plateau(momentum):
            raise ValueError(
                f"momentum={momentum!r}: a Plateau reduces the learning rate; it cannot be a momentum schedule"
            )
        self.user_schedule = schedule
        self.momentum = momentum
        self.schedule: ScheduleFn | None = schedule
        self.schedule_by: str | None = None
        self.phase: SWALRPhase | None = None
        self.phase_by: str | None = None
        self.base: dict[int, list[float]] = {}
        self.total: int | None = None
        self.plateau: Plateau | None = None
        self.plateau_start = 0

    # -- contributions ----------------------------------------------------------------------------
    def set_schedule(self, by: str, schedule: ScheduleFn, owner: str = "LRSchedule") -> None:
        """Let ``by`` choose the schedule; refused where the user chose another or another trick chose one."""
        if self.schedule_by is not None and self.schedule_by != by:
            raise ValueError(f"{by} and {self.schedule_by} both set the LR schedule of {owner}; keep one of them")
        if self.user_schedule is not None and schedule != self.user_schedule:
            raise ValueError(
                f"{by} sets the LR schedule to {schedule!r}, but {owner} has its own schedule: two schedules "
                f"cannot both own the LR. Use LRSchedule() (no schedule of its own), or give it exactly {schedule!r}"
            )
        self.schedule, self.schedule_by = schedule, by
        if self.base:
            self._resolve()

    def add_phase(self, by: str, phase: SWALRPhase) -> None:
        """Put ``phase`` over the tail of the LR curve; one phase per plan."""
        if self.phase_by is not None and self.phase_by != by:
            raise ValueError(
                f"{by} and {self.phase_by} both put an LR phase over the schedule; only one can own its tail"
            )
        self.phase, self.phase_by = phase, by

    def change_base(self, fn: Callable[[int, int, float], float]) -> list[tuple[int, int, float, float]]:
        """Set every base LR ``base[i][j]`` to ``fn(i, j, base[i][j])``; returns ``(i, j, old, new)``."""
        changes = []
        for i, base in self.base.items():
            for j, old in enumerate(base):
                base[j] = float(fn(i, j, old))
                changes.append((i, j, old, base[j]))
        return changes

    def add_groups(self, i: int, base_lrs: Sequence[float]) -> None:
        """Groups appended to optimizer ``i`` during training join the plan with these base LRs."""
        self.base[i].extend(float(b) for b in base_lrs)

    # -- the run ----------------------------------------------------------------------------------
    def start(self, base: dict[int, list[float]], total_steps: int | None) -> None:
        """Capture the base LRs and the run length ``T``; check that the schedules can run ``T`` steps."""
        self.base = {i: [float(b) for b in bs] for i, bs in base.items()}
        self.total = total_steps
        self._resolve()
        if self.plateau is not None:
            self.plateau.reset()  # a new fit; a resumed one gets its state back from load_state_dict
            for i, bs in self.base.items():
                try:
                    self.plateau.min_lrs(len(bs))
                except ValueError as e:
                    raise ValueError(f"optimizer {i}: {e}") from e

    def _resolve(self) -> None:
        for fn in (self.schedule, self.momentum):
            if fn is None:
                continue
            check = getattr(fn, "check", None)
            check(self.total) if check is not None else fn(0, self.total)  # raises ValueError
        found = plateau_of(self.schedule, self.total)
        self.plateau, self.plateau_start = (None, 0) if found is None else found

    def factor(self, step: int) -> float:
        """``schedule(step, T)`` (1 without a schedule)."""
        return 1.0 if self.schedule is None else float(self.schedule(step, self.total))

    def group_lrs(self, i: int, step: int) -> list[float]:
        """The LR of each group of optimizer ``i`` at optimizer step ``step``."""
        base = self.base[i]
        phase = self.phase
        if phase is not None and phase.active(step):
            return [phase.lr(step, lr) for lr in self._scheduled(base, phase.start_step)]
        return self._scheduled(base, step)

    def _scheduled(self, base: list[float], step: int) -> list[float]:
        if self.plateau is not None and step >= self.plateau_start:
            return self.plateau.lrs(base)
        f = self.factor(step)
        return [b * f for b in base]

    def lrs(self, step: int) -> dict[int, list[float]]:
        """``{optimizer index: [LR per group]}`` at optimizer step ``step``."""
        return {i: self.group_lrs(i, step) for i in self.base}

    def momentum_at(self, step: int) -> float | None:
        return None if self.momentum is None else float(self.momentum(step, self.total))

    def past_end(self, step: int) -> bool:
        """Whether ``step`` is at or past the run length (the schedule has ended)."""
        return self.total is not None and step >= self.total

    def step_plateau(self, step: int, metric: float) -> bool | None:
        """One validation's ``metric`` at optimizer step ``step``: ``None`` when the plateau does not count
        it (no plateau, still in the warmup, or inside the phase), else whether the LR was reduced."""
        plateau = self.plateau
        if plateau is None or step < self.plateau_start:
            return None
        if self.phase is not None and self.phase.active(step):
            return None
        before = plateau.reductions
        plateau.step(metric)
        return plateau.reductions != before

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "base_lrs": {i: list(b) for i, b in self.base.items()},
            "total_steps": self.total,
            "plateau": None if self.plateau is None else self.plateau.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Restore base LRs (where the group counts match) and the plateau; returns what could not be restored."""
        problems = []
        for i, saved in (state.get("base_lrs") or {}).items():
            i = int(i)
            if i in self.base and len(saved) == len(self.base[i]):
                self.base[i] = [float(x) for x in saved]
            elif i in self.base:
                problems.append(
                    f"the checkpoint has {len(saved)} base LR(s) for optimizer {i}, which has "
                    f"{len(self.base[i])} group(s) now; using the groups' current LRs"
                )
        saved_total = state.get("total_steps")
        if saved_total is not None and saved_total != self.total:
            problems.append(
                f"the checkpoint's run was {saved_total} steps long, this one is {self.total}; "
                "the LR curve continues on the new length"
            )
        if self.plateau is not None and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])
        return problems


def ends_in_plateau(schedule: object) -> bool:
    """Whether ``schedule`` is a :class:`Plateau` or warmups in front of one (no run length needed)."""
    while isinstance(schedule, Warmup):
        schedule = schedule.then
    return isinstance(schedule, Plateau)


def run_length(estimate: float | None) -> int | None:
    """``T`` from ``trainer.estimated_stepping_batches`` (``None`` when infinite, unknown or < 1)."""
    if estimate is None or not math.isfinite(estimate) or estimate < 1:
        return None
    return int(estimate)


def no_length_reason(max_epochs: int | None, max_steps: int, batches_per_epoch: float) -> str:
    """Why a Trainer gives no run length, and how to give one (added to a refusal).

    Example:
        >>> no_length_reason(3, -1, float("inf"))[:40]
        ' (the train loader has no length (num_tr'
    """
    if max_epochs in (None, -1) and max_steps == -1:
        cause = "the Trainer sets no end (max_steps=-1 and max_epochs=-1)"
    else:
        cause = (
            f"the train loader has no length (num_training_batches={batches_per_epoch}, e.g. an IterableDataset), "
            f"so max_epochs={max_epochs} gives no step count"
        )
    return f" ({cause}; pass LRSchedule(total_steps=...) or Trainer(max_steps=...))"


def log_keys(
    base: dict[int, list[float]], name: str, group_names: dict[int, list[str | None]]
) -> dict[int, list[str | None]]:
    """The logged key of each group: ``name`` once when all groups share a base LR (``None`` for the others),
    else ``name/<group name>`` per group (``name/opt<i>/<group name>`` with several optimizers).

    Example:
        >>> log_keys({0: [0.1, 0.01]}, "lr", {0: ["head", None]})
        {0: ['lr/head', 'lr/pg1']}
    """
    if len({b for bs in base.values() for b in bs}) <= 1:
        first = min(base)
        return {i: [name if (i == first and j == 0) else None for j in range(len(bs))] for i, bs in base.items()}
    keys: dict[int, list[str | None]] = {}
    for i, bs in base.items():
        prefix = f"opt{i}/" if len(base) > 1 else ""
        labels = [f"{name}/{prefix}{n if n is not None else f'pg{j}'}" for j, n in enumerate(group_names[i][: len(bs)])]
        keys[i] = [k if labels.count(k) == 1 else f"{k}_{j}" for j, k in enumerate(labels)]
    return keys


def check_schedule_args(
    schedule: Any, momentum: Any, total_steps: Any, optimizers: Any, log_name: Any
) -> tuple[int | None, list[int] | None]:
    """Check :class:`~lightning_tricks.callbacks.LRSchedule`'s arguments; return ``total_steps`` and the
    sorted optimizer indices (``None``: all)."""
    for name, fn in (("schedule", schedule), ("momentum", momentum)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be None or callable as {name}(step, total_steps), got {fn!r}")
    total = check_int("total_steps", total_steps, 1, allow_none=True)
    indices = None
    if optimizers is not None:
        idx = [optimizers] if isinstance(optimizers, int) else list(optimizers)
        if not idx:
            raise ValueError("optimizers must be None, an index >= 0 or a non-empty list of them, got []")
        indices = sorted({int(check_int("optimizers", i, 0)) for i in idx})  # type: ignore[arg-type]
    if not isinstance(log_name, str) or not log_name:
        raise ValueError(f"log_name must be a non-empty string, got {log_name!r}")
    return total, indices


def set_momentum(group: dict[str, Any], momentum: float) -> bool:
    """Write ``momentum`` into a group (Adam's ``betas[0]`` or SGD's ``momentum``); ``False`` if it has neither."""
    if "betas" in group:
        group["betas"] = (momentum, *tuple(group["betas"])[1:])
    elif "momentum" in group:
        group["momentum"] = momentum
    else:
        return False
    return True


def lr_metrics(
    keys: Sequence[str | None], groups: Sequence[dict[str, Any]], log_name: str, momentum: bool
) -> dict[str, float]:
    """``{key: lr}`` of the groups with a log key (and ``momentum`` in place of ``log_name`` in the key)."""
    metrics = {}
    for key, g in zip(keys, groups):
        if key:
            metrics[key] = float(g["lr"])
            if momentum:
                value = g["betas"][0] if "betas" in g else g["momentum"]
                metrics[key.replace(log_name, "momentum", 1)] = float(value)
    return metrics


def foreign_write_message(owner: str, where: str, group: dict[str, Any], written: float, step: int) -> str:
    """The error raised when a group's LR is not what the owner wrote: someone else wrote it."""
    name = group.get("name")
    return (
        f"{owner} owns the learning rate, but {where}{'' if name is None else f' ({name!r})'} has "
        f"lr={group['lr']!r} where it wrote {written!r} for step {step}: something else set param_group['lr'] "
        "during fit. Change the LR through LRSchedule (LRSchedule.of(trainer).plan), or remove the other "
        "writer (a callback, a module hook, a torch LR scheduler stepped by hand)."
    )
