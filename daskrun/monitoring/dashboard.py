"""The daskrun page of the Dask dashboard: ``<dashboard>/daskrun``.

The client publishes a snapshot of the job about once a second as a
scheduler event (topic ``daskrun-progress``): counts, speed, ETA, each
worker's throughput and the latest errors. :func:`install_page` adds a small
web application to the scheduler's own HTTP server (the one serving the
Bokeh dashboard), so the page works on clusters daskrun started and on
clusters it was given. The page draws Bokeh plots of progress over time, of
throughput per worker, and of each worker's memory, CPU and (where NVML
measures one) GPU over time, from the workers' resource samples
(:mod:`daskrun.monitoring.resources`, events the scheduler keeps), refreshed every two
seconds; BokehJS is served
inline, so the page needs no network.

The page and its plots answer only requests that carry the scheduler's
token (``/daskrun?token=…``, as Jupyter's links do), made when the page is
installed and known only to clients of the scheduler: the link daskrun
prints carries it, a request without it gets 403. Another user on the host
can reach the dashboard's port, not the job's progress and errors.

On the local cluster daskrun starts, Dask's own Bokeh dashboard is connected
on first visit (:func:`serve_dashboard_on_demand`): importing Bokeh takes half
a second of the client's CPU before any worker could start, and most batch
jobs are never watched.
"""

from __future__ import annotations

import hmac
import html
import json
import secrets
import time
from typing import Any
from urllib.parse import urljoin

from tornado import web

from daskrun.monitoring.resources import perf_topic

TOPIC = "daskrun-progress"
REFRESH_MS = 2000
# the latest samples of each worker plotted: a long job's page stays small
PLOTTED_SAMPLES = 600


def publish(client: Any, run_id: str, snapshot: dict[str, Any]) -> None:
    """Send one snapshot of a job to the scheduler (best effort)."""
    try:
        client.log_event(TOPIC, {"run_id": run_id, "time": time.time(), **snapshot})
    except Exception:  # monitoring must never fail a job
        pass


def install_page(client: Any, dashboard_link: str) -> str | None:
    """Serve the daskrun page from the scheduler; return its URL with the
    scheduler's token (``<dashboard>/daskrun?token=…``), or None when the
    scheduler cannot (no dashboard, or daskrun not installed there)."""
    try:
        token = client.run_on_scheduler(_install)
    except Exception:
        return None
    if not token:
        return None
    return f"{urljoin(dashboard_link, 'daskrun')}?token={token}"


def _install(dask_scheduler: Any) -> str | None:
    """Add the page's routes to the scheduler's HTTP server, once; its
    token."""
    app = getattr(dask_scheduler, "http_application", None)
    if app is None:
        return None
    token: str | None = getattr(dask_scheduler, "_daskrun_page_token", None)
    if token is None:
        token = secrets.token_urlsafe(32)
        routes = [
            (r"/daskrun/?", PageHandler, {"scheduler": dask_scheduler, "token": token}),
            (
                r"/daskrun/plots",
                PlotsHandler,
                {"scheduler": dask_scheduler, "token": token},
            ),
        ]
        app.add_application(web.Application(routes))
        dask_scheduler._daskrun_page_token = token
    return token


def serve_dashboard_on_demand(client: Any) -> None:
    """Connect Dask's dashboard to the scheduler's HTTP server on the first
    request for one of its pages, for a scheduler started with
    ``dashboard=False``; the link stays the same."""
    client.run_on_scheduler(_install_on_demand)


def _install_on_demand(dask_scheduler: Any) -> None:
    routing = dask_scheduler.http_application
    loader = web.Application()
    # every path but the daskrun page's, which may be added later
    loader.add_handlers(
        ".*$",
        [
            (
                r"/(?!daskrun(?:/|$)).*",
                _ConnectDashboard,
                {"scheduler": dask_scheduler, "loader": loader},
            )
        ],
    )
    routing.add_application(loader)


class _ConnectDashboard(web.RequestHandler):
    """Connects the dashboard once, then sends the browser to the page it
    asked for, which the dashboard now serves."""

    def initialize(self, scheduler: Any, loader: web.Application) -> None:
        self.scheduler = scheduler
        self.loader = loader

    def get(self) -> None:
        routing = self.scheduler.http_application
        if self.loader in routing.applications:  # the first request
            routing.applications.remove(self.loader)
            try:
                from distributed.dashboard.scheduler import connect
            except ImportError:
                self.set_status(503)
                self.write("Dask's dashboard needs Bokeh: pip install bokeh")
                return
            connect(routing, self.scheduler.http_server, self.scheduler, prefix="/")
        self.redirect(self.request.uri)


