"""The ``daskrun`` command.

Exit status: 0 the job completed, 1 the job failed, 2 bad usage or invalid
input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .auto import AUTO, is_auto
from .cluster import (
    SharedCluster,
    default_process_count,
    serve_shared_cluster,
    start_timeout,
    stop_shared_cluster,
)
from .config import (
    LOGGING_LEVELS,
    OUTPUT_ACTIONS,
    OUTPUT_FORMATS,
    ParallelRunConfig,
    check_scheduler_address,
    unmet_packages,
)
from .datasets import Dataset, FileDataset, TabularDataset
from .exceptions import ConfigError, DaskRunError, InputError
from .job import Interrupted
from .monitor import FAILED_ITEMS, failure_lines, shown_by_console
from .records import RunRecord, runs_dir
from .report import write_report
from .step import ParallelRunStep, StepRun, resume
from .storage import private_folder, private_open
from .workspace import Workspace


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"daskrun: error: {message} (see 'daskrun {self._sub} --help')\n")

    _sub = ""


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="daskrun", description="Batch inference on Dask.")
    parser.add_argument("--version", action="version", version=__version__)
    subs = parser.add_subparsers(dest="command", parser_class=_Parser)

    run = subs.add_parser(
        "run",
        help="run an entry script over files or tables",
        description="Run SCRIPT's init() once per worker and run(mini_batch) over "
        "every mini-batch of the inputs. Arguments after '--' go to the script.",
    )
    run._sub = "run"
    run.add_argument("script", help="entry script defining init() and run()")
    run.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="files, folders, globs or fsspec URLs",
    )
    run.add_argument(
        "--tabular",
        action="store_true",
        help="read CSV or Parquet files as tables (run() gets DataFrames)",
    )
    run.add_argument("--output", metavar="DIR", help="output folder or URL")
    run.add_argument("--name", help="step name (default: from the script's name)")
    run.add_argument(
        "--source-directory",
        metavar="DIR",
        help="folder shipped to the workers and put on sys.path (default: the "
        "script's folder; .amlignore or .gitignore, and .daskrunignore, leave "
        "files out); SCRIPT is then relative to it",
    )
    run.add_argument(
        "--mini-batch-size",
        metavar="N",
        help="files per mini-batch, or bytes for --tabular (e.g. 1MB), or "
        "'auto' (chosen from a pilot's measured rates)",
    )
    run.add_argument(
        "--partition-format",
        metavar="PATTERN",
        help="keys read from each input path, e.g. '/{user}/{genre}/{fname}.wav' "
        "or '/{day:yyyy/MM/dd}/{name}.csv'",
    )
    run.add_argument(
        "--partition-keys",
        metavar="A,B",
        help="one mini-batch per distinct combination of these keys of "
        "--partition-format (instead of --mini-batch-size)",
    )
    run.add_argument("--error-threshold", type=int, metavar="N")
    run.add_argument("--allowed-failed-count", type=int, metavar="N")
    run.add_argument("--allowed-failed-percent", type=float, metavar="P")
    run.add_argument("--output-action", choices=OUTPUT_ACTIONS)
    run.add_argument("--append-row-file-name", metavar="NAME")
    run.add_argument(
        "--output-format",
        choices=OUTPUT_FORMATS,
        help="text lines (default), csv with a header, or parquet",
    )
    run.add_argument(
        "--processes",
        type=_count_or_auto,
        metavar="N",
        help="worker processes per node, or 'auto' (per GPU, else per core, "
        "as many as the memory holds)",
    )
    run.add_argument("--nodes", type=int, metavar="N")
    run.add_argument(
        "--scheduler",
        metavar="ADDR",
        help="use a running scheduler instead of a local cluster",
    )
    run.add_argument(
        "--timeout", type=int, metavar="S", help="run_invocation_timeout in seconds"
    )
    run.add_argument("--max-tries", type=int, metavar="N", help="run_max_try")
    run.add_argument("--logging-level", type=str.upper, choices=LOGGING_LEVELS)
    run.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    again = subs.add_parser(
        "resume",
        help="resume a failed, canceled or interrupted run",
        description="Run again only the mini-batches of RUN_ID without a "
        "committed result, and publish the same output an uninterrupted run "
        "would have.",
    )
    again._sub = "resume"
    again.add_argument("run_id", metavar="RUN_ID")
    again.add_argument(
        "--retry-failed",
        action="store_true",
        help="also run the failed items (the mini-batches that failed) again",
    )
    again.add_argument(
        "--replan",
        action="store_true",
        help="plan the inputs again if they changed since the run: keep the "
        "committed mini-batches whose inputs are unchanged, run the rest",
    )
    again.add_argument("--scheduler", metavar="ADDR")
    again.add_argument(
        "--input",
        nargs="+",
        metavar="URL",
        help="the run's inputs again, where they were URLs with a SAS "
        "signature (never kept in run records)",
    )
    again.add_argument("-q", "--quiet", action="store_true")

    runs = subs.add_parser(
        "runs",
        help="list runs, or show one",
        description="Run records of the workspace (--workspace, or the one "
        "found from the current folder upward), else of daskrun.runs-dir.",
    )
    runs._sub = "runs"
    runs_sub = runs.add_subparsers(dest="runs_command", parser_class=_Parser)
    listing = runs_sub.add_parser("list", help="runs, newest first")
    listing._sub = "runs list"
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = runs_sub.add_parser("show", help="one run's status, counts, outputs")
    show._sub = "runs show"
    show.add_argument("run_id", metavar="RUN_ID")
    show.add_argument("--json", action="store_true")
    report = runs_sub.add_parser(
        "report", help="(re)build a run's logs/report.html from its log folder"
    )
    report._sub = "runs report"
    report.add_argument("run_id", metavar="RUN_ID")
    demo = subs.add_parser(
        "demo",
        help="the MNIST tutorial end to end on a local cluster",
        description="Make MNIST-like digit images, train and register a small "
        "Keras model, and run the ParallelRunStep tutorial's pipeline on them "
        "(examples/mnist/pipeline.py). A second run reuses data, model and "
        "output.",
    )
    demo._sub = "demo"
    demo.add_argument("--dir", default="daskrun-demo", help="workspace and data")
    demo.add_argument("--images", type=int, default=10_000, metavar="N")
    demo.add_argument("--processes", type=int, default=2, metavar="N")
    shared = subs.add_parser(
        "cluster",
        help="keep a local cluster running for later jobs",
        description="Start a local cluster in the background that every later "
        "job of yours with no compute target uses (a warm start: no cluster "
        "start, and workers that have imported their libraries), or stop it. "
        "It listens on 127.0.0.1 with TLS, as the cluster a job starts itself.",
    )
    shared._sub = "cluster"
    shared_sub = shared.add_subparsers(dest="cluster_command", parser_class=_Parser)
    start = shared_sub.add_parser("start", help="start it in the background")
    start._sub = "cluster start"
    start.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="worker processes (default: one per core, or per GPU)",
    )
    for name, text in (
        ("stop", "stop it"),
        ("status", "where it is, if it runs"),
        ("serve", argparse.SUPPRESS),  # what start runs in the background
    ):
        sub = shared_sub.add_parser(name, help=text)
        sub._sub = f"cluster {name}"
        if name == "serve":
            sub.add_argument("--processes", type=int, required=True)
    for sub in (run, again, listing, show, report):
        sub.add_argument(
            "--workspace",
            metavar="DIR",
            help="workspace folder (default: found from the current folder upward)",
        )
    return parser


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


def _count_or_auto(value: str) -> int | str:
    """``--processes``: a number, or ``auto``."""
    if is_auto(value):
        return AUTO
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a number of processes; use e.g. 2, or auto"
        ) from None


def _cmd_run(args: argparse.Namespace, script_args: list[str]) -> int:
    mbs: int | str | None = args.mini_batch_size
    if isinstance(mbs, str) and mbs.isdigit():
        mbs = int(mbs)
    script, source = _script_and_source(args.script, args.source_directory)
    config = ParallelRunConfig(
        entry_script=script,
        error_threshold=args.error_threshold,
        output_action=args.output_action,
        compute_target=args.scheduler,
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
    (:func:`~daskrun.monitor.failure_lines`), unless the job ``shown``
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


# the commands of 'daskrun runs' and 'daskrun cluster'
_NEEDS = {"runs": "list, show or report", "cluster": "start, stop or status"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``daskrun`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1 :]
    parser = _build_parser()
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
        print(f"daskrun: error: {e}", file=sys.stderr)
        return 2
    except DaskRunError as e:
        print(f"daskrun: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if not isinstance(e, Interrupted):  # else the job said so
            print("daskrun: canceled", file=sys.stderr)
        return 130
