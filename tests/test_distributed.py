"""Data-parallel training: shares of a batch, 2 gloo processes against 1, streaming, devices."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from offpg_offline.cli import app
from offpg_offline.config import Baseline, EstimatorName, Init, TrainConfig, build
from offpg_offline.data.batch import load_steps
from offpg_offline.data.spaces import space_from_json
from offpg_offline.data.store import read_card
from offpg_offline.distributed import Context, local_part, resolve_device
from offpg_offline.estimators import ESTIMATORS
from offpg_offline.policies import make_policy
from offpg_offline.train import NullTracker, surrogate, train
from offpg_offline.training.batches import make_batches, make_view, rank_share, use_streaming

DATASETS = Path(__file__).resolve().parents[1] / "datasets"
WEAK = DATASETS / "cartpole-weak"
PENDULUM = DATASETS / "pendulum-gauss"
CPU = torch.device("cpu")


class TagRecorder(NullTracker):
    def __init__(self) -> None:
        self.tags: dict[str, str] = {}
        self.metrics: dict[str, float] = {}

    def set_tags(self, tags):  # type: ignore[no-untyped-def]
        self.tags.update(tags)

    def log_metrics(self, metrics, *, step):  # type: ignore[no-untyped-def]
        self.metrics.update(metrics)


def _gradient(policy: torch.nn.Module, view, config: TrainConfig, kl_weight: float = 1.0):  # type: ignore[no-untyped-def]
    policy.zero_grad()
    loss, _ = surrogate(policy, view, config, kl_weight=kl_weight)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in policy.parameters()])


def _sum_of_absolute_terms(policy: torch.nn.Module, view, config: TrainConfig) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """S_j = Σ_i |∂L/∂log π_θ(a_i|s_i)| · |∂log π_θ(a_i|s_i)/∂θ_j|: the magnitude of the M
    per-row terms whose float32 sum is gradient coordinate j (loss and KL penalty together)."""
    loss, target_logp = surrogate(policy, view, config)
    (per_row,) = torch.autograd.grad(loss, target_logp, retain_graph=True)
    jacobian = torch.autograd.grad(
        target_logp,
        list(policy.parameters()),
        grad_outputs=torch.eye(len(target_logp)),
        is_grads_batched=True,  # one backward per row, vectorised: [M, *param.shape] each
    )
    rows = torch.cat([j.reshape(len(target_logp), -1) for j in jacobian], dim=1)
    return (per_row.abs()[:, None] * rows.abs()).sum(0)


@pytest.mark.parametrize("kl_coef", [0.0, 2.0])
# greedy-critic is for continuous actions; its loss is critic's with other columns, and its
# closed-form KL is a mean over rows weighted like the KL here (tests/test_greedy_critic.py).
@pytest.mark.parametrize("estimator", [e for e in EstimatorName if e.value != "greedy-critic"])
def test_mean_of_rank_gradients_is_the_global_batch_gradient(
    estimator: EstimatorName, kl_coef: float
) -> None:
    # The identity data-parallel training rests on: each surrogate is a mean over its units
    # (episodes, or steps for per-step), so with equal shares the average of the N ranks'
    # gradients is the gradient on the global batch; the KL penalty, a mean over rows, is
    # weighted by N·M_r/M (`distributed.row_weight`).
    config = TrainConfig(
        kl_coef=kl_coef,
        estimator=estimator,
        batch_episodes=8,
        batch_steps=64,
        init=Init.RANDOM,
        baseline=Baseline.CONSTANT,
    )
    batch = load_steps(WEAK)
    card = read_card(WEAK)
    torch.manual_seed(0)
    policy = make_policy(
        space_from_json(card["observation_space"]),
        space_from_json(card["action_space"]),
        kind=config.policy,
        hidden=(16,),
        obs_mean=batch.obs.mean(0),
        obs_std=batch.obs.std(0),
    )
    assert batch.logged_logp is not None
    # value_of: V̂ ≡ 3 for the critic estimator's targets (ignored by the others)
    view = make_view(batch, batch.logged_logp, config, baseline=None,
                     value_of=lambda v: torch.full_like(v.reward, 3.0))
    view = dataclasses.replace(view, baseline=torch.full_like(view.reward, 3.0))
    global_batch = next(make_batches(view, config))
    whole = _gradient(policy, global_batch, config)
    shares = [rank_share(global_batch, config, Context(rank, 4, rank, CPU)) for rank in range(4)]
    as_steps = ESTIMATORS[estimator.value].unit == "step"  # per-step, critic
    units = [s.n_rows if as_steps else s.n_episodes for s in shares]
    assert units == [len(units) and (64 if as_steps else 8) // 4] * 4
    weights = [4 * share.n_rows / global_batch.n_rows for share in shares]
    averaged = torch.stack(
        [_gradient(policy, share, config, w) for share, w in zip(shares, weights, strict=True)]
    ).mean(0)
    # Both sides are float32 sums of the same M per-row terms, in two orders (and the order
    # depends on the CPU's kernels: AVX-512 blocks reductions unlike AVX2 or scalar code).
    # Summing M terms in any order errs by at most (M-1)·eps·Σ|terms| (Higham 2002, §4.2);
    # torch's blocked and pairwise reductions stay near log2(M)·eps·Σ|terms|. Two sums are
    # compared: 2·log2(M)·eps·S per coordinate (measured: at most 5·eps·S at M = 277 rows,
    # against 16·eps·S allowed). Dropping the KL row weight moves some coordinate by 2,300 to
    # 21,000·eps·S on the episodic estimators (measured), over 100 times the bound.
    eps = torch.finfo(torch.float32).eps
    magnitude = _sum_of_absolute_terms(policy, global_batch, config)
    bound = 2 * math.log2(global_batch.n_rows) * eps * magnitude
    excess = (averaged - whole).abs() - bound
    assert bool((excess <= 0).all()), (
        f"coordinate {int(excess.argmax())}: |Δ| exceeds 2·log2(M)·eps·S by {float(excess.max())}"
    )


def test_a_batch_that_does_not_split_evenly_is_refused() -> None:
    assert local_part(8, Context(1, 2, 1, CPU)) == slice(4, 8)
    with pytest.raises(ValueError, match="cannot be split evenly over 2 processes"):
        local_part(7, Context(0, 2, 0, CPU))


def test_cuda_without_a_gpu_is_one_sentence() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == CPU
    with pytest.raises(ValueError, match="torch sees no CUDA GPU; use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda"):
        TrainConfig(device="tpu")


def test_logs_over_the_memory_budget_are_streamed() -> None:
    card = read_card(WEAK)  # 13,856 steps of 4-d observations: about 2 MB in memory
    assert not use_streaming(card, TrainConfig())
    assert use_streaming(card, TrainConfig(memory_budget=0.001))
    assert use_streaming(card, TrainConfig(stream=True))


@pytest.mark.slow
def test_streamed_training_reads_a_bounded_sample_and_trains(tmp_path: Path) -> None:
    tracker = TagRecorder()
    config = TrainConfig(
        estimator=EstimatorName.PER_DECISION,
        steps=30,
        log_every=10,
        batch_episodes=16,
        bc_steps=50,
        memory_budget=0.001,
        shuffle_buffer_episodes=32,
        eval_episodes=1,
        device="cpu",
    )
    result = train(WEAK, config, tracker=tracker, out_dir=tmp_path)
    assert tracker.tags["data.streamed"] == "true"
    assert len(result.train_episodes) == 320 and len(result.validation_episodes) == 80
    assert result.checkpoint.is_file()
    for key in ("train/loss", "weights/ess_fraction", "ope/pdis_validation"):
        assert torch.isfinite(torch.tensor(tracker.metrics[key])), key
    # Streamed, the split is the in-memory trainer's (so `offpg evaluate` finds the same one).
    in_memory = train(
        WEAK,
        dataclasses.replace(config, memory_budget=2.0, steps=1, init=Init.RANDOM),
        out_dir=tmp_path / "memory",
    )
    assert in_memory.validation_episodes == result.validation_episodes


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_policy_as_one(tmp_path: Path) -> None:
    # torchrun starts 2 ranks; each takes 4 of the 8 episodes of every global batch and the
    # gradients are averaged. The reference is one process on the same global batches.
    options = {
        "estimator": "per-decision",
        "steps": 15,
        "batch_episodes": 8,
        "bc_steps": 40,
        "baseline": "value",
        "log_every": 5,
        "eval_episodes": 1,
        "device": "cpu",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(Path(__file__).with_name("ddp_worker.py")),
        str(WEAK),
        str(tmp_path / "two"),
        json.dumps(options),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = train(WEAK, build(TrainConfig, "train", options), out_dir=tmp_path / "one")
    two = torch.load(tmp_path / "two" / "final.pt", weights_only=True)["state_dict"]
    reference = torch.load(one.checkpoint, weights_only=True)["state_dict"]
    assert two.keys() == reference.keys()
    for name, value in reference.items():
        # 15 Adam steps on float32 gradients summed in two orders. Adam moves each coordinate
        # by about lr = 1e-3 per step: atol 1e-5 is 1% of one step.
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_offpg_train_nproc_launches_torchrun_and_tracks_on_rank_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wrapper end to end, streamed: 2 ranks read disjoint episodes through their own
    # shuffle buffers (so no equality with one process here), rank 0 alone records the run.
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(WEAK),
            "--nproc",
            "2",
            "--stream",
            "--steps",
            "10",
            "--batch-steps",
            "128",
            "--init",
            "random",
            "--baseline",
            "none",
            "--eval-episodes",
            "1",
            "--device",
            "cpu",
            "--out-dir",
            str(tmp_path / "ckpt"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [  # rank 0's files only
        "final.pt",
        "validation_episodes.json",
    ]
    runs = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [
            e.experiment_id
            for e in MlflowClient(
                tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"
            ).search_experiments()
        ]
    )
    assert len(runs) == 1
    tags = runs[0].data.tags
    assert tags["distributed.world_size"] == "2" and tags["data.streamed"] == "true"
    assert runs[0].data.params["stream"] == "True"
    assert "train/loss" in runs[0].data.metrics


def test_nproc_is_checked_before_torchrun_starts() -> None:
    result = CliRunner().invoke(app, ["train", str(WEAK), "--nproc", "0"])
    assert result.exit_code == 2
    assert "--nproc must be at least 1" in result.output
    result = CliRunner().invoke(app, ["train", str(WEAK), "--nproc", "3"])  # 2048 steps
    assert result.exit_code == 2
    assert "--batch-steps 2048 cannot be split evenly over 3 processes" in result.output


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_greedy_critic_policy_as_one(tmp_path: Path) -> None:
    # greedy-critic: each rank runs the same critic steps on the same rows (the critic is
    # replicated), takes 1024 of the 2048 rows of every batch, and the anchor is weighted by
    # `row_weight`. The reference is one process on the same global batches.
    options = {"estimator": "greedy-critic", "steps": 10, "bc_steps": 40, "log_every": 5,
               "eval_episodes": 1, "device": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(Path(__file__).with_name("ddp_worker.py")),
               str(PENDULUM), str(tmp_path / "two"), json.dumps(options)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = train(PENDULUM, build(TrainConfig, "train", options), out_dir=tmp_path / "one")
    two = torch.load(tmp_path / "two" / "final.pt", weights_only=True)
    reference = torch.load(one.checkpoint, weights_only=True)
    for name, value in reference["state_dict"].items():
        # 10 Adam steps of lr 2.5e-4 on float32 gradients summed in two orders (and a critic
        # fitted to two policies that differ by that rounding): atol 1e-5 is 4% of one step.
        torch.testing.assert_close(two["state_dict"][name], value, rtol=1e-4, atol=1e-5,
                                   msg=name)
    for name, value in reference["extra"]["clone"].items():  # the same clone on every rank
        assert torch.equal(two["extra"]["clone"][name], value), name
