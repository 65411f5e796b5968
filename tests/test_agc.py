"""Adaptive gradient clipping: the core against a per-unit reference loop, the callback in tiny Trainers."""

from __future__ import annotations

import importlib
import math
import pickle

import pytest
import torch
from torch import nn

from lightning_tricks._lightning import Callback, ModelCheckpoint, Trainer, namespace_of, seed_everything
from lightning_tricks.callbacks import AGC, L1Regularization
from lightning_tricks.clipping import AdaptiveClipper, adaptive_clip_, clip_factors, unit_norms
from lightning_tricks.data import DigitsDataModule
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP


# ------------------------------------------------------------------------------------------------
# the reference: the paper's rule written out unit by unit
# ------------------------------------------------------------------------------------------------
def reference_agc(weight: torch.Tensor, grad: torch.Tensor, clipping: float, eps: float = 1e-3) -> torch.Tensor:
    """Plain loop: units are the slices along dim 0 (ndim >= 2) or the whole tensor (ndim <= 1)."""
    w, g = weight.double(), grad.double().clone()
    units = range(w.shape[0]) if w.ndim >= 2 else [None]
    for i in units:
        wi, gi = (w, g) if i is None else (w[i], g[i])
        w_norm = max(math.sqrt(float((wi * wi).sum())), eps)
        g_norm = math.sqrt(float((gi * gi).sum()))
        if g_norm / w_norm > clipping:
            factor = clipping * w_norm / g_norm
            if i is None:
                g = g * factor
            else:
                g[i] = g[i] * factor
    return g.to(grad.dtype)


