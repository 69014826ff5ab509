"""Critic-based intervals (DR, WDR, FQE): the batched refit ensemble and the fixed critic.

The reference problem is a 4-state MDP that terminates with probability 0.25–0.45 per step,
so Q^π is stationary, a linear critic on one-hot states is tabular (well specified), and
J(π) = start · (I − γ P_π)⁻¹ r_π exactly (a linear solve in float64).
"""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from typer.testing import CliRunner

from offpg_offline.cli import app
from offpg_offline.data.batch import StepBatch, load_steps
from offpg_offline.jobs.targets import UniformPolicy
from offpg_offline.ope import (
    CRITIC_INTERVALS,
    FQEConfig,
    bootstrap_counts,
    evaluate_offline,
    fit_fqe,
)
from offpg_offline.ope.intervals import percentile_interval, refit_backups
from offpg_offline.policies import CategoricalPolicy

F64 = torch.float64
S, A, GAMMA, TIME_LIMIT = 4, 2, 0.9, 60
TABULAR = FQEConfig(hidden=(), iterations=15, steps_per_iteration=20, lr=0.1, batch_size=4096)


def problem(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    live = torch.softmax(torch.randn(S, A, S, generator=gen, dtype=F64), -1)
    stop = 0.25 + 0.2 * torch.rand(S, A, 1, generator=gen, dtype=F64)
    transition = torch.cat([(1 - stop) * live, stop], dim=-1)  # last column: terminate
    reward = torch.rand(S, A, generator=gen, dtype=F64)
    start = torch.softmax(torch.randn(S, generator=gen, dtype=F64), 0)
    behavior, target = (0.15 + 0.7 * torch.softmax(2 * torch.randn(S, A, generator=gen,
                                                                   dtype=F64), -1)
                        for _ in range(2))
    p_pi = torch.einsum("sa,sat->st", target, transition[:, :, :-1])
    value = torch.linalg.solve(torch.eye(S, dtype=F64) - GAMMA * p_pi, (target * reward).sum(1))
    return {"transition": transition, "reward": reward, "start": start, "behavior": behavior,
            "target": target, "exact": start @ value}


def simulate(mdp: dict[str, torch.Tensor], n: int, seed: int) -> StepBatch:
    gen = torch.Generator().manual_seed(seed)
    state = torch.multinomial(mdp["start"], n, replacement=True, generator=gen)
    alive = torch.ones(n, dtype=torch.bool)
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("s", "a", "s2", "term", "alive")}
    for _ in range(TIME_LIMIT):  # P(alive at 60) < 1e-7: no episode reaches the limit
        action = torch.multinomial(mdp["behavior"][state], 1, generator=gen)[:, 0]
        nxt = torch.multinomial(mdp["transition"][state, action], 1, generator=gen)[:, 0]
        for key, value in (("s", state), ("a", action), ("s2", torch.where(nxt == S, 0, nxt)),
                           ("term", nxt == S), ("alive", alive.clone())):
            cols[key].append(value)
        alive = alive & (nxt != S)
        state = torch.where(nxt == S, 0, nxt)
    stacked = {k: torch.stack(v, 1) for k, v in cols.items()}
    mask = stacked.pop("alive")
    flat = {k: v[mask] for k, v in stacked.items()}
    step = torch.arange(TIME_LIMIT).expand(n, -1)[mask]
    eye = torch.eye(S)
    s, a = flat["s"], flat["a"]
    return StepBatch(
        episode_id=(step == 0).long().cumsum(0) - 1, step=step, obs=eye[s], action=a,
        reward=mdp["reward"][s, a].float(), next_obs=eye[flat["s2"]], terminated=flat["term"],
        truncated=torch.zeros_like(flat["term"]), logged_logp=mdp["behavior"][s, a].log().float(),
        estimated_logp=None, episode_start=step == 0)


def tabular_policy(probs: torch.Tensor) -> CategoricalPolicy:
    policy = CategoricalPolicy(S, A, hidden=())
    with torch.no_grad():
        policy.net[0].weight.copy_(probs.log().T)
        policy.net[0].bias.zero_()
    return policy


