"""What one job runs, as one frozen value: the boundary between the registry
and the engine.

The registry (a ``ParallelRunStep`` bound to its parameters, a pipeline's
step, or a run record being resumed) builds a :class:`JobDescription`; a
:class:`~daskrun.engine.job.Job` reads only it, and keeps what it chooses
itself (the ``"auto"`` sizes, the plan) on the job, never on the
description.

>>> description = JobDescription(
...     name="score", config=cfg, input_type=FileInput, inputs=(ds,),
...     mini_batch_size=10, run_id="score_1", runs_root=Path("runs"),
... )  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daskrun.aml.modelrefs import ModelRef
from daskrun.backends.inputs.base import Input
from daskrun.backends.inputs.batches import plan_partitions
from daskrun.engine.config import ParallelRunConfig, ResolvedConfig
from daskrun.engine.outputs import NamedOutput


@dataclass(frozen=True)
class JobDescription:
    """One run of a step, as the engine reads it.

    Attributes
    ----------
    name : str
        The step's name (task keys carry it).
    config : ParallelRunConfig
        As given, bound to the run's pipeline parameters; :attr:`cfg` holds
        its resolved values.
    input_type : type of Input
        The inputs' back-end class: it plans, counts and records them.
    inputs, side_inputs : tuple of data sets
        Resolved data sets (a side input among ``arguments`` is the same
        object).
    mini_batch_size : int
        The step's; under ``"auto"`` the job plans with its own.
    arguments : tuple
        ``sys.argv[1:]`` for the entry script.
    output : str or None
        The output folder (local path or fsspec URL) and its
        ``output_storage_options``.
    experiment, parent_id : str or None
        For ``Run.get_context()``: the pipeline's experiment and run.
    dataset_name : str or None
        The inputs' shared name, for the run record.
    auto_recorded : mapping
        A resumed run's ``"auto"`` choice (``AutoChoice`` as a dict).
    run_id, runs_root : str, Path
        The run's identity; its folder is ``runs_root / run_id``.
    models : tuple of ModelRef or None
        The workspace's registered models, for ``Model.get_model_path``.
    outputs : tuple of NamedOutput
        The step's named outputs (``outputs=``), resolved; empty for a
        single ``output``.
    incremental : str or None
        ``"all"`` or ``"inputs"``: only new or changed inputs run
        (:mod:`daskrun.engine.increment`); ``None``: every input runs.
    """

    name: str
    config: ParallelRunConfig
    input_type: type[Input]
    inputs: tuple[Any, ...]
    mini_batch_size: int
    run_id: str
    runs_root: Path
    side_inputs: tuple[Any, ...] = ()
    arguments: tuple[Any, ...] = ()
    output: str | None = None
    output_storage_options: Mapping[str, Any] = field(default_factory=dict)
    experiment: str | None = None
    parent_id: str | None = None
    dataset_name: str | None = None
    auto_recorded: Mapping[str, Any] = field(default_factory=dict)
    models: tuple[ModelRef, ...] | None = None
    outputs: tuple[NamedOutput, ...] = ()
    incremental: str | None = None

    @property
    def cfg(self) -> ResolvedConfig:
        """The config's resolved values."""
        return self.config.resolved

    @property
    def kind(self) -> str:
        """The inputs' kind, as the run record keeps it."""
        return self.input_type.kind

    @property
    def run_dir(self) -> Path:
        return self.runs_root / self.run_id

    def own_output(self) -> str | None:
        """The final output file as data set listings name it."""
        cfg = self.cfg
        if self.outputs:
            return self.outputs[0].final_url
        if self.output is None or cfg.output_action != "append_row":
            return None
        return f"{self.output.rstrip('/')}/{cfg.append_row_file_name}"

    def plan(
        self, mini_batch_size: int | None = None, pilot: int = 0
    ) -> tuple[Iterable[Any], int]:
        """The mini-batch plans (lazily, for file inputs) and their count,
        with ``mini_batch_size`` (the step's if ``None``) and ``pilot``
        one-file mini-batches first.

        The step's own output file is never an input, even where the output
        folder lies inside an input folder (daskrun's parts are left out of
        every listing).
        """
        own = self.own_output()
        keys = self.cfg.partition_keys
        if keys:
            partitions = plan_partitions(
                (
                    pair
                    for ds in self.inputs
                    for pair in ds.partition_values()
                    if pair[0] != own
                ),
                keys,
                self.inputs[0].file_format,
            )
            return partitions, len(partitions)
        return self.input_type.plan_inputs(
            self.inputs,
            self.mini_batch_size if mini_batch_size is None else mini_batch_size,
            pilot,
            own,
        )
