"""A warm worker never runs a previous job's modules: each job imports
exactly its own source bundle, whether the workers were kept by
``keep_warm()`` or by ``daskrun cluster start``, and after an edit to a
module between two jobs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import daskrun
from daskrun import ParallelRunConfig

from .helpers import daskrun as daskrun_cli
from .helpers import files_step, make_files, write_script

# each item: the helper module's NAME, and the worker process that ran it
SCORE = """
import os
import helper

def init():
    pass

def run(mini_batch):
    return [f"{helper.NAME} {os.getpid()}" for _ in mini_batch]
"""


def _source(folder: Path, name: str) -> Path:
    """A source folder whose score.py imports the helper.py beside it,
    whose NAME is ``name``."""
    write_script(folder, f"NAME = {name!r}\n", "helper.py")
    return write_script(folder, SCORE)


def _names_and_pids(output: Path) -> tuple[set[str], set[int]]:
    lines = [line.split() for line in output.read_text().splitlines()]
    return {name for name, _ in lines}, {int(pid) for _, pid in lines}


def _job(tmp_path: Path, source: Path, name: str) -> tuple[set[str], set[int]]:
    config = ParallelRunConfig(
        "score.py",
        source_directory=str(source),
        mini_batch_size=1,
        process_count_per_node=1,
        output_action="append_row",
    )
    run = files_step(tmp_path, name, config, output=f"out-{name}").run()
    assert run.status == "Completed", run.error
    return _names_and_pids(Path(run.output_path or ""))


def test_keep_warm_jobs_import_their_own_helper(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 4)
    _source(tmp_path / "a", "from-a")
    _source(tmp_path / "b", "from-b")
    with daskrun.keep_warm():
        names_a, pids_a = _job(tmp_path, tmp_path / "a", "job-a")
        names_b, pids_b = _job(tmp_path, tmp_path / "b", "job-b")
    assert pids_a == pids_b  # the same warm worker ran both
    assert names_a == {"from-a"}
    assert names_b == {"from-b"}


def test_keep_warm_sees_an_edited_helper(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 4)
    source = tmp_path / "src"
    _source(source, "before")
    with daskrun.keep_warm():
        names_1, pids_1 = _job(tmp_path, source, "job-1")
        _source(source, "edited-helper")
        names_2, pids_2 = _job(tmp_path, source, "job-2")
    assert pids_1 == pids_2
    assert names_1 == {"before"}
    assert names_2 == {"edited-helper"}


@pytest.mark.slow
def test_cluster_start_jobs_import_their_own_helper(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 4)
    found: dict[str, tuple[set[str], set[int]]] = {}

    def cli(*args: str) -> None:
        done = daskrun_cli(*args, cwd=tmp_path, runs=tmp_path / "runs")
        assert done.returncode == 0, done.stderr

    cli("cluster", "start", "--processes", "1")
    try:
        for name in ("from-a", "from-b"):
            script = _source(tmp_path / name, name)
            out = tmp_path / f"out-{name}"
            cli("run", str(script), "--input", str(tmp_path / "in"),
                "--output", str(out), "--mini-batch-size", "1")  # fmt: skip
            found[name] = _names_and_pids(out / "parallel_run_step.txt")
    finally:
        cli("cluster", "stop")
    assert found["from-a"][1] == found["from-b"][1]  # the shared worker
    assert found["from-a"][0] == {"from-a"}
    assert found["from-b"][0] == {"from-b"}
    assert os.getpid() not in found["from-a"][1]
