"""The canonical dataset folder: atomic sharded Parquet writes, the `_dataset.json` card, reading.

A dataset is a folder with `part-00000.parquet …` (schema v1, shards of whole episodes, row
groups of ~64k rows for streaming) and the card `_dataset.json` (`card_path`; a folder written
before the rename holds `dataset.json`, still read). Everything that is not a data part starts
with `_` (the card, a behavior model in `_behavior/`), so the folder is also a plain Parquet
dataset for pyarrow.dataset, Spark, Hive and Ray Data. `write_dataset` consumes a stream of
tables of whole episodes and never holds more than one input table plus one row group, writes
into `<out>.tmp-<pid>/` beside the destination, fsyncs every file, then renames: a crash or an
error never leaves a partial dataset under the final name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from offpg_offline.data import schema as sc
from offpg_offline.data.card import validate_card
from offpg_offline.data.spaces import space_from_json, space_to_json

CARD_NAME = "_dataset.json"  # a leading "_": Spark, Hive, pyarrow.dataset and Ray skip it
LEGACY_CARD_NAME = "dataset.json"  # written before the rename; still read (never written)
BEHAVIOR_DIR = "_behavior"  # behavior-model artifacts inside a dataset folder (hidden likewise)
DEFAULT_ROWS_PER_FILE = 262_144  # 4 row groups; shards are encoded two at a time
DEFAULT_ROW_GROUP_SIZE = 65_536
DEFAULT_COMPRESSION = "snappy"  # Parquet's default; zstd is ~25% slower to write, ~10% smaller
_HASH_BLOCK = 1 << 20


class DatasetExistsError(FileExistsError, ValueError):
    """The output folder exists and `overwrite` was not given (a user error: a ValueError too)."""


class SourcedTable(NamedTuple):
    """A table of whole episodes with where its rows came from, for error messages.

    `write_dataset` accepts these in place of bare tables, so validation messages name the
    user's file, column and row instead of the writer's running row count.

    Attributes:
        table: schema-v1 rows.
        source: the file named in messages.
        row_offset: the number in `source` of the table's first row.
        locate: maps a row of `table` to (file, row in that file); overrides `source` and
            `row_offset` (a table may hold rows of two files when an episode spans them).
        labels: canonical column → the user's column name(s), shown in messages.
    """

    table: pa.Table
    source: str
    row_offset: int = 0
    locate: Callable[[int], tuple[str, int]] | None = None
    labels: Mapping[str, str] | None = None

    def relocate(self, err: sc.DataError) -> sc.DataError:
        """`err` (about a row of `table`, counted from `row_offset`) in the user's terms."""
        if err.column is None or err.problem is None:
            return err
        label = (self.labels or {}).get(err.column)
        source, row = err.source or self.source, err.row
        if row is not None and self.locate is not None:
            source, row = self.locate(row - self.row_offset)
        return sc.DataError.at(source, err.column, row, err.problem,
                               label=None if label == err.column else label)


