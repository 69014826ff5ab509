"""The train/validation split of a log by episode id, and the record a training run keeps of it.

One function decides which episodes are held out, for training and for evaluation alike:

    key(id) = mix64(id ⊕ mix64(seed)),   validation = the n_val ids with the smallest keys,
    n_val = min(round(val_fraction · E), E − 1)

where `mix64` is the SplitMix64 finaliser (Steele, Lea & Flood, 2014) on unsigned 64-bit
integers. It is a bijection, so distinct ids get distinct keys and there are no ties. The split
depends only on the *set* of episode ids, the fraction and the seed: not on file order, ordinals,
torch's generator or the process reading it, so `offpg evaluate` (or any other reader, in any
language) recomputes the same split. A training run also writes the ids it held out
(`validation_episodes.json`), which readers should prefer to recomputing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import overload

import numpy as np
import torch
from torch import Tensor

VALIDATION_RECORD = "validation_episodes.json"

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL_1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL_2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (arithmetic modulo 2^64)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MUL_1
    x = (x ^ (x >> np.uint64(27))) * _MUL_2
    return x ^ (x >> np.uint64(31))


def _as_uint64(values: np.ndarray) -> np.ndarray:
    """int64 values as their two's-complement uint64 bits (negative ids included)."""
    return np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)


def split_keys(episode_ids: np.ndarray, seed: int) -> np.ndarray:
    """[E] uint64 sort keys mix64(id ⊕ mix64(seed)); the smallest keys are held out."""
    seed_key = _mix64(_as_uint64(np.array([seed])))[0]
    return _mix64(_as_uint64(episode_ids) ^ seed_key)


@overload
def split_episodes(episode_ids: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    ...


@overload
def split_episodes(
    episode_ids: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    ...


def split_episodes(
    episode_ids: Tensor | np.ndarray, val_fraction: float, seed: int
) -> tuple[Tensor, Tensor] | tuple[np.ndarray, np.ndarray]:
    """Split episode ids into (training ids, validation ids), both sorted ascending.

    Deterministic in (the set of ids, `val_fraction`, `seed`); see the module docstring for the
    rule. The validation part holds min(round(val_fraction · E), E − 1) ids, so at least one
    episode is left to train on; it is empty when `val_fraction` is 0.

    Args:
        episode_ids: [E] distinct int64 episode ids (a tensor or a numpy array), in any order.
        val_fraction: fraction of episodes held out, in [0, 1).
        seed: the run's seed.

    Returns:
        Two arrays of the input's kind (tensor or numpy), int64.

    Raises:
        ValueError: no ids, repeated ids, or a fraction outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    as_tensor = isinstance(episode_ids, Tensor)
    given = episode_ids.cpu().numpy() if isinstance(episode_ids, Tensor) else episode_ids
    ids = np.sort(np.asarray(given, dtype=np.int64).reshape(-1))
    if len(ids) == 0:
        raise ValueError("cannot split a log with no episodes")
    repeated = ids[1:][ids[1:] == ids[:-1]]
    if len(repeated):
        raise ValueError(f"episode ids must be distinct; id {int(repeated[0])} appears twice")
    n_val = min(round(val_fraction * len(ids)), len(ids) - 1)
    held_out = np.zeros(len(ids), dtype=bool)
    held_out[np.argsort(split_keys(ids, seed), kind="stable")[:n_val]] = True
    train_ids, val_ids = ids[~held_out], ids[held_out]
    if as_tensor:
        return torch.from_numpy(train_ids), torch.from_numpy(val_ids)
    return train_ids, val_ids


def validation_digest(episode_ids: Tensor | np.ndarray | list[int]) -> str:
    """sha256 hex of the sorted ids written as a compact JSON array, e.g. of `[3,17,42]`."""
    ids = sorted(int(i) for i in np.asarray(episode_ids).reshape(-1))
    return hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).hexdigest()


def write_validation_record(folder: Path, episode_ids: Tensor | np.ndarray) -> Path:
    """Write `folder/validation_episodes.json`: {"episode_ids": [...sorted], "digest": sha256}.

    Written to a temporary name and renamed, so a reader never sees half a record.
    """
    ids = sorted(int(i) for i in np.asarray(episode_ids).reshape(-1))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / VALIDATION_RECORD
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"episode_ids": ids, "digest": validation_digest(ids)}) + "\n")
    tmp.replace(path)
    return path


def read_validation_record(path: Path) -> Tensor:
    """The held-out episode ids a run recorded (sorted int64), checked against their digest.

    Raises:
        ValueError: the file is not such a record, or its ids do not match its digest.
    """
    try:
        raw = json.loads(Path(path).read_text())
        ids = [int(i) for i in raw["episode_ids"]]
        digest = str(raw["digest"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a validation-episodes record ({err})") from None
    if validation_digest(ids) != digest:
        raise ValueError(f"{path}: the episode ids do not match the recorded digest")
    return torch.tensor(sorted(ids), dtype=torch.int64)
