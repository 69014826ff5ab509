"""Ingest of foreign Parquet / CSV step logs into the canonical format (`offpg ingest parquet`).

One row per step, in any column naming. The adapter maps columns onto schema v1, finds
episode boundaries, derives what is missing, and streams: files are scanned by polars in
batches, and only the rows of the episode still open at the end of a batch are carried over.

Rules (each recorded in the card's `source`):
- Columns named as in schema v1 are used as they are; `--map KEY=COLUMN` (or a TOML mapping)
  renames. `obs`, `next_obs` and `action` come from one column (list, or scalar for 1-D) or from
  several scalar columns matched by glob patterns (`--obs-cols 'x_*'`), in the file's column
  order.
- Episode boundaries: an episode-id column (rows of an episode contiguous, possibly continuing
  into the next file), else done flags (`terminated` / `truncated` / `done`: a new episode starts
  after a flagged row; an episode open at the end of a file ends there). `done` means terminated
  unless `done_means="truncated"`.
- `step` is 0..T-1 within the episode when no column gives it.
- An episode whose last step has neither flag is kept, marked truncated; the count is a warning.
- `next_obs`, when no column gives it, is the next row's `obs` within the episode. The last step
  has no next row: its `next_obs` is a copy of its own `obs`. That is harmless after a terminal
  step (nothing is bootstrapped from it) but wrong after a truncation, so the card counts those
  episodes and a warning says how many.
- Propensities: `propensity_col` holds probabilities (`prob`, checked to lie in (0, 1], stored as
  their log) or log-probabilities / log-densities (`logp`); probabilities are refused for
  continuous actions. A column named `logged_logp` is taken as log-probabilities by default.
- Actions: an integer column is Discrete(max + 1); a float or list column is a Box with the
  observed bounds; unless an action space is given (or `--env` names an environment gymnasium
  can build, whose spaces are then used and checked).
"""

from __future__ import annotations

import fnmatch
import json
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from offpg_offline.data import schema as sc
from offpg_offline.data.card import check_env_spec, check_space
from offpg_offline.data.categorical import Categories, vocabulary
from offpg_offline.data.envspec import build_env, env_spec
from offpg_offline.data.spaces import flatten_space, space_from_json, space_to_json
from offpg_offline.data.store import (
    DEFAULT_ROWS_PER_FILE,
    SourcedTable,
    file_sha256,
    read_card,
    write_dataset,
)

MAP_KEYS = ("episode_id", "step", "obs", "action", "reward", "next_obs", "terminated",
            "truncated", "done")
PROPENSITY_KINDS = ("prob", "logp")
DONE_MEANINGS = ("terminated", "truncated")
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".tsv")
DEFAULT_BATCH_ROWS = 262_144


@dataclass(frozen=True, slots=True, kw_only=True)
class ColumnMapping:
    """How the columns of a foreign log map onto schema v1.

    Attributes:
        columns: canonical key (one of `MAP_KEYS`) → the file's column name.
        obs_cols: glob patterns of scalar columns forming `obs` (file column order).
        next_obs_cols: the same for `next_obs`.
        action_cols: the same for a continuous action vector.
        propensity_col: the column holding the behavior policy's propensity, if any.
        propensity_kind: "prob" (probabilities) or "logp" (log-probabilities / log-densities);
            None: "logp".
        done_means: what a `done` column means: "terminated" or "truncated"; None: terminated.
        categorical_cols: glob patterns of string or integer columns encoded one-hot and
            appended to `obs` (see `Categories`).
    """

    columns: Mapping[str, str] = field(default_factory=dict)
    obs_cols: tuple[str, ...] = ()
    next_obs_cols: tuple[str, ...] = ()
    action_cols: tuple[str, ...] = ()
    propensity_col: str | None = None
    propensity_kind: str | None = None
    done_means: str | None = None
    categorical_cols: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if unknown := sorted(set(self.columns) - set(MAP_KEYS)):
            raise ValueError(f"unknown mapping key {unknown[0]!r}: the keys are "
                             f"{', '.join(MAP_KEYS)}.")
        if self.propensity_kind not in (None, *PROPENSITY_KINDS):
            raise ValueError(f"propensity kind must be 'prob' or 'logp', got "
                             f"{self.propensity_kind!r}.")
        if self.done_means not in (None, *DONE_MEANINGS):
            raise ValueError(f"done_means must be 'terminated' or 'truncated', got "
                             f"{self.done_means!r}.")
        for key, cols in (("obs", self.obs_cols), ("next_obs", self.next_obs_cols),
                          ("action", self.action_cols)):
            if cols and key in self.columns:
                raise ValueError(f"{key} is given both as a column ({self.columns[key]!r}) and "
                                 f"as column patterns ({', '.join(cols)}).")


def parse_map(items: Sequence[str]) -> dict[str, str]:
    """Parse `--map KEY=COLUMN` options into a dict (ValueError naming a malformed item)."""
    columns: dict[str, str] = {}
    for item in items:
        key, sep, column = item.partition("=")
        key, column = key.strip(), column.strip()
        if not sep or not key or not column:
            raise ValueError(f"--map {item!r} is not KEY=COLUMN (e.g. --map obs=state).")
        if key not in MAP_KEYS:
            raise ValueError(f"--map {item!r}: unknown key {key!r}; the keys are "
                             f"{', '.join(MAP_KEYS)}.")
        columns[key] = column
    return columns


_TOML_OPTIONS = ("obs_cols", "next_obs_cols", "action_cols", "propensity_col", "propensity_kind",
                 "done_means", "categorical_cols")


def load_mapping(path: Path) -> ColumnMapping:
    """Read a TOML mapping file.

    Top-level keys are canonical keys mapped to column names (`obs = "state"`), or options:
    `obs_cols`, `next_obs_cols`, `action_cols` (a pattern or a list of patterns),
    `propensity_col`, `propensity_kind`, `done_means`. Unknown keys are an error.
    """
    try:
        raw = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err}).") from None
    columns, options = {}, {}
    for key, value in raw.items():
        if key in MAP_KEYS:
            columns[key] = str(value)
        elif key in _TOML_OPTIONS:
            if key.endswith("_cols"):
                value = (value,) if isinstance(value, str) else tuple(str(v) for v in value)
            options[key] = value
        else:
            raise ValueError(f"{path}: unknown key {key!r}; the keys are "
                             f"{', '.join(MAP_KEYS + _TOML_OPTIONS)}.")
    return ColumnMapping(columns=columns, **options)


