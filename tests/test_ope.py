"""Off-policy evaluation: exact identities, slow references and statistical checks.

The reference problem is a small tabular MDP whose value J(π) is computed exactly by backward
induction, so every statistical assertion compares against the truth, not another estimate.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch

from offpg_offline.data.batch import StepBatch
from offpg_offline.estimators import segmented_cumsum
from offpg_offline.ope import (
    ESTIMATE_NAMES,
    Estimate,
    FQEConfig,
    bootstrap_counts,
    bootstrap_intervals,
    critic_values,
    direct_method,
    doubly_robust,
    effective_sample_size,
    empirical_bernstein_lower_bound,
    episode_mean,
    evaluate_offline,
    fit_fqe,
    hcope_lower_bound,
    importance_sampling,
    per_decision_ess,
    per_decision_importance_sampling,
    selection_score,
    trajectory_weights,
    weighted_doubly_robust,
    weighted_importance_sampling,
    weighted_per_decision_importance_sampling,
)
from offpg_offline.policies import CategoricalPolicy, GaussianPolicy

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# A tabular MDP with exact values, and a vectorised simulator
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TabularMDP:
    """S states, A actions; transition[s, a, S] is the probability of terminating."""

    transition: torch.Tensor  # [S, A, S + 1]
    reward: torch.Tensor  # [S, A], deterministic
    start: torch.Tensor  # [S]
    horizon: int  # episodes are truncated after this many steps

    @property
    def n_states(self) -> int:
        return self.reward.shape[0]

    def solve(self, policy: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Finite-horizon Q_t(s, a) [H, S, A], V_t(s) [H, S] and J(π), by backward induction."""
        q = torch.zeros(self.horizon, *self.reward.shape, dtype=F64)
        v = torch.zeros(self.horizon + 1, self.n_states, dtype=F64)
        for t in reversed(range(self.horizon)):
            q[t] = self.reward + gamma * self.transition[:, :, :-1] @ v[t + 1]
            v[t] = (policy * q[t]).sum(1)
        return q, v[:-1], float(self.start @ v[0])


def random_mdp(seed: int, *, n_states: int = 3, n_actions: int = 2, horizon: int = 4,
               deterministic: bool = False) -> TabularMDP:
    gen = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n_states, n_actions, n_states + 1, generator=gen, dtype=F64)
    if deterministic:  # one successor (or termination) per (s, a)
        logits = torch.where(logits == logits.max(-1, keepdim=True).values, 0.0, -math.inf).double()
    start = torch.zeros(n_states, dtype=F64)
    start[0] = 1.0
    if not deterministic:
        start = torch.softmax(torch.randn(n_states, generator=gen, dtype=F64), 0)
    reward = torch.randn(n_states, n_actions, generator=gen, dtype=F64)
    return TabularMDP(torch.softmax(logits, -1), reward, start, horizon)


def random_policy(seed: int, n_states: int = 3, n_actions: int = 2, *, floor: float = 0.1
                  ) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n_states, n_actions, generator=gen, dtype=F64), -1)
    return (1 - floor * n_actions) * probs + floor  # every action has probability ≥ floor


def simulate(mdp: TabularMDP, behavior: torch.Tensor, n_episodes: int, seed: int
             ) -> dict[str, torch.Tensor]:
    """Flat log of `n_episodes` (loops over the ≤ H time steps, vectorised over episodes)."""
    gen = torch.Generator().manual_seed(seed)
    n, s_count = n_episodes, mdp.n_states
    state = torch.multinomial(mdp.start, n, replacement=True, generator=gen)
    alive = torch.ones(n, dtype=torch.bool)
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in
                                           ("state", "action", "next", "alive", "term", "trunc")}
    for t in range(mdp.horizon):
        action = torch.multinomial(behavior[state], 1, generator=gen)[:, 0]
        nxt = torch.multinomial(mdp.transition[state, action], 1, generator=gen)[:, 0]
        terminated = nxt == s_count
        cols["state"].append(state)
        cols["action"].append(action)
        cols["next"].append(torch.where(terminated, 0, nxt))
        cols["alive"].append(alive.clone())
        cols["term"].append(terminated)
        cols["trunc"].append(~terminated & (t == mdp.horizon - 1))
        alive = alive & ~terminated
        state = torch.where(terminated, 0, nxt)
    stacked = {k: torch.stack(v, dim=1) for k, v in cols.items()}  # [N, H], episode-major
    mask = stacked.pop("alive")
    flat = {k: v[mask] for k, v in stacked.items()}
    step = torch.arange(mdp.horizon).expand(n, -1)[mask]
    state, action = flat["state"], flat["action"]
    return {
        "state": state, "action": action, "next_state": flat["next"], "step": step,
        "episode_start": step == 0, "reward": mdp.reward[state, action],
        "terminated": flat["term"], "truncated": flat["trunc"],
        "behavior_logp": behavior[state, action].log(),
    }


