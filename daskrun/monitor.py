"""A run's log folder, as ParallelRunStep lays it out.

::

    logs/
      job_progress_overview.txt               progress, speed, ETA; while running
      job_result.txt                          status and counts
      job_error.txt                           first real user error, traceback first
      sys/job_report/processed_mini-batches.csv  one row per mini-batch
      sys/job_report/failed_items.csv         every failed input and its error
      sys/distributed.log                     distributed's own log lines, the
                                              client's and the local workers'
      user/entry_script_log/<agent>.txt       EntryScript().logger lines
      user/stdout/<agent>.txt                 what init() and run() printed

Rows of ``processed_mini-batches.csv`` are written as mini-batches finish, so
the client never holds them all. While a step runs, distributed's messages
("Nanny failed to start", "Restarting worker", a worker's tracebacks) go to
``sys/distributed.log``, not to the terminal (:func:`distributed_log`).
:class:`Console` is the terminal's view: a live progress bar (tqdm) on a
terminal, plain lines every few seconds otherwise.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import logging
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .config import config_get
from .datasets import FileBatch, MiniBatch
from .plugin import TryResult
from .runner import Counts, Tally

REPORT = Path("sys", "job_report", "processed_mini-batches.csv")
DISTRIBUTED_LOG = Path("sys", "distributed.log")
# file names that are not UTF-8 (lone surrogates from os.fsdecode) are
# written escaped, as \udce9, rather than failing the log
_ESCAPE = "backslashreplace"
FAILED_COLUMNS = ("index", "input", "error")
REPORT_COLUMNS = (
    "index",
    "worker",
    "tries",
    "items_in",
    "items_ok",
    "items_failed",
    "items_extra",
    "seconds",
    "error",
)


@dataclass
class WorkerStats:
    """One worker's share of a job."""

    mini_batches: int = 0
    items: int = 0
    failed: int = 0
    seconds: float = 0.0  # in run() (and reading its inputs)


