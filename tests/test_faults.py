"""Fault tolerance with real processes: hung run() calls and dying workers."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import dask.config
import pandas as pd
import pytest
from distributed import Client, LocalCluster

from daskrun import Dataset

from .helpers import (
    VictimKiller,
    make_files,
    run_step,
    stopped_when_marked,
    victim_script,
)

HANGING_SCRIPT = """
import os, time

def init():
    pass

def run(mini_batch):
    for p in mini_batch:
        if os.path.basename(p).startswith("hang"):
            time.sleep(3600)
        if os.path.basename(p).startswith("die"):
            os._exit(3)
    return [os.path.basename(p) for p in mini_batch]
"""


def _report(logs_dir: str) -> pd.DataFrame:
    path = Path(logs_dir) / "sys/job_report/processed_mini-batches.csv"
    return pd.read_csv(path).set_index("index")


def test_hung_run_is_stopped_by_the_timeout(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 1, prefix="hang")
    make_files(tmp_path / "in", 11, prefix="ok")
    start = time.monotonic()
    run = run_step(
        tmp_path,
        HANGING_SCRIPT,
        Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=1,
        run_invocation_timeout=5,
        run_max_try=2,
        error_threshold=1,
        process_count_per_node=2,
    )
    elapsed = time.monotonic() - start
    assert run.status == "Completed", run.error
    assert run.items_failed == 1 and run.mini_batches_failed == 1
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [f"ok{i:05d}.txt" for i in range(11)]
    report = _report(run.logs_dir)
    assert report.loc[0, "tries"] == 2
    assert "run_invocation_timeout=5" in report.loc[0, "error"]
    assert (report.drop(index=0)["tries"] == 1).all()
    # two 5 s tries plus worker restarts, not an hour
    assert elapsed < 60, elapsed


def test_a_mini_batch_that_kills_its_worker_fails_after_max_tries(
    tmp_path: Path,
) -> None:
    make_files(tmp_path / "in", 1, prefix="die")
    make_files(tmp_path / "in", 30, prefix="ok")
    run = run_step(
        tmp_path,
        HANGING_SCRIPT,
        Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=1,
        run_max_try=2,
        error_threshold=1,
        process_count_per_node=2,
    )
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [f"ok{i:05d}.txt" for i in range(30)]
    report = _report(run.logs_dir)
    assert report.loc[0, "tries"] == 2
    assert "WorkerDied" in report.loc[0, "error"]
    # a mini-batch queued on the dying worker may lose a try too, never more
    assert (report.drop(index=0)["tries"] <= 2).all()
    assert report.drop(index=0)["error"].isna().all()


@pytest.mark.parametrize(
    ("trial", "grouped"), [(0, False), (1, False), (2, True), (3, True)]
)
def test_sigkill_of_workers_never_loses_or_duplicates_rows(
    tmp_path: Path,
    local_cluster: Callable[..., LocalCluster],
    trial: int,
    grouped: bool,
) -> None:
    """Five SIGKILLs per trial (20 over the four), each of a worker process
    while a chosen mini-batch is in its run(), on a cluster that leaves lost
    tasks to the runner (allowed-failures=0, as daskrun's own): each killed
    mini-batch runs again on another process and the output equals the
    uninterrupted one. With one mini-batch per task the killed try is charged
    (tries 2); a task of several is split and rerun uncharged."""
    files = make_files(tmp_path / "in", 240)
    # fewer, bigger mini-batches where each is a task of its own (round trips)
    size = 2 if grouped else 4
    # the first tasks are left alone: the scheduler queues tasks (one per
    # worker) once their group outnumbers the threads
    indices = sorted(random.Random(trial).sample(range(10, 240 // size), 5))
    victims = {files[size * i].name: 1 for i in indices}  # their first files
    marks = tmp_path / "marks"
    settings = {
        "distributed.scheduler.allowed-failures": 0,
        "distributed.scheduler.worker-saturation": 1.0,
    }
    if not grouped:
        settings["daskrun.runner.task-seconds"] = 0
    with (
        dask.config.set(settings),
        local_cluster() as cluster,
        Client(cluster) as client,
        VictimKiller(client, marks, victims) as killer,
    ):
        run = run_step(
            tmp_path,
            victim_script(marks, victims, seconds=0.02),
            Dataset.File.from_files(str(tmp_path / "in")),
            mini_batch_size=size,
            run_max_try=2,
            compute_target=client,
        )
    kills = killer.check()
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [p.name for p in files]
    # each kill cost its victim alone, and the victim ran again elsewhere
    assert [k.held for k in kills] == [1] * 5, kills
    for kill in kills:
        done = (marks / f"{kill.name}.done").read_text().split()
        assert done and str(kill.pid) not in done, (kill, done)
    report = _report(run.logs_dir)
    assert sorted(report.index) == list(range(240 // size))
    assert report["error"].isna().all()
    assert (report.drop(index=indices)["tries"] == 1).all()
    if grouped:  # 1 where the victim's task was split, 2 where it ran alone
        assert report.loc[indices, "tries"].isin([1, 2]).all()
    else:
        assert (report.loc[indices, "tries"] == 2).all()


def test_memory_kill_is_reported_with_its_mini_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_files(tmp_path / "in", 1, prefix="big")
    make_files(tmp_path / "in", 6, prefix="ok")
    script = """
    import os, time

    def init():
        pass

    def run(mini_batch):
        if os.path.basename(mini_batch[0]).startswith("big"):
            hog = []
            for _ in range(200):              # up to 4 GB, 20 MB at a time
                hog.append(bytearray(20 * 2**20))
                time.sleep(0.01)
        return [os.path.basename(p) for p in mini_batch]
    """
    with dask.config.set({"daskrun.local-cluster.memory-limit": "400MiB"}):
        run = run_step(
            tmp_path,
            script,
            Dataset.File.from_files(str(tmp_path / "in")),
            mini_batch_size=1,
            run_max_try=1,
            error_threshold=1,
            process_count_per_node=2,
            show_output=True,
        )
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [f"ok{i:05d}.txt" for i in range(6)]
    error_file = (Path(run.logs_dir) / "job_error.txt").read_text()
    assert error_file.startswith("MemoryError: worker-")
    assert "exceeding its memory limit" in error_file
    assert "mini-batch 0 (files big00000.txt)" in error_file
    report = _report(run.logs_dir)
    assert "memory" in report.loc[0, "error"]
    terminal = capsys.readouterr().err
    assert "mini-batch 0 failed after 1 try on worker-" in terminal
    assert "exceeding its memory limit" in terminal


@pytest.mark.slow
def test_a_stuck_init_is_bounded(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 3)
    start = time.monotonic()
    run = run_step(
        tmp_path,
        "import time\ndef init():\n    time.sleep(3600)\ndef run(mb): return mb\n",
        Dataset.File.from_files(str(tmp_path / "in")),
        run_invocation_timeout=1,
        process_count_per_node=1,
    )
    assert run.status == "Failed"
    assert run.error is not None
    assert "init() did not return within 33 s" in run.error
    assert time.monotonic() - start < 90


def test_a_fifo_among_csv_inputs_times_out_naming_it(tmp_path: Path) -> None:
    """Reading inputs runs under run_invocation_timeout too: a file that
    became a FIFO after it was listed (a FIFO listed is refused; a hung
    mount reads the same) fails its mini-batch, and the job ends."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("t0.csv", "t1.csv", "t1fifo.csv", "t2.csv"):
        (folder / name).write_text("a,b\n1,2\n3,4\n")
    inputs = Dataset.Tabular.from_delimited_files(str(folder))
    (folder / "t1fifo.csv").unlink()
    os.mkfifo(folder / "t1fifo.csv")  # sorted third: mini-batch 2
    start = time.monotonic()
    run = run_step(
        tmp_path,
        "def init():\n    pass\ndef run(df):\n    return df\n",
        inputs,
        run_invocation_timeout=2,
        run_max_try=1,
        error_threshold=-1,
        process_count_per_node=2,
    )
    elapsed = time.monotonic() - start
    assert run.status == "Completed", run.error
    assert run.mini_batches_failed == 1
    error = _report(run.logs_dir).loc[2, "error"]
    assert error.startswith("TimeoutError: reading its inputs"), error
    assert "t1fifo.csv" in error and "run_invocation_timeout=2 s" in error
    failed = (Path(run.logs_dir) / "sys/job_report/failed_items.csv").read_text()
    assert "t1fifo.csv" in failed
    assert Path(run.output_path or "").read_text().splitlines() == ["1 2", "3 4"] * 3
    assert elapsed < 60, elapsed


@pytest.mark.slow
def test_a_frozen_worker_is_caught_by_the_client_deadline(tmp_path: Path) -> None:
    """A worker stopped (SIGSTOP) for 30 s cannot run its watchdog: the
    client charges its mini-batch a timed-out try after timeout + grace,
    restarts it, and the retry elsewhere writes the rows exactly once."""
    make_files(tmp_path / "in", 1, prefix="freeze")
    make_files(tmp_path / "in", 7, prefix="ok")
    marker = tmp_path / "frozen.pid"
    script = f"""
    import os, time

    def init():
        pass

    def run(mini_batch):
        marker = {str(marker)!r}
        for p in mini_batch:
            if os.path.basename(p).startswith("freeze") and not os.path.exists(marker):
                with open(marker + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.replace(marker + ".tmp", marker)
                time.sleep(2)  # the test stops this process meanwhile
        return [os.path.basename(p) for p in mini_batch]
    """
    start = time.monotonic()
    with stopped_when_marked(marker):
        # no speculative copy: at the tail, a copy on the other worker
        # would win before the deadline this test is about
        with dask.config.set(
            {"daskrun.runner.frozen-grace": 2, "daskrun.runner.speculate": False}
        ):
            run = run_step(
                tmp_path,
                script,
                Dataset.File.from_files(str(tmp_path / "in")),
                mini_batch_size=1,
                run_invocation_timeout=3,
                run_max_try=2,
                process_count_per_node=2,
            )
        elapsed = time.monotonic() - start
    assert marker.exists()
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == ["freeze00000.txt"] + [f"ok{i:05d}.txt" for i in range(7)]
    report = _report(run.logs_dir)
    assert report.loc[0, "tries"] == 2  # the frozen try was charged
    assert (report.drop(index=0)["tries"] == 1).all()
    assert elapsed < 28, elapsed  # not the 30 s the worker stayed stopped