def test_each_ensemble_member_is_the_fqe_fit_on_its_resample() -> None:
    # Member b of the batched ensemble, fitted with row weights = bootstrap counts, must equal
    # an ordinary FQE fit on the explicitly resampled episodes (batch.episodes). Both converge
    # to tabular FQE on that resample (full batch, linear critic on one-hot states); they
    # differ in initialisation only, which 300 Adam steps wash out to < 5e-3 on Q-values of
    # O(1) (measured ~1e-3). Dropping the weights would fit every member on the whole log:
    # resamples of 100 episodes move Q by ~0.1, so the test would fail.
    mdp = problem()
    batch = simulate(mdp, 100, seed=3)
    policy = tabular_policy(mdp["target"])
    counts = bootstrap_counts(batch.n_episodes, 3, torch.Generator().manual_seed(1))
    ensemble = fit_fqe(policy, batch, gamma=GAMMA, config=TABULAR, seed=0,
                       row_weights=counts[:, batch.episode_index()].float())
    eye = torch.eye(S)
    whole_critic = fit_fqe(policy, batch, gamma=GAMMA, config=TABULAR, seed=0)
    with torch.no_grad():
        members = ensemble.q_all(eye)  # [3, S, A]
        whole = whole_critic.q_all(eye)
    assert members.shape == (3, S, A)
    for b in range(3):
        index = torch.repeat_interleave(torch.arange(batch.n_episodes), counts[b].long())
        single = fit_fqe(policy, batch.episodes(index), gamma=GAMMA, config=TABULAR, seed=b + 1)
        with torch.no_grad():
            torch.testing.assert_close(members[b], single.q_all(eye), atol=5e-3, rtol=0.0)
        assert float((members[b] - whole).abs().max()) > 0.02  # the resample mattered


def test_refit_interval_is_wider_and_covers_where_the_fixed_one_does_not() -> None:
    # Seeded case (N = 50 episodes, log seed 1): the fixed-critic FQE interval only resamples
    # the start states, so its width ([0.683, 0.727] here) ignores the critic's estimation
    # error and J(π) falls outside it; refitting the critic on each resample widens it
    # ([0.451, 1.111] with the default 50 warm-started refits; [0.444, 1.039] with 100 cold
    # ones) to cover J(π) = 0.654. (Fixed missed on 8 of log seeds 1–11, refit on none.)
    # (Across 100 seeds: 0.26 vs 0.94 coverage, scripts/bench_ope_coverage.py.)
    mdp = problem()
    exact = float(mdp["exact"])
    batch = simulate(mdp, 50, seed=1)
    policy = tabular_policy(mdp["target"])
    runs = {kind: {e.name: e for e in evaluate_offline(
        policy, batch, batch.logged_logp, gamma=GAMMA, n_boot=200, seed=0, fqe=TABULAR,
        estimators=("is", "dr", "wdr", "fqe"), critic_interval=kind)}
        for kind in CRITIC_INTERVALS}
    fixed, refit = runs["fixed"]["fqe"], runs["refit"]["fqe"]
    assert fixed.value == refit.value  # the point estimate is the one critic's either way
    assert not fixed.ci_low <= exact <= fixed.ci_high, fixed
    assert refit.ci_low <= exact <= refit.ci_high, refit
    assert refit.ci_high - refit.ci_low > 3 * (fixed.ci_high - fixed.ci_low)
    for name in ("dr", "wdr"):  # the option reaches every critic estimator
        assert (runs["fixed"][name].ci_low, runs["fixed"][name].ci_high) != (
            runs["refit"][name].ci_low, runs["refit"][name].ci_high)
    assert runs["fixed"]["is"] == runs["refit"]["is"]  # ...and no other


def test_n_refit_reaches_the_ensemble_and_bad_options_are_named() -> None:
    mdp = problem()
    batch = simulate(mdp, 30, seed=7)
    policy = tabular_policy(mdp["target"])
    small = FQEConfig(hidden=(), iterations=3, steps_per_iteration=10, lr=0.1)
    kwargs = dict(gamma=GAMMA, n_boot=50, seed=0, fqe=small, estimators=("fqe",))
    few = evaluate_offline(policy, batch, batch.logged_logp, n_refit=5, **kwargs)[0]
    many = evaluate_offline(policy, batch, batch.logged_logp, n_refit=40, **kwargs)[0]
    assert (few.ci_low, few.ci_high) != (many.ci_low, many.ci_high)
    with pytest.raises(ValueError, match="critic_interval must be one of refit, fixed"):
        evaluate_offline(policy, batch, batch.logged_logp, critic_interval="frozen", **kwargs)
    with pytest.raises(ValueError, match="row_weights must be non-negative"):
        fit_fqe(policy, batch, gamma=GAMMA, config=small, row_weights=-torch.ones(2, 5))


