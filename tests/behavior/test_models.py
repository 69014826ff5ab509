"""Behavior models: the Gaussian mixture's exact density, checkpoints, model selection."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import (
    AffineTransform,
    Categorical,
    MixtureSameFamily,
    Normal,
    TanhTransform,
    TransformedDistribution,
)

from offpg_offline.behavior.models import (
    GaussianMixturePolicy,
    make_behavior_model,
    model_from_checkpoint,
    resolve_kind,
)
from offpg_offline.policies import CategoricalPolicy, GaussianPolicy, checkpoint

F64 = torch.float64


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return model


def _obs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("squash", [False, True])
def test_mixture_log_density_equals_torch_distributions_reference(squash: bool) -> None:
    torch.manual_seed(0)
    low, high = torch.tensor([-2.0, 0.0], dtype=F64), torch.tensor([2.0, 5.0], dtype=F64)
    model = _perturbed(
        GaussianMixturePolicy(3, 2, 4, (16,), squash=squash, action_low=low, action_high=high), 1
    ).double()
    obs = _obs(64, seed=2)
    # Actions from u ~ N(0, 1): away from the bounds, where torch's atanh(y) (the reference)
    # loses precision as y → ±1 and ours, computed from the distances to the bounds, does not.
    pre = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    action = low + (high - low) * torch.sigmoid(2 * pre) if squash else 3 * pre
    with torch.no_grad():
        log_weight, mean, log_std = model.distribution_params(obs)
    # Slow reference: torch.distributions' mixture, then tanh and the affine map onto the box.
    base = MixtureSameFamily(
        Categorical(logits=log_weight),
        torch.distributions.Independent(Normal(mean, log_std.exp()), 1),
    )
    if squash:
        reference = TransformedDistribution(
            base, [TanhTransform(), AffineTransform((low + high) / 2, (high - low) / 2, 1)]
        ).log_prob(action)
    else:
        reference = base.log_prob(action)
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(obs, action), reference, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bound", ["none", "tanh", "truncated"])
def test_mixture_density_integrates_to_one(bound: str) -> None:
    torch.manual_seed(0)
    squash = bound == "tanh"
    model = _perturbed(
        GaussianMixturePolicy(
            3,
            1,
            3,
            (16,),
            squash=squash,
            truncate=bound == "truncated",
            action_low=[-2.0],
            action_high=[2.0],
        ),
        1,
    ).double()
    obs = _obs(3, seed=2)
    # Trapezoid rule with 400k nodes (rule error < 1e-7 for these densities): truncated on the
    # box; unsquashed on [-40, 40] (means within ±5, σ ≤ e² ≈ 7.4: tails beyond hold < 1e-7);
    # squashed on a = squash(u), u ∈ [-7, 7], plus the exact mixture mass outside (actions
    # within 1e-6 of a bound are clamped, so the density is not exact there).
    with torch.no_grad():
        log_weight, mean, log_std = model.distribution_params(obs)
    assert mean.abs().max() < 5
    for row in range(3):
        if squash:
            pre = torch.linspace(-7, 7, 400_001, dtype=F64)
            grid = -2.0 + 4.0 * torch.sigmoid(2.0 * pre)
            comp = Normal(mean[row, :, 0], log_std[row, :, 0].exp())
            inside = comp.cdf(torch.tensor(7.0, dtype=F64)) - comp.cdf(
                torch.tensor(-7.0, dtype=F64)
            )
            tails = float((log_weight[row].exp() * (1 - inside)).sum())
        elif bound == "truncated":
            # Finite density on [-2, 2], but a component whose mean lies far outside piles its
            # mass within ~1e-4 of a bound: the grid a = squash(u), u ∈ [-15, 15], is dense
            # there and stops 4e-13 short of the bounds (mass left out < 1e-9).
            pre = torch.linspace(-15, 15, 400_001, dtype=F64)
            grid, tails = -2.0 + 4.0 * torch.sigmoid(2.0 * pre), 0.0
        else:
            grid, tails = torch.linspace(-40, 40, 400_001, dtype=F64), 0.0
        with torch.no_grad():
            density = model.log_prob(obs[row].expand(len(grid), 3), grid[:, None]).exp()
        assert abs(float(torch.trapezoid(density, grid)) + tails - 1.0) < 1e-6


def test_mixture_checkpoint_round_trip_is_bit_exact(tmp_path) -> None:
    torch.manual_seed(0)
    model = _perturbed(
        GaussianMixturePolicy(
            3,
            2,
            3,
            (8,),
            squash=True,
            action_low=[-1, -1],
            action_high=[1, 2],
            obs_mean=[1, 2, 3],
            obs_std=[1, 2, 4],
        ),
        1,
    )
    torch.save(checkpoint(model), tmp_path / "m.pt")
    torch.manual_seed(5)
    loaded = model_from_checkpoint(torch.load(tmp_path / "m.pt", weights_only=True))
    obs = _obs(20, seed=2).float()
    action = model.sample(obs, torch.Generator().manual_seed(0))
    assert isinstance(loaded, GaussianMixturePolicy) and loaded.spec() == model.spec()
    assert torch.equal(loaded.log_prob(obs, action), model.log_prob(obs, action))
    assert torch.equal(loaded.mode(obs), model.mode(obs))
    # Non-mixture checkpoints go through policies.policy_from_checkpoint.
    categorical = CategoricalPolicy(3, 2, (8,))
    assert isinstance(model_from_checkpoint(checkpoint(categorical)), CategoricalPolicy)


def test_mixture_samples_stay_in_the_box_and_are_seeded() -> None:
    torch.manual_seed(0)
    model = GaussianMixturePolicy(
        3, 2, 3, (8,), squash=True, action_low=[-1, 0], action_high=[1, 3]
    )
    obs = _obs(500, seed=1).float()
    first = model.sample(obs, torch.Generator().manual_seed(4))
    assert torch.equal(first, model.sample(obs, torch.Generator().manual_seed(4)))
    assert (first >= model.action_low).all() and (first <= model.action_high).all()


def test_model_kind_resolution() -> None:
    box = gym.spaces.Box(-2, 2, (1,))
    assert resolve_kind("auto", gym.spaces.Discrete(3)) == "categorical"
    assert resolve_kind("auto", box) == "truncated-mixture"
    assert resolve_kind("auto", gym.spaces.Box(-np.inf, np.inf, (1,))) == "mixture"
    assert isinstance(make_behavior_model(4, box, kind="gaussian"), GaussianPolicy)
    assert make_behavior_model(4, box, kind="tanh-gaussian").std_mode == "state"
    with pytest.raises(ValueError, match="discrete"):
        resolve_kind("mixture", gym.spaces.Discrete(2))
    with pytest.raises(ValueError, match="unknown behavior model 'forest'"):
        resolve_kind("forest", box)
    with pytest.raises(ValueError, match="finite action bounds"):
        resolve_kind("tanh-mixture", gym.spaces.Box(-np.inf, np.inf, (1,)))
