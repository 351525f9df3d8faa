"""CPU feeding GPU in one step: ``preprocess()`` and ``run()`` as two stages.

An entry script may define ``preprocess(mini_batch)`` besides ``run()``
(:func:`script_has_preprocess` reads the script's source on the client, it
is never imported here). :class:`TwoStage` then submits each try as two
tasks: :func:`~daskrun.engine.prepare.preprocess_mini_batches` on a worker
of the CPU pool (Dask resource ``daskrun.preprocess.cpu-resource``), and
:func:`~daskrun.engine.tasks.process_mini_batches` on a worker of the run
pool (``daskrun.preprocess.run-resource``, e.g. ``GPU``), which takes the
first task's future: the preprocessed batch stays in the CPU worker's memory
until Dask moves it to the run worker, and is released with the run task.

Back-pressure: the runner keeps at most ``run slots + ahead`` tries in
flight (:meth:`TwoStage.limit`), one mini-batch each, and submits more only
as runs finish; so while every run slot is busy, at most ``ahead``
preprocessed mini-batches wait, and memory stays bounded.

Everything else is the runner's as for a one-stage step: the run task is the
one watched, so a ``preprocess()`` that raises is a failed try (retried,
then isolated by halving, each piece preprocessed again), one that hangs is
stopped by its worker's watchdog and named (:class:`StageLostTasks`), and a
worker lost in either pool loses the try, which runs again; rows are written
only by the run task, exactly once.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import zipfile
from typing import Any

from distributed import Client

from daskrun.engine.config import config_get
from daskrun.engine.lost import LostTasks
from daskrun.engine.pools import pool_names
from daskrun.engine.prepare import PHASE, preprocess_mini_batches
from daskrun.engine.tasks import process_mini_batches
from daskrun.exceptions import ConfigError, JobFailedError


def script_has_preprocess(source: str) -> bool:
    """Whether an entry script's ``source`` defines ``preprocess`` at its top
    level (a function, an assignment or an import of that name).

    >>> script_has_preprocess("def preprocess(b):\\n    return b\\n")
    True
    >>> script_has_preprocess("from helpers import prep as preprocess")
    True
    >>> script_has_preprocess("def run(b):\\n    preprocess = 1\\n")
    False
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:  # the workers report it, naming the line
        return False
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.asname or a.name for a in node.names]
        else:
            continue
        if "preprocess" in names:
            return True
    return False


def run_key(key: Any) -> Any:
    """The key of the run task a preprocess task of ``key`` feeds; any
    other key as it is.

    >>> run_key(("run-3f2a-preprocess", 7)), run_key(("run-3f2a", 7))
    (('run-3f2a', 7), ('run-3f2a', 7))
    """
    if isinstance(key, tuple) and key and str(key[0]).endswith(f"-{PHASE}"):
        return (str(key[0])[: -len(PHASE) - 1], *key[1:])
    return key


def _plugin_source(plugin: Any) -> str | None:
    """The entry script's source, from the bundle the plugin carries."""
    settings = getattr(plugin, "settings", None)
    if settings is None:
        return None
    with zipfile.ZipFile(io.BytesIO(settings.bundle)) as zf:
        return zf.read(settings.script).decode("utf-8", errors="replace")


def _ahead(run_slots: int) -> int:
    """``daskrun.preprocess.ahead``, checked; ``None``: 2 per run slot."""
    ahead = config_get("preprocess.ahead")
    if ahead is None:
        return 2 * run_slots
    if isinstance(ahead, bool) or not isinstance(ahead, int) or ahead < 0:
        raise ConfigError(
            f"daskrun.preprocess.ahead={ahead!r} is not a number of mini-batches; "
            "use an int like 2, or null for 2 per run() worker"
        )
    return ahead


@dataclasses.dataclass(frozen=True)
class TwoStage:
    """How a two-stage step's tries are submitted: the resources each stage
    asks for (``None``: any worker) and the runner's bound on tries in
    flight."""

    run_resources: dict[str, float] | None
    cpu_resources: dict[str, float] | None
    run_slots: int
    ahead: int

    @classmethod
    def of(
        cls, client: Client, plugin: Any, collection: bool = False
    ) -> TwoStage | None:
        """The stages of ``plugin``'s step on ``client``'s workers; ``None``
        for a script without ``preprocess()``. The partitions of a Dask
        ``collection`` go to ``run()`` as they are: with ``preprocess()``
        too, the step fails in one line.

        A stage whose resource no worker advertises runs on any worker (a
        cluster without pools runs both stages everywhere); CPU workers
        without any run worker cannot run ``run()``, whose ``init()`` they
        skip, and fail the step in one line.
        """
        source = _plugin_source(plugin)
        if source is None or not script_has_preprocess(source):
            return None
        if collection:
            raise JobFailedError(
                "the entry script has preprocess(), which a Dask collection's "
                "partitions do not go through (run() gets each partition); "
                "do that work in the collection (map_partitions) or in run()"
            )
        run, cpu = pool_names()
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        runners = [w for w in workers if (w.get("resources") or {}).get(run)]
        feeders = [w for w in workers if (w.get("resources") or {}).get(cpu)]
        if feeders and not runners:
            raise JobFailedError(
                f"the entry script has preprocess(), and {len(feeders)} workers "
                f"advertise the resource {cpu} but none {run} for run(); start "
                f"run() workers with resources {{'{run}': 1}} (dask worker "
                f"--resources {run}=1), or set daskrun.preprocess.run-resource"
            )
        slots = sum(int(w.get("nthreads", 1)) for w in runners or workers) or 1
        return cls(
            {run: 1} if runners else None,
            {cpu: 1} if feeders else None,
            slots,
            _ahead(slots),
        )

    @property
    def limit(self) -> int:
        """Tries in flight at most: one per run slot, and ``ahead`` more
        whose preprocessed batches wait for a run slot."""
        return self.run_slots + self.ahead

    def submit(
        self, client: Client, plugin_name: str, group: list[tuple[Any, int]], key: Any
    ) -> tuple[Any, Any]:
        """Submit ``group``'s two tasks (a :data:`~daskrun.engine.runner.SubmitGroup`);
        the run task's future, twice: the one watched and the one giving its
        results. The preprocess task's future is dropped at once: the run
        task holds its result on the cluster until it is done."""
        prepared = client.submit(
            preprocess_mini_batches,
            plugin_name,
            group,
            key=(f"{key[0]}-{PHASE}", *key[1:]),
            pure=False,
            resources=self.cpu_resources,
        )
        running = client.submit(
            process_mini_batches,
            plugin_name,
            group,
            prepared=prepared,
            key=key,
            pure=False,
            resources=self.run_resources,
        )
        return running, running


class StageLostTasks(LostTasks):
    """:class:`~daskrun.engine.lost.LostTasks` that names a hung
    ``preprocess()`` as such."""

    def timeout_error(self, batch: Any, msg: dict[str, Any]) -> str:
        if msg.get("phase") != PHASE:
            return super().timeout_error(batch, msg)
        return (
            f"TimeoutError: preprocess() did not return within "
            f"run_invocation_timeout={self.timeout:g} s; {msg['worker']} was "
            "restarted"
        )
