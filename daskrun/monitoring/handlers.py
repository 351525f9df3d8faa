"""Logging handlers of a run: where log records go.

distributed's own lines (and those of Tornado and asyncio under it) go to
the run's ``sys/distributed.log`` instead of the terminal while a step runs
(:func:`distributed_log`; in each local worker process,
:func:`log_distributed_to`). The lines a :class:`~daskrun.monitoring.console.Console`
logs (``daskrun.progress``) reach the terminal through daskrun's
:class:`TerminalHandler`, above the progress bar.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Iterator
from typing import IO, Any

from daskrun.backends.storage import private_file, private_folder, private_open

# file names that are not UTF-8 (lone surrogates from os.fsdecode) are
# written escaped, as \udce9, rather than failing the log
_ESCAPE = "backslashreplace"

# distributed's loggers and those of the event loop it runs on: Tornado's
# "Exception in callback", asyncio's "Task exception was never retrieved"
_DISTRIBUTED_LOGGERS = ("distributed", "tornado", "asyncio")


class _DistributedLogRoute:
    """Sends the records of distributed's loggers to log files instead of
    their own handlers (distributed's is the terminal).

    Routes overlap (steps run side by side in threads): while any is open,
    each open file gets every record, and the loggers get their own
    handlers back when the last one closes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, tuple[logging.Handler, int]] = {}
        self._saved: dict[str, tuple[list[logging.Handler], bool]] = {}

    def open(self, path: str | os.PathLike[str]) -> None:
        key = os.path.abspath(path)
        with self._lock:
            if key in self._files:
                handler, count = self._files[key]
                self._files[key] = handler, count + 1
                return
            private_folder(os.path.dirname(key))
            private_file(key)  # logging's handler would make it 0644
            handler = logging.FileHandler(key, encoding="utf-8", errors=_ESCAPE)
            handler.setFormatter(
                logging.Formatter(
                    "%(asctime)s pid %(process)d %(name)s %(levelname)s: %(message)s"
                )
            )
            if not self._files:
                # distributed gives its handler to each logger it configures
                # ("distributed.client", "tornado.application", ...): they all
                # lose theirs, and pass their records up to ours
                for name in _logger_names():
                    logger = logging.getLogger(name)
                    self._saved[name] = list(logger.handlers), logger.propagate
                    for own in self._saved[name][0]:
                        logger.removeHandler(own)
                    logger.propagate = name not in _DISTRIBUTED_LOGGERS
            for name in _DISTRIBUTED_LOGGERS:
                logging.getLogger(name).addHandler(handler)
            self._files[key] = handler, 1

    def only(self, path: str | os.PathLike[str]) -> None:
        """Route to ``path`` alone, closing the files routed to so far."""
        key = os.path.abspath(path)
        if key not in self._files:
            self.open(path)  # first: closing the last file restores the terminal
        with self._lock:
            others = [k for k in self._files if k != key]
        for other in others:
            while other in self._files:
                self.close(other)

    def path(self) -> str | None:
        """The first open file, if any."""
        with self._lock:
            return next(iter(self._files), None)

    def close(self, path: str | os.PathLike[str]) -> None:
        key = os.path.abspath(path)
        with self._lock:
            handler, count = self._files[key]
            if count > 1:
                self._files[key] = handler, count - 1
                return
            del self._files[key]
            for name in _DISTRIBUTED_LOGGERS:
                logging.getLogger(name).removeHandler(handler)
            handler.close()
            if not self._files:
                for name, (handlers, propagate) in self._saved.items():
                    logger = logging.getLogger(name)
                    for own in handlers:
                        logger.addHandler(own)
                    logger.propagate = propagate
                self._saved.clear()


def _logger_names() -> list[str]:
    """The loggers made so far in distributed's hierarchies, and their tops."""
    made = list(logging.Logger.manager.loggerDict)
    return [
        name
        for name in dict.fromkeys([*_DISTRIBUTED_LOGGERS, *made])
        if name in _DISTRIBUTED_LOGGERS
        or (
            name.startswith(tuple(f"{top}." for top in _DISTRIBUTED_LOGGERS))
            and isinstance(logging.Logger.manager.loggerDict[name], logging.Logger)
        )
    ]


