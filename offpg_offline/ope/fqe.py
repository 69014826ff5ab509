"""Fitted-Q evaluation (Le, Voloshin & Yue 2019): a critic Q̂ ≈ Q^π fitted on the log."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from offpg_offline.estimators.segments import check_gamma
from offpg_offline.ope.estimates import _layout
from offpg_offline.policies import mlp

if TYPE_CHECKING:
    from offpg_offline.data.batch import StepBatch


class TargetPolicy(Protocol):
    """What OPE needs from π: `policies.CategoricalPolicy` and `GaussianPolicy` provide it."""

    def log_prob(self, obs: Tensor, action: Tensor) -> Tensor: ...

    def sample(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor: ...



# --------------------------------------------------------------------------------------------
# Fitted-Q evaluation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FQEConfig:
    """How the FQE critic is fitted (Le et al. 2019): K backups, each a few regression steps.

    Value travels one step back per backup, so K must be of the order of the effective horizon
    min(T, 1/(1 − γ)) or more: on the shipped CartPole log (γ = 0.99, a trained, nearly greedy
    π), K = 40 reached 40% of the online discounted value and K = 500 76–86% over two seeds;
    for a behavior-cloned π, 98%. The critic's seed moves FQE by about 10% there, which no
    interval shows (the refit interval's critics are warm-started from the one full-data
    critic, `intervals.refit_backups`). The defaults cost 5000 Adam steps per critic.
    """

    hidden: tuple[int, ...] = (64, 64)  # tanh MLP; () is linear (tabular on one-hot states)
    iterations: int = 500  # K Bellman backups; the target network is refreshed after each
    steps_per_iteration: int = 10  # Adam steps regressing Q̂ on the frozen target
    batch_size: int = 512  # transitions per step (all of them when fewer)
    lr: float = 1e-3
    action_samples: int = 16  # continuous actions: a' ∼ π(·|s') drawn per next state for V̂
    bootstrap_truncated: bool | None = None  # bootstrap truncated last steps; None: when γ < 1
    time_feature: bool | None = None  # feed t/T_max to the critic; None: when not bootstrapping

    def __post_init__(self) -> None:
        for name in ("iterations", "steps_per_iteration", "batch_size", "action_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"fqe.{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"fqe.lr must be positive, got {self.lr}")


def _bootstraps(config: FQEConfig, gamma: float, horizon: int) -> bool:
    """Whether truncated last steps are bootstrapped: `config.bootstrap_truncated`, or by default
    when γ < 1 and the log holds a transition inside an episode (T_max > 1). A log of one-step
    episodes (a bandit log) says nothing about what follows a decision; its `next_obs` is often
    a copy of `obs`, and bootstrapping from it would report ≈ r/(1 − γ) instead of r."""
    if config.bootstrap_truncated is None:
        return gamma < 1.0 and horizon > 1
    return config.bootstrap_truncated


class StackedMLP(nn.Module):
    """`members` independent tanh MLPs evaluated at once by batched matmuls (an ensemble).

    Input [R, in] (shared by every member) or [B, R, in]; output [B, R, out]. Each member is
    initialised like `nn.Linear` (uniform in ±1/√fan_in) from the global torch generator.
    """

    def __init__(self, members: int, in_dim: int, hidden: Sequence[int], out_dim: int) -> None:
        super().__init__()
        sizes = (in_dim, *(int(h) for h in hidden), out_dim)
        self.members = members
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in itertools.pairwise(sizes):
            bound = 1.0 / math.sqrt(fan_in)
            weight = (2 * torch.rand(members, fan_in, fan_out) - 1) * bound
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter((2 * torch.rand(members, 1, fan_out) - 1) * bound))

    def forward(self, x: Tensor) -> Tensor:
        """[R, in] or [B, R, in] → [B, R, out]."""
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            if x.ndim == 2:  # an input shared by every member: one [R, in] @ [in, B·out] GEMM
                members, fan_in, fan_out = weight.shape
                flat = weight.permute(1, 0, 2).reshape(fan_in, members * fan_out)
                x = (x @ flat).reshape(x.shape[0], members, fan_out).transpose(0, 1) + bias
            else:
                x = torch.baddbmm(bias, x, weight)
            if i < last:
                x = torch.tanh(x)
        return x

    def from_single(self, net: nn.Sequential) -> list[tuple[nn.Parameter, Tensor]]:
        """(member parameter, the matching parameter of one `mlp` of the same sizes) pairs."""
        linears = [layer for layer in net if isinstance(layer, nn.Linear)]
        pairs: list[tuple[nn.Parameter, Tensor]] = []
        for weight, bias, linear in zip(self.weights, self.biases, linears, strict=True):
            pairs += [(weight, linear.weight), (bias, linear.bias)]
        return pairs


def _broadcast(single: Tensor, member: Tensor) -> Tensor:
    """A tensor of one `mlp` layer ([out, in] or [out]) copied to every member's layout."""
    return (single.T if single.ndim == 2 else single).expand_as(member).clone()


