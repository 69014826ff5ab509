"""The canonical trajectory schema (v1) and its validation: the single source of column names.

One row per step; rows of an episode are contiguous and ordered by `step` = 0..T-1
(docs/design.md §2):

| column           | Arrow type                                      |
|------------------|-------------------------------------------------|
| `episode_id`     | int64                                           |
| `step`           | int32                                           |
| `obs`            | fixed_size_list<float32>[d_obs]                 |
| `action`         | int64 (discrete) or fixed_size_list<float32>[d_act] |
| `reward`         | float32                                         |
| `next_obs`       | fixed_size_list<float32>[d_obs]                 |
| `terminated`     | bool                                            |
| `truncated`      | bool                                            |
| `logged_logp`    | float32, nullable: log π_β(a_t|s_t) as logged    |
| `estimated_logp` | float32, nullable: log π̂_β(a_t|s_t) from `offpg behavior fit` |

`validate_table` checks a table against it with vectorised numpy / pyarrow.compute code and
raises `DataError` with one sentence naming the source file, the column and the first offending
row (0-based, counted from the start of the source when `row_offset` is given).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 1

EPISODE_ID = "episode_id"
STEP = "step"
OBS = "obs"
ACTION = "action"
REWARD = "reward"
NEXT_OBS = "next_obs"
TERMINATED = "terminated"
TRUNCATED = "truncated"
LOGGED_LOGP = "logged_logp"
ESTIMATED_LOGP = "estimated_logp"

COLUMNS = (EPISODE_ID, STEP, OBS, ACTION, REWARD, NEXT_OBS, TERMINATED, TRUNCATED,
           LOGGED_LOGP, ESTIMATED_LOGP)
PROPENSITY_COLUMNS = (LOGGED_LOGP, ESTIMATED_LOGP)

# A logged log-probability of a discrete action may exceed 0 by float32 rounding of p = 1
# (e.g. a softmax summing to 1 + 6e-8); anything above this is a real error.
LOGP_TOLERANCE = 1e-6


class DataError(ValueError):
    """A dataset or input log violates the canonical schema; the message is one sentence.

    Errors about one place in the data also carry `source`, `column`, `row` and `problem`, so an
    ingest adapter can name the user's own file, column and row (`DataError.at`).
    """

    def __init__(self, message: str, *, source: str | None = None, column: str | None = None,
                 row: int | None = None, problem: str | None = None) -> None:
        super().__init__(message)
        self.source, self.column, self.row, self.problem = source, column, row, problem

    @classmethod
    def at(cls, source: str, column: str, row: int | None, problem: str, *,
           label: str | None = None) -> DataError:
        """`"<source>: column '<column>', row <row>: <problem>."` (row omitted when None).

        With `label` (the user's name for a canonical column): `column '<label>' (<column>)`.
        """
        place = f"column '{column}'" if label is None else f"column '{label}' ({column})"
        if row is not None:
            place += f", row {row}"
        return cls(f"{source}: {place}: {problem}.", source=source, column=column, row=row,
                   problem=problem)


def make_schema(obs_dim: int, action_dim: int | None) -> pa.Schema:
    """The Arrow schema v1 for observations of size `obs_dim`.

    Args:
        obs_dim: length of the flat observation vector, ≥ 1.
        action_dim: length of a continuous action vector, or None for discrete (int64) actions.
    """
    if obs_dim < 1 or (action_dim is not None and action_dim < 1):
        raise ValueError(f"dimensions must be positive, got obs {obs_dim}, action {action_dim}")
    vector = pa.list_(pa.float32(), obs_dim)
    action = pa.int64() if action_dim is None else pa.list_(pa.float32(), action_dim)
    return pa.schema([
        pa.field(EPISODE_ID, pa.int64(), nullable=False),
        pa.field(STEP, pa.int32(), nullable=False),
        pa.field(OBS, vector, nullable=False),
        pa.field(ACTION, action, nullable=False),
        pa.field(REWARD, pa.float32(), nullable=False),
        pa.field(NEXT_OBS, vector, nullable=False),
        pa.field(TERMINATED, pa.bool_(), nullable=False),
        pa.field(TRUNCATED, pa.bool_(), nullable=False),
        pa.field(LOGGED_LOGP, pa.float32(), nullable=True),
        pa.field(ESTIMATED_LOGP, pa.float32(), nullable=True),
    ])


def schema_dims(schema: pa.Schema) -> tuple[int, int | None]:
    """(obs_dim, action_dim) of a schema v1 (action_dim None for discrete actions)."""
    obs_type = schema.field(OBS).type
    action_type = schema.field(ACTION).type
    action_dim = action_type.list_size if pa.types.is_fixed_size_list(action_type) else None
    return obs_type.list_size, action_dim


def _vector_array(values: np.ndarray, name: str) -> pa.FixedSizeListArray:
    array = np.ascontiguousarray(values, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [M, d], got shape {array.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])


def _logp_array(values: np.ndarray | None, rows: int) -> pa.Array:
    if values is None:
        return pa.nulls(rows, pa.float32())
    return pa.array(np.asarray(values, dtype=np.float32).reshape(-1))


def steps_table(
    *,
    episode_id: np.ndarray,
    step: np.ndarray,
    obs: np.ndarray,
    action: np.ndarray,
    reward: np.ndarray,
    next_obs: np.ndarray,
    terminated: np.ndarray,
    truncated: np.ndarray,
    logged_logp: np.ndarray | None = None,
    estimated_logp: np.ndarray | None = None,
) -> pa.Table:
    """Build a schema-v1 table from numpy arrays (no validation: see `validate_table`).

    Args:
        episode_id, step, reward, terminated, truncated: [M].
        obs, next_obs: [M, d_obs], cast to float32.
        action: [M] integers (discrete) or [M, d_act] floats (continuous).
        logged_logp, estimated_logp: [M] or None (an all-null column).
    """
    rows = len(episode_id)
    action = np.asarray(action)
    if action.ndim == 1 and np.issubdtype(action.dtype, np.integer):
        action_array: pa.Array = pa.array(action.astype(np.int64))
        action_dim = None
    else:
        action_array = _vector_array(action.reshape(rows, -1), ACTION)
        action_dim = action_array.type.list_size
    obs_array = _vector_array(obs, OBS)
    columns = [
        pa.array(np.asarray(episode_id, dtype=np.int64)),
        pa.array(np.asarray(step, dtype=np.int32)),
        obs_array,
        action_array,
        pa.array(np.asarray(reward, dtype=np.float32)),
        _vector_array(next_obs, NEXT_OBS),
        pa.array(np.asarray(terminated, dtype=np.bool_)),
        pa.array(np.asarray(truncated, dtype=np.bool_)),
        _logp_array(logged_logp, rows),
        _logp_array(estimated_logp, rows),
    ]
    return pa.Table.from_arrays(columns, schema=make_schema(obs_array.type.list_size, action_dim))


# --- validation -------------------------------------------------------------------------------


class _Where:
    """The source named in messages and the offset added to its row numbers."""

    __slots__ = ("offset", "source")

    def __init__(self, source: str, offset: int) -> None:
        self.source, self.offset = source, offset

    def fail(self, column: str, row: int | None, problem: str) -> DataError:
        return DataError.at(self.source, column, None if row is None else row + self.offset,
                            problem)


def type_name(dtype: pa.DataType) -> str:
    """An Arrow type as users write it: float32/float64 rather than pyarrow's float/double."""
    if pa.types.is_floating(dtype):
        return f"float{dtype.bit_width}"
    if pa.types.is_fixed_size_list(dtype):
        return f"fixed_size_list<{type_name(dtype.value_type)}>[{dtype.list_size}]"
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return f"list<{type_name(dtype.value_type)}>"
    return str(dtype)


def _first(mask: np.ndarray) -> int:
    """Index of the first True of a boolean array that has one."""
    return int(np.flatnonzero(mask)[0])


def _is_vector(dtype: pa.DataType) -> bool:
    return bool(pa.types.is_fixed_size_list(dtype) and dtype.value_type == pa.float32())


def vector_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """[M, d] float32 values of a fixed_size_list<float32> column (copies only across chunks)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    d = column.type.list_size
    values: np.ndarray = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, d)


def _column_numpy(column: pa.ChunkedArray) -> np.ndarray:
    values: np.ndarray = column.to_numpy()
    return values


def _check_types(table: pa.Table, where: _Where) -> None:
    names = set(table.column_names)
    for name in COLUMNS:
        if name not in names:
            if name in PROPENSITY_COLUMNS:
                raise where.fail(name, None, "is missing (write an all-null float32 column "
                                                "when the propensity is unknown)")
            raise where.fail(name, None, "is missing")
    if extra := sorted(names - set(COLUMNS)):
        raise where.fail(extra[0], None, f"is not part of schema v{SCHEMA_VERSION}")
    expected: dict[str, Any] = {
        EPISODE_ID: pa.int64(), STEP: pa.int32(), REWARD: pa.float32(),
        TERMINATED: pa.bool_(), TRUNCATED: pa.bool_(),
        LOGGED_LOGP: pa.float32(), ESTIMATED_LOGP: pa.float32(),
    }
    for name, dtype in expected.items():
        actual = table.schema.field(name).type
        if actual != dtype:
            problem = f"has type {type_name(actual)}, expected {type_name(dtype)}"
            raise where.fail(name, None, problem)
    for name in (OBS, NEXT_OBS):
        actual = table.schema.field(name).type
        if pa.types.is_list(actual) or pa.types.is_large_list(actual):
            lengths = pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
            if len(lengths) and (lengths != lengths[0]).any():
                row = _first(lengths != lengths[0])
                raise where.fail(name, row, f"inconsistent observation dimension: {lengths[row]}"
                                               f" values where row 0 has {lengths[0]}")
        if not _is_vector(actual):
            raise where.fail(name, None,
                        f"has type {type_name(actual)}, expected fixed_size_list<float32>[d_obs]")
    obs_dim = table.schema.field(OBS).type.list_size
    next_dim = table.schema.field(NEXT_OBS).type.list_size
    if next_dim != obs_dim:
        raise where.fail(NEXT_OBS, None, f"inconsistent observation dimension: {next_dim} "
                                            f"values where column 'obs' has {obs_dim}")
    action_type = table.schema.field(ACTION).type
    if action_type != pa.int64() and not _is_vector(action_type):
        raise where.fail(ACTION, None,
                    f"has type {type_name(action_type)}, expected int64 or "
                    f"fixed_size_list<float32>[d_act]")


def _check_nulls(table: pa.Table, where: _Where) -> None:
    for name in COLUMNS:
        column = table.column(name)
        nulls = column.null_count
        if nulls == 0:
            continue
        valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
        if name in PROPENSITY_COLUMNS:
            if nulls == len(column):
                continue
            raise where.fail(name, _first(~valid), "is null here but filled on other rows "
                        "(a propensity column must be filled on every row or on none)")
        raise where.fail(name, _first(~valid), "is null")
    for name in (OBS, NEXT_OBS, ACTION):  # nulls inside the vectors
        column = table.column(name)
        if pa.types.is_fixed_size_list(column.type):
            flat = pc.list_flatten(column)
            if flat.null_count:
                d = column.type.list_size
                row = _first(~pc.is_valid(flat).to_numpy(zero_copy_only=False)) // d
                raise where.fail(name, row, "holds a null value")


def _check_finite(table: pa.Table, where: _Where) -> None:
    for name in (OBS, NEXT_OBS):
        values = vector_values(table.column(name))
        if np.isfinite(values).all():  # the common case, without a per-row reduction
            continue
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            row = _first(bad)
            value = values[row][~np.isfinite(values[row])][0]
            raise where.fail(name, row, f"holds a non-finite value ({value})")
    reward = _column_numpy(table.column(REWARD))
    bad = ~np.isfinite(reward)
    if bad.any():
        row = _first(bad)
        raise where.fail(REWARD, row, f"is not finite ({reward[row]})")


def _check_actions(table: pa.Table, where: _Where, action_space: Any) -> None:
    column = table.column(ACTION)
    discrete = column.type == pa.int64()
    if discrete:
        action = _column_numpy(column)
    else:
        action = vector_values(column)
        bad = ~np.isfinite(action).all(axis=1) if not np.isfinite(action).all() else None
        if bad is not None and bad.any():
            raise where.fail(ACTION, _first(bad), "holds a non-finite value")
    if action_space is None:
        return
    from gymnasium import spaces  # the space object is gymnasium's; only imported when given

    if isinstance(action_space, spaces.Discrete):
        if not discrete:
            raise where.fail(ACTION, None, f"has type {type_name(column.type)}, but the action "
                                           f"space {action_space} needs int64 actions")
        low, high = int(action_space.start), int(action_space.start + action_space.n - 1)
        bad = (action < low) | (action > high)
        if bad.any():
            row = _first(bad)
            raise where.fail(ACTION, row, f"action {action[row]} lies outside the action "
                                             f"space {action_space} (values {low}..{high})")
    elif isinstance(action_space, spaces.Box):
        if discrete:
            raise where.fail(ACTION, None, f"has type int64, but the action space "
                                              f"{action_space} needs float vectors")
        size = int(np.prod(action_space.shape))
        if action.shape[1] != size:
            raise where.fail(ACTION, None, f"has {action.shape[1]} values per row, but the "
                                              f"action space {action_space} has {size}")
        box_low = action_space.low.reshape(-1).astype(np.float32)
        box_high = action_space.high.reshape(-1).astype(np.float32)
        outside: np.ndarray = (action < box_low) | (action > box_high)
        if outside.any():
            row = _first(np.asarray(outside.any(axis=1)))
            dim = _first(outside[row])
            raise where.fail(ACTION, row, f"action component {dim} = {action[row, dim]} lies "
                                          f"outside the Box bounds [{box_low[dim]}, "
                                          f"{box_high[dim]}]")
    else:
        raise ValueError(f"unsupported action space {action_space!r}: only Box and Discrete "
                         f"are supported.")


def _check_propensities(table: pa.Table, where: _Where) -> None:
    discrete = table.schema.field(ACTION).type == pa.int64()
    for name in PROPENSITY_COLUMNS:
        column = table.column(name)
        if column.null_count == len(column):
            continue
        logp = _column_numpy(column)
        bad = np.isnan(logp)
        if bad.any():
            raise where.fail(name, _first(bad), "is NaN")
        bad = np.isneginf(logp)
        if bad.any():
            raise where.fail(name, _first(bad), "is -inf, a zero probability for an action "
                                                   "that was taken")
        bad = np.isposinf(logp)
        if bad.any():
            raise where.fail(name, _first(bad), "is +inf")
        if discrete:
            bad = logp > LOGP_TOLERANCE
            if bad.any():
                row = _first(bad)
                raise where.fail(name, row, f"log-probability {logp[row]} > 0 is a probability "
                                               f"above 1 for a discrete action")


def _check_episodes(table: pa.Table, where: _Where) -> None:
    episode = _column_numpy(table.column(EPISODE_ID))
    step = _column_numpy(table.column(STEP))
    terminated = _column_numpy(table.column(TERMINATED))
    truncated = _column_numpy(table.column(TRUNCATED))
    rows = len(episode)
    start = np.ones(rows, dtype=bool)
    start[1:] = episode[1:] != episode[:-1]
    # Within an episode, step must be the previous step + 1.
    expected = np.zeros(rows, dtype=np.int64)
    expected[1:] = step[:-1].astype(np.int64) + 1
    expected[start] = 0
    bad = step != expected
    if bad.any():
        row = _first(bad)
        if not start[row] and step[row] == step[row - 1]:
            problem = f"duplicate (episode_id, step) = ({episode[row]}, {step[row]})"
        elif start[row]:
            problem = f"episode {episode[row]} starts at step {step[row]}, expected 0"
        else:
            problem = (f"episode {episode[row]} jumps from step {step[row - 1]} to {step[row]}, "
                       f"expected {expected[row]} (steps must be contiguous and ordered)")
        raise where.fail(STEP, row, problem)
    # Each episode's rows must form one contiguous run: no id may start two runs.
    start_rows = np.flatnonzero(start)
    start_ids = episode[start_rows]
    order = np.argsort(start_ids, kind="stable")
    sorted_ids = start_ids[order]
    repeated = np.zeros(len(sorted_ids), dtype=bool)
    repeated[1:] = sorted_ids[1:] == sorted_ids[:-1]
    if repeated.any():
        row = int(start_rows[order[repeated]].min())
        raise where.fail(EPISODE_ID, row, f"episode {episode[row]} appears again after other "
                                             f"episodes (rows of an episode must be contiguous)")
    # terminated/truncated only on an episode's last row, and every last row carries one.
    last = np.ones(rows, dtype=bool)
    last[:-1] = start[1:]
    done = terminated | truncated
    bad = done & ~last
    if bad.any():
        row = _first(bad)
        name = TERMINATED if terminated[row] else TRUNCATED
        raise where.fail(name, row, f"is set before the last step of episode {episode[row]}")
    bad = last & ~done
    if bad.any():
        row = _first(bad)
        raise where.fail(TRUNCATED, row, f"episode {episode[row]} ends here with neither "
                                            f"terminated nor truncated set")


def validate_table(
    table: pa.Table,
    *,
    source: str,
    action_space: Any = None,
    row_offset: int = 0,
) -> None:
    """Check that `table` is valid schema-v1 data of whole episodes.

    Checks, in order: non-empty; columns present with their exact types and consistent
    observation dimension; no nulls (propensity columns: all rows or none); finite obs,
    next_obs and reward; actions inside `action_space` when given (Discrete range, Box bounds);
    propensities not NaN/±inf, and for discrete actions log-probabilities ≤ 0 (probabilities in
    (0, 1], up to `LOGP_TOLERANCE`); (episode_id, step) unique with steps 0..T-1 contiguous,
    each episode's rows contiguous; `terminated`/`truncated` only on an episode's last row and
    at least one of them there.

    Args:
        table: the table to check.
        source: the file the rows came from, named in the message.
        action_space: a gymnasium Box or Discrete, or None to skip the range check.
        row_offset: added to reported row numbers (rows of `source` before this table).

    Raises:
        DataError: one sentence naming `source`, the column and the first offending row.
    """
    if table.num_rows == 0:
        raise DataError(f"{source}: the input has no rows (empty input).")
    where = _Where(source, row_offset)
    _check_types(table, where)
    _check_nulls(table, where)
    _check_finite(table, where)
    _check_actions(table, where, action_space)
    _check_propensities(table, where)
    _check_episodes(table, where)
