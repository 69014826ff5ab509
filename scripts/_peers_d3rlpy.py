"""Worker of `scripts/bench_peers.py`: one d3rlpy 2.8.1 algorithm, one shipped log, one seed.

Runs INSIDE the d3rlpy venv that bench_peers creates (`.bench/d3rlpy-venv`: torch 2.13.0 CPU,
d3rlpy 2.8.1, gymnasium 1.0.0, box2d, pyarrow); it never imports offpg_offline. It reads the
log's `_dataset.json` card and `part-*.parquet` shards with pyarrow, builds
`d3rlpy.dataset.MDPDataset(observations, actions, rewards, terminals=terminated,
timeouts=truncated)`, trains the algorithm with d3rlpy's default hyperparameters (continuous
algorithms get a `MinMaxActionScaler` with the env's action bounds) on 1 torch thread, and
evaluates it online at 1/k, 2/k, ..., k/k of the steps (greedy, `algo.predict`) and at the end
stochastically (`algo.sample_action`), on the seeded episodes of offpg's
`rollout.evaluate_online`: episode i resets with `eval_seed + i`; a stochastic episode seeds
torch's global generator (which d3rlpy samples from) with `eval_seed + i`. Continuous actions
are clipped to the env's bounds before `env.step`, as offpg's rollout does.

Prints one JSON object as the last line of stdout.

The loading helpers (`read_log`, `log_arrays`) import only numpy and pyarrow, so our own venv
can test them (tests/test_bench_peers.py); d3rlpy, torch and gymnasium are imported in `main`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# d3rlpy's config class per (action kind, algorithm name).
ALGORITHMS: dict[tuple[str, str], str] = {
    ("discrete", "BC"): "DiscreteBCConfig",
    ("discrete", "CQL"): "DiscreteCQLConfig",
    ("continuous", "BC"): "BCConfig",
    ("continuous", "IQL"): "IQLConfig",
    ("continuous", "TD3+BC"): "TD3PlusBCConfig",
}


@dataclass(frozen=True)
class LogArrays:
    """A shipped log as the arrays d3rlpy's `MDPDataset` gets (rows sorted by episode, step).

    `actions` are int64 indices from 0 (discrete) or float32 `[N, k]` executed actions
    (continuous; a log that stores raw unclipped samples is clipped to `low`/`high`, the bounds
    the env executes). Every episode's last row has `terminals` or `timeouts` set (a row without
    either flag gets a timeout)."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    discrete: bool
    n_actions: int
    action_start: int
    low: np.ndarray | None
    high: np.ndarray | None
    clipped_rows: int


def read_log(dataset: Path) -> tuple[dict[str, Any], Any]:
    """The card (`_dataset.json`) and the concatenated `part-*.parquet` table of a shipped log."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    card_path = dataset / "_dataset.json"
    shards = sorted(dataset.glob("part-*.parquet"))
    if not card_path.is_file() or not shards:
        raise FileNotFoundError(f"{dataset} has no _dataset.json or no part-*.parquet shard")
    card = json.loads(card_path.read_text())
    columns = ["episode_id", "step", "obs", "action", "reward", "terminated", "truncated"]
    table = pa.concat_tables([pq.read_table(path, columns=columns) for path in shards])
    return card, table


def _matrix(column: Any, rows: int) -> np.ndarray:
    """A (fixed-size) list column as a float32 `[rows, d]` matrix; a scalar one as `[rows, 1]`."""
    chunked = column.combine_chunks()
    if hasattr(chunked, "flatten"):
        values = np.asarray(chunked.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    else:
        values = np.asarray(chunked.to_numpy(zero_copy_only=False), dtype=np.float32)
    return values.reshape(rows, -1)


def _bounds(card: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The bounds the env executes: `env_action_space` when the card has one, else the log's."""
    space = card.get("env_action_space") or card["action_space"]
    if space.get("type") != "Box":
        return None, None
    low = np.asarray([float(v) for v in space["low"]], dtype=np.float32)
    high = np.asarray([float(v) for v in space["high"]], dtype=np.float32)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        return None, None
    return low, high


