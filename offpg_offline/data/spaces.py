"""Gymnasium spaces ↔ plain JSON dicts for the dataset card, and flattening of Dict/Tuple spaces.

The JSON layout is Minari's (`minari.serialization.serialize_space`): `{"type": "Box", "dtype",
"shape", "low", "high"}` and `{"type": "Discrete", "dtype": "int64", "start", "n"}`. One
difference: non-finite Box bounds are written as the strings `"inf"` / `"-inf"`, so the card is
strict JSON (Minari writes the non-standard token `Infinity`). Both forms are read back, and
numpy parses the strings, so Minari's own `deserialize_space` reads our dicts too.

Observations of Dict/Tuple spaces are stored flattened (`gymnasium.spaces.flatten`), so the
canonical schema has one fixed-size float vector per step; the card keeps the flat Box.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from gymnasium import spaces


def _bound_to_json(values: np.ndarray) -> list[Any]:
    """Box bounds as nested lists, non-finite values as the strings 'inf' / '-inf'."""

    def convert(x: Any) -> Any:
        if isinstance(x, list):
            return [convert(v) for v in x]
        value = float(x)
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            raise ValueError("a Box bound is NaN, which no dataset card can describe.")
        return value

    return convert(np.asarray(values, dtype=np.float64).tolist())


def space_to_json(space: spaces.Space[Any]) -> dict[str, Any]:
    """Serialise a Box or Discrete space (Minari's layout, strict JSON).

    Dict and Tuple spaces are serialised recursively (for the card's provenance of the original
    observation space); datasets store their flattened Box (see `flatten_space`).

    Raises:
        ValueError: for any other space type.
    """
    if isinstance(space, spaces.Box):
        return {
            "type": "Box",
            "dtype": str(space.dtype),
            "shape": list(space.shape),
            "low": _bound_to_json(space.low),
            "high": _bound_to_json(space.high),
        }
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "dtype": "int64", "start": int(space.start), "n": int(space.n)}
    if isinstance(space, spaces.Dict):
        return {"type": "Dict",
                "subspaces": {key: space_to_json(sub) for key, sub in space.spaces.items()}}
    if isinstance(space, spaces.Tuple):
        return {"type": "Tuple", "subspaces": [space_to_json(sub) for sub in space.spaces]}
    raise ValueError(f"unsupported space {space!r}: only Box, Discrete, Dict and Tuple are "
                     f"supported.")


def space_from_json(data: Mapping[str, Any] | str) -> spaces.Space[Any]:
    """Inverse of `space_to_json`; also reads Minari's JSON strings and dicts.

    Raises:
        ValueError: for an unknown or malformed space description.
    """
    import json

    if isinstance(data, str):
        data = json.loads(data)
    assert isinstance(data, Mapping)
    kind = data.get("type")
    try:
        if kind == "Box":
            dtype = np.dtype(data.get("dtype", "float32"))
            shape = tuple(int(n) for n in data["shape"])
            low = np.array(data["low"], dtype=np.float64).astype(dtype)
            high = np.array(data["high"], dtype=np.float64).astype(dtype)
            return spaces.Box(low=low, high=high, shape=shape, dtype=dtype)  # type: ignore[arg-type]
        if kind == "Discrete":
            return spaces.Discrete(n=int(data["n"]), start=int(data.get("start", 0)))
        if kind == "Dict":
            subspaces = data["subspaces"]
            return spaces.Dict({key: space_from_json(sub) for key, sub in subspaces.items()})
        if kind == "Tuple":
            return spaces.Tuple(tuple(space_from_json(sub) for sub in data["subspaces"]))
    except (KeyError, TypeError) as err:
        raise ValueError(f"malformed {kind} space description: bad field {err}.") from None
    raise ValueError(f"unsupported space type {kind!r}: only Box, Discrete, Dict and Tuple "
                     f"are supported.")


def flatten_space(space: spaces.Space[Any]) -> spaces.Box | spaces.Discrete:
    """The space a dataset stores: Box and Discrete unchanged, Dict/Tuple flattened to a Box.

    Uses `gymnasium.spaces.flatten_space`, so `flatten_observations` lays values out in the same
    order (Dict keys sorted as gymnasium sorts them, Discrete parts one-hot).
    """
    if isinstance(space, spaces.Box | spaces.Discrete):
        return space
    flat = spaces.flatten_space(space)
    if not isinstance(flat, spaces.Box):
        raise ValueError(f"cannot flatten {space!r} into a Box.")
    return spaces.Box(low=flat.low.astype(np.float32), high=flat.high.astype(np.float32),
                      dtype=np.float32)


def flatten_observations(space: spaces.Space[Any], observations: Any) -> np.ndarray:
    """Flatten a batch of observations of `space` into a float32 array [N, d].

    Args:
        space: the original observation space (Box, Discrete, Dict or Tuple).
        observations: for Box, an array [N, *shape]; for Discrete, integers [N]; for Dict, a
            mapping key → batch of that subspace; for Tuple, a sequence of such batches.

    Returns:
        float32 array [N, d] with d = `flatten_space(space).shape[0]` (Discrete → one-hot only
        when it is part of a Dict/Tuple; a bare Discrete observation is stored as its value).
    """
    if isinstance(space, spaces.Box):
        array = np.asarray(observations, dtype=np.float32)
        return array.reshape(array.shape[0], -1)
    if isinstance(space, spaces.Discrete):
        return np.asarray(observations, dtype=np.float32).reshape(-1, 1)
    if isinstance(space, spaces.Dict):
        parts = [_flatten_part(sub, observations[key]) for key, sub in space.spaces.items()]
        return np.concatenate(parts, axis=1).astype(np.float32)
    if isinstance(space, spaces.Tuple):
        parts = [_flatten_part(sub, obs) for sub, obs in zip(space.spaces, observations,
                                                              strict=True)]
        return np.concatenate(parts, axis=1).astype(np.float32)
    raise ValueError(f"unsupported observation space {space!r}.")


def _flatten_part(space: spaces.Space[Any], batch: Any) -> np.ndarray:
    """Flatten one sub-batch the way `gymnasium.spaces.flatten` flattens one element."""
    if isinstance(space, spaces.Box):
        array = np.asarray(batch, dtype=np.float32)
        return array.reshape(array.shape[0], -1)
    if isinstance(space, spaces.Discrete):
        values = np.asarray(batch, dtype=np.int64) - int(space.start)
        one_hot = np.zeros((values.shape[0], int(space.n)), dtype=np.float32)
        one_hot[np.arange(values.shape[0]), values] = 1.0
        return one_hot
    if isinstance(space, spaces.Dict | spaces.Tuple):
        return flatten_observations(space, batch)
    raise ValueError(f"unsupported observation subspace {space!r}.")
