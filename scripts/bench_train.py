"""Training throughput: `offpg_offline.train.train` against a bare torch loop, same run.

The trainer's per-step cost is timed inside its loop, from the metrics of step `log_every` to
those of the last step (a tracker notes when they arrive), so loading, behavior cloning, the
value baseline and the final online evaluation are left out, while everything the loop does
every step (batching, the surrogate with its options, the periodic diagnostics at the default
`log_every`) is counted. (Differencing runs of N and 2N steps let the online evaluation's
noise swamp the loop on a loaded machine.) The baseline is a bare loop: the same policy network,
the same batch of steps, Adam, and the clipped per-step surrogate written inline. One torch
thread.

Both loops are timed in this process's CPU seconds (`time.process_time`) by default: with one
thread that is the loop's own work, while wall-clock time on a shared machine also counts the
time other processes hold the core (on 2 cores under load 3 it moved the ratio by ±0.1 from run
to run); `--wall` times wall-clock seconds instead (equal on a quiet machine). Repeats alternate
bare and trainer runs and keep the best of each.

    OMP_NUM_THREADS=1 python scripts/bench_train.py [--dataset datasets/cartpole-eps] [--steps 200]
        [--repeats 5] [--wall]
    OMP_NUM_THREADS=1 python scripts/bench_train.py --estimator critic  # vs the same bare loop
    OMP_NUM_THREADS=1 python scripts/bench_train.py --dataset datasets/pendulum-gauss \
        --estimator greedy-critic --bc-steps 200 --repeats 3   # its critic steps are counted

Goal: ratio (ours / bare) ≥ 0.8 (issue 7).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from offpg_offline.config import TrainConfig, build, resolve_auto
from offpg_offline.data.batch import load_steps
from offpg_offline.data.spaces import space_from_json
from offpg_offline.data.store import read_card
from offpg_offline.estimators import discounted_returns
from offpg_offline.policies import make_policy
from offpg_offline.train import NullTracker, train
from offpg_offline.training.prepare import actions_are_discrete

ROOT = Path(__file__).resolve().parents[1]


Clock = Callable[[], float]


def bare_loop(dataset: Path, config: TrainConfig, steps: int, clock: Clock) -> float:
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
    start = clock()
    for _ in range(steps):
        rows = torch.randint(0, batch.n_steps, (config.batch_steps,), generator=generator)
        ratio = (policy.log_prob(batch.obs[rows], batch.action[rows]) - behavior_logp[rows]).exp()
        loss = -(ratio.clamp_max(config.clip or float("inf")) * returns[rows]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (clock() - start) / steps


class _StepClock(NullTracker):
    """Notes when each step's first metrics arrive: the loop's own clock, without loading,
    behavior cloning, the baseline fit, checkpoints or the final online evaluation."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.times: dict[int, float] = {}

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        self.times.setdefault(step, self.clock())


def trainer_step(dataset: Path, config: TrainConfig, steps: int, clock: Clock) -> float:
    """Seconds per step of the trainer's loop, from the step-`log_every` metrics to the last
    step's (diagnostics every `log_every` steps included)."""
    step_clock = _StepClock(clock)
    with tempfile.TemporaryDirectory() as scratch:
        train(dataset, dataclasses.replace(config, steps=steps), tracker=step_clock,
              out_dir=Path(scratch))
    first = config.log_every
    return (step_clock.times[steps] - step_clock.times[first]) / (steps - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=ROOT / "datasets" / "cartpole-eps")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--wall", action="store_true", help="time wall-clock seconds instead")
    parser.add_argument("--estimator", default="per-step",
                        help="the trainer's estimator (the bare loop stays the per-step one)")
    parser.add_argument("--bc-steps", default=None, type=lambda v: None if v == "auto" else int(v),
                        help="behavior-cloning steps before the loop (default: auto); they are "
                        "not timed, so only the benchmark's wall time depends on them")
    args = parser.parse_args()
    clock = time.perf_counter if args.wall else time.process_time
    torch.set_num_threads(1)
    config = build(TrainConfig, "bench_train", {
        **dataclasses.asdict(TrainConfig()), "eval_episodes": 2, "threads": 1,
        "estimator": args.estimator, "bc_steps": args.bc_steps})
    # lr auto as `train` resolves it, so the bare loop's Adam takes the same rate
    config = resolve_auto(config, discrete_actions=actions_are_discrete(args.dataset, config))
    # Interleaved repeats (bare, ours, bare, ours, ...), best of each: other processes only
    # add time, and a burst of their load then hits both loops alike (all bare runs first,
    # then all ours, let one burst land on one side only).
    bare, ours = math.inf, math.inf
    for _ in range(args.repeats):
        bare = min(bare, bare_loop(args.dataset, config, args.steps, clock))
        ours = min(ours, trainer_step(args.dataset, config, args.steps, clock))
    print(
        f"dataset {args.dataset.name}, estimator {config.estimator.value}, "
        f"batch {config.batch_steps} steps, network {config.hidden}, "
        f"1 thread, {'wall-clock' if args.wall else 'CPU'} time"
    )
    print(
        f"bare torch loop : {config.batch_steps / bare:10.0f} transitions/s "
        f"({bare * 1e3:.2f} ms/step)"
    )
    print(
        f"offpg trainer   : {config.batch_steps / ours:10.0f} transitions/s "
        f"({ours * 1e3:.2f} ms/step, diagnostics every {config.log_every} steps included)"
    )
    print(f"ratio (ours / bare): {bare / ours:.2f}  (goal >= 0.8)")


if __name__ == "__main__":
    main()
