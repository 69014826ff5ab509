r"""The `offpg evaluate` job: value a target policy on held-out episodes, offline and online.

Flow (`evaluate`):
1. The target. A training run (MLflow run id), a checkpoint folder or file, or a policy that is
   not a checkpoint (`uniform`, a Parquet table of per-row action probabilities, an [M, A]
   array). For a run or folder, `EvaluateConfig.checkpoint` picks the file: `shipped` (default:
   `selected.pt` when the run selected a checkpoint by OPE, else `final.pt`), `final`,
   `selected` or `step-N`; the result says which (step, criterion).
2. The episodes (`held_out_episodes`). Split "validation" (the default without `dataset`):
   the run's dataset and the episode ids the run recorded (`validation_episodes.json`, contract
   §2, checked against its digest; from the run's artifacts, or beside a checkpoint file); a
   run without a record falls back to `data.split.split_episodes(ids, val_fraction, seed)` with
   the run's params, the function training uses. The critic (dr, wdr, fqe) is then fitted on
   the other (training) episodes. Split "all" (the default with `dataset`): every episode.
3. OPE: `ope.evaluate_offline` with γ (default: the run's), in two stages (the importance-
   sampling family, then the critic estimators), each announced to `progress`.
4. Online (optional): N seeded episodes, stochastic and greedy, in the env the dataset card
   describes (its full spec, kwargs included), reporting the undiscounted return Σ_t r_t and
   the discounted return Σ_t γ^t r_t with the same γ as OPE: the quantity OPE estimates,
   J(π) = E_π[Σ_t γ^t r_t].
5. The record (`record_evaluation`): for a run, a nested MLflow run under it (tag
   `mlflow.parentRunId`), holding `ope/*` and `online/*`, params and `offpg.eval.*` tags (dataset
   digest, split, γ, estimators, seed, checkpoint); the training run's own metrics are never
   written. `offpg compare --metric eval:ope/wdr` ranks by these (`find_evaluations`,
   `compare.attach_evaluations`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from offpg_offline.config import EvaluateConfig, Propensity, TrainConfig

Progress = Callable[[str], None]
EVALUATION_KIND = "evaluation"  # value of the `offpg.kind` tag of an evaluation run
_IS_NAMES = ("is", "wis", "pdis", "wpdis")
_CRITIC_NAMES = ("dr", "wdr", "fqe")


@dataclass(frozen=True, slots=True)
class Target:
    """What is evaluated: a checkpoint (with the step and why it was chosen) or another policy.

    Attributes:
        policy: π, with `log_prob(obs, action)` and `sample` (and `mode` for checkpoints).
        kind: "checkpoint" or "policy".
        name: the checkpoint's path or artifact (`runs:/ID/checkpoints/selected.pt`), or the
            policy's description ("uniform", a file path, "array").
        choice: "shipped"/"final"/"selected"/"step-N" resolved to "final", "selected" or
            "step-N" (None for a policy).
        step: training step of the checkpoint.
        criterion: why this checkpoint, e.g. "selected by wpdis" or "final step".
        params: the training config recorded in the checkpoint (γ, seed, val_fraction, ...).
        validation_ids: the held-out episode ids recorded beside a checkpoint file.
    """

    policy: Any
    kind: str
    name: str
    choice: str | None = None
    step: int | None = None
    criterion: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    validation_ids: Tensor | None = None  # `validation_episodes.json` beside the checkpoint


@dataclass(frozen=True, slots=True)
class RunSource:
    """What a training run recorded that evaluation needs."""

    run_id: str
    experiment_id: str
    dataset: Path | None
    params: Mapping[str, str]
    tags: Mapping[str, str]
    validation_ids: Tensor | None  # the recorded held-out episode ids, when the run has them


@dataclass(slots=True)
class Evaluation:
    """One evaluation: where, with what γ, the OPE estimates and the online returns."""

    target: Target
    dataset: Path
    split: str  # "validation" (the run's held-out episodes) or "all"
    n_episodes: int
    gamma: float
    level: float
    delta: float
    estimates: list[Any]
    online: dict[str, Any] = field(default_factory=dict)  # "stochastic"/"greedy": OnlineResult
    online_env: str | None = None
    online_skipped: str | None = None
    run_id: str | None = None
    evaluation_run_id: str | None = None
    validation_source: str | None = None  # "recorded" or "recomputed"
    critic_interval: str = "refit"  # how dr/wdr/fqe intervals were made
    validation_digest: str | None = None

    def metrics(self) -> dict[str, float]:
        """`ope/<name>[_ci_low|_ci_high|_ess|_lb]` and `online/[greedy_][discounted_]return_*`."""
        out: dict[str, float] = {}
        for estimate in self.estimates:
            out.update(estimate.metrics())
        for mode, result in self.online.items():
            prefix = "online/" if mode == "stochastic" else f"online/{mode}_"
            out.update({f"{prefix}return_mean": result.mean, f"{prefix}return_std": result.std,
                        f"{prefix}discounted_return_mean": result.discounted_mean,
                        f"{prefix}discounted_return_std": result.discounted_std})
        return out

    def as_json(self) -> dict[str, Any]:
        """The `--json` object: {"checkpoint" or "policy", "dataset", "split", "gamma", "ope",
        "online", ...}; every OPE value is in units of the discounted return with `gamma`.
        Non-finite numbers become null (strict JSON)."""
        return _finite(self._as_dict())

    def _as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {self.target.kind: self.target.name}
        if self.target.kind == "checkpoint":
            out.update({"checkpoint_choice": self.target.choice, "step": self.target.step,
                        "criterion": self.target.criterion})
        out.update({"dataset": str(self.dataset), "split": self.split,
                    "n_episodes": self.n_episodes, "gamma": self.gamma, "level": self.level,
                    "critic_interval": self.critic_interval})
        out["ope"] = {e.name: {"value": e.value, "ci_low": e.ci_low, "ci_high": e.ci_high,
                               "ess": e.ess, "lower_bound": e.lower_bound}
                      for e in self.estimates}
        online: dict[str, Any] = {}
        if self.online_skipped is not None:
            online["skipped"] = self.online_skipped
        if self.online:
            online.update({"env": self.online_env, "gamma": self.gamma})
            for mode, result in self.online.items():
                online[mode] = {"episodes": len(result.returns), "return_mean": result.mean,
                                "return_std": result.std,
                                "discounted_return_mean": result.discounted_mean,
                                "discounted_return_std": result.discounted_std}
        out["online"] = online
        out["run_id"] = self.run_id
        out["evaluation_run_id"] = self.evaluation_run_id
        return out


def _finite(value: Any) -> Any:
    """`value` with NaN/±inf floats replaced by None, recursively (dicts and lists)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


