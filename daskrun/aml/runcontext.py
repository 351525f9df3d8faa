"""``Run.get_context()`` for entry scripts: metrics and tags of the step run.

An Azure ML entry script logs through the run it runs in::

    from azureml.core import Run
    run = Run.get_context()
    run.log("rows", len(mini_batch))

On a daskrun worker :meth:`Run.get_context` is the step run: what the script
logs is kept in memory (:class:`Logged`), travels to the client with each
mini-batch's result (as printed lines do) and lands in the run record, shown
by ``daskrun runs show``. Elsewhere it is an offline run that keeps its
metrics in memory, as Azure ML's offline run does. This module is engine
side: a worker never loads the registry for it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# each entry: (run: "self" or "parent", kind, name, value)
Entry = tuple[str, str, str, Any]


class Logged:
    """What was logged since it was last taken, in order; thread-safe.

    ``redact`` hides the run's storage credentials in each entry (names and
    values) before it is kept.
    """

    def __init__(self, redact: Callable[[Any], Any] | None = None) -> None:
        self._entries: list[Entry] = []
        self._lock = threading.Lock()
        self._redact = redact

    def add(self, run: str, kind: str, name: str, value: Any) -> Entry:
        """Keep an entry; returns it as kept."""
        entry: Entry = (run, kind, name, value)
        if self._redact is not None:
            entry = self._redact(entry)
        with self._lock:
            self._entries.append(entry)
        return entry

    def take(self) -> tuple[Entry, ...]:
        with self._lock:
            entries, self._entries = tuple(self._entries), []
        return entries


@dataclass
class RunLog:
    """A run's metrics and tags, merged as Azure ML shows them
    (``run.get_metrics()``): a name logged once is a value, logged again a
    list; ``log_list`` a list; ``log_row`` a table of columns.

    >>> log = RunLog()
    >>> log.add([("self", "log", "loss", 0.5), ("self", "log", "loss", 0.25),
    ...          ("self", "log_row", "t", {"x": 1}), ("self", "tag", "k", "v")])
    >>> log.metrics, log.tags
    ({'loss': [0.5, 0.25], 't': {'x': [1]}}, {'k': 'v'})
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)

    def add(self, entries: Iterable[Sequence[Any]]) -> None:
        for _, kind, name, value in entries:
            _ADD.get(kind, RunLog._log)(self, name, value)

    def _tag(self, name: str, value: Any) -> None:
        self.tags[name] = value

    def _log_list(self, name: str, value: Any) -> None:
        self.metrics[name] = list(value)

    def _log_row(self, name: str, value: Any) -> None:
        table = self.metrics.setdefault(name, {})
        if not isinstance(table, dict):  # a name used for a value too
            table = self.metrics[name] = {"value": _as_list(table)}
        for column, cell in value.items():
            table.setdefault(column, []).append(cell)

    def _log(self, name: str, value: Any) -> None:
        if name not in self.metrics:
            self.metrics[name] = value
        else:
            self.metrics[name] = [*_as_list(self.metrics[name]), value]


# what each kind of entry does to a RunLog; any other kind is a logged value
_ADD = {"tag": RunLog._tag, "log_list": RunLog._log_list, "log_row": RunLog._log_row}


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


@dataclass(frozen=True)
class WorkerRun:
    """The step run as a worker knows it: set by the entry-script plugin."""

    run_id: str
    experiment: str | None
    parent_id: str | None
    logged: Logged


_current: WorkerRun | None = None


def set_worker_run(run: WorkerRun | None) -> None:
    global _current
    _current = run


