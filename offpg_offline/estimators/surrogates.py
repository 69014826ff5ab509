r"""The four importance-weighted policy-gradient surrogates of docs/design.md §4.

Provenance and deviations
-------------------------
Derivation: the seed note (../shared/seed/), i.e. S. Levine's CS285 lecture on off-policy
policy gradients. Each function is a surrogate loss L(θ) (to minimise) whose autograd gradient
with respect to `target_logp` is the named estimator of -∇J(θ), with
J(θ) = E_{π_θ}[Σ_t γ^t r_t]. Notation: ρ_t = π_θ(a_t|s_t)/π_β(a_t|s_t), w_{1:t} = Π_{k≤t} ρ_k,
G_t = Σ_{t'≥t} γ^{t'-t} r_{t'}, N = number of episodes in the batch.

* The seed's causal equation weights reward r_{t'} by w_{1:t}·w_{t:t'}, which counts ρ_t twice
  and is biased; `per-decision` implements the correct causal form
  Σ_t ∇log π_t Σ_{t'≥t} γ^{t'} w_{1:t'} r_{t'} (Precup, Sutton & Singh 2000), whose surrogate
  is the PDIS estimate itself. tests/test_estimators.py shows the literal form is biased.
* The seed is undiscounted. With γ < 1 every estimator here targets the same discounted
  objective, so `past-weight` and `per-step` carry the factor γ^t on step t (Thomas 2014, "Bias
  in natural actor-critic algorithms"); at θ = β all four then have the same expectation, the
  discounted policy gradient Σ_t γ^t ∇log π_t G_t. Many deep-RL codes drop γ^t; we do not.
* Log-weights are built in log space in float64 and capped at `MAX_LOG_WEIGHT` (= 80, i.e.
  w ≤ 5.5e34) after every statistical option, so the loss and float32 gradients stay finite on
  horizons of thousands of steps. A weight at the cap means the estimate is already useless
  (ESS → 1/N); `weight_diagnostics` reports it.
* Clipping uses min in log space: unclipped entries keep their gradient, capped ones get none
  (for `past-weight`, whose weight is a constant coefficient, the capped coefficient still
  multiplies ∇log π_t — the truncated-IS form of Wawrzyński 2009 / Espeholt et al. 2018).
* PSIS replaces w by w·sg(w̃/w): the smoothed value w̃ of Vehtari et al. (2024), with the raw
  weight's gradient direction.
* Baselines and clipping. A baseline b(s_t) adds no bias only while the factor that multiplies
  ∇log π_t b(s_t) has β-expectation independent of θ, i.e. while the current step's factor is
  exactly ρ_t. Clipping (`clip`, either mode) and PPO (`ppo_epsilon`) break this: the clipped
  factor min(ρ_t, c) has gradient ρ_t·1[ρ_t < c]·∇log π_t, so the baseline shifts the expected
  gradient by −Σ_t γ^t E_{s_t∼β}[b(s_t) Σ_a π(a|s_t) 1[ρ ≥ c] ∇log π(a|s_t)] (per-step; the
  product estimators analogously). It is biased exactly when some action with π/β ≥ c (or
  outside PPO's band) has positive π-probability at a state with b ≠ 0; at θ = β (ρ = 1) it is
  not. We keep the clipped baseline (it lowers variance, and the default configuration was
  measured with it) and state the bias; tests/test_estimators.py measures it by exact
  enumeration on a tabular MDP (max |Δ∇| 0.06–0.55 at c = 1.2, ε = 0.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from offpg_offline.estimators.options import (
    DEFAULT_OPTIONS,
    SurrogateOptions,
    refuse_unsupported,
)
from offpg_offline.estimators.segments import (
    check_episode_start,
    check_flat,
    check_gamma,
    discounted_returns,
    episode_sum,
)
from offpg_offline.estimators.weights import (
    LOG_RATIO_BOUND,
    MAX_LOG_WEIGHT,
    cap_log_weight,
    clip_log_ratio,
    cumulative_from_log_ratio,
    episode_from_log_ratio,
    log_ratio,
    position_log_normaliser,
    self_normalise,
    smooth_log_weight,
)

Reduction = Literal["mean", "none"]

TRAJECTORY_OPTIONS = frozenset(
    {"clip", "clip_mode", "self_normalize", "psis", "standardize_returns"})
"""Options `trajectory_surrogate` honours (no ppo_epsilon: its weight is a product over steps,
not a per-step ratio)."""
PER_DECISION_OPTIONS = TRAJECTORY_OPTIONS
"""Options `per_decision_surrogate` honours (no ppo_epsilon, as for trajectory)."""
PAST_WEIGHT_OPTIONS = frozenset(
    {"clip", "clip_mode", "self_normalize", "psis", "ppo_epsilon", "standardize_returns"})
"""Options `past_weight_surrogate` honours: all."""
PER_STEP_OPTIONS = frozenset(
    {"clip", "self_normalize", "psis", "ppo_epsilon", "standardize_returns"})
"""Options `per_step_surrogate` honours (no clip_mode: one ratio per row, no product to cap)."""


class Surrogate(Protocol):
    """Common signature of every `EstimatorSpec.fn` (see `per_decision_surrogate`)."""

    def __call__(
        self,
        target_logp: Tensor,
        behavior_logp: Tensor,
        reward: Tensor,
        step: Tensor,
        episode_start: Tensor,
        *,
        gamma: float,
        options: SurrogateOptions = DEFAULT_OPTIONS,
        baseline: float | Tensor | None = None,
        returns: Tensor | None = None,
        reduction: Reduction = "mean",
    ) -> Tensor: ...


@dataclass(frozen=True, slots=True)
class _Inputs:
    """Validated inputs shared by the surrogates (all float64, constants detached).

    `discount` is γ^t per row, or None when every γ^t is exactly 1 (γ = 1: the trainer's step
    rows), so that no multiplication by ones is made (x·1 = x exactly: the same numbers)."""

    target_logp: Tensor
    log_rho: Tensor
    reward: Tensor
    discount: Tensor | None
    episode_start: Tensor
    baseline: Tensor
    returns: Tensor | None
    n_episodes: int


def _prepare(
    target_logp: Tensor,
    behavior_logp: Tensor,
    reward: Tensor,
    step: Tensor,
    episode_start: Tensor,
    *,
    gamma: float,
    baseline: float | Tensor | None,
    returns: Tensor | None,
    reduction: str,
    upper: float = LOG_RATIO_BOUND,
) -> _Inputs:
    baseline_tensor = baseline if isinstance(baseline, Tensor) else None
    check_flat(target_logp=target_logp, behavior_logp=behavior_logp, reward=reward, step=step,
               episode_start=episode_start, baseline=baseline_tensor, returns=returns)
    check_episode_start(episode_start)
    check_gamma(gamma)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if baseline is None:
        base = torch.zeros_like(reward, dtype=torch.float64)
    elif isinstance(baseline, Tensor):
        base = _float64(baseline)
    else:
        base = torch.full_like(reward, float(baseline), dtype=torch.float64)
    reward64 = _float64(reward)
    return _Inputs(
        target_logp=target_logp,
        log_rho=log_ratio(target_logp, behavior_logp, upper=upper),
        reward=reward64,
        discount=None if gamma == 1.0 else gamma ** _float64(step),
        episode_start=episode_start,
        baseline=base,
        returns=None if returns is None else reward64 if returns is reward else _float64(returns),
        n_episodes=int(episode_start.sum()),
    )


def _float64(column: Tensor) -> Tensor:
    """A constant column in float64: itself when it already is, else one exact copy."""
    if column.dtype == torch.float64 and not column.requires_grad:
        return column
    return column.detach().to(torch.float64)


def _discounted(x: _Inputs, terms: Tensor) -> Tensor:
    """γ^t · `terms` per row (`terms` itself when γ = 1)."""
    return terms if x.discount is None else x.discount * terms


def _returns(x: _Inputs, gamma: float) -> Tensor:
    if x.returns is not None:
        return x.returns
    return discounted_returns(x.reward, x.episode_start, gamma)


def _standardize(advantage: Tensor) -> tuple[Tensor, Tensor]:
    """Batch mean and std (population, floored at 1e-8) of `advantage`."""
    return advantage.mean(), advantage.std(correction=0).clamp_min(1e-8)


def _reduce(step_terms: Tensor, x: _Inputs, reduction: str) -> Tensor:
    if reduction == "none":
        loss = -episode_sum(step_terms, x.episode_start)
    else:
        loss = step_terms.sum() / -x.n_episodes  # = (−Σ)/N exactly, one op fewer
    return loss.to(x.target_logp.dtype if x.target_logp.is_floating_point() else torch.float64)


def trajectory_surrogate(
    target_logp: Tensor,
    behavior_logp: Tensor,
    reward: Tensor,
    step: Tensor,
    episode_start: Tensor,
    *,
    gamma: float,
    options: SurrogateOptions = DEFAULT_OPTIONS,
    baseline: float | Tensor | None = None,
    returns: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Trajectory-wise importance-sampling surrogate (`trajectory`), to be minimised.

        L(θ) = −(1/N) Σ_i w^i_{1:T}(θ) (R_i − b(s^i_0)),   R_i = Σ_t γ^t r^i_t

    Its gradient is the full-IS policy gradient of the seed,
    −(1/N) Σ_i w_{1:T} (Σ_t ∇log π_θ(a_t|s_t)) (R_i − b), and −L (with b = 0) is the ordinary IS
    estimate of J(π_θ). Unbiased when `behavior_logp` is the true log π_β with π_β > 0 wherever
    π_θ > 0, and no clip, PSIS or self-normalisation is used; its variance grows exponentially in
    the horizon (Precup et al. 2000; Levine, CS285 lecture 5).

    Options: `clip` caps each ρ_t ("step") or w_{1:T} ("cumulative"); `self_normalize` divides by
    the batch mean of w_{1:T} (weighted IS, not detached: −L is the WIS estimate and its gradient
    the gradient of WIS — consistent, O(1/N) bias); `baseline` b is taken at each episode's first
    row (a float, or b(s_0) from an [M] tensor) and subtracted from R_i — unbiased without
    clip, PSIS or self-normalisation because E_β[w_{1:T} b(s_0)] = E[b(s_0)] does not depend on
    θ; with `clip` (either mode) E_β[w̄_{1:T} | s_0] does, and the baseline biases the gradient
    by E_β[∇w̄_{1:T} b(s_0)] (module docstring); `standardize_returns` standardises
    R_i − b over the batch's episodes; `psis` Pareto-smooths the N episode weights;
    `ppo_epsilon` raises ValueError (no per-step ratio to clip); `returns` [M], when given,
    supplies R_i as the value at each episode's first row.

    Args:
        target_logp: log π_θ(a_t|s_t) under the policy being trained, [M], differentiable.
        behavior_logp: log π_β(a_t|s_t) of the logging policy, [M]; treated as a constant.
        reward: r_t, [M].
        step: t within the episode, starting at 0, [M] (the discount is γ^t).
        episode_start: True on each episode's first row, [M] bool.
        gamma: discount in [0, 1].
        options: a `SurrogateOptions`; its fields act here as follows:
            clip: weight cap c > 0, or None.
            clip_mode: "step" (cap ρ_t) or "cumulative" (cap w_{1:t}).
            self_normalize: weighted importance sampling.
            standardize_returns: standardise the returns after subtracting the baseline.
            ppo_epsilon: must be None here.
            psis: Pareto-smooth the weights.
        baseline: None, a float, or an [M] tensor b(s_t) (detached).
        returns: optional precomputed G_t, [M].
        reduction: "mean" (a scalar) or "none" (the N per-episode terms, whose mean is L).

    Returns:
        A scalar tensor (or [N] with reduction="none").
    """
    refuse_unsupported("trajectory", options, TRAJECTORY_OPTIONS)
    x = _prepare(target_logp, behavior_logp, reward, step, episode_start, gamma=gamma,
                 baseline=baseline, returns=returns, reduction=reduction)
    log_w = episode_from_log_ratio(x.log_rho, x.episode_start, options.clip, options.clip_mode)
    if options.psis:
        log_w = smooth_log_weight(log_w)
    if options.self_normalize:
        log_w = self_normalise(log_w)
    weight = cap_log_weight(log_w).exp()
    if x.returns is not None:
        episode_return = x.returns[x.episode_start]
    else:
        episode_return = episode_sum(_discounted(x, x.reward), x.episode_start)
    advantage = episode_return - x.baseline[x.episode_start]
    if options.standardize_returns:
        mean, std = _standardize(advantage)
        advantage = (advantage - mean) / std
    per_episode = -(weight * advantage)
    loss = per_episode if reduction == "none" else per_episode.mean()
    return loss.to(target_logp.dtype if target_logp.is_floating_point() else torch.float64)


