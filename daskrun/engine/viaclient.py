"""``daskrun.output.via-client``: results travel through Dask to the client,
which writes the output.

A :class:`ViaClientTarget` is an :class:`~daskrun.engine.output.OutputTarget` whose
workers never touch the output folder: a worker formats a mini-batch's rows
as for its part and returns them with its
:class:`~daskrun.engine.plugin.TryResult`; the client writes the part
(:func:`commit`), one atomic step per mini-batch, before the mini-batch
counts as done. Parts, resume and assembly are those of any output, so the
output is exactly once and in input order; a local output folder then works
on any cluster, including one whose workers do not see the client's disk.
The cost: every row crosses the network to the client, which writes alone.

:mod:`daskrun.engine.preflight` turns it on where the hosts do not share the
output folder; ``daskrun.output.via-client: true`` turns it on always.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from daskrun.backends.inputs.datasets import SubBatch
from daskrun.backends.storage import storage_failures
from daskrun.engine.output import OutputTarget, write_part
from daskrun.exceptions import DaskRunError

# a kind of output target -> its client-written twin (see ViaClientTarget)
_TWINS: dict[type[OutputTarget], type[ViaClientTarget]] = {}


@dataclass(frozen=True)
class ViaClientTarget(OutputTarget):
    """An output written by the client alone (see the module docstring).

    A subclass that also derives from another kind of output target (e.g.
    :class:`~daskrun.engine.outputs.ViaClientSet`) is that kind's
    client-written twin, registered by being defined."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in cls.__mro__[1:]:
            if issubclass(base, OutputTarget) and not issubclass(base, ViaClientTarget):
                _TWINS[base] = cls
                break

    @classmethod
    def of(cls, target: OutputTarget) -> ViaClientTarget:
        """``target``, written by the client."""
        if isinstance(target, ViaClientTarget):
            return target
        made = _TWINS.get(type(target), cls)
        fields = dataclasses.fields(target)
        return made(**{f.name: getattr(target, f.name) for f in fields})

    @property
    def grouped(self) -> bool:
        return False  # each part is the client's to write, as it arrives

    def keep(
        self, index: int, data: bytes, span: tuple[int, int] | None = None
    ) -> bytes | None:
        """On a worker: the rows go back to the client, unwritten."""
        return data


def commit(target: OutputTarget, batch: Any, result: Any) -> Any:
    """On the client: write the rows a worker returned (``result.rows``) as
    mini-batch ``batch``'s part, or the part of its items ``[start, stop)``
    for a piece of it; the result without its rows. A part that cannot be
    written fails the try, which is retried as any other."""
    rows = getattr(result, "rows", None)
    if rows is None:
        return result
    span = (batch.start, batch.stop) if isinstance(batch, SubBatch) else None
    try:
        write_part(target, result.index, rows, span)
    # storage's failures (and daskrun's OutputError on a timeout) fail the
    # try; a bug is raised
    except storage_failures(DaskRunError) as e:
        return dataclasses.replace(
            result,
            ok=False,
            rows=None,
            items_out=0,
            error=f"{type(e).__name__}: writing its part on the client: {e}",
        )
    return dataclasses.replace(result, rows=None)
