"""Inputs and their mini-batch plans.

A data set is a list of files (local paths or fsspec URLs). Planning turns it
into mini-batches, plain frozen records the runner ships to workers:

- :class:`FileBatch` — ``mini_batch_size`` files; mini-batch *i* holds files
  ``[i*n, (i+1)*n)`` in path order.
- :class:`CsvBatch` — a whole CSV file, or a byte range of one cut on record
  boundaries (:mod:`daskrun.backends.inputs.delimited`).
- :class:`ParquetBatch` — some row groups of one Parquet file.

No mini-batch ever crosses a file boundary. The ``read_*`` / ``localize_files``
functions at the bottom run on the workers and turn a plan into what ``run()``
receives.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import posixpath
import re
import shutil
import stat
import sys
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from daskrun.backends.inputs.delimited import (
    CsvBatch,
    check_csv_options,
    csv_columns,
    plan_csv,
    read_csv,
)
from daskrun.backends.inputs.partitions import (
    PartitionBatch,
    PartitionFormat,
    check_partition_keys,
    hive_format,
    parse_partition_keys,
    plan_partitions,
)
from daskrun.backends.storage import (
    BOOKKEEPING,
    bookkeeping,
    describe_error,
    map_errors,
    redact,
    storage_errors,
    storage_failures,
    within,
)
from daskrun.engine.config import config_get, mini_batch_size_for
from daskrun.engine.naming import PipelineParameter, check_name
from daskrun.exceptions import (
    ConfigError,
    DaskRunError,
    InputError,
    StorageError,
    StorageTimeoutError,
)
from daskrun.monitoring.notebook import progress_bar

if TYPE_CHECKING:
    import dask.bag
    import dask.dataframe
    import pandas as pd

StorageOptions = Mapping[str, Any]
# the final file an earlier daskrun was assembling when it was killed,
# .<name>.<uuid hex>.partial beside the final file: never data
LEFTOVER = re.compile(r"\.[^/]+\.[0-9a-f]{32}\.partial")


@dataclass(frozen=True, slots=True)
class FileBatch:
    """Files (in path order) as mini-batch ``index``.

    The paths travel as one NUL-separated string: a task carrying a thousand
    mini-batches is then a few thousand objects for the scheduler to unpickle,
    not tens of thousands.
    """

    index: int
    joined: str

    @classmethod
    def of(cls, index: int, paths: Sequence[str]) -> FileBatch:
        return cls(index, "\0".join(paths))

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
class ParquetBatch:
    """Row groups ``row_groups`` of one Parquet file (``num_rows`` rows)."""

    index: int
    path: str
    row_groups: tuple[int, ...]
    num_rows: int

    @property
    def n_items(self) -> int | None:
        return self.num_rows

    def describe(self) -> str:
        first, last = self.row_groups[0], self.row_groups[-1]
        return f"{self.path} row groups {first}-{last} ({self.num_rows} rows)"


@dataclass(frozen=True)
class CollectionBatch:
    """Partition ``index`` of a Dask collection given as a step's input.

    The plan is the number alone; ``data``, the computed partition, is set
    on the worker, where the partition arrives as a task argument.
    """

    index: int
    data: Any = field(default=None, repr=False, compare=False)

    @property
    def n_items(self) -> int | None:
        return None  # rows or items, known once computed

    def describe(self) -> str:
        return f"partition {self.index} of the Dask collection"


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


_LOCAL = LocalFileSystem()


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def expand_paths(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    storage_options: StorageOptions | None = None,
) -> list[str]:
    """Expand paths, folders (recursively) and globs into a sorted file list.

    Local files come back as absolute paths, remote ones as full URLs. A
    file that a list names twice is listed once, with one warning saying
    how many repeats there were. Raises :class:`InputError` naming the
    first path that matches nothing, and a local input that is not a
    regular file (a FIFO, a socket, a broken symbolic link).
    """
    items = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not items:
        raise InputError("no input path given; pass a file, folder, glob or URL")
    found: set[str] = set()
    named = 0
    for item in items:
        text = os.fspath(item)
        if not text:
            raise InputError(
                "input path '' is empty, which would read the current folder; "
                "pass a file, folder, glob or URL, e.g. 'data/' ('.' for the "
                "current folder)"
            )
        shown = redact(text, storage_options or {})  # a URL may hold a SAS
        try:
            if "://" in text or _is_glob(text):
                fs, root = url_to_fs(text, **dict(storage_options or {}))
            else:  # a plain local path: no fsspec per item of a long list
                fs, root = _LOCAL, os.path.abspath(os.path.expanduser(text))
            files = [f for f in _find_files(fs, root) if not _leftover(f)]
        except (FileNotFoundError, NotADirectoryError):
            files = []
        except OSError as e:
            raise InputError(
                f"input path {shown!r} cannot be listed: "
                f"{describe_error(e, storage_options or {})}; check the path and "
                "its storage_options"
            ) from None
        if not files:
            raise InputError(
                f"input path {shown!r} matches no files; check that it exists "
                "(and that a URL's credentials allow reading it) and is not an "
                "empty folder"
            )
        if not _is_local(fs):
            files = [fs.unstrip_protocol(p) for p in files]
        if len(items) == 1:
            # one listing has no duplicates: sorting it in place spares a
            # million-file job a set and a second list
            files.sort()
            return files
        named += len(files)
        found.update(files)
    if named > len(found):
        warnings.warn(
            f"the input list names {named - len(found)} file(s) more than once "
            "(the same path twice, or a file inside a folder also listed); "
            "each is read once: drop the repeats to silence this",
            UserWarning,
            stacklevel=_outside_daskrun(),
        )
    return sorted(found)


def _outside_daskrun() -> int:
    """The ``stacklevel`` of the first caller outside daskrun: a warning
    then points at the user's line, however deep daskrun called."""
    package = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        level, frame = level + 1, frame.f_back
    return level


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _leftover(path: str) -> bool:
    """Whether ``path`` is the unfinished final file an earlier daskrun left
    beside its output file when it was killed while publishing.

    >>> _leftover("out/.parallel_run_step.txt." + "3f2a" * 8 + ".partial")
    True
    >>> _leftover("out/parallel_run_step.txt")
    False
    """
    return path.endswith(".partial") and (
        LEFTOVER.fullmatch(path.rsplit("/", 1)[-1]) is not None
    )


