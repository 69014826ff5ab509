"""Minari datasets → the canonical Parquet format (the only module that imports minari).

`ingest_minari` reads a local Minari dataset (arrow or hdf5 storage), or downloads one first,
and streams it episode by episode into `store.write_dataset`, a chunk of whole episodes at a
time, so memory stays bounded by one chunk.

Mapping of one Minari episode with T steps (Minari stores T+1 observations):
    obs[t] = flatten(observations[t]),  next_obs[t] = flatten(observations[t+1]),  t = 0..T-1;
    action, reward, terminated, truncated = actions[t], rewards[t], terminations[t],
    truncations[t]. Dict/Tuple observations are flattened as `gymnasium.spaces.flatten` does.

Propensities: a logged π_β in the infos goes to `logged_logp`. Recognised keys, in order:
    log-probabilities / log-densities: action_log_prob, action_logp, log_prob, logp;
    probabilities: action_prob, prob, propensity (discrete actions only: a probability says
    nothing exact about a density, so they are refused for Box actions).
`propensity_key` (a path such as "agent/logp" for nested infos) and `propensity_kind`
override the choice. Infos hold T+1 entries when they include the reset info (Minari's
DataCollector: entry 0 comes from `reset`, entry t+1 from the `step` that took a_t), so the
propensity of a_t is entry t+1; with exactly T entries (hand-built buffers, hdf5) it is entry t;
with T+1 entries whose last is NaN and first is not (a hand-built buffer padded for arrow) it is
entry t too. The card records which layout was read.

Arrow storage with plain columns (Box, Discrete, Dict/Tuple of those) is read with pyarrow
directly, in Minari's on-disk layout (4x faster than Minari's per-row decoding); hdf5 and
anything else (JPEG-encoded images) through `MinariDataset.iterate_episodes`. Known quirks of
minari 0.5.4 that are handled:
    - arrow storage cannot read back a 1-D numpy info array (it writes an empty "shape" field
      metadata and fails on `int(b"")`): the pyarrow reader reads it;
    - arrow storage returns nested info dicts as an object array of per-step dicts: these are
      turned back into a dict of arrays.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np
import pyarrow as pa

from offpg_offline.data.card import check_env_spec
from offpg_offline.data.schema import steps_table
from offpg_offline.data.spaces import flatten_observations, flatten_space, space_to_json
from offpg_offline.data.store import SourcedTable, json_safe, write_dataset

LOGP_KEYS = ("action_log_prob", "action_logp", "log_prob", "logp")
PROB_KEYS = ("action_prob", "prob", "propensity")
PROPENSITY_KINDS = ("prob", "logp")
_BEHAVIOR_KEYS = ("algorithm_name", "author", "author_email", "code_permalink")
# Metadata keys the card holds in their own fields; every other key is copied to
# source.metadata (JSON-safe: Minari keeps author and author_email as sets).
_METADATA_ELSEWHERE = frozenset({"observation_space", "action_space", "env_spec",
                                 "eval_env_spec", "description", *_BEHAVIOR_KEYS})
_READ_CHUNK = 256  # episodes per minari read call: bounds arrow's per-call dataset discovery


@dataclass(frozen=True, slots=True)
class _Episode:
    """One episode as read from Minari (observations T+1, the rest T; infos a dict)."""

    id: int
    observations: Any
    actions: Any
    rewards: np.ndarray
    terminations: np.ndarray
    truncations: np.ndarray
    infos: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Propensity:
    key: str
    kind: str  # "prob" or "logp"
    skip_first: bool = True  # with T+1 entries: drop entry 0 (reset info), else drop entry T


# --- locating the dataset ----------------------------------------------------------------------


def _find_data_path(id_or_path: str | Path, *, download: bool) -> Path:
    """The folder holding Minari's metadata.json for a local path or a dataset id."""
    path = Path(id_or_path).expanduser()
    if path.exists():
        for candidate in (path, path / "data"):
            if (candidate / "metadata.json").is_file():
                return candidate
        raise FileNotFoundError(f"{path}: not a Minari dataset (no metadata.json in it or in "
                                f"its data/ folder).")
    dataset_id = str(id_or_path)
    try:
        minari.dataset.minari_dataset.parse_dataset_id(dataset_id)
    except ValueError:
        raise FileNotFoundError(f"{dataset_id}: no such folder, and not a Minari dataset id "
                                f"(ids look like namespace/name-v0).") from None
    try:
        return Path(minari.load_dataset(dataset_id).storage.data_path)
    except FileNotFoundError:
        if not download:
            raise FileNotFoundError(
                f"Minari dataset {dataset_id} is not a local path and is not in the local Minari "
                f"store ({minari.storage.get_dataset_path()}); pass --download to fetch it."
            ) from None
    try:
        minari.download_dataset(dataset_id)
    except Exception as err:  # network, authentication, unknown remote id: one sentence
        raise FileNotFoundError(_download_failure(dataset_id, err)) from None
    return Path(minari.load_dataset(dataset_id).storage.data_path)


