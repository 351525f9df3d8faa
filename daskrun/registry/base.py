"""The workspace folder's base: its SQLite tables, secrets and datastores.
:mod:`daskrun.registry.workspace` builds the tutorial's ``Workspace`` on it.

Layout of a workspace folder::

    workspace.db          SQLite registry (datastores, data sets, models,
                          compute targets); safe for several processes
    secrets/<name>.json   datastore credentials, mode 0600 (folder 0700)
    datastore/            the default datastore, "workspacestore"
    runs/runs.db, runs/<run id>/   run records, entry scripts, logs

Credentials are read from ``secrets/`` only when a datastore is used; they
never appear in reprs, run records, logs or error messages.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from daskrun.engine.config import config_get
from daskrun.engine.naming import check_name
from daskrun.exceptions import ConfigError
from daskrun.registry.datastores import (
    AzureBlobContainer,
    GCSBucket,
    LocalFolder,
    S3Bucket,
    StorageBackend,
    azure_blob_secret,
    backend_for,
    bucket_registration,
    gcs_token_secret,
    s3_secret,
)
from daskrun.registry.records import now, open_db

WORKSPACE_DB = "workspace.db"
CONFIG = Path(".daskrun") / "config.json"
DEFAULT_DATASTORE = "workspacestore"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS datastores (
    name TEXT PRIMARY KEY, kind TEXT NOT NULL, spec TEXT NOT NULL,
    created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT NOT NULL, version INTEGER NOT NULL, spec TEXT NOT NULL,
    description TEXT, tags TEXT, created TEXT NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL, version INTEGER NOT NULL, datastore TEXT NOT NULL,
    path TEXT NOT NULL, tags TEXT, description TEXT, created TEXT NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS compute_targets (
    name TEXT PRIMARY KEY, kind TEXT NOT NULL, spec TEXT NOT NULL,
    created TEXT NOT NULL);
"""
_R = TypeVar("_R", bound="Registry")
_CONTAINER = re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$")


