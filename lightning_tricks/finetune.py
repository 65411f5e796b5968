"""Transfer learning as pure helpers: freeze a backbone, split it into layers, discriminative LRs.

The recipe (CS231n; Yosinski et al. 2014, arXiv:1411.1792): with little data, use a pretrained
backbone as a frozen feature extractor and train only the new head; with more data, then unfreeze
the backbone and fine-tune it with a *lower* learning rate than the head. Layer-wise (discriminative)
learning rates lower the LR further for layers closer to the input, whose features are the most
general (Howard & Ruder 2018, ULMFiT, arXiv:1801.06146; layer-wise LR decay as in BEiT, Bao et al.
2021, arXiv:2106.08254):

    lr(layer) = head_lr * lr_factor * layer_decay ** depth,   depth = 0 for the layer next to the head,
                                                              L - 1 for the layer next to the input.

:func:`split_layers` cuts a backbone into those layers, :func:`backbone_param_groups` makes the
optimizer groups, :func:`freeze` / :func:`unfreeze` switch ``requires_grad`` (and BatchNorm's mode).
A backbone module that holds its own classifier and says which it is (timm models' ``get_classifier()``)
keeps that classifier out of all of these: :func:`classifier_parameters` finds its parameters.
:class:`~lightning_tricks.callbacks.FreezeUnfreeze` wires them into a Trainer.

Example:
    >>> from torch import nn
    >>> backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    >>> [[n for n, _ in layer] for layer in split_layers(backbone)]
    [['0.weight', '0.bias', '1.weight', '1.bias'], ['3.weight', '3.bias']]
    >>> layer_lr_factors(3, lr_factor=0.1, layer_decay=0.5)
    [0.025, 0.05, 0.1]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_tricks.checks import check_int
from lightning_tricks.optim import no_decay_parameter_names

NamedParams = list[tuple[str, nn.Parameter]]


def resolve_module(root: nn.Module, path: str) -> tuple[str, nn.Module]:
    """The submodule of ``root`` at dotted ``path``, or the unique one whose name ends with ``.path``.

    ``resolve_module(classifier, "backbone")`` finds ``classifier.net.backbone`` when the module wraps
    the network (as :class:`~lightning_tricks.mixins.Classifier` does). Returns ``(full_name, module)``.
    """
    if not path or not isinstance(path, str):
        raise ValueError(f"backbone must be a non-empty attribute path, got {path!r}")
    try:
        return path, root.get_submodule(path)
    except AttributeError:
        pass
    matches = [(n, m) for n, m in root.named_modules() if n.endswith("." + path)]
    if len(matches) == 1:
        return matches[0]
    children = [n for n, _ in root.named_modules() if n and n.count(".") < 2]
    if not matches:
        raise ValueError(
            f"the module has no submodule {path!r} (nor one ending with '.{path}'); submodules: {children}"
        )
    raise ValueError(f"backbone={path!r} is ambiguous, it matches {[n for n, _ in matches]}; give the full path")


def classifier_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of the classifier inside ``module`` when it names one (timm's ``get_classifier()``).

    ``[]`` for a module without ``get_classifier`` or whose classifier has no parameters (e.g. after
    timm's ``reset_classifier(0)``, as in :class:`~lightning_tricks.models.TimmModel`'s backbone).
    """
    get = getattr(module, "get_classifier", None)
    if not callable(get):
        return []
    found = get()
    heads = list(found) if isinstance(found, (list, tuple)) else [found]
    params: list[nn.Parameter] = []
    for head in heads:
        if isinstance(head, nn.Module):
            params += [p for p in head.parameters() if all(p is not q for q in params)]
    return params


