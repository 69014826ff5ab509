"""Rank finished training runs for `offpg compare`: group by config minus seed, mean ± sd.

Pure functions of plain run records (run id and name, params, latest metrics, tags), so the
ranking is tested without a store; `tracking.find_runs` supplies the records.

Runs whose params are equal except for `seed` (and `threads`, which does not change what is
learned) form one group: the seeds of a sweep cell, or repeats of a setting. A group's score is
the mean of the chosen metric over its runs, with the sample standard deviation
    sd = sqrt(Σ (x_i - x̄)² / (n - 1))
when n ≥ 2. Groups are ranked by that mean (higher first unless `lower_is_better`); groups
without the metric come last.

Training or evaluation metrics. A run's own metrics are what training logged. `offpg evaluate
RUN` records each evaluation as a nested run under it (tag `offpg.kind` = evaluation);
`attach_evaluations` adds the latest evaluation's metrics on the run's own validation split to
the run as `eval:<key>` (e.g. `eval:ope/wdr`, `eval:online/discounted_return_mean`), so
`offpg compare --metric eval:ope/wdr` ranks by evaluation while `--metric ope/wdr` keeps ranking
by what training logged. Evaluations on another dataset or on all episodes are not attached:
they are not comparable across runs.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

EVAL_PREFIX = "eval:"  # metrics of a run's evaluation (nested run), as opposed to training's
NOT_CONFIG = frozenset({"seed", "threads"})  # params that do not define a configuration
ESS_METRIC = "weights/ess_fraction"
OPE_PREFERENCE = (
    "ope/wdr", "ope/dr", "ope/wpdis", "ope/pdis", "ope/wis", "ope/is", "ope/fqe",
    "ope/pdis_validation",
)


class RunLike(Protocol):
    run_id: str
    run_name: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]


@dataclass(frozen=True, slots=True)
class Stat:
    """Mean and sample sd (None for a single value) of one quantity over a group's runs."""

    mean: float
    sd: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return None
        sd = statistics.stdev(finite) if len(finite) > 1 else None
        return cls(statistics.fmean(finite), sd, len(finite))

    def text(self) -> str:
        if self.sd is None:
            return f"{self.mean:.4g}"
        return f"{self.mean:.4g} ± {self.sd:{'.3g' if self.sd < 1000 else '.0f'}}"


@dataclass(frozen=True, slots=True)
class GroupSummary:
    """One row of the comparison: a configuration and its runs (one per seed)."""

    estimator: str
    options: dict[str, str]  # the params that differ between the compared groups
    run_ids: tuple[str, ...]
    run_names: tuple[str, ...]
    seeds: tuple[str, ...]
    metric: Stat | None
    metric_values: tuple[float, ...]
    ope: Stat | None
    ope_interval: tuple[float, float] | None  # logged CI, shown when the group has one run
    ess: Stat | None

    @property
    def label(self) -> str:
        options = " ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.estimator} {options}".strip()

    def as_dict(self) -> dict[str, Any]:
        def stat(s: Stat | None) -> dict[str, Any] | None:
            return None if s is None else {"mean": s.mean, "sd": s.sd, "n": s.n}

        return {
            "estimator": self.estimator,
            "options": self.options,
            "run_ids": list(self.run_ids),
            "run_names": list(self.run_names),
            "seeds": list(self.seeds),
            "metric": stat(self.metric),
            "metric_values": list(self.metric_values),
            "ope": stat(self.ope),
            "ope_interval": None if self.ope_interval is None else list(self.ope_interval),
            "ess": stat(self.ess),
        }


def attach_evaluations(runs: Sequence[RunLike], evaluations: Sequence[RunLike]) -> list[RunLike]:
    """Each training run with the metrics of its latest evaluation on its own validation split
    added as `eval:<key>`; its own metrics are kept as they are.

    Args:
        runs: training runs (dataclass records such as `tracking.RunRecord`).
        evaluations: evaluation runs, oldest first (`jobs.evaluate.find_evaluations`): each with
            tags `mlflow.parentRunId` (the training run) and `offpg.eval.split`.

    Returns:
        New records (the inputs are not modified), in the order of `runs`.
    """
    latest: dict[str, RunLike] = {}
    for evaluation in evaluations:  # oldest first: a later one replaces an earlier one
        parent = evaluation.tags.get("mlflow.parentRunId")
        if parent and evaluation.tags.get("offpg.eval.split") == "validation":
            latest[parent] = evaluation
    out = []
    for run in runs:
        found = latest.get(run.run_id)
        if found is None:
            out.append(run)
            continue
        extra = {f"{EVAL_PREFIX}{key}": value for key, value in found.metrics.items()}
        out.append(dataclasses.replace(run, metrics={**run.metrics, **extra}))  # type: ignore[type-var]
    return out


