"""`offpg` command line. Parses, composes, reports; the work happens in the job functions.

Heavy modules (torch, pyarrow, mlflow, minari) are imported inside the commands, so
`offpg --help` stays fast. The options of `train` (and of every job with a config dataclass)
are generated from the config's fields by `config_options`: one option per field, its help and
default taken from the field. User errors print one line and exit with code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from offpg_offline.cli_options import OneLineErrors, config_options, print_error
from offpg_offline.config import (
    SELECT_ESTIMATORS,
    ConfigError,
    EvaluateConfig,
    FitConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
    check_output_folder,
    flag_of,
    load_config,
)
from offpg_offline.jobs import record
from offpg_offline.jobs import sweep as sweeps

app = typer.Typer(
    cls=OneLineErrors,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train and evaluate policies from logged trajectories by off-policy policy gradient.",
)
ingest_app = typer.Typer(
    no_args_is_help=True, help="Convert a log into the canonical Parquet format."
)
behavior_app = typer.Typer(no_args_is_help=True, help="Estimate the behavior policy π_β.")
app.add_typer(ingest_app, name="ingest")
app.add_typer(behavior_app, name="behavior")


def fail(message: str) -> NoReturn:
    """Print one line on stderr and exit with code 2 (user error, no traceback)."""
    print_error(message)
    raise typer.Exit(code=2)


@contextlib.contextmanager
def _refused(*errors: type[BaseException]) -> Iterator[None]:
    """Errors of these kinds (default ValueError, FileNotFoundError) raised by the body are
    the user's: print them on one line and exit 2."""
    caught = errors or (ValueError, FileNotFoundError)
    try:
        yield
    except caught as err:
        fail(str(err))


def _resolve(config: Path | None, train_options: dict[str, Any],
             tracking_options: dict[str, Any]) -> RunConfig:
    """The TOML file (or defaults) with the given options on top; errors name the option."""
    with _refused(ValueError):
        run = load_config(config) if config else RunConfig()
    try:
        return dataclasses.replace(
            run, train=dataclasses.replace(run.train, **train_options),
            tracking=dataclasses.replace(run.tracking, **tracking_options))
    except ConfigError as err:
        given = err.key in train_options or err.key in tracking_options
        fail(err.as_option() if given or config is None else f"{config}: {err}")


def _check_paths(dataset: Path, out_dir: Path | None, option: str = "--out-dir") -> None:
    """Refuse, before any work, a DATASET that is not a dataset folder and an output folder
    that is a file or not writable."""
    from offpg_offline.data.store import is_dataset

    if not is_dataset(dataset):
        fail(f"{dataset} is not a dataset folder (no _dataset.json); make one with `offpg ingest`")
    if out_dir is not None:
        with _refused(ValueError):
            check_output_folder(out_dir, option)


# --- data commands (ingest minari, ingest parquet, info) ---


@contextlib.contextmanager
def _progress_bar(quiet: bool) -> Iterator[Callable[[int, int | None], None]]:
    """A transient rows-written bar on a terminal's stderr; yields `advance(rows, total)`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(stderr=True)
    with Progress(TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                  console=console, transient=True,
                  disable=quiet or not console.is_terminal) as bar:
        task = bar.add_task("ingest", total=None)
        yield lambda rows, total: bar.update(task, total=total, advance=rows)


def _report_ingest(result: Any) -> None:
    """Our warnings (yellow, stderr), then the written dataset's one-line summary."""
    for warning in result.warnings:
        typer.secho(f"warning: {warning}", err=True, fg="yellow")
    typer.echo(result.summary())