def _find_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    if _is_local(fs):
        return _glob_local(root) if _is_glob(root) else _walk_local(root)
    if _is_glob(root):
        matches = fs.glob(root, detail=True)
    elif fs.isdir(root):
        matches = {root: {"type": "directory"}}
    elif fs.isfile(root):
        return [root]
    else:
        return []
    files: set[str] = set()  # "dir/**" matches a file and the folders above it
    for name, info in matches.items():
        if info.get("type") == "directory":
            files.update(fs.find(name))
        else:
            files.add(name)
    # daskrun's bookkeeping below the listed folder (an output's parts, when
    # the output is inside an input folder) is no input; a folder given that
    # lies below some ".daskrun" (a runs folder in a home) is listed all the same
    base = _glob_base(root)
    return [f for f in files if not bookkeeping(f, base)]


def _glob_base(root: str) -> str:
    """``root`` up to the folder holding its first wildcard, without a
    trailing ``/``: the part of every path it lists that the user chose.

    >>> _glob_base("c/data/*/x.csv"), _glob_base("c/data/")
    ('c/data', 'c/data')
    """
    if not _is_glob(root):
        return root.rstrip("/")
    wild = min(root.find(c) for c in "*?[" if c in root)
    return root[:wild].rsplit("/", 1)[0]


def _walk_local(top: str) -> list[str]:
    """The files of a local file or folder (recursively), daskrun's
    bookkeeping folders and linked folders left out (as os.walk)."""
    try:
        mode = os.stat(top).st_mode
    except FileNotFoundError:
        if os.path.islink(top):
            raise _not_a_file(top) from None
        raise
    if stat.S_ISREG(mode):
        return [top]
    if not stat.S_ISDIR(mode):
        raise _not_a_file(top)
    # os.scandir one entry at a time: os.walk would first hold all of a
    # folder's names as a second list (70 MB for a million files)
    files: list[str] = []
    folders = [top]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_file():  # no stat: the folder listing says so
                    files.append(entry.path)
                elif not entry.is_dir():
                    raise _not_a_file(entry.path)
                elif entry.name != BOOKKEEPING and not entry.is_symlink():
                    folders.append(entry.path)
    return files


