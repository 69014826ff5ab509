"""MlflowTracker against a real sqlite store: what is logged is read back unchanged."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from offpg_offline.config import TrackingConfig
from offpg_offline.tracking import MlflowTracker, check_reachable, dataset_digest, resolve_uri

DATASET = Path(__file__).resolve().parents[1] / "datasets" / "cartpole-weak"


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


# --- issue 13.6: unsupported tracking URIs, one sentence, before anything starts -------------


def _uri_variants(tmp: Path) -> list[tuple[str, str]]:
    """(URI, a part the sentence must name) per class: file paths, paths under a file,
    unsupported schemes, non-database sqlite targets. New variants of a class go here."""
    plain = tmp / "notes.txt"
    plain.write_text("not a store")
    folder = tmp / "folder"
    folder.mkdir()
    variants = [(str(plain), str(plain)), (f"file://{plain}", str(plain)),
                (str(plain / "sub"), str(plain)), (str(plain / "a" / "b.db"), str(plain)),
                (str(tmp / "new.db"), "sqlite:///"),
                (f"sqlite:///{plain}/mlflow.db", str(plain)),
                (f"sqlite:///{plain}", str(plain)), (f"sqlite:///{folder}", str(folder)),
                (f"sqlite:///{tmp}/missing/mlflow.db", f"{tmp}/missing"),
                ("sqlite://", "in-memory"), ("sqlite:///:memory:", "in-memory"),
                ("http://", "no host"), ("https:///path", "no host")]
    for scheme in ("ftp", "s3", "gs", "ssh", "sftp", "mailto", "javascript", "runs", "models"):
        variants.append((f"{scheme}://host/store", f"{scheme!r}"))
    variants.append(("ftp://host/a\nb", "ftp://host/a\\nb"))  # control characters escaped
    return variants


def test_unsupported_tracking_uris_are_refused_in_one_sentence(tmp_path: Path) -> None:
    from offpg_offline.tracking import validate_uri

    for uri, named in _uri_variants(tmp_path):
        with pytest.raises(ValueError) as caught:
            validate_uri(uri)
        message = str(caught.value)
        assert "\n" not in message and named in message, (uri, message)
        assert "Traceback" not in message and "Error" not in message, (uri, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "notes.txt"]  # no writes


def test_supported_tracking_uris_are_accepted_unchanged(tmp_path: Path) -> None:
    from offpg_offline.tracking import validate_uri

    existing = tmp_path / "store.db"
    import sqlite3

    sqlite3.connect(existing).execute("create table t (x)").connection.commit()
    for uri in (f"sqlite:///{tmp_path}/new.db", f"sqlite:///{existing}", "http://127.0.0.1:1",
                "https://mlflow.example.org/", "postgresql://user@host:5432/mlflow",
                "mysql+pymysql://user@host/mlflow", "databricks", str(tmp_path),
                f"file://{tmp_path}", str(tmp_path / "new-folder-store")):
        assert validate_uri(uri) == uri


@pytest.mark.parametrize("command", [["compare"], ["ui"], ["upload-metrics", "."]])
def test_cli_turns_a_bad_tracking_uri_into_exit_2(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from offpg_offline.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "unsent-metrics.jsonl").write_text(
        '{"kind": "run", "run_id": "abc", "tracking_uri": "sqlite:///x.db"}\n')
    result = CliRunner().invoke(app, command, env={"MLFLOW_TRACKING_URI": "ftp://host/store"})
    assert result.exit_code == 2, result.output
    assert result.output == ("error: tracking URI ftp://host/store has the unsupported scheme "
                             "'ftp'; use sqlite:///PATH, http(s)://HOST:PORT, or a "
                             "postgresql://, mysql:// or mssql:// database\n")


@pytest.mark.slow
def test_train_refuses_a_bad_tracking_uri_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from offpg_offline.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "store").write_text("a file, not a store")
    for uri in (str(tmp_path / "store"), f"sqlite:///{tmp_path}/store/mlflow.db", "ftp://h/x"):
        result = CliRunner().invoke(app, ["train", str(DATASET), "--steps", "2"],
                                    env={"MLFLOW_TRACKING_URI": uri})
        assert result.exit_code == 2, result.output
        (line,) = result.output.splitlines()
        assert line.startswith("error: tracking URI "), line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no run, no store


# --- issue 12.8: one dataset digest -------------------------------------------------------


def _digest_from_files(dataset: Path) -> str:
    """The digest's definition, from the shard files' bytes (not from the card): sha256 of
    the JSON list of sorted [file name, sha256 of its bytes], first 32 hex characters."""
    import hashlib
    import json

    pairs = sorted([p.name, hashlib.sha256(p.read_bytes()).hexdigest()]
                   for p in dataset.glob("*.parquet"))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:32]


@pytest.mark.slow
def test_card_digest_equals_the_mlflow_dataset_input_of_a_real_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import re

    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from offpg_offline.cli import app
    from offpg_offline.data import store

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", str(DATASET), "--steps", "2", "--init", "random",
                                      "--baseline", "none", "--eval-episodes", "1"])
    assert result.exit_code == 0, result.output
    run_id = re.search(r"^run ([0-9a-f]{32})", result.output, re.M).group(1)
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    (dataset_input,) = run.inputs.dataset_inputs
    expected = _digest_from_files(DATASET)
    assert dataset_input.dataset.digest == expected
    assert store.dataset_digest(DATASET) == expected  # the folder form (behavior fit's)
    assert store.dataset_digest(store.read_card(DATASET)) == expected  # the card form


# --- issue 12.3 support: nested runs ---------------------------------------------------------


def test_a_nested_run_lives_in_its_parents_experiment_and_is_listed_as_its_child(
    tmp_path: Path,
) -> None:
    from offpg_offline.tracking import child_runs

    config = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db")
    with MlflowTracker.start(config, experiment="train-exp", run_name="parent") as parent:
        pass
    with MlflowTracker.start(config, experiment="other", run_name="unrelated") as other:
        pass
    children = []
    for i in range(2):
        with MlflowTracker.start(config, experiment="ignored-for-children", run_name=f"eval{i}",
                                 tags={"offpg.job": "evaluate"},
                                 parent_run_id=parent.run_id) as child:
            child.log_metrics({"ope/wis": float(i)}, step=0)
        children.append(child)
    client = parent.client
    for child in children:
        run = client.get_run(child.run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.run_id
        assert run.info.experiment_id == parent.experiment_id != other.experiment_id
    assert client.get_experiment_by_name("ignored-for-children") is None
    listed = child_runs(client, parent.run_id)
    assert [r.run_id for r in listed] == [c.run_id for c in children]
    assert [r.metrics for r in listed] == [{"ope/wis": 0.0}, {"ope/wis": 1.0}]
    assert child_runs(client, other.run_id) == []
    with pytest.raises(ValueError, match=r"^parent run 0123abc is not in the tracking store "):
        with MlflowTracker.start(config, experiment="e", run_name="r", parent_run_id="0123abc"):
            pass


# --- issue 13.2: concurrent first use of a fresh store --------------------------------------

_RACER = """\
import sys, time
from pathlib import Path
from offpg_offline.config import TrackingConfig
from offpg_offline.tracking import MlflowTracker
import mlflow  # loaded before the barrier, so that the processes open the store together
here, me, n = Path.cwd(), sys.argv[1], int(sys.argv[2])
(here / f"{me}.ready").touch()
while len(list(here.glob("*.ready"))) < n:
    time.sleep(0.001)
