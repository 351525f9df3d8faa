"""Parquet files as a tabular input's format: mini-batches of whole row
groups (:class:`ParquetBatch`, planned from the files' metadata by
:func:`plan_row_groups`), never crossing a file boundary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import fsspec
from fsspec.core import url_to_fs

from daskrun.backends.inputs.base import TableFormat, read_piece
from daskrun.backends.inputs.listing import StorageOptions, _map_files
from daskrun.backends.inputs.partitions import with_partition_columns
from daskrun.backends.storage import describe_error, redact, storage_failures
from daskrun.exceptions import InputError


@dataclass(frozen=True)
class ParquetBatch:
    """Row groups ``row_groups`` of one Parquet file (``num_rows`` rows)."""

    index: int
    path: str
    row_groups: tuple[int, ...]
    num_rows: int
    isolable: ClassVar[bool] = True

    @property
    def n_items(self) -> int | None:
        return self.num_rows

    def frame(self, storage_options: StorageOptions, pandas_kwargs: Any) -> Any:
        """Its row groups' rows."""
        import pyarrow.parquet as pq

        with fsspec.open(self.path, "rb", **storage_options) as f:
            table = pq.ParquetFile(f).read_row_groups(list(self.row_groups))
        return table.to_pandas()

    def rows(
        self,
        storage_options: StorageOptions,
        pandas_kwargs: Any,
        partition_format: str | None,
    ) -> Any:
        """Its rows with a column per partition key, as ``run()`` gets them."""
        frame = self.frame(storage_options, pandas_kwargs)
        return with_partition_columns(frame, self.path, partition_format)

    def read(self, spec: Any, cache_root: str) -> tuple[Any, int | None, str | None]:
        options, kwargs = spec.storage_options, spec.pandas_kwargs
        frame = self.rows(options, kwargs, spec.partition_format)
        return frame, len(frame), None

    def read_piece(
        self, start: int, stop: int, spec: Any, cache_root: str
    ) -> tuple[Any, int | None, str | None]:
        return read_piece(self, start, stop, spec, cache_root)

    def input_files(self) -> list[str] | None:
        return None

    def count_unread(self, dataset: Any, records: bool) -> int | None:
        return self.n_items

    def describe(self) -> str:
        first, last = self.row_groups[0], self.row_groups[-1]
        return f"{self.path} row groups {first}-{last} ({self.num_rows} rows)"


def plan_row_groups(group_bytes: Sequence[int], size: int) -> list[list[int]]:
    """Group consecutive row groups into mini-batches of at most ``size``
    bytes (at least one row group each).

    >>> plan_row_groups([40, 40, 40, 200, 10], 100)
    [[0, 1], [2], [3], [4]]
    >>> plan_row_groups([], 100)
    []
    """
    batches: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for i, nbytes in enumerate(group_bytes):
        if current and current_bytes + nbytes > size:
            batches.append(current)
            current, current_bytes = [], 0
        current.append(i)
        current_bytes += nbytes
    if current:
        batches.append(current)
    return batches


def _row_group_sizes(
    fs: fsspec.AbstractFileSystem, files: list[str], storage_options: StorageOptions
) -> list[list[tuple[int, int]]]:
    import pyarrow.parquet as pq

    def groups(path: str) -> list[tuple[int, int]]:
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
        except storage_failures() as e:  # pyarrow's ArrowInvalid: a ValueError
            raise InputError(
                f"input file {redact(path, storage_options)!r} is not a readable "
                f"Parquet file: {describe_error(e, storage_options)}; use "
                "from_delimited_files for CSV"
            ) from None
        out = []
        for i in range(meta.num_row_groups):
            rg = meta.row_group(i)
            on_disk = sum(
                rg.column(c).total_compressed_size for c in range(rg.num_columns)
            )
            out.append((on_disk, rg.num_rows))
        return out

    return _map_files(groups, files)


class Parquet(TableFormat):
    """Parquet files: row groups, counted from the files' metadata."""

    name = "parquet"
    factory = "from_parquet_files"

    def columns(
        self, path: str, storage_options: StorageOptions, pandas_kwargs: Any
    ) -> list[str]:
        import pyarrow.parquet as pq

        with fsspec.open(path, "rb", **storage_options) as f:
            return list(pq.read_schema(f).names)

    def plan(
        self,
        files: Sequence[str],
        size: int,
        storage_options: StorageOptions,
        pandas_kwargs: Any,
        start: int,
    ) -> Iterator[ParquetBatch]:
        fs, _ = url_to_fs(files[0], **storage_options)
        index = start
        groups_of = _row_group_sizes(fs, list(files), storage_options)
        for path, groups in zip(files, groups_of, strict=True):
            for rgs in plan_row_groups([g[0] for g in groups], size):
                rows = sum(groups[i][1] for i in rgs)
                yield ParquetBatch(index, path, tuple(rgs), rows)
                index += 1

    def read_whole(
        self, path: str, storage_options: StorageOptions, pandas_kwargs: Any
    ) -> Any:
        import pyarrow.parquet as pq

        with fsspec.open(path, "rb", **storage_options) as f:
            return pq.ParquetFile(f).read().to_pandas()

    def write(self, frame: Any, path: Any) -> None:
        frame.to_parquet(path, index=False)
