"""Registered models: versioned copies in the workspace's default datastore.

``Model.register`` copies a file or folder to
``models/<name>/<version>/<base name>`` on the default datastore. Inside
``init()``, ``Model.get_model_path(name)`` returns a local path to it on any
worker: the step ships the registry's entries (not the files) to its
workers, and a worker that cannot see the datastore's files on its disk
fetches them once into a local cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from daskrun.aml.modelrefs import ModelRef, fetch, local_model_path, worker_models
from daskrun.engine.naming import check_name
from daskrun.exceptions import ConfigError
from daskrun.registry.base import Datastore, Registry
from daskrun.registry.records import now


def model_refs(workspace: Registry) -> list[ModelRef]:
    """Every registered model version of ``workspace``."""
    with workspace.db() as db:
        rows = db.execute(
            "SELECT name, version, datastore, path FROM models"
        ).fetchall()
    stores: dict[str, Datastore] = {}
    refs = []
    for row in rows:
        store = stores.setdefault(
            row["datastore"], Datastore(workspace, row["datastore"])
        )
        refs.append(
            ModelRef(
                row["name"],
                row["version"],
                store.url(row["path"]),
                store.storage_options,
                store.name,
            )
        )
    return refs


class Model:
    """A registered model version.

    ``Model(ws, name)`` opens the latest version; ``version=`` a given one.

    Attributes
    ----------
    name, version, tags, description, created_time
    path_on_datastore : str
        Where the copy lives on ``datastore``.
    """

    def __init__(self, workspace: Registry, name: str, version: int | None = None):
        with workspace.db() as db:
            if version is None:
                row = db.execute(
                    "SELECT * FROM models WHERE name = ? ORDER BY version DESC",
                    (name,),
                ).fetchone()
            else:
                row = db.execute(
                    "SELECT * FROM models WHERE name = ? AND version = ?",
                    (name, version),
                ).fetchone()
            known = sorted({r[0] for r in db.execute("SELECT name FROM models")})
        if row is None:
            which = f"model {name!r}" + (f" version {version}" if version else "")
            raise ConfigError(
                f"{which} is not registered in {workspace!r} (registered: "
                f"{', '.join(known) or 'none'}); register it with "
                "Model.register(ws, model_path, model_name)"
            )
        self.workspace = workspace
        self.name: str = row["name"]
        self.version: int = row["version"]
        self.tags: dict[str, str] = json.loads(row["tags"] or "{}")
        self.description: str | None = row["description"]
        self.created_time: str = row["created"]
        self.datastore = Datastore(workspace, row["datastore"])
        self.path_on_datastore: str = row["path"]

    def __repr__(self) -> str:
        return f"Model(name={self.name!r}, version={self.version})"

    @property
    def url(self) -> str:
        return self.datastore.url(self.path_on_datastore)

    @staticmethod
    def register(
        workspace: Registry,
        model_path: str | os.PathLike[str],
        model_name: str,
        tags: dict[str, str] | None = None,
        description: str | None = None,
    ) -> Model:
        """Copy a model file or folder into the workspace as a new version."""
        check_name("model", model_name)
        source = Path(model_path)
        if not source.exists():
            raise ConfigError(
                f"model_path={os.fspath(model_path)!r} does not exist; pass the "
                "model's file or folder"
            )
        store = workspace.get_default_datastore()
        base = source.resolve().name
        with workspace.db() as db:  # holds the write lock: versions stay unique
            (latest,) = db.execute(
                "SELECT COALESCE(MAX(version), 0) FROM models WHERE name = ?",
                (model_name,),
            ).fetchone()
            version = latest + 1
            path = f"models/{model_name}/{version}/{base}"
            _copy_to(source, store, path)
            db.execute(
                "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    model_name,
                    version,
                    store.name,
                    path,
                    json.dumps(tags or {}),
                    description,
                    now(),
                ),
            )
        return Model(workspace, model_name, version)

    def download(
        self, target_dir: str | os.PathLike[str] = ".", exist_ok: bool = False
    ) -> str:
        """Copy the model to ``target_dir``; returns the local path."""
        target = Path(target_dir) / Path(self.path_on_datastore).name
        if target.exists() and not exist_ok:
            raise ConfigError(f"{str(target)!r} exists; pass exist_ok=True")
        fetch(
            ModelRef(
                self.name,
                self.version,
                self.url,
                self.datastore.storage_options,
                self.datastore.name,
            ),
            target,
        )
        return str(target)

    @staticmethod
    def get_model_path(
        model_name: str, version: int | None = None, _workspace: Registry | None = None
    ) -> str:
        """A local path to a registered model, for ``init()``.

        On a daskrun worker the step's workspace is used; elsewhere the
        workspace found by :meth:`Workspace.from_config`.
        """
        refs = worker_models()
        if refs is None:
            workspace = _workspace or Registry.from_config()
            refs = model_refs(workspace)
        return local_model_path(refs, model_name, version)


def _copy_to(source: Path, store: Datastore, path: str) -> None:
    store.backend.upload([(source, path)], overwrite=True)
