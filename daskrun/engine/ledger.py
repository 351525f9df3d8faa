"""What a run planned: its input listing and a digest of each mini-batch,
compared when it resumes (a changed input is refused, or with ``replan``
only its mini-batches run again).

Files in the run's folder: ``inputs.csv`` (path, size, mtime or ETag of each
input file) and ``plan.bin`` (8 bytes per mini-batch).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from daskrun.backends.storage import private_folder, private_open, unsigned

LISTING = "inputs.csv"  # path, size, mtime or ETag of each input file
PLAN = "plan.bin"  # 8 bytes per mini-batch: a digest of its plan and inputs
_DIGEST = 8


def batch_digest(plan: Any, stamps: Sequence[tuple[int, str] | None]) -> bytes:
    """The 8 bytes :class:`PlanLedger` keeps of a mini-batch: what it reads
    (``plan``, without its index) and its files' sizes and mtimes or ETags.

    >>> len(batch_digest("a.txt", [(1, "1765000000")]))
    8
    """
    return hashlib.blake2b(repr((plan, stamps)).encode(), digest_size=_DIGEST).digest()


def read_plan(folder: Path) -> list[bytes]:
    """The digests a run's committed :data:`PLAN` holds, by mini-batch."""
    data = (folder / PLAN).read_bytes()
    return [data[i : i + _DIGEST] for i in range(0, len(data), _DIGEST)]


def read_listing(folder: Path) -> dict[str, tuple[str, str]]:
    """A run's committed :data:`LISTING`: path -> (size, mtime or ETag)."""
    with open(folder / LISTING, newline="") as f:
        return {row[0]: (row[1], row[2]) for row in csv.reader(f)}


class PlanLedger:
    """Writes a run's input listing and mini-batch digests as they are
    planned, one row and 8 bytes at a time (memory stays flat), into
    ``<run folder>/<name>.new``; :meth:`commit` makes them the run's.

    The digest of mini-batch *i* covers what it reads (paths, byte ranges or
    row groups) and each file's size and mtime (or ETag); :attr:`digest`,
    over all of them, is the run's ``inputs_digest``.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        private_folder(folder)
        self._listing = private_open(  # closed in close()
            # a file name that is not UTF-8 is kept escaped, as in the logs
            folder / f"{LISTING}.new",
            "w",
            newline="",
            errors="backslashreplace",
        )
        self._writer = csv.writer(self._listing)
        self._plan = private_open(folder / f"{PLAN}.new", "wb")
        self._total = hashlib.blake2b(digest_size=16)
        self.count = 0
        self.stopped = threading.Event()

    def file(self, path: str, size: int, stamp: str) -> None:
        self._writer.writerow((unsigned(path), size, stamp))  # no SAS kept

    def files(self, stamps: Sequence[tuple[str, int, str]]) -> None:
        """:meth:`file` for each of ``stamps``, in one write: joined as
        they are where no field needs CSV quoting (5 times faster)."""
        rows = [(unsigned(p), size, stamp) for p, size, stamp in stamps]
        text = "".join([f"{p},{size},{stamp}\r\n" for p, size, stamp in rows])
        if (
            '"' in text
            or "\n" in text.replace("\r\n", "")
            or text.count(",") != 2 * len(rows)
            or text.count("\r") != len(rows)
        ):
            self._writer.writerows(rows)  # quoted where needed
        else:
            self._listing.write(text)

    def mini_batch(self, plan: Any, stamps: Sequence[tuple[int, str] | None]) -> None:
        if self.stopped.is_set():  # FillBehind.discard
            raise _Stopped
        digest = batch_digest(plan, stamps)
        self._plan.write(digest)
        self._total.update(digest)
        self.count += 1

    @property
    def digest(self) -> str:
        return f"{self.count}-{self._total.hexdigest()}"

    def close(self) -> None:
        self._listing.close()
        self._plan.close()

    def commit(self) -> None:
        """Make the new listing and digests the run's."""
        self.close()
        for name in (LISTING, PLAN):
            os.replace(self.folder / f"{name}.new", self.folder / name)

    def discard(self) -> None:
        self.close()
        for name in (LISTING, PLAN):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.folder / f"{name}.new")

    def unchanged(self) -> bytearray:
        """1 for each new mini-batch whose digest equals the run's."""
        self.close()
        with open(self.folder / PLAN, "rb") as f:
            old = f.read()
        with open(self.folder / f"{PLAN}.new", "rb") as f:
            new = f.read()
        same = bytearray(len(new) // _DIGEST)
        for i in range(min(len(old), len(new)) // _DIGEST):
            j = i * _DIGEST
            same[i] = old[j : j + _DIGEST] == new[j : j + _DIGEST]
        return same

    def changes(self) -> str:
        """What changed between the run's listing and the new one, e.g.
        ``3 files added, 1 removed (first: a.png)``."""
        self.close()
        with open(self.folder / LISTING, newline="") as f:
            old = {row[0]: (row[1], row[2]) for row in csv.reader(f)}
        added = changed = 0
        first: str | None = None
        with open(self.folder / f"{LISTING}.new", newline="") as f:
            for path, size, stamp in csv.reader(f):
                was = old.pop(path, None)
                if was is None:
                    added += 1
                elif was != (size, stamp):
                    changed += 1
                else:
                    continue
                first = first or path
        removed = len(old)
        first = first or min(old, default=None)
        counts = [
            (n, what)
            for n, what in (
                (added, "added"),
                (removed, "removed"),
                (changed, "changed"),
            )
            if n
        ]
        if not counts:
            return "the mini-batch plan differs (a changed mini_batch_size?)"
        (n, what), rest = counts[0], counts[1:]
        parts = [f"{n} file{'s' if n > 1 else ''} {what}"]
        parts += [f"{n} {what}" for n, what in rest]
        if first is not None:
            parts[-1] += f" (first: {os.path.basename(first)})"
        return ", ".join(parts)


class _Stopped(Exception):
    """A fill given up (:meth:`FillBehind.discard`)."""


class FillBehind:
    """Fills a :class:`PlanLedger` in a thread of its own, with ``fill``,
    while the cluster starts and ``init()`` runs: stat'ing every input (3
    µs a file) no longer holds back the workers' start.

    :meth:`commit` waits for it and makes the ledger the run's; a job calls
    it before any mini-batch runs, so a run whose record has no digest yet
    has nothing to resume but its plan. :meth:`discard` (any other end) stops
    the fill at its next mini-batch and removes what it wrote.
    """

    def __init__(self, ledger: PlanLedger, fill: Callable[[PlanLedger], None]):
        self.ledger = ledger
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._fill, args=(fill,), name="daskrun-plan-ledger", daemon=True
        )
        self._thread.start()

    def _fill(self, fill: Callable[[PlanLedger], None]) -> None:
        try:
            fill(self.ledger)
        except BaseException as e:  # raised by commit()
            self._error = e

    def commit(self) -> str:
        """Wait for the fill and commit it; the run's ``inputs_digest``.
        Raises what the fill raised (a file gone since it was listed)."""
        self._thread.join()
        if self._error is not None:
            self.ledger.discard()
            raise self._error
        self.ledger.commit()
        return self.ledger.digest

    def discard(self) -> None:
        """Stop the fill, unless committed, and remove what it wrote."""
        self.ledger.stopped.set()
        self._thread.join()
        self.ledger.discard()
