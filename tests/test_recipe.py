"""The recipe entry: initial loss, overfit, LR range test, coarse search, report (small budget on digits)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from lightning_tricks.recipe import _settings, run_recipe
from lightning_tricks.train import ConfigError, config_dir

SMALL = [
    "trainer=debug",
    "recipe.search.epochs=1",
    "recipe.lr_range.num_steps=40",
    "recipe.search.lr_factors=[0.5,2.0]",
    "recipe.initial_loss.num_samples=128",
]


def compose_recipe(overrides, tmp_path):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="recipe", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


def test_recipe_runs_end_to_end_on_digits(tmp_path):
    report = run_recipe(compose_recipe(SMALL, tmp_path))
    assert [s.name for s in report.steps] == ["initial loss", "overfit a tiny subset", "LR range test", "coarse search"]
    assert report.passed
    assert abs(report.step("initial loss").details["loss"] - math.log(10)) < 0.1 * math.log(10)
    assert report.step("overfit a tiny subset").details["final_loss"] <= 0.05
    lr_step = report.step("LR range test").details
    assert 1e-6 < lr_step["steepest"] < lr_step["min_loss_lr"] < 10 and (tmp_path / "lr_range_test.png").is_file()
    rows = report.step("coarse search").details["rows"]
    assert len(rows) == 2 and all(math.isfinite(r["val/acc"]) for r in rows)
    assert {r["lr"] for r in rows} == {float(f"{lr_step['steepest'] * f:.3g}") for f in (0.5, 2.0)}
    best = max(rows, key=lambda r: r["val/acc"])
    assert report.suggested == {"optimizer.lr": best["lr"], "optimizer.weight_decay": 5e-4}
    text = (tmp_path / "recipe_report.md").read_text()
    assert "## 4. coarse search: done" in text and f"optimizer.lr={best['lr']:.4g}" in text
    assert report.command().startswith("python -m lightning_tricks.train optimizer.lr=")


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
    ],
)
def test_recipe_settings_are_validated(override, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        _settings(compose_recipe([override], tmp_path))


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
    assert (tmp_path / "recipe_report.md").is_file()
    bad = subprocess.run(
        [*cmd[:3], "recipe.search.epochs=0", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "recipe.search.epochs must be >= 1" in bad.stderr
