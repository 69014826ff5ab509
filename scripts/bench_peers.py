"""d3rlpy 2.8.1 side by side with our default configuration: same logs, same seeded episodes.

    python scripts/bench_peers.py                    # everything (peers cached, ours re-run)
    python scripts/bench_peers.py --only ours        # re-run only our default, reuse the peers
    python scripts/bench_peers.py --only peers --datasets pendulum-gauss --algos IQL --seeds 0
    python scripts/bench_peers.py --only table       # print the tables of the cached cells

Peers: d3rlpy's BC and DiscreteCQL on the discrete logs, BC, IQL and TD3+BC on the continuous
ones, each with d3rlpy's default hyperparameters (continuous algorithms get a MinMaxActionScaler
with the env's action bounds), on 1 torch thread, trained by `scripts/_peers_d3rlpy.py` inside
a venv of their own (`.bench/d3rlpy-venv`, created on first use: torch 2.13.0 CPU first, then
d3rlpy 2.8.1, which pins gymnasium 1.0.0, box2d, pygame and pyarrow), so d3rlpy never becomes a
dependency of ours. d3rlpy ignores propensities, so `cartpole-eps-noprop` (the transitions of
`cartpole-eps` without logged_logp) reuses cartpole-eps's peer cells; our row for it fits the
behavior policy. `lander-clipped` stores the raw unclipped Gaussian samples; d3rlpy gets the
executed action clip(a, -1, 1), as a d3rlpy user would have logged it.

Gradient steps (`--steps 12000,6000`: discrete, continuous): the IQL / TD3+BC papers train 1M
steps on D4RL, but one core here does ~56 (IQL), ~81 (TD3+BC), ~230-280 (BC, DiscreteCQL)
steps/s, so 45 cells at 1M steps would take days. d3rlpy's own CartPole quickstart trains
DiscreteCQL with its defaults for 10000 steps; 12000 discrete steps cover that (and one sync of
DiscreteCQL's target network, every 8000 steps by default); 6000 continuous steps keep the whole
benchmark at about an hour on one core (measured: peers 53 min, ours 5-7 min). Each peer is also
evaluated (greedy) at 1/3 and 2/3 of its steps; the second table says whether its return was
still rising, flat or falling over the last third. IQL and TD3+BC (and BC / DiscreteCQL on
lander-eps) are still rising at these counts (IQL on pendulum-gauss plateaus at ~8000 steps, 200
above its 6000-step return): check a peer longer with e.g. `--only peers --datasets
pendulum-gauss --algos IQL --seeds 0 --steps 24000 --checkpoints 6 --out long.json`.

Ours: `TrainConfig()` as it is when this runs (through `config.build`, with `seed` and
`eval_episodes` set), trained by `offpg_offline.train.train`; its `online/greedy_return_mean`
and `online/return_mean` (stochastic). Evaluation (both): seed s is evaluated on 20 episodes,
episode i reset with 10_000 + s + i (`training/monitor.online_metrics`); actions of a
continuous policy are clipped to the env's bounds. A peer's stochastic policy (IQL's Gaussian;
`sample_action`) seeds torch with 10_000 + s + i per episode; where `sample_action` equals
`predict` (BC, DiscreteCQL, TD3+BC) the table says "= greedy". Before training, one episode of a
fixed random action sequence is run in every env under both gymnasium versions; the JSON records
whether they agree (they did: CartPole, LunarLander (both), Pendulum, MountainCarContinuous).

Every cell (log, algorithm, seed) is cached in --out (JSON); peer cells are reused unless
--rerun or their step count differs; our cells are re-run whenever `--only` selects them.
Prints Markdown tables and writes them to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".bench" / "d3rlpy-venv"
WORKER = ROOT / "scripts" / "_peers_d3rlpy.py"
D3RLPY = "2.8.1"
# torch first, alone: any other version would make pip fetch a multi-GB CUDA build.
INSTALLS = (["torch==2.13.0"], [f"d3rlpy=={D3RLPY}", "box2d==2.3.10", "pygame", "pyarrow"])
CONSTRAINTS = f"torch==2.13.0\nd3rlpy=={D3RLPY}\n"
LOGS = [
    "cartpole-eps", "cartpole-eps-noprop", "cartpole-weak", "lander-eps",
    "pendulum-gauss", "lander-clipped", "mountaincar-gauss",
]
PEERS = {"discrete": ["BC", "CQL"], "continuous": ["BC", "IQL", "TD3+BC"]}
ALL_PEERS = ["BC", "CQL", "IQL", "TD3+BC"]
SAME_TRANSITIONS = {"cartpole-eps-noprop": "cartpole-eps"}  # d3rlpy ignores propensities
EVAL_SEED_OFFSET = 10_000  # training/monitor.online_metrics: seed s -> episodes 10_000 + s + i


class BenchError(Exception):
    """A one-sentence reason to stop (exit 2)."""


def ensure_venv(venv: Path = VENV) -> Path:
    """The d3rlpy venv's python, creating the venv on first use."""
    python = venv / "bin" / "python"
    probe = f"import d3rlpy, sys; sys.exit(d3rlpy.__version__ != {D3RLPY!r})"
    if python.is_file():
        found = subprocess.run([python, "-c", probe], capture_output=True)  # d3rlpy warns of gym
        if found.returncode == 0:
            return python
    print(f"creating {venv} (torch 2.13.0 CPU, d3rlpy {D3RLPY}) ...", flush=True)
    constraints = venv.parent / "d3rlpy-constraints.txt"
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
        constraints.write_text(CONSTRAINTS)
    except OSError as error:
        raise BenchError(f"cannot create the d3rlpy venv {venv}: {error.strerror}") from None
    steps = [[sys.executable, "-m", "venv", str(venv)]] + [
        [str(python), "-m", "pip", "install", "-q", "-c", str(constraints), *packages]
        for packages in INSTALLS
    ]
    for command in steps:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            packages = " ".join(command[7:])
            what = "python -m venv" if command[2] == "venv" else f"pip install {packages}"
            raise BenchError(f"cannot create the d3rlpy venv {venv}: {what} failed ({last})")
    return python


