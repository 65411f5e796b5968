"""Files from elsewhere cannot run code: CIFAR batches, checkpoints; downloads are checked.

``train(ckpt_path=...)`` refusing a crafted checkpoint, through the entry point, is in test_fault_paths.py."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from torch import nn

from lightning_tricks._lightning import ModelCheckpoint, Trainer, seed_everything
from lightning_tricks.callbacks import EMA, SWA, EarlyStopping, LRSchedule
from lightning_tricks.data import DataFileError, DigitsDataModule, read_cifar_batches
from lightning_tricks.data.files import CHECKSUMS, download, md5sum, write_cifar_batch
from lightning_tricks.ensemble import CheckpointEnsemble, load_checkpoint
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP
from lightning_tricks.stopping import GL


class _Marker:
    """Unpickling this creates ``path``: the trace a crafted file would leave if its code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_cifar_batch_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    data = np.zeros((2, 3072), dtype=np.uint8)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": data, b"labels": [0, 1], b"x": _Marker(marker)}, f, protocol=2)
    with pytest.raises(DataFileError, match=r"refused .*data_batch_1: not a CIFAR-10 python batch \(it refers to "):
        read_cifar_batches(tmp_path, ["data_batch_1"])
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_legitimate_cifar_batches_load(tmp_path, protocol):
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    write_cifar_batch(tmp_path / "b", images, [1, 2, 3])
    x, y = read_cifar_batches(tmp_path, ["b"])
    assert np.array_equal(x, images) and y.tolist() == [1, 2, 3]
    with open(tmp_path / "p", "wb") as f:  # the same content pickled with another protocol
        pickle.dump({b"data": images.reshape(3, 3072), b"labels": [1, 2, 3]}, f, protocol=protocol)
    x, _ = read_cifar_batches(tmp_path, ["p"])
    assert np.array_equal(x, images)


def test_cifar_batch_with_wrong_dtype_is_refused(tmp_path):
    with open(tmp_path / "b", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), dtype=np.float64), b"labels": [0]}, f)
    with pytest.raises(DataFileError, match="not a uint8 array"):
        read_cifar_batches(tmp_path, ["b"])


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    state = nn.Linear(4, 3).state_dict()
    torch.save({"state_dict": state, "extra": _Marker(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match=r"refused to load .*evil.ckpt: it holds io.open.*trusted=True"):
        CheckpointEnsemble.from_checkpoints(nn.Linear(4, 3), [tmp_path / "evil.ckpt"])
    assert not marker.exists()
    # the documented opt-in: a file the user vouches for loads with full unpickling (and here, runs)
    CheckpointEnsemble.from_checkpoints(nn.Linear(4, 3), [tmp_path / "evil.ckpt"], trusted=True)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*")
def test_our_checkpoints_load_weights_only_and_resume(tmp_path):
    def fit(ckpt_path=None, epochs=3):
        seed_everything(0)
        module = Classifier(MLP((1, 8, 8), 10, hidden=(16,)), 10, {"name": "sgd", "lr": 0.05})
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="e{epoch}", save_top_k=-1)
        callbacks = [
            EMA(decay=0.9),
            SWA(start=1, swa_lr=0.02, bn_update_batches=2),
            LRSchedule(),
            EarlyStopping(monitor="val/loss", criterion=GL(alpha=50.0)),
            saver,
        ]
        trainer = Trainer(
            max_epochs=epochs,
            limit_train_batches=3,
            limit_val_batches=2,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=callbacks,
            default_root_dir=tmp_path,
        )
        trainer.fit(module, DigitsDataModule(batch_size=32, loader="resident"), ckpt_path=ckpt_path)
        return trainer

    fit(epochs=2)
    paths = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert paths
    for path in paths:
        assert "optimizer_states" in load_checkpoint(path)  # weights_only=True is enough
    ensemble = CheckpointEnsemble.from_checkpoints(
        lambda: Classifier(MLP((1, 8, 8), 10, hidden=(16,)), 10, {"name": "sgd", "lr": 0.05}), paths
    )
    assert ensemble.predict_proba(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert fit(ckpt_path=str(paths[-1]), epochs=3).global_step == 9


def test_download_is_checked_against_its_checksum(tmp_path):
    source = tmp_path / "served.gz"
    source.write_bytes(b"not the real archive")
    dest = tmp_path / "data" / "train-images-idx3-ubyte.gz"
    with pytest.raises(DataFileError, match=r"has MD5 [0-9a-f]{32}, the published checksum is 8d4fb7e6.*deleted"):
        download(source.as_uri(), dest, md5=CHECKSUMS["fashion_mnist/train-images-idx3-ubyte.gz"])
    assert not dest.exists() and not dest.with_suffix(".gz.part").exists()
    download(source.as_uri(), dest, md5=md5sum(source))
    assert dest.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("name", sorted(k for k in CHECKSUMS if not k.startswith("cifar10")))
def test_published_checksums_match_the_original_files(name):
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not here (the shared data folder)")
    assert md5sum(path) == CHECKSUMS[name]
