r"""The in-training critic of the `critic` estimator, and the γ^t weighting of step estimators.

Step estimators sample single rows, so everything that needs the whole episode is put into the
row's columns before the steps are separated (`step_targets`, called per whole-episode view by
`batches.returns_if_steps`):

* per-step: reward column := G_t = Σ_{t'≥t} γ^{t'−t} r_{t'} (Monte-Carlo return-to-go);
* critic (`EstimatorSpec.critic`): reward column := Q̂_t = r_t + γ·1[t not last]·V̂(s_{t+1}),
  the one-step (TD(0)) action value of an in-sample critic V̂ ≈ V^β; with `critic_lambda` λ the
  GAE(λ) target (λ = 1: G_t). V̂ is `prepare.fit_value_baseline`'s MLP (regressed on the logged
  returns-to-go of the training episodes, i.e. the τ = 0.5 expectile of G_t given s_t: a
  Monte-Carlo estimate of V^β), trained `prepare.CRITIC_FIT_STEPS` steps once before the loop;
  with `baseline = value` it is also b(s_t), so the advantage is the TD error
  Â_t = r_t + γV̂(s_{t+1}) − V̂(s_t) (A2C/IQL-style with τ = 0.5). An episode's end bootstraps 0,
  as G_t does (the log's episode ends are the horizon the value was fitted on).

  E_β[Q̂_t | s_t, a_t] = Q^β(s_t, a_t) + γ E[(V̂ − V^β)(s_{t+1}) | s_t, a_t]: with an exact V^β
  the critic target has the same expectation as G_t (so the critic estimator has per-step's
  expected gradient, with one step of reward noise instead of T − t); the critic's error enters
  through the next state only. Both estimate Q^β, not Q^{π_θ}: exact at θ = β.

The γ^t weight: the unbiased gradient of J = E[Σ_t γ^t r_t] weights step t by γ^t. Single-step
rows have t = 0, so "discounted" multiplies the row's target and baseline by γ^t here (PPO's
min and the clip commute with a positive factor; `standardize_returns` then standardises the
weighted advantages). `auto` keeps what the trainer always did: step estimators drop γ^t,
episode estimators keep it (they refuse "undiscounted").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from offpg_offline import estimators
from offpg_offline.config import DiscountWeighting, TrainConfig
from offpg_offline.data.stream import LogView
from offpg_offline.estimators.segments import episode_last

ValueFn = Callable[[LogView], Tensor]


def is_discounted(config: TrainConfig) -> bool:
    """Whether step t's gradient term carries γ^t (`discount_weighting`, `auto` resolved)."""
    if config.discount_weighting is DiscountWeighting.AUTO:
        return estimators.ESTIMATORS[config.estimator.value].unit == "episode"
    return config.discount_weighting is DiscountWeighting.DISCOUNTED


def check_discount_weighting(config: TrainConfig) -> None:
    """Refuse `undiscounted` for an episode estimator (its γ^t is part of its estimate),
    `critic_lambda` for an estimator without a critic, and for greedy-critic `discounted` and
    a KL penalty without a behavior-cloned start."""
    name = config.estimator.value
    spec = estimators.ESTIMATORS[name]
    if config.critic_lambda != 0.0 and not spec.critic:
        raise ValueError(
            f"option critic_lambda={config.critic_lambda!r} is not supported by the {name} "
            "estimator (only the critic estimator has a critic)")
    if spec.greedy and config.discount_weighting is DiscountWeighting.DISCOUNTED:
        raise ValueError(
            f"option discount_weighting=discounted is not supported by the {name} estimator "
            "(its critic's Q̂ carries no γ^t; use auto or undiscounted)")
    if spec.greedy and config.kl_coef > 0 and config.init.value != "bc":
        raise ValueError(
            f"option init={config.init.value} is not supported by the {name} estimator with "
            "kl_coef > 0 (its KL penalty is to the behavior-cloned start; use init=bc or "
            "kl_coef=0)")
    if spec.unit == "episode" and config.discount_weighting is DiscountWeighting.UNDISCOUNTED:
        raise ValueError(
            f"option discount_weighting=undiscounted is not supported by the {name} estimator "
            "(only step estimators, e.g. per-step and critic, can drop γ^t)")


def one_step_targets(view: LogView, value: Tensor, gamma: float, lam: float = 0.0) -> Tensor:
    """Q̂_t = r_t + γ·1[t not last]·V̂(s_{t+1}) on whole episodes, [M] float64; with λ > 0 the
    GAE(λ) target V̂(s_t) + Σ_k (γλ)^k δ_{t+k}, δ_t = Q̂_t − V̂(s_t) (Schulman et al. 2016),
    which is G_t at λ = 1 (the sum telescopes).

    Args:
        view: whole episodes with raw rewards.
        value: V̂(s_t) for every row of `view`, [M].
        gamma: discount γ.
        lam: GAE λ in [0, 1].
    """
    value = value.detach().double()
    following = torch.roll(value, -1).masked_fill(episode_last(view.episode_start), 0.0)
    target = view.reward.double() + gamma * following
    if lam == 0.0:
        return target
    delta = estimators.discounted_returns(target - value, view.episode_start, gamma * lam)
    return value + delta


def step_targets(view: LogView, config: TrainConfig, value_of: ValueFn | None) -> Tensor:
    """The reward column of a step estimator's rows, from whole episodes with raw rewards:
    G_t, or Q̂_t for a critic estimator (`value_of` gives V̂(s_t)), times γ^t when discounted."""
    if estimators.ESTIMATORS[config.estimator.value].critic:
        if value_of is None:
            raise ValueError("the critic estimator needs a fitted value V̂(s) for its targets")
        with torch.no_grad():
            target = one_step_targets(view, value_of(view), config.gamma, config.critic_lambda)
    else:
        target = estimators.discounted_returns(view.reward, view.episode_start, config.gamma)
    return target * step_discount(view, config)


def step_discount(view: LogView, config: TrainConfig) -> Tensor:
    """γ^t per row of whole episodes when a step estimator is discounted, else 1 (float64)."""
    if not is_discounted(config) or estimators.ESTIMATORS[config.estimator.value].unit != "step":
        return torch.ones_like(view.reward, dtype=torch.float64)
    return config.gamma ** view.step.double()


def discounted_baseline(baseline_of: ValueFn | None, config: TrainConfig) -> ValueFn | None:
    """b(s_t)·γ^t for a discounted step estimator (the row's target carries γ^t too)."""
    if baseline_of is None or not is_discounted(config):
        return baseline_of
    if estimators.ESTIMATORS[config.estimator.value].unit != "step":
        return baseline_of
    return lambda view: baseline_of(view) * step_discount(view, config).to(view.reward.dtype)
