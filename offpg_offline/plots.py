"""PNG plots of runs for MLflow artifacts: learning curves, weight diagnostics, comparisons.

Matplotlib's object API with the Agg canvas only (no pyplot, so no global figure state and no
display needed). Inputs are plain values: metric histories as (step, value) pairs, as
`tracking.MlflowTracker.metric_histories` returns them, and arrays of log-weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

History = Mapping[str, Sequence[tuple[int, float]]]
WEIGHT_KEYS = ("weights/ess_fraction", "weights/max")


def _figure(n_panels: int, *, ncols: int = 3, size: tuple[float, float] = (4.0, 3.0)) -> Any:
    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    figure = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False).flatten()
    for unused in axes[n_panels:]:
        unused.set_visible(False)
    return figure, axes[:n_panels]


def _curve(
    ax: Any,
    history: Sequence[tuple[int, float]],
    spread: Sequence[tuple[int, float]] | None = None,
) -> None:
    """A metric against its step, with a ± `spread` band where one is logged at the same steps."""
    steps = np.array([s for s, _ in history])
    values = np.array([v for _, v in history])
    ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
    if spread:
        by_step = dict(spread)
        if all(s in by_step for s in steps):
            width = np.array([by_step[s] for s in steps])
            ax.fill_between(steps, values - width, values + width, alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def learning_curves(histories: History, path: Path) -> Path | None:
    """One panel per metric other than the weight diagnostics (loss, OPE, online return, ...);
    an `x_std` metric is drawn as a ± band around `x_mean` rather than in its own panel.

    Returns the path written, or None when there is nothing to plot.
    """
    keys = [
        k for k in sorted(histories)
        if histories[k]
        and not k.startswith("weights/")
        and not (k.endswith("_std") and k.removesuffix("_std") + "_mean" in histories)
    ]
    if not keys:
        return None
    figure, axes = _figure(len(keys))
    for ax, key in zip(axes, keys, strict=True):
        spread = None
        if key.endswith("_mean"):
            spread = histories.get(key.removesuffix("_mean") + "_std")
        _curve(ax, histories[key], spread)
        ax.set_title(key + (" (± sd)" if spread else ""), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    figure.savefig(path, dpi=80)
    return path


def weight_curves(histories: History, path: Path) -> Path | None:
    """Effective sample size (fraction) and the largest importance weight over training."""
    keys = [k for k in WEIGHT_KEYS if histories.get(k)]
    if not keys:
        return None
    figure, axes = _figure(len(keys), ncols=2)
    for ax, key in zip(axes, keys, strict=True):
        _curve(ax, histories[key])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "weights/max":
            ax.set_yscale("log")
            ax.set_title("max importance weight (log scale)", fontsize=10)
        else:
            ax.set_ylim(0.0, 1.05)
            ax.set_title("ESS / N", fontsize=10)
    figure.savefig(path, dpi=80)
    return path


def ess_fraction(log_weights: np.ndarray) -> float:
    r"""ESS/N = (Σ w)² / (N Σ w²) of weights given as logs, shifted by max log w first so
    that large weights do not overflow (the ratio does not change with a common factor)."""
    shifted = np.exp(log_weights - log_weights.max())
    return float(shifted.sum() ** 2 / (log_weights.size * (shifted**2).sum()))


def weight_histogram(log_weights: Any, path: Path, *, bins: int = 50) -> Path | None:
    """Histogram of the final log importance weights log w on the training split, titled with
    their `ess_fraction` (non-finite values are left out)."""
    values = np.asarray(log_weights, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    ess = ess_fraction(values)
    figure, (ax,) = _figure(1, size=(6.0, 3.5))
    ax.hist(values, bins=bins, color="tab:blue", alpha=0.8)
    ax.axvline(0.0, color="black", linewidth=1, linestyle="--")
    ax.set_xlabel("log w  (π_θ / π_β, final policy)")
    ax.set_ylabel("count")
    ax.set_title(f"final log-weights: N = {values.size}, ESS/N = {ess:.3f}", fontsize=10)
    figure.savefig(path, dpi=80)
    return path


def write_run_plots(out_dir: Path, histories: History, log_weights: Any | None) -> list[Path]:
    """The run's standard plots as PNG files in `out_dir` (those with data to show)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        learning_curves(histories, out_dir / "learning_curves.png"),
        weight_curves(histories, out_dir / "weights.png"),
        None
        if log_weights is None
        else weight_histogram(log_weights, out_dir / "weight_histogram.png"),
    ]
    return [p for p in written if p is not None]


def comparison(
    labels: Sequence[str], values: Sequence[Sequence[float]], metric: str, path: Path
) -> Path:
    """Horizontal bars of the mean of each group's `values` with ± one standard deviation
    (sample std, when a group has two or more runs); each run is a dot. Groups in the order
    given (best first)."""
    height = max(2.5, 0.45 * len(labels) + 1.2)
    figure, (ax,) = _figure(1, size=(8.0, height))
    positions = np.arange(len(labels))[::-1]
    means = [float(np.mean(v)) if len(v) else math.nan for v in values]
    stds = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in values]
    ax.barh(positions, means, xerr=stds, color="tab:blue", alpha=0.6, capsize=4)
    for position, group in zip(positions, values, strict=True):
        ax.scatter(group, [position] * len(group), color="black", s=12, zorder=3)
    ax.set_yticks(positions, labels, fontsize=8)
    ax.set_xlabel(f"{metric}  (mean ± sd over runs)")
    ax.grid(axis="x", alpha=0.3)
    figure.savefig(path, dpi=80)
    return path
