"""`offpg evaluate` through CliRunner, on a shipped log and a real (sqlite) MLflow store.

Expected values come from outside the code under test: hand formulas on the Parquet columns
(IS/WIS of the uniform policy, on-policy means), the episode ids a run recorded (read back as
plain JSON), the CartPole geometric sum, and what the training run itself logged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from offpg_offline import cli, ope
from offpg_offline.cli import app
from offpg_offline.config import EvaluateConfig, TrackingConfig, TrainConfig, as_params
from offpg_offline.data.batch import load_steps
from offpg_offline.data.store import read_card
from offpg_offline.policies import CategoricalPolicy, checkpoint

DATASET = Path(__file__).resolve().parents[1] / "datasets" / "cartpole-weak"


def _policy_file(folder: Path, config: TrainConfig, *, name: str = "final.pt", step: int = 7,
                 seed: int = 0) -> tuple[Path, CategoricalPolicy]:
    torch.manual_seed(seed)
    policy = CategoricalPolicy(4, 2, hidden=(8,))
    path = folder / name
    torch.save(checkpoint(policy, config=as_params(config), step=step), path)
    return path, policy


def _columns() -> dict[str, np.ndarray]:
    """The log's columns as float64/int64 numpy arrays, read with pyarrow (not our reader)."""
    table = pq.read_table(next(DATASET.glob("*.parquet")))
    out = {name: np.asarray(table.column(name).to_numpy(), dtype=np.float64)
           for name in ("reward", "logged_logp", "step")}
    out["episode_id"] = np.asarray(table.column("episode_id").to_numpy(), dtype=np.int64)
    out["action"] = np.asarray(table.column("action").to_numpy(), dtype=np.int64)
    return out


def _discounted_returns(cols: dict[str, np.ndarray], gamma: float) -> tuple[np.ndarray, ...]:
    """(episode ids, G_e = Σ_t γ^t r_t, Σ_t log β(a_t|s_t)) per episode, by a slow loop."""
    ids = np.unique(cols["episode_id"])
    returns, logp = np.zeros(len(ids)), np.zeros(len(ids))
    for i, episode in enumerate(ids):
        rows = cols["episode_id"] == episode
        returns[i] = np.sum(gamma ** cols["step"][rows] * cols["reward"][rows])
        logp[i] = np.sum(cols["logged_logp"][rows])
    return ids, returns, logp


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
    assert "value (γ=0.9)" in result.stdout  # the column of values says its γ (issue 12.4)


