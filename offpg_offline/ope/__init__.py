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
Weights are float64 segmented sums of log-ratios from the trainer's pipeline
(`estimators.weights`), never exponentiated raw: normalisers are formed in log space and a weight
that multiplies a value is capped at e^`MAX_LOG_WEIGHT` (= e^80, the trainer's one cap).
Steps are flat [M] tensors, episodes contiguous and in `step` order, `episode_start` True on
each first row (as in `offpg_offline.estimators`); nothing loops over episodes or steps in Python.

Modules: `ope.estimates` (the estimators as pure tensor functions, ESS), `ope.intervals`
(bootstrap, HCOPE bound), `ope.fqe` (the critic); this one holds the job, `evaluate_offline`.

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
steps). For `dr`, `wdr` and `fqe` the default interval (`critic_interval="refit"`) refits the
critic on each of `n_refit` resamples, all at once as a batched ensemble, so it contains the
critic's own fitting variance (`intervals.refit_critic_draws`); `critic_interval="fixed"` is
the fast interval that fits the critic once and holds it fixed while only the final average is
resampled: it leaves that variance out and can be far too narrow (a deterministic start state
gives FQE a zero-width fixed interval). The IS
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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from offpg_offline.estimators.segments import check_gamma, episode_sum
from offpg_offline.estimators.weights import capped_weight, kish_ess
from offpg_offline.ope.estimates import (
    F64,
    OPE_ESTIMATORS,
    OpeInputs,
    OpeSpec,
    _discount,
    _layout,
    _log_weights,
    direct_method,
    doubly_robust,
    effective_sample_size,
    episode_mean,
    importance_sampling,
    per_decision_ess,
    per_decision_importance_sampling,
    trajectory_weights,
    weighted_doubly_robust,
    weighted_importance_sampling,
    weighted_per_decision_importance_sampling,
)
from offpg_offline.ope.fqe import (
    FQEConfig,
    QCritic,
    TargetPolicy,
    critic_values,
    fit_fqe,
)
from offpg_offline.ope.intervals import (
    bootstrap_counts,
    bootstrap_intervals,
    empirical_bernstein_lower_bound,
    hcope_lower_bound,
    percentile_interval,
    refit_critic_draws,
)

if TYPE_CHECKING:
    from offpg_offline.data.batch import StepBatch

