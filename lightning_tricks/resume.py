"""What a resumed run keeps from its checkpoint and what it takes from the new config, one line per difference.

A run resumed with ``ckpt_path=`` restores the weights, the optimizer state (its learning rates, momenta and
weight decay included), the loops' progress and every callback's state from the checkpoint; the rest of the
new config applies. :func:`resume_differences` compares the config saved beside the checkpoint (Hydra's
``.hydra/config.yaml`` in the run directory) with the new one and says, for each difference, which of the
two the run goes on with; a difference that cannot be honoured is returned separately as a refusal.

Example:
    >>> old = {"optimizer": {"name": "sgd", "lr": 0.1}, "callbacks": {"ema": {"_target_": "x.EMA", "decay": 0.9}}}
    >>> new = {"optimizer": {"name": "sgd", "lr": 0.5}, "callbacks": {}}
    >>> notes, refusals = resume_differences(old, new)
    >>> print(notes[0])
    callbacks.ema removed: the checkpoint's EMA state (its average) is discarded
    >>> print(notes[1][:66])
    optimizer.lr=0.5 (checkpoint: 0.1): kept from the checkpoint (0.1)
    >>> refusals
    []
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["IGNORED", "flatten", "resume_differences", "saved_config_path"]

#: keys that say where and how a run is written or reported, not what it trains
IGNORED = ("hydra", "ckpt_path", "paths", "logger", "test", "test_weights", "trainer.enable_progress_bar")


def saved_config_path(ckpt_path: str | Path) -> Path | None:
    """The composed config of the run that wrote ``ckpt_path`` (``<run>/.hydra/config.yaml``), if there is one."""
    for folder in list(Path(ckpt_path).resolve().parents)[:3]:
        candidate = folder / ".hydra" / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; an empty mapping stays a leaf (``{}``)."""
    if not isinstance(tree, Mapping) or (not tree and prefix):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in IGNORED)


def _callback_entries(tree: Mapping[Any, Any]) -> dict[str, Any]:
    callbacks = tree.get("callbacks") or {}
    return (
        {name: entry for name, entry in callbacks.items() if entry is not None}
        if isinstance(callbacks, Mapping)
        else {}
    )


def _class_name(entry: Any, name: str) -> str:
    target = entry.get("_target_") if isinstance(entry, Mapping) else None
    return str(target).rsplit(".", 1)[-1] if target else name


def _note(key: str, old: Any, new: Any, mid_epoch: bool) -> tuple[str | None, str | None]:
    """``(note, refusal)`` for one changed leaf ``key``."""
    change = f"{key}={new} (checkpoint: {old})"
    if key == "optimizer.name" or key == "optimizer._target_":
        return None, f"{change}: the checkpoint's optimizer state cannot be loaded into another optimizer"
    if key.startswith("optimizer."):
        return (
            f"{change}: kept from the checkpoint ({old}): the optimizer state is resumed with its own values; "
            f"start a new run to train with {new}",
            None,
        )
    if key.startswith("model."):
        return f"{change}: taken from the new config; the checkpoint's weights are loaded into the new model", None
    if key == "seed":
        return (
            f"{change}: the weights, optimizer state and (with callbacks.random_state) the RNG states come from "
            f"the checkpoint; seed {new} only seeds what the checkpoint does not hold",
            None,
        )
    if key in ("data.batch_size", "trainer.accumulate_grad_batches", "trainer.devices", "trainer.num_nodes"):
        if mid_epoch:
            return None, (
                f"{change}: the checkpoint stopped mid-epoch, and its position in the epoch is counted in "
                f"batches of the old size; resume with {key}={old}, or from a checkpoint at an epoch end"
            )
        return f"{change}: taken from the new config for the remaining epochs", None
    if key.startswith("data."):
        return f"{change}: taken from the new config: training goes on with the new data settings", None
    if key.startswith("schedule."):
        return (
            f"{change}: taken from the new config, evaluated at the resumed step from the checkpoint's base "
            "learning rates",
            None,
        )
    if key.startswith("callbacks."):
        name = key.split(".")[1]
        return f"{change}: taken from the new config; {name}'s state in the checkpoint is loaded and continued", None
    if key in ("trainer.max_epochs", "trainer.max_steps"):
        return f"{change}: taken from the new config: the run now ends at {key.split('.')[1]}={new}", None
    return f"{change}: taken from the new config", None


def resume_differences(
    saved: Mapping[Any, Any], new: Mapping[Any, Any], mid_epoch: bool = False
) -> tuple[list[str], list[str]]:
    """Compare the checkpoint's config ``saved`` with the resumed run's ``new`` (both unresolved containers).

    Returns ``(notes, refusals)``: one line per difference saying what the run goes on with, and one line
    per difference it cannot honour. ``mid_epoch``: the checkpoint was written inside an epoch.
    """
    notes: list[str] = []
    refusals: list[str] = []
    old_callbacks, new_callbacks = _callback_entries(saved), _callback_entries(new)
    for name in sorted(set(old_callbacks) | set(new_callbacks)):
        if name not in new_callbacks:
            what = _class_name(old_callbacks[name], name)
            if name == "random_state":
                notes.append(
                    "callbacks.random_state removed: the checkpoint's RNG states are not restored, so the "
                    "resumed run draws other random numbers than the uninterrupted one would"
                )
            else:
                notes.append(
                    f"callbacks.{name} removed: the checkpoint's {what} state (its average) is discarded"
                    if name in ("ema", "swa")
                    else f"callbacks.{name} removed: the checkpoint's {what} state is discarded"
                )
        elif name not in old_callbacks:
            what = _class_name(new_callbacks[name], name)
            notes.append(
                f"callbacks.{name} added: {what} starts at the resumed step with no state of its own "
                "(as if the run had started there)"
            )
    old_flat, new_flat = flatten(dict(saved)), flatten(dict(new))
    in_both = set(old_callbacks) & set(new_callbacks)
    for key in sorted(set(old_flat) | set(new_flat)):
        if _ignored(key) or key == "callbacks" or (key.startswith("callbacks.") and key.split(".")[1] not in in_both):
            continue
        old, value = old_flat.get(key, "<unset>"), new_flat.get(key, "<unset>")
        if old == value:
            continue
        note, refusal = _note(key, old, value, mid_epoch)
        if note:
            notes.append(note)
        if refusal:
            refusals.append(refusal)
    return notes, refusals