def test_a_separate_critic_batch_is_resampled_too() -> None:
    # With the critic fitted on other episodes (the training split), the refit interval must
    # still carry the critic's variance: FQE's fixed interval resamples only start states.
    mdp = problem()
    policy = tabular_policy(mdp["target"])
    held_out, train = simulate(mdp, 40, seed=11), simulate(mdp, 40, seed=12)
    found = {kind: evaluate_offline(policy, held_out, held_out.logged_logp, gamma=GAMMA,
                                    n_boot=100, seed=0, fqe=TABULAR, estimators=("fqe",),
                                    critic_batch=train, critic_interval=kind)[0]
             for kind in CRITIC_INTERVALS}
    width = {kind: e.ci_high - e.ci_low for kind, e in found.items()}
    assert width["refit"] > 2 * width["fixed"], width


def test_warm_started_members_start_at_the_full_critic_and_reach_their_resample_fit() -> None:
    # The refit interval warm-starts every member from the critic fitted on all episodes and
    # runs K' = min(K, max(⌈K/5⌉, ⌈1/(1 − γ)⌉)) backups (hand values below). (1) With a
    # negligible learning rate the members equal the full-data critic (the weights and the
    # normalisation were copied; a random init differs by O(1)). (2) After K' backups each
    # member equals cold tabular FQE on its explicit resample within 5e-3 (as in the first
    # test): the warm start keeps the resampling variance (resamples move Q by > 0.02).
    assert refit_backups(FQEConfig(iterations=500), 0.99).iterations == 100
    assert refit_backups(FQEConfig(iterations=500), 0.9).iterations == 100
    assert refit_backups(FQEConfig(iterations=15), 0.9).iterations == 10
    assert refit_backups(FQEConfig(iterations=15), 0.5).iterations == 3
    assert refit_backups(FQEConfig(iterations=40), 1.0).iterations == 40
    mdp = problem()
    batch = simulate(mdp, 100, seed=3)
    policy = tabular_policy(mdp["target"])
    eye = torch.eye(S)
    whole = fit_fqe(policy, batch, gamma=GAMMA, config=TABULAR, seed=0)
    counts = bootstrap_counts(batch.n_episodes, 3, torch.Generator().manual_seed(1))
    weights = counts[:, batch.episode_index()].float()
    frozen = FQEConfig(hidden=(), iterations=1, steps_per_iteration=1, lr=1e-9)
    still = fit_fqe(policy, batch, gamma=GAMMA, config=frozen, seed=5, row_weights=weights,
                    warm_start=whole)
    warm = fit_fqe(policy, batch, gamma=GAMMA, config=refit_backups(TABULAR, GAMMA), seed=5,
                   row_weights=weights, warm_start=whole)
    with torch.no_grad():
        reference = whole.q_all(eye)
        torch.testing.assert_close(still.q_all(eye), reference.expand(3, S, A), atol=1e-5,
                                   rtol=0.0)
        members = warm.q_all(eye)
    for b in range(3):
        index = torch.repeat_interleave(torch.arange(batch.n_episodes), counts[b].long())
        single = fit_fqe(policy, batch.episodes(index), gamma=GAMMA, config=TABULAR, seed=b + 1)
        with torch.no_grad():
            torch.testing.assert_close(members[b], single.q_all(eye), atol=5e-3, rtol=0.0)
        assert float((members[b] - reference).abs().max()) > 0.02
    with pytest.raises(ValueError, match="warm_start needs row_weights"):
        fit_fqe(policy, batch, gamma=GAMMA, config=frozen, warm_start=whole)


