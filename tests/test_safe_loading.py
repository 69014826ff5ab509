"""Safe loading: a checkpoint carrying a pickle payload is refused by every loader, with one
sentence and without running it; `offpg ui` listens on 127.0.0.1 unless --host is given."""

from __future__ import annotations

import ast
import builtins
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from offpg_offline.cli import app
from offpg_offline.policies import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WEAK = ROOT / "datasets" / "cartpole-weak"


class _Payload:
    """Unpickling this calls exec(code): it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like ours (spec, state_dict, step, config) with the payload inside."""
    torch.save({"spec": {"kind": "categorical", "obs_dim": 4, "n_actions": 2, "hidden": [8]},
                "state_dict": {"net.0.weight": _Payload(marker)}, "step": 10, "config": {}},
               path)
    return path


def _one_error_line(result: object) -> str:
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_the_payload_is_real(tmp_path: Path) -> None:
    # Guards the other tests: an unrestricted unpickler does create the marker.
    marker = tmp_path / "marker"
    path = _evil_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_library_loaders_refuse_the_payload(tmp_path: Path) -> None:
    from offpg_offline.tracking import PolicyModel

    marker = tmp_path / "marker"
    path = _evil_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with pytest.raises(ValueError, match=rf"^{path}: refused to load, it holds the global exec, "
                                         r"which could run code \(checkpoints are read with "
                                         r"torch.load\(weights_only=True\)\)$"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="refused to load"):
        PolicyModel().load_checkpoint(path)  # the MLflow pyfunc model's loader
    assert not marker.exists()


def test_evaluate_refuses_the_payload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker"
    path = _evil_checkpoint(tmp_path / "evil.pt", marker)

    result = CliRunner().invoke(app, ["evaluate", str(path), "--dataset", str(WEAK)])

    assert result.exit_code == 2
    assert f"{path}: refused to load, it holds the global exec" in _one_error_line(result)
    assert not marker.exists()


def test_train_resume_refuses_the_payload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from offpg_offline.config import TrackingConfig
    from offpg_offline.tracking import MlflowTracker

    monkeypatch.chdir(tmp_path)
    with MlflowTracker.start(TrackingConfig(), experiment="x", run_name="r") as tracker:
        tracker.log_text("[train]\nsteps = 20\ncheckpoint_every = 10\n", "config.toml")
    marker = tmp_path / "marker"
    (tmp_path / "runs" / tracker.run_id).mkdir(parents=True)
    path = _evil_checkpoint(tmp_path / "runs" / tracker.run_id / "step-000010.pt", marker)

    result = CliRunner().invoke(app, ["train", str(WEAK), "--resume", tracker.run_id])

    assert result.exit_code == 2
    assert f"{path.relative_to(tmp_path)}: refused to load, it holds the global exec" \
        in _one_error_line(result)
    assert not marker.exists()


def test_a_file_that_is_no_checkpoint_is_one_sentence(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    with pytest.raises(ValueError, match=rf"^{junk}: not a checkpoint \("):
        load_checkpoint(junk)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"not a checkpoint \(it holds a list\)"):
        load_checkpoint(tmp_path / "list.pt")


def test_the_package_never_unpickles_unrestricted() -> None:
    # Every torch.load passes weights_only=True; nothing calls pickle.load(s) or np.load with
    # allow_pickle.
    for path in sorted((ROOT / "offpg_offline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name == "torch.load":
                assert keywords.get("weights_only") == "True", f"{path.name}: {ast.unparse(node)}"
            assert name not in ("pickle.load", "pickle.loads", "joblib.load"), path.name
            if name in ("np.load", "numpy.load"):
                assert keywords.get("allow_pickle", "False") == "False", path.name


def test_ui_listens_on_localhost_unless_host_is_given() -> None:
    import typer.main

    from offpg_offline.tracking import server_command

    command = typer.main.get_command(app).commands["ui"]
    (host,) = [p for p in command.params if p.name == "host"]
    assert host.default == "127.0.0.1"
    line = server_command("sqlite:////tmp/x.db", host=host.default, port=5000)
    assert line[line.index("--host") + 1] == "127.0.0.1"


def _listening(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_offpg_ui_listens_only_on_loopback(tmp_path: Path) -> None:
    import contextlib
    import os
    import re
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = tmp_path / "ui.out"
    with log.open("wb") as out:
        ui = subprocess.Popen([sys.executable, "-c", "from offpg_offline.cli import main; main()",
                               "ui", "--port", str(port)], cwd=tmp_path, env=env, stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True)
    server_pid = None
    try:
        deadline = time.monotonic() + 120
        while (found := re.search(r"server pid (\d+)", log.read_text())) is None:
            assert ui.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        server_pid = int(found.group(1))
        assert _listening(port) == {"127.0.0.1"}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()
        if server_pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(server_pid, signal.SIGKILL)
