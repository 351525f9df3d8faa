"""What native code writes to a worker process's stdout and stderr.

Native libraries write to file descriptors 1 and 2 themselves, beneath
Python's ``sys.stdout``: TensorFlow's C++ start-up lines (absl, oneDNN) as
it is imported and as its first graph runs, a CUDA notice, a C library's
``printf``. A local cluster's worker processes share those descriptors with
the terminal or notebook kernel that started them, so every worker's lines
reached the user. Azure ML keeps them in the run's logs, and so does
daskrun: while the entry script's code runs (``init()``, ``run()``), both
descriptors of a worker process point to a temporary file, whose text
travels with each result to ``logs/user/stdout/<worker>.txt``. What Python
code writes to ``sys.stderr`` meanwhile still reaches the worker's stderr
(:attr:`FdCapture.terminal`), as it does without the capture.

Only a worker in a process of its own is captured (one a Nanny started):
in a process shared with the client, the descriptors are the client's too.

>>> capture = FdCapture()
>>> with capture.held():
...     _ = os.write(1, b"from native code\\n")
>>> capture.take()
'from native code\\n'

Once taken with nothing held, the file is emptied: a warm worker's stays
as small as one call's output.

>>> capture.size()
0
>>> with capture.held():
...     _ = os.write(2, b"again\\n")
>>> capture.take(), capture.size()
('again\\n', 0)
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import TextIO

__all__ = ["CAPTURE", "FdCapture"]


class FdCapture:
    """Descriptors 1 and 2 of this process, sent to a temporary file while
    held (by several threads at once, too); :meth:`take` returns what was
    written since the last call, and :attr:`terminal` writes where
    descriptor 2 went before (for Python's own messages, which are not
    captured)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._saved: tuple[int, int] | None = None
        self._fd: int | None = None  # the temporary file, kept across holds
        self._read = 0
        self.terminal: TextIO | None = None  # stays open: handlers keep it

    @contextlib.contextmanager
    def held(self) -> Iterator[TextIO]:
        """Within this, what is written to descriptors 1 and 2 is kept;
        yields :attr:`terminal`."""
        with self._lock:
            if self._holders == 0:
                _flush()
                if self._fd is None:
                    fd, path = tempfile.mkstemp(prefix="daskrun-native-")
                    os.unlink(path)  # gone with the process
                    self._fd = fd
                if self.terminal is None:
                    self.terminal = os.fdopen(
                        os.dup(2), "w", buffering=1, errors="backslashreplace"
                    )
                else:  # descriptor 2 as it is now
                    self.terminal.flush()
                    os.dup2(2, self.terminal.fileno())
                self._saved = (os.dup(1), os.dup(2))
                os.dup2(self._fd, 1)
                os.dup2(self._fd, 2)
            self._holders += 1
            terminal = self.terminal
            assert terminal is not None  # opened by the first hold
        try:
            yield terminal
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0 and self._saved is not None:
                    _flush()
                    for fd, saved in zip((1, 2), self._saved, strict=True):
                        os.dup2(saved, fd)
                        os.close(saved)
                    self._saved = None

    def take(self) -> str:
        """What was written since the last call (undecodable bytes
        replaced)."""
        with self._lock:
            if self._fd is None:
                return ""
            end = os.fstat(self._fd).st_size
            # pread: the descriptors share the file's offset with writers
            data = os.pread(self._fd, end - self._read, self._read)
            self._read += len(data)
            if self._holders == 0:
                # nobody writes to it now: empty it, so a warm worker's
                # file does not grow with every call it ever captured (the
                # descriptors' shared offset goes back to the start too)
                os.ftruncate(self._fd, 0)
                os.lseek(self._fd, 0, os.SEEK_SET)
                self._read = 0
        return data.decode("utf-8", "replace")

    def size(self) -> int:
        """The temporary file's size in bytes (0 before the first hold)."""
        with self._lock:
            return 0 if self._fd is None else os.fstat(self._fd).st_size


def _flush() -> None:
    # Python's own buffered text goes where it was meant to before a swap
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


# one per process: the descriptors are the process's
CAPTURE = FdCapture()
