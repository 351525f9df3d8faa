"""daskrun: ParallelRunStep-style batch inference on any Dask cluster.

An entry script with ``init()`` and ``run(mini_batch)``, a
:class:`ParallelRunConfig`, a :class:`ParallelRunStep` over a data set, and
``step.run()``:

>>> import daskrun  # doctest: +SKIP
>>> cfg = daskrun.ParallelRunConfig("score.py", error_threshold=10,
...                                 output_action="append_row",
...                                 mini_batch_size=10)  # doctest: +SKIP
>>> step = daskrun.ParallelRunStep("score-images", cfg,
...     inputs=[daskrun.Dataset.File.from_files("images/")],
...     output="out/")  # doctest: +SKIP
>>> step.run().output_path  # doctest: +SKIP
'/home/me/out/parallel_run_step.txt'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# the engine, which a worker process imports with the plugin
from daskrun.aml import install_as_azureml
from daskrun.aml.runcontext import Run
from daskrun.backends.compute.cluster import close_warm_clusters, keep_warm
from daskrun.backends.inputs.datasets import (
    Dataset,
    DatasetConsumptionConfig,
    FileDataset,
    OutputFileDatasetConfig,
    PipelineData,
    TabularDataset,
)
from daskrun.engine.config import ParallelRunConfig
from daskrun.engine.environment import CondaDependencies, Environment
from daskrun.engine.maprun import MapRun, map_partitions, map_run
from daskrun.engine.naming import PipelineParameter
from daskrun.engine.plugin import EntryScript
from daskrun.exceptions import (
    Canceled,
    ClusterLostError,
    ConfigError,
    DaskRunError,
    EntryScriptError,
    InputError,
    JobFailedError,
    NotProvidedError,
    OutputError,
    RunTimeoutError,
    StorageError,
    StorageTimeoutError,
    ThresholdExceededError,
    UnreachableDataError,
)

# the registry (workspace, SQLite run records, compute targets, pipelines),
# imported on first use: a worker never loads it
_REGISTRY = {
    "AmlCompute": "registry.compute",
    "ComputeTarget": "registry.compute",
    "GatewayCompute": "registry.compute",
    "LocalCompute": "registry.compute",
    "RemoteCompute": "registry.compute",
    "SlurmCompute": "registry.compute",
    "KubernetesCompute": "registry.hpc",
    "MpiCompute": "registry.hpc",
    "PbsCompute": "registry.hpc",
    "SgeCompute": "registry.hpc",
    "Model": "registry.models",
    "Experiment": "registry.pipeline",
    "Pipeline": "registry.pipeline",
    "PipelineRun": "registry.pipeline",
    "ParallelRunStep": "registry.step",
    "StepRun": "registry.step",
    "resume": "registry.step",
    "OutputSpec": "registry.stepoutputs",
    "DataPath": "registry.workspace",
    "Datastore": "registry.workspace",
    "OutputData": "registry.workspace",
    "Workspace": "registry.workspace",
}

if TYPE_CHECKING:
    from daskrun.registry.compute import (
        AmlCompute,
        ComputeTarget,
        GatewayCompute,
        LocalCompute,
        RemoteCompute,
        SlurmCompute,
    )
    from daskrun.registry.hpc import (
        KubernetesCompute,
        MpiCompute,
        PbsCompute,
        SgeCompute,
    )
    from daskrun.registry.models import Model
    from daskrun.registry.pipeline import Experiment, Pipeline, PipelineRun
    from daskrun.registry.step import ParallelRunStep, StepRun, resume
    from daskrun.registry.stepoutputs import OutputSpec
    from daskrun.registry.workspace import DataPath, Datastore, OutputData, Workspace


def __getattr__(name: str) -> Any:
    module = _REGISTRY.get(name)
    if module is None:
        raise AttributeError(f"module 'daskrun' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_REGISTRY})


__version__ = "0.4.0"

__all__ = [
    "AmlCompute",
    "Canceled",
    "ClusterLostError",
    "ComputeTarget",
    "CondaDependencies",
    "ConfigError",
    "DaskRunError",
    "DataPath",
    "Dataset",
    "DatasetConsumptionConfig",
    "Datastore",
    "EntryScript",
    "EntryScriptError",
    "Environment",
    "Experiment",
    "FileDataset",
    "GatewayCompute",
    "InputError",
    "JobFailedError",
    "KubernetesCompute",
    "LocalCompute",
    "MapRun",
    "Model",
    "MpiCompute",
    "NotProvidedError",
    "OutputData",
    "OutputError",
    "OutputFileDatasetConfig",
    "OutputSpec",
    "ParallelRunConfig",
    "ParallelRunStep",
    "PbsCompute",
    "Pipeline",
    "PipelineData",
    "PipelineParameter",
    "PipelineRun",
    "RemoteCompute",
    "Run",
    "RunTimeoutError",
    "SgeCompute",
    "SlurmCompute",
    "StepRun",
    "StorageError",
    "StorageTimeoutError",
    "TabularDataset",
    "ThresholdExceededError",
    "UnreachableDataError",
    "Workspace",
    "close_warm_clusters",
    "install_as_azureml",
    "keep_warm",
    "map_partitions",
    "map_run",
    "resume",
]
