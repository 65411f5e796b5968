"""Ensembles of one run's checkpoints (or snapshots): mean of softmax, evaluated with torchmetrics.

The prediction of an ensemble of ``M`` members is the mean of their class probabilities,

.. math:: p(y \\mid x) = \\frac{1}{M} \\sum_{m=1}^{M} \\mathrm{softmax}(f_{\\theta_m}(x)),

the rule of snapshot ensembles (Huang, Li, Pleiss, Liu, Hopcroft, Weinberger 2017, "Snapshot
Ensembles: Train 1, get M for free", arXiv:1704.00109) and of checkpoint ensembles (Chen, Lundberg,
Lee 2017, "Checkpoint Ensembles: Ensemble Methods from a Single Training Process", arXiv:1710.03282).

- :func:`mean_softmax` is the rule; :func:`evaluate_members` evaluates each member and the ensemble
  on a loader with one working copy of the model (members loaded one at a time, class probabilities
  summed), so memory stays one model plus ``N x C`` probabilities whatever ``M``.
- :class:`CheckpointEnsemble` builds an ensemble from checkpoint files, from the best-k or last-k
  checkpoints of a :class:`~lightning_tricks._lightning.ModelCheckpoint`, or from state dicts, then
  evaluates it, predicts with it, or becomes an ``nn.Module`` (:class:`EnsembleModule`).
- With test-time augmentation (``tta``, :func:`lightning_tricks.augment.tta_predict`) each member's
  probabilities are its mean softmax over the views, and the ensemble is the mean over members of
  those: ``p = (1/M) sum_m (1/V) sum_v softmax(f_m(view_v(x)))``.

Modules whose hyperparameters do not rebuild them (``Classifier`` does not save its ``net``) are
rebuilt from a *template*: a module or a zero-argument factory; each member's weights are loaded into
a copy of it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> template = nn.Linear(4, 3)
    >>> states = [nn.Linear(4, 3).state_dict() for _ in range(2)]
    >>> ens = CheckpointEnsemble(template, states)
    >>> probs = ens.predict_proba(torch.zeros(5, 4))
    >>> probs.shape, bool(torch.allclose(probs.sum(dim=1), torch.ones(5)))
    (torch.Size([5, 3]), True)
"""

from __future__ import annotations

import copy
import math
import pickle
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_tricks.augment import check_tta, tta_predict
from lightning_tricks.averaging import averaged_state_dict, raw_state_dict, raw_weights_record
from lightning_tricks.checks import check_choice, check_int
from lightning_tricks.losses import probability_nll
from lightning_tricks.schedules import CosineRestarts

__all__ = [
    "mean_softmax",
    "MeanNLL",
    "load_weights",
    "check_member",
    "state_dict_mismatch",
    "evaluate_members",
    "EnsembleModule",
    "CheckpointEnsemble",
    "model_checkpoint_paths",
    "snapshot_steps",
    "check_cycles_match",
]

Source = str | Path | Mapping[str, Any]
Template = nn.Module | Callable[[], nn.Module]


def mean_softmax(logits: Sequence[Tensor]) -> Tensor:
    """The mean over members of ``softmax(logits_m)`` along the last dimension (float32).

    Example:
        >>> mean_softmax([torch.tensor([[0.0, 0.0]]), torch.tensor([[10.0, -10.0]])])
        tensor([[0.7500, 0.2500]])
    """
    if not logits:
        raise ValueError("mean_softmax needs at least one member's logits")
    total = logits[0].float().softmax(dim=-1)
    for lg in logits[1:]:
        total = total + lg.float().softmax(dim=-1)
    return total / len(logits)


def load_checkpoint(path: str | Path, map_location: Any = "cpu", trusted: bool = False, **kwargs: Any) -> Any:
    """``torch.load`` that cannot run code from the file unless the user vouches for it.

    Loads with ``weights_only=True`` (tensors, plain containers and numbers: what Lightning and this
    library write). A file that needs more is refused with a ``ValueError`` naming the file and the
    type it asked for; ``trusted=True`` (a file you made or vouch for) loads it with full unpickling.
    """
    if trusted:
        return torch.load(path, map_location=map_location, weights_only=False, **kwargs)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global|Unsupported operand|global) ?:? ?GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else str(e).strip().splitlines()[0][:200]
        raise ValueError(
            f"refused to load {path}: it holds {what}, which a weights-only load does not allow "
            "(loading it could run code). If you made this file or trust it, pass trusted=True"
        ) from e


