"""Experiment (not part of the tool): per-step policy gradient with a critic of the *greedy*
policy, refreshed during training — the candidate fix measured for issue 15.

The default's advantage is G_t − V̂(s_t), a Monte-Carlo estimate of A^β (the logger's). Here
it is Â(s, a) = Q̂(s, clip(a)) − Q̂(s, μ_θ(s)), with Q̂ ≈ Q^{μ_θ} the greedy policy's action
value: twin Q networks (256×256 ReLU) fitted by TD3-style fitted-Q evaluation on the training
episodes,

    y = r/c + γ (1 − terminated) min_j Q̄_j(s', clip(μ_θ(s') + ε)),  ε ~ clip(N(0, 0.2²), ±0.5)
        (in units of the half action range; c = mean |r|; Q̄ Polyak-averaged with τ = 0.005),

`--warm` Adam steps on the behavior-cloned start, then `--q-per-step` steps before every
policy-gradient step, so Q̂ follows μ_θ as it moves. The policy-gradient step is the default's
own loss (`train.loss_of`: ρ capped at 2, KL weight 2) on 2048 logged rows with Q̂(s, a) as the
row's target and Q̂(s, μ_θ(s)) as its baseline. `--kappa` multiplies the clone's σ by κ and
freezes it (κ < 1: the gradient of a narrower policy, closer to the greedy one deployed);
`--alpha` rescales both by α / mean|Q̂(s, a)| over the batch (TD3+BC's normalisation), so the
KL weight's pull no longer depends on the reward's scale.

Continuous actions only. Prints one JSON line per run and a summary per (dataset, setting):

    python scripts/exp_greedy_critic.py --datasets lander-clipped,pendulum-gauss --kappa 0.5
"""

from __future__ import annotations

import argparse
import copy
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
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import dataset_for

from offpg_offline import distributed
from offpg_offline.config import TrainConfig, build, resolve_auto
from offpg_offline.data.spaces import space_from_json
from offpg_offline.train import build_policy, loss_of
from offpg_offline.training.monitor import online_metrics, resolve_env
from offpg_offline.training.prepare import actions_are_discrete, prepare_data

TAU, TARGET_NOISE, NOISE_CLIP, Q_BATCH, Q_HIDDEN, Q_LR = 0.005, 0.2, 0.5, 256, 256, 3e-4


def q_net(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, Q_HIDDEN), nn.ReLU(), nn.Linear(Q_HIDDEN, Q_HIDDEN),
                         nn.ReLU(), nn.Linear(Q_HIDDEN, 1))