class QCritic(nn.Module):
    """Q̂(s, a): a Q(s, ·) head for discrete actions, or an MLP of (s, a) for continuous ones.

    Observations are normalised with the fitting log's mean and std; outputs are scaled by
    `value_scale` (RMS reward × effective horizon) so that the network regresses O(1) numbers.
    With `members` = B > 0 it is an ensemble of B critics (`StackedMLP`) and every output gains
    a leading [B] dimension (one critic per bootstrap resample, `fit_fqe(row_weights=...)`).
    """

    def __init__(
        self,
        obs_dim: int,
        *,
        n_actions: int | None,
        action_dim: int | None,
        hidden: Sequence[int],
        obs_mean: Tensor,
        obs_std: Tensor,
        value_scale: float,
        time_scale: float = 0.0,
        members: int = 0,
    ) -> None:
        super().__init__()
        if (n_actions is None) == (action_dim is None):
            raise ValueError("give exactly one of n_actions (discrete) and action_dim (continuous)")
        self.n_actions, self.action_dim = n_actions, action_dim
        self.register_buffer("obs_mean", obs_mean.float().clone())
        self.register_buffer("obs_std", torch.where(obs_std > 1e-6, obs_std, 1.0).float().clone())
        self.register_buffer("value_scale", torch.tensor(float(value_scale)))
        self.register_buffer("time_scale", torch.tensor(float(time_scale)))
        in_dim, out_dim = obs_dim + (action_dim or 0), n_actions if n_actions is not None else 1
        self.members = members
        self.net: nn.Module = (StackedMLP(members, in_dim, hidden, out_dim) if members > 0
                               else mlp(in_dim, hidden, out_dim))
        self.bootstraps_truncated = False  # set by fit_fqe: its targets bootstrapped cut ends

    def features(self, obs: Tensor, step: Tensor) -> Tensor:
        """The critic's input: obs, with t / T_max appended when it uses the time feature."""
        if float(self.time_scale) <= 0:
            return obs
        time = step.to(obs.device, torch.float32)[:, None] / self.time_scale
        return torch.cat([obs.float(), time], dim=1)

    def _normalised(self, obs: Tensor, action: Tensor | None = None) -> Tensor:
        """Network output in units of `value_scale`: [(B,) M, A] (discrete) or [(B,) M]."""
        x = (obs.float() - self.obs_mean) / self.obs_std
        if self.n_actions is not None:
            return self.net(x)
        assert action is not None
        return self.net(torch.cat([x, action.float().reshape(x.shape[0], -1)], dim=-1))[..., 0]

    def q_all(self, obs: Tensor) -> Tensor:
        """Q̂(s, a) for every discrete action, [M, A] ([B, M, A] for an ensemble)."""
        if self.n_actions is None:
            raise ValueError("q_all needs a discrete-action critic")
        return self._normalised(obs) * self.value_scale

    def q_value(self, obs: Tensor, action: Tensor) -> Tensor:
        """Q̂(s_t, a_t), [M] ([B, M] for an ensemble)."""
        if self.n_actions is not None:
            q = self.q_all(obs)
            index = action.long().expand(q.shape[:-1])[..., None]
            return q.gather(-1, index)[..., 0]
        return self._normalised(obs, action) * self.value_scale


