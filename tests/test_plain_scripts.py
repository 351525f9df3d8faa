"""A user's first runs, in real subprocesses: a plain script without a
``__main__`` guard, local workers that cannot start, and a terminal free of
distributed's own messages."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daskrun.monitoring.handlers import distributed_log
from daskrun.monitoring.monitor import DISTRIBUTED_LOG

from .helpers import make_files, quick_start_blocks, write_script
from .scripts import NAMES

JOB = """
import daskrun

config = daskrun.ParallelRunConfig(
    entry_script="score.py",
    mini_batch_size=2,
    output_action="append_row",
    process_count_per_node=2,
)
step = daskrun.ParallelRunStep(
    name="no-guard",
    parallel_run_config=config,
    inputs=[daskrun.Dataset.File.from_files("data/")],
    output="out/",
)
run = step.run()
print(run.status, run.items_succeeded)
"""


def _python(
    args: list[str],
    cwd: Path,
    runs: Path,
    stdin: str | None = None,
    timeout: float = 120,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """This interpreter with ``args`` in ``cwd``; run folders under ``runs``.
    A step that hangs fails the test by the timeout."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=dict(os.environ, DASK_DASKRUN__RUNS_DIR=str(runs), **env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    return (done.stdout + done.stderr).splitlines()


def _distributed_log(runs: Path) -> str:
    (log,) = runs.glob(f"*/logs/{DISTRIBUTED_LOG}")
    return log.read_text()


@pytest.mark.parametrize("how", ["file", "stdin", "-c", "-m"])
def test_a_script_without_main_guard_just_works(
    tmp_path: Path, runs_dir: Path, how: str
) -> None:
    make_files(tmp_path / "data", 5)
    write_script(tmp_path, NAMES)
    job = write_script(tmp_path, JOB, name="job.py")
    args, stdin = {
        "file": (["job.py"], None),
        "stdin": (["-"], job.read_text()),
        "-c": (["-c", job.read_text()], None),
        "-m": (["-m", "job"], None),
    }[how]
    done = _python(args, tmp_path, runs_dir, stdin=stdin)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["Completed 5"]
    assert len(_lines(done)) <= 10, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    out = tmp_path / "out" / "parallel_run_step.txt"
    assert out.read_text().splitlines() == [f"f{i:05d}.txt" for i in range(5)]


def test_the_readme_quick_start_runs_as_written(tmp_path: Path, runs_dir: Path) -> None:
    score, job = quick_start_blocks()[:2]
    (tmp_path / "score.py").write_text(score)
    (tmp_path / "job.py").write_text(job)
    (tmp_path / "images").mkdir()
    sizes = {f"img{i:02d}.png": 100 + i for i in range(25)}
    for name, size in sizes.items():
        (tmp_path / "images" / name).write_bytes(b"x" * size)
    (tmp_path / "models").mkdir()
    done = _python(["job.py"], tmp_path, runs_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out" / "parallel_run_step.txt"
    assert done.stdout.splitlines() == [f"Completed {out} 25 0"]
    assert out.read_text().splitlines() == [f"{n}: {s}" for n, s in sizes.items()]
    assert len(_lines(done)) <= 10, done.stderr
    assert all(line.startswith("daskrun: ") for line in done.stderr.splitlines())


def _cli(
    tmp_path: Path, runs: Path, *args: str, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    return _python(
        ["-m", "daskrun", "run", "score.py", "--input", "data", "--output", "out"]
        + ["--processes", "2", *args],
        tmp_path,
        runs,
        timeout=timeout,
        **env,
    )


def _only_daskrun_lines(stderr: str) -> None:
    """stderr holds daskrun's own lines, none of distributed's."""
    for line in stderr.splitlines():
        assert line.startswith(("daskrun: ", "logs: ")), stderr
    # distributed's log format: "<time> - <logger> - <level> - <message>"
    assert not re.search(r" - (distributed|tornado|asyncio)\S* - ", stderr), stderr
    for noise in ("Traceback", "Task exception", "Nanny", "Restarting worker"):
        assert noise not in stderr, stderr


def test_a_worker_that_cannot_start_fails_the_step_naming_why(
    tmp_path: Path, runs_dir: Path
) -> None:
    make_files(tmp_path / "data", 3)
    write_script(tmp_path, NAMES)
    started = time.monotonic()
    done = _cli(
        tmp_path,
        runs_dir,
        # every worker process fails as it is made
        DASK_DISTRIBUTED__WORKER__PRELOAD='["daskrun_no_such_preload"]',
    )
    assert time.monotonic() - started < 60
    assert done.returncode == 1, done.stderr
    _only_daskrun_lines(done.stderr)
    cause = done.stderr.splitlines()[-1]
    assert cause.startswith("daskrun: job failed: ")
    assert "local worker processes failed to start: ModuleNotFoundError: " in cause
    assert "No module named 'daskrun_no_such_preload'" in cause
    assert f"/logs/{DISTRIBUTED_LOG}" in cause
    log = _distributed_log(runs_dir)
    assert "Failed to initialize worker" in log
    assert "ModuleNotFoundError" in log


def test_workers_that_do_not_start_in_time_fail_the_step(
    tmp_path: Path, runs_dir: Path
) -> None:
    make_files(tmp_path / "data", 3)
    write_script(tmp_path, NAMES)
    stuck = write_script(
        tmp_path,
        "import time\n\ndef dask_setup(worker):\n    time.sleep(3600)\n",
        name="stuck_preload.py",
    )
    started = time.monotonic()
    done = _cli(
        tmp_path,
        runs_dir,
        DASK_DISTRIBUTED__WORKER__PRELOAD=f'["{stuck}"]',
        DASK_DASKRUN__LOCAL_CLUSTER__START_TIMEOUT="3",
    )
    took = time.monotonic() - started
    assert took < 30, took
    assert done.returncode == 1, done.stderr
    _only_daskrun_lines(done.stderr)
    cause = done.stderr.splitlines()[-1]
    assert cause.startswith("daskrun: job failed: 0 of 2 local workers started ")
    assert "daskrun.local-cluster.start-timeout=3 s" in cause
    assert "Run preload setup" in _distributed_log(runs_dir)


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"DASK_DASKRUN__LOCAL_CLUSTER__START_TIMEOUT": "soon"},
            # named as the user set it
            "DASK_DASKRUN__LOCAL_CLUSTER__START_TIMEOUT='soon' is not a number of "
            "seconds",
        ),
        (
            {"DASK_DASKRUN__LOCAL_CLUSTER__MEMORY_LIMIT": "lots"},
            "DASK_DASKRUN__LOCAL_CLUSTER__MEMORY_LIMIT='lots' is not a memory size",
        ),
    ],
)
def test_a_bad_local_cluster_setting_is_one_line(
    tmp_path: Path, runs_dir: Path, env: dict[str, str], message: str
) -> None:
    make_files(tmp_path / "data", 3)
    write_script(tmp_path, NAMES)
    done = _cli(tmp_path, runs_dir, **env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.splitlines()[0]]
    assert done.stderr.startswith(f"daskrun: error: {message}")


