"""``ParallelRunStep``: one entry script over one input, and its ``StepRun``.

``step.run()`` validates everything, plans the mini-batches, connects to the
compute target, registers the entry script as a worker plugin, runs the
mini-batches (:mod:`daskrun.engine.runner`), assembles the output
(:mod:`daskrun.engine.output`) and writes the log folder
(:mod:`daskrun.monitoring.monitor`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from daskrun.backends.inputs.base import Input as InputKind
from daskrun.backends.inputs.datasets import (
    DatasetConsumptionConfig,
    FileDataset,
    PipelineData,
    TabularDataset,
)
from daskrun.backends.outputs import output_format_for
from daskrun.engine import output as _output
from daskrun.engine.config import ParallelRunConfig, PipelineParameter
from daskrun.engine.description import JobDescription
from daskrun.engine.increment import check_incremental
from daskrun.engine.job import Job
from daskrun.engine.naming import check_parameter_names, check_step_name
from daskrun.engine.runner import (
    Interrupt,
)
from daskrun.exceptions import ConfigError, JobFailedError
from daskrun.monitoring.console import Console
from daskrun.registry.catalog import from_spec
from daskrun.registry.deadletters import failed_items
from daskrun.registry.models import model_refs
from daskrun.registry.records import (
    RunRecord,
    lock_run,
    new_run_id,
    runs_dir,
)
from daskrun.registry.resume import (
    _check_credentials,
    _new_record,
    _with_formats,
)
from daskrun.registry.sources import RunSource
from daskrun.registry.stepinputs import (
    Input,
    _absolute,
    _check_input_specs,
    _check_kinds,
    _check_partitioned,
    _checked_output,
    _checked_sides,
    _concrete,
    _input_type,
    _show,
    _source,
)
from daskrun.registry.stepoutputs import checked_outputs, from_record, named, published
from daskrun.registry.workspace import Datastore, OutputData, Workspace


@dataclass
class StepRun:
    """The outcome of one run of a step.

    Attributes
    ----------
    status : str
        ``"Completed"``, ``"Failed"`` or ``"Canceled"``.
    output_path : str or None
        The final output file; ``None`` unless the run completed with
        ``append_row``.
    error : str or None
        Why the run failed: the threshold, counts and first user error.
    """

    run_id: str
    status: str
    output_path: str | None
    logs_dir: str
    error: str | None
    mini_batches_total: int
    mini_batches_failed: int
    items_total: int
    items_succeeded: int
    items_failed: int
    items_extra: int = 0
    dashboard_link: str | None = None
    name: str = ""
    reused_from: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    workspace: Any = field(default=None, repr=False, compare=False)
    metrics: dict[str, Any] = field(default_factory=dict, repr=False)
    tags: dict[str, Any] = field(default_factory=dict, repr=False)
    output_format: str = "text"
    # outputs=: name -> {"url", "file_name", "format"} (see stepoutputs)
    named_outputs: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: RunRecord, workspace: Any = None) -> StepRun:
        counts = record.counts
        return cls(
            run_id=record.run_id,
            status=record.status,
            output_path=record.output_path,
            logs_dir=record.logs_dir or str(record.folder / "logs"),
            error=record.error,
            mini_batches_total=counts.get("mini_batches_total", 0),
            mini_batches_failed=counts.get("mini_batches_failed", 0),
            items_total=counts.get("items_total", 0),
            items_succeeded=counts.get("items_succeeded", 0),
            items_failed=counts.get("items_failed", 0),
            items_extra=counts.get("items_extra", 0),
            name=record.name,
            reused_from=record.reused_from,
            parameters=record.parameters,
            outputs=record.outputs,
            workspace=workspace,
            metrics=record.metrics,
            tags=record.tags,
            output_format=(record.config or {}).get("output_format", "text"),
            named_outputs=record.named_outputs,
        )

    @property
    def id(self) -> str:
        return self.run_id

    def get_status(self) -> str:
        return self.status

    def get_metrics(self, name: str | None = None) -> dict[str, Any]:
        """What the entry script logged through ``Run.get_context()``."""
        return dict(self.metrics) if name is None else {name: self.metrics[name]}

    def get_tags(self) -> dict[str, Any]:
        return dict(self.tags)

    def get_details(self) -> dict[str, Any]:
        """Status, counts, parameters, outputs and where the logs are."""
        details = asdict(self)
        details.pop("workspace")
        return details

    def get_output_data(self, name: str) -> OutputData:
        """The PipelineData ``name`` this step wrote."""
        if name not in self.outputs:
            raise ConfigError(
                f"step run {self.run_id!r} has no output {name!r}; its outputs: "
                f"{', '.join(self.outputs) or 'none'}"
            )
        if self.workspace is None:
            raise ConfigError(
                f"step run {self.run_id!r} was not loaded from a workspace; use "
                "PipelineRun.get(ws, run_id).find_step_run(name)"
            )
        where = self.outputs[name]
        return OutputData(
            name, Datastore(self.workspace, where["datastore"]), where["path"]
        )

    def resume(
        self,
        retry_failed: bool = False,
        show_output: bool = False,
        replan: bool = False,
        inputs: Sequence[Any] | None = None,
        new_source: bool = False,
    ) -> StepRun:
        """Run again only the mini-batches without a committed result (and,
        with ``retry_failed``, those that failed; with ``replan``, those
        whose inputs changed; with ``new_source``, with the entry script as
        edited since); a run over a Dask collection needs it again as
        ``inputs=[ddf]``; see :func:`resume`."""
        return resume(
            self.run_id,
            retry_failed=retry_failed,
            show_output=show_output,
            workspace=self.workspace,
            replan=replan,
            inputs=inputs,
            new_source=new_source,
        )

    def failed_items(
        self, storage_options: dict[str, Any] | None = None
    ) -> FileDataset | TabularDataset:
        """The inputs that failed, as a data set: a ``FileDataset`` of the
        failed files, or a ``TabularDataset`` of the failed rows (read again
        from the run's inputs and written to ``failed_items/`` in the run
        folder). Register it, or feed it to a new step; its
        ``last_errors`` map each input (a path, or a row range) to its last
        exception, as ``failed_items.csv`` lists them. Remote inputs need
        their ``storage_options`` again unless they come from a datastore of
        the run's workspace."""
        return failed_items(self, storage_options, step_from)

    def to_dask_dataframe(
        self, storage_options: dict[str, Any] | None = None, **kwargs: Any
    ) -> Any:
        """The published output as a lazy Dask dataframe, for the next step
        in Dask: ``dd.read_csv`` of a CSV output, ``dd.read_parquet`` of a
        Parquet one (``kwargs`` go to them). Text output has no columns:
        read it with :meth:`to_bag`. Name a named output: ``("scores")``.

        >>> run.to_dask_dataframe().groupby("label").size()  # doctest: +SKIP
        """
        path, kind, options = self._published(storage_options)
        fmt = output_format_for(kind)
        if not fmt.tabular:
            raise ConfigError(
                f"step run {self.run_id!r} wrote text lines ({path}), which have "
                "no columns; read them with run.to_bag(), or write a table with "
                "output_format='csv' or 'parquet'"
            )
        return fmt.read_frame(path, options, **kwargs)

    def to_bag(self, storage_options: dict[str, Any] | None = None) -> Any:
        """The published output as a lazy Dask bag: its lines (without the
        newline) for text output, one dict per row for CSV and Parquet.

        >>> run.to_bag().filter(lambda line: "cat" in line).count()  # doctest: +SKIP
        """
        path, kind, options = self._published(storage_options)
        fmt = output_format_for(kind)
        return fmt.read_bag(path, options)

    def _published(self, given: Any = None) -> tuple[str, str, dict[str, Any]]:
        """The file, format and storage options to read (given a str: the
        named output's)."""
        if self.output_path is None:
            raise ConfigError(
                f"step run {self.run_id!r} ({self.status}) has no published "
                "output to read; only a Completed run with "
                "output_action='append_row' has one"
            )
        if isinstance(given, str) or self.named_outputs:
            return (*published(self.run_id, self.named_outputs, given), {})
        return self.output_path, self.output_format, dict(given or {})

    def raise_for_status(self) -> StepRun:
        """Raise :class:`~daskrun.JobFailedError` unless the run completed."""
        if self.status != "Completed":
            raise JobFailedError(
                self.error or self.status, status=self.status, run_id=self.run_id
            )
        return self


