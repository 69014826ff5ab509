"""Dataset folders: atomic sharded writes, the card, streaming reads, verification."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offpg_offline.data import store
from offpg_offline.data.schema import DataError
from offpg_offline.data.store import (
    DatasetExistsError,
    SourcedTable,
    iter_record_batches,
    read_card,
    read_table,
    verify_dataset,
    write_dataset,
)


def _chunks(table: pa.Table, episodes_per_chunk: int) -> list[pa.Table]:
    episode = table.column("episode_id").to_numpy()
    starts = np.flatnonzero(np.r_[True, episode[1:] != episode[:-1]])
    bounds = [*starts[::episodes_per_chunk].tolist(), table.num_rows]
    return [table.slice(a, b - a) for a, b in itertools.pairwise(bounds)]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_round_trip_keeps_every_value_and_shards_whole_episodes(tmp_path, make_log) -> None:
    table = make_log(np.random.default_rng(0).integers(1, 40, 300), seed=1, estimated=True)
    out = write_dataset(tmp_path / "ds", _chunks(table, 17), card={"name": "demo"},
                        rows_per_file=1000, row_group_size=256)

    assert read_table(out).equals(table)
    card = read_card(out)
    assert card["schema_version"] == 1 and card["name"] == "demo"
    assert card["counts"] == {"episodes": 300, "steps": table.num_rows}
    assert len(card["files"]) > 3
    previous_last = None
    for entry in card["files"]:
        shard = pq.read_table(out / entry["name"])
        episode = shard.column("episode_id").to_numpy()
        assert shard.column("step").to_numpy()[0] == 0  # every shard starts an episode
        assert previous_last is None or episode[0] != previous_last
        previous_last = episode[-1]
        assert entry["rows"] == shard.num_rows >= 1000 or entry is card["files"][-1]
        assert entry["episodes"] == len(np.unique(episode))
        assert entry["sha256"] == store.file_sha256(out / entry["name"])
        metadata = pq.read_metadata(out / entry["name"])
        assert max(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)) <= 256
    assert card["propensity"] == {"logged_logp": {"source": "unspecified"},
                                  "estimated_logp": {"source": "unspecified"}}
    assert card["action_space"] == {"type": "Discrete", "dtype": "int64", "start": 0, "n": 3}
    assert card["observation_space"]["shape"] == [3]
    assert verify_dataset(out) == []
    assert _leftovers(tmp_path) == []


def test_shards_of_exactly_whole_row_groups(tmp_path, make_log) -> None:
    # 100-row shards of 50-row groups: nothing is left to flush when a shard closes.
    table = make_log([25] * 8, seed=3)
    out = write_dataset(tmp_path / "ds", _chunks(table, 2), card={}, rows_per_file=100,
                        row_group_size=50)
    assert [f["rows"] for f in read_card(out)["files"]] == [100, 100]
    assert read_table(out).equals(table)


def test_card_stats_equal_a_slow_loop(tmp_path, make_log) -> None:
    lengths = [5, 1, 7, 3]
    table = make_log(lengths, seed=2)
    out = write_dataset(tmp_path / "ds", [table], card={})
    stats = read_card(out)["stats"]
    reward = table.column("reward").to_numpy().astype(np.float64)
    bounds = np.cumsum([0, *lengths])
    returns = [reward[a:b].sum() for a, b in itertools.pairwise(bounds)]
    assert stats["episode_length"] == {"min": 1, "mean": 4.0, "max": 7}
    assert stats["episode_return"]["min"] == pytest.approx(min(returns), rel=1e-12)
    assert stats["episode_return"]["mean"] == pytest.approx(np.mean(returns), rel=1e-12)
    assert stats["episode_return"]["max"] == pytest.approx(max(returns), rel=1e-12)
    terminated = table.column("terminated").to_numpy(zero_copy_only=False)
    assert stats["episodes_terminated"] == int(terminated.sum())
    assert stats["episodes_terminated"] + stats["episodes_truncated"] == 4
    logp = table.column("logged_logp").to_numpy()
    assert stats["propensity_range"]["logged_logp"]["min"] == pytest.approx(logp.min())
    assert stats["propensity_range"]["estimated_logp"] is None


def test_stats_accumulator_handles_episodes_split_across_batches(make_log) -> None:
    table = make_log([4, 6, 2], seed=3)
    whole, split = store.StatsAccumulator(), store.StatsAccumulator()
    whole.update(table)
    for start in range(0, table.num_rows, 5):  # batches of 5 rows cut through episodes
        split.update(table.slice(start, 5))
    _assert_close(split.summary(), whole.summary())


def _assert_close(actual: object, expected: object) -> None:
    # Float sums in a different order differ in the last bits only.
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys()
        for key in expected:
            _assert_close(actual[key], expected[key])
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-12, abs=1e-12)
    else:
        assert actual == expected


def test_iter_record_batches_streams_rows_in_order(tmp_path, make_log) -> None:
    table = make_log([30] * 40, seed=4)
    out = write_dataset(tmp_path / "ds", _chunks(table, 3), card={}, rows_per_file=100)
    batches = list(iter_record_batches(out, ["episode_id", "reward"], batch_size=64))
    assert max(b.num_rows for b in batches) <= 64
    streamed = pa.Table.from_batches(batches)
    assert streamed.equals(table.select(["episode_id", "reward"]))


def test_exception_mid_write_leaves_nothing(tmp_path, make_log, monkeypatch) -> None:
    table = make_log([20] * 30, seed=5)
    original = store._ShardWriter._open
    opened: list[int] = []

    def open_but_fail_on_second_shard(self: store._ShardWriter) -> None:
        opened.append(1)
        if len(opened) == 2:
            raise OSError("disk full (injected)")
        original(self)

    monkeypatch.setattr(store._ShardWriter, "_open", open_but_fail_on_second_shard)
    with pytest.raises(OSError, match="injected"):
        write_dataset(tmp_path / "ds", _chunks(table, 5), card={}, rows_per_file=100)
    assert len(opened) == 2
    assert list(tmp_path.iterdir()) == []


def test_exception_in_a_shard_encoding_thread_leaves_nothing(tmp_path, make_log,
                                                            monkeypatch) -> None:
    table = make_log([20] * 30, seed=5)
    original = store._ShardFile._flush

    def flush_but_fail_in_second_shard(self, writer, pending, *, final):
        if self.path.name == "part-00001.parquet":
            raise OSError("write error in a shard thread (injected)")
        return original(self, writer, pending, final=final)

    monkeypatch.setattr(store._ShardFile, "_flush", flush_but_fail_in_second_shard)
    with pytest.raises(OSError, match="injected"):
        write_dataset(tmp_path / "ds", _chunks(table, 5), card={}, rows_per_file=100,
                      row_group_size=50)
    assert list(tmp_path.iterdir()) == []


def test_invalid_chunk_mid_stream_leaves_nothing(tmp_path, make_log) -> None:
    good = make_log([5, 5], seed=6)
    bad = make_log([5], seed=7, first_id=10)
    reward = bad.column("reward").to_numpy().copy()
    reward[2] = np.inf
    bad = bad.set_column(bad.column_names.index("reward"), "reward", pa.array(reward))
    with pytest.raises(DataError, match=r"^b\.parquet: column 'reward', row 102: is not finite"):
        write_dataset(tmp_path / "ds", [SourcedTable(good, "a.parquet"),
                                        SourcedTable(bad, "b.parquet", 100)], card={})
    assert list(tmp_path.iterdir()) == []


def test_reused_episode_id_across_chunks_is_refused(tmp_path, make_log) -> None:
    first = make_log([3, 3], seed=8)
    again = make_log([2, 4], seed=9, first_id=1)  # episode 1 again
    with pytest.raises(DataError) as info:
        write_dataset(tmp_path / "ds", [first, again], card={})
    assert str(info.value) == ("input: column 'episode_id', row 6: episode 1 appears again after "
                               "other episodes (rows of an episode must be contiguous).")
    assert list(tmp_path.iterdir()) == []


def test_inconsistent_obs_dimension_across_chunks(tmp_path, make_log) -> None:
    with pytest.raises(DataError) as info:
        write_dataset(tmp_path / "ds", [make_log([3], obs_dim=3),
                                        make_log([2], obs_dim=4, first_id=5)], card={})
    assert str(info.value) == (
        "input: column 'obs', row 3: inconsistent observation dimension: "
        "fixed_size_list<float32>[4] here but fixed_size_list<float32>[3] in earlier rows.")


def test_observation_space_of_another_size_is_refused(tmp_path, make_log) -> None:
    space = {"type": "Box", "dtype": "float32", "shape": [2, 2], "low": [[0, 0], [0, 0]],
             "high": [[1, 1], [1, 1]]}
    with pytest.raises(DataError) as info:
        write_dataset(tmp_path / "ds", [make_log([3], obs_dim=3)],
                      card={"observation_space": space})
    assert str(info.value) == ("input: column 'obs': 3 values per row, but the observation "
                               "space (Box of shape [2, 2]) has 4.")
    assert list(tmp_path.iterdir()) == []


def test_propensity_filled_in_some_chunks_only(tmp_path, make_log) -> None:
    with pytest.raises(DataError) as info:
        write_dataset(tmp_path / "ds", [make_log([3]), make_log([2], logged=False, first_id=5)],
                      card={})
    assert str(info.value) == (
        "input: column 'logged_logp', row 3: is null here but filled in earlier rows (a "
        "propensity column must be filled on every row or none).")


def test_card_propensity_source_for_an_empty_column_is_refused(tmp_path, make_log) -> None:
    with pytest.raises(DataError, match="card names its source"):
        write_dataset(tmp_path / "ds", [make_log([3], logged=False)],
                      card={"propensity": {"logged_logp": {"source": "logger"}}})
    assert list(tmp_path.iterdir()) == []


def test_empty_stream_is_refused(tmp_path) -> None:
    with pytest.raises(DataError, match=r"the input has no rows \(empty input\)\.$"):
        write_dataset(tmp_path / "ds", [], card={"name": "x"})
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_then_replaced_atomically(tmp_path, make_log) -> None:
    out = write_dataset(tmp_path / "ds", [make_log([3, 4], seed=1)], card={"name": "old"})
    with pytest.raises(DatasetExistsError, match="already exists"):
        write_dataset(out, [make_log([2], seed=2)], card={"name": "new"})
    assert read_card(out)["name"] == "old"
    # A failing overwrite leaves the old dataset in place.
    with pytest.raises(DataError):
        write_dataset(out, [make_log([2], seed=2).slice(0, 0)], card={}, overwrite=True)
    assert read_card(out)["name"] == "old"
    write_dataset(out, [make_log([2], seed=2)], card={"name": "new"}, overwrite=True)
    assert read_card(out)["name"] == "new" and read_card(out)["counts"]["steps"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["_dataset.json", "part-00000.parquet"]
    assert _leftovers(tmp_path) == []


def test_overwrite_refuses_a_folder_that_is_not_a_dataset(tmp_path, make_log) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetExistsError, match="is not a dataset folder"):
        write_dataset(tmp_path / "home", [make_log([3])], card={}, overwrite=True)
    assert (tmp_path / "home" / "notes.txt").read_text() == "keep me"


def test_verify_reports_a_changed_and_a_missing_shard(tmp_path, make_log) -> None:
    out = write_dataset(tmp_path / "ds", [make_log([50] * 10)], card={}, rows_per_file=200)
    files = read_card(out)["files"]
    with (out / files[0]["name"]).open("r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.remove(out / files[1]["name"])
    problems = verify_dataset(out)
    assert len(problems) == 2
    assert problems[0].startswith(f"{out / files[0]['name']}: sha256 ")
    assert problems[0].endswith(f"differs from the card's {files[0]['sha256']}.")
    assert problems[1] == f"{out / files[1]['name']}: listed in the card but missing."


def test_read_card_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such dataset folder"):
        read_card(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no _dataset\.json here"):
        read_card(tmp_path / "empty")
    (tmp_path / "empty" / "dataset.json").write_text(json.dumps({"schema_version": 2}))  # legacy
    with pytest.raises(DataError, match="schema_version 2 is not supported"):
        read_card(tmp_path / "empty")


def test_card_keeps_given_fields_and_strict_json(tmp_path, make_log) -> None:
    card = {"name": "n", "description": "d", "env_spec": {"id": "CartPole-v1"},
            "source": {"kind": "test"}, "behavior": "uniform", "extra": [1, 2],
            "action_space": {"type": "Discrete", "dtype": "int64", "start": 0, "n": 3},
            "propensity": {"logged_logp": {"source": "logger"}}}
    out = write_dataset(tmp_path / "ds", [make_log([2, 2])], card=card)
    written = json.loads((out / "_dataset.json").read_text(), parse_constant=lambda c: 1 / 0)
    for key, value in card.items():
        if key != "propensity":
            assert written[key] == value
    assert written["propensity"] == {"logged_logp": {"source": "logger"}, "estimated_logp": None}


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=25),
       per_chunk=st.integers(1, 6), rows_per_file=st.integers(4, 80),
       row_group_size=st.integers(1, 40))
def test_any_chunking_and_shard_size_round_trips(tmp_path_factory, make_log, lengths, per_chunk,
                                                 rows_per_file, row_group_size) -> None:
    table = make_log(lengths, seed=len(lengths))
    out = tmp_path_factory.mktemp("prop") / "ds"
    write_dataset(out, _chunks(table, per_chunk), card={}, rows_per_file=rows_per_file,
                  row_group_size=row_group_size)
    assert read_table(out).equals(table)
    card = read_card(out)
    starts = np.flatnonzero(np.r_[True, np.diff(table.column("episode_id").to_numpy()) != 0])
    first_rows = np.cumsum([0] + [f["rows"] for f in card["files"]])[:-1]
    assert np.isin(first_rows, starts).all()  # every shard starts an episode
    for entry in card["files"][:-1]:  # a shard closes at the first episode end past the target
        assert entry["rows"] >= rows_per_file
    assert sum(f["episodes"] for f in card["files"]) == len(lengths)
