"""Policy quality of the default and its alternatives on every shipped log: online return.

For each dataset and configuration (the default `TrainConfig()`, the default before issue 15,
and the alternatives that tell most about the choice) each seed trains a policy that is
evaluated online over 20 seeded episodes, greedy (the mode: what `offpg train` says to deploy)
and stochastic. The behavior policy's return comes from the card; behavior cloning's from the
BC start of the default's runs (`bc/*`). `cartpole-eps-noprop` has no propensities: each seed
first fits π_β (`offpg behavior fit` with its defaults and that seed) and trains on the
estimated column, as a user would.

    python scripts/bench_quality.py        # the README table (~25 min on one core)
    python scripts/bench_quality.py --datasets cartpole-weak --seeds 0 --configs default

Prints one line per (dataset, configuration) as it goes and a Markdown table at the end, and
writes both with the raw numbers to --out (JSON).
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

import torch

from offpg_offline.config import FitConfig, TrainConfig, build, resolve_auto
from offpg_offline.data.store import read_card
from offpg_offline.train import train
from offpg_offline.training.prepare import actions_are_discrete

ROOT = Path(__file__).resolve().parents[1]
DATASETS = (
    "cartpole-eps", "cartpole-eps-noprop", "cartpole-weak", "lander-eps", "pendulum-gauss",
    "lander-clipped", "mountaincar-gauss",
)

# Option sets: "default" is TrainConfig() itself (estimator auto: per-step on discrete logs,
# greedy-critic on continuous ones; lr, steps and bc_steps auto by estimator: per-step ρ capped
# at 2, value baseline, KL weight 2, 5000 BC steps, 1000 steps, lr 1e-3 discrete / 5e-4
# continuous; greedy-critic the same cap and baseline, its closed-form KL weight 2 to the
# clone, 20 000 BC steps, 3000 steps, lr 2.5e-4); the others override it. An override that
# resolves to the default's own configuration on a log (e.g. per-step on a discrete log)
# reuses the default's runs.
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "per-step (the default before greedy-critic)": {"estimator": "per-step"},
    "pre-issue-15 default (per-step; bc 300; lr 1e-3)": {
        "estimator": "per-step", "bc_steps": 300, "lr": 1e-3},
    "per-step lr 1e-3 (default before auto)": {"estimator": "per-step", "lr": 1e-3},
    "per-step lr 5e-4": {"estimator": "per-step", "lr": 5e-4},
    "critic λ=0.95": {"estimator": "critic", "critic_lambda": 0.95},
}


def dataset_for(name: str, seed: int, scratch: Path) -> tuple[Path, dict[str, Any]]:
    """The folder to train on and the propensity override: a log without propensities gets
    π_β fitted first (once per seed, shared by the configurations)."""
    dataset = ROOT / "datasets" / name
    if read_card(dataset)["propensity"].get("logged_logp") is not None:
        return dataset, {}
    fitted = scratch / f"{name}-fitted-{seed}"
    if not fitted.exists():
        from offpg_offline.behavior.fit import fit_behavior

        fit_behavior(dataset, out=fitted, config=FitConfig(seed=seed))
    return fitted, {"propensity": "estimated"}


def config_for(name: str, config_name: str, seed: int, episodes: int, scratch: Path
               ) -> tuple[Path, TrainConfig]:
    """The log to train on and the configuration `train` will use on it (lr auto resolved)."""
    dataset, propensity = dataset_for(name, seed, scratch)
    overrides = {**CONFIGS[config_name], **propensity, "seed": seed, "eval_episodes": episodes}
    base = dataclasses.asdict(TrainConfig())
    config = build(TrainConfig, "train", {**base, **overrides})
    return dataset, resolve_auto(config, discrete_actions=actions_are_discrete(dataset, config))


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench_quality.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.configs.split(",")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for dataset_name in args.datasets.split(","):
            card = read_card(ROOT / "datasets" / dataset_name)
            bc: list[float] = []
            bc_greedy: list[float] = []
            done: dict[tuple, tuple[str, list[dict[str, float]]]] = {}
            for name in names:
                start = time.perf_counter()
                planned = [config_for(dataset_name, name, seed, args.episodes, Path(scratch))
                           for seed in seeds]
                key = tuple(config for _, config in planned)
                same_as, runs = done.get(key, (None, []))
                if same_as is None:
                    runs = [
                        train(dataset, config, out_dir=Path(scratch) / f"{dataset_name}-"
                              f"config{names.index(name)}-seed{config.seed}").metrics
                        for dataset, config in planned
                    ]
                    done[key] = (name, runs)
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
                    "same_as": same_as,
                }
                rows.append(row)
                print(
                    f"{dataset_name:19s} {name:42s} stochastic {mean_std(row['stochastic']):>16s}"
                    f"  greedy {mean_std(row['greedy']):>16s}"
                    + (f"  (= {same_as})" if same_as else
                       f"  ({row['seconds_per_run']:.0f} s/run)"),
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
            write(args.out, seeds, args.episodes, rows, final=False)

    write(args.out, seeds, args.episodes, rows, final=True)


def table_of(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| dataset | configuration | return, greedy (deployed) | return, stochastic |",
        "|---|---|---|---|",
    ]
    for row in rows:
        same = f" (= {row['same_as']})" if row.get("same_as") else ""
        lines.append(
            f"| {row['dataset']} | {row['config']}{same} | {mean_std(row['greedy'])} | "
            f"{mean_std(row['stochastic'])} |"
        )
    return "\n".join(lines)


def write(out: Path, seeds: list[int], episodes: int, rows: list[dict[str, Any]], *,
          final: bool) -> None:
    """The JSON (after every dataset, so an interrupted run keeps what it measured)."""
    table = table_of(rows)
    if final:
        print()
        print(f"mean ± std over seeds {seeds}; each value the mean over {episodes} seeded "
              f"episodes")
        print(table)
    default = {k: str(v) for k, v in dataclasses.asdict(TrainConfig()).items()}
    out.write_text(json.dumps({"seeds": seeds, "episodes": episodes, "default": default,
                               "configs": CONFIGS, "rows": rows, "table": table}, indent=2))


if __name__ == "__main__":
    main()
