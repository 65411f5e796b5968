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
from conftest import SHARED_DATA, compose_train, write_fashion_like

from lightning_tricks.data.files import write_cifar_batch

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
    return write_fashion_like(tmp_path / "fashion", 200, 60)


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
    hook_rows = [r for r in rows if "hook" in r]
    rows = [r for r in rows if "hook" not in r]
    floors = {f"floor_{k}" for k in overhead.FLOORS}
    configs = {r["config"] for r in rows}
    assert configs == set(overhead.CONFIGS) | floors  # every callback ran (all modules exist now), and the floors
    assert finite(rows, ["ms_per_step", "x_bare_lightning"])
    assert all(r["ms_per_step"] > 0 for r in rows)
    base = [r for r in rows if r["config"] == "lightning"]
    assert base and all(r["x_bare_lightning"] == pytest.approx(1.0) for r in base)
    assert all(r["added_ms"] == pytest.approx(0.0) for r in base)
    cb_rows = [r for r in rows if r["config"] not in floors | {"raw", "lightning"}]
    assert finite(cb_rows, ["added_ms", "hook_us", "floor_us"]) and all(r["hook_us"] > 0 for r in cb_rows)
    # each configuration with tensor work is judged against its own floor, measured in the same repeat
    by_config = {r["config"]: r for r in cb_rows}
    floor_us = {r["config"][len("floor_") :]: 1e3 * r["ms_per_step"] for r in rows if r["config"] in floors}
    for name, kind in overhead.FLOOR_OF.items():
        want = overhead.FLOOR_SCALE.get(name, (1.0, ""))[0] * floor_us[kind]
        assert by_config[name]["floor_kind"] == kind
        assert by_config[name]["floor_us"] == pytest.approx(want)
        assert by_config[name]["hook_minus_floor_us"] == pytest.approx(by_config[name]["hook_us"] - want)
    assert by_config["lr_schedule"]["floor_us"] == 0.0
    # the per-hook times of every configuration add up to its hooks' total
    stack_hooks = [r for r in hook_rows if r["config"] == "stack"]
    assert {"LRSchedule.on_train_batch_end", "EMA.on_train_batch_end", "Mixup.on_train_batch_start"} <= {
        r["hook"] for r in stack_hooks
    }
    assert sum(r["hook_us"] for r in stack_hooks) == pytest.approx(by_config["stack"]["hook_us"])
    assert "| mlp | + whole bag-of-tricks stack |" in md and "floor: one `_foreach_lerp_` pass" in md
    assert "Profile of the whole stack (mlp)" in md and "| `Mixup.on_train_batch_start` |" in md
    assert "≤ 1.2 floors" in md and "GPU target" not in md
    csv_rows = read_csv(tmp_path / "overhead_cpu_mlp_tiny.csv")
    assert finite([r for r in csv_rows if not r["hook"]], ["ms_per_step", "x_bare_lightning"])
    assert finite([r for r in csv_rows if r["hook"]], ["hook_us"])
    assert (tmp_path / "overhead_cpu_mlp_tiny.md").read_text().startswith("Per-step cost")


def test_overhead_paired_measures_each_configuration_against_itself(tmp_path: Path) -> None:
    """``--paired``: one row per configuration (the references left out), its step without the hooks and what
    they add; a configuration that sleeps 2 ms in its batch start adds about 2 ms, one that does nothing ~0."""
    import time

    overhead = load("overhead")
    from lightning_tricks._lightning import Callback

    class Sleeps(Callback):
        def on_train_batch_start(self, *args: object) -> None:
            time.sleep(0.002)

    overhead.CONFIGS["sleeps_2ms"] = overhead.Config("+ sleeps 2 ms", lambda s, bs: [Sleeps()])
    overhead.CONFIGS["does_nothing"] = overhead.Config("+ does nothing", lambda s, bs: [Callback()])
    try:
        argv = ["--paired", "--tiny", "--models", "mlp", "--repeats", "1", "--timed-steps", "40"]
        rows, md = overhead.main([*argv, "--configs", "sleeps_2ms,does_nothing,cutout", "--out-dir", str(tmp_path)])
    finally:
        del overhead.CONFIGS["sleeps_2ms"], overhead.CONFIGS["does_nothing"]
    by = {r["configuration"]: r for r in rows}
    assert set(by) == {"sleeps_2ms", "does_nothing", "cutout"}
    assert 1500 < by["sleeps_2ms"]["added_us"] < 6000
    assert abs(by["does_nothing"]["added_us"]) < 500
    assert by["cutout"]["verdict"] and "| mlp | + Cutout |" in md
    assert (tmp_path / "overhead_paired_cpu_mlp_tiny.md").read_text().startswith("Paired per-step cost")


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
    assert "| `EMA.on_train_batch_end` |" in text and "above its floor µs" in text  # the per-hook table
    assert (tmp_path / "overhead_profile_ema_mlp_cpu.txt").is_file()


