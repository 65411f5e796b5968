"""``python -m lightning_tricks.ablate``: which of the tricks pays on your data and model.

Given any run configuration (the overrides ``python -m lightning_tricks.train`` takes: an ``experiment=``
of ours, a model, data, an optimizer, ...) and named tricks, it runs the baseline (the configuration as
given), the full recipe (every named trick on), the full recipe minus each trick, and with
``ablate.mode=both`` the baseline plus each trick (``ablate.mode=cumulative``: the tricks added one at a time),
each over ``ablate.seeds`` seeds, as ONE Hydra multirun:
``launcher=slurm`` spreads it over a cluster, and jobs of DDP runs work as they do for ``train``. At the end
it writes ``ablation.md``, ``ablation.csv`` and ``ablation.png`` in the sweep directory and prints the table.

    python -m lightning_tricks.ablate experiment=baseline ablate.tricks=[warmup,cosine,ema] ablate.seeds=3

A trick is a named set of overrides (:data:`TRICKS`); ``ablate.define`` adds or replaces names, e.g.
``'+ablate.define={wd: ["optimizer.weight_decay=0.0005"]}'``. Callbacks are named in a trick's
``callbacks`` and added together (``+callbacks=[...]``); two tricks that set the same key with different
values are refused unless :data:`JOINT` says what they mean together (``warmup`` and ``cosine``:
``schedule=warmup_cosine``). Rows already finished in the sweep directory (``hydra.sweep.dir=...`` of an
earlier ablation) are not run again; rows that failed are listed with their status, not dropped.

The comparison is paired by seed: ``Δ vs full`` of a row is the mean over seeds of (row - full) for the
same seed, with its standard deviation over seeds, which removes the seed-to-seed noise both rows share.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TRICKS", "JOINT", "MODES", "Row", "plan_rows", "row_overrides", "collect_results", "report", "main"]

#: trick name -> its overrides on the run: ``callbacks`` (names under conf/callbacks/, added together) and
#: ``overrides`` (Hydra overrides). Defaults for every trick the library has.
TRICKS: dict[str, dict[str, list[str]]] = {
    "warmup": {"overrides": ["schedule=warmup"]},
    "cosine": {"overrides": ["schedule=cosine"]},
    "linear_scaling": {"callbacks": ["linear_scaling"]},
    "no_bias_decay": {"overrides": ["optimizer.no_decay_bias_norm=true"]},
    "label_smoothing": {"overrides": ["module.label_smoothing=0.1"]},
    "ema": {"callbacks": ["ema"]},
    "swa": {"callbacks": ["swa"]},
    "mixup": {"callbacks": ["mixup"]},
    "cutmix": {"callbacks": ["cutmix"]},
    "cutout": {"callbacks": ["cutout"]},
    "ic": {"overrides": ["model.norm=ic"]},
}

#: tricks that set the same key, and what they mean together
JOINT: dict[frozenset[str], list[str]] = {
    frozenset({"warmup", "cosine"}): ["schedule=warmup_cosine"],
}

BASELINE, FULL = "baseline", "full"


class AblationError(ValueError):
    """A bad ablation request, in one line (unknown trick, overrides that clash or do not compose)."""


@dataclass(frozen=True)
class Row:
    """One row of the ablation: its name and the tricks it has on."""

    name: str
    tricks: tuple[str, ...]
    kind: str  # baseline | full | minus | plus


def _definitions(define: Mapping[str, Any] | None) -> dict[str, dict[str, list[str]]]:
    table = {k: {g: list(v) for g, v in d.items()} for k, d in TRICKS.items()}
    for name, value in (define or {}).items():
        if isinstance(value, Mapping):
            unknown = set(value) - {"overrides", "callbacks"}
            if unknown:
                raise AblationError(f"ablate.define.{name}: keys must be overrides/callbacks, got {sorted(unknown)}")
            table[str(name)] = {k: [str(x) for x in v] for k, v in value.items()}
        else:
            table[str(name)] = {"overrides": [str(x) for x in value]}
    return table


MODES = ("minus", "both", "cumulative")


def plan_rows(tricks: Sequence[str], mode: str = "minus", define: Mapping[str, Any] | None = None) -> list[Row]:
    """The rows of an ablation of ``tricks``: baseline, full, full minus each, and (``mode="both"``) baseline
    plus each, or (``mode="cumulative"``) the tricks added one at a time in their order, after the baseline:
    ``baseline+a``, ``baseline+a+b``, ... up to the row before ``full``, which is ``full-<last>`` (not run
    twice). Unknown names are refused with the valid ones listed.

    Example:
        >>> [r.name for r in plan_rows(["ema", "mixup"], mode="both")]
        ['baseline', 'full', 'full-ema', 'full-mixup', 'baseline+ema', 'baseline+mixup']
        >>> [r.name for r in plan_rows(["warmup", "cosine", "ema"], mode="cumulative")]
        ['baseline', 'baseline+warmup', 'full', 'full-warmup', 'full-cosine', 'full-ema']
    """
    table = _definitions(define)
    if mode not in MODES:
        raise AblationError(f"ablate.mode must be one of {MODES}, got {mode!r}")
    names = [str(t) for t in tricks]
    if not names:
        raise AblationError(f"ablate.tricks is empty; name some of: {', '.join(sorted(table))}")
    unknown = [t for t in names if t not in table]
    if unknown:
        raise AblationError(f"unknown trick(s) {unknown} in ablate.tricks; valid names: {', '.join(sorted(table))}")
    if len(set(names)) != len(names):
        raise AblationError(f"ablate.tricks names a trick twice: {names}")
    rows = [Row(BASELINE, (), "baseline"), Row(FULL, tuple(names), "full")]
    if len(names) > 1:
        rows += [Row(f"full-{t}", tuple(n for n in names if n != t), "minus") for t in names]
    if mode == "both":
        rows += [Row(f"baseline+{t}", (t,), "plus") for t in names]
    if mode == "cumulative":
        rows[1:1] = [Row("baseline+" + "+".join(names[:k]), tuple(names[:k]), "plus") for k in range(1, len(names) - 1)]
    return rows


def row_overrides(row: Row, define: Mapping[str, Any] | None = None) -> list[str]:
    """The Hydra overrides that turn ``row``'s tricks on, added to the base run's.

    Example:
        >>> row_overrides(Row("full", ("warmup", "cosine", "ema", "label_smoothing"), "full"))
        ['schedule=warmup_cosine', 'module.label_smoothing=0.1', '+callbacks=[ema]']
    """
    table = _definitions(define)
    by_key: dict[str, tuple[str, str]] = {}  # key -> (override, trick)
    callbacks: list[str] = []
    joined: set[str] = set()
    for pair, meaning in JOINT.items():
        if pair <= set(row.tricks):
            joined |= pair
            for override in meaning:
                by_key[override.partition("=")[0]] = (override, "+".join(sorted(pair)))
    for trick in row.tricks:
        for name in table[trick].get("callbacks", []):
            if name not in callbacks:
                callbacks.append(name)
        for override in table[trick].get("overrides", []):
            key = override.partition("=")[0]
            if key in by_key and trick in joined:
                continue
            if key in by_key and by_key[key][0] != override:
                other = by_key[key][1]
                raise AblationError(
                    f"tricks {other!r} and {trick!r} both set {key} ({by_key[key][0]} vs {override}); "
                    "define what they mean together or ablate them separately"
                )
            by_key[key] = (override, trick)
    out = [override for override, _ in by_key.values()]
    if callbacks:
        out.append(f"+callbacks=[{','.join(callbacks)}]")
    return out


# ---- results -------------------------------------------------------------------------------------------


@dataclass
class RowResult:
    row: str
    status: dict[int, str] = field(default_factory=dict)  # seed -> status
    monitor: dict[int, float] = field(default_factory=dict)
    test: dict[int, float] = field(default_factory=dict)
    fit_s: dict[int, float] = field(default_factory=dict)


def job_dir_name(row: str, seed: int) -> str:
    return f"{row}_s{seed}"


def collect_results(
    sweep_dir: Path, rows: Sequence[str], seeds: Sequence[int], monitor: str, test_metric: str
) -> dict[str, RowResult]:
    """Each row's per-seed status and metrics from the jobs' ``metrics.json`` (missing: ``not run``)."""
    out = {}
    for row in rows:
        result = RowResult(row)
        for seed in seeds:
            path = sweep_dir / job_dir_name(row, seed) / "metrics.json"
            if not path.is_file():
                result.status[seed] = "failed: no metrics.json (the job did not finish)"
                continue
            metrics = json.loads(path.read_text()).get("metrics", {})
            result.status[seed] = str(metrics.get("status", "ok"))
            for target, key in ((result.monitor, f"best/{monitor}"), (result.test, test_metric)):
                value = metrics.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    target[seed] = float(value)
            if isinstance(metrics.get("time/fit_s"), (int, float)):
                result.fit_s[seed] = float(metrics["time/fit_s"])
        out[row] = result
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _paired(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[float, float, int]:
    """Mean and std over the seeds both have of ``a[seed] - b[seed]``, and how many seeds that was."""
    deltas = [a[s] - b[s] for s in a if s in b]
    mean, std = _mean_std(deltas)
    return mean, std, len(deltas)


def table_rows(results: Mapping[str, RowResult]) -> list[dict[str, Any]]:
    """One dict per row: mean ± std of the monitor and the test metric, paired Δs vs full and baseline, fit
    time and status (``ok`` or the first other status with its seed)."""
    full, base = results.get(FULL), results.get(BASELINE)
    out = []
    for name, r in results.items():
        bad = [(s, st) for s, st in sorted(r.status.items()) if st != "ok"]
        row: dict[str, Any] = {"row": name, "seeds_ok": sum(st == "ok" for st in r.status.values())}
        row["status"] = "ok" if not bad else f"seed {bad[0][0]}: {bad[0][1]}" + (" (+more)" if len(bad) > 1 else "")
        for label, values in (("monitor", r.monitor), ("test", r.test), ("fit_s", r.fit_s)):
            row[f"{label}_mean"], row[f"{label}_std"] = _mean_std([values[s] for s in sorted(values)])
        for ref_name, ref in ((FULL, full), (BASELINE, base)):
            for label, values, ref_values in (
                ("monitor", r.monitor, ref.monitor if ref else {}),
                ("test", r.test, ref.test if ref else {}),
            ):
                mean, std, _ = _paired(values, ref_values) if name != ref_name else (math.nan, math.nan, 0)
                row[f"d_{label}_vs_{ref_name}"], row[f"d_{label}_vs_{ref_name}_std"] = mean, std
        out.append(row)
    return out


def _pm(mean: float, std: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _signed(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:+.4f} ± {std:.4f}"


def markdown(rows: Sequence[Mapping[str, Any]], monitor: str, test_metric: str, seeds: int) -> str:
    head = (
        f"| row | best {monitor} | {test_metric} | Δ {monitor} vs full | Δ {test_metric} vs full | "
        f"Δ {monitor} vs baseline | Δ {test_metric} vs baseline | fit s | seeds ok | status |"
    )
    lines = [
        f"Ablation over {seeds} seed(s); mean ± std over seeds; Δ: per-seed paired difference (row − reference).",
        "",
        head,
        "|" + "---|" * 10,
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {_pm(r['monitor_mean'], r['monitor_std'])} | {_pm(r['test_mean'], r['test_std'])} | "
            f"{_signed(r['d_monitor_vs_full'], r['d_monitor_vs_full_std'])} | "
            f"{_signed(r['d_test_vs_full'], r['d_test_vs_full_std'])} | "
            f"{_signed(r['d_monitor_vs_baseline'], r['d_monitor_vs_baseline_std'])} | "
            f"{_signed(r['d_test_vs_baseline'], r['d_test_vs_baseline_std'])} | "
            f"{_pm(r['fit_s_mean'], r['fit_s_std'], 1)} | {r['seeds_ok']}/{seeds} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping[str, Any]], monitor: str, path: Path) -> None:
    """Horizontal bars of each row's Δ of the monitor vs full and vs baseline, with ± std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["row"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.6), sharey=True)
    for ax, ref in zip(axes, (FULL, BASELINE)):
        means = [r[f"d_monitor_vs_{ref}"] for r in rows]
        stds = [r[f"d_monitor_vs_{ref}_std"] for r in rows]
        ys = list(range(len(names)))
        colors = ["tab:green" if (m == m and m > 0) else "tab:red" for m in means]
        ax.barh(ys, [0 if m != m else m for m in means], xerr=[0 if s != s else s for s in stds], color=colors)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(ys, names)
        ax.set_title(f"Δ best {monitor} vs {ref} (paired by seed)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()  # the axes share y: inverting one inverts both, rows top to bottom
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(
    sweep_dir: Path, rows: Sequence[str], seeds: Sequence[int], monitor: str, test_metric: str
) -> tuple[list[dict[str, Any]], str]:
    """Write ``ablation.md``, ``ablation.csv`` and ``ablation.png`` in ``sweep_dir``; return the rows and the
    Markdown table."""
    table = table_rows(collect_results(sweep_dir, rows, seeds, monitor, test_metric))
    text = markdown(table, monitor, test_metric, len(seeds))
    (sweep_dir / "ablation.md").write_text(text)
    with open(sweep_dir / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    plot(table, monitor, sweep_dir / "ablation.png")
    return table, text


def test_metric_of(monitor: str) -> str:
    """The test metric reported beside the monitor: ``val/x`` -> ``test/x``."""
    return "test/" + monitor.split("/", 1)[1] if monitor.startswith("val/") else "test/acc"


# ---- the command ---------------------------------------------------------------------------------------


def split_arguments(argv: Sequence[str]) -> tuple[dict[str, Any], list[str], list[str]]:
    """``ablate.*`` settings, the base run's overrides, and Hydra's own flags, from a command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    settings: dict[str, Any] = {"tricks": [], "seeds": 1, "mode": "minus", "define": {}}
    base, flags = [], []
    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--config") or arg.startswith("--"):
            flags.append(arg)
            continue
        key = arg.partition("=")[0].lstrip("+~")
        if key.startswith("ablate."):
            name = key.split(".", 1)[1]
            if name not in settings:
                raise AblationError(f"unknown setting {key}; valid: {', '.join('ablate.' + k for k in settings)}")
            try:
                settings[name] = parser.parse_override(arg).value()
            except Exception as e:
                raise AblationError(
                    f"cannot read {arg!r} ({str(e).splitlines()[0]}); quote overrides inside lists: "
                    "'+ablate.define={wd: [\"optimizer.weight_decay=0.0005\"]}'"
                ) from e
        else:
            base.append(arg)
    seeds = settings["seeds"]
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise AblationError(f"ablate.seeds must be an int >= 1, got {seeds!r}")
    if isinstance(settings["tricks"], str):
        settings["tricks"] = [settings["tricks"]]
    return settings, base, flags


def check_composes(base: Sequence[str], rows: Sequence[Row], define: Mapping[str, Any] | None) -> dict[str, Any]:
    """Compose every row's config before anything runs; a row that does not compose names its tricks.
    Returns the base run's monitor settings."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lightning_tricks.train import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        try:
            cfg = compose("train", overrides=list(base))
        except Exception as e:
            raise AblationError(f"the base configuration does not compose: {str(e).splitlines()[0]}") from e
        for row in rows:
            try:
                compose("train", overrides=[*base, *row_overrides(row, define)])
            except Exception as e:
                raise AblationError(
                    f"row {row.name} (tricks {list(row.tricks)}) does not compose with the base configuration: "
                    f"{str(e).splitlines()[0]}"
                ) from e
    GlobalHydra.instance().clear()
    return {"monitor": cfg.get("monitor"), "monitor_mode": cfg.get("monitor_mode", "max")}


def _given(base: Sequence[str], key: str) -> str | None:
    for arg in base:
        k, sep, v = arg.partition("=")
        if sep and k.lstrip("+") == key:
            return v
    return None


def finished(job_dir: Path) -> bool:
    """Whether a job of an earlier ablation in this sweep directory ended with a result (``ok`` or ``diverged``)."""
    path = job_dir / "metrics.json"
    if not path.is_file():
        return False
    status = str(json.loads(path.read_text()).get("metrics", {}).get("status", "ok"))
    return status in ("ok", "diverged")


def launch(base: list[str], flags: list[str], rows: Sequence[Row], settings: Mapping[str, Any]) -> int:
    """Run the rows' jobs that have no result yet as one Hydra multirun, then write the report; returns the
    exit code (1 if a job failed or was refused)."""
    import time
    import uuid

    import lightning_tricks.train  # noqa: F401  (registers the resolvers train.yaml uses)

    seed0 = int(_given(base, "seed") or 0)
    seeds = [seed0 + i for i in range(int(settings["seeds"]))]
    sweep = _given(base, "hydra.sweep.dir")
    if sweep is None:
        sweep = f"multirun/ablate-{time.strftime('%Y-%m-%d_%H-%M-%S')}-{uuid.uuid4().hex[:6]}"
        base = [*base, f"hydra.sweep.dir={sweep}"]
    sweep_dir = Path(sweep)
    info = check_composes([b for b in base if not b.startswith("hydra.")], [], settings["define"])
    monitor = str(info["monitor"] or "val/acc")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    plan_path = sweep_dir / "ablation_plan.json"
    plan = {
        "base": [b for b in base if not b.startswith(("hydra.", "launcher=", "hparams_search="))],
        "rows": {r.name: list(r.tricks) for r in rows},
        "define": settings["define"],
        "seeds": seeds,
    }
    plan_path.write_text(json.dumps(plan, indent=1))
    todo = [job_dir_name(r.name, s) for r in rows for s in seeds if not finished(sweep_dir / job_dir_name(r.name, s))]
    skipped = len(rows) * len(seeds) - len(todo)
    print(
        f"lightning-tricks ablate: {len(rows)} rows x {len(seeds)} seed(s) in {sweep_dir}"
        + (f"; {skipped} job(s) already finished there, not run again" if skipped else ""),
        flush=True,
    )
    code = 0
    if todo:
        jobs = ",".join(f"'{j}'" for j in todo)
        saved_argv = sys.argv
        sys.argv = [
            saved_argv[0],
            "--multirun",
            *flags,
            *base,
            f"+ablate.plan={plan_path.resolve()}",
            f"+ablate.job={jobs}",
            "hydra.sweep.subdir=${ablate.job}",
            "~hydra.callbacks.sweep_summary",
        ]
        try:
            _ablation_job()
        except SystemExit as e:
            code = int(e.code or 0) if isinstance(e.code, int) else 1
        finally:
            sys.argv = saved_argv
    names = [r.name for r in rows]
    table, text = report(sweep_dir, names, seeds, monitor, test_metric_of(monitor))
    print(text, flush=True)
    print(f"lightning-tricks ablate: wrote {sweep_dir / 'ablation.md'}, ablation.csv, ablation.png", flush=True)
    statuses = [st for r in collect_results(sweep_dir, names, seeds, monitor, "").values() for st in r.status.values()]
    if any(st.startswith(("failed", "refused")) for st in statuses):
        code = code or 1
    return code


def _make_job() -> Any:
    import hydra
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    from lightning_tricks.train import config_dir

    @hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
    def job(cfg: DictConfig) -> float | None:
        """One (row, seed) of an ablation: the base run with the row's tricks, composed here, run as ``train``."""
        from lightning_tricks.train import run_job

        plan = json.loads(Path(cfg.ablate.plan).read_text())
        name, _, seed = str(cfg.ablate.job).rpartition("_s")
        row = Row(name, tuple(plan["rows"][name]), "")
        run_cfg = compose("train", overrides=[*plan["base"], *row_overrides(row, plan["define"]), f"seed={seed}"])
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        for leftover in ("metrics.json", "checkpoints"):  # a failed earlier try of this job: kept aside
            if (job_dir / leftover).exists():
                (job_dir / leftover).replace(job_dir / f"{leftover}.previous")
        saved = job_dir / ".hydra" / "config.yaml"
        if saved.is_file():  # what DDP ranks and resume checks read: the configuration this job really runs
            saved.replace(job_dir / ".hydra" / "ablation_job.yaml")
            OmegaConf.save(run_cfg, saved)
        return run_job(run_cfg)  # type: ignore[no-any-return]

    return job


def _ablation_job() -> None:
    _make_job()()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lightning_tricks.ablate [run overrides] ablate.tricks=[...] [ablate.seeds=N] [ablate.mode=both]``."""
    from lightning_tricks.launch import child_argv

    if child_argv(os.environ) is not None:  # a DDP rank started by one of the ablation's jobs: run that job
        from lightning_tricks.train import main as train_main

        train_main()
        return
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings, base, flags = split_arguments(args)
        rows = plan_rows(settings["tricks"], settings["mode"], settings["define"])
        for row in rows:
            row_overrides(row, settings["define"])
        check_composes(base, rows, settings["define"])
    except AblationError as e:
        print(f"lightning-tricks ablate: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(launch(base, flags, rows, settings))


if __name__ == "__main__":
    main()
