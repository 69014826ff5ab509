"""Job configurations: frozen, validated when built, loaded from TOML, every field logged.

Only the standard library is imported here, so `offpg --help` does not load torch.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar


class EstimatorName(StrEnum):
    """The four surrogates of DESIGN.md §3; `estimators.ESTIMATORS` has one function per name."""

    TRAJECTORY = "trajectory"
    PER_DECISION = "per-decision"
    PAST_WEIGHT = "past-weight"
    PER_STEP = "per-step"


class Propensity(StrEnum):
    """Which column holds log π_β(a|s): the logging system's, or `offpg behavior fit`'s."""

    LOGGED = "logged"
    ESTIMATED = "estimated"


class ClipMode(StrEnum):
    """Where the weight cap c applies: to each ratio ρ_t, or to the cumulative product w_{1:t}."""

    STEP = "step"
    CUMULATIVE = "cumulative"


class Baseline(StrEnum):
    """What is subtracted from the return G_t: nothing, the batch mean, or a fitted value b(s_t)."""

    NONE = "none"
    CONSTANT = "constant"
    VALUE = "value"


class PolicyKind(StrEnum):
    """Target-policy family; `auto` picks categorical for Discrete, tanh-Gaussian for Box."""

    AUTO = "auto"
    CATEGORICAL = "categorical"
    GAUSSIAN = "gaussian"
    TANH_GAUSSIAN = "tanh-gaussian"
    TRUNCATED_GAUSSIAN = "truncated-gaussian"


class Init(StrEnum):
    """Starting point of π_θ: random weights, or behavior cloning on the training episodes."""

    RANDOM = "random"
    BC = "bc"


SELECT_ESTIMATORS = ("is", "wis", "pdis", "wpdis", "dr", "wdr", "fqe")  # = ope.ESTIMATE_NAMES


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything `offpg train` needs; each field is logged as an MLflow param."""

    estimator: EstimatorName = field(
        default=EstimatorName.PER_STEP,
        metadata={
            "help": "Surrogate of DESIGN.md §3 (default chosen by scripts/bench_quality.py)."
        },
    )
    propensity: Propensity = field(
        default=Propensity.LOGGED, metadata={"help": "Column giving log π_β(a|s)."}
    )
    gamma: float = field(default=0.99, metadata={"help": "Discount γ in [0, 1]."})
    steps: int = field(default=1000, metadata={"help": "Gradient steps."})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate."})
    batch_episodes: int = field(
        default=32,
        metadata={"help": "Whole episodes per batch (trajectory, per-decision, past-weight)."},
    )
    batch_steps: int = field(default=2048, metadata={"help": "Steps per batch (per-step)."})
    hidden: tuple[int, ...] = field(default=(64, 64), metadata={"help": "MLP hidden sizes."})
    policy: PolicyKind = field(default=PolicyKind.AUTO, metadata={"help": "Target-policy family."})
    clip: float | None = field(
        default=2.0, metadata={"help": "Cap c on importance weights (applied in log space)."}
    )
    clip_mode: ClipMode = field(
        default=ClipMode.STEP, metadata={"help": "Cap each ratio ρ_t, or the cumulative weight."}
    )
    self_normalize: bool = field(
        default=False, metadata={"help": "Weighted IS: divide by the batch mean weight."}
    )
    baseline: Baseline = field(
        default=Baseline.VALUE, metadata={"help": "Baseline b subtracted from G_t."}
    )
    standardize_returns: bool = field(
        default=False, metadata={"help": "Standardise returns G_t over the batch."}
    )
    kl_coef: float = field(
        default=2.0, metadata={"help": "Weight of the KL(π_θ‖π_β) penalty on logged states."}
    )
    ppo_epsilon: float | None = field(
        default=None, metadata={"help": "PPO-style clip of ρ_t to [1-ε, 1+ε] (per-step)."}
    )
    psis: bool = field(default=False, metadata={"help": "Pareto-smooth the importance weights."})
    init: Init = field(default=Init.BC, metadata={"help": "Start from random weights or BC."})
    bc_steps: int = field(
        default=300, metadata={"help": "Gradient steps of behavior cloning for --init bc."}
    )
    val_fraction: float = field(
        default=0.2, metadata={"help": "Fraction of episodes held out for validation."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for torch, the split and batch order."})
    threads: int = field(
        default=1, metadata={"help": "torch CPU threads (1 is fastest for small MLPs)."}
    )
    device: str = field(
        default="auto",
        metadata={"help": "auto (the GPU when CUDA is available), cpu or cuda."},
    )
    stream: bool = field(
        default=False,
        metadata={
            "help": "Stream the log from Parquet instead of loading it (always when the "
            "log exceeds memory_budget)."
        },
    )
    memory_budget: float = field(
        default=2.0,
        metadata={"help": "GB the in-memory trainer may use; larger logs are streamed."},
    )
    shuffle_buffer_episodes: int = field(
        default=1024,
        metadata={"help": "Episodes held in the streaming shuffle buffer."},
    )
    log_every: int = field(default=50, metadata={"help": "Log diagnostics every N steps."})
    checkpoint_every: int = field(
        default=0, metadata={"help": "Save a checkpoint every N steps (0: only at the end)."}
    )
    eval_every: int = field(
        default=0, metadata={"help": "Online evaluation every N steps (0: only at the end)."}
    )
    eval_episodes: int = field(
        default=10, metadata={"help": "Seeded episodes per online evaluation."}
    )
    select_by: str | None = field(
        default=None,
        metadata={
            "help": "Choose the checkpoint to ship by this OPE score on the validation "
            "split: is, wis, pdis, wpdis, dr, wdr or fqe, optionally + _ci_low or _lb."
        },
    )
    env: str | None = field(
        default=None,
        metadata={"help": "gymnasium env id for online evaluation (default: the card's)."},
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {self.gamma}")
        for name in (
            "steps",
            "lr",
            "batch_episodes",
            "batch_steps",
            "eval_episodes",
            "threads",
            "log_every",
            "memory_budget",
            "shuffle_buffer_episodes",
        ):
            _positive(name, getattr(self, name))
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be one of auto, cpu, cuda, got {self.device!r}")
        if self.clip is not None:
            _positive("clip", self.clip)
        if self.ppo_epsilon is not None and not 0.0 < self.ppo_epsilon < 1.0:
            raise ValueError(f"ppo_epsilon must lie in (0, 1), got {self.ppo_epsilon}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.checkpoint_every < 0 or self.eval_every < 0 or self.bc_steps < 0:
            raise ValueError("checkpoint_every, eval_every and bc_steps must be >= 0")
        if self.select_by is not None:
            name = self.select_by.removesuffix("_ci_low").removesuffix("_lb")
            if name not in SELECT_ESTIMATORS:
                raise ValueError(
                    f"select_by must be one of {', '.join(SELECT_ESTIMATORS)} "
                    f"(optionally with _ci_low or _lb), got {self.select_by!r}"
                )
            if self.val_fraction == 0:
                raise ValueError("select_by needs a validation split: set val_fraction > 0")
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise ValueError(
                f"hidden must be a non-empty list of positive sizes, got {self.hidden}"
            )


@dataclass(frozen=True, slots=True)
class TrackingConfig:
    """Where runs are recorded. `uri=None` means $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""

    uri: str | None = field(default=None, metadata={"help": "MLflow tracking URI."})
    experiment: str | None = field(
        default=None, metadata={"help": "Experiment name (default: the dataset's name)."}
    )
    run_name: str | None = field(
        default=None, metadata={"help": "Run name (default: estimator and key options)."}
    )


@dataclass(frozen=True, slots=True)
class RunConfig:
    """One TOML file: a [train] table and a [tracking] table."""

    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


C = TypeVar("C")

_ENUMS: Mapping[str, type[StrEnum]] = {
    "estimator": EstimatorName,
    "propensity": Propensity,
    "clip_mode": ClipMode,
    "baseline": Baseline,
    "policy": PolicyKind,
    "init": Init,
}


def coerce_field(name: str, value: Any) -> Any:
    """Turn a TOML/CLI value into the field's type (enum members, tuples); errors name the key."""
    if name in _ENUMS:
        enum = _ENUMS[name]
        try:
            return enum(value)
        except ValueError:
            choices = ", ".join(member.value for member in enum)
            raise ValueError(f"{name} must be one of {choices}, got {value!r}") from None
    if name == "hidden" and isinstance(value, list):
        return tuple(int(h) for h in value)
    return value


_PLAIN_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
}


def _check_type(name: str, annotation: str, value: Any) -> None:
    """A TOML value of a plain field (int, float, bool, str, or None when optional) has its type.

    Enum and tuple fields are checked by `coerce_field` and the dataclass itself.
    """
    parts = [part.strip() for part in annotation.split("|")]
    if not all(part in _PLAIN_TYPES or part == "None" for part in parts):
        return
    if value is None and "None" in parts:
        return
    for part in parts:
        numeric_bool = isinstance(value, bool) and part in ("int", "float")
        if part in _PLAIN_TYPES and isinstance(value, _PLAIN_TYPES[part]) and not numeric_bool:
            return
    wanted = " or ".join(
        "a number"
        if p == "float"
        else "an integer"
        if p == "int"
        else "true/false"
        if p == "bool"
        else "a string"
        for p in parts
        if p != "None"
    )
    raise ValueError(f"{name} must be {wanted}, got {value!r}")


def build(cls: type[C], table: str, raw: Mapping[str, Any]) -> C:
    """Build a config dataclass from a mapping; unknown keys are an error naming the table."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in [{table}]: {', '.join(unknown)}")
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key, value in raw.items():
        _check_type(key, types[key], value)
    values = {key: coerce_field(key, value) for key, value in raw.items()}
    try:
        return cls(**values)
    except TypeError as err:
        raise ValueError(f"bad value in [{table}]: {err}") from None


def load_config(path: Path) -> RunConfig:
    """Read a TOML file with optional [train] and [tracking] tables; unknown keys are errors."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ValueError(f"{path}: cannot read the config file ({reason})") from None
    return parse_config(text, source=str(path))


def parse_config(text: str, *, source: str) -> RunConfig:
    """`load_config` for TOML text; `source` names it in error messages."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{source}: not valid TOML ({err})") from None
    train = raw.pop("train", {})
    tracking = raw.pop("tracking", {})
    if raw:
        raise ValueError(f"{source}: unknown table(s): {', '.join(sorted(raw))}")
    return RunConfig(
        train=build(TrainConfig, "train", train),
        tracking=build(TrackingConfig, "tracking", tracking),
    )


def as_params(config: Any, prefix: str = "") -> dict[str, str | int | float | bool]:
    """Flatten a config dataclass into MLflow params (enums as values, None as 'none')."""
    params: dict[str, str | int | float | bool] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            params.update(as_params(value, prefix=f"{prefix}{f.name}."))
            continue
        if isinstance(value, StrEnum):
            value = value.value
        elif value is None:
            value = "none"
        elif isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        params[f"{prefix}{f.name}"] = value
    return params
