"""Crash safety of `offpg ingest parquet`: SIGKILL at random moments, and two concurrent writers.

A dataset folder appears under its final name only by a rename of a complete, fsynced
`<out>.tmp-<pid>/` folder, so after a kill at any moment `<out>` is either absent or complete
(its card's sha256s verify). Leftovers of killed writers are cleaned by the next write.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from offpg_offline.data.store import read_card, verify_dataset

ROWS = 300_000  # two shards (262,144 rows each at most); ~1 s of ingest on an idle core
OFFPG = [sys.executable, "-c", "from offpg_offline.cli import main; main()"]
INGEST = ["ingest", "parquet", "log.parquet", "--out", "ds", "--obs-cols", "x*",
          "--propensity-col", "p", "--propensity-kind", "prob", "--quiet"]


@pytest.fixture(scope="module")
def big_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    episode = np.arange(ROWS) // 50
    path = tmp_path_factory.mktemp("log") / "log.parquet"
    pl.DataFrame({
        "episode_id": episode, "x0": rng.normal(size=ROWS), "x1": rng.normal(size=ROWS),
        "x2": rng.normal(size=ROWS), "action": rng.integers(0, 2, ROWS),
        "reward": rng.normal(size=ROWS), "terminated": np.r_[episode[1:] != episode[:-1], True],
        "p": rng.uniform(0.1, 1.0, ROWS),
    }).write_parquet(path)
    return path


def _start(folder: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*OFFPG, *INGEST, *extra], cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for_tmp(folder: Path, process: subprocess.Popen[bytes]) -> None:
    """Until `ds.tmp-<pid>` of `process` exists (the write has begun) or it exits."""
    deadline = time.monotonic() + 60
    while not (folder / f"ds.tmp-{process.pid}").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "the ingest did not start writing within 60 s"
        time.sleep(0.002)


def _assert_absent_or_complete(out: Path) -> bool:
    """True when a complete dataset is at `out`; False when nothing is; fails otherwise."""
    if not out.exists():
        return False
    assert verify_dataset(out) == []
    assert read_card(out)["counts"] == {"episodes": ROWS // 50, "steps": ROWS}
    return True


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_partial_dataset(
    big_log: Path, tmp_path: Path
) -> None:
    shutil.copy(big_log, tmp_path / "log.parquet")
    out = tmp_path / "ds"
    started = time.monotonic()
    reference = _start(tmp_path)
    _wait_for_tmp(tmp_path, reference)
    writing = time.monotonic()
    assert reference.wait() == 0, reference.stderr.read() if reference.stderr else ""
    duration, write_time = time.monotonic() - started, time.monotonic() - writing
    _assert_absent_or_complete(out)
    shutil.rmtree(out)

    rng = random.Random(8)
    outcomes = []
    for trial in range(10):
        process = _start(tmp_path)
        if trial % 2 == 0:  # anywhere in the run, start-up included
            time.sleep(rng.uniform(0.0, duration))
        else:  # while shards are being written: after the temporary folder appears
            _wait_for_tmp(tmp_path, process)
            time.sleep(rng.uniform(0.0, write_time))
        process.send_signal(signal.SIGKILL)
        process.wait()
        complete = _assert_absent_or_complete(out)
        outcomes.append("complete" if complete else
                        "tmp left" if list(tmp_path.glob("ds.tmp-*")) else "nothing")
        if complete:
            shutil.rmtree(out)
    print("outcomes of the kills:", outcomes)
    assert "tmp left" in outcomes  # some kills did land in the middle of a write

    rerun = _start(tmp_path)
    assert rerun.wait() == 0, rerun.stderr.read() if rerun.stderr else ""
    assert _assert_absent_or_complete(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "log.parquet"]  # stale cleaned


@pytest.mark.slow
def test_two_concurrent_ingests_to_one_output_one_wins(big_log: Path, tmp_path: Path) -> None:
    shutil.copy(big_log, tmp_path / "log.parquet")
    first, second = _start(tmp_path), _start(tmp_path)
    codes = sorted([first.wait(), second.wait()])
    errors = [p.stderr.read().decode() for p in (first, second) if p.stderr and p.returncode]

    assert codes == [0, 2], errors
    (error,) = errors
    assert error.count("\n") == 1 and error.startswith("error: ")
    assert ("already exists; pass overwrite" in error
            or "another process wrote a dataset here while this one was writing" in error), error
    assert _assert_absent_or_complete(tmp_path / "ds")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "log.parquet"]


def test_leftovers_of_dead_writers_are_cleaned_and_a_moved_aside_dataset_restored(
    tmp_path: Path,
) -> None:
    from offpg_offline.data.schema import steps_table
    from offpg_offline.data.store import clean_stale, write_dataset

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now (reuse within this test is vanishingly unlikely)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        table = steps_table(
            episode_id=np.zeros(3, dtype=np.int64), step=np.arange(3), obs=np.ones((3, 2)),
            action=np.array([0, 1, 0]), reward=np.ones(3), next_obs=np.ones((3, 2)),
            terminated=np.array([False, False, True]), truncated=np.zeros(3, dtype=bool))
        write_dataset(tmp_path / "src", [table], card={"name": "ds"})
        # An overwrite killed between its two renames: the old dataset moved aside, no "ds".
        os.rename(tmp_path / "src", tmp_path / f"ds.old-{dead.pid}")
        (tmp_path / f"ds.tmp-{dead.pid}").mkdir()  # an unfinished write of the same process
        (tmp_path / f"ds.tmp-{alive.pid}").mkdir()  # a concurrent writer still at work

        clean_stale(tmp_path / "ds")

        assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", f"ds.tmp-{alive.pid}"]
        assert verify_dataset(tmp_path / "ds") == []
    finally:
        alive.kill()
        alive.wait()
