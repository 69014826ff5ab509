"""`dataset_info`: statistics recomputed from the rows, propensities, provenance, verification."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from offpg_offline.data.info import dataset_info, format_info
from offpg_offline.data.schema import DataError
from offpg_offline.data.store import read_card, write_dataset

LENGTHS = [5, 2, 8, 3]


@pytest.fixture
def dataset(tmp_path, make_log):
    table = make_log(LENGTHS, seed=11)
    card = {"name": "tiny", "description": "four episodes", "env_spec": {"id": "CartPole-v1"},
            "source": {"kind": "test", "files": [{"path": "/logs/a.parquet"}]},
            "behavior": "uniform over 3 actions",
            "action_space": {"type": "Discrete", "dtype": "int64", "start": 0, "n": 3},
            "propensity": {"logged_logp": {"source": "logger"}}}
    return write_dataset(tmp_path / "tiny", [table], card=card, rows_per_file=6), table


def test_info_recomputes_statistics_from_the_rows(dataset) -> None:
    path, table = dataset
    info = dataset_info(path)
    reward = table.column("reward").to_numpy().astype(np.float64)
    bounds = np.cumsum([0, *LENGTHS])
    returns = [reward[a:b].sum() for a, b in itertools.pairwise(bounds)]
    assert info["counts"] == {"episodes": 4, "steps": 18, "files": len(read_card(path)["files"])}
    assert info["card_counts_match"]
    assert info["episode_length"] == {"min": 2, "mean": 4.5, "max": 8}
    assert info["episode_return"]["mean"] == pytest.approx(np.mean(returns), rel=1e-12)
    assert info["episode_return"]["min"] == pytest.approx(min(returns), rel=1e-12)
    terminated = int(table.column("terminated").to_numpy(zero_copy_only=False).sum())
    assert (info["episodes_terminated"], info["episodes_truncated"]) == (terminated,
                                                                         4 - terminated)
    logp = table.column("logged_logp").to_numpy().astype(np.float64)
    logged = info["propensity"]["logged_logp"]
    assert logged["present"] and logged["source"] == {"source": "logger"}
    assert logged["log_range"]["max"] == pytest.approx(logp.max())
    assert logged["probability_range"]["min"] == pytest.approx(np.exp(logp.min()))
    assert info["propensity"]["estimated_logp"] == {"present": False, "source": None,
                                                    "log_range": None}
    assert info["provenance"]["behavior"] == "uniform over 3 actions"
    assert info["verify"] is None
    json.dumps(info, allow_nan=False)  # --json output is strict JSON


def test_format_info_prints_each_section(dataset) -> None:
    path, _ = dataset
    text = format_info(dataset_info(path, verify=True))
    lines = text.splitlines()
    assert lines[0] == f"tiny  ({path}, schema v1)"
    assert "steps 18 in 4 episodes" in text
    assert "action space: Discrete(3)" in lines
    assert "observation space: Box(shape=(3,), [-inf, inf], float32)" in lines
    assert "environment: CartPole-v1" in lines
    assert "episode length: min 2, mean 4.5, max 8" in lines
    assert any(line.startswith("logged_logp: present (logger); log range min ") for line in lines)
    assert "estimated_logp: absent" in lines
    assert "source: test" in lines and "  files: 1: /logs/a.parquet" in lines
    assert "behavior policy: uniform over 3 actions" in lines
    assert lines[-1] == "verify: every shard matches its sha256 and row count in the card"


def test_verify_reports_a_tampered_shard(dataset) -> None:
    path, _ = dataset
    shard = path / read_card(path)["files"][1]["name"]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    info = dataset_info(path, verify=True)
    assert not info["verify"]["ok"]
    assert info["verify"]["problems"][0].startswith(f"{shard}: sha256 ")
    with pytest.raises(DataError, match=r"a shard cannot be read \(.*\); run offpg info --verify"):
        dataset_info(path)
