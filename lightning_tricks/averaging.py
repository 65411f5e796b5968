"""Weight averaging cores: EMA / Polyak averaging, SWA running means, BatchNorm statistics update.

Pure functions and one small class, no Trainer. The callbacks in
:mod:`lightning_tricks.callbacks.ema` and :mod:`lightning_tricks.callbacks.swa` are thin wiring over these.

- :func:`ema_decay` is the decay used at one update, with the warmup of TensorFlow's
  ``ExponentialMovingAverage(num_updates=...)``: ``min(decay, (1 + t) / (10 + t))``.
- :func:`swa_weight` is the weight of the new sample in an equal running mean: ``1 / (n + 1)``.
- :func:`swa_lr` is the SWA learning rate annealed from the current LR to ``swa_lr`` (the schedule of
  ``torch.optim.swa_utils.SWALR``).
- :class:`WeightAverage` keeps float32 shadow copies of a module's floating-point parameters (and
  optionally buffers), grouped once by (device, dtype), so an update is one or a few
  ``torch._foreach_*`` calls: ``avg <- avg + w * (x - avg)`` (``torch._foreach_lerp_``).
- :func:`update_bn` recomputes BatchNorm running statistics as a cumulative average over one pass of
  data (``torch.optim.swa_utils.update_bn`` semantics) with a caller-given forward function.
- A checkpoint written with these callbacks holds in ``checkpoint["state_dict"]`` the weights its
  evaluation ran on (the average) and keeps the raw (training) values it replaced in a callback's state
  (:data:`RAW_WEIGHTS_KEY`); :func:`raw_state_dict` and :func:`averaged_state_dict` read either back.

References:
    Polyak, B. T. and Juditsky, A. B. (1992). Acceleration of stochastic approximation by averaging.
    Izmailov, P. et al. (2018). Averaging Weights Leads to Wider Optima and Better Generalization.
    arXiv:1803.05407.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tricks.checks import check_int
from lightning_tricks.schedules import (
    SWALRPhase,
    swa_lr,  # the SWA LR formula lives with the other LR formulas
)

__all__ = [
    "ema_decay",
    "swa_weight",
    "swa_lr",
    "lerp_",
    "WeightAverage",
    "update_bn",
    "bn_modules",
    "averaged_state_dict",
    "raw_state_dict",
    "raw_weights_record",
    "AVERAGE_STATE_KEY",
    "RAW_WEIGHTS_KEY",
    "RAW",
    "copy_into",
    "place_offer",
    "check_swa_args",
    "swa_start_epoch",
    "check_start_in_run",
    "swa_label",
    "swa_phase",
    "as_list",
    "untouched",
]

#: Key under which the averaging callbacks store ``{state_dict name: averaged tensor}`` in their state.
AVERAGE_STATE_KEY = "average"

#: Key, in one callback's checkpoint state, of ``{"label": what checkpoint["state_dict"] holds, "rank": int,
#: "tensors": {state_dict name: raw value it replaced}}`` (written by ``ModuleWeights.save_into``).
RAW_WEIGHTS_KEY = "raw_weights"


def ema_decay(num_updates: int, decay: float, warmup: bool = True, every_n_steps: int = 1) -> float:
    """The EMA decay of update number ``num_updates`` (0 for the first update).

    ``min(decay, (1 + t) / (10 + t))`` with warmup (TensorFlow's ``ExponentialMovingAverage`` with
    ``num_updates``), else ``decay``; raised to the power ``every_n_steps`` when the average is updated
    only every ``every_n_steps`` optimizer steps, so that it keeps the horizon of an every-step EMA
    (``decay ** n`` over ``n`` steps, as Composer's ``EMA`` converts its half-life to a smoothing factor
    per update interval). Computed on the host from ints, so it never syncs a device.

    Example:
        >>> [round(ema_decay(t, 0.999), 4) for t in (0, 1, 10, 10_000)]
        [0.1, 0.1818, 0.55, 0.999]
        >>> ema_decay(0, 0.9, warmup=False)
        0.9
        >>> round(ema_decay(10_000, 0.999, every_n_steps=4), 9)  # 0.999 ** 4
        0.996005996
    """
    if num_updates < 0:
        raise ValueError(f"num_updates must be >= 0, got {num_updates!r}")
    check_int("every_n_steps", every_n_steps, 1)
    d = float(decay) if not warmup else float(min(decay, (1.0 + num_updates) / (10.0 + num_updates)))
    return d if every_n_steps == 1 else d**every_n_steps


def swa_weight(num_averaged: int) -> float:
    """Weight of the next sample in an equal running mean of ``num_averaged`` samples: ``1 / (n + 1)``.

    ``avg_{n+1} = avg_n + (x - avg_n) / (n + 1)``; the first update (``n = 0``) copies ``x``.

    Example:
        >>> [swa_weight(n) for n in range(4)]
        [1.0, 0.5, 0.3333333333333333, 0.25]
    """
    if num_averaged < 0:
        raise ValueError(f"num_averaged must be >= 0, got {num_averaged!r}")
    return 1.0 / (num_averaged + 1)


@torch.no_grad()
def lerp_(averages: list[Tensor], values: list[Tensor], weight: float) -> None:
    """``avg <- avg + weight * (value - avg)`` for lists of tensors on one device.

    Same dtype: one ``torch._foreach_lerp_``. Different dtypes (float32 average of bfloat16/float16
    weights): ``torch._foreach_mul_`` then ``torch._foreach_add_`` (upcast in the kernel, no copy).
    ``weight == 1`` copies (``torch._foreach_copy_``), so the first SWA update is exact.
    """
    if not averages:
        return
    if weight == 1.0:
        torch._foreach_copy_(averages, values)
    elif averages[0].dtype == values[0].dtype:
        torch._foreach_lerp_(averages, values, weight)
    else:
        torch._foreach_mul_(averages, 1.0 - weight)
        torch._foreach_add_(averages, values, alpha=weight)


class _Group:
    """Averages and the live tensors they track, all on one (device, dtype) pair."""

    __slots__ = ("averages", "live", "staging")

    def __init__(self, averages: list[Tensor], live: list[Tensor], staging: list[Tensor] | None) -> None:
        self.averages = averages
        self.live = live
        self.staging = staging  # copies of ``live`` on the averages' device when the devices differ

    @torch.no_grad()
    def update_(self, weight: float) -> None:
        values = self.live
        if self.staging is not None:
            # a blocking copy: the averages' device reads the values right after
            torch._foreach_copy_(self.staging, self.live)
            values = self.staging
        lerp_(self.averages, values, weight)


class WeightAverage:
    """Float32 shadow copies of a module's floating-point parameters (and buffers), updated with foreach ops.

    The tensors are collected by name and grouped by (device, dtype) once, in :meth:`bind`; an update
    is then one ``torch._foreach_lerp_`` per group (one group for a model on one device in one dtype),
    with no Python loop over parameters and no host-device sync (except ``device="cpu"`` for a model
    on an accelerator: the copy to the host has to finish before the host averages it).

    Args:
        module: the module whose tensors are averaged.
        buffers: also average floating-point buffers (BatchNorm ``running_mean`` / ``running_var``);
            integer buffers (``num_batches_tracked``) are never averaged.
        device: where the averages live (default: next to each tensor); ``"cpu"`` saves accelerator memory.
        dtype: dtype of the averages (float32: the average of bfloat16 weights keeps its precision).

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> avg = WeightAverage(lin)
        >>> with torch.no_grad():
        ...     _ = lin.weight.add_(1.0)
        >>> avg.update_(0.5)  # avg = avg + 0.5 * (w - avg)
        >>> torch.allclose(avg.tensors()["weight"], lin.weight - 0.5)
        True
    """

    def __init__(
        self,
        module: nn.Module,
        buffers: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.buffers = bool(buffers)
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.names: list[str] = []
        self._averages: dict[str, Tensor] = {}
        self._live: dict[str, Tensor] = {}
        self._groups: list[_Group] = []
        self.bind(module, reset=True)

    # -- which tensors -----------------------------------------------------------------------------
    def _collect(self, module: nn.Module) -> dict[str, Tensor]:
        found: dict[str, Tensor] = {}
        seen: set[int] = set()
        for name, p in module.named_parameters():
            if p.is_floating_point() and id(p) not in seen:
                seen.add(id(p))
                found[name] = p
        if self.buffers:
            for name, b in module.named_buffers():
                if b.is_floating_point() and id(b) not in seen:
                    seen.add(id(b))
                    found[name] = b
        return found

    def bind(self, module: nn.Module, reset: bool = False) -> None:
        """(Re)collect ``module``'s live tensors by name and build the foreach groups.

        Call again after the module moved device (buffers are new objects then). ``reset=True`` (or a
        first bind) sets each average to a copy of its tensor; otherwise existing averages are kept,
        moved to the right device if needed.
        """
        live = self._collect(module)
        if (
            not reset
            and self._groups
            and list(live) == self.names
            and all(live[n] is self._live[n] for n in self.names)
        ):
            return  # same tensors as before: keep the groups (and any staging buffers)
        if self.names and set(live) != set(self.names):
            missing = sorted(set(self.names) ^ set(live))[:5]
            raise ValueError(f"the module's tensors differ from the averaged ones, e.g. {missing}")
        self.names = list(live)
        self._live = live
        grouped: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        for name, t in live.items():
            device = self.device if self.device is not None else t.device
            avg = self._averages.get(name)
            if avg is None or reset or avg.shape != t.shape:
                avg = t.detach().to(device=device, dtype=self.dtype, copy=True)
            elif avg.device != device:
                avg = avg.to(device)
            self._averages[name] = avg
            avgs, lives = grouped.setdefault((t.device, t.dtype), ([], []))
            avgs.append(avg)
            lives.append(t)
        self._groups = []
        for (dev, dt), (avgs, lives) in grouped.items():
            staging = None
            if avgs[0].device != dev:
                pin = avgs[0].device.type == "cpu" and dev.type == "cuda"
                staging = [torch.empty(t.shape, dtype=dt, device=avgs[0].device, pin_memory=pin) for t in lives]
            self._groups.append(_Group(avgs, lives, staging))

    # -- arithmetic --------------------------------------------------------------------------------
    @torch.no_grad()
    def update_(self, weight: float) -> None:
        """``avg <- avg + weight * (x - avg)`` for every tracked tensor ``x``.

        EMA with decay ``d``: ``weight = 1 - d``; an equal running mean of ``n`` samples:
        ``weight = 1 / (n + 1)``.
        """
        for g in self._groups:
            g.update_(weight)

    @torch.no_grad()
    def reset_(self) -> None:
        """Set every average to its live tensor (``avg <- x``)."""
        for g in self._groups:
            torch._foreach_copy_(g.averages, g.live)

    @torch.no_grad()
    def copy_to_module_(self) -> None:
        """Write the averages into the module's tensors (``x <- avg``, cast to each tensor's dtype)."""
        for g in self._groups:
            torch._foreach_copy_(g.live, g.averages)

    def live(self) -> dict[str, Tensor]:
        """``{state_dict name: module tensor}`` of the tensors this average tracks."""
        return dict(self._live)

    def tensors(self) -> dict[str, Tensor]:
        """``{state_dict name: average}`` (the averages themselves, not copies)."""
        return {n: self._averages[n] for n in self.names}

    def numel(self) -> int:
        return sum(a.numel() for a in self._averages.values())

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """``{name: average}`` detached clones (safe to save while training goes on)."""
        return {n: self._averages[n].detach().clone() for n in self.names}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy saved averages in place (names must match the bound module's tensors)."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"averaged state lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
        for n in self.names:
            self._averages[n].copy_(state[n])


def snapshot(tensors: list[Tensor]) -> list[Tensor]:
    """Detached clones of ``tensors`` (a backup to restore later with :func:`restore_`)."""
    return [t.detach().clone() for t in tensors]


@torch.no_grad()
def restore_(tensors: list[Tensor], saved: list[Tensor]) -> None:
    """Copy ``saved`` back into ``tensors`` in place (one ``torch._foreach_copy_``)."""
    if tensors:
        torch._foreach_copy_(tensors, saved)


def bn_modules(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers (with running statistics) of ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def bn_buffers(module: nn.Module) -> dict[str, Tensor]:
    """``{name: buffer}`` of the running statistics of every BatchNorm layer in ``module``."""
    ids = {id(b) for m in bn_modules(module) for b in m.buffers(recurse=False)}
    return {n: b for n, b in module.named_buffers() if id(b) in ids}


@torch.no_grad()
def update_bn(
    module: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[Any], Any] | None = None,
    max_batches: int | float | None = None,
) -> int:
    """Recompute BatchNorm running statistics over ``batches``: a cumulative (equal) average.

    Resets every BatchNorm's running statistics, sets ``momentum=None`` (cumulative moving average),
    runs ``forward(batch)`` in train mode over at most ``max_batches`` batches, then restores the
    momenta and the train/eval mode: ``torch.optim.swa_utils.update_bn`` semantics, with the forward
    call given by the caller (default: ``module(batch[0])`` for a list/tuple batch, else
    ``module(batch)``). Returns the number of batches seen (0 and no change if there is no BatchNorm).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> update_bn(net, [torch.randn(8, 3) for _ in range(2)])
        2
    """
    layers = bn_modules(module)
    if not layers:
        return 0
    if forward is None:

        def forward(batch: Any) -> Any:
            return module(batch[0] if isinstance(batch, (list, tuple)) else batch)

    momenta = {m: m.momentum for m in layers}
    was_training = module.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    seen = 0
    try:
        for batch in batches:
            if max_batches is not None and seen >= max_batches:
                break
            forward(batch)
            seen += 1
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        module.train(was_training)
    return seen


def raw_weights_record(checkpoint: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The record of what ``checkpoint["state_dict"]`` holds (see :data:`RAW_WEIGHTS_KEY`), ``None`` if absent.

    Absent in checkpoints written without the averaging callbacks, and in those written before the
    state dict held the evaluated weights (their ``state_dict`` is the raw weights).
    """
    for state in (checkpoint.get("callbacks") or {}).values():
        record = state.get(RAW_WEIGHTS_KEY) if isinstance(state, Mapping) else None
        if isinstance(record, Mapping):
            return record
    return None


