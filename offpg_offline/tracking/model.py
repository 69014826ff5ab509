"""A trained policy as an MLflow pyfunc model: `PolicyModel` and `log_policy_model`."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.models import Model, infer_signature

_PACKAGE = Path(__file__).resolve().parents[1]  # offpg_offline/, copied into each model
_MODEL_CODE = """\
# An offpg-offline policy (MLflow "models from code"); the package is under code/.
import mlflow

from offpg_offline.tracking.model import PolicyModel

mlflow.models.set_model(PolicyModel())
"""


def _requirements(torch_version: str) -> list[str]:
    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch_version.split('+')[0]}",  # "2.13.0+cpu": the local part names a wheel index
        f"numpy=={np.__version__}",
    ]


class PolicyModel(mlflow.pyfunc.PythonModel):
    """A trained policy as an MLflow pyfunc: observations in, greedy actions out.

    The checkpoint travels as the model artifact `checkpoint`; `load_context` rebuilds the
    policy with `policies.policy_from_checkpoint`. `predict` takes float32 observations
    [n, d_obs] (or a DataFrame of d_obs float32 columns in feature order) and returns int64
    actions [n] for a discrete action space, float32 [n, d_act] for a Box.
    """

    def load_context(self, context: Any) -> None:
        self.load_checkpoint(Path(context.artifacts["checkpoint"]))

    def load_checkpoint(self, path: Path) -> None:
        from offpg_offline.policies import load_checkpoint, policy_from_checkpoint

        self._policy = policy_from_checkpoint(load_checkpoint(path))
        self._policy.eval()

    def predict(self, context: Any, model_input: np.ndarray, params: Any = None) -> np.ndarray:
        """Greedy actions for observations [n, d_obs] (MLflow's signature enforcement turns a
        DataFrame of d_obs float32 columns into this array)."""
        import torch

        obs = np.asarray(model_input, dtype=np.float32)
        if obs.ndim == 1:
            obs = obs[None, :]
        with torch.no_grad():
            return self._policy.mode(torch.from_numpy(np.ascontiguousarray(obs))).numpy()


def log_policy_model(
    client: MlflowClient, run_id: str, experiment_id: str, checkpoint: Path,
    input_example: np.ndarray, *, name: str = "policy", step: int = 0,
) -> str:
    """Log the policy in `checkpoint` as an MLflow pyfunc model of run `run_id`.

    The model maps observations (a float32 array [n, d_obs], or a DataFrame of d_obs
    float32 columns in feature order) to greedy actions (`policy.mode`). It is an MLflow 3
    logged model linked to the run, so `mlflow.pyfunc.load_model(f"runs:/{run_id}/{name}")`
    finds it. Its code is this package, copied into the model (`code/offpg_offline`), so
    loading it needs only torch, numpy and mlflow; requirements are pinned explicitly
    (inferring them costs ~10 s).

    Args:
        checkpoint: a `train.save_checkpoint` file (`{"spec", "state_dict", ...}`).
        input_example: a few observations, [n, d_obs].
        name: the model's name within the run.
        step: the training step the model comes from.

    Returns:
        The model URI `runs:/<run_id>/<name>`.
    """
    import torch

    from offpg_offline.tracking.runs import package_version

    example = np.ascontiguousarray(input_example, dtype=np.float32)
    if example.ndim != 2:
        raise ValueError(f"input_example must be [n, d_obs], got shape {example.shape}")
    policy_model = PolicyModel()
    policy_model.load_checkpoint(checkpoint)
    signature = infer_signature(example, policy_model.predict(None, example))
    logged = client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id,
        tags={"offpg.version": package_version()},
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            code = Path(tmp) / "code" / "offpg_offline"
            shutil.copytree(_PACKAGE, code,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            entry = Path(tmp) / "policy_model.py"
            entry.write_text(_MODEL_CODE)
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                str(local),
                python_model=str(entry),  # models from code: nothing is pickled
                artifacts={"checkpoint": str(checkpoint)},
                code_paths=[str(code)],
                signature=signature,
                input_example=example,
                pip_requirements=_requirements(torch.__version__),
                mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id,
                                   model_id=logged.model_id, model_uuid=logged.model_id),
            )
            client.log_model_artifacts(logged.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return f"runs:/{run_id}/{name}"
