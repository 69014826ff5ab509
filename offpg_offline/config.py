"""Job configurations: frozen, validated when built, loaded from TOML, every field logged.

Each field is declared with `option(default, help, bounds...)`: the help text and bounds live
beside the field, and the CLI generates its options from them (`cli_options.config_options`).
`validate` is the one validation layer (types, finite floats, 64-bit ints, bounds; errors are
`ConfigError`s naming the field), run by every config's `__post_init__`, so the CLI, TOML files
and the Python API are checked alike before any work starts. `parse_value` is the one parser of
command-line text, `coerce_value` reads TOML values. See docs/design.md.

Only the standard library is imported here, so `offpg --help` does not load torch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar


class EstimatorName(StrEnum):
    """The surrogates of docs/design.md; `estimators.ESTIMATORS` has one spec per name."""

    TRAJECTORY = "trajectory"
    PER_DECISION = "per-decision"
    PAST_WEIGHT = "past-weight"
    PER_STEP = "per-step"
    CRITIC = "critic"
    GREEDY_CRITIC = "greedy-critic"


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


class DiscountWeighting(StrEnum):
    """Whether step t's gradient term carries γ^t (the unbiased discounted gradient) or not."""

    AUTO = "auto"
    DISCOUNTED = "discounted"
    UNDISCOUNTED = "undiscounted"


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


INT64 = 2**63  # every integer option fits a signed 64-bit integer (torch, numpy, Arrow)


