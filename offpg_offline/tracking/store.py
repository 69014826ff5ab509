"""Which tracking store, whether it is usable, and opening it safely.

`resolve_uri` picks the store (config, else $MLFLOW_TRACKING_URI, else ./mlflow.db) and
`validate_uri` refuses what MLflow cannot use, in one sentence, before any run starts.
`connect` opens an `MlflowClient` under a lock on a sqlite store's folder, so that processes
starting together never migrate a fresh database at the same time, and `experiment_id` creates
an experiment once even when several runs race to create it. mlflow is imported inside the
functions that need it: resolving and validating a URI stays cheap (`offpg --help`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from offpg_offline.config import TrackingConfig

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_URI = "sqlite:///mlflow.db"
# SQLAlchemy database schemes MLflow stores runs in (mlflow.store.db.db_types), and its own.
_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
_SERVERS = ("http", "https", "databricks")
_SQLITE_MAGIC = b"SQLite format 3\x00"


def _shown(text: str) -> str:
    """`text` on one line: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def resolve_uri(config: TrackingConfig) -> str:
    """The store: the config's URI, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (in cwd).

    A relative sqlite path is made absolute (MLflow caches stores per URI), and the URI is
    checked with `validate_uri`.

    Raises:
        ValueError: an unsupported URI (one sentence).
    """
    uri = config.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(Path.cwd() / uri.removeprefix('sqlite:///')).resolve()}"
    return validate_uri(uri)


def is_server(uri: str) -> bool:
    """Whether `uri` is an MLflow tracking server (reached over HTTP)."""
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(urllib.parse.unquote(uri.removeprefix("sqlite:///").split("?")[0]))


def validate_uri(uri: str) -> str:
    """`uri` unchanged when MLflow can record runs there; else ValueError, one sentence.

    Accepted: `sqlite:///PATH` whose PATH is an SQLite file or a new name in an existing
    folder; `http(s)://HOST[:PORT]` (a tracking server); `databricks[://PROFILE]`; database
    URIs `postgresql://`, `mysql://`, `mssql://` (with an optional `+driver`); a folder path
    or `file:` URI (MLflow's file store). Refused: a path to a file that is not a folder (did
    you mean `sqlite:///PATH`?), a path under a file, a missing folder, `sqlite://` in memory
    (nothing would be kept), any other scheme (`ftp://`, `s3://` ...).
    """
    shown = _shown(uri)
    parsed = urllib.parse.urlsplit(uri)
    scheme = parsed.scheme.lower().split("+")[0]
    if scheme == "sqlite":
        path = sqlite_path(uri)
        if path is None or str(path) in ("", ":memory:"):
            raise ValueError(f"tracking URI {shown} is an in-memory sqlite store, which keeps "
                             "nothing; use sqlite:///PATH/mlflow.db")
        _check_sqlite_file(path, shown)
    elif scheme in _DATABASES or scheme == "databricks":
        pass
    elif scheme in _SERVERS:
        if not parsed.netloc:
            raise ValueError(f"tracking URI {shown} names no host; use http://HOST:PORT")
    elif scheme in ("", "file"):  # a path: MLflow's file store (a folder)
        folder = Path(urllib.parse.unquote(parsed.path) if scheme == "file" else uri)
        _check_folder_store(folder, shown)
    else:
        raise ValueError(
            f"tracking URI {shown} has the unsupported scheme {parsed.scheme!r}; use "
            "sqlite:///PATH, http(s)://HOST:PORT, or a postgresql://, mysql:// or mssql:// "
            "database")
    return uri


def _first_existing(path: Path) -> Path:
    """`path` itself if it exists, else its closest existing ancestor."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _check_sqlite_file(path: Path, shown: str) -> None:
    path = path if path.is_absolute() else Path.cwd() / path
    existing = _first_existing(path)
    if existing == path:
        if not path.is_file():
            raise ValueError(f"tracking URI {shown}: {_shown(str(path))} is not a file "
                             "(a sqlite store is one database file)")
        with path.open("rb") as handle:
            head = handle.read(len(_SQLITE_MAGIC))
        if head and head != _SQLITE_MAGIC:
            raise ValueError(f"tracking URI {shown}: {_shown(str(path))} is not an SQLite "
                             "database")
    elif not existing.is_dir():
        raise ValueError(f"tracking URI {shown}: {_shown(str(existing))} is a file, so no "
                         "store can be created under it")
    elif existing != path.parent:
        raise ValueError(f"tracking URI {shown}: the folder {_shown(str(path.parent))} does "
                         "not exist; create it first")


def _check_folder_store(folder: Path, shown: str) -> None:
    full = folder if folder.is_absolute() else Path.cwd() / folder
    existing = _first_existing(full)
    if existing != full and not existing.is_dir():
        raise ValueError(f"tracking URI {shown}: {_shown(str(existing))} is a file, so no "
                         "store can be created under it")
    if not full.is_dir() and (existing == full or full.suffix in (".db", ".sqlite")):
        raise ValueError(f"tracking URI {shown} is a file path, not a store; for a sqlite "
                         f"database use sqlite:///{_shown(str(folder))}")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (one sentence) when an HTTP tracking server does not answer its health check."""
    if not is_server(uri):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", err)
        raise ValueError(f"MLflow tracking server {uri} is unreachable ({reason})") from None


@contextlib.contextmanager
def first_use_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive `flock` on a sqlite store's folder (nothing for other stores).

    MLflow creates and migrates a sqlite database on first use; two processes doing it at
    once can leave it half-migrated. The lock is on the folder, not the database: closing any
    descriptor of the database file would drop SQLite's own POSIX locks in this process.
    """
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def connect(uri: str) -> MlflowClient:
    """A client for a validated store, created under `first_use_lock`.

    Raises:
        ValueError: the server does not answer, or the store cannot be opened (one sentence).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    check_reachable(uri)
    try:
        with first_use_lock(uri):
            return MlflowClient(tracking_uri=uri)  # opens (creates, migrates) the store
    except (MlflowException, OSError) as err:
        raise ValueError(f"cannot open the MLflow tracking store {_shown(uri)} "
                         f"({first_line(err)})") from None


def open_client(config: TrackingConfig) -> MlflowClient:
    """A client for the configured store (fails fast when a server is unreachable)."""
    return connect(resolve_uri(config))


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of the experiment `name`, created if new.

    Runs that start together may all find no experiment and all create it: the store keeps
    one and refuses the others (RESOURCE_ALREADY_EXISTS); the losers read the winner's id.
    On a sqlite store this runs under `first_use_lock` as well.

    Raises:
        ValueError: the experiment exists but was deleted.
    """
    from mlflow.exceptions import MlflowException

    uri = str(client.tracking_uri)
    with first_use_lock(uri):
        for _ in range(5):
            found = client.get_experiment_by_name(name)
            if found is not None:
                if found.lifecycle_stage == "deleted":
                    raise ValueError(f"MLflow experiment {name!r} in {_shown(uri)} was deleted; "
                                     "restore it (mlflow experiments restore) or pick another "
                                     "--experiment")
                return str(found.experiment_id)
            try:
                return str(client.create_experiment(name))
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
    raise ValueError(f"MLflow experiment {name!r} could not be created in {_shown(uri)}")


def first_line(err: BaseException) -> str:
    """The first line of an error's text (its type's name when empty), at most 300 chars."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    return _shown(re.sub(r"^\([\w.]+\) ", "", lines[0])[:300])  # "(sqlite3.OperationalError) "
