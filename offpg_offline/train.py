"""Train a target policy π_θ from a fixed log with an importance-weighted policy gradient.

Reads top to bottom like a CleanRL script (`train`):

    data = prepare_data(dataset, config)       # split by episode id, log π_β, baseline, batches
    policy, optimizer = build_policy(...)      # behavior-cloned (or restored) π_θ and Adam
    for step in ...:
        metrics = update(policy, optimizer, next(batches), config, context)   # one gradient step
        tracker.log_metrics(metrics | diagnostics(...))                       # on logging steps
    return finish(...)                         # final checkpoint, online returns, selection

The maths lives in `estimators` (each estimator's spec says whether its unit is an episode or a
step); the parts wired here live in `training/` (batches, data preparation, checkpoints and
selection, monitoring) and `distributed`. It never imports mlflow: a `Tracker` is handed in.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from offpg_offline import distributed, estimators
from offpg_offline.config import Init, TrainConfig, as_params, resolve_auto
from offpg_offline.data.spaces import space_from_json
from offpg_offline.data.split import validation_digest, write_validation_record
from offpg_offline.data.stream import LogView
from offpg_offline.policies import Policy, behavior_clone, make_policy
from offpg_offline.training import greedy as greedy_module
from offpg_offline.training.batches import stream, unit_is_step
from offpg_offline.training.checkpoints import (
    latest_checkpoint,
    load_resumable,
    on_cpu,
    save_checkpoint,
)
from offpg_offline.training.critic import check_discount_weighting
from offpg_offline.training.greedy import GreedyCritic, anchor_kl, check_policy, freeze_std
from offpg_offline.training.monitor import (
    Progress,
    final_log_weights,
    online_metrics,
    resolve_env,
    weight_metrics,
)
from offpg_offline.training.prepare import (
    TrainingData,
    actions_are_discrete,
    behavior_logp_of,
    prepare_data,
)
from offpg_offline.training.selection import Selector, checkpoint_interval, make_selector

__all__ = [
    "NullTracker",
    "Tracker",
    "TrainResult",
    "behavior_logp_of",
    "latest_checkpoint",
    "surrogate",
    "surrogate_options",
    "train",
    "update",
]


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
    """What a training run produced.

    `train_episodes` and `validation_episodes` are episode *ids* (sorted), as `data.split`
    drew them and as the run recorded them in `validation_episodes.json`.
    """

    checkpoint: Path
    metrics: dict[str, float] = field(default_factory=dict)
    train_episodes: tuple[int, ...] = ()
    validation_episodes: tuple[int, ...] = ()
    final_log_weights: Tensor | None = None  # log-weights on the training split at the end
    selected: Path | None = None  # the checkpoint chosen by `select_by`, when set
    selected_step: int | None = None
    online_skipped: str | None = None  # why no online returns (the env cannot be built)
    config: TrainConfig | None = None  # the config trained with, its auto fields resolved


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
    on CPU. Under torchrun each of N ranks takes an equal part of every batch (`distributed`);
    rank 0 alone logs, checkpoints and evaluates.
    """
    context = distributed.setup(config.device)
    tracker = (tracker or NullTracker()) if context.is_main else NullTracker()
    torch.set_num_threads(config.threads)
    out_dir = out_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    discrete = actions_are_discrete(dataset, config)
    config = resolve_auto(config, discrete_actions=discrete)
    checkpoint = None if resume is None else load_resumable(resume, config)
    start_step = 0 if checkpoint is None else int(checkpoint["step"])
    surrogate_options(config)  # an option the estimator ignores is refused before any file
    check_action_space(config, discrete=discrete)

    data = prepare_data(dataset, config)
    env_id, online_skipped = resolve_env(data.card, config)
    if context.is_main:
        record_run(dataset, data, config, context, tracker, out_dir, fresh=checkpoint is None)
        if online_skipped:
            tracker.set_tags({"offpg.online_skipped": online_skipped[:5000]})
    bars = progress and context.is_main
    policy, optimizer, bc_metrics = build_policy(data, config, context, checkpoint, env_id,
                                                 progress=bars)
    if bc_metrics:
        tracker.log_metrics(bc_metrics, step=0)
    greedy = build_greedy(policy, data, config, context, checkpoint, progress=bars)
    selector = make_selector(config, data.validation, data.train_batch)
    every = checkpoint_interval(config, selector)
    batches = data.source.batches(context, start_step)
    probes = (
        data.train_probe.to(context.device),
        None if data.val_probe is None else data.val_probe.to(context.device),
    )

    logged: dict[str, float] = {}
    with Progress(progress and context.is_main, config.steps, start_step) as advance:
        for step in range(start_step + 1, config.steps + 1):
            batch = next(batches)
            logging = step % config.log_every == 0 or step == config.steps
            if greedy is not None:  # Q̂ follows μ_θ, then the batch gets its GPI advantage
                greedy.critic.before_update(policy, step)
                batch = greedy.critic.targets_of(batch, policy)
            metrics = update(policy, optimizer, batch, config, context, logging=logging,
                             anchor=None if greedy is None else greedy.anchor)
            if logging and context.is_main:
                logged |= metrics | diagnostics(policy, batch, *probes, config)
                tracker.log_metrics(logged, step=step)
            if context.is_main and every and step % every == 0:
                path = save_checkpoint(
                    out_dir / f"step-{step:06d}.pt", policy, optimizer, step=step, config=config,
                    extra=None if greedy is None else greedy.state_dict(),
                )
                if selector is not None:
                    tracker.log_metrics(selector.score(on_cpu(policy), path, step), step=step)
            evaluating = bool(config.eval_every) and step % config.eval_every == 0
            if context.is_main and evaluating and step < config.steps:
                tracker.log_metrics(online_metrics(policy, env_id, config), step=step)
            advance(loss=metrics["train/loss"], ess=logged.get("weights/ess_fraction", math.nan))

    distributed.teardown(context)
    result = finish(policy, optimizer, data, config, tracker, context, out_dir=out_dir,
                    env_id=env_id, selector=selector, metrics=logged | bc_metrics,
                    extra=None if greedy is None else greedy.state_dict())
    return dataclasses.replace(result, online_skipped=online_skipped, config=config)


