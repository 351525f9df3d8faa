"""The runner's policy for tasks whose worker died: the pure rule
(:func:`daskrun.engine.lost.judge_lost_task`), then real workers that die."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dask.config
import pandas as pd
import pytest
from distributed import Client, LocalCluster
from hypothesis import given
from hypothesis import strategies as st

from daskrun import Dataset
from daskrun.backends.compute.local import local_cluster
from daskrun.backends.inputs.datasets import FileBatch
from daskrun.engine.lost import judge_lost_task

from .helpers import VictimKiller, make_files, poll_for, run_step, victim_script

DIED = ("WorkerDied: worker-0 died while running it", "worker-0")


def _batch(index: int) -> FileBatch:
    return FileBatch.of(index, [f"/in/f{index}.txt"])


def test_a_lone_lost_mini_batch_is_charged_with_the_cause() -> None:
    verdict = judge_lost_task([(_batch(4), 2)], {}, DIED)
    ((batch, try_no, result),) = verdict.charged
    assert (batch.index, try_no, verdict.free, verdict.split) == (4, 2, [], False)
    assert (result.index, result.try_no, result.ok) == (4, 2, False)
    assert (result.error, result.worker) == DIED
    assert result.items_in is None  # counted by the tally as never read


def test_a_group_lost_without_a_hung_report_is_split_uncharged() -> None:
    group = [(_batch(i), 1) for i in range(5)]
    verdict = judge_lost_task(group, {}, DIED)
    assert verdict.split and verdict.charged == [] and verdict.free == group


def test_only_the_hung_mini_batches_of_a_group_are_charged() -> None:
    group = [(_batch(0), 1), (_batch(1), 2), (_batch(2), 1)]
    frozen = ("TimeoutError: worker-1 stopped answering for 8 s", "worker-1")
    verdict = judge_lost_task(group, {1: frozen}, DIED)
    assert [(b.index, t, r.error, r.worker) for b, t, r in verdict.charged] == [
        (1, 2, *frozen)
    ]
    assert verdict.free == [group[0], group[2]] and not verdict.split


def test_a_lone_hung_mini_batch_gets_its_timeout_error_not_the_cause() -> None:
    hung = {7: ("TimeoutError: run() did not return", "worker-3")}
    verdict = judge_lost_task([(_batch(7), 1)], hung, DIED)
    assert [r.error for _, _, r in verdict.charged] == [hung[7][0]]


@given(
    tries=st.lists(st.integers(1, 5), min_size=1, max_size=8),
    hung=st.sets(st.integers(0, 9)),
)
def test_every_try_of_a_lost_group_is_charged_or_rerun_once(
    tries: list[int], hung: set[int]
) -> None:
    group = [(_batch(i), t) for i, t in enumerate(tries)]
    # the runner reports only the group's own mini-batches as hung
    reports = {i: (f"TimeoutError: {i}", "w") for i in hung if i < len(tries)}
    verdict = judge_lost_task(group, reports, DIED)
    charged = [(b, t) for b, t, _ in verdict.charged]
    assert sorted(charged + verdict.free, key=lambda p: p[0].index) == group
    assert all(r.try_no == t and not r.ok for _, t, r in verdict.charged)
    if reports:  # only what hung is charged
        assert {b.index for b, _ in charged} == set(reports)
    elif len(group) > 1:
        assert verdict.split and not charged
    else:
        assert len(charged) == 1


# "a_once" kills its worker the first time it runs; "b_die" every time. Each
# death leaves a file in DEATHS, so the test counts the workers lost.
DYING_SCRIPT = """
import os, time, uuid

DEATHS = {deaths!r}

def init():
    pass

def run(mini_batch):
    for p in mini_batch:
        name = os.path.basename(p)
        once = os.path.join(DEATHS, "a_once")
        if name.startswith("a_once") and not os.path.exists(once):
            open(once, "w").close()
            os._exit(3)
        if name.startswith("b_die"):
            open(os.path.join(DEATHS, uuid.uuid4().hex), "w").close()
            os._exit(3)
    time.sleep(0.05)
    return [os.path.basename(p) for p in mini_batch]