def _seed_order(run: RunLike) -> tuple[int, str, str]:
    seed = run.params.get("seed", "")
    return len(seed), seed, run.run_id  # numeric order for non-negative integer seeds


def config_key(params: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The configuration of a run: its params without seed and threads, sorted."""
    return tuple(sorted((k, v) for k, v in params.items() if k not in NOT_CONFIG))


def pick_ope(runs: Sequence[RunLike]) -> str | None:
    """The OPE metric to show: one logged with an interval (`<name>_ci_low`/`_ci_high`) if
    any, in the order of `OPE_PREFERENCE`, else any `ope/` metric."""
    names = {k for run in runs for k in run.metrics if k.startswith("ope/")}
    point = {k for k in names if not k.endswith(("_ci_low", "_ci_high"))}
    with_ci = {k for k in point if f"{k}_ci_low" in names and f"{k}_ci_high" in names}

    def order(key: str) -> tuple[int, str]:
        rank = OPE_PREFERENCE.index(key) if key in OPE_PREFERENCE else len(OPE_PREFERENCE)
        return rank, key

    for pool in (with_ci, point):
        if pool:
            return min(pool, key=order)
    return None


def summarize(
    runs: Sequence[RunLike],
    metric: str,
    *,
    ope: str | None = None,
    lower_is_better: bool = False,
) -> list[GroupSummary]:
    """Group `runs` by configuration and rank the groups by the mean of `metric`.

    Args:
        runs: finished training runs (each with an `estimator` param).
        metric: the metric to rank by, e.g. `online/return_mean` (its latest value per run).
        ope: the OPE metric to show; None picks one with `pick_ope`.
        lower_is_better: rank ascending (for losses).

    Returns:
        The groups, best first.
    """
    ope = ope or pick_ope(runs)
    groups: dict[tuple[tuple[str, str], ...], list[RunLike]] = {}
    for run in runs:
        groups.setdefault(config_key(run.params), []).append(run)
    configs = [dict(key) for key in groups]
    names = sorted({name for config in configs for name in config} - {"estimator"})
    varying = [k for k in names if len({config.get(k) for config in configs}) > 1]
    summaries = []
    for config, members in zip(configs, groups.values(), strict=True):
        members = sorted(members, key=_seed_order)
        values = tuple(r.metrics[metric] for r in members if metric in r.metrics)
        interval = None
        if ope is not None and len(members) == 1:
            low, high = (members[0].metrics.get(f"{ope}_ci_{side}") for side in ("low", "high"))
            if low is not None and high is not None:
                interval = (low, high)
        summaries.append(
            GroupSummary(
                estimator=config.get("estimator", "?"),
                options={k: config.get(k, "-") for k in varying},
                run_ids=tuple(r.run_id for r in members),
                run_names=tuple(r.run_name for r in members),
                seeds=tuple(r.params.get("seed", "?") for r in members),
                metric=Stat.of(values),
                metric_values=values,
                ope=None if ope is None else Stat.of(
                    [r.metrics[ope] for r in members if ope in r.metrics]
                ),
                ope_interval=interval,
                ess=Stat.of([r.metrics[ESS_METRIC] for r in members if ESS_METRIC in r.metrics]),
            )
        )

    def rank(summary: GroupSummary) -> tuple[int, float, str]:
        if summary.metric is None:
            return 1, 0.0, summary.label
        return 0, summary.metric.mean if lower_is_better else -summary.metric.mean, summary.label

    return sorted(summaries, key=rank)


def format_table(groups: Sequence[GroupSummary], metric: str, ope: str | None) -> str:
    """The ranked groups as a plain-text table (mean ± sd over seeds; n runs per group)."""
    header = ["#", "estimator", "options", "n", metric, ope or "ope", "ESS/N"]
    rows = [header]
    for i, group in enumerate(groups, 1):
        if group.ope is None:
            ope_text = "-"
        elif group.ope_interval is not None:
            low, high = group.ope_interval
            ope_text = f"{group.ope.mean:.4g} [{low:.4g}, {high:.4g}]"
        else:
            ope_text = group.ope.text()
        rows.append([
            str(i),
            group.estimator,
            " ".join(f"{k}={v}" for k, v in group.options.items()) or "-",
            str(len(group.run_ids)),
            "-" if group.metric is None else group.metric.text(),
            ope_text,
            "-" if group.ess is None else group.ess.text(),
        ])
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
