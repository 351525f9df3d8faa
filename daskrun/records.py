"""Run records: what a run needs to be resumed from a new process.

``<runs-dir>/<run id>/run.json`` holds the step's resolved parameters, its
inputs (paths, never credentials), output and arguments, and the run's status;
``source.zip`` beside it holds the entry script as it was shipped. The
job report (``logs/sys/job_report/processed_mini-batches.csv``) and the
committed parts under the output say which mini-batches are done.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import config_get
from .exceptions import ConfigError

RECORD = "run.json"
SOURCE = "source.zip"


def runs_dir() -> Path:
    return Path(os.path.expanduser(config_get("runs-dir")))


@dataclass
class RunRecord:
    """A run's identity and parameters, as JSON."""

    run_id: str
    step_name: str
    status: str
    kind: str
    file_format: str | None
    inputs: list[Any]  # each data set's path spec (str or list of str)
    pandas_kwargs: dict[str, Any]
    remote_inputs: bool
    output: str | None
    config: dict[str, Any]
    script: str  # the entry script's path inside source.zip
    arguments: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def folder(self) -> Path:
        return runs_dir() / self.run_id

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{RECORD}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, self.folder / RECORD)

    @classmethod
    def load(cls, run_id: str) -> RunRecord:
        path = runs_dir() / run_id / RECORD
        if not path.is_file():
            raise ConfigError(
                f"run {run_id!r} not found in {runs_dir()}; check the run id "
                "(it is printed at the start of each run) or daskrun.runs-dir"
            )
        return cls(**json.loads(path.read_text()))


@dataclass
class Finished:
    """One mini-batch's final outcome, read back from the job report."""

    row: dict[str, str]

    @property
    def index(self) -> int:
        return int(self.row["index"])

    @property
    def ok(self) -> bool:
        return not self.row["error"]


def read_report(path: Path) -> list[Finished]:
    """The rows of an earlier attempt's job report (empty if none)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [Finished(row) for row in csv.DictReader(f)]
