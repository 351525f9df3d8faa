"""Run records: what a run was, how it ended, and what resuming it needs.

Records live in SQLite (``runs.db`` in the runs folder: ``daskrun.runs-dir``,
or ``<workspace>/runs``), so several processes can start, update and read
runs at once, and a new process can list them. Each record holds a step's
resolved parameters, its inputs (paths, never credentials), output,
arguments, status, times and counts; ``<run id>/source.zip`` beside the
database holds the entry script as it was shipped, and ``<run id>/inputs.json``
every input path, written once (the record keeps its name and digest), so a
save's cost does not grow with the number of inputs. The job report
(``logs/sys/job_report/processed_mini-batches.csv``) and the committed parts
under the output say which mini-batches are done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daskrun.aml.runcontext import RunLog
from daskrun.backends.storage import (
    FileLock,
    private_file,
    private_folder,
    private_open,
    unsigned,
)
from daskrun.engine.config import config_get
from daskrun.exceptions import ConfigError

DATABASE = "runs.db"
SOURCE = "source.zip"
PATHS = "inputs.json"
# the fields that hold every input's paths: in PATHS, not in runs.db
_PATH_FIELDS = ("inputs", "input_specs")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    parent_id TEXT,
    experiment TEXT,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    created TEXT NOT NULL,
    fingerprint TEXT,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_fingerprint ON runs (fingerprint, status);
CREATE INDEX IF NOT EXISTS runs_by_parent ON runs (parent_id);
"""


def runs_dir() -> Path:
    """The runs folder used without a workspace (``daskrun.runs-dir``)."""
    return Path(os.path.expanduser(config_get("runs-dir")))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def open_db(path: Path, schema: str) -> Iterator[sqlite3.Connection]:
    """A short-lived connection, committed on success.

    WAL journaling lets readers run beside one writer; writers from several
    processes wait for each other (``busy_timeout``) instead of failing.
    """
    private_folder(path.parent)
    # SQLite gives its -wal and -shm files the database file's mode
    private_file(path)
    conn = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(schema)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.close()