def _params(seed: int = 0) -> list[nn.Parameter]:
    """Conv (two of the same shape: the stacked path), linear (one of its shape: the view path), biases, a scalar."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3, 3, 3), (4, 3, 3, 3), (5, 7), (4,), (5,), ()]
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    with torch.no_grad():
        params[2][1].zero_()  # a zero-weight unit: the eps floor decides
        params[4].mul_(1e-4)  # a tiny bias: clipped against eps
    for p in params:
        g = torch.randn(p.shape, generator=gen)
        # units with very different gradient scales, so that some are clipped and some are not
        scale = torch.logspace(-4, 0, p.shape[0]).reshape(-1, *[1] * (p.ndim - 1)) if p.ndim >= 2 else 0.002
        p.grad = g * scale
    return params


@pytest.mark.parametrize("clipping", [0.01, 0.1])
def test_clipper_equals_the_per_unit_reference_loop(clipping):
    params = _params()
    expected = [reference_agc(p.detach(), p.grad, clipping) for p in params]
    units_clipped = sum(
        int(not torch.equal(e, p.grad)) if p.ndim < 2 else int((~(e == p.grad).all(dim=tuple(range(1, p.ndim)))).sum())
        for e, p in zip(expected, params)
    )
    assert 0 < units_clipped < sum(p.shape[0] if p.ndim >= 2 else 1 for p in params)  # a mix of both cases
    clipper = AdaptiveClipper(params)
    count = clipper.clip_(clipping)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-7)
    assert int(count) == units_clipped


def test_one_shot_function_equals_the_reference_and_skips_missing_grads():
    params = _params(1)
    params[3].grad = None
    expected = [None if p.grad is None else reference_agc(p.detach(), p.grad, 0.01) for p in params]
    adaptive_clip_(params, [p.grad for p in params], clipping=0.01)
    for p, e in zip(params, expected):
        if e is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-7)


def test_clipper_skips_parameters_without_grad_and_clips_the_rest():
    params = _params(2)
    params[0].grad = None
    expected = [None if p.grad is None else reference_agc(p.detach(), p.grad, 0.05) for p in params]
    AdaptiveClipper(params).clip_(0.05)
    assert params[0].grad is None
    for p, e in zip(params[1:], expected[1:]):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-7)


def test_after_clipping_every_unit_is_within_the_bound():
    params = _params(3)
    AdaptiveClipper(params).clip_(0.02)
    for p in params:
        ratio = unit_norms(p.grad) / unit_norms(p.detach()).clamp_min(1e-3)
        assert float(ratio.max()) <= 0.02 * (1 + 1e-5)


def test_scaled_gradients_with_grad_scale_are_clipped_like_the_true_ones():
    scale = 1024.0
    params = _params(4)
    expected = [reference_agc(p.detach(), p.grad, 0.01) * scale for p in params]
    for p in params:
        p.grad = p.grad * scale
    AdaptiveClipper(params).clip_(0.01, grad_scale=torch.tensor(scale))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-5)


def test_non_finite_gradients_stay_non_finite():
    w = nn.Parameter(torch.ones(2, 3))
    w.grad = torch.tensor([[math.inf, 1.0, 1.0], [math.nan, 0.0, 0.0]])
    AdaptiveClipper([w]).clip_(0.01)
    assert not torch.isfinite(w.grad[0]).all() and not torch.isfinite(w.grad[1]).all()


def test_clip_factors_formula():
    factor, clipped = clip_factors(torch.tensor([1.0, 0.001, 0.5]), torch.tensor([5.0, 1.0, 0.0]), 0.01)
    # 1/5 > 0.01: 0.01*5/1; 0.001/1 = 0.001 <= 0.01: kept; ||W||=0 -> eps: 0.5/1e-3 > 0.01: 0.01*1e-3/0.5
    torch.testing.assert_close(factor, torch.tensor([0.05, 1.0, 2e-5]))
    assert clipped.tolist() == [True, False, True]


def test_low_precision_gradients_are_clipped_in_float32():
    params = _params(5)
    expected = [reference_agc(p.detach(), p.grad, 0.01) for p in params]
    half = [nn.Parameter(p.detach().bfloat16()) for p in params]
    for h, p in zip(half, params):
        h.grad = p.grad.bfloat16()
    AdaptiveClipper(half).clip_(0.01)
    for h, e in zip(half, expected):
        assert h.grad.dtype == torch.bfloat16
        torch.testing.assert_close(h.grad.float(), e, rtol=2e-2, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# bad configuration: one line naming the value
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clipping": 0.0}, r"^clipping must be a finite number > 0 .*, got 0\.0$"),
        ({"clipping": -0.5}, r"^clipping must be a finite number > 0 .*, got -0\.5$"),
        ({"clipping": math.nan}, r"^clipping must be .*, got nan$"),
        ({"clipping": True}, r"^clipping must be .*, got True$"),
        ({"eps": 0}, r"^eps must be a finite number > 0 .*, got 0$"),
        ({"exclude": 3}, r"^exclude must be None .*, got 3$"),
        ({"log_clipped_fraction": "yes"}, r"^log_clipped_fraction must be a bool, got 'yes'$"),
    ],
)
def test_bad_arguments_fail_with_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        AGC(**kwargs)
    assert "\n" not in str(info.value)


def test_unknown_module_name_in_exclude_fails_at_setup(tmp_path):
    with pytest.raises(ValueError, match=r"no module named \['net.nope'\]") as info:
        _fit([AGC(exclude=["net.nope"])], tmp_path, steps=1)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------
# the callback in a Trainer
# ------------------------------------------------------------------------------------------------
class _Recorder(Classifier):
    """Records the gradients after every backward pass and, in a step post-hook, the ones the update used."""

    def __init__(self, *args, fused: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fused = fused
        self.after_backward: list[dict[str, torch.Tensor]] = []
        self.post: list[dict[str, torch.Tensor]] = []

    def configure_optimizers(self):
        if self.fused:
            return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)
        return super().configure_optimizers()

    def _grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}

    def on_after_backward(self) -> None:
        self.after_backward.append(self._grads())

    def on_train_start(self) -> None:
        for opt in self.trainer.optimizers:
            opt.register_step_post_hook(lambda *args: self.post.append(self._grads()))


class _Pre(Callback):
    """Records the gradients in ``on_before_optimizer_step`` (AGC clips later, inside ``optimizer.step()``)."""

    def __init__(self) -> None:
        self.pre: list[dict[str, torch.Tensor]] = []
        self.scales: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.pre.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(1.0 if scaler is None else float(scaler.get_scale()))


def _module(fused: bool = False, lr: float = 0.05) -> _Recorder:
    seed_everything(0)
    return _Recorder(
        MLP((1, 8, 8), 10, hidden=(16,), norm="none", dropout=0.0), 10, {"name": "sgd", "lr": lr}, fused=fused
    )


def _fit(callbacks, tmp_path, steps=3, accumulate=1, module=None, plugins=None, epochs=1, ckpt_path=None, save=False):
    module = module if module is not None else _module()
    dm = DigitsDataModule(batch_size=32, loader="resident")
    extra = (
        [ModelCheckpoint(dirpath=tmp_path, filename="e{epoch}", save_top_k=-1, auto_insert_metric_name=False)]
        if save
        else []
    )
    trainer = Trainer(
        max_epochs=epochs,
        limit_train_batches=steps * accumulate,
        limit_val_batches=0,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=save,
        callbacks=[*callbacks, *extra],
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        plugins=plugins,
    )
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer, module


def _check_clipped(pre, post, weights_before, clipping, excluded=("net.head.0.weight", "net.head.0.bias"), scale=1.0):
    for name, g in pre.items():
        if name in excluded:
            assert torch.equal(post[name], g), f"{name} is excluded but its gradient changed"
        else:
            expected = reference_agc(weights_before[name], g / scale, clipping) * scale
            torch.testing.assert_close(post[name], expected, rtol=1e-5, atol=1e-7, msg=name)


class _Weights(Callback):
    """The weights at each ``on_before_optimizer_step`` (the ones AGC compares against)."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def test_clips_once_per_optimizer_step_on_the_accumulated_gradient(tmp_path):
    pre, weights, agc = _Pre(), _Weights(), AGC(clipping=0.01)
    trainer, module = _fit([agc, pre, weights], tmp_path, steps=3, accumulate=2)
    assert trainer.global_step == 3
    assert len(module.after_backward) == 6  # two micro-batches per step
    assert len(pre.pre) == len(module.post) == 3  # the hook, and AGC, once per optimizer step
    assert agc.excluded == ["net.head.0"]  # the last nn.Linear by default
    for k in range(3):
        accumulated = module.after_backward[2 * k + 1]  # after the step's second backward: nothing clipped yet
        for name, g in pre.pre[k].items():
            assert torch.equal(g, accumulated[name])
        _check_clipped(pre.pre[k], module.post[k], weights.weights[k], 0.01)
    # and the clipping did something on the clipped layers
    assert not torch.equal(pre.pre[0]["net.backbone.1.weight"], module.post[0]["net.backbone.1.weight"])