def log_arrays(card: dict[str, Any], table: Any) -> LogArrays:
    """`LogArrays` of a shipped log: sorted by (episode_id, step), flags as float32 0/1,
    the last row of every episode ending it (terminal or timeout)."""
    rows = table.num_rows
    episode = np.asarray(table.column("episode_id").to_numpy(), dtype=np.int64)
    step = np.asarray(table.column("step").to_numpy(), dtype=np.int64)
    order = np.lexsort((step, episode))
    episode = episode[order]
    observations = _matrix(table.column("obs"), rows)[order]
    rewards = np.asarray(table.column("reward").to_numpy(), dtype=np.float32)[order]
    terminals = np.asarray(table.column("terminated").to_numpy(zero_copy_only=False))[order]
    timeouts = np.asarray(table.column("truncated").to_numpy(zero_copy_only=False))[order]
    last = np.append(episode[1:] != episode[:-1], True)
    timeouts = timeouts | (last & ~terminals)
    space = card["action_space"]
    discrete = space["type"] == "Discrete"
    low, high = _bounds(card)
    clipped = 0
    if discrete:
        start = int(space.get("start", 0))
        actions = np.asarray(table.column("action").to_numpy(), dtype=np.int64)[order] - start
        n_actions = int(space["n"])
    else:
        start, n_actions = 0, 0
        actions = _matrix(table.column("action"), rows)[order]
        if low is not None and high is not None:
            outside = (actions < low) | (actions > high)
            clipped = int(outside.any(axis=1).sum())
            actions = np.clip(actions, low, high)
    return LogArrays(
        observations=observations,
        actions=actions,
        rewards=rewards,
        terminals=terminals.astype(np.float32),
        timeouts=timeouts.astype(np.float32),
        discrete=discrete,
        n_actions=n_actions,
        action_start=start,
        low=low,
        high=high,
        clipped_rows=clipped,
    )


def make_env(env_spec: dict[str, Any]) -> Any:
    """The card's env: its id, kwargs and max_episode_steps (registered from its entry point
    when this gymnasium does not know the id)."""
    import gymnasium as gym

    if env_spec["id"] not in gym.registry and env_spec.get("entry_point"):
        gym.register(id=env_spec["id"], entry_point=env_spec["entry_point"])
    kwargs = dict(env_spec.get("kwargs") or {})
    return gym.make(
        env_spec["id"], max_episode_steps=env_spec.get("max_episode_steps"), **kwargs
    )


def fixed_sequence_returns(env_spec: dict[str, Any], seed: int = 123) -> list[float]:
    """Return and length of one episode (reset seed `seed`) driven by a fixed action sequence
    (numpy `default_rng(seed)`: uniform indices or uniform in the env's box), then the final
    observation: run under two gymnasium versions, equal lists mean the same seeded episodes."""
    env = make_env(env_spec)
    rng = np.random.default_rng(seed)
    space = env.action_space
    obs, _ = env.reset(seed=seed)
    total, steps, done = 0.0, 0, False
    try:
        while not done:
            if hasattr(space, "n"):
                action: Any = int(rng.integers(int(space.n))) + int(getattr(space, "start", 0))
            else:
                action = rng.uniform(space.low, space.high).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            steps += 1
            done = bool(terminated or truncated)
    finally:
        env.close()
    return [total, float(steps), *np.asarray(obs, dtype=np.float64).reshape(-1).tolist()]


def rollout(
    act: Callable[[np.ndarray], np.ndarray],
    env_spec: dict[str, Any],
    arrays: LogArrays,
    *,
    seed: int,
    episodes: int,
    seed_torch: bool,
) -> list[float]:
    """Undiscounted returns of `episodes` episodes; episode i resets with `seed + i` (and, when
    `seed_torch`, seeds torch's global generator with `seed + i` first)."""
    import torch

    env = make_env(env_spec)
    returns: list[float] = []
    try:
        for episode in range(episodes):
            if seed_torch:
                torch.manual_seed(seed + episode)
            obs, _ = env.reset(seed=seed + episode)
            total, done = 0.0, False
            while not done:
                action = act(np.asarray(obs, dtype=np.float32).reshape(1, -1))[0]
                if arrays.discrete:
                    env_action: Any = int(action) + arrays.action_start
                else:
                    env_action = np.asarray(action, dtype=np.float32).reshape(-1)
                    if arrays.low is not None:
                        env_action = np.clip(env_action, arrays.low, arrays.high)
                obs, reward, terminated, truncated, _ = env.step(env_action)
                total += float(reward)
                done = bool(terminated or truncated)
            returns.append(total)
    finally:
        env.close()
    return returns


