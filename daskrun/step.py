"""``ParallelRunStep``: one entry script over one input, and its ``StepRun``.

``step.run()`` validates everything, plans the mini-batches, connects to the
compute target, registers the entry script as a worker plugin, runs the
mini-batches (:mod:`daskrun.runner`), assembles the output
(:mod:`daskrun.output`) and writes the log folder (:mod:`daskrun.monitor`).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import os
import re
import secrets
import shutil
import sys
import threading
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, astuple, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from . import output as _output
from .catalog import from_spec
from .cluster import connect, dashboard_link
from .config import (
    ParallelRunConfig,
    PipelineParameter,
    check_arguments,
    check_parameter_names,
    check_step_name,
    config_get,
    mini_batch_size_for,
    unmet_packages,
)
from .dashboard import install_page, publish
from .datasets import (
    CsvBatch,
    Dataset,
    DatasetConsumptionConfig,
    FileBatch,
    FileDataset,
    PipelineData,
    TabularDataset,
    plan_files,
)
from .delimited import count_csv_rows
from .exceptions import ConfigError, EntryScriptError, InputError, JobFailedError
from .models import model_refs
from .monitor import (
    DISTRIBUTED_LOG,
    REPORT,
    Console,
    JobLogs,
    Pace,
    distributed_log,
    init_done,
)
from .plugin import (
    EntryScriptPlugin,
    InputSpec,
    SideInput,
    TryResult,
    build_bundle,
)
from .records import (
    SOURCE,
    PlanLedger,
    RunRecord,
    lock_run,
    now,
    read_report,
    runs_dir,
)
from .runner import (
    Canceled,
    Counts,
    Interrupt,
    LostTasks,
    Tally,
    run_mini_batches,
    threshold_error,
)
from .storage import FileLock, describe_error, secret_values, within
from .workspace import Datastore, OutputData

logger = logging.getLogger("daskrun")

Input = FileDataset | TabularDataset


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
    ) -> StepRun:
        """Run again only the mini-batches without a committed result (and,
        with ``retry_failed``, those that failed; with ``replan``, those
        whose inputs changed); see :func:`resume`."""
        return resume(
            self.run_id,
            retry_failed=retry_failed,
            show_output=show_output,
            workspace=self.workspace,
            replan=replan,
        )

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
    ):
        self.name = check_step_name(name)
        if not isinstance(parallel_run_config, ParallelRunConfig):
            raise ConfigError(
                f"parallel_run_config={parallel_run_config!r} is not a "
                "ParallelRunConfig; build one with ParallelRunConfig(entry_script=...)"
            )
        self.config = parallel_run_config
        cfg = parallel_run_config.resolved
        self.input_specs = _check_input_specs(inputs)
        self.kind = _kind_of(self.input_specs)
        self.mini_batch_size = mini_batch_size_for(self.kind, cfg.mini_batch_size)
        if output is None and cfg.output_action == "append_row":
            raise ConfigError(
                "output is required with output_action='append_row'; pass "
                "output='out/' (a folder or fsspec URL), or use "
                "output_action='summary_only'"
            )
        self.output_storage_options = dict(output_storage_options or {})
        self.output_data: PipelineData | None = None
        if isinstance(output, PipelineData):
            self.output_data = output
            self.output: str | None = None
        elif output is None:
            self.output = None
        else:
            self.output = _absolute(os.fspath(output), self.output_storage_options)
            if os.path.isabs(self.output):  # a local folder
                _output.check_output_folder(
                    self.output,
                    cfg.append_row_file_name
                    if cfg.output_action == "append_row"
                    else None,
                )
        self.side_inputs = list(side_inputs or [])
        for side in self.side_inputs:
            if not isinstance(side, (FileDataset, TabularDataset)):
                raise ConfigError(
                    f"side_inputs item {side!r} is not a data set; use "
                    "Dataset.File.from_files(path)"
                )
        self.arguments = check_arguments(arguments)
        for arg in self.arguments:
            if isinstance(arg, (FileDataset, TabularDataset)) and not any(
                arg is side for side in self.side_inputs
            ):
                raise ConfigError(
                    f"argument {arg!r} is a data set that is not in side_inputs; "
                    "add it to side_inputs so every worker gets it"
                )
        self.allow_reuse = bool(allow_reuse)
        # set when bound to a run (see bind())
        self.inputs: list[Input] = (
            [_concrete(spec, {}, {}) for spec in self.input_specs]
            if not any(isinstance(i, PipelineData) for i in self._flat_specs())
            else []
        )
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
        bound.mini_batch_size = mini_batch_size_for(self.kind, cfg.mini_batch_size)
        bound.inputs = [
            _concrete(spec, values, produced or {}, workspace)
            for spec in self.input_specs
        ]
        _check_kinds(bound.inputs)
        bound.workspace = workspace
        bound.run_id = run_id or new_run_id(self.name)
        bound.parameter_values = {
            p.name: _show(values.get(p.name, p.default_value))
            for p in self.pipeline_parameters()
        }
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

    def plan(self) -> tuple[Iterable[Any], int]:
        """The mini-batch plans (lazily, for file inputs) and their count.

        The step's own output file is never an input, even where the output
        folder lies inside an input folder (daskrun's parts are left out of
        every listing).
        """
        own = self._own_output()
        if self.kind == "file":
            files = (
                self.inputs[0].files()
                if len(self.inputs) == 1
                else [f for ds in self.inputs for f in ds.files()]
            )
            if own is not None and own in files:
                files = [f for f in files if f != own]
            count = math.ceil(len(files) / self.mini_batch_size)
            return plan_files(files, self.mini_batch_size), count
        batches: list[Any] = []
        for ds in self.inputs:
            assert isinstance(ds, TabularDataset)
            batches.extend(
                ds.plan(self.mini_batch_size, start=len(batches), exclude=own)
            )
        return batches, len(batches)

    def _own_output(self) -> str | None:
        """The final output file as data set listings name it."""
        cfg = self.config.resolved
        if self.output is None or cfg.output_action != "append_row":
            return None
        return f"{self.output.rstrip('/')}/{cfg.append_row_file_name}"

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
        return _execute(
            self.bind(values, workspace=workspace), console=Console(show_output)
        )


def _check_input_specs(inputs: Any) -> list[Any]:
    specs = (PipelineParameter, PipelineData, DatasetConsumptionConfig)
    single = (FileDataset, TabularDataset, *specs)
    items = [inputs] if isinstance(inputs, single) else inputs
    if isinstance(items, (str, os.PathLike)) or not isinstance(items, Sequence):
        raise ConfigError(
            f"inputs={inputs!r} is not a data set; use "
            "inputs=[Dataset.File.from_files(path)]"
        )
    items = list(items)
    if not items:
        raise ConfigError(
            "inputs=[] is empty; pass at least one data set, e.g. "
            "[Dataset.File.from_files('images/')]"
        )
    for item in items:
        if not isinstance(_default(item), (FileDataset, TabularDataset, PipelineData)):
            raise ConfigError(
                f"inputs item {item!r} is not a data set; use "
                f"Dataset.File.from_files({item!r}) or "
                f"Dataset.Tabular.from_delimited_files({item!r})"
            )
    return items


def _source(item: Any) -> Any:
    """What an input names: a data set, a PipelineParameter or PipelineData."""
    return item.source if isinstance(item, DatasetConsumptionConfig) else item


def _default(item: Any) -> Any:
    """An input's data set (a PipelineParameter's default) or PipelineData."""
    source = _source(item)
    return source.default_value if isinstance(source, PipelineParameter) else source


def _kind_of(specs: list[Any]) -> str:
    kinds = set()
    for item in specs:
        source = _default(item)
        kinds.add("file" if isinstance(source, PipelineData) else source.kind)
    if len(kinds) > 1:
        raise ConfigError(
            f"inputs mix kinds {sorted(kinds)}; all inputs of one step must be "
            "file data sets, or all tabular"
        )
    return kinds.pop()


def _check_kinds(items: list[Input]) -> None:
    kinds = {(i.kind, getattr(i, "file_format", None)) for i in items}
    if len(kinds) > 1:
        raise ConfigError(
            f"inputs mix kinds {sorted(str(k) for k in kinds)}; all inputs of one "
            "step must be file data sets, or all tabular of one format"
        )


def _concrete(
    spec: Any,
    values: dict[str, Any],
    produced: dict[str, Input],
    workspace: Any = None,
) -> Input:
    """The data set an input spec stands for in one run."""
    source = _source(spec)
    if isinstance(source, PipelineParameter):
        value = values.get(source.name, source.default_value)
        if isinstance(value, str) and workspace is not None:
            value = Dataset.get_by_name(workspace, value)
        if not isinstance(value, (FileDataset, TabularDataset)):
            raise ConfigError(
                f"pipeline parameter {source.name!r}={value!r} is not a data set; "
                "pass a data set (Dataset.File.from_files(...)) or the name of one "
                "registered in the workspace"
            )
        return value
    if isinstance(source, PipelineData):
        if source.name not in produced:
            raise ConfigError(
                f"PipelineData {source.name!r} is read before any step wrote it; "
                "add the step that writes it to the same Pipeline"
            )
        return produced[source.name]
    return source


def _show(value: Any) -> Any:
    """A parameter value as a run record shows it."""
    if isinstance(value, (FileDataset, TabularDataset)):
        return repr(value)
    return value


def _absolute(path: str, storage_options: dict[str, Any]) -> str:
    fs, stripped = url_to_fs(path, **storage_options)
    return os.path.abspath(stripped) if isinstance(fs, LocalFileSystem) else path


def new_run_id(step_name: str) -> str:
    """``<step>_<UTC time>_<random>``, sortable by start time."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{step_name}_{stamp}_{secrets.token_hex(3)}"


