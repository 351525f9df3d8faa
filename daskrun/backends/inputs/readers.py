"""Worker side: what ``run()`` receives for a plan. Remote files are copied
into a cache folder (:func:`localize_files`); tables are read whole or in
part, with a column per partition key.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fsspec.core import url_to_fs

from daskrun.backends.inputs import delimited, parquet  # noqa: F401 (formats)
from daskrun.backends.inputs.base import TableFormat
from daskrun.backends.inputs.listing import StorageOptions, _is_local
from daskrun.backends.inputs.partitions import with_partition_columns

if TYPE_CHECKING:
    import pandas as pd


def read_rows(
    batch: Any,
    storage_options: StorageOptions,
    pandas_kwargs: Mapping[str, Any],
    partition_format: str | None,
) -> pd.DataFrame:
    """A tabular mini-batch's rows as ``run()`` gets them: a partition's
    files read whole, or a CSV byte range or Parquet row groups, with a
    column per partition key."""
    return batch.rows(storage_options, pandas_kwargs, partition_format)


def read_tabular(
    batch: Any, storage_options: StorageOptions, pandas_kwargs: Mapping[str, Any]
) -> pd.DataFrame:
    """Read one tabular mini-batch (CSV or Parquet) into a DataFrame."""
    return batch.frame(storage_options, pandas_kwargs)


def read_whole(
    path: str,
    file_format: str,
    storage_options: StorageOptions,
    pandas_kwargs: Mapping[str, Any],
    partition_format: str | None,
) -> pd.DataFrame:
    """One tabular file, read whole, with its partition columns."""
    read = TableFormat.named(file_format).read_whole
    frame = read(path, storage_options, pandas_kwargs)
    return with_partition_columns(frame, path, partition_format)


def read_partition(
    batch: Any,
    storage_options: StorageOptions,
    pandas_kwargs: Mapping[str, Any],
    partition_format: str | None,
    local: bool,
    cache_root: str,
) -> tuple[Any, str | None]:
    """What ``run()`` gets for one partition: its files' local paths, or
    all rows of its tabular files; and the folder to delete afterwards."""
    if batch.file_format is None:
        if local:
            return batch.paths, None
        return localize_files(batch.paths, storage_options, cache_root)
    import pandas as pd

    frames = [
        read_whole(
            p, batch.file_format, storage_options, pandas_kwargs, partition_format
        )
        for p in batch.paths
    ]
    return pd.concat(frames, ignore_index=True), None


def localize_files(
    paths: Sequence[str], storage_options: StorageOptions, cache_root: str
) -> tuple[list[str], str | None]:
    """Return local paths for ``paths``, copying remote files into a new
    folder under ``cache_root`` with their base names kept.

    Returns the local paths and the folder to delete afterwards (or ``None``
    when every file was already local).
    """
    fs, _ = url_to_fs(paths[0], **storage_options)
    if _is_local(fs):
        return list(paths), None
    os.makedirs(cache_root, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="mb-", dir=cache_root)
    local: list[str] = []
    taken: set[str] = set()
    for n, url in enumerate(paths):
        name = os.path.basename(url.rstrip("/"))
        sub = folder if name not in taken else os.path.join(folder, str(n))
        taken.add(name)
        os.makedirs(sub, exist_ok=True)
        local.append(os.path.join(sub, name))
    try:
        fs.get([fs._strip_protocol(p) for p in paths], local)
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return local, folder
