"""Shared helpers of the benchmark scripts: settings, device set-up, timing, statistics, tables.

Every script in ``benchmarks/`` follows the same shape (see ``STYLE.md``, "Benchmarks"):

- its numbers live in one ``SETTINGS`` dict at the top (a small CPU setting) and a ``FULL`` dict (the GPU
  setting, ``--full``); :func:`pick_settings` merges the command line into one of them;
- it does a warm-up run before timing anything; :class:`Stopwatch` synchronizes the device around
  each timed region (:func:`sync`);
- it repeats over N seeds and reports mean ± std (:func:`mean_std`, :func:`pm`) and ratios against
  the baseline measured in the same run (:func:`paired_ratios`);
- it writes its table as Markdown and its rows as CSV under ``benchmarks/results/`` (git-ignored),
  headed by the machine and date (:func:`machine`, :func:`stamp`, :func:`write_results`).

The scripts import this module as ``_common`` (they put ``benchmarks/`` on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: the offline datasets folder next to the repository (``../shared/data``); never copied into the repo
SHARED_DATA = Path(os.environ.get("LT_SHARED_DATA", ROOT.parent / "shared" / "data"))

if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout without installing
    sys.path.insert(0, str(ROOT))


# -- settings and devices --------------------------------------------------------------------------
def pick_settings(
    small: Mapping[str, Any], full: Mapping[str, Any], use_full: bool, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``full`` or ``small`` (copied), with the non-``None`` values of ``overrides`` put on top."""
    s = dict(full if use_full else small)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in s:
            raise ValueError(f"unknown setting {key!r}; known: {sorted(s)}")
        s[key] = value
    return s


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` (fails clearly without CUDA) or ``"auto"`` (CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} was asked for, but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu, cuda or auto, got {name!r}")
    return device


def setup_torch(device: torch.device, threads: int | None) -> None:
    """CPU: ``threads`` intra-op threads (small shared machines: 1). CUDA: cuDNN autotuning, TF32 matmuls."""
    if device.type == "cpu" and threads:
        torch.set_num_threads(int(threads))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def accelerator(device: torch.device) -> str:
    """The Lightning ``accelerator`` name of ``device``."""
    return "gpu" if device.type == "cuda" else "cpu"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Lightning's info lines and library warnings inside the block (a benchmark prints its table,
    not logs); the logger levels and warning filters are put back afterwards (the smoke tests call the
    scripts' ``main`` inside the test session)."""
    import lightning_tricks._lightning  # noqa: F401  (sets up Lightning's loggers, quieted next)

    names = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning", "lightning_tricks")
    levels = {n: logging.getLogger(n).level for n in names}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


# -- timing ----------------------------------------------------------------------------------------
def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (no-op on CPU), so a clock read covers the work before it."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """``with Stopwatch(device) as sw: ...`` then ``sw.seconds``; the device is synchronized on both sides."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device
        self.seconds = math.nan
        self._t0 = 0.0

    def __enter__(self) -> Stopwatch:
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0


# -- statistics ------------------------------------------------------------------------------------
def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value, nan for none)."""
    v = [float(x) for x in values]
    if not v:
        return math.nan, math.nan
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def pm(values: Iterable[float], digits: int = 2, scale: float = 1.0) -> str:
    """``"mean ± std"`` of ``values * scale``."""
    m, s = mean_std(x * scale for x in values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def paired_ratios(values: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """``values[i] / baseline[i]``: repeat ``i`` of a configuration over repeat ``i`` of the baseline.

    The scripts interleave configurations inside each repeat, so the two timings of a pair were taken
    minutes apart at most and a slow phase of a shared machine hits both.
    """
    if len(values) != len(baseline):
        raise ValueError(f"paired_ratios needs equal lengths, got {len(values)} and {len(baseline)}")
    return [v / b for v, b in zip(values, baseline)]


def all_finite(rows: Iterable[Mapping[str, Any]], keys: Iterable[str]) -> bool:
    """Whether every ``row[key]`` that is a number is finite (used by the smoke tests)."""
    keys = list(keys)
    return all(math.isfinite(float(r[k])) for r in rows for k in keys if isinstance(r.get(k), (int, float)))


# -- provenance and output -------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """One line naming the hardware and software the numbers come from."""
    if device.type == "cuda":
        hw = f"GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        hw = f"CPU {_cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s))"
    from lightning_tricks._lightning import pl

    return f"{hw}; torch {torch.__version__}; pytorch-lightning {pl.__version__}; Python {platform.python_version()}"


def stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A Markdown table; columns whose index is in ``right`` are right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    name: str, rows: Sequence[Mapping[str, Any]], markdown: str, out_dir: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """Write ``<name>.md`` (the table) and ``<name>.csv`` (one row per measurement) into ``out_dir``."""
    out = Path(out_dir) if out_dir is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = out / f"{name}.md", out / f"{name}.csv"
    md.write_text(markdown.rstrip() + "\n")
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return md, csv_path


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