_route = _DistributedLogRoute()


@contextlib.contextmanager
def distributed_log(path: str | os.PathLike[str]) -> Iterator[None]:
    """Within this, distributed's log lines in this process go to ``path``
    (appended), not to the terminal: a run's ``sys/distributed.log``.

    On the way out, the collector runs once: an asyncio task that failed
    unseen (a worker's start, say) logs "Task exception was never
    retrieved" when it is freed, and it is freed here, not at exit.
    """
    _route.open(path)
    try:
        yield
    finally:
        import gc

        gc.collect()
        _route.close(path)


def log_distributed_to(path: str) -> None:
    """Send distributed's log lines to ``path`` for the rest of this process:
    run by each local worker process as it starts (see
    ``local._worker_log_options``). So does the traceback that
    multiprocessing prints when the process's function raised, see
    :class:`_ExitTracebackToLog`."""
    _route.open(path)
    if not isinstance(sys.stderr, _ExitTracebackToLog):
        sys.stderr = _ExitTracebackToLog(sys.stderr, path)


def log_distributed_only_to(path: str) -> None:
    """:func:`log_distributed_to` ``path`` instead of the files so far: a
    warm local worker's lines go to the job that now uses it."""
    _route.only(path)
    stderr = sys.stderr
    if isinstance(stderr, _ExitTracebackToLog):
        stderr.path = path
    else:
        sys.stderr = _ExitTracebackToLog(stderr, path)


class _ExitTracebackToLog:
    """``sys.stderr`` of a local worker process: what is written goes to the
    process's own stderr (user code's messages, say), until multiprocessing
    writes ``Process <name>:``, the head of the traceback of a process
    function that raised. That function is distributed's worker loop, never
    the user's code (whose errors are caught and reported), and it raises
    in races of distributed's own shutdown (a worker closed while it still
    starts): that traceback, and the rest of the process's stderr, goes to
    the log file.
    """

    def __init__(self, stream: Any, path: str):
        self._stream = stream
        self.path = path  # the log file; a warm worker changes it
        self._head = f"Process {multiprocessing.current_process().name}:\n"
        self._log: IO[str] | None = None

    def write(self, text: str) -> int:
        if self._log is None and text == self._head:
            self._log = private_open(  # open while the process lives
                self.path, "a", encoding="utf-8", errors=_ESCAPE, buffering=1
            )
        return int((self._log or self._stream).write(text))

    def flush(self) -> None:
        (self._log or self._stream).flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


# the lines a run shows: progress (off a terminal), the summary, failures
progress_logger = logging.getLogger("daskrun.progress")


class TerminalHandler(logging.Handler):
    """daskrun's default handler, on the ``daskrun`` logger: it prints the
    records a :class:`Console` logs on that console (above its progress bar),
    when the console shows output (``show_output=True``); other records pass
    it by. Records go on up to the root logger as any library's do, so a
    handler of one's own, or a level (``logging.getLogger("daskrun")
    .setLevel(logging.WARNING)`` keeps failures and the summary of a failed
    run, not progress), works as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(shown_by_console)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            console = record.__dict__["daskrun_console"]
            if console.show:
                console.write(record.getMessage())
        except Exception:
            self.handleError(record)


def shown_by_console(record: logging.LogRecord) -> bool:
    """Whether ``record`` is a line a :class:`Console` logged (and daskrun's
    terminal handler prints): for another handler to the terminal to skip."""
    return "daskrun_console" in record.__dict__


_terminal_lock = threading.Lock()
_terminal_installed = False


def install_terminal_handler() -> None:
    """Give the ``daskrun`` logger its :class:`TerminalHandler` (once, so
    one a user removed stays removed) and, where no level is set, INFO."""
    global _terminal_installed
    with _terminal_lock:
        if _terminal_installed:
            return
        _terminal_installed = True
        top = logging.getLogger("daskrun")
        if top.level == logging.NOTSET:
            top.setLevel(logging.INFO)
        top.addHandler(TerminalHandler())
