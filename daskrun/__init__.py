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
from .aml import install_as_azureml
from .cluster import close_warm_clusters, keep_warm
from .config import (
    CondaDependencies,
    Environment,
    ParallelRunConfig,
    PipelineParameter,
)
from .datasets import (
    Dataset,
    DatasetConsumptionConfig,
    FileDataset,
    OutputFileDatasetConfig,
    PipelineData,
    TabularDataset,
)
from .exceptions import (
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
from .maprun import MapRun, map_partitions, map_run
from .plugin import EntryScript
from .runcontext import Run

# the registry (workspace, SQLite run records, compute targets, pipelines),
# imported on first use: a worker never loads it
_REGISTRY = {
    "AmlCompute": "compute",
    "ComputeTarget": "compute",
    "LocalCompute": "compute",
    "RemoteCompute": "compute",
    "SlurmCompute": "compute",
    "Model": "models",
    "Experiment": "pipeline",
    "Pipeline": "pipeline",
    "PipelineRun": "pipeline",
    "ParallelRunStep": "step",
    "StepRun": "step",
    "resume": "step",
    "DataPath": "workspace",
    "Datastore": "workspace",
    "OutputData": "workspace",
    "Workspace": "workspace",
}

if TYPE_CHECKING:
    from .compute import (
        AmlCompute,
        ComputeTarget,
        LocalCompute,
        RemoteCompute,
        SlurmCompute,
    )
    from .models import Model
    from .pipeline import Experiment, Pipeline, PipelineRun
    from .step import ParallelRunStep, StepRun, resume
    from .workspace import DataPath, Datastore, OutputData, Workspace


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


__version__ = "0.3.0"

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
    "InputError",
    "JobFailedError",
    "LocalCompute",
    "MapRun",
    "Model",
    "NotProvidedError",
    "OutputData",
    "OutputError",
    "OutputFileDatasetConfig",
    "ParallelRunConfig",
    "ParallelRunStep",
    "Pipeline",
    "PipelineData",
    "PipelineParameter",
    "PipelineRun",
    "RemoteCompute",
    "Run",
    "RunTimeoutError",
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