ESTIMATE_NAMES: tuple[str, ...] = tuple(OPE_ESTIMATORS)  # == config.SELECT_ESTIMATORS (tested)
_CRITIC_NAMES = frozenset(name for name, spec in OPE_ESTIMATORS.items() if spec.needs_critic)
CRITIC_INTERVALS: tuple[str, ...] = ("refit", "fixed")


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
    critic_interval: str = "refit",
    n_refit: int | None = None,
) -> list[Estimate]:
    r"""Estimate J(π) on `batch` with each named estimator, its bootstrap interval and ESS.

    The FQE critic (for dr, wdr, fqe) is fitted on `critic_batch` (default: `batch` itself).
    Their intervals: `critic_interval="refit"` refits it on each of `n_refit` bootstrap
    resamples (one batched ensemble; the interval includes the critic's fitting variance),
    `"fixed"` holds the one critic fixed while episodes are resampled (fast, too narrow when
    the critic's error matters). When the critic bootstraps truncated steps
    (`fqe.bootstrap_truncated`, by default when γ < 1 and some episode has two steps or
    more), DR and WDR also bootstrap the tail of
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
        critic_interval: "refit" or "fixed" (see above).
        n_refit: critics refitted for the refit interval; default min(n_boot, 50), each
            warm-started from the full-data critic (`intervals.refit_backups`).

    Returns:
        One `Estimate` per requested name, in the order requested.
    """
    unknown = sorted(set(estimators) - set(ESTIMATE_NAMES))
    if unknown:
        raise ValueError(f"unknown estimator(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(ESTIMATE_NAMES)}")
    check_gamma(gamma)
    if critic_interval not in CRITIC_INTERVALS:
        raise ValueError(f"critic_interval must be one of {', '.join(CRITIC_INTERVALS)}, "
                         f"got {critic_interval!r}")
    with torch.no_grad():
        target_logp = policy.log_prob(batch.obs, batch.action).double().cpu()
    behavior_logp = behavior_logp.double().cpu()  # the estimates themselves are cheap: CPU
    if not bool(torch.isfinite(behavior_logp).all()):
        raise ValueError("behavior_logp has non-finite entries (a logged action with β = 0?)")
    start = batch.episode_start.cpu()
    reward, step = batch.reward.double().cpu(), batch.step.cpu()
    n_episodes = int(start.sum())
    args = (target_logp, behavior_logp, reward, step, start)

    inputs = OpeInputs(*args, gamma=gamma)
    if _CRITIC_NAMES & set(estimators):
        config = fqe or FQEConfig()
        critic = fit_fqe(policy, critic_batch if critic_batch is not None else batch,
                         gamma=gamma, config=config, seed=seed)
        q_value, state_value, next_value = (v.cpu() for v in critic_values(
            critic, policy, batch, action_samples=config.action_samples, seed=seed))
        cut = (batch.truncated & ~batch.terminated).cpu()
        end_value = torch.where(cut, next_value, 0.0) if critic.bootstraps_truncated else None
        inputs = OpeInputs(*args, gamma=gamma, q_value=q_value, state_value=state_value,
                           end_value=end_value)
    statistics = {name: OPE_ESTIMATORS[name].statistic(inputs) for name in estimators}

    intervals = bootstrap_intervals(statistics, n_episodes, n_boot=n_boot, level=level, seed=seed)
    refit = _CRITIC_NAMES & set(estimators) if critic_interval == "refit" else set()
    ones = torch.ones(1, n_episodes, dtype=F64)
    if refit:
        draws = refit_critic_draws(
            policy, batch, args, gamma=gamma, names=refit, config=config, seed=seed,
            n_refit=n_refit or default_n_refit(n_boot), critic_batch=critic_batch,
            warm_start=critic, centre={name: float(statistics[name](ones)[0]) for name in refit})
        intervals.update({name: percentile_interval(d, level) for name, d in draws.items()})
    layout = _layout(step, start)
    log_weight, _ = _log_weights(target_logp, behavior_logp, start)
    trajectory_ess = kish_ess(log_weight[layout.last])
    decision_ess = per_decision_ess(target_logp, behavior_logp, step, start)
    ess_by = {"trajectory": trajectory_ess, "decision": decision_ess,
              "episodes": float(n_episodes)}
    ess = {name: ess_by[OPE_ESTIMATORS[name].ess] for name in estimators}
    bounds = _lower_bounds(args, gamma, delta, seed, return_range, set(estimators))
    return [Estimate(name, float(statistics[name](ones)[0]), *intervals[name], ess[name],
                     bounds.get(name), n_episodes) for name in estimators]


def default_n_refit(n_boot: int) -> int:
    """Critics refitted by the refit interval when `n_refit` is not given: min(n_boot, 50)."""
    return min(n_boot, 50)


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
        terms = capped_weight(log_weight[layout.last]) * (returns - low).clamp_min(0.0) / width
        out["is"] = low + width * hcope_lower_bound(terms, delta=delta, seed=seed)
    if "pdis" in names and bool((reward >= 0).all()):
        scale = high if high > 0 else 1.0
        terms = per_decision_importance_sampling(*args, gamma=gamma) / scale
        out["pdis"] = scale * hcope_lower_bound(terms, delta=delta, seed=seed)
    return out


__all__ = [
    "CRITIC_INTERVALS",
    "ESTIMATE_NAMES",
    "OPE_ESTIMATORS",
    "Estimate",
    "FQEConfig",
    "OpeInputs",
    "OpeSpec",
    "QCritic",
    "TargetPolicy",
    "bootstrap_counts",
    "bootstrap_intervals",
    "critic_values",
    "default_n_refit",
    "direct_method",
    "doubly_robust",
    "effective_sample_size",
    "empirical_bernstein_lower_bound",
    "episode_mean",
    "evaluate_offline",
    "fit_fqe",
    "hcope_lower_bound",
    "importance_sampling",
    "per_decision_ess",
    "per_decision_importance_sampling",
    "selection_score",
    "trajectory_weights",
    "weighted_doubly_robust",
    "weighted_importance_sampling",
    "weighted_per_decision_importance_sampling",
]
