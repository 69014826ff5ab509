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
import importlib.metadata
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

from offpg_offline.config import TrackingConfig

DEFAULT_URI = "sqlite:///mlflow.db"
UNSENT_FILE = "unsent-metrics.jsonl"  # what a run could not send to a server that went away
# MLflow retries a failing HTTP request 7 times with exponential backoff (minutes in all) and
# waits 120 s for an answer; a dead server must not hang a run. Ours, unless the user set them.
for _name, _value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
                      ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                      ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
    os.environ.setdefault(_name, _value)
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating tables..." noise
logging.getLogger("alembic").setLevel(logging.WARNING)
logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)  # "Validating input example ..."
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


def dataset_digest(card: Mapping[str, Any]) -> str:
    """A 32-character digest of a dataset derived from the per-file sha256 in its card."""
    files = sorted((f["name"], f["sha256"]) for f in card.get("files", []))
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:32]


class MlflowTracker:
    """Records one MLflow run: params, buffered metrics, tags, dataset inputs and artifacts."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str) -> None:
        self._client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self._pending: list[Metric] = []
        # Where records go when the server stops answering (`train` saves checkpoints here).
        self.fallback_dir = Path("runs") / run_id
        self.lost: str | None = None  # why the server stopped answering, once it has
        self._unsent: list[dict[str, Any]] = []  # metrics, params, tags, artifacts not sent

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
                experiment_id,
                run_name=config.run_name or run_name,
                tags={**provenance_tags(), **(tags or {})},
            )
        else:
            run = client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
        tracker = cls(client, run.info.run_id, run.info.experiment_id)
        try:
            yield tracker
        except BaseException:
            tracker._end("FAILED")  # the server's loss is reported below the original error
            raise
        tracker._end("FINISHED")
        if tracker.lost is not None:
            raise ValueError(tracker.lost_message())

    # --- a server that stops answering: keep going, keep what was not sent ---------------------

    def _server_gone(self) -> bool:
        uri = self.tracking_uri
        if not uri.startswith(("http://", "https://")):
            return False  # a local store's errors are real errors
        try:
            check_reachable(uri, timeout=2.0)
        except ValueError:
            return True
        return False

    def _deliver(self, call: Any, *records: dict[str, Any]) -> bool:
        """Run `call()` against the server; when the server is gone, keep `records` instead.

        Returns:
            True when delivered.
        """
        if self.lost is None:
            try:
                call()
                return True
            except (MlflowException, OSError) as err:
                if not self._server_gone():
                    raise
                first = str(err).strip().splitlines()
                self.lost = first[0][:300] if first else type(err).__name__
        self._unsent.extend(records)
        return False

    def _end(self, status: str) -> None:
        """Flush, then mark the run ended; if the server went away, try once more, then write
        what was not sent to `fallback_dir/unsent-metrics.jsonl`."""
        self.flush()
        if self.lost is not None and not self._server_gone():  # it came back: send it all now
            unsent, self._unsent, self.lost = self._unsent, [], None
            try:
                _send_records(self._client, self.run_id, unsent)
            except (MlflowException, OSError) as err:
                self._unsent, self.lost = unsent, str(err).strip().splitlines()[0][:300]
        self._deliver(lambda: self._client.set_terminated(self.run_id, status=status),
                      {"kind": "status", "status": status})
        if self.lost is not None:
            self.fallback_dir.mkdir(parents=True, exist_ok=True)
            with (self.fallback_dir / UNSENT_FILE).open("a") as handle:
                handle.write(json.dumps({"kind": "run", "run_id": self.run_id,
                                         "tracking_uri": self.tracking_uri}) + "\n")
                for record in self._unsent:
                    handle.write(json.dumps(record, allow_nan=True) + "\n")

    def lost_message(self) -> str:
        """One sentence: the server went away, where the run's data is, how to upload it."""
        metrics = sum(record["kind"] == "metric" for record in self._unsent)
        return (f"MLflow tracking server {self.tracking_uri} stopped answering during run "
                f"{self.run_id} ({self.lost}); its checkpoints are in {self.fallback_dir} and "
                f"{metrics} metric values (with the params, tags and artifacts not sent) are in "
                f"{self.fallback_dir / UNSENT_FILE}: send them with `offpg upload-metrics "
                f"{self.fallback_dir}` once the server is back")

    @property
    def client(self) -> MlflowClient:
        return self._client

    @property
    def tracking_uri(self) -> str:
        return str(self._client.tracking_uri)

    def log_params(self, params: Mapping[str, str | int | float | bool]) -> None:
        items = [Param(key, str(value)) for key, value in params.items()]
        for i in range(0, len(items), _MAX_PARAMS):
            chunk = items[i : i + _MAX_PARAMS]
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
        if len(self._pending) >= _MAX_BATCH:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics (kept for the fallback file if the server is gone)."""
        while self._pending:
            chunk, self._pending = self._pending[:_MAX_BATCH], self._pending[_MAX_BATCH:]
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

    def metric_histories(
        self, keys: Iterable[str] | None = None
    ) -> dict[str, list[tuple[int, float]]]:
        """Every (or the given) metric's history as (step, value) pairs sorted by step, read
        back from the store (pending metrics are flushed first); once the server is gone, of
        the metrics this process still holds."""
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
        """`_log_policy_model`, or "" (the model is not logged) once the server is gone."""
        uri: list[str] = []
        self._deliver(lambda: uri.append(self._log_policy_model(
            checkpoint, input_example, name=name, step=step)),
            {"kind": "model", "checkpoint": str(Path(checkpoint).resolve()), "name": name})
        return uri[0] if uri else ""

    def _log_policy_model(
        self, checkpoint: Path, input_example: np.ndarray, *, name: str = "policy", step: int = 0
    ) -> str:
        """Log the policy in `checkpoint` as an MLflow pyfunc model of this run.

        The model maps observations (a float32 array [n, d_obs], or a DataFrame of d_obs
        float32 columns in feature order) to greedy actions (`policy.mode`). It is an MLflow 3
        logged model linked to the run, so `mlflow.pyfunc.load_model(f"runs:/{run_id}/{name}")`
        finds it. Its code is this package, copied into the model (`code/offpg_offline`), so
        loading it needs only torch, numpy and mlflow; requirements are pinned explicitly
        (inferring them costs ~10 s).

        Args:
            checkpoint: a `train.save_checkpoint` file (`{"spec", "state_dict", ...}`).
            input_example: a few observations, [n, d_obs].
            name: the model's name within the run.
            step: the training step the model comes from.

        Returns:
            The model URI `runs:/<run_id>/<name>`.
        """
        import torch

        example = np.ascontiguousarray(input_example, dtype=np.float32)
        if example.ndim != 2:
            raise ValueError(f"input_example must be [n, d_obs], got shape {example.shape}")
        policy_model = PolicyModel()
        policy_model.load_checkpoint(checkpoint)
        signature = infer_signature(example, policy_model.predict(None, example))
        logged = self._client.create_logged_model(
            self.experiment_id,
            name=name,
            source_run_id=self.run_id,
            tags={"offpg.version": package_version()},
        )
        try:
            with tempfile.TemporaryDirectory() as tmp:
                code = Path(tmp) / "code" / "offpg_offline"
                shutil.copytree(
                    Path(__file__).resolve().parent,
                    code,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                )
                entry = Path(tmp) / "policy_model.py"
                entry.write_text(_MODEL_CODE)
                local = Path(tmp) / "model"
                mlflow.pyfunc.save_model(
                    str(local),
                    python_model=str(entry),  # models from code: nothing is pickled
                    artifacts={"checkpoint": str(checkpoint)},
                    code_paths=[str(code)],
                    signature=signature,
                    input_example=example,
                    pip_requirements=_requirements(torch.__version__),
                    mlflow_model=Model(
                        artifact_path=logged.artifact_location,
                        run_id=self.run_id,
                        model_id=logged.model_id,
                        model_uuid=logged.model_id,
                    ),
                )
                self._client.log_model_artifacts(logged.model_id, str(local))
            self._client.log_outputs(
                self.run_id, [LoggedModelOutput(logged.model_id, step=step)]
            )
        except BaseException:
            self._client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        self._client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        return f"runs:/{self.run_id}/{name}"

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self._deliver(lambda: self._client.log_dict(self.run_id, dict(data), artifact_file),
                      {"kind": "text", "text": json.dumps(dict(data), indent=2),
                       "artifact_file": artifact_file})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._deliver(lambda: self._client.log_text(self.run_id, text, artifact_file),
                      {"kind": "text", "text": text, "artifact_file": artifact_file})

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
        self._deliver(lambda: self._client.log_inputs(self.run_id, datasets=[entity]),
                      {"kind": "dataset", "path": str(Path(path).resolve())})


def _send_records(client: MlflowClient, run_id: str, records: Sequence[dict[str, Any]]) -> int:
    """Send kept records (see `MlflowTracker._deliver`) to `run_id`; the number of metrics sent.

    Metrics, params, tags, texts, the final status and artifacts whose local files still exist
    are sent; dataset inputs and policy models are not (train again or log them by hand).
    """
    metrics = [Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
               for r in records if r["kind"] == "metric"]
    params = [Param(r["key"], r["value"]) for r in records if r["kind"] == "param"]
    tags = [RunTag(r["key"], r["value"]) for r in records if r["kind"] == "tag"]
    for i in range(0, len(params), _MAX_PARAMS):
        client.log_batch(run_id, params=params[i : i + _MAX_PARAMS])
    for i in range(0, len(tags), _MAX_PARAMS):
        client.log_batch(run_id, tags=tags[i : i + _MAX_PARAMS])
    for i in range(0, len(metrics), _MAX_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + _MAX_BATCH])
    for record in records:
        if record["kind"] == "text":
            client.log_text(run_id, record["text"], record["artifact_file"])
        elif record["kind"] == "artifact" and Path(record["path"]).is_file():
            client.log_artifact(run_id, record["path"], record["artifact_path"])
        elif record["kind"] == "artifact" and Path(record["path"]).is_dir():
            client.log_artifacts(run_id, record["path"], record["artifact_path"])
    for record in records:
        if record["kind"] == "status":
            client.set_terminated(run_id, status=record["status"])
    return len(metrics)


def upload_unsent(run_dir: Path, uri: str | None = None) -> tuple[str, int]:
    """Send `run_dir/unsent-metrics.jsonl` (what a run kept when its server went away).

    The file is renamed to `uploaded-metrics.jsonl` once sent, so it is never sent twice.

    Args:
        run_dir: the run's folder (`runs/<run id>`, or the `--out-dir` of `offpg train`).
        uri: the tracking server (default: $MLFLOW_TRACKING_URI, else the file's own).

    Returns:
        (run id, number of metric values sent).

    Raises:
        ValueError: no such file, a server that does not answer, or a run it does not know.
    """
    path = Path(run_dir) / UNSENT_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir}: no {UNSENT_FILE} here, nothing to upload")
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {err.lineno} is not JSON ({err.msg})") from None
    runs = {line["run_id"]: line["tracking_uri"] for line in lines if line.get("kind") == "run"}
    if len(runs) != 1:
        raise ValueError(f"{path}: expected the records of one run, found {len(runs)}")
    ((run_id, recorded_uri),) = runs.items()
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or recorded_uri
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"run {run_id} is not in the tracking store {uri}") from None
    sent = _send_records(client, run_id, [line for line in lines if line.get("kind") != "run"])
    path.rename(path.with_name("uploaded-metrics.jsonl"))
    return run_id, sent


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


_MODEL_CODE = """\
# An offpg-offline policy (MLflow "models from code"); the package is under code/.
import mlflow

from offpg_offline.tracking import PolicyModel

mlflow.models.set_model(PolicyModel())
"""


def _requirements(torch_version: str) -> list[str]:
    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch_version.split('+')[0]}",  # "2.13.0+cpu": the local part names a wheel index
        f"numpy=={np.__version__}",
    ]


class PolicyModel(mlflow.pyfunc.PythonModel):
    """A trained policy as an MLflow pyfunc: observations in, greedy actions out.

    The checkpoint travels as the model artifact `checkpoint`; `load_context` rebuilds the
    policy with `policies.policy_from_checkpoint`. `predict` takes float32 observations
    [n, d_obs] (or a DataFrame of d_obs float32 columns in feature order) and returns int64
    actions [n] for a discrete action space, float32 [n, d_act] for a Box.
    """

    def load_context(self, context: Any) -> None:
        self.load_checkpoint(Path(context.artifacts["checkpoint"]))

    def load_checkpoint(self, path: Path) -> None:
        from offpg_offline.policies import load_checkpoint, policy_from_checkpoint

        self._policy = policy_from_checkpoint(load_checkpoint(path))
        self._policy.eval()

    def predict(self, context: Any, model_input: np.ndarray, params: Any = None) -> np.ndarray:
        """Greedy actions for observations [n, d_obs] (MLflow's signature enforcement turns a
        DataFrame of d_obs float32 columns into this array)."""
        import torch

        obs = np.asarray(model_input, dtype=np.float32)
        if obs.ndim == 1:
            obs = obs[None, :]
        with torch.no_grad():
            return self._policy.mode(torch.from_numpy(np.ascontiguousarray(obs))).numpy()


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A finished run as plain values, for `offpg compare`: latest metric values only."""

    run_id: str
    run_name: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]


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