class ParallelRunStep:
    """Run an entry script over the mini-batches of its inputs.

    Parameters
    ----------
    name : str
        3–32 characters of ``^[a-z]([-a-z0-9]*[a-z0-9])?$``.
    parallel_run_config : ParallelRunConfig
    inputs : data set or list of data sets
        All of one kind (file or tabular); concatenated in the given order.
    output : str, optional
        Output folder, local or fsspec URL; required for ``append_row``.
    side_inputs : list of data sets, optional
        Handed to every worker whole. A side input placed in ``arguments``
        becomes its local path on the worker: the file of a one-file data
        set, else the folder holding its files.
    arguments : list, optional
        ``sys.argv[1:]`` for the script; must start with an option.
    allow_reuse : bool
        Reuse an identical earlier run's output (with a workspace).
    output_storage_options : dict, optional
        fsspec options for a remote ``output`` (credentials stay out of logs).
    outputs : dict, optional
        Named outputs instead of ``output`` (:mod:`~daskrun.registry.stepoutputs`).
    incremental : bool or "inputs"
        Run only the inputs new or changed since the output's last complete
        run, keeping the others' rows; ``"inputs"`` ignores a changed script.

    Examples
    --------
    >>> step = ParallelRunStep(name="score-images", parallel_run_config=cfg,
    ...                        inputs=[Dataset.File.from_files("images/")],
    ...                        output="out/")  # doctest: +SKIP
    >>> step.run().output_path  # doctest: +SKIP
    'out/parallel_run_step.txt'
    """

    def __init__(
        self,
        name: str,
        parallel_run_config: ParallelRunConfig,
        inputs: Any,
        output: Any = None,
        side_inputs: Sequence[Input] | None = None,
        arguments: Sequence[Any] | None = None,
        allow_reuse: bool = True,
        output_storage_options: dict[str, Any] | None = None,
        outputs: dict[str, Any] | None = None,
        incremental: bool | str = False,
    ):
        self.name = check_step_name(name)
        self.incremental = check_incremental(incremental)
        if not isinstance(parallel_run_config, ParallelRunConfig):
            raise ConfigError(
                f"parallel_run_config={parallel_run_config!r} is not a "
                "ParallelRunConfig; build one with ParallelRunConfig(entry_script=...)"
            )
        self.config = parallel_run_config
        cfg = parallel_run_config.resolved
        self.input_specs = _check_input_specs(inputs)
        # the inputs' class (daskrun.backends.inputs.base.Input): what the
        # job asks to plan, count and record them
        self.input_type = _input_type(self.input_specs)
        # as_named_input names, kept in the run record
        self.input_names: list[str | None] = [
            s.name if isinstance(s, DatasetConsumptionConfig) else None
            for s in self.input_specs
        ]
        # mini_batch_size="auto": the job chooses (daskrun.engine.pilot)
        self.mini_batch_size = self.input_type.step_size(cfg)
        self.output_storage_options = dict(output_storage_options or {})
        self.named_outputs = checked_outputs(
            outputs, output, cfg, self.output_storage_options
        )
        if output is None and outputs is None and cfg.output_action == "append_row":
            raise ConfigError(
                "output is required with output_action='append_row'; pass "
                "output='out/' (a folder or fsspec URL), or use "
                "output_action='summary_only'"
            )
        self.output_data, self.output = _checked_output(
            output, self.output_storage_options
        )
        if self.output is not None and os.path.isabs(self.output):  # local
            append_row = cfg.output_action == "append_row"
            final = cfg.append_row_file_name if append_row else None
            _output.check_output_folder(self.output, final)
        self.side_inputs, self.arguments = _checked_sides(side_inputs, arguments)
        self.allow_reuse = bool(allow_reuse)
        # set when bound to a run (see bind())
        self.inputs: list[Input] = (
            [_concrete(spec, {}, {}) for spec in self.input_specs]
            if not any(isinstance(i, PipelineData) for i in self._flat_specs())
            else []
        )
        _check_partitioned(cfg.partition_keys, self.inputs)
        self.run_id: str | None = None
        self.workspace: Any = None
        self.parent_id: str | None = None
        self.experiment: str | None = None
        self.parameter_values: dict[str, Any] = {}
        self.outputs: dict[str, dict[str, str]] = {}
        self.fingerprint: str | None = None

    def _flat_specs(self) -> list[Any]:
        return [_source(s) for s in self.input_specs]

    def pipeline_parameters(self) -> list[PipelineParameter]:
        """The PipelineParameters of this step's config and inputs."""
        found = list(self.config.parameters.values())
        found += [s for s in self._flat_specs() if isinstance(s, PipelineParameter)]
        return found

    def input_data(self) -> list[PipelineData]:
        """The PipelineData this step reads (written by earlier steps)."""
        return [s for s in self._flat_specs() if isinstance(s, PipelineData)]

    def bind(
        self,
        values: dict[str, Any] | None = None,
        produced: dict[str, Input] | None = None,
        workspace: Any = None,
        run_id: str | None = None,
    ) -> ParallelRunStep:
        """A copy with PipelineParameters set from ``values``, PipelineData
        inputs from ``produced`` (by name), and its output placed on the
        workspace's datastore: what one run of this step executes."""
        values = dict(values or {})
        bound = copy.copy(self)
        bound.config = self.config.bind(values)
        cfg = bound.config.resolved
        bound.mini_batch_size = self.input_type.step_size(cfg)
        bound.inputs = [
            _concrete(spec, values, produced or {}, workspace)
            for spec in self.input_specs
        ]
        _check_kinds(bound.inputs)
        _check_partitioned(cfg.partition_keys, bound.inputs)
        bound.workspace = workspace
        bound.run_id = run_id or new_run_id(self.name)
        bound.parameter_values = {
            p.name: _show(values.get(p.name, p.default_value))
            for p in self.pipeline_parameters()
        }
        if self.named_outputs is not None:
            bound.named_outputs = self.named_outputs.bound(workspace, bound.run_id)
            bound.outputs = bound.named_outputs.written()
        if self.output_data is not None:
            if workspace is None:
                raise ConfigError(
                    f"step {self.name!r} writes PipelineData "
                    f"{self.output_data.name!r}; run it in a Pipeline submitted "
                    "with an Experiment of a Workspace"
                )
            store = self.output_data.datastore or workspace.get_default_datastore()
            path = f"daskrun/{bound.run_id}/{self.output_data.name}"
            bound.output = _absolute(store.url(path), store.storage_options)
            bound.output_storage_options = store.storage_options
            bound.outputs = {
                self.output_data.name: {"datastore": store.name, "path": path}
            }
        return bound

    def __repr__(self) -> str:
        return f"ParallelRunStep(name={self.name!r}, inputs={self.inputs!r})"

    @property
    def kind(self) -> str:
        """The inputs' kind, as the run record keeps it."""
        return self.input_type.kind

    @property
    def dataset_name(self) -> str | None:
        """The inputs' name (``as_named_input``, else registered) when they
        share one, for the run record; else ``None``."""
        names = {
            given or ds.name
            for given, ds in zip(self.input_names, self.inputs, strict=False)
        }
        return names.pop() if len(names) == 1 else None

    def describe(
        self,
        run_id: str | None = None,
        auto_recorded: dict[str, Any] | None = None,
    ) -> JobDescription:
        """What one run of this bound step hands the engine: a frozen
        :class:`~daskrun.engine.description.JobDescription` (its run folder
        under the workspace's runs folder, else ``daskrun.runs-dir``; the
        workspace's registered models; a resumed run's ``"auto"`` choice)."""
        workspace = self.workspace
        return JobDescription(
            name=self.name,
            config=self.config,
            input_type=self.input_type,
            inputs=tuple(self.inputs),
            mini_batch_size=self.mini_batch_size,
            run_id=run_id or self.run_id or new_run_id(self.name),
            runs_root=runs_dir() if workspace is None else workspace.runs_dir,
            side_inputs=tuple(self.side_inputs),
            arguments=tuple(self.arguments),
            output=self.output,
            output_storage_options=dict(self.output_storage_options),
            experiment=self.experiment,
            parent_id=self.parent_id,
            dataset_name=self.dataset_name,
            auto_recorded=dict(auto_recorded or {}),
            models=None if workspace is None else tuple(model_refs(workspace)),
            outputs=named(self.named_outputs),
            incremental=self.incremental,
        )

    def plan(self) -> tuple[Iterable[Any], int]:
        """The mini-batch plans (lazily, for file inputs) and their count,
        at the step's own sizes (see :meth:`JobDescription.plan`)."""
        return self.describe().plan()

    def run(
        self,
        pipeline_parameters: dict[str, Any] | None = None,
        workspace: Any = None,
        show_output: bool = False,
    ) -> StepRun:
        """Run the step synchronously and return its :class:`StepRun`.

        A job that fails returns a StepRun with ``status="Failed"``; call
        :meth:`StepRun.raise_for_status` to get an exception instead. Bad
        parameters and inputs raise :class:`~daskrun.ConfigError` or
        :class:`~daskrun.InputError` before any task runs.
        """
        values = dict(pipeline_parameters or {})
        check_parameter_names(values, self.pipeline_parameters())
        if self.input_data():
            raise ConfigError(
                f"step {self.name!r} reads PipelineData "
                f"{self.input_data()[0].name!r}; run it in a Pipeline with the "
                "step that writes it"
            )
        bound = self.bind(values, workspace=workspace)
        return _execute(bound, bound.describe(), console=Console(show_output))


