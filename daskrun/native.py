"""Dask collections in and out: :func:`map_partitions` and collection inputs.

A Dask user who holds a dataframe (``dd.read_parquet``) or a bag
(``db.read_text``) hands it to daskrun in one of two ways:

- :func:`map_partitions` returns a *lazy* collection: each partition is one
  ``run()`` call, on the workers of the current client, after ``init()`` ran
  once per worker process through the same :class:`EntryScriptPlugin` as a
  step. It composes with whatever Dask does next (``.to_parquet()``, a join,
  a second model); failing partitions follow ``error_threshold``.
- ``ParallelRunStep(inputs=[ddf])`` runs the collection's partitions as
  mini-batches through daskrun's own engine (:class:`CollectionInput`):
  exactly-once ordered output, thresholds, logs and resume.

>>> import dask.dataframe as dd, daskrun  # doctest: +SKIP
>>> ddf = dd.read_parquet("in/")  # doctest: +SKIP
>>> scored = daskrun.map_partitions("score.py", ddf)  # doctest: +SKIP
>>> scored.to_parquet("out/")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from distributed import get_client

from .config import ParallelRunConfig, ResolvedConfig
from .datasets import CollectionBatch
from .exceptions import ConfigError, EntryScriptError, JobFailedError
from .output import printable
from .partitions import MiniBatchContext
from .plugin import (
    EntryScriptPlugin,
    InputSpec,
    _failure,
    build_bundle,
    partition_items,
    process_collection_batches,
    ready_plugin,
)

logger = logging.getLogger("daskrun")

# the sample map_partitions runs run() on to infer its result's type
SAMPLE_ROWS = 2


def is_collection(value: Any) -> bool:
    """Whether ``value`` is a Dask dataframe or bag (not a Delayed or array)."""
    kind = _collection_kind(value)
    return kind is not None


def _collection_kind(value: Any) -> str | None:
    """``"dataframe"``, ``"bag"`` or ``None``."""
    import dask

    if not dask.is_dask_collection(value):
        return None
    module = type(value).__module__
    if module.startswith("dask.bag"):
        return "bag"
    if module.startswith(("dask.dataframe", "dask_expr")):
        return "dataframe"
    return None


def _check_collection(collection: Any, what: str) -> str:
    kind = _collection_kind(collection)
    if kind is None:
        raise ConfigError(
            f"{what}={type(collection).__name__} is not a Dask dataframe or bag; "
            "pass e.g. dd.read_parquet('in/') or db.from_sequence(paths)"
        )
    return kind


def _entry_plugin(
    name: str,
    cfg: ResolvedConfig,
    arguments: Sequence[Any],
    output_path: str,
    bundle: tuple[Path, str],
) -> EntryScriptPlugin:
    """The worker plugin of a script over a collection: as a step's, with
    nothing to read (the partitions arrive as task arguments)."""
    zipped, script = bundle
    return EntryScriptPlugin(
        name=name,
        bundle=zipped.read_bytes(),
        script=script,
        script_display=cfg.entry_script,
        source_directory=cfg.source_directory,
        arguments=[str(a) for a in arguments],
        side_inputs=[],
        environment_variables=cfg.environment_variables,
        output_path=output_path,
        input_spec=InputSpec(
            kind="collection",
            storage_options={},
            pandas_kwargs={},
            local=True,
        ),
        output=None,
        run_invocation_timeout=cfg.run_invocation_timeout,
        logging_level=cfg.logging_level,
    )


def map_partitions(
    entry_script: str,
    collection: Any,
    *,
    meta: Any = None,
    arguments: Sequence[Any] | None = None,
    source_directory: str | None = None,
    environment_variables: Mapping[str, str] | None = None,
    run_invocation_timeout: int | None = None,
    run_max_try: int | None = None,
    error_threshold: int | None = None,
    logging_level: str | None = None,
    name: str | None = None,
    client: Any = None,
) -> Any:
    """``run()`` of ``entry_script`` over each partition of a Dask
    collection, lazily.

    Parameters
    ----------
    entry_script : str
        Python file with ``init()`` and ``run(mini_batch)``. ``run`` gets
        each partition: a ``pandas.DataFrame`` of a dataframe, a list of a
        bag's items.
    collection : dask.dataframe.DataFrame or dask.bag.Bag
    meta : pandas.DataFrame, optional
        The result's columns and dtypes when ``run()`` returns DataFrames.
        Without it, ``run()`` is called once, eagerly, on the first
        ``SAMPLE_ROWS`` rows (items) of the first partition: a DataFrame
        result makes the output a dataframe, anything else a bag of the
        items ``run()`` returns.
    arguments, source_directory, environment_variables, run_invocation_timeout,
    logging_level
        As :class:`~daskrun.ParallelRunConfig`; a ``run()`` that outlives
        ``run_invocation_timeout`` stops its worker process (the same
        watchdog), and Dask retries the partition elsewhere
        (``distributed.scheduler.allowed-failures``).
    run_max_try : int
        Tries of a partition whose ``run()`` raises, on the same worker,
        before it counts as failed.
    error_threshold : int
        Items (rows, bag items) of failed partitions tolerated; ``-1``
        tolerates all. A failed partition within it is dropped from the
        result and reported (a warning on the client; the events of topic
        ``daskrun-<name>``); the one beyond it makes ``compute()`` raise
        :class:`~daskrun.JobFailedError`, whose message starts with the
        first failure.
    name : str, optional
        The output's name (task keys and the events topic); by default
        ``<script>-<token of script, options and input>``.
    client : distributed.Client, optional
        Where ``init()`` runs; default the current client.

    Returns
    -------
    dask.dataframe.DataFrame or dask.bag.Bag
        One partition per input partition, in order.

    Examples
    --------
    >>> scored = daskrun.map_partitions("score.py", ddf)  # doctest: +SKIP
    >>> ranked = daskrun.map_partitions("rank.py", scored)  # doctest: +SKIP
    >>> ranked.to_parquet("out/")  # doctest: +SKIP
    """
    import dask
    from dask.base import tokenize

    kind = _check_collection(collection, "collection")
    cfg = ParallelRunConfig(
        entry_script,
        error_threshold=error_threshold,
        output_action="summary_only",
        source_directory=source_directory,
        logging_level=logging_level,
        run_invocation_timeout=run_invocation_timeout,
        run_max_try=run_max_try,
        environment_variables=environment_variables,
    ).resolved
    client = client if client is not None else _current_client()
    stem = os.path.splitext(os.path.basename(cfg.entry_script))[0]
    # the bundle's name changes with any shipped file (a helper module too)
    bundle = build_bundle(cfg.entry_script, cfg.source_directory)
    script_token = tokenize(
        str(bundle[0]),
        cfg.source_directory,
        list(arguments or ()),
        dict(cfg.environment_variables),
        cfg.run_invocation_timeout,
        cfg.logging_level,
    )
    plugin_name = f"daskrun-map-{stem}-{script_token[:12]}"
    name = name or f"{stem}-{tokenize(script_token, collection, cfg)[:16]}"
    topic = f"daskrun-{name}"
    plugin = _entry_plugin(
        plugin_name, cfg, arguments or (), os.path.abspath("."), bundle
    )
    _register(client, plugin)
    _report(client, topic, cfg.error_threshold)
    parts = collection.to_delayed()
    if not parts:
        raise ConfigError(f"collection={collection!r} has no partitions")
    options = (plugin_name, topic, cfg.error_threshold, cfg.run_max_try)
    if meta is None:
        meta = _infer_meta(client, parts[0], kind, plugin_name)
    empty = None if meta is None else meta.iloc[:0]
    outputs = [
        dask.delayed(_run_partition, pure=True)(
            part, i, *options, empty, dask_key_name=(f"daskrun-{name}", i)
        )
        for i, part in enumerate(parts)
    ]
    if empty is None:
        import dask.bag as db

        return db.from_delayed(outputs)
    import dask.dataframe as dd

    return dd.from_delayed(outputs, meta=empty, verify_meta=False)


def _current_client() -> Any:
    try:
        return get_client()
    except ValueError:
        raise ConfigError(
            "daskrun.map_partitions needs a Dask client to run init() on its "
            "workers; start one first: client = distributed.Client() (or pass "
            "client=)"
        ) from None


def _register(client: Any, plugin: EntryScriptPlugin) -> None:
    """``init()`` on every worker once: a plugin of this name already
    registered (the same script and options) is kept."""
    registered = client.run_on_scheduler(_plugin_names)
    if plugin.name in registered:
        return
    try:
        client.register_plugin(plugin, name=plugin.name)
    except EntryScriptError as e:
        raise JobFailedError(str(e)) from None


def _plugin_names(dask_scheduler: Any) -> list[str]:
    return list(dask_scheduler.worker_plugins)


def _report(client: Any, topic: str, threshold: int) -> None:
    """A warning on the client for each partition dropped."""

    def on_event(event: tuple[float, dict[str, Any]]) -> None:
        msg = event[1]
        logger.warning(
            "daskrun: partition %d failed after %d tries on %s (%s items): %s%s",
            msg["index"],
            msg["tries"],
            msg["worker"],
            msg["items"],
            msg["error"],
            "" if threshold == -1 else f" (error_threshold={threshold})",
        )

    client.subscribe_topic(topic, on_event)


def _infer_meta(client: Any, part: Any, kind: str, plugin_name: str) -> Any:
    """``run()``'s result on a few rows of the first partition, emptied: a
    DataFrame's columns, or ``None`` for a bag."""
    import dask

    sample = client.compute(dask.delayed(_sample)(part, plugin_name)).result()
    if isinstance(sample, BaseException):
        raise JobFailedError(
            f"run() failed on a sample ({SAMPLE_ROWS} rows) of the first "
            f"partition while inferring the result's type: {sample}; fix it, or "
            "pass meta= (an empty DataFrame of the result's columns)"
        )
    return sample


