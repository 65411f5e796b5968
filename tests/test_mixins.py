import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks.mixins import (
    OPTIMIZERS,
    Classifier,
    OptimizerConfig,
    build_optimizer,
    classification_loss,
    no_decay_parameter_names,
    param_groups_weight_decay,
)
from lightning_tricks.models import MLP, ResNet


def test_no_decay_names_are_exactly_biases_and_norm_params():
    net = ResNet((3, 8, 8), 10, widths=(4, 8), norm="classic")
    names = no_decay_parameter_names(net)
    expected = set()
    for mod_name, mod in net.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, nn.BatchNorm2d) or p_name == "bias":
                expected.add(full)
    assert names == expected
    # every BN weight/bias and the head bias are in; no conv or linear weight is
    assert "head.0.bias" in names
    assert not any(n.endswith("weight") and "conv" in n for n in names)
    assert all(p.ndim == 1 for n, p in net.named_parameters() if n in names)


def test_param_groups_split_and_switch():
    net = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2, bias=False))
    groups = param_groups_weight_decay(net, 0.1)
    by_name = {g["name"]: g for g in groups}
    assert [p.shape for p in by_name["decay"]["params"]] == [torch.Size([3, 4]), torch.Size([2, 3])]
    assert by_name["decay"]["weight_decay"] == 0.1
    assert len(by_name["no_decay"]["params"]) == 3 and by_name["no_decay"]["weight_decay"] == 0.0
    (single,) = param_groups_weight_decay(net, 0.1, no_decay_bias_norm=False)
    assert len(single["params"]) == 5 and single["weight_decay"] == 0.1
    net[0].weight.requires_grad_(False)
    assert sum(len(g["params"]) for g in param_groups_weight_decay(net, 0.1)) == 4


def test_no_decay_means_biases_do_not_shrink():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    opt = build_optimizer(net, {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.5})
    w0, b0 = net.weight.detach().clone(), net.bias.detach().clone()
    net.weight.grad = torch.zeros_like(net.weight)
    net.bias.grad = torch.zeros_like(net.bias)
    opt.step()
    torch.testing.assert_close(net.weight, w0 * (1 - 0.1 * 0.5))
    torch.testing.assert_close(net.bias, b0)


@pytest.mark.parametrize(
    "cfg, cls, check",
    [
        (
            {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
            torch.optim.SGD,
            {"lr": 0.1, "momentum": 0.9, "nesterov": True},
        ),
        ({"name": "sgd", "lr": 0.2, "momentum": 0.0}, torch.optim.SGD, {"momentum": 0.0, "nesterov": False}),
        ({"name": "adagrad", "lr": 0.05, "eps": 1e-10}, torch.optim.Adagrad, {"lr": 0.05, "eps": 1e-10}),
        (
            {"name": "rmsprop", "lr": 1e-3, "alpha": 0.9, "momentum": 0.5},
            torch.optim.RMSprop,
            {"alpha": 0.9, "momentum": 0.5},
        ),
        ({"name": "adam", "lr": 1e-3, "betas": [0.8, 0.99]}, torch.optim.Adam, {"betas": (0.8, 0.99)}),
        ({"name": "AdamW", "lr": 3e-3, "weight_decay": 0.05}, torch.optim.AdamW, {"lr": 3e-3}),
    ],
)
def test_each_optimizer_builds(cfg, cls, check):
    net = MLP((1, 8, 8), 10, hidden=(16,))
    opt = build_optimizer(net, cfg)
    assert type(opt) is cls
    for key, value in check.items():
        assert all(g[key] == value for g in opt.param_groups), key
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay["no_decay"] == 0.0 and decay["decay"] == cfg.get("weight_decay", 0.0)
    assert set(OPTIMIZERS) == {"sgd", "adagrad", "rmsprop", "adam", "adamw"}


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"name": "lbfgs"}, "unknown optimizer name 'lbfgs'; choose one of"),
        ({"lr": -0.1}, "lr must be a positive number, got -0.1"),
        ({"lr": 0}, "lr must be a positive number, got 0"),
        ({"weight_decay": -1}, "weight_decay must be >= 0, got -1"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\), got 1.5"),
        ({"name": "adam", "nesterov": True}, "nesterov=True needs name='sgd'"),
        ({"betas": [0.9]}, "betas must be two numbers"),
        ({"learning_rate": 0.1}, r"unknown optimizer option\(s\) \['learning_rate'\]"),
    ],
)
def test_bad_optimizer_config(bad, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig.from_any(bad)


def test_loss_hard_soft_and_smoothing_match_formula():
    torch.manual_seed(0)
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 1, 2])
    logp = logits.log_softmax(-1)
    hard = -logp[torch.arange(5), y].mean()
    torch.testing.assert_close(classification_loss(logits, y), hard)
    onehot = F.one_hot(y, 4).float()
    torch.testing.assert_close(classification_loss(logits, onehot), hard)
    eps = 0.1
    smoothed = -(((1 - eps) * onehot + eps / 4) * logp).sum(-1).mean()
    torch.testing.assert_close(classification_loss(logits, y, eps), smoothed)
    mixed = 0.3 * onehot + 0.7 * onehot.roll(1, 0)
    expected = -(((1 - eps) * mixed + eps / 4) * logp).sum(-1).mean()
    torch.testing.assert_close(classification_loss(logits, mixed, eps), expected)