def ope_args(log: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"target_logp": target[log["state"], log["action"]].log(),
            "behavior_logp": log["behavior_logp"], "reward": log["reward"], "step": log["step"],
            "episode_start": log["episode_start"]}


def as_batch(log: dict[str, torch.Tensor], n_states: int) -> StepBatch:
    eye = torch.eye(n_states)
    return StepBatch(
        episode_id=log["episode_start"].long().cumsum(0) - 1, step=log["step"],
        obs=eye[log["state"]], action=log["action"], reward=log["reward"].float(),
        next_obs=eye[log["next_state"]], terminated=log["terminated"],
        truncated=log["truncated"], logged_logp=log["behavior_logp"].float(),
        estimated_logp=None, episode_start=log["episode_start"],
    )


def tabular_policy(probs: torch.Tensor) -> CategoricalPolicy:
    """The real CategoricalPolicy, linear on one-hot states, set to the table `probs`."""
    policy = CategoricalPolicy(probs.shape[0], probs.shape[1], hidden=())
    with torch.no_grad():
        policy.net[0].weight.copy_(probs.log().T)
        policy.net[0].bias.zero_()
    return policy


# --------------------------------------------------------------------------------------------
# One-step (bandit) logs: textbook IPW and SNIPW
# --------------------------------------------------------------------------------------------


def test_bandit_is_and_wis_equal_ipw_and_snipw_by_hand() -> None:
    # Four logged contexts, worked by hand:
    #   β(a|x)  π(a|x)  ρ = π/β  r    ρ·r
    #   0.50    0.25    0.5      1    0.5
    #   0.25    0.50    2.0      0    0.0
    #   0.50    0.50    1.0      2    2.0
    #   0.25    0.75    3.0      1    3.0
    # IPW = (0.5 + 0 + 2 + 3)/4 = 1.375;  SNIPW = 5.5/(0.5 + 2 + 1 + 3) = 5.5/6.5 = 11/13.
    # ESS = (Σρ)²/Σρ² = 6.5²/(0.25 + 4 + 1 + 9) = 42.25/14.25.
    # Weights pass through exp(log π − log β) in float64, so agreement is to a few ulps.
    args = {
        "target_logp": torch.tensor([0.25, 0.5, 0.5, 0.75], dtype=F64).log(),
        "behavior_logp": torch.tensor([0.5, 0.25, 0.5, 0.25], dtype=F64).log(),
        "reward": torch.tensor([1.0, 0.0, 2.0, 1.0], dtype=F64),
        "step": torch.zeros(4, dtype=torch.long),
        "episode_start": torch.ones(4, dtype=torch.bool),
    }
    exact = {"ipw": 1.375, "snipw": 11 / 13}
    tol = {"rtol": 1e-14, "atol": 0.0}
    for gamma in (1.0, 0.5):  # γ^0 = 1: the discount cannot matter with one step
        torch.testing.assert_close(importance_sampling(**args, gamma=gamma).mean().item(),
                                   exact["ipw"], **tol)
        torch.testing.assert_close(per_decision_importance_sampling(**args, gamma=gamma)
                                   .mean().item(), exact["ipw"], **tol)
        torch.testing.assert_close(weighted_importance_sampling(**args, gamma=gamma).item(),
                                   exact["snipw"], **tol)
        torch.testing.assert_close(weighted_per_decision_importance_sampling(
            **args, gamma=gamma).item(), exact["snipw"], **tol)
    zero = torch.zeros(4, dtype=F64)  # DR with Q̂ = V̂ = 0 is IS, WDR is WIS
    torch.testing.assert_close(doubly_robust(**args, q_value=zero, state_value=zero, gamma=1.0)
                               .mean().item(), exact["ipw"], **tol)
    torch.testing.assert_close(weighted_doubly_robust(**args, q_value=zero, state_value=zero,
                                                      gamma=1.0).item(), exact["snipw"], **tol)
    ratios = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=F64)
    assert effective_sample_size(ratios) == pytest.approx(42.25 / 14.25, rel=1e-15)
    assert per_decision_ess(args["target_logp"], args["behavior_logp"], args["step"],
                            args["episode_start"]) == pytest.approx(42.25 / 14.25, rel=1e-14)


