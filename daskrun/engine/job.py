"""One run of a step, from plain values: the engine's part of ``step.run()``.

A :class:`Job` takes a bound step (its validated config, resolved data sets,
output and arguments), the registered models as plain references, and a run
record to keep current. It plans the mini-batches, records the plan, picks up
where an earlier attempt stopped, connects to the cluster, runs ``init()`` on
every worker, runs the mini-batches (:mod:`daskrun.engine.runner`), assembles the
output (:mod:`daskrun.engine.output`) and writes the log folder
(:mod:`daskrun.monitoring.monitor`). It never imports the registry: the record is any
object with :class:`Record`'s methods.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from daskrun.aml.modelrefs import ModelRef
from daskrun.backends.compute.cluster import EarlyStart, connect, dashboard_link
from daskrun.backends.compute.jobqueue import is_jobqueue_cluster
from daskrun.backends.inputs.base import Input
from daskrun.backends.inputs.datasets import file_batch_at
from daskrun.backends.storage import FileLock, describe_error, secret_values
from daskrun.engine import output as _output
from daskrun.engine.config import (
    ParallelRunConfig,
    ResolvedConfig,
    config_get,
    config_seconds,
    isolate_failures,
)
from daskrun.engine.ledger import PlanLedger
from daskrun.engine.packages import PackageCheck, runs_here
from daskrun.engine.pilot import AutoSizes
from daskrun.engine.plugin import (
    EntryScriptPlugin,
    InputSpec,
    SideInput,
    TryResult,
    build_bundle,
)
from daskrun.engine.preflight import preflight, via_client_setting, workers_timeout
from daskrun.engine.runner import (
    Canceled,
    Counts,
    Interrupt,
    LostTasks,
    Tally,
    Unfinished,
    check_thresholds,
    connected,
    run_mini_batches,
    threshold_error,
)
from daskrun.engine.viaclient import ViaClientTarget, commit
from daskrun.exceptions import (
    ClusterLostError,
    ConfigError,
    EntryScriptError,
    InputError,
    JobFailedError,
)
from daskrun.monitoring.dashboard import install_page, publish
from daskrun.monitoring.forecast import Forecast
from daskrun.monitoring.monitor import (
    DISTRIBUTED_LOG,
    FAILED_ITEMS,
    REPORT,
    Console,
    JobLogs,
    Pace,
    distributed_log,
    failure_lines,
    init_done,
    read_failed_spans,
    read_report,
)
from daskrun.monitoring.report import write_report
from daskrun.monitoring.resources import PerfLog

logger = logging.getLogger("daskrun")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a job, raised again once the job has said it was
    canceled and how to resume it (the CLI then adds nothing)."""


class Resumed(enum.IntEnum):
    """What a resume knows of a mini-batch before it runs anything."""

    TO_RUN = 0
    REPORTED = 1  # finished in an earlier attempt, and in its report
    COMMITTED = 2  # its part is committed, but the report missed it (the
    # client died in between): done, its counts read back from the part


class Record(Protocol):
    """What a job needs of its run record
    (:class:`daskrun.registry.records.RunRecord`)."""

    run_id: str
    inputs_digest: str | None
    auto: dict[str, Any]

    def start(self) -> None: ...

    def save(self) -> None: ...

    def end(
        self,
        status: str,
        error: str | None,
        counts: dict[str, int],
        output_path: str | None,
        logs_dir: str,
        logged: Iterable[Sequence[Any]] = (),
    ) -> None: ...


