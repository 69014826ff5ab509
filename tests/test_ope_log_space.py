"""OPE numerics at extreme log-weights (issue 12.5): known answers, no overflow, no silent 0.

Every episode here has its log-weight set exactly (target_logp = behavior_logp + L), so the
answers follow by hand. The IS family on the old linear-space code raised OverflowError (ESS),
returned 0.0 from 0/0 (WIS, WPDIS, WDR with every weight underflowing) or 0.5 where the answer
is ≈ 1 (the 700 cap made log-weights 710 and 720 equal).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from offpg_offline.estimators import MAX_LOG_WEIGHT
from offpg_offline.ope import (
    doubly_robust,
    effective_sample_size,
    episode_mean,
    importance_sampling,
    per_decision_ess,
    per_decision_importance_sampling,
    trajectory_weights,
    weighted_doubly_robust,
    weighted_importance_sampling,
    weighted_per_decision_importance_sampling,
)

F64 = torch.float64


def _log(log_ratios: list[list[float]], rewards: list[list[float]]) -> dict[str, Tensor]:
    """Episodes with the given per-step log-ratios and rewards (behavior log-prob −1)."""
    flat = [x for episode in log_ratios for x in episode]
    behavior = torch.full((len(flat),), -1.0, dtype=F64)
    return {
        "target_logp": behavior + torch.tensor(flat, dtype=F64),
        "behavior_logp": behavior,
        "reward": torch.tensor([r for episode in rewards for r in episode], dtype=F64),
        "step": torch.cat([torch.arange(len(e)) for e in log_ratios]),
        "episode_start": torch.cat([torch.arange(len(e)) == 0 for e in log_ratios]),
    }


def _all(log: dict[str, Tensor], gamma: float, critic: float = 0.0) -> dict[str, float]:
    """Every IS/DR estimate on `log`; the critic is the constant Q̂ = V̂ = `critic`."""
    q = torch.full_like(log["reward"], critic)
    return {
        "is": float(episode_mean(importance_sampling(**log, gamma=gamma))),
        "wis": float(weighted_importance_sampling(**log, gamma=gamma)),
        "pdis": float(episode_mean(per_decision_importance_sampling(**log, gamma=gamma))),
        "wpdis": float(weighted_per_decision_importance_sampling(**log, gamma=gamma)),
        "dr": float(episode_mean(doubly_robust(**log, q_value=q, state_value=q, gamma=gamma))),
        "wdr": float(weighted_doubly_robust(**log, q_value=q, state_value=q, gamma=gamma)),
    }


def test_log_weights_710_and_720_give_the_second_return() -> None:
    # Two one-step episodes, log W = 710 and 720, returns 0 and 1:
    # WIS = e^720 / (e^710 + e^720) = 1 / (1 + e^−10) (the old cap 700 gave 0.5).
    # IS/PDIS/DR: each weight is capped at e^MAX_LOG_WEIGHT = e^80 (the one cap), so the
    # estimate is (e^80·0 + e^80·1)/2, finite — e^720/2 itself overflows float64.
    log = _log([[710.0], [720.0]], [[0.0], [1.0]])
    got = _all(log, gamma=0.9)
    expected = 1.0 / (1.0 + math.exp(-10.0))
    for name in ("wis", "wpdis", "wdr"):
        assert got[name] == pytest.approx(expected, rel=1e-12), name
    for name in ("is", "pdis", "dr"):
        assert got[name] == pytest.approx(math.exp(MAX_LOG_WEIGHT) / 2, rel=1e-12), name
    # Kish ESS = (e^710 + e^720)² / (e^1420 + e^1440) = (1 + e^−10)² / (1 + e^−20): the old
    # code raised OverflowError on float(Σw)², or returned nan from inf/inf.
    ess = (1 + math.exp(-10.0)) ** 2 / (1 + math.exp(-20.0))
    assert per_decision_ess(log["target_logp"], log["behavior_logp"], log["step"],
                            log["episode_start"]) == pytest.approx(ess, rel=1e-12)
    weights = trajectory_weights(log["target_logp"], log["behavior_logp"], log["episode_start"])
    assert torch.equal(weights, torch.full((2,), math.exp(MAX_LOG_WEIGHT), dtype=F64))


def test_all_weights_underflowing_give_the_self_normalised_value_not_zero() -> None:
    # log W = −800 and −801 (e^−800 underflows float64 to 0), returns 1 and 3:
    # WIS = (1·e^−800 + 3·e^−801) / (e^−800 + e^−801) = (1 + 3/e) / (1 + 1/e) ≈ 1.538.
    # With the constant critic c = 0.25: WDR = WIS − c + c = WIS; DR = c + w·(r − c) = c, and
    # IS = PDIS = e^−800·… = 0 exactly in float64 (the true value, 1e−348, is below the
    # smallest subnormal). The old code returned 0.0 for WIS/WPDIS and c for WDR.
    log = _log([[-800.0], [-801.0]], [[1.0], [3.0]])
    got = _all(log, gamma=1.0, critic=0.25)
    expected = (1 + 3 / math.e) / (1 + 1 / math.e)
    for name in ("wis", "wpdis", "wdr"):
        assert got[name] == pytest.approx(expected, rel=1e-12), name
    assert got["is"] == 0.0 and got["pdis"] == 0.0
    assert got["dr"] == pytest.approx(0.25, rel=1e-15)
    # Two equal-ish weights: ESS = (1 + 1/e)² / (1 + 1/e²), not 0/0.
    ess = (1 + 1 / math.e) ** 2 / (1 + math.exp(-2.0))
    assert per_decision_ess(log["target_logp"], log["behavior_logp"], log["step"],
                            log["episode_start"]) == pytest.approx(ess, rel=1e-12)
    assert effective_sample_size(torch.tensor([0.0, 0.0], dtype=F64)) == 0.0


def test_mixed_extreme_log_weights_over_several_steps() -> None:
    # A: 2 steps, log ρ = (400, 400), rewards (1, 2); B: 2 steps, log ρ = (−800, −800), rewards
    # (5, 7); C: 1 step, log ρ = 0, reward 11; γ = 0.5. A's weight dominates at every step
    # (e^400 vs 1 vs e^−800 at t = 0; e^800 vs C's carried 1 vs e^−1600 at t = 1), so to
    # float64 precision WIS = G_A = 1 + 0.5·2 = 2, WPDIS = 1 + 0.5·2 = 2, WDR (c = 0) = 2,
    # and both ESS are 1 (the old code: inf/inf = nan for the per-decision ESS, and
    # OverflowError for Kish's ESS of e^700-capped weights).
    log = _log([[400.0, 400.0], [-800.0, -800.0], [0.0]], [[1.0, 2.0], [5.0, 7.0], [11.0]])
    got = _all(log, gamma=0.5)
    for name in ("wis", "wpdis", "wdr"):
        assert got[name] == pytest.approx(2.0, rel=1e-12), name
    # IS: W_A capped at e^80, W_B = 0, W_C = 1: (e^80·2 + 11)/3; PDIS: A's two steps are both
    # capped: (e^80·1 + 0.5·e^80·2 + 11)/3.
    cap = math.exp(MAX_LOG_WEIGHT)
    assert got["is"] == pytest.approx((cap * 2 + 11) / 3, rel=1e-12)
    assert got["pdis"] == pytest.approx((cap * 1 + 0.5 * cap * 2 + 11) / 3, rel=1e-12)
    assert got["dr"] == pytest.approx(got["pdis"], rel=1e-12)
    assert per_decision_ess(log["target_logp"], log["behavior_logp"], log["step"],
                            log["episode_start"]) == pytest.approx(1.0, rel=1e-12)
    # Log-weights 720, 710, −800 with returns 1, 0, 5: WIS = 1/(1 + e^−10) (old: 0.5).
    mixed = _log([[720.0], [710.0], [-800.0]], [[1.0], [0.0], [5.0]])
    assert _all(mixed, gamma=1.0)["wis"] == pytest.approx(1 / (1 + math.exp(-10.0)), rel=1e-12)


def test_bootstrap_counts_use_each_resample_s_own_largest_weight() -> None:
    # Resample 0 draws both episodes (log W = 720, 710; returns 1, 0): 1/(1 + e^−10).
    # Resample 1 draws only the second twice: WIS = its return 0; resample 2 only the first: 1.
    # Resample 3 draws only B of the underflowing pair (−800, −801; returns 1, 3): 3, not 0/0.
    log = _log([[720.0], [710.0]], [[1.0], [0.0]])
    counts = torch.tensor([[1.0, 1.0], [0.0, 2.0], [2.0, 0.0]], dtype=F64)
    got = weighted_importance_sampling(**log, gamma=1.0, counts=counts)
    torch.testing.assert_close(got, torch.tensor([1 / (1 + math.exp(-10.0)), 0.0, 1.0],
                                                 dtype=F64), rtol=1e-12, atol=0.0)
    low = _log([[-800.0], [-801.0]], [[1.0], [3.0]])
    only_b = torch.tensor([[0.0, 1.0]], dtype=F64)
    for fn in (weighted_importance_sampling, weighted_per_decision_importance_sampling):
        assert float(fn(**low, gamma=1.0, counts=only_b)[0]) == pytest.approx(3.0, rel=1e-12)
