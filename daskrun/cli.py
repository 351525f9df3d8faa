"""The ``daskrun`` command.

Exit status: 0 the job completed, 1 the job failed, 2 bad usage or invalid
input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daskrun.backends.compute.cluster import (
    SharedCluster,
    default_process_count,
    serve_shared_cluster,
    start_timeout,
    stop_shared_cluster,
)
from daskrun.backends.inputs.datasets import Dataset, FileDataset, TabularDataset
from daskrun.backends.storage import private_folder, private_open
from daskrun.cliparser import build_parser
from daskrun.engine.config import (
    ParallelRunConfig,
    env_named,
)
from daskrun.engine.environment import unmet_packages
from daskrun.engine.job import Interrupted
from daskrun.engine.naming import check_scheduler_address
from daskrun.exceptions import ConfigError, DaskRunError, InputError
from daskrun.monitoring.console import failure_lines
from daskrun.monitoring.handlers import shown_by_console
from daskrun.monitoring.monitor import FAILED_ITEMS
from daskrun.monitoring.report import write_report
from daskrun.registry.hpc import MpiCompute
from daskrun.registry.records import RunRecord, runs_dir
from daskrun.registry.step import ParallelRunStep, StepRun, resume
from daskrun.registry.stepoutputs import from_cli
from daskrun.registry.workspace import Workspace


def _step_name(script: str) -> str:
    stem = os.path.splitext(os.path.basename(script))[0].lower()
    name = re.sub(r"[^a-z0-9-]+", "-", stem).strip("-")[:32].rstrip("-")
    if not re.match(r"^[a-z]", name) or len(name) < 3:
        name = f"run-{name}".rstrip("-")[:32]
    return name if len(name) >= 3 else "daskrun-step"


def _script_and_source(script: str, source: str | None) -> tuple[str, str | None]:
    """The entry script and the folder shipped with it: by default the
    script's folder, so that the modules beside it import on the workers as
    they do for ``python path/score.py``."""
    path = Path(script)
    if source is None:
        if not path.is_file():  # ParallelRunConfig names it
            return script, None
        return path.name, str(path.resolve().parent)
    if not (Path(source) / script).is_file() and path.is_file():
        # a script path given from here, inside the source directory
        try:
            return path.resolve().relative_to(Path(source).resolve()).as_posix(), source
        except ValueError:
            pass
    return script, source


def _datasets(
    paths: Sequence[str], tabular: bool, partition_format: str | None = None
) -> FileDataset | TabularDataset:
    if not tabular:
        return Dataset.File.from_files(list(paths), partition_format=partition_format)
    parquet = [p.rstrip("/").endswith((".parquet", ".pq")) for p in paths]
    if all(parquet):
        return Dataset.Tabular.from_parquet_files(
            list(paths), partition_format=partition_format
        )
    if any(parquet):
        raise InputError(
            f"--input mixes Parquet and CSV paths {list(paths)!r}; run them as two jobs"
        )
    # a folder of Parquet files is named by its contents
    files = Dataset.File.from_files(list(paths)).files()
    if all(f.endswith((".parquet", ".pq")) for f in files):
        return Dataset.Tabular.from_parquet_files(
            list(paths), partition_format=partition_format
        )
    return Dataset.Tabular.from_delimited_files(
        list(paths), partition_format=partition_format
    )


def _cmd_run(args: argparse.Namespace, script_args: list[str]) -> int:
    target: Any = args.scheduler
    if args.mpi:  # first: the other ranks serve from here, and exit
        if target is not None:
            raise ConfigError("--mpi and --scheduler are both given; use one")
        target = MpiCompute.initialize()
    mbs: int | str | None = args.mini_batch_size
    if isinstance(mbs, str) and mbs.isdigit():
        mbs = int(mbs)
    script, source = _script_and_source(args.script, args.source_directory)
    config = ParallelRunConfig(
        entry_script=script,
        error_threshold=args.error_threshold,
        output_action=args.output_action,
        compute_target=target,
        node_count=args.nodes,
        process_count_per_node=args.processes,
        mini_batch_size=mbs,
        source_directory=source,
        logging_level=args.logging_level,
        run_invocation_timeout=args.timeout,
        run_max_try=args.max_tries,
        append_row_file_name=args.append_row_file_name,
        output_format=args.output_format,
        allowed_failed_count=args.allowed_failed_count,
        allowed_failed_percent=args.allowed_failed_percent,
        partition_keys=args.partition_keys,
    )
    step = ParallelRunStep(
        name=args.name or _step_name(args.script),
        parallel_run_config=config,
        inputs=[_datasets(args.input, args.tabular, args.partition_format)],
        output=args.output,
        arguments=script_args,
        outputs=from_cli(args.outputs),
        incremental=args.incremental,
    )
    shown = not args.quiet
    return _report(step.run(show_output=shown, workspace=_workspace(args)), shown)


def _workspace(args: argparse.Namespace) -> Workspace | None:
    if args.workspace:
        return Workspace(args.workspace)
    return Workspace.nearest()


def _root(args: argparse.Namespace) -> Path:
    ws = _workspace(args)
    return ws.runs_dir if ws is not None else runs_dir()


def _cmd_runs_list(args: argparse.Namespace) -> int:
    records = RunRecord.find(_root(args))
    if args.json:
        for r in records:
            print(json.dumps(_summary(r)))
        return 0
    if not records:
        print(f"no runs in {_root(args)}")
        return 0
    rows = [("RUN ID", "TYPE", "STATUS", "CREATED", "ITEMS OK/TOTAL", "OUTPUT")]
    for r in records:
        c = r.counts
        items = f"{c.get('items_succeeded', 0)}/{c.get('items_total', 0)}" if c else "-"
        rows.append(
            (r.run_id, r.type, r.status, r.created, items, r.output_path or "-")
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]))
    return 0


def _summary(r: RunRecord) -> dict[str, Any]:
    return {
        "run_id": r.run_id,
        "type": r.type,
        "name": r.name,
        "experiment": r.experiment,
        "parent_id": r.parent_id,
        "status": r.status,
        "created": r.created,
        "ended": r.ended,
        "error": r.error,
        "parameters": r.parameters,
        "counts": r.counts,
        "output_path": r.output_path,
        "outputs": r.outputs,
        "logs_dir": r.logs_dir,
        "failed_items": _failed_items(r),
        "reused_from": r.reused_from,
        "source_digests": r.source_digests,
        "metrics": r.metrics,
        "tags": r.tags,
    }


def _failed_items(r: RunRecord) -> dict[str, Any] | None:
    """How many inputs of a run failed, and the file that lists them."""
    count = r.counts.get("items_failed", 0)
    if not count:
        return None
    logs = Path(r.logs_dir) if r.logs_dir else r.folder / "logs"
    return {"count": count, "csv": str(logs / FAILED_ITEMS)}


def _cmd_runs_show(args: argparse.Namespace) -> int:
    root = _root(args)
    record = RunRecord.load(args.run_id, root)
    steps = RunRecord.find(root, parent_id=record.run_id)
    for step in steps:  # what their entry scripts logged on run.parent
        record.metrics.update(step.parent_logged.get("metrics", {}))
        record.tags.update(step.parent_logged.get("tags", {}))
    if args.json:
        print(json.dumps({**_summary(record), "steps": [_summary(s) for s in steps]}))
        return 0
    for key, value in _summary(record).items():
        if value in (None, {}, []):
            continue
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    for step in steps:
        c = step.counts
        print(
            f"step {step.name}: {step.status} run {step.run_id}"
            + (f" (reused {step.reused_from})" if step.reused_from else "")
            + (
                f", {c.get('items_succeeded', 0)}/{c.get('items_total', 0)} items ok"
                if c
                else ""
            )
        )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    example = Path(__file__).resolve().parent.parent / "examples/mnist/pipeline.py"
    if not example.is_file():
        raise ConfigError(
            f"{example} is missing; 'daskrun demo' runs from a clone of the "
            "daskrun repository (pip install -e '.[examples]')"
        )
    unmet = unmet_packages(["tensorflow-cpu", "pillow", "scikit-learn"])
    if unmet:
        raise ConfigError(
            f"the demo needs {'; '.join(problem for problem, _ in unmet)}; install "
            "them with pip install -e '.[examples]' (scripts/demo does)"
        )
    command = [
        sys.executable,
        str(example),
        "--dir",
        args.dir,
        "--images",
        str(args.images),
        "--processes",
        str(args.processes),
    ]
    return subprocess.run(command, check=False).returncode


def _report(run: StepRun, shown: bool) -> int:
    """The run's last lines: where its output and logs are; of one that
    did not complete, the resume hint and the cause
    (:func:`~daskrun.monitoring.console.failure_lines`), unless the job ``shown``
    printed them."""
    if run.status == "Completed":
        print(f"output: {run.output_path or '-'}")
        print(f"logs: {run.logs_dir}")
        return 0
    if not (shown and run.status == "Failed"):  # else the job printed them
        for line in failure_lines(
            run.run_id, run.logs_dir, run.status, run.error, run.mini_batches_failed
        ):
            print(line, file=sys.stderr)
    return 1


def _cmd_cluster(args: argparse.Namespace) -> int:
    command = args.cluster_command
    if command == "serve":
        serve_shared_cluster(args.processes)
        return 0
    if command == "stop":
        stopped = stop_shared_cluster()
        print(
            f"daskrun: stopped the cluster at {stopped.address}"
            if stopped
            else "daskrun: no cluster is running"
        )
        return 0
    if command == "status":
        running = SharedCluster.find()
        print(f"daskrun: {running.describe()}" if running else "daskrun: not running")
        return 0 if running else 1
    processes = default_process_count() if args.processes is None else args.processes
    if processes < 1:
        raise ConfigError(
            f"--processes={processes} is not a number of worker processes; use 1 "
            "or more, e.g. 'daskrun cluster start --processes 2', or leave it out "
            "for one per core"
        )
    # one start at a time: two at once would both find none running
    with SharedCluster.starting():
        running = SharedCluster.find()
        if running is not None:
            raise ConfigError(
                f"a cluster is already running at {running.describe()}; stop it "
                "first with 'daskrun cluster stop'"
            )
        return _start_shared(processes)


def _start_shared(processes: int) -> int:
    """Start ``daskrun cluster serve`` in a session of its own and wait
    until it has published its cluster (or ended, saying why)."""
    log = SharedCluster.log_path()
    private_folder(log.parent)
    with private_open(log, "ab") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "daskrun", "cluster", "serve"]
            + ["--processes", str(processes)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # outlives this command and its terminal
        )
    deadline = time.monotonic() + start_timeout() + 30
    while time.monotonic() < deadline:
        shared = SharedCluster.find()
        if shared is not None and shared.pid == server.pid:
            print(f"daskrun: cluster started at {shared.describe()}")
            print("daskrun: jobs with no compute target use it; stop it with "
                  "'daskrun cluster stop'")  # fmt: skip
            return 0
        if server.poll() is not None:
            print(f"daskrun: the cluster did not start; see {log}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    server.terminate()
    print(f"daskrun: the cluster did not start in time; see {log}", file=sys.stderr)
    return 1


# ParallelRunConfig's and ParallelRunStep's parameters, as the CLI spells them
_FLAGS = {
    "allowed_failed_count": "--allowed-failed-count",
    "allowed_failed_percent": "--allowed-failed-percent",
    "append_row_file_name": "--append-row-file-name",
    "compute_target": "--scheduler",
    "entry_script": "SCRIPT",
    "error_threshold": "--error-threshold",
    "logging_level": "--logging-level",
    "mini_batch_size": "--mini-batch-size",
    "name": "--name",
    "new_source": "--new-source",
    "node_count": "--nodes",
    "output": "--output",
    "output_action": "--output-action",
    "output_format": "--output-format",
    "partition_format": "--partition-format",
    "partition_keys": "--partition-keys",
    "process_count_per_node": "--processes",
    "replan": "--replan",
    "retry_failed": "--retry-failed",
    "run_invocation_timeout": "--timeout",
    "run_max_try": "--max-tries",
    "source_directory": "--source-directory",
}
_VALUE = r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\[[^\]]*\]|[\w.+-]+)"""
_NAMES = "|".join(sorted(_FLAGS, key=len, reverse=True))
_CLI_TERMS = [
    # "retry_failed=True (--retry-failed)" and "--replan (replan=True)"
    (re.compile(rf"\b(?:{_NAMES})={_VALUE} \((--[\w-]+)\)"), r"\2"),
    (re.compile(rf"(--[\w-]+) \((?:{_NAMES})={_VALUE}\)"), r"\1"),
    # "Dataset.File.from_files(path, partition_format='...')": the argument
    (re.compile(rf"\b[\w.]+\(paths?, ((?:{_NAMES})={_VALUE})\)"), r"\1"),
]
_ASSIGNED = re.compile(rf"(?<![\w.-])(--[\w-]+|{_NAMES})={_VALUE}")
_BARE = re.compile(rf"(?<![\w.-])({'|'.join(n for n in _FLAGS if '_' in n)})\b(?!=)")


