"""Dask collections in and out: ``daskrun.map_partitions`` over dataframes and
bags on real worker processes, collections as step inputs, and step outputs
read back lazily."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask
import dask.bag as db
import dask.dataframe as dd
import pandas as pd
import pytest
from distributed import Client, LocalCluster
from hypothesis import given, settings
from hypothesis import strategies as st

import daskrun
from daskrun import Dataset, JobFailedError
from daskrun.backends.inputs.native import collection_token
from daskrun.engine.output import format_rows
from daskrun.monitoring.monitor import REPORT
from daskrun.registry.records import RunRecord

from .helpers import (
    VictimKiller,
    committed,
    job_page,
    kill_client,
    make_files,
    poll_for,
    run_step,
    victim_script,
    wait_for_parts,
    write_script,
)

SCORE = """
import os

def init():
    global factor
    factor = 2
    marks = os.environ.get("MARKS")
    if marks:
        with open(os.path.join(marks, f"init-{os.getpid()}"), "a") as f:
            f.write("init\\n")

def run(df):
    return df.assign(score=df.x * factor + 1, pid=os.getpid())
"""

RANK = """
def init():
    pass

def run(df):
    return df.assign(rank=df.score * 10)
"""


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster) as c:
        yield c


def _frame(n: int = 40) -> pd.DataFrame:
    return pd.DataFrame({"id": range(n), "x": [float(i) for i in range(n)]})


def _parquet(folder: Path, n: int = 40, parts: int = 4) -> Path:
    dd.from_pandas(_frame(n), npartitions=parts).to_parquet(folder)
    return folder


def test_parquet_in_parquet_out_equals_pandas(tmp_path: Path, client: Client) -> None:
    script = write_script(tmp_path / "src", SCORE)
    ddf = dd.read_parquet(_parquet(tmp_path / "in"))
    scored = daskrun.map_partitions(str(script), ddf)
    assert isinstance(scored, dd.DataFrame)  # lazy: nothing written yet
    scored.drop(columns="pid").to_parquet(tmp_path / "out")
    got = pd.read_parquet(tmp_path / "out").sort_values("id", ignore_index=True)
    frame = _frame()
    expected = frame.assign(score=frame.x * 2 + 1)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)


def test_init_runs_once_per_worker_process(tmp_path: Path, client: Client) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    script = write_script(tmp_path / "src", SCORE)
    ddf = dd.from_pandas(_frame(60), npartitions=12)
    scored = daskrun.map_partitions(
        str(script), ddf, environment_variables={"MARKS": str(marks)}
    )
    pids = set(scored.pid.compute())
    inits = {int(p.name.split("-")[1]): p.read_text() for p in marks.iterdir()}
    # every worker process ran init() once, before any of its partitions
    assert pids <= set(inits)
    assert all(text == "init\n" for text in inits.values())
    assert len(inits) == len(client.nthreads())
    # a second collection through the same script and options: no new init()
    again = daskrun.map_partitions(
        str(script), ddf, environment_variables={"MARKS": str(marks)}
    )
    assert len(again.compute()) == 60
    assert all(p.read_text() == "init\n" for p in marks.iterdir())


FLAKY = """
import os

def init():
    pass

def run(df):
    tries = os.path.join(os.environ["TRIES"], str(int(df.id.iloc[0])))
    with open(tries, "a") as f:
        f.write("x")
    if int(df.id.iloc[0]) == 10 and os.path.getsize(tries) < 3:
        raise RuntimeError("flaky")
    return df.assign(y=df.x + 1)
"""


def test_a_partition_failing_twice_then_succeeding_appears_once(
    tmp_path: Path, client: Client
) -> None:
    tries = tmp_path / "tries"
    tries.mkdir()
    script = write_script(tmp_path / "src", FLAKY)
    ddf = dd.from_pandas(_frame(40), npartitions=4)  # ids 0, 10, 20, 30 first
    out = daskrun.map_partitions(
        str(script),
        ddf,
        run_max_try=3,
        error_threshold=0,
        environment_variables={"TRIES": str(tries)},
    ).compute()
    assert sorted(out.id) == list(range(40))
    assert (tries / "10").read_text() == "xxx"
    assert (tries / "20").read_text() == "x"
    # the first partition's head was also the sample that inferred the meta
    assert (tries / "0").read_text() == "xx"


POISON = """
def init():
    pass

