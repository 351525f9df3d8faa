"""CPU feeding GPU in one step: ``preprocess()`` on the CPU pool, ``run()``
on the run pool (daskrun.engine.stages), with real worker processes.

Without a GPU, daskrun's local cluster makes both pools of CPU processes
(``daskrun.preprocess.run-workers``, 1: the first process runs ``run()``,
the others ``preprocess()``), so these tests run everywhere.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import dask.config
import pandas as pd
import pytest

from daskrun import Dataset
from daskrun.backends.compute.local import pool_resources
from daskrun.backends.compute.machine import gpu_count
from daskrun.engine.stages import script_has_preprocess
from daskrun.exceptions import ConfigError, JobFailedError

from .helpers import (
    make_files,
    poison_files,
    poll_for,
    run_step,
    stopped_when_marked,
)

# preprocess() reads each file and notes its process; run() notes its own,
# and that init() ran there; init() leaves a mark per process in MARKS
TWO_STAGE = """
import os, time

MARKS = {marks!r}

def init():
    global loaded
    loaded = os.getpid()
    open(os.path.join(MARKS, "init." + str(os.getpid())), "w").close()

def preprocess(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    for name in names:
        if "pre-poison" in name:
            raise ValueError("cannot preprocess " + name)
        if name.startswith("hang"):
            time.sleep(3600)
    {victim}
    open(os.path.join(MARKS, "pre." + str(os.getpid())), "w").close()
    return [(n, open(p).read(), os.getpid()) for n, p in zip(names, mini_batch)]

def run(batch):
    assert loaded == os.getpid(), "init() did not run in this process"
    for name, _, _ in batch:
        if "run-poison" in name:
            raise ValueError("cannot run " + name)
    {victim_run}
    time.sleep({seconds!r})
    return [f"{{n}} {{c}} {{pid != os.getpid()}}" for n, c, pid in batch]
"""

# a victim waits, its pid in MARKS/<where>.pid, until the test kills it;
# its next try goes on (the mark is there)
VICTIM = """
    mark = os.path.join(MARKS, "{where}.pid")
    if any(os.path.basename(p) == {name!r} for p in {arg}) and not os.path.exists(mark):
        with open(mark + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(mark + ".tmp", mark)
        time.sleep(120)
"""


def two_stage(
    marks: Path,
    seconds: float = 0.0,
    victim: str | None = None,
    victim_run: str | None = None,
) -> str:
    marks.mkdir(parents=True, exist_ok=True)

    def waits(where: str, name: str | None, arg: str) -> str:
        if name is None:
            return "pass"
        return VICTIM.format(where=where, name=name, arg=arg).strip()

    return TWO_STAGE.format(
        marks=str(marks),
        seconds=seconds,
        victim=waits("pre", victim, "mini_batch"),
        victim_run=waits("run", victim_run, "[n for n, _, _ in batch]"),
    )


def _report(logs_dir: str) -> pd.DataFrame:
    path = Path(logs_dir) / "sys/job_report/processed_mini-batches.csv"
    return pd.read_csv(path).set_index("index")


def _pids(marks: Path, kind: str) -> set[str]:
    return {
        p.name.split(".")[1] for p in marks.glob(f"{kind}.*") if "pid" not in p.name
    }


def test_the_two_stages_give_the_one_stage_output_in_order(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 40)
    marks = tmp_path / "marks"
    run = run_step(
        tmp_path,
        two_stage(marks),
        Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=3,
        process_count_per_node=3,
    )
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    # each file's content, preprocessed in another process than run()'s
    assert lines == [f"f{i:05d}.txt {i} True" for i in range(40)]
    assert run.items_succeeded == 40 and run.mini_batches_failed == 0
    # init() only in the run pool (one process), preprocess() elsewhere
    assert len(_pids(marks, "init")) == 1
    assert _pids(marks, "pre") and not _pids(marks, "pre") & _pids(marks, "init")


def test_a_poison_item_in_each_stage_is_isolated_and_counted_once(
    tmp_path: Path,
) -> None:
    names = poison_files(tmp_path / "in", 20, set())
    for i, stage in ((5, "pre"), (13, "run")):
        old = tmp_path / "in" / names[i]
        names[i] = names[i].replace(".txt", f"-{stage}-poison.txt")
        old.rename(tmp_path / "in" / names[i])
    run = run_step(
        tmp_path,
        two_stage(tmp_path / "marks"),
        Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=4,
        run_max_try=2,
        error_threshold=2,
        process_count_per_node=3,
    )
    assert run.status == "Completed", run.error
    assert (run.items_failed, run.items_succeeded) == (2, 18)
    lines = Path(run.output_path or "").read_text().splitlines()
    kept = [(i, n) for i, n in enumerate(names) if i not in (5, 13)]
    assert lines == [f"{n} {i} True" for i, n in kept]
    failed = run.failed_items()
    assert sorted(os.path.basename(p) for p in failed.to_path()) == sorted(
        [names[5], names[13]]
    )
    errors = " ".join(failed.last_errors.values())
    assert "cannot preprocess" in errors and "cannot run" in errors


def test_a_hung_preprocess_is_stopped_by_the_timeout_and_named(
    tmp_path: Path,
) -> None:
    make_files(tmp_path / "in", 1, prefix="hang")
    make_files(tmp_path / "in", 9, prefix="ok")
    start = time.monotonic()
    run = run_step(
        tmp_path,
        two_stage(tmp_path / "marks"),
        Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=1,
        run_invocation_timeout=5,
        run_max_try=2,
        error_threshold=1,
        process_count_per_node=3,
    )
    assert run.status == "Completed", run.error
    assert run.items_failed == 1 and run.mini_batches_failed == 1
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [f"ok{i:05d}.txt {i} True" for i in range(9)]
    report = _report(run.logs_dir)
    assert report.loc[0, "tries"] == 2
    assert "preprocess() did not return" in report.loc[0, "error"]
    assert "run_invocation_timeout=5" in report.loc[0, "error"]
    assert time.monotonic() - start < 90


@pytest.mark.slow
def test_a_frozen_preprocess_worker_is_caught_by_the_client_deadline(
    tmp_path: Path,
) -> None:
    # a CPU worker stopped (SIGSTOP) for 30 s inside preprocess() runs no
    # watchdog: the client's deadline (timeout + grace) restarts it, and the
    # mini-batch is preprocessed again elsewhere, its rows written once
    make_files(tmp_path / "in", 12)
    marks = tmp_path / "marks"
    script = two_stage(marks, victim="f00005.txt")
    start = time.monotonic()
    with (
        stopped_when_marked(marks / "pre.pid"),
        dask.config.set(
            {"daskrun.runner.frozen-grace": 2, "daskrun.runner.speculate": False}
        ),
    ):
        run = run_step(
            tmp_path,
            script,
            Dataset.File.from_files(str(tmp_path / "in")),
            mini_batch_size=1,
            run_invocation_timeout=3,
            run_max_try=2,
            process_count_per_node=3,
        )
        elapsed = time.monotonic() - start
    assert (marks / "pre.pid").exists()
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [f"f{i:05d}.txt {i} True" for i in range(12)]
    assert elapsed < 28, elapsed  # not the 30 s the worker stayed stopped


@pytest.mark.parametrize("stage", ["pre", "run"])
def test_a_worker_killed_in_either_pool_loses_and_duplicates_nothing(
    tmp_path: Path, stage: str
) -> None:
    make_files(tmp_path / "in", 30)
    marks = tmp_path / "marks"
    victim = {"victim": "f00011.txt"} if stage == "pre" else {}
    victim_run = {"victim_run": "f00011.txt"} if stage == "run" else {}
    script = two_stage(marks, 0.05, **victim, **victim_run)
    killed: list[int] = []

    def kill() -> None:
        mark = marks / f"{stage}.pid"
        poll_for(mark.exists, timeout=120)
        pid = int(mark.read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    run = run_step(
        tmp_path,
        script,
        Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=2,
        process_count_per_node=3,
    )
    killer.join(5)
    assert killed, "the victim never started"
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [f"f{i:05d}.txt {i} True" for i in range(30)]
    report = _report(run.logs_dir)
    # the victim's try is charged; one queued on the dead worker may be too
    assert report.loc[5, "tries"] == 2 and (report["tries"] <= 2).all()
    assert report["error"].isna().all()


def test_the_cpu_side_runs_at_most_ahead_mini_batches_ahead(tmp_path: Path) -> None:
    """preprocess() is fast, run() slow: without back-pressure the CPU pool
    would preprocess every mini-batch at once; with it, preprocessed
    mini-batches not yet run stay within run slots + ahead."""
    make_files(tmp_path / "in", 14)
    log = tmp_path / "log.txt"
    script = f"""
import os, time

def init():
    pass

def preprocess(mini_batch):
    with open({str(log)!r}, "a") as f:
        f.write(f"pre {{time.time()}}\\n")
    return mini_batch

def run(batch):
    time.sleep(0.4)
    with open({str(log)!r}, "a") as f:
        f.write(f"run {{time.time()}}\\n")
    return [os.path.basename(p) for p in batch]
"""
    with dask.config.set({"daskrun.preprocess.ahead": 1}):
        run = run_step(
            tmp_path,
            script,
            Dataset.File.from_files(str(tmp_path / "in")),
            mini_batch_size=1,
            process_count_per_node=3,
        )
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [f"f{i:05d}.txt" for i in range(14)]
    events = sorted(
        (float(t), kind)
        for kind, t in (line.split() for line in log.read_text().splitlines())
    )
    assert [k for _, k in events].count("pre") == 14
    ahead, most = 0, 0
    for _, kind in events:
        ahead += 1 if kind == "pre" else -1
        most = max(most, ahead)
    # one run slot + ahead=1; and the stages did overlap
    assert most == 2, events


def test_a_table_is_preprocessed_as_a_data_frame(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for i in range(3):
        frame = pd.DataFrame({"id": range(i * 40, (i + 1) * 40)})
        frame.to_csv(tmp_path / "in" / f"t{i}.csv", index=False)
    script = """
import os

def init():
    global pid
    pid = os.getpid()

def preprocess(df):
    return df.assign(pre=os.getpid())

def run(df):
    assert (df["pre"] != pid).all()
    return [str(i * 2) for i in df["id"]]
"""
    run = run_step(
        tmp_path,
        script,
        Dataset.Tabular.from_delimited_files(str(tmp_path / "in")),
        mini_batch_size="100",
        process_count_per_node=3,
    )
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [str(i * 2) for i in range(120)]


def test_a_cluster_without_pools_runs_both_stages_anywhere(
    tmp_path: Path, local_cluster: Any
) -> None:
    """A cluster of the user's whose workers advertise no resource: both
    stages run on any worker, and init() runs on each."""
    make_files(tmp_path / "in", 12)
    marks = tmp_path / "marks"
    with local_cluster() as cluster:
        run = run_step(
            tmp_path,
            two_stage(marks),
            Dataset.File.from_files(str(tmp_path / "in")),
            mini_batch_size=2,
            compute_target=cluster,
        )
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert [line.rsplit(" ", 1)[0] for line in lines] == [
        f"f{i:05d}.txt {i}" for i in range(12)
    ]
    assert len(_pids(marks, "init")) == 2


def test_cpu_workers_without_a_run_worker_fail_in_one_line(
    tmp_path: Path, local_cluster: Any
) -> None:
    make_files(tmp_path / "in", 4)
    with local_cluster(resources={"CPU": 1}) as cluster:
        run = run_step(
            tmp_path,
            two_stage(tmp_path / "marks"),
            Dataset.File.from_files(str(tmp_path / "in")),
            compute_target=cluster,
        )
    assert run.status == "Failed"
    assert "advertise the resource CPU but none GPU for run()" in (run.error or "")
    assert "--resources GPU=1" in (run.error or "")


def test_a_collection_with_preprocess_is_refused_in_one_line(
    tmp_path: Path, local_cluster: Any
) -> None:
    import dask.dataframe as dd
    from distributed import Client

    import daskrun

    script = tmp_path / "score.py"
    script.write_text(
        "def init():\n    pass\n\ndef preprocess(df):\n    return df\n\n"
        "def run(df):\n    return df\n"
    )
    frame = dd.from_pandas(pd.DataFrame({"x": range(8)}), npartitions=2)
    with local_cluster() as cluster, Client(cluster):
        # map_partitions runs a sample partition at once, to infer its meta
        with pytest.raises(JobFailedError, match=r"preprocess\(\), which a Dask"):
            daskrun.map_partitions(str(script), frame).compute()


def test_pools_of_the_local_cluster() -> None:
    assert pool_resources(4) == [{"GPU": 1}, {"CPU": 1}, {"CPU": 1}, {"CPU": 1}]
    assert pool_resources(2, gpus=True) == [{"GPU": 1}, {"GPU": 1}]
    with dask.config.set({"daskrun.preprocess.run-workers": 2}):
        assert pool_resources(3) == [{"GPU": 1}, {"GPU": 1}, {"CPU": 1}]
    with (
        dask.config.set({"daskrun.preprocess.run-workers": "two"}),
        pytest.raises(ConfigError, match=r"run-workers='two' is not a number"),
    ):
        pool_resources(3)
    assert script_has_preprocess("def preprocess(b):\n    return b\n")
    assert not script_has_preprocess("def run(b):\n    return b\n")


@pytest.mark.skipif(not gpu_count(), reason="needs a GPU (nvidia-smi lists none)")
def test_two_stages_on_a_gpu_machine(tmp_path: Path) -> None:
    """With a GPU, run() runs on the workers that hold one (resource GPU),
    and preprocess() wherever a CPU worker is, else on them too."""
    make_files(tmp_path / "in", 24)
    marks = tmp_path / "marks"
    run = run_step(
        tmp_path,
        two_stage(marks),
        Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=4,
    )
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert [line.rsplit(" ", 1)[0] for line in lines] == [
        f"f{i:05d}.txt {i}" for i in range(24)
    ]
    assert _pids(marks, "init")
