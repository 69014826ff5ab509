"""Minari → canonical: round trips in both storages, propensities in infos, spaces, the CLI.

Minari datasets are built here with `EpisodeBuffer` + `create_dataset_from_buffers` (Minari's
DataCollector needs jax); `tests/conftest.py` points MINARI_DATASETS_PATH at a temp folder.
"""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer
from typer.testing import CliRunner

from offpg_offline.cli import app
from offpg_offline.data.minari import ingest_minari
from offpg_offline.data.schema import DataError
from offpg_offline.data.store import read_card, read_table, verify_dataset
from offpg_offline.data.synthetic import SYNTHETIC, Log, rollout

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # minari's metadata warnings


def _buffers(log: Log, infos_of: Any = None) -> list[EpisodeBuffer]:
    """One EpisodeBuffer per episode of `log`: T+1 observations, `infos_of(logp_T)` infos."""
    bounds = log.episode_bounds()
    buffers = []
    for episode, (a, b) in enumerate(itertools.pairwise(bounds)):
        observations = np.concatenate([log.obs[a:b], log.next_obs[b - 1:b]])
        buffers.append(EpisodeBuffer(
            id=episode,
            observations=observations,
            actions=log.action[a:b],
            rewards=log.reward[a:b].tolist(),
            terminations=log.terminated[a:b].tolist(),
            truncations=log.truncated[a:b].tolist(),
            infos=None if infos_of is None else infos_of(log.logp[a:b]),
        ))
    return buffers


def _reset_first(key: str) -> Any:
    """DataCollector layout: T+1 info entries, entry 0 from reset (a placeholder here)."""
    return lambda logp: {key: [0.0, *logp.tolist()]}


def _make_minari(dataset_id: str, log: Log, env_id: str, data_format: str,
                 infos_of: Any = None) -> minari.MinariDataset:
    return minari.create_dataset_from_buffers(dataset_id, _buffers(log, infos_of), env=env_id,
                                              data_format=data_format)


def _columns(path: Path) -> dict[str, np.ndarray]:
    table = read_table(path)
    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if hasattr(column.type, "list_size"):
            out[name] = column.flatten().to_numpy().reshape(len(column), -1)
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


def _assert_equal_to_log(path: Path, log: Log, *, logp: bool = True) -> None:
    got = _columns(path)
    np.testing.assert_array_equal(got["episode_id"], log.episode_id)
    np.testing.assert_array_equal(got["step"], log.step)
    np.testing.assert_array_equal(got["obs"], log.obs)
    np.testing.assert_array_equal(got["next_obs"], log.next_obs)
    np.testing.assert_array_equal(got["action"], log.action.reshape(got["action"].shape))
    np.testing.assert_array_equal(got["reward"], log.reward)
    np.testing.assert_array_equal(got["terminated"], log.terminated)
    np.testing.assert_array_equal(got["truncated"], log.truncated)
    if logp:
        np.testing.assert_array_equal(got["logged_logp"], log.logp.astype(np.float32))
    else:
        assert np.isnan(got["logged_logp"].astype(float)).all()  # all-null column


@pytest.fixture(scope="module")
def cartpole_log() -> Log:
    spec = SYNTHETIC["cartpole-eps"]
    return rollout(spec.env_id, spec.policy, episodes=12, seed=5)


@pytest.fixture(scope="module")
def pendulum_log() -> Log:
    spec = SYNTHETIC["pendulum-gauss"]
    return rollout(spec.env_id, spec.policy, episodes=3, seed=5, max_steps=40)


