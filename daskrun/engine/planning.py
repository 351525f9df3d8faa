"""Planning a job: what an earlier attempt left (the ledger, its parts, its
failed spans and limits), what the plan holds and how its items count, and
the worker plugin that carries the entry script.

:class:`Planning` is the part of :class:`~daskrun.engine.job.Job` that
plans and picks up; it never connects to a cluster.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from daskrun.aml.modelrefs import ModelRef
from daskrun.backends.inputs.datasets import file_batch_at
from daskrun.backends.storage import secret_values
from daskrun.engine import output as _output
from daskrun.engine.config import ResolvedConfig
from daskrun.engine.description import JobDescription
from daskrun.engine.increment import Increment
from daskrun.engine.ledger import PlanLedger
from daskrun.engine.pilot import AutoSizes
from daskrun.engine.plugin import (
    EntryScriptPlugin,
    InputSpec,
    PluginSettings,
    SideInput,
    TryResult,
)
from daskrun.engine.runner import (
    Counts,
    Tally,
    Unfinished,
    check_thresholds,
    threshold_error,
)
from daskrun.exceptions import (
    ConfigError,
)
from daskrun.monitoring.console import Console
from daskrun.monitoring.monitor import (
    FAILED_ITEMS,
    REPORT,
    JobLogs,
    read_failed_spans,
    read_report,
)

logger = logging.getLogger("daskrun")


class Resumed(enum.IntEnum):
    """What a resume knows of a mini-batch before it runs anything."""

    TO_RUN = 0
    REPORTED = 1  # finished in an earlier attempt, and in its report
    COMMITTED = 2  # its part is committed, but the report missed it (the
    # client died in between): done, its counts read back from the part


class Planning:
    """What a :class:`~daskrun.engine.job.Job` knows before it runs: its
    plan, its ledger, what an earlier attempt wrote, and its plugin. The job
    sets these attributes; these methods read and fill them."""

    described: JobDescription
    cfg: ResolvedConfig
    run_id: str
    run_dir: Path
    console: Console
    models: list[ModelRef] | None
    resource_interval: float | None
    isolate: bool
    unfinished: Any
    logs: JobLogs
    timings: dict[str, float]
    items_planned: int | None
    succeeded: bytearray
    state: bytearray
    auto: AutoSizes
    batches: Any
    total: int
    bundle: Any
    target: Any
    plugin: EntryScriptPlugin
    tally: Tally
    limits: ResolvedConfig
    _after_pilot: int
    _listed: list[tuple[str, int, str]] | None
    _ledger: PlanLedger
    _unchanged: bytearray | None
    _written: _output.Parts | None
    increment: Increment | None

    def _restore(self, retry_failed: bool) -> list[dict[str, str]]:
        """Mark what an earlier attempt finished; its report rows to keep.

        A part may be gone (deleted by hand, or published and removed): its
        mini-batch runs again, even where the report says it succeeded.
        """
        total, target, unchanged = self.total, self.target, self._unchanged
        parts = bytearray(total)
        if target is not None:  # a kill while publishing left it
            _output.remove_partial(target)
        found = _output.Parts(target) if target is not None else None
        if found is not None and unchanged is not None:
            # a replanned mini-batch's earlier rows are gone before it runs
            # again: a group would keep them beside the new ones
            written = {*found.whole, *found.pieces}
            found = found.remove({i for i in written if i >= total or not unchanged[i]})
        self._written = found
        for index in found.whole if found is not None else ():
            if index < total and (unchanged is None or unchanged[index]):
                parts[index] = 1
        pieces = found.pieces if found is not None else {}
        failed = (
            read_failed_spans(self.run_dir / "logs" / FAILED_ITEMS)
            if retry_failed and self.isolate
            else {}
        )
        kept = []
        for row in read_report(self.run_dir / "logs" / REPORT):
            if row.index >= total or not (unchanged is None or unchanged[row.index]):
                continue
            if not row.ok and retry_failed:
                unfinished = _unfinished(
                    row.row, pieces.get(row.index), failed.get(row.index), target
                )
                if unfinished is not None:
                    self.unfinished[row.index] = unfinished
                continue
            if (
                not row.ok
                or target is None
                or parts[row.index]
                or _covers(pieces.get(row.index, []), int(row.row["items_in"] or 0))
            ):
                kept.append(row.row)
                self.state[row.index] = Resumed.REPORTED
                self.succeeded[row.index] = row.ok
                self.tally.mini_batches_done += 1
                self.tally.mini_batches_failed += not row.ok
                self.tally.add(_row_counts(row.row))
        if target is not None:
            for index in range(total):
                if parts[index] and self.state[index] == Resumed.TO_RUN:
                    self.state[index] = Resumed.COMMITTED
                    self.succeeded[index] = 1
        return kept

    def _resumed_limits(self) -> ResolvedConfig:
        """On a resume whose earlier failures already exceed a threshold:
        refuse one that would run nothing, in one line; else say so, and
        return the limits this attempt stops at (:func:`_attempt_limits`)."""
        left = self.state.count(Resumed.TO_RUN)
        tally = replace(self.tally, all_scheduled=not left)
        exceeded = check_thresholds(tally, self.cfg)
        if exceeded is None:
            return self.cfg
        why = threshold_error(exceeded, tally, self.cfg, self.run_id)
        if not left:
            raise ConfigError(
                f"nothing to run in run {self.run_id!r}: all its {self.total} "
                f"mini-batches ran, and {why}; a resume keeps failures unless "
                "told to retry them: fix their cause, then 'daskrun resume "
                f"{self.run_id} --retry-failed' (add --new-source for an edited "
                "script)"
            )
        self.console.say(
            f"daskrun: run {self.run_id} stopped at {why.threshold}; running "
            f"the {left} mini-batches that never ran (its failed ones run "
            "again with --retry-failed)"
        )
        return _attempt_limits(self.cfg, self.tally)

    def pending(self, batches: Iterable[Any] | None = None) -> Iterator[Any]:
        """The mini-batches to run of ``batches`` (the plan's, else the
        mini-batches after a pilot's), lazily; a committed one the report
        missed is counted and reported as it goes by."""
        if batches is None:
            batches = itertools.islice(self.batches, self._after_pilot, None)
        for batch in batches:
            state = self.state[batch.index]
            if state == Resumed.TO_RUN:
                unfinished = self.unfinished.get(batch.index)
                yield batch if unfinished is None else replace(unfinished, batch=batch)
            elif state == Resumed.COMMITTED:
                counts = _part_counts(self._written, batch)
                self.tally.mini_batches_done += 1
                self.tally.add(counts)
                self.logs.mini_batch(_earlier(batch.index), 1, counts)

    def _entry_script_plugin(self, output_path: str) -> EntryScriptPlugin:
        described, cfg, target = self.described, self.cfg, self.target
        run_id = self.run_id
        zipped, script = self.bundle
        sides = {
            id(ds): SideInput(n, tuple(ds.files()), ds.storage_options, ds.local)
            for n, ds in enumerate(described.side_inputs)
        }
        first = described.inputs[0]
        return EntryScriptPlugin(
            PluginSettings(
                name=f"daskrun-{run_id}",
                # at most 300 MB (build_bundle refuses more): bytes travel to
                # workers that cannot see the client's disk
                bundle=zipped.read_bytes(),
                script=script,
                script_display=cfg.entry_script,
                source_directory=cfg.source_directory,
                experiment=described.experiment,
                parent_id=described.parent_id,
                arguments=[sides.get(id(a), a) for a in described.arguments],
                side_inputs=list(sides.values()),
                environment_variables=cfg.environment_variables,
                output_path=output_path,
                input_spec=InputSpec(
                    kind=described.kind,
                    storage_options=first.storage_options,
                    pandas_kwargs=getattr(first, "pandas_kwargs", {}),
                    local=all(ds.local for ds in described.inputs),
                    partition_format=first.partition_format,
                ),
                output=target,
                run_invocation_timeout=cfg.run_invocation_timeout,
                models=self.models,
                logging_level=cfg.logging_level,
                resource_interval=self.resource_interval,
                secrets=[
                    secret
                    for options in (
                        *(
                            ds.storage_options
                            for ds in (*described.inputs, *described.side_inputs)
                        ),
                        described.output_storage_options,
                    )
                    for secret in secret_values(options)
                ],
            )
        )

    def _not_source(self) -> list[str]:
        """What the source directory may hold that is data, not code: the
        step's local input folders and files, and its output folder. Inputs
        reach the workers as paths; they are never shipped with the script."""
        described, source = self.described, self.cfg.source_directory
        if source is None:
            return []
        root = os.path.realpath(source) + os.sep
        found = (
            [described.output]
            if described.output and os.path.isabs(described.output)
            else []
        )
        for ds in [*described.inputs, *described.side_inputs]:
            if not ds.local:
                continue
            folders = _folders(ds.given, ds.files())
            found += folders  # not walked: their files need no naming
            if len(folders) < len(ds.given):  # files or globs
                found += [f for f in ds.files() if f.startswith(root)]
        return found

    def _plan(self) -> tuple[Any, int]:
        """The step's plan with the sizes this job chose (:attr:`auto`),
        lined up with the kept run's on an incremental run."""
        size, pilot = self.auto.mini_batch_size, self.auto.pilot
        if self.increment is not None:
            around = self.increment.plan(size, pilot)
            if around is not None:
                return around
        return self.described.plan(size, pilot)

    def _all_batches(self) -> Iterable[Any]:
        """Every mini-batch of the plan (file plans are lazy: planned again)."""
        return self.batches if isinstance(self.batches, list) else self._plan()[0]

    def _planned_items(self) -> tuple[int | None, str]:
        """The items the plan holds, and how job_result.txt counts them: the
        files of file inputs, the rows of Parquet inputs (from their metadata);
        ``None`` for CSV, whose rows are known only once read."""
        described = self.described
        return described.input_type.planned_items(
            described.inputs, self.batches, described.own_output()
        )

    def _describe(self, index: int) -> str:
        """``mini-batch <index> (<its inputs>)``, for errors about its result."""
        described, batches = self.described, self.batches
        if isinstance(batches, list):
            batch = batches[index]
        else:  # file inputs, planned lazily: their lists are kept
            files = [f for ds in described.inputs for f in ds.files()]
            size, pilot = self.auto.mini_batch_size, self.auto.pilot
            batch = file_batch_at(files, index, size, pilot)
        return f"mini-batch {index} ({batch.describe()})"

    def _fill_ledger(
        self, ledger: PlanLedger, listed: list[tuple[str, int, str]] | None = None
    ) -> None:
        """Record the step's input files and a digest of each planned mini-batch
        (what it reads, and its files' sizes and mtimes) in ``ledger``; from
        ``listed`` stamps if given (an auto pilot's re-plan: the files as
        first listed, not stat'ed again)."""
        described = self.described
        own = described.own_output()  # never an input: its plan() leaves it out
        stamps: Iterator[tuple[str, int, str]] = (
            stamp
            for stamp in itertools.chain.from_iterable(
                ds.stamps() for ds in described.inputs
            )
            if stamp[0] != own
        )
        if listed is not None:
            stamps = iter(listed)
        elif self.auto.pilot_pending:  # kept for the re-plan (_plan_rest)
            self._listed = listed = list(stamps)
            stamps = iter(listed)
        if self.cfg.partition_keys:
            self._fill_partitions(ledger, stamps)
            return
        described.input_type.fill_ledger(
            ledger, described.inputs, self.batches, stamps, lambda: self._plan()[0]
        )

    def _fill_partitions(
        self, ledger: PlanLedger, stamps: Iterator[tuple[str, int, str]]
    ) -> None:
        """:meth:`_fill_ledger` for a partitioned plan: each partition's
        digest covers its key values, its files and their sizes and mtimes."""
        known: dict[str, tuple[int, str]] = {}
        for path, size, stamp in stamps:
            ledger.file(path, size, stamp)
            known[path] = (size, stamp)
        for batch in self.batches:
            ledger.mini_batch(
                (batch.key_value, batch.joined), [known.get(p) for p in batch.paths]
            )

    def _item_counter(self, records: bool) -> Any:
        """Counts the rows of a CSV mini-batch whose try failed before they
        were counted (:func:`~daskrun.backends.inputs.delimited.count_csv_rows`),
        or, with
        ``records``, the records of one whose rows pandas cannot read
        (:func:`~daskrun.backends.inputs.delimited.count_csv_records`); bounded by
        ``daskrun.storage-timeout`` (the input may be what hung: a FIFO, a
        dead mount), then unknown (``None``) or 1."""
        described = self.described
        return described.input_type.unread_counter(described.inputs, records)


def _row_counts(row: dict[str, str]) -> Counts:
    def number(key: str) -> int:
        return int(row[key] or 0)

    return Counts(
        number("items_in"),
        number("items_ok"),
        number("items_failed"),
        number("items_extra"),
    )


def _attempt_limits(cfg: ResolvedConfig, tally: Tally) -> ResolvedConfig:
    """The thresholds a resumed attempt stops at: the run's, raised to the
    failures earlier attempts counted where those already exceed them. So
    a plain resume of a run stopped by a threshold runs the mini-batches
    that never ran, and stops at its first new failure.

    >>> from daskrun.engine.config import ResolvedConfig
    >>> cfg = ResolvedConfig("s.py", None, 2, "append_row", 1, 1, 10, "INFO",
    ...                      60, 3, "out.txt", 0, None)
    >>> limits = _attempt_limits(cfg, Tally(10, 4, 1, items_failed=5))
    >>> limits.error_threshold, limits.allowed_failed_count
    (5, 1)
    """
    raised: dict[str, float] = {
        "error_threshold": cfg.error_threshold
        if cfg.error_threshold == -1
        else max(cfg.error_threshold, tally.items_failed)
    }
    if cfg.allowed_failed_count is not None:
        raised["allowed_failed_count"] = max(
            cfg.allowed_failed_count, tally.mini_batches_failed
        )
    if cfg.allowed_failed_percent is not None:
        share = 100 * tally.mini_batches_failed / max(1, tally.mini_batches_total)
        raised["allowed_failed_percent"] = max(cfg.allowed_failed_percent, share)
    return replace(cfg, **raised)  # type: ignore[arg-type]


def _covers(spans: Sequence[tuple[int, int]], n: int) -> bool:
    """Whether ``spans`` (sorted, ``[start, stop)``) cover items ``[0, n)``
    once each.

    >>> _covers([(0, 2), (2, 5)], 5), _covers([(0, 2), (3, 5)], 5)
    (True, False)
    """
    at = 0
    for start, stop in spans:
        if start != at:
            return False
        at = stop
    return at == n and n > 0


def _unfinished(
    row: dict[str, str],
    pieces: Sequence[tuple[int, int]] | None,
    failed: Sequence[tuple[int, int]] | None,
    target: _output.OutputTarget | None,
) -> Unfinished | None:
    """A failed mini-batch of an earlier attempt whose items were isolated,
    to retry as its failed items alone; ``None`` to run it whole (it was not
    isolated, or a piece of its output is missing)."""
    items_in = int(row["items_in"] or 0)
    if not failed or _covers(failed, items_in):
        return None
    if target is not None and not _covers(sorted([*(pieces or []), *failed]), items_in):
        return None
    counts = _row_counts(row)
    return Unfinished(None, tuple(failed), items_in, counts.ok, counts.extra)


def _part_counts(written: _output.Parts | None, batch: Any) -> Counts:
    rows = _output.count_rows(written, batch.index) if written else 0
    items_in = batch.n_items if batch.n_items is not None else rows
    ok = min(rows, items_in)
    return Counts(items_in, ok, items_in - ok, rows - ok)


def _earlier(index: int) -> TryResult:
    return TryResult(index, 0, True, "earlier attempt", None, 0, 0.0)


def _folders(given: list[str], files: list[str]) -> list[str]:
    """The folders among the ``given`` paths of a local data set that
    listed ``files``: a given path listed as a file is none, so a long
    list of files costs a look-up each, not a stat."""
    listed = set(files)
    return [
        p
        for p in given
        if p not in listed and os.path.abspath(p) not in listed and os.path.isdir(p)
    ]
