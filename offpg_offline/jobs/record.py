"""Recorded training runs: one MLflow run per training, from its inputs to its shipped model.

A recorded run logs, in order: the dataset as an input, the resolved config as `config.toml`
(which `to_toml` writes and `config.parse_config` reads back to the same config, `None` values
included), the training itself (`train.train` with the tracker), then the propensity source,
the plots and the shipped policy as a model (`record_run`). `resume_run` continues a killed run
from its last checkpoint with the config it recorded. Also here: run names, and the comparison
plot of `offpg compare` / `offpg sweep`.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from offpg_offline.config import (
    FitConfig,
    Propensity,
    RunConfig,
    TrackingConfig,
    TrainConfig,
    as_params,
    parse_config,
    resolve_auto,
)

# The settings a run name shows (see `run_name`); a sweep adds the other settings it varies.
NAMED_SETTINGS = frozenset({"estimator", "seed", "clip", "clip_mode", "ppo_epsilon", "kl_coef",
                            "self_normalize", "baseline", "init"})


def run_name(config: TrainConfig) -> str:
    """`estimator[-clipC-mode][-ppoE][-klK][-sn][-b-baseline][-bc]-sSEED`, e.g.
    `per-decision-clip3-step-kl2-s0`."""
    parts = [config.estimator.value]
    if config.clip is not None:
        parts.append(f"clip{config.clip:g}-{config.clip_mode.value}")
    if config.ppo_epsilon is not None:
        parts.append(f"ppo{config.ppo_epsilon:g}")
    if config.kl_coef:
        parts.append(f"kl{config.kl_coef:g}")
    if config.self_normalize:
        parts.append("sn")
    if config.baseline.value != "none":
        parts.append(f"b-{config.baseline.value}")
    if config.init.value == "bc":
        parts.append("bc")
    parts.append(f"s{config.seed}")
    return "-".join(parts)


def child_name(config: TrainConfig, varied: list[str]) -> str:
    """The run name of `train`, plus the swept settings it does not already show."""
    params = as_params(config)
    extra = [f"{key}{params[key]}" for key in varied if key not in NAMED_SETTINGS]
    base = run_name(config)
    return "-".join([base.rsplit("-s", 1)[0], *extra, f"s{config.seed}"]) if extra else base


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any, none: str = "none") -> str:
    if value is None:  # TOML has no null; config.coerce_value reads the word back as None
        return f'"{none}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return _toml_string(str(value.value))
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_string(str(value))


def to_toml(run: RunConfig) -> str:
    """The resolved config as TOML, one table per part; `parse_config` reads it back equal."""
    lines = []
    for part in dataclasses.fields(run):
        config = getattr(run, part.name)
        lines.append(f"[{part.name}]")
        for f in dataclasses.fields(config):
            value = _toml_value(getattr(config, f.name), f.metadata.get("none", "none"))
            lines.append(f"{f.name} = {value}")
        lines.append("")
    return "\n".join(lines)


def record_run(tracker: Any, dataset: Path, card: dict[str, Any], config: TrainConfig,
               result: Any) -> None:
    """Complete a training run's record: propensity source, plots, the policy as a model."""
    import numpy as np

    from offpg_offline import plots
    from offpg_offline.data.store import iter_record_batches

    column = "logged_logp" if config.propensity is Propensity.LOGGED else "estimated_logp"
    source = (card.get("propensity") or {}).get(column) or {}
    tracker.set_tags({"propensity.source": str(source.get("source", "unknown"))})
    with tempfile.TemporaryDirectory() as tmp:
        if plots.write_run_plots(Path(tmp), tracker.metric_histories(), result.final_log_weights):
            tracker.log_artifacts(Path(tmp), "plots")
    first = next(iter_record_batches(dataset, ["obs"], batch_size=5)).column("obs")
    example = np.asarray(first.to_pylist(), dtype=np.float32)
    # The shipped policy: the checkpoint chosen by --select-by, else the final one.
    tracker.log_policy_model(result.selected or result.checkpoint, example, step=config.steps)


def train_recorded(tracker: Any, dataset: Path, card: dict[str, Any], run: RunConfig,
                   out_dir: Path, *, progress: bool) -> Any:
    """One recorded training run: dataset input, config TOML, training, then plots and model."""
    from offpg_offline import train as train_job

    tracker.log_dataset(dataset, card)
    tracker.log_text(to_toml(run), "config.toml")
    result = train_job.train(dataset, run.train, tracker=tracker, out_dir=out_dir,
                             progress=progress)
    record_run(tracker, dataset, card, run.train, result)
    return result


