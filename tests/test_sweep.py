"""`offpg sweep`: a parent MLflow run with one nested child run per estimator × grid × seed."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from offpg_offline.cli import app
from offpg_offline.jobs.sweep import grid_values as _grid_values

DATASET = Path(__file__).resolve().parents[1] / "datasets" / "cartpole-weak"


@pytest.mark.slow
def test_sweep_nests_one_child_per_estimator_and_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    (tmp_path / "fast.toml").write_text(
        '[train]\ninit = "random"\nbaseline = "none"\neval_episodes = 2\n'
    )
    result = CliRunner().invoke(app, [
        "sweep", str(DATASET), "--estimator", "per-step,per-decision", "--seeds", "0,1",
        "--steps", "3", "--config", "fast.toml", "--grid", "lr=0.01",
    ])
    assert result.exit_code == 0, result.output

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("cartpole-weak")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("offpg.sweep") == "true"]
    children = [r for r in runs if r is not parent]
    assert parent.info.run_name == "sweep-per-step+per-decision"
    assert parent.data.params["sweep.runs"] == "4"
    assert parent.data.params["sweep.grid"] == "lr=0.01"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted((r.data.params["estimator"], r.data.params["seed"]) for r in children) == [
        ("per-decision", "0"), ("per-decision", "1"), ("per-step", "0"), ("per-step", "1")]
    assert {r.data.params["lr"] for r in children} == {"0.01"}  # a one-value grid sets it
    assert {r.data.params["steps"] for r in children} == {"3"}
    assert sorted(r.info.run_name for r in children) == [
        "per-decision-clip2-step-kl2-s0", "per-decision-clip2-step-kl2-s1",
        "per-step-clip2-step-kl2-s0", "per-step-clip2-step-kl2-s1"]
    assert all(r.info.status == "FINISHED" and r.outputs.model_outputs for r in children)
    # The summary: two configurations of two seeds each, plot logged to the parent.
    ranked = [line.split() for line in result.output.splitlines() if line[:2] in ("1 ", "2 ")]
    assert sorted((row[1], row[3]) for row in ranked) == [("per-decision", "2"), ("per-step", "2")]
    assert [f.path for f in client.list_artifacts(parent.info.run_id, "compare")] == [
        "compare/compare_online_return_mean.png"]


def test_grid_values_are_typed_like_the_config_fields() -> None:
    assert _grid_values("clip=1,none") == ("clip", [1.0, None])
    assert _grid_values("batch-steps=64,128") == ("batch_steps", [64, 128])
    assert _grid_values("self_normalize=true,false") == ("self_normalize", [True, False])
    assert _grid_values("hidden=32x32,64") == ("hidden", [(32, 32), (64,)])
    assert _grid_values("clip_mode=step,cumulative")[1] == ["step", "cumulative"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gama=0.9", "--grid gama: not a [train] setting"),
        ("seed=1,2", "use --seeds instead"),
        ("lr=fast", "--grid lr: 'fast' is not a valid float"),
        ("lr", "--grid takes KEY=V1,V2"),
    ],
)
def test_bad_grid_is_one_sentence(spec: str, message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["sweep", str(DATASET), "--grid", spec])
    assert result.exit_code == 2
    assert message in result.output


def test_a_sweep_refuses_greedy_critic_on_discrete_actions_before_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(
        app, ["sweep", str(DATASET), "--estimator", "per-step,greedy-critic"])
    assert result.exit_code == 2, result.output
    assert "the greedy-critic estimator needs continuous actions" in result.output
    assert not (tmp_path / "mlflow.db").exists()  # no parent run was started
