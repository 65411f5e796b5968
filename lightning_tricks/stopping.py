"""Early stopping as pure functions of the monitored curve: Lightning's criteria and Prechelt's, one rule.

:class:`StopRule` decides every check: a non-finite value, Lightning's ``stopping_threshold`` and
``divergence_threshold``, then the criterion: Lightning's patience (:class:`Patience`), ``n`` rises in a
row (:class:`Increase`) or Prechelt's :class:`GL`, :class:`PQ`, :class:`UP`. Each decision is a
:class:`Decision` with the stop, one readable reason, every criterion's value and Lightning's patience
counters after the check, so :class:`lightning_tricks.callbacks.EarlyStopping` keeps Lightning's state
by copying them. The formulas and their edge cases are in ``docs/method_cards.md`` (early stopping).

Reference:
    Prechelt, L. (1998). Early Stopping — But When? In *Neural Networks: Tricks of the Trade*,
    LNCS 1524, pp. 55-69. Springer.

Example:
    >>> rule = StopRule(GL(alpha=5.0))
    >>> val = [1.0, 0.5, 0.4, 0.41, 0.43]          # GL = 100 * (0.43 / 0.4 - 1) = 7.5 at the last check
    >>> d = rule.decide(val, name="val/loss")
    >>> d.stop, d.reason
    (True, 'GL=7.5 > alpha=5 (best 0.4 at 2)')
    >>> sorted(d.values)    # every criterion's value at this check, for logging
    ['gl', 'up_count', 'wait_count']
    >>> first_stop(val, rule=StopRule(GL(alpha=2.0))).index    # GL=2.5 at check 4 (index 3)
    3
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lightning_tricks.checks import check_bool, check_choice, check_float, check_int

__all__ = [
    "CRITERIA",
    "MODES",
    "Patience",
    "Increase",
    "GL",
    "PQ",
    "UP",
    "Criterion",
    "as_criterion",
    "Decision",
    "StopRule",
    "decide",
    "first_stop",
    "FirstStop",
    "to_error",
    "to_score",
    "best_index",
    "generalization_loss",
    "training_progress",
    "progress_quotient",
    "up_count",
    "increase_count",
    "patience_step",
]

MODES = ("min", "max")
_DEFAULT_OPTIMUM = {"min": 0.0, "max": 1.0}


# ------------------------------------------------------------------------------------------------
# the metric as a score (lower is better) and as an error (>= 0, 0 at the ideal value)
# ------------------------------------------------------------------------------------------------
def to_score(value: float, mode: str) -> float:
    """The metric with lower = better: ``value`` for ``mode="min"``, ``-value`` for ``"max"`` (exact)."""
    return value if mode == "min" else -value


def to_error(value: float, mode: str, optimum: float | None = None) -> float:
    """The error ``E`` of a metric value: ``value - optimum`` (min) or ``optimum - value`` (max).

    ``optimum`` defaults to 0 for ``mode="min"`` and 1 for ``mode="max"`` (an accuracy becomes ``1 - acc``).

    Example:
        >>> to_error(0.25, "min"), to_error(0.75, "max"), to_error(30.0, "max", optimum=50.0)
        (0.25, 0.25, 20.0)
    """
    opt = _DEFAULT_OPTIMUM[mode] if optimum is None else optimum
    return value - opt if mode == "min" else opt - value


def best_index(scores: Sequence[float]) -> int:
    """Index of the first minimum of ``scores`` (a strict improvement is needed to move it); -1 if empty.

    Non-finite scores (``nan``) never become the best.
    """
    best, where = math.inf, -1
    for i, x in enumerate(scores):
        if x < best or (where < 0 and x == best):
            best, where = x, i
    return where


# ------------------------------------------------------------------------------------------------
# Prechelt's quantities
# ------------------------------------------------------------------------------------------------
def _check_error(e: float, what: str) -> None:
    if e < 0:
        raise ValueError(
            f"{what} must be >= 0 for GL/PQ (a ratio of errors), got {e!r}; set `optimum` (or "
            "`train_optimum`) to the best value the metric can take, so that E = metric - optimum "
            "(mode='min') or optimum - metric (mode='max') is a non-negative error"
        )


def generalization_loss(errors: Sequence[float]) -> float:
    """``GL(t) = 100 * (E_va(t) / E_opt(t) - 1)`` at the last check of ``errors`` (``E_va(1..t)``).

    ``E_opt(t) = min E_va(1..t)``. ``E_opt = 0``: ``GL = 0`` if ``E_va(t) = 0`` else ``inf``.

    Example:
        >>> generalization_loss([0.5, 0.25, 0.3125])    # 100 * (0.3125 / 0.25 - 1)
        25.0
    """
    if not errors:
        raise ValueError("generalization_loss needs at least one value, got an empty history")
    finite = [e for e in errors if not math.isnan(e)]
    for e in finite:
        _check_error(e, "the validation error E_va")
    current = errors[-1]
    if math.isnan(current) or not finite:
        return math.nan
    e_opt = min(finite)
    if e_opt == 0.0:
        return 0.0 if current == 0.0 else math.inf
    return 100.0 * (current / e_opt - 1.0)


def training_progress(train_errors: Sequence[float], strip: int) -> float:
    """``P_k(t) = 1000 * (sum E_tr(t-k+1..t) / (k * min E_tr(t-k+1..t)) - 1)``, ``k = strip``.

    ``nan`` while fewer than ``k`` values exist. ``min = 0``: ``0`` if the whole strip is 0, else ``inf``.
    Never negative (rounding is clamped at 0).

    Example:
        >>> training_progress([0.4, 0.3, 0.2], strip=2)    # 1000 * ((0.3 + 0.2) / (2 * 0.2) - 1)
        250.0
    """
    check_int("strip", strip, 1)
    if len(train_errors) < strip:
        return math.nan
    window = list(train_errors[-strip:])
    if any(math.isnan(e) for e in window):
        return math.nan
    for e in window:
        _check_error(e, "the training error E_tr")
    total, low = sum(window), min(window)
    if total == strip * low:
        return 0.0
    if low == 0.0:
        return math.inf
    return max(0.0, 1000.0 * (total / (strip * low) - 1.0))


def progress_quotient(gl: float, pk: float) -> float:
    """``PQ = GL / P_k`` with ``P_k = 0 -> inf`` (if ``GL > 0``, else 0) and ``P_k = inf -> 0``.

    Example:
        >>> progress_quotient(10.0, 4.0), progress_quotient(3.0, 0.0), progress_quotient(0.0, 0.0)
        (2.5, inf, 0.0)
    """
    if math.isnan(gl) or math.isnan(pk):
        return math.nan
    if pk == 0.0:
        return math.inf if gl > 0.0 else 0.0
    if math.isinf(pk):
        return 0.0
    return gl / pk


def up_count(scores: Sequence[float], strip: int, min_delta: float = 0.0) -> int:
    """Number of successive strips, ending at the last strip end ``L <= t``, at whose end the metric rose.

    ``L = k * floor(t / k)``; counts ``j = 0, 1, ...`` while ``score(L - j k) > score(L - (j+1) k) +
    min_delta`` (``scores`` lower = better, 1-based check numbers).

    Example:
        >>> up_count([5, 4, 3, 4, 5, 6], strip=1)         # rose at checks 4, 5, 6
        3
        >>> up_count([5, 4, 3, 4, 2, 6, 7], strip=2)      # strip ends 2, 4, 6: 4 > 4? no; 6 > 4 yes
        1
    """
    check_int("strip", strip, 1)
    end = (len(scores) // strip) * strip  # 1-based number of the last strip end
    count = 0
    while end - strip >= 1 and scores[end - 1] > scores[end - strip - 1] + min_delta:
        count += 1
        end -= strip
    return count


def increase_count(scores: Sequence[float], min_delta: float = 0.0) -> int:
    """Consecutive checks, up to the last, with ``score(t) > score(t-1) + min_delta`` (lower = better).

    Example:
        >>> increase_count([3, 2, 2.5, 2.1, 2.2])    # 2.1 -> 2.2
        1
    """
    count = 0
    for prev, x in zip(scores[:-1], scores[1:]):
        count = count + 1 if x > prev + min_delta else 0
    return count


def patience_step(best: float, wait: int, score: float, min_delta: float) -> tuple[float, int]:
    """Lightning's patience counter after one more check (``best`` and ``score`` lower = better).

    An improvement is ``score + min_delta < best``: it becomes the best and the wait restarts at 0;
    anything else (``nan`` included) adds one to the wait.

    Example:
        >>> patience_step(0.5, 1, 0.4, 0.0), patience_step(0.5, 1, 0.49, 0.02)
        ((0.4, 0), (0.5, 2))
    """
    if score + min_delta < best:
        return score, 0
    return best, wait + 1


# ------------------------------------------------------------------------------------------------
# the criteria: each holds its own parameters; Lightning's thresholds and patience live in StopRule
# ------------------------------------------------------------------------------------------------
def _check_alpha(alpha: Any) -> None:
    check_float("alpha", alpha, 0.0, low_open=True, high_open=True)


def _check_optimum(name: str, value: Any) -> None:
    check_float(name, value, allow_none=True, low_open=True, high_open=True)


@dataclass(frozen=True)
class Patience:
    """Lightning's rule: stop after ``patience`` checks without an improvement by more than ``min_delta``."""

    name = "patience"

    def describe(self, patience: int) -> str:
        return f"patience {patience}"


