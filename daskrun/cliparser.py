"""The ``daskrun`` command's options: one function per subcommand.

Every flag says its default; a flag that defaults to a ``daskrun.*`` setting
names it and shows its current value (:func:`_default`).
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from daskrun import __version__
from daskrun.engine.auto import AUTO, is_auto
from daskrun.engine.config import (
    LOGGING_LEVELS,
    OUTPUT_ACTIONS,
    OUTPUT_FORMATS,
    config_get,
)

# what add_subparsers returns (argparse's class for it is private)
_SubParsers = Any

_SCHEDULER_HELP = (
    "address of a running Dask scheduler to use, e.g. tcp://10.0.0.5:8786 "
    "(default: the cluster of 'daskrun cluster start' if one runs, else a "
    "local cluster of the job's own)"
)
_QUIET_HELP = "no progress output (default: off, a progress bar or lines)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # 'cluster serve' is what 'cluster start' runs, not a user's choice
        message = message.replace(", 'serve')", ")")
        self.exit(2, f"daskrun: error: {message} (see 'daskrun {self._sub} --help')\n")

    _sub = ""


def _default(key: str) -> str:
    """``(default: VALUE, daskrun.KEY)``: a flag's default, as dask.config
    holds it now (daskrun.yaml, DASK_DASKRUN__* variables, dask config files)."""
    value = config_get(key)
    return f"(default: {'none' if value is None else value}, daskrun.{key})"


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


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``daskrun``'s command line."""
    parser = _Parser(prog="daskrun", description="Batch inference on Dask.")
    parser.add_argument("--version", action="version", version=__version__)
    subs = parser.add_subparsers(dest="command", parser_class=_Parser)

    with_workspace = [
        _add_run(subs),
        _add_resume(subs),
        *_add_runs(subs),
    ]
    _add_demo(subs)
    _add_cluster(subs)
    for sub in with_workspace:
        sub.add_argument(
            "--workspace",
            metavar="DIR",
            help="workspace folder (default: found from the current folder "
            "upward, else runs go to daskrun.runs-dir)",
        )
    return parser


def _add_run(subs: _SubParsers) -> argparse.ArgumentParser:
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
        help="files, folders, globs or fsspec URLs (required)",
    )
    run.add_argument(
        "--tabular",
        action="store_true",
        help="read CSV or Parquet files as tables: run() gets DataFrames "
        "(default: off, files: run() gets a list of paths)",
    )
    run.add_argument(
        "--output",
        metavar="DIR",
        help="output folder or URL (default: outputs/ in the run's folder)",
    )
    run.add_argument(
        "--outputs",
        nargs="+",
        metavar="NAME[:FORMAT]=DIR",
        help="named outputs instead of --output: run() returns a dict of name "
        "to rows; e.g. --outputs scores:csv=out/scores labels=out/labels "
        "(default: none, one --output)",
    )
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
        "'auto' (chosen from a pilot's measured rates) (default: "
        f"{config_get('mini-batch-size.file')} files, "
        f"{config_get('mini-batch-size.tabular')} tabular, "
        "daskrun.mini-batch-size)",
    )
    run.add_argument(
        "--partition-format",
        metavar="PATTERN",
        help="keys read from each input path, e.g. '/{user}/{genre}/{fname}.wav' "
        "or '/{day:yyyy/MM/dd}/{name}.csv' (default: none)",
    )
    run.add_argument(
        "--partition-keys",
        metavar="A,B",
        help="one mini-batch per distinct combination of these keys of "
        "--partition-format, instead of --mini-batch-size (default: none)",
    )
    _add_run_outcome(run)
    _add_run_workers(run)
    return run


def _add_run_outcome(run: argparse.ArgumentParser) -> None:
    """``daskrun run``'s thresholds and output."""
    run.add_argument(
        "--error-threshold",
        type=int,
        metavar="N",
        help=f"failed items tolerated; -1 tolerates all {_default('error-threshold')}",
    )
    run.add_argument(
        "--allowed-failed-count",
        type=int,
        metavar="N",
        help="mini-batches with failed items tolerated "
        f"{_default('allowed-failed-count')}",
    )
    run.add_argument(
        "--allowed-failed-percent",
        type=float,
        metavar="P",
        help="percent of mini-batches with failed items tolerated, checked "
        f"once all are scheduled {_default('allowed-failed-percent')}",
    )
    run.add_argument(
        "--output-action",
        choices=OUTPUT_ACTIONS,
        help="append_row: one output file of run()'s results; summary_only: "
        f"run() writes its own {_default('output-action')}",
    )
    run.add_argument(
        "--append-row-file-name",
        metavar="NAME",
        help=f"the output file's name {_default('append-row-file-name')}",
    )
    run.add_argument(
        "--output-format",
        choices=OUTPUT_FORMATS,
        help=f"text lines, csv with a header, or parquet {_default('output-format')}",
    )
    run.add_argument(
        "--incremental",
        nargs="?",
        const=True,
        default=False,
        choices=["inputs"],
        metavar="inputs",
        help="run only the inputs new or changed since the output's last complete "
        "run, keeping the other rows; a changed script runs all, unless "
        "--incremental=inputs (default: off)",
    )