class Registry:
    """A workspace folder: its SQLite tables, secrets and datastores.

    :class:`~daskrun.Workspace` adds the registered data sets, models and
    compute targets, which build on this (their modules import this one,
    never the other way round). Open a workspace as ``Workspace(path)``.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).expanduser().resolve()
        if not (self.path / WORKSPACE_DB).is_file():
            raise ConfigError(
                f"{os.fspath(path)!r} is not a daskrun workspace; create one with "
                f"daskrun.Workspace.create({os.fspath(path)!r})"
            )

    @classmethod
    def create(
        cls: type[_R], path: str | os.PathLike[str], exist_ok: bool = True
    ) -> _R:
        """Create a workspace folder (or open it, with ``exist_ok``)."""
        root = Path(path).expanduser().resolve()
        if (root / WORKSPACE_DB).is_file():
            if not exist_ok:
                raise ConfigError(
                    f"a workspace already exists in {str(root)!r}; open it with "
                    "Workspace(path) or pass exist_ok=True"
                )
            return cls(root)
        if root.exists() and not root.is_dir():
            raise ConfigError(
                f"{str(root)!r} is a file; pass a folder for the workspace"
            )
        root.mkdir(parents=True, exist_ok=True)
        (root / "secrets").mkdir(mode=0o700, exist_ok=True)
        with open_db(root / WORKSPACE_DB, _SCHEMA) as db:
            db.execute(
                "INSERT OR IGNORE INTO settings VALUES ('default_datastore', ?)",
                (DEFAULT_DATASTORE,),
            )
            db.execute(
                "INSERT OR IGNORE INTO datastores VALUES (?, 'local', ?, ?)",
                (DEFAULT_DATASTORE, json.dumps({"root": "datastore"}), now()),
            )
        (root / "datastore").mkdir(exist_ok=True)
        return cls(root)

    @classmethod
    def nearest(cls: type[_R], path: str | os.PathLike[str] | None = None) -> _R | None:
        """The nearest workspace from ``path`` (default: the current folder)
        upward: a folder holding ``workspace.db``, or one whose
        ``.daskrun/config.json`` names a workspace (see :meth:`write_config`);
        ``None`` where there is none."""
        start = Path(path or os.getcwd()).expanduser().resolve()
        for folder in (start, *start.parents):
            if (folder / WORKSPACE_DB).is_file():
                return cls(folder)
            config = folder / CONFIG
            if config.is_file():
                return cls(json.loads(config.read_text())["workspace"])
        return None

    @classmethod
    def from_config(
        cls: type[_R], path: str | os.PathLike[str] | None = None, **_: Any
    ) -> _R:
        """The :meth:`nearest` workspace from ``path`` (default: the current
        folder) upward.

        Without ``path`` and with no workspace found, as in a notebook
        written for Azure ML (whose ``config.json`` names a cloud
        workspace), the default local workspace ``daskrun.default-workspace``
        (``~/.daskrun/workspace``) is opened, created the first time, and
        one line says so. Azure ML's ``auth`` and other keywords are
        accepted and unused.
        """
        found = cls.nearest(path)
        if found is not None:
            return found
        start = Path(path or os.getcwd()).expanduser().resolve()
        if path is not None:
            raise ConfigError(
                f"no daskrun workspace in {str(start)!r} or its parents; create "
                "one with daskrun.Workspace.create('my-workspace') and call "
                "ws.write_config() in your project folder"
            )
        default = Path(str(config_get("default-workspace"))).expanduser().resolve()
        created = not (default / WORKSPACE_DB).is_file()
        workspace = cls.create(default)
        print(
            f"daskrun: no workspace config in {str(start)!r} or its parents; "
            f"{'created' if created else 'using'} the default local workspace "
            f"{str(default)!r} (ws.write_config() in a project folder picks "
            "another)"
        )
        return workspace

    def write_config(self, path: str | os.PathLike[str] = ".") -> Path:
        """Write ``<path>/.daskrun/config.json`` so that :meth:`from_config`
        finds this workspace from ``path`` and below."""
        target = Path(path) / CONFIG
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"workspace": str(self.path)}) + "\n")
        return target

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def runs_dir(self) -> Path:
        return self.path / "runs"

    @contextlib.contextmanager
    def db(self) -> Iterator[sqlite3.Connection]:
        with open_db(self.path / WORKSPACE_DB, _SCHEMA) as db:
            yield db

    def __repr__(self) -> str:
        return f"Workspace({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Registry) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # --- registries -------------------------------------------------------

    @property
    def datastores(self) -> dict[str, Datastore]:
        with self.db() as db:
            names = [r[0] for r in db.execute("SELECT name FROM datastores")]
        return {n: Datastore(self, n) for n in sorted(names)}

    def datastore(self, name: str) -> Datastore:
        """The registered datastore ``name``."""
        return Datastore(self, name)

    def get_default_datastore(self) -> Datastore:
        with self.db() as db:
            row = db.execute(
                "SELECT value FROM settings WHERE key = 'default_datastore'"
            ).fetchone()
        return Datastore(self, row[0])

    def set_default_datastore(self, name: str) -> None:
        Datastore(self, name)  # must exist
        with self.db() as db:
            db.execute(
                "INSERT OR REPLACE INTO settings VALUES ('default_datastore', ?)",
                (name,),
            )

    # --- secrets ----------------------------------------------------------

    def _write_secret(self, name: str, values: Mapping[str, Any]) -> None:
        folder = self.path / "secrets"
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
        tmp = folder / f".{name}.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dict(values), f)
        os.replace(tmp, folder / f"{name}.json")

    def _read_secret(self, name: str) -> dict[str, Any]:
        path = self.path / "secrets" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _remove_secret(self, name: str) -> None:
        (self.path / "secrets" / f"{name}.json").unlink(missing_ok=True)


@dataclass(frozen=True)
class DataPath:
    """A path on a datastore: ``datastore.path("mnist/")``."""

    datastore: Datastore
    path_on_datastore: str

    @property
    def url(self) -> str:
        return self.datastore.url(self.path_on_datastore)

    def __str__(self) -> str:
        return f"$AZUREML_DATAREFERENCE_{self.datastore.name}/{self.path_on_datastore}"

    def __repr__(self) -> str:
        return f"DataPath({self.datastore.name!r}, {self.path_on_datastore!r})"


@dataclass(frozen=True)
class OutputData:
    """A PipelineData a step run wrote: ``step_run.get_output_data(name)``."""

    name: str
    datastore: Datastore
    path_on_datastore: str

    @property
    def url(self) -> str:
        return self.datastore.url(self.path_on_datastore)

    def download(
        self,
        local_path: str | os.PathLike[str],
        overwrite: bool = False,
        show_progress: bool = False,
    ) -> str:
        """Copy the output's files to ``<local_path>/<path_on_datastore>/``
        (as the tutorial reads it); returns that folder."""
        # an absolute path on the datastore still lands under local_path
        target = Path(local_path) / self.path_on_datastore.lstrip("/")
        files = self.datastore.backend.download(
            self.datastore._inside(self.path_on_datastore), target, overwrite
        )
        if show_progress:
            print(f"downloaded {len(files)} files to {target}")
        return str(target)


class Datastore:
    """Storage registered in a workspace: a local folder, an Azure Blob
    Storage container (through adlfs), an S3 bucket (s3fs) or a Google Cloud
    Storage bucket (gcsfs).

    ``Datastore(ws, name)`` and :meth:`get` open a registered one; its
    :attr:`backend` (see :mod:`daskrun.registry.datastores`) answers for the storage.
    """

    def __init__(self, workspace: Registry, name: str):
        row = registry_row(
            workspace,
            "datastores",
            name,
            "register it with Datastore.register_azure_blob_container(...) or "
            "Datastore.register_local(...)",
        )
        self.workspace = workspace
        self.name = name
        self.kind: str = row["kind"]
        self._spec: dict[str, Any] = json.loads(row["spec"])
        self.backend: StorageBackend = backend_for(
            self.kind,
            name,
            self._spec,
            workspace.path,
            lambda: workspace._read_secret(name),
        )

    def __repr__(self) -> str:  # never shows credentials
        where = self.backend.where()
        return f"Datastore(name={self.name!r}, kind={self.kind!r}, {where})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Datastore)
            and other.workspace == self.workspace
            and other.name == self.name
        )

    def __hash__(self) -> int:
        return hash((self.workspace, self.name))

    @property
    def container_name(self) -> str | None:
        return self._spec.get("container_name")

    @property
    def account_name(self) -> str | None:
        return self._spec.get("account_name")

    @property
    def root(self) -> str | None:
        """The local folder of a local datastore."""
        return self.backend.root

    def url(self, path_on_datastore: str = "") -> str:
        """The fsspec URL (or local path) of a path on this datastore; a
        path that leaves the datastore's root (``../x``) is refused."""
        return self.backend.url(self._inside(path_on_datastore))

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec options for this datastore, credentials included (keep them
        out of logs)."""
        return self.backend.storage_options

    def path(self, path_on_datastore: str = "") -> DataPath:
        """A path on this datastore, for ``Dataset.File.from_files``."""
        self._inside(path_on_datastore)
        return DataPath(self, path_on_datastore)

    def _inside(self, path_on_datastore: str) -> str:
        """``path_on_datastore`` relative to the root, as given, or a
        ConfigError if it leads out of the root: every path joined onto a
        datastore passes here.

        >>> store._inside("/images/")  # doctest: +SKIP
        'images/'
        """
        if not isinstance(path_on_datastore, str):
            raise ConfigError(
                f"path_on_datastore={path_on_datastore!r} is not a string; use a "
                "path like 'images/'"
            )
        path = path_on_datastore.lstrip("/")
        normal = posixpath.normpath(path) if path else ""
        if normal == ".." or normal.startswith("../"):
            raise ConfigError(
                f"path {path_on_datastore!r} leaves datastore {self.name!r}; use a "
                "path inside it, without '..' going above its root, e.g. 'images/'"
            )
        return path

    def upload(
        self,
        src_dir: str | os.PathLike[str],
        target_path: str | None = None,
        overwrite: bool = False,
        show_progress: bool = True,
    ) -> DataPath:
        """Copy a local folder's files to ``target_path`` on this datastore
        (default: its root), as Azure ML's ``Datastore.upload``."""
        target = self._inside(target_path or "").strip("/")
        src = Path(src_dir).resolve()  # relative to the current folder, as AML
        if not src.is_dir():
            raise ConfigError(
                f"src_dir={os.fspath(src_dir)!r} is not a folder; pass a folder, "
                "or use upload_files(files) for single files"
            )
        files = [p for p in sorted(src.rglob("*")) if p.is_file()]
        return self._upload(files, src, target, overwrite, show_progress)

    def upload_files(
        self,
        files: list[str | os.PathLike[str]],
        relative_root: str | os.PathLike[str] | None = None,
        target_path: str | None = None,
        overwrite: bool = False,
        show_progress: bool = True,
    ) -> DataPath:
        """Copy local files to ``target_path`` on this datastore, as Azure
        ML's ``Datastore.upload_files``: each keeps its path below
        ``relative_root`` (default: only its base name is kept)."""
        target = self._inside(target_path or "").strip("/")
        paths = [Path(f) for f in files]
        root = None if relative_root is None else Path(relative_root).resolve()
        if root is not None:
            outside = [p for p in paths if not p.resolve().is_relative_to(root)]
            if outside:
                raise ConfigError(
                    f"relative_root={os.fspath(relative_root or '')!r} does not "
                    f"hold {os.fspath(outside[0])!r}; pass a folder that holds "
                    "every file, or relative_root=None"
                )
        return self._upload(paths, root, target, overwrite, show_progress)

    def _upload(
        self,
        files: list[Path],
        root: Path | None,
        target: str,
        overwrite: bool,
        show_progress: bool,
    ) -> DataPath:
        def rel(p: Path) -> str:
            return p.name if root is None else p.resolve().relative_to(root).as_posix()

        self._put([(p, posixpath.join(target, rel(p))) for p in files], overwrite)
        if show_progress:
            print(f"uploaded {len(files)} files to {self.name}:{target or '/'}")
        return self.path(target)

    def download(
        self,
        target_path: str | os.PathLike[str],
        prefix: str | None = None,
        overwrite: bool = False,
        show_progress: bool = True,
    ) -> int:
        """Copy the files under ``prefix`` (default: all) to ``target_path``,
        each at its path on the datastore, as Azure ML's
        ``Datastore.download``; returns how many were copied."""
        path = self._inside(prefix or "")
        target = Path(target_path) / path.strip("/")
        files = self.backend.download(path, target, overwrite)
        if show_progress:
            print(f"downloaded {len(files)} files from {self.name} to {target_path}")
        return len(files)

    def _put(self, pairs: list[tuple[Path, str]], overwrite: bool) -> None:
        self.backend.upload(pairs, overwrite)

    # --- registration ----------------------------------------------------

    @staticmethod
    def get(workspace: Registry, datastore_name: str) -> Datastore:
        return Datastore(workspace, datastore_name)

    @staticmethod
    def get_default(workspace: Registry) -> Datastore:
        return workspace.get_default_datastore()

    @staticmethod
    def register_local(
        workspace: Registry,
        datastore_name: str,
        path: str | os.PathLike[str],
        overwrite: bool = False,
    ) -> Datastore:
        """Register a local (or mounted) folder as a datastore."""
        root = Path(path).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return _register(
            workspace,
            datastore_name,
            LocalFolder.kind,
            {"root": str(root)},
            None,
            overwrite,
        )

    @staticmethod
    def register_azure_blob_container(
        workspace: Registry,
        datastore_name: str,
        container_name: str,
        account_name: str,
        sas_token: str | None = None,
        account_key: str | None = None,
        protocol: str | None = None,
        endpoint: str | None = None,
        overwrite: bool = False,
        create_if_not_exists: bool = False,
        connection_string: str | None = None,
    ) -> Datastore:
        """Register an Azure Blob Storage container.

        Give one of ``account_key``, ``sas_token`` or ``connection_string``
        (or none, for a public container). ``endpoint`` is the blob service
        URL for anything but the public cloud, e.g. Azurite's
        ``"http://127.0.0.1:10000/devstoreaccount1"``.
        """
        check_name("datastore", datastore_name)
        if not isinstance(container_name, str) or not _CONTAINER.match(container_name):
            raise ConfigError(
                f"container_name={container_name!r} is not a valid container name; "
                "use 3-63 lowercase letters, digits and single hyphens, e.g. "
                "'sampledata'"
            )
        given = [
            k
            for k, v in (
                ("account_key", account_key),
                ("sas_token", sas_token),
                ("connection_string", connection_string),
            )
            if v
        ]
        if len(given) > 1:
            raise ConfigError(
                f"give only one of {', '.join(given)}; a datastore uses one credential"
            )
        if endpoint is not None and urlparse(endpoint).scheme not in ("http", "https"):
            raise ConfigError(
                f"endpoint={endpoint!r} is not a URL; use e.g. "
                "'http://127.0.0.1:10000/devstoreaccount1'"
            )
        blob_endpoint = (
            endpoint.rstrip("/")
            if endpoint
            else f"{protocol or 'https'}://{account_name}.blob.core.windows.net"
        )
        secret = azure_blob_secret(
            account_name, blob_endpoint, account_key, sas_token, connection_string
        )
        spec = {
            "container_name": container_name,
            "account_name": account_name,
            "endpoint": blob_endpoint,
        }
        if endpoint:
            spec["account_host"] = urlparse(endpoint).netloc
        store = _register(
            workspace, datastore_name, AzureBlobContainer.kind, spec, secret, overwrite
        )
        if create_if_not_exists:
            store.backend.create()
        return store

    @staticmethod
    def register_s3_bucket(
        workspace: Registry,
        datastore_name: str,
        bucket_name: str,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        overwrite: bool = False,
        create_if_not_exists: bool = False,
    ) -> Datastore:
        """Register an S3 (or S3-compatible) bucket, read and written through
        s3fs. Give ``access_key_id`` and ``secret_access_key`` (and
        ``session_token`` for temporary ones), or neither, for boto's own
        chain (environment, ``~/.aws``, an instance's role). ``endpoint_url``
        is the S3 API's URL off AWS, e.g. ``"http://127.0.0.1:9000"``.
        """
        check_name("datastore", datastore_name)
        spec = bucket_registration(bucket_name, endpoint_url, region)
        secret = s3_secret(access_key_id, secret_access_key, session_token)
        store = _register(
            workspace, datastore_name, S3Bucket.kind, spec, secret, overwrite
        )
        if create_if_not_exists:
            store.backend.create()
        return store

    @staticmethod
    def register_gcs_bucket(
        workspace: Registry,
        datastore_name: str,
        bucket_name: str,
        project: str | None = None,
        token: str | Mapping[str, Any] | None = None,
        endpoint_url: str | None = None,
        overwrite: bool = False,
        create_if_not_exists: bool = False,
    ) -> Datastore:
        """Register a Google Cloud Storage bucket, read and written through
        gcsfs. ``token``: a service account's key (a JSON file's path, or its
        dict), an OAuth access token, ``"anon"`` for a public bucket, or
        none for the environment's credentials (``google_default``).
        ``endpoint_url`` is an emulator's URL, e.g. ``"http://127.0.0.1:4443"``.
        """
        check_name("datastore", datastore_name)
        spec = bucket_registration(bucket_name, endpoint_url)
        secret = gcs_token_secret(token)
        if isinstance(token, str) and not secret:
            spec["token"] = token
        if project:
            spec["project"] = project
        store = _register(
            workspace, datastore_name, GCSBucket.kind, spec, secret, overwrite
        )
        if create_if_not_exists:
            store.backend.create()
        return store


