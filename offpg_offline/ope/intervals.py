"""Percentile bootstrap over episodes (critic fixed or refitted) and HCOPE's lower bound."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from offpg_offline.estimators.segments import episode_index
from offpg_offline.ope.estimates import (
    direct_method,
    doubly_robust,
    episode_mean,
    weighted_doubly_robust,
)
from offpg_offline.ope.fqe import FQEConfig, QCritic, TargetPolicy, critic_values, fit_fqe

if TYPE_CHECKING:
    from offpg_offline.data.batch import StepBatch

F64 = torch.float64
_COUNT_CELLS = 1 << 22  # bootstrap count matrices are built in chunks of at most B·E = 4M cells


def bootstrap_counts(n_episodes: int, n_resamples: int, generator: torch.Generator) -> Tensor:
    """Multiplicities of each episode in `n_resamples` resamples with replacement, [B, E] float64.

    Drawn as a [B, E] index matrix and counted with one scatter-add.
    """
    index = torch.randint(n_episodes, (n_resamples, n_episodes), generator=generator)
    counts = torch.zeros(n_resamples, n_episodes, dtype=F64)
    return counts.scatter_add_(1, index, torch.ones_like(index, dtype=F64))


def bootstrap_intervals(
    statistics: Mapping[str, Callable[[Tensor], Tensor]],
    n_episodes: int,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over episodes for several statistics at once.

    Every statistic maps episode multiplicities [B, E] to [B] values; all of them see the same
    seeded resamples (paired), drawn in chunks of at most 4M count cells.

    Args:
        statistics: name → statistic(counts) (e.g. `lambda c: episode_mean(x, c)`).
        n_episodes: E.
        n_boot: number of resamples B.
        level: coverage of the two-sided interval, in (0, 1).
        seed: seed of the resampling generator.

    Returns:
        name → (lower, upper) percentile bounds at (1 − level)/2 and (1 + level)/2.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_boot < 2:
        raise ValueError(f"n_boot must be at least 2, got {n_boot}")
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, _COUNT_CELLS // max(n_episodes, 1))
    draws: dict[str, list[Tensor]] = {name: [] for name in statistics}
    for start in range(0, n_boot, chunk):  # loop over resample chunks, not episodes
        counts = bootstrap_counts(n_episodes, min(chunk, n_boot - start), generator)
        for name, statistic in statistics.items():
            draws[name].append(statistic(counts).double().cpu())
    probs = torch.tensor([(1.0 - level) / 2.0, (1.0 + level) / 2.0], dtype=F64)
    out = {}
    for name, parts in draws.items():
        low, high = torch.quantile(torch.cat(parts), probs).tolist()
        out[name] = (low, high)
    return out


def empirical_bernstein_lower_bound(values: Tensor, *, clip: float, delta: float) -> float:
    r"""1 − δ lower bound on E[X] for i.i.d. X ≥ 0, from the truncated Y = min(X, c) ∈ [0, c].

        E[X] ≥ E[Y] ≥ Ȳ − sqrt(2 ln(2/δ) Var_n(Y) / n) − 7 c ln(2/δ) / (3 (n − 1)),

    Var_n the unbiased sample variance: Maurer & Pontil (2009, Thm 4), as used by HCOPE
    (Thomas et al. 2015, Thm 1). Valid for any c > 0 chosen independently of `values`.
    """
    n = values.shape[0]
    if n < 2:
        raise ValueError(f"the empirical Bernstein bound needs at least 2 values, got {n}")
    if clip <= 0 or not 0.0 < delta < 1.0:
        raise ValueError(f"need clip > 0 and delta in (0, 1), got clip={clip}, delta={delta}")
    clipped = values.double().clamp(max=clip)
    log_term = math.log(2.0 / delta)
    spread = math.sqrt(2.0 * log_term * float(clipped.var()) / n)
    return float(clipped.mean()) - spread - 7.0 * clip * log_term / (3.0 * (n - 1))


def hcope_lower_bound(values: Tensor, *, delta: float = 0.05, seed: int = 0) -> float:
    r"""High-confidence lower bound on E[X] for non-negative, importance-weighted terms X.

    HCOPE (Thomas, Theocharous & Ghavamzadeh 2015): the inputs are unbiased terms such as
    w_{0:T−1}·(G − g_min)/(g_max − g_min), normalised so that the returns lie in [0, 1] (then
    E[X] ≤ 1 and X ≥ 0; X is unbounded above because the weights are). The truncation c is
    chosen on a seeded 1/20 of the episodes, by maximising the bound predicted for the other
    19/20 (their §5), and the bound is computed on those 19/20 only, so c does not depend on
    them. With fewer than 40 values c = 1 (the largest possible mean) on all of them.

    Args:
        values: X_e ≥ 0, [E].
        delta: 1 − confidence.
        seed: seed of the split.

    Returns:
        A number that is ≤ E[X] with probability ≥ 1 − δ.
    """
    values = values.double().cpu()
    if bool((values < 0).any()):
        raise ValueError("hcope_lower_bound needs non-negative terms (normalise the returns)")
    n = values.shape[0]
    if n < 40:
        return empirical_bernstein_lower_bound(values, clip=1.0, delta=delta)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_pre = n // 20
    pre, post = values[order[:n_pre]], values[order[n_pre:]]
    candidates = torch.cat([pre, torch.ones(1, dtype=F64)]).clamp_min(1e-12).unique()
    clipped = torch.minimum(pre[:, None], candidates[None, :])  # [n_pre, K]
    log_term = math.log(2.0 / delta)
    n_post = post.shape[0]
    predicted = (clipped.mean(0) - (2.0 * log_term * clipped.var(0) / n_post).sqrt()
                 - 7.0 * candidates * log_term / (3.0 * (n_post - 1)))
    clip = float(candidates[int(predicted.argmax())])
    return empirical_bernstein_lower_bound(post, clip=clip, delta=delta)


def refit_critic_draws(
    policy: TargetPolicy,
    batch: StepBatch,
    args: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    *,
    gamma: float,
    names: Collection[str],
    config: FQEConfig,
    n_refit: int,
    seed: int,
    critic_batch: StepBatch | None = None,
    warm_start: QCritic | None = None,
    centre: Mapping[str, float] | None = None,
) -> dict[str, Tensor]:
    r"""Bootstrap draws of DR, WDR and FQE in which the critic is refitted on every resample.

    Resample b draws the evaluation episodes with multiplicities c_b (`bootstrap_counts`) and
    fits its own critic Q̂_b on the critic's episodes drawn the same way: the same c_b when the
    critic is fitted on `batch` itself, an independent draw from `critic_batch` otherwise. The
    B critics are fitted at once as one ensemble (`fit_fqe(row_weights=...)`); then

        DR_b = Σ_e c_{b,e} x_e(Q̂_b) / Σ_e c_{b,e},  FQE_b = Σ_e c_{b,e} V̂_b(s_0^e) / Σ_e c_{b,e},

    and WDR_b is WDR on resample b with Q̂_b. Their spread contains the critic's fitting
    variance, which a fixed critic leaves out (the bootstrap of the whole estimator, as in
    Kostrikov & Nachum 2020, and Hanna, Stone & Niekum 2017 for model-based estimates).
    With `warm_start` (the critic fitted on all of the critic's episodes) every Q̂_b starts from
    it and runs `refit_backups(config, gamma)` backups of its resample instead of K from a
    random initialisation: the resample's change reaches V̂(s_0) in about 1/(1 − γ) backups.
    Those extra backups also move the critic on the full log itself when the warm start had not
    converged; so one more member, the control, is refitted the same way on the unresampled
    episodes (all counts 1), and with `centre` (the point estimates) every draw is shifted by
    centre − control: the draws then spread around the point estimate by the resampling alone,
    not by the refit procedure's own drift (which put whole intervals beside the estimate).

    Args:
        policy: π.
        batch: evaluation episodes.
        args: (target_logp, behavior_logp, reward, step, episode_start) of `batch`, float64.
        gamma: discount.
        names: among dr, wdr, fqe.
        config: FQE options (shared by every refit).
        n_refit: B, the number of resamples (= critics).
        seed: seeds the resamples and the critics.
        critic_batch: episodes the critic is fitted on (default: `batch`).
        warm_start: the single critic fitted on all of them (`fit_fqe`), or None (cold refits).
        centre: name → point estimate; with `warm_start`, the draws are re-centred on it
            through the control member (see above).

    Returns:
        name → [B] draws of the estimate.
    """
    start = args[4]
    generator = torch.Generator().manual_seed(seed + 7919)  # apart from the fixed bootstrap's
    counts = bootstrap_counts(int(start.sum()), n_refit, generator)
    fit_on = batch if critic_batch is None else critic_batch
    fit_counts = counts if critic_batch is None else bootstrap_counts(
        fit_on.n_episodes, n_refit, generator)
    control = warm_start is not None and centre is not None
    if control:  # member n_refit: the unresampled log, refitted like the others
        counts = torch.cat([counts, torch.ones_like(counts[:1])])
        fit_counts = counts if critic_batch is None else torch.cat(
            [fit_counts, torch.ones_like(fit_counts[:1])])
    row_weights = fit_counts[:, episode_index(fit_on.episode_start.cpu())].float()
    ensemble = fit_fqe(policy, fit_on, gamma=gamma, seed=seed,
                       config=config if warm_start is None else refit_backups(config, gamma),
                       row_weights=row_weights.to(fit_on.reward.device), warm_start=warm_start)
    q_value, state_value, next_value = (v.cpu() for v in critic_values(
        ensemble, policy, batch, action_samples=config.action_samples, seed=seed))
    cut = (batch.truncated & ~batch.terminated).cpu()
    draws: dict[str, list[Tensor]] = {name: [] for name in names}
    for b in range(counts.shape[0]):  # a loop over resamples, each vectorised over rows
        c = counts[b: b + 1]
        end_value = torch.where(cut, next_value[b], 0.0) if ensemble.bootstraps_truncated else None
        critic_args = (*args, q_value[b], state_value[b])
        if "dr" in names:
            draws["dr"].append(episode_mean(
                doubly_robust(*critic_args, gamma=gamma, end_value=end_value), c))
        if "wdr" in names:
            draws["wdr"].append(weighted_doubly_robust(
                *critic_args, gamma=gamma, end_value=end_value, counts=c))
        if "fqe" in names:
            draws["fqe"].append(episode_mean(direct_method(state_value[b], start), c))
    result = {name: torch.cat(parts).double() for name, parts in draws.items()}
    if control:
        assert centre is not None
        result = {name: d[:-1] - (d[-1] - centre[name]) for name, d in result.items()}
    return result


def refit_backups(config: FQEConfig, gamma: float) -> FQEConfig:
    """`config` with the backups of a warm-started refit: K' = min(K, max(⌈K/5⌉, ⌈1/(1 − γ)⌉))
    (all K when γ = 1). The effective horizon 1/(1 − γ) is how far a change in the data must
    travel; K/5 keeps at least a fifth of the full fit's optimisation."""
    k = config.iterations
    horizon = k if gamma >= 1.0 else math.ceil(1.0 / (1.0 - gamma) - 1e-9)
    return replace(config, iterations=min(k, max(math.ceil(k / 5), horizon)))


def percentile_interval(draws: Tensor, level: float) -> tuple[float, float]:
    """Percentile interval of B bootstrap draws: the order statistics at positions
    (B + 1)(1 ∓ level)/2 (1-based, linearly interpolated, clamped to [1, B]).

    The expected probability content between the k-th and the (B + 1 − k)-th of B i.i.d. draws
    is (B + 1 − 2k)/(B + 1), so k = (B + 1)(1 − level)/2 gives `level` exactly (Davison &
    Hinkley 1997, §5.2); `torch.quantile`'s positions 1 + (B − 1)(1 − level)/2 would give
    0.91 instead of 0.95 at B = 50 (the refit interval's default number of draws).
    """
    ordered = torch.sort(draws.double().flatten()).values
    n = ordered.shape[0]
    out = []
    for tail in ((1.0 - level) / 2.0, (1.0 + level) / 2.0):
        position = min(max(tail * (n + 1), 1.0), float(n)) - 1.0  # 0-based
        below = math.floor(position)
        above = min(below + 1, n - 1)
        frac = position - below
        out.append(float(ordered[below] * (1 - frac) + ordered[above] * frac))
    return out[0], out[1]
