"""Azure ML's module names for daskrun's classes, where the SDK is not installed.

Two entry points, in the manner of ``pymysql.install_as_MySQLdb()``:

- :func:`install_as_azureml` (driver code, one line in a notebook) makes
  ``azureml.core``, ``azureml.pipeline.steps`` and the rest importable;
- :func:`install_entry_script_shims` (called by the worker plugin before it
  imports an entry script) does the same on a worker, where ``Model`` is
  the worker's (``Model.get_model_path``) so that no registry module and
  no SQLite is loaded there.

Nothing is shadowed: the modules come from a finder placed *last* on
``sys.meta_path``, so an installed SDK (or ``azureml_user``) is always found
first, and a submodule is served only when its top-level package is this
shim's, never beside a real ``azureml`` package. Driver code that asks for
daskrun's names where another ``azureml`` package is importable is refused
in one line: its imports would get that package, not daskrun. Names resolve
lazily (PEP 562 module ``__getattr__``): ``from azureml.core import Run``
imports the engine only. A name daskrun lacks, imported as notebooks do
(``from azureml.core import ScriptRunConfig``), raises
:class:`~daskrun.NotProvidedError` (an ``ImportError``) saying what to use
instead; asked for as an attribute, it is an ``AttributeError`` as usual.

>>> import daskrun
>>> daskrun.install_as_azureml()
>>> from azureml.pipeline.steps import ParallelRunConfig  # doctest: +SKIP
>>> ParallelRunConfig is daskrun.ParallelRunConfig  # doctest: +SKIP
True
"""

from __future__ import annotations

import dis
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import FrameType, ModuleType
from typing import Any

from daskrun.exceptions import ConfigError, NotProvidedError

# Azure ML module -> {name: "daskrun module:attribute"}; the registry's
# modules are named here as strings and imported on first use of a name
_MODEL = "daskrun.registry.models:Model"
_WORKER_MODEL = "daskrun.aml.modelrefs:Model"
MODULES: dict[str, dict[str, str]] = {
    "azureml": {},
    "azureml.core": {
        "ComputeTarget": "daskrun.registry.compute:ComputeTarget",
        "Dataset": "daskrun.backends.inputs.datasets:Dataset",
        "Datastore": "daskrun.registry.workspace:Datastore",
        "Environment": "daskrun.engine.environment:Environment",
        "Experiment": "daskrun.registry.pipeline:Experiment",
        "Model": _MODEL,
        "Run": "daskrun.aml.runcontext:Run",
        "VERSION": "daskrun:__version__",
        "Workspace": "daskrun.registry.workspace:Workspace",
    },
    "azureml.core.compute": {
        "AmlCompute": "daskrun.registry.compute:AmlCompute",
        "ComputeTarget": "daskrun.registry.compute:ComputeTarget",
    },
    "azureml.core.compute_target": {
        "ComputeTargetException": "daskrun.exceptions:ConfigError",
    },
    "azureml.core.conda_dependencies": {
        "CondaDependencies": "daskrun.engine.environment:CondaDependencies",
    },
    "azureml.core.dataset": {"Dataset": "daskrun.backends.inputs.datasets:Dataset"},
    "azureml.core.datastore": {"Datastore": "daskrun.registry.workspace:Datastore"},
    "azureml.core.environment": {
        "Environment": "daskrun.engine.environment:Environment"
    },
    "azureml.core.experiment": {"Experiment": "daskrun.registry.pipeline:Experiment"},
    "azureml.core.model": {"Model": _MODEL},
    "azureml.core.run": {"Run": "daskrun.aml.runcontext:Run"},
    "azureml.core.runconfig": {
        "CondaDependencies": "daskrun.engine.environment:CondaDependencies",
        "DEFAULT_CPU_IMAGE": "daskrun.engine.environment:DEFAULT_CPU_IMAGE",
        "DEFAULT_GPU_IMAGE": "daskrun.engine.environment:DEFAULT_GPU_IMAGE",
    },
    "azureml.core.workspace": {"Workspace": "daskrun.registry.workspace:Workspace"},
    "azureml.data": {
        "FileDataset": "daskrun.backends.inputs.files:FileDataset",
        "OutputFileDatasetConfig": (
            "daskrun.backends.inputs.consumption:OutputFileDatasetConfig"
        ),
        "TabularDataset": "daskrun.backends.inputs.tables:TabularDataset",
    },
    "azureml.data.datapath": {"DataPath": "daskrun.registry.workspace:DataPath"},
    "azureml.data.dataset_consumption_config": {
        "DatasetConsumptionConfig": (
            "daskrun.backends.inputs.consumption:DatasetConsumptionConfig"
        ),
    },
    "azureml.data.output_dataset_config": {
        "OutputFileDatasetConfig": (
            "daskrun.backends.inputs.consumption:OutputFileDatasetConfig"
        ),
    },
    "azureml.pipeline": {},
    "azureml.pipeline.core": {
        "Pipeline": "daskrun.registry.pipeline:Pipeline",
        "PipelineData": "daskrun.backends.inputs.consumption:PipelineData",
        "PipelineParameter": "daskrun.engine.naming:PipelineParameter",
        "PipelineRun": "daskrun.registry.pipeline:PipelineRun",
        "StepRun": "daskrun.registry.step:StepRun",
    },
    "azureml.pipeline.steps": {
        "ParallelRunConfig": "daskrun.engine.config:ParallelRunConfig",
        "ParallelRunStep": "daskrun.registry.step:ParallelRunStep",
    },
    "azureml.widgets": {"RunDetails": "daskrun.registry.widgets:RunDetails"},
    "azureml_user": {},
    "azureml_user.parallel_run": {"EntryScript": "daskrun.engine.plugin:EntryScript"},
}