def _execute(
    step: ParallelRunStep,
    described: JobDescription,
    *,
    console: Console,
    resume: RunRecord | None = None,
    retry_failed: bool = False,
    replan: bool = False,
    interrupt: Interrupt | None = None,
    source: RunSource | None = None,
) -> StepRun:
    """Run a bound step as a :class:`~daskrun.engine.job.Job` of
    ``described`` (:meth:`ParallelRunStep.describe`), with a new run
    record or the one being resumed (``source``: where its code is); a
    resume whose inputs changed is refused unless ``replan``, one whose
    code changed unless ``source.new_source``."""
    run_id, root = described.run_id, described.runs_root
    job = Job(described, console=console, interrupt=interrupt)
    if source is not None:  # before any cluster starts
        source.check(job.bundle[0])
    with job.opening():
        job.plan(resume.inputs_digest if resume else None, replan=replan)
        record = resume or _new_record(step, run_id, job.plugin, root)
        if resume is None:  # resume() holds the run's lock already
            job.hold(lock_run(record))
        job.open(record, resuming=resume is not None, retry_failed=retry_failed)
        if source is not None:
            source.keep(job.plugin.settings.bundle)
    job.run(record)
    run = StepRun.from_record(record, step.workspace)
    run.dashboard_link = job.link
    return run


