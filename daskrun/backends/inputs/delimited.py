"""Delimited (CSV) files cut into mini-batches on record boundaries.

A CSV mini-batch is the bytes ``[offset, offset + length)`` of one file whose
two ends are record boundaries: just after a ``\\n``, ``\\r\\n`` or lone
``\\r`` that is not inside a quoted field (a quoted field may hold newlines).
A range that does not start the file is read behind the file's *preamble*,
its bytes ``[0, header)``: the lines pandas skips or takes as the header
(``skiprows``, comment and blank lines, the header row). pandas, given the
same options, then parses each range exactly as it parses those rows of the
whole file.

Read whole, as one mini-batch:

- compressed files (``.gz``, ``.bz2``, ``.zip``, ``.xz``, ``.zst``, as fsspec
  infers from the extension);
- files in an encoding that is not ASCII-compatible (UTF-16, UTF-32);
- files no larger than the mini-batch size;
- files that cannot be cut safely: a quote in the middle of an unquoted field,
  an ``escapechar``, or comments beside quotes, where a cut could land inside
  a field. The log says so once per file.

Refused when the data set is made: options that need the whole file
(``skipfooter``, ``nrows``, a list or function of ``skiprows``, a multi-row
``header``, ``chunksize``/``iterator``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import fsspec
import fsspec.utils
from fsspec.core import url_to_fs

from daskrun.backends.inputs.base import TableFormat, read_piece
from daskrun.backends.inputs.listing import _map_files, _reading, _sizes
from daskrun.backends.inputs.partitions import with_partition_columns
from daskrun.exceptions import ConfigError

logger = logging.getLogger("daskrun")

StorageOptions = Mapping[str, Any]

# options pandas applies to the whole file, which no cut can honour
_WHOLE_FILE_OPTIONS = {
    "skipfooter": "drop the last rows in run() instead",
    "nrows": "select rows in run() instead",
    "chunksize": "daskrun already reads the file in mini-batches",
    "iterator": "daskrun already reads the file in mini-batches",
}
# read through fsspec, not passed to pandas
_NOT_FOR_PANDAS = ("compression", "storage_options")
_FIRST_WINDOW = 1 << 16  # bytes read past a cut target to find its boundary


@dataclass(frozen=True)
class CsvBatch:
    """Bytes ``[offset, offset + length)`` of one CSV file, both ends record
    boundaries; a range that starts later than 0 is read behind the file's
    preamble, bytes ``[0, header)``. ``length=None`` is the whole file."""

    index: int
    path: str
    offset: int = 0
    length: int | None = None
    header: int = 0
    isolable: ClassVar[bool] = True  # a failed one is halved to find its bad rows

    def frame(self, storage_options: Mapping[str, Any], pandas_kwargs: Any) -> Any:
        """Its rows, as ``pandas.read_csv`` reads them."""
        return read_csv(self, storage_options, pandas_kwargs)

    def rows(
        self,
        storage_options: Mapping[str, Any],
        pandas_kwargs: Any,
        partition_format: str | None,
    ) -> Any:
        """Its rows with a column per partition key, as ``run()`` gets them."""
        frame = self.frame(storage_options, pandas_kwargs)
        return with_partition_columns(frame, self.path, partition_format)

    def read(self, spec: Any, cache_root: str) -> tuple[Any, int | None, str | None]:
        """What ``run()`` receives (a DataFrame with a column per partition
        key), the rows read, and no folder to delete."""
        options, kwargs = spec.storage_options, spec.pandas_kwargs
        frame = self.rows(options, kwargs, spec.partition_format)
        return frame, len(frame), None

    def read_piece(
        self, start: int, stop: int, spec: Any, cache_root: str
    ) -> tuple[Any, int | None, str | None]:
        """Rows ``[start, stop)``, read as the whole mini-batch is and sliced."""
        return read_piece(self, start, stop, spec, cache_root)

    def input_files(self) -> list[str] | None:
        return None

    @property
    def n_items(self) -> int | None:
        return None  # known only once read

    def describe(self) -> str:
        if self.length is None:
            return f"{self.path} (whole file)"
        return f"{self.path} bytes {self.offset}-{self.offset + self.length}"

    def count_unread(self, dataset: Any, records: bool) -> int | None:
        """The rows (or, with ``records``, the records) of this mini-batch
        whose try failed before they were counted, within
        ``daskrun.storage-timeout`` (the input may be what hung: a FIFO, a
        dead mount); ``None`` when unknown."""
        from daskrun.backends.storage import within
        from daskrun.engine.config import config_get

        counter = count_csv_records if records else count_csv_rows
        try:
            return within(
                float(config_get("storage-timeout")),
                lambda: counter(self, dataset.storage_options, dataset.pandas_kwargs),
                TimeoutError,
            )
        except TimeoutError:
            return None


def check_csv_options(pandas_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse ``pandas.read_csv`` options that no cut can honour.

    >>> check_csv_options({"sep": ";", "skiprows": 2})
    {'sep': ';', 'skiprows': 2}
    >>> check_csv_options({"skipfooter": 1})
    Traceback (most recent call last):
    ...
    daskrun.exceptions.ConfigError: pandas option skipfooter=1 needs the whole file, which daskrun reads in mini-batches; drop the last rows in run() instead
    """  # noqa: E501
    kwargs = dict(pandas_kwargs)
    for name, fix in _WHOLE_FILE_OPTIONS.items():
        value = kwargs.get(name)
        if value not in (None, False, 0):
            raise ConfigError(
                f"pandas option {name}={value!r} needs the whole file, which "
                f"daskrun reads in mini-batches; {fix}"
            )
    skiprows = kwargs.get("skiprows")
    if skiprows is not None and not isinstance(skiprows, int):
        raise ConfigError(
            f"pandas option skiprows={skiprows!r} (a list or function) cannot be "
            "honoured across mini-batches; pass an int (the number of lines to "
            "skip at the start of each file), or filter rows in run()"
        )
    header = kwargs.get("header", "infer")
    if isinstance(header, (list, tuple)):
        raise ConfigError(
            f"pandas option header={header!r} (several header rows) cannot be "
            "honoured across mini-batches; use one header row (header=0)"
        )
    if "filepath_or_buffer" in kwargs:
        raise ConfigError(
            "pandas option filepath_or_buffer is daskrun's to set; pass the files "
            "as the data set's path"
        )
    if "dtype" in kwargs:
        kwargs["dtype"] = _dtype_names(kwargs["dtype"])
    for name, value in kwargs.items():
        # run records and workspaces keep the options as JSON, for resume
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"pandas option {name}={value!r} cannot be recorded for a resume "
                "(run records keep JSON: strings, numbers, lists, dicts); pass it "
                "as one, or apply it in run()"
            ) from None
    return kwargs