def test_bandit_dr_with_a_reward_model_by_hand() -> None:
    # Two contexts, two actions, π deterministic on action 1 in both.
    #   logged a, β(a|x), r, q̂(x,0), q̂(x,1):  (0, 0.5, 1.0, 0.5, 2.0)  (1, 0.8, 3.0, 0.0, 1.0)
    # V̂(x) = q̂(x, 1) = 2.0, 1.0; ρ = 0/0.5 = 0, 1/0.8 = 1.25.
    # DR_i = ρ_i (r_i − q̂(x_i, a_i)) + V̂(x_i) = 0·(1 − 0.5) + 2 = 2, 1.25·(3 − 1) + 1 = 3.5.
    # DR = 2.75. WDR = Σρ(r − q̂)/Σρ + ΣV̂/2 = 2.5/1.25 + 1.5 = 3.5.
    args = {
        "target_logp": torch.tensor([-math.inf, 0.0], dtype=F64),
        "behavior_logp": torch.tensor([0.5, 0.8], dtype=F64).log(),
        "reward": torch.tensor([1.0, 3.0], dtype=F64),
        "step": torch.zeros(2, dtype=torch.long),
        "episode_start": torch.ones(2, dtype=torch.bool),
        "q_value": torch.tensor([0.5, 1.0], dtype=F64),
        "state_value": torch.tensor([2.0, 1.0], dtype=F64),
    }
    torch.testing.assert_close(doubly_robust(**args, gamma=1.0),
                               torch.tensor([2.0, 3.5], dtype=F64), rtol=1e-14, atol=0.0)
    assert weighted_doubly_robust(**args, gamma=1.0).item() == pytest.approx(3.5, rel=1e-14)


# --------------------------------------------------------------------------------------------
# Multi-step identities: concatenated batches equal per-episode slow references
# --------------------------------------------------------------------------------------------


def _random_flat(lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    m = sum(lengths)
    return {
        "target_logp": torch.rand(m, generator=gen, dtype=F64).clamp_min(0.05).log(),
        "behavior_logp": torch.rand(m, generator=gen, dtype=F64).clamp_min(0.05).log(),
        "reward": torch.randn(m, generator=gen, dtype=F64),
        "step": torch.cat([torch.arange(n) for n in lengths]),
        "episode_start": torch.cat([torch.arange(n) == 0 for n in lengths]),
        "q_value": torch.randn(m, generator=gen, dtype=F64),
        "state_value": torch.randn(m, generator=gen, dtype=F64),
        "end_value": torch.randn(m, generator=gen, dtype=F64),  # used on last rows only
    }


def _reference(log: dict[str, torch.Tensor], lengths: list[int], gamma: float, *,
               with_end: bool) -> dict[str, float]:
    """Slow, obviously correct loops: episodes padded to T_max with r = Q̂ = V̂ = 0, ρ = 1.

    With `with_end`, DR and WDR add γ^{T} w_{0:T−1} V̂_end at each episode's last step.
    """
    horizon, n = max(lengths), len(lengths)
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    w = torch.ones(n, horizon, dtype=F64)  # padded w_{0:t}
    r = torch.zeros(n, horizon, dtype=F64)
    q = torch.zeros(n, horizon, dtype=F64)
    v = torch.zeros(n, horizon, dtype=F64)
    for e, (a, b) in enumerate(itertools.pairwise(bounds)):
        weight = 1.0
        for t in range(horizon):
            if a + t < b:
                weight *= math.exp(log["target_logp"][a + t] - log["behavior_logp"][a + t])
                r[e, t], q[e, t] = log["reward"][a + t], log["q_value"][a + t]
                if with_end and a + t == b - 1:  # Q̂ minus the bootstrapped tail
                    q[e, t] -= gamma * log["end_value"][a + t]
                v[e, t] = log["state_value"][a + t]
            w[e, t] = weight
    w_prev = torch.cat([torch.ones(n, 1, dtype=F64), w[:, :-1]], 1)
    disc = gamma ** torch.arange(horizon, dtype=F64)
    out = {"is": 0.0, "pdis": 0.0, "dr": 0.0}
    for e in range(n):
        out["is"] += float(w[e, -1] * (disc * r[e]).sum()) / n
        for t in range(horizon):
            out["pdis"] += float(disc[t] * w[e, t] * r[e, t]) / n
            dr_term = w[e, t] * (r[e, t] - q[e, t]) + w_prev[e, t] * v[e, t]
            out["dr"] += float(disc[t] * dr_term) / n
    out["wis"] = float((w[:, -1] * (r * disc).sum(1)).sum() / w[:, -1].sum())
    out["wpdis"] = sum(float(disc[t] * (w[:, t] * r[:, t]).sum() / w[:, t].sum())
                       for t in range(horizon))
    out["wdr"] = sum(float(disc[t] * ((w[:, t] * (r[:, t] - q[:, t])).sum() / w[:, t].sum()
                                      + (w_prev[:, t] * v[:, t]).sum() / w_prev[:, t].sum()))
                     for t in range(horizon))
    return out


@pytest.mark.parametrize("lengths", [[3, 5, 1, 4], [1, 1, 1], [6], [2, 7, 1, 1, 3, 5]])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("with_end", [False, True])
def test_vectorised_estimators_equal_padded_slow_reference(lengths: list[int], gamma: float,
                                                           with_end: bool) -> None:
    log = _random_flat(lengths, seed=len(lengths))
    base = {k: log[k] for k in ("target_logp", "behavior_logp", "reward", "step",
                                "episode_start")}
    critic = {"q_value": log["q_value"], "state_value": log["state_value"],
              "end_value": log["end_value"] if with_end else None}
    got = {
        "is": importance_sampling(**base, gamma=gamma).mean(),
        "wis": weighted_importance_sampling(**base, gamma=gamma),
        "pdis": per_decision_importance_sampling(**base, gamma=gamma).mean(),
        "wpdis": weighted_per_decision_importance_sampling(**base, gamma=gamma),
        "dr": doubly_robust(**base, **critic, gamma=gamma).mean(),
        "wdr": weighted_doubly_robust(**base, **critic, gamma=gamma),
    }
    expected = _reference(log, lengths, gamma, with_end=with_end)
    for name, value in got.items():  # same float64 sums in another order: ~1e-15 relative
        assert value.item() == pytest.approx(expected[name], rel=1e-11, abs=1e-12), name


def test_concatenated_batch_equals_single_episodes() -> None:
    # Per-episode terms of the linear estimators must not leak across episode boundaries.
    lengths = [3, 5, 1, 4, 2]
    log = _random_flat(lengths, seed=11)
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    for fn, extra in ((importance_sampling, ()), (per_decision_importance_sampling, ()),
                      (doubly_robust, ("q_value", "state_value", "end_value"))):
        keys = ("target_logp", "behavior_logp", "reward", "step", "episode_start", *extra)
        whole = fn(**{k: log[k] for k in keys}, gamma=0.9)
        singles = torch.cat([fn(**{k: log[k][a:b] for k in keys}, gamma=0.9)
                             for a, b in itertools.pairwise(bounds)])
        torch.testing.assert_close(whole, singles, rtol=1e-13, atol=1e-13)


def test_counts_of_ones_give_the_point_estimate_and_duplicates_equal_repeated_episodes() -> None:
    # Multiplicity 2 of an episode must equal the log with that episode copied twice.
    lengths = [3, 1, 4]
    log = _random_flat(lengths, seed=5)
    keys = ("target_logp", "behavior_logp", "reward", "step", "episode_start")
    base = {k: log[k] for k in keys}
    doubled = {k: torch.cat([log[k], log[k][4:8]]) for k in keys}  # episode 2 (rows 4..7) twice
    counts = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 2.0]], dtype=F64)
    for fn in (weighted_importance_sampling, weighted_per_decision_importance_sampling):
        values = fn(**base, gamma=0.95, counts=counts)
        torch.testing.assert_close(values[0], fn(**base, gamma=0.95), rtol=1e-14, atol=0.0)
        torch.testing.assert_close(values[1], fn(**doubled, gamma=0.95), rtol=1e-13, atol=0.0)


