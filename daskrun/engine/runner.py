"""Scheduling mini-batches: bounded in flight, retries, failure thresholds.

The client keeps at most ``in-flight-per-thread × worker threads`` mini-batches
submitted at once, pulling plans lazily, so its memory stays flat whatever the
number of inputs. Each try is its own task; a failed try is resubmitted until
``run_max_try``. Counting and threshold checks (:class:`Tally`,
:func:`check_thresholds`) are pure and tested without a cluster.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from distributed import Client, as_completed

from daskrun.backends.inputs.datasets import (
    CsvBatch,
    FileBatch,
    MiniBatch,
    SubBatch,
)
from daskrun.engine.config import ResolvedConfig, config_get
from daskrun.engine.plugin import (
    TryResult,
    agent_label,
    init_timeout,
    process_mini_batches,
)

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


@dataclass(frozen=True)
class Unfinished:
    """A mini-batch of an earlier attempt whose failed items were isolated,
    to retry: only its failed items ``spans`` run again (``daskrun resume
    --retry-failed``); ``ok`` and ``extra`` are the results its other items
    gave then, which are kept."""

    batch: FileBatch | CsvBatch | Any
    spans: tuple[tuple[int, int], ...]
    items_in: int
    ok: int
    extra: int

    @property
    def index(self) -> int:
        return int(self.batch.index)


@dataclass
class _Isolating:
    """One mini-batch being isolated: its pieces in flight and what its
    finished pieces gave."""

    batch: Any
    tries: int
    items_in: int
    in_flight: int = 0
    items_out: int = 0
    seconds: float = 0.0
    worker: str = ""
    stdout: str = ""
    log: str = ""
    logged: tuple[Any, ...] = ()
    failed: list[tuple[SubBatch, TryResult]] = field(default_factory=list)


class Isolation:
    """Finds the items that fail in a mini-batch that failed its last try.

    The mini-batch is split in halves, and each half is tried once; a half
    that fails is split again, down to single items. The pieces that
    succeed write their rows to parts of their own, at the mini-batch's
    place in the output; only the items of the pieces that fail down to one
    item count as failed. A mini-batch of ``n`` items with ``k`` failing
    ones costs at most ``2·k·log2(n)`` tries more.

    ``on_start(batch)`` is called before a mini-batch's pieces run (the job
    removes what an earlier isolation of it wrote). Partitions (one
    mini-batch per partition key) and mini-batches whose inputs could not be
    read (how many rows they hold is unknown) are not isolated.

    >>> iso = Isolation(lambda batch: None)
    >>> batch = FileBatch.of(0, ["a", "b", "c", "d"])
    >>> bad = TryResult(0, 3, False, "w", 4, 0, 0.1, error="ValueError: d")
    >>> [(p.start, p.stop) for p in iso.start(batch, bad, 3)]
    [(0, 2), (2, 4)]
    >>> iso.piece_done(SubBatch(batch, 0, 2), TryResult(0, 3, True, "w", 2, 2, 0.1))
    ([], None)
    >>> more, _ = iso.piece_done(SubBatch(batch, 2, 4), bad)
    >>> [(p.start, p.stop) for p in more]
    [(2, 3), (3, 4)]
    >>> _ = iso.piece_done(SubBatch(batch, 2, 3), TryResult(0, 3, True, "w", 1, 1, 0.1))
    >>> _, (done, result, tries) = iso.piece_done(SubBatch(batch, 3, 4), bad)
    >>> result.ok, result.items_out, result.error
    (False, 3, '1 of 4 items failed, in isolation; first: ValueError: d')
    >>> [(p.start, p.stop) for p, _ in result.failed_pieces]
    [(3, 4)]
    """

    def __init__(self, on_start: Callable[[Any], None]):
        self.on_start = on_start
        self.open: dict[int, _Isolating] = {}

    def start(self, batch: Any, result: TryResult, tries: int) -> list[SubBatch] | None:
        """The first pieces of ``batch``, whose last try ``result`` failed;
        ``None`` when it is not isolated."""
        n = result.items_in if result.items_in is not None else batch.n_items
        if not batch.isolable or not n:
            return None
        if n < 2:
            return None
        self.on_start(batch)
        self.open[batch.index] = _Isolating(batch, tries, n, worker=result.worker)
        return self._split(SubBatch(batch, 0, n))

    def resume(self, unfinished: Unfinished) -> list[SubBatch]:
        """The pieces of an earlier attempt's isolated mini-batch to retry."""
        state = _Isolating(unfinished.batch, 1, unfinished.items_in)
        state.items_out = unfinished.ok + unfinished.extra
        self.open[unfinished.index] = state
        pieces = [SubBatch(unfinished.batch, a, b) for a, b in unfinished.spans]
        state.in_flight = len(pieces)
        return pieces

    def piece_done(
        self, piece: SubBatch, result: TryResult
    ) -> tuple[list[SubBatch], tuple[Any, TryResult, int] | None]:
        """Count a piece's try: the pieces to run next, and, once the
        mini-batch has no piece left, its outcome ``(batch, result, tries)``."""
        state = self.open[piece.index]
        state.in_flight -= 1
        state.seconds += result.seconds
        state.stdout += result.stdout
        state.log += result.log
        state.logged += result.logged
        more: list[SubBatch] = []
        if result.ok:
            state.items_out += result.items_out
        elif piece.n_items > 1:
            more = self._split(piece)
        else:
            state.failed.append((piece, result))
        if state.in_flight:
            return more, None
        del self.open[piece.index]
        return [], (state.batch, self._outcome(state), state.tries)

    def _split(self, piece: SubBatch) -> list[SubBatch]:
        self.open[piece.index].in_flight += 2
        return list(piece.halves())

    @staticmethod
    def _outcome(state: _Isolating) -> TryResult:
        failed = sorted(state.failed, key=lambda f: f[0].start)
        n_failed = sum(piece.n_items for piece, _ in failed)
        first = failed[0][1] if failed else None
        return TryResult(
            index=state.batch.index,
            try_no=state.tries,
            ok=not failed,
            worker=first.worker if first else state.worker,
            items_in=state.items_in,
            items_out=state.items_out,
            seconds=state.seconds,
            error=(
                f"{n_failed} of {state.items_in} items failed, in isolation; "
                f"first: {first.error}"
                if first
                else None
            ),
            traceback=first.traceback if first else None,
            stdout=state.stdout,
            log=state.log,
            logged=state.logged,
            failed_pieces=tuple(failed),
        )


