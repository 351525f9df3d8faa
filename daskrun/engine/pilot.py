"""The job's side of ``"auto"`` sizes (:mod:`daskrun.engine.auto`): what is chosen
before planning, the pilot's measurements, and the choice of the rest.

:class:`AutoSizes` chooses the ``pilot`` and ``mini_batch_size`` the job
plans with (the description's, unless ``"auto"``; the description is a
frozen value, never written), and resolves ``process_count_per_node="auto"``
before the cluster starts; :class:`PilotFeed` hands the runner the pilot's
mini-batches and then the rest's, planned once enough of the pilot is
measured. A resumed run's recorded choice
(``JobDescription.auto_recorded``) is taken as it is, so the resume plans
what the run planned.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from typing import Any

import psutil
from dask.utils import parse_bytes

from daskrun.backends.compute.cluster import cpu_cores, default_process_count, gpu_count
from daskrun.engine.auto import (
    AUTO,
    AutoChoice,
    choose_mini_batch_size,
    choose_process_count,
    choose_table_size,
    worker_memory,
)
from daskrun.engine.config import config_get
from daskrun.engine.description import JobDescription
from daskrun.engine.plugin import TryResult


class AutoSizes:
    """The ``"auto"`` choices of one job (none where nothing is ``"auto"``)."""

    def __init__(self, described: JobDescription, cfg: Any):
        recorded = AutoChoice.from_dict(dict(described.auto_recorded))
        self.choice: AutoChoice | None = None
        self.pilot_pending = False
        self.processes: int | None = cfg.process_count_per_node
        # seconds per item of the pilot's mini-batches: a worker's first
        # (cold: imports, caches, a model's first call) and later ones (warm)
        self._cold: list[float] = []
        self._warm: list[float] = []
        self._seen: set[str] = set()  # workers with an outcome of the pilot
        self._rss0: dict[str, int] = {}
        self._feed: PilotFeed | None = None
        self._pilot_count = 0  # the pilot's mini-batches, if it runs
        # what the job plans with: the description's, until "auto" chooses
        # (no pilot unless it does)
        self.mini_batch_size: int = described.mini_batch_size
        self.pilot: int = 0
        if cfg.process_count_per_node == AUTO:
            self.processes = recorded.process_count_per_node or choose_process_count(
                cpu_cores(),
                gpu_count(),
                psutil.virtual_memory().total,
                parse_bytes(str(config_get("auto.process-memory"))),
            )
            self.choice = AutoChoice(process_count_per_node=self.processes)
        if cfg.mini_batch_size != AUTO:
            return
        base = self.choice or AutoChoice()
        if not described.input_type.pilots:  # tables: sized from their bytes
            size = recorded.mini_batch_size or self._table_size(described, cfg)
            self.mini_batch_size = size
            self.choice = AutoChoice(
                mini_batch_size=size,
                process_count_per_node=base.process_count_per_node,
                basis=f"{size / (1 << 20):.3g} MiB: the largest that leaves 4 "
                "mini-batches per process, within 1-64 MiB and 1/16 of a "
                "process's memory, each file cut evenly; no pilot",
            )
        elif recorded.mini_batch_size:  # the pilot ran: plan as the run did
            self.pilot = recorded.pilot_mini_batches
            self.mini_batch_size = recorded.mini_batch_size
            self.choice = recorded
        else:
            self.pilot = self._pilot_count = int(config_get("auto.pilot-mini-batches"))
            self.mini_batch_size = described.input_type.size_of(None)
            self.pilot_pending = self.pilot > 0
            self.choice = base

    def _table_size(self, described: JobDescription, cfg: Any) -> int:
        sizes = [size for ds in described.inputs for _, size, _ in ds.stamps()]
        per_node = self.processes or default_process_count()
        memory = psutil.virtual_memory().total / per_node
        return choose_table_size(
            sizes, processes=cfg.node_count * per_node, memory_limit=memory
        )

    def lines(self) -> list[str]:
        """``job_result.txt``'s line about the choice, if any."""
        if self.choice is None:
            return []
        return [self.choice.line().removeprefix("daskrun: ")]

    def before_pilot(self, client: Any) -> None:
        """Each worker's RSS after ``init()``, to measure the pilot's growth."""
        if self.pilot_pending:
            self._rss0 = {w: rss for w, (rss, _) in client.run(worker_memory).items()}

    def feed(
        self, pilot: Iterator[Any], rest: Callable[[], Iterator[Any]], tally: Any
    ) -> PilotFeed:
        """The run's mini-batches for the runner: ``pilot``'s, then those of
        ``rest()`` (which chooses and plans them) once enough are measured."""
        needed = int(config_get("auto.pilot-results"))
        self._feed = PilotFeed(pilot, rest, tally, needed)
        return self._feed

    def observe(self, result: TryResult) -> None:
        """A mini-batch's outcome; of the pilot, its seconds per item, warm
        if its worker had one before (a first try pays one-off costs)."""
        pilot = result.index < self._pilot_count
        warm = result.worker in self._seen
        if pilot and self.pilot_pending:
            self._seen.add(result.worker)
            if result.ok and result.items_in:
                (self._warm if warm else self._cold).append(
                    result.seconds / result.items_in
                )
        if self._feed is not None:
            self._feed.outcome(pilot, warm)

    def choose(
        self, client: Any, init_seconds: float | None, items_left: int
    ) -> AutoChoice:
        """The size of the rest of the plan, from the pilot's measurements;
        sets :attr:`mini_batch_size`."""
        after = client.run(worker_memory)
        workers = sum(client.nthreads().values()) or 1
        growth = max(
            (rss - self._rss0.get(w, rss) for w, (rss, _) in after.items()),
            default=0,
        )
        per_worker = max(1.0, self.pilot / max(1, len(after)))
        free = [limit - rss for rss, limit in after.values() if limit]
        measured = self._warm or self._cold
        item_seconds = statistics.median(measured) if measured else None
        size = self.mini_batch_size  # no measurement: the default stays
        if item_seconds is not None:
            size = choose_mini_batch_size(
                item_seconds,
                items_left=items_left,
                workers=workers,
                target_seconds=float(config_get("auto.target-seconds")),
                largest=int(config_get("auto.max-files")),
                item_bytes=max(0, growth) / per_worker,
                memory_free=min(free) if free else None,
            )
        self.mini_batch_size = size
        self.pilot_pending = False
        self.choice = AutoChoice(
            mini_batch_size=size,
            pilot_mini_batches=self.pilot,
            process_count_per_node=(self.choice or AutoChoice()).process_count_per_node,
            item_seconds=item_seconds,
            init_seconds=init_seconds,
            process_memory=max((rss for rss, _ in after.values()), default=None),
            basis="" if item_seconds is not None else "no pilot result: the default",
        )
        return self.choice