def raw_state_dict(checkpoint: Mapping[str, Any], state_dict_key: str = "state_dict") -> dict[str, Tensor]:
    """The raw (training) weights of a Lightning checkpoint: its ``state_dict`` with the replaced values put back.

    Example:
        >>> record = {"label": "ema", "rank": 1, "tensors": {"w": torch.zeros(1)}}
        >>> ckpt = {"state_dict": {"w": torch.ones(1)}, "callbacks": {"EMA": {RAW_WEIGHTS_KEY: record}}}
        >>> raw_state_dict(ckpt)["w"], ckpt["state_dict"]["w"]
        (tensor([0.]), tensor([1.]))
    """
    state = dict(checkpoint[state_dict_key])
    record = raw_weights_record(checkpoint)
    if record is not None:
        state.update({n: t for n, t in (record.get("tensors") or {}).items() if n in state})
    return state


def averaged_state_dict(
    checkpoint: Mapping[str, Any],
    which: str | None = None,
    state_dict_key: str = "state_dict",
) -> dict[str, Tensor]:
    """The module state dict of a Lightning checkpoint with one callback's averaged weights put in.

    The averaging callbacks keep their averages in their own callback state (and, when evaluation ran
    on one, in ``checkpoint["state_dict"]`` too, with the raw values kept for resume: see
    :func:`raw_state_dict`). This puts the chosen average over the raw weights: each averaged tensor
    replaces its raw counterpart, cast to the raw tensor's dtype.

    Args:
        checkpoint: a loaded Lightning checkpoint (``torch.load(path)``).
        which: a substring of the averaging callback's state key (``"EMA"``, ``"SWA"``, or a full
            key); ``None`` takes the only averaging state in the checkpoint.
        state_dict_key: where the module weights are in the checkpoint.

    Raises:
        KeyError: no averaging state (or several and ``which`` is None, or none matching ``which``).
    """
    raw = raw_state_dict(checkpoint, state_dict_key)
    states = {
        k: v
        for k, v in (checkpoint.get("callbacks") or {}).items()
        if isinstance(v, Mapping) and isinstance(v.get(AVERAGE_STATE_KEY), Mapping) and v.get("started", True)
    }
    if which is not None:
        states = {k: v for k, v in states.items() if which == k or which in k}
    if len(states) != 1:
        raise KeyError(
            f"need exactly one started averaging state (which={which!r}), found "
            f"{sorted(states) or 'none'} among callbacks {sorted(checkpoint.get('callbacks') or {})}"
        )
    (state,) = states.values()
    for name, avg in state[AVERAGE_STATE_KEY].items():
        ref = raw.get(name)
        raw[name] = avg.to(dtype=ref.dtype) if ref is not None else avg
    return raw


