"""LayerStats: per-layer activation and gradient statistics every N optimizer steps, to a CSV and histograms.

Wiring over :mod:`lightning_tricks.layer_stats`; reads outputs and gradients, writes only its files.
"""

from __future__ import annotations

import os
from typing import Any

from lightning_tricks import layer_stats as core
from lightning_tricks._lightning import TENSORBOARD_LOGGER_TYPES, Callback, LightningModule, Trainer, rank_zero_info
from lightning_tricks.callbacks._common import check_bool, check_choice, check_int, log_to_loggers
from lightning_tricks.layer_stats import HISTOGRAMS, ActivationRecorder, LayerMeasurement

__all__ = ["LayerStats"]


class LayerStats(Callback):
    """Every ``every_n_steps`` optimizer steps, measure each layer's activations and gradients on one batch.

    Forward hooks sit on the measured layers for that batch only (other steps cost one modulo); the
    gradient and weight norms are taken before clipping. Rank zero writes ``layer_stats.csv`` in
    ``dirpath`` (columns ``step, epoch, layer, type, calls, act_mean, act_std, act_zero_frac, dead_frac,
    grad_norm, weight_norm``), logs ``layer_stats/<stat>/<layer>`` and draws histograms; details in
    ``docs/method_cards.md`` (layer statistics).

    Args:
        every_n_steps: measure every this many optimizer steps, >= 1.
        histograms: ``"auto"`` (TensorBoard when a ``TensorBoardLogger`` is there, else PNG grids
            ``layer_stats/step<step>.png``), ``"tensorboard"``, ``"png"``, ``"both"`` or ``"none"``.
        max_values: values per layer kept for each histogram, >= 1.
        dirpath: folder of the CSV and PNGs; ``None``: the Trainer's ``log_dir`` or ``default_root_dir``.
        filename: the CSV's name (``.csv``).
        log_scalars: also send the statistics to the loggers.

    Example:
        >>> cb = LayerStats(every_n_steps=100, histograms="png")   # Trainer(callbacks=[cb])
        >>> cb.state_key
        "LayerStats{'every_n_steps': 100}"
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        histograms: str = "auto",
        max_values: int = 10_000,
        dirpath: str | None = None,
        filename: str = "layer_stats.csv",
        log_scalars: bool = True,
    ) -> None:
        self.every_n_steps: int = check_int("every_n_steps", every_n_steps, 1)  # type: ignore[assignment]
        self.histograms = check_choice("histograms", histograms, HISTOGRAMS)
        self.max_values: int = check_int("max_values", max_values, 1)  # type: ignore[assignment]
        core.check_output(dirpath, filename)
        self.dirpath = None if dirpath is None else str(dirpath)
        self.filename = filename
        self.log_scalars = check_bool("log_scalars", log_scalars)
        self.directory: str | None = None  # resolved at setup
        self.path: str | None = None  # the CSV
        self.measured_steps: list[int] = []  # steps measured in this process (not checkpointed: output only)
        self.last: LayerMeasurement | None = None
        self._to_tensorboard = False
        self._to_png = False
        self._recorder: ActivationRecorder | None = None
        self._step = -1  # the step being measured (or last measured)
        self._pending = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_recorder"], state["_pending"] = None, False  # hooks and module references stay behind
        return state

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # on every rank: log_dir broadcasts from rank zero
        self.directory = self.dirpath or trainer.log_dir or trainer.default_root_dir
        self.path = os.path.join(self.directory, self.filename)
        has_tb = any(isinstance(logger, TENSORBOARD_LOGGER_TYPES) for logger in trainer.loggers)
        self._to_tensorboard, self._to_png = core.histogram_targets(self.histograms, has_tb)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._step or not trainer.is_global_zero:
            return
        self._step, self._pending = step, True
        keep = self.max_values if (self._to_tensorboard or self._to_png) else 0
        self._recorder = ActivationRecorder(core.select_layers(pl_module), keep)
        self._recorder.start()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self._pending and trainer.global_step == self._step:
            self._finish(trainer, gradients=True)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._recorder is not None:
            self._recorder.stop()  # one forward pass only (accumulation: the later micro-batches run without hooks)
        if self._pending and trainer.global_step != self._step:  # stepped without on_before_optimizer_step
            self._finish(trainer, gradients=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending:  # the run ended inside an accumulation window
            self._finish(trainer, gradients=False)
        self._drop_hooks()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._drop_hooks()

    def _drop_hooks(self) -> None:
        if self._recorder is not None:
            self._recorder.stop()
        self._recorder, self._pending = None, False

    def _finish(self, trainer: Trainer, gradients: bool) -> None:
        recorder = self._recorder
        self._pending = False
        if recorder is None:
            return
        recorder.stop()
        step = self._step
        result = core.measure(recorder, step, trainer.current_epoch, gradients, self.max_values)
        self._recorder = None
        self.last = result
        self.measured_steps.append(step)
        assert self.path is not None and self.directory is not None
        core.write_csv(self.path, result.rows)
        if self.log_scalars:
            log_to_loggers(trainer, core.scalar_metrics(result.rows), step=step)
        if self._to_tensorboard:
            self._tensorboard(trainer, result, step)
        if self._to_png and (result.activations or result.gradients):
            png = os.path.join(self.directory, "layer_stats", f"step{step:07d}.png")
            core.plot_histograms(
                core.histogram_panels(result), png, title=f"step {step}, epoch {trainer.current_epoch}"
            )
            rank_zero_info(f"LayerStats: wrote {png}")

    @staticmethod
    def _tensorboard(trainer: Trainer, result: LayerMeasurement, step: int) -> None:
        for logger in trainer.loggers:
            if not isinstance(logger, TENSORBOARD_LOGGER_TYPES):
                continue
            writer = logger.experiment
            for kind, samples in (("act", result.activations), ("grad", result.gradients)):
                for name, values in samples.items():
                    finite = values[values.isfinite()]
                    if finite.numel():
                        writer.add_histogram(f"layer_stats/{kind}/{name}", finite, global_step=step)
