"""How long a job will take, and what it will cost, told once its pilot is over.

The pilot is the first tenth of the mini-batches a run (or a resumed
attempt) has left, and at least one per worker thread, so that every
thread has reported at least once. Until then no figure is shown: start-up
and ``init()`` say nothing of the run phase's pace, and the first results
are those of the first wave alone.

Once the pilot is over, the job's predicted wall time is

* the time already spent (start-up, ``init()`` and the pilot: measured, not
  predicted), plus
* the mini-batches left at the run phase's pace: the mean seconds a
  mini-batch took on its worker (reading it, ``run()``, writing its part),
  every try of it counted (a failed try that is retried, the pieces of a
  mini-batch whose failed items are isolated: :attr:`daskrun.engine.runner.Tally.busy`),
  shared over the worker threads. Not the
  wall rate of the pilot: results come a task at a time, a task carries
  several mini-batches, and the first tasks carry one, so over a short pilot
  it reads slow by half; plus
* the tail: the last mini-batches cannot be shared, so at least one
  mini-batch's time remains while any is left.

What follows the last result (assembling the output, stopping the cluster)
is not predicted: a fraction of a second on a local cluster
(``job_result.txt``'s ``seconds`` against ``last_result_seconds``).

Its cost is the reservation it holds: CPU-hours (the worker threads times
the wall time) on a local or shared cluster, node-hours (the batch jobs
times the wall time) on a batch queue. The forecast made as the pilot ends
is kept and written to ``job_result.txt`` next to the actual figures.

>>> f = Forecast(started=0.0, slots=2)
>>> f.begin(at=2.0, done=0, total=40)
>>> f.pilot
4
>>> f.update(at=2.2, done=3, total=40, ran=3, busy=0.3) is None  # in the pilot
True
>>> est = f.update(at=2.2, done=4, total=40, ran=4, busy=0.4)
>>> round(est.seconds, 1), est.unit        # 2.2 + 36 left × 0.1 s / 2
(4.0, 'CPU')
>>> f.made is est
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PILOT_SHARE = 0.1  # the pilot: this share of the mini-batches left


@dataclass(frozen=True)
class Estimate:
    """A forecast: the job's total wall ``seconds`` and its ``hours`` of
    ``unit`` (``"CPU"`` or ``"node"``), and what it was based on."""

    seconds: float
    hours: float
    unit: str
    basis: str

    def text(self) -> str:
        """``forecast 12 s total, 0.007 CPU-h``: for the progress line."""
        return f"forecast {self.figures()}"

    def figures(self) -> str:
        """``12 s total, 0.007 CPU-h``: for the overview's ``forecast:`` line."""
        return f"{self.seconds:.0f} s total, {self.hours:.3g} {self.unit}-h"


@dataclass
class Forecast:
    """The forecast of one job (one attempt of a resumed one).

    ``started``: the job's start on the ``time.perf_counter`` clock (every
    ``at`` is on it too); ``slots``: the worker threads; ``nodes``: the
    batch jobs on a batch queue (costs are then node-hours), else ``None``.
    Call :meth:`begin` as the run phase starts, then :meth:`update` as
    mini-batches finish.
    """

    started: float
    slots: int = 1
    nodes: int | None = None
    pilot: int = 1  # mini-batches of the run phase that make the pilot
    made: Estimate | None = None  # the forecast as the pilot ended
    _run_at: float | None = None
    _ready: float = 0.0  # seconds from the start to the run phase

    def begin(self, at: float, done: int, total: int) -> None:
        """The run phase starts at ``at`` with ``done`` of ``total``
        mini-batches finished (by an earlier attempt, on a resume)."""
        left = max(total - done, 0)
        self._run_at = at
        self._ready = at - self.started
        self.pilot = max(math.ceil(PILOT_SHARE * left), min(self.slots, left), 1)

    def update(
        self, at: float, done: int, total: int, ran: int, busy: float
    ) -> Estimate | None:
        """The forecast at ``at`` with ``done`` of ``total`` mini-batches
        finished; ``ran`` of them ran in this run phase, their workers busy
        for ``busy`` seconds (a resume also counts as done those an earlier
        attempt committed but did not report, which take no time now);
        ``None`` while the pilot lasts."""
        if self._run_at is None:
            return None
        if ran < self.pilot:
            return None
        left = max(total - done, 0)
        run_elapsed = max(at - self._run_at, 1e-9)
        per_run = busy / ran
        slots = max(self.slots, 1)
        rest = per_run * max(left / slots, 1.0) if left else 0.0
        elapsed = at - self.started
        seconds = elapsed + rest
        if self.nodes is None:
            hours, unit = slots * seconds / 3600, "CPU"
        else:
            hours, unit = self.nodes * seconds / 3600, "node"
        basis = (  # written once: this runs after every mini-batch
            f"{ran} mini-batches in {run_elapsed:.2f} s of run phase on {slots} "
            f"worker threads (run() {per_run:.3f} s each), {left} left, start-up "
            f"{self._ready:.2f} s"
            if self.made is None
            else ""
        )
        est = Estimate(seconds, hours, unit, basis)
        if self.made is None:
            self.made = est
        return est

    def lines(self, seconds: float, busy: float) -> list[str]:
        """``job_result.txt``'s lines: the forecast made as the pilot ended
        (none if it never did), and the actual cost of ``seconds`` of wall
        time, with ``busy`` seconds in ``run()``."""
        slots = max(self.slots, 1)
        actual = (
            [f"cpu_hours: {slots * seconds / 3600:.6f}"]
            if self.nodes is None
            else [f"node_hours: {self.nodes * seconds / 3600:.6f}"]
        )
        actual.append(f"busy_cpu_hours: {busy / 3600:.6f}")
        made = self.made
        if made is None:
            return actual
        unit = made.unit.lower()
        return [
            f"forecast_seconds_at_10pct: {made.seconds:.2f}",
            f"forecast_{unit}_hours: {made.hours:.6f}",
            f"forecast_basis: {made.basis}",
            *actual,
        ]