def resume(
    run_id: str,
    *,
    retry_failed: bool = False,
    show_output: bool = False,
    storage_options: dict[str, Any] | None = None,
    compute_target: Any = None,
    workspace: Any = None,
    replan: bool = False,
    inputs: Sequence[Any] | None = None,
    new_source: bool = False,
) -> StepRun:
    """Resume a failed, canceled or interrupted run where it stopped.

    Mini-batches with a committed result are not run again; with
    ``retry_failed`` those that failed are run again too. The final output
    is the same as an uninterrupted run's. The entry script's folder ships
    as it is now; if its Python files changed since the run, the resume is
    refused (:class:`~daskrun.ConfigError`, naming them) unless
    ``new_source``, which runs the edited code on what is left: fix a
    script, then resume. Where the folder is gone, the run's recorded copy
    runs (see :mod:`daskrun.registry.sources`). The run's inputs are listed again;
    if a file was added, removed or changed since the run, the resume is
    refused (:class:`~daskrun.InputError`) unless ``replan``, which keeps the
    committed mini-batches whose inputs are unchanged and runs the rest.
    Remote inputs need their ``storage_options`` again, since run records
    never hold credentials, unless they come from a datastore of the run's
    ``workspace``. A run over a Dask collection needs the collection again
    (``inputs=[ddf]``): one whose token (``dask.base.tokenize``) differs from
    the run's is refused (:class:`~daskrun.InputError`). So does a run whose
    inputs were URLs with a SAS signature (``...&sig=...``), which run
    records never keep: ``inputs=[url, ...]`` again, in the run's order. One
    resume of a run
    at a time: another one, or one of a
    run still in progress, is refused at once (:class:`~daskrun.ConfigError`).

    >>> run = daskrun.resume("score-images_20261122T010203_a1b2c3")  # doctest: +SKIP
    """

    root = workspace.runs_dir if workspace is not None else None
    with lock_run(RunRecord.load(run_id, root)):
        # read again under the lock: a resume that just ended changed it
        record = RunRecord.load(run_id, root)
        return _resume(
            record,
            retry_failed=retry_failed,
            show_output=show_output,
            storage_options=storage_options,
            compute_target=compute_target,
            workspace=workspace,
            replan=replan,
            given=inputs,
            new_source=new_source,
        )


