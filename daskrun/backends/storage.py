"""What every stage needs of storage: bounded calls, one error map, hidden
secrets, locks.

- :func:`within` — a call to remote storage, given up after a bound: cloud
  SDKs retry an unreachable endpoint for minutes (82 s per call for Azure
  Blob Storage).
- :func:`map_errors` — the one error map: the storage, network and I/O
  failures of :func:`storage_failures` (and timeouts) raised in a block
  become daskrun's own errors; anything else (a ``TypeError``, an
  ``AttributeError``: a bug) passes unchanged. :func:`storage_errors` maps
  a datastore's to :class:`~daskrun.StorageError`, naming it and without
  its credentials.
- :func:`secret_values`, :func:`redact`, :func:`hide` — credentials in
  ``storage_options`` (keys, SAS tokens, connection strings) never reach a
  message, a log or a run record, in any URL encoding; nor does any SAS
  signature (``sig=``) or connection-string key, whoever's it is.
- :class:`FileLock` — one process at a time on a run or an output folder.
- :func:`bookkeeping` — daskrun's own files below a listed folder.
- :func:`private_folder`, :func:`private_open`, :func:`private_file`,
  :func:`private_tree` — run folders and their files belong to their owner
  alone (0700, 0600), as worker folders do.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

from daskrun.exceptions import DaskRunError, StorageError, StorageTimeoutError

_T = TypeVar("_T")
_ESC = "surrogateescape"

# the folder daskrun keeps its own files in, inside an output folder
BOOKKEEPING = ".daskrun"

# the parts of a connection string that are secret
_SECRET_KEYS = {"AccountKey", "SharedAccessSignature", "SharedAccessKey"}
# storage options that name, not authenticate: adlfs's account, s3fs's
# region (in client_kwargs), the fields of a GCS service account's JSON that
# name it. Every other string is hidden: s3fs's access key id and endpoint,
# gcsfs's project too, as a connection string is hidden whole
_PUBLIC_OPTIONS = {
    "account_name",
    "account_host",
    "region_name",
    "type",
    "project_id",
    "client_email",
    "client_id",
    "auth_uri",
    "token_uri",
    "auth_provider_x509_cert_url",
    "client_x509_cert_url",
    "universe_domain",
}
# gcsfs tokens that name a way to authenticate, not a credential
_PUBLIC_VALUES = {"anon", "google_default", "cloud", "browser"}
# values that are secret wherever they appear, known or not: a SAS token's
# signature, a connection string's key (base64, maybe URL-encoded)
# (after a letter or digit it is another name, unless that ends an escape
# of "&", "?" or ";": "%26sig%3D...")
_SECRET_PARAMETERS = re.compile(
    r"(?i)(?:(?<![a-z0-9])|(?<=%26)|(?<=%3f)|(?<=%3b))"
    r"(sig|AccountKey|SharedAccessKey)(=|%3D)[A-Za-z0-9+/=%_-]+"
)
# what unsigned() leaves of one
_HIDDEN_PARAMETER = re.compile(r"(?i)(sig|AccountKey|SharedAccessKey)(=|%3D)\*\*\*")


def within(
    seconds: float,
    fn: Callable[[], _T],
    timed_out: Callable[[], Exception] | None = None,
) -> _T:
    """``fn()``, or ``raise timed_out()`` once ``seconds`` pass; the call's
    thread is then left to finish on its own. Without ``timed_out``, a
    :class:`~daskrun.StorageTimeoutError` saying so is raised.

    >>> within(1, lambda: 42)
    42
    """
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # handed to the caller
            outcome["error"] = e

    thread = threading.Thread(target=call, name="daskrun-storage", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if timed_out is None:
            raise StorageTimeoutError(f"did not answer within {seconds:g} s")
        raise timed_out()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def secret_values(storage_options: Mapping[str, Any]) -> list[str]:
    """The strings in ``storage_options`` that must never be shown.

    Every string is one, but for the names of :data:`_PUBLIC_OPTIONS`,
    also inside a nested dict (s3fs's ``client_kwargs``, a GCS service
    account's JSON as gcsfs's ``token``).

    >>> secret_values({"connection_string": "AccountName=a;AccountKey=k3y/=="})
    ['AccountName=a;AccountKey=k3y/==', 'k3y/==']
    >>> secret_values({"secret": "s3cr3t", "client_kwargs": {"region_name": "r"}})
    ['s3cr3t']
    """
    found = []
    for key, value in storage_options.items():
        if isinstance(value, Mapping):
            found += secret_values(value)
        if not isinstance(value, str) or key in _PUBLIC_OPTIONS:
            continue
        if value in _PUBLIC_VALUES:
            continue
        found.append(value)
        for part in value.split(";"):
            name, _, secret = part.partition("=")
            if name in _SECRET_KEYS and secret:
                found.append(secret)
    return found


def hide(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each of ``secrets`` replaced by ``***``, longest first,
    so that a secret inside another is not left half shown; and the value of
    every ``sig=``, ``AccountKey=`` and ``SharedAccessKey=``.

    A secret is found however it is URL-encoded: as given, decoded, encoded,
    or partly either (a server or an SDK that echoes a SAS URL may decode
    ``se=``'s colons and keep ``sig=``'s escapes).

    >>> hide("sig=abc&x=abcdef", ["abc", "abcdef"])
    'sig=***&x=***'
    >>> hide("url?se=2030-01-01T00:00Z&k=v%2F1", ["se=2030-01-01T00%3A00Z&k=v/1"])
    'url?***'
    >>> hide("someone else's key: AccountKey=a2V5Cg==;", [])
    "someone else's key: AccountKey=***;"
    """
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        for pattern in _any_encoding(secret):
            text = pattern.sub("***", text)
    return unsigned(text)


