"""The shared local cluster of ``daskrun cluster start``: kept running for
the jobs of later processes, found through a file only its user may
write."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
from distributed import Client
from distributed.security import Security

from daskrun.backends.compute.local import gc_paused, local_cluster
from daskrun.backends.compute.scheduler import answering_client, dashboard_link
from daskrun.backends.storage import FileLock
from daskrun.engine.config import config_get
from daskrun.exceptions import ConfigError, JobFailedError


@dataclasses.dataclass(frozen=True)
class SharedCluster:
    """A local cluster that ``daskrun cluster start`` keeps running for the
    jobs of later processes: its scheduler's address and the TLS
    certificates that get in, in ``daskrun.local-cluster.shared-file``
    (mode 0600, in a folder only its user may enter), as secured as the
    cluster a job starts for itself. Every job with no ``compute_target``
    uses it while it runs; ``daskrun cluster stop`` ends it.
    """

    address: str
    pid: int  # the process that runs it (``daskrun cluster serve``)
    workers: int
    dashboard: str | None
    ca: str
    cert: str
    key: str

    @staticmethod
    def log_path() -> Path:
        """Where ``daskrun cluster serve`` writes its output."""
        return SharedCluster.path().with_suffix(".log")

    @staticmethod
    def path() -> Path:
        return Path(os.path.expanduser(str(config_get("local-cluster.shared-file"))))

    @classmethod
    def starting(cls) -> FileLock:
        """Held while ``daskrun cluster start`` starts one: a second start
        meanwhile is refused (:class:`~daskrun.ConfigError`), naming the
        first."""
        path = cls.path()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return FileLock(
            path.with_name(f".{path.name}.starting"),
            f"'daskrun cluster start' in process {os.getpid()}",
            lambda holder: ConfigError(
                f"a cluster is being started already, by {holder or 'another'}; "
                "see 'daskrun cluster status' once it has started"
            ),
            remove=True,
        )

    @classmethod
    def find(cls) -> SharedCluster | None:
        """The running shared cluster, if any (a stale file is removed).

        The file is trusted only if it is the user's own: a regular file
        owned by them, mode 0600, in a folder no one else may write to (or a
        sticky one, like /tmp). Anything else is refused (a
        :class:`~daskrun.ConfigError` naming it): a file another user
        planted would send the job's inputs, and its code, to their port.
        """
        path = cls.path()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:  # a symbolic link (ELOOP), unreadable
            raise _untrusted(path, e.strerror or str(e)) from None
        with os.fdopen(fd) as f:
            _check_own_file(path, os.fstat(f.fileno()))
            try:
                found = cls(**json.loads(f.read()))
            except (OSError, ValueError, TypeError):
                return None
        if not _is_server(found.pid):
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return found

    def save(self) -> None:
        path = self.path()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_own_folder(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(self), f)
        os.replace(tmp, path)

    def security(self) -> Security:
        return Security(
            tls_ca_file=self.ca,
            tls_client_cert=self.cert,
            tls_client_key=self.key,
            require_encryption=True,
        )

    def client(self) -> Client:
        return answering_client(self.address, self.security())

    def describe(self) -> str:
        board = f", dashboard {self.dashboard}" if self.dashboard else ""
        return (
            f"{self.address}: {self.workers} worker processes, "
            f"served by process {self.pid}{board}"
        )


def _untrusted(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"daskrun.local-cluster.shared-file {path} is not safe to use: {why}; "
        "remove it, or set daskrun.local-cluster.shared-file (or "
        "DASK_DASKRUN__LOCAL_CLUSTER__SHARED_FILE) to a file in a folder of "
        "your own, then 'daskrun cluster start' again"
    )


def _check_own_file(path: Path, st: os.stat_result) -> None:
    """Refuse the shared-cluster file unless it is this user's alone."""
    uid = os.getuid()
    if not stat.S_ISREG(st.st_mode):
        raise _untrusted(path, "it is not a regular file")
    if st.st_uid != uid:
        raise _untrusted(path, f"it is owned by uid {st.st_uid}, not by you ({uid})")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise _untrusted(path, f"its mode is {stat.S_IMODE(st.st_mode):04o}, not 0600")
    _check_own_folder(path)


def _check_own_folder(path: Path) -> None:
    """Refuse a folder where another user may replace the file: one they
    own, or one they may write to that is not sticky."""
    folder = path.parent
    st = folder.stat()
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (os.getuid(), 0):
        raise _untrusted(path, f"its folder {folder} is owned by uid {st.st_uid}")
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise _untrusted(
            path, f"its folder {folder} (mode {mode:04o}) is writable by others"
        )


def _is_server(pid: int) -> bool:
    """Whether ``pid`` is a running ``daskrun cluster serve`` (not a process
    that got its number since)."""
    try:
        argv = psutil.Process(pid).cmdline()
    except (psutil.Error, OSError):
        return False
    return "cluster" in argv and "serve" in argv


def serve_shared_cluster(processes: int) -> None:
    """Run a local cluster of ``processes`` workers and publish it as the
    shared one until SIGTERM or SIGINT: ``daskrun cluster serve``, started
    in the background by ``daskrun cluster start``."""
    running = SharedCluster.find()
    if running is not None:  # 'daskrun cluster start' checks it too
        raise ConfigError(f"a cluster is already running at {running.describe()}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log = SharedCluster.log_path()
    with gc_paused():
        started = local_cluster(processes, log_file=log)
        client = started.__enter__()
    try:
        security = client.security
        SharedCluster(
            address=str(client.scheduler_info()["address"]),
            pid=os.getpid(),
            workers=processes,
            dashboard=dashboard_link(client),
            ca=security.tls_ca_file,
            cert=security.tls_client_cert,
            key=security.tls_client_key,
        ).save()
        while not stop.wait(1.0) and client.status == "running":
            pass
    finally:
        with contextlib.suppress(OSError):
            SharedCluster.path().unlink()
        with gc_paused():
            started.__exit__(None, None, None)


def stop_shared_cluster(timeout: float = 60.0) -> SharedCluster | None:
    """Stop the shared cluster, if one runs, and wait for its process to end."""
    shared = SharedCluster.find()
    if shared is None:
        return None
    process = psutil.Process(shared.pid)
    process.terminate()
    try:
        process.wait(timeout)
    except psutil.TimeoutExpired:
        process.kill()
    with contextlib.suppress(OSError):
        SharedCluster.path().unlink()
    return shared


@contextlib.contextmanager
def shared_client(shared: SharedCluster) -> Iterator[Client]:
    try:
        client = shared.client()
    except (OSError, TimeoutError) as e:
        raise JobFailedError(
            f"the cluster of 'daskrun cluster start' at {shared.address} does not "
            f"answer ({e}); restart it with 'daskrun cluster stop' and "
            "'daskrun cluster start'"
        ) from None
    with client:
        yield client
