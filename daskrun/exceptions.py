"""The exceptions daskrun raises.

::

    DaskRunError
    ├── ConfigError(ValueError)        a bad parameter; CLI exit status 2
    ├── InputError(ValueError)         a missing, empty or unreadable input; exit 2
    ├── EntryScriptError               init() failed on a worker
    └── JobFailedError                 the job ended Failed or Canceled; exit 1
        ├── ThresholdExceededError     error_threshold, allowed_failed_count or
        │                              allowed_failed_percent was exceeded
        └── OutputError                the output could not be published

Usage errors (``ConfigError``, ``InputError``) are raised before any task runs.
Their messages name the bad value and show the fix.
"""

from __future__ import annotations


class DaskRunError(Exception):
    """Base class of every error daskrun raises on purpose."""


class ConfigError(DaskRunError, ValueError):
    """A parameter of ``ParallelRunConfig`` or ``ParallelRunStep`` is invalid."""


class InputError(DaskRunError, ValueError):
    """An input path is missing, empty or cannot be read."""


class EntryScriptError(DaskRunError):
    """The entry script's ``init()`` failed on a worker."""


class JobFailedError(DaskRunError):
    """The job ended ``Failed`` or ``Canceled``.

    Attributes
    ----------
    status : str
        ``"Failed"`` or ``"Canceled"``.
    run_id : str
        The run that failed.
    """

    def __init__(self, message: str, *, status: str = "Failed", run_id: str = ""):
        super().__init__(message)
        self.status = status
        self.run_id = run_id


class ThresholdExceededError(JobFailedError):
    """A failure threshold was exceeded.

    Attributes
    ----------
    threshold : str
        The parameter that was exceeded, e.g. ``"error_threshold"``.
    limit : float
        Its value.
    observed : float
        The count (or percentage) that exceeded it.
    """

    def __init__(
        self,
        message: str,
        *,
        threshold: str,
        limit: float,
        observed: float,
        run_id: str = "",
    ):
        super().__init__(message, status="Failed", run_id=run_id)
        self.threshold = threshold
        self.limit = limit
        self.observed = observed


class OutputError(JobFailedError):
    """The results could not be published as one output file: mini-batches
    returned different columns, or the output's storage refused the write.
    Nothing was published; the mini-batches' parts are kept."""
