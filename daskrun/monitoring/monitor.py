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
``sys/distributed.log``, not to the terminal
(:func:`daskrun.monitoring.handlers.distributed_log`).
:class:`daskrun.monitoring.console.Console` is the terminal's view: a live
progress bar (tqdm) on a terminal, plain lines every few seconds otherwise.
"""

from __future__ import annotations

import collections
import csv
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from daskrun.backends.inputs.datasets import MiniBatch
from daskrun.backends.storage import (
    private_folder,
    private_open,
    unsigned,
)
from daskrun.engine.plugin import TryResult
from daskrun.engine.runner import Counts, Tally
from daskrun.monitoring.forecast import Estimate

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
