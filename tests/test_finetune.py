"""Transfer learning: freezing, layer split, discriminative LRs, FreezeUnfreeze in a Trainer and on resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks._lightning import (
    Callback,
    MisconfigurationException,
    ModelCheckpoint,
    Trainer,
)
from lightning_tricks.callbacks import FreezeUnfreeze
from lightning_tricks.data import DigitsDataModule
from lightning_tricks.finetune import (
    backbone_param_groups,
    classifier_parameters,
    freeze,
    layer_lr_factors,
    resolve_module,
    split_layers,
    unfreeze,
)
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP, ResNet

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(scope="module")
def loader():
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    x, y = dm.splits["train"]
    return DataLoader(TensorDataset(x[:192], y[:192]), batch_size=64, shuffle=False)  # 3 batches, fixed order


def make_module(optimizer=None, hidden=(16, 16), seed=0):
    torch.manual_seed(seed)
    opt = optimizer or {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}
    return Classifier(MLP((1, 8, 8), 10, hidden=hidden), 10, opt)


def tiny_trainer(**kw):
    base = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    base.update(kw)
    return Trainer(**base)


# -- pure helpers -------------------------------------------------------------------------------------
def test_split_layers_groups_norms_with_their_weight_layer():
    mlp = MLP((1, 8, 8), 10, hidden=(16, 16))  # Flatten, Linear, BN, ReLU, Linear, BN, ReLU
    assert [[n for n, _ in layer] for layer in split_layers(mlp.backbone)] == [
        ["1.weight", "2.weight", "2.bias"],
        ["4.weight", "5.weight", "5.bias"],
    ]
    ic = MLP((1, 8, 8), 10, hidden=(16, 16), norm="ic")  # Flatten, Linear, ReLU, IC(BN, Dropout), Linear, ReLU
    assert [[n for n, _ in layer] for layer in split_layers(ic.backbone)] == [
        ["1.weight", "1.bias", "3.0.weight", "3.0.bias"],
        ["4.weight", "4.bias"],
    ]
    resnet = ResNet((1, 8, 8), 10, widths=(8, 16), blocks_per_stage=2)  # stem + 4 blocks
    layers = split_layers(resnet.backbone)
    assert len(layers) == 5
    assert sum(len(layer) for layer in layers) == len(list(resnet.backbone.parameters()))
    assert split_layers(nn.Linear(2, 2))[0][0][0] == "weight"


def test_layer_lr_factors_and_param_groups():
    assert layer_lr_factors(3, 0.1, 0.5) == pytest.approx([0.025, 0.05, 0.1])
    assert layer_lr_factors(2, 0.2) == [0.2, 0.2]
    mlp = MLP((1, 8, 8), 10, hidden=(16, 16))
    groups = backbone_param_groups(
        mlp.backbone,
        "net.backbone",
        head_lr=0.2,
        lr_factor=0.1,
        layer_decay=0.5,
        weight_decay=1e-4,
        split_no_decay=True,
        base_lr=0.4,
    )
    summary = [(g["name"], g["lr"], g["weight_decay"], g["initial_lr"], g["param_names"]) for g in groups]
    assert summary == [
        ("net.backbone.layer0", pytest.approx(0.01), 1e-4, pytest.approx(0.02), ["net.backbone.1.weight"]),
        (
            "net.backbone.layer0/no_decay",
            pytest.approx(0.01),
            0.0,
            pytest.approx(0.02),
            ["net.backbone.2.weight", "net.backbone.2.bias"],
        ),
        ("net.backbone.layer1", pytest.approx(0.02), 1e-4, pytest.approx(0.04), ["net.backbone.4.weight"]),
        (
            "net.backbone.layer1/no_decay",
            pytest.approx(0.02),
            0.0,
            pytest.approx(0.04),
            ["net.backbone.5.weight", "net.backbone.5.bias"],
        ),
    ]
    one = backbone_param_groups(mlp.backbone, "b", head_lr=0.2, lr_factor=0.1, exclude=[mlp.backbone[1].weight])
    assert len(one) == 1 and one[0]["lr"] == pytest.approx(0.02) and "weight_decay" not in one[0]
    assert len(one[0]["params"]) == len(list(mlp.backbone.parameters())) - 1


def test_resolve_freeze_unfreeze():
    module = make_module()
    name, bb = resolve_module(module, "backbone")
    assert name == "net.backbone" and bb is module.net.backbone
    assert resolve_module(module, "net.head")[1] is module.net.head
    with pytest.raises(ValueError, match="has no submodule 'trunk'"):
        resolve_module(module, "trunk")
    bns = freeze(bb)
    assert len(bns) == 2 and not any(p.requires_grad for p in bb.parameters())
    unfreeze(bb)
    assert all(p.requires_grad for p in bb.parameters())
    assert freeze(bb, train_bn=True) == []
    assert [n for n, p in bb.named_parameters() if p.requires_grad] == ["2.weight", "2.bias", "5.weight", "5.bias"]


class WithClassifier(nn.Module):
    """A backbone that holds its own classifier and names it, as timm models do (``get_classifier()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.block = nn.Linear(8, 8)
        self.fc = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 3))

    def get_classifier(self) -> nn.Module:
        return self.fc


