"""README's commands are real: set-up scripts exist, every `offpg` command line it shows parses,
and its TOML example is a valid run config."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

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
