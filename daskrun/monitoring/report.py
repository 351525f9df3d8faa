"""A job's report: ``logs/report.html``, kept after the job and its cluster.

The live page (:mod:`daskrun.monitoring.dashboard`) goes with the scheduler; this one
stays. It is built from the run's log folder alone, which daskrun writes
already redacted, so no credential reaches it, and the same folder builds
it again later (``daskrun runs report RUN_ID``):

* the summary: ``job_result.txt``'s lines;
* progress over time: the job's counts once a second
  (``sys/progress.csv``, :data:`daskrun.monitoring.monitor.HISTORY`), every attempt of
  a resumed run on one time axis;
* throughput per worker: items per second in ``run()``, from
  ``processed_mini-batches.csv``;
* CPU, memory and (where measured) GPU per worker over time: ``logs/perf``
  (:mod:`daskrun.monitoring.resources`);
* failures: ``job_error.txt``'s first lines and the failed inputs of
  ``failed_items.csv`` (the first :data:`FAILED_SHOWN`).

It is one HTML file with BokehJS inline (``bokeh.embed.file_html`` with
``INLINE`` resources), so it opens offline, from a mail or an archive.

>>> from pathlib import Path
>>> write_report(Path("no/such/run"))
Traceback (most recent call last):
...
daskrun.exceptions.ConfigError: no/such/run/logs is not a run's log folder ...
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import html
import importlib
import os
import sys
import threading
from pathlib import Path
from typing import Any

from daskrun.backends.storage import private_open
from daskrun.exceptions import ConfigError
from daskrun.monitoring.dashboard import (
    errors_html,
    progress_figure,
    resource_figures,
    workers_figure,
)
from daskrun.monitoring.monitor import (
    FAILED_ITEMS,
    HISTORY,
    REPORT,
    read_failed_items,
    read_report,
)
from daskrun.monitoring.resources import PERF_COLUMNS

REPORT_HTML = "report.html"
FAILED_SHOWN = 50  # failed inputs listed; the rest are in failed_items.csv


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/logs/report.html`` from the run's log folder (again,
    if it exists); its path."""
    logs = Path(run_dir) / "logs"
    if not (logs / "job_result.txt").is_file() and not (logs / REPORT).is_file():
        raise ConfigError(
            f"{logs} is not a run's log folder (no job_result.txt); give the "
            "run id of a run that has started (see 'daskrun runs list')"
        )
    page = render(logs)
    path = logs / REPORT_HTML
    tmp = logs / f".{REPORT_HTML}.tmp"
    with private_open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path


_BOKEH = (
    "bokeh.embed",
    "bokeh.layouts",
    "bokeh.models",
    "bokeh.palettes",
    "bokeh.plotting",
    "bokeh.resources",
)
_importing: list[threading.Thread] = []


def import_ahead() -> None:
    """Import the Bokeh modules :func:`render` uses in a thread of their
    own: a job calls this as ``init()`` starts, while its client mostly
    waits, and its report at the end takes 0.15 s instead of 0.5 s.
    :func:`render` waits for the thread before it imports anything, so no
    module is imported by both at once."""
    if _importing or "bokeh.plotting" in sys.modules:
        return
    thread = threading.Thread(
        target=_import_bokeh, name="daskrun-report-imports", daemon=True
    )
    _importing.append(thread)
    thread.start()


def _import_bokeh() -> None:
    for name in _BOKEH:
        with contextlib.suppress(Exception):  # render() raises it, if any
            importlib.import_module(name)


def render(logs: Path) -> str:
    """The report of the log folder ``logs``, as one HTML page."""
    for thread in _importing:
        thread.join()
    from bokeh.embed import file_html
    from bokeh.layouts import column, row
    from bokeh.models.widgets import Div
    from bokeh.resources import INLINE

    result = _result(logs / "job_result.txt")
    history = _history(logs / HISTORY)
    t0 = history[0]["time"] - history[0]["elapsed"] if history else None
    perf = _perf(logs / "perf")
    if t0 is None:
        t0 = min((m["time"] for ms in perf.values() for m in ms), default=0.0)
    title = f"daskrun: {result.get('run_id', logs.parent.name)}"
    parts: list[Any] = [
        Div(text=f"<h2>{html.escape(title)}</h2>{_table(_headline(result))}")
    ]
    plots = []
    if history:
        plots.append(progress_figure(history))
    workers = _workers(logs / REPORT)
    if workers:
        plots.append(workers_figure(workers))
    if plots:
        parts.append(row(*plots))
    resources = list(resource_figures(perf, t0).values())
    if resources:
        parts += [Div(text="<h3>Resources per worker</h3>"), row(*resources)]
    parts.append(Div(text=_failures(logs), width=1050))
    parts.append(Div(text=f"<h3>job_result.txt</h3>{_table(result.items())}"))
    return str(file_html(column(*parts), INLINE, title))