@ingest_app.command("minari")
def ingest_minari_command(
    dataset: Annotated[str, typer.Argument(help="Minari dataset id (local store) or folder.")],
    out: Annotated[Path, typer.Option(help="Output dataset folder.")],
    download: Annotated[bool, typer.Option(help="Download the id first (needs network).")] = False,
    propensity_key: Annotated[str | None, typer.Option(
        help="Info key holding π_β(a|s) (nested: a/b); default: a recognised name.")] = None,
    propensity_kind: Annotated[str | None, typer.Option(
        help="prob or logp; default: from the key's name.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset at --out.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Convert a Minari dataset (arrow or hdf5) into the canonical Parquet format."""
    from offpg_offline.jobs import ingest

    with _progress_bar(quiet) as advance:
        with _refused(ValueError, OSError):
            result = ingest.ingest_minari_dataset(
                dataset, out, download=download, propensity_key=propensity_key,
                propensity_kind=propensity_kind, overwrite=overwrite, progress=advance)
    _report_ingest(result)


@ingest_app.command("parquet")
def ingest_parquet_command(
    paths: Annotated[list[Path], typer.Argument(
        help="Parquet or CSV step logs (one row per step), or folders of them.")],
    out: Annotated[Path, typer.Option(help="Output dataset folder.")],
    map_: Annotated[list[str] | None, typer.Option(
        "--map", help="KEY=COLUMN, repeatable; KEY is episode_id, step, obs, action, reward, "
                      "next_obs, terminated, truncated or done.")] = None,
    mapping: Annotated[Path | None, typer.Option(
        help="TOML file with the same keys, plus obs_cols, propensity_col, ...")] = None,
    obs_cols: Annotated[list[str] | None, typer.Option(
        help="Glob of scalar columns forming obs, in file order (e.g. 'x_*'); repeatable.")] = None,
    next_obs_cols: Annotated[list[str] | None, typer.Option(
        help="Glob of scalar columns forming next_obs.")] = None,
    action_cols: Annotated[list[str] | None, typer.Option(
        help="Glob of scalar columns forming a continuous action vector.")] = None,
    propensity_col: Annotated[str | None, typer.Option(
        help="Column with the behavior policy's propensity of the logged action.")] = None,
    propensity_kind: Annotated[str | None, typer.Option(
        help="prob (probabilities) or logp (log-probabilities / log-densities).")] = None,
    done_means: Annotated[str | None, typer.Option(
        help="What a 'done' column means: terminated (default) or truncated.")] = None,
    action_space: Annotated[str | None, typer.Option(
        help="discrete:N, box:LOW:HIGH:DIM or space JSON; default: inferred.")] = None,
    env: Annotated[str | None, typer.Option(
        help="Gymnasium env id (or EnvSpec JSON, or a .json file of it) recorded in the card "
             "and built for online evaluation.")] = None,
    env_kwargs: Annotated[list[str] | None, typer.Option(
        help="KEY=VALUE argument of the --env constructor (JSON value, e.g. continuous=true); "
             "repeatable.")] = None,
    name: Annotated[str | None, typer.Option(help="Dataset name (default: folder name).")] = None,
    description: Annotated[str | None, typer.Option(help="Free text for the card.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset at --out.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    bandit: Annotated[bool, typer.Option(
        help="One decision per row: each row a one-step episode that terminates (episode id = "
             "row); no episode id, done flags or next_obs needed.")] = False,
    categorical_cols: Annotated[list[str] | None, typer.Option(
        help="Glob of string/integer columns one-hot encoded into obs (vocabulary in the card, "
             "plus an unknown slot); repeatable.")] = None,
    categories_from: Annotated[Path | None, typer.Option(
        help="Encode --categorical-cols with the vocabulary of this earlier dataset.")] = None,
    actions: Annotated[str, typer.Option(
        help="executed: the actions the env received; unclipped: the raw samples (and their "
             "densities) of a policy whose actions were clipped to the env's bounds, which the "
             "card keeps for rollouts.")] = "executed",
) -> None:
    """Convert foreign Parquet/CSV step logs into the canonical Parquet format."""
    from offpg_offline.jobs import ingest

    options = ingest.ParquetOptions(
        map=map_ or (), mapping=mapping, obs_cols=obs_cols or (), next_obs_cols=next_obs_cols or (),
        action_cols=action_cols or (), propensity_col=propensity_col,
        propensity_kind=propensity_kind, done_means=done_means, action_space=action_space,
        env=env, env_kwargs=env_kwargs or (), name=name, description=description,
        overwrite=overwrite, bandit=bandit, categorical_cols=categorical_cols or (),
        categories_from=categories_from, actions=actions)
    with _progress_bar(quiet) as advance:
        with _refused(ValueError, OSError):
            result = ingest.ingest_parquet_files(paths, out, options, progress=advance)
    _report_ingest(result)


ingest_app.command("csv", help="Convert foreign CSV (or Parquet) step logs into the canonical "
                               "Parquet format (the same command as `ingest parquet`).")(
    ingest_parquet_command)


@app.command()
def info(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (offpg ingest output).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    verify: Annotated[bool, typer.Option(
        help="Recompute each shard's sha256 and row count against the card.")] = False,
) -> None:
    """Counts, spaces, episode statistics, propensities and provenance of DATASET."""
    import json

    from offpg_offline.data.info import format_info
    from offpg_offline.jobs.ingest import dataset_report

    with _refused(ValueError, OSError):
        result, problem = dataset_report(dataset, verify=verify)
    typer.echo(json.dumps(result, indent=2) if as_json else format_info(result))
    if problem is not None:
        fail(problem)


# --- train command ---


@app.command()
@config_options(TrackingConfig, into="tracking_options", panel="Tracking")
@config_options(TrainConfig, into="train_options", panel="Training")
def train(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (offpg ingest output).")],
    config: Annotated[Path | None, typer.Option(
        help="TOML run config (\\[train] and \\[tracking] tables); options override it.")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        help="Checkpoint folder (default: runs/RUN_ID).")] = None,
    resume: Annotated[str | None, typer.Option(
        help="Continue run RUN_ID from its last checkpoint, with its configuration.")] = None,
    nproc: Annotated[int, typer.Option(
        help="Data-parallel processes on this machine, via torchrun (gloo on CPU, nccl on GPU)."
    )] = 1,
    *,
    train_options: dict[str, Any],
    tracking_options: dict[str, Any],
) -> None:
    """Train a target policy on DATASET and record the run in MLflow."""
    if resume is not None:
        given = [*(flag_of(TrainConfig, key) for key in train_options),
                 *(flag_of(TrackingConfig, key) for key in tracking_options),
                 *(["--config"] if config else [])]
        _resume(dataset, resume, out_dir, given)
        return
    run = _resolve(config, train_options, tracking_options)
    if nproc < 1:
        fail(f"--nproc must be at least 1, got {nproc}")
    _check_paths(dataset, out_dir)
    if nproc > 1:  # N ranks of this command under torchrun; exit with torchrun's status
        with _refused(ValueError):
            code = record.launch_ranks(dataset, run, nproc, out_dir)
        if code:
            fail(f"torchrun exited with status {code} (see the rank messages above)")
        raise typer.Exit(0)
    with _refused():
        run_id, result = record.train_run(dataset, run, out_dir)
    if run_id is not None:  # None: a torchrun rank other than 0 (no tracking, no output)
        typer.echo(record.run_summary(run_id, run, result))


def _resume(dataset: Path, run_id: str, out_dir: Path | None, given: list[str]) -> None:
    """`offpg train DATASET --resume RUN_ID`: same run, same config, from the last checkpoint."""
    if given:
        fail(f"--resume takes the run's own configuration; drop {given[0]}")
    with _refused():
        checkpoint, result = record.resume_run(dataset, run_id, out_dir)
    typer.echo(f"run {run_id} resumed from {checkpoint.name}; "
               f"online/return_mean {result.metrics.get('online/return_mean', float('nan')):.4g}")
    typer.echo(f"checkpoint: {result.checkpoint}")


# --- behavior commands ---


@behavior_app.command("fit")
@config_options(FitConfig, into="fit_options", panel="Behavior model")
def behavior_fit(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (offpg ingest output).")],
    out: Annotated[Path | None, typer.Option(help="New dataset folder to write.")] = None,
    in_place: Annotated[bool, typer.Option(help="Replace DATASET atomically instead.")] = False,
    track: Annotated[bool, typer.Option(help="Record the fit as an MLflow run.")] = True,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment name.")] = None,
    *,
    fit_options: dict[str, Any],
) -> None:
    """Estimate π_β on DATASET (cross-fitted) and write `estimated_logp` into a new version."""
    if (out is None) == (not in_place):
        fail("pass exactly one of --out NEW_DATASET or --in-place")
    try:
        config = FitConfig(**fit_options)
    except ConfigError as err:
        fail(err.as_option())
    _check_paths(dataset, out, "--out")
    with _refused():
        run_id, report = record.fit_run(dataset, config, out=out, in_place=in_place,
                                        experiment=experiment, track=track, progress=typer.echo)
    if run_id is not None:
        typer.echo(f"MLflow run {run_id}")
    typer.echo(report.summary())


# --- evaluate command ---

_OPE_NAMES = SELECT_ESTIMATORS  # the one OPE name list; == ope.ESTIMATE_NAMES (tested)


@app.command()
@config_options(EvaluateConfig, into="evaluate_options", panel="Evaluation")
def evaluate(
    target: Annotated[str | None, typer.Argument(
        help="MLflow run id, a training output folder, or a checkpoint file (.pt).")] = None,
    dataset: Annotated[Path | None, typer.Option(
        help="Evaluate on every episode of this dataset (default: the run's validation split).")
    ] = None,
    policy: Annotated[str | None, typer.Option(
        help="Instead of TARGET: 'uniform', a checkpoint (.pt), or a Parquet file with "
             "episode_id, step and a list column action_probs aligned with the dataset's rows.")
    ] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object (no table, no progress lines).")] = False,
    *,
    evaluate_options: dict[str, Any],
) -> None:
    """Estimate the value of a policy off-policy (and online), with intervals and γ shown.

    A run's evaluation is logged as a nested MLflow run under it (its metrics are untouched).
    """
    names = evaluate_options.get("estimators", _OPE_NAMES)
    unknown = sorted(set(names) - set(_OPE_NAMES))
    if unknown or not names:
        fail(f"--estimators: unknown {', '.join(unknown) or '(empty)'}; "
             f"choose from {','.join(_OPE_NAMES)}")
    try:
        config = EvaluateConfig(**evaluate_options)
    except ValueError as err:  # a ConfigError names the option
        fail(err.as_option() if isinstance(err, ConfigError) else str(err))

    from offpg_offline.jobs import evaluate as job
    from offpg_offline.jobs.evaluate import show_evaluation

    def progress(line: str) -> None:
        typer.echo(line, err=True)

    with _refused():
        result = job.evaluate(target, dataset=dataset, policy=policy, config=config,
                              progress=None if as_json else progress)
    if as_json:
        import json

        typer.echo(json.dumps(result.as_json(), indent=2, allow_nan=False))
        return
    typer.echo(show_evaluation(result))


# --- compare / ui / sweep commands ---


@app.command()
@config_options(TrackingConfig, into="tracking_options", panel="Tracking",
                exclude=frozenset({"run_name"}))
@config_options(TrainConfig, into="train_options", panel="Training (every run)",
                exclude=frozenset({"estimator", "seed"}))
def sweep(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (offpg ingest output).")],
    estimator: Annotated[str, typer.Option(
        help="Comma-separated estimators to sweep.")] = "per-step,per-decision",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1,2",
    grid: Annotated[list[str] | None, typer.Option(
        help="KEY=V1,V2 over a train setting (e.g. lr=1e-3,1e-2, clip=2,none); repeatable "
             "(Cartesian product). A single value just sets it.")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML run config all runs start from.")
                      ] = None,
    metric: Annotated[str, typer.Option(help="Metric ranking the summary.")
                      ] = "online/return_mean",
    out_dir: Annotated[Path | None, typer.Option(
        help="Checkpoint folder (one sub-folder per run).")] = None,
    *,
    train_options: dict[str, Any],
    tracking_options: dict[str, Any],
) -> None:
    """Train every estimator × grid cell × seed as child runs of one parent MLflow run.

    The training options set every run (a --grid over the same key wins)."""
    with _refused(ValueError):
        estimators, seed_list, axes = sweeps.parse_sweep(estimator, seeds, grid or [])
    varied = [key for key, values in axes if len(values) > 1]
    base = _resolve(config, train_options, tracking_options)
    with _refused(ValueError):
        configs = sweeps.plan(base.train, estimators, seed_list, axes)
    _check_paths(dataset, out_dir)
    with _refused():
        result = sweeps.run_sweep(dataset, base, configs, grid=grid or [], varied=varied,
                                  metric=metric, out_dir=out_dir, progress=typer.echo)
    typer.echo(f"sweep {result.parent_run_id}: {len(result.runs)} child runs")
    typer.echo(record.comparison_text(result.experiment, "", result.runs, metric, result.ope,
                                      result.groups, result.plot, lower_is_better=False,
                                      as_json=False))


@app.command("compare")
def compare_command(
    experiment: Annotated[str | None, typer.Argument(
        help="Experiment name (default: the one with the latest run).")] = None,
    metric: Annotated[str, typer.Option(
        help="Metric to rank by (its final value); eval:KEY (e.g. eval:ope/wdr) takes it from "
             "the run's latest `offpg evaluate` on its validation split.")
    ] = "online/return_mean",
    sweep_run: Annotated[str | None, typer.Option(
        "--sweep", help="Only the child runs of this sweep (its parent run id).")] = None,
    ope: Annotated[str | None, typer.Option(
        help="OPE metric to show (default: one logged with an interval, e.g. ope/wdr).")] = None,
    plot: Annotated[Path | None, typer.Option(help="Also save the comparison plot here (PNG).")
                    ] = None,
    lower_is_better: Annotated[bool, typer.Option(help="Rank ascending (losses).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Rank the finished training runs of an experiment: mean ± sd over seeds per config.

    The plot goes to the sweep's parent run when the runs share one, else to a PNG file.
    """
    with _refused(ValueError):
        client, experiment_id, name, runs, parent = record.compared_runs(
            experiment, sweep_run, metric, ope)
    ope, groups, saved = record.comparison(client, name, runs, metric, ope=ope,
                                           lower_is_better=lower_is_better, plot=plot,
                                           parent=parent)
    typer.echo(record.comparison_text(name, experiment_id, runs, metric, ope, groups, saved,
                                      lower_is_better=lower_is_better, as_json=as_json))


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port of the UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to listen on (local only by default).")
                    ] = "127.0.0.1",
    experiment: Annotated[str | None, typer.Option(
        help="Experiment whose runs page to print (default: the one with the latest run).")
    ] = None,
) -> None:
    """Serve the MLflow UI for the project's store ($MLFLOW_TRACKING_URI or ./mlflow.db)."""
    from offpg_offline import tracking
    from offpg_offline.jobs import ui as job

    with _refused(ValueError):
        uri, experiment_id = job.ui_store(experiment)
        if job.is_server(uri):
            typer.echo(f"{uri} is a tracking server with its own UI: "
                       f"{tracking.experiment_url(uri, experiment_id)}")
            return
        job.check_port(host, port)
        job.run_server(uri, experiment_id, host=host, port=port, progress=typer.echo)


# --- upload-metrics command (reliability: a tracking server that went away) ---


@app.command("upload-metrics")
def upload_metrics(
    run_dir: Annotated[Path, typer.Argument(
        help="The run's folder (runs/RUN_ID or its --out-dir) holding unsent-metrics.jsonl.")],
    tracking_uri: Annotated[str | None, typer.Option(
        help="Tracking server (default: $MLFLOW_TRACKING_URI, else the run's own).")] = None,
) -> None:
    """Send what a run kept locally when its tracking server stopped answering."""
    from offpg_offline import tracking

    with _refused(ValueError, OSError, tracking.MlflowException):
        run_id, sent = tracking.upload_unsent(run_dir, tracking_uri)
    typer.echo(f"run {run_id}: sent {sent} metric values and the records kept in {run_dir}")


def main() -> None:
    """Console-script entry point."""
    app()
