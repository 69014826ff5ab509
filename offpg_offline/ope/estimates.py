"""The importance-sampling and doubly robust estimators of J(π) over flat step tensors.

Conventions (padding of ended episodes, counts for resampling) are in `offpg_offline.ope`.
Weights come from the shared log-space pipeline of `offpg_offline.estimators.weights` and are
never exponentiated raw: a weight that multiplies a return is exp(min(log w, MAX_LOG_WEIGHT))
(the trainer's cap, e^80), and every normaliser (WIS, WPDIS, WDR) is formed from log-weights
shifted by their maximum, so self-normalised point estimates are exact for any log-weights
(±800 included: no OverflowError, no 0/0 → 0.0) and the cap never binds on them. One limit: in a
bootstrap resample WPDIS/WDR shift each time column by its maximum over all episodes, so a
resample that omits that episode and whose drawn weights at t are all > 745 nats below it gets 0
for that column (WIS shifts per resample and has no such limit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch
from torch import Tensor

from offpg_offline.estimators.segments import (
    check_episode_start,
    check_flat,
    check_gamma,
    episode_index,
    episode_last,
    episode_sum,
)
from offpg_offline.estimators.weights import (
    capped_weight,
    cumulative_from_log_ratio,
    kish_ess,
    log_ratio,
    padded_log_sums,
    scaled_column_sums,
)

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Layout:
    index: Tensor  # [M] episode ordinal 0..E-1
    step: Tensor  # [M] int64, t within the episode
    last: Tensor  # [M] bool, the episode's last row
    length: Tensor  # [E] int64, T_e
    n_episodes: int
    horizon: int  # T_max


def _layout(step: Tensor, episode_start: Tensor) -> _Layout:
    check_flat(step=step, episode_start=episode_start)
    check_episode_start(episode_start)
    index = episode_index(episode_start)
    position = torch.arange(step.shape[0], device=step.device)
    first_row = torch.cummax(torch.where(episode_start, position, 0), dim=0).values
    if not torch.equal(step.long(), position - first_row):
        raise ValueError("step must count 0, 1, 2, … within each episode (episodes contiguous)")
    n_episodes = int(episode_start.sum())
    length = torch.zeros(n_episodes, dtype=torch.int64, device=step.device)
    length = length.index_add(0, index, torch.ones_like(index))
    return _Layout(index, step.long(), episode_last(episode_start), length, n_episodes,
                   int(length.max()))


def _ones_counts(layout: _Layout) -> Tensor:
    return torch.ones(1, layout.n_episodes, dtype=F64, device=layout.index.device)


def _check_counts(counts: Tensor, n_episodes: int) -> None:
    if counts.ndim != 2 or counts.shape[1] != n_episodes:
        raise ValueError(f"counts must have shape [B, {n_episodes}], got {tuple(counts.shape)}")


def _safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator with 0/0 := 0 (a time step where every weight vanished)."""
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1.0), 0.0)


def _normalised_column_sums(log_w: Tensor, values: Tensor, layout: _Layout, counts: Tensor,
                            log_denominator: Tensor) -> Tensor:
    r"""Σ_e c_e w_{e,t} v_{e,t} / D_t per column t, [B, T_max], from log-weights and log D_t.

    Numerator and denominator share the column shift a_t of `scaled_column_sums`:
    (S_t e^{a_t}) / e^{log D_t} = S_t / e^{log D_t − a_t}; 0 where D_t = 0.
    """
    sums, shift = scaled_column_sums(log_w, values, layout.step, layout.index, layout.horizon,
                                     counts)
    return _safe_ratio(sums, torch.exp(log_denominator - shift))