def merge_mappings(base: ColumnMapping, override: ColumnMapping) -> ColumnMapping:
    """`base` (a mapping file) with every field that `override` (the command line) sets."""
    changes: dict[str, Any] = {"columns": {**base.columns, **override.columns}}
    default = ColumnMapping()
    for name in _TOML_OPTIONS:
        value = getattr(override, name)
        if value != getattr(default, name):
            changes[name] = value
    if override.obs_cols:
        changes["columns"].pop("obs", None)
    if override.next_obs_cols:
        changes["columns"].pop("next_obs", None)
    if override.action_cols:
        changes["columns"].pop("action", None)
    return replace(base, **changes)


def parse_action_space(text: str) -> Any:
    """An action space from `discrete:N`, `box:LOW:HIGH:DIM`, or space JSON (the card's form).

    Sizes must fit (1..2^31-1), bounds be numbers with LOW ≤ HIGH: the card model's check
    (`card.check_space`), so a refusal names the option instead of a gymnasium or numpy error.
    """
    text = text.strip()
    from gymnasium import spaces

    kind, _, rest = text.partition(":")
    try:
        if kind.lower() == "discrete":
            data: Any = {"type": "Discrete", "n": int(rest)}
        elif kind.lower() == "box":
            low, high, dim = rest.split(":")
            data = {"type": "Box", "shape": [int(dim)], "low": [float(low)],
                    "high": [float(high)]}
        else:
            data = json.loads(text)
    except (ValueError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"action space {text!r} is not discrete:N, box:LOW:HIGH:DIM or space "
                         f"JSON.") from None
    if kind.lower() == "box":  # one LOW and one HIGH for all DIM components
        check_space({**data, "shape": [1]}, source="--action-space", key="action space")
        if not 1 <= data["shape"][0] < 2**31:
            raise ValueError(f"--action-space {text!r}: DIM must lie in 1..2^31 - 1.")
        return spaces.Box(data["low"][0], data["high"][0], tuple(data["shape"]), dtype=np.float32)
    check_space(data, source="--action-space", key="action space")
    space = space_from_json(data)
    if isinstance(space, spaces.Box):  # the dataset stores float32 actions
        space = spaces.Box(space.low.astype(np.float32), space.high.astype(np.float32),
                           dtype=np.float32)
    return space


# --- planning: which columns make which canonical field ----------------------------------------


@dataclass(frozen=True, slots=True)
class _Vector:
    """Where a vector field comes from: one list column, or several scalar columns."""

    columns: tuple[str, ...]
    is_list: bool

    @property
    def label(self) -> str:
        return ", ".join(self.columns)


@dataclass(frozen=True, slots=True)
class _Plan:
    file: str
    episode_id: str | None
    step: str | None
    obs: _Vector
    next_obs: _Vector | None
    action: _Vector
    action_discrete: bool
    reward: str
    terminated: str | None
    truncated: str | None
    done: str | None
    propensity: str | None
    propensity_kind: str
    categorical: tuple[str, ...] = ()
    bandit: bool = False

    def needed(self) -> list[str]:
        names = [self.episode_id, self.step, *self.obs.columns, *self.categorical,
                 *(self.next_obs.columns if self.next_obs else ()), *self.action.columns,
                 self.reward, self.terminated, self.truncated, self.done, self.propensity]
        return list(dict.fromkeys(n for n in names if n is not None))

    def labels(self) -> dict[str, str]:
        obs_label = ", ".join([*self.obs.columns, *self.categorical])
        labels = {sc.OBS: obs_label, sc.ACTION: self.action.label, sc.REWARD: self.reward}
        for key in ("episode_id", "step", "terminated", "truncated"):
            if (name := getattr(self, key)) is not None:
                labels[key] = name
        if self.next_obs is not None:
            labels[sc.NEXT_OBS] = self.next_obs.label
        if self.propensity is not None:
            labels[sc.LOGGED_LOGP] = self.propensity
        return labels

    def describe(self) -> dict[str, Any]:
        """The mapping as recorded in the card."""
        columns = self.labels()
        if self.done is not None:
            columns["done"] = self.done
        return columns


def _is_list(dtype: pl.DataType) -> bool:
    return isinstance(dtype, pl.List | pl.Array)


def _numbers(dtype: pl.DataType) -> bool:
    """A number, or a flat list of numbers / booleans (not strings, not lists of lists)."""
    if not _is_list(dtype):
        return dtype.is_numeric()
    inner = dtype.inner  # type: ignore[attr-defined]
    return bool(inner.is_numeric() or inner == pl.Boolean)


class _Columns:
    """Column look-ups in one file's schema, each refusal naming the file and the column."""

    def __init__(self, schema: pl.Schema, mapping: ColumnMapping, file: str) -> None:
        self.schema, self.mapping, self.file = schema, mapping, file

    def column(self, key: str, required: bool = False) -> str | None:
        schema, file = self.schema, self.file
        name = self.mapping.columns.get(key)
        if name is not None:
            if name not in schema:
                raise sc.DataError.at(file, name, None, f"is missing (mapped to {key})")
            return name
        if key in schema:
            return key
        if required:
            raise sc.DataError(f"{file}: no '{key}' column: name one with --map {key}=COLUMN.",
                               source=file)
        return None

    def patterns(self, key: str, globs: tuple[str, ...]) -> tuple[str, ...]:
        schema, file = self.schema, self.file
        names = [n for n in schema if any(fnmatch.fnmatchcase(n, g) for g in globs)]
        if not names:
            raise sc.DataError(f"{file}: no column matches the {key} pattern(s) "
                               f"{', '.join(globs)}.", source=file)
        for name in names:
            if _is_list(schema[name]) or not schema[name].is_numeric():
                raise sc.DataError.at(file, name, None, f"has type {schema[name]}, but columns "
                                                        f"matched for {key} must be numeric "
                                                        f"scalars")
        return tuple(names)

    def vector(self, key: str, globs: tuple[str, ...], required: bool) -> _Vector | None:
        schema, file = self.schema, self.file
        if globs:
            return _Vector(self.patterns(key, globs), is_list=False)
        name = self.column(key)
        if name is None:
            if required:
                raise sc.DataError(f"{file}: no observation column: name one with --map "
                                   f"{key}=COLUMN or --{key.replace('_', '-')}-cols PATTERN.",
                                   source=file)
            return None
        if not _numbers(schema[name]):
            raise sc.DataError.at(file, name, None, f"has type {schema[name]}, but {key} must be "
                                                    f"a list of numbers or a number")
        return _Vector((name,), is_list=_is_list(schema[name]))


