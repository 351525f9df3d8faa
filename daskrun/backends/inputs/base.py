"""What a step asks of its inputs: one class per kind of input.

Every kind of step input (files, tables, a Dask collection) is one subclass of
:class:`Input` with its own ``kind``; the subclass registers itself, so a new
kind of input is one new class. The job and the registry ask the input's class
(:attr:`ParallelRunStep.input_type`) to plan, to fill the ledger, to count
items, to rebuild itself from a run record, never compare its kind.

The kinds are :class:`~daskrun.backends.inputs.files.FileDataset`,
:class:`~daskrun.backends.inputs.tables.TabularDataset` and
:class:`~daskrun.backends.inputs.native.CollectionInput`. The tabular formats
follow the same pattern: one :class:`TableFormat` subclass per
``file_format``, :class:`~daskrun.backends.inputs.delimited.Delimited` (CSV)
and :class:`~daskrun.backends.inputs.parquet.Parquet`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

from daskrun.exceptions import ConfigError

Stamps = Iterator[tuple[str, int, str]]


class Input:
    """A kind of step input behind a small contract.

    Subclasses set ``kind`` (the name kept in run records) and answer, as
    class methods over the step's inputs of their kind: the mini-batch size
    (:meth:`size_of`), the plan (:meth:`plan_inputs`), the items it holds
    (:meth:`planned_items`), the ledger's entries (:meth:`fill_ledger`), how a
    failed mini-batch's unread items are counted (:meth:`unread_counter`),
    how its mini-batches become tasks (:meth:`task_of`), its record form
    (:meth:`from_record`, :meth:`from_spec`) and its dead letters
    (:meth:`dead_letters`).
    """

    kind: ClassVar[str] = ""
    # every concrete kind, by name: filled by __init_subclass__
    kinds: ClassVar[dict[str, type[Input]]] = {}
    # mini_batch_size="auto" runs a pilot of one-file mini-batches first
    # (files); else it is chosen from the input's sizes (tables)
    pilots: ClassVar[bool] = False
    # run() receives rows: a partition_format's keys become their columns
    keys_as_columns: ClassVar[bool] = False
    # the format of a tabular input's files; None: run() gets no rows of files
    file_format: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            Input.kinds[cls.kind] = cls

    @staticmethod
    def of_kind(kind: str) -> type[Input]:
        """The class of input ``kind`` (as a run record names it)."""
        try:
            return Input.kinds[kind]
        except KeyError:
            known = ", ".join(sorted(Input.kinds))
            raise ConfigError(
                f"input kind {kind!r} is unknown; known kinds: {known}"
            ) from None

    @classmethod
    def from_record(
        cls,
        record: Any,
        given: Sequence[Any] | None,
        storage_options: Mapping[str, Any],
        paths: Callable[[], list[tuple[Any, str | None]]],
    ) -> list[Any]:
        """The inputs a run ``record`` read (its ``kind``, ``inputs``,
        ``file_format``, ``pandas_kwargs``), built again: ``paths()`` gives
        each input's paths (signed URLs ``given`` again) and
        ``partition_format``; a collection is ``given`` again, checked."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, path: Any, spec: Mapping[str, Any]) -> Any:
        """A registered data set from its catalog ``spec`` (not listed yet)."""
        raise ConfigError(f"a {cls.kind} input is not a registered data set")

    @classmethod
    def dead_letters(
        cls, failed: list[str], storage_options: Callable[[], Mapping[str, Any]]
    ) -> Any:
        """The data set of a run's ``failed`` items where they are the
        inputs' own files (read with ``storage_options()``); ``None`` where
        they must be read again from the plan (rows)."""
        return None

    @classmethod
    def size_of(cls, value: object) -> int:
        """``mini_batch_size`` for this kind: a number of files, or bytes."""
        raise NotImplementedError

    @classmethod
    def step_size(cls, cfg: Any) -> int:
        """A step's mini-batch size from its resolved config."""
        return cls.size_of(cfg.mini_batch_size)

    @classmethod
    def plan_inputs(
        cls, inputs: Sequence[Any], size: int, pilot: int, own: str | None
    ) -> tuple[Iterable[Any], int]:
        """The mini-batches of ``inputs`` (leaving out the file ``own``), and
        their count."""
        raise NotImplementedError

    @classmethod
    def plan_around(
        cls,
        inputs: Sequence[Any],
        size: int,
        own: str | None,
        kept: Callable[[Sequence[str], int], int],
    ) -> tuple[Iterable[Any], int] | None:
        """For an incremental run: a plan lined up with an earlier run's
        mini-batches (``kept(files, i)``: how many files from ``files[i]`` on
        made one whose rows can be kept; 0: none). ``None``: the usual plan
        lines up already (its mini-batches never cross a file)."""
        return None

    @classmethod
    def planned_items(
        cls, inputs: Sequence[Any], batches: Any, own: str | None
    ) -> tuple[int | None, str]:
        """The items the plan holds (``None``: known once read), and how
        job_result.txt counts them."""
        raise NotImplementedError

    @classmethod
    def fill_ledger(
        cls,
        ledger: Any,
        inputs: Sequence[Any],
        batches: Any,
        stamps: Stamps,
        fresh_plan: Callable[[], Iterable[Any]],
    ) -> None:
        """Record the input files' ``stamps`` and a digest of each planned
        mini-batch (what it reads, its files' sizes and mtimes) in
        ``ledger``; ``fresh_plan`` plans again where ``batches`` is lazy."""
        raise NotImplementedError

    @classmethod
    def unread_counter(
        cls, inputs: Sequence[Any], records: bool
    ) -> Callable[[Any], int | None] | None:
        """How to count the items of a mini-batch whose try failed before
        they were counted; ``None``: its planned ``n_items``."""
        return None

    @classmethod
    def task_of(cls, inputs: Sequence[Any]) -> Callable[..., Any] | None:
        """What submits a group of mini-batches as one task; ``None``: the
        runner's own task."""
        return None


