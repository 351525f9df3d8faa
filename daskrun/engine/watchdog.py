"""Bounding a worker's ``init()`` and ``run()``: a stuck one restarts its process.

:class:`Watchdog` is armed before each phase of a try (read, run, write) and
disarmed after; a phase that outlives ``run_invocation_timeout`` is reported
on the run's events topic and its worker process exits with
:data:`TIMEOUT_EXIT_CODE`, for the Nanny to restart it. The client's side is
:mod:`daskrun.engine.lost`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from daskrun.monitoring.resources import INIT

if TYPE_CHECKING:
    pass

logger = logging.getLogger("daskrun")

TIMEOUT_EXIT_CODE = 75


def init_timeout(run_invocation_timeout: float) -> float:
    """How long ``init()`` may take: ParallelRunStep's 3 × timeout + 30 s."""
    return 3 * run_invocation_timeout + 30


class Watchdog:
    """Stops a mini-batch whose reading, ``run()`` or writing outlives
    ``run_invocation_timeout``.

    Python cannot interrupt a thread stuck in C code, ``sleep`` or a blocking
    ``open()`` (a FIFO, a hung mount), and Dask has no task timeout, so the
    only sure stop is the process itself: the watchdog reports which
    mini-batch hung and in which phase (a worker event the client reads),
    then exits the worker process, and the Nanny starts a fresh one, whose
    plugin runs ``init()`` again.
    """

    def __init__(self, worker: Any, topic: str, agent: str, timeout: float):
        self.worker = worker
        self.topic = topic
        self.agent = agent
        self.timeout = timeout
        self._armed: tuple[int, float, str, int | None] | None = None
        self._stopped = threading.Event()
        threading.Thread(
            target=self._watch, name="daskrun-watchdog", daemon=True
        ).start()

    def arm(
        self,
        index: int,
        timeout: float | None = None,
        phase: str = "run",
        piece: int | None = None,
    ) -> None:
        """Watch mini-batch ``index`` (``INIT`` for ``init()``) in ``phase``:
        ``"read"`` (its inputs), ``"run"`` or ``"write"`` (its part);
        ``piece``: the first item of a piece of it being isolated."""
        self._armed = (
            index,
            time.monotonic() + (timeout or self.timeout),
            phase,
            piece,
        )

    def disarm(self) -> None:
        self._armed = None

    def running(self) -> int | None:
        """The mini-batch being run (``INIT`` for ``init()``), if any."""
        armed = self._armed
        return None if armed is None else armed[0]

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(0.1):
            armed = self._armed
            if armed is not None and time.monotonic() > armed[1]:
                self.worker.log_event(
                    self.topic,
                    {
                        "index": armed[0],
                        "worker": self.agent,
                        "cause": "init-timeout" if armed[0] == INIT else "timeout",
                        "phase": armed[2],
                        "piece": armed[3],
                    },
                )
                time.sleep(1.0)  # let the event reach the scheduler
                os._exit(TIMEOUT_EXIT_CODE)


def agent_label(name: object) -> str:
    """``worker-<name>`` for a worker named by a number, else its name.

    >>> agent_label(0), agent_label("3"), agent_label("gpu-node-a")
    ('worker-0', 'worker-3', 'gpu-node-a')
    """
    numbered = isinstance(name, int) or str(name).isdigit()
    return f"worker-{name}" if numbered else str(name)


def agent_name(worker: Any) -> str:
    """``worker-<name>`` for a worker, as ParallelRunStep names its agents;
    ``-gpu<n>`` is added for a worker pinned to GPU ``n`` (dask-cuda sets
    ``CUDA_VISIBLE_DEVICES`` with its own GPU first)."""
    agent = agent_label(worker.name)
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return f"{agent}-gpu{gpu}" if gpu and gpu != "-1" else agent