def _resolve(schema: pl.Schema, mapping: ColumnMapping, file: str,
             action_space: Any, *, bandit: bool = False) -> _Plan:
    columns = _Columns(schema, mapping, file)
    categorical = _categorical_columns(schema, mapping.categorical_cols, file)
    obs = _resolve_obs(columns, categorical)
    next_obs = None if bandit else columns.vector("next_obs", mapping.next_obs_cols,
                                                  required=False)
    action, discrete = _resolve_action(columns, action_space)
    reward = columns.column("reward", required=True)
    assert reward is not None
    step = None if bandit else columns.column("step")
    _check_number_columns(columns, reward, step)
    flags = _resolve_flags(columns, bandit)
    episode_id = None if bandit else columns.column("episode_id")
    if episode_id is None and not any(flags.values()) and not bandit:
        raise sc.DataError(f"{file}: no episode boundaries: give an episode id column (--map "
                           f"episode_id=COLUMN) or done flags (terminated, truncated or done).",
                           source=file)
    propensity, kind = _resolve_propensity(columns, discrete)
    return _Plan(file=file, episode_id=episode_id, step=step, obs=obs,
                 next_obs=next_obs, action=action, action_discrete=discrete, reward=reward,
                 terminated=flags["terminated"], truncated=flags["truncated"],
                 done=flags["done"], propensity=propensity, propensity_kind=kind,
                 categorical=categorical, bandit=bandit)


def _resolve_obs(columns: _Columns, categorical: tuple[str, ...]) -> _Vector:
    """The obs columns; the categorical ones are encoded apart (they may form obs alone)."""
    obs = columns.vector("obs", columns.mapping.obs_cols, required=not categorical)
    if obs is None:
        return _Vector((), is_list=False)  # categorical columns alone form obs
    if categorical and not obs.is_list:
        return _Vector(tuple(c for c in obs.columns if c not in categorical), is_list=False)
    return obs


def _resolve_action(columns: _Columns, action_space: Any) -> tuple[_Vector, bool]:
    """The action columns and whether actions are discrete (the action space, when given,
    decides; else integer columns are discrete)."""
    file = columns.file
    if columns.mapping.action_cols:
        action = _Vector(columns.patterns("action", columns.mapping.action_cols), is_list=False)
        discrete = False
    else:
        name = columns.column("action", required=True)
        assert name is not None
        dtype = columns.schema[name]
        if not _numbers(dtype):
            raise sc.DataError.at(file, name, None, f"has type {dtype}, but actions must be "
                                                    f"integers, floats or lists of floats")
        action = _Vector((name,), is_list=_is_list(dtype))
        discrete = dtype.is_integer()
    from gymnasium import spaces

    if isinstance(action_space, spaces.Discrete):
        if action.is_list or len(action.columns) > 1:
            raise sc.DataError.at(file, action.label, None, "holds vectors, but the action space "
                                                            "is Discrete")
        discrete = True
    elif isinstance(action_space, spaces.Box):
        discrete = False
    return action, discrete


def _check_number_columns(columns: _Columns, reward: str, step: str | None) -> None:
    """Reward and propensity columns hold numbers, the step column integers."""
    schema = columns.schema
    for key, name in (("reward", reward), ("step", step),
                      ("propensity", columns.mapping.propensity_col)):
        if name is None or name not in schema:
            continue
        dtype = schema[name]
        if not dtype.is_numeric() or (key == "step" and not dtype.is_integer()):
            kind = "integers" if key == "step" else "numbers"
            raise sc.DataError.at(columns.file, name, None, f"has type {dtype}, but {key} values "
                                                            f"must be {kind}")


def _resolve_flags(columns: _Columns, bandit: bool) -> dict[str, str | None]:
    """The terminated / truncated / done columns (booleans or 0/1 integers); none in bandit
    mode."""
    schema = columns.schema
    flags = {key: None if bandit else columns.column(key)
             for key in ("terminated", "truncated", "done")}
    for key, name in flags.items():
        if name is not None and not (schema[name] == pl.Boolean or schema[name].is_integer()):
            raise sc.DataError.at(columns.file, name, None, f"has type {schema[name]}, but {key} "
                                                            f"flags must be booleans or 0/1 "
                                                            f"integers")
    return flags


def _resolve_propensity(columns: _Columns, discrete: bool) -> tuple[str | None, str]:
    """(propensity column or None, "logp" | "prob"): the mapped one, else a `logged_logp`
    column; probabilities only for discrete actions."""
    file, schema = columns.file, columns.schema
    propensity, kind = columns.mapping.propensity_col, columns.mapping.propensity_kind or "logp"
    if propensity is not None and propensity not in schema:
        raise sc.DataError.at(file, propensity, None, "is missing (given as the propensity "
                                                      "column)")
    if propensity is None and sc.LOGGED_LOGP in schema:
        propensity, kind = sc.LOGGED_LOGP, "logp"
    if propensity is not None and kind == "prob" and not discrete:
        raise sc.DataError.at(file, propensity, None, "holds probabilities, which are not "
                                                      "defined for continuous actions (give "
                                                      "log-densities with --propensity-kind logp)")
    return propensity, kind


def _categorical_columns(schema: pl.Schema, globs: tuple[str, ...], file: str) -> tuple[str, ...]:
    """The columns matched by `--categorical-cols` patterns (file order): strings, integers,
    booleans or polars categoricals; floats and lists are refused by name."""
    if not globs:
        return ()
    names = [n for n in schema if any(fnmatch.fnmatchcase(n, g) for g in globs)]
    if not names:
        raise sc.DataError(f"{file}: no column matches the categorical pattern(s) "
                           f"{', '.join(globs)} (--categorical-cols).", source=file)
    for name in names:
        dtype = schema[name]
        if not (dtype.is_integer() or dtype == pl.String or dtype == pl.Boolean
                or isinstance(dtype, pl.Categorical | pl.Enum)):
            raise sc.DataError.at(file, name, None, f"has type {dtype}, but categorical columns "
                                                    f"(--categorical-cols) must hold strings or "
                                                    f"integers")
    return tuple(names)


# --- batches of foreign rows → numpy ------------------------------------------------------------


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _not_integral(values: np.ndarray) -> np.ndarray:
    """Floats that are no int64: fractional, NaN, ±inf or beyond ±2^63 (a cast would wrap)."""
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(values) | (values != np.round(values)) | (np.abs(values) >= 2.0**63)


