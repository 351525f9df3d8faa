"""The entry script in a WorkerPlugin, run once per worker process.

:class:`EntryScriptPlugin` carries the script (and its ``source_directory``)
as zip bytes (:mod:`daskrun.engine.bundle`), like distributed's
``UploadFile``, so workers that cannot see the client's disk run it too; what
it runs and how is one value, :class:`PluginSettings`. ``setup()`` unpacks
it, puts it on ``sys.path``, sets ``sys.argv`` and the environment, imports it
and calls ``init()`` once per worker process; ``teardown()`` calls
``shutdown()``. The mini-batch task that calls ``run()`` is
:mod:`daskrun.engine.tasks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import inspect
import io
import linecache
import logging
import os
import posixpath
import shutil
import sys
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
from daskrun.backends.storage import hide, hide_values
from daskrun.engine.fdcapture import CAPTURE
from daskrun.engine.output import OutputTarget, printable
from daskrun.engine.pools import pool_names, runs_init
from daskrun.exceptions import EntryScriptError
from daskrun.monitoring.resources import INIT, ResourceSampler, perf_topic

if TYPE_CHECKING:
    pass
from daskrun.engine.watchdog import Watchdog, agent_name, init_timeout

logger = logging.getLogger("daskrun")
_ENTRY_MODULE = "daskrun_entry_"  # + the plugin's name: the entry script's module


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
        return self._plugin.settings.output_path

    @property
    def agent_name(self) -> str:
        return self._plugin.agent


@dataclass(frozen=True)
class PluginSettings:
    """What an :class:`EntryScriptPlugin` runs, and how: one value, made on
    the client, that travels to every worker with the plugin.

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
    input_spec : InputSpec
        How a worker reads the mini-batches.
    run_invocation_timeout : float
        Seconds a ``run()`` may take (``init()``: see :func:`init_timeout`).
    output : OutputTarget, optional
        Where the rows go; ``None``: what ``run()`` returns is kept
        (``daskrun.map_partitions``).
    logging_level : str
        The level of the script's logger.
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

    name: str
    bundle: bytes = field(repr=False)
    script: str
    script_display: str
    output_path: str
    input_spec: InputSpec
    run_invocation_timeout: float
    arguments: Sequence[Any] = ()
    side_inputs: Sequence[SideInput] = ()
    environment_variables: Mapping[str, str] = field(default_factory=dict)
    output: OutputTarget | None = None
    models: Sequence[ModelRef] | None = None
    logging_level: str = "INFO"
    secrets: Sequence[str] = field(default=(), repr=False)
    source_directory: str | None = None
    experiment: str | None = None
    parent_id: str | None = None
    resource_interval: float | None = None


class EntryScriptPlugin(WorkerPlugin):
    """Runs the entry script's ``init()`` once per worker process.

    Parameters
    ----------
    settings : PluginSettings
        The script, its bundle and how it runs.
    """

    def __init__(self, settings: PluginSettings):
        self.settings = settings
        self.name = settings.name
        self.sampler: ResourceSampler | None = None  # started in setup()
        self.module: ModuleType | None = None
        self.init_error: TryResult | None = None
        # run() cannot take a mini-batch: one line, found before init()
        self.contract_error: str | None = None
        # run(mini_batch, mini_batch_context): set once the script is loaded
        self.takes_context = False
        # a two-stage step's pools: no init() in its CPU pool (engine.pools)
        self.pools, self.resources = pool_names(), dict[str, float]()

    def set_output(self, output: OutputTarget | None) -> None:
        """Write to ``output`` instead (a preflight may choose another
        target), before the plugin is registered."""
        self.settings = dataclasses.replace(self.settings, output=output)

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
        return hide(text, self.settings.secrets)

    def clean(self, text: str) -> str:
        """:meth:`redact`, and the worker's copy of the source directory
        named by its path on the client, as the user knows the files."""
        folder = getattr(self, "folder", None)
        if folder and self.settings.source_directory:
            text = text.replace(
                folder + os.sep, self.settings.source_directory + os.sep
            )
        return self.redact(text)

    async def setup(self, worker: Any) -> None:
        self._ready = threading.Event()
        self.folder = os.path.join(worker.local_directory, "daskrun", self.name)
        self.agent = agent_name(worker)
        self.resources = dict(getattr(worker.state, "total_resources", {}))
        # a worker a Nanny started has a process of its own, whose native
        # output is captured; in the client's process it is the client's
        self.capture = _Capture(
            self.agent,
            self.settings.logging_level,
            self.settings.secrets,
            native=bool(getattr(worker, "nanny", None)),
        )
        loop = asyncio.get_running_loop()
        self.watchdog = Watchdog(
            worker, self.events_topic, self.agent, self.settings.run_invocation_timeout
        )
        self.watchdog.arm(INIT, init_timeout(self.settings.run_invocation_timeout))
        # before init(): the memory a model takes to load is seen too
        self.sampler = (
            ResourceSampler(
                worker,
                self.perf_topic,
                self.agent,
                self.settings.resource_interval,
                self.watchdog.running,
            )
            if self.settings.resource_interval
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
            with zipfile.ZipFile(io.BytesIO(self.settings.bundle)) as zf:
                zf.extractall(self.folder)
            _import_only_from(self.folder)
            os.environ.update(self.settings.environment_variables)
            os.environ["DASKRUN_OUTPUT_PATH"] = self.settings.output_path
            os.environ["AZUREML_BI_OUTPUT_PATH"] = self.settings.output_path
            models = self.settings.models
            set_worker_models(None if models is None else list(models))
            # Azure ML's imports (azureml.core, azureml_user.parallel_run)
            # resolve to daskrun's where the SDK is not installed
            install_entry_script_shims()
            set_worker_run(
                WorkerRun(
                    self.run_id,
                    self.settings.experiment,
                    self.settings.parent_id,
                    self.capture.logged,
                )
            )
            path = os.path.join(self.folder, self.settings.script)
            local = {
                id(s): s.materialize(self.folder) for s in self.settings.side_inputs
            }
            sys.argv = [
                path,
                *(
                    local[id(a)] if isinstance(a, SideInput) else str(a)
                    for a in self.settings.arguments
                ),
            ]
            module_name = _ENTRY_MODULE + self.name.replace("-", "_")
            module = ModuleType(module_name)
            module.__file__ = path
            sys.modules[module_name] = module
            # tracebacks name the script as the user knows it, with its source
            # lines even where that path does not exist on this worker
            source = Path(path).read_text()
            linecache.cache[self.settings.script_display] = (
                len(source),
                None,
                source.splitlines(True),
                self.settings.script_display,
            )
            code = compile(source, self.settings.script_display, "exec")
            global _current
            _current = self
            with self.capture.redirect():
                exec(code, module.__dict__)
                # before init(), which may load a model for minutes
                self.contract_error = _check_run(module, self.settings.script)
                if self.contract_error is not None:
                    return
                self.takes_context = _takes_context(module.run)
                if runs_init(module, self.resources, self.pools):
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
            if runs_init(module, self.resources, self.pools):  # as init()
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


def _failure(
    index: int,
    try_no: int,
    agent: str,
    items_in: int | None,
    start: float,
    exc: BaseException,
    redact: Callable[[str], str],
) -> TryResult:
    # drop daskrun's own frame (this module's, or the task's in tasks.py) so
    # the user's file and line come first
    tb = exc.__traceback__
    here = os.path.dirname(__file__)
    if tb is not None and os.path.dirname(tb.tb_frame.f_code.co_filename) == here:
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
