"""Resources over time: each worker's CPU, memory and GPU, in ``logs/perf``.

A step's workers sample themselves every ``daskrun.resource-interval``
seconds (:class:`ResourceSampler`, started by the entry script's plugin
before ``init()``). A sample reads distributed's own system monitor
(``worker.monitor``), which each worker updates every
``distributed.admin.system-monitor.interval`` (0.5 s): the process's CPU %
and RSS, and, through NVML, its GPU's utilisation and memory where
``pynvml`` is importable and a GPU is present (distributed finds the GPU from
``CUDA_VISIBLE_DEVICES`` and handles MIG; without NVML the GPU fields are
empty). Each sample sums up the monitor's readings since the last one (mean
CPU, peak RSS), so a short peak between samples is not missed; it names the
mini-batch the worker was running and the worker's memory limit.

Samples travel as worker events (topic ``daskrun-<run id>-perf``), like the
watchdog's: the log folder is on the client and workers may be remote. The
client (:class:`PerfLog`) writes them to ``logs/perf/<agent>.csv``, keeps
each worker's peak RSS and mean CPU for ``job_result.txt``, and warns once
per worker whose RSS passes 80 % of its memory limit, naming the mini-batch
it was running. The dashboard page plots the same events from the
scheduler's event log (:mod:`daskrun.monitoring.dashboard`).
"""

from __future__ import annotations

import csv
import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tornado.ioloop import PeriodicCallback

from daskrun.backends.storage import private_folder, private_open

logger = logging.getLogger("daskrun")

PERF_COLUMNS = (
    "time",
    "cpu_percent",
    "rss_bytes",
    "memory_limit_bytes",
    "mini_batch",
    "gpu_utilization_percent",
    "gpu_memory_used_bytes",
    "gpu_memory_total_bytes",
)
# a worker's RSS beyond this share of its memory limit is warned about once;
# distributed pauses the worker at 80 % and restarts it at 95 % by default
MEMORY_WARNING = 0.8
INIT = -1  # the plugin watchdog's index for init()
_MIB = 2**20


def perf_topic(run_id: str) -> str:
    """The worker-event topic of a run's resource samples.

    >>> perf_topic("score_20260101T000000_abc123")
    'daskrun-score_20260101T000000_abc123-perf'
    """
    return f"daskrun-{run_id}-perf"


def summarize(readings: Mapping[str, Iterable[float | None]]) -> dict[str, Any]:
    """One sample from a system monitor's readings since the last sample:
    the mean CPU %, the peak RSS, the mean GPU utilisation and the peak GPU
    memory used; ``None`` for what was not measured (no GPU).

    >>> summarize({"cpu": [10.0, 30.0], "memory": [5, 9, 7]})
    {'cpu': 20.0, 'rss': 9, 'gpu': None, 'gpu_memory': None, 'gpu_memory_total': None}
    >>> summarize({"cpu": [50.0], "memory": [1], "gpu_utilization": [None, 40],
    ...            "gpu_memory_used": [3, 8], "gpu-memory-total": [16]})["gpu"]
    40.0
    """

    def seen(name: str) -> list[float]:
        return [v for v in readings.get(name, ()) if v is not None]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    def peak(values: list[float]) -> float | None:
        return max(values) if values else None

    totals = seen("gpu-memory-total")
    return {
        "cpu": mean(seen("cpu")),
        "rss": peak(seen("memory")),
        "gpu": mean(seen("gpu_utilization")),
        "gpu_memory": peak(seen("gpu_memory_used")),
        "gpu_memory_total": totals[-1] if totals else None,
    }


