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
