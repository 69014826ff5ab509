"""Reading runs back: experiments and finished runs for `offpg compare`, a run's child runs
(sweep members, evaluation records), one artifact's text, adding a file to a finished run."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from offpg_offline.config import TrackingConfig
from offpg_offline.tracking.store import open_client, resolve_uri


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A run as plain values, for `offpg compare`: latest metric values only."""

    run_id: str
    run_name: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]


def _record(run: Run) -> RunRecord:
    return RunRecord(run_id=run.info.run_id, run_name=run.info.run_name or run.info.run_id,
                     params=dict(run.data.params), metrics=dict(run.data.metrics),
                     tags=dict(run.data.tags))


def _search(client: MlflowClient, experiment_ids: Sequence[str], query: str) -> list[Run]:
    """Every run matching `query`, oldest first (all pages)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(list(experiment_ids), query,
                                  order_by=["attributes.start_time ASC"], max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_experiment(client: MlflowClient, name: str | None) -> tuple[str, str]:
    """(id, name) of the experiment called `name`, else of the one with the latest run.

    Raises:
        ValueError: no such experiment, or (without a name) no run at all.
    """
    if name is not None:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise ValueError(f"no MLflow experiment named {name!r} in {client.tracking_uri}")
        return found.experiment_id, found.name
    experiments = client.search_experiments()
    latest = client.search_runs(
        [e.experiment_id for e in experiments], order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not latest:
        raise ValueError(f"no runs in {client.tracking_uri}; train one with `offpg train`")
    experiment = client.get_experiment(latest[0].info.experiment_id)
    return experiment.experiment_id, experiment.name


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def find_runs(
    client: MlflowClient, experiment_id: str, *, parent_run_id: str | None = None
) -> list[RunRecord]:
    """The FINISHED training runs (those with an `estimator` tag) of an experiment, oldest
    first; with `parent_run_id`, only that sweep's children."""
    query = "attributes.status = 'FINISHED' and tags.estimator != ''"
    if parent_run_id is not None:
        query += f" and tags.`mlflow.parentRunId` = '{_quoted(parent_run_id)}'"
    return [_record(run) for run in _search(client, [experiment_id], query)]


def child_runs(
    client: MlflowClient, parent_run_id: str, *, status: str | None = "FINISHED"
) -> list[RunRecord]:
    """The runs nested under `parent_run_id` (tag `mlflow.parentRunId`), oldest first: a
    sweep's members, a training run's evaluation records. `status=None`: any status.

    Raises:
        ValueError: no such parent run in the store.
    """
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException:
        raise ValueError(f"run {parent_run_id} is not in the tracking store "
                         f"{client.tracking_uri}") from None
    query = f"tags.`mlflow.parentRunId` = '{_quoted(parent_run_id)}'"
    if status is not None:
        query += f" and attributes.status = '{_quoted(status)}'"
    return [_record(run) for run in _search(client, [parent.info.experiment_id], query)]


def run_artifact_text(config: TrackingConfig, run_id: str, artifact_path: str) -> str:
    """The text of one artifact of a run (e.g. its `config.toml`); one sentence if missing."""
    client = open_client(config)
    try:
        client.get_run(run_id)
    except MlflowException:
        store = resolve_uri(config)
        raise ValueError(f"run {run_id} is not in the tracking store {store}") from None
    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = client.download_artifacts(run_id, artifact_path, scratch)
        except (MlflowException, OSError):
            raise ValueError(f"run {run_id} has no artifact {artifact_path}") from None
        return Path(local).read_text()


def log_file(client: MlflowClient, run_id: str, path: Path, artifact_path: str | None) -> None:
    """Add one file to an existing (possibly finished) run."""
    client.log_artifact(run_id, str(path), artifact_path)
