r"""The `greedy-critic` estimator's in-training critic Q̂ ≈ Q^{μ_θ}, and its KL anchor.

The estimator (estimators/critic.py, `greedy_critic_surrogate`) is the per-step gradient
E_β[ρ_t ∇log π_θ(a_t|s_t) Â(s_t, a_t)] with the advantage of the *greedy* policy μ_θ(s) (the
mode of π_θ, the policy a user deploys), under generalised policy improvement (GPI) over
{μ_θ, β}:

    Â(s, a) = max(Q̂(s, a), G_t) − max(Q̂(s, μ_θ(s)), V̂(s))

G_t and V̂(s_t) are the row's logged return-to-go and the value baseline (V̂ ≈ V^β), which the
per-step rows already carry; Q̂ is the first of twin Q networks (256×256 ReLU) fitted TD3-style
(Fujimoto et al. 2018) on the training episodes' transitions:

    y = r/c + γ (1 − terminated) min_j Q̄_j(s', clip(μ_θ(s') + ε)),  ε ~ clip(N(0, 0.2²), ±0.5)

in units of the half action range, c = mean |r| (Q̂ is multiplied back by c), Q̄ the
Polyak-averaged (τ = 0.005) target networks. `WARM_STEPS` Adam steps (lr 3e-4, 256 rows) fit
Q̂ to the behavior-cloned start; `STEPS_PER_UPDATE` more precede every policy-gradient step, so
Q̂ follows μ_θ as it moves. Every critic step draws its rows and noise from its own stream
(`stream(seed, "greedy-critic", step)`), so a resumed run repeats the uninterrupted one bit for
bit; on N ranks each computes the same critic steps on the same rows (replicated, not split: the
critic sees every training transition on every rank). A streamed log's critic is fitted on the
in-memory sample of whole training episodes (`prepare.STREAM_SAMPLE_STEPS` rows).

The KL penalty of this estimator is KL(π_θ(·|s) ‖ π_c(·|s)) in closed form between the
pre-squash Gaussians of π_θ and of the frozen behavior-cloned start π_c (an estimate of π_β),
weight `kl_coef`, on the batch's states; π_θ's σ is frozen at `STD_SCALE` × the clone's, so the
anchor pulls only the mean (its gradient is 0 at the clone's mean).

Measured on the shipped continuous logs (README, "The default configuration, and why"): each
part is needed — without GPI mountaincar-gauss fell from 95 to 34, with σ learned (κ = 1)
lander-clipped from 284 to 276, with a 5000-step clone to 278.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from offpg_offline.data.batch import StepBatch
from offpg_offline.data.stream import LogView
from offpg_offline.training.batches import stream

WARM_STEPS = 5000  # critic steps on the clone before the first policy-gradient step
STEPS_PER_UPDATE = 2  # critic steps before each policy-gradient step
STD_SCALE = 0.5  # π_θ's σ, frozen, as a multiple of the clone's (κ; 1.0 scored 276 vs 284)
HIDDEN, BATCH, LR, TAU = 256, 256, 3e-4, 0.005
TARGET_NOISE, NOISE_CLIP = 0.2, 0.5  # in units of the half action range


def _q_net(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN),
                         nn.ReLU(), nn.Linear(HIDDEN, 1))


def check_policy(policy: nn.Module) -> None:
    """Refuse a policy the estimator cannot use: it needs a Gaussian-family policy with a
    state-independent learned σ (`log_std`), whose mode is the greedy action."""
    if not hasattr(policy, "distribution_params") or not isinstance(
        getattr(policy, "log_std", None), nn.Parameter
    ):
        raise ValueError(
            "the greedy-critic estimator needs continuous actions and a Gaussian policy with a "
            "state-independent σ (policy gaussian, tanh-gaussian or truncated-gaussian); use "
            "--estimator per-step for this log")


def freeze_std(policy: nn.Module, *, fresh: bool) -> None:
    """σ_θ := STD_SCALE × σ_clone (on a fresh run), then frozen (also on a resumed one)."""
    log_std: nn.Parameter = policy.log_std  # type: ignore[assignment]
    if fresh:
        with torch.no_grad():
            log_std.add_(math.log(STD_SCALE))
    log_std.requires_grad_(False)


def anchor_kl(policy: nn.Module, clone: nn.Module, obs: Tensor) -> Tensor:
    """Mean over the rows of KL(N(μ_θ, σ_θ²) ‖ N(μ_c, σ_c²)) in closed form, summed over action
    dimensions: log σ_c/σ_θ + (σ_θ² + (μ_θ − μ_c)²) / (2σ_c²) − ½ (pre-squash Gaussians)."""
    mean, log_std = policy.distribution_params(obs)  # type: ignore[operator]
    with torch.no_grad():
        c_mean, c_log_std = clone.distribution_params(obs)  # type: ignore[operator]
    kl = (c_log_std - log_std
          + ((2 * log_std).exp() + (mean - c_mean) ** 2) / (2 * (2 * c_log_std).exp()) - 0.5)
    return kl.sum(-1).mean()


class GreedyCritic:
    """Twin Q networks of μ_θ, their targets and Adam state, and the transitions they fit on.

    Args:
        episodes: whole training episodes (s, a, r, s', terminated), [M] rows.
        low, high: the action bounds ([d_a]; ±inf where unbounded: the logged actions' mean
            ± 2 std then stand in for the normalisation, and nothing is clipped).
        gamma: discount γ.
        seed: the networks' initial weights come from it alone (global RNG forked).
        device: where the networks and transitions live.
    """

    def __init__(self, episodes: StepBatch, low: Tensor, high: Tensor, *, gamma: float,
                 seed: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        action = episodes.action.float()
        finite = torch.isfinite(low) & torch.isfinite(high)
        spread = 2 * action.std(0).clamp_min(1e-6)
        centre = action.mean(0)
        self.low = torch.where(finite, low.float(), -math.inf).to(self.device)
        self.high = torch.where(finite, high.float(), math.inf).to(self.device)
        self.centre = torch.where(finite, (low + high).float() / 2, centre).to(self.device)
        self.half = torch.where(finite, (high - low).float() / 2, spread).to(self.device)
        self.obs_mean = episodes.obs.mean(0).to(self.device)
        self.obs_std = episodes.obs.std(0).clamp_min(1e-6).to(self.device)
        self.scale = float(episodes.reward.abs().mean().clamp_min(1e-6))
        self.gamma = gamma
        self.obs = episodes.obs.to(self.device)
        self.action = action.to(self.device)
        self.reward = episodes.reward.float().to(self.device) / self.scale
        self.next_obs = episodes.next_obs.to(self.device)
        self.not_done = (~episodes.terminated.bool()).float().to(self.device)
        width = episodes.obs.shape[1] + action.shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.critics = nn.ModuleList([_q_net(width), _q_net(width)]).to(self.device)
        self.targets = copy.deepcopy(self.critics).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.critics.parameters(), lr=LR)
        self.seed = seed

    def _input(self, obs: Tensor, action: Tensor) -> Tensor:
        action = torch.maximum(torch.minimum(action, self.high), self.low)
        return torch.cat([(obs - self.obs_mean) / self.obs_std,
                          (action - self.centre) / self.half], -1)

    def fit(self, policy: nn.Module, steps: int, generator: torch.Generator,
            on_step: Callable[[float], None] | None = None) -> float:
        """`steps` TD steps towards μ_θ's target (module docstring); the last step's loss.
        `on_step` gets each step's loss (a progress bar)."""
        loss = torch.zeros(())
        for _ in range(steps):
            rows = torch.randint(0, self.obs.shape[0], (BATCH,), generator=generator)
            noise = torch.randn((BATCH, self.action.shape[1]), generator=generator)
            rows, noise = rows.to(self.device), noise.to(self.device)
            with torch.no_grad():
                next_obs = self.next_obs.index_select(0, rows)
                following = policy.mode(next_obs)  # type: ignore[operator]
                noise = (noise * TARGET_NOISE).clamp(-NOISE_CLIP, NOISE_CLIP)
                following = following + noise * self.half
                x_next = self._input(next_obs, following)
                bootstrap = torch.minimum(*(t(x_next).squeeze(-1) for t in self.targets))
                y = self.reward[rows] + self.gamma * self.not_done[rows] * bootstrap
            x = self._input(self.obs.index_select(0, rows), self.action.index_select(0, rows))
            loss = sum(((q(x).squeeze(-1) - y) ** 2).mean() for q in self.critics)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            with torch.no_grad():
                for p, target in zip(self.critics.parameters(), self.targets.parameters(),
                                     strict=True):
                    target.lerp_(p, TAU)
            if on_step is not None:
                on_step(float(loss.detach()))
        return float(loss.detach())

    def warm_up(self, policy: nn.Module, on_step: Callable[[float], None] | None = None) -> float:
        """`WARM_STEPS` critic steps on the starting policy (their own random stream)."""
        return self.fit(policy, WARM_STEPS, stream(self.seed, "greedy-critic-warm"), on_step)

    def before_update(self, policy: nn.Module, step: int) -> float:
        """`STEPS_PER_UPDATE` critic steps before policy-gradient step `step` (1-based)."""
        return self.fit(policy, STEPS_PER_UPDATE, stream(self.seed, "greedy-critic", step))

    def value(self, obs: Tensor, action: Tensor) -> Tensor:
        """Q̂₁(s, a) in reward units, [M] (no gradient)."""
        with torch.no_grad():
            return self.critics[0](self._input(obs, action.float())).squeeze(-1) * self.scale

    def targets_of(self, batch: LogView, policy: nn.Module) -> LogView:
        """`batch` (per-step rows: reward G_t, baseline V̂(s_t) or None) with reward
        max(Q̂(s, a), G_t) and baseline max(Q̂(s, μ_θ(s)), V̂(s)): the GPI advantage."""
        with torch.no_grad():
            logged = torch.maximum(self.value(batch.obs, batch.action), batch.reward)
            greedy = self.value(batch.obs, policy.mode(batch.obs))  # type: ignore[operator]
            if batch.baseline is not None:
                greedy = torch.maximum(greedy, batch.baseline)
        return dataclasses.replace(batch, reward=logged.to(batch.reward.dtype),
                                   baseline=greedy.to(batch.reward.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"critics": self.critics.state_dict(), "targets": self.targets.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.critics.load_state_dict(state["critics"])
        self.targets.load_state_dict(state["targets"])
        self.optimizer.load_state_dict(state["optimizer"])
