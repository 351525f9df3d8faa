"""Output at its edges: results that cannot make one table, outputs that
cannot be written, two runs into one folder. Real workers, real files."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from distributed import LocalCluster

from daskrun import Dataset
from daskrun.engine.output import OutputTarget, committed_parts

from .helpers import (
    daskrun,
    make_files,
    poll_for,
    run_step,
    start_daskrun,
    write_script,
)
from .scripts import ECHO


def _tables(folder: Path, fmt: str) -> None:
    """Three files, the last with other columns than the first two."""
    folder.mkdir()
    frames = [
        pd.DataFrame({"id": [1, 2], "x": [0.5, 1.5]}),
        pd.DataFrame({"id": [3], "x": [2.5]}),
        pd.DataFrame({"id": [4], "y": ["a"], "z": [7]}),
    ]
    for name, frame in zip("abc", frames, strict=True):
        if fmt == "parquet":
            frame.to_parquet(folder / f"{name}.parquet", index=False)
        else:
            frame.to_csv(folder / f"{name}.csv", index=False)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_results_with_other_columns_fail_naming_both(
    tmp_path: Path, cluster: LocalCluster, fmt: str
) -> None:
    _tables(tmp_path / "in", fmt)
    inputs = (
        Dataset.Tabular.from_parquet_files(str(tmp_path / "in"))
        if fmt == "parquet"
        else Dataset.Tabular.from_delimited_files(str(tmp_path / "in"))
    )
    run = run_step(tmp_path, ECHO, inputs, output_format=fmt, compute_target=cluster)
    assert run.status == "Failed"
    error = run.error or ""
    assert len(error.splitlines()) == 1, error
    assert f"mini-batch 2 ({tmp_path / 'in' / f'c.{fmt}'}" in error, error
    assert f"mini-batch 0 ({tmp_path / 'in' / f'a.{fmt}'}" in error, error
    assert "['id', 'y', 'z']" in error and "['id', 'x']" in error, error
    assert f"output_format={fmt!r}" in error
    # nothing published
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".daskrun"]


def test_an_empty_first_result_does_not_set_the_header(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    # mini-batch 0 returns no rows (a one-column "result" frame); the header
    # comes from the first result with rows, and every row has its fields
    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"{i}.txt").write_text(str(i))
    script = """
import os
import pandas as pd

def init():
    pass

def run(mini_batch):
    if os.path.basename(mini_batch[0]) == "0.txt":
        return []
    return pd.DataFrame({"file": [os.path.basename(p) for p in mini_batch],
                         "n": [1] * len(mini_batch)})
"""
    run = run_step(
        tmp_path,
        script,
        Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=1,
        output_format="csv",
        error_threshold=-1,  # 0.txt's missing result is a failed item
        compute_target=cluster,
    )
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == ["file,n", "1.txt,1", "2.txt,1"]


def test_cli_schema_mismatch_is_one_line_exit_1(tmp_path: Path, runs_dir: Path) -> None:
    _tables(tmp_path / "in", "parquet")
    write_script(tmp_path, ECHO)
    result = daskrun(
        "run",
        "score.py",
        "--tabular",
        "--input",
        "in",
        "--output",
        "out",
        "--output-format",
        "parquet",
        "--processes",
        "1",
        "-q",
        cwd=tmp_path,
        runs=runs_dir,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("logs: "), lines
    assert lines[-1].startswith("daskrun: job failed: mini-batch 2 ("), lines
    assert not (tmp_path / "out" / "parallel_run_step.parquet").exists()


def _cli(tmp_path: Path, runs: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    return start_daskrun(
        "run", "score.py", "--input", "in", *args, cwd=tmp_path, runs=runs, **env
    )


def _one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    hints = ("logs: ", "daskrun: resume with: ")
    (line,) = [x for x in result.stderr.splitlines() if not x.startswith(hints)]
    return line


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Mount a real tmpfs (as root) under tmp_path; unmounted afterwards."""
    mounted: list[Path] = []

    def do(name: str, options: str) -> Path:
        where = tmp_path / name
        where.mkdir(exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr}")
        mounted.append(where)
        return where

    yield do
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("where", ["file", "under-a-file", "proc", "read-only"])
def test_unwritable_output_exits_2_before_any_work(
    tmp_path: Path, runs_dir: Path, mount: Callable[[str, str], Path], where: str
) -> None:
    make_files(tmp_path / "in", 2)
    write_script(tmp_path, ECHO)
    (tmp_path / "a-file").write_text("x")
    output = {
        "file": str(tmp_path / "a-file"),
        "under-a-file": str(tmp_path / "a-file" / "out"),
        "proc": "/proc/daskrun-out",
        "read-only": str(mount("ro", "size=64k,ro") / "out"),
    }[where]
    result = daskrun(
        *["run", "score.py", "--input", "in", "--output", output],
        cwd=tmp_path,
        runs=runs_dir,
        timeout=120,
    )
    line = _one_line_error(result, 2)
    # the flag the user typed
    assert line.startswith(f"daskrun: error: --output {shlex.quote(output)} cannot "), (
        line
    )
    assert not runs_dir.exists()  # no run was started


def test_reserved_output_file_name_is_refused(tmp_path: Path, runs_dir: Path) -> None:
    make_files(tmp_path / "in", 2)
    write_script(tmp_path, ECHO)
    for name in (".daskrun", ".parallel_run_step.txt.0a1b.partial"):
        result = daskrun(
            "run", "score.py", "--input", "in", "--output", "out",
            "--append-row-file-name", name, cwd=tmp_path, runs=runs_dir,
        )  # fmt: skip
        line = _one_line_error(result, 2)
        assert f"--append-row-file-name {shlex.quote(name)} is a name daskrun" in line


