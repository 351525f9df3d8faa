"""Compute targets registered in a workspace: where a step's workers come from.

A :class:`ComputeTarget` names a kind of cluster and its options:
``ComputeTarget.create(ws, "cpu", LocalCompute.provisioning_configuration())``,
``RemoteCompute.attach_configuration("tcp://10.0.0.5:8786")`` or
``SlurmCompute.provisioning_configuration(queue="gpu")`` or
``GatewayCompute.provisioning_configuration("http://gateway:8000")`` (and the
PBS, SGE, MPI and Kubernetes ones of :mod:`daskrun.registry.hpc`). Given as
a step's ``compute_target``, it connects itself through its kind's class in
:mod:`daskrun.backends.compute.targets` (the engine side, which starts
clusters and never imports this module): a new kind of target is one class
there, and a provisioning configuration here naming its ``kind``.
``connect``, ``dashboard_link``, ``gpu_count``, ``default_process_count`` and
``QuickExit`` live in :mod:`daskrun.backends.compute.cluster` and are
importable from here too.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distributed import Client

from daskrun.backends.compute import targets
from daskrun.backends.compute.cluster import (
    QuickExit,
    connect,
    dashboard_link,
    default_process_count,
    gpu_count,
)
from daskrun.backends.compute.gateway import check_auth
from daskrun.backends.compute.mpi import MpiRanks  # noqa: F401  (registers "mpi")
from daskrun.backends.compute.queues import QueueJobs
from daskrun.backends.compute.targets import (
    TARGETS,
    AmlProvisioned,
    ComputeBackend,
    GatewayClusters,
    LocalProcesses,
    SchedulerAddress,
    SlurmJobs,
    compute_backend,
)
from daskrun.engine.naming import check_name
from daskrun.exceptions import ConfigError
from daskrun.registry.base import registry_row
from daskrun.registry.records import now, runs_dir

__all__ = [
    "AmlCompute",
    "ComputeStatus",
    "ComputeTarget",
    "GatewayCompute",
    "LocalCompute",
    "ProvisioningConfiguration",
    "QuickExit",
    "RemoteCompute",
    "SlurmCompute",
    "connect",
    "dashboard_link",
    "default_process_count",
    "gpu_count",
    "slurm_cluster",
]


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
            LocalProcesses.kind,
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
        return ProvisioningConfiguration(SchedulerAddress.kind, {"address": address})


class SlurmCompute:
    """Worker processes in Slurm batch jobs, through dask-jobqueue's
    ``SLURMCluster``: ``node_count`` jobs of ``process_count_per_node``
    worker processes each, requested for each step and cancelled after."""

    @staticmethod
    def provisioning_configuration(
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
        """``cores`` and ``memory`` are per worker process; ``python`` is the
        interpreter on the nodes (default: this one)."""
        try:
            import dask_jobqueue  # noqa: F401
        except ImportError:
            raise ConfigError(
                "SlurmCompute needs dask-jobqueue; pip install 'daskrun[jobqueue]'"
            ) from None
        if not isinstance(cores, int) or cores < 1:
            raise ConfigError(f"cores={cores!r} must be an int of at least 1")
        return ProvisioningConfiguration(
            SlurmJobs.kind,
            {
                "queue": queue,
                "cores": cores,
                "memory": memory,
                "walltime": walltime,
                "python": python,
                "interface": interface,
                "account": account,
                "job_extra_directives": job_extra_directives or [],
                "local_directory": local_directory,
                "log_directory": log_directory,
            },
        )


class GatewayCompute:
    """A cluster asked of a Dask Gateway for each step: ``node_count`` ×
    ``process_count_per_node`` workers (one per node by default), shut down
    after the step unless ``keep_warm``.

    >>> config = GatewayCompute.provisioning_configuration(
    ...     "http://127.0.0.1:8000", cluster_options={"worker_cores": 2})
    >>> config.options["auth"], config.options["cluster_options"]
    ('simple', {'worker_cores': 2})
    """

    @staticmethod
    def provisioning_configuration(
        address: str,
        proxy_address: str | None = None,
        auth: str = "simple",
        username: str | None = None,
        secret_env: str | None = None,
        cluster_options: dict[str, Any] | None = None,
        keep_warm: bool = False,
    ) -> ProvisioningConfiguration:
        """``address`` is the gateway's (``http://host:8000``), and
        ``proxy_address`` its scheduler proxy's where that differs
        (``tls://host:8786``). ``auth`` is ``"simple"`` (``username``,
        default this user, and a password), ``"jupyterhub"`` (an API token)
        or ``"kerberos"``; the password or token is read, when a step
        connects, from the environment variable ``secret_env`` (default
        ``DASK_GATEWAY_PASSWORD``, or ``JUPYTERHUB_API_TOKEN``) and is never
        stored. ``cluster_options`` are set on the gateway's
        ``cluster_options()`` (e.g. ``{"worker_cores": 2}``). ``keep_warm``
        leaves the cluster running after a step, for the next one with the
        same options."""
        try:
            import dask_gateway  # noqa: F401
        except ImportError:
            raise ConfigError(
                "GatewayCompute needs dask-gateway; pip install 'daskrun[gateway]'"
            ) from None
        if not isinstance(address, str) or "://" not in address:
            raise ConfigError(
                f"address={address!r} is not a Dask Gateway address; use e.g. "
                "'http://gateway.example.org:8000'"
            )
        check_auth(auth, username, secret_env)
        if cluster_options is not None and not isinstance(cluster_options, dict):
            raise ConfigError(
                f"cluster_options={cluster_options!r} is not a dict; use e.g. "
                "cluster_options={'worker_cores': 2}"
            )
        return ProvisioningConfiguration(
            GatewayClusters.kind,
            {
                "address": address,
                "proxy_address": proxy_address,
                "auth": auth,
                "username": username,
                "secret_env": secret_env,
                "cluster_options": dict(cluster_options or {}),
                "keep_warm": bool(keep_warm),
            },
        )


def slurm_cluster(options: dict[str, Any], processes: int) -> Any:
    """A SLURMCluster whose jobs run ``processes`` workers of the given
    per-process size; nothing is submitted yet. Its jobs' output goes to
    ``log_directory``, by default the runs folder's ``slurm-logs``."""
    return targets.slurm_cluster(_with_log_directory(options), processes)