def _counted(
    batch: Any, result: TryResult, count_rows: Callable[[Any], int | None] | None
) -> TryResult:
    """``result``, the last try of ``batch``, with the items it held where
    the try failed before reading them counted them (a CSV range whose
    worker died)."""
    if result.items_in is not None or batch.n_items is not None or not count_rows:
        return result
    return replace(result, items_in=count_rows(batch))


def _lost_try(
    batch: MiniBatch, try_no: int, error: str, worker: str = "unknown worker"
) -> TryResult:
    return TryResult(
        index=batch.index,
        try_no=try_no,
        ok=False,
        worker=worker,
        items_in=None,
        items_out=0,
        seconds=0.0,
        error=error,
    )


@dataclass(frozen=True)
class LostVerdict:
    """What becomes of the tries of a lost task (see :func:`judge_lost_task`).

    ``charged`` are failed tries, each with its result, counted like any other
    failure (retried while tries are left); ``free`` are rerun, each alone, at
    the same try number; ``split`` says the whole group went to ``free``
    because nothing tells which of its mini-batches killed the worker.
    """

    charged: list[tuple[MiniBatch, int, TryResult]]
    free: list[tuple[MiniBatch, int]]
    split: bool


def judge_lost_task(
    group: Sequence[tuple[MiniBatch, int]],
    hung: Mapping[int, tuple[str, str]],
    cause: tuple[str, str],
) -> LostVerdict:
    """Decide which tries of a lost task are charged.

    A task (a ``group`` of ``(mini-batch, try)``) is lost when its worker
    died or was restarted under it. ``hung`` maps the index of each of its
    mini-batches reported hung (by the worker's watchdog, or by the client's
    deadline for a frozen worker) to the error and worker to report;
    ``cause`` is the error and worker of the loss otherwise (a memory kill, a
    hung ``init()``, or an unknown death).

    - Mini-batches reported hung are charged a try with their timeout error;
      the others of the group were innocent and are rerun without charge.
    - With none reported hung, a group of several mini-batches is split: each
      is rerun alone and uncharged, so only the one that kills its worker
      again is charged, by the rule below.
    - A lone mini-batch is charged a try with ``cause``.

    >>> from daskrun.backends.inputs.datasets import FileBatch
    >>> a, b = FileBatch.of(0, ["a.png"]), FileBatch.of(1, ["b.png"])
    >>> died = ("WorkerDied: worker-0 died while running it", "worker-0")
    >>> v = judge_lost_task([(a, 1), (b, 1)], {}, died)
    >>> v.split, v.charged, [(m.index, t) for m, t in v.free]
    (True, [], [(0, 1), (1, 1)])
    >>> v = judge_lost_task([(a, 2)], {}, died)
    >>> [(m.index, t, r.error) for m, t, r in v.charged], v.free
    ([(0, 2, 'WorkerDied: worker-0 died while running it')], [])
    >>> hung = {1: ("TimeoutError: run() did not return", "worker-1")}
    >>> v = judge_lost_task([(a, 1), (b, 3)], hung, died)
    >>> [(m.index, t, r.worker) for m, t, r in v.charged]
    [(1, 3, 'worker-1')]
    >>> [(m.index, t) for m, t in v.free], v.split
    ([(0, 1)], False)
    """
    if hung:
        charged = [
            (b, t, _lost_try(b, t, *hung[b.index])) for b, t in group if b.index in hung
        ]
        free = [(b, t) for b, t in group if b.index not in hung]
        return LostVerdict(charged, free, split=False)
    if len(group) > 1:
        return LostVerdict([], list(group), split=True)
    return LostVerdict([(b, t, _lost_try(b, t, *cause)) for b, t in group], [], False)


