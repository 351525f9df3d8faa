"""Compute targets: where the workers come from.

``None`` starts a local cluster of single-threaded worker processes bound to
127.0.0.1 and closes it afterwards. A scheduler address, a
``distributed.Client`` or a Dask cluster object (``LocalCluster``,
``dask_jobqueue.SLURMCluster``, ``dask_cuda.LocalCUDACluster``…) is used as
given and left running. A :class:`ComputeTarget` registered in a workspace
names one of these: ``ComputeTarget.create(ws, "cpu",
LocalCompute.provisioning_configuration())``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
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
        n = node_count * (process_count_per_node or default_process_count())
        with _local_cluster(n) as client:
            yield client
    elif isinstance(compute_target, ComputeTarget):
        with compute_target.connect(node_count, process_count_per_node) as client:
            yield client
    elif isinstance(compute_target, Client):
        yield compute_target
    elif isinstance(compute_target, str):
        with _scheduler(compute_target) as client:
            yield client
    elif hasattr(compute_target, "scheduler_address"):
        with Client(compute_target) as client:
            yield client
    else:
        raise ConfigError(
            f"compute_target={compute_target!r} is not a compute target; use None, "
            "a scheduler address like 'tcp://127.0.0.1:8786', a distributed.Client, "
            "a Dask cluster object or a registered ComputeTarget"
        )


@contextlib.contextmanager
def _local_cluster(
    n: int, memory_limit: str | None = None, dashboard_address: str | None = None
) -> Iterator[Client]:
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # a new worker process is importing the user's script, which starts
        # a job again at import time
        raise ConfigError(
            "a local cluster was started while a worker process imported "
            "your script; put the code that runs the step under "
            "'if __name__ == \"__main__\":'"
        )
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
            dashboard_address=dashboard_address
            or config_get("local-cluster.dashboard-address"),
            memory_limit=memory_limit or config_get("local-cluster.memory-limit"),
        )
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


@contextlib.contextmanager
def _scheduler(address: str) -> Iterator[Client]:
    try:
        client = Client(address, timeout=10)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"compute_target={address!r} cannot be reached ({e}); start a "
            "scheduler there, or use compute_target=None for a local cluster"
        ) from None
    with client:
        yield client


def dashboard_link(client: Client) -> str | None:
    """The Dask dashboard's URL, if the scheduler serves one."""
    try:
        return client.dashboard_link
    except Exception:  # no dashboard (bokeh missing or disabled)
        return None


@dataclass(frozen=True)
class ProvisioningConfiguration:
    """What :meth:`ComputeTarget.create` builds: a kind and its options."""

    kind: str
    options: dict[str, Any] = field(default_factory=dict)


class LocalCompute:
    """Worker processes on this machine, started for each step."""

    @staticmethod
    def provisioning_configuration(
        memory_limit: str | None = None, dashboard_address: str | None = None
    ) -> ProvisioningConfiguration:
        """``memory_limit`` per worker process (e.g. ``"4GB"``; default
        ``daskrun.local-cluster.memory-limit``)."""
        return ProvisioningConfiguration(
            "local",
            {"memory_limit": memory_limit, "dashboard_address": dashboard_address},
        )


class RemoteCompute:
    """An existing Dask scheduler, reached by its address."""

    @staticmethod
    def attach_configuration(address: str) -> ProvisioningConfiguration:
        if not isinstance(address, str) or "://" not in address:
            raise ConfigError(
                f"address={address!r} is not a scheduler address; use e.g. "
                "'tcp://10.0.0.5:8786'"
            )
        return ProvisioningConfiguration("scheduler", {"address": address})


class ComputeTarget:
    """A compute target registered in a workspace.

    >>> ct = ComputeTarget.create(ws, "cpu-local",
    ...     LocalCompute.provisioning_configuration())  # doctest: +SKIP
    >>> ws.compute_targets["cpu-local"]  # doctest: +SKIP
    ComputeTarget(name='cpu-local', kind='local')
    """

    def __init__(self, workspace: Any, name: str):
        with workspace.db() as db:
            row = db.execute(
                "SELECT kind, spec FROM compute_targets WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            raise ConfigError(
                f"compute target {name!r} is not registered in {workspace!r}; "
                "create it with ComputeTarget.create(ws, name, "
                "LocalCompute.provisioning_configuration())"
            )
        self.workspace = workspace
        self.name = name
        self.kind: str = row["kind"]
        self.options: dict[str, Any] = json.loads(row["spec"])

    def __repr__(self) -> str:
        return f"ComputeTarget(name={self.name!r}, kind={self.kind!r})"

    @staticmethod
    def create(
        workspace: Any, name: str, provisioning_configuration: Any
    ) -> ComputeTarget:
        """Register (or replace) a compute target: a provisioning
        configuration, or a scheduler address."""
        from .records import now
        from .workspace import check_name

        check_name("compute target", name)
        config = provisioning_configuration
        if isinstance(config, str):
            config = RemoteCompute.attach_configuration(config)
        if not isinstance(config, ProvisioningConfiguration):
            raise ConfigError(
                f"provisioning_configuration={config!r} is not one; use "
                "LocalCompute.provisioning_configuration() or a scheduler address"
            )
        with workspace.db() as db:
            db.execute(
                "INSERT OR REPLACE INTO compute_targets VALUES (?, ?, ?, ?)",
                (name, config.kind, json.dumps(config.options), now()),
            )
        return ComputeTarget(workspace, name)

    def wait_for_completion(
        self,
        show_output: bool = False,
        min_node_count: int | None = None,
        timeout_in_minutes: int = 20,
    ) -> None:
        """Local and attached targets need no provisioning: workers start
        with each step. Kept for the tutorial's code."""
        if show_output:
            print(f"{self!r}: ready")

    def get_status(self) -> str:
        return "Succeeded"

    @contextlib.contextmanager
    def connect(
        self, node_count: int, process_count_per_node: int | None
    ) -> Iterator[Client]:
        if self.kind == "local":
            n = node_count * (process_count_per_node or default_process_count())
            with _local_cluster(
                n,
                self.options.get("memory_limit"),
                self.options.get("dashboard_address"),
            ) as client:
                yield client
        else:
            with _scheduler(self.options["address"]) as client:
                yield client
