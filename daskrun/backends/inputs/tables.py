"""Tabular data sets: CSV or Parquet files whose mini-batches ``run()``
receives as ``pandas.DataFrame`` pieces (CSV byte ranges cut on record
boundaries, groups of Parquet row groups), and their partitioned copies
(:meth:`TabularDataset.partition_by`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import astuple
from typing import TYPE_CHECKING, Any

from fsspec.core import url_to_fs

from daskrun.backends.inputs.base import TableFormat
from daskrun.backends.inputs.batches import (
    MiniBatch,
    ParquetBatch,
    _plan_partitioned,
)
from daskrun.backends.inputs.delimited import (
    CsvBatch,
)
from daskrun.backends.inputs.files import _DatasetBase
from daskrun.backends.inputs.listing import (
    StorageOptions,
    _bounded,
    _datastore_paths,
)
from daskrun.backends.inputs.partitions import (
    check_key_columns,
    hive_format,
    parse_partition_keys,
)
from daskrun.backends.inputs.readers import read_rows, read_whole
from daskrun.engine.config import (
    config_get,
    mini_batch_size_for,
    parse_byte_size,
)
from daskrun.exceptions import ConfigError, InputError
from daskrun.monitoring.notebook import progress_bar

if TYPE_CHECKING:
    import dask.bag
    import dask.dataframe
    import pandas as pd


class TabularDataset(_DatasetBase):
    """CSV or Parquet files; ``run()`` receives ``pandas.DataFrame`` pieces."""

    kind = "tabular"
    keys_as_columns = True
    file_format: str  # "csv" or "parquet"

    @classmethod
    def size_of(cls, value: object) -> int:
        return mini_batch_size_for(cls.kind, value, parse_byte_size)

    @classmethod
    def from_record(
        cls,
        record: Any,
        given: Sequence[Any] | None,
        storage_options: Mapping[str, Any],
        paths: Callable[[], list[tuple[Any, str | None]]],
    ) -> list[Any]:
        return [
            cls(
                p,
                file_format=record.file_format or "csv",
                storage_options=storage_options,
                pandas_kwargs=record.pandas_kwargs,
                partition_format=f,
            )
            for p, f in paths()
        ]

    @classmethod
    def from_spec(cls, path: Any, spec: Mapping[str, Any]) -> Any:
        return cls(
            path,
            file_format=spec["file_format"],
            validate=False,
            pandas_kwargs=spec.get("pandas_kwargs") or {},
            partition_format=spec.get("partition_format"),
        )

    @classmethod
    def plan_inputs(
        cls, inputs: Sequence[Any], size: int, pilot: int, own: str | None
    ) -> tuple[Iterable[Any], int]:
        batches: list[Any] = []
        for ds in inputs:
            batches.extend(ds.plan(size, start=len(batches), exclude=own))
        return batches, len(batches)

    @classmethod
    def planned_items(
        cls, inputs: Sequence[Any], batches: Any, own: str | None
    ) -> tuple[int | None, str]:
        if all(b.n_items is not None for b in batches):
            return sum(b.n_items for b in batches), "rows planned (Parquet metadata)"
        return None, (
            f"rows of finished mini-batches (CSV rows are counted as they are "
            f"read; {len(batches)} mini-batches planned)"
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
        known: dict[str, tuple[int, str]] = {}
        for path, size, stamp in stamps:
            ledger.file(path, size, stamp)
            known[path] = (size, stamp)
        for batch in batches:
            ledger.mini_batch(astuple(batch)[1:], [known.get(batch.path)])

    @classmethod
    def unread_counter(
        cls, inputs: Sequence[Any], records: bool
    ) -> Callable[[Any], int | None] | None:
        """Counts the rows of a CSV mini-batch whose try failed before they
        were counted (:func:`~daskrun.backends.inputs.delimited.count_csv_rows`),
        or, with ``records``, the records of one whose rows pandas cannot read
        (:func:`~daskrun.backends.inputs.delimited.count_csv_records`); bounded
        by ``daskrun.storage-timeout`` (the input may be what hung: a FIFO, a
        dead mount), then unknown (``None``) or 1."""
        first = inputs[0]
        unknown = 1 if records else None

        def count(batch: Any) -> int | None:
            counted = batch.count_unread(first, records)
            return counted if counted is not None else unknown

        return count

    def __init__(
        self,
        path: Any,
        *,
        file_format: str,
        validate: bool = True,
        storage_options: StorageOptions | None = None,
        pandas_kwargs: Mapping[str, Any] | None = None,
        partition_format: str | None = None,
    ):
        self.file_format = file_format
        self.format = TableFormat.named(file_format)
        self.pandas_kwargs = self.format.checked_options(pandas_kwargs or {})
        super().__init__(
            path,
            validate=validate,
            storage_options=storage_options,
            partition_format=partition_format,
        )
        if validate and self._partitions is not None:
            first = self.files()[0]
            check_key_columns(self._partitions, self._columns(first), first)

    def _columns(self, path: str) -> list[str]:
        """The column names of one file (its header or Parquet schema),
        ``[]`` where it cannot be read: a run says why, per mini-batch."""

        def read() -> list[str]:
            try:
                options, kwargs = self.storage_options, self.pandas_kwargs
                return self.format.columns(path, options, kwargs)
            except Exception:
                return []

        if self.local:
            return read()
        return list(
            _bounded(
                read,
                float(config_get("storage-timeout")),
                self._where(),
                self.storage_options,
            )
        )

    def plan(
        self, mini_batch_size: object = None, start: int = 0, exclude: str | None = None
    ) -> Iterator[CsvBatch | ParquetBatch]:
        """Yield the mini-batches, numbered from ``start``: byte ranges of CSV
        files, or groups of Parquet row groups, never crossing a file
        boundary; the file ``exclude`` is left out."""
        size = self.size_of(mini_batch_size)
        files = [f for f in self.files() if f != exclude]
        if not files:
            return
        yield from self.format.plan(
            files, size, self.storage_options, self.pandas_kwargs, start
        )

    def to_pandas_dataframe(
        self, on_error: str = "null", out_of_range_datetime: str = "null"
    ) -> pd.DataFrame:
        """The whole data set in one DataFrame: each file read whole, with
        its partition columns (``on_error`` and ``out_of_range_datetime``
        are accepted and unused: pandas' own parsing applies)."""
        return self._whole_frame()

    def to_dask_dataframe(
        self, mini_batch_size: object = None, partition_keys: Any = None
    ) -> dask.dataframe.DataFrame:
        """The data set as a Dask dataframe with one partition per
        mini-batch, cut where a step cuts them: CSV byte ranges on record
        boundaries, groups of Parquet row groups, or with ``partition_keys``
        one partition per combination of their values (as
        ``ParallelRunConfig(partition_keys=...)``)."""
        import dask.dataframe as dd

        batches: list[Any] = (
            list(self.plan(mini_batch_size))
            if partition_keys is None
            else _plan_partitioned(self, partition_keys, self.file_format)
        )
        return dd.from_map(
            _read_for_dask, batches, dataset=self, enforce_metadata=False
        )

    def partition_by(
        self,
        partition_keys: Sequence[str] | str,
        target: Any,
        name: str | None = None,
        show_progress: bool = True,
    ) -> TabularDataset:
        """Write the rows as one Parquet file per combination of
        ``partition_keys``, in Hive-style folders (``key=value/``) under
        ``target`` (``datastore.path('folder/')`` or ``(datastore,
        'folder/')``), and return them as a partitioned data set; with
        ``name`` it is also registered in the datastore's workspace.

        The key columns leave the files and come back, as strings, from the
        folder names (``partition_format='/key={key}/data.parquet'``), as in
        Azure ML. A ``target`` that already holds files is left as it is:
        the files go to a new folder below it named by a GUID, as Azure ML
        writes them, and ``name`` gets a new version, so that a notebook can
        run again. ``show_progress`` shows one progress bar.

        >>> by_user = ds.partition_by(["user"], store.path("by_user/"),
        ...                           name="by_user")  # doctest: +SKIP
        >>> by_user.partition_keys  # doctest: +SKIP
        ['user']
        """
        keys = parse_partition_keys(partition_keys) or ()
        store, paths = _datastore_paths(target)
        if store is None or len(paths) != 1:
            raise ConfigError(
                f"target={target!r} is not a datastore path; use "
                "datastore.path('folder/') or (datastore, 'folder/')"
            )
        frame = self._whole_frame()
        missing = [k for k in keys if k not in frame.columns]
        if missing:
            raise ConfigError(
                f"partition_keys={list(keys)!r}: {self!r} has no column "
                f"{', '.join(map(repr, missing))}; its columns are "
                f"{', '.join(map(str, frame.columns))}"
            )
        folder = paths[0].rstrip("/")
        if _holds_files(store.url(folder), store.storage_options):
            folder = f"{folder}/{uuid.uuid4()}"
        _write_partitions(
            frame, keys, store.url(folder), store.storage_options, show_progress
        )
        # exactly the files written: not a later run's, in a GUID folder below
        written = "/".join([folder, *(f"{k}=*" for k in keys), "data.parquet"])
        out = TabularDataset(
            (store, written),
            file_format="parquet",
            partition_format=hive_format(keys),
        )
        if name is not None:
            workspace = getattr(store, "workspace", None)
            if workspace is None:
                raise ConfigError(
                    f"partition_by(name={name!r}): datastore {store.name!r} "
                    "belongs to no workspace to register it in; register it with "
                    "Datastore.register_local(ws, ...)"
                )
            out = out.register(workspace, name, create_new_version=True)
        return out

    def _whole_frame(self) -> pd.DataFrame:
        """Every row of every file, each file read whole, with its
        partition columns."""
        import pandas as pd

        frames = [
            read_whole(
                path,
                self.file_format,
                self.storage_options,
                self.pandas_kwargs,
                self.partition_format,
            )
            for path in self.files()
        ]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _write_partitions(
    frame: pd.DataFrame,
    keys: Sequence[str],
    base: str,
    storage_options: StorageOptions,
    show_progress: bool,
) -> None:
    """``frame`` as ``base/k1=v1/k2=v2/data.parquet`` files, one per key
    combination, without the key columns.

    All or nothing: every combination's folder name is checked before the
    first file is written, and the files written are removed if a later
    one fails, so that a retry finds the target empty again.
    """
    fs, root = url_to_fs(base, **dict(storage_options))
    root = root.rstrip("/")
    for values in frame[list(keys)].drop_duplicates().itertuples(index=False):
        _hive_folder(keys, tuple(values))
    groups = frame.groupby(list(keys), sort=True, dropna=False)
    written: list[str] = []
    bar = progress_bar()(
        groups,
        total=groups.ngroups,
        desc="partition_by",
        unit="partition",
        disable=not show_progress,
    )
    try:
        for combo, part in bar:
            folder = _hive_folder(keys, combo if isinstance(combo, tuple) else (combo,))
            path = "/".join([root, folder, "data.parquet"])
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            rows = part.drop(columns=list(keys)).reset_index(drop=True)
            with fs.open(path, "wb") as f:
                written.append(path)
                # a frame of key columns only keeps its rows as an index
                # column: Parquet without columns would hold no rows
                rows.to_parquet(f, index=rows.columns.empty)
    except BaseException:
        for path in written:
            try:
                fs.rm(path)
            except Exception:  # the first error is the one to tell
                pass
        raise
    finally:
        bar.close()


def _holds_files(url: str, storage_options: StorageOptions) -> bool:
    """Whether the folder ``url`` exists and holds a file."""
    fs, root = url_to_fs(url, **dict(storage_options))
    return bool(fs.exists(root) and fs.find(root))


# a folder name's limit on local file systems (NAME_MAX)
_NAME_BYTES = 255


def _hive_folder(keys: Sequence[str], values: Sequence[Any]) -> str:
    """``k1=v1/k2=v2``, or an :class:`InputError` for a value that cannot
    name a folder (missing, ``.``, holding ``/``, too long).

    >>> _hive_folder(["user", "day"], ["alice", 3])
    'user=alice/day=3'
    """
    import pandas as pd

    folder = []
    for key, value in zip(keys, values, strict=True):
        text = "" if pd.isna(value) else str(value)  # None, NaN, NaT, pd.NA
        name = f"{key}={text}"
        if text in ("", ".", "..") or "/" in text or "\0" in text:
            why, fix = "which cannot name a folder", f"df[{key!r}].fillna('none')"
        elif len(name.encode("utf-8", "surrogateescape")) > _NAME_BYTES:
            why = f"too long to name a folder ({_NAME_BYTES} bytes at most)"
            fix = f"df[{key!r}].map(short_ids)"
        else:
            folder.append(name)
            continue
        shown = repr(value) if len(repr(value)) <= 60 else f"{repr(value)[:57]}..."
        raise InputError(
            f"partition_by: column {key!r} holds {shown}, {why}; nothing was "
            f"written: fill or replace it first (e.g. {fix})"
        )
    return "/".join(folder)


def _read_for_dask(batch: MiniBatch, dataset: TabularDataset) -> Any:
    """What ``run()`` gets of ``batch``, as a partition of a Dask dataframe."""
    return read_rows(
        batch, dataset.storage_options, dataset.pandas_kwargs, dataset.partition_format
    )
