"""Learning-rate and momentum schedules as pure functions of the optimizer step.

Every schedule is a small object called as ``schedule(step, total_steps) -> float``: the multiplier of
each parameter group's base learning rate at optimizer step ``step`` (0-based, counting optimizer
steps, not batches) of a run of ``total_steps`` steps. There is no optimizer and no Trainer inside, so
a schedule is tested against its formula with plain numbers and drives any training loop;
:class:`lightning_tricks.callbacks.LRSchedule` applies one in a Lightning ``Trainer``.

Step arguments (``step_size``, ``milestones``, ``steps``, ``T_0``, ...) are either an ``int`` (optimizer
steps) or a ``float`` in ``(0, 1]`` (a fraction of ``total_steps``, rounded to the nearest step, at
least one step for lengths), so one config serves runs of any length; :func:`resolve_steps` is the one
place that converts them.

Caffe's policies (Jia et al. 2014, arXiv:1408.5093; ``solver.prototxt`` ``lr_policy``), with ``t`` the
step and ``T`` the run length:

==============  =================================  ===========================================
Caffe policy    multiplier                         class
==============  =================================  ===========================================
``fixed``       ``1``                              :class:`Constant`
``step``        ``gamma ** floor(t / step_size)``  :class:`Step`
``multistep``   ``gamma ** #(milestones <= t)``    :class:`MultiStep`
``exp``         ``gamma ** t``                     :class:`Exponential`
``inv``         ``(1 + gamma * t) ** -power``      :class:`Inverse`
``poly``        ``(1 - t / T) ** power``           :class:`Poly`
``sigmoid``     ``1 / (1 + exp(-gamma (t - s)))``  :class:`Sigmoid`
==============  =================================  ===========================================

and the modern ones: :class:`Cosine` decay to a floor (Loshchilov & Hutter 2017, arXiv:1608.03983),
:class:`CosineRestarts` (SGDR, same paper), :class:`Cyclic` (Smith 2017, arXiv:1506.01186),
:class:`OneCycle` (Smith & Topin 2017, arXiv:1708.07120; Smith 2018, arXiv:1803.09820) with
:class:`OneCycleMomentum`, :class:`Linear`, and :class:`Warmup`, the one linear warmup that goes in front
of any other schedule (Goyal et al. 2017, arXiv:1706.02677).

Where ``torch.optim.lr_scheduler`` has the same schedule the values are equal to its to 1e-9 over a
whole run (``tests/test_schedules.py``).

:class:`Plateau` is the event-driven one (torch ``ReduceLROnPlateau``): it is stepped with a monitored
metric once per validation, not evaluated from the step, and keeps its state (``state_dict``); it stands
alone or after a :class:`Warmup`, and ``LRSchedule`` steps it.

Phases: what another trick contributes to the tail of the LR curve. :class:`SWALRPhase` is SWA's
constant or annealed SWA learning rate (``torch.optim.swa_utils.SWALR`` semantics); because its target
is an absolute LR, not a multiplier, it is evaluated per parameter group as
``phase.lr(step, lr_at_start)`` with ``lr_at_start = base_lr * schedule(phase.start_step, T)``.
:class:`lightning_tricks.callbacks.LRSchedule` evaluates it (``add_phase``); the other tricks' LR
changes are schedules (snapshot cycles are :class:`CosineRestarts`) or base-LR changes (linear
scaling, the range test's hand-off).

Momentum schedules (:class:`OneCycleMomentum`, :class:`CyclicMomentum`, or any schedule such as
``Constant(0.9)``) return the momentum value itself (SGD ``momentum`` / Adam ``beta1``), not a multiplier.

Example:
    >>> sched = Warmup(steps=0.1, then=Cosine(min_factor=0.01))
    >>> [round(sched(t, 100), 4) for t in (0, 5, 10, 55, 99)]
    [0.0, 0.5, 1.0, 0.505, 0.0103]
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard

from lightning_tricks.checks import check_int

__all__ = [
    "FINDER_STAGES",
    "bounded_search",
    "check_finder_args",
    "fewest_samples",
    "batch_size_attribute",
    "loader_batch_size",
    "scaling_message",
    "Schedule",
    "StepValue",
    "resolve_steps",
    "Constant",
    "Step",
    "MultiStep",
    "Exponential",
    "Inverse",
    "Poly",
    "Sigmoid",
    "Cosine",
    "CosineRestarts",
    "Cyclic",
    "CyclicMomentum",
    "OneCycle",
    "OneCycleMomentum",
    "Linear",
    "Warmup",
    "Plateau",
    "plateau_of",
    "PLATEAU_MODES",
    "THRESHOLD_MODES",
    "swa_lr",
    "SWALRPhase",
    "SCALING_RULES",
    "global_batch_size",
    "scaling_factor",
]

StepValue = int | float
"""An ``int`` number of optimizer steps, or a ``float`` in ``(0, 1]``: a fraction of the run."""


# --------------------------------------------------------------------------------------------------
# step arguments: optimizer steps or fractions of the run
# --------------------------------------------------------------------------------------------------
def _check_step_value(value: object, name: str, *, minimum: int = 1) -> StepValue:
    """Validate a step argument at construction; return it as ``int`` or fraction ``float``.

    ``minimum`` is the smallest allowed int (0 or 1). Integral floats above 1 (``1000.0`` from a
    YAML file) are taken as step counts.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"{name} must be an int number of optimizer steps or a float in (0, 1] "
            f"(a fraction of the run), got {value!r}"
        )
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        if 0.0 < value <= 1.0:
            return value
        if value > 1.0 and value.is_integer():
            return int(value)
        raise ValueError(
            f"{name} must be an int >= {minimum} (optimizer steps) or a float in (0, 1] "
            f"(a fraction of the run), got {value!r}"
        )
    if value < minimum:
        raise ValueError(
            f"{name} must be an int >= {minimum} (optimizer steps) or a float in (0, 1] "
            f"(a fraction of the run), got {value!r}"
        )
    return int(value)


def resolve_steps(value: StepValue, total_steps: int | None, name: str = "steps", *, minimum: int = 0) -> int:
    """The number of optimizer steps meant by ``value``: an int as is, a float as a fraction of the run.

    Fractions are rounded half up, and raised to ``minimum`` (a length that must be positive is at
    least one step even in a very short run): ``resolve_steps(0.25, 10) == 3``,
    ``resolve_steps(0.01, 10, minimum=1) == 1``. A fraction needs ``total_steps``.

    Example:
        >>> resolve_steps(500, None), resolve_steps(0.1, 2000)
        (500, 200)
    """
    if isinstance(value, float):
        if total_steps is None:
            raise ValueError(
                f"{name}={value!r} is a fraction of the run, so it needs total_steps "
                "(the run length in optimizer steps); give it or use an int number of steps"
            )
        return max(minimum, int(math.floor(value * total_steps + 0.5)))
    return int(value)