_NETWORK_ERRORS = ("ConnectError", "ConnectTimeout", "ReadTimeout", "NetworkError",
                   "TimeoutException", "ProxyError", "OfflineModeIsEnabled")


def _download_failure(dataset_id: str, err: Exception) -> str:
    """One sentence for a failed `minari.download_dataset`: unreachable server, missing
    huggingface_hub, or what the server said (unknown id, incompatible version)."""
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    first_line = first_line.split(". ")[0].rstrip(".")  # one sentence, inside ours
    if isinstance(err, ImportError):
        return (f"Minari dataset {dataset_id} cannot be downloaded: huggingface_hub is not "
                f"installed (pip install 'minari[hf]').")
    if any(isinstance(e, ConnectionError | TimeoutError) or type(e).__name__ in _NETWORK_ERRORS
           or type(e).__name__ == "gaierror" for e in chain):
        return (f"cannot reach the Minari server for {dataset_id}; check the network (and "
                f"HF_HUB_OFFLINE / MINARI_REMOTE), or download the dataset on a machine that is "
                f"online and pass its folder ({type(err).__name__}: {first_line}).")
    return f"Minari dataset {dataset_id} could not be downloaded ({type(err).__name__}: " \
        f"{first_line})."


# --- reading episodes --------------------------------------------------------------------------


def _object_rows_to_dict(values: np.ndarray) -> Any:
    """Minari's arrow storage returns nested info dicts as an object array of per-step dicts."""
    if values.dtype == object and len(values) and isinstance(values[0], Mapping):
        keys = list(values[0])
        return {key: _object_rows_to_dict(np.asarray([row[key] for row in values]))
                for key in keys}
    return values


def _normalize_infos(infos: Any) -> dict[str, Any]:
    if not infos:
        return {}
    out: dict[str, Any] = {}
    for key, value in dict(infos).items():
        if isinstance(value, Mapping):
            out[key] = _normalize_infos(value)
        else:
            out[key] = _object_rows_to_dict(np.asarray(value))
    return out


def _arrow_schema(data_path: Path, episode_id: int) -> pa.Schema:
    import pyarrow.dataset as pads

    return pads.dataset(str(data_path / str(episode_id)), format="arrow",
                        ignore_prefixes=["_", ".", "metadata.json"]).schema


def _arrow_info_quirk(schema: pa.Schema) -> bool:
    """True when the infos hold a field minari 0.5.4 cannot decode (a 1-D numpy array)."""
    if "infos" not in schema.names:
        return False

    def bad(dtype: pa.DataType) -> bool:
        for field in dtype:
            if pa.types.is_struct(field.type) and bad(field.type):
                return True
            if field.metadata and field.metadata.get(b"shape") == b"":
                return True
        return False

    return bad(schema.field("infos").type)


