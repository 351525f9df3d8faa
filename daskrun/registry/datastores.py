"""Storage back ends of datastores: one class per kind of storage, behind one
small contract (as fsspec's ``AbstractFileSystem`` and its
``implementations/``).

A registered datastore's row names its ``kind``; :data:`BACKENDS` maps that
name to the class that answers for it, built when the row is loaded::

    StorageBackend            the contract: url, storage_options, find
    │                         (listing), upload, download, create, redact
    ├── LocalFolder           "local": a local (or mounted) folder
    ├── AzureBlobContainer    "azure_blob": an Azure Blob Storage container,
    │                         read and written through adlfs
    ├── S3Bucket              "s3": an S3 (or S3-compatible) bucket, s3fs
    └── GCSBucket             "gcs": a Google Cloud Storage bucket, gcsfs

Every remote call is bounded by ``daskrun.storage-timeout`` where it can be
(reaching the storage, listing), and every failure leaves as a
:class:`~daskrun.StorageError` through :func:`daskrun.backends.storage.storage_errors`.
This module is on the registry side: the engine gets plain values from it
(a URL and ``storage_options``), never the classes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

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
    read_secret: Callable[[], dict[str, Any]],
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
        read_secret: Callable[[], dict[str, Any]],
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

    Another object store is one class like this one (:class:`S3Bucket`,
    :class:`GCSBucket`): listing, upload, download, bounds and the error map
    are inherited.
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
        _put(fs, pairs)


class S3Bucket(StorageBackend):
    """An S3 (or S3-compatible: MinIO, Ceph, moto) bucket, through s3fs
    (``s3://``).

    ``spec``: ``bucket_name`` and, off AWS, ``endpoint_url``; ``region``.
    The secret, in the workspace's ``secrets/``: s3fs's ``key`` (the access
    key id), ``secret`` and, for temporary credentials, ``token``. Without
    one, boto's own chain answers (its environment variables,
    ``~/.aws``, an instance's role).

    >>> S3Bucket("scores", {"bucket_name": "scores"}, Path("."), dict).url("a.csv")
    's3://scores/a.csv'
    """

    kind = "s3"

    def url(self, path: str = "") -> str:
        return f"s3://{self.spec['bucket_name']}/{path}"

    @property
    def storage_options(self) -> dict[str, Any]:
        secret = self._read_secret()
        options: dict[str, Any] = dict(secret)
        if self.spec.get("endpoint_url"):
            options["endpoint_url"] = self.spec["endpoint_url"]
        if self.spec.get("region"):
            options["client_kwargs"] = {"region_name": self.spec["region"]}
        return options

    def where(self) -> str:
        return f"bucket_name={self.spec['bucket_name']!r}"

    def create(self) -> None:
        if self.spec.get("region", "us-east-1") != "us-east-1":
            return super().create()  # s3fs names the region as its location
        # us-east-1 takes no location constraint, and s3fs would send one
        fs, root = self.fs()
        with self.errors("creating its root"):
            if not self._bounded(lambda: fs.exists(root)):
                fs.call_s3("create_bucket", Bucket=self.spec["bucket_name"])
                fs.invalidate_cache()

    def _copy(self, fs: AbstractFileSystem, pairs: Sequence[tuple[Path, str]]) -> None:
        _put(fs, pairs)


class GCSBucket(StorageBackend):
    """A Google Cloud Storage bucket, through gcsfs (``gs://``).

    ``spec``: ``bucket_name``, ``project`` and, for an emulator,
    ``endpoint_url``; ``token`` when it names no credential (``"anon"``,
    ``"google_default"``, ``"cloud"``). The secret: gcsfs's ``token`` (a
    service account's JSON, or an OAuth access token).

    >>> GCSBucket("scores", {"bucket_name": "scores"}, Path("."), dict).url("a.csv")
    'gs://scores/a.csv'
    """

    kind = "gcs"

    def url(self, path: str = "") -> str:
        return f"gs://{self.spec['bucket_name']}/{path}"

    @property
    def storage_options(self) -> dict[str, Any]:
        secret = self._read_secret()
        default = self.spec.get("token", "google_default")
        options: dict[str, Any] = {"token": secret.get("token", default)}
        for name in ("project", "endpoint_url"):
            if self.spec.get(name):
                options[name] = self.spec[name]
        return options

    def where(self) -> str:
        return f"bucket_name={self.spec['bucket_name']!r}"

    def create(self) -> None:
        fs, root = self.fs()
        with self.errors("creating its root"):
            if not self._bounded(lambda: fs.exists(root)):
                fs.mkdir(self.spec["bucket_name"])  # "bucket/" is a folder in it

    def _copy(self, fs: AbstractFileSystem, pairs: Sequence[tuple[Path, str]]) -> None:
        _put(fs, pairs)


def bucket_registration(
    name: str, endpoint_url: str | None, region: str | None = None
) -> dict[str, Any]:
    """The spec of an S3 or GCS bucket, its arguments checked; a ConfigError
    that names a bad one and shows a good one.

    >>> bucket_registration("scores", "http://127.0.0.1:9000")
    {'bucket_name': 'scores', 'endpoint_url': 'http://127.0.0.1:9000'}
    """
    if not isinstance(name, str) or not _BUCKET.match(name):
        raise ConfigError(
            f"bucket_name={name!r} is not a valid bucket name; use 3-63 lowercase "
            "letters, digits, dots, hyphens or underscores, e.g. 'scores'"
        )
    spec: dict[str, Any] = {"bucket_name": name}
    if endpoint_url is not None:
        if urlparse(endpoint_url).scheme not in ("http", "https"):
            raise ConfigError(
                f"endpoint_url={endpoint_url!r} is not a URL; use e.g. "
                "'http://127.0.0.1:9000'"
            )
        spec["endpoint_url"] = endpoint_url.rstrip("/")
    if region:
        spec["region"] = region
    return spec


def s3_secret(
    access_key_id: str | None,
    secret_access_key: str | None,
    session_token: str | None,
) -> dict[str, str]:
    """What an S3 datastore keeps as its secret: s3fs's ``key``, ``secret``
    and ``token``; none for boto's own chain.

    >>> s3_secret("AKIA1", "s3cr3t", None)
    {'key': 'AKIA1', 'secret': 's3cr3t'}
    """
    if bool(access_key_id) != bool(secret_access_key):
        raise ConfigError(
            "give access_key_id and secret_access_key together (or neither, for "
            "the environment's credentials)"
        )
    given = (("key", access_key_id), ("secret", secret_access_key))
    return {k: v for k, v in (*given, ("token", session_token)) if v}


def azure_blob_secret(
    account_name: str,
    blob_endpoint: str,
    account_key: str | None,
    sas_token: str | None,
    connection_string: str | None,
) -> dict[str, str]:
    """The connection string an Azure Blob datastore keeps as its secret
    (none for a public container)."""
    secret: dict[str, str] = {}
    if connection_string:
        named = dict(
            part.split("=", 1) for part in connection_string.split(";") if "=" in part
        )
        if named.get("AccountName", account_name) != account_name:
            raise ConfigError(
                f"account_name={account_name!r} differs from the connection "
                "string's AccountName; pass the same account"
            )
        secret["connection_string"] = connection_string
    elif account_key:
        secret["connection_string"] = (
            f"DefaultEndpointsProtocol={urlparse(blob_endpoint).scheme};"
            f"AccountName={account_name};AccountKey={account_key};"
            f"BlobEndpoint={blob_endpoint};"
        )
    elif sas_token:
        secret["connection_string"] = (
            f"BlobEndpoint={blob_endpoint};"
            f"SharedAccessSignature={sas_token.lstrip('?')}"
        )
    return secret


def gcs_token_secret(token: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """What a GCS datastore keeps of ``token`` as its secret: a service
    account's JSON (given, or read from the file named), an access token,
    or nothing for a token that names no credential (``"anon"``).

    >>> gcs_token_secret("anon"), gcs_token_secret("ya29.x")
    ({}, {'token': 'ya29.x'})
    """
    if token is None or token in _GCS_NAMED_TOKENS:
        return {}
    if isinstance(token, Mapping):
        return {"token": dict(token)}
    if not isinstance(token, str):
        raise ConfigError(
            f"token of type {type(token).__name__} is not a GCS credential; pass "
            "a service account's JSON file or dict, an access token, or 'anon'"
        )
    if os.path.isfile(token):
        try:
            return {"token": json.loads(Path(token).read_text())}
        except ValueError:
            raise ConfigError(
                f"token file {token!r} is not JSON; pass a service account's key "
                "file (JSON)"
            ) from None
    return {"token": token}


# GCS tokens that name a way to authenticate, not a credential
_GCS_NAMED_TOKENS = ("anon", "google_default", "cloud", "browser")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")


def _put(fs: AbstractFileSystem, pairs: Sequence[tuple[Path, str]]) -> None:
    """Copy local files (in one call: the SDK sends them concurrently) and
    folders to an object store's stripped paths."""
    files = [(str(s), t) for s, t in pairs if not s.is_dir()]
    if files:
        fs.put([s for s, _ in files], [t for _, t in files])
    for src, target in pairs:
        if src.is_dir():
            fs.put(str(src), target, recursive=True)