def _log_weights(target_logp: Tensor, behavior_logp: Tensor, episode_start: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """(log w_{0:t}, log w_{0:t−1}) per row, float64, detached; −inf where the weight is 0.

    From the shared pipeline (`estimators.weights.cumulative_from_log_ratio`): a zero target
    probability (log π = −inf, e.g. a greedy policy) sends the log-weight to −inf exactly from
    that step on, without poisoning later episodes. Not capped: the cap applies only where a
    weight multiplies a value (`capped_weight`); normalisers use the log-weights themselves.
    """
    log_rho = log_ratio(target_logp.detach(), behavior_logp.detach())
    log_weight = cumulative_from_log_ratio(log_rho, episode_start)
    log_previous = torch.where(episode_start, 0.0, log_weight.roll(1))
    return log_weight, log_previous


def _discount(step: Tensor, gamma: float) -> Tensor:
    return torch.full_like(step, gamma, dtype=F64).pow(step.to(F64))


def trajectory_weights(target_logp: Tensor, behavior_logp: Tensor, episode_start: Tensor
                       ) -> Tensor:
    """Whole-episode importance weights W_e = Π_t π(a_t|s_t)/β(a_t|s_t), [E] float64, capped at
    e^`MAX_LOG_WEIGHT` (the one cap; see the module docstring)."""
    log_weight, _ = _log_weights(target_logp, behavior_logp, episode_start)
    return capped_weight(log_weight[episode_last(episode_start)])


def episode_mean(contributions: Tensor, counts: Tensor | None = None) -> Tensor:
    """(Σ_e c_e x_e) / Σ_e c_e: the mean of per-episode contributions, scalar or [B] with counts."""
    if counts is None:
        return contributions.double().mean()
    _check_counts(counts, contributions.shape[0])
    counts = counts.to(device=contributions.device, dtype=F64)
    return counts @ contributions.double() / counts.sum(1)


# --------------------------------------------------------------------------------------------
# Importance-sampling family
# --------------------------------------------------------------------------------------------


def importance_sampling(
    target_logp: Tensor,
    behavior_logp: Tensor,
    reward: Tensor,
    step: Tensor,
    episode_start: Tensor,
    *,
    gamma: float,
) -> Tensor:
    r"""Per-episode terms of trajectory importance sampling (IS).

        IS = (1/N) Σ_e x_e,   x_e = w_{0:T_e−1} · Σ_t γ^t r_t.

    Unbiased for J(π) when β(a|s) > 0 wherever π(a|s) > 0 and `behavior_logp` is the true
    log β; variance grows exponentially with the horizon. For T = 1 this is IPW.

    Args:
        target_logp: log π(a_t|s_t) under the evaluated policy, [M].
        behavior_logp: log β(a_t|s_t) of the logging policy, [M].
        reward: r_t, [M].
        step: t within the episode, 0-based, [M].
        episode_start: True on each episode's first row, [M] bool.
        gamma: discount in [0, 1].

    Returns:
        x_e, [E] float64; `episode_mean` of it is the estimate.
    """
    check_gamma(gamma)
    check_flat(target_logp=target_logp, behavior_logp=behavior_logp, reward=reward, step=step)
    layout = _layout(step, episode_start)
    log_weight, _ = _log_weights(target_logp, behavior_logp, episode_start)
    returns = episode_sum(_discount(layout.step, gamma) * reward.double(), episode_start)
    return capped_weight(log_weight[layout.last]) * returns


def weighted_importance_sampling(
    target_logp: Tensor,
    behavior_logp: Tensor,
    reward: Tensor,
    step: Tensor,
    episode_start: Tensor,
    *,
    gamma: float,
    counts: Tensor | None = None,
) -> Tensor:
    r"""Weighted (self-normalised) trajectory importance sampling (WIS).

        WIS = Σ_e W_e G_e / Σ_e W_e,   W_e = w_{0:T_e−1}.

    Biased (O(1/N)) but consistent, and always inside [min_e G_e, max_e G_e]. For T = 1 this is
    self-normalised IPW (SNIPW). Precup et al. (2000). Computed as Σ_e c_e e^{log W_e − m} G_e /
    Σ_e c_e e^{log W_e − m}, m the largest log W_e drawn in each resample: exact for any scale.

    Args:
        target_logp, behavior_logp, reward, step, episode_start, gamma: as in
            `importance_sampling`.
        counts: optional [B, E] episode multiplicities (bootstrap resamples, sub-logs).

    Returns:
        A scalar, or [B] with `counts`.
    """
    layout = _layout(step, episode_start)
    log_weight, _ = _log_weights(target_logp, behavior_logp, episode_start)
    log_w = log_weight[layout.last]
    returns = episode_sum(_discount(layout.step, gamma) * reward.double(), episode_start)
    c = _ones_counts(layout) if counts is None else counts.to(layout.index.device, F64)
    _check_counts(c, layout.n_episodes)
    drawn = torch.where(c > 0, log_w, -math.inf)
    shift = drawn.amax(dim=1, keepdim=True)
    scaled = c * torch.exp(drawn - torch.where(torch.isfinite(shift), shift, 0.0))
    value = _safe_ratio(scaled @ returns, scaled.sum(1))
    return value[0] if counts is None else value


def per_decision_importance_sampling(
    target_logp: Tensor,
    behavior_logp: Tensor,
    reward: Tensor,
    step: Tensor,
    episode_start: Tensor,
    *,
    gamma: float,
) -> Tensor:
    r"""Per-episode terms of per-decision importance sampling (PDIS).

        PDIS = (1/N) Σ_e x_e,   x_e = Σ_t γ^t w_{0:t} r_t.

    Unbiased under the same support condition as IS, with lower variance: r_t is weighted only
    by the ratios of the decisions that preceded it. Precup, Sutton & Singh (2000).

    Returns:
        x_e, [E] float64; `episode_mean` of it is the estimate.
    """
    check_gamma(gamma)
    check_flat(target_logp=target_logp, behavior_logp=behavior_logp, reward=reward, step=step)
    layout = _layout(step, episode_start)
    log_weight, _ = _log_weights(target_logp, behavior_logp, episode_start)
    terms = _discount(layout.step, gamma) * capped_weight(log_weight) * reward.double()
    return episode_sum(terms, episode_start)


def weighted_per_decision_importance_sampling(
    target_logp: Tensor,
    behavior_logp: Tensor,
    reward: Tensor,
    step: Tensor,
    episode_start: Tensor,
    *,
    gamma: float,
    counts: Tensor | None = None,
) -> Tensor:
    r"""Per-decision weighted importance sampling (WPDIS).

        WPDIS = Σ_t γ^t Σ_e w_{e,0:t} r_{e,t} / Σ_e w̃_{e,t},

    where w̃_{e,t} = w_{e,0:min(t, T_e−1)} is the weight padded past the episode's end (module
    docstring: ended episodes sit in an absorbing state with r = 0, ρ = 1). Biased, consistent,
    usually far lower variance than PDIS. Precup (2000); Thomas (2015, §3.8).

    Args:
        counts: optional [B, E] episode multiplicities; other arguments as in
            `importance_sampling`.

    Returns:
        A scalar, or [B] with `counts`.
    """
    check_gamma(gamma)
    check_flat(target_logp=target_logp, behavior_logp=behavior_logp, reward=reward, step=step)
    layout = _layout(step, episode_start)
    log_weight, _ = _log_weights(target_logp, behavior_logp, episode_start)
    c = _ones_counts(layout) if counts is None else counts.to(layout.index.device, F64)
    _check_counts(c, layout.n_episodes)
    padded = padded_log_sums(log_weight, episode_start, c)  # log Σ_e c_e w̃_{e,t}
    per_step = _normalised_column_sums(log_weight, reward, layout, c, padded)
    discount = _discount(torch.arange(layout.horizon, device=c.device), gamma)
    value = (discount * per_step).sum(1)
    return value[0] if counts is None else value


# --------------------------------------------------------------------------------------------
# Doubly robust family and the direct method
# --------------------------------------------------------------------------------------------


def _dr_parts(
    target_logp: Tensor, behavior_logp: Tensor, reward: Tensor, step: Tensor,
    episode_start: Tensor, q_value: Tensor, state_value: Tensor, end_value: Tensor | None,
    gamma: float,
) -> tuple[_Layout, Tensor, Tensor, Tensor, Tensor]:
    check_gamma(gamma)
    check_flat(target_logp=target_logp, behavior_logp=behavior_logp, reward=reward, step=step,
               q_value=q_value, state_value=state_value, end_value=end_value)
    layout = _layout(step, episode_start)
    log_weight, log_previous = _log_weights(target_logp, behavior_logp, episode_start)
    tail = 0.0 if end_value is None else gamma * torch.where(layout.last, end_value.double(), 0.0)
    residual = reward.double() - q_value.double() + tail
    return layout, log_weight, log_previous, residual, state_value.double()


def doubly_robust(
    target_logp: Tensor,
    behavior_logp: Tensor,
    reward: Tensor,
    step: Tensor,
    episode_start: Tensor,
    q_value: Tensor,
    state_value: Tensor,
    *,
    gamma: float,
    end_value: Tensor | None = None,
) -> Tensor:
    r"""Per-episode terms of the doubly robust estimator (DR), Jiang & Li (2016).

        x_e = Σ_t γ^t [ w_{0:t} (r_t − Q̂(s_t, a_t)) + w_{0:t−1} V̂(s_t) ]
            = V̂(s_0) + Σ_t γ^t w_{0:t} (r_t + γ V̂(s_{t+1}) − Q̂(s_t, a_t))   (V̂ past the end = 0).

    Unbiased when the weights are exact, whatever Q̂ (V̂ must be Σ_a π(a|s) Q̂(s,a)); equal to
    J(π) exactly, episode by episode, when Q̂ = Q^π on a deterministic MDP with one start state.

    Args:
        target_logp, behavior_logp, reward, step, episode_start, gamma: as in
            `importance_sampling`.
        q_value: Q̂(s_t, a_t) at the logged actions, [M].
        state_value: V̂(s_t) = E_{a∼π} Q̂(s_t, a), [M].
        end_value: optional [M]; V̂(s_{t+1}) on the last row of episodes whose tail should be
            bootstrapped (truncated by a log cut, with a critic that bootstraps too), 0 elsewhere.
            None estimates the value of the logged horizon, like the IS family.

    Returns:
        x_e, [E] float64; `episode_mean` of it is the estimate.
    """
    layout, weight, previous, residual, value = _dr_parts(
        target_logp, behavior_logp, reward, step, episode_start, q_value, state_value,
        end_value, gamma)
    terms = _discount(layout.step, gamma) * (capped_weight(weight) * residual
                                             + capped_weight(previous) * value)
    return episode_sum(terms, episode_start)


def weighted_doubly_robust(
    target_logp: Tensor,
    behavior_logp: Tensor,
    reward: Tensor,
    step: Tensor,
    episode_start: Tensor,
    q_value: Tensor,
    state_value: Tensor,
    *,
    gamma: float,
    end_value: Tensor | None = None,
    counts: Tensor | None = None,
) -> Tensor:
    r"""Weighted doubly robust estimator (WDR), Thomas & Brunskill (2016, eq. 10).

        WDR = Σ_t γ^t [ Σ_e w_{e,0:t} (r_{e,t} − Q̂_{e,t}) / Σ_e w̃_{e,t}
                        + Σ_e w_{e,0:t−1} V̂(s_{e,t}) / Σ_e w̃_{e,t−1} ],

    with the padded weights w̃ of `weighted_per_decision_importance_sampling` (Σ_e w̃_{e,−1} = N).
    WPDIS with Q̂ as a control variate: biased, consistent, and exact when Q̂ = Q^π on a
    deterministic MDP.

    Args:
        counts: optional [B, E] episode multiplicities; other arguments as in `doubly_robust`.

    Returns:
        A scalar, or [B] with `counts`.
    """
    layout, weight, previous, residual, value = _dr_parts(
        target_logp, behavior_logp, reward, step, episode_start, q_value, state_value,
        end_value, gamma)
    c = _ones_counts(layout) if counts is None else counts.to(layout.index.device, F64)
    _check_counts(c, layout.n_episodes)
    padded = padded_log_sums(weight, episode_start, c)  # log Σ_e c_e w̃_{e,t}
    padded_previous = torch.cat([c.sum(1, keepdim=True).log(), padded[:, :-1]], dim=1)
    correction = _normalised_column_sums(weight, residual, layout, c, padded)
    baseline = _normalised_column_sums(previous, value, layout, c, padded_previous)
    discount = _discount(torch.arange(layout.horizon, device=c.device), gamma)
    value_b = (discount * (correction + baseline)).sum(1)
    return value_b[0] if counts is None else value_b


def direct_method(state_value: Tensor, episode_start: Tensor) -> Tensor:
    """Per-episode terms of the direct method, V̂(s_0^e), [E] float64 (their mean is FQE's)."""
    check_flat(state_value=state_value, episode_start=episode_start)
    check_episode_start(episode_start)
    return state_value.double()[episode_start]


def effective_sample_size(weight: Tensor) -> float:
    """Kish's effective sample size (Σ w)² / Σ w² of non-negative weights (0 if all vanish);
    `estimators.weights.kish_ess` of their logarithms."""
    return kish_ess(weight.double().log())


def per_decision_ess(
    target_logp: Tensor, behavior_logp: Tensor, step: Tensor, episode_start: Tensor
) -> float:
    r"""Smallest Kish ESS over time steps of the padded cumulative weights w̃_{·,t}.

        min_t (Σ_e w̃_{e,t})² / Σ_e w̃_{e,t}²

    The per-decision estimators (PDIS, WPDIS, DR, WDR) weight step t by w_{0:t}; their worst step
    bounds how many episodes effectively inform the estimate.
    """
    _layout(step, episode_start)
    log_weight, _ = _log_weights(target_logp, behavior_logp, episode_start)
    log_total = padded_log_sums(log_weight, episode_start)[0]
    log_squares = padded_log_sums(2 * log_weight, episode_start)[0]
    ess = torch.where(torch.isfinite(log_squares), (2 * log_total - log_squares).exp(), 0.0)
    return float(ess.min())


# --------------------------------------------------------------------------------------------
# The OPE registry
# --------------------------------------------------------------------------------------------

Statistic = Callable[[Tensor], Tensor]
"""counts [B, E] (episode multiplicities of B resamples) → the B estimates, [B]."""


@dataclass(frozen=True, slots=True)
class OpeInputs:
    """What an OPE estimator reads: the flat log, γ, and (for critic estimators) Q̂, V̂."""

    target_logp: Tensor
    behavior_logp: Tensor
    reward: Tensor
    step: Tensor
    episode_start: Tensor
    gamma: float
    q_value: Tensor | None = None
    state_value: Tensor | None = None
    end_value: Tensor | None = None

    @property
    def log(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(target_logp, behavior_logp, reward, step, episode_start)."""
        return (self.target_logp, self.behavior_logp, self.reward, self.step,
                self.episode_start)

    def critic(self) -> tuple[Tensor, Tensor]:
        """(Q̂, V̂), or ValueError when no critic was fitted."""
        if self.q_value is None or self.state_value is None:
            raise ValueError("this estimator needs a critic: pass q_value and state_value")
        return self.q_value, self.state_value


@dataclass(frozen=True, slots=True)
class OpeSpec:
    """One OPE estimator: `statistic(inputs)` builds counts → estimates; `needs_critic` says it
    reads Q̂/V̂ (FQE is fitted first); `ess` names the weights its ESS is reported on
    ("trajectory": W_e, "decision": worst-step w̃_{·,t}, "episodes": N)."""

    statistic: Callable[[OpeInputs], Statistic]
    needs_critic: bool
    ess: Literal["trajectory", "decision", "episodes"]


def _mean_of(terms: Tensor) -> Statistic:
    return lambda c: episode_mean(terms, c)


def _is(x: OpeInputs) -> Statistic:
    return _mean_of(importance_sampling(*x.log, gamma=x.gamma))


def _wis(x: OpeInputs) -> Statistic:
    return lambda c: weighted_importance_sampling(*x.log, gamma=x.gamma, counts=c)


def _pdis(x: OpeInputs) -> Statistic:
    return _mean_of(per_decision_importance_sampling(*x.log, gamma=x.gamma))


def _wpdis(x: OpeInputs) -> Statistic:
    return lambda c: weighted_per_decision_importance_sampling(*x.log, gamma=x.gamma, counts=c)


def _dr(x: OpeInputs) -> Statistic:
    return _mean_of(doubly_robust(*x.log, *x.critic(), gamma=x.gamma, end_value=x.end_value))


def _wdr(x: OpeInputs) -> Statistic:
    q_value, state_value = x.critic()
    return lambda c: weighted_doubly_robust(*x.log, q_value, state_value, gamma=x.gamma,
                                            end_value=x.end_value, counts=c)


def _fqe(x: OpeInputs) -> Statistic:
    return _mean_of(direct_method(x.critic()[1], x.episode_start))


OPE_ESTIMATORS: Mapping[str, OpeSpec] = MappingProxyType({
    "is": OpeSpec(_is, needs_critic=False, ess="trajectory"),
    "wis": OpeSpec(_wis, needs_critic=False, ess="trajectory"),
    "pdis": OpeSpec(_pdis, needs_critic=False, ess="decision"),
    "wpdis": OpeSpec(_wpdis, needs_critic=False, ess="decision"),
    "dr": OpeSpec(_dr, needs_critic=True, ess="decision"),
    "wdr": OpeSpec(_wdr, needs_critic=True, ess="decision"),
    "fqe": OpeSpec(_fqe, needs_critic=True, ess="episodes"),
})
"""OPE estimator name → spec, in reporting order; the keys equal `config.SELECT_ESTIMATORS`
(tested in tests/test_wiring.py). Adding one: a function here, one entry, and the name in
`config.SELECT_ESTIMATORS`."""
