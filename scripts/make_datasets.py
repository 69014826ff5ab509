"""Write the shipped logs into datasets/<name>/ and datasets/README.md (deterministic by seed).

    .venv/bin/python scripts/make_datasets.py [--out datasets] [NAME ...]

The classic logs are defined in `offpg_offline.data.synthetic.SYNTHETIC`, the harder ones
(LunarLander, MountainCarContinuous) in `HARDER` below (behavior policy, env, size, seed);
rerunning gives byte-identical Parquet files and cards. The LunarLander logs need the `envs`
extra (box2d, pygame). The README table is built from
the cards, so it always quotes the measured returns.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pyarrow as pa

from offpg_offline.data.schema import SCHEMA_VERSION
from offpg_offline.data.spaces import space_to_json
from offpg_offline.data.store import card_path, is_dataset, read_card, write_dataset
from offpg_offline.data.synthetic import (
    F64,
    SYNTHETIC,
    Log,
    _env_spec_json,
    _normal_cdf,
    greedy_returns,
    make_synthetic,
    rollout,
)

ROOT = Path(__file__).resolve().parents[1]


# --- harder logs (issue 15): LunarLander (Box2D) and MountainCarContinuous ----------------
#
# Scripted controllers plus seeded noise, with exact propensities. The LunarLander logs need
# the `envs` extra (box2d, pygame); MountainCarContinuous is classic control. The controllers
# are small documented functions so a reader can recompute every logged propensity
# (tests/data/test_shipped.py does, from gymnasium's own `lunar_lander.heuristic`).

LANDER_ENVS_HINT = "install the envs extra: pip install -c constraints.txt -e '.[envs]'"


def lander_todo(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hover_todo, angle_todo) of gymnasium's `lunar_lander.heuristic`, vectorised, float64.

        angle_targ = clip(0.5·x + ẋ, −0.4, 0.4),     hover_targ = 0.55·|x|
        angle_todo = (angle_targ − θ)/2 − θ̇,         hover_todo = (hover_targ − y)/2 − ẏ/2
        with a leg on the ground: angle_todo = 0,     hover_todo = −ẏ/2
    """
    s = np.asarray(obs, dtype=F64)
    angle_targ = np.clip(s[:, 0] * 0.5 + s[:, 2], -0.4, 0.4)
    angle = (angle_targ - s[:, 4]) * 0.5 - s[:, 5]
    hover = (0.55 * np.abs(s[:, 0]) - s[:, 1]) * 0.5 - s[:, 3] * 0.5
    contact = (s[:, 6] != 0) | (s[:, 7] != 0)
    return np.where(contact, -s[:, 3] * 0.5, hover), np.where(contact, 0.0, angle)


