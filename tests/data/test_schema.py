"""Schema v1: construction, and every validation error with its exact one-sentence message."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from gymnasium import spaces

from offpg_offline.data import schema as sc
from offpg_offline.data.schema import DataError, make_schema, validate_table

LENGTHS = [3, 4, 2]  # rows 0-2: episode 0, rows 3-6: episode 1, rows 7-8: episode 2


def _replace(table: pa.Table, name: str, array: pa.Array | np.ndarray | list) -> pa.Table:
    if not isinstance(array, pa.Array):
        array = pa.array(array)
    index = table.column_names.index(name)
    return table.set_column(index, pa.field(name, array.type), array)


def _vectors(values: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.astype(np.float32).ravel()),
                                             values.shape[1])


def _numpy(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name)
    if pa.types.is_fixed_size_list(column.type):
        return sc.vector_values(column).copy()
    return column.to_numpy(zero_copy_only=False).copy()


def _error(table: pa.Table, **kwargs: object) -> str:
    with pytest.raises(DataError) as info:
        validate_table(table, source="log.parquet", **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_make_schema_has_the_design_types() -> None:
    schema = make_schema(4, None)
    assert schema.names == list(sc.COLUMNS)
    assert schema.field("episode_id").type == pa.int64()
    assert schema.field("step").type == pa.int32()
    assert schema.field("obs").type == pa.list_(pa.float32(), 4)
    assert schema.field("next_obs").type == pa.list_(pa.float32(), 4)
    assert schema.field("action").type == pa.int64()
    assert schema.field("reward").type == pa.float32()
    assert schema.field("terminated").type == pa.bool_()
    assert schema.field("truncated").type == pa.bool_()
    assert schema.field("logged_logp").nullable and schema.field("estimated_logp").nullable
    assert make_schema(4, 2).field("action").type == pa.list_(pa.float32(), 2)
    assert sc.schema_dims(make_schema(4, 2)) == (4, 2)


def test_steps_table_keeps_every_value(make_log) -> None:
    rng = np.random.default_rng(1)
    obs = rng.normal(size=(5, 2)).astype(np.float32)
    action = rng.uniform(-1, 1, (5, 3)).astype(np.float32)
    table = sc.steps_table(
        episode_id=np.array([7, 7, 7, 9, 9]), step=np.array([0, 1, 2, 0, 1]), obs=obs,
        action=action, reward=np.arange(5.0), next_obs=obs + 1,
        terminated=np.array([0, 0, 1, 0, 0], bool), truncated=np.array([0, 0, 0, 0, 1], bool),
        logged_logp=np.full(5, 0.25))
    validate_table(table, source="t", action_space=spaces.Box(-1, 1, (3,)))
    np.testing.assert_array_equal(_numpy(table, "obs"), obs)
    np.testing.assert_array_equal(_numpy(table, "action"), action)
    np.testing.assert_array_equal(_numpy(table, "next_obs"), obs + 1)
    assert table.column("episode_id").to_pylist() == [7, 7, 7, 9, 9]
    assert table.column("estimated_logp").null_count == 5
    assert table.schema == make_schema(2, 3)


@pytest.mark.parametrize("action_dim", [None, 2])
def test_a_valid_log_passes(make_log, action_dim: int | None) -> None:
    table = make_log(LENGTHS, action_dim=action_dim, estimated=True)
    space = spaces.Discrete(3) if action_dim is None else spaces.Box(-1, 1, (2,))
    validate_table(table, source="log.parquet", action_space=space)


def test_empty_input(make_log) -> None:
    assert _error(make_log(LENGTHS).slice(0, 0)) == (
        "log.parquet: the input has no rows (empty input).")


def test_missing_column(make_log) -> None:
    assert _error(make_log(LENGTHS).drop_columns(["reward"])) == (
        "log.parquet: column 'reward': is missing.")


def test_extra_column(make_log) -> None:
    table = make_log(LENGTHS).append_column("extra", pa.array(np.zeros(9)))
    assert _error(table) == "log.parquet: column 'extra': is not part of schema v1."


def test_mistyped_column(make_log) -> None:
    table = make_log(LENGTHS)
    table = _replace(table, "reward", _numpy(table, "reward").astype(np.float64))
    assert _error(table) == "log.parquet: column 'reward': has type float64, expected float32."


def test_mistyped_action(make_log) -> None:
    table = make_log(LENGTHS)
    table = _replace(table, "action", _numpy(table, "action").astype(np.float64))
    assert _error(table) == ("log.parquet: column 'action': has type float64, expected int64 or "
                             "fixed_size_list<float32>[d_act].")


def test_inconsistent_obs_dimension_in_a_list_column(make_log) -> None:
    table = make_log(LENGTHS)
    rows = [[0.0, 1.0, 2.0]] * 9
    rows[4] = [0.0, 1.0]
    table = _replace(table, "obs", pa.array(rows, pa.list_(pa.float32())))
    assert _error(table) == ("log.parquet: column 'obs', row 4: inconsistent observation "
                             "dimension: 2 values where row 0 has 3.")


def test_inconsistent_next_obs_dimension(make_log) -> None:
    table = make_log(LENGTHS)
    table = _replace(table, "next_obs", _vectors(np.zeros((9, 2))))
    assert _error(table) == ("log.parquet: column 'next_obs': inconsistent observation dimension: "
                             "2 values where column 'obs' has 3.")


@pytest.mark.parametrize("name", ["obs", "next_obs"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_observation(make_log, name: str, bad: float) -> None:
    table = make_log(LENGTHS)
    values = _numpy(table, name)
    values[5, 1] = bad
    assert _error(_replace(table, name, _vectors(values))) == (
        f"log.parquet: column '{name}', row 5: holds a non-finite value ({bad}).")


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_non_finite_reward(make_log, bad: float) -> None:
    table = make_log(LENGTHS)
    reward = _numpy(table, "reward")
    reward[6] = bad
    assert _error(_replace(table, "reward", reward)) == (
        f"log.parquet: column 'reward', row 6: is not finite ({np.float32(bad)}).")


def test_null_reward(make_log) -> None:
    table = make_log(LENGTHS)
    reward = [1.0] * 9
    reward[2] = None
    assert _error(_replace(table, "reward", pa.array(reward, pa.float32()))) == (
        "log.parquet: column 'reward', row 2: is null.")


@pytest.mark.parametrize("bad", [3, -1])
def test_discrete_action_outside_the_space(make_log, bad: int) -> None:
    table = make_log(LENGTHS)
    action = _numpy(table, "action")
    action[7] = bad
    assert _error(_replace(table, "action", action), action_space=spaces.Discrete(3)) == (
        f"log.parquet: column 'action', row 7: action {bad} lies outside the action space "
        f"Discrete(3) (values 0..2).")


def test_box_action_outside_the_bounds(make_log) -> None:
    table = make_log(LENGTHS, action_dim=2)
    action = _numpy(table, "action")
    action[3, 1] = 1.5
    space = spaces.Box(-1, 1, (2,))
    assert _error(_replace(table, "action", _vectors(action)), action_space=space) == (
        "log.parquet: column 'action', row 3: action component 1 = 1.5 lies outside the Box "
        "bounds [-1.0, 1.0].")


def test_box_action_of_the_wrong_size(make_log) -> None:
    table = make_log(LENGTHS, action_dim=2)
    assert _error(table, action_space=spaces.Box(-1, 1, (3,))) == (
        "log.parquet: column 'action': has 2 values per row, but the action space "
        "Box(-1.0, 1.0, (3,), float32) has 3.")


def test_discrete_actions_for_a_box_space(make_log) -> None:
    assert _error(make_log(LENGTHS), action_space=spaces.Box(-1, 1, (1,))) == (
        "log.parquet: column 'action': has type int64, but the action space "
        "Box(-1.0, 1.0, (1,), float32) needs float vectors.")


@pytest.mark.parametrize("name", ["logged_logp", "estimated_logp"])
def test_discrete_log_probability_above_zero(make_log, name: str) -> None:
    table = make_log(LENGTHS, estimated=True)
    logp = _numpy(table, name)
    logp[4] = 0.5  # a probability of e^0.5 ≈ 1.65
    assert _error(_replace(table, name, logp)) == (
        f"log.parquet: column '{name}', row 4: log-probability 0.5 > 0 is a probability above 1 "
        f"for a discrete action.")


def test_discrete_log_probability_at_rounding_of_one_passes(make_log) -> None:
    table = make_log(LENGTHS)
    logp = _numpy(table, "logged_logp")
    logp[4] = 6e-8  # log of a float32 softmax that sums to 1 + 6e-8
    validate_table(_replace(table, "logged_logp", logp), source="log.parquet")


def test_positive_log_density_is_fine_for_continuous_actions(make_log) -> None:
    table = make_log(LENGTHS, action_dim=2)
    logp = _numpy(table, "logged_logp")
    logp[:] = 2.0
    validate_table(_replace(table, "logged_logp", logp), source="log.parquet")


@pytest.mark.parametrize(("bad", "problem"), [
    (np.nan, "is NaN"),
    (-np.inf, "is -inf, a zero probability for an action that was taken"),
    (np.inf, "is +inf"),
])
def test_bad_log_probability(make_log, bad: float, problem: str) -> None:
    table = make_log(LENGTHS)
    logp = _numpy(table, "logged_logp")
    logp[8] = bad
    assert _error(_replace(table, "logged_logp", logp)) == (
        f"log.parquet: column 'logged_logp', row 8: {problem}.")


def test_partially_null_propensity(make_log) -> None:
    table = make_log(LENGTHS)
    logp: list[float | None] = [-1.0] * 9
    logp[3] = None
    assert _error(_replace(table, "logged_logp", pa.array(logp, pa.float32()))) == (
        "log.parquet: column 'logged_logp', row 3: is null here but filled on other rows "
        "(a propensity column must be filled on every row or on none).")


def test_duplicate_episode_step(make_log) -> None:
    table = make_log(LENGTHS)
    step = _numpy(table, "step")
    step[5] = 1  # episode 1 steps become 0, 1, 1, 3
    assert _error(_replace(table, "step", step)) == (
        "log.parquet: column 'step', row 5: duplicate (episode_id, step) = (1, 1).")


def test_non_contiguous_steps(make_log) -> None:
    table = make_log(LENGTHS)
    step = _numpy(table, "step")
    step[5:7] = [3, 4]  # episode 1 steps become 0, 1, 3, 4
    assert _error(_replace(table, "step", step)) == (
        "log.parquet: column 'step', row 5: episode 1 jumps from step 1 to 3, expected 2 "
        "(steps must be contiguous and ordered).")


def test_episode_not_starting_at_zero(make_log) -> None:
    table = make_log(LENGTHS)
    step = _numpy(table, "step")
    step[7:9] = [1, 2]
    assert _error(_replace(table, "step", step)) == (
        "log.parquet: column 'step', row 7: episode 2 starts at step 1, expected 0.")


def test_episode_rows_not_contiguous(make_log) -> None:
    table = make_log(LENGTHS)
    episode = _numpy(table, "episode_id")
    episode[7:9] = 0  # episode 0 again after episode 1
    assert _error(_replace(table, "episode_id", episode)) == (
        "log.parquet: column 'episode_id', row 7: episode 0 appears again after other episodes "
        "(rows of an episode must be contiguous).")


def test_done_flag_before_the_last_step(make_log) -> None:
    table = make_log(LENGTHS)
    terminated = _numpy(table, "terminated")
    terminated[4] = True
    assert _error(_replace(table, "terminated", terminated)) == (
        "log.parquet: column 'terminated', row 4: is set before the last step of episode 1.")


def test_episode_ending_without_a_flag(make_log) -> None:
    table = make_log(LENGTHS)
    table = _replace(table, "terminated", np.zeros(9, bool))
    table = _replace(table, "truncated", np.zeros(9, bool))
    assert _error(table) == ("log.parquet: column 'truncated', row 2: episode 0 ends here with "
                             "neither terminated nor truncated set.")


def test_row_offset_is_added_to_the_reported_row(make_log) -> None:
    table = make_log(LENGTHS)
    reward = _numpy(table, "reward")
    reward[6] = np.nan
    with pytest.raises(DataError, match=r"^log\.parquet: column 'reward', row 1006: "):
        validate_table(_replace(table, "reward", reward), source="log.parquet", row_offset=1000)


def test_validation_of_a_large_log_is_vectorised(make_log) -> None:
    # 200k rows in well under a second: a Python loop over rows would take several seconds.
    import time

    table = make_log(np.full(2000, 100), seed=3)
    start = time.perf_counter()
    validate_table(table, source="big", action_space=spaces.Discrete(3))
    assert time.perf_counter() - start < 2.0
