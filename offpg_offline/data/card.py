"""The dataset card model: one validator that every reader of a card goes through.

A card (`store.card_path(folder)`) is untrusted input: a user may copy a dataset from anyone.
`validate_card` checks a parsed card before any of it is used and refuses, with one sentence
naming the card file and the key (`counts.steps`, `files[0].name`, `env_spec.entry_point`, ...):

- a card that is not a JSON object, lacks a required key, or holds a value of the wrong kind;
- numbers that do not fit (sizes beyond int64, a Discrete `n` of 10^30, NaN bounds);
- counts that contradict the file list (Σ rows ≠ `counts.steps`, Σ episodes ≠ `counts.episodes`);
- shard names that could leave the folder (absolute, `..`, a separator, a symlink whose target
  is outside the folder) or that name something other than a regular file (a FIFO would block
  the reader forever);
- an environment that would make gymnasium import code named by the card: an id of the form
  `module:Name`, or an `entry_point` other than the one gymnasium registered for that id (for
  an id not registered here: other than an `...Env` class of a package in `ENV_PACKAGES`) —
  unless the caller passes `allow_env_entry_point=True` (the user's `--allow-env-entry-point`).

What the card says about the Parquet parts (byte sizes, row counts, observation width and action
type from each footer, the discrete action range from the row-group statistics, and with
`full_hash` the sha256) is checked by `verify_parts`, which training calls before it reads a row:
a shard rewritten after ingest is refused by name instead of training into a NaN policy.
`check_batch_finite` is the last guard on the loaded tensors.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from offpg_offline.data import schema as sc

REQUIRED_KEYS = ("schema_version", "name", "observation_space", "action_space", "counts",
                 "files", "propensity")
_INT_MAX = 2**63 - 1
_MAX_WIDTH = 2**31 - 1  # the widest vector a fixed_size_list can hold
_SHA256 = re.compile(r"[0-9a-f]{64}")
# gymnasium's id grammar without its `module:` prefix (which makes gymnasium import a module).
_ENV_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]+?(?:-v\d+)?")
# Entry points trusted without the user's flag when the id is not registered here (a Minari
# dataset of gymnasium_robotics, say): an environment class (`...Env`) of an environment package.
# `os:system` or `subprocess:call` (called with the card's kwargs) never match.
ENV_PACKAGES = ("gymnasium", "gymnasium_robotics", "minigrid", "miniworld", "ale_py", "shimmy",
                "mo_gymnasium", "highway_env", "metaworld", "panda_gym")
_ENV_CLASS = re.compile(r"(?P<module>[A-Za-z_][\w.]*):[A-Z]\w*Env")


def one_line(text: str) -> str:
    """`text` with control characters (newline, tab, ESC, ...) written as escapes: one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


class _Where:
    """Builds the refusal sentence `<card file>: key '<key>' <problem>.`"""

    __slots__ = ("source",)

    def __init__(self, source: Path) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> sc.DataError:
        return sc.DataError(f"{one_line(str(self.source))}: key '{one_line(key)}' {problem}.",
                            source=str(self.source))


def _kind(value: Any) -> str:
    """What a JSON value is, in the card's terms."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, Mapping) else type(value).__name__


def _object(where: _Where, value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise where.fail(key, f"must be an object, not {_kind(value)}")
    return value


def _integer(where: _Where, value: Any, key: str, *, low: int = 0, high: int = _INT_MAX) -> int:
    """An integer in [low, high] (a bool or 3.0 is refused: the writer writes plain ints)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.fail(key, f"must be an integer, not {_kind(value)} ({one_line(repr(value))})")
    if not low <= value <= high:
        raise where.fail(key, f"is {value}, outside {low}..{high}")
    return value


