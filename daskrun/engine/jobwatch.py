"""What a job does around its mini-batches: the output folder prepared
and locked, the entry script registered on the workers (showing who has
finished ``init()``), the progress and cost lines watched while it runs, and
the report written at the end.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from daskrun.backends.storage import FileLock, describe_error
from daskrun.engine import output as _output
from daskrun.engine.plugin import (
    EntryScriptPlugin,
)
from daskrun.engine.runner import (
    LostTasks,
    Tally,
)
from daskrun.exceptions import (
    ConfigError,
    EntryScriptError,
    JobFailedError,
)
from daskrun.monitoring.console import Console, init_done
from daskrun.monitoring.dashboard import publish
from daskrun.monitoring.forecast import Forecast
from daskrun.monitoring.monitor import JobLogs, Pace
from daskrun.monitoring.report import write_report

logger = logging.getLogger("daskrun")


def _prepare_output(target: _output.OutputTarget) -> list[FileLock]:
    """Lock each local output folder for this run (every named output's),
    and make the parts folder, within ``daskrun.storage-timeout`` on remote
    storage; the locks taken."""
    locks: list[FileLock] = []
    try:
        for folder in target.folders():
            if folder.local:  # a folder in use: refused in one line
                locks.append(_output.lock_output(folder))
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    try:
        _output.prepare_parts(target)
    except BaseException as e:
        for lock in locks:
            lock.release()
        if isinstance(e, _output.OutputError):
            raise ConfigError(str(e)) from None
        if isinstance(e, Exception):
            raise ConfigError(
                f"output={target.url!r} cannot be written: "
                f"{describe_error(e, target.storage_options)}; check the output "
                "storage's endpoint and credentials"
            ) from None
        raise
    return locks


def _register(
    client: Any, plugin: EntryScriptPlugin, timeout: float, run_id: str
) -> None:
    """Run ``init()`` on every worker; a failure or a hang fails the job."""
    try:
        client.register_plugin(plugin, name=plugin.name)
    except EntryScriptError as e:
        # a resume of the same code would fail the same way
        first, _, rest = str(e).partition("\n")
        hint = f"; fix it, then 'daskrun resume {run_id} --new-source'"
        raise JobFailedError(
            first + hint + (f"\n{rest}" if rest else ""), run_id=run_id
        ) from None
    except Exception as e:  # a worker died during init()
        lost = LostTasks(client, plugin.events_topic, timeout)
        hung = lost.init_timed_out()
        if hung is not None:
            raise JobFailedError(lost.init_timeout_error(hung), run_id=run_id) from None
        raise JobFailedError(
            plugin.redact(f"init() did not complete: {type(e).__name__}: {e}"),
            run_id=run_id,
        ) from None


def _register_watched(
    client: Any,
    plugin: EntryScriptPlugin,
    timeout: float,
    run_id: str,
    console: Console,
) -> None:
    """:func:`_register`, showing how many workers have finished ``init()``
    while it runs (``init()`` may load a model for minutes)."""
    failure: list[BaseException] = []

    def register() -> None:
        try:
            _register(client, plugin, timeout, run_id)
        except BaseException as e:  # raised in the caller
            failure.append(e)

    thread = threading.Thread(target=register, name=f"{plugin.name}-init", daemon=True)
    thread.start()
    while True:
        thread.join(0.5)
        if not thread.is_alive():
            break
        try:
            ready = client.run(init_done, plugin.name, on_error="return")
        except Exception:  # a worker going away shows up above
            continue
        if thread.is_alive():
            console.initializing(sum(r is True for r in ready.values()), len(ready))
    if failure:
        raise failure[0]


def _unregister(client: Any, name: str) -> None:
    # runs shutdown() on every worker; a cluster going away must not mask errors
    try:
        client.unregister_worker_plugin(name)
    except Exception as e:
        logger.debug("could not unregister plugin %s: %s", name, e)


class _Watch:
    """Keeps the live views of a run current: the progress display, the
    overview file and the dashboard page (each at most once a second)."""

    def __init__(self, logs: JobLogs, tally: Tally, console: Console):
        self.logs, self.tally, self.console = logs, tally, console
        self.client: Any = None
        self.run_id = ""
        self.pace = Pace()
        self.forecast: Forecast | None = None  # from the run phase on
        self._since = (0, 0.0)  # the pace when the forecast's pilot began
        self._last = 0.0

    def restart_forecast(self, forecast: Forecast) -> None:
        """Forecast afresh from here (the mini-batches' size changed: an
        auto pilot ended), from a pilot of what is left."""
        self.forecast, self._since = forecast, (self.pace.finished, self.tally.busy)

    def tick(
        self, status: str = "Running", force: bool = False, actual: float | None = None
    ) -> None:
        """Update the views; ``actual``: the job's seconds, once it ended
        (the overview then gives them beside the forecast)."""
        now_ = time.monotonic()
        due = force or now_ - self._last >= 1.0
        tally, forecast = self.tally, self.forecast
        estimate = (
            forecast.update(
                time.perf_counter(),
                tally.mini_batches_done,
                tally.mini_batches_total,
                self.pace.finished - self._since[0],
                # every try's seconds: retries and isolation take time too
                tally.busy - self._since[1],
            )
            if forecast is not None and status == "Running"
            else None
        )
        shown = estimate
        if actual is not None and forecast is not None:
            shown = forecast.made  # the one made as the pilot ended
        snap = (
            self.logs.snapshot(tally, status, self.pace, shown, actual) if due else None
        )
        if status != "Canceled":  # else its lines were the console's last
            self.console.update(tally, pace=self.pace, forecast=estimate)
        if snap is None:
            return
        self._last = now_
        self.logs.overview(snap)
        if self.client is not None:
            publish(self.client, self.run_id, snap)

    def cost_lines(self, seconds: float) -> list[str]:
        """``job_result.txt``'s forecast made as the pilot ended, and the
        job's actual cost over ``seconds``."""
        if self.forecast is None:  # it never reached its run phase
            return []
        return self.forecast.lines(seconds, self.tally.busy)


def _write_report(run_dir: Path) -> Path | None:
    """``logs/report.html`` (:mod:`daskrun.monitoring.report`); a report that cannot
    be written never fails the job."""
    try:
        return write_report(run_dir)
    except Exception as e:
        logger.warning("run %s: no report.html: %s", run_dir.name, e)
        return None


def _user_frame(traceback: str | None, user: str) -> str | None:
    """``file, line N, in fn`` of the innermost frame of a traceback in the
    user's own files: ``user``, the source directory or the entry script.
    The innermost frame of all where none is the user's."""
    if not traceback:
        return None
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', traceback)
    if not frames:
        return None
    own = [f for f in frames if f[0] == user or f[0].startswith(user + os.sep)]
    path, line, fn = (own or frames)[-1]
    return f"{path}, line {line}, in {fn}"
