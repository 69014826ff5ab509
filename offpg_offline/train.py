"""Train a target policy π_θ from a fixed log with an importance-weighted policy gradient.

Reads top to bottom like a CleanRL script: load the log, split it by episode, build the
policy (optionally behavior-cloned), then loop: make a batch, take a gradient step on the
chosen estimator's surrogate (DESIGN.md §3), log diagnostics, save checkpoints, evaluate
online when the env can be built. The maths lives in `estimators.py`; this module wires it.
It never imports mlflow: a `Tracker` is handed in.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from offpg_offline import distributed, estimators
from offpg_offline.config import (
    Baseline,
    EstimatorName,
    Init,
    Propensity,
    TrainConfig,
    as_params,
)
from offpg_offline.data.batch import StepBatch, load_steps
from offpg_offline.data.spaces import space_from_json
from offpg_offline.data.store import read_card
from offpg_offline.data.stream import (
    EpisodeSource,
    LogView,
    buffer_units,
    episode_rows,
    in_memory_bytes,
    rank_episodes,
    shuffled_batches,
)
from offpg_offline.policies import behavior_clone, load_checkpoint, make_policy


class Tracker(Protocol):
    """What training needs from run tracking; tracking.MlflowTracker provides it."""

    def log_params(self, params: Mapping[str, str | int | float | bool]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...


class NullTracker:
    """A tracker that records nothing (Python API use without MLflow)."""

    def log_params(self, params: Mapping[str, str | int | float | bool]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a training run produced."""

    checkpoint: Path
    metrics: dict[str, float] = field(default_factory=dict)
    train_episodes: tuple[int, ...] = ()
    validation_episodes: tuple[int, ...] = ()
    final_log_weights: Tensor | None = None
    selected: Path | None = None  # the checkpoint chosen by `select_by`, when set
    selected_step: int | None = None  # log-weights on the training split at the end


DIAGNOSTIC_STEPS = 4096  # rows of whole episodes on which periodic diagnostics are computed
STREAM_SAMPLE_STEPS = 1 << 17  # rows of whole episodes read into memory when streaming
EPISODIC = {EstimatorName.TRAJECTORY, EstimatorName.PER_DECISION, EstimatorName.PAST_WEIGHT}


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


