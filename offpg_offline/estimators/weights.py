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


def log_ratio(
    target_logp: Tensor, behavior_logp: Tensor, *, upper: float = LOG_RATIO_BOUND
) -> Tensor:
    r"""Per-step log importance ratio log ρ_t = log π_θ(a_t|s_t) − log π_β(a_t|s_t), float64.

    `behavior_logp` (the logging policy π_β) is detached: no gradient ever reaches it.
    The result is clamped to [−`LOG_RATIO_BOUND`, `upper`] so that ±inf log-probabilities stay
    finite; `upper` = `MAX_LOG_WEIGHT` gives min(log ρ_t, 80), the capped log-ratio, in one
    clamp (the same values and gradient as clamping twice).

    Args:
        target_logp: log π_θ(a_t|s_t) of the policy being trained, [M], differentiable.
        behavior_logp: log π_β(a_t|s_t) of the logging policy, [M].
        upper: the upper clamp, at most `LOG_RATIO_BOUND`.

    Returns:
        [M] float64 tensor.
    """
    check_flat(target_logp=target_logp, behavior_logp=behavior_logp)
    diff = target_logp.double() - behavior_logp.detach().double()
    return diff.clamp(-LOG_RATIO_BOUND, min(upper, LOG_RATIO_BOUND))


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


def kish_ess(log_weights: Tensor) -> float:
    r"""Kish's effective sample size (Σ w)² / Σ w² from log-weights [N], in log space:
    exp(2·logsumexp(log w) − logsumexp(2 log w)); 0.0 when every weight is 0 (all −inf).

    The one definition: `diagnostics.ess_fraction` divides it by N, `ope` uses it for IS/WIS
    and, per time step, `padded_log_sums` of w and w² give the per-decision ESS.
    """
    lw = log_weights.detach().double()
    top = torch.logsumexp(lw, 0)
    if not bool(torch.isfinite(top)):
        return 0.0
    return float((2 * top - torch.logsumexp(2 * lw, 0)).exp())


def scaled_column_sums(
    log_w: Tensor,
    values: Tensor | None,
    column: Tensor,
    index: Tensor,
    size: int,
    counts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""(S, a): S[b, k] = Σ_{rows in column k} c_{b, e(row)} · e^{log w − a_k} · v, and a_k.

    a_k = max of `log_w` over column k (0 where the column is empty or all −inf), detached, so
    every scaled weight is ≤ 1: S·e^{a_k} is the weighted column sum without ever forming e^{log
    w} (no overflow for log w ≫ 709, no all-zero underflow for log w ≪ −745). `column` [M]
    (values ≥ `size` are dropped), `index` [M] the row's episode ordinal, `values` [M] or None
    (1). Without `counts` (one all-ones row) it is an index_add, differentiable in `log_w`;
    with `counts` [B, E] (episode multiplicities of bootstrap resamples) a sparse [size, E]
    matrix times counts^T: O(M·B), no [B, M] gather, not differentiable.

    Returns:
        S [B, size] (B = 1 without counts) float64, and a [size].
    """
    keep = column < size
    col = torch.where(keep, column, 0)
    masked = torch.where(keep, log_w.double(), -math.inf)
    shift = torch.full((size,), -math.inf, dtype=torch.float64, device=log_w.device)
    shift = shift.scatter_reduce(0, col, masked.detach(), reduce="amax")
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    scaled = torch.exp(masked - shift[col])
    if values is not None:
        scaled = scaled * values.double()
    if counts is None:
        sums = torch.zeros(size, dtype=torch.float64, device=log_w.device)
        return sums.index_add(0, col, scaled)[None], shift
    indices = torch.stack([torch.where(keep, column, size), index])
    sparse = torch.sparse_coo_tensor(indices, scaled.detach(), (size + 1, counts.shape[1]),
                                     check_invariants=False)
    sums = torch.sparse.mm(sparse.coalesce(), counts.to(torch.float64).T).T
    return sums[:, :size], shift


def padded_log_sums(log_w: Tensor, episode_start: Tensor, counts: Tensor | None = None
                    ) -> Tensor:
    r"""log Σ_e c_e w̃_{e,t} for t < T_max, [B, T_max] (B = 1 without `counts`).

    w̃_{e,t} = w_{e, min(t, T_e − 1)}: an episode that ended before t carries its final weight
    (an absorbing state with ρ = 1), so the sum runs over all episodes: the normaliser of the
    weighted per-decision estimators (WPDIS, WDR, the `per-decision` surrogate's
    self-normalisation; Precup et al. 2000, Thomas 2015 §3.1). The one definition, in log space:
    alive weights by position, plus a logcumsumexp of the final weights from column T_e on.
    """
    position = episode_position(episode_start)
    index = torch.cumsum(episode_start.to(torch.int64), dim=0) - 1
    length = int(position.max()) + 1
    alive, a = scaled_column_sums(log_w, None, position, index, length, counts)
    last = episode_last(episode_start)
    ended_column = torch.where(last, position + 1, length)  # rows not last: dropped
    ended, e = scaled_column_sums(log_w, None, ended_column, index, length, counts)
    log_ended = torch.logcumsumexp(torch.log(ended) + e, dim=1)
    return torch.logaddexp(torch.log(alive) + a, log_ended)


def position_log_normaliser(log_w: Tensor, episode_start: Tensor) -> Tensor:
    r"""log n_t per row, n_t = (1/N) Σ_i w_{i, min(t, T_i − 1)} (WPDIS; Precup et al. 2000).

    t is the row's position within its episode; see `padded_log_sums` (differentiable).
    """
    total = padded_log_sums(log_w, episode_start)[0] - math.log(int(episode_start.sum()))
    return total[episode_position(episode_start)]


def cap_log_weight(log_w: Tensor) -> Tensor:
    """min(log w, `MAX_LOG_WEIGHT`): the one cap, applied after every option."""
    return log_w.clamp_max(MAX_LOG_WEIGHT)


def capped_weight(log_w: Tensor) -> Tensor:
    """exp(min(log w, `MAX_LOG_WEIGHT`)): a weight that multiplies a return or a reward."""
    return cap_log_weight(log_w).exp()
