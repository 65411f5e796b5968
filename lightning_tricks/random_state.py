"""The global random number generator states of a process, as plain data that a checkpoint can carry.

A run resumed from a checkpoint draws exactly what the uninterrupted run drew only if every generator
it draws from continues where it was: torch's CPU generator (dropout, drop path, DropConnect, a
``DataLoader``'s base seed and ``RandomSampler``), each CUDA device's generator (dropout on the GPU),
numpy's global ``RandomState`` and Python's ``random``. :func:`get_rng_states` collects them and
:func:`set_rng_states` puts them back.

The collected states are a ``dict`` of ``str``/``int``/``float``/``None`` and ``uint8``/``int64`` tensors,
so a checkpoint holding them loads with ``torch.load(..., weights_only=True)`` (no pickled numpy
arrays, no arbitrary objects). Only torch and numpy are imported here; the Lightning wiring is
:class:`lightning_tricks.callbacks.RandomState`.

Example:
    >>> import torch
    >>> states = get_rng_states()
    >>> a = torch.rand(3)
    >>> _ = set_rng_states(states)
    >>> torch.equal(a, torch.rand(3))
    True
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["RNG_KEYS", "check_rng_states", "get_rng_states", "set_rng_states"]

RNG_KEYS = ("torch", "cuda", "numpy", "python")


def _numpy_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "kind": str(kind),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _python_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {
        "version": int(version),
        "internal": torch.tensor(internal, dtype=torch.int64),
        "gauss_next": None if gauss_next is None else float(gauss_next),
    }


def get_rng_states(cuda: bool | None = None) -> dict[str, Any]:
    """The states of torch's CPU generator, every CUDA device's generator, numpy's and Python's.

    Args:
        cuda: collect the CUDA generators; ``None`` = when CUDA is available. Collecting initializes
            CUDA on every visible device.

    Returns:
        ``{"torch": uint8 tensor, "cuda": [uint8 tensor per device], "numpy": {...}, "python": {...}}``,
        plain data and tensors only (loads with ``torch.load(weights_only=True)``).
    """
    if cuda is None:
        cuda = torch.cuda.is_available()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if cuda else [],
        "numpy": _numpy_state(),
        "python": _python_state(),
    }


def check_rng_states(states: Any) -> None:
    """Raise ``ValueError`` (``TypeError`` if not a dict) naming what is wrong if ``states`` is not what
    :func:`get_rng_states` returns."""
    if not isinstance(states, dict):
        raise TypeError(f"RNG states must be a dict with keys {RNG_KEYS}, got {type(states).__name__}")
    missing = [k for k in RNG_KEYS if k not in states]
    if missing:
        raise ValueError(f"RNG states miss the keys {missing}; got keys {sorted(map(str, states))}")
    cpu = states["torch"]
    if not (isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8 and cpu.ndim == 1):
        raise ValueError(f"RNG states['torch'] must be a 1-d uint8 tensor (torch.get_rng_state()), got {cpu!r:.80}")
    if not isinstance(states["cuda"], (list, tuple)) or not all(
        isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in states["cuda"]
    ):
        raise ValueError("RNG states['cuda'] must be a list of uint8 tensors (one per CUDA device)")
    np_state = states["numpy"]
    if not isinstance(np_state, dict) or not {"kind", "keys", "pos", "has_gauss", "cached_gaussian"} <= set(np_state):
        raise ValueError(
            f"RNG states['numpy'] must be a dict with kind, keys, pos, has_gauss, cached_gaussian; got {np_state!r:.80}"
        )
    py_state = states["python"]
    if not isinstance(py_state, dict) or not {"version", "internal", "gauss_next"} <= set(py_state):
        raise ValueError(
            f"RNG states['python'] must be a dict with version, internal, gauss_next; got {py_state!r:.80}"
        )


def set_rng_states(states: dict[str, Any], cuda: bool | None = None) -> int:
    """Put back states collected by :func:`get_rng_states`; the next draws equal those made after collecting.

    Args:
        states: what :func:`get_rng_states` returned (possibly after a checkpoint round trip).
        cuda: set the CUDA generators; ``None`` = when CUDA is available and ``states`` has any.

    Returns:
        The number of CUDA devices whose state was set: ``min(saved, visible)`` devices; compare it with
        ``len(states["cuda"])`` to tell that some saved CUDA states had no device to go to.

    Raises:
        ValueError, TypeError: ``states`` does not have the layout of :func:`get_rng_states` (the message
            says what).
    """
    check_rng_states(states)
    torch.set_rng_state(states["torch"])
    n_cuda = 0
    if cuda is None:
        cuda = bool(states["cuda"]) and torch.cuda.is_available()
    if cuda:
        n_cuda = min(len(states["cuda"]), torch.cuda.device_count())
        for device, state in enumerate(states["cuda"][:n_cuda]):
            torch.cuda.set_rng_state(state, device)
    np_state = states["numpy"]
    keys = np.asarray(torch.as_tensor(np_state["keys"]).numpy(), dtype=np.uint32)
    np.random.set_state(
        (
            str(np_state["kind"]),
            keys,
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["cached_gaussian"]),
        )
    )
    py_state = states["python"]
    internal = tuple(int(v) for v in torch.as_tensor(py_state["internal"]).tolist())
    gauss_next = py_state["gauss_next"]
    random.setstate((int(py_state["version"]), internal, None if gauss_next is None else float(gauss_next)))
    return n_cuda


def check_checkpoint_states(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``{"world_size", "ranks"}`` from a saved state, every rank's states checked; errors name the rank."""
    ranks = state_dict.get("ranks")
    if not isinstance(ranks, (list, tuple)) or not ranks:
        raise ValueError(
            f"RandomState: the checkpoint's state has no 'ranks' list of RNG states, "
            f"got keys {sorted(map(str, state_dict))}"
        )
    for i, states in enumerate(ranks):
        try:
            check_rng_states(states)
        except (ValueError, TypeError) as e:
            raise type(e)(f"RandomState: rank {i} in the checkpoint: {e}") from None
    return {"world_size": int(state_dict.get("world_size", len(ranks))), "ranks": list(ranks)}
