"""The terminal's (or notebook's) view of a run: :class:`Console`, its
progress bar or plain lines, and the lines a run that did not complete ends
with (:func:`failure_lines`).
"""

from __future__ import annotations

import copy
import io
import logging
import os
import queue
import shutil
import sys
import threading
import time
from typing import IO, Any

from daskrun.engine.config import config_get
from daskrun.engine.runner import Tally
from daskrun.monitoring.forecast import Estimate
from daskrun.monitoring.handlers import install_terminal_handler, progress_logger
from daskrun.monitoring.monitor import Pace
from daskrun.monitoring.notebook import in_notebook, notebook_widgets


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
        install_terminal_handler()

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
