"""A run's failed items as a data set of their own (dead letters):
:meth:`daskrun.StepRun.failed_items`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from daskrun.backends.inputs.base import Input as InputKind
from daskrun.backends.inputs.datasets import FileDataset, TabularDataset
from daskrun.exceptions import ConfigError
from daskrun.monitoring.monitor import FAILED_ITEMS, read_failed_items
from daskrun.registry.records import RunRecord
from daskrun.registry.resume import _check_credentials, _failed_options, _failed_rows
from daskrun.registry.workspace import Workspace


def failed_items(
    run: Any,
    storage_options: dict[str, Any] | None,
    step_from: Callable[..., Any],
) -> FileDataset | TabularDataset:
    """:meth:`daskrun.StepRun.failed_items` of ``run``; ``step_from``
    rebuilds its step from its record (as :func:`daskrun.registry.step.
    step_from`), to read failed rows again."""
    rows = read_failed_items(Path(run.logs_dir) / FAILED_ITEMS)
    if not rows:
        raise ConfigError(
            f"run {run.run_id!r} has no failed items; failed_items() is the "
            "data set of the inputs that failed"
        )
    root = run.workspace.runs_dir if run.workspace is not None else None
    record = RunRecord.load(run.run_id, root)
    workspace = run.workspace
    if workspace is None and record.workspace:
        workspace = Workspace(record.workspace)
    _check_credentials(record, storage_options, "failed_items()")
    errors = {row["input"]: row["error"] for row in rows}
    found = InputKind.of_kind(record.kind).dead_letters(
        list(errors), lambda: _failed_options(record, storage_options, workspace)
    )
    if found is not None:  # the failed items are the inputs' own files
        found.last_errors = errors
        return found
    step = step_from(record, storage_options, None, workspace)
    described = step.describe(record.run_id, record.auto)
    if described.cfg.partition_keys:
        raise ConfigError(
            f"run {run.run_id!r} ran partitions of rows; its failed partitions "
            f"are listed in {Path(run.logs_dir) / FAILED_ITEMS}"
        )
    return _failed_rows(
        described, run.run_id, rows, record.folder / "failed_items", errors
    )
