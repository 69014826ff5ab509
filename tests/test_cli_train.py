"""`offpg train` end to end through CliRunner, recorded in a real sqlite MLflow store."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from typer.testing import CliRunner

from offpg_offline.cli import app
from offpg_offline.config import TrackingConfig, TrainConfig, parse_config

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


# --- options generated from the config (issue 14.3) and validated at parse time (13.5, 13.7) ---


def _train_command() -> Any:
    return typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]


def test_help_shows_every_config_field_with_its_doc_and_default() -> None:
    command = _train_command()
    params = {opt: param for param in command.params for opt in param.opts}
    rendered = CliRunner(env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"}).invoke(
        app, ["train", "--help"]).output
    for cls in (TrainConfig, TrackingConfig):
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            assert flag in params, f"no option for {cls.__name__}.{f.name}"
            assert params[flag].help == f.metadata["help"]
            default = f.default
            shown = (f.metadata.get("none", "none") if default is None else str(default).lower()
                     if isinstance(default, bool) else ",".join(map(str, default))
                     if isinstance(default, tuple) else getattr(default, "value", default))
            assert params[flag].show_default == str(shown), flag
            assert flag in rendered
    assert rendered.count("[default: ") >= len(dataclasses.fields(TrainConfig))
    assert "[default: (2.0)]" in " ".join(rendered.split())  # --clip's


def test_clip_none_trains_unclipped_and_its_config_reruns_unclipped(workdir: Path) -> None:
    from mlflow import MlflowClient

    result = CliRunner().invoke(
        app, ["train", str(DATASETS / "cartpole-weak"), *FAST, "--clip", "none"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cartpole-weak").experiment_id])
    assert run.data.params["clip"] == "none"
    assert run.info.run_name == "per-step-kl2-s0"  # no clip part in the name
    saved = Path(client.download_artifacts(run.info.run_id, "config.toml", str(workdir)))
    assert 'clip = "none"' in saved.read_text().splitlines()
    again = CliRunner().invoke(app, ["train", str(DATASETS / "cartpole-weak"), "--config",
                                     str(saved), "--experiment", "rerun"])
    assert again.exit_code == 0, again.output
    (rerun,) = client.search_runs([client.get_experiment_by_name("rerun").experiment_id])
    assert rerun.data.params["clip"] == "none"
    assert {k: v for k, v in rerun.data.params.items() if k != "experiment"} == {
        k: v for k, v in run.data.params.items() if k != "experiment"}


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--kl-coef", "nan"], "error: --kl-coef must be a finite number, got nan"),
        (["--lr", "inf"], "error: --lr must be a finite number, got inf"),
        (["--seed", str(2**64)],
         f"error: --seed must fit in a signed 64-bit integer (below 2**63), got {2**64}"),
        (["--hidden", "64,1000000000"],
         "error: --hidden sizes must lie in (0, 65536], got 1000000000"),
        (["--gamma", "none"], "error: Invalid value for '--gamma': 'none' is not a valid float"),
        (["--select-by", "wis", "--val-fraction", "0"],
         "error: --select-by needs a validation split: set val_fraction > 0"),
        (["--out-dir", "a-file"], "error: --out-dir a-file is a file, not a folder"),
        (["--estimator", "per-decision", "--ppo-epsilon", "0.2"],
         "error: option ppo_epsilon=0.2 is not supported by the per-decision estimator"),
        (["--estimator", "greedy-critic"],
         "error: the greedy-critic estimator needs continuous actions"),
        (["--estimator", "greedy-critic", "--init", "random"],
         "error: option init=random is not supported by the greedy-critic estimator"),
        (["--out-dir", "a-file/sub"], "error: --out-dir a-file/sub cannot be created: a-file is"),
        (["--env", "NoSuchEnv-v3"],
         "error: --env 'NoSuchEnv-v3' is not a registered gymnasium environment; check the id"),
        (["--env", "cartpole-v1"], "error: --env 'cartpole-v1' is not a registered gymnasium "
                                   "environment; did you mean CartPole-v0, CartPole-v1?"),
    ],
)
def test_bad_values_are_one_line_naming_the_option_before_any_tracking(
    workdir: Path, args: list[str], line: str
) -> None:
    (workdir / "a-file").write_text("not a folder")
    result = CliRunner().invoke(app, ["train", str(DATASETS / "cartpole-weak"), *args])
    assert result.exit_code == 2, result.output
    (only,) = result.stderr.splitlines()
    assert only.startswith(line), only
    assert "Traceback" not in result.output
    assert sorted(p.name for p in workdir.iterdir()) == ["a-file"]  # no mlflow.db, no runs/


@pytest.mark.slow  # ~40 s: BC, checkpoints, OPE selection and evaluation every 2 steps
def test_every_option_reaches_the_recorded_config(workdir: Path) -> None:
    """Each generated option, given a non-default value, lands in the run's config.toml."""
    given = {
        "estimator": "past-weight", "propensity": "logged", "gamma": "0.9", "steps": "4",
        "lr": "0.002", "batch_episodes": "8", "batch_steps": "64", "hidden": "8x4",
        "policy": "categorical", "clip": "3", "clip_mode": "cumulative", "kl_coef": "0.5",
        "ppo_epsilon": "0.3", "baseline": "constant", "init": "bc", "bc_steps": "2",
        "val_fraction": "0.25", "seed": "5", "threads": "1", "device": "cpu",
        "memory_budget": "1.5", "shuffle_buffer_episodes": "16", "log_every": "2",
        "checkpoint_every": "2", "eval_every": "2", "eval_episodes": "1", "select_by": "wis",
        "env": "CartPole-v1", "discount_weighting": "discounted",
        # critic_lambda ≠ 0 is refused by past-weight (tests/test_wiring.py); 0 still lands.
        "critic_lambda": "0",
    }
    flags = {"self_normalize": True, "standardize_returns": True, "psis": True,
             "stream": False, "verify": True, "allow_env_entry_point": False}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(given) | set(flags) == fields  # a new field must be added here
    args = [str(DATASETS / "cartpole-weak"), "--experiment", "all-options", "--run-name", "r"]
    for key, text in given.items():
        args += ["--" + key.replace("_", "-"), text]
    for key, on in flags.items():
        args.append(("--" if on else "--no-") + key.replace("_", "-"))
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("all-options").experiment_id])
    assert run.info.run_name == "r"
    saved = Path(client.download_artifacts(run.info.run_id, "config.toml", str(workdir)))
    recorded = parse_config(saved.read_text(), source="config.toml").train
    for key, text in given.items():
        expected = tuple(int(h) for h in text.split("x")) if key == "hidden" else text
        value = getattr(recorded, key)
        assert str(getattr(value, "value", value)) == str(expected) or value == type(value)(
            text), key
    for key, on in flags.items():
        assert getattr(recorded, key) is on, key


