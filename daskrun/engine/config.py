"""Parameters of a step: ``ParallelRunConfig``, their parsing and validation.

Everything here is plain data and pure functions. A parameter left at ``None``
takes its value from ``dask.config`` (namespace ``daskrun``, defaults in
``daskrun.yaml``). Values are resolved once, on the client, into a frozen
:class:`ResolvedConfig` that is shipped to the workers.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.config
import yaml
from dask.utils import parse_timedelta

from daskrun.backends.inputs.partitions import parse_partition_keys
from daskrun.engine.auto import AUTO, is_auto
from daskrun.exceptions import ConfigError

_defaults_file = Path(__file__).parent.parent / "daskrun.yaml"
with _defaults_file.open() as _f:
    _defaults = yaml.safe_load(_f)
dask.config.update_defaults(_defaults)

OUTPUT_ACTIONS = ("append_row", "summary_only")
OUTPUT_FORMATS = ("text", "csv", "parquet")
LOGGING_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_STEP_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_BYTE_SIZE = re.compile(r"^(\d+)([kKmMgG][bB])?$")
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}

# Names a user may not pass in ``arguments``: they belong to the config.
RESERVED_ARGUMENTS = frozenset(
    {
        "entry_script",
        "error_threshold",
        "output_action",
        "compute_target",
        "node_count",
        "process_count_per_node",
        "mini_batch_size",
        "source_directory",
        "environment",
        "description",
        "logging_level",
        "run_invocation_timeout",
        "run_max_try",
        "append_row_file_name",
        "output_format",
        "allowed_failed_count",
        "allowed_failed_percent",
        "environment_variables",
        "partition_keys",
        "output",
        "input",
        "inputs",
        "side_inputs",
    }
)


def env_variable(key: str) -> str | None:
    """The ``DASK_DASKRUN__*`` environment variable that set
    ``daskrun.<key>``'s current value, if one did (not a later
    ``dask.config.set``).

    >>> os.environ["DASK_DASKRUN__RUN_MAX_TRY"] = "5"
    >>> dask.config.refresh()
    >>> env_variable("run-max-try"), env_variable("error-threshold")
    ('DASK_DASKRUN__RUN_MAX_TRY', None)
    >>> del os.environ["DASK_DASKRUN__RUN_MAX_TRY"]; dask.config.refresh()
    """
    want = f"daskrun.{key}".replace("_", "-")
    for name, raw in os.environ.items():
        # dask.config.collect_env's reading of a name: DASK_A__B_C is a.b_c
        if name.startswith("DASK_") and (
            name[5:].lower().replace("__", ".").replace("_", "-") == want
        ):
            parsed = next(iter(dask.config.collect_env({name: raw}).values()))
            while isinstance(parsed, dict):  # {"daskrun": {"key": value}}
                parsed = next(iter(parsed.values()))
            try:
                return name if parsed == config_get(key) else None
            except KeyError:  # not a daskrun setting
                return None
    return None


_SETTING = re.compile(r"(?<![\w.\"'])daskrun\.([a-z0-9_.-]+)=")


def env_named(message: str) -> str:
    """``message`` with each ``daskrun.<key>=`` whose value an environment
    variable set named as that variable.

    >>> os.environ["DASK_DASKRUN__RUN_MAX_TRY"] = "0"; dask.config.refresh()
    >>> env_named("daskrun.run-max-try=0 must be 1 or more")
    'DASK_DASKRUN__RUN_MAX_TRY=0 must be 1 or more'
    >>> del os.environ["DASK_DASKRUN__RUN_MAX_TRY"]; dask.config.refresh()
    """

    def named(found: re.Match[str]) -> str:
        return f"{env_variable(found.group(1)) or found.group(0)[:-1]}="

    return _SETTING.sub(named, message)


@contextlib.contextmanager
def named_as_set(names: Mapping[str, str]) -> Iterator[None]:
    """Where a value that fails validation came from an environment
    variable, the error names the variable (``DASK_DASKRUN__RUN_MAX_TRY=0
    must be ...``) instead of ``run_max_try=0``: ``names`` maps each name an
    error may give such a value to its key (``{"run_max_try":
    "run-max-try"}``)."""
    try:
        yield
    except ConfigError as e:
        message = str(e)
        for shown, key in names.items():
            if f"{shown}=" in message and (env := env_variable(key)):
                message = message.replace(f"{shown}=", f"{env}=")
        if message == str(e):
            raise
        raise ConfigError(message) from None


def config_get(key: str) -> Any:
    """Read ``daskrun.<key>`` from dask.config.

    >>> config_get("run-max-try")
    3
    """
    return dask.config.get(f"daskrun.{key}")


def isolate_failures() -> bool:
    """``daskrun.isolate-failures``: whether a mini-batch that failed its
    last try is split to find the items that fail.

    >>> isolate_failures()
    True
    """
    return config_bool("isolate-failures")


def config_bool(key: str) -> bool:
    """Read ``daskrun.<key>`` as true or false (also ``"true"`` and
    ``"false"``, as an environment variable gives them).

    >>> config_bool("environment.strict")
    False
    """
    value = config_get(key)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"  # from an environment variable
    if not isinstance(value, bool):
        raise ConfigError(
            env_named(
                f"daskrun.{key}={value!r} must be true or false; e.g. "
                f'dask.config.set({{"daskrun.{key}": False}})'
            )
        )
    return value


def config_seconds(key: str) -> float | None:
    """Read ``daskrun.<key>`` as seconds: a number, or a duration such as
    ``"10 minutes"`` or ``"90s"``; ``None`` (null in YAML) turns it off.

    >>> with dask.config.set({"daskrun.progress-timeout": "2 minutes"}):
    ...     config_seconds("progress-timeout")
    120
    >>> with dask.config.set({"daskrun.progress-timeout": "soon"}):
    ...     config_seconds("progress-timeout")
    Traceback (most recent call last):
    ...
    daskrun.exceptions.ConfigError: daskrun.progress-timeout='soon' is not a \