def _action_probs(policy: TargetPolicy, obs: Tensor, n_actions: int) -> Tensor:
    """π(a|s) for every discrete action, [M, A] (one `log_prob` call over M·A rows)."""
    rows = obs.repeat_interleave(n_actions, dim=0)
    actions = torch.arange(n_actions, device=obs.device).repeat(obs.shape[0])
    return policy.log_prob(rows, actions).exp().reshape(obs.shape[0], n_actions)


class _PolicyValue:
    """V̂(s) = E_{a∼π(·|s)} Q̂(s, a) at fixed states: exact sum (discrete) or fixed samples."""

    def __init__(self, policy: TargetPolicy, obs: Tensor, features: Tensor, critic: QCritic,
                 samples: int, generator: torch.Generator) -> None:
        self.obs = features  # what the critic sees; the policy sees `obs`
        with torch.no_grad():
            if critic.n_actions is not None:
                self.probs: Tensor | None = _action_probs(policy, obs, critic.n_actions)
                self.actions: list[Tensor] = []
            else:
                self.probs = None
                self.actions = [policy.sample(obs, generator=generator) for _ in range(samples)]

    def __call__(self, critic: QCritic, rows: Tensor | None = None) -> Tensor:
        """V̂ at all states, or at `rows` of them."""
        obs = self.obs if rows is None else self.obs[rows]
        if self.probs is not None:
            probs = self.probs if rows is None else self.probs[rows]
            return (probs * critic.q_all(obs)).sum(-1)
        actions = self.actions if rows is None else [a[rows] for a in self.actions]
        return torch.stack([critic.q_value(obs, a) for a in actions]).mean(0)


def _discrete_actions(action: Tensor) -> bool:
    return action.ndim == 1 and not torch.is_floating_point(action)


