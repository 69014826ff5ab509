"""Unclipped-action logs (RLlib / SB3 style): the logger stores the raw Gaussian sample and its
log-density, and the environment clips it. `--actions unclipped` keeps the raw action, the card
keeps the env's true bounds for rollouts, and the target policy's density is evaluated on the
raw action. A log that stored the *clipped* action beside the unclipped density is spotted by
its actions sitting exactly on a bound, and the warning names the option.

The log is generated that way here: Pendulum-v1 with a ~ N(μ(s), σ²), σ = 1.5, the env
receiving clip(a, -2, 2).
"""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import polars as pl
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from offpg_offline.cli import app
from offpg_offline.data.schema import DataError
from offpg_offline.data.spaces import space_from_json
from offpg_offline.data.store import read_card, read_table
from offpg_offline.policies import make_policy
from offpg_offline.rollout import evaluate_online

SIGMA = 1.5


def _pendulum_log(episodes: int = 6, length: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    env = gym.make("Pendulum-v1")
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {k: [] for k in ("episode", "obs", "raw", "clipped", "reward", "logp",
                                            "terminated", "truncated")}
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        for t in range(length):
            mean = -1.5 * obs[1] - 0.3 * obs[2]  # a PD-like controller on sin θ and θ'
            raw = rng.normal(mean, SIGMA)
            logp = (-0.5 * ((raw - mean) / SIGMA) ** 2 - math.log(SIGMA)
                    - 0.5 * math.log(2 * math.pi))
            clipped = float(np.clip(raw, -2.0, 2.0))
            next_obs, reward, terminated, _, _ = env.step(np.array([clipped], np.float32))
            for key, value in (("episode", episode), ("obs", obs.tolist()), ("raw", [raw]),
                               ("clipped", [clipped]), ("reward", reward), ("logp", logp),
                               ("terminated", terminated), ("truncated", t == length - 1)):
                out[key].append(value)
            obs = next_obs
    env.close()
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def log() -> dict[str, np.ndarray]:
    return _pendulum_log()


def _write(path: Path, log: dict[str, np.ndarray], action_key: str) -> Path:
    pl.DataFrame({"episode_id": log["episode"], "obs": log["obs"].tolist(),
                  "action": log[action_key].tolist(), "reward": log["reward"],
                  "terminated": log["terminated"], "truncated": log["truncated"],
                  "action_logp": log["logp"]}).write_parquet(path)
    return path


ARGS = ["--env", "Pendulum-v1", "--propensity-col", "action_logp", "--quiet"]


def test_unclipped_actions_are_stored_raw_with_the_env_bounds_kept(tmp_path, log) -> None:
    outside = np.abs(log["raw"][:, 0]) > 2.0
    assert 0.05 < outside.mean() < 0.5  # the log really leaves the box (σ = 1.5)
    source = _write(tmp_path / "rllib.parquet", log, "raw")

    result = CliRunner().invoke(app, ["ingest", "parquet", str(source), "--out",
                                      str(tmp_path / "ds"), *ARGS, "--actions", "unclipped"])

    assert result.exit_code == 0, result.output
    assert "looks clipped" not in result.output
    card = read_card(tmp_path / "ds")
    action = read_table(tmp_path / "ds").column("action").combine_chunks()
    np.testing.assert_array_equal(action.flatten().to_numpy(), log["raw"][:, 0].astype(np.float32))
    assert card["action_space"]["low"] == ["-inf"] and card["action_space"]["high"] == ["inf"]
    assert card["env_action_space"]["low"] == [-2.0] and card["env_action_space"]["high"] == [2.0]
    assert card["actions"]["semantics"] == "unclipped"
    assert card["env_spec"]["id"] == "Pendulum-v1"
    shown = CliRunner().invoke(app, ["info", str(tmp_path / "ds")]).output
    assert "actions: unclipped samples; rollouts clip to Box(shape=(1,), [-2.0, 2.0]" in shown

    # The target policy evaluates its density on the raw action: an unsquashed Gaussian whose
    # log_prob is N(a; μ, σ²) even where a lies outside [-2, 2] (a tanh-squashed or truncated
    # policy on the true bounds gives -inf or NaN there).
    policy = make_policy(space_from_json(card["observation_space"]),
                         space_from_json(card["action_space"]))
    assert not policy.squash and not policy.truncate
    obs = torch.as_tensor(log["obs"][outside][:5], dtype=torch.float32)
    raw = torch.as_tensor(log["raw"][outside][:5], dtype=torch.float32)
    mean, log_std = policy.distribution_params(obs)
    expected = -0.5 * ((raw - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(policy.log_prob(obs, raw), expected.sum(-1))


def test_the_raw_log_is_refused_without_the_option(tmp_path, log) -> None:
    from offpg_offline.data.parquet import ingest_parquet

    source = _write(tmp_path / "rllib.parquet", log, "raw")
    with pytest.raises(DataError, match="column 'action'"):
        ingest_parquet([source], tmp_path / "ds", env_id="Pendulum-v1")
    with pytest.raises(ValueError, match="--actions unclipped needs the env's true action bounds"):
        ingest_parquet([source], tmp_path / "ds", actions="unclipped")


def test_clipped_actions_beside_densities_warn_and_name_the_option(tmp_path, log) -> None:
    on_bound = np.abs(log["clipped"][:, 0]) == 2.0
    assert on_bound.mean() >= 0.01
    source = _write(tmp_path / "clipped.parquet", log, "clipped")

    result = CliRunner().invoke(app, ["ingest", "parquet", str(source), "--out",
                                      str(tmp_path / "ds"), *ARGS])

    assert result.exit_code == 0, result.output
    warning = " ".join(line for line in result.output.splitlines())
    assert f"{int(on_bound.sum())} of {len(on_bound)} actions" in warning
    assert "looks clipped" in warning and "--actions unclipped" in warning


def test_no_warning_below_one_percent_on_the_bounds(tmp_path, log) -> None:
    clipped = log | {"clipped": np.clip(log["raw"], -1.99, 1.99)}  # nothing exactly on ±2
    source = _write(tmp_path / "inside.parquet", clipped, "clipped")
    result = CliRunner().invoke(app, ["ingest", "parquet", str(source), "--out",
                                      str(tmp_path / "ds"), *ARGS])
    assert result.exit_code == 0, result.output
    assert "looks clipped" not in result.output


class _Constant(nn.Module):
    """A policy that always proposes `value` (mode and sample)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def mode(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.full((obs.shape[0], 1), self.value)

    def sample(self, obs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.mode(obs)


def test_rollouts_clip_to_the_env_bounds_as_the_logger_did(tmp_path, log) -> None:
    source = _write(tmp_path / "rllib.parquet", log, "raw")
    CliRunner().invoke(app, ["ingest", "parquet", str(source), "--out", str(tmp_path / "ds"),
                             *ARGS, "--actions", "unclipped"])
    spec = read_card(tmp_path / "ds")["env_spec"]

    beyond = evaluate_online(_Constant(7.0), spec, episodes=2, seed=3)
    at_bound = evaluate_online(_Constant(2.0), spec, episodes=2, seed=3)
    inside = evaluate_online(_Constant(1.0), spec, episodes=2, seed=3)

    assert beyond.returns == at_bound.returns  # 7 is applied as 2, the logger's clip
    assert inside.returns != at_bound.returns