def _total_or_raise(total_steps: int | None, who: str, name: str = "steps") -> int:
    if total_steps is None:
        raise ValueError(
            f"{who} with {name}=None runs over the whole run, so it needs total_steps "
            f"(the run length in optimizer steps); give it or set {name}"
        )
    return total_steps


def _check_momentum_bounds(schedule: Any) -> None:
    """``base_momentum <= max_momentum``, both in [0, 1], on a momentum schedule (set back as floats)."""
    schedule.base_momentum = _check_factor(schedule.base_momentum, "base_momentum", 0.0, 1.0)
    schedule.max_momentum = _check_factor(schedule.max_momentum, "max_momentum", 0.0, 1.0)
    if schedule.base_momentum > schedule.max_momentum:
        raise ValueError(
            f"base_momentum must be <= max_momentum (bounds reversed?), got "
            f"base_momentum={schedule.base_momentum!r} > max_momentum={schedule.max_momentum!r}"
        )


def _check_factor(
    value: float, name: str, low: float = 0.0, high: float | None = None, *, low_open: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    bad_low = value <= low if low_open else value < low
    if bad_low or (high is not None and value > high):
        lo = "(" if low_open else "["
        hi = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{name} must be in {lo}{low}, {hi}, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------------
class Schedule:
    """Base of all schedules: ``schedule(step, total_steps=None) -> float``.

    Subclasses implement :meth:`value`; :meth:`__call__` checks ``step`` and ``total_steps``.
    """

    def __call__(self, step: int, total_steps: int | None = None) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step!r}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
        return float(self.value(int(step), None if total_steps is None else int(total_steps)))

    def value(self, step: int, total_steps: int | None) -> float:
        """The multiplier at ``step`` (already checked to be ``>= 0``)."""
        raise NotImplementedError

    def check(self, total_steps: int | None) -> None:
        """Raise ``ValueError`` now if this schedule cannot run ``total_steps`` steps.

        Called by :class:`~lightning_tricks.callbacks.LRSchedule` when the run length is known, so a
        warmup longer than the run or a fraction without a run length fails before training.
        """
        self(0, total_steps)
        if total_steps is not None:
            self(total_steps - 1, total_steps)

    def curve(self, total_steps: int) -> list[float]:
        """The multipliers of a whole run, ``[self(t, total_steps) for t in range(total_steps)]``."""
        return [self(t, total_steps) for t in range(total_steps)]


# --------------------------------------------------------------------------------------------------
# Caffe policies
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Constant(Schedule):
    """Caffe ``fixed``: the multiplier is ``factor`` at every step.

    As a momentum schedule, ``Constant(0.9)`` holds the momentum at 0.9.

    Example:
        >>> Constant()(123, 1000)
        1.0
    """

    factor: float = 1.0

    def __post_init__(self) -> None:
        self.factor = _check_factor(self.factor, "factor")

    def value(self, step: int, total_steps: int | None) -> float:
        return self.factor


@dataclasses.dataclass
class Step(Schedule):
    """Caffe ``step`` (``torch.optim.lr_scheduler.StepLR``): ``gamma ** floor(t / step_size)``.

    Example:
        >>> s = Step(step_size=10, gamma=0.5)
        >>> s(9), s(10), s(25)
        (1.0, 0.5, 0.25)
    """

    step_size: StepValue
    gamma: float = 0.1

    def __post_init__(self) -> None:
        self.step_size = _check_step_value(self.step_size, "step_size", minimum=1)
        self.gamma = _check_factor(self.gamma, "gamma", low_open=True)

    def value(self, step: int, total_steps: int | None) -> float:
        size = resolve_steps(self.step_size, total_steps, "step_size", minimum=1)
        return self.gamma ** (step // size)


@dataclasses.dataclass
class MultiStep(Schedule):
    """Caffe ``multistep`` (``torch.optim.lr_scheduler.MultiStepLR``): ``gamma ** #(milestones <= t)``.

    Milestones are optimizer steps or fractions of the run, strictly increasing once resolved.

    Example:
        >>> s = MultiStep(milestones=[0.5, 0.75], gamma=0.1)
        >>> [round(s(t, 100), 6) for t in (49, 50, 74, 75)]
        [1.0, 0.1, 0.1, 0.01]
    """

    milestones: Sequence[StepValue]
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.milestones, (str, bytes, int, float)) or not hasattr(self.milestones, "__iter__"):
            raise ValueError(f"milestones must be a list of steps, got {self.milestones!r}")
        self.milestones = tuple(
            _check_step_value(m, f"milestones[{i}]", minimum=1) for i, m in enumerate(self.milestones)
        )
        if not self.milestones:
            raise ValueError("milestones must not be empty")
        if all(isinstance(m, int) for m in self.milestones) or all(isinstance(m, float) for m in self.milestones):
            self._check_increasing(list(self.milestones))
        self.gamma = _check_factor(self.gamma, "gamma", low_open=True)

    def _check_increasing(self, values: list) -> None:
        if any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError(
                f"milestones must be strictly increasing, got {list(self.milestones)!r}"
                + (f" (= {values} steps)" if values != list(self.milestones) else "")
            )

    def value(self, step: int, total_steps: int | None) -> float:
        ms = [resolve_steps(m, total_steps, "milestones", minimum=1) for m in self.milestones]
        self._check_increasing(ms)
        return self.gamma ** bisect.bisect_right(ms, step)


@dataclasses.dataclass
class Exponential(Schedule):
    """Caffe ``exp`` (``torch.optim.lr_scheduler.ExponentialLR``): ``gamma ** t``.

    Example:
        >>> Exponential(gamma=0.5)(3)
        0.125
    """

    gamma: float

    def __post_init__(self) -> None:
        self.gamma = _check_factor(self.gamma, "gamma", low_open=True)

    def value(self, step: int, total_steps: int | None) -> float:
        return self.gamma**step


@dataclasses.dataclass
class Inverse(Schedule):
    """Caffe ``inv``: ``(1 + gamma * t) ** (-power)``.

    Example:
        >>> Inverse(gamma=1e-4, power=0.75)(10000)  # (1 + 1) ** -0.75
        0.5946035575013605
    """

    gamma: float
    power: float

    def __post_init__(self) -> None:
        self.gamma = _check_factor(self.gamma, "gamma")
        self.power = _check_factor(self.power, "power")

    def value(self, step: int, total_steps: int | None) -> float:
        return (1.0 + self.gamma * step) ** (-self.power)


@dataclasses.dataclass
class Poly(Schedule):
    """Caffe ``poly`` (``torch.optim.lr_scheduler.PolynomialLR``): ``(1 - min(t, S) / S) ** power``.

    ``steps`` (``S``) defaults to the whole run; after it the multiplier stays 0.

    Example:
        >>> Poly(power=2.0)(50, 100)
        0.25
    """

    power: float = 1.0
    steps: StepValue | None = None

    def __post_init__(self) -> None:
        self.power = _check_factor(self.power, "power")
        if self.steps is not None:
            self.steps = _check_step_value(self.steps, "steps", minimum=1)

    def value(self, step: int, total_steps: int | None) -> float:
        s = (
            _total_or_raise(total_steps, "Poly")
            if self.steps is None
            else resolve_steps(self.steps, total_steps, "steps", minimum=1)
        )
        return (1.0 - min(step, s) / s) ** self.power


