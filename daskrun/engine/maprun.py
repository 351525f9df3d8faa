"""``daskrun.map_partitions``: a script over a Dask collection's partitions,
each a mini-batch of the engine's runner (:class:`MapRun`).

``init()`` runs once per worker process through the same
:class:`~daskrun.engine.plugin.EntryScriptPlugin` as a step's (kept for later runs
of the same script and options); each partition gets a step's tries,
``error_threshold``, watchdog, lost and frozen workers, counts, log folder
and ``/daskrun`` page. What ``run()`` returned stays on the workers and
comes back as a lazy collection that composes with whatever Dask does next
(``.to_parquet()``, a join, a second model); :meth:`MapRun.write` writes it
to one file as a step writes its output.

The partitions run when :func:`map_partitions` is called, as ``persist()``
would run them: distributed builds a computation's tasks on the scheduler,
so no client-side code sees a ``compute()`` begin, and the runner needs a
coordinator that outlives the workers a partition may kill or hang.

>>> import dask.dataframe as dd, daskrun  # doctest: +SKIP
>>> ddf = dd.read_parquet("in/")  # doctest: +SKIP
>>> scored = daskrun.map_partitions("score.py", ddf)  # doctest: +SKIP
>>> scored.to_parquet("out/")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distributed import get_client

from daskrun.backends.compute.cluster import dashboard_link
from daskrun.backends.inputs.datasets import CollectionBatch
from daskrun.backends.inputs.native import check_collection
from daskrun.engine.bundle import build_bundle
from daskrun.engine.config import (
    ParallelRunConfig,
    ResolvedConfig,
    config_get,
    config_seconds,
)
from daskrun.engine.output import (
    OutputTarget,
    assemble,
    format_rows,
    lock_output,
    prepare_parts,
    remove_parts,
    write_part,
)
from daskrun.engine.plugin import (
    EntryScriptPlugin,
    InputSpec,
    PluginSettings,
    TryResult,
)
from daskrun.engine.runner import Counts, Hooks, Runner, Tally, threshold_error
from daskrun.engine.tasks import (
    PartitionValues,
    partition_items,
    process_collection_batches,
    process_mini_batches,
)
from daskrun.exceptions import ConfigError, EntryScriptError, JobFailedError
from daskrun.monitoring.dashboard import install_page, publish
from daskrun.monitoring.monitor import JobLogs

logger = logging.getLogger("daskrun")

# the sample map_partitions runs run() on to infer its result's type
SAMPLE_ROWS = 2


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
        PluginSettings(
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
    collection, as mini-batches of daskrun's runner; the results as a lazy
    collection, one partition per input partition, in order (an empty one
    for a dropped partition); :func:`map_run` gives its :class:`MapRun`.

    The partitions run when this is called, as a ``persist()`` would run
    them: the runner needs the client to outlive the workers that a
    partition may kill or hang. What ``run()`` returned stays in the
    workers' memory until the returned collection is dropped.

    Parameters
    ----------
    entry_script : str
        Python file with ``init()`` and ``run(mini_batch)``. ``run`` gets a
        dataframe's partition as a ``pandas.DataFrame``, a bag's as a list;
        it returns a DataFrame, or a list with one element per input (a
        ``str`` is refused, as a step refuses it).
    collection : dask.dataframe.DataFrame or dask.bag.Bag
    meta : pandas.DataFrame, optional
        The result's columns and dtypes. Without it, ``run()`` is called
        once on the first ``SAMPLE_ROWS`` rows (items) of the first
        partition: a DataFrame result makes the output a dataframe, anything
        else a bag of the items ``run()`` returns.
    arguments, source_directory, environment_variables, run_invocation_timeout,
    run_max_try, logging_level
        As :class:`~daskrun.ParallelRunConfig`: a partition whose ``run()``
        raises, kills its worker or hangs is tried ``run_max_try`` times.
    error_threshold : int
        Items of failed partitions tolerated (``-1``: all). A failed
        partition within it is dropped and reported (a warning, the events
        of topic ``daskrun-<name>``, :meth:`MapRun.failed_items`); beyond it,
        the rest is cancelled and computing the result raises
        :class:`~daskrun.JobFailedError`, naming the first failure.
    name : str, optional
        The run's name (task keys and the events topic); by default
        ``<script>-<token of script, options and input>``.
    client : distributed.Client, optional
        Where it runs; default the current client.

    Examples
    --------
    >>> scored = daskrun.map_partitions("score.py", ddf)  # doctest: +SKIP
    >>> scored.to_parquet("out/")  # doctest: +SKIP
    """
    kind = check_collection(collection, "collection")
    _check_meta(meta)
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
    run = _map_run(client, cfg, collection, kind, meta, name, arguments or ())
    run.run(client)
    return _kept_result(run)