def test_probability_nll_is_cross_entropy_on_probabilities():
    from lightning_tricks.losses import PROB_FLOOR, probability_nll

    torch.manual_seed(1)
    logits = torch.randn(6, 5)
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    probs = logits.softmax(-1)
    torch.testing.assert_close(probability_nll(probs, y), classification_loss(logits, y))
    soft = 0.6 * F.one_hot(y, 5).float() + 0.4 * F.one_hot(y.roll(1), 5).float()
    torch.testing.assert_close(probability_nll(probs, soft), classification_loss(logits, soft))
    torch.testing.assert_close(probability_nll(probs, y, "none"), -probs[torch.arange(6), y].log())
    torch.testing.assert_close(probability_nll(probs, y, "sum"), -probs[torch.arange(6), y].log().sum())
    zero = torch.tensor([[1.0, 0.0]])
    assert probability_nll(zero, torch.tensor([1])).item() == pytest.approx(-math.log(PROB_FLOOR))
    with pytest.raises(ValueError, match="reduction must be one of"):
        probability_nll(probs, y, "max")


def test_classifier_saves_its_tta_and_refuses_an_unknown_one():
    module = Classifier(MLP((1, 8, 8), 10, hidden=(8,)), 10, tta="flip")
    assert module.tta == "flip" and module.hparams["tta"] == "flip"
    assert Classifier(MLP((1, 8, 8), 10, hidden=(8,)), 10).hparams["tta"] == "none"
    with pytest.raises(ValueError, match=r"tta must be one of \('none', 'flip', 'crop', 'flip_crop'\), got 'ten'"):
        Classifier(MLP((1, 8, 8), 10), 10, tta="ten")


def test_classifier_smooths_in_training_only_and_logs_accuracy():
    torch.manual_seed(0)
    module = Classifier(MLP((1, 8, 8), 10, hidden=(8,)), 10, label_smoothing=0.2)
    logits, y = torch.randn(3, 10), torch.tensor([1, 2, 3])
    module.train()
    torch.testing.assert_close(module.loss(logits, y), F.cross_entropy(logits, y, label_smoothing=0.2))
    module.eval()
    torch.testing.assert_close(module.loss(logits, y), F.cross_entropy(logits, y))
    assert math.isclose(module.hparams["label_smoothing"], 0.2)
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\), got 1.0"):
        Classifier(MLP((1, 8, 8), 10), 10, label_smoothing=1.0)


def test_weight_norm_length_is_not_decayed():
    from torch.nn.utils.parametrizations import weight_norm

    net = nn.Sequential(weight_norm(nn.Linear(4, 3)), nn.Linear(3, 2))
    names = no_decay_parameter_names(net)
    assert names == {"0.bias", "0.parametrizations.weight.original0", "1.bias"}
