"""Smoke tests of the three benchmarks (issue 10): each runs its ``main`` with a tiny setting on the CPU,
produces its table and writes finite numbers.

The scripts are imported from ``benchmarks/`` by path (they are scripts, not a package). Data is written
here: a tiny Fashion-MNIST in the idx format and a tiny CIFAR-10 in the python-batch layout.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_tricks.data.files import write_cifar_batch, write_idx

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    """``benchmarks/<name>.py`` as a module (``benchmarks/`` goes on ``sys.path`` for ``_common``)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def finite(rows: list[dict], keys: list[str]) -> bool:
    return all(math.isfinite(float(r[k])) for r in rows for k in keys)


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    """Four idx files with 200 training and 60 test 28x28 images whose class is the brightness band."""
    rng = np.random.default_rng(0)
    d = tmp_path / "fashion"
    d.mkdir()
    for split, n in (("train", 200), ("t10k", 60)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = (rng.integers(0, 40, (n, 28, 28)) + 20 * y[:, None, None]).astype(np.uint8)
        write_idx(d / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", y)
    return d


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    """``cifar-10-batches-py/`` with 5 x 32 training and 40 test images (class = brightness band)."""
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar" / "cifar-10-batches-py"
    d.mkdir(parents=True)

    def batch(path: Path, n: int) -> None:
        y = rng.integers(0, 10, n)
        x = (rng.integers(0, 40, (n, 3, 32, 32)) + 20 * y[:, None, None, None]).astype(np.uint8)
        write_cifar_batch(path, x, y)

    for i in range(1, 6):
        batch(d / f"data_batch_{i}", 32)
    batch(d / "test_batch", 40)
    return d.parent


def test_overhead_table(tmp_path: Path) -> None:
    overhead = load("overhead")
    rows, md = overhead.main(
        [
            "--tiny",
            "--models",
            "mlp",
            "--repeats",
            "1",
            "--warmup-steps",
            "2",
            "--timed-steps",
            "3",
            "--steps-per-epoch",
            "2",
            "--out-dir",
            str(tmp_path),
        ]
    )
    configs = {r["config"] for r in rows}
    assert configs == set(overhead.CONFIGS) | {"floor"}  # every callback ran (all modules exist now), and the floor
    assert finite(rows, ["ms_per_step", "x_bare_lightning"])
    assert all(r["ms_per_step"] > 0 for r in rows)
    base = [r for r in rows if r["config"] == "lightning"]
    assert base and all(r["x_bare_lightning"] == pytest.approx(1.0) for r in base)
    assert all(r["added_ms"] == pytest.approx(0.0) for r in base)
    cb_rows = [r for r in rows if r["config"] not in ("floor", "raw", "lightning")]
    assert finite(cb_rows, ["added_ms", "x_floor", "hook_us"]) and all(r["hook_us"] > 0 for r in cb_rows)
    assert "| mlp | + whole bag-of-tricks stack |" in md and "floor: one `_foreach_lerp_` pass" in md
    assert "≤ 1.2 floors" in md and "GPU target" not in md
    assert finite(read_csv(tmp_path / "overhead_cpu_mlp_tiny.csv"), ["ms_per_step", "x_bare_lightning"])
    assert (tmp_path / "overhead_cpu_mlp_tiny.md").read_text().startswith("Per-step cost")


def test_overhead_profile_names_the_hooks(tmp_path: Path) -> None:
    overhead = load("overhead")
    _, text = overhead.main(
        [
            "--tiny",
            "--models",
            "mlp",
            "--warmup-steps",
            "2",
            "--timed-steps",
            "2",
            "--steps-per-epoch",
            "2",
            "--profile",
            "ema",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert "EMA.on_train_batch_end" in text and "train_step (whole)" in text
    assert "| `EMA.on_train_batch_end` |" in text and "floor + 30 = " in text  # the per-hook verdict table
    assert (tmp_path / "overhead_profile_ema_mlp_cpu.txt").is_file()


def test_overhead_skips_a_missing_module() -> None:
    overhead = load("overhead")
    config = overhead.Config("+ future trick", lambda s, bs: [], needs="not_written_yet")
    assert overhead.missing_modules(config) == ["not_written_yet"]
    assert overhead.missing_modules(overhead.CONFIGS["ema"]) == []


def test_ablation_variants_compose() -> None:
    ablation = load("ablation")
    assert list(ablation.VARIANTS)[:2] == ["baseline", "+warmup"] and "full" in ablation.VARIANTS
    s = ablation.SETTINGS
    base = ablation.overrides(frozenset(), s, 0, "/tmp/x", "cpu")
    assert "callbacks=[]" in base and not any(o.startswith("schedule=") for o in base)
    full = ablation.overrides(frozenset(ablation.KEYS), s, 0, "/tmp/x", "cpu")
    assert "callbacks=[linear_scaling,ema,cutout]" in full and "schedule=warmup_cosine" in full
    assert "optimizer.lr=0.1" in full  # 0.05 at batch 128 given at the reference batch 256
    cfg = ablation.compose(full)
    assert cfg.model.norm == "ic" and cfg.module.label_smoothing == 0.1
    assert cfg.optimizer.no_decay_bias_norm is True and set(cfg.callbacks) == {"linear_scaling", "ema", "cutout"}
    no_warmup = ablation.compose(ablation.overrides(frozenset(ablation.KEYS) - {"warmup"}, s, 0, "/tmp/x", "cpu"))
    assert no_warmup.schedule.schedule._target_.endswith("Cosine") and "linear_scaling" not in no_warmup.callbacks


def test_ablation_table(tmp_path: Path, fashion_dir: Path) -> None:
    ablation = load("ablation")
    rows, md = ablation.main(
        [
            "--data-dir",
            str(fashion_dir),
            "--variants",
            "baseline,full,-ic",
            "--epochs",
            "1",
            "--widths",
            "4,8",
            "--batch-size",
            "32",
            "--limit-train",
            "200",
            "--name",
            "tiny",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert [r["variant"] for r in rows] == ["baseline", "full", "-ic"]
    assert finite(rows, ["test_acc", "test_loss", "fit_s"])
    assert "**Removing one trick from the full recipe:**" in md and "Full recipe vs baseline" in md
    assert finite(read_csv(tmp_path / "ablation_tiny.csv"), ["test_acc", "fit_s"])
    # a second call with another seed, then one table from both CSVs (how a time-limited GPU run is split)
    ablation.main(
        [
            "--data-dir",
            str(fashion_dir),
            "--variants",
            "baseline,full",
            "--epochs",
            "1",
            "--widths",
            "4,8",
            "--batch-size",
            "32",
            "--limit-train",
            "200",
            "--seeds",
            "1",
            "--first-seed",
            "1",
            "--name",
            "tiny_s1",
            "--out-dir",
            str(tmp_path),
        ]
    )
    merged, md = ablation.main(
        [
            "--merge",
            str(tmp_path / "ablation_tiny.csv"),
            str(tmp_path / "ablation_tiny_s1.csv"),
            "--widths",
            "4,8",
            "--name",
            "merged",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert sorted({r["seed"] for r in merged}) == [0, 1] and len(merged) == 5
    assert "2 seed(s) (0, 1)" in md and finite(merged, ["test_acc", "fit_s"])


def test_speedrun_table_cifar_layout(tmp_path: Path, cifar_dir: Path) -> None:
    speedrun = load("speedrun")
    common = [
        "--dataset",
        "cifar10",
        "--data-dir",
        str(cifar_dir),
        "--widths",
        "4,4,4,4",
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--runs",
        "1",
        "--out-dir",
        str(tmp_path),
    ]
    rows, md = speedrun.main([*common, "--target", "0.01", "--name", "reach"])
    assert rows[0]["reached"] and rows[0]["epochs"] == 1  # any accuracy >= 1% stops after the first epoch
    assert finite(rows, ["train_s", "wall_s", "acc"]) and 0 < rows[0]["train_s"] <= rows[0]["wall_s"]
    assert "| cifar10 | 1.0% | 1/1 |" in md
    rows, md = speedrun.main([*common, "--target", "1.0", "--name", "miss"])
    assert not rows[0]["reached"] and rows[0]["epochs"] == 2 and finite(rows, ["train_s", "acc"])
    assert "not reached" in md
    assert finite(read_csv(tmp_path / "speedrun_cifar10_miss.csv"), ["train_s", "final_acc"])


def test_speedrun_resnet9_shapes() -> None:
    import torch

    speedrun = load("speedrun")
    net = speedrun.ResNet9(1, 10, widths=(4, 8, 8, 8))
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="widths must be 4 positive ints"):
        speedrun.ResNet9(3, 10, widths=(4, 8))


def test_gpu_all_script_parses_and_names_every_gpu_benchmark() -> None:
    import subprocess

    script = BENCH / "gpu_all.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)  # syntax only: it needs a GPU to run
    text = script.read_text()
    for name in ("overhead.py", "ema_update.py", "speedrun.py", "ablation.py"):
        assert name in text
