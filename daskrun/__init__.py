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

from .config import ParallelRunConfig
from .datasets import Dataset, FileDataset, TabularDataset
from .exceptions import (
    ConfigError,
    DaskRunError,
    EntryScriptError,
    InputError,
    JobFailedError,
    ThresholdExceededError,
)
from .step import ParallelRunStep, StepRun, resume

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DaskRunError",
    "Dataset",
    "EntryScriptError",
    "FileDataset",
    "InputError",
    "JobFailedError",
    "ParallelRunConfig",
    "ParallelRunStep",
    "StepRun",
    "TabularDataset",
    "ThresholdExceededError",
    "resume",
]
