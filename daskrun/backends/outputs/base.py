"""The contract every output format answers, and the registry of formats."""

from __future__ import annotations

import importlib
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from daskrun.exceptions import ConfigError, OutputError

# kind name -> format class; filled by OutputFormat.__init_subclass__, in
# the order the classes are defined (text, csv, parquet)
FORMATS: dict[str, type[OutputFormat]] = {}

# a file name that is not UTF-8 (os.fsdecode's lone surrogates) is written
# escaped, as \udce9, not refused
ESCAPE = "backslashreplace"

# (mini-batch index, a callable opening its part as a binary file)
Part = tuple[int, Callable[[], Any]]


def output_format_for(kind: str) -> OutputFormat:
    """The format named ``kind``, or a ConfigError naming the known ones.

    >>> output_format_for("csv").kind
    'csv'
    """
    try:
        return FORMATS[kind]()
    except KeyError:
        raise ConfigError(
            f"output_format={kind!r} is not one of "
            f"{', '.join(map(repr, FORMATS))}; use output_format='csv' for CSV "
            "with a header"
        ) from None


class OutputFormat(ABC):
    """What an output format answers. Subclasses set ``kind`` (the name a
    run's ``output_format`` gives) and are registered in :data:`FORMATS` by
    being defined."""

    kind: ClassVar[str]
    extension: ClassVar[str | None] = None
    """The default output file's extension (None: the configured name's)."""
    tabular: ClassVar[bool] = True
    """Whether the published file has columns (reads as a dataframe)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            FORMATS[cls.kind] = cls

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def encode(self, result: Any) -> tuple[bytes, int]:
        """``run()``'s return value as one part's bytes, and its row count.
        A list becomes one column, ``result``."""
        pd: Any = importlib.import_module("pandas")
        is_frame = isinstance(result, pd.DataFrame)
        check_returned(result, is_frame)
        frame = result if is_frame else pd.DataFrame({"result": list(result)})
        return self.encode_frame(frame), len(frame)

    def encode_frame(self, frame: Any) -> bytes:
        """A DataFrame as one part's bytes (tabular formats)."""
        raise NotImplementedError

    @abstractmethod
    def count(self, part: Any) -> int:
        """The rows of a part, read from its binary file."""

    @abstractmethod
    def concat(
        self, parts: Iterable[Part], out: Any, name: Callable[[int], str]
    ) -> None:
        """Stream the parts, in order, into the binary file ``out``;
        ``name(index)`` names a mini-batch in an error."""

    @abstractmethod
    def read_frame(self, path: str, options: Mapping[str, Any], **kwargs: Any) -> Any:
        """The published file as a lazy Dask dataframe."""

    def read_bag(self, path: str, options: Mapping[str, Any]) -> Any:
        """The published file as a lazy Dask bag: one dict per row."""
        return self.read_frame(path, options).to_bag(format="dict")

    def mismatch(
        self,
        first: tuple[int, list[str]],
        other: tuple[int, list[str]],
        name: Callable[[int], str],
    ) -> OutputError:
        """Two parts with different columns."""
        return OutputError(
            f"{name(other[0])} returned columns {other[1]} unlike "
            f"{name(first[0])}'s {first[1]}; with output_format={self.kind!r}, make "
            "run() return DataFrames of the same columns (and types), or use "
            "output_format='text'"
        )


def loaded_pandas() -> Any:
    """pandas if something imported it already, else None."""
    return sys.modules.get("pandas")


def check_returned(result: Any, is_frame: bool) -> None:
    """Refuse a ``run()`` result that is not one element per input: a
    ``str`` (whose characters would become rows), ``bytes``, a dict,
    ``None`` or a scalar.

    >>> check_returned("ab", False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    TypeError: run() returned str; return a list, tuple, array, ...
    """
    if not is_frame and (
        result is None
        or isinstance(result, (str, bytes, Mapping))
        or not hasattr(result, "__len__")
    ):
        raise TypeError(
            f"run() returned {type(result).__name__}; return a list, tuple, array, "
            "Series or DataFrame with one element per input"
        )
