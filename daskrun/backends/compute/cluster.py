"""Clusters: the workers a step runs on, and the client that reaches them.

:func:`connect` takes what a step's ``compute_target`` resolves to. ``None``
starts a local cluster of single-threaded worker processes bound to
127.0.0.1, reachable only with TLS certificates made for it (no other local
user gets in), and closes it afterwards. A scheduler address, a
``distributed.Client`` or a Dask cluster object (``LocalCluster``,
``dask_jobqueue.SLURMCluster``, ``dask_cuda.LocalCUDACluster``…) is used as
given and left running. Anything else with a ``connect(node_count,
process_count_per_node, on_lost, log_file)`` context manager (a
:class:`~daskrun.ComputeTarget` registered in a workspace, see
:mod:`daskrun.registry.compute`) connects itself, through the helpers here.

This is the engine's side: it imports no registry module (workspace, run
records, compute targets), and daskrun's local workers import it for
:class:`QuickExit`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import multiprocessing
import multiprocessing.spawn
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, runtime_checkable

import dask.config
import psutil
from distributed import Client, LocalCluster, WorkerPlugin
from distributed.comm import connect as comm_connect
from distributed.core import Status
from distributed.security import Security
from distributed.worker_memory import parse_memory_limit

from daskrun.backends.compute.jobqueue import (
    WorkerWatch,
    is_jobqueue_cluster,
    jobqueue_client,
)
from daskrun.backends.storage import FileLock
from daskrun.engine.config import config_get
from daskrun.exceptions import (
    ClusterLostError,
    ConfigError,
    DaskRunError,
    JobFailedError,
)
from daskrun.monitoring.dashboard import serve_dashboard_on_demand
from daskrun.monitoring.handlers import log_distributed_only_to

logger = logging.getLogger("daskrun")

_P = ParamSpec("_P")
_T = TypeVar("_T")


@runtime_checkable
class ClusterSource(Protocol):
    """A compute target that connects itself, such as a registered
    :class:`~daskrun.ComputeTarget`: :func:`connect` hands it the step's
    sizes and yields the client its ``connect`` yields."""

    def connect(
        self,
        node_count: int,
        process_count_per_node: int | None,
        on_lost: Callable[[str], None] | None = None,
        log_file: str | os.PathLike[str] | None = None,
    ) -> contextlib.AbstractContextManager[Client]: ...


def gpu_count() -> int:
    """NVIDIA GPUs this process may use (``CUDA_VISIBLE_DEVICES``, else
    ``nvidia-smi -L``); 0 without any."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() not in ("", "-1")])
    return _listed_gpus()


@functools.cache
def _listed_gpus() -> int:
    """``nvidia-smi -L``'s GPUs, asked once per process (a subprocess)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        done = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return done.stdout.count("GPU ") if done.returncode == 0 else 0


def cpu_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_process_count() -> int:
    """One worker process per GPU on a GPU machine, else one per core."""
    return gpu_count() or cpu_cores()


class _Nested:
    """A context manager that nests and overlaps across threads: ``_first()``
    runs as the first holder enters, ``_last()`` as the last one leaves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._first()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._last()

    def _first(self) -> None:
        pass

    def _last(self) -> None:
        pass


class _GcPause(_Nested):
    """Keeps the cyclic garbage collector off while clients start and stop.

    distributed's event loop runners share one lock, held while a client's
    loop thread starts or stops. If the collector frees an unreachable client
    (one whose start failed, say) in that thread meanwhile, its ``close()``
    waits for the same lock for ever. Nested and concurrent pauses count, so
    the collector comes back with the last one, as it was before the first.
    """

    _was_enabled = False

    def _first(self) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()

    def _last(self) -> None:
        if self._was_enabled:
            gc.enable()


_gc_paused = _GcPause()


