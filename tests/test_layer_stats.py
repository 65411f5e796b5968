"""LayerStats: the statistics against hand-computed values, the hooks' life cycle, the files, TensorBoard."""

from __future__ import annotations

import csv
import math
import pickle
import statistics

import pytest
import torch
from torch import nn

from lightning_tricks._lightning import Callback, TensorBoardLogger, Trainer, seed_everything
from lightning_tricks.callbacks import GradNormMonitor, LayerStats
from lightning_tricks.data import DigitsDataModule
from lightning_tricks.layer_stats import (
    COLUMNS,
    ActivationRecorder,
    activation_stats,
    layer_norms,
    measure,
    plot_histograms,
    select_layers,
    subsample,
    write_csv,
)
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP

# ------------------------------------------------------------------------------------------------
# a fixed tiny net and batch, computed by hand
# ------------------------------------------------------------------------------------------------
X = [[1.0, -1.0], [2.0, 3.0], [-1.0, 0.5], [0.0, 2.0]]
# Linear(2, 3) with W0 = [[1, 0], [0, 1], [1, 1]], b0 = [0, 0, -100]: unit 2 is -100 + x1 + x2 < 0 always
LINEAR0_OUT = [[1.0, -1.0, -100.0], [2.0, 3.0, -95.0], [-1.0, 0.5, -100.5], [0.0, 2.0, -98.0]]
RELU_OUT = [[1.0, 0.0, 0.0], [2.0, 3.0, 0.0], [0.0, 0.5, 0.0], [0.0, 2.0, 0.0]]  # unit 2 dead
# Linear(3, 2) with W1 = [[1, -1, 2], [0.5, 0.5, 0.5]], b1 = [0.1, -0.2]; loss = sum of outputs:
# W1.grad[j] = column sums of RELU_OUT = [3, 5.5, 0] for both rows, b1.grad = [4, 4]
HEAD_GRAD_NORM = math.sqrt(2 * (3.0**2 + 5.5**2) + 2 * 4.0**2)


def _net() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, 0.0, -100.0]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.5, 0.5]]))
        net[2].bias.copy_(torch.tensor([0.1, -0.2]))
    return net


def _flat(rows: list[list[float]]) -> list[float]:
    return [v for row in rows for v in row]


def _expected(rows: list[list[float]]) -> tuple[float, float, float]:
    values = _flat(rows)
    return statistics.fmean(values), statistics.pstdev(values), sum(v == 0 for v in values) / len(values)


def test_layers_are_parameterized_modules_and_activations():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Dropout(), nn.Flatten(), nn.Linear(2, 2))
    net[5].weight.requires_grad_(False)
    layers = select_layers(net)
    assert [(layer.name, layer.kind, layer.dead_units, len(layer.params)) for layer in layers] == [
        ("0", "Conv2d", False, 2),
        ("1", "BatchNorm2d", False, 2),
        ("2", "ReLU", True, 0),
        ("5", "Linear", False, 1),  # the frozen weight has no gradient to measure
    ]