@dataclass(frozen=True)
class Increase:
    """Stop after ``patience`` checks in a row, each worse than the one before by more than ``min_delta``."""

    name = "increase"

    def describe(self, patience: int) -> str:
        return f"increase {patience}"


@dataclass(frozen=True)
class GL:
    """``GL_alpha``: stop when ``GL(t) = 100 * (E_va(t) / E_opt(t) - 1) > alpha``.

    Args:
        alpha: the threshold, > 0 (Prechelt used 1..5).
        optimum: the ideal value of the monitored metric, ``E = metric - optimum`` (min) or
            ``optimum - metric`` (max); ``None``: 0 for min, 1 for max (``E = 1 - acc``).
    """

    alpha: float = 5.0
    optimum: float | None = None
    name = "gl"

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)
        _check_optimum("optimum", self.optimum)

    def describe(self, patience: int) -> str:
        return f"GL_{self.alpha:g}"


@dataclass(frozen=True)
class PQ:
    """``PQ_alpha``: at strip ends, stop when ``GL(t) / P_k(t) > alpha`` (``P_k`` from the training metric).

    Args:
        alpha: the threshold, > 0 (Prechelt used 0.5..3; 0.02..0.2 for cross-entropy nets).
        strip: the strip length ``k`` in checks, an int >= 1.
        optimum: as in :class:`GL`.
        train_monitor: the logged training metric (one value per epoch) that gives ``E_tr``.
        train_mode: ``"min"`` or ``"max"`` for ``train_monitor``.
        train_optimum: its ideal value (``None``: 0 for min, 1 for max).
    """

    alpha: float = 0.5
    strip: int = 5
    optimum: float | None = None
    train_monitor: str = "train/loss_epoch"
    train_mode: str = "min"
    train_optimum: float | None = None
    name = "pq"

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)
        check_int("strip", self.strip, 1)
        _check_optimum("optimum", self.optimum)
        _check_optimum("train_optimum", self.train_optimum)
        check_choice("train_mode", self.train_mode, MODES)
        if not isinstance(self.train_monitor, str) or not self.train_monitor:
            raise ValueError(f"train_monitor must be a non-empty metric name, got {self.train_monitor!r}")

    def describe(self, patience: int) -> str:
        return f"PQ_{self.alpha:g} (strip {self.strip})"


