"""Failures at the level of one item: a mini-batch that failed its last try
is split, down to single items, so the good ones are scored and only the
poison ones count as failed (``daskrun.isolate-failures``); the failed ones
form a data set of their own, and ``--retry-failed`` runs only them."""

from __future__ import annotations

from pathlib import Path

import dask
import pandas as pd
import pytest
from distributed import LocalCluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daskrun import Dataset, StepRun
from daskrun.exceptions import ConfigError
from daskrun.registry.records import RunRecord

from .helpers import (
    daskrun,
    poison_files,
    poison_rows,
    run_step,
)
from .scripts import POISON_SCRIPT, ROWS_SCRIPT, fixable_script


def _failed_items(run: StepRun) -> pd.DataFrame:
    return pd.read_csv(
        Path(run.logs_dir) / "sys/job_report/failed_items.csv",
        keep_default_na=False,
    )


def test_poison_files_are_isolated(tmp_path: Path, cluster: LocalCluster) -> None:
    names = poison_files(tmp_path / "in", 100, {7, 50, 93})
    run = run_step(
        tmp_path,
        POISON_SCRIPT,
        Dataset.File.from_files(str(tmp_path / "in")),
        compute_target=cluster.scheduler_address,
        mini_batch_size=100,
        error_threshold=3,
        run_max_try=2,
    )
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [n for n in names if "poison" not in n]
    assert (run.items_succeeded, run.items_failed) == (97, 3)
    assert run.mini_batches_failed == 1
    failed = _failed_items(run)
    assert [Path(p).name for p in failed["input"]] == [
        "f00007-poison.txt",
        "f00050-poison.txt",
        "f00093-poison.txt",
    ]
    assert list(failed["error"]) == [
        f"ValueError: cannot score {name}"
        for name in ("f00007-poison.txt", "f00050-poison.txt", "f00093-poison.txt")
    ]
    assert list(zip(failed["start"], failed["stop"], strict=True)) == [
        (7, 8),
        (50, 51),
        (93, 94),
    ]


def test_poison_rows_are_isolated(tmp_path: Path, cluster: LocalCluster) -> None:
    frame = poison_rows(tmp_path / "in" / "rows.csv", 1000, {123, 877})
    run = run_step(
        tmp_path,
        ROWS_SCRIPT,
        Dataset.Tabular.from_delimited_files(str(tmp_path / "in")),
        compute_target=cluster.scheduler_address,
        mini_batch_size="1MB",
        error_threshold=2,
        run_max_try=1,
    )
    assert run.status == "Completed", run.error
    assert run.mini_batches_total == 1
    good = frame[frame["v"] >= 0]
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [f"{i} {v}" for i, v in zip(good["id"], good["v"], strict=True)]
    assert (run.items_succeeded, run.items_failed) == (998, 2)
    failed = _failed_items(run)
    assert list(zip(failed["start"], failed["stop"], strict=True)) == [
        (123, 124),
        (877, 878),
    ]
    assert failed["error"].str.startswith("ValueError: negative v in rows").all()
    assert list(failed["input"].str.split(" of ").str[0]) == ["row 123", "row 877"]
    dead = run.failed_items()
    assert list(dead.to_pandas_dataframe()["id"]) == [123, 877]
    assert set(dead.last_errors.values()) == set(failed["error"])


CRASH_SCRIPT = """
import os

def init():
    pass

def run(mini_batch):
    for p in mini_batch:
        if "poison" in os.path.basename(p):
            os._exit(3)  # as a segfault would: the worker process dies
    return [os.path.basename(p) for p in mini_batch]
"""


@pytest.mark.slow
def test_an_item_that_kills_its_worker_is_isolated(tmp_path: Path) -> None:
    names = poison_files(tmp_path / "in", 8, {5})
    run = run_step(
        tmp_path,
        CRASH_SCRIPT,
        Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=8,
        error_threshold=1,
        run_max_try=1,
        process_count_per_node=2,
    )
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [n for n in names if "poison" not in n]
    assert (run.items_succeeded, run.items_failed) == (7, 1)
    failed = _failed_items(run)
    assert [Path(p).name for p in failed["input"]] == ["f00005-poison.txt"]
    assert failed["error"][0].startswith("WorkerDied: "), failed["error"][0]


