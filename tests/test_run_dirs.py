"""Run directories: unique per run, never shared, never overwritten except by an explicit resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from lightning_tricks.train import ConfigError, train


def test_two_runs_started_at_the_same_instant_get_two_directories(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lightning_tricks.train",
                "trainer=debug",
                "logger=none",
                f"optimizer.lr={lr}",
                "test=false",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for lr in (0.01, 0.02)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    runs = sorted(tmp_path.glob("outputs/*/*"))
    assert len(runs) == 2, runs
    seen = set()
    for run in runs:
        lr = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["optimizer"]["lr"]
        record = json.loads((run / "metrics.json").read_text())
        assert f"optimizer.lr={lr}" in record["overrides"]  # each holds its own config and its own results
        assert record["metrics"]["status"] == "ok"
        seen.add(lr)
    assert seen == {0.01, 0.02}


def test_a_new_run_into_a_used_directory_is_refused_and_resume_continues(make_cfg, tmp_path):
    train(make_cfg("logger=none"))
    before = (tmp_path / "metrics.json").read_text()
    with pytest.raises(ConfigError, match=rf"run directory {tmp_path} already holds a run .*ckpt_path="):
        train(make_cfg("logger=none"))
    assert (tmp_path / "metrics.json").read_text() == before  # nothing was overwritten
    last = tmp_path / "checkpoints" / "last.ckpt"
    metrics, _ = train(make_cfg("logger=none", f"ckpt_path={last}", "trainer.max_epochs=3"))
    assert metrics["status"] == "ok"
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["status"] == "ok"
