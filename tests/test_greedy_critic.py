"""The `greedy-critic` estimator (estimators/critic.py) and its critic (training/greedy.py).

Expected values come from independent sources: the tabular MDP of test_estimators.py solved
by recursion and enumeration (as in test_critic_estimator.py), a one-step continuous log whose
reward −(a − s)² gives the exact gradient by hand, torch.distributions' Gaussian KL, and what
the runs recorded in their checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_critic_estimator import _exact_q, _first_order_gradient
from test_estimators import BEHAVIOR, GAMMA, HORIZON, _all_trajectories, _per_episode_gradients
from torch import Tensor

from offpg_offline.config import EstimatorName, Init, TrainConfig, resolve_auto
from offpg_offline.data.batch import StepBatch
from offpg_offline.data.stream import LogView
from offpg_offline.estimators import ESTIMATORS, SurrogateOptions
from offpg_offline.estimators.critic import greedy_critic_surrogate
from offpg_offline.policies import make_policy
from offpg_offline.train import train
from offpg_offline.training import greedy
from offpg_offline.training.greedy import GreedyCritic, anchor_kl

F64 = torch.float64
DATASETS = Path(__file__).resolve().parents[1] / "datasets"


# --------------------------------------------------------------------------------------------
# The estimator with the exact Q: the policy-gradient theorem
# --------------------------------------------------------------------------------------------


def _expected_gradient(probs: Tensor, action_value: Tensor, baseline: Tensor) -> Tensor:
    """E_β[−∇_θ L] of greedy_critic_surrogate at θ = log `probs` by enumeration of every
    trajectory of π_β, with Q̂(s_t, a_t) = action_value[t, s_t, a_t] and b = baseline[t, s_t]."""
    s, a, prob = _all_trajectories()
    n = s.shape[0]
    target_logp = probs.log()[s, a].flatten().clone().requires_grad_()
    t = torch.arange(HORIZON).repeat(n)
    per_episode = greedy_critic_surrogate(
        target_logp, BEHAVIOR.log()[s, a].flatten(), torch.zeros(n * HORIZON, dtype=F64), t,
        t == 0, gamma=GAMMA, returns=action_value[t, s.flatten(), a.flatten()],
        baseline=baseline[t, s.flatten()], reduction="none", options=SurrogateOptions(clip=None))
    (coefficient,) = torch.autograd.grad((per_episode * prob).sum(), target_logp)
    return -_per_episode_gradients(coefficient.view(n, HORIZON), s, a, probs).sum(0)


def test_with_the_exact_q_at_behavior_it_is_the_policy_gradient_theorem() -> None:
    # θ = β, Q̂ = Q^π exact: E_β[Σ_t γ^t ρ_t ∇log π (Q^π_t − b_t)] = the policy-gradient
    # theorem's Σ_t γ^t Σ_s d^π_t(s) Σ_a π ∇log π Q^π_t(s, a) for any state baseline — here
    # the greedy policy's own value max_a Q^π_t(s, a) (what Q̂(s, μ(s)) is for a tabular
    # greedy μ) and an arbitrary one. Exact float64 sums of 7776·5 terms of O(10): 1e-12.
    q = _exact_q(BEHAVIOR)
    theorem = _first_order_gradient(BEHAVIOR, BEHAVIOR, q)
    greedy_value = q.max(-1).values
    arbitrary = torch.linspace(-3.0, 5.0, greedy_value.numel(), dtype=F64).view_as(greedy_value)
    for baseline in (greedy_value, arbitrary, torch.zeros_like(greedy_value)):
        torch.testing.assert_close(_expected_gradient(BEHAVIOR, q, baseline), theorem,
                                   rtol=0, atol=1e-12)


def test_the_registry_entry_is_a_greedy_step_estimator() -> None:
    spec = ESTIMATORS["greedy-critic"]
    assert (spec.unit, spec.greedy, spec.critic) == ("step", True, False)
    with pytest.raises(ValueError, match="clip_mode"):
        spec.check("greedy-critic", SurrogateOptions(clip_mode="cumulative"))


# --------------------------------------------------------------------------------------------
# The fitted critic: its bias shrinks with data
# --------------------------------------------------------------------------------------------

BETA_MEAN, BETA_STD = 0.3, 0.5  # π_β = N(0.3, 0.5²), state-independent
PI_MEAN, PI_STD = 0.3, 0.25  # the π_θ whose gradient is estimated


def _one_step_log(n: int, seed: int) -> StepBatch:
    """n one-step episodes: s ~ U(−1, 1), a ~ π_β (unclipped), r = −(a − s)², terminated."""
    generator = torch.Generator().manual_seed(seed)
    obs = torch.rand(n, 1, generator=generator) * 2 - 1
    action = BETA_MEAN + BETA_STD * torch.randn(n, 1, generator=generator)
    reward = -(action - obs).square().squeeze(-1)
    return StepBatch(
        episode_id=torch.arange(n), step=torch.zeros(n, dtype=torch.long), obs=obs,
        action=action, reward=reward, next_obs=obs, terminated=torch.ones(n, dtype=torch.bool),
        truncated=torch.zeros(n, dtype=torch.bool), logged_logp=None, estimated_logp=None,
        episode_start=torch.ones(n, dtype=torch.bool))


class _Mean(torch.nn.Module):
    """A policy whose greedy action is PI_MEAN everywhere (all the critic asks of it)."""

    def mode(self, obs: Tensor) -> Tensor:
        return torch.full((obs.shape[0], 1), PI_MEAN)


def _quadrature_gradient(q_of) -> float:
    """E_s E_{a∼β}[ρ ∂_m log π(a) (Q(s, a) − Q(s, m))] at m = PI_MEAN through the estimator:
    the rows are a Gauss–Legendre (s) × Gauss–Hermite (a under β) grid, each row's per-episode
    loss (reduction "none") weighted by its quadrature weight."""
    s_nodes, s_weights = np.polynomial.legendre.leggauss(24)
    z_nodes, z_weights = np.polynomial.hermite_e.hermegauss(60)
    s = torch.tensor(s_nodes, dtype=F64).repeat_interleave(60)
    a = (BETA_MEAN + BETA_STD * torch.tensor(z_nodes, dtype=F64)).repeat(24)
    weight = (torch.tensor(s_weights).repeat_interleave(60) / 2
              * torch.tensor(z_weights).repeat(24) / math.sqrt(2 * math.pi))
    mean = torch.tensor(PI_MEAN, dtype=F64, requires_grad=True)
    normal = torch.distributions.Normal
    target_logp = normal(mean, PI_STD).log_prob(a)
    behavior_logp = normal(BETA_MEAN, BETA_STD).log_prob(a)
    n = s.numel()
    per_row = greedy_critic_surrogate(
        target_logp, behavior_logp, torch.zeros(n, dtype=F64), torch.zeros(n, dtype=torch.long),
        torch.ones(n, dtype=torch.bool), gamma=1.0, options=SurrogateOptions(clip=None),
        returns=q_of(s, a).double(), baseline=q_of(s, torch.full_like(s, PI_MEAN)).double(),
        reduction="none")
    (gradient,) = torch.autograd.grad((per_row * weight).sum(), mean)
    return -float(gradient)


def _fitted_q(n: int, seed: int, steps: int):
    critic = GreedyCritic(_one_step_log(n, seed), torch.tensor([-3.0]), torch.tensor([3.0]),
                          gamma=0.99, seed=seed)
    critic.fit(_Mean(), steps, torch.Generator().manual_seed(seed))
    return lambda s, a: critic.value(s[:, None].float(), a[:, None].float())


def test_with_the_exact_q_the_quadrature_is_the_hand_gradient() -> None:
    # ∂_m E_s E_{a∼N(m, σ²)}[−(a − s)²] = −2(m − E[s]) = −2m = −0.6 (s ~ U(−1, 1)). The
    # quadrature integrates ρ·(polynomial) with ρ a Gaussian ratio (σ < σ_β): measured error
    # 1.0e-8 with 60 Hermite nodes (float64), asserted 1e-7.
    exact = _quadrature_gradient(lambda s, a: -(a - s) ** 2)
    assert exact == pytest.approx(-2 * PI_MEAN, abs=1e-7)


def test_with_a_fitted_critic_the_bias_shrinks_with_data() -> None:
    # The critic (twin 256×256 ReLU networks, 800 TD steps: the target is r, the episodes
    # being terminated) fitted on N = 64 and N = 4096 logged rows; the estimator's expected
    # gradient given that critic (quadrature above: no sampling noise in the gradient) minus
    # the exact −0.6 is its bias. RMS over seeds 0–3, measured 0.041 at N = 64 and 0.009 at
    # N = 4096 (ratio 4.5; with 1500 steps 0.029 and 0.0033): asserted a ratio ≥ 2 and
    # < 0.03 at N = 4096, i.e. 5 % of the gradient.
    bias = {}
    for n in (64, 4096):
        errors = [_quadrature_gradient(_fitted_q(n, seed, 800)) + 2 * PI_MEAN
                  for seed in range(4)]
        bias[n] = math.sqrt(sum(e * e for e in errors) / len(errors))
    assert bias[4096] < 0.5 * bias[64], bias
    assert bias[4096] < 0.03, bias


# --------------------------------------------------------------------------------------------
# The critic's parts: targets, GPI, the anchor
# --------------------------------------------------------------------------------------------


def test_the_critic_fits_the_td_target_of_a_terminated_log() -> None:
    # Terminated one-step episodes: y = r, so Q̂(s, a) → −(a − s)². After 1500 steps on 4096
    # rows the mean absolute error on held-out draws of β is small against the rewards' mean
    # magnitude (≈ 0.6): measured 0.007, asserted < 0.05.
    q = _fitted_q(4096, 0, 1500)
    held_out = _one_step_log(2000, 99)
    predicted = q(held_out.obs.squeeze(-1), held_out.action.squeeze(-1))
    assert (predicted - held_out.reward).abs().mean() < 0.05


def test_the_bootstrap_uses_the_greedy_action_and_stops_at_termination() -> None:
    # A two-state chain by hand: s = 0 → s' = 1 (not terminated, r = 0); s = 1 terminated,
    # r = a (so Q(1, a) = a). With γ = 0.5 and μ(s') = 0.8 the TD fixed point at (0, a) is
    # 0.5 · Q̄(1, 0.8 + ε) ≈ 0.4 (target noise ε is clipped and zero-mean: Q(1, ·) is linear).
    n = 512
    generator = torch.Generator().manual_seed(0)
    first = torch.arange(n) % 2 == 0
    obs = torch.where(first, 0.0, 1.0)[:, None]
    action = torch.rand(n, 1, generator=generator) * 2 - 1
    batch = StepBatch(
        episode_id=torch.arange(n) // 2, step=(~first).long(), obs=obs, action=action,
        reward=torch.where(first, 0.0, action.squeeze(-1)), next_obs=torch.ones(n, 1),
        terminated=~first, truncated=torch.zeros(n, dtype=torch.bool), logged_logp=None,
        estimated_logp=None, episode_start=first)

    class _Greedy(torch.nn.Module):
        def mode(self, obs: Tensor) -> Tensor:
            return torch.full((obs.shape[0], 1), 0.8)

    critic = GreedyCritic(batch, torch.tensor([-1.0]), torch.tensor([1.0]), gamma=0.5, seed=0)
    critic.fit(_Greedy(), 1500, torch.Generator().manual_seed(1))
    at_start = critic.value(torch.zeros(5, 1), torch.linspace(-1, 1, 5)[:, None])
    at_end = critic.value(torch.ones(5, 1), torch.linspace(-1, 1, 5)[:, None])
    # (Clipping μ + ε to the bound 1 lowers the fixed point by 0.5·E[(ε − 0.2)⁺] ≈ 0.008.)
    # Measured max errors 0.029 at s = 0 and 0.010 at s = 1; asserted 0.06 (a fit).
    torch.testing.assert_close(at_start, torch.full((5,), 0.4), rtol=0, atol=0.06)
    torch.testing.assert_close(at_end, torch.linspace(-1, 1, 5), rtol=0, atol=0.06)


def test_targets_are_the_generalised_policy_improvement_max() -> None:
    # max(Q̂(s, a), G_t) and max(Q̂(s, μ(s)), V̂(s)): each target is one of its two sources and
    # at least both; rows where the logger's numbers are larger keep them.
    critic = GreedyCritic(_one_step_log(256, 0), torch.tensor([-3.0]), torch.tensor([3.0]),
                          gamma=0.99, seed=0)
    rows = _one_step_log(64, 5)
    returns = torch.linspace(-2.0, 2.0, 64)
    value = torch.linspace(2.0, -2.0, 64)
    view = LogView(rows.obs, rows.action, torch.zeros(64), returns, rows.step,
                   rows.episode_start, value)
    out = critic.targets_of(view, _Mean())
    q_logged = critic.value(rows.obs, rows.action)
    q_greedy = critic.value(rows.obs, torch.full((64, 1), PI_MEAN))
    assert torch.all(out.reward >= returns) and torch.all(out.reward >= q_logged)
    assert torch.all((out.reward == returns) | (out.reward == q_logged))
    assert torch.all(out.baseline >= value) and torch.all(out.baseline >= q_greedy)
    assert torch.all((out.baseline == value) | (out.baseline == q_greedy))
    assert (out.reward == returns).any() and (out.reward == q_logged).any()
    no_baseline = critic.targets_of(dataclasses.replace(view, baseline=None), _Mean())
    torch.testing.assert_close(no_baseline.baseline, q_greedy)


def test_the_anchor_is_the_closed_form_gaussian_kl() -> None:
    # Against torch.distributions' KL of the two diagonal Gaussians (pre-squash), summed over
    # action dimensions, averaged over states; its gradient at the clone's mean is 0.
    policy = make_policy(4, _box(2), hidden=(8,))
    clone = make_policy(4, _box(2), hidden=(8,))
    obs = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    mean, log_std = policy.distribution_params(obs)
    c_mean, c_log_std = clone.distribution_params(obs)
    normal = torch.distributions.Normal
    expected = torch.distributions.kl_divergence(
        normal(mean, log_std.exp()), normal(c_mean, c_log_std.exp())).sum(-1).mean()
    torch.testing.assert_close(anchor_kl(policy, clone, obs), expected)
    clone.load_state_dict(policy.state_dict())
    with torch.no_grad():
        clone.log_std.add_(0.7)  # another σ, the same mean: gradient w.r.t. the mean is 0
    mean_params = [p for name, p in policy.named_parameters() if name != "log_std"]
    grads = torch.autograd.grad(anchor_kl(policy, clone, obs), mean_params)
    assert max(float(g.abs().max()) for g in grads) < 1e-6


def _box(dim: int):
    import gymnasium

    return gymnasium.spaces.Box(-1.0, 1.0, (dim,), np.float32)


# --------------------------------------------------------------------------------------------
# In the trainer
# --------------------------------------------------------------------------------------------


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 200-step warm-up instead of 5000 (the loop is the same)."""
    monkeypatch.setattr(greedy, "WARM_STEPS", 200)


