"""More batch queues through dask-jobqueue: PBS against a real Slurm through
the ``qsub``/``qstat``/``qdel`` of Debian's slurm-wlm-torque, SGE against a
real Grid Engine (Debian's gridengine-master and -exec, scripts/gridengine),
and the sizes both check before anything is submitted."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daskrun import (
    ComputeTarget,
    ConfigError,
    Dataset,
    ParallelRunConfig,
    ParallelRunStep,
    PbsCompute,
    SgeCompute,
    Workspace,
)

from .helpers import make_files, poll_for, require_module, write_script

REPO = Path(__file__).resolve().parents[1]

SCORE = """
import os

def init():
    pass

def run(mini_batch):
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("JOB_ID") or "-"
    return [f"{os.path.basename(p)} {job}" for p in mini_batch]
"""


@pytest.fixture
def pbs(
    slurm: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> dict[str, str]:
    """PBS's commands over the test session's real Slurm: the wrappers of
    Debian's slurm-wlm-torque (scripts/slurm torque), first on PATH. Run
    from tmp_path: the wrappers' qsub ignores ``#PBS -o/-e`` and writes the
    jobs' output where it is called."""
    done = subprocess.run(
        [str(REPO / "scripts" / "slurm"), "torque"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        pytest.fail(f"the PBS wrappers did not unpack:\n{done.stderr}")
    monkeypatch.setenv(
        "PATH", f"{REPO / '.cache' / 'torque' / 'bin'}:{os.environ['PATH']}"
    )
    monkeypatch.chdir(tmp_path)
    return slurm


def _step(tmp_path: Path, compute_target: Any, **config: Any) -> ParallelRunStep:
    config.setdefault("node_count", 2)
    config.setdefault("process_count_per_node", 1)
    return ParallelRunStep(
        "on-queue",
        ParallelRunConfig(
            str(write_script(tmp_path, SCORE)),
            mini_batch_size=5,
            compute_target=compute_target,
            **config,
        ),
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=str(tmp_path / "out"),
    )


def _queue_lines(command: list[str]) -> list[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    return [line for line in done.stdout.splitlines() if "dask-worker" in line]


def _exactly_once_on_two_jobs(tmp_path: Path, target: ComputeTarget, ws: Any) -> None:
    files = make_files(tmp_path / "in", 40)
    run = _step(tmp_path, target).run(workspace=ws)
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert [line.split()[0] for line in lines] == [p.name for p in files]
    jobs = {line.split()[1] for line in lines}
    assert len(jobs) == 2 and "-" not in jobs  # two batch jobs did the work


def test_pbs_target_through_slurm_torque_wrappers_exactly_once(
    tmp_path: Path, pbs: dict[str, str]
) -> None:
    require_module("dask_jobqueue", "pip install 'daskrun[jobqueue]'")
    ws = Workspace.create(tmp_path / "ws")
    target = ComputeTarget.create(
        ws,
        "pbs",
        PbsCompute.provisioning_configuration(
            queue="debug", cores=1, memory="1GB", walltime="00:10:00", interface="lo"
        ),
    )
    assert target.kind == "pbs" and target.queued
    _exactly_once_on_two_jobs(tmp_path, target, ws)
    assert list(tmp_path.glob("tmp*.sh.o*"))  # the jobs' output, where qsub ran
    # the jobs were cancelled
    poll_for(lambda: not _queue_lines(["squeue", "-h", "-o", "%j"]), timeout=20)


def test_sge_target_on_grid_engine_exactly_once(
    tmp_path: Path, gridengine: dict[str, str]
) -> None:
    require_module("dask_jobqueue", "pip install 'daskrun[jobqueue]'")
    ws = Workspace.create(tmp_path / "ws")
    target = ComputeTarget.create(
        ws,
        "sge",
        SgeCompute.provisioning_configuration(
            queue=gridengine["queue"],
            cores=1,
            memory="1GB",
            walltime="00:10:00",
            interface="lo",
            log_directory=str(tmp_path / "sge-logs"),
        ),
    )
    assert target.kind == "sge" and target.queued
    _exactly_once_on_two_jobs(tmp_path, target, ws)
    poll_for(lambda: not _queue_lines(["qstat"]), timeout=30)


@pytest.mark.parametrize("compute", [PbsCompute, SgeCompute])
def test_queue_sizes_are_checked_before_anything_is_submitted(compute: Any) -> None:
    require_module("dask_jobqueue", "pip install 'daskrun[jobqueue]'")
    with pytest.raises(ConfigError, match=r"cores=0 must be an int of at least 1"):
        compute.provisioning_configuration(cores=0)
    with pytest.raises(ConfigError, match=r"memory='lots' is not an amount .*'2GB'"):
        compute.provisioning_configuration(memory="lots")


def test_sge_job_script_carries_the_target_options(tmp_path: Path) -> None:
    """What a Grid Engine would be asked, read without one."""
    require_module("dask_jobqueue", "pip install 'daskrun[jobqueue]'")
    ws = Workspace.create(tmp_path / "ws")
    ComputeTarget.create(
        ws,
        "sge",
        SgeCompute.provisioning_configuration(
            queue="gpu.q",
            account="proj7",
            walltime="02:00:00",
            job_extra_directives=["-pe smp 2"],
        ),
    )
    backend = ws.compute_targets["sge"].backend
    cluster = backend.cluster(2)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#$ -q gpu.q", "#$ -P proj7", "#$ -l h_rt=02:00:00", "#$ -pe smp 2"):
        assert line in script
    assert "--nworkers 2" in script
    assert str(tmp_path / "runs" / "sge-logs") in script


@pytest.fixture(scope="session")
def gridengine() -> Iterator[dict[str, str]]:
    """A real single-host Grid Engine (scripts/gridengine) with the queue
    "daskrun"; stopped afterwards unless it ran before."""
    from .helpers import missing_service

    if not Path("/usr/lib/gridengine/sge_qmaster").exists():
        missing_service("Grid Engine", "run scripts/gridengine install")
    if os.geteuid() != 0:
        missing_service("Grid Engine as root", "run the SGE tests as root")
    script = str(REPO / "scripts" / "gridengine")
    running = subprocess.run([script, "status"], timeout=30).returncode == 0
    done = subprocess.run(
        [script, "start"], capture_output=True, text=True, timeout=180
    )
    if done.returncode != 0:
        pytest.fail(f"Grid Engine did not start:\n{done.stderr}")
    try:
        yield {"queue": "daskrun"}
    finally:
        if not running:  # left as it was found
            subprocess.run([script, "stop"], timeout=120, check=False)


def _wrong_queue_fails_at_once(tmp_path: Path, compute: Any, said: str) -> None:
    require_module("dask_jobqueue", "pip install 'daskrun[jobqueue]'")
    make_files(tmp_path / "in", 3)
    ws = Workspace.create(tmp_path / "ws")
    target = ComputeTarget.create(
        ws,
        "wrong",
        compute.provisioning_configuration(
            queue="nonexistent", memory="1GB", walltime="00:10:00", interface="lo"
        ),
    )
    started = time.monotonic()
    with pytest.raises(ConfigError, match="queue refused the worker jobs") as caught:
        _step(tmp_path, target).run(workspace=ws)
    assert said in str(caught.value)
    assert time.monotonic() - started < 30  # not start-timeout's 120 s
    assert not (tmp_path / "out" / "parallel_run_step.txt").exists()


def test_pbs_wrong_queue_fails_at_once_in_the_queues_words(
    tmp_path: Path, pbs: dict[str, str]
) -> None:
    _wrong_queue_fails_at_once(
        tmp_path, PbsCompute, "invalid partition specified: nonexistent"
    )


def test_sge_wrong_queue_fails_at_once_in_the_queues_words(
    tmp_path: Path, gridengine: dict[str, str]
) -> None:
    _wrong_queue_fails_at_once(tmp_path, SgeCompute, '"nonexistent"')
