"""Compute targets as classes: one per kind of registered target, each with
its own ``connect()`` (as :mod:`daskrun.registry.datastores`' storage back
ends).

A registered compute target's row names its ``kind``; :data:`TARGETS` maps
that name to the class that connects it::

    ComputeBackend      the contract: connect(node_count, process_count_per_node,
    │                   on_lost, log_file); queued; runs_here
    ├── LocalProcesses      "local": a local cluster started for each step
    │   └── AmlProvisioned  "aml": the same, at most ``max_nodes`` nodes
    ├── SchedulerAddress    "scheduler": an existing scheduler, by address
    ├── SlurmJobs           "slurm": worker processes in Slurm batch jobs
    ├── GatewayClusters     "gateway": a cluster asked of a Dask Gateway
    ├── QueueJobs           (queues.py) PbsJobs "pbs", SgeJobs "sge"
    ├── MpiRanks            (mpi.py) "mpi": the ranks of this mpirun
    ├── ClusterObject       (objects.py, no kind) a ready cluster object,
    │                       e.g. a KubeCluster, scaled to the step
    ├── WarmLocal           (no compute_target) daskrun's local cluster,
    │                       kept warm between jobs while wanted
    └── SharedLocal         (no compute_target, 'daskrun cluster start'
                            has run) the shared cluster, left running

The last two have no ``kind``: they are not registered, but what
:func:`default_target` gives a step without a ``compute_target``.

A new kind of target is one new subclass with its own ``kind``, in a module
of its own that :mod:`daskrun.registry.compute` imports. This is the engine's
side: the registry's :class:`~daskrun.ComputeTarget` builds one of these from
its row, with plain options.
"""

from __future__ import annotations

import contextlib
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import dask.utils
from distributed import Client

from daskrun.backends.compute.gateway import GatewayAccess, gateway_client
from daskrun.backends.compute.jobqueue import on_queue
from daskrun.backends.compute.local import (
    few_messages,
    local_cluster,
    route_worker_logs,
    warm,
)
from daskrun.backends.compute.machine import default_process_count
from daskrun.backends.compute.scheduler import lost_mid_job, scheduler_client
from daskrun.backends.compute.shared import SharedCluster, shared_client
from daskrun.engine.config import config_get
from daskrun.exceptions import ConfigError

# kind name -> target class; filled by ComputeBackend.__init_subclass__
TARGETS: dict[str, type[ComputeBackend]] = {}


def compute_backend(kind: str, name: str, options: Mapping[str, Any]) -> ComputeBackend:
    """The back end of a compute target row: ``TARGETS[kind](...)``, or a
    ConfigError naming the kinds this daskrun knows.

    >>> compute_backend("local", "cpu", {}).runs_here
    True
    """
    try:
        cls = TARGETS[kind]
    except KeyError:
        raise ConfigError(
            f"compute target {name!r} has kind {kind!r}, which this daskrun does "
            f"not know (known: {', '.join(sorted(TARGETS))}); upgrade daskrun or "
            "create the target again"
        ) from None
    return cls(name, options)


class ComputeBackend(ABC):
    """Where a registered target's workers come from. Subclasses set
    ``kind`` (the name stored in the registry) and are registered in
    :data:`TARGETS` by being defined.

    Parameters
    ----------
    name : str
        The target's name, used in messages.
    options : mapping
        The target's options, as its provisioning configuration gave them.
    """

    kind: ClassVar[str]
    queued: ClassVar[bool] = False
    """Whether its workers come from a batch queue (their jobs wait, and the
    forecast counts node-hours)."""
    runs_here: ClassVar[bool] = False
    """Whether its workers run on this machine with this interpreter (its
    Environment is checked here, before the cluster starts)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            TARGETS[cls.kind] = cls

    def __init__(self, name: str, options: Mapping[str, Any]):
        self.name = name
        self.options = dict(options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    @abstractmethod
    def connect(
        self,
        node_count: int,
        process_count_per_node: int | None,
        on_lost: Callable[[str], None] | None = None,
        log_file: str | os.PathLike[str] | None = None,
    ) -> contextlib.AbstractContextManager[Client]:
        """A client of the target's workers, cleaned up after."""


class LocalProcesses(ComputeBackend):
    """Worker processes on this machine, started for each step:
    ``node_count`` × ``process_count_per_node`` of them (default one per
    GPU, else one per core)."""

    kind = "local"
    runs_here = True

    @contextlib.contextmanager
    def connect(
        self,
        node_count: int,
        process_count_per_node: int | None,
        on_lost: Callable[[str], None] | None = None,
        log_file: str | os.PathLike[str] | None = None,
    ) -> Iterator[Client]:
        n = node_count * (process_count_per_node or default_process_count())
        with local_cluster(
            n,
            self.options.get("memory_limit"),
            self.options.get("dashboard_address"),
            log_file,
        ) as client:
            yield client


class AmlProvisioned(LocalProcesses):
    """Azure ML's managed cluster, here a local cluster started for each
    step, of at most ``max_nodes`` nodes."""

    kind = "aml"

    @contextlib.contextmanager
    def connect(
        self,
        node_count: int,
        process_count_per_node: int | None,
        on_lost: Callable[[str], None] | None = None,
        log_file: str | os.PathLike[str] | None = None,
    ) -> Iterator[Client]:
        max_nodes = self.options["max_nodes"]
        if node_count > max_nodes:
            raise ConfigError(
                f"node_count={node_count} is more than max_nodes={max_nodes} of "
                f"compute target {self.name!r}; lower node_count, or create the "
                "target again with "
                f"AmlCompute.provisioning_configuration(max_nodes={node_count})"
            )
        with super().connect(
            node_count, process_count_per_node, on_lost, log_file
        ) as client:
            yield client


