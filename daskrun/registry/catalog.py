"""The workspace's catalog of registered data sets (registry side).

A registered data set is its :meth:`~daskrun.backends.inputs.datasets.FileDataset.spec`
(kind, datastore name, paths, pandas options, partition format; never
credentials) under a name and version in ``workspace.db``.
:class:`~daskrun.registry.workspace.Workspace` answers ``register_dataset`` and
``get_dataset`` with these functions, so that the data set classes (engine
side) never import the registry.
"""

from __future__ import annotations

import json
from typing import Any

from daskrun.backends.inputs.base import Input as InputKind
from daskrun.backends.inputs.datasets import FileDataset, TabularDataset
from daskrun.engine.naming import check_name
from daskrun.exceptions import ConfigError
from daskrun.registry.records import now


def register_dataset(
    workspace: Any,
    dataset: FileDataset | TabularDataset,
    name: str,
    description: str | None = None,
    tags: dict[str, str] | None = None,
    create_new_version: bool = False,
) -> FileDataset | TabularDataset:
    """Register ``dataset`` under ``name``; with ``create_new_version`` an
    existing name gets a new version."""
    check_name("data set", name)
    spec = json.dumps(dataset.spec())
    with workspace.db() as db:
        (latest,) = db.execute(
            "SELECT COALESCE(MAX(version), 0) FROM datasets WHERE name = ?",
            (name,),
        ).fetchone()
        if latest and not create_new_version:
            raise ConfigError(
                f"data set {name!r} is already registered (version {latest}); "
                "pass create_new_version=True to add a version"
            )
        db.execute(
            "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?)",
            (name, latest + 1, spec, description, json.dumps(tags or {}), now()),
        )
    dataset.name, dataset.version = name, latest + 1
    return dataset


def get_dataset(
    workspace: Any, name: str, version: int | str = "latest"
) -> FileDataset | TabularDataset:
    """A registered data set (its files are listed when the step runs)."""
    with workspace.db() as db:
        if version == "latest":
            row = db.execute(
                "SELECT version, spec FROM datasets WHERE name = ? "
                "ORDER BY version DESC",
                (name,),
            ).fetchone()
        else:
            row = db.execute(
                "SELECT version, spec FROM datasets WHERE name = ? AND version = ?",
                (name, int(version)),
            ).fetchone()
        known = sorted({r[0] for r in db.execute("SELECT name FROM datasets")})
    if row is None:
        which = f"data set {name!r}" + (
            "" if version == "latest" else f" version {version}"
        )
        raise ConfigError(
            f"{which} is not registered in {workspace!r} (registered: "
            f"{', '.join(known) or 'none'}); register it with "
            "ds.register(ws, name)"
        )
    dataset = from_spec(json.loads(row["spec"]), workspace)
    dataset.name, dataset.version = name, row["version"]
    return dataset


def from_spec(
    spec: dict[str, Any], workspace: Any = None
) -> FileDataset | TabularDataset:
    """Rebuild a data set from its spec (not listed yet)."""
    path: Any = spec["paths"]
    if spec.get("datastore"):
        store = workspace.datastore(spec["datastore"])
        path = [store.path(p) for p in path]
    return InputKind.of_kind(spec["kind"]).from_spec(path, spec)
