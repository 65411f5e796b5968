"""Sanity checks of the CS231n training recipe as pure functions (no Trainer).

Initial loss near ``log(C)``, overfitting a tiny subset, update/weight ratios, gradient norms and
dead ReLUs; the recipe and its reasons are in ``docs/method_cards.md`` (sanity checks).

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 10))
    >>> report = initial_loss(net, (torch.randn(64, 8), torch.randint(0, 10, (64,))))
    >>> report.passed, round(report.expected, 3)
    (True, 2.303)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from lightning_tricks.checks import check_float, check_int
from lightning_tricks.losses import classification_loss
from lightning_tricks.nn import (
    DropConnectConv2d,
    DropConnectLinear,
    DropPath,
    FractionalMaxPool2d,
)

LossFn = Callable[[Tensor, Tensor], Tensor]


class SanityCheckError(RuntimeError):
    """A sanity check failed where failing was asked for (``action="raise"``)."""


#: Module types switched to eval mode when regularization is off (their eval mode is deterministic).
REGULARIZER_TYPES: tuple[type[nn.Module], ...] = (
    _DropoutNd,
    DropPath,
    DropConnectLinear,
    DropConnectConv2d,
    FractionalMaxPool2d,
)

INITIAL_LOSS_CAUSES_HIGH = (
    "last-layer weights or bias initialized too large (logits far from uniform: initialize the head "
    "with small weights, e.g. std 1e-2, or zeros)",
    "inputs not normalized",
    "labels wrong or out of range",
    "a regularization term added to the loss",
)
INITIAL_LOSS_CAUSES_LOW = (
    "the loss is not softmax cross-entropy over C classes (binary CE, a sum instead of a mean, "
    "logits that went through softmax twice)",
    "num_classes differs from the number of classes the labels use",
    "labels leak into the inputs, or all labels are the same class",
)


# ----------------------------------------------------------------------------------------------
# regularization off
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Every submodule in eval mode inside the block; each module's own mode restored on exit.

    Eval mode switches off dropout and drop path and makes BatchNorm use its running statistics
    without updating them, so a forward pass inside leaves the module's buffers unchanged.
    """
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield module
    finally:
        for m, training in modes:
            m.training = training


def disable_regularizers_(module: nn.Module) -> int:
    """Put every dropout-family module of ``module`` in eval mode for good; returns how many.

    For a throwaway copy (see :func:`overfit_check`): the copy's ``train()`` would undo this, so
    call it after ``train()``.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, REGULARIZER_TYPES):
            m.training = False
            n += 1
    return n


# ----------------------------------------------------------------------------------------------
# 1. initial loss
# ----------------------------------------------------------------------------------------------
def expected_initial_loss(num_classes: int) -> float:
    """``log(C)``: the cross-entropy of a uniform prediction over ``C`` classes (any target)."""
    check_int("num_classes", num_classes, 2)
    return math.log(num_classes)


def check_expected_loss(expected: Any) -> str | float:
    """``expected`` if it is ``"log_num_classes"`` or a finite number > 0 (the initial-loss target)."""
    if expected == "log_num_classes":
        return "log_num_classes"
    if isinstance(expected, bool) or not isinstance(expected, (int, float)) or not 0 < expected < math.inf:
        raise ValueError(f"expected must be 'log_num_classes' or a number > 0, got {expected!r}")
    return float(expected)


def check_overfit_args(num_samples: int, steps: int, target_loss: float, lr: float | None) -> None:
    """The checks of :func:`overfit_check`'s arguments, shared with its callback."""
    check_int("num_samples", num_samples, 1)
    check_int("steps", steps, 1)
    check_float("target_loss", target_loss, 0, low_open=True)
    check_float("lr", lr, 0, allow_none=True)


