"""Scheduling mini-batches: bounded in flight, retries, failure thresholds.

The client keeps at most ``in-flight-per-thread × worker threads`` mini-batches
submitted at once, pulling plans lazily, so its memory stays flat whatever the
number of inputs. Each try is its own task; a failed try is resubmitted until
``run_max_try``. At the tail, the slowest tasks get a copy on an idle worker
(:mod:`daskrun.engine.speculation`). Counting and threshold checks
(:class:`Tally`, :func:`check_thresholds`) are pure and tested without a
cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from distributed import Client, as_completed

from daskrun.backends.inputs.datasets import MiniBatch, SubBatch
from daskrun.engine.config import ResolvedConfig, config_get
from daskrun.engine.isolation import Isolation, Unfinished, counted
from daskrun.engine.lost import (
    FrozenWorkers,
    LostTasks,
    NoProgress,
    judge_lost_task,
)
from daskrun.engine.plugin import TryResult
from daskrun.engine.shrink import Shrink
from daskrun.engine.speculation import Speculation, events
from daskrun.engine.stages import StageLostTasks, TwoStage, run_key
from daskrun.engine.tasks import process_mini_batches

# Canceled lives in exceptions.py; ``runner.Canceled`` stays importable
from daskrun.exceptions import Canceled as Canceled
from daskrun.exceptions import ClusterLostError, JobFailedError, ThresholdExceededError

logger = logging.getLogger("daskrun")


@dataclass
class Failure:
    """The first failure of a job, as shown to the user."""

    index: int
    inputs: str  # what the mini-batch held, e.g. "files a.png, b.png"
    error: str
    traceback: str | None
    worker: str

    def summary(self) -> str:
        return f"mini-batch {self.index} ({self.inputs}) on {self.worker}: {self.error}"


class Counts(NamedTuple):
    """Items of one finished mini-batch."""

    items_in: int
    ok: int
    failed: int
    extra: int


@dataclass
class Tally:
    """Counts of a job, updated as mini-batches finish."""

    mini_batches_total: int
    mini_batches_done: int = 0
    mini_batches_failed: int = 0
    items_total: int = 0
    items_succeeded: int = 0
    items_failed: int = 0
    items_extra: int = 0
    all_scheduled: bool = False
    first_failure: Failure | None = None
    # seconds the workers spent on this attempt's tries, every one: those
    # that failed and were retried, and the pieces of isolated mini-batches
    busy: float = 0.0
    # the items of a mini-batch that failed before they were counted and
    # whose rows cannot be read (a CSV range pandas cannot parse); 1 when
    # not given
    count_items: Callable[[MiniBatch], int] | None = None

    def record(self, batch: MiniBatch, result: TryResult) -> Counts:
        """Count the final outcome of one mini-batch; return its counts."""
        self.mini_batches_done += 1
        items_in = result.items_in if result.items_in is not None else batch.n_items
        if result.ok:
            assert items_in is not None
            ok = min(result.items_out, items_in)
            counts = Counts(items_in, ok, items_in - ok, result.items_out - ok)
            if counts.failed and self.first_failure is None:
                self.first_failure = Failure(
                    batch.index,
                    batch.describe(),
                    f"run() returned {result.items_out} results for {items_in} inputs",
                    None,
                    result.worker,
                )
        else:
            if items_in is None:  # a CSV range that cannot be read
                items_in = self.count_items(batch) if self.count_items else 1
            n = items_in
            counts = _isolated_counts(n, result) or Counts(n, 0, n, 0)
            self.mini_batches_failed += 1
            if self.first_failure is None or self.first_failure.traceback is None:
                piece = result.failed_pieces[0][0] if result.failed_pieces else batch
                self.first_failure = Failure(
                    batch.index,
                    piece.describe(),
                    result.error or "unknown error",
                    result.traceback,
                    result.worker,
                )
        self.add(counts)
        return counts

    def counts(self, items_planned: int | None = None) -> dict[str, int]:
        """The counts a run record keeps. ``items_total`` is ``items_planned``
        where the plan knows it (see :meth:`daskrun.monitoring.monitor.JobLogs.finish`),
        so that a job stopped early shows what it was given, not only what
        it did."""
        total = self.items_total
        if items_planned is not None:
            total = max(items_planned, total)
        return {
            "mini_batches_total": self.mini_batches_total,
            "mini_batches_done": self.mini_batches_done,
            "mini_batches_failed": self.mini_batches_failed,
            "items_total": total,
            "items_succeeded": self.items_succeeded,
            "items_failed": self.items_failed,
            "items_extra": self.items_extra,
        }

    def add(self, counts: Counts) -> None:
        """Add one finished mini-batch's items."""
        self.items_total += counts.items_in
        self.items_succeeded += counts.ok
        self.items_failed += counts.failed
        self.items_extra += counts.extra

    def progress(self) -> str:
        """The counts in words, for a job's last line.

        >>> Tally(mini_batches_total=5, mini_batches_done=3,
        ...       mini_batches_failed=1).progress()
        '3 of 5 mini-batches done (1 failed); 0 items ok, 0 failed'
        """
        failed = self.mini_batches_failed
        return (
            f"{self.mini_batches_done} of {self.mini_batches_total} mini-batches "
            f"done{f' ({failed} failed)' if failed else ''}; "
            f"{self.items_succeeded} items ok, {self.items_failed} failed"
        )


