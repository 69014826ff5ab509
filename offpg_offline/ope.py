r"""Off-policy evaluation of a target policy π from logged episodes, with intervals.

Estimates J(π) = E_π[Σ_t γ^t r_t] from episodes logged by a behavior policy β:

| name    | estimator                                            | reference               |
|---------|------------------------------------------------------|-------------------------|
| `is`    | trajectory importance sampling (1/N) Σ_e W_e G_e     | Precup et al. 2000      |
| `wis`   | weighted (self-normalised) IS                        | Precup et al. 2000      |
| `pdis`  | per-decision IS (1/N) Σ_e Σ_t γ^t w_{0:t} r_t        | Precup et al. 2000      |
| `wpdis` | per-decision weighted IS (normalised at each t)      | Thomas 2015, §3         |
| `dr`    | doubly robust, Jiang & Li recursion, FQE critic      | Jiang & Li 2016         |
| `wdr`   | weighted doubly robust                               | Thomas & Brunskill 2016 |
| `fqe`   | fitted-Q evaluation (direct method) (1/N) Σ_e V̂(s_0) | Le et al. 2019          |

Notation: ρ_t = π(a_t|s_t)/β(a_t|s_t), w_{0:t} = Π_{k≤t} ρ_k (w_{0:−1} = 1), W_e = w_{0:T_e−1},
G_e = Σ_t γ^t r_t, N episodes.
Weights are exp of float64 segmented sums of log-ratios. Steps are flat [M] tensors,
episodes contiguous and in `step` order, `episode_start` True on each first row (as in
`offpg_offline.estimators`); nothing loops over episodes or steps in Python.

Variable-length episodes. The weighted per-decision estimators (`wpdis`, `wdr`) normalise at
each t. We follow the fixed-horizon convention of Thomas (2015, §3.1) and Jiang & Li (2016):
an episode that ended at T_e < t sits in an absorbing state with reward 0, Q̂ = V̂ = 0 and
ρ = 1, so its cumulative weight stays frozen at w_{0:T_e−1}. The normaliser at t is therefore
the sum over ALL episodes of the padded weight w̃_{e,t} = w_{0:min(t, T_e−1)}, whose β-mean is 1
for every t (optional stopping of the martingale w_{0:t}), which keeps both estimators
consistent. Normalising only over the episodes still alive at t would instead estimate
E_π[r_t | alive at t] and drop the survival probability: inconsistent whenever π changes how
long episodes last (CartPole). The IS family estimates the value of the logged horizon;
truncated episodes are not bootstrapped.

Intervals. Every estimate gets a seeded percentile bootstrap over episodes. Estimators are
written as functions of episode multiplicities `counts` [B, E] (row b: how often each episode is
drawn in resample b), so B resamples are evaluated in a few matrix products (sparse over
steps). For `dr`, `wdr` and `fqe` the critic is fitted once and held fixed while the final
estimate is resampled: the interval leaves out the critic's own fitting variance. The IS
family (`is`, `pdis`) also gets a 1 − δ lower bound by the empirical Bernstein inequality with
truncation, as in HCOPE (Thomas, Theocharous & Ghavamzadeh 2015); see `hcope_lower_bound`.

References:
    Precup, Sutton & Singh (2000), Eligibility traces for off-policy policy evaluation, ICML.
    Thomas (2015), Safe reinforcement learning, PhD thesis, UMass Amherst.
    Thomas, Theocharous & Ghavamzadeh (2015), High confidence off-policy evaluation, AAAI.
    Jiang & Li (2016), Doubly robust off-policy value evaluation for RL, ICML.
    Thomas & Brunskill (2016), Data-efficient off-policy policy evaluation for RL, ICML.
    Le, Voloshin & Yue (2019), Batch policy learning under constraints, ICML.
    Maurer & Pontil (2009), Empirical Bernstein bounds and sample variance penalization, COLT.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from offpg_offline.estimators.segments import (
    check_episode_start,
    check_flat,
    check_gamma,
    episode_index,
    episode_last,
    episode_sum,
    segmented_cumsum,
)
from offpg_offline.policies import mlp

if TYPE_CHECKING:
    from offpg_offline.data.batch import StepBatch

F64 = torch.float64
ESTIMATE_NAMES: tuple[str, ...] = ("is", "wis", "pdis", "wpdis", "dr", "wdr", "fqe")
_CRITIC_NAMES = frozenset({"dr", "wdr", "fqe"})
_COUNT_CELLS = 1 << 22  # bootstrap count matrices are built in chunks of at most B·E = 4M cells


class TargetPolicy(Protocol):
    """What OPE needs from π: `policies.CategoricalPolicy` and `GaussianPolicy` provide it."""

    def log_prob(self, obs: Tensor, action: Tensor) -> Tensor: ...

    def sample(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor: ...


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


def _time_sums(values: Tensor, layout: _Layout, counts: Tensor, column: Tensor) -> Tensor:
    """S[b, k] = Σ_rows counts[b, episode(row)]·values[row] over rows in column k, [B, T_max].

    A sparse [T_max, E] matrix with one entry per row times counts^T: O(M·B), no [B, M] gather.
    """
    indices = torch.stack([column, layout.index])
    shape = (layout.horizon + 1, layout.n_episodes)  # column T_max collects dropped entries
    sparse = torch.sparse_coo_tensor(indices, values.to(F64), shape, check_invariants=False)
    out = torch.sparse.mm(sparse.coalesce(), counts.to(F64).T).T
    return out[:, : layout.horizon]


def _padded_sums(weight: Tensor, layout: _Layout, counts: Tensor) -> Tensor:
    r"""Σ_e counts_e·w̃_{e,t}, [B, T_max], where w̃_{e,t} = weight at min(t, T_e − 1).

    Alive part by step column, plus each episode's final weight carried from column T_e on
    (a cumulative sum of non-negative terms: no cancellation).
    """
    alive = _time_sums(weight, layout, counts, layout.step)
    ended_column = torch.where(layout.last, layout.step + 1, layout.horizon)
    carried = _time_sums(torch.where(layout.last, weight, 0.0), layout, counts, ended_column)
    return alive + carried.cumsum(dim=1)


def _safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator with 0/0 := 0 (a time step where every weight vanished)."""
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1.0), 0.0)