def _start_and_stop_gc_paused(
    factory: Callable[_P, contextlib.AbstractContextManager[_T]],
) -> Callable[_P, contextlib.AbstractContextManager[_T]]:
    """A context manager entered and exited with the collector paused (see
    :class:`_GcPause`), its body run as usual."""

    @functools.wraps(factory)
    @contextlib.contextmanager
    def paused(*args: _P.args, **kwargs: _P.kwargs) -> Iterator[_T]:
        inner = factory(*args, **kwargs)
        with _gc_paused():
            value = inner.__enter__()
        try:
            yield value
        except BaseException:
            with _gc_paused():
                if not inner.__exit__(*sys.exc_info()):
                    raise
        else:
            with _gc_paused():
                inner.__exit__(None, None, None)

    return paused


@_start_and_stop_gc_paused
@contextlib.contextmanager
def connect(
    compute_target: Any,
    node_count: int,
    process_count_per_node: int | None,
    on_lost: Callable[[str], None] | None = None,
    security: Any = None,
    log_file: str | os.PathLike[str] | None = None,
) -> Iterator[Client]:
    """Yield a client for ``compute_target``; clean up only what was started.
    The client is never made the process's default one: the user's own
    Dask code keeps its scheduler.

    On a batch queue, ``on_lost(reason)`` is called when every worker is gone
    for ``daskrun.jobqueue.start-timeout`` seconds. The worker processes of a
    local cluster log distributed's lines to ``log_file``; local workers that
    do not start within ``daskrun.local-cluster.start-timeout`` seconds fail
    the step (:class:`~daskrun.JobFailedError`).
    """
    if compute_target is None and (shared := SharedCluster.find()) is not None:
        # started by 'daskrun cluster start': used as it is, left running
        with (
            _few_messages(),
            _shared_client(shared) as client,
            _lost_mid_job(client, shared.address, shared.security()),
        ):
            _route_worker_logs(client, log_file)
            yield client
    elif compute_target is None:
        n = node_count * (process_count_per_node or default_process_count())
        with _warm.lease(n, log_file) as client:
            yield client
    elif is_jobqueue_cluster(compute_target):
        with _on_queue(
            compute_target, node_count, process_count_per_node, on_lost, close=False
        ) as client:
            yield client
    elif isinstance(compute_target, Client):
        yield compute_target
    elif isinstance(compute_target, str):
        with _few_messages(), _scheduler(compute_target, security) as client:
            yield client
    elif hasattr(compute_target, "scheduler_address"):
        with (
            _few_messages(),
            Client(compute_target, set_as_default=False) as client,
        ):
            yield client
    elif isinstance(compute_target, ClusterSource):
        # after the Dask objects above, none of which has a connect()
        with compute_target.connect(
            node_count, process_count_per_node, on_lost, log_file
        ) as client:
            yield client
    else:
        raise ConfigError(
            f"compute_target={compute_target!r} is not a compute target; use None, "
            "a scheduler address like 'tcp://127.0.0.1:8786', a distributed.Client, "
            "a Dask cluster object or a registered ComputeTarget"
        )


class EarlyStart(Generic[_T]):
    """A context manager entered in a thread of its own from now on, so that
    what it starts (a local cluster: worker processes importing distributed)
    comes up while this thread goes on (a job plans its mini-batches).

    :meth:`use` waits for it and yields what it gave, or raises what it
    raised, where the caller would have entered it, then exits it as a
    ``with`` would; :meth:`close` ends one never used. Either waits for the
    start to finish first, so nothing it started is left behind.
    """

    def __init__(self, manager: contextlib.AbstractContextManager[_T]):
        self._manager = manager
        self._value: _T | None = None
        self._error: BaseException | None = None
        self._entered = False
        self._thread = threading.Thread(
            target=self._enter, name="daskrun-early-start", daemon=True
        )
        self._thread.start()

    def _enter(self) -> None:
        try:
            self._value = self._manager.__enter__()
            self._entered = True
        except BaseException as e:  # raised in use()
            self._error = e

    @contextlib.contextmanager
    def use(self) -> Iterator[_T]:
        try:
            self._thread.join()
        except BaseException:  # a KeyboardInterrupt while it starts
            self.close()
            raise
        if self._error is not None:
            raise self._error
        self._entered = False  # exited below, whatever happens
        try:
            yield self._value  # type: ignore[misc]  # set: no error
        except BaseException:
            if not self._manager.__exit__(*sys.exc_info()):
                raise
        else:
            self._manager.__exit__(None, None, None)

    def close(self) -> None:
        """End what was started, unless :meth:`use` has it."""
        self._thread.join()
        if self._entered:
            self._entered = False
            self._manager.__exit__(None, None, None)