def test_step_column_must_count_within_episodes() -> None:
    log = _random_flat([3, 2], seed=0)
    args = {k: log[k] for k in ("target_logp", "behavior_logp", "reward", "step",
                                "episode_start")}
    args["step"] = torch.tensor([0, 1, 2, 1, 2])
    with pytest.raises(ValueError, match="step must count"):
        importance_sampling(**args, gamma=1.0)


# --------------------------------------------------------------------------------------------
# Statistical properties on the tabular MDP
# --------------------------------------------------------------------------------------------


def test_is_and_pdis_are_unbiased_on_a_tabular_mdp() -> None:
    # Stochastic transitions, action-dependent termination (variable lengths), γ = 0.9.
    # 20k episodes: the estimate must lie within 4 standard errors of the exact J(π)
    # (a false alarm has probability 6e-5 per estimator under normality).
    mdp = random_mdp(seed=0)
    behavior, target = random_policy(1), random_policy(2)
    _, _, exact = mdp.solve(target, gamma=0.9)
    log = simulate(mdp, behavior, 20_000, seed=3)
    assert log["terminated"].any() and log["truncated"].any()
    for fn in (importance_sampling, per_decision_importance_sampling):
        terms = fn(**ope_args(log, target), gamma=0.9)
        error = abs(terms.mean().item() - exact)
        assert error < 4 * terms.std().item() / math.sqrt(terms.shape[0]), fn.__name__


def test_dr_and_wdr_are_exact_given_the_true_q() -> None:
    # Deterministic transitions and rewards, one start state: r_t + γ V_{t+1}(s_{t+1}) = Q_t(s_t,
    # a_t) on every logged step, so every DR term telescopes to V_0(s_0) = J(π). Only rounding
    # remains (≈ 1e-15 relative per term; we allow 1e-12).
    mdp = random_mdp(seed=4, n_states=4, deterministic=True, horizon=6)
    behavior, target = random_policy(5, 4), random_policy(6, 4)
    q, v, exact = mdp.solve(target, gamma=0.9)
    log = simulate(mdp, behavior, 500, seed=7)
    assert log["terminated"].any() and log["truncated"].any()  # variable lengths
    critic = {"q_value": q[log["step"], log["state"], log["action"]],
              "state_value": v[log["step"], log["state"]]}
    per_episode = doubly_robust(**ope_args(log, target), **critic, gamma=0.9)
    torch.testing.assert_close(per_episode, torch.full_like(per_episode, exact),
                               rtol=1e-12, atol=1e-12)
    wdr = weighted_doubly_robust(**ope_args(log, target), **critic, gamma=0.9)
    assert wdr.item() == pytest.approx(exact, rel=1e-12, abs=1e-12)


