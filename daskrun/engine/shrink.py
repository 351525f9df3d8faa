"""``mini_batch_size="auto"`` after a timeout: smaller mini-batches.

A pilot of fast files followed by slow ones can choose mini-batches that
outlast ``run_invocation_timeout``: each would time out on every try. Once
a mini-batch of an auto-sized step times out, :class:`Shrink` lowers the
size to a quarter of its items (at the rate that timeout implies, such a
piece takes at most a quarter of the timeout), and says so in one line. The
timed-out mini-batch runs again as pieces of that size, its next try; so
does each mini-batch of the plan handed out after, cut before it starts,
and each one rerun whole after its task was lost with others.

The pieces are those of :class:`~daskrun.engine.isolation.Isolation`: each
writes a part at its mini-batch's place in the output, so the output keeps
its order and each item once; a piece that fails (or times out) is halved,
down to single items. The plan itself, its mini-batches and their indices,
stays as planned: the ledger and a resume see the same plan. Steps without
isolation (``daskrun.isolate-failures: false``) do not shrink.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from daskrun.backends.inputs.datasets import SubBatch
from daskrun.engine.auto import is_auto
from daskrun.engine.config import ResolvedConfig
from daskrun.engine.isolation import Isolation, Unfinished
from daskrun.engine.plugin import TryResult

logger = logging.getLogger("daskrun")

SHARE = 4
"""A piece after a timeout holds this fraction of the items that timed out."""

# what the watchdog's errors say of a call that ran past the timeout
# (engine.lost.LostTasks.timeout_error), not a frozen worker or init()
_TIMED_OUT = " within run_invocation_timeout="


class Shrink:
    """The size an auto-sized step's mini-batches run at after a timeout.

    ``isolation`` runs the pieces; ``None`` (a fixed size, or no isolation)
    makes a shrink that never cuts.

    >>> from daskrun.backends.inputs.datasets import FileBatch
    >>> iso = Isolation(lambda batch: None)
    >>> shrink = Shrink(iso, timeout=8, max_try=3)
    >>> big = FileBatch.of(1, [f"f{i}" for i in range(48)])
    >>> hung = TryResult(1, 1, False, "w", None, 0, 0.0,
    ...     error="TimeoutError: run() did not return within "
    ...           "run_invocation_timeout=8 s; worker-0 was restarted")
    >>> [(p.start, p.stop, t) for p, t in shrink.retry(big, hung, 1)]
    [(0, 12, 2), (12, 24, 2), (24, 36, 2), (36, 48, 2)]
    >>> cut = shrink.cut(FileBatch.of(2, [f"g{i}" for i in range(30)]))
    >>> cut.spans
    ((0, 12), (12, 24), (24, 30))
    >>> shrink.cut(FileBatch.of(3, ["h0", "h1"])).index   # small enough
    3
    """

    def __init__(
        self,
        isolation: Isolation | None,
        timeout: float,
        max_try: int,
        say: Callable[[str, int], None] | None = None,
    ):
        self.isolation = isolation
        self.timeout = timeout
        self.max_try = max_try
        # where the one line goes: the job's console, else daskrun's logger
        self.say = say or (lambda line, level: logger.log(level, line))
        self.size: int | None = None  # items per piece, once something timed out

    @classmethod
    def of(
        cls,
        cfg: ResolvedConfig,
        isolation: Isolation | None,
        say: Callable[[str, int], None] | None = None,
    ) -> Shrink:
        """The shrink of a step run with ``cfg``: inert unless its
        ``mini_batch_size`` is ``"auto"`` and failures are isolated; its
        line goes to ``say(line, level)``, if given."""
        auto = is_auto(cfg.mini_batch_size) and isolation is not None
        return cls(
            isolation if auto else None,
            cfg.run_invocation_timeout,
            cfg.run_max_try,
            say,
        )

    def retry(self, batch: Any, result: TryResult, try_no: int) -> list[Any]:
        """The next try of ``batch`` as pieces, ``(piece, try)`` each, where
        its try ``result`` ran past the timeout; else ``[]`` (the runner
        goes on as usual). A piece that timed out lowers the size for what
        follows, and is halved by the isolation as any failed piece."""
        if (
            self.isolation is None
            or result.ok
            or _TIMED_OUT not in (result.error or "")
        ):
            return []
        n = batch.n_items
        if n is None or n < 2:
            return []
        size = max(1, n // SHARE)
        if self.size is None or size < self.size:
            self.size = size
            self.say(
                f"daskrun: auto: mini-batches of {n} took over the "
                f"{self.timeout:g} s timeout; now {size}",
                logging.WARNING,
            )
        if isinstance(batch, SubBatch) or not batch.isolable:
            return []
        tries = min(try_no + 1, self.max_try)
        pieces = self.isolation.cut(batch, _spans(n, self.size), tries)
        return [(piece, tries) for piece in pieces]

    def cut(self, batch: Any) -> Any:
        """``batch`` as it should start: cut into pieces (an
        :class:`~daskrun.engine.isolation.Unfinished` whose spans all run)
        once a timeout lowered the size below its items."""
        n = getattr(batch, "n_items", None)
        if (
            self.size is None
            or isinstance(batch, Unfinished)
            or not batch.isolable
            or n is None
            or n <= self.size
        ):
            return batch
        return Unfinished(batch, _spans(n, self.size), n, 0, 0, fresh=True)

    def next_retry(self, retries: list[tuple[Any, int]]) -> list[tuple[Any, int]]:
        """The next of ``retries`` to submit, alone, taken off the list: a
        whole mini-batch rerun after its task was lost with others is cut
        first, its pieces put back.

        >>> from daskrun.backends.inputs.datasets import FileBatch
        >>> shrink = Shrink(Isolation(lambda batch: None), timeout=8, max_try=3)
        >>> shrink.size = 2
        >>> retries = [(FileBatch.of(0, ["a", "b", "c"]), 1)]
        >>> [(p.start, p.stop) for p, _ in shrink.next_retry(retries)]
        [(2, 3)]
        >>> [(p.start, p.stop, t) for p, t in retries]
        [(0, 2, 1)]
        """
        batch, try_no = retries.pop()
        n = getattr(batch, "n_items", None)
        if (
            self.isolation is None
            or self.size is None
            or isinstance(batch, SubBatch)
            or not batch.isolable
            or n is None
            or n <= self.size
        ):
            return [(batch, try_no)]
        pieces = self.isolation.cut(batch, _spans(n, self.size), try_no)
        retries.extend((piece, try_no) for piece in pieces)
        return [retries.pop()]

    def cutting(self, batches: Iterable[Any]) -> Iterator[Any]:
        """``batches`` (the plan, as the runner takes it), each cut as
        :meth:`cut` says at the time it is taken."""
        return _Cutting(self, iter(batches))


class _Cutting:
    """An iterator over the plan that cuts what it hands out. Not a
    generator: a plan may end for now and go on later
    (:class:`daskrun.engine.pilot.PilotFeed`), and a generator that ended
    stays ended."""

    def __init__(self, shrink: Shrink, plans: Iterator[Any]):
        self.shrink, self.plans = shrink, plans

    def __iter__(self) -> _Cutting:
        return self

    def __next__(self) -> Any:
        batch = next(self.plans)
        return batch if self.shrink.size is None else self.shrink.cut(batch)


def _spans(n: int, size: int) -> tuple[tuple[int, int], ...]:
    """``n`` items in pieces of ``size``, in order.

    >>> _spans(5, 2)
    ((0, 2), (2, 4), (4, 5))
    """
    return tuple((start, min(start + size, n)) for start in range(0, n, size))
