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
      sys/progress.csv                        the job's counts once a second
      report.html                             the job's report (monitoring/report.py)
      user/entry_script_log/<agent>.txt       EntryScript().logger lines
      user/stdout/<agent>.txt                 what init() and run() printed
      perf/<agent>.csv                        the worker's CPU, memory and GPU
                                              over time (daskrun.monitoring.resources)
      perf/warnings.txt                       workers near their memory limit

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
import copy
import csv
import io
import logging
import multiprocessing
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from daskrun.backends.inputs.datasets import MiniBatch
from daskrun.backends.storage import (
    private_file,
    private_folder,
    private_open,
    unsigned,
)
from daskrun.engine.config import config_get
from daskrun.engine.plugin import TryResult
from daskrun.engine.runner import Counts, Tally
from daskrun.monitoring.forecast import Estimate
from daskrun.monitoring.notebook import in_notebook, notebook_widgets

REPORT = Path("sys", "job_report", "processed_mini-batches.csv")
FAILED_ITEMS = REPORT.with_name("failed_items.csv")
DISTRIBUTED_LOG = Path("sys", "distributed.log")
# the job's counts once a second, for the report's plot of progress over time
HISTORY = Path("sys", "progress.csv")
HISTORY_COLUMNS = (
    "time",
    "status",
    "elapsed",
    "mini_batches_done",
    "mini_batches_total",
    "mini_batches_failed",
    "items_succeeded",
    "items_failed",
    "items_per_second",
)
# file names that are not UTF-8 (lone surrogates from os.fsdecode) are
# written escaped, as \udce9, rather than failing the log
_ESCAPE = "backslashreplace"
# start and stop: the items [start, stop) of its mini-batch an input holds
# (a file is one; a row range, as many rows), blank where unknown
FAILED_COLUMNS = ("index", "input", "error", "start", "stop")
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
class Finished:
    """One mini-batch's final outcome, read back from the job report."""

    row: dict[str, str]

    @property
    def index(self) -> int:
        return int(self.row["index"])

    @property
    def ok(self) -> bool:
        return not self.row["error"]


def read_report(path: Path) -> list[Finished]:
    """The rows of an earlier attempt's job report (empty if none)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [Finished(row) for row in csv.DictReader(f)]


def read_failed_items(path: Path) -> list[dict[str, str]]:
    """The rows of a job's ``failed_items.csv`` (empty if none); those of a
    file written before it had ``start`` and ``stop`` get them blank."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [
            {column: row.get(column) or "" for column in FAILED_COLUMNS}
            for row in csv.DictReader(f)
        ]


def read_failed_spans(path: Path) -> dict[int, list[tuple[int, int]]]:
    """The failed items ``[start, stop)`` of each mini-batch in a job's
    ``failed_items.csv``, adjacent ones merged, sorted; a mini-batch with an
    input of unknown span is left out (it runs again whole)."""
    spans: dict[int, list[tuple[int, int]]] = {}
    unknown: set[int] = set()
    for row in read_failed_items(path):
        index = int(row["index"])
        if row["start"].isdigit() and row["stop"].isdigit():
            spans.setdefault(index, []).append((int(row["start"]), int(row["stop"])))
        else:
            unknown.add(index)
    merged: dict[int, list[tuple[int, int]]] = {}
    for index, found in spans.items():
        if index in unknown:
            continue
        out: list[tuple[int, int]] = []
        for start, stop in sorted(set(found)):
            if out and start <= out[-1][1]:
                out[-1] = (out[-1][0], max(stop, out[-1][1]))
            else:
                out.append((start, stop))
        merged[index] = out
    return merged


@dataclass
class WorkerStats:
    """One worker's share of a job."""

    mini_batches: int = 0
    items: int = 0
    failed: int = 0
    seconds: float = 0.0  # in run() (and reading its inputs)


