"""scripts/exp_greedy_critic.py (the issue-15 experiment quoted in README) runs end to end on a
shipped continuous log, and each of its options reaches the policy that is evaluated."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *extra: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "exp_greedy_critic.py"), "--datasets",
         "pendulum-gauss", "--seeds", "0", "--steps", "3", "--warm", "5", "--bc-steps", "20",
         "--episodes", "1", *extra],
        capture_output=True, text=True, check=True, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    ).stdout.splitlines()
    assert out[-1].startswith("pendulum-gauss: greedy "), out
    return json.loads(out[0])


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run(tmp_path_factory.mktemp("plain"))


def test_greedy_critic_experiment_runs(plain: dict) -> None:
    assert plain["dataset"] == "pendulum-gauss" and plain["seed"] == 0
    assert all(math.isfinite(plain[k]) for k in ("greedy", "stochastic", "bc_greedy"))
    assert -3300 < plain["greedy"] <= 0  # Pendulum: 200 steps of reward in [−16.3, 0]
    # The batch statistics of the greedy critic's advantages: present, positive, finite.
    assert 0 < plain["adv_scale_first"] < math.inf and 0 < plain["q_scale_last"] < math.inf


def test_kappa_narrows_sigma_only(plain: dict, tmp_path: Path) -> None:
    # Same seed, same clone: only σ differs, so the stochastic episode (seeded noise scaled by
    # σ) must change while the clone, evaluated before κ applies, is the same.
    narrow = _run(tmp_path, "--kappa", "0.25")
    assert plain["bc_greedy"] == narrow["bc_greedy"]
    assert plain["stochastic"] != narrow["stochastic"]


# Each option changes what the 3 policy steps do (or which parameters are evaluated), so the
# same seeded greedy episode from the same clone scores differently; dropping the option's
# effect in the script makes its case fail.
@pytest.mark.parametrize("option", [
    ("--alpha", "100"),  # advantages × α / mean|Q̂|
    ("--bc-coef", "100"),  # the logged actions' likelihood term
    ("--no-pg",),  # advantages zeroed: the KL alone moves θ
    ("--gpi",),  # max(Q̂, G_t) and max(Q̂(s, μ), V̂)
    ("--pessimistic",),  # min(Q̂₁, Q̂₂) at the logged action
    ("--critic", "logger"),  # G_t − V̂(s_t), no Q̂
    ("--ema", "0.5"),  # the average of θ is evaluated
    ("--decay",),  # cosine learning rate: steps 2 and 3 are smaller
], ids=lambda option: option[0].lstrip("-"))
def test_option_reaches_the_policy(plain: dict, tmp_path: Path, option: tuple[str, ...]) -> None:
    row = _run(tmp_path, *option)
    assert row["bc_greedy"] == plain["bc_greedy"]
    assert row["greedy"] != plain["greedy"]
    if option == ("--critic", "logger"):
        assert "adv_scale_first" not in row  # no Q̂ advantages were computed


def test_anchor_coef_weights_the_closed_form_kl(tmp_path: Path) -> None:
    # Both runs drop the sampled KL; they differ only in the closed-form KL's weight, which is 0
    # at the clone and pulls θ back from step 2 on.
    weak, strong = _run(tmp_path, "--anchor-coef", "1"), _run(tmp_path, "--anchor-coef", "1e4")
    assert weak["bc_greedy"] == strong["bc_greedy"]
    assert weak["greedy"] != strong["greedy"]



def test_logger_critic_refuses_the_options_of_q() -> None:
    # --critic logger fits no Q̂, so an option that only acts on Q̂ would be silently ignored.
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "exp_greedy_critic.py"), "--critic", "logger",
         "--gpi", "--no-pg"], capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "--no-pg, --gpi act on the greedy critic's Q̂" in done.stderr