def stream(seed: int, name: str, index: int = 0) -> torch.Generator:
    """An independent, reproducible random stream per purpose (split, bc, value, batches, ...),
    so that a resumed run can rebuild every stream without replaying the others."""
    digest = hashlib.sha256(f"{seed}/{name}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def split_episodes(
    n_episodes: int, val_fraction: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A seeded train/validation split by episode ordinal; both sorted, validation may be empty."""
    order = torch.randperm(n_episodes, generator=generator)
    n_val = min(round(val_fraction * n_episodes), n_episodes - 1)
    return order[n_val:].sort().values, order[:n_val].sort().values


def make_view(
    batch: StepBatch, behavior_logp: Tensor, config: TrainConfig, baseline: Tensor | None
) -> LogView:
    """The training view: for `per-step`, rewards are replaced by the return-to-go G_t so that
    single steps can be sampled (each step then stands alone with discount already applied)."""
    reward = batch.reward
    if config.estimator is EstimatorName.PER_STEP:
        reward = estimators.discounted_returns(batch.reward, batch.episode_start, config.gamma).to(
            batch.reward.dtype
        )
    return LogView(
        batch.obs, batch.action, behavior_logp, reward, batch.step, batch.episode_start, baseline
    )


def training_view(
    view: LogView, config: TrainConfig, baseline_of: Callable[[LogView], Tensor] | None
) -> LogView:
    """Whole episodes (raw rewards) as trained on: returns-to-go G_t for `per-step`, as in
    `make_view`, and the baseline b. Applied to each streamed chunk before its steps can be
    separated."""
    if config.estimator is EstimatorName.PER_STEP:
        returns = estimators.discounted_returns(view.reward, view.episode_start, config.gamma)
        view = dataclasses.replace(view, reward=returns.to(view.reward.dtype))
    return with_baseline(view, baseline_of)


def diagnostic_subset(view: LogView, max_steps: int, generator: torch.Generator) -> LogView:
    """A fixed random subset of whole episodes with at most `max_steps` rows (at least one
    episode), on which the periodic diagnostics are computed: their cost then does not grow
    with the log."""
    n_episodes = int(view.episode_start.sum())
    starts = torch.nonzero(view.episode_start).flatten()
    lengths = torch.diff(starts, append=torch.tensor([view.step.shape[0]]))
    order = torch.randperm(n_episodes, generator=generator)
    keep = int((torch.cumsum(lengths[order], 0) <= max_steps).sum().clamp_min(1))
    return view.rows(episode_rows(view.episode_start, order[:keep].sort().values), as_steps=False)


def make_batches(view: LogView, config: TrainConfig, start_step: int = 0) -> Iterator[LogView]:
    """Endless seeded batches: whole episodes for the product estimators, steps for `per-step`.

    Batch k (0-based) is the (k mod B)-th slice of epoch k // B's permutation, and each epoch's
    permutation has its own random stream, so the sequence can be resumed at any `start_step`.
    """
    as_steps = config.estimator is EstimatorName.PER_STEP
    units = view.step.shape[0] if as_steps else int(view.episode_start.sum())
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
                rows = episode_rows(view.episode_start, chosen.sort().values)
                yield view.rows(rows, as_steps=False)
        epoch, position = epoch + 1, 0


def use_streaming(card: Mapping[str, Any], config: TrainConfig) -> bool:
    """Stream when asked, or when loading would take more than `memory_budget` GB."""
    return config.stream or in_memory_bytes(card) > config.memory_budget * 1e9


def stream_sample(
    source: EpisodeSource, train_idx: Tensor, val_idx: Tensor, seed: int
) -> tuple[StepBatch, Tensor, Tensor]:
    """A bounded sample of whole training and validation episodes, read into memory for the
    observation statistics, behavior cloning, the baseline fit and the diagnostics; and the
    ordinals of its training and of its validation episodes within it."""
    chosen_train = source.choose(train_idx, STREAM_SAMPLE_STEPS, stream(seed, "sample"))
    chosen_val = source.choose(val_idx, DIAGNOSTIC_STEPS, stream(seed, "sample", 1))
    ordinals = torch.cat([chosen_train, chosen_val]).sort().values
    return (
        source.read_episodes(ordinals),
        torch.searchsorted(ordinals, chosen_train),
        torch.searchsorted(ordinals, chosen_val),
    )


def stream_batches(
    source: EpisodeSource,
    train_idx: Tensor,
    baseline_of: Callable[[LogView], Tensor] | None,
    config: TrainConfig,
    context: distributed.Context,
    start_step: int = 0,
) -> Iterator[LogView]:
    """Endless batches streamed from Parquet through the shuffle buffer: this rank's part of
    the training episodes (its own shards), B/N units per batch on each of N ranks.

    Each chunk of whole episodes is turned into training rows (`training_view`) as it is read,
    so G_t is computed per whole episode before steps are drawn. Resuming restarts the stream
    with a fresh seed: the run continues, but is not the uninterrupted run's bit for bit.
    """
    as_steps = config.estimator is EstimatorName.PER_STEP
    keep = torch.zeros(source.n_episodes, dtype=torch.bool)
    keep[train_idx] = True
    keep &= rank_episodes(source.shards, context.rank, context.world_size)
    share = distributed.local_part(
        config.batch_steps if as_steps else config.batch_episodes, context
    )
    capacity = buffer_units(source, config.shuffle_buffer_episodes, as_steps)
    generator = stream(config.seed, f"stream-batches/{context.rank}", start_step)

    def one_pass(epoch: int) -> Iterator[LogView]:
        order = torch.randperm(len(source.shards), generator=generator).tolist()
        return (training_view(chunk, config, baseline_of) for chunk in source.chunks(keep, order))

    return shuffled_batches(
        one_pass,
        as_steps=as_steps,
        size=share.stop - share.start,
        capacity=max(1, capacity // context.world_size),
        generator=generator,
    )


def rank_share(view: LogView, config: TrainConfig, context: distributed.Context) -> LogView:
    """This rank's equal, disjoint part of a global in-memory batch (all of it on one rank)."""
    if not context.distributed:
        return view
    as_steps = config.estimator is EstimatorName.PER_STEP
    share = distributed.local_part(view.n_rows if as_steps else view.n_episodes, context)
    index = torch.arange(share.start, share.stop)
    return view.rows(index, as_steps=True) if as_steps else view.episodes(index)


def surrogate(
    policy: nn.Module, view: LogView, config: TrainConfig, *, kl_weight: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The chosen estimator's loss on `view` (+ the KL penalty), and log π_θ(a_t|s_t).

    Calls `estimators.ESTIMATORS[config.estimator].fn` with `surrogate_options(config)` and the
    view's baseline. For a spec of unit "step" the view's reward column already holds G_t
    (`make_view`), so it is passed as `returns` with γ = 1 (the discount is inside G_t).
    The KL penalty is a mean over rows; `kl_weight` rescales it on one rank of N so that the
    ranks' mean is the global batch's (see `distributed.row_weight`)."""
    target_logp = policy.log_prob(view.obs, view.action)
    spec = estimators.ESTIMATORS[config.estimator.value]
    per_step = spec.unit == "step"
    loss = spec.fn(
        target_logp,
        view.behavior_logp,
        view.reward,
        view.step,
        view.episode_start,
        gamma=1.0 if per_step else config.gamma,
        options=surrogate_options(config),
        baseline=view.baseline,
        returns=view.reward if per_step else None,
    )
    if config.kl_coef > 0:
        kl = estimators.kl_penalty(target_logp, view.behavior_logp)
        loss = loss + config.kl_coef * kl_weight * kl
    return loss, target_logp


def surrogate_options(config: TrainConfig) -> estimators.SurrogateOptions:
    """The `SurrogateOptions` of `config`, refused up front (ValueError naming the option) when
    the chosen estimator does not honour one, e.g. ppo_epsilon with trajectory."""
    options = estimators.SurrogateOptions(
        clip=config.clip,
        clip_mode=config.clip_mode.value,
        self_normalize=config.self_normalize,
        psis=config.psis,
        ppo_epsilon=config.ppo_epsilon,
        standardize_returns=config.standardize_returns,
    )
    estimators.ESTIMATORS[config.estimator.value].check(config.estimator.value, options)
    return options


def fit_value_baseline(view: LogView, config: TrainConfig, generator: torch.Generator) -> nn.Module:
    """b(s) ≈ E_β[G_t | s_t]: an MLP regressed on the logged returns-to-go (DESIGN §3 baseline)."""
    returns = estimators.discounted_returns(view.reward, view.episode_start, config.gamma).float()
    mean, std = view.obs.mean(0), view.obs.std(0).clamp_min(1e-6)
    scale = returns.abs().mean().clamp_min(1e-6)
    layers: list[nn.Module] = []
    width = view.obs.shape[1]
    for hidden in config.hidden:
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    net = nn.Sequential(*layers, nn.Linear(width, 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    normalised = (view.obs - mean) / std
    for _ in range(500):
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


def step_metrics(loss: Tensor, grad_norm: Tensor) -> dict[str, float]:
    return {"train/loss": float(loss.detach()), "train/grad_norm": float(grad_norm)}


@torch.no_grad()
def log_diagnostics(
    policy: nn.Module, train_view: LogView, val_view: LogView | None, config: TrainConfig
) -> dict[str, float]:
    """Weight diagnostics on (a fixed subset of) the training split, PDIS on the validation's."""
    episodic = config.estimator in EPISODIC
    target_logp = policy.log_prob(train_view.obs, train_view.action)
    metrics = estimators.weight_diagnostics(
        target_logp,
        train_view.behavior_logp,
        train_view.episode_start,
        clip=config.clip,
        clip_mode=config.clip_mode.value,
        level="episode" if episodic else "step",
    )
    if val_view is not None and val_view.step.shape[0] > 0:
        val_logp = policy.log_prob(val_view.obs, val_view.action)
        metrics["ope/pdis_validation"] = -float(
            estimators.per_decision_surrogate(
                val_logp,
                val_view.behavior_logp,
                val_view.reward,
                val_view.step,
                val_view.episode_start,
                gamma=config.gamma,
            )
        )
    return {key: float(value) for key, value in metrics.items()}


def episode_gradient_variance(
    policy: nn.Module, view: LogView, config: TrainConfig, max_units: int = 8
) -> float:
    """tr Cov of per-episode (per-step for `per-step`) gradient contributions, on ≤ 8 of them.

    A diagnostic, not a hot path: one backward pass per unit.
    """
    as_steps = config.estimator is EstimatorName.PER_STEP
    units = view.step.shape[0] if as_steps else int(view.episode_start.sum())
    grads = []
    for unit in range(min(units, max_units)):
        rows = (
            torch.tensor([unit])
            if as_steps
            else episode_rows(view.episode_start, torch.tensor([unit]))
        )
        loss, _ = surrogate(policy, view.rows(rows, as_steps=as_steps), config)
        policy.zero_grad()
        loss.backward()
        grads.append(
            torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
        )
    policy.zero_grad()
    if len(grads) < 2:
        return 0.0
    return float(torch.stack(grads).var(dim=0).sum())


def save_checkpoint(
    path: Path,
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    config: TrainConfig,
) -> Path:
    """Model and optimiser state, step and config, so `torch.load(path, weights_only=True)`
    reads it and `train(..., resume=path)` continues exactly (every random stream is rebuilt
    from the seed and the step; see `stream`). Written to a temporary name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "spec": policy.spec(),
            "state_dict": _to_cpu(policy.state_dict()),
            "optimizer": _to_cpu(optimizer.state_dict()),
            "step": step,
            "config": as_params(config),
        },
        tmp,
    )
    tmp.replace(path)
    return path


def _to_cpu(state: Any) -> Any:
    """A state dict with every tensor on the CPU (nested dicts and lists included)."""
    if isinstance(state, Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {key: _to_cpu(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_to_cpu(value) for value in state)
    return state


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint with the highest step in `out_dir` (final.pt counts as the last)."""
    found = sorted(out_dir.glob("step-*.pt"))
    if (out_dir / "final.pt").is_file():
        found.append(out_dir / "final.pt")
    return found[-1] if found else None


def on_cpu(policy: nn.Module) -> nn.Module:
    """The policy itself when it lives on the CPU, else a CPU copy (rollouts and OPE)."""
    if next(policy.parameters()).device.type == "cpu":
        return policy
    return copy.deepcopy(policy).cpu()


def online_metrics(
    policy: nn.Module, env_id: str | None, config: TrainConfig, prefix: str = "online"
) -> dict[str, float]:
    """Mean and std return of the stochastic and greedy policy over seeded episodes."""
    if env_id is None:
        return {}
    from offpg_offline.rollout import evaluate_online

    policy = on_cpu(policy)  # rollouts build CPU tensors

    stochastic = evaluate_online(
        policy,
        env_id,
        episodes=config.eval_episodes,
        seed=10_000 + config.seed,
        deterministic=False,
    )
    greedy = evaluate_online(
        policy, env_id, episodes=config.eval_episodes, seed=10_000 + config.seed, deterministic=True
    )
    return {
        f"{prefix}/return_mean": stochastic.mean,
        f"{prefix}/return_std": stochastic.std,
        f"{prefix}/greedy_return_mean": greedy.mean,
        f"{prefix}/greedy_return_std": greedy.std,
    }


def resolve_env(card: Mapping[str, Any], config: TrainConfig) -> str | None:
    """The env id for online evaluation (`--env`, else the card's), if gymnasium can build it."""
    from offpg_offline.rollout import make_env

    spec = card.get("env_spec") or {}
    env_id = config.env or spec.get("id")
    if env_id is None:
        return None
    env = make_env(env_id)
    if env is None:
        return None
    env.close()
    return env_id


def train(
    dataset: Path,
    config: TrainConfig,
    *,
    tracker: Tracker | None = None,
    out_dir: Path | None = None,
    progress: bool = False,
    resume: Path | None = None,
) -> TrainResult:
    """Optimise π_θ on the log at `dataset` with `config.estimator`; see the module docstring.

    With `resume` (a checkpoint of a run with the same config), training continues after the
    checkpoint's step, and the final parameters equal those of an uninterrupted run bit for bit
    on CPU.
    """
    context = distributed.setup(config.device)
    tracker = (tracker or NullTracker()) if context.is_main else NullTracker()
    progress = progress and context.is_main
    torch.set_num_threads(config.threads)
    out_dir = out_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    checkpoint = None if resume is None else load_resumable(resume, config)
    start_step = 0 if checkpoint is None else int(checkpoint["step"])

    # Load and split.
    # Streamed, `batch` is a bounded sample of whole episodes; `*_local` index into `batch`.
    card = read_card(dataset)
    log_source = None
    if use_streaming(card, config):
        log_source = EpisodeSource(dataset, logp_column=f"{config.propensity.value}_logp")
        train_idx, val_idx = split_episodes(
            log_source.n_episodes, config.val_fraction, stream(config.seed, "split")
        )
        batch, train_local, val_local = stream_sample(log_source, train_idx, val_idx, config.seed)
    else:
        batch = load_steps(dataset)
        train_idx, val_idx = split_episodes(
            batch.n_episodes, config.val_fraction, stream(config.seed, "split")
        )
        train_local, val_local = train_idx, val_idx
    behavior_logp = behavior_logp_of(batch, config.propensity, dataset)
    train_rows = episode_rows(batch.episode_start, train_local)
    val_rows = episode_rows(batch.episode_start, val_local)
    train_batch = batch.episodes(train_local)
    env_id = resolve_env(card, config)
    if checkpoint is None:
        tracker.log_params(as_params(config))
        tracker.set_tags(
            {
                "estimator": config.estimator.value,
                "propensity": config.propensity.value,
                "dataset": str(card.get("name", dataset.name)),
                "split.train_episodes": str(len(train_idx)),
                "split.validation_episodes": str(len(val_idx)),
                "data.streamed": str(log_source is not None).lower(),
                "distributed.world_size": str(context.world_size),
                "device": str(context.device),
            }
        )

    # Build the policy (behavior-cloned, or restored) and the baseline.
    torch.manual_seed(config.seed)
    policy = make_policy(
        space_from_json(card["observation_space"]),
        space_from_json(card["action_space"]),
        kind=config.policy,
        hidden=config.hidden,
        obs_mean=train_batch.obs.mean(0),
        obs_std=train_batch.obs.std(0).clamp_min(1e-6),
    )
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    metrics: dict[str, float] = {}
    bc_metrics: dict[str, float] = {}
    if checkpoint is not None:
        policy.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    elif config.init is Init.BC:
        behavior_clone(
            policy,
            train_batch.obs,
            train_batch.action,
            steps=config.bc_steps,
            lr=1e-3,
            batch_size=1024,
            generator=stream(config.seed, "bc"),
        )
        bc_metrics = online_metrics(policy, env_id, config, prefix="bc")
        tracker.log_metrics(bc_metrics, step=0)
    full_view = make_view(batch, behavior_logp, config, baseline=None)
    train_view = full_view.rows(train_rows, as_steps=False)
    val_view = full_view.rows(val_rows, as_steps=False) if len(val_local) else None
    baseline_of = fit_baseline(train_batch, behavior_logp[train_rows], config)
    train_view = with_baseline(train_view, baseline_of)
    train_probe = diagnostic_subset(train_view, DIAGNOSTIC_STEPS, stream(config.seed, "probe"))
    val_probe = (
        None
        if val_view is None
        else diagnostic_subset(val_view, DIAGNOSTIC_STEPS, stream(config.seed, "probe", 1))
    )

    # Optimise.
    selector = (
        None
        if config.select_by is None
        else Selector(config, batch.episodes(val_local), behavior_logp[val_rows], train_batch)
    )
    checkpoint_every = config.checkpoint_every or (
        max(config.steps // 10, 1) if selector is not None else 0
    )
    # On `context.device`; with N ranks each takes an equal part of every batch.
    policy.to(context.device)
    optimizer.load_state_dict(optimizer.state_dict())  # a resumed Adam state follows the policy
    distributed.broadcast_parameters(policy, context)
    train_probe = train_probe.to(context.device)
    val_probe = None if val_probe is None else val_probe.to(context.device)
    batches: Iterator[LogView]
    if log_source is None:
        train_view = train_view.to(context.device)
        batches = (
            rank_share(view, config, context)
            for view in make_batches(train_view, config, start_step)
        )
    else:
        streamed = stream_batches(log_source, train_idx, baseline_of, config, context, start_step)
        batches = (view.to(context.device) for view in streamed)
    with _progress(progress, config.steps, start_step) as advance:
        for step in range(start_step + 1, config.steps + 1):
            view = next(batches)
            kl_weight = distributed.row_weight(view.n_rows, context) if config.kl_coef else 1.0
            loss, _ = surrogate(policy, view, config, kl_weight=kl_weight)
            optimizer.zero_grad()
            loss.backward()
            distributed.average_gradients(policy, context)
            logging = step % config.log_every == 0 or step == config.steps
            if logging:  # the norm is only logged: computed on logging steps alone
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), math.inf)
            optimizer.step()
            if logging and context.distributed:  # the global batch's loss (on every rank)
                loss = torch.tensor(distributed.mean_over_ranks(loss, context))
            if logging and context.is_main:
                metrics.update(step_metrics(loss, grad_norm))
                metrics.update(log_diagnostics(policy, train_probe, val_probe, config))
                metrics["train/grad_variance"] = episode_gradient_variance(policy, view, config)
                tracker.log_metrics(metrics, step=step)
            if context.is_main and checkpoint_every and step % checkpoint_every == 0:
                path = save_checkpoint(
                    out_dir / f"step-{step:06d}.pt", policy, optimizer, step=step, config=config
                )
                if selector is not None:
                    tracker.log_metrics(selector.score(on_cpu(policy), path, step), step=step)
            if (
                context.is_main
                and config.eval_every
                and step % config.eval_every == 0
                and step < config.steps
            ):
                tracker.log_metrics(online_metrics(policy, env_id, config), step=step)
            advance(
                loss=float(loss.detach()), ess=metrics.get("weights/ess_fraction", float("nan"))
            )

    distributed.teardown(context)
    if not context.is_main:
        return TrainResult(
            checkpoint=out_dir / "final.pt",
            train_episodes=tuple(train_idx.tolist()),
            validation_episodes=tuple(val_idx.tolist()),
        )
    final = save_checkpoint(
        out_dir / "final.pt", policy, optimizer, step=config.steps, config=config
    )
    online = online_metrics(policy, env_id, config)
    metrics.update(online)
    metrics.update(bc_metrics)
    tracker.log_metrics(online, step=config.steps)
    tracker.log_artifact(final, "checkpoints")
    selected = selected_step = None
    if selector is not None:
        if config.steps not in selector.scores:
            score = selector.score(on_cpu(policy), final, config.steps)
            tracker.log_metrics(score, step=config.steps)
        selected_step, source = selector.best()
        selected = out_dir / "selected.pt"
        shutil.copyfile(source, selected)
        tracker.log_artifact(selected, "checkpoints")
        tracker.set_tags(
            {
                "selected_step": str(selected_step),
                "selected_checkpoint": f"checkpoints/{selected.name}",
            }
        )
        metrics[f"select/{config.select_by}"] = selector.scores[selected_step][1]
    with torch.no_grad():
        final_log_weights = estimators.diagnostic_log_weights(
            policy.log_prob(train_view.obs, train_view.action),
            train_view.behavior_logp,
            train_view.episode_start,
            level="episode" if config.estimator in EPISODIC else "step",
        ).cpu()
    return TrainResult(
        checkpoint=final,
        metrics=metrics,
        train_episodes=tuple(train_idx.tolist()),
        validation_episodes=tuple(val_idx.tolist()),
        final_log_weights=final_log_weights,
        selected=selected,
        selected_step=selected_step,
    )


class Selector:
    """Scores checkpoints by an OPE estimate on the validation split (`select_by`)."""

    def __init__(
        self,
        config: TrainConfig,
        validation: StepBatch,
        behavior_logp: Tensor,
        critic_batch: StepBatch,
    ) -> None:
        self.config, self.validation, self.behavior_logp = config, validation, behavior_logp
        self.critic_batch = critic_batch
        self.estimator = (config.select_by or "").removesuffix("_ci_low").removesuffix("_lb")
        self.scores: dict[int, tuple[Path, float]] = {}

    def score(self, policy: nn.Module, path: Path, step: int) -> dict[str, float]:
        """Evaluate the policy saved at `path`; returns the `ope/...` metrics to log."""
        from offpg_offline.ope import evaluate_offline, selection_score

        estimates = evaluate_offline(  # fits an FQE critic for dr, wdr and fqe
            policy,
            self.validation,
            self.behavior_logp,
            gamma=self.config.gamma,
            estimators=(self.estimator,),
            n_boot=200,
            seed=self.config.seed,
            critic_batch=self.critic_batch,
        )
        self.scores[step] = (path, selection_score(estimates, self.config.select_by or ""))
        metrics = {
            key: value for estimate in estimates for key, value in estimate.metrics().items()
        }
        return {**metrics, f"select/{self.config.select_by}": self.scores[step][1]}

    def best(self) -> tuple[int, Path]:
        """The step with the highest score (the earliest among ties) and its checkpoint."""
        step = max(sorted(self.scores), key=lambda k: self.scores[k][1])
        return step, self.scores[step][0]


def load_resumable(path: Path, config: TrainConfig) -> dict[str, Any]:
    """A checkpoint to resume from; one clear sentence when it belongs to another config."""
    checkpoint = load_checkpoint(path, map_location="cpu")  # weights_only; refusals: one sentence
    saved = dict(checkpoint.get("config", {}))
    wanted = as_params(config)
    differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differ:
        raise ValueError(
            f"{path} was written with another configuration "
            f"(differs in: {', '.join(differ)}); resume needs the same one"
        )
    if int(checkpoint["step"]) >= config.steps:
        raise ValueError(f"{path} is at step {checkpoint['step']}: the run is already complete")
    return checkpoint


def with_baseline(view: LogView, baseline_of: Callable[[LogView], Tensor] | None) -> LogView:
    """`view` with b(s_t) attached (unchanged without a baseline)."""
    if baseline_of is None:
        return view
    with torch.no_grad():
        return dataclasses.replace(view, baseline=baseline_of(view))


def fit_baseline(
    train_batch: StepBatch, behavior_logp: Tensor, config: TrainConfig
) -> Callable[[LogView], Tensor] | None:
    """b(s_t) as a function of a view: a value network fitted on the log, or the mean
    discounted return; None for `--baseline none`."""
    if config.baseline is Baseline.VALUE:
        value = fit_value_baseline(
            make_view(
                train_batch,
                behavior_logp,
                dataclasses.replace(config, estimator=EstimatorName.PER_DECISION),
                None,
            ),
            config,
            stream(config.seed, "value"),
        )
        return lambda view: value(view.obs)
    if config.baseline is Baseline.CONSTANT:
        returns = estimators.discounted_returns(
            train_batch.reward, train_batch.episode_start, config.gamma
        )
        mean_return = float(returns.mean())
        return lambda view: torch.full_like(view.reward, mean_return)
    return None


class _progress:
    """A rich progress bar with live loss and ESS, or nothing when disabled."""

    def __init__(self, enabled: bool, total: int, start: int = 0) -> None:
        self.enabled, self.total, self.start = enabled, total, start

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda **_: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._bar = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            transient=False,
        )
        self._bar.__enter__()
        task = self._bar.add_task("train", total=self.total, completed=self.start, status="")

        def advance(loss: float, ess: float) -> None:
            self._bar.update(task, advance=1, status=f"loss {loss:.4g}  ESS {ess:.0%}")

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.__exit__(*exc)


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m offpg_offline.train DATASET [options]
    import runpy
    import sys

    # Each rank runs the `offpg train` command itself, so the options, TOML config and MLflow
    # tracking (rank 0) are those of the CLI. runpy, not an import: nothing imports the CLI.
    sys.argv = ["offpg", "train", *sys.argv[1:]]
    runpy.run_module("offpg_offline.cli")["main"]()
