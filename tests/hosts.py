"""A cluster of several hosts on this one machine, for the tests.

Each host (the scheduler's, and each worker's) runs in a Linux mount
namespace of its own (``unshare --mount --uts``) with a fresh tmpfs over
``/tmp`` and over ``$HOME`` and a host name of its own: as on a real
cluster, no host sees the client's ``/tmp`` (where pytest's ``tmp_path``
lies) or home, nor another host's. The network is shared: everything
listens on 127.0.0.1. The repository and its ``.venv`` (under ``/work``)
stay visible, like software installed on every node, and so does
:attr:`Hosts.shared`, a folder on ``/dev/shm`` that stands for a shared
file system (NFS) every host mounts at the same path.

The ``hosts`` fixture (``conftest.py``) starts one :class:`Hosts` per test
module; it skips, naming the reason, where mount namespaces are not
permitted, and fails instead under ``DASKRUN_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
from distributed import Client

from .helpers import REPO, free_port, poll_for

# a fresh /tmp and home, and a host name, then the command ("$@"). The
# software stays where it is even under /tmp or home (a pyenv Python, a
# checkout and its .venv in /tmp): installed on every node. Each path of
# $DASKRUN_TEST_KEEP (":"-separated) is bound aside, below a tmpfs over
# /mnt, before /tmp and home are covered, then moved back into place.
_HOST = (
    "set -e; mount -t tmpfs -o size=1m tmpfs /mnt; i=0; IFS=:; "
    "for p in $DASKRUN_TEST_KEEP; do i=$((i+1)); mkdir /mnt/k$i; "
    'mount --bind "$p" /mnt/k$i; done; '
    "mount -t tmpfs -o size=256m,mode=1777 tmpfs /tmp; "
    'mount -t tmpfs -o size=64m,mode=0700 tmpfs "$HOME"; i=0; '
    'for p in $DASKRUN_TEST_KEEP; do i=$((i+1)); mkdir -p "$p"; '
    'mount --move /mnt/k$i "$p"; done; unset IFS; '
    'hostname "$DASKRUN_TEST_HOST"; exec "$@"'
)
_UNSHARE = ["unshare", "--mount", "--uts", "--propagation", "private"]


def _kept() -> str:
    """The software that lies under /tmp or home, which every host keeps:
    the Python installation and this checkout (its sources and .venv)."""
    covered = [os.path.realpath("/tmp"), os.path.realpath(os.path.expanduser("~"))]
    wanted = {os.path.realpath(sys.base_prefix), os.path.realpath(REPO)}
    kept = sorted(
        path
        for path in wanted
        if any(path.startswith(folder + os.sep) for folder in covered)
    )
    # a path inside another kept one comes along with it
    outer = [p for p in kept if not any(p.startswith(q + os.sep) for q in kept)]
    return ":".join(outer)


def _environment(host: str) -> dict[str, str]:
    return dict(
        os.environ,
        DASKRUN_TEST_HOST=host,
        DASKRUN_TEST_KEEP=_kept(),
        PYTHONPATH=str(REPO),
    )


def namespaces_refused() -> str | None:
    """Why a host of its own cannot be made here (``None`` where it can)."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return "unshare (util-linux, Linux) is not available"
    try:
        done = subprocess.run(
            [*_UNSHARE, "sh", "-c", _HOST, "sh", sys.executable, "-c", "pass"],
            env=_environment("probe"),
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare --mount failed: {e}"
    if done.returncode != 0:
        return f"unshare --mount is not permitted: {done.stderr.strip()[:200]}"
    return None


def _on_host(name: str, command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` on a new host ``name``; its output goes to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*_UNSHARE, "sh", "-c", _HOST, "sh", *command],
            env=_environment(name),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@dataclass
class Host:
    """One worker host: its name and its ``dask worker`` (a nanny, which
    restarts its worker process when that dies)."""

    name: str
    proc: subprocess.Popen[bytes]

    def worker_pids(self) -> list[int]:
        """The worker processes the nanny runs now."""
        try:
            nanny = psutil.Process(self.proc.pid)
            return [
                p.pid
                for p in nanny.children(recursive=True)
                if "spawn_main" in " ".join(p.cmdline())
            ]
        except psutil.NoSuchProcess:
            return []


class Hosts:
    """A scheduler host and ``n`` worker hosts of one single-threaded worker
    process each (see the module docstring); use as a context manager."""

    def __init__(self, folder: Path, n: int = 2, start_timeout: float = 90):
        self.folder = folder  # logs, on the client's disk
        self.shared = Path("/dev/shm") / f"daskrun-hosts-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.n, self.start_timeout = n, start_timeout
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.hosts: list[Host] = []

    def __enter__(self) -> Hosts:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shared.mkdir(mode=0o700)
        python = sys.executable
        try:
            self.scheduler = _on_host(
                "scheduler",
                [python, "-m", "distributed.cli.dask_scheduler", "--host",
                 "127.0.0.1", "--port", str(self.port), "--no-dashboard",
                 "--no-show"],
                self.folder / "scheduler.log",
            )  # fmt: skip
            for i in range(1, self.n + 1):
                name = f"host-{i}"
                proc = _on_host(
                    name,
                    [python, "-m", "distributed.cli.dask_worker", self.address,
                     "--name", name, "--host", "127.0.0.1", "--nthreads", "1",
                     "--nworkers", "1", "--no-dashboard", "--memory-limit", "0"],
                    self.folder / f"{name}.log",
                )  # fmt: skip
                self.hosts.append(Host(name, proc))
            self.wait_for_workers(self.n)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def client(self) -> Client:
        return Client(self.address, set_as_default=False, timeout="30s")

    def wait_for_workers(self, n: int) -> None:
        """Until ``n`` workers are connected (a killed one is restarted by
        its nanny); fails naming the logs after ``start_timeout`` s."""
        with self.client() as client:
            poll_for(
                lambda: len(client.scheduler_info(n_workers=-1)["workers"]) >= n,
                timeout=self.start_timeout,
                interval=0.1,
                what=f"{n} workers to connect; see {self.folder}/*.log",
            )

    def close(self) -> None:
        # the worker hosts first: a nanny whose scheduler is gone waits for it
        for group in ([h.proc for h in self.hosts], [self.scheduler]):
            procs = [p for p in group if p is not None]
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        shutil.rmtree(self.shared, ignore_errors=True)