def _entry_script_plugin(
    step: ParallelRunStep,
    run_id: str,
    output_path: str,
    target: _output.OutputTarget | None,
    bundle: tuple[Path, str],
) -> EntryScriptPlugin:
    cfg = step.config.resolved
    zipped, script = bundle
    sides = {
        id(ds): SideInput(n, tuple(ds.files()), ds.storage_options, ds.local)
        for n, ds in enumerate(step.side_inputs)
    }
    first = step.inputs[0]
    return EntryScriptPlugin(
        name=f"daskrun-{run_id}",
        # at most 300 MB (build_bundle refuses more): bytes travel to workers
        # that cannot see the client's disk
        bundle=zipped.read_bytes(),
        script=script,
        script_display=cfg.entry_script,
        source_directory=cfg.source_directory,
        experiment=step.experiment,
        parent_id=step.parent_id,
        arguments=[sides.get(id(a), a) for a in step.arguments],
        side_inputs=list(sides.values()),
        environment_variables=cfg.environment_variables,
        output_path=output_path,
        input_spec=InputSpec(
            kind=step.kind,
            storage_options=first.storage_options,
            pandas_kwargs=getattr(first, "pandas_kwargs", {}),
            local=all(ds.local for ds in step.inputs),
        ),
        output=target,
        run_invocation_timeout=cfg.run_invocation_timeout,
        models=None if step.workspace is None else model_refs(step.workspace),
        logging_level=cfg.logging_level,
        secrets=[
            secret
            for options in (
                *(ds.storage_options for ds in (*step.inputs, *step.side_inputs)),
                step.output_storage_options,
            )
            for secret in secret_values(options)
        ],
    )