@dataclass
class Pace:
    """How long mini-batches take, measured in the run phase: those finished
    since it began, the seconds their ``run()`` calls took, and the worker
    threads that run them.

    The ETA is the work left shared over the threads, which the runner keeps
    busy. Elapsed time over mini-batches done would count the cluster's
    start-up, ``init()`` and, early on, results still in flight (a task
    carries several mini-batches) as if they were the pace of the rest.

    >>> pace = Pace(threads=2)
    >>> pace.add(0.1); pace.add(0.3)
    >>> pace.eta(left=40)
    4.0
    >>> pace.eta(left=1)   # one mini-batch on one thread
    0.2
    """

    threads: int = 1
    finished: int = 0
    busy: float = 0.0

    def add(self, seconds: float) -> None:
        self.finished += 1
        self.busy += seconds

    def eta(self, left: int) -> float | None:
        if not self.finished or left <= 0:
            return None
        per_mini_batch = self.busy / self.finished
        return per_mini_batch * max(left / max(self.threads, 1), 1.0)


class JobLogs:
    """Writer of one run's log folder.

    Every text it records passes through ``redact`` (the run's credentials,
    and any URL's SAS signature, hidden), whoever wrote it: an input's path,
    an error raised on a worker, its traceback."""

    def __init__(
        self,
        logs_dir: str | os.PathLike[str],
        earlier_rows: Iterable[Mapping[str, str]] = (),
        retry_failed: bool = False,
        redact: Callable[[str], str] = unsigned,
    ):
        self.dir = Path(logs_dir)
        self.redact = redact
        self.report_path = self.dir / REPORT
        private_folder(self.report_path.parent)
        # a resumed run starts from the rows its earlier attempts kept
        rows = [[row[c] for c in REPORT_COLUMNS] for row in earlier_rows]
        self._report: IO[str] = private_open(  # closed in close()
            self.report_path, "w", newline="", errors=_ESCAPE
        )
        self._writer = csv.writer(self._report)
        self._writer.writerow(REPORT_COLUMNS)
        self._writer.writerows(rows)
        self._report.flush()
        # failed inputs: those of earlier attempts stay unless retried now
        self.failed_path = self.dir / FAILED_ITEMS
        earlier = (
            []
            if retry_failed
            else [
                [row[c] for c in FAILED_COLUMNS]
                for row in read_failed_items(self.failed_path)
            ]
        )
        self._failed: IO[str] = private_open(  # closed in close()
            self.failed_path, "w", newline="", errors=_ESCAPE
        )
        self._failed_writer = csv.writer(self._failed)
        self._failed_writer.writerow(FAILED_COLUMNS)
        self._failed_writer.writerows(earlier)
        self._user: dict[tuple[str, str], IO[str]] = {}
        # what Run.get_context() logged: (run, kind, name, value) entries
        self.logged: list[tuple[Any, ...]] = []
        self.workers: dict[str, WorkerStats] = collections.defaultdict(WorkerStats)
        self.latest_errors: collections.deque[str] = collections.deque(maxlen=10)
        # a resumed run's history goes on after its earlier attempts
        history = self.dir / HISTORY
        new_history = not history.exists()
        self._history: IO[str] = private_open(history, "a", newline="")  # close()
        self._history_writer = csv.writer(self._history)
        if new_history:
            self._history_writer.writerow(HISTORY_COLUMNS)
        self.started = time.monotonic()
        # (when, mini-batches done, items ok) as init() ended everywhere
        self._run_phase: tuple[float, int, int] | None = None

    def running(self, tally: Tally) -> None:
        """Mini-batches start now: speed and ETA are measured from here."""
        self._run_phase = (
            time.monotonic(),
            tally.mini_batches_done,
            tally.items_succeeded,
        )

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
                self.redact(result.error or ""),
            )
        )
        self._report.flush()  # a killed client leaves a report to resume from
        stats = self.workers[result.worker]
        stats.mini_batches += 1
        stats.items += counts.ok
        stats.failed += counts.failed
        stats.seconds += result.seconds
        if result.error:
            where = f"mini-batch {result.index} on {result.worker}"
            self.latest_errors.append(self.redact(f"{where}: {result.error}"))

    def user_output(self, result: TryResult) -> None:
        """Append what the script printed and logged to its worker's files,
        and its metrics and tags to :attr:`logged`."""
        self.logged.extend(result.logged)
        for kind, text in (("stdout", result.stdout), ("entry_script_log", result.log)):
            if not text:
                continue
            key = (kind, result.worker)
            f = self._user.get(key)
            if f is None:
                path = self.dir / "user" / kind / f"{result.worker}.txt"
                private_folder(path.parent)
                f = self._user[key] = private_open(  # close()
                    path, "a", errors=_ESCAPE
                )
            f.write(text)
            f.flush()

    def snapshot(
        self,
        tally: Tally,
        status: str,
        pace: Pace | None = None,
        forecast: Estimate | None = None,
        actual: float | None = None,
    ) -> dict[str, Any]:
        """The job's state, for the overview file and the dashboard page;
        ``forecast``: the job's, once its pilot is over; ``actual``: the
        job's seconds, once it has ended."""
        now_ = time.monotonic()
        elapsed = now_ - self.started
        done, total = tally.mini_batches_done, tally.mini_batches_total
        # not from the start: cluster start-up and init() are no measure of
        # how fast mini-batches go
        since, done0, items0 = self._run_phase or (now_, done, tally.items_succeeded)
        run_elapsed = now_ - since
        rate = (
            (tally.items_succeeded - items0) / run_elapsed if run_elapsed > 0 else 0.0
        )
        eta: float | None = None
        if pace is not None:
            eta = pace.eta(total - done)
        elif done > done0:
            eta = (total - done) * run_elapsed / (done - done0)
        return {
            "time": time.time(),
            "status": status,
            "elapsed": elapsed,
            "mini_batches_done": done,
            "mini_batches_total": total,
            "mini_batches_failed": tally.mini_batches_failed,
            "items_succeeded": tally.items_succeeded,
            "items_failed": tally.items_failed,
            "items_per_second": rate,
            "eta_seconds": eta,
            "forecast": None if forecast is None else forecast.figures(),
            "actual_seconds": actual,
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
            _forecast_line(snap),
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
        with private_open(tmp, "w", errors=_ESCAPE) as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, self.dir / "job_progress_overview.txt")
        if not self._history.closed:
            self._history_writer.writerow(
                [
                    f"{snap['time']:.3f}",
                    snap["status"],
                    f"{snap['elapsed']:.3f}",
                    *(snap[c] for c in HISTORY_COLUMNS[3:8]),
                    f"{snap['items_per_second']:.3f}",
                ]
            )
            self._history.flush()

    def failed_items(self, batch: MiniBatch, result: TryResult) -> None:
        """List the failed inputs of one mini-batch: each file of a failed
        file mini-batch, or the row range of a tabular one; of one whose
        failed items were isolated, those items, each with its own error;
        when ``run()`` returned fewer results than inputs, the mini-batch as
        a whole. Each with its items' ``start`` and ``stop`` in the
        mini-batch."""
        failed = result.failed_pieces or (((None, result),) if not result.ok else ())
        rows: list[tuple[str, str, Any, Any]] = []
        if result.ok and not failed:
            n = result.items_in if result.items_in is not None else ""
            error = "run() returned fewer results than inputs"
            rows = [(batch.describe(), error, 0, n)]
        for piece, tried in failed:
            error = tried.error or ""
            start = piece.start if piece is not None else 0
            paths = _paths(batch)
            if paths is not None:
                stop = piece.stop if piece is not None else len(paths)
                rows += [(paths[i], error, i, i + 1) for i in range(start, stop)]
            elif piece is not None:
                rows.append((piece.describe(), error, piece.start, piece.stop))
            else:
                n = result.items_in if result.items_in is not None else ""
                rows.append((batch.describe(), error, 0 if n != "" else "", n))
        for item, error, start, stop in rows:
            self._failed_writer.writerow(
                (batch.index, self.redact(item), self.redact(error), start, stop)
            )
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
        items_planned: int | None = None,
        items_counted: str = "items of finished mini-batches",
        resources: Iterable[str] = (),
    ) -> None:
        """Write ``job_result.txt`` and, on failure, ``job_error.txt``.

        ``items_total`` is ``items_planned`` where the plan knows it (the
        files of file inputs, the rows of Parquet inputs), so a job stopped
        early, even by ``init()``, still shows what it was given, with
        ``items_not_run``; CSV rows are known only once read, so there it
        counts the items of the finished mini-batches. ``items_counted``
        says which, in the file.

        ``timings``: seconds from the call to milestones of the job
        (``cluster_ready``, ``init_done``, ``first_result``), written as
        ``<name>_seconds``. ``resources``: lines about each worker's peak
        RSS and mean CPU (:meth:`daskrun.monitoring.resources.PerfLog.lines`)."""
        self.close()
        planned = items_planned is not None
        total = max(items_planned or 0, tally.items_total)
        done = tally.items_succeeded + tally.items_failed
        lines = [
            f"status: {status}",
            f"run_id: {run_id}",
            f"output: {output_path or '-'}",
            f"seconds: {seconds:.2f}",
            f"mini_batches_total: {tally.mini_batches_total}",
            f"mini_batches_failed: {tally.mini_batches_failed}",
            f"items_total: {total if planned else tally.items_total}",
            f"items_counted: {items_counted}",
            f"items_succeeded: {tally.items_succeeded}",
            f"items_failed: {tally.items_failed}",
            *([f"items_not_run: {max(0, total - done)}"] if planned else []),
            f"items_extra: {tally.items_extra}",
            *(
                f"{name}_seconds: {value:.2f}"
                for name, value in (timings or {}).items()
            ),
            *resources,
        ]
        if error:
            lines.append(f"error: {error}")
        with private_open(self.dir / "job_result.txt", "w", errors=_ESCAPE) as f:
            f.write(self.redact("\n".join(lines) + "\n"))
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
            with private_open(self.dir / "job_error.txt", "w", errors=_ESCAPE) as f:
                f.write(self.redact("".join(text)))

    def close(self) -> None:
        for f in (self._report, self._failed, self._history, *self._user.values()):
            if not f.closed:
                f.close()


