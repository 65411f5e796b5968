"""EMA: an exponential moving average of the weights (Polyak averaging), evaluated in place of them.

The formula is :func:`lightning_tricks.averaging.ema_decay` / :class:`~lightning_tricks.averaging.WeightAverage`;
how the weights move between raw and average is in :mod:`lightning_tricks.callbacks._averaging`.

Owns: the average and its update counters (in its checkpoint state). Shares: which weights are in
the module, through :func:`lightning_tricks.callbacks._weights.weights_of` (label ``"ema"``); at the
end of fit its average (``average_at_end``) yields to ``EarlyStopping(restore_best=True)``.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_tricks._lightning import LightningModule, Trainer
from lightning_tricks.averaging import ema_decay
from lightning_tricks.callbacks._averaging import _Averaging
from lightning_tricks.callbacks._common import StepWatch, check_int

__all__ = ["EMA"]


class EMA(_Averaging):
    r"""Exponential moving average of the weights (Polyak averaging), evaluated in place of them.

    After each optimizer step ``t`` (counted in optimizer steps, so gradient accumulation is
    respected) the average moves toward the weights:

    .. math::
        \bar w \leftarrow d_k \bar w + (1 - d_k) w, \qquad
        d_k = \min\!\left(d, \frac{1 + k}{10 + k}\right) \text{ (warmup) or } d

    where ``k = 0, 1, ...`` counts the EMA updates. The average starts as a copy of the weights at
    ``start_step`` (0: the start of fit) and is updated every ``n = every_n_steps`` optimizer steps
    after that, with the decay ``d_k ** n``: the same horizon in optimizer steps as an every-step EMA
    (``decay=0.999`` still averages over about the last 1000 steps), as Composer's ``EMA`` derives its
    smoothing per update interval from a half-life. What it saves: ``n - 1`` of every ``n`` passes over
    the weights (each pass reads the weights and the average and writes the average: on a 25M-parameter
    model in float32 about 300 MB of memory traffic per step). What it costs: the average ignores the
    weights of the steps in between (it samples every ``n``-th iterate), which matters little when ``n``
    is small next to the horizon ``1 / (1 - decay)``. It is kept in float32 (also for bfloat16/float16
    weights) as flat per-(device, dtype) lists built once, so an update is one ``torch._foreach_lerp_``
    per list with the decay computed on the host from an int: no Python loop over parameters and no
    device sync.

    Compared with Lightning's ``EMAWeightAveraging`` (``AveragedModel`` with a per-tensor ``avg_fn``):
    no ``deepcopy`` of the module, no per-parameter Python loop and no temporaries per step (it computes
    ``d * ema + (1 - d) * w`` into new tensors), no ``n_averaged == 0`` device sync per step, float32
    averages of low-precision weights, decay warmup, buffers copied rather than averaged by default,
    the raw weights kept (not overwritten) at the end of fit so they can still be tested. As in
    Lightning's, a checkpoint's ``state_dict`` holds the weights evaluation ran on (the average), and
    the raw weights are kept in the callback state for an exact resume.
    ``benchmarks/ema_update.py`` measures the per-step cost against it.

    Polyak & Juditsky 1992 (averaging); the decay warmup is TensorFlow's
    ``ExponentialMovingAverage(num_updates=...)``; see also Izmailov et al. 2018, arXiv:1803.05407.

    Args:
        decay: the decay ``d`` in (0, 1); 0.999 averages over about the last 1000 updates.
        warmup: use ``min(decay, (1 + k) / (10 + k))`` so early updates follow the weights faster.
        every_n_steps: update every n optimizer steps, with the decay ``decay ** n`` per update (the
            same horizon in steps; see above).
        start_step: optimizer step at which the average starts as a copy of the weights; before it,
            evaluation uses the raw weights.
        evaluate: ``"ema"`` (validation/test/predict on the average), ``"raw"``, or ``"both"``: the
            average under the module's metric names and the raw weights as ``name + raw_suffix``
            (a second evaluation pass through the module's ``evaluation_outputs`` hook, see the
            module doc). After fit, weights handed over by restore-best are evaluated as they are.
        on_cpu: keep the average in host memory (saves accelerator memory; each update then copies
            the weights to the host and waits for the copy: use ``every_n_steps`` to amortize it).
        buffers: ``"copy"``: evaluation uses the module's own buffers (BatchNorm statistics of the
            raw weights); ``"average"``: floating-point buffers are averaged like the parameters.
        average_at_end: at the end of fit, leave the averaged weights in the module (the raw ones are
            kept by the weights service, and by checkpoints for resume), unless
            ``EarlyStopping(restore_best=True)`` hands over the best measured weights (it wins).
        raw_suffix: suffix of the raw weights' metric names with ``evaluate="both"``.

    Example:
        >>> ema = EMA(decay=0.99, evaluate="both")
        >>> ema.state_key
        "EMA{'decay': 0.99, 'every_n_steps': 1, 'start_step': 0}"
    """

    _AVERAGE = "ema"

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = True,
        every_n_steps: int = 1,
        start_step: int = 0,
        evaluate: str = "ema",
        on_cpu: bool = False,
        buffers: str = "copy",
        average_at_end: bool = True,
        raw_suffix: str = "_raw",
    ) -> None:
        super().__init__(evaluate, average_at_end, on_cpu, raw_suffix)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        check_int("every_n_steps", every_n_steps, 1)
        check_int("start_step", start_step, 0)
        if buffers not in ("copy", "average"):
            raise ValueError(f"buffers must be 'copy' or 'average', got {buffers!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self.buffers = buffers
        self.num_updates = 0  # EMA updates so far (the warmup counter k)
        self._steps = StepWatch()  # did an optimizer step happen in this batch?
        self._last_update_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay, every_n_steps=self.every_n_steps, start_step=self.start_step)

    def _include_buffers(self) -> bool:
        return self.buffers == "average"

    def current_decay(self) -> float:
        """The decay the next update will use."""
        return ema_decay(self.num_updates, self.decay, self.warmup, self.every_n_steps)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.max_steps is not None and 0 <= trainer.max_steps <= self.start_step:
            raise ValueError(
                f"EMA start_step={self.start_step} is not before the end of the run (max_steps={trainer.max_steps})"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        total = trainer.estimated_stepping_batches
        if math.isfinite(total) and self.start_step >= total:
            raise ValueError(
                f"EMA start_step={self.start_step} is beyond the run ({int(total)} optimizer steps in total)"
            )
        step = trainer.global_step
        self._steps.start(step)
        if not self._started and step >= self.start_step:
            self._start(step)

    def _start(self, step: int) -> None:
        assert self._average is not None
        self._average.reset_()
        self._started = True
        self.num_updates = 0
        self._last_update_step = step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._steps.stepped(step):
            return  # no optimizer step in this batch (gradient accumulation)
        if not self._started:
            if step >= self.start_step:
                self._start(step)
            return
        if step - self._last_update_step >= self.every_n_steps:
            decay = ema_decay(self.num_updates, self.decay, self.warmup, self.every_n_steps)  # host arithmetic
            self._average.update_(1.0 - decay)  # type: ignore[union-attr]
            self.num_updates += 1
            self._last_update_step = step

    def _extra_state(self) -> dict[str, Any]:
        return {
            "num_updates": self.num_updates,
            "last_step": self._steps.last,
            "last_update_step": self._last_update_step,
            "decay": self.decay,
            "warmup": self.warmup,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state.get("num_updates", 0))
        self._steps.last = int(state.get("last_step", -1))
        self._last_update_step = int(state.get("last_update_step", -1))