# --- the target ------------------------------------------------------------------------------


def _checkpoint_file(choice: str) -> str:
    if choice.startswith("step-"):
        return f"step-{int(choice.removeprefix('step-')):06d}.pt"
    return f"{choice}.pt"


def _resolve_choice(choice: str, has_selected: bool, where: str) -> str:
    """`shipped` → selected when the run selected one, else final; `selected` must exist."""
    if choice == "shipped":
        return "selected" if has_selected else "final"
    if choice == "selected" and not has_selected:
        raise ValueError(f"{where} selected no checkpoint (train --select-by was not set); "
                         f"pass --checkpoint final or step-N")
    return choice


def load_checkpoint_target(path: Path, *, choice: str | None = None,
                           criterion: str | None = None, name: str | None = None) -> Target:
    """A checkpoint file as a `Target` (step and criterion from the file when not given)."""
    from offpg_offline.policies import load_checkpoint, policy_from_checkpoint

    ckpt = load_checkpoint(path)  # weights_only: a pickle with code is refused (ValueError)
    try:
        policy = policy_from_checkpoint(ckpt).eval()
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{name or path}: not a policy checkpoint ({first})") from None
    from offpg_offline.data.split import VALIDATION_RECORD, read_validation_record

    params = dict(ckpt.get("config") or {})
    step = int(ckpt["step"]) if "step" in ckpt else None
    if criterion is None:
        select_by = params.get("select_by")
        criterion = {"selected": f"selected by {select_by}", "final": "final step"}.get(
            choice or "", f"step {step}" if choice else "as given")
    record = Path(path).parent / VALIDATION_RECORD
    ids = read_validation_record(record) if name is None and record.is_file() else None
    return Target(policy, "checkpoint", name or str(path), choice, step, criterion, params, ids)


