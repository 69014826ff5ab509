"""Env specs with arguments: --env ID --env-kwargs k=v (or EnvSpec JSON) at ingest, Minari's
env_spec kept whole, online evaluation building exactly that env, and a missing extra (box2d)
reported as "online evaluation skipped: <reason>" in training's summary line and tags."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import polars as pl
import pytest
from minari.data_collector import EpisodeBuffer
from typer.testing import CliRunner

from offpg_offline.cli import app
from offpg_offline.config import TrainConfig
from offpg_offline.data.envspec import build_env, env_spec, parse_env_kwargs
from offpg_offline.data.minari import ingest_minari
from offpg_offline.data.parquet import ingest_parquet
from offpg_offline.data.store import read_card
from offpg_offline.rollout import try_make_env
from offpg_offline.training.monitor import resolve_env

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

try:  # the LunarLander test needs box2d to be absent, as on the CI image
    import Box2D  # noqa: F401

    HAS_BOX2D = True
except ImportError:
    HAS_BOX2D = False


def _log(path: Path, *, obs_dim: int, action_dim: int, episodes: int = 4, length: int = 6,
         seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = episodes * length
    episode = np.repeat(np.arange(episodes), length)
    pl.DataFrame({
        "episode_id": episode, "obs": rng.normal(size=(rows, obs_dim)).tolist(),
        "action": rng.uniform(-1, 1, (rows, action_dim)).tolist(),
        "reward": rng.normal(size=rows), "terminated": np.tile(np.arange(length) == length - 1,
                                                               episodes),
        "logp": rng.normal(-1, 0.2, rows),
    }).write_parquet(path)
    return path


def test_env_kwargs_values_are_read_as_json() -> None:
    assert parse_env_kwargs(["continuous=true", "g=3.5", "mode=fast", "flag=True", "n=[1, 2]",
                             "x=None"]) == {"continuous": True, "g": 3.5, "mode": "fast",
                                            "flag": True, "n": [1, 2], "x": None}
    with pytest.raises(ValueError, match="--env-kwargs 'continuous' is not KEY=VALUE"):
        parse_env_kwargs(["continuous"])


def test_ingest_records_the_full_spec_and_rollouts_build_that_env(tmp_path) -> None:
    log = _log(tmp_path / "log.parquet", obs_dim=3, action_dim=1)
    result = CliRunner().invoke(app, [
        "ingest", "parquet", str(log), "--out", str(tmp_path / "ds"), "--env", "Pendulum-v1",
        "--env-kwargs", "g=3.0", "--propensity-col", "logp", "--action-space", "box:-2:2:1",
        "--quiet"])
    assert result.exit_code == 0, result.output

    spec = read_card(tmp_path / "ds")["env_spec"]
    assert spec["id"] == "Pendulum-v1"
    assert "environment: Pendulum-v1 with g=3.0" in CliRunner().invoke(
        app, ["info", str(tmp_path / "ds")]).output
    assert spec["kwargs"] == {"g": 3.0}
    assert spec["max_episode_steps"] == 200  # gymnasium's registration, completed
    assert spec["entry_point"] == "gymnasium.envs.classic_control.pendulum:PendulumEnv"
    env, reason = try_make_env(spec)
    assert reason is None and env is not None
    assert env.unwrapped.g == 3.0  # the default is 10.0: the kwargs reached the env
    env.close()
    # training's online evaluation uses the same spec (not only the id)
    resolved, skipped = resolve_env(read_card(tmp_path / "ds"), TrainConfig())
    assert skipped is None and resolved["kwargs"] == {"g": 3.0}
    env, _ = build_env(resolved)
    assert env.unwrapped.g == 3.0
    env.close()


def test_env_given_as_envspec_json_text_or_file(tmp_path) -> None:
    text = json.dumps({"id": "Pendulum-v1", "kwargs": {"g": 2.0}})
    (tmp_path / "spec.json").write_text(text)
    for given in (text, str(tmp_path / "spec.json")):
        spec = env_spec(given, {"max_speed": 9.0})
        assert spec["kwargs"] == {"g": 2.0, "max_speed": 9.0}
        assert spec["max_episode_steps"] == 200
    with pytest.raises(ValueError, match="needs an 'id'"):
        env_spec('{"kwargs": {}}')
    with pytest.raises(ValueError, match="--env-kwargs needs --env"):
        ingest_parquet([_log(tmp_path / "l.parquet", obs_dim=3, action_dim=1)], tmp_path / "x",
                       env_kwargs={"g": 1.0})


def test_minari_env_spec_keeps_its_kwargs_for_online_evaluation(tmp_path) -> None:
    rng = np.random.default_rng(0)
    buffers = [EpisodeBuffer(
        id=i, observations=rng.normal(size=(4, 3)).astype(np.float32),
        actions=rng.uniform(-2, 2, (3, 1)).astype(np.float32), rewards=[0.0] * 3,
        terminations=[False] * 3, truncations=[False, False, True]) for i in range(2)]
    minari.create_dataset_from_buffers("pend/kw-v0", buffers,
                                       env=gym.make("Pendulum-v1", g=4.0).spec,
                                       data_format="hdf5")

    card = read_card(ingest_minari("pend/kw-v0", tmp_path / "ds"))

    assert card["env_spec"]["kwargs"] == {"g": 4.0}
    spec, skipped = resolve_env(card, TrainConfig())
    assert skipped is None
    env, _ = try_make_env(spec)
    assert env.unwrapped.g == 4.0  # old training built "Pendulum-v1" from the id alone (g = 10)
    env.close()


def test_missing_box2d_is_named_and_training_records_the_skip(tmp_path, monkeypatch) -> None:
    from mlflow import MlflowClient

    if HAS_BOX2D:  # the envs extra is installed (as in CI): make `import Box2D` fail here
        monkeypatch.setitem(sys.modules, "Box2D", None)
        for module in [m for m in sys.modules if m.startswith("gymnasium.envs.box2d")]:
            monkeypatch.delitem(sys.modules, module)
    monkeypatch.chdir(tmp_path)
    log = _log(tmp_path / "lander.parquet", obs_dim=8, action_dim=2, episodes=6)
    runner = CliRunner()
    ingest = runner.invoke(app, ["ingest", "parquet", str(log), "--out", str(tmp_path / "ds"),
                                 "--env", "LunarLander-v3", "--env-kwargs", "continuous=true",
                                 "--propensity-col", "logp", "--quiet"])
    assert ingest.exit_code == 0, ingest.output
    assert "Box2D is not installed" in ingest.output
    card = read_card(tmp_path / "ds")
    assert card["env_spec"]["kwargs"] == {"continuous": True}
    assert card["action_space"]["type"] == "Box"  # vector actions, not "the space is Discrete"
    assert card["action_space"]["shape"] == [2]

    result = runner.invoke(app, ["train", str(tmp_path / "ds"), "--steps", "5", "--init",
                                 "random", "--baseline", "none", "--eval-episodes", "1"])

    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("run "))
    assert "online evaluation skipped: environment LunarLander-v3 with continuous=True needs a " \
           "missing dependency (Box2D is not installed" in line
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("ds").experiment_id])
    assert "Box2D is not installed" in run.data.tags["offpg.online_skipped"]
    assert "online/return_mean" not in run.data.metrics
