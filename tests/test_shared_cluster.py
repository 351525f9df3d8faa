"""``daskrun cluster start``: a local cluster kept running in the background
for the jobs of later processes, found by them, secured with TLS, and ended
by ``daskrun cluster stop``."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from distributed import Client

from daskrun import ParallelRunConfig
from daskrun.backends.compute.cluster import SharedCluster

from .helpers import daskrun, files_step, make_files, poll_for, write_script
from .scripts import PIDS


def _cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return daskrun(*args, cwd=tmp_path, runs=tmp_path / "runs")


def _job(tmp_path: Path, name: str) -> set[int]:
    script = write_script(tmp_path / "src", PIDS)
    config = ParallelRunConfig(
        str(script), mini_batch_size=1, output_action="append_row"
    )
    run = files_step(tmp_path, name, config, output=f"out-{name}").run()
    assert run.status == "Completed", run.error
    return {int(line) for line in Path(run.output_path or "").read_text().split()}


@pytest.mark.slow
def test_start_find_use_and_stop(tmp_path: Path, shared_cluster_file: Path) -> None:
    make_files(tmp_path / "in", 6)
    assert _cli("cluster", "status", tmp_path=tmp_path).returncode == 1

    started = _cli("cluster", "start", "--processes", "2", tmp_path=tmp_path)
    assert started.returncode == 0, started.stderr
    assert "cluster started at tls://127.0.0.1:" in started.stdout
    try:
        shared = SharedCluster.find()
        assert shared is not None and shared.workers == 2
        # the certificates only its user may read
        assert stat.S_IMODE(shared_cluster_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(shared_cluster_file.parent.stat().st_mode) == 0o700
        with shared.client() as client:
            workers = set(client.run(os.getpid).values())
        assert len(workers) == 2

        # jobs of this process and of another one run on its workers
        assert _job(tmp_path, "first") <= workers
        assert _job(tmp_path, "second") <= workers
        script = write_script(tmp_path / "cli", PIDS)
        ran = _cli(
            "run", str(script), "--input", str(tmp_path / "in"),
            "--output", str(tmp_path / "out-cli"), "--mini-batch-size", "1",
            tmp_path=tmp_path,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        out = (tmp_path / "out-cli" / "parallel_run_step.txt").read_text()
        assert {int(p) for p in out.split()} <= workers

        again = _cli("cluster", "start", tmp_path=tmp_path)
        assert again.returncode == 2
        assert "already running" in again.stderr
        status = _cli("cluster", "status", tmp_path=tmp_path)
        assert status.returncode == 0 and shared.address in status.stdout
    finally:
        stopped = _cli("cluster", "stop", tmp_path=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped the cluster" in stopped.stdout
    assert not shared_cluster_file.exists()
    poll_for(
        lambda: not any(psutil.pid_exists(p) for p in workers | {shared.pid}),
        timeout=30,
        interval=0.2,
        what="the cluster's processes to end",
    )
    assert _cli("cluster", "status", tmp_path=tmp_path).returncode == 1
    # and jobs start their own cluster again
    assert _job(tmp_path, "third").isdisjoint(workers)


@pytest.mark.slow
def test_only_its_certificates_get_in(tmp_path: Path) -> None:
    started = _cli("cluster", "start", "--processes", "1", tmp_path=tmp_path)
    assert started.returncode == 0, started.stderr
    try:
        shared = SharedCluster.find()
        assert shared is not None and shared.address.startswith("tls://127.0.0.1:")
        with pytest.raises((OSError, TimeoutError)):
            Client(shared.address.replace("tls://", "tcp://"), timeout=3)
        with pytest.raises((OSError, TimeoutError, TypeError, ValueError)):
            Client(shared.address, timeout=3)  # TLS without its certificates
    finally:
        assert _cli("cluster", "stop", tmp_path=tmp_path).returncode == 0


def test_a_stale_file_is_ignored_and_removed(shared_cluster_file: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shared_cluster_file.parent.mkdir(mode=0o700, parents=True)
    shared_cluster_file.touch(mode=0o600)  # as SharedCluster.save() writes it
    shared_cluster_file.write_text(
        json.dumps(
            {"address": "tls://127.0.0.1:1", "pid": dead.pid, "workers": 1,
             "dashboard": None, "ca": "", "cert": "", "key": ""}
        )
    )  # fmt: skip
    assert SharedCluster.find() is None
    assert not shared_cluster_file.exists()


def test_stop_without_a_cluster_says_so(tmp_path: Path) -> None:
    done = _cli("cluster", "stop", tmp_path=tmp_path)
    assert done.returncode == 0
    assert "no cluster is running" in done.stdout
