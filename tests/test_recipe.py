"""The recipe entry: checks, LR range test, coarse and fine search, long run, diagnosis, report (tiny, on digits)."""

from __future__ import annotations

import logging
import math
import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from lightning_tricks import recipe
from lightning_tricks.recipe import VERDICTS, _settings, diagnose, fine_region, run_recipe, sample_fine
from lightning_tricks.train import ConfigError, config_dir

SMALL = [
    "trainer=debug",
    "recipe.search.epochs=1",
    "recipe.lr_range.num_steps=40",
    "recipe.search.lr_factors=[0.5,2.0]",
    "recipe.initial_loss.num_samples=128",
    "recipe.fine.trials=2",
    "recipe.fine.epochs=2",
    "recipe.long_run.epochs=4",
]
STEPS = [
    "initial loss",
    "overfit a tiny subset",
    "LR range test",
    "coarse search",
    "fine search",
    "long run",
    "diagnosis",
]


def compose_recipe(overrides, tmp_path):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="recipe", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


def test_recipe_runs_end_to_end_on_digits(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    report = run_recipe(compose_recipe(SMALL, tmp_path))
    assert [s.name for s in report.steps] == STEPS
    assert report.passed
    assert abs(report.step("initial loss").details["loss"] - math.log(10)) < 0.1 * math.log(10)
    assert report.step("overfit a tiny subset").details["final_loss"] <= 0.05
    lr_step = report.step("LR range test").details
    assert 1e-6 < lr_step["steepest"] < lr_step["min_loss_lr"] < 10 and (tmp_path / "lr_range_test.png").is_file()
    rows = report.step("coarse search").details["rows"]
    assert len(rows) == 2 and all(math.isfinite(r["val/acc"]) for r in rows)
    assert {r["lr"] for r in rows} == {float(f"{lr_step['steepest'] * f:.3g}") for f in (0.5, 2.0)}
    best = max(rows, key=lambda r: r["val/acc"])
    assert report.step("coarse search").details["best"] is best and best["weight_decay"] == 5e-4
    text = (tmp_path / "recipe_report.md").read_text()
    assert "## 4. coarse search: done" in text and f"| {best['lr']:.4g} | 0.0005 |" in text
    # 5. fine search: seeded log-uniform draws in the region of the top 3 coarse runs widened x2, 2 epochs each
    fine = report.step("fine search").details
    region = fine_region(rows, "val/acc", "max", top_k=3, factor=2.0)
    assert fine["region"] == region and fine["seed"] == 0
    assert [(r["lr"], r["weight_decay"]) for r in fine["rows"]] == sample_fine(region, 2, seed=0)
    assert all(math.isfinite(r["val/acc"]) for r in fine["rows"])
    assert len(list((tmp_path / "fine").iterdir())) == 2
    fine_best = max(fine["rows"], key=lambda r: r["val/acc"])
    assert fine["best"] is fine_best
    assert report.suggested == {
        "optimizer.lr": fine_best["lr"],
        "optimizer.weight_decay": fine_best["weight_decay"],
        "trainer.max_epochs": 4,
    }
    # 6. long run at the best fine setting: four epochs of curves and their plot
    long = report.step("long run").details
    curves = long["curves"]
    assert {k: [e for e, _ in curves[k]] for k in STAGE_CURVES} == {k: [1, 2, 3, 4] for k in STAGE_CURVES}
    assert curves["val/acc"][-1][1] == pytest.approx(long["metrics"]["val/acc"])
    assert (tmp_path / "long_run_curves.png").is_file() and long["image"] == "long_run_curves.png"
    # 7. diagnosis: the pure rule applied to those curves
    d = report.step("diagnosis").details["diagnosis"]
    assert d == diagnose(curves) and d.verdict in VERDICTS and d.epochs == 4
    end = {k: (curves[k][-2][1] + curves[k][-1][1]) / 2 for k in STAGE_CURVES}  # window min(3, 4 // 2) = 2
    assert d.numbers["window"] == 2 and d.numbers["acc_gap"] == pytest.approx(end["train/acc"] - end["val/acc"])
    assert d.numbers["val_loss"] == pytest.approx(end["val/loss"])
    assert f"optimizer.lr={fine_best['lr']:.4g}" in text and "trainer.max_epochs=4" in text
    assert "## 5. fine search: done" in text and f"| 1 | {fine['rows'][0]['lr']:.4g} |" in text
    assert "## 6. long run: done" in text and "![long run](long_run_curves.png)" in text
    assert f"| 4 | {curves['train/loss'][-1][1]:.4g} | {curves['val/loss'][-1][1]:.4g} |" in text
    assert f"## 7. diagnosis: {d.verdict}" in text and f"**{d.verdict}**: {d.reason}." in text
    assert f"| acc gap (train - val) | {100 * d.numbers['acc_gap']:.1f} pp | overfitting if > 5 pp |" in text
    assert f"Advice: {d.advice}." in text
    assert report.command().startswith("python -m lightning_tricks.train optimizer.lr=")
    # progress: a line per trial and per long-run epoch
    log = caplog.text
    assert "recipe: coarse search 2/2: lr" in log and "recipe: fine search 2/2: lr" in log
    assert all(f"epoch {e}/4  step" in log for e in range(1, 5))


STAGE_CURVES = ("train/loss", "val/loss", "train/acc", "val/acc")


def test_recipe_skips_the_later_stages_when_every_coarse_run_diverges(tmp_path, monkeypatch):
    calls = []

    def diverged(cfg):  # what train() returns for a run that DivergenceGuard stopped
        calls.append(cfg.paths.output_dir)
        return {"status": "diverged", "best/val/acc": -math.inf, "time/fit_s": 0.0}, {}

    monkeypatch.setattr(recipe, "train", diverged)
    report = run_recipe(compose_recipe(SMALL, tmp_path))
    assert len(calls) == 2  # the two coarse runs, nothing after them
    assert [s.name for s in report.steps] == STEPS
    assert not math.isfinite(report.step("coarse search").details["rows"][0]["val/acc"])
    text = report.render()
    for i, name in enumerate(STEPS[4:], 5):
        assert f"## {i}. {name}: skipped" in text
    assert "Skipped: the coarse search has no run with a finite val/acc." in text
    assert report.suggested == {} and not (tmp_path / "fine").exists()


def test_recipe_stops_on_failed_check(tmp_path):
    cfg = compose_recipe(
        [*SMALL, "recipe.overfit.steps=1", "recipe.overfit.target_loss=1e-6", "recipe.stop_on_failure=true"], tmp_path
    )
    report = run_recipe(cfg)
    assert not report.passed and len(report.steps) == 2 and report.suggested == {}
    assert report.step("overfit a tiny subset").passed is False
    assert "Fix first: overfit a tiny subset failed" in report.render()


@pytest.mark.parametrize(
    "override, match",
    [
        ("recipe.lr_range.min_lr=20.0", "0 < min_lr < max_lr"),
        ("recipe.search.epochs=0", "recipe.search.epochs must be >= 1, got 0"),
        ("recipe.search.lr_factors=[-1.0]", "lr_factors must be positive"),
        ("+recipe.overfit.stepz=3", "stepz"),
        ("recipe.fine.trials=0", "recipe.fine.trials must be an int >= 1, got 0"),
        ("recipe.fine.trials=-2", "recipe.fine.trials must be an int >= 1, got -2"),
        ("recipe.fine.epochs=0", "recipe.fine.epochs must be an int >= 1, got 0"),
        ("recipe.fine.top_k=0", "recipe.fine.top_k must be an int >= 1, got 0"),
        ("recipe.fine.factor=1.0", "recipe.fine.factor must be a number in (1, inf), got 1.0"),
        ("recipe.fine.factor=0.5", "recipe.fine.factor must be a number in (1, inf), got 0.5"),
        ("recipe.fine.seed=-1", "recipe.fine.seed must be an int >= 0, got -1"),
        ("recipe.long_run.epochs=0", "recipe.long_run.epochs must be an int >= 1, got 0"),
        ("recipe.diagnose.max_acc_gap=2", "recipe.diagnose.max_acc_gap must be a number in [0, 1], got 2"),
        ("recipe.diagnose.min_epochs=1", "recipe.diagnose.min_epochs must be an int >= 2, got 1"),
        ("+recipe.diagnose.gap=0.1", "gap"),
        ("monitor_mode=maximum", "monitor_mode must be one of ('max', 'min'), got 'maximum'"),
    ],
)
def test_recipe_settings_are_validated(override, match, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(match)) as info:
        _settings(compose_recipe([override], tmp_path))
    assert "\n" not in str(info.value)  # one line


@pytest.mark.slow
def test_recipe_command_line(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "lightning_tricks.recipe",
        *SMALL,
        "recipe.search.lr_factors=[1.0]",
        f"hydra.run.dir={tmp_path}",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "## Suggested config" in r.stdout and "python -m lightning_tricks.train optimizer.lr=" in r.stdout
    assert "## 5. fine search: done" in r.stdout and "## 6. long run: done" in r.stdout
    assert "## 7. diagnosis: " in r.stdout and "Advice: " in r.stdout
    assert (tmp_path / "recipe_report.md").is_file() and (tmp_path / "long_run_curves.png").is_file()
    bad = subprocess.run(
        [*cmd[:3], "recipe.search.epochs=0", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "recipe.search.epochs must be >= 1" in bad.stderr
    bad = subprocess.run(
        [*cmd[:3], "recipe.fine.factor=1", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "lightning-tricks recipe: configuration error: recipe.fine.factor must be a number in (1, inf), got 1"
    )