def _glob_local(pattern: str) -> list[str]:
    """The files that a local glob matches, as ``glob.glob(pattern,
    recursive=True)`` would, and all files below the folders it matches,
    each once.

    One walk from the folder above the first wildcard: ``**`` never enters
    a linked folder (as ``pathlib``'s ``rglob``), so symlink loops cost
    nothing and the time is linear in the files below; a folder the
    pattern matches is listed whole by :func:`_walk_local`.
    """
    base = _glob_base(os.path.normpath(pattern)) or "/"
    segments = [
        None if s == "**" else _segment(s)
        for s in os.path.normpath(pattern)[len(base) :].split("/")
        if s
    ]
    if not os.path.isdir(base):
        return []
    if _matches(segments, ()):  # "data/**" matches data/ itself
        return _walk_local(base)
    fixed = segments.index(None) if None in segments else len(segments)
    hidden_below = any(s is not None and s.hidden for s in segments[fixed:])
    files: list[str] = []
    folders: list[tuple[str, tuple[str, ...]]] = [(base, ())]
    while folders:
        folder, above = folders.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                names = (*above, entry.name)
                if not entry.is_dir():
                    if _matches(segments, names, folder=False):
                        if not entry.is_file():
                            raise _not_a_file(entry.path)
                        files.append(entry.path)
                elif entry.name == BOOKKEEPING:
                    continue
                elif _matches(segments, names):
                    files.extend(_walk_local(entry.path))
                elif len(names) <= fixed:  # a segment before any "**"
                    step = segments[len(names) - 1]
                    if len(names) < len(segments) and step and step(entry.name):
                        folders.append((entry.path, names))
                elif not entry.is_symlink() and (
                    hidden_below or not entry.name.startswith(".")
                ):
                    folders.append((entry.path, names))
    return files


@dataclass(frozen=True)
class _Segment:
    """One ``/``-separated part of a glob: a name to match, as fnmatch does;
    a name starting with ``.`` matches only a part that starts with one."""

    regex: re.Pattern[str]
    hidden: bool

    def __call__(self, name: str) -> bool:
        if name.startswith(".") and not self.hidden:
            return False
        return self.regex.match(name) is not None


def _segment(text: str) -> _Segment:
    return _Segment(re.compile(fnmatch.translate(text)), text.startswith("."))


def _matches(
    segments: Sequence[_Segment | None],
    names: Sequence[str],
    folder: bool = True,
    i: int = 0,
    j: int = 0,
) -> bool:
    """Whether the path ``names`` (a folder, or a file) matches the glob
    ``segments`` (``None`` for ``**``: any number of parts, none of them
    hidden). As in glob, a ``**`` at the end matches a folder itself, but
    a file only by its own name."""
    if i == len(segments):
        return j == len(names)
    segment = segments[i]
    if segment is None:
        if not folder and i == len(segments) - 1 and j == len(names):
            return False
        for k in range(j, len(names) + 1):
            if _matches(segments, names, folder, i + 1, k):
                return True
            if k < len(names) and names[k].startswith("."):
                return False
        return False
    return (
        j < len(names)
        and segment(names[j])
        and _matches(segments, names, folder, i + 1, j + 1)
    )


def _not_a_file(path: str) -> InputError:
    """The one line for a local input that is no regular file: reading a
    FIFO would wait for a writer until the mini-batch timed out."""
    if os.path.islink(path) and not os.path.exists(path):
        return InputError(
            f"input {path!r} is a broken symbolic link (to "
            f"{os.readlink(path)!r}); fix or remove the link, or list the "
            "files to read"
        )
    mode = os.stat(path).st_mode
    kind = (
        "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a regular file"
    )
    return InputError(
        f"input {path!r} is {kind}, not a regular file; move it out of the "
        "input folder, or list the files to read"
    )