RAW = "raw"  # the label of a module's own (training) weights


@torch.no_grad()
def copy_into(
    buffers: dict[str, Tensor], tensors: Mapping[str, Tensor], device: torch.device | None = None
) -> dict[str, Tensor]:
    """``tensors`` copied into ``buffers`` (one foreach copy); returns the buffers written.

    The buffers are allocated again (on ``device``, else each tensor's) when a name, shape, dtype or
    device differs, or when inference-mode buffers would be written outside inference mode.
    """
    in_inference_mode = torch.is_inference_mode_enabled()
    if buffers.keys() != tensors.keys() or any(
        b.shape != tensors[n].shape
        or b.dtype != tensors[n].dtype
        or b.device != (device or tensors[n].device)
        or (b.is_inference() and not in_inference_mode)
        for n, b in buffers.items()
    ):
        buffers = {n: torch.empty_like(t, device=device or t.device) for n, t in tensors.items()}
    if tensors:
        torch._foreach_copy_([buffers[n] for n in tensors], list(tensors.values()))
    return buffers


def place_offer(
    checkpoint: dict[str, Any],
    state_key: str,
    held: tuple[int, str],
    backup: Mapping[str, Tensor],
    label: str | None,
    tensors: Mapping[str, Tensor] | None,
    rank: int,
) -> None:
    """Put the weights an evaluation runs on into ``checkpoint["state_dict"]``; keep the raw ones for resume.

    ``held``: ``(rank, label)`` of what the module holds (``backup``: the raw values it replaced);
    ``label``/``tensors``/``rank``: the caller's offer, ``state_key`` its callback state. Whatever the call
    order: a held label is in the state dict already; with the raw weights held, the highest
    ``(rank, label)`` offer goes in. The replaced raw values go to one callback state under
    :data:`RAW_WEIGHTS_KEY`; an offer of the state dict's dtype and device is stored as is, so it is in
    the file once.
    """
    sd = checkpoint.get("state_dict")
    states = checkpoint.get("callbacks")
    if not isinstance(sd, dict) or not isinstance(states, dict):
        return  # a weights-only checkpoint: Lightning calls no callback hook for it
    holder = next((k for k, v in states.items() if isinstance(v, dict) and RAW_WEIGHTS_KEY in v), None)
    if holder is None:
        if held[1] != RAW:
            tensors_raw = {n: v.detach().clone() for n, v in backup.items() if n in sd}
            record: dict[str, Any] = {"label": held[1], "rank": held[0], "tensors": tensors_raw}
        else:
            record = {"label": RAW, "rank": 0, "tensors": {}}
        holder = state_key
        states.setdefault(holder, {})[RAW_WEIGHTS_KEY] = record
    record = states[holder][RAW_WEIGHTS_KEY]
    if held[1] != RAW or not label or not tensors or (rank, label) <= (record["rank"], record["label"]):
        return
    raw = record["tensors"]
    for name in [n for n in raw if n not in tensors]:  # put in by an offer this one outranks
        sd[name] = raw.pop(name)
    for name, value in tensors.items():
        ref = sd.get(name)
        if ref is None:
            continue
        raw.setdefault(name, ref)
        same = value.dtype == ref.dtype and value.device == ref.device
        sd[name] = value if same else value.detach().to(device=ref.device, dtype=ref.dtype)
    record["label"], record["rank"] = label, rank
    if holder != state_key:
        states.setdefault(state_key, {})[RAW_WEIGHTS_KEY] = states[holder].pop(RAW_WEIGHTS_KEY)


