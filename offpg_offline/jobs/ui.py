"""`offpg ui`: which store and experiment to show, and the `mlflow server` run for it.

Nothing here prints: messages go to the `progress` callable; user errors are ValueErrors of
one sentence (the CLI prints them and exits 2).
"""

from __future__ import annotations

import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from offpg_offline.config import TrackingConfig


def ui_store(experiment: str | None) -> tuple[str, str]:
    """(store URI, id of the experiment whose runs page to show).

    A sqlite store that does not exist yet is created by the server: its page is the Default
    experiment ("0"), and naming an experiment there is refused. An unknown experiment is
    refused when named (or on a tracking server); otherwise the Default page is shown.
    """
    from offpg_offline import tracking

    uri = tracking.resolve_uri(TrackingConfig())
    new_store = uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()
    if new_store:
        if experiment is not None:
            raise ValueError(f"no MLflow experiment named {experiment!r}: {uri} does not exist yet")
        return uri, "0"
    try:
        client = tracking.open_client(TrackingConfig(uri=uri))
        return uri, tracking.find_experiment(client, experiment)[0]
    except ValueError:
        if experiment is not None or is_server(uri):
            raise
        return uri, "0"


def is_server(uri: str) -> bool:
    """Whether `uri` is a tracking server (it has its own UI)."""
    return uri.startswith(("http://", "https://"))


def check_port(host: str, port: int) -> None:
    """Refuse a host:port that cannot be listened on, before the server starts."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ValueError(
                f"cannot listen on {host}:{port} ({err.strerror}); pass another --port") from None


def run_server(uri: str, experiment_id: str, *, host: str, port: int,
               progress: Callable[[str], None]) -> None:
    """Serve the MLflow UI for `uri` until Ctrl-C or SIGTERM; stop the server on the way out.

    On a sqlite store, `tracking.first_use_lock(uri)` is held from the server's start until it
    answers: the server creates and migrates a fresh store, which must not race a training
    run doing the same.

    Raises:
        ValueError: the server exited or did not answer (with the last lines of its log).
    """
    from offpg_offline import tracking
    from offpg_offline.tracking.store import first_use_lock

    base = f"http://{host}:{port}"
    progress(f"starting mlflow server for {uri} ...")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the server too
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        process = None
        try:
            with first_use_lock(uri):
                process = tracking.serve(uri, host=host, port=port, log=log)
                tracking.wait_until_ready(process, base)
            progress(f"MLflow UI: {tracking.experiment_url(base, experiment_id)}  "
                     f"(server pid {process.pid}; Ctrl-C to stop)")
            process.wait()
        except KeyboardInterrupt:
            pass
        except (RuntimeError, TimeoutError) as err:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise ValueError(f"{err}; its last output: {' | '.join(tail) or 'none'}") from None
        finally:
            if process is not None:
                tracking.stop_server(process)
