"""The shipped logs in datasets/: each card matches its files, and the data is what it claims."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

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



# --- the harder logs (issue 15): LunarLander (Box2D, the `envs` extra) and MountainCar ------

HARDER = {  # name: (env id, max_episode_steps, episodes)
    "lander-clipped": ("LunarLanderContinuous-v3", 1000, 100),
    "lander-eps": ("LunarLander-v3", 1000, 200),
    "mountaincar-gauss": ("MountainCarContinuous-v0", 999, 100),
}
ENVS_EXTRA = ("the LunarLander logs need Box2D: install the envs extra "
              "(pip install -c constraints.txt -e '.[envs]')")


def _heuristic(obs: np.ndarray, *, continuous: bool) -> np.ndarray:
    """gymnasium's own `lunar_lander.heuristic`, row by row (an implementation independent of
    scripts/make_datasets.py's vectorised one), on float64 rows."""
    from types import SimpleNamespace

    pytest.importorskip("Box2D", reason=ENVS_EXTRA)
    from gymnasium.envs.box2d import lunar_lander as lander
    env = SimpleNamespace(unwrapped=SimpleNamespace(continuous=continuous))
    return np.array([lander.heuristic(env, row) for row in obs.astype(np.float64)])


def _within_float32_rounding(stored: np.ndarray, exact: np.ndarray) -> None:
    # logged_logp is float32(the float64 density); recomputed in float64 in another order
    # (errors ~1e-13), the stored value is within one float32 spacing of it.
    gap = np.abs(stored.astype(np.float64) - exact)
    assert (gap <= np.spacing(np.abs(exact).astype(np.float32))).all(), gap.max()


@pytest.mark.parametrize("name", sorted(HARDER))
def test_harder_card_matches_files(name: str) -> None:
    path = DATASETS / name
    card = read_card(path)
    env_id, limit, episodes = HARDER[name]
    assert verify_dataset(path) == []
    assert card["name"] == name and card["schema_version"] == SCHEMA_VERSION
    assert sum(f.stat().st_size for f in path.iterdir()) < MAX_BYTES
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["_dataset.json", *(f["name"] for f in card["files"])])
    assert card["env_spec"]["id"] == env_id and card["env_spec"]["max_episode_steps"] == limit
    batch = load_steps(path)
    assert card["counts"] == {"episodes": episodes, "steps": batch.n_steps}
    returns = np.bincount(batch.episode_index().numpy(), weights=batch.reward.double().numpy())
    behavior = card["behavior"]
    # float64 sums of the same float32 rewards, possibly in another order: 1e-9 relative.
    assert behavior["mean_return"] == pytest.approx(returns.mean(), rel=1e-9)
    assert behavior["std_return"] == pytest.approx(returns.std(), rel=1e-9)
    # the description quotes both returns (datasets/README.md is built from the same cards)
    assert f"Behavior return {returns.mean():.1f} ± {returns.std():.1f}" in card["description"]
    assert f"return {behavior['greedy_mean_return']:.1f} ±" in card["description"]
    assert card["propensity"]["logged_logp"] is not None and batch.logged_logp is not None
    readme = (DATASETS / "README.md").read_text()
    assert f"| `{name}` | {env_id} | {episodes} | {batch.n_steps} |" in readme


def test_lander_clipped_is_an_unclipped_log_with_gaussian_densities() -> None:
    path = DATASETS / "lander-clipped"
    card = read_card(path)
    # what `offpg ingest parquet --actions unclipped --env ...` writes
    assert card["actions"]["semantics"] == "unclipped"
    assert card["env_action_space"]["low"] == [-1.0, -1.0]
    assert card["env_action_space"]["high"] == [1.0, 1.0]
    assert card["action_space"]["low"] == ["-inf", "-inf"]
    table = read_table(path)
    obs, action = _vectors(table, "obs"), _vectors(table, "action")
    outside = (np.abs(action) > 1.0).any(axis=1)
    assert outside.mean() == pytest.approx(card["behavior"]["raw_outside_bounds_fraction"])
    assert outside.mean() > 0.3  # the log really holds raw samples beyond the env's box
    # log N(a; μ(s), σ²I) of the raw sample, μ = gymnasium's heuristic, σ from the card,
    # on rows inside and outside the bounds
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.choice(np.flatnonzero(outside), 150, replace=False),
                           rng.choice(np.flatnonzero(~outside), 50, replace=False)])
    sigma = card["behavior"]["sigma"]
    mu = _heuristic(obs[rows], continuous=True)
    z = (action[rows].astype(np.float64) - mu) / sigma
    exact = (-0.5 * z**2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)).sum(axis=1)
    _within_float32_rounding(table.column("logged_logp").to_numpy()[rows], exact)