def option(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    none: str | None = None,
) -> Any:
    """A config field: its default, its help text and the bounds `validate` checks.

    The CLI option (`--name-with-dashes`, or `flag`) is generated from this field; bounds on a
    `tuple[int, ...]` field apply to each item. `none` names what None means for an optional
    field (e.g. "auto"): that word is shown as its default and read as None besides `none`.
    """
    checks = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "flag": flag,
              "none": none}
    metadata = {"help": help, **{k: v for k, v in checks.items() if v is not None}}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything `offpg train` needs; each field is logged as an MLflow param."""

    estimator: EstimatorName | None = option(
        None,
        "Surrogate of docs/design.md; auto (chosen from the log's action space by "
        "scripts/bench_quality.py): per-step for discrete actions, greedy-critic for "
        "continuous ones (per-step with --init random).",
        none="auto",
    )
    propensity: Propensity = option(Propensity.LOGGED, "Column giving log π_β(a|s).")
    gamma: float = option(0.99, "Discount γ in [0, 1].", ge=0.0, le=1.0)
    steps: int | None = option(
        None, "Gradient steps; auto: 3000 for greedy-critic, else 1000.", gt=0, none="auto"
    )
    lr: float | None = option(
        None, "Adam learning rate of the policy-gradient steps; auto: 2.5e-4 for greedy-critic, "
        "else 1e-3 for discrete actions and 5e-4 for continuous ones (scripts/bench_quality.py: "
        "5e-4 scored higher on every continuous log, but left cartpole-weak's greedy policy at "
        "496 instead of 500).",
        gt=0.0, none="auto",
    )
    batch_episodes: int = option(
        32, "Whole episodes per batch (trajectory, per-decision, past-weight).", gt=0, lt=2**31
    )
    batch_steps: int = option(2048, "Steps per batch (per-step, critic).", gt=0, lt=2**31)
    hidden: tuple[int, ...] = option(
        (64, 64), "MLP hidden sizes, e.g. 64,64 (each at most 65536).", gt=0, le=65536
    )
    policy: PolicyKind = option(PolicyKind.AUTO, "Target-policy family.")
    clip: float | None = option(
        2.0, "Cap c on importance weights (applied in log space); none: no cap.", gt=0.0
    )
    clip_mode: ClipMode = option(ClipMode.STEP, "Cap each ratio ρ_t, or the cumulative weight.")
    self_normalize: bool = option(False, "Weighted IS: divide by the batch mean weight.")
    baseline: Baseline = option(Baseline.VALUE, "Baseline b subtracted from G_t.")
    standardize_returns: bool = option(False, "Standardise returns G_t over the batch.")
    kl_coef: float = option(
        2.0, "Weight of the KL(π_θ‖π_β) penalty on logged states (greedy-critic: KL(π_θ‖π_c) in "
        "closed form to the behavior-cloned start π_c).", ge=0.0)
    ppo_epsilon: float | None = option(
        None, "PPO-style clip of ρ_t to [1-ε, 1+ε] (per-step); none: off.", gt=0.0, lt=1.0
    )
    psis: bool = option(False, "Pareto-smooth the importance weights.")
    discount_weighting: DiscountWeighting = option(
        DiscountWeighting.AUTO,
        "γ^t on step t's gradient term (step estimators per-step, critic): discounted (the "
        "unbiased gradient of the discounted return) or undiscounted (drop γ^t, as most "
        "deep-RL code); auto: undiscounted for step estimators, discounted for the others "
        "(which refuse undiscounted; greedy-critic refuses discounted).",
    )
    critic_lambda: float = option(
        0.0,
        "GAE λ of the critic estimator's advantage: 0 = one-step r + γV̂(s') − V̂(s), 1 = the "
        "Monte-Carlo G_t − V̂(s) of per-step (other estimators refuse a value other than 0).",
        ge=0.0, le=1.0,
    )
    init: Init = option(Init.BC, "Start from random weights or BC.")
    bc_steps: int | None = option(
        None, "Gradient steps of behavior cloning for --init bc (batch 1024, lr 1e-3); auto: "
        "20000 for greedy-critic (its KL anchor is the clone: 5000 left a lander-clipped seed "
        "at 268), else 5000 (300 left the clone's most likely action off the logger's on "
        "lander-eps, and its mean off the controller's on pendulum-gauss: "
        "scripts/bench_quality.py).", ge=0, none="auto"
    )
    val_fraction: float = option(
        0.2, "Fraction of episodes held out for validation.", ge=0.0, lt=1.0
    )
    seed: int = option(0, "Seed for torch, the split and batch order.", ge=0)
    threads: int = option(1, "torch CPU threads (1 is fastest for small MLPs).", gt=0, le=4096)
    device: str = option(
        "auto", "auto (the GPU when CUDA is available), cpu or cuda.",
        choices=("auto", "cpu", "cuda"),
    )
    stream: bool = option(
        False,
        "Stream the log from Parquet instead of loading it (always when the log exceeds "
        "memory_budget).",
    )
    memory_budget: float = option(
        2.0, "GB the in-memory trainer may use; larger logs are streamed.", gt=0.0
    )
    shuffle_buffer_episodes: int = option(
        1024, "Episodes held in the streaming shuffle buffer.", gt=0, lt=2**31
    )
    log_every: int = option(50, "Log diagnostics every N steps.", gt=0)
    checkpoint_every: int = option(
        0, "Save a checkpoint every N steps (0: only at the end).", ge=0
    )
    eval_every: int = option(0, "Online evaluation every N steps (0: only at the end).", ge=0)
    eval_episodes: int = option(10, "Seeded episodes per online evaluation.", gt=0, le=10**6)
    select_by: str | None = option(
        None,
        "Choose the checkpoint to ship by this OPE score on the validation split: is, wis, "
        "pdis, wpdis, dr, wdr or fqe, optionally + _ci_low or _lb; none: the final one.",
    )
    env: str | None = option(
        None, "gymnasium env id for online evaluation (default: the card's)."
    )
    verify: bool = option(
        False, "Recompute every shard's sha256 against the dataset card before training."
    )
    allow_env_entry_point: bool = option(
        False,
        "Trust an env entry point (module:Class) named by the dataset card: gymnasium imports "
        "that code.",
    )

    def __post_init__(self) -> None:
        validate(self)
        if self.select_by is not None:
            name = self.select_by.removesuffix("_ci_low").removesuffix("_lb")
            if name not in SELECT_ESTIMATORS:
                raise ConfigError(
                    "select_by",
                    f"must be one of {', '.join(SELECT_ESTIMATORS)} "
                    f"(optionally with _ci_low or _lb), got {self.select_by!r}",
                )
            if self.val_fraction == 0:
                raise ConfigError(
                    "select_by", "needs a validation split: set val_fraction > 0"
                )


AUTO_ESTIMATOR = {"discrete": EstimatorName.PER_STEP, "continuous": EstimatorName.GREEDY_CRITIC}
"""`TrainConfig.estimator` when it is auto, by the log's action space (scripts/bench_quality.py)."""
AUTO_LR = {"discrete": 1e-3, "continuous": 5e-4, EstimatorName.GREEDY_CRITIC: 2.5e-4}
"""`TrainConfig.lr` when it is auto: the estimator's entry, else the action space's."""
AUTO_STEPS = {EstimatorName.GREEDY_CRITIC: 3000}
"""`TrainConfig.steps` when it is auto: the estimator's entry, else `DEFAULT_STEPS`."""
AUTO_BC_STEPS = {EstimatorName.GREEDY_CRITIC: 20000}
"""`TrainConfig.bc_steps` when it is auto: the estimator's entry, else `DEFAULT_BC_STEPS`."""
DEFAULT_STEPS, DEFAULT_BC_STEPS = 1000, 5000


