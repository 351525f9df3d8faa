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

from .compute import ComputeTarget, LocalCompute, RemoteCompute, SlurmCompute
from .config import Environment, ParallelRunConfig, PipelineParameter
from .datasets import (
    Dataset,
    DatasetConsumptionConfig,
    FileDataset,
    PipelineData,
    TabularDataset,
)
from .exceptions import (
    Canceled,
    ConfigError,
    DaskRunError,
    EntryScriptError,
    InputError,
    JobFailedError,
    OutputError,
    RunTimeoutError,
    StorageError,
    StorageTimeoutError,
    ThresholdExceededError,
)
from .models import Model
from .pipeline import Experiment, Pipeline, PipelineRun
from .plugin import EntryScript
from .step import ParallelRunStep, StepRun, resume
from .workspace import DataPath, Datastore, OutputData, Workspace

__version__ = "0.1.0"

__all__ = [
    "Canceled",
    "ComputeTarget",
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
    "Model",
    "OutputData",
    "OutputError",
    "ParallelRunConfig",
    "ParallelRunStep",
    "Pipeline",
    "PipelineData",
    "PipelineParameter",
    "PipelineRun",
    "RemoteCompute",
    "RunTimeoutError",
    "SlurmCompute",
    "StepRun",
    "StorageError",
    "StorageTimeoutError",
    "TabularDataset",
    "ThresholdExceededError",
    "Workspace",
    "resume",
]
