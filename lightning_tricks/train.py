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
    PLEarlyStopping,
    Trainer,
    rank_zero_info,
    rank_zero_warn,
    seed_everything,
)
from lightning_tricks.callbacks.preemption import PreemptionCheckpoint, is_sigterm_stop
from lightning_tricks.callbacks.progress import EpochLines
from lightning_tricks.data import DataFileError
from lightning_tricks.launch import child_argv, ddp_job, global_rank, slurm_dir_overrides, spawns_ranks
from lightning_tricks.mixins import Classifier
from lightning_tricks.nn import fit_patch_whitening
from lightning_tricks.refit import REFIT_MODES, mean_loss, merge_splits, refit_epochs
from lightning_tricks.resume import resume_differences, saved_config_path
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


def _check_run_length(kwargs: Mapping[str, Any]) -> None:
    """A run with no training step, or one with no end, said before anything else blames its length."""
    limit = kwargs.get("limit_train_batches")
    if limit is not None and not isinstance(limit, bool) and limit == 0:
        raise ConfigError("trainer.limit_train_batches=0 runs no training step; use a positive number or fraction")
    max_steps = kwargs.get("max_steps")
    if kwargs.get("max_epochs") == -1 and (max_steps is None or max_steps < 1):
        raise ConfigError(
            "trainer.max_epochs=-1 makes a run without an end unless trainer.max_steps is set; "
            f"give trainer.max_steps > 0 (got {max_steps}) or a number of epochs"
        )


def _monitors(cfg: DictConfig, callbacks: list[Callback]) -> list[tuple[str, str]]:
    """``(who, metric)`` for the run's monitor and every callback's ``monitor``."""
    found = [(f"monitor={cfg.monitor!r}", str(cfg.monitor))] if cfg.get("monitor") else []
    for callback in callbacks:
        metric = getattr(callback, "monitor", None)
        if isinstance(metric, str) and metric:
            found.append((f"{type(callback).__name__}(monitor={metric!r})", metric))
    return found


def _check_validation(
    cfg: DictConfig, datamodule: Any, callbacks: list[Callback], trainer_kwargs: Mapping[str, Any]
) -> None:
    """A monitor on validation metrics needs a validation split and validation batches."""
    val_monitors = [(who, m) for who, m in _monitors(cfg, callbacks) if m.startswith("val")]
    if not val_monitors:
        return
    who = val_monitors[0][0]
    splits = getattr(datamodule, "splits", None)
    if isinstance(splits, Mapping) and "val" in splits and len(splits["val"][1]) == 0:
        raise ConfigError(
            f"the validation split is empty (data.val_fraction={cfg.data.get('val_fraction')}), but {who} is a "
            "validation metric; give data.val_fraction > 0, or monitor a training metric (monitor=train/loss_epoch "
            "monitor_mode=min)"
        )
    limit = trainer_kwargs.get("limit_val_batches")
    if limit is not None and not isinstance(limit, bool) and limit == 0:
        raise ConfigError(f"trainer.limit_val_batches=0 runs no validation, but {who} is a validation metric")


def _check_training_monitors(callbacks: list[Callback], module: Any) -> None:
    """A criterion's training metric (PQ's ``train_monitor``) must be one the module logs in training: otherwise
    Lightning's loop would find it missing only at the end of the first strip of epochs."""
    logged = getattr(module, "training_metrics", None)
    if not logged:
        return
    for callback in callbacks:
        metric = getattr(getattr(callback, "criterion", None), "train_monitor", None)
        if isinstance(metric, str) and metric not in logged:
            raise ConfigError(
                f"{type(callback).__name__}: the criterion's train_monitor={metric!r} is never logged; "
                f"the module logs {list(logged)} in training"
            )


class MonitorsLogged(Callback):
    """After the sanity check (a validation before training), every monitor on ``val*`` must have been logged.

    Lightning's early stopping and checkpointing find a missing monitor only after the first epoch; here it
    is refused before the first step, in one line with the metrics that were logged.
    """

    def __init__(self, monitors: list[tuple[str, str]]) -> None:
        self.monitors = [(who, metric) for who, metric in monitors if metric.startswith("val")]

    def on_sanity_check_end(self, trainer: Trainer, pl_module: Any) -> None:
        logged = sorted(k for k in trainer.callback_metrics if k.startswith("val"))
        if not logged:  # the module logs nothing in validation (or the sanity check ran no batch)
            return
        for who, metric in self.monitors:
            if metric not in logged:
                raise ConfigError(f"{who} was never logged; validation logs {logged}")


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


