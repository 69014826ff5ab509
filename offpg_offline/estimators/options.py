"""`SurrogateOptions`: the statistical options every surrogate receives as one frozen object.

Kept apart from `registry` so that `surrogates` can import it without a cycle; the public name
is `offpg_offline.estimators.registry.SurrogateOptions` (re-exported by the package).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

ClipModeName = Literal["step", "cumulative"]


@dataclass(frozen=True, slots=True)
class SurrogateOptions:
    """Variance and bias controls of a surrogate, validated once when built.

    Attributes:
        clip: weight cap c > 0 applied in log space (min(log ρ_t, log c) or min(log w, log c)),
            or None for no clipping.
        clip_mode: "step" caps each ratio ρ_t, "cumulative" caps the product w_{1:t}.
        self_normalize: divide the weights by their batch mean (weighted importance sampling).
        psis: Pareto-smooth the weights (Vehtari et al. 2024), values only.
        ppo_epsilon: PPO's clip range ε in (0, 1) on the per-step ratio, or None.
        standardize_returns: standardise the advantages G − b over the batch.
    """

    clip: float | None = None
    clip_mode: ClipModeName = "step"
    self_normalize: bool = False
    psis: bool = False
    ppo_epsilon: float | None = None
    standardize_returns: bool = False

    def __post_init__(self) -> None:
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"option clip must be positive, got {self.clip}")
        if self.clip_mode not in ("step", "cumulative"):
            raise ValueError(f"option clip_mode must be 'step' or 'cumulative', "
                             f"got {self.clip_mode!r}")
        if self.ppo_epsilon is not None and not 0.0 < self.ppo_epsilon < 1.0:
            raise ValueError(f"option ppo_epsilon must lie in (0, 1), got {self.ppo_epsilon}")
        for name in ("self_normalize", "psis", "standardize_returns"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"option {name} must be true or false, "
                                 f"got {getattr(self, name)!r}")

    def changed(self) -> dict[str, Any]:
        """The options whose value differs from the default, name → value (field order)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}


DEFAULT_OPTIONS = SurrogateOptions()
"""All options off: the plain, unbiased estimator."""

OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SurrogateOptions))


def refuse_unsupported(estimator: str, options: SurrogateOptions,
                       supports: frozenset[str]) -> None:
    """Raise ValueError naming the first option set away from its default that `estimator`
    does not honour (an option that would be silently ignored is refused instead)."""
    for name, value in options.changed().items():
        if name not in supports:
            honoured = ", ".join(n for n in OPTION_NAMES if n in supports) or "none"
            raise ValueError(
                f"option {name}={value!r} is not supported by the {estimator} estimator "
                f"(it honours: {honoured})")
