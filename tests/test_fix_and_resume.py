"""A data scientist's loop: a script fails, they fix it, they resume the run
with the edited code (``daskrun resume RUN_ID --new-source``), through the
CLI on real worker processes; the output is exact, each file once."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from daskrun.registry.records import RunRecord

from .helpers import daskrun, make_files, write_script

BROKEN_INIT = """
def init():
    raise ValueError("no model at models/")

def run(mini_batch):
    return mini_batch
"""

SCORE = """
import os, sys, uuid

def init():
    global calls
    calls = sys.argv[sys.argv.index("--calls") + 1]

def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    open(os.path.join(calls, f"{names[0]}.{uuid.uuid4().hex}"), "w").close()
    if names[0].startswith("bad"):  # the bug
        raise ValueError(f"cannot score {names[0]}")
    return names
"""


def _one_line(result: object, status: int) -> str:
    assert result.returncode == status, result.stderr  # type: ignore[attr-defined]
    (line,) = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    return line  # type: ignore[no-any-return]


def _output(tmp_path: Path) -> list[str]:
    return (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()


def test_an_init_error_fixed_then_resumed_with_the_new_source(
    tmp_path: Path, runs_dir: Path
) -> None:
    files = make_files(tmp_path / "in", 6)
    script = write_script(tmp_path / "src", BROKEN_INIT)
    first = daskrun(
        "run", "src/score.py", "--input", "in", "--output", "out",
        "--mini-batch-size", "2", "--processes", "1", "-q",
        cwd=tmp_path, runs=runs_dir,
    )  # fmt: skip
    assert first.returncode == 1, first.stderr
    (record,) = RunRecord.find(runs_dir)
    run_id = record.run_id
    last = first.stderr.strip().splitlines()[-1]
    assert last.startswith("daskrun: job failed: init() failed on "), last
    assert "ValueError: no model at models/" in last
    assert last.endswith(f"; fix it, then 'daskrun resume {run_id} --new-source'")
    # no other resume hint: a resume of the same code cannot help
    assert first.stderr.count("daskrun resume") == 1, first.stderr

    script.write_text(
        BROKEN_INIT.replace('raise ValueError("no model at models/")', "pass")
    )
    refused = _one_line(daskrun("resume", run_id, cwd=tmp_path, runs=runs_dir), 2)
    assert refused == (
        f"daskrun: error: the code of run {run_id!r} changed since it ran: "
        f"score.py changed (in {tmp_path / 'src'}); resume with --new-source "
        "to run it as it is now, or put the files back as they were"
    )
    assert RunRecord.load(run_id, runs_dir).status == "Failed"

    done = daskrun("resume", run_id, "--new-source", cwd=tmp_path, runs=runs_dir)
    assert done.returncode == 0, done.stderr
    assert _output(tmp_path) == [str(p) for p in files]
    record = RunRecord.load(run_id, runs_dir)
    assert record.status == "Completed"
    first_digest, second_digest = record.source_digests
    assert first_digest != second_digest
    shown = daskrun("runs", "show", run_id, "--json", cwd=tmp_path, runs=runs_dir)
    assert json.loads(shown.stdout)["source_digests"] == [first_digest, second_digest]
    # both bundles are kept: the one that failed beside the one that ran
    kept = record.folder / f"source-{first_digest.split(':')[1]}.zip"
    with zipfile.ZipFile(kept) as zf:
        assert b"no model" in zf.read("score.py")
    with zipfile.ZipFile(record.folder / "source.zip") as zf:
        assert b"no model" not in zf.read("score.py")


def test_failed_items_rerun_with_the_edited_script_exactly_once(
    tmp_path: Path, runs_dir: Path
) -> None:
    make_files(tmp_path / "in", 4, prefix="bad")
    make_files(tmp_path / "in", 8, prefix="ok")
    names = sorted(p.name for p in (tmp_path / "in").iterdir())
    calls = tmp_path / "calls"
    calls.mkdir()
    script = write_script(tmp_path / "src", SCORE)
    first = daskrun(
        "run", "src/score.py", "--input", "in", "--output", "out",
        "--mini-batch-size", "2", "--processes", "2", "--error-threshold", "-1",
        "--max-tries", "1", "-q", "--", "--calls", str(calls),
        cwd=tmp_path, runs=runs_dir,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert _output(tmp_path) == [n for n in names if n.startswith("ok")]
    (record,) = RunRecord.find(runs_dir)
    run_id = record.run_id
    for marker in calls.iterdir():
        marker.unlink()

    # the fix, in a module of its own that the script now imports
    write_script(tmp_path / "src", "def broken(name):\n    return False\n", "fix.py")
    script.write_text(
        SCORE.replace('names[0].startswith("bad")', "broken(names[0])").replace(
            "import os, sys, uuid", "import os, sys, uuid\nfrom fix import broken"
        )
    )
    refused = _one_line(
        daskrun("resume", run_id, "--retry-failed", cwd=tmp_path, runs=runs_dir), 2
    )
    assert "score.py changed, fix.py added" in refused, refused
    assert not list(calls.iterdir())  # nothing ran

    done = daskrun(
        "resume", run_id, "--retry-failed", "--new-source", "-q",
        cwd=tmp_path, runs=runs_dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert _output(tmp_path) == names  # complete, in order, each once
    # only the two failed mini-batches ran again, with the edited code
    assert sorted(m.name.split(".")[0] for m in calls.iterdir()) == [
        "bad00000",
        "bad00002",
    ]
    record = RunRecord.load(run_id, runs_dir)
    assert record.counts["items_failed"] == 0
    assert len(record.source_digests) == 2


GATED = """
import os, sys, time, uuid