_TOPS = ("azureml", "azureml_user")
# "driver" once install_as_azureml() ran in this process, else "worker"
_mode: str | None = None


def install_as_azureml() -> None:
    """Make Azure ML's SDK v1 names importable from daskrun's classes, for
    notebooks and driver scripts: ``from azureml.core import Workspace``.

    An installed Azure ML SDK is never shadowed: where another ``azureml``
    package is importable (the SDK, or any ``azureml-*`` distribution),
    ``from azureml.core import ...`` would give its names, not daskrun's, so
    this raises :class:`~daskrun.ConfigError` naming where it is.
    Idempotent. See the README's "Coming from Azure ML" for what maps to
    what and what is accepted but unused off Azure.

    Examples
    --------
    >>> import daskrun
    >>> daskrun.install_as_azureml()
    """
    global _mode
    _refuse_another_azureml()
    _install()
    if _mode != "driver":
        _mode = "driver"
        _forget("Model")  # a worker's Model may have been resolved here


def install_entry_script_shims() -> None:
    """On a worker, before the entry script is imported: the same modules,
    with ``Model`` the worker's (``Model.get_model_path``), so that no
    registry module is loaded. A no-op for names the SDK provides."""
    global _mode
    _install()
    if _mode is None:
        _mode = "worker"


def is_shim(module: object) -> bool:
    """Whether ``module`` is one of these alias modules (not the SDK's)."""
    return bool(getattr(module, "__daskrun_shim__", False))


def _refuse_another_azureml() -> None:
    """Raise if an ``azureml`` package other than these alias modules is
    importable (or imported)."""
    module = sys.modules.get("azureml")
    if module is not None:
        spec = getattr(module, "__spec__", None)
        if is_shim(module):
            return
    else:
        spec = importlib.util.find_spec("azureml")
        if spec is None or isinstance(spec.loader, _Finder):
            return
    where = getattr(spec, "origin", None) or ", ".join(
        getattr(spec, "submodule_search_locations", None) or ["sys.modules"]
    )
    raise ConfigError(
        f"install_as_azureml(): another 'azureml' package is importable "
        f"({where}), and daskrun never shadows it, so 'from azureml.core import "
        "...' would not give daskrun's classes; uninstall it (e.g. pip uninstall "
        "azureml-core), run in an environment without it, or import daskrun's "
        "names instead (from daskrun import Workspace, ParallelRunStep)"
    )


