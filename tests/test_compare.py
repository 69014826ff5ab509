"""`offpg compare` ranks known runs: grouping by config minus seed, mean ± sd, the plot.

The runs are logged directly through MlflowTracker into a real sqlite store with metric values
chosen here, so every number in the table is worked out by hand.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from offpg_offline.cli import app
from offpg_offline.compare import attach_evaluations, config_key, pick_ope, summarize
from offpg_offline.config import TrackingConfig
from offpg_offline.tracking import MlflowTracker, RunRecord

# (estimator, clip, seed) -> (online/return_mean, weights/ess_fraction)
KNOWN = {
    ("per-step", "2.0", "0"): (100.0, 0.9),
    ("per-step", "2.0", "1"): (120.0, 0.7),
    ("per-step", "2.0", "2"): (110.0, 0.8),
    ("per-decision", "2.0", "0"): (150.0, 0.2),
    ("per-decision", "2.0", "1"): (50.0, 0.4),
    ("per-decision", "none", "0"): (90.0, 0.05),
}


def _log_known_runs(uri: str) -> tuple[str, dict[tuple[str, str, str], str]]:
    """A sweep parent and the KNOWN runs as its children; returns their ids."""
    config = TrackingConfig(uri=uri)
    ids = {}
    with MlflowTracker.start(config, experiment="known", run_name="sweep",
                             tags={"offpg.sweep": "true"}) as sweep:
        parent_id = sweep.run_id
    for (estimator, clip, seed), (ret, ess) in KNOWN.items():
        tags = {"estimator": estimator, "mlflow.parentRunId": parent_id}
        with MlflowTracker.start(config, experiment="known", run_name=f"{estimator}-{clip}-s{seed}",
                                 tags=tags) as tracker:
            tracker.log_params({"estimator": estimator, "clip": clip, "seed": seed,
                                "threads": seed, "lr": 0.001})
            tracker.log_metrics({"online/return_mean": ret - 1000}, step=5)  # superseded
            tracker.log_metrics({"online/return_mean": ret, "weights/ess_fraction": ess}, step=10)
            if (estimator, clip) == ("per-decision", "none"):
                tracker.log_metrics({"ope/wdr": 80.0, "ope/wdr_ci_low": 70.0,
                                     "ope/wdr_ci_high": 95.0}, step=10)
            ids[(estimator, clip, seed)] = tracker.run_id
    # Neither a failed run nor one without an estimator tag (a behavior fit) is compared.
    with pytest.raises(RuntimeError), MlflowTracker.start(
            config, experiment="known", run_name="failed", tags={"estimator": "trajectory"}) as bad:
        bad.log_metrics({"online/return_mean": 1e6}, step=1)
        raise RuntimeError("crashed")
    with MlflowTracker.start(config, experiment="known", run_name="behavior-fit") as other:
        other.log_metrics({"online/return_mean": 1e6}, step=1)
    return parent_id, ids


def test_summarize_groups_by_config_minus_seed_and_ranks_by_mean() -> None:
    runs = [
        RunRecord(f"r{i}", f"r{i}", {"estimator": e, "clip": c, "seed": s, "threads": s},
                  {"online/return_mean": ret, "weights/ess_fraction": ess}, {})
        for i, ((e, c, s), (ret, ess)) in enumerate(KNOWN.items())
    ]
    groups = summarize(runs, "online/return_mean")
    # Means: per-step/2.0 = 110, per-decision/2.0 = 100, per-decision/none = 90.
    assert [(g.estimator, g.options, g.metric.mean) for g in groups] == [
        ("per-step", {"clip": "2.0"}, 110.0),
        ("per-decision", {"clip": "2.0"}, 100.0),
        ("per-decision", {"clip": "none"}, 90.0),
    ]
    assert groups[0].seeds == ("0", "1", "2")
    assert groups[0].metric.sd == pytest.approx(10.0)  # sample sd of 100, 120, 110
    assert groups[1].metric.sd == pytest.approx(statistics.stdev([150.0, 50.0]))  # 70.71
    assert groups[2].metric.sd is None and groups[2].metric.n == 1
    assert groups[0].ess.mean == pytest.approx(0.8)
    ascending = summarize(runs, "online/return_mean", lower_is_better=True)
    assert [g.metric.mean for g in ascending] == [90.0, 100.0, 110.0]
    assert [g.estimator for g in summarize(runs, "no/such_metric")] == sorted(
        g.estimator for g in groups)  # all unranked: by label


def test_ranking_by_evaluation_uses_each_runs_latest_validation_evaluation() -> None:
    # Training logged ope/wdr 30 (a) and 20 (b); evaluations (oldest first) say otherwise:
    # a's latest validation evaluation is 5 (its earlier 50 is superseded; one on all episodes
    # of another dataset, 99, is not comparable and ignored), b's is 7.
    runs = [RunRecord("a", "a", {"estimator": "per-step", "lr": "0.1"}, {"ope/wdr": 30.0}, {}),
            RunRecord("b", "b", {"estimator": "per-step", "lr": "0.2"}, {"ope/wdr": 20.0}, {})]

    def evaluation(parent: str, split: str, value: float) -> RunRecord:
        tags = {"mlflow.parentRunId": parent, "offpg.eval.split": split,
                "offpg.kind": "evaluation"}
        return RunRecord(f"e-{parent}-{value}", "eval", {}, {"ope/wdr": value}, tags)

    evaluations = [evaluation("a", "validation", 50.0), evaluation("b", "validation", 7.0),
                   evaluation("a", "validation", 5.0), evaluation("a", "all", 99.0)]
    attached = attach_evaluations(runs, evaluations)
    assert [r.metrics for r in attached] == [{"ope/wdr": 30.0, "eval:ope/wdr": 5.0},
                                             {"ope/wdr": 20.0, "eval:ope/wdr": 7.0}]
    assert runs[0].metrics == {"ope/wdr": 30.0}  # the training records are not modified
    by_eval = summarize(attached, "eval:ope/wdr")
    by_training = summarize(attached, "ope/wdr")
    assert [g.run_ids for g in by_eval] == [("b",), ("a",)]
    assert [g.run_ids for g in by_training] == [("a",), ("b",)]
    assert [g.metric.mean for g in by_eval] == [7.0, 5.0]
    flipped = attach_evaluations(runs, [*evaluations, evaluation("a", "validation", 8.0)])
    assert [g.run_ids for g in summarize(flipped, "eval:ope/wdr")] == [("a",), ("b",)]


def test_config_key_ignores_seed_and_threads_only() -> None:
    assert config_key({"seed": "1", "threads": "4", "lr": "0.1"}) == (("lr", "0.1"),)
    assert config_key({"seed": "1", "lr": "0.1"}) != config_key({"seed": "1", "lr": "0.2"})


def test_pick_ope_prefers_an_estimate_with_an_interval() -> None:
    def run(metrics: dict[str, float]) -> RunRecord:
        return RunRecord("r", "r", {}, metrics, {})

    assert pick_ope([run({"ope/pdis_validation": 1.0})]) == "ope/pdis_validation"
    assert pick_ope([run({"ope/pdis_validation": 1.0, "ope/wis": 2.0,
                          "ope/wis_ci_low": 1.0, "ope/wis_ci_high": 3.0})]) == "ope/wis"
    assert pick_ope([run({"ope/wis": 1.0, "ope/wdr": 2.0})]) == "ope/wdr"
    assert pick_ope([run({"train/loss": 1.0})]) is None


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One sqlite store for the CLI tests (creating one costs seconds of migrations)."""
    path = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{path}/mlflow.db"
    parent_id, ids = _log_known_runs(uri)
    return {"uri": uri, "path": path, "parent": parent_id, "ids": ids}


