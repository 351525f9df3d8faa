"""``mini_batch_size="auto"`` and ``process_count_per_node="auto"``: sizes
chosen from measured rates, not guessed.

A file step with ``mini_batch_size="auto"`` runs a **pilot** first: its
first ``daskrun.auto.pilot-mini-batches`` mini-batches hold one file each.
They are real mini-batches (their parts and report rows are the run's);
their times per item, ``init()``'s time and the workers' memory choose the
size of the rest of the plan (:func:`choose_mini_batch_size`), whose indices
continue after the pilot's, as soon as ``daskrun.auto.pilot-results`` warm
outcomes (not a worker's first) are in: the rest runs while the pilot's last
ones still run (:class:`daskrun.engine.pilot.PilotFeed`). The choice is printed
(:meth:`AutoChoice.line`), kept in the run record (``auto``) and in
``job_result.txt``; a resume plans with the recorded choice, so its plan and
ledger are the run's.

Tables have no pilot: their mini-batches are byte ranges planned from the
start of each file, so the size is chosen before planning, from the input
files' bytes, the processes and their memory (:func:`choose_table_size`).

``process_count_per_node="auto"`` is chosen before the cluster starts (a
started local cluster cannot change cheaply) from the cores, the GPUs and
the machine's memory (:func:`choose_process_count`); ``init()`` is not
measured for it.

Pure functions here; the job calls them (:mod:`daskrun.engine.job`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

AUTO = "auto"


def is_auto(value: object) -> bool:
    """Whether a parameter's value asks for an automatic choice.

    >>> is_auto("auto"), is_auto(" AUTO "), is_auto(10)
    (True, True, False)
    """
    return isinstance(value, str) and value.strip().lower() == AUTO


def choose_mini_batch_size(
    item_seconds: float,
    *,
    items_left: int,
    workers: int,
    target_seconds: float = 1.0,
    largest: int = 1000,
    item_bytes: float = 0.0,
    memory_free: float | None = None,
) -> int:
    """Files per mini-batch for the rest of a plan: about ``target_seconds``
    of ``run()`` each (tasks of 0.5 to 2 s), at most ``largest``, few enough
    that every one of ``workers`` gets at least two mini-batches of the
    ``items_left``, and small enough that a mini-batch's items
    (``item_bytes`` each) take at most half of ``memory_free``.

    Never below 1; never larger for slower items (monotone).

    >>> choose_mini_batch_size(0.01, items_left=10_000, workers=2)
    100
    >>> choose_mini_batch_size(2.0, items_left=10_000, workers=2)
    1
    >>> choose_mini_batch_size(0.001, items_left=400, workers=2)
    100
    >>> choose_mini_batch_size(0.01, items_left=10_000, workers=2,
    ...                        item_bytes=10e6, memory_free=200e6)
    10
    >>> choose_mini_batch_size(1e-300, items_left=10**9, workers=1,
    ...                        item_bytes=5e-324, memory_free=1.0)
    1000
    """
    by_time = largest if item_seconds <= 0 else target_seconds / item_seconds
    by_balance = math.ceil(max(items_left, 1) / (2 * max(workers, 1)))
    by_memory = (
        0.5 * memory_free / item_bytes
        if item_bytes > 0 and memory_free is not None
        else largest
    )
    # the float bounds may be huge (items of a few bytes, or near-instant
    # ones): bounded by ``largest`` before they become ints
    return max(1, int(min(largest, by_balance, by_time, by_memory)))


def choose_table_size(
    file_bytes: Sequence[int],
    *,
    processes: int,
    memory_limit: float | None,
    smallest: int = 1 << 20,
    largest: int = 64 << 20,
    per_process: int = 4,
) -> int:
    """Bytes per mini-batch of a table whose files hold ``file_bytes``.

    A mini-batch costs a task, a read and a part whatever its bytes, so the
    size is the largest that still gives every one of ``processes`` about
    ``per_process`` mini-batches (the tail spreads over all), between
    ``smallest`` and ``largest`` and at most 1/16 of a process's
    ``memory_limit`` (a frame in memory is several times its file's bytes).
    A mini-batch never crosses a file, so the count is per file: eight 4 MB
    files are eight mini-batches at any size from 4 MB up. The size is then
    lowered to the smallest that cuts the files into as many mini-batches:
    a 36 MB file at 32 MiB is two 18 MB halves, not 32 MiB and a 2 MiB tail.

    >>> choose_table_size([400 << 20], processes=2, memory_limit=None) >> 20
    50
    >>> choose_table_size([36_000_000] * 8, processes=2, memory_limit=None)
    36000000
    >>> choose_table_size([1 << 20], processes=2, memory_limit=None) >> 20
    1
    >>> choose_table_size([4 << 30], processes=2, memory_limit=512 << 20) >> 20
    32
    """
    share = int(memory_limit) // 16 if memory_limit else largest
    cap = max(smallest, min(largest, share))
    want = per_process * max(processes, 1)

    def count(size: int) -> int:
        return sum(max(1, -(-b // size)) for b in file_bytes)

    if count(cap) >= want:
        size = cap
    elif count(smallest) < want:
        size = smallest
    else:  # the largest size that still gives ``want``: count falls with size
        low, high = smallest, cap  # count(low) >= want > count(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if count(middle) >= want else (low, middle)
        size = low
    even = max((-(-b // max(1, -(-b // size))) for b in file_bytes), default=size)
    return max(smallest, min(size, even))


def choose_process_count(
    cores: int, gpus: int, memory_bytes: float | None, process_memory: float
) -> int:
    """Worker processes for one node: one per GPU on a GPU machine, else one
    per core, and no more than the machine's memory holds at
    ``process_memory`` each; at least one.

    >>> choose_process_count(8, 0, 64e9, 1e9), choose_process_count(8, 2, 64e9, 1e9)
    (8, 2)
    >>> choose_process_count(8, 0, 3e9, 1e9)
    3
    """
    count = gpus or cores
    if memory_bytes and process_memory > 0:
        count = min(count, int(memory_bytes // process_memory))
    return max(1, count)


@dataclass(frozen=True)
class AutoChoice:
    """What an automatic choice chose, and from what: kept in the run record
    (``auto``) and ``job_result.txt``."""

    mini_batch_size: int | None = None  # files or bytes of the rest
    pilot_mini_batches: int = 0  # one item each, before the rest
    process_count_per_node: int | None = None
    item_seconds: float | None = None
    init_seconds: float | None = None
    process_memory: int | None = None  # bytes, the largest worker's RSS
    basis: str = ""

    def line(self) -> str:
        """One line for the terminal and ``job_result.txt``.

        >>> AutoChoice(50, 8, None, 0.02, 1.5, 300 << 20, "pilot").line()
        'daskrun: auto: mini_batch_size=50 (pilot of 8 files: 0.02 s per file, \
init() 1.5 s, 300 MiB per process)'
        """
        parts = []
        if self.mini_batch_size is not None:
            measured = []
            if self.item_seconds is not None:
                measured.append(f"{self.item_seconds:.3g} s per file")
            if self.init_seconds is not None:
                measured.append(f"init() {self.init_seconds:.3g} s")
            if self.process_memory:
                measured.append(f"{self.process_memory >> 20} MiB per process")
            basis = (
                f"pilot of {self.pilot_mini_batches} files: " + ", ".join(measured)
                if self.pilot_mini_batches and measured
                else self.basis
            )
            parts.append(f"mini_batch_size={self.mini_batch_size} ({basis})")
        if self.process_count_per_node is not None:
            parts.append(f"process_count_per_node={self.process_count_per_node}")
        return "daskrun: auto: " + "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AutoChoice:
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


def worker_memory(dask_worker: Any) -> tuple[int, int]:
    """This worker's RSS and memory limit (0: none), through ``client.run``."""
    import psutil

    limit = getattr(dask_worker, "memory_manager", None)
    return (
        psutil.Process().memory_info().rss,
        int(getattr(limit, "memory_limit", 0) or 0),
    )