def per_decision_surrogate(
    target_logp: Tensor,
    behavior_logp: Tensor,
    reward: Tensor,
    step: Tensor,
    episode_start: Tensor,
    *,
    gamma: float,
    options: SurrogateOptions = DEFAULT_OPTIONS,
    baseline: float | Tensor | None = None,
    returns: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Per-decision importance-sampling (PDIS) surrogate (`per-decision`), to be minimised.

        L(θ) = −(1/N) Σ_i Σ_t γ^t [ w_{1:t}(θ) r_t − (w_{1:t}(θ) − w_{1:t−1}(θ)) b(s_t) ],
        w_{1:0} = 1.

    With b = 0, −L is the PDIS estimate of J(π_θ) (Precup, Sutton & Singh 2000) and its
    gradient is the causal off-policy policy gradient
    −(1/N) Σ_i Σ_t ∇log π_θ(a_t|s_t) Σ_{t'≥t} γ^{t'} w_{1:t'} r_{t'}, unbiased when
    `behavior_logp` is the true log π_β (π_β > 0 wherever π_θ > 0) and no clip, PSIS or
    self-normalisation is used. It has lower variance than `trajectory`: r_t is weighted only by
    the ratios of actions that preceded it. (The seed's causal equation, with the future product
    starting at t'' = t, counts ρ_t twice and is biased.)

    Options: `clip` caps ρ_t ("step") or w_{1:t} ("cumulative"); `self_normalize` divides
    w_{1:t} by n_t, the mean over the batch's N episodes of w_{1:t} (ended episodes carry their
    final weight) — weighted PDIS, normaliser not detached; `baseline` b(s_t) enters as the
    control variate γ^t (w_{1:t} − w_{1:t−1}) b(s_t), whose expectation under β is 0 for every
    θ, so the gradient stays unbiased — without clip: with clipped weights w̄ its expectation
    w̄_{1:t−1}(E_β[min(ρ_t, c) | s_t] − 1) b(s_t) depends on θ wherever some action has ρ ≥ c,
    and the baseline biases the gradient (module docstring);
    at θ = β the gradient is Σ_t γ^t ∇log π_t (G_t − b_t),
    REINFORCE with a baseline; `standardize_returns` adds the batch mean of G_t − b_t to the
    baseline (same control variate) and divides the loss by its std; `psis` Pareto-smooths all
    M cumulative weights as one sample; `ppo_epsilon` and `returns` raise ValueError.

    Args:
        target_logp: log π_θ(a_t|s_t) under the policy being trained, [M], differentiable.
        behavior_logp: log π_β(a_t|s_t) of the logging policy, [M]; treated as a constant.
        reward: r_t, [M].
        step: t within the episode, starting at 0, [M].
        episode_start: True on each episode's first row, [M] bool.
        gamma: discount in [0, 1].
        options: a `SurrogateOptions`; its fields act here as follows:
            clip: weight cap c > 0, or None.
            clip_mode: "step" or "cumulative".
            self_normalize: weighted per-decision importance sampling.
            standardize_returns: see above.
            ppo_epsilon: must be None here.
            psis: Pareto-smooth the weights.
        baseline: None, a float, or an [M] tensor b(s_t) (detached).
        returns: must be None here (the estimator weights each r_t separately).
        reduction: "mean" (a scalar) or "none" (N per-episode terms whose mean is L).

    Returns:
        A scalar tensor (or [N] with reduction="none").
    """
    refuse_unsupported("per-decision", options, PER_DECISION_OPTIONS)
    if returns is not None:
        raise ValueError("the per-decision surrogate weights each reward r_t by w_{1:t}: pass "
                         "reward, not precomputed returns")
    x = _prepare(target_logp, behavior_logp, reward, step, episode_start, gamma=gamma,
                 baseline=baseline, returns=returns, reduction=reduction)
    log_w = cumulative_from_log_ratio(x.log_rho, x.episode_start, options.clip, options.clip_mode)
    if options.psis:
        log_w = smooth_log_weight(log_w)
    if options.self_normalize:
        log_w = log_w - position_log_normaliser(log_w, x.episode_start)
    weight = cap_log_weight(log_w).exp()
    previous = torch.where(x.episode_start, 1.0, torch.roll(weight, 1))
    base, scale = x.baseline, torch.ones((), dtype=torch.float64, device=x.reward.device)
    if options.standardize_returns:
        mean, scale = _standardize(_returns(x, gamma) - x.baseline)
        base = base + mean
    terms = _discounted(x, weight * x.reward - (weight - previous) * base) / scale
    return _reduce(terms, x, reduction)


def _ppo_term(ratio: Tensor, advantage: Tensor, epsilon: float) -> Tensor:
    """PPO's pessimistic term min(ρA, clip(ρ, 1−ε, 1+ε)A) (Schulman et al. 2017)."""
    return torch.minimum(ratio * advantage, ratio.clamp(1 - epsilon, 1 + epsilon) * advantage)