def folder_target(folder: Path, choice: str) -> Target:
    """The checkpoint `choice` picks in a training output folder (`final.pt`, `selected.pt`,
    `step-NNNNNN.pt`)."""
    resolved = _resolve_choice(choice, (folder / "selected.pt").is_file(), f"{folder}")
    path = folder / _checkpoint_file(resolved)
    if not path.is_file():
        raise ValueError(f"{folder} has no checkpoint {path.name} (--checkpoint {choice})")
    return load_checkpoint_target(path, choice=resolved)


def run_target(target: str, choice: str, tmp: Path) -> tuple[Target, RunSource]:
    """Download the checkpoint `choice` picks from run `target`, and what the run recorded."""
    from offpg_offline import tracking
    from offpg_offline.config import TrackingConfig
    from offpg_offline.data.split import VALIDATION_RECORD, read_validation_record

    client = tracking.open_client(TrackingConfig())
    where = tracking.resolve_uri(TrackingConfig())
    try:
        run = client.get_run(target)
    except tracking.MlflowException as err:
        raise ValueError(f"{target} is neither a checkpoint file nor a run in {where} "
                         f"({str(err).splitlines()[0]})") from None
    tags, params = dict(run.data.tags), dict(run.data.params)
    resolved = _resolve_choice(choice, "selected_checkpoint" in tags, f"run {target}")
    artifact = f"checkpoints/{_checkpoint_file(resolved)}"
    local = Path("runs") / target / _checkpoint_file(resolved)  # train's default --out-dir
    try:
        path = Path(client.download_artifacts(target, artifact, str(tmp)))
    except (tracking.MlflowException, OSError):
        if not local.is_file():
            logged = [Path(a.path).name for a in client.list_artifacts(target, "checkpoints")]
            raise ValueError(
                f"run {target} has no {artifact} in {where} (it logged "
                f"{', '.join(logged) or 'no checkpoint'}); step checkpoints stay in the "
                f"training's --out-dir: pass that folder as TARGET with --checkpoint "
                f"{resolved}") from None
        path, artifact = local, str(local)
    criterion = None
    if resolved == "selected":
        criterion = f"selected by {params.get('select_by', '?')}"
    loaded = load_checkpoint_target(path, choice=resolved, criterion=criterion,
                                    name=str(local) if path == local else
                                    f"runs:/{target}/{artifact}")
    dataset = None
    for entry in run.inputs.dataset_inputs if run.inputs is not None else ():
        try:
            dataset = Path(json.loads(entry.dataset.source)["uri"])
        except (ValueError, KeyError, TypeError):
            continue
    try:
        record = Path(client.download_artifacts(target, VALIDATION_RECORD, str(tmp)))
    except (tracking.MlflowException, OSError):
        record = None
    ids = None if record is None else read_validation_record(record)
    return loaded, RunSource(run.info.run_id, run.info.experiment_id, dataset, params, tags, ids)


def policy_target(policy: Any, batch: Any, card: Mapping[str, Any]) -> Target:
    """`uniform`, a Parquet table of per-row action probabilities, an [M, A] array, or a
    checkpoint file, as a `Target` evaluated on `batch` (the dataset's rows in order)."""
    from offpg_offline.data.spaces import space_from_json
    from offpg_offline.jobs.targets import (
        ActionTablePolicy,
        UniformPolicy,
        read_probability_table,
    )

    action_space = space_from_json(card["action_space"])
    n_actions = getattr(action_space, "n", None)
    if isinstance(policy, str) and policy == "uniform":
        return Target(UniformPolicy(action_space), "policy", "uniform")
    if isinstance(policy, str | Path):
        path = Path(policy)
        if path.suffix == ".pt" or path.is_dir():
            return folder_target(path, "shipped") if path.is_dir() else load_checkpoint_target(
                path)
        if not path.is_file():
            raise ValueError(f"--policy {policy}: not 'uniform', a checkpoint (.pt) or a Parquet "
                             f"file of action probabilities")
        probs, source = read_probability_table(path, batch.episode_id, batch.step), str(path)
    elif isinstance(policy, np.ndarray | Tensor):
        probs, source = torch.as_tensor(np.asarray(policy), dtype=torch.float64), "array"
    elif hasattr(policy, "log_prob"):
        return Target(policy, "policy", type(policy).__name__)
    else:
        raise ValueError(f"policy must be 'uniform', a path or an [M, A] array, not "
                         f"{type(policy).__name__}")
    if n_actions is None:
        raise ValueError(f"{source}: action probabilities need a Discrete action space")
    from offpg_offline.jobs.targets import check_probabilities

    check_probabilities(probs, batch.n_steps, source=source, n_actions=int(n_actions))
    return Target(ActionTablePolicy(batch.obs, probs, source=source), "policy", source)