def unsigned(text: str) -> str:
    """``text`` with the value of every ``sig=``, ``AccountKey=`` and
    ``SharedAccessKey=`` hidden: what any record may keep of a URL, whoever's
    credential it holds.

    >>> unsigned("https://h/a.csv?sv=2022-11-02&sig=q%2Bz%3D")
    'https://h/a.csv?sv=2022-11-02&sig=***'
    """
    if "=" not in text and "%3" not in text:  # most paths: no regex
        return text
    return _SECRET_PARAMETERS.sub(r"\1\2***", text)


def signature_hidden(text: str) -> bool:
    """Whether ``text`` holds a credential that :func:`unsigned` hid.

    >>> signature_hidden(unsigned("https://h/a.csv?sig=abc"))
    True
    """
    return _HIDDEN_PARAMETER.search(text) is not None


@functools.lru_cache(maxsize=256)
def _any_encoding(secret: str) -> tuple[re.Pattern[str], ...]:
    """Patterns of ``secret`` in any URL encoding: each character of it, and
    of it decoded, as is or percent-escaped (in either case), a space also
    as ``+``. Escaping an escaped secret once more (``%3D`` as ``%253D``)
    is an encoding of it as given."""
    patterns = []
    for plain in dict.fromkeys([urllib.parse.unquote(secret), secret]):
        parts = []
        for char in plain:
            escaped = "".join(f"%{byte:02x}" for byte in char.encode("utf-8", _ESC))
            forms = [re.escape(char), f"(?i:{re.escape(escaped)})"]
            if char == " ":
                forms.append(r"\+")
            parts.append(f"(?:{'|'.join(forms)})")
        patterns.append(re.compile("".join(parts)))
    return tuple(patterns)


def hide_values(value: Any, secrets: Iterable[str]) -> Any:
    """``value`` with :func:`hide` applied to every string in it, also inside
    lists, tuples and dicts (keys too): what user code logs as metrics.

    >>> hide_values({"url": ["x?sig=abc"], "n": 1}, [])
    {'url': ['x?sig=***'], 'n': 1}
    """
    secrets = list(secrets)
    if isinstance(value, str):
        return hide(value, secrets)
    if isinstance(value, (list, tuple)):
        return type(value)(hide_values(v, secrets) for v in value)
    if isinstance(value, dict):
        return {
            hide_values(k, secrets): hide_values(v, secrets) for k, v in value.items()
        }
    return value


def redact(text: str, storage_options: Mapping[str, Any]) -> str:
    """``text`` with every secret of ``storage_options`` replaced by ``***``.

    >>> redact("bad key k3y/==", {"account_key": "k3y/=="})
    'bad key ***'
    """
    return hide(text, secret_values(storage_options))