"""


def _run_on_own_cluster(
    tmp_path: Path, local_cluster: Callable[..., LocalCluster], allowed_failures: int
) -> tuple[pd.DataFrame, list[str], int]:
    """Run a_once, b_die and 10 ok files on a cluster of two worker
    processes, made by the test with ``allowed-failures``; return the
    report, the output lines and how many workers b_die killed."""
    make_files(tmp_path / "in", 1, prefix="a_once")
    make_files(tmp_path / "in", 1, prefix="b_die")
    make_files(tmp_path / "in", 10, prefix="ok")
    deaths = tmp_path / "deaths"
    deaths.mkdir()
    with (
        dask.config.set(
            {
                "distributed.scheduler.allowed-failures": allowed_failures,
                # one task at a time per worker, as on daskrun's own cluster:
                # nothing waits on a worker that b_die kills
                "distributed.scheduler.worker-saturation": 1.0,
            }
        ),
        local_cluster() as cluster,
        Client(cluster) as client,
    ):
        run = run_step(
            tmp_path,
            DYING_SCRIPT.format(deaths=str(deaths)),
            Dataset.File.from_files(str(tmp_path / "in")),
            mini_batch_size=1,
            run_max_try=2,
            error_threshold=-1,
            compute_target=client,
        )
    assert run.status == "Completed", run.error
    report = pd.read_csv(
        Path(run.logs_dir) / "sys/job_report/processed_mini-batches.csv"
    ).set_index("index")
    lines = Path(run.output_path or "").read_text().splitlines()
    killed_by_die = len([p for p in deaths.iterdir() if p.name != "a_once"])
    return report, lines, killed_by_die


@pytest.mark.slow
def test_a_lost_worker_costs_its_mini_batch_one_try(
    tmp_path: Path, local_cluster: Callable[..., LocalCluster]
) -> None:
    """With allowed-failures=0 (what daskrun's own cluster uses), each lost
    task reaches the runner: a_once is charged the try that died and
    succeeds on its second; b_die fails after run_max_try=2, one death each."""
    report, lines, killed = _run_on_own_cluster(
        tmp_path, local_cluster, allowed_failures=0
    )
    assert lines == ["a_once00000.txt"] + [f"ok{i:05d}.txt" for i in range(10)]
    assert report.loc[0, "tries"] == 2 and pd.isna(report.loc[0, "error"])
    assert report.loc[1, "tries"] == 2
    assert report.loc[1, "error"].startswith("WorkerDied: worker-")
    assert killed == 2
    assert (report.drop(index=[0, 1])["tries"] <= 2).all()
    assert report.drop(index=[0, 1])["error"].isna().all()


@pytest.mark.slow
def test_a_cluster_that_retries_tasks_itself(
    tmp_path: Path, local_cluster: Callable[..., LocalCluster]
) -> None:
    """On a cluster the user passed in with allowed-failures=3, the scheduler
    reruns a task lost with its worker (same key, same try) until 4 workers
    have died under it; only then does the runner see the loss (KilledWorker)
    and charge a try. Mini-batch 15 is killed once: rerun by the scheduler,
    never charged (tries 1). Mini-batch 30 is killed 4 times: one try charged
    (tries 2), its second try succeeds."""
    allowed_failures = 3
    files = make_files(tmp_path / "in", 60)
    once, given_up = files[15].name, files[30].name
    victims = {once: 1, given_up: allowed_failures + 1}
    marks = tmp_path / "marks"
    with (
        dask.config.set(
            {
                "distributed.scheduler.allowed-failures": allowed_failures,
                # one task at a time per worker, queued on the scheduler: a
                # kill costs the victim's task alone
                "distributed.scheduler.worker-saturation": 1.0,
                # one mini-batch per task, so the charged try is the victim's
                "daskrun.runner.task-seconds": 0,
            }
        ),
        local_cluster() as cluster,
        Client(cluster) as client,
        VictimKiller(client, marks, victims) as killer,
    ):
        run = run_step(
            tmp_path,
            victim_script(marks, victims, seconds=0.02),
            Dataset.File.from_files(str(tmp_path / "in")),
            mini_batch_size=1,
            run_max_try=3,
            compute_target=client,
        )
    kills = killer.check()
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [p.name for p in files]
    assert [k.held for k in kills] == [1] * len(kills), kills
    assert len({k.pid for k in kills}) == len(kills) == 1 + allowed_failures + 1
    for name in victims:  # ran to the end once, on a process not killed under it
        (done,) = (marks / f"{name}.done").read_text().split()
        assert int(done) not in {k.pid for k in kills if k.name == name}
    report = pd.read_csv(
        Path(run.logs_dir) / "sys/job_report/processed_mini-batches.csv"
    ).set_index("index")
    assert sorted(report.index) == list(range(60))
    assert report["error"].isna().all()
    assert report.loc[15, "tries"] == 1  # the scheduler's rerun is not a try
    assert report.loc[30, "tries"] == 2  # 4 deaths: one KilledWorker, one try
    assert (report.drop(index=[15, 30])["tries"] == 1).all()


def test_the_own_cluster_keeps_a_worker_that_dies_again_and_again() -> None:
    # distributed's SpecCluster closes the Nanny of a worker the scheduler
    # lost when, lost-worker-timeout later, no worker of its name is back:
    # a worker dying on every try (a timeout each time) was caught between
    # two lives until no Nanny was left, and the job waited for ever. With
    # the timeout at 0.05 s, before any restart is done, daskrun's own
    # cluster still gets each killed worker back, every time.
    with (
        dask.config.set({"distributed.deploy.lost-worker-timeout": 0.05}),
        local_cluster(2) as client,
    ):
        for _ in range(3):
            address, pid = next(iter(client.run(os.getpid).items()))
            os.kill(pid, signal.SIGKILL)

            def back(gone: str = address) -> bool:
                workers = client.scheduler_info(n_workers=-1)["workers"]
                return len(workers) == 2 and gone not in workers

            poll_for(back, timeout=60, what="the killed worker's restart")
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2


def test_a_cluster_whose_workers_all_leave_fails_the_job_in_bounded_time(
    tmp_path: Path, local_cluster: Callable[..., LocalCluster]
) -> None:
    # a cluster of the user's (not a batch queue) whose workers all leave
    # mid-job, none coming back: the job fails once daskrun.workers-timeout
    # has passed with no worker, naming it, instead of waiting for ever
    cluster = local_cluster()
    make_files(tmp_path / "in", 40)
    started = tmp_path / "started"
    script = f"""
import os, time

def init():
    pass

def run(mini_batch):
    open({str(started)!r}, "a").close()
    time.sleep(0.5)
    return [os.path.basename(p) for p in mini_batch]
"""
    leaver = threading.Thread(
        target=lambda: (
            poll_for(started.exists, timeout=120, what="the first run()"),
            cluster.scale(0),
        ),
        daemon=True,
    )
    leaver.start()
    begin = time.monotonic()
    with dask.config.set({"daskrun.workers-timeout": 2}):
        run = run_step(
            tmp_path,
            script,
            Dataset.File.from_files(str(tmp_path / "in")),
            mini_batch_size=1,
            compute_target=cluster,
            error_threshold=-1,
        )
    leaver.join(5)
    assert run.status == "Failed"
    assert (
        "every worker of the cluster left and none came back within 2 s "
        "(daskrun.workers-timeout)" in (run.error or "")
    ), run.error
    assert run.run_id in (run.error or "")  # the resume command names the run
    assert time.monotonic() - begin < 90
