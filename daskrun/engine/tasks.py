"""The task function: mini-batches run on a worker, one try each.

:func:`process_mini_batches` turns each mini-batch plan into what ``run()``
receives (:func:`_read`), calls ``run()`` of the worker's
:class:`~daskrun.engine.plugin.EntryScriptPlugin`, writes the rows as the
mini-batch's part and returns a :class:`~daskrun.engine.plugin.TryResult`.
A user exception is data, not a crash. Tasks are pickled by reference to this
module: it imports only the engine and the input back ends.
"""

from __future__ import annotations

import dataclasses
import linecache
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from distributed import get_worker

from daskrun.backends.inputs.datasets import (
    CollectionBatch,
    MiniBatch,
    PartitionBatch,
    SubBatch,
    partition_dataset,
)
from daskrun.backends.inputs.partitions import MiniBatchContext
from daskrun.engine.output import (
    GROUP_BYTES,
    check_returned,
    format_rows,
    printable,
    write_group,
)

if TYPE_CHECKING:
    from daskrun.engine.prepare import Prepared
from daskrun.engine.plugin import (
    EntryScriptPlugin,
    InputSpec,
    TryResult,
    _failure,
    ready_plugin,
)

logger = logging.getLogger("daskrun")


def _context(
    plugin: EntryScriptPlugin, batch: MiniBatch | SubBatch
) -> MiniBatchContext:
    """The ``mini_batch_context`` of ``batch``: a partition's key values and
    its data set (the input filtered to it), as in Azure ML."""
    if not isinstance(batch, PartitionBatch):
        return MiniBatchContext({}, batch.index, None)
    spec = plugin.settings.input_spec
    dataset = partition_dataset(
        batch, spec.storage_options, spec.pandas_kwargs, spec.partition_format
    )
    return MiniBatchContext(batch.partition_key_value, batch.index, dataset)


def process_mini_batches(
    plugin_name: str,
    tries: Sequence[tuple[MiniBatch | SubBatch, int]],
    kept: PartitionValues | None = None,
    prepared: Sequence[Prepared | TryResult] | None = None,
) -> list[TryResult]:
    """The task function: run one try of each ``(mini-batch, try number)``
    in turn on this worker.

    Several cheap mini-batches share one task so that Dask's per-task cost
    (milliseconds) is paid once for all of them; each still gets its own
    part and its own :class:`TryResult`. With ``kept``, what ``run()``
    returns is kept there instead of written (``daskrun.map_partitions``).
    With ``prepared`` (a two-stage step, :mod:`daskrun.engine.stages`),
    ``run()`` gets what ``preprocess()`` returned for each, and a try whose
    ``preprocess()`` failed is its result as it is.
    """
    worker = get_worker()
    plugin = ready_plugin(plugin_name)
    cache_root = os.path.join(worker.local_directory, "daskrun-cache")
    # the client's deadline for a frozen worker starts here
    worker.log_event(
        plugin.starts_topic,
        {
            "key": worker.get_current_task(),
            "address": worker.address,
            "worker": plugin.agent,
        },
    )
    results: list[TryResult] = []
    # a task of several whole mini-batches writes their rows as groups
    group = (
        _Group(plugin, results)
        if len(tries) > 1 and plugin.settings.output and plugin.settings.output.grouped
        else None
    )
    for at, (batch, try_no) in enumerate(tries):
        held = group.rows if group is not None and _span_of(batch) is None else None
        ready = prepared[at] if prepared is not None else None
        if isinstance(ready, TryResult):  # preprocess() failed
            results.append(ready)
            continue
        result = _process(plugin, batch, try_no, cache_root, held, kept, ready)
        stdout, log = plugin.capture.take()
        if ready is not None:
            stdout, log = ready.stdout + stdout, ready.log + log
        logged = plugin.capture.logged.take()
        if stdout or log or logged:
            result = dataclasses.replace(result, stdout=stdout, log=log, logged=logged)
        results.append(result)
        if group is not None:
            group.added()
    if group is not None:
        group.write()
    return results