@dataclasses.dataclass
class Sigmoid(Schedule):
    """Caffe ``sigmoid``: ``1 / (1 + exp(-gamma * (t - step_size)))``.

    A negative ``gamma`` decays the rate around step ``step_size``; a positive one raises it.

    Example:
        >>> round(Sigmoid(gamma=-0.1, step_size=50)(50), 6)
        0.5
    """

    gamma: float
    step_size: StepValue

    def __post_init__(self) -> None:
        if (
            isinstance(self.gamma, bool)
            or not isinstance(self.gamma, (int, float))
            or not math.isfinite(self.gamma)
            or self.gamma == 0
        ):
            raise ValueError(f"gamma must be a finite non-zero number (negative to decay), got {self.gamma!r}")
        self.gamma = float(self.gamma)
        self.step_size = _check_step_value(self.step_size, "step_size", minimum=0)

    def value(self, step: int, total_steps: int | None) -> float:
        center = resolve_steps(self.step_size, total_steps, "step_size")
        z = -self.gamma * (step - center)
        if z >= 0:  # exp(-z) cannot overflow
            e = math.exp(-z)
            return e / (1.0 + e)
        return 1.0 / (1.0 + math.exp(z))


# --------------------------------------------------------------------------------------------------
# cosine family
# --------------------------------------------------------------------------------------------------
def _cosine(fraction: float, min_factor: float) -> float:
    return min_factor + (1.0 - min_factor) * (1.0 + math.cos(math.pi * fraction)) / 2.0


@dataclasses.dataclass
class Cosine(Schedule):
    """Cosine decay (``torch.optim.lr_scheduler.CosineAnnealingLR``) from 1 to ``min_factor``.

    ``min_factor + (1 - min_factor) * (1 + cos(pi * min(t, S) / S)) / 2`` with ``S = steps`` (default:
    the whole run); after ``S`` it stays at ``min_factor``. Loshchilov & Hutter 2017, arXiv:1608.03983.

    Example:
        >>> c = Cosine(min_factor=0.1)
        >>> c(0, 100), round(c(50, 100), 6), round(c(100, 100), 6)
        (1.0, 0.55, 0.1)
    """

    min_factor: float = 0.0
    steps: StepValue | None = None

    def __post_init__(self) -> None:
        self.min_factor = _check_factor(self.min_factor, "min_factor", 0.0, 1.0)
        if self.steps is not None:
            self.steps = _check_step_value(self.steps, "steps", minimum=1)

    def value(self, step: int, total_steps: int | None) -> float:
        s = (
            _total_or_raise(total_steps, "Cosine")
            if self.steps is None
            else resolve_steps(self.steps, total_steps, "steps", minimum=1)
        )
        return _cosine(min(step, s) / s, self.min_factor)


@dataclasses.dataclass
class CosineRestarts(Schedule):
    """SGDR, cosine decay with warm restarts (``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts``).

    Cycle ``i`` lasts ``T_i = T_0 * T_mult ** i`` steps; inside it, with ``t_cur`` the steps since the
    last restart, the multiplier is ``min_factor + (1 - min_factor) * (1 + cos(pi * t_cur / T_i)) / 2``.
    Loshchilov & Hutter 2017, arXiv:1608.03983. Snapshot ensembles (Huang et al. 2017,
    arXiv:1704.00109) take a snapshot at each :meth:`cycle_ends` step.

    Args:
        T_0: length of the first cycle, in optimizer steps or as a fraction of the run.
        T_mult: integer growth of the cycle length, ``>= 1``.
        min_factor: the floor at the end of each cycle, in ``[0, 1]``.

    Example:
        >>> s = CosineRestarts(T_0=10, T_mult=2)
        >>> s(0), round(s(5), 6), s(10), s(30)
        (1.0, 0.5, 1.0, 1.0)
        >>> s.cycle_ends(70)
        [9, 29, 69]
    """

    T_0: StepValue
    T_mult: int = 1
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        self.T_0 = _check_step_value(self.T_0, "T_0", minimum=1)
        t_mult: Any = self.T_mult  # YAML may give 2.0
        if isinstance(t_mult, float) and t_mult.is_integer():
            self.T_mult = int(t_mult)
        if isinstance(self.T_mult, bool) or not isinstance(self.T_mult, int) or self.T_mult < 1:
            raise ValueError(f"T_mult must be an int >= 1, got {self.T_mult!r}")
        self.min_factor = _check_factor(self.min_factor, "min_factor", 0.0, 1.0)

    def position(self, step: int, total_steps: int | None = None) -> tuple[int, int, int]:
        """``(cycle index, steps since the restart, cycle length)`` at ``step``, in exact integers."""
        t_i = resolve_steps(self.T_0, total_steps, "T_0", minimum=1)
        if self.T_mult == 1:
            return step // t_i, step % t_i, t_i
        cycle, t_cur = 0, step
        while t_cur >= t_i:
            t_cur -= t_i
            t_i *= self.T_mult
            cycle += 1
        return cycle, t_cur, t_i

    def cycle_ends(self, total_steps: int) -> list[int]:
        """The steps that end a cycle (the last step before each restart) within ``total_steps``.

        A cycle cut short by the end of the run is not listed.
        """
        ends, t_i, start = [], resolve_steps(self.T_0, total_steps, "T_0", minimum=1), 0
        while start + t_i <= total_steps:
            ends.append(start + t_i - 1)
            start += t_i
            t_i *= self.T_mult
        return ends

    def value(self, step: int, total_steps: int | None) -> float:
        _, t_cur, t_i = self.position(step, total_steps)
        return _cosine(t_cur / t_i, self.min_factor)


# --------------------------------------------------------------------------------------------------
# cyclical learning rates
# --------------------------------------------------------------------------------------------------
CYCLIC_MODES = ("triangular", "triangular2", "exp_range")


def _cyclic_scale(step: int, up: int, down: int, mode: str, gamma: float) -> float:
    """Fraction of the way from the low to the high bound at ``step`` (torch ``CyclicLR``'s formula)."""
    total = float(up + down)
    ratio = up / total
    cycle = math.floor(1 + step / total)
    x = 1.0 + step / total - cycle
    scale = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
    if mode == "triangular":
        amplitude = 1.0
    elif mode == "triangular2":
        amplitude = 1 / (2.0 ** (cycle - 1))
    else:  # exp_range
        amplitude = gamma**step
    return scale * amplitude


def _check_cyclic(obj: Cyclic | CyclicMomentum) -> None:
    obj.step_size_up = _check_step_value(obj.step_size_up, "step_size_up", minimum=1)
    if obj.step_size_down is not None:
        obj.step_size_down = _check_step_value(obj.step_size_down, "step_size_down", minimum=1)
    if obj.mode not in CYCLIC_MODES:
        raise ValueError(f"mode must be one of {CYCLIC_MODES}, got {obj.mode!r}")
    obj.gamma = _check_factor(obj.gamma, "gamma", 0.0, 1.0, low_open=True)