def judge_initial_loss(loss: float, expected: float, rtol: float = 0.1) -> tuple[bool, str]:
    """Whether ``|loss - expected| <= rtol * expected``, and a human reason with likely causes.

    Example:
        >>> judge_initial_loss(2.31, math.log(10))[0]
        True
        >>> ok, reason = judge_initial_loss(9.7, math.log(10))
        >>> ok, reason.split(";")[0]
        (False, 'initial loss 9.7 is 321% above the expected 2.303 (rtol 0.1)')
    """
    if not math.isfinite(loss):
        return False, (
            f"initial loss is {loss} (expected {expected:.4g}): the forward pass or the loss "
            "produces non-finite values (inputs with nan/inf, log of zero, overflow)"
        )
    rel = (loss - expected) / expected
    if abs(rel) <= rtol:
        return True, f"initial loss {loss:.4g} is within {rtol:g} of the expected {expected:.4g}"
    where = "above" if rel > 0 else "below"
    causes = INITIAL_LOSS_CAUSES_HIGH if rel > 0 else INITIAL_LOSS_CAUSES_LOW
    return False, (
        f"initial loss {loss:.4g} is {abs(rel):.0%} {where} the expected {expected:.4g} "
        f"(rtol {rtol:g}); likely causes: " + "; ".join(causes)
    )


