r"""Importance-weight diagnostics and the KL(π_θ‖π_β) penalty.

These tell a user whether the weights have "blown up" (the seed's central difficulty): the
effective sample size, extreme quantiles, the fraction of weights at the cap, PSIS k̂ and the
divergence of π_θ from π_β on the logged states. All take log-weights, never weights, so they
stay finite when w overflows.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from offpg_offline.estimators.psis import psis_khat
from offpg_offline.estimators.segments import check_episode_start, check_flat, episode_sum
from offpg_offline.estimators.weights import (
    MAX_LOG_WEIGHT,
    ClipModeName,
    check_clip,
    cumulative_from_log_ratio,
    kish_ess,
    log_ratio,
)

WeightLevel = Literal["episode", "cumulative", "step"]
QUANTILES = (0.5, 0.9, 0.99)


def _check_log_weights(log_weights: Tensor) -> None:
    if log_weights.ndim != 1 or log_weights.shape[0] == 0:
        shape = list(log_weights.shape)
        raise ValueError(f"log_weights must be a non-empty 1-D tensor, got shape {shape}")


def ess_fraction(log_weights: Tensor) -> float:
    r"""Effective sample size as a fraction of N: (Σ w)² / (N Σ w²), in (0, 1] (Kong 1992).

    `weights.kish_ess` (the one ESS, in log space) divided by N. Equals 1 when all weights are
    equal and 1/N when one weight dominates.

    Args:
        log_weights: [N] log importance weights.
    """
    _check_log_weights(log_weights)
    return kish_ess(log_weights) / log_weights.shape[0]


def weight_quantiles(log_weights: Tensor, quantiles: tuple[float, ...] = QUANTILES) -> list[float]:
    """Quantiles of the weights exp(`log_weights`) [N] (linear interpolation in log space)."""
    _check_log_weights(log_weights)
    # Sort-based (torch.quantile refuses more than 2^24 elements).
    ordered = torch.sort(log_weights.detach().double()).values
    position = torch.tensor(quantiles, dtype=torch.float64, device=ordered.device)
    position = position * (ordered.shape[0] - 1)
    low = position.floor().long()
    high = position.ceil().long()
    values = ordered[low] + (position - low) * (ordered[high] - ordered[low])
    return [float(v) for v in values.exp()]


def max_weight(log_weights: Tensor) -> float:
    """Largest weight, exp(max log w) (inf when it overflows float64)."""
    _check_log_weights(log_weights)
    return float(log_weights.detach().double().max().exp())


def fraction_clipped(log_weights: Tensor, clip: float | None) -> float:
    """Fraction of weights strictly above the cap c (0.0 when `clip` is None)."""
    _check_log_weights(log_weights)
    if clip is None:
        return 0.0
    return float((log_weights.detach().double() > math.log(clip)).double().mean())


def kl_penalty(target_logp: Tensor, behavior_logp: Tensor) -> Tensor:
    r"""Differentiable estimate of KL(π_θ‖π_β) on the logged states, from β's actions.

        KL̂ = (1/M) Σ_t [ρ_t log ρ_t − ρ_t + 1],   ρ_t = π_θ(a_t|s_t)/π_β(a_t|s_t)

    Unbiased for E_s KL(π_θ(·|s)‖π_β(·|s)) over the logged states: E_β[ρ log ρ] = E_θ[log ρ]
    and E_β[ρ] = 1; every term is ≥ 0 (x log x − x + 1 ≥ 0), and its gradient,
    E_β[ρ log ρ ∇log π_θ], is unbiased for ∇KL. For the trainer's `kl_coef · kl_penalty`.
    log ρ is capped at `MAX_LOG_WEIGHT` to keep float32 gradients finite.

    Args:
        target_logp: log π_θ(a_t|s_t), [M], differentiable.
        behavior_logp: log π_β(a_t|s_t) of the logging policy, [M]; detached.

    Returns:
        A scalar tensor in the dtype of `target_logp`.
    """
    return _kl_of_capped(log_ratio(target_logp, behavior_logp, upper=MAX_LOG_WEIGHT)).to(
        target_logp.dtype)


def _kl_of_capped(lr: Tensor) -> Tensor:
    """(1/M) Σ_t [ρ_t log ρ_t − ρ_t + 1] from log ρ_t already capped at `MAX_LOG_WEIGHT`."""
    return (lr.exp() * lr - torch.expm1(lr)).mean()


def kl_to_behavior(target_logp: Tensor, behavior_logp: Tensor) -> float:
    """`kl_penalty` as a float, for logging."""
    with torch.no_grad():
        return float(kl_penalty(target_logp.detach(), behavior_logp))


def diagnostic_log_weights(
    target_logp: Tensor,
    behavior_logp: Tensor,
    episode_start: Tensor,
    *,
    level: WeightLevel = "episode",
) -> Tensor:
    """Raw (unclipped) log-weights at one level: per episode w_{1:T} [E], all w_{1:t}, or ρ_t."""
    if level == "cumulative":
        check_flat(target_logp=target_logp, behavior_logp=behavior_logp,
                   episode_start=episode_start)
    return _log_weights_at(log_ratio(target_logp, behavior_logp), episode_start, level)


def _log_weights_at(step_log: Tensor, episode_start: Tensor, level: WeightLevel) -> Tensor:
    """`diagnostic_log_weights` from the per-step log-ratios log ρ_t."""
    if level == "episode":
        return episode_sum(step_log, episode_start)
    if level == "cumulative":
        return cumulative_from_log_ratio(step_log, episode_start)
    if level == "step":
        return step_log
    raise ValueError(f"level must be 'episode', 'cumulative' or 'step', got {level!r}")


def weight_diagnostics(
    target_logp: Tensor,
    behavior_logp: Tensor,
    episode_start: Tensor,
    *,
    clip: float | None = None,
    clip_mode: ClipModeName = "step",
    level: WeightLevel = "episode",
) -> dict[str, float]:
    r"""Weight and divergence diagnostics for logging, as `dict[str, float]`.

    `level` picks the weights summarised: "episode" (w_{1:T}, one per episode: the weights of
    `trajectory`, and the largest of `per-decision`/`past-weight`), "cumulative" (every w_{1:t})
    or "step" (every ρ_t: the weights of `per-step`). Keys:

    - `weights/ess_fraction`: (Σw)²/(NΣw²) of the weights as the estimator uses them (capped at
      `clip` per `clip_mode`, as in the surrogates);
    - `weights/max`, `weights/q50`, `weights/q90`, `weights/q99`, `weights/psis_khat`: of the raw
      (uncapped) weights, which show whether they have blown up (k̂ > 0.7: unreliable);
      k̂ is inf with fewer than 25 weights, like arviz;
    - `weights/fraction_clipped`: fraction of the capped quantity (ρ_t for "step" mode, w_{1:t}
      for "cumulative" mode, at this level) above c;
    - `policy/kl_to_behavior`: `kl_to_behavior` on the logged states.

    Args:
        target_logp: log π_θ(a_t|s_t), [M].
        behavior_logp: log π_β(a_t|s_t) of the logging policy, [M].
        episode_start: [M] bool, True on each episode's first row.
        clip: weight cap c > 0, or None.
        clip_mode: "step" or "cumulative".
        level: "episode", "cumulative" or "step".
    """
    check_flat(target_logp=target_logp, behavior_logp=behavior_logp, episode_start=episode_start)
    check_episode_start(episode_start)
    check_clip(clip, clip_mode)
    with torch.no_grad():
        step_log = log_ratio(target_logp.detach(), behavior_logp)  # computed once, used below
        raw = _log_weights_at(step_log, episode_start, level)
        used, capped = raw, raw
        if clip is not None:
            log_c = math.log(clip)
            if clip_mode == "step":
                capped = step_log
                clipped_step = step_log.clamp_max(log_c)
                if level == "episode":
                    used = episode_sum(clipped_step, episode_start)
                elif level == "cumulative":
                    used = cumulative_from_log_ratio(step_log, episode_start, clip=clip)
                else:
                    used = clipped_step
            else:
                used = raw.clamp_max(log_c)
        q50, q90, q99 = weight_quantiles(raw)
        return {
            "weights/ess_fraction": ess_fraction(used),
            "weights/max": max_weight(raw),
            "weights/q50": q50,
            "weights/q90": q90,
            "weights/q99": q99,
            "weights/psis_khat": psis_khat(raw),
            "weights/fraction_clipped": fraction_clipped(capped, clip),
            "policy/kl_to_behavior": float(
                _kl_of_capped(step_log.clamp_max(MAX_LOG_WEIGHT)).to(target_logp.dtype)),
        }