class LostTasks:
    """Why a task's worker died: a mini-batch stopped for its timeout (the
    watchdog's event, or the client's for a frozen worker), a memory kill
    (the Nanny's event), or unknown. Error texts are redacted with
    ``redact``."""

    def __init__(
        self,
        client: Client,
        topic: str,
        timeout: float,
        redact: Callable[[str], str] = str,
    ):
        self.client = client
        self.topic = topic
        self.timeout = timeout
        self.redact = redact
        # a topic may outlive a job (map_partitions' plugin serves each of
        # its runs): what earlier jobs reported is not this one's
        self.seen: set[tuple[float, int]] = {
            (stamp, msg.get("index")) for stamp, msg in client.get_events(topic)
        }

    def timed_out(self, batches: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
        """Mini-batches of ``batches`` (by index) newly reported hung, with the
        event; a piece of a mini-batch being isolated matches only the events
        that name its first item."""
        found = {}
        for stamp, msg in self.client.get_events(self.topic):
            if (
                msg.get("cause") == "timeout"
                and msg["index"] in batches
                and msg.get("piece") == _first_item(batches[msg["index"]])
            ):
                if (stamp, msg["index"]) not in self.seen:
                    self.seen.add((stamp, msg["index"]))
                    found[msg["index"]] = msg
        return found

    def timeout_error(self, batch: MiniBatch, msg: dict[str, Any]) -> str:
        """The error of a try stopped for its timeout, naming what hung."""
        bound = f"run_invocation_timeout={self.timeout:g} s"
        worker, phase = msg["worker"], msg.get("phase", "run")
        if phase == "frozen":
            return (
                f"TimeoutError: {worker} stopped answering for "
                f"{msg['silent']:.0f} s while running it (beyond {bound} + "
                f"{msg['grace']:g} s grace); it was restarted"
            )
        what = {
            "read": f"reading its inputs ({batch.describe()}) did not finish",
            "write": "writing its output part did not finish",
        }.get(phase, "run() did not return")
        return f"TimeoutError: {what} within {bound}; {worker} was restarted"

    def init_timed_out(self) -> str | None:
        """The worker whose ``init()`` outlived its bound, if one did."""
        for _, msg in self.client.get_events(self.topic):
            if msg.get("cause") == "init-timeout":
                return str(msg["worker"])
        return None

    def init_timeout_error(self, worker: str) -> str:
        return (
            f"TimeoutError: init() did not return within "
            f"{init_timeout(self.timeout):.0f} s (3 × run_invocation_timeout "
            f"+ 30 s) on {worker}; the worker was restarted"
        )

    def cause(self, exc: BaseException) -> tuple[str, str]:
        """An error text and the worker for a task lost without a timeout."""
        last = getattr(exc, "last_worker", None)
        address = getattr(last, "address", None)
        name = getattr(last, "name", None)
        worker = f"worker-{name}" if isinstance(name, int) else str(name or "a worker")
        if address is not None:
            for _, msg in self.client.get_events("worker-restart-memory"):
                if msg.get("worker") == address:
                    rss = msg["rss"] / 2**20
                    return (
                        f"MemoryError: {worker} was killed for exceeding its "
                        f"memory limit (rss {rss:.0f} MiB) while running it",
                        worker,
                    )
        hung = self.init_timed_out()
        if hung is not None:
            return self.init_timeout_error(hung), hung
        # a lost task's exception may quote storage errors of the worker
        error = f"WorkerDied: {worker} died while running it ({exc})"
        return self.redact(error), worker


def _first_item(batch: Any) -> int | None:
    """The first item of a piece of a mini-batch being isolated; ``None``
    for a whole mini-batch."""
    return batch.start if isinstance(batch, SubBatch) else None


def _silent_workers(dask_scheduler: Any, limit: float) -> dict[str, list[Any]]:
    """On the scheduler: the workers not heard from for ``limit`` seconds,
    with the keys they are processing."""
    now_ = time.time()
    return {
        address: [ts.key for ts in ws.processing]
        for address, ws in dask_scheduler.workers.items()
        if now_ - ws.last_seen > limit
    }


class FrozenWorkers:
    """The client's deadline for a worker that cannot stop itself.

    A worker process stopped (SIGSTOP) or stuck in a system call holding the
    interpreter runs neither its watchdog nor its heartbeats. Once the
    scheduler has not heard from a worker processing one of this job's tasks
    for ``run_invocation_timeout`` + ``grace`` seconds, the task it started
    (each task reports its start on ``starts_topic``) is charged a timed-out
    try, and the worker is restarted through its Nanny, which kills the
    process even while it is stopped: a late result or part from it can then
    never arrive. A task holding several mini-batches charges none of them;
    each is rerun alone, as for any worker lost.
    """

    def __init__(
        self,
        client: Client,
        events_topic: str,
        starts_topic: str,
        timeout: float,
        pending: dict[Any, list[tuple[MiniBatch, int]]],
    ):
        self.client = client
        self.events_topic = events_topic
        self.starts_topic = starts_topic
        self.grace = float(config_get("runner.frozen-grace"))
        self.limit = timeout + self.grace
        self.pending = pending
        self.started: dict[str, tuple[Any, str]] = {}  # address -> key, agent
        self._stop = threading.Event()
        client.subscribe_topic(starts_topic, self._on_start)
        self._thread = threading.Thread(
            target=self._watch, name="daskrun-deadline", daemon=True
        )
        self._thread.start()

    def _on_start(self, event: tuple[float, dict[str, Any]]) -> None:
        msg = event[1]
        self.started[msg["address"]] = (msg["key"], msg["worker"])

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.check()
            except Exception as e:  # the cluster may be going away
                logger.debug("frozen-worker check failed: %s", e)

    def check(self) -> None:
        silent = self.client.run_on_scheduler(_silent_workers, limit=self.limit)
        if not silent:
            return
        groups = {f.key: g for f, g in list(self.pending.items())}
        for address, keys in silent.items():
            ours = [k for k in keys if k in groups]
            if not ours:
                continue
            key, agent = self.started.pop(address, (None, address))
            group = groups.get(key)
            if group is not None and len(group) == 1:
                self.client.log_event(
                    self.events_topic,
                    {
                        "index": group[0][0].index,
                        "piece": _first_item(group[0][0]),
                        "worker": agent,
                        "cause": "timeout",
                        "phase": "frozen",
                        "silent": self.limit,
                        "grace": self.grace,
                    },
                )
            logger.warning(
                "worker %s silent for %.0f s; restarting it", agent, self.limit
            )
            # the Nanny SIGKILLs a process that does not close; a worker that
            # cannot be restarted is removed from the scheduler
            self.client.restart_workers([address], timeout=10, raise_for_error=False)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self.client.unsubscribe_topic(self.starts_topic)


def _held_tasks(dask_scheduler: Any) -> dict[str, tuple[Any, list[str]]]:
    """On the scheduler: each worker's name and the keys (as text) of the
    tasks it is processing."""
    return {
        address: (ws.name, [str(ts.key) for ts in ws.processing])
        for address, ws in dask_scheduler.workers.items()
    }


def stall_message(
    seconds: float,
    setting: str,
    alive: int,
    held: Mapping[str, Sequence[MiniBatch]],
) -> str:
    """Why a job that stopped making progress was canceled: its timeout,
    and the workers with the mini-batches they hold.

    >>> from daskrun.backends.inputs.datasets import FileBatch
    >>> line = stall_message(600, "progress-timeout", 2,
    ...                      {"worker-1": [FileBatch.of(3, ["a.png"])]})
    >>> print(line)  # doctest: +NORMALIZE_WHITESPACE
    no mini-batch finished for 600 s (daskrun.progress-timeout=600) while 2
    workers are alive: worker-1 holds mini-batch 3 (files a.png); those
    workers were restarted
    """
    bound = f"daskrun.{setting}={seconds:g}"
    when = (
        f"within {seconds:g} s of init() ({bound})"
        if setting == "first-result-timeout"
        else f"for {seconds:g} s ({bound})"
    )
    line = (
        f"no mini-batch finished {when} while {alive} "
        f"worker{'' if alive == 1 else 's'} {'is' if alive == 1 else 'are'} alive: "
    )
    if not held:
        return line + "none holds a mini-batch of this job (all wait to be run)"
    named = []
    for worker, batches in sorted(held.items()):
        if len(batches) == 1:
            named.append(
                f"{worker} holds mini-batch {batches[0].index} "
                f"({batches[0].describe()})"
            )
        else:
            indices = ", ".join(str(b.index) for b in batches)
            named.append(f"{worker} holds mini-batches {indices}")
    return line + "; ".join(named) + "; those workers were restarted"


class NoProgress:
    """Cancels a job whose workers are alive but finish nothing.

    Azure ML's ``progress_update_timeout``: once no task of the job has
    returned for ``progress_timeout`` seconds (``first_result_timeout``
    until the first one, counted from the start of the mini-batches, after
    ``init()``) while mini-batches are in flight and the cluster has
    workers, the job is stopped through ``interrupt`` as ``Canceled``, so it
    can be resumed, with a line naming the workers and the mini-batches they
    hold (:func:`stall_message`). A deadlock in ``run()``, or a stalled mount,
    otherwise waits for ``run_invocation_timeout`` at best. Those workers are
    then restarted through their Nannies, as for :class:`FrozenWorkers`: a
    worker thread stuck in ``run()`` would keep the worker from anything
    else, a resume of this job included. A cluster without workers is left to
    ``cluster.connect``'s watch of lost workers.
    """

    def __init__(
        self,
        client: Client,
        interrupt: Interrupt,
        pending: dict[Any, list[tuple[MiniBatch, int]]],
        progress_timeout: float | None,
        first_result_timeout: float | None,
    ):
        self.client, self.interrupt, self.pending = client, interrupt, pending
        self.progress_timeout = progress_timeout
        self.first_result_timeout = first_result_timeout
        self.last = time.monotonic()
        self.results = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="daskrun-no-progress", daemon=True
        )
        self._thread.start()

    def beat(self) -> None:
        """A task of the job returned."""
        self.last = time.monotonic()
        self.results += 1

    def bound(self) -> tuple[float, str] | None:
        """The timeout that applies now, and its setting's name."""
        if self.results == 0 and self.first_result_timeout is not None:
            return self.first_result_timeout, "first-result-timeout"
        if self.progress_timeout is not None:
            return self.progress_timeout, "progress-timeout"
        return None

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            try:
                if self.check():
                    return
            except Exception as e:  # the cluster may be going away
                logger.debug("progress check failed: %s", e)

    def check(self) -> bool:
        """Cancel the job if it is stalled; whether it was."""
        bound = self.bound()
        now_ = time.monotonic()
        if not self.pending:  # nothing outstanding: nothing to wait for
            self.last = now_
            return False
        if bound is None or self.interrupt.reason is not None:
            return False
        seconds, setting = bound
        if now_ - self.last < seconds:
            return False
        workers = self.client.run_on_scheduler(_held_tasks)
        if not workers:
            return False
        groups = {str(f.key): g for f, g in list(self.pending.items())}
        held: dict[str, list[MiniBatch]] = {}
        holders = []
        for address, (name, keys) in workers.items():
            ours = [b for k in keys for b, _ in groups.get(k, ())]
            if ours:
                held[agent_label(name)] = sorted(ours, key=lambda b: b.index)
                holders.append(address)
        self.interrupt.trigger(
            stall_message(seconds, setting, len(workers), held), canceled=True
        )
        if holders:
            self.client.restart_workers(holders, timeout=10, raise_for_error=False)
        return True

    def close(self) -> None:
        self._stop.set()