def test_statistics_equal_hand_computed_values():
    net = _net()
    recorder = ActivationRecorder(select_layers(net), max_values=100)
    recorder.start()
    net(torch.tensor(X)).sum().backward()
    recorder.stop()
    result = measure(recorder, step=7, epoch=1)
    rows = {row["layer"]: row for row in result.rows}
    assert list(rows) == ["0", "1", "2"]

    mean, std, zero = _expected(LINEAR0_OUT)
    r = rows["0"]
    assert (r["step"], r["epoch"], r["type"], r["calls"]) == (7, 1, "Linear", 1)
    assert r["act_mean"] == pytest.approx(mean, rel=1e-6)
    assert r["act_std"] == pytest.approx(std, rel=1e-6)
    assert r["act_zero_frac"] == pytest.approx(zero) == 1 / 12
    assert r["dead_frac"] is None  # not a ReLU: a zero does not mean "off"

    mean, std, zero = _expected(RELU_OUT)
    r = rows["1"]
    assert r["act_mean"] == pytest.approx(mean, rel=1e-6) == 8.5 / 12
    assert r["act_std"] == pytest.approx(std, rel=1e-6)
    assert r["act_zero_frac"] == pytest.approx(zero) == 7 / 12
    assert r["dead_frac"] == pytest.approx(1 / 3)  # unit 2 is zero for every sample
    assert r["grad_norm"] is None and r["weight_norm"] is None  # no parameters

    for name, module in (("0", net[0]), ("2", net[2])):
        grads = torch.cat([module.weight.grad.flatten(), module.bias.grad.flatten()])
        weights = torch.cat([module.weight.detach().flatten(), module.bias.detach().flatten()])
        assert rows[name]["grad_norm"] == pytest.approx(float(torch.linalg.vector_norm(grads)), rel=1e-6)
        assert rows[name]["weight_norm"] == pytest.approx(float(torch.linalg.vector_norm(weights)), rel=1e-6)
    assert rows["2"]["grad_norm"] == pytest.approx(HEAD_GRAD_NORM, rel=1e-6)
    # histogram samples: the whole (small) outputs and gradients, on the host
    assert result.activations["1"].tolist() == _flat(RELU_OUT)
    assert result.gradients["2"].tolist() == [3.0, 5.5, 0.0, 3.0, 5.5, 0.0, 4.0, 4.0]
    assert result.activations["1"].device.type == "cpu"


def test_hooks_are_removed_and_do_not_change_the_output():
    net = _net()
    before = net(torch.tensor(X))
    recorder = ActivationRecorder(select_layers(net))
    recorder.start()
    assert all(len(m._forward_hooks) == 1 for m in net)
    during = net(torch.tensor(X))
    recorder.stop()
    assert all(len(m._forward_hooks) == 0 for m in net)
    assert torch.equal(before, during)
    net(torch.tensor(X))  # not recorded any more
    assert recorder.calls == [1, 1, 1]


def test_a_module_called_twice_gets_the_mean_of_its_calls():
    relu = nn.ReLU()
    recorder = ActivationRecorder(select_layers(nn.Sequential(relu)), max_values=100)
    recorder.start()
    a, b = torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([[2.0, 2.0], [0.0, 0.0]])
    relu(a), relu(b)
    recorder.stop()
    row = measure(recorder, step=0).rows[0]
    assert row["calls"] == 2
    assert row["act_mean"] == pytest.approx((1.0 + 1.0) / 2)
    assert row["act_std"] == pytest.approx((statistics.pstdev([1, 0, 3, 0]) + statistics.pstdev([2, 2, 0, 0])) / 2)
    assert row["dead_frac"] == pytest.approx((0.5 + 0.0) / 2)


def test_activation_stats_of_a_conv_output_count_channels():
    out = torch.zeros(2, 3, 2, 2)
    out[0, 0, 1, 1] = 4.0  # channel 0 fires once; channel 1 everywhere; channel 2 never
    out[:, 1] = 1.0
    stats = activation_stats(out, dead_units=True)
    values = out.flatten().tolist()
    assert stats.tolist() == pytest.approx(
        [statistics.fmean(values), statistics.pstdev(values), values.count(0.0) / 24, 1 / 3], rel=1e-6
    )


def test_layer_norms_combine_tensor_norms_and_mark_empty_layers():
    norms = layer_norms(torch.tensor([3.0, 4.0, 12.0]), torch.tensor([0, 0, 2]), 4)
    assert norms[0] == 5.0 and norms[2] == 12.0
    assert math.isnan(norms[1]) and math.isnan(norms[3])


def test_subsample_visits_every_column_and_copies():
    x = torch.arange(64 * 256, dtype=torch.float32).reshape(64, 256)
    s = subsample(x, 10_000)
    assert s.numel() <= 10_000
    assert len({int(v) % 256 for v in s.tolist()}) == 256  # a stride of 2 would see only the even features
    before = s.clone()
    x.zero_()
    assert torch.equal(s, before)


def test_csv_has_one_header_and_appends(tmp_path):
    path = tmp_path / "sub" / "stats.csv"
    row = dict.fromkeys(COLUMNS, 1.0) | {"dead_frac": None, "grad_norm": math.nan}
    write_csv(path, [row])
    write_csv(path, [row, row])
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and len(lines) == 4
    parsed = next(csv.DictReader(path.open()))
    assert parsed["dead_frac"] == "" and parsed["grad_norm"] == "nan"


