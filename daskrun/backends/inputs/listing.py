"""Finding an input's files: paths, folders, globs and fsspec URLs expanded
to files in path order (:func:`expand_paths`), daskrun's own bookkeeping
and leftovers left out; and the sizes and Parquet row groups planning
reads, each bounded by ``daskrun.storage-timeout``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import posixpath
import re
import stat
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from daskrun.backends.storage import (
    BOOKKEEPING,
    bookkeeping,
    describe_error,
    map_errors,
    redact,
    within,
)
from daskrun.exceptions import (
    ConfigError,
    DaskRunError,
    InputError,
    StorageError,
    StorageTimeoutError,
)

if TYPE_CHECKING:
    pass


StorageOptions = Mapping[str, Any]
# a local file's (size, mtime in ns), by path, as its listing found them
Stats = dict[str, tuple[int, int]]

# the final file an earlier daskrun was assembling when it was killed,
# .<name>.<uuid hex>.partial beside the final file: never data
LEFTOVER = re.compile(r"\.[^/]+\.[0-9a-f]{32}\.partial")

_LOCAL = LocalFileSystem()


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def expand_paths(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    storage_options: StorageOptions | None = None,
    stats: Stats | None = None,
) -> list[str]:
    """Expand paths, folders (recursively) and globs into a sorted file list.

    Local files come back as absolute paths, remote ones as full URLs. A
    file that a list names twice is listed once, with one warning saying
    how many repeats there were. Raises :class:`InputError` naming the
    first path that matches nothing, and a local input that is not a
    regular file (a FIFO, a socket, a broken symbolic link).

    Given ``stats``, each local file that the listing stat'ed (a file
    named, not a folder's entries) has its ``(size, mtime in ns)`` put
    there, so planning need not stat it again.
    """
    items = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not items:
        raise InputError("no input path given; pass a file, folder, glob or URL")
    listed: list[str] = []
    for item in items:
        text = os.fspath(item)
        if len(items) > 1 and _plain_file(text, listed, stats):
            continue
        files = _expand_one(text, storage_options or {}, stats)
        if len(items) == 1:
            # one listing has no duplicates: sorting it in place spares a
            # million-file job a set and a second list
            files.sort()
            return files
        listed += files
    found = set(listed)
    if len(listed) > len(found):
        warnings.warn(
            f"the input list names {len(listed) - len(found)} file(s) more than once "
            "(the same path twice, or a file inside a folder also listed); "
            "each is read once: drop the repeats to silence this",
            UserWarning,
            stacklevel=_outside_daskrun(),
        )
    return sorted(found)


def _plain_file(text: str, listed: list[str], stats: Stats | None) -> bool:
    """Whether ``text`` is the absolute, normalised path of a local regular
    file, then appended to ``listed`` (its size and mtime to ``stats``):
    one stat per path of a long list of files, the floor. Anything else
    (a folder, a glob, a URL, a relative path, a missing file) is left to
    :func:`_expand_one` and its errors."""
    if not _normal_absolute(text) or _is_glob(text) or text.endswith(".partial"):
        return False
    try:
        st = os.stat(text)
    except (OSError, ValueError):
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    listed.append(text)
    if stats is not None:
        stats[text] = (st.st_size, st.st_mtime_ns)
    return True


def _normal_absolute(text: str) -> bool:
    """Whether ``text`` is a local path that ``os.path.abspath`` leaves as
    it is: a string check, where abspath costs a normpath per path.

    >>> _normal_absolute("/d/a.png"), _normal_absolute("/d/../a.png")
    (True, False)
    """
    return (
        os.sep == "/"
        and text.startswith("/")
        and "//" not in text  # a URL too
        and "/./" not in text  # "." and ".." parts: normpath's work
        and "/../" not in text
        and not text.endswith(("/", "/.", "/.."))
    )


def absolute(text: str) -> str:
    """``os.path.abspath(text)``, without its cost for a path already so.

    >>> absolute("/d/a.png"), absolute("a.png") == os.path.abspath("a.png")
    ('/d/a.png', True)
    """
    return text if _normal_absolute(text) else os.path.abspath(text)


def _expand_one(
    text: str, storage_options: StorageOptions, stats: Stats | None
) -> list[str]:
    """The files one given path, folder, glob or URL names (unsorted)."""
    if not text:
        raise InputError(
            "input path '' is empty, which would read the current folder; "
            "pass a file, folder, glob or URL, e.g. 'data/' ('.' for the "
            "current folder)"
        )
    try:
        if "://" in text or _is_glob(text):
            fs, root = url_to_fs(text, **dict(storage_options))
        else:  # a plain local path: no fsspec per item of a long list
            fs = _LOCAL
            root = os.path.abspath(
                os.path.expanduser(text) if text.startswith("~") else text
            )
        files = [f for f in _find_files(fs, root, stats) if not _leftover(f)]
    except (FileNotFoundError, NotADirectoryError):
        files = []
    except OSError as e:
        shown = redact(text, storage_options)  # a URL may hold a SAS
        raise InputError(
            f"input path {shown!r} cannot be listed: "
            f"{describe_error(e, storage_options)}; check the path and "
            "its storage_options"
        ) from None
    if not files:
        shown = redact(text, storage_options)
        raise InputError(
            f"input path {shown!r} matches no files; check that it exists "
            "(and that a URL's credentials allow reading it) and is not an "
            "empty folder"
        )
    if not _is_local(fs):
        files = [fs.unstrip_protocol(p) for p in files]
    return files


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
    return "*" in text or "?" in text or "[" in text


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


def _find_files(
    fs: fsspec.AbstractFileSystem, root: str, stats: Stats | None = None
) -> list[str]:
    if _is_local(fs):
        return _glob_local(root) if _is_glob(root) else _walk_local(root, stats)
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


def _walk_local(top: str, stats: Stats | None = None) -> list[str]:
    """The files of a local file or folder (recursively), daskrun's
    bookkeeping folders and linked folders left out (as os.walk); a file
    given, stat'ed here, has its size and mtime put into ``stats``."""
    try:
        st = os.stat(top)
    except FileNotFoundError:
        if os.path.islink(top):
            raise _not_a_file(top) from None
        raise
    mode = st.st_mode
    if stat.S_ISREG(mode):
        if stats is not None:
            stats[top] = (st.st_size, st.st_mtime_ns)
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
                    # nor here: planning stats each file once, while the
                    # cluster starts
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
    if len(segments) == 1 and segments[0] is not None:  # "data/*.png"
        return _glob_folder(base, segments[0])
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


def _glob_folder(folder: str, segment: _Segment) -> list[str]:
    """:func:`_glob_local` of a pattern with one wildcard part below
    ``folder``: its one listing, each name matched once."""
    files: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not segment(entry.name):
                continue
            if entry.is_dir():
                if entry.name != BOOKKEEPING:
                    files.extend(_walk_local(entry.path))
            elif entry.is_file():
                files.append(entry.path)
            else:
                raise _not_a_file(entry.path)
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
