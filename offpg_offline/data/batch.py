"""`StepBatch`: a whole dataset as flat step tensors, episodes laid end to end.

Rows of all episodes are concatenated (M rows, episodes contiguous and in `step` order);
`episode_start` is True on each episode's first row. This is the layout the estimators'
segmented cumulative sums expect (STYLE.md example 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from offpg_offline.data import schema as sc
from offpg_offline.data.store import read_table


def episode_rows(episode_start: Tensor, index: Tensor) -> Tensor:
    """Row indices of the episodes with ordinals `index`, in that order (vectorised gather).

    The one episode gather of the package (`StepBatch.episodes`, `LogView.episodes`, the
    trainer's splits): each chosen episode's rows, contiguous, repeats allowed.
    """
    device = episode_start.device
    index = index.to(device)
    starts = torch.nonzero(episode_start).flatten()
    lengths = torch.diff(starts, append=torch.tensor([episode_start.shape[0]], device=device))
    chosen_starts, chosen_lengths = starts[index], lengths[index]
    total = int(chosen_lengths.sum())
    first = torch.repeat_interleave(chosen_starts, chosen_lengths, output_size=total)
    offsets = torch.cumsum(chosen_lengths, 0) - chosen_lengths
    within = torch.arange(total, device=device) - torch.repeat_interleave(
        offsets, chosen_lengths, output_size=total
    )
    return first + within


@dataclass(frozen=True, slots=True)
class StepBatch:
    """Flat step tensors of whole episodes.

    Attributes:
        episode_id: [M] int64, the dataset's episode ids.
        step: [M] int64, t = 0..T-1 within the episode.
        obs: [M, d_obs] float32, s_t.
        action: [M] int64 (discrete) or [M, d_act] float32, a_t.
        reward: [M] float32, r_t.
        next_obs: [M, d_obs] float32, s_{t+1}.
        terminated: [M] bool.
        truncated: [M] bool.
        logged_logp: [M] float32 log π_β(a_t|s_t) as logged, or None when not in the dataset.
        estimated_logp: [M] float32 log π̂_β(a_t|s_t), or None when not in the dataset.
        episode_start: [M] bool, True on each episode's first row.
    """

    episode_id: Tensor
    step: Tensor
    obs: Tensor
    action: Tensor
    reward: Tensor
    next_obs: Tensor
    terminated: Tensor
    truncated: Tensor
    logged_logp: Tensor | None
    estimated_logp: Tensor | None
    episode_start: Tensor

    @property
    def n_steps(self) -> int:
        """M, the number of rows."""
        return int(self.reward.shape[0])

    @property
    def n_episodes(self) -> int:
        """E, the number of episodes."""
        return int(self.episode_start.sum())

    @property
    def discrete(self) -> bool:
        """True when actions are integers."""
        return self.action.ndim == 1

    def episode_starts(self) -> Tensor:
        """[E] int64 row of each episode's first step."""
        return torch.nonzero(self.episode_start, as_tuple=False).reshape(-1)

    def episode_lengths(self) -> Tensor:
        """[E] int64 number of steps of each episode."""
        starts = self.episode_starts()
        ends = torch.cat([starts[1:], torch.tensor([self.n_steps], device=starts.device)])
        return ends - starts

    def episode_index(self) -> Tensor:
        """[M] int64 ordinal 0..E-1 of each row's episode."""
        return torch.cumsum(self.episode_start.to(torch.int64), dim=0) - 1

    def episodes(self, index: Tensor) -> StepBatch:
        """The whole episodes with ordinals `index` (0..E-1), in the order given.

        Repeats are allowed (bootstrap resampling): each copy is its own episode in the result,
        marked by `episode_start`, even though its `episode_id` repeats.
        """
        index = torch.as_tensor(index, dtype=torch.int64, device=self.reward.device).reshape(-1)
        starts, lengths = self.episode_starts(), self.episode_lengths()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(starts)):
            raise IndexError(f"episode ordinals must lie in 0..{len(starts) - 1}, got "
                             f"{int(index.min())}..{int(index.max())}")
        rows = episode_rows(self.episode_start, index)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        gathered: dict[str, Any] = {name: None if value is None else value[rows]
                                    for name, value in fields.items()}
        chosen_lengths = lengths[index]
        new_start = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        new_start[torch.cumsum(chosen_lengths, 0) - chosen_lengths] = True
        gathered["episode_start"] = new_start
        return StepBatch(**gathered)

    def to(self, device: torch.device | str) -> StepBatch:
        """A copy with every tensor on `device`."""
        moved: dict[str, Any] = {f.name: None if getattr(self, f.name) is None
                                 else getattr(self, f.name).to(device)
                                 for f in dataclasses.fields(self)}
        return StepBatch(**moved)


def _vector_tensor(column: pa.ChunkedArray) -> Tensor:
    return torch.from_numpy(np.array(sc.vector_values(column), dtype=np.float32))


def _scalar_tensor(column: pa.ChunkedArray, dtype: np.dtype) -> Tensor:
    values = column.to_numpy()
    return torch.from_numpy(np.array(values, dtype=dtype))


def _logp_tensor(table: pa.Table, name: str) -> Tensor | None:
    column = table.column(name)
    if column.null_count == len(column):
        return None
    if column.null_count:  # write_dataset refuses partially filled columns
        raise sc.DataError(f"column '{name}' is null on some rows and filled on others.")
    return _scalar_tensor(column, np.dtype(np.float32))


def batch_from_table(table: pa.Table) -> StepBatch:
    """A `StepBatch` from a schema-v1 table (rows in dataset order)."""
    if table.num_rows == 0:
        raise sc.DataError("the dataset has no rows.")
    episode_id = _scalar_tensor(table.column(sc.EPISODE_ID), np.dtype(np.int64))
    action_column = table.column(sc.ACTION)
    if action_column.type == pa.int64():
        action = _scalar_tensor(action_column, np.dtype(np.int64))
    else:
        action = _vector_tensor(action_column)
    episode_start = torch.ones_like(episode_id, dtype=torch.bool)
    episode_start[1:] = episode_id[1:] != episode_id[:-1]
    return StepBatch(
        episode_id=episode_id,
        step=_scalar_tensor(table.column(sc.STEP), np.dtype(np.int64)),
        obs=_vector_tensor(table.column(sc.OBS)),
        action=action,
        reward=_scalar_tensor(table.column(sc.REWARD), np.dtype(np.float32)),
        next_obs=_vector_tensor(table.column(sc.NEXT_OBS)),
        terminated=_scalar_tensor(table.column(sc.TERMINATED), np.dtype(np.bool_)),
        truncated=_scalar_tensor(table.column(sc.TRUNCATED), np.dtype(np.bool_)),
        logged_logp=_logp_tensor(table, sc.LOGGED_LOGP),
        estimated_logp=_logp_tensor(table, sc.ESTIMATED_LOGP),
        episode_start=episode_start,
    )


def load_steps(path: Path) -> StepBatch:
    """Load a whole dataset folder into flat tensors (CPU), episodes in the dataset's order.

    Raises:
        FileNotFoundError: no dataset at `path`.
        DataError: unsupported card version.
    """
    return batch_from_table(read_table(path))
