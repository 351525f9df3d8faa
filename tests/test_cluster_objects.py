"""A ready cluster object as a compute target: ``KubernetesCompute.attach``
scales it to the step and leaves it running (or closes it when asked), and a
``dask_kubernetes`` ``KubeCluster`` given as ``compute_target`` is recognised
and scaled the same way.

No Kubernetes API server can run here: the clusters are real ``LocalCluster``
objects with worker processes, and the ``KubeCluster`` is dask-kubernetes'
own class whose workers are those of a ``LocalCluster``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from distributed import LocalCluster

from daskrun import (
    ConfigError,
    Dataset,
    KubernetesCompute,
    ParallelRunConfig,
    ParallelRunStep,
)
from daskrun.backends.compute.objects import is_kubernetes_cluster

from .helpers import make_files, require_module, write_script

SCORE = """
import os

def init():
    pass

def run(mini_batch):
    return [f"{os.path.basename(p)} {os.getpid()}" for p in mini_batch]
"""


def _run(tmp_path: Path, target: Any, node_count: int) -> tuple[Any, list[str]]:
    files = make_files(tmp_path / "in", 30)
    run = ParallelRunStep(
        "on-cluster",
        ParallelRunConfig(
            str(write_script(tmp_path, SCORE)),
            mini_batch_size=3,
            compute_target=target,
            node_count=node_count,
            process_count_per_node=1,
        ),
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=str(tmp_path / "out"),
    ).run()
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert [line.split()[0] for line in lines] == [p.name for p in files]
    return run, lines


def test_attached_cluster_is_scaled_to_the_step_and_left_running(
    tmp_path: Path, local_cluster: Callable[..., LocalCluster]
) -> None:
    with local_cluster(n_workers=0) as cluster:
        _, lines = _run(tmp_path, KubernetesCompute.attach(cluster), node_count=2)
        assert len({line.split()[1] for line in lines}) == 2  # scaled from 0 to 2
        assert cluster.status.name == "running"  # the user's: left running
        assert len(cluster.workers) == 2


def test_attached_cluster_is_closed_when_asked(
    tmp_path: Path, local_cluster: Callable[..., LocalCluster]
) -> None:
    with local_cluster(n_workers=1) as cluster:
        _run(tmp_path, KubernetesCompute.attach(cluster, close=True), node_count=1)
        assert cluster.status.name == "closed"


def test_a_kubecluster_given_as_compute_target_is_scaled(
    tmp_path: Path, local_cluster: Callable[..., LocalCluster]
) -> None:
    operator = require_module(
        "dask_kubernetes.operator", "pip install 'daskrun[kubernetes]'"
    )

    class LocalPods(operator.KubeCluster):  # type: ignore[misc, name-defined]
        """dask-kubernetes' KubeCluster whose pods are local processes: no
        API server runs here."""

        def __init__(self, local: LocalCluster):
            self.local = local
            self.scaled: list[int] = []

        @property
        def scheduler_address(self) -> str:
            return str(self.local.scheduler_address)

        @property
        def status(self) -> Any:
            return self.local.status

        @property
        def security(self) -> Any:
            return self.local.security

        @property
        def loop(self) -> Any:
            return self.local.loop

        def scale(self, n: int) -> None:
            self.scaled.append(n)
            self.local.scale(n)

        def close(self, timeout: float | None = None) -> None:
            raise AssertionError("a KubeCluster of the user's is left running")

        def __del__(self) -> None:
            pass

    with local_cluster(n_workers=0) as local:
        kube = LocalPods(local)
        assert is_kubernetes_cluster(kube) and not is_kubernetes_cluster(local)
        _, lines = _run(tmp_path, kube, node_count=2)
        assert kube.scaled == [2]
        assert len({line.split()[1] for line in lines}) == 2


def test_not_a_cluster_object_names_the_fix() -> None:
    with pytest.raises(ConfigError, match="is not a Dask cluster object"):
        KubernetesCompute.attach("tcp://127.0.0.1:8786")
