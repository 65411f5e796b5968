"""Readers for the original dataset file formats, with clear errors for missing or corrupt files.

- idx (MNIST, Fashion-MNIST): big-endian header ``0 0 dtype ndim``, ``ndim`` int32 sizes, raw data;
  usually gzipped.
- CIFAR-10 python batches: pickled dicts with ``b"data"`` (N x 3072 uint8: R plane, G plane, B plane,
  each 32x32 row-major) and ``b"labels"``.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tarfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


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
        raise DataFileError(f"corrupt data file {path}: expected {expected} bytes for shape {shape}, "
                            f"found {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzipped idx file: the inverse of :func:`read_idx`, for tests."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def read_cifar_batches(directory: str | os.PathLike, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR python batches ``names`` from ``directory``: images ``(N, 3, 32, 32)`` uint8, labels."""
    xs, ys = [], []
    for name in names:
        path = Path(directory) / name
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-10 batch not found: {path}")
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            data = np.asarray(d[b"data"], dtype=np.uint8)
            labels = np.asarray(d.get(b"labels", d.get(b"fine_labels")), dtype=np.int64)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
            raise DataFileError(f"corrupt data file {path}: not a CIFAR python batch ({type(e).__name__}: {e})") from e
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise DataFileError(f"corrupt data file {path}: expected data (N, 3072) and N labels, got "
                                f"data {data.shape} and {labels.shape[0] if labels.ndim else 0} labels")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def write_cifar_batch(path: str | os.PathLike, images: np.ndarray, labels: Sequence[int]) -> None:
    """Write a CIFAR python batch (images ``(N, 3, 32, 32)`` uint8): the inverse reader, for tests."""
    data = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), 3072)
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"written by lightning_tricks", b"labels": list(map(int, labels)),
                     b"data": data}, f, protocol=4)


def download(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` (atomically); only called when the user opted in with ``download=True``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:  # noqa: S310 - fixed https URLs
            shutil.copyfileobj(r, f)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"download of {url} failed ({e}); put the files in {dest.parent} by hand") from e
    tmp.replace(dest)


def extract_tar(path: Path, into: Path) -> None:
    with tarfile.open(path) as tar:
        tar.extractall(into, filter="data")
