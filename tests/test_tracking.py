"""MlflowTracker against a real sqlite store: what is logged is read back unchanged."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from offpg_offline.config import TrackingConfig
from offpg_offline.tracking import MlflowTracker, check_reachable, dataset_digest, resolve_uri


def test_params_metrics_inputs_and_artifacts_round_trip(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    artifact = tmp_path / "note.txt"
    artifact.write_text("hello")
    card = {
        "name": "toy",
        "counts": {"episodes": 3, "steps": 12},
        "files": [{"name": "part-00000.parquet", "sha256": "ab" * 32}],
    }
    with MlflowTracker.start(TrackingConfig(uri=uri), experiment="toy", run_name="r") as tracker:
        tracker.log_params({"gamma": 0.99, "estimator": "per-step"})
        for step in range(1500):  # more than one log_batch of 1000
            tracker.log_metrics({"train/loss": step / 10}, step=step)
        tracker.log_artifact(artifact)
        tracker.log_dataset(tmp_path, card)
        run_id = tracker.run_id

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"gamma": "0.99", "estimator": "per-step"}
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, s / 10) for s in range(1500)]
    assert [f.path for f in client.list_artifacts(run_id)] == ["note.txt"]
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == dataset_digest(card)
    assert len(dataset_input.dataset.digest) <= 36


def test_a_failing_block_marks_the_run_failed(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with (
        pytest.raises(RuntimeError),
        MlflowTracker.start(TrackingConfig(uri=uri), experiment="toy", run_name="r") as tracker,
    ):
        tracker.log_metrics({"train/loss": 1.0}, step=0)
        raise RuntimeError("boom")
    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics == {"train/loss": 1.0}  # buffered metrics were flushed


def test_uri_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_uri(TrackingConfig()) == f"sqlite:///{Path.cwd().resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_uri(TrackingConfig()) == "http://127.0.0.1:1"
    assert resolve_uri(TrackingConfig(uri="sqlite:////tmp/x.db")) == "sqlite:////tmp/x.db"


def test_unreachable_server_fails_fast_with_one_sentence() -> None:
    start = time.monotonic()
    with pytest.raises(
        ValueError, match=r"MLflow tracking server http://127\.0\.0\.1:9 is unreachable"
    ):
        check_reachable("http://127.0.0.1:9", timeout=2.0)
    assert time.monotonic() - start < 10  # a refused port answers at once; never a retry loop
