"""Stream a log's whole episodes from Parquet in bounded memory, shuffled through a buffer.

A log larger than memory (docs/design.md §5) is read shard by shard in record batches. An episode
may straddle two record batches: its rows are carried over until the episode is complete, so
every chunk handed on holds whole episodes, in `step` order (the product estimators need
them). Chunks enter a shuffle buffer of at most `capacity` units (episodes, or steps for
`per-step`); when it is full, a random half of it leaves as batches and the rest stays, so
memory is bounded by the buffer, not by the log. Shard order is reshuffled every pass.

Shards are groups of consecutive files that never split an episode (`write_dataset` cuts files
at episode boundaries; a foreign file that does not is merged with its neighbour). They are the
unit ranks divide under torch.distributed: rank r reads only shards r, r + N, ... when there are
at least N of them, else every N-th episode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from torch import Tensor

from offpg_offline.data import schema as sc
from offpg_offline.data.batch import StepBatch, batch_from_table, episode_rows
from offpg_offline.data.spaces import space_from_json
from offpg_offline.data.store import DEFAULT_ROW_GROUP_SIZE, dataset_files, read_card

# The in-memory trainer holds the loaded StepBatch, the training view and the training split's
# StepBatch at once: about three copies of every row.
IN_MEMORY_COPIES = 3


@dataclass(frozen=True, slots=True)
class LogView:
    """The flat tensors a surrogate needs, for the rows of one batch (or the whole split)."""

    obs: Tensor
    action: Tensor
    behavior_logp: Tensor
    reward: Tensor
    step: Tensor
    episode_start: Tensor
    baseline: Tensor | None

    @property
    def n_rows(self) -> int:
        """M, the number of rows."""
        return int(self.step.shape[0])

    @property
    def n_episodes(self) -> int:
        """E, the number of episodes (rows, once `as_steps`)."""
        return int(self.episode_start.sum())

    def rows(self, rows: Tensor, *, as_steps: bool) -> LogView:
        """A sub-view; `as_steps` makes every row its own one-step episode (per-step batches)."""
        rows = rows.to(self.step.device)

        def pick(tensor: Tensor) -> Tensor:  # index_select: a third of `tensor[rows]`'s cost
            return tensor.index_select(0, rows)

        if as_steps:
            step = torch.zeros(len(rows), dtype=self.step.dtype, device=self.step.device)
            start = torch.ones(len(rows), dtype=torch.bool, device=self.step.device)
        else:
            step, start = pick(self.step), pick(self.episode_start)
        return LogView(
            pick(self.obs),
            pick(self.action),
            pick(self.behavior_logp),
            pick(self.reward),
            step,
            start,
            None if self.baseline is None else pick(self.baseline),
        )

    def episodes(self, index: Tensor) -> LogView:
        """The whole episodes with ordinals `index` (0..E-1 within this view), in that order."""
        return self.rows(episode_rows(self.episode_start, index), as_steps=False)

    def to(self, device: torch.device | str) -> LogView:
        """A copy with every tensor on `device` (no copy for tensors already there)."""
        moved: dict[str, Tensor | None] = {}
        for f in fields(self):
            tensor = getattr(self, f.name)
            moved[f.name] = None if tensor is None else tensor.to(device)
        return LogView(**moved)  # type: ignore[arg-type]  # only `baseline` may be None


def concat(views: Sequence[LogView]) -> LogView:
    """Views laid end to end (each starts with an episode start, so episodes stay whole)."""
    if len(views) == 1:
        return views[0]
    joined: dict[str, Tensor | None] = {}
    for f in fields(LogView):
        parts = [getattr(view, f.name) for view in views]
        joined[f.name] = None if parts[0] is None else torch.cat(parts)
    return LogView(**joined)  # type: ignore[arg-type]  # only `baseline` may be None


# --- sizes ------------------------------------------------------------------------------------


def row_bytes(card: Mapping[str, Any]) -> int:
    """Bytes one step takes in a `StepBatch` (obs and next_obs float32, action, scalars)."""
    from gymnasium import spaces

    obs_dim = spaces.flatdim(space_from_json(card["observation_space"]))
    action_space = space_from_json(card["action_space"])
    action = 8 if isinstance(action_space, spaces.Discrete) else 4 * spaces.flatdim(action_space)
    # episode_id, step (int64); reward, two log-prob columns (float32); three bool columns.
    return 2 * 4 * obs_dim + action + 8 + 8 + 4 + 4 + 4 + 3


def in_memory_bytes(card: Mapping[str, Any]) -> int:
    """What the in-memory trainer would hold: card step count × row bytes × its copies."""
    return int(card["counts"]["steps"]) * row_bytes(card) * IN_MEMORY_COPIES


# --- shards -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shard:
    """Consecutive files holding whole episodes: ordinals first_episode .. + len(lengths) - 1."""

    files: tuple[Path, ...]
    first_episode: int
    lengths: np.ndarray  # [E_shard] int64 steps of each episode
    ids: np.ndarray  # [E_shard] int64 episode id of each episode


def index_shards(path: Path) -> list[Shard]:
    """Read only the `episode_id` column of each file to find its episodes and their lengths.

    Files that continue an episode of the file before are merged into one shard with it.
    """
    shards: list[Shard] = []
    last_id: int | None = None
    first_episode = 0
    for file in dataset_files(path):
        ids = pq.read_table(file, columns=[sc.EPISODE_ID]).column(0).to_numpy()
        if len(ids) == 0:
            continue
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        lengths = np.diff(np.r_[starts, len(ids)]).astype(np.int64)
        episode_ids = ids[starts].astype(np.int64)
        if shards and last_id == int(ids[0]):  # the episode straddles the two files: merge
            prev = shards.pop()
            merged = np.concatenate([prev.lengths, lengths])
            merged[len(prev.lengths) - 1] += merged[len(prev.lengths)]
            merged = np.delete(merged, len(prev.lengths))
            merged_ids = np.concatenate([prev.ids, episode_ids[1:]])
            shards.append(Shard((*prev.files, file), prev.first_episode, merged, merged_ids))
        else:
            shards.append(Shard((file,), first_episode, lengths, episode_ids))
        first_episode = shards[-1].first_episode + len(shards[-1].lengths)
        last_id = int(ids[-1])
    return shards


def rank_episodes(shards: Sequence[Shard], rank: int, world_size: int) -> Tensor:
    """[E] bool: the episodes rank `rank` of `world_size` reads (disjoint across ranks).

    Whole shards round robin when there are at least `world_size` of them, so each rank reads
    only its own files; otherwise every `world_size`-th episode.
    """
    n_episodes = sum(len(shard.lengths) for shard in shards)
    mask = torch.zeros(n_episodes, dtype=torch.bool)
    if len(shards) >= world_size:
        for number, shard in enumerate(shards):
            if number % world_size == rank:
                mask[shard.first_episode : shard.first_episode + len(shard.lengths)] = True
    else:
        mask[rank::world_size] = True
    return mask


# --- reading ----------------------------------------------------------------------------------


class EpisodeSource:
    """A dataset read shard by shard, as chunks of whole episodes, never all at once.

    Args:
        path: dataset folder.
        logp_column: the column giving log π_β(a|s) (`logged_logp` or `estimated_logp`).
        batch_rows: rows per record batch read from Parquet.
    """

    def __init__(
        self, path: Path, *, logp_column: str, batch_rows: int = DEFAULT_ROW_GROUP_SIZE
    ) -> None:
        self.path, self.logp_column, self.batch_rows = Path(path), logp_column, batch_rows
        self.card = read_card(self.path)
        self.shards = index_shards(self.path)
        self.lengths = torch.from_numpy(
            np.concatenate([s.lengths for s in self.shards]) if self.shards else np.zeros(0, int)
        )
        if len(self.lengths) == 0:
            raise sc.DataError(f"{self.path}: the dataset has no rows.")
        # [E] int64 the episode id of each ordinal (what the split is a function of).
        self.episode_ids = torch.from_numpy(np.concatenate([s.ids for s in self.shards]))

    @property
    def n_episodes(self) -> int:
        return len(self.lengths)

    @property
    def n_steps(self) -> int:
        return int(self.lengths.sum())

    def choose(self, ordinals: Tensor, max_steps: int, generator: torch.Generator) -> Tensor:
        """A seeded random subset of `ordinals` with at most `max_steps` rows (at least one
        episode unless `ordinals` is empty), sorted."""
        if len(ordinals) == 0:
            return ordinals
        order = ordinals[torch.randperm(len(ordinals), generator=generator)]
        keep = int((torch.cumsum(self.lengths[order], 0) <= max_steps).sum().clamp_min(1))
        return order[:keep].sort().values

    def read_episodes(self, ordinals: Tensor) -> StepBatch:
        """All columns of the episodes `ordinals` (a small set) as a `StepBatch`, in dataset
        order, reading record batch by record batch only the shards that hold them."""
        wanted = torch.zeros(self.n_episodes, dtype=torch.bool)
        wanted[ordinals] = True
        wanted_np = wanted.numpy()
        pieces: list[pa.RecordBatch] = []
        for shard in self._shards_with(wanted):
            first = shard.first_episode
            keep_row = np.repeat(wanted_np[first : first + len(shard.lengths)], shard.lengths)
            scanner = pads.dataset([str(f) for f in shard.files], format="parquet").to_batches(
                batch_size=self.batch_rows, batch_readahead=1, fragment_readahead=1
            )
            offset = 0
            for record_batch in scanner:
                rows = record_batch.num_rows
                mask = keep_row[offset : offset + rows]
                offset += rows
                if mask.any():
                    pieces.append(record_batch.filter(pa.array(mask)))
        return batch_from_table(pa.Table.from_batches(pieces))

    def _shards_with(self, keep: Tensor) -> Iterator[Shard]:
        for shard in self.shards:
            if bool(keep[shard.first_episode : shard.first_episode + len(shard.lengths)].any()):
                yield shard

    def chunks(self, keep: Tensor, order: Sequence[int] | None = None) -> Iterator[LogView]:
        """Whole episodes with `keep[ordinal]` True, in chunks of about `batch_rows` rows, shards
        in `order` (default: dataset order), rows in step order; raw rewards, no baseline.

        Shards holding none of the kept episodes are not opened.
        """
        keep_np = keep.numpy()
        for number in order if order is not None else range(len(self.shards)):
            shard = self.shards[number]
            span = keep_np[shard.first_episode : shard.first_episode + len(shard.lengths)]
            if span.any():
                yield from self._shard_chunks(shard, span)

    def _shard_chunks(self, shard: Shard, keep: np.ndarray) -> Iterator[LogView]:
        columns = [sc.EPISODE_ID, sc.STEP, sc.OBS, sc.ACTION, sc.REWARD, self.logp_column]
        scanner = pads.dataset([str(f) for f in shard.files], format="parquet").to_batches(
            columns=columns, batch_size=self.batch_rows, batch_readahead=1, fragment_readahead=1
        )
        carry: dict[str, np.ndarray] | None = None
        done = 0  # episodes of this shard already handed on
        for record_batch in scanner:
            if record_batch.num_rows == 0:
                continue
            rows = _numpy_columns(record_batch, self.logp_column, self.path)
            if carry is not None:
                rows = {name: np.concatenate([carry[name], rows[name]]) for name in rows}
            ids = rows[sc.EPISODE_ID]
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            cut = int(starts[-1])  # the last episode may continue in the next record batch
            carry = {name: values[cut:] for name, values in rows.items()}
            if cut:
                complete = {name: values[:cut] for name, values in rows.items()}
                view, count = _view(complete, self.logp_column, keep, done, shard.lengths)
                done += count
                if view is not None:
                    yield view
        if carry is not None:
            view, count = _view(carry, self.logp_column, keep, done, shard.lengths)
            done += count
            if view is not None:
                yield view
        if done != len(shard.lengths):
            raise sc.DataError(
                f"{shard.files[0]}: read {done} episodes where the index found "
                f"{len(shard.lengths)}; the files changed while training."
            )


def _numpy_columns(batch: pa.RecordBatch, logp_column: str, path: Path) -> dict[str, np.ndarray]:
    logp = batch.column(logp_column)
    if logp.null_count:
        raise sc.DataError(f"{path}: column {logp_column} is null on some rows.")
    action = batch.column(sc.ACTION)
    return {
        sc.EPISODE_ID: batch.column(sc.EPISODE_ID).to_numpy(),
        sc.STEP: batch.column(sc.STEP).to_numpy().astype(np.int64),
        sc.OBS: sc.vector_values(batch.column(sc.OBS)),
        sc.ACTION: action.to_numpy().astype(np.int64)
        if action.type == pa.int64()
        else sc.vector_values(action),
        sc.REWARD: batch.column(sc.REWARD).to_numpy().astype(np.float32),
        logp_column: logp.to_numpy(zero_copy_only=False).astype(np.float32),
    }


def _view(
    rows: Mapping[str, np.ndarray],
    logp_column: str,
    keep: np.ndarray,
    done: int,
    lengths: np.ndarray,
) -> tuple[LogView | None, int]:
    """The kept whole episodes of `rows` (episodes done.. of the shard); and how many it held."""
    ids = rows[sc.EPISODE_ID]
    start = np.r_[True, ids[1:] != ids[:-1]]
    within = np.cumsum(start) - 1  # episode number within these rows
    count = int(within[-1]) + 1
    if done + count > len(lengths) or not np.array_equal(
        np.bincount(within, minlength=count), lengths[done : done + count]
    ):
        raise sc.DataError("episode rows are not contiguous as the shard index found them.")
    mask = keep[done + within]
    if not mask.any():
        return None, count

    def pick(values: np.ndarray) -> Tensor:  # boolean indexing copies: writable, contiguous
        return torch.from_numpy(values[mask])

    return (
        LogView(
            obs=pick(rows[sc.OBS]),
            action=pick(rows[sc.ACTION]),
            behavior_logp=pick(rows[logp_column]),
            reward=pick(rows[sc.REWARD]),
            step=pick(rows[sc.STEP]),
            episode_start=pick(start),
            baseline=None,
        ),
        count,
    )


# --- shuffling --------------------------------------------------------------------------------


def shuffled_batches(
    passes: Callable[[int], Iterable[LogView]],
    *,
    as_steps: bool,
    size: int,
    capacity: int,
    generator: torch.Generator,
) -> Iterator[LogView]:
    """Endless batches of `size` units drawn through a bounded shuffle buffer.

    `passes(epoch)` yields the chunks (whole episodes, already transformed: G_t for per-step)
    of one pass over the data. Units are episodes, or single steps when `as_steps` (each then
    its own one-step episode, like `LogView.rows(..., as_steps=True)`). Whenever the buffer
    holds `capacity` units, a random half of them leaves as batches. At the end of each pass
    all full batches leave and fewer than `size` units carry over to the next pass, so every
    unit is used once per pass up to that remainder. A pass with fewer than `size` units
    shrinks `size` to its count (as the in-memory batcher does).

    Memory: at most `capacity` units plus one chunk.
    """
    if size <= 0 or capacity <= 0:
        raise ValueError(f"size and capacity must be positive, got {size} and {capacity}")
    pending: list[LogView] = []
    held = 0
    epoch = 0
    while True:
        seen = 0
        for chunk in passes(epoch):
            if as_steps:
                chunk = chunk.rows(torch.arange(chunk.n_rows), as_steps=True)
            pending.append(chunk)
            units = chunk.n_episodes
            held, seen = held + units, seen + units
            if held >= max(capacity, 2 * size):
                pool = yield from _drain(concat(pending), size, held // 2, as_steps, generator)
                pending, held = [pool], pool.n_episodes
        if seen == 0:
            raise ValueError("no episodes to train on (all were held out or read by other ranks)")
        size = min(size, seen)
        if held >= size:
            pool = yield from _drain(concat(pending), size, held, as_steps, generator)
            pending, held = ([pool], pool.n_episodes) if pool.n_rows else ([], 0)
        epoch += 1


def _drain(
    pool: LogView, size: int, at_least: int, as_steps: bool, generator: torch.Generator
) -> Generator[LogView, None, LogView]:
    """Yield ⌊at_least / size⌋ (≥ 1) random batches from `pool`; return what is left."""
    units = pool.n_episodes
    order = torch.randperm(units, generator=generator)
    n_batches = max(1, at_least // size) if units >= size else 0
    n_batches = min(n_batches, units // size)
    for number in range(n_batches):
        chosen = order[number * size : (number + 1) * size]
        yield pool.rows(chosen, as_steps=True) if as_steps else pool.episodes(chosen.sort().values)
    rest = order[n_batches * size :].sort().values
    return pool.rows(rest, as_steps=True) if as_steps else pool.episodes(rest)


def mean_length(source: EpisodeSource) -> float:
    """Mean episode length of the whole log (sizes the per-step buffer in rows)."""
    return source.n_steps / max(1, source.n_episodes)


def buffer_units(source: EpisodeSource, buffer_episodes: int, as_steps: bool) -> int:
    """Shuffle-buffer capacity in units: episodes, or their expected rows for per-step."""
    return math.ceil(buffer_episodes * mean_length(source)) if as_steps else buffer_episodes
