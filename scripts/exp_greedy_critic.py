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

Anchors and controls measured in the second round (README, "The default configuration, and
why"): `--anchor-coef w` replaces the sampled KL(π_θ‖π_β) (a noisy estimate from the logged
actions) by w · KL(π_θ(·|s)‖π_c(·|s)) in closed form between the Gaussians of π_θ and the
frozen clone π_c, whose gradient is exactly 0 at the clone's mean; `--bc-coef` adds the logged
actions' negative log-likelihood (TD3+BC's BC term); `--no-pg` zeroes the advantages (the
anchors alone); `--pessimistic` takes min(Q̂₁, Q̂₂) at the logged action; `--gpi` takes
max(Q̂(s, a), G_t) and max(Q̂(s, μ_θ(s)), V̂(s)) — generalised policy improvement over μ_θ and
the logger; `--critic logger` keeps the default's G_t − V̂(s_t) and fits no Q̂; `--ema` and
`--decay` evaluate an average of θ and decay the learning rate. Each run reports the batch's
mean |Â| and mean |Q̂(s, a)| (first and last 100 steps) in reward units.

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
from offpg_offline.data.stream import LogView
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
                 "estimator": "per-step",  # this script adds its own critic to per-step
                 "kl_coef": args.kl_coef, "bc_steps": args.bc_steps, **propensity}
    if args.lr is not None:
        overrides["lr"] = args.lr
    config = build(TrainConfig, "train", {**dataclasses.asdict(TrainConfig()), **overrides})
    config = resolve_auto(config, discrete_actions=actions_are_discrete(dataset, config))
    data = prepare_data(dataset, config)
    env_id, _ = resolve_env(data.card, config)
    policy, optimizer, bc = build_policy(data, config, distributed.setup("cpu"), None, env_id)
    clone = copy.deepcopy(policy).requires_grad_(False)
    if args.anchor_coef:  # the analytic KL to the clone replaces the sampled KL(π_θ‖π_β)
        config = dataclasses.replace(config, kl_coef=0.0)
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

    def anchor(obs: Tensor) -> Tensor:
        """`--anchor-coef` × KL(N(μ_θ, σ_θ)‖N(μ_c, σ_c)) per state, closed form, between the
        policies' (pre-squash or pre-truncation) Gaussians; 0 when off."""
        if not args.anchor_coef:
            return torch.zeros(())
        mean, log_std = policy.distribution_params(obs)
        with torch.no_grad():
            c_mean, c_log_std = clone.distribution_params(obs)
        kl = (c_log_std - log_std + ((2 * log_std).exp() + (mean - c_mean) ** 2)
              / (2 * (2 * c_log_std).exp()) - 0.5).sum(-1).mean()
        return args.anchor_coef * kl

    scales: list[tuple[float, float]] = []  # per step: mean |Â|, mean |Q̂(s, a)| of the batch

    def greedy_targets(batch: LogView) -> LogView:
        """The rows with Q̂(s, a) as target and Q̂(s, μ_θ(s)) as baseline (options applied)."""
        with torch.no_grad():
            x_logged = q_input(batch.obs, batch.action)
            q_logged = critics[0](x_logged).squeeze(-1) * scale
            if args.pessimistic:  # the twin critics' lower bound at the logged action
                q_logged = torch.minimum(q_logged, critics[1](x_logged).squeeze(-1) * scale)
            q_greedy = critics[0](q_input(batch.obs, policy.mode(batch.obs))).squeeze(-1) * scale
        if args.alpha is not None:  # TD3+BC's λ = α / mean|Q̂|: the step's scale is Q̂-free
            factor = args.alpha / q_logged.abs().mean().clamp_min(1e-6)
            q_logged, q_greedy = q_logged * factor, q_greedy * factor
        if args.no_pg:  # control: the anchors alone (KL, --anchor-coef, --bc-coef)
            q_logged, q_greedy = torch.zeros_like(q_logged), torch.zeros_like(q_greedy)
        if args.gpi:  # generalised policy improvement over {μ_θ, β}: max of the two critics
            q_logged = torch.maximum(q_logged, batch.reward)
            q_greedy = torch.maximum(q_greedy, batch.baseline)
        scales.append((float((q_logged - q_greedy).abs().mean()), float(q_logged.abs().mean())))
        return dataclasses.replace(batch, reward=q_logged, baseline=q_greedy)

    start = time.perf_counter()
    logger_critic = args.critic == "logger"
    for _ in range(0 if logger_critic else args.warm):
        q_step()
    batches = torch.Generator().manual_seed(2000 + seed)
    averaged = None if not args.ema else torch.optim.swa_utils.AveragedModel(
        policy, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / config.steps)) if args.decay
        else 1.0)
    for _ in range(config.steps):
        for _ in range(0 if logger_critic else args.q_per_step):
            q_step()
        batch = view.rows(torch.randperm(view.n_rows, generator=batches)[: config.batch_steps],
                          as_steps=True)
        if not logger_critic:  # else the default's own advantage, G_t − V̂(s_t)
            batch = greedy_targets(batch)
        target_logp = policy.log_prob(batch.obs, batch.action)
        loss = loss_of(target_logp, batch, config) + anchor(batch.obs)
        if args.bc_coef:  # forward KL(π_β‖π_θ) up to a constant: the logged actions' likelihood
            loss = loss - args.bc_coef * target_logp.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if averaged is not None:
            averaged.update_parameters(policy)
    seconds = time.perf_counter() - start
    if averaged is not None:
        policy.load_state_dict(averaged.module.state_dict())
    online = online_metrics(policy, env_id, config)
    return {"dataset": name, "seed": seed, "greedy": online["online/greedy_return_mean"],
            "stochastic": online["online/return_mean"], "bc_greedy": bc["bc/greedy_return_mean"],
            "seconds": round(seconds, 1),
            **({} if not scales else {
                "adv_scale_first": round(statistics.mean(a for a, _ in scales[:100]), 3),
                "adv_scale_last": round(statistics.mean(a for a, _ in scales[-100:]), 3),
                "q_scale_last": round(statistics.mean(q for _, q in scales[-100:]), 3)})}


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
    parser.add_argument("--no-pg", action="store_true",
                        help="control: zero advantages, so only the KL, --anchor-coef and "
                        "--bc-coef terms act")
    parser.add_argument("--anchor-coef", type=float, default=0.0,
                        help="replace the sampled KL(π_θ‖π_β) by this weight times the "
                        "closed-form KL(π_θ‖π_clone) on the batch's states")
    parser.add_argument("--critic", choices=("greedy", "logger"), default="greedy",
                        help="logger: the default's advantage G_t − V̂(s_t), no Q̂ is fitted")
    parser.add_argument("--ema", type=float, default=None,
                        help="evaluate the exponential moving average of θ with this decay")
    parser.add_argument("--decay", action="store_true", help="cosine learning-rate decay to 0")
    parser.add_argument("--pessimistic", action="store_true",
                        help="target min(Q̂₁, Q̂₂)(s, a) instead of Q̂₁(s, a)")
    parser.add_argument("--gpi", action="store_true",
                        help="target max(Q̂(s, a), G_t) and baseline max(Q̂(s, μ_θ(s)), V̂(s)): "
                        "the better of the greedy policy's critic and the logger's")
    parser.add_argument("--bc-coef", type=float, default=0.0,
                        help="weight of −mean log π_θ(a|s) on the batch's logged actions (a "
                        "behavior-cloning anchor, the forward KL(π_β‖π_θ) up to a constant)")
    args = parser.parse_args()
    if args.critic == "logger":  # these act on Q̂, which the logger's advantage does not use
        chosen = {"--alpha": args.alpha is not None, "--no-pg": args.no_pg,
                  "--pessimistic": args.pessimistic, "--gpi": args.gpi}
        q_only = [flag for flag, on in chosen.items() if on]
        if q_only:
            parser.error(f"{', '.join(q_only)} act on the greedy critic's Q̂ and cannot be "
                         "combined with --critic logger")
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
