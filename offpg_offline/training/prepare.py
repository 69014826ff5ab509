"""Prepare a log for training: split it by episode id, pick log π_β, fit the baseline, and
choose where batches come from (in memory, or streamed when the log exceeds the memory budget).

Streamed, only a bounded sample of whole episodes is read into memory (observation statistics,
behavior cloning, the baseline fit, diagnostics and checkpoint selection); the batches come
from Parquet. In memory, the sample is the whole log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from offpg_offline import estimators
from offpg_offline.config import Baseline, Propensity, TrainConfig
from offpg_offline.data.batch import StepBatch, load_steps
from offpg_offline.data.card import check_batch_finite, verify_parts
from offpg_offline.data.spaces import space_from_json
from offpg_offline.data.split import split_episodes
from offpg_offline.data.store import read_card
from offpg_offline.data.stream import EpisodeSource, LogView, episode_rows
from offpg_offline.policies import space_dims
from offpg_offline.training.batches import (
    BaselineFn,
    BatchSource,
    InMemoryBatches,
    StreamedBatches,
    make_view,
    stream,
    use_streaming,
    with_baseline,
)
from offpg_offline.training.critic import discounted_baseline

DIAGNOSTIC_STEPS = 4096  # rows of whole episodes on which periodic diagnostics are computed
STREAM_SAMPLE_STEPS = 1 << 17  # rows of whole episodes read into memory when streaming
CRITIC_FIT_STEPS = 4000  # Adam steps of the critic estimator's V̂ (pendulum-gauss: 500 → −850)


@dataclass(frozen=True, slots=True)
class TrainingData:
    """What the training loop reads, prepared once per run.

    Attributes:
        card: the dataset card.
        train_ids, val_ids: sorted episode ids trained on / held out (`data.split`).
        train_batch: the training episodes in memory (a bounded sample when streamed).
        train_view: `train_batch` as trained on (G_t for a step estimator, baseline attached).
        train_probe, val_probe: fixed subsets (≤ DIAGNOSTIC_STEPS rows) for the diagnostics.
        validation: held-out episodes in memory and their log π_β (None without a split).
        source: the batches of the loop.
        streamed: whether the batches are streamed from Parquet.
    """

    card: Mapping[str, Any]
    train_ids: Tensor
    val_ids: Tensor
    train_batch: StepBatch
    train_view: LogView
    train_probe: LogView
    val_probe: LogView | None
    validation: tuple[StepBatch, Tensor] | None
    source: BatchSource
    streamed: bool


def actions_are_discrete(dataset: Path, config: TrainConfig) -> bool:
    """Whether the log at `dataset` has Discrete actions (its card's `action_space`)."""
    card = read_card(dataset, allow_env_entry_point=config.allow_env_entry_point)
    return space_dims(space_from_json(card["action_space"]))[0] == "discrete"


def prepare_data(dataset: Path, config: TrainConfig) -> TrainingData:
    """Split the log at `dataset`, pick log π_β and the baseline, and set up the batches.

    Raises:
        ValueError: the chosen propensity column is empty (one sentence naming it).
    """
    card = read_card(dataset, allow_env_entry_point=config.allow_env_entry_point)
    verify_parts(dataset, card, full_hash=config.verify)  # sizes, rows, types; sha256: --verify
    log_source: EpisodeSource | None = None
    if use_streaming(card, config):
        log_source = EpisodeSource(dataset, logp_column=f"{config.propensity.value}_logp")
        episode_ids = log_source.episode_ids
        train_ids, val_ids = split_episodes(episode_ids, config.val_fraction, config.seed)
        train_ord = ordinals_of(episode_ids, train_ids)
        batch, train_local, val_local = stream_sample(
            log_source, train_ord, ordinals_of(episode_ids, val_ids), config.seed
        )
    else:
        batch = load_steps(dataset)
        episode_ids = batch.episode_id[batch.episode_start]
        train_ids, val_ids = split_episodes(episode_ids, config.val_fraction, config.seed)
        train_local = train_ord = ordinals_of(episode_ids, train_ids)
        val_local = ordinals_of(episode_ids, val_ids)
    check_batch_finite(batch, dataset)
    behavior_logp = behavior_logp_of(batch, config.propensity, dataset)
    train_batch = batch.episodes(train_local)
    train_rows = episode_rows(batch.episode_start, train_local)
    value_of = critic_value(train_batch, behavior_logp[train_rows], config)
    if value_of is not None and config.baseline is Baseline.VALUE:
        baseline_of = value_of  # the critic's V̂ is the value baseline: Â = r + γV̂(s') − V̂(s)
    else:
        baseline_of = fit_baseline(train_batch, behavior_logp[train_rows], config)
    baseline_of = discounted_baseline(baseline_of, config)
    full_view = make_view(batch, behavior_logp, config, baseline=None, value_of=value_of)
    train_view = with_baseline(full_view.episodes(train_local), baseline_of)
    validation = val_probe = None
    if len(val_local):
        val_rows = episode_rows(batch.episode_start, val_local)
        validation = (batch.episodes(val_local), behavior_logp[val_rows])
        raw = LogView(batch.obs, batch.action, behavior_logp, batch.reward, batch.step,
                      batch.episode_start, None)  # PDIS estimates J from rewards, never from G_t
        val_probe = diagnostic_subset(
            raw.episodes(val_local), DIAGNOSTIC_STEPS, stream(config.seed, "probe", 1)
        )
    source: BatchSource = (
        InMemoryBatches(train_view, config)
        if log_source is None
        else StreamedBatches(log_source, train_ord, baseline_of, config, value_of)
    )
    return TrainingData(
        card=card,
        train_ids=train_ids,
        val_ids=val_ids,
        train_batch=train_batch,
        train_view=train_view,
        train_probe=diagnostic_subset(train_view, DIAGNOSTIC_STEPS, stream(config.seed, "probe")),
        val_probe=val_probe,
        validation=validation,
        source=source,
        streamed=log_source is not None,
    )


def ordinals_of(episode_ids: Tensor, chosen_ids: Tensor) -> Tensor:
    """[K] sorted ordinals (positions in `episode_ids`) of the episodes whose id is chosen."""
    return torch.nonzero(torch.isin(episode_ids, chosen_ids)).flatten()


def behavior_logp_of(batch: StepBatch, propensity: Propensity, dataset: Path) -> Tensor:
    """The log π_β(a|s) column chosen by `propensity`; a clear error when it is empty."""
    column = batch.logged_logp if propensity is Propensity.LOGGED else batch.estimated_logp
    if column is None:
        name = "logged_logp" if propensity is Propensity.LOGGED else "estimated_logp"
        hint = (
            "run `offpg behavior fit` and use --propensity estimated"
            if propensity is Propensity.LOGGED
            else "run `offpg behavior fit` on it first"
        )
        raise ValueError(f"{dataset}: column {name} is empty; {hint}")
    return column


def stream_sample(
    source: EpisodeSource, train_ord: Tensor, val_ord: Tensor, seed: int
) -> tuple[StepBatch, Tensor, Tensor]:
    """A bounded sample of whole training and validation episodes, read into memory; and the
    ordinals of its training and of its validation episodes within it."""
    chosen_train = source.choose(train_ord, STREAM_SAMPLE_STEPS, stream(seed, "sample"))
    chosen_val = source.choose(val_ord, DIAGNOSTIC_STEPS, stream(seed, "sample", 1))
    ordinals = torch.cat([chosen_train, chosen_val]).sort().values
    return (
        source.read_episodes(ordinals),
        torch.searchsorted(ordinals, chosen_train),
        torch.searchsorted(ordinals, chosen_val),
    )


def diagnostic_subset(view: LogView, max_steps: int, generator: torch.Generator) -> LogView:
    """A fixed random subset of whole episodes with at most `max_steps` rows (at least one
    episode), on which the periodic diagnostics are computed: their cost then does not grow
    with the log."""
    starts = torch.nonzero(view.episode_start).flatten()
    lengths = torch.diff(starts, append=torch.tensor([view.n_rows]))
    order = torch.randperm(view.n_episodes, generator=generator)
    keep = int((torch.cumsum(lengths[order], 0) <= max_steps).sum().clamp_min(1))
    return view.episodes(order[:keep].sort().values)


def fit_baseline(
    train_batch: StepBatch, behavior_logp: Tensor, config: TrainConfig
) -> BaselineFn | None:
    """b(s_t) as a function of a view: a value network fitted on the log, or the mean
    discounted return; None for `--baseline none`."""
    if config.baseline is Baseline.VALUE:
        episodes = LogView(
            train_batch.obs, train_batch.action, behavior_logp, train_batch.reward,
            train_batch.step, train_batch.episode_start, None,
        )
        value = fit_value_baseline(episodes, config, stream(config.seed, "value"))
        return lambda view: value(view.obs)
    if config.baseline is Baseline.CONSTANT:
        returns = estimators.discounted_returns(
            train_batch.reward, train_batch.episode_start, config.gamma
        )
        mean_return = float(returns.mean())
        return lambda view: torch.full_like(view.reward, mean_return)
    return None


def critic_value(
    train_batch: StepBatch, behavior_logp: Tensor, config: TrainConfig
) -> BaselineFn | None:
    """V̂(s) ≈ V^β(s) of a critic estimator (`EstimatorSpec.critic`; training/critic.py): the
    value network of `fit_value_baseline` trained for `CRITIC_FIT_STEPS` steps (its one-step
    targets depend on V̂'s accuracy, not only its variance reduction); None otherwise."""
    if not estimators.ESTIMATORS[config.estimator.value].critic:
        return None
    episodes = LogView(
        train_batch.obs, train_batch.action, behavior_logp, train_batch.reward,
        train_batch.step, train_batch.episode_start, None,
    )
    value = fit_value_baseline(
        episodes, config, stream(config.seed, "critic"), steps=CRITIC_FIT_STEPS
    )
    return lambda view: value(view.obs)


def fit_value_baseline(
    view: LogView, config: TrainConfig, generator: torch.Generator, *, steps: int = 500
) -> nn.Module:
    """b(s) ≈ E_β[G_t | s_t]: an MLP regressed on the logged returns-to-go of whole episodes
    (`steps` Adam steps on batches of 1024 rows).

    Its initial weights come from `config.seed` alone (the global RNG is forked and restored),
    so the fit does not depend on, or disturb, what was drawn before it."""
    returns = estimators.discounted_returns(view.reward, view.episode_start, config.gamma).float()
    mean, std = view.obs.mean(0), view.obs.std(0).clamp_min(1e-6)
    scale = returns.abs().mean().clamp_min(1e-6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = _mlp(view.obs.shape[1], config.hidden)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    normalised = (view.obs - mean) / std
    for _ in range(steps):
        rows = torch.randint(
            0, normalised.shape[0], (min(1024, normalised.shape[0]),), generator=generator
        )
        loss = ((net(normalised[rows]).squeeze(-1) - returns[rows] / scale) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    class _Value(nn.Module):
        def forward(self, obs: Tensor) -> Tensor:
            return net((obs - mean) / std).squeeze(-1) * scale

    return _Value()


def _mlp(width: int, hidden: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(width, size), nn.Tanh()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, 1))

