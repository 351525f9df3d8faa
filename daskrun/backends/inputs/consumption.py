"""How a step names its inputs and outputs, as Azure ML's pipeline classes
do: a data set ``as_named_input`` (:class:`DatasetConsumptionConfig`), data
one step writes and the next reads (:class:`PipelineData`,
:class:`OutputFileDatasetConfig`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from daskrun.backends.inputs.base import Input
from daskrun.engine.naming import PipelineParameter, check_name
from daskrun.exceptions import ConfigError

if TYPE_CHECKING:
    pass


class DatasetConsumptionConfig:
    """A named step input: a data set, or a PipelineParameter whose value is
    one (``DatasetConsumptionConfig("images", param).as_mount()``).

    Files always reach ``run()`` as local paths (remote ones are fetched per
    mini-batch), so ``as_mount()`` and ``as_download()`` mean the same.
    """

    def __init__(self, name: str, dataset: Any, mode: str = "direct"):
        source = (
            dataset.default_value if isinstance(dataset, PipelineParameter) else dataset
        )
        if not isinstance(source, (Input, PipelineData)):
            raise ConfigError(
                f"DatasetConsumptionConfig {name!r}: {dataset!r} is not a data set "
                "nor a PipelineParameter holding one"
            )
        self.name = name
        self.source = dataset
        self.mode = mode

    def as_mount(self) -> DatasetConsumptionConfig:
        self.mode = "mount"
        return self

    def as_download(self) -> DatasetConsumptionConfig:
        self.mode = "download"
        return self

    def __repr__(self) -> str:
        return f"DatasetConsumptionConfig({self.name!r}, {self.source!r})"


class PipelineData:
    """A step's output folder that a later step of the same pipeline reads.

    Each run writes it to ``daskrun/<step run id>/<name>/`` on ``datastore``
    (default: the workspace's default datastore). A step that takes it in
    ``inputs`` receives its files (daskrun's own bookkeeping excluded).
    """

    def __init__(self, name: str, datastore: Any = None, **_: Any):
        self.name = check_name("PipelineData", name)
        self.datastore = datastore

    def __repr__(self) -> str:
        return f"PipelineData(name={self.name!r})"


class OutputFileDatasetConfig(PipelineData):
    """Azure ML's ``OutputFileDatasetConfig`` where it fits: a step's output
    folder, as :class:`PipelineData`.

    ``destination=(datastore, path)`` names the datastore; the output is
    written to ``daskrun/<step run id>/<name>/`` on it, as PipelineData's is
    (the ``path`` is recorded and unused). ``as_mount()``, ``as_upload()``
    and ``as_input()`` return the output itself.
    """

    def __init__(
        self,
        name: str | None = None,
        destination: tuple[Any, str] | None = None,
        source: str | None = None,
        partition_format: str | None = None,
    ):
        if name is None:
            raise ConfigError(
                "OutputFileDatasetConfig needs a name here (daskrun names the "
                "output folder after it); pass name='inferences'"
            )
        datastore, path = destination or (None, None)
        self.destination_path: str | None = path  # recorded, unused
        super().__init__(name, datastore)

    def as_mount(self, disable_metadata_cache: bool = False) -> OutputFileDatasetConfig:
        return self

    def as_upload(
        self, overwrite: bool = False, source_globs: Any = None
    ) -> OutputFileDatasetConfig:
        return self

    def as_input(self, name: str | None = None) -> OutputFileDatasetConfig:
        return self