def _sub_log_counts(n_logs: int, size: int) -> torch.Tensor:
    """Indicator [L, L·size]: row l selects episodes l·size .. (l+1)·size − 1."""
    return torch.repeat_interleave(torch.eye(n_logs, dtype=F64), size, dim=1)


def test_weighted_estimators_are_consistent_and_alive_only_normalisation_is_not() -> None:
    # 40 independent logs at N = 50 and at N = 3200 episodes. Error ∝ 1/√N for a consistent
    # estimator, so the RMSE should shrink ≈ 8×; we require ≥ 3× (the RMSE over 40 logs is
    # itself uncertain by about ±11%), and the large-N RMSE must be small in absolute terms.
    mdp = random_mdp(seed=0)
    behavior, target = random_policy(1), random_policy(2)
    _, _, exact = mdp.solve(target, gamma=0.9)
    rmse = {}
    for size in (50, 3200):
        log = simulate(mdp, behavior, 40 * size, seed=size)
        counts = _sub_log_counts(40, size)
        for fn in (weighted_importance_sampling, weighted_per_decision_importance_sampling):
            values = fn(**ope_args(log, target), gamma=0.9, counts=counts)
            rmse[fn.__name__, size] = (values - exact).square().mean().sqrt().item()
    for name in ("weighted_importance_sampling", "weighted_per_decision_importance_sampling"):
        assert rmse[name, 3200] < rmse[name, 50] / 3, (name, rmse)
        assert rmse[name, 3200] < 0.05 * (abs(exact) + 1), (name, rmse)
    # The deviation documented in ope.py: normalising at t over surviving episodes only
    # estimates Σ_t γ^t E_π[r_t | alive at t], which misses J(π) here because π and β terminate
    # at different rates. On 128k episodes, it is off by far more than the padded WPDIS RMSE.
    log = simulate(mdp, behavior, 40 * 3200, seed=1)
    args = ope_args(log, target)
    weight = segmented_cumsum(args["target_logp"] - args["behavior_logp"],
                              log["episode_start"]).exp()
    horizon = int(log["step"].max()) + 1
    numerator = torch.zeros(horizon, dtype=F64).index_add(0, log["step"], weight * args["reward"])
    alive_weight = torch.zeros(horizon, dtype=F64).index_add(0, log["step"], weight)
    alive_only = ((0.9 ** torch.arange(horizon, dtype=F64)) * numerator / alive_weight).sum()
    padded = weighted_per_decision_importance_sampling(**args, gamma=0.9).item()
    tolerance = rmse["weighted_per_decision_importance_sampling", 3200]
    assert abs(padded - exact) < 4 * tolerance
    assert abs(alive_only.item() - exact) > 10 * tolerance


def test_weighted_estimates_stay_within_the_return_range() -> None:
    # Self-normalised estimates are convex combinations: WIS ∈ [min G, max G] (OBP's property).
    mdp = random_mdp(seed=8)
    log = simulate(mdp, random_policy(9), 300, seed=10)
    args = ope_args(log, random_policy(11))
    returns = importance_sampling(**{**args, "target_logp": args["behavior_logp"]}, gamma=0.9)
    counts = bootstrap_counts(300, 50, torch.Generator().manual_seed(0))
    wis = weighted_importance_sampling(**args, gamma=0.9, counts=counts)
    assert bool((wis >= returns.min() - 1e-12).all() and (wis <= returns.max() + 1e-12).all())


# --------------------------------------------------------------------------------------------
# Intervals and bounds
# --------------------------------------------------------------------------------------------


def test_bootstrap_counts_resample_every_episode_slot_and_are_seeded() -> None:
    counts = bootstrap_counts(7, 5, torch.Generator().manual_seed(3))
    again = bootstrap_counts(7, 5, torch.Generator().manual_seed(3))
    assert torch.equal(counts, again)
    assert torch.equal(counts.sum(1), torch.full((5,), 7.0, dtype=F64))