def _isolated_counts(n: int, result: TryResult) -> Counts | None:
    """The counts of a mini-batch whose failed items were isolated: only
    the items of its failed pieces failed."""
    if not result.failed_pieces:
        return None
    failed = sum(piece.n_items for piece, _ in result.failed_pieces)
    ok = min(result.items_out, n - failed)
    return Counts(n, ok, failed, result.items_out - ok)


def check_thresholds(tally: Tally, cfg: ResolvedConfig) -> str | None:
    """Name the threshold the job has exceeded, or return ``None``.

    >>> cfg = ResolvedConfig("s.py", None, 2, "append_row", 1, 1, 10, "INFO",
    ...                      60, 3, "out.txt", None, None)
    >>> check_thresholds(Tally(10, items_failed=2), cfg) is None
    True
    >>> check_thresholds(Tally(10, items_failed=3), cfg)
    'error_threshold'
    """
    if cfg.error_threshold != -1 and tally.items_failed > cfg.error_threshold:
        return "error_threshold"
    if (
        cfg.allowed_failed_count is not None
        and tally.mini_batches_failed > cfg.allowed_failed_count
    ):
        return "allowed_failed_count"
    if (
        cfg.allowed_failed_percent is not None
        and tally.all_scheduled
        and tally.mini_batches_total
        and 100 * tally.mini_batches_failed / tally.mini_batches_total
        > cfg.allowed_failed_percent
    ):
        return "allowed_failed_percent"
    return None


def threshold_error(
    name: str, tally: Tally, cfg: ResolvedConfig, run_id: str
) -> ThresholdExceededError:
    """The error for an exceeded threshold: its value, the counts, the first
    failing input and its exception."""
    if name == "error_threshold":
        limit: float = cfg.error_threshold
        observed: float = tally.items_failed
        what = f"{tally.items_failed} items failed"
    elif name == "allowed_failed_count":
        assert cfg.allowed_failed_count is not None
        limit, observed = cfg.allowed_failed_count, tally.mini_batches_failed
        what = f"{tally.mini_batches_failed} mini-batches failed"
    else:
        assert cfg.allowed_failed_percent is not None
        limit = cfg.allowed_failed_percent
        observed = 100 * tally.mini_batches_failed / max(1, tally.mini_batches_total)
        what = f"{observed:.1f}% of mini-batches failed"
    shown_limit = int(limit) if float(limit).is_integer() else limit
    message = (
        f"{name}={shown_limit} exceeded: {what} "
        f"({tally.mini_batches_failed} of {tally.mini_batches_total} mini-batches "
        f"failed, {tally.items_failed} items failed, {tally.items_succeeded} "
        "succeeded)"
    )
    if tally.first_failure is not None:
        message += f". First failure: {tally.first_failure.summary()}"
    return ThresholdExceededError(
        message, threshold=name, limit=limit, observed=observed, run_id=run_id
    )


