"""``mini_batch_size="auto"`` and ``process_count_per_node="auto"`` on real
worker processes: the pilot, the recorded choice, exact output, resume."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import dask.config
import pandas as pd
import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from daskrun import Dataset, ParallelRunConfig, ParallelRunStep, resume
from daskrun.engine.auto import (
    choose_mini_batch_size,
    choose_process_count,
    choose_table_size,
)
from daskrun.exceptions import ConfigError
from daskrun.monitoring.monitor import REPORT, read_report
from daskrun.registry.records import RunRecord

from .helpers import (
    committed,
    daskrun,
    kill_client,
    make_files,
    poll_for,
    run_step,
    start_daskrun,
    write_script,
)
from .scripts import PIDS

# 10 ms per file; fails on f00030.txt until the file 'fixed' exists
SCRIPT = """
import os, sys, time

def init():
    global fixed
    fixed = sys.argv[sys.argv.index("--fixed") + 1]

def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    time.sleep(0.01 * len(names))
    if "f00030.txt" in names and not os.path.exists(fixed):
        raise ValueError("not fixed yet")
    return names
"""

# the pilot's last file waits until a file of the rest has run: a pilot with
# a barrier (the rest planned once the whole pilot is in) never finishes it;
# the pilot's files take 0.3 s, so that each is a task of its own
WAITS_FOR_THE_REST = """
import os, time

def init():
    pass

def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    if names[0] < "f00007.txt":
        time.sleep(0.3)
    flag = os.path.join(os.path.dirname(mini_batch[0]), os.pardir, "rest-ran")
    if any(n > "f00007.txt" for n in names):
        open(flag, "w").close()
    if "f00007.txt" in names:
        deadline = time.monotonic() + 60
        while not os.path.exists(flag):
            if time.monotonic() > deadline:
                raise RuntimeError("the rest never ran while the pilot ran")
            time.sleep(0.01)
    return names
"""

# the pilot's last file hangs until 'release' exists; each call leaves a marker
HANGS_IN_THE_PILOT = """
import os, sys, time, uuid

def init():
    global calls, release
    calls = sys.argv[sys.argv.index("--calls") + 1]
    release = sys.argv[sys.argv.index("--release") + 1]

def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    open(os.path.join(calls, f"{names[0]}.{uuid.uuid4().hex}"), "w").close()
    if names[0] < "f00007.txt":
        time.sleep(0.3)
    while "f00007.txt" in names and not os.path.exists(release):
        time.sleep(0.05)
    time.sleep(0.05)
    return names
"""

# 1 ms per file
ONE_MS = """
import os, time

def init():
    pass

def run(mini_batch):
    time.sleep(0.001 * len(mini_batch))
    return [os.path.basename(p) for p in mini_batch]