def record_run(
    dataset: Path,
    data: TrainingData,
    config: TrainConfig,
    context: distributed.Context,
    tracker: Tracker,
    out_dir: Path,
    *,
    fresh: bool,
) -> None:
    """Params and tags of a fresh run; on every start, the held-out episode ids
    (`out_dir/validation_episodes.json`, logged as an artifact of that name, and its digest as
    the tag `offpg.validation_digest`), so evaluation reads the split instead of redrawing it."""
    if fresh:
        tracker.log_params(as_params(config))
        tracker.set_tags(
            {
                "estimator": config.estimator.value,
                "propensity": config.propensity.value,
                "dataset": str(data.card.get("name", dataset.name)),
                "split.train_episodes": str(len(data.train_ids)),
                "split.validation_episodes": str(len(data.val_ids)),
                "offpg.validation_digest": validation_digest(data.val_ids),
                "data.streamed": str(data.streamed).lower(),
                "distributed.world_size": str(context.world_size),
                "device": str(context.device),
            }
        )
    tracker.log_artifact(write_validation_record(out_dir, data.val_ids))


def build_policy(
    data: TrainingData,
    config: TrainConfig,
    context: distributed.Context,
    checkpoint: Mapping[str, Any] | None,
    env_id: str | None,
    *,
    progress: bool = False,
) -> tuple[Policy, torch.optim.Optimizer, dict[str, float]]:
    """π_θ (observations normalised by the training episodes' statistics) and its Adam optimiser:
    restored from `checkpoint`, else behavior-cloned (`init = bc`, with its `bc/*` online
    returns), else as initialised from the seed. Moved to the device; the same on every rank."""
    torch.manual_seed(config.seed)
    train_batch = data.train_batch
    policy = make_policy(
        space_from_json(data.card["observation_space"]),
        space_from_json(data.card["action_space"]),
        kind=config.policy,
        hidden=config.hidden,
        obs_mean=train_batch.obs.mean(0),
        obs_std=train_batch.obs.std(0).clamp_min(1e-6),
    )
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    bc_metrics: dict[str, float] = {}
    if checkpoint is not None:
        policy.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    elif config.init is Init.BC:
        with Progress(progress, config.bc_steps, label="behavior cloning") as advance:
            behavior_clone(
                policy,
                train_batch.obs,
                train_batch.action,
                steps=config.bc_steps,
                lr=1e-3,
                batch_size=1024,
                generator=stream(config.seed, "bc"),
                on_step=lambda loss: advance(loss=loss),
            )
        if context.is_main:
            bc_metrics = online_metrics(policy, env_id, config, prefix="bc")
    policy.to(context.device)
    optimizer.load_state_dict(optimizer.state_dict())  # a restored Adam state follows the policy
    distributed.broadcast_parameters(policy, context)
    return policy, optimizer, bc_metrics