def _cyclic_sizes(obj: Cyclic | CyclicMomentum, total_steps: int | None) -> tuple[int, int]:
    up = resolve_steps(obj.step_size_up, total_steps, "step_size_up", minimum=1)
    down = (
        up
        if obj.step_size_down is None
        else resolve_steps(obj.step_size_down, total_steps, "step_size_down", minimum=1)
    )
    return up, down


@dataclasses.dataclass
class Cyclic(Schedule):
    """Cyclical learning rate (``torch.optim.lr_scheduler.CyclicLR``) between two bounds.

    The multiplier goes linearly from ``min_factor`` up to ``max_factor`` in ``step_size_up`` steps and
    back in ``step_size_down`` (default: the same), with the amplitude kept (``"triangular"``), halved
    each cycle (``"triangular2"``) or scaled by ``gamma ** t`` (``"exp_range"``). The base LR is the top
    of the cycle when ``max_factor=1``. Smith 2017, arXiv:1506.01186 (2 to 10 epochs per half cycle).

    :meth:`momentum` gives the matching momentum cycle (high when the LR is low).

    Example:
        >>> c = Cyclic(min_factor=0.1, step_size_up=10)
        >>> c(0), c(10), round(c(15), 6), c(20)
        (0.1, 1.0, 0.55, 0.1)
    """

    min_factor: float = 0.1
    max_factor: float = 1.0
    step_size_up: StepValue = 2000
    step_size_down: StepValue | None = None
    mode: str = "triangular"
    gamma: float = 1.0

    def __post_init__(self) -> None:
        self.min_factor = _check_factor(self.min_factor, "min_factor")
        self.max_factor = _check_factor(self.max_factor, "max_factor")
        if self.min_factor > self.max_factor:
            raise ValueError(
                f"min_factor must be <= max_factor (bounds reversed?), "
                f"got min_factor={self.min_factor!r} > max_factor={self.max_factor!r}"
            )
        _check_cyclic(self)

    def value(self, step: int, total_steps: int | None) -> float:
        up, down = _cyclic_sizes(self, total_steps)
        return self.min_factor + (self.max_factor - self.min_factor) * _cyclic_scale(
            step, up, down, self.mode, self.gamma
        )

    def momentum(self, base_momentum: float = 0.8, max_momentum: float = 0.9) -> CyclicMomentum:
        """The momentum schedule that cycles inversely to this one (torch ``cycle_momentum=True``)."""
        return CyclicMomentum(
            base_momentum=base_momentum,
            max_momentum=max_momentum,
            step_size_up=self.step_size_up,
            step_size_down=self.step_size_down,
            mode=self.mode,
            gamma=self.gamma,
        )


@dataclasses.dataclass
class CyclicMomentum(Schedule):
    """Momentum cycled inversely to :class:`Cyclic`: ``max_momentum`` when the LR is at its low bound.

    Returns the momentum value (SGD ``momentum`` / Adam ``beta1``), equal to torch ``CyclicLR``'s
    ``cycle_momentum``.

    Example:
        >>> m = CyclicMomentum(step_size_up=10)
        >>> m(0), m(10)
        (0.9, 0.8)
    """

    base_momentum: float = 0.8
    max_momentum: float = 0.9
    step_size_up: StepValue = 2000
    step_size_down: StepValue | None = None
    mode: str = "triangular"
    gamma: float = 1.0

    def __post_init__(self) -> None:
        _check_momentum_bounds(self)
        _check_cyclic(self)

    def value(self, step: int, total_steps: int | None) -> float:
        up, down = _cyclic_sizes(self, total_steps)
        return self.max_momentum - (self.max_momentum - self.base_momentum) * _cyclic_scale(
            step, up, down, self.mode, self.gamma
        )


# --------------------------------------------------------------------------------------------------
# one-cycle
# --------------------------------------------------------------------------------------------------
ANNEAL = ("cos", "linear")


def _anneal(start: float, end: float, pct: float, how: str) -> float:
    if how == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


def _one_cycle(
    step: int,
    total_steps: int | None,
    pct_start: float,
    three_phase: bool,
    anneal: str,
    points: Sequence[tuple[float, float]],
    who: str,
) -> float:
    """Piecewise anneal through ``points`` (``(start, end)`` per phase) as torch ``OneCycleLR`` does."""
    total = _total_or_raise(total_steps, who, "total_steps")
    ends = (
        [float(pct_start * total) - 1, float(2 * pct_start * total) - 2, total - 1]
        if three_phase
        else [float(pct_start * total) - 1, total - 1]
    )
    for i, (a, b) in enumerate(zip([0.0, *ends], ends)):
        if b <= a:
            raise ValueError(
                f"{who}(pct_start={pct_start!r}{', three_phase=True' if three_phase else ''}) "
                f"leaves phase {i + 1} without steps in a run of total_steps={total}; "
                "use a longer run or another pct_start"
            )
    step = min(step, total - 1)
    start_step = 0.0
    for i, end_step in enumerate(ends):
        if step <= end_step or i == len(ends) - 1:
            pct = (step - start_step) / (end_step - start_step)
            return _anneal(points[i][0], points[i][1], pct, anneal)
        start_step = end_step
    raise AssertionError("unreachable")


def _check_one_cycle(obj: OneCycle | OneCycleMomentum) -> None:
    high = 0.5 if obj.three_phase else 1.0
    obj.pct_start = _check_factor(obj.pct_start, "pct_start", 0.0, high, low_open=True)
    if obj.pct_start >= high:
        raise ValueError(
            f"pct_start must be in (0, {high}){' with three_phase=True' if obj.three_phase else ''}, "
            f"got {obj.pct_start!r}"
        )
    if obj.anneal not in ANNEAL:
        raise ValueError(f"anneal must be one of {ANNEAL}, got {obj.anneal!r}")


