"""Naming rules a step's values must follow, checked before any worker starts.

Step names, registry names, scheduler addresses, the options of a script's
``arguments`` (none may take a config parameter's name), the entry script
(it must define ``init`` and ``run``) and pipeline parameters
(:class:`PipelineParameter`). Plain functions of their arguments; the
entry script is parsed, never run.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from daskrun.exceptions import ConfigError

_STEP_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# the whole name: a registry name names folders (models/<name>/<version>),
# so "/" and ".." must never pass
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

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


def check_name(kind: str, name: object) -> str:
    """A registry name: letters, digits, ``_ . -``; starts alphanumeric.

    >>> check_name("datastore", "mnist_datastore")
    'mnist_datastore'
    >>> check_name("model", "m/../../elsewhere")
    Traceback (most recent call last):
    ...
    daskrun.exceptions.ConfigError: model name 'm/../../elsewhere' is not valid; ...
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
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