def resolve_auto(config: TrainConfig, *, discrete_actions: bool) -> TrainConfig:
    """`config` with its auto fields decided by the log's action space: the estimator
    (`AUTO_ESTIMATOR`; per-step with `init=random`, greedy-critic's KL anchor being the clone),
    then `lr`, `steps` and `bc_steps` by that estimator (`AUTO_LR`,
    `AUTO_STEPS`, `AUTO_BC_STEPS`). Idempotent.

    `train` calls it before anything is recorded (and `offpg train` before its run is named),
    so a run's params, checkpoints and summary carry the values used, never "auto"."""
    space = "discrete" if discrete_actions else "continuous"
    estimator = config.estimator or AUTO_ESTIMATOR[space]
    if config.estimator is None and config.init is not Init.BC:  # its anchor is the clone
        estimator = EstimatorName.PER_STEP
    return dataclasses.replace(
        config,
        estimator=estimator,
        lr=config.lr if config.lr is not None else AUTO_LR.get(estimator, AUTO_LR[space]),
        steps=config.steps if config.steps is not None else AUTO_STEPS.get(estimator,
                                                                           DEFAULT_STEPS),
        bc_steps=(config.bc_steps if config.bc_steps is not None
                  else AUTO_BC_STEPS.get(estimator, DEFAULT_BC_STEPS)),
    )


