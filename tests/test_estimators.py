"""Tests of offpg_offline.estimators: exact identities, slow references, statistical bounds."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from offpg_offline.config import EstimatorName
from offpg_offline.estimators import (
    ESTIMATORS as REGISTRY,
)
from offpg_offline.estimators import (
    SurrogateOptions,
    critic_surrogate,
    cumulative_log_weight,
    discounted_returns,
    episode_sum,
    ess_fraction,
    fraction_clipped,
    greedy_critic_surrogate,
    kl_penalty,
    kl_to_behavior,
    log_ratio,
    max_weight,
    pareto_smooth,
    psis_khat,
    segmented_cumsum,
    weight_diagnostics,
    weight_quantiles,
)
from offpg_offline.estimators import (
    per_decision_surrogate as _per_decision_fn,
)
from offpg_offline.estimators import (
    per_step_surrogate as _per_step_fn,
)
from offpg_offline.estimators import (
    trajectory_surrogate as _trajectory_fn,
)

F64 = torch.float64
PRODUCT = ("trajectory", "per-decision")  # estimators whose weight is a product over steps
_OPTION_FIELDS = {"clip", "clip_mode", "self_normalize", "psis", "ppo_epsilon",
                  "standardize_returns"}


def _with_options(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The surrogate `fn` called with the option keywords gathered into one SurrogateOptions
    (these tests predate the options object and keep their keyword-style call sites)."""
    def call(*args: Any, **kwargs: Any) -> Tensor:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTION_FIELDS}
        return fn(*args, options=SurrogateOptions(**options), **kwargs)
    return call


ESTIMATORS = {name: _with_options(spec.fn) for name, spec in REGISTRY.items()}
per_decision_surrogate = _with_options(_per_decision_fn)
per_step_surrogate = _with_options(_per_step_fn)
trajectory_surrogate = _with_options(_trajectory_fn)