@pytest.mark.parametrize(
    "body, in_log",
    [
        ("def run(mini_batch):\n    return [1 / 0]\n", None),
        (
            "import os\n\ndef run(mini_batch):\n    os._exit(3)\n",
            "Restarting worker",
        ),
    ],
    ids=["raises", "kills-its-worker"],
)
def test_a_failing_run_leaves_distributed_out_of_the_terminal(
    tmp_path: Path, runs_dir: Path, body: str, in_log: str | None
) -> None:
    make_files(tmp_path / "data", 4)
    write_script(tmp_path, "def init():\n    pass\n\n" + body)
    done = _cli(tmp_path, runs_dir, "--mini-batch-size", "1", "--max-tries", "2")
    assert done.returncode == 1, done.stderr
    _only_daskrun_lines(done.stderr)
    assert done.stderr.splitlines()[-1].startswith("daskrun: job failed: ")
    log = _distributed_log(runs_dir)
    if in_log is not None:
        assert in_log in log


def test_an_init_that_raises_leaves_distributed_out_of_the_terminal(
    tmp_path: Path, runs_dir: Path
) -> None:
    make_files(tmp_path / "data", 4)
    write_script(
        tmp_path,
        "def init():\n    raise ValueError('no model here')\n\n"
        "def run(mini_batch):\n    return mini_batch\n",
    )
    done = _cli(tmp_path, runs_dir)
    assert done.returncode == 1, done.stderr
    _only_daskrun_lines(done.stderr)
    # the cause says how to go on: no other resume hint
    *_, raised, _, cause = done.stderr.splitlines()
    assert raised == f"daskrun: raised at {tmp_path / 'score.py'}, line 2, in init"
    assert re.fullmatch(
        r"daskrun: job failed: init\(\) failed on worker-\d: "
        r"ValueError: no model here; fix it, then 'daskrun resume \S+ --new-source'",
        cause,
    )
    assert "failed to setup" in _distributed_log(runs_dir)


def test_distributed_log_takes_distributed_lines_and_gives_them_back(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    names = ("distributed", "distributed.nanny", "tornado.application", "asyncio")
    before = {
        n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate)
        for n in names
    }
    path = tmp_path / "logs" / DISTRIBUTED_LOG
    with distributed_log(path), distributed_log(path):
        logging.getLogger("distributed.nanny").warning("Restarting worker")
        logging.getLogger("tornado.application").error("Exception in callback")
        logging.getLogger("asyncio").error("Task exception was never retrieved")
    after = {
        n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate)
        for n in names
    }
    assert after == before
    assert capfd.readouterr().err == ""
    text = path.read_text()
    for line in (
        "distributed.nanny WARNING: Restarting worker",
        "tornado.application ERROR: Exception in callback",
        "asyncio ERROR: Task exception was never retrieved",
    ):
        assert line in text
