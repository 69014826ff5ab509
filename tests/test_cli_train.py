"""`offpg train` end to end through CliRunner, recorded in a real sqlite MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from offpg_offline.cli import app

DATASETS = Path(__file__).resolve().parents[1] / "datasets"
FAST = ["--steps", "10", "--init", "random", "--baseline", "none", "--eval-episodes", "2"]


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_records_params_metrics_input_and_checkpoint(workdir: Path) -> None:
    from mlflow import MlflowClient

    result = CliRunner().invoke(
        app,
        [
            "train",
            str(DATASETS / "cartpole-weak"),
            *FAST,
            "--estimator",
            "per-decision",
            "--clip",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "online/return_mean" in result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("cartpole-weak")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "per-decision-clip3-step-kl2-s0"
    assert run.data.params["estimator"] == "per-decision"
    assert run.data.params["clip"] == "3.0"
    assert run.data.tags["propensity"] == "logged"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [10]
    assert "weights/ess_fraction" in run.data.metrics
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "cartpole-weak"
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "config.toml"} <= artifacts
    local = workdir / "runs" / run.info.run_id / "final.pt"
    assert torch.load(local, weights_only=True)["step"] == 10


def test_unknown_config_key_is_named(workdir: Path) -> None:
    config = workdir / "run.toml"
    config.write_text("[train]\ngama = 0.9\n")  # typo on purpose
    result = CliRunner().invoke(
        app, ["train", str(DATASETS / "cartpole-weak"), "--config", str(config)]
    )
    assert result.exit_code == 2
    assert "unknown key(s) in [train]: gama" in result.output
    assert not (workdir / "mlflow.db").exists()


def test_config_file_values_apply_and_options_override_them(workdir: Path) -> None:
    from mlflow import MlflowClient

    config = workdir / "run.toml"
    config.write_text(
        '[train]\nestimator = "trajectory"\ngamma = 0.95\nsteps = 50\n'
        '[tracking]\nexperiment = "from-toml"\n'
    )
    result = CliRunner().invoke(
        app, ["train", str(DATASETS / "cartpole-weak"), "--config", str(config), *FAST]
    )
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("from-toml").experiment_id])
    assert (run.data.params["estimator"], run.data.params["gamma"], run.data.params["steps"]) == (
        "trajectory",
        "0.95",
        "10",
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--propensity", "estimated"], "column estimated_logp is empty"),
        (["--gamma", "1.5"], "gamma must lie in [0, 1], got 1.5"),
        (["--estimator", "bogus"], "Invalid value for '--estimator'"),
    ],
)
def test_bad_options_give_one_sentence_and_exit_2(
    workdir: Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(app, ["train", str(DATASETS / "cartpole-weak"), *FAST, *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_folder_without_a_card_is_refused(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["train", str(workdir)])
    assert result.exit_code == 2
    assert "is not a dataset folder (no _dataset.json)" in result.output
