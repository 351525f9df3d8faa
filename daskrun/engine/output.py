"""Exactly-once output.

Workers write each successful mini-batch's rows to its own *part*, named by
mini-batch index, in one atomic step (a local rename, or a single object
upload). A retried or duplicated mini-batch rewrites the same part with the same
rows, so it can never add rows. The cheap mini-batches that share one task
have their parts written together, as one *group* file holding each one's
rows under its index (:func:`write_group`): one file created, or one object
uploaded, per task instead of per mini-batch. A mini-batch in two groups (a
task rerun after its result was lost) is still taken once. When the job ends
within its thresholds, the client streams the parts, in index order, into a
temporary file beside them (never among the output folder's data, where a
kill would leave it for the next step to read) and publishes it with one
rename. A failed job publishes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import (
    Callable,
    Container,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from daskrun.backends.outputs import OutputFormat, output_format_for
from daskrun.backends.outputs.base import ESCAPE
from daskrun.backends.outputs.base import check_returned as check_returned
from daskrun.backends.storage import FileLock, describe_error, map_errors, within
from daskrun.exceptions import ConfigError, DaskRunError, OutputError

_PART_DIGITS = 10
GROUP_BYTES = 16 << 20
"""A task's parts are written together up to this many bytes per group."""
_T = TypeVar("_T")


@dataclass(frozen=True)
class OutputTarget:
    """Where a run's output goes; shipped to the workers.

    ``url`` is the output folder (an absolute local path or an fsspec URL);
    parts live under ``<url>/.daskrun/<run_id>/parts``, the final file while
    it is assembled at ``<url>/.daskrun/<run_id>/<file_name>.partial``.
    """

    url: str
    file_name: str
    run_id: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    output_format: str = "text"  # a kind of daskrun.backends.outputs.FORMATS
    # seconds a remote store may take per operation (daskrun.storage-timeout,
    # resolved on the client); None: unbounded
    timeout: float | None = None

    @cached_property
    def format(self) -> OutputFormat:
        """The output format's class, named by ``output_format``."""
        return output_format_for(self.output_format)

    @cached_property
    def local(self) -> bool:
        return isinstance(self.fs(), LocalFileSystem)

    def folders(self) -> list[OutputTarget]:
        """The output folders this target writes, one target each (its
        own; a set of named outputs has one per output), to lock."""
        return [self]

    @property
    def final_url(self) -> str:
        return f"{self.url.rstrip('/')}/{self.file_name}"

    @property
    def run_url(self) -> str:
        """The run's bookkeeping folder in the output folder."""
        return f"{self.url.rstrip('/')}/.daskrun/{self.run_id}"

    @property
    def parts_url(self) -> str:
        return f"{self.run_url}/parts"

    @property
    def partial_url(self) -> str:
        """The final file while it is assembled."""
        return f"{self.run_url}/{self.file_name}.partial"

    def fs(self) -> fsspec.AbstractFileSystem:
        return url_to_fs(self.url, **self.storage_options)[0]

    @property
    def grouped(self) -> bool:
        """Whether a task's mini-batches are written together, as a group."""
        return True

    def keep(
        self, index: int, data: bytes, span: tuple[int, int] | None = None
    ) -> bytes | None:
        """On a worker: write mini-batch ``index``'s rows as its part
        (:func:`write_part`); what the client has left to write (nothing
        here; the rows themselves for :mod:`daskrun.engine.viaclient`)."""
        write_part(self, index, data, span)
        return None

    def encode(self, result: Any, items: int | None = None) -> tuple[bytes, int]:
        """On a worker: ``run()``'s return value as one part's bytes, and
        the items it counts (its rows here; ``items``, the mini-batch's
        inputs, is for :class:`~daskrun.engine.outputs.OutputSet`)."""
        return self.format.encode(result)

    def publish(
        self, succeeded: Sequence[int], describe: Callable[[int], str] | None = None
    ) -> str:
        """On the client, once the job ends within its thresholds: the final
        file, assembled and published (:func:`assemble`); its path or URL."""
        return assemble(self, succeeded, describe)

    def part_url(self, index: int, span: tuple[int, int] | None = None) -> str:
        """The part of mini-batch ``index``, or of its items ``span``
        (``[start, stop)``, a piece of it that succeeded in isolation)."""
        if span is None:
            return f"{self.parts_url}/{index:0{_PART_DIGITS}d}.part"
        start, stop = span
        return (
            f"{self.parts_url}/{index:0{_PART_DIGITS}d}."
            f"{start:0{_PART_DIGITS}d}-{stop:0{_PART_DIGITS}d}.part"
        )


