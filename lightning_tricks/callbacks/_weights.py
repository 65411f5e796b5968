"""Which weights are in the module: one service per module, the only writer of swapped-in weights.

EMA/SWA averages, restore-best and snapshots go through :func:`weights_of`, so there is one backup of
the raw weights and one end-of-fit rule whatever the callback order (restore-best > average > raw).
Who asks for what, and why: ``docs/method_cards.md`` (EMA, "the weights service"). Torch only.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tricks.averaging import RAW, copy_into, place_offer, raw_weights_record, restore_, snapshot

__all__ = ["AVERAGE", "BEST", "RAW", "ModuleWeights", "copy_into", "weights_of"]

#: ranks of :meth:`ModuleWeights.hand_over`: the highest offered at the end of fit is what the module holds
AVERAGE = 1
BEST = 2

_SERVICES: weakref.WeakKeyDictionary[nn.Module, ModuleWeights] = weakref.WeakKeyDictionary()


def weights_of(module: nn.Module) -> ModuleWeights:
    """The :class:`ModuleWeights` of ``module`` (created on first use, dropped with the module)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"weights_of needs an nn.Module, got {type(module).__name__}")
    service = _SERVICES.get(module)
    if service is None:
        service = _SERVICES[module] = ModuleWeights(module)
    return service