def _sample(part: Any, plugin_name: str) -> Any:
    import pandas as pd

    head = partition_items(part)[:SAMPLE_ROWS]
    result = _call(ready_plugin(plugin_name), head, 0)
    if not result.ok:
        return RuntimeError(result.error)
    if isinstance(result.value, pd.Series):
        return result.value.to_frame().iloc[:0]
    return result.value.iloc[:0] if isinstance(result.value, pd.DataFrame) else None


class _Called(NamedTuple):
    ok: bool
    value: Any
    error: str = ""
    traceback: str = ""


def _call(plugin: EntryScriptPlugin, data: Any, index: int) -> _Called:
    """One try of ``run(data)`` as a step's mini-batch runs: under the
    watchdog, its prints and logs captured, its error redacted."""
    start = time.perf_counter()
    args = (MiniBatchContext({}, index, None),) if plugin.takes_context else ()
    plugin.watchdog.arm(index, phase="run")
    try:
        with plugin.capture.redirect():
            value = plugin.module.run(data, *args)  # type: ignore[union-attr]
    except (Exception, SystemExit) as e:
        failed = _failure(index, 1, plugin.agent, None, start, e, plugin.clean)
        return _Called(False, None, failed.error or "", failed.traceback or "")
    finally:
        plugin.watchdog.disarm()
        # what run() printed goes to the worker's own output, as Dask's does
        stdout, log = plugin.capture.take()
        plugin.capture.logged.take()
        if stdout or log:
            sys.stdout.write(stdout + log)
    return _Called(True, value)


