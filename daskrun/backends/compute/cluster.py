"""Clusters: the workers a step runs on, and the client that reaches them.

:func:`connect` takes what a step's ``compute_target`` resolves to. ``None``
starts a local cluster of single-threaded worker processes bound to
127.0.0.1, reachable only with TLS certificates made for it (no other local
user gets in), and closes it afterwards, unless it is kept warm; when
``daskrun cluster start`` has run, the shared cluster is used instead
(:func:`~daskrun.backends.compute.targets.default_target`). A scheduler address, a
``distributed.Client`` or a Dask cluster object (``LocalCluster``,
``dask_jobqueue.SLURMCluster``, ``dask_cuda.LocalCUDACluster``…) is used as
given and left running (a batch queue's or a ``dask_gateway.GatewayCluster``
scaled to the step's workers first, and a ``dask_kubernetes.KubeCluster``
too). Anything else with a ``connect(node_count,
process_count_per_node, on_lost, log_file)`` context manager (a
:class:`~daskrun.ComputeTarget` registered in a workspace, see
:mod:`daskrun.registry.compute`) connects itself, through the helpers here.

Its helpers, one module each::

    local       daskrun's own local clusters, kept warm between jobs
    shared      the shared cluster of 'daskrun cluster start'
    scheduler   a scheduler reached by address, watched while a job runs
    jobqueue    batch queues through dask-jobqueue (Slurm, PBS, ...)
    gateway     clusters asked of a Dask Gateway
    queues      PBS and SGE batch queues as registered targets
    mpi         the ranks of an mpirun allocation (dask-mpi)
    objects     a ready cluster object (KubeCluster), scaled to the step
    machine     GPUs and cores here, and the configured time bounds
    targets     one class per kind of registered compute target

This is the engine's side: it imports no registry module (workspace, run
records, compute targets).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from distributed import Client

from daskrun.backends.compute.gateway import is_gateway_cluster, user_gateway_cluster
from daskrun.backends.compute.jobqueue import is_jobqueue_cluster, on_queue
from daskrun.backends.compute.local import (
    QuickExit,
    close_warm_clusters,
    few_messages,
    keep_warm,
    start_and_stop_gc_paused,
)
from daskrun.backends.compute.machine import (
    connect_timeout,
    cpu_cores,
    default_process_count,
    gpu_count,
    start_timeout,
)
from daskrun.backends.compute.objects import ClusterObject, is_kubernetes_cluster
from daskrun.backends.compute.scheduler import (
    answering_client,
    dashboard_link,
    scheduler_client,
)
from daskrun.backends.compute.shared import (
    SharedCluster,
    serve_shared_cluster,
    stop_shared_cluster,
)
from daskrun.backends.compute.targets import ComputeBackend, default_target
from daskrun.exceptions import ConfigError

_T = TypeVar("_T")

__all__ = [
    "ClusterSource",
    "EarlyStart",
    "QuickExit",
    "SharedCluster",
    "answering_client",
    "close_warm_clusters",
    "connect",
    "connect_timeout",
    "cpu_cores",
    "dashboard_link",
    "default_process_count",
    "gpu_count",
    "keep_warm",
    "serve_shared_cluster",
    "start_timeout",
    "stop_shared_cluster",
]


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


@start_and_stop_gc_paused
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
    if compute_target is None:
        compute_target = default_target()
    elif is_kubernetes_cluster(compute_target):  # scaled to the step, left running
        compute_target = ClusterObject(compute_target)
    if isinstance(compute_target, ComputeBackend):
        with compute_target.connect(
            node_count, process_count_per_node, on_lost, log_file
        ) as client:
            yield client
    elif is_jobqueue_cluster(compute_target):
        with on_queue(
            compute_target, node_count, process_count_per_node, on_lost, close=False
        ) as client:
            yield client
    elif is_gateway_cluster(compute_target):
        n = node_count * (process_count_per_node or 1)
        with few_messages(), user_gateway_cluster(compute_target, n) as client:
            yield client
    elif isinstance(compute_target, Client):
        yield compute_target
    elif isinstance(compute_target, str):
        with few_messages(), scheduler_client(compute_target, security) as client:
            yield client
    elif hasattr(compute_target, "scheduler_address"):
        with (
            few_messages(),
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
