"""`offpg ingest parquet` and `offpg info` through the Typer app (CliRunner)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
from typer.testing import CliRunner

from offpg_offline.cli import app
from offpg_offline.data.store import read_card


def _write_log(path, *, prob_bad_row: int | None = None) -> None:
    rng = np.random.default_rng(0)
    lengths = [3, 5, 2]
    rows = sum(lengths)
    episode = np.repeat([10, 11, 12], lengths)
    done = np.r_[episode[1:] != episode[:-1], True]
    prob = rng.uniform(0.1, 1.0, rows)
    if prob_bad_row is not None:
        prob[prob_bad_row] = 1.25
    pl.DataFrame({"sess": episode, "x0": rng.normal(size=rows), "x1": rng.normal(size=rows),
                  "act": rng.integers(0, 2, rows), "r": rng.normal(size=rows), "done": done,
                  "p": prob}).write_parquet(path)


ARGS = ["--map", "episode_id=sess", "--map", "action=act", "--map", "reward=r",
        "--obs-cols", "x*", "--propensity-col", "p", "--propensity-kind", "prob"]


def test_ingest_then_info(tmp_path) -> None:
    _write_log(tmp_path / "log.parquet")
    out = tmp_path / "ds"
    runner = CliRunner()

    result = runner.invoke(app, ["ingest", "parquet", str(tmp_path / "log.parquet"), "--out",
                                 str(out), *ARGS, "--env", "CartPole-v0-missing", "--quiet"])

    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 3 episodes, 10 steps in 1 file(s); logged_logp: input column 'p' " \
           f"(probabilities, stored as their log)" in result.output
    assert "warning: environment CartPole-v0-missing could not be built here" in result.output
    assert read_card(out)["env_spec"] == {"id": "CartPole-v0-missing"}

    shown = runner.invoke(app, ["info", str(out), "--json", "--verify"])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.stdout)
    assert info["counts"] == {"episodes": 3, "steps": 10, "files": 1}
    assert info["verify"] == {"ok": True, "problems": []}
    assert info["observation_space"]["shape"] == [2]

    text = runner.invoke(app, ["info", str(out)])
    assert text.exit_code == 0 and "steps 10 in 3 episodes, 1 file(s)" in text.output


def test_ingest_error_exits_2_with_one_sentence_and_writes_nothing(tmp_path) -> None:
    _write_log(tmp_path / "log.parquet", prob_bad_row=4)
    out = tmp_path / "ds"

    result = CliRunner().invoke(app, ["ingest", "parquet", str(tmp_path / "log.parquet"),
                                      "--out", str(out), *ARGS])

    assert result.exit_code == 2
    assert result.output == (f"error: {tmp_path / 'log.parquet'}: column 'p', row 4: "
                             f"probability 1.25 lies outside (0, 1].\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.parquet"]


def test_ingest_refuses_an_existing_output_and_bad_options(tmp_path) -> None:
    _write_log(tmp_path / "log.parquet")
    runner = CliRunner()
    out = tmp_path / "ds"
    base = ["ingest", "parquet", str(tmp_path / "log.parquet"), "--out", str(out), *ARGS]
    assert runner.invoke(app, base).exit_code == 0
    again = runner.invoke(app, base)
    assert again.exit_code == 2
    assert again.output == (f"error: {out}: already exists; pass overwrite (--overwrite) to "
                            f"replace it.\n")
    assert runner.invoke(app, [*base, "--overwrite"]).exit_code == 0
    bad = runner.invoke(app, [*base, "--overwrite", "--map", "reward"])
    assert bad.exit_code == 2
    assert bad.output == "error: --map 'reward' is not KEY=COLUMN (e.g. --map obs=state).\n"
    missing = runner.invoke(app, ["ingest", "parquet", str(tmp_path / "nope.csv"), "--out",
                                  str(tmp_path / "x")])
    assert missing.exit_code == 2
    assert missing.output == f"error: {tmp_path / 'nope.csv'}: no such file or folder.\n"


def test_info_errors(tmp_path) -> None:
    result = CliRunner().invoke(app, ["info", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert result.output == f"error: {tmp_path / 'nope'}: no such dataset folder.\n"


def test_ingest_with_a_mapping_file_overridden_on_the_command_line(tmp_path) -> None:
    _write_log(tmp_path / "log.parquet")
    mapping = tmp_path / "map.toml"
    mapping.write_text('episode_id = "sess"\naction = "act"\nreward = "nope"\n'
                       'obs_cols = ["x*"]\npropensity_col = "p"\npropensity_kind = "prob"\n')
    out = tmp_path / "ds"
    result = CliRunner().invoke(app, ["ingest", "parquet", str(tmp_path / "log.parquet"),
                                      "--out", str(out), "--mapping", str(mapping),
                                      "--map", "reward=r"])
    assert result.exit_code == 0, result.output
    card = read_card(out)
    assert card["source"]["columns"]["reward"] == "r"
    assert card["propensity"]["logged_logp"]["source"].startswith("input column 'p'")