def resolved(run: RunConfig, card: dict[str, Any]) -> RunConfig:
    """`run` with the train config's auto fields (estimator, lr, steps, bc_steps) decided by
    the card's action space (`config.resolve_auto`)."""
    return dataclasses.replace(run, train=resolve_auto(run.train,
                                                       discrete_actions=is_discrete(card)))


def is_discrete(card: dict[str, Any]) -> bool:
    """Whether the card's `action_space` is Discrete."""
    from offpg_offline.data.spaces import space_from_json
    from offpg_offline.policies import space_dims

    return space_dims(space_from_json(card["action_space"]))[0] == "discrete"


def train_run(dataset: Path, run: RunConfig, out_dir: Path | None) -> tuple[str | None, Any]:
    """`offpg train`: a new MLflow run in the dataset's experiment; (run id, TrainResult).

    Checkpoints go to `out_dir`, else `runs/RUN_ID`; unsent metrics are kept beside them.
    A torchrun rank other than 0 ($RANK) trains without tracking: (None, TrainResult).
    """
    import os

    from offpg_offline import tracking
    from offpg_offline import train as train_job

    if os.environ.get("RANK", "0") != "0":
        return None, train_job.train(dataset, run.train, out_dir=out_dir)
    from offpg_offline.data.card import verify_parts
    from offpg_offline.data.envspec import check_env_option
    from offpg_offline.data.store import read_card

    card = read_card(dataset, allow_env_entry_point=run.train.allow_env_entry_point)
    run = resolved(run, card)  # the run's name and config.toml show the values used, not auto
    train_job.surrogate_options(run.train)  # an option the estimator ignores: refused, no run
    train_job.check_action_space(run.train, discrete=is_discrete(card))
    check_env_option(run.train.env)
    verify_parts(dataset, card, full_hash=run.train.verify)  # before anything is recorded
    with tracking.MlflowTracker.start(
        run.tracking, experiment=str(card.get("name", dataset.name)), run_name=run_name(run.train)
    ) as tracker:
        tracker.fallback_dir = out_dir or tracker.fallback_dir  # beside the checkpoints
        result = train_recorded(tracker, dataset, card, run,
                                out_dir or Path("runs") / tracker.run_id, progress=True)
    return tracker.run_id, result


def resume_run(dataset: Path, run_id: str, out_dir: Path | None) -> tuple[Path, Any]:
    """`offpg train --resume RUN_ID`: the same run, with the config it recorded, continued from
    its last checkpoint in `out_dir` (default `runs/RUN_ID`); (that checkpoint, TrainResult)."""
    from offpg_offline import tracking
    from offpg_offline import train as train_job
    from offpg_offline.data.store import read_card

    if not run_id.replace("-", "").replace("_", "").isalnum() or not run_id.isascii():
        raise ValueError(f"--resume {run_id!r} is not a run id (letters, digits, '-' and '_' only)")
    text = tracking.run_artifact_text(TrackingConfig(), run_id, "config.toml")
    run = parse_config(text, source=f"run {run_id} config.toml")
    folder = out_dir or Path("runs") / run_id
    checkpoint = train_job.latest_checkpoint(folder)
    if checkpoint is None:
        raise ValueError(
            f"no checkpoint of run {run_id} in {folder}; pass --out-dir where it saved them")
    card = read_card(dataset, allow_env_entry_point=run.train.allow_env_entry_point)
    with tracking.MlflowTracker.start(run.tracking, experiment="", run_name="",
                                      run_id=run_id) as tracker:
        tracker.fallback_dir = folder
        result = train_job.train(dataset, run.train, tracker=tracker, out_dir=folder,
                                 progress=True, resume=checkpoint)
        record_run(tracker, dataset, card, run.train, result)
    return checkpoint, result


