"""Every option reaches the loss: the trainer's `train.surrogate` against the registry.

For each estimator and each option its spec supports (plus the baseline, γ and the KL weight,
which the trainer also passes), the trainer's loss on a small LogView equals the registry
function called directly with that option, and differs from the loss with the option at its
default: dropping the option from the trainer's call (or from `surrogate_options`) fails here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import Tensor

from offpg_offline import ope, train
from offpg_offline.config import (
    SELECT_ESTIMATORS,
    ClipMode,
    DiscountWeighting,
    EstimatorName,
    TrainConfig,
)
from offpg_offline.data.stream import LogView
from offpg_offline.estimators import ESTIMATORS, SurrogateOptions, kl_penalty
from offpg_offline.policies import CategoricalPolicy
from offpg_offline.training.batches import training_view
from offpg_offline.training.critic import discounted_baseline

F64 = torch.float64

# A value away from the default for every SurrogateOptions field (clip_mode with a clip set).
NON_DEFAULT: dict[str, dict[str, Any]] = {
    "clip": {"clip": 1.3},
    "clip_mode": {"clip": 1.3, "clip_mode": "cumulative"},
    "self_normalize": {"self_normalize": True},
    "psis": {"psis": True},
    "ppo_epsilon": {"ppo_epsilon": 0.1},
    "standardize_returns": {"standardize_returns": True},
}
# The option's default, holding the others of NON_DEFAULT fixed.
DEFAULT_OF: dict[str, dict[str, Any]] = {
    "clip_mode": {"clip": 1.3},
}


def _view(unit: str, *, baseline: bool) -> tuple[CategoricalPolicy, LogView]:
    """40 episodes of 1–5 steps (or 120 independent rows for unit "step"), 3 actions, behavior
    probabilities in [0.02, 1] so that ratios reach ≈ 25: heavy enough for PSIS to act."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    policy = CategoricalPolicy(4, 3, (8,)).double()
    if unit == "step":
        m = 120
        step = torch.zeros(m, dtype=torch.long)
        start = torch.ones(m, dtype=torch.bool)
    else:
        lengths = torch.randint(1, 6, (40,), generator=gen).tolist()
        m = sum(lengths)
        step = torch.cat([torch.arange(n) for n in lengths])
        start = step == 0
    obs = torch.randn(m, 4, generator=gen, dtype=F64)
    action = torch.randint(0, 3, (m,), generator=gen)
    behavior_logp = torch.empty(m, dtype=F64).uniform_(0.02, 1.0, generator=gen).log()
    reward = torch.randn(m, generator=gen, dtype=F64) + 0.5
    base = torch.randn(m, generator=gen, dtype=F64) if baseline else None
    return policy, LogView(obs, action, behavior_logp, reward, step, start, base)


def _config(name: str, **options: Any) -> TrainConfig:
    """TrainConfig with every surrogate option at its SurrogateOptions default, no KL."""
    fields: dict[str, Any] = {"estimator": EstimatorName(name), "clip": None,
                              "clip_mode": ClipMode.STEP, "self_normalize": False,
                              "psis": False, "ppo_epsilon": None,
                              "standardize_returns": False, "kl_coef": 0.0, "gamma": 0.9}
    fields.update(options)
    if "clip_mode" in options:
        fields["clip_mode"] = ClipMode(options["clip_mode"])
    return dataclasses.replace(TrainConfig(), **fields)


def _direct(name: str, policy: CategoricalPolicy, view: LogView, *, gamma: float,
            baseline: Tensor | None, **options: Any) -> Tensor:
    """The registry function called directly. For unit "step" the view's rows are one-step
    episodes whose reward column is G_t, so γ^0 = 1 and G_t = r_t for any γ."""
    target_logp = policy.log_prob(view.obs, view.action)
    return ESTIMATORS[name].fn(target_logp, view.behavior_logp, view.reward, view.step,
                               view.episode_start, gamma=gamma,
                               options=SurrogateOptions(**options), baseline=baseline)


CASES = [(name, option) for name in sorted(ESTIMATORS)
         for option in sorted(ESTIMATORS[name].supports)]


def test_every_supported_option_is_covered() -> None:
    assert {option for _, option in CASES} == set(NON_DEFAULT)
    # 5 + 5 + 6 + 5 (trajectory, per-decision, past-weight, per-step) + 5 + 5 (critic and
    # greedy-critic = per-step's)
    assert len(CASES) == sum(len(spec.supports) for spec in ESTIMATORS.values()) == 31


