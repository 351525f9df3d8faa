"""Named outputs: several outputs of one step, each its own file in its own
folder and format, every one exactly once and in input order.

``run()`` returns a dict of output name to rows (a list, or a DataFrame).
A mini-batch's rows of all its outputs are one part: one file, written with
one atomic rename (or one PUT), so a kill never leaves one output's rows
committed and another's not. The part's first line says where each
output's section lies, and how many items the mini-batch counts (one per
input, whatever the outputs hold)::

    {"items": 10, "sizes": [["scores", 131], ["embeddings", 4096]]}
    <scores' rows, as CSV><embeddings' rows, as Parquet>

Groups, pieces of isolated mini-batches, the client-written output
(:mod:`daskrun.engine.viaclient`) and resume handle such a part as any
other. When the job ends within its thresholds, the client assembles each
output from its sections, in index order, into a temporary file in that
output's folder, and publishes them only once every one is assembled, one
rename each: a failed job publishes none. The single ``output=`` is an
:class:`~daskrun.engine.output.OutputTarget` as before.

>>> sections = Sections((NamedOutput("a", "/out/a", "a.txt", "text"),
...                      NamedOutput("b", "/out/b", "b.csv", "csv")))
>>> part, items = sections.encode({"a": ["x", "y"], "b": [1, 2]}, 2)
>>> items, section(part, "a"), section(part, "b")
(2, b'x\\ny\\n', b'result\\n1\\n2\\n')
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from daskrun.backends.outputs import OutputFormat, output_format_for
from daskrun.backends.outputs.base import Part
from daskrun.engine.output import (
    OutputTarget,
    Parts,
    bounded,
    discard_staged,
    in_order,
    publish_staged,
    publishing,
    remove_parts,
    stage,
)
from daskrun.engine.viaclient import ViaClientTarget


@dataclass(frozen=True)
class NamedOutput:
    """One named output of a step: its folder (an absolute local path or an
    fsspec URL), its file's name there and its format (a kind of
    :data:`daskrun.backends.outputs.FORMATS`)."""

    name: str
    url: str
    file_name: str
    output_format: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def final_url(self) -> str:
        return f"{self.url.rstrip('/')}/{self.file_name}"

    def target(self, run_id: str, timeout: float | None) -> OutputTarget:
        """This output alone, as a run's single output would be."""
        return OutputTarget(
            self.url,
            self.file_name,
            run_id,
            self.storage_options,
            self.output_format,
            timeout,
        )


def section(part: bytes, name: str) -> bytes:
    """Output ``name``'s rows in a part of several outputs."""
    header, _, body = part.partition(b"\n")
    offset = 0
    for each, size in json.loads(header)["sizes"]:
        if each == name:
            return body[offset : offset + size]
        offset += size
    return b""  # written before the output was added: never, as plans go


class Sections(OutputFormat):
    """A part of several named outputs (see the module docstring); not a
    format of a published file, so it has no ``kind``."""

    tabular = False

    def __init__(self, outputs: Sequence[NamedOutput]):
        self.outputs = tuple(outputs)

    def __repr__(self) -> str:
        return f"Sections({[o.name for o in self.outputs]!r})"

    def encode(self, result: Any, items: int | None = None) -> tuple[bytes, int]:
        """``run()``'s dict as one part, and its items: ``items`` (the
        mini-batch's inputs), else the most rows of any output."""
        _check_names(result, [o.name for o in self.outputs])
        sizes, bodies, rows = [], [], []
        for output in self.outputs:
            data, count = _encoded(output, result[output.name])
            sizes.append([output.name, len(data)])
            bodies.append(data)
            rows.append(count)
        header = json.dumps({"items": _items(items, rows), "sizes": sizes})
        return b"".join([header.encode(), b"\n", *bodies]), _items(items, rows)

    def count(self, part: Any) -> int:
        return int(json.loads(part.readline())["items"])

    def concat(
        self, parts: Iterable[Part], out: Any, name: Callable[[int], str]
    ) -> None:
        raise NotImplementedError("each named output is assembled on its own")

    def read_frame(self, path: str, options: Mapping[str, Any], **kwargs: Any) -> Any:
        raise NotImplementedError("each named output is read on its own")


def _items(items: int | None, rows: Sequence[int]) -> int:
    return items if items is not None else max(rows, default=0)