@dataclasses.dataclass
class OneCycle(Schedule):
    """One-cycle policy (``torch.optim.lr_scheduler.OneCycleLR``); the base LR is the peak (max) LR.

    The multiplier rises from ``1 / div_factor`` to 1 over the first ``pct_start`` of the run, then
    falls to ``1 / (div_factor * final_div_factor)`` (``three_phase``: back to ``1 / div_factor`` over a
    second ``pct_start``, then down to the floor), by half cosines (``anneal="cos"``) or lines.
    Momentum moves the other way: :meth:`momentum` / :class:`OneCycleMomentum`. Smith & Topin 2017,
    arXiv:1708.07120; Smith 2018, arXiv:1803.09820. The LR range test
    (:class:`~lightning_tricks.callbacks.LRRangeTest` with ``apply_to="one_cycle"``) picks the peak.

    Example:
        >>> oc = OneCycle(pct_start=0.25, div_factor=10, final_div_factor=100)
        >>> round(oc(0, 100), 6), oc(24, 100), round(oc(99, 100), 6)
        (0.1, 1.0, 0.001)
    """

    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    anneal: str = "cos"
    three_phase: bool = False

    def __post_init__(self) -> None:
        self.div_factor = _check_factor(self.div_factor, "div_factor", low_open=True)
        self.final_div_factor = _check_factor(self.final_div_factor, "final_div_factor", low_open=True)
        _check_one_cycle(self)

    def value(self, step: int, total_steps: int | None) -> float:
        initial = 1.0 / self.div_factor
        final = initial / self.final_div_factor
        points = (
            [(initial, 1.0), (1.0, initial), (initial, final)] if self.three_phase else [(initial, 1.0), (1.0, final)]
        )
        return _one_cycle(step, total_steps, self.pct_start, self.three_phase, self.anneal, points, "OneCycle")

    def momentum(self, base_momentum: float = 0.85, max_momentum: float = 0.95) -> OneCycleMomentum:
        """The momentum schedule of this cycle (``max_momentum`` when the LR is low, ``base`` at the peak)."""
        return OneCycleMomentum(
            base_momentum=base_momentum,
            max_momentum=max_momentum,
            pct_start=self.pct_start,
            anneal=self.anneal,
            three_phase=self.three_phase,
        )


@dataclasses.dataclass
class OneCycleMomentum(Schedule):
    """The momentum of the one-cycle policy: from ``max_momentum`` down to ``base_momentum`` at the LR
    peak and back up (torch ``OneCycleLR(cycle_momentum=True)``). Returns the momentum value.

    Build it from the LR schedule so the phases match: ``OneCycle(pct_start=0.25).momentum()``.

    Example:
        >>> m = OneCycle(pct_start=0.5).momentum()
        >>> m(0, 100), m(49, 100), m(99, 100)
        (0.95, 0.85, 0.95)
    """

    base_momentum: float = 0.85
    max_momentum: float = 0.95
    pct_start: float = 0.3
    anneal: str = "cos"
    three_phase: bool = False

    def __post_init__(self) -> None:
        _check_momentum_bounds(self)
        _check_one_cycle(self)

    def value(self, step: int, total_steps: int | None) -> float:
        lo, hi = self.base_momentum, self.max_momentum
        points = [(hi, lo), (lo, hi), (hi, hi)] if self.three_phase else [(hi, lo), (lo, hi)]
        return _one_cycle(step, total_steps, self.pct_start, self.three_phase, self.anneal, points, "OneCycleMomentum")


# --------------------------------------------------------------------------------------------------
# linear and warmup
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Linear(Schedule):
    """Linear ramp (``torch.optim.lr_scheduler.LinearLR``) from ``start_factor`` to ``end_factor``.

    ``start + (end - start) * min(t, S) / S`` with ``S = steps`` (default: the whole run); the default
    is a linear decay from 1 to 0.

    Example:
        >>> Linear()(25, 100), Linear(start_factor=0.5, end_factor=1.0, steps=10)(5)
        (0.75, 0.75)
    """

    start_factor: float = 1.0
    end_factor: float = 0.0
    steps: StepValue | None = None

    def __post_init__(self) -> None:
        self.start_factor = _check_factor(self.start_factor, "start_factor")
        self.end_factor = _check_factor(self.end_factor, "end_factor")
        if self.steps is not None:
            self.steps = _check_step_value(self.steps, "steps", minimum=1)

    def value(self, step: int, total_steps: int | None) -> float:
        s = (
            _total_or_raise(total_steps, "Linear")
            if self.steps is None
            else resolve_steps(self.steps, total_steps, "steps", minimum=1)
        )
        return self.start_factor + (self.end_factor - self.start_factor) * min(step, s) / s


@dataclasses.dataclass
class Warmup(Schedule):
    """Linear warmup in front of any schedule (Goyal et al. 2017, arXiv:1706.02677).

    For ``t < W`` (``W = steps``) the multiplier is ``(start_factor + (1 - start_factor) * t / W) *
    then(0)``; from ``W`` on it is ``then(t - W, total_steps - W)``: the schedule after the warmup sees
    the rest of the run as its whole run (so ``Cosine()`` ends at its floor on the last step, and
    fractions inside ``then`` are fractions of the post-warmup run). This wrapper is the only warmup in
    the library; no schedule has its own.

    Args:
        steps: warmup length, optimizer steps or a fraction of the run; must be shorter than the run.
        then: the schedule after the warmup (default :class:`Constant`).
        start_factor: multiplier at step 0, in ``[0, 1]`` (0: the first step has LR 0).

    Example:
        >>> w = Warmup(steps=4, then=Step(step_size=2, gamma=0.5))
        >>> [w(t, 10) for t in range(8)]
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.5, 0.5]
    """

    steps: StepValue
    then: Schedule | Callable[[int, int | None], float] | None = None
    start_factor: float = 0.0

    def __post_init__(self) -> None:
        self.steps = _check_step_value(self.steps, "steps", minimum=1)
        if self.then is None:
            self.then = Constant()
        if not callable(self.then):
            raise ValueError(f"then must be a schedule (callable as then(step, total_steps)), got {self.then!r}")
        self.start_factor = _check_factor(self.start_factor, "start_factor", 0.0, 1.0)

    def warmup_steps(self, total_steps: int | None) -> int:
        """The warmup length in steps; raises if it is not shorter than the run."""
        w = resolve_steps(self.steps, total_steps, "steps", minimum=1)
        if total_steps is not None and w >= total_steps:
            raise ValueError(
                f"warmup steps={self.steps!r} ({w} steps) must be shorter than the run (total_steps={total_steps})"
            )
        return w

    def value(self, step: int, total_steps: int | None) -> float:
        w = self.warmup_steps(total_steps)
        rest = None if total_steps is None else total_steps - w
        assert self.then is not None
        if step < w:
            return (self.start_factor + (1.0 - self.start_factor) * step / w) * self.then(0, rest)
        return self.then(step - w, rest)

    def check(self, total_steps: int | None) -> None:
        super().check(total_steps)
        then_check = getattr(self.then, "check", None)
        if then_check is not None:
            w = self.warmup_steps(total_steps)
            then_check(None if total_steps is None else total_steps - w)


# --------------------------------------------------------------------------------------------------
# event-driven: reduce the LR when a monitored metric stops improving
# --------------------------------------------------------------------------------------------------
PLATEAU_MODES = ("min", "max")
THRESHOLD_MODES = ("rel", "abs")