def run(df):
    if (df.id == 13).any():
        1 / 0
    return df.assign(y=df.x + 1)
"""


def test_poison_partition_within_threshold_is_dropped_and_reported(
    tmp_path: Path, client: Client
) -> None:
    script = write_script(tmp_path / "src", POISON)
    ddf = dd.from_pandas(_frame(40), npartitions=4)
    out = daskrun.map_partitions(
        str(script), ddf, error_threshold=10, run_max_try=1, name="poison-within"
    ).compute()
    assert sorted(out.id) == [*range(10), *range(20, 40)]
    events = [msg for _, msg in client.get_events("daskrun-poison-within")]
    assert [(e["index"], e["items"]) for e in events] == [(1, 10)]
    assert events[0]["error"] == "ZeroDivisionError: division by zero"
    assert "1 / 0" in events[0]["traceback"]


def test_the_result_written_as_a_step_writes_its_output(
    tmp_path: Path, client: Client
) -> None:
    # the step's writer on each worker, parts assembled once, in order; the
    # dropped partition adds no rows
    script = write_script(tmp_path / "src", POISON)
    ddf = dd.from_pandas(_frame(40), npartitions=4)
    scored = daskrun.map_partitions(
        str(script), ddf, error_threshold=10, run_max_try=1, name="written"
    )
    run = daskrun.map_run(scored)
    final = run.write(str(tmp_path / "out"), file_name="scores.csv")
    assert final == str(tmp_path / "out" / "scores.csv")
    written = pd.read_csv(final)
    expected = scored.compute().reset_index(drop=True)
    # Arrow writes 1.0 as 1, as the step does
    pd.testing.assert_frame_equal(written, expected, check_dtype=False)
    assert list(written.id) == [*range(10), *range(20, 40)]
    assert sorted(os.listdir(tmp_path / "out")) == ["scores.csv"]
    # a bag's items as text lines, as a step writes them
    bag = db.from_sequence([f"x{i}" for i in range(9)], npartitions=3)
    join = write_script(tmp_path / "b", JOIN)
    upper = daskrun.map_partitions(str(join), bag, error_threshold=-1)
    lines = daskrun.map_run(upper).write(str(tmp_path / "text"), output_format="text")
    assert Path(lines).read_text().split() == ["X0", "X1", "X2", "X6", "X7", "X8"]


def test_poison_partition_beyond_threshold_fails_compute(
    tmp_path: Path, client: Client
) -> None:
    script = write_script(tmp_path / "src", POISON)
    ddf = dd.from_pandas(_frame(40), npartitions=4)
    scored = daskrun.map_partitions(str(script), ddf, error_threshold=5, run_max_try=2)
    with pytest.raises(JobFailedError) as info:
        scored.compute()
    first = str(info.value).splitlines()[0]
    assert first.startswith("error_threshold=5 exceeded: 10 items failed")
    assert "partition 1" in first
    assert "ZeroDivisionError: division by zero" in first


def test_two_scripts_chained(tmp_path: Path, client: Client) -> None:
    score = write_script(tmp_path / "src", SCORE)
    rank = write_script(tmp_path / "src", RANK, name="rank.py")
    ddf = dd.from_pandas(_frame(30), npartitions=3)
    ranked = daskrun.map_partitions(
        str(rank), daskrun.map_partitions(str(score), ddf).drop(columns="pid")
    )
    got = ranked.compute().sort_values("id", ignore_index=True)
    assert list(got["rank"]) == [(i * 2 + 1) * 10 for i in range(30)]
    # and joined with plain Dask
    joined = ranked.merge(ddf.assign(z=ddf.x * 3)[["id", "z"]], on="id").compute()
    assert sorted(joined.z) == [i * 3 for i in range(30)]


READ = """
import os

def init():
    pass

def run(paths):
    return [f"{os.path.basename(p)}:{open(p).read()}" for p in paths]