def run(name: str, seed: int, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Train one policy with the greedy-policy critic; its online greedy/stochastic returns."""
    dataset, propensity = dataset_for(name, seed, scratch)
    overrides = {"seed": seed, "eval_episodes": args.episodes, "steps": args.steps,
                 "kl_coef": args.kl_coef, "bc_steps": args.bc_steps, **propensity}
    if args.lr is not None:
        overrides["lr"] = args.lr
    config = build(TrainConfig, "train", {**dataclasses.asdict(TrainConfig()), **overrides})
    config = resolve_auto(config, discrete_actions=actions_are_discrete(dataset, config))
    data = prepare_data(dataset, config)
    env_id, _ = resolve_env(data.card, config)
    policy, optimizer, bc = build_policy(data, config, distributed.setup("cpu"), None, env_id)
    if args.kappa != 1.0:
        policy.log_std.data += math.log(args.kappa)
        policy.log_std.requires_grad_(False)
    space = space_from_json(data.card.get("env_action_space", data.card["action_space"]))
    low = torch.as_tensor(space.low, dtype=torch.float32)
    high = torch.as_tensor(space.high, dtype=torch.float32)
    episodes, view = data.train_batch, data.train_view
    obs_mean, obs_std = episodes.obs.mean(0), episodes.obs.std(0).clamp_min(1e-6)
    scale = float(episodes.reward.abs().mean().clamp_min(1e-6))
    not_done = 1.0 - episodes.terminated.float()

    def q_input(obs: Tensor, action: Tensor) -> Tensor:
        action = torch.maximum(torch.minimum(action, high), low)
        return torch.cat([(obs - obs_mean) / obs_std, (2 * action - low - high) / (high - low)], -1)

    generator = torch.Generator().manual_seed(1000 + seed)
    torch.manual_seed(1000 + seed)
    width = episodes.obs.shape[1] + episodes.action.shape[1]
    critics = [q_net(width), q_net(width)]
    targets = [copy.deepcopy(q) for q in critics]
    q_optimizer = torch.optim.Adam([p for q in critics for p in q.parameters()], lr=Q_LR)

    def q_step() -> None:
        rows = torch.randint(0, episodes.n_steps, (Q_BATCH,), generator=generator)
        with torch.no_grad():
            following = policy.mode(episodes.next_obs[rows])
            noise = torch.randn(following.shape, generator=generator) * TARGET_NOISE
            following = following + noise.clamp(-NOISE_CLIP, NOISE_CLIP) * (high - low) / 2
            x_next = q_input(episodes.next_obs[rows], following)
            bootstrap = torch.minimum(*(t(x_next).squeeze(-1) for t in targets))
            y = episodes.reward[rows] / scale + config.gamma * not_done[rows] * bootstrap
        x = q_input(episodes.obs[rows], episodes.action[rows])
        loss = sum(((q(x).squeeze(-1) - y) ** 2).mean() for q in critics)
        q_optimizer.zero_grad()
        loss.backward()
        q_optimizer.step()
        with torch.no_grad():
            for q, target in zip(critics, targets, strict=True):
                for p, tp in zip(q.parameters(), target.parameters(), strict=True):
                    tp.lerp_(p, TAU)

    start = time.perf_counter()
    for _ in range(args.warm):
        q_step()
    batches = torch.Generator().manual_seed(2000 + seed)
    for _ in range(config.steps):
        for _ in range(args.q_per_step):
            q_step()
        batch = view.rows(torch.randperm(view.n_rows, generator=batches)[: config.batch_steps],
                          as_steps=True)
        with torch.no_grad():
            q_logged = critics[0](q_input(batch.obs, batch.action)).squeeze(-1) * scale
            q_greedy = critics[0](q_input(batch.obs, policy.mode(batch.obs))).squeeze(-1) * scale
        if args.alpha is not None:  # TD3+BC's λ = α / mean|Q̂|: the step's scale is Q̂-free
            factor = args.alpha / q_logged.abs().mean().clamp_min(1e-6)
            q_logged, q_greedy = q_logged * factor, q_greedy * factor
        batch = dataclasses.replace(batch, reward=q_logged, baseline=q_greedy)
        loss = loss_of(policy.log_prob(batch.obs, batch.action), batch, config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    online = online_metrics(policy, env_id, config)
    return {"dataset": name, "seed": seed, "greedy": online["online/greedy_return_mean"],
            "stochastic": online["online/return_mean"], "bc_greedy": bc["bc/greedy_return_mean"],
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="lander-clipped,pendulum-gauss")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--kappa", type=float, default=1.0,
                        help="multiply the clone's σ by κ and freeze it; 1: σ is learned")
    parser.add_argument("--steps", type=int, default=1000, help="policy-gradient steps")
    parser.add_argument("--lr", type=float, default=None, help="default: lr auto")
    parser.add_argument("--kl-coef", type=float, default=2.0)
    parser.add_argument("--bc-steps", type=int, default=5000)
    parser.add_argument("--warm", type=int, default=5000, help="critic steps before the loop")
    parser.add_argument("--q-per-step", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=None,
                        help="divide Q̂ by the batch's mean |Q̂| and multiply by α (TD3+BC's "
                        "normalisation); default: Q̂ in reward units")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.datasets.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                row = run(name, seed, args, Path(scratch))
                print(json.dumps(row), flush=True)
                results.setdefault(name, []).append(row)
    for name, rows in results.items():
        greedy = [r["greedy"] for r in rows]
        spread = statistics.pstdev(greedy) if len(greedy) > 1 else 0.0
        print(f"{name}: greedy {statistics.mean(greedy):.1f} ± {spread:.1f} "
              f"({' / '.join(f'{g:.1f}' for g in greedy)}), stochastic "
              f"{statistics.mean(r['stochastic'] for r in rows):.1f}")


if __name__ == "__main__":
    main()