@dataclasses.dataclass
class Plateau(Schedule):
    """Reduce the LR when a monitored metric stops improving (``torch.optim.lr_scheduler.ReduceLROnPlateau``).

    Unlike the other schedules this one is not a function of the step: it is stepped with the value of
    ``monitor`` once per validation (:meth:`step`), keeps the count of validations without improvement,
    and multiplies the LR by ``factor`` when that count exceeds ``patience``. The rule, the same as
    torch's, for each ``metric`` given to :meth:`step`:

    - improved: ``metric < best * (1 - threshold)`` (``mode="min"``, ``threshold_mode="rel"``),
      ``metric < best - threshold`` (``min``, ``abs``), ``metric > best * (1 + threshold)`` (``max``,
      ``rel``) or ``metric > best + threshold`` (``max``, ``abs``); then ``best = metric`` and
      ``num_bad_epochs = 0``, else ``num_bad_epochs += 1`` (a NaN never improves);
    - in cooldown (``cooldown_counter > 0``): ``cooldown_counter -= 1`` and ``num_bad_epochs = 0``;
    - ``num_bad_epochs > patience``: a reduction; ``cooldown_counter = cooldown``, ``num_bad_epochs = 0``.

    At each reduction every parameter group's LR goes from ``lr`` to ``new = max(lr * factor, min_lr)``,
    kept only if ``lr - new > eps`` (:meth:`lrs` replays this from the base LRs, so the LRs are torch's bit
    for bit, ``min_lr`` and ``eps`` included). :meth:`step` and the schedule call return the *current
    factor*: ``factor`` multiplied once per reduction, the multiplier of a base LR that neither
    ``min_lr`` nor ``eps`` stopped.

    :class:`~lightning_tricks.callbacks.LRSchedule` drives it: it reads ``monitor`` from the Trainer's
    ``callback_metrics`` at the end of each validation (every epoch or every ``val_check_interval``
    steps), steps this object, writes the groups' LRs from :meth:`lrs`, and keeps the state (:meth:`state_dict`)
    in its checkpoint. Use it alone or as the ``then`` of a :class:`Warmup` (``Warmup(steps=0.05,
    then=Plateau())``): the plateau factor multiplies the LR after the warmup, and validations that end
    before the warmup's last step are not counted (the metric is still falling fast while the LR rises,
    and a reduction would bend the warmup ramp).

    Args:
        monitor: the logged metric to watch (read by ``LRSchedule``; this core only records the name).
        mode: ``"min"`` (reduce when it stops falling, e.g. a loss) or ``"max"`` (e.g. an accuracy).
        factor: the LR multiplier at each reduction, in ``(0, 1)``.
        patience: validations without improvement tolerated before a reduction, an int ``>= 0``.
        threshold: the least change that counts as an improvement, ``>= 0``.
        threshold_mode: ``"rel"`` (``threshold`` is a fraction of ``best``) or ``"abs"``.
        cooldown: validations after a reduction during which bad ones are not counted, an int ``>= 0``.
        min_lr: the lowest LR (absolute), one value for every group or a list with one per group.
        eps: a reduction smaller than this (absolute) is skipped, ``>= 0``.

    Example:
        >>> p = Plateau(mode="min", factor=0.5, patience=1)
        >>> [p.step(m) for m in (1.0, 0.9, 0.95, 0.95, 0.8, 0.85, 0.9)]
        [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
        >>> p.lrs([0.1, 0.01]), p.best, p.num_bad_epochs
        ([0.025, 0.0025], 0.8, 0)
    """

    monitor: str = "val/loss"
    mode: str = "min"
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: str = "rel"
    cooldown: int = 0
    min_lr: float | Sequence[float] = 0.0
    eps: float = 1e-8
    # state (not part of the repr or of equality: a schedule's identity is its configuration)
    best: float = dataclasses.field(init=False, repr=False, compare=False)
    num_bad_epochs: int = dataclasses.field(init=False, repr=False, compare=False)
    cooldown_counter: int = dataclasses.field(init=False, repr=False, compare=False)
    last_epoch: int = dataclasses.field(init=False, repr=False, compare=False)
    reductions: int = dataclasses.field(init=False, repr=False, compare=False)
    current_factor: float = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ValueError(f"monitor must be the name of a logged metric (a non-empty string), got {self.monitor!r}")
        if self.mode not in PLATEAU_MODES:
            raise ValueError(f"mode must be one of {PLATEAU_MODES}, got {self.mode!r}")
        if self.threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {self.threshold_mode!r}")
        self.factor = _check_factor(self.factor, "factor", 0.0, 1.0, low_open=True)
        if self.factor >= 1.0:
            raise ValueError(
                f"factor must be in (0, 1) (the LR is multiplied by it at each reduction), got {self.factor!r}"
            )
        for name in ("patience", "cooldown"):
            value: Any = getattr(self, name)
            if isinstance(value, float) and value.is_integer():  # YAML may give 3.0
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (a number of validations), got {value!r}")
            setattr(self, name, value)
        self.threshold = _check_factor(self.threshold, "threshold")
        self.eps = _check_factor(self.eps, "eps")
        if isinstance(self.min_lr, (int, float)):
            self.min_lr = _check_factor(self.min_lr, "min_lr")
        elif isinstance(self.min_lr, (str, bytes)) or not hasattr(self.min_lr, "__iter__"):
            raise ValueError(f"min_lr must be a number >= 0 or a list of them (one per group), got {self.min_lr!r}")
        else:
            values = list(self.min_lr)
            if not values:
                raise ValueError("min_lr must be a number >= 0 or a non-empty list of them (one per group), got []")
            self.min_lr = tuple(_check_factor(v, f"min_lr[{i}]") for i, v in enumerate(values))
        self.reset()

    # -- the rule ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every metric seen: no best yet, factor 1 (a new run)."""
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.last_epoch = 0
        self.reductions = 0
        self.current_factor = 1.0

    def is_better(self, metric: float, best: float) -> bool:
        """Whether ``metric`` improves on ``best`` by more than the threshold."""
        if self.mode == "min":
            return metric < (best * (1.0 - self.threshold) if self.threshold_mode == "rel" else best - self.threshold)
        return metric > (best * (self.threshold + 1.0) if self.threshold_mode == "rel" else best + self.threshold)

    def step(self, metric: float) -> float:
        """Take one validation's value of the monitored metric; return the current factor."""
        current = float(metric)
        self.last_epoch += 1
        if self.is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad validations in cooldown are not counted
        if self.num_bad_epochs > self.patience:
            self.reductions += 1
            self.current_factor *= self.factor
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        return self.current_factor

    @property
    def in_cooldown(self) -> bool:
        """Whether the last reduction's cooldown is still running."""
        return self.cooldown_counter > 0

    def min_lrs(self, groups: int) -> tuple[float, ...]:
        """``min_lr`` for each of ``groups`` parameter groups (a list must have one value per group)."""
        if isinstance(self.min_lr, (int, float)):
            return (float(self.min_lr),) * groups
        if len(self.min_lr) != groups:
            raise ValueError(
                f"min_lr has {len(self.min_lr)} values (one per parameter group) but the optimizer has "
                f"{groups} group(s); give one value per group or a single number"
            )
        return tuple(self.min_lr)

    def lrs(self, base_lrs: Sequence[float]) -> list[float]:
        """The LR of each parameter group whose LR was ``base_lrs[j]`` before the first reduction.

        Each of the :attr:`reductions` so far is replayed as torch applies it: ``new = max(lr * factor,
        min_lr)``, kept if ``lr - new > eps``.
        """
        out = []
        for base, floor in zip(base_lrs, self.min_lrs(len(base_lrs))):
            lr = float(base)
            for _ in range(self.reductions):
                new = max(lr * self.factor, floor)
                if lr - new <= self.eps:
                    break  # every later reduction would be skipped as well: lr stays, so new stays
                lr = new
            out.append(lr)
        return out

    def value(self, step: int, total_steps: int | None) -> float:
        return self.current_factor

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The state to checkpoint (plain Python numbers)."""
        return {
            "best": float(self.best),
            "num_bad_epochs": int(self.num_bad_epochs),
            "cooldown_counter": int(self.cooldown_counter),
            "last_epoch": int(self.last_epoch),
            "reductions": int(self.reductions),
            "current_factor": float(self.current_factor),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys keep a fresh run's values."""
        self.reset()
        self.best = float(state.get("best", self.best))
        self.num_bad_epochs = int(state.get("num_bad_epochs", 0))
        self.cooldown_counter = int(state.get("cooldown_counter", 0))
        self.last_epoch = int(state.get("last_epoch", 0))
        self.reductions = int(state.get("reductions", 0))
        factor = state.get("current_factor")
        if factor is None:
            factor = 1.0
            for _ in range(self.reductions):
                factor *= self.factor
        self.current_factor = float(factor)