class _DatasetBase:
    """Files plus how to reach them.

    ``path`` is a local path, folder, glob or fsspec URL, a
    ``datastore.path(...)`` (a ``DataPath`` of the registry), a
    ``(datastore, "path")`` pair, or a list of one of these. With a
    ``partition_format`` (:mod:`~daskrun.backends.inputs.partitions`) every
    file's path must
    match it, and its keys are :attr:`partition_keys`.
    """

    kind = ""

    def __init__(
        self,
        path: Any,
        *,
        validate: bool = True,
        storage_options: StorageOptions | None = None,
        partition_format: str | None = None,
    ):
        self.partition_format = partition_format
        self._partitions = (
            None if partition_format is None else PartitionFormat(partition_format)
        )
        self.name: str | None = None  # set once registered
        self.version: int | None = None
        # of StepRun.failed_items(): each input's last exception
        self.last_errors: dict[str, str] = {}
        self.datastore, self._source = _datastore_paths(path)
        if self.datastore is None:
            _check_path(path)
        if self.datastore is not None:
            self._path: Any = [self.datastore.url(p) for p in self._source]
            self.storage_options: dict[str, Any] = self.datastore.storage_options
        else:
            self._path = path
            self.storage_options = dict(storage_options or {})
        self._files: list[str] | None = None
        if validate:
            self.files()
            for _ in self.partition_values():  # a file off the pattern fails now
                pass

    def files(self) -> list[str]:
        """The data set's files, sorted by path (listed once, then cached).

        Remote listings are bounded by ``daskrun.storage-timeout`` seconds,
        and their errors never show credentials.
        """
        if self._files is None:
            # remote storage, whatever gives its credentials (the
            # environment too), is bounded
            if (
                self.storage_options
                or self.datastore is not None
                or _remote(self._path)
            ):
                where = (
                    f"datastore {self.datastore.name!r}"
                    if self.datastore is not None
                    else f"storage for {self._path!r}"
                )
                self._files = _bounded(
                    lambda: expand_paths(self._path, self.storage_options),
                    float(config_get("storage-timeout")),
                    where,
                    self.storage_options,
                )
            else:
                self._files = expand_paths(self._path, self.storage_options)
        return self._files

    @property
    def local(self) -> bool:
        """Whether the files are on a local (or mounted) file system."""
        fs, _ = url_to_fs(self.files()[0], **self.storage_options)
        return _is_local(fs)

    def stamps(self) -> Iterator[tuple[str, int, str]]:
        """``(path, size, mtime or ETag)`` of each file, in listing order:
        what allow_reuse and resume compare. Local files are stat'ed one at
        a time (nothing held per file); remote folders are listed once
        each, not file by file."""
        files = self.files()
        fs, _ = url_to_fs(files[0], **self.storage_options)
        if _is_local(fs):
            for f in files:
                st = os.stat(f)
                yield f, st.st_size, str(st.st_mtime_ns)
            return
        infos: dict[str, dict[str, Any]] = {}
        for parent in sorted({fs._parent(fs._strip_protocol(f)) for f in files}):
            for info in fs.ls(parent, detail=True):
                infos[info["name"].rstrip("/")] = info
        for f in files:
            info = infos.get(fs._strip_protocol(f), {})
            stamp = info.get("etag") or info.get("last_modified") or info.get("mtime")
            yield f, int(info.get("size") or 0), str(stamp)

    @property
    def given(self) -> list[str]:
        """The paths, folders, globs or URLs the data set was made from."""
        path = self._path
        items = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        return [os.fspath(p) for p in items]

    def spec(self) -> dict[str, Any]:
        """Plain data that rebuilds this data set in a workspace (never
        credentials)."""
        if self.datastore is None and self.storage_options:
            raise ConfigError(
                f"{self!r} reads remote storage with storage_options, which a "
                "workspace does not store; build it from a datastore path: "
                "Dataset.File.from_files(datastore.path('folder/'))"
            )
        paths = self._source if self.datastore is not None else self.given
        if self.datastore is None:
            paths = [os.path.abspath(p) if "://" not in p else p for p in paths]
        return {
            "kind": self.kind,
            "datastore": None if self.datastore is None else self.datastore.name,
            "paths": paths,
            "file_format": getattr(self, "file_format", None),
            "pandas_kwargs": getattr(self, "pandas_kwargs", {}),
            "partition_format": self.partition_format,
        }

    @property
    def partition_keys(self) -> list[str]:
        """The keys of ``partition_format`` (``[]`` without one)."""
        return [] if self._partitions is None else list(self._partitions.keys)

    def partition_values(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(path, {key: value})`` for each file, in path order; a file
        that does not match ``partition_format`` raises :class:`InputError`
        naming it and the pattern. Nothing without a ``partition_format``.

        The pattern is matched against the end of each file's path below
        the folder it was listed from (a folder given, or the part of a glob
        before its first wildcard), so a stray file beside the partition
        folders is refused rather than read with the folders above it as keys.
        """
        if self._partitions is None:
            return
        roots = _listing_roots(self._path)
        for path in self.files():
            yield path, self._partitions.match(path, _root_of(path, roots))

    def register(
        self,
        workspace: Any,
        name: str,
        description: str | None = None,
        tags: dict[str, str] | None = None,
        create_new_version: bool = False,
    ) -> Any:
        """Register this data set in ``workspace`` under ``name``; with
        ``create_new_version`` an existing name gets a new version."""
        return workspace.register_dataset(
            self,
            name,
            description=description,
            tags=tags,
            create_new_version=create_new_version,
        )

    def as_named_input(self, name: str) -> DatasetConsumptionConfig:
        """This data set as a step input named ``name``."""
        return DatasetConsumptionConfig(name, self)

    def as_mount(self) -> Any:
        """Files reach ``run()`` as local paths in every mode; kept for the
        tutorial's code."""
        return self

    def as_download(self) -> Any:
        return self

    def __repr__(self) -> str:
        """What messages show of a data set: its name, or the paths it was
        made from (the first three of a list, and how many more); never its
        storage_options, which hold secrets.

        >>> FileDataset(["a.png", "b.png", "c.png", "d.png"], validate=False)
        FileDataset(['a.png', 'b.png', 'c.png', ... 1 more])
        """
        kind = type(self).__name__
        if self.name is not None:
            return f"{kind}(name={self.name!r}, version={self.version})"
        given = self._source if self.datastore is not None else self.given
        where = "" if self.datastore is None else f"{self.datastore.name}:"
        if len(given) == 1 and isinstance(self._path, (str, os.PathLike)):
            return f"{kind}({where}{given[0]!r})"
        more = f", ... {len(given) - 3} more" if len(given) > 3 else ""
        return f"{kind}({where}[{', '.join(map(repr, given[:3]))}{more}])"

    def _where(self) -> str:
        if self.datastore is not None:
            return f"datastore {self.datastore.name!r}"
        return f"storage for {self.given!r}"


def _relative(files: Sequence[str], storage_options: StorageOptions) -> list[str]:
    """The files' paths below their common folder, as Azure ML's
    ``to_path()`` gives them: ``/<path>`` with ``/`` separators."""
    if not files:
        return []
    fs, _ = url_to_fs(files[0], **storage_options)
    paths = [fs._strip_protocol(f).replace(os.sep, "/") for f in files]
    base = posixpath.dirname(paths[0]) if len(paths) == 1 else _folder_of(paths)
    return ["/" + posixpath.relpath(p, base) for p in paths]


def _folder_of(paths: Sequence[str]) -> str:
    common = posixpath.commonpath(list(paths))
    return posixpath.dirname(common) if common in paths else common


def _listing_roots(path: Any) -> list[str]:
    """The folders the given paths list files from: each path, or a glob's
    part before its first wildcard; longest first."""
    items = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    roots = []
    for item in (str(os.fspath(i)) for i in items):
        wild = min((item.find(c) for c in "*?[" if c in item), default=-1)
        root = item if wild < 0 else item[:wild].rsplit("/", 1)[0]
        if "://" not in root:
            root = os.path.abspath(root)
        roots.append(root.rstrip("/"))
    return sorted(roots, key=len, reverse=True)


def _root_of(path: str, roots: Sequence[str]) -> str | None:
    """The longest of ``roots`` that ``path`` lies below, if any."""
    return next((r for r in roots if path.startswith(r + "/")), None)


def _check_path(path: Any) -> None:
    """Refuse what names no file: ``None``, a number, an empty list.

    >>> _check_path(42)
    Traceback (most recent call last):
    ...
    daskrun.exceptions.InputError: path=42 is not a path; pass a file, folder, glob or fsspec URL, or a list of them, e.g. Dataset.File.from_files('images/')
    """  # noqa: E501
    paths = (str, os.PathLike)
    if isinstance(path, paths) or (
        isinstance(path, Sequence)
        and not isinstance(path, bytes)
        and all(isinstance(p, paths) for p in path)
    ):
        return
    raise InputError(
        f"path={path!r} is not a path; pass a file, folder, glob or fsspec URL, "
        "or a list of them, e.g. Dataset.File.from_files('images/')"
    )


def _datastore_paths(path: Any) -> tuple[Any, list[str]]:
    """``(datastore, paths on it)`` when ``path`` names datastore paths
    (``datastore.path(...)``, ``(datastore, "path")`` or a list of either),
    else ``(None, [])``. A datastore is anything with ``url()``, ``name``
    and ``storage_options``: the registry's objects, never imported here."""
    items = [path] if _datastore_path(path) or isinstance(path, tuple) else path
    if isinstance(items, (str, os.PathLike)) or not isinstance(items, Sequence):
        return None, []
    pairs = [pair for pair in map(_datastore_path, items) if pair is not None]
    if not pairs:
        return None, []
    if len(pairs) != len(items) or len({id(p[0]) for p in pairs}) > 1:
        raise ConfigError(
            f"path={path!r} mixes datastores or plain paths; make one data set "
            "per datastore"
        )
    return pairs[0][0], [p for _, p in pairs]


def _datastore_path(item: Any) -> tuple[Any, str] | None:
    if hasattr(item, "path_on_datastore") and hasattr(item, "datastore"):
        return item.datastore, str(item.path_on_datastore)
    if (
        isinstance(item, tuple)
        and len(item) == 2
        and all(hasattr(item[0], a) for a in ("url", "name", "storage_options"))
    ):
        return item[0], str(item[1])
    return None


def _remote(path: Any) -> bool:
    """Whether ``path`` (a path, URL or list of them) names remote storage.

    >>> _remote(["a/", "abfs://c/x"]), _remote("file:///tmp/a")
    (True, False)
    """
    paths = path if isinstance(path, (list, tuple)) else [path]
    return any(
        isinstance(p, str) and "://" in p and not p.startswith("file://") for p in paths
    )


def _bounded(
    fn: Any, timeout: float, where: str, storage_options: StorageOptions
) -> Any:
    """``fn()``, or a :class:`~daskrun.StorageTimeoutError` once ``timeout``
    seconds pass; storage failures come back as one InputError line without
    credentials (:func:`~daskrun.backends.storage.map_errors`)."""

    def timed_out(e: BaseException | None = None) -> StorageTimeoutError:
        return StorageTimeoutError(
            f"{where} did not answer within {timeout:g} s; check its endpoint, "
            "network and credentials (the bound is daskrun.storage-timeout)",
            datastore=where,
            action="listing",
        )

    def refused(e: BaseException) -> InputError:
        return InputError(
            f"{where} refused the listing: {describe_error(e, storage_options)}; "
            "check its credentials (re-register the datastore with "
            "overwrite=True) and the path"
        )

    def own(e: DaskRunError) -> BaseException:
        if isinstance(e, (InputError, StorageError)):
            return e
        return type(e)(redact(str(e), storage_options))

    with map_errors(refused, timed_out, own):
        return within(timeout, fn, timed_out)


class FileDataset(_DatasetBase):
    """A list of files; ``run()`` receives lists of local paths."""

    kind = "file"

    def plan(self, mini_batch_size: object = None) -> Iterator[FileBatch]:
        """Yield the mini-batches, lazily.

        >>> import pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for i in range(5): _ = (d / f"{i}.txt").write_text("x")
        >>> [len(b.paths) for b in FileDataset(str(d)).plan(2)]
        [2, 2, 1]
        """
        return plan_files(self.files(), mini_batch_size_for("file", mini_batch_size))

    def to_path(self) -> list[str]:
        """The files' paths below their common folder, each starting with
        ``/``: where :meth:`download` puts them under its ``target_path``.

        >>> import pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> (d / "a").mkdir(); _ = (d / "a" / "1.png").write_bytes(b"")
        >>> _ = (d / "2.png").write_bytes(b"")
        >>> FileDataset(str(d)).to_path()
        ['/2.png', '/a/1.png']
        """
        return _relative(self.files(), self.storage_options)

    def download(
        self,
        target_path: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        ignore_not_found: bool = False,
    ) -> list[str]:
        """Copy the files to ``target_path`` (default: a new temporary
        folder), laid out as :meth:`to_path` says; returns their local paths.
        A file already there is refused unless ``overwrite``."""
        target = (
            tempfile.mkdtemp(prefix="daskrun-dataset-")
            if target_path is None
            else os.fspath(target_path)
        )
        files = self.files()
        local = [os.path.join(target, *p.split("/")) for p in self.to_path()]
        if not overwrite:
            there = [p for p in local if os.path.exists(p)]
            if there:
                raise ConfigError(
                    f"{len(there)} files are already in {target!r}, e.g. "
                    f"{there[0]!r}; pass overwrite=True or another target_path"
                )
        fs, _ = url_to_fs(files[0], **self.storage_options)
        with storage_errors(self._where(), self.storage_options, "downloading"):
            for remote, path in zip(files, local, strict=True):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fs.get(fs._strip_protocol(remote), path)
        return local

    def to_bag(
        self, mini_batch_size: object = None, partition_keys: Any = None
    ) -> dask.bag.Bag:
        """The mini-batches as a Dask bag: one partition per mini-batch,
        holding its paths, as a step plans them (with ``partition_keys``,
        one per partition of the data set).

        >>> import pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for i in range(5): _ = (d / f"{i}.txt").write_text("x")
        >>> FileDataset(str(d)).to_bag(2).npartitions
        3
        """
        import dask.bag as db

        batches = (
            self.plan(mini_batch_size)
            if partition_keys is None
            else _plan_partitioned(self, partition_keys, None)
        )
        return db.from_delayed([_delayed_paths(b.paths) for b in batches])


class TabularDataset(_DatasetBase):
    """CSV or Parquet files; ``run()`` receives ``pandas.DataFrame`` pieces."""

    kind = "tabular"

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
        self.pandas_kwargs = (
            check_csv_options(pandas_kwargs or {}) if file_format == "csv" else {}
        )
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
                if self.file_format == "csv":
                    return csv_columns(path, self.storage_options, self.pandas_kwargs)
                import pyarrow.parquet as pq

                with fsspec.open(path, "rb", **self.storage_options) as f:
                    return list(pq.read_schema(f).names)
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
        size = mini_batch_size_for("tabular", mini_batch_size)
        files = [f for f in self.files() if f != exclude]
        if not files:
            return
        fs, _ = url_to_fs(files[0], **self.storage_options)
        index = start
        options = self.storage_options
        if self.file_format == "csv":
            for path, nbytes in zip(files, _sizes(fs, files, options), strict=True):
                with _reading(path, options):
                    cuts = plan_csv(fs, path, nbytes, size, self.pandas_kwargs)
                for cut in cuts:
                    yield CsvBatch(index, path, *cut)
                    index += 1
        else:
            groups_of = _row_group_sizes(fs, files, options)
            for path, groups in zip(files, groups_of, strict=True):
                for rgs in plan_row_groups([g[0] for g in groups], size):
                    rows = sum(groups[i][1] for i in rgs)
                    yield ParquetBatch(index, path, tuple(rgs), rows)
                    index += 1

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


def read_rows(
    batch: Any,
    storage_options: StorageOptions,
    pandas_kwargs: Mapping[str, Any],
    partition_format: str | None,
) -> pd.DataFrame:
    """A tabular mini-batch's rows as ``run()`` gets them: a partition's
    files read whole, or a CSV byte range or Parquet row groups, with a
    column per partition key."""
    if isinstance(batch, PartitionBatch):
        frame, _ = read_partition(
            batch,
            storage_options,
            pandas_kwargs,
            partition_format,
            True,  # tabular: read whole, nothing copied
            "",
        )
        return frame
    assert isinstance(batch, CsvBatch | ParquetBatch)
    frame = read_tabular(batch, storage_options, pandas_kwargs)
    return with_partition_columns(frame, batch.path, partition_format)


def _plan_partitioned(
    dataset: _DatasetBase, partition_keys: Any, file_format: str | None
) -> list[PartitionBatch]:
    """A step's plan of ``dataset`` with ``partition_keys``."""
    keys = parse_partition_keys(partition_keys) or ()
    check_partition_keys(keys, dataset)
    return plan_partitions(dataset.partition_values(), keys, file_format)


def _delayed_paths(paths: list[str]) -> Any:
    import dask

    return dask.delayed(paths, traverse=False)


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


def _map_files(fn: Any, files: list[str]) -> list[Any]:
    # metadata look-ups are I/O bound: overlap them on remote storage
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(files)))) as pool:
        return list(pool.map(fn, files))