class _Group:
    """The rows of a task's whole mini-batches that succeeded, held until
    they are written together (:func:`~daskrun.engine.output.write_group`), at the
    task's end or once they reach ``GROUP_BYTES``. Their results are the
    task's only once written: a group that cannot be written fails them."""

    def __init__(self, plugin: EntryScriptPlugin, results: list[TryResult]):
        self.plugin, self.results = plugin, results
        self.rows: list[tuple[int, bytes]] = []
        self._at: list[int] = []  # their places in results
        self._bytes = 0

    def added(self) -> None:
        """The last result is in: note its place if its rows are held."""
        if len(self.rows) > len(self._at):
            self._at.append(len(self.results) - 1)
            self._bytes += len(self.rows[-1][1])
            if self._bytes >= GROUP_BYTES:
                self.write()

    def write(self) -> None:
        if not self.rows:
            return
        plugin = self.plugin
        assert plugin.settings.output is not None
        try:
            plugin.watchdog.arm(self.rows[0][0], phase="write")
            write_group(plugin.settings.output, self.rows)
        except (Exception, SystemExit) as e:
            for at in self._at:
                done = self.results[at]
                failed = _failure(
                    done.index,
                    done.try_no,
                    plugin.agent,
                    done.items_in,
                    time.perf_counter() - done.seconds,
                    e,
                    plugin.clean,
                )
                self.results[at] = dataclasses.replace(
                    failed, stdout=done.stdout, log=done.log, logged=done.logged
                )
        finally:
            plugin.watchdog.disarm()
            self.rows, self._at, self._bytes = [], [], 0


def process_collection_batches(
    plugin_name: str,
    tries: Sequence[tuple[CollectionBatch, int]],
    *partitions: Any,
    kept: PartitionValues | None = None,
) -> list[TryResult]:
    """:func:`process_mini_batches` for partitions of a Dask collection: the
    scheduler computes each partition and hands it over as an argument."""
    return process_mini_batches(
        plugin_name,
        [
            (dataclasses.replace(batch, data=partition_items(partition)), try_no)
            for (batch, try_no), partition in zip(tries, partitions, strict=True)
        ],
        kept,
    )


class PartitionValues:
    """What ``run()`` returned for partitions of a Dask collection, kept on
    the worker as the partitions of ``daskrun.map_partitions``' result.

    ``frame``: the result is a dataframe (``True``: a DataFrame or Series
    from every partition), a bag (``False``: a list of items, as a step
    takes it: a ``str`` is refused, not split into characters), or either
    (``None``: the sample that infers which).

    >>> kept = PartitionValues(frame=False)
    >>> kept.add(0, ("a", "b")), kept.values
    (2, {0: ['a', 'b']})
    >>> kept.add(1, "ab")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    TypeError: run() returned str; return a list, tuple, array, ...
    """

    def __init__(self, frame: bool | None):
        self.frame = frame
        self.values: dict[int, Any] = {}

    def add(self, index: int, value: Any) -> int:
        """Keep ``value``, partition ``index``'s result; its items."""
        pd: Any = sys.modules.get("pandas")
        if pd is not None and isinstance(value, pd.Series):
            value = value.to_frame()
        is_frame = pd is not None and isinstance(value, pd.DataFrame)
        if self.frame and not is_frame:
            raise TypeError(
                f"run() returned {type(value).__name__}, not a DataFrame as the "
                "meta says; return a DataFrame from every partition"
            )
        check_returned(value, is_frame)
        if self.frame is False:
            value = value.to_dict("records") if is_frame else list(value)
        self.values[index] = value
        return len(value)


def partition_items(partition: Any) -> Any:
    """What ``run()`` gets of a Dask collection's partition: a DataFrame as
    it is, a bag's items (maybe a lazy iterator) as a list."""
    import pandas as pd

    if isinstance(partition, (pd.DataFrame, pd.Series)):
        return partition
    return list(partition)


