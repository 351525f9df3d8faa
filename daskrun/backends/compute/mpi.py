"""MPI allocations: the ranks of ``mpirun -n N`` as a step's workers,
through dask-mpi.

A job script started as ``mpirun -n N python job.py`` calls
:func:`initialize` first, before anything else::

    rank 0        the Dask scheduler
    rank 1        goes on with the script: the client that runs the step
    ranks 2..N-1  the workers (N - 2 of them)

Ranks 0 and 2.. never return from :func:`initialize`: they serve until the
script ends on rank 1, and then exit (status 0), so ``mpirun`` returns when
the job is done. On rank 1 it returns an :class:`MpiRanks` target to give
as the step's ``compute_target`` (or a registered ``MpiCompute`` target is
used: it finds the ranks this process was started with).

The scheduler and workers listen on the loopback interface when every rank
runs on this host, else on the ``interface`` given (the network the nodes
share, e.g. ``"ib0"``); an allocation over several hosts without one fails
at once, naming the hosts.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from distributed import Client

from daskrun.backends.compute.targets import ComputeBackend
from daskrun.engine.config import config_get
from daskrun.exceptions import ConfigError, JobFailedError

_started: dict[str, Any] = {}
"""On rank 1 after :func:`initialize`: the scheduler's ``address`` and the
number of worker ``ranks``."""


def loopback_interface() -> str:
    """The name of the network interface with 127.0.0.1 (``"lo"`` on Linux)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addresses):
            return name
    raise ConfigError(
        "no network interface has 127.0.0.1; pass interface='eth0' (the network "
        "the MPI ranks share) to initialize()"
    )


def rank_interface(interface: str | None, hosts: list[str]) -> str:
    """The interface the ranks listen on: ``interface``, or the loopback one
    when every rank runs on one host.

    >>> rank_interface("ib0", ["n1", "n2"])
    'ib0'
    >>> rank_interface(None, ["n1", "n2", "n2"])
    Traceback (most recent call last):
    ...
    daskrun.exceptions.ConfigError: the MPI ranks run on 2 hosts (n1, n2) and \
interface is not given; pass the network they share, e.g. initialize(interface='ib0')
    """
    if interface is not None:
        return interface
    distinct = sorted(set(hosts))
    if len(distinct) > 1:
        raise ConfigError(
            f"the MPI ranks run on {len(distinct)} hosts ({', '.join(distinct)}) "
            "and interface is not given; pass the network they share, e.g. "
            "initialize(interface='ib0')"
        )
    return loopback_interface()


def initialize(
    interface: str | None = None,
    memory_limit: str | int | float = "auto",
    local_directory: str | None = None,
) -> MpiRanks:
    """Make the ranks of this ``mpirun`` a Dask cluster (see the module's
    docstring); on rank 1, return the target that reaches it.

    Parameters
    ----------
    interface : str, optional
        The network interface the scheduler and workers listen on (e.g.
        ``"ib0"``); by default the loopback one, when every rank runs here.
    memory_limit : str, int or float
        Each worker's memory limit, as ``distributed.Worker`` takes it.
    local_directory : str, optional
        The workers' scratch folder.

    Examples
    --------
    >>> target = initialize()  # doctest: +SKIP
    >>> ParallelRunConfig("score.py", compute_target=target)  # doctest: +SKIP
    """
    try:
        import dask_mpi
        from mpi4py import MPI
    except ImportError:
        raise ConfigError(
            "an MPI allocation needs dask-mpi and mpi4py; pip install 'daskrun[mpi]'"
        ) from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() < 3:
        raise ConfigError(
            f"mpirun started {comm.Get_size()} rank(s); a step needs at least 3 "
            "(scheduler, client, one worker): start it as 'mpirun -n 4 python "
            "job.py'"
        )
    hosts = comm.allgather(socket.gethostname())
    chosen = rank_interface(interface, hosts)
    from distributed.utils import get_ip_interface

    dask_mpi.initialize(
        interface=chosen,
        nthreads=1,
        memory_limit=memory_limit,
        local_directory=local_directory,
        dashboard_address=f"{get_ip_interface(chosen)}:0",
        # plain workers, not nannies: a nanny's worker process is spawned
        # and would run the unguarded job script again
        worker_class="distributed.Worker",
        comm=comm,
        exit=True,
    )
    # rank 1 only: the others served and exited
    import dask.config

    _started.update(address=dask.config.get("scheduler_address"), ranks=len(hosts) - 2)
    return MpiRanks("mpi", {"interface": interface})


class MpiRanks(ComputeBackend):
    """The workers of the ``mpirun`` this process was started by (see
    :func:`initialize`): every worker rank, whatever ``node_count`` and
    ``process_count_per_node`` say; left to exit with the job."""

    kind = "mpi"

    @contextlib.contextmanager
    def connect(
        self,
        node_count: int,
        process_count_per_node: int | None,
        on_lost: Callable[[str], None] | None = None,
        log_file: str | os.PathLike[str] | None = None,
    ) -> Iterator[Client]:
        if not _started:
            raise ConfigError(
                f"compute target {self.name!r} runs on the ranks of mpirun, but "
                "this process was not started through it; start the script as "
                "'mpirun -n 4 python job.py' and call "
                "daskrun.MpiCompute.initialize() at its top"
            )
        with Client(_started["address"], set_as_default=False) as client:
            _wait_for_ranks(client, _started["ranks"])
            yield client


def _wait_for_ranks(client: Client, ranks: int) -> None:
    timeout = float(config_get("jobqueue.start-timeout"))
    deadline = time.monotonic() + timeout
    while len(client.scheduler_info(n_workers=-1)["workers"]) < ranks:
        if time.monotonic() > deadline:
            raise JobFailedError(
                f"{len(client.scheduler_info(n_workers=-1)['workers'])} of {ranks} "
                f"MPI worker ranks connected after {timeout:g} s: check the "
                "ranks' output; raise daskrun.jobqueue.start-timeout"
            )
        time.sleep(0.1)