def _config(**overrides: object) -> TrainConfig:
    return dataclasses.replace(TrainConfig(steps=12, bc_steps=200, eval_episodes=1,
                                           device="cpu"), **overrides)


def test_auto_picks_the_estimator_and_its_settings_from_the_action_space() -> None:
    continuous = resolve_auto(TrainConfig(), discrete_actions=False)
    discrete = resolve_auto(TrainConfig(), discrete_actions=True)
    assert (continuous.estimator, continuous.lr, continuous.steps, continuous.bc_steps) == (
        EstimatorName.GREEDY_CRITIC, 2.5e-4, 3000, 20000)
    assert (discrete.estimator, discrete.lr, discrete.steps, discrete.bc_steps) == (
        EstimatorName.PER_STEP, 1e-3, 1000, 5000)
    chosen = resolve_auto(TrainConfig(estimator=EstimatorName.PER_STEP), discrete_actions=False)
    assert (chosen.estimator, chosen.lr, chosen.steps, chosen.bc_steps) == (
        EstimatorName.PER_STEP, 5e-4, 1000, 5000)
    assert resolve_auto(continuous, discrete_actions=True) == continuous  # idempotent


def test_a_run_trains_resumes_bit_for_bit_and_records_its_critic(
    quick: None, tmp_path: Path
) -> None:
    # Auto on a continuous log is greedy-critic; the checkpoint holds the critic (twin
    # networks, targets, Adam) and the clone; resuming at step 6 gives the uninterrupted run's
    # policy and critic bit for bit (CPU; every critic step draws from its own stream).
    dataset = DATASETS / "pendulum-gauss"
    config = _config(checkpoint_every=6)
    train(dataset, config, out_dir=tmp_path / "full")
    full = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    assert full["config"]["estimator"] == "greedy-critic"
    assert set(full["extra"]) == {"critic", "clone"}
    assert set(full["extra"]["critic"]) == {"critics", "targets", "optimizer"}
    train(dataset, config, out_dir=tmp_path / "resumed",
          resume=tmp_path / "full" / "step-000006.pt")
    resumed = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for part in ("critics", "targets"):
        for key, value in full["extra"]["critic"][part].items():
            assert torch.equal(value, resumed["extra"]["critic"][part][key]), (part, key)
    # σ is frozen at STD_SCALE × the clone's: log σ_θ = log σ_c + log 0.5 exactly as saved.
    torch.testing.assert_close(full["state_dict"]["log_std"],
                               full["extra"]["clone"]["log_std"] + math.log(greedy.STD_SCALE))


