"""Scale: time per epoch against log size (fitted log-log slope), and peak RSS when streaming.

Generates logs of 10⁴ … 10⁷ steps with numpy into a temporary folder (never in git): episodes
of 50–150 steps, 4-dimensional observations, two actions, a uniform behavior policy. For each
size, one epoch of `per-step` training (rows / batch_steps gradient steps, no validation split,
diagnostics every 50 steps as by default) runs in a fresh subprocess, which reports the time of
`train()` and its peak resident set size (ru_maxrss); the best time of --repeats runs counts.
Streaming runs at every size; the in-memory trainer up to --memory-max-steps. The slope of
log(time) on log(steps) is fitted by least squares, over all sizes and from 10⁵ steps on (the
trainer's fixed start-up, a few seconds, flattens the smallest size).

    python scripts/bench_scale.py [--max-steps 10000000] [--memory-max-steps 1000000]
                                  [--plot docs/scale.png]

Goals: slope ≤ 1.05 (cost linear in the number of transitions); peak RSS ≤ 2 GB when
streaming 10⁷ steps.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES = (10_000, 100_000, 1_000_000, 10_000_000)
CHUNK_ROWS = 1_000_000


def generate(out: Path, n_steps: int, seed: int = 0) -> Path:
    """A log of exactly `n_steps` rows of random episodes, written with `write_dataset`."""
    import gymnasium as gym

    from offpg_offline.data.schema import steps_table
    from offpg_offline.data.spaces import space_to_json
    from offpg_offline.data.store import write_dataset

    rng = np.random.default_rng(seed)
    lengths = rng.integers(50, 151, n_steps // 50 + 1)
    ends = np.cumsum(lengths)
    lengths = lengths[: int(np.searchsorted(ends, n_steps)) + 1]
    lengths[-1] -= int(lengths.sum()) - n_steps

    def tables():  # type: ignore[no-untyped-def]
        first = 0
        while first < len(lengths):
            cut = int(np.searchsorted(np.cumsum(lengths[first:]), CHUNK_ROWS)) + 1
            part = lengths[first : first + cut]
            rows = int(part.sum())
            episode_id = np.repeat(np.arange(first, first + len(part)), part)
            step = np.arange(rows) - np.repeat(np.cumsum(part) - part, part)
            last = np.r_[episode_id[1:] != episode_id[:-1], True]
            obs = rng.normal(size=(rows, 4)).astype(np.float32)
            yield steps_table(
                episode_id=episode_id,
                step=step,
                obs=obs,
                action=rng.integers(0, 2, rows),
                reward=rng.normal(size=rows).astype(np.float32),
                next_obs=np.roll(obs, -1, axis=0),
                terminated=last,
                truncated=np.zeros(rows, dtype=bool),
                logged_logp=np.full(rows, math.log(0.5), dtype=np.float32),
            )
            first += len(part)

    card = {
        "name": f"generated-{n_steps}",
        "description": "random episodes for scripts/bench_scale.py",
        "observation_space": space_to_json(gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)),
        "action_space": space_to_json(gym.spaces.Discrete(2)),
        "env_spec": None,
        "source": {"generator": "scripts/bench_scale.py", "seed": seed},
        "behavior": "uniform over two actions",
        "propensity": {"logged_logp": {"source": "exact"}},
    }
    return write_dataset(out, tables(), card=card)


def worker(dataset: Path, stream: bool) -> None:
    """One epoch of training in this process; prints seconds, gradient steps and peak RSS."""
    import torch

    from offpg_offline.config import Baseline, EstimatorName, Init, TrainConfig
    from offpg_offline.data.store import read_card
    from offpg_offline.train import train

    torch.set_num_threads(1)
    rows = int(read_card(dataset)["counts"]["steps"])
    config = TrainConfig(
        estimator=EstimatorName.PER_STEP,
        init=Init.RANDOM,
        baseline=Baseline.NONE,
        val_fraction=0.0,
        steps=max(1, rows // TrainConfig().batch_steps),
        stream=stream,
        memory_budget=1000.0,
        device="cpu",
    )
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        train(dataset, config, out_dir=Path(out))
        seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "grad_steps": config.steps, "peak_rss_mb": peak_mb}))


def run_worker(dataset: Path, stream: bool) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", str(dataset)]
    if stream:
        command.append("--stream")
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"worker failed on {dataset}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def slope(steps: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) on log(steps)."""
    return float(np.polyfit(np.log(steps), np.log(seconds), 1)[0])


def plot(results: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    for mode, points in results.items():
        if len(points) < 2:
            continue
        xs, ys = zip(*points, strict=True)
        k = slope(list(xs), list(ys))
        ax.loglog(xs, ys, "o-", label=f"{mode} (slope {k:.2f})")
    reference = results["streaming"]  # a line of slope 1 through the largest streamed size
    xs = np.array([p[0] for p in reference], dtype=float)
    ax.loglog(xs, reference[-1][1] * xs / xs[-1], ":", color="grey", label="slope 1")
    ax.set_xlabel("steps in the log")
    ax.set_ylabel("seconds per epoch")
    ax.set_title("offpg train, per-step, batch 2048, 1 thread")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=SIZES[-1])
    parser.add_argument("--memory-max-steps", type=int, default=1_000_000)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=2, help="runs per size; the best counts")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.stream)
        return
    results: dict[str, list[tuple[int, float]]] = {"streaming": [], "in-memory": []}
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"load average at start: {load} (2 shared cores)")
    with tempfile.TemporaryDirectory() as scratch:
        for size in (s for s in SIZES if s <= args.max_steps):
            start = time.perf_counter()
            dataset = generate(Path(scratch) / f"log-{size}", size)
            print(f"{size:>10,} steps: generated in {time.perf_counter() - start:.1f} s")
            modes = [True] + ([False] if size <= args.memory_max_steps else [])
            for stream in modes:
                # Best of --repeats: other jobs on a shared machine only ever add time.
                reports = [run_worker(dataset, stream) for _ in range(args.repeats)]
                report = min(reports, key=lambda r: r["seconds"])
                report["peak_rss_mb"] = max(r["peak_rss_mb"] for r in reports)
                mode = "streaming" if stream else "in-memory"
                results[mode].append((size, report["seconds"]))
                print(
                    f"{'':>17} {mode:>9}: {report['seconds']:7.1f} s/epoch "
                    f"({report['grad_steps']} gradient steps, "
                    f"{size / report['seconds']:,.0f} transitions/s, "
                    f"peak RSS {report['peak_rss_mb']:,.0f} MB)"
                )
    for mode, points in results.items():
        for low in (SIZES[0], SIZES[1]):  # all sizes; and without the fixed start-up cost
            xs = [x for x, _ in points if x >= low]
            ys = [y for x, y in points if x >= low]
            if len(xs) >= 2:
                print(
                    f"{mode}: slope of log(time) on log(steps), {xs[0]:,}-{xs[-1]:,} steps: "
                    f"{slope(xs, ys):.3f} (goal <= 1.05)"
                )
    print(f"load average at end: {Path('/proc/loadavg').read_text().split()[0]}")
    if args.plot is not None:
        plot(results, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
