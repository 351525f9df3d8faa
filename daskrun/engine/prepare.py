"""The CPU stage of a two-stage step, on a worker: ``preprocess()`` tasks.

An entry script that defines ``preprocess(mini_batch)`` besides ``run()``
runs in two stages (:mod:`daskrun.engine.stages` on the client): a task of
:func:`preprocess_mini_batches` reads a mini-batch and calls
``preprocess()`` on a worker of the CPU pool; what it returns stays in that
worker's memory until Dask hands it to the ``run()`` task
(:func:`~daskrun.engine.tasks.process_mini_batches` with ``prepared=``) on a
worker of the run pool. ``init()`` runs only in the run pool
(:func:`~daskrun.engine.pools.runs_init`). A ``preprocess()`` that raises is
a failed try of its mini-batch, as a ``run()`` that raises is; one that hangs
is stopped by the watchdog (phase ``"preprocess"``) within
``run_invocation_timeout``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from distributed import get_worker

from daskrun.backends.inputs.datasets import MiniBatch, SubBatch
from daskrun.engine.plugin import TryResult, _failure, ready_plugin

PHASE = "preprocess"  # the watchdog's phase while preprocess() runs


@dataclass(frozen=True)
class Prepared:
    """What ``preprocess()`` returned for one try of one mini-batch, with the
    items read and what it printed and logged (shown with the try's
    result). It travels from the CPU worker to the run worker, not to the
    client."""

    value: Any = field(repr=False)
    items_in: int | None
    seconds: float
    stdout: str = ""
    log: str = ""


def preprocess_mini_batches(
    plugin_name: str, tries: Sequence[tuple[MiniBatch | SubBatch, int]]
) -> list[Prepared | TryResult]:
    """The task function of the CPU stage: read each mini-batch (a piece of
    one being isolated reads its slice) and call ``preprocess()`` on it; a
    :class:`Prepared` value each, or the failed :class:`TryResult`."""
    worker = get_worker()
    plugin = ready_plugin(plugin_name)
    cache_root = os.path.join(worker.local_directory, "daskrun-cache")
    return [_prepare(plugin, batch, try_no, cache_root) for batch, try_no in tries]


def _prepare(
    plugin: Any, batch: MiniBatch | SubBatch, try_no: int, cache_root: str
) -> Prepared | TryResult:
    start = time.perf_counter()
    items_in: int | None = batch.n_items
    cache: str | None = None
    piece = batch.start if isinstance(batch, SubBatch) else None
    watchdog = plugin.watchdog
    try:
        watchdog.arm(batch.index, phase="read", piece=piece)
        spec = plugin.settings.input_spec
        mini_batch, read_items, cache = batch.read(spec, cache_root)
        items_in = read_items if read_items is not None else items_in
        watchdog.arm(batch.index, phase=PHASE, piece=piece)
        with plugin.capture.redirect():
            value = plugin.module.preprocess(mini_batch)
    except (Exception, SystemExit) as e:
        failed = _failure(
            batch.index, try_no, plugin.agent, items_in, start, e, plugin.clean
        )
        stdout, log = plugin.capture.take()
        return dataclasses.replace(failed, stdout=stdout, log=log)
    finally:
        watchdog.disarm()
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    stdout, log = plugin.capture.take()
    return Prepared(value, items_in, time.perf_counter() - start, stdout, log)