def _flat_log(lengths: list[int], seed: int, scale: float = 1.0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    m = sum(lengths)
    return {
        "target_logp": scale * torch.rand(m, generator=gen, dtype=F64).clamp_min(0.05).log(),
        "behavior_logp": scale * torch.rand(m, generator=gen, dtype=F64).clamp_min(0.05).log(),
        "reward": torch.randn(m, generator=gen, dtype=F64),
        "step": torch.cat([torch.arange(n) for n in lengths]),
        "episode_start": torch.cat([torch.arange(n) == 0 for n in lengths]),
    }


def _bounds(lengths: list[int]) -> list[tuple[int, int]]:
    edges = [0, *itertools.accumulate(lengths)]
    return list(itertools.pairwise(edges))


# --------------------------------------------------------------------------------------------
# Segmented primitives against slow loops
# --------------------------------------------------------------------------------------------

LENGTH_PATTERNS = [[1], [4], [3, 1, 5], [1, 1, 1], [2, 6, 1, 3]]


@pytest.mark.parametrize("lengths", LENGTH_PATTERNS)
def test_segmented_cumsum_and_returns_equal_a_loop(lengths: list[int]) -> None:
    log = _flat_log(lengths, seed=0)
    for gamma in (0.0, 0.5, 0.9, 1.0):
        cumsum = segmented_cumsum(log["reward"], log["episode_start"])
        returns = discounted_returns(log["reward"], log["episode_start"], gamma)
        for a, b in _bounds(lengths):
            r = log["reward"][a:b].tolist()
            expected_returns, running = [], 0.0
            for value in reversed(r):
                running = value + gamma * running
                expected_returns.insert(0, running)
            torch.testing.assert_close(cumsum[a:b], torch.tensor(r, dtype=F64).cumsum(0))
            torch.testing.assert_close(returns[a:b], torch.tensor(expected_returns, dtype=F64))
        torch.testing.assert_close(
            episode_sum(log["reward"], log["episode_start"]),
            torch.tensor([sum(log["reward"][a:b].tolist()) for a, b in _bounds(lengths)],
                         dtype=F64))


def test_discounted_returns_keep_precision_over_a_long_horizon() -> None:
    # γ = 0.9 over 1000 steps: γ^t reaches 1e-46, so the shortcut γ^{-t}·(suffix sum) would
    # return noise in the tail; the scan must match a float64 loop to rounding (1e-12 relative).
    gen = torch.Generator().manual_seed(1)
    reward = torch.randn(1000, generator=gen, dtype=F64)
    start = torch.zeros(1000, dtype=torch.bool)
    start[0] = True
    expected, running = torch.empty(1000, dtype=F64), 0.0
    for t in range(999, -1, -1):
        running = float(reward[t]) + 0.9 * running
        expected[t] = running
    torch.testing.assert_close(discounted_returns(reward, start, 0.9), expected,
                               rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Slow references for every estimator (d3rlpy's ref_* pattern): loops over episodes and steps
# --------------------------------------------------------------------------------------------


def _ref_loss(name: str, log: dict[str, Tensor], *, gamma: float, clip: float | None = None,
              clip_mode: str = "step", self_normalize: bool = False,
              baseline: float | Tensor | None = None, standardize_returns: bool = False,
              ppo_epsilon: float | None = None) -> Tensor:
    lengths = [b - a for a, b in _bounds_of(log["episode_start"])]
    spans = _bounds(lengths)
    n = len(spans)
    tl, bl, rew = log["target_logp"], log["behavior_logp"].detach(), log["reward"]
    m = tl.shape[0]
    base = [0.0] * m if baseline is None else (
        [float(baseline)] * m if isinstance(baseline, float) else baseline.tolist())
    cap = math.inf if clip is None else clip
    rho = [torch.exp(tl[i] - bl[i]) for i in range(m)]
    rho_capped = [torch.clamp(r, max=cap) if clip_mode == "step" else r for r in rho]
    disc = [gamma ** int(log["step"][i]) for i in range(m)]
    # cumulative weights w_{1:t}, per episode
    w: list[Tensor] = []
    for a, b in spans:
        running = torch.ones((), dtype=F64)
        for i in range(a, b):
            running = running * rho_capped[i]
            w.append(torch.clamp(running, max=cap) if clip_mode == "cumulative" else running)
    ret: list[float] = []
    for a, b in spans:
        g, out = 0.0, []
        for i in range(b - 1, a - 1, -1):
            g = float(rew[i]) + gamma * g
            out.insert(0, g)
        ret += out
    if name in ("critic", "greedy-critic"):  # the reward column is Q̂(s_t, a_t): not summed
        ret = [float(rew[i]) for i in range(m)]
    adv = [ret[i] - base[i] for i in range(m)]

    def standardized(values: list[float]) -> tuple[float, float]:
        t = torch.tensor(values, dtype=F64)
        return float(t.mean()), max(float(t.std(correction=0)), 1e-8)

    def position_normaliser(weights: list[Tensor]) -> dict[int, Tensor]:
        return {t: sum((weights[a + min(t, b - a - 1)] for a, b in spans),
                       torch.zeros((), dtype=F64)) / n for t in range(max(lengths))}

    total = torch.zeros((), dtype=F64)
    if name == "trajectory":
        big_w = [w[b - 1] for a, b in spans]
        if self_normalize:
            mean_w = sum(big_w, torch.zeros((), dtype=F64)) / n
            big_w = [x / mean_w for x in big_w]
        ep_adv = [sum(disc[i] * float(rew[i]) for i in range(a, b)) - base[a] for a, b in spans]
        if standardize_returns:
            mu, sd = standardized(ep_adv)
            ep_adv = [(x - mu) / sd for x in ep_adv]
        for k in range(n):
            total = total - big_w[k] * ep_adv[k]
        return total / n
    if name == "per-decision":
        if self_normalize:
            norm = position_normaliser(w)
            w = [w[i] / norm[i - a] for a, b in spans for i in range(a, b)]
        scale = 1.0
        if standardize_returns:
            mu, scale = standardized(adv)
            base = [x + mu for x in base]
        for a, b in spans:
            prev = torch.ones((), dtype=F64)
            for i in range(a, b):
                total = total - disc[i] * (w[i] * float(rew[i]) - (w[i] - prev) * base[i]) / scale
                prev = w[i]
        return total / n
    if standardize_returns:
        mu, sd = standardized(adv)
        adv = [(x - mu) / sd for x in adv]
    if name == "past-weight":
        w = [x.detach() for x in w]
        if self_normalize:
            norm = position_normaliser(w)
            w = [w[i] / norm[i - a] for a, b in spans for i in range(a, b)]
        for a, b in spans:
            for i in range(a, b):
                if ppo_epsilon is None:
                    total = total - disc[i] * w[i] * tl[i] * adv[i]
                else:
                    prev = w[i - 1] if i > a else torch.ones((), dtype=F64)
                    r = rho_capped[i]
                    total = total - disc[i] * prev * torch.minimum(
                        r * adv[i], r.clamp(1 - ppo_epsilon, 1 + ppo_epsilon) * adv[i])
        return total / n
    assert name in ("per-step", "critic", "greedy-critic")
    ratio = [torch.clamp(r, max=cap) for r in rho]
    if self_normalize:
        mean_r = sum(ratio, torch.zeros((), dtype=F64)) / m
        ratio = [r / mean_r for r in ratio]
    for i in range(m):
        if ppo_epsilon is None:
            total = total - disc[i] * ratio[i] * adv[i]
        else:
            r = ratio[i]
            total = total - disc[i] * torch.minimum(
                r * adv[i], r.clamp(1 - ppo_epsilon, 1 + ppo_epsilon) * adv[i])
    return total / n


def _bounds_of(episode_start: Tensor) -> list[tuple[int, int]]:
    starts = [*torch.nonzero(episode_start).flatten().tolist(), episode_start.shape[0]]
    return list(itertools.pairwise(starts))


OPTION_SETS: list[dict[str, Any]] = [
    {},
    {"clip": 1.5},
    {"clip": 2.0, "clip_mode": "cumulative"},
    {"self_normalize": True},
    {"baseline": 0.4},
    {"baseline": "tensor"},
    {"standardize_returns": True, "baseline": "tensor"},
    {"ppo_epsilon": 0.2},
    {"ppo_epsilon": 0.2, "clip": 1.5, "self_normalize": True},
]


def _options(name: str, options: dict[str, Any], m: int, seed: int) -> dict[str, Any] | None:
    """`options` for `name` (a random [M] baseline for "tensor"), None when it refuses one."""
    unsupported = {k for k, v in options.items()
                   if k in _OPTION_FIELDS and k not in REGISTRY[name].supports
                   and v != getattr(SurrogateOptions(), k)}
    if unsupported:
        return None
    out = dict(options)
    if out.get("baseline") == "tensor":
        out["baseline"] = torch.randn(m, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return out


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_vectorised_surrogates_equal_slow_loops(name: str) -> None:
    # Loss values and gradients with respect to target_logp, float64, over a grid of
    # episode-length patterns, discounts and options: equal to rounding (assert_close defaults).
    checked = 0
    for lengths, gamma, options in itertools.product(LENGTH_PATTERNS, (0.0, 0.5, 1.0),
                                                     OPTION_SETS):
        log = _flat_log(lengths, seed=len(lengths) + int(10 * gamma))
        kwargs = _options(name, options, sum(lengths), seed=3)
        if kwargs is None:
            continue
        tl = log["target_logp"].clone().requires_grad_()
        fast = ESTIMATORS[name](**{**log, "target_logp": tl}, gamma=gamma, **kwargs)
        (fast_grad,) = torch.autograd.grad(fast, tl)
        tl_ref = log["target_logp"].clone().requires_grad_()
        slow = _ref_loss(name, {**log, "target_logp": tl_ref}, gamma=gamma, **kwargs)
        (slow_grad,) = torch.autograd.grad(slow, tl_ref, allow_unused=True)
        torch.testing.assert_close(fast, slow, msg=lambda s, k=kwargs, n=lengths, g=gamma:
                                   f"{name} {n} γ={g} {k}: {s}")
        torch.testing.assert_close(fast_grad, torch.zeros_like(tl) if slow_grad is None
                                   else slow_grad)
        checked += 1
    assert checked >= 100


def test_per_decision_gradient_is_the_causal_policy_gradient() -> None:
    # STYLE example 4: d L / d log π_t = -(1/N) Σ_{t'≥t} γ^{t'} w_{1:t'} r_{t'}, episode by episode.
    lengths, gamma = [3, 5, 1, 4], 0.9
    log = _flat_log(lengths, seed=2)
    log["target_logp"].requires_grad_()
    per_decision_surrogate(**log, gamma=gamma).backward()
    with torch.no_grad():
        weight = segmented_cumsum(log["target_logp"] - log["behavior_logp"],
                                  log["episode_start"]).exp()
        term = gamma ** log["step"].to(F64) * weight * log["reward"]
        expected = torch.empty_like(term)
        for a, b in _bounds(lengths):
            expected[a:b] = -term[a:b].flip(0).cumsum(0).flip(0) / len(lengths)
    torch.testing.assert_close(log["target_logp"].grad, expected)


# --------------------------------------------------------------------------------------------
# Episodes do not leak into each other
# --------------------------------------------------------------------------------------------

DECOUPLED_OPTIONS: list[dict[str, Any]] = [
    {}, {"clip": 1.5}, {"clip": 2.0, "clip_mode": "cumulative"}, {"baseline": "tensor"},
    {"ppo_epsilon": 0.1},
]


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_batch_of_episodes_equals_mean_of_single_episodes(name: str) -> None:
    # Guards against weights leaking across episode boundaries (cf. pytorch/rl#4209). Options
    # that pool the batch (self-normalisation, standardisation, PSIS) are excluded by design.
    lengths = [3, 5, 1, 4, 2]
    log = _flat_log(lengths, seed=3)
    for options in DECOUPLED_OPTIONS:
        kwargs = _options(name, options, sum(lengths), seed=5)
        if kwargs is None:
            continue
        batched = ESTIMATORS[name](**log, gamma=0.9, **kwargs)
        singles = []
        for a, b in _bounds(lengths):
            one = {k: v[a:b] for k, v in log.items()}
            one_kwargs = dict(kwargs)
            if isinstance(one_kwargs.get("baseline"), Tensor):
                one_kwargs["baseline"] = one_kwargs["baseline"][a:b]
            singles.append(ESTIMATORS[name](**one, gamma=0.9, **one_kwargs))
        torch.testing.assert_close(batched, torch.stack(singles).mean())
        per_episode = ESTIMATORS[name](**log, gamma=0.9, reduction="none", **kwargs)
        torch.testing.assert_close(per_episode, torch.stack(singles))


# --------------------------------------------------------------------------------------------
# A tabular MDP with an exact gradient
# --------------------------------------------------------------------------------------------

N_STATES, N_ACTIONS, HORIZON, GAMMA = 3, 2, 5, 0.9
INITIAL = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
REWARD = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, -1.0]], dtype=F64)
BEHAVIOR = torch.tensor([[0.5, 0.5], [0.6, 0.4], [0.3, 0.7]], dtype=F64)
TARGET = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], dtype=F64)


