"""Benchmark `offpg behavior fit` on a 100k-step CartPole log: wall time against the 60 s goal.

Goal (issue 4): fitting π̂_β on 100k steps takes ≤ 60 s on 2 CPU cores with one torch thread,
the whole job included (read, 5-fold cross-fit + final model, write the new dataset). The log
is an ε-mixture (ε = 0.5) of the CartPole heuristic controller, with its exact propensities,
so the script also prints the cross-fitted estimate's mean |log π̂_β − log π_β| in nats.

With `--shipped`, it instead fits the shipped logs without propensities and reports the
cross-fitted error against their true propensities: `datasets/cartpole-eps-noprop` (truth in
`datasets/cartpole-eps`, goal ≤ 0.1 nats) and `datasets/pendulum-gauss` (logged_logp ignored by
the fit, goal ≤ 0.15 nats).

Usage: python scripts/bench_behavior.py [--steps 100000] [--folds 5] [--threads 1] [--shipped]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from offpg_offline.behavior.fit import FitConfig, fit_behavior
from offpg_offline.data.spaces import space_to_json
from offpg_offline.data.store import write_dataset
from offpg_offline.data.synthetic import (
    CARTPOLE_HEURISTIC,
    EpsilonGreedyController,
    Log,
    rollout,
)

GOAL_SECONDS = 60.0
DATASETS = Path(__file__).resolve().parents[1] / "datasets"
SHIPPED = (  # (log fitted, log holding the true propensities, goal in nats)
    ("cartpole-eps-noprop", "cartpole-eps", 0.1),
    ("pendulum-gauss", "pendulum-gauss", 0.15),
)


def shipped(folds: int, seed: int) -> None:
    """Fit each shipped log and print the mean |log π̂_β − log π_β| against the truth."""
    from offpg_offline.data.batch import load_steps

    for name, truth_name, goal in SHIPPED:
        started, cpu_started = time.perf_counter(), time.process_time()
        report = fit_behavior(DATASETS / name, config=FitConfig(folds=folds, seed=seed))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        truth = load_steps(DATASETS / truth_name).logged_logp.double()
        error = float((report.estimated_logp.double() - truth).abs().mean())
        verdict = "met" if error <= goal else "NOT met"
        print(
            f"{name}: model {report.card_entry['model']['kind']}, held-out NLL "
            f"{report.metrics['behavior/nll_heldout']:.4f} (truth {-float(truth.mean()):.4f}); "
            f"mean |Δ log p| {error:.4f} nats, goal ≤ {goal} ({verdict}); "
            f"{seconds:.0f} s wall, {cpu:.0f} s CPU",
            flush=True,
        )


def make_log(folder: Path, steps: int, seed: int) -> Path:
    """Write a CartPole ε-mixture log of at least `steps` rows (whole episodes) to `folder`."""
    policy = EpsilonGreedyController(CARTPOLE_HEURISTIC, epsilon=0.5)
    episodes = max(1, steps // 150)
    while True:
        log = rollout("CartPole-v1", policy, episodes=episodes, seed=seed)
        if log.n_steps >= steps:
            break
        episodes = int(episodes * 1.2 * steps / log.n_steps) + 1
    bounds = log.episode_bounds()
    end = int(bounds[np.searchsorted(bounds, steps)])  # the first episode end at or past `steps`
    log = Log(**{f.name: getattr(log, f.name)[:end] for f in dataclasses.fields(log)})
    env = gym.make("CartPole-v1")
    card = {
        "name": "bench-cartpole-eps",
        "observation_space": space_to_json(env.observation_space),
        "action_space": space_to_json(env.action_space),
        "env_spec": {"id": "CartPole-v1"},
        "propensity": {"logged_logp": {"source": "exact (synthetic)"}, "estimated_logp": None},
    }
    env.close()
    return write_dataset(folder, log.tables(), card=card)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000, help="Rows in the log (at least).")
    parser.add_argument("--folds", type=int, default=5, help="Cross-fitting folds.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the log and the fit.")
    parser.add_argument("--shipped", action="store_true", help="Errors on the shipped logs.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.shipped:
        shipped(args.folds, args.seed)
        return

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        source = make_log(Path(tmp) / "log", args.steps, args.seed)
        made = time.perf_counter() - started
        started, cpu_started = time.perf_counter(), time.process_time()
        report = fit_behavior(
            source,
            out=Path(tmp) / "fitted",
            config=FitConfig(folds=args.folds, seed=args.seed),
            progress=lambda line: print(f"  {line}", flush=True),
        )
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
    metrics = report.metrics
    rows = len(report.estimated_logp)
    print(f"log: {rows} steps (made in {made:.1f} s); threads {torch.get_num_threads()}")
    print(
        f"behavior fit: {seconds:.1f} s wall ({cpu_seconds:.1f} s CPU) for {rows} steps, "
        f"{args.folds} folds + final model; goal {GOAL_SECONDS:.0f} s; ratio "
        f"{seconds / GOAL_SECONDS:.2f} wall, {cpu_seconds / GOAL_SECONDS:.2f} CPU (≤ 1 meets it; "
        f"wall time counts other processes sharing the cores, CPU time does not)"
    )
    print(
        f"held-out NLL {metrics['behavior/nll_heldout']:.4f}; mean |Δ log p| vs truth "
        f"{metrics['behavior/logged_mean_abs_diff']:.4f} nats; steps per model "
        + ", ".join(
            str(int(v)) for k, v in sorted(metrics.items()) if k.startswith("behavior/best_step")
        )
        + f"; throughput {rows * max(args.folds, 1) / seconds:,.0f} rows·folds/s"
    )
    print(f"numpy {np.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
