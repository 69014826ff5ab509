"""The streaming loader: whole episodes across record batches and files, the shuffle buffer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from offpg_offline.data import stream
from offpg_offline.data.batch import StepBatch, load_steps
from offpg_offline.data.store import card_path as store_card_path
from offpg_offline.data.store import write_dataset
from offpg_offline.data.stream import (
    EpisodeSource,
    LogView,
    concat,
    episode_rows,
    in_memory_bytes,
    index_shards,
    rank_episodes,
    row_bytes,
    shuffled_batches,
)

CARD = {
    "name": "stream",
    "description": "random episodes",
    "env_spec": None,
    "source": {"kind": "test"},
    "behavior": "random",
    "action_space": {"type": "Discrete", "dtype": "int64", "start": 0, "n": 3},
}
LENGTHS = [5, 1, 9, 3, 12, 2, 7, 7, 1, 4, 11, 6, 3, 8, 2, 10, 5, 1, 6, 4]  # 105 rows


@pytest.fixture
def dataset(tmp_path: Path, make_log) -> Path:  # type: ignore[no-untyped-def]
    # Row groups of 4 and files of ~30 rows: most episodes straddle record batches.
    tables = [make_log(LENGTHS[:10], seed=1), make_log(LENGTHS[10:], seed=2, first_id=10)]
    return write_dataset(tmp_path / "ds", tables, card=CARD, rows_per_file=30, row_group_size=4)


def _view_of(batch: StepBatch) -> LogView:
    assert batch.logged_logp is not None
    return LogView(
        batch.obs,
        batch.action,
        batch.logged_logp,
        batch.reward,
        batch.step,
        batch.episode_start,
        None,
    )


def _assert_views_equal(actual: LogView, expected: LogView) -> None:
    for name in ("obs", "action", "behavior_logp", "reward", "step", "episode_start"):
        assert torch.equal(getattr(actual, name), getattr(expected, name)), name


def test_chunks_rebuild_the_log_with_whole_episodes(dataset: Path) -> None:
    source = EpisodeSource(dataset, logp_column="logged_logp", batch_rows=4)
    assert len(source.shards) > 2 and source.lengths.tolist() == LENGTHS
    assert source.episode_ids.tolist() == list(range(len(LENGTHS)))  # make_log's ids
    chunks = list(source.chunks(torch.ones(len(LENGTHS), dtype=torch.bool)))
    assert len(chunks) > len(source.shards)  # several record batches per shard
    for chunk in chunks:  # every chunk begins an episode and ends one (its lengths are whole)
        assert bool(chunk.episode_start[0])
    _assert_views_equal(concat(chunks), _view_of(load_steps(dataset)))


def test_chunks_keep_only_the_chosen_episodes_in_the_chosen_shard_order(dataset: Path) -> None:
    source = EpisodeSource(dataset, logp_column="logged_logp", batch_rows=4)
    keep = torch.zeros(len(LENGTHS), dtype=torch.bool)
    keep[[0, 3, 4, 13, 19]] = True
    order = list(reversed(range(len(source.shards))))
    got = concat(list(source.chunks(keep, order)))
    # Expected: the kept episodes grouped by shard, shards in reverse order.
    by_shard = [
        [
            o
            for o in keep.nonzero().flatten().tolist()
            if s.first_episode <= o < s.first_episode + len(s.lengths)
        ]
        for s in source.shards
    ]
    ordinals = torch.tensor([o for group in reversed(by_shard) for o in group])
    _assert_views_equal(got, _view_of(load_steps(dataset).episodes(ordinals)))


def _entry(file: Path, episodes: int) -> dict:
    """The card's entry of a shard written by hand (the card is validated when read)."""
    import hashlib

    return {"name": file.name, "rows": pq.read_metadata(file).num_rows, "episodes": episodes,
            "bytes": file.stat().st_size, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}


