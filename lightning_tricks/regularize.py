"""L1 regularization: the penalty for the loss, the equivalent sign-gradient update, the proximal step.

The L1 penalty ``lam * sum_i |w_i|`` has the (sub)gradient ``lam * sign(w)`` (``sign(0) = 0``, as
autograd gives for ``abs``). So adding ``lam * sign(w)`` to the gradients just before the optimizer
step is the same as adding the penalty to the loss, without the extra autograd graph
(Tibshirani 1996, "Regression shrinkage and selection via the lasso").

L2 is not here: weight decay on weights only (no decay on biases and normalization parameters) is
:func:`lightning_tricks.mixins.param_groups_weight_decay`, used by every optimizer config.

- :func:`select_parameters` picks the regularized parameters by name (regex) and drops biases and
  normalization parameters.
- :func:`l1_penalty` returns ``lam * sum |w|`` to add to a loss.
- :func:`add_l1_grad_` adds ``lam * sign(w)`` to the gradients with multi-tensor (``torch._foreach``)
  ops; :class:`lightning_tricks.callbacks.L1Regularization` (``mode="subgradient"``) calls it before
  each optimizer step.
- :func:`soft_threshold_` is the proximal step of the penalty (ISTA), applied after each optimizer step
  with threshold ``lr * lam`` (``mode="proximal"``, the callback's default): exact zeros, one pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from lightning_tricks.checks import check_float
from lightning_tricks.nn.naming import compile_patterns, matches
from lightning_tricks.optim import no_decay_parameter_names

__all__ = ["select_parameters", "l1_penalty", "add_l1_grad_"]


def _check_lam(lam: float) -> None:
    check_float("lam", lam, 0, math.inf, high_open=True)


def select_parameters(
    module: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude_bias: bool = True,
    trainable_only: bool = True,
) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs of ``module`` that L1 applies to.

    Args:
        module: the model.
        include: a regex or a list of regexes; a parameter is kept if any of them matches its name
            (``re.search``, so ``"backbone"`` keeps every parameter under ``backbone``). ``None`` keeps all.
        exclude_bias: drop biases and normalization parameters (the same rule as weight decay,
            :func:`lightning_tricks.mixins.no_decay_parameter_names`).

        trainable_only: leave out frozen parameters (``requires_grad=False``); the callback passes
            ``False`` so that parameters unfrozen later are covered (their ``grad`` is ``None`` while frozen).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
        >>> [n for n, _ in select_parameters(net)]
        ['0.weight', '2.weight']
        >>> [n for n, _ in select_parameters(net, include=r"^2\\.", exclude_bias=False)]
        ['2.weight', '2.bias']
    """
    patterns = compile_patterns(include, "include")
    skip = no_decay_parameter_names(module) if exclude_bias else set()
    chosen = []
    for name, p in module.named_parameters():
        if (trainable_only and not p.requires_grad) or name in skip:
            continue
        if not matches(name, patterns):
            continue
        chosen.append((name, p))
    return chosen


def l1_penalty(
    params: nn.Module | Iterable[Tensor],
    lam: float,
    include: str | Sequence[str] | None = None,
    exclude_bias: bool = True,
) -> Tensor:
    """``lam * sum_i |w_i|`` over the chosen parameters, to add to a loss.

    Args:
        params: a module (parameters chosen with :func:`select_parameters`) or an iterable of tensors
            (used as given; ``include`` / ``exclude_bias`` then do not apply).
        lam: the L1 strength, >= 0.
        include, exclude_bias: see :func:`select_parameters`.

    Example:
        >>> net = nn.Linear(2, 1, bias=True)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[1.0, -2.0]]))
        >>> round(l1_penalty(net, 0.1).item(), 6)
        0.3
    """
    _check_lam(lam)
    if isinstance(params, nn.Module):
        tensors: list[Tensor] = [p for _, p in select_parameters(params, include, exclude_bias)]
    else:
        if include is not None:
            raise ValueError("include applies to a module; got an iterable of tensors")
        tensors = list(params)
    if not tensors:
        raise ValueError("l1_penalty got no parameters (check include / exclude_bias)")
    norms = torch._foreach_norm(tensors, 1)
    return lam * torch.stack([n.to(norms[0].device) for n in norms]).sum()