def launch_ranks(dataset: Path, run: RunConfig, nproc: int, out_dir: Path | None) -> int:
    """`offpg train --nproc N`: start N ranks of `offpg train` with torchrun, the resolved config
    handed over as a TOML file (rank 0 tracks and saves); returns torchrun's exit status.

    Raises ValueError (naming the option) under torchrun already, or when the batch does not
    split evenly over the ranks.
    """
    import os
    import subprocess

    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise ValueError("--nproc starts torchrun itself; under torchrun, leave it out")
    from offpg_offline.data.store import read_card
    from offpg_offline.training.batches import unit_is_step

    run = resolved(run, read_card(dataset, allow_env_entry_point=run.train.allow_env_entry_point))
    per_step = unit_is_step(run.train)  # the spec's unit (per-step, critic), not a name
    size = run.train.batch_steps if per_step else run.train.batch_episodes
    if size % nproc:
        option = "--batch-steps" if per_step else "--batch-episodes"
        raise ValueError(f"{option} {size} cannot be split evenly over {nproc} processes")
    from offpg_offline.distributed import torchrun_command

    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.toml"
        config_path.write_text(to_toml(run))
        args = [str(dataset), "--config", str(config_path)]
        if out_dir is not None:
            args += ["--out-dir", str(out_dir)]
        return subprocess.call(torchrun_command(nproc, args))


def fit_run(dataset: Path, config: FitConfig, *, out: Path | None, in_place: bool,
            experiment: str | None, track: bool,
            progress: Callable[[str], None]) -> tuple[str | None, Any]:
    """`offpg behavior fit`: `behavior.fit.fit_behavior`, recorded as an MLflow run when
    `track` (params `behavior.*`, the dataset as input, metrics, the report's artifacts).

    Returns (the run id or None, the FitReport).
    """
    from offpg_offline.behavior.fit import fit_behavior
    from offpg_offline.data.store import read_card

    card = read_card(dataset)

    def job(run_id: str | None) -> Any:
        return fit_behavior(dataset, out=out, in_place=in_place, config=config,
                            mlflow_run_id=run_id, progress=progress)

    if not track:
        return None, job(None)
    from offpg_offline import tracking

    with tracking.MlflowTracker.start(
        TrackingConfig(experiment=experiment), experiment=str(card.get("name", dataset.name)),
        run_name=f"behavior-fit-{config.model}-k{config.folds}-s{config.seed}",
        tags={"offpg.job": "behavior"},
    ) as tracker:
        tracker.log_params(config.as_params())
        tracker.log_dataset(dataset, card, context="behavior")
        report = job(tracker.run_id)
        tracker.log_metrics(report.metrics, step=0)
        for path in report.artifacts.values():
            tracker.log_artifact(path, "behavior")
    return tracker.run_id, report


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def comparison(client: Any, experiment: str, runs: list[Any], metric: str, *,
               ope: str | None, lower_is_better: bool, plot: Path | None,
               parent: str | None) -> tuple[str | None, list[Any], list[str]]:
    """Rank `runs` by `metric` (mean ± sd over seeds per configuration) and save the plot.

    The plot is logged to run `parent` (artifact `compare/…`) when given, and written to `plot`
    (default `compare-EXPERIMENT.png` when there is no parent). Returns (the OPE metric shown,
    the ranked groups, where the plot went).
    """
    from offpg_offline import compare as ranking
    from offpg_offline import plots, tracking

    ope = ope or ranking.pick_ope(runs)
    groups = ranking.summarize(runs, metric, ope=ope, lower_is_better=lower_is_better)
    saved = []
    with tempfile.TemporaryDirectory() as tmp:
        figure = Path(tmp) / f"compare_{_safe(metric)}.png"
        plots.comparison([g.label for g in groups], [list(g.metric_values) for g in groups],
                         metric, figure)
        if parent is not None:
            tracking.log_file(client, parent, figure, "compare")
            saved.append(f"run {parent} (artifact compare/{figure.name})")
        if plot is not None or parent is None:
            target = plot or Path(f"compare-{_safe(experiment)}.png")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(figure.read_bytes())
            saved.append(str(target))
    return ope, groups, saved