def test_a_file_that_splits_an_episode_is_merged_with_its_neighbour(dataset: Path) -> None:
    card_path = store_card_path(dataset)
    card = json.loads(card_path.read_text())
    first = dataset / card["files"][0]["name"]
    table = pq.read_table(first)
    pq.write_table(table.slice(0, 8), dataset / "a.parquet")  # row 8 is inside episode 2 (5+1+9)
    pq.write_table(table.slice(8), dataset / "b.parquet")
    starts = card["files"][0]["episodes"]  # episodes 0, 1, 2 start in a.parquet, the rest in b
    card["files"] = [_entry(dataset / "a.parquet", 3), _entry(dataset / "b.parquet", starts - 3),
                     *card["files"][1:]]  # episodes: those that start in the file
    card_path.write_text(json.dumps(card))
    shards = index_shards(dataset)
    assert shards[0].files == (dataset / "a.parquet", dataset / "b.parquet")
    source = EpisodeSource(dataset, logp_column="logged_logp", batch_rows=3)
    assert source.lengths.tolist() == LENGTHS
    loaded = load_steps(dataset)  # the straddling episode's id is listed once
    assert torch.equal(source.episode_ids, loaded.episode_id[loaded.episode_start])
    got = concat(list(source.chunks(torch.ones(len(LENGTHS), dtype=torch.bool))))
    _assert_views_equal(got, _view_of(load_steps(dataset)))


