"""Re-measure README's off-policy evaluation caveats on the shipped logs (issue 12, "Benchmark").

For each log (cartpole-eps, cartpole-weak, pendulum-gauss) three policies are built, all with
the same seed and hence the same train/validation split:

- `bc`: the behavior-cloned policy the trainer starts from (`TrainConfig.init = bc`, its
  `bc_steps`), saved before any policy-gradient step (`train.build_policy`, the trainer's own);
- `default`: `offpg_offline.train.train` with the default `TrainConfig` (its `final.pt`);
- `selected`: the same training with `select_by` (default `wpdis`, README's example), shipping
  `selected.pt`.

Each is evaluated with the evaluate job's Python API (`offpg_offline.jobs.evaluate.evaluate`,
the run's recorded validation split, every estimator with its 95% bootstrap interval, critic
intervals `refit` by default, as `offpg evaluate`: 50 warm-started critics refitted on resamples,
about 40 s per CartPole policy on one core; `--critic-interval fixed` is the fast interval that
holds the critic fixed) and rolled out online for
`--episodes` seeded stochastic episodes (the policy OPE values) by the same call. The online
DISCOUNTED return Σ_t γ^t r_t with OPE's γ is the reference: relative error = (estimate −
online) / |online|; covered = the interval contains the online mean (itself a Monte-Carlo mean;
its standard error is printed).

    OMP_NUM_THREADS=1 python scripts/bench_ope.py            # the full run (1000 steps)
    OMP_NUM_THREADS=1 python scripts/bench_ope.py --quick    # 100 steps, fewer resamples

Prints a Markdown table and one summary line per estimator (median |relative error|,
coverage x/n), then the wall time; `--json FILE` also writes the rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from offpg_offline import distributed
from offpg_offline.config import EvaluateConfig, TrainConfig
from offpg_offline.data.split import write_validation_record
from offpg_offline.jobs.evaluate import evaluate
from offpg_offline.train import NullTracker, build_policy, train
from offpg_offline.training.checkpoints import save_checkpoint
from offpg_offline.training.prepare import prepare_data

ROOT = Path(__file__).resolve().parents[1]
LOGS = ("cartpole-eps", "cartpole-weak", "pendulum-gauss")
POLICIES = ("bc", "default", "selected")
ESTIMATORS = ("is", "wis", "pdis", "wpdis", "dr", "wdr", "fqe")


def behavior_cloned(dataset: Path, config: TrainConfig, out: Path) -> Path:
    """Save the trainer's starting point (behavior cloning, no gradient step) as `out/final.pt`,
    with the validation ids it holds out beside it (what `evaluate` reads for a folder)."""
    data = prepare_data(dataset, config)
    policy, optimizer, _ = build_policy(data, config, distributed.setup("cpu"), None, None)
    save_checkpoint(out / "final.pt", policy, optimizer, step=0, config=config)
    write_validation_record(out, data.val_ids)
    return out


def build_policies(dataset: Path, config: TrainConfig, select_by: str, tmp: Path,
                   names: tuple[str, ...] = POLICIES) -> dict[str, tuple[Path, str]]:
    """{policy name: (training output folder, checkpoint choice)} for the policies `names`."""
    folders: dict[str, tuple[Path, str]] = {}
    if "bc" in names:
        folders["bc"] = (behavior_cloned(dataset, config, tmp / "bc"), "final")
    if "default" in names:
        train(dataset, config, tracker=NullTracker(), out_dir=tmp / "default")
        folders["default"] = (tmp / "default", "final")
    if "selected" in names:
        selecting = dataclasses.replace(config, select_by=select_by)
        train(dataset, selecting, tracker=NullTracker(), out_dir=tmp / "selected")
        folders["selected"] = (tmp / "selected", "selected")
    return folders


def measure(dataset: Path, folder: Path, choice: str, args: argparse.Namespace
            ) -> list[dict[str, Any]]:
    """One row per estimator: the estimate and its interval against the online discounted
    return of the same (stochastic) policy; the episodes are the validation ids recorded beside
    the checkpoint (`split="validation"` with the log passed as `dataset`)."""
    config = EvaluateConfig(checkpoint=choice, split="validation", n_boot=args.n_boot,
                            critic_interval=args.critic_interval, seed=args.seed,
                            online=args.episodes, fqe_iterations=args.fqe_iterations)
    result = evaluate(folder, dataset=dataset, config=config, record=False,
                      progress=lambda line: print(f"    {line}", file=sys.stderr, flush=True))
    online = result.online["stochastic"]
    truth = float(online.discounted_mean)
    se = float(online.discounted_std) / math.sqrt(len(online.returns))
    rows = []
    for estimate in result.estimates:
        low, high = float(estimate.ci_low), float(estimate.ci_high)
        rows.append({
            "estimator": estimate.name, "estimate": float(estimate.value), "online": truth,
            "online_se": se, "relative_error": (float(estimate.value) - truth) / abs(truth),
            "ci_low": low, "ci_high": high, "covered": bool(low <= truth <= high),
            "ess": float(estimate.ess), "gamma": result.gamma, "step": result.target.step,
            "n_episodes": result.n_episodes, "critic_interval": result.critic_interval,
            "online_return": float(online.mean),
        })
    return rows


def show(rows: list[dict[str, Any]]) -> str:
    """The Markdown table and the per-estimator summary lines."""
    gamma = rows[0]["gamma"]
    lines = [f"| log | policy | estimator | estimate | online disc. return (γ={gamma:g}) ± se "
             f"| rel. error | CI low | CI high | covered | ESS |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(
            f"| {r['log']} | {r['policy']} | {r['estimator']} | {r['estimate']:.2f} | "
            f"{r['online']:.2f} ± {r['online_se']:.2f} | {100 * r['relative_error']:+.1f}% | "
            f"{r['ci_low']:.2f} | {r['ci_high']:.2f} | {'yes' if r['covered'] else 'no'} | "
            f"{r['ess']:.1f} |")
    lines.append("")
    lines.append("| estimator | median abs. rel. error | coverage |")
    lines.append("|---|---:|---:|")
    for name in ESTIMATORS:
        mine = [r for r in rows if r["estimator"] == name]
        if mine:
            median = statistics.median(abs(r["relative_error"]) for r in mine)
            covered = sum(r["covered"] for r in mine)
            lines.append(f"| {name} | {100 * median:.1f}% | {covered}/{len(mine)} |")
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="100 training steps, 200 resamples, 100 FQE backups, 20 episodes")
    parser.add_argument("--logs", default=",".join(LOGS), help="comma-separated shipped logs")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: TrainConfig's)")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help="comma-separated subset of bc,default,selected")
    parser.add_argument("--select-by", default="wpdis", help="select_by of the selected policy")
    parser.add_argument("--critic-interval", default="refit", choices=("refit", "fixed"),
                        help="dr/wdr/fqe intervals: refit (the critic refitted on resamples, "
                             "evaluate's default) or fixed (fast, the critic held fixed)")
    parser.add_argument("--n-boot", type=int, default=None,
                        help="bootstrap resamples (default: EvaluateConfig's)")
    parser.add_argument("--fqe-iterations", type=int, default=None,
                        help="FQE backups (default: FQEConfig's)")
    parser.add_argument("--episodes", type=int, default=None,
                        help="online episodes per policy (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    unknown = set(args.policies.split(",")) - set(POLICIES)
    if unknown:
        parser.error(f"--policies: {', '.join(sorted(unknown))} is not one of bc,default,selected")
    missing = [log for log in args.logs.split(",") if not (ROOT / "datasets" / log).is_dir()]
    if missing:
        parser.error(f"--logs: {', '.join(missing)} is not a folder of {ROOT / 'datasets'}")
    quick = {"steps": 100, "n_boot": 200, "fqe_iterations": 100, "episodes": 20}
    full = {"steps": TrainConfig().steps, "n_boot": EvaluateConfig().n_boot,
            "fqe_iterations": None, "episodes": 50}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    config = TrainConfig(steps=args.steps, seed=args.seed, threads=1, device="cpu")
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for log in args.logs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{log}: training ({args.steps} steps) …", file=sys.stderr, flush=True)
            dataset = ROOT / "datasets" / log
            names = tuple(name for name in POLICIES if name in args.policies.split(","))
            folders = build_policies(dataset, config, args.select_by, Path(tmp), names)
            for name in names:
                print(f"  {log} / {name}: evaluating …", file=sys.stderr, flush=True)
                for row in measure(dataset, *folders[name], args):
                    rows.append({"log": log, "policy": name, **row})
    print(f"critic intervals: {args.critic_interval}; select_by: {args.select_by}; "
          f"steps: {args.steps}; bootstrap resamples: {args.n_boot}; online episodes: "
          f"{args.episodes} (stochastic); seed {args.seed}\n")
    print(show(rows))
    print(f"\nwall time {time.perf_counter() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
