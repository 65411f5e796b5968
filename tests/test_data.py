import gzip

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from lightning_tricks.data import (
    CIFAR10DataModule,
    DataFileError,
    DigitsDataModule,
    FashionMNISTDataModule,
    TensorBatchLoader,
    read_cifar_batches,
    read_idx,
)
from lightning_tricks.data.files import write_cifar_batch, write_idx
from lightning_tricks.data.images import IDX_FILES


def _write_fashion(folder, n_train=30, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = IDX_FILES[split]
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / images, x)
        write_idx(folder / labels, y)
        arrays[split] = (x, y)
    return arrays


def test_idx_round_trip_exact(tmp_path):
    arrays = _write_fashion(tmp_path)
    x, y = arrays["train"]
    np.testing.assert_array_equal(read_idx(tmp_path / IDX_FILES["train"][0]), x)
    np.testing.assert_array_equal(read_idx(tmp_path / IDX_FILES["train"][1]), y)


def test_idx_header_parsed_by_hand(tmp_path):
    raw = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6))
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), np.arange(6, dtype=np.uint8).reshape(2, 3))


@pytest.mark.parametrize(
    "content, match",
    [
        (gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2])), "expected 13 bytes for shape \\(5,\\), found 10"),
        (gzip.compress(b"PK\x03\x04garbage"), "not an idx file"),
        (b"this is not gzip", "cannot decompress"),
    ],
)
def test_corrupt_idx(tmp_path, content, match):
    path = tmp_path / "bad.gz"
    path.write_bytes(content)
    with pytest.raises(DataFileError, match=match):
        read_idx(path)


def test_fashion_datamodule_reads_written_files(tmp_path):
    arrays = _write_fashion(tmp_path / "fm", n_train=40, n_test=12)
    dm = FashionMNISTDataModule(str(tmp_path / "fm"), batch_size=8, val_fraction=0.25)
    dm.setup()
    assert [len(dm.splits[s][1]) for s in ("train", "val", "test")] == [30, 10, 12]
    torch.testing.assert_close(dm.splits["test"][1], torch.from_numpy(arrays["test"][1].astype(np.int64)))
    # standardized with the training split's statistics (after the validation split is carved out):
    # training pixels have mean 0 and std 1; val and test use the same shift and scale
    train_x = dm.splits["train"][0]
    assert abs(train_x.mean().item()) < 1e-5 and abs(train_x.std().item() - 1) < 1e-5
    pixels = torch.from_numpy(arrays["test"][0]).float().unsqueeze(1) / 255.0
    torch.testing.assert_close(dm.splits["test"][0], (pixels - dm.norm_shift) / dm.norm_scale)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.int64


def test_missing_data_dir_names_path_and_files(tmp_path):
    dm = FashionMNISTDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*missing \['train-images-idx3-ubyte.gz'.*download=true"):
        dm.prepare_data()


def test_corrupt_file_in_datamodule(tmp_path):
    _write_fashion(tmp_path)
    (tmp_path / IDX_FILES["test"][0]).write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(DataFileError, match="t10k-images-idx3-ubyte.gz"):
        FashionMNISTDataModule(str(tmp_path)).setup()


def _write_cifar(folder, per_batch=6, seed=0):
    rng = np.random.default_rng(seed)
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, size=per_batch)
        write_cifar_batch(d / name, x, y)
        written[name] = (x, y)
    return d, written


def test_cifar_reader_layout(tmp_path):
    d, written = _write_cifar(tmp_path)
    x, y = read_cifar_batches(d, ["data_batch_2"])
    np.testing.assert_array_equal(x, written["data_batch_2"][0])
    # the row layout: R plane then G then B, each 32x32 row-major
    import pickle

    with open(d / "data_batch_2", "rb") as f:
        row = pickle.load(f, encoding="bytes")[b"data"][1]
    assert row[1024 + 32 * 5 + 7] == x[1, 1, 5, 7]
    np.testing.assert_array_equal(y, written["data_batch_2"][1])


@pytest.mark.parametrize("use_parent", [True, False])
def test_cifar_datamodule(tmp_path, use_parent):
    d, written = _write_cifar(tmp_path)
    dm = CIFAR10DataModule(str(tmp_path if use_parent else d), batch_size=4, val_fraction=0.2)
    dm.setup()
    assert [len(dm.splits[s][1]) for s in ("train", "val", "test")] == [24, 6, 6]
    torch.testing.assert_close(dm.splits["test"][1], torch.from_numpy(written["test_batch"][1]))
    mean = dm.splits["test"][0].mean(dim=(0, 2, 3))
    assert mean.shape == (3,)


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 files not found"):
        CIFAR10DataModule(str(tmp_path)).prepare_data()
    d, _ = _write_cifar(tmp_path)
    (d / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataFileError, match="data_batch_3"):
        CIFAR10DataModule(str(tmp_path)).setup()


def test_tensor_loader_shards_cover_and_reshuffle():
    x = torch.arange(10)
    shards = [list(TensorBatchLoader(x, batch_size=3, shuffle=True, rank=r, world_size=2, seed=1)) for r in (0, 1)]
    seen = torch.cat([b[0] for s in shards for b in s])
    assert len(seen) == 10 and set(seen.tolist()) == set(range(10))
    loader = TensorBatchLoader(x, batch_size=4, shuffle=True, drop_last=True, seed=1)
    assert len(loader) == 2
    first, second = [torch.cat([b[0] for b in loader]) for _ in range(2)]
    assert not torch.equal(first, second)  # a new permutation each epoch
    with pytest.raises(ValueError, match="same length"):
        TensorBatchLoader(x, torch.arange(3), batch_size=2)