def _string(where: _Where, value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise where.fail(key, f"must be a string, not {_kind(value)}")
    return value


def _bounds(where: _Where, value: Any, key: str, size: int) -> list[float]:
    """A Box bound: (nested) lists of numbers / 'inf' / '-inf' with `size` values in all."""
    if not isinstance(value, list):
        raise where.fail(key, f"must be a list of bounds, not {_kind(value)}")
    flat: list[Any] = []
    stack = [value]
    while stack:  # flatten, depth first, keeping order
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    numbers: list[float] = []
    for item in flat:
        if isinstance(item, str) and item in ("inf", "-inf", "Infinity", "-Infinity"):
            numbers.append(math.inf if not item.startswith("-") else -math.inf)
        elif isinstance(item, int | float) and not isinstance(item, bool) and not (
                isinstance(item, float) and math.isnan(item)):
            numbers.append(float(item))
        else:
            raise where.fail(key, f"holds {one_line(repr(item))}, not a number or 'inf'/'-inf'")
    if len(numbers) != size:
        raise where.fail(key, f"has {len(numbers)} values, but the shape has {size}")
    return numbers


def _space(where: _Where, value: Any, key: str) -> int | None:
    """Check a Box or Discrete space; return the flat Box width, or None for Discrete."""
    space = _object(where, value, key)
    kind = space.get("type")
    if kind == "Discrete":
        _integer(where, space.get("n"), f"{key}.n", low=1, high=_MAX_WIDTH)
        _integer(where, space.get("start", 0), f"{key}.start", low=-(2**62), high=2**62)
        return None
    if kind != "Box":
        raise where.fail(f"{key}.type", f"is {one_line(repr(kind))}: a dataset stores a Box or "
                                        f"a Discrete space")
    shape = space.get("shape")
    if not isinstance(shape, list):
        raise where.fail(f"{key}.shape", f"must be a list of sizes, not {_kind(shape)}")
    size = 1
    for i, n in enumerate(shape):
        size *= _integer(where, n, f"{key}.shape[{i}]", low=1, high=_MAX_WIDTH)
        if size > _MAX_WIDTH:
            raise where.fail(f"{key}.shape", f"holds {size} or more values, more than "
                                             f"{_MAX_WIDTH}")
    dtype = space.get("dtype", "float32")
    if dtype not in ("float16", "float32", "float64"):
        raise where.fail(f"{key}.dtype", f"is {one_line(repr(dtype))}: a Box is stored as floats")
    low = _bounds(where, space.get("low"), f"{key}.low", size)
    high = _bounds(where, space.get("high"), f"{key}.high", size)
    for i, (lo, hi) in enumerate(zip(low, high, strict=True)):
        if lo > hi:
            raise where.fail(f"{key}.low", f"[{i}] = {lo} exceeds high[{i}] = {hi}")
    return size


def _file_name(where: _Where, value: Any, key: str) -> str:
    """A shard name: one plain file name inside the folder (no path, no escape by symlink)."""
    name = _string(where, value, key)
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or not name.isprintable() or os.path.isabs(name)):
        raise where.fail(key, f"is {one_line(repr(name))}: a shard must be a plain file name "
                              f"inside the dataset folder")
    folder = where.source.parent
    path = folder / name
    if path.is_symlink() and path.resolve().parent != folder.resolve():
        raise where.fail(key, f"names a symbolic link to {one_line(str(path.resolve()))}, "
                              f"outside the dataset folder")
    try:
        mode = path.stat().st_mode
    except OSError:
        return name  # missing: the readers say "listed but missing"
    if not stat.S_ISREG(mode):
        raise where.fail(key, f"names {one_line(str(path))}, which is not a regular file")
    return name


def _relative_path(where: _Where, value: Any, key: str) -> None:
    """A path inside the folder (e.g. the behavior model checkpoint)."""
    if value is None:
        return
    text = _string(where, value, key)
    parts = text.split("/")
    if (os.path.isabs(text) or "\\" in text or not text.isprintable()
            or any(part in ("", ".", "..") for part in parts)):
        raise where.fail(key, f"is {one_line(repr(text))}: it must be a path inside the dataset "
                              f"folder")


