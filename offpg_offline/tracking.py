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
            tracker.flush()
            client.set_terminated(tracker.run_id, status="FAILED")
            raise
        tracker.flush()
        client.set_terminated(tracker.run_id, status="FINISHED")

    @property
    def client(self) -> MlflowClient:
        return self._client

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

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        self._client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def metric_histories(
        self, keys: Iterable[str] | None = None
    ) -> dict[str, list[tuple[int, float]]]:
        """Every (or the given) metric's history as (step, value) pairs sorted by step, read
        back from the store (pending metrics are flushed first)."""
        self.flush()
        names = sorted(keys) if keys is not None else sorted(
            self._client.get_run(self.run_id).data.metrics
        )
        return {
            name: sorted((m.step, m.value) for m in self._client.get_metric_history(
                self.run_id, name))
            for name in names
        }

    def log_policy_model(
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
        import torch

        from offpg_offline.policies import policy_from_checkpoint

        self._policy = policy_from_checkpoint(torch.load(path, weights_only=True))
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
    "wait_until_ready",
]