def test_evaluate_n_refit_reaches_the_refit_interval_and_the_progress_line() -> None:
    # `offpg evaluate --n-refit 7` must give the interval of evaluate_offline(n_refit=7) (the
    # same seeded resamples and critics, so equal to float rounding: rel 1e-9), which differs
    # from the default's min(n_boot, 50) = 30 critics; the progress line names the 7 critics.
    dataset = Path(__file__).resolve().parents[1] / "datasets" / "cartpole-weak"
    args = ["evaluate", "--policy", "uniform", "--dataset", str(dataset), "--estimators",
            "fqe", "--n-boot", "30", "--fqe-iterations", "3", "--gamma", "0.9"]
    shown = CliRunner().invoke(app, [*args, "--n-refit", "7"])
    assert shown.exit_code == 0, shown.output
    assert "refitting 7 critics on resamples (3 backups each, warm-started)" in shown.stderr
    got = json.loads(CliRunner().invoke(app, [*args, "--n-refit", "7", "--json"]).stdout)
    batch = load_steps(dataset)
    kwargs = dict(gamma=0.9, n_boot=30, seed=0, fqe=FQEConfig(iterations=3),
                  estimators=("fqe",))
    policy = UniformPolicy(gym.spaces.Discrete(2))
    seven, default = (evaluate_offline(policy, batch, batch.logged_logp, n_refit=n, **kwargs)[0]
                      for n in (7, None))
    fqe = got["ope"]["fqe"]
    assert (fqe["ci_low"], fqe["ci_high"]) == pytest.approx((seven.ci_low, seven.ci_high),
                                                            rel=1e-9)
    assert (seven.ci_low, seven.ci_high) != (default.ci_low, default.ci_high)
    refused = CliRunner().invoke(app, [*args, "--n-refit", "1"])
    assert refused.exit_code == 2 and "--n-refit" in refused.output, refused.output


def test_percentile_interval_uses_the_b_plus_1_order_statistics() -> None:
    # The k-th and (B + 1 − k)-th of B i.i.d. draws enclose (B + 1 − 2k)/(B + 1) of the
    # distribution on average, so a 95% interval from B = 50 draws sits at positions
    # 51 · 0.025 = 1.275 and 51 · 0.975 = 49.725 (interpolated); on the draws 1..50 those are
    # the values themselves. (torch.quantile's 2.225 and 48.775 enclose 0.91 on average.)
    assert percentile_interval(torch.arange(1.0, 51.0), 0.95) == pytest.approx((1.275, 49.725))
    assert percentile_interval(torch.arange(1.0, 51.0).flip(0), 0.5) == pytest.approx(
        (12.75, 38.25))
    assert percentile_interval(torch.tensor([3.0, 1.0]), 0.95) == (1.0, 3.0)  # clamped


def test_the_control_member_recentres_the_warm_refit_draws_on_the_point_estimate() -> None:
    # With a warm start, one more member is refitted on the unresampled log (the control) and
    # every draw is shifted by (centre − control): moving the centre by 1 moves every draw by
    # exactly 1, and the number of draws stays n_refit (the control is not a draw).
    from offpg_offline.ope.intervals import refit_critic_draws

    mdp = problem()
    batch = simulate(mdp, 60, seed=4)
    policy = tabular_policy(mdp["target"])
    whole = fit_fqe(policy, batch, gamma=GAMMA, config=TABULAR, seed=0)
    with torch.no_grad():
        target_logp = policy.log_prob(batch.obs, batch.action).double()
    args = (target_logp, batch.logged_logp.double(), batch.reward.double(), batch.step,
            batch.episode_start)
    draws = {c: refit_critic_draws(policy, batch, args, gamma=GAMMA, names=("fqe", "dr"),
                                   config=TABULAR, n_refit=8, seed=0, warm_start=whole,
                                   centre={"fqe": c, "dr": 2 * c})
             for c in (0.0, 1.0)}
    assert draws[0.0]["fqe"].shape == (8,)
    torch.testing.assert_close(draws[1.0]["fqe"] - draws[0.0]["fqe"],
                               torch.ones(8, dtype=torch.float64), atol=1e-12, rtol=0.0)
    torch.testing.assert_close(draws[1.0]["dr"] - draws[0.0]["dr"],
                               torch.full((8,), 2.0, dtype=torch.float64), atol=1e-12, rtol=0.0)