@pytest.mark.parametrize("data_format", ["arrow", "hdf5"])
def test_cartpole_log_round_trips_value_for_value(tmp_path, cartpole_log, data_format) -> None:
    _make_minari(f"cartpole/eps-{data_format}-v0", cartpole_log, "CartPole-v1", data_format,
                 _reset_first("action_log_prob"))

    out = ingest_minari(f"cartpole/eps-{data_format}-v0", tmp_path / "ds")

    _assert_equal_to_log(out, cartpole_log)
    assert verify_dataset(out) == []
    card = read_card(out)
    assert card["counts"] == {"episodes": 12, "steps": cartpole_log.n_steps}
    assert card["env_spec"]["id"] == "CartPole-v1"
    assert card["env_spec"]["max_episode_steps"] == 500
    assert card["action_space"] == {"type": "Discrete", "dtype": "int64", "start": 0, "n": 2}
    assert card["observation_space"]["shape"] == [4]
    assert card["source"]["minari_version"] == minari.__version__
    assert card["source"]["data_format"] == data_format
    assert card["propensity"]["logged_logp"]["info_key"] == "action_log_prob"
    assert card["propensity"]["logged_logp"]["kind"] == "logp"


@pytest.mark.parametrize("data_format", ["arrow", "hdf5"])
def test_continuous_log_round_trips_value_for_value(tmp_path, pendulum_log, data_format) -> None:
    # Truncated episodes (time limit 40 here) and float32 Box actions.
    _make_minari(f"pendulum/gauss-{data_format}-v0", pendulum_log, "Pendulum-v1", data_format,
                 _reset_first("log_prob"))

    out = ingest_minari(f"pendulum/gauss-{data_format}-v0", tmp_path / "ds")

    _assert_equal_to_log(out, pendulum_log)
    card = read_card(out)
    assert card["action_space"]["type"] == "Box"
    assert card["action_space"]["shape"] == [1]
    assert card["env_spec"]["id"] == "Pendulum-v1"


def test_one_dimensional_numpy_infos_in_arrow_are_read(tmp_path, cartpole_log) -> None:
    # minari 0.5.4 writes a 1-D numpy info array but cannot read it back itself.
    _make_minari("cartpole/np-arrow-v0", cartpole_log, "CartPole-v1", "arrow",
                 lambda logp: {"logp": np.r_[0.0, logp]})
    with pytest.raises(ValueError, match="invalid literal"):
        next(minari.load_dataset("cartpole/np-arrow-v0").iterate_episodes())

    out = ingest_minari("cartpole/np-arrow-v0", tmp_path / "ds")

    _assert_equal_to_log(out, cartpole_log)


def test_infos_with_one_entry_per_step_are_aligned_to_steps(tmp_path, cartpole_log) -> None:
    # hdf5 accepts T info entries (arrow pads to T+1 and cannot); entry t belongs to a_t.
    _make_minari("cartpole/t-hdf-v0", cartpole_log, "CartPole-v1", "hdf5",
                 lambda logp: {"action_logp": logp.copy()})

    out = ingest_minari("cartpole/t-hdf-v0", tmp_path / "ds")

    _assert_equal_to_log(out, cartpole_log)


@pytest.mark.parametrize("data_format", ["arrow", "hdf5"])
def test_entries_padded_at_the_end_with_nan_are_aligned_to_steps(
        tmp_path, cartpole_log, data_format) -> None:
    # A hand-built buffer: one entry per action, padded to T+1 with NaN for arrow storage.
    _make_minari(f"cartpole/pad-{data_format}-v0", cartpole_log, "CartPole-v1", data_format,
                 lambda logp: {"logp": [*logp.tolist(), float("nan")]})

    out = ingest_minari(f"cartpole/pad-{data_format}-v0", tmp_path / "ds")

    _assert_equal_to_log(out, cartpole_log)
    assert "NaN placeholder" in read_card(out)["propensity"]["logged_logp"]["source"]


@pytest.mark.parametrize("data_format", ["arrow", "hdf5"])
def test_nested_info_key_is_found_by_path(tmp_path, cartpole_log, data_format) -> None:
    # arrow storage returns nested infos as an object array of per-step dicts.
    _make_minari(f"cartpole/nested-{data_format}-v0", cartpole_log, "CartPole-v1", data_format,
                 lambda logp: {"agent": {"lp": [0.0, *logp.tolist()]}})

    out = ingest_minari(f"cartpole/nested-{data_format}-v0", tmp_path / "ds",
                        propensity_key="agent/lp")

    _assert_equal_to_log(out, cartpole_log)