def _with_log_directory(options: dict[str, Any], kind: str = "slurm") -> dict[str, Any]:
    logs = options.get("log_directory") or str(runs_dir() / f"{kind}-logs")
    return {**options, "log_directory": logs}


class ComputeTarget:
    """A compute target registered in a workspace.

    >>> ct = ComputeTarget.create(ws, "cpu-local",
    ...     LocalCompute.provisioning_configuration())  # doctest: +SKIP
    >>> ws.compute_targets["cpu-local"]  # doctest: +SKIP
    ComputeTarget(name='cpu-local', kind='local')
    """

    def __new__(cls, workspace: Any = None, name: str | None = None) -> ComputeTarget:
        # as Azure ML's: ComputeTarget(ws, name) is of its kind's class (copy
        # and pickle call __new__ without arguments)
        if (
            cls is ComputeTarget
            and name is not None
            and TARGETS.get(_row(workspace, name)["kind"]) is AmlProvisioned
        ):
            cls = AmlCompute
        return super().__new__(cls)

    def __init__(self, workspace: Any, name: str):
        row = _row(workspace, name)
        self.workspace = workspace
        self.name = name
        self.kind: str = row["kind"]
        self.options: dict[str, Any] = json.loads(row["spec"])

    def __repr__(self) -> str:
        return f"ComputeTarget(name={self.name!r}, kind={self.kind!r})"

    @property
    def backend(self) -> ComputeBackend:
        """The engine's class for its kind, which connects it."""
        options = self.options
        cls = TARGETS.get(self.kind)
        if cls is SlurmJobs or (cls is not None and issubclass(cls, QueueJobs)):
            options = _with_log_directory(options, self.kind)
        return compute_backend(self.kind, self.name, options)

    @property
    def runs_here(self) -> bool:
        """Whether its workers run on this machine with this interpreter (a
        local or ``AmlCompute`` target): its Environment is checked here,
        before the cluster starts."""
        return self.backend.runs_here

    @property
    def queued(self) -> bool:
        """Whether its workers come from a batch queue (Slurm, PBS, SGE)."""
        return self.backend.queued

    @staticmethod
    def create(
        workspace: Any, name: str, provisioning_configuration: Any
    ) -> ComputeTarget:
        """Register (or replace) a compute target: a provisioning
        configuration, or a scheduler address."""
        check_name("compute target", name)
        config = provisioning_configuration
        if isinstance(config, str):
            config = RemoteCompute.attach_configuration(config)
        if not isinstance(config, ProvisioningConfiguration):
            raise ConfigError(
                f"provisioning_configuration={config!r} is not one; use "
                "AmlCompute.provisioning_configuration(max_nodes=2), "
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
        is_delete_operation: bool = False,
    ) -> None:
        """Local and attached targets need no provisioning: workers start
        with each step. Kept for the tutorial's code."""
        if show_output:
            print(f"{self!r}: ready")

    def get_status(self) -> ComputeStatus:
        """``"Succeeded"``: there is nothing to provision; its
        ``serialize()`` gives the target's settings as a dict."""
        return ComputeStatus(
            "Succeeded", {"name": self.name, "kind": self.kind, **self.options}
        )

    def connect(
        self,
        node_count: int,
        process_count_per_node: int | None,
        on_lost: Callable[[str], None] | None = None,
        log_file: str | os.PathLike[str] | None = None,
    ) -> contextlib.AbstractContextManager[Client]:
        """A client of its workers (see :mod:`daskrun.backends.compute.targets`)."""
        return self.backend.connect(
            node_count, process_count_per_node, on_lost, log_file
        )


