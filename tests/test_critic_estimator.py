"""The `critic` estimator (estimators/critic.py) and its in-training critic (training/critic.py).

Expected values come from the tabular MDP of test_estimators.py (3 states, 2 actions, horizon 5,
γ = 0.9), solved here independently: Q^π_t by backward Bellman recursion, state distributions by
forward recursion, and ∇J by autograd through the enumeration of all 7776 trajectories.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from test_estimators import (
    BEHAVIOR,
    GAMMA,
    HORIZON,
    INITIAL,
    N_STATES,
    REWARD,
    TARGET,
    _all_trajectories,
    _behavior_episodes,
    _exact_gradient,
    _per_episode_gradients,
    _transitions,
)
from torch import Tensor

from offpg_offline.config import EstimatorName, TrainConfig
from offpg_offline.data.stream import LogView
from offpg_offline.estimators import ESTIMATORS, SurrogateOptions, critic_surrogate
from offpg_offline.training.critic import one_step_targets
from offpg_offline.training.prepare import prepare_data

F64 = torch.float64
DATASETS = Path(__file__).resolve().parents[1] / "datasets"


def _exact_q(probs: Tensor) -> Tensor:
    """Q^π_t(s, a) of the finite-horizon MDP, [H, S, A]: Q_t = r + γ P (π·Q_{t+1}), Q_H = 0."""
    q = torch.zeros(HORIZON + 1, *REWARD.shape, dtype=F64)
    for t in reversed(range(HORIZON)):
        next_value = (probs * q[t + 1]).sum(-1)  # V_{t+1}(s') = Σ_a' π(a'|s') Q_{t+1}(s', a')
        q[t] = REWARD + GAMMA * _transitions() @ next_value
    return q[:HORIZON]


def _state_distribution(probs: Tensor) -> Tensor:
    """P(s_t = s) when acting with `probs`, [H, S]."""
    rows = [INITIAL]
    for _ in range(HORIZON - 1):
        rows.append(torch.einsum("s,sa,sap->p", rows[-1], probs, _transitions()))
    return torch.stack(rows)


def _first_order_gradient(states_from: Tensor, probs: Tensor, q: Tensor) -> Tensor:
    """Σ_t γ^t Σ_s P_{states_from}(s_t = s) Σ_a π(a|s) ∇log π(a|s) Q_t(s, a), [S·A], for the
    tabular softmax θ = log π: component (s, a) is π(a|s)(Q_t(s, a) − Σ_a' π(a'|s) Q_t(s, a'))."""
    distribution = _state_distribution(states_from)
    advantage = q - (probs * q).sum(-1, keepdim=True)
    discount = GAMMA ** torch.arange(HORIZON, dtype=F64)
    return torch.einsum("t,ts,sa,tsa->sa", discount, distribution, probs, advantage).flatten()


def _expected_critic_gradient(probs: Tensor, action_value: Tensor, **options: object) -> Tensor:
    """E_β[∇_θ L] of the critic surrogate at θ = log `probs`, exactly: every trajectory of π_β
    weighted by its probability, Q̂(s_t, a_t) = action_value[t, s_t, a_t], [S·A]."""
    s, a, prob = _all_trajectories()
    n = s.shape[0]
    target_logp = probs.log()[s, a].flatten().clone().requires_grad_()
    t = torch.arange(HORIZON).repeat(n)
    per_episode = critic_surrogate(
        target_logp, BEHAVIOR.log()[s, a].flatten(), torch.zeros(n * HORIZON, dtype=F64), t,
        t == 0, gamma=GAMMA, returns=action_value[t, s.flatten(), a.flatten()],
        reduction="none", options=SurrogateOptions(**options))
    (coefficient,) = torch.autograd.grad((per_episode * prob).sum(), target_logp)
    return _per_episode_gradients(coefficient.view(n, HORIZON), s, a, probs).sum(0)


def test_with_the_exact_q_at_behavior_it_is_the_policy_gradient_theorem() -> None:
    # θ = β: E_β[Σ_t γ^t ρ_t ∇log π_t Q^π_t] = Σ_t γ^t Σ_s d^π_t(s) Σ_a π ∇log π Q^π_t(s, a)
    # (policy-gradient theorem), which is also ∇J by autograd through the enumeration. Both
    # sides are exact sums of 7776·5 float64 terms of O(10): agreement to 1e-12.
    q = _exact_q(BEHAVIOR)
    theorem = _first_order_gradient(BEHAVIOR, BEHAVIOR, q)
    torch.testing.assert_close(theorem, _exact_gradient(BEHAVIOR).flatten(), rtol=0, atol=1e-12)
    expected = -_expected_critic_gradient(BEHAVIOR, q)
    torch.testing.assert_close(expected, theorem, rtol=0, atol=1e-12)
    # A state baseline adds nothing (E_{a∼β}[ρ ∇log π] = 0): Â = Q − V gives the same gradient.
    value = (BEHAVIOR * q).sum(-1, keepdim=True)
    torch.testing.assert_close(-_expected_critic_gradient(BEHAVIOR, q - value), theorem,
                               rtol=0, atol=1e-12)


def test_with_the_exact_q_away_from_behavior_it_is_the_first_order_approximation() -> None:
    # θ ≠ β: the expectation is Σ_t γ^t Σ_s d^β_t(s) Σ_a π_θ ∇log π_θ Q^{π_θ}_t — β's state
    # distribution in place of π_θ's — not ∇J(θ). Exact sums again (1e-12); the first-order
    # gap to the true gradient is far above rounding: measured max |Δ| = 0.0145 (β and π_θ
    # differ by up to 0.3 in probability), asserted > 0.005.
    q = _exact_q(TARGET)
    first_order = _first_order_gradient(BEHAVIOR, TARGET, q)
    torch.testing.assert_close(-_expected_critic_gradient(TARGET, q), first_order,
                               rtol=0, atol=1e-12)
    true_gradient = _first_order_gradient(TARGET, TARGET, q)
    torch.testing.assert_close(true_gradient, _exact_gradient(TARGET).flatten(), rtol=0,
                               atol=1e-12)
    assert (first_order - true_gradient).abs().max() > 0.005


def _critic_gradients(n: int, seed: int, *, exact: bool = False) -> Tensor:
    """Per-episode gradients −∇L, [n, S·A], of the critic surrogate at θ = β on n logged
    episodes, with Q̂_t = r_t + γ V̂_{t+1}(s_{t+1}) from `one_step_targets` and baseline V̂_t(s_t):
    V̂ = the mean logged return-to-go in cell (t, s) of the same episodes (a tabular
    Monte-Carlo critic of V^β), or with `exact` the true V^β."""
    states, actions, rewards = _behavior_episodes(n, seed)
    if exact:
        value = (BEHAVIOR * _exact_q(BEHAVIOR)).sum(-1)[torch.arange(HORIZON), states].flatten()
    else:
        returns = rewards.flip(1).clone()
        for t in range(1, HORIZON):
            returns[:, t] += GAMMA * returns[:, t - 1]
        cell = (torch.arange(HORIZON) * N_STATES + states).flatten()  # (t, s_t)
        total = torch.zeros(HORIZON * N_STATES, dtype=F64).index_add_(
            0, cell, returns.flip(1).flatten())
        count = torch.bincount(cell, minlength=HORIZON * N_STATES).clamp_min(1)
        value = (total / count)[cell]
    step = torch.arange(HORIZON).repeat(n)
    view = LogView(states.flatten()[:, None].double(), actions.flatten(),
                   BEHAVIOR.log()[states, actions].flatten(), rewards.flatten(), step,
                   step == 0, None)
    target_logp = BEHAVIOR.log()[states, actions].flatten().clone().requires_grad_()
    per_episode = critic_surrogate(target_logp, view.behavior_logp,
                                   one_step_targets(view, value, GAMMA), step,
                                   view.episode_start, gamma=GAMMA, baseline=value,
                                   reduction="none")
    (coefficient,) = torch.autograd.grad(per_episode.sum(), target_logp)
    return -_per_episode_gradients(coefficient.view(n, HORIZON), states, actions, BEHAVIOR)


def test_with_a_fitted_critic_the_bias_shrinks_with_data() -> None:
    # θ = β; N = 200, 2000, 20000 logged episodes, fixed seeds 10–17 at each N. The critic's
    # share of the error is isolated on the same episodes: Δ_N = mean gradient with the fitted
    # V̂ minus mean gradient with the exact V^β (same actions, same sampling noise). Its cell
    # errors are O(1/√N), so Δ_N falls by ≈ √10 per decade. One draw is too noisy to show it
    # (one seed gave 0.0019 at both N = 2000 and 20000), so the RMS over 8 seeds × 6
    # components is compared (measured 0.0116, 0.0018, 0.00059: ratios 6.3 and 3.1; an RMS of
    # 48 terms is within ~20% of its expectation): asserted ≥ 2 per decade. The whole estimate
    # at N = 20000 lies within 4 standard errors of the exact ∇J on every component (6
    # components, two-sided 6e-5 each under normality; measured max z 1.6).
    bias = []
    for n in (200, 2000, 20_000):
        squares = [((_critic_gradients(n, seed).mean(0)
                     - _critic_gradients(n, seed, exact=True).mean(0)) ** 2).mean()
                   for seed in range(10, 18)]
        bias.append(float(torch.stack(squares).mean().sqrt()))
    assert bias[0] > 2 * bias[1] > 4 * bias[2], bias
    fitted, exact = _critic_gradients(20_000, 3), _exact_gradient(BEHAVIOR).flatten()
    z = (fitted.mean(0) - exact).abs() / (fitted.std(0) / fitted.shape[0] ** 0.5)
    assert z.max() < 4.0, z


def test_the_critic_target_has_lower_variance_than_the_monte_carlo_return() -> None:
    # Why the estimator exists: at θ = β both estimate ∇J, but Q̂ = r + γV̂(s') carries one
    # step of reward noise where G_t carries T − t. On 20000 episodes the summed per-component
    # variance of the per-episode gradients is lower for the critic (measured ratio 0.29;
    # asserted < 0.6: with 20000 episodes a variance estimate is within a few % of its value).
    critic = _critic_gradients(20_000, 3)
    states, actions, rewards = _behavior_episodes(20_000, 3)
    target_logp = BEHAVIOR.log()[states, actions].flatten().clone().requires_grad_()
    step = torch.arange(HORIZON).repeat(20_000)
    per_episode = ESTIMATORS["per-step"].fn(
        target_logp, BEHAVIOR.log()[states, actions].flatten(), rewards.flatten(), step,
        step == 0, gamma=GAMMA, reduction="none")
    (coefficient,) = torch.autograd.grad(per_episode.sum(), target_logp)
    monte_carlo = -_per_episode_gradients(coefficient.view(-1, HORIZON), states, actions,
                                          BEHAVIOR)
    assert critic.var(0).sum() < 0.6 * monte_carlo.var(0).sum()


def test_one_step_targets_bootstrap_inside_episodes_and_stop_at_their_end() -> None:
    # By hand: episodes [r = 1, 2, 3] and [r = 4], V = 10, 20, 30, 40, γ = 0.5.
    view = LogView(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), torch.zeros(4),
                   torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 1, 2, 0]),
                   torch.tensor([True, False, False, True]), None)
    targets = one_step_targets(view, torch.tensor([10.0, 20.0, 30.0, 40.0]), 0.5)
    assert targets.tolist() == [1.0 + 0.5 * 20, 2.0 + 0.5 * 30, 3.0, 4.0]


