"""The LR range test (Smith 2017): sweep the LR up over a short run, read a good LR off the loss curve.

Pure pieces (no Trainer): the sweep :func:`sweep_lr`, the bias-corrected loss EMA :class:`LossSmoother`,
the divergence rule :func:`diverged`, the suggestions :func:`suggest_steepest` / :func:`suggest_min_div10`
and the result :class:`RangeTestResult` with its PNG :meth:`~RangeTestResult.plot`. The sweep itself runs
inside a Lightning fit: :class:`lightning_tricks.callbacks.LRRangeTest` (a callback, at fit start) or
:func:`lightning_tricks.callbacks.lr_range_test.lr_range_test` (a function that builds the Trainer).

The rule, step ``i`` of ``N``:

- LR: ``lr_i = min_lr * (max_lr / min_lr) ** (i / (N - 1))`` (``mode="exp"``) or
  ``min_lr + (max_lr - min_lr) * i / (N - 1)`` (``"linear"``); the last step uses ``max_lr``.
- smoothed loss: ``a_i = beta * a_{i-1} + (1 - beta) * loss_i``, ``s_i = a_i / (1 - beta ** (i + 1))``
  (an EMA with bias correction, ``a_{-1} = 0``).
- stop when ``s_i > diverge_threshold * min(s_b..s_i)`` (checked from ``i > b = skip_begin``: the first
  points average only a few batches) or, at any step, when the loss is not finite.
- suggestion ``"steepest"``: the LR where ``d s / d log(lr)`` (``d s / d lr`` for a linear sweep) is most
  negative, on the falling side of the curve (up to the minimum of ``s``), skipping ``skip_begin`` points
  at the start and ``skip_end`` at the end; ``"min_div10"``: the LR of the minimum of ``s``, divided by 10.

Smith 2017, "Cyclical Learning Rates for Training Neural Networks", arXiv:1506.01186; Smith 2018,
arXiv:1803.09820 (the range test picks the one-cycle peak). Compared with Lightning's
``Trainer``/``Tuner.lr_find`` the steepest point is taken against ``log(lr)`` (the axis of the sweep and of
the plot), restricted to the falling side, the losses of an accumulation window are averaged (not only
the last batch's scaled loss), and several parameter groups keep their LR ratios.

Example:
    >>> lrs = [sweep_lr(i, 5, 1e-4, 1.0) for i in range(5)]
    >>> [f"{lr:.0e}" for lr in lrs]
    ['1e-04', '1e-03', '1e-02', '1e-01', '1e+00']
    >>> result = RangeTestResult(lrs=lrs, losses=[2.0, 1.9, 1.0, 0.8, 3.0], skip_begin=0, skip_end=0)
    >>> round(result.suggestion, 6), round(result.suggestion_min_div10, 6)   # central differences
    (0.01, 0.01)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_tricks.checks import check_int

__all__ = [
    "MODES",
    "MIN_DROP",
    "sweep_lr",
    "LossSmoother",
    "smooth_losses",
    "diverged",
    "suggest_steepest",
    "suggest_min_div10",
    "RangeTestResult",
    "plot_range_test",
    "check_sweep_args",
    "SweepRecord",
    "default_suggestion",
    "no_suggestion_reason",
    "summary",
    "set_lr_attr",
]

MODES = ("exp", "linear")
MIN_DROP = 0.01  # a curve must fall by this fraction of its first smoothed loss to suggest anything


def normalize_mode(mode: str) -> str:
    """``"exp"`` or ``"linear"`` (``"exponential"``, Lightning's name, is accepted too)."""
    m = {"exponential": "exp"}.get(str(mode).lower(), str(mode).lower())
    if m not in MODES:
        raise ValueError(f"mode must be one of {MODES} (or 'exponential'), got {mode!r}")
    return m


def sweep_lr(i: int, num_steps: int, min_lr: float, max_lr: float, mode: str = "exp") -> float:
    """The LR of step ``i`` of an ``num_steps``-step sweep from ``min_lr`` to ``max_lr`` (both included)."""
    if num_steps < 2:
        return min_lr
    r = min(max(i, 0), num_steps - 1) / (num_steps - 1)
    if normalize_mode(mode) == "exp":
        return min_lr * (max_lr / min_lr) ** r
    return min_lr + (max_lr - min_lr) * r


class LossSmoother:
    """Exponential moving average of the loss with bias correction (``beta=0``: no smoothing).

    Example:
        >>> s = LossSmoother(0.5)
        >>> s.update(4.0), s.update(2.0)   # (0.5*4)/(1-0.5) = 4; (0.5*2 + 0.25*4)/(1-0.25)
        (4.0, 2.6666666666666665)
    """

    def __init__(self, beta: float = 0.98) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"smooth must be in [0, 1), got {beta!r}")
        self.beta = beta
        self.avg = 0.0
        self.count = 0

    def update(self, loss: float) -> float:
        self.count += 1
        self.avg = self.beta * self.avg + (1.0 - self.beta) * loss
        return self.avg / (1.0 - self.beta**self.count)