def _in_cli_terms(message: str) -> str:
    """An error message as a CLI user reads it: the flags they type, not
    the Python arguments they map to.

    >>> _in_cli_terms("mini_batch_size='10 files' is not a number of files")
    "--mini-batch-size '10 files' is not a number of files"
    >>> _in_cli_terms("error_threshold=-5 must be an int >= -1; use e.g. "
    ...               "error_threshold=10")
    '--error-threshold -5 must be an int >= -1; use e.g. --error-threshold 10'
    >>> _in_cli_terms("pass retry_failed=True (--retry-failed) to run them")
    'pass --retry-failed to run them'
    """
    for pattern, replacement in _CLI_TERMS:
        message = pattern.sub(replacement, message)

    def assigned(found: re.Match[str]) -> str:
        name, value = found.group(1), found.group(2)
        flag = name if name.startswith("--") else _FLAGS[name]
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return f"{flag} {value}"
        if isinstance(parsed, bool):
            return flag
        if parsed is None:  # "use compute_target=None": leave the flag out
            return f"no {flag}"
        if isinstance(parsed, (list, tuple)):
            parsed = ",".join(map(str, parsed))
        return f"{flag} {shlex.quote(parsed) if isinstance(parsed, str) else parsed}"

    message = _ASSIGNED.sub(assigned, message)
    return _BARE.sub(lambda found: _FLAGS[found.group(1)], message)