def describe_error(error: BaseException, storage_options: Mapping[str, Any]) -> str:
    """``Type: first line`` of ``error``, without the storage's secrets.

    >>> describe_error(OSError("key k3y== refused"), {"account_key": "k3y=="})
    'OSError: key *** refused'
    """
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return redact(text, storage_options)


def storage_failures(*also: type[BaseException]) -> tuple[type[BaseException], ...]:
    """The exception types that mean storage, the network or a file failed,
    not daskrun: what :func:`map_errors` maps (with ``also``, for an
    ``except`` clause that takes more).

    fsspec and adlfs raise ``OSError`` (``FileNotFoundError``,
    ``PermissionError``, ``ConnectionError``; fsspec's timeout is one too),
    a malformed URL, key or file ``ValueError`` (pyarrow's ``ArrowInvalid``
    is one), a missing fsspec implementation ``ImportError``; the Azure SDK,
    aiohttp, botocore (s3fs), google-auth, google-api-core and gcsfs their
    own bases, listed once they are imported (before, they cannot have
    raised). ``TypeError``, ``AttributeError``, ``KeyError`` and
    the like are bugs: never in it.

    >>> OSError in storage_failures(), TypeError in storage_failures()
    (True, False)
    """
    found: list[type[BaseException]] = [OSError, ValueError, ImportError, EOFError]
    found += also
    for module, name in _LIBRARY_FAILURES:
        base = getattr(sys.modules.get(module), name, None)
        if isinstance(base, type) and issubclass(base, BaseException):
            found.append(base)
    return tuple(found)


# (module, class) of the storage libraries' own failure bases
_LIBRARY_FAILURES = (
    ("azure.core.exceptions", "AzureError"),
    ("aiohttp", "ClientError"),
    ("botocore.exceptions", "BotoCoreError"),
    ("botocore.exceptions", "ClientError"),
    ("google.auth.exceptions", "GoogleAuthError"),
    ("google.api_core.exceptions", "GoogleAPIError"),
    ("gcsfs.retry", "HttpError"),
)


@contextlib.contextmanager
def map_errors(
    failed: Callable[[BaseException], BaseException],
    timed_out: Callable[[BaseException], BaseException] | None = None,
    own: Callable[[DaskRunError], BaseException] | None = None,
) -> Iterator[None]:
    """Raise ``failed(e)`` for a storage failure ``e`` in the block (one of
    :func:`storage_failures`), ``timed_out(e)`` for a ``TimeoutError``
    (default ``failed(e)``), and ``own(e)`` for one of daskrun's own errors
    (default: unchanged), each without the original as its context (which
    may hold credentials). Anything else passes unchanged: a bug stays a
    bug, never relabelled as a storage or input error.

    The one place where the table of failures is read, as httpx's
    ``map_httpcore_exceptions``.

    >>> from daskrun.exceptions import InputError
    >>> with map_errors(lambda e: InputError(f"unreadable: {e}")):
    ...     raise FileNotFoundError("a.csv")
    Traceback (most recent call last):
    daskrun.exceptions.InputError: unreadable: a.csv
    >>> with map_errors(lambda e: InputError(f"unreadable: {e}")):
    ...     raise TypeError("a bug")
    Traceback (most recent call last):
    TypeError: a bug
    """
    try:
        yield
    except DaskRunError as e:
        mapped = e if own is None else own(e)
        if mapped is e:
            raise
        raise mapped from None
    except TimeoutError as e:
        raise (timed_out or failed)(e) from None
    # read as it is raised: a library imported in the block is in the table
    except storage_failures() as e:
        raise failed(e) from None


def storage_errors(
    datastore: str, storage_options: Mapping[str, Any], action: str
) -> contextlib.AbstractContextManager[None]:
    """Turn the storage, network and upload failures raised in the block into
    :class:`~daskrun.StorageError` (a timeout into
    :class:`~daskrun.StorageTimeoutError`), naming ``datastore`` and
    ``action``, without the secrets of ``storage_options``
    (:func:`map_errors`).

    daskrun's own errors pass unchanged (a ``ConfigError`` that shows a fix),
    except a timeout of :func:`within`, which gains the datastore's name.

    >>> with storage_errors("blobs", {"account_key": "k3y=="}, "upload"):
    ...     raise OSError("key k3y== refused")
    Traceback (most recent call last):
    daskrun.exceptions.StorageError: upload on datastore 'blobs' failed: OSError: key *** refused
    """  # noqa: E501 - a doctest's output is one line

    def failed(e: BaseException) -> StorageError:
        return StorageError(
            f"{action} on datastore {datastore!r} failed: "
            f"{describe_error(e, storage_options)}",
            datastore=datastore,
            action=action,
        )

    def timed_out(e: BaseException) -> StorageTimeoutError:
        return _timed_out(datastore, storage_options, action, e)

    def own(e: DaskRunError) -> BaseException:
        if isinstance(e, StorageTimeoutError) and not e.datastore:
            return timed_out(e)
        return e

    return map_errors(failed, timed_out, own)