def test_kl_coef_weights_the_anchor(quick: None, tmp_path: Path) -> None:
    # The anchor must reach the update: kl_coef 0 and 50 give different policies from the
    # same clone and critic (the clone is the same: it does not depend on kl_coef).
    finals = []
    for coef in (0.0, 50.0):
        out = tmp_path / f"kl{coef}"
        train(DATASETS / "pendulum-gauss", _config(kl_coef=coef), out_dir=out)
        finals.append(torch.load(out / "final.pt", weights_only=True))
    for key, value in finals[0]["extra"]["clone"].items():
        assert torch.equal(value, finals[1]["extra"]["clone"][key])
    assert not torch.equal(finals[0]["state_dict"]["net.0.weight"],
                           finals[1]["state_dict"]["net.0.weight"])
    # With weight 50 the mean stays nearer the clone's than with 0 (the anchor pulls it).
    def distance(final: dict) -> float:
        return sum(float((final["state_dict"][k] - final["extra"]["clone"][k]).square().sum())
                   for k in final["state_dict"] if k.startswith("net."))
    assert distance(finals[1]) < distance(finals[0])


def test_a_streamed_run_fits_its_critic_on_the_sample(quick: None, tmp_path: Path) -> None:
    result = train(DATASETS / "pendulum-gauss", _config(stream=True), out_dir=tmp_path)
    assert math.isfinite(result.metrics["train/loss"])
    assert "extra" in torch.load(result.checkpoint, weights_only=True)