def _process(
    plugin: EntryScriptPlugin,
    batch: MiniBatch | SubBatch,
    try_no: int,
    cache_root: str,
    held: list[tuple[int, bytes]] | None = None,
    kept: PartitionValues | None = None,
    ready: Prepared | None = None,
) -> TryResult:
    """One try of ``batch``; its rows are written as its part, or added to
    ``held`` (to be written with others, see :class:`_Group`), or what
    ``run()`` returned is ``kept``. With ``ready``, ``run()`` gets what
    ``preprocess()`` returned instead of the batch as read."""
    start = time.perf_counter()
    spec = plugin.settings.input_spec
    items_in: int | None = batch.n_items
    cache: str | None = None
    mini_batch: Any
    watchdog = plugin.watchdog
    try:
        # reading (a remote copy, a CSV that is a FIFO or on a hung mount) and
        # writing are bounded by the same timeout as run()
        if ready is None:
            watchdog.arm(batch.index, phase="read", piece=_piece_of(batch))
            mini_batch, read_items, cache = _read(spec, batch, cache_root)
        else:
            mini_batch, read_items = ready.value, ready.items_in
        items_in = read_items if read_items is not None else items_in
        watchdog.arm(batch.index, phase="run", piece=_piece_of(batch))
        args = (_context(plugin, batch),) if plugin.takes_context else ()
        with plugin.capture.redirect():
            result = plugin.module.run(mini_batch, *args)  # type: ignore[union-attr]
        watchdog.arm(batch.index, phase="write", piece=_piece_of(batch))
        output = plugin.settings.output
        try:
            if kept is not None:
                items_out = kept.add(batch.index, result)
            elif output is not None:  # named outputs count items_in
                data, items_out = output.encode(result, items_in)
            else:
                data, items_out = format_rows(result)
        except Exception as e:  # about what run() returned
            return _returned(plugin, batch.index, try_no, items_in, start, e)
        rows = None
        if kept is None and held is not None:
            held.append((batch.index, data))
        elif kept is None and plugin.settings.output is not None:
            rows = plugin.settings.output.keep(batch.index, data, _span_of(batch))
    except (Exception, SystemExit) as e:
        return _failure(
            batch.index, try_no, plugin.agent, items_in, start, e, plugin.clean
        )
    finally:
        watchdog.disarm()
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    return TryResult(
        index=batch.index,
        try_no=try_no,
        ok=True,
        worker=plugin.agent,
        items_in=items_in,
        items_out=items_out,
        seconds=time.perf_counter() - start,
        rows=rows,
    )


def _read(
    spec: InputSpec, batch: MiniBatch | SubBatch, cache_root: str
) -> tuple[Any, int | None, str | None]:
    """What ``run()`` receives for ``batch``, its items where reading counts
    them (rows), and the folder to delete afterwards. A piece of a failed
    mini-batch (:class:`~daskrun.backends.inputs.datasets.SubBatch`) gets a slice of its
    files, or its parent's rows read as for the parent and sliced."""
    return batch.read(spec, cache_root)


def _piece_of(batch: MiniBatch | SubBatch) -> int | None:
    """The first item of a piece of a failed mini-batch, for the events that
    name what hung; ``None`` for a whole mini-batch."""
    return batch.start if isinstance(batch, SubBatch) else None


def _span_of(batch: MiniBatch | SubBatch) -> tuple[int, int] | None:
    """The items a piece's part holds; ``None`` for a whole mini-batch's."""
    return (batch.start, batch.stop) if isinstance(batch, SubBatch) else None


def _returned(
    plugin: EntryScriptPlugin,
    index: int,
    try_no: int,
    items_in: int | None,
    start: float,
    exc: Exception,
) -> TryResult:
    """A try whose ``run()`` returned what cannot be written: the error is
    about ``run()``, and its traceback names ``run``'s ``def``, not
    daskrun's output code."""
    error = f"{type(exc).__name__}: {exc}"
    if not str(exc).startswith("run() returned"):
        output = plugin.settings.output
        error = (
            f"{type(exc).__name__}: what run() returned cannot be written "
            f"as {output.output_format if output else 'text'}: {exc}"
        )
    run = plugin.module.run if plugin.module is not None else None
    code = getattr(run, "__code__", None)
    where = ""
    if code is not None:
        line = linecache.getline(code.co_filename, code.co_firstlineno).strip()
        where = (
            f'  File "{code.co_filename}", line {code.co_firstlineno}, '
            f"in {code.co_name}\n" + (f"    {line}\n" if line else "")
        )
    return TryResult(
        index=index,
        try_no=try_no,
        ok=False,
        worker=plugin.agent,
        items_in=items_in,
        items_out=0,
        seconds=time.perf_counter() - start,
        error=printable(plugin.clean(error)),
        traceback=printable(
            plugin.clean(f"Traceback (most recent call last):\n{where}{error}\n")
        ),
    )