@cache
def _transitions() -> Tensor:
    gen = torch.Generator().manual_seed(7)
    raw = torch.rand(N_STATES, N_ACTIONS, N_STATES, generator=gen, dtype=F64) + 0.2
    return raw / raw.sum(-1, keepdim=True)


def _exact_objective(theta: Tensor) -> Tensor:
    """J(θ) = Σ_τ p_θ(τ) Σ_t γ^t r_t, enumerating all 3^5·2^5 = 7776 trajectories."""
    logp = torch.log_softmax(theta, dim=-1)
    seqs = torch.tensor(list(itertools.product(range(N_STATES), repeat=HORIZON)))
    acts = torch.tensor(list(itertools.product(range(N_ACTIONS), repeat=HORIZON)))
    s = seqs.repeat_interleave(acts.shape[0], 0)
    a = acts.repeat(seqs.shape[0], 1)
    p = _transitions()
    log_prob = INITIAL.log()[s[:, 0]] + logp[s, a].sum(1)
    log_prob = log_prob + p[s[:, :-1], a[:, :-1], s[:, 1:]].log().sum(1)
    discount = GAMMA ** torch.arange(HORIZON, dtype=F64)
    value = (REWARD[s, a] * discount).sum(1)
    return (log_prob.exp() * value).sum()


def _exact_gradient(probs: Tensor) -> Tensor:
    theta = probs.log().clone().requires_grad_()
    (grad,) = torch.autograd.grad(_exact_objective(theta), theta)
    return grad