class BoundStep(Protocol):
    """What a job needs of a step: a ``ParallelRunStep`` bound to its
    parameters, whose inputs are resolved data sets."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...  # its input_type's kind, for the record
    @property
    def input_type(self) -> type[Input]: ...  # the inputs' class

    mini_batch_size: int  # "auto": set by the job before it plans
    pilot: int  # mini_batch_size="auto": one-file mini-batches first
    auto_recorded: dict[str, Any]  # a resumed run's AutoChoice

    @property
    def inputs(self) -> Sequence[Any]: ...  # FileDataset or TabularDataset
    @property
    def side_inputs(self) -> Sequence[Any]: ...
    @property
    def arguments(self) -> Sequence[Any]: ...
    @property
    def output(self) -> str | None: ...
    @property
    def output_storage_options(self) -> dict[str, Any]: ...
    @property
    def experiment(self) -> str | None: ...  # for Run.get_context()
    @property
    def parent_id(self) -> str | None: ...
    @property
    def config(self) -> ParallelRunConfig: ...
    @property
    def dataset_name(self) -> str | None: ...

    def plan(self) -> tuple[Any, int]: ...

    def _own_output(self) -> str | None: ...


class Job:
    """One run of ``step`` as ``run_id``, in ``runs_root / run_id``.

    Use it in this order (``step.run()`` and ``resume()`` do)::

        job = Job(step, run_id, runs_root, console=..., models=...)
        with job.opening():          # locks are released if this raises
            job.plan(resumed_digest, replan)
            record = ...             # a new record for job.plugin, or the old
            job.hold(lock)           # the record's lock, if not held yet
            job.open(record, resuming=..., retry_failed=...)
        job.run(record)              # connect, init(), mini-batches, output

    Planning lists and measures the inputs, so a missing or empty input
    fails in the constructor, before any worker starts.
    """

    def __init__(
        self,
        step: BoundStep,
        run_id: str,
        runs_root: Path,
        *,
        console: Console,
        models: list[ModelRef] | None = None,
        interrupt: Interrupt | None = None,
    ):
        self.step, self.cfg = step, step.config.resolved
        # checked before anything is planned or started
        self.resource_interval = config_seconds("resource-interval")
        self.progress_timeout = config_seconds("progress-timeout")
        self.first_result_timeout = config_seconds("first-result-timeout")
        # read again by the preflight; a bad value fails before anything starts
        via_client_setting()
        workers_timeout(queued=False)
        self.perf: PerfLog | None = None
        self.run_id, self.run_dir = run_id, runs_root / run_id
        # the environment's packages, here before any cluster starts (plan()
        # may start one) where the workers will run this interpreter
        self.packages = PackageCheck(
            step.config.environment, run_id, console.say if console.show else None
        )
        if runs_here(step.config.compute_target):
            self.packages.here()
        self.console, self.models = console, models
        self.interrupt = interrupt or Interrupt()
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}
        # "auto" sizes: set on the step before it plans (daskrun.engine.auto)
        self.auto = AutoSizes(step, self.cfg)
        self._after_pilot = 0  # the pilot's mini-batches, once handed out
        # an auto pilot's input stamps as first listed, for the re-plan
        self._listed: list[tuple[str, int, str]] | None = None
        self.batches, self.total = step.plan()
        self.bundle = build_bundle(
            self.cfg.entry_script, self.cfg.source_directory, exclude=self._not_source()
        )
        self.target = (
            _output.OutputTarget(
                step.output,
                self.cfg.append_row_file_name,
                run_id,
                step.output_storage_options,
                self.cfg.output_format,
                float(config_get("storage-timeout")),
            )
            if step.output is not None and self.cfg.output_action == "append_row"
            else None
        )
        self.items_planned, self.items_counted = self._planned_items()
        self.locks = contextlib.ExitStack()
        self.plugin: EntryScriptPlugin
        self.link: str | None = None
        self._ledger: PlanLedger
        # 1 for each mini-batch whose plan and input files are as the run had
        self._unchanged: bytearray | None = None
        # what an earlier attempt wrote, on a resume (see _restore)
        self._written: _output.Parts | None = None
        self._early: EarlyStart[Any] | None = None  # see plan()
        self.report: Path | None = None  # logs/report.html, once written

    @contextlib.contextmanager
    def opening(self) -> Iterator[None]:
        """Release the job's locks if the block raises; else they stay held
        until :meth:`run` ends."""
        try:
            yield
        except BaseException:
            self.locks.close()
            raise

    def hold(self, lock: FileLock) -> None:
        """Hold ``lock`` (the run record's) until the job ends."""
        self.locks.enter_context(lock)

    def plan(self, resumed_digest: str | None = None, replan: bool = False) -> None:
        """Lock the output, record the plan, and build the worker plugin.

        Before any work or run folder: an unreachable store fails within its
        timeout, and a second run into this output folder is refused. On a
        resume (``resumed_digest`` is the run's) whose inputs changed, only
        ``replan`` goes on, keeping the mini-batches whose inputs did not.
        """
        if self.target is not None and (lock := _prepare_output(self.target)):
            self.locks.callback(lock.release)
        if self.step.config.compute_target is None:
            # daskrun's own cluster starts while the inputs are planned (its
            # workers importing distributed take most of a short job's start)
            self._early = EarlyStart(self._connection())
            self.locks.callback(self._early.close)
        ledger = self._ledger = PlanLedger(self.run_dir)
        try:
            self._fill_ledger(ledger)
        except BaseException:
            ledger.discard()
            raise
        if resumed_digest not in (None, ledger.digest):
            if not replan:
                changes = ledger.changes()
                ledger.discard()
                raise InputError(
                    f"input changed since run {self.run_id!r}: {changes}; rerun "
                    "the step, or resume with --replan (replan=True) to keep the "
                    "mini-batches whose inputs are unchanged and run the rest"
                )
            self._unchanged = ledger.unchanged()
        output_path = self.step.output or str(self.run_dir / "outputs")
        if "://" not in output_path:
            # run() may write its own files there (EntryScript().output_dir),
            # as with output_action="summary_only" into a PipelineData
            os.makedirs(output_path, exist_ok=True)
        self.plugin = self._entry_script_plugin(output_path)

    def open(self, record: Record, *, resuming: bool, retry_failed: bool) -> None:
        """Make the new plan the run's, and pick up an earlier attempt's
        finished mini-batches when ``resuming``."""
        self._ledger.commit()
        record.inputs_digest = self._ledger.digest
        self.record = record  # kept current when a pilot chooses the size
        if self.auto.choice is not None:
            record.auto = self.auto.choice.as_dict()
        self.tally = Tally(
            mini_batches_total=self.total, count_items=self._item_counter(records=True)
        )
        # one byte per mini-batch: flat for millions
        self.succeeded = bytearray(self.total)
        self.state = bytearray(self.total)  # Resumed values
        # a mini-batch that failed its last try is split to find the items
        # that fail (runner.Isolation); those of an earlier attempt to retry
        self.isolate = isolate_failures()
        self.unfinished: dict[int, Unfinished] = {}
        kept = self._restore(retry_failed) if resuming else []
        # what this attempt stops at: see _attempt_limits
        self.limits = self._resumed_limits() if resuming else self.cfg
        self.logs = JobLogs(
            self.run_dir / "logs",
            kept,
            retry_failed=retry_failed,
            redact=self.plugin.redact,
        )
        self.watch = _Watch(self.logs, self.tally, self.console)
        self.resuming = resuming

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

    def on_done(
        self, batch: Any, result: TryResult, tries: int, counts: Counts
    ) -> None:
        """One mini-batch's final result: logs, progress, a line if it failed."""
        self.interrupt.check()
        self.timings.setdefault("first_result", time.perf_counter() - self.started)
        self.auto.observe(result)
        self.succeeded[result.index] = result.ok
        self.watch.pace.add(result.seconds)
        self.logs.mini_batch(result, tries, counts)
        self.logs.user_output(result)
        if counts.failed:
            self.logs.failed_items(batch, result)
        self.watch.tick()
        if not result.ok:
            self.console.say(
                f"daskrun: mini-batch {result.index} failed after {tries} "
                f"{'try' if tries == 1 else 'tries'} on {result.worker}: "
                f"{result.error}",
                logging.WARNING,
            )

    def run(self, record: Record) -> str:
        """Run the job to its end and record how it ended; its status.

        ``interrupt`` (triggered from another thread) stops it, ``Canceled``
        or ``Failed``, cancelling what is in flight. A KeyboardInterrupt is
        recorded as ``Canceled`` and raised again.
        """
        status, error, final = "Failed", None, None
        with self.opening():  # a record that cannot be saved holds no lock
            record.start()
        try:
            with (
                self._connection() if self._early is None else self._early.use()
            ) as client:
                # the run's thresholds judge how it ends, earlier failures too
                exceeded = self._run_on(client) or check_thresholds(
                    self.tally, self.cfg
                )
            if exceeded:
                error = str(
                    threshold_error(exceeded, self.tally, self.cfg, self.run_id)
                )
            else:
                final = self._assemble()
                status = "Completed"
        except ClusterLostError as e:
            done = self.tally.items_succeeded + self.tally.items_failed
            of = (
                f"{done} of {self.items_planned} items done"
                if self.items_planned is not None
                else f"{self.tally.mini_batches_done} of {self.total} mini-batches done"
            )
            error = f"{e}; {of}; resume with 'daskrun resume {self.run_id}'"
        except JobFailedError as e:
            error = str(e)
        except Canceled as e:
            status, error = "Canceled", str(e)
            self.console.close()  # the bar's last state, then these lines
            self.console.say(f"daskrun: {e}", logging.WARNING)
            self.console.say(
                f"daskrun: canceled; resume with: daskrun resume {self.run_id}",
                logging.WARNING,
            )
        except KeyboardInterrupt as e:
            status, error = "Canceled", "canceled by the user (KeyboardInterrupt)"
            self.console.close()  # the bar's last state, then these lines
            self.console.say(
                f"daskrun: canceled; resume with: daskrun resume {self.run_id}",
                logging.WARNING,
            )
            raise Interrupted(*e.args) from None
        finally:
            # however the job ended, its error is recorded and shown without
            # the run's credentials (a SAS signature anywhere in it too)
            error = None if error is None else self.plugin.redact(error)
            self._finish(record, status, error, final)
        self._summary(status, error)
        return status

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        """A client of the job's cluster
        (:func:`~daskrun.backends.compute.cluster.connect`);
        meanwhile distributed's own lines go to the log folder, not the
        terminal."""
        log_file = self.run_dir / "logs" / DISTRIBUTED_LOG
        with (
            distributed_log(log_file),
            connect(
                self.step.config.compute_target,
                self.cfg.node_count,
                self.auto.processes,
                on_lost=lambda reason: self.interrupt.trigger(
                    reason.replace("RUN_ID", self.run_id)
                ),
                security=self.step.config.security,
                log_file=log_file,
            ) as client,
        ):
            yield client

    def _run_on(self, client: Any) -> Any:
        """``init()`` on every worker, then the mini-batches; what exceeded
        the error threshold, if anything did."""
        say, cfg, plugin = self.console.say, self.cfg, self.plugin
        self.timings["cluster_ready"] = time.perf_counter() - self.started
        self.link = link = dashboard_link(client)
        verb = "resuming" if self.resuming else "run"
        say(f"daskrun: {verb} {self.run_id}: {self.total} mini-batches")
        if link:
            page = install_page(client, link)
            say(f"daskrun: dashboard {link}" + (f" (this job: {page})" if page else ""))
        self.watch.client, self.watch.run_id = client, self.run_id
        self._preflight(client)
        self.console.start(self.total, self.tally.mini_batches_done)
        self.packages.on_workers(client)
        self._watch_resources(client)
        _register_watched(
            client, plugin, cfg.run_invocation_timeout, self.run_id, self.console
        )
        self.timings["init_done"] = time.perf_counter() - self.started
        self.console.running(self.tally)
        self.logs.running(self.tally)
        self.watch.pace.threads = sum(client.nthreads().values()) or 1
        self.watch.forecast = self._forecast(self.watch.pace.threads)
        if self.auto.choice is not None and not self.auto.pilot_pending:
            say(self.auto.choice.line())
        try:
            if self.auto.pilot_pending:  # no barrier: the rest follows on
                self.auto.before_pilot(client)
                pilot = itertools.islice(self.batches, self.step.pilot)
                feed = self.auto.feed(
                    self.pending(pilot), lambda: self._plan_rest(client), self.tally
                )
                return self._run_batches(client, feed)
            return self._run_batches(client, self.pending())
        finally:
            self.timings["last_result"] = time.perf_counter() - self.started
            if connected(client):  # else it would wait for a scheduler gone
                # the page shows the last counts, not those of a second ago
                self.watch.tick(force=True)
                _unregister(client, plugin.name)
            if self.perf is not None:
                if connected(client):
                    with contextlib.suppress(Exception):  # the cluster may be going
                        client.unsubscribe_topic(plugin.perf_topic)
                self.perf.close()

    def _preflight(self, client: Any) -> None:
        """Workers to run on, and inputs and output every host reaches
        (:mod:`daskrun.engine.preflight`); an output the hosts do not share is
        then written by the client (:mod:`daskrun.engine.viaclient`)."""
        target = preflight(
            client,
            datasets=[*self.step.inputs, *self.step.side_inputs],
            output=self.target,
            expected_workers=self.cfg.node_count * (self.auto.processes or 1),
            queued=self._queued(),
            say=self.console.say,
            redact=self.plugin.redact,
            run_id=self.run_id,
            check=self.interrupt.check,
        )
        if target is not self.target:
            self.target = self.plugin.output = target

    def _queued(self) -> bool:
        """Whether the job runs on a batch queue (Slurm and the like)."""
        target = self.step.config.compute_target
        return is_jobqueue_cluster(target) or getattr(target, "kind", "") == "slurm"

    def _forecast(self, slots: int) -> Forecast:
        """The job's forecast (:mod:`daskrun.monitoring.forecast`), its pilot starting
        now: on ``slots`` worker threads, in node-hours on a batch queue."""
        queued = self._queued()
        forecast = Forecast(
            self.started, slots=slots, nodes=self.cfg.node_count if queued else None
        )
        forecast.begin(time.perf_counter(), self.tally.mini_batches_done, self.total)
        return forecast

    def _run_batches(self, client: Any, batches: Iterator[Any]) -> Any:
        """:func:`run_mini_batches` over ``batches`` of the plan."""
        cfg, plugin = self.limits, self.plugin
        return run_mini_batches(
            client,
            plugin.events_topic,
            plugin.name,
            batches,
            self.tally,
            cfg,
            key_prefix=f"{self.step.name}-{self.run_id[-6:]}",
            on_done=self.on_done,
            interrupt=self.interrupt,
            starts_topic=plugin.starts_topic,
            redact=plugin.redact,
            isolate=self._isolating if self.isolate else None,
            count_rows=self._item_counter(records=False),
            # a Dask collection's partitions are the tasks' dependencies
            task=self.step.input_type.task_of(self.step.inputs),
            progress_timeout=self.progress_timeout,
            first_result_timeout=self.first_result_timeout,
            commit=(
                functools.partial(commit, self.target)
                if isinstance(self.target, ViaClientTarget)
                else None
            ),
        )

    def _plan_rest(self, client: Any) -> Iterator[Any]:
        """Once enough of the pilot's outcomes are in (the rest of the pilot
        may still run): choose the size of the rest from its measurements,
        plan the rest (indices go on after the pilot's), record the new plan
        in the ledger, then the choice in the run record; the rest's
        mini-batches to run.

        Only the pilot's mini-batches have been handed out, and they are the
        first of the plan at any size. A client that dies before the record
        is saved leaves the run's digest and choice as they were: its resume
        plans the pilot and the default size again, and chooses once more.
        """
        pilot = min(self.step.pilot, self.total)
        init = self.timings.get("init_done", 0.0) - self.timings.get(
            "cluster_ready", 0.0
        )
        items_left = max(0, (self.items_planned or 0) - pilot)
        choice = self.auto.choose(client, self.step, init, items_left)
        ledger = PlanLedger(self.run_dir)
        try:
            self._fill_ledger(ledger, self._listed)
        except BaseException:
            ledger.discard()
            raise
        ledger.commit()
        self._listed = None
        self.batches, total = self.step.plan()
        self.succeeded = self.succeeded[:pilot] + bytearray(total - pilot)
        self.state = self.state[:pilot] + bytearray(total - pilot)
        self.total = self.tally.mini_batches_total = total
        self.tally.all_scheduled = False
        self._after_pilot = pilot
        self.record.inputs_digest = ledger.digest
        self.record.auto = choice.as_dict()
        self.record.save()
        self.console.say(choice.line())
        self.watch.restart_forecast(self._forecast(self.watch.pace.threads))
        return self.pending()

    def _watch_resources(self, client: Any) -> None:
        """Write the workers' resource samples to ``logs/perf`` as they come
        (:mod:`daskrun.monitoring.resources`), from before ``init()`` on."""
        if self.resource_interval is None:
            return
        self.perf = PerfLog(
            self.logs.dir / "perf",
            lambda line: self.console.say(line, logging.WARNING),
            describe=self._describe,
        )
        client.subscribe_topic(self.plugin.perf_topic, self.perf.add)

    def _isolating(self, batch: Any) -> None:
        """Before mini-batch ``batch``'s items are isolated: remove its
        part, and on a resume the pieces an earlier isolation of it wrote,
        so that its rows are those of this isolation alone."""
        if self.target is not None:
            _output.remove_part(self.target, batch.index, pieces=self.resuming)

    def _assemble(self) -> str | None:
        """The final output file from the committed parts (none without an
        ``append_row`` output): those of the mini-batches that succeeded, and
        the pieces of those whose failed items were isolated."""
        target = self.target
        if target is None:
            return None
        final = _output.assemble(target, self.succeeded, self._describe)
        if not self.tally.mini_batches_failed:
            # kept otherwise, for a resume with retry_failed
            _output.remove_parts(target)
        return final

    def _finish(
        self, record: Record, status: str, error: str | None, final: str | None
    ) -> None:
        """Record how the job ended (whatever ended it) and release its locks."""
        try:
            self.console.close()
            if self.perf is not None:  # init() failed: _run_on did not get far
                self.perf.close()
            seconds = time.perf_counter() - self.started
            self.watch.tick(status, force=True, actual=seconds)
            record.end(
                status,
                error,
                self.tally.counts(self.items_planned),
                final,
                str(self.logs.dir),
                self.logs.logged,
            )
            self.logs.finish(
                status=status,
                run_id=self.run_id,
                tally=self.tally,
                error=error,
                output_path=final,
                seconds=seconds,
                timings=self.timings,
                items_planned=self.items_planned,
                items_counted=self.items_counted,
                resources=[
                    *self.watch.cost_lines(seconds),
                    *(self.perf.lines() if self.perf is not None else ()),
                    *self.auto.lines(),
                ],
            )
            self.report = _write_report(self.run_dir)
        finally:
            self.locks.close()

    def _summary(self, status: str, error: str | None) -> None:
        """The job's last lines: its counts, and where a failure came from."""
        say, tally = self.console.say, self.tally
        if tally.items_extra:
            logger.warning(
                "run %s: run() returned %d more results than inputs; they are "
                "in the output (see processed_mini-batches.csv)",
                self.run_id,
                tally.items_extra,
            )
        failed = status == "Failed"
        level = logging.ERROR if failed else logging.INFO
        say(f"daskrun: {status}: {tally.progress()}", level)
        if self.report is not None:  # before the cause, which comes last
            say(f"daskrun: report: {self.report}", level)
        if failed and error:
            # an init() that failed has its traceback in the error
            where = _user_frame(
                tally.first_failure.traceback if tally.first_failure else error,
                self.cfg.source_directory or self.cfg.entry_script,
            )
            if where:
                say(f"daskrun: raised at {where}", level)
        if failed:  # as the CLI prints them: the cause last, once
            for line in failure_lines(
                self.run_id, self.logs.dir, status, error, tally.mini_batches_failed
            ):
                say(line, level)

    def _entry_script_plugin(self, output_path: str) -> EntryScriptPlugin:
        step, cfg, target, run_id = self.step, self.cfg, self.target, self.run_id
        zipped, script = self.bundle
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
                    *(ds.storage_options for ds in (*step.inputs, *step.side_inputs)),
                    step.output_storage_options,
                )
                for secret in secret_values(options)
            ],
        )

    def _not_source(self) -> list[str]:
        """What the source directory may hold that is data, not code: the
        step's local input folders and files, and its output folder. Inputs
        reach the workers as paths; they are never shipped with the script."""
        step, source = self.step, self.cfg.source_directory
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

    def _planned_items(self) -> tuple[int | None, str]:
        """The items the plan holds, and how job_result.txt counts them: the
        files of file inputs, the rows of Parquet inputs (from their metadata);
        ``None`` for CSV, whose rows are known only once read."""
        step = self.step
        return step.input_type.planned_items(
            step.inputs, self.batches, step._own_output()
        )

    def _describe(self, index: int) -> str:
        """``mini-batch <index> (<its inputs>)``, for errors about its result."""
        step, batches = self.step, self.batches
        if isinstance(batches, list):
            batch = batches[index]
        else:  # file inputs, planned lazily: their lists are kept
            files = [f for ds in step.inputs for f in ds.files()]
            batch = file_batch_at(files, index, step.mini_batch_size, step.pilot)
        return f"mini-batch {index} ({batch.describe()})"

    def _fill_ledger(
        self, ledger: PlanLedger, listed: list[tuple[str, int, str]] | None = None
    ) -> None:
        """Record the step's input files and a digest of each planned mini-batch
        (what it reads, and its files' sizes and mtimes) in ``ledger``; from
        ``listed`` stamps if given (an auto pilot's re-plan: the files as
        first listed, not stat'ed again)."""
        step = self.step
        own = step._own_output()  # never an input: step.plan() leaves it out
        stamps: Iterator[tuple[str, int, str]] = (
            stamp
            for stamp in itertools.chain.from_iterable(
                ds.stamps() for ds in step.inputs
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
        step.input_type.fill_ledger(
            ledger, step.inputs, self.batches, stamps, lambda: step.plan()[0]
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
        return self.step.input_type.unread_counter(self.step.inputs, records)


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


def _register(
    client: Any, plugin: EntryScriptPlugin, timeout: float, run_id: str
) -> None:
    """Run ``init()`` on every worker; a failure or a hang fails the job."""
    try:
        client.register_plugin(plugin, name=plugin.name)
    except EntryScriptError as e:
        # a resume of the same code would fail the same way
        first, _, rest = str(e).partition("\n")
        hint = f"; fix it, then 'daskrun resume {run_id} --new-source'"
        raise JobFailedError(
            first + hint + (f"\n{rest}" if rest else ""), run_id=run_id
        ) from None
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


class _Watch:
    """Keeps the live views of a run current: the progress display, the
    overview file and the dashboard page (each at most once a second)."""

    def __init__(self, logs: JobLogs, tally: Tally, console: Console):
        self.logs, self.tally, self.console = logs, tally, console
        self.client: Any = None
        self.run_id = ""
        self.pace = Pace()
        self.forecast: Forecast | None = None  # from the run phase on
        self._since = (0, 0.0)  # the pace when the forecast's pilot began
        self._last = 0.0

    def restart_forecast(self, forecast: Forecast) -> None:
        """Forecast afresh from here (the mini-batches' size changed: an
        auto pilot ended), from a pilot of what is left."""
        self.forecast, self._since = forecast, (self.pace.finished, self.tally.busy)

    def tick(
        self, status: str = "Running", force: bool = False, actual: float | None = None
    ) -> None:
        """Update the views; ``actual``: the job's seconds, once it ended
        (the overview then gives them beside the forecast)."""
        now_ = time.monotonic()
        due = force or now_ - self._last >= 1.0
        tally, forecast = self.tally, self.forecast
        estimate = (
            forecast.update(
                time.perf_counter(),
                tally.mini_batches_done,
                tally.mini_batches_total,
                self.pace.finished - self._since[0],
                # every try's seconds: retries and isolation take time too
                tally.busy - self._since[1],
            )
            if forecast is not None and status == "Running"
            else None
        )
        shown = estimate
        if actual is not None and forecast is not None:
            shown = forecast.made  # the one made as the pilot ended
        snap = (
            self.logs.snapshot(tally, status, self.pace, shown, actual) if due else None
        )
        self.console.update(tally, pace=self.pace, forecast=estimate)
        if snap is None:
            return
        self._last = now_
        self.logs.overview(snap)
        if self.client is not None:
            publish(self.client, self.run_id, snap)

    def cost_lines(self, seconds: float) -> list[str]:
        """``job_result.txt``'s forecast made as the pilot ended, and the
        job's actual cost over ``seconds``."""
        if self.forecast is None:  # it never reached its run phase
            return []
        return self.forecast.lines(seconds, self.tally.busy)


def _write_report(run_dir: Path) -> Path | None:
    """``logs/report.html`` (:mod:`daskrun.monitoring.report`); a report that cannot
    be written never fails the job."""
    try:
        return write_report(run_dir)
    except Exception as e:
        logger.warning("run %s: no report.html: %s", run_dir.name, e)
        return None


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