def fit_fqe(
    policy: TargetPolicy,
    batch: StepBatch,
    *,
    gamma: float,
    config: FQEConfig | None = None,
    n_actions: int | None = None,
    seed: int = 0,
    row_weights: Tensor | None = None,
    warm_start: QCritic | None = None,
) -> QCritic:
    r"""Fit Q̂ ≈ Q^π on the log by fitted-Q evaluation (Le, Voloshin & Yue 2019).

    For k = 1..K: freeze Q̂_k, form targets y = r + γ (1 − d) V̂_k(s'), with
    V̂_k(s') = Σ_a π(a|s') Q̂_k(s', a) (discrete) or the mean of Q̂_k(s', a'_j) over fixed
    samples a'_j ∼ π(·|s') (continuous), and take `steps_per_iteration` Adam steps on the mean
    squared error (Q̂(s, a) − y)², warm-started from Q̂_k. The done flag d is `terminated`, or
    also `truncated` when truncated steps are not bootstrapped. Bootstrapping them (the default
    when γ < 1 and some episode has two steps or more) estimates the discounted value beyond a
    log cut or time limit; with γ = 1 that value is unbounded on a time-limited env, so by
    default γ = 1 treats truncation as the end and gives the critic t/T_max as an extra input
    (Q then depends on the time left). On a log of one-step episodes (a bandit log) nothing is
    bootstrapped, every target is y = r, and FQE is the least-squares reward regression
    q̂(x, a) ≈ E[r | x, a] of the direct method (Dudík, Langford & Li 2011).
    Bootstrapped values are clipped to [min(0, r_min), max(0, r_max)] × (discounted steps
    left), which contains V^π: a guard against the divergence of FQE as γ → 1. Expect FQE to
    be poor at γ = 1 over long horizons (CartPole: 41% of the online return after K = 500).

    Ensemble (bootstrap refits). With `row_weights` [B, M] ≥ 0, B critics are fitted at once
    (`QCritic(members=B)`, batched matmuls): critic b minimises Σ_rows w_b (Q̂_b − y_b)² / Σ w_b
    on the same minibatches, its targets y_b from its own frozen copy. Integer bootstrap counts
    of each row's episode make critic b the FQE fit on resample b; members also differ in
    their random initialisation, unless `warm_start` (a single critic fitted on the same log,
    e.g. on all episodes) gives every member its weights and normalisation: then each member
    continues from Q̂ for `config.iterations` backups of its own resample (the bootstrap by
    warm-started refits; value differences travel one step per backup, so iterations of the
    order of the effective horizon 1/(1 − γ) carry the resample's change into V̂(s_0)).

    Args:
        policy: the evaluated policy π (any object with `log_prob` and `sample`).
        batch: the log to fit on (`obs`, `action`, `reward`, `next_obs`, `terminated`, ...).
        gamma: discount in [0, 1].
        config: fitting options (FQEConfig()).
        n_actions: number of discrete actions (default: `policy.n_actions`, else max action + 1).
        seed: seeds the critic's initialisation, minibatches and action samples.
        row_weights: optional [B, M] non-negative weights of the rows, one row per critic.
        warm_start: a single (non-ensemble) critic fitted on `batch` by `fit_fqe` with the
            same `hidden`; every ensemble member starts from it (needs `row_weights`).

    Returns:
        The fitted critic (its `history` attribute lists the mean loss of each iteration, its
        `bootstraps_truncated` whether truncated last steps were bootstrapped).
    """
    check_gamma(gamma)
    config = config or FQEConfig()
    if row_weights is not None and (row_weights.ndim != 2 or row_weights.shape[1] != batch.n_steps
                                    or bool((row_weights < 0).any())):
        raise ValueError(f"row_weights must be non-negative with shape [B, {batch.n_steps}], "
                         f"got {tuple(row_weights.shape)}")
    horizon = int(_layout(batch.step, batch.episode_start).horizon)
    bootstraps = _bootstraps(config, gamma, horizon)
    discrete = _discrete_actions(batch.action)
    if discrete:
        n_actions = n_actions or getattr(policy, "n_actions", None) or int(batch.action.max()) + 1
    time_feature = not bootstraps if config.time_feature is None else config.time_feature
    obs = batch.obs.float()
    if time_feature:
        obs = torch.cat([obs, batch.step.float()[:, None] / horizon], dim=1)
    effective = horizon if gamma == 1.0 else min(horizon, 1.0 / (1.0 - gamma))
    scale = float(batch.reward.float().square().mean().sqrt()) * effective  # RMS r × horizon
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        critic = QCritic(
            obs.shape[1], n_actions=n_actions if discrete else None,
            action_dim=None if discrete else batch.action.reshape(obs.shape[0], -1).shape[1],
            hidden=config.hidden, obs_mean=obs.mean(0), obs_std=obs.std(0),
            value_scale=scale if scale > 0 else 1.0, time_scale=horizon if time_feature else 0.0,
            members=0 if row_weights is None else row_weights.shape[0],
        ).to(obs.device)
    if warm_start is not None:
        if row_weights is None or warm_start.members or not isinstance(critic.net, StackedMLP):
            raise ValueError("warm_start needs row_weights and a single (non-ensemble) critic")
        for name in ("obs_mean", "obs_std", "value_scale", "time_scale"):
            getattr(critic, name).copy_(getattr(warm_start, name))
    critic.bootstraps_truncated = bootstraps
    weights = None if row_weights is None else row_weights.to(obs.device, torch.float32)
    critic.history = _regress(critic, policy, batch, obs, gamma, horizon, config, weights, seed,
                              warm_start)
    return critic.eval()


def _warm_start(critic: QCritic, warm: QCritic, optimizer: torch.optim.Adam) -> None:
    """Copy a single critic's weights into every member, and its Adam moments (`warm.adam`)
    so that the members continue its optimisation: a fresh Adam's first steps have size ≈ lr
    whatever the gradient, which would throw a converged critic off its fit."""
    assert isinstance(critic.net, StackedMLP) and isinstance(warm.net, nn.Sequential)
    with torch.no_grad():
        for param, source in critic.net.from_single(warm.net):
            param.copy_(_broadcast(source, param))
            state = getattr(warm, "adam", {}).get(id(source))
            if state is not None:
                optimizer.state[param] = {"step": state["step"].clone(),
                                          "exp_avg": _broadcast(state["exp_avg"], param),
                                          "exp_avg_sq": _broadcast(state["exp_avg_sq"], param)}


