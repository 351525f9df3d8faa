"""Isolating the items that fail in a mini-batch that failed its last try.

:class:`Isolation` halves such a mini-batch down to single items, each piece
tried once, so that only the items that fail alone are counted;
:class:`Unfinished` is a mini-batch of an earlier attempt whose failed items
run again (``daskrun resume --retry-failed``), or one cut into pieces before
it starts (:mod:`daskrun.engine.shrink`). Pure: the runner
(:mod:`daskrun.engine.runner`) submits the pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from daskrun.backends.inputs.datasets import (
    CsvBatch,
    FileBatch,
    SubBatch,
)
from daskrun.engine.plugin import TryResult


@dataclass(frozen=True)
class Unfinished:
    """A mini-batch of an earlier attempt whose failed items were isolated,
    to retry: only its failed items ``spans`` run again (``daskrun resume
    --retry-failed``); ``ok`` and ``extra`` are the results its other items
    gave then, which are kept. ``fresh``: a mini-batch that never ran whole,
    cut into the pieces ``spans`` (:mod:`daskrun.engine.shrink`); what an
    earlier attempt wrote of it is removed first."""

    batch: FileBatch | CsvBatch | Any
    spans: tuple[tuple[int, int], ...]
    items_in: int
    ok: int
    extra: int
    fresh: bool = False

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

    def cut(
        self, batch: Any, spans: tuple[tuple[int, int], ...], tries: int
    ) -> list[SubBatch]:
        """``batch`` as the pieces ``spans``, its try ``tries``, in place of
        the whole (:mod:`daskrun.engine.shrink`); its outcome is counted as
        an isolated one's."""
        self.on_start(batch)
        state = _Isolating(batch, tries, spans[-1][1], in_flight=len(spans))
        self.open[batch.index] = state
        return [SubBatch(batch, a, b) for a, b in spans]

    def resume(self, unfinished: Unfinished) -> list[SubBatch]:
        """The pieces of an earlier attempt's isolated mini-batch to retry,
        or of one cut before it starts."""
        if unfinished.fresh:
            return self.cut(unfinished.batch, unfinished.spans, 1)
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
        state.worker = state.worker or result.worker  # of a cut: its first piece's
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


def counted(
    batch: Any, result: TryResult, count_rows: Callable[[Any], int | None] | None
) -> TryResult:
    """``result``, the last try of ``batch``, with the items it held where
    the try failed before reading them counted them (a CSV range whose
    worker died)."""
    if result.items_in is not None or batch.n_items is not None or not count_rows:
        return result
    return replace(result, items_in=count_rows(batch))
