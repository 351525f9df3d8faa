"""A cluster of ``daskrun cluster start`` that dies or freezes mid-job ends
the job with one line, and its run record counts only what was done; and
two starts at once start one cluster, the other saying so."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from daskrun.backends.compute.cluster import SharedCluster
from daskrun.registry.records import RunRecord

from .helpers import (
    daskrun,
    kill_client,
    make_files,
    poll_for,
    start_daskrun,
    write_script,
)

# each mini-batch leaves a mark once run() has done it
MARKING = """
import os, time

MARKS = {marks!r}

def init():
    pass

def run(mini_batch):
    time.sleep(0.3)
    for path in mini_batch:
        open(os.path.join(MARKS, os.path.basename(path)), "w").close()
    return [os.path.basename(p) for p in mini_batch]
"""

LOST = re.compile(
    r"the cluster at (tls://127\.0\.0\.1:\d+) stopped answering mid-job; "
    r"(\d+) of 20 items done; resume with 'daskrun resume (\S+)'$"
)


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[SharedCluster]:
    """A cluster of 'daskrun cluster start' with one worker; killed after
    the test, whatever the test did to it."""
    started = daskrun(
        "cluster", "start", "--processes", "1", cwd=tmp_path, runs=tmp_path / "runs"
    )
    assert started.returncode == 0, started.stderr
    found = SharedCluster.find()
    assert found is not None
    server = psutil.Process(found.pid)
    family = [server, *server.children(recursive=True)]
    try:
        yield found
    finally:
        for process in family:  # SIGKILL ends a stopped process too
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(family, timeout=30)


def _job_killed_midway(
    tmp_path: Path, shared: SharedCluster, sig: signal.Signals
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run a job of 20 files on the shared cluster; once 12 are done, send
    ``sig`` to the cluster's process. What the job said, and how long it
    took after the signal."""
    make_files(tmp_path / "in", 20)
    marks = tmp_path / "marks"
    marks.mkdir()
    script = write_script(tmp_path / "src", MARKING.format(marks=str(marks)))
    job = start_daskrun(
        "run", str(script), "--input", str(tmp_path / "in"),
        "--output", str(tmp_path / "out"), "--mini-batch-size", "1",
        cwd=tmp_path, runs=tmp_path / "runs",
    )  # fmt: skip
    try:
        poll_for(
            lambda: len(list(marks.iterdir())) >= 12,
            timeout=120,
            what="the job to get to 12",
            running=job,
        )
        os.kill(shared.pid, sig)
        signalled = time.monotonic()
        out, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    done = subprocess.CompletedProcess(job.args, job.returncode, out, err)
    return done, time.monotonic() - signalled


def _check_one_line_and_record(
    done: subprocess.CompletedProcess[str], shared: SharedCluster, tmp_path: Path
) -> str:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    found = LOST.search(last)
    assert found is not None, done.stderr
    address, items_done, run_id = found.group(1), int(found.group(2)), found.group(3)
    assert address == shared.address
    assert 0 < items_done < 20  # a task may hold more than one mini-batch
    record = RunRecord.load(run_id, tmp_path / "runs")
    assert record.status == "Failed"
    assert record.counts["items_total"] == 20  # what it was given
    assert record.counts["items_succeeded"] == items_done
    return run_id


@pytest.mark.slow
def test_a_shared_cluster_that_dies_mid_job(
    tmp_path: Path, shared: SharedCluster
) -> None:
    done, seconds = _job_killed_midway(tmp_path, shared, signal.SIGKILL)
    run_id = _check_one_line_and_record(done, shared, tmp_path)
    assert seconds < 30
    # and the rest runs on resume, on a cluster of its own
    resumed = daskrun("resume", run_id, cwd=tmp_path, runs=tmp_path / "runs")
    assert resumed.returncode == 0, resumed.stderr
    out = (tmp_path / "out" / "parallel_run_step.txt").read_text().split()
    assert sorted(out) == sorted(p.name for p in (tmp_path / "in").iterdir())


@pytest.mark.slow
def test_a_shared_cluster_that_freezes_mid_job(
    tmp_path: Path, shared: SharedCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DASK_DASKRUN__CONNECT_TIMEOUT", "3")
    done, seconds = _job_killed_midway(tmp_path, shared, signal.SIGSTOP)
    _check_one_line_and_record(done, shared, tmp_path)
    assert seconds < 3 + 15  # the connect timeout, and a probe's second


def _servers(shared_file: Path) -> set[int]:
    """The 'daskrun cluster serve' processes of this test's shared file."""
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or []
        if "serve" not in cmdline or "cluster" not in cmdline:
            continue
        try:
            env = p.environ()
        except psutil.Error:
            continue
        if env.get("DASK_DASKRUN__LOCAL_CLUSTER__SHARED_FILE") == str(shared_file):
            found.add(p.pid)
    return found


@pytest.mark.slow
def test_two_starts_at_once_start_one_cluster(
    tmp_path: Path, shared_cluster_file: Path
) -> None:
    starts = [
        start_daskrun(
            "cluster", "start", "--processes", "1", cwd=tmp_path, runs=tmp_path / "runs"
        )
        for _ in range(2)
    ]
    try:
        said = [p.communicate(timeout=150) for p in starts]
        codes = sorted(p.returncode for p in starts)
        servers = _servers(shared_cluster_file)
        assert codes == [0, 2], said
        (refused,) = [e for p, (_, e) in zip(starts, said, strict=True) if p.returncode]
        assert len(refused.strip().splitlines()) == 1, refused
        assert "already" in refused
        assert len(servers) == 1, servers  # none left running unseen
        status = daskrun("cluster", "status", cwd=tmp_path, runs=tmp_path / "runs")
        assert str(servers.pop()) in status.stdout
    finally:
        daskrun("cluster", "stop", cwd=tmp_path, runs=tmp_path / "runs")
        for pid in _servers(shared_cluster_file):  # the original's second one
            kill_client(psutil.Process(pid))