@dataclass(frozen=True)
class UP:
    """``UP_s``: at strip ends, stop when the metric rose at the end of ``strips`` successive strips.

    Args:
        strips: ``s``, the number of successive rising strips, an int >= 1.
        strip: the strip length ``k`` in checks, an int >= 1.
    """

    strips: int = 3
    strip: int = 5
    name = "up"

    def __post_init__(self) -> None:
        check_int("strips", self.strips, 1)
        check_int("strip", self.strip, 1)

    def describe(self, patience: int) -> str:
        return f"UP_{self.strips} (strip {self.strip})"


Criterion = Patience | Increase | GL | PQ | UP
CRITERIA: dict[str, type] = {"patience": Patience, "increase": Increase, "gl": GL, "pq": PQ, "up": UP}


def as_criterion(spec: Criterion | str) -> Criterion:
    """A criterion object from itself or its name (``"gl"`` is ``GL()`` with Prechelt's defaults).

    Example:
        >>> as_criterion("up"), as_criterion(GL(alpha=2.0)).alpha
        (UP(strips=3, strip=5), 2.0)
    """
    if isinstance(spec, tuple(CRITERIA.values())):
        return spec  # type: ignore[return-value]
    check_choice("criterion", spec, tuple(CRITERIA))
    return CRITERIA[str(spec)]()  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------------