def _dtype_names(dtype: Any) -> Any:
    """``dtype`` (one, or a dict by column) with each type given by its
    name, which pandas reads back as the same type: ``str`` is ``'str'``,
    ``np.int32`` is ``'int32'``.

    >>> import numpy as np
    >>> _dtype_names({"id": np.int32, "name": str})
    {'id': 'int32', 'name': 'str'}
    """
    if isinstance(dtype, Mapping):
        return {column: _dtype_names(value) for column, value in dtype.items()}
    from pandas.api.types import pandas_dtype

    try:
        found = pandas_dtype(dtype)
        name = dtype if isinstance(dtype, str) else str(found)
        same = pandas_dtype(name) == found
    except (TypeError, ValueError):
        same = False
    if not same:
        raise ConfigError(
            f"pandas option dtype={dtype!r} has no name that reads back as the "
            "same type; pass a name pandas knows, e.g. dtype={'id': 'int32'}, "
            "or convert in run()"
        )
    return name


def _compression(path: str, pandas_kwargs: Mapping[str, Any]) -> str | None:
    value = pandas_kwargs.get("compression", "infer")
    if value == "infer":
        return fsspec.utils.infer_compression(path)
    if isinstance(value, dict):
        value = value.get("method")
    return value or None


@dataclass(frozen=True)
class _Dialect:
    """What decides where records end, from the pandas options."""

    newline: re.Pattern[bytes]
    quote: int | None  # a byte, or None when quoting is off
    before_open: tuple[int, ...]  # the bytes an opening quote may follow
    escape: bytes | None
    comment: bytes | None

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> _Dialect | None:
        """The dialect, or ``None`` when the encoding is not ASCII-based, so
        that bytes cannot be cut at newlines."""
        encoding = kwargs.get("encoding") or "utf-8"
        probe = '\n\r",#;\t'
        try:
            if not probe.encode(encoding).endswith(probe.encode("ascii")):
                return None
        except (LookupError, UnicodeError):
            return None

        def encoded(char: Any) -> bytes | None:
            if not isinstance(char, str) or not char:
                return None
            return char.encode(encoding).removeprefix(b"\xef\xbb\xbf")  # utf-8-sig

        terminator = encoded(kwargs.get("lineterminator"))
        newline = re.compile(re.escape(terminator) if terminator else rb"\r\n|\n|\r")
        quotechar = encoded(kwargs.get("quotechar", '"'))
        quote = None if kwargs.get("quoting", 0) == 3 or not quotechar else quotechar[0]
        before = b"\r\n" + (terminator or b"") + (quotechar or b"")
        sep = kwargs.get("sep", kwargs.get("delimiter", ","))
        if isinstance(sep, str) and len(sep) == 1:
            before += encoded(sep) or b""
        elif sep is None or sep == r"\s+" or kwargs.get("delim_whitespace"):
            before += b" \t"
        if kwargs.get("skipinitialspace"):
            before += b" "
        return cls(
            newline,
            quote,
            tuple(before),
            encoded(kwargs.get("escapechar")),
            encoded(kwargs.get("comment")),
        )