def dataset_dir(name: str) -> Path:
    """A shipped log's folder, or a BenchError naming what is missing."""
    path = ROOT / "datasets" / name
    if not (path / "_dataset.json").is_file() or not any(path.glob("part-*.parquet")):
        raise BenchError(f"dataset {name!r} is missing: no {path}/_dataset.json with "
                         f"part-*.parquet shards")
    return path


def card_of(name: str) -> dict[str, Any]:
    return json.loads((dataset_dir(name) / "_dataset.json").read_text())


def kind_of(card: dict[str, Any]) -> str:
    return "discrete" if card["action_space"]["type"] == "Discrete" else "continuous"


def env_check(python: Path, names: list[str]) -> dict[str, Any]:
    """One fixed-action-sequence episode per env under gymnasium 1.0.0 (d3rlpy venv) and ours."""
    checks: dict[str, Any] = {}
    seen: set[str] = set()
    for name in names:
        env_id = card_of(name)["env_spec"]["id"]
        if env_id in seen:
            continue
        seen.add(env_id)
        command = [str(WORKER), "--dataset", str(dataset_dir(name)), "--env-check"]
        theirs = subprocess.run([str(python), *command], capture_output=True, text=True)
        ours = subprocess.run([sys.executable, *command], capture_output=True, text=True)
        if theirs.returncode != 0 or ours.returncode != 0:
            raise BenchError(f"the fixed-action episode of {env_id} failed to run")
        a, b = json.loads(theirs.stdout.splitlines()[-1]), json.loads(ours.stdout.splitlines()[-1])
        checks[env_id] = {"identical": a == b, "return": a[0], "length": a[1]}
        if a != b:
            print(f"WARNING: {env_id} differs between gymnasium versions: {a[:2]} vs {b[:2]}")
    return checks


