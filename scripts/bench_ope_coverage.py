"""Coverage of the OPE intervals on a synthetic MDP whose value J(π) is known exactly.

A 4-state, 2-action MDP with random (seeded) transitions, deterministic rewards in [0, 1], a
random start distribution and a termination probability of 0.25–0.45 per step (γ = 0.9; a time
limit of 60 steps is reached with probability < 1e-7, so the logged horizon's value equals the
infinite-horizon J(π) = start · (I − γ P_π)⁻¹ r_π to 1e-6). β and π are random tabular policies
with every action at probability ≥ 0.15. Each replication logs N episodes with β and computes
every estimator's nominal-95% interval; coverage is the fraction of replications whose interval
contains J(π). For DR, WDR and FQE both critic intervals are computed: `refit` (the critic
refitted on each bootstrap resample, as one batched ensemble) and `fixed` (one critic held
fixed; fast). The critic is linear on one-hot states (tabular, well specified).

    OMP_NUM_THREADS=1 python scripts/bench_ope_coverage.py            # N = 50, 200; 100 reps
    python scripts/bench_ope_coverage.py --reps 20 --sizes 50          # a quick look

A coverage estimate from R replications has a standard error of about √(0.95·0.05/R) (0.022 at
R = 100). Prints a Markdown table and the wall time.
"""

from __future__ import annotations

import argparse
import time

import torch

from offpg_offline.data.batch import StepBatch
from offpg_offline.ope import ESTIMATE_NAMES, FQEConfig, evaluate_offline
from offpg_offline.policies import CategoricalPolicy

F64 = torch.float64
GAMMA = 0.9
N_STATES, N_ACTIONS, TIME_LIMIT = 4, 2, 60
CRITIC = FQEConfig(hidden=(), iterations=15, steps_per_iteration=20, lr=0.1, batch_size=4096)


def make_problem(seed: int = 0) -> dict[str, torch.Tensor]:
    """Transitions [S, A, S+1] (last column: terminate), rewards, start, β, π, and J(π)."""
    gen = torch.Generator().manual_seed(seed)
    live = torch.softmax(torch.randn(N_STATES, N_ACTIONS, N_STATES, generator=gen, dtype=F64), -1)
    stop = 0.25 + 0.2 * torch.rand(N_STATES, N_ACTIONS, 1, generator=gen, dtype=F64)
    transition = torch.cat([(1 - stop) * live, stop], dim=-1)
    reward = torch.rand(N_STATES, N_ACTIONS, generator=gen, dtype=F64)
    start = torch.softmax(torch.randn(N_STATES, generator=gen, dtype=F64), 0)

    def policy() -> torch.Tensor:
        probs = torch.softmax(2 * torch.randn(N_STATES, N_ACTIONS, generator=gen, dtype=F64), -1)
        return 0.15 + (1 - 0.15 * N_ACTIONS) * probs

    behavior, target = policy(), policy()
    p_pi = torch.einsum("sa,sat->st", target, transition[:, :, :-1])
    value = torch.linalg.solve(torch.eye(N_STATES, dtype=F64) - GAMMA * p_pi,
                               (target * reward).sum(1))
    return {"transition": transition, "reward": reward, "start": start, "behavior": behavior,
            "target": target, "exact": start @ value}