# --- the episodes ----------------------------------------------------------------------------


def held_out_episodes(batch: Any, split: str, target: Target, source: RunSource | None
                      ) -> tuple[Any, Any, str | None, Tensor | None]:
    """(evaluated episodes, critic-fitting episodes or None, "recorded" | "recomputed" | None,
    the held-out ids) for `split`.

    "validation": the ids the run recorded (`validation_episodes.json`, from the run or beside
    the checkpoint file), else those `data.split.split_episodes` draws from the run's
    val_fraction and seed; the critic is fitted on the other episodes. "all": every episode.
    """
    from offpg_offline.data.split import split_episodes

    if split == "all":
        return batch, None, None, None
    if target.kind == "policy":
        raise ValueError(f"--split validation needs a run or checkpoint that recorded its split, "
                         f"not policy {target.name}; pass --split all")
    ids = batch.episode_id[batch.episode_start]
    where = f"run {source.run_id}" if source is not None else target.name
    recorded = source.validation_ids if source is not None else target.validation_ids
    if recorded is not None:
        missing = recorded[~torch.isin(recorded, ids)]
        if len(missing):
            raise ValueError(f"{where} held out {len(missing)} episode(s) that are not in the "
                             f"dataset (e.g. id {int(missing[0])}); is it another dataset? "
                             f"pass --split all to evaluate on all its episodes")
        held_out, how = recorded, "recorded"
    else:
        params = {**target.params, **(source.params if source is not None else {})}
        defaults = TrainConfig()  # a run records every field; these are for bare checkpoints
        _, held_out = split_episodes(ids, float(params.get("val_fraction", defaults.val_fraction)),
                                     int(params.get("seed", defaults.seed)))
        how = "recomputed"
    mask = torch.isin(ids, held_out)
    if not bool(mask.any()):
        raise ValueError(f"{where} has no validation episodes; pass --split all")
    val_idx, train_idx = torch.nonzero(mask)[:, 0], torch.nonzero(~mask)[:, 0]
    critic = batch.episodes(train_idx) if len(train_idx) else None
    return batch.episodes(val_idx), critic, how, held_out


def _check_table_covers(policy: Any, batch: Any, names: Sequence[str]) -> None:
    """A probability table must give π at every next state whose value a critic would use."""
    from offpg_offline.jobs.targets import ActionTablePolicy

    if not isinstance(policy, ActionTablePolicy) or not set(names) & set(_CRITIC_NAMES):
        return
    needed = ~batch.terminated
    unknown = needed & (policy.lookup(batch.next_obs) < 0)
    if bool(unknown.any()):
        row = int(torch.nonzero(unknown)[0, 0])
        count = int(unknown.sum())
        raise ValueError(
            f"{policy.source} gives no action probabilities at the next state of {count}"
            f" non-terminal row(s) (e.g. episode {int(batch.episode_id[row])} step "
            f"{int(batch.step[row])}); dr, wdr and fqe need π there: use --estimators "
            f"{','.join(_IS_NAMES)}")


# --- the job ---------------------------------------------------------------------------------


def _stage(progress: Progress | None, text: str) -> float:
    if progress is not None:
        progress(text)
    return time.perf_counter()


def _done(progress: Progress | None, started: float, what: str) -> None:
    if progress is not None:
        progress(f"{what} done in {time.perf_counter() - started:.1f} s")