# the rule
# ------------------------------------------------------------------------------------------------
class Decision(NamedTuple):
    """What :meth:`StopRule.decide` returns.

    Attributes:
        stop: whether to stop after this check.
        reason: one readable line: why it stops; when it does not, Lightning's improvement message on a
            new best, else "".
        values: every criterion's value at this check, for logging: ``gl``, ``pk``, ``pq`` (where
            they can be computed), ``up_count`` and ``wait_count`` (the counter of the criterion).
        best: index of the best check so far (the first minimum, ``min_delta`` ignored; -1 if none).
        kind: ``"non_finite"``, ``"stopping_threshold"``, ``"divergence_threshold"``, the criterion's
            name, or "" when not stopping.
        best_score: Lightning's best value after the check (the metric's units; moved only by an
            improvement of more than ``min_delta``).
        wait_count: Lightning's checks since that improvement.
        improved: whether this check moved ``best_score``.
    """

    stop: bool
    reason: str
    values: dict[str, float]
    best: int
    kind: str = ""
    best_score: float = math.inf
    wait_count: int = 0
    improved: bool = False


def _fmt(x: float) -> str:
    return f"{x:.3g}"


@dataclass(frozen=True)
class StopRule:
    """Lightning's stopping criteria plus one criterion, validated at construction.

    Args:
        criterion: a :data:`Criterion` or its name (``"patience"``, ``"increase"``, ``"gl"``, ``"pq"``, ``"up"``).
        mode: ``"min"`` or ``"max"``: the direction in which the monitored metric improves.
        patience: ``n`` of :class:`Patience` and :class:`Increase`, an int >= 0 (0 acts as 1, as in Lightning).
        min_delta: a change of at most ``min_delta`` is no improvement (patience) and no rise
            (:class:`Increase`, :class:`UP`); negative only with Lightning's patience (as Lightning allows).
        min_checks: nothing but a non-finite value stops before check number ``min_checks`` (1-based).
        check_finite: stop at once on a ``nan``/``inf`` value (Lightning's).
        stopping_threshold: stop once the metric is better than this (Lightning's).
        divergence_threshold: stop once the metric is worse than this (Lightning's).

    Example:
        >>> StopRule(UP(strips=2, strip=2)).decide([5, 4, 3, 5, 6, 7]).stop   # rose at the ends of checks 4, 6
        True
    """

    criterion: Criterion = field(default_factory=Patience)
    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.0
    min_checks: int = 0
    check_finite: bool = True
    stopping_threshold: float | None = None
    divergence_threshold: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "criterion", as_criterion(self.criterion))
        check_choice("mode", self.mode, MODES)
        check_int("patience", self.patience, 0)
        check_int("min_checks", self.min_checks, 0)
        check_bool("check_finite", self.check_finite)
        low = -math.inf if isinstance(self.criterion, Patience) else 0.0
        check_float("min_delta", self.min_delta, low, low_open=math.isinf(low), high_open=True)
        for name in ("stopping_threshold", "divergence_threshold"):
            check_float(name, getattr(self, name), allow_none=True)

    def describe(self) -> str:
        """Short name of the criterion, e.g. ``"GL_5"``, ``"PQ_2 (strip 5)"``, ``"UP_3 (strip 5)"``."""
        return self.criterion.describe(self.patience)

    @property
    def strip(self) -> int:
        """The strip length of the criterion (5 for those without one: ``up_count`` and ``pk`` are logged anyway)."""
        return getattr(self.criterion, "strip", 5)

    def values(self, history: Sequence[float], train: Sequence[float] | None = None) -> dict[str, float]:
        """Prechelt's quantities after the last check of ``history`` (``wait_count`` is added by :meth:`decide`)."""
        c = self.criterion
        optimum = getattr(c, "optimum", None)
        out: dict[str, float] = {}
        try:
            gl = generalization_loss([to_error(v, self.mode, optimum) for v in history])
        except ValueError:
            if isinstance(c, (GL, PQ)):
                raise
            gl = math.nan
        if not math.isnan(gl):
            out["gl"] = gl
        if train is not None:
            train_mode, train_optimum = getattr(c, "train_mode", "min"), getattr(c, "train_optimum", None)
            try:
                pk = training_progress([to_error(v, train_mode, train_optimum) for v in train], self.strip)
            except ValueError:
                if isinstance(c, PQ):
                    raise
                pk = math.nan
            if not math.isnan(pk):
                out["pk"] = pk
                pq = progress_quotient(gl, pk)
                if not math.isnan(pq):
                    out["pq"] = pq
        scores = [to_score(v, self.mode) for v in history]
        out["up_count"] = float(up_count(scores, self.strip, max(self.min_delta, 0.0)))
        return out

    def counters(self, history: Sequence[float]) -> tuple[float, int]:
        """Lightning's ``(best_score, wait_count)`` after the checks of ``history``, replayed from the start."""
        best, wait = math.inf, 0
        for value in history:
            if self._guard(value) is None:
                best, wait = patience_step(best, wait, to_score(value, self.mode), self.min_delta)
        return to_score(best, self.mode), wait

    def _guard(self, value: float) -> str | None:
        """Which of Lightning's guards a value trips (they come before, and skip, the patience counter)."""
        if self.check_finite and not math.isfinite(value):
            return "non_finite"
        score = to_score(value, self.mode)
        if self.stopping_threshold is not None and score < to_score(self.stopping_threshold, self.mode):
            return "stopping_threshold"
        if self.divergence_threshold is not None and score > to_score(self.divergence_threshold, self.mode):
            return "divergence_threshold"
        return None

    def decide(
        self,
        history: Sequence[float],
        train: Sequence[float] | None = None,
        epochs: Sequence[int] | None = None,
        name: str = "metric",
        counters: tuple[float, int] | None = None,
    ) -> Decision:
        """Whether to stop after the last check of ``history``, why, and every criterion's value.

        Args:
            history: the monitored metric at checks ``1..t`` (as logged, not converted).
            train: the training metric at the same checks (needed by :class:`PQ`).
            epochs: a label for each check used in the reason (default: ``0..t-1``, Lightning's epochs).
            name: the metric's name used in the reason.
            counters: Lightning's ``(best_score, wait_count)`` before this check (a resumed run's); ``None``
                replays them over ``history[:-1]``.
        """
        t = len(history)
        if t == 0:
            raise ValueError("decide needs at least one value in history, got an empty history")
        if train is not None and len(train) != t:
            raise ValueError(f"train must have one value per check ({t}), got {len(train)}")
        c = self.criterion
        if isinstance(c, PQ) and train is None:
            raise ValueError("criterion 'pq' needs the training metric at every check (train=...)")
        if epochs is not None and len(epochs) != t:
            raise ValueError(f"epochs must have one label per check ({t}), got {len(epochs)}")
        labels = list(range(t)) if epochs is None else list(epochs)
        current = float(history[-1])
        scores = [to_score(float(v), self.mode) for v in history]
        best = best_index(scores)
        previous, wait = self.counters(history[:-1]) if counters is None else counters
        best_score = previous
        order = "<" if self.mode == "min" else ">"

        guard = self._guard(current)
        if guard == "non_finite":
            reason = (
                f"Monitored metric {name} = {current} is not finite. Previous best value was {best_score:.3f}."
                " Signaling Trainer to stop."
            )
            return Decision(True, reason, {}, best, guard, best_score, wait)
        vals = self.values(history, train)
        improved = False
        if guard is None:
            new_best, wait = patience_step(to_score(best_score, self.mode), wait, scores[-1], self.min_delta)
            improved = new_best != to_score(best_score, self.mode)
            best_score = to_score(new_best, self.mode)
        vals["wait_count"] = float(increase_count(scores, self.min_delta) if isinstance(c, Increase) else wait)

        def outcome(stop: bool, kind: str, reason: str) -> Decision:
            if stop and t < self.min_checks:
                stop, kind, reason = False, "", ""
            if not stop and improved:
                reason = _improvement(name, previous, current, self.min_delta)
            return Decision(stop, reason, vals, best, kind, best_score, wait, improved)

        if guard == "stopping_threshold":
            text = f"Stopping threshold reached: {name} = {current:g} {order} {self.stopping_threshold}."
            return outcome(True, guard, text + " Signaling Trainer to stop.")
        if guard == "divergence_threshold":
            text = f"Divergence threshold reached: {name} = {current:g} {order} {self.divergence_threshold}."
            return outcome(True, guard, text + " Signaling Trainer to stop.")

        best_txt = f"(best {_fmt(history[best])} at {labels[best]})" if best >= 0 else "(no finite value yet)"
        if isinstance(c, Patience):
            if wait >= self.patience and not improved:
                return outcome(
                    True,
                    c.name,
                    f"Monitored metric {name} did not improve in the last {wait} records. "
                    f"Best score: {best_score:.3f}. Signaling Trainer to stop.",
                )
        elif isinstance(c, Increase):
            n = int(vals["wait_count"])
            if n >= max(self.patience, 1):
                delta = f" by more than min_delta={self.min_delta:g}" if self.min_delta else ""
                return outcome(True, c.name, f"{name} increased{delta} in {n} checks in a row {best_txt}")
        elif isinstance(c, GL):
            gl = vals.get("gl", math.nan)
            if gl > c.alpha:
                return outcome(True, c.name, f"GL={_fmt(gl)} > alpha={c.alpha:g} {best_txt}")
        elif t % c.strip == 0:  # PQ and UP are checked at strip ends only
            if isinstance(c, PQ) and vals.get("pq", -math.inf) > c.alpha:
                text = f"PQ=GL/P_{c.strip}={_fmt(vals['gl'])}/{_fmt(vals['pk'])}={_fmt(vals['pq'])} > alpha={c.alpha:g}"
                return outcome(True, c.name, f"{text} {best_txt}")
            if isinstance(c, UP) and vals["up_count"] >= c.strips:
                text = f"UP_{c.strips}: {name} rose at the end of {c.strips} successive strips of {c.strip}"
                return outcome(True, c.name, f"{text} {best_txt}")
        return outcome(False, "", "")