def compared_runs(experiment: str | None, sweep_run: str | None, metric: str,
                  ope: str | None) -> tuple[Any, str, str, list[Any], str | None]:
    """The finished training runs `offpg compare` ranks: (client, experiment id, experiment
    name, runs, the parent run the plot goes to or None).

    `eval:KEY` metrics attach each run's latest evaluation on its own validation split
    (`compare.attach_evaluations`). Raises ValueError (one sentence) when there is none.
    """
    from offpg_offline import tracking

    client = tracking.open_client(TrackingConfig())
    experiment_id, name = tracking.find_experiment(client, experiment)
    runs: list[Any] = tracking.find_runs(client, experiment_id, parent_run_id=sweep_run)
    if any(m and m.startswith("eval:") for m in (metric, ope)):  # evaluate's nested runs
        from offpg_offline.compare import attach_evaluations
        from offpg_offline.jobs.evaluate import find_evaluations

        runs = attach_evaluations(runs, find_evaluations(client, experiment_id))
    if not runs:
        where = f"sweep {sweep_run}" if sweep_run else f"experiment {name}"
        raise ValueError(f"no finished training runs in {where}")
    parents = {run.tags.get("mlflow.parentRunId") for run in runs}
    parent = sweep_run or (parents.pop() if len(parents) == 1 else None)
    return client, experiment_id, name, runs, parent


def comparison_text(experiment: str, experiment_id: str, runs: list[Any], metric: str,
                    ope: str | None, groups: list[Any], saved: list[str], *,
                    lower_is_better: bool, as_json: bool) -> str:
    """What `offpg compare` / `offpg sweep` print: the ranked table and where the plot went
    (or one JSON object)."""
    import json

    from offpg_offline import compare as ranking

    if as_json:
        return json.dumps({"experiment": experiment, "experiment_id": experiment_id,
                           "metric": metric, "ope": ope, "plot": saved,
                           "groups": [g.as_dict() for g in groups]}, indent=2)
    return "\n".join([
        f"experiment {experiment} ({len(runs)} runs in {len(groups)} configurations; "
        f"mean ± sd over seeds; ranked by {metric}, "
        f"{'lower' if lower_is_better else 'higher'} is better)",
        ranking.format_table(groups, metric, ope),
        f"plot: {'; '.join(saved)}"])


def run_summary(run_id: str, run: RunConfig, result: Any) -> str:
    """What `offpg train` prints after a run: its headline metrics, checkpoint, how to view."""
    from offpg_offline import tracking

    if getattr(result, "config", None) is not None:  # the estimator, lr, ... actually used
        run = dataclasses.replace(run, train=result.config)
    summary = [f"run {run_id} ({run_name(run.train)})"]
    for key in ("bc/return_mean", "bc/greedy_return_mean", "online/return_mean",
                "online/greedy_return_mean", "ope/pdis_validation", "weights/ess_fraction"):
        if key in result.metrics:
            summary.append(f"{key} {result.metrics[key]:.4g}")
    if getattr(result, "online_skipped", None):
        summary.append(f"online evaluation skipped: {result.online_skipped}")
    uri = tracking.resolve_uri(run.tracking)
    return "\n".join(["; ".join(summary), f"checkpoint: {result.checkpoint}",
                      deploy_advice(result.metrics, run.train.estimator),
                      f"view: offpg ui  (or: mlflow ui --backend-store-uri {uri})"])


def deploy_advice(metrics: Mapping[str, float], estimator: Any = None) -> str:
    """Which of the trained policy's two forms to deploy: the greedy one (`policy.mode`). In
    scripts/bench_quality.py (default, 3 seeds) its mean return was at least the stochastic
    policy's on every shipped log: with per-step far above it on the LunarLander logs (145 vs
    96 on lander-eps), since the KL penalty keeps π_θ's spread near the logger's and samples
    carry the logger's noise; with greedy-critic (σ frozen at half the clone's) closer
    (lander-clipped 284 vs 241). This run's own online returns are quoted when it has them."""
    spread = ("its σ is frozen at half the behavior clone's (greedy-critic), so sampling adds "
              "half the logger's noise"
              if str(getattr(estimator, "value", estimator)) == "greedy-critic" else
              "its spread stays near the logger's (KL penalty), so sampling adds the logger's "
              "noise")
    advice = ("deploy: the greedy policy (policy.mode(obs), `offpg evaluate --online N` reports "
              f"it as greedy); {spread}")
    greedy, stochastic = (metrics.get(f"online/{k}return_mean") for k in ("greedy_", ""))
    if greedy is None or stochastic is None:
        return advice
    here = "greedy higher" if greedy >= stochastic else "stochastic higher in this run"
    return f"{advice} (here {greedy:.4g} greedy vs {stochastic:.4g} stochastic: {here})"