@dataclasses.dataclass(frozen=True)
class InitialLossReport:
    """What :func:`initial_loss` measured: ``passed`` iff ``|loss - expected| <= rtol * expected``."""

    loss: float
    expected: float
    num_classes: int | None
    passed: bool
    reason: str


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(x, y)`` from a batch that is a tuple/list ``(x, y, ...)`` or a mapping with ``x``/``y`` keys."""
    if isinstance(batch, Mapping):
        for kx, ky in (("x", "y"), ("input", "target"), ("image", "label")):
            if kx in batch and ky in batch:
                return batch[kx], batch[ky]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"expected a batch (x, y, ...) or a mapping with x/y keys, got {type(batch).__name__}")


def initial_loss(
    module: nn.Module,
    batch: Any,
    expected: str | float = "log_num_classes",
    rtol: float = 0.1,
    num_classes: int | None = None,
    loss_fn: LossFn | None = None,
) -> InitialLossReport:
    """Measure the loss of ``module`` on ``batch`` with regularization off and compare it to ``expected``.

    The forward pass runs under ``no_grad`` in :func:`eval_mode` (no dropout, BatchNorm on its
    running statistics, no buffer updates; each module's mode is restored), the loss is
    ``loss_fn(logits, y)`` (default: softmax cross-entropy without label smoothing, hard or soft
    targets). With ``expected="log_num_classes"`` the target is
    ``log(C)``, ``C`` = ``num_classes`` or, if not given, the logits' last dimension; a mismatch
    between the two is reported as a failure.

    Args:
        module: the model (``nn.Module`` or ``LightningModule``) mapping ``x`` to logits.
        batch: ``(x, y)``.
        expected: ``"log_num_classes"`` or the expected loss as a number.
        rtol: relative tolerance, > 0.
        num_classes: the number of classes, if known.
        loss_fn: ``(logits, y) -> loss``; default cross-entropy.
    """
    check_float("rtol", rtol, 0, low_open=True)
    expected = check_expected_loss(expected)
    x, y = split_batch(batch)
    with torch.no_grad(), eval_mode(module):
        logits = module(x)
        loss_t = (loss_fn or classification_loss)(logits, y)
    loss = float(loss_t)
    c = num_classes
    if isinstance(expected, str):
        width = int(logits.shape[-1])
        if c is not None and c != width:
            reason = (
                f"num_classes={c} but the logits have {width} columns: the head's output size does "
                f"not match the number of classes"
            )
            return InitialLossReport(loss, expected_initial_loss(c), c, False, reason)
        c = width
        target = expected_initial_loss(c)
    else:
        target = float(expected)
    ok, reason = judge_initial_loss(loss, target, rtol)
    return InitialLossReport(loss, target, c, ok, reason)


# ----------------------------------------------------------------------------------------------
# 2. overfit a tiny subset
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class OverfitResult:
    """The outcome of :func:`overfit_check`.

    ``losses`` has the training loss before each step (``losses[0]`` is the start); ``accuracy`` is
    the training-mode accuracy on the subset at the last step.
    """

    passed: bool
    reason: str
    initial_loss: float
    final_loss: float
    best_loss: float
    steps: int
    num_samples: int
    accuracy: float
    lr: list[float]
    losses: list[float] = dataclasses.field(repr=False, default_factory=list)


def take_samples(source: Any, num_samples: int) -> tuple[Tensor, Tensor]:
    """The first ``num_samples`` training samples ``(x, y)`` of ``source``, without side effects.

    ``source`` is a batch ``(x, y)``, a DataModule (its ``train_dataloader()``), a ``DataLoader``
    over a map-style dataset (items ``0..n-1``, collated: no shuffling, no RNG), a loader with a
    ``tensors`` attribute (:class:`~lightning_tricks.data.TensorBatchLoader`), or any iterable of
    batches (iterated until enough samples are collected).
    """
    check_int("num_samples", num_samples, 1)
    if isinstance(source, (tuple, list, Mapping)) and not _is_loader_collection(source):
        x, y = split_batch(source)
        return x[:num_samples], y[:num_samples]
    if hasattr(source, "train_dataloader") and callable(source.train_dataloader):
        if hasattr(source, "setup"):
            source.setup("fit")
        return take_samples(source.train_dataloader(), num_samples)
    if _is_loader_collection(source):  # Lightning's several-train-loaders form: use the first
        first = next(iter(source.values())) if isinstance(source, Mapping) else source[0]
        return take_samples(first, num_samples)
    tensors = getattr(source, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2 and all(isinstance(t, Tensor) for t in tensors):
        return tensors[0][:num_samples], tensors[1][:num_samples]
    dataset = getattr(source, "dataset", None)
    collate = getattr(source, "collate_fn", None)
    if dataset is not None and collate is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        n = min(num_samples, len(dataset))
        return split_batch(collate([dataset[i] for i in range(n)]))
    xs, ys, have = [], [], 0
    for batch in source:
        x, y = split_batch(batch)
        xs.append(x)
        ys.append(y)
        have += x.shape[0]
        if have >= num_samples:
            break
    if not xs:
        raise ValueError("the data source yielded no batches")
    return torch.cat(xs)[:num_samples], torch.cat(ys)[:num_samples]


def _is_loader_collection(source: Any) -> bool:
    items = source.values() if isinstance(source, Mapping) else source if isinstance(source, (tuple, list)) else ()
    items = list(items)
    return (
        bool(items)
        and not any(isinstance(i, Tensor) for i in items)
        and all(hasattr(i, "__iter__") and not isinstance(i, (str, bytes)) for i in items)
    )


def clone_optimizer(optimizer: torch.optim.Optimizer, original: nn.Module, clone: nn.Module) -> torch.optim.Optimizer:
    """A fresh optimizer of ``optimizer``'s type and groups over ``clone``'s matching parameters.

    Parameters are matched by position in ``named_parameters()`` (a deep copy keeps the order); the
    group hyperparameters (LR, momentum, weight decay, names, ...) are copied, the state is not.
    Parameters of ``optimizer`` that are not in ``original`` raise ``ValueError``.
    """
    mapping = {id(p): q for p, q in zip(original.parameters(), clone.parameters())}
    groups = []
    for g in optimizer.param_groups:
        try:
            params = [mapping[id(p)] for p in g["params"]]
        except KeyError:
            raise ValueError("the optimizer holds parameters that are not the module's") from None
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": params})
    cls: Any = type(optimizer)  # a concrete optimizer class (SGD, Adam, ...), not the abstract base
    try:
        return cls(groups, **optimizer.defaults)  # type: ignore[no-any-return]
    except TypeError:
        return cls(groups)  # type: ignore[no-any-return]


def _first_optimizer(out: Any) -> torch.optim.Optimizer:
    """The optimizer out of any of ``configure_optimizers``' return forms."""
    if isinstance(out, torch.optim.Optimizer):
        return out
    if isinstance(out, Mapping):
        return _first_optimizer(out["optimizer"])
    if isinstance(out, (tuple, list)) and out:
        return _first_optimizer(out[0])
    raise ValueError(f"configure_optimizers returned no optimizer ({type(out).__name__}); pass optimizer=")


def overfit_check(
    module: nn.Module,
    data: Any,
    num_samples: int = 20,
    steps: int = 200,
    target_loss: float = 0.05,
    lr: float | None = None,
    optimizer: torch.optim.Optimizer | Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
) -> OverfitResult:
    """Train a deep copy of ``module`` full-batch on ``num_samples`` samples; pass iff the loss reaches ``target_loss``.

    Regularization is off in the copy: dropout-family modules in eval mode (BatchNorm trains as
    usual), weight decay 0 in every group, loss without label smoothing (``loss_fn``, default
    cross-entropy). LR schedulers are not used: the LR is constant. The real ``module``, its
    optimizer and the global RNG state (CPU and the module's CUDA device) are left untouched.

    Args:
        module: the model; a ``LightningModule`` is copied with its ``_trainer`` reference dropped.
        data: a batch ``(x, y)``, a DataModule, a DataLoader or an iterable of batches (see
            :func:`take_samples`).
        num_samples: size of the subset (CS231n: ~20).
        steps: at most this many full-batch optimizer steps; stops early at ``target_loss``.
        target_loss: the loss that counts as "near zero".
        lr: if given (``>= 0``), every group's LR; ``None`` keeps the configured LRs.
        optimizer: the optimizer to imitate: an instance (its type and groups are rebuilt over the
            copy, fresh state) or a factory ``params -> optimizer``; ``None`` calls the copy's
            ``configure_optimizers()`` (LightningModule) or uses Adam(lr=1e-3).
        loss_fn: ``(logits, y) -> loss``.
        seed: seeds the copy's training (a forked RNG, the caller's RNG is not advanced).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 3))
        >>> x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
        >>> overfit_check(net, (x, y), steps=300, lr=1e-2).passed
        True
        >>> overfit_check(net, (x, y), steps=50, lr=0.0).passed
        False
    """
    check_overfit_args(num_samples, steps, target_loss, lr)
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        x, y = take_samples(data, num_samples)
        x, y = x.to(device), y.to(device)
        clone = copy.deepcopy(module)
        clone.train()
        disable_regularizers_(clone)
        for p in clone.parameters():
            p.grad = None
        if isinstance(optimizer, torch.optim.Optimizer):
            opt = clone_optimizer(optimizer, module, clone)
        elif optimizer is not None:
            opt = optimizer([p for p in clone.parameters() if p.requires_grad])  # type: ignore[operator]
        elif hasattr(clone, "configure_optimizers"):
            opt = _first_optimizer(clone.configure_optimizers())  # type: ignore[operator]
        else:
            opt = torch.optim.Adam([p for p in clone.parameters() if p.requires_grad], lr=1e-3)
        for g in opt.param_groups:
            if "weight_decay" in g:
                g["weight_decay"] = 0.0
            if lr is not None:
                g["lr"] = float(lr)
        lrs = [float(g["lr"]) for g in opt.param_groups]
        loss_fn = loss_fn or classification_loss
        losses: list[float] = []
        correct = 0.0
        step = 0
        for step in range(steps + 1):
            opt.zero_grad(set_to_none=True)
            logits = clone(x)
            loss = loss_fn(logits, y)
            value = float(loss.detach())
            losses.append(value)
            hard = y.argmax(dim=-1) if y.dtype.is_floating_point else y
            correct = float((logits.detach().argmax(dim=-1) == hard).float().mean())
            if value <= target_loss or not math.isfinite(value) or step == steps:
                break
            loss.backward()
            opt.step()
    n = int(x.shape[0])
    return _judge_overfit(losses, step, n, correct, target_loss, lrs)


def _judge_overfit(
    losses: list[float], steps: int, n: int, accuracy: float, target: float, lrs: list[float]
) -> OverfitResult:
    final, first = losses[-1], losses[0]
    finite = [v for v in losses if math.isfinite(v)]
    best = min(finite) if finite else math.nan
    lr_text = ", ".join(f"{v:.3g}" for v in sorted(set(lrs)))
    if not math.isfinite(final):
        passed = False
        reason = (
            f"loss became {final} after {steps} steps on {n} samples (start {first:.4g}): the LR "
            f"({lr_text}) is too high, or the model/loss produces non-finite values"
        )
    elif final <= target:
        passed = True
        reason = (
            f"loss {final:.4g} <= target {target:g} after {steps} steps on {n} samples "
            f"(start {first:.4g}, accuracy {accuracy:.0%})"
        )
    else:
        passed = False
        hints = []
        if max(lrs, default=0.0) == 0.0:
            hints.append("the learning rate is zero")
        if best < first * 0.9:
            hints.append("the loss falls but too slowly: raise the LR or the number of steps")
        else:
            hints.append(
                "the loss does not fall: LR too small (or too large), parameters that get no "
                "gradient (frozen, detached), loss and labels that do not match"
            )
        hints.append("a model too small to memorize the subset")
        reason = (
            f"loss {final:.4g} > target {target:g} after {steps} steps on {n} samples (start "
            f"{first:.4g}, best {best:.4g}, accuracy {accuracy:.0%}, LR {lr_text}); likely causes: " + "; ".join(hints)
        )
    return OverfitResult(passed, reason, first, final, best, steps, n, accuracy, lrs, losses)


# ----------------------------------------------------------------------------------------------
# 3. update/weight ratio, gradient norms, dead ReLUs
# ----------------------------------------------------------------------------------------------
def update_ratios(before: Sequence[Tensor], after: Sequence[Tensor], eps: float = 1e-12) -> Tensor:
    """``||after_i - before_i|| / max(||before_i||, eps)`` for each pair, as one 1-D float32 tensor.

    Example:
        >>> update_ratios([torch.tensor([3.0, 4.0])], [torch.tensor([3.0, 4.5])])
        tensor([0.1000])
    """
    if len(before) != len(after):
        raise ValueError(f"before and after need the same length, got {len(before)} and {len(after)}")
    if not before:
        return torch.zeros(0)
    diff = torch._foreach_sub(list(after), list(before))
    return _norms(diff) / _norms(before).clamp_min(eps)


def _norms(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """Per-tensor norms as one float32 vector (one multi-tensor norm; no host sync)."""
    norms = torch._foreach_norm(list(tensors), norm_type, dtype=torch.float32)
    try:
        return torch.stack(norms)
    except RuntimeError:  # tensors on several devices: gather the norms on the first one
        return torch.stack([n.to(norms[0].device) for n in norms])


class UpdateRatio:
    """Update/weight ratios of a fixed list of tensors, with buffers allocated once.

    Call :meth:`snapshot` before the optimizer step and :meth:`ratios` after it; ``ratios`` returns
    ``||w_after - w_before|| / ||w_before||`` per tensor as one device tensor (no host sync). Between
    the two calls the buffers hold ``w_before``; :meth:`ratios` overwrites them with the update.

    The ratio is a scale-free view of the step size per layer: CS231n suggests ~1e-3; far above, the
    LR is too high for that layer, far below, too low (or the layer is frozen).

    Example:
        >>> w = nn.Parameter(torch.tensor([3.0, 4.0]))
        >>> tracker = UpdateRatio([w])
        >>> tracker.snapshot()
        >>> with torch.no_grad():
        ...     _ = w.add_(torch.tensor([0.0, 0.5]))
        >>> tracker.ratios()
        tensor([0.1000])
    """

    def __init__(self, params: Sequence[Tensor], eps: float = 1e-12) -> None:
        check_float("eps", eps, 0, low_open=True)
        self.params = [p.detach() for p in params]
        self.buffers = [torch.empty_like(p) for p in self.params]
        self.eps = eps
        self._weight_norms: list[Tensor] | None = None

    def snapshot(self) -> None:
        """Copy the current values into the buffers (one multi-tensor copy)."""
        if self.params:
            torch._foreach_copy_(self.buffers, self.params)

    def ratios(self) -> Tensor:
        """The ratios since the last :meth:`snapshot` (a float32 vector on the first tensor's device)."""
        if not self.params:
            return torch.zeros(0)
        w = _norms(self.buffers)
        torch._foreach_sub_(self.buffers, self.params)  # buffers <- w_before - w_after
        return _norms(self.buffers) / w.clamp_min(self.eps)


def judge_ratio(name: str, ratio: float, band: tuple[float, float]) -> tuple[bool, str]:
    """Whether ``ratio`` is inside ``band`` (inclusive), with a reason naming the likely fix."""
    low, high = band
    if not math.isfinite(ratio):
        return False, f"update/weight ratio of {name} is {ratio}: non-finite weights or update"
    if ratio > high:
        return False, (
            f"update/weight ratio of {name} is {ratio:.3g} > {high:g}: the updates are large "
            "for these weights, the LR is likely too high for this layer (healthy ~1e-3)"
        )
    if ratio < low:
        return False, (
            f"update/weight ratio of {name} is {ratio:.3g} < {low:g}: the layer barely moves, "
            "the LR is likely too low, or the layer is frozen / gets vanishing gradients "
            "(healthy ~1e-3)"
        )
    return True, f"update/weight ratio of {name} is {ratio:.3g}, inside [{low:g}, {high:g}]"


def check_band(band: Sequence[float]) -> tuple[float, float]:
    """``band`` as ``(low, high)`` floats; ``ValueError`` unless ``0 < low < high``."""
    values = tuple(float(b) for b in band)
    if len(values) != 2 or not 0 < values[0] < values[1]:
        raise ValueError(f"band must be (low, high) with 0 < low < high, got {values!r}")
    return values[0], values[1]


def tracked_params(
    named: Iterable[tuple[str, Tensor]], optimizers: Iterable[torch.optim.Optimizer], which: str
) -> tuple[list[str], list[Tensor]]:
    """Names and tensors of the trainable parameters in ``optimizers`` (``which``: weights|all), each once.

    ``"weights"`` keeps tensors with ``ndim >= 2``; a tensor missing from ``named`` is ``param<i>``.

    Example:
        >>> net = nn.Linear(2, 3)
        >>> tracked_params(net.named_parameters(), [torch.optim.SGD(net.parameters(), lr=0.1)], "weights")[0]
        ['weight']
    """
    names = {id(p): n for n, p in named}
    out_n: list[str] = []
    out_p: list[Tensor] = []
    seen: set[int] = set()
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in seen or not p.requires_grad or (which == "weights" and p.ndim < 2):
                    continue
                seen.add(id(p))
                out_n.append(names.get(id(p), f"param{len(out_n)}"))
                out_p.append(p)
    return out_n, out_p


def param_layout(optimizers: Iterable[torch.optim.Optimizer]) -> tuple[int, ...]:
    """The tensor count of every parameter group: a changed layout means the tracked tensors must be rebuilt."""
    return tuple(len(g["params"]) for opt in optimizers for g in opt.param_groups)


def relu_metrics(stats: Mapping[str, Sequence[tuple[Tensor, Tensor]]]) -> dict[str, float]:
    """``dead_units/<name>``, ``relu_zeros/<name>`` and their means from :func:`relu_stats` calls per module.

    A module called several times in the batch gets the mean of its calls; one host sync.

    Example:
        >>> relu_metrics({"act": [relu_stats(torch.tensor([[0.0, 1.0], [0.0, 2.0]]))]})["dead_units/act"]
        0.5
    """
    names = [n for n, calls in stats.items() if calls]
    if not names:
        return {}
    per = torch.stack([torch.stack([torch.stack(c) for c in stats[n]]).mean(0) for n in names])
    values = per.tolist()  # [[zero_frac, dead_frac], ...]
    metrics: dict[str, float] = {}
    for n, (zero, dead) in zip(names, values):
        metrics[f"dead_units/{n}"] = dead
        metrics[f"relu_zeros/{n}"] = zero
    metrics["dead_units/mean"] = sum(v[1] for v in values) / len(values)
    metrics["relu_zeros/mean"] = sum(v[0] for v in values) / len(values)
    return metrics


def median(values: Iterable[float]) -> float:
    """The median of finite values (mean of the two middle ones for an even count); nan if none."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def grad_norms(params: Sequence[Tensor], norm_type: float = 2.0) -> tuple[Tensor, Tensor]:
    """Per-tensor gradient norms and the total norm (the norm of all gradients as one vector).

    Tensors without a gradient count as zero. One multi-tensor norm, no host sync.

    Example:
        >>> p = nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> grad_norms([p])
        (tensor([5.]), tensor(5.))
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        z = torch.zeros(len(params))
        return z, z.sum()
    norms = _norms(grads, norm_type)
    if len(grads) != len(params):
        full = torch.zeros(len(params), device=norms.device)
        idx = torch.tensor([i for i, p in enumerate(params) if p.grad is not None], device=norms.device)
        norms = full.index_copy(0, idx, norms)
    total = torch.linalg.vector_norm(norms, norm_type)
    return norms, total


def relu_stats(out: Tensor) -> tuple[Tensor, Tensor]:
    """``(zero_fraction, dead_fraction)`` of a ReLU output ``(N, C, ...)``.

    ``zero_fraction`` is the fraction of all outputs that are exactly zero; ``dead_fraction`` the
    fraction of units (dim 1: features or channels) that are zero for every sample and position of
    the batch. Both are 0-d device tensors.

    Example:
        >>> relu_stats(torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 3.0]]))
        (tensor(0.5000), tensor(0.3333))
    """
    zero = out == 0
    zero_frac = zero.float().mean()
    if out.ndim < 2:
        return zero_frac, zero.all().float()
    alive = (~zero).transpose(0, 1).reshape(out.shape[1], -1).any(dim=1)
    return zero_frac, 1.0 - alive.float().mean()


# --------------------------------------------------------------------------------------------------
# divergence: the first non-finite loss or gradient norm ends the run
# --------------------------------------------------------------------------------------------------
class Diverged(RuntimeError):
    """Training diverged: a loss (or gradient norm) was not finite. ``step``/``epoch``/``lrs`` say where."""

    def __init__(self, message: str, step: int, epoch: int, lrs: Sequence[float]) -> None:
        super().__init__(message)
        self.step, self.epoch, self.lrs = step, epoch, list(lrs)


def divergence_message(
    what: str, value: float, step: int, epoch: int, lrs: Sequence[float], since: int | None = None
) -> str:
    """The one line that reports a divergence: what was not finite, where, and at which LR.

    ``since``: the first optimizer step of the window a deferred check covered (the loss read every few
    steps); then updates from the first non-finite step on may have been applied.

    Example:
        >>> message = divergence_message("loss", float("nan"), 12, 0, [1e6])
        >>> message.split(";")[0]
        'diverged: the loss is nan at optimizer step 12 (epoch 0), lr 1e+06'
        >>> message.split("; ")[1]
        'no update was applied. Lower optimizer.lr (or add warmup / gradient clipping)'
        >>> divergence_message("sum of the losses", float("inf"), 12, 0, [0.1], since=8).split(";")[0]
        'diverged: the sum of the losses is inf over optimizer steps 8-12 (epoch 0), lr 0.1'
    """
    distinct = sorted(set(lrs))
    lr = "lr " + ", ".join(f"{v:.3g}" for v in distinct[:4]) + (" ..." if len(distinct) > 4 else "")
    if since is not None and since < step:
        return (
            f"diverged: the {what} is {value} over optimizer steps {since}-{step} (epoch {epoch}), {lr}; checked "
            "every few steps, so the updates from the first non-finite loss on were applied. Lower optimizer.lr "
            "(or add warmup / gradient clipping)"
        )
    done = "the update was applied" if what.startswith("weight") else "no update was applied"
    return (
        f"diverged: the {what} is {value} at optimizer step {step} (epoch {epoch}), {lr}; {done}. Lower "
        "optimizer.lr (or add warmup / gradient clipping)"
    )


def non_finite_val_loss(metrics: Mapping[str, Any]) -> tuple[str, float] | None:
    """The first scalar ``val*loss*`` metric that is not finite, as ``(name, value)``; ``None`` if all are."""
    for name, value in metrics.items():
        if name.startswith("val") and "loss" in name and value.numel() == 1:
            number = float(value)
            if not math.isfinite(number):
                return name, number
    return None


def val_divergence_message(name: str, value: float, step: int, epoch: int, lrs: Sequence[float]) -> str:
    """The line for a non-finite validation loss: where, and why this validation is not checkpointed."""
    where = divergence_message(f"validation loss {name}", value, step, epoch, lrs).split(";")[0]
    return (
        f"{where}; the weights give non-finite outputs on the validation data, so this validation "
        "is not checkpointed. Lower optimizer.lr (or add warmup / gradient clipping)"
    )
