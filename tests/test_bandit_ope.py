"""OPE on bandit logs (one decision per episode) equals the textbook estimators.

At T = 1: IS = IPW, WIS = SNIPW (and PDIS, WPDIS coincide with them), FQE is the least-squares
reward regression q̂(x, a) ≈ E[r | x, a] (the direct method), DR = (1/N) Σ_i [Σ_a π(a|x_i) q̂(x_i, a)
+ ρ_i (r_i − q̂(x_i, a_i))] (Dudík, Langford & Li 2011). Nothing is bootstrapped from next_obs,
whether the one-step episodes are marked `terminated` or only `truncated` with next_obs a copy
of obs (what an ingest without a `terminated` column produces). The expected values come from
exact enumeration (a synthetic contextual bandit) and from the textbook formulas written here in
numpy (an Open-Bandit-Dataset-style fixture), never from the library's estimators.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from offpg_offline.config import EstimatorName, TrainConfig
from offpg_offline.data.batch import StepBatch
from offpg_offline.data.schema import steps_table
from offpg_offline.data.store import write_dataset
from offpg_offline.ope import FQEConfig, critic_values, evaluate_offline, fit_fqe
from offpg_offline.policies import CategoricalPolicy, load_checkpoint, policy_from_checkpoint
from offpg_offline.train import NullTracker, train

GAMMA = 0.99  # the project's default: with bootstrapping, a one-step log would read ≈ r/(1 − γ)
# At T = 1 every FQE target is r: one regression, no backups; full-batch Adam on a linear head.
REGRESSION = FQEConfig(hidden=(), iterations=1, steps_per_iteration=300, lr=0.1,
                       batch_size=1 << 20)


def bandit_batch(obs: np.ndarray, action: np.ndarray, reward: np.ndarray, logp: np.ndarray, *,
                 terminated: bool) -> StepBatch:
    """One-step episodes. `terminated=False`: truncated, next_obs a copy of obs (the old ingest)."""
    n = len(action)
    flag = torch.ones(n, dtype=torch.bool)
    return StepBatch(
        episode_id=torch.arange(n), step=torch.zeros(n, dtype=torch.int64),
        obs=torch.as_tensor(obs, dtype=torch.float32), action=torch.as_tensor(action),
        reward=torch.as_tensor(reward, dtype=torch.float32),
        next_obs=torch.as_tensor(obs, dtype=torch.float32).clone(),
        terminated=flag if terminated else ~flag, truncated=~flag if terminated else flag,
        logged_logp=torch.as_tensor(logp, dtype=torch.float32), estimated_logp=None,
        episode_start=flag.clone())


def linear_policy(weight: np.ndarray) -> CategoricalPolicy:
    """The real CategoricalPolicy with logits x·W (no hidden layer, no bias)."""
    policy = CategoricalPolicy(weight.shape[0], weight.shape[1], hidden=())
    with torch.no_grad():
        policy.net[0].weight.copy_(torch.as_tensor(weight.T, dtype=torch.float32))
        policy.net[0].bias.zero_()
    return policy


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------
# A synthetic contextual bandit with a known value
# --------------------------------------------------------------------------------------------

N_CONTEXTS, N_ARMS = 5, 3


def contextual_bandit(n: int, seed: int) -> dict[str, np.ndarray]:
    """Contexts x ∼ p (one-hot), β(a|x) with every arm ≥ 0.1, π(a|x), Bernoulli r with mean μ(x, a).

    J(π) = Σ_x p(x) Σ_a π(a|x) μ(x, a) exactly.
    """
    rng = np.random.default_rng(0)  # the problem; `seed` draws the log
    p = rng.dirichlet(np.ones(N_CONTEXTS))
    mu = rng.uniform(0.05, 0.6, size=(N_CONTEXTS, N_ARMS))
    behavior = 0.1 + 0.7 * softmax(rng.normal(size=(N_CONTEXTS, N_ARMS)))
    target_logits = 2.0 * rng.normal(size=(N_CONTEXTS, N_ARMS))
    draw = np.random.default_rng(seed)
    x = draw.choice(N_CONTEXTS, size=n, p=p)
    a = (draw.random(n)[:, None] > np.cumsum(behavior[x], axis=1)).sum(1).clip(max=N_ARMS - 1)
    r = (draw.random(n) < mu[x, a]).astype(np.float64)
    target = softmax(target_logits)
    return {"x": x, "a": a, "r": r, "obs": np.eye(N_CONTEXTS)[x], "beta": behavior[x, a],
            "mu": mu, "p": p, "behavior_table": behavior, "target": target,
            "target_logits": target_logits,
            "exact": float(p @ (target * mu).sum(1))}


@pytest.mark.parametrize("terminated", [True, False])
def test_bandit_ope_equals_ipw_snipw_and_the_reward_model(terminated: bool) -> None:
    log = contextual_bandit(8000, seed=1)
    batch = bandit_batch(log["obs"], log["a"], log["r"], np.log(log["beta"]),
                         terminated=terminated)
    policy = linear_policy(log["target_logits"])
    estimates = {e.name: e for e in evaluate_offline(
        policy, batch, batch.logged_logp, gamma=GAMMA, n_boot=200, n_refit=40, seed=0,
        fqe=REGRESSION)}
    pi = softmax(log["obs"] @ log["target_logits"])  # [N, A], float64
    rho = pi[np.arange(len(log["a"])), log["a"]] / batch.logged_logp.double().exp().numpy()
    ipw, snipw = np.mean(rho * log["r"]), np.sum(rho * log["r"]) / np.sum(rho)
    # π enters through float32 logits (relative error ~1e-7 per weight); sums of 8000
    # non-negative terms keep that relative size: 1e-5 is two orders above it.
    for name, expected in (("is", ipw), ("pdis", ipw), ("wis", snipw), ("wpdis", snipw)):
        assert estimates[name].value == pytest.approx(expected, rel=1e-5), name
    # The reward model: per-(context, arm) mean reward is the least-squares fit on one-hot
    # contexts. Full-batch Adam leaves < 1e-3 (measured ~1e-5) on rewards in [0, 1].
    counts = np.zeros((N_CONTEXTS, N_ARMS))
    sums = np.zeros((N_CONTEXTS, N_ARMS))
    np.add.at(counts, (log["x"], log["a"]), 1.0)
    np.add.at(sums, (log["x"], log["a"]), log["r"])
    cell_mean = sums / counts
    critic = fit_fqe(policy, batch, gamma=GAMMA, config=REGRESSION, seed=0)
    with torch.no_grad():
        fitted = critic.q_all(critic.features(torch.eye(N_CONTEXTS),
                                              torch.zeros(N_CONTEXTS, dtype=torch.int64)))
    np.testing.assert_allclose(fitted.double().numpy(), cell_mean, atol=1e-3)
    # DM and DR with that reward model, by hand: q̂ enters DM with weight π ≤ 1 and DR with
    # |π − ρ·1{a}| ≤ max ρ ≈ 8, so a 1e-3 error in q̂ moves them by at most 1e-3 and 8e-3.
    q_hat = cell_mean[log["x"]]  # [N, A]
    direct = np.mean((pi * q_hat).sum(1))
    dr = direct + np.mean(rho * (log["r"] - q_hat[np.arange(len(log["a"])), log["a"]]))
    assert estimates["fqe"].value == pytest.approx(direct, abs=1e-3)
    assert estimates["dr"].value == pytest.approx(dr, abs=8e-3)
    # Every estimator is consistent: within 4 standard errors of the exact J(π) (IPW's SE here
    # is ≈ 0.01, the others' smaller), and every interval contains it (seeded).
    for estimate in estimates.values():
        assert estimate.value == pytest.approx(log["exact"], abs=0.04), estimate
        assert estimate.ci_low <= log["exact"] <= estimate.ci_high, estimate


# --------------------------------------------------------------------------------------------
# An Open-Bandit-Dataset-style log: string features, 80 items, 3 positions, rare clicks
# --------------------------------------------------------------------------------------------

N_ITEMS, N_POSITIONS = 80, 3


def obd_fixture(n: int, seed: int) -> dict[str, np.ndarray]:
    """Rows as in OBD's CSV: item_id, position, click, propensity_score, user_feature_0..2
    (hashed strings). Propensities vary by row (β is a softmax of the context); clicks are rare
    (mean click probability ≈ 0.01)."""
    rng = np.random.default_rng(seed)
    vocab = [[f"{rng.integers(1 << 62):016x}" for _ in range(4)] for _ in range(3)]
    user = np.stack([rng.choice(v, size=n) for v in vocab], axis=1)  # [n, 3] str
    position = rng.integers(N_POSITIONS, size=n)
    features = encode(user, position)
    behavior = softmax(features @ rng.normal(scale=0.5, size=(features.shape[1], N_ITEMS)))
    item = (rng.random(n)[:, None] > np.cumsum(behavior, axis=1)).sum(1).clip(max=N_ITEMS - 1)
    base = rng.uniform(0.002, 0.02, size=N_ITEMS)[item] * np.array([1.5, 1.0, 0.6])[position]
    click = (rng.random(n) < base).astype(np.float64)
    return {"item_id": item, "position": position, "click": click, "user": user,
            "propensity_score": behavior[np.arange(n), item], "features": features}


def encode(user: np.ndarray, position: np.ndarray) -> np.ndarray:
    """One-hot of each string column (sorted vocabulary) and of the position, float64."""
    blocks = []
    for column in user.T:
        _, index = np.unique(column, return_inverse=True)
        blocks.append(np.eye(index.max() + 1)[index])
    blocks.append(np.eye(N_POSITIONS)[position])
    return np.concatenate(blocks, axis=1)


@pytest.mark.parametrize("terminated", [True, False])
def test_obd_style_log_matches_hand_written_ipw_snipw_and_dr(terminated: bool) -> None:
    data = obd_fixture(4000, seed=5)
    x = data["features"]
    assert data["click"].mean() < 0.02 and np.ptp(data["propensity_score"]) > 0.01
    target_weight = np.random.default_rng(9).normal(size=(x.shape[1], N_ITEMS))
    policy = linear_policy(target_weight)
    batch = bandit_batch(x, data["item_id"], data["click"], np.log(data["propensity_score"]),
                         terminated=terminated)
    found = {e.name: e for e in evaluate_offline(  # point values: either critic interval
        policy, batch, batch.logged_logp, gamma=GAMMA, n_boot=100, seed=0, fqe=REGRESSION,
        estimators=("is", "wis", "dr", "wdr", "fqe"), critic_interval="fixed")}
    n = len(data["item_id"])
    pi = softmax(x @ target_weight)  # the candidate policy's action_dist, [n, 80]
    rho = pi[np.arange(n), data["item_id"]] / data["propensity_score"].astype(np.float32)
    r = data["click"]
    ipw, snipw = np.mean(rho * r), np.sum(rho * r) / np.sum(rho)
    assert found["is"].value == pytest.approx(ipw, rel=1e-5)  # float32 logits, as above
    assert found["wis"].value == pytest.approx(snipw, rel=1e-5)
    # DR by hand with the library's reward model q̂ (an input of the formula, checked next).
    critic = fit_fqe(policy, batch, gamma=GAMMA, config=REGRESSION, seed=0)
    q_hat = critic.q_all(critic.features(batch.obs, batch.step)).detach().double().numpy()
    dm = np.mean((pi * q_hat).sum(1))
    dr = dm + np.mean(rho * (r - q_hat[np.arange(n), data["item_id"]]))
    snr = np.sum(rho * (r - q_hat[np.arange(n), data["item_id"]])) / np.sum(rho)
    # q̂ is float32 (~1e-9 absolute on values ~0.01): sums of 4000 terms agree to 1e-6.
    assert found["fqe"].value == pytest.approx(dm, abs=1e-6)
    assert found["dr"].value == pytest.approx(dr, abs=1e-6)
    assert found["wdr"].value == pytest.approx(dm + snr, abs=1e-6)
    # q̂ is the least-squares reward regression: its residuals are orthogonal to each item's
    # features and bias (the normal equations; any minimiser satisfies them). 1e-4 per row
    # on clicks in {0, 1} (a bootstrapped fit would be off by ≈ γ/(1 − γ)·q̂, 100× more).
    design = np.concatenate([x, np.ones((n, 1))], axis=1)
    residual = r - q_hat[np.arange(n), data["item_id"]]
    for item in range(N_ITEMS):
        rows = data["item_id"] == item
        assert np.abs(design[rows].T @ residual[rows]).max() / n < 1e-4, item
    # Every estimate sits at the click-rate scale, and its interval contains it.
    for estimate in found.values():
        assert 0.0 <= estimate.value < 0.05 and estimate.ci_low <= estimate.value, estimate
        assert estimate.value <= estimate.ci_high, estimate


def test_the_critic_still_bootstraps_truncated_multi_step_episodes() -> None:
    # The one-step rule must not switch bootstrapping off for real episodes: a two-step
    # episode cut after its second step, constant reward 1, next_obs a fresh state. With
    # γ = 0.5 and bootstrapping, Q = 1/(1 − γ) = 2 everywhere (one state); without, Q ≤ 1.5.
    obs = torch.ones(400, 1)
    step = torch.tensor([0, 1]).repeat(200)
    batch = StepBatch(
        episode_id=torch.arange(200).repeat_interleave(2), step=step, obs=obs,
        action=torch.zeros(400, dtype=torch.int64), reward=torch.ones(400), next_obs=obs.clone(),
        terminated=torch.zeros(400, dtype=torch.bool), truncated=step == 1, logged_logp=None,
        estimated_logp=None, episode_start=step == 0)
    policy = linear_policy(np.array([[20.0, -20.0]]))  # π(a = 0) = 1 − 4e-18: the logged arm
    critic = fit_fqe(policy, batch, gamma=0.5, seed=0, config=FQEConfig(
        hidden=(), iterations=30, steps_per_iteration=50, lr=0.05, batch_size=1024))
    assert critic.bootstraps_truncated
    values, _, _ = critic_values(critic, policy, batch)
    torch.testing.assert_close(values, torch.full_like(values, 2.0), atol=0.02, rtol=0.0)


# --------------------------------------------------------------------------------------------
# Training on a bandit log
# --------------------------------------------------------------------------------------------


def write_bandit(folder: Path, n: int, seed: int) -> dict[str, np.ndarray]:
    """A one-decision-per-row dataset (one-step episodes that terminate) written with the store."""
    log = contextual_bandit(n, seed)
    obs = log["obs"].astype(np.float32)
    table = steps_table(
        episode_id=np.arange(n, dtype=np.int64), step=np.zeros(n, dtype=np.int32), obs=obs,
        action=log["a"].astype(np.int64), reward=log["r"].astype(np.float32), next_obs=obs,
        terminated=np.ones(n, dtype=bool), truncated=np.zeros(n, dtype=bool),
        logged_logp=np.log(log["beta"]).astype(np.float32))
    write_dataset(folder, [table], card={"name": "bandit", "description": "contextual bandit"})
    return log


def trained_probs(folder: Path, config: TrainConfig) -> np.ndarray:
    """π_θ(a|x) of the trained policy for every context, [contexts, arms], float64."""
    result = train(folder, config, tracker=NullTracker())
    policy = policy_from_checkpoint(load_checkpoint(result.checkpoint))
    with torch.no_grad():
        return torch.softmax(policy.logits(torch.eye(N_CONTEXTS)), -1).double().numpy()


def test_training_on_a_bandit_log_improves_on_the_logging_policy(tmp_path: Path) -> None:
    # J by enumeration: J(β) = 0.414, the best arm per context J* = 0.508. A policy trained on
    # 4000 logged decisions (default per-step estimator, ρ capped at 2, value baseline) must
    # recover at least half of the gap (measured: 0.503). Without a KL penalty: the default
    # weight 2 is meant to keep π near β on long-horizon logs and holds it there (0.416).
    log = write_bandit(tmp_path / "bandit", 4000, seed=2)
    mu, p = log["mu"], log["p"]
    behavior_value = float(p @ (log["behavior_table"] * mu).sum(1))
    best = float(p @ mu.max(1))
    config = TrainConfig(steps=300, lr=0.05, hidden=(16,), val_fraction=0.0, kl_coef=0.0, seed=0)
    probs = trained_probs(tmp_path / "bandit", config)
    value = float(p @ (probs * mu).sum(1))
    assert value >= behavior_value + 0.5 * (best - behavior_value), (value, behavior_value, best)


def test_the_four_training_estimators_coincide_at_one_step(tmp_path: Path) -> None:
    # At T = 1, w_{0:T−1} = ρ_0 and G = r: trajectory, per-decision, past-weight and per-step
    # surrogates have the same gradient ρ ∇log π (r − b). Without a cap: with `clip`, past-weight
    # keeps the capped coefficient on ∇log π of rows with ρ > c while the others drop them.
    # With full batches (every row each step) and one seed, the four trainings take the same
    # steps: measured 2e-8 apart after 100 steps. Adam's
    # division by √v can amplify float32 rounding of other summation orders where a gradient
    # nearly vanishes, so 1e-5; the cap alone (clip = 2) moves past-weight by 0.45.
    log = write_bandit(tmp_path / "bandit", 500, seed=3)
    found = {}
    for name in (EstimatorName.TRAJECTORY, EstimatorName.PER_DECISION, EstimatorName.PAST_WEIGHT,
                 EstimatorName.PER_STEP):
        config = TrainConfig(estimator=name, steps=100, lr=0.05, hidden=(16,), val_fraction=0.0,
                             batch_episodes=500, batch_steps=500, kl_coef=0.0, clip=None,
                             seed=0)
        found[name] = trained_probs(tmp_path / "bandit", config)
    reference = found[EstimatorName.PER_STEP]
    assert np.abs(reference - log["behavior_table"]).max() > 0.05  # it moved away from β
    for name, probs in found.items():
        np.testing.assert_allclose(probs, reference, atol=1e-5, err_msg=str(name))
