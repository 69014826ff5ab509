"""Segmented (per-episode) tensor operations over flat step tensors.

Steps of all episodes are laid end to end: M rows, episodes contiguous and in `step` order, and
`episode_start` is True on each episode's first row. Every function here is vectorised over
episodes and steps (no Python loop over either) and accumulates in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_flat(**tensors: Tensor | None) -> None:
    """Raise ValueError unless all given tensors are 1-D and of one length (None is skipped)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    lengths = {shape[0] if len(shape) == 1 else -1 for shape in shapes.values()}
    if len(lengths) != 1 or -1 in lengths:
        named = ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())
        raise ValueError(f"expected 1-D tensors of one length M, got {named}")
    if 0 in lengths:
        raise ValueError(f"expected at least one step, got empty tensors ({', '.join(shapes)})")


def check_episode_start(episode_start: Tensor) -> None:
    """Raise ValueError unless `episode_start` is a boolean mask whose first entry is True."""
    if episode_start.dtype != torch.bool:
        raise ValueError(f"episode_start must be a bool tensor, got {episode_start.dtype}")
    if not bool(episode_start[0]):
        raise ValueError("episode_start[0] must be True: the first row begins an episode")


def episode_index(episode_start: Tensor) -> Tensor:
    """Ordinal 0..E-1 of each row's episode, cumsum(episode_start) - 1, int64 [M]."""
    return torch.cumsum(episode_start.to(torch.int64), dim=0) - 1


def _first_row(episode_start: Tensor) -> Tensor:
    """Row index of each row's episode start, [M] int64."""
    positions = torch.arange(episode_start.shape[0], device=episode_start.device)
    return torch.cummax(torch.where(episode_start, positions, 0), dim=0).values


def episode_position(episode_start: Tensor) -> Tensor:
    """Position of each row within its episode, 0..T_i−1, int64 [M]."""
    positions = torch.arange(episode_start.shape[0], device=episode_start.device)
    return positions - _first_row(episode_start)


def episode_sum(values: Tensor, episode_start: Tensor) -> Tensor:
    """Sum of `values` [M] within each episode, [E] in float64 (index_add by episode ordinal)."""
    check_flat(values=values, episode_start=episode_start)
    check_episode_start(episode_start)
    index = episode_index(episode_start)
    n_episodes = int(episode_start.sum())
    out = torch.zeros(n_episodes, dtype=torch.float64, device=values.device)
    return out.index_add(0, index, values.double())


def segmented_cumsum(values: Tensor, episode_start: Tensor) -> Tensor:
    r"""Cumulative sum of `values` that restarts at every episode start.

        out_t = Σ_{k = start(t)}^{t} values_k

    One global cumsum minus its value just before each episode's first row. Accumulates in
    float64: in float32 that difference cancels catastrophically on long logs.

    Args:
        values: [M] values (e.g. log-ratios).
        episode_start: [M] bool, True on each episode's first row.

    Returns:
        [M] float64 tensor; differentiable with respect to `values`.
    """
    check_flat(values=values, episode_start=episode_start)
    check_episode_start(episode_start)
    values64 = values.double()
    total = torch.cumsum(values64, dim=0)
    return total - (total - values64)[_first_row(episode_start)]


def episode_last(episode_start: Tensor) -> Tensor:
    """[M] bool, True on each episode's last row."""
    return torch.cat([episode_start[1:], episode_start.new_ones(1)])


def discounted_returns(reward: Tensor, episode_start: Tensor, gamma: float) -> Tensor:
    r"""Discounted reward-to-go within each episode, G_t = Σ_{t' ≥ t} γ^{t'-t} r_{t'}.

    Solves the reverse recurrence G_t = r_t + γ·[t not last]·G_{t+1} with a log-depth
    (Hillis–Steele) scan: ⌈log2 T_max⌉ vectorised passes, each O(M), no cancellation. (The
    shortcut γ^{-t}·suffix-sum loses all precision once γ^t is small, e.g. γ = 0.9, t = 500.)

    Args:
        reward: [M] rewards r_t.
        episode_start: [M] bool, True on each episode's first row.
        gamma: discount in [0, 1].

    Returns:
        [M] float64 tensor G_t.
    """
    check_flat(reward=reward, episode_start=episode_start)
    check_episode_start(episode_start)
    check_gamma(gamma)
    total = reward.double()
    if gamma == 0.0 or bool(episode_start.all()):  # one-step episodes: G_t = r_t
        return total
    factor = torch.full_like(total, gamma).masked_fill(episode_last(episode_start), 0.0)
    m = total.shape[0]
    longest = int(torch.diff(torch.nonzero(torch.cat(
        [episode_start, episode_start.new_ones(1)])).flatten()).max())
    offset = 1
    while offset < longest:  # log2(T_max) passes: G_t = B_t + A_t·G_{t+offset}
        pad = total.new_zeros(min(offset, m))
        total = total + factor * torch.cat([total[offset:], pad])
        factor = factor * torch.cat([factor[offset:], pad])
        offset *= 2
    return total


def check_gamma(gamma: float) -> None:
    """Raise ValueError unless 0 ≤ gamma ≤ 1."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
