"""File data sets: what every data set of files shares (:class:`_DatasetBase`:
its paths, listing, stamps, partition keys, registration) and
:class:`FileDataset`, whose mini-batches ``run()`` receives as lists of local
paths.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fsspec.core import url_to_fs

from daskrun.backends.inputs.base import Input
from daskrun.backends.inputs.batches import (
    FileBatch,
    _plan_partitioned,
    file_batch_count,
    plan_files,
    plan_files_around,
)
from daskrun.backends.inputs.consumption import DatasetConsumptionConfig
from daskrun.backends.inputs.listing import (
    Stats,
    StorageOptions,
    _bounded,
    _check_path,
    _datastore_paths,
    _is_local,
    _listing_roots,
    _relative,
    _remote,
    _root_of,
    absolute,
    expand_paths,
)
from daskrun.backends.inputs.partitions import PartitionFormat
from daskrun.backends.storage import (
    storage_errors,
)
from daskrun.engine.config import (
    config_get,
    mini_batch_size_for,
    parse_file_count,
)
from daskrun.exceptions import ConfigError, InputError

if TYPE_CHECKING:
    import dask.bag
    import dask.dataframe


class _DatasetBase(Input):
    """Files plus how to reach them.

    ``path`` is a local path, folder, glob or fsspec URL, a
    ``datastore.path(...)`` (a ``DataPath`` of the registry), a
    ``(datastore, "path")`` pair, or a list of one of these. With a
    ``partition_format`` (:mod:`~daskrun.backends.inputs.partitions`) every
    file's path must
    match it, and its keys are :attr:`partition_keys`.
    """

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
        # the local files' sizes and mtimes as listed: the first stamps()
        # uses them instead of stat'ing every file again
        self._stats: Stats | None = None
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
                self._stats = {}
                self._files = expand_paths(
                    self._path, self.storage_options, self._stats
                )
        return self._files

    @property
    def local(self) -> bool:
        """Whether the files are on a local (or mounted) file system."""
        return self._local(self.files()[0])

    def _local(self, file: str) -> bool:
        if "://" not in file:  # listed local files are plain paths
            return True
        fs, _ = url_to_fs(file, **self.storage_options)
        return _is_local(fs)

    def stamps(self) -> Iterator[tuple[str, int, str]]:
        """``(path, size, mtime or ETag)`` of each file, in listing order:
        what allow_reuse and resume compare. Local files are stat'ed one at
        a time, but the first call takes what the listing learnt instead
        (later calls see a file changed since); remote folders are listed
        once each, not file by file."""
        files = self.files()
        stats, self._stats = self._stats or {}, None
        if stats or self._local(files[0]):
            for f in files:
                found = stats.get(f)
                if found is None:
                    try:
                        st = os.stat(f)
                    except OSError as e:  # gone since it was listed
                        raise InputError(
                            f"input file {f!r} cannot be read: {e.strerror}; it "
                            "was listed when the job started; put it back, or "
                            "rerun the step to list its inputs again"
                        ) from None
                    found = st.st_size, st.st_mtime_ns
                yield f, found[0], str(found[1])
            return
        fs, _ = url_to_fs(files[0], **self.storage_options)
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
            paths = [absolute(p) if "://" not in p else p for p in paths]
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


class FileDataset(_DatasetBase):
    """A list of files; ``run()`` receives lists of local paths."""

    kind = "file"
    pilots = True

    @classmethod
    def size_of(cls, value: object) -> int:
        return mini_batch_size_for(cls.kind, value, parse_file_count)

    @classmethod
    def from_record(
        cls,
        record: Any,
        given: Sequence[Any] | None,
        storage_options: Mapping[str, Any],
        paths: Callable[[], list[tuple[Any, str | None]]],
    ) -> list[Any]:
        return [
            cls(p, storage_options=storage_options, partition_format=f)
            for p, f in paths()
        ]

    @classmethod
    def dead_letters(
        cls, failed: list[str], storage_options: Callable[[], Mapping[str, Any]]
    ) -> Any:
        return cls(failed, storage_options=storage_options())

    @classmethod
    def from_spec(cls, path: Any, spec: Mapping[str, Any]) -> Any:
        return cls(path, validate=False, partition_format=spec.get("partition_format"))

    @classmethod
    def plan_inputs(
        cls, inputs: Sequence[Any], size: int, pilot: int, own: str | None
    ) -> tuple[Iterable[FileBatch], int]:
        files = (
            inputs[0].files()
            if len(inputs) == 1
            else [f for ds in inputs for f in ds.files()]
        )
        if own is not None and own in files:
            files = [f for f in files if f != own]
        return plan_files(files, size, pilot), file_batch_count(len(files), size, pilot)

    @classmethod
    def plan_around(
        cls,
        inputs: Sequence[Any],
        size: int,
        own: str | None,
        kept: Callable[[Sequence[str], int], int],
    ) -> tuple[Iterable[FileBatch], int]:
        # a file mini-batch crosses files: line it up with the kept ones
        files = [f for ds in inputs for f in ds.files() if f != own]
        batches = plan_files_around(files, size, kept)
        return batches, len(batches)

    @classmethod
    def planned_items(
        cls, inputs: Sequence[Any], batches: Any, own: str | None
    ) -> tuple[int | None, str]:
        n = 0
        for ds in inputs:
            files = ds.files()
            n += len(files) - (own is not None and own in files)
        return n, "files planned"

    @classmethod
    def fill_ledger(
        cls,
        ledger: Any,
        inputs: Sequence[Any],
        batches: Any,
        stamps: Iterator[tuple[str, int, str]],
        fresh_plan: Callable[[], Iterable[Any]],
    ) -> None:
        for batch in fresh_plan():  # ``batches`` is lazy
            got = list(itertools.islice(stamps, batch.n_items))
            ledger.files(got)
            ledger.mini_batch(batch.joined, [(size, stamp) for _, size, stamp in got])

    def plan(self, mini_batch_size: object = None) -> Iterator[FileBatch]:
        """Yield the mini-batches, lazily.

        >>> import pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for i in range(5): _ = (d / f"{i}.txt").write_text("x")
        >>> [len(b.paths) for b in FileDataset(str(d)).plan(2)]
        [2, 2, 1]
        """
        return plan_files(self.files(), self.size_of(mini_batch_size))

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


def _delayed_paths(paths: list[str]) -> Any:
    import dask

    return dask.delayed(paths, traverse=False)
