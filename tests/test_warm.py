"""Warm local clusters: a Pipeline's steps share one set of worker
processes, ``daskrun.keep_warm()`` keeps them between jobs, and closing is
explicit (the block's end, :func:`daskrun.close_warm_clusters`, or exit)."""

from __future__ import annotations

import time
from pathlib import Path

import dask.config
import psutil

import daskrun
from daskrun import (
    Dataset,
    Experiment,
    ParallelRunConfig,
    ParallelRunStep,
    Pipeline,
    Workspace,
)

from .helpers import make_files, write_script

# each item: the pid of the worker process that ran it
PIDS = """
import os

def init():
    pass

def run(mini_batch):
    return [str(os.getpid()) for _ in mini_batch]
"""


def _step(tmp_path: Path, name: str, processes: int = 2) -> ParallelRunStep:
    script = write_script(tmp_path / "src", PIDS)
    config = ParallelRunConfig(
        str(script),
        mini_batch_size=1,
        process_count_per_node=processes,
        output_action="append_row",
        append_row_file_name=f"{name}.txt",
    )
    return ParallelRunStep(
        name,
        config,
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=str(tmp_path / "out"),
    )


def _pids(run: daskrun.StepRun) -> set[int]:
    assert run.status == "Completed", run.error
    return {int(line) for line in Path(run.output_path or "").read_text().split()}


def _all_gone(pids: set[int], deadline: float = 60.0) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if not any(psutil.pid_exists(p) for p in pids):
            return True
        time.sleep(0.2)
    return False


def test_a_pipelines_steps_share_one_cluster_closed_after_the_last(
    tmp_path: Path,
) -> None:
    make_files(tmp_path / "in", 8)
    ws = Workspace.create(tmp_path / "ws")
    steps = [_step(tmp_path, "first"), _step(tmp_path, "second")]
    run = Experiment(ws, "warm").submit(Pipeline(workspace=ws, steps=steps))
    assert run.wait_for_completion() == "Completed"
    first, second = (_pids(step) for step in run.get_steps())
    assert first == second  # the same worker processes: no restart between
    assert len(first) == 2
    assert _all_gone(first)  # closed with the pipeline run


def test_keep_warm_keeps_workers_between_jobs(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 8)
    with daskrun.keep_warm():
        first = _pids(_step(tmp_path, "job-a").run())
        second = _pids(_step(tmp_path, "job-b").run())
        assert first == second
        assert all(psutil.pid_exists(p) for p in first)  # idle, still up
        # another size: a new cluster, and the idle one closed
        third = _pids(_step(tmp_path, "job-c", processes=1).run())
        assert third.isdisjoint(first)
        assert _all_gone(first)
    assert _all_gone(third)  # the block's end closes it


def test_without_keep_warm_each_job_has_its_own_cluster(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 4)
    first = _pids(_step(tmp_path, "job-a").run())
    assert _all_gone(first)
    second = _pids(_step(tmp_path, "job-b").run())
    assert second.isdisjoint(first)


def test_keep_warm_setting_holds_until_closed(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 4)
    with dask.config.set({"daskrun.local-cluster.keep-warm": True}):
        first = _pids(_step(tmp_path, "job-a").run())
        second = _pids(_step(tmp_path, "job-b").run())
        assert first == second
        assert all(psutil.pid_exists(p) for p in first)
        daskrun.close_warm_clusters()
        assert _all_gone(first)


def test_a_warm_workers_log_lines_go_to_the_job_using_it(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 4)
    script = write_script(
        tmp_path / "src2",
        "import logging\n"
        "def init():\n"
        "    logging.getLogger('distributed.worker').warning('hello from init')\n"
        "def run(mb):\n"
        "    return mb\n",
    )
    with daskrun.keep_warm():
        runs = []
        for name in ("job-a", "job-b"):
            config = ParallelRunConfig(
                str(script), mini_batch_size=1, process_count_per_node=2
            )
            step = ParallelRunStep(
                name,
                config,
                inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
                output=str(tmp_path / f"out-{name}"),
            )
            runs.append(step.run())
    for run in runs:
        assert run.status == "Completed", run.error
        log = Path(run.logs_dir or "", "sys", "distributed.log").read_text()
        assert log.count("hello from init") == 2, log  # its own workers' lines
