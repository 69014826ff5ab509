"""A corpus of malformed inputs run through the real CLI: exit 2, one sentence, nothing written.

Every case builds its input in a fresh temporary folder (small generated files, no committed
binaries) and runs one `offpg` command through Typer's CliRunner in that folder. Each must:
- exit with code 2 (a user error, not a crash),
- print exactly one line, `error: <one sentence>`, that names the culprit (the asserted words:
  file, column, row, option or key),
- print no traceback,
- leave the folder exactly as it was: no output dataset, no `*.tmp-<pid>` folder, no runs/.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from offpg_offline.cli import app
from offpg_offline.data.store import card_path

ROOT = Path(__file__).resolve().parents[2]
WEAK = ROOT / "datasets" / "cartpole-weak"


def _log(rows_per_episode: tuple[int, ...] = (3, 4, 2), *, seed: int = 0) -> dict[str, np.ndarray]:
    """A valid foreign log: episode ids, scalar obs columns, int actions, probabilities."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(rows_per_episode)
    n = int(lengths.sum())
    episode = np.repeat(np.arange(len(lengths)) + 100, lengths)
    return {
        "episode": episode,
        "step": np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths),
        "x0": rng.normal(size=n),
        "x1": rng.normal(size=n),
        "action": rng.integers(0, 2, n),
        "reward": rng.normal(size=n),
        "done": np.r_[episode[1:] != episode[:-1], True],
        "p": rng.uniform(0.2, 0.9, n),
    }


MAPPING = ["--map", "episode_id=episode", "--map", "done=done", "--obs-cols", "x*",
           "--propensity-col", "p", "--propensity-kind", "prob", "--quiet"]


def _parquet(tmp: Path, **changes: object) -> Path:
    log: dict[str, object] = dict(_log())
    for key, value in changes.items():
        if value is None:
            log.pop(key)
        else:
            log[key] = value
    path = tmp / "log.parquet"
    pl.DataFrame(log).write_parquet(path)
    return path


def _with(column: str, row: int, value: object) -> dict[str, object]:
    values = _log()[column].astype(object if isinstance(value, str) else float).copy()
    values[row] = value
    return {column: values.tolist() if isinstance(value, str) else values}


def _ingest(path: Path, *extra: str) -> list[str]:
    return ["ingest", "parquet", str(path), "--out", "ds", *MAPPING, *extra]


@dataclass(frozen=True)
class Case:
    """One malformed input: how to build it in `tmp` (returns argv) and the words to expect."""

    id: str
    build: Callable[[Path], list[str]]
    words: tuple[str, ...]
    report: bool = False  # stdout may hold a report (info --verify shows what it checked)


# --- Parquet ----------------------------------------------------------------------------------


def _reward_strings(tmp: Path) -> list[str]:
    return _ingest(_parquet(tmp, reward=[f"r{i}" for i in range(9)]))


def _reward_nan(tmp: Path) -> list[str]:
    return _ingest(_parquet(tmp, **_with("reward", 5, np.nan)))


def _reward_inf(tmp: Path) -> list[str]:
    return _ingest(_parquet(tmp, **_with("reward", 2, np.inf)))


def _obs_nan(tmp: Path) -> list[str]:
    return _ingest(_parquet(tmp, **_with("x1", 7, np.nan)))


def _prob_above_one(tmp: Path) -> list[str]:
    return _ingest(_parquet(tmp, **_with("p", 4, 1.5)))


def _prob_negative(tmp: Path) -> list[str]:
    return _ingest(_parquet(tmp, **_with("p", 1, -0.2)))


def _prob_zero(tmp: Path) -> list[str]:
    return _ingest(_parquet(tmp, **_with("p", 6, 0.0)))


def _logp_positive_discrete(tmp: Path) -> list[str]:
    log = _log()
    path = _parquet(tmp, p=np.log(log["p"]))
    path_args = _ingest(path)
    path_args[path_args.index("prob")] = "logp"
    logp = np.log(log["p"])
    logp[3] = 0.25
    pl.DataFrame({**log, "p": logp}).write_parquet(path)
    return path_args


def _logp_nan(tmp: Path) -> list[str]:
    log = _log()
    logp = np.log(log["p"])
    logp[2] = np.nan
    path = tmp / "log.parquet"
    pl.DataFrame({**log, "p": logp}).write_parquet(path)
    args = _ingest(path)
    args[args.index("prob")] = "logp"
    return args


