"""`offpg evaluate` through CliRunner, on a shipped log and a real (sqlite) MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from offpg_offline import cli, ope
from offpg_offline.cli import app
from offpg_offline.config import TrackingConfig, TrainConfig, as_params
from offpg_offline.data.batch import load_steps
from offpg_offline.data.store import read_card
from offpg_offline.policies import CategoricalPolicy, checkpoint
from offpg_offline.train import split_episodes

DATASET = Path(__file__).resolve().parents[1] / "datasets" / "cartpole-weak"


def _policy_file(folder: Path, config: TrainConfig) -> tuple[Path, CategoricalPolicy]:
    torch.manual_seed(0)
    policy = CategoricalPolicy(4, 2, hidden=(8,))
    path = folder / "final.pt"
    torch.save(checkpoint(policy, config=as_params(config), step=7), path)
    return path, policy


def test_cli_knows_every_ope_estimator() -> None:
    assert cli._OPE_NAMES == ope.ESTIMATE_NAMES


def test_evaluate_a_checkpoint_on_a_dataset_prints_the_estimates(tmp_path: Path) -> None:
    path, policy = _policy_file(tmp_path, TrainConfig(gamma=0.9))
    result = CliRunner().invoke(app, ["evaluate", str(path), "--dataset", str(DATASET),
                                      "--estimators", "is,wis,pdis,wpdis", "--n-boot", "50"])
    assert result.exit_code == 0, result.output
    batch = load_steps(DATASET)
    expected = ope.evaluate_offline(policy, batch, batch.logged_logp, gamma=0.9, n_boot=50,
                                    estimators=("is", "wis", "pdis", "wpdis"))
    for estimate in expected:  # the printed table carries each value to 4 significant digits
        assert f"{estimate.value:.4g}" in result.output, (estimate, result.output)
    assert "γ = 0.9" in result.output and "all 400 episodes" in result.output


@pytest.mark.slow
def test_evaluate_a_run_logs_ope_metrics_on_its_validation_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    from offpg_offline import tracking

    config = TrainConfig(gamma=0.95, seed=3, val_fraction=0.25)
    path, policy = _policy_file(tmp_path, config)
    with tracking.MlflowTracker.start(TrackingConfig(), experiment="e", run_name="r") as tracker:
        tracker.log_dataset(DATASET, read_card(DATASET))
        tracker.log_artifact(path, "checkpoints")
    run_id = tracker.run_id

    result = CliRunner().invoke(app, ["evaluate", run_id, "--estimators", "wis,fqe",
                                      "--fqe-iterations", "2", "--n-boot", "20"])

    assert result.exit_code == 0, result.output
    batch = load_steps(DATASET)
    _, val_idx = split_episodes(batch.n_episodes, 0.25, torch.Generator().manual_seed(3))
    held_out = batch.episodes(val_idx)
    wis = ope.evaluate_offline(policy, held_out, held_out.logged_logp, gamma=0.95, n_boot=20,
                               estimators=("wis",))[0]
    client = tracking.open_client(TrackingConfig())
    history = client.get_metric_history(run_id, "ope/wis")
    assert [(m.step, m.value) for m in history] == [(7, pytest.approx(wis.value, rel=1e-12))]
    for key in ("ope/wis_ci_low", "ope/wis_ci_high", "ope/fqe", "ope/fqe_ci_low"):
        assert len(client.get_metric_history(run_id, key)) == 1, key
    assert f"{len(val_idx)} validation episodes" in result.output


def test_evaluate_names_the_bad_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    path, _ = _policy_file(tmp_path, TrainConfig())
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(path), "--dataset", str(DATASET),
                                 "--estimators", "is,ips"])
    assert result.exit_code == 2 and "unknown ips" in result.output
    result = runner.invoke(app, ["evaluate", "no-such-run"])
    assert result.exit_code == 2 and "neither a checkpoint file nor a run" in result.output
    result = runner.invoke(app, ["evaluate", str(path)])
    assert result.exit_code == 2 and "pass --dataset" in result.output