def past_weight_surrogate(
    target_logp: Tensor,
    behavior_logp: Tensor,
    reward: Tensor,
    step: Tensor,
    episode_start: Tensor,
    *,
    gamma: float,
    options: SurrogateOptions = DEFAULT_OPTIONS,
    baseline: float | Tensor | None = None,
    returns: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Past-weight surrogate (`past-weight`): the seed's step 1, future ratios dropped.

        L(θ) = −(1/N) Σ_i Σ_t γ^t sg(w_{1:t}) log π_θ(a_t|s_t) (G_t − b(s_t))

    Gradient: −(1/N) Σ Σ_t γ^t w_{1:t} ∇log π_θ(a_t|s_t) (G_t − b_t). Biased for θ ≠ β (the
    future weights w_{t+1:t'} on the rewards in G_t are dropped) — a policy-iteration-style
    improvement direction (seed; Levine, CS285 lecture 5); exact in expectation at θ = β. The
    baseline adds no bias without clip or PPO: E_β[w_{1:t} ∇log π_t b(s_t)] = 0; with them the
    current step's factor is no longer ρ_t and it does (module docstring).

    Options: `clip` caps ρ_t ("step") or w_{1:t} ("cumulative") in the constant coefficient
    (the capped coefficient still multiplies ∇log π_t); `self_normalize` divides w_{1:t} by n_t,
    the batch mean at position t (as in `per_decision_surrogate`; detached like the weight);
    `standardize_returns` standardises G_t − b_t over the batch's steps; `psis` Pareto-smooths
    the M cumulative weights; `ppo_epsilon` = ε switches to the ratio form
    −(1/N) Σ Σ_t γ^t sg(w_{1:t−1}) min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t), which has the same
    gradient while ρ_t stays within [1−ε, 1+ε] and none beyond (Schulman et al. 2017; in
    "step" clip mode ρ_t is first capped at c, and sg(w_{1:t−1}) carries the clip and PSIS);
    `returns` [M] replaces the G_t computed from `reward`.

    Args:
        target_logp: log π_θ(a_t|s_t) under the policy being trained, [M], differentiable.
        behavior_logp: log π_β(a_t|s_t) of the logging policy, [M]; treated as a constant.
        reward: r_t, [M].
        step: t within the episode, starting at 0, [M].
        episode_start: True on each episode's first row, [M] bool.
        gamma: discount in [0, 1].
        options: a `SurrogateOptions`; its fields act here as follows:
            clip: weight cap c > 0, or None.
            clip_mode: "step" or "cumulative".
            self_normalize: divide the weights by their per-position batch mean.
            standardize_returns: standardise G_t − b_t over the batch.
            ppo_epsilon: PPO clip range ε in (0, 1), or None.
            psis: Pareto-smooth the weights.
        baseline: None, a float, or an [M] tensor b(s_t) (detached).
        returns: optional precomputed G_t, [M].
        reduction: "mean" (a scalar) or "none" (N per-episode terms whose mean is L).

    Returns:
        A scalar tensor (or [N] with reduction="none").
    """
    refuse_unsupported("past-weight", options, PAST_WEIGHT_OPTIONS)
    x = _prepare(target_logp, behavior_logp, reward, step, episode_start, gamma=gamma,
                 baseline=baseline, returns=returns, reduction=reduction)
    log_w = cumulative_from_log_ratio(x.log_rho, x.episode_start, options.clip,
                                      options.clip_mode).detach()
    if options.psis:
        log_w = smooth_log_weight(log_w)
    if options.self_normalize:
        log_w = log_w - position_log_normaliser(log_w, x.episode_start)
    log_w = cap_log_weight(log_w)
    advantage = _returns(x, gamma) - x.baseline
    if options.standardize_returns:
        mean, std = _standardize(advantage)
        advantage = (advantage - mean) / std
    if options.ppo_epsilon is None:
        terms = _discounted(x, log_w.exp()) * x.target_logp.double() * advantage
    else:
        previous = torch.where(x.episode_start, 0.0, torch.roll(log_w, 1)).exp()
        step_clip = options.clip if options.clip_mode == "step" else None
        ratio = cap_log_weight(clip_log_ratio(x.log_rho, step_clip)).exp()
        terms = _discounted(x, previous) * _ppo_term(ratio, advantage, options.ppo_epsilon)
    return _reduce(terms, x, reduction)


def per_step_surrogate(
    target_logp: Tensor,
    behavior_logp: Tensor,
    reward: Tensor,
    step: Tensor,
    episode_start: Tensor,
    *,
    gamma: float,
    options: SurrogateOptions = DEFAULT_OPTIONS,
    baseline: float | Tensor | None = None,
    returns: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Per-step surrogate (`per-step`): the seed's final form, one ratio per step.

        L(θ) = −(1/N) Σ_i Σ_t γ^t ρ_t(θ) (G_t − b(s_t))

    Gradient: −(1/N) Σ Σ_t γ^t ρ_t ∇log π_θ(a_t|s_t) (G_t − b_t). Biased for θ ≠ β: it ignores
    the change of state distribution and the future weights, with error bounded when π_θ stays
    close to π_β (seed; Levine, CS285 lecture 5; the surrogate of TRPO/PPO, Schulman et al.
    2015/2017). At θ = β it is exactly the on-policy REINFORCE gradient with reward-to-go.
    The baseline adds no bias without clip or PPO: E_{a~β}[ρ ∇log π_θ] = 0; with clip c it adds
    −Σ_t γ^t E_{s_t∼β}[b(s_t) Σ_a π(a|s_t) 1[ρ ≥ c] ∇log π(a|s_t)] to the expected gradient
    (exact closed form, tested), and with PPO a bias of the same kind (module docstring).
    The loss is the mean over episodes of
    the per-episode sum, so its scale matches the other estimators. When rows are single steps
    drawn from many episodes, pass precomputed `returns` and `episode_start` all True: the loss
    is then the per-step mean (the episode scale divided by the mean episode length).

    Options: `clip` caps ρ_t at c (`clip_mode="cumulative"` is refused: no product here);
    `self_normalize` divides ρ_t by its batch mean over the M steps (not detached);
    `standardize_returns` standardises G_t − b_t over the batch; `psis` Pareto-smooths the M
    ratios; `ppo_epsilon` = ε uses PPO's min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)
    (Schulman et al. 2017); `returns` [M] replaces the G_t computed from `reward`.

    Args:
        target_logp: log π_θ(a_t|s_t) under the policy being trained, [M], differentiable.
        behavior_logp: log π_β(a_t|s_t) of the logging policy, [M]; treated as a constant.
        reward: r_t, [M].
        step: t within the episode, starting at 0, [M].
        episode_start: True on each episode's first row, [M] bool.
        gamma: discount in [0, 1].
        options: a `SurrogateOptions`; its fields act here as follows:
            clip: ratio cap c > 0, or None.
            clip_mode: "cumulative" is refused (one ratio per row: nothing to cap cumulatively).
            self_normalize: divide ρ_t by its batch mean.
            standardize_returns: standardise G_t − b_t over the batch.
            ppo_epsilon: PPO clip range ε in (0, 1), or None.
            psis: Pareto-smooth the ratios.
        baseline: None, a float, or an [M] tensor b(s_t) (detached).
        returns: optional precomputed G_t, [M].
        reduction: "mean" (a scalar) or "none" (N per-episode terms whose mean is L).

    Returns:
        A scalar tensor (or [N] with reduction="none").
    """
    # Without PSIS or self-normalisation, min(log ρ_t, log c, 80) is `log_ratio`'s one clamp:
    # the values and gradient of clip → cap, with two autograd nodes fewer on the hot path.
    plain = not options.psis and not options.self_normalize
    cap = min(MAX_LOG_WEIGHT, math.log(options.clip) if options.clip else math.inf)
    x = _prepare(target_logp, behavior_logp, reward, step, episode_start, gamma=gamma,
                 baseline=baseline, returns=returns, reduction=reduction,
                 upper=cap if plain else LOG_RATIO_BOUND)
    refuse_unsupported("per-step", options, PER_STEP_OPTIONS)
    if plain:
        ratio = x.log_rho.exp()
    else:
        log_rho = clip_log_ratio(x.log_rho, options.clip)
        if options.psis:
            log_rho = smooth_log_weight(log_rho)
        if options.self_normalize:
            log_rho = self_normalise(log_rho)
        ratio = cap_log_weight(log_rho).exp()
    advantage = _returns(x, gamma) - x.baseline
    if options.standardize_returns:
        mean, std = _standardize(advantage)
        advantage = (advantage - mean) / std
    if options.ppo_epsilon is None:
        terms = _discounted(x, ratio) * advantage
    else:
        terms = _discounted(x, _ppo_term(ratio, advantage, options.ppo_epsilon))
    return _reduce(terms, x, reduction)
