"""Early-stopping criteria as pure functions of the validation (and training) curve.

No Trainer inside: a criterion reads the history of the monitored metric, one value per validation
check, and says whether to stop and why. :class:`lightning_tricks.callbacks.EarlyStopping` records
the history in a Lightning run and calls :meth:`StopRule.decide` at every check; the same rule runs
offline on logged curves (:func:`first_stop`: "at which epoch would GL_5 have stopped this run?").

Notation (Prechelt 1998), with ``t = 1, 2, ...`` counting validation checks (one per epoch by
default) and ``k`` the strip length:

- ``E_va(t)``: validation error at check ``t``; ``E_opt(t) = min_{t' <= t} E_va(t')``.
- ``E_tr(t)``: training error at check ``t`` (a logged training metric, by default the epoch mean of
  the training loss).
- **GL** (generalization loss): ``GL(t) = 100 * (E_va(t) / E_opt(t) - 1)``; ``GL_alpha`` stops at the
  first ``t`` with ``GL(t) > alpha``.
- **P_k** (training progress over the last ``k`` checks):
  ``P_k(t) = 1000 * (sum_{t'=t-k+1..t} E_tr(t') / (k * min_{t'=t-k+1..t} E_tr(t')) - 1)``.
- **PQ** (progress quotient): ``PQ_alpha`` stops at the first *strip end* (``t`` a multiple of ``k``)
  with ``GL(t) / P_k(t) > alpha``.
- **UP**: ``UP_s`` stops at the first strip end ``t`` where ``E_va`` rose at the end of ``s``
  successive strips: ``E_va(t - j k) > E_va(t - (j + 1) k)`` for ``j = 0 .. s-1``.
- **patience** (Lightning's rule): stop after ``n`` consecutive checks without an improvement of the
  best value by more than ``min_delta``; with ``patience_rule="increase"`` (the rule of the seed notes)
  after ``n`` consecutive increases (each check worse than the one before by more than ``min_delta``).

Metrics to maximize and the error ``E``. GL and PQ are ratios, so they need an error that is ``>= 0``
and is ``0`` at the ideal value. The monitored metric ``m`` becomes

    ``E = m - optimum``   (``mode="min"``, ``optimum`` defaults to ``0``: a loss or an error rate),
    ``E = optimum - m``   (``mode="max"``, ``optimum`` defaults to ``1``: an accuracy becomes ``1 - acc``),

so ``GL = 100 * (E / E_opt - 1)`` reads "relative excess of the distance to the ideal value over the
best distance so far", the same formula for both modes. A metric with another ideal value (a PSNR, a
negative log-likelihood that can go below 0) sets ``optimum`` to it; an ``E < 0`` is an error (the
ratio would flip sign) and raises a ``ValueError`` naming the value. Edge cases: ``E_opt = 0`` gives
``GL = 0`` while ``E_va = 0`` and ``GL = inf`` once it is not; ``P_k = 0`` (no training progress)
gives ``PQ = inf`` when ``GL > 0`` and ``0`` when ``GL = 0``; ``P_k = inf`` (``min E_tr = 0``) gives
``PQ = 0``. Comparisons (best value, patience, UP) are made on the metric itself (negated for
``mode="max"``, an exact operation), so they never depend on ``optimum``. The training metric has its
own ``train_mode`` / ``train_optimum`` (default: a loss, ``E_tr = m_tr``).

Calibration. Prechelt's thresholds come from small networks trained on squared error, whose
training error flattens out. A network trained with cross-entropy until it memorizes drives the
training loss down geometrically, so ``P_k`` stays in the hundreds or thousands and ``PQ`` well below
1 (on the digits MLP, PQ at strip ends stayed in 0..0.4 over 60 epochs): use a smaller ``alpha`` for
PQ there (0.05..0.2). On a small, noisy validation set GL jumps by tens of percent from one epoch to
the next; give GL a warm-up (``min_epochs``) or a larger ``alpha``.

Warm-up: no criterion stops before check ``min_epochs`` (the criteria are still computed and can be
logged); a non-finite value stops at once whatever ``min_epochs`` says (with ``check_finite``).

Reference:
    Prechelt, L. (1998). Early Stopping — But When? In *Neural Networks: Tricks of the Trade*,
    LNCS 1524, pp. 55-69. Springer.

Example:
    >>> rule = StopRule("gl", alpha=5.0)
    >>> val = [1.0, 0.5, 0.4, 0.41, 0.43]          # GL = 100 * (0.43 / 0.4 - 1) = 7.5 at the last check
    >>> d = rule.decide(val, name="val/loss")
    >>> d.stop, d.reason
    (True, 'GL=7.5 > alpha=5 (best 0.4 at 2)')
    >>> sorted(d.values)    # every criterion's value at this check, for logging
    ['gl', 'up_count', 'wait_count']
    >>> first_stop(val, rule=StopRule("gl", alpha=2.0)).index    # GL=2.5 at check 4 (index 3)
    3
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "CRITERIA",
    "PATIENCE_RULES",
    "MODES",
    "DEFAULT_ALPHA",
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
    "patience_count",
]

CRITERIA = ("patience", "gl", "pq", "up")
PATIENCE_RULES = ("no_improvement", "increase")
MODES = ("min", "max")
#: ``alpha`` when none is given (Prechelt's experiments used GL_1..GL_5 and PQ_0.5..PQ_3).
DEFAULT_ALPHA = {"gl": 5.0, "pq": 0.5}
_DEFAULT_OPTIMUM = {"min": 0.0, "max": 1.0}


# ------------------------------------------------------------------------------------------------
# the metric as a score (lower is better) and as an error (>= 0, 0 at the ideal value)
# ------------------------------------------------------------------------------------------------
def to_score(value: float, mode: str) -> float:
    """The metric with lower = better: ``value`` for ``mode="min"``, ``-value`` for ``"max"`` (exact)."""
    return value if mode == "min" else -value


def to_error(value: float, mode: str, optimum: float | None = None) -> float:
    """The error ``E`` of a metric value: ``value - optimum`` (min) or ``optimum - value`` (max).

    ``optimum`` defaults to 0 for ``mode="min"`` and 1 for ``mode="max"`` (so an accuracy becomes the
    error rate ``1 - acc``).

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
# Prechelt's criteria
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
    if strip < 1:
        raise ValueError(f"strip must be an int >= 1, got {strip!r}")
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
    min_delta`` (``scores`` lower = better, 1-based check numbers). ``UP_s`` stops at a strip end with
    a count ``>= s``.

    Example:
        >>> up_count([5, 4, 3, 4, 5, 6], strip=1)         # rose at checks 4, 5, 6
        3
        >>> up_count([5, 4, 3, 4, 2, 6, 7], strip=2)      # strip ends 2, 4, 6: 4 > 4? no; 6 > 4 yes
        1
    """
    if strip < 1:
        raise ValueError(f"strip must be an int >= 1, got {strip!r}")
    end = (len(scores) // strip) * strip  # 1-based number of the last strip end
    count = 0
    while end - strip >= 1 and scores[end - 1] > scores[end - strip - 1] + min_delta:
        count += 1
        end -= strip
    return count


def patience_count(scores: Sequence[float], min_delta: float = 0.0, rule: str = "no_improvement") -> int:
    """The patience counter after the last check (``scores`` lower = better).

    - ``"no_improvement"`` (Lightning's ``EarlyStopping``): checks since the last improvement, an
      improvement being ``score + min_delta < best`` (``best`` starts at ``inf``).
    - ``"increase"``: consecutive checks with ``score(t) > score(t-1) + min_delta``.

    Example:
        >>> patience_count([3, 2, 2.5, 2.1, 2.2])                     # best 2 at check 2
        3
        >>> patience_count([3, 2, 2.5, 2.1, 2.2], rule="increase")    # 2.1 -> 2.2
        1
    """
    if rule not in PATIENCE_RULES:
        raise ValueError(f"patience_rule must be one of {PATIENCE_RULES}, got {rule!r}")
    count = 0
    if rule == "no_improvement":
        best = math.inf
        for x in scores:
            if x + min_delta < best:
                best, count = x, 0
            else:
                count += 1
        return count
    for prev, x in zip(scores[:-1], scores[1:]):
        count = count + 1 if x > prev + min_delta else 0
    return count


# ------------------------------------------------------------------------------------------------
# the rule: every argument validated once, one decision per check
# ------------------------------------------------------------------------------------------------
class Decision(NamedTuple):
    """What :meth:`StopRule.decide` returns.

    Attributes:
        stop: whether to stop after this check.
        reason: one readable line when ``stop`` (e.g. ``"GL=5.4 > alpha=5 (best 0.081 at 17)"``), else "".
        values: every criterion's value at this check, for logging: ``gl``, ``pk``, ``pq``,
            ``up_count``, ``wait_count`` (the patience counter of ``patience_rule``); ``gl``/``pk``/``pq``
            are left out where they cannot be computed (fewer than ``strip`` training values, a negative
            error under a criterion that does not need them).
        best: index of the best check so far (-1 if none).
        kind: what stopped: ``"non_finite"``, ``"stopping_threshold"``, ``"divergence_threshold"``, the
            criterion name, or "" when not stopping.
    """

    stop: bool
    reason: str
    values: dict[str, float]
    best: int
    kind: str = ""


def _fmt(x: float) -> str:
    return f"{x:.3g}"


@dataclass(frozen=True)
class StopRule:
    """One early-stopping rule, validated at construction; :meth:`decide` applies it to a history.

    Args:
        criterion: one of ``"patience"``, ``"gl"``, ``"pq"``, ``"up"`` (see the module docstring).
        mode: ``"min"`` or ``"max"``: the direction in which the monitored metric improves.
        patience: ``n`` for ``criterion="patience"``, an int ``>= 1``.
        patience_rule: ``"no_improvement"`` (Lightning's) or ``"increase"`` (``n`` rises in a row).
        min_delta: ``>= 0``; a change of at most ``min_delta`` is no improvement (patience) and no rise
            (``increase``, UP).
        alpha: threshold of GL / PQ, ``> 0``; ``None`` takes :data:`DEFAULT_ALPHA` (5 for GL, 0.5 for PQ).
        strip: strip length ``k`` of PQ and UP, an int ``>= 1``.
        s: number of successive rising strips for UP, an int ``>= 1``.
        optimum: the ideal value of the monitored metric (``E = |metric - optimum|``, see above).
        train_mode: direction of the training metric used by PQ.
        train_optimum: ideal value of the training metric.
        min_epochs: no criterion stops before check number ``min_epochs`` (1-based); an int ``>= 0``.
        check_finite: stop at once on a ``nan``/``inf`` value (Lightning's ``check_finite``).
        stopping_threshold: stop once the metric is better than this (Lightning's).
        divergence_threshold: stop once the metric is worse than this (Lightning's).

    Example:
        >>> rule = StopRule("up", s=2, strip=2)
        >>> rule.decide([5, 4, 3, 5, 6, 7]).stop     # rose at the ends of the strips ending at 4 and 6
        True
    """

    criterion: str = "patience"
    mode: str = "min"
    patience: int = 3
    patience_rule: str = "no_improvement"
    min_delta: float = 0.0
    alpha: float | None = None
    strip: int = 5
    s: int = 3
    optimum: float | None = None
    train_mode: str = "min"
    train_optimum: float | None = None
    min_epochs: int = 0
    check_finite: bool = True
    stopping_threshold: float | None = None
    divergence_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.train_mode not in MODES:
            raise ValueError(f"train_mode must be one of {MODES}, got {self.train_mode!r}")
        if self.patience_rule not in PATIENCE_RULES:
            raise ValueError(f"patience_rule must be one of {PATIENCE_RULES}, got {self.patience_rule!r}")
        _int_at_least("patience", self.patience, 1)
        _int_at_least("strip", self.strip, 1)
        _int_at_least("s", self.s, 1)
        _int_at_least("min_epochs", self.min_epochs, 0)
        if not _is_real(self.min_delta) or not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise ValueError(f"min_delta must be a finite number >= 0, got {self.min_delta!r}")
        if self.alpha is not None and not (_is_real(self.alpha) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(
                f"alpha must be a finite number > 0 (or None for the default of the criterion), got {self.alpha!r}"
            )
        for name in ("optimum", "train_optimum", "stopping_threshold", "divergence_threshold"):
            v = getattr(self, name)
            if v is not None and not (_is_real(v) and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number or None, got {v!r}")
        if not isinstance(self.check_finite, bool):
            raise ValueError(f"check_finite must be a bool, got {self.check_finite!r}")

    @property
    def threshold(self) -> float:
        """``alpha`` of GL / PQ (the default of the criterion when none was given)."""
        return DEFAULT_ALPHA.get(self.criterion, 5.0) if self.alpha is None else float(self.alpha)

    def describe(self) -> str:
        """Short name of the rule, e.g. ``"GL_5"``, ``"PQ_2 (strip 5)"``, ``"UP_3 (strip 5)"``."""
        if self.criterion == "gl":
            return f"GL_{self.threshold:g}"
        if self.criterion == "pq":
            return f"PQ_{self.threshold:g} (strip {self.strip})"
        if self.criterion == "up":
            return f"UP_{self.s} (strip {self.strip})"
        return f"patience {self.patience} ({self.patience_rule})"

    def values(self, history: Sequence[float], train: Sequence[float] | None = None) -> dict[str, float]:
        """Every criterion's value after the last check of ``history`` (see :class:`Decision`)."""
        scores = [to_score(v, self.mode) for v in history]
        out: dict[str, float] = {}
        needs_error = self.criterion in ("gl", "pq")
        try:
            gl = generalization_loss([to_error(v, self.mode, self.optimum) for v in history])
        except ValueError:
            if needs_error:
                raise
            gl = math.nan
        if not math.isnan(gl):
            out["gl"] = gl
        if train is not None:
            try:
                pk = training_progress([to_error(v, self.train_mode, self.train_optimum) for v in train], self.strip)
            except ValueError:
                if self.criterion == "pq":
                    raise
                pk = math.nan
            if not math.isnan(pk):
                out["pk"] = pk
                pq = progress_quotient(gl, pk)
                if not math.isnan(pq):
                    out["pq"] = pq
        out["up_count"] = float(up_count(scores, self.strip, self.min_delta))
        out["wait_count"] = float(patience_count(scores, self.min_delta, self.patience_rule))
        return out

    def decide(
        self,
        history: Sequence[float],
        train: Sequence[float] | None = None,
        epochs: Sequence[int] | None = None,
        name: str = "metric",
    ) -> Decision:
        """Whether to stop after the last check of ``history``, why, and every criterion's value.

        Args:
            history: the monitored metric at checks ``1..t`` (as logged, not converted).
            train: the training metric at the same checks (needed by ``criterion="pq"``).
            epochs: a label for each check used in the reason (default: ``0..t-1``, Lightning's epochs).
            name: the metric's name used in the reason.
        """
        t = len(history)
        if t == 0:
            raise ValueError("decide needs at least one value in history, got an empty history")
        if train is not None and len(train) != t:
            raise ValueError(f"train must have one value per check ({t}), got {len(train)}")
        if self.criterion == "pq" and train is None:
            raise ValueError("criterion 'pq' needs the training metric at every check (train=...)")
        if epochs is not None and len(epochs) != t:
            raise ValueError(f"epochs must have one label per check ({t}), got {len(epochs)}")
        labels = list(range(t)) if epochs is None else list(epochs)
        current = float(history[-1])
        scores = [to_score(float(v), self.mode) for v in history]
        best = best_index(scores)
        best_txt = f"(best {_fmt(history[best])} at {labels[best]})" if best >= 0 else "(no finite value yet)"

        def stop(kind: str, text: str) -> Decision:
            return Decision(True, f"{text} {best_txt}", vals, best, kind)

        if self.check_finite and not math.isfinite(current):
            return Decision(True, f"{name}={current} is not finite {best_txt}", {}, best, "non_finite")
        vals = self.values(history, train)
        if t < self.min_epochs:
            return Decision(False, "", vals, best)
        better = "<" if self.mode == "min" else ">"
        worse = ">" if self.mode == "min" else "<"
        if self.stopping_threshold is not None and to_score(current, self.mode) < to_score(
            self.stopping_threshold, self.mode
        ):
            return stop(
                "stopping_threshold", f"{name}={_fmt(current)} {better} stopping_threshold={self.stopping_threshold:g}"
            )
        if self.divergence_threshold is not None and to_score(current, self.mode) > to_score(
            self.divergence_threshold, self.mode
        ):
            return stop(
                "divergence_threshold",
                f"{name}={_fmt(current)} {worse} divergence_threshold={self.divergence_threshold:g}",
            )

        c = self.criterion
        if c == "patience":
            n = int(vals["wait_count"])
            if n >= self.patience:
                what = "did not improve" if self.patience_rule == "no_improvement" else "increased"
                delta = f" by more than min_delta={self.min_delta:g}" if self.min_delta else ""
                return stop(c, f"{name} {what}{delta} in {n} checks in a row >= patience={self.patience}")
        elif c == "gl":
            gl = vals.get("gl", math.nan)
            if gl > self.threshold:
                return stop(c, f"GL={_fmt(gl)} > alpha={self.threshold:g}")
        elif t % self.strip == 0:  # pq and up are checked at strip ends only
            if c == "pq" and "pq" in vals and vals["pq"] > self.threshold:
                return stop(
                    c,
                    f"PQ=GL/P_{self.strip}={_fmt(vals['gl'])}/{_fmt(vals['pk'])}="
                    f"{_fmt(vals['pq'])} > alpha={self.threshold:g}",
                )
            if c == "up" and vals["up_count"] >= self.s:
                return stop(c, f"UP_{self.s}: {name} rose at the end of {self.s} successive strips of {self.strip}")
        return Decision(False, "", vals, best)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int_at_least(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def decide(
    history: Sequence[float],
    train: Sequence[float] | None = None,
    criterion: str | StopRule = "patience",
    *,
    epochs: Sequence[int] | None = None,
    name: str = "metric",
    **rule_args: object,
) -> Decision:
    """Functional form of :meth:`StopRule.decide`: ``decide(val, train, "gl", alpha=5)``.

    Example:
        >>> decide([0.3, 0.2, 0.21, 0.22], criterion="patience", patience=2).stop
        True
    """
    rule = criterion if isinstance(criterion, StopRule) else StopRule(criterion, **rule_args)  # type: ignore[arg-type]
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
        >>> index, decision = first_stop([1.0, 0.8, 0.9, 0.95, 0.97], rule=StopRule("patience", patience=3))
        >>> index, decision.reason
        (4, 'metric did not improve in 3 checks in a row >= patience=3 (best 0.8 at 1)')
    """
    rule = StopRule() if rule is None else rule
    for t in range(1, len(history) + 1):
        d = rule.decide(history[:t], None if train is None else train[:t], name=name)
        if d.stop:
            return FirstStop(t - 1, d)
    return FirstStop(None, None)
