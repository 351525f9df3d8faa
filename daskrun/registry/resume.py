"""A run's record form of its step and inputs, and what a resume or
``failed_items()`` reads back from it: the inputs' paths (signed URLs given
again), their credentials, the failed rows of a tabular run."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from daskrun.backends.inputs.datasets import (
    Dataset,
    FileDataset,
    TabularDataset,
    read_tabular,
)
from daskrun.backends.inputs.native import (
    CollectionInput,
)
from daskrun.backends.storage import (
    private_file,
    private_folder,
    private_open,
    signature_hidden,
    unsigned,
)
from daskrun.engine.description import JobDescription
from daskrun.engine.pilot import AutoSizes
from daskrun.engine.plugin import (
    EntryScriptPlugin,
)
from daskrun.exceptions import ConfigError
from daskrun.registry.catalog import from_spec
from daskrun.registry.records import (
    SOURCE,
    RunRecord,
)
from daskrun.registry.sources import bundle_digest
from daskrun.registry.stepoutputs import recorded

Input = FileDataset | TabularDataset | CollectionInput


def _check_credentials(
    record: RunRecord, storage_options: dict[str, Any] | None, call: str
) -> None:
    """Refuse to read a run's remote inputs again without credentials:
    neither given (run records never hold them) nor a workspace
    datastore's."""
    if record.remote_inputs and storage_options is None and not record.input_specs:
        raise ConfigError(
            f"run {record.run_id!r} reads remote inputs; pass their "
            f"storage_options to {call}, since run records never hold credentials"
        )


def _with_formats(
    record: RunRecord, given: Sequence[Any] | None = None
) -> list[tuple[Any, str | None]]:
    """Each input's paths and ``partition_format``."""
    formats = record.partition_formats or [None] * len(record.inputs)
    return list(zip(_signed_again(record, given), formats, strict=True))


def _signed_again(record: RunRecord, given: Sequence[Any] | None) -> list[Any]:
    """The run's input paths. Where they were URLs with a SAS signature,
    which run records never keep, they are ``given`` again (paths or data
    sets, in the run's order), checked against the record."""
    recorded = record.inputs
    if not any(signature_hidden(json.dumps(p)) for p in recorded):
        return recorded
    run_id = record.run_id
    if given is None or len(given) != len(recorded):
        raise ConfigError(
            f"run {run_id!r} read {len(recorded)} input(s) given as URLs with "
            "a SAS signature, which run records never keep; give them again: "
            f"daskrun resume {run_id} --input URL ... (resume({run_id!r}, "
            "inputs=[url, ...]))"
        )
    paths = [_paths_given(g) for g in given]
    for was, now in zip(recorded, paths, strict=True):
        if json.loads(unsigned(json.dumps(now))) != was:
            raise ConfigError(
                f"input {unsigned(str(now))!r} is not run {run_id!r}'s "
                f"{was!r}; give the run's inputs again, in its order"
            )
    return paths


def _new_record(
    step: Any, run_id: str, plugin: EntryScriptPlugin, root: Path
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
        partition_formats=[ds.partition_format for ds in step.inputs],
        input_names=[
            given or ds.name
            for given, ds in zip(step.input_names, step.inputs, strict=False)
        ],
        pandas_kwargs=getattr(step.inputs[0], "pandas_kwargs", {}),
        remote_inputs=not plugin.settings.input_spec.local,
        output=step.output,
        named_outputs=recorded(step.named_outputs),
        config=asdict(step.config.resolved),
        script=plugin.settings.script,
        source_digests=[bundle_digest(plugin.settings.bundle)],
        arguments=[str(a) for a in step.arguments],
        incremental=step.incremental,
    )
    private_folder(record.folder)
    with private_open(record.folder / SOURCE, "wb") as f:
        f.write(plugin.settings.bundle)
    return record


def _input_specs(inputs: list[Input]) -> list[dict[str, Any]]:
    """The data sets as workspace specs, when all come from datastores or
    local paths (so a resume gets credentials from the workspace)."""
    try:
        return [ds.spec() for ds in inputs]
    except ConfigError:
        return []


def _paths_given(given: Any) -> Any:
    """The path, or list of paths, that ``given`` (as an input of
    :func:`resume`: a path, a list of paths, or a data set) names."""
    if isinstance(given, (str, os.PathLike)):
        return os.fspath(given)
    if isinstance(given, (list, tuple)):
        return [os.fspath(p) for p in given]
    return _path_spec(given)


def _path_spec(dataset: Input) -> Any:
    path = dataset._path
    if isinstance(path, (str, os.PathLike)):
        return os.fspath(path)
    return [os.fspath(p) for p in path]


def _failed_options(
    record: RunRecord, given: dict[str, Any] | None, workspace: Any
) -> dict[str, Any]:
    """The storage options of a run's inputs: those given, else those of
    the datastore its inputs came from."""
    if given is not None or not record.input_specs or workspace is None:
        return dict(given or {})
    return dict(from_spec(record.input_specs[0], workspace).storage_options)


def _failed_rows(
    described: JobDescription,
    run_id: str,
    rows: list[dict[str, str]],
    folder: Path,
    errors: dict[str, str],
) -> TabularDataset:
    """The failed rows of tabular run ``run_id``, read again as their
    mini-batches were and sliced, in one file of the inputs' format in
    ``folder``."""
    import pandas as pd

    first = described.inputs[0]
    assert isinstance(first, TabularDataset)
    auto = AutoSizes(described, described.cfg)  # "auto": the size the run chose
    batches = list(described.plan(auto.mini_batch_size, auto.pilot)[0])
    spans: dict[int, list[tuple[int, int]]] = {}
    for row in rows:
        if row["start"].isdigit() and row["stop"].isdigit():  # else never read
            spans.setdefault(int(row["index"]), []).append(
                (int(row["start"]), int(row["stop"]))
            )
    frames = []
    for index, cuts in spans.items():  # each mini-batch read once
        frame = read_tabular(batches[index], first.storage_options, first.pandas_kwargs)
        frames += [frame.iloc[start:stop] for start, stop in cuts]
    if not frames:
        # one line, though pandas' errors may end in a newline
        why = "; ".join(f"{k}: {' '.join(v.split())}" for k, v in errors.items())
        raise ConfigError(
            f"the failed inputs of run {run_id!r} could not be read ({why}); fix "
            "them and resume with retry_failed=True"
        )
    found = pd.concat(frames, ignore_index=True)
    private_folder(folder)
    path = folder / f"failed_items.{first.file_format}"
    tmp = path.with_name(f".{path.name}.tmp")
    private_file(tmp)  # pandas writes into it, keeping its mode
    first.format.write(found, tmp)
    os.replace(tmp, path)
    # the factory of the inputs' format: from_parquet_files, from_delimited_files
    dataset: TabularDataset = getattr(Dataset.Tabular, first.format.factory)(str(path))
    dataset.last_errors = errors
    return dataset