def _action_out_of_space(tmp: Path) -> list[str]:
    action = _log()["action"].copy()
    action[5] = 3
    return _ingest(_parquet(tmp, action=action), "--action-space", "discrete:2")


def _action_negative(tmp: Path) -> list[str]:
    action = _log()["action"].copy()
    action[8] = -1
    return _ingest(_parquet(tmp, action=action))


def _action_fractional(tmp: Path) -> list[str]:
    action = _log()["action"].astype(float)
    action[4] = 0.5
    return _ingest(_parquet(tmp, action=action), "--action-space", "discrete:2")


def _action_strings(tmp: Path) -> list[str]:
    return _ingest(_parquet(tmp, action=["left", "right"] * 4 + ["left"]))


def _ragged_obs(tmp: Path) -> list[str]:
    log = _log()
    state = [[float(a), float(b)] for a, b in zip(log["x0"], log["x1"], strict=True)]
    state[6] = [1.0, 2.0, 3.0]
    path = tmp / "log.parquet"
    pl.DataFrame({"episode": log["episode"], "state": state, "action": log["action"],
                  "reward": log["reward"], "done": log["done"], "p": log["p"]}
                 ).write_parquet(path)
    return ["ingest", "parquet", str(path), "--out", "ds", "--map", "episode_id=episode",
            "--map", "obs=state", "--map", "done=done", "--propensity-col", "p",
            "--propensity-kind", "prob"]


def _duplicate_steps(tmp: Path) -> list[str]:
    step = _log()["step"].copy()
    step[4] = step[3]  # episode 101: 0, 1, 1, 3
    return _ingest(_parquet(tmp, step=step))


def _negative_step(tmp: Path) -> list[str]:
    step = _log()["step"].copy()
    step[0] = -1
    return _ingest(_parquet(tmp, step=step))


def _step_overflow(tmp: Path) -> list[str]:
    step = _log()["step"].copy()
    step[1] = 2**32 + 1  # would wrap to 1 in the int32 step column
    return _ingest(_parquet(tmp, step=step))


def _episode_id_inf(tmp: Path) -> list[str]:
    episode = _log()["episode"].astype(float)
    episode[5:] = np.inf  # would become -2^63 in int64
    return _ingest(_parquet(tmp, episode=episode))


def _episode_not_contiguous(tmp: Path) -> list[str]:
    episode = _log()["episode"].copy()
    episode[7:] = 100  # episode 100 comes back after 101
    return _ingest(_parquet(tmp, episode=episode))


def _episode_id_fractional(tmp: Path) -> list[str]:
    episode = _log()["episode"].astype(float)
    episode[3] = 100.5
    return _ingest(_parquet(tmp, episode=episode))


def _done_before_end(tmp: Path) -> list[str]:
    log = _log()
    path = tmp / "log.parquet"
    terminated = log["done"].copy()
    terminated[4] = True  # in the middle of episode 101
    pl.DataFrame({**{k: v for k, v in log.items() if k != "done"}, "terminated": terminated}
                 ).write_parquet(path)
    return ["ingest", "parquet", str(path), "--out", "ds", "--map", "episode_id=episode",
            "--obs-cols", "x*", "--propensity-col", "p", "--propensity-kind", "prob"]


def _missing_reward(tmp: Path) -> list[str]:
    return _ingest(_parquet(tmp, reward=None))


def _mapped_column_missing(tmp: Path) -> list[str]:
    return [*_ingest(_parquet(tmp)), "--map", "reward=rew"]


def _obs_pattern_matches_nothing(tmp: Path) -> list[str]:
    args = _ingest(_parquet(tmp))
    args[args.index("x*")] = "state_*"
    return args


def _null_in_obs(tmp: Path) -> list[str]:
    x0 = _log()["x0"].tolist()
    x0[2] = None
    return _ingest(_parquet(tmp, x0=x0))


def _empty_parquet(tmp: Path) -> list[str]:
    path = tmp / "log.parquet"
    pl.DataFrame(_log()).head(0).write_parquet(path)
    return _ingest(path)


def _truncated_parquet(tmp: Path) -> list[str]:
    path = _parquet(tmp)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return _ingest(path)


