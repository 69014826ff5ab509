"""`offpg ui`: the `mlflow server` process for a store, and the UI pages' URLs.

The server runs in its own process group (`serve`), so `stop_server` stops it and its
workers together. Nothing here imports mlflow: the server is a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from offpg_offline.tracking.store import sqlite_path


def experiment_url(base: str, experiment_id: str) -> str:
    """The MLflow UI page listing an experiment's runs."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"


def compare_url(base: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """The MLflow UI page comparing `run_ids` side by side (query values URL-encoded)."""
    runs = quote(json.dumps(list(run_ids), separators=(",", ":")))
    experiments = quote(json.dumps([experiment_id], separators=(",", ":")))
    return f"{base.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


def server_command(uri: str, *, host: str, port: int) -> list[str]:
    """The `mlflow server` command line for a store (one worker; artifacts beside the db)."""
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
        "--host", host, "--port", str(port), "--workers", "1",
    ]
    database = sqlite_path(uri)
    if database is not None:
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