@pytest.mark.parametrize("key", ["action_prob", "prob", "propensity"])
def test_probabilities_are_stored_as_their_log(tmp_path, cartpole_log, key) -> None:
    _make_minari(f"cartpole/{key.replace('_', '-')}-v0", cartpole_log, "CartPole-v1", "arrow",
                 lambda logp: {key: [1.0, *np.exp(logp).tolist()]})

    out = ingest_minari(f"cartpole/{key.replace('_', '-')}-v0", tmp_path / "ds")

    got = _columns(out)["logged_logp"]
    np.testing.assert_array_equal(got, np.log(np.exp(cartpole_log.logp)).astype(np.float32))
    assert read_card(out)["propensity"]["logged_logp"]["kind"] == "prob"


def test_kind_override_reads_an_unknown_key_as_probabilities(tmp_path, cartpole_log) -> None:
    _make_minari("cartpole/custom-v0", cartpole_log, "CartPole-v1", "hdf5",
                 lambda logp: {"mu": [1.0, *np.exp(logp).tolist()]})

    out = ingest_minari("cartpole/custom-v0", tmp_path / "ds", propensity_key="mu",
                        propensity_kind="prob")

    got = _columns(out)["logged_logp"]
    np.testing.assert_array_equal(got, np.log(np.exp(cartpole_log.logp)).astype(np.float32))


def test_no_propensity_leaves_the_column_null(tmp_path, cartpole_log) -> None:
    _make_minari("cartpole/noprop-v0", cartpole_log, "CartPole-v1", "arrow",
                 lambda logp: {"score": [0.0, *logp.tolist()]})

    out = ingest_minari("cartpole/noprop-v0", tmp_path / "ds")

    _assert_equal_to_log(out, cartpole_log, logp=False)
    card = read_card(out)
    assert card["propensity"]["logged_logp"] is None
    assert card["source"]["info_keys"] == ["score"]