def _zero_byte_parquet(tmp: Path) -> list[str]:
    path = tmp / "log.parquet"
    path.write_bytes(b"")
    return _ingest(path)


def _text_named_parquet(tmp: Path) -> list[str]:
    path = tmp / "log.parquet"
    path.write_text("episode,step\n1,2\n")
    return _ingest(path)


def _unknown_suffix(tmp: Path) -> list[str]:
    path = tmp / "log.json"
    path.write_text("{}")
    return _ingest(path)


# --- CSV --------------------------------------------------------------------------------------


def _csv(tmp: Path, text: str) -> list[str]:
    path = tmp / "log.csv"
    path.write_text(text)
    return _ingest(path)


def _csv_text() -> str:
    return pl.DataFrame(_log()).write_csv()


def _csv_empty(tmp: Path) -> list[str]:
    return _csv(tmp, "")


def _csv_header_only(tmp: Path) -> list[str]:
    return _csv(tmp, _csv_text().splitlines()[0] + "\n")


def _csv_word_in_reward(tmp: Path) -> list[str]:
    lines = _csv_text().splitlines()
    header = lines[0].split(",")
    row = lines[5].split(",")
    row[header.index("reward")] = "abc"
    lines[5] = ",".join(row)
    return _csv(tmp, "\n".join(lines) + "\n")


def _csv_ragged_row(tmp: Path) -> list[str]:
    lines = _csv_text().splitlines()
    lines[3] += ",1.0,2.0"
    return _csv(tmp, "\n".join(lines) + "\n")


def _csv_nan_reward(tmp: Path) -> list[str]:
    lines = _csv_text().splitlines()
    header = lines[0].split(",")
    row = lines[2].split(",")
    row[header.index("reward")] = "NaN"
    lines[2] = ",".join(row)
    return _csv(tmp, "\n".join(lines) + "\n")


# --- ingest options ---------------------------------------------------------------------------


def _bad_map_key(tmp: Path) -> list[str]:
    return [*_ingest(_parquet(tmp)), "--map", "rewards=reward"]


def _bad_propensity_kind(tmp: Path) -> list[str]:
    args = _ingest(_parquet(tmp))
    args[args.index("prob")] = "odds"
    return args


def _bad_done_means(tmp: Path) -> list[str]:
    return [*_ingest(_parquet(tmp)), "--done-means", "finished"]


def _bad_action_space(tmp: Path) -> list[str]:
    return [*_ingest(_parquet(tmp)), "--action-space", "discrete:two"]


def _name_traversal(tmp: Path) -> list[str]:
    return [*_ingest(_parquet(tmp)), "--name", "../escape"]


def _out_is_a_file(tmp: Path) -> list[str]:
    args = _ingest(_parquet(tmp))
    (tmp / "ds").write_text("not a dataset")
    return [*args, "--overwrite"]


def _mapping_unknown_key(tmp: Path) -> list[str]:
    (tmp / "map.toml").write_text('episode_id = "episode"\nrewrd = "reward"\n')
    return ["ingest", "parquet", str(_parquet(tmp)), "--out", "ds", "--mapping", "map.toml"]


def _mapping_not_toml(tmp: Path) -> list[str]:
    (tmp / "map.toml").write_text('episode_id = "episode\n')
    return ["ingest", "parquet", str(_parquet(tmp)), "--out", "ds", "--mapping", "map.toml"]


# --- Minari -----------------------------------------------------------------------------------


def _minari_no_metadata(tmp: Path) -> list[str]:
    (tmp / "mds" / "data").mkdir(parents=True)
    return ["ingest", "minari", "mds", "--out", "ds", "--quiet"]


def _minari_unknown_id(tmp: Path) -> list[str]:
    return ["ingest", "minari", "nobody/nothing-v0", "--out", "ds", "--quiet"]


def _minari_not_an_id(tmp: Path) -> list[str]:
    return ["ingest", "minari", "no such thing", "--out", "ds", "--quiet"]


def _minari_corrupt_metadata(tmp: Path) -> list[str]:
    (tmp / "mds" / "data").mkdir(parents=True)
    (tmp / "mds" / "data" / "metadata.json").write_text('{"dataset_id": "x/y-v0", ')
    return ["ingest", "minari", "mds", "--out", "ds", "--quiet"]


