"""References to registered models: what the engine gets from the registry.

The step ships the workspace's model entries (:class:`ModelRef`: name,
version, URL, storage options), not the files, to its workers.
``Model.get_model_path(name)`` inside ``init()`` resolves them here, on the
worker, without the registry: a worker that cannot see the datastore's
files on its disk fetches them once into a local cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from daskrun.backends.storage import storage_errors
from daskrun.exceptions import ConfigError


@dataclass(frozen=True)
class ModelRef:
    """Where one model version lives; what workers get (credentials are in
    ``storage_options``, which is never logged)."""

    name: str
    version: int
    url: str
    storage_options: dict[str, Any]
    datastore: str = ""  # its name, for messages


# set on a worker by the entry-script plugin before init() runs
_worker_models: list[ModelRef] | None = None


def set_worker_models(models: list[ModelRef] | None) -> None:
    global _worker_models
    _worker_models = models


def worker_models() -> list[ModelRef] | None:
    """The models shipped to this worker; ``None`` outside a daskrun worker."""
    return _worker_models


def local_model_path(
    refs: Sequence[ModelRef], model_name: str, version: int | None = None
) -> str:
    """A local path to model ``model_name`` (latest version, or ``version``)
    of ``refs``, fetched into a local cache if its files are not on this
    machine's disk."""
    matches = [
        r
        for r in refs
        if r.name == model_name and (version is None or r.version == version)
    ]
    if not matches:
        known = sorted({r.name for r in refs})
        which = f"model {model_name!r}" + (f" version {version}" if version else "")
        raise ConfigError(
            f"{which} is not registered (registered: "
            f"{', '.join(known) or 'none'}); register it with "
            "Model.register(ws, model_path, model_name)"
        )
    ref = max(matches, key=lambda r: r.version)
    fs, path = url_to_fs(ref.url, **ref.storage_options)
    if isinstance(fs, LocalFileSystem) and os.path.exists(path):
        return str(path)
    digest = hashlib.sha256(ref.url.encode()).hexdigest()[:12]
    cache = Path(tempfile.gettempdir()) / "daskrun-models" / digest
    target = cache / Path(path).name
    if not target.exists():
        fetch(ref, target)
    return str(target)


def fetch(ref: ModelRef, target: Path) -> None:
    """Copy a model to ``target`` atomically (several worker processes of a
    node may fetch the same model at once)."""
    fs, path = url_to_fs(ref.url, **ref.storage_options)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        landing = tmp / target.name
        with storage_errors(
            ref.datastore or ref.url,
            ref.storage_options,
            f"fetching model {ref.name!r} version {ref.version}",
        ):
            if fs.isdir(path):
                fs.get(path.rstrip("/") + "/", str(landing), recursive=True)
            else:
                fs.get(path, str(landing))
        try:
            os.rename(landing, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Model:
    """``Model`` as an entry script has it on a worker: ``from azureml.core
    import Model`` there (see :mod:`daskrun.aml`), with what ``init()``
    needs and no registry behind it.

    >>> Model.get_model_path("mnist")  # doctest: +SKIP
    '/tmp/daskrun-models/3f2a.../mnist-tf'
    """

    def __init__(self, workspace: Any = None, name: str | None = None, **_: Any):
        raise ConfigError(
            f"Model(workspace, {name!r}) opens the workspace's registry, which a "
            "worker does not load; in an entry script use "
            "Model.get_model_path(model_name)"
        )

    @staticmethod
    def get_model_path(model_name: str, version: int | None = None) -> str:
        """A local path to a registered model, for ``init()``."""
        refs = worker_models()
        if refs is None:
            raise ConfigError(
                f"Model.get_model_path({model_name!r}): this step was run without "
                "a workspace, so no registered models were shipped to its "
                "workers; run it with step.run(workspace=ws) or in a Pipeline "
                "of that workspace"
            )
        return local_model_path(refs, model_name, version)
