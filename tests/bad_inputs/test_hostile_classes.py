"""Hostile inputs by CLASS: each class is a generator of variants run through the real CLI.

Issue 13 listed failures by class (untrusted cards, path escapes, non-regular files, foreign
values, messages); the cases here are generated per class (every key × every kind of lie,
every escape form, every kind of non-regular file, ...), so a new variant of a class is caught
without a hand-written case. Every case must meet the failure contract:

- exit code 2 (a user error, not a crash), the exception a SystemExit;
- exactly one line on stderr, `error: <sentence>`, with no control character in it;
- no "Traceback" and none of the library phrases users should never see (`JARGON`);
- the culprit named (the words of the case: file, key, column, row);
- nothing written: the folder is exactly as it was (no dataset, no temp folder, no mlflow.db).

`CLASS_COUNTS` says how many cases each class holds; the report quotes it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from offpg_offline.cli import app
from offpg_offline.data import card as card_model
from offpg_offline.data.schema import DataError, steps_table
from offpg_offline.data.store import card_path, write_dataset

JARGON = ("Traceback", "Unsupported cast", "Overflow when unpacking", "weights_only` set to",
          "Re-running `torch.load`", "ArrowInvalid", "ComputeError", "pyarrow.lib",
          "polars.exceptions", "KeyError", "TypeError", "AttributeError", "IndexError")


@dataclass(frozen=True)
class Case:
    """One hostile input: `build(tmp)` prepares it in `tmp` and returns the argv."""

    id: str
    build: Callable[[Path], list[str]]
    words: tuple[str, ...]
    report: bool = False  # stdout may hold a report (info --verify shows what it checked)


# --- a small valid dataset, copied into each case's folder ---

CARTPOLE_ENTRY = "gymnasium.envs.classic_control.cartpole:CartPoleEnv"


def _tiny_log(lengths: tuple[int, ...] = (3, 4, 2)) -> pa.Table:
    rng = np.random.default_rng(0)
    n = sum(lengths)
    episode = np.repeat(np.arange(len(lengths)), lengths)
    step = np.concatenate([np.arange(k) for k in lengths])
    last = np.r_[episode[1:] != episode[:-1], True]
    obs = rng.normal(size=(n, 4)).astype(np.float32)
    return steps_table(episode_id=episode, step=step, obs=obs, action=np.arange(n) % 2,
                       reward=rng.normal(size=n), next_obs=obs + 1, terminated=last,
                       truncated=np.zeros(n, dtype=bool), logged_logp=np.full(n, math.log(0.5)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    card = {"name": "tiny", "description": "three CartPole-like episodes",
            "action_space": {"type": "Discrete", "dtype": "int64", "start": 0, "n": 2},
            "env_spec": {"id": "CartPole-v1", "entry_point": CARTPOLE_ENTRY},
            "propensity": {"logged_logp": {"source": "uniform"}}}
    return write_dataset(tmp_path_factory.mktemp("tiny") / "tiny", [_tiny_log()], card=card)


_TINY: list[Path] = []  # set by the autouse fixture below: builders run inside the test


@pytest.fixture(autouse=True)
def _remember_tiny(tiny: Path) -> None:
    _TINY[:] = [tiny]


def _copy(tmp: Path) -> Path:
    ds = tmp / "ds"
    shutil.copytree(_TINY[0], ds)
    return ds


def _card(ds: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(card_path(ds).read_text())
    return loaded


def _write_card(ds: Path, card: Any) -> None:
    card_path(ds).write_text(json.dumps(card))


# --- the contract ---


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.lstat().st_mtime_ns for p in folder.rglob("*")}


def _check(result_code: int, stdout: str, stderr: str, case: Case) -> None:
    lines = [line for line in stderr.splitlines() if not line.startswith("warning: ")]
    assert result_code == 2, (result_code, stdout, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert lines[0].isprintable(), repr(lines[0])
    assert case.report or not stdout.strip(), stdout
    for phrase in JARGON:
        assert phrase not in stdout + stderr, (phrase, stderr)
    for word in case.words:
        assert word in lines[0], (word, lines[0])


def _run_in_process(case: Case, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    argv = case.build(tmp)
    before = _snapshot(tmp)
    result = CliRunner().invoke(app, argv)
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    _check(result.exit_code, result.stdout, result.stderr, case)
    assert _snapshot(tmp) == before, "the command wrote or changed files"


def _run_in_subprocess(case: Case, tmp: Path) -> None:
    """For inputs that could block a reader forever (FIFOs): a child process with a timeout."""
    argv = case.build(tmp)
    before = _snapshot(tmp)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-c", "from offpg_offline.cli import app; app()",
                           *argv], cwd=tmp, env=env, capture_output=True, text=True, timeout=60)
    _check(done.returncode, done.stdout, done.stderr, case)
    assert _snapshot(tmp) == before, "the command wrote or changed files"


# --- class: untrusted cards (each key × each kind of lie) ---

KINDS: dict[str, Any] = {"null": None, "boolean": True, "text": "x", "number": 1.5, "list": [],
                         "object": {}}
# key path → the kinds a valid card may hold there (every other kind is a lie).
KEYS: dict[str, set[str]] = {
    "schema_version": set(), "name": {"text"}, "description": {"text", "null"},
    "observation_space": {"object"}, "action_space": {"object"}, "counts": {"object"},
    "files": {"list"}, "propensity": {"object"}, "env_spec": {"null", "object"},
    "counts.steps": set(), "counts.episodes": set(), "files[0]": {"object"},
    "files[0].name": {"text"}, "files[0].rows": set(), "files[0].episodes": set(),
    "files[0].bytes": set(), "files[0].sha256": set(), "action_space.n": set(),
    "action_space.start": set(), "observation_space.shape": {"list"},
    "observation_space.low": {"list"}, "observation_space.high": {"list"},
    "observation_space.type": set(), "action_space.type": set(), "env_spec.id": {"text"},
    "env_spec.max_episode_steps": {"null"}, "env_spec.kwargs": {"null", "object"},
    "propensity.logged_logp": {"null", "object"}, "env_spec.entry_point": {"null"},
}
# key path → values of a plausible kind that are still lies (range, consistency, escape, code).
VALUES: dict[str, list[Any]] = {
    "schema_version": [2, 0, -1, "1", 1.0],
    "name": ["", "a\nb", " "],
    "counts.steps": [10, 8, 0, -1, 2**63, 10**30],
    "counts.episodes": [4, 2, 0, 10**30],
    "files[0].rows": [10, 0, -3],
    "files[0].episodes": [-1, 4],
    "files[0].bytes": [0, -5, 2**64],
    "files[0].sha256": ["abc", "A" * 64, "g" * 64, 7],
    "files": [[], "part-00000.parquet"],
    "action_space.n": [0, -1, 10**30, 2.0, "2"],
    "action_space.start": [2**70],
    "action_space.type": ["MultiBinary", "Dict", None],
    "observation_space.type": ["Tuple", "Text"],
    "observation_space.shape": [[0], [-4], [2**40, 2**40], ["4"], [4.0]],
    "observation_space.low": [[0, 0, 0], ["nan", 0, 0, 0], [[0, 0], [0]], [True] * 4],
    "observation_space.high": [[1, 1, 1, 1, 1], ["big", 1, 1, 1]],
    "observation_space.dtype": ["int64", "object"],
    "env_spec.id": ["os:system", "evil_module:Env-v0", "Cart Pole", "a/b/c-v0", ""],
    "env_spec.entry_point": ["os:system", "evil_module:Env"],
    "env_spec.max_episode_steps": [0, -1, 1.5],
    "propensity.estimated_logp": [{"model_checkpoint": "../x.pt"},
                                  {"model_checkpoint": "/etc/passwd"}, 3],
    "propensity.behaviour_logp": [{}],
}


def _set(card: Any, key: str, value: Any, *, delete: bool = False) -> None:
    parts = key.replace("[", ".[").split(".")
    node = card
    for part in parts[:-1]:
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    last = parts[-1]
    index: Any = int(last[1:-1]) if last.startswith("[") else last
    if delete:
        del node[index]
    else:
        node[index] = value


def _lie(key: str, value: Any = None, *, delete: bool = False) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        ds = _copy(tmp)
        card = _card(ds)
        _set(card, key, value, delete=delete)
        _write_card(ds, card)
        return ["info", str(ds), "--verify"]

    return build


def _key_word(key: str, value: Any) -> str:
    """The key a refusal names: itself, or the count that a positive file-list lie contradicts."""
    if key in ("files[0].rows", "files[0].episodes") and isinstance(value, int) and value > 0:
        return "counts.steps" if key.endswith("rows") else "counts.episodes"
    return key


def card_lie_cases() -> list[Case]:
    cases = []
    for key, valid in KEYS.items():
        for kind, value in KINDS.items():
            if kind not in valid:
                cases.append(Case(f"card-{key}-{kind}", _lie(key, value), ("_dataset.json", key)))
    for key, values in VALUES.items():
        for i, value in enumerate(values):
            cases.append(Case(f"card-{key}-value{i}", _lie(key, value),
                              ("_dataset.json", _key_word(key, value))))
    for key in card_model.REQUIRED_KEYS:
        cases.append(Case(f"card-missing-{key}", _lie(key, delete=True), ("_dataset.json", key)))
    for i, spec in enumerate(['{"id": "Mine-v0", "entry_point": "os:system"}',
                              '{"id": "CartPole-v1", "entry_point": "subprocess:call"}',
                              "evil_module:Env-v0"]):
        cases.append(Case(f"card-ingest-env-code{i}", _ingest_env(spec), ("--env", "env_spec")))
    for i, top in enumerate([[], "card", 3, None, [{"schema_version": 1}]]):
        cases.append(Case(f"card-not-an-object{i}", _whole_card(top),
                          ("_dataset.json", "JSON object")))
    return cases


def _ingest_env(spec: str) -> Callable[[Path], list[str]]:
    """`ingest --env` naming code: refused before gymnasium imports it and before writing."""

    def build(tmp: Path) -> list[str]:
        _log_frame().write_parquet(tmp / "log.parquet")
        return [*_ingest("log.parquet"), "--env", spec]

    return build


def _whole_card(value: Any) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        ds = _copy(tmp)
        _write_card(ds, value)
        return ["info", str(ds)]

    return build


# --- class: card ↔ parts lies (found before training; train's and info --verify's check) ---


def _parts_lie(edit: Callable[[Path, dict[str, Any]], None], *extra: str,
               command: str = "train") -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        ds = _copy(tmp)
        card = _card(ds)
        edit(ds, card)
        _write_card(ds, card)
        if command == "train":
            return ["train", str(ds), "--steps", "1", *extra]
        return ["info", str(ds)] if command == "info-plain" else ["info", str(ds), "--verify"]

    return build


def _obs_width(ds: Path, card: dict[str, Any]) -> None:
    card["observation_space"].update(shape=[5], low=["-inf"] * 5, high=["inf"] * 5)


def _discrete_n(ds: Path, card: dict[str, Any]) -> None:
    card["action_space"]["n"] = 1  # the shard holds actions 0 and 1


def _discrete_start(ds: Path, card: dict[str, Any]) -> None:
    card["action_space"]["start"] = 5


def _box_for_discrete(ds: Path, card: dict[str, Any]) -> None:
    card["action_space"] = {"type": "Box", "dtype": "float32", "shape": [1], "low": [-1.0],
                            "high": [1.0]}


def _bytes(ds: Path, card: dict[str, Any]) -> None:
    card["files"][0]["bytes"] += 1


def _rows(ds: Path, card: dict[str, Any]) -> None:
    card["files"][0]["rows"] += 1
    card["counts"]["steps"] += 1


def _rewrite(ds: Path, card: dict[str, Any], column: str, value: float) -> None:
    """Rewrite the shard with one bad value and make the card agree on bytes and rows (only the
    sha256 tells)."""
    shard = ds / card["files"][0]["name"]
    table = pq.read_table(shard)
    values = table.column(column).to_numpy().copy()
    values[4] = value
    table = table.set_column(table.schema.get_field_index(column), column,
                             pa.array(values, pa.float32()))
    pq.write_table(table, shard)
    card["files"][0]["bytes"] = shard.stat().st_size


def _nan_reward(ds: Path, card: dict[str, Any]) -> None:
    _rewrite(ds, card, "reward", math.nan)


def _inf_reward(ds: Path, card: dict[str, Any]) -> None:
    _rewrite(ds, card, "reward", math.inf)


def _reward_strings(ds: Path, card: dict[str, Any]) -> None:
    """The shard's reward column rewritten as text (before: numpy's "could not convert")."""
    shard = ds / card["files"][0]["name"]
    table = pq.read_table(shard)
    table = table.set_column(table.schema.get_field_index("reward"), "reward",
                             pa.array(["a"] * table.num_rows))
    pq.write_table(table, shard)
    card["files"][0]["bytes"] = shard.stat().st_size


def _truncated(ds: Path, card: dict[str, Any]) -> None:
    shard = ds / card["files"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:200])
    card["files"][0]["bytes"] = 200


def parts_lie_cases() -> list[Case]:
    return [
        Case("parts-obs-width", _parts_lie(_obs_width), ("part-00000.parquet", "'obs'", "[5]")),
        Case("parts-discrete-n", _parts_lie(_discrete_n), ("part-00000.parquet", "'action'")),
        Case("parts-discrete-start", _parts_lie(_discrete_start),
             ("part-00000.parquet", "'action'")),
        Case("parts-box-for-discrete", _parts_lie(_box_for_discrete),
             ("part-00000.parquet", "'action'", "int64")),
        Case("parts-bytes", _parts_lie(_bytes), ("part-00000.parquet", "files[0].bytes")),
        Case("parts-rows", _parts_lie(_rows), ("part-00000.parquet", "files[0].rows")),
        Case("parts-nan-reward-verify", _parts_lie(_nan_reward, "--verify"),
             ("part-00000.parquet", "sha256")),
        Case("parts-inf-reward-verify", _parts_lie(_inf_reward, "--verify"),
             ("part-00000.parquet", "sha256")),
        Case("parts-truncated", _parts_lie(_truncated), ("part-00000.parquet", "Parquet")),
        Case("parts-reward-strings", _parts_lie(_reward_strings),
             ("part-00000.parquet", "'reward'", "string")),
        Case("parts-reward-strings-info", _parts_lie(_reward_strings, command="info-plain"),
             ("part-00000.parquet", "'reward'", "string")),
        Case("parts-obs-width-info", _parts_lie(_obs_width, command="info"),
             ("part-00000.parquet", "'obs'"), report=True),
        Case("parts-discrete-n-info", _parts_lie(_discrete_n, command="info"),
             ("part-00000.parquet", "'action'"), report=True),
    ]


# --- class: paths that leave the dataset folder ---

ESCAPES = ["/etc/passwd", "../outside.parquet", "../../etc/passwd", "sub/part-00000.parquet",
           "..", ".", "", "part\n.parquet", "a\\b.parquet", "part\x00.parquet", "~/x.parquet"]


def _escape(name: str, command: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        ds = _copy(tmp)
        shutil.copy(ds / "part-00000.parquet", tmp / "outside.parquet")
        card = _card(ds)
        card["files"][0]["name"] = name
        _write_card(ds, card)
        return ["info", str(ds), "--verify"] if command == "info" else [
            "train", str(ds), "--steps", "1"]

    return build


def _symlink_out(target: str) -> Callable[[Path], list[str]]:
    """The listed shard is a symbolic link to a file outside the folder."""

    def build(tmp: Path) -> list[str]:
        ds = _copy(tmp)
        outside = tmp / "elsewhere" / "part.parquet"
        outside.parent.mkdir()
        shutil.move(ds / "part-00000.parquet", outside)
        (ds / "part-00000.parquet").symlink_to(outside if target == "absolute"
                                               else Path("..") / "elsewhere" / "part.parquet")
        return ["info", str(ds), "--verify"]

    return build


def path_escape_cases() -> list[Case]:
    cases = [Case(f"escape-{command}-{i}", _escape(name, command),
                  ("_dataset.json", "files[0].name"))
             for i, name in enumerate(ESCAPES) for command in ("info", "train")]
    cases += [Case(f"escape-symlink-{kind}", _symlink_out(kind),
                   ("_dataset.json", "files[0].name", "outside the dataset folder"))
              for kind in ("absolute", "relative")]
    for i, checkpoint in enumerate(["../model.pt", "/tmp/model.pt", "_behavior/../../x.pt"]):
        cases.append(Case(f"escape-model-checkpoint{i}", _lie(
            "propensity.estimated_logp", {"source": "fit", "model_checkpoint": checkpoint}),
            ("_dataset.json", "propensity.estimated_logp.model_checkpoint")))
    return cases


# --- class: non-regular files (run in a child process: a FIFO could block forever) ---


def _log_frame() -> pl.DataFrame:
    episode = np.repeat([100, 101, 102], [3, 4, 2])
    rng = np.random.default_rng(1)
    return pl.DataFrame({"episode": episode, "x0": rng.normal(size=9), "x1": rng.normal(size=9),
                         "action": np.arange(9) % 2, "reward": rng.normal(size=9),
                         "done": np.r_[episode[1:] != episode[:-1], True]})


MAPPING = ["--map", "episode_id=episode", "--map", "done=done", "--obs-cols", "x*", "--quiet"]


def _ingest(source: str) -> list[str]:
    return ["ingest", "parquet", source, "--out", "out", *MAPPING]


def _special(kind: str, where: str) -> Callable[[Path], list[str]]:
    """A FIFO, socket or device named *.parquet: inside an input folder, or given directly."""

    def build(tmp: Path) -> list[str]:
        folder = tmp / "logs"
        folder.mkdir()
        _log_frame().write_parquet(folder / "a.parquet")
        path = folder / "b.parquet"
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "socket":
            server = socket.socket(socket.AF_UNIX)
            server.bind(str(path))  # the file stays after the socket object is gone
            server.close()
        else:
            path.symlink_to("/dev/zero")
        return _ingest(str(folder) if where == "folder" else str(path))

    return build


def _fifo_shard(tmp: Path) -> list[str]:
    ds = _copy(tmp)
    (ds / "part-00000.parquet").unlink()
    os.mkfifo(ds / "part-00000.parquet")
    return ["info", str(ds), "--verify"]


def non_regular_cases() -> list[Case]:
    cases = [Case(f"special-{kind}-{where}", _special(kind, where),
                  ("b.parquet", "regular"))
             for kind in ("fifo", "socket", "device") for where in ("folder", "direct")]
    cases.append(Case("special-fifo-shard", _fifo_shard,
                      ("_dataset.json", "files[0].name", "not a regular file")))
    return cases


# --- class: foreign values ---


def _unsigned(column: str, value: int) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        frame = _log_frame()
        values = frame[column].to_numpy().astype(np.uint64)
        values[5] = value
        frame = frame.with_columns(pl.Series(column, values, dtype=pl.UInt64))
        frame.write_parquet(tmp / "log.parquet")
        return _ingest("log.parquet")

    return build


def _duplicated_header(column: str, suffix: str) -> Callable[[Path], list[str]]:
    """The CSV header names `column` twice (another column renamed to it)."""

    def build(tmp: Path) -> list[str]:
        frame = _log_frame()
        separator = "\t" if suffix == ".tsv" else ","
        lines = frame.write_csv(separator=separator).splitlines()
        names = lines[0].split(separator)
        other = next(n for n in names if n != column)
        names[names.index(other)] = column
        lines[0] = separator.join(names)
        (tmp / f"log{suffix}").write_text("\n".join(lines) + "\n")
        return _ingest(f"log{suffix}")

    return build


# Arrow types a foreign list column may have whose values are not a flat vector of numbers.
LIST_TYPES: dict[str, tuple[pa.DataType, list[Any]]] = {
    "list-of-strings": (pa.list_(pa.string()), ["a", "b"]),
    "large-list-of-lists": (pa.large_list(pa.list_(pa.float64())), [[1.0], [2.0]]),
    "fixed-size-list-of-strings": (pa.list_(pa.string(), 2), ["a", "b"]),
    "struct": (pa.struct([("a", pa.float64())]), {"a": 1.0}),
}


def _vector_column(key: str, kind: str) -> Callable[[Path], list[str]]:
    """`key` (obs, next_obs or action) as a list column of a foreign type."""

    def build(tmp: Path) -> list[str]:
        frame = _log_frame()
        columns = {name: pa.array(frame[name].to_numpy()) for name in
                   ("episode", "action", "reward", "done")}
        columns["obs"] = pa.array([[1.0, 2.0]] * len(frame))
        dtype, value = LIST_TYPES[kind]
        columns[key] = pa.array([value] * len(frame), type=dtype)
        pq.write_table(pa.table(columns), tmp / "log.parquet")
        return ["ingest", "parquet", "log.parquet", "--out", "out", "--map", "episode_id=episode",
                "--map", "done=done", "--quiet"]

    return build


def _next_obs_width(tmp: Path) -> list[str]:
    frame = _log_frame()
    pq.write_table(pa.table({"episode": frame["episode"].to_numpy(), "obs": [[1.0, 2.0]] * 9,
                             "next_obs": [[1.0, 2.0, 3.0]] * 9, "action": np.arange(9) % 2,
                             "reward": np.ones(9), "done": frame["done"].to_numpy()}),
                   tmp / "log.parquet")
    return ["ingest", "parquet", "log.parquet", "--out", "out", "--map", "episode_id=episode",
            "--map", "done=done", "--quiet"]


# Sizes beyond int64 (before: "OverflowError" traceback), zero sizes, NaN or crossed bounds,
# bounds of the wrong length or kind (before: gymnasium's "Box low.shape doesn't match").
ACTION_SPACES = ["discrete:99999999999999999999999", "discrete:0", "box:0:1:0",
                 "box:0:1:99999999999", "box:1:-1:2", "box:nan:1:2", "[1]",
                 '{"type": "Box", "shape": [2], "low": [0, 0], "high": [1]}',
                 '{"type": "Box", "shape": [2], "low": 0, "high": [1, 1]}',
                 '{"type": "Discrete", "n": 1e400}', '{"type": "Discrete", "n": 2, "start": "a"}']


def _action_space(text: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        _log_frame().write_parquet(tmp / "log.parquet")
        return [*_ingest("log.parquet"), "--action-space", text]

    return build


def foreign_value_cases() -> list[Case]:
    cases = [Case(f"foreign-uint64-{column}-{value}", _unsigned(column, value),
                  ("log.parquet", f"'{column}'", "row 5", str(value)))
             for column in ("episode", "action") for value in (2**63, 2**63 + 1, 2**64 - 1)]
    cases += [Case(f"foreign-duplicated-header-{column}{suffix}",
                   _duplicated_header(column, suffix), (f"log{suffix}", f"'{column}'", "twice"))
              for column in _log_frame().columns for suffix in (".csv", ".tsv")]
    cases += [Case(f"foreign-{key}-{kind}", _vector_column(key, kind),
                   ("log.parquet", f"'{key}'", "has type"))
              for key in ("obs", "next_obs", "action") for kind in LIST_TYPES]
    for i, space in enumerate(ACTION_SPACES):
        cases.append(Case(f"foreign-action-space{i}", _action_space(space), ("--action-space",)))
    cases.append(Case("foreign-next-obs-width", _next_obs_width,
                      ("log.parquet", "'next_obs'", "3 values where obs has 2")))
    return cases


# --- class: messages (one line, escaped, our words) ---

CONTROL = {"newline": "\n", "return": "\r", "tab": "\t", "escape": "\x1b[31m", "bell": "\x07"}


def _control_name(char: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        frame = _log_frame().with_columns(pl.lit(float("nan")).alias("reward"))
        frame.write_parquet(tmp / f"lo{char}g.parquet")
        return _ingest(f"lo{char}g.parquet")

    return build


def _control_folder(char: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        ds = tmp / f"d{char}s"
        shutil.copytree(_TINY[0], ds)
        card_path(ds).write_text('{"schema_version": 1, ')
        return ["info", str(ds)]

    return build


def _system_checkpoint(tmp: Path) -> list[str]:
    """A torch checkpoint whose pickle calls os.system when loaded without weights_only."""
    import pickle
    import zipfile

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, ("touch pwned",))

    with zipfile.ZipFile(tmp / "policy.pt", "w") as archive:
        archive.writestr("policy/data.pkl", pickle.dumps(Payload(), protocol=2))
        archive.writestr("policy/byteorder", "little")
        archive.writestr("policy/version", "3\n")
    return ["evaluate", "policy.pt", "--dataset", str(_TINY[0])]


def message_cases() -> list[Case]:
    cases = [Case(f"message-file-name-{name}", _control_name(char),
                  (f"lo{char.encode('unicode_escape').decode()}g.parquet", "'reward'"))
             for name, char in CONTROL.items()]
    cases += [Case(f"message-folder-name-{name}", _control_folder(char),
                   ("_dataset.json", "not valid JSON"))
              for name, char in CONTROL.items()]
    cases.append(Case("message-checkpoint-os-system", _system_checkpoint,
                      ("policy.pt", "system", "could run code")))
    return cases


CLASSES: dict[str, list[Case]] = {
    "untrusted-card": card_lie_cases(),
    "card-vs-parts": parts_lie_cases(),
    "path-escape": path_escape_cases(),
    "non-regular-file": non_regular_cases(),
    "foreign-value": foreign_value_cases(),
    "message": message_cases(),
}
CLASS_COUNTS = {name: len(cases) for name, cases in CLASSES.items()}
IN_PROCESS = [c for name, cases in CLASSES.items() if name != "non-regular-file" for c in cases]


def test_every_class_has_many_distinct_variants() -> None:
    ids = [c.id for cases in CLASSES.values() for c in cases]
    assert len(ids) == len(set(ids))
    assert all(count >= 5 for count in CLASS_COUNTS.values()), CLASS_COUNTS
    # Every key of the card model is lied about, and every required key is removed once.
    lied = {c.id.split("-")[1] for c in CLASSES["untrusted-card"] if c.id.startswith("card-")}
    assert {"schema_version", "counts.steps", "files[0].name", "env_spec.entry_point"} <= lied


@pytest.mark.parametrize("case", IN_PROCESS, ids=lambda case: case.id)
def test_hostile_input_meets_the_failure_contract(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run_in_process(case, tmp_path, monkeypatch)


@pytest.mark.parametrize("case", CLASSES["non-regular-file"], ids=lambda case: case.id)
def test_non_regular_files_are_refused_without_blocking(case: Case, tmp_path: Path) -> None:
    _run_in_subprocess(case, tmp_path)


def test_the_os_system_checkpoint_ran_nothing(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    case = next(c for c in CLASSES["message"] if c.id == "message-checkpoint-os-system")
    _run_in_process(case, tmp_path, monkeypatch)
    assert not (tmp_path / "pwned").exists()


# --- positive controls: what the validator must keep accepting ---


def test_a_symlink_to_a_shard_inside_the_folder_and_the_registered_entry_point_are_fine(
    tmp_path: Path,
) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(_TINY[0], ds)
    (ds / "part-00000.parquet").rename(ds / "real.parquet")
    (ds / "part-00000.parquet").symlink_to("real.parquet")
    card = _card(ds)
    assert card["env_spec"]["entry_point"] == CARTPOLE_ENTRY
    assert card_model.validate_card(card, source=card_path(ds)) is card
    card_model.verify_parts(ds, card, full_hash=True)


def test_an_entry_point_is_accepted_only_with_the_users_flag(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(_TINY[0], ds)
    card = _card(ds)
    card["env_spec"] = {"id": "Mine-v0", "entry_point": "my_package.envs:MyEnv"}
    with pytest.raises(DataError, match=r"env_spec\.entry_point.*--allow-env-entry-point"):
        card_model.validate_card(card, source=card_path(ds))
    assert card_model.validate_card(card, source=card_path(ds), allow_env_entry_point=True)


@pytest.mark.parametrize("entry_point, trusted", [
    ("gymnasium_robotics.envs.adroit_hand.adroit_door:AdroitHandDoorEnv", True),
    ("minigrid.envs.doorkey:DoorKeyEnv", True),
    ("subprocess:call", False),
    ("os:system", False),
    ("gymnasium_robotics.utils.mujoco_utils:get_site_xpos", False),
    ("evil_gymnasium.envs:CartPoleEnv", False),
])
def test_an_unregistered_id_keeps_only_an_env_class_of_an_env_package(
    entry_point: str, trusted: bool, tmp_path: Path
) -> None:
    """A Minari dataset of an env whose package is not installed here stays readable; code
    outside environment packages (called with the card's kwargs) is refused."""
    spec = {"id": "NotRegisteredHere-v1", "entry_point": entry_point}
    if trusted:
        card_model.check_env_spec(spec, source=tmp_path / "card")
    else:
        with pytest.raises(DataError, match=r"env_spec\.entry_point"):
            card_model.check_env_spec(spec, source=tmp_path / "card")
    card_model.check_env_spec(spec, source=tmp_path / "card", allow_entry_point=True)


# --- property: any JSON value at any key is refused in one sentence or accepted, never a crash ---

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6,
)


