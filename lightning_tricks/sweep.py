"""Sweep summaries: one table (CSV + printed) of every job's overrides and results.

Each run of :func:`lightning_tricks.train.train` writes ``metrics.json`` into its run directory. At the
end of a ``--multirun`` the Hydra callback :class:`SweepSummary` (enabled in ``conf/train.yaml``) reads
them all from the sweep directory, so it works with any launcher (local, joblib, submitit/SLURM),
and writes ``summary.csv`` there, sorted by the monitored metric.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from lightning_tricks.launch import global_rank

log = logging.getLogger(__name__)


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job found under ``sweep_dir``: ``job``, each override, then each metric."""
    rows = []
    for path in sorted(Path(sweep_dir).glob("**/metrics.json")):
        record = json.loads(path.read_text())
        row: dict[str, Any] = {"job": str(path.parent.relative_to(sweep_dir))}
        for override in record.get("overrides", []):
            key, _, value = override.partition("=")
            row[key.lstrip("+~")] = value
        row.update(record.get("metrics", {}))
        rows.append(row)
    return rows


def summarize(sweep_dir: str | Path, monitor: str | None = None, mode: str = "max") -> tuple[Path, str]:
    """Write ``summary.csv`` in ``sweep_dir`` (best first by ``monitor``) and return it with a text table."""
    rows = collect(sweep_dir)
    key = f"best/{monitor}" if monitor else None
    if key and any(key in r for r in rows):
        sign = -1.0 if mode == "max" else 1.0
        rows.sort(
            key=lambda r: sign * r[key] if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) else math.inf
        )
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    out = Path(sweep_dir) / "summary.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in columns if c == "job" or "/" not in c or c in (key, "test/acc", "time/fit_s")]
    return out, _table(rows, shown)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


class SweepSummary(HydraCallback):
    """Hydra callback: after a multirun, write and print the summary table of all jobs."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if global_rank(os.environ) != 0 or not sweep_dir.is_dir():  # srun'd ranks all sweep; rank 0 summarizes
            return
        path, table = summarize(sweep_dir, config.get("monitor"), config.get("monitor_mode", "max"))
        log.info("sweep summary (%s):\n%s", path, table)