class PilotFeed:
    """The mini-batches of a run with a pilot, as the runner takes them,
    without a barrier: the pilot's one-file mini-batches, then the rest,
    planned at the chosen size as soon as ``needed`` warm outcomes of the
    pilot are in (from a worker that had one before: a worker's first try
    pays one-off costs, a model's first call say), or all of them, while the
    rest of the pilot still runs.

    The runner groups mini-batches into tasks by the time it has measured
    per mini-batch, and it has measured the pilot's one-file ones: it would
    put many of the rest's, each far larger, into one task, and leave
    workers idle. So the rest is planned by the outcome that makes
    ``needed`` (:meth:`outcome`, from the job's ``on_done``), before the
    runner next tops up (it sizes tasks from the plan's new total), and
    until an outcome of the rest is in, the feed hands out one mini-batch
    of the rest per outcome.

    When it has nothing to hand out for now (too few outcomes, or one of the
    rest is out since the last outcome), the feed ends: the runner marks
    everything scheduled and waits on what is in flight, and the next outcome
    that lets it go on marks it unscheduled again (``tally.all_scheduled``);
    the runner tops up after every result, so it asks again.
    """

    def __init__(
        self,
        pilot: Iterator[Any],
        rest: Callable[[], Iterator[Any]],
        tally: Any,
        needed: int,
    ):
        self._pilot: Iterator[Any] | None = pilot
        self._plan_rest: Callable[[], Iterator[Any]] | None = rest
        self._rest: Iterator[Any] = iter(())
        self._tally = tally
        self.needed = max(1, needed)
        self.handed = 0  # the pilot's mini-batches handed out
        self.done = 0  # of them, with an outcome
        self.warm = 0  # of those, from a worker that had one before
        self.probing = True  # no outcome of the rest yet
        self._given = 0  # of the rest, handed out since the last outcome
        self.waiting = False

    def __iter__(self) -> PilotFeed:
        return self

    def __next__(self) -> Any:
        if self._pilot is not None:
            batch = next(self._pilot, None)
            if batch is not None:
                self.handed += 1
                return batch
            self._pilot = None  # all out (a resume may have none to run)
        if self._plan_rest is not None and self._enough():
            self._start_rest()
        if self._plan_rest is not None or (self.probing and self._given):
            self.waiting = True
            raise StopIteration  # for now: outcome() wakes the runner
        batch = next(self._rest)  # the rest's end is the end
        self._given += 1
        return batch

    def _enough(self) -> bool:
        return self.warm >= self.needed or (
            self._pilot is None and self.done >= self.handed
        )

    def _start_rest(self) -> None:
        if self._plan_rest is not None:
            plan_rest, self._plan_rest = self._plan_rest, None
            self._rest = plan_rest()

    def outcome(self, pilot: bool, warm: bool = False) -> None:
        """A mini-batch has its outcome: one of the ``pilot`` (``warm`` if
        its worker had one before), or of the rest."""
        if pilot:
            self.done += 1
            self.warm += warm
        else:
            self.probing = False  # the runner has measured one of the rest
        self._given = 0
        if self._plan_rest is not None and self._enough():
            self._start_rest()
        if self.waiting and self._plan_rest is None:
            self.waiting = False
            self._tally.all_scheduled = False  # the runner asks again
