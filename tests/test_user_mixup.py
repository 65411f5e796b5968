"""Mixup / CutMix in a user's own project: a plain LightningModule with a torchmetrics Accuracy and F.cross_entropy.

The callbacks replace ``y`` by soft targets ``(N, C)``. A metric fed them must fail with a message naming the
callback (never log a wrong number); ``labels_of(y)`` gives the loader's labels; the loss still trains on the
mixed targets: ``lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b)`` on the mixed input.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks._lightning import LightningModule, Trainer
from lightning_tricks.augment import labels_of
from lightning_tricks.callbacks import CutMix, Mixup, MixupCutmix

N, CLASSES, BATCH = 16, 4, 8
LABELS = torch.tensor([0, 1, 2, 3, 1, 2, 3, 0, 2, 3, 0, 1, 3, 0, 1, 2])


class UserModule(LightningModule):
    """What a user writes: ``x, y = batch``, ``F.cross_entropy``, a torchmetrics Accuracy on the training batches."""

    def __init__(self, features: int, metric_input: str = "labels_of") -> None:
        super().__init__()
        self.net = nn.Linear(features, CLASSES)
        self.acc = torchmetrics.Accuracy(task="multiclass", num_classes=CLASSES)
        self.metric_input = metric_input
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (mixed x, logits, loss)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x.flatten(1))
        loss = F.cross_entropy(logits, y)
        self.steps.append((x.detach().clone(), logits.detach().clone(), loss.detach().clone()))
        if self.metric_input == "labels_of":
            self.acc(logits, labels_of(y))
        elif self.metric_input == "y":
            self.acc(logits, y)
        else:  # "compare": accuracy by hand
            self.log("train/hand_acc", (logits.argmax(1) == y).float().mean())
        self.log("train/acc", self.acc, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _data(kind: str) -> TensorDataset:
    if kind == "vectors":  # sample i is e_i: a mixed row shows lam and the partner
        return TensorDataset(torch.eye(N), LABELS)
    images = (torch.arange(N, dtype=torch.float32) + 1).view(N, 1, 1, 1).expand(N, 1, 6, 6).clone()  # image i = i + 1
    return TensorDataset(images, LABELS)


def _fit(callback, kind: str, metric_input: str = "labels_of") -> tuple[Trainer, UserModule]:
    torch.manual_seed(0)
    module = UserModule(N if kind == "vectors" else 36, metric_input)
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, DataLoader(_data(kind), batch_size=BATCH))
    return trainer, module


CASES = [
    pytest.param(lambda: Mixup(alpha=1.0, num_classes=CLASSES, seed=3), "vectors", "Mixup", id="Mixup"),
    pytest.param(lambda: CutMix(alpha=1.0, num_classes=CLASSES, seed=3), "images", "CutMix", id="CutMix"),
]


@pytest.mark.parametrize("make,kind,name", CASES)
@pytest.mark.parametrize("metric_input", ["y", "compare"])
def test_a_metric_fed_the_mixed_targets_fails_naming_the_callback(make, kind, name, metric_input):
    with pytest.raises(ValueError, match=rf"^{name} replaced the class labels .*metric.*labels_of\(y\)") as info:
        _fit(make(), kind, metric_input)
    assert "\n" not in str(info.value)


def test_mixup_cutmix_with_label_smoothing_names_itself_too():
    with pytest.raises(ValueError, match=r"^MixupCutmix replaced the class labels"):
        _fit(MixupCutmix(1.0, 0.0, label_smoothing=0.1, num_classes=CLASSES, seed=1), "vectors", "y")


def _partners(kind: str, x_mixed: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(own label, partner label, weight of the own label) of each sample, read off the mixed inputs alone."""
    own = torch.arange(BATCH) + batch * BATCH  # no shuffle: position i of batch b is sample 8b + i
    if kind == "vectors":
        lam = x_mixed[torch.arange(BATCH), own]  # x'_i = lam e_own + (1 - lam) e_partner
        rest = x_mixed.clone()
        rest[torch.arange(BATCH), own] = 0
        partner = torch.where(rest.amax(1) > 0, rest.argmax(1), own)
    else:
        values = x_mixed.flatten(1)  # image k holds k + 1 everywhere
        lam = (values == (own + 1)[:, None].float()).float().mean(1)  # the kept area
        other = torch.where(values == (own + 1)[:, None].float(), torch.zeros_like(values), values).amax(1)
        partner = torch.where(other > 0, other.long() - 1, own)
    return LABELS[own], LABELS[partner], lam


@pytest.mark.parametrize("make,kind,name", CASES)
def test_training_uses_the_mixed_targets_and_labels_of_gives_the_right_accuracy(make, kind, name):
    trainer, module = _fit(make(), kind)
    correct = mixed = 0
    for step, (x_mixed, logits, loss) in enumerate(module.steps):
        y_a, y_b, lam = _partners(kind, x_mixed, step % 2)
        mixed += int((lam < 1).sum())
        # the loss the user's F.cross_entropy computed is mixup's: lam CE(y_a) + (1 - lam) CE(y_b), per sample
        per_sample = lam * F.cross_entropy(logits, y_a, reduction="none")
        per_sample += (1 - lam) * F.cross_entropy(logits, y_b, reduction="none")
        torch.testing.assert_close(loss, per_sample.mean(), rtol=1e-5, atol=1e-6)
        if step >= 2:  # the second epoch's accuracy is what train/acc logs last
            correct += int((logits.argmax(1) == y_a).sum())
    assert mixed > 8  # the batches really were mixed
    acc = trainer.callback_metrics["train/acc"].item()
    assert acc == pytest.approx(correct / N)


def test_unmixed_batches_keep_the_plain_labels():
    """With p < 1 some batches are not mixed: labels_of(y) is then y itself and training_step sees plain labels."""
    seen = []

    class Spy(UserModule):
        def training_step(self, batch, batch_idx):
            seen.append(batch[1])
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    module = Spy(N)
    trainer = Trainer(
        max_epochs=10, logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False
    )
    trainer.callbacks.append(Mixup(alpha=1.0, p=0.5, num_classes=CLASSES, seed=0))
    trainer.fit(module, DataLoader(_data("vectors"), batch_size=BATCH))
    plain = [y for y in seen if not y.dtype.is_floating_point]
    soft = [y for y in seen if y.dtype.is_floating_point]
    assert plain and soft
    assert all(labels_of(y) is y for y in plain)
    assert all(torch.equal(labels_of(y), LABELS[:BATCH]) or torch.equal(labels_of(y), LABELS[BATCH:]) for y in soft)
