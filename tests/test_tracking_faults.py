"""A tracking server that dies mid-run: the run finishes locally, keeps what it could not send,
says so in one sentence, and `offpg upload-metrics` sends it once the server is back.

Uses a REAL `mlflow server` (sqlite backend in tmp, one worker, 127.0.0.1, a free port).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from offpg_offline import tracking
from offpg_offline.cli import app
from offpg_offline.config import TrainConfig

WEAK = Path(__file__).resolve().parents[1] / "datasets" / "cartpole-weak"
STEPS = 150


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _server(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    process = tracking.serve(f"sqlite:///{tmp}/mlflow.db", host="127.0.0.1", port=port,
                             log=tmp / "server.log")
    try:
        tracking.wait_until_ready(process, f"http://127.0.0.1:{port}", timeout=90)
    except BaseException:
        tracking.stop_server(process)
        raise
    return process


def test_http_retries_are_short_unless_the_user_set_them() -> None:
    # tracking.py sets MLflow's HTTP retry defaults only where the environment has none.
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "20"
    code = ("import os; os.environ['MLFLOW_HTTP_REQUEST_MAX_RETRIES'] = '5'; "
            "import offpg_offline.tracking; print(os.environ['MLFLOW_HTTP_REQUEST_MAX_RETRIES'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "5", out.stderr


def test_upload_metrics_without_a_file_is_one_sentence(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["upload-metrics", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output == (f"error: {tmp_path}: no unsent-metrics.jsonl here, nothing to "
                             f"upload\n")


@pytest.mark.slow
def test_server_killed_mid_run_keeps_checkpoints_and_metrics_for_a_later_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = _server(tmp_path, port)
    try:
        training = subprocess.Popen(
            [sys.executable, "-c", "from offpg_offline.cli import main; main()", "train",
             str(WEAK), "--steps", str(STEPS), "--checkpoint-every", "25", "--init", "random",
             "--baseline", "none", "--eval-episodes", "2", "--estimator", "per-decision"],
            cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": base},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("runs/*/step-000025.pt")):
            assert training.poll() is None, training.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGKILL)  # the server and its worker, mid-run
        server.wait()
        killed_at = time.monotonic()
        stdout, stderr = training.communicate(timeout=120)
        finished_after = time.monotonic() - killed_at
    finally:
        tracking.stop_server(server)

    print(f"training ended {finished_after:.1f} s after the server was killed")
    (folder,) = (tmp_path / "runs").iterdir()
    run_id = folder.name
    assert training.returncode == 2, (stdout, stderr)
    (line,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert f"MLflow tracking server {base} stopped answering during run {run_id}" in line
    assert f"send them with `offpg upload-metrics {folder.relative_to(tmp_path)}`" in line
    assert "Traceback" not in stderr
    assert (folder / "final.pt").is_file()  # checkpoints are local first, uploads after
    assert finished_after < 60  # short HTTP retries: no long hang on the dead server
    records = [json.loads(x) for x in (folder / "unsent-metrics.jsonl").read_text().splitlines()]
    losses = {r["step"] for r in records if r.get("key") == "train/loss"}
    every = TrainConfig().log_every
    assert losses == {*range(every, STEPS, every), STEPS}  # every logged step was kept

    server = _server(tmp_path, port)  # back, on the same port and store
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
        result = CliRunner().invoke(app, ["upload-metrics", str(folder)])
        assert result.exit_code == 0, result.output
        assert f"run {run_id}: sent {sum(r['kind'] == 'metric' for r in records)} metric " \
               f"values" in result.output
        client = MlflowClient(tracking_uri=base)
        history = client.get_metric_history(run_id, "train/loss")
        assert {m.step for m in history} == losses
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert "checkpoints" in {a.path for a in client.list_artifacts(run_id)}
        assert not (folder / "unsent-metrics.jsonl").exists()  # never sent twice
        again = CliRunner().invoke(app, ["upload-metrics", str(folder)])
        assert again.exit_code == 2
    finally:
        tracking.stop_server(server)


# --- issue 13.1: a local sqlite store that fails mid-run -------------------------------------


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "unsent-metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("failure", ["deleted", "replaced"])
def test_a_sqlite_store_that_goes_away_mid_run_keeps_every_record(
    failure: str, tmp_path: Path
) -> None:
    # SQLite keeps writing to a deleted or replaced database file through its open connection;
    # those writes would be lost without a word.
    from offpg_offline.config import TrackingConfig

    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "final.pt").write_bytes(b"checkpoint")
    outside = tmp_path / "plot.png"  # e.g. a plot in a temporary folder, gone after the run
    outside.write_bytes(b"png")
    with (pytest.raises(ValueError) as caught,
          tracking.MlflowTracker.start(TrackingConfig(uri=uri), experiment="e",
                                       run_name="r") as tracker):
        tracker.fallback_dir = run_dir
        tracker.log_params({"lr": 0.1})
        tracker.log_metrics({"train/loss": 0.0}, step=0)
        tracker.flush()  # sent before the failure
        db.unlink()
        if failure == "replaced":
            db.mkdir()
        for step in range(1, 2501):  # more than 1000: buffered batches flush mid-run
            tracker.log_metrics({"train/loss": step / 10}, step=step)
        tracker.set_tags({"selected.step": "7"})
        tracker.log_text("a = 1", "config.toml")
        tracker.log_artifact(run_dir / "final.pt", "checkpoints")
        tracker.log_artifact(outside, "plots")
    outside.unlink()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"MLflow tracking store {uri} failed during run {tracker.run_id} "
                              f"(the database file {db} was {failure}); training went on: its "
                              f"checkpoints are in {run_dir} and 2500 metric values")
    assert message.endswith(f"send them with `offpg upload-metrics {run_dir}` once the store "
                            "works again")
    records = _records(run_dir)
    assert records[0] == {"kind": "run", "run_id": tracker.run_id, "tracking_uri": uri}
    steps = [r["step"] for r in records if r["kind"] == "metric"]
    assert steps == list(range(1, 2501))
    assert {"kind": "tag", "key": "selected.step", "value": "7"} in records
    assert {"kind": "text", "text": "a = 1", "artifact_file": "config.toml"} in records
    artifacts = [r for r in records if r["kind"] == "artifact"]
    assert artifacts == [
        {"kind": "artifact", "path": "final.pt", "artifact_path": "checkpoints"},
        {"kind": "artifact", "path": "unsent-artifacts/000-plot.png", "artifact_path": "plots"}]
    assert (run_dir / "unsent-artifacts" / "000-plot.png").read_bytes() == b"png"
    assert records[-1] == {"kind": "status", "status": "FINISHED"}


_DISK_FULL = """\
import resource, sys
from pathlib import Path
from offpg_offline.config import TrackingConfig
from offpg_offline.tracking import MlflowTracker
try:
    with MlflowTracker.start(TrackingConfig(), experiment="e", run_name="r") as tracker:
        tracker.fallback_dir = Path("run")
        tracker.log_params({"lr": 0.1})
        print(tracker.run_id, flush=True)
        # From here no file of this process may grow past 64 KiB: the ~1 MB database is full
        # (write() fails with EFBIG, as with ENOSPC), the few-KB fallback file still fits.
        # This works as root, unlike permissions.
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
        for step in range(1, 301):
            tracker.log_metrics({"train/loss": step / 100}, step=step)
        tracker.flush()
        tracker.log_metrics({"online/return_mean": 21.5}, step=300)
