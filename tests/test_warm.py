"""Warm local clusters: a Pipeline's steps share one set of worker
processes, ``daskrun.keep_warm()`` keeps them between jobs, and closing is
explicit (the block's end, :func:`daskrun.close_warm_clusters`, or exit)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import dask.config
import psutil
import pytest

import daskrun
from daskrun import (
    Experiment,
    ParallelRunConfig,
    ParallelRunStep,
    Pipeline,
    Workspace,
)
from daskrun.backends.compute.cluster import EarlyStart
from daskrun.engine.job import Job
from daskrun.exceptions import InputError

from .helpers import files_step, make_files, poll_for, write_script
from .scripts import PIDS


def _step(tmp_path: Path, name: str, processes: int = 2) -> ParallelRunStep:
    script = write_script(tmp_path / "src", PIDS)
    config = ParallelRunConfig(
        str(script),
        mini_batch_size=1,
        process_count_per_node=processes,
        output_action="append_row",
        append_row_file_name=f"{name}.txt",
    )
    return files_step(tmp_path, name, config)


def _pids(run: daskrun.StepRun) -> set[int]:
    assert run.status == "Completed", run.error
    return {int(line) for line in Path(run.output_path or "").read_text().split()}


def _all_gone(pids: set[int], deadline: float = 60.0) -> bool:
    return poll_for(
        lambda: not any(psutil.pid_exists(p) for p in pids),
        timeout=deadline,
        interval=0.2,
        what=f"the end of processes {sorted(pids)}",
    )


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
            runs.append(files_step(tmp_path, name, config, f"out-{name}").run())
    for run in runs:
        assert run.status == "Completed", run.error
        log = Path(run.logs_dir or "", "sys", "distributed.log").read_text()
        assert log.count("hello from init") == 2, log  # its own workers' lines


def _worker_processes() -> set[int]:
    """This process's local worker processes (spawned by distributed's
    Nannies through multiprocessing)."""
    return {
        child.pid
        for child in psutil.Process().children(recursive=True)
        if "spawn_main" in " ".join(child.cmdline())
    }


def _planning_waits_for_workers(monkeypatch: Any, then: Any = None) -> set[int]:
    """Make a job's planning (the ledger of its inputs) wait until its two
    worker processes run, then call ``then``; the pids it saw, filled in
    when it ran (fewer if they never came)."""
    seen: set[int] = set()
    fill = Job._fill_ledger
    others = _worker_processes()  # another test's cluster, still up

    def waiting(job: Job, ledger: Any, *listed: Any) -> None:
        end = time.monotonic() + 60
        while len(found := _worker_processes() - others) < 2 and time.monotonic() < end:
            time.sleep(0.05)
        seen.update(found)
        if then is not None:
            then()
        fill(job, ledger, *listed)

    monkeypatch.setattr(Job, "_fill_ledger", waiting)
    return seen


def test_the_cluster_starts_while_the_job_plans(
    tmp_path: Path, monkeypatch: Any
) -> None:
    make_files(tmp_path / "in", 8)
    seen = _planning_waits_for_workers(monkeypatch)
    pids = _pids(_step(tmp_path, "early").run())
    # the workers were up before the plan was done, and they ran the job
    assert len(seen) == 2 and pids == seen
    assert _all_gone(seen)


def test_a_job_failing_while_it_plans_closes_the_cluster_it_started(
    tmp_path: Path, monkeypatch: Any
) -> None:
    make_files(tmp_path / "in", 8)

    def fail() -> None:
        raise InputError("input listing failed")

    seen = _planning_waits_for_workers(monkeypatch, then=fail)
    with pytest.raises(InputError, match="input listing failed"):
        _step(tmp_path, "early").run()
    assert len(seen) == 2  # it had started
    assert _all_gone(seen)


class _Recorded:
    """A context manager that records how it was entered and exited."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.entered_in, self.exits = fail, "", []

    def __enter__(self) -> str:
        self.entered_in = threading.current_thread().name
        if self.fail:
            raise OSError("start failed")
        return "client"

    def __exit__(self, *exc: Any) -> bool:
        self.exits.append(exc[0])
        return False


def test_early_start_enters_in_its_thread_and_exits_where_used() -> None:
    manager = _Recorded()
    early = EarlyStart(manager)
    with early.use() as value:
        assert value == "client"
    assert manager.entered_in == "daskrun-early-start"
    assert manager.exits == [None]
    early.close()  # used: nothing more to end
    assert manager.exits == [None]

    manager = _Recorded()
    with pytest.raises(KeyError), EarlyStart(manager).use():
        raise KeyError("in the job")
    assert manager.exits == [KeyError]


def test_early_start_raises_its_error_where_used_and_ends_unused_starts() -> None:
    early = EarlyStart(_Recorded(fail=True))
    with pytest.raises(OSError, match="start failed"), early.use():
        pass
    early.close()  # nothing started: nothing to end

    manager = _Recorded()
    EarlyStart(manager).close()
    assert manager.exits == [None]