def _raw_decodable(space: gym.Space[Any], dtype: pa.DataType) -> bool:
    """Whether `_decode_arrow_space` reads this column (no JPEG-encoded images, no Text...)."""
    if isinstance(space, gym.spaces.Dict | gym.spaces.Tuple):
        if not pa.types.is_struct(dtype):
            return False
        names = ([str(key) for key in space.spaces] if isinstance(space, gym.spaces.Dict)
                 else [str(i) for i in range(len(space.spaces))])
        subspaces = list(space.spaces.values()) if isinstance(space, gym.spaces.Dict) \
            else list(space.spaces)
        fields = {field.name: field.type for field in dtype}
        return all(name in fields and _raw_decodable(sub, fields[name])
                   for name, sub in zip(names, subspaces, strict=True))
    if isinstance(space, gym.spaces.Box):
        return pa.types.is_fixed_size_list(dtype)
    if isinstance(space, gym.spaces.Discrete):
        return pa.types.is_integer(dtype)
    return False


def _decode_arrow_space(space: gym.Space[Any], values: pa.Array) -> Any:
    """Decode a column of Minari's arrow storage (Box, Discrete, Dict, Tuple; no images)."""
    if isinstance(space, gym.spaces.Dict):
        return {key: _decode_arrow_space(sub, values.field(key))
                for key, sub in space.spaces.items()}
    if isinstance(space, gym.spaces.Tuple):
        return tuple(_decode_arrow_space(sub, values.field(str(i)))
                     for i, sub in enumerate(space.spaces))
    if isinstance(space, gym.spaces.Box) and pa.types.is_fixed_size_list(values.type):
        flat = values.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(values), *space.shape)
    if isinstance(space, gym.spaces.Discrete):
        return values.to_numpy(zero_copy_only=False)
    raise ValueError(f"cannot read {space} values of type {values.type} from Minari arrow "
                     f"storage.")


def _decode_arrow_infos(values: pa.StructArray) -> dict[str, Any]:
    """Minari's info decoding, tolerant of the empty 'shape' metadata of 1-D arrays."""
    out: dict[str, Any] = {}
    for index, field in enumerate(values.type):
        column = values.field(index)
        if pa.types.is_struct(field.type):
            out[field.name] = _decode_arrow_infos(column)
            continue
        if pa.types.is_fixed_size_list(field.type):
            flat = column.flatten().to_numpy(zero_copy_only=False)
            shape_text = (field.metadata or {}).get(b"shape", b"")
            shape = tuple(int(n) for n in shape_text.split(b",") if n)
            out[field.name] = flat.reshape(len(column), *shape)
        else:
            out[field.name] = column.to_numpy(zero_copy_only=False)
    return out


def _iter_arrow_raw(dataset: minari.MinariDataset, indices: np.ndarray) -> Iterator[_Episode]:
    """Read arrow episodes with pyarrow (same layout as Minari's ArrowStorage.get_episodes)."""
    import pyarrow.dataset as pads

    data_path = Path(dataset.storage.data_path)
    for episode_id in indices:
        table = pads.dataset(str(data_path / str(int(episode_id))), format="arrow",
                             ignore_prefixes=["_", ".", "metadata.json"]).to_table()
        columns = {name: table.column(name).combine_chunks() for name in table.column_names}
        infos = _decode_arrow_infos(columns["infos"]) if "infos" in columns else {}
        yield _Episode(
            id=int(episode_id),
            observations=_decode_arrow_space(dataset.observation_space, columns["observations"]),
            actions=_decode_arrow_space(dataset.action_space, columns["actions"][:-1]),
            rewards=columns["rewards"].to_numpy(zero_copy_only=False)[:-1],
            terminations=columns["terminations"].to_numpy(zero_copy_only=False)[:-1],
            truncations=columns["truncations"].to_numpy(zero_copy_only=False)[:-1],
            infos=infos,
        )


