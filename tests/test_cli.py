"""The ``daskrun`` command, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import daskrun, make_files, write_script

SCRIPT = """
import argparse, os

def init():
    global suffix
    parser = argparse.ArgumentParser()
    parser.add_argument("--suffix", default="")
    args, _ = parser.parse_known_args()
    suffix = args.suffix

def run(mini_batch):
    return [os.path.basename(p) + suffix for p in mini_batch]
"""


def test_run_completes_and_exits_0(tmp_path: Path, runs_dir: Path) -> None:
    make_files(tmp_path / "data", 25)
    write_script(tmp_path, SCRIPT)
    result = daskrun(
        "run",
        "score.py",
        "--input",
        "data",
        "--output",
        "out",
        "--mini-batch-size",
        "4",
        "--processes",
        "2",
        "--",
        "--suffix",
        "!",
        cwd=tmp_path,
        runs=runs_dir,
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out" / "parallel_run_step.txt"
    assert f"output: {out}" in result.stdout
    assert out.read_text().splitlines() == [f"f{i:05d}.txt!" for i in range(25)]
    assert "dashboard http://127.0.0.1:" in result.stderr


def test_failed_job_exits_1_and_names_the_cause(tmp_path: Path, runs_dir: Path) -> None:
    make_files(tmp_path / "data", 3)
    write_script(tmp_path, "def init(): pass\ndef run(mb): return [1 / 0]\n")
    result = daskrun(
        "run",
        "score.py",
        "--input",
        "data",
        "--output",
        "out",
        "--max-tries",
        "1",
        "--processes",
        "1",
        cwd=tmp_path,
        runs=runs_dir,
    )
    assert result.returncode == 1
    assert "error_threshold=0 exceeded" in result.stderr
    assert "ZeroDivisionError: division by zero" in result.stderr
    *_, hint, cause = result.stderr.strip().splitlines()
    assert hint.startswith("daskrun: resume with: daskrun resume score_")
    assert hint.endswith(" --retry-failed")
    assert cause.startswith("daskrun: job failed: error_threshold=0 exceeded")
    assert cause.endswith("ZeroDivisionError: division by zero")
    assert not (tmp_path / "out" / "parallel_run_step.txt").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        # errors name the flags typed, not the Python arguments they map to
        (["--mini-batch-size", "10 files"], "--mini-batch-size '10 files' is not"),
        (["--mini-batch-size", "0"], "--mini-batch-size 0 must be at least 1"),
        (
            ["--error-threshold", "-5"],
            "--error-threshold -5 must be an int >= -1; use e.g. --error-threshold 10",
        ),
        (["--max-tries", "0"], "--max-tries 0 must be an int >= 1"),
        (["--timeout", "0"], "--timeout 0 must be an int >= 1"),
        (["--name", "X"], "--name X is not a valid step name"),
        (["--allowed-failed-percent", "150"], "--allowed-failed-percent 150.0 must"),
        (["--append-row-file-name", "a/b"], "--append-row-file-name a/b must be"),
        (["--", "positional"], "must start with an option"),
        (["--", "--mini_batch_size", "3"], "reserved"),
        (["--tabular", "--mini-batch-size", "1 MB"], "--mini-batch-size '1 MB'"),
    ],
)
def test_bad_usage_exits_2_with_one_line(
    tmp_path: Path, runs_dir: Path, args: list[str], message: str
) -> None:
    make_files(tmp_path / "data", 2)
    (tmp_path / "data" / "t.csv").write_text("a\n1\n")
    write_script(tmp_path, SCRIPT)
    cut = args.index("--") if "--" in args else len(args)
    result = daskrun(
        "run",
        "score.py",
        "--input",
        "data",
        "--output",
        "out",
        *args[:cut],
        *args[cut:],
        cwd=tmp_path,
        runs=runs_dir,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("daskrun: error: ")
    assert message in lines[0]
    assert not runs_dir.exists()  # nothing started


@pytest.mark.parametrize(
    "script_body, inputs, message",
    [
        (None, ["data"], "SCRIPT missing.py does not exist"),
        ("def init(): pass\n", ["data"], "does not define run()"),
        (SCRIPT, ["nowhere"], "input path 'nowhere' matches no files"),
        (SCRIPT, ["empty"], "input path 'empty' matches no files"),
    ],
)
def test_bad_inputs_exit_2(
    tmp_path: Path,
    runs_dir: Path,
    script_body: str | None,
    inputs: list[str],
    message: str,
) -> None:
    make_files(tmp_path / "data", 2)
    (tmp_path / "empty").mkdir()
    name = "missing.py"
    if script_body is not None:
        name = write_script(tmp_path, script_body).name
    result = daskrun(
        "run", name, "--input", *inputs, "--output", "out", cwd=tmp_path, runs=runs_dir
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[0]]
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_output_and_unknown_option(tmp_path: Path, runs_dir: Path) -> None:
    make_files(tmp_path / "data", 2)
    write_script(tmp_path, SCRIPT)
    result = daskrun("run", "score.py", "--input", "data", cwd=tmp_path, runs=runs_dir)
    assert result.returncode == 2 and "output is required" in result.stderr
    result = daskrun(
        "run", "score.py", "--input", "data", "--bogus", cwd=tmp_path, runs=runs_dir
    )
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_tabular_parquet_from_the_cli(tmp_path: Path, runs_dir: Path) -> None:
    import pandas as pd

    (tmp_path / "t").mkdir()
    pd.DataFrame({"id": range(100), "x": range(100)}).to_parquet(
        tmp_path / "t" / "a.parquet", row_group_size=10
    )
    write_script(
        tmp_path,
        "def init(): pass\n"
        "def run(df):\n    return df.assign(y=df.x * 2)[['id', 'y']]\n",
    )
    result = daskrun(
        "run",
        "score.py",
        "--input",
        "t",
        "--tabular",
        "--output",
        "out",
        "--mini-batch-size",
        "200",
        cwd=tmp_path,
        runs=runs_dir,
    )
    assert result.returncode == 0, result.stderr
    rows = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert rows == [f"{i} {2 * i}" for i in range(100)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "", "--output", "out"], "input path '' is empty, which would"),
        (["--input", "data", "--output", ""], "--output '' is empty, which would"),
    ],
)
def test_an_empty_input_or_output_is_refused(
    tmp_path: Path, runs_dir: Path, args: list[str], message: str
) -> None:
    """Not the current folder, silently: '' is one line naming the fix."""
    make_files(tmp_path / "data", 2)
    write_script(tmp_path, SCRIPT)
    result = daskrun("run", "score.py", *args, cwd=tmp_path, runs=runs_dir)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"daskrun: error: {message}"), line
    assert "e.g." in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "score.py"]
    assert not runs_dir.exists()  # nothing started


@pytest.mark.parametrize(
    "command, commands",
    [("runs", "list, show or report"), ("cluster", "start, stop")],
)
def test_a_command_without_its_subcommand_is_one_line(
    tmp_path: Path, runs_dir: Path, command: str, commands: str
) -> None:
    result = daskrun(command, cwd=tmp_path, runs=runs_dir)
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(
        f"daskrun: error: 'daskrun {command}' needs a command: {commands}"
    ), line
    assert line.endswith(f"(see 'daskrun {command} --help')")


def test_a_reader_that_goes_away_ends_the_listing_quietly(
    tmp_path: Path, runs_dir: Path
) -> None:
    """'daskrun runs list | head': the pipe's reader is gone before the
    listing is written; the command stops without a word, as CLIs do."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "daskrun", "runs", "list"],
            cwd=tmp_path,
            env=dict(os.environ, DASK_DASKRUN__RUNS_DIR=str(runs_dir)),
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert proc.stderr == ""
    assert proc.returncode == 141  # 128 + SIGPIPE, as a command killed by it
