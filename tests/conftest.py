from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.config
import pytest
from distributed import LocalCluster

from daskrun import ParallelRunConfig, ParallelRunStep, StepRun


@pytest.fixture(autouse=True)
def runs_dir(tmp_path: Path) -> Iterator[Path]:
    """Every test writes its run folders under its own tmp_path."""
    runs = tmp_path / "runs"
    with dask.config.set({"daskrun.runs-dir": str(runs)}):
        yield runs


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """Two real single-threaded worker processes, shared by the tests that
    do not need a cluster of their own."""
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    ) as c:
        yield c


# run() that takes 0.2 s per mini-batch and returns the file names
SLOW_SCRIPT = """
import os, time

def init():
    pass

def run(mini_batch):
    time.sleep(0.2)
    return [os.path.basename(p) for p in mini_batch]
"""


def write_script(folder: Path, body: str, name: str = "score.py") -> Path:
    """Write an entry script (dedented) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def make_files(folder: Path, n: int, prefix: str = "f") -> list[Path]:
    """``n`` small text files whose content is their number."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{prefix}{i:05d}.txt"
        p.write_text(str(i))
        paths.append(p)
    return paths


REPO = Path(__file__).resolve().parent.parent
AZURITE = REPO / ".cache" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
# Azurite's well-known development account (public, not a secret)
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
    "KBHBeksoGMGw=="
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing_service(name: str, fix: str) -> None:
    """Skip with the reason, or fail where scripts/test requires services."""
    message = f"{name} is not installed: {fix}"
    if os.environ.get("DASKRUN_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Azurite blob service on 127.0.0.1; yields a connection string."""
    if not AZURITE.exists():
        missing_service("Azurite", "run scripts/install")
    port = _free_port()
    folder = tmp_path_factory.mktemp("azurite")
    proc = subprocess.Popen(
        [
            str(AZURITE),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--location",
            str(folder),
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--silent",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Azurite did not start") from None
                time.sleep(0.1)
        yield (
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            f"AccountKey={AZURITE_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
        )
    finally:
        proc.terminate()
        proc.wait(10)


def run_step(
    tmp_path: Path,
    script_body: str,
    inputs: Any,
    *,
    name: str = "test-step",
    output: str | None = "out",
    step_options: dict[str, Any] | None = None,
    show_output: bool = False,
    **config: Any,
) -> StepRun:
    """Write the entry script, build config and step, run it, return the run.

    A relative ``output`` lands under ``tmp_path``; URLs are used as given.
    """
    script = write_script(tmp_path, script_body)
    config.setdefault("output_action", "append_row")
    cfg = ParallelRunConfig(str(script), **config)
    if output is not None and "://" not in output:
        output = str(tmp_path / output)
    step = ParallelRunStep(
        name, cfg, inputs=inputs, output=output, **(step_options or {})
    )
    return step.run(show_output=show_output)


def daskrun(*args: str, cwd: Path, runs: Path) -> subprocess.CompletedProcess[str]:
    """Run the ``daskrun`` command in ``cwd``, with run folders in ``runs``."""
    env = dict(os.environ, DASK_DASKRUN__RUNS_DIR=str(runs))
    return subprocess.run(
        [sys.executable, "-m", "daskrun", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="session")
def slurm() -> Iterator[dict[str, str]]:
    """A real single-node Slurm on 127.0.0.1 (scripts/slurm), for this test
    session only: its own state folder and ports, stopped afterwards. Yields
    the environment that Slurm's commands need (SLURM_CONF)."""
    if shutil.which("slurmctld", path=os.environ["PATH"] + ":/usr/sbin") is None:
        missing_service("Slurm", "run scripts/install (apt-get install slurmctld ...)")
    if os.geteuid() != 0:
        missing_service("Slurm as root", "run the Slurm tests as root")
    state = tempfile.mkdtemp(prefix="slurm-", dir="/tmp")  # short socket paths
    env = dict(
        os.environ,
        DASKRUN_SLURM_DIR=state,
        DASKRUN_SLURM_PORT=str(_free_port_pair()),
        DASKRUN_SLURM_CPUS="4",
    )
    started = subprocess.run(
        [str(REPO / "scripts" / "slurm"), "start"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if started.returncode != 0:
        pytest.fail(f"Slurm did not start:\n{started.stderr}")
    conf = started.stdout.strip().split("SLURM_CONF=", 1)[1].strip("'\"")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # dask-jobqueue calls sbatch, squeue, scancel
    try:
        yield {"SLURM_CONF": conf}
    finally:
        subprocess.run(
            [str(REPO / "scripts" / "slurm"), "stop"], env=env, timeout=120, check=False
        )
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        shutil.rmtree(state, ignore_errors=True)


def _free_port_pair() -> int:
    """A port P with P+1 free too (slurmctld and slurmd)."""
    for _ in range(50):
        port = _free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two free ports in a row")
