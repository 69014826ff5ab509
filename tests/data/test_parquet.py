"""Foreign Parquet / CSV logs → canonical datasets: value-for-value round trips, derivations,
streaming across batches and files, and errors that name the user's file, column and row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from gymnasium import spaces

from offpg_offline.data.batch import load_steps
from offpg_offline.data.parquet import (
    ColumnMapping,
    ingest_parquet,
    load_mapping,
    merge_mappings,
    parse_action_space,
    parse_map,
)
from offpg_offline.data.schema import DataError
from offpg_offline.data.store import read_table

LENGTHS = [4, 1, 6, 3, 5]  # 19 rows; episode starts at rows 0, 4, 5, 11, 14


def _foreign(seed: int = 0, lengths: list[int] = LENGTHS, n_actions: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    rows = sum(lengths)
    episode = np.repeat(np.arange(len(lengths)) * 10 + 7, lengths)  # ids 7, 17, 27, ...
    step = np.arange(rows) - np.repeat(np.cumsum(lengths) - np.array(lengths), lengths)
    last = np.r_[episode[1:] != episode[:-1], True]
    ends_terminal = rng.random(rows) < 0.5
    return {
        "episode": episode, "step": step, "last": last,
        "obs": rng.normal(size=(rows, 3)), "next_obs": rng.normal(size=(rows, 3)),
        "action": rng.integers(0, n_actions, rows), "reward": rng.normal(size=rows),
        "terminated": last & ends_terminal, "truncated": last & ~ends_terminal,
        "prob": rng.uniform(0.05, 1.0, rows), "box_action": rng.uniform(-2, 2, (rows, 2)),
    }


def _list_frame(log: dict) -> pl.DataFrame:
    return pl.DataFrame({
        "sess": log["episode"], "t": log["step"], "state": log["obs"].tolist(),
        "state2": log["next_obs"].tolist(), "act": log["action"], "r": log["reward"],
        "term": log["terminated"], "trunc": log["truncated"], "p": log["prob"],
    })


LIST_MAPPING = ColumnMapping(
    columns={"episode_id": "sess", "step": "t", "obs": "state", "next_obs": "state2",
             "action": "act", "reward": "r", "terminated": "term", "truncated": "trunc"},
    propensity_col="p", propensity_kind="prob")


def _columns(path: Path) -> dict[str, np.ndarray]:
    table = read_table(path)
    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if column.null_count == len(column):
            out[name] = None
        elif hasattr(column, "flatten") and column.type.num_fields == 1:
            out[name] = column.flatten().to_numpy().reshape(len(column), -1)
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


def _assert_nothing_written(folder: Path, out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in folder.iterdir() if ".tmp-" in p.name] == []


def test_parquet_round_trip_keeps_every_value(tmp_path) -> None:
    log = _foreign()
    _list_frame(log).write_parquet(tmp_path / "log.parquet")

    result = ingest_parquet([tmp_path / "log.parquet"], tmp_path / "ds", mapping=LIST_MAPPING)

    got = _columns(result.path)
    np.testing.assert_array_equal(got["episode_id"], log["episode"])
    np.testing.assert_array_equal(got["step"], log["step"])
    np.testing.assert_array_equal(got["obs"], log["obs"].astype(np.float32))
    np.testing.assert_array_equal(got["next_obs"], log["next_obs"].astype(np.float32))
    np.testing.assert_array_equal(got["action"], log["action"])
    np.testing.assert_array_equal(got["reward"], log["reward"].astype(np.float32))
    np.testing.assert_array_equal(got["terminated"], log["terminated"])
    np.testing.assert_array_equal(got["truncated"], log["truncated"])
    np.testing.assert_array_equal(got["logged_logp"], np.log(log["prob"]).astype(np.float32))
    assert got["estimated_logp"] is None
    card = result.card
    assert card["counts"] == {"episodes": 5, "steps": 19}
    assert card["action_space"] == {"type": "Discrete", "dtype": "int64", "start": 0,
                                    "n": int(log["action"].max()) + 1}
    assert card["propensity"]["logged_logp"] == {
        "source": "input column 'p' (probabilities, stored as their log)"}
    assert card["source"]["files"][0]["rows"] == 19
    assert card["source"]["columns"]["obs"] == "state"
    assert "next_obs" not in card["source"]  # given, not derived
    assert result.warnings == []


def test_csv_round_trip_with_scalar_columns_done_flags_and_derivations(tmp_path) -> None:
    log = _foreign(seed=1)
    frame = pl.DataFrame({
        **{f"x_{i}": log["obs"][:, i] for i in range(3)},
        "a0": log["box_action"][:, 0], "a1": log["box_action"][:, 1],
        "rew": log["reward"], "done": log["last"].astype(np.int64),
        "lp": np.log(log["prob"]),
    })
    frame.write_csv(tmp_path / "log.csv")
    mapping = ColumnMapping(columns={"reward": "rew"}, obs_cols=("x_*",), action_cols=("a*",),
                            propensity_col="lp", propensity_kind="logp", done_means="truncated")

    result = ingest_parquet([tmp_path / "log.csv"], tmp_path / "ds", mapping=mapping)

    got = _columns(result.path)
    last = log["last"]
    np.testing.assert_array_equal(got["episode_id"], np.repeat(np.arange(5), LENGTHS))
    np.testing.assert_array_equal(got["step"], log["step"])  # derived 0..T-1
    obs = log["obs"].astype(np.float32)
    np.testing.assert_array_equal(got["obs"], obs)
    expected_next = np.where(last[:, None], obs, np.roll(obs, -1, axis=0))  # last: own obs
    np.testing.assert_array_equal(got["next_obs"], expected_next)
    np.testing.assert_array_equal(got["action"], log["box_action"].astype(np.float32))
    np.testing.assert_array_equal(got["truncated"], last)  # done_means="truncated"
    assert not got["terminated"].any()
    np.testing.assert_array_equal(got["logged_logp"], np.log(log["prob"]).astype(np.float32))
    card = result.card
    assert card["action_space"]["type"] == "Box"
    np.testing.assert_array_equal(np.array(card["action_space"]["low"], np.float32),
                                  log["box_action"].min(axis=0).astype(np.float32))
    assert card["source"]["next_obs"]["episodes_with_copied_last_next_obs"] == 5
    assert card["source"]["next_obs"]["of_which_truncated"] == 5
    assert card["source"]["columns"]["obs"] == "x_0, x_1, x_2"
    assert result.warnings == [
        "5 truncated episodes have no next_obs for their last step; it is a copy of obs there "
        "(map a next_obs column to give the true one)."]


@pytest.mark.parametrize("batch_rows", [1, 3, 7, 1000])
def test_streaming_in_small_batches_gives_the_same_dataset(tmp_path, batch_rows) -> None:
    log = _foreign(seed=2)
    frame = _list_frame(log).drop("t", "state2")  # step and next_obs derived
    frame.write_parquet(tmp_path / "log.parquet")
    mapping = ColumnMapping(columns={"episode_id": "sess", "obs": "state", "action": "act",
                                     "reward": "r", "terminated": "term", "truncated": "trunc"})
    reference = ingest_parquet([tmp_path / "log.parquet"], tmp_path / "whole", mapping=mapping)
    streamed = ingest_parquet([tmp_path / "log.parquet"], tmp_path / "streamed", mapping=mapping,
                              batch_rows=batch_rows)
    assert read_table(streamed.path).equals(read_table(reference.path))
    # Done-flag boundaries, with the episode id column left out.
    frame.drop("sess").write_parquet(tmp_path / "flags.parquet")
    flag_mapping = ColumnMapping(columns={k: v for k, v in mapping.columns.items()
                                          if k != "episode_id"})
    by_flags = ingest_parquet([tmp_path / "flags.parquet"], tmp_path / "flags",
                              mapping=flag_mapping, batch_rows=batch_rows)
    expected = read_table(reference.path).drop_columns(["episode_id"])
    assert read_table(by_flags.path).drop_columns(["episode_id"]).equals(expected)


def test_an_episode_may_continue_into_the_next_file(tmp_path) -> None:
    log = _foreign(seed=3)
    frame = _list_frame(log)
    frame.slice(0, 8).write_parquet(tmp_path / "a.parquet")  # cuts episode 27 (rows 5-10)
    frame.slice(8).write_parquet(tmp_path / "b.parquet")
    whole = ingest_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "ds",
                           mapping=LIST_MAPPING, batch_rows=4)
    frame.write_parquet(tmp_path / "all.parquet")
    single = ingest_parquet([tmp_path / "all.parquet"], tmp_path / "single",
                            mapping=LIST_MAPPING)
    assert read_table(whole.path).equals(read_table(single.path))
    assert [f["rows"] for f in whole.card["source"]["files"]] == [8, 11]


def test_episodes_without_a_final_flag_are_kept_as_truncated(tmp_path) -> None:
    log = _foreign(seed=4)
    frame = _list_frame(log)
    frame = frame.with_columns(pl.Series("term", log["terminated"] & (log["episode"] != 17)),
                               pl.Series("trunc", log["truncated"] & (log["episode"] != 17)))
    frame.write_parquet(tmp_path / "log.parquet")
    result = ingest_parquet([tmp_path / "log.parquet"], tmp_path / "ds", mapping=LIST_MAPPING)
    got = _columns(result.path)
    assert got["truncated"][4] and not got["terminated"][4]  # episode 17 is row 4 alone
    assert result.card["source"]["episodes_without_end_flag"] == 1
    assert result.warnings == ["1 of 5 episodes end with neither terminated nor truncated; they "
                               "are kept as truncated."]


def test_string_episode_ids_are_numbered_by_first_appearance(tmp_path) -> None:
    log = _foreign(seed=5)
    frame = _list_frame(log).with_columns(
        pl.Series("sess", [f"user-{e}" for e in log["episode"]]))
    frame.write_parquet(tmp_path / "log.parquet")
    result = ingest_parquet([tmp_path / "log.parquet"], tmp_path / "ds", mapping=LIST_MAPPING,
                            batch_rows=5)
    np.testing.assert_array_equal(_columns(result.path)["episode_id"],
                                  np.repeat(np.arange(5), LENGTHS))
    # An episode continuing into the next file keeps its number.
    frame.slice(0, 8).write_parquet(tmp_path / "a.parquet")
    frame.slice(8).write_parquet(tmp_path / "b.parquet")
    split = ingest_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "split",
                           mapping=LIST_MAPPING, batch_rows=3)
    assert read_table(split.path).equals(read_table(result.path))


def test_given_action_space_and_env_spec(tmp_path) -> None:
    log = _foreign(seed=6, n_actions=2)
    _list_frame(log).write_parquet(tmp_path / "log.parquet")
    result = ingest_parquet([tmp_path / "log.parquet"], tmp_path / "ds", mapping=LIST_MAPPING,
                            action_space=spaces.Discrete(5), env_id="NoSuchEnv-v0")
    assert result.card["action_space"]["n"] == 5
    assert result.card["env_spec"] == {"id": "NoSuchEnv-v0"}
    assert result.warnings[0].startswith("environment NoSuchEnv-v0 could not be built here (")


def test_env_spaces_are_used_and_checked(tmp_path) -> None:
    log = _foreign(seed=6, n_actions=3)  # CartPole has 2 actions and 4-dimensional observations
    _list_frame(log).write_parquet(tmp_path / "log.parquet")
    with pytest.raises(DataError) as info:
        ingest_parquet([tmp_path / "log.parquet"], tmp_path / "ds", mapping=LIST_MAPPING,
                       env_id="CartPole-v1")
    row = int(np.flatnonzero(log["action"] == 2)[0])
    assert str(info.value) == (
        f"{tmp_path / 'log.parquet'}: column 'act' (action), row {row}: action 2 lies outside "
        f"the action space Discrete(2) (values 0..1).")
    _assert_nothing_written(tmp_path, tmp_path / "ds")


def test_env_observation_space_must_match_the_obs_columns(tmp_path) -> None:
    log = _foreign(seed=6, n_actions=2)  # 3-dimensional obs; CartPole's are 4-dimensional
    with pytest.raises(DataError, match=r"column 'state' \(obs\): 3 values per row, but the "
                                        r"observation space \(Box of shape \[4\]\) has 4\.$"):
        _list_frame(log).write_parquet(tmp_path / "log.parquet")
        ingest_parquet([tmp_path / "log.parquet"], tmp_path / "ds", mapping=LIST_MAPPING,
                       env_id="CartPole-v1")
    _assert_nothing_written(tmp_path, tmp_path / "ds")


def test_obs_from_one_scalar_column_is_one_dimensional(tmp_path) -> None:
    log = _foreign(seed=7)
    pl.DataFrame({"episode_id": log["episode"], "obs": log["obs"][:, 0], "action": log["action"],
                  "reward": log["reward"], "terminated": log["last"]}).write_parquet(
        tmp_path / "log.parquet")
    batch = load_steps(ingest_parquet([tmp_path / "log.parquet"], tmp_path / "ds").path)
    assert batch.obs.shape == (19, 1)


# --- errors: one sentence naming the user's file, column and row; nothing written -------------


def _ingest_error(tmp_path: Path, frame: pl.DataFrame, mapping: ColumnMapping = LIST_MAPPING,
                  suffix: str = "parquet", **kwargs) -> str:
    path = tmp_path / f"log.{suffix}"
    if suffix == "parquet":
        frame.write_parquet(path)
    else:
        frame.write_csv(path)
    with pytest.raises(DataError) as info:
        ingest_parquet([path], tmp_path / "ds", mapping=mapping, batch_rows=4, **kwargs)
    _assert_nothing_written(tmp_path, tmp_path / "ds")
    message = str(info.value)
    prefix = f"{path}: "
    assert message.startswith(prefix)
    return message[len(prefix):]


def test_error_null_reward(tmp_path) -> None:
    frame = _list_frame(_foreign()).with_columns(
        pl.when(pl.int_range(pl.len()) == 13).then(None).otherwise(pl.col("r")).alias("r"))
    assert _ingest_error(tmp_path, frame) == "column 'r', row 13: is null."


def test_error_non_finite_obs_in_scalar_columns(tmp_path) -> None:
    log = _foreign()
    log["obs"][9, 1] = np.nan
    frame = pl.DataFrame({"ep": log["episode"], **{f"x_{i}": log["obs"][:, i] for i in range(3)},
                          "act": log["action"], "r": log["reward"], "done": log["last"]})
    mapping = ColumnMapping(columns={"episode_id": "ep", "action": "act", "reward": "r"},
                            obs_cols=("x_*",))
    assert _ingest_error(tmp_path, frame, mapping, suffix="csv") == (
        "column 'x_0, x_1, x_2' (obs), row 9: holds a non-finite value (nan).")


def test_error_inconsistent_obs_dimension(tmp_path) -> None:
    log = _foreign()
    state = log["obs"].tolist()
    state[10] = state[10][:2]
    frame = _list_frame(log).with_columns(pl.Series("state", state))
    assert _ingest_error(tmp_path, frame) == (
        "column 'state', row 10: inconsistent obs dimension: 2 values where earlier rows have 3.")


def test_error_probability_outside_unit_interval(tmp_path) -> None:
    log = _foreign()
    log["prob"][6] = 1.5
    assert _ingest_error(tmp_path, _list_frame(log)) == (
        "column 'p', row 6: probability 1.5 lies outside (0, 1].")


def test_error_zero_probability(tmp_path) -> None:
    log = _foreign()
    log["prob"][2] = 0.0
    assert _ingest_error(tmp_path, _list_frame(log)) == (
        "column 'p', row 2: probability 0.0 lies outside (0, 1].")


def test_error_positive_log_probability_for_discrete_actions(tmp_path) -> None:
    log = _foreign()
    frame = _list_frame(log).with_columns(
        pl.when(pl.int_range(pl.len()) == 12).then(0.25).otherwise(pl.col("p").log()).alias("p"))
    mapping = ColumnMapping(columns=LIST_MAPPING.columns, propensity_col="p",
                            propensity_kind="logp")
    assert _ingest_error(tmp_path, frame, mapping) == (
        "column 'p' (logged_logp), row 12: log-probability 0.25 > 0 is a probability above 1 "
        "for a discrete action.")


def test_error_action_outside_given_space(tmp_path) -> None:
    log = _foreign()
    log["action"][15] = 9
    assert _ingest_error(tmp_path, _list_frame(log), action_space=spaces.Discrete(3)) == (
        "column 'act' (action), row 15: action 9 lies outside the action space Discrete(3) "
        "(values 0..2).")


def test_error_duplicate_step_is_reported_at_the_file_row_across_batches(tmp_path) -> None:
    log = _foreign()
    log["step"][13] = 1  # episode 37 (rows 11-13) becomes steps 0, 1, 1
    assert _ingest_error(tmp_path, _list_frame(log)) == (
        "column 't' (step), row 13: duplicate (episode_id, step) = (37, 1).")


def test_error_episode_rows_not_contiguous(tmp_path) -> None:
    log = _foreign()
    log["episode"][14:] = 7  # episode 7 again after others (with steps 0..4)
    assert _ingest_error(tmp_path, _list_frame(log)) == (
        "column 'sess' (episode_id), row 14: episode 7 appears again after other episodes "
        "(rows of an episode must be contiguous).")


def test_error_done_flag_before_the_last_step(tmp_path) -> None:
    log = _foreign()
    log["terminated"][1] = True
    assert _ingest_error(tmp_path, _list_frame(log)) == (
        "column 'term' (terminated), row 1: is set before the last step of episode 7.")


def test_error_missing_mapped_column(tmp_path) -> None:
    frame = _list_frame(_foreign()).drop("r")
    assert _ingest_error(tmp_path, frame) == "column 'r': is missing (mapped to reward)."


def test_error_no_observation_column(tmp_path) -> None:
    frame = _list_frame(_foreign()).drop("state")
    mapping = ColumnMapping(columns={"episode_id": "sess", "action": "act", "reward": "r",
                                     "terminated": "term"})
    assert _ingest_error(tmp_path, frame, mapping) == (
        "no observation column: name one with --map obs=COLUMN or --obs-cols PATTERN.")


def test_error_no_episode_boundaries(tmp_path) -> None:
    frame = _list_frame(_foreign()).drop("sess", "term", "trunc")
    mapping = ColumnMapping(columns={"obs": "state", "action": "act", "reward": "r"})
    assert _ingest_error(tmp_path, frame, mapping) == (
        "no episode boundaries: give an episode id column (--map episode_id=COLUMN) or done "
        "flags (terminated, truncated or done).")


def test_error_probabilities_for_continuous_actions(tmp_path) -> None:
    log = _foreign()
    frame = _list_frame(log).with_columns(pl.Series("act", log["box_action"].tolist()))
    assert _ingest_error(tmp_path, frame) == (
        "column 'p': holds probabilities, which are not defined for continuous actions (give "
        "log-densities with --propensity-kind logp).")


def test_error_empty_input(tmp_path) -> None:
    assert _ingest_error(tmp_path, _list_frame(_foreign()).clear()) == (
        "the input has no rows (empty input).")


def test_error_in_the_second_file_names_that_file(tmp_path) -> None:
    log = _foreign()
    frame = _list_frame(log)
    frame.slice(0, 11).write_parquet(tmp_path / "a.parquet")
    bad = frame.slice(11).with_columns(
        pl.when(pl.int_range(pl.len()) == 5).then(float("inf")).otherwise(pl.col("r")).alias("r"))
    bad.write_parquet(tmp_path / "b.parquet")
    with pytest.raises(DataError) as info:
        ingest_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "ds",
                       mapping=LIST_MAPPING, batch_rows=3)
    assert str(info.value) == f"{tmp_path / 'b.parquet'}: column 'r' (reward), row 5: is not " \
                              f"finite (inf)."
    _assert_nothing_written(tmp_path, tmp_path / "ds")


# --- options -------------------------------------------------------------------------------


def test_parse_map_and_its_errors() -> None:
    assert parse_map(["obs=state", " action = act "]) == {"obs": "state", "action": "act"}
    with pytest.raises(ValueError, match=r"--map 'obs' is not KEY=COLUMN"):
        parse_map(["obs"])
    with pytest.raises(ValueError, match=r"unknown key 'state'"):
        parse_map(["state=obs"])


def test_mapping_file_and_command_line_override(tmp_path) -> None:
    path = tmp_path / "map.toml"
    path.write_text('obs_cols = "x_*"\naction = "act"\nreward = "r"\n'
                    'propensity_col = "p"\npropensity_kind = "prob"\n')
    from_file = load_mapping(path)
    assert from_file == ColumnMapping(columns={"action": "act", "reward": "r"},
                                      obs_cols=("x_*",), propensity_col="p",
                                      propensity_kind="prob")
    merged = merge_mappings(from_file, ColumnMapping(columns={"reward": "rew"},
                                                     propensity_kind="logp"))
    assert merged.columns == {"action": "act", "reward": "rew"}
    assert merged.propensity_kind == "logp" and merged.obs_cols == ("x_*",)
    path.write_text('observation = "s"\n')
    with pytest.raises(ValueError, match=r"map\.toml: unknown key 'observation'"):
        load_mapping(path)


def test_parse_action_space() -> None:
    assert parse_action_space("discrete:4") == spaces.Discrete(4)
    assert parse_action_space("box:-2:2:1") == spaces.Box(-2.0, 2.0, (1,), np.float32)
    assert parse_action_space('{"type": "Discrete", "n": 3}') == spaces.Discrete(3)
    with pytest.raises(ValueError, match="is not discrete:N, box:LOW:HIGH:DIM or space JSON"):
        parse_action_space("cube:3")


def test_error_non_numeric_reward(tmp_path) -> None:
    frame = _list_frame(_foreign()).with_columns(pl.col("r").cast(pl.String))
    assert _ingest_error(tmp_path, frame) == (
        "column 'r': has type String, but reward values must be numbers.")


def test_error_unreadable_file(tmp_path) -> None:
    path = tmp_path / "log.parquet"
    path.write_text("not,parquet\n1,2\n")
    with pytest.raises(DataError, match=r"log\.parquet: could not be read \(parquet: "):
        ingest_parquet([path], tmp_path / "ds")
    _assert_nothing_written(tmp_path, tmp_path / "ds")


def test_error_input_files_with_different_fields(tmp_path) -> None:
    frame = _list_frame(_foreign())
    frame.slice(11).drop("p").write_parquet(tmp_path / "b.parquet")
    mapping = ColumnMapping(columns=LIST_MAPPING.columns)  # logged_logp: in a.parquet only
    frame.slice(0, 11).rename({"p": "logged_logp"}).with_columns(
        pl.col("logged_logp").log()).write_parquet(tmp_path / "a.parquet")
    with pytest.raises(DataError) as info:
        ingest_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "ds",
                       mapping=mapping)
    assert str(info.value) == (f"{tmp_path / 'b.parquet'}: the input files differ: only "
                               f"{tmp_path / 'a.parquet'} has a propensity column.")
    _assert_nothing_written(tmp_path, tmp_path / "ds")


def test_next_obs_from_scalar_columns(tmp_path) -> None:
    log = _foreign(seed=8)
    frame = pl.DataFrame({
        "ep": log["episode"], **{f"x_{i}": log["obs"][:, i] for i in range(3)},
        **{f"nx_{i}": log["next_obs"][:, i] for i in range(3)},
        "act": log["action"], "r": log["reward"], "term": log["last"]})
    frame.write_csv(tmp_path / "log.csv")
    mapping = ColumnMapping(columns={"episode_id": "ep", "action": "act", "reward": "r",
                                     "terminated": "term"},
                            obs_cols=("x_*",), next_obs_cols=("nx_*",))
    result = ingest_parquet([tmp_path / "log.csv"], tmp_path / "ds", mapping=mapping)
    got = _columns(result.path)
    np.testing.assert_array_equal(got["obs"], log["obs"].astype(np.float32))
    np.testing.assert_array_equal(got["next_obs"], log["next_obs"].astype(np.float32))
    assert result.card["source"]["columns"]["next_obs"] == "nx_0, nx_1, nx_2"
    assert "next_obs" not in result.card["source"] and result.warnings == []