def load_weights(
    source: Source, use_average: bool | None = None, map_location: Any = "cpu", trusted: bool = False
) -> dict[str, Tensor]:
    """A module state dict from a checkpoint path, a loaded Lightning checkpoint, or a state dict.

    Args:
        source: a path to a ``.ckpt``/``.pt`` file, a Lightning checkpoint dict (with ``"state_dict"``),
            or a plain state dict.
        use_average: for a checkpoint written with :class:`~lightning_tricks.callbacks.EMA` or
            :class:`~lightning_tricks.callbacks.SWA`: ``None`` takes the weights its evaluation ran on
            (its ``state_dict``; in a checkpoint from before the state dict held them, the only started
            average), ``True`` requires the average, ``False`` takes the raw training weights.
        map_location: passed to ``torch.load``.
        trusted: load a file with full unpickling (see :func:`load_checkpoint`; default: weights only).
    """
    if isinstance(source, (str, Path)):
        source = load_checkpoint(source, map_location=map_location, trusted=trusted)
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a path, a checkpoint dict or a state dict, got {type(source).__name__}")
    if "state_dict" not in source:
        if use_average:
            raise KeyError("use_average=True needs a Lightning checkpoint with an EMA/SWA state, got a state dict")
        return dict(source)
    if use_average is False:
        return raw_state_dict(source)
    if use_average is None and raw_weights_record(source) is not None:
        return dict(source["state_dict"])
    try:
        return averaged_state_dict(source)
    except KeyError:
        if use_average:
            raise
        return dict(source["state_dict"])