def test_read_episodes_equals_the_in_memory_gather(dataset: Path) -> None:
    source = EpisodeSource(dataset, logp_column="logged_logp")
    ordinals = torch.tensor([1, 2, 11, 17])
    got, expected = source.read_episodes(ordinals), load_steps(dataset).episodes(ordinals)
    for name in ("episode_id", "obs", "next_obs", "action", "reward", "step", "episode_start"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


def test_choose_stays_under_the_step_budget(dataset: Path) -> None:
    source = EpisodeSource(dataset, logp_column="logged_logp")
    chosen = source.choose(torch.arange(20), 30, torch.Generator().manual_seed(0))
    assert 0 < int(source.lengths[chosen].sum()) <= 30
    assert torch.equal(chosen, chosen.sort().values)
    # One episode even when it alone exceeds the budget.
    assert len(source.choose(torch.tensor([4]), 1, torch.Generator())) == 1


@pytest.mark.parametrize("world_size", [2, 3, 50])
def test_ranks_read_disjoint_episodes_that_cover_the_log(dataset: Path, world_size: int) -> None:
    shards = index_shards(dataset)
    masks = torch.stack([rank_episodes(shards, rank, world_size) for rank in range(world_size)])
    assert torch.equal(masks.sum(0), torch.ones(len(LENGTHS), dtype=torch.long))
    if len(shards) >= world_size:  # whole shards: no rank opens another's file
        for shard in shards:
            span = masks[:, shard.first_episode : shard.first_episode + len(shard.lengths)]
            assert int(span.any(1).sum()) == 1


def test_row_bytes_count_the_step_batch_tensors(dataset: Path) -> None:
    card = json.loads(store_card_path(dataset).read_text())
    batch = load_steps(dataset)
    held = sum(
        t.nbytes
        for t in (
            batch.episode_id,
            batch.step,
            batch.obs,
            batch.action,
            batch.reward,
            batch.next_obs,
            batch.terminated,
            batch.truncated,
            batch.episode_start,
        )
    )
    assert batch.logged_logp is not None and batch.estimated_logp is None
    held += 2 * batch.logged_logp.nbytes  # a filled estimated_logp column takes as much
    assert row_bytes(card) * batch.n_steps == held
    assert in_memory_bytes(card) == 3 * held


def _episode_keys(view: LogView) -> list[float]:
    """An episode's identity: its first reward (continuous random values, all distinct)."""
    return view.reward[view.episode_start].tolist()


def _passes(source: EpisodeSource, generator: torch.Generator):  # type: ignore[no-untyped-def]
    everything = torch.ones(source.n_episodes, dtype=torch.bool)

    def one_pass(epoch: int):  # type: ignore[no-untyped-def]
        return source.chunks(everything, torch.randperm(len(source.shards), generator=generator))

    return one_pass


def test_shuffle_buffer_yields_every_episode_once_per_pass(dataset: Path) -> None:
    source = EpisodeSource(dataset, logp_column="logged_logp", batch_rows=4)
    generator = torch.Generator().manual_seed(0)
    batches = shuffled_batches(
        _passes(source, generator), as_steps=False, size=5, capacity=8, generator=generator
    )
    full = load_steps(dataset)
    expected = sorted(_episode_keys(_view_of(full)))
    first_pass = [next(batches) for _ in range(4)]  # 20 episodes / 5
    assert all(b.n_episodes == 5 for b in first_pass)
    assert sorted(k for b in first_pass for k in _episode_keys(b)) == expected
    # Episodes arrive whole: each batch equals the in-memory gather of its episodes.
    key_to_ordinal = {k: i for i, k in enumerate(_episode_keys(_view_of(full)))}
    for b in first_pass:
        ordinals = torch.tensor([key_to_ordinal[k] for k in _episode_keys(b)])
        _assert_views_equal(b, _view_of(full.episodes(ordinals)))
    # Shuffled: not dataset order, and the next pass uses another order.
    second_pass = [next(batches) for _ in range(4)]
    assert [k for b in first_pass for k in _episode_keys(b)] != expected
    assert sorted(k for b in second_pass for k in _episode_keys(b)) == expected
    assert _episode_keys(first_pass[0]) != _episode_keys(second_pass[0])


def test_step_batches_use_each_step_once_per_pass_up_to_the_carried_remainder(
    dataset: Path,
) -> None:
    source = EpisodeSource(dataset, logp_column="logged_logp", batch_rows=4)
    generator = torch.Generator().manual_seed(1)
    batches = shuffled_batches(
        _passes(source, generator), as_steps=True, size=10, capacity=30, generator=generator
    )
    first = [next(batches) for _ in range(10)]  # 105 rows: 10 batches, 5 rows carried over
    assert all(b.n_rows == 10 and bool(b.episode_start.all()) and not b.step.any() for b in first)
    rewards = torch.cat([b.reward for b in first])
    assert len(set(rewards.tolist())) == 100  # no row twice
    assert set(rewards.tolist()) <= set(load_steps(dataset).reward.tolist())


def test_small_pass_shrinks_the_batch_like_the_in_memory_batcher(dataset: Path) -> None:
    source = EpisodeSource(dataset, logp_column="logged_logp")
    keep = torch.zeros(len(LENGTHS), dtype=torch.bool)
    keep[:3] = True
    generator = torch.Generator().manual_seed(0)
    batches = shuffled_batches(
        lambda epoch: source.chunks(keep), as_steps=False, size=32, capacity=64, generator=generator
    )
    assert next(batches).n_episodes == 3 and next(batches).n_episodes == 3
    empty = shuffled_batches(
        lambda epoch: iter(()), as_steps=False, size=4, capacity=8, generator=generator
    )
    with pytest.raises(ValueError, match="no episodes to train on"):
        next(empty)


def test_buffer_memory_is_bounded_by_its_capacity(
    tmp_path: Path,
    make_log,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    # 400 episodes of 1-12 steps; a buffer of 16 episodes never gathers more than
    # capacity + one chunk (batch_rows) rows, whatever the log's size.
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 13, 400).tolist()
    path = write_dataset(
        tmp_path / "big",
        [make_log(lengths, seed=3)],
        card=CARD,
        rows_per_file=500,
        row_group_size=64,
    )
    source = EpisodeSource(path, logp_column="logged_logp", batch_rows=64)
    generator = torch.Generator().manual_seed(0)
    largest = 0

    def tracked(epoch: int):  # type: ignore[no-untyped-def]
        return source.chunks(torch.ones(400, dtype=torch.bool))

    original = stream.concat

    def spy(views):  # type: ignore[no-untyped-def]
        nonlocal largest
        result = original(views)
        largest = max(largest, result.n_rows)
        return result

    monkeypatch.setattr(stream, "concat", spy)  # the real function, watched
    batches = shuffled_batches(tracked, as_steps=False, size=4, capacity=16, generator=generator)
    for _ in range(150):
        next(batches)
    # capacity 16 episodes ≤ 16 × 12 rows, plus one chunk of ≤ 64 + 12 carried rows.
    assert 0 < largest <= 16 * 12 + 64 + 12


def test_episode_rows_gathers_whole_episodes_in_the_order_given() -> None:
    episode_start = torch.tensor([True, False, True, True, False, False])
    assert episode_rows(episode_start, torch.tensor([2, 0])).tolist() == [3, 4, 5, 0, 1]