def _files(where: _Where, card: Mapping[str, Any]) -> None:
    files = card["files"]
    if not isinstance(files, list) or not files:
        raise where.fail("files", f"must be a non-empty list, not {_kind(files)}"
                         if not isinstance(files, list) else "is empty: no shard is listed")
    counts = _object(where, card["counts"], "counts")
    steps = _integer(where, counts.get("steps"), "counts.steps", low=1)
    episodes = _integer(where, counts.get("episodes"), "counts.episodes", low=1)
    rows = eps = 0
    seen: set[str] = set()
    for i, entry in enumerate(files):
        key = f"files[{i}]"
        entry = _object(where, entry, key)
        name = _file_name(where, entry.get("name"), f"{key}.name")
        if name in seen:
            raise where.fail(f"{key}.name", f"repeats the shard {name!r}")
        seen.add(name)
        rows += _integer(where, entry.get("rows"), f"{key}.rows", low=1)
        eps += _integer(where, entry.get("episodes"), f"{key}.episodes")
        _integer(where, entry.get("bytes"), f"{key}.bytes", low=1)
        sha = entry.get("sha256")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise where.fail(f"{key}.sha256", "must be 64 lowercase hex digits")
    if rows != steps:
        raise where.fail("counts.steps", f"is {steps}, but the files list {rows} rows")
    if eps != episodes:
        raise where.fail("counts.episodes", f"is {episodes}, but the files list {eps} episodes")
    if episodes > steps:
        raise where.fail("counts.episodes", f"is {episodes}, more than the {steps} steps")


def _propensity(where: _Where, value: Any) -> None:
    propensity = _object(where, value, "propensity")
    for name, entry in propensity.items():
        if name not in sc.PROPENSITY_COLUMNS:
            raise where.fail(f"propensity.{name}", "is not a propensity column (logged_logp, "
                                                   "estimated_logp)")
        if entry is not None:
            entry = _object(where, entry, f"propensity.{name}")
            _relative_path(where, entry.get("model_checkpoint"),
                           f"propensity.{name}.model_checkpoint")


def check_space(value: Any, *, source: Path | str, key: str) -> None:
    """Check a Box or Discrete space description (sizes that fit, bounds that are numbers,
    low ≤ high) given by the user or a card, before gymnasium builds it.

    Raises:
        DataError: one sentence naming `source` and the key.
    """
    _space(_Where(Path(source)), value, key)


def check_env_spec(value: Any, *, source: Path | str, allow_entry_point: bool = False) -> None:
    """Check an `env_spec` before it is written into or read from a card (`source` is named).

    Only gymnasium's own registrations are built unless the user trusts the card's code: an
    id `module:Name` or an `entry_point` other than the registered one is refused unless
    `allow_entry_point`.

    Raises:
        DataError: one sentence naming `source` and the key.
    """
    _env_spec(_Where(Path(source)), value, allow_entry_point)


def _env_spec(where: _Where, value: Any, allow_entry_point: bool) -> None:
    if value is None:
        return
    spec = _object(where, value, "env_spec")
    env_id = _string(where, spec.get("id"), "env_spec.id")
    trust = "; such code is imported only with --allow-env-entry-point"
    if not _ENV_ID.fullmatch(env_id):
        if ":" in env_id and allow_entry_point:
            return
        raise where.fail("env_spec.id", f"is {one_line(repr(env_id))}, not a gymnasium "
                                        f"environment id" + (trust if ":" in env_id else ""))
    if "max_episode_steps" in spec and spec["max_episode_steps"] is not None:
        _integer(where, spec["max_episode_steps"], "env_spec.max_episode_steps", low=1)
    if spec.get("kwargs") is not None:
        _object(where, spec["kwargs"], "env_spec.kwargs")
    entry_point = spec.get("entry_point")
    if entry_point is None or allow_entry_point:
        return
    import gymnasium  # the registry: only imported when a card names an entry point

    registered = gymnasium.registry.get(env_id)
    if registered is not None and entry_point == registered.entry_point:
        return
    if registered is None and _is_env_class(entry_point):
        return
    where_from = ("is not registered here" if registered is None
                  else f"is registered with {registered.entry_point!r}")
    raise where.fail("env_spec.entry_point",
                     f"names the code {one_line(repr(entry_point))} and the id {env_id!r} "
                     f"{where_from}" + trust)


def _is_env_class(entry_point: Any) -> bool:
    """An environment class of a known environment package (see `ENV_PACKAGES`)."""
    found = _ENV_CLASS.fullmatch(entry_point) if isinstance(entry_point, str) else None
    return found is not None and found["module"].split(".")[0] in ENV_PACKAGES