def test_probabilities_for_continuous_actions_are_refused(tmp_path, pendulum_log) -> None:
    _make_minari("pendulum/prob-v0", pendulum_log, "Pendulum-v1", "arrow",
                 lambda logp: {"action_prob": [1.0, *np.exp(logp).tolist()]})

    with pytest.raises(ValueError, match=r"probabilities, but the action space is continuous"):
        ingest_minari("pendulum/prob-v0", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_probability_above_one_is_a_validation_error(tmp_path, cartpole_log) -> None:
    _make_minari("cartpole/bad-v0", cartpole_log, "CartPole-v1", "hdf5",
                 lambda logp: {"prob": [1.0, *(np.exp(logp) * 1.5).tolist()]})

    with pytest.raises(DataError, match=r"column 'logged_logp', row \d+: log-probability"):
        ingest_minari("cartpole/bad-v0", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_unknown_propensity_key_names_the_available_keys(tmp_path, cartpole_log) -> None:
    _make_minari("cartpole/keys-v0", cartpole_log, "CartPole-v1", "arrow",
                 _reset_first("logp"))

    with pytest.raises(ValueError, match=r"'pi' is not in the episode infos \(keys: logp\)"):
        ingest_minari("cartpole/keys-v0", tmp_path / "ds", propensity_key="pi")


def test_dict_observations_are_flattened_like_gymnasium(tmp_path) -> None:
    space = gym.spaces.Dict({
        "position": gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32),
        "mode": gym.spaces.Discrete(3),
    })
    rng = np.random.default_rng(0)
    lengths = [3, 5]
    buffers, expected = [], []
    for episode, length in enumerate(lengths):
        position = rng.uniform(-1, 1, (length + 1, 2)).astype(np.float32)
        mode = rng.integers(0, 3, length + 1)
        buffers.append(EpisodeBuffer(
            id=episode, observations={"position": position, "mode": mode},
            actions=rng.integers(0, 2, length), rewards=[1.0] * length,
            terminations=[False] * (length - 1) + [True], truncations=[False] * length,
        ))
        expected.append(np.stack([
            gym.spaces.flatten(space, {"position": position[t], "mode": int(mode[t])})
            for t in range(length + 1)]))
    for data_format in ("arrow", "hdf5"):
        minari.create_dataset_from_buffers(
            f"dict/obs-{data_format}-v0", buffers, observation_space=space,
            action_space=gym.spaces.Discrete(2), data_format=data_format)

        out = ingest_minari(f"dict/obs-{data_format}-v0", tmp_path / data_format)

        got = _columns(out)
        np.testing.assert_array_equal(got["obs"], np.concatenate([e[:-1] for e in expected]))
        np.testing.assert_array_equal(got["next_obs"], np.concatenate([e[1:] for e in expected]))
        card = read_card(out)
        assert card["observation_space"]["shape"] == [5]  # 2 + one-hot of 3
        assert card["source"]["original_observation_space"]["type"] == "Dict"
        assert card["env_spec"] is None


def test_tuple_observations_are_flattened_like_gymnasium(tmp_path) -> None:
    space = gym.spaces.Tuple((gym.spaces.Discrete(2, start=1),
                              gym.spaces.Box(-5.0, 5.0, shape=(3,), dtype=np.float32)))
    rng = np.random.default_rng(2)
    first = rng.integers(1, 3, 5)
    second = rng.uniform(-5, 5, (5, 3)).astype(np.float32)
    buffer = EpisodeBuffer(id=0, observations=(first, second), actions=rng.integers(0, 2, 4),
                           rewards=[0.5] * 4, terminations=[False] * 3 + [True],
                           truncations=[False] * 4)
    expected = np.stack([gym.spaces.flatten(space, (int(first[t]), second[t])) for t in range(5)])
    for data_format in ("arrow", "hdf5"):
        minari.create_dataset_from_buffers(
            f"tuple/obs-{data_format}-v0", [buffer], observation_space=space,
            action_space=gym.spaces.Discrete(2), data_format=data_format)

        got = _columns(ingest_minari(f"tuple/obs-{data_format}-v0", tmp_path / data_format))

        np.testing.assert_array_equal(got["obs"], expected[:-1])
        np.testing.assert_array_equal(got["next_obs"], expected[1:])


def test_episode_without_end_flag_is_kept_as_truncated(tmp_path) -> None:
    buffer = EpisodeBuffer(id=0, observations=np.zeros((4, 4), dtype=np.float32),
                           actions=np.array([0, 1, 0]), rewards=[1.0] * 3,
                           terminations=[False] * 3, truncations=[False] * 3)
    minari.create_dataset_from_buffers("cut/log-v0", [buffer], env="CartPole-v1",
                                       data_format="hdf5")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ingest_minari("cut/log-v0", tmp_path / "ds")

    assert _columns(out)["truncated"].tolist() == [False, False, True]
    assert any("1 episode(s) ended with neither" in str(w.message) for w in caught)


def test_local_path_works_like_the_id(tmp_path, cartpole_log) -> None:
    dataset = _make_minari("cartpole/path-v0", cartpole_log, "CartPole-v1", "arrow",
                           _reset_first("logp"))
    root = Path(dataset.storage.data_path).parent  # the folder holding data/

    for i, where in enumerate((root, root / "data")):
        out = ingest_minari(where, tmp_path / f"ds{i}")
        _assert_equal_to_log(out, cartpole_log)


def test_missing_dataset_suggests_download(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="pass --download"):
        ingest_minari("nowhere/none-v0", tmp_path / "ds")
    with pytest.raises(FileNotFoundError, match="no such folder, and not a Minari dataset id"):
        ingest_minari(str(tmp_path / "missing"), tmp_path / "ds")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a Minari dataset"):
        ingest_minari(tmp_path / "empty", tmp_path / "ds")


def test_cli_ingests_and_reports(tmp_path, cartpole_log) -> None:
    _make_minari("cartpole/cli-v0", cartpole_log, "CartPole-v1", "arrow",
                 _reset_first("action_log_prob"))
    runner = CliRunner()

    result = runner.invoke(app, ["ingest", "minari", "cartpole/cli-v0",
                                 "--out", str(tmp_path / "ds")])

    assert result.exit_code == 0, result.output
    assert f"12 episodes, {cartpole_log.n_steps} steps" in result.output
    _assert_equal_to_log(tmp_path / "ds", cartpole_log)

    again = runner.invoke(app, ["ingest", "minari", "cartpole/cli-v0",
                                "--out", str(tmp_path / "ds")])
    assert again.exit_code == 2
    assert "already exists" in again.output

    wrong = runner.invoke(app, ["ingest", "minari", "cartpole/cli-v0", "--out",
                                str(tmp_path / "other"), "--propensity-kind", "odds"])
    assert wrong.exit_code == 2
    assert "--propensity-kind must be 'prob' or 'logp'" in wrong.output


def test_pyarrow_reader_equals_minari_reader_on_arrow_storage() -> None:
    # The fast reader of arrow storage must return what MinariDataset.iterate_episodes does.
    from offpg_offline.data.minari import _iter_episodes

    space = gym.spaces.Dict({"pos": gym.spaces.Box(-1.0, 1.0, shape=(2, 2), dtype=np.float32),
                             "mode": gym.spaces.Discrete(3)})
    rng = np.random.default_rng(1)
    buffers = []
    for episode, length in enumerate([4, 1, 6]):
        buffers.append(EpisodeBuffer(
            id=episode,
            observations={"pos": rng.uniform(-1, 1, (length + 1, 2, 2)).astype(np.float32),
                          "mode": rng.integers(0, 3, length + 1)},
            actions=rng.uniform(-1, 1, (length, 3)).astype(np.float32),
            rewards=rng.normal(size=length).tolist(),
            terminations=[False] * length, truncations=[False] * (length - 1) + [True],
            infos={"logp": rng.normal(size=length + 1).tolist(),
                   "agent": {"value": rng.normal(size=(length + 1, 2))}},
        ))
    dataset = minari.create_dataset_from_buffers(
        "reader/compare-v0", buffers, observation_space=space, data_format="arrow",
        action_space=gym.spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32))

    raw = list(_iter_episodes(dataset, reader="raw"))
    reference = list(_iter_episodes(dataset, reader="minari"))

    assert [e.id for e in raw] == [e.id for e in reference] == [0, 1, 2]
    for a, b in zip(raw, reference, strict=True):
        for key in ("pos", "mode"):
            np.testing.assert_array_equal(a.observations[key], b.observations[key])
        for name in ("actions", "rewards", "terminations", "truncations"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        np.testing.assert_array_equal(a.infos["logp"], b.infos["logp"])
        np.testing.assert_array_equal(a.infos["agent"]["value"], b.infos["agent"]["value"])


@pytest.mark.parametrize("data_format", ["arrow", "hdf5"])
def test_bench_dataset_ingests_with_its_propensities(tmp_path, data_format) -> None:
    from offpg_offline.data.minari import bench_dataset

    source = bench_dataset(tmp_path, 2500, data_format=data_format, episode_length=1000)

    out = ingest_minari(source, tmp_path / "ds")

    card = read_card(out)
    assert card["counts"] == {"episodes": 3, "steps": 2500}
    got = _columns(out)
    np.testing.assert_array_equal(
        got["logged_logp"], np.where(got["action"] == 1, -0.4, -1.1).astype(np.float32))
    assert got["truncated"].sum() == 3 and not got["terminated"].any()


# --- published datasets: the metadata every dataset on Minari's server carries -----------------


def _publish(dataset_id: str, log: Log, data_format: str) -> minari.MinariDataset:
    """A dataset made the way published ones are: all the metadata fields, both env specs."""
    dataset = minari.create_dataset_from_buffers(
        dataset_id, _buffers(log, _reset_first("action_log_prob")),
        env=gym.make("CartPole-v1").spec, eval_env="CartPole-v1", data_format=data_format,
        algorithm_name="PPO (SB3)", author={"Zoë Müller", "Ana Bee"},
        author_email={"zoe@example.org", "ana@example.org"},
        code_permalink="https://example.org/train.py#L10",
        description="Expert CartPole — politique « PPO » ✓", ref_min_score=9.5,
        ref_max_score=500.0, num_episodes_average_score=7)
    dataset.storage.update_metadata({
        "extra": {"nested": {"none": None, "list": [1, 2.5, "three"]}, "tags": {"b", "a"}},
        "notes": None, "threshold": float("nan"), "unicode_key_ß": "Ω"})
    return dataset


@pytest.mark.parametrize("data_format", ["arrow", "hdf5"])
def test_published_metadata_lands_in_the_card_json_safe(tmp_path, cartpole_log,
                                                        data_format) -> None:
    # Fails on the old code with "Object of type set is not JSON serializable" (author is a set).
    _publish(f"pub/cartpole-{data_format}-v0", cartpole_log, data_format)

    out = ingest_minari(f"pub/cartpole-{data_format}-v0", tmp_path / "ds")

    _assert_equal_to_log(out, cartpole_log)
    card = read_card(out)
    assert card["behavior"] == {
        "algorithm_name": "PPO (SB3)",
        "author": ["Ana Bee", "Zoë Müller"],  # Minari's sets, as sorted lists
        "author_email": ["ana@example.org", "zoe@example.org"],
        "code_permalink": "https://example.org/train.py#L10",
    }
    assert card["description"] == "Expert CartPole — politique « PPO » ✓"
    assert card["source"]["ref_min_score"] == 9.5
    assert card["source"]["ref_max_score"] == 500.0
    assert card["source"]["eval_env_spec"]["id"] == "CartPole-v1"
    assert card["env_spec"]["id"] == "CartPole-v1"
    metadata = card["source"]["metadata"]
    assert metadata["num_episodes_average_score"] == 7
    assert metadata["total_episodes"] == 12 and metadata["total_steps"] == cartpole_log.n_steps
    # minari writes a set in custom metadata as a list in arbitrary order: kept as a list
    assert sorted(metadata["extra"]["tags"]) == ["a", "b"]
    assert metadata["extra"]["nested"] == {"none": None, "list": [1, 2.5, "three"]}
    assert metadata["notes"] is None
    assert metadata["threshold"] == "nan"  # strict JSON has no NaN
    assert metadata["unicode_key_ß"] == "Ω"
    # the card file itself is strict JSON (no NaN/Infinity tokens)
    from offpg_offline.data.store import card_path
    json.loads(card_path(out).read_text(), parse_constant=lambda token: 1 / 0)


def test_unknown_metadata_of_any_type_is_never_a_crash(tmp_path, cartpole_log) -> None:
    # metadata.json written by another tool: odd types, nested lists, Infinity, no description.
    dataset = _publish("pub/odd-v0", cartpole_log, "arrow")
    meta_path = Path(dataset.storage.data_path) / "metadata.json"
    raw = json.loads(meta_path.read_text())
    raw.update({"ref_max_score": float("inf"),
                "weird": [[1, [2, {"x": None}]], True], "description": None})
    meta_path.write_text(json.dumps(raw))

    out = ingest_minari("pub/odd-v0", tmp_path / "ds")

    card = read_card(out)
    assert card["source"]["ref_max_score"] == "inf"
    assert card["source"]["metadata"]["weird"] == [[1, [2, {"x": None}]], True]
    assert card["description"] == "Minari dataset pub/odd-v0"


def test_download_offline_fails_in_one_sentence(tmp_path, monkeypatch) -> None:
    # HF_HUB_OFFLINE makes huggingface_hub refuse every request: what an offline machine sees.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError) as caught:
        ingest_minari("D4RL/door/human-v2", tmp_path / "ds", download=True)
    message = str(caught.value)
    assert message.startswith("cannot reach the Minari server for D4RL/door/human-v2; ")
    assert "\n" not in message
    assert not (tmp_path / "ds").exists()

    result = CliRunner().invoke(app, ["ingest", "minari", "D4RL/door/human-v2", "--download",
                                      "--out", str(tmp_path / "ds")])
    assert result.exit_code == 2
    assert "cannot reach the Minari server for D4RL/door/human-v2; " in result.output
    assert "Traceback" not in result.output