def _map_run(
    client: Any,
    cfg: ResolvedConfig,
    collection: Any,
    kind: str,
    meta: Any,
    name: str | None,
    arguments: Sequence[Any],
) -> MapRun:
    """The run of ``collection``'s partitions, its plugin registered and
    its result's type inferred where ``meta`` does not give it."""
    from dask.base import tokenize

    plugin, script_token = _script_plugin(cfg, arguments)
    _register(client, plugin)
    parts = collection.to_delayed()
    if not parts:
        raise ConfigError(f"collection={collection!r} has no partitions")
    warm: dict[int, Any] = {}
    if meta is None:
        # the sample's partition stays in memory for the run's first task,
        # which would otherwise compute (read) it again
        warm[0] = client.persist(parts[0])
        meta = _infer_meta(client, warm[0], plugin.name)
    stem = os.path.splitext(os.path.basename(cfg.entry_script))[0]
    run = MapRun(
        name or f"{stem}-{tokenize(script_token, collection, cfg)[:16]}",
        cfg,
        plugin,
        (collection, kind, parts),
        None if meta is None else _frame(meta).iloc[:0],
    )
    run.warm = warm
    return run


def _script_plugin(
    cfg: ResolvedConfig, arguments: Sequence[Any]
) -> tuple[EntryScriptPlugin, str]:
    """The plugin of a script and its options, and their token: one plugin
    per script and options, so ``init()`` runs once per worker process for
    all the runs of that script."""
    from dask.base import tokenize

    stem = os.path.splitext(os.path.basename(cfg.entry_script))[0]
    # the bundle's name changes with any shipped file (a helper module too)
    bundle = build_bundle(cfg.entry_script, cfg.source_directory)
    script_token = tokenize(
        str(bundle[0]),
        cfg.source_directory,
        list(arguments),
        dict(cfg.environment_variables),
        cfg.run_invocation_timeout,
        cfg.logging_level,
    )
    plugin = _entry_plugin(
        f"daskrun-map-{stem}-{script_token[:12]}",
        cfg,
        arguments,
        os.path.abspath("."),
        bundle,
    )
    return plugin, script_token


def _kept_result(run: MapRun) -> Any:
    """``run``'s result collection, by whose name :func:`map_run` finds
    ``run`` for as long as the collection lives."""
    result = run.result()
    key = result._name if hasattr(result, "_name") else result.name
    _RUNS[key] = run
    weakref.finalize(result, _RUNS.pop, key, None)
    return result


# the runs of map_partitions by the name of the collection each returned,
# for as long as that collection lives
_RUNS: dict[str, MapRun] = {}


def map_run(collection: Any) -> MapRun:
    """The :class:`MapRun` that made ``collection``, a result of
    :func:`map_partitions`: its counts, log folder and failed items.

    >>> daskrun.map_run(scored).failed_items()  # doctest: +SKIP
    """
    key = getattr(collection, "_name", None) or getattr(collection, "name", None)
    run = _RUNS.get(str(key))
    if run is None:
        raise ConfigError(
            f"collection={type(collection).__name__} was not returned by "
            "daskrun.map_partitions; pass the collection it returned, before any "
            "further Dask operation"
        )
    return run