def add_l1_grad_(
    params: Sequence[Tensor],
    lam: float,
    scale: Tensor | float | None = None,
) -> None:
    """In place: ``grad += lam * sign(w)`` for each parameter that has a gradient.

    Parameters whose ``grad`` is ``None`` (frozen or unused this step) are left alone, as optimizers
    skip them. Multi-tensor ops, no host sync: one ``torch._foreach_sign`` (temporaries; on a GPU one
    fused kernel, memory from the caching allocator) and one ``torch._foreach_add_`` into the gradients.

    Cost: two passes, reading ``w`` and writing ``sign(w)``, then reading ``grad`` and ``sign(w)`` and
    writing ``grad``: five tensors' worth of memory traffic where the one-pass floor (an EMA's
    ``torch._foreach_lerp_``) moves three, so about 1.7-2 floors (2.0 measured on the CPU MLP). No stock
    PyTorch op reads ``w`` and adds its sign into ``grad`` in one pass (there is no ``_foreach_copysign``,
    and ``addcdiv`` would need ``|w|`` stored); one pass needs a fused kernel (Triton / ``torch.compile``
    on a GPU). Preallocated ``sign`` buffers (``torch.sign(w, out=b)``) were measured on the CPU, alone
    and in the whole stack, and saved nothing (the passes dominate, not the allocation), so they are not used.

    Args:
        params: the parameters (a list prepared once).
        lam: the L1 strength, >= 0.
        scale: multiply the term by this (e.g. the AMP loss scale when the gradients are still scaled).

    Example:
        >>> w = torch.tensor([1.0, -2.0, 0.0], requires_grad=True)
        >>> w.grad = torch.zeros(3)
        >>> add_l1_grad_([w], 0.5)
        >>> w.grad.tolist()
        [0.5, -0.5, 0.0]
    """
    _check_lam(lam)
    if lam == 0:
        return
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    grads = [p.grad for p in with_grad if p.grad is not None]
    with torch.no_grad():
        signs = torch._foreach_sign(with_grad)
        if scale is not None:
            torch._foreach_mul_(signs, scale)
        torch._foreach_add_(grads, signs, alpha=lam)


def soft_threshold_(params: Sequence[Tensor], threshold: float) -> None:
    """In place: ``w = sign(w) * max(|w| - threshold, 0)``, the proximal step of ``threshold * ||w||_1``.

    After a gradient step with learning rate ``lr`` on the loss alone, soft-thresholding by
    ``lr * lam`` is the proximal-gradient (ISTA) step for ``loss + lam * ||w||_1`` (Beck & Teboulle 2009;
    the lasso's classic solver): weights whose magnitude falls below the threshold land exactly on zero
    instead of oscillating around it. One pass per tensor (read ``w``, write ``w``: two tensors' worth of
    memory, where the EMA floor ``_foreach_lerp_`` moves three), through ATen's ``softshrink.out`` writing
    into ``w`` itself; no temporaries.

    Args:
        params: the tensors to shrink (a list prepared once).
        threshold: ``lr * lam``, >= 0 (0 leaves the tensors unchanged).

    Example:
        >>> w = torch.tensor([1.0, -0.05, 0.3, -2.0])
        >>> soft_threshold_([w], 0.1)
        >>> [round(v, 4) + 0.0 for v in w.tolist()]  # + 0.0: softshrink gives -0.0 for a negative input
        [0.9, 0.0, 0.2, -1.9]
    """
    check_float("threshold", threshold, 0, math.inf, high_open=True)
    if threshold == 0:
        return
    with torch.no_grad():
        for w in params:
            torch.ops.aten.softshrink.out(w, threshold, out=w)