def test_bootstrap_interval_of_pdis_covers_the_truth() -> None:
    # 300 independent logs of 100 episodes, 400 resamples each. A percentile bootstrap of a
    # mean has near-nominal coverage at this size; we require ≥ 90% for the 95% interval
    # (with true coverage 95%, P(observed < 90%) ≈ 1e-4 by the binomial). Measured: see print.
    mdp = random_mdp(seed=0)
    behavior, target = random_policy(1), random_policy(2)
    _, _, exact = mdp.solve(target, gamma=0.9)
    n_logs, size = 300, 100
    log = simulate(mdp, behavior, n_logs * size, seed=12)
    terms = per_decision_importance_sampling(**ope_args(log, target), gamma=0.9).reshape(
        n_logs, size)
    covered = 0
    for i in range(n_logs):
        low, high = bootstrap_intervals({"pdis": lambda c, x=terms[i]: episode_mean(x, c)}, size,
                                        n_boot=400, seed=i)["pdis"]
        covered += low <= exact <= high
    coverage = covered / n_logs
    print(f"PDIS 95% bootstrap coverage over {n_logs} logs: {coverage:.3f}")
    assert coverage >= 0.90


def test_empirical_bernstein_bound_by_hand() -> None:
    # X = (0, 0.5, 1, 3), c = 1 → Y = (0, 0.5, 1, 1): mean 0.625, Var_n = Σ(y − ȳ)²/3
    # = (0.390625 + 0.015625 + 0.140625 + 0.140625)/3 = 0.6875/3; δ = 0.1 → ln 20.
    # bound = 0.625 − sqrt(2 ln 20 · 0.6875/3 / 4) − 7 ln 20 / 9.
    values = torch.tensor([0.0, 0.5, 1.0, 3.0], dtype=F64)
    expected = 0.625 - math.sqrt(2 * math.log(20) * 0.6875 / 3 / 4) - 7 * math.log(20) / 9
    assert empirical_bernstein_lower_bound(values, clip=1.0, delta=0.1) == pytest.approx(
        expected, rel=1e-14)


def test_hcope_lower_bound_holds_with_the_stated_confidence() -> None:
    # 200 logs of 400 episodes; δ = 0.05 → the bound may exceed J(π) in at most ~5% of logs
    # (HCOPE is conservative, so usually none). We allow 10/200 and require a non-trivial bound.
    mdp = random_mdp(seed=0)
    behavior, target = random_policy(1), random_policy(2)
    _, _, exact = mdp.solve(target, gamma=0.9)
    log = simulate(mdp, behavior, 200 * 400, seed=13)
    args = ope_args(log, target)
    returns = importance_sampling(**{**args, "target_logp": args["behavior_logp"]}, gamma=0.9)
    g_max = mdp.reward.abs().max().item() / (1 - 0.9)  # |G| ≤ max|r|/(1 − γ) for every policy
    g_min = -g_max
    weights = trajectory_weights(args["target_logp"], args["behavior_logp"],
                                 args["episode_start"])
    terms = (weights * (returns - g_min) / (g_max - g_min)).reshape(200, 400)
    bounds = torch.tensor([g_min + (g_max - g_min) * hcope_lower_bound(terms[i], seed=i)
                           for i in range(200)])
    assert int((bounds > exact).sum()) <= 10
    assert bounds.mean() > g_min + 0.2 * (g_max - g_min)  # better than the trivial bound g_min


# --------------------------------------------------------------------------------------------
# FQE and the evaluation job
# --------------------------------------------------------------------------------------------


def _chain(n_states: int) -> TabularMDP:
    """States 0..n−1; action 1 moves right, action 0 stays; reward 1 on reaching the end, which
    terminates. A time limit of 3n cuts (truncates) the rest."""
    transition = torch.zeros(n_states, 2, n_states + 1, dtype=F64)
    reward = torch.zeros(n_states, 2, dtype=F64)
    for s in range(n_states):
        transition[s, 0, s] = 1.0
        transition[s, 1, s + 1] = 1.0
    reward[n_states - 1, 1] = 1.0
    reward[:, 0] = -0.1
    start = torch.full((n_states,), 1.0 / n_states, dtype=F64)
    return TabularMDP(transition, reward, start, 3 * n_states)


def test_fqe_converges_to_the_exact_q_on_a_chain() -> None:
    # Infinite-horizon Q^π solves Q = R + γ P_live Π Q. With one-hot states and a linear critic
    # FQE is exact tabular evaluation on visited pairs (deterministic transitions), so the only
    # errors are at most γ^K·max|Q| = 0.7^20·1 ≈ 8e-4 from stopping after K backups, and the
    # regression's optimisation error (float32 critic); we allow 1e-3 on O(1) values (measured
    # 6e-8: the chain mixes faster than the worst case).
    gamma, n = 0.7, 4
    mdp = _chain(n)
    behavior = torch.full((n, 2), 0.5, dtype=F64)
    target = torch.tensor([[0.2, 0.8]] * n, dtype=F64)
    live = mdp.transition[:, :, :-1].reshape(n * 2, n)  # [SA, S]
    pi = torch.zeros(n, n * 2, dtype=F64)  # [S, SA]: V = Π Q
    for s in range(n):
        pi[s, 2 * s: 2 * s + 2] = target[s]
    exact_q = torch.linalg.solve(torch.eye(2 * n, dtype=F64) - gamma * live @ pi,
                                 mdp.reward.reshape(-1)).reshape(n, 2)
    log = simulate(mdp, behavior, 200, seed=14)
    batch = as_batch(log, n)
    policy = tabular_policy(target)
    critic = fit_fqe(policy, batch, gamma=gamma, seed=0, config=FQEConfig(
        hidden=(), iterations=20, steps_per_iteration=60, lr=0.02, batch_size=4096))
    with torch.no_grad():
        fitted = critic.q_all(torch.eye(n)).double()
    torch.testing.assert_close(fitted, exact_q, rtol=0.0, atol=1e-3)
    q_value, state_value, _ = critic_values(critic, policy, batch)
    exact_v = (target * exact_q).sum(1)
    torch.testing.assert_close(state_value, exact_v[log["state"]], rtol=0.0, atol=1e-3)
    torch.testing.assert_close(direct_method(state_value, log["episode_start"]).mean(),
                               exact_v[log["state"][log["episode_start"]]].mean(),
                               rtol=0.0, atol=1e-3)
    del q_value


