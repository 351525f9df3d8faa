"""``ParallelRunStep``: one entry script over one input, and its ``StepRun``.

``step.run()`` validates everything, plans the mini-batches, connects to the
compute target, registers the entry script as a worker plugin, runs the
mini-batches (:mod:`daskrun.runner`), assembles the output
(:mod:`daskrun.output`) and writes the log folder (:mod:`daskrun.monitor`).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import sys
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from . import output as _output
from .compute import connect, dashboard_link
from .config import (
    ParallelRunConfig,
    check_arguments,
    check_step_name,
    mini_batch_size_for,
)
from .datasets import FileDataset, TabularDataset, plan_files
from .exceptions import ConfigError, EntryScriptError, JobFailedError
from .monitor import REPORT, JobLogs
from .plugin import (
    EntryScriptPlugin,
    InputSpec,
    SideInput,
    TryResult,
    bundle_source,
)
from .records import SOURCE, RunRecord, read_report, runs_dir
from .runner import Counts, LostTasks, Tally, run_mini_batches, threshold_error

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

    def resume(self, retry_failed: bool = False, show_output: bool = False) -> StepRun:
        """Run again only the mini-batches without a committed result (and,
        with ``retry_failed``, those that failed); see :func:`resume`."""
        return resume(self.run_id, retry_failed=retry_failed, show_output=show_output)

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
        inputs: Input | Sequence[Input],
        output: str | os.PathLike[str] | None = None,
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
        self.inputs = _check_inputs(inputs)
        self.kind = self.inputs[0].kind
        self.mini_batch_size = mini_batch_size_for(self.kind, cfg.mini_batch_size)
        if output is None and cfg.output_action == "append_row":
            raise ConfigError(
                "output is required with output_action='append_row'; pass "
                "output='out/' (a folder or fsspec URL), or use "
                "output_action='summary_only'"
            )
        self.output_storage_options = dict(output_storage_options or {})
        self.output = (
            None
            if output is None
            else _absolute(os.fspath(output), self.output_storage_options)
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

    def __repr__(self) -> str:
        return f"ParallelRunStep(name={self.name!r}, inputs={self.inputs!r})"

    def plan(self) -> tuple[Iterable[Any], int]:
        """The mini-batch plans (lazily, for file inputs) and their count."""
        if self.kind == "file":
            files = (
                self.inputs[0].files()
                if len(self.inputs) == 1
                else [f for ds in self.inputs for f in ds.files()]
            )
            count = math.ceil(len(files) / self.mini_batch_size)
            return plan_files(files, self.mini_batch_size), count
        batches: list[Any] = []
        for ds in self.inputs:
            assert isinstance(ds, TabularDataset)
            batches.extend(ds.plan(self.mini_batch_size, start=len(batches)))
        return batches, len(batches)

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
        if pipeline_parameters:
            raise ConfigError(
                f"pipeline_parameters={sorted(pipeline_parameters)!r} given, but this "
                "step uses no PipelineParameter; drop them or build the config with "
                "PipelineParameter values"
            )
        return _execute(self, show_output=show_output)


def _check_inputs(inputs: Any) -> list[Input]:
    items = [inputs] if isinstance(inputs, (FileDataset, TabularDataset)) else inputs
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
        if not isinstance(item, (FileDataset, TabularDataset)):
            raise ConfigError(
                f"inputs item {item!r} is not a data set; use "
                f"Dataset.File.from_files({item!r}) or "
                f"Dataset.Tabular.from_delimited_files({item!r})"
            )
    kinds = {(i.kind, getattr(i, "file_format", None)) for i in items}
    if len(kinds) > 1:
        raise ConfigError(
            f"inputs mix kinds {sorted(str(k) for k in kinds)}; all inputs of one "
            "step must be file data sets, or all tabular of one format"
        )
    return items


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
) -> EntryScriptPlugin:
    cfg = step.config.resolved
    bundle, script = bundle_source(cfg.entry_script, cfg.source_directory)
    sides = {
        id(ds): SideInput(n, tuple(ds.files()), ds.storage_options, ds.local)
        for n, ds in enumerate(step.side_inputs)
    }
    first = step.inputs[0]
    return EntryScriptPlugin(
        name=f"daskrun-{run_id}",
        bundle=bundle,
        script=script,
        script_display=cfg.entry_script,
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
    )


def _execute(
    step: ParallelRunStep,
    *,
    show_output: bool,
    resume: RunRecord | None = None,
    retry_failed: bool = False,
) -> StepRun:
    cfg = step.config.resolved
    started = time.perf_counter()
    # planning lists and measures the inputs: a missing or empty input fails
    # here, before any worker starts
    batches, total = step.plan()
    run_id = resume.run_id if resume else new_run_id(step.name)
    run_dir = runs_dir() / run_id
    target = (
        _output.OutputTarget(
            step.output, cfg.append_row_file_name, run_id, step.output_storage_options
        )
        if step.output is not None and cfg.output_action == "append_row"
        else None
    )
    output_path = step.output or str(run_dir / "outputs")
    if step.output is None:
        os.makedirs(output_path, exist_ok=True)
    plugin = _entry_script_plugin(step, run_id, output_path, target)
    record = resume or _new_record(step, run_id, plugin)
    tally = Tally(mini_batches_total=total)
    succeeded = bytearray(total)  # one byte per mini-batch: flat for millions
    # 1: finished in an earlier attempt, in its report; 2: its part is
    # committed but the report missed it (the client died in between)
    done = bytearray(total)
    kept = []
    if resume is not None:
        for row in read_report(run_dir / "logs" / REPORT):
            if row.index < total and (row.ok or not retry_failed):
                kept.append(row.row)
                done[row.index], succeeded[row.index] = 1, row.ok
                tally.mini_batches_done += 1
                tally.mini_batches_failed += not row.ok
                tally.add(_row_counts(row.row))
    logs = JobLogs(run_dir / "logs", kept, retry_failed=retry_failed)
    if resume is not None and target is not None:
        # a part committed after the last report row (the client died in
        # between) is done too
        for index in _output.committed_parts(target):
            if index < total and not done[index]:
                done[index], succeeded[index] = 2, 1
    say = _printer(show_output)

    def on_done(batch: Any, result: TryResult, tries: int, counts: Counts) -> None:
        succeeded[result.index] = result.ok
        logs.mini_batch(result, tries, counts)
        if counts.failed:
            logs.failed_items(batch, result)
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
        with connect(
            step.config.compute_target, cfg.node_count, cfg.process_count_per_node
        ) as client:
            link = dashboard_link(client)
            verb = "resuming" if resume else "run"
            say(f"daskrun: {verb} {run_id}: {total} mini-batches")
            if link:
                say(f"daskrun: dashboard {link}")
            if target is not None:
                _output.prepare_parts(target)
            _register(client, plugin, cfg.run_invocation_timeout, run_id)
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
                )
            finally:
                _unregister(client, plugin.name)
        if exceeded:
            error = str(threshold_error(exceeded, tally, cfg, run_id))
        else:
            if target is not None:
                final = _output.assemble(
                    target, (i for i in range(total) if succeeded[i])
                )
                if not tally.mini_batches_failed:
                    # kept otherwise, for a resume with retry_failed
                    _output.remove_parts(target)
            status = "Completed"
    except JobFailedError as e:
        error = str(e)
    except KeyboardInterrupt:
        status, error = "Canceled", "canceled by the user (KeyboardInterrupt)"
        print(
            f"daskrun: canceled; resume with: daskrun resume {run_id}", file=sys.stderr
        )
        raise
    finally:
        record.status, record.error = status, error
        record.save()
        logs.finish(
            status=status,
            run_id=run_id,
            tally=tally,
            error=error,
            output_path=final,
            seconds=time.perf_counter() - started,
        )
    run = StepRun(
        run_id=run_id,
        status=status,
        output_path=final,
        logs_dir=str(logs.dir),
        error=error,
        mini_batches_total=tally.mini_batches_total,
        mini_batches_failed=tally.mini_batches_failed,
        items_total=tally.items_total,
        items_succeeded=tally.items_succeeded,
        items_failed=tally.items_failed,
        items_extra=tally.items_extra,
        dashboard_link=link,
    )
    if tally.items_extra:
        logger.warning(
            "run %s: run() returned %d more results than inputs; they are in the "
            "output (see processed_mini-batches.csv)",
            run_id,
            tally.items_extra,
        )
    say(f"daskrun: {status}: {tally.progress()}")
    return run


def resume(
    run_id: str,
    *,
    retry_failed: bool = False,
    show_output: bool = False,
    storage_options: dict[str, Any] | None = None,
    compute_target: Any = None,
) -> StepRun:
    """Resume a failed, canceled or interrupted run where it stopped.

    Mini-batches with a committed result are not run again; with
    ``retry_failed`` those that failed are run again too. The final output
    is the same as an uninterrupted run's. The run's inputs are listed again
    (they must not have changed); remote inputs need their
    ``storage_options`` again, since run records never hold credentials.

    >>> run = daskrun.resume("score-images_20261122T010203_a1b2c3")  # doctest: +SKIP
    """
    record = RunRecord.load(run_id)
    if record.status == "Completed" and not retry_failed:
        raise ConfigError(
            f"run {run_id!r} already completed; pass retry_failed=True "
            "(--retry-failed) to run its failed mini-batches again"
        )
    if record.remote_inputs and storage_options is None:
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
    if record.kind == "file":
        inputs: list[Input] = [
            FileDataset(p, storage_options=options) for p in record.inputs
        ]
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
    step = ParallelRunStep(
        record.step_name,
        cfg,
        inputs=inputs,
        output=record.output,
        arguments=record.arguments,
    )
    return _execute(
        step, show_output=show_output, resume=record, retry_failed=retry_failed
    )


def _new_record(
    step: ParallelRunStep, run_id: str, plugin: EntryScriptPlugin
) -> RunRecord:
    record = RunRecord(
        run_id=run_id,
        step_name=step.name,
        status="Running",
        kind=step.kind,
        file_format=getattr(step.inputs[0], "file_format", None),
        inputs=[_path_spec(ds) for ds in step.inputs],
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


def _path_spec(dataset: Input) -> Any:
    path = dataset._path
    if isinstance(path, (str, os.PathLike)):
        return os.fspath(path)
    return [os.fspath(p) for p in path]


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
            f"init() did not complete: {type(e).__name__}: {e}", run_id=run_id
        ) from None


def _unregister(client: Any, name: str) -> None:
    # runs shutdown() on every worker; a cluster going away must not mask errors
    try:
        client.unregister_worker_plugin(name)
    except Exception as e:  # noqa: BLE001
        logger.debug("could not unregister plugin %s: %s", name, e)


def _printer(show: bool) -> Any:
    def say(line: str) -> None:
        if show:
            print(line, file=sys.stderr, flush=True)

    return say