def init():
    global calls, fixed
    calls = sys.argv[sys.argv.index("--calls") + 1]
    fixed = sys.argv[sys.argv.index("--fixed") + 1]

def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    open(os.path.join(calls, f"{names[0]}.{uuid.uuid4().hex}"), "w").close()
    if names[0].startswith("bad") and not os.path.exists(fixed):
        raise ValueError(f"cannot score {names[0]}")
    time.sleep(0.02)
    return names
"""


def _batches(calls: Path) -> set[int]:
    """The mini-batches (of 2 files: bad00000-01, ok00000-197) whose run()
    was called, from its marker files."""
    names = {m.name.split(".")[0] for m in calls.iterdir()}
    return {0 if n.startswith("bad") else (int(n[2:]) + 2) // 2 for n in names}


def test_a_plain_resume_after_a_threshold_runs_what_never_ran(
    tmp_path: Path, runs_dir: Path
) -> None:
    make_files(tmp_path / "in", 2, prefix="bad")
    make_files(tmp_path / "in", 198, prefix="ok")
    names = sorted(p.name for p in (tmp_path / "in").iterdir())
    calls = tmp_path / "calls"
    calls.mkdir()
    write_script(tmp_path / "src", GATED)
    script_args = ["--", "--calls", str(calls), "--fixed", str(tmp_path / "fixed")]
    first = daskrun(
        "run", "src/score.py", "--input", "in", "--output", "out",
        "--mini-batch-size", "2", "--processes", "1", "--error-threshold", "1",
        "--max-tries", "1", "-q", *script_args,
        cwd=tmp_path, runs=runs_dir,
    )  # fmt: skip
    assert first.returncode == 1, first.stderr
    assert "error_threshold=1 exceeded: 2 items failed" in first.stderr
    (record,) = RunRecord.find(runs_dir)
    run_id = record.run_id
    ran = _batches(calls)
    assert len(ran) < 100  # the threshold stopped it: some never ran
    for marker in calls.iterdir():
        marker.unlink()

    # a plain resume runs the mini-batches that never ran, not the failed one,
    # and ends Failed: its failures still exceed the threshold
    again = daskrun("resume", run_id, cwd=tmp_path, runs=runs_dir)
    assert again.returncode == 1, again.stderr
    rerun = _batches(calls)
    assert 0 not in rerun and rerun | ran == set(range(100))
    assert (
        f"daskrun: run {run_id} stopped at error_threshold; running the "
        f"{len(rerun)} mini-batches that never ran (its failed ones run "
        "again with --retry-failed)"
    ) in again.stderr
    record = RunRecord.load(run_id, runs_dir)
    assert (record.counts["items_succeeded"], record.counts["items_failed"]) == (
        198,
        2,
    )
    assert record.status == "Failed"
    assert f"daskrun resume {run_id} --retry-failed" in again.stderr

    # now nothing is left that a plain resume would run: one line says why
    line = _one_line(daskrun("resume", run_id, cwd=tmp_path, runs=runs_dir), 2)
    assert line == (
        f"daskrun: error: nothing to run in run {run_id!r}: all its 100 "
        "mini-batches ran, and --error-threshold 1 exceeded: 2 items failed (1 of "
        "100 mini-batches failed, 2 items failed, 198 succeeded); a resume keeps "
        "failures unless told to retry them: fix their cause, then 'daskrun "
        f"resume {run_id} --retry-failed' (add --new-source for an edited script)"
    )

    (tmp_path / "fixed").touch()
    done = daskrun("resume", run_id, "--retry-failed", cwd=tmp_path, runs=runs_dir)
    assert done.returncode == 0, done.stderr
    assert _output(tmp_path) == names  # each file once, in order


def test_a_script_folder_gone_resumes_with_the_recorded_copy(
    tmp_path: Path, runs_dir: Path
) -> None:
    make_files(tmp_path / "in", 2, prefix="bad")
    make_files(tmp_path / "in", 2, prefix="ok")
    calls = tmp_path / "calls"
    calls.mkdir()
    write_script(tmp_path / "src", SCORE)
    first = daskrun(
        "run", "src/score.py", "--input", "in", "--output", "out",
        "--mini-batch-size", "2", "--processes", "1", "--error-threshold", "-1",
        "--max-tries", "1", "-q", "--", "--calls", str(calls),
        cwd=tmp_path, runs=runs_dir,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    (record,) = RunRecord.find(runs_dir)
    (tmp_path / "src").rename(tmp_path / "moved")
    for marker in calls.iterdir():
        marker.unlink()

    refused = _one_line(
        daskrun(
            "resume", record.run_id, "--retry-failed", "--new-source",
            cwd=tmp_path, runs=runs_dir,
        ),
        2,
    )  # fmt: skip
    assert refused == (
        f"daskrun: error: --new-source: run {record.run_id!r}'s entry script "
        f"{str(tmp_path / 'src' / 'score.py')!r} is gone; put it back where it "
        "was, or resume without --new-source to run the recorded copy"
    )
    again = daskrun(
        "resume", record.run_id, "--retry-failed", "-q", cwd=tmp_path, runs=runs_dir
    )
    assert again.returncode == 0, again.stderr
    # the recorded copy ran: the bad files failed again, the same way
    assert {m.name.split(".")[0] for m in calls.iterdir()} == {"bad00000", "bad00001"}
    assert _output(tmp_path) == ["ok00000.txt", "ok00001.txt"]
    assert RunRecord.load(record.run_id, runs_dir).source_digests == (
        record.source_digests
    )