def _run_partition(
    part: Any,
    index: int,
    plugin_name: str,
    topic: str,
    threshold: int,
    max_try: int,
    empty: Any,
) -> Any:
    """The task of one output partition: ``run()`` up to ``max_try`` times;
    a partition that fails is reported and dropped, unless that takes the
    failed items beyond ``threshold``."""
    plugin = ready_plugin(plugin_name)
    part = partition_items(part)
    for _ in range(max_try):
        called = _call(plugin, part, index)
        if called.ok:
            return _result(called.value, empty)
    items = len(part)
    client = get_client()
    # logged on the scheduler before the count is read: of two partitions
    # failing at once, the later reader sees both
    client.log_event(
        topic,
        {
            "index": index,
            "tries": max_try,
            "worker": plugin.agent,
            "items": items,
            "error": called.error,
            "traceback": called.traceback,
            "time": time.time(),
        },
    )
    failures = sorted(
        (msg for _, msg in client.get_events(topic)), key=lambda m: m["time"]
    )
    failed = sum(m["items"] for m in failures)
    if threshold != -1 and failed > threshold:
        first = failures[0]
        raise JobFailedError(
            printable(
                f"error_threshold={threshold} exceeded: {failed} items failed in "
                f"{len(failures)} partitions. First failure: partition "
                f"{first['index']} on {first['worker']}: {first['error']}\n"
                f"{first['traceback']}"
            )
        )
    return [] if empty is None else empty


def _result(value: Any, empty: Any) -> Any:
    import pandas as pd

    if empty is None:
        return [] if value is None else list(value)
    if isinstance(value, pd.Series):
        value = value.to_frame()
    if not isinstance(value, pd.DataFrame):
        raise TypeError(
            f"run() returned {type(value).__name__}, not a DataFrame as the "
            "meta says; return a DataFrame from every partition"
        )
    return value


