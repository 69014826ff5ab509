"""Checkpoint selection (`select_by`): score each saved checkpoint by an OPE estimate on the
run's validation episodes, and ship the best one as `selected.pt`.

Critic-based estimators (dr, wdr, fqe) fit their critic on the training episodes
(`critic_batch`), never on the validation episodes they score.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from offpg_offline.config import TrainConfig
from offpg_offline.data.batch import StepBatch


class Selector:
    """Scores checkpoints by an OPE estimate on the validation split (`select_by`)."""

    def __init__(
        self,
        config: TrainConfig,
        validation: StepBatch,
        behavior_logp: Tensor,
        critic_batch: StepBatch,
    ) -> None:
        self.config, self.validation, self.behavior_logp = config, validation, behavior_logp
        self.critic_batch = critic_batch
        self.estimator = (config.select_by or "").removesuffix("_ci_low").removesuffix("_lb")
        self.scores: dict[int, tuple[Path, float]] = {}

    def score(self, policy: nn.Module, path: Path, step: int) -> dict[str, float]:
        """Evaluate the policy saved at `path`; returns the `ope/...` metrics to log."""
        from offpg_offline.ope import evaluate_offline, selection_score

        estimates = evaluate_offline(  # fits an FQE critic for dr, wdr and fqe
            policy,  # type: ignore[arg-type]  # a TargetPolicy module
            self.validation,
            self.behavior_logp,
            gamma=self.config.gamma,
            estimators=(self.estimator,),
            n_boot=200,
            seed=self.config.seed,
            critic_batch=self.critic_batch,
            # refitting the critic per resample only pays when the interval is the score
            critic_interval="refit" if self.estimator != self.config.select_by else "fixed",
        )
        self.scores[step] = (path, selection_score(estimates, self.config.select_by or ""))
        metrics = {
            key: value for estimate in estimates for key, value in estimate.metrics().items()
        }
        return {**metrics, f"select/{self.config.select_by}": self.scores[step][1]}

    def best(self) -> tuple[int, Path]:
        """The step with the highest score (the earliest among ties) and its checkpoint."""
        step = max(sorted(self.scores), key=lambda k: self.scores[k][1])
        return step, self.scores[step][0]


def make_selector(
    config: TrainConfig, validation: tuple[StepBatch, Tensor] | None, critic_batch: StepBatch
) -> Selector | None:
    """A `Selector` when `select_by` is set (the config guarantees a validation split)."""
    if config.select_by is None or validation is None:
        return None
    return Selector(config, validation[0], validation[1], critic_batch)


def checkpoint_interval(config: TrainConfig, selector: Selector | None) -> int:
    """Steps between periodic checkpoints: `checkpoint_every`, else steps // 10 when selecting
    (the candidates), else 0 (none)."""
    if config.checkpoint_every:
        return config.checkpoint_every
    return max(config.steps // 10, 1) if selector is not None else 0