class TableFormat:
    """The format of a tabular input's files, behind a small contract.

    Subclasses set ``name`` (``file_format``: ``"csv"``, ``"parquet"``) and
    register themselves: a new format is one new class. Each answers the
    options it accepts, one file's column names, the plan of its files,
    reading one file whole, and writing rows (the failed rows of a run).
    """

    name: ClassVar[str] = ""
    # the Dataset.Tabular factory of a data set of this format
    factory: ClassVar[str] = ""
    # every format, by name: filled by __init_subclass__
    formats: ClassVar[dict[str, type[TableFormat]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            TableFormat.formats[cls.name] = cls

    @staticmethod
    def named(name: str) -> TableFormat:
        """The format ``name`` (a data set's ``file_format``)."""
        try:
            return TableFormat.formats[name]()
        except KeyError:
            known = ", ".join(sorted(TableFormat.formats))
            raise ConfigError(
                f"file_format={name!r} is unknown; known formats: {known}"
            ) from None

    def checked_options(self, pandas_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The pandas options this format reads with (none by default)."""
        return {}

    def columns(
        self, path: str, storage_options: Mapping[str, Any], pandas_kwargs: Any
    ) -> list[str]:
        """The column names of the file at ``path``."""
        raise NotImplementedError

    def plan(
        self,
        files: Sequence[str],
        size: int,
        storage_options: Mapping[str, Any],
        pandas_kwargs: Any,
        start: int,
    ) -> Iterator[Any]:
        """The mini-batches of ``files`` (about ``size`` bytes each), numbered
        from ``start``, never crossing a file boundary."""
        raise NotImplementedError

    def read_whole(
        self, path: str, storage_options: Mapping[str, Any], pandas_kwargs: Any
    ) -> Any:
        """The file at ``path``, read whole into a DataFrame."""
        raise NotImplementedError

    def write(self, frame: Any, path: Any) -> None:
        """Write ``frame``'s rows to the local file ``path``."""
        raise NotImplementedError


def read_piece(
    batch: Any, start: int, stop: int, spec: Any, cache_root: str
) -> tuple[Any, int | None, str | None]:
    """Rows ``[start, stop)`` of a tabular ``batch``, read as the whole
    mini-batch is and sliced."""
    frame, _, _ = batch.read(spec, cache_root)
    piece = frame.iloc[start:stop]
    return piece, len(piece), None