def _history(scheduler: Any) -> list[dict[str, Any]]:
    """The snapshots of the latest job."""
    events = [msg for _, msg in scheduler.get_events(TOPIC)]
    if not events:
        return []
    latest = events[-1]["run_id"]
    return [e for e in events if e["run_id"] == latest]


def _samples(scheduler: Any, run_id: str) -> dict[str, list[dict[str, Any]]]:
    """The latest resource samples of a job, by worker."""
    found: dict[str, list[dict[str, Any]]] = {}
    for _, msg in scheduler.get_events(perf_topic(run_id)):
        found.setdefault(str(msg.get("agent")), []).append(msg)
    return {agent: found[agent][-PLOTTED_SAMPLES:] for agent in sorted(found)}


class PageHandler(web.RequestHandler):
    def initialize(self, scheduler: Any, token: str) -> None:
        self.scheduler = scheduler
        self.token = token

    def prepare(self) -> None:
        given = self.get_query_argument("token", "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            self.set_status(403)
            self.set_header("Content-Type", "text/plain")
            wrong = f"token={given!r} is not this job's" if given else "no token"
            self.finish(
                f"{wrong}: open the page at the link daskrun printed "
                "('this job: .../daskrun?token=...')\n"
            )

    def get(self) -> None:
        # the job's state as it is now, drawn at first paint; then refreshed
        self.write(_page(_current(self.scheduler)))


class PlotsHandler(PageHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(_current(self.scheduler)))


def _current(scheduler: Any) -> dict[str, Any]:
    """The latest job's summary and plots (``{"run_id": None}`` before any)."""
    history = _history(scheduler)
    perf = _samples(scheduler, history[-1]["run_id"]) if history else {}
    return _plots(history, perf)


def _page(data: dict[str, Any]) -> str:
    """The page, showing ``data`` (:func:`_plots`) before any script runs."""
    from bokeh.resources import INLINE

    run = html.escape(data["run_id"] or "waiting for a job…")
    summary = data.get("summary", "")
    errors = data.get("errors", "<li>none</li>")
    # inside <script>: no "</" may close it early
    first = json.dumps(data).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>daskrun job</title>
{INLINE.render_js()}
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
#summary td {{ padding: 0 1em 0 0; }}
.plots {{ display: flex; gap: 1em; flex-wrap: wrap; }}
#errors li {{ color: #a00; font-family: monospace; }}
</style></head>
<body>
<h2>daskrun: <span id="run">{run}</span></h2>
<table id="summary">{summary}</table>
<div class="plots"><div id="progress"></div><div id="workers"></div></div>
<h3>Resources per worker</h3>
<div class="plots"><div id="memory"></div><div id="cpu"></div><div id="gpu"></div></div>
<h3>Latest errors</h3><ul id="errors">{errors}</ul>
<script>
async function draw(data) {{
  if (!data.run_id) return;
  document.getElementById("run").textContent = data.run_id;
  document.getElementById("summary").innerHTML = data.summary;
  document.getElementById("errors").innerHTML = data.errors;
  for (const name of ["progress", "workers", "memory", "cpu", "gpu"]) {{
    if (!data[name]) continue;
    const el = document.getElementById(name);
    el.innerHTML = "";
    await Bokeh.embed.embed_item(data[name], name);
    el.dataset.rendered = "1";
  }}
}}
async function refresh() {{
  const here = location.pathname;
  const reply = await fetch(
    (here.endsWith("/") ? here : here + "/") + "plots" + location.search);
  await draw(await reply.json());
}}
draw({first});
setInterval(refresh, {REFRESH_MS});
</script></body></html>"""


def _plots(
    history: list[dict[str, Any]], perf: dict[str, list[dict[str, Any]]] | None = None
) -> dict[str, Any]:
    from bokeh.embed import json_item

    if not history:
        return {"run_id": None}
    last = history[-1]
    t0 = history[0]["time"] - history[0]["elapsed"]
    plots = {
        "run_id": last["run_id"],
        "summary": summary_html(last),
        "errors": errors_html(last["latest_errors"]),
        "progress": json_item(progress_figure(history)),
        "workers": json_item(workers_figure(last["workers"])),
    }
    for name, figure_ in resource_figures(perf or {}, t0).items():
        plots[name] = json_item(figure_)
    return plots


def progress_figure(history: list[dict[str, Any]]) -> Any:
    """Mini-batches done and failed over the job's seconds, from its
    snapshots (:meth:`daskrun.monitoring.monitor.JobLogs.snapshot`, with ``time``)."""
    from bokeh.models import ColumnDataSource, Range1d
    from bokeh.plotting import figure

    last = history[-1]
    t0 = history[0]["time"] - history[0]["elapsed"]
    source = ColumnDataSource(
        {
            "t": [e["time"] - t0 for e in history],
            "done": [e["mini_batches_done"] for e in history],
            "failed": [e["mini_batches_failed"] for e in history],
        }
    )
    progress = figure(
        title=f"Mini-batches done of {last['mini_batches_total']}",
        width=520,
        height=320,
        x_axis_label="seconds",
        y_range=Range1d(start=0, end=max(1, last["mini_batches_total"])),
        tools="",
        toolbar_location=None,
    )
    progress.line("t", "done", source=source, line_width=2, legend_label="done")
    progress.line(
        "t",
        "failed",
        source=source,
        line_width=2,
        color="firebrick",
        legend_label="failed",
    )
    progress.legend.location = "top_left"
    return progress


def workers_figure(workers: dict[str, dict[str, Any]]) -> Any:
    """Each worker's items/s in ``run()``, as bars."""
    from bokeh.models import FactorRange, Range1d
    from bokeh.plotting import figure

    names = list(workers) or ["-"]
    rates = [workers.get(n, {}).get("items_per_second", 0.0) for n in names]
    plot = figure(
        title="Throughput per worker (items/s in run())",
        x_range=FactorRange(factors=names),
        width=520,
        height=320,
        tools="",
        toolbar_location=None,
    )
    plot.vbar(x=names, top=rates, width=0.7)
    plot.y_range = Range1d(start=0, end=max([*rates, 1.0]) * 1.1)
    return plot


def summary_html(last: dict[str, Any]) -> str:
    """The rows of a snapshot's summary table, as HTML."""
    eta = last["eta_seconds"]
    rows = [
        ("status", last["status"]),
        (
            "mini-batches",
            f"{last['mini_batches_done']}/{last['mini_batches_total']} done, "
            f"{last['mini_batches_failed']} failed",
        ),
        ("items", f"{last['items_succeeded']} ok, {last['items_failed']} failed"),
        ("speed", f"{last['items_per_second']:.1f} items/s"),
        ("elapsed", f"{last['elapsed']:.0f} s"),
        ("ETA", "-" if eta is None else f"{eta:.0f} s"),
    ]
    rows += [
        (
            name,
            f"{w['mini_batches']} mini-batches, {w['items']} items, "
            f"{w['items_per_second']:.1f} items/s",
        )
        for name, w in last["workers"].items()
    ]
    return "".join(
        f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(str(v))}</td></tr>"
        for k, v in rows
    )