"""


def test_a_bag_of_paths(tmp_path: Path, client: Client) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    paths = []
    for i in range(9):
        (folder / f"{i}.txt").write_text(str(i * i))
        paths.append(str(folder / f"{i}.txt"))
    script = write_script(tmp_path / "src", READ)
    bag = db.from_sequence(paths, npartitions=3)
    out = daskrun.map_partitions(str(script), bag)
    assert isinstance(out, db.Bag)
    assert out.npartitions == 3
    assert out.compute() == [f"{i}.txt:{i * i}" for i in range(9)]


def test_not_a_collection_is_refused(tmp_path: Path, client: Client) -> None:
    script = write_script(tmp_path / "src", READ)
    with pytest.raises(daskrun.ConfigError, match="is not a Dask dataframe or bag"):
        daskrun.map_partitions(str(script), [1, 2, 3])


def test_a_second_compute_counts_the_same_failures(
    tmp_path: Path, client: Client
) -> None:
    # 10 items fail of 40, within error_threshold=15: once, not per compute
    script = write_script(tmp_path / "src", POISON)
    ddf = dd.from_pandas(_frame(40), npartitions=4)
    out = daskrun.map_partitions(
        str(script), ddf, error_threshold=15, run_max_try=1, name="twice"
    )
    kept = [*range(10), *range(20, 40)]
    assert sorted(out.compute().id) == kept
    poll_for(  # the dropped partition
        lambda: client.get_events("daskrun-twice"),
        timeout=30,
        what="partition 1 to be reported",
    )
    for _ in range(2):  # computed again: the same rows, no failure counted again
        assert sorted(out.compute().id) == kept
    events = [msg for _, msg in client.get_events("daskrun-twice")]
    assert [(e["index"], e["items"]) for e in events] == [(1, 10)]
    run = daskrun.map_run(out)
    assert (run.tally.items_failed, run.tally.mini_batches_failed) == (10, 1)
    assert run.tally.items_succeeded == 30
    # a second call is a run of its own, counted afresh
    again = daskrun.map_partitions(
        str(script), ddf, error_threshold=15, run_max_try=1, name="twice"
    )
    assert daskrun.map_run(again).tally.items_failed == 10
    assert len(again.compute()) == 30
    events = [msg for _, msg in client.get_events("daskrun-twice")]
    assert [(e["index"], e["items"]) for e in events] == [(1, 10), (1, 10)]
    assert len({e["run_id"] for e in events}) == 2


# a cluster (see the local_cluster fixture) started in LOST leaves a lost
# task to daskrun's runner (allowed-failures=0), one partition per task
LOST = {
    "distributed.scheduler.allowed-failures": 0,
    "daskrun.runner.task-seconds": 0,
}


def test_a_partition_that_kills_its_worker_is_dropped_and_counted(
    tmp_path: Path, local_cluster: Callable[..., LocalCluster]
) -> None:
    files = make_files(tmp_path / "in", 12)
    paths = [str(p) for p in files]
    victims = {files[3].name: 2}  # the first item of partition 1, both tries
    marks = tmp_path / "marks"
    script = write_script(tmp_path / "src", victim_script(marks, victims, 0.01))
    with (
        dask.config.set(LOST),
        local_cluster() as cluster,
        Client(cluster) as client,
        VictimKiller(client, marks, victims) as killer,
    ):
        bag = db.from_sequence(paths, npartitions=4)
        out = daskrun.map_partitions(str(script), bag, run_max_try=2, error_threshold=3)
        got = out.compute()
        run = daskrun.map_run(out)
        dead = run.failed_items().compute()
    assert len(killer.check()) == 2
    names = [p.name for p in files]
    assert got == names[:3] + names[6:]
    assert (run.tally.items_failed, run.tally.mini_batches_failed) == (3, 1)
    assert list(run.last_errors) == [1]
    assert run.last_errors[1].startswith("WorkerDied: worker-")
    assert dead == paths[3:6]
    report = pd.read_csv(run.logs_dir / REPORT)
    assert report.set_index("index").loc[1, "tries"] == 2


HANG = """
import time

def init():
    pass