def format_rows(result: Any, output_format: str = "text") -> tuple[bytes, int]:
    """Turn ``run()``'s return value into one part's bytes and a row count,
    in ``output_format`` (see :mod:`daskrun.backends.outputs`).

    >>> format_rows(["a: 1", "b\\n2"])
    (b'a: 1\\nb\\\\n2\\n', 2)
    >>> format_rows(["x", "y"], "csv")
    (b'result\\nx\\ny\\n', 2)
    """
    return output_format_for(output_format).encode(result)


def bounded(
    target: OutputTarget, what: str, fn: Callable[[], _T], nbytes: int = 0
) -> _T:
    """``fn()``, or an :class:`~daskrun.OutputError` once ``target.timeout``
    seconds (plus one per MB of ``nbytes`` to send) pass on remote storage."""
    if target.timeout is None or target.local:
        return fn()
    timeout = target.timeout + nbytes / 1e6
    return within(
        timeout,
        fn,
        lambda: OutputError(
            f"{what} on output {target.url!r} did not answer within "
            f"{round(timeout, 1):g} s; check the output storage's endpoint, network "
            "and credentials (the bound is daskrun.storage-timeout)"
        ),
    )


def write_part(
    target: OutputTarget,
    index: int,
    data: bytes,
    span: tuple[int, int] | None = None,
) -> None:
    """Write mini-batch ``index``'s rows (of its items ``span`` only, for a
    piece of it) atomically, replacing any earlier copy."""
    _put(target, target.part_url(index, span), data, f"mini-batch {index}'s result")


def write_group(target: OutputTarget, parts: Sequence[tuple[int, bytes]]) -> None:
    """Write several whole mini-batches' rows (``(index, rows)``, the
    mini-batches of one task) as one group file, atomically.

    The file's first line lists each mini-batch's index and its rows' bytes
    (JSON); their rows follow in that order. Its name starts with the first
    index and holds a random part, so a rerun never replaces another group.
    """
    header = json.dumps([[index, len(data)] for index, data in parts])
    body = b"".join([header.encode() + b"\n", *(data for _, data in parts)])
    first = parts[0][0]
    _put(
        target,
        f"{target.parts_url}/{first:0{_PART_DIGITS}d}.{uuid.uuid4().hex}.group",
        body,
        f"the results of mini-batches {first}-{parts[-1][0]}",
    )


def _put(target: OutputTarget, path: str, data: bytes, what: str) -> None:
    """Write ``data`` to ``path`` in one atomic step."""
    if target.local:  # prepare_parts() made the folder
        tmp = f"{target.parts_url}/.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        # one PUT: object stores commit a blob whole or not at all
        bounded(
            target,
            f"writing {what}",
            lambda: target.fs().pipe_file(path, data),
            len(data),
        )


def _part_names(target: OutputTarget, suffix: str = ".part") -> list[str]:
    """The names of the parts (or groups) written, without their folder and
    suffix, as they are now: workers write them from other processes, so an
    earlier listing that the file system cached (adlfs does) is stale."""
    fs = target.fs()
    fs.invalidate_cache(fs._strip_protocol(target.parts_url).rstrip("/"))
    try:
        names = bounded(
            target, "listing the parts", lambda: fs.ls(target.parts_url, detail=False)
        )
    except FileNotFoundError:
        return []
    bases = (name.rsplit("/", 1)[-1] for name in names)
    return [base[: -len(suffix)] for base in bases if base.endswith(suffix)]


@dataclass(frozen=True)
class _Grouped:
    """Where a mini-batch's rows lie in a group file."""

    url: str
    start: int
    stop: int