class CollectionInput:
    """A Dask dataframe or bag as a step's input: partition *i* is
    mini-batch *i*.

    It answers what a job asks of a data set (no files to list, nothing to
    ship); its :attr:`token` (``dask.base.tokenize`` of the collection's
    graph) stands for its content in the run record, so a resume can tell a
    changed collection from the same one.
    """

    kind = "collection"
    storage_options: Mapping[str, Any] = {}
    pandas_kwargs: Mapping[str, Any] = {}
    local = True
    partition_format = None
    given: list[str] = []
    name = None
    datastore = None  # never a registered data set

    def __init__(self, collection: Any):
        self.collection_kind = _check_collection(collection, "inputs item")
        self.collection = collection
        self.npartitions = int(collection.npartitions)
        self.token = collection_token(collection)
        self._parts: list[Any] | None = None

    @property
    def _path(self) -> str:
        """What the run record keeps of the input: its kind and token."""
        return f"dask-{self.collection_kind}:{self.token}"

    def files(self) -> list[str]:
        return []

    def stamps(self) -> Iterator[tuple[str, int, str]]:
        yield self._path, self.npartitions, self.token

    def partition_values(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return iter(())  # no partition_format: partition_keys are refused

    def spec(self) -> dict[str, Any]:
        raise ConfigError("a Dask collection is not a registered data set")

    def plan(self) -> list[CollectionBatch]:
        return [CollectionBatch(i) for i in range(self.npartitions)]

    def ledger_plan(self, index: int) -> tuple[str, int, str]:
        """What the ledger keeps of partition ``index``."""
        return self._path, index, self.token

    def submit(
        self,
        client: Any,
        plugin_name: str,
        group: list[tuple[CollectionBatch, int]],
        key: Any,
    ) -> Any:
        """Run ``group`` as one task whose dependencies are its partitions
        (computed where the scheduler puts them, dropped once used)."""
        import dask

        if self._parts is None:
            self._parts = self.collection.to_delayed()
        task = dask.delayed(process_collection_batches, pure=False)
        parts = [self._parts[batch.index] for batch, _ in group]
        return client.compute(task(plugin_name, group, *parts, dask_key_name=key))

    def __repr__(self) -> str:
        return (
            f"CollectionInput({self.collection_kind}, "
            f"npartitions={self.npartitions}, token={self.token[:12]})"
        )


def collection_token(collection: Any) -> str:
    """``dask.base.tokenize`` of a collection's graph, the same in every
    process for the same graph over the same files.

    A dataframe's expression is tokenized operand by operand, leaving out
    the caches of I/O expressions (``read_parquet`` keeps pyarrow objects
    there, whose tokens change with the process) but keeping the checksum
    of the files they hold, so rewritten files change the token.

    >>> import dask.bag as db
    >>> collection_token(db.from_sequence([1, 2])) == collection_token(
    ...     db.from_sequence([1, 2]))
    True
    """
    from dask.base import tokenize

    expr = getattr(collection, "expr", None)
    return tokenize(collection) if expr is None else _expr_token(expr)


def _expr_token(expr: Any) -> str:
    from dask.base import tokenize

    try:
        from dask._expr import Expr
    except ImportError:  # dask before its expressions: tokenize is stable
        return tokenize(expr)
    parts: list[Any] = [type(expr).__module__, type(expr).__qualname__]
    for name, operand in zip(expr._parameters, expr.operands, strict=False):
        if "cache" in name:
            if isinstance(operand, dict) and "checksum" in operand:
                parts.append((name, operand["checksum"]))
            continue
        parts.append(
            (name, _expr_token(operand) if isinstance(operand, Expr) else operand)
        )
    return tokenize(*parts)


def check_same_collection(given: Any, recorded: str, run_id: str) -> CollectionInput:
    """``given`` as the input of run ``run_id``, which read the collection
    ``recorded`` (its :attr:`CollectionInput._path`); refused if its token
    changed."""
    from .exceptions import InputError

    found = CollectionInput(given)
    if found._path != recorded:
        raise InputError(
            f"inputs=[{type(given).__name__}] is not the collection run "
            f"{run_id!r} read (its token {found.token[:12]} was "
            f"{recorded.rsplit(':', 1)[-1][:12]}): the data, the graph or a "
            "non-deterministic step (e.g. random numbers without a seed) "
            "changed; rerun the step instead of resuming it"
        )
    return found