def estimate(target: Target, held_out: Any, behavior_logp: Tensor, critic_batch: Any,
             config: EvaluateConfig, gamma: float, progress: Progress | None) -> list[Any]:
    """OPE estimates on `held_out`: the IS family, then the critic estimators, one stage each
    (both draw the same bootstrap resamples: `bootstrap_intervals` seeds them by `seed`)."""
    from offpg_offline import ope

    fqe = ope.FQEConfig() if config.fqe_iterations is None else ope.FQEConfig(
        iterations=config.fqe_iterations)
    common = dict(gamma=gamma, n_boot=config.n_boot, seed=config.seed, level=config.level,
                  delta=config.delta, fqe=fqe, critic_batch=critic_batch,
                  critic_interval=config.critic_interval, n_refit=config.n_refit)
    n_refit = config.n_refit or ope.default_n_refit(config.n_boot)
    refits = (f"refitting {n_refit} critics on resamples "
              f"({ope.intervals.refit_backups(fqe, gamma).iterations} backups each, warm-started)"
              if config.critic_interval == "refit" else "holding it fixed")
    found: dict[str, Any] = {}
    n = held_out.n_episodes
    stages = [([name for name in config.estimators if name in _IS_NAMES],
               f"OPE: importance sampling and {config.n_boot} bootstrap resamples on {n} episodes"),
              ([name for name in config.estimators if name in _CRITIC_NAMES],
               f"OPE: fitting the FQE critic ({fqe.iterations} backups), {refits}, and "
               f"bootstrapping {config.n_boot} resamples on {n} episodes")]
    for names, text in stages:
        if names:
            started = _stage(progress, text + " …")
            for result in ope.evaluate_offline(target.policy, held_out, behavior_logp,
                                               estimators=names, **common):
                found[result.name] = result
            _done(progress, started, text.split(":")[0] + f" ({', '.join(names)})")
    return [found[name] for name in config.estimators]


def rollouts(target: Target, env: Any, config: EvaluateConfig, gamma: float,
             progress: Progress | None) -> tuple[dict[str, Any], str | None]:
    """Stochastic and (for checkpoints) greedy returns over `config.online` seeded episodes;
    ({}, reason) when the env cannot be built or π cannot act off the log."""
    from offpg_offline.jobs.targets import ActionTablePolicy
    from offpg_offline.rollout import evaluate_online, try_make_env

    if isinstance(target.policy, ActionTablePolicy):
        return {}, "a table of action probabilities defines π only on the logged states"
    built, reason = try_make_env(env)
    if built is None:
        return {}, reason
    built.close()
    modes = ("stochastic", "greedy") if target.kind == "checkpoint" else ("stochastic",)
    out = {}
    for mode in modes:
        started = _stage(progress, f"rollouts: {config.online} {mode} episodes …")
        out[mode] = evaluate_online(target.policy, env, episodes=config.online, seed=config.seed,
                                    deterministic=mode == "greedy", gamma=gamma)
        _done(progress, started, f"rollouts ({mode})")
    return out, None


def evaluate(
    target: str | Path | None = None,
    *,
    dataset: Path | None = None,
    policy: Any = None,
    config: EvaluateConfig | None = None,
    progress: Progress | None = None,
    record: bool = True,
) -> Evaluation:
    """Evaluate a run's checkpoint (or a checkpoint, or another policy) off-policy and online.

    Args:
        target: an MLflow run id, a checkpoint file or a training output folder.
        dataset: evaluate on all episodes of this dataset (default: the run's validation split).
        policy: instead of `target`: "uniform", a checkpoint or Parquet file of per-row action
            probabilities, or an [M, A] array of π(a|s_i) for the dataset's rows in order.
        config: what to compute (`EvaluateConfig`).
        progress: called with one line per stage (FQE fitting, bootstrap, rollouts).
        record: for a run, log the evaluation as a nested run under it.

    Returns:
        An `Evaluation`.

    Raises:
        ValueError: one sentence naming the argument, file or run at fault.
    """
    import tempfile

    from offpg_offline.data.envspec import check_env_option

    config = config or EvaluateConfig()
    if (target is None) == (policy is None):
        raise ValueError("give either a run or checkpoint to evaluate, or --policy, not both")
    check_env_option(config.env)
    with tempfile.TemporaryDirectory() as tmp:
        source = None
        if target is not None and Path(target).is_dir():
            chosen: Target | None = folder_target(Path(target), config.checkpoint)
        elif target is not None and Path(target).is_file():
            if config.checkpoint not in ("shipped",):
                raise ValueError(f"--checkpoint picks among a run's checkpoints; {target} is "
                                 f"one file (pass the run id or its folder)")
            chosen = load_checkpoint_target(Path(target))
        elif target is not None:
            chosen, source = run_target(str(target), config.checkpoint, Path(tmp))
        else:
            chosen = None
        return _evaluate(chosen, source, dataset, policy, config, progress, record)