class ResourceSampler:
    """On a worker: a sample of its resources every ``interval`` seconds,
    sent as a worker event on ``topic``.

    It runs on the worker's event loop (a Tornado ``PeriodicCallback``, as
    distributed's own monitor does), which stays free while ``run()`` works
    in the task thread. A sample is also taken as it starts and as it
    stops. ``running()`` names what the worker is running: a
    mini-batch's index, ``-1`` for ``init()``, ``None`` for nothing.
    """

    def __init__(
        self,
        worker: Any,
        topic: str,
        agent: str,
        interval: float,
        running: Callable[[], int | None],
    ):
        self.worker, self.topic, self.agent = worker, topic, agent
        self.running = running
        self._count = worker.monitor.count
        self._callback = PeriodicCallback(self.sample, interval * 1000)
        self._callback.start()
        self.sample()  # every worker has a row, however short its job

    def sample(self) -> None:
        try:
            monitor = self.worker.monitor
            readings = monitor.range_query(start=self._count)
            self._count = monitor.count
            if not readings.get("cpu"):  # sampled faster than the monitor
                readings = {k: [v] for k, v in monitor.recent().items()}
            limit = getattr(self.worker.memory_manager, "memory_limit", None)
            self.worker.log_event(
                self.topic,
                {
                    # not "worker": the scheduler sets that to the address
                    "agent": self.agent,
                    "time": time.time(),
                    "index": self.running(),
                    "limit": int(limit or 0),
                    **summarize(readings),
                },
            )
        except Exception as e:  # monitoring must never fail a worker
            logger.debug("resource sample failed: %s", e)

    def stop(self) -> None:
        """Stop sampling, after a last sample of the time since the last
        (best effort: the client may already have stopped listening)."""
        self._callback.stop()
        self.sample()


@dataclass
class WorkerUsage:
    """What one worker used over a job, from its samples."""

    cpu_total: float = 0.0
    cpu_samples: int = 0
    peak_rss: float = 0.0
    limit: int = 0
    gpu_total: float = 0.0
    gpu_samples: int = 0
    peak_gpu_memory: float | None = None
    warned: bool = False

    def add(self, msg: Mapping[str, Any]) -> None:
        if msg.get("cpu") is not None:
            self.cpu_total += msg["cpu"]
            self.cpu_samples += 1
        self.peak_rss = max(self.peak_rss, msg.get("rss") or 0)
        self.limit = int(msg.get("limit") or 0)
        if msg.get("gpu") is not None:
            self.gpu_total += msg["gpu"]
            self.gpu_samples += 1
        if msg.get("gpu_memory") is not None:
            self.peak_gpu_memory = max(self.peak_gpu_memory or 0, msg["gpu_memory"])

    def lines(self, agent: str) -> list[str]:
        """``job_result.txt``'s lines about this worker."""
        cpu = self.cpu_total / self.cpu_samples if self.cpu_samples else 0.0
        lines = [
            f"peak_rss_mib.{agent}: {self.peak_rss / _MIB:.1f}",
            f"mean_cpu_percent.{agent}: {cpu:.1f}",
        ]
        if self.limit:
            lines.append(f"memory_limit_mib.{agent}: {self.limit / _MIB:.1f}")
        if self.gpu_samples:
            lines.append(
                f"mean_gpu_percent.{agent}: {self.gpu_total / self.gpu_samples:.1f}"
            )
        if self.peak_gpu_memory is not None:
            lines.append(
                f"peak_gpu_memory_mib.{agent}: {self.peak_gpu_memory / _MIB:.1f}"
            )
        return lines


def memory_warning(agent: str, rss: float, limit: int, doing: str) -> str:
    """The line about a worker whose RSS passed :data:`MEMORY_WARNING` of
    its memory limit.

    >>> line = memory_warning("worker-0", 85 * 2**20, 100 * 2**20,
    ...                       "mini-batch 3 (files a.png)")
    >>> print(line)  # doctest: +NORMALIZE_WHITESPACE
    daskrun: worker-0 uses 85% of its memory limit (RSS 85 MiB of 100 MiB)
    while running mini-batch 3 (files a.png); distributed pauses a worker at
    80% and restarts it at 95% (distributed.worker.memory.pause, .terminate):
    make run() hold less, or give workers more memory
    (daskrun.local-cluster.memory-limit)
    """
    return (
        f"daskrun: {agent} uses {100 * rss / limit:.0f}% of its memory limit "
        f"(RSS {rss / _MIB:.0f} MiB of {limit / _MIB:.0f} MiB) while running "
        f"{doing}; distributed pauses a worker at 80% and restarts it at 95% "
        "(distributed.worker.memory.pause, .terminate): make run() hold less, "
        "or give workers more memory (daskrun.local-cluster.memory-limit)"
    )