@cache
def _behavior_episodes(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """n fixed-length episodes from π_β: states, actions [n, H] and rewards [n, H]."""
    gen = torch.Generator().manual_seed(seed)
    p = _transitions()
    states = torch.empty(n, HORIZON, dtype=torch.long)
    actions = torch.empty(n, HORIZON, dtype=torch.long)
    s = torch.multinomial(INITIAL, n, replacement=True, generator=gen)
    for t in range(HORIZON):
        states[:, t] = s
        a = (torch.rand(n, generator=gen, dtype=F64) < BEHAVIOR[s, 1]).long()
        actions[:, t] = a
        cum = p[s, a].cumsum(-1)
        s = (torch.rand(n, 1, generator=gen, dtype=F64) > cum[:, :-1]).sum(1)
    return states, actions, REWARD[states, actions]


def _score(states: Tensor, actions: Tensor, probs: Tensor) -> Tensor:
    """∂ log π_θ(a_t|s_t) / ∂θ for tabular softmax θ = log probs: [n, H, S·A]."""
    onehot_s = torch.nn.functional.one_hot(states, N_STATES).to(F64)
    centred = torch.nn.functional.one_hot(actions, N_ACTIONS).to(F64) - probs[states]
    return (onehot_s[..., :, None] * centred[..., None, :]).flatten(-2)


def _per_episode_gradients(coefficient: Tensor, states: Tensor, actions: Tensor,
                           probs: Tensor) -> Tensor:
    """g_i = Σ_t c_{i,t} ∇_θ log π_θ(a_t|s_t), [n, S·A], from c = dℓ_i/d log π_t [n, H]."""
    return (coefficient[..., None] * _score(states, actions, probs)).sum(1)


def _surrogate_gradients(name: str, probs: Tensor, n: int = 20_000, seed: int = 0,
                         **options: Any) -> Tensor:
    """Per-episode gradients of a registered surrogate at θ = log `probs`, [n, S·A]."""
    states, actions, rewards = _behavior_episodes(n, seed)
    target_logp = probs.log()[states, actions].flatten().clone().requires_grad_()
    starts = torch.zeros(n, HORIZON, dtype=torch.bool)
    starts[:, 0] = True
    per_episode = ESTIMATORS[name](
        target_logp, BEHAVIOR.log()[states, actions].flatten(), rewards.flatten(),
        torch.arange(HORIZON).repeat(n), starts.flatten(), gamma=GAMMA, reduction="none",
        **options)
    (coefficient,) = torch.autograd.grad(per_episode.sum(), target_logp)
    return _per_episode_gradients(coefficient.view(n, HORIZON), states, actions, probs)


def _literal_seed_gradients(probs: Tensor, n: int = 20_000, seed: int = 0) -> Tensor:
    """The seed's causal equation as written: future product from t'' = t (ρ_t twice)."""
    states, actions, rewards = _behavior_episodes(n, seed)
    rho = probs[states, actions] / BEHAVIOR[states, actions]
    w = rho.cumprod(1)
    coefficient = torch.zeros(n, HORIZON, dtype=F64)
    for t in range(HORIZON):
        for later in range(t, HORIZON):
            future = rho[:, t:later + 1].prod(1)
            coefficient[:, t] += GAMMA**later * rewards[:, later] * future
        coefficient[:, t] *= w[:, t]
    return -_per_episode_gradients(coefficient, states, actions, probs)


def _z_scores(gradients: Tensor, exact: Tensor) -> Tensor:
    """|mean − (−∇J)| / standard error, per component of θ."""
    mean = gradients.mean(0)
    se = gradients.std(0) / gradients.shape[0] ** 0.5
    return (mean + exact.flatten()).abs() / se


def test_trajectory_and_per_decision_are_unbiased_and_the_literal_seed_form_is_not() -> None:
    # 20k episodes of length 5. With 6 components and a fixed seed, an unbiased estimator lies
    # within 4 standard errors (two-sided 6e-5 each; measured max z: trajectory 0.58,
    # per-decision 0.64); the seed's literal form multiplies every coefficient by an extra
    # ρ_t ∈ [0.43, 1.6], a bias of the order of the gradient itself: measured z 17 to 34.
    exact = _exact_gradient(TARGET)
    for name in ("trajectory", "per-decision"):
        z = _z_scores(_surrogate_gradients(name, TARGET), exact)
        assert z.max() < 4.0, (name, z)
    # A state-dependent baseline b(s_t) enters per-decision as the control variate
    # γ^t (w_{1:t} − w_{1:t−1}) b(s_t) and keeps it unbiased, whereas weighting the shifted
    # reward, γ^t w_{1:t} (r_t − b(s_t)), is biased (E_β[w_{1:t} b(s_t)] = E_θ[b(s_t)] depends
    # on θ; measured z ≈ 18). per-step and past-weight are biased for θ ≠ β by design.
    states, actions, rewards = _behavior_episodes(20_000, 0)
    baseline = torch.tensor([1.0, 2.5, -1.0], dtype=F64)[states].flatten()
    z = _z_scores(_surrogate_gradients("per-decision", TARGET, baseline=baseline), exact)
    assert z.max() < 4.0, z
    target_logp = TARGET.log()[states, actions].flatten().clone().requires_grad_()
    naive = per_decision_surrogate(
        target_logp, BEHAVIOR.log()[states, actions].flatten(), rewards.flatten() - baseline,
        torch.arange(HORIZON).repeat(20_000), (torch.arange(HORIZON) == 0).repeat(20_000),
        gamma=GAMMA, reduction="none")
    (coefficient,) = torch.autograd.grad(naive.sum(), target_logp)
    naive_z = _z_scores(_per_episode_gradients(coefficient.view(-1, HORIZON), states, actions,
                                               TARGET), exact)
    assert naive_z.max() > 10.0, naive_z
    literal = _z_scores(_literal_seed_gradients(TARGET), exact)
    assert literal.max() > 15.0, literal


@cache
def _all_trajectories() -> tuple[Tensor, Tensor, Tensor]:
    """Every (s_0..s_4, a_0..a_4), [7776, H] each, and its probability under π_β, [7776]."""
    seqs = torch.tensor(list(itertools.product(range(N_STATES), repeat=HORIZON)))
    acts = torch.tensor(list(itertools.product(range(N_ACTIONS), repeat=HORIZON)))
    s = seqs.repeat_interleave(acts.shape[0], 0)
    a = acts.repeat(seqs.shape[0], 1)
    p = _transitions()
    log_prob = INITIAL.log()[s[:, 0]] + BEHAVIOR.log()[s, a].sum(1)
    log_prob = log_prob + p[s[:, :-1], a[:, :-1], s[:, 1:]].log().sum(1)
    return s, a, log_prob.exp()


def _expected_gradient(name: str, baseline: Tensor | None, **options: Any) -> Tensor:
    """E_β[∇_θ L] at θ = log TARGET, exactly: the surrogate's per-episode gradients over all
    7776 trajectories, weighted by their probability under π_β, [S·A]."""
    s, a, prob = _all_trajectories()
    n = s.shape[0]
    target_logp = TARGET.log()[s, a].flatten().clone().requires_grad_()
    per_episode = ESTIMATORS[name](
        target_logp, BEHAVIOR.log()[s, a].flatten(), REWARD[s, a].flatten(),
        torch.arange(HORIZON).repeat(n), (torch.arange(HORIZON) == 0).repeat(n), gamma=GAMMA,
        reduction="none", baseline=None if baseline is None else baseline[s].flatten(),
        **options)
    (coefficient,) = torch.autograd.grad((per_episode * prob).sum(), target_logp)
    return _per_episode_gradients(coefficient.view(n, HORIZON), s, a, TARGET).sum(0)


def _per_step_clip_bias(baseline: Tensor, clip: float) -> Tensor:
    r"""Closed form of E_β[∇L_b] − E_β[∇L_0] for per-step with ρ̄ = min(ρ, c):
    ∇ρ̄ = ρ·1[ρ < c]·∇log π, and Σ_a π ∇log π = 0, so the baseline adds
    −Σ_t γ^t Σ_s d^β_t(s) b(s) Σ_a π(a|s) 1[ρ(a|s) ≥ c] ∇log π(a|s), d^β_t the state
    distribution at t under π_β (forward recursion)."""
    p = _transitions()
    eye_s, eye_a = torch.eye(N_STATES, dtype=F64), torch.eye(N_ACTIONS, dtype=F64)
    clipped = (TARGET / BEHAVIOR >= clip).to(F64)
    # Σ_a π(a|s) 1[ρ ≥ c] ∇log π(a|s) as an [S, S·A] matrix (tabular softmax score).
    # ∂log π(a|s)/∂θ[s', a'] = 1[s = s'] (1[a = a'] − π(a'|s)), as [s, a, s', a'].
    score = eye_s[:, None, :, None] * (eye_a[None, :, None, :] - TARGET[:, None, None, :])
    per_state = ((TARGET * clipped)[:, :, None, None] * score).sum(1).flatten(1)  # [s, S·A]
    distribution, total = INITIAL.clone(), torch.zeros(N_STATES * N_ACTIONS, dtype=F64)
    for t in range(HORIZON):
        total = total - GAMMA**t * (distribution * baseline) @ per_state
        distribution = torch.einsum("s,sa,sau->u", distribution, BEHAVIOR, p)
    return total


def test_a_baseline_adds_no_bias_without_clipping_and_a_stated_one_with_it() -> None:
    # Exact expectations over all 7776 trajectories (no sampling). Without clip/PPO the
    # state-dependent baseline b = (1, 2.5, −1) changes E_β[∇L] by float64 rounding only
    # (≤ 1e-12: 38880 terms of size ≤ 10, measured ≤ 2.1e-14). With clip c = 1.2 (some action
    # has π/β ≥ c in every state) or PPO ε = 0.2 it biases the expected gradient, as the
    # surrogate docstrings state; measured max |Δ| (θ components of size ~1):
    # trajectory 0.136 (step) / 0.151 (cumulative), per-decision 0.344 / 0.284,
    # past-weight 0.118 / 0.186 / PPO 0.063, per-step 0.546 / PPO 0.064.
    b = torch.tensor([1.0, 2.5, -1.0], dtype=F64)
    for name in sorted(REGISTRY):
        for options in ({}, {"clip": 1.2}, {"clip": 1.2, "clip_mode": "cumulative"},
                        {"ppo_epsilon": 0.2}):
            if _options(name, options, 1, seed=0) is None:
                continue
            delta = _expected_gradient(name, b, **options) - _expected_gradient(name, None,
                                                                                **options)
            if options:
                assert delta.abs().max() > 0.05, (name, options, delta)
            else:
                assert delta.abs().max() < 1e-12, (name, delta)
    # per-step with the clip: the bias equals its closed form (an independent computation).
    delta = _expected_gradient("per-step", b, clip=1.2) - _expected_gradient("per-step", None,
                                                                              clip=1.2)
    torch.testing.assert_close(delta, _per_step_clip_bias(b, 1.2), rtol=1e-10, atol=1e-12)


def test_per_decision_has_lower_variance_than_trajectory() -> None:
    # Total variance (trace of the covariance) of the per-episode gradient: measured 20.6 vs
    # 140.6 on this MDP; the assertion only needs the ordering, with a 10% margin against noise.
    traj = _surrogate_gradients("trajectory", TARGET).var(0).sum()
    pdis = _surrogate_gradients("per-decision", TARGET).var(0).sum()
    assert pdis < 0.9 * traj, (float(pdis), float(traj))


def test_clipping_lowers_the_gradient_variance() -> None:
    # Capping ρ_t at 1.2 (its largest value is 1.6 here) bounds w_{1:t} by 1.2^t; measured trace
    # variances 141 → 1.4 (step) / 1.9 (cumulative) for trajectory, 20.6 → 0.66 / 0.78 for
    # per-decision. The assertion asks for a 10% drop.
    for name in PRODUCT:
        raw = _surrogate_gradients(name, TARGET).var(0).sum()
        for mode in ("step", "cumulative"):
            clipped = _surrogate_gradients(name, TARGET, clip=1.2, clip_mode=mode).var(0).sum()
            assert clipped < 0.9 * raw, (name, mode, float(clipped), float(raw))


def test_at_behavior_every_causal_estimator_is_reinforce_with_reward_to_go() -> None:
    # At θ = β all ratios are 1: per-step, past-weight and per-decision gradients all equal the
    # on-policy REINFORCE estimate Σ_t γ^t ∇log π_t (G_t − b_t), exactly (float64 rounding),
    # and their Monte-Carlo mean matches the exact gradient within 4 standard errors.
    n = 20_000
    states, actions, rewards = _behavior_episodes(n, 1)
    returns = torch.zeros_like(rewards)
    running = torch.zeros(n, dtype=F64)
    for t in range(HORIZON - 1, -1, -1):
        running = rewards[:, t] + GAMMA * running
        returns[:, t] = running
    gen = torch.Generator().manual_seed(2)
    baseline = torch.rand(n * HORIZON, generator=gen, dtype=F64)
    discount = GAMMA ** torch.arange(HORIZON, dtype=F64)
    for b in (None, baseline):
        b_grid = torch.zeros(n, HORIZON, dtype=F64) if b is None else b.view(n, HORIZON)
        reinforce = -_per_episode_gradients(discount * (returns - b_grid), states, actions,
                                            BEHAVIOR)
        for name in ("per-step", "past-weight", "per-decision"):
            got = _surrogate_gradients(name, BEHAVIOR, seed=1, baseline=b)
            torch.testing.assert_close(got, reinforce)
    z = _z_scores(reinforce, _exact_gradient(BEHAVIOR))
    assert z.max() < 4.0, z


# --------------------------------------------------------------------------------------------
# Numerical robustness
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_long_horizon_with_large_log_ratios_stays_finite(name: str, dtype: torch.dtype) -> None:
    # Two 1000-step episodes whose log-weight climbs to +3000 and swings by ±5 per step, and
    # one short one: without the log-space cap, w = e^3000 overflows any float.
    gen = torch.Generator().manual_seed(4)
    lengths = [1000, 1000, 7]
    m = sum(lengths)
    behavior = torch.full((m,), -3.0, dtype=dtype)
    shift = torch.cat([torch.full((1000,), 3.0), 5 * torch.randn(1000, generator=gen),
                       torch.zeros(7)]).to(dtype)
    log = {"behavior_logp": behavior, "reward": torch.rand(m, generator=gen).to(dtype),
           "step": torch.cat([torch.arange(n) for n in lengths]),
           "episode_start": torch.cat([torch.arange(n) == 0 for n in lengths])}
    for options in [{}, {"clip": 10.0}, {"clip": 10.0, "clip_mode": "cumulative"},
                    {"self_normalize": True}, {"psis": True}, {"standardize_returns": True}]:
        if _options(name, options, m, seed=0) is None:  # per-step refuses clip_mode
            continue
        target = (behavior + shift).clone().requires_grad_()
        loss = ESTIMATORS[name](target, **log, gamma=0.99, **options)
        (grad,) = torch.autograd.grad(loss, target)
        assert loss.dtype == dtype
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), (name, options)
    assert cumulative_log_weight(behavior + shift, behavior, log["episode_start"]).max() > 2999


