"""The offline fallback: what a run keeps when its tracking store fails, and sending it later.

Failure semantics (docs/design.md, "Tracking"): once a call to the store fails *because the
store failed* (`store_failure`: a server that no longer answers its health check; a database
that is locked, full, read-only, unreadable or gone; an artifact folder that cannot be
written), the run stops talking to the store and keeps every later record (metrics, params,
tags, texts, artifacts, the final status) in memory; training goes on and saves its
checkpoints as usual. When the run ends, the records are written to
`<run dir>/unsent-metrics.jsonl`, artifacts that lay outside the run folder are copied into
`<run dir>/unsent-artifacts/`, and the run ends with one sentence saying where they are.
`offpg upload-metrics <run dir>` (`upload_unsent`) sends them once the store works again; it
sends only artifact paths inside the run's folder. Errors that are not the store's (a bad
argument, a duplicate param) are raised as before.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from offpg_offline.tracking.store import (
    check_reachable,
    connect,
    first_line,
    is_server,
    sqlite_path,
    validate_uri,
)

UNSENT_FILE = "unsent-metrics.jsonl"  # what a run could not send to its store
UPLOADED_FILE = "uploaded-metrics.jsonl"  # the same, once sent
UNSENT_ARTIFACTS = "unsent-artifacts"  # copies of artifacts that lay outside the run folder
MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call
MAX_PARAMS = 100  # ... and on params and tags per call
# A local store's OSErrors that mean the store itself failed (not a bad argument).
_STORE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO,
                 errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}
# sqlite3 errors that are the caller's fault, not the store's.
_CALLER_ERRORS = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.DataError,
                  sqlite3.InterfaceError, sqlite3.NotSupportedError)


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def store_failure(uri: str, err: BaseException) -> str | None:
    """Why the store `uri` failed, when `err` says it did; None when `err` is a real error.

    A server failed when it no longer answers its health check. A database store failed when
    the error comes from the database engine's operation (locked, full, read-only, I/O,
    unreachable) rather than from the request (constraint violations are the caller's), or
    from the filesystem (no space, read-only, permissions, a folder gone).
    """
    if is_server(uri):
        try:
            check_reachable(uri, timeout=2.0)
        except ValueError:
            return first_line(err)
        return None
    import sqlalchemy.exc

    causes = list(_chain(err))
    for cause in causes:  # the engine's or the filesystem's own words first
        if isinstance(cause, sqlite3.DatabaseError) and not isinstance(cause, _CALLER_ERRORS):
            return first_line(cause)
        if isinstance(cause, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
            return first_line(cause.orig or cause)
        if isinstance(cause, OSError) and cause.errno in _STORE_ERRNOS:
            where = f": {cause.filename}" if cause.filename else ""
            return first_line(OSError(f"{cause.strerror}{where}"))
    for cause in causes:
        if isinstance(cause, MlflowException) and cause.error_code == "TEMPORARILY_UNAVAILABLE":
            return first_line(cause)
    return None


def store_identity(uri: str) -> tuple[int, int] | None:
    """(device, inode) of a sqlite store's file, None for other stores or a missing file."""
    path = sqlite_path(uri)
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def store_replaced(uri: str, identity: tuple[int, int] | None) -> str | None:
    """Why a sqlite store opened with file `identity` is gone (deleted or replaced), or None.

    SQLite keeps writing to a database file that was deleted or replaced while open, and
    those writes are lost: the file is compared before each write instead.
    """
    path = sqlite_path(uri)
    if path is None or identity is None:
        return None
    if not path.exists():
        return f"the database file {path} was deleted"
    if store_identity(uri) != identity:
        return f"the database file {path} was replaced"
    return None


def store_writable(uri: str) -> bool:
    """Whether a store that failed looks usable again: a server answers, a sqlite database
    takes a write lock within 0.5 s (other stores: assumed not)."""
    if is_server(uri):
        try:
            check_reachable(uri, timeout=2.0)
        except ValueError:
            return False
        return True
    path = sqlite_path(uri)
    if path is None:
        return False
    try:
        with sqlite3.connect(f"file:{quote(str(path))}?mode=rw", uri=True, timeout=0.5) as db:
            db.execute("BEGIN IMMEDIATE")
            db.rollback()
    except sqlite3.Error:
        return False
    return True


def keep_artifact(record: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """An artifact record whose path is inside `run_dir` (copied there when it was not),
    written relative to `run_dir` so that the folder can move before it is uploaded."""
    root = run_dir.resolve()
    source = Path(record["path"]).resolve()
    if not source.is_relative_to(root):
        copies = root / UNSENT_ARTIFACTS
        copies.mkdir(parents=True, exist_ok=True)
        target = copies / f"{sum(1 for _ in copies.iterdir()):03d}-{source.name}"
        if source.is_dir():
            shutil.copytree(source, target)
        elif source.is_file():
            shutil.copy2(source, target)
        source = target
    return {**record, "path": source.relative_to(root).as_posix()}


def write_unsent(run_dir: Path, header: dict[str, Any], records: Sequence[dict[str, Any]]) -> Path:
    """Append `header` and `records` (JSON lines) to `run_dir/unsent-metrics.jsonl`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / UNSENT_FILE
    with path.open("a") as handle:
        for record in (header, *records):
            handle.write(json.dumps(record, allow_nan=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return path


def send_records(client: MlflowClient, run_id: str, records: Sequence[dict[str, Any]],
                 run_dir: Path | None = None) -> int:
    """Send kept records to `run_id`; the number of metric values sent.

    Metrics, params, tags, texts, the final status and artifacts whose files exist are sent
    (relative artifact paths are under `run_dir`); dataset inputs and policy models are not
    (train again or log them by hand).
    """
    metrics = [Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
               for r in records if r["kind"] == "metric"]
    params = [Param(r["key"], r["value"]) for r in records if r["kind"] == "param"]
    tags = [RunTag(r["key"], r["value"]) for r in records if r["kind"] == "tag"]
    for i in range(0, len(params), MAX_PARAMS):
        client.log_batch(run_id, params=params[i : i + MAX_PARAMS])
    for i in range(0, len(tags), MAX_PARAMS):
        client.log_batch(run_id, tags=tags[i : i + MAX_PARAMS])
    for i in range(0, len(metrics), MAX_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_BATCH])
    for record in records:
        if record["kind"] == "text":
            client.log_text(run_id, record["text"], record["artifact_file"])
        elif record["kind"] == "artifact":
            path = (run_dir or Path.cwd()) / record["path"]
            if path.is_file():
                client.log_artifact(run_id, str(path), record["artifact_path"])
            elif path.is_dir():
                client.log_artifacts(run_id, str(path), record["artifact_path"])
    for record in records:
        if record["kind"] == "status":
            client.set_terminated(run_id, status=record["status"])
    return len(metrics)


_REQUIRED = {"run": ("run_id", "tracking_uri"), "metric": ("key", "value", "timestamp", "step"),
             "param": ("key", "value"), "tag": ("key", "value"),
             "text": ("text", "artifact_file"), "artifact": ("path", "artifact_path"),
             "status": ("status",), "dataset": ("path",), "model": ("checkpoint", "name")}


_NUMBERS = frozenset({"value", "timestamp", "step"})  # of a metric; every other field is text


def _numeric(kind: str, key: str) -> bool:
    return kind == "metric" and key in _NUMBERS


def _of_kind(kind: str, key: str, value: Any) -> bool:
    if _numeric(kind, key):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str) or (key == "artifact_path" and value is None)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _checked(path: Path, number: int, record: Any, root: Path) -> dict[str, Any]:
    """One line of an unsent file, its keys present and its artifact inside `root`."""
    where = f"{path}: line {number}"
    if not isinstance(record, dict) or record.get("kind") not in _REQUIRED:
        raise ValueError(f"{where} is not a record of a run (kind one of "
                         f"{', '.join(_REQUIRED)}); nothing was sent")
    missing = [key for key in _REQUIRED[record["kind"]] if key not in record]
    if missing:
        raise ValueError(f"{where}: a {record['kind']} record needs {', '.join(missing)}; "
                         "nothing was sent")
    kind = record["kind"]
    wrong = [key for key in _REQUIRED[kind] if not _of_kind(kind, key, record[key])]
    if wrong:
        raise ValueError(f"{where}: {wrong[0]} of a {kind} record is {_short(record[wrong[0]])}, "
                         f"not a {'number' if _numeric(kind, wrong[0]) else 'string'}; "
                         "nothing was sent")
    if record["kind"] == "artifact":
        named = str(record["path"])
        if not (root / named).resolve().is_relative_to(root):
            raise ValueError(f"{where} names the artifact {named!r}, which is outside the run "
                             f"folder {root}; nothing was sent")
    return record


def upload_unsent(run_dir: Path, uri: str | None = None) -> tuple[str, int]:
    """Send `run_dir/unsent-metrics.jsonl` (what a run kept when its store failed).

    Every line is checked before anything is sent: artifact paths must lie inside `run_dir`
    (after resolving `..` and symbolic links). The file is renamed to
    `uploaded-metrics.jsonl` once sent, so it is never sent twice.

    Args:
        run_dir: the run's folder (`runs/<run id>`, or the `--out-dir` of `offpg train`).
        uri: the tracking store (default: $MLFLOW_TRACKING_URI, else the file's own).

    Returns:
        (run id, number of metric values sent).

    Raises:
        ValueError: no such file, a malformed line, an artifact outside the folder, a store
            that does not answer, or a run it does not know.
    """
    path = Path(run_dir) / UNSENT_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir}: no {UNSENT_FILE} here, nothing to upload")
    root = Path(run_dir).resolve()
    try:
        raw = [(n, json.loads(line)) for n, line in enumerate(path.read_text().splitlines(), 1)
               if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {err.lineno} is not JSON ({err.msg})") from None
    lines = [_checked(path, n, record, root) for n, record in raw]
    runs = {line["run_id"]: line["tracking_uri"] for line in lines if line["kind"] == "run"}
    if len(runs) != 1:
        raise ValueError(f"{path}: expected the records of one run, found {len(runs)}")
    ((run_id, recorded_uri),) = runs.items()
    uri = validate_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or str(recorded_uri))
    client = connect(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"run {run_id} is not in the tracking store {uri}") from None
    sent = send_records(client, run_id, [line for line in lines if line["kind"] != "run"],
                        root)
    path.rename(path.with_name(UPLOADED_FILE))
    return run_id, sent