@dataclass(frozen=True, slots=True)
class TrackingConfig:
    """Where runs are recorded. `uri=None` means $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""

    uri: str | None = option(
        None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).",
        flag="--tracking-uri",
    )
    experiment: str | None = option(None, "Experiment name (default: the dataset's name).")
    run_name: str | None = option(None, "Run name (default: estimator and key options).")

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True, slots=True)
class RunConfig:
    """One TOML file: a [train] table and a [tracking] table."""

    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


BEHAVIOR_MODELS = (
    "auto", "categorical", "gaussian", "tanh-gaussian", "truncated-gaussian", "mixture",
    "tanh-mixture", "truncated-mixture",
)  # = behavior.models.MODEL_KINDS (tested)


@dataclass(frozen=True, slots=True)
class FitConfig:
    """How `offpg behavior fit` estimates π_β. Every field is recorded in the card and the run."""

    model: str = option(
        "auto",
        "Behavior model; auto: categorical for discrete actions, truncated-mixture for bounded "
        "Box actions, mixture for unbounded ones.",
        choices=BEHAVIOR_MODELS,
    )
    components: int = option(3, "K Gaussians of the mixture models.", gt=0, le=1024)
    hidden: tuple[int, ...] = option(
        (64, 64), "MLP hidden sizes, e.g. 64,64 (each at most 65536).", gt=0, le=65536
    )
    activation: str = option(
        "auto", "MLP activation: relu, tanh, or auto (tanh for discrete actions, relu for "
        "continuous ones).", choices=("auto", "relu", "tanh"),
    )
    folds: int = option(5, "Cross-fitting folds by episode (1: in-sample).", gt=0)
    steps: int = option(4000, "Maximum gradient steps per model.", gt=0)
    epochs: float | None = option(
        None, "Maximum passes over each model's training rows (overrides steps).", gt=0.0
    )
    batch_size: int = option(512, "Rows per gradient step.", gt=0, lt=2**31)
    lr: float = option(3e-3, "Adam learning rate.", gt=0.0)
    eval_every: int = option(100, "Steps between early-stopping checks.", gt=0)
    patience: int = option(5, "Checks without improvement before stopping.", gt=0)
    stop_fraction: float = option(
        0.1, "Fraction of each model's episodes held out for stopping.", gt=0.0, lt=1.0
    )
    floor: float = option(
        1e-3, "Minimum π̂_β(a|s): a probability (discrete) or density (continuous).", gt=0.0
    )
    seed: int = option(0, "Seed of the folds, initialisation and batches.", ge=0)
    ece_bins: int = option(10, "Bins of the calibration error.", gt=0, le=10**6)

    def __post_init__(self) -> None:
        validate(self)

    def as_params(self) -> dict[str, str | int | float | bool]:
        """Fields as MLflow params (`behavior.` prefix; tuples comma-joined, None as 'none')."""
        params: dict[str, str | int | float | bool] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            params[f"behavior.{f.name}"] = "none" if value is None else value
        return params


C = TypeVar("C")


class ConfigError(ValueError):
    """A config value of the wrong type or out of range.

    `str(err)` is the sentence with the field name (`kl_coef must be ...`); `as_option()` the
    same sentence naming the command-line option (`--kl-coef must be ...`).
    """

    def __init__(self, key: str, problem: str, *, flag: str | None = None) -> None:
        super().__init__(f"{key} {problem}")
        self.key, self.problem = key, problem
        self.flag = flag or "--" + key.replace("_", "-")

    def as_option(self) -> str:
        """The message naming the command-line option instead of the field."""
        return f"{self.flag} {self.problem}"


def flag_of(cls: type, key: str) -> str:
    """The command-line option of field `key` of config class `cls` (e.g. `--kl-coef`)."""
    metadata = cls.__dataclass_fields__[key].metadata  # type: ignore[attr-defined]
    return str(metadata.get("flag") or "--" + key.replace("_", "-"))


@functools.cache
def field_types(cls: type) -> dict[str, tuple[type, bool, bool]]:
    """Per field: (base type, optional, tuple-of-base) from its annotation."""
    shapes = {}
    for key, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) in (types.UnionType, typing.Union) and (
            type(None) in args
        )
        if optional:
            hint = next(a for a in args if a is not type(None))
        is_tuple = typing.get_origin(hint) is tuple
        shapes[key] = (typing.get_args(hint)[0] if is_tuple else hint, optional, is_tuple)
    return shapes


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _bounds_problem(meta: Mapping[str, Any], value: float) -> str | None:
    """The sentence end when `value` breaks the field's bounds, else None."""
    low = ("ge", meta["ge"]) if "ge" in meta else ("gt", meta["gt"]) if "gt" in meta else None
    high = ("le", meta["le"]) if "le" in meta else ("lt", meta["lt"]) if "lt" in meta else None
    ok_low = low is None or (value >= low[1] if low[0] == "ge" else value > low[1])
    ok_high = high is None or (value <= high[1] if high[0] == "le" else value < high[1])
    if ok_low and ok_high:
        return None
    if low and high:
        left, right = "[" if low[0] == "ge" else "(", "]" if high[0] == "le" else ")"
        return f"must lie in {left}{_number(low[1])}, {_number(high[1])}{right}, got {value}"
    if low:
        if low == ("gt", 0) or low == ("gt", 0.0):
            return f"must be positive, got {value}"
        sign = ">=" if low[0] == "ge" else ">"
        return f"must be {sign} {_number(low[1])}, got {value}"
    assert high is not None
    return f"must be {'at most' if high[0] == 'le' else 'below'} {_number(high[1])}, got {value}"


def _type_problem(base: type, value: Any) -> str | None:
    """Why `value` is not of type `base` (enum member, bool, int, number, str), or None."""
    if isinstance(base, type) and issubclass(base, StrEnum):
        if value in base.__members__.values():
            return None
        return f"must be one of {', '.join(m.value for m in base)}, got {_shown(value)}"
    if base is bool:
        return None if isinstance(value, bool) else f"must be true/false, got {_shown(value)}"
    if base is str:
        return None if isinstance(value, str) else f"must be a string, got {_shown(value)}"
    wanted = (int,) if base is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, wanted):
        return f"must be {'an integer' if base is int else 'a number'}, got {_shown(value)}"
    return None