@contextlib.contextmanager
def _local_cluster(
    n: int,
    memory_limit: str | None = None,
    dashboard_address: str | None = None,
    log_file: str | os.PathLike[str] | None = None,
) -> Iterator[Client]:
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # some other process of the user's imports their script, which
        # starts a job again at import time (daskrun's own workers do not
        # import it, see _MainHidden)
        raise ConfigError(
            "a local cluster was started while a worker process imported "
            "your script; put the code that runs the step under "
            "'if __name__ == \"__main__\":'"
        )
    start_seconds = start_timeout()
    memory_limit = _memory_limit(
        memory_limit or config_get("local-cluster.memory-limit"),
        "memory_limit" if memory_limit else "daskrun.local-cluster.memory-limit",
    )
    # A worker that dies (a run() stopped for its timeout, a memory kill)
    # fails its task at once, since daskrun counts tries itself; and each
    # worker holds only the task it runs, so a death charges no other.
    options: dict[str, Any] = dict(
        n_workers=0,  # started below, see _few_messages()
        # Any local user may connect to a port on 127.0.0.1, and a client of
        # the scheduler runs code as the job's user. With TLS and certificates
        # made for this cluster, held in memory by this process and handed to
        # its workers through their start pipes, only they get in. The
        # dashboard's HTTP server does not use them: it stays plain HTTP.
        security=Security.temporary(),
        threads_per_worker=1,
        host=config_get("local-cluster.host"),
        dashboard_address=dashboard_address
        or config_get("local-cluster.dashboard-address"),
        memory_limit=memory_limit,
        # Bokeh is imported on the dashboard's first visit, not before the
        # workers start (see serve_dashboard_on_demand)
        scheduler_kwargs={"dashboard": False},
        # a Nanny gives up a worker process that has not joined by then (its
        # start would otherwise hold the cluster, and its close, for ever);
        # lifted once they have joined, see _wait_for_workers
        death_timeout=start_seconds,
        **_worker_log_options(log_file),
    )
    # from the first worker's start to the last one's end, restarts included
    with _main_hidden():
        with dask.config.set(
            {
                "distributed.scheduler.allowed-failures": 0,
                "distributed.scheduler.worker-saturation": 1.0,
            }
        ):
            cuda = _cuda_cluster_class() if gpu_count() else None
            if cuda is not None:
                # one worker per GPU, each with its own CUDA_VISIBLE_DEVICES
                cluster = cuda(**{**options, "n_workers": n})
            else:
                cluster = LocalCluster(processes=True, **options)
        try:
            with (
                _few_messages(),
                # before the workers: a client made later waits for them all
                # to start, for ever if one never does
                Client(
                    cluster, security=options["security"], set_as_default=False
                ) as client,
            ):
                # each worker gets the plugin when it joins, before the
                # entry script's, so the plugin's hook runs last
                client.register_plugin(QuickExit())
                cluster.scale(n)
                if options["dashboard_address"]:
                    serve_dashboard_on_demand(client)
                _wait_for_workers(cluster, client, n, start_seconds, log_file)
                yield client
        finally:
            cluster.close()


