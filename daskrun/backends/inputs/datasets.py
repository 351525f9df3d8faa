"""Inputs: the public data sets and where each part of them lives.

``Dataset.File`` / ``Dataset.Tabular`` build the data sets of
:mod:`~daskrun.backends.inputs.files` and
:mod:`~daskrun.backends.inputs.tables`; their mini-batch plans are in
:mod:`~daskrun.backends.inputs.batches`, the listing of their files in
:mod:`~daskrun.backends.inputs.listing`, what workers read in
:mod:`~daskrun.backends.inputs.readers`, and the pipeline classes that name
them in :mod:`~daskrun.backends.inputs.consumption`. This module keeps the
names importable from one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from daskrun.backends.inputs.batches import (
    CollectionBatch,
    FileBatch,
    MiniBatch,
    ParquetBatch,
    PartitionBatch,
    SubBatch,
    file_batch_at,
    file_batch_count,
    plan_files,
)
from daskrun.backends.inputs.consumption import (
    DatasetConsumptionConfig,
    OutputFileDatasetConfig,
    PipelineData,
)
from daskrun.backends.inputs.delimited import CsvBatch
from daskrun.backends.inputs.files import FileDataset, _DatasetBase
from daskrun.backends.inputs.listing import StorageOptions, expand_paths
from daskrun.backends.inputs.parquet import plan_row_groups
from daskrun.backends.inputs.readers import (
    localize_files,
    read_partition,
    read_rows,
    read_tabular,
    read_whole,
)
from daskrun.backends.inputs.tables import TabularDataset

if TYPE_CHECKING:
    pass


def partition_dataset(
    batch: PartitionBatch,
    storage_options: StorageOptions,
    pandas_kwargs: Mapping[str, Any],
    partition_format: str | None,
) -> FileDataset | TabularDataset:
    """The input filtered to one partition: its files, as a data set of
    the input's kind (Azure ML's ``mini_batch_context.dataset``).

    >>> batch = PartitionBatch(0, "/d/ann/1.wav\\0/d/ann/2.wav", (("user", "ann"),))
    >>> partition_dataset(batch, {}, {}, "/{user}/{f}.wav")
    FileDataset(['/d/ann/1.wav', '/d/ann/2.wav'])
    """
    if batch.file_format is None:
        return FileDataset(
            batch.paths,
            validate=False,
            storage_options=storage_options,
            partition_format=partition_format,
        )
    return TabularDataset(
        batch.paths,
        file_format=batch.file_format,
        validate=False,
        storage_options=storage_options,
        pandas_kwargs=pandas_kwargs,
        partition_format=partition_format,
    )


class Dataset:
    """Factories for data sets; ``get_by_name`` asks a workspace for a
    registered one.

    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.png").write_bytes(b"")
    >>> Dataset.File.from_files(str(d / "*.png")).files() == [str(d / "a.png")]
    True
    """

    @staticmethod
    def get_by_name(
        workspace: Any, name: str, version: int | str = "latest"
    ) -> FileDataset | TabularDataset:
        """A registered data set (its files are listed when the step runs)."""
        return workspace.get_dataset(name, version)

    class File:
        @staticmethod
        def from_files(
            path: Any,
            validate: bool = True,
            storage_options: StorageOptions | None = None,
            partition_format: str | None = None,
        ) -> FileDataset:
            """Files from local paths, folders, globs, lists or fsspec URLs;
            ``partition_format`` (e.g. ``'/{user}/{genre}/{fname}.wav'``)
            reads partition keys from their paths."""
            return FileDataset(
                path,
                validate=validate,
                storage_options=storage_options,
                partition_format=partition_format,
            )

    class Tabular:
        @staticmethod
        def from_delimited_files(
            path: Any,
            validate: bool = True,
            separator: str = ",",
            header: bool | int = True,
            storage_options: StorageOptions | None = None,
            partition_format: str | None = None,
            **pandas_kwargs: Any,
        ) -> TabularDataset:
            """CSV (or other delimited) files; ``pandas_kwargs`` go to
            ``pandas.read_csv``. With ``partition_format`` the keys read
            from each file's path are columns of its rows."""
            pandas_kwargs.setdefault("sep", separator)
            if header is False:
                pandas_kwargs.setdefault("header", None)
            elif header is not True:  # a row number, as pandas takes it
                pandas_kwargs.setdefault("header", header)
            return TabularDataset(
                path,
                file_format="csv",
                validate=validate,
                storage_options=storage_options,
                pandas_kwargs=pandas_kwargs,
                partition_format=partition_format,
            )

        @staticmethod
        def from_parquet_files(
            path: Any,
            validate: bool = True,
            storage_options: StorageOptions | None = None,
            partition_format: str | None = None,
        ) -> TabularDataset:
            """Parquet files, split into mini-batches by row groups; with
            ``partition_format`` the keys read from each file's path are
            columns of its rows."""
            return TabularDataset(
                path,
                file_format="parquet",
                validate=validate,
                storage_options=storage_options,
                partition_format=partition_format,
            )


__all__ = [
    "CollectionBatch",
    "CsvBatch",
    "Dataset",
    "DatasetConsumptionConfig",
    "FileBatch",
    "FileDataset",
    "MiniBatch",
    "OutputFileDatasetConfig",
    "ParquetBatch",
    "PartitionBatch",
    "PipelineData",
    "StorageOptions",
    "SubBatch",
    "TabularDataset",
    "_DatasetBase",
    "expand_paths",
    "file_batch_at",
    "file_batch_count",
    "localize_files",
    "partition_dataset",
    "plan_files",
    "plan_row_groups",
    "read_partition",
    "read_rows",
    "read_tabular",
    "read_whole",
]