def _forecast_line(snap: Mapping[str, Any]) -> str:
    """The overview's ``forecast:`` line (:mod:`daskrun.monitoring.forecast`): none
    while the pilot runs; once the job ended, the forecast made as the pilot
    ended beside the actual time."""
    forecast, actual = snap.get("forecast"), snap.get("actual_seconds")
    if actual is None:
        return f"forecast: {forecast or '- (pilot running)'}"
    made = f"{forecast} (as the pilot ended)" if forecast else "- (no pilot ended)"
    return f"forecast: {made}; actual: {actual:.0f} s"


def _paths(batch: MiniBatch) -> list[str] | None:
    """The files of a mini-batch of files (a partition's too), else ``None``."""
    return batch.input_files()


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
            private_folder(os.path.dirname(key))
            private_file(key)  # logging's handler would make it 0644
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

    def only(self, path: str | os.PathLike[str]) -> None:
        """Route to ``path`` alone, closing the files routed to so far."""
        key = os.path.abspath(path)
        if key not in self._files:
            self.open(path)  # first: closing the last file restores the terminal
        with self._lock:
            others = [k for k in self._files if k != key]
        for other in others:
            while other in self._files:
                self.close(other)

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
    ``cluster._worker_log_options``). So does the traceback that
    multiprocessing prints when the process's function raised, see
    :class:`_ExitTracebackToLog`."""
    _route.open(path)
    if not isinstance(sys.stderr, _ExitTracebackToLog):
        sys.stderr = _ExitTracebackToLog(sys.stderr, path)


def log_distributed_only_to(path: str) -> None:
    """:func:`log_distributed_to` ``path`` instead of the files so far: a
    warm local worker's lines go to the job that now uses it."""
    _route.only(path)
    stderr = sys.stderr
    if isinstance(stderr, _ExitTracebackToLog):
        stderr.path = path
    else:
        sys.stderr = _ExitTracebackToLog(stderr, path)


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
        self.path = path  # the log file; a warm worker changes it
        self._head = f"Process {multiprocessing.current_process().name}:\n"
        self._log: IO[str] | None = None

    def write(self, text: str) -> int:
        if self._log is None and text == self._head:
            self._log = private_open(  # open while the process lives
                self.path, "a", encoding="utf-8", errors=_ESCAPE, buffering=1
            )
        return int((self._log or self._stream).write(text))

    def flush(self) -> None:
        (self._log or self._stream).flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def failure_lines(
    run_id: str,
    logs_dir: str | os.PathLike[str],
    status: str,
    error: str | None,
    mini_batches_failed: int,
) -> list[str]:
    """The last lines of a run that did not complete: its log folder, how to
    resume it (unless its error says so), and its cause, once.

    >>> for line in failure_lines("s_1", "runs/s_1/logs", "Failed", "boom", 2):
    ...     print(line)
    logs: runs/s_1/logs
    daskrun: resume with: daskrun resume s_1 --retry-failed
    daskrun: job failed: boom
    """
    lines = [f"logs: {logs_dir}"]
    if f"daskrun resume {run_id}" not in (error or ""):
        again = " --retry-failed" if mini_batches_failed else ""
        lines.append(f"daskrun: resume with: daskrun resume {run_id}{again}")
    cause = error.splitlines()[0] if error else error
    lines.append(f"daskrun: job {status.lower()}: {cause}")
    return lines