def _check_run_options(
    cfg: DictConfig, callbacks: list[Callback], trainer_kwargs: Mapping[str, Any], module: Any = None
) -> None:
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
        _check_checkpoint(Path(str(ckpt_path)), cfg, trainer_kwargs, module)


def _check_checkpoint(path: Path, cfg: DictConfig, trainer_kwargs: Mapping[str, Any], module: Any = None) -> None:
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
    if module is not None:
        _check_shapes(path, ckpt["state_dict"], module.state_dict())
    _check_config_changes(path, cfg, ckpt)


def _check_shapes(path: Path, saved: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """The checkpoint's weights fit the model: the first parameter that does not, in one line."""
    for name, tensor in expected.items():
        if name not in saved:
            raise ConfigError(f"ckpt_path={path} is of another model: it has no parameter {name} {tuple(tensor.shape)}")
        shape = tuple(getattr(saved[name], "shape", ()))
        if shape != tuple(tensor.shape):
            raise ConfigError(
                f"ckpt_path={path} is of another model: {name} is {shape} in the checkpoint, "
                f"{tuple(tensor.shape)} in this model"
            )
    extra = next((name for name in saved if name not in expected), None)
    if extra is not None:
        raise ConfigError(
            f"ckpt_path={path} is of another model: it has {extra} {tuple(getattr(saved[extra], 'shape', ()))}, "
            "which this model does not"
        )


def _mid_epoch(ckpt: Mapping[str, Any]) -> bool:
    """Whether the checkpoint was written inside an epoch: batches of it ran and the last one had not."""
    progress = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    return bool(progress.get("current", {}).get("ready", 0)) and not progress.get("is_last_batch", True)


class RunConfigRecord(Callback):
    """The run's composed config (unresolved YAML) in every checkpoint: what a resume compares its config with.

    Kept in the checkpoint rather than read from the run's ``.hydra/config.yaml``, which Hydra rewrites with
    the new config when a run is resumed in its own directory (``hydra.run.dir=<the run>``).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.config = OmegaConf.to_yaml(cfg, resolve=False)

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the resumed run records its own config."""


def _saved_config(path: Path, ckpt: Mapping[str, Any]) -> Any:
    """The config of the run that wrote the checkpoint: recorded in it, else the run directory's Hydra copy."""
    recorded = (ckpt.get("callbacks") or {}).get(RunConfigRecord.__name__, {}).get("config")
    source = f"the config recorded in {path}" if recorded else str(saved_config_path(path))
    try:
        if recorded:
            return OmegaConf.to_container(OmegaConf.create(recorded), resolve=False)
        saved_path = saved_config_path(path)
        return None if saved_path is None else OmegaConf.to_container(OmegaConf.load(saved_path), resolve=False)
    except Exception:  # noqa: BLE001 - a damaged saved config only costs the comparison
        rank_zero_warn(f"resume: {source} could not be read; the config changes since the checkpoint are not shown")
        return None


def _check_config_changes(path: Path, cfg: DictConfig, ckpt: Mapping[str, Any]) -> None:
    """One line per difference from the checkpoint's config: what is kept, what is taken; refuse what cannot be."""
    saved = _saved_config(path, ckpt)
    if saved is None:
        return
    new = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(saved, dict) and isinstance(new, dict)
    notes, refusals = resume_differences(saved, new, mid_epoch=_mid_epoch(ckpt))
    if refusals:
        raise ConfigError(f"ckpt_path={path}: {refusals[0]}")
    for line in notes:
        rank_zero_info(f"resume: {line}")


def build_data_and_module(cfg: DictConfig) -> tuple[Any, Classifier]:
    """The DataModule (data files checked now, with their path) and the Classifier for ``cfg``."""
    datamodule = _instantiate(cfg.data, "data")
    datamodule.prepare_data()  # fails now, with the path, if files are missing
    try:
        datamodule.setup("fit")  # splits, label range and a training split of at least one batch: checked now
    except ValueError as e:
        raise ConfigError(f"data: {e}") from e
    net = _instantiate(cfg.model, "model", input_shape=datamodule.input_shape, num_classes=datamodule.num_classes)
    fit_patch_whitening(net, datamodule.splits["train"][0])  # model.whiten: from training images only
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
    _check_run_length(trainer_kwargs)
    _check_validation(cfg, datamodule, callbacks, trainer_kwargs)
    _check_run_options(cfg, callbacks, trainer_kwargs, module)
    _check_training_monitors(callbacks, module)
    refusal = _check_refit(cfg, datamodule, callbacks)
    if refusal:
        raise ConfigError(refusal)
    if trainer_kwargs.get("enable_checkpointing", True) is not False:
        checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
        dirpath = checkpoint.dirpath if checkpoint is not None and checkpoint.dirpath else out / "checkpoints"
        callbacks.append(PreemptionCheckpoint(dirpath))  # last: after the callbacks that update at a batch's end
    callbacks.append(MonitorsLogged(_monitors(cfg, callbacks)))
    callbacks.append(RunConfigRecord(cfg))
    trainer = Trainer(**trainer_kwargs, callbacks=callbacks, logger=loggers or False)
    spawning = spawns_ranks(trainer) and global_rank(os.environ) == 0 and os.environ.get("LOCAL_RANK", "0") == "0"
    with ddp_job(trainer, _job_config(cfg) if spawning else None):
        metrics = _fit_and_test(cfg, trainer, module, datamodule, callbacks)
    if metrics.get("status") == "ok" and _refit_mode(cfg) != "none":
        first = {"datamodule": datamodule, "module": module, "callbacks": callbacks, "output_dir": out}
        metrics.update(_fit_refit(cfg, first))
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


def _fit(cfg: DictConfig, trainer: Trainer, module: Classifier, datamodule: Any) -> Diverged | None:
    """``trainer.fit``; a divergence is returned, a callback's refusal before the first step is a ConfigError."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except Diverged as e:  # DivergenceGuard stopped it: averages and checkpoints are still finite
        rank_zero_warn(str(e))
        return e
    except (ValueError, MisconfigurationException) as e:
        if isinstance(e, ConfigError) or trainer.global_step == 0:  # setup-time checks of the callbacks
            raise ConfigError(one_line(e)) from e
        raise
    return None


def _fit_and_test(
    cfg: DictConfig, trainer: Trainer, module: Classifier, datamodule: Any, callbacks: list[Callback]
) -> dict[str, Any]:
    """Fit, then test unless the run diverged or was stopped by SIGTERM; the metrics of :func:`train`."""
    t0 = time.perf_counter()
    diverged: Diverged | None = None
    preempted = False
    try:
        diverged = _fit(cfg, trainer, module, datamodule)
    except SystemExit as e:  # Lightning's SIGTERMException: the loops stopped after a SIGTERM
        if not is_sigterm_stop(e, trainer):
            raise
        preempted = True
    fit_s = time.perf_counter() - t0
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["time/fit_s"] = fit_s
    monitor = cfg.get("monitor")
    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    if diverged is not None or preempted:
        if diverged is not None:
            metrics.update({"status": "diverged", "diverged/step": diverged.step, "diverged/epoch": diverged.epoch})
        else:
            saved = next((c.saved_path for c in callbacks if isinstance(c, PreemptionCheckpoint)), None)
            metrics.update({"status": "preempted", "preempted/step": trainer.global_step})
            metrics["preempted/checkpoint"] = str(saved) if saved is not None else ""
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
            try:
                results = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
            except SystemExit as e:
                if not is_sigterm_stop(e, trainer):
                    raise
                results = []
                metrics.update({"status": "preempted", "preempted/step": trainer.global_step})
            for result in results:
                metrics.update({k: float(v) for k, v in result.items()})
    metrics["world_size"] = trainer.world_size
    return metrics


# -- refit on training + validation data (Deep Learning §7.8, Algorithms 7.2 and 7.3) ------------------------


def _refit_mode(cfg: DictConfig) -> str:
    return str((cfg.get("refit") or {}).get("mode", "none"))


def _refit_checkpoint(cfg: DictConfig, callbacks: list[Callback]) -> ModelCheckpoint | None:
    monitor = cfg.get("monitor")
    return next(
        (c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor == monitor and c.save_top_k != 0),
        None,
    )


def _check_refit(cfg: DictConfig, datamodule: Any, callbacks: list[Callback]) -> str | None:
    """Before the first fit: the refusal of ``refit.mode`` in one line, or ``None`` when it can run."""
    mode = _refit_mode(cfg)
    if mode not in REFIT_MODES:
        return f"refit.mode must be one of {REFIT_MODES}, got {mode!r}"
    if mode == "none":
        return None
    splits = getattr(datamodule, "splits", None) or {}
    if "val" not in splits or len(splits["val"][1]) == 0:
        return f"refit.mode={mode} needs a validation split to merge (data.val_fraction > 0)"
    if _refit_checkpoint(cfg, callbacks) is None:
        return (
            f"refit.mode={mode} needs a best epoch to go by: a ModelCheckpoint monitoring {cfg.get('monitor')!r} "
            "(callbacks.model_checkpoint)"
        )
    cap = (cfg.get("refit") or {}).get("max_epochs")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        return f"refit.max_epochs must be an int >= 1 or null, got {cap!r}"
    return None


def _fit_refit(cfg: DictConfig, first: dict[str, Any]) -> dict[str, float]:
    """After the first fit (its ``objects``): train on training + validation data and test; returns the
    metrics as ``refit/<name>``."""
    from lightning_tricks.callbacks.plots import CurvePlot
    from lightning_tricks.callbacks.refit import StopAtLossTarget

    mode = _refit_mode(cfg)
    checkpoint = _refit_checkpoint(cfg, first["callbacks"])
    assert checkpoint is not None and checkpoint.best_model_path, "checked by check_refit before the first fit"
    best_epoch = int(torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["epoch"])
    first_data = first["datamodule"]
    train_split, val_split = first_data.splits["train"], first_data.splits["val"]
    stop: StopAtLossTarget | None = None
    if mode == "epochs":  # Algorithm 7.2: the same initialization, the best run's number of passes
        seed_everything(int(cfg.seed), workers=True)
        datamodule, module = build_data_and_module(cfg)
        epochs = refit_epochs(best_epoch)
    else:  # Algorithm 7.3: the stopped weights, until the validation split's loss is below the target
        datamodule, module = first_data, first["module"]
        target = mean_loss(module, first_data.train_dataloader())
        stop = StopAtLossTarget(target, first_data.val_dataloader())
        epochs = int((cfg.get("refit") or {}).get("max_epochs") or cfg.trainer.max_epochs)
    datamodule.splits["train"] = merge_splits(train_split, val_split)
    callbacks = [
        c for c in build_callbacks(cfg) if not isinstance(c, (ModelCheckpoint, PLEarlyStopping, CurvePlot))
    ] + ([stop] if stop is not None else [])
    kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    for key in ("max_steps", "max_time"):
        kwargs.pop(key, None)
    _resolve_auto(kwargs)
    kwargs.update(
        max_epochs=epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=str(Path(first["output_dir"]) / "refit"),
    )
    rank_zero_info(
        f"refit ({mode}): training on {len(train_split[1])} + {len(val_split[1])} examples for "
        + (f"{epochs} epoch(s) (best epoch {best_epoch})" if stop is None else f"at most {epochs} epoch(s)")
    )
    trainer = Trainer(**kwargs, callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    metrics: dict[str, float] = {"refit/time_s": time.perf_counter() - t0, "refit/epochs": trainer.current_epoch}
    if stop is not None:
        metrics.update({"refit/target_loss": stop.target, "refit/val_split_loss": stop.last})
        metrics["refit/reached_target"] = float(stop.reached)
    for result in trainer.test(module, datamodule=datamodule, verbose=False):
        metrics.update({f"refit/{k}": float(v) for k, v in result.items()})
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
    elif metrics.get("status") == "preempted":
        saved = metrics.get("preempted/checkpoint")
        lines.append(
            f"PRE-EMPTED by SIGTERM at optimizer step {metrics.get('preempted/step')}: "
            + (f"resume with ckpt_path={saved}" if saved else "no checkpoint was written")
        )
    elif monitor and f"best/{monitor}" in metrics:
        lines.append(f"best {monitor:<24} {metrics[f'best/{monitor}']:.4f}")
    for key in sorted(metrics):
        if key.startswith(("val/", "test/", "refit/test/")) and not key.endswith("_step"):
            # val/*: the last validation during fit; test/*: the weights fit ended with (EMA, restore-best);
            # refit/test/*: the model refit on training + validation data
            if key.startswith("refit/"):
                label, name = "refit", key.removeprefix("refit/")
            else:
                label, name = ("last" if key.startswith("val/") else "final"), key
            lines.append(f"{label} {name:<{28 - len(label)}} {metrics[key]:.4f}")
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


#: exit codes of ``python -m lightning_tricks.train`` (one run): the run ended ``ok`` (0), it failed (1: a
#: traceback, or a checkpoint that could not be written), its config or data was refused before training (2),
#: it diverged (3), or a SIGTERM stopped it after saving a checkpoint (143 = 128 + SIGTERM, what a shell
#: reports for a process the signal ended). A ``--multirun`` runs every job whatever the others did, and exits
#: 1 when a job failed or was refused, 143 when one was pre-empted (see :mod:`lightning_tricks.sweep`).
EXIT_FAILED, EXIT_REFUSED, EXIT_DIVERGED, EXIT_PREEMPTED = 1, 2, 3, 143

#: a SIGTERM stopped a job of this process's sweep: the jobs after it are not started (the machine is going)
_sweep_preempted = False


def one_line(e: BaseException) -> str:
    """An exception as one line: its first line of text, or its type's name."""
    lines = str(e).strip().splitlines()
    return lines[0].strip() if lines else type(e).__name__


def _checkpoint_write_error() -> type[BaseException]:
    try:
        from lightning_tricks.checkpoint_io import CheckpointWriteError
    except ImportError:  # pragma: no cover - the atomic writer is part of the package
        return type("CheckpointWriteError", (OSError,), {})
    return CheckpointWriteError


def _record_job(cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """``metrics.json`` for a sweep job that ended without one (refused, failed, not started)."""
    try:
        out = _output_dir(cfg)
    except Exception:  # noqa: BLE001 - no directory to write into: the summary lists the job as unreported
        return
    if not (out / "metrics.json").exists():
        _write_metrics(out, metrics)


def _multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_job(cfg: DictConfig) -> float | None:
    """Run :func:`train`; return the monitored metric for sweepers. Config errors end in one line.

    One run exits with :data:`EXIT_REFUSED`, :data:`EXIT_FAILED`, :data:`EXIT_DIVERGED` or
    :data:`EXIT_PREEMPTED` when it did not end ``ok``. A job of a sweep never ends the sweep: its status goes
    to its ``metrics.json`` (read by the sweep summary) and it returns the worst value of the monitor.
    """
    global _sweep_preempted
    multirun = _multirun()
    monitor = cfg.get("monitor")
    worst = worst_value(cfg.get("monitor_mode", "max")) if monitor else None
    failed = {f"best/{monitor}": worst} if monitor else {}
    if multirun and _sweep_preempted:
        _record_job(cfg, {"status": "preempted", **failed, "preempted/step": 0})
        return worst
    write_error = _checkpoint_write_error()
    try:
        metrics, _ = train(cfg)
    except (ConfigError, DataFileError, FileNotFoundError, MisconfigurationException, write_error) as e:
        refused = not isinstance(e, write_error)  # else a checkpoint could not be written: the run failed
        print(f"lightning-tricks: {'configuration error: ' if refused else ''}{e}", file=sys.stderr)
        if not multirun:
            sys.exit(EXIT_REFUSED if refused else EXIT_FAILED)
        _record_job(cfg, {"status": f"{'refused' if refused else 'failed'}: {one_line(e)}", **failed})
        return worst
    except Exception as e:
        if not multirun:
            raise
        logging.getLogger(__name__).exception("job failed")  # the traceback, in the job's log file
        _record_job(cfg, {"status": f"failed: {type(e).__name__}: {one_line(e)}", **failed})
        return worst
    status = metrics.get("status")
    if status == "preempted":
        saved = metrics.get("preempted/checkpoint")
        where = f"; resume with ckpt_path={saved}" if saved else ""
        print(
            f"lightning-tricks: pre-empted by SIGTERM at step {metrics.get('preempted/step')}{where}", file=sys.stderr
        )
        if multirun:
            _sweep_preempted = True
            return worst
        sys.exit(EXIT_PREEMPTED)
    if status == "diverged" and not multirun:
        sys.exit(EXIT_DIVERGED)
    return metrics.get(f"best/{monitor}") if monitor else None


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


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
    for namespace in ("pytorch_lightning", "lightning.pytorch"):  # whichever Lightning the run uses
        logging.getLogger(f"{namespace}.utilities.rank_zero").addFilter(
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
