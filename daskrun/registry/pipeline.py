"""Pipelines of steps, experiments and their runs.

``Experiment(ws, name).submit(pipeline, pipeline_parameters={...})`` checks
the parameters, records a pipeline run and returns a :class:`PipelineRun`
at once; a background thread runs the steps in dependency order (a step that
reads a ``PipelineData`` runs after the step that writes it). A step with
``allow_reuse=True`` whose script, resolved parameters, inputs (paths, sizes,
modification times or ETags), arguments and side inputs equal those of an
earlier completed run reuses that run's output without starting any worker.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict
from typing import Any

from daskrun.backends.compute.cluster import keep_warm
from daskrun.backends.inputs.datasets import FileDataset
from daskrun.engine.bundle import bundle_source
from daskrun.engine.naming import PipelineParameter, check_name, check_parameter_names
from daskrun.engine.runner import Interrupt
from daskrun.exceptions import (
    ConfigError,
    DaskRunError,
    JobFailedError,
    RunTimeoutError,
)
from daskrun.monitoring.console import Console, ConsoleFeed
from daskrun.registry.models import model_refs
from daskrun.registry.records import RunRecord, now
from daskrun.registry.step import ParallelRunStep, StepRun, _execute, new_run_id
from daskrun.registry.stepoutputs import named, written_data
from daskrun.registry.workspace import Datastore, Workspace

TERMINAL = ("Completed", "Failed", "Canceled")


class Pipeline:
    """Steps to run together, in dependency order.

    Parameters
    ----------
    workspace : Workspace
    steps : list of ParallelRunStep
        A step reading a ``PipelineData`` runs after the step writing it;
        otherwise the given order is kept.
    """

    def __init__(
        self,
        workspace: Workspace,
        steps: list[ParallelRunStep],
        description: str | None = None,
    ):
        if not isinstance(workspace, Workspace):
            raise ConfigError(
                f"workspace={workspace!r} is not a Workspace; use "
                "Workspace.from_config() or Workspace.create(path)"
            )
        if not steps or not all(isinstance(s, ParallelRunStep) for s in steps):
            raise ConfigError(
                f"steps={steps!r} must be a non-empty list of ParallelRunStep"
            )
        names = [s.name for s in steps]
        duplicate = {n for n in names if names.count(n) > 1}
        if duplicate:
            raise ConfigError(
                f"step name {sorted(duplicate)[0]!r} is used twice; step names "
                "must be unique in a pipeline"
            )
        self.workspace = workspace
        self.description = description
        self.steps = _in_dependency_order(list(steps))
        self.parameters: dict[str, PipelineParameter] = {}
        for step in self.steps:
            for param in step.pipeline_parameters():
                seen = self.parameters.setdefault(param.name, param)
                if seen is not param and seen.default_value is not param.default_value:
                    raise ConfigError(
                        f"pipeline parameter {param.name!r} is defined twice with "
                        "different defaults; use one PipelineParameter object"
                    )

    def __repr__(self) -> str:
        return f"Pipeline(steps={[s.name for s in self.steps]!r})"


def _in_dependency_order(steps: list[ParallelRunStep]) -> list[ParallelRunStep]:
    writer = {data.name: s for s in steps for data in written_data(s)}
    ordered: list[ParallelRunStep] = []
    visiting: set[str] = set()

    def visit(step: ParallelRunStep) -> None:
        if step in ordered:
            return
        if step.name in visiting:
            raise ConfigError(
                f"steps depend on each other in a cycle through {step.name!r}"
            )
        visiting.add(step.name)
        for data in step.input_data():
            if data.name not in writer:
                raise ConfigError(
                    f"step {step.name!r} reads PipelineData {data.name!r} that no "
                    "step of the pipeline writes; add the step with "
                    f"output=PipelineData({data.name!r})"
                )
            visit(writer[data.name])
        visiting.discard(step.name)
        ordered.append(step)

    for step in steps:
        visit(step)
    return ordered


class Experiment:
    """A named group of runs in a workspace."""

    def __init__(self, workspace: Workspace, name: str):
        self.workspace = workspace
        self.name = check_name("experiment", name)

    def __repr__(self) -> str:
        return f"Experiment(name={self.name!r})"

    def submit(
        self,
        pipeline: Pipeline,
        pipeline_parameters: dict[str, Any] | None = None,
    ) -> PipelineRun:
        """Start ``pipeline`` in the background and return its run at once.

        Unknown parameter names, invalid values and data sets that are not
        registered raise :class:`~daskrun.ConfigError` here, before anything
        runs.
        """
        if not isinstance(pipeline, Pipeline):
            raise ConfigError(f"{pipeline!r} is not a Pipeline")
        values = dict(pipeline_parameters or {})
        check_parameter_names(values, list(pipeline.parameters.values()))
        run_id = new_run_id(
            self.name.lower().replace("_", "-")[:32].strip("-") or "run"
        )
        # bind every step now: bad values fail the submit, not the run
        for step in pipeline.steps:
            step.bind(values, _placeholders(step), self.workspace, run_id="check")
        run = PipelineRun(self, pipeline, values, run_id)
        run._start()
        return run

    def get_runs(self) -> list[PipelineRun]:
        return [
            PipelineRun.get(self.workspace, r.run_id)
            for r in RunRecord.find(self.workspace.runs_dir)
            if r.type == "pipeline" and r.experiment == self.name
        ]


def _placeholders(step: ParallelRunStep) -> dict[str, Any]:
    # a stand-in for outputs of earlier steps, which do not exist yet
    return {d.name: FileDataset(__file__, validate=False) for d in step.input_data()}


class PipelineRun:
    """A submitted pipeline: its status, its step runs and their outputs.

    ``PipelineRun.get(ws, run_id)`` opens one from any process.
    """

    def __init__(
        self,
        experiment: Experiment,
        pipeline: Pipeline | None,
        values: dict[str, Any],
        run_id: str,
        record: RunRecord | None = None,
    ):
        self.experiment = experiment
        self.workspace = experiment.workspace
        self.pipeline = pipeline
        self.values = values
        self.run_id = run_id
        self._record = record
        self._thread: threading.Thread | None = None
        self._interrupt = Interrupt()
        # what the background thread shows, for the thread that waits
        self._feed = ConsoleFeed()

    @property
    def id(self) -> str:
        return self.run_id

    def __repr__(self) -> str:
        return f"PipelineRun(run_id={self.run_id!r}, status={self.get_status()!r})"

    @classmethod
    def get(cls, workspace: Workspace, run_id: str) -> PipelineRun:
        record = RunRecord.load(run_id, workspace.runs_dir)
        if record.type != "pipeline":
            raise ConfigError(
                f"run {run_id!r} is a step run; open it with "
                "PipelineRun.get(ws, its parent_id)"
            )
        experiment = Experiment(workspace, record.experiment or "default")
        return cls(experiment, None, record.parameters, run_id, record)

    # --- running ------------------------------------------------------------

    def _start(self) -> None:
        assert self.pipeline is not None
        record = RunRecord(
            run_id=self.run_id,
            root=str(self.workspace.runs_dir),
            type="pipeline",
            name=self.experiment.name,
            status="Running",
            experiment=self.experiment.name,
            parameters={k: _show(v) for k, v in self.values.items()},
            workspace=str(self.workspace.path),
        )
        record.save()
        self._record = record
        # not a daemon: like a submitted job, the run goes on until it ends
        self._thread = threading.Thread(
            target=self._run, name=f"daskrun-{self.run_id}", daemon=False
        )
        self._thread.start()

    def _say(self, line: str) -> None:
        self._feed.say(line)

    def _run(self) -> None:
        assert self.pipeline is not None and self._record is not None
        record = self._record
        status, error = "Failed", None
        try:
            # one local cluster for all the steps: started by the first
            # that needs it, closed after the last
            with keep_warm():
                status, error = self._run_steps()
        except DaskRunError as e:
            status, error = "Failed", str(e)
        except BaseException as e:  # recorded, not lost
            status, error = "Failed", f"{type(e).__name__}: {e}"
        finally:
            record.status, record.error, record.ended = status, error, now()
            record.save()
            self._say(f"daskrun: pipeline run {self.run_id}: {status}")
            if error:
                self._say(f"daskrun: {error}")

    def _run_steps(self) -> tuple[str, str | None]:
        """Run the steps in order, each given what earlier ones produced;
        the pipeline run's status and error."""
        assert self.pipeline is not None
        produced: dict[str, Any] = {}
        for step in self.pipeline.steps:
            if self._interrupt.reason is not None:
                return "Canceled", self._interrupt.reason
            run = self._run_step(step, produced)
            if run.status != "Completed":
                error = f"step {step.name!r} {run.status.lower()}: {run.error}"
                return run.status, error
            for name, where in run.outputs.items():
                store = Datastore(self.workspace, where["datastore"])
                produced[name] = FileDataset(store.path(where["path"]), validate=False)
        return "Completed", None

    def _run_step(self, step: ParallelRunStep, produced: dict[str, Any]) -> StepRun:
        bound = step.bind(self.values, produced, self.workspace)
        bound.parent_id = self.run_id
        bound.experiment = self.experiment.name
        bound.fingerprint = fingerprint(bound)
        if step.allow_reuse:
            earlier = _reusable(self.workspace, bound.fingerprint)
            if earlier is not None:
                return self._reuse(bound, earlier)
        return _execute(
            bound, bound.describe(), console=self._feed, interrupt=self._interrupt
        )

    def _reuse(self, bound: ParallelRunStep, earlier: RunRecord) -> StepRun:
        assert bound.run_id is not None
        record = RunRecord(
            **{
                **asdict(earlier),
                "run_id": bound.run_id,
                "parent_id": self.run_id,
                "experiment": self.experiment.name,
                "parameters": bound.parameter_values,
                "reused_from": earlier.reused_from or earlier.run_id,
                "created": now(),
                "ended": now(),
            }
        )
        record.save()
        self._say(
            f"daskrun: step {bound.name!r} reused the output of run "
            f"{record.reused_from} (allow_reuse=True; nothing changed)"
        )
        return StepRun.from_record(record, self.workspace)

    # --- watching -----------------------------------------------------------

    def wait_for_completion(
        self,
        show_output: bool = False,
        timeout_seconds: float | None = None,
        raise_on_error: bool = True,
    ) -> str:
        """Wait for the run to end; return its status.

        With ``show_output`` the run's progress is shown as it comes: a
        progress bar on a terminal, a live widget in a Jupyter notebook
        (``tqdm.auto``), plain lines otherwise. A run that ends ``Failed`` or
        ``Canceled`` raises :class:`~daskrun.JobFailedError` unless
        ``raise_on_error=False``; one still running after ``timeout_seconds``
        raises :class:`~daskrun.RunTimeoutError` (a ``TimeoutError``).
        Ctrl-C cancels the run.
        """
        deadline = (
            None if timeout_seconds is None else time.monotonic() + timeout_seconds
        )
        console = Console(show_output)
        try:
            while True:
                self._feed.replay(console)
                # a run of this process has ended when its thread has (the
                # record is not read meanwhile: its polls took a core's time)
                if (
                    not self._thread.is_alive()
                    if self._thread is not None
                    else self.get_status() in TERMINAL
                ):
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise RunTimeoutError(
                        f"run {self.run_id} still {self.get_status()} after "
                        f"{timeout_seconds} s"
                    )
                if self._thread is not None:
                    self._thread.join(0.2)
                else:
                    time.sleep(1.0)
        except KeyboardInterrupt:
            self.cancel()
            if self._thread is not None:
                self._thread.join()
            raise
        finally:
            self._feed.replay(console)
            console.close()
        record = self._load()
        if raise_on_error and record.status != "Completed":
            raise JobFailedError(
                record.error or record.status, status=record.status, run_id=self.run_id
            )
        return record.status

    def _load(self) -> RunRecord:
        return RunRecord.load(self.run_id, self.workspace.runs_dir)

    def get_status(self) -> str:
        return self._load().status

    def cancel(self) -> None:
        """Stop the run now: mini-batches in flight are cancelled, no new one
        starts. The step run ends ``Canceled`` and can be resumed."""
        if self._thread is None:
            raise ConfigError(
                f"run {self.run_id!r} was started by another process; stop that "
                "process (Ctrl-C) to cancel it"
            )
        self._interrupt.trigger("canceled (run.cancel())", canceled=True)

    def get_steps(self) -> list[StepRun]:
        return [
            StepRun.from_record(r, self.workspace)
            for r in RunRecord.find(self.workspace.runs_dir, parent_id=self.run_id)
        ]

    def find_step_run(self, name: str) -> list[StepRun]:
        """The runs of the step called ``name`` in this pipeline run."""
        return [s for s in self.get_steps() if s.name == name]

    def get_details(self) -> dict[str, Any]:
        """Status, times, parameters and each step run's details."""
        record = self._load()
        return {
            "run_id": self.run_id,
            "experiment": record.experiment,
            "status": record.status,
            "created": record.created,
            "ended": record.ended,
            "error": record.error,
            "parameters": record.parameters,
            "steps": [s.get_details() for s in self.get_steps()],
        }