def _execute(
    step: ParallelRunStep,
    *,
    console: Console,
    resume: RunRecord | None = None,
    retry_failed: bool = False,
    replan: bool = False,
    interrupt: Interrupt | None = None,
) -> StepRun:
    """Run a bound step; ``interrupt`` (triggered from another thread) stops
    it, ``Canceled`` or ``Failed``, cancelling what is in flight. A resume
    whose inputs changed is refused unless ``replan``."""
    interrupt = interrupt or Interrupt()
    cfg = step.config.resolved
    started = time.perf_counter()
    # planning lists and measures the inputs: a missing or empty input fails
    # here, before any worker starts
    batches, total = step.plan()
    bundle = build_bundle(
        cfg.entry_script, cfg.source_directory, exclude=_not_source(step)
    )
    items_planned, items_counted = _planned_items(step, batches)
    run_id = resume.run_id if resume else (step.run_id or new_run_id(step.name))
    root = step.workspace.runs_dir if step.workspace is not None else runs_dir()
    run_dir = root / run_id
    target = (
        _output.OutputTarget(
            step.output,
            cfg.append_row_file_name,
            run_id,
            step.output_storage_options,
            cfg.output_format,
            float(config_get("storage-timeout")),
        )
        if step.output is not None and cfg.output_action == "append_row"
        else None
    )
    # before any work or run folder: an unreachable store fails within its
    # timeout, and a second run into this output folder is refused
    locks = contextlib.ExitStack()
    if target is not None and (lock := _prepare_output(target)) is not None:
        locks.callback(lock.release)
    with _released_on_error(locks):
        ledger = PlanLedger(run_dir)
        try:
            _fill_ledger(step, batches, ledger)
        except BaseException:
            ledger.discard()
            raise
        # 1 for each mini-batch whose plan and input files are as the run had
        unchanged: bytearray | None = None
        if resume is not None and resume.inputs_digest not in (None, ledger.digest):
            if not replan:
                changes = ledger.changes()
                ledger.discard()
                raise InputError(
                    f"input changed since run {run_id!r}: {changes}; rerun the "
                    "step, or resume with --replan (replan=True) to keep the "
                    "mini-batches whose inputs are unchanged and run the rest"
                )
            unchanged = ledger.unchanged()
        output_path = step.output or str(run_dir / "outputs")
        if step.output is None:
            os.makedirs(output_path, exist_ok=True)
        plugin = _entry_script_plugin(step, run_id, output_path, target, bundle)
        record = resume or _new_record(step, run_id, plugin, root)
        if resume is None:  # resume() holds the run's lock already
            locks.enter_context(lock_run(record))
        ledger.commit()
        record.inputs_digest = ledger.digest
        tally = Tally(mini_batches_total=total, count_items=_item_counter(step))
        succeeded = bytearray(total)  # one byte per mini-batch: flat for millions
        # 1: finished in an earlier attempt, in its report; 2: its part is
        # committed but the report missed it (the client died in between)
        done = bytearray(total)
        kept = []
        # a part may be gone (deleted by hand, or published and removed): its
        # mini-batch runs again, even where the report says it succeeded
        parts = bytearray(total)
        if resume is not None and target is not None:
            for index in _output.committed_parts(target):
                if index < total and (unchanged is None or unchanged[index]):
                    parts[index] = 1
        if resume is not None:
            for row in read_report(run_dir / "logs" / REPORT):
                if (
                    row.index < total
                    and (row.ok or not retry_failed)
                    and (unchanged is None or unchanged[row.index])
                    and (not row.ok or target is None or parts[row.index])
                ):
                    kept.append(row.row)
                    done[row.index], succeeded[row.index] = 1, row.ok
                    tally.mini_batches_done += 1
                    tally.mini_batches_failed += not row.ok
                    tally.add(_row_counts(row.row))
        logs = JobLogs(run_dir / "logs", kept, retry_failed=retry_failed)
        # a part committed after the last report row (the client died in
        # between) is done too
        for index in range(total) if resume is not None and target is not None else ():
            if parts[index] and not done[index]:
                done[index], succeeded[index] = 2, 1

        say = console.say
        watch = _Watch(logs, tally, console)
        timings: dict[str, float] = {}

        def on_done(batch: Any, result: TryResult, tries: int, counts: Counts) -> None:
            interrupt.check()
            timings.setdefault("first_result", time.perf_counter() - started)
            succeeded[result.index] = result.ok
            watch.pace.add(result.seconds)
            logs.mini_batch(result, tries, counts)
            logs.user_output(result)
            if counts.failed:
                logs.failed_items(batch, result)
            watch.tick()
            if not result.ok:
                say(
                    f"daskrun: mini-batch {result.index} failed after {tries} "
                    f"{'try' if tries == 1 else 'tries'} on {result.worker}: "
                    f"{result.error}"
                )

        def to_run() -> Iterator[Any]:
            for batch in batches:
                if not done[batch.index]:
                    yield batch
                elif done[batch.index] == 2:
                    counts = _part_counts(target, batch)
                    tally.mini_batches_done += 1
                    tally.add(counts)
                    logs.mini_batch(_earlier(batch.index), 1, counts)

    status, error, final, link = "Failed", None, None, None
    record.status, record.error = "Running", None
    record.save()
    try:
        with (
            # distributed's own lines go to the log folder, not the terminal
            distributed_log(logs.dir / DISTRIBUTED_LOG),
            connect(
                step.config.compute_target,
                cfg.node_count,
                cfg.process_count_per_node,
                on_lost=lambda reason: interrupt.trigger(
                    reason.replace("RUN_ID", run_id)
                ),
                security=step.config.security,
                log_file=logs.dir / DISTRIBUTED_LOG,
            ) as client,
        ):
            timings["cluster_ready"] = time.perf_counter() - started
            link = dashboard_link(client)
            verb = "resuming" if resume else "run"
            say(f"daskrun: {verb} {run_id}: {total} mini-batches")
            if link:
                page = install_page(client, link)
                say(
                    f"daskrun: dashboard {link}"
                    + (f" (this job: {page})" if page else "")
                )
            watch.client, watch.run_id = client, run_id
            console.start(total, tally.mini_batches_done)
            _check_environment(client, step.config.environment, run_id)
            _register_watched(
                client, plugin, cfg.run_invocation_timeout, run_id, console
            )
            timings["init_done"] = time.perf_counter() - started
            console.running(tally)
            logs.running(tally)
            watch.pace.threads = sum(client.nthreads().values()) or 1
            try:
                exceeded = run_mini_batches(
                    client,
                    plugin.events_topic,
                    plugin.name,
                    to_run(),
                    tally,
                    cfg,
                    key_prefix=f"{step.name}-{run_id[-6:]}",
                    on_done=on_done,
                    interrupt=interrupt,
                    starts_topic=plugin.starts_topic,
                    redact=plugin.redact,
                )
            finally:
                _unregister(client, plugin.name)
        if exceeded:
            error = str(threshold_error(exceeded, tally, cfg, run_id))
        else:
            if target is not None:
                final = _output.assemble(
                    target,
                    (i for i in range(total) if succeeded[i]),
                    lambda index: _describe(step, batches, index),
                )
                if not tally.mini_batches_failed:
                    # kept otherwise, for a resume with retry_failed
                    _output.remove_parts(target)
            status = "Completed"
    except JobFailedError as e:
        error = str(e)
    except Canceled as e:
        status, error = "Canceled", str(e)
        say(f"daskrun: canceled; resume with: daskrun resume {run_id}")
    except KeyboardInterrupt:
        status, error = "Canceled", "canceled by the user (KeyboardInterrupt)"
        print(
            f"daskrun: canceled; resume with: daskrun resume {run_id}", file=sys.stderr
        )
        raise
    finally:
        console.close()
        watch.tick(status, force=True)
        record.status, record.error, record.ended = status, error, now()
        record.counts = tally.counts()
        record.output_path, record.logs_dir = final, str(logs.dir)
        record.add_logged(logs.logged)
        record.save()
        logs.finish(
            status=status,
            run_id=run_id,
            tally=tally,
            error=error,
            output_path=final,
            seconds=time.perf_counter() - started,
            timings=timings,
            items_planned=items_planned,
            items_counted=items_counted,
        )
        locks.close()
    run = StepRun.from_record(record, step.workspace)
    run.dashboard_link = link
    if tally.items_extra:
        logger.warning(
            "run %s: run() returned %d more results than inputs; they are in the "
            "output (see processed_mini-batches.csv)",
            run_id,
            tally.items_extra,
        )
    say(f"daskrun: {status}: {tally.progress()}")
    if status == "Failed" and error:
        say(f"daskrun: {error.splitlines()[0]}")
        # an init() that failed has its traceback in the error
        where = _user_frame(
            tally.first_failure.traceback if tally.first_failure else error,
            cfg.source_directory or cfg.entry_script,
        )
        if where:
            say(f"daskrun: raised at {where}")
    return run


