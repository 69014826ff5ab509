"""Online evaluation: a known controller's return, a slow reference loop, seeds, flattening."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from offpg_offline.policies import CategoricalPolicy, GaussianPolicy
from offpg_offline.rollout import EnvUnavailableWarning, evaluate_online, make_env, try_make_env


def _linear_controller(weights: list[float], scale: float = 100.0) -> CategoricalPolicy:
    """A CartPole controller as a policy: push right iff w·s > 0 (logit gap scale·w·s)."""
    policy = CategoricalPolicy(4, 2, hidden=())
    with torch.no_grad():
        linear = policy.net[0]
        linear.weight.copy_(torch.tensor([[0.0] * 4, weights]) * scale)
        linear.bias.zero_()
    return policy


def test_balancing_controller_scores_the_cartpole_maximum() -> None:
    # θ + 0.5 θ̇ + 0.01 x + 0.1 ẋ > 0 balances the pole for the 500-step limit from every start
    # state of these seeds, so each return is exactly 500.
    policy = _linear_controller([0.01, 0.1, 1.0, 0.5])
    result = evaluate_online(policy, "CartPole-v1", episodes=5, seed=0, deterministic=True)
    assert result.returns == (500.0,) * 5 and result.mean == 500.0 and result.std == 0.0
    assert result.lengths == (500,) * 5


def test_greedy_returns_equal_a_plain_gymnasium_loop() -> None:
    # Slow reference: the same controller applied by hand with env.reset(seed=seed + i).
    weights = np.array([0.0, 0.0, -1.0, 0.0])  # pushes the wrong way: episodes end early
    policy = _linear_controller(weights.tolist())
    env = gym.make("CartPole-v1")
    expected = []
    for i in range(4):
        obs, _ = env.reset(seed=10 + i)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(int(weights @ obs > 0))
            total += reward
            done = terminated or truncated
        expected.append(total)
    result = evaluate_online(policy, "CartPole-v1", episodes=4, seed=10, deterministic=True)
    assert result.returns == tuple(expected)
    assert result.mean == pytest.approx(np.mean(expected))
    assert result.std == pytest.approx(np.std(expected))
    assert max(expected) < 100


def test_stochastic_evaluation_is_deterministic_for_a_seed() -> None:
    policy = _linear_controller([0.01, 0.1, 1.0, 0.5], scale=1.0)  # soft: samples vary
    first = evaluate_online(policy, "CartPole-v1", episodes=3, seed=1, deterministic=False)
    again = evaluate_online(policy, "CartPole-v1", episodes=3, seed=1, deterministic=False)
    other = evaluate_online(policy, "CartPole-v1", episodes=3, seed=2, deterministic=False)
    assert first == again
    assert first.returns != other.returns


def test_dict_observations_are_flattened() -> None:
    class DictObs(gym.ObservationWrapper):
        def __init__(self, env: gym.Env) -> None:
            super().__init__(env)
            box = env.observation_space
            self.observation_space = gym.spaces.Dict(
                {
                    "a": gym.spaces.Box(box.low[:2], box.high[:2]),
                    "b": gym.spaces.Box(box.low[2:], box.high[2:]),
                }
            )

        def observation(self, observation: np.ndarray) -> dict[str, np.ndarray]:
            return {"a": observation[:2], "b": observation[2:]}

    policy = _linear_controller([0.01, 0.1, 1.0, 0.5])
    env = DictObs(gym.make("CartPole-v1"))
    result = evaluate_online(policy, env, episodes=2, seed=0)
    assert result.returns == (500.0, 500.0)


def test_unbuildable_envs_give_none_and_a_reason() -> None:
    env, reason = try_make_env("NoSuchEnv-v0")
    assert env is None and "NoSuchEnv-v0" in reason
    env, reason = try_make_env(None)
    assert env is None and "--env" in reason
    with pytest.warns(EnvUnavailableWarning, match="NoSuchEnv-v0"):
        assert make_env("NoSuchEnv-v0") is None
    with pytest.raises(ValueError, match="NoSuchEnv-v0"):
        evaluate_online(_linear_controller([0, 0, 1, 0]), "NoSuchEnv-v0", episodes=1)


def test_card_env_spec_dict_is_built_with_its_time_limit() -> None:
    env = make_env({"id": "CartPole-v1", "max_episode_steps": 50, "kwargs": {}})
    assert env is not None and env.spec.max_episode_steps == 50
    result = evaluate_online(_linear_controller([0.01, 0.1, 1.0, 0.5]), env, episodes=1)
    assert result.returns == (50.0,)
    env.close()
    from_json, reason = try_make_env(gym.spec("CartPole-v1").to_json())  # Minari's env_spec
    assert reason is None and from_json.spec.max_episode_steps == 500
    from_json.close()


def test_discounted_return_is_the_geometric_sum_of_the_cartpole_rewards() -> None:
    # CartPole pays 1 per step, so an episode of L steps has Σ_{t<L} γ^t = (1 − γ^L)/(1 − γ):
    # a hand formula in the episode length, checked on 500-step episodes and on short ones.
    gamma = 0.9
    balanced = evaluate_online(_linear_controller([0.01, 0.1, 1.0, 0.5]), "CartPole-v1",
                               episodes=3, seed=0, gamma=gamma)
    full = (1 - gamma**500) / (1 - gamma)
    assert balanced.discounted_returns == pytest.approx((full,) * 3, rel=1e-12)
    assert balanced.discounted_mean == pytest.approx(full, rel=1e-12)
    assert balanced.discounted_std == pytest.approx(0.0, abs=1e-9)
    assert balanced.gamma == gamma and balanced.returns == (500.0,) * 3

    falling = evaluate_online(_linear_controller([0.01, 0.1, 1.0, 0.5], scale=1.0),
                              "CartPole-v1", episodes=4, seed=1, deterministic=False, gamma=0.97)
    by_hand = np.array([(1 - 0.97**n) / (1 - 0.97) for n in falling.lengths])
    assert len(set(falling.lengths)) > 1  # episodes of different lengths
    assert falling.discounted_returns == pytest.approx(tuple(by_hand), rel=1e-12)
    assert falling.discounted_mean == pytest.approx(by_hand.mean(), rel=1e-12)
    assert falling.discounted_std == pytest.approx(by_hand.std(), rel=1e-9)


def test_without_gamma_the_discounted_return_is_the_undiscounted_one() -> None:
    result = evaluate_online(_linear_controller([0.0, 0.0, -1.0, 0.0]), "CartPole-v1",
                             episodes=2, seed=3)
    assert result.discounted_returns == result.returns
    with pytest.raises(ValueError, match="gamma"):
        evaluate_online(_linear_controller([0.0, 0.0, -1.0, 0.0]), "CartPole-v1", episodes=1,
                        gamma=1.5)


@pytest.mark.parametrize(
    ("policy", "env_id", "words"),
    [
        (CategoricalPolicy(4, 2, hidden=()), "Acrobot-v1", "observations of 6 numbers"),
        (CategoricalPolicy(4, 3, hidden=()), "CartPole-v1", "has 2 actions"),
        (GaussianPolicy(3, 2, hidden=()), "Pendulum-v1", "actions of 1 numbers"),
    ],
)
def test_an_environment_that_does_not_fit_the_policy_is_refused_by_name(
    policy: torch.nn.Module, env_id: str, words: str
) -> None:
    # Acrobot: 6-number observations, 3 actions; CartPole: 4 and 2; Pendulum: 3 and a 1-D box.
    with pytest.raises(ValueError, match=f"environment {env_id} .*{words}.*the log came from"):
        evaluate_online(policy, env_id, episodes=1)