def test_histogram_grid_is_a_png(tmp_path):
    path = plot_histograms([("a act", torch.randn(100)), ("a grad", torch.tensor([1.0, math.nan]))], tmp_path / "h.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# the callback in a tiny Trainer
# ------------------------------------------------------------------------------------------------
class _HookProbe(Callback):
    """Counts forward hooks at batch start and end; runs after LayerStats (later in the callback list)."""

    def __init__(self) -> None:
        self.at_start: list[tuple[int, int]] = []
        self.at_end: list[int] = []

    @staticmethod
    def _hooked(pl_module) -> int:
        return sum(bool(m._forward_hooks) for m in pl_module.modules())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.at_start.append((trainer.global_step, self._hooked(pl_module)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.at_end.append(self._hooked(pl_module))


def _fit(callbacks, tmp_path, batches=5, accumulate=1, logger=False):
    seed_everything(0)
    module = Classifier(MLP((1, 8, 8), 10, hidden=(16,), norm="classic"), 10, {"name": "sgd", "lr": 0.05})
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=0,
        accumulate_grad_batches=accumulate,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, DigitsDataModule(batch_size=32, loader="resident"))
    return trainer, module


def _csv_steps(path) -> list[int]:
    return [int(row["step"]) for row in csv.DictReader(open(path))]


def test_only_measured_steps_have_hooks_and_rows(tmp_path):
    stats, probe, grads = LayerStats(every_n_steps=2), _HookProbe(), GradNormMonitor(every_n_steps=2)
    trainer, module = _fit([stats, probe, grads], tmp_path, batches=4)
    num_layers = len(select_layers(module))  # Linear, BatchNorm1d, ReLU, head Linear
    assert num_layers == 4
    assert probe.at_start == [(0, num_layers), (1, 0), (2, num_layers), (3, 0)]
    assert probe.at_end == [0] * 4  # removed right after the measured batch
    assert all(not m._forward_hooks for m in module.modules())
    assert stats.measured_steps == [0, 2]
    # the run directory: no logger, so default_root_dir (CurvePlot's rule)
    assert stats.path == str(tmp_path / "layer_stats.csv")
    assert _csv_steps(stats.path) == [0] * num_layers + [2] * num_layers
    assert sorted(p.name for p in (tmp_path / "layer_stats").iterdir()) == ["step0000000.png", "step0000002.png"]
    # gradient norms per layer agree with GradNormMonitor's per-tensor norms at the same step (2)
    rows = {row["layer"]: row for row in stats.last.rows}
    for layer in ("net.backbone.1", "net.head.0"):
        per_tensor = [v for k, v in grads.last.items() if k.startswith(f"grad_norm/{layer}.")]
        assert rows[layer]["grad_norm"] == pytest.approx(math.sqrt(sum(v * v for v in per_tensor)), rel=1e-5)
    assert rows["net.backbone.3"]["dead_frac"] is not None and rows["net.backbone.3"]["grad_norm"] is None


def test_accumulation_counts_optimizer_steps(tmp_path):
    stats, probe = LayerStats(every_n_steps=2, histograms="none"), _HookProbe()
    trainer, _ = _fit([stats, probe], tmp_path, batches=6, accumulate=2)
    assert trainer.global_step == 3
    hooked = [(step, n > 0) for step, n in probe.at_start]
    # the first micro-batch of steps 0 and 2 is measured, nothing else
    assert hooked == [(0, True), (0, False), (1, False), (1, False), (2, True), (2, False)]
    assert stats.measured_steps == [0, 2]
    rows = list(csv.DictReader(open(stats.path)))
    assert {int(r["step"]) for r in rows} == {0, 2}
    assert all(r["grad_norm"] != "" for r in rows if r["type"] == "Linear")
    assert not (tmp_path / "layer_stats").exists()  # histograms="none"


def test_tensorboard_gets_histograms_and_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version="")
    stats = LayerStats(every_n_steps=2)
    _fit([stats], tmp_path, batches=3, logger=logger)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    histograms = events.Tags()["histograms"]
    for tag in ("layer_stats/act/net.backbone.1", "layer_stats/act/net.backbone.3", "layer_stats/grad/net.head.0"):
        assert tag in histograms, histograms
        assert [e.step for e in events.Histograms(tag)] == [0, 2]
    assert "layer_stats/dead_frac/net.backbone.3" in events.Tags()["scalars"]
    # the CSV is in the logger's log_dir; no PNG when TensorBoard has the histograms
    assert stats.path == str(tmp_path / "tb" / "layer_stats.csv")
    assert _csv_steps(stats.path)[::4] == [0, 2]
    assert not (tmp_path / "tb" / "layer_stats").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, r"^every_n_steps must be an int >= 1, got 0$"),
        ({"every_n_steps": -3}, r"^every_n_steps must be an int >= 1, got -3$"),
        ({"every_n_steps": 1.5}, r"^every_n_steps must be an int >= 1, got 1.5$"),
        ({"every_n_steps": True}, r"^every_n_steps must be an int >= 1, got True$"),
        ({"histograms": "svg"}, r"^histograms must be one of \('auto', .*\), got 'svg'$"),
        ({"max_values": 0}, r"^max_values must be an int >= 1, got 0$"),
        ({"filename": "stats.txt"}, r"^filename must end with .csv, got 'stats.txt'$"),
        ({"log_scalars": 1}, r"^log_scalars must be a bool, got 1$"),
    ],
)
def test_bad_arguments_fail_with_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        LayerStats(**kwargs)
    assert "\n" not in str(info.value)


