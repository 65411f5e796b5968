"""Training curves as a PNG: loss, accuracy and learning rate against epochs/steps (pure, no Trainer)."""

from __future__ import annotations

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
