"""One decision per row (`--bandit`) and categorical context columns (`--categorical-cols`).

The fixture is laid out like the Open Bandit Dataset's CSV (timestamp, item_id, position, click,
propensity_score, user_feature_0..3 as hashed strings, user-item_affinity_0..79): 80 items,
3 positions, propensities that vary by row (a context-dependent softmax logger). Expected values
are computed here from the generated columns (sorted distinct values, row numbers), not by the
adapter's own helpers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.dataset as pads
import pytest
from typer.testing import CliRunner

from offpg_offline.cli import app
from offpg_offline.data.parquet import ColumnMapping, ingest_parquet
from offpg_offline.data.schema import DataError
from offpg_offline.data.store import read_card, read_table

ITEMS, POSITIONS = 80, 3
USER_FEATURES = [f"user_feature_{i}" for i in range(4)]
AFFINITY = [f"user-item_affinity_{i}" for i in range(ITEMS)]


def _hash(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()  # OBD's features are md5-like hex strings


def obd_frame(rows: int, seed: int = 0, *, positions: int = POSITIONS,
              feature_levels: int = 5) -> pl.DataFrame:
    """An OBD-style log: a softmax logger over 80 items whose logits depend on the user's
    features, so the propensity of the logged item varies by row."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, feature_levels, (rows, 4))
    affinity = rng.normal(size=(rows, ITEMS)).astype(np.float32)
    logits = 0.8 * affinity + 0.3 * levels[:, :1]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    item = (probs.cumsum(axis=1) > rng.random((rows, 1))).argmax(axis=1)
    position = rng.integers(1, positions + 1, rows)
    click = (rng.random(rows) < 0.005 + 0.02 * (affinity[np.arange(rows), item] > 1)).astype(int)
    columns: dict[str, object] = {
        "timestamp": [f"2019-11-{24 + i // 100000:02d} 00:{(i // 60) % 60:02d}:{i % 60:02d}"
                      for i in range(rows)],
        "item_id": item, "position": position, "click": click,
        "propensity_score": probs[np.arange(rows), item],
    }
    for j, name in enumerate(USER_FEATURES):
        columns[name] = [_hash(f"{name}-{v}") for v in levels[:, j]]
    for i, name in enumerate(AFFINITY):
        columns[name] = affinity[:, i]
    return pl.DataFrame(columns)


OBD_ARGS = ["--bandit", "--map", "action=item_id", "--map", "reward=click",
            "--propensity-col", "propensity_score", "--propensity-kind", "prob",
            "--obs-cols", "user-item_affinity_*", "--categorical-cols", "user_feature_*",
            "--categorical-cols", "position", "--action-space", f"discrete:{ITEMS}"]
OBD_MAPPING = ColumnMapping(columns={"action": "item_id", "reward": "click"},
                            obs_cols=("user-item_affinity_*",),
                            categorical_cols=("user_feature_*", "position"),
                            propensity_col="propensity_score", propensity_kind="prob")


def _obs(path: Path) -> np.ndarray:
    column = read_table(path).column("obs").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1)


def _one_hot(values: list, vocab: list) -> np.ndarray:
    """Independent encoding: one slot per vocabulary value, then the unknown slot."""
    out = np.zeros((len(values), len(vocab) + 1), dtype=np.float32)
    for row, value in enumerate(values):
        out[row, vocab.index(value) if value in vocab else len(vocab)] = 1.0
    return out


def test_obd_csv_becomes_one_terminating_decision_per_row(tmp_path) -> None:
    frame = obd_frame(500)
    frame.write_csv(tmp_path / "obd.csv")

    result = CliRunner().invoke(app, ["ingest", "csv", str(tmp_path / "obd.csv"),
                                      "--out", str(tmp_path / "ds"), *OBD_ARGS])

    assert result.exit_code == 0, result.output
    out = tmp_path / "ds"
    card = read_card(out)
    table = read_table(out)
    assert card["bandit"] is True
    assert card["counts"] == {"episodes": 500, "steps": 500}
    assert table.column("episode_id").to_pylist() == list(range(500))
    assert table.column("step").to_pylist() == [0] * 500
    assert all(table.column("terminated").to_pylist())
    assert not any(table.column("truncated").to_pylist())
    assert card["stats"]["episodes_terminated"] == 500
    assert table.column("action").to_pylist() == frame["item_id"].to_list()
    np.testing.assert_array_equal(table.column("reward").to_numpy(),
                                  frame["click"].to_numpy().astype(np.float32))
    np.testing.assert_allclose(table.column("logged_logp").to_numpy(),
                               np.log(frame["propensity_score"].to_numpy()), rtol=0,
                               atol=1e-6)  # float32 storage of log p, |log p| < 10
    assert card["action_space"] == {"type": "Discrete", "dtype": "int64", "start": 0, "n": 80}

    # obs = the 80 affinities, then one block per categorical column (file order), each with
    # its sorted vocabulary and an unknown slot.
    obs = _obs(out)
    np.testing.assert_array_equal(obs[:, :ITEMS], frame.select(AFFINITY).to_numpy())
    blocks, offset = [], ITEMS
    for entry, name in zip(card["categorical"]["columns"], ["position", *USER_FEATURES],
                           strict=True):
        assert entry["column"] == name
        values = [str(v) for v in frame[name].to_list()]
        vocab = (sorted(set(values), key=int) if name == "position" else sorted(set(values)))
        assert entry["values"] == vocab
        assert entry["offset"] == offset and entry["unknown_index"] == offset + len(vocab)
        blocks.append(_one_hot(values, vocab))
        offset += len(vocab) + 1
    assert card["categorical"]["columns"][0]["values"] == ["1", "2", "3"]
    assert card["categorical"]["columns"][0]["kind"] == "integer"
    np.testing.assert_array_equal(obs[:, ITEMS:], np.concatenate(blocks, axis=1))
    assert card["observation_space"]["shape"] == [offset]
    shown = CliRunner().invoke(app, ["info", str(out)]).output
    assert "decisions: one per row (bandit)" in shown
    assert f"categorical position: 3 values + unknown, obs[{ITEMS}:{ITEMS + 4}]" in shown