@dataclass(slots=True)
class Greedy:
    """The greedy-critic estimator's extra state: its critic and the frozen clone π_c."""

    critic: GreedyCritic
    anchor: nn.Module

    def state_dict(self) -> dict[str, Any]:
        return {"critic": self.critic.state_dict(), "clone": self.anchor.state_dict()}


def check_action_space(config: TrainConfig, *, discrete: bool) -> None:
    """Refuse the greedy-critic estimator on a log with discrete actions (one sentence)."""
    if estimators.ESTIMATORS[config.estimator.value].greedy and discrete:
        raise ValueError(
            f"the {config.estimator.value} estimator needs continuous actions (its critic "
            "values the policy's mean action); this log's actions are discrete: use "
            "--estimator per-step")


def build_greedy(
    policy: Policy,
    data: TrainingData,
    config: TrainConfig,
    context: distributed.Context,
    checkpoint: Mapping[str, Any] | None,
    *,
    progress: bool = False,
) -> Greedy | None:
    """For a greedy-critic run (else None): the frozen clone (the behavior-cloned π_θ, or the
    checkpoint's), π_θ's σ frozen at `greedy.STD_SCALE` × the clone's, and the critic — warmed
    up on the clone, or restored with its targets and Adam state (training/greedy.py)."""
    if not estimators.ESTIMATORS[config.estimator.value].greedy:
        return None
    check_policy(policy)
    clone = copy.deepcopy(policy).requires_grad_(False)
    if checkpoint is not None:
        clone.load_state_dict(checkpoint["extra"]["clone"])
    freeze_std(policy, fresh=checkpoint is None)
    space = space_from_json(data.card.get("env_action_space", data.card["action_space"]))
    low = torch.as_tensor(space.low, dtype=torch.float32)
    high = torch.as_tensor(space.high, dtype=torch.float32)
    critic = GreedyCritic(data.train_batch, low, high, gamma=config.gamma, seed=config.seed,
                          device=context.device)
    if checkpoint is not None:
        critic.load_state_dict(checkpoint["extra"]["critic"])
    else:
        with Progress(progress, greedy_module.WARM_STEPS, label="critic warm-up") as advance:
            critic.warm_up(policy, on_step=lambda loss: advance(loss=loss))
    return Greedy(critic, clone)


def update(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    batch: LogView,
    config: TrainConfig,
    context: distributed.Context,
    *,
    logging: bool = True,
    anchor: nn.Module | None = None,
) -> dict[str, float]:
    """One gradient step on the surrogate of `batch` (this rank's share of the global batch).

    With N ranks the gradients are averaged (`distributed.average_gradients`), which equals the
    global batch's gradient since every surrogate is a mean over its units and the KL penalty is
    reweighted by N·M_r/M. `anchor` (greedy-critic): the frozen clone π_c, whose closed-form
    KL(π_θ‖π_c) on the batch's states, weight `kl_coef`, is the KL penalty instead of the
    sampled one (training/greedy.py). Returns `train/loss` (the global batch's on logging
    steps) and, on logging steps only (it costs a pass over the parameters), `train/grad_norm`.
    """
    kl_weight = distributed.row_weight(batch.n_rows, context) if config.kl_coef else 1.0
    loss, _ = surrogate(policy, batch, config, kl_weight=kl_weight)
    if anchor is not None and config.kl_coef > 0:
        loss = loss + config.kl_coef * kl_weight * anchor_kl(policy, anchor, batch.obs)
    optimizer.zero_grad()
    loss.backward()
    distributed.average_gradients(policy, context)
    grad_norm = (
        {"train/grad_norm": float(torch.nn.utils.clip_grad_norm_(policy.parameters(), math.inf))}
        if logging
        else {}
    )
    optimizer.step()
    # The global batch's loss is one all-reduce: on logging steps only.
    loss_value = distributed.mean_over_ranks(loss, context) if logging else float(loss.detach())
    return {"train/loss": loss_value, **grad_norm}