@contextlib.contextmanager
def _reading(path: str, storage_options: StorageOptions) -> Iterator[None]:
    """Errors reading input file ``path`` to plan its mini-batches: one
    InputError line naming it, without credentials (a URL's SAS token
    included); a timeout is a :class:`~daskrun.StorageTimeoutError`, as
    the listing's (:func:`_bounded`)."""
    shown = redact(path, storage_options)

    def unreadable(e: BaseException) -> InputError:
        return InputError(
            f"input file {shown!r} cannot be read: "
            f"{describe_error(e, storage_options)}; check that it exists and "
            "that its storage_options (or the SAS token in its URL) allow "
            "reading it"
        )

    def timed_out(e: BaseException) -> StorageTimeoutError:
        return StorageTimeoutError(
            f"input file {shown!r} did not answer: "
            f"{describe_error(e, storage_options)}; check its endpoint, network "
            "and credentials (the bound is daskrun.storage-timeout)",
            datastore=shown,
            action="reading",
        )

    with map_errors(unreadable, timed_out):
        yield


def _sizes(
    fs: fsspec.AbstractFileSystem, files: list[str], storage_options: StorageOptions
) -> list[int]:
    def size(path: str) -> int:
        with _reading(path, storage_options):
            return int(fs.size(path))

    return _map_files(size, files)


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


