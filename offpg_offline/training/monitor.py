"""What training reports besides the loss: weight diagnostics on fixed probes, PDIS on the
held-out episodes, online returns when the env can be built, and the progress bar."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import torch
from torch import nn

from offpg_offline import estimators
from offpg_offline.config import TrainConfig
from offpg_offline.data.stream import LogView
from offpg_offline.policies import Policy
from offpg_offline.training.batches import unit_is_step
from offpg_offline.training.checkpoints import on_cpu


@torch.no_grad()
def weight_metrics(
    policy: Policy, train_probe: LogView, val_probe: LogView | None, config: TrainConfig
) -> dict[str, float]:
    """`weights/*` and `policy/*` on the training probe (at the estimator's unit: episode or
    step weights), and `ope/pdis_validation`, the PDIS estimate of J(π_θ) on the held-out probe."""
    target_logp = policy.log_prob(train_probe.obs, train_probe.action)
    metrics = estimators.weight_diagnostics(
        target_logp,
        train_probe.behavior_logp,
        train_probe.episode_start,
        clip=config.clip,
        clip_mode=config.clip_mode.value,
        level="step" if unit_is_step(config) else "episode",
    )
    if val_probe is not None and val_probe.n_rows > 0:
        val_logp = policy.log_prob(val_probe.obs, val_probe.action)
        metrics["ope/pdis_validation"] = -float(
            estimators.per_decision_surrogate(
                val_logp,
                val_probe.behavior_logp,
                val_probe.reward,
                val_probe.step,
                val_probe.episode_start,
                gamma=config.gamma,
            )
        )
    return {key: float(value) for key, value in metrics.items()}


@torch.no_grad()
def final_log_weights(policy: Policy, view: LogView, config: TrainConfig) -> torch.Tensor:
    """Log-weights on the training episodes at the end (per episode, or per step), on the CPU."""
    return estimators.diagnostic_log_weights(
        policy.log_prob(view.obs, view.action),
        view.behavior_logp,
        view.episode_start,
        level="step" if unit_is_step(config) else "episode",
    ).cpu()


def resolve_env(card: Mapping[str, Any], config: TrainConfig) -> tuple[Any, str | None]:
    """The env for online evaluation — `--env`, else the card's full `env_spec` (kwargs kept) —
    and None when gymnasium builds it; else (None, why online evaluation is skipped)."""
    from offpg_offline.rollout import try_make_env

    spec = config.env or card.get("env_spec")
    if not spec:
        return None, "the dataset records no environment (pass --env ID)"
    env, reason = try_make_env(spec)
    if env is None:
        return None, reason
    env.close()
    return spec, None


def online_metrics(
    policy: nn.Module, env_id: str | None, config: TrainConfig, prefix: str = "online"
) -> dict[str, float]:
    """Mean and std return of the stochastic and greedy policy over seeded episodes: the
    undiscounted Σ_t r_t (`return_*`) and the discounted Σ_t γ^t r_t with the run's γ
    (`discounted_return_*`, the quantity the OPE estimates are compared with)."""
    if env_id is None:
        return {}
    from offpg_offline.rollout import evaluate_online

    policy = on_cpu(policy)  # rollouts build CPU tensors
    runs = {
        "": evaluate_online(
            policy, env_id, episodes=config.eval_episodes, seed=10_000 + config.seed,
            deterministic=False, gamma=config.gamma,
        ),
        "greedy_": evaluate_online(
            policy, env_id, episodes=config.eval_episodes, seed=10_000 + config.seed,
            deterministic=True, gamma=config.gamma,
        ),
    }
    metrics: dict[str, float] = {}
    for kind, result in runs.items():
        metrics[f"{prefix}/{kind}return_mean"] = result.mean
        metrics[f"{prefix}/{kind}return_std"] = result.std
        metrics[f"{prefix}/{kind}discounted_return_mean"] = result.discounted_mean
        metrics[f"{prefix}/{kind}discounted_return_std"] = result.discounted_std
    return metrics


class Progress:
    """A rich progress bar with live loss and ESS, or nothing when disabled.

    `with Progress(enabled, total, start) as advance: advance(loss=..., ess=...)`; `label`
    names the phase (behavior cloning and the greedy critic's warm-up have a bar of their own,
    without ESS).
    """

    def __init__(self, enabled: bool, total: int, start: int = 0, label: str = "train") -> None:
        self.enabled, self.total, self.start, self.label = enabled, total, start, label

    def __enter__(self) -> Callable[..., None]:
        if not self.enabled:
            return lambda **_: None
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
        from rich.progress import Progress as Bar

        self._bar = Bar(
            TextColumn(self.label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            transient=False,
        )
        self._bar.__enter__()
        task = self._bar.add_task(self.label, total=self.total, completed=self.start, status="")

        def advance(loss: float, ess: float | None = None) -> None:
            status = f"loss {loss:.4g}" + ("" if ess is None else f"  ESS {ess:.0%}")
            self._bar.update(task, advance=1, status=status)

        return advance

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.enabled:
            self._bar.__exit__(kind, error, trace)