def _show(value: Any) -> Any:
    return (
        value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
    )


def fingerprint(step: ParallelRunStep) -> str:
    """What makes two runs of a step interchangeable: the shipped source
    (script or source directory, file times included), the resolved
    parameters, every input's and side input's files with their sizes and
    modification times (or ETags), the arguments, the output's datastore and
    the workspace's registered model versions."""
    cfg = step.config.resolved
    bundle, script = bundle_source(cfg.entry_script, cfg.source_directory)
    parts = {
        "source": hashlib.sha256(bundle).hexdigest(),
        "script": script,
        "config": {
            k: v
            for k, v in asdict(cfg).items()
            if k not in ("entry_script", "source_directory")
            and not (k == "partition_keys" and v is None)
        },
        "kind": step.kind,
        "inputs": [
            (
                ds.spec() if ds.datastore is not None else None,
                list(ds.stamps()),
                getattr(ds, "pandas_kwargs", {}),
            )
            for ds in step.inputs
        ],
        "side_inputs": [list(ds.stamps()) for ds in step.side_inputs],
        "arguments": [str(a) for a in step.arguments],
        # only where set, so that the runs from before they existed still match
        **_partitioning(step),
        **_named_outputs(step),
        "outputs": sorted(w["datastore"] for w in step.outputs.values()),
        # a newly registered model version may change the results
        "models": sorted(
            (r.name, r.version)
            for r in (model_refs(step.workspace) if step.workspace else [])
        ),
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _partitioning(step: ParallelRunStep) -> dict[str, Any]:
    """What partitioned inputs add to a fingerprint: their formats (tabular
    rows get their keys as columns) and the inputs' name (a two-parameter
    ``run()`` sees it); nothing for a step without them."""
    found: dict[str, Any] = {}
    formats = [ds.partition_format for ds in step.inputs]
    if any(formats):
        found["partition_formats"] = formats
    if step.dataset_name is not None:
        found["dataset"] = step.dataset_name
    return found


def _named_outputs(step: ParallelRunStep) -> dict[str, Any]:
    """What named outputs add to a fingerprint: each one's name, format and
    file name (a changed format gives other files); nothing without them."""
    placed = named(step.named_outputs)
    if not placed:
        return {}
    return {"named_outputs": [(o.name, o.output_format, o.file_name) for o in placed]}


def _reusable(workspace: Workspace, key: str) -> RunRecord | None:
    """The newest completed identical run whose output still exists."""
    from fsspec.core import url_to_fs

    for record in RunRecord.reusable(workspace.runs_dir, key):
        where = next(iter(record.outputs.values()), None)
        if where is None:
            return record
        store = Datastore(workspace, where["datastore"])
        fs, path = url_to_fs(store.url(where["path"]), **store.storage_options)
        if fs.exists(path):
            return record
    return None