@pytest.mark.parametrize(("name", "option"), CASES)
def test_trainer_loss_equals_the_registry_function_with_the_option(name: str,
                                                                  option: str) -> None:
    policy, view = _view(ESTIMATORS[name].unit, baseline=True)
    chosen, default = NON_DEFAULT[option], DEFAULT_OF.get(option, {})
    with torch.no_grad():
        trained, _ = train.surrogate(policy, view, _config(name, **chosen))
        direct = _direct(name, policy, view, gamma=0.9, baseline=view.baseline, **chosen)
        without, _ = train.surrogate(policy, view, _config(name, **default))
    torch.testing.assert_close(trained, direct, rtol=1e-12, atol=0.0)
    # The option changes the loss by far more than rounding (float64, ≤ 200 terms of O(10)).
    assert abs(float(trained) - float(without)) > 1e-6, (name, option)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_trainer_passes_the_baseline_gamma_and_kl(name: str) -> None:
    policy, view = _view(ESTIMATORS[name].unit, baseline=True)
    no_baseline = dataclasses.replace(view, baseline=None)
    with torch.no_grad():
        with_b, logp = train.surrogate(policy, view, _config(name))
        without_b, _ = train.surrogate(policy, no_baseline, _config(name))
        torch.testing.assert_close(with_b, _direct(name, policy, view, gamma=0.9,
                                                   baseline=view.baseline), rtol=1e-12, atol=0)
        assert abs(float(with_b) - float(without_b)) > 1e-6
        kl, _ = train.surrogate(policy, view, _config(name, kl_coef=0.7))
        # greedy-critic's KL is the closed-form one to the clone, added by `train.update`
        # (tests/test_greedy_critic.py): its surrogate carries no sampled KL.
        expected = with_b + (0.0 if ESTIMATORS[name].greedy
                             else 0.7 * kl_penalty(logp, view.behavior_logp))
        torch.testing.assert_close(kl, expected, rtol=1e-12, atol=0.0)
        if ESTIMATORS[name].unit == "episode":  # rows of unit "step" carry G_t: γ is inside
            other, _ = train.surrogate(policy, view, _config(name, gamma=0.5))
            torch.testing.assert_close(other, _direct(name, policy, view, gamma=0.5,
                                                      baseline=view.baseline),
                                       rtol=1e-12, atol=0.0)
            assert abs(float(other) - float(with_b)) > 1e-6


@pytest.mark.parametrize(("name", "option"), [
    (name, option) for name in sorted(ESTIMATORS) for option in sorted(NON_DEFAULT)
    if option not in ESTIMATORS[name].supports])
def test_unsupported_options_are_refused_up_front_by_name(name: str, option: str) -> None:
    config = _config(name, **NON_DEFAULT[option])
    with pytest.raises(ValueError, match=f"option {option}=.* not supported by the {name}"):
        train.surrogate_options(config)


def test_registry_keys_are_the_config_enum() -> None:
    assert set(ESTIMATORS) == {member.value for member in EstimatorName}


def test_ope_registry_is_the_config_name_list() -> None:
    assert tuple(ope.OPE_ESTIMATORS) == ope.ESTIMATE_NAMES == tuple(SELECT_ESTIMATORS)


def _episodes() -> LogView:
    """6 whole episodes of 1–6 steps with raw rewards and a baseline column of zeros."""
    gen = torch.Generator().manual_seed(5)
    lengths = [3, 6, 1, 4, 2, 5]
    m = sum(lengths)
    step = torch.cat([torch.arange(n) for n in lengths])
    return LogView(torch.randn(m, 4, generator=gen, dtype=F64),
                   torch.randint(0, 3, (m,), generator=gen),
                   torch.empty(m, dtype=F64).uniform_(0.1, 1.0, generator=gen).log(),
                   torch.randn(m, generator=gen, dtype=F64) + 0.5, step, step == 0, None)


# greedy-critic refuses `discounted` (tests/test_greedy_critic.py): its Q̂ carries no γ^t.
@pytest.mark.parametrize("name", [n for n in sorted(ESTIMATORS)
                                  if ESTIMATORS[n].unit == "step" and not ESTIMATORS[n].greedy])
