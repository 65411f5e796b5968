"""``python -m lightning_tricks.ablate``: the rows it plans, the overrides each gets, its refusals, and a real
ablation on the digits data that writes its report, reruns nothing finished and lists a failing row."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_tricks.ablate import AblationError, Row, plan_rows, row_overrides, table_rows
from lightning_tricks.ablate import RowResult as Result

TINY = ["trainer.max_epochs=1", "logger=none", "model.hidden=[32]", "~callbacks.curve_plot"]


def test_rows_are_baseline_full_and_full_minus_each_and_with_both_baseline_plus_each() -> None:
    assert [(r.name, r.tricks) for r in plan_rows(["ema", "mixup", "cosine"])] == [
        ("baseline", ()),
        ("full", ("ema", "mixup", "cosine")),
        ("full-ema", ("mixup", "cosine")),
        ("full-mixup", ("ema", "cosine")),
        ("full-cosine", ("ema", "mixup")),
    ]
    both = [r.name for r in plan_rows(["ema", "swa"], mode="both")]
    assert both[-2:] == ["baseline+ema", "baseline+swa"]


def test_cumulative_rows_add_the_tricks_in_order_and_reuse_full_minus_the_last() -> None:
    rows = plan_rows(["warmup", "cosine", "ema", "mixup"], mode="cumulative")
    assert [(r.name, r.tricks) for r in rows[:4]] == [
        ("baseline", ()),
        ("baseline+warmup", ("warmup",)),
        ("baseline+warmup+cosine", ("warmup", "cosine")),
        ("full", ("warmup", "cosine", "ema", "mixup")),
    ]
    # the step before full is full minus the last trick: planned once, under that name
    assert ("full-mixup", ("warmup", "cosine", "ema")) in [(r.name, r.tricks) for r in rows]
    assert len(rows) == 8 and len({r.tricks for r in rows}) == 8
    assert [r.name for r in plan_rows(["ema", "mixup"], mode="cumulative")] == [
        "baseline",
        "full",
        "full-ema",
        "full-mixup",
    ]


def test_overrides_merge_callbacks_and_join_warmup_with_cosine() -> None:
    full = Row("full", ("warmup", "cosine", "ema", "mixup", "no_bias_decay"), "full")
    assert row_overrides(full) == [
        "schedule=warmup_cosine",
        "optimizer.no_decay_bias_norm=true",
        "+callbacks=[ema,mixup]",
    ]
    assert row_overrides(Row("x", ("warmup",), "plus")) == ["schedule=warmup"]
    assert row_overrides(Row("x", ("cosine", "ic"), "minus")) == ["schedule=cosine", "model.norm=ic"]


def test_user_defined_tricks_and_clashes() -> None:
    define = {"wd": ["optimizer.weight_decay=0.0005"], "flat": {"overrides": ["schedule=constant"]}}
    assert row_overrides(Row("x", ("wd",), "plus"), define) == ["optimizer.weight_decay=0.0005"]
    with pytest.raises(AblationError, match=r"tricks 'cosine' and 'flat' both set schedule"):
        row_overrides(Row("x", ("cosine", "flat"), "full"), define)


@pytest.mark.parametrize(
    ("tricks", "mode", "message"),
    [
        (["ema", "emma"], "minus", r"unknown trick\(s\) \['emma'\].*valid names: .*cutmix, cutout, ema"),
        ([], "minus", "ablate.tricks is empty"),
        (["ema", "ema"], "minus", "names a trick twice"),
        (["ema"], "all", r"ablate.mode must be one of \('minus', 'both', 'cumulative'\)"),
    ],
)
def test_bad_requests_are_refused_in_one_line(tricks: list[str], mode: str, message: str) -> None:
    with pytest.raises(AblationError, match=message):
        plan_rows(tricks, mode)


def test_paired_deltas_are_per_seed_differences() -> None:
    full = Result("full", {0: "ok", 1: "ok"}, {0: 0.90, 1: 0.80}, {0: 0.5, 1: 0.6}, {0: 1.0, 1: 3.0})
    base = Result("baseline", {0: "ok", 1: "ok"}, {0: 0.85, 1: 0.70}, {0: 0.4, 1: 0.4}, {0: 1.0, 1: 1.0})
    minus = Result("full-ema", {0: "ok", 1: "failed: boom"}, {0: 0.88}, {0: 0.45}, {0: 2.0})
    rows = {r["row"]: r for r in table_rows({"baseline": base, "full": full, "full-ema": minus})}
    assert rows["full"]["monitor_mean"] == pytest.approx(0.85)
    assert rows["full"]["monitor_std"] == pytest.approx(math.sqrt(0.005))  # sample std of 0.9, 0.8
    assert rows["baseline"]["d_monitor_vs_full"] == pytest.approx(((0.85 - 0.90) + (0.70 - 0.80)) / 2)
    assert rows["baseline"]["d_monitor_vs_full_std"] == pytest.approx(math.sqrt(((-0.05 + 0.075) ** 2) * 2))
    assert rows["full-ema"]["d_monitor_vs_full"] == pytest.approx(0.88 - 0.90)  # only the seed both have
    assert rows["full-ema"]["d_test_vs_baseline"] == pytest.approx(0.05)
    assert rows["full-ema"]["status"] == "seed 1: failed: boom" and rows["full-ema"]["seeds_ok"] == 1
    assert math.isnan(rows["full"]["d_monitor_vs_full"])


def ablate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lightning_tricks.ablate", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_unknown_trick_exits_2_listing_the_valid_names(tmp_path: Path) -> None:
    done = ablate(tmp_path, "ablate.tricks=[ema,emma]")
    assert done.returncode == 2
    assert "unknown trick(s) ['emma']" in done.stderr and "label_smoothing" in done.stderr
    assert not (tmp_path / "multirun").exists()


def test_an_unreadable_definition_is_refused_with_how_to_quote(tmp_path: Path) -> None:
    done = ablate(tmp_path, "ablate.tricks=[odd]", "+ablate.define={odd: [schedule=cosine]}")
    assert done.returncode == 2 and "quote overrides inside lists" in done.stderr


def test_a_trick_that_does_not_compose_is_named_before_anything_runs(tmp_path: Path) -> None:
    done = ablate(tmp_path, "ablate.tricks=[ema,odd]", '+ablate.define={odd: ["schedule=no_such_schedule"]}')
    assert done.returncode == 2
    assert "row full (tricks ['ema', 'odd']) does not compose" in done.stderr
    assert not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_an_ablation_on_digits_reports_reruns_nothing_finished_and_lists_a_failing_row(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [*TINY, "ablate.tricks=[label_smoothing,bad]", f"hydra.sweep.dir={sweep}"]
    # `bad` composes but is refused when the run starts: its rows are listed with their status
    done = ablate(tmp_path, *args, '+ablate.define={bad: ["trainer.max_epochs=-5"]}')
    assert done.returncode == 1, done.stderr[-2000:]
    with open(sweep / "ablation.csv") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["baseline", "full", "full-label_smoothing", "full-bad"]
    assert rows["baseline"]["status"] == "ok" and rows["full-bad"]["status"] == "ok"
    assert rows["full"]["status"].startswith("seed 0: refused")
    assert rows["full-label_smoothing"]["status"].startswith("seed 0: refused")
    baseline = json.loads((sweep / "baseline_s0" / "metrics.json").read_text())["metrics"]
    assert float(rows["baseline"]["monitor_mean"]) == pytest.approx(baseline["best/val/acc"])
    assert float(rows["baseline"]["monitor_mean"]) > 0.5  # it trained
    ls = json.loads((sweep / "full-bad_s0" / "metrics.json").read_text())["metrics"]
    assert float(rows["full-bad"]["d_test_vs_baseline"]) == pytest.approx(ls["test/acc"] - baseline["test/acc"])
    assert (sweep / "ablation.png").stat().st_size > 10_000
    assert "| full-bad |" in (sweep / "ablation.md").read_text()
    stamp = (sweep / "baseline_s0" / "metrics.json").stat().st_mtime_ns

    again = ablate(tmp_path, *args, '+ablate.define={bad: ["trainer.max_epochs=-5"]}')
    assert "2 job(s) already finished there, not run again" in again.stdout
    assert (sweep / "baseline_s0" / "metrics.json").stat().st_mtime_ns == stamp