def smooth_losses(losses: Sequence[float], beta: float = 0.98) -> list[float]:
    """:class:`LossSmoother` over a whole list."""
    smoother = LossSmoother(beta)
    return [smoother.update(float(x)) for x in losses]


def diverged(smoothed: float, best: float, threshold: float | None) -> tuple[bool, str]:
    """``(stop, reason)``: stop when the loss is not finite or ``smoothed > threshold * best``.

    Example:
        >>> diverged(9.0, 2.0, 4.0)
        (True, 'smoothed loss 9 > 4 x best 2')
    """
    if not math.isfinite(smoothed):
        return True, f"loss is {smoothed}"
    if threshold is not None and smoothed > threshold * best:
        return True, f"smoothed loss {smoothed:.4g} > {threshold:g} x best {best:.4g}"
    return False, ""


def _finite_min_index(losses: Sequence[float]) -> int | None:
    finite = [(v, i) for i, v in enumerate(losses) if math.isfinite(v)]
    return min(finite)[1] if finite else None


def suggest_steepest(
    lrs: Sequence[float], losses: Sequence[float], skip_begin: int = 10, skip_end: int = 1, log_lr: bool = True
) -> int | None:
    """Index of the steepest descent of ``losses`` against ``log(lr)`` (or ``lr``), or ``None``.

    Only points in ``[skip_begin, len - skip_end)`` with a finite loss, and not past the minimum loss,
    are considered; fewer than two such points give ``None``.
    """
    n = len(lrs)
    lowest = _finite_min_index(losses)
    if lowest is None:
        return None
    stop = min(n - skip_end, lowest + 1)
    idx = [i for i in range(skip_begin, stop) if math.isfinite(losses[i])]
    if len(idx) < 2:
        return None
    x = np.array([math.log(lrs[i]) if log_lr else lrs[i] for i in idx], dtype=np.float64)
    y = np.array([losses[i] for i in idx], dtype=np.float64)
    grads = np.gradient(y, x)
    return idx[int(np.argmin(grads))]


