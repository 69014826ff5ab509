"""Policy quality of every estimator on the shipped logs: online return vs behavior and BC.

For each dataset, each configuration (the default, and each estimator with the options that
worked best for it) is trained with several seeds; the resulting policy is evaluated online
over 20 seeded episodes (stochastic and greedy). The behavior policy's return comes from the
log; behavior cloning's from the BC start of the same runs (`bc/return_mean`).

    python scripts/bench_quality.py        # the README table (~25 min on 2 idle cores)
    python scripts/bench_quality.py --datasets cartpole-weak --seeds 0 --configs default

Prints a Markdown table and writes it with the raw numbers to --out (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from offpg_offline.config import TrainConfig, build
from offpg_offline.data.store import read_card
from offpg_offline.train import train

ROOT = Path(__file__).resolve().parents[1]

# Option sets: "default" is TrainConfig() itself (per-step, ρ capped at 2, value baseline,
# KL weight 2, BC start); the others override it.
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "default without KL": {"kl_coef": 0.0},
    "per-step ppo0.2 no-KL": {"clip": None, "ppo_epsilon": 0.2, "kl_coef": 0.0},
    "per-decision": {"estimator": "per-decision"},
    "past-weight": {"estimator": "past-weight"},
    "trajectory clip10-cum sn": {"estimator": "trajectory", "clip": 10.0,
                                 "clip_mode": "cumulative", "self_normalize": True},
}


def run_one(dataset: Path, name: str, seed: int, episodes: int, scratch: Path) -> dict[str, float]:
    overrides = {**CONFIGS[name], "seed": seed, "eval_episodes": episodes}
    base = dataclasses.asdict(TrainConfig())
    config = build(TrainConfig, "train", {**base, **overrides})
    result = train(dataset, config, out_dir=scratch / f"{dataset.name}-{name}-{seed}")
    return result.metrics


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="cartpole-eps,cartpole-weak,pendulum-gauss")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench_quality.json"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.configs.split(",")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for dataset_name in args.datasets.split(","):
            dataset = ROOT / "datasets" / dataset_name
            card = read_card(dataset)
            bc: list[float] = []
            bc_greedy: list[float] = []
            for name in names:
                start = time.perf_counter()
                runs = [
                    run_one(dataset, name, seed, args.episodes, Path(scratch)) for seed in seeds
                ]
                if name == "default":  # every BC start of a seed is the same policy
                    bc += [m["bc/return_mean"] for m in runs]
                    bc_greedy += [m["bc/greedy_return_mean"] for m in runs]
                row = {
                    "dataset": dataset_name,
                    "config": name,
                    "stochastic": [m["online/return_mean"] for m in runs],
                    "greedy": [m["online/greedy_return_mean"] for m in runs],
                    "ess": [m["weights/ess_fraction"] for m in runs],
                    "seconds_per_run": (time.perf_counter() - start) / len(seeds),
                }
                rows.append(row)
                print(
                    f"{dataset_name:15s} {name:30s} stochastic {mean_std(row['stochastic']):>16s}"
                    f"  greedy {mean_std(row['greedy']):>16s}"
                    f"  ({row['seconds_per_run']:.0f} s/run)",
                    flush=True,
                )
            behavior = card["behavior"]
            rows.append(
                {
                    "dataset": dataset_name,
                    "config": "behavior policy (log; greedy = its controller alone)",
                    "stochastic": [behavior["mean_return"]],
                    "greedy": [behavior.get("greedy_mean_return", float("nan"))],
                }
            )
            rows.append(
                {
                    "dataset": dataset_name,
                    "config": "behavior cloning",
                    "stochastic": bc,
                    "greedy": bc_greedy,
                }
            )

    lines = [
        "| dataset | configuration | return (stochastic) | return (greedy) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['dataset']} | {row['config']} | {mean_std(row['stochastic'])} | "
            f"{mean_std(row['greedy'])} |"
        )
    table = "\n".join(lines)
    print()
    print(
        f"mean ± std over seeds {seeds}; each value the mean over {args.episodes} seeded episodes"
    )
    print(table)
    args.out.write_text(
        json.dumps(
            {"seeds": seeds, "episodes": args.episodes, "rows": rows, "table": table}, indent=2
        )
    )


if __name__ == "__main__":
    main()
