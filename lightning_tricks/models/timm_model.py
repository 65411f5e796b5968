"""Transfer learning from a timm model: pretrained weights from a local file, a new head, any input channels.

The CS231n recipe: start from ImageNet weights, replace the classifier for your classes, train the new
head on the frozen backbone, then fine-tune everything at a lower LR
(:class:`~lightning_tricks.callbacks.FreezeUnfreeze`, with layer-wise LR decay if wanted). timm
(Wightman, "PyTorch Image Models", https://github.com/huggingface/pytorch-image-models) provides the
architectures; it is an optional extra (``pip install -e ".[timm]"``) imported only when a
:class:`TimmModel` is built.

Weights come from

- ``pretrained_path``: a local file (no internet needed): a plain ``state_dict`` saved with ``torch.save``
  (read with ``torch.load(weights_only=True)``, so it cannot run code), also inside a ``{"state_dict": ...}``
  or ``{"model": ...}`` wrapper and with DDP's ``module.`` prefix, or a ``.safetensors`` file (needs the
  ``safetensors`` package). The file's classifier is dropped; every other key must match the model
  exactly (an error lists the missing and unexpected keys and the shape mismatches), except the first
  convolution's input channels, which are adapted (:func:`adapt_input_channels`).
- ``pretrained=True``: timm downloads its weights (needs internet) and adapts head and channels itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tricks.init import init_weights
from lightning_tricks.models._common import check_head, check_init
from lightning_tricks.nn import DropConnectLinear

__all__ = [
    "TIMM_MISSING",
    "MissingExtraError",
    "TimmModel",
    "adapt_input_channels",
    "classifier_names",
    "fit_state_dict",
    "import_timm",
    "read_state_dict",
]

TIMM_MISSING = 'TimmModel needs the optional timm package: pip install -e ".[timm]" (or pip install "timm>=1.0")'


class MissingExtraError(ImportError, ValueError):
    """An optional package is missing: an ``ImportError`` for Python callers and a ``ValueError`` (a
    configuration error, reported in one line by the training entry point) for Hydra configs."""


def import_timm() -> ModuleType:
    """``import timm``, or :class:`MissingExtraError` with the install command (one line)."""
    try:
        return importlib.import_module("timm")
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "timm":
            raise MissingExtraError(TIMM_MISSING) from None
        raise MissingExtraError(f"timm is installed but cannot be imported: {_first_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - a broken install (e.g. a torchvision built for another torch)
        raise MissingExtraError(
            f"timm is installed but cannot be imported ({type(e).__name__}: {_first_line(e)}); "
            'reinstall it with pip install -e ".[timm]"'
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _few(keys: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > n else ''}]"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file (see the module docstring for the accepted formats), on the CPU.

    Raises ``FileNotFoundError`` naming the path when there is no such file, ``ValueError`` when the
    file cannot be read or holds no state dict, :class:`MissingExtraError` for a ``.safetensors``
    file without the ``safetensors`` package.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_path={path}: no such file")
    obj: Any
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise MissingExtraError(
                f"pretrained_path={path} is a safetensors file: pip install safetensors to read it"
            ) from None
        try:
            obj = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - any failure to read: not a weights file
            raise ValueError(f"pretrained_path={path} is not a readable safetensors file ({_first_line(e)})") from e
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to read (or refused pickle): not a weights file
            raise ValueError(f"pretrained_path={path} is not a readable weights file ({_first_line(e)})") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping) and not _is_state(obj):
            obj = obj[key]
    if not _is_state(obj) or not obj:
        raise ValueError(
            f"pretrained_path={path} holds no state dict (a mapping of parameter names to tensors), "
            f"found {type(obj).__name__}"
        )
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _is_state(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def adapt_input_channels(weight: Tensor, in_chans: int) -> Tensor:
    """A first-layer kernel ``(out, C, *k)`` reshaped for ``in_chans`` input channels.

    ``in_chans == 1``: the sum over the ``C`` channels, so a gray image gives exactly the response the
    original layer gives to that image repeated over ``C`` channels (``conv(W, [x]*C) = conv(sum_c W_c, x)``).
    Otherwise the ``C`` channels are repeated cyclically up to ``in_chans`` and scaled by ``C / in_chans``,
    which keeps the response to equal channels when ``in_chans`` is a multiple of ``C``. (timm's
    ``adapt_input_conv`` uses the same two rules.)

    Example:
        >>> w = torch.ones(2, 3, 1, 1)
        >>> adapt_input_channels(w, 1).flatten().tolist()
        [3.0, 3.0]
        >>> adapt_input_channels(w, 6).shape, float(adapt_input_channels(w, 6)[0, 0])
        (torch.Size([2, 6, 1, 1]), 0.5)
    """
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be an int >= 1, got {in_chans!r}")
    if weight.ndim < 3:
        raise ValueError(
            f"adapt_input_channels needs a convolution kernel (out, C, *k), got shape {tuple(weight.shape)}"
        )
    channels = weight.shape[1]
    if in_chans == channels:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    index = torch.arange(in_chans, device=weight.device) % channels
    return weight.index_select(1, index) * (channels / in_chans)


def classifier_names(model: nn.Module) -> list[str]:
    """Names (in ``model.named_modules()``) of the module(s) that timm's ``model.get_classifier()`` returns.

    Falls back to ``model.pretrained_cfg["classifier"]`` (a name or a list of names) when
    ``get_classifier`` is missing or returns a module that is not a submodule.
    """
    get = getattr(model, "get_classifier", None)
    found = get() if callable(get) else None
    heads = list(found) if isinstance(found, (list, tuple)) else [found] if found is not None else []
    names = [n for n, m in model.named_modules() if n and any(m is h for h in heads)]
    if names:
        return names
    cfg = getattr(model, "pretrained_cfg", None) or {}
    declared = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, (list, tuple)):
        return [str(d) for d in declared]
    raise ValueError(
        f"{type(model).__name__} has no get_classifier() (nor pretrained_cfg['classifier']): cannot tell its head"
    )


def _first_conv_keys(model: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    declared = cfg.get("first_conv") if isinstance(cfg, Mapping) else None
    if isinstance(declared, str):
        return [f"{declared}.weight"]
    if isinstance(declared, (list, tuple)):
        return [f"{d}.weight" for d in declared]
    first = next((k for k, v in state.items() if k.endswith("weight") and v.ndim >= 3), None)
    return [first] if first is not None else []


def fit_state_dict(
    model: nn.Module, state: Mapping[str, Tensor], head: Sequence[str], source: str = "the weights"
) -> dict[str, Tensor]:
    """``state`` without the keys of the ``head`` modules, checked against ``model``: strict about the rest.

    Every key of ``model.state_dict()`` outside the head must be in ``state`` with the same shape and
    ``state`` must have no other key; the only exception is the first convolution's kernel (timm's
    ``pretrained_cfg["first_conv"]``), whose input channels are adapted with :func:`adapt_input_channels`.
    Anything else raises one ``ValueError`` that lists the missing keys, the unexpected keys and the
    shape mismatches. Returns the tensors to load with ``model.load_state_dict(..., strict=False)``.
    """

    def in_head(key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in head)

    own = {k: v for k, v in model.state_dict().items() if not in_head(k)}
    given = {k: v for k, v in state.items() if not in_head(k)}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    first_conv = set(_first_conv_keys(model, own))
    fitted: dict[str, Tensor] = {}
    mismatched: list[str] = []
    for key, value in given.items():
        if key not in own:
            continue
        want = own[key]
        if value.shape != want.shape:
            adaptable = (
                key in first_conv
                and value.ndim == want.ndim >= 3
                and value.shape[0] == want.shape[0]
                and value.shape[2:] == want.shape[2:]
            )
            if not adaptable:
                mismatched.append(f"{key} {tuple(value.shape)} != {tuple(want.shape)}")
                continue
            value = adapt_input_channels(value, int(want.shape[1]))
        fitted[key] = value
    if missing or unexpected or mismatched:
        parts = [
            f"missing keys {_few(missing)}" if missing else "",
            f"unexpected keys {_few(unexpected)}" if unexpected else "",
            f"shapes that differ {_few(mismatched)}" if mismatched else "",
        ]
        raise ValueError(
            f"{source} does not fit {type(model).__name__} (its head {list(head)} is replaced, everything else "
            f"must match): {'; '.join(p for p in parts if p)}"
        )
    return fitted


class TimmModel(nn.Module):
    """A timm model with its classifier replaced for ``num_classes`` and ``input_shape[0]`` input channels.

    Built with ``timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
    in_chans=input_shape[0], drop_rate=..., drop_path_rate=..., **model_kwargs)``; with ``pretrained_path``
    the file's weights are loaded into everything but the classifier (see the module docstring), so the
    new head keeps timm's fresh initialization. Then the classifier (``model.get_classifier()``) becomes
    ``self.head`` and ``model.reset_classifier(0)`` turns the rest into ``self.backbone``, which returns
    the pooled features (``num_features`` of them): :class:`~lightning_tricks.callbacks.FreezeUnfreeze`'s
    default ``backbone="backbone"`` then freezes exactly the pretrained part, and its layer-wise LR decay
    splits the timm model's top-level children (for a ResNet: stem, ``layer1`` .. ``layer4``; a model
    whose blocks sit in one container child, like ViT's ``blocks``, gets that container as one layer).

    Args:
        input_shape: ``(C, H, W)`` of the data; ``C`` is timm's ``in_chans`` (1 for gray images: a
            3-channel pretrained first convolution is summed over its channels).
        num_classes: classes of the new head (>= 2).
        name: a timm model name, e.g. ``"resnet18"``, ``"convnext_atto"``, ``"vit_tiny_patch16_224"``.
        pretrained: let timm download its pretrained weights (needs internet).
        pretrained_path: a local weights file instead (exclusive with ``pretrained``).
        head: ``"linear"`` (timm's classifier) or ``"dropconnect"`` (a
            :class:`~lightning_tricks.nn.DropConnectLinear` with the same initial weights).
        dropconnect_p: drop probability of each head weight in training with ``head="dropconnect"``.
        drop_rate: timm's dropout before the classifier.
        drop_path_rate: timm's stochastic depth rate (``None``: the model's default).
        model_kwargs: more keyword arguments for ``timm.create_model`` (e.g. ``{"global_pool": "max"}``).
        init: re-draw every convolution and linear weight (:func:`lightning_tricks.init.init_weights`, ReLU's
            gain, 0.1 for the classifier); ``"default"`` keeps timm's own initialization. Refused with
            pretrained weights, which it would overwrite.
        zero_init_residual: call timm's ``zero_init_last()`` on every block that has it (the last norm scale
            of each residual branch set to 0). ``false`` keeps timm's default, which for its ResNets is
            already zero (``model_kwargs: {zero_init_last: false}`` turns that off).

    Raises:
        MissingExtraError: timm is not installed (the message names ``pip install -e ".[timm]"``).
        FileNotFoundError: ``pretrained_path`` does not exist (one line naming it).
        ValueError: a bad argument, an unknown model name, or a weights file that does not fit.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        name: str = "resnet18",
        pretrained: bool = False,
        pretrained_path: str | Path | None = None,
        head: str = "linear",
        dropconnect_p: float = 0.5,
        drop_rate: float = 0.0,
        drop_path_rate: float | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        init: str = "default",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3 or any(s < 1 for s in shape):
            raise ValueError(f"TimmModel needs input_shape (C, H, W) of positive sizes, got {tuple(input_shape)!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a timm model name, got {name!r}")
        if not isinstance(pretrained, bool):
            raise ValueError(f"pretrained must be a bool, got {pretrained!r}")
        if pretrained and pretrained_path is not None:
            raise ValueError(
                f"pretrained=true downloads timm's weights and pretrained_path={pretrained_path} loads a file: "
                "choose one"
            )
        check_head(head, dropconnect_p)
        check_init(init, zero_init_residual)
        if init != "default" and (pretrained or pretrained_path is not None):
            raise ValueError(f"init={init!r} would overwrite the pretrained weights; use init: default with them")
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        if drop_path_rate is not None and (
            isinstance(drop_path_rate, bool)
            or not isinstance(drop_path_rate, (int, float))
            or not 0 <= drop_path_rate < 1
        ):
            raise ValueError(f"drop_path_rate must be None or in [0, 1), got {drop_path_rate!r}")
        kwargs = dict(model_kwargs or {})
        clash = sorted({"num_classes", "in_chans", "pretrained", "drop_rate", "drop_path_rate"} & set(kwargs))
        if clash:
            raise ValueError(f"model_kwargs must not set {clash}: they are TimmModel's own arguments")
        if pretrained_path is not None and not Path(pretrained_path).expanduser().is_file():
            raise FileNotFoundError(f"pretrained_path={Path(pretrained_path).expanduser()}: no such file")

        timm = import_timm()
        is_model = getattr(timm, "is_model", None)
        if callable(is_model) and not is_model(name):
            raise ValueError(f"name={name!r} is not a timm model; list the names with timm.list_models('*{name[:4]}*')")
        net = timm.create_model(
            name,
            pretrained=pretrained,
            num_classes=num_classes,
            in_chans=shape[0],
            drop_rate=float(drop_rate),
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
        names = classifier_names(net)
        if pretrained_path is not None:
            path = Path(pretrained_path).expanduser()
            fitted = fit_state_dict(net, read_state_dict(path), names, source=f"pretrained_path={path}")
            net.load_state_dict(fitted, strict=False)  # fit_state_dict checked the keys: only the head is left out
        found = net.get_classifier()
        if not isinstance(found, nn.Module) or len(names) != 1:
            raise ValueError(f"TimmModel needs a model with one classifier; {name} has {names}")
        classifier: nn.Module = found
        if head == "dropconnect":
            if not isinstance(classifier, nn.Linear):
                raise ValueError(f"head=dropconnect needs a Linear classifier; {name}'s is {type(classifier).__name__}")
            dropconnect = DropConnectLinear(
                classifier.in_features,
                classifier.out_features,
                bias=classifier.bias is not None,
                p=float(dropconnect_p),
            )
            dropconnect.load_state_dict(classifier.state_dict())
            classifier = dropconnect
        pool = {"global_pool": kwargs["global_pool"]} if "global_pool" in kwargs else {}
        net.reset_classifier(0, **pool)
        self.backbone = net
        self.head = classifier
        init_weights(self, init, output=classifier)
        if zero_init_residual:
            blocks = [m for m in net.modules() if callable(getattr(m, "zero_init_last", None))]
            if not blocks:
                raise ValueError(f"zero_init_residual=true: {name} has no residual blocks with timm's zero_init_last")
            for block in blocks:
                block.zero_init_last()
        self.name = name
        self.num_features = int(getattr(net, "num_features", 0)) or None

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))
