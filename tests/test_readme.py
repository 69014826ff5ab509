"""README's commands are real: set-up scripts exist, every `offpg` command line it shows parses,
the lines training on shipped datasets run, and its TOML example drives a run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from offpg_offline.cli import app
from offpg_offline.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _offpg_lines() -> list[list[str]]:
    lines = []
    for block in _blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", block)  # join continued lines
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("offpg "):
                lines.append(shlex.split(line)[1:])
    return lines


def test_readme_opens_with_the_two_set_up_commands() -> None:
    first = _blocks("bash")[0].splitlines()
    assert [line.split()[0] for line in first[:2]] == ["scripts/demo.sh", "scripts/test.sh"]
    assert (ROOT / "scripts" / "demo.sh").is_file() and (ROOT / "scripts" / "test.sh").is_file()
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("args", _offpg_lines(), ids=lambda a: " ".join(a[:2]))
def test_every_offpg_line_names_a_real_command_and_real_options(args: list[str]) -> None:
    command = typer.main.get_command(app)  # typer vendors click: test for groups by shape
    words = list(args)
    while hasattr(command, "commands") and words and words[0] in command.commands:
        command = command.commands[words.pop(0)]
    assert not hasattr(command, "commands"), f"incomplete command: offpg {' '.join(args)}"
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    used = {word.split("=", 1)[0] for word in words if word.startswith("--")}
    assert used <= known, f"unknown option(s) {used - known} in: offpg {' '.join(args)}"


def test_readme_toml_example_is_a_valid_run_config() -> None:
    (example,) = _blocks("toml")
    run = parse_config(example, source="README")
    assert run.train.estimator.value == "per-decision" and run.tracking.experiment


# The README's lines that train on a shipped dataset, executed (shortened by appended options,
# which win over earlier ones), and its TOML example used as a real run config.
SHORT = ["--steps", "3", "--bc-steps", "2", "--eval-episodes", "1", "--log-every", "1"]
SHIPPED_TRAIN = [args for args in _offpg_lines()
                 if args[:1] == ["train"] and args[1].startswith("datasets/")
                 and "--resume" not in args]


def test_the_readme_shows_training_on_shipped_datasets() -> None:
    assert len(SHIPPED_TRAIN) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("args", SHIPPED_TRAIN, ids=lambda a: " ".join(a[1:4]))
def test_readme_train_lines_run_on_the_shipped_datasets(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", str(ROOT / args[1]), *args[2:], *SHORT])
    assert result.exit_code == 0, result.output
    assert "checkpoint: " in result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "final.pt").is_file()


@pytest.mark.slow
def test_readme_toml_example_drives_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    (example,) = _blocks("toml")
    (tmp_path / "run.toml").write_text(example)
    result = CliRunner().invoke(app, ["train", str(ROOT / "datasets" / "cartpole-weak"),
                                      "--config", "run.toml", *SHORT])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    expected = parse_config(example, source="README")
    (run,) = client.search_runs([client.get_experiment_by_name(
        expected.tracking.experiment).experiment_id])
    params = run.data.params
    assert params["estimator"] == expected.train.estimator.value
    assert float(params["clip"]) == expected.train.clip
    assert params["clip_mode"] == expected.train.clip_mode.value
    assert int(params["seed"]) == expected.train.seed
    assert params["steps"] == "3"  # the command line wins over the file