def _regress(critic: QCritic, policy: TargetPolicy, batch: StepBatch, obs: Tensor, gamma: float,
             horizon: int, config: FQEConfig, weights: Tensor | None, seed: int,
             warm_start: QCritic | None = None) -> list[float]:
    """FQE's K frozen-target regressions (see `fit_fqe`); the mean loss of each iteration.
    A single critic keeps its final Adam moments in `critic.adam` (by parameter id)."""
    reward, action, step = batch.reward.float(), batch.action, batch.step
    done = batch.terminated.clone()
    if not critic.bootstraps_truncated:
        done |= batch.truncated
    generator = torch.Generator().manual_seed(seed)
    next_value = _PolicyValue(policy, batch.next_obs, critic.features(batch.next_obs, step + 1),
                              critic, config.action_samples, generator)
    # V(s_{t+1}) lies in [min(0, r_min), max(0, r_max)] × (discounted steps left): clipping the
    # bootstrapped values to that box keeps the true fixed point and stops divergence (γ ≈ 1).
    if critic.bootstraps_truncated:
        steps_left = torch.full_like(reward, math.inf)
    else:
        steps_left = (horizon - 1 - step).clamp_min(0).float()
    remaining = steps_left if gamma == 1.0 else (1 - gamma ** steps_left) / (1 - gamma)
    r_min, r_max = float(reward.min()), float(reward.max())
    # written out so that 0 · ∞ (γ = 1 with bootstrapped truncation) is 0, not NaN
    low = r_min * remaining if r_min < 0 else torch.zeros_like(remaining)
    high = r_max * remaining if r_max > 0 else torch.zeros_like(remaining)
    optimizer = torch.optim.Adam(critic.parameters(), lr=config.lr)
    if warm_start is not None:
        _warm_start(critic, warm_start, optimizer)
    m, members = obs.shape[0], max(critic.members, 1)
    continuing = (~done).float()
    backups = bool(continuing.any()) and gamma > 0  # else every target is r: one regression
    history: list[float] = []
    for _ in range(config.iterations):
        frozen = copy.deepcopy(critic).requires_grad_(False)  # Q̂_k, the regression target
        total = 0.0
        for _ in range(config.steps_per_iteration):
            rows = None if m <= config.batch_size else torch.randint(
                m, (config.batch_size,), generator=generator).to(obs.device)

            def take(values: Tensor, rows: Tensor | None = rows) -> Tensor:
                return values if rows is None else values[rows]

            target = take(reward)
            if backups:
                with torch.no_grad():
                    bootstrap = torch.clamp(next_value(frozen, rows), take(low), take(high))
                    target = target + gamma * take(continuing) * bootstrap
            error = ((critic.q_value(take(obs), take(action)) - target)
                     / critic.value_scale).square()
            if weights is None:
                loss = error.mean()
            else:  # one weighted mean per member, summed: each member sees only its own term
                w = weights if rows is None else weights[:, rows]
                loss = ((w * error).sum(1) / w.sum(1).clamp_min(1e-12)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() / members
        history.append(total / config.steps_per_iteration)
    if not critic.members:
        critic.adam = {id(p): optimizer.state[p] for p in critic.parameters()
                       if p in optimizer.state}
    return history


def critic_values(
    critic: QCritic,
    policy: TargetPolicy,
    batch: StepBatch,
    *,
    action_samples: int = 16,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Q̂(s_t, a_t), V̂(s_t) and V̂(s_{t+1}) on `batch`, each [M] float64 (V̂ under π).

    For an ensemble critic (`members` = B) each is [B, M].
    """
    generator = torch.Generator().manual_seed(seed)
    features = critic.features(batch.obs, batch.step)
    next_features = critic.features(batch.next_obs, batch.step + 1)
    with torch.no_grad():
        q_value = critic.q_value(features, batch.action)
        state_value = _PolicyValue(policy, batch.obs, features, critic, action_samples,
                                   generator)(critic)
        next_value = _PolicyValue(policy, batch.next_obs, next_features, critic, action_samples,
                                  generator)(critic)
    return q_value.double(), state_value.double(), next_value.double()
