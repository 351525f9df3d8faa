"""One run of a step, from plain values: the engine's part of ``step.run()``.

A :class:`Job` takes a :class:`~daskrun.engine.description.JobDescription`
(the step's validated config, resolved data sets, output, arguments, run
identity and the registered models as plain references), and a run record to
keep current. It plans the mini-batches, records the plan, picks up
where an earlier attempt stopped, connects to the cluster, runs ``init()`` on
every worker, runs the mini-batches (:mod:`daskrun.engine.runner`), assembles the
output (:mod:`daskrun.engine.output`) and writes the log folder
(:mod:`daskrun.monitoring.monitor`). It never imports the registry: the record is any
object with :class:`Record`'s methods.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from daskrun.backends.compute.cluster import EarlyStart, connect, dashboard_link
from daskrun.backends.compute.jobqueue import WorkerWatch, is_jobqueue_cluster
from daskrun.backends.storage import FileLock
from daskrun.engine import output as _output
from daskrun.engine.bundle import build_bundle
from daskrun.engine.config import (
    config_get,
    config_seconds,
    isolate_failures,
)
from daskrun.engine.description import JobDescription
from daskrun.engine.increment import incremental
from daskrun.engine.jobwatch import (
    _prepare_output,
    _register_watched,
    _unregister,
    _user_frame,
    _Watch,
    _write_report,
)
from daskrun.engine.ledger import FillBehind, PlanLedger, promote_partial
from daskrun.engine.outputs import OutputSet
from daskrun.engine.packages import PackageCheck, runs_here
from daskrun.engine.pilot import AutoSizes
from daskrun.engine.planning import Planning
from daskrun.engine.plugin import EntryScriptPlugin, TryResult
from daskrun.engine.preflight import preflight, via_client_setting, workers_timeout
from daskrun.engine.runner import (
    Canceled,
    Counts,
    Hooks,
    Interrupt,
    Runner,
    Tally,
    Unfinished,
    check_thresholds,
    connected,
    threshold_error,
)
from daskrun.engine.viaclient import ViaClientTarget, commit
from daskrun.exceptions import (
    ClusterLostError,
    InputError,
    JobFailedError,
)
from daskrun.monitoring.console import Console, failure_lines
from daskrun.monitoring.dashboard import install_page
from daskrun.monitoring.forecast import Forecast
from daskrun.monitoring.handlers import distributed_log
from daskrun.monitoring.monitor import DISTRIBUTED_LOG, JobLogs
from daskrun.monitoring.report import import_ahead
from daskrun.monitoring.resources import PerfLog

logger = logging.getLogger("daskrun")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a job, raised again once the job has said it was
    canceled and how to resume it (the CLI then adds nothing)."""


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