def _not_source(step: ParallelRunStep) -> list[str]:
    """What the source directory may hold that is data, not code: the
    step's local input folders and files, and its output folder. Inputs
    reach the workers as paths; they are never shipped with the script."""
    source = step.config.resolved.source_directory
    if source is None:
        return []
    root = os.path.realpath(source) + os.sep
    found = [step.output] if step.output and os.path.isabs(step.output) else []
    for ds in [*step.inputs, *step.side_inputs]:
        if not ds.local:
            continue
        folders = [p for p in ds.given if os.path.isdir(p)]
        found += folders  # not walked: their files need no naming
        if len(folders) < len(ds.given):  # files or globs
            found += [f for f in ds.files() if f.startswith(root)]
    return found


def _planned_items(step: ParallelRunStep, batches: Any) -> tuple[int | None, str]:
    """The items the plan holds, and how job_result.txt counts them: the
    files of file inputs, the rows of Parquet inputs (from their metadata);
    ``None`` for CSV, whose rows are known only once read."""
    if step.kind == "file":
        own = step._own_output()
        n = 0
        for ds in step.inputs:
            files = ds.files()
            n += len(files) - (own is not None and own in files)
        return n, "files planned"
    if all(b.n_items is not None for b in batches):
        return sum(b.n_items for b in batches), "rows planned (Parquet metadata)"
    return None, (
        f"rows of finished mini-batches (CSV rows are counted as they are "
        f"read; {len(batches)} mini-batches planned)"
    )