def test_explicit_exclude_and_empty_exclude(tmp_path):
    pre, weights = _Pre(), _Weights()
    agc = AGC(clipping=0.01, exclude=["net.backbone.1"])
    _, module = _fit([agc, pre, weights], tmp_path / "a", steps=1)
    _check_clipped(
        pre.pre[0], module.post[0], weights.weights[0], 0.01, excluded=("net.backbone.1.weight", "net.backbone.1.bias")
    )
    assert "net.head.0.weight" in agc.names and "net.backbone.1.weight" not in agc.names
    pre, weights, agc = _Pre(), _Weights(), AGC(clipping=0.01, exclude=[])
    _, module = _fit([agc, pre, weights], tmp_path / "b", steps=1)
    _check_clipped(pre.pre[0], module.post[0], weights.weights[0], 0.01, excluded=())


def test_under_16_mixed_agc_sees_the_unscaled_gradients(tmp_path):
    MixedPrecision = importlib.import_module(f"{namespace_of(Trainer)}.plugins.precision").MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))
    pre, weights = _Pre(), _Weights()
    _, module = _fit([AGC(clipping=0.01), pre, weights], tmp_path, steps=2, plugins=[plugin])
    assert pre.scales[0] == 1024.0  # a real scale, but MixedPrecision unscaled before the hooks
    raw = module.after_backward[0]["net.backbone.1.weight"]
    torch.testing.assert_close(pre.pre[0]["net.backbone.1.weight"] * 1024.0, raw)
    for k in range(len(pre.pre)):
        _check_clipped(pre.pre[k], module.post[k], weights.weights[k], 0.01)


