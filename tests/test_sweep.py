"""Hydra multirun sweeps (grid, Optuna random search), their summary table, and the SLURM config."""

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import needs_extra

from lightning_tricks.sweep import collect, exit_code, summarize


def _run(*args, cwd, timeout=600):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lightning_tricks.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_summarize_sorts_by_monitor(tmp_path):
    for i, (lr, acc) in enumerate([(0.1, 0.8), (0.2, 0.9), (0.3, 0.7)]):
        d = tmp_path / str(i)
        d.mkdir()
        (d / "metrics.json").write_text(
            json.dumps({"overrides": [f"optimizer.lr={lr}"], "metrics": {"best/val/acc": acc, "test/acc": acc - 0.1}})
        )
    path, table = summarize(tmp_path, "val/acc", "max")
    rows = list(csv.DictReader(open(path)))
    assert [r["optimizer.lr"] for r in rows] == ["0.2", "0.1", "0.3"]
    assert table.splitlines()[0].split() == ["job", "optimizer.lr", "status", "best/val/acc", "test/acc"]
    assert [r["job"] for r in collect(tmp_path)] == ["0", "1", "2"]


def test_summary_lists_every_job_with_its_status(tmp_path):
    jobs = [
        ("ok", 0.7),
        ("diverged", float("-inf")),
        ("failed: RuntimeError: boom", float("-inf")),
        ("ok", 0.9),
    ]
    for i, (status, acc) in enumerate(jobs):
        d = tmp_path / str(i)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- optimizer.lr={i}\n")
        (d / "metrics.json").write_text(
            json.dumps({"overrides": [f"optimizer.lr={i}"], "metrics": {"status": status, "best/val/acc": acc}})
        )
    killed = tmp_path / "4" / ".hydra"  # a job killed before it reported: Hydra's files only
    killed.mkdir(parents=True)
    (killed / "overrides.yaml").write_text("- optimizer.lr=4\n")
    path, _ = summarize(tmp_path, "val/acc", "max")
    rows = list(csv.DictReader(open(path)))
    assert [(r["optimizer.lr"], r["status"]) for r in rows] == [
        ("3", "ok"),
        ("0", "ok"),
        ("1", "diverged"),
        ("2", "failed: RuntimeError: boom"),
        ("4", "failed: no metrics.json (the job ended before it could report)"),
    ]
    assert exit_code(collect(tmp_path)) == 1


@pytest.mark.parametrize(
    ("statuses", "code"),
    [
        (["ok", "diverged"], 0),
        (["ok", "refused: data.batch_size=0"], 1),
        (["preempted", "ok"], 143),
        (["preempted", "failed: x"], 1),
    ],
)
def test_sweep_exit_code(statuses, code):
    assert exit_code([{"status": s} for s in statuses]) == code


@pytest.mark.slow
def test_grid_multirun_2x2(tmp_path):
    sweep = tmp_path / "sweep"
    r = _run(
        "--multirun",
        "trainer=debug",
        "logger=none",
        "optimizer.lr=0.01,0.1",
        "model.norm=classic,ic",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = sorted(sweep.glob("*/metrics.json"))
    assert len(results) == 4
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 4
    assert {(r["optimizer.lr"], r["model.norm"]) for r in rows} == {
        ("0.01", "classic"),
        ("0.01", "ic"),
        ("0.1", "classic"),
        ("0.1", "ic"),
    }
    scores = [float(r["best/val/acc"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)


@pytest.mark.slow
@needs_extra("sweep")
def test_random_search_three_trials(tmp_path):
    sweep = tmp_path / "sweep"
    r = _run(
        "--multirun",
        "hparams_search=random",
        "hydra.sweeper.n_trials=3",
        "trainer=debug",
        "logger=none",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 3
    lrs = {float(r["optimizer.lr"]) for r in rows}
    assert len(lrs) == 3 and all(0.005 <= lr <= 0.5 for lr in lrs)
    best = yaml.safe_load(open(sweep / "optimization_results.yaml"))["best_value"]
    assert best == pytest.approx(max(float(r["best/val/acc"]) for r in rows))


@needs_extra("cluster")
def test_slurm_launcher_composes(tmp_path):
    r = _run(
        "launcher=slurm",
        "trainer=ddp",
        "launcher.nodes=2",
        "launcher.gpus_per_node=4",
        "launcher.partition=gpu",
        "launcher.time_min=240",
        "launcher.cpus_per_task=6",
        "--cfg",
        "all",
        "--resolve",
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = yaml.safe_load(r.stdout)
    launcher = cfg["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert launcher["partition"] == "gpu"
    assert (launcher["timeout_min"], launcher["cpus_per_task"]) == (240, 6)
    # one SLURM task per device: Lightning's world size (num_nodes x devices) is the allocation's task count
    assert launcher["tasks_per_node"] == cfg["trainer"]["devices"] and launcher["nodes"] == cfg["trainer"]["num_nodes"]
    assert (cfg["trainer"]["num_nodes"], cfg["trainer"]["devices"], cfg["trainer"]["strategy"]) == (2, 4, "ddp")
    assert cfg["trainer"]["sync_batchnorm"] == "auto"  # on with GPUs (test_ddp_sweep checks the resolution)