def _headline(result: dict[str, str]) -> list[tuple[str, str]]:
    """The summary's first lines: how the job ended, in words."""
    get = result.get
    rows = [
        ("status", get("status", "-")),
        (
            "mini-batches",
            f"{get('mini_batches_total', '-')} in all, "
            f"{get('mini_batches_failed', '0')} failed",
        ),
        (
            "items",
            f"{get('items_succeeded', '-')} ok, {get('items_failed', '0')} failed"
            + (f", {get('items_not_run')} not run" if get("items_not_run") else "")
            + f" of {get('items_total', '-')} ({get('items_counted', '')})",
        ),
        ("seconds", get("seconds", "-")),
        ("output", get("output", "-")),
    ]
    if get("error"):
        rows.append(("error", str(get("error"))))
    return rows


def _result(path: Path) -> dict[str, str]:
    """``job_result.txt`` as ``{name: value}``, in its order."""
    if not path.is_file():
        return {"status": "Running (no job_result.txt yet)"}
    found: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        name, sep, value = line.partition(": ")
        if sep:
            found[name] = value
    return found


def _history(path: Path) -> list[dict[str, Any]]:
    """The snapshots of ``sys/progress.csv``, as the dashboard keeps them."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [
            {
                "time": float(r["time"]),
                "status": r["status"],
                "elapsed": float(r["elapsed"]),
                "mini_batches_done": int(r["mini_batches_done"]),
                "mini_batches_total": int(r["mini_batches_total"]),
                "mini_batches_failed": int(r["mini_batches_failed"]),
            }
            for r in csv.DictReader(f)
        ]


def _perf(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """``logs/perf/<worker>.csv`` as the samples the dashboard plots."""

    def number(text: str | None) -> float | None:
        return float(text) if text else None

    found: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.csv")) if folder.is_dir() else ():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or set(PERF_COLUMNS) - set(rows[0]):
            continue
        found[path.stem] = [
            {
                "time": datetime.datetime.fromisoformat(r["time"]).timestamp(),
                "cpu": number(r["cpu_percent"]),
                "rss": number(r["rss_bytes"]),
                "limit": number(r["memory_limit_bytes"]),
                "gpu": number(r["gpu_utilization_percent"]),
            }
            for r in rows
        ]
    return found


def _workers(path: Path) -> dict[str, dict[str, Any]]:
    """Each worker's items ok per second in ``run()``, from the job report
    (an earlier attempt's rows, run before this one, are kept there too)."""
    items: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for finished in read_report(path):
        worker = finished.row["worker"]
        if not worker or worker == "earlier attempt":
            continue
        items[worker] = items.get(worker, 0) + int(finished.row["items_ok"] or 0)
        seconds[worker] = seconds.get(worker, 0.0) + float(finished.row["seconds"] or 0)
    return {
        w: {"items_per_second": items[w] / seconds[w] if seconds[w] else 0.0}
        for w in sorted(items)
    }


def _failures(logs: Path) -> str:
    """The failure's cause and the failed inputs, as HTML."""
    text = "<h3>Failures</h3>"
    error = logs / "job_error.txt"
    if error.is_file():
        head = error.read_text(errors="replace").strip().splitlines()[:12]
        text += f"<pre>{html.escape(chr(10).join(head))}</pre>"
    failed = read_failed_items(logs / FAILED_ITEMS)
    if not failed and not error.is_file():
        return text + "<ul><li>none</li></ul>"
    shown = [
        f"mini-batch {r['index']}: {r['input']}: {r['error'].splitlines()[0]}"
        if r["error"]
        else f"mini-batch {r['index']}: {r['input']}"
        for r in failed[:FAILED_SHOWN]
    ]
    text += f"<ul>{errors_html(shown)}</ul>" if failed else ""
    if len(failed) > FAILED_SHOWN:
        text += (
            f"<p>and {len(failed) - FAILED_SHOWN} more, in "
            f"{html.escape(str(logs / FAILED_ITEMS))}</p>"
        )
    return text


def _table(rows: Any) -> str:
    return (
        "<table>"
        + "".join(
            f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>"
            for k, v in rows
        )
        + "</table>"
    )