class _WarmClusters:
    """daskrun's local clusters, kept running between jobs while wanted.

    A job leases a cluster of its size: an idle one started for an earlier
    job with the same settings, else a new one. When the job ends, the
    cluster is closed, unless clusters are kept warm (inside
    :func:`keep_warm`, as a Pipeline's steps are, or with
    ``daskrun.local-cluster.keep-warm``); then it waits, idle, for the next
    job, until the last ``keep_warm`` block ends, :func:`close_warm_clusters`
    is called or the process exits. A job that raised closes its cluster
    all the same: its workers' state is unknown. At most one cluster is
    kept idle.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[
            tuple[Any, contextlib.AbstractContextManager[Client], Client]
        ] = []
        self._holders = 0  # keep_warm() blocks open
        self._atexit = False

    def wanted(self) -> bool:
        return self._holders > 0 or bool(config_get("local-cluster.keep-warm"))

    @contextlib.contextmanager
    def lease(
        self, n: int, log_file: str | os.PathLike[str] | None
    ) -> Iterator[Client]:
        key = (n, repr(config_get("local-cluster")))
        with self._lock:
            found = [entry for entry in self._idle if entry[0] == key]
            stale = [entry for entry in self._idle if entry[0] != key]
            self._idle = []
        self._close(stale)
        if found:
            _, cm, client = found[0]
            _route_worker_logs(client, log_file)
        else:
            cm = _local_cluster(n, log_file=log_file)
            client = cm.__enter__()
        try:
            yield client
        except BaseException:
            cm.__exit__(*sys.exc_info())
            raise
        if not self.wanted():
            cm.__exit__(None, None, None)
            return
        with self._lock:
            self._idle.append((key, cm, client))
            if not self._atexit:
                atexit.register(self.close)
                self._atexit = True

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                last = self._holders == 0
            if last and not config_get("local-cluster.keep-warm"):
                self.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        self._close(idle)

    def _close(self, entries: list[Any]) -> None:
        for _, cm, _ in entries:
            with _gc_paused():
                cm.__exit__(None, None, None)


_warm = _WarmClusters()


def keep_warm() -> contextlib.AbstractContextManager[None]:
    """Within this block, daskrun's local cluster stays up between jobs,
    and is closed when the block ends.

    >>> with daskrun.keep_warm():  # doctest: +SKIP
    ...     first = step.run()     # starts the cluster
    ...     second = step.run()    # the same worker processes, warm
    """
    return _warm.held()


def close_warm_clusters() -> None:
    """Close the local clusters kept warm (``daskrun.local-cluster.keep-warm``)
    that no job is using."""
    _warm.close()


def _route_worker_logs(client: Client, log_file: str | os.PathLike[str] | None) -> None:
    """Send the warm workers' distributed log lines to this job's file."""
    if log_file is not None:
        client.run(log_distributed_only_to, os.fspath(log_file))


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
    with _gc_paused():
        started = _local_cluster(processes, log_file=log)
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
        with _gc_paused():
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


def start_timeout() -> float:
    """``daskrun.local-cluster.start-timeout``, checked."""
    return _seconds("local-cluster.start-timeout", 60)


def connect_timeout() -> float:
    """``daskrun.connect-timeout``, checked."""
    return _seconds("connect-timeout", 10)


def _seconds(key: str, example: int) -> float:
    value = config_get(key)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        env = "DASK_DASKRUN__" + key.upper().replace("-", "_").replace(".", "__")
        raise ConfigError(
            f"daskrun.{key}={value!r} is not a number of seconds; set it to "
            f"e.g. {example} ({env}={example})"
        )
    return seconds


def _memory_limit(value: Any, name: str) -> Any:
    """``value`` if distributed reads it as a memory limit; a worker started
    with one it cannot read fails in the cluster's event loop instead."""
    try:
        parse_memory_limit(value, 1, logger=logger)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name}={value!r} is not a memory size per worker process; use "
            "e.g. '4GB', 'auto' (this machine's memory shared between them) or 0 "
            "(no limit)"
        ) from None
    return value