"""


def _lines(run: object) -> list[str]:
    return Path(run.output_path).read_text().splitlines()  # type: ignore[attr-defined]


def _run(tmp_path: Path, out: str, **config: object) -> object:
    return run_step(
        tmp_path,
        SCRIPT,
        [Dataset.File.from_files(str(tmp_path / "in"))],
        output=out,
        process_count_per_node=2,
        step_options={"arguments": ["--fixed", str(tmp_path / "fixed")]},
        **config,
    )


def test_auto_runs_a_pilot_records_the_choice_and_writes_what_a_fixed_size_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_files(tmp_path / "in", 120)
    (tmp_path / "fixed").touch()
    fixed = _run(tmp_path, "fixed-out", mini_batch_size=7)
    auto = run_step(
        tmp_path,
        SCRIPT,
        [Dataset.File.from_files(str(tmp_path / "in"))],
        output="auto-out",
        process_count_per_node=2,
        mini_batch_size="auto",
        show_output=True,
        step_options={"arguments": ["--fixed", str(tmp_path / "fixed")]},
    )
    assert auto.status == fixed.status == "Completed"  # type: ignore[attr-defined]
    assert _lines(auto) == _lines(fixed) == [f"f{i:05d}.txt" for i in range(120)]

    record = RunRecord.load(auto.run_id)  # type: ignore[attr-defined]
    size = record.auto["mini_batch_size"]
    assert record.auto["pilot_mini_batches"] == 8
    assert record.auto["item_seconds"] > 0
    # 112 files left for 2 workers: at most 28 each, to keep both busy
    assert 1 <= size <= 28
    printed = capsys.readouterr()
    line = f"daskrun: auto: mini_batch_size={size} (pilot of 8 files: "
    assert line in printed.out + printed.err
    result = (Path(record.logs_dir or "") / "job_result.txt").read_text()
    assert f"auto: mini_batch_size={size} (pilot of 8 files: " in result
    assert f"mini_batches_total: {8 + -(-112 // size)}" in result

    # the report: eight one-file mini-batches, then the rest at the chosen size
    rows = read_report(Path(record.logs_dir or "") / REPORT)
    items = [int(r.row["items_in"]) for r in sorted(rows, key=lambda r: r.index)]
    assert items[:8] == [1] * 8
    assert items[8:-1] == [size] * (len(items) - 9)
    assert sum(items) == 120


def test_a_resumed_auto_run_keeps_its_choice_and_writes_each_file_once(
    tmp_path: Path,
) -> None:
    make_files(tmp_path / "in", 120)
    first = _run(
        tmp_path, "out", mini_batch_size="auto", error_threshold=0, run_max_try=1
    )
    assert first.status == "Failed"  # type: ignore[attr-defined]
    before = RunRecord.load(first.run_id)  # type: ignore[attr-defined]
    assert before.auto["mini_batch_size"] >= 1  # chosen before f00030 failed

    (tmp_path / "fixed").touch()
    again = resume(first.run_id, retry_failed=True)  # type: ignore[attr-defined]
    assert again.status == "Completed"
    assert _lines(again) == [f"f{i:05d}.txt" for i in range(120)]
    after = RunRecord.load(first.run_id)  # type: ignore[attr-defined]
    assert after.auto == before.auto
    assert after.inputs_digest == before.inputs_digest


def test_the_rest_runs_while_the_pilot_still_runs(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 60)
    run = run_step(
        tmp_path,
        WAITS_FOR_THE_REST,
        [Dataset.File.from_files(str(tmp_path / "in"))],
        mini_batch_size="auto",
        process_count_per_node=2,
        run_max_try=1,
    )
    # f00007.txt finished: a file of the rest ran while it was in run()
    assert run.status == "Completed", run.error
    assert _lines(run) == [f"f{i:05d}.txt" for i in range(60)]
    record = RunRecord.load(run.run_id)
    assert record.auto["pilot_mini_batches"] == 8
    rows = read_report(Path(record.logs_dir or "") / REPORT)
    assert sorted(r.index for r in rows) == list(range(len(rows)))
    assert all(r.ok and r.row["tries"] == "1" for r in rows)


def test_a_client_killed_while_the_pilot_and_the_rest_ran_is_resumed_exactly_once(
    tmp_path: Path, runs_dir: Path
) -> None:
    make_files(tmp_path / "in", 100)
    write_script(tmp_path, HANGS_IN_THE_PILOT)
    calls = tmp_path / "calls"
    calls.mkdir()
    proc = start_daskrun(
        *["run", "score.py", "--input", "in", "--output", "out"],
        *["--mini-batch-size", "auto", "--processes", "2"],
        *["--", "--calls", str(calls), "--release", str(tmp_path / "release")],
        cwd=tmp_path,
        runs=runs_dir,
        stdout=subprocess.DEVNULL,
    )

    def rest_parts() -> set[int]:  # in parts of their own or in groups
        return committed(tmp_path / "out") - set(range(8))

    # the pilot's f00007.txt hangs: parts of the rest show it is not waited for
    poll_for(
        lambda: len(rest_parts()) >= 5,
        timeout=120,
        what=lambda: f"5 parts of the rest, have {rest_parts()}",
        running=proc,
    )
    kill_client(proc)
    written = rest_parts()
    (record,) = RunRecord.find(runs_dir)
    size = record.auto["mini_batch_size"]  # recorded before the rest ran
    for marker in calls.iterdir():
        marker.unlink()

    (tmp_path / "release").touch()
    done = daskrun("resume", record.run_id, cwd=tmp_path, runs=runs_dir)
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert lines == [f"f{i:05d}.txt" for i in range(100)]
    assert RunRecord.load(record.run_id).auto == record.auto
    ran = {int(m.name[1:6]) for m in calls.iterdir()}
    assert 7 in ran  # the pilot's hung file ran in the resume
    # no committed mini-batch of the rest ran again
    assert not {8 + (i - 8) // size for i in ran if i >= 8} & written


def test_the_rest_is_spread_over_the_workers(tmp_path: Path) -> None:
    # the runner has measured the pilot's one-file mini-batches (1 ms): had
    # it grouped the rest's by that, its four of ~500 files would be one task
    make_files(tmp_path / "in", 2000)
    run = run_step(
        tmp_path,
        ONE_MS,
        [Dataset.File.from_files(str(tmp_path / "in"))],
        mini_batch_size="auto",
        process_count_per_node=2,
    )
    assert run.status == "Completed", run.error
    assert _lines(run) == [f"f{i:05d}.txt" for i in range(2000)]
    record = RunRecord.load(run.run_id)
    rows = read_report(Path(record.logs_dir or "") / REPORT)
    rest = [r for r in rows if r.index >= 8]
    assert len(rest) >= 4
    assert len({r.row["worker"] for r in rest}) == 2


def test_auto_processes_are_bounded_by_memory(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 6)
    total = psutil.virtual_memory().total
    with dask.config.set({"daskrun.auto.process-memory": total}):
        run = run_step(
            tmp_path,
            PIDS,
            [Dataset.File.from_files(str(tmp_path / "in"))],
            process_count_per_node="auto",
            mini_batch_size=1,
        )
    assert run.status == "Completed"
    assert len(set(_lines(run))) == 1  # one worker process did all
    record = RunRecord.load(run.run_id)
    assert record.auto == {"process_count_per_node": 1, "pilot_mini_batches": 0}


def test_the_cli_takes_auto_for_both(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 30)
    write_script(tmp_path, SCRIPT)
    (tmp_path / "fixed").touch()
    done = daskrun(
        "run",
        "score.py",
        "--input",
        "in",
        "--output",
        "out",
        "--mini-batch-size",
        "auto",
        "--processes",
        "auto",
        "--",
        "--fixed",
        str(tmp_path / "fixed"),
        cwd=tmp_path,
        runs=tmp_path / "runs",
    )
    assert done.returncode == 0, done.stderr
    shown = done.stdout + done.stderr
    cores = len(os.sched_getaffinity(0))
    assert "daskrun: auto: mini_batch_size=" in shown
    assert f"process_count_per_node={choose_process_count(cores, 0, None, 0)}" in shown
    lines = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert lines == [f"f{i:05d}.txt" for i in range(30)]
    bad = daskrun("run", "score.py", "--processes", "many", cwd=tmp_path, runs=tmp_path)
    assert "'many' is not a number of processes; use e.g. 2, or auto" in bad.stderr


def test_auto_tables_are_sized_without_a_pilot(tmp_path: Path) -> None:
    frame = pd.DataFrame({"x": range(5000), "y": [f"v{i}" for i in range(5000)]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    run = run_step(
        tmp_path,
        "def init(): pass\ndef run(df): return df\n",
        [Dataset.Tabular.from_delimited_files(str(tmp_path / "t.csv"))],
        mini_batch_size="auto",
        process_count_per_node=2,
        output_format="csv",
    )
    assert run.status == "Completed"
    got = pd.read_csv(run.output_path)
    pd.testing.assert_frame_equal(got, frame)
    auto = RunRecord.load(run.run_id).auto
    assert auto["mini_batch_size"] == 1 << 20  # a small input: the smallest
    assert "no pilot" in auto["basis"]


def test_auto_tables_cut_each_file_evenly(tmp_path: Path) -> None:
    rows = 300_000  # about 3 MB a file
    frames = []
    for n in range(2):
        # lines of one width: halves of the bytes are halves of the rows
        frame = pd.DataFrame({"id": range(10**6 + n * rows, 10**6 + (n + 1) * rows)})
        frame["x"] = 100 + frame["id"] * 7 % 900
        frame.to_csv(tmp_path / f"t{n}.csv", index=False)
        frames.append(frame)
    run = run_step(
        tmp_path,
        "def init(): pass\ndef run(df): return df\n",
        [Dataset.Tabular.from_delimited_files(str(tmp_path / "t*.csv"))],
        mini_batch_size="auto",
        process_count_per_node=1,
        output_format="csv",
    )
    assert run.status == "Completed"
    got = pd.read_csv(run.output_path)
    pd.testing.assert_frame_equal(got, pd.concat(frames, ignore_index=True))
    record = RunRecord.load(run.run_id)
    # one process: 4 mini-batches, each file in two halves (not 3 MB pieces
    # and small tails, nor four 1 MiB pieces and a tail)
    largest = max((tmp_path / f"t{n}.csv").stat().st_size for n in range(2))
    assert record.auto["mini_batch_size"] == -(-largest // 2)
    found = read_report(Path(record.logs_dir or "") / REPORT)
    halves = [int(r.row["items_in"]) for r in found]
    assert len(halves) == 4 and sum(halves) == 2 * rows
    assert all(abs(n - rows // 2) <= rows // 100 for n in halves)


def test_auto_with_partition_keys_or_a_collection_is_refused(tmp_path: Path) -> None:
    script = write_script(tmp_path, "def init(): pass\ndef run(mb): return mb\n")
    with pytest.raises(ConfigError, match="no size to choose: drop mini_batch_size"):
        ParallelRunConfig(str(script), mini_batch_size="auto", partition_keys=["a"])
    dd = pytest.importorskip("dask.dataframe")
    ddf = dd.from_pandas(pd.DataFrame({"x": range(10)}), npartitions=2)
    cfg = ParallelRunConfig(str(script), mini_batch_size="auto")
    with pytest.raises(ConfigError, match="does not apply to a Dask collection"):
        ParallelRunStep("auto-ddf", cfg, inputs=ddf, output=str(tmp_path / "o"))


@given(
    st.floats(1e-6, 100),
    st.floats(1e-6, 100),
    st.integers(0, 10**7),
    st.integers(1, 512),
    st.floats(0, 1e9),
    st.one_of(st.none(), st.floats(1, 1e12)),
)
def test_the_size_chooser_is_bounded_and_monotone(
    fast: float,
    slow: float,
    left: int,
    workers: int,
    item_bytes: float,
    free: float | None,
) -> None:
    fast, slow = sorted((fast, slow))

    def size(seconds: float) -> int:
        return choose_mini_batch_size(
            seconds,
            items_left=left,
            workers=workers,
            item_bytes=item_bytes,
            memory_free=free,
        )

    assert 1 <= size(slow) <= size(fast) <= 1000
    # about 1 s of run() each, unless memory or balance say fewer
    assert size(fast) <= max(1, 1.0 / fast)
    if item_bytes and free is not None:
        assert size(fast) == 1 or size(fast) * item_bytes <= free / 2
    assert size(fast) == 1 or size(fast) <= -(-max(left, 1) // (2 * workers))


@given(
    st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    st.integers(1, 6),
    st.integers(1, 64),
    st.integers(0, 3000),
    st.one_of(st.none(), st.integers(1, 40_000)),
)
def test_the_table_size_is_the_brute_force_choice(
    files: list[int],
    processes: int,
    smallest: int,
    spread: int,
    memory: int | None,
) -> None:
    largest = smallest + spread
    got = choose_table_size(
        files,
        processes=processes,
        memory_limit=memory,
        smallest=smallest,
        largest=largest,
    )

    def count(size: int) -> int:
        return sum(max(1, -(-b // size)) for b in files)

    # the reference: every size allowed, tried one by one
    cap = max(smallest, min(largest, memory // 16 if memory else largest))
    sizes = range(smallest, cap + 1)
    enough = [s for s in sizes if count(s) >= 4 * processes]
    best = count(max(enough)) if enough else count(smallest)
    assert got == min(s for s in sizes if count(s) == best)
