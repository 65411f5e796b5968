"""TimmModel: transfer learning from a weights file, with a fake ``timm`` that mirrors timm's model API.

timm cannot be imported on the CPU build machines (its torchvision dependency does not load beside the
CPU torch build), so the wiring is tested against ``FakeTimm``: ``create_model(model_name, pretrained=False,
pretrained_cfg=None, pretrained_cfg_overlay=None, checkpoint_path='', **kwargs)`` with ``None`` kwargs
pruned and ``RuntimeError('Unknown model (...)')`` for an unknown name (timm/models/_factory.py), and a
model shaped like timm's ResNet (timm/models/resnet.py): ``conv1``/``bn1``/``act1`` stem, ``layer1``/
``layer2``, ``global_pool`` + ``fc`` built by one classifier factory (``fc`` is ``nn.Identity`` for
``num_classes=0``), ``num_classes``, ``num_features``, ``pretrained_cfg`` with ``first_conv="conv1"`` and
``classifier="fc"``, ``get_classifier(name_only=False)``, ``reset_classifier(num_classes, global_pool='avg')``,
``forward_features`` / ``forward_head(x, pre_logits=False)``. The last test runs the real timm when it
can be imported (``needs_extra("timm")``).
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import EXTRAS, needs_extra
from torch import nn

from lightning_tricks._lightning import Callback, Trainer, seed_everything
from lightning_tricks.callbacks import FreezeUnfreeze
from lightning_tricks.data import DigitsDataModule
from lightning_tricks.finetune import classifier_parameters, freeze, split_layers
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MissingExtraError, TimmModel
from lightning_tricks.models.timm_model import TIMM_MISSING, adapt_input_channels, read_state_dict
from lightning_tricks.nn import DropConnectLinear

EXTRAS.setdefault("timm", "timm")  # the extra's module, until tests/conftest.py lists it


# -- the fake timm --------------------------------------------------------------------------------------
def _create_classifier(num_features: int, num_classes: int, pool_type: str = "avg") -> tuple[nn.Module, nn.Module]:
    pool = nn.AdaptiveAvgPool2d(1) if pool_type == "avg" else nn.AdaptiveMaxPool2d(1)
    fc: nn.Module = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
    return nn.Sequential(pool, nn.Flatten(1)), fc


class FakeResNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        width: int = 8,
    ) -> None:
        super().__init__()
        self.num_classes, self.drop_rate, self.drop_path_rate = num_classes, drop_rate, drop_path_rate
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU()
        )
        self.num_features = 2 * width
        self.global_pool, self.fc = _create_classifier(self.num_features, num_classes, global_pool)
        self.pretrained_cfg = {"num_classes": 1000, "first_conv": "conv1", "classifier": "fc"}

    def get_classifier(self, name_only: bool = False) -> Any:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.global_pool, self.fc = _create_classifier(self.num_features, num_classes, global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(self.act1(self.bn1(self.conv1(x)))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class FakeTimm(types.ModuleType):
    MODELS = {"fakenet": {}, "fakenet_wide": {"width": 12}}

    def __init__(self) -> None:
        super().__init__("timm")
        self.__version__ = "1.0.0+fake"
        self.calls: list[dict[str, Any]] = []

    def is_model(self, model_name: str) -> bool:
        return model_name.split(".")[0] in self.MODELS

    def list_models(self, pattern: str = "") -> list[str]:
        return sorted(self.MODELS)

    def create_model(
        self,
        model_name: str,
        pretrained: bool = False,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: Any = None,
        checkpoint_path: str = "",
        **kwargs: Any,
    ) -> FakeResNet:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if not self.is_model(model_name):
            raise RuntimeError(f"Unknown model ({model_name})")
        self.calls.append({"model_name": model_name, "pretrained": pretrained, **kwargs})
        return FakeResNet(**{**self.MODELS[model_name.split(".")[0]], **kwargs})


@pytest.fixture
def fake_timm(monkeypatch: pytest.MonkeyPatch) -> FakeTimm:
    fake = FakeTimm()
    monkeypatch.setitem(sys.modules, "timm", fake)
    return fake


@pytest.fixture
def weights(fake_timm: FakeTimm, tmp_path: Path) -> tuple[FakeResNet, Path]:
    """An 'ImageNet' model (3 channels, 1000 classes) with non-trivial BN statistics, saved as a state_dict."""
    torch.manual_seed(0)
    source = fake_timm.create_model("fakenet")
    for m in source.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    path = tmp_path / "fakenet.pth"
    torch.save(source.state_dict(), path)
    fake_timm.calls.clear()
    return source.eval(), path


# -- errors -------------------------------------------------------------------------------------------
def test_missing_timm_names_the_extra(monkeypatch: pytest.MonkeyPatch, make_cfg) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` -> ModuleNotFoundError
    with pytest.raises(MissingExtraError) as info:
        TimmModel((1, 8, 8), 10)
    assert str(info.value) == TIMM_MISSING and 'pip install -e ".[timm]"' in TIMM_MISSING
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)
    from lightning_tricks.train import ConfigError, train

    with pytest.raises(ConfigError) as cfg_info:
        train(make_cfg("model=timm"))
    assert str(cfg_info.value) == f"model: {TIMM_MISSING}" and "\n" not in str(cfg_info.value)

    def broken(name: str) -> Any:
        raise RuntimeError("operator torchvision::nms does not exist\nmore details")

    monkeypatch.setattr("lightning_tricks.models.timm_model.importlib.import_module", broken)
    with pytest.raises(MissingExtraError, match=r"^timm is installed but cannot be imported \(RuntimeError: operator"):
        TimmModel((1, 8, 8), 10)


def test_missing_weights_file_is_one_line_naming_it(fake_timm: FakeTimm, tmp_path: Path, make_cfg) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=f"^pretrained_path={missing}: no such file$"):
        TimmModel((1, 8, 8), 10, name="fakenet", pretrained_path=missing)
    assert fake_timm.calls == []  # checked before anything is built
    from lightning_tricks.train import ConfigError, train

    with pytest.raises(ConfigError, match=f"^model: pretrained_path={missing}: no such file$"):
        train(make_cfg("model=timm", "model.name=fakenet", f"model.pretrained_path={missing}"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "resnet9000"}, r"name='resnet9000' is not a timm model; list the names with timm.list_models"),
        ({"pretrained": True, "pretrained_path": "w.pth"}, "pretrained=true downloads timm's weights and"),
        ({"head": "mlp"}, r"head must be one of \('linear', 'dropconnect'\), got 'mlp'"),
        ({"drop_rate": 1.0}, r"drop_rate must be in \[0, 1\), got 1.0"),
        ({"model_kwargs": {"in_chans": 3}}, r"model_kwargs must not set \['in_chans'\]"),
        ({"input_shape": (64,)}, r"TimmModel needs input_shape \(C, H, W\)"),
    ],
)
def test_bad_arguments(fake_timm: FakeTimm, kwargs: dict, match: str) -> None:
    args = {"input_shape": (1, 8, 8), "num_classes": 10, "name": "fakenet", **kwargs}
    with pytest.raises(ValueError, match=match):
        TimmModel(**args)


# -- loading ------------------------------------------------------------------------------------------
def test_weights_file_loads_everything_but_the_head(fake_timm: FakeTimm, weights: tuple[FakeResNet, Path]) -> None:
    source, path = weights
    model = TimmModel((3, 8, 8), 10, name="fakenet", pretrained_path=path).eval()
    assert fake_timm.calls == [
        {"model_name": "fakenet", "pretrained": False, "num_classes": 10, "in_chans": 3, "drop_rate": 0.0}
    ]
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(expected)  # the backbone's classifier is timm's Identity now
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    # the head is new: out_features = num_classes, on the pooled features
    assert isinstance(model.head, nn.Linear) and (model.head.in_features, model.head.out_features) == (16, 10)
    assert isinstance(model.backbone.get_classifier(), nn.Identity)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        features = source.forward_head(source.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model.backbone(x), features)  # the pretrained feature extractor
        torch.testing.assert_close(model(x), model.head(features))
    assert model(x).shape == (4, 10)


def test_wrapped_and_prefixed_state_dicts_load_the_same(weights: tuple[FakeResNet, Path], tmp_path: Path) -> None:
    source, path = weights
    state = source.state_dict()
    plain = read_state_dict(path)
    for name, obj in {
        "lightning_style.ckpt": {"state_dict": state, "epoch": 3},
        "timm_train.pth": {"model": state, "optimizer": {"lr": 0.1}},
        "ddp.pth": {f"module.{k}": v for k, v in state.items()},
    }.items():
        torch.save(obj, tmp_path / name)
        read = read_state_dict(tmp_path / name)
        assert set(read) == set(plain) and all(torch.equal(read[k], plain[k]) for k in plain), name


def test_one_channel_data_adapts_the_first_conv(fake_timm: FakeTimm, weights: tuple[FakeResNet, Path]) -> None:
    source, path = weights
    model = TimmModel((1, 8, 8), 10, name="fakenet", pretrained_path=path).eval()
    assert fake_timm.calls[-1]["in_chans"] == 1
    torch.testing.assert_close(model.backbone.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():  # a gray image gives the response the RGB model gives to it on all three channels
        torch.testing.assert_close(model.backbone.conv1(x), source.conv1(x.repeat(1, 3, 1, 1)))
    w = torch.randn(4, 3, 3, 3)
    six = adapt_input_channels(w, 6)
    torch.testing.assert_close(six, torch.cat([w, w], dim=1) / 2)
    with pytest.raises(ValueError, match="in_chans must be an int >= 1, got 0"):
        adapt_input_channels(w, 0)


def _save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def test_files_that_do_not_fit_are_refused_with_the_keys(
    fake_timm: FakeTimm, weights: tuple[FakeResNet, Path], tmp_path: Path
) -> None:
    source, _ = weights
    state = source.state_dict()

    def build(path: Path, name: str = "fakenet") -> TimmModel:
        return TimmModel((3, 8, 8), 10, name=name, pretrained_path=path)

    # a head under another name than the model's classifier ("fc"): its keys are unexpected
    renamed = {("classifier." + k[3:] if k.startswith("fc.") else k): v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"unexpected keys \[classifier.bias, classifier.weight\]$") as info:
        build(_save(renamed, tmp_path / "renamed.pth"))
    assert "its head ['fc'] is replaced" in str(info.value) and "\n" not in str(info.value)
    # a backbone key missing
    partial = {k: v for k, v in state.items() if k != "layer1.0.weight"}
    with pytest.raises(ValueError, match=r"missing keys \[layer1.0.weight\]$"):
        build(_save(partial, tmp_path / "partial.pth"))
    # another architecture: the shapes differ (listed), the head's do not matter
    with pytest.raises(
        ValueError, match=r"shapes that differ \[conv1.weight \(8, 3, 3, 3\) != \(12, 3, 3, 3\), .*\(15 in all\)\]$"
    ):
        build(tmp_path / "fakenet.pth", name="fakenet_wide")
    # not a state dict / not loadable without running code
    with pytest.raises(ValueError, match="holds no state dict .* found list"):
        build(_save([1, 2], tmp_path / "list.pth"))  # type: ignore[arg-type]
    torch.save(source, tmp_path / "pickled_module.pth")  # a whole pickled module: weights_only refuses it
    with pytest.raises(ValueError, match=r"pickled_module.pth is not a readable weights file \("):
        build(tmp_path / "pickled_module.pth")


def test_safetensors_needs_its_package(
    fake_timm: FakeTimm, monkeypatch: pytest.MonkeyPatch, weights: tuple[FakeResNet, Path], tmp_path: Path
) -> None:
    source, _ = weights
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(
        MissingExtraError, match=f"pretrained_path={path} is a safetensors file: pip install safetensors"
    ):
        TimmModel((3, 8, 8), 10, name="fakenet", pretrained_path=path)


def test_safetensors_file_loads(weights: tuple[FakeResNet, Path], tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    source, _ = weights
    path = tmp_path / "w.safetensors"
    st.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = TimmModel((3, 8, 8), 10, name="fakenet", pretrained_path=path)
    assert torch.equal(model.backbone.layer2[0].weight, source.layer2[0].weight)


def test_dropconnect_head_and_pass_through_options(fake_timm: FakeTimm) -> None:
    torch.manual_seed(0)
    model = TimmModel(
        (1, 8, 8),
        10,
        name="fakenet",
        pretrained=True,
        head="dropconnect",
        dropconnect_p=0.3,
        drop_rate=0.2,
        drop_path_rate=0.1,
        model_kwargs={"global_pool": "max"},
    )
    call = fake_timm.calls[-1]
    assert call["pretrained"] is True and call["drop_path_rate"] == 0.1 and call["global_pool"] == "max"
    assert isinstance(model.backbone.global_pool[0], nn.AdaptiveMaxPool2d)  # kept by reset_classifier
    head = model.head
    assert isinstance(head, DropConnectLinear) and head.p == 0.3 and head.out_features == 10
    features = torch.randn(5, 16)
    assert not torch.equal(head.train()(features), head(features))
    head.eval()
    torch.testing.assert_close(head(features), nn.functional.linear(features, head.weight, head.bias))


# -- transfer learning in a Trainer -------------------------------------------------------------------
class Snapshots(Callback):
    def __init__(self) -> None:
        self.backbone: dict[int, dict[str, torch.Tensor]] = {}
        self.head: dict[int, torch.Tensor] = {}
        self.groups: dict[int, list[tuple[str, float]]] = {}

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.initial = copy.deepcopy(pl_module.net.backbone.state_dict())
        self.initial_head = pl_module.net.head.weight.detach().clone()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        e = trainer.current_epoch
        self.backbone[e] = copy.deepcopy(pl_module.net.backbone.state_dict())
        self.head[e] = pl_module.net.head.weight.detach().clone()
        self.groups[e] = [(g["name"], g["lr"]) for g in trainer.optimizers[0].param_groups]


def _tiny_trainer(callbacks: list[Callback], epochs: int = 2) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        limit_train_batches=3,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def test_freeze_then_unfreeze_a_pretrained_timm_model(weights: tuple[FakeResNet, Path]) -> None:
    _, path = weights
    seed_everything(0)
    net = TimmModel((1, 8, 8), 10, name="fakenet", pretrained_path=path)
    module = Classifier(net, 10, {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4})
    probe = Snapshots()
    cb = FreezeUnfreeze(backbone="backbone", unfreeze_at_epoch=1, lr_factor=0.1, layer_decay=0.5)
    _tiny_trainer([cb, probe]).fit(module, datamodule=DigitsDataModule(batch_size=32, loader="resident"))
    # epoch 0: the pretrained backbone (weights and BN statistics) is untouched, the new head trains
    assert all(torch.equal(probe.backbone[0][k], v) for k, v in probe.initial.items())
    assert not torch.equal(probe.head[0], probe.initial_head)
    assert [n for n, _ in probe.groups[0]] == ["decay", "no_decay"]
    # epoch 1: unfrozen, one group per layer (stem, layer1, layer2) at 0.05 * 0.1 * 0.5**depth
    assert not torch.equal(probe.backbone[1]["layer1.0.weight"], probe.initial["layer1.0.weight"])
    assert not torch.equal(probe.backbone[1]["bn1.running_mean"], probe.initial["bn1.running_mean"])
    added = probe.groups[1][2:]
    assert added == [
        ("net.backbone.layer0", pytest.approx(0.00125)),
        ("net.backbone.layer0/no_decay", pytest.approx(0.00125)),
        ("net.backbone.layer1", pytest.approx(0.0025)),
        ("net.backbone.layer1/no_decay", pytest.approx(0.0025)),
        ("net.backbone.layer2", pytest.approx(0.005)),
        ("net.backbone.layer2/no_decay", pytest.approx(0.005)),
    ]


def test_freeze_unfreeze_keeps_a_plain_timm_models_classifier_trainable(fake_timm: FakeTimm) -> None:
    """A module holding an unwrapped timm model: FreezeUnfreeze asks it for its classifier (get_classifier())."""
    seed_everything(0)
    net = fake_timm.create_model("fakenet", num_classes=10, in_chans=1)
    assert [id(p) for p in classifier_parameters(net)] == [id(net.fc.weight), id(net.fc.bias)]
    layers = split_layers(net, skip=classifier_parameters(net))
    assert [[n for n, _ in layer][0] for layer in layers] == ["conv1.weight", "layer1.0.weight", "layer2.0.weight"]
    assert len(split_layers(net)) == 4  # without skip, the classifier would count as the deepest layer

    module = Classifier(net, 10, {"name": "sgd", "lr": 0.05})
    initial = copy.deepcopy(net.state_dict())
    cb = FreezeUnfreeze(backbone="net", unfreeze_at_epoch=1, lr_factor=0.1, layer_decay=0.5)

    class Check(Callback):
        def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
            if trainer.current_epoch == 0:
                state = net.state_dict()
                frozen = [k for k in state if not k.startswith("fc.")]
                assert all(torch.equal(state[k], initial[k]) for k in frozen)
                assert not torch.equal(state["fc.weight"], initial["fc.weight"])

    trainer = _tiny_trainer([cb, Check()])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32, loader="resident"))
    groups = [(g["name"], g["lr"]) for g in trainer.optimizers[0].param_groups]
    assert groups[2:] == [
        ("net.layer0", pytest.approx(0.00125)),
        ("net.layer0/no_decay", pytest.approx(0.00125)),
        ("net.layer1", pytest.approx(0.0025)),
        ("net.layer1/no_decay", pytest.approx(0.0025)),
        ("net.layer2", pytest.approx(0.005)),
        ("net.layer2/no_decay", pytest.approx(0.005)),
    ]
    in_groups = [n for g in trainer.optimizers[0].param_groups[2:] for n in g.get("param_names", [])]
    assert not any(".fc." in n for n in in_groups)
    # the pure helper alone
    other = fake_timm.create_model("fakenet", num_classes=10)
    freeze(other, keep=classifier_parameters(other))
    assert [n for n, p in other.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]


def test_config_transfer_learning_run(fake_timm: FakeTimm, weights: tuple[FakeResNet, Path], make_cfg) -> None:
    from lightning_tricks.train import train

    _, path = weights
    cfg = make_cfg(
        "model=timm",
        "model.name=fakenet",
        f"model.pretrained_path={path}",
        "+callbacks=freeze_unfreeze",
        "callbacks.freeze_unfreeze.unfreeze_at_epoch=1",
    )
    metrics, objects = train(cfg)
    net = objects["module"].net
    assert isinstance(net, TimmModel) and net.head.out_features == 10 and net.backbone.conv1.in_channels == 1
    assert [g["name"] for g in objects["trainer"].optimizers[0].param_groups][2:] == [
        "net.backbone",
        "net.backbone/no_decay",
    ]
    assert 0.0 <= metrics["test/acc"] <= 1.0


# -- the real timm --------------------------------------------------------------------------------------
@needs_extra("timm")
def test_real_timm_resnet18_from_a_weights_file(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False)  # ImageNet layout: 3 channels, 1000 classes
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = TimmModel((1, 8, 8), 10, name="resnet18", pretrained_path=path).eval()
    assert isinstance(model.head, nn.Linear) and (model.head.in_features, model.head.out_features) == (512, 10)
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    torch.testing.assert_close(model.backbone.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    module = Classifier(model, 10, {"name": "sgd", "lr": 0.01})
    layers = split_layers(model.backbone)
    assert [layer[0][0] for layer in layers] == [
        "conv1.weight",
        "layer1.0.conv1.weight",
        "layer2.0.conv1.weight",
        "layer3.0.conv1.weight",
        "layer4.0.conv1.weight",
    ]
    cb = FreezeUnfreeze(unfreeze_at_epoch=None)
    trainer = Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[cb],
    )  # fmt: skip
    before = copy.deepcopy(model.backbone.state_dict())
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16, loader="resident"))
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in before.items())