def test_bandit_ids_count_rows_over_all_files(tmp_path) -> None:
    obd_frame(30, seed=1).write_parquet(tmp_path / "a.parquet")
    obd_frame(20, seed=2).write_parquet(tmp_path / "b.parquet")

    result = ingest_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "ds",
                            mapping=OBD_MAPPING, bandit=True, batch_rows=7)

    table = read_table(result.path)
    assert table.column("episode_id").to_pylist() == list(range(50))
    assert pads.dataset(result.path, format="parquet").count_rows() == 50


def test_later_data_encode_with_the_stored_vocabulary_and_unseen_values_are_unknown(
        tmp_path) -> None:
    first = obd_frame(200, seed=3, feature_levels=3)
    first.write_csv(tmp_path / "first.csv")
    ingest_parquet([tmp_path / "first.csv"], tmp_path / "first", mapping=OBD_MAPPING,
                   bandit=True)
    vocab = read_card(tmp_path / "first")["categorical"]
    # New data: a fourth position and feature levels the first log never showed.
    later = obd_frame(100, seed=4, positions=4, feature_levels=6)
    later.write_csv(tmp_path / "later.csv")

    result = ingest_parquet([tmp_path / "later.csv"], tmp_path / "later", mapping=OBD_MAPPING,
                            bandit=True, categories_from=tmp_path / "first")

    card = read_card(result.path)
    assert [c["values"] for c in card["categorical"]["columns"]] == \
        [c["values"] for c in vocab["columns"]]
    obs = _obs(result.path)
    position = vocab["columns"][0]
    block = obs[:, position["offset"]:position["offset"] + position["width"]]
    expected = _one_hot([str(v) for v in later["position"].to_list()], position["values"])
    np.testing.assert_array_equal(block, expected)
    fourth = later["position"].to_numpy() == 4
    assert fourth.any() and (block[fourth, -1] == 1).all()  # the unknown slot
    assert card["source"]["categorical_unknown_rows"]["position"] == int(fourth.sum())
    assert any("unknown slot" in w and "'position'" in w for w in result.warnings)
    # A value seen before encodes exactly as it did in the first dataset.
    first_obs = _obs(tmp_path / "first")
    row_first = int(np.flatnonzero(first["position"].to_numpy() == 2)[0])
    row_later = int(np.flatnonzero(later["position"].to_numpy() == 2)[0])
    span = slice(position["offset"], position["offset"] + position["width"])
    np.testing.assert_array_equal(first_obs[row_first, span], obs[row_later, span])


def test_categorical_columns_alone_form_obs_and_next_obs_follows_the_episode(tmp_path) -> None:
    # Without --bandit: episodes by id, next_obs = the next row's encoded obs.
    pl.DataFrame({"episode_id": [0, 0, 0, 1, 1], "slot": ["b", "a", "c", "a", "a"],
                  "action": [0, 1, 0, 1, 1], "reward": [1.0, 0, 0, 1, 0],
                  "terminated": [False, False, True, False, True]}).write_csv(tmp_path / "x.csv")

    result = ingest_parquet([tmp_path / "x.csv"], tmp_path / "ds",
                            mapping=ColumnMapping(categorical_cols=("slot",)))

    table = read_table(result.path)
    obs = _obs(result.path)
    expected = _one_hot(["b", "a", "c", "a", "a"], ["a", "b", "c"])
    np.testing.assert_array_equal(obs, expected)
    next_obs = table.column("next_obs").combine_chunks().flatten().to_numpy().reshape(5, -1)
    np.testing.assert_array_equal(next_obs[[0, 1, 3]], expected[[1, 2, 4]])
    assert read_card(result.path)["bandit"] is False


def test_a_float_categorical_column_is_refused_by_name(tmp_path) -> None:
    obd_frame(10).write_csv(tmp_path / "obd.csv")

    result = CliRunner().invoke(app, ["ingest", "csv", str(tmp_path / "obd.csv"), "--out",
                                      str(tmp_path / "ds"), *OBD_ARGS, "--categorical-cols",
                                      "propensity_score"])

    assert result.exit_code == 2
    assert "propensity_score" in result.output and "must hold strings or integers" in \
        result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "ds").exists()


def test_without_bandit_a_log_without_boundaries_is_refused(tmp_path) -> None:
    obd_frame(10).write_csv(tmp_path / "obd.csv")
    with pytest.raises(DataError, match="no episode boundaries"):
        ingest_parquet([tmp_path / "obd.csv"], tmp_path / "ds", mapping=OBD_MAPPING)


def test_categories_from_a_dataset_without_vocabulary_is_refused(tmp_path) -> None:
    obd_frame(10).write_csv(tmp_path / "obd.csv")
    ingest_parquet([tmp_path / "obd.csv"], tmp_path / "plain", bandit=True,
                   mapping=ColumnMapping(columns={"action": "item_id", "reward": "click"},
                                         obs_cols=("user-item_affinity_*",)))
    with pytest.raises(ValueError, match="no one-hot categorical vocabulary"):
        ingest_parquet([tmp_path / "obd.csv"], tmp_path / "ds", mapping=OBD_MAPPING,
                       bandit=True, categories_from=tmp_path / "plain")
