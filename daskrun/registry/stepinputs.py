"""A step's inputs as given: checked, of one kind (their class,
:class:`~daskrun.backends.inputs.base.Input`), and the data set each spec
stands for in one run (pipeline parameters, PipelineData)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from daskrun.backends.inputs.base import Input as InputKind
from daskrun.backends.inputs.datasets import (
    Dataset,
    DatasetConsumptionConfig,
    FileDataset,
    PipelineData,
    TabularDataset,
)
from daskrun.backends.inputs.native import (
    CollectionInput,
    is_collection,
)
from daskrun.backends.inputs.partitions import check_partition_keys
from daskrun.engine.config import PipelineParameter
from daskrun.engine.naming import check_arguments
from daskrun.exceptions import ConfigError

Input = FileDataset | TabularDataset | CollectionInput


def _check_input_specs(inputs: Any) -> list[Any]:
    specs = (PipelineParameter, PipelineData, DatasetConsumptionConfig)
    single = (FileDataset, TabularDataset, *specs)
    if is_collection(inputs):
        inputs = [inputs]
    items = [inputs] if isinstance(inputs, single) else inputs
    if isinstance(items, (str, os.PathLike)) or not isinstance(items, Sequence):
        raise ConfigError(
            f"inputs={inputs!r} is not a data set; use "
            "inputs=[Dataset.File.from_files(path)]"
        )
    items = [CollectionInput(i) if is_collection(i) else i for i in items]
    if len(items) > 1 and any(isinstance(i, CollectionInput) for i in items):
        raise ConfigError(
            f"inputs hold a Dask collection and {len(items) - 1} more inputs; a "
            "step reads one collection: concatenate them first (dd.concat or "
            "db.concat)"
        )
    if not items:
        raise ConfigError(
            "inputs=[] is empty; pass at least one data set, e.g. "
            "[Dataset.File.from_files('images/')]"
        )
    for item in items:
        if not isinstance(
            _default(item), (FileDataset, TabularDataset, PipelineData, CollectionInput)
        ):
            raise ConfigError(
                f"inputs item {item!r} is not a data set; use "
                f"Dataset.File.from_files({item!r}) or "
                f"Dataset.Tabular.from_delimited_files({item!r})"
            )
    return items


def _source(item: Any) -> Any:
    """What an input names: a data set, a PipelineParameter or PipelineData."""
    return item.source if isinstance(item, DatasetConsumptionConfig) else item


def _default(item: Any) -> Any:
    """An input's data set (a PipelineParameter's default) or PipelineData."""
    source = _source(item)
    return source.default_value if isinstance(source, PipelineParameter) else source


def _input_type(specs: list[Any]) -> type[InputKind]:
    """The one class of a step's inputs (PipelineData: files)."""
    kinds = set()
    for item in specs:
        source = _default(item)
        kinds.add(FileDataset.kind if isinstance(source, PipelineData) else source.kind)
    if len(kinds) > 1:
        raise ConfigError(
            f"inputs mix kinds {sorted(kinds)}; all inputs of one step must be "
            "file data sets, or all tabular"
        )
    return InputKind.of_kind(kinds.pop())


def _check_kinds(items: list[Input]) -> None:
    kinds = {(i.kind, i.file_format) for i in items}
    if len(kinds) > 1:
        raise ConfigError(
            f"inputs mix kinds {sorted(str(k) for k in kinds)}; all inputs of one "
            "step must be file data sets, or all tabular of one format"
        )


def _check_partitioned(keys: Sequence[str] | None, inputs: list[Input]) -> None:
    """Every input has the ``partition_keys``; tabular inputs share one
    ``partition_format`` (the workers add its columns to every row)."""
    for ds in inputs:
        if keys:
            check_partition_keys(keys, ds)
    formats = {ds.partition_format for ds in inputs if ds.keys_as_columns}
    if len(formats) > 1:
        raise ConfigError(
            f"tabular inputs have different partition_format values "
            f"{sorted(map(str, formats))}; give them one format, or run one step "
            "per format"
        )


def _concrete(
    spec: Any,
    values: dict[str, Any],
    produced: dict[str, Input],
    workspace: Any = None,
) -> Input:
    """The data set an input spec stands for in one run."""
    source = _source(spec)
    if isinstance(source, PipelineParameter):
        value = values.get(source.name, source.default_value)
        if isinstance(value, str) and workspace is not None:
            value = Dataset.get_by_name(workspace, value)
        if not isinstance(value, (FileDataset, TabularDataset)):
            raise ConfigError(
                f"pipeline parameter {source.name!r}={value!r} is not a data set; "
                "pass a data set (Dataset.File.from_files(...)) or the name of one "
                "registered in the workspace"
            )
        return value
    if isinstance(source, PipelineData):
        if source.name not in produced:
            raise ConfigError(
                f"PipelineData {source.name!r} is read before any step wrote it; "
                "add the step that writes it to the same Pipeline"
            )
        return produced[source.name]
    return source


def _show(value: Any) -> Any:
    """A parameter value as a run record shows it."""
    if isinstance(value, (FileDataset, TabularDataset)):
        return repr(value)
    return value


def _absolute(path: str, storage_options: dict[str, Any]) -> str:
    fs, stripped = url_to_fs(path, **storage_options)
    return os.path.abspath(stripped) if isinstance(fs, LocalFileSystem) else path


def _checked_output(
    output: Any, storage_options: dict[str, Any]
) -> tuple[PipelineData | None, str | None]:
    """A step's ``output``: PipelineData (placed when bound), or the folder or
    URL, absolute; ``None`` for none."""
    if isinstance(output, PipelineData):
        return output, None
    if output is None:
        return None, None
    if not os.fspath(output):
        raise ConfigError(
            "output='' is empty, which would write into the current folder; "
            "pass an output folder or URL, e.g. output='out/' ('.' for the "
            "current folder)"
        )
    return None, _absolute(os.fspath(output), storage_options)


def _checked_sides(side_inputs: Any, arguments: Any) -> tuple[list[Any], list[Any]]:
    """A step's side inputs (data sets) and arguments; a data set among the
    arguments must be a side input, which every worker gets."""
    sides = list(side_inputs or [])
    for side in sides:
        if not isinstance(side, (FileDataset, TabularDataset)):
            raise ConfigError(
                f"side_inputs item {side!r} is not a data set; use "
                "Dataset.File.from_files(path)"
            )
    args = check_arguments(arguments)
    for arg in args:
        if isinstance(arg, (FileDataset, TabularDataset)) and not any(
            arg is side for side in sides
        ):
            raise ConfigError(
                f"argument {arg!r} is a data set that is not in side_inputs; "
                "add it to side_inputs so every worker gets it"
            )
    return sides, args