def test_overhead_skips_a_missing_module() -> None:
    overhead = load("overhead")
    config = overhead.Config("+ future trick", lambda s, bs: [], needs="not_written_yet")
    assert overhead.missing_modules(config) == ["not_written_yet"]
    assert overhead.missing_modules(overhead.CONFIGS["ema"]) == []


def test_ablation_variants_compose() -> None:
    ablation = load("ablation")
    base = ablation.base_overrides(ablation.SETTINGS)
    define = ablation.definitions(base, ablation.SETTINGS["batch_size"])
    full = ablation.full_overrides(define)
    assert "+callbacks=[linear_scaling,ema]" in full and "schedule=warmup_cosine" in full
    assert "optimizer.lr=0.1" in full  # 0.05 at batch 128 given at the reference batch 256
    cfg = ablation.compose([*base, *full])
    assert cfg.model.norm == "batch" and cfg.module.label_smoothing == 0.1 and cfg.trainer.max_epochs == 2
    assert cfg.optimizer.no_decay_bias_norm is True and {"linear_scaling", "ema"} <= set(cfg.callbacks)


def test_ablation_table(tmp_path: Path, fashion_dir: Path) -> None:
    ablation = load("ablation")
    code, md = ablation.main(
        ["--data-dir", str(fashion_dir), "--tricks", "ema", "--epochs", "1", "--widths", "4,8", "--batch-size", "32"]
        + ["--limit-train", "200", "--name", "tiny", "--out-dir", str(tmp_path)]
    )
    rows = read_csv(tmp_path / "ablation_tiny" / "ablation.csv")
    assert code == 0 and [r["row"] for r in rows] == ["baseline", "full"]
    assert finite(rows, ["monitor_mean", "test_mean", "fit_s_mean"]) and "| full |" in md
    assert (tmp_path / "ablation_tiny.md").read_text().strip() == md.strip()


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


def _speedrun_recipe_args(data_dir: Path, out: Path, *more: str) -> list[str]:
    """A tiny Fashion-MNIST speedrun: a 4-8 SpeedNet, batch 32, one reference epoch, one run."""
    return [
        "--data-dir",
        str(data_dir),
        "--override",
        "model.widths=[4,8]",
        "--override",
        "data.batch_size=32",
        "--reference-epochs",
        "1",
        "--warmup-steps",
        "2",
        "--runs",
        "1",
        "--out-dir",
        str(out),
        *more,
    ]


def test_speedrun_fashion_recipe_and_reference(tmp_path: Path, fashion_dir: Path) -> None:
    """The default setting (the library's path + the reference loop) on 200 synthetic images, reached and missed."""
    speedrun = load("speedrun")
    rows, md = speedrun.main(_speedrun_recipe_args(fashion_dir, tmp_path, "--epochs", "2", "--target", "0.01"))
    ours = [r for r in rows if r["side"] == "ours"]
    refs = [r for r in rows if r["side"] == "reference"]
    assert len(ours) == len(refs) == 1 and ours[0]["reached"] and ours[0]["epochs"] == 1 and refs[0]["epochs"] == 1
    assert finite(rows, ["train_s", "wall_s", "acc", "ratio"]) and 0 < ours[0]["train_s"] <= ours[0]["wall_s"]
    assert ours[0]["ratio"] == pytest.approx(ours[0]["train_s"] / refs[0]["train_s"])
    assert "| ours: `experiment=speedrun_fashion_mnist` | 1/1 |" in md and "| reference raw loop | 1/1 |" in md
    assert (
        "Goal (issue 16): ours / reference ≤ 0.5" in md
        and "SpeedNet widths [4, 8], flatten head with a hidden layer of 128, channels_last" in md
    )
    assert "2 epochs" in md and "TTA flip" in md and "EMA 0.99" in md  # the recipe line reads the composed config
    assert finite(read_csv(tmp_path / "speedrun_fashion_mnist_cpu.csv"), ["train_s", "acc"])
    rows, md = speedrun.main(
        _speedrun_recipe_args(fashion_dir, tmp_path, "--epochs", "2", "--target", "1.0", "--name", "miss")
    )
    ours = [r for r in rows if r["side"] == "ours"]
    assert not ours[0]["reached"] and ours[0]["epochs"] == 2 and len(ours[0]["history"].split()) == 2
    assert "not reached" in md and "(missed)" in md


def test_speedrun_without_the_reference(tmp_path: Path, fashion_dir: Path) -> None:
    speedrun = load("speedrun")
    rows, md = speedrun.main(
        _speedrun_recipe_args(fashion_dir, tmp_path, "--epochs", "1", "--target", "0.01", "--no-reference")
    )
    assert [r["side"] for r in rows] == ["ours"] and math.isnan(rows[0]["ratio"])
    assert "reference raw loop |" not in md and "Goal (issue 16)" not in md


