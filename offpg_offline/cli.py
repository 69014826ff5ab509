"""`offpg` command line. Parses, composes, reports; the work happens in the job functions.

Heavy modules (torch, pyarrow, mlflow, minari) are imported inside the commands, so
`offpg --help` stays fast. The options of `train` (and of every job with a config dataclass)
are generated from the config's fields by `config_options`: one option per field, its help and
default taken from the field. User errors print one line and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from offpg_offline.cli_options import OneLineErrors, config_options, print_error
from offpg_offline.config import (
    SELECT_ESTIMATORS,
    ConfigError,
    EstimatorName,
    FitConfig,
    Propensity,
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


def _resolve(config: Path | None, train_options: dict[str, Any],
             tracking_options: dict[str, Any]) -> RunConfig:
    """The TOML file (or defaults) with the given options on top; errors name the option."""
    try:
        run = load_config(config) if config else RunConfig()
    except ValueError as err:
        fail(str(err))
    try:
        return dataclasses.replace(
            run, train=dataclasses.replace(run.train, **train_options),
            tracking=dataclasses.replace(run.tracking, **tracking_options))
    except ConfigError as err:
        given = err.key in train_options or err.key in tracking_options
        fail(err.as_option() if given or config is None else f"{config}: {err}")


def _check_output(out_dir: Path | None, option: str = "--out-dir") -> None:
    """Refuse an output folder that is a file or not writable, before any work."""
    if out_dir is not None:
        try:
            check_output_folder(out_dir, option)
        except ValueError as err:
            fail(str(err))


def _has_card(folder: Path) -> bool:
    """Whether `folder` is a dataset folder (its card is `store.card_path(folder)`)."""
    from offpg_offline.data.store import is_dataset

    return is_dataset(folder)


# --- data commands (ingest minari, ingest parquet, info) ---


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
    import warnings

    from rich.console import Console
    from rich.progress import Progress, TextColumn

    from offpg_offline.data.minari import ingest_minari
    from offpg_offline.data.store import read_card

    console = Console(stderr=True)
    with warnings.catch_warnings(record=True) as caught, Progress(
            TextColumn("ingest {task.completed:,} steps"), console=console, transient=True,
            disable=quiet or not console.is_terminal) as bar:
        warnings.simplefilter("always")
        task = bar.add_task("ingest", total=None)
        try:
            path = ingest_minari(dataset, out, download=download, propensity_key=propensity_key,
                                 propensity_kind=propensity_kind, overwrite=overwrite,
                                 progress=lambda rows: bar.advance(task, rows))
        except (ValueError, FileNotFoundError, OSError) as err:  # DataError is a ValueError
            fail(str(err))
    for warning in caught:  # ours only; minari's own warnings are about its metadata
        if str(warning.message).startswith("Minari dataset"):
            typer.secho(f"warning: {warning.message}", err=True, fg="yellow")
    card = read_card(path)
    logged = card["propensity"]["logged_logp"]
    typer.echo(f"wrote {path}: {card['counts']['episodes']} episodes, {card['counts']['steps']} "
               f"steps; logged_logp: {logged['source'] if logged else 'none (no propensity)'}")


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
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from offpg_offline.data import parquet

    try:
        cli_mapping = parquet.ColumnMapping(
            columns=parquet.parse_map(map_ or []), obs_cols=tuple(obs_cols or ()),
            next_obs_cols=tuple(next_obs_cols or ()), action_cols=tuple(action_cols or ()),
            propensity_col=propensity_col, propensity_kind=propensity_kind,
            done_means=done_means, categorical_cols=tuple(categorical_cols or ()))
        column_mapping = (parquet.merge_mappings(parquet.load_mapping(mapping), cli_mapping)
                          if mapping else cli_mapping)
        space = parquet.parse_action_space(action_space) if action_space else None
        from offpg_offline.data.envspec import parse_env_kwargs

        kwargs = parse_env_kwargs(env_kwargs or [])
        files = parquet.input_files(paths)
        console = Console(stderr=True)
        with Progress(TextColumn("ingest"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("steps"), console=console, transient=True,
                      disable=quiet or not console.is_terminal) as bar:
            task = bar.add_task("ingest", total=parquet.count_rows(files))
            result = parquet.ingest_parquet(
                files, out, mapping=column_mapping, action_space=space, env_id=env, name=name,
                description=description, overwrite=overwrite,
                progress=lambda rows: bar.advance(task, rows), bandit=bandit,
                categories_from=categories_from, env_kwargs=kwargs, actions=actions)
    except (ValueError, FileNotFoundError, OSError) as err:  # DataError is a ValueError
        fail(str(err))
    for warning in result.warnings:
        typer.secho(f"warning: {warning}", err=True, fg="yellow")
    card = result.card
    logged = card["propensity"]["logged_logp"]
    typer.echo(f"wrote {result.path}: {card['counts']['episodes']} episodes, "
               f"{card['counts']['steps']} steps in {len(card['files'])} file(s); logged_logp: "
               f"{logged['source'] if logged else 'none (no propensity)'}")


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

    from offpg_offline.data.info import dataset_info, format_info

    try:
        result = dataset_info(dataset, verify=verify)
    except (ValueError, FileNotFoundError, OSError) as err:
        fail(str(err))
    typer.echo(json.dumps(result, indent=2) if as_json else format_info(result))
    if result["verify"] is not None and not result["verify"]["ok"]:
        problems = result["verify"]["problems"]
        fail(f"{dataset}: --verify found {len(problems)} problem(s), the first: {problems[0]}")


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
    if not _has_card(dataset):
        fail(f"{dataset} is not a dataset folder (no _dataset.json); make one with `offpg ingest`")
    if nproc < 1:
        fail(f"--nproc must be at least 1, got {nproc}")
    _check_output(out_dir)
    if nproc > 1:
        _launch_torchrun(dataset, run, nproc, out_dir)

    import os

    if os.environ.get("RANK", "0") != "0":  # a torchrun rank other than 0: no tracking, no output
        from offpg_offline import train as train_job  # torch loads only here

        try:
            train_job.train(dataset, run.train, out_dir=out_dir)
        except (ValueError, FileNotFoundError) as err:
            fail(str(err))
        return
    try:
        run_id, result = record.train_run(dataset, run, out_dir)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    from offpg_offline import tracking

    summary = [f"run {run_id} ({record.run_name(run.train)})"]
    for key in ("bc/return_mean", "online/return_mean", "online/greedy_return_mean",
                "ope/pdis_validation", "weights/ess_fraction"):
        if key in result.metrics:
            summary.append(f"{key} {result.metrics[key]:.4g}")
    if getattr(result, "online_skipped", None):
        summary.append(f"online evaluation skipped: {result.online_skipped}")
    typer.echo("; ".join(summary))
    typer.echo(f"checkpoint: {result.checkpoint}")
    uri = tracking.resolve_uri(run.tracking)
    typer.echo(f"view: offpg ui  (or: mlflow ui --backend-store-uri {uri})")


def _launch_torchrun(dataset: Path, run: RunConfig, nproc: int, out_dir: Path | None) -> NoReturn:
    """`--nproc N`: N ranks of this command under torchrun; exits with torchrun's status."""
    try:
        code = record.launch_ranks(dataset, run, nproc, out_dir)
    except ValueError as err:
        fail(str(err))
    if code:
        fail(f"torchrun exited with status {code} (see the rank messages above)")
    raise typer.Exit(0)