# --------------------------------------------------------------------------------------------
# PSIS against arviz, ESS identities, KL
# --------------------------------------------------------------------------------------------


def _arviz_psislw(log_weights: np.ndarray) -> tuple[np.ndarray, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz

        smoothed, khat = arviz.psislw(log_weights.copy(), normalize=False)
    return np.asarray(smoothed), float(khat)


@pytest.mark.parametrize("kind", ["pareto-0.3", "pareto-0.8", "lognormal-1", "lognormal-2.5",
                                  "small-30"])
def test_psis_matches_arviz(kind: str) -> None:
    # Same algorithm (Zhang-Stephens fit with arviz's prior, same tail size and truncation):
    # k̂ and every smoothed log-weight agree to 1e-8 (float64 rounding in a different order).
    rng = np.random.default_rng(11)
    if kind.startswith("pareto"):
        k = float(kind.split("-")[1])
        log_w = np.log(np.expm1(-k * np.log1p(-rng.uniform(size=4000))) / k)  # GPD(k, σ=1)
    elif kind.startswith("lognormal"):
        log_w = float(kind.split("-")[1]) * rng.standard_normal(4000)
    else:
        log_w = rng.standard_normal(30)
    expected_lw, expected_k = _arviz_psislw(log_w)
    smoothed, khat = pareto_smooth(torch.from_numpy(log_w))
    assert khat == pytest.approx(expected_k, abs=1e-8)
    np.testing.assert_allclose(smoothed.numpy(), expected_lw, atol=1e-8, rtol=0)
    if kind.startswith("pareto"):
        # 4000 draws: sd(k̂) ≈ (1 + k)/sqrt(tail) ≈ 0.07 for the 190-sample tail; 0.25 is > 3 sd.
        assert abs(khat - float(kind.split("-")[1])) < 0.25


def test_psis_khat_flags_heavy_tails_and_is_inf_for_tiny_samples() -> None:
    rng = np.random.default_rng(12)
    light = torch.from_numpy(0.3 * rng.standard_normal(2000))
    heavy = torch.from_numpy(4.0 * rng.standard_normal(2000))
    assert psis_khat(light) < 0.5 < 0.7 < psis_khat(heavy)
    assert psis_khat(torch.zeros(10, dtype=F64)) == math.inf


def test_ess_identities() -> None:
    assert ess_fraction(torch.full((50,), 3.7, dtype=F64)) == pytest.approx(1.0, abs=1e-12)
    one_hot = torch.full((50,), -math.inf, dtype=F64)
    one_hot[17] = 0.0
    assert ess_fraction(one_hot) == pytest.approx(1 / 50, abs=1e-12)
    # Two weights 1 and 3: (1+3)^2 / (2·(1+9)) = 0.8, and overflow-safe at e^1000 scale.
    two = torch.tensor([0.0, math.log(3.0)], dtype=F64)
    assert ess_fraction(two) == pytest.approx(0.8, abs=1e-12)
    assert ess_fraction(two + 1000.0) == pytest.approx(0.8, abs=1e-12)


def test_weight_summaries_by_hand() -> None:
    log_w = torch.log(torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0], dtype=F64))
    assert max_weight(log_w) == pytest.approx(8.0)
    assert weight_quantiles(log_w, (0.5,)) == pytest.approx([2.0])
    assert fraction_clipped(log_w, 2.0) == pytest.approx(0.4)  # 4 and 8 exceed c = 2
    assert fraction_clipped(log_w, None) == 0.0
    # Linear interpolation in log space, as torch.quantile (which refuses > 2^24 elements).
    noise = torch.randn(1001, generator=torch.Generator().manual_seed(15), dtype=F64)
    levels = (0.0, 0.37, 0.5, 0.99, 1.0)
    expected = torch.quantile(noise, torch.tensor(levels, dtype=F64)).exp()
    assert weight_quantiles(noise, levels) == pytest.approx(expected.tolist(), rel=1e-12)


