"""Every dataset folder the project writes opens as a plain Parquet dataset in other engines.

pyarrow.dataset, Spark, Hive and Ray Data list a folder and skip names that start with `_` or
`.`; polars reads the documented glob `DIR/*.parquet`. The card (`_dataset.json`) and the
behavior model (`_behavior/`) are hidden that way, so an engine sees exactly the dataset's rows:
the reference is the card's file list, read file by file (`store.read_table`), and the card's
step count. Before the rename, pyarrow failed with "Could not read schema from dataset.json".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from offpg_offline.behavior.fit import FitConfig, fit_behavior
from offpg_offline.data import store
from offpg_offline.data.parquet import ingest_parquet
from offpg_offline.data.store import (
    BEHAVIOR_DIR,
    CARD_NAME,
    card_path,
    read_card,
    read_table,
    verify_dataset,
    write_dataset,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p for p in (ROOT / "datasets").iterdir() if p.is_dir())


def _sorted_rows(table: pa.Table) -> dict[str, list]:
    table = table.sort_by([("episode_id", "ascending"), ("step", "ascending")])
    return table.to_pydict()


def _assert_engines_read_exactly(folder: Path) -> None:
    card = read_card(folder)
    expected = _sorted_rows(read_table(folder))
    assert len(expected["episode_id"]) == card["counts"]["steps"]

    arrow = pads.dataset(folder, format="parquet").to_table()
    assert arrow.num_rows == card["counts"]["steps"]
    assert _sorted_rows(arrow) == expected

    frame = pl.scan_parquet(folder / "*.parquet").collect()
    assert frame.height == card["counts"]["steps"]
    assert _sorted_rows(frame.to_arrow()) == expected


def test_a_written_dataset_hides_its_card(tmp_path, make_log) -> None:
    out = write_dataset(tmp_path / "ds", [make_log([3, 5, 2]), make_log([4], first_id=9)],
                        card={"name": "ds"}, rows_per_file=6)
    assert card_path(out) == out / CARD_NAME == out / "_dataset.json"
    assert len(read_card(out)["files"]) == 2
    _assert_engines_read_exactly(out)


def test_an_ingested_parquet_log_opens_in_pyarrow_and_polars(tmp_path) -> None:
    rng = np.random.default_rng(0)
    rows = 40
    episode = np.repeat(np.arange(8), 5)
    last = np.r_[episode[1:] != episode[:-1], True]
    pl.DataFrame({
        "episode_id": episode, "step": np.tile(np.arange(5), 8),
        "obs": rng.normal(size=(rows, 2)).tolist(), "next_obs": rng.normal(size=(rows, 2)).tolist(),
        "action": rng.integers(0, 3, rows), "reward": rng.normal(size=rows),
        "terminated": last, "truncated": np.zeros(rows, bool),
    }).write_parquet(tmp_path / "log.parquet")

    result = ingest_parquet([tmp_path / "log.parquet"], tmp_path / "ds")

    _assert_engines_read_exactly(result.path)


@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_datasets_open_in_pyarrow_and_polars(folder: Path) -> None:
    _assert_engines_read_exactly(folder)


def test_a_behavior_fit_output_opens_with_its_model_hidden(tmp_path) -> None:
    source = ROOT / "datasets" / "cartpole-weak"
    report = fit_behavior(source, out=tmp_path / "fitted",
                          config=FitConfig(folds=2, steps=30, hidden=(8,)))

    out = report.out
    assert out is not None
    assert (out / BEHAVIOR_DIR / "model.pt").is_file()
    assert not (out / "behavior").exists()
    entry = read_card(out)["propensity"]["estimated_logp"]
    assert entry["model_checkpoint"] == "_behavior/model.pt"
    assert (out / entry["model_checkpoint"]).is_file()
    _assert_engines_read_exactly(out)
    assert verify_dataset(out) == []


def test_a_dataset_of_the_old_layout_is_still_read(tmp_path) -> None:
    # Written before the rename: `dataset.json` (and `behavior/`); read, verified, replaced.
    old = tmp_path / "old"
    shutil.copytree(ROOT / "datasets" / "cartpole-weak", old)
    (old / CARD_NAME).rename(old / "dataset.json")

    assert card_path(old) == old / "dataset.json"
    assert store.is_dataset(old)
    assert read_card(old)["name"] == "cartpole-weak"
    assert read_card(old / "dataset.json")["counts"]["steps"] == 13856
    assert verify_dataset(old) == []
    assert read_table(old).num_rows == 13856
    card = json.loads((old / "dataset.json").read_text())
    # Overwriting an old-layout dataset writes the new layout.
    write_dataset(old, [read_table(old)], card={k: card[k] for k in ("name", "action_space")},
                  overwrite=True)
    assert sorted(p.name for p in old.iterdir()) == ["_dataset.json", "part-00000.parquet"]