class _Converter:
    """Turns polars batches of one file into numpy arrays, with checks naming the file's rows."""

    def __init__(self, plan: _Plan, dims: dict[str, int | None],
                 string_ids: dict[str, int], *, categories: Categories | None = None,
                 unknown: dict[str, int] | None = None, row_offset: int = 0) -> None:
        self.plan, self.dims = plan, dims
        self._string_ids = string_ids  # shared by all files: an episode may span two
        self.categories = categories
        self.unknown = unknown if unknown is not None else {}  # unseen categories per column
        self.row_offset = row_offset  # rows of the files before this one (--bandit ids)

    def _check_nulls(self, frame: pl.DataFrame, first_row: int) -> None:
        for name in self.plan.needed():
            series = frame.get_column(name)
            if series.null_count():
                row = first_row + int(series.is_null().arg_max() or 0)
                raise sc.DataError.at(self.plan.file, name, row, "is null")

    def _vector(self, frame: pl.DataFrame, vector: _Vector, key: str, first_row: int) -> np.ndarray:
        if not vector.is_list:
            values = frame.select(vector.columns).to_numpy().astype(np.float32, order="C")
        else:
            arrow = frame.get_column(vector.columns[0]).to_arrow()
            if pa.types.is_fixed_size_list(arrow.type):
                values = sc.vector_values(arrow.cast(pa.list_(pa.float32(), arrow.type.list_size)))
            else:
                lengths = pc.list_value_length(arrow).to_numpy(zero_copy_only=False)
                expected = self.dims.get(key) or (int(lengths[0]) if len(lengths) else 0)
                bad = lengths != expected
                if bad.any():
                    row = _first_row(bad)
                    raise sc.DataError.at(
                        self.plan.file, vector.label, first_row + row,
                        f"inconsistent {key} dimension: {lengths[row]} values where earlier rows "
                        f"have {expected}")
                flat = pc.list_flatten(arrow).cast(pa.float32()).to_numpy(zero_copy_only=False)
                values = flat.reshape(len(lengths), expected)
        values = values.reshape(len(frame), -1)
        expected_dim = self.dims.setdefault(key, values.shape[1])
        if values.shape[1] != expected_dim:
            raise sc.DataError.at(self.plan.file, vector.label, first_row,
                                  f"inconsistent {key} dimension: {values.shape[1]} values where "
                                  f"earlier rows have {expected_dim}")
        return values

    def _flag(self, frame: pl.DataFrame, name: str | None) -> np.ndarray:
        if name is None:
            return np.zeros(len(frame), dtype=bool)
        return np.asarray(frame.get_column(name).to_numpy()).astype(bool)

    def _episode_ids(self, series: pl.Series, first_row: int) -> np.ndarray:
        if series.dtype.is_integer():
            return _int64_ids(series, self.plan.file, first_row, "episode id")
        if series.dtype.is_float():
            values = series.to_numpy()
            bad = _not_integral(values)
            if bad.any():
                row = _first_row(bad)
                raise sc.DataError.at(self.plan.file, series.name, first_row + row,
                                      f"episode id {values[row]} is not an integer")
            return values.astype(np.int64)
        # Other ids (strings, uuids): number each distinct id by first appearance. The Python
        # loop runs once per episode run, not per row.
        values = series.cast(pl.String).to_numpy()
        starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
        numbers = np.empty(len(starts), dtype=np.int64)
        for i, key in enumerate(values[starts]):
            numbers[i] = self._string_ids.setdefault(key, len(self._string_ids))
        lengths = np.diff(np.r_[starts, len(values)])
        return np.repeat(numbers, lengths)

    def _steps(self, series: pl.Series, first_row: int) -> np.ndarray:
        """Steps as int64, refusing what the int32 `step` column would wrap or truncate."""
        values = series.cast(pl.Float64).to_numpy() if not series.dtype.is_integer() else None
        problem = "is not an integer"
        if values is not None and (bad := _not_integral(values)).any():
            row = _first_row(bad)
        else:
            steps = series.to_numpy().astype(np.int64) if values is None else values.astype(
                np.int64)
            bad = (steps < 0) | (steps > np.iinfo(np.int32).max)
            if not bad.any():
                return steps
            row, problem = _first_row(bad), "is out of range (0 to 2^31 - 1)"
        shown = series[row]
        raise sc.DataError.at(self.plan.file, series.name, first_row + row,
                              f"step {shown} {problem}")

    def _propensity(self, frame: pl.DataFrame, first_row: int) -> np.ndarray | None:
        name = self.plan.propensity
        if name is None:
            return None
        values = frame.get_column(name).cast(pl.Float64).to_numpy()
        if self.plan.propensity_kind == "logp":
            return values
        bad = ~((values > 0) & (values <= 1))
        if bad.any():
            row = _first_row(bad)
            raise sc.DataError.at(self.plan.file, name, first_row + row,
                                  f"probability {values[row]} lies outside (0, 1]")
        return np.log(values)

    def _action(self, frame: pl.DataFrame, first_row: int) -> np.ndarray:
        action = self.plan.action
        if not self.plan.action_discrete:
            return self._vector(frame, action, "action", first_row)
        series = frame.get_column(action.columns[0])
        if series.dtype.is_integer():
            return _int64_ids(series, self.plan.file, first_row, "action")
        values = series.to_numpy()
        bad = _not_integral(values)
        if bad.any():
            row = _first_row(bad)
            raise sc.DataError.at(self.plan.file, action.label, first_row + row,
                                  f"action {values[row]} is not an integer, but the action "
                                  f"space is Discrete")
        return values.astype(np.int64)

    def convert(self, frame: pl.DataFrame, file_index: int, first_row: int) -> dict[str, Any]:
        plan = self.plan
        self._check_nulls(frame, first_row)
        rows: dict[str, Any] = {
            "episode_id": (None if plan.episode_id is None
                           else self._episode_ids(frame.get_column(plan.episode_id), first_row)),
            "step": None if plan.step is None else self._steps(frame.get_column(plan.step),
                                                                first_row),
            "obs": self._obs(frame, first_row),
            "next_obs": (None if plan.next_obs is None
                         else self._vector(frame, plan.next_obs, "next_obs", first_row)),
            "action": self._action(frame, first_row),
            "reward": frame.get_column(plan.reward).cast(pl.Float64).to_numpy(),
            "terminated": self._flag(frame, plan.terminated),
            "truncated": self._flag(frame, plan.truncated),
            "done": self._flag(frame, plan.done),
            "logp": self._propensity(frame, first_row),
            "file_index": np.full(len(frame), file_index, dtype=np.int32),
            "file_row": np.arange(first_row, first_row + len(frame), dtype=np.int64),
        }
        if plan.bandit:
            _one_decision_per_row(rows, self.row_offset + first_row)
        _check_next_obs_width(rows, plan, first_row)
        return rows

    def _obs(self, frame: pl.DataFrame, first_row: int) -> np.ndarray:
        """Numeric obs columns, then the one-hot blocks of the categorical columns."""
        if not self.plan.obs.columns:
            numeric = np.zeros((len(frame), 0), dtype=np.float32)
        else:
            numeric = self._vector(frame, self.plan.obs, "obs", first_row)
        if self.categories is None:
            return numeric
        onehot, unknown = self.categories.encode(frame)
        for column, count in unknown.items():
            self.unknown[column] = self.unknown.get(column, 0) + count
        return np.concatenate([numeric, onehot], axis=1)


