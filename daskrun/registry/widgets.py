"""A run's live table in a Jupyter notebook, as ``azureml.widgets`` shows it.

>>> from daskrun.registry.widgets import RunDetails  # doctest: +SKIP
>>> RunDetails(pipeline_run).show()  # doctest: +SKIP

The table lists the run's steps with their status, mini-batches done of
total, items ok and failed and the first error. It reads the run records and
each running step's ``job_progress_overview.txt`` (rewritten every second
while it runs), so it shows a run started in this kernel, in another process,
or long finished. A background thread refreshes it until the run ends.
"""

from __future__ import annotations

import html
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daskrun.monitoring.notebook import in_notebook, notebook_widgets
from daskrun.registry.records import RunRecord

TERMINAL = ("Completed", "Failed", "Canceled")
COLUMNS = ("Step", "Status", "Mini-batches", "Items ok", "Items failed", "Error")
_DONE = re.compile(r"^mini-batches: (\d+)/(\d+) done, (\d+) failed$", re.M)
_ITEMS = re.compile(r"^items: (\d+) ok, (\d+) failed$", re.M)
_ERRORS = re.compile(r"^latest errors:\n  (.*)$", re.M)


@dataclass
class StepRow:
    """One step of a run, as the table shows it."""

    name: str
    status: str
    mini_batches_done: int = 0
    mini_batches_total: int = 0
    items_succeeded: int = 0
    items_failed: int = 0
    error: str = ""

    def cells(self) -> tuple[str, ...]:
        return (
            self.name,
            self.status,
            f"{self.mini_batches_done}/{self.mini_batches_total}",
            str(self.items_succeeded),
            str(self.items_failed),
            self.error,
        )


def step_row(record: RunRecord) -> StepRow:
    """A step's row: the record's counts, or while it runs the live ones of
    its progress overview."""
    counts = record.counts
    row = StepRow(
        record.name,
        record.status,
        counts.get("mini_batches_done", counts.get("mini_batches_total", 0)),
        counts.get("mini_batches_total", 0),
        counts.get("items_succeeded", 0),
        counts.get("items_failed", 0),
        (record.error or "").split("\n", 1)[0],
    )
    if record.status in TERMINAL:
        return row
    logs = Path(record.logs_dir) if record.logs_dir else record.folder / "logs"
    try:
        text = (logs / "job_progress_overview.txt").read_text(errors="replace")
    except OSError:  # not written yet: the step is starting
        return row
    if m := _DONE.search(text):
        row.mini_batches_done, row.mini_batches_total = int(m[1]), int(m[2])
    if m := _ITEMS.search(text):
        row.items_succeeded, row.items_failed = int(m[1]), int(m[2])
    if (m := _ERRORS.search(text)) and not row.error:
        row.error = m[1]
    return row


class RunDetails:
    """A live table of a run's steps, counts and errors.

    Parameters
    ----------
    run : PipelineRun or StepRun
        A pipeline run (one row per step; steps not started yet show
        ``NotStarted``) or a step run.
    interval : float
        Seconds between refreshes while the run goes on.

    Examples
    --------
    >>> run = experiment.submit(pipeline)  # doctest: +SKIP
    >>> RunDetails(run).show()  # doctest: +SKIP
    >>> run.wait_for_completion(show_output=True)  # doctest: +SKIP
    """

    def __init__(self, run: Any, interval: float = 1.0):
        self.run = run
        self.interval = interval
        self._widget: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _root(self) -> Path:
        if hasattr(self.run, "find_step_run"):  # a pipeline run
            return Path(self.run.workspace.runs_dir)
        # a step run's folder holds its logs: <runs>/<run id>/logs
        return Path(self.run.logs_dir).parent.parent

    def status(self) -> tuple[str, list[StepRow]]:
        """The run's status and one row per step, read now."""
        root = self._root()
        record = RunRecord.load(self.run.run_id, root)
        if record.type != "pipeline":
            return record.status, [step_row(record)]
        rows = [step_row(r) for r in RunRecord.find(root, parent_id=record.run_id)]
        pipeline = getattr(self.run, "pipeline", None)
        seen = {row.name for row in rows}
        for step in pipeline.steps if pipeline is not None else ():
            if step.name not in seen:
                status = "NotStarted" if record.status not in TERMINAL else "Skipped"
                rows.append(StepRow(step.name, status))
        return record.status, rows

    def html(self) -> str:
        """The table as HTML, as the widget shows it."""
        status, rows = self.status()
        head = "".join(f"<th>{c}</th>" for c in COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r.cells()) + "</tr>"
            for r in rows
        )
        return (
            f"<div><b>Run {html.escape(self.run.run_id)}</b>: {html.escape(status)}"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
        )

    def text(self) -> str:
        """The table as plain text (outside a notebook)."""
        status, rows = self.status()
        table = [COLUMNS, *(row.cells() for row in rows)]
        widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in table
        ]
        return "\n".join([f"Run {self.run.run_id}: {status}", *lines])

    def show(self) -> None:
        """Show the table; in a notebook, refresh it until the run ends."""
        if not (in_notebook() and notebook_widgets()):
            print(self.text())
            return
        import ipywidgets
        from IPython.display import display

        self._widget = ipywidgets.HTML(value=self.html())
        display(self._widget)
        if not self._finished():
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._refresh, name=f"daskrun-details-{self.run.run_id}",
                daemon=True,
            )  # fmt: skip
            self._thread.start()

    def _finished(self) -> bool:
        return self.status()[0] in TERMINAL

    def _refresh(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                finished = self._finished()  # read before: the last view is final
                self._widget.value = self.html()
            except Exception as e:  # a view must not kill the kernel
                print(f"daskrun: RunDetails stopped: {e}", file=sys.stderr)
                return
            if finished:
                return

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the table shows the run's end (or ``timeout``)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self) -> None:
        """Stop refreshing (the table keeps its last view)."""
        self._stop.set()
