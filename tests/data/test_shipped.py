"""The shipped logs in datasets/: each card matches its files, and the data is what it claims."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from offpg_offline.data.batch import load_steps
from offpg_offline.data.schema import SCHEMA_VERSION
from offpg_offline.data.store import read_card, read_table, verify_dataset
from offpg_offline.data.synthetic import SYNTHETIC

DATASETS = Path(__file__).resolve().parents[2] / "datasets"
NAMES = sorted(SYNTHETIC)
MAX_BYTES = 5_000_000


def _vectors(table, name: str) -> np.ndarray:
    column = table.column(name).combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1)


@pytest.mark.parametrize("name", NAMES)
def test_card_matches_files(name: str) -> None:
    path = DATASETS / name
    card = read_card(path)
    assert verify_dataset(path) == []  # sha256, rows per file, total steps
    assert card["schema_version"] == SCHEMA_VERSION
    assert card["name"] == name
    assert sum(f.stat().st_size for f in path.iterdir()) < MAX_BYTES
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["_dataset.json", *(f["name"] for f in card["files"])])
    for entry in card["files"]:
        assert hashlib.sha256((path / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]
    spec = SYNTHETIC[name]
    assert card["env_spec"]["id"] == spec.env_id
    assert card["env_spec"]["max_episode_steps"] == (500 if spec.env_id == "CartPole-v1" else 200)


@pytest.mark.parametrize("name", NAMES)
def test_counts_returns_and_propensities_match_contents(name: str) -> None:
    path = DATASETS / name
    card = read_card(path)
    spec = SYNTHETIC[name]
    batch = load_steps(path)
    assert card["counts"] == {"episodes": batch.n_episodes, "steps": batch.n_steps}
    assert batch.n_episodes == spec.episodes
    index = batch.episode_index().numpy()
    returns = np.bincount(index, weights=batch.reward.double().numpy())
    # float64 sums of the same float32 rewards, possibly in another order: 1e-9 relative.
    assert card["behavior"]["mean_return"] == pytest.approx(returns.mean(), rel=1e-9)
    assert card["behavior"]["std_return"] == pytest.approx(returns.std(), rel=1e-9)
    assert (batch.logged_logp is not None) == spec.with_logp
    assert (card["propensity"]["logged_logp"] is not None) == spec.with_logp
    assert batch.estimated_logp is None and card["propensity"]["estimated_logp"] is None


@pytest.mark.parametrize("name", [n for n in NAMES if SYNTHETIC[n].with_logp])
def test_logged_logp_is_the_behavior_policy_log_probability(name: str) -> None:
    table = read_table(DATASETS / name)
    policy = SYNTHETIC[name].policy
    discrete = table.schema.field("action").type == pa.int64()
    action = table.column("action").to_numpy() if discrete else _vectors(table, "action")
    expected = policy.log_prob(_vectors(table, "obs"), action).astype(np.float32)
    np.testing.assert_array_equal(table.column("logged_logp").to_numpy(), expected)


def test_noprop_is_the_eps_log_without_propensities() -> None:
    with_logp = read_table(DATASETS / "cartpole-eps")
    without = read_table(DATASETS / "cartpole-eps-noprop")
    for column in ("episode_id", "step", "obs", "action", "reward", "next_obs", "terminated",
                   "truncated"):
        assert with_logp.column(column).equals(without.column(column)), column
    assert without.column("logged_logp").null_count == without.num_rows
    assert read_card(DATASETS / "cartpole-eps-noprop")["source"]["propensities_in"] == (
        "cartpole-eps")


def test_behavior_returns_leave_room_to_improve() -> None:
    # The reasons these logs exist (see datasets/README.md).
    eps = read_card(DATASETS / "cartpole-eps")["behavior"]
    weak = read_card(DATASETS / "cartpole-weak")["behavior"]
    pendulum = read_card(DATASETS / "pendulum-gauss")["behavior"]
    assert eps["mean_return"] < 400 and eps["greedy_mean_return"] == 500.0
    assert weak["mean_return"] < 100 and weak["greedy_mean_return"] < 100
    assert weak["p_controller_action"] == pytest.approx(0.7)
    assert pendulum["mean_return"] < -400 and pendulum["greedy_mean_return"] < -300

