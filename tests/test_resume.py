"""Resume: a run killed, canceled or failed picks up where it stopped."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from daskrun.engine.output import OutputTarget, Parts
from daskrun.exceptions import ConfigError
from daskrun.registry.records import RunRecord

from .helpers import (
    committed,
    daskrun,
    kill_client,
    make_files,
    poll_for,
    start_daskrun,
    wait_for_parts,
    write_script,
)
from .scripts import fixable_script


def _start(tmp_path: Path, runs: Path, *args: str) -> subprocess.Popen[str]:
    return start_daskrun(*args, cwd=tmp_path, runs=runs)


def _run_cli(
    tmp_path: Path, runs: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return daskrun(*args, cwd=tmp_path, runs=runs)


def _job(tmp_path: Path) -> list[str]:
    (tmp_path / "calls").mkdir()
    write_script(tmp_path, fixable_script(mark_each_item=False, seconds=0.05))
    return [
        "run",
        "score.py",
        "--input",
        "in",
        "--output",
        "out",
        "--mini-batch-size",
        "2",
        "--processes",
        "2",
        "--",
        "--calls",
        str(tmp_path / "calls"),
        "--fixed",
        str(tmp_path / "fixed"),
    ]


def _run_id(runs: Path) -> str:
    (record,) = RunRecord.find(runs)
    return record.run_id


def test_client_killed_then_resumed(tmp_path: Path, runs_dir: Path) -> None:
    files = make_files(tmp_path / "in", 160, prefix="ok")
    proc = _start(tmp_path, runs_dir, *_job(tmp_path))
    wait_for_parts(tmp_path / "out", 15, proc)
    kill_client(proc)
    assert not (tmp_path / "out" / "parallel_run_step.txt").exists()
    written = committed(tmp_path / "out")
    assert 15 <= len(written) < 80
    for marker in (tmp_path / "calls").iterdir():
        marker.unlink()

    result = _run_cli(tmp_path, runs_dir, "resume", _run_id(runs_dir))
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert lines == [p.name for p in files]
    calls = {m.name.split(".txt.")[0] for m in (tmp_path / "calls").iterdir()}
    assert len(list((tmp_path / "calls").iterdir())) == 80 - len(written)
    redone = {int(name[2:]) // 2 for name in calls}
    assert not redone & written  # nothing committed ran again


def test_cancel_then_resume(tmp_path: Path, runs_dir: Path) -> None:
    files = make_files(tmp_path / "in", 120, prefix="ok")
    proc = _start(tmp_path, runs_dir, *_job(tmp_path))
    wait_for_parts(tmp_path / "out", 10, proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    run_id = _run_id(runs_dir)
    assert f"daskrun resume {run_id}" in err
    assert RunRecord.load(run_id, runs_dir).status == "Canceled"
    result = _run_cli(tmp_path, runs_dir, "resume", run_id)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert lines == [p.name for p in files]


def test_retry_failed_after_fixing_the_cause(tmp_path: Path, runs_dir: Path) -> None:
    make_files(tmp_path / "in", 4, prefix="bad")
    make_files(tmp_path / "in", 16, prefix="ok")
    names = sorted(p.name for p in (tmp_path / "in").iterdir())
    first = _run_cli(
        tmp_path,
        runs_dir,
        *_job(tmp_path)[:-5],
        "--error-threshold",
        "-1",
        "--max-tries",
        "1",
        *_job_args(tmp_path),
    )
    assert first.returncode == 0, first.stderr
    lines = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert lines == [n for n in names if n.startswith("ok")]
    run_id = _run_id(runs_dir)
    failed_items = runs_dir / run_id / "logs/sys/job_report/failed_items.csv"
    assert len(failed_items.read_text().splitlines()) == 1 + 4
    again = _run_cli(tmp_path, runs_dir, "resume", run_id)
    assert again.returncode == 2 and "already completed" in again.stderr

    (tmp_path / "fixed").touch()
    for marker in (tmp_path / "calls").iterdir():
        marker.unlink()
    result = _run_cli(tmp_path, runs_dir, "resume", run_id, "--retry-failed")
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert lines == names  # complete, in order, no duplicates
    assert failed_items.read_text().splitlines() == ["index,input,error,start,stop"]
    assert len(list((tmp_path / "calls").iterdir())) == 2  # only bad00000-03


def _job_args(tmp_path: Path) -> list[str]:
    return [
        "--",
        "--calls",
        str(tmp_path / "calls"),
        "--fixed",
        str(tmp_path / "fixed"),
    ]


@pytest.mark.parametrize("run_id", ["nope_20260101T000000_abcdef"])
def test_unknown_run_id(tmp_path: Path, runs_dir: Path, run_id: str) -> None:
    result = _run_cli(tmp_path, runs_dir, "resume", run_id)
    assert result.returncode == 2
    assert f"run {run_id!r} not found" in result.stderr


def _completed_with_failures(tmp_path: Path, runs: Path) -> str:
    """A run whose 4 'bad' files failed (kept parts, a report): its id."""
    first = _run_cli(
        tmp_path,
        runs,
        *_job(tmp_path)[:-5],
        "--error-threshold",
        "-1",
        "--max-tries",
        "1",
        *_job_args(tmp_path),
    )
    assert first.returncode == 0, first.stderr
    for marker in (tmp_path / "calls").iterdir():
        marker.unlink()
    (tmp_path / "fixed").touch()
    return _run_id(runs)


def _locked(path: Path) -> bool:
    """Whether another process holds the flock on ``path``."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _called(tmp_path: Path) -> list[str]:
    return sorted(m.name.split(".txt.")[0] for m in (tmp_path / "calls").iterdir())


