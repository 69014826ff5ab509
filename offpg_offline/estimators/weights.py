"""Log importance weights: ratios, segmented products, caps, normalisers and smoothing.

All in log space and float64. `behavior_logp` (π_β, the logging policy) is always detached.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from offpg_offline.estimators.options import ClipModeName
from offpg_offline.estimators.psis import pareto_smooth
from offpg_offline.estimators.segments import (
    check_flat,
    episode_last,
    episode_position,
    episode_sum,
    segmented_cumsum,
)

MAX_LOG_WEIGHT = 80.0
"""The one cap: min(log w, 80) on every weight that multiplies a return or reward, applied
LAST, after clip, PSIS and self-normalisation (w ≤ e^80 ≈ 5.5e34; float32 holds 3.4e38), in
the training surrogates and in `ope` alike. Self-normalised weights are ≤ N, so the cap never
binds on them; a raw weight at the cap means the estimate is already useless (ESS → 1/N)."""
LOG_RATIO_BOUND = 1.0e4
"""Not a cap: a finite stand-in for log ρ = ±inf (a zero or undefined probability), so that
segmented sums never meet inf − inf. e^{±1e4} is 0 / overflow in float64, like e^{±inf}, and
every finite log-ratio a policy produces passes unchanged (|log ρ| < 1e4)."""
MAX_LOG_RATIO = LOG_RATIO_BOUND  # the former name


def log_ratio(target_logp: Tensor, behavior_logp: Tensor) -> Tensor:
    r"""Per-step log importance ratio log ρ_t = log π_θ(a_t|s_t) − log π_β(a_t|s_t), float64.

    `behavior_logp` (the logging policy π_β) is detached: no gradient ever reaches it.
    The result is clamped to ±`LOG_RATIO_BOUND` so that ±inf log-probabilities stay finite.

    Args:
        target_logp: log π_θ(a_t|s_t) of the policy being trained, [M], differentiable.
        behavior_logp: log π_β(a_t|s_t) of the logging policy, [M].

    Returns:
        [M] float64 tensor.
    """
    check_flat(target_logp=target_logp, behavior_logp=behavior_logp)
    diff = target_logp.double() - behavior_logp.detach().double()
    return diff.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def clip_log_ratio(log_rho: Tensor, clip: float | None) -> Tensor:
    """min(log ρ_t, log c): the per-step clip in log space (unclipped entries keep their
    gradient, clipped ones get none); identity when `clip` is None."""
    return log_rho if clip is None else log_rho.clamp_max(math.log(clip))


def _zero_mask(log_rho: Tensor, episode_start: Tensor) -> tuple[Tensor, Tensor]:
    """(log ρ with zero-probability steps as 0, [M] bool: a zero weight at or before the row).

    A step with π(a_t|s_t) = 0 (log ρ at −`LOG_RATIO_BOUND`) enters the running sum as 0 and is
    counted exactly instead, so that a greedy target policy keeps every other log-weight exact."""
    zero = log_rho <= -LOG_RATIO_BOUND
    zeros_so_far = segmented_cumsum(zero.double(), episode_start)  # small integers: exact
    return torch.where(zero, 0.0, log_rho), zeros_so_far > 0


def cumulative_from_log_ratio(
    log_rho: Tensor,
    episode_start: Tensor,
    clip: float | None = None,
    clip_mode: ClipModeName = "step",
) -> Tensor:
    r"""log w_{1:t} = Σ_{k ≤ t} log ρ_k within each episode, with the clip, float64 [M].

    `clip_mode="step"`: Σ_k min(log ρ_k, log c); `"cumulative"`: min(Σ_k log ρ_k, log c).
    −inf from the first zero-probability step of an episode on (exactly, see `_zero_mask`).
    """
    check_clip(clip, clip_mode)
    log_rho = clip_log_ratio(log_rho, clip if clip_mode == "step" else None)
    finite, zero = _zero_mask(log_rho, episode_start)
    log_w = segmented_cumsum(finite, episode_start)
    if clip_mode == "cumulative":
        log_w = clip_log_ratio(log_w, clip)
    return torch.where(zero, -math.inf, log_w)


def episode_from_log_ratio(
    log_rho: Tensor,
    episode_start: Tensor,
    clip: float | None = None,
    clip_mode: ClipModeName = "step",
) -> Tensor:
    r"""log w_{1:T_i} per episode, [E] float64, clipped as in `cumulative_from_log_ratio`
    (summed per episode directly: no cancellation across episodes)."""
    check_clip(clip, clip_mode)
    log_rho = clip_log_ratio(log_rho, clip if clip_mode == "step" else None)
    zero = log_rho <= -LOG_RATIO_BOUND
    log_w = episode_sum(torch.where(zero, 0.0, log_rho), episode_start)
    if clip_mode == "cumulative":
        log_w = clip_log_ratio(log_w, clip)
    return torch.where(episode_sum(zero.double(), episode_start) > 0, -math.inf, log_w)


def cumulative_log_weight(
    target_logp: Tensor,
    behavior_logp: Tensor,
    episode_start: Tensor,
    *,
    clip: float | None = None,
    clip_mode: ClipModeName = "step",
) -> Tensor:
    r"""Cumulative log-weight log w_{1:t} = Σ_{k ≤ t} log ρ_k within each episode, float64 [M].

    With `clip` = c: `clip_mode="step"` caps each ρ_k at c before the product,
    log w_{1:t} = Σ_k min(log ρ_k, log c); `"cumulative"` caps the product,
    min(log w_{1:t}, log c). Both via min, so unclipped entries keep their gradient.

    Args:
        target_logp: log π_θ(a_t|s_t), [M], differentiable.
        behavior_logp: log π_β(a_t|s_t), [M]; detached.
        episode_start: [M] bool, True on each episode's first row.
        clip: weight cap c > 0, or None.
        clip_mode: "step" or "cumulative".

    Returns:
        [M] float64 tensor.
    """
    check_flat(target_logp=target_logp, behavior_logp=behavior_logp, episode_start=episode_start)
    return cumulative_from_log_ratio(log_ratio(target_logp, behavior_logp), episode_start,
                                     clip, clip_mode)


def self_normalise(log_w: Tensor) -> Tensor:
    """log(w / mean(w)) = log w − (logsumexp(log w) − log N): weights with batch mean 1, never
    exponentiated on the way (no overflow, no all-underflow 0/0); not detached."""
    return log_w - (torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0]))


def check_clip(clip: float | None, clip_mode: str) -> None:
    """Raise ValueError unless clip_mode is known and clip is None or positive."""
    if clip_mode not in ("step", "cumulative"):
        raise ValueError(f"clip_mode must be 'step' or 'cumulative', got {clip_mode!r}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be positive, got {clip}")


def smooth_log_weight(log_weight: Tensor) -> Tensor:
    """log w̃ = log w + sg(log PSIS(w) − log w): PSIS values with the raw weight's gradient."""
    smoothed, _ = pareto_smooth(log_weight.detach())
    return log_weight + (smoothed - log_weight.detach())


