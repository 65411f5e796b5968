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
import logging
import math
import os
import sys
import time
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
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
    rank_zero_warn,
    seed_everything,
)
from lightning_tricks.callbacks.progress import EpochLines
from lightning_tricks.data import DataFileError
from lightning_tricks.launch import child_argv, ddp_job, global_rank, slurm_dir_overrides, spawns_ranks
from lightning_tricks.mixins import Classifier
from lightning_tricks.sanity import Diverged


def _unique_id() -> str:
    """Six hex digits, new per process: ``${lt_uid:}`` in ``hydra.run.dir`` / ``hydra.sweep.dir``.

    Registered with ``use_cache=True``: every job of a sweep (Hydra copies the resolver cache to the jobs'
    configs) and every DDP rank (Lightning passes the resolved ``hydra.run.dir`` to child ranks) sees the
    same value, while two runs started in the same second get different directories.
    """
    return uuid.uuid4().hex[:6]


if not OmegaConf.has_resolver("lt_uid"):
    OmegaConf.register_new_resolver("lt_uid", _unique_id, use_cache=True)


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


def _check_fresh(out: Path, ckpt_path: Any) -> None:
    """Refuse to write a new run into a directory that holds another run's results (resume continues in place)."""
    if ckpt_path:
        return
    found = [
        p.name
        for p in (out / "metrics.json", out / "checkpoints")
        if p.exists() and (p.is_file() or any(p.glob("*.ckpt")))
    ]
    if found:
        raise ConfigError(
            f"run directory {out} already holds a run ({', '.join(found)}); start a new run in a new "
            f"directory (drop hydra.run.dir / paths.output_dir) or resume this one with "
            f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"
        )


def _check_trainer_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Trainer values that Lightning would only reject mid-run (or with an unrelated error), checked now."""
    for key in (
        "max_epochs",
        "min_epochs",
        "max_steps",
        "min_steps",
        "accumulate_grad_batches",
        "check_val_every_n_epoch",
        "log_every_n_steps",
        "num_nodes",
        "num_sanity_val_steps",
    ):
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"trainer.{key} must be an int, got {value!r}")
    max_epochs = kwargs.get("max_epochs")
    if max_epochs is not None and max_epochs != -1 and max_epochs < 1:
        raise ConfigError(
            f"trainer.max_epochs must be >= 1 (or -1 for a run bounded by trainer.max_steps), got {max_epochs}"
        )
    if kwargs.get("accumulate_grad_batches", 1) < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches must be >= 1, got {kwargs['accumulate_grad_batches']}")
    accelerator = str(kwargs.get("accelerator", "auto"))
    if kwargs.get("sync_batchnorm") not in (None, True, False):
        raise ConfigError(f"trainer.sync_batchnorm must be true, false or auto, got {kwargs['sync_batchnorm']!r}")
    if kwargs.get("sync_batchnorm") and _on_cpu(kwargs):
        raise ConfigError(
            f"trainer.sync_batchnorm=true needs GPUs, but the run is on the CPU "
            f"(trainer.accelerator={accelerator}); add trainer.sync_batchnorm=false (or auto)"
        )


def _on_cpu(kwargs: Mapping[str, Any]) -> bool:
    accelerator = str(kwargs.get("accelerator", "auto"))
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def _resolve_auto(kwargs: dict[str, Any]) -> None:
    """``sync_batchnorm: auto`` (``trainer=ddp``): on where it works (GPUs), off on the CPU (gloo has no SyncBN)."""
    if kwargs.get("sync_batchnorm") == "auto":
        kwargs["sync_batchnorm"] = not _on_cpu(kwargs)


def _job_config(cfg: DictConfig) -> Path | None:
    """The saved config of this Hydra job, for the DDP ranks it spawns (saved here if Hydra saved none)."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.output_subdir is not None and (job_dir / hydra_cfg.output_subdir / "config.yaml").is_file():
        return job_dir / hydra_cfg.output_subdir / "config.yaml"
    path = job_dir / "ddp_job.yaml"
    OmegaConf.save(cfg, path)
    return path


TEST_WEIGHTS = ("final", "best")


def _check_run_options(cfg: DictConfig, callbacks: list[Callback], trainer_kwargs: Mapping[str, Any]) -> None:
    """``test_weights`` and ``ckpt_path`` checked before training, each with one line naming the value."""
    test_weights = cfg.get("test_weights", "final")
    if test_weights not in TEST_WEIGHTS:
        raise ConfigError(f"test_weights must be one of {TEST_WEIGHTS}, got {test_weights!r}")
    if cfg.get("test", True) and test_weights == "best":
        checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
        if checkpoint is None or checkpoint.monitor != cfg.get("monitor"):
            raise ConfigError(
                f"test_weights=best needs a ModelCheckpoint monitoring {cfg.get('monitor')!r} "
                "(callbacks.model_checkpoint); add it back or use test_weights=final"
            )
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        _check_checkpoint(Path(str(ckpt_path)), cfg, trainer_kwargs)


