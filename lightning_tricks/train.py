"""Hydra entry point: ``python -m lightning_tricks.train [overrides]`` or ``lightning-tricks-train``.

:func:`train` is an ordinary function of a composed config and returns ``(metrics, objects)``, so tests
and notebooks call it directly; :func:`main` is the thin Hydra wrapper that returns the monitored
metric for sweepers (``--multirun`` with the basic or Optuna sweeper).

Examples:
    python -m lightning_tricks.train                               # digits, MLP, ~10 s on a CPU
    python -m lightning_tricks.train optimizer=adamw optimizer.lr=3e-3 +callbacks=ema
    python -m lightning_tricks.train data=fashion_mnist data.data_dir=/data/fashion model=resnet
    python -m lightning_tricks.train --multirun optimizer.lr=0.01,0.1 model.norm=classic,ic
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_tricks._lightning import (
    Callback,
    MisconfigurationException,
    ModelCheckpoint,
    Trainer,
    rank_zero_info,
    seed_everything,
)
from lightning_tricks.mixins import Classifier


def config_dir() -> str:
    """The folder of the shipped Hydra configs (inside the wheel, or ``conf/`` of a source checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"lightning_tricks configs not found next to {here} (looked for conf/train.yaml)")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names it and what is allowed."""


def _instantiate(cfg: Any, what: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with the user's error (bad value) brought to the top."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, (ValueError, TypeError, FileNotFoundError)):
            raise ConfigError(f"{what}: {cause}") from cause
        raise


def _output_dir(cfg: DictConfig) -> Path:
    try:
        out = cfg.paths.output_dir
    except Exception:  # noqa: BLE001 - ${hydra:...} is unresolvable outside a Hydra run
        out = None
    if not out:
        out = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "outputs/run"
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_data_and_module(cfg: DictConfig) -> tuple[Any, Classifier]:
    """The DataModule (data files checked now, with their path) and the Classifier for ``cfg``."""
    datamodule = _instantiate(cfg.data, "data")
    datamodule.prepare_data()  # fails now, with the path, if files are missing
    net = _instantiate(cfg.model, "model", input_shape=datamodule.input_shape, num_classes=datamodule.num_classes)
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    try:
        module = Classifier(net, num_classes=datamodule.num_classes, optimizer=optimizer,  # type: ignore[arg-type]
                            label_smoothing=float(cfg.module.label_smoothing))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return datamodule, module


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """The named callback entries of ``cfg.callbacks`` (null entries skipped), then ``cfg.schedule``."""
    callbacks = []
    for name, entry in (cfg.get("callbacks") or {}).items():
        if entry is None:
            continue
        if "_target_" not in entry:
            raise ConfigError(f"callbacks.{name} has no _target_; each callback entry must name its class")
        callbacks.append(_instantiate(entry, f"callbacks.{name}"))
    if cfg.get("schedule"):
        callbacks.append(_instantiate(cfg.schedule, "schedule"))
    return callbacks


def build_loggers(cfg: DictConfig) -> list[Any]:
    return [_instantiate(entry, f"logger.{name}") for name, entry in (cfg.get("logger") or {}).items()
            if entry is not None]


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Seed, build data/model/module/callbacks/loggers/Trainer from ``cfg``, fit, test, summarize.

    Returns ``metrics`` (floats: the monitored metric's best value as ``"best/<monitor>"``, final
    validation and test metrics, ``"time/fit_s"``) and ``objects`` (``cfg``, ``datamodule``, ``module``,
    ``trainer``, ``callbacks``, ``output_dir``).
    """
    if cfg.get("seed") is not None:
        seed_everything(int(cfg.seed), workers=True)
    out = _output_dir(cfg)
    datamodule, module = build_data_and_module(cfg)
    callbacks = build_callbacks(cfg)
    loggers = build_loggers(cfg)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_kwargs, dict)
    trainer_kwargs.setdefault("default_root_dir", str(out))
    trainer = Trainer(**trainer_kwargs, callbacks=callbacks, logger=loggers or False)

    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_s = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["time/fit_s"] = fit_s
    monitor = cfg.get("monitor")
    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    if monitor:
        if monitor not in metrics:
            raise ConfigError(f"monitor={monitor!r} was never logged; logged metrics: {sorted(metrics)}")
        best = checkpoint.best_model_score if checkpoint is not None and checkpoint.monitor == monitor else None
        metrics[f"best/{monitor}"] = float(best) if best is not None else metrics[monitor]
    if cfg.get("test", True):
        ckpt = "best" if cfg.get("test_weights", "final") == "best" else None
        if ckpt == "best" and not (checkpoint and checkpoint.best_model_path):
            raise ConfigError("test_weights=best needs a ModelCheckpoint with a monitor (callbacks.model_checkpoint)")
        for result in trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False):
            metrics.update({k: float(v) for k, v in result.items()})
    if trainer.is_global_zero:
        _write_metrics(out, metrics)
    objects = {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer,
               "callbacks": callbacks, "output_dir": out}
    rank_zero_info(summary(metrics, monitor, out, trainer))
    return metrics, objects


def _write_metrics(out: Path, metrics: Mapping[str, float]) -> None:
    """``metrics.json`` in the run directory: the job's overrides and results, read by sweep summaries."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    record = {"overrides": overrides, "metrics": dict(metrics)}
    (out / "metrics.json").write_text(json.dumps(record, indent=1, default=float))


def summary(metrics: Mapping[str, float], monitor: str | None, out: Path, trainer: Trainer) -> str:
    """One screen: best/final metrics, wall time, where the run's files are."""
    lines = ["", "=" * 72, "lightning-tricks run summary", "-" * 72]
    if monitor and f"best/{monitor}" in metrics:
        lines.append(f"best {monitor:<24} {metrics[f'best/{monitor}']:.4f}")
    for key in sorted(metrics):
        if key.startswith(("val/", "test/")) and not key.endswith("_step"):
            # val/*: the last validation during fit; test/*: the weights fit ended with (EMA, restore-best)
            label = "last" if key.startswith("val/") else "final"
            lines.append(f"{label} {key:<{28 - len(label)}} {metrics[key]:.4f}")
    fit_s = metrics.get("time/fit_s", math.nan)
    lines.append(f"epochs {trainer.current_epoch:<22} steps {trainer.global_step}   fit wall time {fit_s:.1f} s")
    lines.append(f"run directory  {out}")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.suffix in (".png", ".csv", ".ckpt"))
    for f in files[:8]:
        lines.append(f"  {f}")
    if len(files) > 8:
        lines.append(f"  ... and {len(files) - 8} more")
    lines.append("=" * 72)
    return "\n".join(lines)


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run :func:`train`; return the monitored metric for sweepers. Config errors end in one line."""
    try:
        metrics, _ = train(cfg)
    except (ConfigError, FileNotFoundError, MisconfigurationException) as e:
        print(f"lightning-tricks: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    monitor = cfg.get("monitor")
    return metrics.get(f"best/{monitor}") if monitor else None


if __name__ == "__main__":
    main()