def json_safe(value: Any) -> Any:
    """`value` as strict JSON: for card fields copied from foreign metadata (Minari, ...).

    Sets become sorted lists (strings, then numbers, then the rest), numpy scalars and arrays
    plain numbers and (nested) lists, tuples lists, mapping keys strings, bytes UTF-8 text,
    non-finite floats the strings "nan" / "inf" / "-inf" (as Box bounds are written), and any
    other object its `repr`: unknown metadata never stops a card from being written.
    """
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                   "inf" if value > 0 else "-inf")
    if isinstance(value, np.generic | np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((json_safe(item) for item in value), key=_set_order)
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return repr(value)


def _set_order(item: Any) -> tuple[int, Any]:
    """Sort key of a set's JSON-safe items: strings, then numbers, then the rest by JSON text."""
    if isinstance(item, str):
        return (0, item)
    if isinstance(item, int | float) and not isinstance(item, bool):
        return (1, item)
    return (2, json.dumps(item, sort_keys=True))


# --- streaming statistics ----------------------------------------------------------------------


@dataclass
class _Range:
    """Running min / sum / max / count of a stream of values (sum in float64)."""

    count: int = 0
    total: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")

    def add(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        self.count += len(values)
        self.total += float(np.sum(values, dtype=np.float64))
        self.low = min(self.low, float(np.min(values)))
        self.high = max(self.high, float(np.max(values)))

    def summary(self) -> dict[str, float] | None:
        if self.count == 0:
            return None
        return {"min": self.low, "mean": self.total / self.count, "max": self.high}


class StatsAccumulator:
    """Episode lengths and returns, ends, and propensity ranges over streamed record batches.

    Batches may split an episode (a reader's batches do); the open episode is carried over to the
    next batch. Needs the columns episode_id, reward, terminated, truncated; propensity columns
    are summarised when present. The return is the undiscounted sum of rewards.
    """

    def __init__(self) -> None:
        self.steps = 0
        self.lengths = _Range()
        self.returns = _Range()
        self.terminated = 0  # episodes whose last step is terminated
        self.truncated = 0   # episodes whose last step is truncated and not terminated
        self.propensity: dict[str, _Range] = {}
        self.propensity_nulls: dict[str, int] = {}
        self._carry: tuple[int, int, float, bool, bool] | None = None  # id, length, return, ends

    def update(self, batch: pa.RecordBatch | pa.Table) -> None:
        rows = batch.num_rows
        if rows == 0:
            return
        self.steps += rows
        episode = batch.column(sc.EPISODE_ID).to_numpy()
        reward = batch.column(sc.REWARD).to_numpy().astype(np.float64)
        terminated = batch.column(sc.TERMINATED).to_numpy(zero_copy_only=False)
        truncated = batch.column(sc.TRUNCATED).to_numpy(zero_copy_only=False)
        run_start = np.flatnonzero(np.r_[True, episode[1:] != episode[:-1]])
        run_end = np.r_[run_start[1:], rows] - 1
        ids = episode[run_start]
        lengths = (run_end - run_start + 1).astype(np.int64)
        returns = np.add.reduceat(reward, run_start)
        ends_term = terminated[run_end]
        ends_trunc = truncated[run_end]
        if self._carry is not None:
            carry_id, carry_len, carry_ret, _, _ = self._carry
            if ids[0] == carry_id:
                lengths[0] += carry_len
                returns[0] += carry_ret
            else:
                self._finish_carry()
        self._close(lengths[:-1], returns[:-1], ends_term[:-1], ends_trunc[:-1])
        self._carry = (int(ids[-1]), int(lengths[-1]), float(returns[-1]),
                       bool(ends_term[-1]), bool(ends_trunc[-1]))
        for name in sc.PROPENSITY_COLUMNS:
            if name not in batch.schema.names:
                continue
            column = batch.column(name)
            self.propensity_nulls[name] = self.propensity_nulls.get(name, 0) + column.null_count
            values = column.drop_null().to_numpy() if column.null_count else column.to_numpy()
            self.propensity.setdefault(name, _Range()).add(values)

    def _close(self, lengths: np.ndarray, returns: np.ndarray, term: np.ndarray,
               trunc: np.ndarray) -> None:
        self.lengths.add(lengths)
        self.returns.add(returns)
        self.terminated += int(term.sum())
        self.truncated += int((trunc & ~term).sum())

    def _finish_carry(self) -> None:
        if self._carry is not None:
            _, length, ret, term, trunc = self._carry
            self._close(np.array([length]), np.array([ret]), np.array([term]), np.array([trunc]))
            self._carry = None

    def summary(self) -> dict[str, Any]:
        """Close the open episode and return plain-JSON statistics."""
        self._finish_carry()
        propensity = {}
        for name in sc.PROPENSITY_COLUMNS:
            rng = self.propensity.get(name)
            propensity[name] = rng.summary() if rng is not None else None
        return {
            "episode_length": self.lengths.summary(),
            "episode_return": self.returns.summary(),
            "episodes_terminated": self.terminated,
            "episodes_truncated": self.truncated,
            "propensity_range": propensity,
        }


# --- writing ---------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class _ShardFile:
    """One part-NNNNN.parquet, encoded by its own thread from a bounded queue of pieces.

    Parquet encoding releases the GIL, so shards are written while the input is read and while
    the previous shard is finished. An error in the thread is re-raised by `put` or `wait`.
    """

    def __init__(self, path: Path, schema: pa.Schema, *, row_group_size: int,
                 compression: str) -> None:
        self.path, self.schema = path, schema
        self.row_group_size, self.compression = row_group_size, compression
        self.rows = 0
        self.episodes = 0
        self.entry: dict[str, Any] | None = None
        self._queue: queue.Queue[pa.Table | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._abort = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"offpg-{path.name}", daemon=True)
        self._thread.start()

    def put(self, piece: pa.Table) -> None:
        if self._error is not None:
            raise self._error
        self.rows += piece.num_rows
        self._queue.put(piece)

    def close(self) -> None:
        """Ask the thread to finish the file (flush, close, sha256, fsync); returns at once."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)

    def wait(self) -> dict[str, Any]:
        """Block until the file is complete; its card entry."""
        self.close()
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self.entry is not None
        return self.entry

    def abort(self) -> None:
        self._abort = True
        self.close()
        self._thread.join()

    def _run(self) -> None:
        writer: pq.ParquetWriter | None = None
        pending: list[pa.Table] = []
        try:
            while (piece := self._queue.get()) is not None:
                if self._error is not None or self._abort:
                    continue  # keep draining so that `put` never blocks forever
                try:
                    if writer is None:
                        writer = pq.ParquetWriter(self.path, self.schema,
                                                  compression=self.compression,
                                                  use_dictionary=False, write_batch_size=65_536)
                    pending.append(piece)
                    pending = self._flush(writer, pending, final=False)
                except BaseException as err:  # handed to the main thread
                    self._error = err
            if self._error is None and not self._abort and writer is not None:
                self._flush(writer, pending, final=True)
                writer.close()
                writer = None
                sha = file_sha256(self.path)
                _fsync_path(self.path)
                self.entry = {"name": self.path.name, "rows": self.rows,
                              "episodes": self.episodes, "bytes": self.path.stat().st_size,
                              "sha256": sha}
        except BaseException as err:
            self._error = self._error or err
        finally:
            if writer is not None:
                writer.close()

    def _flush(self, writer: pq.ParquetWriter, pending: list[pa.Table], *,
               final: bool) -> list[pa.Table]:
        """Write whole row groups of `pending` (all of it when `final`); return the rest."""
        rows = sum(p.num_rows for p in pending)
        size = self.row_group_size
        if rows == 0 or (not final and rows < size):
            return pending
        table = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
        full = rows if final else rows // size * size
        if full:
            writer.write_table(table.slice(0, full), row_group_size=size)
        rest = table.slice(full)
        return [rest] if rest.num_rows else []


class _ShardWriter:
    """Cuts whole episodes into shards of about `rows_per_file` rows, written by `_ShardFile`s.

    At most `parallel` shard files are being encoded at once (memory: ≤ 2 queued pieces and one
    row group each).
    """

    def __init__(self, folder: Path, schema: pa.Schema, *, rows_per_file: int,
                 row_group_size: int, compression: str, parallel: int = 2) -> None:
        self.folder, self.schema = folder, schema
        self.rows_per_file, self.row_group_size = rows_per_file, row_group_size
        self.compression, self.parallel = compression, parallel
        self.files: list[_ShardFile] = []
        self._current: _ShardFile | None = None
        self._waited = 0

    def add(self, table: pa.Table, episode_starts: np.ndarray) -> None:
        """Append `table` (whole episodes; `episode_starts` = row numbers where each begins)."""
        position, rows = 0, table.num_rows
        while position < rows:
            if self._current is None:
                self._open()
            current = self._current
            assert current is not None
            room = self.rows_per_file - current.rows
            if rows - position <= room:
                cut = rows
            else:  # close the file at the first episode boundary past the target size
                index = int(np.searchsorted(episode_starts, position + room, side="left"))
                cut = int(episode_starts[index]) if index < len(episode_starts) else rows
            current.episodes += int(np.count_nonzero((episode_starts >= position)
                                                     & (episode_starts < cut)))
            current.put(table.slice(position, cut - position))
            position = cut
            if current.rows >= self.rows_per_file:
                current.close()
                self._current = None

    def _open(self) -> None:
        while len(self.files) - self._waited >= self.parallel:
            self.files[self._waited].wait()
            self._waited += 1
        path = self.folder / f"part-{len(self.files):05d}.parquet"
        self._current = _ShardFile(path, self.schema, row_group_size=self.row_group_size,
                                   compression=self.compression)
        self.files.append(self._current)

    def finish(self) -> list[dict[str, Any]]:
        """Complete every shard; their card entries in order."""
        return [shard.wait() for shard in self.files]

    def abort(self) -> None:
        for shard in self.files:
            shard.abort()


class _ActionRange:
    """Running bounds of the actions, to infer an action space the card does not give."""

    def __init__(self) -> None:
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None

    def add(self, column: pa.ChunkedArray, source: str, offset: int) -> None:
        if column.type == pa.int64():
            values = column.to_numpy().reshape(-1, 1)
            negative = values[:, 0] < 0
            if negative.any():
                row = int(np.flatnonzero(negative)[0])
                raise sc.DataError.at(source, sc.ACTION, row + offset,
                                      f"discrete action {values[row, 0]} is negative: give the "
                                      f"action space explicitly (e.g. Discrete with a start)")
        else:
            values = sc.vector_values(column)
        low, high = values.min(axis=0), values.max(axis=0)
        self.low = low if self.low is None else np.minimum(self.low, low)
        self.high = high if self.high is None else np.maximum(self.high, high)

    def space(self, discrete: bool) -> dict[str, Any]:
        from gymnasium import spaces

        assert self.low is not None and self.high is not None
        if discrete:  # Discrete(n = max + 1); negative actions were refused in `add`
            return space_to_json(spaces.Discrete(int(self.high[0]) + 1))
        return space_to_json(spaces.Box(self.low.astype(np.float32),
                                        self.high.astype(np.float32), dtype=np.float32))


def _episode_starts(table: pa.Table) -> np.ndarray:
    episode = table.column(sc.EPISODE_ID).to_numpy()
    return np.flatnonzero(np.r_[True, episode[1:] != episode[:-1]])


def check_dataset_name(name: str) -> None:
    """Refuse a dataset name that could act as a path: `..` or `.` parts, a leading `/`, `\\`,
    control characters (names like Minari ids `namespace/name-v0` are fine).

    Raises:
        DataError: one sentence naming the option (`--name`) and the name.
    """
    parts = name.split("/")
    if (not name.strip() or name.startswith("/") or "\\" in name or not name.isprintable()
            or any(part in ("", ".", "..") for part in parts)):
        raise sc.DataError(f"dataset name {name!r} (--name) is not allowed: no '..' or '.' "
                           f"parts, no leading '/', no backslash or control characters.")


def _check_replaceable(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise DatasetExistsError(f"{out}: already exists; pass overwrite (--overwrite) to "
                                 f"replace it.")
    if not is_dataset(out):
        raise DatasetExistsError(f"{out}: exists and is not a dataset folder (no {CARD_NAME}); "
                                 f"refusing to replace it.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove what writers of `out` that died (SIGKILL, power loss) left beside it.

    `<out>.tmp-<pid>/` of a dead process is an unfinished write: deleted. `<out>.old-<pid>/` of
    a dead process is the previous dataset moved aside by an overwrite that was killed between
    its two renames: put back when `out` is missing, else deleted. Folders of live processes
    (a concurrent writer) are left alone.
    """
    for stale in out.parent.glob(f"{out.name}.*-*"):
        kind, _, pid = stale.name.removeprefix(f"{out.name}.").partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or not stale.is_dir():
            continue
        if int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not out.exists() and is_dataset(stale):
            os.rename(stale, out)
        else:
            shutil.rmtree(stale, ignore_errors=True)


def _replace(tmp: Path, out: Path, overwrite: bool = True) -> None:
    """Move the finished `tmp` folder to `out`, replacing an existing dataset there.

    Without `overwrite`, `out` must still be free: rename(2) refuses to move a folder onto a
    non-empty one, so of two concurrent writers of one `out` exactly one wins.
    """
    if not overwrite:
        try:
            os.rename(tmp, out)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            raise DatasetExistsError(f"{out}: another process wrote a dataset here while this "
                                     f"one was writing; pass --overwrite to replace it.") from None
        _fsync_path(out.parent)
        return
    if out.exists():
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)
    _fsync_path(out.parent)


def _complete_card(
    card: Mapping[str, Any], out: Path, *, schema: pa.Schema, files: list[dict[str, Any]],
    stats: dict[str, Any], action_space: dict[str, Any], filled: dict[str, bool], steps: int,
) -> dict[str, Any]:
    obs_dim, _ = sc.schema_dims(schema)
    observation_space = card.get("observation_space")
    if observation_space is None:
        observation_space = {"type": "Box", "dtype": "float32", "shape": [obs_dim],
                             "low": ["-inf"] * obs_dim, "high": ["inf"] * obs_dim}
    propensity: dict[str, Any] = {}
    given = card.get("propensity") or {}
    for name in sc.PROPENSITY_COLUMNS:
        entry = given.get(name)
        if entry is not None and not filled[name]:
            raise sc.DataError(f"{out}: column '{name}': the card names its source "
                               f"({entry.get('source', entry)}) but the column is empty.")
        if entry is None and filled[name]:
            entry = {"source": "unspecified"}
        propensity[name] = entry
    episodes = sum(f["episodes"] for f in files)
    full: dict[str, Any] = {
        "schema_version": sc.SCHEMA_VERSION,
        "name": card.get("name") or out.name,
        "description": card.get("description", ""),
        "observation_space": observation_space,
        "action_space": action_space,
        "env_spec": card.get("env_spec"),
        "source": card.get("source", {}),
        "behavior": card.get("behavior"),
    }
    full.update({k: v for k, v in card.items() if k not in full})
    full.update({"counts": {"episodes": episodes, "steps": steps}, "files": files,
                 "propensity": propensity, "stats": {**stats, **(card.get("stats") or {})}})
    return full


def write_dataset(
    out: Path,
    tables: Iterable[pa.Table | SourcedTable],
    *,
    card: Mapping[str, Any],
    overwrite: bool = False,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    compression: str = DEFAULT_COMPRESSION,
    progress: Callable[[int], None] | None = None,
    before_rename: Callable[[Path], None] | None = None,
) -> Path:
    """Validate and write a stream of whole-episode tables as a canonical dataset folder.

    Each table is validated (`schema.validate_table`) against the card's action space, and
    across tables: one schema, episode ids never reused, each propensity column filled in every
    table or in none. The card is completed with `schema_version`, `counts`, `files` (name,
    rows, episodes, bytes, sha256), `propensity` (`{"source": "unspecified"}` for a filled
    column the card does not describe) and `stats` (episode length/return, propensity ranges);
    a missing `observation_space` becomes an unbounded Box and a missing `action_space` is
    inferred from the data (Discrete(max+1), or a Box of the observed bounds).

    Args:
        out: destination folder; its parent is created if needed.
        tables: whole episodes, in order; a `SourcedTable` names its file in error messages.
        card: card fields (see CONTRACTS.md: name, description, spaces, env_spec, source,
            behavior, propensity). `action_space` is read first; the other fields only once
            `tables` is exhausted, so an adapter may record in them what it finds while
            streaming.
        overwrite: replace an existing dataset at `out` (atomically: the old one stays until
            the new one is complete). A folder that is not a dataset is never replaced.
        rows_per_file: target shard size; a shard closes at the first episode boundary past it.
        row_group_size: Parquet row group size.
        compression: Parquet codec.
        progress: called with the number of rows of each table once it is written.
        before_rename: called with the temporary folder once the shards are complete, to add
            files (e.g. the behavior model) that must appear together with the dataset.

    Returns:
        `out`.

    Raises:
        DataError: invalid data (nothing is written).
        DatasetExistsError: `out` exists and `overwrite` is False.
    """
    out = Path(out)
    check_dataset_name(str(card.get("name") or out.name))
    clean_stale(out)
    _check_replaceable(out, overwrite)
    action_space_json = card.get("action_space")
    action_space = space_from_json(action_space_json) if action_space_json else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    shards: _ShardWriter | None = None
    try:
        stats = StatsAccumulator()
        actions = _ActionRange()
        seen_ids = _SeenEpisodes()
        filled: dict[str, bool] = {}
        steps = 0
        for item in tables:
            sourced = item if isinstance(item, SourcedTable) else SourcedTable(item, "input",
                                                                               steps)
            table, source, offset = sourced.table, sourced.source, sourced.row_offset
            try:
                sc.validate_table(table, source=source, action_space=action_space,
                                  row_offset=offset)
                if shards is None:
                    _check_observation_space(card.get("observation_space"), table, source)
                    shards = _ShardWriter(tmp, table.schema, rows_per_file=rows_per_file,
                                          row_group_size=row_group_size, compression=compression)
                starts = _episode_starts(table)
                _check_consistent(table, shards.schema, source, offset)
                seen_ids.check(table.column(sc.EPISODE_ID).to_numpy()[starts], starts, source,
                               offset)
                _check_filled(table, filled, source, offset)
                if action_space is None:
                    actions.add(table.column(sc.ACTION), source, offset)
            except sc.DataError as err:
                raise sourced.relocate(err) from None
            stats.update(table)
            shards.add(table, starts)
            steps += table.num_rows
            if progress is not None:
                progress(table.num_rows)
        if shards is None:
            raise sc.DataError(f"{card.get('name') or out}: the input has no rows (empty input).")
        files = shards.finish()
        schema = shards.schema
        discrete = schema.field(sc.ACTION).type == pa.int64()
        full_card = _complete_card(
            card, out, schema=schema, files=files, stats=stats.summary(),
            action_space=action_space_json or actions.space(discrete), filled=filled, steps=steps)
        if before_rename is not None:
            before_rename(tmp)
        _write_card(tmp, full_card)
        _replace(tmp, out, overwrite)
    except BaseException:
        if shards is not None:
            shards.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_filled(table: pa.Table, filled: dict[str, bool], source: str, offset: int) -> None:
    """Each propensity column is filled in every table or in none (`filled` records, per
    column, what the first table had)."""
    for name in sc.PROPENSITY_COLUMNS:
        now = table.column(name).null_count == 0
        if filled.setdefault(name, now) != now:
            raise sc.DataError.at(
                source, name, offset, f"is {'filled' if now else 'null'} here but "
                f"{'null' if now else 'filled'} in earlier rows (a propensity column "
                f"must be filled on every row or none)")


def _write_card(folder: Path, card: Mapping[str, Any]) -> None:
    """Write `card` as the folder's card file and make it and the folder durable."""
    card_file = folder / CARD_NAME
    card_file.write_text(json.dumps(card, indent=2, allow_nan=False) + "\n")
    _fsync_path(card_file)
    _fsync_path(folder)


def _check_observation_space(space: Mapping[str, Any] | None, table: pa.Table,
                             source: str) -> None:
    """The card's observation space must describe the stored (flat) observation vectors."""
    if not space or space.get("type") not in ("Box", "Discrete"):
        return
    size = int(np.prod(space["shape"])) if space["type"] == "Box" else 1
    obs_type = table.schema.field(sc.OBS).type
    if pa.types.is_fixed_size_list(obs_type) and obs_type.list_size != size:
        raise sc.DataError.at(source, sc.OBS, None,
                              f"{obs_type.list_size} values per row, but the observation space "
                              f"({space['type']} of shape {space.get('shape', [1])}) has {size}")


def _check_consistent(table: pa.Table, schema: pa.Schema, source: str, offset: int) -> None:
    if table.schema.equals(schema):
        return
    for field in schema:
        actual = table.schema.field(field.name).type
        if actual != field.type:
            problem = ("inconsistent observation dimension" if field.name in (sc.OBS, sc.NEXT_OBS)
                       else "inconsistent type")
            raise sc.DataError.at(source, field.name, offset,
                                  f"{problem}: {sc.type_name(actual)} here but "
                                  f"{sc.type_name(field.type)} in earlier rows")


class _SeenEpisodes:
    """Episode ids written so far, to refuse an id that comes back in a later table.

    Ids usually increase: then a new table is checked against the running maximum in O(1); the
    full set (8 bytes per episode) is sorted and searched only when ids go down.
    """

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._max: int | None = None

    def check(self, ids: np.ndarray, starts: np.ndarray, source: str, offset: int) -> None:
        if self._max is not None and len(ids) and int(ids.min()) <= self._max:
            seen = np.concatenate(self._parts)
            seen.sort()
            position = np.clip(np.searchsorted(seen, ids), 0, len(seen) - 1)
            reused = seen[position] == ids
            if reused.any():
                first = int(np.flatnonzero(reused)[0])
                raise sc.DataError.at(source, sc.EPISODE_ID, int(starts[first]) + offset,
                                      f"episode {ids[first]} appears again after other episodes "
                                      f"(rows of an episode must be contiguous)")
            self._parts = [seen]
        self._parts.append(ids.copy())
        if len(ids):
            top = int(ids.max())
            self._max = top if self._max is None else max(self._max, top)


# --- reading ---------------------------------------------------------------------------------


def card_path(dataset_dir: Path) -> Path:
    """The card file of the dataset folder `dataset_dir`: `_dataset.json`, or the
    `dataset.json` of a folder written before the rename when only that one exists.

    The path is returned whether or not it exists (`card_path(d).is_file()` tests for a dataset).
    """
    folder = Path(dataset_dir)
    current = folder / CARD_NAME
    legacy = folder / LEGACY_CARD_NAME
    return legacy if not current.exists() and legacy.is_file() else current


def is_dataset(path: Path) -> bool:
    """Whether `path` is a dataset folder (it holds a card, current or legacy name)."""
    return Path(path).is_dir() and card_path(path).is_file()


def read_card(path: Path, *, allow_env_entry_point: bool = False) -> dict[str, Any]:
    """The card of the dataset folder `path` (or the card file itself): `card_path(path)`.

    Raises:
        FileNotFoundError: no such folder or card.
        DataError: the card is not valid JSON or has an unsupported schema version.
    """
    path = Path(path)
    is_card = path.name in (CARD_NAME, LEGACY_CARD_NAME) and path.is_file()
    card_file = path if is_card else card_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such dataset folder.")
    if not card_file.is_file():
        raise FileNotFoundError(f"{path}: no {CARD_NAME} here (not a dataset written by "
                                f"offpg ingest).")
    try:
        card = json.loads(card_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise sc.DataError(f"{card_file}: not valid JSON ({err.msg}, line {err.lineno}).") from None
    except (UnicodeDecodeError, RecursionError) as err:
        reason = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else "nested too deeply"
        raise sc.DataError(f"{card_file}: not a readable card ({reason}).") from None
    # The one validator of untrusted cards (data.card): keys, kinds, counts, confined shards.
    return validate_card(card, source=card_file, allow_env_entry_point=allow_env_entry_point)


def dataset_files(path: Path) -> list[Path]:
    """The Parquet shards of a dataset, in the card's order (episode order).

    Raises:
        FileNotFoundError: the card or a shard it lists is missing.
    """
    path = Path(path)
    files = [path / entry["name"] for entry in read_card(path)["files"]]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: listed in {card_path(path)} but missing.")
    return files


def iter_record_batches(
    path: Path, columns: Sequence[str] | None = None, *, batch_size: int = DEFAULT_ROW_GROUP_SIZE,
) -> Iterator[pa.RecordBatch]:
    """Stream a dataset's rows in order (episodes may span two consecutive batches).

    Args:
        path: dataset folder.
        columns: column names to read (default: all).
        batch_size: maximum rows per batch.
    """
    names = list(columns) if columns is not None else None
    for file in dataset_files(path):  # one file at a time: the card's order is episode order
        yield from pads.dataset(file, format="parquet").to_batches(columns=names,
                                                                     batch_size=batch_size)


def read_table(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """A whole dataset (or some columns) as one Arrow table, rows in order."""
    names = list(columns) if columns is not None else None
    return pa.concat_tables(pads.dataset(file, format="parquet").to_table(columns=names)
                            for file in dataset_files(path))


def verify_dataset(path: Path) -> list[str]:
    """Recompute each shard's sha256, row count and schema against the card.

    Returns:
        One sentence per problem found; empty when the dataset matches its card.
    """
    path = Path(path)
    card = read_card(path)
    problems: list[str] = []
    listed = {entry["name"] for entry in card["files"]}
    for extra in sorted(p.name for p in path.glob("*.parquet") if p.name not in listed):
        problems.append(f"{path / extra}: not listed in the card.")
    rows = 0
    for entry in card["files"]:
        file = path / entry["name"]
        if not file.is_file():
            problems.append(f"{file}: listed in the card but missing.")
            continue
        sha = file_sha256(file)
        if sha != entry["sha256"]:
            problems.append(f"{file}: sha256 {sha} differs from the card's {entry['sha256']}.")
            continue
        metadata = pq.read_metadata(file)
        if metadata.num_rows != entry["rows"]:
            problems.append(f"{file}: {metadata.num_rows} rows, the card says {entry['rows']}.")
        rows += metadata.num_rows
    if not problems and rows != card["counts"]["steps"]:
        problems.append(f"{path}: {rows} rows in all shards, the card counts "
                        f"{card['counts']['steps']} steps.")
    return problems


def dataset_digest(card: Mapping[str, Any] | Path) -> str:
    """The one content digest of a dataset (the card's, MLflow's dataset input's, a fit's).

    digest = sha256(json.dumps(sorted([name, sha256] of every shard in the card)))[:32] in hex:
    it changes when any shard's bytes or name change, not when the card's other keys do.
    32 characters fit MLflow's 36-character digest field.

    Args:
        card: a card (`read_card`), or a dataset folder whose card is read.
    """
    if not isinstance(card, Mapping):
        card = read_card(Path(card))
    files = sorted([str(f["name"]), str(f["sha256"])] for f in card.get("files", []))
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:32]