@dataclass
class RunRecord:
    """A run's identity, parameters and outcome.

    ``type`` is ``"step"`` (one ParallelRunStep) or ``"pipeline"`` (whose
    steps are records with ``parent_id`` set to it).
    """

    run_id: str
    root: str  # the runs folder holding runs.db and the run's folder
    type: str = "step"
    name: str = ""  # the step's name, or the pipeline's experiment
    status: str = "NotStarted"
    created: str = field(default_factory=now)
    ended: str | None = None
    parent_id: str | None = None
    experiment: str | None = None
    error: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    output_path: str | None = None
    logs_dir: str | None = None
    # PipelineData written by a step: name -> {"datastore": ..., "path": ...}
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    fingerprint: str | None = None
    # what the entry script logged through Run.get_context() (runcontext.RunLog:
    # a value, a list, or a table of columns per name), and on run.parent:
    # {"metrics": ..., "tags": ...}, shown as the pipeline run's
    metrics: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    parent_logged: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the planned mini-batches and their inputs (see PlanLedger)
    inputs_digest: str | None = None
    # what mini_batch_size / process_count_per_node="auto" chose (AutoChoice)
    auto: dict[str, Any] = field(default_factory=dict)
    reused_from: str | None = None
    # what a step needs to be resumed
    kind: str = "file"
    file_format: str | None = None
    inputs: list[Any] = field(default_factory=list)  # each data set's paths
    input_specs: list[dict[str, Any]] = field(default_factory=list)  # in a workspace
    partition_formats: list[str | None] = field(default_factory=list)
    # each input's as_named_input or registered name
    input_names: list[str | None] = field(default_factory=list)
    pandas_kwargs: dict[str, Any] = field(default_factory=dict)
    remote_inputs: bool = False
    output: str | None = None
    # outputs=: name -> {"url", "file_name", "format"[, "datastore", "path"]}
    named_outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    script: str = ""  # the entry script's path inside source.zip
    # a digest of each bundle of code the run shipped, oldest first: a
    # resume with new_source adds one (daskrun.registry.sources)
    source_digests: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)
    workspace: str | None = None
    # {"name": PATHS, "sha256": ...} once the paths are written there
    inputs_file: dict[str, str] | None = None
    # "all" or "inputs": only new or changed inputs ran (engine.increment);
    # counts then hold inputs_reused, inputs_new, inputs_changed, inputs_removed
    incremental: str | None = None

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.run_id

    def start(self) -> None:
        """Mark the run running (again, on a resume) and save."""
        self.status, self.error = "Running", None
        self.save()

    def end(
        self,
        status: str,
        error: str | None,
        counts: dict[str, int],
        output_path: str | None,
        logs_dir: str,
        logged: Iterable[Sequence[Any]] = (),
    ) -> None:
        """Record how the run ended and what its entry script logged
        (:meth:`add_logged`), and save."""
        self.status, self.error, self.ended = status, error, now()
        self.counts, self.output_path, self.logs_dir = counts, output_path, logs_dir
        self.add_logged(logged)
        self.save()

    def add_logged(self, entries: Iterable[Sequence[Any]]) -> None:
        """Add what the entry script logged through ``Run.get_context()``
        (``(run, kind, name, value)`` entries) to :attr:`metrics` and
        :attr:`tags`, or to :attr:`parent_logged`; a resumed run adds to
        its earlier attempts'."""
        parent = self.parent_logged
        logs = {
            "self": RunLog(self.metrics, self.tags),
            "parent": RunLog(
                parent.setdefault("metrics", {}), parent.setdefault("tags", {})
            ),
        }
        for entry in entries:
            logs[entry[0]].add([entry])
        if not any(parent.values()):
            self.parent_logged = {}

    def save(self) -> None:
        """Insert or update this record (atomic; safe across processes);
        its input paths go to :data:`PATHS` once (:meth:`_save_paths`)."""
        self._save_paths()
        data = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in _PATH_FIELDS or self.inputs_file is None
        }
        with open_db(Path(self.root) / DATABASE, _SCHEMA) as db:
            db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.run_id,
                    self.type,
                    self.parent_id,
                    self.experiment,
                    self.name,
                    self.status,
                    self.created,
                    self.fingerprint,
                    # its fields are plain values already (asdict() would
                    # copy them item by item); an input URL's SAS signature
                    # is never kept (resume asks)
                    unsigned(json.dumps(data)),
                ),
            )

    def _save_paths(self) -> None:
        """Write :attr:`inputs` and :attr:`input_specs` to the run folder's
        :data:`PATHS` (unsigned, owner-only) unless this record wrote or
        read these very lists there already; a record without inputs (a
        pipeline's) keeps its empty lists in the database."""
        paths = tuple(getattr(self, name) for name in _PATH_FIELDS)
        kept = self.__dict__.get("_paths_kept")
        if not any(paths) or (
            kept is not None and all(a is b for a, b in zip(kept, paths, strict=True))
        ):
            return
        text = unsigned(json.dumps(dict(zip(_PATH_FIELDS, paths, strict=True))))
        private_folder(self.folder)
        tmp = self.folder / f".{PATHS}.tmp"
        with private_open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, self.folder / PATHS)
        self.inputs_file = {"name": PATHS, "sha256": _digest(text)}
        self.__dict__["_paths_kept"] = paths

    @classmethod
    def load(cls, run_id: str, root: Path | None = None) -> RunRecord:
        root = root or runs_dir()
        found = _select(root, "WHERE run_id = ?", (run_id,), strict=True)
        if not found:
            raise ConfigError(
                f"run {run_id!r} not found in {root}; check the run id (it is "
                "printed at the start of each run), the workspace or "
                "daskrun.runs-dir (see 'daskrun runs list')"
            )
        return found[0]

    def read_paths(self, strict: bool = False) -> None:
        """Read :attr:`inputs` and :attr:`input_specs` back from the run
        folder's :data:`PATHS`; ``strict``: a missing or changed file is a
        :class:`ConfigError` (else the lists stay empty)."""
        if self.inputs_file is None:
            return
        path = self.folder / self.inputs_file["name"]
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            text = None
        if text is None or _digest(text) != self.inputs_file["sha256"]:
            if strict:
                raise ConfigError(
                    f"run {self.run_id!r}'s input paths ({path}) are "
                    f"{'missing' if text is None else 'changed'}; restore the "
                    "run folder, or start a new run"
                )
            return
        for name, value in json.loads(text).items():
            setattr(self, name, value)
        self.__dict__["_paths_kept"] = tuple(getattr(self, n) for n in _PATH_FIELDS)

    @classmethod
    def find(
        cls, root: Path | None = None, *, parent_id: str | None = None
    ) -> list[RunRecord]:
        """Records, newest first; with ``parent_id`` a pipeline's steps in
        the order they were created."""
        root = root or runs_dir()
        if parent_id is not None:
            return _select(root, "WHERE parent_id = ? ORDER BY rowid", (parent_id,))
        return _select(root, "ORDER BY created DESC, rowid DESC", ())

    @classmethod
    def reusable(cls, root: Path, fingerprint: str) -> list[RunRecord]:
        """Completed runs of an identical step, newest first."""
        return _select(
            root,
            "WHERE fingerprint = ? AND status = 'Completed' ORDER BY rowid DESC",
            (fingerprint,),
        )


def _select(
    root: Path, where: str, args: tuple[Any, ...], strict: bool = False
) -> list[RunRecord]:
    if not (root / DATABASE).is_file():
        return []
    known = {f.name for f in fields(RunRecord)}
    with open_db(root / DATABASE, _SCHEMA) as db:
        rows = db.execute(f"SELECT data FROM runs {where}", args).fetchall()
    records = []
    for row in rows:
        data = json.loads(row["data"])
        record = RunRecord(**{k: v for k, v in data.items() if k in known})
        record.read_paths(strict)
        records.append(record)
    return records


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


LOCK = "run.lock"


def lock_run(record: RunRecord) -> FileLock:
    """An exclusive lock on a run's folder (``run.lock``), held while the run
    or a resume of it is in progress."""

    def refused(holder: str) -> Exception:
        return ConfigError(
            f"run {record.run_id!r} is in progress in {holder or 'another process'}; "
            "wait for it to end (see 'daskrun runs show'), then resume it if needed"
        )

    private_folder(record.folder)
    return FileLock(record.folder / LOCK, f"process {os.getpid()}", refused)


def new_run_id(step_name: str) -> str:
    """``<step>_<UTC time>_<random>``, sortable by start time."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{step_name}_{stamp}_{secrets.token_hex(3)}"