def test_resume_after_inputs_changed_is_refused_or_replanned(
    tmp_path: Path, runs_dir: Path
) -> None:
    make_files(tmp_path / "in", 4, prefix="bad")
    make_files(tmp_path / "in", 16, prefix="ok")
    run_id = _completed_with_failures(tmp_path, runs_dir)
    # mini-batches of 2: the last one (ok00014, ok00015) changes, one is new
    (tmp_path / "in" / "ok00015.txt").unlink()
    for name in ("ok00016.txt", "ok00017.txt"):
        (tmp_path / "in" / name).write_text(name)
    refused = _run_cli(tmp_path, runs_dir, "resume", run_id, "--retry-failed")
    assert refused.returncode == 2, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "input changed since run" in line
    assert "2 files added, 1 removed (first: ok00016.txt)" in line, line
    assert "--replan" in line
    record = RunRecord.load(run_id, runs_dir)
    assert record.status == "Completed" and not _called(tmp_path)

    result = _run_cli(
        tmp_path, runs_dir, "resume", run_id, "--retry-failed", "--replan"
    )
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "in").iterdir())
    lines = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert lines == names  # no row of the deleted file, the new ones in
    assert "ok00015.txt" not in lines and "ok00017.txt" in lines
    # the two bad mini-batches, the changed last one and the new one ran
    assert _called(tmp_path) == ["bad00000", "bad00002", "ok00014", "ok00017"]


def test_two_resumes_at_once_and_a_missing_part(tmp_path: Path, runs_dir: Path) -> None:
    make_files(tmp_path / "in", 4, prefix="bad")
    make_files(tmp_path / "in", 60, prefix="ok")
    run_id = _completed_with_failures(tmp_path, runs_dir)
    # the report says mini-batch 5 succeeded, but its part is gone (with the
    # others of its group, if its task wrote one)
    parts = Parts(OutputTarget(str(tmp_path / "out"), "unused", run_id))
    where = parts.grouped[5].url if 5 in parts.grouped else parts.target.part_url(5)
    lost = [i for i, g in parts.grouped.items() if g.url == where] or [5]
    os.remove(where)
    first = _start(tmp_path, runs_dir, "resume", run_id, "--retry-failed")
    lock = runs_dir / run_id / "run.lock"
    poll_for(
        lambda: _locked(lock),
        timeout=60,
        interval=0.02,
        what=f"a hold on {lock}",
        running=first,
    )
    start = time.monotonic()
    second = _run_cli(tmp_path, runs_dir, "resume", run_id, "--retry-failed")
    assert second.returncode == 2, second.stderr
    assert "is in progress in process" in second.stderr
    assert time.monotonic() - start < 15  # refused at once, no cluster
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert RunRecord.load(run_id, runs_dir).status == "Completed"
    names = sorted(p.name for p in (tmp_path / "in").iterdir())
    lines = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert lines == names
    # the two bad mini-batches and those whose rows were lost ran again
    again = [f"ok{(i - 2) * 2:05d}" for i in sorted(lost)]
    assert _called(tmp_path) == ["bad00000", "bad00002", *again]


PUBLISH_SCRIPT = """
import os, time

def init():
    pass

def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    go = os.path.join(os.path.dirname(os.path.dirname(mini_batch[0])), "go")
    while names == ["f00003.txt"] and not os.path.exists(go):
        time.sleep(0.05)
    return ["x" * 999] * 2000 if names == ["f00000.txt"] else names
"""