def _resume(dataset: Path, run_id: str, out_dir: Path | None, given: list[str]) -> None:
    """`offpg train DATASET --resume RUN_ID`: same run, same config, from the last checkpoint."""
    if given:
        fail(f"--resume takes the run's own configuration; drop {given[0]}")
    if not run_id.replace("-", "").replace("_", "").isalnum() or not run_id.isascii():
        fail(f"--resume {run_id!r} is not a run id (letters, digits, '-' and '_' only)")
    try:
        checkpoint, result = record.resume_run(dataset, run_id, out_dir)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
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
    if not _has_card(dataset):
        fail(f"{dataset} is not a dataset folder (no _dataset.json); make one with `offpg ingest`")
    _check_output(out, "--out")
    try:
        run_id, report = record.fit_run(dataset, config, out=out, in_place=in_place,
                                        experiment=experiment, track=track, progress=typer.echo)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    if run_id is not None:
        typer.echo(f"MLflow run {run_id}")
    typer.echo(report.summary())


# --- evaluate command ---

_OPE_NAMES = SELECT_ESTIMATORS  # the one OPE name list; == ope.ESTIMATE_NAMES (tested)


@app.command()
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
    checkpoint: Annotated[str, typer.Option(
        help="Which checkpoint of a run or folder: shipped (selected.pt when selection ran, "
             "else final.pt), final, selected or step-N.")] = "shipped",
    split: Annotated[str | None, typer.Option(
        help="validation: the episodes the run held out (the ids it recorded); all: every "
             "episode (default: validation, or all with --dataset).")] = None,
    online: Annotated[int, typer.Option(
        help="Also roll out N seeded episodes when the env can be built (0: none).")] = 0,
    estimators: Annotated[str, typer.Option(
        help=f"Comma-separated subset of {','.join(_OPE_NAMES)}.")] = ",".join(_OPE_NAMES),
    gamma: Annotated[float | None, typer.Option(
        help="Discount γ of OPE and of the discounted online return (default: the run's).")
    ] = None,
    propensity: Annotated[Propensity | None, typer.Option(
        help="Column holding log π_β (default: the run's).")] = None,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples over episodes.")] = 1000,
    level: Annotated[float, typer.Option(help="Coverage of the bootstrap interval.")] = 0.95,
    delta: Annotated[float, typer.Option(help="HCOPE bounds hold w.p. ≥ 1 − delta.")] = 0.05,
    fqe_iterations: Annotated[int | None, typer.Option(help="FQE Bellman backups.")] = None,
    critic_interval: Annotated[str, typer.Option(
        help="Interval of dr, wdr, fqe: refit (the critic refitted on each resample) or fixed "
             "(fast: the critic held fixed, too narrow when its error matters).")] = "refit",
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap, critic and rollouts.")] = 0,
    env: Annotated[str | None, typer.Option(help="gymnasium env id (default: the card's).")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object (no table, no progress lines).")] = False,
) -> None:
    """Estimate the value of a policy off-policy (and online), with intervals and γ shown.

    A run's evaluation is logged as a nested MLflow run under it (its metrics are untouched).
    """
    from offpg_offline.config import ConfigError, EvaluateConfig

    names = tuple(name.strip() for name in estimators.split(",") if name.strip())
    unknown = sorted(set(names) - set(_OPE_NAMES))
    if unknown or not names:
        fail(f"--estimators: unknown {', '.join(unknown) or '(empty)'}; "
             f"choose from {','.join(_OPE_NAMES)}")
    try:
        config = EvaluateConfig(
            estimators=names, gamma=gamma, propensity=propensity, checkpoint=checkpoint,
            split=split, n_boot=n_boot, level=level, delta=delta,
            fqe_iterations=fqe_iterations, critic_interval=critic_interval, seed=seed,
            online=online, env=env)
    except ValueError as err:  # a ConfigError names the option
        fail(err.as_option() if isinstance(err, ConfigError) else str(err))

    from offpg_offline.jobs import evaluate as job
    from offpg_offline.jobs.evaluate import show_evaluation

    def progress(line: str) -> None:
        typer.echo(line, err=True)

    try:
        result = job.evaluate(target, dataset=dataset, policy=policy, config=config,
                              progress=None if as_json else progress)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    if as_json:
        import json

        typer.echo(json.dumps(result.as_json(), indent=2, allow_nan=False))
        return
    typer.echo(show_evaluation(result))


