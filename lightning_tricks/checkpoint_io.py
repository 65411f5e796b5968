"""Checkpoint files that a kill or a full disk cannot corrupt.

A checkpoint is written to a hidden partial file beside its target (same directory, so the same file
system), flushed and fsynced, then moved over the target with ``os.replace``, which is atomic on POSIX:
at every moment the target is either the previous complete file or the new complete one. Writing
beside the target (not in ``$TMPDIR``) matters on clusters, where the run directory sits on shared
storage and a move from node-local ``/tmp`` would be a copy into the final path. On a failed write
(full disk, read-only directory, file-size limit) the partial file is removed and
:class:`CheckpointWriteError` names the path and the cause in one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointWriteError", "atomic_torch_save", "partial_path", "remove_partial_files"]

PARTIAL_SUFFIX = ".partial"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; ``str()`` is one line with the path and the cause."""

    def __init__(self, path: str | os.PathLike[str], cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.path = str(path)
        self.cause = cause

    def __str__(self) -> str:
        reason = self.cause.strerror or str(self.cause)
        return f"could not write checkpoint {self.path}: {reason} (the previous checkpoint there is intact)"


def partial_path(path: str | os.PathLike[str]) -> Path:
    """Where the checkpoint for ``path`` is written before it is moved into place (a hidden file beside it)."""
    target = Path(path)
    return target.with_name(f".{target.name}{PARTIAL_SUFFIX}")


def remove_partial_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove partial files left in ``directory`` by a writer that was killed; returns what was removed."""
    removed = []
    for leftover in Path(directory).glob(f".*{PARTIAL_SUFFIX}"):
        try:
            leftover.unlink()
            removed.append(leftover)
        except OSError:
            pass  # another process's file, or already gone: nothing of ours to clean
    return removed


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: torch's zip writer reports a failed write as a RuntimeError whose
    context is the OSError (``No space left on device``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable; some file systems (and all non-POSIX ones) refuse: then the
    file's own fsync is what we have."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` so that ``path`` is always a complete file (see the module docstring).

    Raises:
        CheckpointWriteError: the write failed for a file-system reason (the partial file is removed).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     atomic_torch_save({"step": 3}, f"{d}/last.ckpt")
        ...     torch.load(f"{d}/last.ckpt")["step"], sorted(p.name for p in Path(d).iterdir())
        (3, ['last.ckpt'])
    """
    target = Path(path)
    partial = partial_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, target)
    except BaseException as exc:
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass
        cause = _os_error(exc)
        if cause is not None:
            raise CheckpointWriteError(target, cause) from exc
        raise
    _fsync_directory(target.parent)