def _build(algo_name: str, arrays: LogArrays) -> tuple[Any, Any]:
    """The d3rlpy algorithm (default hyperparameters) and its `MDPDataset`."""
    import d3rlpy

    kind = "discrete" if arrays.discrete else "continuous"
    config_class = getattr(d3rlpy.algos, ALGORITHMS[(kind, algo_name)])
    options: dict[str, Any] = {}
    if not arrays.discrete and arrays.low is not None:
        options["action_scaler"] = d3rlpy.preprocessing.MinMaxActionScaler(
            minimum=arrays.low, maximum=arrays.high
        )
    algo = config_class(**options).create(device="cpu:0")
    dataset = d3rlpy.dataset.MDPDataset(
        observations=arrays.observations,
        actions=arrays.actions,
        rewards=arrays.rewards,
        terminals=arrays.terminals,
        timeouts=arrays.timeouts,
        action_space=(
            d3rlpy.constants.ActionSpace.DISCRETE
            if arrays.discrete
            else d3rlpy.constants.ActionSpace.CONTINUOUS
        ),
        action_size=arrays.n_actions if arrays.discrete else int(arrays.actions.shape[1]),
    )
    return algo, dataset


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, evaluate at every checkpoint (greedy) and at the end (stochastic); the cell."""
    import d3rlpy
    import gymnasium
    import torch

    torch.set_num_threads(1)
    card, table = read_log(Path(args.dataset))
    arrays = log_arrays(card, table)
    kind = "discrete" if arrays.discrete else "continuous"
    if (kind, args.algo) not in ALGORITHMS:
        raise ValueError(f"algorithm {args.algo!r} is not benchmarked on {kind} actions")
    d3rlpy.seed(args.seed)
    algo, dataset = _build(args.algo, arrays)
    per_epoch = math.ceil(args.steps / args.checkpoints)
    curve: list[list[float]] = []
    eval_seconds = [0.0]
    final: dict[str, list[float]] = {}

    def at_epoch(algo_: Any, epoch: int, total_step: int) -> None:
        start = time.perf_counter()
        greedy = rollout(
            algo_.predict, card["env_spec"], arrays, seed=args.eval_seed,
            episodes=args.episodes, seed_torch=False,
        )
        curve.append([total_step, float(np.mean(greedy))])
        final["greedy"] = greedy
        eval_seconds[0] += time.perf_counter() - start

    start = time.perf_counter()
    algo.fit(
        dataset, n_steps=per_epoch * args.checkpoints, n_steps_per_epoch=per_epoch,
        show_progress=False, logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
        save_interval=10**9, epoch_callback=at_epoch,
    )
    train_seconds = time.perf_counter() - start - eval_seconds[0]
    probe = arrays.observations[:: max(1, len(arrays.observations) // 256)]
    deterministic = bool(np.array_equal(algo.sample_action(probe), algo.predict(probe)))
    stochastic = None
    if not deterministic:
        begin = time.perf_counter()
        stochastic = rollout(
            algo.sample_action, card["env_spec"], arrays, seed=args.eval_seed,
            episodes=args.episodes, seed_torch=True,
        )
        eval_seconds[0] += time.perf_counter() - begin
    return {
        "dataset": card.get("name", Path(args.dataset).name), "algo": args.algo,
        "seed": args.seed, "steps": per_epoch * args.checkpoints, "eval_seed": args.eval_seed,
        "episodes": args.episodes, "greedy": final["greedy"],
        "greedy_mean": float(np.mean(final["greedy"])), "curve": curve,
        "stochastic": stochastic,
        "stochastic_mean": None if stochastic is None else float(np.mean(stochastic)),
        "stochastic_equals_greedy": deterministic, "clipped_rows": arrays.clipped_rows,
        "train_seconds": train_seconds, "eval_seconds": eval_seconds[0],
        "steps_per_second": per_epoch * args.checkpoints / max(train_seconds, 1e-9),
        "threads": torch.get_num_threads(), "d3rlpy": d3rlpy.__version__,
        "torch": torch.__version__, "gymnasium": gymnasium.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a shipped log's folder")
    parser.add_argument("--algo", choices=sorted({a for _, a in ALGORITHMS}))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--eval-seed", type=int, default=10_000)
    parser.add_argument(
        "--env-check", action="store_true",
        help="print fixed_sequence_returns of the log's env instead of training",
    )
    args = parser.parse_args()
    if args.env_check:
        card, _ = read_log(Path(args.dataset))
        print(json.dumps(fixed_sequence_returns(card["env_spec"])), flush=True)
        return
    if args.algo is None:
        parser.error("--algo is required unless --env-check is given")
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