def connected(client: Client) -> bool:
    """Whether ``client`` is still connected to its scheduler: a scheduler
    that died, or froze (see
    ``daskrun.backends.compute.cluster._SchedulerWatch``), leaves
    it reconnecting or closed, and any call to it would wait."""
    return client.status == "running"


def _cancel(client: Client, futures: Iterable[Any]) -> None:
    """Cancel ``futures`` on a scheduler that is still there."""
    if connected(client):
        with contextlib.suppress(Exception):  # the cluster may be going
            client.cancel(list(futures))


class Interrupt:
    """Stops :func:`run_mini_batches` from another thread: a canceled run,
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


def run_mini_batches(
    client: Client,
    events_topic: str,
    plugin_name: str,
    batches: Iterable[MiniBatch],
    tally: Tally,
    cfg: ResolvedConfig,
    key_prefix: str,
    on_done: Callable[[MiniBatch, TryResult, int, Counts], None],
    interrupt: Interrupt | None = None,
    starts_topic: str | None = None,
    redact: Callable[[str], str] = str,
    isolate: Callable[[Any], None] | None = None,
    count_rows: Callable[[Any], int | None] | None = None,
    task: Callable[[Client, str, list[tuple[Any, int]], Any], tuple[Any, Any]]
    | None = None,
    progress_timeout: float | None = None,
    first_result_timeout: float | None = None,
    commit: Callable[[Any, TryResult], TryResult] | None = None,
) -> str | None:
    """Run every mini-batch to success or ``run_max_try`` failed tries.

    With ``isolate`` (``daskrun.isolate-failures``), a mini-batch that
    failed its last try is split by :class:`Isolation`, which calls
    ``isolate(batch)`` first; its outcome then counts only the items that
    fail alone. ``batches`` may hold :class:`Unfinished` ones of an earlier
    attempt, of which only the failed items run. ``count_rows(batch)``
    counts the rows of a mini-batch whose last try failed before they were
    counted (a CSV range whose worker died), ``None`` where they cannot be
    read: each row is an item, isolated as a file or a Parquet row is.

    ``on_done(batch, last_try, tries, counts)`` is called once per mini-batch when
    its outcome is final. Returns the name of the exceeded threshold, in which
    case nothing more was scheduled and in-flight tries were cancelled, or
    ``None`` when every mini-batch has an outcome. With ``starts_topic`` (the
    plugin's), a frozen worker is caught by :class:`FrozenWorkers`;
    ``redact`` hides credentials in the errors of lost tasks. ``task(client,
    plugin_name, group, key)``, if given, submits a group instead of
    :func:`~daskrun.engine.plugin.process_mini_batches` (a Dask collection's
    partitions are the task's dependencies) and returns two futures: the
    task's, of key ``key`` (watched for lost and frozen workers), and the
    one giving its list of :class:`TryResult` (the same future, or a small
    one after it, where the task's value stays on the cluster). With
    ``progress_timeout`` or ``first_result_timeout``, a job that finishes
    nothing for that long is canceled by :class:`NoProgress`.
    ``commit(batch, result)``, if given, takes each try's result as it
    arrives, first (the client writes the rows a worker returned:
    :func:`daskrun.engine.viaclient.commit`).

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
    threads = sum(client.nthreads().values()) or 1
    address = str(client.scheduler.address if client.scheduler else "?")
    limit = max(1, threads * int(config_get("runner.in-flight-per-thread")))
    sizer = GroupSizer(float(config_get("runner.task-seconds")), threads)
    pending: dict[Any, list[tuple[Any, int]]] = {}
    waiting: dict[Any, Any] = {}  # the future giving a task's results: the task
    retries: list[tuple[MiniBatch | SubBatch, int]] = []
    # results are fetched concurrently in the background as tasks finish
    queue = as_completed(with_results=True, raise_errors=False, loop=client.loop)
    plans = iter(batches)
    scheduled = 0
    submitted = itertools.count()
    lost = LostTasks(client, events_topic, cfg.run_invocation_timeout, redact)
    interrupt = interrupt or Interrupt()
    interrupt.client, interrupt.pending = client, pending
    frozen = (
        None
        if starts_topic is None
        else FrozenWorkers(
            client, events_topic, starts_topic, cfg.run_invocation_timeout, pending
        )
    )
    stall = (
        None
        if progress_timeout is None and first_result_timeout is None
        else NoProgress(
            client,
            interrupt,
            pending,
            progress_timeout,
            first_result_timeout,
        )
    )

    isolation = Isolation(isolate) if isolate is not None else None

    def submit(group: list[tuple[MiniBatch | SubBatch, int]]) -> None:
        first, try_no = group[0]
        key = (key_prefix, first.index, try_no, next(submitted))
        if task is not None:
            running, future = task(client, plugin_name, group, key)
        else:
            running = future = client.submit(
                process_mini_batches, plugin_name, group, key=key, pure=False
            )
        pending[running] = group
        waiting[future] = running
        queue.add(future)

    def fill() -> None:
        nonlocal scheduled
        while len(pending) < limit and (retries or not tally.all_scheduled):
            if retries:
                submit([retries.pop()])  # a retry runs alone: it may fail again
                continue
            n = sizer.size(tally.mini_batches_total - scheduled)
            taken = list(itertools.islice(plans, n))
            scheduled += len(taken)
            group: list[tuple[MiniBatch | SubBatch, int]] = [
                (b, 1) for b in taken if not isinstance(b, Unfinished)
            ]
            if group:
                submit(group)
            for b in taken:
                if isinstance(b, Unfinished) and isolation is not None:
                    retries.extend((p, 1) for p in isolation.resume(b))
            if len(taken) < n:
                tally.all_scheduled = True

    try:
        fill()
        exceeded = check_thresholds(tally, cfg)
        for future, outcome in queue:
            interrupt.check()
            if stall is not None:
                stall.beat()
            group = pending.pop(waiting.pop(future))
            if isinstance(outcome, list):
                results: list[TryResult] = outcome
                seconds = sum(r.seconds for r in results)
                sizer.observe(seconds, len(results))
                tally.busy += (
                    seconds  # the forecast's pace (daskrun.monitoring.forecast)
                )
            else:  # the worker died, or the task was lost or cancelled
                if not connected(client):  # distributed cancelled them all
                    raise ClusterLostError(address)
                exc = outcome[1] if isinstance(outcome, tuple) else outcome
                batch_of = {b.index: b for b, _ in group}
                hung = {
                    index: (lost.timeout_error(batch_of[index], msg), msg["worker"])
                    for index, msg in lost.timed_out(batch_of).items()
                }
                verdict = judge_lost_task(group, hung, lost.cause(exc))
                retries.extend(verdict.free)
                group = [(b, t) for b, t, _ in verdict.charged]
                results = [r for _, _, r in verdict.charged]
            future.release()
            for (batch, try_no), result in zip(group, results, strict=True):
                if commit is not None:
                    result = commit(batch, result)
                if isinstance(batch, SubBatch):
                    assert isolation is not None
                    more, outcome_ = isolation.piece_done(batch, result)
                    retries.extend((p, try_no) for p in more)
                    if outcome_ is None:
                        continue
                    batch, result, try_no = outcome_
                elif not result.ok and try_no < cfg.run_max_try:
                    logger.info(
                        "mini-batch %d try %d failed (%s); retrying",
                        batch.index,
                        try_no,
                        result.error,
                    )
                    retries.append((batch, try_no + 1))
                    continue
                elif not result.ok:
                    result = _counted(batch, result, count_rows)
                    pieces = (
                        isolation.start(batch, result, try_no)
                        if isolation is not None
                        else None
                    )
                    if pieces:
                        logger.info(
                            "mini-batch %d failed its last try (%s); isolating "
                            "its failed items",
                            batch.index,
                            result.error,
                        )
                        retries.extend((p, try_no) for p in pieces)
                        continue
                on_done(batch, result, try_no, tally.record(batch, result))
                exceeded = check_thresholds(tally, cfg)
                if exceeded:
                    break
            if exceeded:
                break
            fill()
            if tally.all_scheduled and not retries:
                exceeded = check_thresholds(tally, cfg)
                if exceeded:
                    break
        if exceeded:
            _cancel(client, pending)
            queue.clear()
        return exceeded
    except BaseException:
        # canceled, interrupted or a bug: stop what is still in flight
        _cancel(client, pending)
        queue.clear()
        raise
    finally:
        if frozen is not None:
            frozen.close()
        if stall is not None:
            stall.close()
