"""The config layer: lossless TOML round trip of every field, the one validation layer (types,
finite numbers, 64-bit integers, bounds) and the one text parser, each error naming the field."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from offpg_offline.config import (
    Baseline,
    ClipMode,
    ConfigError,
    DiscountWeighting,
    EstimatorName,
    Init,
    PolicyKind,
    Propensity,
    RunConfig,
    TrackingConfig,
    TrainConfig,
    check_output_folder,
    parse_config,
    parse_value,
    resolve_auto,
)
from offpg_offline.jobs.record import to_toml

# A value for every field, each different from its default, chosen by hand (awkward ones on
# purpose: the largest int64 seed, a float that needs 17 digits, a string needing escapes).
EVERY_TRAIN_FIELD = {
    "estimator": EstimatorName.PAST_WEIGHT,
    "propensity": Propensity.ESTIMATED,
    "gamma": 0.1 + 0.2,  # 0.30000000000000004: repr must keep all 17 digits
    "steps": 7,
    "lr": 3.5e-05,
    "batch_episodes": 5,
    "batch_steps": 96,
    "hidden": (3, 5, 7),
    "policy": PolicyKind.TRUNCATED_GAUSSIAN,
    "clip": 12.5,
    "clip_mode": ClipMode.CUMULATIVE,
    "self_normalize": True,
    "baseline": Baseline.CONSTANT,
    "standardize_returns": True,
    "kl_coef": 0.0,
    "ppo_epsilon": 0.25,
    "psis": True,
    "discount_weighting": DiscountWeighting.DISCOUNTED,
    "critic_lambda": 0.95,
    "init": Init.RANDOM,
    "bc_steps": 0,
    "val_fraction": 0.5,
    "seed": 2**63 - 1,
    "threads": 3,
    "device": "cpu",
    "stream": True,
    "memory_budget": 0.75,
    "shuffle_buffer_episodes": 9,
    "log_every": 11,
    "checkpoint_every": 13,
    "eval_every": 17,
    "eval_episodes": 19,
    "select_by": "wdr_lb",
    "env": 'Odd "name"\\with\ttab-and-π-v0',
    "verify": True,
    "allow_env_entry_point": True,
}
EVERY_TRACKING_FIELD = {
    "uri": "sqlite:////tmp/x y/mlflow.db",
    "experiment": "exp \"quoted\"\nline two",
    "run_name": "run-1",
}


def test_the_hand_values_cover_every_field_and_differ_from_the_defaults() -> None:
    for cls, values in ((TrainConfig, EVERY_TRAIN_FIELD), (TrackingConfig, EVERY_TRACKING_FIELD)):
        assert set(values) == {f.name for f in dataclasses.fields(cls)}, cls.__name__
        default = cls()
        assert all(getattr(default, key) != value for key, value in values.items())


def test_toml_round_trip_of_every_field() -> None:
    run = RunConfig(TrainConfig(**EVERY_TRAIN_FIELD), TrackingConfig(**EVERY_TRACKING_FIELD))
    assert parse_config(to_toml(run), source="test") == run


def test_toml_round_trip_of_none_values() -> None:
    # clip=None used to be left out of config.toml, so a re-run read clip = 2.0
    optional = {f.name for f in dataclasses.fields(TrainConfig)
                if "None" in str(f.type)}
    assert optional == {"estimator", "steps", "lr", "bc_steps", "clip", "ppo_epsilon",
                        "select_by", "env"}
    run = RunConfig(TrainConfig(**dict.fromkeys(optional)), TrackingConfig())
    back = parse_config(to_toml(run), source="test")
    assert back == run and back.train.clip is None and back.train.lr is None
    assert back.train.estimator is None and back.train.steps is None


def test_auto_lr_reads_auto_and_none_and_nowhere_else_is_auto_a_word() -> None:
    assert TrainConfig().lr is None  # auto: decided by the action space when training starts
    for word in ("auto", "AUTO", " none "):
        assert parse_value(TrainConfig, "lr", word) is None
    assert parse_config('[train]\nlr = "auto"\n', source="x").train.lr is None
    assert 'lr = "auto"' in to_toml(RunConfig()).splitlines()  # config.toml shows the word
    assert parse_config("[train]\nlr = 3e-4\n", source="x").train.lr == 3e-4
    with pytest.raises(ConfigError, match="clip 'auto' is not a valid float"):
        parse_value(TrainConfig, "clip", "auto")  # clip's None means "no cap", not auto
    with pytest.raises(ConfigError, match=r"lr must be positive, got 0\.0"):
        TrainConfig(lr=0.0)


def test_resolve_auto_sets_lr_by_action_space_and_keeps_an_explicit_one() -> None:
    # The values README's "The default configuration, and why" documents.
    assert resolve_auto(TrainConfig(), discrete_actions=True).lr == 1e-3
    assert resolve_auto(TrainConfig(), discrete_actions=False).lr == 2.5e-4  # greedy-critic
    per_step = TrainConfig(estimator=EstimatorName.PER_STEP)
    assert resolve_auto(per_step, discrete_actions=False).lr == 5e-4
    assert resolve_auto(TrainConfig(lr=0.02), discrete_actions=False).lr == 0.02
    resolved = resolve_auto(TrainConfig(kl_coef=3.0), discrete_actions=False)
    assert resolved == dataclasses.replace(
        TrainConfig(kl_coef=3.0), estimator=EstimatorName.GREEDY_CRITIC, lr=2.5e-4,
        steps=3000, bc_steps=20000)
    explicit = TrainConfig(steps=7, bc_steps=9)
    assert (resolve_auto(explicit, discrete_actions=False).steps,
            resolve_auto(explicit, discrete_actions=False).bc_steps) == (7, 9)


def test_auto_estimator_is_per_step_without_a_clone() -> None:
    # greedy-critic's KL anchor is the behavior-cloned start: with --init random, auto picks
    # per-step (and its settings) on continuous actions; an explicit choice is kept.
    random_start = resolve_auto(TrainConfig(init=Init.RANDOM), discrete_actions=False)
    assert (random_start.estimator, random_start.lr, random_start.steps) == (
        EstimatorName.PER_STEP, 5e-4, 1000)
    chosen = TrainConfig(init=Init.RANDOM, estimator=EstimatorName.GREEDY_CRITIC)
    assert resolve_auto(chosen, discrete_actions=False).estimator is EstimatorName.GREEDY_CRITIC


def test_toml_written_for_none_is_the_word_none() -> None:
    text = to_toml(RunConfig(TrainConfig(clip=None)))
    assert 'clip = "none"' in text.splitlines()
    assert parse_config('[train]\nclip = "NONE"\n', source="x").train.clip is None


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("kl_coef", math.nan, "kl_coef must be a finite number, got nan"),
        ("lr", math.inf, "lr must be a finite number, got inf"),
        ("gamma", -math.inf, "gamma must be a finite number"),
        ("memory_budget", math.nan, "memory_budget must be a finite number"),
        ("seed", 2**63, "seed must fit in a signed 64-bit integer"),
        ("seed", -1, "seed must be >= 0, got -1"),
        ("steps", 10**30, "steps must fit in a signed 64-bit integer"),
        ("hidden", (64, 10**9), "hidden sizes must lie in (0, 65536], got 1000000000"),
        ("hidden", (), "hidden must be a list of 1 to 64 sizes"),
        ("hidden", (0,), "hidden sizes must lie in (0, 65536], got 0"),
        ("batch_steps", 2**31, "batch_steps must lie in (0, 2147483648), got 2147483648"),
        ("threads", 10**6, "threads must lie in (0, 4096]"),
        ("gamma", 1.5, "gamma must lie in [0, 1], got 1.5"),
        ("ppo_epsilon", 1.0, "ppo_epsilon must lie in (0, 1), got 1.0"),
        ("clip", 0.0, "clip must be positive, got 0.0"),
        ("val_fraction", 1.0, "val_fraction must lie in [0, 1), got 1.0"),
        ("steps", True, "steps must be an integer, got True"),
        ("lr", "0.1", "lr must be a number, got '0.1'"),
        ("device", "tpu", "device must be one of auto, cpu, cuda, got 'tpu'"),
        ("estimator", "magic", "estimator must be one of trajectory, per-decision"),
    ],
)
def test_validation_names_the_field(key: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TrainConfig(**{key: value})
    assert caught.value.key == key
    assert words in str(caught.value)
    assert caught.value.as_option().startswith("--" + key.replace("_", "-") + " ")


def test_toml_values_go_through_the_same_validation() -> None:
    with pytest.raises(ValueError, match=r"^x\.toml: \[train\] kl_coef must be a finite number"):
        parse_config("[train]\nkl_coef = nan\n", source="x.toml")
    with pytest.raises(ValueError, match=r"\[train\] seed must fit in a signed 64-bit"):
        parse_config("[train]\nseed = 18446744073709551616\n", source="x")  # 2**64
    with pytest.raises(ValueError, match=r"\[tracking\] experiment must be a string, got 3"):
        parse_config("[tracking]\nexperiment = 3\n", source="x")


@pytest.mark.parametrize(
    ("key", "text", "value"),
    [
        ("clip", "none", None),
        ("clip", "None", None),
        ("clip", "3", 3.0),
        ("ppo_epsilon", "0.2", 0.2),
        ("hidden", "32x32", (32, 32)),
        ("hidden", "64,64,8", (64, 64, 8)),
        ("self_normalize", "yes", True),
        ("psis", "false", False),
        ("seed", "12", 12),
        ("estimator", "per-decision", EstimatorName.PER_DECISION),
        ("select_by", "none", None),
        ("kl_coef", "nan", "nan"),  # parsed; refused by validation, not by the parser
    ],
)
def test_parse_value_reads_command_line_text(key: str, text: str, value: object) -> None:
    parsed = parse_value(TrainConfig, key, text)
    if value == "nan":
        assert math.isnan(parsed)
    else:
        assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(
    ("key", "text", "words"),
    [
        ("gamma", "none", "gamma 'none' is not a valid float"),  # not optional
        ("lr", "fast", "lr 'fast' is not a valid float"),
        ("steps", "1.5", "steps '1.5' is not a valid integer"),
        ("hidden", "big", "hidden 'big' is not a valid list of sizes"),
        ("psis", "maybe", "psis 'maybe' is not a valid true/false"),
        ("clip_mode", "sometimes", "clip_mode must be one of step, cumulative, got 'sometimes'"),
    ],
)
def test_parse_value_errors_name_the_field(key: str, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_value(TrainConfig, key, text)
    assert str(caught.value).startswith(words)


def test_output_folder_checks(tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=r"^--out-dir .*file\.txt is a file, not a folder$"):
        check_output_folder(a_file, "--out-dir")
    with pytest.raises(ValueError, match=r"cannot be created: .*file\.txt is a file$"):
        check_output_folder(a_file / "sub" / "dir", "--out-dir")
    check_output_folder(tmp_path / "new" / "nested", "--out-dir")  # creatable: fine
    check_output_folder(tmp_path, "--out-dir")
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_behavior_models_listed_in_the_config_are_the_models_package_kinds() -> None:
    from offpg_offline.behavior.fit import FitConfig as ReExported
    from offpg_offline.behavior.models import MODEL_KINDS
    from offpg_offline.config import BEHAVIOR_MODELS, FitConfig

    assert BEHAVIOR_MODELS == MODEL_KINDS
    assert ReExported is FitConfig


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("folds", 0, "folds must be positive, got 0"),
        ("model", "forest", "model must be one of auto, categorical"),
        ("floor", math.nan, "floor must be a finite number, got nan"),
        ("stop_fraction", 1.0, "stop_fraction must lie in (0, 1), got 1.0"),
        ("hidden", (2**20,), "hidden sizes must lie in (0, 65536]"),
        ("activation", "gelu", "activation must be one of auto, relu, tanh, got 'gelu'"),
    ],
)
def test_fit_config_uses_the_same_validation(key: str, value: object, words: str) -> None:
    from offpg_offline.config import FitConfig

    with pytest.raises(ConfigError, match=None) as caught:
        FitConfig(**{key: value})
    assert words in str(caught.value)


@dataclasses.dataclass(frozen=True)
class _ListConfig:
    """A job config with a list-of-strings field (as evaluate's estimator subset)."""

    names: tuple[str, ...] = dataclasses.field(
        default=("is", "wis"), metadata={"help": "h", "choices": ("is", "wis", "dr")})
    level: float | None = dataclasses.field(default=None, metadata={"help": "h", "gt": 0.0,
                                                                     "lt": 1.0})

    def __post_init__(self) -> None:
        from offpg_offline.config import validate

        validate(self)


def test_list_of_string_fields_parse_validate_and_name_the_item() -> None:
    assert parse_value(_ListConfig, "names", "dr, is") == ("dr", "is")
    with pytest.raises(ConfigError, match=r"^names items must be one of is, wis, dr, got 'x'$"):
        _ListConfig(names=("is", "x"))
    with pytest.raises(ConfigError, match=r"^level must lie in \(0, 1\), got 1.5$"):
        _ListConfig(level=1.5)
    from offpg_offline.config import coerce_value

    assert coerce_value(_ListConfig, "names", ["dr"]) == ("dr",)
    with pytest.raises(ConfigError, match="names must be a list of strings, got"):
        coerce_value(_ListConfig, "names", [1])