class MapRun:
    """One run of an entry script over the partitions of a Dask collection:
    partition *i* is mini-batch *i* of a :class:`~daskrun.engine.runner.Runner`.

    Each task runs a group of partitions through the plugin's task function
    (:func:`~daskrun.engine.tasks.process_collection_batches`) and keeps what
    ``run()`` returned on its worker (:class:`PartitionValues`); the runner
    waits on a small future of the task's results only. So a partition
    gets a step's tries, ``error_threshold``, watchdog, frozen and lost
    workers, counts, a log folder (``<runs-dir>/<run id>/logs``) and the
    ``/daskrun`` page, each run (each call) counted afresh.

    Attributes
    ----------
    run_id : str
    tally : Tally
        The run's counts.
    error : str or None
        The exceeded threshold, naming the first failure; computing the
        result raises it.
    last_errors : dict
        Each failed partition's index and its last exception.
    logs_dir : Path
    page : str or None
        The run's ``/daskrun`` page (with its token), where the scheduler
        serves a dashboard.
    """

    def __init__(
        self,
        name: str,
        cfg: ResolvedConfig,
        plugin: EntryScriptPlugin,
        input: tuple[Any, str, Sequence[Any]],
        empty: Any,
    ):
        self.name, self.cfg, self.plugin = name, cfg, plugin
        # the collection, its kind ("dataframe" or "bag") and its partitions
        self.source, self.kind, self.parts = input
        self.empty = empty
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self.run_id = f"{name[:40]}_{stamp}_{secrets.token_hex(3)}"
        self.logs_dir = Path(os.path.expanduser(config_get("runs-dir")))
        self.logs_dir = self.logs_dir / self.run_id / "logs"
        self.tally = Tally(len(self.parts))
        self.error: str | None = None
        self.last_errors: dict[int, str] = {}
        self.topic = f"daskrun-{name}"
        self._client: Any = None
        self._tried: dict[tuple[int, int], Any] = {}  # (index, try) -> its task
        self._values: dict[int, Any] = {}  # index -> the task holding its value
        self._published = 0.0
        self._pieces: list[Any] = []  # the result's partitions
        self._kept: set[int] = set()  # those that hold a value
        # partitions already computed (the sample's), until the run ends
        self.warm: dict[int, Any] = {}
        self.page: str | None = None

    def run(self, client: Any) -> None:
        """Run every partition to its outcome, or until a threshold is
        exceeded (then :attr:`error` says which)."""
        self._client, started = client, time.perf_counter()
        self.logs = JobLogs(self.logs_dir)
        link = dashboard_link(client)
        self.page = install_page(client, link) if link else None
        logger.info(
            "daskrun: map run %s: %d partitions%s",
            self.run_id,
            len(self.parts),
            f" (this run: {self.page})" if self.page else "",
        )
        self.logs.running(self.tally)
        status = "Failed"
        try:
            exceeded = Runner(
                client,
                self.plugin,
                self.tally,
                self.cfg,
                key_prefix=f"daskrun-{self.name}-{self.run_id[-6:]}",
                hooks=Hooks(
                    on_done=self._done, count_rows=self._count, task=self._submit
                ),
                progress_timeout=config_seconds("progress-timeout"),
                first_result_timeout=config_seconds("first-result-timeout"),
            ).run(CollectionBatch(i) for i in range(len(self.parts)))
            if exceeded:
                error = threshold_error(exceeded, self.tally, self.cfg, self.run_id)
                self.error = str(error)
                logger.warning("daskrun: map run %s failed: %s", self.run_id, error)
            else:
                status = "Completed"
        except JobFailedError as e:
            self.error = str(e)
            raise
        finally:
            self._tried.clear()
            self.warm.clear()
            self._publish(status, force=True)
            self.logs.finish(
                status=status,
                run_id=self.run_id,
                tally=self.tally,
                error=self.error,
                output_path=None,
                seconds=time.perf_counter() - started,
            )

    def result(self) -> Any:
        """The lazy collection of what ``run()`` returned, partition by
        partition; every partition raises :attr:`error` if the run failed."""
        import dask

        key = f"daskrun-{self.name}-{self.run_id[-6:]}-out"
        pieces = []
        self._kept = set(self._values)
        for i in range(len(self.parts)):
            if self.error is not None:
                piece = dask.delayed(_raise)(self.error, dask_key_name=(key, i))
            elif i in self._values:
                piece = dask.delayed(_value)(self._values[i], i, dask_key_name=(key, i))
            else:
                piece = dask.delayed(_empty)(self.empty, dask_key_name=(key, i))
            pieces.append(piece)
        self._values.clear()  # the collection holds them now
        self._pieces = pieces  # for write()
        if self.empty is None:
            import dask.bag as db

            return db.from_delayed(pieces)
        import dask.dataframe as dd

        return dd.from_delayed(pieces, meta=self.empty, verify_meta=False)

    def write(
        self,
        output: str,
        output_format: str = "csv",
        file_name: str = "parallel_run_step.txt",
        storage_options: Mapping[str, Any] | None = None,
    ) -> str:
        """Write the result to one file in the folder ``output``, as a step
        writes its output; returns the file's path or URL.

        Each worker formats its partitions with the step's writer (Arrow's
        CSV writer, Parquet, or text lines: ``output_format`` as
        :class:`~daskrun.ParallelRunConfig`'s), in parallel, as parts; the
        client assembles them in partition order and publishes the file
        atomically, exactly once (:func:`daskrun.engine.output.assemble`).
        A dropped partition adds no rows. Faster than a collection's
        ``to_csv(single_file=True)``, which formats every row with pandas,
        one partition after another.

        >>> daskrun.map_run(scored).write("out/")  # doctest: +SKIP
        """
        import dask

        if self.error is not None:
            raise JobFailedError(self.error)
        target = OutputTarget(
            output,
            file_name,
            self.run_id,
            dict(storage_options or {}),
            output_format,
            float(config_get("storage-timeout")),
        )
        kept = self._kept
        with lock_output(target) if target.local else contextlib.nullcontext():
            prepare_parts(target)
            writes = [
                dask.delayed(_write_part, pure=False)(self._pieces[i], target, i)
                for i in sorted(kept)
            ]
            self._client.gather(self._client.compute(writes))
            final = assemble(target, [i in kept for i in range(len(self.parts))])
            remove_parts(target)
        return final

    def failed_items(self) -> Any:
        """The dead letters: the partitions that failed, as a collection of
        the input's kind (a dataframe's partitions, a bag of their items),
        to inspect or to run again once fixed; :attr:`last_errors` says why
        each failed."""
        if not self.last_errors:
            raise ConfigError(
                f"map run {self.run_id!r} has no failed items; failed_items() is "
                "the collection of the partitions that failed"
            )
        failed = sorted(self.last_errors)
        partitions = getattr(self.source, "partitions", None)
        if partitions is not None:  # a dataframe's: a bag has none
            return partitions[failed]
        import dask.bag as db

        return db.from_delayed([self.parts[i] for i in failed])

    def _submit(
        self, client: Any, plugin_name: str, group: list[tuple[Any, int]], key: Any
    ) -> tuple[Any, Any]:
        """One task over ``group``'s partitions (its dependencies), keeping
        their values; and the small future of its results."""
        import dask

        task = dask.delayed(_run_partitions, pure=False)
        parts = [self.warm.get(b.index, self.parts[b.index]) for b, _ in group]
        running = client.compute(
            task(plugin_name, self.empty is not None, group, *parts, dask_key_name=key)
        )
        for batch, try_no in group:
            self._tried[(batch.index, try_no)] = running
        results = client.submit(
            _results_of, running, key=(f"{key[0]}-results", *key[1:]), pure=False
        )
        return running, results

    def _done(self, batch: Any, result: TryResult, tries: int, counts: Counts) -> None:
        """One partition's outcome: its value kept, or it is dropped."""
        running = self._tried.pop((batch.index, tries), None)
        if result.ok and running is not None:
            self._values[batch.index] = running
        self.logs.mini_batch(result, tries, counts)
        self.logs.user_output(result)
        if counts.failed:
            self.logs.failed_items(batch, result)
        if not result.ok:
            self.last_errors[batch.index] = result.error or ""
            self._dropped(batch.index, result, tries, counts.items_in)
        self._publish("Running")

    def _dropped(self, index: int, result: TryResult, tries: int, items: int) -> None:
        """Report a partition that failed its last try: a warning, and an
        event of topic ``daskrun-<name>``."""
        threshold = self.cfg.error_threshold
        logger.warning(
            "daskrun: partition %d failed after %d tries on %s (%s items): %s%s",
            index,
            tries,
            result.worker,
            items,
            result.error,
            "" if threshold == -1 else f" (error_threshold={threshold})",
        )
        self._client.log_event(
            self.topic,
            {
                "run_id": self.run_id,
                "index": index,
                "tries": tries,
                "worker": result.worker,
                "items": items,
                "error": result.error,
                "traceback": result.traceback,
                "time": time.time(),
            },
        )

    def _count(self, batch: Any) -> int | None:
        """The items of a partition whose try died before counting them."""
        import dask

        try:
            part = self.parts[batch.index]
            return int(self._client.compute(dask.delayed(_items)(part)).result())
        except Exception:  # it cannot be computed: counted as one
            return None

    def _publish(self, status: str, force: bool = False) -> None:
        """The run's state for the ``/daskrun`` page, at most once a second."""
        now_ = time.monotonic()
        if force or now_ - self._published >= 1.0:
            self._published = now_
            snap = self.logs.snapshot(self.tally, status)
            self.logs.overview(snap)
            publish(self._client, self.run_id, snap)