class PerfLog:
    """The client's side of the samples: ``<folder>/<agent>.csv``, each
    worker's usage for ``job_result.txt``, and the memory warning, said with
    ``say`` and kept in ``<folder>/warnings.txt``.

    :meth:`add` is the event handler (``client.subscribe_topic``); it runs
    on the client's event loop, and :meth:`lines` and :meth:`close` on the
    job's thread. ``describe(index)`` names a mini-batch, e.g.
    ``mini-batch 3 (files a.png)``.
    """

    def __init__(
        self,
        folder: Path,
        say: Callable[[str], None],
        describe: Callable[[int], str] = lambda i: f"mini-batch {i}",
    ):
        self.folder, self.say, self.describe = folder, say, describe
        self.usage: dict[str, WorkerUsage] = {}
        self._files: dict[str, tuple[IO[str], Any]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def add(self, event: tuple[float, Mapping[str, Any]]) -> None:
        """One sample (a worker event: ``(time, message)``)."""
        msg = event[1]
        try:
            with self._lock:
                if self._closed:
                    return
                agent = str(msg["agent"])
                usage = self.usage.setdefault(agent, WorkerUsage())
                usage.add(msg)
                self._writer(agent).writerow(_row(msg))
                self._files[agent][0].flush()
                rss, limit = msg.get("rss") or 0, int(msg.get("limit") or 0)
                if limit and rss > MEMORY_WARNING * limit and not usage.warned:
                    usage.warned = True
                    self._warn(memory_warning(agent, rss, limit, self._doing(msg)))
        except Exception as e:  # monitoring must never fail a job
            logger.debug("resource sample not logged: %s", e)

    def _doing(self, msg: Mapping[str, Any]) -> str:
        index = msg.get("index")
        if index is None:
            return "no mini-batch"
        return "init()" if index == INIT else self.describe(int(index))

    def _warn(self, line: str) -> None:
        with private_open(
            self.folder / "warnings.txt", "a", errors="backslashreplace"
        ) as f:
            f.write(line + "\n")
        self.say(line)

    def _writer(self, agent: str) -> Any:
        found = self._files.get(agent)
        if found is None:
            private_folder(self.folder)
            path = self.folder / f"{agent}.csv"
            new = not path.exists()  # a resume appends to an earlier attempt's
            f = private_open(path, "a", newline="")  # closed in close()
            writer = csv.writer(f)
            if new:
                writer.writerow(PERF_COLUMNS)
            found = self._files[agent] = (f, writer)
        return found[1]

    def lines(self) -> list[str]:
        """Each worker's peak RSS and mean CPU (and GPU use, where measured)
        over this attempt, as ``job_result.txt`` lines."""
        with self._lock:
            return [
                line
                for agent, usage in sorted(self.usage.items())
                for line in usage.lines(agent)
            ]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for f, _ in self._files.values():
                f.close()


def _row(msg: Mapping[str, Any]) -> list[Any]:
    def number(value: Any, digits: int = 1) -> Any:
        return "" if value is None else round(value, digits)

    index = msg.get("index")
    when = datetime.datetime.fromtimestamp(msg["time"], datetime.timezone.utc)
    return [
        when.isoformat(timespec="milliseconds"),
        number(msg.get("cpu")),
        int(msg.get("rss") or 0),
        int(msg.get("limit") or 0),
        "" if index is None else ("init" if index == INIT else index),
        number(msg.get("gpu")),
        "" if msg.get("gpu_memory") is None else int(msg["gpu_memory"]),
        "" if msg.get("gpu_memory_total") is None else int(msg["gpu_memory_total"]),
    ]