def _evaluate(chosen: Target | None, source: RunSource | None, dataset: Path | None,
              policy: Any, config: EvaluateConfig, progress: Progress | None,
              record: bool) -> Evaluation:
    from offpg_offline.data.batch import load_steps
    from offpg_offline.data.store import read_card
    from offpg_offline.train import behavior_logp_of

    folder = dataset or (source.dataset if source else None)
    if folder is None:
        raise ValueError("no dataset recorded with the target; pass --dataset")
    try:
        card = read_card(folder)
    except (OSError, ValueError) as err:
        gone = " (the run's dataset is gone? pass --dataset)" if dataset is None else ""
        raise ValueError(f"{folder} is not a readable dataset folder{gone}: {err}") from None
    started = _stage(progress, f"loading {folder} …")
    batch = load_steps(folder)
    _done(progress, started, "loading")
    target = chosen if chosen is not None else policy_target(policy, batch, card)
    params = {**target.params, **(source.params if source else {})}
    default_gamma = TrainConfig().gamma
    gamma = float(params.get("gamma", default_gamma)) if config.gamma is None else config.gamma
    propensity = config.propensity or Propensity(params.get("propensity", "logged"))
    split = config.split or ("all" if dataset is not None else "validation")
    held_out, critic_batch, how, held_ids = held_out_episodes(batch, split, target, source)
    _check_table_covers(target.policy, held_out, config.estimators)
    behavior_logp = behavior_logp_of(held_out, propensity, folder)
    estimates = estimate(target, held_out, behavior_logp, critic_batch, config, gamma, progress)
    result = Evaluation(target, folder, split, held_out.n_episodes, gamma, config.level,
                        config.delta, estimates, run_id=source.run_id if source else None,
                        validation_source=how, critic_interval=config.critic_interval)
    if held_ids is not None:
        from offpg_offline.data.split import validation_digest

        result.validation_digest = validation_digest(held_ids)
    if config.online > 0:
        env = config.env or card.get("env_spec")
        result.online, result.online_skipped = rollouts(target, env, config, gamma, progress)
        result.online_env = config.env or (card.get("env_spec") or {}).get("id")
    if record and source is not None:
        result.evaluation_run_id = record_evaluation(result, source, card, config)
    return result


# --- the record ------------------------------------------------------------------------------


def evaluation_tags(result: Evaluation, card: Mapping[str, Any],
                    config: EvaluateConfig) -> dict[str, str]:
    """The `offpg.eval.*` tags of an evaluation run (γ included: OPE values are in its units)."""
    from offpg_offline.data.store import dataset_digest

    tags = {
        "offpg.kind": EVALUATION_KIND,
        "offpg.eval.dataset": str(card.get("name", result.dataset.name)),
        "offpg.eval.dataset_digest": dataset_digest(card),
        "offpg.eval.split": result.split,
        "offpg.eval.episodes": str(result.n_episodes),
        "offpg.eval.gamma": f"{result.gamma:g}",
        "offpg.eval.estimators": ",".join(config.estimators),
        "offpg.eval.seed": str(config.seed),
        "offpg.eval.critic_interval": config.critic_interval,
        "offpg.eval.checkpoint": result.target.choice or result.target.name,
        "offpg.eval.checkpoint_step": str(result.target.step),
        "offpg.eval.criterion": str(result.target.criterion),
    }
    if result.validation_digest is not None:
        tags["offpg.validation_digest"] = result.validation_digest
        tags["offpg.eval.validation"] = str(result.validation_source)
    if result.online_skipped is not None:
        tags["offpg.eval.online_skipped"] = result.online_skipped
    return tags