def _prepare_output(target: _output.OutputTarget) -> FileLock | None:
    """Lock a local output folder for this run, and make the parts folder,
    within ``daskrun.storage-timeout`` on remote storage."""
    lock = _output.lock_output(target) if target.local else None
    try:
        _output.prepare_parts(target)
    except BaseException as e:
        if lock is not None:
            lock.release()
        if isinstance(e, _output.OutputError):
            raise ConfigError(str(e)) from None
        if isinstance(e, Exception):
            raise ConfigError(
                f"output={target.url!r} cannot be written: "
                f"{describe_error(e, target.storage_options)}; check the output "
                "storage's endpoint and credentials"
            ) from None
        raise
    return lock


def _describe(step: ParallelRunStep, batches: Iterable[Any], index: int) -> str:
    """``mini-batch <index> (<its inputs>)``, for errors about its result."""
    if isinstance(batches, list):
        batch = batches[index]
    else:  # file inputs, planned lazily: their lists are kept
        files = [f for ds in step.inputs for f in ds.files()]
        n = step.mini_batch_size
        batch = FileBatch.of(index, files[index * n : (index + 1) * n])
    return f"mini-batch {index} ({batch.describe()})"


def resume(
    run_id: str,
    *,
    retry_failed: bool = False,
    show_output: bool = False,
    storage_options: dict[str, Any] | None = None,
    compute_target: Any = None,
    workspace: Any = None,
    replan: bool = False,
) -> StepRun:
    """Resume a failed, canceled or interrupted run where it stopped.

    Mini-batches with a committed result are not run again; with
    ``retry_failed`` those that failed are run again too. The final output
    is the same as an uninterrupted run's. The run's inputs are listed again;
    if a file was added, removed or changed since the run, the resume is
    refused (:class:`~daskrun.InputError`) unless ``replan``, which keeps the
    committed mini-batches whose inputs are unchanged and runs the rest.
    Remote inputs need their ``storage_options`` again, since run records
    never hold credentials, unless they come from a datastore of the run's
    ``workspace``. One resume of a run at a time: another one, or one of a
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
) -> StepRun:
    from .workspace import Workspace

    run_id = record.run_id
    if workspace is None and record.workspace:
        workspace = Workspace(record.workspace)
    if record.status == "Completed" and not (retry_failed or replan):
        raise ConfigError(
            f"run {run_id!r} already completed; pass retry_failed=True "
            "(--retry-failed) to run its failed mini-batches again, or "
            "replan=True (--replan) to run those whose inputs changed"
        )
    if record.remote_inputs and storage_options is None and not record.input_specs:
        raise ConfigError(
            f"run {run_id!r} reads remote inputs; pass their storage_options to "
            "resume(), since run records never hold credentials"
        )
    source = record.folder / "source"
    shutil.rmtree(source, ignore_errors=True)
    with zipfile.ZipFile(record.folder / SOURCE) as zf:
        zf.extractall(source)
    config = dict(record.config)
    config.pop("source_directory")
    config["entry_script"] = record.script
    cfg = ParallelRunConfig(
        source_directory=str(source), compute_target=compute_target, **config
    )
    options = storage_options or {}
    if record.input_specs and workspace is not None:
        inputs: list[Input] = [
            from_spec(spec, workspace) for spec in record.input_specs
        ]
    elif record.kind == "file":
        inputs = [FileDataset(p, storage_options=options) for p in record.inputs]
    else:
        inputs = [
            TabularDataset(
                p,
                file_format=record.file_format or "csv",
                storage_options=options,
                pandas_kwargs=record.pandas_kwargs,
            )
            for p in record.inputs
        ]
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
    )
    step.workspace = workspace
    step.outputs = record.outputs
    return _execute(
        step,
        console=Console(show_output),
        resume=record,
        retry_failed=retry_failed,
        replan=replan,
    )


def _new_record(
    step: ParallelRunStep, run_id: str, plugin: EntryScriptPlugin, root: Path
) -> RunRecord:
    record = RunRecord(
        run_id=run_id,
        root=str(root),
        name=step.name,
        status="Running",
        parent_id=step.parent_id,
        experiment=step.experiment,
        parameters=step.parameter_values,
        outputs=step.outputs,
        fingerprint=step.fingerprint,
        workspace=None if step.workspace is None else str(step.workspace.path),
        kind=step.kind,
        file_format=getattr(step.inputs[0], "file_format", None),
        inputs=[_path_spec(ds) for ds in step.inputs],
        input_specs=_input_specs(step.inputs),
        pandas_kwargs=getattr(step.inputs[0], "pandas_kwargs", {}),
        remote_inputs=not plugin.input_spec.local,
        output=step.output,
        config=asdict(step.config.resolved),
        script=plugin.script,
        arguments=[str(a) for a in step.arguments],
    )
    record.folder.mkdir(parents=True, exist_ok=True)
    (record.folder / SOURCE).write_bytes(plugin.bundle)
    return record


@contextlib.contextmanager
def _released_on_error(locks: contextlib.ExitStack) -> Iterator[None]:
    """Release ``locks`` if the block raises; else they stay held."""
    try:
        yield
    except BaseException:
        locks.close()
        raise


def _fill_ledger(step: ParallelRunStep, batches: Iterable[Any], ledger: Any) -> None:
    """Record the step's input files and a digest of each planned mini-batch
    (what it reads, and its files' sizes and mtimes) in ``ledger``."""
    own = step._own_output()  # never an input: step.plan() leaves it out
    stamps = (
        stamp
        for stamp in itertools.chain.from_iterable(ds.stamps() for ds in step.inputs)
        if stamp[0] != own
    )
    if step.kind == "file":
        for batch in step.plan()[0]:  # a fresh plan: ``batches`` is lazy
            got = list(itertools.islice(stamps, batch.n_items))
            for path, size, stamp in got:
                ledger.file(path, size, stamp)
            ledger.mini_batch(batch.joined, [(size, stamp) for _, size, stamp in got])
        return
    known: dict[str, tuple[int, str]] = {}
    for path, size, stamp in stamps:
        ledger.file(path, size, stamp)
        known[path] = (size, stamp)
    for batch in batches:
        ledger.mini_batch(astuple(batch)[1:], [known.get(batch.path)])


def _input_specs(inputs: list[Input]) -> list[dict[str, Any]]:
    """The data sets as workspace specs, when all come from datastores or
    local paths (so a resume gets credentials from the workspace)."""
    try:
        return [ds.spec() for ds in inputs]
    except ConfigError:
        return []


def _path_spec(dataset: Input) -> Any:
    path = dataset._path
    if isinstance(path, (str, os.PathLike)):
        return os.fspath(path)
    return [os.fspath(p) for p in path]


def _item_counter(step: ParallelRunStep) -> Any:
    """Counts the rows of a CSV mini-batch that failed unread."""
    if step.kind != "tabular":
        return None
    first = step.inputs[0]
    assert isinstance(first, TabularDataset)

    def count(batch: Any) -> int:
        if not isinstance(batch, CsvBatch):
            return batch.n_items or 1
        try:  # bounded: the input may be what hung (a FIFO, a dead mount)
            return within(
                float(config_get("storage-timeout")),
                lambda: count_csv_rows(
                    batch, first.storage_options, first.pandas_kwargs
                ),
                TimeoutError,
            )
        except TimeoutError:
            return 1

    return count


def _row_counts(row: dict[str, str]) -> Counts:
    def number(key: str) -> int:
        return int(row[key] or 0)

    return Counts(
        number("items_in"),
        number("items_ok"),
        number("items_failed"),
        number("items_extra"),
    )


def _part_counts(target: _output.OutputTarget | None, batch: Any) -> Counts:
    rows = _output.count_rows(target, batch.index) if target else 0
    items_in = batch.n_items if batch.n_items is not None else rows
    ok = min(rows, items_in)
    return Counts(items_in, ok, items_in - ok, rows - ok)


def _earlier(index: int) -> TryResult:
    return TryResult(index, 0, True, "earlier attempt", None, 0, 0.0)


def _register(
    client: Any, plugin: EntryScriptPlugin, timeout: float, run_id: str
) -> None:
    """Run ``init()`` on every worker; a failure or a hang fails the job."""
    try:
        client.register_plugin(plugin, name=plugin.name)
    except EntryScriptError as e:
        raise JobFailedError(str(e), run_id=run_id) from None
    except Exception as e:  # a worker died during init()
        lost = LostTasks(client, plugin.events_topic, timeout)
        hung = lost.init_timed_out()
        if hung is not None:
            raise JobFailedError(lost.init_timeout_error(hung), run_id=run_id) from None
        raise JobFailedError(
            plugin.redact(f"init() did not complete: {type(e).__name__}: {e}"),
            run_id=run_id,
        ) from None


def _register_watched(
    client: Any,
    plugin: EntryScriptPlugin,
    timeout: float,
    run_id: str,
    console: Console,
) -> None:
    """:func:`_register`, showing how many workers have finished ``init()``
    while it runs (``init()`` may load a model for minutes)."""
    failure: list[BaseException] = []

    def register() -> None:
        try:
            _register(client, plugin, timeout, run_id)
        except BaseException as e:  # raised in the caller
            failure.append(e)

    thread = threading.Thread(target=register, name=f"{plugin.name}-init", daemon=True)
    thread.start()
    while True:
        thread.join(0.5)
        if not thread.is_alive():
            break
        try:
            ready = client.run(init_done, plugin.name, on_error="return")
        except Exception:  # a worker going away shows up above
            continue
        if thread.is_alive():
            console.initializing(sum(r is True for r in ready.values()), len(ready))
    if failure:
        raise failure[0]


def _unregister(client: Any, name: str) -> None:
    # runs shutdown() on every worker; a cluster going away must not mask errors
    try:
        client.unregister_worker_plugin(name)
    except Exception as e:
        logger.debug("could not unregister plugin %s: %s", name, e)


def _check_environment(client: Any, environment: Any, run_id: str) -> None:
    """Fail before any task runs when a worker lacks a required package."""
    if environment is None or not environment.pip_packages:
        return
    found = client.run(unmet_packages, environment.pip_packages)
    for worker, unmet in sorted(found.items()):
        if unmet:
            problems = "; ".join(problem for problem, _ in unmet)
            fixes = " ".join(repr(fix) for _, fix in unmet)
            raise JobFailedError(
                f"Environment {environment.name!r}: {problems} on worker {worker}; "
                f"fix the workers' environment (pip install {fixes})",
                run_id=run_id,
            )


class _Watch:
    """Keeps the live views of a run current: the progress display, the
    overview file and the dashboard page (each at most once a second)."""

    def __init__(self, logs: JobLogs, tally: Tally, console: Console):
        self.logs, self.tally, self.console = logs, tally, console
        self.client: Any = None
        self.run_id = ""
        self.pace = Pace()
        self._last = 0.0

    def tick(self, status: str = "Running", force: bool = False) -> None:
        now_ = time.monotonic()
        due = force or now_ - self._last >= 1.0
        snap = self.logs.snapshot(self.tally, status, self.pace) if due else None
        self.console.update(self.tally, pace=self.pace)
        if snap is None:
            return
        self._last = now_
        self.logs.overview(snap)
        if self.client is not None:
            publish(self.client, self.run_id, snap)


def _user_frame(traceback: str | None, user: str) -> str | None:
    """``file, line N, in fn`` of the innermost frame of a traceback in the
    user's own files: ``user``, the source directory or the entry script.
    The innermost frame of all where none is the user's."""
    if not traceback:
        return None
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', traceback)
    if not frames:
        return None
    own = [f for f in frames if f[0] == user or f[0].startswith(user + os.sep)]
    path, line, fn = (own or frames)[-1]
    return f"{path}, line {line}, in {fn}"
