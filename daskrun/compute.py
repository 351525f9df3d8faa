"""Compute targets: where the workers come from.

``None`` starts a local cluster of single-threaded worker processes bound to
127.0.0.1 and closes it afterwards. A scheduler address, a
``distributed.Client`` or a Dask cluster object (``LocalCluster``,
``dask_jobqueue.SLURMCluster``, ``dask_cuda.LocalCUDACluster``…) is used as
given and left running.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
from collections.abc import Iterator
from typing import Any

import dask.config
from distributed import Client, LocalCluster

from .config import config_get
from .exceptions import ConfigError

logger = logging.getLogger("daskrun")


def default_process_count() -> int:
    """One worker process per core of this machine."""
    return (
        len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else (os.cpu_count() or 1)
    )


@contextlib.contextmanager
def connect(
    compute_target: Any, node_count: int, process_count_per_node: int | None
) -> Iterator[Client]:
    """Yield a client for ``compute_target``; clean up only what was started."""
    if compute_target is None:
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # a new worker process is importing the user's script, which
            # starts a job again at import time
            raise ConfigError(
                "a local cluster was started while a worker process imported "
                "your script; put the code that runs the step under "
                "'if __name__ == \"__main__\":'"
            )
        n = node_count * (process_count_per_node or default_process_count())
        # A worker that dies (a run() stopped for its timeout, a memory kill)
        # fails its task at once, since daskrun counts tries itself; and each
        # worker holds only the task it runs, so a death charges no other.
        with dask.config.set(
            {
                "distributed.scheduler.allowed-failures": 0,
                "distributed.scheduler.worker-saturation": 1.0,
            }
        ):
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                host=config_get("local-cluster.host"),
                dashboard_address=config_get("local-cluster.dashboard-address"),
                memory_limit=config_get("local-cluster.memory-limit"),
            )
        try:
            with Client(cluster) as client:
                yield client
        finally:
            cluster.close()
    elif isinstance(compute_target, Client):
        yield compute_target
    elif isinstance(compute_target, str):
        try:
            client = Client(compute_target, timeout=10)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"compute_target={compute_target!r} cannot be reached ({e}); start a "
                "scheduler there, or use compute_target=None for a local cluster"
            ) from None
        with client:
            yield client
    elif hasattr(compute_target, "scheduler_address"):
        with Client(compute_target) as client:
            yield client
    else:
        raise ConfigError(
            f"compute_target={compute_target!r} is not a compute target; use None, "
            "a scheduler address like 'tcp://127.0.0.1:8786', a distributed.Client "
            "or a Dask cluster object"
        )


def dashboard_link(client: Client) -> str | None:
    """The Dask dashboard's URL, if the scheduler serves one."""
    try:
        return client.dashboard_link
    except Exception:  # no dashboard (bokeh missing or disabled)
        return None