def _one_decision_per_row(rows: dict[str, Any], first_row: int) -> None:
    """--bandit: each row is a one-step episode that terminates; its id is its row number
    counted over all input files. next_obs stays a copy of obs: nothing bootstraps from it."""
    n = len(rows["reward"])
    rows["episode_id"] = np.arange(first_row, first_row + n, dtype=np.int64)
    rows["step"] = np.zeros(n, dtype=np.int64)
    rows["terminated"] = np.ones(n, dtype=bool)
    rows["truncated"] = np.zeros(n, dtype=bool)
    rows["done"] = np.zeros(n, dtype=bool)


def _check_next_obs_width(rows: dict[str, Any], plan: _Plan, first_row: int) -> None:
    """next_obs must have obs's width (before: a pyarrow cast error deep in the writer)."""
    next_obs = rows["next_obs"]
    if next_obs is not None and next_obs.shape[1] != rows["obs"].shape[1]:
        assert plan.next_obs is not None
        raise sc.DataError.at(plan.file, plan.next_obs.label, first_row,
                              f"inconsistent next_obs dimension: {next_obs.shape[1]} values "
                              f"where obs has {rows['obs'].shape[1]}")


# --- assembling whole episodes ------------------------------------------------------------------


def _concat(carry: dict[str, Any] | None, rows: dict[str, Any]) -> dict[str, Any]:
    if carry is None:
        return rows
    # Every file provides the same fields (`_check_same_fields`), so None pairs with None.
    return {key: None if value is None else np.concatenate([carry[key], value])
            for key, value in rows.items()}


def _take(rows: dict[str, Any], start: int, stop: int | None) -> dict[str, Any]:
    return {k: None if v is None else v[start:stop] for k, v in rows.items()}


@dataclass
class _Counts:
    episodes: int = 0
    unflagged: int = 0           # episodes whose last step had neither flag (kept as truncated)
    next_obs_copied: int = 0     # episodes whose last next_obs is a copy of obs
    next_obs_copied_truncated: int = 0


class _Assembler:
    """Cuts a stream of converted rows into tables of whole episodes."""

    def __init__(self, *, by_id: bool, done_means: str, files: list[str],
                 labels: Callable[[], Mapping[str, str]]) -> None:
        self.by_id, self.done_means, self.files = by_id, done_means, files
        self.labels = labels
        self.carry: dict[str, Any] | None = None
        self.next_id = 0
        self.counts = _Counts()

    def push(self, rows: dict[str, Any], *, final: bool) -> Iterator[SourcedTable]:
        buffer = _concat(self.carry, rows)
        self.carry = None
        n = len(buffer["reward"])
        if n == 0:
            return
        if final:
            cut = n
        elif self.by_id:
            ids = buffer["episode_id"]
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            cut = int(starts[-1])
        else:
            done = buffer["terminated"] | buffer["truncated"] | buffer["done"]
            flagged = np.flatnonzero(done)
            cut = int(flagged[-1]) + 1 if len(flagged) else 0
        if cut < n:
            self.carry = _take(buffer, cut, None)
        if cut > 0:
            yield self._table(_take(buffer, 0, cut))

    def flush(self) -> Iterator[SourcedTable]:
        """Close the episode still open (end of the input, or of a file in done-flag mode)."""
        if self.carry is not None:
            yield from self.push(_take(self.carry, 0, 0), final=True)

    def _table(self, rows: dict[str, Any]) -> SourcedTable:
        n = len(rows["reward"])
        terminated, truncated = rows["terminated"].copy(), rows["truncated"].copy()
        if self.by_id:
            episode_id = rows["episode_id"]
            start = np.r_[True, episode_id[1:] != episode_id[:-1]]
        else:
            done = terminated | truncated | rows["done"]
            start = np.r_[True, done[:-1]]
            episode_id = self.next_id + np.cumsum(start) - 1
            self.next_id += int(start.sum())
        last = np.r_[start[1:], True]
        done_only = rows["done"] & ~(terminated | truncated)
        if self.done_means == "terminated":
            terminated |= done_only
        else:
            truncated |= done_only
        unflagged = last & ~(terminated | truncated)
        truncated |= unflagged
        self.counts.unflagged += int(unflagged.sum())
        self.counts.episodes += int(start.sum())
        start_rows = np.flatnonzero(start)
        lengths = np.diff(np.r_[start_rows, n])
        step = rows["step"]
        if step is None:
            step = np.arange(n) - np.repeat(start_rows, lengths)
        obs, next_obs = rows["obs"], rows["next_obs"]
        if next_obs is None:
            next_obs = np.empty_like(obs)
            next_obs[:-1] = obs[1:]
            next_obs[last] = obs[last]
            self.counts.next_obs_copied += int(last.sum())
            self.counts.next_obs_copied_truncated += int((last & truncated & ~terminated).sum())
        table = sc.steps_table(
            episode_id=episode_id, step=step, obs=obs, action=rows["action"],
            reward=rows["reward"], next_obs=next_obs, terminated=terminated, truncated=truncated,
            logged_logp=rows["logp"])
        file_index, file_row = rows["file_index"], rows["file_row"]

        def locate(row: int) -> tuple[str, int]:
            return self.files[int(file_index[row])], int(file_row[row])

        return SourcedTable(table, self.files[int(file_index[0])], 0, locate, self.labels())


# --- the job ----------------------------------------------------------------------------------


def _check_same_fields(first: _Plan, plan: _Plan) -> None:
    """Every input file must provide the same canonical fields (files are one log)."""
    fields = {"an episode id column": lambda p: p.episode_id is not None,
              "a step column": lambda p: p.step is not None,
              "next_obs": lambda p: p.next_obs is not None,
              "a propensity column": lambda p: p.propensity is not None,
              "discrete actions": lambda p: p.action_discrete}
    for what, has in fields.items():
        if has(first) != has(plan):
            which = first.file if has(first) else plan.file
            raise sc.DataError(f"{plan.file}: the input files differ: only {which} has {what}.",
                               source=plan.file)
    if first.propensity_kind != plan.propensity_kind and plan.propensity is not None:
        raise sc.DataError(f"{plan.file}: the input files differ: its propensity column holds "
                           f"{plan.propensity_kind}, that of {first.file} {first.propensity_kind}.",
                           source=plan.file)


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What `ingest_parquet` wrote and what the user should know about it."""

    path: Path
    card: dict[str, Any]
    warnings: list[str]


def input_files(paths: Sequence[Path]) -> list[Path]:
    """Expand folders into their Parquet/CSV files (sorted); check that every file exists."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.suffix.lower() in PARQUET_SUFFIXES + CSV_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path}: no .parquet or .csv files in this folder.")
            files.extend(_regular_file(p) for p in found)
        elif path.exists():
            _regular_file(path)
            if path.suffix.lower() not in PARQUET_SUFFIXES + CSV_SUFFIXES:
                raise ValueError(f"{path}: unknown file type {path.suffix!r}; give .parquet or "
                                 f".csv files.")
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder.")
    if not files:
        raise ValueError("no input files given.")
    return files


