"""`offpg sweep`: every estimator × grid cell × seed trained as a child of one parent MLflow run.

`grid_values` reads one `--grid KEY=V1,V2` with the config's own text parser
(`config.parse_value`), `plan` expands the Cartesian product into validated `TrainConfig`s, and
`run_sweep` trains them (`record.train_recorded` for each child, nested under the parent with
the tag `mlflow.parentRunId`) and ranks them (`record.comparison`, plot logged to the parent).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from offpg_offline.config import (
    ConfigError,
    EstimatorName,
    RunConfig,
    TrainConfig,
    parse_value,
)
from offpg_offline.jobs import record


def grid_values(spec: str) -> tuple[str, list[Any]]:
    """`key=v1,v2` → (key, typed values); `none` is None, `hidden` takes sizes like 64x64.

    Raises ValueError naming `--grid` and the key for a malformed spec or value.
    """
    key, sep, text = spec.partition("=")
    key = key.strip().replace("-", "_")
    fields = TrainConfig.__dataclass_fields__
    if not sep or not text:
        raise ValueError(f"--grid takes KEY=V1,V2,..., got {spec!r}")
    if key in ("estimator", "seed"):
        raise ValueError(f"use --{key if key == 'estimator' else 'seeds'} instead of "
                         f"--grid {key}=...")
    if key not in fields:
        raise ValueError(f"--grid {key}: not a [train] setting (one of {', '.join(fields)})")
    try:
        return key, [parse_value(TrainConfig, key, raw.strip()) for raw in text.split(",")]
    except ConfigError as err:
        raise ValueError(f"--grid {key}: {err.problem}") from None


def parse_sweep(estimator: str, seeds: str, grid: Sequence[str]
                ) -> tuple[list[EstimatorName], list[int], list[tuple[str, list[Any]]]]:
    """`--estimator a,b`, `--seeds 0,1,2` and the `--grid` specs → (estimators, seeds, axes).

    Raises ValueError naming the option at fault.
    """
    try:
        estimators = [EstimatorName(e.strip()) for e in estimator.split(",") if e.strip()]
    except ValueError as err:
        raise ValueError(f"--estimator: {err}; choose from "
                         f"{', '.join(e.value for e in EstimatorName)}") from None
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    if not estimators or not seed_list:
        raise ValueError("--estimator and --seeds need at least one value each")
    return estimators, seed_list, [grid_values(spec) for spec in grid]


def plan(base: TrainConfig, estimators: Sequence[EstimatorName], seeds: Sequence[int],
         axes: Sequence[tuple[str, list[Any]]]) -> list[TrainConfig]:
    """One validated config per estimator × grid cell × seed, in that nesting order.

    A value out of range is refused here, before any run starts, naming the option it came from.
    """
    keys = [key for key, _ in axes]
    try:
        return [
            dataclasses.replace(base, estimator=estimator, seed=seed,
                                **dict(zip(keys, cell, strict=True)))
            for estimator in estimators
            for cell in itertools.product(*(values for _, values in axes))
            for seed in seeds
        ]
    except ConfigError as err:
        option = {"seed": "--seeds", "estimator": "--estimator"}.get(err.key)
        option = option or (f"--grid {err.key}:" if err.key in keys else err.flag)
        raise ValueError(f"{option} {err.problem}") from None


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What `run_sweep` did: the parent run, its finished children and their ranking."""

    parent_run_id: str
    experiment: str
    runs: list[Any]
    ope: str | None
    groups: list[Any]
    plot: list[str]


def run_sweep(dataset: Path, base: RunConfig, configs: list[TrainConfig], *, grid: list[str],
              varied: list[str], metric: str, out_dir: Path | None,
              progress: Callable[[str], None]) -> SweepResult:
    """Train `configs` as child runs of one parent run, then rank them by `metric`.

    The parent records the sweep (`sweep.*` params, the base config TOML, the dataset); each
    child is a full recorded run (`record.train_recorded`) with checkpoints in
    `out_dir/RUN_ID` (default `runs/RUN_ID`). `progress` gets one line per child.
    """
    from offpg_offline import tracking
    from offpg_offline import train as train_job
    from offpg_offline.data.store import read_card

    card = read_card(dataset, allow_env_entry_point=base.train.allow_env_entry_point)
    base = record.resolved(base, card)
    configs = [record.resolved(RunConfig(c, base.tracking), card).train for c in configs]
    for config in configs:  # an option an estimator ignores: refused before any run starts
        train_job.surrogate_options(config)
        train_job.check_action_space(config, discrete=record.is_discrete(card))
    name = str(card.get("name", dataset.name))
    estimators = list(dict.fromkeys(c.estimator.value for c in configs))
    seeds = list(dict.fromkeys(str(c.seed) for c in configs))
    child_tracking = dataclasses.replace(base.tracking, run_name=None)
    title = "sweep-" + "+".join(estimators) + "".join(f"-{k}" for k in varied)
    with tracking.MlflowTracker.start(base.tracking, experiment=name, run_name=title,
                                      tags={"offpg.sweep": "true", "dataset": name}) as parent:
        parent.log_params({"sweep.estimators": ",".join(estimators),
                           "sweep.seeds": ",".join(seeds),
                           "sweep.grid": " ".join(grid) or "none",
                           "sweep.runs": len(configs), "sweep.steps": base.train.steps})
        parent.log_text(record.to_toml(base), "config.toml")
        parent.log_dataset(dataset, card)
        for i, train_config in enumerate(configs, 1):
            child_name = record.child_name(train_config, varied)
            progress(f"[{i}/{len(configs)}] {child_name}")
            with tracking.MlflowTracker.start(
                child_tracking, experiment=name, run_name=child_name,
                tags={"mlflow.parentRunId": parent.run_id},
            ) as child:
                record.train_recorded(child, dataset, card, RunConfig(train_config, child_tracking),
                                      (out_dir or Path("runs")) / child.run_id, progress=False)
        runs = tracking.find_runs(parent.client, parent.experiment_id,
                                  parent_run_id=parent.run_id)
        ope, groups, saved = record.comparison(parent.client, name, runs, metric, ope=None,
                                               lower_is_better=False, plot=None,
                                               parent=parent.run_id)
    return SweepResult(parent.run_id, name, runs, ope, groups, saved)