def check_swa_args(start: Any, swa_lr: Any, anneal_epochs: Any, anneal_steps: Any) -> None:
    """Raise ``ValueError`` naming the first bad SWA argument."""
    if (
        isinstance(start, bool)
        or not isinstance(start, (int, float))
        or (isinstance(start, float) and not 0.0 < start < 1.0)
        or (isinstance(start, int) and start < 0)
    ):
        raise ValueError(f"start must be a fraction in (0, 1) or an int epoch >= 0, got {start!r}")
    if swa_lr is not None and not (isinstance(swa_lr, (int, float)) and math.isfinite(swa_lr) and swa_lr > 0):
        raise ValueError(f"swa_lr must be a positive number or None, got {swa_lr!r}")
    if anneal_epochs is not None and anneal_steps is not None:
        raise ValueError(f"give anneal_epochs or anneal_steps, not both (got {anneal_epochs!r} and {anneal_steps!r})")
    check_int("anneal_epochs", anneal_epochs, 0, allow_none=True)
    check_int("anneal_steps", anneal_steps, 0, allow_none=True)
    if (anneal_epochs or anneal_steps) and swa_lr is None:
        raise ValueError("anneal_epochs/anneal_steps need swa_lr (the LR to anneal to)")


def swa_start_epoch(start: float | int, max_epochs: int | None) -> int:
    """The first averaged epoch: ``int(start * max_epochs)`` for a fraction, else ``start``; inside the run.

    Example:
        >>> swa_start_epoch(0.75, 20), swa_start_epoch(3, None)
        (15, 3)
    """
    known = max_epochs is not None and max_epochs > 0
    if isinstance(start, float):
        if not known:
            raise ValueError(
                f"SWA start={start} is a fraction of max_epochs, but max_epochs is "
                f"{max_epochs!r}; set max_epochs or give start as an int epoch"
            )
        epoch = int(start * max_epochs)  # type: ignore[operator]
    else:
        epoch = int(start)
    if known and epoch >= max_epochs:  # type: ignore[operator]
        raise ValueError(
            f"SWA start={start!r} resolves to epoch {epoch}, beyond the run "
            f"(max_epochs={max_epochs}, epochs 0..{max_epochs - 1})"  # type: ignore[operator]
        )
    return epoch