@pytest.mark.parametrize(
    ("dataset", "overrides", "message"),
    [
        ("cartpole-weak", {"estimator": EstimatorName.GREEDY_CRITIC},
         "greedy-critic estimator needs continuous actions"),
        ("pendulum-gauss", {"estimator": EstimatorName.GREEDY_CRITIC,
                            "discount_weighting": "discounted"},
         "discount_weighting=discounted is not supported by the greedy-critic"),
        ("pendulum-gauss", {"estimator": EstimatorName.GREEDY_CRITIC, "init": Init.RANDOM},
         "init=random is not supported by the greedy-critic"),
    ],
)
def test_refusals_are_one_sentence_before_any_file(
    dataset: str, overrides: dict, message: str, tmp_path: Path
) -> None:
    from offpg_offline.config import DiscountWeighting

    if "discount_weighting" in overrides:
        overrides = {**overrides, "discount_weighting": DiscountWeighting.DISCOUNTED}
    with pytest.raises(ValueError, match=message):
        train(DATASETS / dataset, _config(**overrides), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_deploy_advice_names_the_frozen_spread() -> None:
    from offpg_offline.jobs.record import deploy_advice

    metrics = {"online/greedy_return_mean": 280.0, "online/return_mean": 240.0}
    advice = deploy_advice(metrics, EstimatorName.GREEDY_CRITIC)
    assert "half the behavior clone's" in advice and "280 greedy vs 240 stochastic" in advice
    assert "near the logger's" in deploy_advice(metrics, EstimatorName.PER_STEP)