def simulate(problem: dict[str, torch.Tensor], n_episodes: int, seed: int) -> StepBatch:
    """N episodes of β, vectorised over episodes (a loop over ≤ 60 time steps)."""
    gen = torch.Generator().manual_seed(seed)
    behavior, transition = problem["behavior"], problem["transition"]
    state = torch.multinomial(problem["start"], n_episodes, replacement=True, generator=gen)
    alive = torch.ones(n_episodes, dtype=torch.bool)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("s", "a", "s2", "term", "trunc",
                                                            "alive")}
    for t in range(TIME_LIMIT):
        action = torch.multinomial(behavior[state], 1, generator=gen)[:, 0]
        nxt = torch.multinomial(transition[state, action], 1, generator=gen)[:, 0]
        terminated = nxt == N_STATES
        for key, value in (("s", state), ("a", action), ("s2", torch.where(terminated, 0, nxt)),
                           ("term", terminated), ("alive", alive.clone()),
                           ("trunc", ~terminated & (t == TIME_LIMIT - 1))):
            rows[key].append(value)
        alive = alive & ~terminated
        state = torch.where(terminated, 0, nxt)
    stacked = {k: torch.stack(v, 1) for k, v in rows.items()}  # [N, T], episode-major
    mask = stacked.pop("alive")
    flat = {k: v[mask] for k, v in stacked.items()}
    step = torch.arange(TIME_LIMIT).expand(n_episodes, -1)[mask]
    eye = torch.eye(N_STATES)
    s, a = flat["s"], flat["a"]
    return StepBatch(
        episode_id=(step == 0).long().cumsum(0) - 1, step=step, obs=eye[s], action=a,
        reward=problem["reward"][s, a].float(), next_obs=eye[flat["s2"]],
        terminated=flat["term"], truncated=flat["trunc"],
        logged_logp=behavior[s, a].log().float(), estimated_logp=None, episode_start=step == 0)


def tabular_policy(probs: torch.Tensor) -> CategoricalPolicy:
    """The real CategoricalPolicy, linear on one-hot states, set to the table `probs`."""
    policy = CategoricalPolicy(N_STATES, N_ACTIONS, hidden=())
    with torch.no_grad():
        policy.net[0].weight.copy_(probs.log().T)
        policy.net[0].bias.zero_()
    return policy


def coverage(n_episodes: int, reps: int, n_boot: int, n_refit: int | None) -> dict[str, float]:
    """Fraction of `reps` seeded replications whose 95% interval contains J(π), per estimator
    (critic estimators as `<name> refit` and `<name> fixed`), and the mean interval widths."""
    problem = make_problem()
    exact, policy = float(problem["exact"]), tabular_policy(problem["target"])
    hits: dict[str, int] = {}
    widths: dict[str, float] = {}
    for rep in range(reps):
        batch = simulate(problem, n_episodes, seed=1000 * n_episodes + rep)
        runs = {
            "refit": evaluate_offline(policy, batch, batch.logged_logp, gamma=GAMMA,
                                      n_boot=n_boot, n_refit=n_refit, seed=rep, fqe=CRITIC,
                                      critic_interval="refit"),
            "fixed": evaluate_offline(policy, batch, batch.logged_logp, gamma=GAMMA,
                                      n_boot=n_boot, seed=rep, fqe=CRITIC,
                                      estimators=("dr", "wdr", "fqe"), critic_interval="fixed"),
        }
        for kind, estimates in runs.items():
            for e in estimates:
                key = f"{e.name} {kind}" if e.name in ("dr", "wdr", "fqe") else e.name
                hits[key] = hits.get(key, 0) + int(e.ci_low <= exact <= e.ci_high)
                widths[key] = widths.get(key, 0.0) + (e.ci_high - e.ci_low) / reps
    return {**{k: v / reps for k, v in hits.items()},
            **{f"{k} width": v for k, v in widths.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--n-boot", type=int, default=1000, help="resamples, fixed intervals")
    parser.add_argument("--n-refit", type=int, default=None,
                        help="critics, refit intervals (default: the library's, min(n-boot, 50))")
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    problem = make_problem()
    print(f"J(π) = {float(problem['exact']):.4f} (γ = {GAMMA}); {args.reps} replications per N; "
          f"nominal 0.95")
    results = {n: coverage(n, args.reps, args.n_boot, args.n_refit) for n in args.sizes}
    names = [n for n in ESTIMATE_NAMES if n not in ("dr", "wdr", "fqe")] + [
        f"{n} {kind}" for n in ("dr", "wdr", "fqe") for kind in ("refit", "fixed")]
    header = " | ".join(f"N = {n}: coverage (mean width)" for n in args.sizes)
    print(f"\n| estimator, interval | {header} |")
    print("|---|" + "---|" * len(args.sizes))
    for name in names:
        cells = " | ".join(f"{results[n][name]:.2f} ({results[n][name + ' width']:.3f})"
                           for n in args.sizes)
        label = name if " " in name else f"{name}, bootstrap"
        print(f"| {label} | {cells} |")
    print(f"\nwall time {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
