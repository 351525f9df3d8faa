"""A step's settings: ``ParallelRunConfig``, reading ``dask.config``, and
resolving every parameter to a value.

Everything here is plain data and pure functions. A parameter left at ``None``
takes its value from ``dask.config`` (namespace ``daskrun``, defaults in
``daskrun.yaml``). Values are resolved once, on the client, into a frozen
:class:`ResolvedConfig` that is shipped to the workers. The rules for names
are in :mod:`daskrun.engine.naming`, the workers' environment in
:mod:`daskrun.engine.environment`.
"""

from __future__ import annotations

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
from daskrun.backends.outputs import FORMATS
from daskrun.engine.auto import AUTO, is_auto
from daskrun.engine.environment import Environment
from daskrun.engine.naming import (
    PARAMETERIZABLE,
    PipelineParameter,
    check_entry_script,
    check_scheduler_address,
)
from daskrun.exceptions import ConfigError

_defaults_file = Path(__file__).parent.parent / "daskrun.yaml"
with _defaults_file.open() as _f:
    _defaults = yaml.safe_load(_f)
dask.config.update_defaults(_defaults)

OUTPUT_ACTIONS = ("append_row", "summary_only")
OUTPUT_FORMATS = tuple(FORMATS)  # ("text", "csv", "parquet")
LOGGING_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_BYTE_SIZE = re.compile(r"^(\d+)([kKmMgG][bB])?$")
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


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


def _check_int(name: str, value: object, minimum: int, example: int) -> int:
    if not _is_int(value) or value < minimum:  # type: ignore[operator]
        raise ConfigError(
            f"{name}={value!r} must be an int >= {minimum}; use e.g. {name}={example}"
        )
    return int(value)  # type: ignore[call-overload]


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
    # checked in this order: the first bad value is the one reported
    source_directory = kw["source_directory"]
    script = check_entry_script(kw["entry_script"], source_directory)
    error_threshold = _check_int(
        "error_threshold", _pick(kw["error_threshold"], "error-threshold"), -1, 10
    )
    output_action = _output_action(_pick(kw["output_action"], "output-action"))
    node_count = _check_int("node_count", _pick(kw["node_count"], "node-count"), 1, 1)
    pcpn = _process_count(_pick(kw["process_count_per_node"], "process-count-per-node"))
    mbs = _mini_batch_size(kw["mini_batch_size"])
    partition_keys = _partition_keys(kw["partition_keys"], mbs)
    level = _logging_level(kw["logging_level"])
    timeout = _check_int(
        "run_invocation_timeout",
        _pick(kw["run_invocation_timeout"], "run-invocation-timeout"),
        1,
        60,
    )
    max_try = _check_int("run_max_try", _pick(kw["run_max_try"], "run-max-try"), 1, 3)
    output_format = _output_format(_pick(kw["output_format"], "output-format"))
    file_name = _file_name(kw["append_row_file_name"], output_format)
    afc = _allowed_failed_count(
        _pick(kw["allowed_failed_count"], "allowed-failed-count")
    )
    afp = _allowed_failed_percent(
        _pick(kw["allowed_failed_percent"], "allowed-failed-percent")
    )
    env_vars = _environment_variables(kw["environment"], kw["environment_variables"])
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


def _output_action(output_action: Any) -> str:
    if output_action not in OUTPUT_ACTIONS:
        raise ConfigError(
            f"output_action={output_action!r} is not one of "
            f"{', '.join(map(repr, OUTPUT_ACTIONS))}; use output_action='append_row'"
        )
    return str(output_action)


def _process_count(pcpn: Any) -> int | str | None:
    if is_auto(pcpn):
        return AUTO  # chosen by the job, before the cluster starts
    if pcpn is not None:
        return _check_int("process_count_per_node", pcpn, 1, 2)
    return None


def _mini_batch_size(mbs: Any) -> Any:
    if is_auto(mbs):
        return AUTO  # chosen by the job (daskrun.engine.auto)
    if mbs is not None and not (
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
    return mbs


def _partition_keys(value: Any, mbs: Any) -> tuple[str, ...] | None:
    partition_keys = parse_partition_keys(value)
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
    return partition_keys


def _logging_level(given: Any) -> str:
    level = str(_pick(given, "logging-level")).upper()
    if level not in LOGGING_LEVELS:
        raise ConfigError(
            f"logging_level={given!r} is not a logging level; use one "
            f"of {', '.join(LOGGING_LEVELS)}"
        )
    return level


def _output_format(output_format: Any) -> str:
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(
            f"output_format={output_format!r} is not one of "
            f"{', '.join(map(repr, OUTPUT_FORMATS))}; use output_format='csv' for "
            "CSV with a header"
        )
    return str(output_format)


def _file_name(file_name: Any, output_format: str) -> str:
    if file_name is None:
        default = str(config_get("append-row-file-name"))
        ext = FORMATS[output_format].extension
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
    return file_name


def _allowed_failed_count(afc: Any) -> int | None:
    if afc is None:
        return None
    afc = _check_int("allowed_failed_count", afc, -1, 5)
    return None if afc == -1 else afc


def _allowed_failed_percent(afp: Any) -> float | None:
    if afp is None:
        return None
    if (
        not isinstance(afp, (int, float))
        or isinstance(afp, bool)
        or not (0 <= afp <= 100)
    ):
        raise ConfigError(
            f"allowed_failed_percent={afp!r} must be a number from 0 to 100; "
            "use e.g. allowed_failed_percent=5"
        )
    return float(afp)


def _environment_variables(environment: Any, given: Any) -> dict[str, str]:
    env_vars: dict[str, str] = {}
    for source in (getattr(environment, "environment_variables", None), given):
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
    return env_vars