def _iter_episodes(dataset: minari.MinariDataset, reader: str | None = None) -> Iterator[_Episode]:
    """Every episode of `dataset`, one at a time, in episode-index order.

    Arrow storage is read with pyarrow directly when its columns are plain (Box as fixed-size
    lists, Discrete as integers, Dict/Tuple of those): 4x faster than Minari's decoding, and it
    reads 1-D numpy infos that Minari 0.5.4 cannot. Otherwise (hdf5, JPEG images) Minari reads.

    Args:
        dataset: the Minari dataset.
        reader: "raw" or "minari" to force a reader (tests compare both); None chooses.
    """
    indices = np.asarray(dataset.episode_indices)
    if not len(indices):
        return
    if reader is None:
        reader = "minari"
        if dataset.storage.metadata.get("data_format") == "arrow":
            schema = _arrow_schema(Path(dataset.storage.data_path), int(indices[0]))
            if (_raw_decodable(dataset.observation_space, schema.field("observations").type)
                    and _raw_decodable(dataset.action_space, schema.field("actions").type)):
                reader = "raw"
            elif _arrow_info_quirk(schema):
                raise ValueError(f"{dataset.storage.data_path}: Minari {minari.__version__} "
                                 f"cannot read this dataset's infos (a 1-D numpy array) and "
                                 f"its spaces need Minari's own decoding.")
    if reader == "raw":
        yield from _iter_arrow_raw(dataset, indices)
        return
    for first in range(0, len(indices), _READ_CHUNK):
        yield from _iter_minari(dataset, indices[first:first + _READ_CHUNK])


def _iter_minari(dataset: minari.MinariDataset, indices: np.ndarray) -> Iterator[_Episode]:
    for episode in dataset.iterate_episodes(indices):
        yield _Episode(
            id=int(episode.id),
            observations=episode.observations,
            actions=episode.actions,
            rewards=np.asarray(episode.rewards),
            terminations=np.asarray(episode.terminations),
            truncations=np.asarray(episode.truncations),
            infos=_normalize_infos(episode.infos),
        )


# --- propensities ------------------------------------------------------------------------------


def _info_keys(infos: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key, value in infos.items():
        if isinstance(value, Mapping):
            keys += _info_keys(value, f"{prefix}{key}/")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _info_value(infos: Mapping[str, Any], key: str) -> Any:
    value: Any = infos
    for part in key.split("/"):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return None if isinstance(value, Mapping) else value


def _choose_propensity(
    infos: Mapping[str, Any], key: str | None, kind: str | None, continuous: bool, source: str
) -> _Propensity | None:
    """Which info key holds π_β and whether it is a probability or a log-probability."""
    if kind is not None and kind not in PROPENSITY_KINDS:
        raise ValueError(f"--propensity-kind must be 'prob' or 'logp', got {kind!r}.")
    available = _info_keys(infos)
    if key is not None:
        if key not in available:
            raise ValueError(f"{source}: --propensity-key {key!r} is not in the episode infos "
                             f"(keys: {', '.join(available) or 'none'}).")
        if kind is None:
            kind = "prob" if key.rsplit("/", 1)[-1] in PROB_KEYS else "logp"
    else:
        top = [k for k in available if "/" not in k]
        key = next((k for k in (*LOGP_KEYS, *PROB_KEYS) if k in top), None)
        if key is None:
            if kind is not None:
                raise ValueError(f"{source}: --propensity-kind was given but no propensity key "
                                 f"was found in the infos (keys: {', '.join(available) or 'none'}"
                                 f"); name it with --propensity-key.")
            return None
        kind = kind or ("prob" if key in PROB_KEYS else "logp")
    if kind == "prob" and continuous:
        raise ValueError(f"{source}: infos[{key!r}] holds probabilities, but the action space is "
                         f"continuous (Box), where only a log-density is exact; log a density "
                         f"(e.g. 'action_log_prob') or pass --propensity-kind logp if the values "
                         f"are log-densities.")
    return _Propensity(key=key, kind=kind)


def _info_numbers(episode: _Episode, key: str, source: str) -> np.ndarray:
    """infos[key] of one episode as a 1-D float64 array."""
    values = _info_value(episode.infos, key)
    if values is None:
        raise ValueError(f"{source}: episode {episode.id} has no info {key!r} (other episodes "
                         f"do).")
    values = np.asarray(values)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{source}: episode {episode.id}: infos[{key!r}] must hold one number "
                         f"per step, got an array of shape {values.shape} and dtype "
                         f"{values.dtype}.")
    return values.astype(np.float64)