class Parts:
    """What a run's parts folder holds, listed once: the mini-batches whose
    rows are written whole (a part of their own, or in a group), and the
    pieces of those whose failed items were isolated."""

    def __init__(self, target: OutputTarget):
        self.target = target
        names = _part_names(target)
        self.own = {int(name) for name in names if name.isdigit()}
        found: dict[int, list[tuple[int, int]]] = {}
        for name in names:
            index, _, span = name.partition(".")
            start, _, stop = span.partition("-")
            if index.isdigit() and start.isdigit() and stop.isdigit():
                found.setdefault(int(index), []).append((int(start), int(stop)))
        self.pieces = {index: sorted(spans) for index, spans in found.items()}
        self.grouped: dict[int, _Grouped] = {}
        self._groups: dict[str, list[int]] = {}  # each group's mini-batches
        for name in _part_names(target, ".group"):
            self._read_header(f"{target.parts_url}/{name}.group")
        self.whole = self.own | set(self.grouped)
        self._cached: tuple[str, bytes] = ("", b"")

    def _read_header(self, url: str) -> None:
        fs = self.target.fs()

        def read() -> bytes:
            with fs.open(url, "rb") as f:
                return bytes(f.readline())

        header = bounded(self.target, "reading a group of parts", read)
        offset = len(header)
        self._groups[url] = []
        for index, size in json.loads(header):
            # a mini-batch in two groups (a task rerun after its result was
            # lost) has the same rows in both: either will do
            self.grouped.setdefault(index, _Grouped(url, offset, offset + size))
            self._groups[url].append(index)
            offset += size

    def remove(self, indices: Container[int]) -> Parts:
        """Delete what is written of mini-batches ``indices`` (those a
        replanned resume changed): their parts, their pieces, and every group
        that holds one of them, whose other mini-batches then run again too.
        What is left, listed again."""
        target = self.target
        urls = [
            url for url, held in self._groups.items() if any(i in indices for i in held)
        ]
        urls += [target.part_url(i) for i in self.own if i in indices]
        urls += [
            target.part_url(i, span)
            for i, spans in self.pieces.items()
            if i in indices
            for span in spans
        ]
        if not urls:
            return self
        fs = target.fs()  # all listed above: they are there
        bounded(target, "removing changed mini-batches' parts", lambda: fs.rm(urls))
        return Parts(target)

    def open(self, index: int, span: tuple[int, int] | None = None) -> Any:
        """A binary file of mini-batch ``index``'s rows (its own part, or its
        rows in a group), or of its piece ``span``."""
        if span is not None or index in self.own or index not in self.grouped:
            return self.target.fs().open(self.target.part_url(index, span), "rb")
        where = self.grouped[index]
        if self._cached[0] != where.url:  # a group's mini-batches come in a row
            self._cached = (where.url, self.target.fs().cat_file(where.url))
        return io.BytesIO(self._cached[1][where.start : where.stop])


def committed_parts(target: OutputTarget) -> list[int]:
    """Indices of the mini-batches whose rows are written whole."""
    return sorted(Parts(target).whole)


def remove_part(target: OutputTarget, index: int, pieces: bool = True) -> None:
    """Delete mini-batch ``index``'s part and (with ``pieces``, which lists
    the parts folder) its pieces, if written: its items are about to be
    isolated afresh."""
    fs = target.fs()
    prefix = f"{index:0{_PART_DIGITS}d}"
    names = _part_names(target) if pieces else [prefix]
    there = [
        f"{target.parts_url}/{name}.part"
        for name in names
        if name == prefix or name.startswith(prefix + ".")
    ]
    there = [url for url in there if pieces or fs.exists(url)]
    if there:
        bounded(target, f"removing mini-batch {index}'s part", lambda: fs.rm(there))


def count_rows(parts: Parts, index: int) -> int:
    """Rows of a mini-batch written whole."""
    with parts.open(index) as f:
        return parts.target.format.count(f)


RESERVED_NAMES = (".daskrun",)
"""Names in an output folder that daskrun writes itself: its bookkeeping
folder (parts, the run lock, the final file being assembled). Earlier
daskrun assembled into ``.<name>.<hex>.partial`` beside the final file; data
sets never list such a file (:data:`daskrun.backends.inputs.datasets.LEFTOVER`).
"""