class JobLogs:
    """Writer of one run's log folder."""

    def __init__(
        self,
        logs_dir: str | os.PathLike[str],
        earlier_rows: Iterable[Mapping[str, str]] = (),
        retry_failed: bool = False,
    ):
        self.dir = Path(logs_dir)
        self.report_path = self.dir / REPORT
        self.report_path.parent.mkdir(parents=True, exist_ok=True)
        # a resumed run starts from the rows its earlier attempts kept
        rows = [[row[c] for c in REPORT_COLUMNS] for row in earlier_rows]
        self._report: IO[str] = open(  # noqa: SIM115 - closed in close()
            self.report_path, "w", newline="", errors=_ESCAPE
        )
        self._writer = csv.writer(self._report)
        self._writer.writerow(REPORT_COLUMNS)
        self._writer.writerows(rows)
        self._report.flush()
        # failed inputs: those of earlier attempts stay unless retried now
        self.failed_path = self.report_path.with_name("failed_items.csv")
        earlier: list[list[str]] = []
        if self.failed_path.exists() and not retry_failed:
            with open(self.failed_path, newline="") as f:
                earlier = list(csv.reader(f))[1:]
        self._failed: IO[str] = open(  # noqa: SIM115 - closed in close()
            self.failed_path, "w", newline="", errors=_ESCAPE
        )
        self._failed_writer = csv.writer(self._failed)
        self._failed_writer.writerow(FAILED_COLUMNS)
        self._failed_writer.writerows(earlier)
        self._user: dict[tuple[str, str], IO[str]] = {}
        self.workers: dict[str, WorkerStats] = collections.defaultdict(WorkerStats)
        self.latest_errors: collections.deque[str] = collections.deque(maxlen=10)
        self.started = time.monotonic()

    def mini_batch(self, result: TryResult, tries: int, counts: Counts) -> None:
        """Add the final outcome of one mini-batch to the job report."""
        self._writer.writerow(
            (
                result.index,
                result.worker,
                tries,
                counts.items_in,
                counts.ok,
                counts.failed,
                counts.extra,
                f"{result.seconds:.3f}",
                result.error or "",
            )
        )
        self._report.flush()  # a killed client leaves a report to resume from
        stats = self.workers[result.worker]
        stats.mini_batches += 1
        stats.items += counts.ok
        stats.failed += counts.failed
        stats.seconds += result.seconds
        if result.error:
            self.latest_errors.append(
                f"mini-batch {result.index} on {result.worker}: {result.error}"
            )

    def user_output(self, result: TryResult) -> None:
        """Append what the script printed and logged to its worker's files."""
        for kind, text in (("stdout", result.stdout), ("entry_script_log", result.log)):
            if not text:
                continue
            key = (kind, result.worker)
            f = self._user.get(key)
            if f is None:
                path = self.dir / "user" / kind / f"{result.worker}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                f = self._user[key] = open(  # noqa: SIM115 - close()
                    path, "a", errors=_ESCAPE
                )
            f.write(text)
            f.flush()

    def snapshot(self, tally: Tally, status: str) -> dict[str, Any]:
        """The job's state, for the overview file and the dashboard page."""
        elapsed = time.monotonic() - self.started
        done, total = tally.mini_batches_done, tally.mini_batches_total
        rate = tally.items_succeeded / elapsed if elapsed > 0 else 0.0
        eta = (total - done) * elapsed / done if done else None
        return {
            "status": status,
            "elapsed": elapsed,
            "mini_batches_done": done,
            "mini_batches_total": total,
            "mini_batches_failed": tally.mini_batches_failed,
            "items_succeeded": tally.items_succeeded,
            "items_failed": tally.items_failed,
            "items_per_second": rate,
            "eta_seconds": eta,
            "workers": {
                name: {
                    "mini_batches": w.mini_batches,
                    "items": w.items,
                    "failed": w.failed,
                    "items_per_second": w.items / w.seconds if w.seconds else 0.0,
                }
                for name, w in sorted(self.workers.items())
            },
            "latest_errors": list(self.latest_errors),
        }

    def overview(self, snap: Mapping[str, Any]) -> None:
        """Rewrite ``job_progress_overview.txt`` (atomically)."""
        eta = snap["eta_seconds"]
        lines = [
            f"status: {snap['status']}",
            f"elapsed: {snap['elapsed']:.0f} s",
            f"mini-batches: {snap['mini_batches_done']}/{snap['mini_batches_total']}"
            f" done, {snap['mini_batches_failed']} failed",
            f"items: {snap['items_succeeded']} ok, {snap['items_failed']} failed",
            f"speed: {snap['items_per_second']:.1f} items/s",
            f"eta: {'-' if eta is None else f'{eta:.0f} s'}",
            "workers:",
        ]
        for name, w in snap["workers"].items():
            lines.append(
                f"  {name}: {w['mini_batches']} mini-batches, {w['items']} items, "
                f"{w['failed']} failed, {w['items_per_second']:.1f} items/s in run()"
            )
        if snap["latest_errors"]:
            lines.append("latest errors:")
            lines.extend(f"  {e}" for e in snap["latest_errors"])
        tmp = self.dir / ".job_progress_overview.txt.tmp"
        tmp.write_text("\n".join(lines) + "\n", errors=_ESCAPE)
        os.replace(tmp, self.dir / "job_progress_overview.txt")

    def failed_items(self, batch: MiniBatch, result: TryResult) -> None:
        """List the failed inputs of one mini-batch: each file of a failed
        file mini-batch, or the row range of a tabular one; when ``run()``
        returned fewer results than inputs, the mini-batch as a whole."""
        if result.ok:
            rows = [(batch.describe(), "run() returned fewer results than inputs")]
        elif isinstance(batch, FileBatch):
            rows = [(path, result.error or "") for path in batch.paths]
        else:
            rows = [(batch.describe(), result.error or "")]
        for item, error in rows:
            self._failed_writer.writerow((batch.index, item, error))
        self._failed.flush()

    def finish(
        self,
        *,
        status: str,
        run_id: str,
        tally: Tally,
        error: str | None,
        output_path: str | None,
        seconds: float,
        timings: dict[str, float] | None = None,
    ) -> None:
        """Write ``job_result.txt`` and, on failure, ``job_error.txt``.

        ``timings``: seconds from the call to milestones of the job
        (``cluster_ready``, ``init_done``, ``first_result``), written as
        ``<name>_seconds``."""
        self.close()
        lines = [
            f"status: {status}",
            f"run_id: {run_id}",
            f"output: {output_path or '-'}",
            f"seconds: {seconds:.2f}",
            f"mini_batches_total: {tally.mini_batches_total}",
            f"mini_batches_failed: {tally.mini_batches_failed}",
            f"items_total: {tally.items_total}",
            f"items_succeeded: {tally.items_succeeded}",
            f"items_failed: {tally.items_failed}",
            f"items_extra: {tally.items_extra}",
            *(
                f"{name}_seconds: {value:.2f}"
                for name, value in (timings or {}).items()
            ),
        ]
        if error:
            lines.append(f"error: {error}")
        (self.dir / "job_result.txt").write_text(
            "\n".join(lines) + "\n", errors=_ESCAPE
        )
        failure = tally.first_failure
        text = []
        if failure is not None:
            text.append(f"{failure.error}\n{failure.traceback or ''}")
            text.append(
                f"\nmini-batch {failure.index} ({failure.inputs}) on {failure.worker}\n"
            )
        if error and (failure is None or error != failure.error):
            text.append(f"\njob: {error}\n" if text else f"{error}\n")
        if text:
            (self.dir / "job_error.txt").write_text("".join(text), errors=_ESCAPE)

    def close(self) -> None:
        for f in (self._report, self._failed, *self._user.values()):
            if not f.closed:
                f.close()