@dataclass(frozen=True, slots=True)
class ClippedGaussianLander:
    """LunarLanderContinuous heuristic plus Gaussian noise, clipped by the env (RLlib/SB3 way).

        μ(s) = clip((20·hover_todo − 1, −20·angle_todo), −1, 1)    (gymnasium's heuristic)
        a ~ N(μ(s), σ²·I₂),   log π_β(a|s) = Σ_i log N(a_i; μ_i, σ²)

    The log stores the raw sample a (often outside [−1, 1]) and its Gaussian log-density; the
    env receives a and clips it to [−1, 1] on entry (LunarLander.step: np.clip(action, −1, 1)),
    i.e. it executes clip(a).
    """

    sigma: float

    def mean(self, obs: np.ndarray) -> np.ndarray:
        """μ(s) in float64, [N, 2]."""
        hover, angle = lander_todo(obs)
        return np.clip(np.stack([hover * 20 - 1, -angle * 20], axis=1), -1.0, 1.0)

    def log_prob(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        """Σ_i log N(a_i; μ_i(s), σ²) in float64, [N]; a is the raw (unclipped) sample."""
        z = (np.asarray(action, dtype=F64) - self.mean(obs)) / self.sigma
        return (-0.5 * z**2 - math.log(self.sigma) - 0.5 * math.log(2 * math.pi)).sum(axis=1)

    def sample(self, obs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Raw a ~ N(μ, σ²I) as float32 [N, 2], with its log-density [N]."""
        mu = self.mean(obs)
        action = (mu + self.sigma * rng.standard_normal(mu.shape)).astype(np.float32)
        return action, self.log_prob(obs, action)

    def greedy(self, obs: np.ndarray) -> np.ndarray:
        """μ(s) as float32 [N, 2]."""
        return self.mean(obs).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """Card entry."""
        return {
            "kind": "clipped-Gaussian LunarLander heuristic",
            "mean": "mu(s) = clip((20*hover_todo - 1, -20*angle_todo), -1, 1): gymnasium's "
            "gymnasium.envs.box2d.lunar_lander.heuristic (continuous)",
            "density": "sum_i log N(a_i; mu_i(s), sigma^2) of the raw sample a",
            "bounds": "the raw sample a is logged (actions: unclipped); the env executes "
            "clip(a, -1, 1) (LunarLander clips on entry; offpg rollouts clip to "
            "env_action_space)",
            "sigma": self.sigma,
        }


@dataclass(frozen=True, slots=True)
class EpsilonLander:
    """LunarLander (discrete) heuristic mixed with uniform actions over the 4 actions.

        h(s) = 2 if hover_todo > |angle_todo| and hover_todo > 0.05, else 3 if angle_todo <
        −0.05, else 1 if angle_todo > 0.05, else 0          (gymnasium's heuristic)
        π_β(a|s) = (1 − ε)·1[a = h(s)] + ε/4
    """

    epsilon: float

    def greedy(self, obs: np.ndarray) -> np.ndarray:
        """h(s), int64 [N]."""
        hover, angle = lander_todo(obs)
        side = np.where(angle < -0.05, 3, np.where(angle > 0.05, 1, 0))
        return np.where((hover > np.abs(angle)) & (hover > 0.05), 2, side).astype(np.int64)

    def log_prob(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        """log π_β(a|s) in float64, [N]."""
        chosen = np.asarray(action, dtype=np.int64) == self.greedy(obs)
        return np.log(np.where(chosen, 1.0 - self.epsilon + self.epsilon / 4, self.epsilon / 4))

    def sample(self, obs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """a ~ π_β(·|s), int64 [N], with log π_β(a|s) [N]."""
        explore = rng.random(len(obs)) < self.epsilon
        uniform = rng.integers(0, 4, size=len(obs))
        action = np.where(explore, uniform, self.greedy(obs)).astype(np.int64)
        return action, self.log_prob(obs, action)

    def describe(self) -> dict[str, Any]:
        """Card entry."""
        return {
            "kind": "epsilon-uniform LunarLander heuristic",
            "formula": "pi(a|s) = (1 - eps) * 1[a = h(s)] + eps / 4, h = gymnasium's "
            "gymnasium.envs.box2d.lunar_lander.heuristic (discrete)",
            "epsilon": self.epsilon,
            "p_controller_action": 1.0 - 3 * self.epsilon / 4,
        }


@dataclass(frozen=True, slots=True)
class TruncatedGaussianCar:
    """MountainCarContinuous velocity-pumping controller, too weak to climb alone, plus noise.

        μ(s) = clip(k·v / 0.07, −1, 1)        (v the car's velocity, 0.07 its maximum)
        π_β(a|s) = N(a; μ, σ²) / (Φ((1 − μ)/σ) − Φ((−1 − μ)/σ)) on [−1, 1]

    Actions are drawn from the Gaussian truncated to [−1, 1] (rejection sampling), never
    clipped, so the density is that of the logged action.
    """

    gain: float
    sigma: float

    def mean(self, obs: np.ndarray) -> np.ndarray:
        """μ(s) in float64, [N]."""
        return np.clip(self.gain * np.asarray(obs, dtype=F64)[:, 1] / 0.07, -1.0, 1.0)

    def log_prob(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        """log π_β(a|s) in float64, [N]; −inf outside [−1, 1]."""
        a = np.asarray(action, dtype=F64).reshape(len(obs))
        mu, sigma = self.mean(obs), self.sigma
        mass = _normal_cdf((1.0 - mu) / sigma) - _normal_cdf((-1.0 - mu) / sigma)
        z = (a - mu) / sigma
        logp = -0.5 * z**2 - math.log(sigma) - 0.5 * math.log(2 * math.pi) - np.log(mass)
        return np.where(np.abs(a) <= 1.0, logp, -np.inf)

    def sample(self, obs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """a from the truncated Gaussian, float32 [N, 1], with log π_β(a|s) [N]."""
        mu = self.mean(obs)
        action = np.empty(len(mu), dtype=np.float32)
        pending = np.arange(len(mu))
        while len(pending):
            draw = (mu[pending] + self.sigma * rng.standard_normal(len(pending))).astype(np.float32)
            ok = np.abs(draw) <= 1.0
            action[pending[ok]] = draw[ok]
            pending = pending[~ok]
        return action[:, None], self.log_prob(obs, action)

    def greedy(self, obs: np.ndarray) -> np.ndarray:
        """μ(s) as float32 [N, 1]."""
        return self.mean(obs).astype(np.float32)[:, None]

    def describe(self) -> dict[str, Any]:
        """Card entry."""
        return {
            "kind": "truncated-Gaussian MountainCar pumping controller",
            "mean": "mu(s) = clip(gain * velocity / 0.07, -1, 1)",
            "density": "N(a; mu, sigma^2) / (Phi((1 - mu)/sigma) - Phi((-1 - mu)/sigma)) on "
            "[-1, 1], 0 outside",
            "bounds": "sampled from the Gaussian truncated to [-1, 1] (rejection sampling); "
            "never clipped",
            "gain": self.gain,
            "sigma": self.sigma,
        }


@dataclass(frozen=True, slots=True)
class HarderSpec:
    """One harder shipped log. `unclipped`: written as an RLlib-style raw log and ingested
    with `ingest_parquet(..., actions="unclipped")`, the path `offpg ingest parquet
    --actions unclipped` takes."""

    env_id: str
    policy: Any
    episodes: int
    seed: int
    description: str
    unclipped: bool = False
    greedy_episodes: int = 100


HARDER: dict[str, HarderSpec] = {
    "lander-clipped": HarderSpec(
        env_id="LunarLanderContinuous-v3", policy=ClippedGaussianLander(sigma=0.8),
        episodes=100, seed=3, unclipped=True,
        description="LunarLanderContinuous-v3 log of gymnasium's heuristic lander with Gaussian "
        "noise sigma = 0.8 on both engines, logged the RLlib/SB3 way: the env executes clip(a, "
        "-1, 1), the log stores the raw sample a and its Gaussian log-density (ingested with "
        "--actions unclipped)."),
    "lander-eps": HarderSpec(
        env_id="LunarLander-v3", policy=EpsilonLander(epsilon=0.5), episodes=200, seed=4,
        description="LunarLander-v3 (4 actions) log of gymnasium's heuristic lander mixed with "
        "uniform random actions (eps = 0.5, so the heuristic's action has probability 0.625); "
        "exact behavior log-probabilities."),
    "mountaincar-gauss": HarderSpec(
        env_id="MountainCarContinuous-v0", policy=TruncatedGaussianCar(gain=0.3, sigma=0.6),
        episodes=100, seed=6,
        description="MountainCarContinuous-v0 log of a velocity-pumping controller too weak to "
        "reach the flag alone (gain 0.3), with Gaussian noise sigma = 0.6 truncated to [-1, 1]: "
        "the noise makes some episodes succeed; exact behavior log-densities."),
}

RAW_COLUMNS = {"episode_id": "eps_id", "step": "t", "obs": "obs", "action": "actions",
               "reward": "rewards", "next_obs": "new_obs", "terminated": "terminateds",
               "truncated": "truncateds"}


def _raw_log(log: Log, path: Path) -> None:
    """Write `log` as an RLlib-style step table (its column names, `action_logp`)."""
    import pyarrow.parquet as pq

    def vectors(x: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])

    table = pa.table({
        "eps_id": log.episode_id, "t": log.step, "obs": vectors(log.obs),
        "actions": vectors(log.action), "rewards": log.reward, "new_obs": vectors(log.next_obs),
        "terminateds": log.terminated, "truncateds": log.truncated,
        "action_logp": log.logp.astype(np.float32)})
    pq.write_table(table, path)


def make_harder(name: str, out: Path) -> tuple[Path, str]:
    """Roll out the harder log `name` and write it to `out`; returns (path, summary line)."""
    spec = HARDER[name]
    try:
        env = gym.make(spec.env_id)
    except gym.error.DependencyNotInstalled as err:
        raise SystemExit(f"{name} needs {spec.env_id}, which cannot be built here "
                         f"({str(err).splitlines()[0]}); {LANDER_ENVS_HINT}.") from None
    observation_space, action_space = env.observation_space, env.action_space
    env.close()
    log = rollout(spec.env_id, spec.policy, episodes=spec.episodes, seed=spec.seed)
    greedy_seed = spec.seed + 10_000
    greedy = greedy_returns(spec.env_id, spec.policy, episodes=spec.greedy_episodes,
                            seed=greedy_seed)
    returns = log.returns()
    behavior = {
        **spec.policy.describe(),
        "mean_return": float(returns.mean()), "std_return": float(returns.std()),
        "greedy_mean_return": float(greedy.mean()), "greedy_std_return": float(greedy.std()),
        "greedy_episodes": spec.greedy_episodes, "greedy_seed": greedy_seed,
    }
    description = (f"{spec.description} Behavior return {returns.mean():.1f} ± "
                   f"{returns.std():.1f} (the {spec.episodes} logged episodes); the noise-free "
                   f"controller's (greedy) return {greedy.mean():.1f} ± {greedy.std():.1f} "
                   f"({spec.greedy_episodes} fresh episodes).")
    source = {"generator": "scripts/make_datasets.py (make_harder)", "name": name,
              "seed": spec.seed, "episodes": spec.episodes, "gymnasium_version": gym.__version__}
    if spec.unclipped:
        # rows with a raw component outside the env's bounds [-1, 1]: there clip(a) != a
        outside = float((np.abs(log.action) > 1.0).any(axis=1).mean())
        behavior["raw_outside_bounds_fraction"] = outside
        path = _ingest_unclipped(name, spec, log, out, description, behavior, source)
        extra = f", {outside:.1%} of raw actions outside [-1, 1]"
    else:
        card = {
            "name": name, "description": description,
            "observation_space": space_to_json(observation_space),
            "action_space": space_to_json(action_space),
            "env_spec": _env_spec_json(spec.env_id), "source": source, "behavior": behavior,
            "propensity": {"logged_logp": {"source": f"exact log pi_beta(a|s) of the behavior "
                                           f"policy (scripts/make_datasets.py, {name})"},
                           "estimated_logp": None},
        }
        path = write_dataset(out, log.tables(), card=card, overwrite=True)
        extra = ""
    return path, (f"{name}: {log.n_episodes} episodes, {log.n_steps} steps, mean return "
                  f"{returns.mean():.1f} (greedy {greedy.mean():.1f}){extra}")


def _ingest_unclipped(name: str, spec: HarderSpec, log: Log, out: Path, description: str,
                      behavior: dict[str, Any], source: dict[str, Any]) -> Path:
    """Write the raw log, ingest it as `offpg ingest parquet --actions unclipped --env ID`
    does, then complete the card with the behavior block (an ingest knows no behavior) and a
    machine-independent name for the raw input (ingest records its absolute path)."""
    import json
    import tempfile

    from offpg_offline.data.parquet import ColumnMapping, ingest_parquet

    raw_name = "raw-rllib-style.parquet"
    with tempfile.TemporaryDirectory() as tmp:
        _raw_log(log, Path(tmp) / raw_name)
        mapping = ColumnMapping(columns=RAW_COLUMNS, propensity_col="action_logp",
                                propensity_kind="logp")
        result = ingest_parquet([Path(tmp) / raw_name], out, mapping=mapping,
                                env_id=spec.env_id, name=name, description=description,
                                overwrite=True, actions="unclipped")
    card = json.loads(card_path(out).read_text())
    for entry in card["source"]["files"]:
        entry["path"] = f"{raw_name} (written by scripts/make_datasets.py, not shipped)"
    card["source"] = {**source, **card["source"]}
    card["behavior"] = behavior
    card_path(out).write_text(json.dumps(card, indent=2, allow_nan=False) + "\n")
    read_card(out)  # still a valid card
    if result.warnings:
        print("\n".join(f"  warning: {w}" for w in result.warnings))
    return result.path


def readme(out: Path) -> str:
    """datasets/README.md: one row per shipped log, from its card."""
    lines = [
        "# Shipped datasets",
        "",
        f"Canonical format, schema version {SCHEMA_VERSION} (docs/design.md §2): each folder holds "
        "`part-*.parquet` and its `_dataset.json` card (the leading `_` hides it from Parquet "
        "engines, so each folder also opens as a plain Parquet dataset: "
        "`pyarrow.dataset.dataset(\"datasets/cartpole-eps\", format=\"parquet\")`, "
        "`polars.scan_parquet(\"datasets/cartpole-eps/*.parquet\")`).",
        "Made by `scripts/make_datasets.py` from `offpg_offline/data/synthetic.py` (the "
        "LunarLander and MountainCar logs: from the controllers in the script itself; fixed seeds; "
        "rerunning reproduces the files byte for byte). Returns are undiscounted; *behavior* is "
        "the mean over the logged episodes, *greedy* the mean over 100 fresh episodes of the "
        "behavior's most likely (discrete) or mean (continuous) action (the noise-free "
        "controller). The LunarLander logs need the `envs` extra "
        "(`pip install -c constraints.txt -e '.[envs]'`: box2d, pygame).",
        "",
        "| name | env | episodes | steps | behavior return | greedy return | logged_logp | size |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for name in [*SYNTHETIC, *HARDER]:
        card = read_card(out / name)
        behavior = card["behavior"]
        size = sum(f["bytes"] for f in card["files"]) + card_path(out / name).stat().st_size
        logged = "exact" if card["propensity"]["logged_logp"] else "null"
        lines.append(
            f"| `{name}` | {card['env_spec']['id']} | {card['counts']['episodes']} | "
            f"{card['counts']['steps']} | {behavior['mean_return']:.1f} ± "
            f"{behavior['std_return']:.1f} | {behavior['greedy_mean_return']:.1f} | {logged} | "
            f"{size / 1e6:.2f} MB |")
    lines += ["", "Behavior policies (details and parameters in each card's `behavior`):", ""]
    for name, spec in SYNTHETIC.items():
        lines.append(f"- `{name}`: {spec.description}")
    for name, harder in HARDER.items():
        lines.append(f"- `{name}`: {harder.description}")
    lines += [
        "",
        "`pendulum-gauss`: actions are drawn from a Gaussian truncated to the action bounds "
        "[-2, 2] (rejection sampling), never clipped after sampling, so `logged_logp` is the "
        "exact density N(a; μ, σ²) / (Φ((2 − μ)/σ) − Φ((−2 − μ)/σ)).",
        "",
        "`cartpole-eps-noprop` is the `cartpole-eps` log with `logged_logp` null; its true "
        "log-probabilities are in `cartpole-eps`.",
        "",
        "`lander-clipped` is logged the way RLlib and SB3 rollouts log a Gaussian policy: the "
        "raw sample a ~ N(μ(s), 0.8²·I) is stored with its Gaussian log-density, and the env "
        "executes clip(a, −1, 1). It was written as an RLlib-style Parquet log and ingested "
        "exactly as `offpg ingest parquet raw.parquet --env LunarLanderContinuous-v3 "
        "--actions unclipped --propensity-col action_logp ...` does: its card has "
        "`actions.semantics: \"unclipped\"`, an unbounded `action_space` (the target "
        "policy's density is evaluated on the raw action) and `env_action_space` [−1, 1] "
        "(rollouts clip to it). The fraction of raw actions outside [−1, 1] is in its card "
        "(`behavior.raw_outside_bounds_fraction`). μ(s) is gymnasium's "
        "`lunar_lander.heuristic`; `lander-eps` mixes the discrete heuristic with uniform "
        "actions, π_β(a|s) = (1 − ε)·1[a = h(s)] + ε/4.",
        "",
        "`mountaincar-gauss`: μ(s) = clip(0.3·v/0.07, −1, 1) never reaches the flag alone "
        "(greedy ≈ −1), while the truncated Gaussian noise (σ = 0.6) makes some logged episodes "
        "succeed (+100): imitation fails there, importance weighting has successes to find. "
        "`logged_logp` is N(a; μ, σ²) / (Φ((1 − μ)/σ) − Φ((−1 − μ)/σ)).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "datasets")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"logs to write (default: all of {', '.join([*SYNTHETIC, *HARDER])})")
    args = parser.parse_args()
    if unknown := sorted(set(args.names) - set(SYNTHETIC) - set(HARDER)):
        parser.error(f"unknown log(s): {', '.join(unknown)}")
    for name in args.names or [*SYNTHETIC, *HARDER]:
        start = time.perf_counter()
        if name in HARDER:
            path, summary = make_harder(name, args.out / name)
            print(summary)
        else:
            path = make_synthetic(name, args.out / name, overwrite=True, progress=print)
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"  -> {path} ({size / 1e6:.2f} MB, {time.perf_counter() - start:.1f} s)")
    if all(is_dataset(args.out / name) for name in [*SYNTHETIC, *HARDER]):
        (args.out / "README.md").write_text(readme(args.out))
        print(f"  -> {args.out / 'README.md'}")


if __name__ == "__main__":
    main()