# --- worker side: plans become what run() receives ---------------------------


def read_tabular(
    batch: CsvBatch | ParquetBatch,
    storage_options: StorageOptions,
    pandas_kwargs: Mapping[str, Any],
) -> pd.DataFrame:
    """Read one tabular mini-batch into a DataFrame."""
    if isinstance(batch, ParquetBatch):
        import pyarrow.parquet as pq

        with fsspec.open(batch.path, "rb", **storage_options) as f:
            table = pq.ParquetFile(f).read_row_groups(list(batch.row_groups))
        return table.to_pandas()

    return read_csv(batch, storage_options, pandas_kwargs)


def read_whole(
    path: str,
    file_format: str,
    storage_options: StorageOptions,
    pandas_kwargs: Mapping[str, Any],
    partition_format: str | None,
) -> pd.DataFrame:
    """One tabular file, read whole, with its partition columns."""
    if file_format == "csv":
        frame = read_csv(CsvBatch(0, path), storage_options, pandas_kwargs)
    else:
        import pyarrow.parquet as pq

        with fsspec.open(path, "rb", **storage_options) as f:
            frame = pq.ParquetFile(f).read().to_pandas()
    return with_partition_columns(frame, path, partition_format)


def with_partition_columns(
    frame: pd.DataFrame, path: str, partition_format: str | None
) -> pd.DataFrame:
    """``frame`` (read from ``path``) with a column per partition key, as
    Azure ML adds them to a partitioned tabular data set's rows; a key
    named like one of the file's columns is refused, never overwritten."""
    if partition_format is not None:
        pattern = PartitionFormat(partition_format)
        check_key_columns(pattern, frame.columns, path)
        for key, value in pattern.match(path).items():
            frame[key] = value
    return frame


