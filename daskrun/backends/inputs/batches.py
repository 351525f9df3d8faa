"""Mini-batch plans: plain frozen records the runner ships to workers.

- :class:`FileBatch` — ``mini_batch_size`` files; mini-batch *i* holds files
  ``[i*n, (i+1)*n)`` in path order.
- :class:`~daskrun.backends.inputs.delimited.CsvBatch` — a whole CSV file, or
  a byte range of one cut on record boundaries.
- :class:`~daskrun.backends.inputs.parquet.ParquetBatch` — some row groups of
  one Parquet file.
- :class:`PartitionBatch` — every file of one partition.
- :class:`CollectionBatch` — one partition of a Dask collection.
- :class:`SubBatch` — a piece of a failed mini-batch, run to isolate what fails.

No mini-batch ever crosses a file boundary. Each reads itself on a worker
(``read``: what ``run()`` receives) and says which files ``run()`` gets.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from daskrun.backends.inputs.delimited import CsvBatch
from daskrun.backends.inputs.listing import StorageOptions
from daskrun.backends.inputs.parquet import ParquetBatch
from daskrun.backends.inputs.partitions import (
    check_partition_keys,
    parse_partition_keys,
)
from daskrun.backends.inputs.readers import localize_files, read_partition

if TYPE_CHECKING:
    pass


@dataclass(frozen=True, slots=True)
class FileBatch:
    """Files (in path order) as mini-batch ``index``.

    The paths travel as one NUL-separated string: a task carrying a thousand
    mini-batches is then a few thousand objects for the scheduler to unpickle,
    not tens of thousands.
    """

    index: int
    joined: str
    isolable: ClassVar[bool] = True  # a failed one is halved to find its bad files

    @classmethod
    def of(cls, index: int, paths: Sequence[str]) -> FileBatch:
        return cls(index, "\0".join(paths))

    def read(self, spec: Any, cache_root: str) -> tuple[Any, int | None, str | None]:
        """What ``run()`` receives (local paths), the items reading counted
        (none), and the folder to delete afterwards."""
        if spec.local:
            return self.paths, None, None
        paths, cache = localize_files(self.paths, spec.storage_options, cache_root)
        return paths, None, cache

    def read_piece(
        self, start: int, stop: int, spec: Any, cache_root: str
    ) -> tuple[Any, int | None, str | None]:
        """:meth:`read` of files ``[start, stop)``."""
        return FileBatch.of(self.index, self.paths[start:stop]).read(spec, cache_root)

    def input_files(self) -> list[str] | None:
        """The files ``run()`` gets the paths of."""
        return self.paths

    @property
    def paths(self) -> list[str]:
        return self.joined.split("\0")

    @property
    def n_items(self) -> int | None:
        return self.joined.count("\0") + 1

    def describe(self) -> str:
        paths = self.paths
        names = ", ".join(os.path.basename(p) for p in paths[:3])
        more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
        return f"files {names}{more}"


@dataclass(frozen=True)
class CollectionBatch:
    """Partition ``index`` of a Dask collection given as a step's input.

    The plan is the number alone; ``data``, the computed partition, is set
    on the worker, where the partition arrives as a task argument.
    """

    index: int
    data: Any = field(default=None, repr=False, compare=False)
    isolable: ClassVar[bool] = False

    @property
    def n_items(self) -> int | None:
        return None  # rows or items, known once computed

    def read(self, spec: Any, cache_root: str) -> tuple[Any, int | None, str | None]:
        return self.data, len(self.data), None  # a partition, computed by Dask

    def input_files(self) -> list[str] | None:
        return None

    def describe(self) -> str:
        return f"partition {self.index} of the Dask collection"


@dataclass(frozen=True)
class PartitionBatch:
    """Every file of one partition as mini-batch ``index``.

    ``key_value`` holds ``(key, value)`` in ``partition_keys`` order;
    ``file_format`` is ``None`` for files (``run()`` gets their paths), else
    ``"csv"`` or ``"parquet"`` (``run()`` gets all their rows, read whole).
    The paths travel NUL-joined, as in
    :class:`~daskrun.backends.inputs.datasets.FileBatch`.
    """

    index: int
    joined: str
    key_value: tuple[tuple[str, Any], ...]
    file_format: str | None = None
    isolable: ClassVar[bool] = False

    @property
    def paths(self) -> list[str]:
        return self.joined.split("\0")

    @property
    def partition_key_value(self) -> dict[str, Any]:
        return dict(self.key_value)

    @property
    def n_items(self) -> int | None:
        # rows of tabular files are known only once read
        return None if self.file_format else self.joined.count("\0") + 1

    def count_unread(self, dataset: Any, records: bool) -> int | None:
        return self.n_items

    def read(self, spec: Any, cache_root: str) -> tuple[Any, int | None, str | None]:
        """Its files' local paths, or all rows of its tabular files; the rows
        read; the folder to delete afterwards."""
        mini_batch, cache = read_partition(
            self,
            spec.storage_options,
            spec.pandas_kwargs,
            spec.partition_format,
            spec.local,
            cache_root,
        )
        rows = len(mini_batch) if self.file_format is not None else None
        return mini_batch, rows, cache

    def rows(
        self,
        storage_options: StorageOptions,
        pandas_kwargs: Any,
        partition_format: str | None,
    ) -> Any:
        """All rows of its tabular files, read whole, nothing copied."""
        frame, _ = read_partition(
            self, storage_options, pandas_kwargs, partition_format, True, ""
        )
        return frame

    def input_files(self) -> list[str] | None:
        """Its files, where ``run()`` gets their paths."""
        return self.paths if self.file_format is None else None

    def describe(self) -> str:
        keys = ", ".join(f"{k}={v!s}" for k, v in self.key_value)
        n = self.joined.count("\0") + 1
        return f"partition {keys} ({n} file{'s' if n > 1 else ''})"


MiniBatch = FileBatch | CsvBatch | ParquetBatch | PartitionBatch | CollectionBatch


@dataclass(frozen=True)
class SubBatch:
    """Items ``[start, stop)`` of mini-batch ``parent``: a piece of a
    mini-batch whose last try failed, run to find the items that fail
    (:class:`daskrun.engine.runner.Isolation`).

    Its files are a slice of the parent's paths; its rows are read as the
    parent's (the same reader, CSV byte range or Parquet row groups) and
    sliced. Its rows go to a part of their own, at the parent's place in
    the output.

    >>> piece = SubBatch(FileBatch.of(4, ["a", "b", "c"]), 1, 3)
    >>> piece.index, piece.n_items, piece.describe()
    (4, 2, 'files b, c of mini-batch 4')
    >>> [(h.start, h.stop) for h in piece.halves()]
    [(1, 2), (2, 3)]
    """

    parent: FileBatch | CsvBatch | ParquetBatch
    start: int
    stop: int
    isolable: ClassVar[bool] = False

    def read(self, spec: Any, cache_root: str) -> tuple[Any, int | None, str | None]:
        """A slice of the parent's files, or its rows read as for the parent
        and sliced."""
        return self.parent.read_piece(self.start, self.stop, spec, cache_root)

    def count_unread(self, dataset: Any, records: bool) -> int | None:
        return self.n_items

    @property
    def index(self) -> int:
        return self.parent.index

    @property
    def n_items(self) -> int:
        return self.stop - self.start

    @property
    def paths(self) -> list[str]:
        assert isinstance(self.parent, FileBatch)
        return self.parent.paths[self.start : self.stop]

    def describe(self) -> str:
        """Its items as a user counts them: files by name; rows numbered
        from 0 as pandas does, the last one included (``row 0``, ``rows
        3-5``), in the file where the mini-batch starts at the file's start,
        else among the mini-batch's rows.

        >>> SubBatch(CsvBatch(0, "iris.csv", 0, 1026), 0, 1).describe()
        'row 0 of iris.csv bytes 0-1026'
        >>> SubBatch(CsvBatch(1, "iris.csv", 1026, 900), 3, 6).describe()
        "rows 3-5 of mini-batch 1's rows (iris.csv bytes 1026-1926)"
        """
        parent = self.parent
        if isinstance(parent, FileBatch):
            files = FileBatch.of(self.index, self.paths).describe()
            return f"{files} of mini-batch {self.index}"
        rows = (
            f"row {self.start}"
            if self.n_items == 1
            else f"rows {self.start}-{self.stop - 1}"
        )
        at_start = (
            parent.offset == 0
            if isinstance(parent, CsvBatch)
            else parent.row_groups[0] == 0
        )
        if at_start:
            return f"{rows} of {parent.describe()}"
        return f"{rows} of mini-batch {self.index}'s rows ({parent.describe()})"

    def halves(self) -> tuple[SubBatch, SubBatch]:
        middle = (self.start + self.stop) // 2
        return (
            SubBatch(self.parent, self.start, middle),
            SubBatch(self.parent, middle, self.stop),
        )


def plan_files(files: Sequence[str], n: int, pilot: int = 0) -> Iterator[FileBatch]:
    """Mini-batch *i* holds ``files[i*n:(i+1)*n]``; with a ``pilot``
    (``mini_batch_size="auto"``), the first ``pilot`` mini-batches hold one
    file each, and the rest ``n`` each from there on.

    >>> [b.paths for b in plan_files(["a", "b", "c"], 2)]
    [['a', 'b'], ['c']]
    >>> [b.paths for b in plan_files(["a", "b", "c", "d", "e"], 2, pilot=2)]
    [['a'], ['b'], ['c', 'd'], ['e']]
    """
    k = min(pilot, len(files))
    for i in range(k):
        yield FileBatch.of(i, files[i : i + 1])
    for i in range(k, len(files), n):
        yield FileBatch.of(k + (i - k) // n, files[i : i + n])


def plan_files_around(
    files: Sequence[str], n: int, kept: Callable[[Sequence[str], int], int]
) -> list[FileBatch]:
    """:func:`plan_files` lined up with an earlier run's mini-batches, for an
    incremental run: where ``kept(files, i)`` is ``k > 0``, ``files[i:i+k]``
    are an earlier mini-batch whose rows can be kept, planned as one
    mini-batch; the files between them are planned ``n`` at a time.

    >>> old = {"b": 2}
    >>> [b.paths for b in plan_files_around(
    ...     ["a", "b", "c", "d", "e", "f"], 2, lambda fs, i: old.get(fs[i], 0))]
    [['a'], ['b', 'c'], ['d', 'e'], ['f']]
    """
    batches: list[FileBatch] = []
    run: list[str] = []

    def flush() -> None:
        for start in range(0, len(run), n):
            batches.append(FileBatch.of(len(batches), run[start : start + n]))
        run.clear()

    i = 0
    while i < len(files):
        k = kept(files, i)
        if k:
            flush()
            batches.append(FileBatch.of(len(batches), files[i : i + k]))
            i += k
        else:
            run.append(files[i])
            i += 1
    flush()
    return batches


def file_batch_count(n_files: int, n: int, pilot: int = 0) -> int:
    """How many mini-batches :func:`plan_files` makes.

    >>> file_batch_count(5, 2), file_batch_count(5, 2, 2), file_batch_count(1, 2, 8)
    (3, 4, 1)
    """
    k = min(pilot, n_files)
    return k + math.ceil((n_files - k) / n)


def file_batch_at(
    files: Sequence[str], index: int, n: int, pilot: int = 0
) -> FileBatch:
    """Mini-batch ``index`` of :func:`plan_files`, without planning the others.

    >>> file_batch_at(["a", "b", "c", "d", "e"], 3, 2, pilot=2).paths
    ['e']
    """
    k = min(pilot, len(files))
    start = index if index < k else k + (index - k) * n
    return FileBatch.of(index, files[start : start + (1 if index < k else n)])


def plan_partitions(
    files: Iterable[tuple[str, Mapping[str, Any]]],
    keys: Sequence[str],
    file_format: str | None = None,
) -> list[PartitionBatch]:
    """One mini-batch per distinct combination of ``keys`` among ``files``
    (``(path, key values)`` pairs), ordered by the key values; each holds
    its files in the order given.

    >>> files = [("b/1", {"u": "b"}), ("a/1", {"u": "a"}), ("b/2", {"u": "b"})]
    >>> [(b.index, b.partition_key_value, b.paths)
    ...  for b in plan_partitions(files, ["u"])]
    [(0, {'u': 'a'}, ['a/1']), (1, {'u': 'b'}, ['b/1', 'b/2'])]
    """
    groups: dict[tuple[Any, ...], list[str]] = {}
    for path, values in files:
        groups.setdefault(tuple(values[k] for k in keys), []).append(path)
    ordered = sorted(groups, key=lambda combo: tuple(map(_order, combo)))
    return [
        PartitionBatch(
            i,
            "\0".join(groups[combo]),
            tuple(zip(keys, combo, strict=True)),
            file_format,
        )
        for i, combo in enumerate(ordered)
    ]


def _order(value: Any) -> tuple[int, Any]:
    # dates before strings where inputs disagree on a key's type
    return (0, value) if isinstance(value, datetime) else (1, str(value))


def _plan_partitioned(
    dataset: Any, partition_keys: Any, file_format: str | None
) -> list[PartitionBatch]:
    """A step's plan of ``dataset`` with ``partition_keys``."""
    keys = parse_partition_keys(partition_keys) or ()
    check_partition_keys(keys, dataset)
    return plan_partitions(dataset.partition_values(), keys, file_format)
