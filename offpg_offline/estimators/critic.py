r"""The critic-based (actor-critic) surrogate: the per-step estimator with a critic's advantage.

    ∇J(θ) ≈ E_β[Σ_t γ^t ρ_t ∇log π_θ(a_t|s_t) Â(s_t, a_t)],   Â = Q̂(s_t, a_t) − b(s_t)

Inside the seed's first-order (per-step, TRPO/PPO) approximation the Monte-Carlo return-to-go
G_t of `per_step_surrogate` is replaced by a critic's action value Q̂(s_t, a_t), passed in as a
tensor (this module only sees tensors: the critic is fitted by `offpg_offline.training.critic`).

What the expectation equals (first-order approximation, d^β_t = law of s_t under π_β):

    E[∇ −L] = Σ_t γ^t E_{s_t∼d^β_t}[Σ_a π_θ(a|s_t) ∇log π_θ(a|s_t) Q̂(s_t, a)]

* θ = β and Q̂ = Q^π (exact): the policy-gradient theorem's gradient
  Σ_s d^π_γ(s) Σ_a π(a|s) ∇log π(a|s) Q^π(s, a) (Sutton et al. 2000), d^π_γ(s) = Σ_t γ^t P(s_t=s).
* θ ≠ β, Q̂ = Q^{π_θ}: the states are still weighted by β's distribution d^β_t instead of
  d^{π_θ}_t — the same first-order bias as `per-step` (Kakade & Langford 2002; Schulman et al.
  2015), small while π_θ stays close to π_β (KL penalty, clip, PPO).
* A fitted critic adds E_{d^β}[Σ_a π ∇log π (Q̂ − Q)(s, a)]: zero only where the critic is exact
  on the actions π_θ takes. The in-sample critic of training/critic.py estimates Q^β, not
  Q^{π_θ}; at θ = β the two coincide.
* A baseline b(s_t) adds nothing without clip/PPO (E_{a∼β}[ρ ∇log π_θ] = 0) and, with them, the
  stated bias of `per_step_surrogate`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from offpg_offline.estimators.options import (
    DEFAULT_OPTIONS,
    SurrogateOptions,
    refuse_unsupported,
)
from offpg_offline.estimators.surrogates import (
    PER_STEP_OPTIONS,
    Reduction,
    per_step_surrogate,
)

CRITIC_OPTIONS = PER_STEP_OPTIONS
"""Options `critic_surrogate` honours: those of per-step (no clip_mode: one ratio per row)."""


def critic_surrogate(
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
    r"""Critic-based per-step surrogate (`critic`), to be minimised.

        L(θ) = −(1/N) Σ_i Σ_t γ^t ρ_t(θ) (Q̂_t − b(s_t))

    Q̂_t is the critic's action value of the logged (s_t, a_t): `returns` when given, else the
    `reward` column taken row by row — NOT summed into a return (the trainer fills that column
    with the one-step target r_t + γ V̂(s_{t+1}); a test passes the exact Q^π). Gradient:
    −(1/N) Σ Σ_t γ^t ρ_t ∇log π_θ(a_t|s_t) (Q̂_t − b_t); what it equals in expectation and its
    bias conditions are in the module docstring. Options and `baseline` act exactly as in
    `per_step_surrogate` (clip, PSIS, self-normalisation, PPO clip, standardised advantages);
    `clip_mode="cumulative"` is refused (one ratio per row).

    Args:
        target_logp: log π_θ(a_t|s_t), [M], differentiable.
        behavior_logp: log π_β(a_t|s_t), [M]; treated as a constant.
        reward: Q̂(s_t, a_t) per row when `returns` is None, [M]; treated as a constant.
        step: t within the episode, [M] (the weight is γ^t; the trainer's single-step rows have
            t = 0 and carry any γ^t inside Q̂ and b).
        episode_start: True on each episode's first row, [M] bool.
        gamma: discount in [0, 1] of the γ^t weight.
        options: the variance controls (see above).
        baseline: None, a float, or an [M] tensor b(s_t) (detached).
        returns: optional Q̂(s_t, a_t), [M]; replaces `reward`.
        reduction: "mean" (a scalar) or "none" (N per-episode terms whose mean is L).

    Returns:
        A scalar tensor (or [N] with reduction="none").
    """
    refuse_unsupported("critic", options, CRITIC_OPTIONS)
    action_value = reward if returns is None else returns
    return per_step_surrogate(
        target_logp, behavior_logp, reward, step, episode_start, gamma=gamma, options=options,
        baseline=baseline, returns=action_value.detach().to(torch.float64), reduction=reduction,
    )


def greedy_critic_surrogate(
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
    r"""The `greedy-critic` surrogate, to be minimised: `critic_surrogate`'s loss

        L(θ) = −(1/N) Σ_i Σ_t γ^t ρ_t(θ) (Q̂_t − b(s_t))

    with the trainer's greedy-policy critic in the columns (training/greedy.py): Q̂_t =
    max(Q̂(s_t, a_t), G_t) and b(s_t) = max(Q̂(s_t, μ_θ(s_t)), V̂(s_t)), Q̂ ≈ Q^{μ_θ}.

    What its expectation equals (module docstring): with Q̂ = Q^π exact, no clip and θ = β, the
    policy-gradient theorem's gradient (the baseline adds nothing, E_β[ρ ∇log π_θ] = 0). Its
    biases: (i) the first-order one of every step estimator — states weighted by d^β, not
    d^{π_θ}; (ii) the critic's error on the actions π_θ takes; (iii) Q^{μ_θ} (the greedy
    policy's value) stands in for Q^{π_θ}: π_θ = N(μ_θ, σ²) with a small frozen σ, so the two
    differ by O(σ²) where Q is smooth in a; (iv) GPI's max with G_t and V̂ — an improvement
    step towards the better of μ_θ and β, not an estimate of Q^{π_θ}, where β is better;
    (v) the ρ cap, as in per-step. Options act as in `critic_surrogate`.
    """
    refuse_unsupported("greedy-critic", options, CRITIC_OPTIONS)  # its own name in the error
    return critic_surrogate(
        target_logp, behavior_logp, reward, step, episode_start, gamma=gamma, options=options,
        baseline=baseline, returns=returns, reduction=reduction,
    )