def test_a_classifier_inside_the_backbone_is_left_out():
    net = WithClassifier()
    head = classifier_parameters(net)
    assert [id(p) for p in head] == [id(p) for p in net.fc.parameters()]
    assert classifier_parameters(nn.Linear(2, 2)) == []
    assert [[n for n, _ in layer] for layer in split_layers(net, skip=head)] == [
        ["stem.weight", "stem.bias", "norm.weight", "norm.bias"],
        ["block.weight", "block.bias"],
    ]
    groups = backbone_param_groups(net, "net", head_lr=1.0, lr_factor=0.1, layer_decay=0.5, head=head)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [
        ("net.layer0", pytest.approx(0.05), 4),
        ("net.layer1", pytest.approx(0.1), 2),
    ]  # two layers of depth: the classifier is not the deepest layer
    assert len(backbone_param_groups(net, "net", head_lr=1.0, head=head)[0]["params"]) == 6
    bns = freeze(net, keep=head)
    assert bns == [net.norm]  # the classifier's BatchNorm stays trainable and in training mode
    assert [n for n, p in net.named_parameters() if p.requires_grad] == [
        "fc.0.weight",
        "fc.0.bias",
        "fc.1.weight",
        "fc.1.bias",
    ]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"backbone": ""}, "backbone must be a non-empty attribute path"),
        ({"unfreeze_at_epoch": -1}, "unfreeze_at_epoch must be an int >= 0 or None, got -1"),
        ({"lr_factor": 0}, "lr_factor must be > 0, got 0"),
        ({"layer_decay": 1.5}, r"layer_decay must be None or in \(0, 1\], got 1.5"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FreezeUnfreeze(**kwargs)


# -- in a Trainer ---------------------------------------------------------------------------------------
class Probe(Callback):
    """Records, per epoch, what the backbone and the optimizer look like."""

    def __init__(self):
        self.start = {}
        self.grads_none = {}
        self.bn_training = {}
        self.head_exp_avg_ids = {}

    def on_fit_start(self, trainer, pl_module):
        self.initial = copy.deepcopy(pl_module.net.backbone.state_dict())

    def on_train_epoch_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.start[trainer.current_epoch] = [(g.get("name"), g["lr"], g["weight_decay"]) for g in opt.param_groups]
        head = pl_module.net.head[-1].weight
        if "exp_avg" in opt.state.get(head, {}):
            self.head_exp_avg_ids[trainer.current_epoch] = id(opt.state[head]["exp_avg"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        e = trainer.current_epoch
        self.grads_none[e] = self.grads_none.get(e, True) and all(
            p.grad is None for p in pl_module.net.backbone.parameters()
        )
        bns = [m for m in pl_module.net.backbone.modules() if isinstance(m, nn.BatchNorm1d)]
        self.bn_training[e] = [m.training for m in bns]

    def on_train_epoch_end(self, trainer, pl_module):
        setattr(self, f"end{trainer.current_epoch}", copy.deepcopy(pl_module.net.backbone.state_dict()))


def test_freeze_then_unfreeze_keeps_head_state(loader):
    module = make_module({"name": "adam", "lr": 1e-2, "weight_decay": 1e-4})
    head_before = module.net.head[-1].weight.detach().clone()
    probe = Probe()
    cb = FreezeUnfreeze(backbone="backbone", unfreeze_at_epoch=2, lr_factor=0.1)
    trainer = tiny_trainer(max_epochs=3, callbacks=[cb, probe], limit_val_batches=1)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)

    initial = probe.initial
    for epoch in (0, 1):  # frozen: weights and BN running statistics unchanged, no gradients, BN in eval
        end = getattr(probe, f"end{epoch}")
        assert all(torch.equal(end[k], initial[k]) for k in initial), epoch
        assert probe.grads_none[epoch] and probe.bn_training[epoch] == [False, False]
        assert [n for n, _, _ in probe.start[epoch]] == ["decay", "no_decay"]
    assert not torch.equal(module.net.head[-1].weight, head_before)
    # unfrozen: weights move, BN trains, new groups at head_lr * 0.1 with the no-decay rule
    end = probe.end2
    assert not torch.equal(end["1.weight"], initial["1.weight"]) and not torch.equal(
        end["2.running_mean"], initial["2.running_mean"]
    )
    assert not probe.grads_none[2] and probe.bn_training[2] == [True, True]
    assert probe.start[2] == [
        ("decay", 1e-2, 1e-4),
        ("no_decay", 1e-2, 0.0),
        ("net.backbone", pytest.approx(1e-3), 1e-4),
        ("net.backbone/no_decay", pytest.approx(1e-3), 0.0),
    ]
    assert all(p.requires_grad for p in module.parameters())
    # the head's Adam state survived the unfreeze: same buffers, step counts over all 9 steps
    opt = trainer.optimizers[0]
    head_state = opt.state[module.net.head[-1].weight]
    assert probe.head_exp_avg_ids[1] == probe.head_exp_avg_ids[2] == id(head_state["exp_avg"])
    assert float(opt.state[module.net.head[-1].weight]["step"]) == 9
    assert float(opt.state[module.net.backbone[1].weight]["step"]) == 3
    assert cb.unfrozen and cb.unfrozen_at == 2


def test_layer_decay_groups_in_trainer(loader):
    module = make_module(
        {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "no_decay_bias_norm": False}
    )
    cb = FreezeUnfreeze(unfreeze_at_epoch=0, lr_factor=0.1, layer_decay=0.5)
    trainer = tiny_trainer(max_steps=1, callbacks=[cb])
    trainer.fit(module, train_dataloaders=loader)
    groups = [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in trainer.optimizers[0].param_groups]
    assert groups == [
        ("decay", 0.05, 1e-4, 2),
        ("net.backbone.layer0", pytest.approx(0.0025), 1e-4, 3),
        ("net.backbone.layer1", pytest.approx(0.005), 1e-4, 3),
    ]


def test_train_bn_keeps_batchnorm_training_while_frozen(loader):
    module = make_module()
    probe = Probe()
    tiny_trainer(max_epochs=1, callbacks=[FreezeUnfreeze(unfreeze_at_epoch=None, train_bn=True), probe]).fit(
        module, train_dataloaders=loader
    )
    end, initial = probe.end0, probe.initial
    assert torch.equal(end["1.weight"], initial["1.weight"]) and torch.equal(end["4.weight"], initial["4.weight"])
    assert not torch.equal(end["2.weight"], initial["2.weight"])  # BN affine trains
    assert probe.bn_training[0] == [True, True]


def test_optimizer_holding_frozen_params_is_rejected(loader):
    class AllParams(Classifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    module = AllParams(MLP((1, 8, 8), 10, hidden=(8,)), 10)
    with pytest.raises(MisconfigurationException, match="already holds 3 frozen parameters of 'net.backbone'"):
        tiny_trainer(max_steps=1, callbacks=[FreezeUnfreeze()]).fit(module, train_dataloaders=loader)


@pytest.mark.parametrize("unfreeze_at_epoch", [1, 3])  # resume after / before the unfreeze
def test_resume_matches_uninterrupted_run(loader, tmp_path, unfreeze_at_epoch):
    def run(max_epochs, ckpt=None, save=False):
        module = make_module()
        cb = FreezeUnfreeze(unfreeze_at_epoch=unfreeze_at_epoch, lr_factor=0.1, layer_decay=0.5)
        callbacks = [cb]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1))
        trainer = tiny_trainer(max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=save)
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt)
        return module, trainer, cb

    full, full_trainer, full_cb = run(4)
    run(2, save=True)
    resumed, res_trainer, res_cb = run(4, ckpt=str(tmp_path / "epoch=1-step=6.ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
    groups = lambda t: [(g.get("name"), g["lr"], len(g["params"])) for g in t.optimizers[0].param_groups]  # noqa: E731
    assert groups(res_trainer) == groups(full_trainer) and len(groups(full_trainer)) == 6
    full_state, res_state = full_trainer.optimizers[0].state_dict(), res_trainer.optimizers[0].state_dict()
    assert full_state["state"].keys() == res_state["state"].keys()
    for k, v in full_state["state"].items():
        assert torch.equal(v["momentum_buffer"], res_state["state"][k]["momentum_buffer"])
    assert res_cb.state_dict() == full_cb.state_dict()


def test_config_composes_and_instantiates():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="callbacks/freeze_unfreeze")
    cb = instantiate(cfg.callbacks.freeze_unfreeze)
    assert isinstance(cb, FreezeUnfreeze) and cb.unfreeze_at_epoch == 5 and cb.lr_factor == 0.1