def run(df):
    if (df.id == 13).any():
        time.sleep(600)
    return df.assign(y=df.x + 1)
"""


def test_a_hung_partition_is_dropped_and_counted(
    tmp_path: Path, local_cluster: Callable[..., LocalCluster]
) -> None:
    script = write_script(tmp_path / "src", HANG)
    with dask.config.set(LOST), local_cluster() as cluster, Client(cluster):
        ddf = dd.from_pandas(_frame(40), npartitions=4)
        start = time.monotonic()
        out = daskrun.map_partitions(
            str(script),
            ddf,
            run_invocation_timeout=2,
            run_max_try=1,
            error_threshold=10,
        )
        got = out.compute()
        run = daskrun.map_run(out)
        dead = run.failed_items().compute()
    assert time.monotonic() - start < 60
    assert sorted(got.id) == [*range(10), *range(20, 40)]
    assert run.tally.items_failed == 10
    assert run.last_errors[1].startswith(
        "TimeoutError: run() did not return within run_invocation_timeout=2 s"
    )
    assert sorted(dead.id) == list(range(10, 20))


def test_beyond_the_threshold_a_hung_partition_fails_the_compute(
    tmp_path: Path, local_cluster: Callable[..., LocalCluster]
) -> None:
    script = write_script(tmp_path / "src", HANG)
    with dask.config.set(LOST), local_cluster() as cluster, Client(cluster):
        ddf = dd.from_pandas(_frame(40), npartitions=4)
        out = daskrun.map_partitions(
            str(script),
            ddf,
            run_invocation_timeout=2,
            run_max_try=1,
            error_threshold=5,
        )
        with pytest.raises(JobFailedError) as info:
            out.compute()
    first = str(info.value).splitlines()[0]
    assert first.startswith("error_threshold=5 exceeded: 10 items failed")
    assert "partition 1" in first and "TimeoutError" in first


JOIN = """
def init():
    pass

def run(items):
    if "x3" in items:
        return "".join(items)
    return [item.upper() for item in items]
"""


def test_a_str_return_is_refused_as_a_step_refuses_it(
    tmp_path: Path, client: Client
) -> None:
    script = write_script(tmp_path / "src", JOIN)
    bag = db.from_sequence([f"x{i}" for i in range(9)], npartitions=3)
    out = daskrun.map_partitions(str(script), bag, error_threshold=-1)
    # not the characters of "x3x4x5" as nine items
    assert out.compute() == ["X0", "X1", "X2", "X6", "X7", "X8"]
    with pytest.raises(TypeError) as refused:
        format_rows("x3x4x5")  # what a step writes run()'s result with
    assert daskrun.map_run(out).last_errors == {1: f"TypeError: {refused.value}"}


SLOW_ITEMS = """
import time

def init():
    pass

def run(items):
    time.sleep(0.4)
    return list(items)
"""


def test_progress_on_the_daskrun_page(
    tmp_path: Path, cluster: LocalCluster, client: Client
) -> None:
    script = write_script(tmp_path / "src", SLOW_ITEMS)
    bag = db.from_sequence(range(24), npartitions=12)
    results: list[Any] = []
    job = threading.Thread(
        target=lambda: results.append(
            daskrun.map_partitions(str(script), bag, name="paged", client=client)
        )
    )
    job.start()
    page, plots = job_page(cluster)
    seen = set()
    deadline = time.monotonic() + 60
    while job.is_alive() and time.monotonic() < deadline:
        with urllib.request.urlopen(plots, timeout=10) as reply:
            data = json.loads(reply.read())
        if str(data.get("run_id")).startswith("paged_"):
            seen |= set(re.findall(r"(\d+)/12 done", str(data["summary"])))
        time.sleep(0.2)
    job.join(60)
    with urllib.request.urlopen(plots, timeout=10) as reply:
        data = json.loads(reply.read())
    assert str(data["run_id"]).startswith("paged_"), data["run_id"]
    assert "12/12 done, 0 failed" in data["summary"]
    assert seen - {"0", "12"}, seen  # progress seen while it ran
    run = daskrun.map_run(results[0])
    assert data["run_id"] == run.run_id
    assert run.page == page  # the link with the scheduler's token


def test_a_meta_that_is_not_a_dataframe_is_refused(
    tmp_path: Path, client: Client
) -> None:
    script = write_script(tmp_path / "src", SCORE)
    ddf = dd.from_pandas(_frame(8), npartitions=2)
    with pytest.raises(daskrun.ConfigError, match=r"meta=\{'score': 'f8'\} is not"):
        daskrun.map_partitions(str(script), ddf, meta={"score": "f8"})


STEP_SCORE = """
import os, time, uuid