def find_runs(
    client: MlflowClient, experiment_id: str, *, parent_run_id: str | None = None
) -> list[RunRecord]:
    """The FINISHED training runs (those with an `estimator` tag) of an experiment, oldest
    first; with `parent_run_id`, only that sweep's children."""
    query = "attributes.status = 'FINISHED' and tags.estimator != ''"
    if parent_run_id is not None:
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], query, order_by=["attributes.start_time ASC"], max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    return [
        RunRecord(
            run_id=run.info.run_id,
            run_name=run.info.run_name or run.info.run_id,
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            tags=dict(run.data.tags),
        )
        for run in runs
    ]


def log_file(client: MlflowClient, run_id: str, path: Path, artifact_path: str | None) -> None:
    """Add one file to an existing (possibly finished) run."""
    client.log_artifact(run_id, str(path), artifact_path)


def experiment_url(base: str, experiment_id: str) -> str:
    """The MLflow UI page listing an experiment's runs."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"


def compare_url(base: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """The MLflow UI page comparing `run_ids` side by side (query values URL-encoded)."""
    from urllib.parse import quote

    runs = quote(json.dumps(list(run_ids), separators=(",", ":")))
    experiments = quote(json.dumps([experiment_id], separators=(",", ":")))
    return f"{base.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


def server_command(uri: str, *, host: str, port: int) -> list[str]:
    """The `mlflow server` command line for a store (one worker; artifacts beside the db)."""
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
        "--host", host, "--port", str(port), "--workers", "1",
    ]
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        command += ["--artifacts-destination", str(database.parent / "mlartifacts")]
    return command


def serve(uri: str, *, host: str, port: int, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `mlflow server` for `uri` in its own process group (stop it with `stop_server`).

    The job-execution feature is off (it starts extra workers and ~1 GB more memory).
    """
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = open(log, "ab") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            server_command(uri, host=host, port=port), env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    finally:
        if log is not None:
            out.close()


def wait_until_ready(
    process: subprocess.Popen[bytes], base: str, *, timeout: float = 120.0
) -> None:
    """Poll `<base>/health` until it answers; raise when the server exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {base} not ready after {timeout:.0f} s")


def stop_server(process: subprocess.Popen[bytes], *, timeout: float = 15.0) -> None:
    """Stop a `serve` process and its workers (SIGTERM to its group, then SIGKILL)."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def open_client(config: TrackingConfig) -> MlflowClient:
    """A client for the configured store (fails fast when a server is unreachable)."""
    uri = resolve_uri(config)
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri)


__all__ = [
    "DEFAULT_URI",
    "UNSENT_FILE",
    "MlflowException",
    "MlflowTracker",
    "PolicyModel",
    "RunRecord",
    "check_reachable",
    "compare_url",
    "dataset_digest",
    "experiment_url",
    "find_experiment",
    "find_runs",
    "git_commit",
    "log_file",
    "open_client",
    "package_version",
    "provenance_tags",
    "resolve_uri",
    "serve",
    "stop_server",
    "upload_unsent",
    "wait_until_ready",
]