class _Unsafe(Exception):
    """The file cannot be cut exactly; it is read whole."""


class _Records:
    """Finds the record boundaries of ``data``, which starts at a record
    start: quotes are located once, and each quote counted as opening is
    checked once, however many boundaries are asked for.

    Outside quotes, the k-th quote of a record opens a field when k is even;
    a quote counted as opening must follow a delimiter, a newline, another
    quote (a doubled quote) or start the data, else pandas would take it
    literally and counting would lie: :class:`_Unsafe`.
    """

    def __init__(self, data: bytes, at_eof: bool, d: _Dialect):
        import numpy as np

        if d.escape is not None and d.escape in data:
            raise _Unsafe(f"escapechar {d.escape.decode()!r} may escape a newline")
        quoted = d.quote is not None and bytes([d.quote]) in data
        if quoted and d.comment is not None and d.comment in data:
            raise _Unsafe(f"comments ({d.comment.decode()!r}) beside quoted fields")
        self.data, self.at_eof, self.d = data, at_eof, d
        self.arr = np.frombuffer(data, dtype=np.uint8)
        self.quotes = (
            np.flatnonzero(self.arr == d.quote) if quoted else np.empty(0, np.int64)
        )
        self.checked = 0  # quotes before this one are known to be valid

    def boundary(self, target: int) -> int | None:
        """The first record boundary at or after ``target``; ``None`` when
        the data ends first."""
        import numpy as np

        data, quotes = self.data, self.quotes
        p = max(target - 1, 0)
        while True:
            m = self.d.newline.search(data, p)
            if m is None:
                return None
            if m.group() == b"\r" and m.end() == len(data) and not self.at_eof:
                return None  # maybe the first half of \r\n
            before = int(np.searchsorted(quotes, m.start()))
            if before % 2 == 0:
                self._check_openings(before)
                return m.end()
            if before == len(quotes):
                return None  # a quoted field runs past the data
            p = int(quotes[before]) + 1

    def _check_openings(self, before: int) -> None:
        import numpy as np

        if before <= self.checked:
            return
        openings = self.quotes[self.checked : before : 2]  # checked is even
        openings = openings[openings > 0]
        wrong = ~np.isin(self.arr[openings - 1], self.d.before_open)
        if wrong.any():
            line = self.data.count(b"\n", 0, int(openings[wrong][0])) + 1
            raise _Unsafe(f"a quote inside an unquoted field, line {line} of a cut")
        self.checked = before


def _next_cut(
    read: Callable[[int, int], bytes],
    start: int,
    target: int,
    nbytes: int,
    d: _Dialect,
) -> int | None:
    """The first record boundary at or after ``target``, scanning from
    ``start`` (a record start); ``None`` when the file ends first."""
    window = target - start + _FIRST_WINDOW
    while True:
        data = read(start, min(window, nbytes - start))
        at_eof = start + len(data) >= nbytes
        cut = _Records(data, at_eof, d).boundary(target - start)
        if cut is not None:
            return None if start + cut >= nbytes else start + cut
        if at_eof:
            return None
        window *= 2