def validate_card(raw: Any, *, source: Path, allow_env_entry_point: bool = False
                  ) -> dict[str, Any]:
    """Check a parsed card (see the module docstring) and return it.

    Args:
        raw: what `json.loads` returned for the card file.
        source: the card file (named in messages; shard names are resolved beside it).
        allow_env_entry_point: accept an env id or entry point that makes gymnasium import
            the code the card names.

    Raises:
        DataError: one sentence naming `source` and the key at fault.
    """
    where = _Where(Path(source))
    if not isinstance(raw, dict):
        raise sc.DataError(f"{one_line(str(source))}: the card must be a JSON object, not "
                           f"{_kind(raw)}.", source=str(source))
    version = raw.get("schema_version")
    if version is None:
        raise where.fail("schema_version", "is missing")
    if type(version) is not int or version != sc.SCHEMA_VERSION:
        raise sc.DataError(f"{one_line(str(source))}: schema_version {one_line(repr(version))} "
                           f"is not supported (this version reads {sc.SCHEMA_VERSION}).",
                           source=str(source))
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise where.fail(key, "is missing")
    name = _string(where, raw["name"], "name")
    if not name.strip() or not name.isprintable():
        raise where.fail("name", f"is {one_line(repr(name))}: a name must be printable text")
    for key in ("description",):
        if key in raw and raw[key] is not None:
            _string(where, raw[key], key)
    _space(where, raw["observation_space"], "observation_space")
    _space(where, raw["action_space"], "action_space")
    _files(where, raw)
    _propensity(where, raw["propensity"])
    _env_spec(where, raw.get("env_spec"), allow_env_entry_point)
    for key in ("stats", "source", "behavior"):
        if raw.get(key) is not None and not isinstance(raw[key], dict | str):
            raise where.fail(key, f"must be an object, not {_kind(raw[key])}")
    return raw


def obs_width(card: Mapping[str, Any]) -> int:
    """Values per stored observation vector: prod(shape) of a Box, 1 for a Discrete space."""
    space = card["observation_space"]
    return math.prod(space["shape"]) if space["type"] == "Box" else 1


def action_width(card: Mapping[str, Any]) -> int | None:
    """Values per continuous action (prod(shape)), or None for a Discrete (int64) action."""
    space = card["action_space"]
    return math.prod(space["shape"]) if space["type"] == "Box" else None


# --- the parts against the card -----------------------------------------------------------------


def _part_fail(file: Path, problem: str) -> sc.DataError:
    return sc.DataError(f"{one_line(str(file))}: {problem} (the shard does not match its card; "
                        f"re-ingest it or run offpg info --verify).", source=str(file))


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _check_footer(file: Path, metadata: Any, card: Mapping[str, Any], i: int) -> None:
    """Row count, column types and (from row-group statistics) the action range of one shard."""
    entry = card["files"][i]
    if metadata.num_rows != entry["rows"]:
        raise _part_fail(file, f"it holds {metadata.num_rows} rows, but files[{i}].rows says "
                               f"{entry['rows']}")
    _check_types(file, metadata.schema.to_arrow_schema(), card)
    _check_action_range(file, metadata, card)


def _check_types(file: Path, schema: Any, card: Mapping[str, Any]) -> None:
    """The shard's columns are schema v1's, with the widths and action type of the card."""
    expected = sc.make_schema(obs_width(card), action_width(card))
    if schema.names != expected.names:
        raise _part_fail(file, f"its columns are {', '.join(schema.names)}, not schema "
                               f"v{sc.SCHEMA_VERSION}'s")
    for field in expected:
        actual = schema.field(field.name).type
        if actual != field.type:
            needs = {sc.ACTION: "the card's action_space", sc.OBS: "the card's observation_space",
                     sc.NEXT_OBS: "the card's observation_space"}.get(
                         field.name, f"schema v{sc.SCHEMA_VERSION}")
            raise _part_fail(file, f"column '{field.name}' holds {sc.type_name(actual)}, but "
                                   f"{needs} needs {sc.type_name(field.type)}")


