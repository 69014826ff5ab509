"""The trainer's fast paths compute what their slow definitions do.

* `train.episode_gradient_variance` (a vmapped per-row gradient for step estimators, one
  `autograd.grad` per episode otherwise) equals its definition: one backward pass of the
  trainer's loss per unit, then the unbiased variance over units summed over parameters.
* Constant columns handed over in float64 (used as they are, not copied) change no bit of any
  estimator's loss or gradient: the surrogates compute in float64 anyway.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gymnasium import spaces
from torch import Tensor

from offpg_offline import train
from offpg_offline.config import Baseline, ClipMode, EstimatorName, TrainConfig
from offpg_offline.data.stream import LogView
from offpg_offline.policies import Policy, make_policy
from offpg_offline.training.batches import unit_is_step

ACTION_SPACES = {
    "categorical": spaces.Discrete(3),
    "tanh-gaussian": spaces.Box(-1.0, 1.0, (2,)),
    "truncated-gaussian": spaces.Box(-1.0, 1.0, (2,)),
}


def _setup(kind: str, *, baseline: bool = True) -> tuple[Policy, LogView]:
    """A float32 policy and 8 episodes (60 rows) of its own actions under a perturbed π_β."""
    torch.manual_seed(0)
    policy = make_policy(spaces.Box(-5.0, 5.0, (3,)), ACTION_SPACES[kind], kind=kind,
                         hidden=(16, 16), obs_mean=torch.zeros(3), obs_std=torch.ones(3))
    lengths = [5, 7, 3, 10, 8, 9, 6, 12]
    step = torch.cat([torch.arange(n) for n in lengths])
    obs = torch.randn(len(step), 3)
    with torch.no_grad():
        action = policy.sample(obs)
        behavior = policy.log_prob(obs, action) + 0.3 * torch.randn(len(step))
    reward = torch.rand(len(step)) * 3
    base = torch.rand(len(step)) if baseline else None
    return policy, LogView(obs, action, behavior, reward, step, step == 0, base)


def _variance_by_definition(policy: Policy, view: LogView, config: TrainConfig) -> float:
    """One backward pass per unit (the first 8 episodes, or rows for a step estimator)."""
    as_steps = unit_is_step(config)
    grads = []
    for unit in range(8):
        rows = (torch.tensor([unit]) if as_steps
                else torch.nonzero(torch.cumsum(view.episode_start.long(), 0) - 1 == unit)[:, 0])
        loss, _ = train.surrogate(policy, view.rows(rows, as_steps=as_steps), config)
        policy.zero_grad()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    policy.zero_grad()
    return float(torch.stack(grads).double().var(dim=0).sum())


@pytest.mark.parametrize("kind", sorted(ACTION_SPACES))
@pytest.mark.parametrize(("estimator", "options"), [
    ("per-step", {}),
    ("per-step", {"psis": True, "self_normalize": True}),  # one row: only the KL moves
    ("per-step", {"ppo_epsilon": 0.2, "standardize_returns": True, "clip": None}),
    ("critic", {}),
    ("per-decision", {}),
    ("trajectory", {"clip_mode": ClipMode.CUMULATIVE}),
    ("past-weight", {"ppo_epsilon": 0.2}),
])
def test_gradient_variance_is_the_per_unit_definition(
    kind: str, estimator: str, options: dict[str, object]
) -> None:
    policy, view = _setup(kind)
    config = TrainConfig(estimator=EstimatorName(estimator), **options)  # type: ignore[arg-type]
    expected = _variance_by_definition(policy, view, config)
    got = train.episode_gradient_variance(policy, view, config)
    # Per-unit float32 gradients (≈ 400 entries of relative rounding ~1e-7, summed in another
    # order by vmap) and a float64 variance: 1e-5 relative leaves a 100x margin.
    assert got == pytest.approx(expected, rel=1e-5)
    assert got > 0.0
    assert all(p.grad is None for p in policy.parameters())  # .grad left as it was


def test_gradient_variance_without_baseline_and_of_one_unit() -> None:
    policy, view = _setup("categorical", baseline=False)
    config = TrainConfig(estimator=EstimatorName.PER_STEP, baseline=Baseline.NONE)
    assert train.episode_gradient_variance(policy, view, config) == pytest.approx(
        _variance_by_definition(policy, view, config), rel=1e-5)
    assert train.episode_gradient_variance(policy, view.rows(torch.tensor([0]), as_steps=True),
                                           config) == 0.0


def _loss_and_grads(policy: Policy, view: LogView, config: TrainConfig) -> list[Tensor]:
    loss, _ = train.surrogate(policy, view, config)
    policy.zero_grad()
    loss.backward()
    return [loss.detach(), *(p.grad.clone() for p in policy.parameters())]


@pytest.mark.parametrize("estimator", [name.value for name in EstimatorName])
def test_float64_columns_change_no_bit(estimator: str) -> None:
    policy, view = _setup("categorical")
    config = TrainConfig(estimator=EstimatorName(estimator), gamma=0.97)
    if unit_is_step(config):
        view = view.rows(torch.arange(view.n_rows), as_steps=True)
    wide = dataclasses.replace(view, behavior_logp=view.behavior_logp.double(),
                               reward=view.reward.double(), baseline=view.baseline.double())
    for plain, converted in zip(_loss_and_grads(policy, view, config),
                                _loss_and_grads(policy, wide, config), strict=True):
        assert torch.equal(plain, converted)