def record_evaluation(result: Evaluation, source: RunSource, card: Mapping[str, Any],
                      config: EvaluateConfig) -> str:
    """Log `result` as a nested MLflow run under the training run; returns its id."""
    from offpg_offline import tracking
    from offpg_offline.config import TrackingConfig, as_params

    client = tracking.open_client(TrackingConfig())
    experiment = client.get_experiment(source.experiment_id).name
    name = f"eval {result.target.choice or 'policy'} on {result.split}"
    with tracking.MlflowTracker.start(TrackingConfig(), experiment=experiment, run_name=name,
                                      tags=evaluation_tags(result, card, config),
                                      parent_run_id=source.run_id) as tracker:
        tracker.log_params({**as_params(config), "gamma": result.gamma, "split": result.split,
                            "dataset": str(result.dataset)})
        tracker.log_dataset(result.dataset, card, context="evaluation")
        tracker.log_metrics(result.metrics(), step=result.target.step or 0)
    return tracker.run_id


def find_evaluations(client: Any, experiment_id: str) -> list[Any]:
    """The FINISHED evaluation runs of an experiment (tag `offpg.kind` = evaluation), oldest
    first, as `tracking.RunRecord`s."""
    from offpg_offline import tracking

    query = f"attributes.status = 'FINISHED' and tags.`offpg.kind` = '{EVALUATION_KIND}'"
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"],
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return [tracking.RunRecord(run_id=r.info.run_id, run_name=r.info.run_name or r.info.run_id,
                               params=dict(r.data.params), metrics=dict(r.data.metrics),
                               tags=dict(r.data.tags)) for r in runs]


# --- the console view ------------------------------------------------------------------------


def show_evaluation(result: Evaluation, width: int = 100) -> str:
    """The evaluation as text: what was evaluated, the OPE table (every value says its γ), the
    online returns (undiscounted and discounted with the same γ), and where it was recorded."""
    import io

    from rich.console import Console
    from rich.table import Table

    target, g = result.target, f"{result.gamma:g}"
    if target.kind == "checkpoint":
        head = f"checkpoint {target.name} (step {target.step}, {target.criterion})"
    else:
        head = f"policy {target.name}"
    where = (f"{result.n_episodes} validation episodes of {result.dataset}"
             + (f" (ids {result.validation_source} by the run)" if result.validation_source
                == "recorded" else " (split recomputed from the run's seed)")
             if result.split == "validation" else
             f"all {result.n_episodes} episodes of {result.dataset}")
    buffer = io.StringIO()
    console = Console(width=width, file=buffer, color_system=None, highlight=False)
    console.print(f"{head}\non {where}", soft_wrap=True, markup=False, highlight=False)
    table = Table(title=f"J(π) = E_π[Σ_t γ^t r_t], γ = {g}")
    for column in ("estimator", f"value (γ={g})", f"{result.level:.0%} interval", "ESS",
                   f"lower bound (δ = {result.delta:g})"):
        table.add_column(column, justify="left" if column == "estimator" else "right")
    for e in result.estimates:
        bound = "" if e.lower_bound is None else f"{e.lower_bound:.4g}"
        table.add_row(e.name, f"{e.value:.4g}", f"[{e.ci_low:.4g}, {e.ci_high:.4g}]",
                      f"{e.ess:.1f} / {e.n_episodes}", bound)
    console.print(table)
    critics = [e.name for e in result.estimates if e.name in _CRITIC_NAMES]
    if critics:
        how = ("the critic refitted on each resample" if result.critic_interval == "refit" else
               "the critic held fixed (fast; leaves out its fitting error: too narrow)")
        console.print(f"{', '.join(critics)} intervals: {how}", soft_wrap=True, markup=False)
    if result.online:
        online = Table(title=f"online, {result.online_env}")
        for column in ("policy", "episodes", "return (undiscounted)",
                       f"discounted return (γ={g})"):
            online.add_column(column, justify="left" if column == "policy" else "right")
        for mode, r in result.online.items():
            online.add_row(mode, str(len(r.returns)), f"{r.mean:.4g} ± {r.std:.3g}",
                           f"{r.discounted_mean:.4g} ± {r.discounted_std:.3g}")
        console.print(online)
    elif result.online_skipped:
        console.print(f"online: skipped ({result.online_skipped})", soft_wrap=True, markup=False)
    if result.evaluation_run_id is not None:
        console.print(f"recorded as evaluation run {result.evaluation_run_id} under training run "
                      f"{result.run_id} ({len(result.metrics())} metrics; γ = {g} in its tags)",
                      soft_wrap=True)
    return buffer.getvalue().rstrip()
