"""Fashion-MNIST / MNIST (idx ``.gz`` files) and CIFAR-10 (python pickle batches) from a directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_tricks.data.base import TensorDataModule
from lightning_tricks.data.files import (
    CHECKSUMS,
    check_idx_split,
    download,
    extract_tar,
    read_cifar_batches,
    read_idx,
)

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MIRRORS = {
    "fashion_mnist": "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def _missing(directory: Path, names: list[str], what: str) -> None:
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{what} files not found in data_dir={str(directory)!r}: missing {missing}. "
            f"Point data_dir at a folder holding them, or set download=true (needs internet)."
        )


def _limit(x: Tensor, y: Tensor, n: int | None) -> tuple[Tensor, Tensor]:
    return (x, y) if n is None else (x[:n], y[:n])


class IdxImageDataModule(TensorDataModule):
    """MNIST-format data (the four original ``*-idx?-ubyte.gz`` files) read from ``data_dir``.

    Args:
        data_dir: folder holding the four files.
        dataset: ``"fashion_mnist"`` or ``"mnist"`` (picks the download mirror).
        download: fetch the files into ``data_dir`` if missing (opt-in; needs internet).
        limit_train, limit_test: keep only the first N samples (quick runs, tests).
        **kwargs: :class:`TensorDataModule` options (batch_size, val_fraction, loader, augment, flip,
            normalize, ...). ``flip`` defaults to on for Fashion-MNIST (a mirrored garment is the same
            garment) and off for MNIST (a mirrored digit may not be a digit).
    """

    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(
        self,
        data_dir: str,
        dataset: str = "fashion_mnist",
        download: bool = False,
        limit_train: int | None = None,
        limit_test: int | None = None,
        **kwargs,
    ) -> None:
        if dataset not in MIRRORS:
            raise ValueError(f"dataset must be one of {sorted(MIRRORS)}, got {dataset!r}")
        if kwargs.get("flip") is None:
            kwargs["flip"] = dataset == "fashion_mnist"
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir).expanduser()
        self.dataset = dataset
        self.download = download
        self.limit_train, self.limit_test = limit_train, limit_test

    def prepare_data(self) -> None:
        names = [n for pair in IDX_FILES.values() for n in pair]
        if self.download:
            for n in names:
                if not (self.data_dir / n).is_file():
                    download(MIRRORS[self.dataset] + n, self.data_dir / n, md5=CHECKSUMS[f"{self.dataset}/{n}"])
        _missing(self.data_dir, names, self.dataset)

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        self.prepare_data()
        out = {}
        train: tuple[Path, tuple] | None = None
        for split, (images, labels) in IDX_FILES.items():
            x = read_idx(self.data_dir / images)
            y = read_idx(self.data_dir / labels)
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                raise ValueError(
                    f"{self.data_dir}: {images} has shape {x.shape} and {labels} {y.shape}; "
                    "expected (N, H, W) images and N labels"
                )
            check_idx_split(self.data_dir / images, x, self.data_dir / labels, y, train)
            train = train or (self.data_dir / images, x.shape[1:])
            out[split] = (torch.from_numpy(x.copy()).float().unsqueeze(1) / 255.0, torch.from_numpy(y.astype(np.int64)))
        out["train"] = _limit(*out["train"], self.limit_train)
        out["test"] = _limit(*out["test"], self.limit_test)
        self.input_shape = tuple(out["train"][0].shape[1:])  # type: ignore[assignment]
        return out


class FashionMNISTDataModule(IdxImageDataModule):
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017, arXiv:1708.07747) from ``data_dir``; flips on by default."""

    default_flip = True

    def __init__(self, data_dir: str, **kwargs) -> None:
        super().__init__(data_dir, dataset="fashion_mnist", **kwargs)


class MNISTDataModule(IdxImageDataModule):
    """MNIST (LeCun et al. 1998) from ``data_dir``; flips off by default."""

    default_flip = False

    def __init__(self, data_dir: str, **kwargs) -> None:
        super().__init__(data_dir, dataset="mnist", **kwargs)


class CIFAR10DataModule(TensorDataModule):
    """CIFAR-10 from the python pickle batches (``cifar-10-batches-py/`` as distributed).

    ``data_dir`` may be the ``cifar-10-batches-py`` folder itself or its parent. ``data_batch_1..5``
    are training data, ``test_batch`` the test set. Images are ``(3, 32, 32)`` pixels in ``[0, 1]``
    normalized per channel with the training split's statistics (``normalize``); flips on by default.
    """

    num_classes = 10
    input_shape = (3, 32, 32)
    default_flip = True

    def __init__(
        self,
        data_dir: str,
        download: bool = False,
        limit_train: int | None = None,
        limit_test: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir).expanduser()
        self.download = download
        self.limit_train, self.limit_test = limit_train, limit_test

    def batches_dir(self) -> Path:
        if (self.data_dir / "test_batch").is_file() or self.data_dir.name == CIFAR10_DIR:
            return self.data_dir
        return self.data_dir / CIFAR10_DIR

    def prepare_data(self) -> None:
        names = [*CIFAR10_TRAIN, "test_batch"]
        directory = self.batches_dir()
        if self.download and not all((directory / n).is_file() for n in names):
            archive = self.data_dir / "cifar-10-python.tar.gz"
            download(CIFAR10_URL, archive, md5=CHECKSUMS["cifar10/cifar-10-python.tar.gz"])
            extract_tar(archive, self.data_dir)
            directory = self.batches_dir()
        _missing(directory, names, "CIFAR-10")

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        self.prepare_data()
        d = self.batches_dir()
        x, y = read_cifar_batches(d, CIFAR10_TRAIN)
        xt, yt = read_cifar_batches(d, ["test_batch"])
        train = _limit(torch.from_numpy(x).float() / 255.0, torch.from_numpy(y), self.limit_train)
        test = _limit(torch.from_numpy(xt).float() / 255.0, torch.from_numpy(yt), self.limit_test)
        return {"train": train, "test": test}