def _regular_file(path: Path) -> Path:
    """`path` if it is a regular file (or a link to one): a FIFO, socket or device named
    `*.parquet` would block the reader forever or read without end, so it is refused by name."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise FileNotFoundError(f"{_text(path)}: cannot be read ({err.strerror}).") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
        raise sc.DataError(f"{_text(path)}: is {kind}; only regular .parquet/.csv files are read.",
                           source=str(path))
    return path


def _text(path: Path | str) -> str:
    """A path for a one-line message (control characters escaped)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(path))


def _check_csv_header(path: Path) -> None:
    """Refuse a CSV whose header repeats a column name, as Parquet readers do (polars would
    rename the second copy and the mapping would silently take the first)."""
    import csv

    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        header = next(csv.reader(handle, delimiter="\t" if path.suffix.lower() == ".tsv"
                                 else ","), [])
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise sc.DataError(f"{_text(path)}: column {_text(repr(name))} appears twice in the "
                               f"header; column names must be unique.", source=str(path))
        seen.add(name)


def _int64_ids(series: pl.Series, file: str, first_row: int, what: str) -> np.ndarray:
    """Integer values as int64, refusing unsigned values above 2^63 - 1 (they would wrap to
    negative numbers; no lossless int64 mapping keeps their order and meaning)."""
    values = series.to_numpy()
    if values.dtype == np.uint64 and len(values) and values.max() > np.iinfo(np.int64).max:
        row = _first_row(values > np.iinfo(np.int64).max)
        raise sc.DataError.at(file, series.name, first_row + row,
                              f"{what} {values[row]} does not fit a signed 64-bit integer "
                              f"(at most 2^63 - 1)")
    return values.astype(np.int64, copy=False)


def _scan(path: Path) -> pl.LazyFrame:
    suffix = path.suffix.lower()
    # glob=False: a file named `log[1].parquet` is that file, not a pattern matching others.
    if suffix in PARQUET_SUFFIXES:
        return pl.scan_parquet(path, glob=False)
    return pl.scan_csv(path, separator="\t" if suffix == ".tsv" else ",",
                       infer_schema_length=10_000, glob=False)


def count_rows(files: Sequence[Path]) -> int | None:
    """Total rows of Parquet inputs from their footers (None when a CSV is among them)."""
    import pyarrow.parquet as pq

    if any(f.suffix.lower() not in PARQUET_SUFFIXES for f in files):
        return None
    try:
        return sum(pq.read_metadata(f).num_rows for f in files)
    except (pa.ArrowException, OSError):  # the ingest itself reports the unreadable file
        return None


def _env_spaces(spec: Mapping[str, Any]) -> tuple[Any, Any, str | None]:
    """(observation space, action space, None) of the env `spec` describes (kwargs included),
    or (None, None, reason)."""
    env, reason = build_env(spec)
    if env is None:
        return None, None, reason
    try:
        return env.observation_space, env.action_space, None
    finally:
        env.close()


ACTION_SEMANTICS = ("executed", "unclipped")
CLIPPED_WARN_FRACTION = 0.01  # warn when ≥ 1% of continuous actions sit exactly on a bound