def test_under_16_mixed_with_a_fused_optimizer_the_scale_is_used(tmp_path):
    MixedPrecision = importlib.import_module(f"{namespace_of(Trainer)}.plugins.precision").MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))
    pre, weights = _Pre(), _Weights()
    _, module = _fit(
        [AGC(clipping=0.01), pre, weights], tmp_path, steps=2, plugins=[plugin], module=_module(fused=True)
    )
    assert pre.scales[0] == 1024.0
    # the fused optimizer unscales inside step(): the hooks see scaled gradients
    torch.testing.assert_close(pre.pre[0]["net.backbone.1.weight"], module.after_backward[0]["net.backbone.1.weight"])
    for k in range(len(pre.pre)):  # the fused step unscales the gradients in place: post holds the true ones
        used = {n: g * pre.scales[k] for n, g in module.post[k].items()}
        _check_clipped(pre.pre[k], used, weights.weights[k], 0.01, scale=pre.scales[k])


def test_l1_is_clipped_with_the_loss_gradient_in_either_callback_order(tmp_path):
    ends = []
    for order in ("l1-agc", "agc-l1"):
        l1, agc, pre, weights = L1Regularization(lam=1e-3, mode="subgradient"), AGC(clipping=0.01), _Pre(), _Weights()
        callbacks = [l1, agc, pre, weights] if order == "l1-agc" else [agc, pre, l1, weights]
        trainer, module = _fit(callbacks, tmp_path / order, steps=3)
        # AGC runs after L1's term was added: the clipped gradient is the clip of (loss grad + lam * sign(w))
        for k in range(3):
            with_l1 = {
                n: g + (1e-3 * weights.weights[k][n].sign() if n.endswith("weight") else 0)
                for n, g in module.after_backward[k].items()
            }
            _check_clipped(with_l1, module.post[k], weights.weights[k], 0.01)
        ends.append({n: p.detach().clone() for n, p in module.named_parameters()})
    for name in ends[0]:
        assert torch.equal(ends[0][name], ends[1][name]), f"{name} depends on the callback order"


def test_agc_clips_what_the_trainer_gradient_clipping_left(tmp_path):
    """AGC runs inside ``optimizer.step()``, after ``gradient_clip_val`` (Lightning's norm clipping): the
    update gets AGC of the norm-clipped gradient, so both bounds hold."""

    class _Clipped(_Recorder):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self.before_trainer_clip = self._grads()
            super().configure_gradient_clipping(optimizer, 0.05, "norm")
            self.after_trainer_clip = self._grads()

    seed_everything(0)
    module = _Clipped(MLP((1, 8, 8), 10, hidden=(16,), norm="none", dropout=0.0), 10, {"name": "sgd", "lr": 0.05})
    pre, weights = _Pre(), _Weights()
    _fit([AGC(clipping=0.01), pre, weights], tmp_path, steps=1, module=module)
    assert all(torch.equal(pre.pre[0][n], g) for n, g in module.before_trainer_clip.items())
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in pre.pre[0].values()]))
    assert norm > 0.05  # the Trainer's clipping acts
    _check_clipped(module.after_trainer_clip, module.post[0], weights.weights[0], 0.01)
    final = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in module.post[0].values()]))
    assert final <= 0.05 + 1e-6


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_stateless_pickles_and_resumes_exactly(tmp_path):
    agc = AGC(clipping=0.01)
    pickle.loads(pickle.dumps(agc))
    full_trainer, full = _fit([agc], tmp_path / "full", steps=3, epochs=2, save=True)
    assert agc.state_dict() == {}
    clone = pickle.loads(pickle.dumps(agc))
    assert clone.clipping == 0.01 and clone.excluded == ["net.head.0"]
    resumed_cb = AGC(clipping=0.01)
    ckpt = str(tmp_path / "full" / "e0.ckpt")
    resumed_trainer, resumed = _fit([resumed_cb], tmp_path / "resumed", steps=3, epochs=2, ckpt_path=ckpt)
    assert resumed_trainer.global_step == full_trainer.global_step == 6
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


def test_agc_changes_training(tmp_path):
    _, plain = _fit([], tmp_path / "plain", steps=3)
    _, clipped = _fit([AGC(clipping=0.01)], tmp_path / "agc", steps=3)
    assert not torch.equal(plain.net.backbone[1].weight, clipped.net.backbone[1].weight)


def test_config_builds_the_callback():
    from conftest import compose_train
    from hydra.utils import instantiate

    cfg = compose_train(["+callbacks=agc"])
    agc = instantiate(cfg.callbacks.agc)
    assert isinstance(agc, AGC) and agc.clipping == 0.01 and agc.eps == 1e-3 and agc.exclude is None
