"""Online evaluation of a policy in a gymnasium environment, when one can be built.

`evaluate_online` runs seeded episodes (episode i resets with `seed + i`) with either the
policy's mode (greedy) or its samples (stochastic, from a torch generator seeded per episode),
so a result is reproducible and the two deployments can be compared: they can differ by
hundreds on CartPole. Dict/Tuple observations are flattened with `gymnasium.spaces.flatten`,
as the dataset ingest does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from offpg_offline.data.envspec import build_env


@dataclass(frozen=True, slots=True)
class OnlineResult:
    """Returns of seeded episodes: the undiscounted return Σ_t r_t (mean, population std, each
    value) and the discounted return Σ_t γ^t r_t with the `gamma` given to `evaluate_online`
    (the quantity OPE estimates, J(π) = E_π[Σ_t γ^t r_t]), with its mean and population std."""

    mean: float
    std: float
    returns: tuple[float, ...]
    lengths: tuple[int, ...] = ()
    gamma: float = 1.0
    discounted_mean: float = float("nan")
    discounted_std: float = float("nan")
    discounted_returns: tuple[float, ...] = ()


class EnvUnavailableWarning(UserWarning):
    """Emitted by `make_env` when the environment cannot be built (unknown id, missing deps)."""


def try_make_env(env_id_or_spec: Any) -> tuple[gym.Env | None, str | None]:
    """Build an environment, or say in one sentence why it cannot be built
    (`data.envspec.build_env`: a card's full `env_spec`, kwargs included, is built as recorded).

    Args:
        env_id_or_spec: a gymnasium id (`"CartPole-v1"`), an `EnvSpec` or its JSON, or a
            dataset card's `env_spec` dict (at least `"id"`; optional `"kwargs"`,
            `"max_episode_steps"`, and `"entry_point"`, used when the id is not registered).

    Returns:
        `(env, None)` on success, `(None, reason)` otherwise.
    """
    return build_env(env_id_or_spec)


def make_env(env_id_or_spec: Any) -> gym.Env | None:
    """`try_make_env` that returns None and emits an `EnvUnavailableWarning` with the reason."""
    env, reason = try_make_env(env_id_or_spec)
    if env is None:
        warnings.warn(reason or "environment unavailable", EnvUnavailableWarning, stacklevel=2)
    return env


def _flat(space: gym.Space, obs: Any) -> np.ndarray:
    if isinstance(space, gym.spaces.Dict | gym.spaces.Tuple):
        return np.asarray(gym.spaces.flatten(space, obs), dtype=np.float32)
    return np.asarray(obs, dtype=np.float32).reshape(-1)


def _to_env_action(space: gym.Space, action: torch.Tensor) -> Any:
    if isinstance(space, gym.spaces.Discrete):  # Discrete(n, start) is offset; policies from 0
        return int(action.item()) + int(space.start)
    value = action.detach().cpu().numpy().astype(space.dtype or np.float32).reshape(space.shape)
    if isinstance(space, gym.spaces.Box):  # an unsquashed Gaussian can leave the box
        value = np.clip(value, space.low, space.high)
    return value


def check_fits(policy: nn.Module, env: gym.Env) -> None:
    """Refuse an environment whose flattened observation size, discrete action count or Box
    action size differs from the policy's (the log's), e.g. `--env Acrobot-v1` for a CartPole
    policy.

    Raises:
        ValueError: one sentence naming the env and both sizes.
    """
    name = env.spec.id if env.spec is not None else type(env).__name__
    obs_dim = getattr(policy, "obs_dim", None)
    env_dim = gym.spaces.flatdim(env.observation_space)
    if obs_dim is not None and int(obs_dim) != env_dim:
        raise ValueError(f"environment {name} gives observations of {env_dim} numbers but the "
                         f"policy takes {int(obs_dim)} (the log's): evaluate it in the "
                         "environment the log came from")
    n_actions = getattr(policy, "n_actions", None)
    space = env.action_space
    if n_actions is not None and isinstance(space, gym.spaces.Discrete) and int(space.n) != int(
            n_actions):
        raise ValueError(f"environment {name} has {int(space.n)} actions but the policy chooses "
                         f"among {int(n_actions)} (the log's): evaluate it in the environment the "
                         "log came from")
    action_dim = getattr(policy, "action_dim", None)
    if action_dim is not None and isinstance(space, gym.spaces.Box) and int(
            np.prod(space.shape)) != int(action_dim):
        raise ValueError(f"environment {name} takes actions of {int(np.prod(space.shape))} "
                         f"numbers but the policy gives {int(action_dim)} (the log's): evaluate it "
                         "in the environment the log came from")


def evaluate_online(
    policy: nn.Module,
    env_id: Any,
    *,
    episodes: int = 10,
    seed: int = 0,
    deterministic: bool = True,
    max_steps: int | None = None,
    gamma: float = 1.0,
) -> OnlineResult:
    """Mean and std of the undiscounted and the γ-discounted return of `policy` over seeded
    episodes.

    Episode i resets the environment with `seed + i`; the stochastic policy draws its actions
    from a `torch.Generator` seeded with `seed + i`, so each episode is reproducible on its own.

    Args:
        policy: a module with `mode(obs)` and `sample(obs, generator)` taking `[1, d_obs]`.
        env_id: a gymnasium id, env spec / card `env_spec` dict, or an already built `gym.Env`
            (which is not closed here).
        episodes: number of episodes.
        seed: first reset seed.
        deterministic: use the mode (greedy) if True, samples if False.
        max_steps: optional cap on steps per episode on top of the env's own time limit.
        gamma: discount of the discounted return Σ_t γ^t r_t (t from 0), in [0, 1]; pass the γ
            the OPE estimates use so that both are in the same units.

    Returns:
        An `OnlineResult`.

    Raises:
        ValueError: if the environment cannot be built, or its observations or discrete
            actions do not fit the policy (`check_fits`; the message says why).
    """
    if episodes <= 0:
        raise ValueError(f"episodes must be positive, got {episodes}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    own_env = not isinstance(env_id, gym.Env)
    if own_env:
        env, reason = try_make_env(env_id)
        if env is None:
            raise ValueError(reason)
    else:
        env = env_id
    try:
        check_fits(policy, env)
    except ValueError:
        if own_env:
            env.close()
        raise
    returns, discounted, lengths = [], [], []
    actor: Any = policy  # any module with mode/sample (nn.Module's typing hides them)
    was_training = policy.training
    policy.eval()
    try:
        with torch.no_grad():
            for episode in range(episodes):
                generator = torch.Generator().manual_seed(seed + episode)
                obs, _ = env.reset(seed=seed + episode)
                total, total_discounted, discount, steps, done = 0.0, 0.0, 1.0, 0, False
                while not done:
                    state = torch.from_numpy(_flat(env.observation_space, obs)).unsqueeze(0)
                    if deterministic:
                        action = actor.mode(state)
                    else:
                        action = actor.sample(state, generator)
                    obs, reward, terminated, truncated, _ = env.step(
                        _to_env_action(env.action_space, action[0])
                    )
                    total += float(reward)
                    total_discounted += discount * float(reward)
                    discount *= gamma
                    steps += 1
                    done = terminated or truncated or (max_steps is not None and steps >= max_steps)
                returns.append(total)
                discounted.append(total_discounted)
                lengths.append(steps)
    finally:
        policy.train(was_training)
        if own_env:
            env.close()
    values = np.asarray(returns, dtype=np.float64)
    discounted_values = np.asarray(discounted, dtype=np.float64)
    return OnlineResult(
        mean=float(values.mean()),
        std=float(values.std()),
        returns=tuple(returns),
        lengths=tuple(lengths),
        gamma=float(gamma),
        discounted_mean=float(discounted_values.mean()),
        discounted_std=float(discounted_values.std()),
        discounted_returns=tuple(discounted),
    )