# the commands of 'daskrun runs' and 'daskrun cluster'
_NEEDS = {"runs": "list, show or report", "cluster": "start, stop or status"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``daskrun`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        # a run's own lines are printed by daskrun's handler (monitor.py)
        handler.setLevel(logging.WARNING)
        handler.addFilter(lambda record: not shown_by_console(record))
    try:
        status = _dispatch(parser, args, script_args)
        sys.stdout.flush()  # a reader gone ('| head') shows here at the latest
        return status
    except BrokenPipeError:
        # the reader of the output went away, as with 'daskrun runs list |
        # head': stop quietly, as CLIs do, and keep the interpreter's own
        # flush at exit from failing again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a command killed by the signal


def _dispatch(
    parser: argparse.ArgumentParser, args: argparse.Namespace, script_args: list[str]
) -> int:
    """Run the command ``args`` name; its exit status."""
    try:
        if getattr(args, "scheduler", None) is not None:  # run, resume
            check_scheduler_address(args.scheduler, "--scheduler")
        if args.command == "run":
            return _cmd_run(args, script_args)
        if args.command == "resume":
            return _report(
                resume(
                    args.run_id,
                    retry_failed=args.retry_failed,
                    show_output=not args.quiet,
                    replan=args.replan,
                    new_source=args.new_source,
                    compute_target=args.scheduler,
                    workspace=_workspace(args),
                    inputs=None if args.input is None else [args.input],
                ),
                not args.quiet,
            )
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "cluster" and args.cluster_command:
            return _cmd_cluster(args)
        if args.command == "runs" and args.runs_command == "list":
            return _cmd_runs_list(args)
        if args.command == "runs" and args.runs_command == "show":
            return _cmd_runs_show(args)
        if args.command == "runs" and args.runs_command == "report":
            record = RunRecord.load(args.run_id, _root(args))
            print(f"report: {write_report(record.folder)}")
            return 0
        if args.command in _NEEDS:  # 'daskrun runs' without its command
            print(
                f"daskrun: error: 'daskrun {args.command}' needs a command: "
                f"{_NEEDS[args.command]} (see 'daskrun {args.command} --help')",
                file=sys.stderr,
            )
            return 2
        parser.print_help()
        return 2
    except (ConfigError, InputError) as e:
        print(f"daskrun: error: {_in_cli_terms(env_named(str(e)))}", file=sys.stderr)
        return 2
    except DaskRunError as e:
        print(f"daskrun: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if not isinstance(e, Interrupted):  # else the job said so
            print("daskrun: canceled", file=sys.stderr)
        return 130
