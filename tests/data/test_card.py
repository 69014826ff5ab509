"""The card model (`data.card`): exact sentences for one lie of each sort, and what it accepts.

The generated variants per class live in tests/bad_inputs/test_hostile_classes.py; here the
expected messages are written out by hand, word for word.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from offpg_offline.data.card import (
    check_batch_finite,
    one_line,
    validate_card,
    verify_parts,
)
from offpg_offline.data.schema import DataError
from offpg_offline.data.store import card_path, read_card, write_dataset

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p for p in (ROOT / "datasets").iterdir() if p.is_dir())


@pytest.fixture()
def dataset(tmp_path: Path, make_log) -> Path:
    # 2 + 3 + 4 = 9 steps of 3 episodes, 3 discrete actions, obs of 3 values (data/conftest).
    return write_dataset(tmp_path / "ds", [make_log([2, 3, 4])], card={"name": "ds"})


def _card(ds: Path) -> dict:
    return json.loads(card_path(ds).read_text())


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_card_validates_and_matches_its_parts(folder: Path) -> None:
    card = read_card(folder)
    verify_parts(folder, card, full_hash=True)


def test_a_count_that_contradicts_the_files_is_refused_word_for_word(dataset: Path) -> None:
    card = _card(dataset)
    steps = card["counts"]["steps"]
    card["counts"]["steps"] = steps + 1
    with pytest.raises(DataError) as err:
        validate_card(card, source=card_path(dataset))
    assert str(err.value) == (f"{card_path(dataset)}: key 'counts.steps' is {steps + 1}, but "
                              f"the files list {steps} rows.")


def test_a_shard_name_outside_the_folder_is_refused_word_for_word(dataset: Path) -> None:
    card = _card(dataset)
    card["files"][0]["name"] = "../x.parquet"
    with pytest.raises(DataError) as err:
        validate_card(card, source=card_path(dataset))
    assert str(err.value) == (f"{card_path(dataset)}: key 'files[0].name' is '../x.parquet': a "
                              f"shard must be a plain file name inside the dataset folder.")


def test_an_observation_width_lie_is_found_in_the_footer(dataset: Path) -> None:
    card = _card(dataset)
    width = card["observation_space"]["shape"][0]
    card["observation_space"].update(shape=[width + 1], low=["-inf"] * (width + 1),
                                     high=["inf"] * (width + 1))
    validate_card(card, source=card_path(dataset))  # consistent in itself
    shard = dataset / card["files"][0]["name"]
    with pytest.raises(DataError) as err:
        verify_parts(dataset, card)
    assert str(err.value) == (
        f"{shard}: column 'obs' holds fixed_size_list<float32>[{width}], but the card's "
        f"observation_space needs fixed_size_list<float32>[{width + 1}] (the shard does not "
        f"match its card; re-ingest it or run offpg info --verify).")


def test_the_sha256_is_only_read_when_asked(dataset: Path) -> None:
    card = _card(dataset)
    card["files"][0]["sha256"] = "0" * 64  # a well-formed lie that only the full hash finds
    verify_parts(dataset, card)
    with pytest.raises(DataError, match=r"its sha256 [0-9a-f]{64} differs from files\[0\]"):
        verify_parts(dataset, card, full_hash=True)


def test_a_symlinked_shard_inside_the_folder_is_kept(dataset: Path) -> None:
    card = _card(dataset)
    name = card["files"][0]["name"]
    (dataset / name).rename(dataset / "real.bin")
    (dataset / name).symlink_to("real.bin")
    assert validate_card(card, source=card_path(dataset)) is card


def test_the_card_of_a_copied_folder_is_read_beside_it(dataset: Path, tmp_path: Path) -> None:
    """Shard names resolve against the card's own folder, wherever it was copied."""
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(dataset, copy)
    (dataset / _card(dataset)["files"][0]["name"]).unlink()
    verify_parts(copy, read_card(copy), full_hash=True)


def test_one_line_escapes_control_characters() -> None:
    assert one_line("a\nb\tc\x1b[0m") == "a\\nb\\tc\\x1b[0m"
    assert one_line("plain ünïcode") == "plain ünïcode"


def test_non_finite_loaded_steps_name_the_column(dataset: Path) -> None:
    from offpg_offline.data.batch import load_steps

    batch = load_steps(dataset)
    check_batch_finite(batch, dataset)
    batch.obs[3, 1] = float("inf")
    with pytest.raises(DataError, match=r"column 'obs', row 3 of the loaded steps is not finite"):
        check_batch_finite(batch, dataset)
