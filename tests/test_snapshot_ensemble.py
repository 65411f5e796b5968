"""Snapshot ensembles (LR cycles, snapshots, evaluation on digits, resume) and checkpoint ensembles."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks._lightning import (
    MisconfigurationException,
    ModelCheckpoint,
    Trainer,
    seed_everything,
)
from lightning_tricks.averaging import raw_state_dict
from lightning_tricks.callbacks import EMA, LRSchedule, SnapshotEnsemble
from lightning_tricks.callbacks.snapshot_ensemble import snapshot_steps
from lightning_tricks.data import DigitsDataModule
from lightning_tricks.ensemble import (
    CheckpointEnsemble,
    evaluate_members,
    mean_softmax,
    model_checkpoint_paths,
)
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP
from lightning_tricks.schedules import CosineRestarts

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _loader(batch_size: int = 16, n: int = 96) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _make() -> Classifier:
    return Classifier(MLP((8,), 3, hidden=(16,)), 3, {"name": "sgd", "lr": 0.2, "momentum": 0.9})


class Recorder(Classifier):
    """Records the LR of each optimizer step and the weights after it."""

    def __init__(self) -> None:
        super().__init__(MLP((8,), 3, hidden=(16,)), 3, {"name": "sgd", "lr": 0.2, "momentum": 0.9})
        self.lrs: list[float] = []
        self.__dict__["after"] = {}  # step count -> state dict copy (not part of the module)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        super().optimizer_step(*args, **kwargs)
        self.after[len(self.lrs)] = {k: v.detach().clone() for k, v in self.state_dict().items()}


def _trainer(callbacks: list, **kwargs: Any) -> Trainer:
    opts = dict(
        max_epochs=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    opts.update(kwargs)
    return Trainer(callbacks=callbacks, **opts)


# -- cores -----------------------------------------------------------------------------------------
def test_mean_softmax_is_the_mean_of_probabilities() -> None:
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(mean_softmax([a, b]), (a.softmax(-1) + b.softmax(-1)) / 2)
    with pytest.raises(ValueError, match="at least one"):
        mean_softmax([])


def test_snapshot_steps_end_each_cycle_and_the_run() -> None:
    assert snapshot_steps(12, 3) == [4, 8, 12]
    assert snapshot_steps(10, 4) == [3, 6, 9, 10]  # ceil(10/4) = 3; the last cycle is cut short
    assert snapshot_steps(5, 1) == [5]
    with pytest.raises(ValueError, match="leave the last cycle empty"):
        snapshot_steps(9, 4)


# -- SnapshotEnsemble ------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulate", [1, 2])
def test_snapshot_lr_follows_huang_cosine_cycles_and_snapshots_end_them(accumulate: int) -> None:
    seed_everything(0)
    module = Recorder()
    snap = SnapshotEnsemble(cycles=2)
    _trainer([snap, LRSchedule()], accumulate_grad_batches=accumulate).fit(module, _loader())
    total = 24 // accumulate
    c = math.ceil(total / 2)
    # Huang et al. 2017, eq. (2): alpha(t) = alpha0 / 2 * (cos(pi * mod(t, ceil(T/M)) / ceil(T/M)) + 1)
    want = [0.2 / 2 * (math.cos(math.pi * (t % c) / c) + 1) for t in range(total)]
    assert module.lrs == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert snap.steps == [c, total]
    for step, state in zip(snap.steps, snap.snapshots):
        for name, t in state.items():
            assert torch.equal(t, module.after[step][name]), name


def test_snapshot_ensemble_on_digits_logs_members_and_ensemble() -> None:
    seed_everything(0)
    module = Classifier(MLP((1, 8, 8), 10, hidden=(64,)), 10, {"name": "sgd", "lr": 0.2})
    data = DigitsDataModule(batch_size=64, loader="resident")
    snap = SnapshotEnsemble(cycles=4)
    trainer = _trainer([snap, LRSchedule()], max_epochs=8)
    trainer.fit(module, data)
    got = trainer.test(module, data, verbose=False)[0]
    members = [got[f"test/snapshot_{k}/acc"] for k in range(1, 5)]
    nlls = [got[f"test/snapshot_{k}/nll"] for k in range(1, 5)]
    assert len(snap.snapshots) == 4
    assert min(members) > 0.85
    # the last snapshot is the final model, which the test loop itself evaluated
    assert got["test/snapshot_4/acc"] == pytest.approx(got["test/acc"], abs=1e-6)
    assert got["test/snapshot_4/nll"] == pytest.approx(got["test/loss"], abs=1e-5)
    # 359 test images: one image is 0.28%; "not worse than the best member by more than noise"
    assert got["test/ensemble/acc"] >= max(members) - 0.01
    # mean-of-softmax NLL is at most the members' mean NLL (Jensen), and here below the worst member
    assert got["test/ensemble/nll"] <= sum(nlls) / len(nlls) + 1e-6
    # the same numbers from the CheckpointEnsemble view of the snapshots
    x, y = data.splits["test"]
    probs = snap.ensemble(module).predict_proba(x)
    assert (probs.argmax(1) == y).float().mean().item() == pytest.approx(got["test/ensemble/acc"], abs=1e-6)


def test_snapshot_keep_on_disk_and_resume_match_uninterrupted(tmp_path: Path) -> None:
    def run(ckpt_path: str | None, name: str) -> tuple[SnapshotEnsemble, Recorder]:
        seed_everything(0 if ckpt_path is None else 1)
        module = Recorder()
        snap = SnapshotEnsemble(cycles=3, keep="disk", dirpath=tmp_path / name / "snaps")
        ckpt = ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1, every_n_epochs=1)
        callbacks = [snap, LRSchedule(), ckpt]
        _trainer(callbacks, max_epochs=3, enable_checkpointing=True).fit(module, _loader(), ckpt_path=ckpt_path)
        return snap, module

    full_snap, full = run(None, "a")
    resumed_snap, resumed = run(str(tmp_path / "a" / "epoch=0-step=6.ckpt"), "b")
    assert full_snap.steps == resumed_snap.steps == [6, 12, 18]
    assert resumed.lrs == full.lrs[6:]
    assert all(Path(p).is_file() for p in full_snap.snapshots)
    assert resumed_snap.snapshots[0] == full_snap.snapshots[0]  # taken before the checkpoint: its path
    for a, b in zip(full_snap.snapshots, resumed_snap.snapshots):
        sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def test_snapshot_bad_input_fails_clearly() -> None:
    with pytest.raises(ValueError, match="cycles must be an int >= 1, got 0"):
        SnapshotEnsemble(cycles=0)
    with pytest.raises(ValueError, match="keep must be"):
        SnapshotEnsemble(cycles=2, keep="gpu")
    with pytest.raises(ValueError, match="cycles=5 is larger than the number of epochs \\(max_epochs=4\\)"):
        _trainer([SnapshotEnsemble(cycles=5)]).fit(_make(), _loader())
    # schedule=True gives the cycles to the LR owner: a user's LRSchedule with another schedule is refused
    # (one with exactly these cycles composes: tests/test_lr_owner.py)
    with pytest.raises(MisconfigurationException, match=r"SnapshotEnsemble\(cycles=2, schedule=True\).*LRSchedule\("):
        _trainer([SnapshotEnsemble(cycles=2), LRSchedule(CosineRestarts(T_0=8))]).fit(_make(), _loader())
    with pytest.raises(ValueError, match="T_0=12"):
        mismatched = LRSchedule(CosineRestarts(T_0=8))
        _trainer([SnapshotEnsemble(cycles=2, schedule=False), mismatched]).fit(_make(), _loader())


def test_snapshot_with_a_matching_cosine_restarts_schedule() -> None:
    seed_everything(0)
    module = Recorder()
    snap = SnapshotEnsemble(cycles=2, schedule=False)
    _trainer([snap, LRSchedule(CosineRestarts(T_0=12))]).fit(module, _loader())
    assert snap.steps == [12, 24] and len(snap.snapshots) == 2
    assert module.lrs[0] == module.lrs[12] == pytest.approx(0.2)


# -- CheckpointEnsemble ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> ModelCheckpoint:
    root = tmp_path_factory.mktemp("ckpts")
    seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=root, monitor="val/loss", mode="min", save_top_k=-1)
    trainer = _trainer([ckpt, EMA(decay=0.8)], max_epochs=4, enable_checkpointing=True, limit_val_batches=None)
    trainer.fit(_make(), _loader(), _loader(32))
    return ckpt


def test_checkpoint_paths_best_k_and_last_k(checkpoints: ModelCheckpoint) -> None:
    scores = {p: float(s) for p, s in checkpoints.best_k_models.items()}
    best = model_checkpoint_paths(checkpoints, k=2, which="best")
    assert best == sorted(scores, key=scores.get)[:2]
    last = model_checkpoint_paths(checkpoints, k=2, which="last")
    assert [Path(p).name for p in last] == ["epoch=3-step=24.ckpt", "epoch=2-step=18.ckpt"]
    with pytest.raises(ValueError, match="which must be"):
        model_checkpoint_paths(checkpoints, which="worst")


def test_checkpoint_ensemble_evaluates_members_and_mean_softmax(checkpoints: ModelCheckpoint) -> None:
    ens = CheckpointEnsemble.from_model_checkpoint(_make, checkpoints, k=3, which="last")
    loader = _loader(32)
    got = ens.evaluate(loader)
    assert set(got) == {f"member_{i}/{m}" for i in range(3) for m in ("acc", "nll")} | {"ensemble/acc", "ensemble/nll"}
    x, y = next(iter(_loader(96)))
    # each member as a plain model with the checkpoint's EMA weights (the default when an EMA state is there)
    logits = []
    for state in ens.states:
        model = _make().eval()
        model.load_state_dict(state)
        with torch.no_grad():
            logits.append(model(x))
        i = len(logits) - 1
        assert got[f"member_{i}/acc"] == pytest.approx((logits[-1].argmax(1) == y).float().mean().item(), abs=1e-6)
        assert got[f"member_{i}/nll"] == pytest.approx(F.cross_entropy(logits[-1], y).item(), abs=1e-5)
    probs = mean_softmax(logits)
    torch.testing.assert_close(ens.predict_proba(x), probs)
    assert torch.equal(ens.predict(x), probs.argmax(1))
    assert got["ensemble/acc"] == pytest.approx((probs.argmax(1) == y).float().mean().item(), abs=1e-6)
    assert got["ensemble/nll"] == pytest.approx(F.nll_loss(probs.log(), y).item(), abs=1e-5)


def test_checkpoint_ensemble_uses_the_ema_average_unless_told_not_to(checkpoints: ModelCheckpoint) -> None:
    path = model_checkpoint_paths(checkpoints, k=1, which="last")[0]
    ckpt = torch.load(path, weights_only=False)
    (ema_state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("EMA")]
    averaged = CheckpointEnsemble(_make, [path]).states[0]
    raw = CheckpointEnsemble(_make, [path], use_average=False).states[0]
    name = "net.head.0.weight"
    assert torch.equal(averaged[name], ema_state["average"][name])
    assert torch.equal(averaged[name], ckpt["state_dict"][name])  # the weights its validation ran on
    assert torch.equal(raw[name], raw_state_dict(ckpt)[name])
    assert not torch.equal(averaged[name], raw[name])


def test_evaluate_members_restores_the_module_and_checks_batch_order() -> None:
    module = _make()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    states = [_make().state_dict(), _make().state_dict()]
    out = evaluate_members(module, states, lambda: iter(_loader(32)))
    assert len(out["members"]) == 2 and set(out["ensemble"]) == {"acc", "nll"}
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k])
    flips = iter([False, True])

    def shuffled() -> Any:
        g = torch.Generator().manual_seed(int(next(flips)))
        return iter(DataLoader(_loader().dataset, batch_size=32, shuffle=True, generator=g))

    with pytest.raises(RuntimeError, match="same batches in the same order"):
        evaluate_members(module, states, shuffled)
    with pytest.raises(FileNotFoundError):
        CheckpointEnsemble.from_checkpoints(_make, ["/nonexistent.ckpt"])


def test_snapshot_config_composes_and_instantiates() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="callbacks/snapshot_ensemble")
    snap = instantiate(cfg.callbacks.snapshot_ensemble)
    assert isinstance(snap, SnapshotEnsemble) and snap.cycles == 4 and snap.keep == "memory"


def test_checkpoint_ensemble_refuses_a_diverged_member(tmp_path):
    from torch import nn

    from lightning_tricks.ensemble import CheckpointEnsemble

    good, bad = nn.Linear(4, 3).state_dict(), nn.Linear(4, 3).state_dict()
    bad["bias"][1] = float("nan")
    torch.save({"state_dict": bad}, tmp_path / "diverged.ckpt")
    with pytest.raises(ValueError, match=r"member .*diverged.ckpt has non-finite weights \(bias\)"):
        CheckpointEnsemble(nn.Linear(4, 3), [good, str(tmp_path / "diverged.ckpt")])
    assert len(CheckpointEnsemble(nn.Linear(4, 3), [good, good])) == 2


def test_checkpoint_ensemble_refuses_a_checkpoint_of_another_shape_when_built(
    checkpoints: ModelCheckpoint, tmp_path: Path
) -> None:
    good = model_checkpoint_paths(checkpoints, k=1, which="last")[0]
    seed_everything(0)
    wider = Classifier(MLP((8,), 3, hidden=(32,)), 3, {"name": "sgd", "lr": 0.2})
    trainer = _trainer([], max_epochs=1, limit_train_batches=2)
    trainer.fit(wider, _loader())
    other = tmp_path / "wider.ckpt"
    trainer.save_checkpoint(other)
    with pytest.raises(ValueError) as refused:
        CheckpointEnsemble(_make, [good, str(other)])
    message = str(refused.value)
    assert message == (
        f"CheckpointEnsemble member {other} does not fit the template: 'net.backbone.1.weight' has shape "
        "(32, 8) in the file, (16, 8) in the model"
    )
    # a file of another architecture: the first tensor the template has and the file lacks
    torch.save({"state_dict": {"net.backbone.1.weight": torch.zeros(16, 8)}}, tmp_path / "partial.ckpt")
    with pytest.raises(
        ValueError,
        match=r"partial.ckpt does not fit the template: the file has no 'net.backbone.2.weight' \(16,\), which",
    ):
        CheckpointEnsemble(_make(), [str(tmp_path / "partial.ckpt")])
    assert len(CheckpointEnsemble(_make, [good, good])) == 2


def test_checkpoint_ensemble_refuses_a_real_checkpoint_with_nan_weights(
    checkpoints: ModelCheckpoint, tmp_path: Path
) -> None:
    good = model_checkpoint_paths(checkpoints, k=1, which="last")[0]
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["state_dict"]["net.head.0.weight"][0, 0] = float("nan")
    diverged = tmp_path / "diverged.ckpt"
    torch.save(checkpoint, diverged)
    with pytest.raises(ValueError) as refused:
        CheckpointEnsemble(_make, [good, str(diverged)])
    assert "\n" not in str(refused.value)
    assert str(refused.value).startswith(
        f"CheckpointEnsemble member {diverged} has non-finite weights (net.head.0.weight)"
    )