def _align(propensity: _Propensity, first: _Episode, source: str) -> _Propensity:
    """With T+1 entries, drop entry T instead of entry 0 when only entry T is a NaN placeholder.

    Minari's DataCollector puts the reset info first, so entry t+1 belongs to a_t. A buffer built
    by hand with one entry per action, padded at the end to T+1 (arrow storage requires T+1),
    shows itself by a NaN in the last entry and a number in the first.
    """
    values = _info_numbers(first, propensity.key, source)
    if (len(values) == len(first.rewards) + 1 and np.isnan(values[-1])
            and not np.isnan(values[0])):
        return dataclasses.replace(propensity, skip_first=False)
    return propensity


def _episode_propensity(episode: _Episode, propensity: _Propensity, steps: int,
                        source: str) -> np.ndarray:
    values = _info_numbers(episode, propensity.key, source)
    if len(values) == steps + 1:
        values = values[1:] if propensity.skip_first else values[:-1]
    elif len(values) != steps:
        raise ValueError(f"{source}: episode {episode.id}: infos[{propensity.key!r}] has "
                         f"{len(values)} entries for {steps} steps (expected {steps} or "
                         f"{steps + 1}).")
    if propensity.kind == "prob":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(values)  # p ∉ (0, 1] fails schema validation as logp NaN / -inf / > 0
    return values


# --- spaces ------------------------------------------------------------------------------------


def _stored_box(space: gym.spaces.Box) -> gym.spaces.Box:
    """A Box as the canonical schema stores it: flat and float32."""
    return gym.spaces.Box(low=space.low.reshape(-1).astype(np.float32),
                          high=space.high.reshape(-1).astype(np.float32), dtype=np.float32)


def _stored_spaces(observation_space: gym.Space[Any],
                   action_space: gym.Space[Any]) -> tuple[gym.Space[Any], gym.Space[Any]]:
    if isinstance(action_space, gym.spaces.Box):
        stored_action: gym.Space[Any] = _stored_box(action_space)
    elif isinstance(action_space, gym.spaces.Discrete):
        stored_action = action_space
    else:
        raise ValueError(f"unsupported Minari action space {action_space}: only Discrete and "
                         f"Box actions are.")
    try:
        stored_obs = flatten_space(observation_space)
    except (ValueError, NotImplementedError, TypeError) as err:
        raise ValueError(f"unsupported Minari observation space {observation_space}: "
                         f"{str(err).rstrip('.')}.") from None
    if isinstance(stored_obs, gym.spaces.Box):
        stored_obs = _stored_box(stored_obs)
    return stored_obs, stored_action


def _spec_dict(text: Any) -> dict[str, Any] | None:
    """Minari's serialised EnvSpec as a dict (kwargs kept); None when absent or unreadable."""
    if isinstance(text, Mapping):
        return json_safe(text)
    if not isinstance(text, str):
        return None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError:
        return None
    return json_safe(spec) if isinstance(spec, Mapping) else None


# --- ingest ------------------------------------------------------------------------------------


