"""Spaces ↔ JSON and flattening, against gymnasium and Minari's own serialisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gymnasium import spaces

from offpg_offline.data.spaces import (
    flatten_observations,
    flatten_space,
    space_from_json,
    space_to_json,
)


@pytest.mark.parametrize("space", [
    spaces.Box(-1.0, 2.0, (3,), np.float32),
    spaces.Box(np.array([-np.inf, 0.0], np.float32), np.array([np.inf, 1.0], np.float32)),
    spaces.Box(0, 255, (2, 2), np.uint8),
    spaces.Discrete(4),
    spaces.Discrete(3, start=-1),
    spaces.Dict({"a": spaces.Box(-1, 1, (2,)), "b": spaces.Discrete(3)}),
    spaces.Tuple((spaces.Discrete(2), spaces.Box(0, 1, (1,)))),
])
def test_round_trip_through_strict_json(space: spaces.Space) -> None:
    text = json.dumps(space_to_json(space), allow_nan=False)  # strict JSON: no Infinity tokens
    assert space_from_json(json.loads(text)) == space
    assert space_from_json(text) == space


def test_reads_minari_serialisation_and_minari_reads_ours() -> None:
    from minari.serialization import deserialize_space, serialize_space

    space = spaces.Box(np.array([-np.inf, 0.0], np.float32), np.array([np.inf, 1.0], np.float32))
    assert space_from_json(serialize_space(space)) == space
    assert deserialize_space(space_to_json(space)) == space
    assert space_to_json(spaces.Discrete(5)) == serialize_space(spaces.Discrete(5),
                                                                to_string=False)


def test_unknown_space_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unsupported space type 'Graph'"):
        space_from_json({"type": "Graph"})
    with pytest.raises(ValueError, match="malformed Box space description"):
        space_from_json({"type": "Box", "shape": [1]})


def test_flatten_matches_gymnasium_elementwise() -> None:
    space = spaces.Dict({
        "pos": spaces.Box(-1, 1, (2,)),
        "mode": spaces.Discrete(3, start=1),
        "nested": spaces.Tuple((spaces.Box(0, 1, (1,)), spaces.Discrete(2))),
    })
    space.seed(0)
    samples = [space.sample() for _ in range(5)]
    batch = {
        "pos": np.stack([s["pos"] for s in samples]),
        "mode": np.array([s["mode"] for s in samples]),
        "nested": (np.stack([s["nested"][0] for s in samples]),
                   np.array([s["nested"][1] for s in samples])),
    }
    flat = flatten_observations(space, batch)
    expected = np.stack([spaces.flatten(space, s) for s in samples]).astype(np.float32)
    np.testing.assert_array_equal(flat, expected)
    assert flatten_space(space).shape == (flat.shape[1],)
    reference = spaces.flatten_space(space)
    assert flatten_space(space) == spaces.Box(reference.low.astype(np.float32),
                                              reference.high.astype(np.float32), dtype=np.float32)
