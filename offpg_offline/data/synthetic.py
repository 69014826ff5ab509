"""Synthetic logs with known propensities, from gymnasium classic-control environments.

Each shipped log (`datasets/<name>/`, made by `scripts/make_datasets.py`) is defined here: the
behavior policy π_β as a small class with exact `log_prob(obs, action)`, the environment, the
number of episodes and the seed. A batch of episodes is rolled out in lock-step in one
gymnasium vector environment, one sub-environment per episode, so a few hundred episodes take
seconds. The same seed gives the same log, bit for bit.

The log-probabilities are computed in float64 from the float32 observation and the float32
action that are stored, then rounded to float32 (the `logged_logp` column type), so anyone can
recompute them from the dataset alone.

Policies:
    `EpsilonGreedyController`: a linear threshold controller h(s) = 1[w·s > 0] on two actions,
    mixed with uniform random actions: π_β(a|s) = (1 − ε)·1[a = h(s)] + ε/2.
    `TruncatedGaussianController`: a swing-up / PD torque controller μ(s), clipped to the action
    bounds, plus Gaussian noise truncated to the bounds [lo, hi]:
    π_β(a|s) = N(a; μ, σ²) / (Φ((hi − μ)/σ) − Φ((lo − μ)/σ)) on [lo, hi], 0 outside.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import pyarrow as pa

F64 = np.float64


class BehaviorPolicy(Protocol):
    """What a rollout needs from π_β: samples with their exact log-probabilities."""

    def sample(self, obs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Return (action, log π_β(action|obs)) for a batch of observations [N, d_obs]."""
        ...

    def log_prob(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        """log π_β(action|obs) in float64, [N]."""
        ...

    def greedy(self, obs: np.ndarray) -> np.ndarray:
        """The most likely action (discrete) or the mean action (continuous)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Plain-type description for the dataset card."""
        ...


@dataclass(frozen=True, slots=True)
class EpsilonGreedyController:
    """ε-mixture of a linear threshold controller and uniform random actions (2 actions).

        h(s) = 1[w·s > 0],    π_β(a|s) = (1 − ε)·1[a = h(s)] + ε/2

    so the controller's action has probability 1 − ε/2 and the other action ε/2.

    Attributes:
        weights: w, one weight per observation dimension.
        epsilon: ε in [0, 1], the probability of replacing h(s) by a uniform random action.
        summary: one line for the card saying what the controller does.
    """

    weights: tuple[float, ...]
    epsilon: float
    summary: str = ""

    def __post_init__(self) -> None:
        if not 0.0 < self.epsilon <= 1.0:
            raise ValueError(f"epsilon must lie in (0, 1], got {self.epsilon}")

    def greedy(self, obs: np.ndarray) -> np.ndarray:
        """h(s) for each row of `obs` [N, d], as int64 [N]."""
        score = np.asarray(obs, dtype=F64) @ np.asarray(self.weights, dtype=F64)
        return (score > 0).astype(np.int64)

    def probs(self, obs: np.ndarray) -> np.ndarray:
        """π_β(·|s) as a float64 array [N, 2]."""
        chosen = self.greedy(obs)
        out = np.full((len(chosen), 2), self.epsilon / 2, dtype=F64)
        out[np.arange(len(chosen)), chosen] = 1.0 - self.epsilon / 2
        return out

    def log_prob(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        """log π_β(a|s) in float64, [N]."""
        action = np.asarray(action, dtype=np.int64)
        return np.log(self.probs(obs)[np.arange(len(action)), action])

    def sample(self, obs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw a ~ π_β(·|s) for each row; returns (action int64 [N], log-prob float64 [N])."""
        n = len(obs)
        explore = rng.random(n) < self.epsilon
        random_action = rng.integers(0, 2, size=n)
        action = np.where(explore, random_action, self.greedy(obs)).astype(np.int64)
        return action, self.log_prob(obs, action)

    def describe(self) -> dict[str, Any]:
        """Card entry: the formula and its parameters."""
        return {
            "kind": "epsilon-greedy linear controller",
            "formula": "pi(a|s) = (1 - eps) * 1[a = h(s)] + eps / 2,  h(s) = 1[w . s > 0]",
            "weights": list(self.weights),
            "epsilon": self.epsilon,
            "p_controller_action": 1.0 - self.epsilon / 2,
            "summary": self.summary,
        }


_ERFC = np.frompyfunc(math.erfc, 1, 1)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    """Φ(x) = erfc(−x/√2)/2 in float64, accurate in both tails (libm's erfc, element-wise)."""
    return 0.5 * _ERFC(-np.asarray(x, dtype=F64) / math.sqrt(2.0)).astype(F64)


@dataclass(frozen=True, slots=True)
class TruncatedGaussianController:
    """Pendulum torque controller with Gaussian noise truncated to the action bounds.

    The mean is an energy-pumping swing-up far from the top and a PD law near it, clipped to
    [lo, hi]. With θ = atan2(sin θ, cos θ) (0 = upright) and E = θ̇²/2 + 15·cos θ (the
    pendulum's energy per unit inertia; 15 = 3g/2l, so E = 15 upright at rest):

        μ(s) = clip(−k_p·θ − k_d·θ̇, lo, hi)             if cos θ > c_top
        μ(s) = clip(k_e·(15 − E)·sign(θ̇), lo, hi)        otherwise

    The action is drawn from N(μ, σ²) restricted to [lo, hi] (rejection sampling, exact), so

        log π_β(a|s) = log N(a; μ, σ²) − log(Φ((hi − μ)/σ) − Φ((lo − μ)/σ))  for a in [lo, hi].

    No action is clipped after sampling: the density above is the density of what was logged.

    Attributes:
        energy_gain: k_e. kp, kd: PD gains. top_cos: c_top. sigma: σ. low, high: the bounds.
    """

    energy_gain: float
    kp: float
    kd: float
    top_cos: float
    sigma: float
    low: float = -2.0
    high: float = 2.0
    summary: str = ""

    def __post_init__(self) -> None:
        if self.sigma <= 0 or not self.low < self.high:
            raise ValueError(f"need sigma > 0 and low < high, got sigma {self.sigma}, "
                             f"bounds [{self.low}, {self.high}]")

    def mean(self, obs: np.ndarray) -> np.ndarray:
        """μ(s) in float64, [N]."""
        obs = np.asarray(obs, dtype=F64)
        cos, sin, velocity = obs[:, 0], obs[:, 1], obs[:, 2]
        angle = np.arctan2(sin, cos)
        energy = 0.5 * velocity**2 + 15.0 * cos
        swing = self.energy_gain * (15.0 - energy) * np.where(velocity >= 0, 1.0, -1.0)
        balance = -(self.kp * angle + self.kd * velocity)
        return np.clip(np.where(cos > self.top_cos, balance, swing), self.low, self.high)

    def greedy(self, obs: np.ndarray) -> np.ndarray:
        """The mean action μ(s) as float32 [N, 1]."""
        return self.mean(obs).astype(np.float32)[:, None]

    def log_prob(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        """log π_β(a|s) in float64, [N]; −inf outside [low, high]."""
        a = np.asarray(action, dtype=F64).reshape(len(obs))
        mu, sigma = self.mean(obs), self.sigma
        mass = _normal_cdf((self.high - mu) / sigma) - _normal_cdf((self.low - mu) / sigma)
        z = (a - mu) / sigma
        logp = -0.5 * z**2 - math.log(sigma) - 0.5 * math.log(2 * math.pi) - np.log(mass)
        return np.where((a >= self.low) & (a <= self.high), logp, -np.inf)

    def sample(self, obs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw a ~ π_β(·|s); returns (action float32 [N, 1], log-prob float64 [N]).

        Rejection sampling: draw N(μ, σ²) until the draw lies in [low, high]. Because μ is
        inside the bounds, each draw is accepted with probability ≥ 1/2.
        """
        mu = self.mean(obs)
        action = np.empty(len(mu), dtype=np.float32)
        pending = np.arange(len(mu))
        while len(pending):
            draw = (mu[pending] + self.sigma * rng.standard_normal(len(pending))).astype(np.float32)
            ok = (draw >= self.low) & (draw <= self.high)
            action[pending[ok]] = draw[ok]
            pending = pending[~ok]
        return action[:, None], self.log_prob(obs, action)

    def describe(self) -> dict[str, Any]:
        """Card entry: the formula, the parameters and how bounds are treated."""
        return {
            "kind": "truncated-Gaussian torque controller",
            "mean": "mu(s) = clip(-kp*theta - kd*theta_dot, lo, hi) if cos(theta) > top_cos, "
            "else clip(energy_gain * (15 - E) * sign(theta_dot), lo, hi), "
            "E = theta_dot^2/2 + 15*cos(theta)",
            "density": "N(a; mu, sigma^2) / (Phi((hi - mu)/sigma) - Phi((lo - mu)/sigma)) "
            "on [lo, hi], 0 outside",
            "bounds": "actions are sampled from the Gaussian truncated to [lo, hi] (rejection "
            "sampling); no action is clipped after sampling, so logged_logp is the exact density "
            "of the logged action; the mean mu is clipped to [lo, hi] before the noise is added",
            "energy_gain": self.energy_gain,
            "kp": self.kp,
            "kd": self.kd,
            "top_cos": self.top_cos,
            "sigma": self.sigma,
            "low": self.low,
            "high": self.high,
            "summary": self.summary,
        }


@dataclass(frozen=True, slots=True)
class Log:
    """A logged batch of whole episodes, rows contiguous per episode and ordered by step.

    Arrays have M rows: episode_id int64, step int32, obs/next_obs float32 [M, d],
    action int64 [M] or float32 [M, k], reward float32, terminated/truncated bool,
    logp float64 (exact log π_β(a_t|s_t); rounded to float32 when written).
    """

    episode_id: np.ndarray
    step: np.ndarray
    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    logp: np.ndarray

    @property
    def n_steps(self) -> int:
        """Number of rows."""
        return len(self.episode_id)

    @property
    def n_episodes(self) -> int:
        """Number of episodes."""
        return int((self.step == 0).sum())

    def episode_bounds(self) -> np.ndarray:
        """Row offsets [E + 1]: episode e is rows bounds[e]:bounds[e + 1]."""
        starts = np.flatnonzero(self.step == 0)
        return np.append(starts, self.n_steps)

    def returns(self) -> np.ndarray:
        """Undiscounted return of each episode (float64 sums of the float32 rewards), [E]."""
        bounds = self.episode_bounds()
        return np.add.reduceat(self.reward.astype(F64), bounds[:-1])

    def tables(
        self, *, episodes_per_chunk: int = 100, with_logp: bool = True
    ) -> Iterator[pa.Table]:
        """Yield `pyarrow.Table` chunks of whole episodes in the canonical schema.

        Args:
            episodes_per_chunk: episodes per table.
            with_logp: write `logged_logp` (False leaves the column null).
        """
        from offpg_offline.data.schema import steps_table

        bounds = self.episode_bounds()
        for first in range(0, len(bounds) - 1, episodes_per_chunk):
            rows = slice(bounds[first], bounds[min(first + episodes_per_chunk, len(bounds) - 1)])
            yield steps_table(
                episode_id=self.episode_id[rows],
                step=self.step[rows],
                obs=self.obs[rows],
                action=self.action[rows],
                reward=self.reward[rows],
                next_obs=self.next_obs[rows],
                terminated=self.terminated[rows],
                truncated=self.truncated[rows],
                logged_logp=self.logp[rows].astype(np.float32) if with_logp else None,
            )


def rollout(
    env_id: str, policy: BehaviorPolicy, *, episodes: int, seed: int, max_steps: int | None = None
) -> Log:
    """Roll out `episodes` episodes of `policy` in `env_id`, all in lock-step, and log them.

    One vector environment holds one sub-environment per episode (CartPole's own vectorised
    implementation when gymnasium registers one, else a synchronous vector of single envs);
    each sub-environment runs exactly one episode, and steps after its end are discarded.
    Episode e is the e-th sub-environment, reset with `seed` (so the log depends only on
    `seed`); the policy draws from `numpy.random.default_rng(seed)`.

    Args:
        env_id: a registered gymnasium id, e.g. "CartPole-v1".
        policy: π_β.
        episodes: number of episodes.
        seed: seeds the environments and the policy's random draws.
        max_steps: time limit; defaults to the spec's `max_episode_steps`.

    Returns:
        The log, episodes in order 0..episodes−1.
    """
    spec = gym.spec(env_id)
    limit = max_steps or spec.max_episode_steps
    if limit is None:
        raise ValueError(f"{env_id} has no max_episode_steps; pass max_steps")
    mode = "vector_entry_point" if spec.vector_entry_point else "sync"
    env = gym.make_vec(env_id, num_envs=episodes, vectorization_mode=mode)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    active = np.ones(episodes, dtype=bool)
    columns: dict[str, list[np.ndarray]] = {k: [] for k in (
        "episode_id", "step", "obs", "action", "reward", "next_obs", "terminated", "truncated",
        "logp")}
    try:
        for t in range(limit):
            action, logp = policy.sample(obs, rng)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            truncated = truncated | ((t + 1 == limit) & ~terminated)
            rows = np.flatnonzero(active)
            for key, value in (("episode_id", rows), ("step", np.full(len(rows), t)),
                               ("obs", obs), ("action", action), ("reward", reward),
                               ("next_obs", next_obs), ("terminated", terminated),
                               ("truncated", truncated), ("logp", logp)):
                columns[key].append(value if key in ("episode_id", "step") else value[rows])
            active &= ~(terminated | truncated)
            if not active.any():
                break
            obs = next_obs
    finally:
        env.close()
    flat = {k: np.concatenate(v) for k, v in columns.items()}
    order = np.lexsort((flat["step"], flat["episode_id"]))
    return Log(
        episode_id=flat["episode_id"][order].astype(np.int64),
        step=flat["step"][order].astype(np.int32),
        obs=flat["obs"][order].astype(np.float32),
        action=flat["action"][order],
        reward=flat["reward"][order].astype(np.float32),
        next_obs=flat["next_obs"][order].astype(np.float32),
        terminated=flat["terminated"][order].astype(bool),
        truncated=flat["truncated"][order].astype(bool),
        logp=flat["logp"][order].astype(F64),
    )


def greedy_returns(env_id: str, policy: BehaviorPolicy, *, episodes: int, seed: int) -> np.ndarray:
    """Returns of the deterministic policy s ↦ `policy.greedy(s)` over seeded episodes, [E]."""

    @dataclass(frozen=True)
    class _Greedy:
        def sample(self, obs: np.ndarray, rng: np.random.Generator) -> tuple[Any, Any]:
            return policy.greedy(obs), np.zeros(len(obs))

    return rollout(env_id, _Greedy(), episodes=episodes, seed=seed).returns()  # type: ignore[arg-type]


# --- the shipped logs ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """One shipped log: environment, behavior policy, size and seed.

    `with_logp=False` writes the same log with `logged_logp` null (`propensities_in` names the
    log that holds the true values).
    """

    name: str
    env_id: str
    policy: BehaviorPolicy
    episodes: int
    seed: int
    description: str
    with_logp: bool = True
    propensities_in: str | None = None
    greedy_episodes: int = 100
    extra: Mapping[str, Any] = field(default_factory=dict)


# A PD law on pole angle and angular velocity plus small cart terms; alone it scores 500 on
# every seeded episode we measured (make_datasets.py records the figure in the card).
CARTPOLE_HEURISTIC = (0.05, 0.3, 3.0, 1.0)

SYNTHETIC: Mapping[str, SyntheticSpec] = MappingProxyType({
    "cartpole-eps": SyntheticSpec(
        name="cartpole-eps",
        env_id="CartPole-v1",
        policy=EpsilonGreedyController(
            CARTPOLE_HEURISTIC, epsilon=0.5,
            summary="h(s) = 1[0.05 x + 0.3 x_dot + 3 theta + theta_dot > 0] (push toward the "
            "side the pole falls to); with eps = 0.5 it plays h(s) with probability 0.75"),
        episodes=300,
        seed=0,
        description="CartPole-v1 log of an epsilon-mixture (eps = 0.5) of a good heuristic "
        "controller and uniform random actions, with the exact behavior log-probabilities.",
    ),
    "cartpole-eps-noprop": SyntheticSpec(
        name="cartpole-eps-noprop",
        env_id="CartPole-v1",
        policy=EpsilonGreedyController(
            CARTPOLE_HEURISTIC, epsilon=0.5,
            summary="same behavior as cartpole-eps"),
        episodes=300,
        seed=0,
        with_logp=False,
        propensities_in="cartpole-eps",
        description="The cartpole-eps log without propensities (logged_logp is null), for "
        "behavior fitting; the true log-probabilities are in datasets/cartpole-eps.",
    ),
    "cartpole-weak": SyntheticSpec(
        name="cartpole-weak",
        env_id="CartPole-v1",
        policy=EpsilonGreedyController(
            (0.0, -1.0, 0.0, 0.0), epsilon=0.6,
            summary="h(s) = 1[-x_dot > 0]: pushes against the cart's velocity and ignores the "
            "pole, so its most likely action is often wrong; with eps = 0.6 it plays h(s) with "
            "probability 0.7 and the other action with probability 0.3"),
        episodes=400,
        seed=1,
        description="CartPole-v1 log of a weak controller (uses only the cart velocity) mixed "
        "with uniform random actions (eps = 0.6): imitating its most likely action scores "
        "poorly, while good actions keep probability 0.3, so importance-weighted improvement "
        "has something to find. Exact behavior log-probabilities.",
    ),
    "pendulum-gauss": SyntheticSpec(
        name="pendulum-gauss",
        env_id="Pendulum-v1",
        policy=TruncatedGaussianController(
            energy_gain=1.0, kp=3.0, kd=0.5, top_cos=0.8, sigma=1.0,
            summary="energy-pumping swing-up with a PD law near the top whose gains are too "
            "weak to hold the pendulum up (mediocre), plus truncated Gaussian noise sigma = 1"),
        episodes=150,
        seed=2,
        description="Pendulum-v1 log of a mediocre swing-up/PD controller with Gaussian noise "
        "truncated to the action bounds [-2, 2]; exact behavior log-densities.",
    ),
})


def _env_spec_json(env_id: str) -> dict[str, Any]:
    import json

    spec = json.loads(gym.spec(env_id).to_json())
    return {k: spec[k] for k in ("id", "entry_point", "max_episode_steps", "reward_threshold",
                                 "kwargs") if k in spec}


def make_synthetic(
    name: str, out: Path, *, overwrite: bool = False, progress: Callable[[str], None] | None = None
) -> Path:
    """Roll out the shipped log `name` (a key of `SYNTHETIC`) and write it to `out`.

    The card records the behavior policy and its parameters, the env spec, the log's measured
    mean return and the greedy controller's mean return over `greedy_episodes` fresh episodes.

    Returns:
        The dataset folder.
    """
    from offpg_offline.data.spaces import space_to_json
    from offpg_offline.data.store import write_dataset

    spec = SYNTHETIC[name]
    log = rollout(spec.env_id, spec.policy, episodes=spec.episodes, seed=spec.seed)
    greedy_seed = spec.seed + 10_000
    greedy = greedy_returns(spec.env_id, spec.policy, episodes=spec.greedy_episodes,
                            seed=greedy_seed)
    returns = log.returns()
    env = gym.make(spec.env_id)
    try:
        observation_space, action_space = env.observation_space, env.action_space
    finally:
        env.close()
    if spec.with_logp:
        propensity: dict[str, Any] = {
            "logged_logp": {"source": f"exact log pi_beta(a|s) of the behavior policy "
                            f"(offpg_offline.data.synthetic, {name})"},
            "estimated_logp": None,
        }
    else:
        propensity = {"logged_logp": None, "estimated_logp": None}
    card = {
        "name": name,
        "description": spec.description,
        "observation_space": space_to_json(observation_space),
        "action_space": space_to_json(action_space),
        "env_spec": _env_spec_json(spec.env_id),
        "source": {
            "generator": "offpg_offline.data.synthetic.make_synthetic",
            "name": name,
            "seed": spec.seed,
            "episodes": spec.episodes,
            "gymnasium_version": gym.__version__,
            **({"propensities_in": spec.propensities_in} if spec.propensities_in else {}),
        },
        "behavior": {
            **spec.policy.describe(),
            "mean_return": float(returns.mean()),
            "std_return": float(returns.std()),
            "greedy_mean_return": float(greedy.mean()),
            "greedy_std_return": float(greedy.std()),
            "greedy_episodes": spec.greedy_episodes,
            "greedy_seed": greedy_seed,
        },
        "propensity": propensity,
    }
    if progress is not None:
        progress(f"{name}: {log.n_episodes} episodes, {log.n_steps} steps, mean return "
                 f"{returns.mean():.1f} (greedy {greedy.mean():.1f})")
    return write_dataset(out, log.tables(with_logp=spec.with_logp), card=card,
                         overwrite=overwrite)


# --- a tiny tabular MDP, for tests with exact answers --------------------------------------


@dataclass(frozen=True, slots=True)
class TabularMDP:
    """A finite-horizon tabular MDP with one-hot observations.

    Attributes:
        transition: P[s, a, s'] float64 [S, A, S], rows sum to 1.
        reward: r(s, a) float64 [S, A].
        initial: initial state distribution [S].
        horizon: every episode lasts exactly `horizon` steps and ends truncated.
    """

    transition: np.ndarray
    reward: np.ndarray
    initial: np.ndarray
    horizon: int

    @staticmethod
    def chain(n_states: int = 4, horizon: int = 3, slip: float = 0.1) -> TabularMDP:
        """A chain: action 1 moves right, 0 left (each slips with prob `slip`); reward 1 for
        taking action 1 in the right-most state."""
        transition = np.zeros((n_states, 2, n_states))
        for s in range(n_states):
            left, right = max(s - 1, 0), min(s + 1, n_states - 1)
            transition[s, 0, left] += 1 - slip
            transition[s, 0, right] += slip
            transition[s, 1, right] += 1 - slip
            transition[s, 1, left] += slip
        reward = np.zeros((n_states, 2))
        reward[-1, 1] = 1.0
        initial = np.zeros(n_states)
        initial[0] = 1.0
        return TabularMDP(transition, reward, initial, horizon)

    def value(self, policy: np.ndarray, gamma: float = 1.0) -> float:
        """Exact J(π) = E[Σ_{t<H} γ^t r(s_t, a_t)] for a tabular policy π[s, a], by dynamic
        programming."""
        state_dist, total = self.initial.astype(F64), 0.0
        for t in range(self.horizon):
            joint = state_dist[:, None] * policy
            total += gamma**t * float((joint * self.reward).sum())
            state_dist = np.einsum("sa,sat->t", joint, self.transition)
        return total

    def rollout(self, policy: np.ndarray, *, episodes: int, seed: int) -> Log:
        """Log `episodes` episodes of the tabular policy π[s, a] (rows sum to 1), with exact
        log π(a|s), vectorised over episodes."""
        rng = np.random.default_rng(seed)
        n_states = len(self.initial)
        eye = np.eye(n_states, dtype=np.float32)
        state = rng.choice(n_states, size=episodes, p=self.initial)
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("s", "a", "r", "s2")}
        for _ in range(self.horizon):
            u = rng.random(episodes)
            action = (u[:, None] > np.cumsum(policy[state], axis=1)).sum(axis=1)
            action = np.minimum(action, policy.shape[1] - 1)
            v = rng.random(episodes)
            next_state = (v[:, None] > np.cumsum(self.transition[state, action], axis=1)).sum(1)
            next_state = np.minimum(next_state, n_states - 1)
            for key, value in (("s", state), ("a", action), ("r", self.reward[state, action]),
                               ("s2", next_state)):
                cols[key].append(value)
            state = next_state
        s, a, r, s2 = (np.stack(cols[k], axis=1).reshape(-1) for k in ("s", "a", "r", "s2"))
        step = np.tile(np.arange(self.horizon, dtype=np.int32), episodes)
        last = step == self.horizon - 1
        return Log(
            episode_id=np.repeat(np.arange(episodes, dtype=np.int64), self.horizon),
            step=step,
            obs=eye[s],
            action=a.astype(np.int64),
            reward=r.astype(np.float32),
            next_obs=eye[s2],
            terminated=np.zeros(len(s), dtype=bool),
            truncated=last,
            logp=np.log(policy[s, a]),
        )
