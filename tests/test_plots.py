"""Run plots: which PNGs are written from which metric histories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from offpg_offline import plots

PNG = b"\x89PNG\r\n\x1a\n"


def test_write_run_plots_writes_the_three_pngs(tmp_path: Path) -> None:
    histories = {
        "train/loss": [(25, -1.0), (50, -2.0)],
        "online/return_mean": [(50, 30.0)],
        "online/return_std": [(50, 4.0)],
        "weights/ess_fraction": [(25, 0.9), (50, 0.7)],
        "weights/max": [(25, 3.0), (50, 40.0)],
    }
    log_weights = np.random.default_rng(0).normal(size=1000)
    written = plots.write_run_plots(tmp_path / "plots", histories, log_weights)
    assert [p.name for p in written] == [
        "learning_curves.png", "weights.png", "weight_histogram.png"]
    assert all(p.read_bytes()[:8] == PNG for p in written)


def test_plots_with_nothing_to_show_are_skipped(tmp_path: Path) -> None:
    assert plots.learning_curves({"weights/max": [(1, 2.0)]}, tmp_path / "a.png") is None
    assert plots.weight_curves({"train/loss": [(1, 2.0)]}, tmp_path / "b.png") is None
    assert plots.weight_histogram(np.array([np.inf, np.nan]), tmp_path / "c.png") is None
    assert plots.write_run_plots(tmp_path, {}, None) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shift", [0.0, 800.0, -800.0])  # exp(±800) over/underflows float64
def test_ess_fraction_is_computed_in_log_space(shift: float) -> None:
    # Two weights w and 3w: ESS/N = (4w)² / (2 · 10w²) = 0.8, whatever w.
    assert plots.ess_fraction(np.array([0.0, np.log(3.0)]) + shift) == pytest.approx(0.8)
    # N equal weights: ESS/N = 1.
    assert plots.ess_fraction(np.full(7, shift)) == pytest.approx(1.0)
