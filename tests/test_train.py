"""The Hydra entry point: compose API with overrides, the CLI, the summary, bad inputs."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose_train

from lightning_tricks.train import ConfigError, train


def test_debug_run_writes_metrics_plot_and_checkpoint(make_cfg, tmp_path):
    metrics, objects = train(make_cfg())
    assert {"best/val/acc", "val/acc", "test/acc", "test/loss", "time/fit_s"} <= set(metrics)
    assert objects["trainer"].global_step == 6  # 2 epochs x 3 batches
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert any(r.get("val/acc") for r in rows)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=resnet", "model.widths=[4,8]", "optimizer=adamw"],
        ["model.norm=ic", "optimizer=rmsprop"],
        ["optimizer=adagrad", "logger=tensorboard"],
        ["optimizer=adam", "logger=none", "~callbacks.model_checkpoint"],
        ["experiment=baseline", "module.label_smoothing=0.1"],
    ],
)
def test_overrides_run(make_cfg, overrides):
    metrics, objects = train(make_cfg(*overrides))
    assert 0.0 <= metrics["test/acc"] <= 1.0
    module = objects["module"]
    if "optimizer=adamw" in overrides:
        assert type(objects["trainer"].optimizers[0]).__name__ == "AdamW"
    if "module.label_smoothing=0.1" in overrides:
        assert module.label_smoothing == 0.1
        assert objects["trainer"].optimizers[0].param_groups[0]["nesterov"] is False


def test_default_run_reaches_95_percent(tmp_path):
    cfg = compose_train(["trainer.enable_progress_bar=false"], output_dir=tmp_path)
    metrics, _ = train(cfg)
    assert metrics["test/acc"] >= 0.95, metrics
    assert metrics["best/val/acc"] >= 0.95


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["optimizer.name=lbfgs"], "unknown optimizer name 'lbfgs'; choose one of"),
        (["optimizer.lr=-0.1"], "lr must be a positive number, got -0.1"),
        (["model.norm=group"], "model: norm must be one of"),
        (["data=fashion_mnist", "data.data_dir=/nonexistent/fm"], "/nonexistent/fm"),
        (["monitor=val/nope", "~callbacks.model_checkpoint"], "monitor='val/nope' was never logged"),
    ],
)
def test_bad_config_is_one_clear_error(make_cfg, overrides, match):
    with pytest.raises((ConfigError, FileNotFoundError), match=match):
        train(make_cfg(*overrides))


def _cli(*args, cwd):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "lightning_tricks.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_runs_and_returns(tmp_path):
    out = tmp_path / "run"
    r = _cli("trainer=debug", f"hydra.run.dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lightning-tricks run summary" in r.stdout + r.stderr
    assert (out / "curves.png").is_file() and (out / ".hydra" / "config.yaml").is_file()


def test_cli_bad_inputs_end_in_one_message(tmp_path):
    r = _cli("optimizer=nope", cwd=tmp_path)
    assert r.returncode == 1
    assert "Could not find 'optimizer/nope'" in r.stderr and "adamw" in r.stderr
    r = _cli("trainer=debug", "optimizer.lr=-1", f"hydra.run.dir={tmp_path / 'x'}", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "lightning-tricks: configuration error: optimizer lr must be a positive number, got -1"
    )
    assert "Traceback" not in r.stderr


def test_callbacks_are_added_and_removed_by_name():
    assert set(compose_train().callbacks) == {"random_state", "divergence_guard", "model_checkpoint", "curve_plot"}
    cfg = compose_train(["~callbacks.curve_plot", "~callbacks.divergence_guard", "+callbacks=ema"])
    assert set(cfg.callbacks) == {"random_state", "model_checkpoint", "ema"}
    assert Path(ROOT / "conf" / "callbacks" / "default.yaml").is_file()
