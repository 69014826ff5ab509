"""The split by episode id (`data.split`): a seeded partition that any reader can recompute."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from offpg_offline.data.split import (
    read_validation_record,
    split_episodes,
    split_keys,
    validation_digest,
    write_validation_record,
)

MASK = (1 << 64) - 1


def _splitmix64(state: int) -> int:
    """SplitMix64's `next()` on Python integers (Steele, Lea & Flood 2014; Vigna's C code):
    a slow reference for the vectorised numpy version."""
    z = (state + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_the_mixer_is_splitmix64() -> None:
    # The first output of SplitMix64 seeded with 0, as printed by the reference C code.
    assert _splitmix64(0) == 0xE220A8397B1DCDAF
    ids = np.array([0, 1, 7, 123_456_789, -1, -(2**63), 2**63 - 1], dtype=np.int64)
    seed_key = _splitmix64(11)
    expected = [_splitmix64((int(i) & MASK) ^ seed_key) for i in ids]
    assert split_keys(ids, 11).tolist() == expected


def test_validation_is_the_ids_with_the_smallest_keys() -> None:
    ids = [*range(1000, 1040), -5, 2**40]
    seed_key = _splitmix64(3)
    by_key = sorted(ids, key=lambda i: _splitmix64((i & MASK) ^ seed_key))
    n_val = round(0.25 * len(ids))  # 10.5 rounds to 10
    train_ids, val_ids = split_episodes(torch.tensor(ids), 0.25, 3)
    assert val_ids.tolist() == sorted(by_key[:n_val])
    assert train_ids.tolist() == sorted(by_key[n_val:])


def test_split_depends_on_the_set_of_ids_not_their_order_or_container() -> None:
    ids = np.arange(10, 210, 2)
    shuffled = np.random.default_rng(0).permutation(ids)
    train_a, val_a = split_episodes(ids, 0.2, 5)
    train_b, val_b = split_episodes(torch.from_numpy(shuffled), 0.2, 5)
    assert isinstance(val_a, np.ndarray) and isinstance(val_b, torch.Tensor)
    assert val_a.tolist() == val_b.tolist() and train_a.tolist() == train_b.tolist()
    assert len(val_a) == 20 and set(val_a) | set(train_a) == set(ids.tolist())
    assert split_episodes(ids, 0.2, 6)[1].tolist() != val_a.tolist()  # the seed matters


def test_held_out_ids_are_spread_over_the_log() -> None:
    # 10,000 consecutive ids, 20% held out: each tenth of the ids holds a Binomial(1000, 0.2)
    # share (mean 200, sd 12.6) up to the finite-population correction; 6 sd is 76.
    _, val_ids = split_episodes(np.arange(10_000), 0.2, 0)
    counts = np.bincount(val_ids // 1000, minlength=10)
    assert counts.sum() == 2000
    assert np.all(np.abs(counts - 200) < 76), counts


def test_at_least_one_episode_trains_and_zero_holds_none_out() -> None:
    assert [len(part) for part in split_episodes(np.arange(3), 0.9, 0)] == [1, 2]
    assert [len(part) for part in split_episodes(np.arange(3), 0.0, 0)] == [3, 0]


def test_bad_inputs_are_one_sentence() -> None:
    with pytest.raises(ValueError, match="id 4 appears twice"):
        split_episodes(np.array([4, 1, 4]), 0.2, 0)
    with pytest.raises(ValueError, match="no episodes"):
        split_episodes(np.zeros(0, dtype=np.int64), 0.2, 0)
    with pytest.raises(ValueError, match=r"val_fraction must lie in \[0, 1\), got 1.0"):
        split_episodes(np.arange(4), 1.0, 0)


def test_record_round_trips_and_its_digest_is_sha256_of_the_json_ids(tmp_path: Path) -> None:
    path = write_validation_record(tmp_path / "run", torch.tensor([42, 3, 17]))
    raw = json.loads(path.read_text())
    assert raw["episode_ids"] == [3, 17, 42]
    assert raw["digest"] == hashlib.sha256(b"[3,17,42]").hexdigest()
    assert validation_digest([17, 42, 3]) == raw["digest"]
    assert read_validation_record(path).tolist() == [3, 17, 42]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["validation_episodes.json"]

    raw["episode_ids"] = [3, 17, 43]
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="do not match the recorded digest"):
        read_validation_record(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a validation-episodes record"):
        read_validation_record(path)