class Job(Planning):
    """One run of a step as ``described``: its run ``described.run_id``, in
    ``described.run_dir``. It reads only the description, and keeps what it
    chooses (:attr:`auto`: the ``"auto"`` sizes; the plan) on itself.

    Use it in this order (``step.run()`` and ``resume()`` do)::

        job = Job(described, console=...)
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
        described: JobDescription,
        *,
        console: Console,
        interrupt: Interrupt | None = None,
    ):
        self.described, self.cfg = described, described.cfg
        run_id = described.run_id
        # checked before anything is planned or started
        self.resource_interval = config_seconds("resource-interval")
        self.progress_timeout = config_seconds("progress-timeout")
        self.first_result_timeout = config_seconds("first-result-timeout")
        # read again by the preflight; a bad value fails before anything starts
        via_client_setting()
        workers_timeout(queued=False)
        self.perf: PerfLog | None = None
        self.run_id, self.run_dir = run_id, described.run_dir
        # the environment's packages, here before any cluster starts (plan()
        # may start one) where the workers will run this interpreter
        self.packages = PackageCheck(
            described.config.environment, run_id, console.say if console.show else None
        )
        if runs_here(described.config.compute_target):
            self.packages.here()
        self.console = console
        models = described.models
        self.models = None if models is None else list(models)
        self.interrupt = interrupt or Interrupt()
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}
        # the sizes it plans with, "auto" chosen here (daskrun.engine.auto)
        self.auto = AutoSizes(described, self.cfg)
        self._after_pilot = 0  # the pilot's mini-batches, once handed out
        # an auto pilot's input stamps as first listed, for the re-plan
        self._listed: list[tuple[str, int, str]] | None = None
        self.bundle = build_bundle(
            self.cfg.entry_script, self.cfg.source_directory, exclude=self._not_source()
        )
        timeout = float(config_get("storage-timeout"))
        self.target: _output.OutputTarget | None = (
            OutputSet.of_named(described.outputs, run_id, timeout)
            if described.outputs
            else _output.OutputTarget(
                described.output,
                self.cfg.append_row_file_name,
                run_id,
                dict(described.output_storage_options),
                self.cfg.output_format,
                timeout,
            )
            if described.output is not None and self.cfg.output_action == "append_row"
            else None
        )
        # an incremental run's output keeps the rows of unchanged inputs
        self.increment = incremental(described, self.target, self.bundle)
        self.batches, self.total = self._plan()
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
        self._behind: FillBehind | None = None  # see plan()
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
        A new run's plan streams (:class:`~daskrun.engine.ledger.FillBehind`).
        """
        for lock in _prepare_output(self.target) if self.target is not None else ():
            self.locks.callback(lock.release)
        if self.described.config.compute_target is None:
            # daskrun's own cluster starts while the inputs are planned (its
            # workers importing distributed take most of a short job's start)
            self._early = EarlyStart(self._connection())
            self.locks.callback(self._early.close)
        partial = None if resumed_digest else promote_partial(self.run_dir)
        if partial is not None:  # killed while it streamed: keep what ran unchanged
            resumed_digest, replan = partial, True
        ledger = self._ledger = PlanLedger(self.run_dir)
        if resumed_digest is None and self.increment is None:
            # nothing to compare it with: filled while the workers start
            # and, but for a pilot's re-plan, the first mini-batches run
            streams = not self.auto.pilot_pending
            self._behind = FillBehind(ledger, self._fill_ledger, streams)
            self.locks.callback(self._behind.end)
        else:
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
        output_path = self.described.output or str(self.run_dir / "outputs")
        if "://" not in output_path:
            # run() may write its own files there (EntryScript().output_dir),
            # as with output_action="summary_only" into a PipelineData
            os.makedirs(output_path, exist_ok=True)
        self.plugin = self._entry_script_plugin(output_path)

    def open(self, record: Record, *, resuming: bool, retry_failed: bool) -> None:
        """Make the new plan the run's, and pick up an earlier attempt's
        finished mini-batches when ``resuming``."""
        if self._behind is None:  # else once filled, see _ledger_committed
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
        if self.increment is not None:  # kept rows are committed parts
            self.increment.carry(self.run_dir, self._all_batches(), resuming)
            if line := self.increment.line(self.total):
                self.console.say(line)
        picks_up = resuming or bool(self.increment and self.increment.reused)
        kept = self._restore(retry_failed) if picks_up else []
        # what this attempt stops at: see _attempt_limits
        self.limits = self._resumed_limits() if picks_up else self.cfg
        self.logs = JobLogs(
            self.run_dir / "logs",
            kept,
            retry_failed=retry_failed,
            redact=self.plugin.redact,
        )
        self.watch = _Watch(self.logs, self.tally, self.console)
        self.resuming = resuming

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
        except InputError as e:  # an input gone since it was listed
            error = str(e)
            raise
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
                self.described.config.compute_target,
                self.cfg.node_count,
                self.auto.processes,
                on_lost=lambda reason: self.interrupt.trigger(
                    reason.replace("RUN_ID", self.run_id)
                ),
                security=self.described.config.security,
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
        import_ahead()  # the report's, while init() holds the workers
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
        if self._behind is not None and not self._behind.streams:
            self._ledger_committed()
        try:
            if self.auto.pilot_pending:  # no barrier: the rest follows on
                self.auto.before_pilot(client)
                pilot = itertools.islice(self.batches, self.auto.pilot)
                feed = self.auto.feed(
                    self.pending(pilot), lambda: self._plan_rest(client), self.tally
                )
                return self._run_batches(client, feed)
            return self._run_batches(client, self._streamed(self.pending()))
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

    def _streamed(self, batches: Iterator[Any]) -> Iterator[Any]:
        """``batches``, each once its digest is in the ledger that streams
        (:class:`~daskrun.engine.ledger.FillBehind`); the ledger is the
        run's once the last is handed out."""
        behind = self._behind
        if behind is None:
            yield from batches
            return
        for batch in batches:  # or an earlier attempt's Unfinished one
            behind.wait(getattr(batch, "batch", batch).index, self.interrupt.check)
            yield batch
        self._ledger_committed()

    def _ledger_committed(self) -> None:
        """The plan's ledger, filled while the workers started (see
        :meth:`plan`), made the run's, its digest in the run record."""
        behind, self._behind = self._behind, None
        if behind is not None:
            self.record.inputs_digest = behind.commit()
            self.record.save()

    def _preflight(self, client: Any) -> None:
        """Workers to run on, and inputs and output every host reaches
        (:mod:`daskrun.engine.preflight`); an output the hosts do not share is
        then written by the client (:mod:`daskrun.engine.viaclient`)."""
        target = preflight(
            client,
            datasets=[*self.described.inputs, *self.described.side_inputs],
            output=self.target,
            expected_workers=self.cfg.node_count * (self.auto.processes or 1),
            queued=self._queued(),
            say=self.console.say,
            redact=self.plugin.redact,
            run_id=self.run_id,
            check=self.interrupt.check,
        )
        if target is not self.target:
            self.target = target
            self.plugin.set_output(target)

    def _queued(self) -> bool:
        """Whether the job runs on a batch queue (Slurm and the like)."""
        target = self.described.config.compute_target
        return is_jobqueue_cluster(target) or getattr(target, "queued", False) is True

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
        """A :class:`~daskrun.engine.runner.Runner` over ``batches`` of the plan."""
        hooks = Hooks(
            on_done=self.on_done,
            isolate=self._isolating if self.isolate else None,
            count_rows=self._item_counter(records=False),
            # a Dask collection's partitions are the tasks' dependencies
            task=self.described.input_type.task_of(self.described.inputs),
            commit=(
                functools.partial(commit, self.target)
                if isinstance(self.target, ViaClientTarget)
                else None
            ),
            say=self.console.say,
        )
        runner = Runner(
            client,
            self.plugin,
            self.tally,
            self.limits,
            key_prefix=f"{self.described.name}-{self.run_id[-6:]}",
            hooks=hooks,
            interrupt=self.interrupt,
            progress_timeout=self.progress_timeout,
            first_result_timeout=self.first_result_timeout,
        )
        with self._workers_watched(client):
            return runner.run(batches)

    def _workers_watched(self, client: Any) -> contextlib.AbstractContextManager[Any]:
        """While the mini-batches run on a cluster that is not a batch queue
        (whose own watch, :func:`~daskrun.backends.compute.jobqueue.on_queue`,
        knows its walltime): a cluster whose workers all left, and none came
        back within ``daskrun.workers-timeout``, fails the job."""
        grace = workers_timeout(queued=False)
        if self._queued() or grace is None:
            return contextlib.nullcontext()
        return WorkerWatch(
            client,
            grace,
            lambda why: self.interrupt.trigger(why.replace("RUN_ID", self.run_id)),
            lambda grace: (
                f"every worker of the cluster left and none came back within "
                f"{grace:g} s (daskrun.workers-timeout); start workers for its "
                "scheduler, then resume the run (daskrun resume RUN_ID)"
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
        pilot = min(self.auto.pilot, self.total)
        init = self.timings.get("init_done", 0.0) - self.timings.get(
            "cluster_ready", 0.0
        )
        items_left = max(0, (self.items_planned or 0) - pilot)
        choice = self.auto.choose(client, init, items_left)
        ledger = PlanLedger(self.run_dir)
        try:
            self._fill_ledger(ledger, self._listed)
        except BaseException:
            ledger.discard()
            raise
        ledger.commit()
        self._listed = None
        self.batches, total = self._plan()
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
        final = target.publish(self.succeeded, self._describe)
        if self.increment is not None:  # its parts are kept for the next
            self.increment.publish(self.run_dir, self._all_batches())
        elif not self.tally.mini_batches_failed:
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
            counts = self.increment.counts if self.increment is not None else {}
            record.end(
                status,
                error,
                {**self.tally.counts(self.items_planned), **counts},
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
                    *(self.increment.lines() if self.increment is not None else ()),
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
