"""Which worker does what in a two-stage step (pure, on any process).

A step whose entry script defines ``preprocess()`` runs it on the workers
that advertise the Dask resource ``daskrun.preprocess.cpu-resource`` and
``run()`` on those that advertise ``daskrun.preprocess.run-resource``
(:mod:`daskrun.engine.stages`). The worker plugin asks :func:`runs_init`
whether to call ``init()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

from daskrun.engine.config import config_get


def has_preprocess(module: ModuleType | None) -> bool:
    """Whether an entry script module defines ``preprocess()``."""
    return callable(getattr(module, "preprocess", None))


def pool_names() -> tuple[str, str]:
    """The resources of the run pool and of the CPU pool, read on the
    client (the plugin carries them to the workers).

    >>> pool_names()
    ('GPU', 'CPU')
    """
    return (
        str(config_get("preprocess.run-resource")),
        str(config_get("preprocess.cpu-resource")),
    )


def runs_init(
    module: ModuleType | None,
    resources: Mapping[str, float],
    names: tuple[str, str] = ("GPU", "CPU"),
) -> bool:
    """Whether a worker with Dask ``resources`` runs ``init()``: every worker
    does, except one of a two-stage step's CPU pool (it holds the CPU
    resource ``names[1]``, not the run one ``names[0]``), which only
    preprocesses.

    >>> import types
    >>> two = types.ModuleType("two"); two.preprocess = len
    >>> runs_init(two, {"CPU": 1}), runs_init(two, {"GPU": 1, "CPU": 1})
    (False, True)
    >>> runs_init(types.ModuleType("one"), {"CPU": 1}), runs_init(two, {})
    (True, True)
    """
    run, cpu = names
    if not has_preprocess(module):
        return True
    return not (resources.get(cpu) and not resources.get(run))
