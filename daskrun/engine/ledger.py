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


_FLUSH_EVERY = 1024  # mini-batches, while no one waits for one


def promote(folder: Path, partial: bool = False) -> None:
    """Make the listing and digests being written in ``folder`` the run's;
    ``partial``: those a kill left, one of them perhaps promoted already."""
    for name in (LISTING, PLAN):
        if not partial or (folder / f"{name}.new").exists():
            os.replace(folder / f"{name}.new", folder / name)


def promote_partial(folder: Path) -> str | None:
    """The ledger a run streamed (:class:`FillBehind`) but did not commit,
    its client killed first: made the run's, and its digest; ``None`` if
    there is none. Every mini-batch that ran has its digest in it."""
    if not (folder / f"{PLAN}.new").is_file():
        return None
    promote(folder, partial=True)
    digests = read_plan(folder)
    total = hashlib.blake2b(digest_size=16)
    for digest in digests:
        total.update(digest)
    return f"{len(digests)}-{total.hexdigest()}"


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
        # mini-batches whose digests (and files) are written through to the
        # files, and how many a waiter needs (FillBehind.wait)
        self.flushed = self.wanted = 0
        self._progress = threading.Condition()

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
        if self.stopped.is_set():  # FillBehind.end
            raise _Stopped
        digest = batch_digest(plan, stamps)
        self._plan.write(digest)
        self._total.update(digest)
        self.count += 1
        if (
            self.flushed < self.wanted <= self.count  # a waiter's, now written
            or self.count - self.flushed >= _FLUSH_EVERY
        ):
            self.flush()

    def flush(self) -> None:
        """Write what is buffered through to the files (a process killed
        from now on leaves it there), and wake a :meth:`wait_flushed`."""
        self._listing.flush()
        self._plan.flush()
        with self._progress:
            self.flushed = self.count
            self._progress.notify_all()

    def wait_flushed(self, n: int, timeout: float) -> bool:
        """Wait until the first ``n`` mini-batches are flushed, at most
        ``timeout`` seconds; whether they are. The fill is asked for up to
        64 more at once: a flush each mini-batch, while the runner keeps
        up with the fill, cost 40 µs a mini-batch in thread switches."""
        if self.flushed >= n:
            return True
        with self._progress:
            self.wanted = max(self.wanted, n + min(n, 64) - 1)
            return self._progress.wait_for(lambda: self.flushed >= n, timeout)

    @property
    def digest(self) -> str:
        return f"{self.count}-{self._total.hexdigest()}"

    def close(self) -> None:
        self._listing.close()
        self._plan.close()

    def commit(self) -> None:
        """Make the new listing and digests the run's."""
        self.close()
        promote(self.folder)

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
    """A fill given up (:meth:`FillBehind.end`)."""


class FillBehind:
    """Fills a :class:`PlanLedger` in a thread of its own, with ``fill``,
    while the cluster starts, ``init()`` runs and (``streams``) the first
    mini-batches run: stat'ing every input (3 µs a file) no longer holds
    back the workers.

    A streamed mini-batch is handed out only once its digest is written
    through to the ledger's files (:meth:`wait`), so a client killed while
    the ledger streams leaves the digest of every mini-batch that ran;
    ``daskrun resume`` compares those (:func:`promote_partial`). Without
    ``streams`` the job calls :meth:`commit` before any mini-batch runs.
    :meth:`commit` waits for the fill and makes the ledger the run's;
    :meth:`end` (any other end) stops the fill at its next mini-batch and
    keeps what was written if a mini-batch was handed out, else removes it.
    """

    def __init__(
        self, ledger: PlanLedger, fill: Callable[[PlanLedger], None], streams: bool
    ):
        self.ledger, self.streams = ledger, streams
        self.handed_out = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._fill, args=(fill,), name="daskrun-plan-ledger", daemon=True
        )
        self._thread.start()

    def _fill(self, fill: Callable[[PlanLedger], None]) -> None:
        try:
            fill(self.ledger)
        except BaseException as e:  # raised by wait() or commit()
            self._error = e
        finally:
            self.ledger.flush()

    def wait(self, index: int, check: Callable[[], None]) -> None:
        """Return once mini-batch ``index``'s digest is written through;
        ``check`` (a job's interrupt) is called while it waits."""
        self.handed_out = True
        while not self.ledger.wait_flushed(index + 1, 0.2):
            check()
            if not self._thread.is_alive():
                break
        self._raise()
        if self.ledger.flushed <= index:  # the plan and its ledger disagree
            raise RuntimeError(
                f"mini-batch {index} has no digest in the plan's ledger "
                f"({self.ledger.count} recorded); please report this"
            )

    def commit(self) -> str:
        """Wait for the fill and commit it; the run's ``inputs_digest``.
        Raises what the fill raised (a file gone since it was listed)."""
        self._thread.join()
        if self._error is not None:
            self.end()
            self._raise()
        self.ledger.commit()
        return self.ledger.digest

    def _raise(self) -> None:
        """What the fill raised, if anything (an input gone since it was
        listed: an InputError); the run keeps the digests of what ran."""
        if self._error is not None:
            raise self._error

    def end(self) -> None:
        """Stop the fill; keep what it wrote if a mini-batch was handed out
        (a resume compares it), else remove it. A committed ledger stays."""
        self.ledger.stopped.set()
        self._thread.join()
        if self.handed_out:
            self.ledger.close()
        else:
            self.ledger.discard()
