"""Importance-weighted policy-gradient estimators over flat step tensors.

Every function here is pure: tensors in, tensors (or floats) out; no nn.Module, optimizer, file
or logger, and only torch and the standard library are imported. Steps of all episodes are laid
end to end (M rows, episodes contiguous and in `step` order); `episode_start` is True on each
episode's first row. Modules: `segments` (segmented sums and returns), `surrogates` (the four
estimators of docs/design.md §4 and their provenance), `registry` (name → spec: function, unit,
options honoured; `SurrogateOptions`), `psis` (Pareto smoothing), `diagnostics`
(ESS, quantiles, k̂, KL).
"""

from __future__ import annotations

from offpg_offline.estimators.critic import critic_surrogate, greedy_critic_surrogate
from offpg_offline.estimators.diagnostics import (
    QUANTILES,
    diagnostic_log_weights,
    ess_fraction,
    fraction_clipped,
    kl_penalty,
    kl_to_behavior,
    max_weight,
    weight_diagnostics,
    weight_quantiles,
)
from offpg_offline.estimators.psis import pareto_smooth, psis_khat
from offpg_offline.estimators.registry import (
    DEFAULT_OPTIONS,
    ESTIMATORS,
    EstimatorSpec,
    SurrogateOptions,
)
from offpg_offline.estimators.segments import (
    discounted_returns,
    episode_index,
    episode_position,
    episode_sum,
    segmented_cumsum,
)
from offpg_offline.estimators.surrogates import (
    Surrogate,
    past_weight_surrogate,
    per_decision_surrogate,
    per_step_surrogate,
    trajectory_surrogate,
)
from offpg_offline.estimators.weights import (
    LOG_RATIO_BOUND,
    MAX_LOG_RATIO,
    MAX_LOG_WEIGHT,
    cumulative_log_weight,
    log_ratio,
)

__all__ = [
    "DEFAULT_OPTIONS",
    "ESTIMATORS",
    "LOG_RATIO_BOUND",
    "MAX_LOG_RATIO",
    "MAX_LOG_WEIGHT",
    "QUANTILES",
    "EstimatorSpec",
    "Surrogate",
    "SurrogateOptions",
    "critic_surrogate",
    "cumulative_log_weight",
    "diagnostic_log_weights",
    "discounted_returns",
    "episode_index",
    "episode_position",
    "episode_sum",
    "ess_fraction",
    "fraction_clipped",
    "greedy_critic_surrogate",
    "kl_penalty",
    "kl_to_behavior",
    "log_ratio",
    "max_weight",
    "pareto_smooth",
    "past_weight_surrogate",
    "per_decision_surrogate",
    "per_step_surrogate",
    "psis_khat",
    "segmented_cumsum",
    "trajectory_surrogate",
    "weight_diagnostics",
    "weight_quantiles",
]