def test_an_earlier_daskrun_s_unfinished_final_file_is_not_data(
    tmp_path: Path,
) -> None:
    """An earlier daskrun assembled the final file beside it, as
    ``.<name>.<hex>.partial``; one left by a kill is never an input."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "parallel_run_step.txt").write_text("a\nb\n")
    (
        out / ".parallel_run_step.txt.85f30dd2e2f5410f8af76f8a9e8b8bd9.partial"
    ).write_text("a\n")
    (out / "notes.partial").write_text("a user's file\n")
    assert [Path(p).name for p in Dataset.File.from_files(str(out)).files()] == [
        "notes.partial",
        "parallel_run_step.txt",
    ]


WAIT_FOR_GO = """
import os, time

def init():
    pass

def run(mini_batch):
    deadline = time.monotonic() + 120
    while not os.path.exists("go") and time.monotonic() < deadline:
        time.sleep(0.05)
    return [os.path.basename(p) for p in mini_batch]
"""


def test_second_run_into_one_output_is_refused(tmp_path: Path, runs_dir: Path) -> None:
    make_files(tmp_path / "in", 3)
    write_script(tmp_path, WAIT_FOR_GO)
    first = _cli(tmp_path, runs_dir, "--output", "out", "--processes", "1", "-q")
    lock = tmp_path / "out" / ".daskrun" / "lock"
    try:
        poll_for(
            lambda: lock.exists() and lock.read_text().strip(),
            timeout=120,
            what=f"the first run's id in {lock}",
            running=first,
        )
        first_id = lock.read_text().strip()
        second = _cli(tmp_path, runs_dir, "--output", "out", "--processes", "1")
        out, err = second.communicate(timeout=120)
        line = _one_line_error(
            subprocess.CompletedProcess(second.args, second.returncode, out, err), 2
        )
        assert f"is in use by run {first_id!r}" in line, line
    finally:
        (tmp_path / "go").touch()
        first.communicate(timeout=120)
    assert first.returncode == 0
    # the first run's output, and no lock left behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "parallel_run_step.txt"
    ]
    # a run killed outright leaves the lock file, but not the lock
    killed = _cli(tmp_path, runs_dir, "--output", "out2", "--processes", "1", "-q")
    (tmp_path / "go").unlink()
    lock2 = tmp_path / "out2" / ".daskrun" / "lock"
    while not (lock2.exists() and lock2.read_text().strip()):
        time.sleep(0.05)
    killed.kill()
    killed.communicate(timeout=60)
    (tmp_path / "go").touch()
    again = _cli(tmp_path, runs_dir, "--output", "out2", "--processes", "1", "-q")
    again.communicate(timeout=120)
    assert again.returncode == 0


BIG_ROWS = """
def init():
    pass

def run(mini_batch):
    return ["x" * 5000 for _ in mini_batch]
"""


@pytest.mark.slow
def test_full_disk_while_publishing_keeps_the_parts_and_resumes(
    tmp_path: Path, runs_dir: Path, mount: Callable[[str, str], Path]
) -> None:
    # 6 results of 5 kB: their parts fit in 64 kB, the final file does not too
    small = mount("small", "size=64k")
    make_files(tmp_path / "in", 6)
    write_script(tmp_path, BIG_ROWS)
    proc = _cli(
        tmp_path, runs_dir, "--output", str(small / "out"),
        "--mini-batch-size", "1", "--processes", "1", "-q",
    )  # fmt: skip
    out, err = proc.communicate(timeout=300)
    failed = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    line = _one_line_error(failed, 1)
    assert line.startswith("daskrun: job failed: publishing "), line
    assert line.endswith("cause: OSError: [Errno 28] No space left on device"), line
    run_id = line.split("daskrun resume ")[1].split("'")[0]
    # every mini-batch's rows are kept (in parts or groups of them)
    target = OutputTarget(str(small / "out"), "parallel_run_step.txt", run_id)
    assert committed_parts(target) == list(range(6))
    assert not list((small / "out").glob("*.partial"))
    subprocess.run(["mount", "-o", "remount,size=1m", str(small)], check=True)
    resumed = daskrun("resume", run_id, "-q", cwd=tmp_path, runs=runs_dir)
    assert resumed.returncode == 0, resumed.stderr
    lines = (small / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert lines == ["x" * 5000] * 6


NAMES_SCRIPT = """
import os

def init():
    pass

def run(mini_batch):
    for p in mini_batch:
        if p.endswith("bad.txt"):
            raise ValueError(f"cannot score {os.path.basename(p)}")
    return [os.path.basename(p) for p in mini_batch]
"""


def test_file_names_that_are_not_utf8(tmp_path: Path, runs_dir: Path) -> None:
    (tmp_path / "in").mkdir()
    for name in (b"caf\xe9.txt", b"caf\xe9-bad.txt", b"plain.txt"):
        (tmp_path / "in" / os.fsdecode(name)).write_text("1")
    write_script(tmp_path, NAMES_SCRIPT)
    result = daskrun(
        "run", "score.py", "--input", "in", "--output", "out",
        "--mini-batch-size", "1", "--processes", "1", "--error-threshold", "-1",
        cwd=tmp_path, runs=runs_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = (tmp_path / "out" / "parallel_run_step.txt").read_text()
    assert out.splitlines() == ["caf\\udce9.txt", "plain.txt"]
    (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    failed = (run_dir / "logs" / "sys" / "job_report" / "failed_items.csv").read_text()
    assert "caf\\udce9-bad.txt,ValueError: cannot score caf\\udce9-bad.txt" in failed
    assert "cannot score caf\\udce9-bad.txt" in result.stderr
