"""Sweeps of DDP jobs (Lightning #11300) and ranks started by SLURM, on the CPU with gloo.

A ``--multirun`` whose jobs use ``trainer=ddp`` must run each job once, on all its ranks, in one sweep
directory with one summary; two processes started with a 2-task SLURM allocation's environment must form
one 2-rank run with one result.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_extra, run_ranks

from lightning_tricks.launch import JOB_ENV, child_argv, global_rank, slurm_dir_overrides
from lightning_tricks.train import _resolve_auto

TINY = ["trainer.max_epochs=1", "logger=none", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2"]
CPU_DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def _train(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI and every rank it starts, bounded: a hang fails in about a minute naming the rank (conftest)."""
    (result,) = run_ranks(
        [[sys.executable, "-m", "lightning_tricks.train", *args]],
        cwd=cwd,
        env={**os.environ, "HYDRA_FULL_ERROR": "1", **(env or {})},
    )
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_child_rank_runs_its_parents_job():
    env = {JOB_ENV: "/runs/7/.hydra/config.yaml", "LOCAL_RANK": "3"}
    assert child_argv(env) == [
        "--config-path=/runs/7/.hydra",
        "--config-name=config",
        "hydra.run.dir=/runs/7",
        "hydra.output_subdir=null",
        "hydra.job.name=ddp_rank_3",
    ]
    # a config saved beside the job (hydra.output_subdir=null): the job directory is its folder
    assert child_argv({JOB_ENV: "/runs/7/ddp_job.yaml", "LOCAL_RANK": "1"})[:3] == [
        "--config-path=/runs/7",
        "--config-name=ddp_job",
        "hydra.run.dir=/runs/7",
    ]
    assert child_argv({JOB_ENV: "/runs/7/.hydra/config.yaml", "LOCAL_RANK": "0"}) is None  # rank 0 is the parent
    assert child_argv({"LOCAL_RANK": "1"}) is None  # a rank of a plain script: Lightning's own command line


def test_slurm_ranks_share_one_directory():
    env = {"SLURM_JOB_ID": "99", "SLURM_STEP_ID": "2", "SLURM_NTASKS": "4", "SLURM_JOB_NAME": "train"}
    assert slurm_dir_overrides(env, []) == ["hydra.run.dir=outputs/slurm-99.2", "hydra.sweep.dir=multirun/slurm-99.2"]
    assert slurm_dir_overrides(env, ["hydra.run.dir=/mine"]) == ["hydra.sweep.dir=multirun/slurm-99.2"]
    assert slurm_dir_overrides({**env, "SLURM_JOB_NAME": "interactive"}, []) == []  # salloc shell: not srun'd ranks
    assert slurm_dir_overrides({**env, "SLURM_NTASKS": "1"}, []) == []
    assert slurm_dir_overrides({}, []) == []
    assert global_rank({"SLURM_PROCID": "3"}) == 3 and global_rank({"RANK": "1", "SLURM_PROCID": "3"}) == 1
    assert global_rank({}) == 0


@pytest.mark.parametrize(
    ("accelerator", "expected"), [("cpu", False), ("gpu", True), ("auto", __import__("torch").cuda.is_available())]
)
def test_sync_batchnorm_auto_only_where_it_works(accelerator, expected):
    kwargs = {"sync_batchnorm": "auto", "accelerator": accelerator}
    _resolve_auto(kwargs)
    assert kwargs["sync_batchnorm"] is expected
    kept = {"sync_batchnorm": True, "accelerator": "gpu"}
    _resolve_auto(kept)
    assert kept["sync_batchnorm"] is True


def _assert_one_sweep_of_ddp_jobs(tmp_path: Path, r: subprocess.CompletedProcess, jobs: int) -> list[dict]:
    assert r.returncode == 0, r.stderr[-4000:]
    out = r.stdout + r.stderr
    sweeps = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    assert len(sweeps) == 1, sweeps  # child ranks started no sweep of their own
    assert len(list(tmp_path.rglob("summary.csv"))) == 1
    results = sorted(sweeps[0].glob("*/metrics.json"))
    assert len(results) == jobs
    records = [json.loads(p.read_text()) for p in results]
    assert [rec["metrics"]["world_size"] for rec in records] == [2] * jobs
    for path in results:  # rank 1 ran in its job's directory
        assert (path.parent / "ddp_rank_1.log").is_file(), sorted(p.name for p in path.parent.iterdir())
    assert out.count("GLOBAL_RANK: 1, MEMBER: 2/2") == jobs  # every job formed its own 2-rank group
    assert not (tmp_path / "outputs").exists()  # no rank fell back to a single run of its own
    rows = list(csv.DictReader(open(sweeps[0] / "summary.csv")))
    assert len(rows) == jobs
    return rows


@pytest.mark.ddp
@pytest.mark.slow
def test_multirun_of_ddp_jobs_runs_each_job_once_on_two_ranks(tmp_path):
    r = _train("--multirun", "optimizer.lr=0.01,0.05", *CPU_DDP, *TINY, cwd=tmp_path)
    rows = _assert_one_sweep_of_ddp_jobs(tmp_path, r, jobs=2)
    assert sorted(row["optimizer.lr"] for row in rows) == ["0.01", "0.05"]
    assert r.stderr.count("Launching 2 jobs locally") + r.stdout.count("Launching 2 jobs locally") == 1


@needs_extra("sweep")
def test_optuna_sweep_of_ddp_jobs(tmp_path):
    r = _train("--multirun", "hparams_search=random", "hydra.sweeper.n_trials=2", *CPU_DDP, *TINY, cwd=tmp_path)
    _assert_one_sweep_of_ddp_jobs(tmp_path, r, jobs=2)


@pytest.mark.ddp
@pytest.mark.slow
def test_two_slurm_tasks_form_one_run(tmp_path):
    """What ``srun --ntasks-per-node=2 python -m lightning_tricks.train trainer=ddp ...`` starts, without SLURM."""
    port = str(_free_port())
    envs = []
    for rank in (0, 1):
        envs.append(
            {
                **os.environ,
                "SLURM_JOB_ID": "4242",
                "SLURM_STEP_ID": "0",
                "SLURM_JOB_NAME": "lt-test",
                "SLURM_NTASKS": "2",
                "SLURM_NTASKS_PER_NODE": "2",
                "SLURM_NNODES": "1",
                "SLURM_NODELIST": "localhost",
                "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(rank),
                "SLURM_NODEID": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            }
        )
    command = [sys.executable, "-m", "lightning_tricks.train", *CPU_DDP, *TINY]
    results = run_ranks([command, command], cwd=tmp_path, env=envs, labels=["rank 0 (task 0)", "rank 1 (task 1)"])
    outs = [r.stdout + r.stderr for r in results]
    assert [r.returncode for r in results] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outs[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in outs[1]
    runs = [p for p in (tmp_path / "outputs").iterdir()]
    assert [p.name for p in runs] == ["slurm-4242.0"]  # both tasks wrote into one run directory
    results = list(tmp_path.rglob("metrics.json"))
    assert len(results) == 1  # one result, written by rank 0
    record = json.loads(results[0].read_text())
    assert record["metrics"]["world_size"] == 2 and record["metrics"]["status"] == "ok"
    assert "lightning-tricks run summary" in outs[0] and "lightning-tricks run summary" not in outs[1]