def test_tensorboard_histograms_without_a_tensorboard_logger_fail_at_setup(tmp_path):
    with pytest.raises(ValueError, match="needs a TensorBoardLogger") as info:
        _fit([LayerStats(histograms="tensorboard")], tmp_path, batches=1)
    assert "\n" not in str(info.value)


def test_pickles_before_and_after_fit(tmp_path):
    stats = LayerStats(every_n_steps=2, histograms="none")
    pickle.loads(pickle.dumps(stats))
    _fit([stats], tmp_path, batches=3)
    clone = pickle.loads(pickle.dumps(stats))
    assert clone.measured_steps == [0, 2] and stats.state_dict() == {}


def test_the_entry_point_leaves_the_statistics_in_the_run_directory(make_cfg, tmp_path):
    from lightning_tricks.train import train

    cfg = make_cfg("+callbacks=[layer_stats,agc]", "callbacks.layer_stats.every_n_steps=4")
    _, objects = train(cfg)
    # trainer=debug: 2 epochs x 3 batches = 6 optimizer steps, measured at 0 and 4
    steps = _csv_steps(tmp_path / "layer_stats.csv")
    assert sorted(set(steps)) == [0, 4]
    assert sorted(p.name for p in (tmp_path / "layer_stats").glob("*.png")) == ["step0000000.png", "step0000004.png"]
    agc = next(c for c in objects["callbacks"] if type(c).__name__ == "AGC")
    assert agc.excluded == ["net.head.0"]


def test_curve_plot_asks_for_the_log_dir_on_every_rank(tmp_path):
    """``Trainer.log_dir`` broadcasts rank zero's value: a rank that skipped it would leave rank zero
    waiting in the broadcast (a hang under DDP). Every rank asks; only rank zero writes the PNG."""
    from types import SimpleNamespace

    from lightning_tricks.callbacks import CurvePlot

    asked = []

    class FakeTrainer(SimpleNamespace):
        @property
        def log_dir(self):
            asked.append(self.is_global_zero)
            return str(tmp_path)

    plot = CurvePlot()
    plot.epoch_metrics = {"val/acc": [(1, 0.5), (2, 0.7)]}
    for zero in (False, True):
        trainer = FakeTrainer(is_global_zero=zero, default_root_dir=str(tmp_path), current_epoch=2, global_step=8)
        plot.on_fit_end(trainer, nn.Linear(2, 2))
    assert asked == [False, True]
    assert (tmp_path / plot.filename).exists()
