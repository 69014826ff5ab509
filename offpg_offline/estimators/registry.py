"""The estimator registry: name → `EstimatorSpec` (function, sampling unit, options honoured).

Adding an estimator: write its surrogate (the `Surrogate` signature, refusing the options it
does not honour with `refuse_unsupported`), add one entry to `ESTIMATORS` below and one member
to `config.EstimatorName`. The trainer reads `unit` and `supports` from the spec; nothing else
special-cases a name (see /work/notes/design-est.md, "how to add an estimator").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from offpg_offline.estimators.critic import (
    CRITIC_OPTIONS,
    critic_surrogate,
    greedy_critic_surrogate,
)
from offpg_offline.estimators.options import (
    DEFAULT_OPTIONS,
    OPTION_NAMES,
    SurrogateOptions,
    refuse_unsupported,
)
from offpg_offline.estimators.surrogates import (
    PAST_WEIGHT_OPTIONS,
    PER_DECISION_OPTIONS,
    PER_STEP_OPTIONS,
    TRAJECTORY_OPTIONS,
    Surrogate,
    past_weight_surrogate,
    per_decision_surrogate,
    per_step_surrogate,
    trajectory_surrogate,
)

Unit = Literal["episode", "step"]


@dataclass(frozen=True, slots=True)
class EstimatorSpec:
    """One estimator as the trainer sees it.

    Attributes:
        fn: the surrogate loss, `fn(target_logp, behavior_logp, reward, step, episode_start, *,
            gamma, options, baseline=None, returns=None, reduction="mean") -> Tensor`.
        unit: "episode": batches are whole episodes and `reward` is r_t; "step": rows are
            independent, so the trainer precomputes G_t (the reward column holds it) and
            samples single steps.
        supports: names of the `SurrogateOptions` fields the function honours; any other
            option set away from its default is refused up front, by name.
        critic: for a "step" estimator, the reward column holds a fitted critic's one-step
            action value Q̂_t = r_t + γ V̂(s_{t+1}) instead of G_t (training/critic.py).
        greedy: for a "step" estimator, the trainer fits a critic Q̂ ≈ Q^{μ_θ} of the greedy
            policy during training and puts its GPI action value and baseline into each
            batch's columns (training/greedy.py); its KL penalty is the closed-form one to the
            behavior-cloned start. Continuous actions only.
    """

    fn: Surrogate
    unit: Unit
    supports: frozenset[str]
    critic: bool = False
    greedy: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(self.supports - set(OPTION_NAMES))
        if unknown:
            raise ValueError(f"supports names unknown option(s) {', '.join(unknown)}")
        if self.unit not in ("episode", "step"):
            raise ValueError(f"unit must be 'episode' or 'step', got {self.unit!r}")
        if (self.critic or self.greedy) and self.unit != "step":
            raise ValueError("a critic estimator's unit must be 'step'")

    def check(self, name: str, options: SurrogateOptions) -> None:
        """Raise ValueError naming the first option in `options` that `name` does not honour."""
        refuse_unsupported(name, options, self.supports)


ESTIMATORS: Mapping[str, EstimatorSpec] = MappingProxyType({
    "trajectory": EstimatorSpec(trajectory_surrogate, "episode", TRAJECTORY_OPTIONS),
    "per-decision": EstimatorSpec(per_decision_surrogate, "episode", PER_DECISION_OPTIONS),
    "past-weight": EstimatorSpec(past_weight_surrogate, "episode", PAST_WEIGHT_OPTIONS),
    "per-step": EstimatorSpec(per_step_surrogate, "step", PER_STEP_OPTIONS),
    "critic": EstimatorSpec(critic_surrogate, "step", CRITIC_OPTIONS, critic=True),
    "greedy-critic": EstimatorSpec(greedy_critic_surrogate, "step", CRITIC_OPTIONS, greedy=True),
})
"""Spec per estimator name; the keys equal `config.EstimatorName` values (tested)."""

__all__ = ["DEFAULT_OPTIONS", "ESTIMATORS", "EstimatorSpec", "SurrogateOptions", "Unit"]