def _check_names(result: Any, names: Sequence[str]) -> None:
    """Refuse a result that is not a dict of exactly the step's outputs."""
    shown = ", ".join(map(repr, names))
    if not isinstance(result, Mapping):
        raise TypeError(
            f"run() returned {type(result).__name__}; a step with outputs= returns "
            f"a dict of output name to rows, with every output: {shown}"
        )
    for name in names:
        if name not in result:
            raise ValueError(
                f"run() returned no output {name!r}; return a dict with every "
                f"output of the step: {shown}"
            )
    for name in result:
        if name not in names:
            raise ValueError(
                f"run() returned an output {name!r} that the step does not have "
                f"(its outputs: {shown}); leave it out, or add it to outputs="
            )


def _encoded(output: NamedOutput, rows: Any) -> tuple[bytes, int]:
    """One output's rows in its format; an error names the output."""
    try:
        return output_format_for(output.output_format).encode(rows)
    except Exception as e:
        said = str(e).removeprefix("run() returned ")
        if said == str(e):
            said = f"rows that cannot be written as {output.output_format}: {e}"
        raise TypeError(f"run() returned for output {output.name!r} {said}") from e


@dataclass(frozen=True)
class OutputSet(OutputTarget):
    """A step's named outputs as one run's output (see the module
    docstring). Its parts live under the first output's folder, as a single
    output's do; each output is assembled into its own folder."""

    outputs: tuple[NamedOutput, ...] = ()

    @classmethod
    def of_named(
        cls, outputs: Sequence[NamedOutput], run_id: str, timeout: float | None
    ) -> OutputSet:
        first = outputs[0]
        return cls(
            first.url,
            first.file_name,
            run_id,
            first.storage_options,
            first.output_format,
            timeout,
            tuple(outputs),
        )

    @cached_property
    def format(self) -> OutputFormat:
        return Sections(self.outputs)

    def encode(self, result: Any, items: int | None = None) -> tuple[bytes, int]:
        return Sections(self.outputs).encode(result, items)

    def folders(self) -> list[OutputTarget]:
        return [o.target(self.run_id, self.timeout) for o in self.outputs]

    def publish(
        self, succeeded: Sequence[int], describe: Callable[[int], str] | None = None
    ) -> str:
        """Assemble every output, then publish them all; the first one's
        final file. If any fails to assemble, none is published."""
        name = describe or (lambda index: f"mini-batch {index}")
        views = [o.target(self.run_id, self.timeout) for o in self.outputs]
        with publishing(self):
            found = Parts(self)
            order = list(in_order(found, succeeded))
            reader = _Reader(found)
            try:
                for output, view in zip(self.outputs, views, strict=True):
                    _make_run_folder(view)
                    parts = (
                        (index, functools.partial(reader.open, index, span, output))
                        for index, span in order
                    )
                    stage(view, parts, _naming(name, output.name))
            except BaseException:
                for view in views:
                    discard_staged(view)
                raise
            for view in views:
                publish_staged(view)
        for view in views:
            if view.run_url != self.run_url:  # the parts stay for the job
                remove_parts(view)
        return views[0].final_url

    def finals(self) -> dict[str, str]:
        """Each output's final file, by name."""
        return {o.name: o.final_url for o in self.outputs}


@dataclass(frozen=True)
class ViaClientSet(ViaClientTarget, OutputSet):
    """Named outputs whose parts the client writes
    (:mod:`daskrun.engine.viaclient`)."""


class _Reader:
    """Opens an output's section of a part; the last part read is kept,
    as pieces of one mini-batch come in a row."""

    def __init__(self, found: Parts):
        self.found = found
        self._cached: tuple[Any, bytes] = (None, b"")

    def open(
        self, index: int, span: tuple[int, int] | None, output: NamedOutput
    ) -> io.BytesIO:
        if self._cached[0] != (index, span):
            with self.found.open(index, span) as f:
                self._cached = ((index, span), f.read())
        return io.BytesIO(section(self._cached[1], output.name))


def _naming(name: Callable[[int], str], output: str) -> Callable[[int], str]:
    """``name`` of a mini-batch, saying which output an error is about."""
    return lambda index: f"{name(index)} (output {output!r})"


def _make_run_folder(view: OutputTarget) -> None:
    """The folder an output's file is assembled in (the first one's holds
    the parts already)."""
    fs = view.fs()
    bounded(
        view,
        "creating the output's folder",
        lambda: fs.makedirs(view.run_url, exist_ok=True),
    )