def test_gae_targets_by_hand_and_lambda_one_is_the_monte_carlo_return() -> None:
    # Episodes [r = 1, 2, 3] and [r = 4], V = 10, 20, 30, 40, γ = 0.5, λ = 0.5:
    # δ = [1 + 10 − 10, 2 + 15 − 20, 3 − 30, 4 − 40] = [1, −3, −27, −36];
    # Â_0 = 1 + 0.25·(−3) + 0.0625·(−27), Â_1 = −3 + 0.25·(−27), Â_2 = −27, Â_3 = −36.
    view = LogView(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), torch.zeros(4),
                   torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 1, 2, 0]),
                   torch.tensor([True, False, False, True]), None)
    value = torch.tensor([10.0, 20.0, 30.0, 40.0])
    advantage = [1 - 0.75 - 27 / 16, -3 - 27 / 4, -27.0, -36.0]
    expected = [v + a for v, a in zip([10.0, 20.0, 30.0, 40.0], advantage, strict=True)]
    torch.testing.assert_close(one_step_targets(view, value, 0.5, 0.5).tolist(), expected)
    # λ = 1: the sum telescopes to G_t = [1 + 0.5·2 + 0.25·3, 2 + 0.5·3, 3, 4] for any V.
    torch.testing.assert_close(one_step_targets(view, value, 0.5, 1.0).tolist(),
                               [2.75, 3.5, 3.0, 4.0])


def test_training_rows_hold_the_critics_one_step_target() -> None:
    # prepare_data with the critic estimator: the training view's reward column is
    # r_t + γ V̂(s_{t+1}) (0 after an episode's last step) and its baseline is V̂(s_t) — the
    # same value network; checked against the raw rewards of the log. Float32 columns of
    # magnitude ≤ 100: tolerance 1e-4.
    config = dataclasses.replace(TrainConfig(), estimator=EstimatorName.CRITIC, steps=1,
                                 device="cpu")
    data = prepare_data(DATASETS / "cartpole-weak", config)
    view, raw = data.train_view, data.train_batch.reward.double()
    value = view.baseline.double()
    last = torch.cat([view.episode_start[1:], torch.tensor([True])])
    following = torch.where(last, 0.0, torch.roll(value, -1))
    torch.testing.assert_close(view.reward.double(), raw + config.gamma * following,
                               rtol=0, atol=1e-4)
    assert not torch.allclose(view.reward.double(), raw)