def init():
    pass

def run(df):
    calls = os.environ["CALLS"]
    open(os.path.join(calls, f"{int(df.id.iloc[0])}.{uuid.uuid4().hex}"), "w").close()
    time.sleep(0.05)
    return df.assign(score=df.x * 2 + 1)
"""

DRIVER = """
import sys
import dask.dataframe as dd
import daskrun

cfg = daskrun.ParallelRunConfig(
    "score.py", error_threshold=0, output_action="append_row",
    output_format="csv", process_count_per_node=2,
    environment_variables={"CALLS": sys.argv[2]},
)
step = daskrun.ParallelRunStep(
    "score-frame", cfg, inputs=[dd.read_parquet(sys.argv[1])], output="out"
)
step.run().raise_for_status()
"""


def test_a_step_over_a_dataframe_resumes_after_a_client_kill(
    tmp_path: Path, runs_dir: Path
) -> None:
    frame = _frame(400)
    dd.from_pandas(frame, npartitions=80).to_parquet(tmp_path / "in")
    calls = tmp_path / "calls"
    calls.mkdir()
    write_script(tmp_path, STEP_SCORE)
    (tmp_path / "driver.py").write_text(DRIVER)
    env = dict(os.environ, DASK_DASKRUN__RUNS_DIR=str(runs_dir))
    proc = subprocess.Popen(
        [sys.executable, "driver.py", str(tmp_path / "in"), str(calls)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_parts(tmp_path / "out", 15, proc)
    kill_client(proc)
    written = committed(tmp_path / "out")
    assert 15 <= len(written) < 80
    assert not (tmp_path / "out" / "parallel_run_step.csv").exists()
    for marker in calls.iterdir():
        marker.unlink()
    (record,) = RunRecord.find(runs_dir)
    run_id = record.run_id
    assert record.inputs == [
        f"dask-dataframe:{collection_token(dd.read_parquet(str(tmp_path / 'in')))}"
    ]

    # the collection is needed again, and must be the same one
    with pytest.raises(daskrun.ConfigError, match=r"inputs=\[ddf\]"):
        daskrun.resume(run_id)
    changed = dd.read_parquet(str(tmp_path / "in")).assign(x=lambda d: d.x + 1)
    with pytest.raises(daskrun.InputError) as info:
        daskrun.resume(run_id, inputs=[changed])
    assert "\n" not in str(info.value)
    assert "is not the collection run" in str(info.value)

    run = daskrun.resume(
        run_id, inputs=[dd.read_parquet(str(tmp_path / "in"))], show_output=False
    ).raise_for_status()
    got = pd.read_csv(run.output_path)
    pd.testing.assert_frame_equal(
        got, frame.assign(score=frame.x * 2 + 1), check_dtype=False
    )
    redone = {int(m.name.split(".")[0]) // 5 for m in calls.iterdir()}
    assert len(list(calls.iterdir())) == 80 - len(written)
    assert not redone & written
    # and the published output, lazily, for the next step in Dask
    again = run.to_dask_dataframe()
    assert sorted(again.id.compute()) == list(range(400))
    rows = run.to_bag().take(2)
    assert rows[0] == {"id": 0, "x": 0.0, "score": 1.0}


SAVE = """
import os

def init():
    pass

def run(mini_batch, mini_batch_context):
    where = os.path.join(os.environ["SAVED"], f"{mini_batch_context.minibatch_index}")
    if isinstance(mini_batch, list):
        with open(where + ".txt", "w") as f:
            f.write("\\n".join(mini_batch))
    else:
        mini_batch.to_pickle(where + ".pkl")
    return [1] * len(mini_batch)