except ValueError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
"""


def test_a_full_disk_under_a_sqlite_store_keeps_the_metrics_for_a_later_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-c", _DISK_FULL], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    run_id = done.stdout.strip()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: MLflow tracking store {uri} failed during run {run_id} ("), line
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records if r.get("key") == "train/loss"] == list(range(1, 301))

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["upload-metrics", "run"])  # the run's own store
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"run {run_id}: sent 301 metric values")
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, s / 100) for s in range(1, 301)]
    run = client.get_run(run_id)
    assert run.data.metrics["online/return_mean"] == 21.5
    assert run.data.params == {"lr": "0.1"}
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_a_locked_sqlite_store_mid_training_keeps_checkpoints_and_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from mlflow import MlflowClient

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    training = subprocess.Popen(
        [sys.executable, "-c", "from offpg_offline.cli import main; main()", "train",
         str(WEAK), "--steps", str(STEPS), "--checkpoint-every", "25", "--init", "random",
         "--baseline", "none", "--eval-episodes", "2", "--estimator", "per-decision"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list(tmp_path.glob("runs/*/step-000025.pt")):
            assert training.poll() is None, training.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
        # Another program holds the database: every write of the run times out (MLflow waits
        # 20 s for a lock), as with a store on a network disk that stopped answering.
        lock = sqlite3.connect(tmp_path / "mlflow.db", timeout=60, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        stdout, stderr = training.communicate(timeout=300)
        lock.rollback()
        lock.close()
    finally:
        if training.poll() is None:
            training.kill()
            training.wait()

    (folder,) = (tmp_path / "runs").iterdir()
    run_id = folder.name
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert training.returncode == 2, (stdout, stderr)
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: MLflow tracking store {uri} failed during run {run_id} "
                           "(database is locked); training went on"), line
    assert f"send them with `offpg upload-metrics {folder.relative_to(tmp_path)}`" in line
    saved = {p.name for p in folder.glob("*.pt")}
    assert saved >= {f"step-{s:06d}.pt" for s in range(25, STEPS + 1, 25)} | {"final.pt"}
    records = _records(folder)
    losses = {r["step"] for r in records if r.get("key") == "train/loss"}
    every = TrainConfig().log_every
    assert losses == {*range(every, STEPS, every), STEPS}

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["upload-metrics", str(folder.relative_to(tmp_path))])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=uri)
    assert {m.step for m in client.get_metric_history(run_id, "train/loss")} == losses
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {"checkpoints", "plots"} <= {a.path for a in client.list_artifacts(run_id)}


# --- issue 13.9: upload-metrics sends only files inside the run's folder ---------------------


def _confinement_variants(tmp: Path, run_dir: Path) -> list[str]:
    """Artifact paths outside `run_dir`, one per way of getting there."""
    (tmp / "secret.txt").write_text("secret")
    (run_dir / "link").symlink_to("/etc/passwd")
    (run_dir / "sub").mkdir()
    (run_dir / "sub" / "up").symlink_to(tmp)
    return ["/etc/passwd", str(tmp / "secret.txt"), "../secret.txt", "sub/../../secret.txt",
            "link", "sub/up/secret.txt", "/", ".."]


def test_upload_metrics_refuses_artifacts_outside_the_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from offpg_offline.config import TrackingConfig

    monkeypatch.chdir(tmp_path)
    with tracking.MlflowTracker.start(TrackingConfig(), experiment="e", run_name="r") as tracker:
        pass
    run_dir = tmp_path / "runs" / tracker.run_id
    run_dir.mkdir(parents=True)
    (run_dir / "final.pt").write_bytes(b"inside")
    unsent = run_dir / "unsent-metrics.jsonl"
    header = {"kind": "run", "run_id": tracker.run_id, "tracking_uri": tracker.tracking_uri}
    metric = {"kind": "metric", "key": "m", "value": 1.0, "timestamp": 0, "step": 1}
    inside = {"kind": "artifact", "path": "final.pt", "artifact_path": "checkpoints"}
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    for named in _confinement_variants(tmp_path, run_dir):
        bad = {"kind": "artifact", "path": named, "artifact_path": "stolen"}
        unsent.write_text("".join(json.dumps(r) + "\n" for r in (header, metric, inside, bad)))
        result = CliRunner().invoke(app, ["upload-metrics", str(run_dir)])
        assert result.exit_code == 2, (named, result.output)
        assert result.output == (f"error: {unsent}: line 4 names the artifact {named!r}, which "
                                 f"is outside the run folder {run_dir}; nothing was sent\n")
        assert client.get_run(tracker.run_id).data.metrics == {}  # nothing at all was sent
        assert client.list_artifacts(tracker.run_id) == []
        assert unsent.is_file()
    for line, sentence in (('["not", "a", "record"]', "is not a record of a run"),
                           ('{"kind": "metric", "key": "m"}', "a metric record needs value, "
                                                              "timestamp, step"),
                           ('{"kind": "metric", "key": "m", "value": 1, "timestamp": null, '
                            '"step": 1}', "timestamp of a metric record is null, not a number"),
                           ('{"kind": "metric", "key": "m", "value": "x", "timestamp": 0, '
                            '"step": 1}', 'value of a metric record is "x", not a number'),
                           ('{"kind": "param", "key": ["k"], "value": "v"}',
                            'key of a param record is ["k"], not a string')):
        unsent.write_text(json.dumps(header) + "\n" + line + "\n")
        result = CliRunner().invoke(app, ["upload-metrics", str(run_dir)])
        assert result.exit_code == 2 and sentence in result.output, result.output
        assert len(result.output.splitlines()) == 1
    unsent.write_text("".join(json.dumps(r) + "\n" for r in (header, metric, inside)))
    result = CliRunner().invoke(app, ["upload-metrics", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["checkpoints"]


def test_errors_that_are_not_the_stores_are_raised_not_kept(tmp_path: Path) -> None:
    # The fallback is for a failing store only: a request the store refuses, or a file that
    # does not exist, is the caller's error and must surface, not vanish into a file.
    from offpg_offline.config import TrackingConfig

    config = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db")
    with (pytest.raises(tracking.MlflowException, match="Changing param values is not allowed"),
          tracking.MlflowTracker.start(config, experiment="e", run_name="r") as tracker):
        tracker.fallback_dir = tmp_path / "run"
        tracker.log_params({"lr": 0.1})
        tracker.log_params({"lr": 0.2})
    with (pytest.raises(FileNotFoundError),
          tracking.MlflowTracker.start(config, experiment="e", run_name="r2") as second):
        second.fallback_dir = tmp_path / "run"
        second.log_artifact(tmp_path / "missing.txt")
    assert tracker.lost is None and second.lost is None
    assert not (tmp_path / "run").exists()
