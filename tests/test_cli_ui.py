"""`offpg ui` on a fresh sqlite store: the server starts under `tracking.first_use_lock`."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _wait_for(output: Path, text: str, process: subprocess.Popen[bytes], seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen = output.read_text(errors="replace")
        if text in seen:
            return seen
        if process.poll() is not None:
            pytest.fail(f"offpg ui exited with {process.returncode}: {seen}")
        time.sleep(0.2)
    pytest.fail(f"offpg ui printed no {text!r} in {seconds} s: {output.read_text()}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc for children")
def test_ui_waits_for_the_store_lock_before_starting_the_server(tmp_path: Path) -> None:
    """While another process holds the store folder's lock (a training run creating the same
    fresh ./mlflow.db), `offpg ui` starts no server; once released it serves. The old code
    started `mlflow server` at once, which migrated the new store beside the training run."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    output = tmp_path / "ui.out"
    lock = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # what tracking.first_use_lock takes for ./mlflow.db
    with output.open("wb") as out:
        ui = subprocess.Popen(
            [sys.executable, "-c", "from offpg_offline.cli import main; main()",
             "ui", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(output, "starting mlflow server", ui, 120)
        time.sleep(3.0)  # the old code had its server child within milliseconds of that line
        assert _children(ui.pid) == [], "a server started while the store was locked"
        assert not (tmp_path / "mlflow.db").exists()
        os.close(lock)  # releases the lock
        lock = -1
        text = _wait_for(output, "MLflow UI: ", ui, 180)
        assert f"http://127.0.0.1:{port}/#/experiments/0/runs" in text
        assert (tmp_path / "mlflow.db").exists()
    finally:
        if lock >= 0:
            os.close(lock)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()