def _improvement(name: str, previous: float, current: float, min_delta: float) -> str:
    """Lightning's message for a new best value."""
    if math.isfinite(previous):
        return (
            f"Metric {name} improved by {abs(previous - current):.3f} >= min_delta = {abs(min_delta)}."
            f" New best score: {current:.3f}"
        )
    return f"Metric {name} improved. New best score: {current:.3f}"


def decide(
    history: Sequence[float],
    train: Sequence[float] | None = None,
    criterion: Criterion | str | StopRule = "patience",
    *,
    epochs: Sequence[int] | None = None,
    name: str = "metric",
    **rule_args: Any,
) -> Decision:
    """Functional form of :meth:`StopRule.decide`: ``decide(val, train, GL(alpha=5))``.

    Example:
        >>> decide([0.3, 0.2, 0.21, 0.22], criterion="patience", patience=2).stop
        True
    """
    rule = criterion if isinstance(criterion, StopRule) else StopRule(as_criterion(criterion), **rule_args)
    return rule.decide(history, train, epochs=epochs, name=name)


class FirstStop(NamedTuple):
    """The first check at which a rule stops (``index`` 0-based, ``None`` if it never does)."""

    index: int | None  # type: ignore[assignment]  # shadows tuple.index, on purpose: the stop's index
    decision: Decision | None