def _install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())  # last: anything installed wins


def _forget(name: str) -> None:
    for module_name, names in MODULES.items():
        module = sys.modules.get(module_name)
        if name in names and is_shim(module):
            vars(module).pop(name, None)


def _target(module_name: str, name: str) -> str:
    target = MODULES[module_name][name]
    return _WORKER_MODEL if target == _MODEL and _mode == "worker" else target


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the alias modules that nothing before it on ``sys.meta_path``
    found."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        top = fullname.split(".", 1)[0]
        if fullname != top and not is_shim(sys.modules.get(top)):
            return None  # a submodule beside a real azureml: never ours
        package = any(m.startswith(fullname + ".") for m in MODULES)
        return importlib.util.spec_from_loader(fullname, self, is_package=package)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module

    def exec_module(self, module: ModuleType) -> None:
        module_name = module.__name__
        names = MODULES[module_name]
        module.__doc__ = (
            f"daskrun's stand-in for Azure ML's {module_name} "
            "(daskrun.install_as_azureml())"
        )
        module.__daskrun_shim__ = True  # type: ignore[attr-defined]
        module.__all__ = sorted(names)  # type: ignore[attr-defined]

        def __getattr__(name: str) -> Any:
            if name not in names:
                if _importing(sys._getframe(1)):
                    # `from azureml.core import X` would otherwise say only
                    # "cannot import name 'X' ... (unknown location)"
                    raise NotProvidedError(_missing(module_name, name), name=name)
                raise AttributeError(_missing(module_name, name))
            where, _, attr = _target(module_name, name).partition(":")
            value = getattr(importlib.import_module(where), attr)
            setattr(module, name, value)  # once
            return value

        def __dir__() -> list[str]:
            return sorted({*vars(module), *names})

        module.__getattr__ = __getattr__  # type: ignore[method-assign]
        module.__dir__ = __dir__  # type: ignore[method-assign]


# what to use instead of the Azure ML names that notebooks import most and
# daskrun does not provide
_INSTEAD = {
    "ScriptRunConfig": "run the script with plain Python, or as a "
    "ParallelRunStep entry script (init() and run(mini_batch))",
    "PythonScriptStep": "a ParallelRunStep, or plain Python between steps",
    "RunConfiguration": "ParallelRunConfig(environment=Environment(...))",
    "Webservice": "serve the model with a web framework of your choice",
    "InferenceConfig": "a ParallelRunStep entry script for batch inference",
    "Keyvault": "environment variables (ParallelRunConfig(environment_variables=))",
}
_IMPORT_FROM = dis.opmap["IMPORT_FROM"]


def _importing(frame: FrameType) -> bool:
    """Whether ``frame`` is running ``from module import name`` (the
    instruction that asked for a missing name), not ``module.name`` or
    ``getattr``: only an import gets :class:`~daskrun.NotProvidedError`."""
    code = frame.f_code.co_code
    return 0 <= frame.f_lasti < len(code) and code[frame.f_lasti] == _IMPORT_FROM


def _missing(module_name: str, name: str) -> str:
    known = ", ".join(sorted(MODULES[module_name])) or "only submodules"
    instead = _INSTEAD.get(
        name,
        "daskrun covers ParallelRunStep's workflow (see the README's 'Coming "
        "from Azure ML')",
    )
    return (
        f"daskrun does not provide {module_name}.{name} (its stand-in "
        f"{module_name} has: {known}); instead: {instead}; or install the "
        "Azure ML SDK to use the real one"
    )