def suggest_min_div10(lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """The LR of the lowest (finite) loss, divided by 10; ``None`` without a finite loss."""
    i = _finite_min_index(losses)
    return None if i is None else lrs[i] / 10.0


@dataclasses.dataclass
class RangeTestResult:
    """What a range test measured, and the LRs it suggests.

    Attributes:
        lrs: the LR of each completed optimizer step (first parameter group).
        losses: the smoothed loss after each step (what the suggestions use).
        raw_losses: the loss of each step (mean over an accumulation window).
        mode: ``"exp"`` or ``"linear"``.
        stop_reason: why the sweep ended.
    """

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float] = dataclasses.field(default_factory=list)
    mode: str = "exp"
    min_lr: float | None = None
    max_lr: float | None = None
    num_steps: int | None = None
    skip_begin: int = 10
    skip_end: int = 1
    stop_reason: str = ""

    @property
    def fell(self) -> bool:
        """Whether the smoothed loss ever fell at least ``MIN_DROP`` (1%) below its first value.

        A curve that never fell (the loss exploded from the first steps, or stayed flat) has no LR worth
        suggesting: both suggestions are then ``None`` and nothing is applied.
        """
        lowest = _finite_min_index(self.losses)
        return (
            lowest is not None
            and lowest > 0
            and math.isfinite(self.losses[0])
            and self.losses[lowest] < (1.0 - MIN_DROP) * self.losses[0]
        )

    @property
    def suggestion_index(self) -> int | None:
        if not self.fell:
            return None
        return suggest_steepest(self.lrs, self.losses, self.skip_begin, self.skip_end, log_lr=self.mode == "exp")

    @property
    def suggestion(self) -> float | None:
        """The LR of steepest loss descent (``None`` when too few points were recorded)."""
        i = self.suggestion_index
        return None if i is None else self.lrs[i]

    @property
    def suggestion_min_div10(self) -> float | None:
        """The LR of the lowest smoothed loss, divided by 10 (``None`` when the loss never fell)."""
        return suggest_min_div10(self.lrs, self.losses) if self.fell else None

    @property
    def min_loss_lr(self) -> float | None:
        i = _finite_min_index(self.losses)
        return None if i is None else self.lrs[i]

    def suggest(self, method: str = "steepest") -> float | None:
        """``"steepest"`` -> :attr:`suggestion`; ``"min_div10"`` -> :attr:`suggestion_min_div10`."""
        if method == "steepest":
            return self.suggestion
        if method == "min_div10":
            return self.suggestion_min_div10
        raise ValueError(f"method must be 'steepest' or 'min_div10', got {method!r}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def plot(self, path: str | os.PathLike | None = None, ax: Any = None) -> Any:
        """Loss against LR with the suggestions marked; saved as PNG at ``path``. Returns the figure."""
        return plot_range_test(self, path, ax)


def plot_range_test(result: RangeTestResult, path: str | os.PathLike | None = None, ax: Any = None) -> Any:
    """Draw ``result`` with matplotlib's Agg canvas (no display, no pyplot state); save to ``path`` if given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if ax is None:
        fig = Figure(figsize=(6.4, 4.2), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    lrs, smoothed = result.lrs, result.losses
    if result.raw_losses:
        ax.plot(lrs, result.raw_losses, color="0.75", linewidth=0.8, label="loss")
    ax.plot(lrs, smoothed, color="C0", linewidth=1.8, label="smoothed loss")
    if result.mode == "exp":
        ax.set_xscale("log")
    finite = [v for v in smoothed if math.isfinite(v)]
    if finite:  # frame the falling part; the divergence at the end may leave the plot
        low, first = min(finite), finite[0]
        span = max(first - low, 0.05 * abs(low), 1e-8)
        ax.set_ylim(low - 0.1 * span, first + 0.5 * span)
    steep = result.suggestion_index
    if steep is not None:
        ax.plot([lrs[steep]], [smoothed[steep]], "o", color="C3", markersize=9, label=f"steepest: {lrs[steep]:.3g}")
    div10 = result.suggestion_min_div10
    if div10 is not None:
        ax.axvline(div10, color="C1", linestyle="--", linewidth=1.2, label=f"min loss / 10: {div10:.3g}")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(f"LR range test: {result.stop_reason or f'{len(lrs)} steps'}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
        fig.savefig(os.fspath(path), format="png", bbox_inches="tight")
    return fig


def check_sweep_args(
    min_lr: float, max_lr: float, num_steps: Any, smooth: float, diverge_threshold: float | None
) -> None:
    """Raise ``ValueError`` naming the first bad sweep argument."""
    for name, v in (("min_lr", min_lr), ("max_lr", max_lr)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    if min_lr >= max_lr:
        raise ValueError(f"min_lr must be < max_lr (bounds reversed?), got min_lr={min_lr!r} >= max_lr={max_lr!r}")
    check_int("num_steps", num_steps, 2)
    LossSmoother(smooth)  # checks smooth is in [0, 1)
    if diverge_threshold is not None and not (diverge_threshold > 1.0 and math.isfinite(diverge_threshold)):
        raise ValueError(f"diverge_threshold must be None or a number > 1, got {diverge_threshold!r}")


class SweepRecord:
    """The sweep's curve, one point per optimizer step, and its stop rule.

    The first ``skip_begin`` points average few batches and are noisy: they neither set the best loss
    nor trigger the ratio test (a non-finite loss always stops).

    Example:
        >>> rec = SweepRecord(smooth=0.0, diverge_threshold=2.0, skip_begin=0)
        >>> rec.add(1e-3, 1.0), rec.add(1e-2, None), rec.add(1e-1, 3.0)
        ((False, ''), (False, ''), (True, 'smoothed loss 3 > 2 x best 1'))
    """

    def __init__(self, smooth: float, diverge_threshold: float | None, skip_begin: int) -> None:
        self.smoother = LossSmoother(smooth)
        self.diverge_threshold, self.skip_begin = diverge_threshold, skip_begin
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.raw: list[float] = []
        self.best = math.inf

    def add(self, lr: float, raw: float | None) -> tuple[bool, str]:
        """Record the step at ``lr`` with mean loss ``raw`` (``None``: no loss, a gap); return ``(stop, reason)``."""
        self.lrs.append(lr)
        if raw is None:
            self.raw.append(math.nan)
            self.losses.append(math.nan)
            return False, ""
        smoothed = self.smoother.update(raw) if math.isfinite(raw) else raw
        self.raw.append(raw)
        self.losses.append(smoothed)
        stop, reason = False, ""
        if len(self.losses) > max(self.skip_begin, 1) or not math.isfinite(smoothed):
            stop, reason = diverged(smoothed, self.best, self.diverge_threshold)
        if math.isfinite(smoothed) and len(self.losses) > self.skip_begin:
            self.best = min(self.best, smoothed)
        return stop, reason


def default_suggestion(apply_to: str | None, suggestion: str | None) -> str:
    """The suggestion applied: ``suggestion``, or ``"min_div10"`` for a one-cycle peak, else ``"steepest"``."""
    if suggestion is not None:
        return suggestion
    return "min_div10" if apply_to == "one_cycle" else "steepest"


def no_suggestion_reason(result: RangeTestResult) -> str:
    """Why ``result`` has no suggestion, for the warning."""
    if result.losses and not result.fell:
        return (
            f"the smoothed loss never fell below its first value ({result.stop_reason or 'no fall'}: "
            f"the sweep starts too high, lower min_lr)"
        )
    return f"{len(result.lrs)} points recorded"


def summary(result: RangeTestResult) -> str:
    """One line: steps, LR span, why it stopped and both suggestions."""

    def fmt(v: float | None) -> str:
        return "none" if v is None else f"{v:.3g}"

    last = result.lrs[-1] if result.lrs else 0
    return (
        f"{len(result.lrs)} steps, lr {result.min_lr:.3g} -> {last:.3g} ({result.mode}); {result.stop_reason}. "
        f"Suggestions: steepest {fmt(result.suggestion)}, min-loss/10 {fmt(result.suggestion_min_div10)}"
    )


def set_lr_attr(module: Any, lr: float, attr_name: str | None = None) -> str | None:
    """Write ``lr`` where ``module`` keeps its LR; return where, or ``None`` if nowhere was found.

    Without ``attr_name``: ``module.optimizer_config.lr`` (and ``hparams["optimizer"]["lr"]``), else the
    first of ``lr`` / ``learning_rate`` found in ``hparams`` or as an attribute.
    """
    owner = type(module).__name__
    config = getattr(module, "optimizer_config", None)
    if not attr_name and config is not None and hasattr(config, "lr"):
        config.lr = lr
        hp = getattr(module, "hparams", {})
        if isinstance(hp.get("optimizer"), dict) and "lr" in hp["optimizer"]:
            hp["optimizer"]["lr"] = lr
        return f"{owner}.optimizer_config.lr"
    for name in [attr_name] if attr_name else ["lr", "learning_rate"]:
        if name in getattr(module, "hparams", {}):
            module.hparams[name] = lr
            if hasattr(module, name):
                setattr(module, name, lr)
            return f"{owner}.hparams.{name}"
        if hasattr(module, name):
            setattr(module, name, lr)
            return f"{owner}.{name}"
    if attr_name:
        raise AttributeError(f"LRRangeTest(attr_name={attr_name!r}): the module has no such attribute or hparam")
    return None