# --- compare / ui / sweep commands ---


def _show_comparison(client: Any, experiment_id: str, experiment: str, runs: list[Any],
                     metric: str, *, ope: str | None, lower_is_better: bool, as_json: bool,
                     plot: Path | None, parent: str | None) -> None:
    """Rank and plot (`record.comparison`), then print the table (or JSON)."""
    ope, groups, saved = record.comparison(client, experiment, runs, metric, ope=ope,
                                           lower_is_better=lower_is_better, plot=plot,
                                           parent=parent)
    _print_comparison(experiment, experiment_id, runs, metric, ope, groups, saved,
                      lower_is_better=lower_is_better, as_json=as_json)


def _print_comparison(experiment: str, experiment_id: str, runs: list[Any], metric: str,
                      ope: str | None, groups: list[Any], saved: list[str], *,
                      lower_is_better: bool, as_json: bool) -> None:
    import json

    from offpg_offline import compare as ranking

    if as_json:
        typer.echo(json.dumps({"experiment": experiment, "experiment_id": experiment_id,
                               "metric": metric, "ope": ope, "plot": saved,
                               "groups": [g.as_dict() for g in groups]}, indent=2))
        return
    typer.echo(f"experiment {experiment} ({len(runs)} runs in {len(groups)} configurations; "
               f"mean ± sd over seeds; ranked by {metric}, "
               f"{'lower' if lower_is_better else 'higher'} is better)")
    typer.echo(ranking.format_table(groups, metric, ope))
    typer.echo(f"plot: {'; '.join(saved)}")


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
    try:
        estimators = [EstimatorName(e.strip()) for e in estimator.split(",") if e.strip()]
    except ValueError as err:
        fail(f"--estimator: {err}; choose from {', '.join(e.value for e in EstimatorName)}")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        fail(f"--seeds must be comma-separated integers, got {seeds!r}")
    if not estimators or not seed_list:
        fail("--estimator and --seeds need at least one value each")
    try:
        axes = [sweeps.grid_values(spec) for spec in grid or []]
    except ValueError as err:
        fail(str(err))
    varied = [key for key, values in axes if len(values) > 1]
    base = _resolve(config, train_options, tracking_options)
    try:
        configs = sweeps.plan(base.train, estimators, seed_list, axes)
    except ValueError as err:
        fail(str(err))
    if not _has_card(dataset):
        fail(f"{dataset} is not a dataset folder (no _dataset.json); make one with `offpg ingest`")
    _check_output(out_dir)
    try:
        result = sweeps.run_sweep(dataset, base, configs, grid=grid or [], varied=varied,
                                  metric=metric, out_dir=out_dir, progress=typer.echo)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(f"sweep {result.parent_run_id}: {len(result.runs)} child runs")
    _print_comparison(result.experiment, "", result.runs, metric, result.ope, result.groups,
                      result.plot, lower_is_better=False, as_json=False)


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
    from offpg_offline import tracking

    try:
        client = tracking.open_client(TrackingConfig())
        experiment_id, name = tracking.find_experiment(client, experiment)
        runs = tracking.find_runs(client, experiment_id, parent_run_id=sweep_run)
        if any(m and m.startswith("eval:") for m in (metric, ope)):  # evaluate's nested runs
            from offpg_offline.compare import attach_evaluations
            from offpg_offline.jobs.evaluate import find_evaluations

            runs = attach_evaluations(runs, find_evaluations(client, experiment_id))
    except ValueError as err:
        fail(str(err))
    if not runs:
        where = f"sweep {sweep_run}" if sweep_run else f"experiment {name}"
        fail(f"no finished training runs in {where}")
    parents = {run.tags.get("mlflow.parentRunId") for run in runs}
    parent = sweep_run or (parents.pop() if len(parents) == 1 else None)
    _show_comparison(client, experiment_id, name, runs, metric, ope=ope,
                     lower_is_better=lower_is_better, as_json=as_json, plot=plot, parent=parent)


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
    import signal
    import socket
    import tempfile

    from offpg_offline import tracking

    try:
        uri = tracking.resolve_uri(TrackingConfig())
    except ValueError as err:
        fail(str(err))
    new_store = uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()
    experiment_id = "0"  # an empty store: the Default experiment
    if not new_store:  # (the server creates a new store itself)
        try:
            client = tracking.open_client(TrackingConfig(uri=uri))
            experiment_id = tracking.find_experiment(client, experiment)[0]
        except ValueError as err:
            if experiment is not None or uri.startswith(("http://", "https://")):
                fail(str(err))
    elif experiment is not None:
        fail(f"no MLflow experiment named {experiment!r}: {uri} does not exist yet")
    if uri.startswith(("http://", "https://")):
        typer.echo(f"{uri} is a tracking server with its own UI: "
                   f"{tracking.experiment_url(uri, experiment_id)}")
        return
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            fail(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port")
    base = f"http://{host}:{port}"
    typer.echo(f"starting mlflow server for {uri} ...")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the server too
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        process = tracking.serve(uri, host=host, port=port, log=log)
        try:
            tracking.wait_until_ready(process, base)
            typer.echo(f"MLflow UI: {tracking.experiment_url(base, experiment_id)}  "
                       f"(server pid {process.pid}; Ctrl-C to stop)")
            process.wait()
        except KeyboardInterrupt:
            pass
        except (RuntimeError, TimeoutError) as err:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            fail(f"{err}; its last output: {' | '.join(tail) or 'none'}")
        finally:
            tracking.stop_server(process)


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

    try:
        run_id, sent = tracking.upload_unsent(run_dir, tracking_uri)
    except (ValueError, OSError, tracking.MlflowException) as err:
        fail(str(err))
    typer.echo(f"run {run_id}: sent {sent} metric values and the records kept in {run_dir}")


def main() -> None:
    """Console-script entry point."""
    app()
