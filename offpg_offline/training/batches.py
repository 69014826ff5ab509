"""Training batches: the view of a log the surrogates read, and where batches come from.

The unit of a batch is the estimator's (`ESTIMATORS[name].unit`): whole episodes for the
product estimators, single steps for a step estimator, whose reward column is then the
return-to-go G_t computed per whole episode before the steps are separated. A `BatchSource`
yields endless global-batch shares for one rank; `InMemoryBatches` cuts them from a loaded
view, `StreamedBatches` draws them from Parquet through a bounded shuffle buffer.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from offpg_offline import distributed, estimators
from offpg_offline.config import TrainConfig
from offpg_offline.data.batch import StepBatch
from offpg_offline.data.stream import (
    EpisodeSource,
    LogView,
    buffer_units,
    in_memory_bytes,
    rank_episodes,
    shuffled_batches,
)
from offpg_offline.training.critic import step_targets

BaselineFn = Callable[[LogView], Tensor]


def stream(seed: int, name: str, index: int = 0) -> torch.Generator:
    """An independent, reproducible random stream per purpose (bc, value, batches, ...), so
    that a resumed run can rebuild every stream without replaying the others."""
    digest = hashlib.sha256(f"{seed}/{name}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def unit_is_step(config: TrainConfig) -> bool:
    """True when the estimator's rows are independent units (its registry spec says "step")."""
    return estimators.ESTIMATORS[config.estimator.value].unit == "step"


def use_streaming(card: Any, config: TrainConfig) -> bool:
    """Stream when asked, or when loading would take more than `memory_budget` GB."""
    return config.stream or in_memory_bytes(card) > config.memory_budget * 1e9


def with_baseline(view: LogView, baseline_of: BaselineFn | None) -> LogView:
    """`view` with b(s_t) attached (unchanged without a baseline)."""
    if baseline_of is None:
        return view
    with torch.no_grad():
        return dataclasses.replace(view, baseline=baseline_of(view))


def make_view(
    batch: StepBatch,
    behavior_logp: Tensor,
    config: TrainConfig,
    baseline: Tensor | None,
    value_of: BaselineFn | None = None,
) -> LogView:
    """The training view of whole episodes: for a step estimator the rewards are replaced by the
    return-to-go G_t (or a critic's Q̂_t), so single steps can be sampled (each then stands
    alone, discount applied)."""
    view = LogView(
        batch.obs, batch.action, behavior_logp, batch.reward, batch.step, batch.episode_start,
        baseline,
    )
    return returns_if_steps(view, config, value_of)


def returns_if_steps(
    view: LogView, config: TrainConfig, value_of: BaselineFn | None = None
) -> LogView:
    """Rewards replaced by G_t = Σ_{t'≥t} γ^{t'-t} r_{t'} (a critic estimator: Q̂_t, from
    `value_of`; times γ^t when discounted: `training.critic.step_targets`) for a step
    estimator, else `view`."""
    if not unit_is_step(config):
        return view
    targets = step_targets(view, config, value_of)
    return dataclasses.replace(view, reward=targets.to(view.reward.dtype))


def training_view(
    view: LogView,
    config: TrainConfig,
    baseline_of: BaselineFn | None,
    value_of: BaselineFn | None = None,
) -> LogView:
    """Whole episodes (raw rewards) as trained on: G_t (or Q̂_t) for a step estimator and the
    baseline b. Applied to each streamed chunk before its steps can be separated."""
    return with_baseline(returns_if_steps(view, config, value_of), baseline_of)


def make_batches(view: LogView, config: TrainConfig, start_step: int = 0) -> Iterator[LogView]:
    """Endless seeded global batches: whole episodes, or steps for a step estimator.

    Batch k (0-based) is the (k mod B)-th slice of epoch k // B's permutation, and each epoch's
    permutation has its own random stream, so the sequence can be resumed at any `start_step`.
    """
    as_steps = unit_is_step(config)
    units = view.n_rows if as_steps else view.n_episodes
    size = min(config.batch_steps if as_steps else config.batch_episodes, units)
    per_epoch = units // size
    epoch, position = divmod(start_step, per_epoch)
    while True:
        order = torch.randperm(units, generator=stream(config.seed, "batches", epoch))
        for begin in range(position * size, per_epoch * size, size):
            chosen = order[begin : begin + size]
            if as_steps:
                yield view.rows(chosen, as_steps=True)
            else:
                yield view.episodes(chosen.sort().values)
        epoch, position = epoch + 1, 0


def rank_share(view: LogView, config: TrainConfig, context: distributed.Context) -> LogView:
    """This rank's equal, disjoint part of a global in-memory batch (all of it on one rank)."""
    if not context.distributed:
        return view
    as_steps = unit_is_step(config)
    share = distributed.local_part(view.n_rows if as_steps else view.n_episodes, context)
    index = torch.arange(share.start, share.stop)
    return view.rows(index, as_steps=True) if as_steps else view.episodes(index)


class BatchSource(Protocol):
    """Where the training loop's batches come from: this rank's share of each global batch."""

    def batches(self, context: distributed.Context, start_step: int) -> Iterator[LogView]:
        """Endless batches on `context.device`, continuing after `start_step` steps."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class InMemoryBatches:
    """Batches cut from the loaded training view (`make_batches`), split equally over ranks."""

    view: LogView
    config: TrainConfig

    def batches(self, context: distributed.Context, start_step: int) -> Iterator[LogView]:
        view = self.view.to(context.device)
        return (
            rank_share(batch, self.config, context)
            for batch in make_batches(view, self.config, start_step)
        )


@dataclasses.dataclass(frozen=True, slots=True)
class StreamedBatches:
    """Batches streamed from Parquet through the shuffle buffer: this rank's part of the
    training episodes (its own shards), B/N units per batch on each of N ranks.

    Each chunk of whole episodes becomes training rows (`training_view`) as it is read, so G_t
    is computed per whole episode before steps are drawn. Resuming restarts the stream with a
    fresh seed: the run continues, but is not the uninterrupted run's bit for bit.
    """

    source: EpisodeSource
    train_ordinals: Tensor
    baseline_of: BaselineFn | None
    config: TrainConfig
    value_of: BaselineFn | None = None  # the critic estimator's V̂ (training/critic.py)

    def batches(self, context: distributed.Context, start_step: int) -> Iterator[LogView]:
        config, source = self.config, self.source
        as_steps = unit_is_step(config)
        keep = torch.zeros(source.n_episodes, dtype=torch.bool)
        keep[self.train_ordinals] = True
        keep &= rank_episodes(source.shards, context.rank, context.world_size)
        share = distributed.local_part(
            config.batch_steps if as_steps else config.batch_episodes, context
        )
        capacity = buffer_units(source, config.shuffle_buffer_episodes, as_steps)
        generator = stream(config.seed, f"stream-batches/{context.rank}", start_step)

        def one_pass(epoch: int) -> Iterator[LogView]:
            order = torch.randperm(len(source.shards), generator=generator).tolist()
            return (
                training_view(chunk, config, self.baseline_of, self.value_of)
                for chunk in source.chunks(keep, order)
            )

        streamed = shuffled_batches(
            one_pass,
            as_steps=as_steps,
            size=share.stop - share.start,
            capacity=max(1, capacity // context.world_size),
            generator=generator,
        )
        return (view.to(context.device) for view in streamed)