def check_output_folder(path: str, file_name: str | None) -> None:
    """Refuse a local output folder that cannot be written, before any work:
    a file (or a file above it), a read-only file system, one like /proc
    that holds no files, or a folder where the output file should go.

    Probes with a real temporary file in the nearest existing folder, which
    is what counts (permissions, read-only mounts, root or not).
    """
    fix = "pass an output folder you can write, e.g. output='out/'"
    shown = printable(path)
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(
            f"output={shown!r} cannot be a folder: {printable(existing)!r} is a "
            f"file; {fix}"
        )
    if file_name is not None and os.path.isdir(os.path.join(path, file_name)):
        raise ConfigError(
            f"output={shown!r} holds a folder {file_name!r} where the output file "
            "goes; remove it or pass another append_row_file_name"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".daskrun-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise ConfigError(
            f"output={shown!r} cannot be written: {reason} in "
            f"{printable(existing)!r}; {fix}"
        ) from None


def printable(text: str) -> str:
    r"""``text`` with what cannot be written as UTF-8 escaped: a file name
    that is not UTF-8 (``os.fsdecode`` makes its bytes lone surrogates).

    >>> printable("caf\udce9.txt")
    'caf\\udce9.txt'
    """
    return text.encode("utf-8", ESCAPE).decode("utf-8")


def lock_output(target: OutputTarget) -> FileLock:
    """One run at a time in a local output folder: a lock on
    ``<output>/.daskrun/lock``, which names the run holding it."""

    def refused(holder: str) -> Exception:
        return ConfigError(
            f"output={printable(target.url)!r} is in use by run "
            f"{holder or 'another run'!r} (still running); wait for it to end, or "
            "pass another output folder"
        )

    path = os.path.join(target.url, ".daskrun", "lock")
    return FileLock(path, target.run_id, refused, remove=True)


def prepare_parts(target: OutputTarget) -> None:
    """Create the parts folder (on the client, before any task); on remote
    storage, within ``target.timeout`` seconds."""

    def make() -> None:
        fs = target.fs()
        fs.makedirs(target.parts_url, exist_ok=True)
        if not target.local:  # object stores make folders lazily: reach it
            fs.exists(target.parts_url)

    bounded(target, "creating the parts folder", make)


def assemble(
    target: OutputTarget,
    succeeded: Sequence[int],
    describe: Callable[[int], str] | None = None,
) -> str:
    """Concatenate, in index order, the rows of the mini-batches that
    ``succeeded`` (a true value per mini-batch of the plan) and the pieces
    of those whose failed items were isolated, into the final file, and
    publish it atomically. Returns the final file's path or URL.

    CSV and Parquet parts must have one set of columns: the first part with
    rows sets them (a part without rows adds nothing and is not compared),
    and a part with others raises :class:`~daskrun.OutputError` naming both
    mini-batches (``describe(index)``, default ``"mini-batch <index>"``)
    before anything is published.

    A mini-batch without a part of its own contributes its pieces (its items
    that succeeded in isolation), in item order, at its place; so does one
    that did not succeed whose rows a group holds whole (a task whose result
    was lost had written it before its items were isolated).
    """
    name = describe or (lambda index: f"mini-batch {index}")
    with publishing(target):
        # an unreachable store fails here, in seconds (the listing is
        # bounded); the copy itself is not, since a large output takes as
        # long as it takes
        found = Parts(target)
        parts = (
            (index, functools.partial(found.open, index, span))
            for index, span in in_order(found, succeeded)
        )
        stage(target, parts, name)
        publish_staged(target)
    return target.final_url


@contextlib.contextmanager
def publishing(target: OutputTarget) -> Iterator[None]:
    """Map what fails while ``target``'s final file is assembled and
    published to one :class:`~daskrun.OutputError` that says the parts are
    kept for a resume."""
    final = target.final_url

    def failed(e: BaseException) -> OutputError:
        return OutputError(
            f"publishing {final!r} failed; {_kept(target)}; cause: "
            + describe_error(e, target.storage_options),
            run_id=target.run_id,
        )

    def own(e: DaskRunError) -> BaseException:
        if isinstance(e, OutputError):
            return OutputError(f"{e}; {_kept(target)}", run_id=target.run_id)
        return failed(e)  # a StorageTimeoutError of within()

    with map_errors(failed, own=own):
        yield