def _row(workspace: Any, name: str) -> Any:
    return registry_row(
        workspace,
        "compute_targets",
        name,
        "create it with ComputeTarget.create(ws, name, "
        "AmlCompute.provisioning_configuration(max_nodes=2))",
    )


class ComputeStatus(str):
    """A compute target's state (``"Succeeded"``), with Azure ML's
    ``serialize()``: the target's settings as a dict."""

    details: dict[str, Any]

    def __new__(cls, state: str, details: dict[str, Any]) -> ComputeStatus:
        status = super().__new__(cls, state)
        status.details = details
        return status

    def serialize(self) -> dict[str, Any]:
        return {"provisioningState": str(self), **self.details}


class AmlCompute(ComputeTarget):
    """Azure ML's managed cluster, here a local cluster started for each
    step: ``node_count`` (at most ``max_nodes``) × ``process_count_per_node``
    worker processes on this machine.

    >>> config = AmlCompute.provisioning_configuration(
    ...     vm_size="STANDARD_D2_V2", max_nodes=4)
    >>> config.options["max_nodes"], config.options["vm_size"]
    (4, 'STANDARD_D2_V2')
    """

    @staticmethod
    def provisioning_configuration(
        vm_size: str = "",
        vm_priority: str = "dedicated",
        min_nodes: int | str = 0,
        max_nodes: int | str | None = None,
        idle_seconds_before_scaledown: int | None = None,
        admin_username: str | None = None,
        admin_user_password: str | None = None,
        admin_user_ssh_key: str | None = None,
        vnet_resourcegroup_name: str | None = None,
        vnet_name: str | None = None,
        subnet_name: str | None = None,
        tags: dict[str, str] | None = None,
        description: str | None = None,
        remote_login_port_public_access: str = "NotSpecified",
        identity_type: str | None = None,
        identity_id: list[str] | None = None,
        location: str | None = None,
        enable_node_public_ip: bool = True,
    ) -> ProvisioningConfiguration:
        """Azure ML's parameters, in its order. ``max_nodes`` (default 4)
        bounds the step's ``node_count``; ``vm_size``, ``vm_priority``,
        ``min_nodes``, ``idle_seconds_before_scaledown``, ``tags`` and
        ``description`` are recorded and otherwise unused; the login, network,
        identity and location parameters are accepted and not kept (a
        password is never stored)."""
        low = _node_number("min_nodes", min_nodes, 0)
        high = _node_number("max_nodes", 4 if max_nodes is None else max_nodes, 1)
        if low > high:
            raise ConfigError(
                f"min_nodes={min_nodes!r} is more than max_nodes={max_nodes!r}; "
                "pass min_nodes <= max_nodes"
            )
        return ProvisioningConfiguration(
            AmlProvisioned.kind,
            {
                "vm_size": vm_size,
                "vm_priority": vm_priority,
                "min_nodes": low,
                "max_nodes": high,
                "idle_seconds_before_scaledown": idle_seconds_before_scaledown,
                "tags": tags or {},
                "description": description,
            },
        )


def _node_number(what: str, value: object, least: int) -> int:
    # os.environ.get("AML_COMPUTE_CLUSTER_MAX_NODES", 4) gives a string
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(
            f"{what}={value!r} is not a whole number of at least {least}; use e.g. "
            f"{what}={max(least, 2)}"
        )
    return value