def split_layers(backbone: nn.Module, skip: Iterable[nn.Parameter] = ()) -> list[NamedParams]:
    """The backbone's parameters cut into layers, input side first.

    Each direct child that holds a weight of two or more dimensions (a ``Linear``, a ``Conv``, a
    block containing them) starts a layer; children without one (BatchNorm, LayerNorm, ...) join the
    layer before them (or the first layer if they come first). A backbone without children is one
    layer. Parameter names are relative to ``backbone``; frozen and trainable parameters alike.
    Parameters in ``skip`` (a classifier inside the backbone) are left out before the split, so they
    count for no layer.
    """
    skipped = {id(p) for p in skip}
    children = list(backbone.named_children())
    own = [(n, p) for n, p in backbone.named_parameters(recurse=False) if id(p) not in skipped]
    if not children:
        return [own] if own else []
    layers: list[NamedParams] = []
    pending: NamedParams = list(own)
    for cname, child in children:
        params = [(f"{cname}.{n}", p) for n, p in child.named_parameters() if id(p) not in skipped]
        if not params:
            continue
        if any(p.ndim >= 2 for _, p in params):
            layers.append(pending + params)
            pending = []
        elif layers:
            layers[-1].extend(params)
        else:
            pending.extend(params)
    if pending:
        if layers:
            layers[-1].extend(pending)
        else:
            layers.append(pending)
    return layers


def layer_lr_factors(num_layers: int, lr_factor: float, layer_decay: float | None = None) -> list[float]:
    """LR multipliers (relative to the head's LR) per layer, input side first.

    ``lr_factor * layer_decay ** (num_layers - 1 - i)`` for layer ``i``; all ``lr_factor`` when
    ``layer_decay`` is None.
    """
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers!r}")
    decay = 1.0 if layer_decay is None else float(layer_decay)
    return [lr_factor * decay ** (num_layers - 1 - i) for i in range(num_layers)]


