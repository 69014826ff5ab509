"""Run tracking in MLflow: the only module that imports mlflow.

An `MlflowTracker` holds an explicit `MlflowClient` and run id (no fluent global state). It
satisfies `train.Tracker` by structure. Metrics are buffered and written with `log_batch`
(one `log_metric` to a sqlite store costs ~10 ms). Besides recording runs, this module logs
the trained policy as an MLflow pyfunc model (`PolicyModel`), reads runs back for
`offpg compare` (`find_runs`) and starts the MLflow server behind `offpg ui` (`serve`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature

from offpg_offline import __version__
from offpg_offline.config import TrackingConfig

DEFAULT_URI = "sqlite:///mlflow.db"
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating tables..." noise
logging.getLogger("alembic").setLevel(logging.WARNING)
_MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call
_MAX_PARAMS = 100  # ... and on params per call


def resolve_uri(config: TrackingConfig) -> str:
    """The store: the config's URI, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (in cwd)."""
    uri = config.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Absolute, so that MLflow's per-URI store cache never points at another directory.
        uri = f"sqlite:///{(Path.cwd() / uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (one sentence) when an HTTP tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", err)
        raise ValueError(f"MLflow tracking server {uri} is unreachable ({reason})") from None


def dataset_digest(card: Mapping[str, Any]) -> str:
    """A 32-character digest of a dataset derived from the per-file sha256 in its card."""
    files = sorted((f["name"], f["sha256"]) for f in card.get("files", []))
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:32]


class MlflowTracker:
    """Records one MLflow run: params, buffered metrics, tags, dataset inputs and artifacts."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str) -> None:
        self._client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self._pending: list[Metric] = []

    @classmethod
    @contextlib.contextmanager
    def start(
        cls,
        config: TrackingConfig,
        *,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
    ) -> Iterator[MlflowTracker]:
        """Open (or, given `run_id`, reopen) a run; it ends FINISHED, or FAILED on an exception."""
        uri = resolve_uri(config)
        check_reachable(uri)
        client = MlflowClient(tracking_uri=uri)
        name = config.experiment or experiment
        if run_id is None:
            found = client.get_experiment_by_name(name)
            experiment_id = found.experiment_id if found else client.create_experiment(name)
            run = client.create_run(
                experiment_id, run_name=config.run_name or run_name, tags=dict(tags or {})
            )
        else:
            run = client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
        tracker = cls(client, run.info.run_id, run.info.experiment_id)
        try:
            yield tracker
        except BaseException:
            tracker.flush()
            client.set_terminated(tracker.run_id, status="FAILED")
            raise
        tracker.flush()
        client.set_terminated(tracker.run_id, status="FINISHED")

    @property
    def tracking_uri(self) -> str:
        return str(self._client.tracking_uri)

    def log_params(self, params: Mapping[str, str | int | float | bool]) -> None:
        items = [Param(key, str(value)) for key, value in params.items()]
        for i in range(0, len(items), _MAX_PARAMS):
            self._client.log_batch(self.run_id, params=items[i : i + _MAX_PARAMS])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        """Buffer metrics; they are written in batches of up to 1000."""
        now = int(time.time() * 1000)
        self._pending.extend(Metric(key, float(value), now, step) for key, value in metrics.items())
        if len(self._pending) >= _MAX_BATCH:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            chunk, self._pending = self._pending[:_MAX_BATCH], self._pending[_MAX_BATCH:]
            self._client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self._client.log_dict(self.run_id, dict(data), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_dataset(
        self, path: Path, card: Mapping[str, Any], *, context: str = "training"
    ) -> None:
        """Record the dataset folder as a run input, with a digest of its files' checksums."""
        import mlflow.data
        import polars as pl
        from mlflow.entities import InputTag
        from mlflow.entities.dataset_input import DatasetInput

        counts = card.get("counts", {})
        summary = pl.DataFrame(
            {
                "name": [str(card.get("name", path.name))],
                "episodes": [int(counts.get("episodes", 0))],
                "steps": [int(counts.get("steps", 0))],
            }
        )
        with warnings.catch_warnings():  # "source can be interpreted in multiple ways": both local
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_polars(
                summary,
                source=str(path.resolve()),
                name=str(card.get("name", path.name)),
                digest=dataset_digest(card),
            )
        entity = DatasetInput(
            dataset=dataset._to_mlflow_entity(),
            tags=[InputTag(key="mlflow.data.context", value=context)],
        )
        self._client.log_inputs(self.run_id, datasets=[entity])


def run_artifact_text(config: TrackingConfig, run_id: str, artifact_path: str) -> str:
    """The text of one artifact of a run (e.g. its `config.toml`); one sentence if missing."""
    client = open_client(config)
    try:
        client.get_run(run_id)
    except MlflowException:
        store = resolve_uri(config)
        raise ValueError(f"run {run_id} is not in the tracking store {store}") from None
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = client.download_artifacts(run_id, artifact_path, scratch)
        except (MlflowException, OSError):
            raise ValueError(f"run {run_id} has no artifact {artifact_path}") from None
        return Path(local).read_text()


def open_client(config: TrackingConfig) -> MlflowClient:
    """A client for the configured store (fails fast when a server is unreachable)."""
    uri = resolve_uri(config)
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri)


__all__ = [
    "DEFAULT_URI",
    "MlflowException",
    "MlflowTracker",
    "check_reachable",
    "dataset_digest",
    "open_client",
    "resolve_uri",
]
