"""daskrun's own local clusters: single-threaded worker processes bound to
127.0.0.1, reachable only with TLS certificates made for them, started for
a job and kept warm between jobs while wanted (:func:`keep_warm`).

daskrun's local workers import this module for :class:`QuickExit`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import logging
import multiprocessing
import multiprocessing.spawn
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import dask.config
from distributed import Client, LocalCluster, Nanny, WorkerPlugin
from distributed.core import Status
from distributed.deploy.cluster import Cluster
from distributed.security import Security
from distributed.worker_memory import parse_memory_limit

from daskrun.backends.compute.machine import (
    cuda_cluster_class,
    gpu_count,
    start_timeout,
)
from daskrun.engine.config import config_get
from daskrun.exceptions import ConfigError, JobFailedError
from daskrun.monitoring.dashboard import serve_dashboard_on_demand
from daskrun.monitoring.handlers import log_distributed_only_to

logger = logging.getLogger("daskrun")


_P = ParamSpec("_P")


_T = TypeVar("_T")


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


gc_paused = _GcPause()


def start_and_stop_gc_paused(
    factory: Callable[_P, contextlib.AbstractContextManager[_T]],
) -> Callable[_P, contextlib.AbstractContextManager[_T]]:
    """A context manager entered and exited with the collector paused (see
    :class:`_GcPause`), its body run as usual."""

    @functools.wraps(factory)
    @contextlib.contextmanager
    def paused(*args: _P.args, **kwargs: _P.kwargs) -> Iterator[_T]:
        inner = factory(*args, **kwargs)
        with gc_paused():
            value = inner.__enter__()
        try:
            yield value
        except BaseException:
            with gc_paused():
                if not inner.__exit__(*sys.exc_info()):
                    raise
        else:
            with gc_paused():
                inner.__exit__(None, None, None)

    return paused


@contextlib.contextmanager
def local_cluster(
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
    _malloc_trim_threshold()  # a bad value fails before any worker starts
    memory_limit = _memory_limit(
        memory_limit or config_get("local-cluster.memory-limit"),
        "memory_limit" if memory_limit else "daskrun.local-cluster.memory-limit",
    )
    # A worker that dies (a run() stopped for its timeout, a memory kill)
    # fails its task at once, since daskrun counts tries itself; and each
    # worker holds only the task it runs, so a death charges no other.
    options: dict[str, Any] = dict(
        n_workers=0,  # started below, see few_messages()
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
            cluster, labeled = _new_cluster(options, n)
        try:
            with (
                few_messages(),
                # before the workers: a client made later waits for them all
                # to start, for ever if one never does
                Client(
                    cluster, security=options["security"], set_as_default=False
                ) as client,
            ):
                # each worker gets the plugin when it joins, before the
                # entry script's, so the plugin's hook runs last
                client.register_plugin(QuickExit())
                if not labeled:
                    _label_pools(cluster, n)
                cluster.scale(n)
                if options["dashboard_address"]:
                    serve_dashboard_on_demand(client)
                _wait_for_workers(cluster, client, n, start_seconds, log_file)
                yield client
        finally:
            cluster.close()


def _new_cluster(options: dict[str, Any], n: int) -> tuple[Any, bool]:
    """A local cluster of no workers yet, or with GPUs a ``LocalCUDACluster``
    of ``n`` (one per GPU, each with its own ``CUDA_VISIBLE_DEVICES``, each
    holding the run pool's resource); whether its workers have their
    resources already."""
    cuda = cuda_cluster_class() if gpu_count() else None
    if cuda is None:
        return RestartingCluster(processes=True, worker_class=_Nanny, **options), False
    resources = pool_resources(1, gpus=True)[0]
    return cuda(**{**options, "n_workers": n, "resources": resources}), True


def pool_resources(n: int, gpus: bool = False) -> list[dict[str, float]]:
    """The Dask resources of the ``n`` worker processes of a local cluster:
    the pools of a step whose entry script has ``preprocess()``
    (:mod:`daskrun.engine.stages`). With GPUs, each worker holds one and
    runs ``run()``; else the first ``daskrun.preprocess.run-workers`` hold
    the run resource and the rest the CPU one; a lone worker holds both. A
    step without ``preprocess()`` asks for no resource: any worker runs it.

    >>> pool_resources(3)
    [{'GPU': 1}, {'CPU': 1}, {'CPU': 1}]
    >>> pool_resources(1)
    [{'GPU': 1, 'CPU': 1}]
    """
    run, cpu = (
        config_get("preprocess.run-resource"),
        config_get("preprocess.cpu-resource"),
    )
    if gpus:
        return [{run: 1} for _ in range(n)]
    if n == 1:
        return [{run: 1, cpu: 1}]
    wanted = config_get("preprocess.run-workers")
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
        raise ConfigError(
            f"daskrun.preprocess.run-workers={wanted!r} is not a number of "
            "worker processes; use an int like 1"
        )
    runs = min(wanted, n - 1)
    return [{run: 1} if i < runs else {cpu: 1} for i in range(n)]


def _label_pools(cluster: Any, n: int) -> None:
    """Give the ``n`` workers ``cluster`` is about to start their resources
    (:func:`pool_resources`); a worker its Nanny restarts keeps them."""
    for resources in pool_resources(n):
        ((name, spec),) = cluster.new_worker_spec().items()
        options = {**spec.get("options", {}), "resources": resources}
        cluster.worker_spec[name] = {**spec, "options": options}


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
        key = (n, repr(config_get("local-cluster")), repr(config_get("preprocess")))
        with self._lock:
            found = [entry for entry in self._idle if entry[0] == key]
            stale = [entry for entry in self._idle if entry[0] != key]
            self._idle = []
        self._close(stale)
        if found:
            _, cm, client = found[0]
            route_worker_logs(client, log_file)
        else:
            cm = local_cluster(n, log_file=log_file)
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
            with gc_paused():
                cm.__exit__(None, None, None)


warm = _WarmClusters()


def keep_warm() -> contextlib.AbstractContextManager[None]:
    """Within this block, daskrun's local cluster stays up between jobs,
    and is closed when the block ends.

    >>> with daskrun.keep_warm():  # doctest: +SKIP
    ...     first = step.run()     # starts the cluster
    ...     second = step.run()    # the same worker processes, warm
    """
    return warm.held()


def close_warm_clusters() -> None:
    """Close the local clusters kept warm (``daskrun.local-cluster.keep-warm``)
    that no job is using."""
    warm.close()


def route_worker_logs(client: Client, log_file: str | os.PathLike[str] | None) -> None:
    """Send the warm workers' distributed log lines to this job's file."""
    if log_file is not None:
        client.run(log_distributed_only_to, os.fspath(log_file))


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


class RestartingCluster(LocalCluster):
    """daskrun's own local cluster: each worker process that exits (a
    watchdog's timeout, a crash, a kill) is started again by its Nanny, for
    as long as the cluster lives.

    A ``SpecCluster`` also closes the Nanny of a worker the scheduler lost
    if, ``distributed.deploy.lost-worker-timeout`` (15 s) later, no worker
    of that name is connected: meant for workers that are gone, it caught
    workers restarting again and again (a mini-batch timing out on every
    try) between two lives, until no Nanny was left and the job waited for
    workers that would never come. Here the Nanny decides: the scheduler's
    bookkeeping of a removed worker is kept, its Nanny is not closed.
    """

    def _update_worker_status(self, op: str, msg: Any) -> None:
        if op == "remove":  # the Cluster's bookkeeping, not SpecCluster's
            Cluster._update_worker_status(self, op, msg)
            return
        super()._update_worker_status(op, msg)


class _Nanny(Nanny):
    """The Nanny of daskrun's own worker processes: without distributed's
    ``MALLOC_TRIM_THRESHOLD_`` unless ``daskrun.local-cluster.malloc-trim-threshold``
    sets one (see :func:`_malloc_trim_threshold`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        threshold = _malloc_trim_threshold()
        for env in (self.pre_spawn_env, self.env):
            if threshold is None:
                env.pop(_TRIM, None)
            else:
                env[_TRIM] = str(threshold)


_TRIM = "MALLOC_TRIM_THRESHOLD_"


def _malloc_trim_threshold() -> int | None:
    """``daskrun.local-cluster.malloc-trim-threshold``: ``None`` (the
    default) leaves glibc's malloc its own adaptive tuning in daskrun's
    worker processes; a number of bytes is their ``MALLOC_TRIM_THRESHOLD_``.

    distributed sets 65536 for every Nanny's worker, to give freed memory
    back to the system at once. Setting it also stops glibc raising its
    mmap threshold, so every array over 128 KiB is mapped, faulted in page
    by page and unmapped again: a step reading 16 MB CSV mini-batches with
    pandas spent 5 of its workers' 13 CPU seconds in the kernel. A worker
    process that sets no threshold reuses its freed memory instead.
    """
    value = config_get("local-cluster.malloc-trim-threshold")
    if value is None or (
        isinstance(value, int) and not isinstance(value, bool) and value >= 0
    ):
        return value
    raise ConfigError(
        f"daskrun.local-cluster.malloc-trim-threshold={value!r} is not a number "
        "of bytes; use null (glibc's own tuning) or an int like 65536"
    )


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


def few_messages() -> contextlib.AbstractContextManager[Any]:
    """distributed keeps the last 1000 messages of each connection for
    debugging, and the messages hold whole tasks: every mini-batch's paths, so
    a million-file job kept another copy of its path list. Connections opened
    under this (daskrun's client's; its own scheduler's to the workers) keep a
    few. The setting is read when a connection opens, so the scheduler, made
    before, keeps its usual event history for the dashboard."""
    return dask.config.set({"distributed.admin.low-level-log-length": 16})
