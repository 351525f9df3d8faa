"""The worker side: the entry script in a WorkerPlugin, and the mini-batch task.

:class:`EntryScriptPlugin` carries the script (and its ``source_directory``)
as zip bytes, like distributed's ``UploadFile``, so workers that cannot see the
client's disk run it too. ``setup()`` unpacks it, puts it on ``sys.path``,
sets ``sys.argv`` and the environment, imports it and calls ``init()`` once per
worker process; ``teardown()`` calls ``shutdown()``.

:func:`process_mini_batch` is the task: it turns a mini-batch plan into what
``run()`` receives, calls ``run()``, writes the rows as the mini-batch's part and
returns a :class:`TryResult`. A user exception is data, not a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import io
import linecache
import logging
import os
import posixpath
import shutil
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from distributed import WorkerPlugin, get_worker
from fsspec.core import url_to_fs

from daskrun.aml import install_entry_script_shims
from daskrun.aml.modelrefs import ModelRef, set_worker_models
from daskrun.aml.runcontext import Logged, WorkerRun, set_worker_run
from daskrun.backends.inputs.datasets import (
    CollectionBatch,
    MiniBatch,
    PartitionBatch,
    SubBatch,
    partition_dataset,
)
from daskrun.backends.inputs.partitions import MiniBatchContext
from daskrun.backends.storage import hide, hide_values, private_folder
from daskrun.engine.fdcapture import CAPTURE
from daskrun.engine.output import (
    GROUP_BYTES,
    OutputTarget,
    check_returned,
    format_rows,
    printable,
    write_group,
)
from daskrun.exceptions import ConfigError, EntryScriptError
from daskrun.monitoring.resources import INIT, ResourceSampler, perf_topic

if TYPE_CHECKING:
    import pathspec

_ESC = "surrogateescape"
logger = logging.getLogger("daskrun")
_SKIP_DIRS = {"__pycache__", ".git", ".ipynb_checkpoints", ".daskrun", ".venv"}
# AML's snapshot limits: a source directory beyond them is refused
BUNDLE_MAX_BYTES = 300 * 1024**2
BUNDLE_MAX_FILES = 2000
# AML reads .amlignore if present, else .gitignore; .daskrunignore always adds
_IGNORE_FILES = (".amlignore", ".gitignore")
DASKRUN_IGNORE = ".daskrunignore"
_BUNDLES_KEPT = 32
_BUNDLE_FORMAT = "1"  # part of the cache key: bump when the zip layout changes
_ENTRY_MODULE = "daskrun_entry_"  # + the plugin's name: the entry script's module


def bundle_cache_dir() -> Path:
    """Where built bundles are kept: ``$XDG_CACHE_HOME/daskrun/bundles``
    (``~/.cache/daskrun/bundles``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return Path(base, "daskrun", "bundles")


def _ignore_spec(folder: Path) -> pathspec.GitIgnoreSpec | None:
    import pathspec  # the client's, not the workers'

    lines: list[str] = []
    for name in _IGNORE_FILES:
        if (folder / name).is_file():
            lines += (folder / name).read_text(errors="replace").splitlines()
            break
    if (folder / DASKRUN_IGNORE).is_file():
        lines += (folder / DASKRUN_IGNORE).read_text(errors="replace").splitlines()
    return pathspec.GitIgnoreSpec.from_lines(lines) if lines else None


def source_files(
    root: Path, exclude: Sequence[str] = ()
) -> list[tuple[str, Path, int, int]]:
    """The files of a source directory that are shipped, as ``(path inside
    the bundle, path, size, mtime in ns)``, sorted.

    An ``.amlignore`` (else ``.gitignore``) and a ``.daskrunignore`` in any
    folder leave out what their gitignore patterns match below it; an
    ignored folder is not walked. Caches, ``.git``, ``.venv`` and workspace
    or runs folders, and the folders and files in ``exclude`` (the step's
    inputs and output), are never shipped.
    """
    left_out = {os.path.realpath(p) for p in exclude}
    root_real = os.path.realpath(root)
    specs: dict[str, pathspec.GitIgnoreSpec] = {}

    def ignored(rel: str, is_dir: bool) -> bool:
        parts = rel.split("/")
        for i in range(len(parts)):
            spec = specs.get("/".join(parts[:i]))
            tail = "/".join(parts[i:]) + ("/" if is_dir else "")
            if spec is not None and spec.match_file(tail):
                return True
        return False

    found = []
    unnamed: list[str] = []  # not UTF-8: a zip cannot name them
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        base = here.relative_to(root).as_posix()
        base = "" if base == "." else base
        spec = _ignore_spec(here)
        if spec is not None:
            specs[base] = spec
        prefix = f"{base}/" if base else ""
        # a workspace or runs folder inside the source directory is data,
        # not source (and it changes with every run)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in _SKIP_DIRS
            and not os.path.exists(os.path.join(dirpath, d, "workspace.db"))
            and not os.path.exists(os.path.join(dirpath, d, "runs.db"))
            and os.path.join(root_real, prefix, d) not in left_out
            and not ignored(prefix + d, True)
        )
        unnamed += [prefix + d + "/" for d in dirnames if not _utf8(d)]
        dirnames[:] = [d for d in dirnames if _utf8(d)]
        for filename in filenames:
            rel = prefix + filename
            if ignored(rel, False) or os.path.join(root_real, rel) in left_out:
                continue
            if not _utf8(filename):
                unnamed.append(rel)
                continue
            full = here / filename
            try:
                st = full.stat()
            except OSError:  # a dangling link
                continue
            found.append((rel, full, st.st_size, st.st_mtime_ns))
    if unnamed:
        logger.warning(
            "left out of the bundle of %s: %d names that are not UTF-8, e.g. %s "
            "(no module can have such a name; list them in %s to silence this)",
            root,
            len(unnamed),
            ascii(unnamed[0]),
            DASKRUN_IGNORE,
        )
    return sorted(found)


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _check_limits(root: Path, files: Sequence[tuple[str, Path, int, int]]) -> None:
    total = sum(f[2] for f in files)
    if total <= BUNDLE_MAX_BYTES and len(files) <= BUNDLE_MAX_FILES:
        return
    entries: dict[str, list[int]] = {}
    for rel, _, size, _ in files:
        top = rel.split("/", 1)[0] + ("/" if "/" in rel else "")
        entry = entries.setdefault(top, [0, 0])
        entry[0] += size
        entry[1] += 1
    largest = sorted(entries.items(), key=lambda e: (-e[1][0], -e[1][1]))[:3]
    named = ", ".join(
        f"{name} ({_size(size)}{f', {n} files' if name.endswith('/') else ''})"
        for name, (size, n) in largest
    )
    ignore = next(
        (n for n in (*_IGNORE_FILES, DASKRUN_IGNORE) if (root / n).is_file()),
        DASKRUN_IGNORE,
    )
    raise ConfigError(
        f"source_directory={str(root)!r} holds {len(files)} files, "
        f"{_size(total)}, over the {BUNDLE_MAX_FILES} files or "
        f"{_size(BUNDLE_MAX_BYTES)} shipped to workers; largest: {named}; "
        f"list what is not code in {root / ignore} (gitignore patterns, "
        f"e.g. '{largest[0][0]}'), or keep the script in a folder of its own"
    )


