"""Every command in the README and the method cards runs (tiny epochs, local data), so none breaks unnoticed.

Commands are read from the documents themselves: the ``python -m lightning_tricks.train`` /
``lightning-tricks-train`` lines of the README's shell blocks, and the overrides in the method cards'
``**Config:**`` lines. Each runs with a few batches; what needs hardware or files this machine lacks
(GPUs, a SLURM cluster, dataset folders) is composed and its objects instantiated instead of run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHARED_DATA, compose_train, installed
from hydra.utils import instantiate

from lightning_tricks.train import build_callbacks, train

TINY = [
    "trainer.max_epochs=4",
    "++trainer.limit_train_batches=3",
    "++trainer.limit_val_batches=2",
    "++trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("pip install"):
                line = line.split("&&")[-1].strip()  # the set-up line ends with the main job
            if line.startswith(("python -m lightning_tricks.train", "lightning-tricks-train")):
                commands.append(line)
    return commands


GROUPS = {p.name for p in (ROOT / "conf").iterdir() if p.is_dir()}


def card_commands() -> list[str]:
    """One command per override group of each method card's ``**Config:**`` line."""
    commands = []
    for line in (ROOT / "docs" / "method_cards.md").read_text().splitlines():
        if "**Config:**" not in line:
            continue
        current: list[str] = []
        for segment in re.findall(r"`([^`]+)`", line):
            for token in segment.split():
                if "=" not in token or token.startswith("python"):
                    continue
                key = token.split("=")[0].lstrip("+~")
                if key in GROUPS and any(t.split("=")[0].lstrip("+~") == key for t in current):
                    commands.append(" ".join(current))  # `schedule=a`, `schedule=b`: alternatives
                    current = []
                current.append(token)
        if current:
            commands.append(" ".join(current))
    return [f"python -m lightning_tricks.train {c}" for c in commands]


def _args(command: str) -> tuple[list[str], bool]:
    argv = shlex.split(command, comments=True)
    return argv[3:] if argv[0] == "python" else argv[1:], argv[0] == "lightning-tricks-train"


def _local(args: list[str]) -> tuple[list[str], str | None]:
    """The overrides with local data folders; a reason to only compose when this machine cannot run them."""
    out, reason = [], None
    for a in args:
        m = re.match(r"data\.data_dir=/data/(\w+)", a)
        if m:
            folder = SHARED_DATA / m.group(1)
            if not folder.is_dir():
                reason = f"no local {m.group(1)} data"
            a = f"data.data_dir={folder}"
        out.append(a)
    if "trainer=gpu" in out or "trainer.devices=4" in out or any(a.startswith("launcher=") for a in out):
        if not torch.cuda.is_available() or any(a.startswith("launcher=") for a in out):
            reason = reason or "needs GPUs or a cluster"
    return out, reason


def _compose_and_instantiate(args: list[str], tmp_path: Path) -> None:
    cfg = compose_train([a for a in args if not a.startswith(("--", "hydra."))], output_dir=tmp_path)
    dm = instantiate(cfg.data)
    instantiate(cfg.model, input_shape=dm.input_shape, num_classes=dm.num_classes)
    build_callbacks(cfg)


def _cli(args: list[str], cwd: Path, script: bool = False) -> subprocess.CompletedProcess:
    exe = (
        [str(Path(sys.executable).with_name("lightning-tricks-train"))]
        if script
        else [sys.executable, "-m", "lightning_tricks.train"]
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([*exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _needs_subprocess(args: list[str]) -> bool:
    return any(
        a == "--multirun"
        or a.startswith("--cfg")
        or a.startswith("ckpt_path=")
        or a == "trainer=ddp"
        or a.startswith("hydra.")
        for a in args
    )


COMMANDS = [("README", c) for c in readme_commands()] + [("method card", c) for c in card_commands()]


def test_the_documents_have_commands():
    assert len(readme_commands()) >= 15 and len(card_commands()) >= 12


@pytest.mark.slow
@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}: {c}" for w, c in COMMANDS])
def test_documented_command_runs(where, command, tmp_path):
    args, script = _args(command)
    args, reason = _local(args)
    if any(a.startswith("hparams_search=") and a != "hparams_search=grid" for a in args) and not installed(
        "hydra_plugins.hydra_optuna_sweeper"
    ):
        pytest.skip("needs the 'sweep' extra")
    if any(a.startswith("launcher=") for a in args) and not installed("hydra_plugins.hydra_submitit_launcher"):
        pytest.skip("needs the 'cluster' extra")
    if any(a == "model=timm" for a in args) and not installed("timm"):
        pytest.skip("needs the 'timm' extra")
    if reason is not None:
        _compose_and_instantiate(args, tmp_path)
        return
    if not _needs_subprocess(args) and not script:
        metrics, _ = train(compose_train([*args, *TINY], output_dir=tmp_path))
        assert metrics["status"] == "ok" and 0.0 <= metrics["test/acc"] <= 1.0, command
        return
    if any(a.startswith("ckpt_path=") for a in args):  # a finished one-epoch run stands for <date>/<time>
        first = _cli(["logger=none", *TINY, "trainer.max_epochs=1", "test=false"], tmp_path)
        assert first.returncode == 0, first.stderr[-3000:]
        (run,) = tmp_path.glob("outputs/*/*")
        stamp = str(run.relative_to(tmp_path / "outputs"))
        args = [a.replace("<date>/<time>-<id>", stamp) for a in args]
        args = [*args, *TINY[1:], "trainer.max_epochs=2"]
    elif "--multirun" in args:
        args = [
            a.replace("hydra.sweeper.n_trials=20", "hydra.sweeper.n_trials=2").replace(
                "hydra.sweeper.n_trials=30", "hydra.sweeper.n_trials=2"
            )
            for a in args
        ]
        args = [*args, *TINY, "trainer.max_epochs=1", "logger=none"]
    elif not any(a.startswith("--cfg") for a in args):
        args = [*args, *TINY]
    r = _cli(args, tmp_path, script=script)
    assert r.returncode == 0, f"{command}\n{r.stderr[-3000:]}"
