"""A step's named outputs, ``ParallelRunStep(outputs={...})``: checked when
the step is made, placed on the workspace's datastore when it is bound,
kept in the run record, and read back one by one.

Each output is a folder (a local path or fsspec URL), a datastore path
(``datastore.path("scores/")``), a :class:`~daskrun.PipelineData` that a
later step reads, or an :class:`OutputSpec` of one of those with its format
and file name. Its file is ``<name>.csv`` (``.parquet``, ``.txt``) in its
folder, in the step's ``output_format`` unless its spec names another. The
engine's side, exactly once and in order: :mod:`daskrun.engine.outputs`.

>>> OutputSpec("out/scores/", format="csv")
OutputSpec(where='out/scores/', format='csv', file_name=None)
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from daskrun.backends.inputs.datasets import PipelineData
from daskrun.backends.outputs import FORMATS, output_format_for
from daskrun.engine import output as _output
from daskrun.engine.outputs import NamedOutput
from daskrun.exceptions import ConfigError
from daskrun.registry.stepinputs import _absolute
from daskrun.registry.workspace import DataPath, Datastore

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_EXAMPLE = "outputs={'scores': 'out/scores/', 'embeddings': 'out/embeddings/'}"


@dataclass(frozen=True)
class OutputSpec:
    """One named output: ``where`` it goes (a folder or URL, a datastore
    path, or PipelineData), its ``format`` (``"text"``, ``"csv"`` or
    ``"parquet"``; default the step's ``output_format``) and its file's
    name (default ``<output name><extension>``)."""

    where: Any
    format: str | None = None
    file_name: str | None = None


@dataclass(frozen=True)
class Placed:
    """A step's named outputs as one run writes them: for the engine
    (:attr:`named`), for the run record (:attr:`record`, no credentials),
    and the PipelineData among them (:attr:`written`: name to datastore and
    path, as ``StepRun.outputs`` holds them)."""

    named: tuple[NamedOutput, ...]
    record: dict[str, dict[str, str]]
    written: dict[str, dict[str, str]] = field(default_factory=dict)


class StepOutputs:
    """``outputs=`` of a :class:`~daskrun.ParallelRunStep`, checked."""

    def __init__(
        self,
        outputs: Any,
        default_format: str,
        storage_options: Mapping[str, Any],
    ):
        if not isinstance(outputs, Mapping):
            raise ConfigError(
                f"outputs={outputs!r} is not a dict of output name to folder; pass "
                f"e.g. {_EXAMPLE}"
            )
        if not outputs:
            raise ConfigError(
                f"outputs={{}} names no output; pass e.g. {_EXAMPLE}, or "
                "output='out/' for one output"
            )
        self.specs: dict[str, OutputSpec] = {}
        for name, given in outputs.items():
            _check_name(name)
            self.specs[name] = _spec(name, given, default_format)
        self.storage_options = dict(storage_options)
        # placed now where no PipelineData waits for a workspace (see place)
        self.placed: Placed | None = (
            None if self.pipeline_data() else self.place(None, "")
        )

    def bound(self, workspace: Any, run_id: str) -> StepOutputs:
        """A copy placed for run ``run_id`` (see :meth:`place`)."""
        found = copy.copy(self)
        found.placed = self.place(workspace, run_id)
        return found

    def written(self) -> dict[str, dict[str, str]]:
        """The PipelineData written, as ``StepRun.outputs`` holds them."""
        return dict(self.placed.written) if self.placed is not None else {}

    def pipeline_data(self) -> list[PipelineData]:
        """The PipelineData among the outputs: a later step reads them."""
        wheres = [spec.where for spec in self.specs.values()]
        return [where for where in wheres if isinstance(where, PipelineData)]

    def place(self, workspace: Any, run_id: str) -> Placed:
        """Every output's folder for run ``run_id``: PipelineData on its
        datastore (the workspace's default if it names none) under
        ``daskrun/<run_id>/<data name>``, as a single output's."""
        named: list[NamedOutput] = []
        record: dict[str, dict[str, str]] = {}
        written: dict[str, dict[str, str]] = {}
        for name, spec in self.specs.items():
            url, options, where = self._where(name, spec, workspace, run_id)
            fmt = spec.format or ""
            file_name = spec.file_name or _file_name(name, fmt)
            named.append(NamedOutput(name, url, file_name, fmt, options))
            record[name] = {"url": url, "file_name": file_name, "format": fmt, **where}
            if isinstance(spec.where, PipelineData):
                written[spec.where.name] = where
        _check_apart(named)
        return Placed(tuple(named), record, written)

    def _where(
        self, name: str, spec: OutputSpec, workspace: Any, run_id: str
    ) -> tuple[str, dict[str, Any], dict[str, str]]:
        """An output's folder, its storage options, and its datastore and
        path (for the record) where it has one."""
        where = spec.where
        if isinstance(where, PipelineData):
            if workspace is None:
                raise ConfigError(
                    f"output {name!r} is PipelineData {where.name!r}; run the step "
                    "in a Pipeline submitted with an Experiment of a Workspace"
                )
            store = where.datastore or workspace.get_default_datastore()
            where = DataPath(store, f"daskrun/{run_id}/{where.name}")
        if isinstance(where, DataPath):
            store, path = where.datastore, where.path_on_datastore
            options = store.storage_options
            url = _absolute(store.url(path), options)
            return url, options, {"datastore": store.name, "path": path}
        url = _absolute(os.fspath(where), self.storage_options)
        return url, self.storage_options, {}


def checked_outputs(
    outputs: Any, output: Any, cfg: Any, options: Mapping[str, Any]
) -> StepOutputs | None:
    """``outputs=`` checked against the step's other arguments; ``None``
    where the step has a single ``output`` (or none)."""
    if outputs is None:
        return None
    if output is not None:
        raise ConfigError(
            f"pass output= or outputs=, not both: output={output!r} is one output, "
            "outputs={...} names several; drop output= and add it to outputs="
        )
    if cfg.output_action != "append_row":
        raise ConfigError(
            f"outputs= needs output_action='append_row' (not "
            f"{cfg.output_action!r}): run() returns rows for each output"
        )
    return StepOutputs(outputs, cfg.output_format, options)


def named(outputs: StepOutputs | None) -> tuple[NamedOutput, ...]:
    """What the engine gets of a step's named outputs, once placed."""
    if outputs is None or outputs.placed is None:
        return ()
    return outputs.placed.named


def recorded(outputs: StepOutputs | None) -> dict[str, dict[str, str]]:
    """What a run record keeps of a step's named outputs, once placed."""
    if outputs is None or outputs.placed is None:
        return {}
    return outputs.placed.record


def written_data(step: Any) -> list[PipelineData]:
    """The PipelineData a step writes: its ``output``, or among its
    ``outputs`` (later steps of a pipeline read them)."""
    found = step.named_outputs.pipeline_data() if step.named_outputs else []
    return [step.output_data, *found] if step.output_data is not None else found


def from_record(
    recorded: Mapping[str, Mapping[str, str]], workspace: Any
) -> dict[str, OutputSpec]:
    """A run record's named outputs as ``outputs=`` again: each in its
    folder, a datastore's (whose credentials the workspace holds) where it
    was placed on one."""
    specs = {}
    for name, kept in recorded.items():
        where: Any = kept["url"]
        if "datastore" in kept and workspace is not None:
            where = DataPath(Datastore(workspace, kept["datastore"]), kept["path"])
        specs[name] = OutputSpec(where, kept["format"], kept["file_name"])
    return specs


def published(
    run_id: str, recorded: Mapping[str, Mapping[str, str]], name: Any
) -> tuple[str, str]:
    """Named output ``name``'s published file, and its format."""
    if recorded and not isinstance(name, str):
        first = next(iter(recorded))
        raise ConfigError(
            f"step run {run_id!r} has outputs {', '.join(map(repr, recorded))}; "
            f"name the one to read, e.g. run.to_dask_dataframe({first!r})"
        )
    if name not in recorded:
        raise ConfigError(
            f"step run {run_id!r} has no output {name!r}; its outputs: "
            f"{', '.join(map(repr, recorded)) or 'one, unnamed (omit the name)'}"
        )
    kept = recorded[name]
    return f"{kept['url'].rstrip('/')}/{kept['file_name']}", kept["format"]


def from_cli(given: list[str] | None) -> dict[str, OutputSpec] | None:
    """``--outputs NAME[:FORMAT]=DIR ...`` as ``outputs=``.

    >>> from_cli(["scores:csv=out/s"])
    {'scores': OutputSpec(where='out/s', format='csv', file_name=None)}
    """
    if given is None:
        return None
    specs = {}
    for each in given:
        named, sep, where = each.partition("=")
        if not sep or not named or not where:
            raise ConfigError(
                f"--outputs {each!r} is not NAME[:FORMAT]=DIR; use e.g. --outputs "
                "scores:csv=out/scores labels=out/labels"
            )
        name, _, fmt = named.partition(":")
        specs[name] = OutputSpec(where, fmt or None)
    return specs


def _check_name(name: Any) -> None:
    if not isinstance(name, str):
        raise ConfigError(
            f"outputs has a name {name!r} that is not a str; name each output, "
            f"e.g. {_EXAMPLE}"
        )
    if not _NAME.match(name):
        raise ConfigError(
            f"output name {name!r} is not a name; use letters, digits, '_' and '-' "
            "(up to 64, starting with a letter), e.g. 'scores'"
        )


def _spec(name: str, given: Any, default_format: str) -> OutputSpec:
    """An output's spec, its format checked."""
    spec = given if isinstance(given, OutputSpec) else OutputSpec(given)
    where = spec.where
    if not isinstance(where, (str, os.PathLike, DataPath, PipelineData)) or (
        isinstance(where, (str, os.PathLike)) and not os.fspath(where)
    ):
        raise ConfigError(
            f"output {name!r} goes to {where!r}, which is not a folder, URL, "
            f"datastore path or PipelineData; pass e.g. {_EXAMPLE}"
        )
    fmt = spec.format or default_format
    try:
        output_format_for(fmt)
    except ConfigError as e:
        raise ConfigError(f"output {name!r}: {e}") from None
    return OutputSpec(where, fmt, spec.file_name)


def _file_name(name: str, fmt: str) -> str:
    return name + (FORMATS[fmt].extension or ".txt")


def _check_apart(named: list[NamedOutput]) -> None:
    """Two outputs never write one file; a local folder must be writable."""
    seen: dict[str, str] = {}
    for output in named:
        final = output.final_url
        if final in seen:
            raise ConfigError(
                f"outputs {seen[final]!r} and {output.name!r} both write {final!r}; "
                "give them other folders or file names"
            )
        seen[final] = output.name
        if os.path.isabs(output.url):
            _output.check_output_folder(output.url, output.file_name)