class SchedulerAddress(ComputeBackend):
    """An existing Dask scheduler, reached by its ``address``; left running."""

    kind = "scheduler"

    def connect(
        self,
        node_count: int,
        process_count_per_node: int | None,
        on_lost: Callable[[str], None] | None = None,
        log_file: str | os.PathLike[str] | None = None,
    ) -> contextlib.AbstractContextManager[Client]:
        return scheduler_client(self.options["address"])


class SlurmJobs(ComputeBackend):
    """Worker processes in Slurm batch jobs, through dask-jobqueue's
    ``SLURMCluster``: ``node_count`` jobs of ``process_count_per_node``
    worker processes each, requested for each step and cancelled after.
    ``log_directory`` is where the jobs' output goes (the registry fills
    in its default)."""

    kind = "slurm"
    queued = True

    @contextlib.contextmanager
    def connect(
        self,
        node_count: int,
        process_count_per_node: int | None,
        on_lost: Callable[[str], None] | None = None,
        log_file: str | os.PathLike[str] | None = None,
    ) -> Iterator[Client]:
        cluster = slurm_cluster(self.options, process_count_per_node or 1)
        with on_queue(
            cluster, node_count, process_count_per_node, on_lost, close=True
        ) as client:
            yield client


class GatewayClusters(ComputeBackend):
    """A cluster asked of a Dask Gateway for each step (see
    :mod:`daskrun.backends.compute.gateway`): ``node_count`` ×
    ``process_count_per_node`` workers (one per node by default) with the
    target's ``cluster_options``, shut down after the step unless the target
    keeps it warm."""

    kind = "gateway"

    def connect(
        self,
        node_count: int,
        process_count_per_node: int | None,
        on_lost: Callable[[str], None] | None = None,
        log_file: str | os.PathLike[str] | None = None,
    ) -> contextlib.AbstractContextManager[Client]:
        return gateway_client(
            GatewayAccess(self.options),
            self.options.get("cluster_options") or {},
            node_count * (process_count_per_node or 1),
            self.name,
            keep_warm=bool(self.options.get("keep_warm")),
        )


def slurm_cluster(options: Mapping[str, Any], processes: int) -> Any:
    """A SLURMCluster whose jobs run ``processes`` workers of the given
    per-process size; nothing is submitted yet."""
    from dask_jobqueue import SLURMCluster

    host = str(config_get("local-cluster.host"))
    logs = options["log_directory"]
    os.makedirs(logs, exist_ok=True)
    memory = dask.utils.parse_bytes(options["memory"]) * processes
    return SLURMCluster(
        queue=options.get("queue"),
        account=options.get("account"),
        cores=options["cores"] * processes,
        processes=processes,
        memory=dask.utils.format_bytes(memory).replace(" ", "").replace("iB", "B"),
        walltime=options["walltime"],
        python=options.get("python") or sys.executable,
        interface=options.get("interface"),
        job_extra_directives=options.get("job_extra_directives") or [],
        local_directory=options.get("local_directory"),
        log_directory=logs,
        # servers of the scheduler and workers stay on the given interface
        scheduler_options={"dashboard_address": f"{host}:0"},
        worker_extra_args=["--dashboard-address", f"{host}:0"],
    )


def default_target() -> ComputeBackend:
    """Where a step without a ``compute_target`` runs: the shared cluster of
    ``daskrun cluster start`` if one runs, else daskrun's own local one."""
    shared = SharedCluster.find()
    return WarmLocal("local", {}) if shared is None else SharedLocal(shared)


class WarmLocal(ComputeBackend):
    """daskrun's own local cluster of ``node_count`` ×
    ``process_count_per_node`` worker processes: an idle one of that size
    kept warm from an earlier job, else a new one (see
    :func:`~daskrun.keep_warm`)."""

    runs_here = True

    @contextlib.contextmanager
    def connect(
        self,
        node_count: int,
        process_count_per_node: int | None,
        on_lost: Callable[[str], None] | None = None,
        log_file: str | os.PathLike[str] | None = None,
    ) -> Iterator[Client]:
        n = node_count * (process_count_per_node or default_process_count())
        with warm.lease(n, log_file) as client:
            yield client


class SharedLocal(ComputeBackend):
    """The shared cluster of ``daskrun cluster start``: used as it is, left
    running, watched for a scheduler that dies or freezes mid-job."""

    runs_here = True

    def __init__(self, shared: SharedCluster):
        super().__init__("shared", {})
        self.shared = shared

    @contextlib.contextmanager
    def connect(
        self,
        node_count: int,
        process_count_per_node: int | None,
        on_lost: Callable[[str], None] | None = None,
        log_file: str | os.PathLike[str] | None = None,
    ) -> Iterator[Client]:
        shared = self.shared
        with (
            few_messages(),
            shared_client(shared) as client,
            lost_mid_job(client, shared.address, shared.security()),
        ):
            route_worker_logs(client, log_file)
            yield client