def _check_checkpoint(path: Path, cfg: DictConfig, trainer_kwargs: Mapping[str, Any]) -> None:
    if not path.is_file():
        raise ConfigError(f"ckpt_path={path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means: not a checkpoint we can resume
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"ckpt_path={path} is not a readable Lightning checkpoint ({reason})") from e
    if not isinstance(ckpt, dict) or not {"state_dict", "loops", "optimizer_states"} <= set(ckpt):
        raise ConfigError(
            f"ckpt_path={path} is not a Lightning training checkpoint (no state_dict/loops/optimizer "
            "states); to start from weights only, load them into the module instead"
        )
    saved = ((ckpt.get("hyper_parameters") or {}).get("optimizer") or {}).get("name")
    wanted = str(cfg.optimizer.get("name", "sgd")).lower() if cfg.get("optimizer") else None
    if saved and wanted and str(saved).lower() != wanted:
        raise ConfigError(
            f"ckpt_path={path} was trained with optimizer {saved!r}, this run uses {wanted!r}: its "
            f"optimizer state cannot be resumed; add optimizer={saved} (and the run's other overrides)"
        )
    processed = ckpt["loops"].get("fit_loop", {}).get("epoch_progress", {}).get("current", {}).get("processed", 0)
    max_epochs, max_steps = trainer_kwargs.get("max_epochs"), trainer_kwargs.get("max_steps")
    if (max_epochs is not None and max_epochs > 0 and processed >= max_epochs) or (
        max_steps is not None and max_steps > 0 and ckpt.get("global_step", 0) >= max_steps
    ):
        raise ConfigError(
            f"ckpt_path={path} is from a finished run ({processed} epoch(s), {ckpt.get('global_step')} "
            f"steps; this run stops at trainer.max_epochs={max_epochs}, trainer.max_steps={max_steps}): "
            "nothing to resume; raise trainer.max_epochs to train further"
        )


def build_data_and_module(cfg: DictConfig) -> tuple[Any, Classifier]:
    """The DataModule (data files checked now, with their path) and the Classifier for ``cfg``."""
    datamodule = _instantiate(cfg.data, "data")
    datamodule.prepare_data()  # fails now, with the path, if files are missing
    try:
        datamodule.setup("fit")  # splits, label range and a training split of at least one batch: checked now
    except ValueError as e:
        raise ConfigError(f"data: {e}") from e
    net = _instantiate(cfg.model, "model", input_shape=datamodule.input_shape, num_classes=datamodule.num_classes)
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    try:
        module = Classifier(
            net,
            num_classes=datamodule.num_classes,
            optimizer=optimizer,  # type: ignore[arg-type]
            label_smoothing=float(cfg.module.label_smoothing),
            tta=str(cfg.module.get("tta", "none")),
        )
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
    return [
        _instantiate(entry, f"logger.{name}") for name, entry in (cfg.get("logger") or {}).items() if entry is not None
    ]


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Seed, build data/model/module/callbacks/loggers/Trainer from ``cfg``, fit, test, summarize.

    Returns ``metrics`` (floats: the monitored metric's best value as ``"best/<monitor>"``, final
    validation and test metrics, ``"time/fit_s"``) and ``objects`` (``cfg``, ``datamodule``, ``module``,
    ``trainer``, ``callbacks``, ``output_dir``).
    """
    if cfg.get("seed") is not None:
        seed_everything(int(cfg.seed), workers=True)
    out = _output_dir(cfg)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # a child rank joins its parent's job, in its directory
        _check_fresh(out, cfg.get("ckpt_path"))
    datamodule, module = build_data_and_module(cfg)
    callbacks = build_callbacks(cfg)
    loggers = build_loggers(cfg)
    trainer_kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    assert isinstance(trainer_kwargs, dict)
    trainer_kwargs.setdefault("default_root_dir", str(out))
    if trainer_kwargs.get("enable_progress_bar", True) and not sys.stdout.isatty():
        # a log file, not a terminal: one line per epoch instead of progress-bar frames
        trainer_kwargs["enable_progress_bar"] = False
        callbacks.append(EpochLines())
    _resolve_auto(trainer_kwargs)
    _check_trainer_kwargs(trainer_kwargs)
    _check_run_options(cfg, callbacks, trainer_kwargs)
    trainer = Trainer(**trainer_kwargs, callbacks=callbacks, logger=loggers or False)
    spawning = spawns_ranks(trainer) and global_rank(os.environ) == 0 and os.environ.get("LOCAL_RANK", "0") == "0"
    with ddp_job(trainer, _job_config(cfg) if spawning else None):
        metrics = _fit_and_test(cfg, trainer, module, datamodule, callbacks)
    if trainer.is_global_zero:
        _write_metrics(out, metrics)
    objects = {
        "cfg": cfg,
        "datamodule": datamodule,
        "module": module,
        "trainer": trainer,
        "callbacks": callbacks,
        "output_dir": out,
    }
    rank_zero_info(summary(metrics, cfg.get("monitor"), out, trainer))
    return metrics, objects


def _fit_and_test(
    cfg: DictConfig, trainer: Trainer, module: Classifier, datamodule: Any, callbacks: list[Callback]
) -> dict[str, Any]:
    """Fit, then test unless the run diverged; the metrics of :func:`train` (one job, all its ranks)."""
    t0 = time.perf_counter()
    diverged: Diverged | None = None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except Diverged as e:  # DivergenceGuard stopped it: averages and checkpoints are still finite
        diverged = e
        rank_zero_warn(str(e))
    fit_s = time.perf_counter() - t0
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["time/fit_s"] = fit_s
    monitor = cfg.get("monitor")
    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    if diverged is not None:
        metrics.update({"status": "diverged", "diverged/step": diverged.step, "diverged/epoch": diverged.epoch})
        if monitor:
            metrics[f"best/{monitor}"] = worst_value(cfg.get("monitor_mode", "max"))
    else:
        metrics["status"] = "ok"
        if monitor:
            if monitor not in metrics:
                raise ConfigError(f"monitor={monitor!r} was never logged; logged metrics: {sorted(metrics)}")
            best = checkpoint.best_model_score if checkpoint is not None and checkpoint.monitor == monitor else None
            metrics[f"best/{monitor}"] = float(best) if best is not None else metrics[monitor]
        if cfg.get("test", True):
            ckpt = "best" if cfg.get("test_weights", "final") == "best" else None
            for result in trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False):
                metrics.update({k: float(v) for k, v in result.items()})
    metrics["world_size"] = trainer.world_size
    return metrics


def worst_value(mode: str) -> float:
    """The value a sweeper ranks last for a monitor of this mode (what a diverged job returns)."""
    return -math.inf if mode == "max" else math.inf


def _write_metrics(out: Path, metrics: Mapping[str, Any]) -> None:
    """``metrics.json`` in the run directory: the job's overrides and results, read by sweep summaries."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    record = {"overrides": overrides, "metrics": dict(metrics)}
    (out / "metrics.json").write_text(json.dumps(record, indent=1, default=float))


