r"""Pareto-smoothed importance sampling (PSIS) and its k̂ diagnostic, in torch.

A port of `arviz.stats.psislw` (normalize=False), i.e. of Vehtari, Simpson, Gelman, Yao & Gabry
(2024), "Pareto smoothed importance sampling", JMLR 25(72) (arXiv:1507.02646, 2015): the
largest M = ⌈min(N/5, 3√N)⌉ weights are replaced by the expected order statistics of a
generalized Pareto distribution fitted to them by the empirical-Bayes method of Zhang & Stephens
(2009, Technometrics 51(3)), with arviz's weakly informative prior on k (10 pseudo-samples at
k = 0.5), and truncated at the largest raw weight. k̂ > 0.7 means the importance-sampling
estimate is unreliable; k̂ < 0.5 is fine.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_EPS = float(torch.finfo(torch.float64).eps)
_LOG_TINY = math.log(float(torch.finfo(torch.float64).tiny))


def _gpdfit(tail: Tensor) -> tuple[float, float]:
    """Zhang & Stephens (2009) estimate of the GPD shape k and scale σ; `tail` sorted, > 0."""
    n = tail.shape[0]
    m_est = 30 + int(n**0.5)
    grid = torch.arange(1, m_est + 1, dtype=torch.float64, device=tail.device)
    b_grid = 1 - torch.sqrt(m_est / (grid - 0.5))
    b_grid = b_grid / (3 * tail[int(n / 4 + 0.5) - 1]) + 1 / tail[-1]
    k_grid = torch.log1p(-b_grid[:, None] * tail).mean(dim=1)
    len_scale = n * (torch.log(-(b_grid / k_grid)) - k_grid - 1)
    weights = 1 / torch.exp(len_scale - len_scale[:, None]).sum(dim=1)
    keep = weights >= 10 * _EPS
    weights, b_grid = weights[keep], b_grid[keep]
    weights = weights / weights.sum()
    b_post = (b_grid * weights).sum()
    k_post = torch.log1p(-b_post * tail).mean()
    sigma = -k_post / b_post
    k_post = (n * k_post + 10 * 0.5) / (n + 10)
    return float(k_post), float(sigma)


def _gpinv(probs: Tensor, k: float, sigma: float) -> Tensor:
    """Quantile function of the generalized Pareto distribution (probs in (0, 1))."""
    if abs(k) < _EPS:
        return -torch.log1p(-probs) * sigma
    return torch.expm1(-k * torch.log1p(-probs)) / k * sigma


def pareto_smooth(log_weights: Tensor) -> tuple[Tensor, float]:
    r"""Pareto-smoothed log-weights and the shape estimate k̂ (PSIS; Vehtari et al. 2024).

    The largest M = ⌈min(N/5, 3√N)⌉ weights w_(N−M+1) ≤ … ≤ w_(N) are replaced by
    u + F⁻¹((j − 1/2)/M), j = 1..M, where u is the (N−M)-th largest weight and F the GPD fitted
    to w − u, then capped at max(w). Weights are not renormalised (arviz `psislw` with
    `normalize=False`). With M ≤ 4 tail samples (N < 25 or ties) nothing is smoothed and
    k̂ = inf, as in arviz.

    Args:
        log_weights: [N] log importance weights (any scale); not differentiated.

    Returns:
        The smoothed [N] float64 log-weights (same scale as the input) and k̂.
    """
    if log_weights.ndim != 1 or log_weights.shape[0] == 0:
        shape = list(log_weights.shape)
        raise ValueError(f"log_weights must be a non-empty 1-D tensor, got shape {shape}")
    x = log_weights.detach().double()
    n = x.shape[0]
    if n < 2 or not bool(torch.isfinite(x).all()):
        return x.clone(), math.inf
    max_x = x.max()
    x = x - max_x
    tail_size = math.ceil(min(n / 5.0, 3 * n**0.5))
    sorted_x = torch.sort(x).values
    cutoff = max(float(sorted_x[max(n - tail_size - 1, 0)]), _LOG_TINY)
    tail_index = torch.nonzero(x > cutoff).flatten()
    tail_len = tail_index.shape[0]
    if tail_len <= 4:
        return x + max_x, math.inf
    order = torch.argsort(x[tail_index])
    tail_index = tail_index[order]
    tail = torch.exp(x[tail_index]) - math.exp(cutoff)
    k, sigma = _gpdfit(tail)
    if math.isfinite(k) and sigma > 0:
        probs = (torch.arange(tail_len, dtype=torch.float64, device=x.device) + 0.5) / tail_len
        smoothed = torch.log(_gpinv(probs, k, sigma) + math.exp(cutoff))
        x = x.index_put((tail_index,), smoothed).clamp_max(0.0)
    return x + max_x, k


def psis_khat(log_weights: Tensor) -> float:
    """PSIS shape diagnostic k̂ of the weights exp(`log_weights`) [N] (inf when N < 25)."""
    return pareto_smooth(log_weights)[1]
