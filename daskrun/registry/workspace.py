"""The workspace: a folder that holds datastores, data sets, models, compute
targets and runs, as in the tutorial's ``Workspace``.

:class:`Workspace` is :class:`~daskrun.registry.base.Registry` (the folder, its
SQLite tables, secrets and datastores) with the registered collections on
top: data sets (:mod:`daskrun.registry.catalog`), models
(:mod:`daskrun.registry.models`) and
compute targets (:mod:`daskrun.registry.compute`). Those modules build on the
registry and never import this one, so the layer has no import cycle.
"""

from __future__ import annotations

from typing import Any

from daskrun.registry.base import (
    CONFIG,
    DEFAULT_DATASTORE,
    WORKSPACE_DB,
    DataPath,
    Datastore,
    OutputData,
    Registry,
    registry_row,
)
from daskrun.registry.catalog import get_dataset, register_dataset
from daskrun.registry.compute import ComputeTarget
from daskrun.registry.models import Model

__all__ = [
    "CONFIG",
    "DEFAULT_DATASTORE",
    "WORKSPACE_DB",
    "DataPath",
    "Datastore",
    "OutputData",
    "Workspace",
    "registry_row",
]


class Workspace(Registry):
    """A workspace folder.

    Parameters
    ----------
    path : str or Path
        An existing workspace folder (see :meth:`create`).

    Attributes
    ----------
    location, subscription_id, resource_group : str
        Azure ML's, for notebooks that print them: ``"local"`` each, as a
        workspace is a folder on this machine, in no Azure region,
        subscription or resource group.

    Examples
    --------
    >>> ws = Workspace.create(tempfile.mkdtemp())  # doctest: +SKIP
    >>> ws.get_default_datastore().name  # doctest: +SKIP
    'workspacestore'
    """

    location = "local"
    subscription_id = "local"
    resource_group = "local"

    def register_dataset(self, dataset: Any, name: str, **options: Any) -> Any:
        """``dataset.register(ws, name)``: see :mod:`daskrun.registry.catalog`."""
        return register_dataset(self, dataset, name, **options)

    def get_dataset(self, name: str, version: int | str = "latest") -> Any:
        """``Dataset.get_by_name(ws, name)``: see :mod:`daskrun.registry.catalog`."""
        return get_dataset(self, name, version)

    @property
    def datasets(self) -> dict[str, Any]:
        """The latest version of each registered data set."""
        return {n: self.get_dataset(n) for n in self._names("datasets")}

    @property
    def models(self) -> dict[str, Model]:
        """The latest version of each registered model."""
        return {n: Model(self, n) for n in self._names("models")}

    @property
    def compute_targets(self) -> dict[str, ComputeTarget]:
        return {n: ComputeTarget(self, n) for n in self._names("compute_targets")}

    def _names(self, table: str) -> list[str]:
        with self.db() as db:
            return sorted({r[0] for r in db.execute(f"SELECT name FROM {table}")})