def _preamble_end(
    read: Callable[[int, int], bytes],
    nbytes: int,
    kwargs: Mapping[str, Any],
    d: _Dialect,
) -> int | None:
    """Where the first data row's record starts: the bytes before it are
    skipped or taken as the header. ``None`` when the file has no data row."""
    header = kwargs.get("header", "infer")
    if header == "infer":
        header = None if kwargs.get("names") is not None else 0
    plain = not any(kwargs.get(k) for k in ("skiprows", "comment"))
    if plain and header is None:
        return 0
    if plain and header == 0:
        first = _next_cut(read, 0, 1, nbytes, d)
        head = read(0, 4).removeprefix(b"\xef\xbb\xbf")
        if first is not None and head[:1] not in (b"", b" ", b"\t", b"\r", b"\n"):
            return first  # a header line that is not blank
    # else ask pandas: from which record on do rows come?
    import pandas as pd

    cuts = [0]

    def rows(k: int) -> int:
        while len(cuts) <= k and cuts[-1] < nbytes:
            cut = _next_cut(read, cuts[-1], cuts[-1] + 1, nbytes, d)
            cuts.append(nbytes if cut is None else cut)
        data = read(0, cuts[min(k, len(cuts) - 1)])
        try:
            return len(pd.read_csv(io.BytesIO(data), **_for_pandas(kwargs)))
        except (pd.errors.EmptyDataError, pd.errors.ParserError, ValueError):
            return 0  # not yet past the header; a real error shows on the worker

    hi = 1
    while not rows(hi):
        if cuts[-1] >= nbytes:
            return None
        hi *= 2
    lo = hi // 2  # rows(lo) == 0 < rows(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if rows(mid):
            hi = mid
        else:
            lo = mid
    return cuts[lo]


_told_whole: set[str] = set()


def _whole(path: str, why: str) -> list[tuple[int, int | None, int]]:
    if path not in _told_whole:
        _told_whole.add(path)
        logger.warning("daskrun: %s is read whole, as one mini-batch: %s", path, why)
    return [(0, None, 0)]


def plan_csv(
    fs: fsspec.AbstractFileSystem,
    path: str,
    nbytes: int,
    size: int,
    pandas_kwargs: Mapping[str, Any],
) -> list[tuple[int, int | None, int]]:
    """``(offset, length, header)`` of each mini-batch of one CSV file:
    ranges of about ``size`` bytes cut on record boundaries, or the whole
    file (``length=None``)."""
    if _compression(path, pandas_kwargs):
        return _whole(path, "it is compressed")
    if nbytes <= size:
        return [(0, None, 0)]
    d = _Dialect.of(pandas_kwargs)
    if d is None:
        return _whole(
            path, f"its encoding {pandas_kwargs.get('encoding')!r} is not ASCII-based"
        )
    with fs.open(path, "rb") as f:

        def read(offset: int, length: int) -> bytes:
            f.seek(offset)
            return bytes(f.read(length))

        try:
            header = _preamble_end(read, nbytes, pandas_kwargs, d)
            if header is None:
                return [(0, None, 0)]
            starts = [0]
            target = max(size, header + 1)
            while target < nbytes:
                cut = _next_cut(read, starts[-1], target, nbytes, d)
                if cut is None:
                    break
                starts.append(cut)
                target = cut + size
        except _Unsafe as e:
            return _whole(path, f"it cannot be cut safely ({e})")
    if len(starts) == 1:
        return [(0, None, 0)]
    ends = [*starts[1:], nbytes]
    return [
        (start, end - start, header) for start, end in zip(starts, ends, strict=True)
    ]


def _for_pandas(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in _NOT_FOR_PANDAS}


def _read_range(
    batch: CsvBatch, storage_options: StorageOptions, preamble: bool = True
) -> bytes:
    assert batch.length is not None
    with fsspec.open(batch.path, "rb", **storage_options) as f:
        prefix = f.read(batch.header) if preamble and batch.offset else b""
        f.seek(batch.offset)
        return bytes(prefix + f.read(batch.length))


