"""How DDP ranks and sweeps meet: each job of a ``--multirun`` runs once, on all its ranks, in one directory.

Lightning's DDP launcher starts ranks 1..N-1 of a job by re-running the script with the parent's command
line. Under a Hydra ``--multirun`` that command line is a sweep, so each child rank would start a sweep of
its own (Lightning issue #11300): a second sweep directory, a second summary, jobs that never meet their
rank 0. Here the parent job tells its children which job they belong to (:data:`JOB_ENV`, inherited
through the environment Lightning copies to them), and a child rank's entry point ignores the command line
and runs that job's saved config in that job's directory (:func:`child_argv`).

Ranks that a cluster starts itself (``srun`` on SLURM: every task runs the same command) compose the same
config, but each would stamp its own time into ``hydra.run.dir``; :func:`slurm_dir_overrides` names the
run (and sweep) directory after the SLURM job and step instead, so all tasks write into one directory.

Example (a child rank of a job whose config Hydra saved in ``runs/0/.hydra``):
    >>> env = {JOB_ENV: "runs/0/.hydra/config.yaml", "LOCAL_RANK": "1"}
    >>> child_argv(env)  # doctest: +NORMALIZE_WHITESPACE
    ['--config-path=runs/0/.hydra', '--config-name=config', 'hydra.run.dir=runs/0', 'hydra.output_subdir=null',
     'hydra.job.name=ddp_rank_1']
    >>> child_argv({"LOCAL_RANK": "1"}) is None  # no parent job: an ordinary run
    True
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

JOB_ENV = "LT_DDP_JOB_CONFIG"
"""Set by a job that spawns DDP ranks: the path of the job's composed config (unresolved, as Hydra saved it)."""

# What Lightning's launcher and process-group set-up leave in the parent's environment for one job; a job
# puts them back as it found them, so the next job of a sweep picks a fresh port and forms a fresh group.
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", JOB_ENV)


def child_argv(env: Mapping[str, str]) -> list[str] | None:
    """Hydra arguments that make a DDP child rank run its parent's job, or ``None`` for any other process.

    A child rank is a process whose environment names a parent job (:data:`JOB_ENV`) and a local rank other
    than 0 (Lightning sets ``LOCAL_RANK`` for the ranks it starts). It composes the saved job config as its
    primary config, runs in the job's directory, and writes no second ``.hydra`` copy; its log file is
    ``ddp_rank_<r>.log`` beside rank 0's.
    """
    job = env.get(JOB_ENV)
    if not job or env.get("LOCAL_RANK", "0") == "0":
        return None
    config = Path(job)
    job_dir = config.parent.parent if config.parent.name == ".hydra" else config.parent
    return [
        f"--config-path={config.parent}",
        f"--config-name={config.stem}",
        f"hydra.run.dir={job_dir}",
        "hydra.output_subdir=null",
        f"hydra.job.name=ddp_rank_{env['LOCAL_RANK']}",
    ]


def slurm_dir_overrides(env: Mapping[str, str], argv: Sequence[str]) -> list[str]:
    """``hydra.run.dir`` / ``hydra.sweep.dir`` named after the SLURM job and step, for ``srun``-started ranks.

    Only when SLURM started several tasks of one step (``SLURM_NTASKS`` > 1, not an interactive shell) and
    the command line does not set the directory itself. Each ``srun`` is a new step, so two runs in one
    allocation still get two directories.

    Example:
        >>> env = {"SLURM_JOB_ID": "812", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train"}
        >>> slurm_dir_overrides(env, ["trainer=ddp"])
        ['hydra.run.dir=outputs/slurm-812.0', 'hydra.sweep.dir=multirun/slurm-812.0']
        >>> slurm_dir_overrides({**env, "SLURM_NTASKS": "1"}, [])  # one task: Hydra's usual directories
        []
    """
    job = env.get("SLURM_JOB_ID")
    if not job or int(env.get("SLURM_NTASKS", "1")) < 2 or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return []
    name = f"slurm-{job}.{env.get('SLURM_STEP_ID', '0')}"
    given = {arg.partition("=")[0].lstrip("+") for arg in argv}
    return [
        f"hydra.{kind}.dir={root}/{name}"
        for kind, root in (("run", "outputs"), ("sweep", "multirun"))
        if f"hydra.{kind}.dir" not in given
    ]


def global_rank(env: Mapping[str, str]) -> int:
    """This process's global rank from the launcher's environment (0 where none is set)."""
    for key in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return 0


def spawns_ranks(trainer: Any) -> bool:
    """Whether ``trainer.fit`` will start the other ranks by re-running this script (Lightning's DDP launcher)."""
    from lightning_tricks._lightning import SUBPROCESS_SCRIPT_LAUNCHER_TYPES

    launcher = getattr(trainer.strategy, "launcher", None)
    if not isinstance(launcher, SUBPROCESS_SCRIPT_LAUNCHER_TYPES):
        return False
    script_launcher: Any = launcher  # either namespace's class: read by duck typing
    return not script_launcher.cluster_environment.creates_processes_externally and script_launcher.num_processes > 1


@contextlib.contextmanager
def ddp_job(trainer: Any, job_config: Path | None) -> Iterator[None]:
    """The scope of one job on rank 0: children learn which job they run; the job ends with no group left.

    ``job_config`` is the job's saved config (``None`` outside Hydra: the children then re-run the command
    line, which is right for a plain script). On exit the process group is destroyed and the DDP variables
    of the environment are put back, so the next job of a sweep (same process) forms its own group.
    """
    saved = {key: os.environ.get(key) for key in _DDP_ENV}
    if job_config is not None and spawns_ranks(trainer):
        os.environ[JOB_ENV] = str(job_config)
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
