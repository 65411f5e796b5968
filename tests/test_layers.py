"""The layers of the design: pure cores import no Lightning and no callback; one name per trick.

DESIGN.md: "pure cores import no Lightning and no callback; callbacks import cores; ``train.py`` and the
recipe import both", and "``lightning_tricks/<trick>.py`` <-> ``callbacks/<trick>.py`` <->
``conf/callbacks/<trick>.yaml`` <-> the class name". ``TRICKS`` below is that map; the README's trick
table is its human-readable copy.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

import lightning_tricks.callbacks as cbs

PACKAGE = ROOT / "lightning_tricks"

# Modules that hold formulas and layers: importable without Lightning (torch, numpy, torchmetrics only).
CORES = [
    "schedules",
    "lr_plan",
    "averaging",
    "stopping",
    "ensemble",
    "lr_range_test",
    "augment",
    "regularize",
    "sanity",
    "finetune",
    "optim",
    "losses",
    "plots",
    "random_state",
    "nn",
    "models",
    "policies",
    "layer_stats",
    "clipping",
    "init",
    "whitening",
]
# What a core must never import (directly, or lazily inside a function).
FORBIDDEN = (
    "pytorch_lightning",
    "lightning",
    "lightning_tricks._lightning",
    "lightning_tricks.callbacks",
    "lightning_tricks.mixins",
    "lightning_tricks.train",
    "lightning_tricks.recipe",
    "lightning_tricks.data",
    "lightning_tricks.sweep",
    "lightning_tricks.loggers",
)

# class -> (core module, callback module, config(s) in conf/callbacks/ or conf/schedule/)
TRICKS: dict[str, tuple[str | None, str, tuple[str, ...]]] = {
    "LRSchedule": ("schedules", "lr_schedule", ("schedule/*",)),
    "LinearScaling": ("schedules", "lr_scaling", ("callbacks/linear_scaling",)),
    "LRRangeTest": ("lr_range_test", "lr_range_test", ("callbacks/lr_range_test",)),
    "EarlyStopping": (
        "stopping",
        "early_stopping",
        (
            "callbacks/early_stopping",
            "callbacks/early_stopping_gl",
            "callbacks/early_stopping_pq",
            "callbacks/early_stopping_up",
        ),
    ),
    "RestoreBest": ("stopping", "restore_best", ()),  # in configs through EarlyStopping(restore_best=true)
    "EMA": ("averaging", "ema", ("callbacks/ema",)),
    "SWA": ("averaging", "swa", ("callbacks/swa",)),
    "SnapshotEnsemble": ("ensemble", "snapshot_ensemble", ("callbacks/snapshot_ensemble",)),
    "Mixup": ("augment", "augment", ("callbacks/mixup",)),
    "CutMix": ("augment", "augment", ("callbacks/cutmix",)),
    "Cutout": ("augment", "augment", ("callbacks/cutout",)),
    "L1Regularization": ("regularize", "regularize", ("callbacks/l1_regularization",)),
    "InitialLossCheck": ("sanity", "sanity", ("callbacks/initial_loss_check",)),
    "OverfitCheck": ("sanity", "sanity", ("callbacks/overfit_check",)),
    "UpdateRatioMonitor": ("sanity", "sanity", ("callbacks/update_ratio_monitor",)),
    "GradNormMonitor": ("sanity", "sanity", ()),
    "DeadUnitMonitor": ("sanity", "sanity", ()),
    "FreezeUnfreeze": ("finetune", "finetune", ("callbacks/freeze_unfreeze",)),
    "CurvePlot": ("plots", "plots", ("callbacks/default",)),
    "DivergenceGuard": ("sanity", "divergence_guard", ("callbacks/divergence_guard",)),
    "RandomState": ("random_state", "random_state", ("callbacks/random_state",)),
    "MixupCutmix": ("augment", "augment", ("callbacks/mixup_cutmix",)),
    "LayerStats": ("layer_stats", "layer_stats", ("callbacks/layer_stats",)),
    "AGC": ("clipping", "clipping", ("callbacks/agc",)),
    # Lightning's search (no formula of ours); the LR follows it through LinearScaling's rule (schedules)
    "BatchSizeFinder": (None, "batch_size", ("callbacks/batch_size_finder",)),
    # run output with no formula: no core; train.py adds it when stdout is not a terminal
    "EpochLines": (None, "progress", ()),
}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _core_files(core: str) -> list[Path]:
    path = PACKAGE / core
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


@pytest.mark.parametrize("core", CORES)
def test_core_imports_no_lightning_and_no_callback(core):
    for path in _core_files(core):
        bad = sorted(m for m in _imports(path) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: a core must stay free of Lightning and callbacks"


def test_each_core_loads_in_a_fresh_interpreter_without_lightning():
    code = (
        "import sys, importlib; importlib.import_module(sys.argv[1]); "
        "print(sorted(m for m in ('pytorch_lightning', 'lightning', 'lightning_fabric') if m in sys.modules))"
    )
    procs = {
        core: subprocess.Popen(
            [sys.executable, "-c", code, f"lightning_tricks.{core}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for core in CORES
    }
    for core, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"lightning_tricks.{core} failed to import: {err[-2000:]}"
        assert out.strip() == "[]", f"importing lightning_tricks.{core} loaded {out.strip()}"


def test_the_trick_map_covers_every_public_callback():
    ours = {n for n in cbs.__all__ if n not in ("ModelCheckpoint", "LearningRateMonitor")}
    assert ours <= set(TRICKS), sorted(ours - set(TRICKS))


@pytest.mark.parametrize("name", sorted(TRICKS))
def test_one_name_per_trick(name):
    core, module, configs = TRICKS[name]
    assert core is None or (PACKAGE / f"{core}.py").is_file() or (PACKAGE / core).is_dir(), core
    cls = getattr(cbs, name)
    assert cls.__module__ == f"lightning_tricks.callbacks.{module}", (name, cls.__module__)
    assert importlib.import_module(f"lightning_tricks.callbacks.{module}") is sys.modules[cls.__module__]
    for config in configs:
        group, _, stem = config.partition("/")
        paths = sorted((ROOT / "conf" / group).glob(f"{stem}.yaml"))
        assert paths, f"no conf/{config}.yaml for {name}"
        if stem == "*":
            continue
        targets = set(re.findall(r"_target_:\s*(\S+)", (paths[0]).read_text()))
        assert f"lightning_tricks.callbacks.{name}" in targets, f"conf/{config}.yaml does not build {name}"
        if group == "callbacks" and stem != "default":
            entry = list(yaml.safe_load(paths[0].read_text()))
            assert entry == [stem], f"conf/{config}.yaml must hold one entry named {stem!r}, got {entry}"
            squashed = re.sub(r"[^a-z0-9]", "", stem.split("_gl")[0].split("_pq")[0].split("_up")[0])
            assert squashed == name.lower(), f"conf/{config}.yaml is not named after {name}"