def run_peer(python: Path, name: str, algo: str, seed: int, args: argparse.Namespace) -> dict:
    """One d3rlpy cell, in the d3rlpy venv, on 1 thread."""
    steps = args.steps[kind_of(card_of(name))]
    command = [
        str(python), str(WORKER), "--dataset", str(dataset_dir(name)), "--algo", algo,
        "--seed", str(seed), "--steps", str(steps), "--checkpoints", str(args.checkpoints),
        "--episodes", str(args.episodes), "--eval-seed", str(EVAL_SEED_OFFSET + seed),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"the d3rlpy worker failed on {name} {algo} seed {seed}: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_ours(name: str, seed: int, episodes: int, scratch: Path) -> dict[str, Any]:
    """Our default configuration (TrainConfig() now) on one log and seed."""
    import torch
    from bench_quality import dataset_for  # scripts/ is on sys.path when run as a script

    from offpg_offline.config import TrainConfig, build
    from offpg_offline.train import train

    torch.set_num_threads(1)
    start = time.perf_counter()
    dataset, propensity = dataset_for(name, seed, scratch)  # noprop: π_β fitted first
    overrides: dict[str, Any] = {**propensity, "seed": seed, "eval_episodes": episodes}
    config = build(TrainConfig, "train", {**dataclasses.asdict(TrainConfig()), **overrides})
    result = train(dataset, config, out_dir=scratch / f"{name}-{seed}")
    config = result.config or config  # what train used: estimator, lr, steps, bc_steps resolved
    seconds = time.perf_counter() - start
    metrics = result.metrics
    return {
        "dataset": name, "algo": "ours", "seed": seed, "episodes": episodes,
        "eval_seed": EVAL_SEED_OFFSET + seed, "steps": config.steps,
        "greedy_mean": metrics["online/greedy_return_mean"],
        "stochastic_mean": metrics["online/return_mean"], "seconds": seconds, "threads": 1,
        "config": {k: str(v) for k, v in dataclasses.asdict(config).items()},
    }


def cell_key(name: str, algo: str, seed: int) -> str:
    return f"{name}|{algo}|{seed}"


def planned_cells(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(log, algorithm, seed) to compute: peers (not noprop: its transitions are cartpole-eps's)
    and ours, as `--only` / `--algos` select."""
    cells = []
    for seed in args.seeds:  # seed outermost: a stopped run still has every log
        for name in args.datasets:
            kind = kind_of(card_of(name))
            if args.only in ("peers", "all") and name not in SAME_TRANSITIONS:
                cells += [(name, a, seed) for a in PEERS[kind] if a in args.algos]
            if args.only in ("ours", "all"):
                cells.append((name, "ours", seed))
    return cells


def save(path: Path, data: dict[str, Any]) -> None:
    """Write the results atomically (a crash never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp-write")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def run_cells(args: argparse.Namespace, data: dict[str, Any]) -> None:
    """Compute the planned cells not in the cache, saving after each one."""
    cells = planned_cells(args)
    python = ensure_venv() if any(a != "ours" for _, a, _ in cells) else None
    if python is not None and "env_check" not in data:
        data["env_check"] = env_check(python, args.datasets)
        save(args.out, data)
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, algo, seed) in enumerate(cells, 1):
            key = cell_key(name, algo, seed)
            cached = data["cells"].get(key)
            steps = args.steps[kind_of(card_of(name))]
            if algo != "ours" and cached and not args.rerun and cached.get("steps") == steps:
                continue
            print(f"[{index}/{len(cells)}] {name} {algo} seed {seed} ...", end=" ", flush=True)
            start = time.perf_counter()
            if algo == "ours":
                cell = run_ours(name, seed, args.episodes, Path(scratch))
            else:
                assert python is not None
                cell = run_peer(python, name, algo, seed, args)
            cell["wall_seconds"] = time.perf_counter() - start
            data["cells"][key] = cell
            save(args.out, data)
            stochastic = cell.get("stochastic_mean")
            print(f"greedy {cell['greedy_mean']:.1f}, stochastic "
                  f"{'= greedy' if stochastic is None else f'{stochastic:.1f}'} "
                  f"({cell['wall_seconds']:.0f} s; elapsed {time.perf_counter() - begin:.0f} s)",
                  flush=True)


def values(data: dict[str, Any], name: str, algo: str, field: str, seeds: list[int]) -> list:
    """A field of the cached cells of (log, algorithm) over seeds (noprop's peers: cartpole-eps)."""
    if algo != "ours":
        name = SAME_TRANSITIONS.get(name, name)
    cells = [data["cells"].get(cell_key(name, algo, seed)) for seed in seeds]
    return [cell[field] for cell in cells if cell is not None and cell.get(field) is not None]


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "—"
    return f"{statistics.mean(xs):.1f} ± {statistics.pstdev(xs):.1f}"


def peer_cell(data: dict[str, Any], name: str, algo: str, seeds: list[int]) -> str:
    greedy = values(data, name, algo, "greedy_mean", seeds)
    if not greedy:
        return "—"
    stochastic = values(data, name, algo, "stochastic_mean", seeds)
    return f"{mean_std(greedy)} / {mean_std(stochastic) if stochastic else '= greedy'}"


def compare(ours: list[float], best: tuple[str, float] | None) -> tuple[str, str]:
    """'ours / best peer' (only when both means are positive) and 'ours − best peer (who wins)'."""
    if not ours or best is None:
        return "—", "—"
    mine, (algo, theirs) = statistics.mean(ours), best
    ratio = f"{mine / theirs:.2f}" if mine > 0 and theirs > 0 else "— (returns ≤ 0)"
    winner = "ours better" if mine > theirs else (f"{algo} better" if mine < theirs else "tie")
    return ratio, f"{mine - theirs:+.1f} ({winner})"


def results_table(data: dict[str, Any], names: list[str], seeds: list[int]) -> str:
    """Rows = logs; behavior, each peer greedy / stochastic, ours, ratio and difference."""
    head = ["log", "behavior (log / its greedy controller)"]
    head += [f"d3rlpy {a} greedy / stochastic" for a in ALL_PEERS]
    head += ["ours greedy", "ours stochastic", "ours / best peer (greedy)",
             "ours − best peer (greedy)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        card = card_of(name)
        behavior = card["behavior"]
        greedy_behavior = behavior.get("greedy_mean_return", math.nan)
        row = [name + (" ¹" if name in SAME_TRANSITIONS else ""),
               f"{behavior['mean_return']:.1f} / {greedy_behavior:.1f}"]
        means = {a: statistics.mean(v) for a in ALL_PEERS
                 if (v := values(data, name, a, "greedy_mean", seeds))}
        row += [peer_cell(data, name, a, seeds) for a in ALL_PEERS]
        ours = values(data, name, "ours", "greedy_mean", seeds)
        row += [mean_std(ours), mean_std(values(data, name, "ours", "stochastic_mean", seeds))]
        best = max(means.items(), key=lambda kv: kv[1]) if means else None
        row += list(compare(ours, best))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plateau_table(data: dict[str, Any], names: list[str], seeds: list[int]) -> str:
    """Each peer's greedy return (mean over seeds) at 1/3, 2/3 and all of its steps, and whether
    the last third still moved it by more than max(seed std, 5 % of |return|)."""
    lines = ["| log | d3rlpy | greedy return during training (step: mean over seeds) "
             "| last third |", "|---|---|---|---|"]
    for name in names:
        if name in SAME_TRANSITIONS:
            continue
        for algo in ALL_PEERS:
            curves = values(data, name, algo, "curve", seeds)
            if not curves:
                continue
            n = min(map(len, curves))
            points = [(int(curves[0][i][0]), statistics.mean(c[i][1] for c in curves))
                      for i in range(n)]
            finals = [c[-1][1] for c in curves]
            delta = points[-1][1] - points[-2][1] if len(points) > 1 else 0.0
            margin = max(statistics.pstdev(finals), 0.05 * abs(points[-1][1]))
            verdict = "rising" if delta > margin else ("falling" if delta < -margin else "flat")
            path = ", ".join(f"{step}: {value:.1f}" for step, value in points)
            lines.append(f"| {name} | {algo} | {path} | {verdict} ({delta:+.1f}) |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", choices=["all", "peers", "ours", "table"], default="all",
        help="which cells to compute (table: none, print the tables of the cached cells)",
    )
    parser.add_argument("--datasets", default=",".join(LOGS))
    parser.add_argument("--algos", default=",".join(ALL_PEERS), help="peers to run")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--steps", default="12000,6000",
        help="d3rlpy gradient steps: DISCRETE,CONTINUOUS or one number for both",
    )
    parser.add_argument("--checkpoints", type=int, default=3, help="greedy evaluations en route")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--rerun", action="store_true", help="recompute cached peer cells")
    parser.add_argument("--out", type=Path, default=Path("bench_peers.json"))
    args = parser.parse_args(argv)
    args.datasets = args.datasets.split(",")
    args.algos = args.algos.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(args.algos) - set(ALL_PEERS))
    if unknown:
        parser.error(f"--algos: unknown {unknown}; choose from {ALL_PEERS}")
    try:
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        parser.error(f"--steps: expected N or DISCRETE,CONTINUOUS, got {args.steps!r}")
    if len(steps) not in (1, 2) or any(n <= 0 or n % args.checkpoints for n in steps):
        parser.error("--steps: one or two positive multiples of --checkpoints")
    args.steps = {"discrete": steps[0], "continuous": steps[-1]}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for name in args.datasets:
            dataset_dir(name)
        data = json.loads(args.out.read_text()) if args.out.is_file() else {"cells": {}}
        run_cells(args, data)
    except BenchError as error:
        print(f"bench_peers: {error}", file=sys.stderr)
        return 2
    data["table"] = results_table(data, args.datasets, args.seeds)
    data["plateau_table"] = plateau_table(data, args.datasets, args.seeds)
    data["d3rlpy"] = D3RLPY
    save(args.out, data)
    print(f"\ngreedy / stochastic returns, mean ± std over seeds {args.seeds}, "
          f"{args.episodes} seeded episodes each\n")
    print(data["table"])
    print("\n¹ d3rlpy ignores propensities: its cells are cartpole-eps's (same transitions); "
          "ours fits the behavior policy.\n")
    print(data["plateau_table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
