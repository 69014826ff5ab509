"""Target policies that are not checkpoints, for `offpg evaluate --policy` (issue 11.5).

- `UniformPolicy`: π(a|s) = 1/A on a Discrete space, 1/Π_j(high_j − low_j) on a bounded Box;
  a reference every log can be evaluated against, online too (it samples).
- `ActionTablePolicy`: π(·|s) given as a table of action probabilities at the logged states,
  as recommender teams hold a candidate policy (OBP's `action_dist`): a Parquet file with
  `episode_id`, `step` and a list column of A probabilities aligned with the dataset's rows, or
  an [M, A] array in the dataset's row order (the Python API).

A table defines π only at the states it lists. π(·|s) must be a function of the state, so rows
with the same observation must carry the same probabilities (refused otherwise). At a state
the table does not list, `log_prob` is −inf (probability 0 for every action, so V̂^π(s) = 0
there): that is harmless where the value is never used (the next state of a terminal step)
and wrong elsewhere, so `uncovered_next_states` lets the evaluate job refuse the critic
estimators (dr, wdr, fqe) when a value it would need is missing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

PROBABILITY_COLUMN = "action_probs"
# Probabilities stored as float32 sum to 1 within A·2^-24 ≈ 1e-6 for A ≤ 16; producers often
# round to 4–6 digits, so a row may miss 1 by ~1e-4 without being wrong.
SUM_TOLERANCE = 1e-3


class UniformPolicy(nn.Module):
    """π(a|s) uniform over the action space, for every state (no parameters)."""

    def __init__(self, action_space: Any) -> None:
        super().__init__()
        import gymnasium as gym

        if isinstance(action_space, gym.spaces.Discrete):
            self.n_actions: int | None = int(action_space.n)
            self.low = self.high = None
            self._log_density = -math.log(self.n_actions)
        elif isinstance(action_space, gym.spaces.Box):
            low = np.asarray(action_space.low, dtype=np.float64).reshape(-1)
            high = np.asarray(action_space.high, dtype=np.float64).reshape(-1)
            if not (np.isfinite(low).all() and np.isfinite(high).all()):
                raise ValueError("--policy uniform needs a bounded action space; this Box has "
                                 "infinite bounds")
            self.n_actions = None
            self.low, self.high = torch.from_numpy(low), torch.from_numpy(high)
            self._log_density = -float(np.log(high - low).sum())
        else:
            raise ValueError(f"--policy uniform supports Discrete and Box action spaces, not "
                             f"{type(action_space).__name__}")

    def log_prob(self, obs: Tensor, action: Tensor) -> Tensor:
        """log π(a|s): −log A, or −Σ_j log(high_j − low_j) inside the box (−inf outside)."""
        value = torch.full((obs.shape[0],), self._log_density, dtype=torch.float64)
        if self.low is not None and self.high is not None:
            flat = action.double().reshape(obs.shape[0], -1)
            inside = ((flat >= self.low) & (flat <= self.high)).all(1)
            value = torch.where(inside, value, -math.inf)
        return value.to(torch.float32)

    def sample(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """a ∼ π(·|s) for each row of `obs`."""
        if self.n_actions is not None:
            return torch.randint(self.n_actions, (obs.shape[0],), generator=generator)
        assert self.low is not None and self.high is not None
        u = torch.rand((obs.shape[0], self.low.numel()), generator=generator, dtype=torch.float64)
        return (self.low + u * (self.high - self.low)).to(torch.float32)


class ActionTablePolicy(nn.Module):
    """π(a|s) = table[s, a] at the listed states (discrete actions); see the module doc."""

    def __init__(self, obs: Tensor, probs: Tensor, *, source: str) -> None:
        super().__init__()
        obs = obs.float().reshape(obs.shape[0], -1)
        probs = torch.as_tensor(probs, dtype=torch.float64)
        check_probabilities(probs, obs.shape[0], source=source)
        states, inverse = torch.unique(obs, dim=0, return_inverse=True)
        rows = torch.arange(obs.shape[0])
        first = torch.full((states.shape[0],), obs.shape[0]).scatter_reduce(
            0, inverse, rows, reduce="amin")
        table = probs[first]
        differs = (probs - table[inverse]).abs().amax(1) > 1e-6
        if bool(differs.any()):
            row = int(torch.nonzero(differs)[0, 0])
            raise ValueError(f"{source}: row {row} gives other action probabilities than row "
                             f"{int(first[inverse[row]])} for the same observation; π(·|s) must "
                             f"be a function of the state")
        self.source = source
        self.states, self.table = states, table
        self.n_actions = int(probs.shape[1])

    def lookup(self, obs: Tensor) -> Tensor:
        """Index of each row of `obs` among the table's states, −1 where it is not listed."""
        obs = obs.float().reshape(obs.shape[0], -1)
        n_states = self.states.shape[0]
        _, inverse = torch.unique(torch.cat([self.states, obs]), dim=0, return_inverse=True)
        where = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.int64)
        where[inverse[:n_states]] = torch.arange(n_states)
        return where[inverse[n_states:]]

    def _probs(self, obs: Tensor) -> Tensor:
        index = self.lookup(obs)
        probs = self.table[index.clamp_min(0)]
        return torch.where((index >= 0)[:, None], probs, 0.0)

    def log_prob(self, obs: Tensor, action: Tensor) -> Tensor:
        """log table[s, a]; −inf at states the table does not list."""
        probs = self._probs(obs).gather(1, action.long().reshape(-1, 1))[:, 0]
        return probs.log().to(torch.float32)

    def sample(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """a ∼ table[s, ·]; refused at a state the table does not list."""
        index = self.lookup(obs)
        if bool((index < 0).any()):
            raise ValueError(f"{self.source} gives no action probabilities for a state it does "
                             f"not list (rollouts need π everywhere)")
        return torch.multinomial(self.table[index], 1, generator=generator)[:, 0]


def check_probabilities(probs: Tensor, n_rows: int, *, source: str,
                        n_actions: int | None = None) -> None:
    """Refuse (ValueError naming `source` and the first bad row) a table that is not [n_rows, A]
    of probabilities: each entry finite and ≥ 0, each row summing to 1 (± SUM_TOLERANCE)."""
    if probs.ndim != 2 or probs.shape[0] != n_rows:
        raise ValueError(f"{source}: expected {n_rows} rows of action probabilities (one per "
                         f"dataset row), got shape {tuple(probs.shape)}")
    if n_actions is not None and probs.shape[1] != n_actions:
        raise ValueError(f"{source}: rows hold {probs.shape[1]} probabilities; the dataset's "
                         f"action space has {n_actions} actions")
    bad = ~torch.isfinite(probs).all(1) | (probs < 0).any(1)
    bad |= (probs.sum(1) - 1.0).abs() > SUM_TOLERANCE
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"{source}: row {row} is not a probability vector (entries ≥ 0 summing "
                         f"to 1): {probs[row].tolist()}")