def _check_meta(meta: Any) -> None:
    import pandas as pd

    if meta is not None and not isinstance(meta, (pd.DataFrame, pd.Series)):
        raise ConfigError(
            f"meta={meta!r} is not a DataFrame; pass an empty DataFrame of the "
            "result's columns, e.g. meta=pd.DataFrame({'id': [], 'score': []}), "
            "or leave it out to infer it"
        )


def _frame(meta: Any) -> Any:
    return meta.to_frame() if hasattr(meta, "to_frame") else meta


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


def _infer_meta(client: Any, part: Any, plugin_name: str) -> Any:
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


# --- on the workers ----------------------------------------------------------


def _sample(part: Any, plugin_name: str) -> Any:
    import pandas as pd

    head = partition_items(part)[:SAMPLE_ROWS]
    kept = PartitionValues(frame=None)
    (tried,) = process_mini_batches(
        plugin_name, [(CollectionBatch(0, data=head), 1)], kept
    )
    if not tried.ok:
        return RuntimeError(tried.error)
    value = kept.values[0]
    return value.iloc[:0] if isinstance(value, pd.DataFrame) else None


def _run_partitions(
    plugin_name: str,
    frame: bool,
    tries: Sequence[tuple[CollectionBatch, int]],
    *partitions: Any,
) -> tuple[list[TryResult], dict[int, Any]]:
    """The task of a group of partitions: their results and their values."""
    kept = PartitionValues(frame)
    results = process_collection_batches(plugin_name, tries, *partitions, kept=kept)
    return results, kept.values


def _results_of(ran: tuple[list[TryResult], dict[int, Any]]) -> list[TryResult]:
    return ran[0]


def _value(ran: tuple[list[TryResult], dict[int, Any]], index: int) -> Any:
    return ran[1][index]


def _write_part(value: Any, target: OutputTarget, index: int) -> None:
    """Partition ``index``'s rows, formatted as a step's, as its part."""
    data, _ = format_rows(value, target.output_format)
    write_part(target, index, data)


def _empty(empty: Any) -> Any:
    return [] if empty is None else empty


def _items(part: Any) -> int:
    return len(partition_items(part))


def _raise(error: str) -> Any:
    raise JobFailedError(error)