def _scalar_problem(base: type, value: Any, meta: Mapping[str, Any]) -> str | None:
    """Type, finiteness, 64-bit fit, choices and bounds of one value; None when it is fine."""
    problem = _type_problem(base, value)
    if problem or base is bool or (isinstance(base, type) and issubclass(base, StrEnum)):
        return problem
    if base is str:
        choices = meta.get("choices")
        if choices and value not in choices:
            return f"must be one of {', '.join(choices)}, got {_shown(value)}"
        return None
    if base is int and not -INT64 <= value < INT64:
        return f"must fit in a signed 64-bit integer (below 2**63), got {_shown(value)}"
    if base is float and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    return _bounds_problem(meta, value)


def validate(config: Any) -> None:
    """The one validation layer of every config dataclass, run when it is built.

    Each field's value must have its annotated type (enum member, bool, 64-bit int, finite
    float, str among `choices`) and lie within the `ge`/`gt`/`le`/`lt` bounds of its metadata
    (per item for tuple fields); a `ConfigError` names the first field that does not.
    """
    shapes = field_types(type(config))
    for f in dataclasses.fields(config):
        base, optional, is_tuple = shapes[f.name]
        value = getattr(config, f.name)
        flag = f.metadata.get("flag")
        if value is None:
            if optional:
                continue
            raise ConfigError(f.name, "must be set, got none", flag=flag)
        if is_tuple:
            items = "sizes" if base is int else "items"
            if not isinstance(value, tuple) or not 1 <= len(value) <= 64:
                raise ConfigError(
                    f.name, f"must be a list of 1 to 64 {items}, got {_shown(value)}", flag=flag
                )
            for item in value:
                problem = _scalar_problem(base, item, f.metadata)
                if problem:
                    raise ConfigError(f.name, f"{items} {problem}", flag=flag)
            continue
        problem = _scalar_problem(base, value, f.metadata)
        if problem:
            raise ConfigError(f.name, problem, flag=flag)


def _none_word(value: Any, cls: type, key: str) -> bool:
    """`value` is the word for None of field `key`: `none`, or the field's own (e.g. `auto`)."""
    if not isinstance(value, str):
        return False
    own = cls.__dataclass_fields__[key].metadata.get("none")  # type: ignore[attr-defined]
    return value.strip().lower() in ("none", own)


def coerce_value(cls: type, key: str, value: Any) -> Any:
    """A TOML value (or parsed text) of field `key` as the field's type.

    Enum names become members, lists of ints tuples, ints floats where a float is wanted, and
    the string "none" None for optional fields (TOML has no null). Type errors name the key.
    """
    base, optional, is_tuple = field_types(cls)[key]
    flag = cls.__dataclass_fields__[key].metadata.get("flag")  # type: ignore[attr-defined]
    if optional and (value is None or _none_word(value, cls, key)):
        return None
    if is_tuple:
        if not isinstance(value, list | tuple) or any(_type_problem(base, v) for v in value):
            kind = "integers" if base is int else "strings" if base is str else base.__name__
            raise ConfigError(key, f"must be a list of {kind}, got {_shown(value)}", flag=flag)
        return tuple(value)
    if isinstance(base, type) and issubclass(base, StrEnum) and isinstance(value, str):
        try:
            return base(value)
        except ValueError:
            pass  # validate() names the choices
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    problem = _type_problem(base, value)
    if problem:
        raise ConfigError(key, problem, flag=flag)
    return value


_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def parse_value(cls: type, key: str, text: str) -> Any:
    """Command-line text of field `key` (an option, `--grid`, `--set`) as the field's type.

    The single text parser: `none` is None for optional fields, sizes read `64,64` or `64x64`,
    lists of strings `a,b`, booleans true/false/yes/no/1/0; range checks are left to `validate`.
    """
    base, optional, is_tuple = field_types(cls)[key]
    flag = cls.__dataclass_fields__[key].metadata.get("flag")  # type: ignore[attr-defined]
    if optional and _none_word(text, cls, key):
        return None
    try:
        if is_tuple and base is int:
            return tuple(int(size) for size in text.replace("x", ",").split(","))
        if is_tuple:  # a list of strings: comma-separated
            return tuple(item.strip() for item in text.split(",") if item.strip())
        if base is bool:
            return _WORDS[text.strip().lower()]
        if base is int:
            return int(text)
        if base is float:
            return float(text)
    except (ValueError, KeyError):
        kind = {int: "integer", float: "float", bool: "true/false"}.get(base, "list of sizes")
        raise ConfigError(
            key, f"{_shown(text)} is not a valid {'list of sizes' if is_tuple else kind}",
            flag=flag,
        ) from None
    return coerce_value(cls, key, text)