def ingest_minari(
    id_or_path: str | Path,
    out: Path,
    *,
    download: bool = False,
    propensity_key: str | None = None,
    propensity_kind: str | None = None,
    overwrite: bool = False,
    episodes_per_chunk: int = 256,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Convert a Minari dataset into a canonical dataset folder at `out`.

    Args:
        id_or_path: a Minari dataset id in the local store (`MINARI_DATASETS_PATH` or
            ~/.minari/datasets), or a path to a dataset folder (the one holding `data/`, or
            `data/` itself).
        out: destination folder (written atomically).
        download: fetch the id with `minari.download_dataset` when it is not local.
        propensity_key: info key (nested keys as "a/b") holding π_β(a_t|s_t); default: the
            first of LOGP_KEYS + PROB_KEYS present.
        propensity_kind: "prob" or "logp" (default: from the key's name; "logp" for an
            unrecognised `propensity_key`). Probabilities are refused for Box actions.
        overwrite: replace an existing dataset at `out`.
        episodes_per_chunk: episodes per table handed to `write_dataset`.
        progress: called with the number of rows of each chunk once written.

    Returns:
        `out`.

    Raises:
        FileNotFoundError: the dataset is neither a local path nor in the local Minari store.
        ValueError: unsupported spaces, a propensity that cannot be used, or invalid data
            (`schema.DataError`, nothing written).
    """
    if propensity_kind not in (None, "prob", "logp"):  # options first, before any reading
        raise ValueError(f"--propensity-kind must be 'prob' or 'logp', got {propensity_kind!r}.")
    data_path = _find_data_path(id_or_path, download=download)
    dataset = _open_dataset(data_path)
    metadata = dataset.storage.metadata
    dataset_id = str(metadata.get("dataset_id", id_or_path))
    source_name = f"Minari dataset {dataset_id} ({data_path})"
    stored_spaces = _stored_spaces(dataset.observation_space, dataset.action_space)
    continuous = isinstance(dataset.action_space, gym.spaces.Box)
    episodes = _readable(_iter_episodes(dataset), source_name)
    first = next(episodes, None)
    if first is None:
        raise ValueError(f"{source_name}: the dataset has no episodes (empty input).")
    propensity = _choose_propensity(first.infos, propensity_key, propensity_kind, continuous,
                                    source_name)
    if propensity is not None:
        propensity = _align(propensity, first, source_name)
    ended_without_flag = [0]
    tables = _tables(_prepend(first, episodes), dataset.observation_space, continuous,
                     propensity, source_name, ended_without_flag, episodes_per_chunk)
    card = _minari_card(dataset, data_path, dataset_id, stored_spaces, first, propensity)
    check_env_spec(card["env_spec"], source=f"Minari dataset {dataset_id} metadata")
    written = write_dataset(out, tables, card=card, overwrite=overwrite, progress=progress)
    if ended_without_flag[0]:
        warnings.warn(f"{source_name}: {ended_without_flag[0]} episode(s) ended with neither "
                      f"terminated nor truncated set; kept as truncated.", stacklevel=2)
    return written


def _open_dataset(data_path: Path) -> minari.MinariDataset:
    """Minari's reader on `data_path`, any failure to open it said in one sentence."""
    try:
        return minari.MinariDataset(data_path)
    except Exception as err:  # minari raises JSONDecodeError, AssertionError, KeyError, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "incomplete metadata"
        raise ValueError(f"{data_path / 'metadata.json'}: Minari cannot open this dataset "
                         f"({type(err).__name__}: {reason}).") from None


def _tables(episodes: Iterator[_Episode], observation_space: gym.Space[Any], continuous: bool,
            propensity: _Propensity | None, source_name: str, ended_without_flag: list[int],
            episodes_per_chunk: int) -> Iterator[SourcedTable]:
    """Canonical tables of `episodes_per_chunk` episodes each (episodes without steps
    skipped; those ended without a flag counted in `ended_without_flag[0]`)."""
    chunk: list[dict[str, np.ndarray | None]] = []
    rows = 0

    def flush() -> SourcedTable:
        nonlocal rows
        merged: dict[str, Any] = {
            key: None if chunk[0][key] is None
            else np.concatenate([part[key] for part in chunk]) for key in chunk[0]}
        table = steps_table(**merged)
        sourced = SourcedTable(table, source_name, rows)
        rows += table.num_rows
        chunk.clear()
        return sourced

    for episode in episodes:
        columns = _episode_columns(episode, observation_space, continuous, propensity,
                                   source_name, ended_without_flag)
        if columns is None:
            continue
        chunk.append(columns)
        if len(chunk) >= episodes_per_chunk:
            yield flush()
    if chunk:
        yield flush()


def _minari_card(dataset: minari.MinariDataset, data_path: Path, dataset_id: str,
                 stored_spaces: tuple[gym.Space[Any], gym.Space[Any]], first: _Episode,
                 propensity: _Propensity | None) -> dict[str, Any]:
    """The card: stored spaces, env spec, the Minari metadata kept under `source`, the
    behavior fields and the logged propensity's origin."""
    metadata = dataset.storage.metadata
    observation_space, action_space = dataset.observation_space, dataset.action_space
    stored_obs, stored_action = stored_spaces
    return {
        "name": dataset_id,
        "description": str(metadata.get("description") or f"Minari dataset {dataset_id}"),
        "observation_space": space_to_json(stored_obs),
        "action_space": space_to_json(stored_action),
        "env_spec": _spec_dict(metadata.get("env_spec")),
        "source": json_safe({
            "kind": "minari",
            "dataset_id": dataset_id,
            "path": str(data_path),
            "data_format": metadata.get("data_format"),
            "dataset_minari_version": metadata.get("minari_version"),
            "minari_version": minari.__version__,
            "original_observation_space": _space_json_or_repr(observation_space),
            "original_action_space": _space_json_or_repr(action_space),
            "info_keys": _info_keys(first.infos),
            **({"eval_env_spec": _spec_dict(metadata["eval_env_spec"])}
               if metadata.get("eval_env_spec") else {}),
            **{k: metadata[k] for k in ("ref_min_score", "ref_max_score") if k in metadata},
            "metadata": {k: v for k, v in metadata.items() if k not in _METADATA_ELSEWHERE},
        }),
        "behavior": json_safe({k: metadata[k] for k in _BEHAVIOR_KEYS
                               if metadata.get(k) is not None}) or None,
        "propensity": {
            "logged_logp": None if propensity is None else _propensity_card(propensity),
            "estimated_logp": None,
        },
    }


def _readable(episodes: Iterator[_Episode], source_name: str) -> Iterator[_Episode]:
    """`episodes`, with a data file that cannot be read (truncated, not Arrow/HDF5) reported in
    one sentence naming the dataset."""
    try:
        yield from episodes
    except (OSError, pa.ArrowException) as err:
        lines = str(err).strip().splitlines()
        reason = lines[0] if lines else type(err).__name__
        raise ValueError(f"{source_name}: a data file cannot be read ({reason}).") from None


def _propensity_card(propensity: _Propensity) -> dict[str, str]:
    what = ("probability, stored as its log" if propensity.kind == "prob"
            else "log-probability or log-density")
    layout = ("infos[t+1] when infos have T+1 entries (entry 0 comes from reset)"
              if propensity.skip_first else
              "infos[t] (T+1 entries whose last one is a NaN placeholder)")
    return {
        "source": f"Minari infos[{propensity.key!r}] ({what}); the entry of a_t is {layout}, "
                  f"infos[t] when there are T entries",
        "info_key": propensity.key,
        "kind": propensity.kind,
    }


def _prepend(first: _Episode, rest: Iterator[_Episode]) -> Iterator[_Episode]:
    yield first
    yield from rest


def _space_json_or_repr(space: gym.Space[Any]) -> Any:
    try:
        return space_to_json(space)
    except ValueError:
        return repr(space)


def _episode_columns(
    episode: _Episode,
    observation_space: gym.Space[Any],
    continuous: bool,
    propensity: _Propensity | None,
    source: str,
    ended_without_flag: list[int],
) -> dict[str, np.ndarray | None] | None:
    """The canonical columns of one episode, or None for an episode without steps."""
    steps = len(episode.rewards)
    if steps == 0:
        return None
    observations = flatten_observations(observation_space, episode.observations)
    if len(observations) != steps + 1:
        raise ValueError(f"{source}: episode {episode.id} has {len(observations)} observations "
                         f"for {steps} steps (Minari stores T+1).")
    action: np.ndarray
    if continuous:
        action = np.asarray(episode.actions, dtype=np.float32).reshape(steps, -1)
    else:
        action = np.asarray(episode.actions).reshape(steps)
        if not np.issubdtype(action.dtype, np.integer):
            if not np.all(np.equal(np.mod(action, 1), 0)):
                raise ValueError(f"{source}: episode {episode.id}: a discrete action is not an "
                                 f"integer.")
        action = action.astype(np.int64)
    terminated = np.asarray(episode.terminations, dtype=bool).reshape(steps)
    truncated = np.asarray(episode.truncations, dtype=bool).reshape(steps).copy()
    if not (terminated[-1] or truncated[-1]):
        truncated[-1] = True
        ended_without_flag[0] += 1
    logp = (None if propensity is None
            else _episode_propensity(episode, propensity, steps, source))
    return {
        "episode_id": np.full(steps, episode.id, dtype=np.int64),
        "step": np.arange(steps, dtype=np.int32),
        "obs": observations[:-1],
        "action": action,
        "reward": np.asarray(episode.rewards, dtype=np.float32).reshape(steps),
        "next_obs": observations[1:],
        "terminated": terminated,
        "truncated": truncated,
        "logged_logp": None if logp is None else logp.astype(np.float32),
    }



# --- benchmark fixture -------------------------------------------------------------------------


def bench_dataset(folder: Path, steps: int, *, seed: int = 0, data_format: str = "arrow",
                  episode_length: int = 1000) -> Path:
    """Write a `steps`-step Minari dataset under `folder` for `scripts/bench_ingest.py`.

    Random CartPole-shaped episodes (4 float32 observations, 2 actions) of `episode_length`
    steps, with `action_log_prob` in the infos (T+1 entries, DataCollector layout). Written with
    Minari's own storage, episode by episode, outside the local Minari store.

    Returns:
        The dataset folder (holding Minari's metadata.json), for `ingest_minari`.
    """
    from minari.data_collector import EpisodeBuffer
    from minari.dataset.minari_storage import MinariStorage

    rng = np.random.default_rng(seed)
    path = Path(folder) / f"minari-{data_format}"
    storage = MinariStorage.new(
        path, observation_space=gym.spaces.Box(-np.inf, np.inf, (4,), np.float32),
        action_space=gym.spaces.Discrete(2), data_format=data_format)
    storage.update_metadata({"dataset_id": "bench/cartpole-v0",
                             "minari_version": minari.__version__})

    def episodes() -> Iterator[EpisodeBuffer]:
        for episode, first in enumerate(range(0, steps, episode_length)):
            length = min(episode_length, steps - first)
            action = rng.integers(0, 2, length)
            yield EpisodeBuffer(
                id=episode,
                observations=rng.normal(size=(length + 1, 4)).astype(np.float32),
                actions=action, rewards=np.ones(length), terminations=np.zeros(length, bool),
                truncations=np.arange(length) == length - 1,
                infos={"action_log_prob": np.r_[np.nan, np.where(action == 1, -0.4, -1.1)]
                       .reshape(-1, 1)})

    storage.update_episodes(episodes())
    return path
