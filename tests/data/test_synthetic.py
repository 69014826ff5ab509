"""Synthetic logs: exact propensities recomputed independently, rollout structure, determinism."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from offpg_offline.data.store import read_card
from offpg_offline.data.synthetic import (
    CARTPOLE_HEURISTIC,
    SYNTHETIC,
    EpsilonGreedyController,
    Log,
    TabularMDP,
    TruncatedGaussianController,
    greedy_returns,
    make_synthetic,
    rollout,
)


@pytest.fixture(scope="module")
def cartpole_log() -> Log:
    spec = SYNTHETIC["cartpole-eps"]
    return rollout(spec.env_id, spec.policy, episodes=30, seed=11)


@pytest.fixture(scope="module")
def pendulum_log() -> Log:
    spec = SYNTHETIC["pendulum-gauss"]
    return rollout(spec.env_id, spec.policy, episodes=4, seed=11)


def test_epsilon_mixture_logp_is_the_mixture_formula(cartpole_log) -> None:
    # Independent recomputation: h(s) = 1[w·s > 0]; π(a|s) = 1 − ε/2 if a = h(s), else ε/2.
    policy = SYNTHETIC["cartpole-eps"].policy
    assert isinstance(policy, EpsilonGreedyController)
    eps = policy.epsilon
    obs = cartpole_log.obs.astype(np.float64)
    w = np.array(CARTPOLE_HEURISTIC)
    h = (obs[:, 0] * w[0] + obs[:, 1] * w[1] + obs[:, 2] * w[2] + obs[:, 3] * w[3] > 0)
    expected = np.where(cartpole_log.action == h, math.log(1 - eps / 2), math.log(eps / 2))
    np.testing.assert_allclose(cartpole_log.logp, expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(policy.probs(obs).sum(axis=1), 1.0, rtol=0, atol=1e-15)


def test_epsilon_mixture_samples_the_controller_action_at_its_rate() -> None:
    # 20k draws at one state: the rate of h(s) is 1 − ε/2 = 0.75; 4 standard errors ≈ 0.012.
    policy = SYNTHETIC["cartpole-eps"].policy
    obs = np.tile(np.array([[0.0, 0.0, 0.05, 0.0]], dtype=np.float32), (20_000, 1))
    action, logp = policy.sample(obs, np.random.default_rng(0))
    rate = (action == 1).mean()
    assert abs(rate - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 20_000)
    np.testing.assert_array_equal(logp, np.where(action == 1, math.log(0.75), math.log(0.25)))


def test_truncated_gaussian_logp_matches_scipy(pendulum_log) -> None:
    stats = pytest.importorskip("scipy.stats")
    policy = SYNTHETIC["pendulum-gauss"].policy
    assert isinstance(policy, TruncatedGaussianController)
    mu = policy.mean(pendulum_log.obs)
    sigma = policy.sigma
    reference = stats.truncnorm.logpdf(pendulum_log.action[:, 0].astype(np.float64),
                                       (-2 - mu) / sigma, (2 - mu) / sigma, loc=mu, scale=sigma)
    np.testing.assert_allclose(pendulum_log.logp, reference, rtol=1e-10, atol=1e-12)
    assert (np.abs(pendulum_log.action) <= 2).all()


def test_truncated_gaussian_density_integrates_to_one() -> None:
    # Trapezoid rule on 40k points of [-2, 2]; its error is O(h²) ≈ 1e-8 for these smooth curves.
    policy = TruncatedGaussianController(energy_gain=1, kp=3, kd=0.5, top_cos=0.8, sigma=0.7)
    grid = np.linspace(-2, 2, 40_001)
    for obs in ([1.0, 0.0, 0.0], [0.95, 0.3, -2.0], [-1.0, 0.0, 0.5]):
        batch = np.tile(np.array([obs]), (len(grid), 1))
        density = np.exp(policy.log_prob(batch, grid))
        assert abs(np.trapezoid(density, grid) - 1) < 1e-6
    assert policy.log_prob(np.array([[1.0, 0.0, 0.0]]), np.array([2.5]))[0] == -np.inf


def test_truncated_gaussian_samples_have_the_truncated_mean() -> None:
    stats = pytest.importorskip("scipy.stats")
    policy = TruncatedGaussianController(energy_gain=1, kp=3, kd=0.5, top_cos=0.8, sigma=1.0)
    obs = np.tile(np.array([[0.95, 0.3, -2.0]]), (20_000, 1))
    mu = policy.mean(obs[:1])[0]
    action, _ = policy.sample(obs, np.random.default_rng(1))
    law = stats.truncnorm((-2 - mu), (2 - mu), loc=mu, scale=1.0)
    # 4 standard errors of the sample mean: a false alarm has probability ≈ 6e-5.
    assert abs(action.mean() - law.mean()) < 4 * law.std() / math.sqrt(len(action))


@pytest.mark.parametrize("name", ["cartpole-eps", "pendulum-gauss"])
def test_rollout_is_whole_ordered_episodes(name, cartpole_log, pendulum_log) -> None:
    log = cartpole_log if name == "cartpole-eps" else pendulum_log
    bounds = log.episode_bounds()
    lengths = np.diff(bounds)
    assert len(lengths) == log.n_episodes
    np.testing.assert_array_equal(log.episode_id, np.repeat(np.arange(len(lengths)), lengths))
    np.testing.assert_array_equal(log.step, np.concatenate([np.arange(n) for n in lengths]))
    last = np.zeros(log.n_steps, dtype=bool)
    last[bounds[1:] - 1] = True
    # One end flag per episode, on its last row; next_obs is the following row's obs.
    np.testing.assert_array_equal(log.terminated | log.truncated, last)
    np.testing.assert_array_equal(log.next_obs[~last], log.obs[1:][~last[:-1]])
    limit = 500 if name == "cartpole-eps" else 200
    np.testing.assert_array_equal(log.truncated[last], lengths == limit)


def test_same_seed_same_log_other_seed_other_log() -> None:
    spec = SYNTHETIC["cartpole-weak"]
    a = rollout(spec.env_id, spec.policy, episodes=20, seed=3)
    b = rollout(spec.env_id, spec.policy, episodes=20, seed=3)
    c = rollout(spec.env_id, spec.policy, episodes=20, seed=4)
    for field in Log.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.n_steps != c.n_steps or not np.array_equal(a.obs, c.obs)


def test_make_synthetic_is_byte_identical_across_runs(tmp_path) -> None:
    paths = [make_synthetic("cartpole-weak", tmp_path / str(i)) for i in range(2)]
    digests = [{f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in p.iterdir()}
               for p in paths]
    assert digests[0] == digests[1]
    card = read_card(paths[0])
    assert card["behavior"]["epsilon"] == 0.6
    assert card["env_spec"] == {"id": "CartPole-v1", "entry_point":
                                "gymnasium.envs.classic_control.cartpole:CartPoleEnv",
                                "max_episode_steps": 500, "reward_threshold": 475.0,
                                "kwargs": {}}


def test_cartpole_heuristic_alone_balances_for_the_whole_episode() -> None:
    # The claim behind cartpole-eps: the greedy controller scores the maximum, 500.
    returns = greedy_returns("CartPole-v1", SYNTHETIC["cartpole-eps"].policy, episodes=20,
                             seed=123)
    np.testing.assert_array_equal(returns, 500.0)


def test_tabular_log_probabilities_and_value() -> None:
    mdp = TabularMDP.chain(n_states=4, horizon=5, slip=0.1)
    behavior = np.array([[0.5, 0.5], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    log = mdp.rollout(behavior, episodes=20_000, seed=0)
    state = log.obs.argmax(axis=1)
    np.testing.assert_array_equal(log.logp, np.log(behavior[state, log.action]))
    np.testing.assert_array_equal(log.next_obs.argmax(1)[:-1][log.step[1:] != 0],
                                  state[1:][log.step[1:] != 0])
    # Monte-Carlo mean return vs exact dynamic programming, within 4 standard errors.
    returns = log.returns()
    exact = mdp.value(behavior)
    assert abs(returns.mean() - exact) < 4 * returns.std() / math.sqrt(len(returns))
    # A hand-worked value: always right, no slip, horizon 5 from state 0 of 4: rewards at t=3,4.
    assert TabularMDP.chain(4, 5, slip=0.0).value(np.tile([0.0, 1.0], (4, 1))) == 2.0
