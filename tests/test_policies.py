"""Policies: normalised densities, exact tanh change of variables, checkpoints, determinism, BC."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

from offpg_offline.policies import (
    CategoricalPolicy,
    GaussianPolicy,
    behavior_clone,
    checkpoint,
    log_normal_mass,
    make_policy,
    policy_from_checkpoint,
    unsquash,
)

F64 = torch.float64


def _obs(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * 2.0 + 1.0


def _perturbed(policy: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random non-default parameters (learned log-std included), so tests do not pass at init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return policy


def test_categorical_probabilities_sum_to_one() -> None:
    torch.manual_seed(0)
    policy = _perturbed(CategoricalPolicy(4, 5, (16,), obs_mean=[1] * 4, obs_std=[2] * 4), 1)
    obs = _obs(32, 4, seed=2)
    probs = torch.stack([policy.log_prob(obs, torch.full((32,), a)).exp() for a in range(5)], -1)
    # Float32 log-softmax then exp: the sum of 5 terms is 1 to a few ulps.
    torch.testing.assert_close(probs.sum(-1), torch.ones(32), atol=1e-6, rtol=0)
    torch.testing.assert_close(policy.entropy(obs), -(probs * probs.log()).sum(-1))


@pytest.mark.parametrize("std", ["learned", "state"])
def test_gaussian_density_integrates_to_one(std: str) -> None:
    torch.manual_seed(0)
    policy = _perturbed(GaussianPolicy(3, 1, (16,), std=std), 1).double()
    obs = _obs(4, 3, seed=2).double()
    with torch.no_grad():
        mean, log_std = policy.distribution_params(obs)
    # Trapezoid rule on ±12σ with 40k points per state: the tails beyond 12σ hold < 1e-32 and
    # the rule's error is O(h²·max|p''|) < 1e-7 here, so 1e-6 is a safe bound.
    for row in range(4):
        grid = torch.linspace(-12, 12, 40_001, dtype=F64) * log_std[row].exp() + mean[row]
        with torch.no_grad():
            density = policy.log_prob(obs[row].expand(grid.shape[0], 3), grid[:, None]).exp()
        integral = torch.trapezoid(density, grid)
        assert abs(float(integral) - 1.0) < 1e-6


@pytest.mark.parametrize("std", ["learned", "state"])
def test_tanh_gaussian_density_integrates_to_one_on_the_box(std: str) -> None:
    torch.manual_seed(0)
    policy = _perturbed(
        GaussianPolicy(3, 1, (16,), std=std, squash=True, action_low=[-2.0], action_high=[3.0]), 1
    ).double()
    obs = _obs(4, 3, seed=2).double()
    # Integrate p(a) in a-space by the trapezoid rule on a = squash(u), u on [-7, 7] (a grid that
    # is dense near the bounds). Beyond |u| = atanh(1 - 2e-6) ≈ 7.25 actions are clamped inside the
    # box (SQUASH_EPS), so there the density is deliberately not exact; the exact mass outside
    # |u| ≤ 7 is the Gaussian tail, added from the normal CDF. With 400k nodes the rule's error is
    # < 1e-7 for these smooth densities (σ > 0.05, checked), so 1e-6 is a safe bound.
    with torch.no_grad():
        mean, log_std = policy.distribution_params(obs)
    assert log_std.min() > math.log(0.05)
    pre = torch.linspace(-7, 7, 400_001, dtype=F64)
    grid = -2.0 + 5.0 * torch.sigmoid(2.0 * pre)
    for row in range(4):
        with torch.no_grad():
            density = policy.log_prob(obs[row].expand(grid.shape[0], 3), grid[:, None]).exp()
        base = Normal(mean[row, 0], log_std[row, 0].exp())
        tails = base.cdf(torch.tensor(-7.0, dtype=F64)) + 1 - base.cdf(torch.tensor(7.0, dtype=F64))
        integral = torch.trapezoid(density, grid) + tails
        assert abs(float(integral) - 1.0) < 1e-6


def test_tanh_log_density_equals_change_of_variables_reference() -> None:
    torch.manual_seed(0)
    low, high = torch.tensor([-2.0, 0.0], dtype=F64), torch.tensor([2.0, 10.0], dtype=F64)
    policy = _perturbed(
        GaussianPolicy(3, 2, (16,), std="state", squash=True, action_low=low, action_high=high), 1
    ).double()
    obs = _obs(64, 3, seed=2).double()
    action = policy.sample(obs, generator=torch.Generator().manual_seed(3))
    mean, log_std = policy.distribution_params(obs)
    # Slow reference: torch.distributions' own composition of tanh and the affine map.
    reference = (
        TransformedDistribution(
            Normal(mean, log_std.exp()),
            [TanhTransform(), AffineTransform(loc=(low + high) / 2, scale=(high - low) / 2)],
        )
        .log_prob(action)
        .sum(-1)
    )
    # Both compute the same quantity in float64; differences are rounding in atanh (≤1e-9 rel).
    torch.testing.assert_close(policy.log_prob(obs, action), reference, rtol=1e-9, atol=1e-9)


def test_tanh_log_density_is_finite_on_the_bounds() -> None:
    low, high = torch.tensor([-1.0]), torch.tensor([1.0])
    action = torch.tensor([[-1.0], [1.0], [-1.5], [0.0]])
    pre, log_det = unsquash(action, low, high)
    assert torch.isfinite(pre).all() and torch.isfinite(log_det).all()
    # Clamped SQUASH_EPS·width inside: u = atanh(1 − 2e-6) ≈ 6.9, and the interior point is exact.
    assert 6.5 < float(pre[1]) < 7.5 and float(pre[0]) == -float(pre[1])
    assert float(pre[3]) == 0.0 and float(log_det[3]) == 0.0  # da/du = 1 at the centre of [-1, 1]
    policy = GaussianPolicy(2, 1, (8,), squash=True, action_low=low, action_high=high)
    assert torch.isfinite(policy.log_prob(torch.zeros(4, 2), action)).all()


@pytest.mark.parametrize(
    "kind", ["categorical", "gaussian", "tanh-gaussian", "truncated-gaussian", "state-std"]
)
def test_checkpoint_round_trip_is_bit_exact_with_weights_only_load(kind: str, tmp_path) -> None:
    torch.manual_seed(0)
    obs_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    if kind == "categorical":
        policy = make_policy(
            obs_space,
            gym.spaces.Discrete(4),
            hidden=(16, 8),
            obs_mean=[0.5, 0, -1],
            obs_std=[2, 1, 0.5],
        )
    else:
        action_space = gym.spaces.Box(np.array([-2, 0], np.float32), np.array([2, 1], np.float32))
        policy = make_policy(
            obs_space,
            action_space,
            kind="tanh-gaussian" if kind == "state-std" else kind,
            std="state" if kind == "state-std" else "learned",
            hidden=(16, 8),
            obs_mean=[0.5, 0, -1],
            obs_std=[2, 1, 0.5],
        )
    _perturbed(policy, 1)
    path = tmp_path / "policy.pt"
    torch.save(checkpoint(policy, step=7), path)

    torch.manual_seed(123)  # the fresh module starts from other weights
    loaded = policy_from_checkpoint(torch.load(path, weights_only=True))

    assert loaded.spec() == policy.spec()
    assert torch.equal(loaded.obs_mean, torch.tensor([0.5, 0, -1]))
    obs = _obs(50, 3, seed=2)
    action = policy.sample(obs, generator=torch.Generator().manual_seed(4))
    assert torch.equal(loaded.log_prob(obs, action), policy.log_prob(obs, action))
    assert torch.equal(loaded.mode(obs), policy.mode(obs))
    assert torch.equal(
        loaded.sample(obs, torch.Generator().manual_seed(5)),
        policy.sample(obs, torch.Generator().manual_seed(5)),
    )


def test_make_policy_auto_picks_the_family() -> None:
    obs = gym.spaces.Box(-1, 1, (2,))
    assert isinstance(make_policy(obs, gym.spaces.Discrete(2)), CategoricalPolicy)
    bounded = make_policy(obs, gym.spaces.Box(-2, 2, (1,)))
    assert isinstance(bounded, GaussianPolicy) and bounded.squash
    assert not make_policy(obs, gym.spaces.Box(-np.inf, np.inf, (1,))).squash
    with pytest.raises(ValueError, match="categorical"):
        make_policy(obs, gym.spaces.Box(-2, 2, (1,)), kind="categorical")
    with pytest.raises(ValueError, match="finite action bounds"):
        make_policy(obs, gym.spaces.Box(-np.inf, np.inf, (1,)), kind="tanh-gaussian")


@pytest.mark.parametrize("squash", [False, True])
def test_sampling_is_deterministic_for_a_seeded_generator(squash: bool) -> None:
    torch.manual_seed(0)
    policy = GaussianPolicy(3, 2, (8,), squash=squash, action_low=[-1, -1], action_high=[1, 2])
    categorical = CategoricalPolicy(3, 3, (8,))
    obs = _obs(100, 3, seed=1)
    for pol in (policy, categorical):
        first = pol.sample(obs, torch.Generator().manual_seed(9))
        assert torch.equal(first, pol.sample(obs, torch.Generator().manual_seed(9)))
        assert not torch.equal(first, pol.sample(obs, torch.Generator().manual_seed(10)))
    if squash:
        sample = policy.sample(obs, torch.Generator().manual_seed(9))
        assert (sample >= policy.action_low).all() and (sample <= policy.action_high).all()


def test_behavior_cloning_recovers_a_known_categorical_policy() -> None:
    # True π(a|s) = softmax(W s) on 2-D standard normal states, 3 actions.
    gen = torch.Generator().manual_seed(0)
    weight = torch.tensor([[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]])
    obs = torch.randn(20_000, 2, generator=gen)
    true_probs = torch.softmax(obs @ weight.T, -1)
    action = torch.multinomial(true_probs, 1, generator=gen).squeeze(-1)
    torch.manual_seed(0)
    policy = CategoricalPolicy(2, 3, (32,))

    losses = behavior_clone(
        policy,
        obs,
        action,
        steps=1500,
        lr=1e-2,
        batch_size=512,
        generator=torch.Generator().manual_seed(1),
    )

    test_obs = torch.randn(2000, 2, generator=gen)
    test_probs = torch.softmax(test_obs @ weight.T, -1)
    with torch.no_grad():
        fitted = policy.logits(test_obs).exp()
    kl = (test_probs * (test_probs.log() - fitted.log())).sum(-1).mean()
    # Parametric rate: KL ≈ (#params-ish)/(2N) plus optimisation error; with 20k samples a well
    # fit gives ~0.005 nats; 0.03 still fails any policy that misses the structure (uniform: 0.5).
    assert float(kl) < 0.03
    assert (fitted - test_probs).abs().mean() < 0.03
    assert np.mean(losses[-100:]) < np.mean(losses[:10])


def test_behavior_clone_is_bit_reproducible() -> None:
    obs = _obs(500, 3, seed=0)
    action = torch.randn(500, 1, generator=torch.Generator().manual_seed(1))
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        policy = GaussianPolicy(3, 1, (8,))
        behavior_clone(policy, obs, action, steps=20, generator=torch.Generator().manual_seed(2))
        results.append(policy.log_prob(obs, action))
    assert torch.equal(results[0], results[1])


def test_truncated_gaussian_density_is_the_textbook_formula_and_integrates_to_one() -> None:
    torch.manual_seed(0)
    low, high = torch.tensor([-2.0], dtype=F64), torch.tensor([2.0], dtype=F64)
    policy = _perturbed(
        GaussianPolicy(3, 1, (16,), std="state", truncate=True, action_low=low, action_high=high),
        1,
    ).double()
    obs = _obs(4, 3, seed=2).double()
    grid = torch.linspace(-2, 2, 200_001, dtype=F64)
    with torch.no_grad():
        mean, log_std = policy.distribution_params(obs)
        for row in range(4):
            logp = policy.log_prob(obs[row].expand(len(grid), 3), grid[:, None])
            # Reference: N(a; μ, σ²) / (Φ((high − μ)/σ) − Φ((low − μ)/σ)), plain float64.
            base = Normal(mean[row, 0], log_std[row, 0].exp())
            expected = base.log_prob(grid) - torch.log(base.cdf(high) - base.cdf(low))
            torch.testing.assert_close(logp, expected, rtol=1e-9, atol=1e-9)
            # Trapezoid on the box with 200k nodes: error < 1e-8 for σ > 0.05 (checked).
            assert float(log_std[row, 0].exp()) > 0.05
            assert abs(float(torch.trapezoid(logp.exp(), grid)) - 1.0) < 1e-6


@pytest.mark.parametrize(("lo", "hi"), [(-1.0, 2.0), (7.0, 11.0), (-13.0, -9.0), (30.0, 34.0)])
def test_log_normal_mass_is_accurate_in_far_tails(lo: float, hi: float) -> None:
    # Φ(hi) − Φ(lo) cancels to 0 in float64 for lo ≥ 9; the reference integrates
    # exp(log φ − max log φ) by the trapezoid rule (relative error < 1e-8 with 400k nodes).
    z = torch.linspace(lo, hi, 400_001, dtype=F64)
    log_pdf = -0.5 * z.square() - 0.5 * math.log(2 * math.pi)
    offset = log_pdf.max()
    reference = offset + torch.log(torch.trapezoid((log_pdf - offset).exp(), z))
    value = log_normal_mass(torch.tensor([lo], dtype=F64), torch.tensor([hi], dtype=F64))
    torch.testing.assert_close(value, reference.reshape(1), rtol=1e-7, atol=1e-7)


def test_truncated_gaussian_samples_stay_in_the_box_with_the_right_mean() -> None:
    policy = GaussianPolicy(
        1,
        1,
        (),
        std="learned",
        truncate=True,
        action_low=[-1.0],
        action_high=[1.0],
        log_std_init=0.0,
    )
    with torch.no_grad():
        policy.net[0].weight.zero_()
        policy.net[0].bias.fill_(0.5)
    obs = torch.zeros(200_000, 1)
    with torch.no_grad():
        sample = policy.sample(obs, torch.Generator().manual_seed(0)).double()
    assert sample.min() >= -1 and sample.max() <= 1
    # Mean of N(0.5, 1) truncated to [-1, 1]: μ + σ(φ(α) − φ(β))/(Φ(β) − Φ(α)), α = −1.5, β = 0.5.
    normal = Normal(0.0, 1.0)
    alpha, beta = torch.tensor(-1.5), torch.tensor(0.5)
    expected = 0.5 + (normal.log_prob(alpha).exp() - normal.log_prob(beta).exp()) / (
        normal.cdf(beta) - normal.cdf(alpha)
    )
    # Std of the truncated law < 0.6, so the standard error of the mean of 200k draws < 0.0014;
    # 0.006 is > 4 standard errors.
    assert abs(float(sample.mean()) - float(expected)) < 0.006
    assert torch.equal(policy.mode(obs[:2]), torch.full((2, 1), 0.5))
