"""Training curves as a PNG: loss, accuracy and learning rate against epochs/steps (pure, no Trainer)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

Series = Sequence[tuple[float, float]]


def plot_curves(
    epoch_metrics: Mapping[str, Series], lr: Mapping[str, Series], path: str | os.PathLike, title: str = ""
) -> str:
    """Write a three-panel figure (loss, accuracy, learning rate) to ``path`` and return the path.

    ``epoch_metrics`` maps metric names (e.g. ``"train/loss"``, ``"val/acc"``) to ``(epoch, value)``
    points; names containing ``"loss"`` go to the first panel, ``"acc"`` to the second, anything else
    is ignored. ``lr`` maps a parameter group's name to ``(step, lr)`` points.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("loss", axes[0]), ("acc", axes[1]))
    for key, ax in panels:
        for name, points in sorted(epoch_metrics.items()):
            if key in name.split("/")[-1] and points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key if key == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    ax = axes[2]
    for name, points in sorted(lr.items()):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def epoch_label(name: str) -> str:
    """``train/loss_epoch`` -> ``train/loss``: Lightning's epoch suffix dropped."""
    return name[: -len("_epoch")] if name.endswith("_epoch") else name


def record_epoch_metrics(
    store: dict[str, list[tuple[float, float]]], metrics: Mapping[str, float], keys: Sequence[str], epoch: int
) -> None:
    """Append the finite epoch-level ``metrics`` whose names hold one of ``keys`` as ``(epoch, value)``.

    A second value for the same epoch replaces the first (validation may run twice in an epoch).

    Example:
        >>> store = {}
        >>> record_epoch_metrics(store, {"val/loss": 1.0, "val/loss_step": 2.0}, ("val/",), 1)
        >>> record_epoch_metrics(store, {"val/loss": 0.5}, ("val/",), 1); store
        {'val/loss': [(1, 0.5)]}
    """
    for name, v in metrics.items():
        if not any(k in name for k in keys) or name.endswith("_step") or not math.isfinite(v):
            continue
        series = store.setdefault(epoch_label(name), [])
        if series and series[-1][0] == epoch:
            series[-1] = (epoch, v)
        else:
            series.append((epoch, v))


def epoch_line(
    epoch: int, max_epochs: int | None, step: int, metrics: Mapping[str, float], lr: float | None, seconds: float
) -> str:
    """One log line for a finished epoch (1-based ``epoch``): loss and accuracy metrics, LR, wall time.

    Example:
        >>> epoch_line(3, 30, 60, {"train/loss_epoch": 0.12345, "train/loss_step": 0.2, "lr-x": 1.0}, 0.0491, 0.42)
        'epoch 3/30  step 60  train/loss 0.1235  lr 0.0491  0.4 s'
    """
    total = "?" if max_epochs in (None, -1) else str(max_epochs)
    parts = [f"epoch {epoch}/{total}", f"step {step}"]
    seen: set[str] = set()
    for name in sorted(metrics):
        label = epoch_label(name)
        if name.endswith("_step") or not ("loss" in name or "acc" in name) or label in seen:
            continue
        seen.add(label)
        v = metrics[name]
        parts.append(f"{label} {v:.4f}" if math.isfinite(v) else f"{label} {v}")
    if lr is not None:
        parts.append(f"lr {lr:.4g}")
    parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)