def test_digits_splits_and_bad_args():
    dm = DigitsDataModule(batch_size=32, val_fraction=0.1, test_fraction=0.2)
    dm.setup()
    sizes = {s: len(dm.splits[s][1]) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797 and sizes["test"] == 359
    with pytest.raises(ValueError, match="loader must be one of"):
        DigitsDataModule(loader="gpu")
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        DigitsDataModule(batch_size=0)


@pytest.mark.skipif(not (SHARED_DATA / "fashion_mnist").is_dir(), reason="shared Fashion-MNIST not present")
def test_real_fashion_mnist_files():
    dm = FashionMNISTDataModule(str(SHARED_DATA / "fashion_mnist"), val_fraction=0.1)
    dm.setup()
    assert len(dm.splits["test"][1]) == 10000 and len(dm.splits["train"][1]) == 54000
    assert torch.bincount(dm.splits["test"][1]).tolist() == [1000] * 10


def test_resident_loader_follows_trainer_epoch_for_exact_resume():
    """Lightning calls loader.sampler.set_epoch(e) before each epoch: the order depends on e only."""
    x = torch.arange(20)
    a = TensorBatchLoader(x, batch_size=5, shuffle=True, seed=3)
    b = TensorBatchLoader(x, batch_size=5, shuffle=True, seed=3)
    for _ in range(3):  # a has been iterated for three epochs; b is "resumed" at epoch 3
        list(a)
    a.sampler.set_epoch(3)
    b.sampler.set_epoch(3)
    assert torch.equal(torch.cat([t[0] for t in a]), torch.cat([t[0] for t in b]))
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(3 + 3))
    b.set_epoch(3)
    assert torch.equal(torch.cat([t[0] for t in b]), expected)


def test_trainer_sets_resident_loader_epoch(monkeypatch):
    from lightning_tricks._lightning import Trainer
    from lightning_tricks.mixins import Classifier
    from lightning_tricks.models import MLP

    calls = []
    original = TensorBatchLoader.set_epoch
    monkeypatch.setattr(
        TensorBatchLoader, "set_epoch", lambda self, e: (calls.append((self.shuffle, e)), original(self, e))
    )
    trainer = Trainer(
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_train_batches=2,
        limit_val_batches=1,
    )
    trainer.fit(Classifier(MLP((1, 8, 8), 10, hidden=(8,)), 10), DigitsDataModule(loader="resident"))
    assert [e for shuffled, e in calls if shuffled] == [0, 1, 2]


def _order(loader) -> list[int]:
    return torch.cat([t[0] for t in loader]).tolist()


def test_resident_loader_state_resumes_mid_pass():
    x = torch.arange(20)
    a = TensorBatchLoader(x, batch_size=3, shuffle=True, seed=5)
    list(a)  # epoch 0 done
    it = iter(a)
    seen = [next(it)[0].tolist() for _ in range(2)]  # two batches of epoch 1
    state = a.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    rest = [b[0].tolist() for b in it]
    b = TensorBatchLoader(x, batch_size=3, shuffle=True, seed=5)
    b.load_state_dict(state)
    assert b.state_dict() == state  # a loaded, not yet started pass round-trips
    b.set_epoch(1)  # what Lightning does before the resumed epoch: same epoch keeps the resume point
    assert [t[0].tolist() for t in b] == rest
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(5 + 1)).tolist()
    assert [v for batch in seen + rest for v in batch] == expected
    assert b.state_dict() == {"epoch": 2, "batches": 0}  # the pass ended: the next one is epoch 2's


def test_resident_loader_state_at_epoch_end_and_another_epoch():
    x = torch.arange(12)
    a = TensorBatchLoader(x, batch_size=4, shuffle=True, seed=0)
    it = iter(a)
    next(it), next(it)  # limit_train_batches=2 of 3: Lightning's epoch ends here
    b = TensorBatchLoader(x, batch_size=4, shuffle=True, seed=0)
    b.load_state_dict(a.state_dict())
    b.set_epoch(1)  # the next epoch starts from its first batch
    assert _order(b) == torch.randperm(12, generator=torch.Generator().manual_seed(1)).tolist()
    c = TensorBatchLoader(x, batch_size=4, shuffle=True, seed=0)
    c.load_state_dict({"epoch": 0, "batches": 3})  # a complete pass: continue with epoch 1
    assert c.state_dict() == {"epoch": 1, "batches": 0}


def test_resident_loader_state_ignores_a_finished_extra_pass_and_rejects_bad_values():
    x = torch.arange(12)
    a = TensorBatchLoader(x, batch_size=4, shuffle=True)
    it = iter(a)
    next(it)
    for _ in iter(a):  # an extra full pass (e.g. BatchNorm recomputation) while the epoch's pass is open
        pass
    assert a.state_dict() == {"epoch": 0, "batches": 1}
    for bad, match in (
        ({"epoch": -1}, "epoch must be an int >= 0, got -1"),
        ({"epoch": 0, "batches": 1.5}, "batches must be an int >= 0, got 1.5"),
    ):
        with pytest.raises(ValueError, match=match):
            a.load_state_dict(bad)