def first_stop(
    history: Sequence[float],
    train: Sequence[float] | None = None,
    rule: StopRule | None = None,
    name: str = "metric",
) -> FirstStop:
    """Replay a whole curve check by check and return where ``rule`` would have stopped.

    Example:
        >>> index, decision = first_stop([1.0, 0.8, 0.9, 0.95, 0.97], rule=StopRule(patience=3), name="val/loss")
        >>> index, decision.kind, decision.reason[:55]
        (4, 'patience', 'Monitored metric val/loss did not improve in the last 3')
    """
    rule = StopRule() if rule is None else rule
    for t in range(1, len(history) + 1):
        d = rule.decide(history[:t], None if train is None else train[:t], name=name)
        if d.stop:
            return FirstStop(t - 1, d)
    return FirstStop(None, None)


# ------------------------------------------------------------------------------------------------
# what the callback stores and says: checkpoint values and messages, built without a Trainer
# ------------------------------------------------------------------------------------------------
def nan_as_none(values: Sequence[float]) -> list[float | None]:
    """Floats for a checkpoint, ``nan`` as ``None`` (``nan != nan`` would break state comparisons).

    Example:
        >>> nan_as_none([1.0, math.nan]), none_as_nan([1, None])
        ([1.0, None], [1.0, nan])
    """
    return [None if math.isnan(v) else v for v in values]


def none_as_nan(values: Any) -> list[float]:
    """The inverse of :func:`nan_as_none`."""
    return [math.nan if v is None else float(v) for v in values]


def missing_monitor_message(monitor: str, logged: Sequence[str]) -> str:
    """Lightning's message for a monitor that was not logged, then which names were and how to log it."""
    return (
        f"Early stopping conditioned on metric `{monitor}` which is not available."
        " Pass in or modify your `EarlyStopping` callback to use any of the following:"
        f" `{'`, `'.join(list(logged))}` (EarlyStopping monitor={monitor!r} was not logged; the "
        f"logged metrics are {sorted(logged) or 'none'}. Log it, e.g. self.log({monitor!r}, ...) in "
        "validation_step, or set monitor to one of these)"
    )


def missing_train_message(train_monitor: str, logged: Sequence[str]) -> str:
    """What PQ says when its training metric was not logged at a check."""
    return (
        f"EarlyStopping(criterion=PQ) needs the training metric train_monitor={train_monitor!r} at every check, but "
        f"it was not logged; the logged metrics are {sorted(logged)}. Log it once per epoch "
        "(self.log(..., on_epoch=True)) or set train_monitor to one of these"
    )