def errors_html(errors: list[str]) -> str:
    """Error lines as HTML list items (``none`` when there are none)."""
    return "".join(f"<li>{html.escape(e)}</li>" for e in errors) or "<li>none</li>"


def resource_figures(
    perf: dict[str, list[dict[str, Any]]], t0: float
) -> dict[str, Any]:
    """Line plots of each worker's RSS (its memory limit dashed), CPU %
    and, where measured, GPU utilisation, over the job's seconds."""
    from bokeh.models import Range1d
    from bokeh.palettes import Category10_10
    from bokeh.plotting import figure

    if not perf:
        return {}
    plots = {}
    specs = [
        ("memory", "Memory per worker (RSS, MiB; dashed: limit)", "rss", 2**20),
        ("cpu", "CPU per worker (%)", "cpu", 1),
        ("gpu", "GPU utilisation per worker (%)", "gpu", 1),
    ]
    for name, title, field, scale in specs:
        if not any(m.get(field) is not None for ms in perf.values() for m in ms):
            continue  # no GPU measured
        plot = figure(
            title=title,
            width=520 if name != "gpu" else 400,
            height=280,
            x_axis_label="seconds",
            tools="",
            toolbar_location=None,
        )
        top, limit = 1.0, 0.0
        for i, (agent, samples) in enumerate(perf.items()):
            color = Category10_10[i % 10]
            kept = [m for m in samples if m.get(field) is not None]
            t = [m["time"] - t0 for m in kept]
            y = [m[field] / scale for m in kept]
            plot.line(t, y, line_width=2, color=color, legend_label=agent)
            top = max([top, *y])
            limits = [m.get("limit") or 0 for m in kept]
            if name == "memory" and t and limits[-1]:
                limit = max(limit, limits[-1] / scale)
                plot.line(
                    t, [v / scale for v in limits], color=color, line_dash="dashed"
                )
        if name != "memory":
            end = max(top * 1.1, 100.0)
        else:  # a limit far above what is used would flatten the lines
            end = limit * 1.05 if 0 < limit <= 2 * top else top * 1.3
        plot.y_range = Range1d(start=0, end=end)
        plot.legend.location = "bottom_right"
        plots[name] = plot
    return plots