def batchnorm_modules(module: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers (any dimension, SyncBatchNorm included) inside ``module``."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def freeze(module: nn.Module, train_bn: bool = False, keep: Iterable[nn.Parameter] = ()) -> list[_BatchNorm]:
    """``requires_grad=False`` on ``module``'s parameters; with ``train_bn`` BatchNorm stays trainable.

    Parameters in ``keep`` (a classifier inside ``module``, :func:`classifier_parameters`) stay trainable,
    and so do the BatchNorm layers among them. Returns the BatchNorm layers that are frozen (empty with
    ``train_bn=True``): the caller keeps them in eval mode while frozen (:func:`set_bn_eval`), so they
    neither train nor update running statistics and normalize as the pretrained network did.
    """
    kept = {id(p) for p in keep}
    bns = [m for m in batchnorm_modules(module) if not any(id(p) in kept for p in m.parameters())]
    if train_bn:
        kept |= {id(p) for m in bns for p in m.parameters()}
    for p in module.parameters():
        if id(p) not in kept:
            p.requires_grad_(False)
    return [] if train_bn else bns


def unfreeze(module: nn.Module) -> None:
    """``requires_grad=True`` on every parameter of ``module`` and BatchNorm layers back in training mode."""
    for p in module.parameters():
        p.requires_grad_(True)
    for m in batchnorm_modules(module):
        m.train()


def set_bn_eval(bns: Iterable[_BatchNorm]) -> None:
    """Eval mode on each BatchNorm layer (running statistics used and not updated)."""
    for m in bns:
        m.eval()


def backbone_param_groups(
    backbone: nn.Module,
    prefix: str,
    head_lr: float,
    lr_factor: float = 0.1,
    layer_decay: float | None = None,
    weight_decay: float | None = None,
    split_no_decay: bool = False,
    exclude: Iterable[nn.Parameter] = (),
    base_lr: float | None = None,
    head: Iterable[nn.Parameter] = (),
) -> list[dict[str, Any]]:
    """Optimizer groups for the backbone's parameters at discriminative learning rates.

    One group per layer (:func:`split_layers`) with ``lr = head_lr * layer_lr_factors(...)[i]``, or one
    group for the whole backbone when ``layer_decay`` is None. With ``split_no_decay`` each group is
    split further into weights (``weight_decay``) and biases/normalization parameters (no decay), the
    rule of :func:`~lightning_tricks.mixins.param_groups_weight_decay`. Parameters in ``exclude``
    (already in the optimizer) are left out, and so are empty groups. ``weight_decay=None`` leaves the
    key out (the optimizer's default applies). With ``base_lr`` (a schedule's base LR of the head)
    each group also gets ``initial_lr = base_lr * factor`` so that LR schedules scale it like the head.
    Parameters in ``head`` (a classifier inside ``backbone``) are no part of the backbone: they are left
    out and count for no layer of depth.

    Group names: ``"<prefix>"`` or ``"<prefix>.layer<i>"`` (``i`` from the input side), with
    ``"/no_decay"`` appended to the no-decay half. Each group has ``"param_names"`` (``prefix`` + the
    name inside ``backbone``), torch's key for named parameter groups; drop it before
    ``add_param_group`` when the optimizer's other groups have no names (torch requires all or none).
    """
    head = list(head)
    excluded = {id(p) for p in exclude} | {id(p) for p in head}
    if layer_decay is None:
        layers = [[(n, p) for n, p in backbone.named_parameters()]]
        names = [prefix]
    else:
        layers = split_layers(backbone, skip=head)
        names = [f"{prefix}.layer{i}" for i in range(len(layers))]
    factors = layer_lr_factors(len(layers), lr_factor, layer_decay)
    skip = no_decay_parameter_names(backbone) if split_no_decay else set()
    groups: list[dict[str, Any]] = []
    for name, layer, factor in zip(names, layers, factors):
        kept = [(n, p) for n, p in layer if id(p) not in excluded]
        halves = [
            (name, [(n, p) for n, p in kept if n not in skip], weight_decay),
            (f"{name}/no_decay", [(n, p) for n, p in kept if n in skip], 0.0 if split_no_decay else None),
        ]
        for gname, named, wd in halves:
            if not named:
                continue
            group: dict[str, Any] = {
                "name": gname,
                "params": [p for _, p in named],
                "lr": head_lr * factor,
                "param_names": [f"{prefix}.{n}" for n, _ in named],
            }
            if wd is not None:
                group["weight_decay"] = wd
            if base_lr is not None:
                group["initial_lr"] = base_lr * factor
            groups.append(group)
    return groups


def params_by_name(module: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    """``module``'s parameters with the given (full) names, in that order; a missing name raises."""
    table = dict(module.named_parameters())
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"parameters {missing[:5]} not found in the module (architecture changed?)")
    return [table[n] for n in names]


def check_finetune_args(backbone: Any, unfreeze_at_epoch: Any, lr_factor: Any, layer_decay: Any) -> None:
    """Raise ``ValueError`` naming the first bad :class:`~lightning_tricks.callbacks.FreezeUnfreeze` argument."""
    if not isinstance(backbone, str) or not backbone:
        raise ValueError(f"backbone must be a non-empty attribute path, got {backbone!r}")
    check_int("unfreeze_at_epoch", unfreeze_at_epoch, 0, allow_none=True)
    if not (isinstance(lr_factor, (int, float)) and lr_factor > 0):
        raise ValueError(f"lr_factor must be > 0, got {lr_factor!r}")
    if layer_decay is not None and not (isinstance(layer_decay, (int, float)) and 0 < layer_decay <= 1):
        raise ValueError(f"layer_decay must be None or in (0, 1], got {layer_decay!r}")


def frozen_part_check(name: str, backbone: nn.Module) -> list[nn.Parameter]:
    """The backbone's own classifier parameters (kept trainable); refuses a backbone with nothing to freeze."""
    if not any(True for _ in backbone.parameters()):
        raise ValueError(f"backbone {name!r} has no parameters to freeze")
    inner_head = classifier_parameters(backbone)
    if inner_head and len(inner_head) == len(list(backbone.parameters())):
        raise ValueError(f"backbone {name!r} is all classifier (get_classifier()): nothing to freeze")
    return inner_head


def weight_decay_rule(config: Any, groups: Sequence[dict[str, Any]]) -> tuple[float, bool]:
    """``(weight_decay, split_no_decay)`` for the backbone groups: the module's optimizer config if it has one,
    else read off the optimizer's groups (a ``"no_decay"`` group means split; the ``"decay"`` group's, else
    the first group's, weight decay)."""
    if config is not None and hasattr(config, "weight_decay"):
        return float(config.weight_decay), bool(getattr(config, "no_decay_bias_norm", False))
    named = {g.get("name"): g for g in groups}
    return float((named.get("decay") or groups[0]).get("weight_decay") or 0.0), "no_decay" in named