def check_start_in_run(start_epoch: int | None, total_steps: float, batches: float, accumulate: int) -> None:
    """Raise ``ValueError`` when ``start_epoch`` is past a run of ``total_steps`` optimizer steps.

    The run's epochs are ``ceil(total_steps / ceil(batches / accumulate))``; an unknown length checks nothing.
    """
    if start_epoch is None or not (math.isfinite(total_steps) and math.isfinite(batches) and batches > 0):
        return
    epochs = math.ceil(total_steps / math.ceil(batches / max(1, accumulate)))
    if start_epoch >= epochs:
        raise ValueError(
            f"SWA start epoch {start_epoch} is beyond the run "
            f"(about {epochs} epochs of {int(total_steps)} optimizer steps)"
        )


def swa_label(swa_lr: float | None, anneal_epochs: int | None, anneal_steps: int | None) -> str:
    """The name SWA's LR phase goes by in messages."""
    if anneal_steps is not None:
        return f"SWA(swa_lr={swa_lr}, anneal_steps={anneal_steps})"
    anneal = f", anneal_epochs={anneal_epochs}" if anneal_epochs else ""
    return f"SWA(swa_lr={swa_lr}{anneal})"


def swa_phase(
    swa_lr: float,
    start_epoch: int,
    batches: float,
    accumulate: int,
    anneal: str = "cos",
    anneal_steps: int | None = None,
    anneal_epochs: int | None = None,
) -> SWALRPhase:
    """SWA's LR phase from the first optimizer step of ``start_epoch``.

    ``steps_per_epoch = ceil(batches / accumulate)``; ``batches`` may be infinite only when no epoch count
    is needed (``start_epoch=0`` and no ``anneal_epochs``).

    Example:
        >>> swa_phase(0.05, 3, 10, 2).start_step
        15
    """
    per_epoch = None
    if math.isfinite(batches) and batches > 0:
        per_epoch = math.ceil(int(batches) / max(1, accumulate))
    elif start_epoch > 0 or anneal_epochs:
        raise ValueError(
            f"{swa_label(swa_lr, anneal_epochs, anneal_steps)} with start epoch {start_epoch} needs the number "
            f"of batches per epoch, but the train data has none ({batches}); give the loader a length or use "
            "start=0 with anneal_steps"
        )
    return SWALRPhase(
        swa_lr=swa_lr,
        start_step=start_epoch * (per_epoch or 0),
        anneal=anneal,
        anneal_steps=anneal_steps,
        anneal_epochs=anneal_epochs or None,
        steps_per_epoch=per_epoch,
    )


def as_list(loaders: Any) -> list[Any]:
    """A loader, or a list/tuple/dict of them, as a list."""
    if loaders is None:
        return []
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    if isinstance(loaders, dict):
        return list(loaders.values())
    return [loaders]


@contextlib.contextmanager
def untouched(pl_module: nn.Module, loaders: list[Any]) -> Iterator[None]:
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