def _timed_out(
    datastore: str,
    storage_options: Mapping[str, Any],
    action: str,
    error: BaseException,
) -> StorageTimeoutError:
    cause = redact(str(error).strip() or type(error).__name__, storage_options)
    return StorageTimeoutError(
        f"{action} on datastore {datastore!r}: {cause}; check its endpoint, network "
        "and credentials (the bound is daskrun.storage-timeout)",
        datastore=datastore,
        action=action,
    )


def private_folder(path: str | os.PathLike[str]) -> Path:
    """Make the folder ``path``, and those above it that are missing, readable
    by their owner alone (0700); folders that exist are left as they are.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as root:
    ...     oct(private_folder(Path(root, "runs", "r1")).stat().st_mode & 0o777)
    '0o700'
    """
    folder = Path(path)
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile, or a file: say so
            if not folder.is_dir():
                raise
    return Path(path)


def private_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Any:
    """``open(path, mode, **kwargs)``; a file it creates is its owner's
    alone (0600; others get nothing, whatever the umask). A file that
    exists keeps its mode."""
    return open(path, mode, opener=_owner_only, **kwargs)


def _owner_only(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def private_file(path: str | os.PathLike[str]) -> None:
    """Create ``path`` empty and owner-only (0600) if it is missing, for a
    tool that then writes it keeping its mode (SQLite, ``logging``, pandas).
    A file that exists is not opened: closing a descriptor of an SQLite
    database would drop the locks this process holds on it."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def private_tree(path: str | os.PathLike[str]) -> None:
    """Take away the group's and others' permissions from ``path`` and all
    below it: what a tool (``zipfile``) wrote with the umask's modes."""
    for folder, _, files in os.walk(path):
        for name in [folder, *(os.path.join(folder, f) for f in files)]:
            os.chmod(name, os.lstat(name).st_mode & 0o700)


class FileLock:
    """An exclusive ``flock`` on ``path``, whose file names the holder; the
    kernel releases it when the process dies, however it dies.

    ``refused(holder)`` is raised when another process holds it. With
    ``remove=True`` the file (and its folder, when left empty) goes on
    release, so that it leaves nothing behind in a user's folder.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        holder: str,
        refused: Callable[[str], Exception],
        remove: bool = False,
    ):
        self.path = os.fspath(path)
        self.remove = remove
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            f = private_open(self.path, "a+")  # closed in release()
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                held_by = f.read().strip()
                f.close()
                raise refused(held_by) from None
            # a holder that removes the file on release may have done so
            # between our open() and flock(): lock the file now at the path
            if not remove or _same_file(f, self.path):
                break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(holder + "\n")
        f.flush()
        self._file: IO[str] | None = f

    def release(self) -> None:
        if self._file is None:
            return
        if self.remove:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
                os.rmdir(os.path.dirname(self.path))
        else:
            self._file.truncate(0)  # no holder named any more
        self._file.close()  # closing drops the flock
        self._file = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(f: IO[str], path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def bookkeeping(path: str, below: str) -> bool:
    """Whether ``path``, listed from the folder ``below``, lies in a
    ``.daskrun`` folder under it: daskrun's own files (an output's parts,
    when the output is inside an input folder), never an input. A folder
    listed that itself lies under a ``.daskrun`` (a runs folder in
    ``~/.daskrun``) is read as any other.

    >>> bookkeeping("c/in/out/.daskrun/r1/parts/0", "c/in")
    True
    >>> bookkeeping("/home/u/.daskrun/runs/r1/failed.csv", "/home/u/.daskrun/runs")
    False
    """
    rest = path[len(below.rstrip("/")) :] if path.startswith(below) else path
    return f"/{BOOKKEEPING}/" in rest
