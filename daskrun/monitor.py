"""A run's log folder, as ParallelRunStep lays it out.

::

    logs/
      job_result.txt                          status and counts
      job_error.txt                           first real user error, traceback first
      sys/job_report/processed_mini-batches.csv  one row per mini-batch
      sys/job_report/failed_items.csv         every failed input and its error

Rows of ``processed_mini-batches.csv`` are written as mini-batches finish, so
the client never holds them all.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO

from .datasets import FileBatch, MiniBatch
from .plugin import TryResult
from .runner import Counts, Tally

REPORT = Path("sys", "job_report", "processed_mini-batches.csv")
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
            self.report_path, "w", newline=""
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
            self.failed_path, "w", newline=""
        )
        self._failed_writer = csv.writer(self._failed)
        self._failed_writer.writerow(FAILED_COLUMNS)
        self._failed_writer.writerows(earlier)

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
    ) -> None:
        """Write ``job_result.txt`` and, on failure, ``job_error.txt``."""
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
        ]
        if error:
            lines.append(f"error: {error}")
        (self.dir / "job_result.txt").write_text("\n".join(lines) + "\n")
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
            (self.dir / "job_error.txt").write_text("".join(text))

    def close(self) -> None:
        for f in (self._report, self._failed):
            if not f.closed:
                f.close()
