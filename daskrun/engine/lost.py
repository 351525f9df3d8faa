"""Tasks lost with their workers: why, and which tries are charged.

:func:`judge_lost_task` (pure) decides which tries of a lost task count;
:class:`LostTasks` reads why a worker died (its watchdog's timeout event, a
memory kill, a hung ``init()``); :class:`FrozenWorkers` restarts a worker
that stopped answering beyond its bound; :class:`NoProgress` cancels a job
that finishes nothing for too long. The runner
(:mod:`daskrun.engine.runner`) uses them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from distributed import Client

from daskrun.backends.inputs.datasets import MiniBatch, SubBatch
from daskrun.engine.config import config_get
from daskrun.engine.plugin import TryResult
from daskrun.engine.watchdog import agent_label, init_timeout

logger = logging.getLogger("daskrun")


class Interrupting(Protocol):
    """What :class:`NoProgress` needs of the runner's
    :class:`~daskrun.engine.runner.Interrupt`."""

    reason: str | None

    def trigger(self, reason: str, canceled: bool = False) -> None: ...


def _lost_try(
    batch: MiniBatch, try_no: int, error: str, worker: str = "unknown worker"
) -> TryResult:
    return TryResult(
        index=batch.index,
        try_no=try_no,
        ok=False,
        worker=worker,
        items_in=None,
        items_out=0,
        seconds=0.0,
        error=error,
    )


@dataclass(frozen=True)
class LostVerdict:
    """What becomes of the tries of a lost task (see :func:`judge_lost_task`).

    ``charged`` are failed tries, each with its result, counted like any other
    failure (retried while tries are left); ``free`` are rerun, each alone, at
    the same try number; ``split`` says the whole group went to ``free``
    because nothing tells which of its mini-batches killed the worker, or
    because it never started there (another task of the job, lost with the
    same worker, did).
    """

    charged: list[tuple[MiniBatch, int, TryResult]]
    free: list[tuple[MiniBatch, int]]
    split: bool


def judge_lost_task(
    group: Sequence[tuple[MiniBatch, int]],
    hung: Mapping[int, tuple[str, str]],
    cause: tuple[str, str] | None,
) -> LostVerdict:
    """Decide which tries of a lost task are charged.

    A task (a ``group`` of ``(mini-batch, try)``) is lost when its worker
    died or was restarted under it. ``hung`` maps the index of each of its
    mini-batches reported hung (by the worker's watchdog, or by the client's
    deadline for a frozen worker) to the error and worker to report;
    ``cause`` is the error and worker of the loss otherwise (a memory kill, a
    hung ``init()``, or an unknown death), ``None`` for a task that waited
    on a worker killed by another task of the job (:meth:`LostTasks.cause`).

    - Mini-batches reported hung are charged a try with their timeout error;
      the others of the group were innocent and are rerun without charge.
    - With none reported hung, a group of several mini-batches is split: each
      is rerun alone and uncharged, so only the one that kills its worker
      again is charged, by the rule below.
    - A lone mini-batch is charged a try with ``cause``, unless it never
      started (``cause`` is ``None``): it is rerun without charge.

    >>> from daskrun.backends.inputs.datasets import FileBatch
    >>> a, b = FileBatch.of(0, ["a.png"]), FileBatch.of(1, ["b.png"])
    >>> died = ("WorkerDied: worker-0 died while running it", "worker-0")
    >>> v = judge_lost_task([(a, 1), (b, 1)], {}, died)
    >>> v.split, v.charged, [(m.index, t) for m, t in v.free]
    (True, [], [(0, 1), (1, 1)])
    >>> v = judge_lost_task([(a, 2)], {}, died)
    >>> [(m.index, t, r.error) for m, t, r in v.charged], v.free
    ([(0, 2, 'WorkerDied: worker-0 died while running it')], [])
    >>> hung = {1: ("TimeoutError: run() did not return", "worker-1")}
    >>> v = judge_lost_task([(a, 1), (b, 3)], hung, died)
    >>> [(m.index, t, r.worker) for m, t, r in v.charged]
    [(1, 3, 'worker-1')]
    >>> [(m.index, t) for m, t in v.free], v.split
    ([(0, 1)], False)
    >>> judge_lost_task([(a, 1)], {}, None).charged
    []
    """
    if hung:
        charged = [
            (b, t, _lost_try(b, t, *hung[b.index])) for b, t in group if b.index in hung
        ]
        free = [(b, t) for b, t in group if b.index not in hung]
        return LostVerdict(charged, free, split=False)
    if len(group) > 1 or cause is None:
        return LostVerdict([], list(group), split=True)
    return LostVerdict([(b, t, _lost_try(b, t, *cause)) for b, t in group], [], False)


class LostTasks:
    """Why a task's worker died: a mini-batch stopped for its timeout (the
    watchdog's event, or the client's for a frozen worker), a memory kill
    (the Nanny's event), or unknown. Error texts are redacted with
    ``redact``."""

    def __init__(
        self,
        client: Client,
        topic: str,
        timeout: float,
        redact: Callable[[str], str] = str,
    ):
        self.client = client
        self.topic = topic
        self.timeout = timeout
        self.redact = redact
        # a topic may outlive a job (map_partitions' plugin serves each of
        # its runs): what earlier jobs reported is not this one's
        self.seen: set[tuple[float, int]] = {
            (stamp, msg.get("index")) for stamp, msg in client.get_events(topic)
        }
        self.earlier = set(self.seen)
        # a timeout event -> the address of the worker process it stopped
        self.stopped: dict[tuple[float, int], str] = {}
        # the topic of task starts (EntryScriptPlugin.starts_topic), and the
        # keys of this job's tasks lost with each worker address
        self.starts_topic = f"{topic}-starts"
        self.lost_on: dict[str, set[Any]] = {}

    def timed_out(self, batches: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
        """Mini-batches of ``batches`` (by index) newly reported hung, with the
        event; a piece of a mini-batch being isolated matches only the events
        that name its first item."""
        found = {}
        for stamp, msg in self.client.get_events(self.topic):
            if (
                msg.get("cause") == "timeout"
                and msg["index"] in batches
                and msg.get("piece") == _first_item(batches[msg["index"]])
            ):
                if (stamp, msg["index"]) not in self.seen:
                    self.seen.add((stamp, msg["index"]))
                    found[msg["index"]] = msg
        return found

    def timeout_error(self, batch: MiniBatch, msg: dict[str, Any]) -> str:
        """The error of a try stopped for its timeout, naming what hung."""
        bound = f"run_invocation_timeout={self.timeout:g} s"
        worker, phase = msg["worker"], msg.get("phase", "run")
        if phase == "frozen":
            return (
                f"TimeoutError: {worker} stopped answering for "
                f"{msg['silent']:.0f} s while running it (beyond {bound} + "
                f"{msg['grace']:g} s grace); it was restarted"
            )
        what = {
            "read": f"reading its inputs ({batch.describe()}) did not finish",
            "write": "writing its output part did not finish",
        }.get(phase, "run() did not return")
        return f"TimeoutError: {what} within {bound}; {worker} was restarted"

    def init_timed_out(self) -> str | None:
        """The worker whose ``init()`` outlived its bound, if one did."""
        for _, msg in self.client.get_events(self.topic):
            if msg.get("cause") == "init-timeout":
                return str(msg["worker"])
        return None

    def init_timeout_error(self, worker: str) -> str:
        return (
            f"TimeoutError: init() did not return within "
            f"{init_timeout(self.timeout):.0f} s (3 × run_invocation_timeout "
            f"+ 30 s) on {worker}; the worker was restarted"
        )

    def cause(self, exc: BaseException) -> tuple[str, str] | None:
        """An error text and the worker for a task lost without a timeout;
        ``None`` for one that only waited on the worker that died, behind
        another task of the job lost with it (:meth:`waited`), or whose
        worker's watchdog stopped it for another mini-batch
        (:meth:`stopped_for`): it is rerun without charge."""
        last = getattr(exc, "last_worker", None)
        address = getattr(last, "address", None)
        name = getattr(last, "name", None)
        worker = f"worker-{name}" if isinstance(name, int) else str(name or "a worker")
        key = _plain(getattr(exc, "task", None))
        if address is not None:
            self.lost_on.setdefault(address, set()).add(key)
            if self.waited(key, address) or self.stopped_for(worker, address):
                return None
            for _, msg in self.client.get_events("worker-restart-memory"):
                if msg.get("worker") == address:
                    rss = msg["rss"] / 2**20
                    return (
                        f"MemoryError: {worker} was killed for exceeding its "
                        f"memory limit (rss {rss:.0f} MiB) while running it",
                        worker,
                    )
        hung = self.init_timed_out()
        if hung is not None:
            return self.init_timeout_error(hung), hung
        # a lost task's exception may quote storage errors of the worker
        error = f"WorkerDied: {worker} died while running it ({exc})"
        return self.redact(error), worker

    def stopped_for(self, worker: str, address: str) -> bool:
        """Whether the worker process at ``address`` (agent ``worker``) was
        stopped by its watchdog for a mini-batch that is not the lost
        task's (that one's event would have charged it): one that returned
        between its timeout and the exit, or that the lost task waited
        behind. Each timeout event stands for the one process it stopped."""
        for stamp, msg in self.client.get_events(self.topic):
            mark = (stamp, msg.get("index"))
            agent = str(msg.get("worker"))
            if (
                msg.get("cause") != "timeout"
                or mark in self.earlier
                or not (agent == worker or agent.startswith(f"{worker}-gpu"))
            ):
                continue
            if self.stopped.setdefault(mark, address) == address:
                return True
        return False

    def waited(self, key: Any, address: str) -> bool:
        """Whether task ``key``, lost with the worker at ``address``, only
        waited there: the scheduler fails every task a dead worker held, and
        one queued behind the task that killed it is innocent.

        Not where ``key`` reported its start there (each task does). Else,
        of the other tasks of the job lost with the same worker, the one
        that killed it is the last to report a start there, or, where its
        start never arrived (a worker killed at once), the one submitted
        first (a worker runs its tasks in that order; the runner's keys end
        with their submission number): ``key`` waited if it is another.
        At least one task lost with a worker is always charged."""
        started = [
            _plain(msg.get("key"))
            for _, msg in self.client.get_events(self.starts_topic)
            if msg.get("address") == address
        ]
        if key in started:
            return False
        others = {
            k
            for k, state in list(self.client.futures.items())
            if _died_on(state) == address  # lost too, not yet taken
        }
        others = (others | self.lost_on.get(address, set())) - {key}
        if started and started[-1] in others:
            return True
        return any(_submitted_before(other, key) for other in others)


def _died_on(state: Any) -> str | None:
    """The address of the worker a task was lost with, from its future's
    state on the client; ``None`` if it was not."""
    died = getattr(getattr(state, "exception", None), "last_worker", None)
    return getattr(died, "address", None)


def _submitted_before(a: Any, b: Any) -> bool:
    """Whether task ``a`` was submitted before ``b``, both keys of one
    runner, ``(prefix, index, try, number)``.

    >>> _submitted_before(("s", 0, 1, 7), ("s", 0, 1, 8))
    True
    >>> _submitted_before(("s", 0, 1, 8), ("s", 0, 1, 7)), _submitted_before("x", "y")
    (False, False)
    """
    return (
        isinstance(a, tuple)
        and isinstance(b, tuple)
        and len(a) == len(b) == 4
        and a[0] == b[0]
        and isinstance(a[-1], int)
        and isinstance(b[-1], int)
        and a[-1] < b[-1]
    )


def _plain(key: Any) -> Any:
    """A task key as the client holds it (events carry tuples as lists)."""
    return tuple(_plain(k) for k in key) if isinstance(key, list) else key


def _first_item(batch: Any) -> int | None:
    """The first item of a piece of a mini-batch being isolated; ``None``
    for a whole mini-batch."""
    return batch.start if isinstance(batch, SubBatch) else None


def _silent_workers(dask_scheduler: Any, limit: float) -> dict[str, list[Any]]:
    """On the scheduler: the workers not heard from for ``limit`` seconds,
    with the keys they are processing."""
    now_ = time.time()
    return {
        address: [ts.key for ts in ws.processing]
        for address, ws in dask_scheduler.workers.items()
        if now_ - ws.last_seen > limit
    }


class FrozenWorkers:
    """The client's deadline for a worker that cannot stop itself.

    A worker process stopped (SIGSTOP) or stuck in a system call holding the
    interpreter runs neither its watchdog nor its heartbeats. Once the
    scheduler has not heard from a worker processing one of this job's tasks
    for ``run_invocation_timeout`` + ``grace`` seconds, the task it started
    (each task reports its start on ``starts_topic``) is charged a timed-out
    try, and the worker is restarted through its Nanny, which kills the
    process even while it is stopped: a late result or part from it can then
    never arrive. A task holding several mini-batches charges none of them;
    each is rerun alone, as for any worker lost. A worker frozen in a task
    that a pending one needs (``owner`` maps its key to the pending one's: a
    preprocess task) is restarted too, and the task rerun elsewhere.
    """

    def __init__(
        self,
        client: Client,
        events_topic: str,
        starts_topic: str,
        timeout: float,
        pending: dict[Any, list[tuple[MiniBatch, int]]],
        began: dict[Any, tuple[str, float]] | None = None,
        owner: Callable[[Any], Any] | None = None,
    ):
        self.client = client
        # the pending task a key on a worker works for: its own, or (a
        # preprocess task of engine.stages) the run task that needs it
        self.owner = owner or (lambda key: key)
        self.events_topic = events_topic
        self.starts_topic = starts_topic
        self.grace = float(config_get("runner.frozen-grace"))
        self.limit = timeout + self.grace
        self.pending = pending
        self.started: dict[str, tuple[Any, str]] = {}  # address -> key, agent
        # given: key -> the address of the worker that started it, and when
        # (the client's clock), for engine.speculation
        self.began = began
        self._stop = threading.Event()
        client.subscribe_topic(starts_topic, self._on_start)
        self._thread = threading.Thread(
            target=self._watch, name="daskrun-deadline", daemon=True
        )
        self._thread.start()

    def _on_start(self, event: tuple[float, dict[str, Any]]) -> None:
        msg = event[1]
        key = msg["key"]
        key = tuple(key) if isinstance(key, list) else key
        self.started[msg["address"]] = (key, msg["worker"])
        if self.began is not None:
            self.began[key] = (msg["address"], time.monotonic())

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.check()
            except Exception as e:  # the cluster may be going away
                logger.debug("frozen-worker check failed: %s", e)

    def check(self) -> None:
        silent = self.client.run_on_scheduler(_silent_workers, limit=self.limit)
        if not silent:
            return
        groups = {f.key: g for f, g in list(self.pending.items())}
        for address, keys in silent.items():
            ours = [k for k in keys if self.owner(k) in groups]
            if not ours:
                continue
            key, agent = self.started.pop(address, (None, address))
            group = groups.get(key)
            if group is not None and len(group) == 1:
                self.client.log_event(
                    self.events_topic,
                    {
                        "index": group[0][0].index,
                        "piece": _first_item(group[0][0]),
                        "worker": agent,
                        "cause": "timeout",
                        "phase": "frozen",
                        "silent": self.limit,
                        "grace": self.grace,
                    },
                )
            logger.warning(
                "worker %s silent for %.0f s; restarting it", agent, self.limit
            )
            # the Nanny SIGKILLs a process that does not close; a worker that
            # cannot be restarted is removed from the scheduler
            self.client.restart_workers([address], timeout=10, raise_for_error=False)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self.client.unsubscribe_topic(self.starts_topic)


def _held_tasks(dask_scheduler: Any) -> dict[str, tuple[Any, list[str]]]:
    """On the scheduler: each worker's name and the keys (as text) of the
    tasks it is processing."""
    return {
        address: (ws.name, [str(ts.key) for ts in ws.processing])
        for address, ws in dask_scheduler.workers.items()
    }


def stall_message(
    seconds: float,
    setting: str,
    alive: int,
    held: Mapping[str, Sequence[MiniBatch]],
    copies: Mapping[str, Sequence[int]] | None = None,
) -> str:
    """Why a job that stopped making progress was canceled: its timeout,
    and the workers with the mini-batches they hold (``copies``: those of
    which a worker holds a speculative copy, by index).

    >>> from daskrun.backends.inputs.datasets import FileBatch
    >>> line = stall_message(600, "progress-timeout", 2,
    ...                      {"worker-1": [FileBatch.of(3, ["a.png"])]})
    >>> print(line)  # doctest: +NORMALIZE_WHITESPACE
    no mini-batch finished for 600 s (daskrun.progress-timeout=600) while 2
    workers are alive: worker-1 holds mini-batch 3 (files a.png); those
    workers were restarted
    >>> print(stall_message(60, "progress-timeout", 2,
    ...                     {"worker-0": [FileBatch.of(3, ["a.png"])],
    ...                      "worker-1": [FileBatch.of(3, ["a.png"])]},
    ...                     {"worker-1": [3]}))  # doctest: +NORMALIZE_WHITESPACE
    no mini-batch finished for 60 s (daskrun.progress-timeout=60) while 2
    workers are alive: worker-0 holds mini-batch 3 (files a.png); worker-1
    holds mini-batch 3 (files a.png), a speculative copy; those workers were
    restarted
    """
    bound = f"daskrun.{setting}={seconds:g}"
    when = (
        f"within {seconds:g} s of init() ({bound})"
        if setting == "first-result-timeout"
        else f"for {seconds:g} s ({bound})"
    )
    line = (
        f"no mini-batch finished {when} while {alive} "
        f"worker{'' if alive == 1 else 's'} {'is' if alive == 1 else 'are'} alive: "
    )
    if not held:
        return line + "none holds a mini-batch of this job (all wait to be run)"
    named = []
    for worker, batches in sorted(held.items()):
        copied = (copies or {}).get(worker, ())
        if len(batches) == 1:
            named.append(
                f"{worker} holds mini-batch {batches[0].index} "
                f"({batches[0].describe()})"
                + (", a speculative copy" if copied else "")
            )
        else:
            indices = ", ".join(str(b.index) for b in batches)
            named.append(
                f"{worker} holds mini-batches {indices}"
                + (f" (speculative copies of {_listed(copied)})" if copied else "")
            )
    return line + "; ".join(named) + "; those workers were restarted"


def _listed(indices: Iterable[int]) -> str:
    return ", ".join(str(i) for i in indices)


def _copies(pending: Mapping[Any, Sequence[tuple[MiniBatch, int]]]) -> set[str]:
    """The keys (as text) of the speculative copies in ``pending``: a copy
    is submitted after its original, over the same mini-batches."""
    seen: set[int] = set()
    copies = set()
    for future, group in list(pending.items()):
        indices = {b.index for b, _ in group}
        if indices & seen:
            copies.add(str(future.key))
        seen |= indices
    return copies


class NoProgress:
    """Cancels a job whose workers are alive but finish nothing.

    Azure ML's ``progress_update_timeout``: once no task of the job has
    returned for ``progress_timeout`` seconds (``first_result_timeout``
    until the first one, counted from the start of the mini-batches, after
    ``init()``) while mini-batches are in flight and the cluster has
    workers, the job is stopped through ``interrupt`` as ``Canceled``, so it
    can be resumed, with a line naming the workers and the mini-batches they
    hold (:func:`stall_message`). A deadlock in ``run()``, or a stalled mount,
    otherwise waits for ``run_invocation_timeout`` at best. Those workers are
    then restarted through their Nannies, as for :class:`FrozenWorkers`: a
    worker thread stuck in ``run()`` would keep the worker from anything
    else, a resume of this job included. A cluster without workers is left to
    ``cluster.connect``'s watch of lost workers.
    """

    def __init__(
        self,
        client: Client,
        interrupt: Interrupting,
        pending: dict[Any, list[tuple[MiniBatch, int]]],
        progress_timeout: float | None,
        first_result_timeout: float | None,
    ):
        self.client, self.interrupt, self.pending = client, interrupt, pending
        self.progress_timeout = progress_timeout
        self.first_result_timeout = first_result_timeout
        self.last = time.monotonic()
        self.results = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="daskrun-no-progress", daemon=True
        )
        self._thread.start()

    def beat(self) -> None:
        """A task of the job returned."""
        self.last = time.monotonic()
        self.results += 1

    def bound(self) -> tuple[float, str] | None:
        """The timeout that applies now, and its setting's name."""
        if self.results == 0 and self.first_result_timeout is not None:
            return self.first_result_timeout, "first-result-timeout"
        if self.progress_timeout is not None:
            return self.progress_timeout, "progress-timeout"
        return None

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            try:
                if self.check():
                    return
            except Exception as e:  # the cluster may be going away
                logger.debug("progress check failed: %s", e)

    def check(self) -> bool:
        """Cancel the job if it is stalled; whether it was."""
        bound = self.bound()
        now_ = time.monotonic()
        if not self.pending:  # nothing outstanding: nothing to wait for
            self.last = now_
            return False
        if bound is None or self.interrupt.reason is not None:
            return False
        seconds, setting = bound
        if now_ - self.last < seconds:
            return False
        workers = self.client.run_on_scheduler(_held_tasks)
        if not workers:
            return False
        groups = {str(f.key): g for f, g in list(self.pending.items())}
        copies = _copies(self.pending)
        held: dict[str, list[MiniBatch]] = {}
        copied: dict[str, list[int]] = {}
        holders = []
        for address, (name, keys) in workers.items():
            ours = [b for k in keys for b, _ in groups.get(k, ())]
            if ours:
                held[agent_label(name)] = sorted(ours, key=lambda b: b.index)
                copied[agent_label(name)] = sorted(
                    b.index for k in keys if k in copies for b, _ in groups[k]
                )
                holders.append(address)
        self.interrupt.trigger(
            stall_message(seconds, setting, len(workers), held, copied),
            canceled=True,
        )
        if holders:
            self.client.restart_workers(holders, timeout=10, raise_for_error=False)
        return True

    def close(self) -> None:
        self._stop.set()