def plateau_of(schedule: object, total_steps: int | None = None) -> tuple[Plateau, int] | None:
    """The :class:`Plateau` that ``schedule`` ends in, and the first step it governs; ``None`` if none.

    ``schedule`` is a ``Plateau`` (from step 0) or a chain of :class:`Warmup` ending in one (from the
    end of the warmups: ``Warmup(steps=10, then=Plateau())`` gives step 10).

    Example:
        >>> plateau, start = plateau_of(Warmup(steps=0.1, then=Plateau(patience=3)), 200)
        >>> plateau.patience, start
        (3, 20)
        >>> plateau_of(Cosine(), 200) is None
        True
    """
    start, rest = 0, total_steps
    while isinstance(schedule, Warmup):
        w = schedule.warmup_steps(rest)
        start += w
        rest = None if rest is None else rest - w
        schedule = schedule.then
    return (schedule, start) if isinstance(schedule, Plateau) else None


# --------------------------------------------------------------------------------------------------
# phases: absolute LRs other tricks put over the tail of a schedule
# --------------------------------------------------------------------------------------------------
def _check_count(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0 or None, got {value!r}")
    return int(value)


def swa_lr(k: int, lr0: float, target: float, anneal_len: int, anneal: str = "cos") -> float:
    """Learning rate of the ``k``-th SWA step or epoch (``k = 1, 2, ...``), annealed ``lr0 -> target``.

    ``alpha = a(min(1, k / anneal_len))`` with ``a(t) = (1 - cos(pi t)) / 2`` (``"cos"``) or ``a(t) = t``
    (``"linear"``), and ``lr = target * alpha + lr0 * (1 - alpha)``; ``anneal_len = 0`` jumps to
    ``target`` at once. The same values as ``torch.optim.swa_utils.SWALR`` after ``k`` calls of
    ``step()`` (Izmailov et al. 2018, arXiv:1803.05407).

    Example:
        >>> [round(swa_lr(k, 0.1, 0.01, 2, "linear"), 3) for k in (1, 2, 3)]
        [0.055, 0.01, 0.01]
    """
    if anneal not in ("cos", "linear"):
        raise ValueError(f"anneal must be 'cos' or 'linear', got {anneal!r}")
    if anneal_len < 0:
        raise ValueError(f"anneal_len must be >= 0, got {anneal_len!r}")
    t = 1.0 if anneal_len == 0 else max(0.0, min(1.0, k / anneal_len))
    alpha = (1.0 - math.cos(math.pi * t)) / 2.0 if anneal == "cos" else t
    return target * alpha + lr0 * (1.0 - alpha)


@dataclasses.dataclass
class SWALRPhase:
    """SWA's learning-rate phase (``torch.optim.swa_utils.SWALR`` with a scalar ``swa_lr``).

    From optimizer step ``start_step`` on, each parameter group's LR goes from ``lr0`` (its LR at
    ``start_step`` under the schedule, ``lr_at_start``) to the absolute ``swa_lr`` (the same for all
    groups): at the ``k``-th SWA step or epoch (``k = 1, 2, ...``)

        ``alpha = a(min(1, k / K))``, ``a(t) = (1 - cos(pi t)) / 2`` (``"cos"``) or ``t`` (``"linear"``),
        ``lr = swa_lr * alpha + lr0 * (1 - alpha)``

    with ``k = step - start_step + 1`` and ``K = anneal_steps`` (the LR changes every optimizer step),
    or ``k = (step - start_step) // steps_per_epoch + 1`` and ``K = anneal_epochs`` (changed at epoch
    starts, as ``SWALR`` stepped once per epoch); with neither the LR is ``swa_lr`` from the start
    step on (``K = 0``). The values are those of :func:`lightning_tricks.averaging.swa_lr`.
    Izmailov et al. 2018, arXiv:1803.05407.

    Args:
        swa_lr: the SWA learning rate, > 0.
        start_step: the first optimizer step of the phase (0-based, ``trainer.global_step``).
        anneal: ``"cos"`` or ``"linear"``.
        anneal_steps: anneal over this many optimizer steps (exclusive with ``anneal_epochs``).
        anneal_epochs: anneal over this many epochs; needs ``steps_per_epoch``.
        steps_per_epoch: optimizer steps per epoch (``ceil(batches / accumulate_grad_batches)``).

    Example:
        >>> phase = SWALRPhase(swa_lr=0.01, start_step=10, anneal="linear", anneal_steps=2)
        >>> [round(phase.lr(t, 0.1), 3) for t in (10, 11, 12)]
        [0.055, 0.01, 0.01]
    """

    swa_lr: float
    start_step: int
    anneal: str = "cos"
    anneal_steps: int | None = None
    anneal_epochs: int | None = None
    steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        self.swa_lr = _check_factor(self.swa_lr, "swa_lr", low_open=True)
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {self.start_step!r}")
        if self.anneal not in ANNEAL:
            raise ValueError(f"anneal must be one of {ANNEAL}, got {self.anneal!r}")
        self.anneal_steps = _check_count(self.anneal_steps, "anneal_steps")
        self.anneal_epochs = _check_count(self.anneal_epochs, "anneal_epochs")
        if self.anneal_steps is not None and self.anneal_epochs is not None:
            raise ValueError(
                f"give anneal_steps or anneal_epochs, not both (got {self.anneal_steps!r} and {self.anneal_epochs!r})"
            )
        if self.steps_per_epoch is not None and (
            isinstance(self.steps_per_epoch, bool)
            or not isinstance(self.steps_per_epoch, int)
            or self.steps_per_epoch < 1
        ):
            raise ValueError(f"steps_per_epoch must be an int >= 1 or None, got {self.steps_per_epoch!r}")
        if self.anneal_epochs and self.steps_per_epoch is None:
            raise ValueError(
                f"anneal_epochs={self.anneal_epochs!r} needs steps_per_epoch (optimizer steps "
                "per epoch) to know where epochs start"
            )

    def active(self, step: int) -> bool:
        """Whether optimizer step ``step`` is in the phase."""
        return step >= self.start_step

    def count(self, step: int) -> tuple[int, int]:
        """``(k, K)``: the SWALR step count at ``step`` (``>= start_step``) and the anneal length."""
        done = step - self.start_step
        if self.anneal_steps is not None:
            return done + 1, self.anneal_steps
        if self.anneal_epochs:
            assert self.steps_per_epoch is not None
            return done // self.steps_per_epoch + 1, self.anneal_epochs
        return 1, 0

    def lr(self, step: int, lr_at_start: float) -> float:
        """The LR of a group whose schedule gives ``lr_at_start`` at ``start_step``, at ``step >= start_step``."""
        if step < self.start_step:
            raise ValueError(f"step {step} is before the phase's start_step {self.start_step}")
        k, length = self.count(step)
        return swa_lr(k, lr_at_start, self.swa_lr, length, self.anneal)


# --------------------------------------------------------------------------------------------------
# base-LR rules: the linear (or square-root) scaling rule of the global batch size
# --------------------------------------------------------------------------------------------------
SCALING_RULES = ("linear", "sqrt")


def global_batch_size(per_device: int, accumulate_grad_batches: int = 1, world_size: int = 1) -> int:
    """Samples per optimizer step: ``per_device * accumulate_grad_batches * world_size``."""
    for name, v in (
        ("per_device", per_device),
        ("accumulate_grad_batches", accumulate_grad_batches),
        ("world_size", world_size),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return per_device * accumulate_grad_batches * world_size


def scaling_factor(global_batch: int, reference_batch_size: int, rule: str = "linear") -> float:
    """``global / reference`` (``rule="linear"``, Goyal et al. 2017) or its square root (``"sqrt"``).

    Example:
        >>> scaling_factor(1024, 256), scaling_factor(1024, 256, "sqrt")
        (4.0, 2.0)
    """
    if rule not in SCALING_RULES:
        raise ValueError(f"rule must be one of {SCALING_RULES}, got {rule!r}")
    ratio = global_batch / reference_batch_size
    return ratio if rule == "linear" else math.sqrt(ratio)


def _positive_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def batch_size_attribute(datamodule: Any, module: Any) -> tuple[int, str] | None:
    """``(batch size, where)`` from ``datamodule.batch_size``, ``module.batch_size`` or
    ``module.hparams.batch_size`` (the first positive int), else ``None``."""
    name = type(module).__name__
    candidates = [
        (getattr(datamodule, "batch_size", None), f"{type(datamodule).__name__}.batch_size"),
        (getattr(module, "batch_size", None), f"{name}.batch_size"),
        ((getattr(module, "hparams", None) or {}).get("batch_size"), f"{name}.hparams.batch_size"),
    ]
    for value, where in candidates:
        if _positive_int(value):
            return value, where
    return None


def loader_batch_size(loader: Any) -> tuple[int, str] | None:
    """``(batch size, where)`` of a loader (or a one-loader list): its ``batch_size`` or its batch sampler's."""
    if isinstance(loader, (list, tuple)) and len(loader) == 1:
        loader = loader[0]
    value = getattr(loader, "batch_size", None)
    if value is None:
        value = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return (value, f"the train dataloader ({type(loader).__name__}.batch_size)") if _positive_int(value) else None


def scaling_message(
    rule: str, batch: tuple[int, str, int, int], reference: int, changes: Sequence[str], resuming_from: Any = None
) -> str:
    """The line that says how the LR was scaled; ``batch``: ``(per device, where from, accumulated, devices)``."""
    per_device, where, accumulate, world = batch
    global_batch = global_batch_size(per_device, accumulate, world)
    factor = scaling_factor(global_batch, reference, rule)
    note = ""
    if resuming_from:
        note = f" (resuming from {resuming_from}: its optimizer state, already scaled, replaces these)"
    return (
        f"LinearScaling ({rule}): global batch {global_batch} = {per_device} per device "
        f"(from {where}) x {accumulate} accumulated x {world} device(s); reference {reference}; "
        f"LR x {factor:.4g}: {', '.join(changes)}" + note
    )


FINDER_STAGES = ("fit", "validate", "test", "predict")


def check_finder_args(
    mode: Any,
    modes: Sequence[str],
    steps_per_trial: Any,
    init_val: Any,
    max_trials: Any,
    max_val: Any,
    batch_arg_name: Any,
    stages: Any,
) -> tuple[str, ...]:
    """Check a batch-size finder's arguments; return ``stages`` as a tuple without repeats."""
    if not isinstance(mode, str) or mode.lower() not in modes:
        raise ValueError(f"`mode` should be either of {modes}, got {mode!r}")
    for name, value in (
        ("steps_per_trial", steps_per_trial),
        ("init_val", init_val),
        ("max_trials", max_trials),
        ("max_val", max_val),
    ):
        check_int(name, value, 1)
    if not isinstance(batch_arg_name, str) or not batch_arg_name:
        raise ValueError(f"batch_arg_name must be a non-empty attribute name, got {batch_arg_name!r}")
    chosen = [stages] if isinstance(stages, str) else list(stages)
    if not chosen or any(s not in FINDER_STAGES for s in chosen):
        raise ValueError(f"stages must be a non-empty list of {FINDER_STAGES}, got {stages!r}")
    return tuple(dict.fromkeys(chosen))


def fewest_samples(loaders: Any) -> int | None:
    """The smallest sample count over ``loaders`` (one, a list or a dict), or ``None`` when none has one.

    Read from each loader's ``dataset`` (when it has a length) or its ``num_samples`` (this rank's share).
    """
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    counts = []
    for loader in loaders:
        dataset = getattr(loader, "dataset", None)
        try:
            count = len(dataset) if dataset is not None else getattr(loader, "num_samples", None)
        except TypeError:  # an iterable-style dataset
            count = getattr(loader, "num_samples", None)
        if isinstance(count, int) and not isinstance(count, bool) and count > 0:
            counts.append(count)
    return min(counts) if counts else None


def bounded_search(init_val: int, max_trials: int, max_val: int, cap: int | None, mode: str) -> tuple[int, int, int]:
    """``(init_val, max_trials, max_val)`` of a batch-size search that tries no size above ``cap``.

    ``"power"`` doubling ignores ``max_val``, so the number of doublings is bounded instead: the largest
    ``k`` with ``init * 2**k <= cap``; ``"binsearch"`` caps every size at ``max_val``.

    Example:
        >>> bounded_search(2, 25, 8192, 100, "power"), bounded_search(2, 25, 8192, 100, "binsearch")
        ((2, 6, 8192), (2, 25, 100))
    """
    if cap is None:
        return init_val, max_trials, max_val
    init_val = min(init_val, cap)
    if mode == "power":
        return init_val, min(max_trials, max(0, (cap // init_val).bit_length() - 1) + 1), max_val
    return init_val, max_trials, min(max_val, cap)