def summary(metrics: Mapping[str, Any], monitor: str | None, out: Path, trainer: Trainer) -> str:
    """One screen: best/final metrics, wall time, where the run's files are."""
    lines = ["", "=" * 72, "lightning-tricks run summary", "-" * 72]
    if metrics.get("status") == "diverged":
        lines.append(
            f"DIVERGED at optimizer step {metrics['diverged/step']} (epoch {metrics['diverged/epoch']}): "
            "no test, the job ranks last in sweeps"
        )
    elif monitor and f"best/{monitor}" in metrics:
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
def _hydra_main(cfg: DictConfig) -> float | None:
    """Run :func:`train`; return the monitored metric for sweepers. Config errors end in one line."""
    try:
        metrics, _ = train(cfg)
    except (ConfigError, DataFileError, FileNotFoundError, MisconfigurationException) as e:
        print(f"lightning-tricks: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    monitor = cfg.get("monitor")
    return metrics.get(f"best/{monitor}") if monitor else None


def null_groups_removed(args: list[str]) -> list[str]:
    """``GROUP=null`` (Hydra refuses null for a config group) read as ``~GROUP``, removing the group.

    Example:
        >>> null_groups_removed(["schedule=null", "optimizer.lr=0.1", "logger=None"])
        ['~schedule', 'optimizer.lr=0.1', '~logger']
    """
    groups = {p.name for p in Path(config_dir()).iterdir() if p.is_dir()}
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        out.append(
            f"~{key}"
            if sep
            and key in groups
            and value.lower() in ("null", "none")
            and not (Path(config_dir()) / key / f"{value}.yaml").is_file()
            else arg
        )
    return out


def quiet_third_party() -> None:
    """What only the entry points filter: Lightning's advertising tip and third-party deprecation
    warnings a user cannot act on. A user's own Trainer is left alone (this runs only in ``main``)."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main() -> None:
    """``python -m lightning_tricks.train`` / ``lightning-tricks-train``: Hydra's command line."""
    quiet_third_party()
    child = child_argv(os.environ)
    if child is not None:  # a DDP rank started by a job of this program: run that job, never a sweep of its own
        sys.argv = [sys.argv[0], *child]
    else:
        args = null_groups_removed(sys.argv[1:])
        sys.argv = [sys.argv[0], *args, *slurm_dir_overrides(os.environ, args)]
    _hydra_main()


if __name__ == "__main__":
    main()
