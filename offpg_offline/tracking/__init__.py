"""Everything MLflow: the only package that imports mlflow (STYLE.md §3.1).

By job, one module each:

- `store`: which store (`resolve_uri`, `validate_uri`), opening it safely (`connect`: a lock
  around a sqlite store's first use; `experiment_id`: get-or-create, safe when runs race).
- `runs`: `MlflowTracker`, one run's params, metrics, tags, inputs and artifacts.
- `offline`: the fallback when a store fails mid-run (`unsent-metrics.jsonl`) and
  `upload_unsent` (`offpg upload-metrics`), confined to the run's folder.
- `model`: the policy as an MLflow pyfunc model (`PolicyModel`).
- `queries`: reading runs back (`find_experiment`, `find_runs`, `child_runs`) for compare.
- `ui`: the `mlflow server` behind `offpg ui` and the UI's URLs.

Names are re-exported here and loaded on first use: `import offpg_offline.tracking` and
`tracking.validate_uri` do not import mlflow (`offpg --help` stays fast).
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import TYPE_CHECKING, Any

from offpg_offline.tracking.store import (
    DEFAULT_URI,
    check_reachable,
    resolve_uri,
    validate_uri,
)
from offpg_offline.tracking.ui import (
    compare_url,
    experiment_url,
    serve,
    server_command,
    stop_server,
    wait_until_ready,
)

if TYPE_CHECKING:
    from mlflow.exceptions import MlflowException

    from offpg_offline.data.store import dataset_digest
    from offpg_offline.tracking.model import PolicyModel
    from offpg_offline.tracking.offline import UNSENT_FILE, upload_unsent
    from offpg_offline.tracking.queries import (
        RunRecord,
        child_runs,
        find_experiment,
        find_runs,
        log_file,
        run_artifact_text,
    )
    from offpg_offline.tracking.runs import (
        MlflowTracker,
        git_commit,
        package_version,
        provenance_tags,
    )
    from offpg_offline.tracking.store import connect, open_client

# MLflow retries a failing HTTP request 7 times with exponential backoff (minutes in all) and
# waits 120 s for an answer; a dead server must not hang a run. Ours, unless the user set them.
for _name, _value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
                      ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                      ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20"),
                      # tqdm bars on stderr would break the CLI's one-line messages
                      ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")):
    os.environ.setdefault(_name, _value)
# "Creating tables..." noise, and the traceback MLflow logs for a database error that we
# turn into one sentence (the offline fallback).
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
logging.getLogger("alembic").setLevel(logging.WARNING)
logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)  # "Validating input example ..."

_LAZY = {
    "MlflowException": "mlflow.exceptions",
    "dataset_digest": "offpg_offline.data.store",
    "PolicyModel": "offpg_offline.tracking.model",
    "UNSENT_FILE": "offpg_offline.tracking.offline",
    "upload_unsent": "offpg_offline.tracking.offline",
    "RunRecord": "offpg_offline.tracking.queries",
    "child_runs": "offpg_offline.tracking.queries",
    "find_experiment": "offpg_offline.tracking.queries",
    "find_runs": "offpg_offline.tracking.queries",
    "log_file": "offpg_offline.tracking.queries",
    "run_artifact_text": "offpg_offline.tracking.queries",
    "MlflowTracker": "offpg_offline.tracking.runs",
    "git_commit": "offpg_offline.tracking.runs",
    "package_version": "offpg_offline.tracking.runs",
    "provenance_tags": "offpg_offline.tracking.runs",
    "connect": "offpg_offline.tracking.store",
    "open_client": "offpg_offline.tracking.store",
}


def __getattr__(name: str) -> Any:
    """Load a re-exported name's module on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_URI",
    "UNSENT_FILE",
    "MlflowException",
    "MlflowTracker",
    "PolicyModel",
    "RunRecord",
    "check_reachable",
    "child_runs",
    "compare_url",
    "connect",
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
    "run_artifact_text",
    "serve",
    "server_command",
    "stop_server",
    "upload_unsent",
    "validate_uri",
    "wait_until_ready",
]