def test_kl_penalty_is_unbiased_on_a_bandit() -> None:
    # Four arms. KL(π‖β) exact = Σ π log(π/β); the estimate from 200k β-draws lies within 4 SE,
    # every term is ≥ 0, and the mean gradient matches the exact ∇KL within 4 SE per component.
    behavior = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64)
    logits = torch.tensor([0.2, -0.5, 0.9, 0.1], dtype=F64, requires_grad=True)
    target = torch.softmax(logits, 0)
    exact = (target * (target / behavior).log()).sum()
    (exact_grad,) = torch.autograd.grad(exact, logits)
    n = 200_000
    action = torch.multinomial(behavior, n, replacement=True,
                               generator=torch.Generator().manual_seed(5))
    logp = torch.log_softmax(logits, 0)[action]
    estimate = kl_penalty(logp, behavior.log()[action])
    rho = (logp - behavior.log()[action]).exp().detach()
    terms = rho * rho.log() - rho + 1
    assert (terms >= 0).all()
    assert abs(float(estimate.detach()) - float(exact.detach())) < 4 * float(terms.std()) / n**0.5
    assert kl_to_behavior(logp, behavior.log()[action]) == pytest.approx(float(estimate.detach()))
    # Per-sample gradient: d/dlogits of term_i = ρ_i log ρ_i (onehot(a_i) − π).
    score = torch.nn.functional.one_hot(action, 4).to(F64) - target.detach()
    per_sample = (rho * rho.log())[:, None] * score
    (grad,) = torch.autograd.grad(estimate, logits)
    torch.testing.assert_close(grad, per_sample.mean(0))
    se = per_sample.std(0) / n**0.5
    assert ((grad - exact_grad).abs() < 4 * se).all()
    assert float(kl_penalty(behavior.log()[action], behavior.log()[action])) == 0.0


