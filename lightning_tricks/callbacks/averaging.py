"""Weight averaging callbacks: :class:`EMA` (Polyak / exponential moving average) and :class:`SWA`.

Both keep a float32 average of the weights (:class:`lightning_tricks.averaging.WeightAverage`,
updated with ``torch._foreach_*`` ops), evaluate on it, save it in checkpoints and put it in the
module at the end of fit. The formulas live in :mod:`lightning_tricks.averaging`.

How the weights move (the same for both callbacks):

- ``checkpoint["state_dict"]`` always holds the *raw* (training) weights and the callback state holds
  the average (``state["average"] = {state_dict name: tensor}``), so a resumed run continues exactly.
  :func:`lightning_tricks.averaging.averaged_state_dict` merges them for inference, and
  :class:`lightning_tricks.ensemble.CheckpointEnsemble` does it by default.
- Evaluation (validation, test, predict) copies the average into the module at the start and the raw
  weights back at the end (``torch._foreach_copy_``; no ``state_dict`` round trip).
- ``evaluate="both"`` logs the metrics of the averaged weights under the module's own names
  (``val/acc``) and those of the raw weights with a suffix (``val/acc_raw``). The loop runs on the
  average; at epoch end the callback runs the module's own ``validation_step`` (``test_step``) again
  over the same batches with the raw weights, with ``self.log`` captured and the module's torchmetrics
  replaced by fresh clones (so the average's metrics are not touched), and logs the captured values
  with the suffix. It costs a second evaluation pass; only what ``*_step`` logs is captured.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tricks._lightning import Callback, LightningModule, Trainer, rank_zero_warn
from lightning_tricks.averaging import (
    AVERAGE_STATE_KEY,
    WeightAverage,
    bn_buffers,
    bn_modules,
    ema_decay,
    restore_,
    snapshot,
    swa_lr,
    swa_weight,
    update_bn,
)

__all__ = ["EMA", "SWA"]

_STATE_VERSION = 1


# ------------------------------------------------------------------------------------------------
# helpers: loaders, RNG, a second evaluation pass with captured logs
# ------------------------------------------------------------------------------------------------
def _as_list(loaders: Any) -> list[Any]:
    if loaders is None:
        return []
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    if isinstance(loaders, dict):
        return list(loaders.values())
    return [loaders]


@contextlib.contextmanager
def _untouched(pl_module: nn.Module, loaders: list[Any]) -> Iterator[None]:
    """Keep the global RNG (CPU and the module's CUDA device) and loaders' epoch counters unchanged.

    An extra pass over a DataLoader draws its base seed from the global RNG and
    :class:`~lightning_tricks.data.TensorBatchLoader` counts epochs; without this, evaluating twice
    or recomputing BatchNorm statistics would change the rest of the training run.
    """
    device = next((t.device for t in pl_module.parameters()), torch.device("cpu"))
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    epochs = [(ld, ld.epoch) for ld in loaders if isinstance(getattr(ld, "epoch", None), int)]
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for ld, e in epochs:
                ld.epoch = e


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 1


class _LogCapture:
    """Stands in for ``LightningModule.log`` / ``log_dict`` during a second evaluation pass."""

    def __init__(self) -> None:
        self.batch_size = 1
        self.scalars: dict[str, list[Any]] = {}  # name -> [reduced tensor, weight, reduce_fx, options]
        self.metrics: dict[str, tuple[Any, dict[str, Any]]] = {}
        self.suffix = ""  # "/dataloader_idx_i" with several loaders, like Lightning

    def log(self, name: str, value: Any, prog_bar: bool = False, logger: bool | None = None,
            on_step: bool | None = None, on_epoch: bool | None = None, reduce_fx: Any = "mean",
            enable_graph: bool = False, sync_dist: bool = False, sync_dist_group: Any = None,
            add_dataloader_idx: bool = True, batch_size: int | None = None,
            metric_attribute: str | None = None, rank_zero_only: bool = False) -> None:
        from torchmetrics import Metric

        if on_epoch is False:
            return  # a per-step value of the evaluation: there is no epoch value to compare
        key = name + (self.suffix if add_dataloader_idx else "")
        opts = {"prog_bar": prog_bar, "logger": logger, "sync_dist": sync_dist,
                "rank_zero_only": rank_zero_only}
        if isinstance(value, Metric):
            self.metrics[key] = (value, opts)
            return
        fx = reduce_fx if isinstance(reduce_fx, str) else getattr(reduce_fx, "__name__", "mean")
        fx = {"amax": "max", "amin": "min"}.get(fx, fx)
        if fx not in ("mean", "sum", "max", "min"):
            raise ValueError(f"evaluate='both' supports reduce_fx mean/sum/max/min, got {reduce_fx!r} for {name!r}")
        v = torch.as_tensor(value).detach().float().reshape(())
        w = float(batch_size if batch_size is not None else self.batch_size)
        entry = self.scalars.get(key)
        if entry is None:
            self.scalars[key] = [v * w if fx == "mean" else v, w, fx, opts]
        else:
            if fx == "mean":
                entry[0] = entry[0] + v * w
            elif fx == "sum":
                entry[0] = entry[0] + v
            else:
                entry[0] = torch.maximum(entry[0], v) if fx == "max" else torch.minimum(entry[0], v)
            entry[1] += w

    def log_dict(self, dictionary: Any, **kwargs: Any) -> None:
        for k, v in dictionary.items():
            self.log(k, v, **kwargs)

    def results(self) -> dict[str, tuple[Tensor, dict[str, Any]]]:
        out = {}
        for key, (total, weight, fx, opts) in self.scalars.items():
            out[key] = (total / weight if fx == "mean" else total, opts)
        for key, (metric, opts) in self.metrics.items():
            out[key] = (metric.compute(), {**opts, "sync_dist": False})  # torchmetrics syncs itself
        return out


@contextlib.contextmanager
def _fresh_metrics(module: nn.Module) -> Iterator[None]:
    """Replace every torchmetrics ``Metric`` submodule by a reset clone for the duration."""
    from torchmetrics import Metric

    swapped: list[tuple[nn.Module, str, nn.Module]] = []

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            if isinstance(child, Metric):
                clone = child.clone()
                clone.reset()
                swapped.append((parent, name, child))
                parent._modules[name] = clone
            elif child is not None:
                visit(child)

    visit(module)
    try:
        yield
    finally:
        for parent, name, child in swapped:
            parent._modules[name] = child


def evaluate_again(trainer: Trainer, pl_module: LightningModule, suffix: str) -> dict[str, Tensor]:
    """Run ``validation_step`` / ``test_step`` over the current evaluation batches again, logging with ``suffix``.

    The module's ``log``/``log_dict`` are captured and its torchmetrics replaced by fresh clones during
    the pass, so nothing the main loop accumulated is touched; the captured epoch values are then
    logged as ``name + suffix``. RNG state and loader epoch counters are left as they were.
    Returns the logged values.
    """
    testing = trainer.testing
    loaders = _as_list(trainer.test_dataloaders if testing else trainer.val_dataloaders)
    if trainer.sanity_checking:
        limits = trainer.num_sanity_val_batches
    else:
        limits = trainer.num_test_batches if testing else trainer.num_val_batches
    step = pl_module.test_step if testing else pl_module.validation_step
    capture = _LogCapture()
    with _untouched(pl_module, loaders), _fresh_metrics(pl_module), torch.no_grad():
        pl_module.log = capture.log  # type: ignore[method-assign]
        pl_module.log_dict = capture.log_dict  # type: ignore[method-assign]
        try:
            for i, loader in enumerate(loaders):
                limit = limits[i] if i < len(limits) else float("inf")
                capture.suffix = f"/dataloader_idx_{i}" if len(loaders) > 1 else ""
                for b, batch in enumerate(loader):
                    if b >= limit:
                        break
                    batch = trainer.strategy.batch_to_device(batch, dataloader_idx=i)
                    capture.batch_size = _batch_size(batch)
                    if len(loaders) > 1:
                        step(batch, b, i)
                    else:
                        step(batch, b)
        finally:
            del pl_module.log
            del pl_module.log_dict
        results = capture.results()
    logged = {}
    for key, (value, opts) in results.items():
        pl_module.log(key + suffix, value, on_step=False, on_epoch=True, **opts)
        logged[key + suffix] = value
    return logged


# ------------------------------------------------------------------------------------------------
# the shared wiring
# ------------------------------------------------------------------------------------------------
class _Averaging(Callback):
    """Swapping, checkpointing and evaluation shared by :class:`EMA` and :class:`SWA`."""

    _AVERAGE = "average"  # the name of the averaged weights in ``evaluate``

    def __init__(self, evaluate: str, average_at_end: bool, on_cpu: bool, raw_suffix: str) -> None:
        allowed = (self._AVERAGE, "raw", "both")
        if evaluate not in allowed:
            raise ValueError(f"evaluate must be one of {allowed}, got {evaluate!r}")
        if not isinstance(raw_suffix, str) or not raw_suffix:
            raise ValueError(f"raw_suffix must be a non-empty string, got {raw_suffix!r}")
        self.evaluate = evaluate
        self.average_at_end = bool(average_at_end)
        self.on_cpu = bool(on_cpu)
        self.raw_suffix = raw_suffix
        self._average: WeightAverage | None = None
        self._started = False
        # while the module holds the average: name -> (live tensor, saved raw value)
        self._backup: dict[str, tuple[Tensor, Tensor]] | None = None
        self._pending: dict[str, Any] | None = None
        self._eval_return_to: str | None = None
        self._warned: set[str] = set()

    # -- to specialise -----------------------------------------------------------------------------
    def _include_buffers(self) -> bool:
        return False

    def _extra_targets(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """Module tensors besides the averaged ones that holding the average overwrites."""
        return {}

    def _after_average_loaded(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called right after the average was copied into the module."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # -- public views ------------------------------------------------------------------------------
    @property
    def holds_average(self) -> bool:
        """Whether the module currently holds the averaged weights (the raw ones are backed up)."""
        return self._backup is not None

    @property
    def started(self) -> bool:
        """Whether the average exists (EMA: ``start_step`` reached; SWA: at least one update)."""
        return self._started

    def average_tensors(self) -> dict[str, Tensor]:
        """``{state_dict name: averaged tensor}`` (float32; the live averages, not copies)."""
        if self._average is None:
            return {}
        return self._average.tensors()

    def raw_tensors(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """The raw (training) weights, wherever they are now (copies)."""
        out = {n: t.detach().clone() for n, t in pl_module.state_dict(keep_vars=True).items()}
        if self._backup is not None:
            out.update({n: saved.clone() for n, (_, saved) in self._backup.items()})
        return out

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    # -- average lifecycle -------------------------------------------------------------------------
    def _bind(self, pl_module: LightningModule) -> None:
        """Create (or rebind after a device move) the average and apply a loaded state."""
        if self._average is None:
            device = torch.device("cpu") if self.on_cpu else None
            self._average = WeightAverage(pl_module, buffers=self._include_buffers(), device=device)
        else:
            self._average.bind(pl_module)
        self._apply_pending()

    def _apply_pending(self) -> None:
        """Load a state read from a checkpoint into the (bound) average."""
        if self._pending is None or self._average is None:
            return
        state, self._pending = self._pending, None
        self._started = bool(state.get("started", False))
        if self._started:
            self._average.load_state_dict(state.get(AVERAGE_STATE_KEY) or {})
        self._load_extra_state(state)

    def _hold_average(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._backup is not None or self._average is None or not self._started:
            return
        targets = self._average.live()
        targets.update(self._extra_targets(pl_module))
        names = list(targets)
        saved = snapshot([targets[n] for n in names])
        self._backup = {n: (targets[n], s) for n, s in zip(names, saved)}
        self._average.copy_to_module_()
        self._after_average_loaded(trainer, pl_module)

    def _hold_raw(self) -> None:
        if self._backup is None:
            return
        live = [t for t, _ in self._backup.values()]
        saved = [s for _, s in self._backup.values()]
        restore_(live, saved)
        self._backup = None

    # -- evaluation --------------------------------------------------------------------------------
    def _eval_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._bind(pl_module)
        self._eval_return_to = None
        if self.evaluate == "raw":
            if self.holds_average:  # e.g. after a fit that ended on the average
                self._eval_return_to = "average"
                self._hold_raw()
            return
        if not self._started:
            if trainer.state.fn != "fit":  # in fit, evaluating the raw weights before the start is the rule
                self._warn_once("no-average", f"{type(self).__name__}: there is no average yet (no fit ran "
                                "and no checkpoint with its state was loaded); evaluating the raw weights")
            return
        if not self.holds_average:
            self._eval_return_to = "raw"
            self._hold_average(trainer, pl_module)

    def _eval_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.evaluate != "both":
            return
        had_average = self.holds_average
        self._hold_raw()
        evaluate_again(trainer, pl_module, self.raw_suffix)
        if had_average:
            self._hold_average(trainer, pl_module)

    def _eval_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        back, self._eval_return_to = self._eval_return_to, None
        if back == "raw":
            self._hold_raw()
        elif back == "average":
            self._hold_average(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_epoch_end(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end(trainer, pl_module)

    # -- fit ---------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._hold_raw()  # a second fit after one that ended on the average trains the raw weights
        self._bind(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.average_at_end:
            if self._started:
                self._hold_average(trainer, pl_module)
            else:
                self._warn_once("end-no-average", f"{type(self).__name__}: training ended before the "
                                "average started; the module keeps its raw weights")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._hold_raw()

    # -- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._backup is None:
            return
        # the module holds the average now: the checkpoint keeps the raw weights (see the module doc)
        sd = checkpoint.get("state_dict")
        if isinstance(sd, dict):
            for name, (_, saved) in self._backup.items():
                if name in sd:
                    sd[name] = saved.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"version": _STATE_VERSION, "started": self._started}
        state[AVERAGE_STATE_KEY] = self._average.state_dict() if (self._average is not None and self._started) else {}
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the module has just been given the checkpoint's raw weights: drop any backup
        self._backup = None
        self._eval_return_to = None
        self._pending = dict(state_dict)
        # already bound (e.g. test(ckpt_path=...) after fit): the module's tensors are the same ones
        self._apply_pending()


# ------------------------------------------------------------------------------------------------
# EMA
# ------------------------------------------------------------------------------------------------
class EMA(_Averaging):
    r"""Exponential moving average of the weights (Polyak averaging), evaluated in place of them.

    After each optimizer step ``t`` (counted in optimizer steps, so gradient accumulation is
    respected) the average moves toward the weights:

    .. math::
        \bar w \leftarrow d_k \bar w + (1 - d_k) w, \qquad
        d_k = \min\!\left(d, \frac{1 + k}{10 + k}\right) \text{ (warmup) or } d

    where ``k = 0, 1, ...`` counts the EMA updates. The average starts as a copy of the weights at
    ``start_step`` (0: the start of fit) and is updated every ``every_n_steps`` optimizer steps after
    that. It is kept in float32 (also for bfloat16/float16 weights) as flat per-(device, dtype) lists
    built once, so an update is one ``torch._foreach_lerp_`` per list with the decay computed on the host
    from an int: no Python loop over parameters and no device sync.

    Compared with Lightning's ``EMAWeightAveraging`` (``AveragedModel`` with a per-tensor ``avg_fn``):
    no ``deepcopy`` of the module, no per-parameter Python loop and no temporaries per step (it computes
    ``d * ema + (1 - d) * w`` into new tensors), no ``n_averaged == 0`` device sync per step, float32
    averages of low-precision weights, decay warmup, buffers copied rather than averaged by default,
    the raw weights kept (not overwritten) at the end of fit so they can still be tested, and checkpoints
    whose ``state_dict`` stays the raw weights (exact resume) with the average in the callback state.
    ``benchmarks/ema_update.py`` measures the per-step cost against it.

    Polyak & Juditsky 1992 (averaging); the decay warmup is TensorFlow's
    ``ExponentialMovingAverage(num_updates=...)``; see also Izmailov et al. 2018, arXiv:1803.05407.

    Args:
        decay: the decay ``d`` in (0, 1); 0.999 averages over about the last 1000 updates.
        warmup: use ``min(decay, (1 + k) / (10 + k))`` so early updates follow the weights faster.
        every_n_steps: update every n optimizer steps (the decay per update is unchanged).
        start_step: optimizer step at which the average starts as a copy of the weights; before it,
            evaluation uses the raw weights.
        evaluate: ``"ema"`` (validation/test/predict on the average), ``"raw"``, or ``"both"``: the
            average under the module's metric names and the raw weights as ``name + raw_suffix``
            (a second evaluation pass, see the module doc).
        on_cpu: keep the average in host memory (saves accelerator memory; each update then copies
            the weights to the host and waits for the copy: use ``every_n_steps`` to amortize it).
        buffers: ``"copy"``: evaluation uses the module's own buffers (BatchNorm statistics of the
            raw weights); ``"average"``: floating-point buffers are averaged like the parameters.
        average_at_end: at the end of fit, leave the averaged weights in the module (the raw ones are
            kept by the callback and still go into checkpoints).
        raw_suffix: suffix of the raw weights' metric names with ``evaluate="both"``.

    Example:
        >>> ema = EMA(decay=0.99, evaluate="both")
        >>> ema.state_key
        "EMA{'decay': 0.99, 'every_n_steps': 1, 'start_step': 0}"
    """

    _AVERAGE = "ema"

    def __init__(
        self, decay: float = 0.999, warmup: bool = True, every_n_steps: int = 1, start_step: int = 0,
        evaluate: str = "ema", on_cpu: bool = False, buffers: str = "copy", average_at_end: bool = True,
        raw_suffix: str = "_raw",
    ) -> None:
        super().__init__(evaluate, average_at_end, on_cpu, raw_suffix)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        if buffers not in ("copy", "average"):
            raise ValueError(f"buffers must be 'copy' or 'average', got {buffers!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self.buffers = buffers
        self.num_updates = 0  # EMA updates so far (the warmup counter k)
        self._last_step = -1  # global_step seen at the last batch end
        self._last_update_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay, every_n_steps=self.every_n_steps,
                                        start_step=self.start_step)

    def _include_buffers(self) -> bool:
        return self.buffers == "average"

    def current_decay(self) -> float:
        """The decay the next update will use."""
        return ema_decay(self.num_updates, self.decay, self.warmup)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.max_steps is not None and 0 <= trainer.max_steps <= self.start_step:
            raise ValueError(f"EMA start_step={self.start_step} is not before the end of the run "
                             f"(max_steps={trainer.max_steps})")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        total = trainer.estimated_stepping_batches
        if math.isfinite(total) and self.start_step >= total:
            raise ValueError(f"EMA start_step={self.start_step} is beyond the run "
                             f"({int(total)} optimizer steps in total)")
        step = trainer.global_step
        if self._last_step < 0:
            self._last_step = step
        if not self._started and step >= self.start_step:
            self._start(step)

    def _start(self, step: int) -> None:
        assert self._average is not None
        self._average.reset_()
        self._started = True
        self.num_updates = 0
        self._last_update_step = step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_step = step
        if not self._started:
            if step >= self.start_step:
                self._start(step)
            return
        if step - self._last_update_step >= self.every_n_steps:
            decay = ema_decay(self.num_updates, self.decay, self.warmup)  # host arithmetic on an int
            self._average.update_(1.0 - decay)  # type: ignore[union-attr]
            self.num_updates += 1
            self._last_update_step = step

    def _extra_state(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "last_step": self._last_step,
                "last_update_step": self._last_update_step, "decay": self.decay, "warmup": self.warmup}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state.get("num_updates", 0))
        self._last_step = int(state.get("last_step", -1))
        self._last_update_step = int(state.get("last_update_step", -1))


# ------------------------------------------------------------------------------------------------
# SWA
# ------------------------------------------------------------------------------------------------
class SWA(_Averaging):
    r"""Stochastic Weight Averaging: an equal average of the weights from a start epoch on.

    From epoch ``s`` on, the average takes in the weights at the end of every epoch
    (``update_every="epoch"``) or after every optimizer step (``"step"``):

    .. math:: \bar w_{n+1} = \bar w_n + \frac{w - \bar w_n}{n + 1}

    (the first update copies). With ``swa_lr`` the learning rate of each parameter group goes from its
    value at the start ``lr_0`` to ``swa_lr`` as in ``torch.optim.swa_utils.SWALR``: at the k-th SWA epoch
    (``anneal_epochs``) or step (``anneal_steps``), ``alpha = a(min(1, k / K))`` with ``a`` cosine or
    linear and ``lr = swa_lr * alpha + lr_0 * (1 - alpha)``; with neither given the SWA LR is constant.
    BatchNorm running statistics do not match averaged weights, so before the average is evaluated
    (validation, test, end of fit) they are recomputed over the training data with ``momentum=None``
    (``torch.optim.swa_utils.update_bn``); this costs one forward pass over the training set each time
    the average changed since the last recompute (once per epoch with ``update_every="epoch"``).

    Izmailov, Podoprikhin, Garipov, Vetrov, Wilson 2018, "Averaging Weights Leads to Wider Optima and
    Better Generalization", arXiv:1803.05407.

    Args:
        start: first averaged epoch: a fraction in (0, 1) of ``max_epochs`` (``int(start * max_epochs)``)
            or an int epoch index >= 0. It must fall inside the run.
        swa_lr: the SWA learning rate (same for all groups), or None to leave the LR alone.
        anneal_epochs: anneal to ``swa_lr`` over this many epochs (LR changed at epoch starts, as
            ``SWALR`` stepped once per epoch). Exclusive with ``anneal_steps``.
        anneal_steps: anneal to ``swa_lr`` over this many optimizer steps (LR changed every step).
        anneal: ``"cos"`` or ``"linear"``.
        update_every: ``"epoch"`` (average at the last optimizer step of each epoch) or ``"step"``.
        bn_update: recompute BatchNorm statistics of the average before evaluating it.
        bn_update_batches: at most this many training batches for the recompute (None: the whole
            training pass, ``limit_train_batches`` respected).
        evaluate: ``"average"``, ``"raw"`` or ``"both"`` (see :class:`EMA`). Before the first update
            the raw weights are evaluated.
        on_cpu, average_at_end, raw_suffix: as in :class:`EMA`.

    Example:
        >>> SWA(start=0.75, swa_lr=0.01, anneal_epochs=2).state_key
        "SWA{'start': 0.75, 'update_every': 'epoch'}"
    """

    def __init__(
        self, start: float | int = 0.75, swa_lr: float | None = None, anneal_epochs: int | None = None,
        anneal_steps: int | None = None, anneal: str = "cos", update_every: str = "epoch",
        bn_update: bool = True, bn_update_batches: int | None = None, evaluate: str = "average",
        on_cpu: bool = False, average_at_end: bool = True, raw_suffix: str = "_raw",
    ) -> None:
        super().__init__(evaluate, average_at_end, on_cpu, raw_suffix)
        if isinstance(start, bool) or not isinstance(start, (int, float)):
            raise ValueError(f"start must be a fraction in (0, 1) or an int epoch >= 0, got {start!r}")
        if isinstance(start, float) and not 0.0 < start < 1.0:
            raise ValueError(f"start must be a fraction in (0, 1) or an int epoch >= 0, got {start!r}")
        if isinstance(start, int) and start < 0:
            raise ValueError(f"start must be a fraction in (0, 1) or an int epoch >= 0, got {start!r}")
        if swa_lr is not None and not (isinstance(swa_lr, (int, float)) and math.isfinite(swa_lr) and swa_lr > 0):
            raise ValueError(f"swa_lr must be a positive number or None, got {swa_lr!r}")
        if anneal_epochs is not None and anneal_steps is not None:
            raise ValueError(f"give anneal_epochs or anneal_steps, not both "
                             f"(got {anneal_epochs!r} and {anneal_steps!r})")
        for arg, value in (("anneal_epochs", anneal_epochs), ("anneal_steps", anneal_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{arg} must be an int >= 0 or None, got {value!r}")
        if (anneal_epochs or anneal_steps) and swa_lr is None:
            raise ValueError("anneal_epochs/anneal_steps need swa_lr (the LR to anneal to)")
        if anneal not in ("cos", "linear"):
            raise ValueError(f"anneal must be 'cos' or 'linear', got {anneal!r}")
        if update_every not in ("epoch", "step"):
            raise ValueError(f"update_every must be 'epoch' or 'step', got {update_every!r}")
        if bn_update_batches is not None and (not isinstance(bn_update_batches, int) or bn_update_batches < 1):
            raise ValueError(f"bn_update_batches must be an int >= 1 or None, got {bn_update_batches!r}")
        self.start = start
        self.swa_lr = None if swa_lr is None else float(swa_lr)
        self.anneal_epochs = anneal_epochs
        self.anneal_steps = anneal_steps
        self.anneal = anneal
        self.update_every = update_every
        self.bn_update = bool(bn_update)
        self.bn_update_batches = bn_update_batches
        self.start_epoch: int | None = None  # resolved in setup
        self.num_averaged = 0
        self._last_step = -1
        self._last_epoch_averaged = -1
        self._swa_steps = 0  # optimizer steps taken in the SWA phase (the LR annealing counter)
        self._lr0: list[list[float]] | None = None  # per optimizer, per group: LR when SWA started
        self._bn_state: dict[str, Tensor] | None = None  # BN statistics recomputed for the average
        self._bn_version = -1  # num_averaged the BN statistics belong to

    @property
    def state_key(self) -> str:
        return self._generate_state_key(start=self.start, update_every=self.update_every)

    # -- setup -------------------------------------------------------------------------------------
    def resolve_start_epoch(self, max_epochs: int | None) -> int:
        """The first averaged epoch for a run of ``max_epochs`` epochs (checks it is inside the run)."""
        known = max_epochs is not None and max_epochs > 0
        if isinstance(self.start, float):
            if not known:
                raise ValueError(f"SWA start={self.start} is a fraction of max_epochs, but max_epochs is "
                                 f"{max_epochs!r}; set max_epochs or give start as an int epoch")
            epoch = int(self.start * max_epochs)  # type: ignore[operator]
        else:
            epoch = int(self.start)
        if known and epoch >= max_epochs:  # type: ignore[operator]
            raise ValueError(f"SWA start={self.start!r} resolves to epoch {epoch}, beyond the run "
                             f"(max_epochs={max_epochs}, epochs 0..{max_epochs - 1})")  # type: ignore[operator]
        return epoch

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.start_epoch = self.resolve_start_epoch(trainer.max_epochs)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.start_epoch is None:
            self.start_epoch = self.resolve_start_epoch(trainer.max_epochs)
        if self.swa_lr is not None and trainer.lr_scheduler_configs:
            self._warn_once("schedulers", "SWA(swa_lr=...) sets the learning rate in the SWA phase, over the "
                            "configured LR scheduler(s)")
        if self._last_step < 0:
            self._last_step = trainer.global_step

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the number of batches per epoch is known from here on (before the first step)
        total = trainer.estimated_stepping_batches
        per_epoch = trainer.num_training_batches
        if math.isfinite(total) and math.isfinite(per_epoch) and per_epoch > 0:
            accumulate = max(1, trainer.accumulate_grad_batches)
            epochs = math.ceil(total / math.ceil(per_epoch / accumulate))
            if self.start_epoch >= epochs:
                raise ValueError(f"SWA start epoch {self.start_epoch} is beyond the run "
                                 f"(about {epochs} epochs of {int(total)} optimizer steps)")

    def _in_swa(self, trainer: Trainer) -> bool:
        return self.start_epoch is not None and trainer.current_epoch >= self.start_epoch

    # -- LR ----------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.swa_lr is None or not self._in_swa(trainer):
            return
        optimizers = trainer.optimizers
        if self._lr0 is None:
            self._lr0 = [[float(g["lr"]) for g in opt.param_groups] for opt in optimizers]
        if self.anneal_steps is not None:
            k, length = self._swa_steps + 1, self.anneal_steps
        else:
            k = trainer.current_epoch - self.start_epoch + 1  # type: ignore[operator]
            length = self.anneal_epochs or 0
        for opt, lr0s in zip(optimizers, self._lr0):
            for group, lr0 in zip(opt.param_groups, lr0s):
                group["lr"] = swa_lr(k, lr0, self.swa_lr, length, self.anneal)

    # -- averaging ---------------------------------------------------------------------------------
    def _update(self, trainer: Trainer) -> None:
        assert self._average is not None
        self._average.update_(swa_weight(self.num_averaged))
        self.num_averaged += 1
        self._started = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # no optimizer step in this batch
        self._last_step = step
        if not self._in_swa(trainer):
            return
        self._swa_steps += 1
        if self.update_every == "step":
            self._update(trainer)
        elif trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches:
            self._update(trainer)
            self._last_epoch_averaged = trainer.current_epoch

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # safety net: an epoch whose last batch was not recognised is still averaged once
        if (self.update_every == "epoch" and self._in_swa(trainer)
                and self._last_epoch_averaged < trainer.current_epoch):
            self._update(trainer)
            self._last_epoch_averaged = trainer.current_epoch

    # -- BatchNorm ---------------------------------------------------------------------------------
    def _extra_targets(self, pl_module: LightningModule) -> dict[str, Tensor]:
        return bn_buffers(pl_module) if self.bn_update else {}

    def _after_average_loaded(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.bn_update or not bn_modules(pl_module):
            return
        buffers = bn_buffers(pl_module)
        if self._bn_state is not None and self._bn_version == self.num_averaged:
            restore_(list(buffers.values()), [self._bn_state[n] for n in buffers])
            return
        loader = trainer.train_dataloader
        if loader is None and trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        loaders = _as_list(loader)
        if not loaders:
            self._warn_once("no-bn-data", "SWA: no training data to recompute the BatchNorm statistics of "
                            "the average; evaluating it with the raw model's statistics")
            return
        limit = trainer.num_training_batches if trainer.train_dataloader is not None else float("inf")
        if self.bn_update_batches is not None:
            limit = min(limit, self.bn_update_batches)

        def batches() -> Iterator[Any]:
            for b in loaders[0]:
                yield trainer.strategy.batch_to_device(b)

        def forward(batch: Any) -> Any:
            return pl_module(batch[0] if isinstance(batch, (list, tuple)) else batch)

        with _untouched(pl_module, loaders), torch.no_grad():
            update_bn(pl_module, batches(), forward, max_batches=limit)
            if trainer.world_size > 1:
                # each rank saw its shard: average the statistics so every rank evaluates the same model
                for b in buffers.values():
                    if b.is_floating_point():
                        b.copy_(trainer.strategy.reduce(b.clone(), reduce_op="mean"))
        self._bn_state = {n: b.detach().clone() for n, b in buffers.items()}
        self._bn_version = self.num_averaged

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._started and self._bn_state is not None and self._bn_version == self.num_averaged:
            # the averaged weights as evaluated: with the BatchNorm statistics recomputed for them
            state[AVERAGE_STATE_KEY].update({n: t.clone() for n, t in self._bn_state.items()})
        return state

    def _extra_state(self) -> dict[str, Any]:
        return {"num_averaged": self.num_averaged, "start_epoch": self.start_epoch, "last_step": self._last_step,
                "last_epoch_averaged": self._last_epoch_averaged, "swa_steps": self._swa_steps,
                "lr0": self._lr0, "bn_state": self._bn_state, "bn_version": self._bn_version}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.num_averaged = int(state.get("num_averaged", 0))
        start_epoch = state.get("start_epoch")
        if start_epoch is not None and self.start_epoch is None:
            self.start_epoch = int(start_epoch)
        self._last_step = int(state.get("last_step", -1))
        self._last_epoch_averaged = int(state.get("last_epoch_averaged", -1))
        self._swa_steps = int(state.get("swa_steps", 0))
        self._lr0 = state.get("lr0")
        self._bn_state = state.get("bn_state")
        self._bn_version = int(state.get("bn_version", -1))
