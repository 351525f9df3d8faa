"""The exceptions daskrun raises.

::

    DaskRunError
    ├── ConfigError(ValueError)        a bad parameter; CLI exit status 2
    ├── InputError(ValueError)         a missing, empty or unreadable input; exit 2
    ├── EntryScriptError               init() failed on a worker
    ├── StorageError                   a datastore refused or did not answer
    │   │                              (upload, download, listing); exit 1
    │   └── StorageTimeoutError(TimeoutError)
    │                                  a bounded storage call did not answer
    │                                  within daskrun.storage-timeout
    ├── RunTimeoutError(TimeoutError)  wait_for_completion(timeout_seconds=...)
    │                                  ran out; the run goes on
    ├── NotProvidedError(ImportError)  an Azure ML name that daskrun's stand-in
    │                                  modules (install_as_azureml()) lack
    ├── Canceled                       raised inside a run to stop it (its
    │                                  PipelineRun was canceled); recorded as
    │                                  the status ``Canceled``
    └── JobFailedError                 the job ended Failed or Canceled; exit 1
        ├── ThresholdExceededError     error_threshold, allowed_failed_count or
        │                              allowed_failed_percent was exceeded
        ├── ClusterLostError           the cluster it ran on died or froze
        │                              mid-job; resumable
        ├── UnreachableDataError       a host's workers cannot reach an input
        │                              or the output (the client's own disk);
        │                              found before any mini-batch
        └── OutputError                the output could not be published

Usage errors (``ConfigError``, ``InputError``) are raised before any task runs.
Their messages name the bad value and show the fix. Storage and I/O
failures are mapped in one place, :func:`daskrun.backends.storage.map_errors`
(``StorageError`` through :func:`~daskrun.backends.storage.storage_errors`,
which names the datastore and never shows its credentials); a storage
timeout is a ``StorageTimeoutError`` (exit 1), listing or reading alike, and
a bug (``TypeError``, ``AttributeError``...) is never relabelled.
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


class StorageError(DaskRunError):
    """A datastore's storage refused a call or could not be reached: a
    network error, a bad credential, a failed upload or download.

    Attributes
    ----------
    datastore : str
        The datastore's name (or the storage's URL, where no datastore is
        registered for it).
    action : str
        What was being done, e.g. ``"upload"``.
    """

    def __init__(self, message: str, *, datastore: str = "", action: str = ""):
        super().__init__(message)
        self.datastore = datastore
        self.action = action


class StorageTimeoutError(StorageError, TimeoutError):
    """A bounded storage call did not answer within ``daskrun.storage-timeout``
    seconds (cloud SDKs would otherwise retry an unreachable endpoint for
    minutes)."""


class RunTimeoutError(DaskRunError, TimeoutError):
    """``wait_for_completion(timeout_seconds=...)`` ran out before the run
    ended; the run itself goes on."""


class NotProvidedError(DaskRunError, ImportError):
    """``from azureml.core import X`` after ``install_as_azureml()``, where
    daskrun provides no ``X``: the message says what to use instead."""


class Canceled(DaskRunError):
    """Raised inside a run to stop it: its PipelineRun was canceled."""


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


class ClusterLostError(JobFailedError):
    """The cluster a job ran on (one it did not start: ``daskrun cluster
    start``'s, a scheduler address) died or stopped answering mid-job. What
    finished is kept; ``daskrun resume`` runs the rest.

    Attributes
    ----------
    address : str
        The scheduler's address.
    """

    def __init__(self, address: str, *, run_id: str = ""):
        super().__init__(
            f"the cluster at {address} stopped answering mid-job", run_id=run_id
        )
        self.address = address


class OutputError(JobFailedError):
    """The results could not be published as one output file: mini-batches
    returned different columns, or the output's storage refused the write.
    Nothing was published; the mini-batches' parts are kept."""


class UnreachableDataError(JobFailedError):
    """The workers of some host cannot reach an input or the output that the
    client sees (a folder on the client's own disk, on a cluster of several
    hosts); found before any mini-batch runs.

    Attributes
    ----------
    path : str
        The input file or output folder.
    host : str
        The host whose worker could not reach it.
    """

    def __init__(self, message: str, *, path: str, host: str, run_id: str = ""):
        super().__init__(message, run_id=run_id)
        self.path = path
        self.host = host