def test_a_client_killed_while_publishing_leaves_no_partial_file(
    tmp_path: Path, runs_dir: Path
) -> None:
    """A kill while the final file is assembled leaves its temporary file
    out of the output folder's data: a data set of the folder never lists
    it, and the resume that publishes leaves none behind."""
    from daskrun import Dataset

    make_files(tmp_path / "in", 4)
    write_script(tmp_path, PUBLISH_SCRIPT)
    out = tmp_path / "out"
    proc = _start(
        tmp_path, runs_dir, "run", "score.py", "--input", "in", "--output", "out",
        "--mini-batch-size", "1", "--processes", "2", "-q",
    )  # fmt: skip
    wait_for_parts(tmp_path / "out", 2, proc)  # f00003 waits for go, f00002 with it
    parts = Parts(OutputTarget(str(out), "unused", _run_id(runs_dir)))

    def holder(index: int) -> Path:
        if index in parts.own:
            return Path(parts.target.part_url(index))
        return Path(parts.grouped[index].url)

    # the first two tasks hold one mini-batch each: assembly copies
    # mini-batch 0's 2 MB, then waits to open mini-batch 1's rows, a FIFO
    blocking = holder(1)
    assert blocking != holder(0)
    kept = blocking.read_bytes()
    blocking.unlink()
    os.mkfifo(blocking)
    (tmp_path / "go").touch()
    poll_for(
        lambda: any(p.stat().st_size >= 2_000_000 for p in out.rglob("*.partial")),
        timeout=120,
        what="a .partial file of 2 MB",
        running=proc,
    )
    kill_client(proc)
    blocking.unlink()
    blocking.write_bytes(kept)
    assert not (out / "parallel_run_step.txt").exists()
    assert [p.name for p in out.iterdir()] == [".daskrun"]

    result = _run_cli(tmp_path, runs_dir, "resume", _run_id(runs_dir), "-q")
    assert result.returncode == 0, result.stderr
    lines = (out / "parallel_run_step.txt").read_text().splitlines()
    assert lines == ["x" * 999] * 2000 + ["f00001.txt", "f00002.txt", "f00003.txt"]
    assert list(out.rglob("*.partial")) == []
    listed = Dataset.File.from_files(str(out)).files()
    assert listed == [str(out / "parallel_run_step.txt")]


def test_a_record_keeps_its_input_paths_in_one_file_written_once(
    tmp_path: Path,
) -> None:
    import json
    import sqlite3

    from daskrun.registry.records import DATABASE, PATHS

    paths = [f"/data/{i:05d}.png" for i in range(1000)]
    signed = "https://acct.blob.core.windows.net/c/x.png?sv=1&sig=s3cr3t"
    record = RunRecord(
        run_id="step_20260101T000000_abcdef",
        root=str(tmp_path),
        inputs=[[*paths, signed]],
        input_specs=[{"kind": "file", "paths": paths}],
    )
    record.start()
    written = (record.folder / PATHS).stat().st_mtime_ns
    record.status = "Completed"
    record.save()
    assert (record.folder / PATHS).stat().st_mtime_ns == written  # once
    with sqlite3.connect(tmp_path / DATABASE) as db:
        (data,) = db.execute("SELECT data FROM runs").fetchone()
    row = json.loads(data)
    assert "inputs" not in row and "input_specs" not in row
    assert row["inputs_file"]["name"] == PATHS and len(data) < 2000
    assert "s3cr3t" not in (record.folder / PATHS).read_text()

    again = RunRecord.load(record.run_id, tmp_path)
    assert again.status == "Completed"
    assert again.inputs[0][:-1] == paths and "s3cr3t" not in again.inputs[0][-1]
    assert again.input_specs == [{"kind": "file", "paths": paths}]
    assert RunRecord.find(tmp_path)[0].inputs == again.inputs

    (record.folder / PATHS).write_text("[]")
    with pytest.raises(ConfigError, match="input paths .* are changed"):
        RunRecord.load(record.run_id, tmp_path)
    assert RunRecord.find(tmp_path)[0].inputs == []  # listing runs still works


SLOW_INIT = """
import os, sys, time

def init():
    folder = sys.argv[sys.argv.index("--marks") + 1]
    open(os.path.join(folder, f"init.{os.getpid()}"), "w").write(str(time.time()))
    if os.path.exists(os.path.join(folder, "slow")):
        time.sleep(120)

def run(mini_batch):
    folder = sys.argv[sys.argv.index("--marks") + 1]
    with open(os.path.join(folder, "runs"), "a") as f:
        f.write(f"{time.time()} {os.path.basename(mini_batch[0])}\\n")
    return [os.path.basename(p) for p in mini_batch]
"""