def diagnostics(
    policy: Policy,
    batch: LogView,
    train_probe: LogView,
    val_probe: LogView | None,
    config: TrainConfig,
) -> dict[str, float]:
    """Weight diagnostics and validation PDIS on the fixed probes (`monitor.weight_metrics`),
    and the spread of the per-unit gradients within the last batch."""
    metrics = weight_metrics(policy, train_probe, val_probe, config)
    metrics["train/grad_variance"] = episode_gradient_variance(policy, batch, config)
    return metrics


def finish(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    data: TrainingData,
    config: TrainConfig,
    tracker: Tracker,
    context: distributed.Context,
    *,
    out_dir: Path,
    env_id: str | None,
    selector: Selector | None,
    metrics: dict[str, float],
    extra: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Save `final.pt`, log the online returns, ship the selected checkpoint (rank 0 only)."""
    train_ids, val_ids = tuple(data.train_ids.tolist()), tuple(data.val_ids.tolist())
    if not context.is_main:
        return TrainResult(out_dir / "final.pt", {}, train_ids, val_ids)
    final = save_checkpoint(
        out_dir / "final.pt", policy, optimizer, step=config.steps, config=config, extra=extra
    )
    online = online_metrics(policy, env_id, config)
    tracker.log_metrics(online, step=config.steps)
    tracker.log_artifact(final, "checkpoints")
    selected = selected_step = None
    if selector is not None:
        selected_step, selected = ship_selected(selector, policy, final, config, tracker)
        metrics[f"select/{config.select_by}"] = selector.scores[selected_step][1]
    return TrainResult(
        checkpoint=final,
        metrics={**metrics, **online},
        train_episodes=train_ids,
        validation_episodes=val_ids,
        final_log_weights=final_log_weights(policy, data.train_view.to(context.device), config),
        selected=selected,
        selected_step=selected_step,
    )


def ship_selected(
    selector: Selector, policy: Policy, final: Path, config: TrainConfig, tracker: Tracker
) -> tuple[int, Path]:
    """Score the final policy too, copy the best checkpoint to `selected.pt`, log and tag it."""
    if config.steps not in selector.scores:
        tracker.log_metrics(selector.score(on_cpu(policy), final, config.steps), step=config.steps)
    selected_step, source = selector.best()
    selected = final.with_name("selected.pt")
    shutil.copyfile(source, selected)
    tracker.log_artifact(selected, "checkpoints")
    tracker.set_tags(
        {"selected_step": str(selected_step), "selected_checkpoint": f"checkpoints/{selected.name}"}
    )
    return selected_step, selected


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
    return loss_of(target_logp, view, config, kl_weight=kl_weight), target_logp


def loss_of(
    target_logp: Tensor, view: LogView, config: TrainConfig, *, kl_weight: float = 1.0
) -> Tensor:
    """`surrogate`'s loss from log π_θ(a_t|s_t) of the rows of `view`."""
    spec = estimators.ESTIMATORS[config.estimator.value]
    per_step = spec.unit == "step"
    loss = spec.fn(
        target_logp,
        view.behavior_logp,
        view.reward,
        view.step,
        view.episode_start,
        gamma=1.0 if per_step else config.gamma,
        options=_options_of(config),
        baseline=view.baseline,
        returns=view.reward if per_step else None,
    )
    if config.kl_coef > 0 and not spec.greedy:  # greedy-critic's KL is `update`'s anchor
        kl = estimators.kl_penalty(target_logp, view.behavior_logp)
        loss = loss + config.kl_coef * kl_weight * kl
    return loss


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
    check_discount_weighting(config)
    return options


@functools.lru_cache(maxsize=16)
def _options_of(config: TrainConfig) -> estimators.SurrogateOptions:
    """`surrogate_options(config)`, built once per config (the trainer asks on every step)."""
    return surrogate_options(config)


def episode_gradient_variance(
    policy: Policy, view: LogView, config: TrainConfig, max_units: int = 8
) -> float:
    """tr Cov of per-unit gradient contributions (episodes, or steps for a step estimator), on
    the first ≤ 8 units of `view`: Σ_j Var̂_u(∂L_u/∂θ_j), where L_u is the trainer's loss
    (`surrogate`, KL included) on unit u alone and Var̂ the unbiased (n − 1) variance, summed
    in float64. A diagnostic: steps, all of one row, get their n gradients from one vmapped
    pass (`torch.func`); episodes, of unequal lengths, one backward pass each."""
    as_steps = unit_is_step(config)
    units = min(view.n_rows if as_steps else view.n_episodes, max_units)
    if units < 2:
        return 0.0
    params = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    if as_steps:
        grads = _step_gradients(policy, view.rows(torch.arange(units), as_steps=True), params,
                                config)
    else:
        grads = torch.stack([
            _flat_gradient(policy, view.episodes(torch.tensor([unit])), params, config)
            for unit in range(units)
        ])
    centred = grads.double() - grads.double().mean(dim=0)
    return float(centred.square().sum() / (units - 1))


def _flat_gradient(
    policy: Policy, view: LogView, params: Mapping[str, Tensor], config: TrainConfig
) -> Tensor:
    """∂L/∂θ of the loss on `view`, flattened in `params` order (parameters it does not use:
    zeros)."""
    loss, _ = surrogate(policy, view, config)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return torch.cat([
        (torch.zeros_like(p) if g is None else g).flatten()
        for p, g in zip(params.values(), grads, strict=True)
    ])


class _LogProb(nn.Module):
    """`policy.log_prob` as a module's forward, for `torch.func.functional_call`."""

    def __init__(self, policy: Policy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        return self.policy.log_prob(obs, action)


def _step_gradients(
    policy: Policy, rows: LogView, params: Mapping[str, Tensor], config: TrainConfig
) -> Tensor:
    """[n, P] gradients of the loss on each one-row unit of `rows` (every row its own
    episode): `torch.func.vmap(grad(·))` over the rows, the loss being `surrogate`'s."""
    module = _LogProb(policy)
    detached = {f"policy.{name}": p.detach() for name, p in params.items()}

    def unit_loss(weights: dict[str, Tensor], obs: Tensor, action: Tensor, behavior: Tensor,
                  reward: Tensor, baseline: Tensor | None) -> Tensor:
        one = LogView(obs[None], action[None], behavior[None], reward[None], rows.step[:1],
                      rows.episode_start[:1], None if baseline is None else baseline[None])
        target_logp = functional_call(module, weights, (one.obs, one.action), strict=False)
        return loss_of(target_logp, one, config)

    in_dims = (None, 0, 0, 0, 0, None if rows.baseline is None else 0)
    with warnings.catch_warnings():  # ops without a batching rule (log_ndtr) loop inside: fine
        warnings.filterwarnings("ignore", message="There is a performance drop")
        per_row = vmap(grad(unit_loss), in_dims=in_dims)(
            detached, rows.obs, rows.action, rows.behavior_logp, rows.reward, rows.baseline
        )
    return torch.cat([per_row[name].flatten(1) for name in detached], dim=1)


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m offpg_offline.train DATASET [options]
    import runpy
    import sys

    # Each rank runs the `offpg train` command itself, so the options, TOML config and MLflow
    # tracking (rank 0) are those of the CLI. runpy, not an import: nothing imports the CLI.
    sys.argv = ["offpg", "train", *sys.argv[1:]]
    runpy.run_module("offpg_offline.cli")["main"]()
