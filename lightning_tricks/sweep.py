"""Sweep summaries: one table (CSV + printed) of every job's overrides and results.

Each run of :func:`lightning_tricks.train.train` writes ``metrics.json`` into its run directory. At the
end of a ``--multirun`` the Hydra callback :class:`SweepSummary` (enabled in ``conf/train.yaml``) reads
them all from the sweep directory, so it works with any launcher (local, joblib, submitit/SLURM),
and writes ``summary.csv`` there, sorted by the monitored metric, with each job's ``status``: ``ok``,
``diverged``, ``failed: <one line>``, ``refused: <one line>`` or ``preempted``. A job never ends the
sweep (see ``lightning_tricks.train``); the sweep exits with :func:`exit_code` of its jobs.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from lightning_tricks.launch import global_rank

log = logging.getLogger(__name__)


def _job_row(job: str, overrides: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"job": job}
    for override in overrides:
        key, _, value = override.partition("=")
        row[key.lstrip("+~")] = value
    return row


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job found under ``sweep_dir``: ``job``, each override, then ``status`` and each metric.

    A job directory that Hydra made (``.hydra/overrides.yaml``) but that holds no ``metrics.json`` (the job
    was killed, or crashed before it could report) is listed too, with ``status: failed: no metrics.json``.
    """
    sweep_dir = Path(sweep_dir)
    rows = []
    reported = set()
    for path in sorted(sweep_dir.glob("**/metrics.json")):
        record = json.loads(path.read_text())
        row = _job_row(str(path.parent.relative_to(sweep_dir)), record.get("overrides", []))
        metrics = dict(record.get("metrics", {}))
        row["status"] = metrics.pop("status", "ok")
        row.update(metrics)
        rows.append(row)
        reported.add(path.parent)
    for path in sorted(sweep_dir.glob("**/.hydra/overrides.yaml")):
        job_dir = path.parent.parent
        if job_dir in reported or job_dir == sweep_dir:
            continue
        try:
            overrides = [str(o) for o in yaml.safe_load(path.read_text()) or []]
        except yaml.YAMLError:
            overrides = []
        row = _job_row(str(job_dir.relative_to(sweep_dir)), overrides)
        row["status"] = "failed: no metrics.json (the job ended before it could report)"
        rows.append(row)
    return rows


def exit_code(rows: list[dict[str, Any]]) -> int:
    """The sweep's exit code: 1 if a job failed or was refused, else 143 if one was pre-empted, else 0.

    A diverged job is a result of the search (it ranks last), not a failure of the sweep.
    """
    statuses = [str(r.get("status", "ok")) for r in rows]
    if any(s.startswith(("failed", "refused")) for s in statuses):
        return 1
    return 143 if "preempted" in statuses else 0


def summarize(sweep_dir: str | Path, monitor: str | None = None, mode: str = "max") -> tuple[Path, str]:
    """Write ``summary.csv`` in ``sweep_dir`` (jobs that ended ``ok`` first, best first by ``monitor``) and
    return it with a text table."""
    rows = collect(sweep_dir)
    key = f"best/{monitor}" if monitor else None
    sign = -1.0 if mode == "max" else 1.0

    def rank(r: dict[str, Any]) -> tuple[int, float]:
        value = r.get(key) if key else None
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        return (0 if r.get("status", "ok") == "ok" else 1, sign * value if finite else math.inf)  # type: ignore[operator]

    rows.sort(key=rank)
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
        code = exit_code(collect(sweep_dir))
        if code:
            log.error("sweep: not every job ended ok or diverged (see the status column of %s)", path)
            sys.exit(code)
