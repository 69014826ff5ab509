"""Training throughput: `offpg_offline.train.train` against a bare torch loop, same run.

The trainer's per-step cost is isolated as (T(2N steps) − T(N steps)) / N, so loading, behavior
cloning, the value baseline and the final online evaluation cancel, while everything the loop
does every step (batching, the surrogate with its options, the periodic diagnostics at the
default `log_every`) is counted. The baseline is a bare loop: the same policy network, the same
batch of steps, Adam, and the clipped per-step surrogate written inline. One torch thread.

    python scripts/bench_train.py [--dataset datasets/cartpole-eps] [--steps 200]

Goal: ratio (ours / bare) ≥ 0.7.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from offpg_offline.config import TrainConfig
from offpg_offline.data.batch import load_steps
from offpg_offline.data.spaces import space_from_json
from offpg_offline.data.store import read_card
from offpg_offline.estimators import discounted_returns
from offpg_offline.policies import make_policy
from offpg_offline.train import train

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(dataset: Path, config: TrainConfig, steps: int) -> float:
    """Seconds per step of a minimal per-step PG loop with the same network and batch."""
    card = read_card(dataset)
    batch = load_steps(dataset)
    policy = make_policy(
        space_from_json(card["observation_space"]),
        space_from_json(card["action_space"]),
        kind=config.policy,
        hidden=config.hidden,
        obs_mean=batch.obs.mean(0),
        obs_std=batch.obs.std(0).clamp_min(1e-6),
    )
    returns = discounted_returns(batch.reward, batch.episode_start, config.gamma).float()
    behavior_logp = batch.logged_logp
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(0, batch.n_steps, (config.batch_steps,), generator=generator)
        ratio = (policy.log_prob(batch.obs[rows], batch.action[rows]) - behavior_logp[rows]).exp()
        loss = -(ratio.clamp_max(config.clip or float("inf")) * returns[rows]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def trainer_step(dataset: Path, config: TrainConfig, steps: int) -> float:
    """Seconds per step of the trainer, by differencing runs of N and 2N steps."""
    with tempfile.TemporaryDirectory() as scratch:
        times = []
        for n in (steps, 2 * steps):
            start = time.perf_counter()
            train(dataset, dataclasses.replace(config, steps=n), out_dir=Path(scratch) / str(n))
            times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=ROOT / "datasets" / "cartpole-eps")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = TrainConfig(eval_episodes=2, threads=1)
    # Interleaved repeats, best of each: other processes on a 2-core machine only add time.
    bare = min(bare_loop(args.dataset, config, args.steps) for _ in range(args.repeats))
    ours = min(trainer_step(args.dataset, config, args.steps) for _ in range(args.repeats))
    print(
        f"dataset {args.dataset.name}, batch {config.batch_steps} steps, network {config.hidden}, "
        f"1 thread"
    )
    print(
        f"bare torch loop : {config.batch_steps / bare:10.0f} transitions/s "
        f"({bare * 1e3:.2f} ms/step)"
    )
    print(
        f"offpg trainer   : {config.batch_steps / ours:10.0f} transitions/s "
        f"({ours * 1e3:.2f} ms/step, diagnostics every {config.log_every} steps included)"
    )
    print(f"ratio (ours / bare): {bare / ours:.2f}  (goal >= 0.7)")


if __name__ == "__main__":
    main()