def test_discount_weighting_reaches_the_loss(name: str) -> None:
    # The option acts where a step estimator's rows are made (whole episodes → rows): the
    # row's target (G_t, or the critic's Q̂_t) and its baseline are multiplied by γ^t.
    # Expected values by hand: a loop over each episode's rewards (G_t) and the value V = 0.3·t
    # as the critic (Q̂_t = r_t + γ V(s_{t+1}), 0 after the last step), b(s_t) = 0.2.
    policy, episodes = CategoricalPolicy(4, 3, (8,)).double(), _episodes()
    gamma = 0.8

    def value(v: LogView) -> Tensor:
        return 0.3 * v.step.double()

    def baseline_of(v: LogView) -> Tensor:
        return torch.full_like(v.reward, 0.2)

    rew, step, start = episodes.reward.tolist(), episodes.step.tolist(), episodes.episode_start
    target, m = [0.0] * len(rew), len(rew)
    for i in reversed(range(m)):
        last = i == m - 1 or bool(start[i + 1])
        if ESTIMATORS[name].critic:
            target[i] = rew[i] + (0.0 if last else gamma * 0.3 * step[i + 1])
        else:
            target[i] = rew[i] + (0.0 if last else gamma * target[i + 1])
    losses = {}
    for weighting in ("undiscounted", "discounted"):
        config = _config(name, gamma=gamma, discount_weighting=DiscountWeighting(weighting))
        view = training_view(episodes, config, discounted_baseline(baseline_of, config), value)
        rows = view.rows(torch.arange(view.n_rows), as_steps=True)
        with torch.no_grad():
            losses[weighting], _ = train.surrogate(policy, rows, config)
            ratio = (policy.log_prob(rows.obs, rows.action) - rows.behavior_logp).exp()
        factor = torch.tensor([gamma ** t if weighting == "discounted" else 1.0 for t in step],
                              dtype=F64)
        expected = -(factor * ratio * (torch.tensor(target, dtype=F64) - 0.2)).mean()
        torch.testing.assert_close(losses[weighting], expected, rtol=1e-12, atol=1e-14)
    assert abs(float(losses["discounted"] - losses["undiscounted"])) > 1e-3
    # auto keeps what the trainer always did for step estimators: no γ^t.
    auto = _config(name, gamma=gamma)
    view = training_view(episodes, auto, baseline_of, value)
    with torch.no_grad():
        loss_auto, _ = train.surrogate(policy, view.rows(torch.arange(view.n_rows),
                                                         as_steps=True), auto)
    torch.testing.assert_close(loss_auto, losses["undiscounted"], rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("name", [n for n in sorted(ESTIMATORS) if ESTIMATORS[n].unit == "episode"])
def test_episode_estimators_refuse_undiscounted(name: str) -> None:
    config = _config(name, discount_weighting=DiscountWeighting.UNDISCOUNTED)
    with pytest.raises(ValueError, match=f"discount_weighting=undiscounted .* {name} estimator"):
        train.surrogate_options(config)
    train.surrogate_options(_config(name, discount_weighting=DiscountWeighting.DISCOUNTED))


def test_critic_lambda_reaches_the_loss_and_only_the_critic_takes_it() -> None:
    # λ = 1 makes the critic's rows G_t (by hand, as in test_discount_weighting_reaches_the_loss)
    # whatever V is; λ = 0 the one-step target: the loss differs.
    policy, episodes = CategoricalPolicy(4, 3, (8,)).double(), _episodes()

    def value(v: LogView) -> Tensor:
        return 0.3 * v.step.double()

    rew, start = episodes.reward.tolist(), episodes.episode_start
    returns = [0.0] * len(rew)
    for i in reversed(range(len(rew))):
        last = i == len(rew) - 1 or bool(start[i + 1])
        returns[i] = rew[i] + (0.0 if last else 0.8 * returns[i + 1])
    losses = []
    for lam in (1.0, 0.0):
        config = _config("critic", gamma=0.8, critic_lambda=lam)
        rows = training_view(episodes, config, None, value)
        losses.append(train.surrogate(policy, rows.rows(torch.arange(rows.n_rows),
                                                        as_steps=True), config)[0].detach())
        if lam == 1.0:
            torch.testing.assert_close(rows.reward, torch.tensor(returns, dtype=F64))
    assert abs(float(losses[0] - losses[1])) > 1e-3
    for name in sorted(set(ESTIMATORS) - {"critic"}):
        with pytest.raises(ValueError, match=f"critic_lambda=0.5 is not supported by the {name}"):
            train.surrogate_options(_config(name, critic_lambda=0.5))