class GroupSizer:
    """How many mini-batches to put in one task.

    Dask costs milliseconds per task (a round trip of 10-15 ms on a busy
    2-core machine); a no-op mini-batch costs far less. Tasks therefore carry
    as many mini-batches as fit in ``task_seconds`` at the speed measured so
    far (one until something is measured), but never more than a fair share of
    what is left (a half of it per worker thread, so the tail shrinks in a few
    tasks), so the last tasks still spread over all workers, and never
    less than a tenth of ``task_seconds``' worth, so the tail is not a string
    of round trips. A faster measurement counts at once and a slower one
    gradually: the first try of each worker pays one-off costs (imports,
    caches) that say nothing about the rest.

    >>> g = GroupSizer(task_seconds=0.5, threads=2)
    >>> g.size(remaining=1000)
    1
    >>> g.observe(seconds=0.01, count=10)   # 1 ms per mini-batch
    >>> g.size(remaining=2000)   # 0.5 s of work
    500
    >>> g.size(remaining=200)    # a fair share: 200 / (2 * 2)
    50
    >>> g.size(remaining=40)     # the floor: 0.05 s of work
    40
    """

    def __init__(self, task_seconds: float, threads: int, max_size: int = 1000):
        self.task_seconds = task_seconds
        self.threads = threads
        self.max_size = max_size
        self.per_mini_batch: float | None = None

    def observe(self, seconds: float, count: int) -> None:
        if count <= 0:
            return
        rate = max(seconds / count, 1e-6)
        old = self.per_mini_batch
        self.per_mini_batch = (
            rate if old is None or rate < old else 0.7 * old + 0.3 * rate
        )

    def size(self, remaining: int) -> int:
        if self.per_mini_batch is None:
            return 1
        by_time = int(self.task_seconds / self.per_mini_batch)
        floor = int(self.task_seconds / 10 / self.per_mini_batch)
        fair_share = remaining // (2 * self.threads)
        return max(1, min(remaining, self.max_size, by_time, max(fair_share, floor)))


def connected(client: Client) -> bool:
    """Whether ``client`` is still connected to its scheduler: a scheduler
    that died, or froze (see
    ``daskrun.backends.compute.scheduler._SchedulerWatch``), leaves
    it reconnecting or closed, and any call to it would wait."""
    return client.status == "running"


def _cancel(client: Client, futures: Iterable[Any]) -> None:
    """Cancel ``futures`` on a scheduler that is still there."""
    if connected(client):
        with contextlib.suppress(Exception):  # the cluster may be going
            client.cancel(list(futures))