def _finite_box(space: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(low, high) of a Box with finite bounds (flat float32), else None."""
    low, high = getattr(space, "low", None), getattr(space, "high", None)
    if low is None or high is None or not (np.isfinite(low).all() and np.isfinite(high).all()):
        return None
    return (np.asarray(low, np.float32).reshape(-1), np.asarray(high, np.float32).reshape(-1))


def _rows_on_bounds(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> int:
    """Rows whose action has a component exactly equal to its lower or upper bound."""
    if action.ndim != 2 or action.shape[1] != low.shape[0]:
        return 0
    return int(np.count_nonzero(((action == low) | (action == high)).any(axis=1)))


def _action_semantics(actions: str, space: Any) -> dict[str, Any]:
    """Card fields for `actions`: "executed" records nothing; "unclipped" records
    `env_action_space` (the env's true bounds, used by rollouts) and `actions`."""
    if actions not in ACTION_SEMANTICS:
        raise ValueError(f"--actions must be 'executed' or 'unclipped', got {actions!r}.")
    if actions == "executed":
        return {}
    if _finite_box(space) is None:
        raise ValueError("--actions unclipped needs the env's true action bounds: give --env ID "
                         "(a continuous env gymnasium can build) or --action-space "
                         "box:LOW:HIGH:DIM.")
    return {
        "env_action_space": space_to_json(space),
        "actions": {
            "semantics": "unclipped",
            "stored": "the raw samples of the logging policy, possibly outside "
                      "env_action_space; logged_logp is their density",
            "policy": "densities are evaluated on the raw action (action_space is unbounded, so "
                      "the target policy is an unsquashed Gaussian)",
            "rollout": "actions are clipped to env_action_space before env.step, as the logging "
                       "system did",
        },
    }


def _unbounded(space: Any) -> Any:
    """The stored action space of an unclipped log: a Box of the same shape, no bounds."""
    from gymnasium import spaces

    shape = (int(np.prod(space.shape)),)
    return spaces.Box(-np.inf, np.inf, shape, dtype=np.float32)


def _categories(files: Sequence[Path], plans: Sequence[_Plan],
                categories_from: Path | None) -> Categories | None:
    """The vocabularies of the categorical columns: from `categories_from`'s card, or the
    distinct values of each column over all input files (one pass over those columns only)."""
    columns = plans[0].categorical
    if any(plan.categorical != columns for plan in plans[1:]):
        raise sc.DataError(f"{plans[0].file}: the input files differ in their categorical "
                           f"columns (--categorical-cols).", source=plans[0].file)
    if not columns:
        if categories_from is not None:
            raise ValueError("--categories-from needs --categorical-cols (the columns to "
                             "encode).")
        return None
    if plans[0].next_obs is not None:
        raise sc.DataError(f"{plans[0].file}: --categorical-cols encodes obs only; with a "
                           f"next_obs column the next state's categories are unknown (drop the "
                           f"next_obs mapping: it is then the next row's obs).",
                           source=plans[0].file)
    if categories_from is not None:
        card = read_card(Path(categories_from))
        return Categories.from_card(card.get("categorical"), columns, 0, str(categories_from))
    # One scan per file for all columns (a CSV is parsed whole on every scan).
    distinct = [_scan(f).select([pl.col(c).unique().implode() for c in columns]).collect()
                for f in files]
    vocabularies = []
    for column in columns:
        parts = [frame.get_column(column).explode() for frame in distinct]
        if len({part.dtype for part in parts}) > 1:
            parts = [part.cast(pl.String) for part in parts]
        vocabularies.append(vocabulary(column, pl.concat(parts)))
    return Categories(tuple(vocabularies))


def ingest_parquet(
    paths: Sequence[Path],
    out: Path,
    *,
    mapping: ColumnMapping | None = None,
    action_space: Any = None,
    env_id: str | None = None,
    name: str | None = None,
    description: str | None = None,
    overwrite: bool = False,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    rows_per_file: int | None = None,
    progress: Callable[[int], None] | None = None,
    bandit: bool = False,
    categories_from: Path | None = None,
    env_kwargs: Mapping[str, Any] | None = None,
    actions: str = "executed",
) -> IngestResult:
    """Convert foreign Parquet / CSV step logs into a canonical dataset at `out`.

    Args:
        paths: files or folders (their .parquet/.csv files, sorted), read in the order given.
        out: destination dataset folder.
        mapping: column mapping (default: canonical names).
        action_space: a gymnasium Box/Discrete to check actions against (default: the env's
            when `env_id` can be built, else inferred from the data).
        env_id: gymnasium id (or EnvSpec JSON text / .json file) recorded in the card's
            `env_spec`, completed from gymnasium's registration (`envspec.env_spec`).
        name, description: card fields.
        overwrite: replace an existing dataset at `out`.
        batch_rows: rows per streamed batch (memory is O(batch_rows + longest episode)).
        rows_per_file: shard size (default: the store's).
        progress: called with the number of input rows of each batch once it is written.
        bandit: one decision per row: every row is a one-step episode that terminates, its
            episode id the row number over all files (episode id, step, done flags and
            next_obs columns are not read). The card records `"bandit": true`.
        env_kwargs: constructor arguments of the env (`--env-kwargs`), stored in the card's
            `env_spec.kwargs` and used to build it (spaces here, rollouts later).
        actions: "executed" (the actions the env received) or "unclipped" (the raw samples
            of a policy whose action the env, or the logging system, clipped; the propensity
            is their density): see `_unclipped_spaces`.
        categories_from: a dataset whose card's `categorical` vocabularies encode the
            `mapping.categorical_cols` columns (default: the vocabularies of this input).

    Returns:
        The dataset path, its card and warnings (one sentence each).

    Raises:
        DataError: the input violates the schema (the message names file, column and row).
        FileNotFoundError: an input is missing.
        ValueError: bad options.
    """
    mapping = mapping or ColumnMapping()
    files = input_files(paths)
    warnings: list[str] = []
    spec, observation_space, action_space = _env_and_spaces(env_id, env_kwargs, action_space,
                                                            warnings)
    bounds = _finite_box(action_space)  # to spot a log that looks clipped
    action_card = _action_semantics(actions, action_space)
    if actions == "unclipped":
        action_space = _unbounded(action_space)
    plans = [_plan_file(file, mapping, action_space, bandit) for file in files]
    categories = _categories(files, plans, categories_from)
    for plan in plans[1:]:
        _check_same_fields(plans[0], plan)
    done_means = mapping.done_means or "terminated"
    card = _ingest_card(files, plans, name=name or Path(out).name, description=description,
                        observation_space=observation_space, action_space=action_space,
                        spec=spec, bandit=bandit, done_means=done_means, action_card=action_card)
    stream = _Stream(files, plans, card, categories=categories, bandit=bandit,
                     done_means=done_means, batch_rows=batch_rows,
                     bounds=None if actions == "unclipped" else bounds)

    def count(rows: int) -> None:
        if progress is not None:
            progress(rows)

    try:
        write_dataset(Path(out), stream.tables(), card=card, overwrite=overwrite, progress=count,
                      rows_per_file=rows_per_file or DEFAULT_ROWS_PER_FILE)
    except (pl.exceptions.PolarsError, pa.ArrowException) as err:
        raise sc.DataError(f"{stream.current.file}: could not be read ({_one_line(err)}).",
                           source=stream.current.file) from None
    finally:
        stream.close()
    warnings.extend(stream.warnings(categories_from))
    return IngestResult(Path(out), read_card(Path(out)), warnings)


def _env_and_spaces(env_id: str | None, env_kwargs: Mapping[str, Any] | None,
                    action_space: Any, warnings: list[str]) -> tuple[Any, Any, Any]:
    """(env spec or None, flat observation space or None, action space): the spaces of the
    env when it can be built here (a given `action_space` wins), else a warning."""
    if env_kwargs and env_id is None:
        raise ValueError("--env-kwargs needs --env ID (the environment they configure).")
    spec = None if env_id is None else env_spec(env_id, env_kwargs)
    observation_space = None
    if spec is not None:
        check_env_spec(spec, source="--env")  # before gymnasium imports anything it names
        env_obs, env_action, reason = _env_spaces(spec)
        if reason is not None:
            warnings.append(f"environment {spec['id']} could not be built here ({reason}); its "
                            f"spec is recorded and the spaces are inferred from the data.")
        else:
            observation_space = flatten_space(env_obs)
            if action_space is None:
                action_space = env_action
    return spec, observation_space, action_space


def _plan_file(file: Path, mapping: ColumnMapping, action_space: Any, bandit: bool) -> _Plan:
    """Read `file`'s schema (refusing a duplicated CSV header or an empty CSV) and resolve
    its columns."""
    try:
        if file.suffix.lower() in CSV_SUFFIXES:
            _check_csv_header(file)
        schema = _scan(file).collect_schema()
        if file.suffix.lower() in CSV_SUFFIXES and _scan(file).head(1).collect().is_empty():
            # A header-only CSV has String columns: say what is wrong, not "String".
            raise sc.DataError(f"{file}: the input has no rows (empty input).",
                               source=str(file))
    except (pl.exceptions.PolarsError, OSError) as err:
        raise sc.DataError(f"{file}: could not be read ({_one_line(err)}).",
                           source=str(file)) from None
    return _resolve(schema, mapping, str(file), action_space, bandit=bandit)


def _ingest_card(files: Sequence[Path], plans: Sequence[_Plan], *, name: str,
                 description: str | None, observation_space: Any, action_space: Any,
                 spec: Any, bandit: bool, done_means: str,
                 action_card: dict[str, Any]) -> dict[str, Any]:
    """The card before streaming (its `source` records the inputs and the mapping; the
    stream adds row counts, digests and what it found)."""
    by_id = plans[0].episode_id is not None or bandit
    source: dict[str, Any] = {
        "kind": "parquet-ingest",
        "files": [{"path": str(f.resolve()), "bytes": f.stat().st_size} for f in files],
        "columns": plans[0].describe(),
        "episode_boundaries": (
            "one decision per row (--bandit): each row a one-step episode that terminates, "
            "episode id = row number over the input files" if bandit
            else f"episode id column '{plans[0].episode_id}'" if by_id
            else f"done flags (a done column means {done_means})"),
    }
    card: dict[str, Any] = {
        "name": name,
        "description": description or f"Ingested from {len(files)} file(s) by offpg ingest "
                                      f"parquet.",
        "observation_space": None if observation_space is None else space_to_json(
            observation_space),
        "action_space": None if action_space is None else space_to_json(action_space),
        "env_spec": spec,
        "source": source,
        "behavior": None,
        "bandit": bandit,
        **action_card,
    }
    if plans[0].propensity is not None:
        kind = ("probabilities, stored as their log" if plans[0].propensity_kind == "prob"
                else "log-probabilities")
        card["propensity"] = {"logged_logp": {"source": f"input column '{plans[0].propensity}' "
                                                        f"({kind})"}}
    return card


class _Stream:
    """The canonical tables of the input files, in order; once exhausted it has completed
    the card with what streaming found (rows, digests, vocabularies, derived next_obs)."""

    def __init__(self, files: Sequence[Path], plans: Sequence[_Plan], card: dict[str, Any], *,
                 categories: Categories | None, bandit: bool, done_means: str, batch_rows: int,
                 bounds: tuple[np.ndarray, np.ndarray] | None) -> None:
        self.files, self.plans, self.card = files, plans, card
        self.categories, self.batch_rows, self.bounds = categories, batch_rows, bounds
        self.by_id = plans[0].episode_id is not None or bandit
        self.current = plans[0]  # the file being read (its labels name columns in errors)
        self.assembler = _Assembler(by_id=self.by_id, done_means=done_means,
                                    files=[str(f) for f in files],
                                    labels=lambda: self.current.labels())
        self.dims: dict[str, int | None] = {}
        self.string_ids: dict[str, int] = {}
        self.unknown: dict[str, int] = {}
        self.on_bound = [0, 0]  # rows with an action component exactly on a bound, rows
        # Hash the inputs in a thread while they are ingested (hashlib releases the GIL).
        self.hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offpg-sha256")
        self.digests = [self.hashing.submit(file_sha256, f) for f in files]

    def tables(self) -> Iterator[SourcedTable]:
        source = self.card["source"]
        rows_before = 0
        for index, (file, plan) in enumerate(zip(self.files, self.plans, strict=True)):
            self.current = plan
            converter = _Converter(plan, self.dims, self.string_ids, categories=self.categories,
                                   unknown=self.unknown, row_offset=rows_before)
            first_row = 0
            frames = _scan(file).select(plan.needed()).collect_batches(chunk_size=self.batch_rows)
            for frame in frames:
                rows = converter.convert(frame, index, first_row)
                if self.bounds is not None:
                    self.on_bound[0] += _rows_on_bounds(rows["action"], *self.bounds)
                    self.on_bound[1] += len(frame)
                first_row += len(frame)
                yield from self.assembler.push(rows, final=False)
            source["files"][index]["rows"] = first_row
            rows_before += first_row
            if first_row == 0:
                raise sc.DataError(f"{file}: the input has no rows (empty input).",
                                   source=str(file))
            if not self.by_id:  # an episode open at the end of a file ends there
                yield from self.assembler.flush()
        yield from self.assembler.flush()
        # write_dataset reads the card once the stream is exhausted: record what streaming found.
        self._complete_card()

    def _complete_card(self) -> None:
        source, plans, counts = self.card["source"], self.plans, self.assembler.counts
        for entry, digest in zip(source["files"], self.digests, strict=True):
            entry["sha256"] = digest.result()
        source["episodes_without_end_flag"] = counts.unflagged
        if self.categories is not None:
            offset = self.dims.get("obs") or len(plans[0].obs.columns)
            self.card["categorical"] = replace(self.categories, offset=offset).to_card()
            source["categorical_unknown_rows"] = dict(self.unknown)
        if plans[0].next_obs is None:
            source["next_obs"] = {
                "derived": "the next row's obs within the episode; the last step's next_obs is "
                           "a copy of its own obs",
                "episodes_with_copied_last_next_obs": counts.next_obs_copied,
                "of_which_truncated": counts.next_obs_copied_truncated,
            }

    def close(self) -> None:
        self.hashing.shutdown(wait=True, cancel_futures=True)

    def warnings(self, categories_from: Path | None) -> list[str]:
        """One sentence per thing the user should know: a log that looks clipped, values
        outside a given vocabulary, episodes without an end flag or a true last next_obs."""
        warnings: list[str] = []
        counts, (on, rows) = self.assembler.counts, self.on_bound
        if self.plans[0].propensity is not None and rows and on >= CLIPPED_WARN_FRACTION * rows:
            warnings.append(f"{on} of {rows} actions ({on / rows:.1%}) "
                            f"lie exactly on a bound of the action space: the log looks clipped. "
                            f"If the logger stored the unclipped samples with their densities, "
                            f"ingest them with --actions unclipped; a clipped action paired with "
                            f"the density of the unclipped sample biases every importance weight.")
        if unseen := {c: n for c, n in self.unknown.items() if n}:
            warnings.append("values outside the vocabulary of " + str(categories_from) + " went "
                            "to the unknown slot: " + ", ".join(f"{n} row(s) of column {c!r}"
                                                                for c, n in unseen.items()) + ".")
        if counts.unflagged:
            warnings.append(f"{counts.unflagged} of {counts.episodes} episodes end with neither "
                            f"terminated nor truncated; they are kept as truncated.")
        if counts.next_obs_copied_truncated:
            warnings.append(f"{counts.next_obs_copied_truncated} truncated episodes have no "
                            f"next_obs for their last step; it is a copy of obs there (map a "
                            f"next_obs column to give the true one).")
        return warnings


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