def test_evaluate_offline_recovers_the_true_value() -> None:
    # 3000 episodes of the random MDP, one-hot observations, the real CategoricalPolicy.
    # Every estimator must land within 0.1 of J(π) ≈ −0.39: the IS family's standard errors are
    # ≈ 0.02 here (0.1 is 5 SEs). Without bootstrapping at the 4-step time limit the critic
    # also sees t/T_max (Q depends on t); its 500 Adam steps leave FQE within 0.05 (measured).
    # The intervals must contain their point estimate, the HCOPE bound must sit below J(π),
    # and the same seed must give identical results.
    mdp = random_mdp(seed=0)
    behavior, target = random_policy(1), random_policy(2)
    _, _, exact = mdp.solve(target, gamma=0.9)
    log = simulate(mdp, behavior, 3000, seed=15)
    batch = as_batch(log, mdp.n_states)
    policy = tabular_policy(target)
    fqe = FQEConfig(hidden=(16,), iterations=10, steps_per_iteration=50, lr=1e-2,
                    bootstrap_truncated=False)  # the MDP's horizon is part of the task
    estimates = evaluate_offline(policy, batch, batch.logged_logp, gamma=0.9, n_boot=200, seed=0,
                                 fqe=fqe)
    assert [e.name for e in estimates] == list(ESTIMATE_NAMES)
    for estimate in estimates:
        assert isinstance(estimate, Estimate)
        assert estimate.value == pytest.approx(exact, abs=0.1), estimate
        assert estimate.ci_low <= estimate.value <= estimate.ci_high, estimate
        assert 0 < estimate.ess <= 3000 and estimate.n_episodes == 3000
        if estimate.name == "is":
            assert estimate.lower_bound is not None and estimate.lower_bound <= exact
        else:  # pdis has a bound only for non-negative rewards, and this MDP has negative ones
            assert estimate.lower_bound is None
    assert set(estimates[0].metrics()) == {"ope/is", "ope/is_ci_low", "ope/is_ci_high",
                                           "ope/is_ess", "ope/is_lb"}
    shifted = StepBatch(**{**{f: getattr(batch, f) for f in StepBatch.__dataclass_fields__},
                           "reward": batch.reward - mdp.reward.min().float()})
    bounds = evaluate_offline(policy, shifted, batch.logged_logp, gamma=0.9, n_boot=10, seed=0,
                              estimators=("is", "pdis"))
    assert all(b.lower_bound is not None and b.lower_bound <= b.value for b in bounds)
    again = evaluate_offline(policy, batch, batch.logged_logp, gamma=0.9, n_boot=200, seed=0,
                             fqe=fqe, estimators=("wpdis", "dr"))
    assert again == [estimates[3], estimates[4]]


def test_evaluate_offline_names_an_unknown_estimator() -> None:
    mdp = random_mdp(seed=0)
    log = simulate(mdp, random_policy(1), 10, seed=0)
    batch = as_batch(log, mdp.n_states)
    with pytest.raises(ValueError, match="unknown estimator"):
        evaluate_offline(tabular_policy(random_policy(2)), batch, batch.logged_logp, gamma=0.9,
                         n_boot=10, seed=0, estimators=("ips",))