def _wait_for_workers(
    cluster: Any,
    client: Client,
    n: int,
    timeout: float,
    log_file: str | os.PathLike[str] | None,
) -> None:
    """Wait for ``n`` workers to join, ``timeout`` seconds at most, and fail
    as soon as one of the worker processes failed to start."""
    where = f"see {log_file}" if log_file is not None else "see the log lines above"
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.wait_for_workers(n, timeout=min(0.5, timeout))
        except TimeoutError:
            pass
        else:
            for nanny in list(cluster.workers.values()):
                # a restarted worker runs init() again as it starts, which
                # has a timeout of its own (3 × run_invocation_timeout + 30)
                nanny.death_timeout = None
            return
        nannies = list(cluster.workers.values())
        failed = [w for w in nannies if w.status == Status.failed]
        if failed:
            cause = cluster.sync(_start_error, failed[0])
            raise JobFailedError(
                f"{len(failed)} of {n} local worker processes failed to start: "
                f"{cause}; {where}"
            )
        if time.monotonic() > deadline:
            joined = len(client.scheduler_info(n_workers=-1)["workers"])
            raise JobFailedError(
                f"{joined} of {n} local workers started within "
                f"daskrun.local-cluster.start-timeout={timeout:g} s; {where}, or "
                "raise the timeout if the machine is busy (e.g. "
                f"DASK_DASKRUN__LOCAL_CLUSTER__START_TIMEOUT={4 * timeout:g})"
            )


async def _start_error(server: Any) -> str:
    """Why ``server`` (a Nanny whose start failed) failed: awaiting a failed
    server raises its start's exception again; the innermost one is the
    worker process's own."""
    try:
        await server
    except Exception as e:
        error: BaseException = e
        while error.__cause__ is not None:
            error = error.__cause__
        text = f"{type(error).__name__}: {error}"
        if str(error) == "Nanny failed to start worker process":
            text += " (the process ended before it could say why)"
        return text
    return "it started after all"