# distributed's loggers and those of the event loop it runs on: Tornado's
# "Exception in callback", asyncio's "Task exception was never retrieved"
_DISTRIBUTED_LOGGERS = ("distributed", "tornado", "asyncio")


class _DistributedLogRoute:
    """Sends the records of distributed's loggers to log files instead of
    their own handlers (distributed's is the terminal).

    Routes overlap (steps run side by side in threads): while any is open,
    each open file gets every record, and the loggers get their own
    handlers back when the last one closes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, tuple[logging.Handler, int]] = {}
        self._saved: dict[str, tuple[list[logging.Handler], bool]] = {}

    def open(self, path: str | os.PathLike[str]) -> None:
        key = os.path.abspath(path)
        with self._lock:
            if key in self._files:
                handler, count = self._files[key]
                self._files[key] = handler, count + 1
                return
            os.makedirs(os.path.dirname(key), exist_ok=True)
            handler = logging.FileHandler(key, encoding="utf-8", errors=_ESCAPE)
            handler.setFormatter(
                logging.Formatter(
                    "%(asctime)s pid %(process)d %(name)s %(levelname)s: %(message)s"
                )
            )
            if not self._files:
                # distributed gives its handler to each logger it configures
                # ("distributed.client", "tornado.application", ...): they all
                # lose theirs, and pass their records up to ours
                for name in _logger_names():
                    logger = logging.getLogger(name)
                    self._saved[name] = list(logger.handlers), logger.propagate
                    for own in self._saved[name][0]:
                        logger.removeHandler(own)
                    logger.propagate = name not in _DISTRIBUTED_LOGGERS
            for name in _DISTRIBUTED_LOGGERS:
                logging.getLogger(name).addHandler(handler)
            self._files[key] = handler, 1

    def path(self) -> str | None:
        """The first open file, if any."""
        with self._lock:
            return next(iter(self._files), None)

    def close(self, path: str | os.PathLike[str]) -> None:
        key = os.path.abspath(path)
        with self._lock:
            handler, count = self._files[key]
            if count > 1:
                self._files[key] = handler, count - 1
                return
            del self._files[key]
            for name in _DISTRIBUTED_LOGGERS:
                logging.getLogger(name).removeHandler(handler)
            handler.close()
            if not self._files:
                for name, (handlers, propagate) in self._saved.items():
                    logger = logging.getLogger(name)
                    for own in handlers:
                        logger.addHandler(own)
                    logger.propagate = propagate
                self._saved.clear()


def _logger_names() -> list[str]:
    """The loggers made so far in distributed's hierarchies, and their tops."""
    made = list(logging.Logger.manager.loggerDict)
    return [
        name
        for name in dict.fromkeys([*_DISTRIBUTED_LOGGERS, *made])
        if name in _DISTRIBUTED_LOGGERS
        or (
            name.startswith(tuple(f"{top}." for top in _DISTRIBUTED_LOGGERS))
            and isinstance(logging.Logger.manager.loggerDict[name], logging.Logger)
        )
    ]


_route = _DistributedLogRoute()