def read_csv(
    batch: CsvBatch,
    storage_options: StorageOptions,
    pandas_kwargs: Mapping[str, Any],
) -> Any:
    """One CSV mini-batch as a ``pandas.DataFrame``."""
    import pandas as pd

    kwargs = _for_pandas(pandas_kwargs)
    try:
        if batch.length is None:
            compression = _compression(batch.path, pandas_kwargs)
            with fsspec.open(
                batch.path, "rb", compression=compression, **storage_options
            ) as f:
                return pd.read_csv(f, **kwargs)
        return pd.read_csv(io.BytesIO(_read_range(batch, storage_options)), **kwargs)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()  # only blank or comment lines


def csv_columns(
    path: str, storage_options: StorageOptions, pandas_kwargs: Mapping[str, Any]
) -> list[str]:
    """The column names pandas gives the file at ``path``, read from its
    start only (``[]`` for a file without rows or header)."""
    import pandas as pd

    kwargs = {**_for_pandas(pandas_kwargs), "nrows": 0}
    compression = _compression(path, pandas_kwargs)
    with fsspec.open(path, "rb", compression=compression, **storage_options) as f:
        try:
            return [str(c) for c in pd.read_csv(f, **kwargs).columns]
        except pd.errors.EmptyDataError:
            return []


def count_csv_rows(
    batch: CsvBatch,
    storage_options: StorageOptions,
    pandas_kwargs: Mapping[str, Any],
) -> int | None:
    """The rows of a mini-batch whose try failed before they were counted
    (its worker died): as pandas reads them, the items of the mini-batch;
    ``None`` where pandas cannot read them, or a local input is not a
    regular file (a FIFO, left unread)."""
    local = "://" not in batch.path
    if local and not os.path.isfile(batch.path):
        return None
    try:
        return len(read_csv(batch, storage_options, pandas_kwargs))
    except Exception:  # the mini-batch failed for this already
        return None


def count_csv_records(
    batch: CsvBatch,
    storage_options: StorageOptions,
    pandas_kwargs: Mapping[str, Any],
) -> int:
    """The records of a failed mini-batch whose rows pandas cannot read
    (:func:`count_csv_rows` gave ``None``), the header not counted; at
    least 1. A local input that is not a regular file (a FIFO) counts 1,
    unread."""
    local = "://" not in batch.path
    if local and not os.path.isfile(batch.path):
        return 1
    d = _Dialect.of(pandas_kwargs)
    if d is None or batch.length is None:
        return 1
    try:
        data = _read_range(batch, storage_options, preamble=False)
    except OSError:
        return 1
    start = batch.header if batch.offset == 0 else 0
    try:
        found = _Records(data[start:], True, d)
    except _Unsafe:
        return 1
    records, at = 0, 0
    while at < len(found.data):
        try:
            cut = found.boundary(at + 1)
        except _Unsafe:
            cut = None
        at = len(found.data) if cut is None else cut
        records += 1
    return max(1, records)


class Delimited(TableFormat):
    """CSV files: byte ranges cut on record boundaries (:func:`plan_csv`)."""

    name = "csv"
    factory = "from_delimited_files"

    def checked_options(self, pandas_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return check_csv_options(pandas_kwargs)

    def columns(
        self, path: str, storage_options: Mapping[str, Any], pandas_kwargs: Any
    ) -> list[str]:
        return csv_columns(path, storage_options, pandas_kwargs)

    def plan(
        self,
        files: Sequence[str],
        size: int,
        storage_options: Mapping[str, Any],
        pandas_kwargs: Any,
        start: int,
    ) -> Iterator[CsvBatch]:
        fs, _ = url_to_fs(files[0], **storage_options)
        index = start
        sizes = dict(zip(files, _sizes(fs, list(files), storage_options), strict=True))

        def cuts(path: str) -> list[tuple[int, int | None, int]]:
            with _reading(path, storage_options):
                return plan_csv(fs, path, sizes[path], size, pandas_kwargs)

        # each file's cuts are found by reading it through: files at once
        for path, found in zip(files, _map_files(cuts, list(files)), strict=True):
            for cut in found:
                yield CsvBatch(index, path, *cut)
                index += 1

    def read_whole(
        self, path: str, storage_options: Mapping[str, Any], pandas_kwargs: Any
    ) -> Any:
        return read_csv(CsvBatch(0, path), storage_options, pandas_kwargs)

    def write(self, frame: Any, path: Any) -> None:
        frame.to_csv(path, index=False)