number of seconds; use e.g. dask.config.set({"daskrun.progress-timeout": 600}) \
or "10 minutes", or None to turn it off
    """
    value = config_get(key)
    if value is None:
        return None
    seconds: Any = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str):
        try:
            seconds = parse_timedelta(value, default="seconds")
        except (ValueError, TypeError, KeyError):
            pass
    fix = (
        f'use e.g. dask.config.set({{"daskrun.{key}": 600}}) or "10 minutes", '
        "or None to turn it off"
    )
    if seconds is None or not math.isfinite(seconds):
        raise ConfigError(
            env_named(f"daskrun.{key}={value!r} is not a number of seconds; {fix}")
        )
    if seconds <= 0:
        raise ConfigError(
            env_named(f"daskrun.{key}={value!r} must be above 0 s; {fix}")
        )
    return seconds


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_file_count(value: object, name: str = "mini_batch_size") -> int:
    """Parse a number of files per mini-batch.

    >>> parse_file_count(10), parse_file_count("7")
    (10, 7)
    >>> parse_file_count("10 files")
    Traceback (most recent call last):
    ...
    daskrun.exceptions.ConfigError: mini_batch_size='10 files' is not a number of \
files; use an int like 10
    """
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not _is_int(value):
        raise ConfigError(
            f"{name}={value!r} is not a number of files; use an int like 10"
        )
    assert isinstance(value, int)
    if value < 1:
        raise ConfigError(f"{name}={value!r} must be at least 1; use an int like 10")
    return value


def parse_byte_size(value: object, name: str = "mini_batch_size") -> int:
    """Parse a mini-batch size in bytes: an int, or a string like ``"1MB"``.

    ``KB``, ``MB`` and ``GB`` are powers of 1024.

    >>> parse_byte_size("1MB"), parse_byte_size(1024), parse_byte_size("2kb")
    (1048576, 1024, 2048)
    >>> parse_byte_size("1 MB")
    Traceback (most recent call last):
    ...
    daskrun.exceptions.ConfigError: mini_batch_size='1 MB' is not a size in bytes; \
use an int like 1048576 or a string like '1MB', '512KB', '1GB'
    """
    fix = "use an int like 1048576 or a string like '1MB', '512KB', '1GB'"
    if _is_int(value):
        size = int(value)  # type: ignore[call-overload]
    elif isinstance(value, str) and (m := _BYTE_SIZE.match(value.strip())):
        size = int(m.group(1)) * _UNITS[(m.group(2) or " ")[0].strip().lower()]
    else:
        raise ConfigError(f"{name}={value!r} is not a size in bytes; {fix}")
    if size < 1:
        raise ConfigError(f"{name}={value!r} must be at least 1 byte; {fix}")
    return size


def mini_batch_size_for(
    kind: str, value: object, parse: Callable[[object], int]
) -> int:
    """Parse ``mini_batch_size`` for an input of ``kind`` with ``parse`` (its
    input class's: files or bytes); ``None`` takes the default from
    ``daskrun.mini-batch-size.<kind>``, and so does ``"auto"`` until the job
    chooses (:mod:`daskrun.engine.auto`).

    >>> mini_batch_size_for("file", None, parse_file_count)
    10
    >>> mini_batch_size_for("tabular", "1KB", parse_byte_size)
    1024
    """
    if value is None or is_auto(value):  # "auto" starts from the default
        key = f"mini-batch-size.{kind}"
        with named_as_set({"mini_batch_size": key}):
            return parse(config_get(key))
    return parse(value)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")


def check_name(kind: str, name: object) -> str:
    """A registry name: letters, digits, ``_ . -``; starts alphanumeric.

    >>> check_name("datastore", "mnist_datastore")
    'mnist_datastore'
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"{kind} name {name!r} is not valid; use letters, digits, '_', '.' "
            "or '-', starting with a letter or digit, e.g. 'mnist_datastore'"
        )
    return name


def check_step_name(name: object) -> str:
    """Check a step name: 3–32 characters of ``^[a-z]([-a-z0-9]*[a-z0-9])?$``.

    >>> check_step_name("score-images")
    'score-images'
    """
    if (
        not isinstance(name, str)
        or not 3 <= len(name) <= 32
        or not _STEP_NAME.match(name)
    ):
        raise ConfigError(
            f"name={name!r} is not a valid step name; use 3-32 lowercase letters, "
            "digits and '-', starting with a letter and not ending with '-', "
            "like 'batch-scoring'"
        )
    return name


