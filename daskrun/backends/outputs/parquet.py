"""One Parquet file."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from daskrun.backends.outputs.base import OutputFormat, Part


class ParquetTable(OutputFormat):
    """A Parquet file per part, their tables streamed into one file; a list
    becomes one column, ``result``."""

    kind = "parquet"
    extension = ".parquet"

    def encode_frame(self, frame: Any) -> bytes:
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        return buf.getvalue()

    def count(self, part: Any) -> int:
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(part).metadata.num_rows)

    def concat(
        self, parts: Iterable[Part], out: Any, name: Callable[[int], str]
    ) -> None:
        """Stream the parts' tables into one Parquet file, one part at a time."""
        import pyarrow.parquet as pq

        writer = None
        first = 0
        empty = None  # the first part's table, used only if no part has rows
        try:
            for index, open_part in parts:
                with open_part() as part:
                    table = pq.read_table(part)
                if not table.num_rows:
                    empty = table if empty is None else empty
                    continue
                if writer is None:
                    writer = pq.ParquetWriter(out, table.schema)
                    first = index
                elif not table.schema.equals(writer.schema):
                    ours, theirs = writer.schema.names, table.schema.names
                    if ours == theirs:  # the types differ
                        ours, theirs = _fields(writer.schema), _fields(table.schema)
                    raise self.mismatch((first, ours), (index, theirs), name)
                writer.write_table(table)
            if writer is None and empty is not None:
                writer = pq.ParquetWriter(out, empty.schema)
        finally:
            if writer is not None:
                writer.close()

    def read_frame(self, path: str, options: Mapping[str, Any], **kwargs: Any) -> Any:
        import dask.dataframe as dd

        return dd.read_parquet(path, storage_options=dict(options), **kwargs)


def _fields(schema: Any) -> list[str]:
    """Column names with their types, for columns that differ only in type."""
    return [f"{f.name}: {f.type}" for f in schema]