def build_bundle(
    entry_script: str,
    source_directory: str | None,
    cache_dir: str | os.PathLike[str] | None = None,
    exclude: Sequence[str] = (),
) -> tuple[Path, str]:
    """Zip the entry script, or what :func:`source_files` ships of its
    ``source_directory``, into a file of ``cache_dir`` (default
    :func:`bundle_cache_dir`); the folders and files in ``exclude`` (the
    step's local inputs and output: data, not code) are left out.

    Files are streamed from disk into the zip, never held in memory. A
    bundle is built again only when a shipped file's path, size or mtime
    changed. Beyond AML's snapshot limits (300 MB or 2,000 files) the
    source directory is refused with :class:`~daskrun.ConfigError`.

    Returns the zip's path and the script's path inside the zip.
    """
    script = Path(entry_script).resolve()
    if source_directory is None:
        st = script.stat()
        rel = script.name
        files = [(rel, script, st.st_size, st.st_mtime_ns)]
    else:
        root = Path(source_directory).resolve()
        rel = script.relative_to(root).as_posix()
        files = source_files(root, exclude)
        if rel not in {f[0] for f in files}:  # ignored, yet it must travel
            st = script.stat()
            files = sorted([*files, (rel, script, st.st_size, st.st_mtime_ns)])
        _check_limits(root, files)
    digest = hashlib.sha256(f"{_BUNDLE_FORMAT}\0{rel}\n".encode())
    for name, full, size, mtime in files:
        digest.update(f"{name}\0{full}\0{size}\0{mtime}\n".encode("utf-8", _ESC))
    cache = Path(cache_dir) if cache_dir is not None else bundle_cache_dir()
    path = cache / f"{digest.hexdigest()[:40]}.zip"
    if path.is_file():
        os.utime(path)  # kept by the pruning below, which drops the oldest
        return path, rel
    private_folder(cache)  # the user's code: theirs alone, as its zip (0600)
    tmp = tempfile.NamedTemporaryFile(dir=cache, suffix=".partial", delete=False)
    try:
        with tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, full, _, _ in files:
                zf.write(full, name)
        os.replace(tmp.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        raise
    _prune(cache)
    return path, rel


def _prune(cache: Path) -> None:
    bundles = []
    for p in cache.glob("*.zip"):
        with contextlib.suppress(OSError):
            bundles.append((p.stat().st_mtime, p))
    for _, old in sorted(bundles, reverse=True)[_BUNDLES_KEPT:]:
        with contextlib.suppress(OSError):
            old.unlink()


def bundle_source(entry_script: str, source_directory: str | None) -> tuple[bytes, str]:
    """The bytes of :func:`build_bundle`'s zip, and the script's path in it."""
    path, rel = build_bundle(entry_script, source_directory)
    return path.read_bytes(), rel


@dataclass(frozen=True)
class TryResult:
    """What one try of one mini-batch did. Small: it travels to the client."""

    index: int
    try_no: int
    ok: bool
    worker: str
    items_in: int | None
    items_out: int
    seconds: float
    error: str | None = None  # "ZeroDivisionError: division by zero"
    traceback: str | None = None
    # what init() (first result of a worker) and run() printed and logged
    stdout: str = ""
    log: str = ""
    # what Run.get_context() logged: (run, kind, name, value) entries
    logged: tuple[Any, ...] = ()
    # a mini-batch whose failed items were isolated (set on the client):
    # each failed piece (a SubBatch) with its try
    failed_pieces: tuple[tuple[Any, TryResult], ...] = ()
    # the rows, for the client to write (daskrun.output.via-client)
    rows: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class InputSpec:
    """How a worker reads the mini-batches of one step."""

    kind: str  # "file" or "tabular"
    storage_options: Mapping[str, Any]
    pandas_kwargs: Mapping[str, Any]
    local: bool  # every input file is on a local (or shared) file system
    partition_format: str | None = None  # tabular: its keys become columns


@dataclass(frozen=True)
class SideInput:
    """A data set handed whole to every worker.

    On a worker it becomes one local path: the file itself for a one-file data
    set, else the folder holding its files (remote files are copied there with
    their paths below the common prefix kept).
    """

    number: int
    files: tuple[str, ...]
    storage_options: Mapping[str, Any] = field(repr=False)
    local: bool

    def materialize(self, folder: str) -> str:
        if self.local:
            return _common(self.files)
        fs, _ = url_to_fs(self.files[0], **self.storage_options)
        remote = [fs._strip_protocol(f) for f in self.files]
        base = (
            posixpath.dirname(_common(remote)) if len(remote) == 1 else _common(remote)
        )
        target = os.path.join(folder, "side_inputs", str(self.number))
        local = [os.path.join(target, posixpath.relpath(f, base)) for f in remote]
        for path in local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fs.get(remote, local)
        return local[0] if len(local) == 1 else target


def _common(paths: Sequence[str]) -> str:
    return paths[0] if len(paths) == 1 else posixpath.commonpath(list(paths))


TIMEOUT_EXIT_CODE = 75


def init_timeout(run_invocation_timeout: float) -> float:
    """How long ``init()`` may take: ParallelRunStep's 3 × timeout + 30 s."""
    return 3 * run_invocation_timeout + 30


class Watchdog:
    """Stops a mini-batch whose reading, ``run()`` or writing outlives
    ``run_invocation_timeout``.

    Python cannot interrupt a thread stuck in C code, ``sleep`` or a blocking
    ``open()`` (a FIFO, a hung mount), and Dask has no task timeout, so the
    only sure stop is the process itself: the watchdog reports which
    mini-batch hung and in which phase (a worker event the client reads),
    then exits the worker process, and the Nanny starts a fresh one, whose
    plugin runs ``init()`` again.
    """

    def __init__(self, worker: Any, topic: str, agent: str, timeout: float):
        self.worker = worker
        self.topic = topic
        self.agent = agent
        self.timeout = timeout
        self._armed: tuple[int, float, str, int | None] | None = None
        self._stopped = threading.Event()
        threading.Thread(
            target=self._watch, name="daskrun-watchdog", daemon=True
        ).start()

    def arm(
        self,
        index: int,
        timeout: float | None = None,
        phase: str = "run",
        piece: int | None = None,
    ) -> None:
        """Watch mini-batch ``index`` (``INIT`` for ``init()``) in ``phase``:
        ``"read"`` (its inputs), ``"run"`` or ``"write"`` (its part);
        ``piece``: the first item of a piece of it being isolated."""
        self._armed = (
            index,
            time.monotonic() + (timeout or self.timeout),
            phase,
            piece,
        )

    def disarm(self) -> None:
        self._armed = None

    def running(self) -> int | None:
        """The mini-batch being run (``INIT`` for ``init()``), if any."""
        armed = self._armed
        return None if armed is None else armed[0]

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(0.1):
            armed = self._armed
            if armed is not None and time.monotonic() > armed[1]:
                self.worker.log_event(
                    self.topic,
                    {
                        "index": armed[0],
                        "worker": self.agent,
                        "cause": "init-timeout" if armed[0] == INIT else "timeout",
                        "phase": armed[2],
                        "piece": armed[3],
                    },
                )
                time.sleep(1.0)  # let the event reach the scheduler
                os._exit(TIMEOUT_EXIT_CODE)


def agent_label(name: object) -> str:
    """``worker-<name>`` for a worker named by a number, else its name.

    >>> agent_label(0), agent_label("3"), agent_label("gpu-node-a")
    ('worker-0', 'worker-3', 'gpu-node-a')
    """
    numbered = isinstance(name, int) or str(name).isdigit()
    return f"worker-{name}" if numbered else str(name)


def agent_name(worker: Any) -> str:
    """``worker-<name>`` for a worker, as ParallelRunStep names its agents;
    ``-gpu<n>`` is added for a worker pinned to GPU ``n`` (dask-cuda sets
    ``CUDA_VISIBLE_DEVICES`` with its own GPU first)."""
    agent = agent_label(worker.name)
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return f"{agent}-gpu{gpu}" if gpu and gpu != "-1" else agent


# at most this much printed or logged text travels with one result
_CAPTURE_LIMIT = 1 << 20


class _Capture:
    """What the entry script prints and logs through ``EntryScript().logger``
    and ``Run.get_context()``, without the run's ``secrets``; shipped with
    each result to the client, which writes the per-worker files (so logs
    come back from any cluster, shared disk or not). In a worker process of
    its own (``native``), what native code writes to the process's stdout
    and stderr meanwhile is kept too (:mod:`daskrun.engine.fdcapture`)."""

    def __init__(
        self,
        agent: str,
        level: str,
        secrets: Sequence[str] = (),
        native: bool = False,
    ):
        self.native = native
        self.secrets = list(secrets)
        self.out = io.StringIO()
        self.log = io.StringIO()
        self.logger = logging.getLogger(f"daskrun.entry_script.{agent}")
        self.logger.handlers.clear()
        handler = logging.StreamHandler(self.log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.logger.addHandler(handler)
        self.logger.setLevel(level)
        self.logger.propagate = False
        # Run.get_context()'s metrics and tags
        self.logged = Logged(lambda entry: hide_values(entry, self.secrets))

    @contextlib.contextmanager
    def redirect(self) -> Iterator[None]:
        """Capture what the script prints; what it writes to ``sys.stderr``
        (a ``logging`` handler of its own, a traceback it prints) still goes
        to the worker's stderr, without the run's secrets; native output is
        captured in a worker process of its own."""
        with CAPTURE.held() if self.native else contextlib.nullcontext() as before:
            stderr = _Hiding(before or sys.stderr, self.secrets)
            try:
                with (
                    contextlib.redirect_stdout(self.out),
                    contextlib.redirect_stderr(stderr),
                ):
                    yield
            finally:
                stderr.flush()

    def take(self) -> tuple[str, str]:
        out, log = self.out.getvalue(), self.log.getvalue()
        if self.native:
            out += CAPTURE.take()
        if out:
            self.out.seek(0)
            self.out.truncate()
        if log:
            self.log.seek(0)
            self.log.truncate()
        # hidden before clipped: a cut must not leave half a secret
        return _clip(hide(out, self.secrets)), _clip(hide(log, self.secrets))


class _Hiding:
    """A text stream that writes to ``stream`` line by line, each line
    without ``secrets`` (a secret written in pieces is hidden whole)."""

    def __init__(self, stream: Any, secrets: Sequence[str]):
        self._stream = stream
        self._secrets = secrets
        self._partial = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            done, newline, self._partial = (self._partial + text).rpartition("\n")
            if newline:
                self._stream.write(hide(done + newline, self._secrets))
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._partial:
                self._stream.write(hide(self._partial, self._secrets))
                self._partial = ""
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty(), fileno()...
        return getattr(self._stream, name)


def _clip(text: str) -> str:
    if len(text) <= _CAPTURE_LIMIT:
        return text
    return text[:_CAPTURE_LIMIT] + f"\n[{len(text) - _CAPTURE_LIMIT} characters cut]\n"


# the plugin of the step running in this worker process, for EntryScript()
_current: EntryScriptPlugin | None = None


class EntryScript:
    """Where the entry script runs, as ParallelRunStep's ``EntryScript``.

    Attributes
    ----------
    logger : logging.Logger
        Lines logged here land in the run's
        ``logs/user/entry_script_log/<agent>.txt``, at the step's
        ``logging_level``.
    log_dir : str
        A folder of this worker for the script's own files.
    output_dir : str
        The step's output folder (``DASKRUN_OUTPUT_PATH``).
    agent_name : str
        This worker process, e.g. ``worker-0``.

    Examples
    --------
    >>> from daskrun import EntryScript
    >>> def init():  # doctest: +SKIP
    ...     EntryScript().logger.info("model loaded")
    """

    @property
    def _plugin(self) -> EntryScriptPlugin:
        if _current is None:
            raise RuntimeError(
                "EntryScript() is only available in init() and run() on a "
                "daskrun worker"
            )
        return _current

    @property
    def logger(self) -> logging.Logger:
        return self._plugin.capture.logger

    @property
    def log_dir(self) -> str:
        path = os.path.join(self._plugin.folder, "logs")
        os.makedirs(path, exist_ok=True)
        return path

    @property
    def output_dir(self) -> str:
        return self._plugin.output_path

    @property
    def agent_name(self) -> str:
        return self._plugin.agent


class EntryScriptPlugin(WorkerPlugin):
    """Runs the entry script's ``init()`` once per worker process.

    Parameters
    ----------
    name : str
        Stable plugin name, unique per run (``daskrun-<step>-<run id>``).
    bundle : bytes
        Zip of the script or its source directory.
    script : str
        The script's path inside ``bundle``.
    script_display : str
        The script's path on the client, shown in tracebacks.
    arguments : list
        ``sys.argv[1:]`` for the script; a :class:`SideInput` stands for the
        local path of a side input on the worker.
    side_inputs : list of SideInput
        Data sets every worker gets whole, fetched in ``setup()`` if remote.
    environment_variables : dict
        Set before ``init()``.
    output_path : str
        The step's output folder, as ``DASKRUN_OUTPUT_PATH`` (and Azure
        ML's ``AZUREML_BI_OUTPUT_PATH``).
    models : list of ModelRef, optional
        The workspace's registered models, for ``Model.get_model_path``.
    secrets : list of str, optional
        Credentials of the input and output storage options, replaced by
        ``***`` in every error and traceback a worker reports.
    source_directory : str, optional
        The source directory on the client: tracebacks name the worker's
        copies of its files by their paths there.
    experiment, parent_id : str, optional
        The pipeline run's experiment and id, for ``Run.get_context()``.
    resource_interval : float, optional
        Seconds between samples of the worker's CPU, memory and GPU
        (:class:`~daskrun.monitoring.resources.ResourceSampler`); ``None``: none.
    """

    def __init__(
        self,
        name: str,
        bundle: bytes,
        script: str,
        script_display: str,
        arguments: Sequence[Any],
        side_inputs: Sequence[SideInput],
        environment_variables: Mapping[str, str],
        output_path: str,
        input_spec: InputSpec,
        output: OutputTarget | None,
        run_invocation_timeout: float,
        models: Sequence[ModelRef] | None = None,
        logging_level: str = "INFO",
        secrets: Sequence[str] = (),
        source_directory: str | None = None,
        experiment: str | None = None,
        parent_id: str | None = None,
        resource_interval: float | None = None,
    ):
        self.name = name
        self.resource_interval = resource_interval
        self.sampler: ResourceSampler | None = None  # started in setup()
        self.experiment = experiment
        self.parent_id = parent_id
        self.source_directory = source_directory
        self.secrets = list(secrets)
        self.logging_level = logging_level
        self.models = None if models is None else list(models)
        self.bundle = bundle
        self.script = script
        self.script_display = script_display
        self.arguments = list(arguments)
        self.side_inputs = list(side_inputs)
        self.environment_variables = dict(environment_variables)
        self.output_path = output_path
        self.input_spec = input_spec
        self.output = output
        self.run_invocation_timeout = run_invocation_timeout
        self.module: ModuleType | None = None
        self.init_error: TryResult | None = None
        # run() cannot take a mini-batch: one line, found before init()
        self.contract_error: str | None = None
        # run(mini_batch, mini_batch_context): set once the script is loaded
        self.takes_context = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_ready", None)
        state.pop("watchdog", None)
        state.pop("capture", None)
        state.pop("sampler", None)
        return state

    @property
    def run_id(self) -> str:
        """The step run's id (the plugin is named ``daskrun-<run id>``)."""
        return self.name.removeprefix("daskrun-")

    @property
    def events_topic(self) -> str:
        """The topic of this run's worker events (timeouts)."""
        return self.name

    @property
    def starts_topic(self) -> str:
        """The topic of task starts: ``{"key", "address", "worker"}``, which
        the client's deadline for frozen workers reads."""
        return f"{self.name}-starts"

    @property
    def perf_topic(self) -> str:
        """The topic of this run's resource samples
        (:mod:`daskrun.monitoring.resources`)."""
        return perf_topic(self.run_id)

    def redact(self, text: str) -> str:
        """``text`` with this run's storage credentials replaced by ``***``."""
        return hide(text, self.secrets)

    def clean(self, text: str) -> str:
        """:meth:`redact`, and the worker's copy of the source directory
        named by its path on the client, as the user knows the files."""
        folder = getattr(self, "folder", None)
        if folder and self.source_directory:
            text = text.replace(folder + os.sep, self.source_directory + os.sep)
        return self.redact(text)

    async def setup(self, worker: Any) -> None:
        self._ready = threading.Event()
        self.folder = os.path.join(worker.local_directory, "daskrun", self.name)
        self.agent = agent_name(worker)
        # a worker a Nanny started has a process of its own, whose native
        # output is captured; in the client's process it is the client's
        self.capture = _Capture(
            self.agent,
            self.logging_level,
            self.secrets,
            native=bool(getattr(worker, "nanny", None)),
        )
        loop = asyncio.get_running_loop()
        self.watchdog = Watchdog(
            worker, self.events_topic, self.agent, self.run_invocation_timeout
        )
        self.watchdog.arm(INIT, init_timeout(self.run_invocation_timeout))
        # before init(): the memory a model takes to load is seen too
        self.sampler = (
            ResourceSampler(
                worker,
                self.perf_topic,
                self.agent,
                self.resource_interval,
                self.watchdog.running,
            )
            if self.resource_interval
            else None
        )
        try:
            # init() may load a model for seconds: keep the event loop free
            await loop.run_in_executor(None, self._init)
        finally:
            self.watchdog.disarm()
            self._ready.set()
        if self.contract_error is not None:
            raise EntryScriptError(self.contract_error)
        if self.init_error is not None:
            raise EntryScriptError(
                f"init() failed on {self.agent}: {self.init_error.error}\n"
                f"{self.init_error.traceback}"
            )

    def _init(self) -> None:
        start = time.perf_counter()
        try:
            shutil.rmtree(self.folder, ignore_errors=True)
            with zipfile.ZipFile(io.BytesIO(self.bundle)) as zf:
                zf.extractall(self.folder)
            _import_only_from(self.folder)
            os.environ.update(self.environment_variables)
            os.environ["DASKRUN_OUTPUT_PATH"] = self.output_path
            os.environ["AZUREML_BI_OUTPUT_PATH"] = self.output_path
            set_worker_models(self.models)
            # Azure ML's imports (azureml.core, azureml_user.parallel_run)
            # resolve to daskrun's where the SDK is not installed
            install_entry_script_shims()
            set_worker_run(
                WorkerRun(
                    self.run_id, self.experiment, self.parent_id, self.capture.logged
                )
            )
            path = os.path.join(self.folder, self.script)
            local = {id(s): s.materialize(self.folder) for s in self.side_inputs}
            sys.argv = [
                path,
                *(
                    local[id(a)] if isinstance(a, SideInput) else str(a)
                    for a in self.arguments
                ),
            ]
            module_name = _ENTRY_MODULE + self.name.replace("-", "_")
            module = ModuleType(module_name)
            module.__file__ = path
            sys.modules[module_name] = module
            # tracebacks name the script as the user knows it, with its source
            # lines even where that path does not exist on this worker
            source = Path(path).read_text()
            linecache.cache[self.script_display] = (
                len(source),
                None,
                source.splitlines(True),
                self.script_display,
            )
            code = compile(source, self.script_display, "exec")
            global _current
            _current = self
            with self.capture.redirect():
                exec(code, module.__dict__)
                # before init(), which may load a model for minutes
                self.contract_error = _check_run(module, self.script)
                if self.contract_error is not None:
                    return
                self.takes_context = _takes_context(module.run)
                module.init()
            self.module = module
        except (Exception, SystemExit) as e:
            self.init_error = _failure(-1, 0, self.agent, None, start, e, self.clean)

    def teardown(self, worker: Any) -> None:
        self.watchdog.stop()
        sampler = getattr(self, "sampler", None)
        if sampler is not None:
            sampler.stop()
        module = self.module
        self.module = None
        if module is not None and callable(getattr(module, "shutdown", None)):
            module.shutdown()
        _forget_bundle(self.folder)

    def wait_ready(self, timeout: float | None = None) -> None:
        self._ready.wait(timeout)


def _import_only_from(folder: str) -> None:
    """Make ``folder``, a job's unpacked bundle, the only one this worker
    process imports from.

    A warm worker (``keep_warm()``, ``daskrun cluster start``) outlives its
    jobs, and Python caches what it imported: a later job's ``import helper``
    would get an earlier job's ``helper`` from ``sys.modules``, or find it
    through that job's folder left on ``sys.path``. So every module loaded
    from any job's bundle folder (the folders beside ``folder``, and
    ``folder`` itself, unpacked afresh) is forgotten, and ``folder`` alone
    goes on ``sys.path``, first. The entry scripts themselves are kept: each
    has a module name of its own (``daskrun_entry_<run>``), and a job still
    running on this worker holds its own.
    """
    root = os.path.dirname(folder)
    sys.path[:] = [p for p in sys.path if not _inside(p, root)]
    sys.path.insert(0, folder)
    _forget_modules(root, keep_entry_scripts=True)
    # the import system caches folder listings; the new files must be seen
    importlib.invalidate_caches()


def _forget_bundle(folder: str) -> None:
    """Undo :func:`_import_only_from` for ``folder``: off ``sys.path``, and
    none of its modules (its entry script's included) left cached."""
    sys.path[:] = [p for p in sys.path if not _inside(p, folder)]
    _forget_modules(folder, keep_entry_scripts=False)


def _forget_modules(folder: str, keep_entry_scripts: bool) -> None:
    """Drop from ``sys.modules`` every module loaded from below ``folder``."""
    for name, module in list(sys.modules.items()):
        if keep_entry_scripts and name.startswith(_ENTRY_MODULE):
            continue
        places = [getattr(module, "__file__", None) or ""]
        places += list(getattr(module, "__path__", None) or ())  # packages
        if any(_inside(p, folder) for p in places if isinstance(p, str)):
            del sys.modules[name]


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or below it."""
    path = os.path.abspath(path) if path else ""
    return path == folder or path.startswith(folder + os.sep)


def _check_run(module: ModuleType, script: str) -> str | None:
    """Why the script's ``run`` cannot take one mini-batch, or ``None``.

    ``run(mini_batch)``, ``run(mini_batch, extra=None)``, ``run(*args)`` and
    ``run(mini_batch, mini_batch_context)`` pass; ``run()`` and
    ``run(a, b, c)`` do not.
    """
    run = getattr(module, "run", None)
    name = os.path.basename(script)
    if not callable(run):
        return (
            f"run of {name} is a {type(run).__name__}, not a function; it must "
            "take one mini-batch: def run(mini_batch), or def run(mini_batch, "
            "mini_batch_context)"
        )
    try:
        signature = inspect.signature(run)
    except (TypeError, ValueError):  # no signature to read: the call decides
        return None
    try:
        signature.bind(object())
    except TypeError:
        if _takes_context(run):
            return None
        return (
            f"run() of {name} takes `run{signature}`; it must take one "
            "mini-batch: def run(mini_batch), or def run(mini_batch, "
            "mini_batch_context)"
        )
    return None


def _takes_context(run: Callable[..., Any]) -> bool:
    """Whether ``run`` needs a second argument: Azure ML's
    ``run(mini_batch, mini_batch_context)``."""
    try:
        signature = inspect.signature(run)
    except (TypeError, ValueError):
        return False
    try:
        signature.bind(object())
        return False
    except TypeError:
        pass
    try:
        signature.bind(object(), object())
    except TypeError:
        return False
    return True


def _context(
    plugin: EntryScriptPlugin, batch: MiniBatch | SubBatch
) -> MiniBatchContext:
    """The ``mini_batch_context`` of ``batch``: a partition's key values and
    its data set (the input filtered to it), as in Azure ML."""
    if not isinstance(batch, PartitionBatch):
        return MiniBatchContext({}, batch.index, None)
    spec = plugin.input_spec
    dataset = partition_dataset(
        batch, spec.storage_options, spec.pandas_kwargs, spec.partition_format
    )
    return MiniBatchContext(batch.partition_key_value, batch.index, dataset)


def _failure(
    index: int,
    try_no: int,
    agent: str,
    items_in: int | None,
    start: float,
    exc: BaseException,
    redact: Callable[[str], str],
) -> TryResult:
    # drop daskrun's own frame so the user's file and line come first
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return TryResult(
        index=index,
        try_no=try_no,
        ok=False,
        worker=agent,
        items_in=items_in,
        items_out=0,
        seconds=time.perf_counter() - start,
        # storage errors may echo a SAS token or an account key
        error=printable(redact(f"{type(exc).__name__}: {exc}")),
        traceback=printable(
            redact("".join(traceback.format_exception(type(exc), exc, tb)))
        ),
    )


def ready_plugin(plugin_name: str) -> EntryScriptPlugin:
    """This worker's entry-script plugin ``plugin_name`` once its ``init()``
    has run; a script whose ``init()`` failed (or whose ``run()`` cannot take
    a mini-batch) raises :class:`~daskrun.EntryScriptError` saying why."""
    plugin: EntryScriptPlugin = get_worker().plugins[plugin_name]  # type: ignore[assignment]
    plugin.wait_ready()
    if plugin.module is None:
        error = plugin.init_error
        raise EntryScriptError(
            plugin.contract_error
            or f"init() failed on {plugin.agent}: {error.error if error else 'not run'}"
        )
    return plugin


def process_mini_batches(
    plugin_name: str,
    tries: Sequence[tuple[MiniBatch | SubBatch, int]],
    kept: PartitionValues | None = None,
) -> list[TryResult]:
    """The task function: run one try of each ``(mini-batch, try number)``
    in turn on this worker.

    Several cheap mini-batches share one task so that Dask's per-task cost
    (milliseconds) is paid once for all of them; each still gets its own
    part and its own :class:`TryResult`. With ``kept``, what ``run()``
    returns is kept there instead of written (``daskrun.map_partitions``).
    """
    worker = get_worker()
    plugin = ready_plugin(plugin_name)
    cache_root = os.path.join(worker.local_directory, "daskrun-cache")
    # the client's deadline for a frozen worker starts here
    worker.log_event(
        plugin.starts_topic,
        {
            "key": worker.get_current_task(),
            "address": worker.address,
            "worker": plugin.agent,
        },
    )
    results: list[TryResult] = []
    # a task of several whole mini-batches writes their rows as groups
    group = (
        _Group(plugin, results)
        if len(tries) > 1 and plugin.output and plugin.output.grouped
        else None
    )
    for batch, try_no in tries:
        held = group.rows if group is not None and _span_of(batch) is None else None
        result = _process(plugin, batch, try_no, cache_root, held, kept)
        stdout, log = plugin.capture.take()
        logged = plugin.capture.logged.take()
        if stdout or log or logged:
            result = dataclasses.replace(result, stdout=stdout, log=log, logged=logged)
        results.append(result)
        if group is not None:
            group.added()
    if group is not None:
        group.write()
    return results


class _Group:
    """The rows of a task's whole mini-batches that succeeded, held until
    they are written together (:func:`~daskrun.engine.output.write_group`), at the
    task's end or once they reach ``GROUP_BYTES``. Their results are the
    task's only once written: a group that cannot be written fails them."""

    def __init__(self, plugin: EntryScriptPlugin, results: list[TryResult]):
        self.plugin, self.results = plugin, results
        self.rows: list[tuple[int, bytes]] = []
        self._at: list[int] = []  # their places in results
        self._bytes = 0

    def added(self) -> None:
        """The last result is in: note its place if its rows are held."""
        if len(self.rows) > len(self._at):
            self._at.append(len(self.results) - 1)
            self._bytes += len(self.rows[-1][1])
            if self._bytes >= GROUP_BYTES:
                self.write()

    def write(self) -> None:
        if not self.rows:
            return
        plugin = self.plugin
        assert plugin.output is not None
        try:
            plugin.watchdog.arm(self.rows[0][0], phase="write")
            write_group(plugin.output, self.rows)
        except (Exception, SystemExit) as e:
            for at in self._at:
                done = self.results[at]
                failed = _failure(
                    done.index,
                    done.try_no,
                    plugin.agent,
                    done.items_in,
                    time.perf_counter() - done.seconds,
                    e,
                    plugin.clean,
                )
                self.results[at] = dataclasses.replace(
                    failed, stdout=done.stdout, log=done.log, logged=done.logged
                )
        finally:
            plugin.watchdog.disarm()
            self.rows, self._at, self._bytes = [], [], 0


def process_collection_batches(
    plugin_name: str,
    tries: Sequence[tuple[CollectionBatch, int]],
    *partitions: Any,
    kept: PartitionValues | None = None,
) -> list[TryResult]:
    """:func:`process_mini_batches` for partitions of a Dask collection: the
    scheduler computes each partition and hands it over as an argument."""
    return process_mini_batches(
        plugin_name,
        [
            (dataclasses.replace(batch, data=partition_items(partition)), try_no)
            for (batch, try_no), partition in zip(tries, partitions, strict=True)
        ],
        kept,
    )


class PartitionValues:
    """What ``run()`` returned for partitions of a Dask collection, kept on
    the worker as the partitions of ``daskrun.map_partitions``' result.

    ``frame``: the result is a dataframe (``True``: a DataFrame or Series
    from every partition), a bag (``False``: a list of items, as a step
    takes it: a ``str`` is refused, not split into characters), or either
    (``None``: the sample that infers which).

    >>> kept = PartitionValues(frame=False)
    >>> kept.add(0, ("a", "b")), kept.values
    (2, {0: ['a', 'b']})
    >>> kept.add(1, "ab")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    TypeError: run() returned str; return a list, tuple, array, ...
    """

    def __init__(self, frame: bool | None):
        self.frame = frame
        self.values: dict[int, Any] = {}

    def add(self, index: int, value: Any) -> int:
        """Keep ``value``, partition ``index``'s result; its items."""
        pd: Any = sys.modules.get("pandas")
        if pd is not None and isinstance(value, pd.Series):
            value = value.to_frame()
        is_frame = pd is not None and isinstance(value, pd.DataFrame)
        if self.frame and not is_frame:
            raise TypeError(
                f"run() returned {type(value).__name__}, not a DataFrame as the "
                "meta says; return a DataFrame from every partition"
            )
        check_returned(value, is_frame)
        if self.frame is False:
            value = value.to_dict("records") if is_frame else list(value)
        self.values[index] = value
        return len(value)


def partition_items(partition: Any) -> Any:
    """What ``run()`` gets of a Dask collection's partition: a DataFrame as
    it is, a bag's items (maybe a lazy iterator) as a list."""
    import pandas as pd

    if isinstance(partition, (pd.DataFrame, pd.Series)):
        return partition
    return list(partition)


def _process(
    plugin: EntryScriptPlugin,
    batch: MiniBatch | SubBatch,
    try_no: int,
    cache_root: str,
    held: list[tuple[int, bytes]] | None = None,
    kept: PartitionValues | None = None,
) -> TryResult:
    """One try of ``batch``; its rows are written as its part, or added to
    ``held`` (to be written with others, see :class:`_Group`), or what
    ``run()`` returned is ``kept``."""
    start = time.perf_counter()
    spec = plugin.input_spec
    items_in: int | None = batch.n_items
    cache: str | None = None
    mini_batch: Any
    watchdog = plugin.watchdog
    try:
        # reading (a remote copy, a CSV that is a FIFO or on a hung mount) and
        # writing are bounded by the same timeout as run()
        watchdog.arm(batch.index, phase="read", piece=_piece_of(batch))
        mini_batch, read_items, cache = _read(spec, batch, cache_root)
        items_in = read_items if read_items is not None else items_in
        watchdog.arm(batch.index, phase="run", piece=_piece_of(batch))
        args = (_context(plugin, batch),) if plugin.takes_context else ()
        with plugin.capture.redirect():
            result = plugin.module.run(mini_batch, *args)  # type: ignore[union-attr]
        watchdog.arm(batch.index, phase="write", piece=_piece_of(batch))
        output_format = plugin.output.output_format if plugin.output else "text"
        try:
            if kept is not None:
                items_out = kept.add(batch.index, result)
            else:
                data, items_out = format_rows(result, output_format)
        except Exception as e:  # about what run() returned
            return _returned(plugin, batch.index, try_no, items_in, start, e)
        rows = None
        if kept is None and held is not None:
            held.append((batch.index, data))
        elif kept is None and plugin.output is not None:
            rows = plugin.output.keep(batch.index, data, _span_of(batch))
    except (Exception, SystemExit) as e:
        return _failure(
            batch.index, try_no, plugin.agent, items_in, start, e, plugin.clean
        )
    finally:
        watchdog.disarm()
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    return TryResult(
        index=batch.index,
        try_no=try_no,
        ok=True,
        worker=plugin.agent,
        items_in=items_in,
        items_out=items_out,
        seconds=time.perf_counter() - start,
        rows=rows,
    )


def _read(
    spec: InputSpec, batch: MiniBatch | SubBatch, cache_root: str
) -> tuple[Any, int | None, str | None]:
    """What ``run()`` receives for ``batch``, its items where reading counts
    them (rows), and the folder to delete afterwards. A piece of a failed
    mini-batch (:class:`~daskrun.backends.inputs.datasets.SubBatch`) gets a slice of its
    files, or its parent's rows read as for the parent and sliced."""
    return batch.read(spec, cache_root)


def _piece_of(batch: MiniBatch | SubBatch) -> int | None:
    """The first item of a piece of a failed mini-batch, for the events that
    name what hung; ``None`` for a whole mini-batch."""
    return batch.start if isinstance(batch, SubBatch) else None


def _span_of(batch: MiniBatch | SubBatch) -> tuple[int, int] | None:
    """The items a piece's part holds; ``None`` for a whole mini-batch's."""
    return (batch.start, batch.stop) if isinstance(batch, SubBatch) else None


def _returned(
    plugin: EntryScriptPlugin,
    index: int,
    try_no: int,
    items_in: int | None,
    start: float,
    exc: Exception,
) -> TryResult:
    """A try whose ``run()`` returned what cannot be written: the error is
    about ``run()``, and its traceback names ``run``'s ``def``, not
    daskrun's output code."""
    error = f"{type(exc).__name__}: {exc}"
    if not str(exc).startswith("run() returned"):
        error = (
            f"{type(exc).__name__}: what run() returned cannot be written "
            f"as {plugin.output.output_format if plugin.output else 'text'}: {exc}"
        )
    run = plugin.module.run if plugin.module is not None else None
    code = getattr(run, "__code__", None)
    where = ""
    if code is not None:
        line = linecache.getline(code.co_filename, code.co_firstlineno).strip()
        where = (
            f'  File "{code.co_filename}", line {code.co_firstlineno}, '
            f"in {code.co_name}\n" + (f"    {line}\n" if line else "")
        )
    return TryResult(
        index=index,
        try_no=try_no,
        ok=False,
        worker=plugin.agent,
        items_in=items_in,
        items_out=0,
        seconds=time.perf_counter() - start,
        error=printable(plugin.clean(error)),
        traceback=printable(
            plugin.clean(f"Traceback (most recent call last):\n{where}{error}\n")
        ),
    )