def test_isolation_off_fails_the_mini_batch_whole(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    poison_files(tmp_path / "in", 100, {7, 50, 93})
    with dask.config.set({"daskrun.isolate-failures": False}):
        run = run_step(
            tmp_path,
            POISON_SCRIPT,
            Dataset.File.from_files(str(tmp_path / "in")),
            compute_target=cluster.scheduler_address,
            mini_batch_size=100,
            error_threshold=-1,
            run_max_try=1,
        )
    assert run.status == "Completed", run.error
    assert Path(run.output_path or "").read_text() == ""
    assert (run.items_succeeded, run.items_failed) == (0, 100)
    failed = _failed_items(run)
    assert len(failed) == 100
    assert set(failed["error"]) == {"ValueError: cannot score f00007-poison.txt"}


def test_a_bad_isolate_failures_setting_is_refused(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    poison_files(tmp_path / "in", 2, set())
    with dask.config.set({"daskrun.isolate-failures": "sometimes"}):
        with pytest.raises(Exception, match="isolate-failures='sometimes'"):
            run_step(
                tmp_path,
                POISON_SCRIPT,
                Dataset.File.from_files(str(tmp_path / "in")),
                compute_target=cluster.scheduler_address,
            )


def test_retry_failed_runs_only_the_failed_items(
    tmp_path: Path, runs_dir: Path
) -> None:
    names = poison_files(tmp_path / "in", 40, {3, 4, 30})
    (tmp_path / "score.py").write_text(fixable_script(mark_each_item=True))
    (tmp_path / "calls").mkdir()
    args = ["--", "--calls", str(tmp_path / "calls"), "--fixed", str(tmp_path / "ok")]
    first = daskrun(
        "run", "score.py", "--input", "in", "--output", "out",
        "--mini-batch-size", "10", "--processes", "2", "--error-threshold", "-1",
        "--max-tries", "1", *args,
        cwd=tmp_path, runs=runs_dir,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    output = tmp_path / "out" / "parallel_run_step.txt"
    assert output.read_text().splitlines() == [n for n in names if "poison" not in n]
    (run_id,) = [p.name for p in runs_dir.iterdir() if p.is_dir()]
    run = StepRun.from_record(RunRecord.load(run_id, runs_dir))
    assert (run.items_failed, run.mini_batches_failed) == (3, 2)
    dead = run.failed_items()
    assert [Path(p).name for p in dead.files()] == [n for n in names if "poison" in n]
    assert dead.last_errors[str(tmp_path / "in" / names[30])] == (
        f"ValueError: not fixed yet: {names[30]}"
    )
    shown = daskrun("runs", "show", run_id, cwd=tmp_path, runs=runs_dir)
    assert "failed_items:\n  count: 3\n" in shown.stdout, shown.stdout
    assert f"csv: {run.logs_dir}/sys/job_report/failed_items.csv" in shown.stdout

    (tmp_path / "ok").touch()  # the cause is fixed
    for call in (tmp_path / "calls").iterdir():
        call.unlink()
    again = daskrun("resume", run_id, "--retry-failed", cwd=tmp_path, runs=runs_dir)
    assert again.returncode == 0, again.stderr
    assert output.read_text().splitlines() == names  # as a clean run's
    calls = sorted(c.name.split(".")[0] for c in (tmp_path / "calls").iterdir())
    assert calls == sorted(n.split(".")[0] for n in names if "poison" in n)
    run = StepRun.from_record(RunRecord.load(run_id, runs_dir))
    assert (run.items_succeeded, run.items_failed) == (40, 0)
    failed = (Path(run.logs_dir) / "sys/job_report/failed_items.csv").read_text()
    assert failed.splitlines() == ["index,input,error,start,stop"]

    clean = daskrun(
        "run", "score.py", "--input", "in", "--output", "clean",
        "--mini-batch-size", "10", "--processes", "2", *args,
        cwd=tmp_path, runs=runs_dir,
    )  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    assert (tmp_path / "clean" / "parallel_run_step.txt").read_bytes() == (
        output.read_bytes()
    )


def test_failed_items_feed_a_new_step(tmp_path: Path, cluster: LocalCluster) -> None:
    from daskrun import Workspace

    names = poison_files(tmp_path / "in", 30, {2, 17})
    run = run_step(
        tmp_path,
        POISON_SCRIPT,
        Dataset.File.from_files(str(tmp_path / "in")),
        compute_target=cluster.scheduler_address,
        mini_batch_size=30,
        error_threshold=-1,
        run_max_try=1,
    )
    dead = run.failed_items()
    ws = Workspace.create(tmp_path / "ws")
    dead.register(ws, "dead-letter")
    again = Dataset.get_by_name(ws, "dead-letter")
    assert [Path(p).name for p in again.files()] == [names[2], names[17]]
    fixed = run_step(
        tmp_path / "second",
        "import os\ndef init():\n    pass\n"
        "def run(mb):\n    return [os.path.basename(p) for p in mb]\n",
        again,
        compute_target=cluster.scheduler_address,
    )
    assert fixed.status == "Completed", fixed.error
    lines = Path(fixed.output_path or "").read_text().splitlines()
    assert lines == [names[2], names[17]]


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    n=st.integers(min_value=1, max_value=40),
    data=st.data(),
)
def test_isolation_matches_the_plain_loop(
    tmp_path_factory: pytest.TempPathFactory,
    cluster: LocalCluster,
    n: int,
    data: st.DataObject,
) -> None:
    """Random poison positions in one mini-batch: the output is the plain
    loop's over the good items, in order, and the failed items are the
    poison ones."""
    poison = data.draw(st.sets(st.integers(0, n - 1), max_size=n))
    tmp_path = tmp_path_factory.mktemp("prop")
    names = poison_files(tmp_path / "in", n, poison)
    with dask.config.set({"daskrun.runs-dir": str(tmp_path / "runs")}):
        run = run_step(
            tmp_path,
            POISON_SCRIPT,
            Dataset.File.from_files(str(tmp_path / "in")),
            compute_target=cluster.scheduler_address,
            mini_batch_size=n,
            error_threshold=-1,
            run_max_try=1,
        )
    expected = [name for name in names if "poison" not in name]  # the plain loop
    assert Path(run.output_path or "").read_text().splitlines() == expected
    failed = _failed_items(run)
    assert {Path(p).name for p in failed["input"]} == {names[i] for i in poison}
    assert (run.items_succeeded, run.items_failed) == (n - len(poison), len(poison))


ROW_CRASH_SCRIPT = """
import os

def init():
    pass

def run(df):
    if (df["v"] < 0).any():
        os._exit(3)  # as a segfault would: the worker process dies
    return df
"""


@pytest.mark.slow
def test_a_csv_row_that_kills_its_worker_is_isolated(tmp_path: Path) -> None:
    """Each row of a CSV range is an item, as each file or Parquet row is:
    one that kills its worker fails alone, and the dead-letter data set
    holds it."""
    frame = poison_rows(tmp_path / "in" / "rows.csv", 45, {17})
    run = run_step(
        tmp_path,
        ROW_CRASH_SCRIPT,
        Dataset.Tabular.from_delimited_files(str(tmp_path / "in")),
        mini_batch_size="1MB",
        error_threshold=1,
        run_max_try=1,
        process_count_per_node=2,
    )
    assert run.status == "Completed", run.error
    good = frame[frame["v"] >= 0]
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [f"{i} {v}" for i, v in zip(good["id"], good["v"], strict=True)]
    assert (run.items_succeeded, run.items_failed) == (44, 1)
    failed = _failed_items(run)
    assert list(zip(failed["start"], failed["stop"], strict=True)) == [(17, 18)]
    assert failed["error"][0].startswith("WorkerDied: "), failed["error"][0]
    assert list(run.failed_items().to_pandas_dataframe()["id"]) == [17]


def test_failed_rows_that_cannot_be_read_name_the_run(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "rows.csv").write_text("id,v\n1,2\n3,4,5\n")  # 3 fields
    run = run_step(
        tmp_path,
        ROWS_SCRIPT,
        Dataset.Tabular.from_delimited_files(str(tmp_path / "in")),
        compute_target=cluster.scheduler_address,
        error_threshold=-1,
        run_max_try=1,
    )
    assert run.mini_batches_failed == 1
    with pytest.raises(ConfigError) as caught:
        run.failed_items()
    assert str(caught.value).startswith(
        f"the failed inputs of run {run.run_id!r} could not be read ("
    ), caught.value
    assert str(caught.value).endswith("); fix them and resume with retry_failed=True")
    assert "\n" not in str(caught.value)
