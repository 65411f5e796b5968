"""L1 regularization: parameter selection, the penalty, the sign-gradient update and its callback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks._lightning import LightningModule, Trainer
from lightning_tricks.callbacks import L1Regularization
from lightning_tricks.regularize import add_l1_grad_, l1_penalty, select_parameters, soft_threshold_

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


# -- pure core --------------------------------------------------------------------------------


def test_select_parameters_skips_bias_and_norm_and_filters_by_regex():
    net = _net()
    assert [n for n, _ in select_parameters(net)] == ["0.weight", "3.weight"]
    assert [n for n, _ in select_parameters(net, include=r"^3\.")] == ["3.weight"]
    assert [n for n, _ in select_parameters(net, include=["^0", "^1"], exclude_bias=False)] == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
    ]
    net[0].weight.requires_grad_(False)
    assert [n for n, _ in select_parameters(net)] == ["3.weight"]
    assert [n for n, _ in select_parameters(net, trainable_only=False)] == ["0.weight", "3.weight"]
    with pytest.raises(ValueError, match="include has an invalid regex"):
        select_parameters(net, include="(")


def test_l1_penalty_and_its_gradient():
    net = _net()
    lam = 0.01
    penalty = l1_penalty(net, lam)
    expected = lam * (net[0].weight.abs().sum() + net[3].weight.abs().sum())
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    torch.testing.assert_close(net[0].weight.grad, lam * net[0].weight.sign())
    assert net[0].bias.grad is None
    with pytest.raises(ValueError, match="lam must be a number in \\[0, inf\\)"):
        l1_penalty(net, -1.0)
    with pytest.raises(ValueError, match="no parameters"):
        l1_penalty(net, 0.1, include="nothing")


def test_add_l1_grad_adds_lam_sign_and_skips_missing_grads():
    a = torch.tensor([1.5, -0.5, 0.0], requires_grad=True)
    b = torch.tensor([2.0], requires_grad=True)
    a.grad = torch.tensor([0.1, 0.1, 0.1])
    add_l1_grad_([a, b], 0.2)
    torch.testing.assert_close(a.grad, torch.tensor([0.3, -0.1, 0.1]))
    assert b.grad is None
    add_l1_grad_([a], 0.1, scale=torch.tensor(4.0))  # still-scaled AMP gradients
    torch.testing.assert_close(a.grad, torch.tensor([0.7, -0.5, 0.1]))


def test_soft_threshold_is_the_l1_proximal_operator():
    torch.manual_seed(0)
    ws = [torch.randn(7, 5), torch.randn(11)]
    expected = [w.sign() * (w.abs() - 0.3).clamp_min(0) for w in ws]
    ptrs = [w.data_ptr() for w in ws]
    soft_threshold_(ws, 0.3)
    for w, e in zip(ws, expected):
        assert torch.equal(w, e)
    assert [w.data_ptr() for w in ws] == ptrs  # in place
    before = [w.clone() for w in ws]
    soft_threshold_(ws, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(ws, before))
    with pytest.raises(ValueError, match="threshold must be a number in \\[0, inf\\), got -0.1"):
        soft_threshold_(ws, -0.1)


# -- callback -------------------------------------------------------------------------------------


class Tiny(LightningModule):
    def __init__(self, penalty: float = 0.0, include=None) -> None:
        super().__init__()
        self.net = _net()
        self.penalty = penalty
        self.include = include

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.penalty:
            loss = loss + l1_penalty(self, self.penalty, include=self.include)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _fit(module: LightningModule, callbacks=(), **kwargs) -> LightningModule:
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(16, 5), torch.randint(0, 3, (16,)))
    settings = dict(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer = Trainer(callbacks=list(callbacks), **{**settings, **kwargs})
    trainer.fit(module, DataLoader(data, batch_size=8))
    return module


@pytest.mark.parametrize("include", [None, r"net\.3\."])
def test_l1_callback_step_equals_l1_penalty_in_the_loss(include):
    lam = 0.05
    start = Tiny().net.state_dict()
    with_callback = _fit(Tiny(), [L1Regularization(lam, include=include, mode="subgradient")])
    with_penalty = _fit(Tiny(penalty=lam, include=include))
    plain = _fit(Tiny())
    for name, w in with_callback.net.state_dict().items():
        torch.testing.assert_close(w, with_penalty.net.state_dict()[name], rtol=0, atol=1e-6)
    moved = with_callback.net[3].weight - plain.net[3].weight
    torch.testing.assert_close(moved, -0.5 * lam * start["3.weight"].sign(), rtol=0, atol=1e-6)
    if include is not None:  # the first layer is not regularized
        assert torch.equal(with_callback.net[0].weight, plain.net[0].weight)


def test_l1_callback_with_gradient_accumulation_and_clipping():
    lam = 0.05
    kwargs = dict(accumulate_grad_batches=2, gradient_clip_val=0.5, max_steps=2)
    with_callback = _fit(Tiny(), [L1Regularization(lam, mode="subgradient")], **kwargs)
    with_penalty = _fit(Tiny(penalty=lam), **kwargs)
    for name, w in with_callback.net.state_dict().items():
        torch.testing.assert_close(w, with_penalty.net.state_dict()[name], rtol=0, atol=1e-6)


def test_l1_callback_rejects_bad_arguments_and_empty_selection():
    with pytest.raises(ValueError, match="lam must be a number in \\[0, inf\\), got -0.1"):
        L1Regularization(-0.1)
    with pytest.raises(ValueError, match="include has an invalid regex"):
        L1Regularization(0.1, include="[")
    with pytest.raises(ValueError, match="matched no parameter"):
        _fit(Tiny(), [L1Regularization(0.1, include="no_such_layer")])


def test_l1_yaml_composes_and_instantiates():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="callbacks/l1_regularization")
    cb = instantiate(cfg.callbacks.l1_regularization)
    assert isinstance(cb, L1Regularization) and cb.lam == 1e-5 and cb.exclude_bias and cb.mode == "proximal"


class TwoGroups(Tiny):
    def configure_optimizers(self):
        return torch.optim.SGD(
            [{"params": self.net[0].parameters(), "lr": 0.5}, {"params": self.net[3].parameters(), "lr": 0.1}],
            lr=0.5,
            momentum=0.9,
        )


def _ista_reference(module: Tiny, lam: float, steps: int) -> Tiny:
    """The proximal-gradient loop by hand: optimizer step on the loss alone, then soft-threshold by lr * lam."""
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(16, 5), torch.randint(0, 3, (16,)))
    opt = module.configure_optimizers()
    chosen = {id(p) for _, p in select_parameters(module)}
    batches = list(DataLoader(data, batch_size=8))
    module.train()
    for x, y in batches[:steps]:
        opt.zero_grad()
        F.cross_entropy(module.net(x), y).backward()
        opt.step()
        with torch.no_grad():
            for g in opt.param_groups:
                for p in g["params"]:
                    if id(p) in chosen:
                        p.copy_(torch.nn.functional.softshrink(p, g["lr"] * lam))
    return module


@pytest.mark.parametrize("cls", [Tiny, TwoGroups])
def test_l1_proximal_callback_equals_the_ista_loop(cls):
    lam = 0.02
    with_callback = _fit(cls(), [L1Regularization(lam)], max_steps=2)
    reference = _ista_reference(cls(), lam, steps=2)
    for name, w in with_callback.net.state_dict().items():
        torch.testing.assert_close(w, reference.net.state_dict()[name], rtol=0, atol=1e-6, msg=name)
    plain = _fit(cls(), max_steps=2)
    assert (with_callback.net[0].weight - plain.net[0].weight).abs().max() > 1e-3  # not a no-op


def test_l1_proximal_callback_makes_exact_zeros_and_pickles():
    import pickle

    cb = L1Regularization(0.2)
    module = _fit(Tiny(), [cb], max_steps=2)
    zeros = (module.net[0].weight == 0).float().mean().item()
    assert zeros > 0.3, zeros  # threshold 0.5 * 0.2 = 0.1 per step
    assert (_fit(Tiny(), max_steps=2).net[0].weight == 0).sum() == 0
    assert cb._handles == []  # the step hooks are removed at the end of fit
    clone = pickle.loads(pickle.dumps(cb))
    assert clone.mode == "proximal" and clone.lam == 0.2


def test_l1_mode_is_checked():
    with pytest.raises(ValueError, match="mode must be one of \\('proximal', 'subgradient'\\), got 'prox'"):
        L1Regularization(0.1, mode="prox")
