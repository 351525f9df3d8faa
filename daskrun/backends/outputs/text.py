"""ParallelRunStep's append_row format: one line per row, no header."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from daskrun.backends.outputs.base import (
    ESCAPE,
    OutputFormat,
    Part,
    check_returned,
    loaded_pandas,
)
from daskrun.exceptions import ConfigError


class TextLines(OutputFormat):
    """A DataFrame gives one space-separated line per row, without header
    (as ParallelRunStep writes it); any other sequence gives
    ``str(element)`` per line, with line breaks inside an element escaped so
    one element stays one line.

    >>> TextLines().encode(["a: 1", "b\\n2"])
    (b'a: 1\\nb\\\\n2\\n', 2)
    """

    kind = "text"
    tabular: ClassVar[bool] = False

    def encode(self, result: Any) -> tuple[bytes, int]:
        # pandas is not imported here: a list of lines (the common case for
        # file inputs) is no DataFrame if the script never imported pandas,
        # and a worker saves the import (half a second) on its first
        # mini-batch
        pd = loaded_pandas()
        is_frame = pd is not None and isinstance(result, pd.DataFrame)
        check_returned(result, is_frame)
        if is_frame:
            if len(result) == 0:
                return b"", 0
            text = result.to_csv(
                sep=" ", header=False, index=False, lineterminator="\n"
            )
            return text.encode("utf-8", ESCAPE), len(result)
        lines = [str(x).replace("\r", "\\r").replace("\n", "\\n") for x in list(result)]
        if not lines:
            return b"", 0
        return ("\n".join(lines) + "\n").encode("utf-8", ESCAPE), len(lines)

    def count(self, part: Any) -> int:
        return sum(1 for _ in part)

    def concat(
        self, parts: Iterable[Part], out: Any, name: Callable[[int], str]
    ) -> None:
        for _, open_part in parts:
            with open_part() as part:
                shutil.copyfileobj(part, out, 1 << 20)

    def read_frame(self, path: str, options: Mapping[str, Any], **kwargs: Any) -> Any:
        raise ConfigError(
            f"{path} holds text lines, which have no columns; read them as a "
            "bag, or write a table with output_format='csv' or 'parquet'"
        )

    def read_bag(self, path: str, options: Mapping[str, Any]) -> Any:
        """The lines, without their newline."""
        import dask.bag as db

        return db.read_text(path, storage_options=dict(options)).map(_without_newline)


def _without_newline(line: str) -> str:
    return line.removesuffix("\n")
