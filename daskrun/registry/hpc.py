"""Compute targets of HPC systems beyond Slurm: PBS and SGE batch queues,
MPI allocations and Kubernetes clusters, as the registry's door to
:mod:`daskrun.backends.compute.queues`, :mod:`~daskrun.backends.compute.mpi`
and :mod:`~daskrun.backends.compute.objects`.

PBS and SGE are registered as Slurm is::

    ComputeTarget.create(ws, "pbs", PbsCompute.provisioning_configuration(
        queue="batch", cores=1, memory="2GB", walltime="01:00:00"))

An MPI job registers nothing: its script, started as ``mpirun -n N python
job.py``, calls ``MpiCompute.initialize()`` first and gives what it returns
as ``compute_target`` (a target registered with
``MpiCompute.provisioning_configuration()`` finds the same ranks). A
``KubeCluster`` is a live object, not a row: give it as ``compute_target``
directly, or ``KubernetesCompute.attach(cluster)`` to choose scaling and
closing.
"""

from __future__ import annotations

from typing import Any, ClassVar

import dask.utils

from daskrun.backends.compute.mpi import MpiRanks, initialize
from daskrun.backends.compute.objects import ClusterObject
from daskrun.backends.compute.queues import PbsJobs, SgeJobs
from daskrun.backends.compute.targets import ComputeBackend
from daskrun.exceptions import ConfigError
from daskrun.registry.compute import ProvisioningConfiguration

__all__ = ["KubernetesCompute", "MpiCompute", "PbsCompute", "SgeCompute"]


def _queue_configuration(
    kind: str, cluster_class: str, options: dict[str, Any]
) -> ProvisioningConfiguration:
    """A batch queue's configuration, its sizes checked first."""
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{cluster_class} needs dask-jobqueue; pip install 'daskrun[jobqueue]'"
        ) from None
    cores = options["cores"]
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        raise ConfigError(f"cores={cores!r} must be an int of at least 1; use e.g. 1")
    try:
        dask.utils.parse_bytes(options["memory"])
    except (ValueError, TypeError):
        raise ConfigError(
            f"memory={options['memory']!r} is not an amount of memory; use e.g. "
            "memory='2GB'"
        ) from None
    extra = list(options["job_extra_directives"] or [])
    return ProvisioningConfiguration(kind, {**options, "job_extra_directives": extra})


class _QueueCompute:
    """A batch queue's door (:class:`PbsCompute`, :class:`SgeCompute`):
    the engine's class of its jobs and dask-jobqueue's cluster class."""

    jobs: ClassVar[type[ComputeBackend]]
    cluster_class: ClassVar[str]

    @classmethod
    def provisioning_configuration(
        cls,
        queue: str | None = None,
        cores: int = 1,
        memory: str = "2GB",
        walltime: str = "01:00:00",
        python: str | None = None,
        interface: str | None = None,
        account: str | None = None,
        job_extra_directives: list[str] | None = None,
        local_directory: str | None = None,
        log_directory: str | None = None,
    ) -> ProvisioningConfiguration:
        """As :meth:`SlurmCompute.provisioning_configuration
        <daskrun.SlurmCompute.provisioning_configuration>`: ``cores`` and
        ``memory`` are per worker process; ``account`` and
        ``job_extra_directives`` are the queue's own (see the class)."""
        options = {k: v for k, v in locals().items() if k != "cls"}
        return _queue_configuration(cls.jobs.kind, cls.cluster_class, options)


class PbsCompute(_QueueCompute):
    """Worker processes in PBS batch jobs (PBS Pro, OpenPBS, Torque), through
    dask-jobqueue's ``PBSCluster``: ``node_count`` jobs of
    ``process_count_per_node`` worker processes each, requested for each
    step and cancelled after. ``account`` is PBS's ``-A``;
    ``job_extra_directives`` are added as ``#PBS`` lines.

    >>> PbsCompute.provisioning_configuration(memory="2 gigs")
    Traceback (most recent call last):
    ...
    daskrun.exceptions.ConfigError: memory='2 gigs' is not an amount of memory; \
use e.g. memory='2GB'
    """

    jobs = PbsJobs
    cluster_class = "PBSCluster"


class SgeCompute(_QueueCompute):
    """Worker processes in Grid Engine batch jobs (SGE, Son of Grid Engine),
    through dask-jobqueue's ``SGECluster``, as :class:`PbsCompute`.
    ``account`` is Grid Engine's project (``-P``); ``job_extra_directives``
    are added as ``#$`` lines (e.g. ``["-pe smp 4"]``)."""

    jobs = SgeJobs
    cluster_class = "SGECluster"


class MpiCompute:
    """The ranks of an ``mpirun`` allocation as a step's workers, through
    dask-mpi (see :mod:`daskrun.backends.compute.mpi`): rank 0 the
    scheduler, rank 1 the script, ranks 2 and up the workers."""

    initialize = staticmethod(initialize)

    @staticmethod
    def provisioning_configuration(
        interface: str | None = None,
    ) -> ProvisioningConfiguration:
        """A registered target for steps of scripts started through
        ``mpirun`` (they call :meth:`initialize` first, with the same
        ``interface``)."""
        return ProvisioningConfiguration(MpiRanks.kind, {"interface": interface})


class KubernetesCompute:
    """A Kubernetes cluster of dask-kubernetes' (``KubeCluster``) or any
    other ready Dask cluster object, scaled to the step's workers."""

    @staticmethod
    def attach(cluster: Any, scale: bool = True, close: bool = False) -> ClusterObject:
        """The target of ``cluster``: scaled to ``node_count`` ×
        ``process_count_per_node`` workers when ``scale``, closed after the
        step only when ``close``.

        >>> from distributed import LocalCluster
        >>> with LocalCluster(n_workers=0, processes=False,
        ...                   dashboard_address=None) as cluster:
        ...     KubernetesCompute.attach(cluster).scale
        True
        """
        return ClusterObject(cluster, scale=scale, close=close)
