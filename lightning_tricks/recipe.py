"""The CS231n training recipe, run in order on the configured model and data: ``python -m lightning_tricks.recipe``.

Seed note 002 ("Training Neural Networks", CS231n; "without tons of GPUs") tells how to pick
hyperparameters by hand before any long run:

1. **Initial loss**: with regularization off, the untrained model's loss must be ~``log(C)``.
2. **Overfit a tiny subset**: with regularization off, the loss on ~20 examples must reach ~0.
3. **Find an LR that makes the loss fall** (regularization on, the whole training set): the LR range
   test (Smith 2017, arXiv:1506.01186; :func:`lightning_tricks.callbacks.lr_range_test.lr_range_test`) sweeps the LR
   exponentially over ~100 iterations and suggests the LR of steepest descent.
4. **Coarse search** for 1-5 epochs over a few LRs around the range test's suggestion (and weight
   decays, if given), judged on the validation metric.
5. **Fine search** in the best region the coarse search found: the LRs and weight decays of its top
   ``k`` runs span a box, widened by ``factor`` on each side *on a log scale* (``[min / factor,
   max * factor]``), from which ``trials`` settings are drawn log-uniformly (random search beats a grid,
   Bergstra & Bengio 2012) with a seeded ``torch.Generator`` and trained for more epochs than the coarse
   runs (:func:`fine_region`, :func:`sample_fine`).
6. **Long run** at the best fine setting, recording the train and validation curves per epoch
   (``long_run_curves.png``).
7. **Diagnosis** of those curves, read as the notes read them: a large train/val accuracy gap or a
   validation loss that rose from its minimum is *overfitting*; a model that does not fit its own
   training data, or whose validation loss is still falling, is *underfitting*; otherwise *fine*. The
   rules and their thresholds are explicit (:class:`DiagnoseThresholds`, :func:`diagnose`) and the
   report gives the numbers and the advice.

Default sizes (every one overridable as ``recipe.<stage>.<key>=...``): coarse 4 LRs x 2 epochs; fine
8 trials x 5 epochs in the region of the top 3 coarse runs widened x2; long run 30 epochs. On digits
with the MLP the two new stages add 70 short epochs (about 1,400 optimizer steps) to the coarse stage's 8.

:func:`run_recipe` runs the steps on a config composed from ``conf/`` (the same groups and
overrides as ``lightning_tricks.train``) and returns a :class:`RecipeReport`; :func:`main` is the
Hydra entry, which prints the report, writes it to ``<output_dir>/recipe_report.md`` and suggests the
overrides for a full run. Every trial prints one line (``recipe: fine search 3/8: ...``) and the long
run one line per epoch. The recipe's own settings are the ``recipe`` block (:data:`RECIPE_DEFAULTS`),
overridable on the command line::

    python -m lightning_tricks.recipe                                  # digits + MLP, ~1 min on a CPU
    python -m lightning_tricks.recipe model=resnet optimizer=adamw recipe.search.epochs=3
    python -m lightning_tricks.recipe recipe.search.weight_decays=[0,5e-4,5e-3] recipe.lr_range.num_steps=200
    python -m lightning_tricks.recipe recipe.fine.trials=16 recipe.fine.epochs=10 recipe.long_run.epochs=100
    python -m lightning_tricks.recipe recipe.diagnose.max_acc_gap=0.1     # a looser overfitting rule

After it: run the suggested ``lightning_tricks.train`` command with the change the diagnosis advises,
and watch the update/weight ratio with :class:`~lightning_tricks.callbacks.UpdateRatioMonitor`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_tricks._lightning import rank_zero_info, seed_everything
from lightning_tricks.callbacks.lr_range_test import lr_range_test
from lightning_tricks.checks import check_choice, check_float, check_int
from lightning_tricks.mixins import Classifier
from lightning_tricks.sanity import initial_loss, overfit_check, take_samples
from lightning_tricks.train import (
    ConfigError,
    _output_dir,
    build_data_and_module,
    config_dir,
    train,
)


# ----------------------------------------------------------------------------------------------
# pure cores: the fine-search region and its samples, the diagnosis of a run's curves
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FineRegion:
    """The box the fine search samples from, on a log scale: ``lr = (low, high)``, ``weight_decay = (low, high)``.

    ``weight_decay == (0.0, 0.0)`` means weight decay stays 0 (zero has no place on a log scale).
    ``top`` holds the coarse rows the box was built from, best first.
    """

    lr: tuple[float, float]
    weight_decay: tuple[float, float]
    top: tuple[dict[str, Any], ...] = ()


def _ranked(rows: Sequence[Mapping[str, Any]], monitor: str, mode: str) -> list[Mapping[str, Any]]:
    """The rows with a finite ``monitor``, best first (ties keep their order)."""
    check_choice("mode", mode, ("max", "min"))
    sign = -1.0 if mode == "max" else 1.0
    finite = [r for r in rows if isinstance(r.get(monitor), (int, float)) and math.isfinite(r[monitor])]
    return sorted(finite, key=lambda r: sign * float(r[monitor]))


def fine_region(
    rows: Sequence[Mapping[str, Any]], monitor: str, mode: str = "max", top_k: int = 3, factor: float = 2.0
) -> FineRegion:
    """The fine-search box around the ``top_k`` best coarse runs (rows with ``lr``, ``weight_decay``, ``monitor``).

    ``lr = (min(top LRs) / factor, max(top LRs) * factor)`` and the same for the positive weight decays
    of those runs; if all of them used weight decay 0 it stays 0. Rows whose ``monitor`` is not finite
    (diverged runs) are left out; fewer than ``top_k`` finite rows use them all.

    Example:
        >>> rows = [{"lr": 0.01, "weight_decay": 1e-4, "acc": 0.9}, {"lr": 0.1, "weight_decay": 1e-4, "acc": 0.95},
        ...         {"lr": 1.0, "weight_decay": 1e-4, "acc": 0.5}]
        >>> region = fine_region(rows, "acc", "max", top_k=2, factor=2.0)
        >>> region.lr, region.weight_decay
        ((0.005, 0.2), (5e-05, 0.0002))
    """
    check_int("top_k", top_k, 1)
    if not factor > 1:
        raise ValueError(f"factor must be > 1, got {factor!r}")
    top = _ranked(rows, monitor, mode)[:top_k]
    if not top:
        raise ValueError(f"no coarse run has a finite {monitor}: nothing to refine")
    lrs = [float(r["lr"]) for r in top]
    if min(lrs) <= 0:
        raise ValueError(f"coarse LRs must be > 0, got {min(lrs)}")
    wds = [float(r["weight_decay"]) for r in top if float(r["weight_decay"]) > 0]
    wd = (min(wds) / factor, max(wds) * factor) if wds else (0.0, 0.0)
    return FineRegion((min(lrs) / factor, max(lrs) * factor), wd, tuple(dict(r) for r in top))


def _log_uniform(uniform: torch.Tensor, low: float, high: float) -> list[float]:
    """``exp(log low + uniform * (log high - log low))`` to 3 significant digits, kept inside ``[low, high]``."""
    if high <= 0:
        return [0.0] * uniform.numel()
    values = torch.exp(math.log(low) + uniform * (math.log(high) - math.log(low))).tolist()
    return [min(max(float(f"{v:.3g}"), low), high) for v in values]


def sample_fine(region: FineRegion, trials: int, seed: int) -> list[tuple[float, float]]:
    """``trials`` settings ``(lr, weight_decay)`` drawn log-uniformly from ``region``, reproducible with ``seed``.

    One ``torch.Generator`` seeded with ``seed`` draws ``u ~ U[0, 1)`` of shape ``(trials, 2)`` in float64;
    column 0 gives the LRs and column 1 the weight decays, each ``exp(log low + u (log high - log low))``,
    rounded to 3 significant digits and kept inside the box. The global RNG is not touched.

    Example:
        >>> region = FineRegion(lr=(0.01, 1.0), weight_decay=(0.0, 0.0))
        >>> sample_fine(region, 3, seed=0) == sample_fine(region, 3, seed=0)
        True
        >>> all(0.01 <= lr <= 1.0 and wd == 0.0 for lr, wd in sample_fine(region, 3, seed=0))
        True
    """
    check_int("trials", trials, 1)
    for name, (low, high) in (("lr", region.lr), ("weight_decay", region.weight_decay)):
        if not (0 < low <= high or (name == "weight_decay" and low == high == 0)):
            raise ValueError(f"region.{name} must be 0 < low <= high, got {(low, high)}")
    generator = torch.Generator().manual_seed(int(seed))
    uniform = torch.rand(trials, 2, generator=generator, dtype=torch.float64)
    lrs = _log_uniform(uniform[:, 0], *region.lr)
    wds = _log_uniform(uniform[:, 1], *region.weight_decay)
    return list(zip(lrs, wds))


VERDICTS = ("underfitting", "overfitting", "fine", "inconclusive")

#: What to change for each verdict (the notes' advice); the report adds what the numbers point at.
ADVICE = {
    "underfitting": (
        "more capacity (a wider or deeper model), a higher LR, less regularization (weight decay, dropout, "
        "label smoothing, augmentation), longer training"
    ),
    "overfitting": (
        "more regularization (a higher weight decay, dropout, label smoothing), more augmentation "
        "(+callbacks=mixup, cutmix or cutout) or more data, early stopping (+callbacks=early_stopping_gl) "
        "or fewer epochs, a smaller model"
    ),
    "fine": (
        "train the final model with these settings (the suggested command); a little more may come from "
        "weight averaging (+callbacks=ema) or a snapshot ensemble (+callbacks=snapshot_ensemble)"
    ),
    "inconclusive": "train longer (recipe.long_run.epochs) so that the curves can be read",
}


@dataclasses.dataclass(frozen=True)
class DiagnoseThresholds:
    """The rules :func:`diagnose` applies, each a threshold the report quotes (``recipe.diagnose.<name>``).

    The end of a run is read as the mean of its last ``w = min(tail, epochs // 2)`` epochs, so that one
    noisy validation epoch (a small validation set) does not decide the verdict.

    Args:
        min_epochs: fewer epochs of train and validation loss than this give ``inconclusive``.
        max_acc_gap: overfitting when train accuracy - validation accuracy at the end ``>`` this (0.05 = 5 pp).
        max_val_rise: overfitting when the validation loss at the end is more than this fraction above its
            lowest ``w``-epoch mean over the run (0.1 = 10%).
        min_train_acc: underfitting when the train accuracy at the end is below this (the model does not
            fit its own training data; set it for the task: 0.9 suits digits, MNIST, CIFAR-10 models).
        still_falling: underfitting when the validation loss at the end is its lowest and more than this
            fraction below its mean over the ``w`` epochs before (still improving: more epochs would help).
        tail: the longest window ``w``, in epochs.
    """

    min_epochs: int = 3
    max_acc_gap: float = 0.05
    max_val_rise: float = 0.10
    min_train_acc: float = 0.90
    still_falling: float = 0.10
    tail: int = 3

    def __post_init__(self) -> None:
        check_int("min_epochs", self.min_epochs, 2)
        check_int("tail", self.tail, 1)
        for name in ("max_acc_gap", "min_train_acc"):
            check_float(name, getattr(self, name), 0, 1)
        for name in ("max_val_rise", "still_falling"):
            check_float(name, getattr(self, name), 0, math.inf, high_open=True)


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What :func:`diagnose` read from the curves.

    ``verdict`` is one of :data:`VERDICTS`; ``reason`` quotes the rules that decided with their numbers;
    ``advice`` says what to change; ``numbers`` holds the measures, each at the end of the run (the mean
    of the last ``window`` epochs): ``train_acc``, ``val_acc``, ``acc_gap`` (only when accuracy curves
    were given), ``train_loss``, ``val_loss``, ``loss_gap``, ``min_val_loss`` (the lowest ``window``-epoch
    mean) and ``min_val_loss_epoch`` (the last epoch of that window), ``val_rise``, ``val_fall``,
    ``window``; ``signals`` every rule that fired, overfitting ones first.
    """

    verdict: str
    reason: str
    advice: str
    epochs: int
    numbers: dict[str, float] = dataclasses.field(default_factory=dict)
    signals: tuple[str, ...] = ()


Curve = Sequence[float] | Sequence[tuple[float, float]]


def _points(curve: Curve) -> list[tuple[float, float]]:
    """``(epoch, value)`` points; a plain sequence of values gets epochs 1, 2, ..."""
    out = []
    for i, p in enumerate(curve):
        if isinstance(p, (tuple, list)):
            out.append((float(p[0]), float(p[1])))
        else:
            out.append((float(i + 1), float(p)))  # type: ignore[arg-type]  # a number, by the Curve type
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def diagnose(curves: Mapping[str, Curve], thresholds: DiagnoseThresholds | None = None) -> Diagnosis:
    """Read a run's per-epoch curves: ``underfitting``, ``overfitting``, ``fine`` or ``inconclusive``.

    ``curves`` maps ``"train/loss"``, ``"val/loss"`` (needed) and ``"train/acc"``, ``"val/acc"``
    (optional) to ``(epoch, value)`` points or plain per-epoch values, as
    :class:`~lightning_tricks.callbacks.CurvePlot` records them. With ``t = thresholds``, ``n`` the
    epochs with both losses, ``w = min(t.tail, n // 2)`` and ``end(x)`` the mean of the last ``w``
    values of a curve:

    - ``n < t.min_epochs``, a missing loss curve or a non-finite value (a diverged run): **inconclusive**;
    - **overfitting** when ``end(train_acc) - end(val_acc) > t.max_acc_gap`` or
      ``val_rise = end(val_loss) / low - 1 > t.max_val_rise``, ``low`` the lowest mean of ``w``
      consecutive validation losses (the validation loss rose from its minimum);
    - else **underfitting** when ``end(train_acc) < t.min_train_acc`` or, with the end at its lowest
      (``end(val_loss) == low``), ``val_fall = 1 - end(val_loss) / before > t.still_falling``, ``before``
      the mean of the ``w`` validation losses before the last ``w`` (still improving);
    - else **fine**.

    The loss gap ``end(val_loss) - end(train_loss)`` is reported but decides nothing: label smoothing,
    dropout and mixup raise the training loss (and lower the training accuracy, so the gap reads smaller)
    while the validation pass has none of them.

    Example:
        >>> d = diagnose({"train/loss": [1.0, 0.3, 0.1, 0.02], "val/loss": [1.0, 0.5, 0.45, 0.6],
        ...               "train/acc": [0.7, 0.9, 0.97, 1.0], "val/acc": [0.7, 0.85, 0.88, 0.87]})
        >>> d.verdict, d.numbers["window"], round(d.numbers["acc_gap"], 3), round(d.numbers["val_rise"], 3)
        ('overfitting', 2.0, 0.11, 0.105)
    """
    t = thresholds if thresholds is not None else DiagnoseThresholds()
    series = {
        name: _points(curves[name]) for name in ("train/loss", "val/loss", "train/acc", "val/acc") if name in curves
    }
    tl, vl = series.get("train/loss", []), series.get("val/loss", [])
    ta, va = series.get("train/acc", []), series.get("val/acc", [])
    epochs = min(len(tl), len(vl))

    def inconclusive(reason: str) -> Diagnosis:
        return Diagnosis("inconclusive", reason, ADVICE["inconclusive"], epochs)

    for name, points in series.items():
        bad = next(((e, v) for e, v in points if not math.isfinite(v)), None)
        if bad is not None:
            return Diagnosis(
                "inconclusive",
                f"{name} is {bad[1]} at epoch {bad[0]:g}: the run diverged",
                "lower the LR (or clip gradients) until the run stays finite, then read the curves again",
                epochs,
            )
    missing = [name for name, points in (("train/loss", tl), ("val/loss", vl)) if not points]
    if missing:
        return inconclusive(f"no {' or '.join(missing)} curve to read")
    if epochs < t.min_epochs:
        return inconclusive(
            f"only {epochs} epoch(s) of train and validation loss; a verdict needs >= {t.min_epochs} "
            "(recipe.diagnose.min_epochs)"
        )
    w = min(t.tail, epochs // 2)

    def mean(points: Sequence[tuple[float, float]]) -> float:
        return sum(v for _, v in points) / len(points)

    numbers: dict[str, float] = {"window": float(w), "train_loss": mean(tl[-w:]), "val_loss": mean(vl[-w:])}
    numbers["loss_gap"] = numbers["val_loss"] - numbers["train_loss"]
    windows = [(vl[i][0], mean(vl[i - w + 1 : i + 1])) for i in range(w - 1, len(vl))]  # (last epoch, mean)
    low_epoch, low = min(windows, key=lambda p: p[1])  # the first lowest window
    numbers["min_val_loss"], numbers["min_val_loss_epoch"] = low, low_epoch
    final = numbers["val_loss"]
    numbers["val_rise"] = final / low - 1 if low > 0 else (0.0 if final == low else math.inf)
    before = mean(vl[-2 * w : -w])
    numbers["val_fall"] = 1 - final / before if before > 0 else 0.0
    has_acc = bool(ta and va)
    if has_acc:
        numbers["train_acc"], numbers["val_acc"] = mean(ta[-w:]), mean(va[-w:])
        numbers["acc_gap"] = numbers["train_acc"] - numbers["val_acc"]
    low_at = f"epoch {low_epoch:g}" if w == 1 else f"epochs {low_epoch - w + 1:g}-{low_epoch:g}"

    over, under = [], []
    if has_acc and numbers["acc_gap"] > t.max_acc_gap:
        over.append(
            f"train acc {numbers['train_acc']:.4f} - val acc {numbers['val_acc']:.4f} = "
            f"{100 * numbers['acc_gap']:.1f} pp > {100 * t.max_acc_gap:g} pp"
        )
    if numbers["val_rise"] > t.max_val_rise:
        over.append(
            f"val loss {final:.4g} ended {_pct(numbers['val_rise'])} above its lowest {low:.4g} ({low_at}) "
            f"> {_pct(t.max_val_rise)}"
        )
    if has_acc and numbers["train_acc"] < t.min_train_acc:
        under.append(
            f"train acc {numbers['train_acc']:.4f} < {t.min_train_acc:g}: the model does not fit its training data"
        )
    if final <= low and numbers["val_fall"] > t.still_falling:
        under.append(
            f"val loss {final:.4g} ended {_pct(numbers['val_fall'])} below the {w} epoch(s) before "
            f"({before:.4g}) > {_pct(t.still_falling)}: still improving"
        )
    signals = tuple(over + under)
    if over:
        verdict, reason = "overfitting", "; ".join(over) + (f" (also: {'; '.join(under)})" if under else "")
        advice = ADVICE["overfitting"]
        if numbers["val_rise"] > t.max_val_rise:
            advice += (
                f"; the val loss was lowest at {low_at}: stop there (trainer.max_epochs={low_epoch:g}) "
                "or let early stopping do it"
            )
    elif under:
        verdict, reason = "underfitting", "; ".join(under)
        advice = ADVICE["underfitting"]
        if final <= low and numbers["val_fall"] > t.still_falling:
            advice = (
                "train longer first (more epochs: the val loss is still falling at the end); if that does not "
                "lift the accuracy: " + advice.removesuffix(", longer training")
            )
    else:
        verdict = "fine"
        parts = []
        if has_acc:
            parts.append(
                f"train acc {numbers['train_acc']:.4f} vs val acc {numbers['val_acc']:.4f} "
                f"(gap {100 * numbers['acc_gap']:.1f} pp <= {100 * t.max_acc_gap:g} pp, "
                f"train acc >= {t.min_train_acc:g})"
            )
        if final <= low:
            parts.append(
                f"val loss at its lowest, {_pct(numbers['val_fall'])} below the {w} epoch(s) before "
                f"(<= {_pct(t.still_falling)})"
            )
        else:
            parts.append(f"val loss {_pct(numbers['val_rise'])} above its lowest (<= {_pct(t.max_val_rise)})")
        reason, advice = "; ".join(parts), ADVICE["fine"]
    if w > 1:
        reason += f" [means of the last {w} epochs]"
    return Diagnosis(verdict, reason, advice, epochs, numbers, signals)


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------
#: The ``recipe`` block of the config; every key can be overridden as ``recipe.<key>=...``.
RECIPE_DEFAULTS: dict[str, Any] = {
    "initial_loss": {"num_samples": 256, "rtol": 0.1},
    "overfit": {"num_samples": 20, "steps": 200, "target_loss": 0.05},
    "lr_range": {"min_lr": 1.0e-6, "max_lr": 10.0, "num_steps": 100, "smooth": 0.98, "diverge_threshold": 4.0},
    "search": {
        "lr_factors": [0.3, 1.0, 3.0, 10.0],  # candidate LRs: the range test's suggestion times these
        "weight_decays": None,  # None: the configured weight decay only
        "epochs": 2,
        "limit_train_batches": None,
    },
    "fine": {
        "trials": 8,  # settings drawn log-uniformly from the region of the best coarse runs
        "epochs": 5,  # longer than the coarse runs: the survivors are compared on a longer horizon
        "top_k": 3,  # the region spans the LRs and weight decays of the top_k coarse runs ...
        "factor": 2.0,  # ... widened to [min / factor, max * factor] (log scale); must be > 1
        "seed": None,  # None: the config's seed
        "limit_train_batches": None,
    },
    "long_run": {"epochs": 30, "limit_train_batches": None},  # at the best fine setting; its curves are diagnosed
    "diagnose": dataclasses.asdict(DiagnoseThresholds()),
    "stop_on_failure": False,  # stop after a failed initial-loss or overfit check
}

# the entry's primary config: everything in conf/train.yaml plus the recipe block
ConfigStore.instance().store(name="recipe", node={"defaults": ["train", "_self_"], "recipe": RECIPE_DEFAULTS})

#: Callback entries that the short search runs leave out (files and checks, not training behaviour).
SEARCH_DROPS = ("model_checkpoint", "curve_plot", "lr_range_test", "initial_loss_check", "overfit_check")


@dataclasses.dataclass
class StepResult:
    """One step of the recipe: ``passed`` is None for steps that measure rather than check.

    ``details`` may hold ``table`` (Markdown put under the summary), ``image`` (a PNG path relative to the
    report) and ``mark`` (the word after the heading instead of ok/FAILED/done: ``skipped``, a verdict).
    """

    name: str
    passed: bool | None
    summary: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RecipeReport:
    """The recipe's findings and the overrides it suggests for a full ``lightning_tricks.train`` run."""

    steps: list[StepResult]
    suggested: dict[str, Any]
    output_dir: str

    @property
    def passed(self) -> bool:
        return all(s.passed is not False for s in self.steps)

    def step(self, name: str) -> StepResult:
        return next(s for s in self.steps if s.name == name)

    def command(self) -> str:
        overrides = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.suggested.items())
        return f"python -m lightning_tricks.train {overrides}".rstrip()

    def render(self) -> str:
        """The report as Markdown."""
        lines = ["# lightning-tricks recipe report", ""]
        for i, s in enumerate(self.steps, 1):
            mark = s.details.get("mark") or {True: "ok", False: "FAILED", None: "done"}[s.passed]
            lines.append(f"## {i}. {s.name}: {mark}")
            lines.append("")
            lines.append(s.summary)
            image = s.details.get("image")
            if image:
                lines += ["", f"![{s.name}]({image})"]
            table = s.details.get("table")
            if table:
                lines += ["", table]
            lines.append("")
        lines.append("## Suggested config")
        lines.append("")
        if self.suggested:
            lines += ["```", self.command(), "```"]
        else:
            lines.append("none: the search did not run")
        failed = [s.name for s in self.steps if s.passed is False]
        if failed:
            lines += [
                "",
                f"Fix first: {', '.join(failed)} failed; the numbers after a failed check are not trustworthy.",
            ]
        lines += [
            "",
            "Next: run the suggested command with the change the diagnosis advises, and watch the update/weight "
            "ratio (+callbacks=update_ratio_monitor, healthy ~1e-3).",
        ]
        return "\n".join(lines)


def _config_check(check: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run a check of :mod:`lightning_tricks.checks` on a config value; a bad one raises ConfigError."""
    try:
        check(*args, **kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _settings(cfg: DictConfig) -> dict[str, Any]:
    """``RECIPE_DEFAULTS`` merged with ``cfg.recipe``; unknown keys and bad values raise ConfigError."""
    base: Any = OmegaConf.create(RECIPE_DEFAULTS)
    given = cfg.get("recipe")
    if given is not None:
        try:
            OmegaConf.set_struct(base, True)
            base = OmegaConf.merge(base, given)
        except Exception as e:  # noqa: BLE001 - omegaconf raises several kinds for an unknown key
            raise ConfigError(f"recipe: {e}".splitlines()[0]) from e
    s: dict[str, Any] = OmegaConf.to_container(base, resolve=True)  # type: ignore[assignment]
    assert isinstance(s, dict)
    lr = s["lr_range"]
    if not 0 < lr["min_lr"] < lr["max_lr"]:
        raise ConfigError(f"recipe.lr_range needs 0 < min_lr < max_lr, got {lr['min_lr']} and {lr['max_lr']}")
    if int(lr["num_steps"]) < 5:
        raise ConfigError(f"recipe.lr_range.num_steps must be >= 5, got {lr['num_steps']}")
    if not 0 <= lr["smooth"] < 1:
        raise ConfigError(f"recipe.lr_range.smooth must be in [0, 1), got {lr['smooth']}")
    search = s["search"]
    if not search["lr_factors"] or any(f <= 0 for f in search["lr_factors"]):
        raise ConfigError(f"recipe.search.lr_factors must be positive numbers, got {search['lr_factors']}")
    if int(search["epochs"]) < 1:
        raise ConfigError(f"recipe.search.epochs must be >= 1, got {search['epochs']}")
    wds = search["weight_decays"]
    if wds is not None and (not wds or any(w < 0 for w in wds)):
        raise ConfigError(f"recipe.search.weight_decays must be None or numbers >= 0, got {wds}")
    fine = s["fine"]
    for key in ("trials", "epochs", "top_k"):
        _config_check(check_int, f"recipe.fine.{key}", fine[key], 1)
    _config_check(check_float, "recipe.fine.factor", fine["factor"], 1, math.inf, low_open=True, high_open=True)
    if fine["seed"] is not None:
        _config_check(check_int, "recipe.fine.seed", fine["seed"], 0)
    _config_check(check_int, "recipe.long_run.epochs", s["long_run"]["epochs"], 1)
    if cfg.get("monitor_mode", "max") not in ("max", "min"):
        raise ConfigError(f"monitor_mode must be one of ('max', 'min'), got {cfg.get('monitor_mode')!r}")
    try:
        s["diagnose"] = DiagnoseThresholds(**s["diagnose"])
    except ValueError as e:
        raise ConfigError(f"recipe.diagnose.{e}") from e
    return s


def build(cfg: DictConfig) -> tuple[Any, Classifier]:
    """The DataModule (set up for fit) and the Classifier that ``lightning_tricks.train`` would build."""
    datamodule, module = build_data_and_module(cfg)
    datamodule.setup("fit")
    return datamodule, module


# ----------------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------------
def run_recipe(cfg: DictConfig) -> RecipeReport:
    """Run the seven steps on the model and data of ``cfg`` and return the report (see the module doc)."""
    s = _settings(cfg)
    seed = int(cfg.seed) if cfg.get("seed") is not None else 0
    seed_everything(seed)
    out = _output_dir(cfg)
    datamodule, module = build(cfg)
    steps: list[StepResult] = []

    def done() -> RecipeReport:
        report = RecipeReport(steps, suggested, str(out))
        (out / "recipe_report.md").write_text(report.render() + "\n")
        return report

    suggested: dict[str, Any] = {}
    # 1. initial loss, regularization off
    n = int(s["initial_loss"]["num_samples"])
    x, y = take_samples(datamodule, n)
    rep = initial_loss(module, (x, y), rtol=float(s["initial_loss"]["rtol"]), num_classes=module.num_classes)
    steps.append(
        StepResult(
            "initial loss",
            rep.passed,
            f"On {x.shape[0]} training samples, regularization off: {rep.reason}.",
            {"loss": rep.loss, "expected": rep.expected},
        )
    )
    # 2. overfit a tiny subset, regularization off
    o = s["overfit"]
    res = overfit_check(
        module,
        datamodule,
        num_samples=int(o["num_samples"]),
        steps=int(o["steps"]),
        target_loss=float(o["target_loss"]),
        optimizer=module.configure_optimizers(),
        seed=seed,
    )
    steps.append(
        StepResult(
            "overfit a tiny subset",
            res.passed,
            f"{res.reason}.",
            {"final_loss": res.final_loss, "steps": res.steps, "accuracy": res.accuracy},
        )
    )
    if s["stop_on_failure"] and not all(st.passed for st in steps):
        return done()
    # 3. LR range test, regularization on (the module's optimizer, weight decay and label smoothing)
    r = s["lr_range"]
    bounds = {k: float(r[k]) for k in ("min_lr", "max_lr", "smooth", "diverge_threshold")}
    result = lr_range_test(
        module,
        datamodule,
        num_steps=int(r["num_steps"]),
        plot_path=out / "lr_range_test.png",
        trainer_kwargs=_range_trainer_kwargs(cfg),
        **bounds,
    )
    configured = float(cfg.optimizer.lr)
    center = result.suggestion or result.suggestion_min_div10
    details = {
        "steepest": result.suggestion,
        "min_div10": result.suggestion_min_div10,
        "min_loss_lr": result.min_loss_lr,
        "steps": len(result.lrs),
        "stop_reason": result.stop_reason,
        "plot": str(out / "lr_range_test.png"),
    }
    if center is None:
        why = "the smoothed loss never fell" if result.losses and not result.fell else "too few finite losses"
        summary = (
            f"No LR to suggest: {why} (sweep {r['min_lr']:g} -> {r['max_lr']:g}: "
            f"{result.stop_reason or 'no steps'}); searching around the configured LR {configured:g}."
        )
        center = configured
    else:
        summary = (
            f"Sweep {r['min_lr']:g} -> {r['max_lr']:g}, {len(result.lrs)} of {r['num_steps']} steps"
            + (f" ({result.stop_reason})" if result.stop_reason else "")
            + f"; steepest descent at LR {_fmt(result.suggestion)}, lowest loss at {_fmt(result.min_loss_lr)} "
            f"(min/10 = {_fmt(result.suggestion_min_div10)}); configured LR {configured:g}. "
            f"Plot: {details['plot']}"
        )
    steps.append(StepResult("LR range test", None, summary, details))
    # 4. coarse search: a few short runs around the suggestion
    sr = s["search"]
    lrs = sorted({float(f"{center * f:.3g}") for f in sr["lr_factors"]})
    given = sr["weight_decays"]
    wds = [float(w) for w in given] if given is not None else [float(cfg.optimizer.weight_decay)]
    monitor = cfg.get("monitor") or "val/acc"
    mode = cfg.get("monitor_mode", "max")
    grid = [(lr, wd) for lr in lrs for wd in wds]
    rows = []
    for i, (lr, wd) in enumerate(grid, 1):
        row = _trial(cfg, lr, wd, sr, out / "search" / f"lr{lr:g}_wd{wd:g}", monitor)
        _progress(f"coarse search {i}/{len(grid)}", row, monitor)
        rows.append(row)
    ranked = _ranked(rows, monitor, mode)
    best = ranked[0] if ranked else None
    table = _table(rows, ["lr", "weight_decay", monitor, "train/loss", "fit_s"], best)
    if best is None:
        summary = f"No run produced a finite {monitor}."
    else:
        summary = (
            f"{len(rows)} runs of {sr['epochs']} epoch(s) each; best {monitor} = {best[monitor]:.4f} at "
            f"LR {best['lr']:g}, weight decay {best['weight_decay']:g}."
        )
        if best["lr"] in (lrs[0], lrs[-1]) and len(lrs) > 1:
            summary += " The best LR is at the edge of the grid: widen recipe.search.lr_factors."
        suggested = {"optimizer.lr": best["lr"], "optimizer.weight_decay": best["weight_decay"]}
    steps.append(StepResult("coarse search", None, summary, {"rows": rows, "table": table, "best": best}))
    if best is None:
        why = "the coarse search has no run with a finite " + monitor
        steps.append(StepResult("fine search", None, f"Skipped: {why}.", {"mark": "skipped"}))
        steps.append(StepResult("long run", None, f"Skipped: {why}.", {"mark": "skipped"}))
        steps.append(StepResult("diagnosis", None, f"Skipped: {why}.", {"mark": "skipped"}))
        return done()
    # 5. fine search: settings drawn log-uniformly in the region of the best coarse runs, longer runs
    f = s["fine"]
    region = fine_region(rows, monitor, mode, top_k=int(f["top_k"]), factor=float(f["factor"]))
    fine_seed = int(f["seed"]) if f["seed"] is not None else seed
    samples = sample_fine(region, int(f["trials"]), fine_seed)
    fine_rows = []
    for i, (lr, wd) in enumerate(samples, 1):
        row = {"trial": i, **_trial(cfg, lr, wd, f, out / "fine" / f"trial{i:02d}_lr{lr:g}_wd{wd:g}", monitor)}
        _progress(f"fine search {i}/{len(samples)}", row, monitor)
        fine_rows.append(row)
    fine_ranked = _ranked(fine_rows, monitor, mode)
    fine_best = fine_ranked[0] if fine_ranked else None
    wd_text = (
        "weight decay 0 (the top coarse runs all used 0)"
        if region.weight_decay == (0.0, 0.0)
        else f"weight decay [{region.weight_decay[0]:.3g}, {region.weight_decay[1]:.3g}]"
    )
    summary = (
        f"{len(samples)} runs of {f['epochs']} epoch(s) each, LR and weight decay drawn log-uniformly (seed "
        f"{fine_seed}) from the region of the top {len(region.top)} coarse run(s) widened x{f['factor']:g}: "
        f"LR [{region.lr[0]:.3g}, {region.lr[1]:.3g}], {wd_text}; "
    )
    fine_details: dict[str, Any] = {
        "rows": fine_rows,
        "region": region,
        "seed": fine_seed,
        "table": _table(fine_rows, ["trial", "lr", "weight_decay", monitor, "train/loss", "fit_s"], fine_best),
        "best": fine_best,
    }
    if fine_best is None:
        summary += f"no run produced a finite {monitor}."
        steps.append(StepResult("fine search", None, summary, fine_details))
        why = "the fine search has no run with a finite " + monitor
        steps.append(StepResult("long run", None, f"Skipped: {why}.", {"mark": "skipped"}))
        steps.append(StepResult("diagnosis", None, f"Skipped: {why}.", {"mark": "skipped"}))
        return done()
    summary += (
        f"best {monitor} = {fine_best[monitor]:.4f} at LR {fine_best['lr']:g}, weight decay "
        f"{fine_best['weight_decay']:g} (coarse best: {best[monitor]:.4f} in {sr['epochs']} epoch(s))."
    )
    steps.append(StepResult("fine search", None, summary, fine_details))
    suggested = {"optimizer.lr": fine_best["lr"], "optimizer.weight_decay": fine_best["weight_decay"]}
    # 6. long run at the best fine setting, curves recorded per epoch
    lr_, wd_ = float(fine_best["lr"]), float(fine_best["weight_decay"])
    long = s["long_run"]
    metrics, objects = train(_long_run_cfg(cfg, lr_, wd_, long, out))
    curves = _recorded_curves(objects["callbacks"])
    image = out / LONG_RUN_PLOT
    status = metrics.get("status", "ok")
    ran = int(objects["trainer"].current_epoch)  # fewer than asked when a stopping callback ended it
    epochs_text = f"{ran} epoch(s)" if ran == int(long["epochs"]) else f"{ran} of {long['epochs']} epoch(s)"
    summary = (
        f"{epochs_text} at LR {lr_:g}, weight decay {wd_:g}: best {monitor} = "
        f"{metrics.get(f'best/{monitor}', math.nan):.4f}, last val/loss {metrics.get('val/loss', math.nan):.4g}, "
        f"last train/loss {metrics.get('train/loss_epoch', math.nan):.4g} ({metrics['time/fit_s']:.1f} s). "
        f"Curves: {image.name}; run directory {out / 'long_run'}."
    )
    if status == "diverged":
        summary += f" The run DIVERGED at epoch {metrics.get('diverged/epoch')}."
    steps.append(
        StepResult(
            "long run",
            None,
            summary,
            {
                "metrics": metrics,
                "curves": curves,
                "plot": str(image),
                "image": image.name if image.is_file() else None,
                "table": _curves_table(curves),
            },
        )
    )
    suggested["trainer.max_epochs"] = int(long["epochs"])
    # 7. diagnosis of the long run's curves
    th: DiagnoseThresholds = s["diagnose"]
    diagnosis = diagnose(curves, th)
    if status == "diverged" and diagnosis.verdict != "inconclusive":
        diagnosis = Diagnosis(
            "inconclusive",
            f"the run diverged at epoch {metrics.get('diverged/epoch')}",
            "lower the LR (or clip gradients) until the run stays finite, then read the curves again",
            diagnosis.epochs,
            diagnosis.numbers,
            diagnosis.signals,
        )
    summary = f"**{diagnosis.verdict}**: {diagnosis.reason}.\n\nAdvice: {diagnosis.advice}."
    steps.append(
        StepResult(
            "diagnosis",
            None,
            summary,
            {"diagnosis": diagnosis, "table": _diagnosis_table(diagnosis, th), "mark": diagnosis.verdict},
        )
    )
    return done()


#: The long run's curves, next to the report.
LONG_RUN_PLOT = "long_run_curves.png"


def _progress(stage: str, row: Mapping[str, Any], monitor: str) -> None:
    """One line per trial: ``recipe: fine search 3/8: lr 0.0512, weight decay 0.00031 -> val/acc 0.9722 (0.6 s)``."""
    rank_zero_info(
        f"recipe: {stage}: lr {row['lr']:.3g}, weight decay {row['weight_decay']:.3g} -> "
        f"{monitor} {row[monitor]:.4f} ({row['fit_s']:.1f} s)"
    )


def _trial(cfg: DictConfig, lr: float, wd: float, stage: Mapping[str, Any], out: Path, monitor: str) -> dict[str, Any]:
    """One short run at ``(lr, wd)``; its row of the search table."""
    metrics, _ = train(_search_cfg(cfg, lr, wd, stage, out))
    return {
        "lr": lr,
        "weight_decay": wd,
        monitor: metrics.get(f"best/{monitor}", metrics.get(monitor, math.nan)),
        "train/loss": metrics.get("train/loss_epoch", math.nan),
        "fit_s": metrics["time/fit_s"],
    }


def _range_trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The Trainer settings of ``cfg`` that change a training step: device, precision, accumulation, clipping."""
    t = cfg.get("trainer") or {}
    keys = ("accelerator", "precision", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm")
    return {k: t[k] for k in keys if t.get(k) is not None}


def _search_cfg(cfg: DictConfig, lr: float, wd: float, search: Mapping[str, Any], out: Path) -> DictConfig:
    run = copy.deepcopy(cfg)
    with open_dict(run):
        run.optimizer.lr = lr
        run.optimizer.weight_decay = wd
        run.trainer.max_epochs = int(search["epochs"])
        run.trainer.max_steps = -1
        if search["limit_train_batches"] is not None:
            run.trainer.limit_train_batches = search["limit_train_batches"]
        run.trainer.enable_progress_bar = False
        run.trainer.enable_model_summary = False
        run.trainer.enable_checkpointing = False
        run.callbacks = {k: v for k, v in (run.get("callbacks") or {}).items() if k not in SEARCH_DROPS}
        run.logger = {}
        run.test = False
        run.ckpt_path = None
        run.paths.output_dir = str(out)
        run.pop("recipe", None)
    return run


def _long_run_cfg(cfg: DictConfig, lr: float, wd: float, long: Mapping[str, Any], out: Path) -> DictConfig:
    """A search run's config, longer, with the user's loggers, a curve recorder and a line per epoch."""
    run = _search_cfg(cfg, lr, wd, long, out / "long_run")
    with open_dict(run):
        run.logger = copy.deepcopy(cfg.get("logger") or {})
        run.callbacks.curve_plot = {
            "_target_": "lightning_tricks.callbacks.CurvePlot",
            "dirpath": str(out),
            "filename": LONG_RUN_PLOT,
        }
        run.callbacks.epoch_lines = {"_target_": "lightning_tricks.callbacks.EpochLines"}
    return run


def _recorded_curves(callbacks: Sequence[Any]) -> dict[str, list[tuple[float, float]]]:
    """The per-epoch curves the long run's CurvePlot recorded."""
    from lightning_tricks.callbacks import CurvePlot

    plot = next(c for c in callbacks if isinstance(c, CurvePlot))
    return {k: list(v) for k, v in plot.epoch_metrics.items()}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _table(rows: Sequence[Mapping[str, Any]], columns: list[str], best: Mapping[str, Any] | None) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        mark = " **best**" if row is best else ""
        lines.append("| " + " | ".join(cell(row[c]) for c in columns) + f" |{mark}")
    return "\n".join(lines)


def _curves_table(curves: Mapping[str, Sequence[tuple[float, float]]], max_rows: int = 12) -> str:
    """The curves per epoch; longer runs show ``max_rows`` evenly spaced epochs plus the val-loss minimum."""
    columns = [c for c in ("train/loss", "val/loss", "train/acc", "val/acc") if curves.get(c)]
    if not columns:
        return ""
    values = {c: dict(curves[c]) for c in columns}
    epochs = sorted({e for c in columns for e in values[c]})
    if len(epochs) > max_rows:
        keep = {epochs[round(i * (len(epochs) - 1) / (max_rows - 1))] for i in range(max_rows)}
        if "val/loss" in values:
            keep.add(min(values["val/loss"], key=lambda e: values["val/loss"][e]))
        epochs = sorted(keep)
    lines = ["| epoch | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for e in epochs:
        cells = [f"{values[c][e]:.4g}" if e in values[c] else "" for c in columns]
        lines.append(f"| {e:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _diagnosis_table(d: Diagnosis, t: DiagnoseThresholds) -> str:
    """The measures, each beside the rule it is held to."""
    if not d.numbers:
        return ""
    n = d.numbers
    w = int(n["window"])
    end = "last epoch" if w == 1 else f"mean of the last {w} epochs"
    low_at = (
        f"epoch {n['min_val_loss_epoch']:g}"
        if w == 1
        else f"epochs {n['min_val_loss_epoch'] - w + 1:g}-{n['min_val_loss_epoch']:g}"
    )
    rows = []
    if "acc_gap" in n:
        rows.append((f"train acc ({end})", f"{n['train_acc']:.4f}", f"underfitting if < {t.min_train_acc:g}"))
        rows.append((f"val acc ({end})", f"{n['val_acc']:.4f}", ""))
        rows.append(
            ("acc gap (train - val)", f"{100 * n['acc_gap']:.1f} pp", f"overfitting if > {100 * t.max_acc_gap:g} pp")
        )
    rows.append((f"train loss ({end})", f"{n['train_loss']:.4g}", ""))
    rows.append((f"val loss ({end})", f"{n['val_loss']:.4g}", ""))
    rows.append(("loss gap (val - train)", f"{n['loss_gap']:.4g}", "reported only"))
    rows.append(("lowest val loss", f"{n['min_val_loss']:.4g} ({low_at})", ""))
    rows.append(("val loss rise from its lowest", _pct(n["val_rise"]), f"overfitting if > {_pct(t.max_val_rise)}"))
    rows.append(
        (
            f"val loss fall from the {w} epoch(s) before",
            _pct(n["val_fall"]),
            f"underfitting if > {_pct(t.still_falling)} and at its lowest",
        )
    )
    lines = ["| measure | value | rule |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


@hydra.main(config_path=config_dir(), config_name="recipe", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Run :func:`run_recipe`, print the report; config errors end in one line (exit status 2)."""
    try:
        report = run_recipe(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"lightning-tricks recipe: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report.render())
    print(f"\n(report written to {Path(report.output_dir) / 'recipe_report.md'})")


if __name__ == "__main__":
    main()