def test_json_is_one_object_and_progress_goes_to_stderr_only_without_it(tmp_path: Path) -> None:
    path, _ = _policy_file(tmp_path, TrainConfig(gamma=0.9))
    args = ["evaluate", str(path), "--dataset", str(DATASET), "--estimators", "wis,fqe",
            "--fqe-iterations", "2", "--n-boot", "20", "--online", "1"]
    shown = CliRunner().invoke(app, args)
    assert shown.exit_code == 0, shown.output
    for stage in ("OPE: importance sampling", "OPE: fitting the FQE critic", "rollouts: 1"):
        assert stage in shown.stderr and stage not in shown.stdout, (stage, shown.stderr)
    assert "fqe intervals: the critic refitted on each resample" in shown.stdout  # labelled
    quiet = CliRunner().invoke(app, [*args, "--json", "--gamma", "0.8"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == ""  # no progress under --json
    data = json.loads(quiet.stdout)  # exactly one JSON object on stdout
    assert data["checkpoint"] == str(path) and data["dataset"] == str(DATASET)
    assert data["split"] == "all" and data["gamma"] == 0.8
    assert set(data["ope"]) == {"wis", "fqe"}
    assert set(data["ope"]["wis"]) >= {"value", "ci_low", "ci_high", "ess"}
    # Online, one episode: CartPole pays 1 per step, so the discounted return of an episode of
    # R steps is (1 − γ^R)/(1 − γ), with the γ of OPE (0.8 from --gamma, not the run's 0.9).
    online = data["online"]["stochastic"]
    steps = online["return_mean"]
    assert online["discounted_return_mean"] == pytest.approx((1 - 0.8**steps) / 0.2, rel=1e-12)
    assert data["online"]["gamma"] == 0.8 and "greedy" in data["online"]


def test_uniform_policy_matches_the_importance_sampling_formulas() -> None:
    # π(a|s) = 1/2: W_e = Π_t 0.5/β(a_t|s_t). IS = mean W_e G_e, WIS = Σ W_e G_e / Σ W_e.
    # Tolerance: our π's log-probabilities are float32 (error ≤ 6e-8 per step, ≤ 500 steps per
    # episode), so each W_e carries a relative error below 3e-5.
    gamma = 0.95
    ids, returns, logp = _discounted_returns(_columns(), gamma)
    lengths = np.array([np.sum(_columns()["episode_id"] == e) for e in ids])
    weights = np.exp(lengths * np.log(0.5) - logp)
    result = CliRunner().invoke(app, ["evaluate", "--policy", "uniform", "--dataset", str(DATASET),
                                      "--estimators", "is,wis", "--n-boot", "20", "--gamma",
                                      str(gamma), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["policy"] == "uniform" and data["gamma"] == gamma
    assert data["ope"]["is"]["value"] == pytest.approx(np.mean(weights * returns), rel=1e-4)
    assert data["ope"]["wis"]["value"] == pytest.approx(
        np.sum(weights * returns) / np.sum(weights), rel=1e-4)


def _behavior_table(cols: dict[str, np.ndarray]) -> np.ndarray:
    """β(·|s) for every row: the logged action has exp(logged_logp), the other one the rest."""
    logged = np.exp(cols["logged_logp"])
    probs = np.empty((len(logged), 2))
    probs[np.arange(len(logged)), cols["action"]] = logged
    probs[np.arange(len(logged)), 1 - cols["action"]] = 1 - logged
    return probs


def test_a_parquet_table_of_probabilities_is_aligned_by_episode_and_step(tmp_path: Path) -> None:
    # π = β given as a table, its rows shuffled: every ρ_t = 1, so IS = WIS = PDIS = WPDIS =
    # the mean discounted return. ρ_t is exp(float32 log π − log β): relative error ≤ 3e-5
    # on a 500-step episode (see above), hence rel=1e-4.
    cols = _columns()
    probs = _behavior_table(cols)
    order = np.random.default_rng(0).permutation(len(probs))
    table = pl.DataFrame({"episode_id": cols["episode_id"][order],
                          "step": cols["step"][order].astype(np.int64),
                          "action_probs": probs[order].tolist()})
    path = tmp_path / "pi.parquet"
    table.write_parquet(path)
    _, returns, _ = _discounted_returns(cols, 0.99)
    result = CliRunner().invoke(app, ["evaluate", "--policy", str(path), "--dataset",
                                      str(DATASET), "--estimators", "is,wis,pdis,wpdis",
                                      "--n-boot", "20", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["policy"] == str(path) and data["gamma"] == 0.99
    for name in ("is", "wis", "pdis", "wpdis"):
        assert data["ope"][name]["value"] == pytest.approx(returns.mean(), rel=1e-4), name

    # The same table with a fixed-size list column (Arrow's fixed_size_list, polars' Array).
    fixed = tmp_path / "pi-fixed.parquet"
    table.with_columns(pl.col("action_probs").list.to_array(probs.shape[1])).write_parquet(fixed)
    again = CliRunner().invoke(app, ["evaluate", "--policy", str(fixed), "--dataset",
                                     str(DATASET), "--estimators", "wis", "--n-boot", "20",
                                     "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["ope"]["wis"]["value"] == pytest.approx(returns.mean(),
                                                                             rel=1e-4)

    # The same table as an [N, A] array in the dataset's row order, through the Python API.
    from offpg_offline.jobs.evaluate import evaluate

    found = evaluate(dataset=DATASET, policy=probs, config=EvaluateConfig(
        estimators=("wis",), n_boot=20, gamma=0.99))
    assert found.estimates[0].value == pytest.approx(returns.mean(), rel=1e-4)
    assert found.as_json()["policy"] == "array"

    # A table that misses a row, and one whose rows are not probabilities, are refused.
    table.slice(1).write_parquet(tmp_path / "short.parquet")
    missing = CliRunner().invoke(app, ["evaluate", "--policy", str(tmp_path / "short.parquet"),
                                       "--dataset", str(DATASET)])
    first = table.row(0)
    assert missing.exit_code == 2 and "short.parquet" in missing.output
    assert f"episode {first[0]} step {first[1]}" in missing.output, missing.output
    table.with_columns(pl.col("action_probs").list.eval(pl.element() * 2)).write_parquet(
        tmp_path / "double.parquet")
    bad = CliRunner().invoke(app, ["evaluate", "--policy", str(tmp_path / "double.parquet"),
                                   "--dataset", str(DATASET)])
    assert bad.exit_code == 2 and "not a probability vector" in bad.output
    assert "Traceback" not in missing.output + bad.output


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
    result = runner.invoke(app, ["evaluate", str(path), "--policy", "uniform",
                                 "--dataset", str(DATASET)])
    assert result.exit_code == 2 and "not both" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path), "--checkpoint", "selected",
                                 "--dataset", str(DATASET)])
    assert result.exit_code == 2 and "selected no checkpoint" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path), "--checkpoint", "best",
                                 "--dataset", str(DATASET)])
    assert result.exit_code == 2 and "step-N" in result.output
    for option, value in (("--level", "1.5"), ("--n-boot", "1"), ("--split", "train"),
                          ("--online", "-1"), ("--gamma", "1.2")):
        result = runner.invoke(app, ["evaluate", str(path), "--dataset", str(DATASET),
                                     option, value])
        assert result.exit_code == 2 and f"{option} must" in result.output, result.output
        assert "Traceback" not in result.output


def test_a_folder_evaluates_its_shipped_checkpoint_and_says_which(tmp_path: Path) -> None:
    # train --select-by writes selected.pt beside final.pt; `shipped` is selected.pt.
    config = TrainConfig(gamma=0.9, select_by="wis")
    _, final = _policy_file(tmp_path, config, name="final.pt", step=40, seed=0)
    _, chosen = _policy_file(tmp_path, config, name="selected.pt", step=20, seed=1)
    args = ["evaluate", str(tmp_path), "--dataset", str(DATASET), "--estimators", "wis",
            "--n-boot", "20", "--json"]
    batch = load_steps(DATASET)
    for extra, policy, step in (([], chosen, 20), (["--checkpoint", "final"], final, 40)):
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["step"] == step and data["checkpoint"].endswith(
            "selected.pt" if step == 20 else "final.pt")
        wis = ope.evaluate_offline(policy, batch, batch.logged_logp, gamma=0.9, n_boot=20,
                                   estimators=("wis",))[0]
        assert data["ope"]["wis"]["value"] == pytest.approx(wis.value, rel=1e-12)
    assert data["criterion"] == "final step"
    shown = CliRunner().invoke(app, args[:-1])
    assert "step 20, selected by wis" in shown.stdout, shown.stdout

    # --split validation: the ids recorded beside the checkpoints (written here, contract §2).
    held_out_ids = sorted(set(batch.episode_id.tolist()))[::5]
    digest = hashlib.sha256(json.dumps(held_out_ids, separators=(",", ":")).encode()).hexdigest()
    (tmp_path / "validation_episodes.json").write_text(
        json.dumps({"episode_ids": held_out_ids, "digest": digest}))
    result = CliRunner().invoke(app, [*args, "--split", "validation"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["split"] == "validation" and data["n_episodes"] == len(held_out_ids) == 80
    mask = np.isin(batch.episode_id[batch.episode_start].numpy(), held_out_ids)
    held_out = batch.episodes(torch.from_numpy(np.flatnonzero(mask)))
    wis = ope.evaluate_offline(chosen, held_out, held_out.logged_logp, gamma=0.9, n_boot=20,
                               estimators=("wis",))[0]
    assert data["ope"]["wis"]["value"] == pytest.approx(wis.value, rel=1e-12)
    refused = CliRunner().invoke(app, ["evaluate", "--policy", "uniform", "--dataset",
                                       str(DATASET), "--split", "validation"])
    assert refused.exit_code == 2 and "--split all" in refused.output


def _training_run(tmp_path: Path, held_out: list[int]) -> tuple[str, CategoricalPolicy,
                                                                 CategoricalPolicy]:
    """A training run as `offpg train --select-by wis` records it: the dataset input, final.pt
    (step 40) and selected.pt (step 20) with its tags, online metrics, and the validation
    episode ids it held out (`held_out`, written here as contract §2 specifies)."""
    from offpg_offline import tracking

    config = TrainConfig(gamma=0.95, seed=3, val_fraction=0.25, select_by="wis")
    _, final = _policy_file(tmp_path, config, name="final.pt", step=40, seed=0)
    _, chosen = _policy_file(tmp_path, config, name="selected.pt", step=20, seed=1)
    ids = sorted(held_out)
    digest = hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).hexdigest()
    (tmp_path / "validation_episodes.json").write_text(
        json.dumps({"episode_ids": ids, "digest": digest}))
    with tracking.MlflowTracker.start(TrackingConfig(), experiment="e", run_name="r",
                                      tags={"estimator": "per-step"}) as tracker:
        tracker.log_params(as_params(config))
        tracker.log_dataset(DATASET, read_card(DATASET))
        tracker.log_metrics({"online/return_mean": 123.0}, step=40)
        tracker.log_artifact(tmp_path / "final.pt", "checkpoints")
        tracker.log_artifact(tmp_path / "selected.pt", "checkpoints")
        tracker.log_artifact(tmp_path / "validation_episodes.json")
        tracker.set_tags({"selected_step": "20", "selected_checkpoint": "checkpoints/selected.pt"})
    return tracker.run_id, final, chosen


@pytest.mark.slow
def test_evaluate_a_run_uses_its_recorded_split_and_shipped_checkpoint_in_a_nested_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    from offpg_offline import tracking

    batch = load_steps(DATASET)
    all_ids = sorted(set(batch.episode_id.tolist()))
    held_out_ids = all_ids[1::4]  # chosen here: no seeded split draws exactly these
    run_id, _, chosen = _training_run(tmp_path, held_out_ids)
    client = tracking.open_client(TrackingConfig())
    recorded = json.loads(Path(client.download_artifacts(
        run_id, "validation_episodes.json", str(tmp_path / "dl"))).read_text())["episode_ids"]
    assert recorded == held_out_ids

    result = CliRunner().invoke(app, ["evaluate", run_id, "--estimators", "wis,fqe",
                                      "--fqe-iterations", "2", "--n-boot", "20", "--online", "2",
                                      "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    # The shipped checkpoint (selected.pt, step 20), on the recorded held-out episodes.
    assert data["checkpoint"].endswith("checkpoints/selected.pt") and data["step"] == 20
    assert data["criterion"] == "selected by wis" and data["split"] == "validation"
    mask = np.isin(batch.episode_id[batch.episode_start].numpy(), recorded)
    held_out = batch.episodes(torch.from_numpy(np.flatnonzero(mask)))
    assert held_out.n_episodes == len(recorded) == data["n_episodes"]
    wis = ope.evaluate_offline(chosen, held_out, held_out.logged_logp, gamma=0.95, n_boot=20,
                               estimators=("wis",))[0]
    assert data["ope"]["wis"]["value"] == pytest.approx(wis.value, rel=1e-12)

    # Its own record: a nested run; the training run's metrics are untouched.
    training = client.get_run(run_id)
    assert not any(key.startswith("ope/") for key in training.data.metrics)
    history = client.get_metric_history(run_id, "online/return_mean")
    assert [(m.step, m.value) for m in history] == [(40, 123.0)]
    nested = client.get_run(data["evaluation_run_id"])
    tags = nested.data.tags
    assert tags["mlflow.parentRunId"] == run_id and tags["offpg.kind"] == "evaluation"
    assert tags["offpg.eval.split"] == "validation" and tags["offpg.eval.gamma"] == "0.95"
    assert tags["offpg.eval.estimators"] == "wis,fqe" and tags["offpg.eval.seed"] == "0"
    assert tags["offpg.eval.checkpoint"] == "selected"
    assert tags["offpg.validation_digest"] == hashlib.sha256(
        json.dumps(recorded, separators=(",", ":")).encode()).hexdigest()
    training_digest = training.inputs.dataset_inputs[0].dataset.digest
    assert tags["offpg.eval.dataset_digest"] == training_digest
    assert nested.data.params["gamma"] == "0.95"
    assert nested.data.metrics["ope/wis"] == pytest.approx(wis.value, rel=1e-12)
    for key in ("ope/fqe", "online/return_mean", "online/discounted_return_mean",
                "online/discounted_return_std", "online/greedy_discounted_return_mean"):
        assert key in nested.data.metrics, key

    # --checkpoint final: the other file, another nested run.
    again = CliRunner().invoke(app, ["evaluate", run_id, "--estimators", "wis", "--n-boot", "20",
                                     "--checkpoint", "final"])
    assert again.exit_code == 0, again.output
    assert "step 40, final step" in again.stdout and "ids recorded by the run" in again.stdout
    children = client.search_runs([training.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{run_id}'")
    assert sorted(r.data.tags["offpg.eval.checkpoint"] for r in children) == ["final",
                                                                              "selected"]

    # `offpg compare` ranks by the latest evaluation (eval:…) or by training's metrics.
    final_wis = client.get_run(max(children, key=lambda r: r.info.start_time).info.run_id)
    ranked = CliRunner().invoke(app, ["compare", "e", "--metric", "eval:ope/wis", "--json",
                                      "--plot", str(tmp_path / "c.png")])
    assert ranked.exit_code == 0, ranked.output
    group = json.loads(ranked.stdout)["groups"][0]
    assert group["metric"]["mean"] == final_wis.data.metrics["ope/wis"]
    by_training = CliRunner().invoke(app, ["compare", "e", "--json", "--plot",
                                           str(tmp_path / "c.png")])
    assert json.loads(by_training.stdout)["groups"][0]["metric"]["mean"] == 123.0


@pytest.mark.slow
def test_evaluate_after_a_real_training_run_with_selection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The whole path: `offpg train --select-by wis` records its split and selected checkpoint;
    # `offpg evaluate RUN` must use exactly what the run recorded.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    from offpg_offline import tracking

    trained = CliRunner().invoke(app, [
        "train", str(DATASET), "--steps", "20", "--checkpoint-every", "10", "--select-by", "wis",
        "--val-fraction", "0.25", "--seed", "3", "--eval-episodes", "2", "--bc-steps", "10",
        "--out-dir", str(tmp_path / "out")])
    assert trained.exit_code == 0, trained.output
    client = tracking.open_client(TrackingConfig())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.estimator != ''")
    recorded = json.loads(Path(client.download_artifacts(
        run.info.run_id, "validation_episodes.json", str(tmp_path / "dl"))).read_text())
    result = CliRunner().invoke(app, ["evaluate", run.info.run_id, "--estimators", "wis",
                                      "--n-boot", "20", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["checkpoint"].endswith("checkpoints/selected.pt")
    assert data["step"] == int(run.data.tags["selected_step"])
    assert data["n_episodes"] == len(recorded["episode_ids"]) == 100
    nested = client.get_run(data["evaluation_run_id"]).data.tags
    assert nested["offpg.validation_digest"] == run.data.tags["offpg.validation_digest"]
    assert nested["offpg.eval.validation"] == "recorded"


def test_every_option_reaches_the_computation(tmp_path: Path) -> None:
    # Non-default --level, --n-boot, --seed, --delta, --fqe-iterations: the printed numbers are
    # those of evaluate_offline called with exactly these values, and differ from the defaults'.
    path, policy = _policy_file(tmp_path, TrainConfig(gamma=0.9))
    base = ["evaluate", str(path), "--dataset", str(DATASET), "--json"]
    options = ["--estimators", "is,fqe", "--level", "0.5", "--n-boot", "30", "--seed", "5",
               "--delta", "0.3", "--fqe-iterations", "3", "--critic-interval", "fixed"]
    result = CliRunner().invoke(app, [*base, *options])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["level"] == 0.5
    batch = load_steps(DATASET)
    expected = ope.evaluate_offline(policy, batch, batch.logged_logp, gamma=0.9, n_boot=30,
                                    seed=5, level=0.5, delta=0.3, estimators=("is",))[0]
    fqe, refit = (ope.evaluate_offline(
        policy, batch, batch.logged_logp, gamma=0.9, n_boot=30, seed=5, level=0.5,
        fqe=ope.FQEConfig(iterations=3), estimators=("fqe",), critic_interval=kind)[0]
        for kind in ("fixed", "refit"))
    got = data["ope"]["is"]
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(
        (expected.ci_low, expected.ci_high), rel=1e-12)
    assert got["lower_bound"] == pytest.approx(expected.lower_bound, rel=1e-12)
    assert data["ope"]["fqe"]["value"] == pytest.approx(fqe.value, rel=1e-6)
    assert data["critic_interval"] == "fixed"
    assert (data["ope"]["fqe"]["ci_low"], data["ope"]["fqe"]["ci_high"]) == pytest.approx(
        (fqe.ci_low, fqe.ci_high), rel=1e-6)
    assert (refit.ci_low, refit.ci_high) != pytest.approx((fqe.ci_low, fqe.ci_high), rel=1e-3)
    default = ope.evaluate_offline(policy, batch, batch.logged_logp, gamma=0.9, n_boot=30,
                                   estimators=("is",))[0]
    assert (default.ci_low, default.lower_bound) != pytest.approx(
        (expected.ci_low, expected.lower_bound), rel=1e-3)  # the options change the numbers

    # --propensity picks the column (this log has no estimated_logp), --env the environment.
    estimated = CliRunner().invoke(app, [*base, "--estimators", "is", "--propensity",
                                         "estimated"])
    assert estimated.exit_code == 2 and "estimated_logp" in estimated.output
    # An id gymnasium does not know is refused up front; a registered one that does not fit
    # the policy (Acrobot: 6-dim observations, 3 actions) is where the rollouts run.
    unknown = CliRunner().invoke(app, [*base, "--estimators", "is", "--n-boot", "5",
                                       "--online", "1", "--env", "NoSuchEnv-v0"])
    assert unknown.exit_code == 2 and "--env 'NoSuchEnv-v0'" in unknown.stderr
    other_env = CliRunner().invoke(app, [*base, "--estimators", "is", "--n-boot", "5",
                                         "--online", "1", "--env", "Acrobot-v1"])
    assert other_env.exit_code == 2, other_env.output
    assert "environment Acrobot-v1 gives observations of 6 numbers" in other_env.stderr


def test_a_table_gets_the_critic_estimators_only_where_it_covers_the_next_states() -> None:
    from offpg_offline.jobs.evaluate import evaluate

    # cartpole-weak: every episode terminates, so no next-state value is ever needed.
    probs = _behavior_table(_columns())
    done = evaluate(dataset=DATASET, policy=probs, config=EvaluateConfig(
        estimators=("wis", "fqe"), fqe_iterations=2, n_boot=5))
    assert [e.name for e in done.estimates] == ["wis", "fqe"]
    # cartpole-eps: 24 episodes are cut at the time limit; π at their last next state is unknown.
    eps = DATASET.parent / "cartpole-eps"
    table = pq.read_table(next(eps.glob("*.parquet")), columns=["action", "logged_logp",
                                                                 "truncated"])
    cols = {"action": table.column("action").to_numpy(),
            "logged_logp": table.column("logged_logp").to_numpy().astype(np.float64)}
    with pytest.raises(ValueError, match=r"next state of 24 non-terminal row\(s\)"):
        evaluate(dataset=eps, policy=_behavior_table(cols), config=EvaluateConfig(
            estimators=("wis", "fqe"), fqe_iterations=2, n_boot=5))
    evaluate(dataset=eps, policy=_behavior_table(cols), config=EvaluateConfig(
        estimators=("wis",), n_boot=5))  # the IS family needs π only on the logged states


def test_evaluate_options_are_generated_from_evaluate_config() -> None:
    """Every `EvaluateConfig` field is an option of `offpg evaluate` with the field's help and
    its default shown (issue 14.3): adding a field adds the option."""
    import dataclasses

    import typer

    command = typer.main.get_command(app).commands["evaluate"]  # type: ignore[attr-defined]
    params = {opt: param for param in command.params for opt in param.opts}
    rendered = " ".join(CliRunner(env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"}).invoke(
        app, ["evaluate", "--help"]).output.split())
    for f in dataclasses.fields(EvaluateConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in params, f"no option for EvaluateConfig.{f.name}"
        assert params[flag].help == f.metadata["help"]
        assert flag in rendered
    assert "[default: (1000)]" in rendered and "[default: (refit)]" in rendered  # n-boot's, ...
    assert "[default: (is,wis,pdis,wpdis,dr,wdr,fqe)]" in rendered  # --estimators'