def test_a_client_killed_while_its_plan_is_recorded_resumes_exactly(
    tmp_path: Path, runs_dir: Path
) -> None:
    """The plan's ledger is filled while init() runs and committed just
    before the first mini-batch: a client killed before then leaves a run
    whose record has no digest yet, and its resume runs every input once."""
    files = make_files(tmp_path / "in", 30, prefix="ok")
    marks = tmp_path / "marks"
    marks.mkdir()
    (marks / "slow").touch()
    write_script(tmp_path, SLOW_INIT)
    job = ["run", "score.py", "--input", "in", "--output", "out"]
    job += ["--mini-batch-size", "3", "--", "--marks", str(marks)]
    proc = _start(tmp_path, runs_dir, *job)
    poll_for(lambda: list(marks.glob("init.*")), timeout=60)
    kill_client(proc)
    run_id = _run_id(runs_dir)
    assert RunRecord.load(run_id, runs_dir).inputs_digest is None
    assert not (marks / "runs").exists()  # no mini-batch ran

    (marks / "slow").unlink()
    result = _run_cli(tmp_path, runs_dir, "resume", run_id)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert lines == [p.name for p in files]
    assert RunRecord.load(run_id, runs_dir).inputs_digest is not None


def _slow_ledger(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Each mini-batch's digest takes ``seconds`` more to record."""
    from daskrun.engine.ledger import PlanLedger

    mini_batch = PlanLedger.mini_batch

    def slow_mini_batch(self: PlanLedger, *args: object) -> None:
        time.sleep(seconds)
        mini_batch(self, *args)

    monkeypatch.setattr(PlanLedger, "mini_batch", slow_mini_batch)


def _two_a_mini_batch(tmp_path: Path, script: str, *arguments: str) -> Any:
    """A run of ``script`` over ``tmp_path/in``, two files a mini-batch,
    on one worker process."""
    from daskrun import Dataset

    from .helpers import run_step

    return run_step(
        tmp_path,
        script,
        [Dataset.File.from_files(str(tmp_path / "in"))],
        mini_batch_size=2,
        process_count_per_node=1,
        step_options={"arguments": list(arguments)},
    )


def test_the_plan_streams_each_mini_batch_after_its_digest_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stat'ing the inputs for the ledger (slowed down here to 0.1 s a
    mini-batch) holds back neither init() nor the first mini-batches; each
    mini-batch runs only once its digest is written through to the files,
    and the ledger is the run's at the end."""
    from daskrun.engine.ledger import FillBehind, PlanLedger

    files = make_files(tmp_path / "in", 40)
    marks = tmp_path / "marks"
    marks.mkdir()
    _slow_ledger(monkeypatch, 0.1)  # 2 s for the 20 mini-batches
    flush = PlanLedger.flush
    flushes: list[tuple[float, int]] = []

    def timed_flush(self: PlanLedger) -> None:
        flush(self)
        flushes.append((time.time(), self.flushed))

    committed_at: list[float] = []
    commit = FillBehind.commit

    def timed_commit(self: FillBehind) -> str:
        digest = commit(self)
        committed_at.append(time.time())
        return digest

    monkeypatch.setattr(PlanLedger, "flush", timed_flush)
    monkeypatch.setattr(FillBehind, "commit", timed_commit)
    run = _two_a_mini_batch(tmp_path, SLOW_INIT, "--marks", str(marks))
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [p.name for p in files]
    (init,) = [float(p.read_text()) for p in marks.glob("init.*")]
    runs = [line.split() for line in (marks / "runs").read_text().splitlines()]
    assert init < committed_at[0] - 0.5  # init() did not wait for the fill
    assert min(float(t) for t, _ in runs) < committed_at[0] - 0.5  # it streamed
    for t, first in runs:
        index = int(first[1:6]) // 2
        assert any(at <= float(t) and n > index for at, n in flushes), first
    record = RunRecord.load(run.id)
    assert record.inputs_digest is not None and record.inputs_digest.startswith("20-")


