"""A ready Dask cluster object as a compute target, scaled to the step:
a ``dask_kubernetes`` ``KubeCluster``, or any ``distributed`` cluster with
a ``scheduler_address`` (``LocalCluster``, ``SpecCluster``...).

A ``KubeCluster`` given as ``compute_target`` is recognised by its class
(without importing ``dask_kubernetes``) and scaled to ``node_count`` ×
``process_count_per_node`` workers (one per node by default) before the step
runs; other cluster objects are used as they are, unless wrapped in
:class:`ClusterObject` (``KubernetesCompute.attach(cluster)``), which scales
them the same way. The job then waits for the workers within
``daskrun.workers-timeout`` (:mod:`daskrun.engine.preflight`). A cluster
given by the user is left running, unless ``close=True`` asks otherwise.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

from distributed import Client

from daskrun.backends.compute.targets import ComputeBackend
from daskrun.exceptions import ConfigError


def is_kubernetes_cluster(obj: Any) -> bool:
    """Whether ``obj`` is a ``dask_kubernetes`` ``KubeCluster`` (of the
    operator or of the classic API), judged by its class alone."""
    return any(
        cls.__name__ == "KubeCluster" and cls.__module__.startswith("dask_kubernetes")
        for cls in type(obj).__mro__
    )


class ClusterObject(ComputeBackend):
    """A cluster object the user made, scaled to the step's workers when
    ``scale`` and it can be (it has ``.scale``), closed after the step only
    with ``close``.

    Parameters
    ----------
    cluster : object
        A Dask cluster object with a ``scheduler_address``.
    scale : bool
        Scale it to ``node_count`` × ``process_count_per_node`` workers.
    close : bool
        Close it when the step ends.

    >>> ClusterObject(object())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    daskrun.exceptions.ConfigError: cluster=<object ...> is not a Dask cluster \
object (it has no scheduler_address); pass e.g. a dask_kubernetes KubeCluster \
or a distributed LocalCluster
    """

    def __init__(self, cluster: Any, scale: bool = True, close: bool = False):
        if not hasattr(cluster, "scheduler_address"):
            raise ConfigError(
                f"cluster={cluster!r} is not a Dask cluster object (it has no "
                "scheduler_address); pass e.g. a dask_kubernetes KubeCluster or a "
                "distributed LocalCluster"
            )
        super().__init__(str(getattr(cluster, "name", type(cluster).__name__)), {})
        self.cluster = cluster
        self.scale = scale
        self.close = close

    @contextlib.contextmanager
    def connect(
        self,
        node_count: int,
        process_count_per_node: int | None,
        on_lost: Callable[[str], None] | None = None,
        log_file: str | os.PathLike[str] | None = None,
    ) -> Iterator[Client]:
        cluster = self.cluster
        try:
            if self.scale and callable(getattr(cluster, "scale", None)):
                cluster.scale(node_count * (process_count_per_node or 1))
            with Client(cluster, set_as_default=False) as client:
                yield client
        finally:
            if self.close:
                with contextlib.suppress(Exception):
                    cluster.close()