class Interrupt:
    """Stops a :class:`Runner` from another thread: a canceled run,
    or a cluster whose workers are gone. What is in flight is cancelled at
    once."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.canceled = False
        self.client: Client | None = None
        self.pending: dict[Any, Any] = {}

    def trigger(self, reason: str, canceled: bool = False) -> None:
        if self.reason is not None:
            return
        self.canceled = canceled
        self.reason = reason
        if self.client is not None:
            # wakes the runner, which waits for results
            _cancel(self.client, self.pending)

    def check(self) -> None:
        if self.reason is not None:
            raise (
                Canceled(self.reason) if self.canceled else JobFailedError(self.reason)
            )


class RunnerPlugin(Protocol):
    """What the runner needs of the worker plugin
    (:class:`~daskrun.engine.plugin.EntryScriptPlugin`): its name, its event
    topics and how it hides credentials."""

    name: str

    @property
    def events_topic(self) -> str: ...

    @property
    def starts_topic(self) -> str: ...

    def redact(self, text: str) -> str: ...


SubmitGroup = Callable[[Client, str, list[tuple[Any, int]], Any], tuple[Any, Any]]


@dataclass(frozen=True)
class Hooks:
    """What the caller does as a run goes (see :class:`Runner`).

    ``on_done(batch, last_try, tries, counts)`` is called once per mini-batch
    when its outcome is final. With ``isolate`` (``daskrun.isolate-failures``),
    a mini-batch that failed its last try is split by :class:`Isolation`,
    which calls ``isolate(batch)`` first. ``count_rows(batch)`` counts the
    rows of a mini-batch whose last try failed before they were counted (a
    CSV range whose worker died), ``None`` where they cannot be read.
    ``task(client, plugin_name, group, key)``, if given, submits a group
    instead of :func:`~daskrun.engine.tasks.process_mini_batches` (a Dask
    collection's partitions are the task's dependencies) and returns two
    futures: the task's, of key ``key`` (watched for lost and frozen
    workers), and the one giving its list of :class:`TryResult` (the same
    future, or a small one after it, where the task's value stays on the
    cluster). ``commit(batch, result)``, if given, takes each try's result as
    it arrives, first (the client writes the rows a worker returned:
    :func:`daskrun.engine.viaclient.commit`). ``say(line, level)``, if
    given, shows a line to the user (the job's console).
    """

    on_done: Callable[[Any, TryResult, int, Counts], None]
    isolate: Callable[[Any], None] | None = None
    count_rows: Callable[[Any], int | None] | None = None
    task: SubmitGroup | None = None
    commit: Callable[[Any, TryResult], TryResult] | None = None
    say: Callable[[str, int], None] | None = None  # a line for the user


# (mini-batch or piece of one, try number) of one task
Group = list[tuple[Any, int]]


class Runner:
    """Runs every mini-batch to success or ``run_max_try`` failed tries.

    ``batches`` of :meth:`run` may hold :class:`Unfinished` ones of an
    earlier attempt, of which only the failed items run; a mini-batch that
    failed its last try is isolated where ``hooks.isolate`` is given: its
    outcome then counts only the items that fail alone. Each row of a CSV
    range is an item, isolated as a file or a Parquet row is. A frozen
    worker is caught by :class:`FrozenWorkers` (on the plugin's starts
    topic); ``plugin.redact`` hides credentials in the errors of lost
    tasks. With ``progress_timeout`` or ``first_result_timeout``, a job that
    finishes nothing for that long is canceled by :class:`NoProgress`.

    A task lost with its worker is judged by :func:`judge_lost_task`. On a
    cluster the user passed in whose scheduler retries tasks itself
    (``distributed.scheduler.allowed-failures`` > 0; daskrun's own clusters
    use 0), the runner sees a loss only once the scheduler gives up
    (``KilledWorker``, after allowed-failures + 1 deaths): a mini-batch that
    kills its worker then costs that many workers per try charged, and one
    whose rerun by the scheduler succeeds is not charged at all (the report
    shows one try). The scheduler counts a death against every task its
    worker held, waiting ones too. Tested in
    ``tests/test_lost_tasks.py::test_a_cluster_that_retries_tasks_itself``.
    """

    def __init__(
        self,
        client: Client,
        plugin: RunnerPlugin,
        tally: Tally,
        cfg: ResolvedConfig,
        key_prefix: str,
        hooks: Hooks,
        interrupt: Interrupt | None = None,
        progress_timeout: float | None = None,
        first_result_timeout: float | None = None,
    ):
        self.client, self.plugin, self.tally, self.cfg = client, plugin, tally, cfg
        self.key_prefix, self.hooks = key_prefix, hooks
        self.timeouts = (progress_timeout, first_result_timeout)
        threads = sum(client.nthreads().values()) or 1
        self.address = str(client.scheduler.address if client.scheduler else "?")
        self.limit = max(1, threads * int(config_get("runner.in-flight-per-thread")))
        self.sizer = GroupSizer(float(config_get("runner.task-seconds")), threads)
        self.pending: dict[Any, Group] = {}
        # the future giving a task's results -> the task
        self.waiting: dict[Any, Any] = {}
        self.retries: Group = []
        self.scheduled = 0
        self.submitted = itertools.count()
        self.plans: Iterator[Any] = iter(())
        self.lost: LostTasks = StageLostTasks(
            client, plugin.events_topic, cfg.run_invocation_timeout, plugin.redact
        )
        # preprocess() on CPU workers feeding run() (engine.stages), a
        # mini-batch a task, at most stages.limit in flight
        stages = TwoStage.of(client, plugin, collection=hooks.task is not None)
        if stages is not None:
            self.hooks = hooks = dataclasses.replace(hooks, task=stages.submit)
            self.limit, self.sizer.max_size = stages.limit, 1
        self.interrupt = interrupt or Interrupt()
        self.interrupt.client, self.interrupt.pending = client, self.pending
        isolate = hooks.isolate
        self.isolation = Isolation(isolate) if isolate is not None else None
        self.stall: NoProgress | None = None
        self.queue: Any = None  # as_completed, while running
        # copies of the slowest tasks at the tail (see engine.speculation);
        # not of a Dask collection's tasks, whose partitions are their inputs
        speculate = hooks.task is None and bool(config_get("runner.speculate"))
        self.speculation = (
            Speculation(cfg.run_invocation_timeout) if speculate else None
        )
        # auto: smaller after a timeout
        self.shrink = Shrink.of(cfg, self.isolation, hooks.say)

    def run(self, batches: Iterable[MiniBatch]) -> str | None:
        """Run ``batches``. Returns the name of the exceeded threshold, in
        which case nothing more was scheduled and in-flight tries were
        cancelled, or ``None`` when every mini-batch has an outcome."""
        self.plans = self.shrink.cutting(batches)
        # results are fetched concurrently in the background as tasks finish
        self.queue = queue = as_completed(
            with_results=True, raise_errors=False, loop=self.client.loop
        )
        frozen = FrozenWorkers(
            self.client,
            self.plugin.events_topic,
            self.plugin.starts_topic,
            self.cfg.run_invocation_timeout,
            self.pending,
            self.speculation.began if self.speculation is not None else None,
            run_key,
        )
        if self.timeouts != (None, None):
            self.stall = NoProgress(
                self.client, self.interrupt, self.pending, *self.timeouts
            )
        try:
            exceeded = self._until_done(queue)
            if exceeded:
                _cancel(self.client, self.pending)
                queue.clear()
            return exceeded
        except BaseException:
            # canceled, interrupted or a bug: stop what is still in flight
            _cancel(self.client, self.pending)
            queue.clear()
            raise
        finally:
            frozen.close()
            if self.stall is not None:
                self.stall.close()

    def _until_done(self, queue: Any) -> str | None:
        """Take results as tasks finish, scheduling more, until every
        mini-batch has an outcome or a threshold is exceeded."""
        self._fill()
        exceeded = check_thresholds(self.tally, self.cfg)
        for done in events(queue, self.speculation is not None):
            self.interrupt.check()
            if done is None or done[0] not in self.waiting:
                if done is not None:  # a speculative loser, cancelled
                    done[0].release()
                self._speculate()
                continue
            future, outcome = done
            if self.stall is not None:
                self.stall.beat()
            running = self.waiting[future]
            group, results = self._results(future, outcome)
            future.release()
            exceeded = self._settle_group(group, results, running)
            self._drop_losers(running)
            if exceeded:
                break
            self._fill()
            if self.tally.all_scheduled and not self.retries:
                exceeded = check_thresholds(self.tally, self.cfg)
                if exceeded:
                    break
            self._speculate()
        return exceeded

    def _speculate(self) -> None:
        """Start copies of the slowest running tasks on idle workers, once
        nothing is left to start (see :mod:`daskrun.engine.speculation`)."""
        spec = self.speculation
        if spec is None or not self.tally.all_scheduled or self.retries:
            return
        if not self.pending or len(self.pending) >= self.sizer.threads:
            return  # no thread is free
        if not connected(self.client):
            return
        chosen = spec.choose(self.pending, self.client.nthreads)
        for running, where in chosen:
            copy = self._submit(list(self.pending[running]), workers=[where])
            spec.pair(running, copy, where)

    def _drop_losers(self, running: Any) -> None:
        """Cancel the twin of finished task ``running`` once its
        mini-batches are decided; forget ``running``."""
        spec = self.speculation
        if spec is None:
            return
        losers = spec.losers(running, self.pending)
        for loser in losers:
            del self.pending[loser], self.waiting[loser]
            spec.forget(loser)
        _cancel(self.client, losers)
        spec.forget(running)

    def _submit(self, group: Group, workers: list[str] | None = None) -> Any:
        """Submit a task of ``group`` (only on ``workers``, if given); its
        future."""
        first, try_no = group[0]
        key = (self.key_prefix, first.index, try_no, next(self.submitted))
        if self.hooks.task is not None:
            running, future = self.hooks.task(self.client, self.plugin.name, group, key)
        else:
            where: dict[str, Any] = {}
            if workers is not None:
                # loose: a copy whose worker died meanwhile runs elsewhere
                where = {"workers": workers, "allow_other_workers": True}
            running = future = self.client.submit(
                process_mini_batches,
                self.plugin.name,
                group,
                key=key,
                pure=False,
                **where,
            )
        self.pending[running] = group
        self.waiting[future] = running
        self.queue.add(future)
        return running

    def _fill(self) -> None:
        """Submit tasks until ``limit`` are in flight or none is left:
        retries first, each alone (it may fail again), then groups of plans
        sized by :class:`GroupSizer`."""
        tally = self.tally
        while len(self.pending) < self.limit and (
            self.retries or not tally.all_scheduled
        ):
            if self.retries:
                self._submit(self.shrink.next_retry(self.retries))
                continue
            n = self.sizer.size(tally.mini_batches_total - self.scheduled)
            taken = list(itertools.islice(self.plans, n))
            self.scheduled += len(taken)
            group: Group = [(b, 1) for b in taken if not isinstance(b, Unfinished)]
            if group:
                self._submit(group)
            for b in taken:
                if isinstance(b, Unfinished) and self.isolation is not None:
                    self.retries.extend((p, 1) for p in self.isolation.resume(b))
            if len(taken) < n:
                tally.all_scheduled = True

    def _results(self, future: Any, outcome: Any) -> tuple[Group, list[TryResult]]:
        """The tries of a finished task and their results; those of a lost
        task that are not charged go back to the retries."""
        running = self.waiting.pop(future)
        group = self.pending[running]
        if isinstance(outcome, list):
            del self.pending[running]
            if self.speculation is not None:
                self.speculation.observe(outcome)
            seconds = sum(r.seconds for r in outcome)
            self.sizer.observe(seconds, len(outcome))
            self.tally.busy += seconds  # the forecast's pace (monitoring.forecast)
            return group, outcome
        # the worker died, or the task was lost or cancelled
        if not connected(self.client):  # distributed cancelled them all
            raise ClusterLostError(self.address)
        exc = outcome[1] if isinstance(outcome, tuple) else outcome
        batch_of = {b.index: b for b, _ in group}
        hung = {
            index: (self.lost.timeout_error(batch_of[index], msg), msg["worker"])
            for index, msg in self.lost.timed_out(batch_of).items()
        }
        verdict = judge_lost_task(group, hung, self.lost.cause(exc))
        free = verdict.free
        if self.speculation is not None:
            free = self.speculation.rerun(running, free, self.pending)
        del self.pending[running]
        self.retries.extend(free)
        return [(b, t) for b, t, _ in verdict.charged], [
            r for _, _, r in verdict.charged
        ]

    def _settle_group(
        self, group: Group, results: list[TryResult], running: Any = None
    ) -> str | None:
        """Count each try of ``group`` (task ``running``) whose outcome is
        final, and that counts (not a speculative twin's second); the
        exceeded threshold, if one is."""
        spec = self.speculation
        for (batch, try_no), result in zip(group, results, strict=True):
            if spec is not None:
                kept = spec.kept(running, batch, result, self.pending)
                if kept is None:
                    continue
                result = kept
            if self.hooks.commit is not None:
                result = self.hooks.commit(batch, result)
            final = self._outcome(batch, try_no, result)
            if final is None:
                continue
            batch, result, try_no = final
            counts = self.tally.record(batch, result)
            self.hooks.on_done(batch, result, try_no, counts)
            exceeded = check_thresholds(self.tally, self.cfg)
            if exceeded:
                return exceeded
        return None

    def _outcome(
        self, batch: Any, try_no: int, result: TryResult
    ) -> tuple[Any, TryResult, int] | None:
        """A try's final outcome ``(batch, result, tries)``, or ``None``
        where the mini-batch runs again: retried, or isolated."""
        isolation = self.isolation
        smaller = self.shrink.retry(batch, result, try_no)  # auto, after a timeout
        if smaller:
            self.retries.extend(smaller)
            return None
        if isinstance(batch, SubBatch):
            assert isolation is not None
            more, final = isolation.piece_done(batch, result)
            self.retries.extend((p, try_no) for p in more)
            return final
        if result.ok:
            return batch, result, try_no
        if try_no < self.cfg.run_max_try:
            logger.info(
                "mini-batch %d try %d failed (%s); retrying",
                batch.index,
                try_no,
                result.error,
            )
            self.retries.append((batch, try_no + 1))
            return None
        result = counted(batch, result, self.hooks.count_rows)
        pieces = isolation.start(batch, result, try_no) if isolation else None
        if pieces:
            logger.info(
                "mini-batch %d failed its last try (%s); isolating its failed items",
                batch.index,
                result.error,
            )
            self.retries.extend((p, try_no) for p in pieces)
            return None
        return batch, result, try_no