_LOG_WEIGHT_CAP = 700.0  # exp(700) ≈ 1e304: beyond it, sums of weights would overflow to inf


def _log_weights(target_logp: Tensor, behavior_logp: Tensor, episode_start: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """(log w_{0:t}, log w_{0:t−1}) per row, float64, detached; −inf where the weight is 0.

    A zero target probability (log π = −inf, e.g. a greedy policy) is kept out of the float64
    running sum, where inf − inf would poison every later episode: it enters as log ρ = 0 and
    an exact count of zeros so far in the episode sends the log-weight to −inf afterwards.
    Log-weights are capped at 700.
    """
    log_ratio = target_logp.detach().double() - behavior_logp.detach().double()
    zero = log_ratio == -math.inf
    log_weight = segmented_cumsum(torch.where(zero, 0.0, log_ratio), episode_start)
    zeros_so_far = segmented_cumsum(zero.double(), episode_start)  # small integers: exact
    log_weight = torch.where(zeros_so_far > 0, -math.inf, log_weight.clamp_max(_LOG_WEIGHT_CAP))
    log_previous = torch.where(episode_start, 0.0, log_weight.roll(1))
    return log_weight, log_previous


def _discount(step: Tensor, gamma: float) -> Tensor:
    return torch.full_like(step, gamma, dtype=F64).pow(step.to(F64))


def trajectory_weights(target_logp: Tensor, behavior_logp: Tensor, episode_start: Tensor
                       ) -> Tensor:
    """Whole-episode importance weights W_e = Π_t π(a_t|s_t)/β(a_t|s_t), [E] float64."""
    log_weight, _ = _log_weights(target_logp, behavior_logp, episode_start)
    return log_weight[episode_last(episode_start)].exp()


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
    return log_weight[layout.last].exp() * returns


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
    self-normalised IPW (SNIPW). Precup et al. (2000).

    Args:
        target_logp, behavior_logp, reward, step, episode_start, gamma: as in
            `importance_sampling`.
        counts: optional [B, E] episode multiplicities (bootstrap resamples, sub-logs).

    Returns:
        A scalar, or [B] with `counts`.
    """
    layout = _layout(step, episode_start)
    log_weight, _ = _log_weights(target_logp, behavior_logp, episode_start)
    weight = log_weight[layout.last].exp()
    returns = episode_sum(_discount(layout.step, gamma) * reward.double(), episode_start)
    c = _ones_counts(layout) if counts is None else counts.to(layout.index.device, F64)
    _check_counts(c, layout.n_episodes)
    value = _safe_ratio(c @ (weight * returns), c @ weight)
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
    terms = _discount(layout.step, gamma) * log_weight.exp() * reward.double()
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
    weight = log_weight.exp()
    c = _ones_counts(layout) if counts is None else counts.to(layout.index.device, F64)
    _check_counts(c, layout.n_episodes)
    numerator = _time_sums(weight * reward.double(), layout, c, layout.step)
    discount = _discount(torch.arange(layout.horizon, device=c.device), gamma)
    value = (discount * _safe_ratio(numerator, _padded_sums(weight, layout, c))).sum(1)
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
    return layout, log_weight.exp(), log_previous.exp(), residual, state_value.double()


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
    terms = _discount(layout.step, gamma) * (weight * residual + previous * value)
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
    padded = _padded_sums(weight, layout, c)  # Σ_e w̃_{e,t}
    padded_previous = torch.cat([c.sum(1, keepdim=True), padded[:, :-1]], dim=1)
    correction = _time_sums(weight * residual, layout, c, layout.step)
    baseline = _time_sums(previous * value, layout, c, layout.step)
    discount = _discount(torch.arange(layout.horizon, device=c.device), gamma)
    value_b = (discount * (_safe_ratio(correction, padded)
                           + _safe_ratio(baseline, padded_previous))).sum(1)
    return value_b[0] if counts is None else value_b


def direct_method(state_value: Tensor, episode_start: Tensor) -> Tensor:
    """Per-episode terms of the direct method, V̂(s_0^e), [E] float64 (their mean is FQE's)."""
    check_flat(state_value=state_value, episode_start=episode_start)
    check_episode_start(episode_start)
    return state_value.double()[episode_start]


# --------------------------------------------------------------------------------------------
# Weight diagnostics and intervals
# --------------------------------------------------------------------------------------------


def effective_sample_size(weight: Tensor) -> float:
    """Kish's effective sample size (Σ w)² / Σ w² of non-negative weights (0 if all vanish)."""
    weight = weight.double()
    squares = float(weight.square().sum())
    return float(weight.sum()) ** 2 / squares if squares > 0 else 0.0


def per_decision_ess(
    target_logp: Tensor, behavior_logp: Tensor, step: Tensor, episode_start: Tensor
) -> float:
    r"""Smallest Kish ESS over time steps of the padded cumulative weights w̃_{·,t}.

        min_t (Σ_e w̃_{e,t})² / Σ_e w̃_{e,t}²

    The per-decision estimators (PDIS, WPDIS, DR, WDR) weight step t by w_{0:t}; their worst step
    bounds how many episodes effectively inform the estimate.
    """
    layout = _layout(step, episode_start)
    log_weight, _ = _log_weights(target_logp, behavior_logp, episode_start)
    weight = log_weight.exp()
    ones = _ones_counts(layout)
    total = _padded_sums(weight, layout, ones)[0]
    squares = _padded_sums(weight.square(), layout, ones)[0]
    return float(_safe_ratio(total.square(), squares).min())


def bootstrap_counts(n_episodes: int, n_resamples: int, generator: torch.Generator) -> Tensor:
    """Multiplicities of each episode in `n_resamples` resamples with replacement, [B, E] float64.

    Drawn as a [B, E] index matrix and counted with one scatter-add.
    """
    index = torch.randint(n_episodes, (n_resamples, n_episodes), generator=generator)
    counts = torch.zeros(n_resamples, n_episodes, dtype=F64)
    return counts.scatter_add_(1, index, torch.ones_like(index, dtype=F64))


def bootstrap_intervals(
    statistics: Mapping[str, Callable[[Tensor], Tensor]],
    n_episodes: int,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over episodes for several statistics at once.

    Every statistic maps episode multiplicities [B, E] to [B] values; all of them see the same
    seeded resamples (paired), drawn in chunks of at most 4M count cells.

    Args:
        statistics: name → statistic(counts) (e.g. `lambda c: episode_mean(x, c)`).
        n_episodes: E.
        n_boot: number of resamples B.
        level: coverage of the two-sided interval, in (0, 1).
        seed: seed of the resampling generator.

    Returns:
        name → (lower, upper) percentile bounds at (1 − level)/2 and (1 + level)/2.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_boot < 2:
        raise ValueError(f"n_boot must be at least 2, got {n_boot}")
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, _COUNT_CELLS // max(n_episodes, 1))
    draws: dict[str, list[Tensor]] = {name: [] for name in statistics}
    for start in range(0, n_boot, chunk):  # loop over resample chunks, not episodes
        counts = bootstrap_counts(n_episodes, min(chunk, n_boot - start), generator)
        for name, statistic in statistics.items():
            draws[name].append(statistic(counts).double().cpu())
    probs = torch.tensor([(1.0 - level) / 2.0, (1.0 + level) / 2.0], dtype=F64)
    out = {}
    for name, parts in draws.items():
        low, high = torch.quantile(torch.cat(parts), probs).tolist()
        out[name] = (low, high)
    return out


def empirical_bernstein_lower_bound(values: Tensor, *, clip: float, delta: float) -> float:
    r"""1 − δ lower bound on E[X] for i.i.d. X ≥ 0, from the truncated Y = min(X, c) ∈ [0, c].

        E[X] ≥ E[Y] ≥ Ȳ − sqrt(2 ln(2/δ) Var_n(Y) / n) − 7 c ln(2/δ) / (3 (n − 1)),

    Var_n the unbiased sample variance: Maurer & Pontil (2009, Thm 4), as used by HCOPE
    (Thomas et al. 2015, Thm 1). Valid for any c > 0 chosen independently of `values`.
    """
    n = values.shape[0]
    if n < 2:
        raise ValueError(f"the empirical Bernstein bound needs at least 2 values, got {n}")
    if clip <= 0 or not 0.0 < delta < 1.0:
        raise ValueError(f"need clip > 0 and delta in (0, 1), got clip={clip}, delta={delta}")
    clipped = values.double().clamp(max=clip)
    log_term = math.log(2.0 / delta)
    spread = math.sqrt(2.0 * log_term * float(clipped.var()) / n)
    return float(clipped.mean()) - spread - 7.0 * clip * log_term / (3.0 * (n - 1))


def hcope_lower_bound(values: Tensor, *, delta: float = 0.05, seed: int = 0) -> float:
    r"""High-confidence lower bound on E[X] for non-negative, importance-weighted terms X.

    HCOPE (Thomas, Theocharous & Ghavamzadeh 2015): the inputs are unbiased terms such as
    w_{0:T−1}·(G − g_min)/(g_max − g_min), normalised so that the returns lie in [0, 1] (then
    E[X] ≤ 1 and X ≥ 0; X is unbounded above because the weights are). The truncation c is
    chosen on a seeded 1/20 of the episodes, by maximising the bound predicted for the other
    19/20 (their §5), and the bound is computed on those 19/20 only, so c does not depend on
    them. With fewer than 40 values c = 1 (the largest possible mean) on all of them.

    Args:
        values: X_e ≥ 0, [E].
        delta: 1 − confidence.
        seed: seed of the split.

    Returns:
        A number that is ≤ E[X] with probability ≥ 1 − δ.
    """
    values = values.double().cpu()
    if bool((values < 0).any()):
        raise ValueError("hcope_lower_bound needs non-negative terms (normalise the returns)")
    n = values.shape[0]
    if n < 40:
        return empirical_bernstein_lower_bound(values, clip=1.0, delta=delta)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_pre = n // 20
    pre, post = values[order[:n_pre]], values[order[n_pre:]]
    candidates = torch.cat([pre, torch.ones(1, dtype=F64)]).clamp_min(1e-12).unique()
    clipped = torch.minimum(pre[:, None], candidates[None, :])  # [n_pre, K]
    log_term = math.log(2.0 / delta)
    n_post = post.shape[0]
    predicted = (clipped.mean(0) - (2.0 * log_term * clipped.var(0) / n_post).sqrt()
                 - 7.0 * candidates * log_term / (3.0 * (n_post - 1)))
    clip = float(candidates[int(predicted.argmax())])
    return empirical_bernstein_lower_bound(post, clip=clip, delta=delta)


# --------------------------------------------------------------------------------------------
# Fitted-Q evaluation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FQEConfig:
    """How the FQE critic is fitted (Le et al. 2019): K backups, each a few regression steps.

    Value travels one step back per backup, so K must be of the order of the effective horizon
    min(T, 1/(1 − γ)) or more: on CartPole (γ = 0.99) K = 40 reached 40% of the value and
    K = 500 about 90% of the online value; the defaults cost 5000 Adam steps.
    """

    hidden: tuple[int, ...] = (64, 64)  # tanh MLP; () is linear (tabular on one-hot states)
    iterations: int = 500  # K Bellman backups; the target network is refreshed after each
    steps_per_iteration: int = 10  # Adam steps regressing Q̂ on the frozen target
    batch_size: int = 512  # transitions per step (all of them when fewer)
    lr: float = 1e-3
    action_samples: int = 16  # continuous actions: a' ∼ π(·|s') drawn per next state for V̂
    bootstrap_truncated: bool | None = None  # bootstrap truncated last steps; None: when γ < 1
    time_feature: bool | None = None  # feed t/T_max to the critic; None: when not bootstrapping

    def __post_init__(self) -> None:
        for name in ("iterations", "steps_per_iteration", "batch_size", "action_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"fqe.{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"fqe.lr must be positive, got {self.lr}")


def _bootstraps(config: FQEConfig, gamma: float) -> bool:
    if config.bootstrap_truncated is None:
        return gamma < 1.0
    return config.bootstrap_truncated


class QCritic(nn.Module):
    """Q̂(s, a): a Q(s, ·) head for discrete actions, or an MLP of (s, a) for continuous ones.

    Observations are normalised with the fitting log's mean and std; outputs are scaled by
    `value_scale` (RMS reward × effective horizon) so that the network regresses O(1) numbers.
    """

    def __init__(
        self,
        obs_dim: int,
        *,
        n_actions: int | None,
        action_dim: int | None,
        hidden: Sequence[int],
        obs_mean: Tensor,
        obs_std: Tensor,
        value_scale: float,
        time_scale: float = 0.0,
    ) -> None:
        super().__init__()
        if (n_actions is None) == (action_dim is None):
            raise ValueError("give exactly one of n_actions (discrete) and action_dim (continuous)")
        self.n_actions, self.action_dim = n_actions, action_dim
        self.register_buffer("obs_mean", obs_mean.float().clone())
        self.register_buffer("obs_std", torch.where(obs_std > 1e-6, obs_std, 1.0).float().clone())
        self.register_buffer("value_scale", torch.tensor(float(value_scale)))
        self.register_buffer("time_scale", torch.tensor(float(time_scale)))
        in_dim = obs_dim + (action_dim or 0)
        self.net = mlp(in_dim, hidden, n_actions if n_actions is not None else 1)

    def features(self, obs: Tensor, step: Tensor) -> Tensor:
        """The critic's input: obs, with t / T_max appended when it uses the time feature."""
        if float(self.time_scale) <= 0:
            return obs
        time = step.to(obs.device, torch.float32)[:, None] / self.time_scale
        return torch.cat([obs.float(), time], dim=1)

    def _normalised(self, obs: Tensor, action: Tensor | None = None) -> Tensor:
        """Network output in units of `value_scale`: [M, A] (discrete) or [M] (continuous)."""
        x = (obs.float() - self.obs_mean) / self.obs_std
        if self.n_actions is not None:
            return self.net(x)
        assert action is not None
        return self.net(torch.cat([x, action.float().reshape(x.shape[0], -1)], dim=-1))[:, 0]

    def q_all(self, obs: Tensor) -> Tensor:
        """Q̂(s, a) for every discrete action, [M, A]."""
        if self.n_actions is None:
            raise ValueError("q_all needs a discrete-action critic")
        return self._normalised(obs) * self.value_scale

    def q_value(self, obs: Tensor, action: Tensor) -> Tensor:
        """Q̂(s_t, a_t), [M]."""
        if self.n_actions is not None:
            return self.q_all(obs).gather(1, action.long()[:, None])[:, 0]
        return self._normalised(obs, action) * self.value_scale


def _action_probs(policy: TargetPolicy, obs: Tensor, n_actions: int) -> Tensor:
    """π(a|s) for every discrete action, [M, A] (one `log_prob` call over M·A rows)."""
    rows = obs.repeat_interleave(n_actions, dim=0)
    actions = torch.arange(n_actions, device=obs.device).repeat(obs.shape[0])
    return policy.log_prob(rows, actions).exp().reshape(obs.shape[0], n_actions)


class _PolicyValue:
    """V̂(s) = E_{a∼π(·|s)} Q̂(s, a) at fixed states: exact sum (discrete) or fixed samples."""

    def __init__(self, policy: TargetPolicy, obs: Tensor, features: Tensor, critic: QCritic,
                 samples: int, generator: torch.Generator) -> None:
        self.obs = features  # what the critic sees; the policy sees `obs`
        with torch.no_grad():
            if critic.n_actions is not None:
                self.probs: Tensor | None = _action_probs(policy, obs, critic.n_actions)
                self.actions: list[Tensor] = []
            else:
                self.probs = None
                self.actions = [policy.sample(obs, generator=generator) for _ in range(samples)]

    def __call__(self, critic: QCritic, rows: Tensor | None = None) -> Tensor:
        """V̂ at all states, or at `rows` of them."""
        obs = self.obs if rows is None else self.obs[rows]
        if self.probs is not None:
            probs = self.probs if rows is None else self.probs[rows]
            return (probs * critic.q_all(obs)).sum(1)
        actions = self.actions if rows is None else [a[rows] for a in self.actions]
        return torch.stack([critic.q_value(obs, a) for a in actions]).mean(0)


def _discrete_actions(action: Tensor) -> bool:
    return action.ndim == 1 and not torch.is_floating_point(action)


def fit_fqe(
    policy: TargetPolicy,
    batch: StepBatch,
    *,
    gamma: float,
    config: FQEConfig | None = None,
    n_actions: int | None = None,
    seed: int = 0,
) -> QCritic:
    r"""Fit Q̂ ≈ Q^π on the log by fitted-Q evaluation (Le, Voloshin & Yue 2019).

    For k = 1..K: freeze Q̂_k, form targets y = r + γ (1 − d) V̂_k(s'), with
    V̂_k(s') = Σ_a π(a|s') Q̂_k(s', a) (discrete) or the mean of Q̂_k(s', a'_j) over fixed
    samples a'_j ∼ π(·|s') (continuous), and take `steps_per_iteration` Adam steps on the mean
    squared error (Q̂(s, a) − y)², warm-started from Q̂_k. The done flag d is `terminated`, or
    also `truncated` when truncated steps are not bootstrapped. Bootstrapping them (the default
    when γ < 1) estimates the discounted value beyond a log cut or time limit; with γ = 1 that
    value is unbounded on a time-limited env, so by default γ = 1 treats truncation as the end
    and gives the critic t/T_max as an extra input (Q then depends on the time left).
    Bootstrapped values are clipped to [min(0, r_min), max(0, r_max)] × (discounted steps
    left), which contains V^π: a guard against the divergence of FQE as γ → 1. Expect FQE to
    be poor at γ = 1 over long horizons (CartPole: 41% of the online return after K = 500).

    Args:
        policy: the evaluated policy π (any object with `log_prob` and `sample`).
        batch: the log to fit on (`obs`, `action`, `reward`, `next_obs`, `terminated`, ...).
        gamma: discount in [0, 1].
        config: fitting options (FQEConfig()).
        n_actions: number of discrete actions (default: `policy.n_actions`, else max action + 1).
        seed: seeds the critic's initialisation, minibatches and action samples.

    Returns:
        The fitted critic (its `history` attribute lists the mean loss of each iteration).
    """
    check_gamma(gamma)
    config = config or FQEConfig()
    obs, action, next_obs = batch.obs, batch.action, batch.next_obs
    reward = batch.reward.float()
    discrete = _discrete_actions(action)
    if discrete:
        n_actions = n_actions or getattr(policy, "n_actions", None) or int(action.max()) + 1
    done = batch.terminated.clone()
    if not _bootstraps(config, gamma):
        done |= batch.truncated
    horizon = float(_layout(batch.step, batch.episode_start).horizon)
    effective = horizon if gamma == 1.0 else min(horizon, 1.0 / (1.0 - gamma))
    time_feature = (not _bootstraps(config, gamma) if config.time_feature is None
                    else config.time_feature)
    step = batch.step
    if time_feature:
        obs = torch.cat([obs.float(), step.float()[:, None] / horizon], dim=1)
    scale = float(reward.square().mean().sqrt()) * effective  # RMS reward × horizon
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        critic = QCritic(
            obs.shape[1], n_actions=n_actions if discrete else None,
            action_dim=None if discrete else action.reshape(action.shape[0], -1).shape[1],
            hidden=config.hidden, obs_mean=obs.float().mean(0), obs_std=obs.float().std(0),
            value_scale=scale if scale > 0 else 1.0, time_scale=horizon if time_feature else 0.0,
        ).to(obs.device)
    next_value = _PolicyValue(policy, next_obs, critic.features(next_obs, step + 1), critic,
                              config.action_samples, generator)
    # V(s_{t+1}) lies in [min(0, r_min), max(0, r_max)] × (discounted steps left): clipping the
    # bootstrapped values to that box keeps the true fixed point and stops divergence (γ ≈ 1).
    if _bootstraps(config, gamma):
        steps_left = torch.full_like(reward, math.inf)
    else:
        steps_left = (horizon - 1 - step).clamp_min(0).float()
    remaining = steps_left if gamma == 1.0 else (1 - gamma ** steps_left) / (1 - gamma)
    low = min(0.0, float(reward.min())) * remaining
    high = max(0.0, float(reward.max())) * remaining
    optimizer = torch.optim.Adam(critic.parameters(), lr=config.lr)
    m = obs.shape[0]
    continuing = (~done).float()
    history: list[float] = []
    for _ in range(config.iterations):
        frozen = copy.deepcopy(critic).requires_grad_(False)  # Q̂_k, the regression target
        total = 0.0
        for _ in range(config.steps_per_iteration):
            if m <= config.batch_size:
                rows = torch.arange(m, device=obs.device)
            else:
                rows = torch.randint(m, (config.batch_size,), generator=generator).to(obs.device)
            with torch.no_grad():
                bootstrap = torch.clamp(next_value(frozen, rows), low[rows], high[rows])
                target = reward[rows] + gamma * continuing[rows] * bootstrap
            prediction = critic.q_value(obs[rows], action[rows])
            loss = ((prediction - target) / critic.value_scale).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        history.append(total / config.steps_per_iteration)
    critic.history = history
    return critic.eval()


def critic_values(
    critic: QCritic,
    policy: TargetPolicy,
    batch: StepBatch,
    *,
    action_samples: int = 16,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Q̂(s_t, a_t), V̂(s_t) and V̂(s_{t+1}) on `batch`, each [M] float64 (V̂ under π)."""
    generator = torch.Generator().manual_seed(seed)
    features = critic.features(batch.obs, batch.step)
    next_features = critic.features(batch.next_obs, batch.step + 1)
    with torch.no_grad():
        q_value = critic.q_value(features, batch.action)
        state_value = _PolicyValue(policy, batch.obs, features, critic, action_samples,
                                   generator)(critic)
        next_value = _PolicyValue(policy, batch.next_obs, next_features, critic, action_samples,
                                  generator)(critic)
    return q_value.double(), state_value.double(), next_value.double()


# --------------------------------------------------------------------------------------------
# The evaluation job
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Estimate:
    """One OPE estimate of J(π) with its percentile-bootstrap interval.

    Attributes:
        name: estimator, one of `ESTIMATE_NAMES`.
        value: point estimate.
        ci_low, ci_high: bootstrap percentile interval over episodes.
        ess: effective sample size of the weights the estimate uses (trajectory weights for
            is/wis, worst-step cumulative weights for pdis/wpdis/dr/wdr, N for fqe).
        lower_bound: 1 − δ HCOPE lower bound on J(π) (is, pdis), else None.
        n_episodes: N, episodes evaluated.
    """

    name: str
    value: float
    ci_low: float
    ci_high: float
    ess: float
    lower_bound: float | None = None
    n_episodes: int = 0

    def metrics(self) -> dict[str, float]:
        """`ope/<name>`, `ope/<name>_ci_low`, `ope/<name>_ci_high`, `ope/<name>_ess` (+ `_lb`)."""
        out = {f"ope/{self.name}": self.value, f"ope/{self.name}_ci_low": self.ci_low,
               f"ope/{self.name}_ci_high": self.ci_high, f"ope/{self.name}_ess": self.ess}
        if self.lower_bound is not None:
            out[f"ope/{self.name}_lb"] = self.lower_bound
        return out


def selection_score(estimates: Sequence[Estimate], by: str) -> float:
    """The number to maximise when choosing a checkpoint by OPE (`train --select-by BY`).

    Args:
        estimates: from `evaluate_offline`.
        by: `<name>` (point estimate), `<name>_ci_low` (lower end of the bootstrap interval) or
            `<name>_lb` (HCOPE lower bound: is, pdis), e.g. "wdr" or "wdr_ci_low".

    Returns:
        The chosen number.
    """
    for estimate in estimates:
        if by == estimate.name:
            return estimate.value
        if by == f"{estimate.name}_ci_low":
            return estimate.ci_low
        if by == f"{estimate.name}_lb" and estimate.lower_bound is not None:
            return estimate.lower_bound
    choices = [c for e in estimates for c in (e.name, f"{e.name}_ci_low")
               + ((f"{e.name}_lb",) if e.lower_bound is not None else ())]
    raise ValueError(f"cannot select by {by!r}; choose from {', '.join(choices)}")


def evaluate_offline(
    policy: TargetPolicy,
    batch: StepBatch,
    behavior_logp: Tensor,
    *,
    gamma: float,
    estimators: Sequence[str] = ESTIMATE_NAMES,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    delta: float = 0.05,
    fqe: FQEConfig | None = None,
    critic_batch: StepBatch | None = None,
    return_range: tuple[float, float] | None = None,
) -> list[Estimate]:
    r"""Estimate J(π) on `batch` with each named estimator, its bootstrap interval and ESS.

    The FQE critic (for dr, wdr, fqe) is fitted on `critic_batch` (default: `batch` itself) and
    then held fixed while episodes are resampled. When the critic bootstraps truncated steps
    (`fqe.bootstrap_truncated`, by default when γ < 1), DR and WDR also bootstrap the tail of
    truncated episodes with γ^{T} w_{0:T−1} V̂(s_T), consistent with the critic; the IS family
    always estimates the value of the logged horizon (with γ < 1 and long episodes the two differ
    by about γ^T·V, which is negligible: 0.99^500 ≈ 0.007).

    HCOPE lower bounds (δ = `delta`): for `is`, from X_e = W_e (G_e − g_min)/(g_max − g_min); it
    assumes that every return under π is ≥ g_min (g_max only sets the scale). For `pdis`, from
    the PDIS terms themselves, computed only when all logged rewards are ≥ 0 and assuming π's
    rewards are too. `return_range` = (g_min, g_max) of the discounted return; default: the
    smallest and largest discounted return in `batch` (an assumption, not a guarantee).

    Args:
        policy: π, with `log_prob(obs, action)` (and `sample` for continuous FQE).
        batch: held-out episodes (`offpg_offline.data.batch.StepBatch`).
        behavior_logp: log β(a_t|s_t) for each row of `batch`, [M].
        gamma: discount in [0, 1].
        estimators: names from `ESTIMATE_NAMES`.
        n_boot: bootstrap resamples.
        seed: seeds the bootstrap, the HCOPE split and the critic.
        level: bootstrap interval coverage.
        delta: HCOPE bounds hold with probability ≥ 1 − delta.
        fqe: critic options.
        critic_batch: episodes to fit the critic on (e.g. the training split).
        return_range: known (g_min, g_max) of the discounted return.

    Returns:
        One `Estimate` per requested name, in the order requested.
    """
    unknown = sorted(set(estimators) - set(ESTIMATE_NAMES))
    if unknown:
        raise ValueError(f"unknown estimator(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(ESTIMATE_NAMES)}")
    check_gamma(gamma)
    with torch.no_grad():
        target_logp = policy.log_prob(batch.obs, batch.action).double().cpu()
    behavior_logp = behavior_logp.double().cpu()  # the estimates themselves are cheap: CPU
    if not bool(torch.isfinite(behavior_logp).all()):
        raise ValueError("behavior_logp has non-finite entries (a logged action with β = 0?)")
    start = batch.episode_start.cpu()
    reward, step = batch.reward.double().cpu(), batch.step.cpu()
    n_episodes = int(start.sum())
    args = (target_logp, behavior_logp, reward, step, start)

    statistics: dict[str, Callable[[Tensor], Tensor]] = {}
    if "is" in estimators:
        is_terms = importance_sampling(*args, gamma=gamma)
        statistics["is"] = lambda c: episode_mean(is_terms, c)
    if "wis" in estimators:
        statistics["wis"] = lambda c: weighted_importance_sampling(*args, gamma=gamma, counts=c)
    if "pdis" in estimators:
        pdis_terms = per_decision_importance_sampling(*args, gamma=gamma)
        statistics["pdis"] = lambda c: episode_mean(pdis_terms, c)
    if "wpdis" in estimators:
        statistics["wpdis"] = lambda c: weighted_per_decision_importance_sampling(
            *args, gamma=gamma, counts=c)
    if _CRITIC_NAMES & set(estimators):
        config = fqe or FQEConfig()
        critic = fit_fqe(policy, critic_batch if critic_batch is not None else batch,
                         gamma=gamma, config=config, seed=seed)
        q_value, state_value, next_value = (v.cpu() for v in critic_values(
            critic, policy, batch, action_samples=config.action_samples, seed=seed))
        cut = (batch.truncated & ~batch.terminated).cpu()
        end_value = torch.where(cut, next_value, 0.0) if _bootstraps(config, gamma) else None
        critic_args = (*args, q_value, state_value)
        if "dr" in estimators:
            dr_terms = doubly_robust(*critic_args, gamma=gamma, end_value=end_value)
            statistics["dr"] = lambda c: episode_mean(dr_terms, c)
        if "wdr" in estimators:
            statistics["wdr"] = lambda c: weighted_doubly_robust(
                *critic_args, gamma=gamma, end_value=end_value, counts=c)
        if "fqe" in estimators:
            fqe_terms = direct_method(state_value, start)
            statistics["fqe"] = lambda c: episode_mean(fqe_terms, c)

    intervals = bootstrap_intervals(statistics, n_episodes, n_boot=n_boot, level=level, seed=seed)
    ones = torch.ones(1, n_episodes, dtype=F64)
    layout = _layout(step, start)
    log_weight, _ = _log_weights(target_logp, behavior_logp, start)
    trajectory_ess = effective_sample_size(log_weight[layout.last].exp())
    decision_ess = per_decision_ess(target_logp, behavior_logp, step, start)
    ess = {"is": trajectory_ess, "wis": trajectory_ess, "pdis": decision_ess,
           "wpdis": decision_ess, "dr": decision_ess, "wdr": decision_ess,
           "fqe": float(n_episodes)}
    bounds = _lower_bounds(args, gamma, delta, seed, return_range, set(estimators))
    return [Estimate(name, float(statistics[name](ones)[0]), *intervals[name], ess[name],
                     bounds.get(name), n_episodes) for name in estimators]


def _lower_bounds(args: tuple[Tensor, ...], gamma: float, delta: float, seed: int,
                  return_range: tuple[float, float] | None, names: set[str]
                  ) -> dict[str, float]:
    """HCOPE bounds on J(π) for `is` and (non-negative rewards) `pdis`, in return units."""
    target_logp, behavior_logp, reward, step, start = args
    returns = episode_sum(_discount(step, gamma) * reward, start)
    low, high = return_range or (float(returns.min()), float(returns.max()))
    width = high - low if high > low else 1.0
    out = {}
    if "is" in names:
        layout = _layout(step, start)
        log_weight, _ = _log_weights(target_logp, behavior_logp, start)
        terms = log_weight[layout.last].exp() * (returns - low).clamp_min(0.0) / width
        out["is"] = low + width * hcope_lower_bound(terms, delta=delta, seed=seed)
    if "pdis" in names and bool((reward >= 0).all()):
        scale = high if high > 0 else 1.0
        terms = per_decision_importance_sampling(*args, gamma=gamma) / scale
        out["pdis"] = scale * hcope_lower_bound(terms, delta=delta, seed=seed)
    return out