def registry_row(workspace: Registry, table: str, name: str, fix: str) -> Any:
    """The row of ``name`` in a registry table (``kind`` and ``spec``), or a
    ConfigError naming it, the registered names and ``fix``."""
    with workspace.db() as db:
        row = db.execute(
            f"SELECT kind, spec FROM {table} WHERE name = ?", (name,)
        ).fetchone()
        known = sorted(r[0] for r in db.execute(f"SELECT name FROM {table}"))
    if row is None:
        what = table.rstrip("s").replace("_", " ")
        raise ConfigError(
            f"{what} {name!r} is not registered in {workspace!r} (registered: "
            f"{', '.join(known) or 'none'}); {fix}"
        )
    return row


def _register(
    workspace: Registry,
    name: str,
    kind: str,
    spec: dict[str, Any],
    secret: dict[str, Any] | None,
    overwrite: bool,
) -> Datastore:
    check_name("datastore", name)
    with workspace.db() as db:
        exists = db.execute(
            "SELECT 1 FROM datastores WHERE name = ?", (name,)
        ).fetchone()
        if exists and not overwrite:
            raise ConfigError(
                f"datastore {name!r} is already registered; pass overwrite=True "
                "to replace it"
            )
        if secret:
            workspace._write_secret(name, secret)
        else:
            workspace._remove_secret(name)
        db.execute(
            "INSERT OR REPLACE INTO datastores VALUES (?, ?, ?, ?)",
            (name, kind, json.dumps(spec), now()),
        )
    return Datastore(workspace, name)
