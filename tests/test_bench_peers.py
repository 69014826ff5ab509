"""Pure helpers of scripts/bench_peers.py and its d3rlpy worker, run in our own venv (no d3rlpy):
the conversion of a shipped log into the arrays d3rlpy's MDPDataset gets, checked against the
counts the card recorded when the log was written, and the table's comparison cells."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


worker = _load("_peers_d3rlpy")
bench = _load("bench_peers")


def _arrays(name: str):
    card, table = worker.read_log(ROOT / "datasets" / name)
    return card, worker.log_arrays(card, table)


@pytest.mark.parametrize("name", bench.LOGS)
def test_log_arrays_match_the_cards_counts(name: str) -> None:
    card, arrays = _arrays(name)
    ends = (arrays.terminals > 0) | (arrays.timeouts > 0)
    assert len(arrays.rewards) == card["counts"]["steps"]
    assert int(ends.sum()) == card["counts"]["episodes"]
    assert ends[-1]  # the last row closes the last episode
    assert int(arrays.terminals.sum()) == card["stats"]["episodes_terminated"]
    assert int(arrays.timeouts.sum()) == card["stats"]["episodes_truncated"]
    # Episode returns, split at the flags, against the card's: float32 rewards summed over at
    # most 1000 steps per episode, |return| < 2000, so float64 sums agree to ~1e-4.
    bounds = np.flatnonzero(ends) + 1
    returns = np.add.reduceat(arrays.rewards.astype(np.float64), np.r_[0, bounds[:-1]])
    stats = card["stats"]["episode_return"]
    assert returns.mean() == pytest.approx(stats["mean"], rel=1e-5, abs=1e-3)
    assert returns.min() == pytest.approx(stats["min"], rel=1e-5, abs=1e-3)
    assert arrays.observations.shape == (len(arrays.rewards), *card["observation_space"]["shape"])
    if arrays.discrete:
        assert arrays.actions.dtype == np.int64
        assert set(np.unique(arrays.actions)) <= set(range(card["action_space"]["n"]))


def test_unclipped_log_gives_d3rlpy_the_executed_action() -> None:
    card, arrays = _arrays("lander-clipped")
    assert arrays.low.tolist() == [-1.0, -1.0] and arrays.high.tolist() == [1.0, 1.0]
    assert arrays.actions.min() >= -1.0 and arrays.actions.max() <= 1.0
    # The card recorded the fraction of raw samples outside the box when the log was written.
    expected = card["behavior"]["raw_outside_bounds_fraction"] * card["counts"]["steps"]
    assert arrays.clipped_rows == round(expected)
    assert np.isclose(np.abs(arrays.actions), 1.0).any(axis=1).sum() >= arrays.clipped_rows


def test_pendulum_keeps_its_own_bounds_and_is_not_clipped() -> None:
    _, arrays = _arrays("pendulum-gauss")
    assert arrays.low.tolist() == [-2.0] and arrays.high.tolist() == [2.0]
    assert arrays.clipped_rows == 0


def test_noprop_log_has_the_same_transitions_as_cartpole_eps() -> None:
    _, eps = _arrays("cartpole-eps")
    _, noprop = _arrays("cartpole-eps-noprop")
    for field in ("observations", "actions", "rewards", "terminals", "timeouts"):
        assert np.array_equal(getattr(eps, field), getattr(noprop, field)), field


def test_compare_prints_a_ratio_only_for_positive_returns() -> None:
    assert bench.compare([400.0, 500.0], ("CQL", 300.0)) == ("1.50", "+150.0 (ours better)")
    ratio, diff = bench.compare([-200.0], ("IQL", -172.0))
    assert ratio.startswith("—") and diff == "-28.0 (IQL better)"
    assert bench.compare([], ("BC", 1.0)) == ("—", "—")
    assert bench.compare([500.0], ("BC", 500.0)) == ("1.00", "+0.0 (tie)")


def test_results_table_reuses_eps_cells_for_noprop_and_marks_deterministic_peers() -> None:
    cells = {}
    for seed, (greedy, ours) in enumerate([(100.0, 500.0), (200.0, 400.0)]):
        cells[f"cartpole-eps|BC|{seed}"] = {"greedy_mean": greedy, "stochastic_mean": None}
        cells[f"cartpole-eps-noprop|ours|{seed}"] = {"greedy_mean": ours,
                                                      "stochastic_mean": ours - 50}
    table = bench.results_table({"cells": cells}, ["cartpole-eps-noprop"], [0, 1])
    row = table.splitlines()[2].split(" | ")
    assert "150.0 ± 50.0 / = greedy" in row  # BC's greedy mean ± population std over 2 seeds
    assert "450.0 ± 50.0" in row and "400.0 ± 50.0" in row
    assert row[-2] == "3.00" and row[-1].startswith("+300.0 (ours better)")
    behavior = json.loads((ROOT / "datasets/cartpole-eps-noprop/_dataset.json").read_text())
    assert f"{behavior['behavior']['mean_return']:.1f}" in row[1]
    assert not math.isnan(float(row[1].split(" / ")[1]))


def test_a_venv_that_cannot_be_created_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(bench.BenchError, match=r"cannot create the d3rlpy venv .*file/venv"):
        bench.ensure_venv(tmp_path / "file" / "venv")