def test_lunar_lander_executes_the_clipped_action() -> None:
    # The card says the env received clip(a): LunarLander clips on entry, so a raw action and
    # its clipped value lead to the same next state.
    pytest.importorskip("Box2D", reason=ENVS_EXTRA)
    import gymnasium as gym

    raw = np.array([2.7, -1.9], dtype=np.float32)
    states = []
    for action in (raw, np.clip(raw, -1, 1)):
        env = gym.make("LunarLanderContinuous-v3")
        env.reset(seed=0)
        states.append(env.step(action)[0])
        env.close()
    np.testing.assert_array_equal(states[0], states[1])


def test_lander_eps_propensities_are_the_heuristic_mixture() -> None:
    table = read_table(DATASETS / "lander-eps")
    eps = read_card(DATASETS / "lander-eps")["behavior"]["epsilon"]
    rows = np.random.default_rng(1).choice(table.num_rows, 300, replace=False)
    chosen = _heuristic(_vectors(table, "obs")[rows], continuous=False)
    action = table.column("action").to_numpy()[rows]
    exact = np.log(np.where(action == chosen, 1 - eps + eps / 4, eps / 4))
    _within_float32_rounding(table.column("logged_logp").to_numpy()[rows], exact)
    assert 0.3 < (action != chosen).mean() < 0.45  # ε·3/4 = 0.375 off the heuristic


def test_mountaincar_propensities_are_the_truncated_gaussian() -> None:
    from scipy.stats import truncnorm

    table = read_table(DATASETS / "mountaincar-gauss")
    behavior = read_card(DATASETS / "mountaincar-gauss")["behavior"]
    velocity = _vectors(table, "obs")[:, 1].astype(np.float64)
    action = _vectors(table, "action")[:, 0].astype(np.float64)
    assert np.abs(action).max() <= 1.0  # truncated, never clipped: nothing on the bounds
    assert not (np.abs(action) == 1.0).any()
    mu = np.clip(behavior["gain"] * velocity / 0.07, -1, 1)
    sigma = behavior["sigma"]
    exact = truncnorm.logpdf(action, (-1 - mu) / sigma, (1 - mu) / sigma, loc=mu, scale=sigma)
    # scipy's truncnorm normalises with its own tail formulas: 1e-12 relative on top of the
    # float32 rounding.
    stored = table.column("logged_logp").to_numpy().astype(np.float64)
    gap = np.abs(stored - exact)
    assert (gap <= np.spacing(np.abs(exact).astype(np.float32)) + 1e-12 * np.abs(exact)).all()


class _Controller(torch.nn.Module):
    """A policy module (mode/sample) playing a fixed function of the observation."""

    def __init__(self, act) -> None:
        super().__init__()
        self.act = act

    def mode(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.act(obs.double().numpy()), dtype=torch.float32)

    def sample(self, obs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.mode(obs)


@pytest.mark.parametrize("name", sorted(HARDER))
def test_harder_env_spec_rolls_out(name: str) -> None:
    from offpg_offline.rollout import evaluate_online

    card = read_card(DATASETS / name)
    if name.startswith("lander"):
        pytest.importorskip("Box2D", reason=ENVS_EXTRA)
        continuous = name == "lander-clipped"

        def act(obs: np.ndarray) -> np.ndarray:
            return _heuristic(obs, continuous=continuous)
        floor = 100.0  # gymnasium's heuristic lands: ~250-290 per episode in the card
    else:
        def act(obs: np.ndarray) -> np.ndarray:  # full-gain pumping reaches the flag
            return np.clip(obs[:, 1:2] / 0.07 * 5.0, -1, 1)
        floor = 50.0
    result = evaluate_online(_Controller(act), card["env_spec"], episodes=3, seed=7)
    assert result.mean > floor