def read_probability_table(path: Path, episode_id: Tensor, step: Tensor, *,
                           column: str | None = None) -> Tensor:
    """[M, A] float64 probabilities from a Parquet file, aligned with the dataset rows
    (`episode_id`, `step`, both [M]) by an exact join on (episode_id, step).

    Raises:
        ValueError: one sentence naming the file and the column or (episode, step) at fault.
    """
    import polars as pl

    try:
        frame = pl.read_parquet(path)
    except Exception as err:  # polars raises its own error kinds for unreadable files
        raise ValueError(f"{path}: cannot read it as Parquet ({type(err).__name__})") from None
    for key in ("episode_id", "step"):
        if key not in frame.columns:
            raise ValueError(f"{path}: no column {key!r} (the file needs episode_id, step and a "
                             f"list column of action probabilities)")
    lists = [n for n, t in frame.schema.items() if isinstance(t, pl.List | pl.Array)]
    if column is None:
        column = PROBABILITY_COLUMN if PROBABILITY_COLUMN in frame.columns else (
            lists[0] if len(lists) == 1 else None)
    if column is None or column not in lists:
        raise ValueError(f"{path}: no list column {column or PROBABILITY_COLUMN!r} of action "
                         f"probabilities (list columns: {', '.join(lists) or 'none'})")
    frame = frame.select(pl.col("episode_id").cast(pl.Int64), pl.col("step").cast(pl.Int64),
                         pl.col(column).cast(pl.List(pl.Float64)).alias("_probs"))
    duplicated = frame.select(pl.struct("episode_id", "step").is_duplicated()).to_series()
    if duplicated.any():
        first = frame.filter(duplicated).row(0)
        raise ValueError(f"{path}: episode {first[0]} step {first[1]} appears more than once")
    rows = pl.DataFrame({"episode_id": episode_id.numpy(), "step": step.numpy(),
                         "_row": np.arange(len(step))})
    joined = rows.join(frame, on=["episode_id", "step"], how="left").sort("_row")
    missing = joined.filter(pl.col("_probs").is_null())
    if missing.height:
        episode, at = missing.row(0)[:2]
        raise ValueError(f"{path}: no action probabilities for episode {episode} step {at} "
                         f"({missing.height} dataset rows are missing)")
    lengths = joined.select(pl.col("_probs").list.len()).to_series()
    if lengths.n_unique() != 1:
        row = int((lengths != lengths[0]).arg_true()[0])
        raise ValueError(f"{path}: column {column} holds lists of different lengths (dataset row "
                         f"{row} has {lengths[row]}, row 0 has {lengths[0]})")
    values = joined.select(pl.col("_probs").list.to_array(int(lengths[0]))).to_series()
    return torch.from_numpy(values.to_numpy().astype(np.float64))