def test_weight_diagnostics_keys_and_values() -> None:
    log = _flat_log([3, 5, 1, 4], seed=6)
    metrics = weight_diagnostics(log["target_logp"], log["behavior_logp"], log["episode_start"],
                                 clip=2.0)
    assert set(metrics) == {
        "weights/ess_fraction", "weights/max", "weights/q50", "weights/q90", "weights/q99",
        "weights/psis_khat", "weights/fraction_clipped", "policy/kl_to_behavior"}
    assert all(isinstance(v, float) for v in metrics.values())
    episode_log_w = episode_sum(log_ratio(log["target_logp"], log["behavior_logp"]),
                                log["episode_start"])
    clipped = episode_sum(log_ratio(log["target_logp"], log["behavior_logp"]).clamp_max(
        math.log(2.0)), log["episode_start"])
    assert metrics["weights/ess_fraction"] == pytest.approx(ess_fraction(clipped))
    assert metrics["weights/max"] == pytest.approx(float(episode_log_w.max().exp()))
    step_log = log_ratio(log["target_logp"], log["behavior_logp"])
    assert metrics["weights/fraction_clipped"] == pytest.approx(
        float((step_log > math.log(2.0)).double().mean()))
    same = weight_diagnostics(log["behavior_logp"], log["behavior_logp"], log["episode_start"])
    assert same["weights/ess_fraction"] == pytest.approx(1.0)
    assert same["policy/kl_to_behavior"] == 0.0 and same["weights/max"] == 1.0


# --------------------------------------------------------------------------------------------
# Conformance over the registry (d3rlpy's algo_tester)
# --------------------------------------------------------------------------------------------


def test_every_estimator_name_has_a_function() -> None:
    assert {name.value for name in EstimatorName} == set(ESTIMATORS)


def test_estimators_are_the_documented_functions() -> None:
    assert REGISTRY["trajectory"].fn is _trajectory_fn
    assert REGISTRY["per-step"].fn is _per_step_fn
    assert REGISTRY["per-decision"].fn is _per_decision_fn
    assert REGISTRY["per-step"].unit == "step"
    assert REGISTRY["critic"].fn is critic_surrogate and REGISTRY["critic"].unit == "step"
    assert REGISTRY["greedy-critic"].fn is greedy_critic_surrogate
    assert REGISTRY["greedy-critic"].unit == "step" and REGISTRY["greedy-critic"].greedy
    assert {spec.unit for name, spec in REGISTRY.items()
            if name not in ("per-step", "critic", "greedy-critic")} == {"episode"}
    with pytest.raises(TypeError):
        REGISTRY["new"] = REGISTRY["per-step"]  # type: ignore[index]


ALL_OPTIONS: list[dict[str, Any]] = [*OPTION_SETS, {"psis": True},
                                     {"psis": True, "clip": 3.0, "self_normalize": True}]


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimator_contract(name: str) -> None:
    log = _flat_log([2, 3, 30], seed=4)
    for options in ALL_OPTIONS:
        kwargs = _options(name, options, 35, seed=8)
        if kwargs is None:
            refused = "ppo_epsilon" if "ppo_epsilon" in options else "clip_mode"
            with pytest.raises(ValueError, match=f"option {refused}=.*not supported by the {name}"):
                ESTIMATORS[name](**log, gamma=0.99,
                                 **_options("past-weight", options, 35, 8) or {})
            continue
        target = log["target_logp"].clone().requires_grad_()
        behavior = log["behavior_logp"].clone().requires_grad_()
        loss = ESTIMATORS[name](target, behavior, log["reward"], log["step"],
                                log["episode_start"], gamma=0.99, **kwargs)
        loss.backward()
        assert loss.ndim == 0 and torch.isfinite(loss), options
        assert target.grad is not None and torch.isfinite(target.grad).all()
        assert behavior.grad is None or not behavior.grad.any()
    # Same seed, same numbers (determinism).
    again = [ESTIMATORS[name](**log, gamma=0.99, psis=True) for _ in range(2)]
    assert torch.equal(again[0], again[1])


