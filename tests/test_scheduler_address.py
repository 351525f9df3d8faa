"""Scheduler addresses and cluster sizes are checked before anything
connects or starts, and a scheduler that takes the connection but never
answers fails the job within ``daskrun.connect-timeout``."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from daskrun import ParallelRunConfig
from daskrun.exceptions import ConfigError

from .helpers import daskrun, make_files, silent_server, write_script
from .scripts import ECHO


def _run_on(
    tmp_path: Path, scheduler: str, timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], float]:
    make_files(tmp_path / "in", 2)
    script = write_script(tmp_path / "src", ECHO)
    started = time.monotonic()
    done = daskrun(
        "run", str(script), "--input", str(tmp_path / "in"),
        "--output", str(tmp_path / "out"), "--scheduler", scheduler,
        cwd=tmp_path, runs=tmp_path / "runs", timeout=timeout,
    )  # fmt: skip
    return done, time.monotonic() - started


@pytest.mark.parametrize("address", ["garbage", "tcp://127.0.0.1", "tcp://h:0"])
def test_a_scheduler_address_that_is_not_one_is_refused_at_once(
    tmp_path: Path, address: str
) -> None:
    script = write_script(tmp_path / "src", ECHO)
    with pytest.raises(ConfigError, match="is not a scheduler address"):
        ParallelRunConfig(str(script), compute_target=address)
    done, seconds = _run_on(tmp_path, address)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"--scheduler {address} is not a scheduler address" in lines[0]
    assert "tcp://127.0.0.1:8786" in lines[0]  # the fix
    assert seconds < 10  # nothing was tried


def test_a_scheduler_that_never_answers_fails_within_the_connect_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DASK_DASKRUN__CONNECT_TIMEOUT", "3")
    with silent_server() as listener:
        address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        done, seconds = _run_on(tmp_path, address, timeout=60)
        listener.accept()  # it did come
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert (
        # the bound, named as the test set it
        f"--scheduler {address} did not answer within "
        "DASK_DASKRUN__CONNECT_TIMEOUT=3 s; "
        "start a scheduler there, or use no --scheduler for a local cluster"
    ) in lines[0]
    assert seconds < 3 + 10  # the timeout, and the command's start


def test_cluster_start_refuses_zero_processes(tmp_path: Path) -> None:
    try:
        done = daskrun(
            "cluster", "start", "--processes", "0", cwd=tmp_path, runs=tmp_path / "runs"
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "--processes 0 is not a number of worker processes" in lines[0]
        assert "--processes 2" in lines[0]
    finally:  # the original started one with a process per core
        daskrun("cluster", "stop", cwd=tmp_path, runs=tmp_path / "runs")
