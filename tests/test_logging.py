"""The lines a run shows go through ``logging`` (logger ``daskrun``): a
user's handler gets them, a level filters them, ``show_output`` says
whether daskrun's own terminal handler prints them."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from .helpers import (
    REPO,
    daskrun,
    make_files,
    poison_files,
    write_script,
)
from .scripts import POISON_SCRIPT, SLOW_SCRIPT

# a user's program: its own handler on "daskrun", then runs of a step whose
# file 2 fails; prints what its handler got, as JSON, on stdout
PROGRAM = """
import json, logging, sys
from daskrun import Dataset, ParallelRunConfig, ParallelRunStep
from daskrun import Experiment, JobFailedError, Pipeline, PipelineData, Workspace

got = []

class Keep(logging.Handler):
    def emit(self, record):
        got.append([record.name, record.levelname, record.getMessage()])

logging.getLogger("daskrun").addHandler(Keep())

def step(name, output):
    return ParallelRunStep(
        name,
        ParallelRunConfig(
            "score.py", mini_batch_size=1, process_count_per_node=1,
            error_threshold=0,
        ),
        inputs=[Dataset.File.from_files("in")],
        output=output,
    )

mode = sys.argv[1]
if mode == "quiet":
    run = step("quiet", "out-quiet").run(show_output=False)
elif mode == "warning":
    logging.getLogger("daskrun").setLevel(logging.WARNING)
    run = step("warned", "out-warned").run(show_output=True)
else:  # a pipeline, waited on with show_output=True
    ws = Workspace.create("ws")
    pipeline_run = Experiment(ws, "e").submit(
        Pipeline(ws, [step("piped", PipelineData("names"))])
    )
    try:
        pipeline_run.wait_for_completion(show_output=True)
    except JobFailedError as e:
        got.append(["raised", "JobFailedError", str(e)])
print(json.dumps(got))
"""


def _program(tmp_path: Path, mode: str) -> tuple[list[list[str]], str]:
    poison_files(tmp_path / "in", 4, {2})
    write_script(tmp_path, POISON_SCRIPT)
    (tmp_path / "program.py").write_text(textwrap.dedent(PROGRAM))
    done = subprocess.run(
        [sys.executable, "program.py", mode],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**_env(), "DASK_DASKRUN__RUNS_DIR": str(tmp_path / "runs")},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_show_output_false_logs_to_the_users_handler_only(tmp_path: Path) -> None:
    got, stderr = _program(tmp_path, "quiet")
    lines = [message for _, _, message in got]
    assert any(
        level == "WARNING" and "mini-batch 2 failed after 3 tries" in message
        for _, level, message in got
    ), got
    summary = [m for m in lines if m.startswith("daskrun: Failed: ")]
    assert len(summary) == 1, lines
    assert all(name.startswith("daskrun") for name, _, _ in got)
    assert "daskrun:" not in stderr, stderr  # show_output=False: none shown


def test_a_level_and_the_failed_runs_hints(tmp_path: Path) -> None:
    """With the daskrun logger at WARNING the start line is gone, the
    failure and the summary stay; a failed step.run() names the logs folder
    and the resume command, as the CLI does."""
    got, stderr = _program(tmp_path, "warning")
    assert "mini-batches" in stderr
    assert not any(s.startswith("daskrun: run warned_") for s in stderr.splitlines())
    assert " run warned_" not in stderr.split("mini-batch 2 failed")[0]
    assert "daskrun: mini-batch 2 failed after 3 tries" in stderr
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert f"\nlogs: {run_dir / 'logs'}\n" in stderr, stderr
    assert f"resume with: daskrun resume {run_dir.name} --retry-failed" in stderr
    # the user's handler has the same lines (an INFO one gone with the level)
    assert all(level in ("WARNING", "ERROR") for _, level, _ in got), got
    assert any(f"logs: {run_dir / 'logs'}" in m for _, _, m in got)


def test_wait_for_completion_shows_and_raises(tmp_path: Path) -> None:
    got, stderr = _program(tmp_path, "pipeline")
    assert got[-1][:2] == ["raised", "JobFailedError"], got
    assert "daskrun: mini-batch 2 failed after 3 tries" in stderr, stderr
    assert any("mini-batch 2 failed" in m for _, _, m in got[:-1])


def test_cli_failure_cause_once(tmp_path: Path) -> None:
    """The CLI's failed run prints its cause once, last, after the logs
    folder and the resume command."""
    poison_files(tmp_path / "in", 4, {2})
    write_script(tmp_path, POISON_SCRIPT)
    done = daskrun(
        *("run", "score.py", "--input", "in", "--output", "out", "--processes", "1"),
        *("--mini-batch-size", "1", "--error-threshold", "0"),
        cwd=tmp_path,
        runs=tmp_path / "runs",
    )
    assert done.returncode == 1
    cause = "ValueError: cannot score f00002-poison.txt"
    lines = done.stderr.strip().splitlines()
    told = [line for line in lines if "exceeded" in line or "error threshold" in line]
    assert len(told) == 1, lines
    assert sum(cause in line for line in lines) == 2, lines  # the mini-batch's
    *_, logs, hint, last = lines
    assert logs.startswith("logs: ") and hint.startswith("daskrun: resume with: ")
    assert last.startswith("daskrun: job failed: error_threshold=0 exceeded")


def test_ctrl_c_lines_in_order(tmp_path: Path) -> None:
    """Ctrl-C: the job's last progress line, then that it was canceled and
    how to resume, last and once."""
    make_files(tmp_path / "in", 200)
    write_script(tmp_path, SLOW_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "daskrun", "run", "score.py", "--input", "in",
         "--output", "out", "--mini-batch-size", "1", "--processes", "2"],
        cwd=tmp_path,
        env={**_env(), "DASK_DASKRUN__RUNS_DIR": str(tmp_path / "runs"),
             "DASK_DASKRUN__PROGRESS_INTERVAL": "0.2"},
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # Ctrl-C once mini-batches are done
        seen.append(line.rstrip("\n"))
        if re.match(r"daskrun: [1-9]\d*/200 mini-batches", line):
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130, rest
    lines = [*seen, *rest.splitlines()]
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    hint = f"daskrun: canceled; resume with: daskrun resume {run_dir.name}"
    assert lines[-1] == hint, lines
    assert sum("canceled" in line for line in lines) == 1, lines