def _add_run_workers(run: argparse.ArgumentParser) -> None:
    """``daskrun run``'s workers, tries and logging."""
    run.add_argument(
        "--processes",
        type=_count_or_auto,
        metavar="N",
        help="worker processes per node, or 'auto' (per GPU, else per core, "
        "as many as the memory holds) (default: one per core, or per GPU, "
        "daskrun.process-count-per-node)",
    )
    run.add_argument(
        "--nodes",
        type=int,
        metavar="N",
        help=f"nodes of a batch-queue cluster {_default('node-count')}",
    )
    run.add_argument(
        "--scheduler",
        metavar="ADDR",
        help=_SCHEDULER_HELP,
    )
    run.add_argument(
        "--mpi",
        action="store_true",
        help="run on the ranks of the mpirun that started this command: rank 0 "
        "the scheduler, 1 this command, 2 and up the workers, needs "
        "daskrun[mpi] (default: off)",
    )
    run.add_argument(
        "--timeout",
        type=int,
        metavar="S",
        help=f"seconds per run() call {_default('run-invocation-timeout')}",
    )
    run.add_argument(
        "--max-tries",
        type=int,
        metavar="N",
        help=f"tries per mini-batch {_default('run-max-try')}",
    )
    run.add_argument(
        "--logging-level",
        type=str.upper,
        choices=LOGGING_LEVELS,
        help=f"the entry script's log level {_default('logging-level')}",
    )
    run.add_argument("-q", "--quiet", action="store_true", help=_QUIET_HELP)


def _add_resume(subs: _SubParsers) -> argparse.ArgumentParser:
    again = subs.add_parser(
        "resume",
        help="resume a failed, canceled or interrupted run",
        description="Run again only the mini-batches of RUN_ID without a "
        "committed result, and publish the same output an uninterrupted run "
        "would have.",
    )
    again._sub = "resume"
    again.add_argument(
        "run_id", metavar="RUN_ID", help="the run's id, printed as it started"
    )
    again.add_argument(
        "--retry-failed",
        action="store_true",
        help="also run the failed items (the mini-batches that failed) again "
        "(default: off, they stay failed)",
    )
    again.add_argument(
        "--replan",
        action="store_true",
        help="plan the inputs again if they changed since the run: keep the "
        "committed mini-batches whose inputs are unchanged, run the rest "
        "(default: off, changed inputs are refused)",
    )
    again.add_argument(
        "--new-source",
        action="store_true",
        help="run the entry script and its folder as they are now, where they "
        "changed since the run (default: the run's code; a changed Python "
        "file is refused)",
    )
    again.add_argument("--scheduler", metavar="ADDR", help=_SCHEDULER_HELP)
    again.add_argument(
        "--input",
        nargs="+",
        metavar="URL",
        help="the run's inputs again, where they were URLs with a SAS "
        "signature, never kept in run records (default: the run's inputs)",
    )
    again.add_argument("-q", "--quiet", action="store_true", help=_QUIET_HELP)
    return again


def _add_runs(subs: _SubParsers) -> list[argparse.ArgumentParser]:
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
    listing.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line (default: off, a table)",
    )
    show = runs_sub.add_parser("show", help="one run's status, counts, outputs")
    show._sub = "runs show"
    show.add_argument("run_id", metavar="RUN_ID", help="the run's id")
    show.add_argument(
        "--json",
        action="store_true",
        help="one JSON object, with its steps (default: off, a list)",
    )
    report = runs_sub.add_parser(
        "report", help="(re)build a run's logs/report.html from its log folder"
    )
    report._sub = "runs report"
    report.add_argument("run_id", metavar="RUN_ID", help="the run's id")
    return [listing, show, report]


def _add_demo(subs: _SubParsers) -> None:
    demo = subs.add_parser(
        "demo",
        help="the MNIST tutorial end to end on a local cluster",
        description="Make MNIST-like digit images, train and register a small "
        "Keras model, and run the ParallelRunStep tutorial's pipeline on them "
        "(examples/mnist/pipeline.py). A second run reuses data, model and "
        "output.",
    )
    demo._sub = "demo"
    demo.add_argument(
        "--dir",
        default="daskrun-demo",
        help="folder of the workspace and data (default: %(default)s)",
    )
    demo.add_argument(
        "--images",
        type=int,
        default=10_000,
        metavar="N",
        help="digit images to make and score (default: %(default)s)",
    )
    demo.add_argument(
        "--processes",
        type=int,
        default=2,
        metavar="N",
        help="worker processes (default: %(default)s)",
    )


def _add_cluster(subs: _SubParsers) -> None:
    shared = subs.add_parser(
        "cluster",
        help="keep a local cluster running for later jobs",
        description="Start a local cluster in the background that every later "
        "job of yours with no compute target uses (a warm start: no cluster "
        "start, and workers that have imported their libraries), or stop it. "
        "It listens on 127.0.0.1 with TLS, as the cluster a job starts itself.",
    )
    shared._sub = "cluster"
    # 'serve', what start runs in the background, is left out of the help
    shared_sub = shared.add_subparsers(
        dest="cluster_command", parser_class=_Parser, metavar="{start,stop,status}"
    )
    start = shared_sub.add_parser("start", help="start it in the background")
    start._sub = "cluster start"
    start.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="worker processes (default: one per core, or per GPU)",
    )
    for name, text in (("stop", "stop it"), ("status", "where it is, if it runs")):
        sub = shared_sub.add_parser(name, help=text)
        sub._sub = f"cluster {name}"
    serve = shared_sub.add_parser("serve")  # no help: not listed
    serve._sub = "cluster serve"
    serve.add_argument(
        "--processes", type=int, required=True, help="worker processes (required)"
    )
