"""Kill `offpg train` mid-run (SIGKILL), resume it by run id, and match an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from offpg_offline.cli import app

WEAK = Path(__file__).resolve().parents[1] / "datasets" / "cartpole-weak"
ARGS = [
    "--steps",
    "300",
    "--checkpoint-every",
    "20",
    "--init",
    "random",
    "--baseline",
    "none",
    "--eval-episodes",
    "2",
    "--estimator",
    "per-decision",
]


@pytest.mark.slow
def test_killed_run_resumes_into_the_same_run_with_identical_parameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from offpg_offline.cli import main; main()",
            "train",
            str(WEAK),
            *ARGS,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("runs/*/step-000040.pt")):
        assert process.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (folder,) = (tmp_path / "runs").iterdir()
    run_id = folder.name
    assert not (folder / "final.pt").exists()

    result = CliRunner().invoke(app, ["train", str(WEAK), "--resume", run_id])
    assert result.exit_code == 0, result.output
    assert f"run {run_id} resumed from step-" in result.output

    whole = CliRunner().invoke(app, ["train", str(WEAK), *ARGS, "--out-dir", "whole"])
    assert whole.exit_code == 0, whole.output
    resumed = torch.load(folder / "final.pt", weights_only=True)["state_dict"]
    uninterrupted = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert max(m.step for m in client.get_metric_history(run_id, "train/loss")) == 300
    assert len(client.search_runs([run.info.experiment_id])) == 2  # resumed, not a new run


def test_resume_rejects_extra_options_and_unknown_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", str(WEAK), "--resume", "abc", "--gamma", "0.5"])
    assert result.exit_code == 2
    assert "--resume takes the run's own configuration; drop --gamma" in result.output
    result = CliRunner().invoke(app, ["train", str(WEAK), "--resume", "0123456789abcdef"])
    assert result.exit_code == 2
    assert "run 0123456789abcdef is not in the tracking store" in result.output