def check_key_columns(pattern: PartitionFormat, columns: Any, path: str) -> None:
    """Refuse a partition key named like a column of the file at ``path``:
    its values from the path would replace the column's.

    >>> check_key_columns(PartitionFormat("/{m}/x.csv"), ["m", "v"], "a/x.csv")
    Traceback (most recent call last):
    ...
    daskrun.exceptions.InputError: partition_format='/{m}/x.csv': key 'm' is also a column of 'a/x.csv', whose values it would replace; rename the key in the pattern, e.g. {m_key}
    """  # noqa: E501
    same = [k for k in pattern.keys if k in set(map(str, columns))]
    if same:
        raise InputError(
            f"partition_format={pattern.text!r}: key {same[0]!r} is also a column "
            f"of {path!r}, whose values it would replace; rename the key in the "
            f"pattern, e.g. {{{same[0]}_key}}"
        )


def read_partition(
    batch: PartitionBatch,
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


class DatasetConsumptionConfig:
    """A named step input: a data set, or a PipelineParameter whose value is
    one (``DatasetConsumptionConfig("images", param).as_mount()``).

    Files always reach ``run()`` as local paths (remote ones are fetched per
    mini-batch), so ``as_mount()`` and ``as_download()`` mean the same.
    """

    def __init__(self, name: str, dataset: Any, mode: str = "direct"):
        source = (
            dataset.default_value if isinstance(dataset, PipelineParameter) else dataset
        )
        if not isinstance(source, (FileDataset, TabularDataset, PipelineData)):
            raise ConfigError(
                f"DatasetConsumptionConfig {name!r}: {dataset!r} is not a data set "
                "nor a PipelineParameter holding one"
            )
        self.name = name
        self.source = dataset
        self.mode = mode

    def as_mount(self) -> DatasetConsumptionConfig:
        self.mode = "mount"
        return self

    def as_download(self) -> DatasetConsumptionConfig:
        self.mode = "download"
        return self

    def __repr__(self) -> str:
        return f"DatasetConsumptionConfig({self.name!r}, {self.source!r})"


class PipelineData:
    """A step's output folder that a later step of the same pipeline reads.

    Each run writes it to ``daskrun/<step run id>/<name>/`` on ``datastore``
    (default: the workspace's default datastore). A step that takes it in
    ``inputs`` receives its files (daskrun's own bookkeeping excluded).
    """

    def __init__(self, name: str, datastore: Any = None, **_: Any):
        self.name = check_name("PipelineData", name)
        self.datastore = datastore

    def __repr__(self) -> str:
        return f"PipelineData(name={self.name!r})"


class OutputFileDatasetConfig(PipelineData):
    """Azure ML's ``OutputFileDatasetConfig`` where it fits: a step's output
    folder, as :class:`PipelineData`.

    ``destination=(datastore, path)`` names the datastore; the output is
    written to ``daskrun/<step run id>/<name>/`` on it, as PipelineData's is
    (the ``path`` is recorded and unused). ``as_mount()``, ``as_upload()``
    and ``as_input()`` return the output itself.
    """

    def __init__(
        self,
        name: str | None = None,
        destination: tuple[Any, str] | None = None,
        source: str | None = None,
        partition_format: str | None = None,
    ):
        if name is None:
            raise ConfigError(
                "OutputFileDatasetConfig needs a name here (daskrun names the "
                "output folder after it); pass name='inferences'"
            )
        datastore, path = destination or (None, None)
        self.destination_path: str | None = path  # recorded, unused
        super().__init__(name, datastore)

    def as_mount(self, disable_metadata_cache: bool = False) -> OutputFileDatasetConfig:
        return self

    def as_upload(
        self, overwrite: bool = False, source_globs: Any = None
    ) -> OutputFileDatasetConfig:
        return self

    def as_input(self, name: str | None = None) -> OutputFileDatasetConfig:
        return self
