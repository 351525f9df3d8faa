"""Storage back ends of datastores: one class per kind of storage, behind one
small contract (as fsspec's ``AbstractFileSystem`` and its
``implementations/``).

A registered datastore's row names its ``kind``; :data:`BACKENDS` maps that
name to the class that answers for it, built when the row is loaded::

    StorageBackend            the contract: url, storage_options, find
    │                         (listing), upload, download, create, redact
    ├── LocalFolder           "local": a local (or mounted) folder
    └── AzureBlobContainer    "azure_blob": an Azure Blob Storage container,
                              read and written through adlfs

Every remote call is bounded by ``daskrun.storage-timeout`` where it can be
(reaching the storage, listing), and every failure leaves as a
:class:`~daskrun.StorageError` through :func:`daskrun.backends.storage.storage_errors`.
This module is on the registry side: the engine gets plain values from it
(a URL and ``storage_options``), never the classes.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from daskrun.backends.storage import bookkeeping, redact, storage_errors, within
from daskrun.engine.config import config_get
from daskrun.exceptions import ConfigError

# kind name -> back-end class; filled by StorageBackend.__init_subclass__
BACKENDS: dict[str, type[StorageBackend]] = {}

# an upload pair: a local file or folder, and its path on the datastore
Upload = tuple[Path, str]


def backend_for(
    kind: str,
    name: str,
    spec: Mapping[str, Any],
    base: Path,
    read_secret: Callable[[], dict[str, str]],
) -> StorageBackend:
    """The back end of a datastore row: ``BACKENDS[kind](...)``, or a
    ConfigError naming the kinds this daskrun knows."""
    try:
        cls = BACKENDS[kind]
    except KeyError:
        raise ConfigError(
            f"datastore {name!r} has kind {kind!r}, which this daskrun does not "
            f"know (known: {', '.join(sorted(BACKENDS))}); upgrade daskrun or "
            "re-register the datastore"
        ) from None
    return cls(name, spec, base, read_secret)


class StorageBackend(ABC):
    """What a datastore's storage answers. Subclasses set ``kind`` (the name
    stored in the registry) and are registered in :data:`BACKENDS` by being
    defined.

    Parameters
    ----------
    name : str
        The datastore's name, used in messages.
    spec : mapping
        The registry row's spec (JSON; never a credential).
    base : Path
        The workspace folder, for paths relative to it.
    read_secret : callable
        Returns the datastore's credentials; called only when they are used.
    """

    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            BACKENDS[cls.kind] = cls

    def __init__(
        self,
        name: str,
        spec: Mapping[str, Any],
        base: Path,
        read_secret: Callable[[], dict[str, str]],
    ):
        self.name = name
        self.spec = dict(spec)
        self.base = base
        self._read_secret = read_secret

    # --- what each back end answers ---------------------------------------

    @abstractmethod
    def url(self, path: str = "") -> str:
        """The fsspec URL (or local path) of ``path``, already checked to be
        inside the datastore and without a leading ``/``."""

    @property
    @abstractmethod
    def storage_options(self) -> dict[str, Any]:
        """fsspec options, credentials included (keep them out of logs)."""

    @abstractmethod
    def where(self) -> str:
        """What ``repr(datastore)`` shows of the storage (no credentials)."""

    @abstractmethod
    def _copy(self, fs: AbstractFileSystem, pairs: Sequence[tuple[Path, str]]) -> None:
        """Copy local files or folders to the stripped fsspec paths."""

    def create(self) -> None:
        """Make the storage's root exist (a folder, a container)."""
        fs, root = self.fs()
        with self.errors("creating its root"):
            if not self._bounded(lambda: fs.exists(root)):
                fs.mkdir(root)

    # --- the same for every back end ----------------------------------------

    @property
    def root(self) -> str | None:
        """The local folder, for a back end that is one."""
        return None

    def fs(self, path: str = "") -> tuple[AbstractFileSystem, str]:
        """The file system and stripped path of ``path``."""
        with self.errors("connecting"):
            return url_to_fs(self.url(path), **self.storage_options)

    def errors(self, action: str) -> AbstractContextManager[None]:
        """:func:`~daskrun.backends.storage.storage_errors` for this datastore."""
        return storage_errors(self.name, self.storage_options, action)

    def redact(self, text: str) -> str:
        """``text`` without this datastore's credentials."""
        return redact(text, self.storage_options)

    def _bounded(self, fn: Callable[[], Any]) -> Any:
        return within(float(config_get("storage-timeout")), fn)

    def find(self, path: str = "") -> list[str]:
        """The files under ``path``, as paths on the datastore, sorted; what
        daskrun keeps for itself (``.daskrun/`` folders) is left out."""
        fs, root = self.fs(path)
        prefix = fs._strip_protocol(self.url(""))
        with self.errors(f"listing {path or '/'!r}"):
            found = self._bounded(lambda: fs.find(root))
        return sorted(
            os.path.relpath(f, prefix).replace(os.sep, "/")
            for f in found
            if not bookkeeping(f, root)
        )

    def upload(self, pairs: Sequence[Upload], overwrite: bool = False) -> None:
        """Copy local files or folders to paths on the datastore; a ConfigError
        if one exists and not ``overwrite``."""
        fs, _ = self.fs()
        targets = [fs._strip_protocol(self.url(t.lstrip("/"))) for _, t in pairs]

        def existing() -> list[str]:
            if overwrite:  # reach the store all the same
                fs.exists(fs._strip_protocol(self.url("")))
                return []
            return [t for t in targets if fs.exists(t)]

        with self.errors("upload"):
            # an unreachable store fails here, within the bound; the copy
            # itself is not bounded: a large upload takes as long as it takes
            found = self._bounded(existing)
            if found:
                raise ConfigError(
                    f"{found[0]!r} already exists on datastore {self.name!r}; "
                    "pass overwrite=True to replace it"
                )
            if pairs:
                self._copy(
                    fs, [(src, t) for (src, _), t in zip(pairs, targets, strict=True)]
                )

    def download(self, path: str, target: Path, overwrite: bool = False) -> list[Path]:
        """Copy the files under ``path`` to ``target``; returns the local
        files. A ConfigError if one exists and not ``overwrite``."""
        fs, root = self.fs(path)
        written = []
        with self.errors(f"download of {path or '/'!r}"):
            found = self._bounded(lambda: fs.find(root))
            for f in (f for f in found if not bookkeeping(f, root)):
                dest = target / os.path.relpath(f, root)
                if dest.exists() and not overwrite:
                    raise ConfigError(
                        f"{str(dest)!r} exists; pass overwrite=True to replace it"
                    )
                dest.parent.mkdir(parents=True, exist_ok=True)
                fs.get(f, str(dest))
                written.append(dest)
        return written