class Experiment:
    """The experiment of a run, as ``run.experiment`` has it: its ``name``."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"Experiment(name={self.name!r})"


class Run:
    """The run an entry script runs in, as Azure ML's ``Run``.

    ``Run.get_context()`` gives the step run on a daskrun worker and an
    offline run elsewhere. ``log``, ``log_list``, ``log_row`` and ``tag``
    record metrics and tags; ``id``, ``experiment`` and ``parent`` say where
    the run belongs. What ``run.parent`` logs is kept with the step run and
    shown as the pipeline run's.

    Examples
    --------
    >>> run = Run.get_context()
    >>> run.log("accuracy", 0.95)
    >>> run.get_metrics()
    {'accuracy': 0.95}
    >>> run.id.startswith("OfflineRun_")
    True
    """

    def __init__(
        self,
        run_id: str,
        experiment: str | None = None,
        parent: Run | None = None,
        _sink: Logged | None = None,
        _which: str = "self",
    ):
        self.id = run_id
        self._experiment = experiment
        self._parent = parent
        self._sink = _sink
        self._which = _which
        self._log = RunLog()  # what this process logged, for get_metrics()

    @classmethod
    def get_context(cls, allow_offline: bool = True, **_: Any) -> Run:
        """The step run on a daskrun worker; an offline run elsewhere."""
        worker = _current
        if worker is None:
            if not allow_offline:
                raise RuntimeError(
                    "Run.get_context(allow_offline=False) outside a daskrun "
                    "worker: there is no run here; call it in init() or run() "
                    "of an entry script, or pass allow_offline=True"
                )
            return cls(_offline_id())
        parent = None
        if worker.parent_id is not None:
            parent = cls(
                worker.parent_id, worker.experiment, None, worker.logged, "parent"
            )
        return cls(worker.run_id, worker.experiment, parent, worker.logged)

    @property
    def experiment(self) -> Experiment:
        return Experiment(self._experiment or "daskrun")

    @property
    def parent(self) -> Run | None:
        """The pipeline run of a step run; ``None`` for a step run alone."""
        return self._parent

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, experiment={self.experiment.name!r})"

    def _add(self, kind: str, name: str, value: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"metric name {name!r} is not a non-empty string; use e.g. "
                "run.log('accuracy', 0.95)"
            )
        entry: Entry = (self._which, kind, name, value)
        if self._sink is not None:  # redacted there: get_metrics() shows that
            entry = self._sink.add(*entry)
        self._log.add([entry])

    def log(
        self, name: str, value: Any, description: str = "", step: Any = None
    ) -> None:
        """Log a value; a name logged again becomes a list of values."""
        self._add("log", name, _plain(name, value))

    def log_list(self, name: str, value: Sequence[Any], description: str = "") -> None:
        """Log a list of values under ``name``."""
        self._add("log_list", name, [_plain(name, v) for v in value])

    def log_row(self, name: str, description: str | None = None, **kwargs: Any) -> None:
        """Add a row to the table ``name``: ``run.log_row("t", x=1, y=2)``."""
        self._add("log_row", name, {k: _plain(name, v) for k, v in kwargs.items()})

    def tag(self, key: str, value: Any = None) -> None:
        """Tag the run: ``key``, with ``value`` or an empty string."""
        self._add("tag", key, "" if value is None else str(value))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.tag(key, value)

    def get_metrics(self, name: str | None = None, **_: Any) -> dict[str, Any]:
        """What this process logged on this run (all workers' metrics are
        in the run record: ``step_run.get_metrics()``)."""
        metrics = self._log.metrics
        return dict(metrics) if name is None else {name: metrics[name]}

    def get_tags(self) -> dict[str, Any]:
        return dict(self._log.tags)

    def complete(self, **_: Any) -> None:
        """The step run completes when its job does; kept for scripts."""

    def flush(self, **_: Any) -> None:
        """Metrics travel with each mini-batch's result; nothing to flush."""


def _plain(name: str, value: Any) -> Any:
    """``value`` as JSON can hold it (numpy scalars become Python ones)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            plain = item()
        except (TypeError, ValueError):
            plain = None
        if isinstance(plain, (str, int, float, bool)):
            return plain
    raise TypeError(
        f"metric {name!r}: {type(value).__name__} {value!r} is not a number, "
        "string or bool; log float(value) or str(value)"
    )


_offline_lock = threading.Lock()
_offline_count = 0


def _offline_id() -> str:
    global _offline_count
    with _offline_lock:
        _offline_count += 1
        return f"OfflineRun_{os.getpid()}_{_offline_count}"