def _two_step_gaussian_log(n_episodes: int, seed: int) -> tuple[StepBatch, float]:
    """Continuous actions: s_0 ∼ U(−1, 1), r_t = exp(−(a_t − s_t)²), s_1 = s_0 − a_0, 2 steps.

    β = N(0, 1), π = N(s/2, 1/4). For X ∼ N(m, v), E[exp(−cX²)] = exp(−cm²/(1 + 2cv))/√(1 + 2cv),
    so E_π[r_t | s_t] = exp(−s_t²/6)/√1.5, and s_1 | s_0 ∼ N(s_0/2, 1/4) gives
    E_π[r_1 | s_0] = exp(−s_0²/26)/(√1.5·√(13/12)). J(π) = E_{s_0}[E[r_0|s_0] + γ E[r_1|s_0]] by a
    midpoint rule on 200k points (error ≈ 1e-12). The observation carries t (Q is Markov in it).
    """
    gamma = 0.9
    grid = -1 + (torch.arange(200_000, dtype=F64) + 0.5) / 100_000
    exact = ((-grid.square() / 6).exp() / math.sqrt(1.5)
             + gamma * (-grid.square() / 26).exp() / math.sqrt(1.5 * 13 / 12)).mean().item()
    gen = torch.Generator().manual_seed(seed)
    s0 = 2 * torch.rand(n_episodes, generator=gen) - 1
    a0 = torch.randn(n_episodes, generator=gen)
    s1 = s0 - a0
    a1 = torch.randn(n_episodes, generator=gen)
    state = torch.stack([s0, s1], 1).reshape(-1)
    time = torch.tensor([0.0, 1.0]).repeat(n_episodes)
    action = torch.stack([a0, a1], 1).reshape(-1)
    next_state = torch.stack([s1, torch.zeros_like(s1)], 1).reshape(-1)
    step = torch.tensor([0, 1]).repeat(n_episodes)
    batch = StepBatch(
        episode_id=torch.arange(n_episodes).repeat_interleave(2), step=step,
        obs=torch.stack([state, time], 1), action=action[:, None],
        reward=(-(action - state).square()).exp(), next_obs=torch.stack([next_state, time + 1], 1),
        terminated=step == 1, truncated=torch.zeros(2 * n_episodes, dtype=torch.bool),
        logged_logp=-0.5 * action.square() - 0.5 * math.log(2 * math.pi), estimated_logp=None,
        episode_start=step == 0)
    return batch, exact


def test_evaluate_offline_with_continuous_actions_and_a_sampled_fqe_value() -> None:
    # The real GaussianPolicy set to π = N(s/2, 1/4) (linear mean, fixed log σ; it ignores t).
    # 4000 episodes. IS and PDIS are unbiased with standard errors ≈ 0.03 and 0.02 here: they
    # must lie within 4 bootstrap SEs ((ci_high − ci_low)/3.92). The others have SEs ≈ 0.006
    # or less, and FQE regresses smooth bumps with a small tanh MLP, averaging 16 sampled
    # actions per state (measured bias < 0.005 on three seeds); they must lie within 0.03 of
    # J ≈ 1.47.
    batch, exact = _two_step_gaussian_log(4000, seed=16)
    policy = GaussianPolicy(2, 1, hidden=(), log_std_init=math.log(0.5))
    with torch.no_grad():
        policy.net[0].weight.copy_(torch.tensor([[0.5, 0.0]]))
        policy.net[0].bias.zero_()
    fqe = FQEConfig(hidden=(32, 32), iterations=3, steps_per_iteration=300, lr=3e-3)
    estimates = evaluate_offline(policy, batch, batch.logged_logp, gamma=0.9, n_boot=200,
                                 seed=0, fqe=fqe, critic_interval="fixed")  # point values only
    for estimate in estimates:
        standard_error = (estimate.ci_high - estimate.ci_low) / 3.92
        tolerance = 4 * standard_error if estimate.name in ("is", "pdis") else 0.03
        assert abs(estimate.value - exact) < tolerance, (estimate, exact)


def test_selection_score_reads_the_named_number() -> None:
    estimates = [Estimate("is", 1.0, 0.5, 1.5, 10.0, 0.2, 20), Estimate("wdr", 2.0, 1.8, 2.2, 9.0)]
    assert selection_score(estimates, "wdr") == 2.0
    assert selection_score(estimates, "wdr_ci_low") == 1.8
    assert selection_score(estimates, "is_lb") == 0.2
    with pytest.raises(ValueError, match="cannot select by 'wdr_lb'; choose from is, is_ci_low"):
        selection_score(estimates, "wdr_lb")


def test_fqe_with_gamma_one_and_bootstrapped_truncation_stays_finite() -> None:
    # γ = 1 with truncated ends bootstrapped: the value box is [0, r_max · ∞) for rewards ≥ 0,
    # and its lower end must be 0, not 0 · ∞ = NaN (which made every target NaN).
    mdp = random_mdp(seed=0)
    log = simulate(mdp, random_policy(1), 50, seed=3)
    batch = as_batch(log, mdp.n_states)
    batch = StepBatch(**{**{f: getattr(batch, f) for f in StepBatch.__dataclass_fields__},
                         "reward": batch.reward - mdp.reward.min().float()})
    critic = fit_fqe(tabular_policy(random_policy(2)), batch, gamma=1.0, seed=0,
                     config=FQEConfig(hidden=(8,), iterations=3, steps_per_iteration=5,
                                      bootstrap_truncated=True))
    values = critic_values(critic, tabular_policy(random_policy(2)), batch)
    assert all(bool(torch.isfinite(v).all()) for v in values)
