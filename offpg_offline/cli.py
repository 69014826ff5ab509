"""`offpg` command line. Parses, composes, reports; the work happens in the job functions.

Heavy modules (torch, pyarrow, mlflow, minari) are imported inside the commands, so
`offpg --help` stays fast. User errors print one sentence and exit with code 2.
"""

from __future__ import annotations

from typing import NoReturn

import typer

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train and evaluate policies from logged trajectories by off-policy policy gradient.",
)
ingest_app = typer.Typer(
    no_args_is_help=True, help="Convert a log into the canonical Parquet format."
)
behavior_app = typer.Typer(no_args_is_help=True, help="Estimate the behavior policy π_β.")
app.add_typer(ingest_app, name="ingest")
app.add_typer(behavior_app, name="behavior")


def fail(message: str) -> NoReturn:
    """Print one sentence on stderr and exit with code 2 (user error, no traceback)."""
    typer.secho(f"error: {message}", err=True, fg="red")
    raise typer.Exit(code=2)


# --- data commands (ingest minari, ingest parquet, info) ---


# --- train command ---


# --- behavior commands ---


# --- evaluate command ---


# --- compare / ui / sweep commands ---


def main() -> None:
    """Console-script entry point."""
    app()
