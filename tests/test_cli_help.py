"""The ``daskrun`` command's help and its usage errors, as a user meets
them: every flag explained with its default, no hidden command in sight,
errors in the words typed (flags, environment variables)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daskrun.cliparser import build_parser as _build_parser

from .helpers import daskrun, make_files, write_script
from .scripts import ECHO


def _commands(
    parser: argparse.ArgumentParser, name: str = "daskrun"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _commands(subparser, f"{name} {sub}")


# -h, --version and the subcommands: argparse's own words
_NOT_FLAGS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def test_every_flag_has_help_and_its_default() -> None:
    missing = []
    for command, parser in _commands(_build_parser()):
        for action in parser._actions:
            if isinstance(action, _NOT_FLAGS):
                continue
            text = action.help or ""
            named = action.option_strings[-1] if action.option_strings else action.dest
            if not text or text == argparse.SUPPRESS:
                missing.append(f"{command} {named}: no help")
            elif action.option_strings and not (
                "(default: " in text or "(required)" in text
            ):
                missing.append(f"{command} {named}: no default in {text!r}")
    assert missing == []


def _help(*command: str) -> str:
    shown = subprocess.run(
        [sys.executable, "-m", "daskrun", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return shown.stdout


def test_the_help_shows_defaults_and_hides_serve() -> None:
    cluster = _help("cluster")
    assert "SUPPRESS" not in cluster and "serve" not in cluster, cluster
    assert "{start,stop,status}" in cluster
    wrong = subprocess.run(
        [sys.executable, "-m", "daskrun", "cluster", "begin"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert wrong.returncode == 2
    assert "(choose from 'start', 'stop', 'status') " in wrong.stderr, wrong.stderr
    run = " ".join(_help("run").split())  # argparse wraps lines
    # the defaults as dask.config holds them (daskrun.yaml here)
    assert "--error-threshold N failed items tolerated; -1 tolerates all " in run
    assert "(default: 0, daskrun.error-threshold)" in run
    assert "(default: 3, daskrun.run-max-try)" in run
    resume = " ".join(_help("resume").split())
    assert "--new-source run the entry script and its folder as they are now" in resume


@pytest.mark.parametrize(
    "variable, value, line",
    [
        (
            "DASK_DASKRUN__ERROR_THRESHOLD",
            "-5",
            "DASK_DASKRUN__ERROR_THRESHOLD=-5 must be an int >= -1; use e.g. "
            "DASK_DASKRUN__ERROR_THRESHOLD=10",
        ),
        (
            "DASK_DASKRUN__MINI_BATCH_SIZE__FILE",
            "0",
            "DASK_DASKRUN__MINI_BATCH_SIZE__FILE=0 must be at least 1; use an int "
            "like 10",
        ),
        (
            "DASK_DASKRUN__PROGRESS_TIMEOUT",
            "soon",
            "DASK_DASKRUN__PROGRESS_TIMEOUT='soon' is not a number of seconds",
        ),
    ],
)
def test_a_bad_environment_variable_is_named(
    tmp_path: Path,
    runs_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    line: str,
) -> None:
    make_files(tmp_path / "in", 2)
    write_script(tmp_path, ECHO)
    monkeypatch.setenv(variable, value)
    result = daskrun(
        "run", "score.py", "--input", "in", "--output", "out", "-q",
        cwd=tmp_path, runs=runs_dir,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    (shown,) = result.stderr.splitlines()
    assert shown.startswith(f"daskrun: error: {line}"), shown
    assert not runs_dir.exists()  # nothing started


def test_a_flag_given_wins_over_the_environment_and_is_named(
    tmp_path: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_files(tmp_path / "in", 2)
    write_script(tmp_path, ECHO)
    monkeypatch.setenv("DASK_DASKRUN__RUN_MAX_TRY", "0")
    result = daskrun(
        "run", "score.py", "--input", "in", "--output", "out", "--max-tries", "0",
        "--partition-keys", "user", cwd=tmp_path, runs=runs_dir,
    )  # fmt: skip
    (shown,) = result.stderr.splitlines()
    assert shown == (
        "daskrun: error: --max-tries 0 must be an int >= 1; use e.g. --max-tries 3"
    )
    monkeypatch.delenv("DASK_DASKRUN__RUN_MAX_TRY")
    result = daskrun(
        "run", "score.py", "--input", "in", "--output", "out",
        "--partition-keys", "user", cwd=tmp_path, runs=runs_dir,
    )  # fmt: skip
    (shown,) = result.stderr.splitlines()
    assert shown == (
        "daskrun: error: --partition-keys user: input FileDataset(['in']) is not "
        "partitioned; make it with --partition-format, e.g. --partition-format "
        "'/{user}/{fname}.wav', or use --mini-batch-size"
    )
