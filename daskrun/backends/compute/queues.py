"""More batch queues through dask-jobqueue: PBS and SGE (Grid Engine), as
:class:`~daskrun.backends.compute.targets.SlurmJobs` does Slurm.

Each is one target class whose ``connect`` builds the queue's
``JobQueueCluster`` from the registered options and hands it to
:func:`~daskrun.backends.compute.jobqueue.on_queue`: ``node_count`` jobs of
``process_count_per_node`` worker processes each, waited for within
``daskrun.jobqueue.start-timeout``, watched while the step runs, cancelled
after.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import dask.utils
from distributed import Client

from daskrun.backends.compute.jobqueue import on_queue
from daskrun.backends.compute.targets import ComputeBackend
from daskrun.engine.config import config_get


def jobqueue_options(options: Mapping[str, Any], processes: int) -> dict[str, Any]:
    """The keyword arguments of a dask-jobqueue cluster whose jobs run
    ``processes`` workers, each of the registered ``cores`` and ``memory``;
    its servers on ``daskrun.local-cluster.host``.

    >>> kw = jobqueue_options({"cores": 2, "memory": "1GB", "walltime": "01:00:00",
    ...                        "log_directory": "/tmp/logs"}, 3)
    >>> kw["cores"], kw["processes"], kw["memory"]
    (6, 3, '2.79GiB')
    """
    host = str(config_get("local-cluster.host"))
    memory = dask.utils.parse_bytes(options["memory"]) * processes
    return dict(
        queue=options.get("queue"),
        cores=options["cores"] * processes,
        processes=processes,
        memory=dask.utils.format_bytes(memory).replace(" ", ""),
        walltime=options["walltime"],
        python=options.get("python") or sys.executable,
        interface=options.get("interface"),
        job_extra_directives=options.get("job_extra_directives") or [],
        local_directory=options.get("local_directory"),
        log_directory=options["log_directory"],
        scheduler_options={"dashboard_address": f"{host}:0"},
        worker_extra_args=["--dashboard-address", f"{host}:0"],
    )


class QueueJobs(ComputeBackend):
    """Worker processes in batch jobs of a dask-jobqueue cluster class
    (``cluster_class``, by name); ``log_directory`` is where the jobs'
    output goes (the registry fills in its default)."""

    queued = True
    cluster_class: ClassVar[str]
    account_option: ClassVar[str] = "account"
    """The cluster class's name for the registered ``account``."""

    def cluster(self, processes: int) -> Any:
        """The queue's cluster; nothing is submitted yet."""
        import dask_jobqueue

        os.makedirs(self.options["log_directory"], exist_ok=True)
        kwargs = jobqueue_options(self.options, processes)
        kwargs[self.account_option] = self.options.get("account")
        return getattr(dask_jobqueue, self.cluster_class)(**kwargs)

    @contextlib.contextmanager
    def connect(
        self,
        node_count: int,
        process_count_per_node: int | None,
        on_lost: Callable[[str], None] | None = None,
        log_file: str | os.PathLike[str] | None = None,
    ) -> Iterator[Client]:
        cluster = self.cluster(process_count_per_node or 1)
        with on_queue(
            cluster, node_count, process_count_per_node, on_lost, close=True
        ) as client:
            yield client


class PbsJobs(QueueJobs):
    """Worker processes in PBS (PBS Pro, OpenPBS, Torque) batch jobs, through
    dask-jobqueue's ``PBSCluster``."""

    kind = "pbs"
    cluster_class = "PBSCluster"


class SgeJobs(QueueJobs):
    """Worker processes in Grid Engine (SGE, Son of Grid Engine, Univa)
    batch jobs, through dask-jobqueue's ``SGECluster``."""

    kind = "sge"
    cluster_class = "SGECluster"
    account_option = "project"