# [scheme://]host:port, the forms distributed's clients connect to
_SCHEDULER_ADDRESS = re.compile(
    r"^(?:(?:tcp|tls|ws|wss|ucx|ucxx)://)?"
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})/?$"
)


def check_scheduler_address(address: str, name: str = "compute_target") -> str:
    """Check a scheduler address before anything connects to it: a host
    and a port, with distributed's scheme if any (``inproc://`` addresses
    of this process are taken as they are).

    >>> check_scheduler_address("tls://127.0.0.1:8786")
    'tls://127.0.0.1:8786'
    """
    found = _SCHEDULER_ADDRESS.match(address)
    if address.startswith("inproc://") or (
        found is not None and 0 < int(found.group("port")) < 65536
    ):
        return address
    raise ConfigError(
        f"{name}={address!r} is not a scheduler address; use one like "
        "'tcp://127.0.0.1:8786' (host:port, with tcp:// or tls://)"
    )


def _check_int(name: str, value: object, minimum: int, example: int) -> int:
    if not _is_int(value) or value < minimum:  # type: ignore[operator]
        raise ConfigError(
            f"{name}={value!r} must be an int >= {minimum}; use e.g. {name}={example}"
        )
    return int(value)  # type: ignore[call-overload]


def check_arguments(arguments: Sequence[Any] | None) -> list[Any]:
    """Check the script's ``arguments``: they start with an option, and no
    option takes the name of a config parameter.

    >>> check_arguments(["--model", "m1", "--top", 3])
    ['--model', 'm1', '--top', 3]
    """
    if arguments is None:
        return []
    if isinstance(arguments, (str, bytes)) or not isinstance(arguments, Sequence):
        raise ConfigError(
            f"arguments={arguments!r} must be a list; use e.g. ['--model', 'm1']"
        )
    args = list(arguments)
    if args and not (isinstance(args[0], str) and args[0].startswith("-")):
        raise ConfigError(
            f"arguments={args!r} must start with an option such as '--name', "
            f"not {args[0]!r}; use e.g. ['--model', 'm1']"
        )
    for arg in args:
        if isinstance(arg, str) and arg.startswith("-"):
            option = arg.lstrip("-").split("=", 1)[0].replace("-", "_")
            if option in RESERVED_ARGUMENTS:
                raise ConfigError(
                    f"argument {arg!r} is reserved: {option} is a parameter of "
                    "ParallelRunConfig/ParallelRunStep; set it there, or rename "
                    "the script's option"
                )
    return args


def check_entry_script(entry_script: object, source_directory: object) -> Path:
    """Check that the entry script exists and defines ``init`` and ``run``.

    The script is parsed, not run: importing it on the client could load a
    model or need packages only the workers have.
    """
    if not isinstance(entry_script, (str, os.PathLike)) or not str(entry_script):
        raise ConfigError(
            f"entry_script={entry_script!r} must be the path of a Python file, "
            "like 'score.py'"
        )
    if source_directory is not None:
        src = Path(source_directory)  # type: ignore[arg-type]
        if not src.is_dir():
            raise ConfigError(
                f"source_directory={str(source_directory)!r} is not a folder; "
                "give the folder that holds the entry script"
            )
        path = src / entry_script
    else:
        path = Path(entry_script)
    if not path.is_file():
        where = (
            f" in source_directory={str(source_directory)!r}"
            if (source_directory is not None)
            else ""
        )
        raise ConfigError(
            f"entry_script={str(entry_script)!r} does not exist{where}; "
            "give the path of the script that defines init() and run(mini_batch)"
        )
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as e:
        raise ConfigError(
            f"entry_script={str(path)!r} is not valid Python: {e.msg} "
            f"(line {e.lineno}); fix the script"
        ) from None
    defined: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
    missing = [f for f in ("init", "run") if f not in defined]
    if missing:
        raise ConfigError(
            f"entry_script={str(path)!r} does not define "
            + " and ".join(f"{m}()" for m in missing)
            + "; add 'def init():' (load the model) and "
            "'def run(mini_batch):' (return one result per input)"
        )
    return path.resolve()