def _check_action_range(file: Path, metadata: Any, card: Mapping[str, Any]) -> None:
    """Row-group min/max statistics of `action` inside the card's Discrete range / Box bounds."""
    schema = metadata.schema.to_arrow_schema()
    space = card["action_space"]
    low: float
    high: float
    if space["type"] == "Discrete":
        low = int(space.get("start", 0))
        high = low + int(space["n"]) - 1
    else:
        low = min(_bounds(_Where(file), space["low"], "action_space.low", action_width(card) or 1))
        high = max(_bounds(_Where(file), space["high"], "action_space.high",
                           action_width(card) or 1))
    column = schema.names.index(sc.ACTION)
    for group in range(metadata.num_row_groups):
        stats = metadata.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max:
            continue
        if stats.min < low or stats.max > high:
            value = stats.min if stats.min < low else stats.max
            raise _part_fail(file, f"column 'action' holds {value}, outside the card's "
                                   f"action_space ({low}..{high})")


def verify_parts(dataset_dir: Path, card: Mapping[str, Any], *, full_hash: bool = False) -> None:
    """Check every shard against a validated card before its rows are used.

    Per shard, in order of cost: a regular file, its byte size (`files[i].bytes`), with
    `full_hash` its sha256 (`files[i].sha256`), then from the Parquet footer its row count, its
    column types (observation width from `observation_space`, int64 or the vector width from
    `action_space`) and its action range (row-group min/max statistics against the Discrete
    range or the Box bounds). A shard rewritten after ingest almost always changes size; one
    that keeps its size is caught by `full_hash` or by `check_batch_finite` once loaded.

    Raises:
        DataError: one sentence naming the shard and what differs.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(dataset_dir)
    for i, entry in enumerate(card["files"]):
        file = folder / entry["name"]
        try:
            info = file.stat()
        except OSError:
            raise _part_fail(file, f"it is listed as files[{i}] but missing") from None
        if not stat.S_ISREG(info.st_mode):
            raise _part_fail(file, "it is not a regular file")
        if info.st_size != entry["bytes"]:
            raise _part_fail(file, f"it has {info.st_size} bytes, but files[{i}].bytes says "
                                   f"{entry['bytes']}")
        if full_hash and (sha := _sha256(file)) != entry["sha256"]:
            raise _part_fail(file, f"its sha256 {sha} differs from files[{i}].sha256")
        try:
            metadata = pq.read_metadata(file)
        except (pa.ArrowException, OSError):
            raise _part_fail(file, "it is not a readable Parquet file") from None
        _check_footer(file, metadata, card, i)


def check_part_types(dataset_dir: Path, card: Mapping[str, Any]) -> None:
    """Only the column types of the shards whose footer can be read (`info` calls this when a
    shard fails to stream, to name the column; an unreadable shard is its caller's message).

    Raises:
        DataError: one sentence naming the shard and the column.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    for entry in card["files"]:
        file = Path(dataset_dir) / entry["name"]
        try:
            schema = pq.read_schema(file)
        except (pa.ArrowException, OSError):
            continue
        _check_types(file, schema, card)


def check_batch_finite(batch: Any, dataset: Path) -> None:
    """Refuse loaded steps whose obs, next_obs or reward are not finite, or whose propensity
    columns hold NaN (ingest refuses these, so the shards were changed afterwards).

    Args:
        batch: a `data.batch.StepBatch` (tensors).
        dataset: the dataset folder, named in the message.

    Raises:
        DataError: one sentence naming the dataset, the column and the first bad row.
    """
    columns = {sc.OBS: batch.obs, sc.NEXT_OBS: batch.next_obs, sc.REWARD: batch.reward}
    for name, values in columns.items():
        bad = ~values.isfinite()
        if bad.ndim > 1:
            bad = bad.any(dim=1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise sc.DataError(f"{one_line(str(dataset))}: column '{name}', row {row} of the "
                               f"loaded steps is not finite; the shards changed after ingest "
                               f"(run offpg info --verify).", source=str(dataset), column=name)
    for name in sc.PROPENSITY_COLUMNS:
        values = getattr(batch, name)
        if values is not None and bool(values.isnan().any()):
            row = int(values.isnan().nonzero()[0, 0])
            raise sc.DataError(f"{one_line(str(dataset))}: column '{name}', row {row} of the "
                               f"loaded steps is NaN; the shards changed after ingest (run "
                               f"offpg info --verify).", source=str(dataset), column=name)