def scatter_logsumexp(values: Tensor, index: Tensor, size: int) -> Tensor:
    """log Σ_{i: index_i = j} exp(values_i) for j < size (−inf where empty), overflow-free."""
    shift = torch.full((size,), -math.inf, dtype=values.dtype, device=values.device)
    shift = shift.scatter_reduce(0, index, values.detach(), reduce="amax")
    safe = torch.where(torch.isfinite(shift), shift, 0.0)
    sums = torch.zeros(size, dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, index, torch.exp(values - safe[index]))
    return safe + torch.log(sums)


def position_log_normaliser(log_w: Tensor, episode_start: Tensor) -> Tensor:
    r"""log n_t per row, n_t = (1/N) Σ_i w_{i, min(t, T_i − 1)} (WPDIS; Precup et al. 2000).

    t is the row's position within its episode. Episodes that ended before position t carry
    their final weight (an absorbing state whose action probability is 1 under both policies),
    so n_t averages over all N episodes; computed with scatter and logcumsumexp.
    """
    position = episode_position(episode_start)
    length = int(position.max()) + 1
    alive = scatter_logsumexp(log_w, position, length)
    last = episode_last(episode_start)
    ended_at = scatter_logsumexp(log_w[last], position[last] + 1, length + 1)[:length]
    ended = torch.logcumsumexp(ended_at, dim=0)
    total = torch.logaddexp(alive, ended) - math.log(int(episode_start.sum()))
    return total[position]


def cap_log_weight(log_w: Tensor) -> Tensor:
    """min(log w, `MAX_LOG_WEIGHT`): the numerical guard applied after every option."""
    return log_w.clamp_max(MAX_LOG_WEIGHT)