class ModuleWeights:
    """Swaps labelled weights into one module and keeps the one backup of its raw weights.

    Use :func:`weights_of` rather than building one, so every caller shares it.

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> w = weights_of(lin)
        >>> raw = lin.weight.detach().clone()
        >>> w.hold("ema", {"weight": torch.zeros(1, 2)})
        >>> w.held, float(lin.weight.abs().sum()), torch.equal(w.raw_tensors()["weight"], raw)
        ('ema', 0.0, True)
        >>> w.hold_raw(); torch.equal(lin.weight, raw)
        True
    """

    def __init__(self, module: nn.Module) -> None:
        self._module = weakref.ref(module)
        self._held = RAW
        self._backup: dict[str, Tensor] | None = None  # name -> raw value, while a label is held
        self._held_rank = 0  # rank given with the held label (0: raw or plain hold)
        self._end_offer: tuple[int, str] = (0, RAW)  # (rank, label) handed over at the end of the current fit
        self._in_evaluation = False
        self._measured: str | None = None
        self._track = False
        self._measured_copy: dict[str, Tensor] = {}  # the held tensors at the last evaluation_end

    # -- what is where -----------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        module = self._module()
        if module is None:  # pragma: no cover - the service dies with its module
            raise RuntimeError("the module of this ModuleWeights was garbage-collected")
        return module

    @property
    def held(self) -> str:
        """The label of the weights in the module now: ``"raw"`` or the label given to :meth:`hold`."""
        return self._held

    def outranks(self, rank: int, label: str) -> bool:
        """Whether weights ``(rank, label)`` take precedence over what the module holds now.

        Higher rank first, then the label that sorts last; raw is outranked by anything.
        """
        return self._held == RAW or (rank, label) > (self._held_rank, self._held)

    @property
    def measured(self) -> str | None:
        """What the last finished evaluation ran on (the label held at its end), ``None`` before one."""
        return self._measured

    def _live(self) -> dict[str, Tensor]:
        return {n: t.detach() for n, t in self.module.state_dict(keep_vars=True).items()}

    def raw_tensors(self) -> dict[str, Tensor]:
        """``{state_dict name: tensor}`` of the raw weights, wherever they are now.

        The values are the module's own tensors or the backup, not copies: copy what you keep.
        """
        out = self._live()
        if self._backup is not None:
            out.update(self._backup)
        return out

    # -- swapping ----------------------------------------------------------------------------------
    @torch.no_grad()
    def hold(
        self,
        label: str,
        tensors: Mapping[str, Tensor],
        after_load: Callable[[], None] | None = None,
        also: Iterable[str] = (),
        rank: int = 0,
    ) -> None:
        """Copy ``tensors`` (``state_dict`` names) into the module and call it ``label``.

        The raw weights are backed up first (once: if another label is held, the raw weights are put
        back before). ``after_load`` runs right after the copy and may write the module tensors named
        in ``also`` (e.g. SWA recomputes BatchNorm statistics); those are backed up too. ``rank``
        (``AVERAGE``, ``BEST``) is what :meth:`outranks` compares with.
        """
        if not isinstance(label, str) or not label or label == RAW:
            raise ValueError(f"label must be a non-empty name other than {RAW!r}, got {label!r}")
        self.hold_raw()
        live = self._live()
        names = list(tensors) + [n for n in also if n not in tensors]
        unknown = [n for n in names if n not in live]
        if unknown:
            raise KeyError(f"{label!r}: the module {type(self.module).__name__} has no tensor(s) {unknown[:5]}")
        saved = snapshot([live[n] for n in names])
        self._backup = dict(zip(names, saved))
        self._held = label
        self._held_rank = rank
        try:
            if tensors:
                torch._foreach_copy_([live[n] for n in tensors], [tensors[n] for n in tensors])
            if after_load is not None:
                after_load()
        except BaseException:
            self.hold_raw()
            raise

    @torch.no_grad()
    def hold_raw(self) -> None:
        """Put the raw weights back (nothing to do if the module holds them)."""
        if self._backup is not None:
            live = self._live()
            restore_([live[n] for n in self._backup], list(self._backup.values()))
        self.reloaded()

    @contextlib.contextmanager
    def raw(self) -> Iterator[None]:
        """The raw weights in the module for the duration, then what was held before, exactly."""
        with self.keep():
            self.hold_raw()
            yield

    @contextlib.contextmanager
    def keep(self) -> Iterator[None]:
        """Whatever is swapped in the duration, put back the label and the values held before it."""
        label, rank = self._held, self._held_rank
        held_values: dict[str, Tensor] = {}
        if self._backup is not None:
            live = self._live()
            held_values = {n: v for n, v in zip(self._backup, snapshot([live[n] for n in self._backup]))}
        try:
            yield
        finally:
            self.hold_raw()
            if label != RAW:
                self.hold(label, held_values, rank=rank)

    def reloaded(self) -> None:
        """The module's weights were just overwritten (a checkpoint loaded into it): it holds raw weights."""
        self._backup = None
        self._held = RAW
        self._held_rank = 0

    # -- checkpoints -------------------------------------------------------------------------------
    def save_into(
        self,
        checkpoint: dict[str, Any],
        state_key: str,
        label: str | None = None,
        tensors: Mapping[str, Tensor] | None = None,
        rank: int = AVERAGE,
    ) -> None:
        """Make ``checkpoint["state_dict"]`` hold the weights an evaluation runs on; keep the raw ones for resume.

        Every participant calls it from ``on_save_checkpoint``; the rule is
        :func:`~lightning_tricks.averaging.place_offer`.
        """
        held = (self._held_rank, self._held)
        place_offer(checkpoint, state_key, held, self._backup or {}, label, tensors, rank)

    @torch.no_grad()
    def load_raw(self, checkpoint: Mapping[str, Any]) -> None:
        """Lightning has just loaded ``checkpoint["state_dict"]`` into the module: put its raw weights back.

        The module then holds the raw (training) weights of the checkpoint, so a resumed fit trains on
        exactly; the averaging callbacks take their averages from their own states. Every participant
        may call it (the copy is repeated, the result is the same).
        """
        self.reloaded()
        record = raw_weights_record(checkpoint) or {}
        raw = record.get("tensors") or {}
        live = self._live()
        names = [n for n in raw if n in live]
        if names:
            torch._foreach_copy_([live[n] for n in names], [raw[n] for n in names])

    # -- evaluations and what they measured ---------------------------------------------------------
    def evaluation_start(self) -> None:
        """An evaluation begins (idempotent: every participant may call it)."""
        if not self._in_evaluation:
            self._in_evaluation = True
            self._measured = None

    @torch.no_grad()
    def evaluation_end(self) -> None:
        """An evaluation ended: record what it ran on. Participants call this BEFORE they swap back.

        The first call after :meth:`evaluation_start` records; later ones are no-ops. With
        :meth:`track_measured` on and a label held, its tensors are copied (one foreach copy into
        buffers allocated once) so :meth:`measured_tensors` has them after the swap back.
        """
        if not self._in_evaluation:
            return
        self._in_evaluation = False
        self._measured = self._held
        if self._track and self._backup is not None:
            with torch.inference_mode(False):  # buffers written again later, outside any inference mode
                self._copy_measured()

    def _copy_measured(self) -> None:
        live = self._live()
        self._measured_copy = copy_into(self._measured_copy, {n: live[n] for n in self._backup or {}})

    def track_measured(self, on: bool = True) -> None:
        """Keep a copy of swapped-in weights at each evaluation end (costs one copy of them in memory)."""
        self._track = bool(on)
        if not on:
            self._measured_copy = {}

    def measured_tensors(self) -> dict[str, Tensor]:
        """``{state_dict name: tensor}`` of the weights the last evaluation ran on (not copies).

        Valid until the next training step or evaluation. Raises ``RuntimeError`` if no evaluation was
        recorded, or if a label was measured, is no longer held and :meth:`track_measured` was off.
        """
        label = self._measured
        if label is None:
            raise RuntimeError("no evaluation was recorded (evaluation_start/evaluation_end were not called)")
        if label == self._held:
            return self._live()
        if label == RAW:
            return self.raw_tensors()
        if not self._track or not self._measured_copy:
            raise RuntimeError(
                f"the last evaluation ran on {label!r}, which is no longer in the module, and track_measured() was off"
            )
        out = self.raw_tensors()
        out.update(self._measured_copy)
        return out

    # -- fit ---------------------------------------------------------------------------------------
    def fit_start(self) -> None:
        """A fit starts: it trains the raw weights, and the end-of-fit hand-over starts over."""
        self.hold_raw()
        self._end_offer = (0, RAW)
        self._in_evaluation = False

    def hand_over(
        self,
        rank: int,
        label: str,
        tensors: Mapping[str, Tensor],
        after_load: Callable[[], None] | None = None,
        also: Iterable[str] = (),
    ) -> bool:
        """Offer the weights the module should hold after fit; the highest ``rank`` offered wins.

        ``BEST`` (restore-best) > ``AVERAGE`` (EMA/SWA ``average_at_end``) > raw (nothing offered),
        whatever the order of the offers; at equal rank the label that sorts last. Returns whether
        the module now holds ``label``.
        """
        if (rank, label) <= self._end_offer:
            return False
        self._end_offer = (rank, label)
        self.hold(label, tensors, after_load=after_load, also=also, rank=rank)
        return True
