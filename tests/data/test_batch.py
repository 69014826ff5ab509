"""StepBatch: loading a dataset into flat tensors, and whole-episode gathers against a slow loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from offpg_offline.data import schema as sc
from offpg_offline.data.batch import StepBatch, batch_from_table, load_steps
from offpg_offline.data.store import write_dataset

LENGTHS = [4, 1, 6, 3, 2]


def test_load_steps_keeps_every_value(tmp_path, make_log) -> None:
    table = make_log(LENGTHS, seed=1)
    out = write_dataset(tmp_path / "ds", [table], card={}, rows_per_file=5)
    batch = load_steps(out)

    assert batch.n_steps == 16 and batch.n_episodes == 5 and batch.discrete
    np.testing.assert_array_equal(batch.obs.numpy(), sc.vector_values(table.column("obs")))
    np.testing.assert_array_equal(batch.next_obs.numpy(),
                                  sc.vector_values(table.column("next_obs")))
    for name in ("episode_id", "step", "action", "reward", "terminated", "truncated",
                 "logged_logp"):
        np.testing.assert_array_equal(getattr(batch, name).numpy(),
                                      table.column(name).to_numpy(zero_copy_only=False))
    assert batch.estimated_logp is None
    assert batch.obs.dtype == torch.float32 and batch.action.dtype == torch.int64
    assert batch.step.dtype == torch.int64 and batch.terminated.dtype == torch.bool
    assert batch.episode_start.tolist() == [v == 0 for v in batch.step.tolist()]
    assert batch.episode_lengths().tolist() == LENGTHS
    assert batch.episode_index().tolist() == np.repeat(np.arange(5), LENGTHS).tolist()


def test_continuous_actions_load_as_vectors(make_log) -> None:
    batch = batch_from_table(make_log(LENGTHS, action_dim=2, estimated=True))
    assert batch.action.shape == (16, 2) and batch.action.dtype == torch.float32
    assert not batch.discrete and batch.estimated_logp is not None


def _slow_episodes(batch: StepBatch, index: list[int]) -> dict[str, torch.Tensor]:
    lengths = batch.episode_lengths().tolist()
    starts = np.cumsum([0, *lengths])[:-1]
    rows = [r for e in index for r in range(starts[e], starts[e] + lengths[e])]
    expected = {f.name: getattr(batch, f.name)[rows] for f in dataclasses.fields(batch)
                if getattr(batch, f.name) is not None}
    expected["episode_start"] = torch.tensor(
        [r == starts[e] for e in index for r in range(starts[e], starts[e] + lengths[e])],
        dtype=torch.bool)
    return expected


@pytest.mark.parametrize("index", [[0, 1, 2, 3, 4], [3, 0], [2, 2, 1], [4], [1, 1, 1], []])
@pytest.mark.parametrize("action_dim", [None, 2])
def test_episodes_equals_a_slow_loop(make_log, index: list[int], action_dim: int | None) -> None:
    batch = batch_from_table(make_log(LENGTHS, action_dim=action_dim, seed=2))
    chosen = batch.episodes(torch.tensor(index, dtype=torch.int64))
    expected = _slow_episodes(batch, index)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(chosen, name), value, rtol=0, atol=0)
    assert chosen.estimated_logp is None
    assert chosen.n_episodes == len(index)


def test_episodes_rejects_out_of_range_ordinals(make_log) -> None:
    batch = batch_from_table(make_log(LENGTHS))
    with pytest.raises(IndexError, match=r"episode ordinals must lie in 0\.\.4, got 0\.\.5"):
        batch.episodes(torch.tensor([0, 5]))


def test_to_moves_every_tensor(make_log) -> None:
    batch = batch_from_table(make_log(LENGTHS)).to("cpu")
    assert batch.obs.device.type == "cpu" and batch.estimated_logp is None
