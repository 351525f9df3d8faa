"""Dask collections as inputs: what is one, a collection as a step's input
(:class:`CollectionInput`: partition *i* is mini-batch *i*), and the token
that tells a resume whether it is the same collection.
:mod:`daskrun.engine.maprun` runs :func:`~daskrun.engine.maprun.map_partitions`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from daskrun.backends.inputs.base import Input
from daskrun.backends.inputs.datasets import CollectionBatch
from daskrun.engine.tasks import process_collection_batches
from daskrun.exceptions import ConfigError


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


def check_collection(collection: Any, what: str) -> str:
    kind = _collection_kind(collection)
    if kind is None:
        raise ConfigError(
            f"{what}={type(collection).__name__} is not a Dask dataframe or bag; "
            "pass e.g. dd.read_parquet('in/') or db.from_sequence(paths)"
        )
    return kind


class CollectionInput(Input):
    """A Dask dataframe or bag as a step's input: partition *i* is
    mini-batch *i*.

    It answers what a job asks of a data set (no files to list, nothing to
    ship); its :attr:`token` (``dask.base.tokenize`` of the collection's
    graph) stands for its content in the run record, so a resume can tell a
    changed collection from the same one.
    """

    kind = "collection"
    keys_as_columns = True  # (no partition_format: partition_keys are refused)
    storage_options: Mapping[str, Any] = {}
    pandas_kwargs: Mapping[str, Any] = {}
    local = True
    partition_format = None
    given: list[str] = []
    name = None
    datastore = None  # never a registered data set

    @classmethod
    def step_size(cls, cfg: Any) -> int:
        """A collection's partitions are its mini-batches, as they are:
        ``mini_batch_size`` and ``partition_keys`` are refused."""
        given = (
            f"mini_batch_size={cfg.mini_batch_size!r}"
            if cfg.mini_batch_size is not None
            else f"partition_keys={list(cfg.partition_keys)!r}"
            if cfg.partition_keys
            else None
        )
        if given is not None:
            raise ConfigError(
                f"{given} does not apply to a Dask collection input: each of its "
                "partitions is one mini-batch; drop it, and repartition the "
                "collection instead (ddf.repartition(partition_size='10MB'))"
            )
        return 1

    @classmethod
    def from_record(
        cls,
        record: Any,
        given: Sequence[Any] | None,
        storage_options: Mapping[str, Any],
        paths: Callable[[], list[tuple[Any, str | None]]],
    ) -> list[Any]:
        """The collection ``given`` again, checked against its recorded
        token."""
        run_id = record.run_id
        if given is None or len(given) != len(record.inputs):
            raise ConfigError(
                f"run {run_id!r} read a Dask collection; pass it again: "
                f"resume({run_id!r}, inputs=[ddf])"
            )
        return [
            check_same_collection(item, str(path), run_id)
            for item, path in zip(given, record.inputs, strict=True)
        ]

    @classmethod
    def plan_inputs(
        cls, inputs: Sequence[Any], size: int, pilot: int, own: str | None
    ) -> tuple[Iterable[Any], int]:
        parts = [b for ds in inputs for b in ds.plan()]  # one per partition
        return parts, len(parts)

    @classmethod
    def planned_items(
        cls, inputs: Sequence[Any], batches: Any, own: str | None
    ) -> tuple[int | None, str]:
        return None, (
            f"rows or items of finished mini-batches ({len(batches)} "
            "partitions of a Dask collection planned)"
        )

    @classmethod
    def fill_ledger(
        cls,
        ledger: Any,
        inputs: Sequence[Any],
        batches: Any,
        stamps: Iterator[tuple[str, int, str]],
        fresh_plan: Callable[[], Iterable[Any]],
    ) -> None:
        """Its token stands for its content."""
        (collection,) = inputs
        for path, size, stamp in stamps:
            ledger.file(path, size, stamp)
        for batch in batches:
            ledger.mini_batch(collection.ledger_plan(batch.index), [])

    @classmethod
    def task_of(cls, inputs: Sequence[Any]) -> Callable[..., Any] | None:
        """A collection's partitions are the tasks' dependencies."""
        return inputs[0].submit

    def __init__(self, collection: Any):
        self.collection_kind = check_collection(collection, "inputs item")
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
    ) -> tuple[Any, Any]:
        """Run ``group`` as one task whose dependencies are its partitions
        (computed where the scheduler puts them, dropped once used)."""
        import dask

        if self._parts is None:
            self._parts = self.collection.to_delayed()
        task = dask.delayed(process_collection_batches, pure=False)
        parts = [self._parts[batch.index] for batch, _ in group]
        future = client.compute(task(plugin_name, group, *parts, dask_key_name=key))
        return future, future

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
    from daskrun.exceptions import InputError

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