def _minari_incomplete_metadata(tmp: Path) -> list[str]:
    (tmp / "mds" / "data").mkdir(parents=True)
    (tmp / "mds" / "data" / "metadata.json").write_text('{"dataset_id": "x/y-v0"}')
    return ["ingest", "minari", "mds", "--out", "ds", "--quiet"]


def _minari_bad_propensity_kind(tmp: Path) -> list[str]:
    (tmp / "mds" / "data").mkdir(parents=True)
    return ["ingest", "minari", "mds", "--out", "ds", "--propensity-kind", "odds"]


def _minari_truncated(data_format: str) -> Callable[[Path], list[str]]:
    """A real Minari dataset (two CartPole episodes) whose last data file is cut in half."""

    def build(tmp: Path) -> list[str]:
        import warnings

        import minari
        from minari.data_collector import EpisodeBuffer

        buffers = [EpisodeBuffer(id=e, observations=np.zeros((4, 4), np.float32),
                                 actions=np.array([0, 1, 0]), rewards=[1.0] * 3,
                                 terminations=[False, False, True], truncations=[False] * 3)
                   for e in range(2)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = minari.create_dataset_from_buffers(
                f"test/cut{data_format}-v0", buffers, env="CartPole-v1", data_format=data_format)
        data = Path(dataset.storage.data_path)
        last = max((p for p in data.rglob("*") if p.suffix in (".arrow", ".hdf5")), key=str)
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
        return ["ingest", "minari", str(data), "--out", "ds", "--quiet"]

    return build


# --- run configs (train --config) -------------------------------------------------------------


def _train_config(text: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        (tmp / "run.toml").write_text(text)
        return ["train", str(WEAK), "--config", "run.toml"]

    return build


# --- behavior fit, train options, info --------------------------------------------------------


def _dataset_copy(tmp: Path) -> Path:
    copy = tmp / "copy"
    shutil.copytree(WEAK, copy)
    return copy


def _info_corrupt_card(tmp: Path) -> list[str]:
    copy = _dataset_copy(tmp)
    card_path(copy).write_text('{"schema_version": 1, "files": [')
    return ["info", str(copy)]


def _info_future_schema(tmp: Path) -> list[str]:
    copy = _dataset_copy(tmp)
    card = json.loads(card_path(copy).read_text())
    card["schema_version"] = 99
    card_path(copy).write_text(json.dumps(card))
    return ["info", str(copy)]


def _info_truncated_shard(tmp: Path) -> list[str]:
    copy = _dataset_copy(tmp)
    shard = copy / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    return ["info", str(copy), "--verify"]


def _info_missing_shard(tmp: Path) -> list[str]:
    copy = _dataset_copy(tmp)
    (copy / "part-00000.parquet").unlink()
    return ["info", str(copy)]


def _fit(*extra: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["behavior", "fit", str(WEAK), "--out", "ds", "--no-track", *extra]


def _evaluate_junk(tmp: Path) -> list[str]:
    (tmp / "policy.pt").write_text("not a checkpoint")
    return ["evaluate", "policy.pt", "--dataset", str(WEAK)]


def _evaluate_truncated(tmp: Path) -> list[str]:
    import torch

    torch.save({"spec": {}, "state_dict": {"w": torch.zeros(1000)}}, tmp / "policy.pt")
    data = (tmp / "policy.pt").read_bytes()
    (tmp / "policy.pt").write_bytes(data[: len(data) // 2])
    return ["evaluate", "policy.pt", "--dataset", str(WEAK)]


CASES = [
    # Parquet
    Case("parquet-reward-strings", _reward_strings, ("log.parquet", "'reward'")),
    Case("parquet-reward-nan", _reward_nan, ("log.parquet", "'reward'", "row 5", "nan")),
    Case("parquet-reward-inf", _reward_inf, ("log.parquet", "'reward'", "row 2", "inf")),
    Case("parquet-obs-nan", _obs_nan, ("log.parquet", "x1", "row 7")),
    Case("parquet-prob-above-one", _prob_above_one, ("log.parquet", "'p'", "row 4", "1.5")),
    Case("parquet-prob-negative", _prob_negative, ("log.parquet", "'p'", "row 1", "-0.2")),
    Case("parquet-prob-zero", _prob_zero, ("log.parquet", "'p'", "row 6", "(0, 1]")),
    Case("parquet-logp-positive-discrete", _logp_positive_discrete,
         ("log.parquet", "'p'", "row 3", "0.25")),
    Case("parquet-logp-nan", _logp_nan, ("log.parquet", "'p'", "row 2", "NaN")),
    Case("parquet-action-out-of-space", _action_out_of_space,
         ("log.parquet", "'action'", "row 5", "3")),
    Case("parquet-action-negative", _action_negative, ("log.parquet", "'action'", "row 8", "-1")),
    Case("parquet-action-fractional", _action_fractional,
         ("log.parquet", "'action'", "row 4", "0.5")),
    Case("parquet-action-strings", _action_strings, ("log.parquet", "'action'", "String")),
    Case("parquet-ragged-obs", _ragged_obs, ("log.parquet", "'state'", "row 6", "3 values")),
    Case("parquet-duplicate-steps", _duplicate_steps, ("log.parquet", "'step'", "row 4")),
    Case("parquet-negative-step", _negative_step, ("log.parquet", "'step'", "row 0")),
    Case("parquet-step-overflow", _step_overflow,
         ("log.parquet", "'step'", "row 1", "4294967297", "out of range")),
    Case("parquet-episode-id-inf", _episode_id_inf,
         ("log.parquet", "'episode'", "row 5", "inf", "not an integer")),
    Case("parquet-episode-not-contiguous", _episode_not_contiguous,
         ("log.parquet", "'episode'", "row 7", "100")),
    Case("parquet-episode-id-fractional", _episode_id_fractional,
         ("log.parquet", "'episode'", "row 3", "100.5")),
    Case("parquet-terminated-mid-episode", _done_before_end,
         ("log.parquet", "'terminated'", "row 4")),
    Case("parquet-missing-reward", _missing_reward, ("log.parquet", "'reward'", "--map")),
    Case("parquet-mapped-column-missing", _mapped_column_missing, ("log.parquet", "'rew'")),
    Case("parquet-obs-pattern-no-match", _obs_pattern_matches_nothing,
         ("log.parquet", "state_*")),
    Case("parquet-null-obs", _null_in_obs, ("log.parquet", "'x0'", "row 2", "null")),
    Case("parquet-empty", _empty_parquet, ("log.parquet", "no rows")),
    Case("parquet-truncated", _truncated_parquet, ("log.parquet", "could not be read")),
    Case("parquet-zero-bytes", _zero_byte_parquet, ("log.parquet", "could not be read")),
    Case("parquet-text-content", _text_named_parquet, ("log.parquet", "could not be read")),
    Case("input-unknown-suffix", _unknown_suffix, ("log.json", "file type")),
    # CSV
    Case("csv-empty", _csv_empty, ("log.csv",)),
    Case("csv-header-only", _csv_header_only, ("log.csv", "no rows")),
    Case("csv-word-in-reward", _csv_word_in_reward, ("log.csv", "reward")),
    Case("csv-ragged-row", _csv_ragged_row, ("log.csv",)),
    Case("csv-nan-reward", _csv_nan_reward, ("log.csv", "'reward'", "row 1")),
    # ingest options and mapping files
    Case("option-map-unknown-key", _bad_map_key, ("--map", "'rewards'")),
    Case("option-propensity-kind", _bad_propensity_kind, ("propensity kind", "'odds'")),
    Case("option-done-means", _bad_done_means, ("done_means", "'finished'")),
    Case("option-action-space", _bad_action_space, ("action space", "discrete:two")),
    Case("option-name-traversal", _name_traversal, ("--name", "'../escape'")),
    Case("option-out-is-a-file", _out_is_a_file, ("ds", "not a dataset folder")),
    Case("mapping-unknown-key", _mapping_unknown_key, ("map.toml", "'rewrd'")),
    Case("mapping-not-toml", _mapping_not_toml, ("map.toml", "not valid TOML")),
    # Minari
    Case("minari-no-metadata", _minari_no_metadata, ("mds", "not a Minari dataset")),
    Case("minari-unknown-id", _minari_unknown_id, ("nobody/nothing-v0", "--download")),
    Case("minari-not-an-id", _minari_not_an_id, ("no such thing", "not a Minari dataset id")),
    Case("minari-corrupt-metadata", _minari_corrupt_metadata,
         ("metadata.json", "Minari cannot open", "JSONDecodeError")),
    Case("minari-incomplete-metadata", _minari_incomplete_metadata,
         ("metadata.json", "Minari cannot open")),
    Case("minari-truncated-arrow", _minari_truncated("arrow"),
         ("Minari dataset test/cutarrow-v0", "a data file cannot be read", "part-0.arrow")),
    Case("minari-truncated-hdf5", _minari_truncated("hdf5"),
         ("Minari dataset test/cuthdf5-v0", "a data file cannot be read", "truncated file")),
    Case("minari-propensity-kind", _minari_bad_propensity_kind, ("--propensity-kind", "'odds'")),
    # run configs
    Case("config-unknown-key", _train_config("[train]\ngama = 0.9\n"), ("[train]", "gama")),
    Case("config-unknown-table", _train_config("[trian]\nseed = 1\n"), ("run.toml", "trian")),
    Case("config-wrong-type", _train_config('[train]\ngamma = "high"\n'), ("gamma", "high")),
    Case("config-bad-enum", _train_config('[train]\nestimator = "magic"\n'),
         ("estimator", "magic")),
    Case("config-negative-steps", _train_config("[train]\nsteps = -5\n"), ("steps", "-5")),
    Case("config-gamma-nan", _train_config("[train]\ngamma = nan\n"), ("gamma", "nan")),
    Case("config-gamma-above-one", _train_config("[train]\ngamma = 1.5\n"), ("gamma", "1.5")),
    Case("config-not-toml", _train_config("[train\n"), ("run.toml", "not valid TOML")),
    Case("config-tracking-unknown-key", _train_config('[tracking]\nurl = "x"\n'),
         ("[tracking]", "url")),
    Case("config-lr-negative", _train_config("[train]\nlr = -0.1\n"), ("lr", "-0.1")),
    Case("config-missing-file", lambda tmp: ["train", str(WEAK), "--config", "nope.toml"],
         ("nope.toml", "cannot read")),
    # train options
    Case("train-negative-steps", lambda tmp: ["train", str(WEAK), "--steps", "-3"],
         ("steps", "-3")),
    Case("train-not-a-dataset", lambda tmp: ["train", str(tmp)], ("no _dataset.json",)),
    Case("train-resume-traversal", lambda tmp: ["train", str(WEAK), "--resume", "../../etc"],
         ("../../etc", "run id")),
    # behavior fit
    Case("fit-hidden-words", _fit("--hidden", "big"), ("--hidden", "'big'")),
    Case("fit-folds-zero", _fit("--folds", "0"), ("folds", "0")),
    Case("fit-unknown-model", _fit("--model", "forest"), ("model", "'forest'")),
    Case("fit-negative-floor", _fit("--floor", "-1"), ("floor", "-1")),
    Case("fit-negative-steps", _fit("--steps", "-10"), ("steps", "-10")),
    Case("fit-out-and-in-place", _fit("--in-place"), ("--out", "--in-place")),
    # evaluate
    Case("evaluate-junk-checkpoint", _evaluate_junk, ("policy.pt", "not a checkpoint")),
    Case("evaluate-truncated-checkpoint", _evaluate_truncated,
         ("policy.pt", "not a checkpoint")),
    Case("evaluate-bad-estimator", lambda tmp: ["evaluate", "x.pt", "--estimators", "is,magic"],
         ("--estimators", "magic")),
    # info
    Case("info-corrupt-card", _info_corrupt_card, ("dataset.json", "not valid JSON")),
    Case("info-future-schema", _info_future_schema, ("dataset.json", "schema_version 99")),
    Case("info-truncated-shard", _info_truncated_shard, ("part-00000.parquet", "sha256"),
         report=True),
    Case("info-missing-shard", _info_missing_shard, ("part-00000.parquet", "missing")),
]


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_the_corpus_is_large_and_varied() -> None:
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)
    kinds = {case.id.split("-")[0] for case in CASES}
    assert {"parquet", "csv", "minari", "config", "option", "fit", "info", "train",
            "evaluate"} <= kinds


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_is_one_sentence_exit_2_and_writes_nothing(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = case.build(tmp_path)
    before = _snapshot(tmp_path)

    result = CliRunner().invoke(app, argv)

    output = result.output
    assert result.exit_code == 2, (result.exit_code, output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert case.report or not result.stdout, output
    for word in case.words:
        assert word in lines[0], (word, lines[0])
    assert _snapshot(tmp_path) == before, "the command wrote files"