"""


def _saved_by_the_engine(
    tmp_path: Path, inputs: object, **config: object
) -> dict[int, object]:
    saved = tmp_path / f"saved-{len(list(tmp_path.iterdir()))}"
    saved.mkdir()
    run_step(
        tmp_path,
        SAVE,
        [inputs],
        name="save-batches",
        output=None,
        output_action="summary_only",
        environment_variables={"SAVED": str(saved)},
        process_count_per_node=2,
        **config,
    ).raise_for_status()
    return {
        int(p.stem): p.read_text().split("\n")
        if p.suffix == ".txt"
        else pd.read_pickle(p)
        for p in saved.iterdir()
    }


def test_collections_and_the_engine_cut_the_same_mini_batches(tmp_path: Path) -> None:
    # quoted newlines, cut at sizes smaller than a record
    rows = [f'{i},"line {i}\nstill {i}, quoted",{i * 0.5}' for i in range(60)]
    (tmp_path / "a.csv").write_text("id,text,v\n" + "\n".join(rows) + "\n")
    (tmp_path / "b.csv").write_text('id,text,v\n99,"x\ny",1.0\n')
    csv = Dataset.Tabular.from_delimited_files(str(tmp_path / "*.csv"))
    for size in (40, 300):
        ddf = csv.to_dask_dataframe(size)
        engine = _saved_by_the_engine(tmp_path, csv, mini_batch_size=size)
        assert ddf.npartitions == len(engine) > 2
        for i in range(ddf.npartitions):
            pd.testing.assert_frame_equal(
                ddf.partitions[i].compute(scheduler="sync").reset_index(drop=True),
                engine[i].reset_index(drop=True),
                check_dtype=False,  # Dask makes strings pyarrow strings
            )
    # a partitioned data set with partition_keys: one mini-batch per key
    for user, n in (("ann", 3), ("bob", 5)):
        folder = tmp_path / "by" / f"user={user}"
        folder.mkdir(parents=True)
        for k in range(2):
            pd.DataFrame({"x": range(n)}).to_parquet(folder / f"{k}.parquet")
    parted = Dataset.Tabular.from_parquet_files(
        str(tmp_path / "by"), partition_format="/user={user}/{name}.parquet"
    )
    ddf = parted.to_dask_dataframe(partition_keys=["user"])
    engine = _saved_by_the_engine(tmp_path, parted, partition_keys=["user"])
    assert ddf.npartitions == len(engine) == 2
    for i in range(2):
        pd.testing.assert_frame_equal(
            ddf.partitions[i].compute(scheduler="sync").reset_index(drop=True),
            engine[i].reset_index(drop=True),
            check_dtype=False,
        )
    # files: a bag's partition is the mini-batch's paths
    make_files(tmp_path / "files", 7)
    files = Dataset.File.from_files(str(tmp_path / "files"))
    bag = files.to_bag(3)
    engine = _saved_by_the_engine(tmp_path, files, mini_batch_size=3)
    assert bag.npartitions == 3
    got = [list(p.compute(scheduler="sync")) for p in bag.to_delayed()]
    assert got == [engine[i] for i in range(3)]


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.text(alphabet='ab,"\n', max_size=6), min_size=1, max_size=30),
    size=st.integers(min_value=1, max_value=200),
)
def test_a_tabular_data_set_as_dataframe_is_the_whole_file(
    tmp_path_factory: pytest.TempPathFactory, values: list[str], size: int
) -> None:
    # the partitions, in order, are the file read by pandas in one go
    folder = tmp_path_factory.mktemp("csv")
    frame = pd.DataFrame({"id": range(len(values)), "text": values})
    frame.to_csv(folder / "a.csv", index=False)
    ds = Dataset.Tabular.from_delimited_files(str(folder / "a.csv"))
    got = ds.to_dask_dataframe(size).compute(scheduler="sync")
    expected = pd.read_csv(folder / "a.csv")

    # Dask's strings are pyarrow strings: compare values, missing as None
    def plain(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.reset_index(drop=True).astype(object)
        return frame.where(frame.notna(), None)

    pd.testing.assert_frame_equal(plain(got), plain(expected))