def test_compare_json_ranks_known_runs(store: dict[str, object]) -> None:
    result = CliRunner().invoke(app, ["compare", "known", "--json"],
                                env={"MLFLOW_TRACKING_URI": store["uri"]})
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["metric"] == "online/return_mean" and report["ope"] == "ope/wdr"
    rows = [(g["estimator"], g["options"], g["metric"]["mean"], g["metric"]["sd"], g["seeds"])
            for g in report["groups"]]
    assert rows == [
        ("per-step", {"clip": "2.0"}, 110.0, pytest.approx(10.0), ["0", "1", "2"]),
        ("per-decision", {"clip": "2.0"}, 100.0, pytest.approx(70.7107, abs=1e-4), ["0", "1"]),
        ("per-decision", {"clip": "none"}, 90.0, None, ["0"]),
    ]
    ids = store["ids"]
    assert report["groups"][0]["run_ids"] == [ids[("per-step", "2.0", s)] for s in "012"]
    assert report["groups"][2]["ope"]["mean"] == 80.0
    assert report["groups"][2]["ope_interval"] == [70.0, 95.0]
    assert report["groups"][0]["ess"]["mean"] == pytest.approx(0.8)


def test_compare_table_and_plot_logged_to_the_sweep(store: dict[str, object]) -> None:
    from mlflow import MlflowClient

    plot = Path(str(store["path"])) / "out" / "cmp.png"
    result = CliRunner().invoke(app, ["compare", "--plot", str(plot)],  # latest experiment
                                env={"MLFLOW_TRACKING_URI": store["uri"]})
    assert result.exit_code == 0, result.output
    ranked = [line for line in result.output.splitlines() if line[:1].isdigit()]
    assert [line.split()[:4] for line in ranked] == [
        ["1", "per-step", "clip=2.0", "3"], ["2", "per-decision", "clip=2.0", "2"],
        ["3", "per-decision", "clip=none", "1"],
    ]
    assert "110 ± 10" in ranked[0] and "100 ± 70.7" in ranked[1]
    assert "80 [70, 95]" in ranked[2]  # a single run shows its logged interval
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # All compared runs share the sweep parent, so the plot is logged there too.
    client = MlflowClient(tracking_uri=str(store["uri"]))
    logged = [f.path for f in client.list_artifacts(str(store["parent"]), "compare")]
    assert logged == ["compare/compare_online_return_mean.png"]


def test_compare_errors_are_one_sentence(store: dict[str, object]) -> None:
    env = {"MLFLOW_TRACKING_URI": str(store["uri"])}
    result = CliRunner().invoke(app, ["compare", "nope"], env=env)
    assert result.exit_code == 2
    assert "no MLflow experiment named 'nope'" in result.output
    result = CliRunner().invoke(app, ["compare", "known", "--sweep", "0" * 32], env=env)
    assert result.exit_code == 2
    assert f"no finished training runs in sweep {'0' * 32}" in result.output