def test_speedrun_records_the_tta_accuracy_of_the_ema_weights(fashion_dir: Path) -> None:
    """The epoch accuracy the clock stops on is the module's flip-TTA accuracy of the weights validation ran on:
    after the last epoch the module holds the EMA average (``average_at_end``), the same weights."""
    import torch

    from lightning_tricks.augment import tta_predict

    speedrun = load("speedrun")
    s = {**speedrun.SETTINGS, "data_dir": str(fashion_dir), "target": 1.0, "epochs": 1}
    s["overrides"] = ("model.widths=[4,8]", "data.batch_size=32")
    device = torch.device("cpu")
    cfg = speedrun.compose_recipe(s, 0, device)
    assert cfg.module.tta == "flip" and "ema" in cfg.callbacks
    row, datamodule, module = speedrun.fit_recipe(cfg, s, device)
    x, y = datamodule.splits["test"]
    module.eval()
    with torch.no_grad():
        probs = torch.cat([tta_predict(module, x[i : i + 32], "flip") for i in range(0, len(y), 32)])
        plain = torch.cat([module(x[i : i + 32]) for i in range(0, len(y), 32)])
    assert row["acc"] == int((probs.argmax(-1) == y).sum()) / len(y)  # the same count: exactly equal
    assert row["plain_acc"] == pytest.approx(int((plain.argmax(-1) == y).sum()) / len(y), abs=1e-6)
    assert row["acc"] != pytest.approx(row["plain_acc"], abs=1e-6)  # here the flip views change a prediction
    assert torch.equal(datamodule.splits["val"][1], y)  # validation ran over the test split


def test_speedrun_composes_what_the_command_line_composes(tmp_path: Path) -> None:
    """The benchmark's recipe is ``python -m lightning_tricks.train experiment=speedrun_fashion_mnist ...``."""
    import torch

    speedrun = load("speedrun")
    s = {**speedrun.SETTINGS, "data_dir": str(tmp_path)}
    ours = speedrun.compose_recipe(s, 3, torch.device("cpu"))
    cli = compose_train(
        ["experiment=speedrun_fashion_mnist", f"data.data_dir={tmp_path}", "seed=3", "trainer.accelerator=cpu"]
    )
    for key in ("data", "model", "optimizer", "schedule", "callbacks", "module", "trainer", "seed", "monitor"):
        assert ours[key] == cli[key], key
    assert ours.data.split_seed == 3 and ours.data.val_fraction == 0.0 and ours.data.loader == "resident"


def test_speedrun_experiment_runs_through_train(tmp_path: Path, fashion_dir: Path) -> None:
    """The command-line path of the recipe (``train(cfg)``, fit then test) on the tiny files."""
    from lightning_tricks.train import train

    cfg = compose_train(
        [
            "experiment=speedrun_fashion_mnist",
            f"data.data_dir={fashion_dir}",
            "model.widths=[4,8]",
            "data.batch_size=32",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "logger=none",
        ],
        output_dir=tmp_path,
    )
    metrics, objects = train(cfg)
    assert metrics["status"] == "ok" and 0.0 <= metrics["test/acc"] <= 1.0
    assert objects["trainer"].global_step == 200 // 32 and "val/acc" not in metrics  # all 200 images train


def test_speedrun_refuses_resnet9_options_for_the_recipe(fashion_dir: Path) -> None:
    speedrun = load("speedrun")
    with pytest.raises(SystemExit):
        speedrun.main(["--data-dir", str(fashion_dir), "--widths", "4,4,4,4"])
    with pytest.raises(SystemExit):
        speedrun.main(["--dataset", "cifar10", "--override", "model.widths=[4]"])


def test_speedrun_reference_net_is_the_issue_16_network() -> None:
    import torch

    speedrun = load("speedrun")
    net = speedrun.reference_net()
    # conv 1->32 (+bias), BN 32, conv 32->64 (+bias), BN 64, Linear 3136->128, Linear 128->10
    expected = (9 * 32 + 32) + 64 + (9 * 32 * 64 + 64) + 128 + (3136 * 128 + 128) + (128 * 10 + 10)
    assert sum(p.numel() for p in net.parameters()) == expected == 421_834
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.skipif(
    not (SHARED_DATA / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason=f"the real Fashion-MNIST files are not in {SHARED_DATA / 'fashion_mnist'} (see ../shared/data/README.md)",
)
def test_speedrun_on_the_real_fashion_mnist_files(tmp_path: Path) -> None:
    """The default setting on the shared idx files, cut to 512 training and 256 test images, one epoch."""
    speedrun = load("speedrun")
    args = _speedrun_recipe_args(SHARED_DATA / "fashion_mnist", tmp_path, "--epochs", "1", "--target", "1.0")
    rows, md = speedrun.main([*args, "--limit-train", "512", "--limit-test", "256"])
    assert finite(rows, ["train_s", "acc"]) and "(512 train / 256 test images)" in md
    ours = next(r for r in rows if r["side"] == "ours")
    assert 0.3 < ours["acc"] <= 1.0  # 16 steps of a 4-8 SpeedNet: well above chance (10%)


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