def in_order(
    found: Parts, succeeded: Sequence[int]
) -> Iterator[tuple[int, tuple[int, int] | None]]:
    """What goes into the final file, in order: ``(index, None)`` for a
    mini-batch's rows whole, ``(index, span)`` for each of its pieces."""
    isolated = {i for i in found.pieces if not succeeded[i]}
    for index in range(len(succeeded)):
        if succeeded[index] or index in found.pieces:
            for span in _spans(found, index, isolated):
                yield index, span


def _spans(
    found: Parts, index: int, isolated: Container[int]
) -> list[tuple[int, int] | None]:
    """What of mini-batch ``index`` goes into the output: ``[None]`` for its
    rows whole, else its pieces' spans, each item once.

    Pieces come from halving, so two spans are nested or apart. Both a piece
    and pieces inside it are there when the piece's part was written but its
    worker died before it reported (another task killed it): the runner
    counted the piece failed and halved it again. The widest spans are
    taken; the rows inside them are the same rows.

    >>> found = Parts.__new__(Parts)
    >>> found.own, found.grouped = set(), set()
    >>> found.pieces = {0: [(0, 11), (11, 22), (22, 33), (22, 45), (33, 45)]}
    >>> _spans(found, 0, {0})
    [(0, 11), (11, 22), (22, 45)]
    """
    pieces = found.pieces.get(index)
    if (
        not pieces
        or index in found.own
        or (index in found.grouped and index not in isolated)
    ):
        return [None]
    spans: list[tuple[int, int] | None] = []
    end = -1
    for start, stop in sorted(pieces, key=lambda span: (span[0], -span[1])):
        if start >= end:  # not inside the last span taken
            spans.append((start, stop))
            end = stop
    return spans


def _kept(target: OutputTarget) -> str:
    return (
        "nothing was published and the mini-batches' results are kept: fix the "
        f"cause, then run 'daskrun resume {target.run_id}'"
    )


def stage(
    target: OutputTarget,
    parts: Iterable[tuple[int, Callable[[], Any]]],
    name: Callable[[int], str],
) -> None:
    """Stream ``parts`` into ``target``'s final file as it is assembled
    (:attr:`OutputTarget.partial_url`), on disk before it returns; nothing
    is left there if it fails."""
    fs = target.fs()
    try:
        with fs.open(target.partial_url, "wb") as out:
            target.format.concat(parts, out, name)
            if isinstance(fs, LocalFileSystem):
                out.flush()
                os.fsync(out.fileno())
    except BaseException:
        discard_staged(target)
        raise


def publish_staged(target: OutputTarget) -> None:
    """Publish the final file :func:`stage` wrote, with one rename."""
    fs = target.fs()
    try:
        if isinstance(fs, LocalFileSystem):
            os.replace(target.partial_url, target.final_url)
        else:
            fs.mv(target.partial_url, target.final_url)
    except BaseException:
        discard_staged(target)
        raise


def discard_staged(target: OutputTarget) -> None:
    """Remove a final file being assembled, if there (errors ignored)."""
    fs = target.fs()
    with contextlib.suppress(Exception):
        if fs.exists(target.partial_url):
            fs.rm(target.partial_url)


def remove_partial(target: OutputTarget) -> None:
    """Delete the final file an earlier attempt of the run was assembling
    when it was killed, if any (on resume)."""
    if target.local:
        with contextlib.suppress(FileNotFoundError):
            os.remove(target.partial_url)
        return
    fs = target.fs()

    def remove() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(target.partial_url)

    bounded(target, "removing an unfinished final file", remove)


def remove_parts(target: OutputTarget) -> None:
    """Delete the run's parts once the final file is published."""
    run_folder = target.run_url
    if target.local:
        # fsspec's recursive rm lists every part with its metadata first
        shutil.rmtree(run_folder, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(run_folder))  # .daskrun/, if now empty
        except OSError:
            pass
        return
    fs = target.fs()
    if fs.exists(run_folder):
        fs.rm(run_folder, recursive=True)