class LocalFolder(StorageBackend):
    """A local (or mounted) folder. ``spec["root"]``: the folder, absolute or
    relative to the workspace."""

    kind = "local"

    @property
    def root(self) -> str:
        return str(self.base / self.spec["root"])

    def url(self, path: str = "") -> str:
        return os.path.join(self.root, path)

    @property
    def storage_options(self) -> dict[str, Any]:
        return {}

    def where(self) -> str:
        return f"root={self.root!r}"

    def _copy(self, fs: AbstractFileSystem, pairs: Sequence[tuple[Path, str]]) -> None:
        for src, target in pairs:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, target)
            else:
                shutil.copyfile(src, target)


class AzureBlobContainer(StorageBackend):
    """An Azure Blob Storage container, through adlfs (``abfs://``).

    ``spec``: ``container_name``, ``account_name``, ``endpoint`` and, for a
    non-public endpoint (Azurite), ``account_host``. The credential (a
    connection string) is in the workspace's ``secrets/``.

    Another object store is one class like this one: S3 or GCS would set
    ``kind = "s3"`` / ``"gcs"``, build ``url()`` as ``s3://bucket/path`` /
    ``gs://bucket/path``, turn the secret into s3fs's ``key``/``secret``/
    ``endpoint_url`` or gcsfs's ``token``, and add a
    ``Datastore.register_s3_bucket`` that writes the spec and secret.
    Listing, upload, download, bounds and the error map are inherited.
    """

    kind = "azure_blob"

    def url(self, path: str = "") -> str:
        return f"abfs://{self.spec.get('container_name')}/{path}"

    @property
    def storage_options(self) -> dict[str, Any]:
        secret = self._read_secret()
        if "connection_string" in secret:
            return {"connection_string": secret["connection_string"]}
        options: dict[str, Any] = {"account_name": self.spec.get("account_name")}
        if self.spec.get("account_host"):
            options["account_host"] = self.spec["account_host"]
        if not secret:
            options["anon"] = True
        return options

    def where(self) -> str:
        return f"container_name={self.spec.get('container_name')!r}"

    def _copy(self, fs: AbstractFileSystem, pairs: Sequence[tuple[Path, str]]) -> None:
        files = [(str(s), t) for s, t in pairs if not s.is_dir()]
        if files:
            fs.put([s for s, _ in files], [t for _, t in files])
        for src, target in pairs:
            if src.is_dir():
                fs.put(str(src), target, recursive=True)