class PipelineParameter:
    """A value chosen when a pipeline is submitted.

    It may stand for ``mini_batch_size``, ``process_count_per_node``,
    ``node_count``, ``error_threshold``, ``logging_level``,
    ``run_invocation_timeout``, ``run_max_try`` and ``partition_keys`` (a
    list, a JSON list as Azure ML passes it, or ``"a,b"``), or for an input
    data set.
    ``Experiment.submit(pipeline, pipeline_parameters={name: value})``
    overrides ``default_value``.

    >>> PipelineParameter(name="batch_size_param", default_value="5")
    PipelineParameter(name='batch_size_param', default_value='5')
    """

    def __init__(self, name: str, default_value: Any):
        if not isinstance(name, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise ConfigError(
                f"PipelineParameter name {name!r} is not valid; use letters, digits "
                "and '_', e.g. 'batch_size_param'"
            )
        self.name = name
        self.default_value = default_value

    def __repr__(self) -> str:
        return (
            f"PipelineParameter(name={self.name!r}, "
            f"default_value={self.default_value!r})"
        )


def check_parameter_names(
    values: Mapping[str, Any], known: Sequence[PipelineParameter]
) -> None:
    """Every name in ``values`` must be a known parameter.

    >>> check_parameter_names({"batch": 1}, [PipelineParameter("batch_size", 5)])
    Traceback (most recent call last):
    ...
    daskrun.exceptions.ConfigError: unknown pipeline parameter 'batch'; this \
pipeline's parameters are: batch_size
    """
    names = sorted({p.name for p in known})
    for name in values:
        if name not in names:
            raise ConfigError(
                f"unknown pipeline parameter {name!r}; this pipeline's parameters "
                f"are: {', '.join(names) or 'none'}"
            )


# the ParallelRunConfig parameters a PipelineParameter may stand for
PARAMETERIZABLE = (
    "mini_batch_size",
    "process_count_per_node",
    "node_count",
    "error_threshold",
    "logging_level",
    "run_invocation_timeout",
    "run_max_try",
    "partition_keys",
)


class Environment:
    """The Python environment a step's workers must have.

    Parameters
    ----------
    name : str
    pip_packages : list of str, optional
        Requirements (``"pillow"``, ``"tensorflow-cpu>=2.16"``) checked on
        every worker before the job starts: daskrun runs in the workers'
        existing environment and reports what is missing instead of
        installing it.
    environment_variables : dict, optional
        Set on every worker before ``init()``.

    Attributes
    ----------
    python : PythonSection
        Azure ML's ``env.python``: the packages of
        ``env.python.conda_dependencies`` (a :class:`CondaDependencies`) are
        checked with ``pip_packages``.
    docker : DockerSection
        Azure ML's ``env.docker`` (``enabled``, ``base_image``): accepted
        and unused, as workers run in their existing environment.
    spark, databricks : SparkSection, DatabricksSection
        Azure ML's Spark and Databricks settings (``spark.precache_packages``,
        ``spark.packages``, ``databricks.pypi_libraries``, ...): accepted,
        kept, and of no effect locally.
    r : None
        Azure ML's R section (``None`` unless set): kept, of no effect.
    inferencing_stack_version : str or None
        Kept, of no effect: daskrun serves no web service.

    Examples
    --------
    >>> env = Environment("batch")
    >>> env.python.conda_dependencies = CondaDependencies.create(
    ...     pip_packages=["pillow", "azureml-core"])
    >>> env.pip_packages
    ['pillow']
    """

    def __init__(
        self,
        name: str,
        pip_packages: Sequence[str] | None = None,
        environment_variables: Mapping[str, str] | None = None,
    ):
        self.name = name
        self._pip_packages = _requirements("pip_packages", pip_packages or [])
        self.environment_variables = dict(environment_variables or {})
        self.python = PythonSection()
        self.docker = DockerSection()
        self.spark = SparkSection()
        self.databricks = DatabricksSection()
        self.r: Any = None
        self.inferencing_stack_version: str | None = None

    @property
    def pip_packages(self) -> list[str]:
        """What every worker must have: ``pip_packages`` and the packages of
        ``python.conda_dependencies``; Azure ML's own (``azureml-*``) are
        daskrun's to provide and are left out."""
        conda = self.python.conda_dependencies
        extra = [] if conda is None else conda.requirements()
        found = [
            *self._pip_packages,
            *(p for p in extra if p not in self._pip_packages),
        ]
        return [p for p in found if not _is_azureml(p)]

    @pip_packages.setter
    def pip_packages(self, value: Sequence[str]) -> None:
        self._pip_packages = _requirements("pip_packages", value)

    def __repr__(self) -> str:
        return f"Environment(name={self.name!r}, pip_packages={self.pip_packages!r})"


# Azure ML's base images, for env.docker.base_image: recorded, not pulled
DEFAULT_CPU_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu20.04"
DEFAULT_GPU_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-cuda11.1-cudnn8-ubuntu20.04"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _requirements(what: str, packages: Sequence[str]) -> list[str]:
    """``packages`` as a list, each checked to be a pip requirement."""
    from packaging.requirements import InvalidRequirement, Requirement

    if isinstance(packages, str):
        raise ConfigError(
            f"{what}={packages!r} is one string; pass a list, e.g. [{packages!r}]"
        )
    for package in packages:
        try:
            Requirement(package)
        except InvalidRequirement:
            raise ConfigError(
                f"{what} item {package!r} is not a requirement; use e.g. "
                "'pillow' or 'tensorflow-cpu>=2.16'"
            ) from None
    return list(packages)


def _is_azureml(requirement: str) -> bool:
    found = _NAME.match(requirement)
    return found is not None and found.group().lower().startswith("azureml")


class PythonSection:
    """Azure ML's ``Environment.python``: ``conda_dependencies`` is checked;
    ``user_managed_dependencies`` and ``interpreter_path`` are accepted and
    unused (workers run in their existing environment)."""

    def __init__(self) -> None:
        self.conda_dependencies: CondaDependencies | None = None
        self.user_managed_dependencies = False
        self.interpreter_path = "python"


class DockerSection:
    """Azure ML's ``Environment.docker``: accepted and unused."""

    def __init__(self) -> None:
        self.enabled = False
        self.base_image: str | None = DEFAULT_CPU_IMAGE
        self.base_dockerfile: str | None = None


class SparkSection:
    """Azure ML's ``Environment.spark``: accepted, kept, no effect locally
    (daskrun runs no Spark)."""

    def __init__(self) -> None:
        self.repositories: list[str] = []
        self.packages: list[Any] = []
        self.precache_packages = True


class DatabricksSection:
    """Azure ML's ``Environment.databricks``: accepted, kept, no effect
    locally (daskrun runs no Databricks cluster)."""

    def __init__(self) -> None:
        self.maven_libraries: list[Any] = []
        self.pypi_libraries: list[Any] = []
        self.rcran_libraries: list[Any] = []
        self.jar_libraries: list[Any] = []
        self.egg_libraries: list[Any] = []


class CondaDependencies:
    """Azure ML's package list of an :class:`Environment`; daskrun checks its
    packages on every worker, as ``Environment(pip_packages=...)``.

    Pip packages are checked by name and version; conda packages by name
    (conda's version syntax is not pip's; ``python`` and ``pip`` are left
    out). Channels and ``pip_indexurl`` are kept and unused: nothing is
    installed.

    >>> deps = CondaDependencies.create(pip_packages=["pillow"],
    ...                                 conda_packages=["numpy=1.26"])
    >>> deps.requirements()
    ['pillow', 'numpy']
    """

    def __init__(self, conda_dependencies_file_path: str | None = None, **_: Any):
        self._pip: list[str] = []
        self._conda: list[str] = []
        self.channels: list[str] = []
        self.pip_indexurl: str | None = None
        self.python_version: str | None = None
        if conda_dependencies_file_path is not None:
            self._load(conda_dependencies_file_path)

    @staticmethod
    def create(
        pip_indexurl: str | None = None,
        pip_packages: Sequence[str] | None = None,
        conda_packages: Sequence[str] | None = None,
        python_version: str | None = None,
        pin_sdk_version: bool = True,
    ) -> CondaDependencies:
        """A package list; ``python_version`` is recorded, not installed."""
        deps = CondaDependencies()
        deps.pip_indexurl = pip_indexurl
        deps.python_version = python_version
        for package in _requirements("pip_packages", pip_packages or []):
            deps.add_pip_package(package)
        for package in conda_packages or []:
            deps.add_conda_package(package)
        return deps

    def _load(self, path: str) -> None:
        try:
            with open(path) as f:
                spec = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(
                f"conda_dependencies_file_path={path!r} cannot be read ({e}); "
                "pass a conda environment file (name, channels, dependencies)"
            ) from None
        self.channels = list(spec.get("channels") or [])
        for dep in spec.get("dependencies") or []:
            if isinstance(dep, dict):
                for package in dep.get("pip") or []:
                    self.add_pip_package(package)
            else:
                self.add_conda_package(str(dep))

    def add_pip_package(self, pip_package: str) -> None:
        (package,) = _requirements("pip_packages", [pip_package])
        if package not in self._pip:
            self._pip.append(package)

    def add_conda_package(self, conda_package: str) -> None:
        if not isinstance(conda_package, str) or not _NAME.match(conda_package):
            raise ConfigError(
                f"conda_packages item {conda_package!r} is not a conda package; "
                "use e.g. 'numpy' or 'numpy=1.26'"
            )
        if conda_package not in self._conda:
            self._conda.append(conda_package)

    def add_channel(self, channel: str) -> None:
        if channel not in self.channels:
            self.channels.append(channel)

    @property
    def pip_packages(self) -> list[str]:
        return list(self._pip)

    @property
    def conda_packages(self) -> list[str]:
        return list(self._conda)

    def requirements(self) -> list[str]:
        """What the workers must have, as pip requirements."""
        names = [m.group() for m in map(_NAME.match, self._conda) if m is not None]
        conda = [n for n in names if n.lower() not in ("python", "pip")]
        return [*self._pip, *(n for n in conda if n not in self._pip)]

    def serialize_to_string(self) -> str:
        """The conda environment file these dependencies make."""
        deps: list[Any] = (
            [f"python={self.python_version}"] if self.python_version else []
        )
        deps += [*self._conda, "pip", {"pip": self._pip}]
        spec = {"name": "daskrun", "channels": self.channels, "dependencies": deps}
        return str(yaml.safe_dump(spec, sort_keys=False))

    def __repr__(self) -> str:
        return (
            f"CondaDependencies(pip_packages={self._pip!r}, "
            f"conda_packages={self._conda!r})"
        )


def missing_packages(requirements: Sequence[str]) -> list[str]:
    """The requirements not met by this process's environment, each with
    what was found (see :func:`unmet_packages`).

    >>> missing_packages(["dask", "surely-not-installed-pkg"])
    ['surely-not-installed-pkg not installed']
    """
    return [problem for problem, _ in unmet_packages(requirements)]


def unmet_packages(requirements: Sequence[str]) -> list[tuple[str, str]]:
    """The requirements not met by this process's environment, as
    ``(what is wrong, the requirement to pip install)``.

    A requirement is met by the distribution of its name, or else by the
    installed distributions that provide the module of that name:
    ``tensorflow`` by ``tensorflow-cpu``, ``PIL`` by ``pillow``. A version
    pin is compared with the version installed; the fix then names the
    installed distribution, never a second copy of the module.

    >>> unmet_packages(["dask>=1", "dask<1"])[0][0]  # doctest: +ELLIPSIS
    'dask<1 not met (dask ... installed)'
    """
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    unmet = []
    provided: Mapping[str, list[str]] | None = None
    for text in requirements:
        req = Requirement(text)
        try:
            found = [(req.name, version(req.name))]
        except PackageNotFoundError:
            if provided is None:
                from importlib.metadata import packages_distributions

                provided = packages_distributions()
            found = _providers(req.name, provided)
        if not found:
            unmet.append((f"{text} not installed", text))
            continue
        if not req.specifier or any(
            req.specifier.contains(v, prereleases=True) for _, v in found
        ):
            continue
        dist, got = found[0]
        provides = "" if dist == req.name else f", which provides {req.name}"
        unmet.append(
            (
                f"{text} not met ({dist} {got} installed{provides})",
                f"{dist}{req.specifier}",
            )
        )
    return unmet


def _providers(name: str, provided: Mapping[str, list[str]]) -> list[tuple[str, str]]:
    """``(distribution, version)`` of the installed distributions that
    provide the top-level module ``name`` (or ``name`` with ``-`` as ``_``)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.utils import canonicalize_name

    for module in dict.fromkeys((name, name.replace("-", "_"), name.lower())):
        found: list[tuple[str, str]] = []
        for dist_name in dict.fromkeys(provided.get(module, [])):
            try:
                dist = distribution(dist_name)
            except PackageNotFoundError:
                continue
            found.append(
                (canonicalize_name(dist.metadata["Name"] or dist_name), dist.version)
            )
        if found:
            return found
    return []


@dataclass(frozen=True)
class ResolvedConfig:
    """A step's parameters with every default filled in; shipped to workers."""

    entry_script: str
    source_directory: str | None
    error_threshold: int
    output_action: str
    node_count: int
    process_count_per_node: int | str | None  # "auto": chosen by the job
    mini_batch_size: object  # parsed later, against the kind of input; "auto"
    logging_level: str
    run_invocation_timeout: int
    run_max_try: int
    append_row_file_name: str
    allowed_failed_count: int | None
    allowed_failed_percent: float | None
    environment_variables: Mapping[str, str] = field(default_factory=dict)
    output_format: str = "text"
    description: str | None = None
    partition_keys: tuple[str, ...] | None = None


class ParallelRunConfig:
    """How to run an entry script over mini-batches: ParallelRunStep's config.

    Every parameter is validated here, before any worker starts. Parameters
    left at ``None`` take their defaults from ``dask.config`` (``daskrun.*``).

    Parameters
    ----------
    entry_script : str
        Python file with ``init()`` and ``run(mini_batch)``, relative to
        ``source_directory`` if that is given.
    error_threshold : int
        Failed items (files or records) tolerated over the whole input;
        ``-1`` tolerates all. Default ``daskrun.error-threshold`` (0).
    output_action : {"append_row", "summary_only"}
        Write one output file, or only count results.
    compute_target : None, str, Client or cluster
        ``None`` starts a local cluster of ``node_count ×
        process_count_per_node`` single-threaded worker processes; an address,
        a ``distributed.Client`` or a Dask cluster object is used as given.
    node_count, process_count_per_node : int
        Nodes and worker processes per node (default: one per core).
        ``process_count_per_node="auto"``: one per GPU, else per core, as
        many as the memory holds (:mod:`daskrun.engine.auto`).
    mini_batch_size : int or str
        Files per mini-batch for file inputs (default 10); bytes per
        mini-batch for tabular inputs (``"1MB"``, ``1024``, default ``"1MB"``).
        ``"auto"`` chooses it from a pilot's measured rates (files) or the
        input's size and memory (tables): see :mod:`daskrun.engine.auto`.
    run_invocation_timeout : int
        Seconds a ``run()`` call may take.
    run_max_try : int
        Tries per mini-batch before it counts as failed.
    append_row_file_name : str
        Name of the output file (default ``parallel_run_step.txt``, or
        ``.csv`` / ``.parquet`` with those formats). ``.daskrun`` and
        ``.*.partial`` are daskrun's own and refused.
    output_format : {"text", "csv", "parquet"}
        ``append_row`` output as ParallelRunStep's text lines (default), as
        CSV with a header, or as Parquet (DataFrame results keep their
        columns; a list becomes the column ``result``).
    allowed_failed_count : int, optional
        Failed mini-batches tolerated.
    allowed_failed_percent : float, optional
        Percentage (0–100) of failed mini-batches tolerated, checked once all
        mini-batches are scheduled.
    environment_variables : dict, optional
        Set on every worker before ``init()``.
    security : distributed.security.Security, optional
        TLS certificates for connecting to a ``tls://`` scheduler address.
    partition_keys : list of str, optional
        One mini-batch per distinct combination of these keys of the
        inputs' ``partition_format``, whatever its size; instead of
        ``mini_batch_size``. A JSON list (``'["user"]'``) or ``"a,b"`` works
        too, as from a PipelineParameter.

    Examples
    --------
    >>> import daskrun, pathlib, tempfile
    >>> script = pathlib.Path(tempfile.mkdtemp()) / "score.py"
    >>> _ = script.write_text("def init(): pass\\ndef run(mb): return mb\\n")
    >>> cfg = daskrun.ParallelRunConfig(str(script), error_threshold=10,
    ...                                 output_action="append_row",
    ...                                 mini_batch_size=5)
    >>> cfg.resolved.run_max_try
    3
    """

    def __init__(
        self,
        entry_script: str,
        error_threshold: int | None = None,
        output_action: str | None = None,
        compute_target: Any = None,
        node_count: int | None = None,
        process_count_per_node: int | str | None = None,
        mini_batch_size: int | str | None = None,
        source_directory: str | None = None,
        environment: Any = None,
        description: str | None = None,
        logging_level: str | None = None,
        run_invocation_timeout: int | None = None,
        run_max_try: int | None = None,
        append_row_file_name: str | None = None,
        allowed_failed_count: int | None = None,
        allowed_failed_percent: float | None = None,
        environment_variables: Mapping[str, str] | None = None,
        output_format: str | None = None,
        security: Any = None,
        partition_keys: Sequence[str] | str | None = None,
    ):
        if isinstance(compute_target, str):
            check_scheduler_address(compute_target)
        self.compute_target = compute_target
        # distributed.security.Security for TLS scheduler connections; kept
        # on the client (it names key files), never shipped to workers
        self.security = security
        if environment is not None and not isinstance(environment, Environment):
            raise ConfigError(
                f"environment={environment!r} is not an Environment; use "
                "Environment(name, pip_packages=[...])"
            )
        self.environment = environment
        self._kwargs: dict[str, Any] = dict(
            entry_script=entry_script,
            error_threshold=error_threshold,
            output_action=output_action,
            node_count=node_count,
            process_count_per_node=process_count_per_node,
            mini_batch_size=mini_batch_size,
            source_directory=source_directory,
            description=description,
            logging_level=logging_level,
            run_invocation_timeout=run_invocation_timeout,
            run_max_try=run_max_try,
            append_row_file_name=append_row_file_name,
            allowed_failed_count=allowed_failed_count,
            allowed_failed_percent=allowed_failed_percent,
            environment_variables=environment_variables,
            output_format=output_format,
            partition_keys=partition_keys,
        )
        self.parameters: dict[str, PipelineParameter] = {}
        for key, value in self._kwargs.items():
            if isinstance(value, PipelineParameter):
                if key not in PARAMETERIZABLE:
                    raise ConfigError(
                        f"{key} cannot be a PipelineParameter; only "
                        f"{', '.join(PARAMETERIZABLE)} can"
                    )
                self.parameters[key] = value
        # the defaults are checked now, like any value
        self.resolved = self._resolve({})

    def _resolve(self, values: Mapping[str, Any]) -> ResolvedConfig:
        kwargs = dict(self._kwargs)
        for key, param in self.parameters.items():
            kwargs[key] = values.get(param.name, param.default_value)
        return _resolve(environment=self.environment, **kwargs)

    def bind(self, values: Mapping[str, Any]) -> ParallelRunConfig:
        """This config with its PipelineParameters set from ``values`` (by
        parameter name; others keep their defaults)."""
        bound = copy.copy(self)
        bound.resolved = self._resolve(values)
        return bound

    def __getattr__(self, name: str) -> Any:
        # cfg.run_max_try etc. read the resolved values
        resolved = self.__dict__.get("resolved")
        if resolved is not None and name in resolved.__dataclass_fields__:
            return getattr(resolved, name)
        raise AttributeError(name)

    def __repr__(self) -> str:
        r = self.resolved
        return (
            f"ParallelRunConfig(entry_script={r.entry_script!r}, "
            f"mini_batch_size={r.mini_batch_size!r}, "
            f"error_threshold={r.error_threshold}, output_action={r.output_action!r})"
        )


def _pick(value: Any, key: str) -> Any:
    return config_get(key) if value is None else value


# the parameters that default to a dask.config value, and its key
_CONFIG_KEYS = {
    "error_threshold": "error-threshold",
    "output_action": "output-action",
    "node_count": "node-count",
    "process_count_per_node": "process-count-per-node",
    "logging_level": "logging-level",
    "run_invocation_timeout": "run-invocation-timeout",
    "run_max_try": "run-max-try",
    "output_format": "output-format",
    "append_row_file_name": "append-row-file-name",
    "allowed_failed_count": "allowed-failed-count",
    "allowed_failed_percent": "allowed-failed-percent",
}


def _resolve(**kw: Any) -> ResolvedConfig:
    """Fill defaults from dask.config and validate every parameter; a bad
    default names the environment variable that set it, if one did."""
    taken = {p: key for p, key in _CONFIG_KEYS.items() if kw[p] is None}
    with named_as_set(taken):
        return _resolve_values(**kw)


def _resolve_values(**kw: Any) -> ResolvedConfig:
    source_directory = kw["source_directory"]
    script = check_entry_script(kw["entry_script"], source_directory)

    error_threshold = _check_int(
        "error_threshold", _pick(kw["error_threshold"], "error-threshold"), -1, 10
    )
    output_action = _pick(kw["output_action"], "output-action")
    if output_action not in OUTPUT_ACTIONS:
        raise ConfigError(
            f"output_action={output_action!r} is not one of "
            f"{', '.join(map(repr, OUTPUT_ACTIONS))}; use output_action='append_row'"
        )
    node_count = _check_int("node_count", _pick(kw["node_count"], "node-count"), 1, 1)
    pcpn = _pick(kw["process_count_per_node"], "process-count-per-node")
    if is_auto(pcpn):
        pcpn = AUTO  # chosen by the job, before the cluster starts
    elif pcpn is not None:
        pcpn = _check_int("process_count_per_node", pcpn, 1, 2)

    mbs = kw["mini_batch_size"]
    if is_auto(mbs):
        mbs = AUTO  # chosen by the job (daskrun.engine.auto)
    elif mbs is not None and not (
        _is_int(mbs) or (isinstance(mbs, str) and _BYTE_SIZE.match(mbs.strip()))
    ):
        # checked fully once the kind of input is known; catch nonsense now
        raise ConfigError(
            f"mini_batch_size={mbs!r} is not a number of files nor a size in bytes; "
            "use an int like 10 (files), a string like '1MB' (tabular), or "
            "'auto'"
        )
    if mbs is not None and _is_int(mbs) and mbs < 1:
        raise ConfigError(f"mini_batch_size={mbs!r} must be at least 1")
    partition_keys = parse_partition_keys(kw["partition_keys"])
    if partition_keys is not None and mbs == AUTO:
        raise ConfigError(
            f"partition_keys={list(partition_keys)!r} and mini_batch_size='auto' "
            "were both given; partition_keys makes one mini-batch per partition, "
            "whatever its size, so there is no size to choose: drop "
            "mini_batch_size='auto' (or partition_keys)"
        )
    if partition_keys is not None and mbs is not None:
        raise ConfigError(
            f"partition_keys={list(partition_keys)!r} and mini_batch_size={mbs!r} "
            "were both given; partition_keys makes one mini-batch per partition, "
            "whatever its size: drop mini_batch_size (or partition_keys)"
        )

    level = str(_pick(kw["logging_level"], "logging-level")).upper()
    if level not in LOGGING_LEVELS:
        raise ConfigError(
            f"logging_level={kw['logging_level']!r} is not a logging level; use one "
            f"of {', '.join(LOGGING_LEVELS)}"
        )
    timeout = _check_int(
        "run_invocation_timeout",
        _pick(kw["run_invocation_timeout"], "run-invocation-timeout"),
        1,
        60,
    )
    max_try = _check_int("run_max_try", _pick(kw["run_max_try"], "run-max-try"), 1, 3)

    output_format = _pick(kw["output_format"], "output-format")
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(
            f"output_format={output_format!r} is not one of "
            f"{', '.join(map(repr, OUTPUT_FORMATS))}; use output_format='csv' for "
            "CSV with a header"
        )
    file_name = kw["append_row_file_name"]
    if file_name is None:
        default = str(config_get("append-row-file-name"))
        ext = {"csv": ".csv", "parquet": ".parquet"}.get(output_format)
        file_name = default.rsplit(".", 1)[0] + ext if ext else default
    if (
        not isinstance(file_name, str)
        or not file_name
        or "/" in file_name
        or "\\" in file_name
        or file_name in (".", "..")
    ):
        raise ConfigError(
            f"append_row_file_name={file_name!r} must be a plain file name; use e.g. "
            "'parallel_run_step.txt'"
        )
    # daskrun's own names in the output folder: its bookkeeping folder (parts,
    # the run lock) and the temporary files an earlier daskrun left beside the
    # output file, .<name>.<hex>.partial, which data sets never list
    if file_name == ".daskrun" or (
        file_name.startswith(".") and file_name.endswith(".partial")
    ):
        raise ConfigError(
            f"append_row_file_name={file_name!r} is a name daskrun writes itself "
            "in the output folder ('.daskrun', '.*.partial'); use another, e.g. "
            "'parallel_run_step.txt'"
        )

    afc = _pick(kw["allowed_failed_count"], "allowed-failed-count")
    if afc is not None:
        afc = _check_int("allowed_failed_count", afc, -1, 5)
        if afc == -1:
            afc = None
    afp = _pick(kw["allowed_failed_percent"], "allowed-failed-percent")
    if afp is not None:
        if (
            not isinstance(afp, (int, float))
            or isinstance(afp, bool)
            or not (0 <= afp <= 100)
        ):
            raise ConfigError(
                f"allowed_failed_percent={afp!r} must be a number from 0 to 100; "
                "use e.g. allowed_failed_percent=5"
            )
        afp = float(afp)

    env_vars: dict[str, str] = {}
    environment = kw["environment"]
    for source in (
        getattr(environment, "environment_variables", None),
        kw["environment_variables"],
    ):
        if source is None:
            continue
        if not isinstance(source, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in source.items()
        ):
            raise ConfigError(
                "environment_variables must map names to string values; use e.g. "
                "{'OMP_NUM_THREADS': '1'}"
            )
        env_vars.update(source)

    return ResolvedConfig(
        entry_script=str(script),
        source_directory=(
            str(Path(source_directory).resolve()) if source_directory else None
        ),
        error_threshold=error_threshold,
        output_action=output_action,
        node_count=node_count,
        process_count_per_node=pcpn,
        mini_batch_size=mbs,
        logging_level=logging.getLevelName(logging.getLevelName(level)),
        run_invocation_timeout=timeout,
        run_max_try=max_try,
        append_row_file_name=file_name,
        allowed_failed_count=afc,
        allowed_failed_percent=afp,
        environment_variables=env_vars,
        description=kw["description"],
        output_format=output_format,
        partition_keys=partition_keys,
    )