def test_behavior_fit_options_are_generated_from_fit_config() -> None:
    from offpg_offline.config import FitConfig

    command = typer.main.get_command(app).commands["behavior"].commands["fit"]  # type: ignore
    params = {opt: param for param in command.params for opt in param.opts}
    for f in dataclasses.fields(FitConfig):
        flag = "--" + f.name.replace("_", "-")
        assert params[flag].help == f.metadata["help"], flag


def test_behavior_fit_option_errors_name_the_option(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["behavior", "fit", str(DATASETS / "cartpole-weak"),
                                      "--out", "x", "--floor", "nan", "--no-track"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --floor must be a finite number, got nan"
    assert not (workdir / "x").exists()


def test_a_newline_in_a_file_name_stays_on_the_one_error_line(workdir: Path) -> None:
    odd = workdir / "line one\nline two\x1b[31m"
    odd.mkdir()
    result = CliRunner().invoke(app, ["train", str(odd)])
    assert result.exit_code == 2
    (only,) = result.stderr.splitlines()
    assert "line one\\nline two\\x1b[31m is not a dataset folder" in only


def test_a_usage_error_is_one_line_naming_the_option(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["train", str(DATASETS / "cartpole-weak"), "--lr", "fast"])
    assert result.exit_code == 2
    (only,) = result.stderr.splitlines()  # not click's usage panel
    assert only.startswith("error: Invalid value for '--lr': 'fast' is not a valid float (see `")
    assert only.endswith(" train --help`)")  # the program name is CliRunner's here


def test_training_logs_the_discounted_online_return_with_the_runs_gamma(workdir: Path) -> None:
    """Issue 12.4: next to Σ_t r_t, training logs Σ_t γ^t r_t with the run's γ (the quantity
    `ope/*` estimates). CartPole pays 1 per step, so one episode of length L has the
    discounted return (1 − γ^L)/(1 − γ) exactly (a hand formula, not the rollout code)."""
    from mlflow import MlflowClient

    gamma = 0.9
    result = CliRunner().invoke(app, ["train", str(DATASETS / "cartpole-weak"), "--steps", "5",
                                      "--init", "random", "--baseline", "none",
                                      "--eval-episodes", "1", "--gamma", str(gamma)])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cartpole-weak").experiment_id])
    metrics = run.data.metrics
    assert run.data.params["gamma"] == str(gamma)
    for kind in ("", "greedy_"):
        length = metrics[f"online/{kind}return_mean"]  # one episode: its length
        assert length >= 1 and length == int(length)
        expected = (1 - gamma ** length) / (1 - gamma)
        # float32/float64 sum of ≤ 500 terms ≤ 10 in magnitude: 1e-9 relative is ample
        assert metrics[f"online/{kind}discounted_return_mean"] == pytest.approx(expected, rel=1e-9)
        assert metrics[f"online/{kind}discounted_return_std"] == 0.0


def test_the_summary_says_to_deploy_the_greedy_policy_and_quotes_this_runs_returns(
    workdir: Path,
) -> None:
    """Issue 15: the run summary names the form to deploy (greedy: at least the stochastic
    policy's return on six of the seven shipped logs in scripts/bench_quality.py) and quotes
    the two online returns the run recorded, so a user sees when this run is the exception."""
    from mlflow import MlflowClient

    result = CliRunner().invoke(app, ["train", str(DATASETS / "cartpole-weak"), *FAST])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cartpole-weak").experiment_id])
    greedy = run.data.metrics["online/greedy_return_mean"]
    stochastic = run.data.metrics["online/return_mean"]
    (line,) = [ln for ln in result.output.splitlines() if ln.startswith("deploy:")]
    assert "the greedy policy (policy.mode(obs)" in line
    assert f"here {greedy:.4g} greedy vs {stochastic:.4g} stochastic" in line
    verdict = "greedy higher" if greedy >= stochastic else "stochastic higher in this run"
    assert line.endswith(f"{verdict})")
