"""Property-based fuzzing of `offpg ingest parquet` (the column-mapping path) with hypothesis.

Random foreign logs: episode layouts (lengths, ids reused or out of order, ids as ints, floats
or strings, one file or two with an episode spanning both), column types (ints, floats,
strings, booleans), NaN/inf/null values, probabilities outside (0, 1], ragged list
observations. Whatever the input, the command either writes a complete dataset that verifies
against its card, or exits 2 with one sentence and writes nothing: never a traceback, never a
partial dataset, never a leftover temporary folder.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from offpg_offline.cli import app
from offpg_offline.data.store import read_card, verify_dataset

SPECIAL = [math.nan, math.inf, -math.inf, None, -1.0, 0.0, 1.0, 1.5, 1e30]


@st.composite
def foreign_logs(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    """A foreign log (column name → list of values) and the ingest options that map it."""
    lengths = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    n = sum(lengths)
    ids = draw(st.sampled_from(["ordered", "reused", "shuffled"]))
    episode = np.repeat(np.arange(len(lengths)), lengths)
    if ids == "reused" and len(lengths) > 2:
        episode = np.where(episode == len(lengths) - 1, 0, episode)
    elif ids == "shuffled":
        episode = np.asarray(draw(st.permutations(episode.tolist())))
    id_kind = draw(st.sampled_from(["int", "float", "str"]))
    columns: dict[str, Any] = {
        "ep": (episode.tolist() if id_kind == "int" else
               (episode + draw(st.sampled_from([0.0, 0.5]))).tolist() if id_kind == "float" else
               [f"e{i}" for i in episode]),
    }
    step = (np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)).tolist()
    if draw(st.booleans()):
        columns["t"] = step
    floats = st.floats(-10, 10, allow_nan=False, width=32)
    obs_dim = draw(st.integers(1, 3))
    if draw(st.booleans()):  # one list column, possibly ragged
        rows = [draw(st.lists(floats, min_size=obs_dim, max_size=obs_dim)) for _ in range(n)]
        if draw(st.integers(0, 4)) == 0:
            rows[draw(st.integers(0, n - 1))] = [0.0] * (obs_dim + 1)
        columns["state"] = rows
        options = ["--map", "obs=state"]
    else:
        for d in range(obs_dim):
            columns[f"x{d}"] = draw(st.lists(floats, min_size=n, max_size=n))
        options = ["--obs-cols", "x*"]
    action_kind = draw(st.sampled_from(["int", "int", "float", "str", "negative"]))
    action = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    columns["act"] = (action if action_kind == "int" else [a - 2 for a in action]
                      if action_kind == "negative" else [a + 0.5 for a in action]
                      if action_kind == "float" else [f"a{a}" for a in action])
    columns["rew"] = draw(st.lists(floats, min_size=n, max_size=n))
    ends = np.r_[episode[1:] != episode[:-1], True]
    columns["done"] = (ends.tolist() if draw(st.booleans())
                       else draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    if draw(st.booleans()):
        columns["p"] = draw(st.lists(st.floats(0.05, 1.0), min_size=n, max_size=n))
        options += ["--propensity-col", "p", "--propensity-kind",
                    draw(st.sampled_from(["prob", "logp"]))]
    for _ in range(draw(st.integers(0, 2))):  # poison some cells
        name = draw(st.sampled_from(sorted(columns)))
        value = draw(st.sampled_from([*SPECIAL, "oops", True]))
        values = list(columns[name])
        values[draw(st.integers(0, n - 1))] = value
        columns[name] = values
    options += ["--map", "episode_id=ep", "--map", "action=act", "--map", "reward=rew",
                "--map", "done=done"]
    if "t" in columns:
        options += ["--map", "step=t"]
    return columns, options


def _frame(columns: dict[str, Any]) -> pl.DataFrame | None:
    """The columns as a DataFrame (mixed values become strict-typed or String), or None."""
    try:
        return pl.DataFrame({k: pl.Series(k, v, strict=False) for k, v in columns.items()})
    except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError):
        return None


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(log=foreign_logs(), suffix=st.sampled_from([".parquet", ".parquet", ".csv"]),
       split=st.floats(0.0, 1.0))
def test_random_logs_ingest_completely_or_fail_in_one_sentence(
    log: tuple[dict[str, Any], list[str]], suffix: str, split: float
) -> None:
    columns, options = log
    frame = _frame(columns)
    if frame is None:
        return
    if suffix == ".csv" and any(isinstance(t, pl.List) for t in frame.dtypes):
        suffix = ".parquet"  # CSV has no list columns
    folder = Path(tempfile.mkdtemp(prefix="offpg-fuzz-"))
    try:
        cut = int(split * frame.height)  # 0: one file; else two, episodes may span them
        parts = [frame] if cut == 0 else [frame.head(cut), frame.slice(cut)]
        paths = [folder / f"log-{i}{suffix}" for i in range(len(parts))]
        try:
            for part, path in zip(parts, paths, strict=True):
                part.write_csv(path) if suffix == ".csv" else part.write_parquet(path)
        except pl.exceptions.PolarsError:  # e.g. an Object column: not a file a user can have
            return
        out = folder / "ds"

        result = CliRunner().invoke(app, ["ingest", "parquet", *map(str, paths), "--out",
                                          str(out), "--quiet", *options])

        assert "Traceback" not in result.output
        assert isinstance(result.exception, SystemExit | None), repr(result.exception)
        assert not list(folder.glob("*.tmp-*")), "a temporary folder was left behind"
        if result.exit_code == 0:
            assert verify_dataset(out) == []
            assert read_card(out)["counts"]["steps"] == frame.height
        else:
            assert result.exit_code == 2, result.output
            errors = [line for line in result.stderr.splitlines()
                      if not line.startswith("warning: ")]
            assert len(errors) == 1 and errors[0].startswith("error: "), result.output
            assert not out.exists(), "a failed ingest left an output"
    finally:
        shutil.rmtree(folder)