@contextlib.contextmanager
def distributed_log(path: str | os.PathLike[str]) -> Iterator[None]:
    """Within this, distributed's log lines in this process go to ``path``
    (appended), not to the terminal: a run's ``sys/distributed.log``.

    On the way out, the collector runs once: an asyncio task that failed
    unseen (a worker's start, say) logs "Task exception was never
    retrieved" when it is freed, and it is freed here, not at exit.
    """
    _route.open(path)
    try:
        yield
    finally:
        import gc

        gc.collect()
        _route.close(path)


def log_distributed_to(path: str) -> None:
    """Send distributed's log lines to ``path`` for the rest of this process:
    run by each local worker process as it starts (see
    ``compute._worker_log_options``). So does the traceback that
    multiprocessing prints when the process's function raised, see
    :class:`_ExitTracebackToLog`."""
    _route.open(path)
    if not isinstance(sys.stderr, _ExitTracebackToLog):
        sys.stderr = _ExitTracebackToLog(sys.stderr, path)


class _ExitTracebackToLog:
    """``sys.stderr`` of a local worker process: what is written goes to the
    process's own stderr (user code's messages, say), until multiprocessing
    writes ``Process <name>:``, the head of the traceback of a process
    function that raised. That function is distributed's worker loop, never
    the user's code (whose errors are caught and reported), and it raises
    in races of distributed's own shutdown (a worker closed while it still
    starts): that traceback, and the rest of the process's stderr, goes to
    the log file.
    """

    def __init__(self, stream: Any, path: str):
        self._stream = stream
        self._path = path
        self._head = f"Process {multiprocessing.current_process().name}:\n"
        self._log: IO[str] | None = None

    def write(self, text: str) -> int:
        if self._log is None and text == self._head:
            self._log = open(  # noqa: SIM115 - open while the process lives
                self._path, "a", encoding="utf-8", errors=_ESCAPE, buffering=1
            )
        return int((self._log or self._stream).write(text))

    def flush(self) -> None:
        (self._log or self._stream).flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class Console:
    """The terminal's view of a run.

    On a terminal: a tqdm progress bar of mini-batches with items ok,
    failed, items/s and ETA. Otherwise (CI logs, files): one plain line at
    most every ``interval`` seconds, and one at the end. ``say`` prints a
    line above the bar.
    """

    def __init__(
        self,
        show: bool,
        stream: IO[str] | QueueStream | None = None,
        tty: bool | None = None,
        interval: float | None = None,
    ):
        self.show = show
        self.stream: Any = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = float(
            config_get("progress-interval") if interval is None else interval
        )
        self._bar: Any = None
        self._last = self._started = time.monotonic()
        self._initial = 0
        self._total = 0

    def say(self, line: str) -> None:
        if not self.show:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def start(self, total: int, done: int = 0) -> None:
        self._total = total
        self._last = self._started = time.monotonic()
        self._initial = done
        if self.show and self.tty:
            from tqdm import tqdm

            size = shutil.get_terminal_size((100, 20))
            self._bar = tqdm(
                total=total,
                initial=done,
                unit="mini-batch",
                file=self.stream,
                mininterval=0.2,
                # a terminal that reports no size gets 100 × 20
                ncols=size.columns,
                nrows=size.lines,
                leave=True,
            )

    def update(self, tally: Tally) -> None:
        """After a mini-batch finished (cheap: the display is throttled)."""
        if not self.show:
            return
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(tally.mini_batches_done - self._bar.n)
            if now - self._last >= 0.5:
                self._last = now
                self._bar.set_postfix_str(
                    f"items ok={tally.items_succeeded} failed={tally.items_failed}",
                    refresh=False,
                )
        elif now - self._last >= self.interval:
            self._last = now
            self.say(self.line(tally))

    def line(self, tally: Tally) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        done = tally.mini_batches_done - self._initial
        left = tally.mini_batches_total - tally.mini_batches_done
        eta = f", ETA {left * elapsed / done:.0f} s" if done else ""
        return (
            f"daskrun: {tally.mini_batches_done}/{tally.mini_batches_total} "
            f"mini-batches, {tally.items_succeeded} items ok, "
            f"{tally.items_failed} failed, "
            f"{tally.items_succeeded / elapsed:.0f} items/s{eta}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class QueueStream:
    """A text stream whose writes go to a queue, for a run in a background
    thread whose output the waiting thread prints."""

    def __init__(self, put: Any):
        self._put = put

    def write(self, text: str) -> int:
        self._put(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False
