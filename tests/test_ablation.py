"""The trick ablation benchmark (``benchmarks/ablation.py``), a caller of ``lightning_tricks.ablate``: its rows
compose to the configs they claim, its ``full`` row is the shipped ``bag_of_tricks_fashion_mnist`` recipe,
its trick definitions reach ``ablate`` intact, and a tiny run writes the table and reruns nothing finished.

The runs use a few hundred synthetic images in the idx format, and one the first images of the real
Fashion-MNIST (skipped, with the reason, when ``../shared/data/fashion_mnist`` is absent). No timing is asserted.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import write_fashion_like

from lightning_tricks.ablate import Row, plan_rows, row_overrides, split_arguments

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
FASHION = Path(os.environ.get("LT_SHARED_DATA", ROOT.parent / "shared" / "data")) / "fashion_mnist"


def _load():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_ablation_t30", BENCH / "ablation.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


A = _load()
BASE = A.base_overrides(A.SETTINGS)
DEFINE = A.definitions(BASE, A.SETTINGS["batch_size"])


def _cfg(*tricks: str):
    return A.compose([*BASE, *row_overrides(Row("r", tricks, "plus"), DEFINE)])


def test_full_row_is_the_shipped_recipe_in_every_setting_and_the_check_can_fail() -> None:
    for s in (A.SETTINGS, A.CPU_FULL, A.FULL):
        base = A.base_overrides(s)
        assert A.recipe_mismatch(base, A.definitions(base, s["batch_size"])) == []
    assert "is the shipped `experiment=bag_of_tricks_fashion_mnist`" in A.recipe_line(BASE, DEFINE)
    # at batch 32 the warmup row keeps the baseline's LR (0.05 at 32 = 0.4 at 256); the recipe file says 0.1 at 256
    small = A.base_overrides({**A.SETTINGS, "batch_size": 32})
    diff = A.recipe_mismatch(small, A.definitions(small, 32))
    assert len(diff) == 1 and diff[0].startswith("optimizer:") and "'lr': 0.4" in diff[0]
    wrong = {**DEFINE, "ema": {"callbacks": ["swa"]}}
    assert any(d.startswith("callbacks:") and "swa" in d for d in A.recipe_mismatch(BASE, wrong))
    assert "differs from `experiment=bag_of_tricks_fashion_mnist`" in A.recipe_line(BASE, wrong)


def test_baseline_is_plain_constant_lr_sgd() -> None:
    cfg = A.compose(BASE)
    assert not cfg.get("schedule") and set(cfg.callbacks) == {"random_state", "divergence_guard"}
    assert cfg.optimizer.lr == 0.05 and cfg.optimizer.momentum == 0.9 and cfg.optimizer.nesterov is False
    assert cfg.optimizer.no_decay_bias_norm is False and cfg.optimizer.weight_decay == 5.0e-4
    assert cfg.module.label_smoothing == 0.0 and cfg.data.augment == "none" and cfg.model.norm == "batch"
    assert list(cfg.model.widths) == [8, 16, 32] and cfg.data.limit_train == 2000 and cfg.trainer.max_epochs == 2


def test_rows_add_then_remove_each_trick_and_each_removal_changes_only_its_trick() -> None:
    rows = plan_rows(A.TRICKS, "cumulative", DEFINE)
    assert [r.name for r in rows] == [
        "baseline",
        "baseline+warmup",
        "baseline+warmup+cosine",
        "baseline+warmup+cosine+no_bias_decay",
        "full",
        *[f"full-{t}" for t in A.TRICKS],
    ]
    full = _cfg(*A.TRICKS)
    assert full.schedule.schedule._target_.endswith("Warmup") and full.schedule.schedule.then._target_.endswith(
        "Cosine"
    )
    assert {"linear_scaling", "ema"} <= set(full.callbacks) and full.optimizer.lr == 0.1  # 0.05 at batch 128
    assert full.callbacks.linear_scaling.reference_batch_size == 256 and full.module.label_smoothing == 0.1

    def minus(trick: str):
        return _cfg(*[t for t in A.TRICKS if t != trick])

    no_warmup = minus("warmup")
    assert no_warmup.schedule.schedule._target_.endswith("Cosine") and "linear_scaling" not in no_warmup.callbacks
    assert no_warmup.optimizer.lr == 0.05
    assert minus("cosine").schedule.schedule.then._target_.endswith("Constant")
    assert minus("no_bias_decay").optimizer.no_decay_bias_norm is False
    assert minus("label_smoothing").module.label_smoothing == 0.0
    assert "ema" not in minus("ema").callbacks
    for trick, key in (("no_bias_decay", "module"), ("label_smoothing", "optimizer"), ("ema", "schedule")):
        assert minus(trick)[key] == full[key]


def test_extras_add_a_left_out_trick_to_the_recipe() -> None:
    cut = _cfg(*A.TRICKS, "cutout")
    assert {"linear_scaling", "ema", "cutout"} <= set(cut.callbacks) and cut.callbacks.cutout.size == 0.5
    assert _cfg(*A.TRICKS, "cutout_small").callbacks.cutout.size == 0.25
    flip = _cfg(*A.TRICKS, "flip")
    assert flip.data.augment == "crop_flip" and flip.data.augment_options.padding == 0 and flip.data.flip is True
    assert _cfg("crop_flip").data.augment_options.padding == 2
    ic = _cfg("ic")
    assert ic.model.norm == "ic" and ic.model.dropout == 0.1


def test_definitions_reach_the_ablate_command_intact() -> None:
    settings, base, _ = split_arguments(["x=1", f"+ablate.define={A._hydra_value(DEFINE)}"])
    assert settings["define"] == DEFINE and base == ["x=1"]


def _tiny(data_dir: Path, out: Path, *more: str) -> list[str]:
    return [
        "--data-dir",
        str(data_dir),
        "--epochs",
        "1",
        "--widths",
        "4,8",
        "--name",
        "t30",
        "--out-dir",
        str(out),
        *more,
    ]


@pytest.mark.slow
def test_tiny_ablation_writes_the_table_and_a_second_call_adds_a_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_fashion_like(tmp_path / "fashion", 300, 80)
    code, md = A.main(_tiny(data, tmp_path, "--tricks", "warmup,cosine,ema", "--batch-size", "64"))
    sweep = tmp_path / "ablation_t30"
    with open(sweep / "ablation.csv") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    assert code == 0 and list(rows) == ["baseline", "baseline+warmup", "full", "full-warmup", "full-cosine", "full-ema"]
    assert all(r["status"] == "ok" for r in rows.values())
    full = json.loads((sweep / "full_s0" / "metrics.json").read_text())["metrics"]
    assert float(rows["full"]["test_mean"]) == pytest.approx(full["test/acc"])
    assert (tmp_path / "ablation_t30.md").read_text().strip() == md.strip()
    assert "first 2,000 training images" in md and "| full-ema |" in md and "Machine: CPU" in md
    assert "**The full recipe (warmup+cosine+no_bias_decay+label_smoothing+ema) differs" in md  # lr 0.2 at batch 64
    stamp = (sweep / "full_s0" / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()

    code, md = A.main(_tiny(data, tmp_path, "--tricks", "warmup,cosine,ema", "--batch-size", "64", "--seeds", "2"))
    assert code == 0 and "6 job(s) already finished there, not run again" in capsys.readouterr().out
    assert (sweep / "full_s0" / "metrics.json").stat().st_mtime_ns == stamp and (sweep / "full_s1").is_dir()
    assert "Ablation over 2 seed(s)" in md and "| full-ema |" in md


def test_on_recipe_the_baseline_row_is_the_recipe_and_an_extra_goes_on_top(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    data = write_fashion_like(tmp_path / "fashion", 120, 40)
    more = ["--on-recipe", "--tricks", "cutout_small", "--limit-train", "120", "--batch-size", "16"]
    code, md = A.main(_tiny(data, tmp_path, *more))
    assert code == 0 and "The baseline row here is the full recipe" in md
    jobs = tmp_path / "ablation_t30"
    baseline, full = (OmegaConf.load(jobs / f"{row}_s0" / ".hydra" / "config.yaml") for row in ("baseline", "full"))
    assert {"linear_scaling", "ema"} <= set(baseline.callbacks) and "cutout" not in baseline.callbacks
    assert baseline.schedule.schedule._target_.endswith("Warmup") and baseline.module.label_smoothing == 0.1
    assert full.callbacks.cutout.size == 0.25 and {"linear_scaling", "ema"} <= set(full.callbacks)


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(), reason=f"no Fashion-MNIST in {FASHION}")
def test_tiny_ablation_on_real_fashion_mnist_learns(tmp_path: Path) -> None:
    more = ["--limit-train", "3000", "--limit-test", "500", "--batch-size", "32", "--tricks", "label_smoothing"]
    code, md = A.main(_tiny(FASHION, tmp_path, *more))
    with open(tmp_path / "ablation_t30" / "ablation.csv") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    assert code == 0 and list(rows) == ["baseline", "full"]
    # 85 steps of 32 images, a 4-8 channel net: well above the 10% of chance on the official test images
    assert float(rows["full"]["test_mean"]) > 0.25, rows
    assert "first 3,000 training images, first 500 test images" in md