def _worker_log_options(log_file: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Nanny options that send each worker process's distributed log lines
    to ``log_file``, from the moment its worker is made.

    A preload with a space in it is Python code that the worker runs as it
    is made; ours comes first, so that a failing preload of the user's
    (``distributed.worker.preload``) is logged to the file too.
    """
    if log_file is None:
        return {}
    code = (
        "from daskrun.monitoring.handlers import log_distributed_to; "
        f"log_distributed_to({os.fspath(log_file)!r})"
    )
    preload = list(dask.config.get("distributed.worker.preload") or [])
    argv = list(dask.config.get("distributed.worker.preload-argv") or [])
    if argv and not isinstance(argv[0], str):  # one list of arguments each
        argv = [[], *argv]
    return {"preload": [code, *preload], "preload_argv": argv}


# multiprocessing's name for the worker process of a distributed Nanny
_NANNY_PROCESS = "Dask Worker process (from Nanny)"


class _MainHidden(_Nested):
    """Keeps the user's main module out of daskrun's worker processes.

    A process started with ``spawn`` (distributed's default) runs its
    parent's main script again, as ``__mp_main__``, before its target: a
    script that runs a step at module level, without ``if __name__ ==
    "__main__":``, would start a step in every worker, and ``python - <
    job.py`` names a file ``<stdin>`` that does not exist. daskrun's workers
    need nothing from it: the entry script travels inside the plugin, and
    cloudpickle sends functions of ``__main__`` by value. So while one of
    daskrun's local clusters is up, the preparation data that
    multiprocessing sends to a Nanny's worker process names no main module
    (a user's own Nanny starting meanwhile is spared it too); otherwise it
    is multiprocessing's own.

    Neither other start method would do: ``forkserver``'s children run the
    main script again all the same (its preparation data is the same), and
    ``fork`` copies a client whose threads (the event loop's, TensorFlow's)
    may hold locks that then stay held in the child for ever.
    """

    _installed = False

    def _first(self) -> None:
        if not self._installed:  # for good: it is a no-op while not entered
            multiprocessing.spawn.get_preparation_data = functools.partial(
                self._preparation_data, multiprocessing.spawn.get_preparation_data
            )
            self._installed = True

    def _preparation_data(
        self, original: Callable[..., dict[str, Any]], name: str, *args: Any
    ) -> dict[str, Any]:
        data = original(name, *args)
        if self._depth and name == _NANNY_PROCESS:
            data.pop("init_main_from_name", None)
            data.pop("init_main_from_path", None)
        return data


_main_hidden = _MainHidden()


class QuickExit(WorkerPlugin):
    """Ends a worker process of daskrun's own local cluster without
    tearing down its modules once the worker has closed.

    A closed worker has run every plugin's teardown (the script's
    ``shutdown()``) and removed its folder; what is left is the interpreter
    freeing its modules one by one, 0.75 s for a process that imported
    TensorFlow, paid by every step while its cluster closes. The hook is
    registered when the worker starts, before the entry script's ``init()``,
    and atexit runs hooks last-registered first, so the script's and
    libraries' own exit hooks still run before it. A worker that did not
    close normally exits the usual way, with its own exit status.
    """

    name = "daskrun-quick-exit"

    def setup(self, worker: Any) -> None:
        atexit.register(_exit_if_closed, worker)


def _exit_if_closed(worker: Any) -> None:
    if worker.status != Status.closed:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _few_messages() -> contextlib.AbstractContextManager[Any]:
    """distributed keeps the last 1000 messages of each connection for
    debugging, and the messages hold whole tasks: every mini-batch's paths, so
    a million-file job kept another copy of its path list. Connections opened
    under this (daskrun's client's; its own scheduler's to the workers) keep a
    few. The setting is read when a connection opens, so the scheduler, made
    before, keeps its usual event history for the dashboard."""
    return dask.config.set({"distributed.admin.low-level-log-length": 16})


@contextlib.contextmanager
def _on_queue(
    cluster: Any,
    node_count: int,
    process_count_per_node: int | None,
    on_lost: Callable[[str], None] | None,
    close: bool,
) -> Iterator[Client]:
    timeout = float(config_get("jobqueue.start-timeout"))
    with jobqueue_client(
        cluster, node_count, process_count_per_node, timeout, close=close
    ) as client:
        if on_lost is None:
            yield client
            return
        found = re.search(r"(?:-t|--time)[ =](\S+)", cluster.job_header)
        walltime = found.group(1) if found else "?"
        with WorkerWatch(client, timeout, on_lost, f"walltime={walltime}"):
            yield client


def _cuda_cluster_class() -> Any:
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        logger.warning(
            "GPUs found but dask-cuda is not installed; workers are not pinned "
            "to GPUs (pip install 'daskrun[cuda]')"
        )
        return None
    return LocalCUDACluster


@contextlib.contextmanager
def _scheduler(address: str, security: Any = None) -> Iterator[Client]:
    if address.startswith("tls://") and security is None:
        raise ConfigError(
            f"compute_target={address!r} is a TLS scheduler; pass its certificates "
            "with ParallelRunConfig(security=distributed.security.Security(...))"
        )
    fix = "start a scheduler there, or use compute_target=None for a local cluster"
    try:
        client = answering_client(address, security)
    except TimeoutError as e:
        raise ConfigError(f"compute_target={address!r} {e}; {fix}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"compute_target={address!r} cannot be reached ({e}); {fix}"
        ) from None
    with client, _lost_mid_job(client, address, security):
        yield client


@contextlib.contextmanager
def _shared_client(shared: SharedCluster) -> Iterator[Client]:
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


def answering_client(address: str, security: Security | None = None) -> Client:
    """A client of the scheduler at ``address``, once it has answered.

    distributed bounds the connection's opening but not the handshake
    after it: a port that accepts connections and never answers (a frozen
    scheduler, something else listening) holds ``Client(...)`` for ever.
    So the scheduler is asked who it is first, within
    ``daskrun.connect-timeout`` seconds, and a silent one raises
    :class:`TimeoutError` saying so.
    """
    seconds = connect_timeout()
    outcome: list[BaseException | None] = []

    def probe() -> None:  # a loop of its own: the caller's may be running
        try:
            _ask_identity(address, security, seconds)
            outcome.append(None)
        except BaseException as e:  # raised below, in the caller's thread
            outcome.append(e)

    thread = threading.Thread(target=probe, name="daskrun-connect", daemon=True)
    thread.start()
    thread.join()
    error = outcome[0] if outcome else RuntimeError("the probe did not run")
    if isinstance(error, TimeoutError):
        raise TimeoutError(
            f"did not answer within daskrun.connect-timeout={seconds:g} s"
        ) from None
    if error is not None:
        raise error
    return Client(address, security=security, timeout=seconds, set_as_default=False)


def _ask_identity(address: str, security: Security | None, seconds: float) -> None:
    """Ask the scheduler at ``address`` who it is, on a connection of its
    own, in an event loop of its own; :class:`TimeoutError` if it has not
    answered within ``seconds``."""
    args = security.get_connection_args("client") if security is not None else {}

    async def ask() -> None:
        comm = await comm_connect(address, timeout=seconds, **args)
        try:
            await comm.write({"op": "identity", "reply": True})
            await comm.read()
        finally:
            comm.abort()

    asyncio.run(asyncio.wait_for(ask(), seconds))


class _SchedulerWatch:
    """Notices that the scheduler of a cluster the job does not own (the
    shared one, a scheduler address) died or froze while the job runs.

    A client notices a scheduler that died (its connection closes), but not
    one that froze (stopped, or stuck): the connection stays open, and the
    job would wait for results for ever. So a thread asks the scheduler
    who it is every second, on a connection of its own; one that has not
    answered within ``daskrun.connect-timeout`` seconds counts as lost, and
    the client's connection to it is dropped, which hands every pending
    task back to the job as lost at once. :meth:`lost` says whether either
    happened.
    """

    def __init__(self, client: Client, address: str, security: Any):
        self.client, self.address, self.security = client, address, security
        self._silent = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="daskrun-scheduler-watch", daemon=True
        )

    def __enter__(self) -> _SchedulerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def lost(self) -> bool:
        return self._silent or self.client.status != "running"

    def _watch(self) -> None:
        seconds = connect_timeout()
        while not self._stop.wait(1.0):
            if self.client.status != "running":
                return  # closing, or its connection closed: lost() says so
            try:
                _ask_identity(self.address, self.security, seconds)
            except Exception:
                if self._stop.is_set():
                    return
                self._silent = True
                if self.client.loop is not None:
                    self.client.loop.add_callback(_drop_scheduler, self.client)
                return


def _drop_scheduler(client: Client) -> None:
    """Close ``client``'s connection to its scheduler (in its event loop):
    distributed then cancels every future it holds, as on a connection
    that broke."""
    stream = client.scheduler_comm
    if stream is not None and stream.comm is not None:
        stream.comm.abort()


@contextlib.contextmanager
def _lost_mid_job(client: Client, address: str, security: Any) -> Iterator[None]:
    """Turn whatever a job raises once the scheduler at ``address`` died or
    froze into one :class:`~daskrun.ClusterLostError`."""
    with _SchedulerWatch(client, address, security) as watch:
        try:
            yield
        except (Exception, asyncio.CancelledError) as e:
            if isinstance(e, DaskRunError) and not isinstance(e, JobFailedError):
                raise
            if isinstance(e, ClusterLostError) or not watch.lost():
                raise
            raise ClusterLostError(address) from None


def dashboard_link(client: Client) -> str | None:
    """The Dask dashboard's URL, if the scheduler serves one."""
    try:
        return client.dashboard_link
    except Exception:  # no dashboard (bokeh missing or disabled)
        return None