def _resume(
    record: RunRecord,
    *,
    retry_failed: bool,
    show_output: bool,
    storage_options: dict[str, Any] | None,
    compute_target: Any,
    workspace: Any,
    replan: bool,
    given: Sequence[Any] | None = None,
    new_source: bool = False,
) -> StepRun:
    run_id = record.run_id
    if workspace is None and record.workspace:
        workspace = Workspace(record.workspace)
    if record.status == "Completed" and not (retry_failed or replan):
        raise ConfigError(
            f"run {run_id!r} already completed; pass retry_failed=True "
            "(--retry-failed) to run its failed mini-batches again, or "
            "replan=True (--replan) to run those whose inputs changed"
        )
    if given is None:  # inputs given again carry what they read with
        _check_credentials(record, storage_options, "resume()")
    source = RunSource(record, new_source)
    step = step_from(
        record, storage_options, compute_target, workspace, given, source.location()
    )
    return _execute(
        step,
        step.describe(run_id, record.auto),
        console=Console(show_output),
        resume=record,
        retry_failed=retry_failed,
        replan=replan,
        source=source,
    )


def step_from(
    record: RunRecord,
    storage_options: dict[str, Any] | None,
    compute_target: Any,
    workspace: Any,
    given: Sequence[Any] | None = None,
    location: tuple[str, str | None] | None = None,
) -> ParallelRunStep:
    """The step a run record describes, rebuilt in this one place: its code
    (``location``, the entry script and its folder, else the recorded copy
    unpacked into the run folder), config, inputs (a Dask collection's:
    ``given`` again, checked; URLs whose signature the record hides:
    ``given`` again, in the run's order), output and arguments. Its
    ``describe(record.run_id, record.auto)`` is the job the run was."""
    script, folder = location or RunSource(record).unpacked()
    config = dict(record.config)
    config["entry_script"], config["source_directory"] = script, folder
    cfg = ParallelRunConfig(compute_target=compute_target, **config)
    options = storage_options or {}
    inputs: list[Input]
    if record.input_specs and workspace is not None:  # registered data sets
        inputs = [from_spec(spec, workspace) for spec in record.input_specs]
    else:
        inputs = InputKind.of_kind(record.kind).from_record(
            record, given, options, lambda: _with_formats(record, given)
        )
    output_options: dict[str, Any] = {}
    for where in record.outputs.values():
        output_options = Datastore(workspace, where["datastore"]).storage_options
    step = ParallelRunStep(
        record.name,
        cfg,
        inputs=inputs,
        output=record.output,
        arguments=record.arguments,
        output_storage_options=output_options or options,
        outputs=from_record(record.named_outputs, workspace) or None,
        incremental=record.incremental or False,
    )
    step.workspace = workspace
    step.outputs = record.outputs
    step.input_names = list(record.input_names) or step.input_names
    return step