def state_dict_mismatch(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """How a saved state dict does not fit a model's (``expected``), in a few words, or ``None`` if it fits.

    The first tensor of the model the file lacks, else the first whose shape differs, else the first
    the model has not.

    Example:
        >>> state_dict_mismatch({"w": torch.zeros(3, 2)}, {"w": torch.zeros(4, 2)})
        "'w' has shape (3, 2) in the file, (4, 2) in the model"
    """
    for name, ref in expected.items():
        if name not in saved:
            return f"the file has no {name!r} {tuple(ref.shape)}, which the model has"
        shape = tuple(getattr(saved[name], "shape", ()))
        if shape != tuple(ref.shape):
            return f"{name!r} has shape {shape} in the file, {tuple(ref.shape)} in the model"
    extra = next((n for n in saved if n not in expected), None)
    if extra is not None:
        return f"the file has {extra!r} {tuple(getattr(saved[extra], 'shape', ()))}, which the model has not"
    return None


def check_member(source: str, state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    """Refuse a member whose tensors do not fit the template: one line naming the file and the first difference.

    Raises:
        ValueError: see :func:`state_dict_mismatch`.
    """
    mismatch = state_dict_mismatch(state, expected)
    if mismatch is not None:
        raise ValueError(f"CheckpointEnsemble member {source} does not fit the template: {mismatch}")


def _default_forward(module: nn.Module, batch: Any) -> Tensor:
    return module(batch[0] if isinstance(batch, (list, tuple)) else batch)


def _with_input(batch: Any, x: Tensor) -> Any:
    """``batch`` with its input (``batch[0]``, or the batch itself when it is a tensor) replaced by ``x``."""
    if isinstance(batch, (list, tuple)):
        return type(batch)([x, *batch[1:]])
    return x


def _batch_input(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _tta_probs(module: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Tensor], tta: str) -> Tensor:
    """``tta_predict`` of one member on one batch: each view replaces the batch's input before ``forward``."""

    def logits(x: Tensor) -> Tensor:
        return forward(module, _with_input(batch, x))

    return tta_predict(logits, _batch_input(batch), tta)


def _default_target(batch: Any) -> Tensor:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError("evaluation batches must be (x, y, ...) to read the targets")
    y = batch[1]
    return y.argmax(dim=-1) if y.is_floating_point() and y.ndim > 1 else y


class MeanNLL(MeanMetric):
    """The mean negative log-likelihood ``-log p[y]`` over ``update(probs, target)`` calls (torchmetrics)."""

    def update(self, probs: Tensor, target: Tensor) -> None:  # type: ignore[override]
        super().update(probability_nll(probs, target, reduction="none"))


def _make_metrics(num_classes: int, templates: Mapping[str, Any] | None, device: torch.device) -> dict[str, Any]:
    from torchmetrics.classification import MulticlassAccuracy

    if templates is None:
        metrics = {"acc": MulticlassAccuracy(num_classes, average="micro"), "nll": MeanNLL()}
    else:
        metrics = {k: m.clone() for k, m in templates.items()}
        for m in metrics.values():
            m.reset()
    return {k: m.to(device) for k, m in metrics.items()}


def _update(metrics: Mapping[str, Any], probs: Tensor, target: Tensor) -> None:
    for m in metrics.values():
        m.update(probs, target)


@torch.no_grad()
def evaluate_members(
    module: nn.Module,
    states: Sequence[Source | Callable[[], Mapping[str, Tensor]]],
    batches: Callable[[], Iterable[Any]],
    forward: Callable[[nn.Module, Any], Tensor] | None = None,
    target: Callable[[Any], Tensor] | None = None,
    metrics: Mapping[str, Any] | None = None,
    restore: bool = True,
    use_average: bool | None = None,
    load: Callable[[int, Mapping[str, Tensor]], None] | None = None,
    tta: str = "none",
) -> dict[str, Any]:
    """Metrics of each member and of the mean-of-softmax ensemble, one member at a time.

    Each member's weights are loaded into ``module`` (``load_state_dict``, strict), the module runs in
    eval mode over ``batches()`` (a fresh iterable of device batches each call, in the same order each
    time), and its class probabilities are added to a running sum; the ensemble's metrics are computed
    on the sum divided by ``M`` at the end. ``module``'s own weights and mode are restored afterwards
    unless ``restore=False``.

    Args:
        module: the working model (a copy of the architecture the members were saved from).
        states: the members: paths, checkpoint dicts, state dicts, or callables returning a state dict.
        batches: returns an iterable over ``(x, y, ...)`` batches on the module's device.
        forward: ``forward(module, batch) -> logits`` (default ``module(batch[0])``).
        target: ``target(batch) -> class indices`` (default ``batch[1]``; soft targets are argmaxed).
        metrics: ``{name: torchmetrics.Metric}`` templates updated with ``(probs, target)`` (cloned per
            member). Default: ``acc`` (micro accuracy) and ``nll`` (:class:`MeanNLL`).
        restore: put the module's weights back at the end.
        use_average: see :func:`load_weights`.
        load: ``load(m, state)`` puts member ``m``'s weights (0-based) into ``module`` (default
            ``module.load_state_dict(state)``). ``SnapshotEnsemble`` passes the module's weights
            service (:func:`lightning_tricks.callbacks._weights.weights_of`), which then also puts back
            what the module held; pass ``restore=False`` with it.
        tta: test-time augmentation of each member (:func:`~lightning_tricks.augment.tta_predict`): the
            views replace ``batch[0]`` (or a tensor batch) before ``forward``; ``"none"`` is the plain path.

    Returns:
        ``{"members": [{name: value}, ...], "ensemble": {name: value}}`` with float values.
    """
    if not states:
        raise ValueError("evaluate_members needs at least one member")
    check_tta(tta)
    forward = forward or _default_forward
    target = target or _default_target
    device = next((t.device for t in module.parameters()), torch.device("cpu"))
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()} if restore else None
    was_training = module.training
    members: list[dict[str, float]] = []
    sums: list[Tensor] = []
    targets: list[Tensor] = []
    ens_metrics: dict[str, Any] | None = None
    try:
        for m, state in enumerate(states):
            weights = state() if callable(state) else load_weights(state, use_average)
            if load is None:
                module.load_state_dict(weights)
            else:
                load(m, weights)
            module.eval()
            member_metrics: dict[str, Any] | None = None
            for b, batch in enumerate(batches()):
                if tta == "none":
                    probs = forward(module, batch).float().softmax(dim=-1)
                else:
                    probs = _tta_probs(module, batch, forward, tta)
                y = target(batch)
                if member_metrics is None:
                    member_metrics = _make_metrics(probs.shape[-1], metrics, device)
                _update(member_metrics, probs, y)
                if m == 0:
                    sums.append(probs)
                    targets.append(y)
                else:
                    if b >= len(sums) or sums[b].shape != probs.shape or not torch.equal(targets[b], y):
                        raise RuntimeError("batches() must give the same batches in the same order for every member")
                    sums[b] += probs
            if member_metrics is None:
                raise ValueError("batches() gave no batch to evaluate")
            members.append({k: float(v.compute()) for k, v in member_metrics.items()})
        ens_metrics = _make_metrics(sums[0].shape[-1], metrics, device)
        for total, y in zip(sums, targets):
            _update(ens_metrics, total / len(states), y)
        ensemble = {k: float(v.compute()) for k, v in ens_metrics.items()}
    finally:
        if saved is not None:
            module.load_state_dict(saved)
        module.train(was_training)
    return {"members": members, "ensemble": ensemble}


class EnsembleModule(nn.Module):
    """``M`` copies of a model whose ``forward`` returns the mean of their softmax (class probabilities).

    With ``tta`` other than ``"none"``, ``forward(x)`` is the mean over members of each member's
    :func:`~lightning_tricks.augment.tta_predict` (images ``x`` only).
    """

    def __init__(self, members: Sequence[nn.Module], tta: str = "none") -> None:
        super().__init__()
        if not members:
            raise ValueError("EnsembleModule needs at least one member")
        self.members = nn.ModuleList(members)
        self.tta = check_tta(tta)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        if self.tta == "none":
            return mean_softmax([m(*args, **kwargs) for m in self.members])
        if len(args) != 1 or kwargs:
            raise TypeError(f"EnsembleModule(tta={self.tta!r}) takes one input batch, got {len(args)} and {kwargs}")
        total = tta_predict(self.members[0], args[0], self.tta)
        for m in self.members[1:]:
            total = total + tta_predict(m, args[0], self.tta)
        return total / len(self.members)


class CheckpointEnsemble:
    """An ensemble of saved weights of one architecture: mean of softmax, evaluation, prediction.

    Members are held as CPU state dicts; :meth:`evaluate` loads them one at a time into one working
    copy of the template, :meth:`module` builds an :class:`EnsembleModule` with a copy per member (for
    fast repeated prediction), and :meth:`predict_proba` uses that module.

    Args:
        template: a module of the right architecture (its weights are not used) or a zero-argument
            factory returning one, e.g. ``lambda: Classifier(MLP((1, 8, 8), 10), 10)``.
        members: paths, Lightning checkpoint dicts or state dicts; each is checked against the template
            when the ensemble is built (every tensor present, same shapes, finite values), and refused
            with one line naming it and the first difference.
        use_average: see :func:`load_weights` (default: the weights each checkpoint's evaluation ran on).
        device: where :meth:`module`, :meth:`predict_proba` and :meth:`evaluate` run (default: CPU).
        trusted: load member files with full unpickling; by default they load with ``weights_only=True``
            and a file that needs more is refused (:func:`load_checkpoint`).
        tta: test-time augmentation of each member in :meth:`predict_proba`, :meth:`module` and
            :meth:`evaluate` (:func:`~lightning_tricks.augment.tta_predict`); ``None`` takes the
            template's own ``tta`` (a :class:`~lightning_tricks.mixins.Classifier`'s), else ``"none"``.
            Nothing here knows the data: use a flip only where mirror images keep the class.

    Example:
        >>> from lightning_tricks.mixins import Classifier
        >>> from lightning_tricks.models import MLP
        >>> make = lambda: Classifier(MLP((1, 8, 8), 10, hidden=(16,)), 10)
        >>> ens = CheckpointEnsemble(make, [make().state_dict() for _ in range(3)])
        >>> len(ens), ens.predict(torch.zeros(2, 1, 8, 8)).shape
        (3, torch.Size([2]))
    """

    def __init__(
        self,
        template: Template,
        members: Sequence[Source],
        use_average: bool | None = None,
        device: torch.device | str | None = None,
        trusted: bool = False,
        tta: str | None = None,
    ) -> None:
        if not members:
            raise ValueError("CheckpointEnsemble needs at least one member")
        self._tta = None if tta is None else check_tta(tta)
        self._template = template
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.sources = [str(m) if isinstance(m, (str, Path)) else "<state dict>" for m in members]
        self.states = [
            {k: v.detach().cpu() for k, v in load_weights(m, use_average, trusted=trusted).items()} for m in members
        ]
        template_model = template if isinstance(template, nn.Module) else self._new_model()
        expected = template_model.state_dict()
        for source, state in zip(self.sources, self.states):
            check_member(source, state, expected)
            bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
            if bad is not None:
                raise ValueError(
                    f"CheckpointEnsemble member {source} has non-finite weights ({bad}): the run it "
                    "comes from diverged; leave it out of the ensemble"
                )
        self._module: EnsembleModule | None = None

    def __len__(self) -> int:
        return len(self.states)

    def _tta_of(self, model: nn.Module) -> str:
        """The TTA mode: the one given, else the template model's ``tta`` attribute, else ``"none"``."""
        if self._tta is None:
            self._tta = check_tta(str(getattr(model, "tta", "none")))
        return self._tta

    @property
    def tta(self) -> str:
        """The test-time augmentation the members use (resolved from the template when not given)."""
        return self._tta if self._tta is not None else self._tta_of(self._new_model())

    def __repr__(self) -> str:
        return f"CheckpointEnsemble({len(self)} members: {self.sources})"

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def from_checkpoints(cls, template: Template, paths: Sequence[str | Path], **kwargs: Any) -> CheckpointEnsemble:
        """From checkpoint files."""
        missing = [str(p) for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint(s) not found: {missing}")
        return cls(template, list(paths), **kwargs)

    @classmethod
    def from_model_checkpoint(
        cls, template: Template, checkpoint: Any, k: int | None = None, which: str = "best", **kwargs: Any
    ) -> CheckpointEnsemble:
        """From the checkpoints a :class:`ModelCheckpoint` callback kept after ``fit``.

        Args:
            checkpoint: the ``ModelCheckpoint`` instance (after fit).
            k: how many members (default: all available).
            which: ``"best"``: the best ``k`` by the monitored value (``best_k_models``, ordered by
                ``mode``); ``"last"``: the ``k`` latest ``.ckpt`` files in ``dirpath`` by global step
                (``last.ckpt`` excluded).
        """
        paths = model_checkpoint_paths(checkpoint, k=k, which=which)
        return cls.from_checkpoints(template, paths, **kwargs)

    def _new_model(self) -> nn.Module:
        if isinstance(self._template, nn.Module):
            model = copy.deepcopy(self._template)
        elif callable(self._template):
            model = self._template()
            if not isinstance(model, nn.Module):
                raise TypeError(f"the template factory must return an nn.Module, got {type(model).__name__}")
        else:
            raise TypeError(f"template must be an nn.Module or a factory, got {type(self._template).__name__}")
        return model.to(self.device)

    # -- using -------------------------------------------------------------------------------------
    def module(self) -> EnsembleModule:
        """An :class:`EnsembleModule` (eval mode) with one copy of the model per member (cached)."""
        if self._module is None:
            members = []
            for state in self.states:
                model = self._new_model()
                model.load_state_dict(state)
                members.append(model.eval())
            self._module = EnsembleModule(members, self._tta_of(members[0])).eval()
        return self._module

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        """Mean of the members' softmax for a batch ``x``."""
        return self.module()(x.to(self.device))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The ensemble's class indices for a batch ``x``."""
        return self.predict_proba(x).argmax(dim=-1)

    def evaluate(
        self,
        loader: Iterable[Any],
        metrics: Mapping[str, Any] | None = None,
        forward: Callable[[nn.Module, Any], Tensor] | None = None,
    ) -> dict[str, float]:
        """``{"member_<i>/<metric>": ..., "ensemble/<metric>": ...}`` over ``loader`` (see :func:`evaluate_members`)."""
        model = self._new_model()

        def batches() -> Iterable[Any]:
            for batch in loader:
                if isinstance(batch, (list, tuple)):
                    yield type(batch)(t.to(self.device) if isinstance(t, Tensor) else t for t in batch)
                else:
                    yield batch.to(self.device)

        out = evaluate_members(
            model, self.states, batches, forward=forward, metrics=metrics, restore=False, tta=self._tta_of(model)
        )
        flat = {f"member_{i}/{k}": v for i, m in enumerate(out["members"]) for k, v in m.items()}
        flat.update({f"ensemble/{k}": v for k, v in out["ensemble"].items()})
        return flat


def model_checkpoint_paths(checkpoint: Any, k: int | None = None, which: str = "best") -> list[str]:
    """The ``k`` best (by monitored value) or latest (by global step) checkpoint files of a ``ModelCheckpoint``."""
    check_choice("which", which, ("best", "last"))
    check_int("k", k, 1, allow_none=True)
    if which == "best":
        scored = {p: s for p, s in checkpoint.best_k_models.items() if Path(p).is_file()}
        if not scored:
            raise ValueError(
                "the ModelCheckpoint has no best_k_models (needs monitor=... and save_top_k != 0, "
                "after fit); use which='last' for unmonitored checkpoints"
            )
        paths = sorted(scored, key=lambda p: float(scored[p]), reverse=checkpoint.mode == "max")
    else:
        if checkpoint.dirpath is None or not Path(checkpoint.dirpath).is_dir():
            raise ValueError(f"the ModelCheckpoint's dirpath {checkpoint.dirpath!r} is not a directory (run fit first)")
        last_name = f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
        files = [p for p in Path(checkpoint.dirpath).glob(f"*{checkpoint.FILE_EXTENSION}") if p.name != last_name]
        if not files:
            raise ValueError(f"no checkpoint files in {checkpoint.dirpath}")
        steps = {}
        for p in files:
            ck = load_checkpoint(p, map_location="cpu", mmap=True)
            steps[str(p)] = (int(ck.get("global_step", 0)), int(ck.get("epoch", 0)))
        paths = sorted(steps, key=lambda p: steps[p], reverse=True)
    return [str(p) for p in (paths if k is None else paths[:k])]


def snapshot_steps(total_steps: int, cycles: int) -> list[int]:
    """The optimizer-step counts after which the ``cycles`` snapshots are taken.

    The cycles are ``ceil(T / M)`` steps long (:meth:`CosineRestarts.cycle_ends`); when ``M`` does not
    divide ``T`` the last cycle is cut short and its snapshot is taken at the end of the run, ``T``.

    Example:
        >>> snapshot_steps(12, 3), snapshot_steps(10, 4)
        ([4, 8, 12], [3, 6, 9, 10])
    """
    if cycles < 1 or total_steps < 1:
        raise ValueError(f"need cycles >= 1 and total_steps >= 1, got cycles={cycles}, total_steps={total_steps}")
    length = math.ceil(total_steps / cycles)
    if (cycles - 1) * length >= total_steps:
        raise ValueError(
            f"cycles={cycles} do not fit in {total_steps} optimizer steps: cycles of "
            f"ceil({total_steps}/{cycles})={length} steps leave the last cycle empty"
        )
    steps = [end + 1 for end in CosineRestarts(T_0=length, T_mult=1, min_factor=0.0).cycle_ends(total_steps)]
    if len(steps) < cycles:
        steps.append(total_steps)
    return steps


def check_cycles_match(ours: CosineRestarts, schedule: Any, total_steps: int, snapshots: list[int]) -> None:
    """Raise ``ValueError`` when ``schedule``'s cycles (if it has any) end elsewhere than ``ours``.

    ``snapshots``: the steps the snapshots are taken after, for the message.
    """
    ends = getattr(schedule, "cycle_ends", None)
    if ends is None:
        return
    theirs = [e + 1 for e in ends(total_steps)]
    if theirs != [e + 1 for e in ours.cycle_ends(total_steps)]:
        raise ValueError(
            f"the LRSchedule's cycles end after steps {theirs}, "
            f"the snapshots are taken after {snapshots}; "
            f"give its CosineRestarts T_0={ours.T_0}, T_mult=1"
        )