def _call(name: str, log: dict[str, Tensor], **kwargs: Any) -> Tensor:
    return ESTIMATORS[name](**{**log, **kwargs}, gamma=0.9)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize(("change", "message"), [
    ({"reward": torch.zeros(4, dtype=F64)}, r"target_logp \[9\].*reward \[4\]"),
    ({"step": torch.zeros(9, 1, dtype=torch.long)}, r"step \[9, 1\]"),
    ({"baseline": torch.zeros(3, dtype=F64)}, r"baseline \[3\]"),
    ({"episode_start": torch.zeros(9, dtype=torch.bool)}, "episode_start\\[0\\] must be True"),
    ({"episode_start": torch.ones(9)}, "episode_start must be a bool tensor"),
    ({"gamma": 1.5}, "gamma must lie in"),
    ({"clip": 0.0}, "clip must be positive"),
    ({"clip_mode": "sometimes"}, "clip_mode must be"),
])
def test_bad_inputs_raise_a_sentence_naming_them(name: str, change: dict[str, Any],
                                                message: str) -> None:
    log = _flat_log([4, 5], seed=9)
    options = {"gamma": 0.9, **{k: v for k, v in change.items() if k not in log}}
    with pytest.raises(ValueError, match=message):
        ESTIMATORS[name](**{**log, **{k: v for k, v in change.items() if k in log}}, **options)


def test_returns_argument_replaces_the_computed_returns() -> None:
    # per-step on single-step rows sampled from episodes: precomputed G_t and all-True starts.
    log = _flat_log([3, 5, 4], seed=10)
    returns = discounted_returns(log["reward"], log["episode_start"], 0.9)
    whole: Callable[..., Tensor] = ESTIMATORS["per-step"]
    full = whole(**log, gamma=0.9)
    rows = whole(**{**log, "episode_start": torch.ones(12, dtype=torch.bool)}, gamma=0.9,
                 returns=returns)
    torch.testing.assert_close(rows * 12 / 3, full)  # per-step mean × steps / episodes
    with pytest.raises(ValueError, match="per-decision"):
        per_decision_surrogate(**log, gamma=0.9, returns=returns)
    torch.testing.assert_close(_call("trajectory", log),
                               trajectory_surrogate(**log, gamma=0.9, returns=returns))


def test_psis_option_uses_the_smoothed_weights_with_the_raw_gradient_direction() -> None:
    # 400 one-step episodes with heavy-tailed weights (log w ~ 2·N(0, 1)): PSIS changes the top
    # tail. Loss = −mean(w̃_i R_i) with w̃ = pareto_smooth(log w), and d L / d log π_i = −w̃_i R_i / N
    # (the smoothed value times the raw weight's d log w / d log π = 1).
    gen = torch.Generator().manual_seed(13)
    n = 400
    log = {"target_logp": 2 * torch.randn(n, generator=gen, dtype=F64) - 3.0,
           "behavior_logp": torch.full((n,), -3.0, dtype=F64),
           "reward": torch.rand(n, generator=gen, dtype=F64) + 0.5,
           "step": torch.zeros(n, dtype=torch.long),
           "episode_start": torch.ones(n, dtype=torch.bool)}
    smoothed, khat = pareto_smooth(log["target_logp"] - log["behavior_logp"])
    assert math.isfinite(khat)
    assert not torch.allclose(smoothed, log["target_logp"] - log["behavior_logp"])
    target = log["target_logp"].clone().requires_grad_()
    loss = trajectory_surrogate(**{**log, "target_logp": target}, gamma=1.0, psis=True)
    (grad,) = torch.autograd.grad(loss, target)
    torch.testing.assert_close(loss, -(smoothed.exp() * log["reward"]).mean())
    torch.testing.assert_close(grad, -smoothed.exp() * log["reward"] / n)


@pytest.mark.parametrize("seed", range(5))
def test_self_normalised_trajectory_estimate_stays_within_the_returns(seed: int) -> None:
    # OBP-style property: WIS is a convex combination of the episode returns.
    lengths = [3, 5, 1, 4, 6, 2]
    log = _flat_log(lengths, seed=20 + seed, scale=3.0)
    estimate = -trajectory_surrogate(**log, gamma=0.95, self_normalize=True)
    returns = episode_sum(0.95 ** log["step"].to(F64) * log["reward"], log["episode_start"])
    assert float(returns.min()) - 1e-12 <= float(estimate) <= float(returns.max()) + 1e-12


def test_weight_diagnostics_levels() -> None:
    log = _flat_log([3, 5, 1, 4], seed=14)
    tl, bl, start = log["target_logp"], log["behavior_logp"], log["episode_start"]
    step_log = log_ratio(tl, bl)
    steps = weight_diagnostics(tl, bl, start, level="step", clip=1.5)
    assert steps["weights/max"] == pytest.approx(float(step_log.max().exp()))
    assert steps["weights/ess_fraction"] == pytest.approx(
        ess_fraction(step_log.clamp_max(math.log(1.5))))
    cumulative = weight_diagnostics(tl, bl, start, level="cumulative", clip=1.5,
                                    clip_mode="cumulative")
    raw = cumulative_log_weight(tl, bl, start)
    assert cumulative["weights/fraction_clipped"] == pytest.approx(
        fraction_clipped(raw, 1.5))
    assert cumulative["weights/ess_fraction"] == pytest.approx(
        ess_fraction(raw.clamp_max(math.log(1.5))))
    with pytest.raises(ValueError, match="level"):
        weight_diagnostics(tl, bl, start, level="trajectory")  # type: ignore[arg-type]
