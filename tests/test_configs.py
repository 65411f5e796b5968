"""Every YAML under conf/ composes and instantiates; the wheel ships the configs."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, compose_train, extra_marks
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_tricks.train import build_callbacks, config_dir

CONF = Path(config_dir())


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _group_overrides():
    for group in ("data", "model", "optimizer", "schedule", "trainer", "logger", "experiment"):
        for option in _options(group):
            yield f"{group}={option}"
    for option in _options("callbacks"):
        yield f"+callbacks={option}" if option != "default" else "callbacks=[default]"
    for option in _options("launcher"):
        yield f"launcher={option}"
    for option in _options("hparams_search"):
        yield f"hparams_search={option}"


def _extra_of(override: str) -> str | None:
    """The optional extra whose Hydra plugin a config needs (read from its ``override /hydra/...`` lines)."""
    group, _, option = override.lstrip("+").partition("=")
    path = CONF / group / f"{option}.yaml"
    text = path.read_text() if path.is_file() else ""
    if "/hydra/sweeper: optuna" in text or "/hydra/sweeper/sampler" in text:
        return "sweep"
    if "/hydra/launcher: submitit" in text:
        return "cluster"
    if "lightning_tricks.models.TimmModel" in text:
        return "timm"
    return None


def _params():
    for override in _group_overrides():
        extra = _extra_of(override)
        yield pytest.param(override, marks=extra_marks(extra) if extra else ())


@pytest.mark.parametrize("override", list(_params()))
def test_every_option_composes_and_instantiates(override, tmp_path):
    cfg = compose_train([override], output_dir=tmp_path)  # a plugin-free config that fails to load fails here
    dm = instantiate(cfg.data)
    net = instantiate(cfg.model, input_shape=dm.input_shape, num_classes=dm.num_classes)
    assert sum(p.numel() for p in net.parameters()) > 0
    callbacks = build_callbacks(cfg)
    assert len(callbacks) == len([c for c in cfg.callbacks.values() if c is not None]) + bool(cfg.get("schedule"))
    for name in cfg.get("logger") or {}:
        instantiate(cfg.logger[name])


def test_every_callback_yaml_is_a_named_entry():
    for path in (CONF / "callbacks").glob("*.yaml"):
        text = path.read_text()
        assert text.lstrip().startswith("# @package callbacks") or "@package callbacks" in text, path
        if path.stem != "default":
            cfg = OmegaConf.load(path)
            assert list(cfg) == [path.stem], f"{path.name} must hold one entry named {path.stem!r}"


@pytest.mark.slow
def test_wheel_ships_configs(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("lightning_tricks-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "lightning_tricks/conf/train.yaml" in names
    shipped = {n.split("lightning_tricks/conf/")[1] for n in names if n.startswith("lightning_tricks/conf/")}
    local = {str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml")}
    assert local <= shipped, sorted(local - shipped)
    assert "lightning_tricks/train.py" in names
    assert "lightning_tricks/py.typed" in names  # users' type checkers see our annotations
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)[-8:]
