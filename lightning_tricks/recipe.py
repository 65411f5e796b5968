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

:func:`run_recipe` runs the four steps on a config composed from ``conf/`` (the same groups and
overrides as ``lightning_tricks.train``) and returns a :class:`RecipeReport`; :func:`main` is the
Hydra entry, which prints the report, writes it to ``<output_dir>/recipe_report.md`` and suggests the
overrides for a full run. The recipe's own settings are the ``recipe`` block (:data:`RECIPE_DEFAULTS`),
overridable on the command line::

    python -m lightning_tricks.recipe                                  # digits + MLP, ~1 min on a CPU
    python -m lightning_tricks.recipe model=resnet optimizer=adamw recipe.search.epochs=3
    python -m lightning_tricks.recipe recipe.search.weight_decays=[0,5e-4,5e-3] recipe.lr_range.num_steps=200

What comes after (train longer without decay, watch the curves and the update/weight ratio with
:class:`~lightning_tricks.callbacks.UpdateRatioMonitor`) is a normal ``lightning_tricks.train`` run
with the suggested overrides.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_tricks._lightning import seed_everything
from lightning_tricks.callbacks.lr_range_test import lr_range_test
from lightning_tricks.mixins import Classifier
from lightning_tricks.sanity import initial_loss, overfit_check, take_samples
from lightning_tricks.train import (
    ConfigError,
    _output_dir,
    build_data_and_module,
    config_dir,
    train,
)

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
    "stop_on_failure": False,  # stop after a failed initial-loss or overfit check
}

# the entry's primary config: everything in conf/train.yaml plus the recipe block
ConfigStore.instance().store(name="recipe", node={"defaults": ["train", "_self_"], "recipe": RECIPE_DEFAULTS})

#: Callback entries that the short search runs leave out (files and checks, not training behaviour).
SEARCH_DROPS = ("model_checkpoint", "curve_plot", "lr_range_test", "initial_loss_check", "overfit_check")


@dataclasses.dataclass
class StepResult:
    """One step of the recipe: ``passed`` is None for steps that measure rather than check."""

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
            mark = {True: "ok", False: "FAILED", None: "done"}[s.passed]
            lines.append(f"## {i}. {s.name}: {mark}")
            lines.append("")
            lines.append(s.summary)
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
            "Next: train longer with these settings, watch the curves (curves.png) and the update/weight "
            "ratio (+callbacks=update_ratio_monitor, healthy ~1e-3).",
        ]
        return "\n".join(lines)


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
    """Run the four steps on the model and data of ``cfg`` and return the report (see the module doc)."""
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
    result = lr_range_test(
        module,
        datamodule,
        min_lr=float(r["min_lr"]),
        max_lr=float(r["max_lr"]),
        num_steps=int(r["num_steps"]),
        smooth=float(r["smooth"]),
        diverge_threshold=float(r["diverge_threshold"]),
        plot_path=out / "lr_range_test.png",
        trainer_kwargs=_range_trainer_kwargs(cfg),
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
    rows = []
    for lr in lrs:
        for wd in wds:
            run_cfg = _search_cfg(cfg, lr, wd, sr, out / "search" / f"lr{lr:g}_wd{wd:g}")
            metrics, _ = train(run_cfg)
            value = metrics.get(f"best/{monitor}", metrics.get(monitor, math.nan))
            rows.append(
                {
                    "lr": lr,
                    "weight_decay": wd,
                    monitor: value,
                    "train/loss": metrics.get("train/loss_epoch", math.nan),
                    "fit_s": metrics["time/fit_s"],
                }
            )
    finite = [row for row in rows if math.isfinite(row[monitor])]
    sign = 1 if mode == "max" else -1
    best = max(finite, key=lambda row: sign * row[monitor]) if finite else None
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
    steps.append(StepResult("coarse search", None, summary, {"rows": rows, "table": table}))
    return done()


def _range_trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The Trainer settings of ``cfg`` that change a training step: device, precision, accumulation, clipping."""
    t = cfg.get("trainer") or {}
    keys = ("accelerator", "precision", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm")
    return {k: t[k] for k in keys if t.get(k) is not None}


def _search_cfg(cfg: DictConfig, lr: float, wd: float, search: dict[str, Any], out: Path) -> DictConfig:
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


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _table(rows: list[dict[str, Any]], columns: list[str], best: dict[str, Any] | None) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        mark = " **best**" if row is best else ""
        lines.append("| " + " | ".join(cell(row[c]) for c in columns) + f" |{mark}")
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