STREAMING_CLIENT = """
import sys, time
from daskrun import Dataset, ParallelRunConfig, ParallelRunStep
from daskrun.engine.ledger import PlanLedger

mini_batch = PlanLedger.mini_batch

def slow_mini_batch(self, *args):  # the ledger streams for 10 s
    time.sleep(0.5)
    mini_batch(self, *args)

PlanLedger.mini_batch = slow_mini_batch

if __name__ == "__main__":
    script, inputs, output, marks = sys.argv[1:]
    config = ParallelRunConfig(script, mini_batch_size=2, process_count_per_node=1)
    ParallelRunStep(
        "stream",
        config,
        inputs=[Dataset.File.from_files(inputs)],
        output=output,
        arguments=["--marks", marks],
    ).run()
"""

CONTENTS = """
import os, sys

def init():
    pass

def run(mini_batch):
    folder = sys.argv[sys.argv.index("--marks") + 1]
    with open(os.path.join(folder, "calls"), "a") as f:
        f.write(os.path.basename(mini_batch[0]) + "\\n")
    return [open(p).read() for p in mini_batch]
"""


@pytest.mark.slow
def test_a_client_killed_while_its_plan_streams_resumes_comparing_what_ran(
    tmp_path: Path, runs_dir: Path
) -> None:
    """Killed mid-stream, a run has the digests of the mini-batches that
    ran and no committed ledger: its resume keeps those whose inputs are
    unchanged, runs again one whose file changed since, and runs the rest,
    every row once."""
    import sys

    names = [f"f{i:05d}.txt" for i in range(40)]
    (tmp_path / "in").mkdir()
    for name in names:
        (tmp_path / "in" / name).write_text(name)
    marks = tmp_path / "marks"
    marks.mkdir()
    script = write_script(tmp_path, CONTENTS)
    client = tmp_path / "client.py"
    client.write_text(STREAMING_CLIENT)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(client), str(script), str(tmp_path / "in"), str(out)]
        + [str(marks)],
        cwd=tmp_path,
        env=dict(  # a task per mini-batch
            os.environ,
            DASK_DASKRUN__RUNS_DIR=str(runs_dir),
            DASK_DASKRUN__RUNNER__TASK_SECONDS="0",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_parts(out, 3, proc)
    kill_client(proc)
    run_id = _run_id(runs_dir)
    assert RunRecord.load(run_id, runs_dir).inputs_digest is None
    (run_dir,) = runs_dir.glob(f"*{run_id}*")
    assert (run_dir / "plan.bin.new").is_file()  # the streamed digests
    done = committed(out)
    assert 3 <= len(done) < 20
    changed = min(done)
    (tmp_path / "in" / names[2 * changed]).write_text("changed")
    (marks / "calls").unlink()

    result = _run_cli(tmp_path, runs_dir, "resume", run_id)
    assert result.returncode == 0, result.stderr
    expected = [("changed" if i == 2 * changed else n) for i, n in enumerate(names)]
    lines = (out / "parallel_run_step.txt").read_text().splitlines()
    assert lines == expected
    again = {int(n[1:6]) // 2 for n in (marks / "calls").read_text().split()}
    assert again == set(range(20)) - done | {changed}


VANISHING = """
import os, sys

def init():
    os.replace(sys.argv[2], sys.argv[2] + ".away")  # the last input goes

def run(mini_batch):
    return [os.path.basename(p) for p in mini_batch]
"""


def test_an_input_gone_while_the_plan_streams_fails_the_job_then_resumes(
    tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input removed after it was listed, before the streaming ledger
    reached it, fails the job in one line naming it (an InputError: exit
    status 2 on the CLI), recorded; put back, the run resumes exactly."""
    from daskrun import InputError
    from daskrun import resume as daskrun_resume

    files = make_files(tmp_path / "in", 40)
    _slow_ledger(monkeypatch, 0.2)  # 4 s for the 20 mini-batches: init() first
    gone = rf"input file {re.escape(repr(str(files[-1])))} cannot be read"
    with pytest.raises(InputError, match=gone):
        _two_a_mini_batch(tmp_path, VANISHING, "--gone", str(files[-1]))
    (record,) = RunRecord.find(runs_dir)
    assert record.status == "Failed" and re.search(gone, record.error or "")
    assert not (tmp_path / "out" / "parallel_run_step.txt").exists()

    monkeypatch.undo()
    os.replace(f"{files[-1]}.away", files[-1])
    write_script(tmp_path, VANISHING.replace("os.replace", "print"))  # stays
    resumed = daskrun_resume(record.run_id, new_source=True)
    assert resumed.status == "Completed", resumed.error
    lines = Path(resumed.output_path or "").read_text().splitlines()
    assert lines == [p.name for p in files]
