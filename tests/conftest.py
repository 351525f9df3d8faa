"""Fixtures; the plain helpers are in ``tests/helpers.py``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import dask.config
import pytest
from distributed import LocalCluster

from .helpers import (
    AZURITE,
    AZURITE_KEY,
    REPO,
    free_port,
    free_port_pair,
    missing_service,
    new_local_cluster,
    poll_for,
)
from .hosts import Hosts, namespaces_refused

# gcsfs's default file system first asks a bucket's layout over gRPC, which
# no emulator answers (60 s per call), and asks Google (off this machine) when
# an access token expires; set before any worker process starts
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("FETCH_RAW_TOKEN_EXPIRY", "false")


@pytest.fixture(autouse=True)
def runs_dir(tmp_path: Path) -> Iterator[Path]:
    """Every test writes its run folders under its own tmp_path."""
    runs = tmp_path / "runs"
    with dask.config.set({"daskrun.runs-dir": str(runs)}):
        yield runs


@pytest.fixture(autouse=True)
def shared_cluster_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Every test looks for a cluster of 'daskrun cluster start' in its own
    folder (never the user's), in this process and in the ones it starts."""
    path = tmp_path / "shared" / "cluster.json"
    monkeypatch.setenv("DASK_DASKRUN__LOCAL_CLUSTER__SHARED_FILE", str(path))
    with dask.config.set({"daskrun.local-cluster.shared-file": str(path)}):
        yield path


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """Two real single-threaded worker processes, shared by the tests that
    do not need a cluster of their own."""
    with new_local_cluster() as c:
        yield c


@pytest.fixture
def local_cluster() -> Iterator[Callable[..., LocalCluster]]:
    """A cluster of the test's own: call it (inside the test's
    ``dask.config.set``, which its scheduler reads when it starts) with
    ``LocalCluster``'s keywords where they differ from two single-threaded
    worker processes on 127.0.0.1; use it as a context manager, or leave it
    to be closed at the test's end."""
    made: list[LocalCluster] = []

    def make(**settings: object) -> LocalCluster:
        made.append(new_local_cluster(**settings))
        return made[-1]

    yield make
    for c in made:
        c.close()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Azurite blob service on 127.0.0.1; yields a connection string."""
    if not AZURITE.exists():
        missing_service("Azurite", "run scripts/install")
    port = free_port()
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

    def listening() -> bool:
        """Azurite to listen on its port"""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    try:
        poll_for(listening, timeout=30, interval=0.1, running=proc)
        yield (
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            f"AccountKey={AZURITE_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
        )
    finally:
        proc.terminate()
        proc.wait(10)


def _serve(name: str, argv: list[str], port: int) -> Iterator[str]:
    """Run a storage API server on 127.0.0.1:``port``; yield its URL."""
    if shutil.which(argv[0]) is None:
        missing_service(name, "pip install -e '.[test]'")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening() -> bool:
        """the server to listen on its port"""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    try:
        poll_for(listening, timeout=60, interval=0.1, running=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 API (moto's standalone server) on 127.0.0.1; yields its
    endpoint URL. Any key pair is accepted."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    moto = str(bin_dir / "moto_server")
    yield from _serve("moto_server", [moto, "-H", "127.0.0.1", "-p", str(port)], port)


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[str]:
    """A real GCS JSON API (gcp-storage-emulator) on 127.0.0.1, in memory;
    yields its endpoint URL."""
    port = free_port()
    emulator = str(Path(sys.executable).parent / "gcp-storage-emulator")
    argv = [emulator, "start", "--host", "127.0.0.1", "--port", str(port)]
    yield from _serve("gcp-storage-emulator", [*argv, "--in-memory"], port)


@pytest.fixture(scope="session")
def mount_namespaces() -> None:
    """Skip (fail under DASKRUN_REQUIRE_SERVICES=1) where a host of its own
    cannot be made here (``tests/hosts.py``)."""
    refused = namespaces_refused()
    if refused is not None:
        missing_service("Linux mount namespaces (unshare --mount, as root)", refused)


@pytest.fixture(scope="module")
def hosts(
    mount_namespaces: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hosts]:
    """A scheduler host and two worker hosts, each with its own /tmp and home
    (Linux mount namespaces, ``tests/hosts.py``), on 127.0.0.1."""
    with Hosts(tmp_path_factory.mktemp("hosts")) as started:
        yield started


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
        DASKRUN_SLURM_PORT=str(free_port_pair()),
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


KERNEL = "daskrun-test"


@pytest.fixture
def kernel(tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernel spec running this interpreter with this checkout on its path,
    found through JUPYTER_PATH (nothing installed outside the test)."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
                         "{connection_file}"],
                "display_name": "daskrun (test)",
                "language": "python",
                "env": {"PYTHONPATH": str(REPO)},
            }
        )
    )  # fmt: skip
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("DASK_DASKRUN__RUNS_DIR", str(runs_dir))
    return KERNEL
