"""Recording one run: `MlflowTracker` (params, buffered metrics, tags, inputs, artifacts).

An `MlflowTracker` holds an explicit `MlflowClient` and run id (no fluent global state) and
satisfies `train.Tracker` by structure. Metrics are buffered and written with `log_batch` (one
`log_metric` to a sqlite store costs ~10 ms). Every call to the store goes through `_deliver`,
which switches the run to the offline fallback (`tracking.offline`) when the store fails.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from offpg_offline.config import TrackingConfig
from offpg_offline.data.store import dataset_digest
from offpg_offline.tracking import offline
from offpg_offline.tracking.store import connect, experiment_id, is_server, resolve_uri


def package_version() -> str:
    """The installed offpg-offline version (from its metadata; "unknown" when not installed)."""
    try:
        return importlib.metadata.version("offpg-offline")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def git_commit(path: Path | None = None) -> tuple[str, bool] | None:
    """(commit, dirty) of the git checkout holding `path` (default: this package), or None.

    None when git is missing or the package is not inside a checkout (an installed wheel).
    """
    where = path or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip(), bool(status.stdout.strip())


def provenance_tags() -> dict[str, str]:
    """Tags every run carries: the package version and, when available, the git commit.

    `mlflow.source.git.commit` is the tag the MLflow UI shows as the run's commit; `git.dirty`
    says whether tracked files differed from it.
    """
    tags = {"offpg.version": package_version()}
    found = git_commit()
    if found is not None:
        tags["mlflow.source.git.commit"], dirty = found[0], found[1]
        tags["git.dirty"] = str(dirty).lower()
    return tags


def _open_run(client: MlflowClient, config: TrackingConfig, *, experiment: str, run_name: str,
              tags: Mapping[str, str] | None, run_id: str | None,
              parent_run_id: str | None) -> Any:
    """Create the run (nested under `parent_run_id`, in its experiment), or reopen `run_id`."""
    if run_id is not None:
        run = client.get_run(run_id)
        client.update_run(run_id, status="RUNNING")
        return run
    all_tags = {**provenance_tags(), **(tags or {})}
    if parent_run_id is not None:
        try:
            parent = client.get_run(parent_run_id)
        except MlflowException:
            raise ValueError(f"parent run {parent_run_id} is not in the tracking store "
                             f"{client.tracking_uri}") from None
        experiment_of_run = parent.info.experiment_id
        all_tags["mlflow.parentRunId"] = parent_run_id
    else:
        experiment_of_run = experiment_id(client, config.experiment or experiment)
    return client.create_run(experiment_of_run, run_name=config.run_name or run_name,
                             tags=all_tags)


class MlflowTracker:
    """Records one MLflow run: params, buffered metrics, tags, dataset inputs and artifacts."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str) -> None:
        self._client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self._pending: list[Metric] = []
        # Where records go when the store fails (`offpg train` saves checkpoints here).
        self.fallback_dir = Path("runs") / run_id
        self.lost: str | None = None  # why the store failed, once it has
        self._unsent: list[dict[str, Any]] = []  # metrics, params, tags, artifacts not sent
        self._identity = offline.store_identity(self.tracking_uri)

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
        parent_run_id: str | None = None,
    ) -> Iterator[MlflowTracker]:
        """Open a run (nested under `parent_run_id` when given, with the tag
        `mlflow.parentRunId`, in the parent's experiment), or reopen `run_id`. It ends
        FINISHED, or FAILED on an exception.

        Raises:
            ValueError: an unsupported or unusable store, an unknown parent run (before the
                block runs); after it, one sentence when the store failed during the run
                (`lost_message`: the records are in the run folder).
        """
        client = connect(resolve_uri(config))
        try:
            run = _open_run(client, config, experiment=experiment, run_name=run_name,
                            tags=tags, run_id=run_id, parent_run_id=parent_run_id)
        except (MlflowException, OSError) as err:
            if offline.store_failure(str(client.tracking_uri), err) is None:
                raise
            raise ValueError(f"cannot start a run in the MLflow tracking store "
                             f"{client.tracking_uri} ({offline.first_line(err)})") from None
        tracker = cls(client, run.info.run_id, run.info.experiment_id)
        try:
            yield tracker
        except BaseException:
            tracker._end("FAILED")  # the store's failure is reported below the original error
            raise
        tracker._end("FINISHED")
        if tracker.lost is not None:
            raise ValueError(tracker.lost_message())

    # --- a store that fails: keep going, keep what was not sent --------------------------------

    def _deliver(self, call: Callable[[], Any], *records: dict[str, Any]) -> bool:
        """Run `call()` against the store; once the store has failed, keep `records` instead.

        Returns:
            True when delivered.

        Raises:
            Whatever `call` raised when the store did not fail (`offline.store_failure`).
        """
        if self.lost is None:
            self.lost = offline.store_replaced(self.tracking_uri, self._identity)
        if self.lost is None:
            try:
                call()
                return True
            except Exception as err:  # classified below; re-raised unless the store failed
                reason = offline.store_failure(self.tracking_uri, err)
                if reason is None:
                    raise
                self.lost = reason
        self._unsent.extend(
            offline.keep_artifact(r, self.fallback_dir) if r["kind"] == "artifact" else r
            for r in records
        )
        return False

    def _end(self, status: str) -> None:
        """Flush, then mark the run ended; if the store failed, try once more when it looks
        usable again, then write what was not sent to `fallback_dir/unsent-metrics.jsonl`."""
        self.flush()
        if (self.lost is not None and self._unsent
                and offline.store_replaced(self.tracking_uri, self._identity) is None
                and offline.store_writable(self.tracking_uri)):
            unsent, self._unsent, self.lost = self._unsent, [], None
            try:  # it came back: send it all now
                offline.send_records(self._client, self.run_id, unsent, self.fallback_dir)
            except Exception as err:  # it failed again: keep the records
                self._unsent, self.lost = unsent, offline.first_line(err)
        self._deliver(lambda: self._client.set_terminated(self.run_id, status=status),
                      {"kind": "status", "status": status})
        if self.lost is not None:
            offline.write_unsent(self.fallback_dir,
                                 {"kind": "run", "run_id": self.run_id,
                                  "tracking_uri": self.tracking_uri}, self._unsent)

    def lost_message(self) -> str:
        """One sentence: the store failed, where the run's data is, how to upload it."""
        metrics = sum(record["kind"] == "metric" for record in self._unsent)
        what = (f"MLflow tracking server {self.tracking_uri} stopped answering"
                if is_server(self.tracking_uri)
                else f"MLflow tracking store {self.tracking_uri} failed")
        again = "the server is back" if is_server(self.tracking_uri) else "the store works again"
        return (f"{what} during run {self.run_id} ({self.lost}); training went on: its "
                f"checkpoints are in {self.fallback_dir} and {metrics} metric values (with the "
                f"params, tags and artifacts not sent) are in "
                f"{self.fallback_dir / offline.UNSENT_FILE}: send them with `offpg "
                f"upload-metrics {self.fallback_dir}` once {again}")

    @property
    def client(self) -> MlflowClient:
        return self._client

    @property
    def tracking_uri(self) -> str:
        return str(self._client.tracking_uri)

    def log_params(self, params: Mapping[str, str | int | float | bool]) -> None:
        items = [Param(key, str(value)) for key, value in params.items()]
        for i in range(0, len(items), offline.MAX_PARAMS):
            chunk = items[i : i + offline.MAX_PARAMS]
            self._deliver(lambda chunk=chunk: self._client.log_batch(self.run_id, params=chunk),
                          *({"kind": "param", "key": p.key, "value": p.value} for p in chunk))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._deliver(lambda: self._client.log_batch(self.run_id, tags=items),
                      *({"kind": "tag", "key": t.key, "value": t.value} for t in items))

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        """Buffer metrics; they are written in batches of up to 1000."""
        now = int(time.time() * 1000)
        self._pending.extend(Metric(key, float(value), now, step) for key, value in metrics.items())
        if len(self._pending) >= offline.MAX_BATCH:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics (kept for the fallback file if the store failed)."""
        while self._pending:
            size = offline.MAX_BATCH
            chunk, self._pending = self._pending[:size], self._pending[size:]
            self._deliver(lambda chunk=chunk: self._client.log_batch(self.run_id, metrics=chunk),
                          *({"kind": "metric", "key": m.key, "value": m.value,
                             "timestamp": m.timestamp, "step": m.step} for m in chunk))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._deliver(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path),
                      {"kind": "artifact", "path": str(Path(path).resolve()),
                       "artifact_path": artifact_path})

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        self._deliver(lambda: self._client.log_artifacts(self.run_id, str(local_dir),
                                                         artifact_path),
                      {"kind": "artifact", "path": str(Path(local_dir).resolve()),
                       "artifact_path": artifact_path})

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self._deliver(lambda: self._client.log_dict(self.run_id, dict(data), artifact_file),
                      {"kind": "text", "text": json.dumps(dict(data), indent=2),
                       "artifact_file": artifact_file})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._deliver(lambda: self._client.log_text(self.run_id, text, artifact_file),
                      {"kind": "text", "text": text, "artifact_file": artifact_file})

    def metric_histories(
        self, keys: Iterable[str] | None = None
    ) -> dict[str, list[tuple[int, float]]]:
        """Every (or the given) metric's history as (step, value) pairs sorted by step, read
        back from the store (pending metrics are flushed first); once the store has failed,
        of the metrics this process still holds."""
        self.flush()

        def read() -> dict[str, list[tuple[int, float]]]:
            names = sorted(keys) if keys is not None else sorted(
                self._client.get_run(self.run_id).data.metrics
            )
            return {
                name: sorted((m.step, m.value) for m in self._client.get_metric_history(
                    self.run_id, name))
                for name in names
            }

        found: list[dict[str, list[tuple[int, float]]]] = []
        if self._deliver(lambda: found.append(read())):
            return found[0]
        wanted = None if keys is None else set(keys)
        local: dict[str, list[tuple[int, float]]] = {}
        for record in self._unsent:
            if record["kind"] == "metric" and (wanted is None or record["key"] in wanted):
                local.setdefault(record["key"], []).append((record["step"], record["value"]))
        return {name: sorted(values) for name, values in sorted(local.items())}

    def log_policy_model(
        self, checkpoint: Path, input_example: np.ndarray, *, name: str = "policy", step: int = 0
    ) -> str:
        """`model.log_policy_model` for this run, or "" (not logged) once the store failed."""
        from offpg_offline.tracking.model import log_policy_model

        uri: list[str] = []
        self._deliver(lambda: uri.append(log_policy_model(
            self._client, self.run_id, self.experiment_id, checkpoint, input_example,
            name=name, step=step)),
            {"kind": "model", "checkpoint": str(Path(checkpoint).resolve()), "name": name})
        return uri[0] if uri else ""

    def log_dataset(
        self, path: Path, card: Mapping[str, Any], *, context: str = "training"
    ) -> None:
        """Record the dataset folder as a run input, with `data.store.dataset_digest(card)`."""
        import mlflow.data
        import polars as pl
        from mlflow.entities import InputTag
        from mlflow.entities.dataset_input import DatasetInput

        counts = card.get("counts", {})
        summary = pl.DataFrame({
            "name": [str(card.get("name", path.name))],
            "episodes": [int(counts.get("episodes", 0))],
            "steps": [int(counts.get("steps", 0))],
        })
        with warnings.catch_warnings():  # "source can be interpreted in multiple ways": both local
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_polars(
                summary, source=str(path.resolve()), name=str(card.get("name", path.name)),
                digest=dataset_digest(card),
            )
        entity = DatasetInput(dataset=dataset._to_mlflow_entity(),
                              tags=[InputTag(key="mlflow.data.context", value=context)])
        self._deliver(lambda: self._client.log_inputs(self.run_id, datasets=[entity]),
                      {"kind": "dataset", "path": str(Path(path).resolve())})
