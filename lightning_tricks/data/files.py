"""Readers for the original dataset file formats, with clear errors for missing or corrupt files.

- idx (MNIST, Fashion-MNIST): big-endian header ``0 0 dtype ndim``, ``ndim`` int32 sizes, raw data;
  usually gzipped.
- CIFAR-10 python batches: pickled dicts with ``b"data"`` (N x 3072 uint8: R plane, G plane, B plane,
  each 32x32 row-major) and ``b"labels"``. Read with a restricted unpickler (:class:`CifarUnpickler`)
  that accepts only what the format holds, so a crafted batch cannot run code.
- Downloads are verified against the published MD5 checksums (:data:`CHECKSUMS`) before use.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_IDX_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataFileError(ValueError):
    """A data file is missing, truncated or not in the expected format."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (``.gz`` or plain) into an array of its declared shape and dtype."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataFileError(f"corrupt data file {path}: cannot decompress/read it ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFileError(f"corrupt data file {path}: not an idx file (bad magic {raw[:4].hex()!r})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFileError(f"corrupt data file {path}: truncated header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataFileError(f"corrupt data file {path}: expected {expected} bytes for shape {shape}, found {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def check_idx_split(
    images_path: Path, images: np.ndarray, labels_path: Path, labels: np.ndarray, train: tuple[Path, tuple] | None
) -> None:
    """What an idx split must be before training, each fault said in one line naming its file: images (no
    empty split, finite pixels, the training images' size when ``train`` = ``(path, image shape)``) and labels
    (whole numbers: a float label file is read as class indices, and 3.5 is none)."""
    if len(images) == 0:
        raise DataFileError(f"data file {images_path} holds no images: the split is empty")
    if images.dtype.kind == "f":
        bad = ~np.isfinite(images.reshape(len(images), -1)).all(axis=1)
        if bad.any():
            raise DataFileError(
                f"data file {images_path}: {int(bad.sum())} image(s) with NaN or Inf pixels, the first is image "
                f"{int(np.argmax(bad))}; pixels must be finite"
            )
    if train is not None and tuple(images.shape[1:]) != tuple(train[1]):
        shape, like = "x".join(map(str, images.shape[1:])), "x".join(map(str, train[1]))
        raise DataFileError(
            f"data file {images_path}: images are {shape}, but the training images ({train[0]}) are {like}"
        )
    if labels.dtype.kind == "f":
        whole = np.isfinite(labels) & (labels == np.round(labels))
        if not whole.all():
            i = int(np.argmin(whole))
            raise DataFileError(
                f"data file {labels_path}: label {labels[i]} at index {i} is not a class index (a whole number)"
            )


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzipped idx file: the inverse of :func:`read_idx`, for tests."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR python batch holds: dicts, lists, bytes, str, numbers and numpy arrays.

    ``find_class`` is the one door through which a pickle reaches code; it opens only for numpy's array
    reconstruction helpers (the paths of numpy 1.x and 2.x, protocols 2-5), ``ndarray``/``dtype`` and
    ``_codecs.encode`` (bytes in a protocol-2 pickle written by Python 3).
    Anything else (``os.system``, ``builtins.open``, any class) is refused before it is called.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol 2: encode(str, "latin1")
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 python batch never holds")


def _load_cifar_pickle(path: Path) -> object:
    with open(path, "rb") as f:
        return CifarUnpickler(f, encoding="bytes").load()


def read_cifar_batches(directory: str | os.PathLike, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR python batches ``names`` from ``directory``: images ``(N, 3, 32, 32)`` uint8, labels.

    Each file is read with :class:`CifarUnpickler`: a file that refers to anything but plain data and
    numpy arrays is refused (nothing in it runs) with a :class:`DataFileError` naming it.
    """
    xs, ys = [], []
    for name in names:
        path = Path(directory) / name
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-10 batch not found: {path}")
        try:
            d = _load_cifar_pickle(path)
        except pickle.UnpicklingError as e:
            raise DataFileError(f"refused {path}: not a CIFAR-10 python batch ({e}); nothing in it was run") from e
        except Exception as e:  # noqa: BLE001 - any other unpickling failure means a corrupt file
            raise DataFileError(f"corrupt data file {path}: not a CIFAR python batch ({type(e).__name__}: {e})") from e
        try:
            if not isinstance(d, dict):
                raise TypeError(f"a {type(d).__name__}, not a dict")
            raw = d[b"data"]
            if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
                raise TypeError(f"data is {type(raw).__name__} {getattr(raw, 'dtype', '')}, not a uint8 array")
            data = raw
            labels = np.asarray(d.get(b"labels", d.get(b"fine_labels")), dtype=np.int64)
        except Exception as e:  # noqa: BLE001 - wrong content: say what was found
            raise DataFileError(f"corrupt data file {path}: not a CIFAR python batch ({type(e).__name__}: {e})") from e
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise DataFileError(
                f"corrupt data file {path}: expected data (N, 3072) and N labels, got "
                f"data {data.shape} and {labels.shape[0] if labels.ndim else 0} labels"
            )
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def write_cifar_batch(path: str | os.PathLike, images: np.ndarray, labels: Sequence[int]) -> None:
    """Write a CIFAR python batch (images ``(N, 3, 32, 32)`` uint8): the inverse reader, for tests."""
    data = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), 3072)
    with open(path, "wb") as f:
        pickle.dump(
            {b"batch_label": b"written by lightning_tricks", b"labels": list(map(int, labels)), b"data": data},
            f,
            protocol=4,
        )


# The MD5 checksums the datasets' authors publish for their files (Fashion-MNIST's README, MNIST's and
# CIFAR-10's pages; the same values torchvision checks).
CHECKSUMS = {
    "fashion_mnist/train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "fashion_mnist/train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "fashion_mnist/t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "fashion_mnist/t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    "mnist/train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "mnist/train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "mnist/t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "mnist/t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "cifar10/cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
}


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """The MD5 hex digest of a file (read in chunks)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str | None = None) -> None:
    """Download ``url`` to ``dest``, atomically, and check it against ``md5`` before it is used.

    Only called when the user opted in with ``download=True``. The file arrives as ``dest.part``; on a
    checksum mismatch it is deleted and a ``DataFileError`` says so, so nothing unverified is ever read.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:  # noqa: S310 - fixed URLs
            shutil.copyfileobj(r, f)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"download of {url} failed ({e}); put the files in {dest.parent} by hand") from e
    if md5 is not None:
        found = md5sum(tmp)
        if found != md5:
            tmp.unlink(missing_ok=True)
            raise DataFileError(
                f"download of {url} has MD5 {found}, the published checksum is {md5}: the file "
                "was deleted (a corrupt or tampered download); try again or fetch it by hand"
            )
    tmp.replace(dest)


def extract_tar(path: Path, into: Path) -> None:
    with tarfile.open(path) as tar:
        tar.extractall(into, filter="data")
