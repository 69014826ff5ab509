"""Checkpoints: save (atomically, CPU tensors, `weights_only`-loadable), resume, find the latest.

A checkpoint holds the policy and Adam state, the step and the config; every random stream of
training is rebuilt from the seed and the step (`training.batches.stream`), so
`train(..., resume=path)` continues an in-memory run bit for bit on CPU.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from offpg_offline.config import TrainConfig, as_params
from offpg_offline.policies import load_checkpoint


def save_checkpoint(
    path: Path,
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    config: TrainConfig,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Model and optimiser state, step and config, so `torch.load(path, weights_only=True)`
    reads it and `train(..., resume=path)` continues exactly; `extra` (the greedy-critic's
    critic and clone) under the key "extra". Written to a temporary name, then renamed.

    Raises:
        CheckpointError: the file could not be written (a full disk, a folder that vanished);
            one sentence naming the path, the temporary file removed, earlier checkpoints kept.
    """
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "spec": policy.spec(),  # type: ignore[operator]  # every policy class has spec()
                "state_dict": _to_cpu(policy.state_dict()),
                "optimizer": _to_cpu(optimizer.state_dict()),
                "step": step,
                "config": as_params(config),
                **({} if extra is None else {"extra": _to_cpu(dict(extra))}),
            },
            tmp,
        )
        tmp.replace(path)
    except (OSError, RuntimeError) as err:  # torch reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        raise CheckpointError(path, err) from err
    return path


class CheckpointError(ValueError):
    """A checkpoint could not be saved: names the file and what is kept."""

    def __init__(self, path: Path, err: BaseException) -> None:
        errno = getattr(err, "errno", None)
        reason = os.strerror(errno) if errno else "the write failed (is the disk full?)"
        kept = sorted(p.name for p in path.parent.glob("*.pt")) if path.parent.is_dir() else []
        where = (f"the earlier checkpoints ({', '.join(kept)}) are kept in {path.parent}" if kept
                 else "no earlier checkpoint was saved")
        super().__init__(f"cannot save checkpoint {path}: {reason}; {where}")


def _to_cpu(state: Any) -> Any:
    """A state dict with every tensor on the CPU (nested dicts and lists included)."""
    if isinstance(state, Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {key: _to_cpu(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_to_cpu(value) for value in state)
    return state


def load_resumable(path: Path, config: TrainConfig) -> dict[str, Any]:
    """A checkpoint to resume from; one clear sentence when it belongs to another config."""
    checkpoint = load_checkpoint(path, map_location="cpu")  # weights_only; refusals: one sentence
    saved = dict(checkpoint.get("config", {}))
    wanted = as_params(config)
    differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differ:
        raise ValueError(
            f"{path} was written with another configuration "
            f"(differs in: {', '.join(differ)}); resume needs the same one"
        )
    if int(checkpoint["step"]) >= config.steps:
        raise ValueError(f"{path} is at step {checkpoint['step']}: the run is already complete")
    return checkpoint


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint with the highest step in `out_dir` (final.pt counts as the last)."""
    found = sorted(out_dir.glob("step-*.pt"))
    if (out_dir / "final.pt").is_file():
        found.append(out_dir / "final.pt")
    return found[-1] if found else None


def on_cpu(policy: nn.Module) -> nn.Module:
    """The policy itself when it lives on the CPU, else a CPU copy (rollouts and OPE)."""
    if next(policy.parameters()).device.type == "cpu":
        return policy
    return copy.deepcopy(policy).cpu()
