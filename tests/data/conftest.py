"""Fixtures for the data-layer tests: small logs of whole episodes built from numpy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pytest

from offpg_offline.data.schema import steps_table

MakeLog = Callable[..., pa.Table]


def build_log(
    lengths: Sequence[int],
    *,
    seed: int = 0,
    obs_dim: int = 3,
    action_dim: int | None = None,
    n_actions: int = 3,
    first_id: int = 0,
    logged: bool = True,
    estimated: bool = False,
) -> pa.Table:
    """A schema-v1 table of episodes with the given lengths (last step terminated)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    rows = int(lengths.sum())
    episode_id = np.repeat(np.arange(first_id, first_id + len(lengths)), lengths)
    step = np.arange(rows) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    last = np.r_[episode_id[1:] != episode_id[:-1], True]
    if action_dim is None:
        action = rng.integers(0, n_actions, rows)
        logp = np.log(rng.uniform(0.05, 1.0, rows))
    else:
        action = rng.uniform(-1, 1, (rows, action_dim)).astype(np.float32)
        logp = rng.normal(0.5, 1.0, rows)  # log-densities may be positive
    ends_terminal = rng.random(rows) < 0.5
    return steps_table(
        episode_id=episode_id, step=step,
        obs=rng.normal(size=(rows, obs_dim)), action=action,
        reward=rng.normal(size=rows), next_obs=rng.normal(size=(rows, obs_dim)),
        terminated=last & ends_terminal, truncated=last & ~ends_terminal,
        logged_logp=logp if logged else None,
        estimated_logp=logp - 0.1 if estimated else None,
    )


@pytest.fixture
def make_log() -> MakeLog:
    return build_log