def _leaves(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [prefix] * bool(prefix) + [k for key, value in node.items()
                                          for k in _leaves(value, f"{prefix}.{key}".lstrip("."))]
    if isinstance(node, list):
        return [prefix] + [k for i, value in enumerate(node) for k in _leaves(value,
                                                                                f"{prefix}[{i}]")]
    return [prefix]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_value_at_any_key_is_refused_by_name_or_accepted(data: st.DataObject) -> None:
    ds = _TINY[0]
    card = _card(ds)
    key = data.draw(st.sampled_from(sorted(set(_leaves(card)))))
    value = data.draw(JSON)
    _set(card, key, value)
    try:
        accepted = card_model.validate_card(card, source=card_path(ds))
    except DataError as err:
        message = str(err)
        assert message.isprintable() and str(card_path(ds)) in message, message
        return
    # Accepted: then the parts check either passes or refuses in one sentence too.
    try:
        card_model.verify_parts(ds, accepted)
    except DataError as err:
        assert str(err).isprintable() and str(ds) in str(err), str(err)


def test_non_finite_loaded_steps_are_refused_by_column(tmp_path: Path) -> None:
    """A shard rewritten to the same size (only the sha256 differs) is stopped before training
    by the loaded-batch check, which names the column."""
    from offpg_offline.config import TrainConfig
    from offpg_offline.training.prepare import prepare_data

    ds = tmp_path / "ds"
    shutil.copytree(_TINY[0], ds)
    card = _card(ds)
    _rewrite(ds, card, "reward", math.nan)
    _write_card(ds, card)
    with pytest.raises(DataError, match=r"column 'reward', row 4 .* not finite"):
        prepare_data(ds, TrainConfig(steps=1))
    with pytest.raises(DataError, match="sha256"):
        prepare_data(ds, TrainConfig(steps=1, verify=True))


def test_a_file_name_with_glob_characters_is_that_file_and_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`log[1].parquet` is read as itself; before, polars took it as a pattern that matches
    `log1.parquet` (another file, here one with a NaN reward) or refused it as a bad glob."""
    monkeypatch.chdir(tmp_path)
    _log_frame().write_parquet(tmp_path / "log[1].parquet")
    _log_frame().with_columns(pl.lit(float("nan")).alias("reward")).write_parquet(
        tmp_path / "log1.parquet")
    result = CliRunner().invoke(app, _ingest("log[1].parquet"))
    assert result.exit_code == 0, result.output
    from offpg_offline.data.store import read_table

    rewards = read_table(tmp_path / "out", ["reward"]).column("reward").to_numpy()
    np.testing.assert_array_equal(rewards, _log_frame()["reward"].to_numpy().astype(np.float32))