with MlflowTracker.start(TrackingConfig(), experiment="fresh", run_name=f"racer-{me}") as t:
    t.log_metrics({"x": float(me)}, step=0)
print(t.run_id, t.experiment_id)
"""


@pytest.mark.slow
def test_three_runs_started_together_on_a_fresh_store_all_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(i), "3"], cwd=tmp_path,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for i in range(3)]
    outputs = [racer.communicate(timeout=300) for racer in racers]
    for racer, (_out, err) in zip(racers, outputs, strict=True):
        assert racer.returncode == 0, err[-2000:]
    started = [out.split() for out, _ in outputs]
    assert len({experiment for _, experiment in started}) == 1  # one experiment, not three
    # The store is usable afterwards: a fourth run, and all four are read back.
    with MlflowTracker.start(TrackingConfig(), experiment="fresh", run_name="after") as after:
        after.log_metrics({"x": 3.0}, step=0)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("fresh")
    assert experiment.experiment_id == started[0][1] == after.experiment_id
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.metrics["x"] for r in runs) == [0.0, 1.0, 2.0, 3.0]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_resolving_and_validating_a_uri_does_not_import_mlflow() -> None:
    # issue 14.6: the package loads a module's mlflow only when one of its names is used,
    # so a CLI can refuse a bad URI at parse time without paying for mlflow (~2 s).
    import subprocess
    import sys

    code = ("import sys; from offpg_offline import tracking; from offpg_offline.config import "
            "TrackingConfig; tracking.resolve_uri(TrackingConfig()); "
            "tracking.validate_uri('http://127.0.0.1:1'); tracking.experiment_url('h', '0'); "
            "print('mlflow' in sys.modules); tracking.MlflowTracker; "
            "print('mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "True"]