def build(cls: type[C], table: str, raw: Mapping[str, Any]) -> C:
    """Build a config dataclass from a mapping; unknown keys are an error naming the table."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in [{table}]: {', '.join(unknown)}")
    values = {key: coerce_value(cls, key, value) for key, value in raw.items()}
    return cls(**values)


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
    for table, values in (("train", train), ("tracking", tracking)):
        if not isinstance(values, dict):
            raise ValueError(f"{source}: [{table}] must be a table of settings")
    try:
        return RunConfig(
            train=build(TrainConfig, "train", train),
            tracking=build(TrackingConfig, "tracking", tracking),
        )
    except ConfigError as err:
        table = "train" if err.key in TrainConfig.__dataclass_fields__ else "tracking"
        raise ValueError(f"{source}: [{table}] {err}") from None
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def check_output_folder(path: Path, option: str) -> None:
    """Refuse, before any work, an output folder that is a file or cannot be written.

    An existing folder must be writable; a new one must lie under a writable folder.
    """
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == path:
            raise ValueError(f"{option} {path} is not writable")
        raise ValueError(f"{option} {path} cannot be created: {existing} is not writable")


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


_CHECKPOINT_CHOICES = "shipped, final, selected or step-N"


@dataclass(frozen=True, slots=True)
class EvaluateConfig:
    """What `offpg evaluate` computes (the target, dataset and output format are arguments);
    docs/design.md, "Evaluation". Each field is logged as a param of the evaluation run."""

    estimators: tuple[str, ...] = option(
        SELECT_ESTIMATORS, "OPE estimators, a subset of is,wis,pdis,wpdis,dr,wdr,fqe.",
        choices=SELECT_ESTIMATORS,
    )
    gamma: float | None = option(
        None, "Discount γ of OPE and of the discounted online return (default: the run's, "
        "else 0.99).", ge=0.0, le=1.0,
    )
    propensity: Propensity | None = option(
        None, "Column holding log π_β (default: the run's)."
    )
    checkpoint: str = option(
        "shipped", "Which checkpoint of a run or folder: shipped (selected.pt when selection "
        "ran, else final.pt), final, selected or step-N.",
    )
    split: str | None = option(
        None, "validation: the episodes the run held out (the ids it recorded); all: every "
        "episode (default: validation, or all with --dataset).", choices=("validation", "all"),
    )
    n_boot: int = option(1000, "Bootstrap resamples over episodes.", ge=2)
    level: float = option(0.95, "Coverage of the bootstrap interval.", gt=0.0, lt=1.0)
    delta: float = option(0.05, "HCOPE bounds hold w.p. ≥ 1 − delta.", gt=0.0, lt=1.0)
    fqe_iterations: int | None = option(
        None, "FQE Bellman backups (default: FQEConfig's).", ge=1
    )
    critic_interval: str = option(
        "refit", "Interval of dr, wdr, fqe: refit (the critic refitted on each resample) or "
        "fixed (fast: the critic held fixed, too narrow when its error matters).",
        choices=("refit", "fixed"),
    )
    n_refit: int | None = option(
        None, "Critics refitted for the refit interval, each warm-started from the full-data "
        "critic (default: min(n_boot, 50)).", ge=2,
    )
    seed: int = option(0, "Seed of the bootstrap, critic and rollouts.")
    online: int = option(
        0, "Also roll out N seeded episodes when the env can be built (0: none).", ge=0
    )
    env: str | None = option(None, "gymnasium env id (default: the card's env spec).")

    def __post_init__(self) -> None:
        validate(self)
        step = self.checkpoint.removeprefix("step-")
        if self.checkpoint not in ("shipped", "final", "selected") and not (
            self.checkpoint.startswith("step-") and step.isdigit()
        ):
            raise ConfigError("checkpoint", f"must be {_CHECKPOINT_CHOICES}, got "
                              f"{self.checkpoint!r}")