# the lines a run shows: progress (off a terminal), the summary, failures
progress_logger = logging.getLogger("daskrun.progress")


class TerminalHandler(logging.Handler):
    """daskrun's default handler, on the ``daskrun`` logger: it prints the
    records a :class:`Console` logs on that console (above its progress bar),
    when the console shows output (``show_output=True``); other records pass
    it by. Records go on up to the root logger as any library's do, so a
    handler of one's own, or a level (``logging.getLogger("daskrun")
    .setLevel(logging.WARNING)`` keeps failures and the summary of a failed
    run, not progress), works as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(shown_by_console)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            console = record.__dict__["daskrun_console"]
            if console.show:
                console.write(record.getMessage())
        except Exception:
            self.handleError(record)


def shown_by_console(record: logging.LogRecord) -> bool:
    """Whether ``record`` is a line a :class:`Console` logged (and daskrun's
    terminal handler prints): for another handler to the terminal to skip."""
    return "daskrun_console" in record.__dict__


_terminal_lock = threading.Lock()
_terminal_installed = False


def _install_terminal_handler() -> None:
    """Give the ``daskrun`` logger its :class:`TerminalHandler` (once, so
    one a user removed stays removed) and, where no level is set, INFO."""
    global _terminal_installed
    with _terminal_lock:
        if _terminal_installed:
            return
        _terminal_installed = True
        top = logging.getLogger("daskrun")
        if top.level == logging.NOTSET:
            top.setLevel(logging.INFO)
        top.addHandler(TerminalHandler())


class Console:
    """The terminal's (or notebook's) view of a run.

    On a terminal: a tqdm progress bar of mini-batches with items ok,
    failed, items/s and ETA; in a Jupyter kernel the same bar as a widget
    (``tqdm.auto``). Otherwise (CI logs, files): one plain line at most every
    ``interval`` seconds, and one at the end. ``say`` logs a line (logger
    ``daskrun.progress``), which daskrun's :class:`TerminalHandler` prints
    above the bar.

    A run has two phases: ``init()`` on the workers (:meth:`initializing`,
    which shows the workers ready out of the total and no ETA), then the
    mini-batches (:meth:`running`). Items/s and the ETA are measured from
    the start of the second phase only: cluster start-up and ``init()`` say
    nothing about how fast mini-batches go.
    """

    def __init__(
        self,
        show: bool,
        stream: IO[str] | None = None,
        tty: bool | None = None,
        interval: float | None = None,
        notebook: bool | None = None,
    ):
        self.show = show
        self.stream: Any = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        # the widget goes to the cell being run: only for the kernel's own
        # output, not for a stream the caller gave; a kernel without
        # ipywidgets gets text lines
        self.notebook = (
            stream is None and show and in_notebook() and notebook_widgets()
            if notebook is None
            else notebook
        )
        self.interval = float(
            config_get("progress-interval") if interval is None else interval
        )
        self._bar: Any = None
        self._last = self._started = time.monotonic()
        self._total = 0
        self._init: tuple[int, int] | None = None  # workers ready, workers
        self._run_at: float | None = None  # when the first mini-batch could start
        self._run_done = 0  # mini-batches done then (a resume's earlier ones)
        self._run_items = 0  # items ok then
        self._forecast: Estimate | None = None  # the latest, after the pilot
        _install_terminal_handler()

    def say(self, line: str, level: int = logging.INFO) -> None:
        """Log ``line`` as a record of ``daskrun.progress``; shown here by
        daskrun's terminal handler when this console shows output."""
        progress_logger.log(level, line, extra={"daskrun_console": self})

    def write(self, line: str) -> None:
        """Print ``line`` on this console, above its progress bar."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def start(self, total: int, done: int = 0) -> None:
        self.close()  # a pipeline's consoles show one step after another
        self._total = total
        self._last = self._started = time.monotonic()
        self._init, self._run_at = None, None
        self._run_done = done
        self._run_items = 0
        self._forecast = None
        if not self.show or not (self.tty or self.notebook):
            return
        # the rate and ETA are daskrun's own (see line()), not tqdm's, whose
        # clock starts before the cluster and init()
        kwargs: dict[str, Any] = {
            "total": total,
            "initial": done,
            "unit": "mini-batch",
            "bar_format": "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
            "[{elapsed}{postfix}]",
            "mininterval": 0.2,
            "leave": True,
        }
        if self.notebook:
            from tqdm.auto import tqdm

            self._bar = tqdm(**kwargs)
        else:
            from tqdm import tqdm as tqdm_std

            size = shutil.get_terminal_size((100, 20))
            # a terminal that reports no size gets 100 × 20
            self._bar = tqdm_std(
                file=self.stream, ncols=size.columns, nrows=size.lines, **kwargs
            )

    def initializing(self, ready: int, workers: int, at: float | None = None) -> None:
        """While ``init()`` runs: ``ready`` of ``workers`` have finished it."""
        if not self.show:
            return
        changed = self._init != (ready, workers)
        self._init = (ready, workers)
        text = _init_text(ready, workers)
        if self._bar is not None:
            if changed:
                self._bar.set_description_str(text + " ")
        elif changed:  # off a terminal: a line when the count changes
            self._last = at or time.monotonic()
            self.say(f"daskrun: {text}, 0/{self._total} mini-batches")

    def running(self, tally: Tally, at: float | None = None) -> None:
        """``init()`` is done everywhere: mini-batches start now."""
        self._init = None
        self._run_at = time.monotonic() if at is None else at
        self._run_done = tally.mini_batches_done
        self._run_items = tally.items_succeeded
        if self._bar is not None:
            self._bar.set_description_str("")

    def update(
        self,
        tally: Tally,
        at: float | None = None,
        pace: Pace | None = None,
        forecast: Estimate | None = None,
    ) -> None:
        """After a mini-batch finished (cheap: the display is throttled).
        ``pace``: how long this phase's mini-batches took, for the ETA;
        ``forecast``: the job's, once its pilot is over."""
        if not self.show:
            return
        self._forecast = forecast
        now = time.monotonic() if at is None else at
        if self._bar is not None:
            # the text with the count: a frame never shows one without the other
            self._bar.set_postfix_str(self._speed(tally, now, pace), refresh=False)
            self._bar.update(tally.mini_batches_done - self._bar.n)
        elif now - self._last >= self.interval:
            self._last = now
            self.say(self.line(tally, now, pace))

    def _speed(self, tally: Tally, now: float, pace: Pace | None) -> str:
        """``items ok=…, failed=…, N items/s, ETA N s`` for the bar."""
        text = f"items ok={tally.items_succeeded} failed={tally.items_failed}"
        if self._init is not None:
            return text
        return f"{text}, {self._rate(tally, now, pace, mini_batches=True)}"

    def _rate(
        self, tally: Tally, now: float, pace: Pace | None, mini_batches: bool = False
    ) -> str:
        """``[N mini-batch/s, ]N items/s, ETA N s``, measured over the run
        phase only."""
        since = self._started if self._run_at is None else self._run_at
        elapsed = max(now - since, 1e-9)
        done = tally.mini_batches_done - self._run_done
        left = tally.mini_batches_total - tally.mini_batches_done
        rate = (tally.items_succeeded - self._run_items) / elapsed
        if pace is not None:
            eta = pace.eta(left)
        else:
            eta = left * elapsed / done if done and left else None
        text = f"{done / elapsed:.1f} mini-batch/s, " if mini_batches else ""
        text += f"{rate:.0f} items/s"
        text += "" if eta is None else f", ETA {eta:.0f} s"
        forecast = self._forecast
        return text + ("" if forecast is None else f", {forecast.text()}")

    def line(
        self, tally: Tally, now: float | None = None, pace: Pace | None = None
    ) -> str:
        if self._init is not None:
            return (
                f"daskrun: {_init_text(*self._init)}, "
                f"{tally.mini_batches_done}/{tally.mini_batches_total} mini-batches"
            )
        rate = self._rate(tally, time.monotonic() if now is None else now, pace)
        return (
            f"daskrun: {tally.mini_batches_done}/{tally.mini_batches_total} "
            f"mini-batches, {tally.items_succeeded} items ok, "
            f"{tally.items_failed} failed, {rate}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _init_text(ready: int, workers: int) -> str:
    return f"init() on {ready}/{workers} workers…"


def init_done(name: str, dask_worker: Any) -> bool:
    """On a worker (``client.run``): whether the entry script plugin
    ``name`` has finished ``init()`` there."""
    plugin = dask_worker.plugins.get(name)
    ready = getattr(plugin, "_ready", None)  # set when setup() ends
    return ready is not None and bool(ready.is_set())


class ConsoleFeed(Console):
    """The console of a run in a background thread: it shows nothing, but
    keeps the calls for the thread that waits on the run, which replays them
    on its own :class:`Console` (``replay``). Lines are kept in order; of
    the counts only the latest, so a run nobody watches holds little."""

    def __init__(self) -> None:
        super().__init__(True, io.StringIO(), tty=False)  # shows nothing itself
        self._calls: queue.Queue[tuple[str, float, Any]] = queue.Queue()
        self._latest: tuple[float, Tally, Pace | None, Estimate | None] | None = None
        self._lock = threading.Lock()

    def say(self, line: str, level: int = logging.INFO) -> None:
        self._calls.put(("say", time.monotonic(), (line, level)))

    def start(self, total: int, done: int = 0) -> None:
        self._calls.put(("start", time.monotonic(), (total, done)))

    def initializing(self, ready: int, workers: int, at: float | None = None) -> None:
        self._calls.put(("initializing", time.monotonic(), (ready, workers)))

    def running(self, tally: Tally, at: float | None = None) -> None:
        self._calls.put(("running", time.monotonic(), copy.copy(tally)))

    def update(
        self,
        tally: Tally,
        at: float | None = None,
        pace: Pace | None = None,
        forecast: Estimate | None = None,
    ) -> None:
        with self._lock:
            pending = self._latest is not None
            self._latest = (
                time.monotonic(),
                copy.copy(tally),
                copy.copy(pace),
                forecast,  # frozen
            )
        if not pending:
            self._calls.put(("update", 0.0, None))

    def close(self) -> None:
        self._calls.put(("close", time.monotonic(), None))

    def replay(self, console: Console) -> None:
        """Show on ``console`` what the run did since the last replay."""
        while True:
            try:
                name, at, arg = self._calls.get_nowait()
            except queue.Empty:
                return
            if name == "say":
                console.say(*arg)
            elif name == "start":
                console.start(*arg)
            elif name == "initializing":
                console.initializing(arg[0], arg[1], at=at)
            elif name == "running":
                console.running(arg, at=at)
            elif name == "update":
                with self._lock:
                    latest, self._latest = self._latest, None
                if latest is not None:
                    console.update(
                        latest[1], at=latest[0], pace=latest[2], forecast=latest[3]
                    )
            else:
                console.close()
