"""Speculative copies: no stragglers at a job's tail.

Once nothing is left to start (the plan is exhausted, no retry waits) and a
worker has a free thread, the tasks running much longer than the job's mean
(:data:`FACTOR` times the mean seconds of a mini-batch, per mini-batch of
the task, and at least :data:`MIN_SECONDS`) are started again, slowest
first, each at most once, on another worker (``daskrun.runner.speculate``
turns it off). The copy is a task of its own (a distinct key) over the same
mini-batches at the same try number: it is no retry and costs no try.

For each mini-batch of the two tasks, the first *success* counts, once: the
tally, the ledger, the logs and the thresholds take it, and the other's
result is dropped. A failure waits while the twin still runs (the twin may
succeed); the second failure is counted, once, and is then retried or
isolated as any other. Once every mini-batch of a task is decided, its twin
is cancelled (a running task cannot be stopped: its result is dropped).

The output stays exactly once because a mini-batch's rows are written in
one atomic step, as its own part or within a group, and assembly takes each
mini-batch once (:mod:`daskrun.engine.output`): the loser rewrites the same
part with the same rows, or writes a group that assembly does not take
twice.

Only a plain first try is copied, once: never a piece of a mini-batch being
isolated or cut smaller (:mod:`daskrun.engine.shrink`), a retry, a
mini-batch rerun after its task was lost, one whose worker is gone, nor one
that has run past :data:`WITHIN` of ``run_invocation_timeout``: a call that
long is more likely hung than slow, and a hung call is the watchdog's (a
copy would hang a second worker). Nor are tasks of a Dask collection (their
partitions are the task's dependencies). Where both twins fail, the error
counted names the other's (:meth:`Speculation.kept`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from daskrun.backends.inputs.datasets import SubBatch
from daskrun.engine.plugin import TryResult

logger = logging.getLogger("daskrun")

FACTOR = 2.0
"""A task is slow once it ran this many times the mean per mini-batch."""
MIN_SECONDS = 1.0
"""... and at least this long: a copy of a short task gains nothing."""
WITHIN = 0.5
"""... and at most this fraction of ``run_invocation_timeout``: one that ran
longer is left to the watchdog."""

# (mini-batch or piece of one, try number) of one task, as in the runner
Group = list[tuple[Any, int]]


class Speculation:
    """Which running tasks get a copy, and which of two twins' results count.

    :attr:`began` maps a task's key to the address of the worker running it and
    when it started (:class:`~daskrun.engine.lost.FrozenWorkers` fills it
    from the tasks' start events). The runner asks :meth:`choose` what to
    copy, :meth:`pair` records a copy, :meth:`keeps` says whether a try's
    result counts, :meth:`rerun` filters the free reruns of a lost task and
    :meth:`losers` names the twins to cancel.

    >>> from daskrun.backends.inputs.datasets import FileBatch
    >>> s = Speculation()
    >>> a = FileBatch.of(0, ["a.png"])
    >>> s.pair("original", "copy")
    >>> pending = {"original": [(a, 1)], "copy": [(a, 1)]}
    >>> ok = TryResult(0, 1, True, "worker-1", 1, 1, 0.1)
    >>> failed = TryResult(0, 1, False, "worker-0", 1, 0, 0.1, error="E")
    >>> s.keeps("copy", a, failed, pending)   # the original may succeed
    False
    >>> del pending["copy"]
    >>> s.keeps("original", a, ok, pending)
    True
    >>> s = Speculation()
    >>> s.pair("original", "copy")
    >>> pending = {"original": [(a, 1)], "copy": [(a, 1)]}
    >>> s.keeps("copy", a, ok, pending), s.won
    (True, [0])
    >>> del pending["copy"]
    >>> s.losers("copy", pending)
    ['original']
    >>> s.keeps("original", a, ok, pending)   # a late success is dropped
    False
    """

    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = timeout  # run_invocation_timeout
        self.began: dict[Any, tuple[str, float]] = {}
        self.twin: dict[Any, Any] = {}  # a task's future -> its twin's, both ways
        self.copies: set[Any] = set()
        self.placed: dict[Any, str] = {}  # a copy -> the worker it must run on
        # the mini-batches whose result from that task no longer counts
        self.dropped: dict[Any, set[int]] = {}
        # workers holding a cancelled loser: its thread stays busy until run()
        # returns, so no copy goes there
        self.slow: set[str] = set()
        self.won: list[int] = []  # the mini-batches a copy won
        self.copied: set[int] = set()  # mini-batches copied once: never again
        self.rerun_free: set[int] = set()  # mini-batches whose task was lost
        # a failure of a twin, held while the other ran: (by a copy, result)
        self.held: dict[int, tuple[bool, TryResult]] = {}
        self._seconds = 0.0
        self._count = 0

    def observe(self, results: Iterable[TryResult]) -> None:
        """Add the seconds of successful tries to the job's mean."""
        for r in results:
            if r.ok:
                self._seconds += r.seconds
                self._count += 1

    def choose(
        self, pending: Mapping[Any, Group], threads: Callable[[], Mapping[str, int]]
    ) -> list[tuple[Any, str]]:
        """The running tasks to copy, slowest first, each with the worker
        to run the copy (one with a free thread, not the original's), given
        ``threads()``, each worker's threads. Nothing while a task waits to start: a
        free worker will take it."""
        if not self._count:
            return []
        mean = self._seconds / self._count
        now = time.monotonic()
        slow = []
        for running, group in pending.items():
            began = self.began.get(_key(running))
            if began is None and running not in self.placed:
                return []
            if running in self.twin or began is None or not self._plain(group):
                continue
            elapsed = now - began[1]
            if elapsed > max(MIN_SECONDS, FACTOR * mean * len(group)) and (
                self.timeout is None or elapsed <= WITHIN * self.timeout
            ):
                slow.append((elapsed, running, began[0]))
        if not slow:
            return []
        alive = threads()
        free = self._free(pending, alive)
        chosen = []
        for elapsed, running, address in sorted(slow, key=lambda s: -s[0]):
            others = [a for a, n in free.items() if n > 0 and a != address]
            if not others or address not in alive:  # its worker is gone
                continue
            where = max(others, key=lambda a: free[a])
            free[where] -= 1
            chosen.append((running, where))
            self.copied.update(batch.index for batch, _ in pending[running])
            logger.info(
                "mini-batch %d (%d in its task) has run %.1f s on %s (mean %.2f s "
                "per mini-batch); starting a speculative copy on %s",
                pending[running][0][0].index,
                len(pending[running]),
                elapsed,
                address,
                mean,
                where,
            )
        return chosen

    def _plain(self, group: Group) -> bool:
        """Whether ``group`` holds only plain first tries, none copied
        before: no piece of a mini-batch, no retry, no rerun of a lost task."""
        return all(
            try_no == 1
            and not isinstance(batch, SubBatch)
            and batch.index not in self.copied
            and batch.index not in self.rerun_free
            for batch, try_no in group
        )

    def _free(
        self, pending: Mapping[Any, Group], threads: Mapping[str, int]
    ) -> dict[str, int]:
        """Each worker's threads not running a task of the job."""
        free = {a: n for a, n in threads.items() if a not in self.slow}
        for running in pending:
            began = self.began.get(_key(running))
            address = began[0] if began is not None else self.placed.get(running)
            if address in free:
                free[address] -= 1
        return free

    def pair(self, running: Any, copy: Any, where: str | None = None) -> None:
        """``copy`` runs ``running``'s mini-batches (on worker ``where``)."""
        self.twin[running], self.twin[copy] = copy, running
        self.copies.add(copy)
        if where is not None:
            self.placed[copy] = where

    def keeps(
        self, running: Any, batch: Any, result: TryResult, pending: Mapping[Any, Any]
    ) -> bool:
        """Whether ``result``, a try of ``batch`` by task ``running``, counts:
        not once its twin's success counted, nor a failure while its twin
        still runs."""
        if not self.twin:
            return True
        if batch.index in self.dropped.get(running, ()):
            return False
        twin = self.twin.get(running)
        if twin is None or twin not in pending:
            return True
        if not result.ok:
            self.held[batch.index] = (running in self.copies, result)
            return False  # the twin decides
        self.dropped.setdefault(twin, set()).add(batch.index)
        if running in self.copies:
            self.won.append(batch.index)
            logger.info(
                "mini-batch %d: the speculative copy on %s finished first",
                batch.index,
                result.worker,
            )
        return True

    def kept(
        self, running: Any, batch: Any, result: TryResult, pending: Mapping[Any, Any]
    ) -> TryResult | None:
        """``result`` where it counts (:meth:`keeps`), else ``None``; a
        failure counted after its twin's names the twin's.

        >>> from daskrun.backends.inputs.datasets import FileBatch
        >>> s, a = Speculation(), FileBatch.of(0, ["a.png"])
        >>> s.pair("original", "copy")
        >>> pending = {"original": [(a, 1)], "copy": [(a, 1)]}
        >>> hung = TryResult(0, 1, False, "worker-1", None, 0, 0.0, error="E1")
        >>> s.kept("copy", a, hung, pending) is None
        True
        >>> del pending["copy"]
        >>> failed = TryResult(0, 1, False, "worker-0", None, 0, 0.0, error="E0")
        >>> s.kept("original", a, failed, pending).error
        'E0 (its speculative copy, on worker-1, failed too: E1)'
        """
        if not self.keeps(running, batch, result, pending):
            return None
        held = self.held.pop(batch.index, None)
        if held is None or result.ok:
            return result
        by_copy, first = held
        other = "its speculative copy" if by_copy else "the try it copied"
        note = f"{other}, on {first.worker}, failed too: {first.error}"
        return replace(result, error=f"{result.error} ({note})")

    def rerun(self, running: Any, free: Group, pending: Mapping[Any, Any]) -> Group:
        """Of ``free``, the tries of lost task ``running`` to rerun: not those
        its twin decided, or still runs. None of them is copied again."""
        self.rerun_free.update(batch.index for batch, _ in free)
        if self.twin.get(running) in pending:
            return []
        dropped = self.dropped.get(running, set())
        return [(b, t) for b, t in free if b.index not in dropped]

    def forget(self, running: Any) -> None:
        """Task ``running`` is done with (settled, or cancelled)."""
        self.began.pop(_key(running), None)
        self.dropped.pop(running, None)
        self.placed.pop(running, None)
        self.copies.discard(running)
        self.twin.pop(running, None)

    def losers(self, running: Any, pending: Mapping[Any, Group]) -> list[Any]:
        """The twin of finished task ``running`` to cancel, if every one of
        its mini-batches is decided."""
        twin = self.twin.get(running)
        if twin is None or twin not in pending:
            return []
        dropped = self.dropped.get(twin, set())
        if all(batch.index in dropped for batch, _ in pending[twin]):
            began = self.began.get(_key(twin))
            if began is not None:
                self.slow.add(began[0])
            return [twin]
        return []


def _key(future: Any) -> Any:
    """A future's task key (the doctests pair plain names)."""
    return getattr(future, "key", future)


def events(queue: Any, poll: bool) -> Iterator[tuple[Any, Any] | None]:
    """The finished tasks of ``queue`` (an ``as_completed``) as they come,
    and with ``poll`` (speculation on) a ``None`` each tenth of a second that
    none does, for the runner to look for stragglers."""
    if not poll:
        yield from queue
        return
    while not queue.is_empty():
        if not queue.has_ready():
            with queue.thread_condition:
                queue.thread_condition.wait(timeout=0.1)
            if not queue.has_ready():
                yield None
                continue
        yield next(queue)
