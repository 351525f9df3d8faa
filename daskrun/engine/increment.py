"""Incremental runs: only the inputs that are new or changed since the
output's last complete run of the step run again.

An incremental run keeps, once it has published its output, its parts
(``<output>/.daskrun/<run_id>/parts``) and an index beside them
(``index.json``: the step's identity and layout, each mini-batch's digest,
first input file and file count, and the input listing);
``<output>/.daskrun/increment.json`` names the run kept. It is replaced (one
rename, or one PUT) after the output file is published, and only then is the
run kept before deleted.

The next incremental run plans every input, its file mini-batches lined up
with the kept run's (:meth:`~daskrun.backends.inputs.base.Input.plan_around`;
tables and partitions never cross a file, so they line up already). A
mini-batch whose digest (what it reads, its files' sizes and mtimes or ETags:
:func:`~daskrun.engine.ledger.batch_digest`) is that of a kept mini-batch
written whole gets the kept rows copied as its own part before anything runs,
and counts as done, as a resume counts a committed part. Everything else
runs. The output is then assembled from the parts as any run's, in input
order, and published atomically: until then the earlier output and the kept
run stay as they were, so a kill at any point leaves them readable, and a
resume copies and runs what is left, once.

A different entry script (its Python files), arguments or registered model
versions run everything, in one line saying why, unless ``incremental=
"inputs"`` compares the inputs alone; a different output format, file name,
kind of input or reading options always do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from daskrun.engine import output as _output
from daskrun.engine.description import JobDescription
from daskrun.engine.ledger import batch_digest, read_listing, read_plan
from daskrun.exceptions import ConfigError

logger = logging.getLogger("daskrun")

POINTER = "increment.json"  # in <output>/.daskrun: the run kept
INDEX = "index.json"  # in <output>/.daskrun/<run_id>: what its parts hold
_MODES = {"all": "all", "inputs": "inputs"}


def check_incremental(value: object) -> str | None:
    """``incremental=`` as a step keeps it: ``None`` (off), ``"all"``
    (inputs, code, arguments and models compared) or ``"inputs"``.

    >>> check_incremental(True), check_incremental("inputs"), check_incremental(False)
    ('all', 'inputs', None)
    """
    if value is None or value is False:
        return None
    if value is True:
        return "all"
    if isinstance(value, str) and value in _MODES:
        return _MODES[value]
    raise ConfigError(
        f"incremental={value!r} is not a choice; use incremental=True (new or "
        "changed inputs run; a changed script, arguments or model runs all), "
        "incremental='inputs' (compare the inputs only) or False"
    )


class Increment:
    """What an incremental run keeps of the output's kept run: built
    before the job plans (it lines the plan up), then :meth:`carry` copies
    the rows it keeps, and :meth:`publish` keeps this run once its output
    is published.

    Parameters
    ----------
    described : JobDescription
        The run (its ``incremental`` mode is set).
    target : OutputTarget
        Its output.
    bundle : (Path, str)
        The source bundle and the entry script's name in it (the code
        compared).
    """

    def __init__(
        self,
        described: JobDescription,
        target: _output.OutputTarget,
        bundle: tuple[Path, str],
    ):
        self.described, self.target = described, target
        self.identity = _identity(described, *bundle)
        self.layout = _layout(described)
        self.kept_run: str | None = None
        self.why: str | None = None  # why nothing is kept
        self.reused: dict[int, int] = {}  # this run's mini-batch -> kept one
        self.counts: dict[str, int] = {}
        self._starts: dict[str, int] = {}  # a kept file mini-batch's first file
        self._digests: dict[bytes, int] = {}  # a kept whole mini-batch's
        self._listing: dict[str, list[str]] = {}
        self._around: dict[tuple[int, int], Any] = {}
        self._load()

    def _load(self) -> None:
        """Read the kept run's index; :attr:`why` says why none is used."""
        target = self.target
        pointer = _read_json(target, f"{_root(target)}/{POINTER}")
        if pointer is None:
            self.why = "no earlier complete run in this output folder"
            return
        run_id = str(pointer.get("run_id"))
        if run_id == target.run_id:  # this run, published once (a resume)
            return
        index = _read_json(target, f"{_root(target)}/{run_id}/{INDEX}")
        if index is None:
            self.why = f"run {run_id}'s index is missing"
            return
        if index.get("layout") != self.layout:
            self.why = (
                f"the output format, file name, kind of input or reading options "
                f"changed since run {run_id}"
            )
            return
        mode = self.described.incremental
        if mode != "inputs" and index.get("identity") != self.identity:
            self.why = (
                f"the entry script, its arguments or a model version changed since "
                f"run {run_id} (incremental='inputs' compares the inputs only)"
            )
            return
        whole = _output.Parts(replace(target, run_id=run_id)).whole
        for i, (digest, first, n) in enumerate(index["batches"]):
            if i in whole:
                self._digests.setdefault(bytes.fromhex(digest), i)
                self._starts[first] = n
        self._listing = index["inputs"]
        self.kept_run = run_id

    def plan(self, size: int, pilot: int) -> tuple[Iterable[Any], int] | None:
        """The job's plan lined up with the kept run's mini-batches, or
        ``None`` for the usual plan (no run kept, a pilot first, or an input
        whose plan lines up already)."""
        described = self.described
        if pilot and self.kept_run is not None:
            # the pilot's plan is replaced once it ends: nothing is kept
            self.kept_run, self._digests = None, {}
            self.why = "mini_batch_size='auto' runs a pilot of one-file mini-batches"
        if self.kept_run is None or described.cfg.partition_keys:
            return None
        if (size, pilot) not in self._around:  # planned again to fill the ledger
            self._around[size, pilot] = self._plan_around(size)
        return self._around[size, pilot]

    def _plan_around(self, size: int) -> tuple[Iterable[Any], int] | None:
        described = self.described
        current = {
            path: (n, stamp)
            for ds in described.inputs
            for path, n, stamp in ds.stamps()
        }

        def kept(files: Sequence[str], i: int) -> int:
            k = self._starts.get(files[i], 0)
            if not k or i + k > len(files):
                return 0
            chunk = files[i : i + k]
            digest = batch_digest("\0".join(chunk), [current.get(f) for f in chunk])
            return k if digest in self._digests else 0

        return described.input_type.plan_around(
            described.inputs, size, described.own_output(), kept
        )

    def carry(self, run_dir: Path, batches: Iterable[Any], resuming: bool) -> None:
        """Copy the kept rows of each planned mini-batch (``batches``; the
        run's committed ledger in ``run_dir``) whose digest is a kept one's
        into this run's parts, those a resume finds written left as they
        are; count the inputs reused, new, changed and removed."""
        if self.kept_run is not None:
            for new, digest in enumerate(read_plan(run_dir)):
                old = self._digests.get(digest)
                if old is not None:
                    self.reused[new] = old
            _copy_parts(self.target, self.kept_run, self.reused, resuming)
        self._count(read_listing(run_dir), batches)

    def _count(
        self, listing: dict[str, tuple[str, str]], batches: Iterable[Any]
    ) -> None:
        was = {path: tuple(stamp) for path, stamp in self._listing.items()}
        new = sum(path not in was for path in listing)
        changed = sum(
            path in was and was[path] != stamp for path, stamp in listing.items()
        )
        removed = sum(path not in listing for path in was)
        kept: set[str] = set()
        ran: set[str] = set()
        if self.reused:
            for batch in batches:
                files = _files_read(batch)
                (kept if batch.index in self.reused else ran).update(files)
        self.counts = {
            "inputs_reused": len(kept - ran),
            "inputs_new": new if self.kept_run is not None else len(listing),
            "inputs_changed": changed if self.kept_run is not None else 0,
            "inputs_removed": removed if self.kept_run is not None else 0,
        }

    def line(self, total: int) -> str | None:
        """What the run keeps, in one line for the terminal (none for a
        resume of a run that kept itself)."""
        c = self.counts
        if self.kept_run is None and self.why is None:
            return None
        if self.kept_run is None:
            return (
                f"daskrun: incremental: {self.why or 'nothing kept'}; processing "
                f"all {c['inputs_new']} inputs"
            )
        return (
            f"daskrun: incremental: {c['inputs_reused']} inputs reused, "
            f"{c['inputs_new']} new, {c['inputs_changed']} changed, "
            f"{c['inputs_removed']} removed since run {self.kept_run}; "
            f"{total - len(self.reused)} of {total} mini-batches to run"
        )

    def lines(self) -> list[str]:
        """The counts, as ``job_result.txt`` lines."""
        return [f"{name}: {n}" for name, n in self.counts.items()]

    def publish(self, run_dir: Path, batches: Iterable[Any]) -> None:
        """Keep this run (its output is published): write its index, point
        the output folder at it, then delete the run kept before. A failure
        here leaves the earlier kept run in place (the next incremental run
        then keeps less), and is a warning, not the job's."""
        target = self.target
        starts = [
            (files[0], len(files)) if files else ("", 0)
            for files in (_files_read(batch) for batch in batches)
        ]
        digests = read_plan(run_dir)
        index = {
            "run_id": target.run_id,
            "identity": self.identity,
            "layout": self.layout,
            "batches": [
                [d.hex(), first, n]
                for d, (first, n) in zip(digests, starts, strict=False)
            ],
            "inputs": {p: list(stamp) for p, stamp in read_listing(run_dir).items()},
        }
        try:
            _write_json(target, f"{target.run_url}/{INDEX}", index)
            _write_json(target, f"{_root(target)}/{POINTER}", {"run_id": target.run_id})
        except Exception as e:
            logger.warning(
                "run %s: its output is published, but it could not be kept for "
                "the next incremental run (%s)",
                target.run_id,
                type(e).__name__,
            )
            return
        for run_id in _kept_before(target):
            _remove_run(replace(target, run_id=run_id))


def _files_read(batch: Any) -> list[str]:
    """The files a mini-batch reads: its paths (files, a partition), or the
    one file a table's mini-batch is cut from; none for a collection's."""
    paths = getattr(batch, "paths", None)
    if paths is not None:
        return list(paths)
    path = getattr(batch, "path", None)
    return [] if path is None else [path]


def _root(target: _output.OutputTarget) -> str:
    return f"{target.url.rstrip('/')}/.daskrun"


def _identity(described: JobDescription, bundle: Path, script: str) -> str:
    """A digest of the code (the entry script and the bundle's Python files:
    names, sizes and CRCs), the arguments and the registered model
    versions."""
    h = hashlib.sha256()
    with zipfile.ZipFile(bundle) as zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            if info.filename == script or info.filename.endswith(".py"):
                h.update(f"{info.filename}\0{info.file_size}\0{info.CRC}\n".encode())
    h.update(repr([str(a) for a in described.arguments]).encode())
    models = sorted((m.name, m.version) for m in described.models or ())
    h.update(repr(models).encode())
    return h.hexdigest()


def _layout(described: JobDescription) -> str:
    """A digest of what shapes the rows beside the code: the output's file
    name and format, the kind of input, its format and reading options."""
    cfg, first = described.cfg, described.inputs[0]
    shape = (
        cfg.append_row_file_name,
        cfg.output_format,
        described.kind,
        getattr(first, "file_format", None),
        sorted(getattr(first, "pandas_kwargs", {}).items()),
        tuple(cfg.partition_keys or ()),
    )
    return hashlib.sha256(repr(shape).encode()).hexdigest()


def _read_json(target: _output.OutputTarget, url: str) -> dict[str, Any] | None:
    fs = target.fs()

    def read() -> bytes | None:
        try:
            return bytes(fs.cat_file(url))
        except FileNotFoundError:
            return None

    data = _output.bounded(target, "reading the kept run's index", read)
    try:
        return None if data is None else dict(json.loads(data))
    except ValueError:
        return None


def _write_json(target: _output.OutputTarget, url: str, value: Any) -> None:
    """Write ``value`` at ``url`` in one atomic step."""
    data = json.dumps(value).encode()
    if target.local:
        tmp = f"{os.path.dirname(url)}/.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, url)
        return
    fs = target.fs()
    _output.bounded(target, "keeping the run", lambda: fs.pipe_file(url, data))


def _copy_parts(
    target: _output.OutputTarget, kept_run: str, reused: dict[int, int], resuming: bool
) -> None:
    """Write each reused mini-batch's kept rows as this run's, grouped
    (:func:`~daskrun.engine.output.write_group`) up to ``GROUP_BYTES``."""
    done = _output.Parts(target).whole if resuming else set()
    todo = [(new, old) for new, old in sorted(reused.items()) if new not in done]
    if not todo:
        return
    kept = _output.Parts(replace(target, run_id=kept_run))
    group: list[tuple[int, bytes]] = []
    size = 0
    for new, old in todo:
        with kept.open(old) as f:
            data = bytes(f.read())
        group.append((new, data))
        size += len(data)
        if size >= _output.GROUP_BYTES:
            _output.write_group(target, group)
            group, size = [], 0
    if group:
        _output.write_group(target, group)


def _kept_before(target: _output.OutputTarget) -> list[str]:
    """The runs kept in ``target``'s output folder before its run (those
    with an index: a kill between keeping this run and deleting them left
    more than one); runs in progress have none yet."""
    fs = target.fs()
    root = _root(target)
    fs.invalidate_cache(fs._strip_protocol(root))
    try:
        found = _output.bounded(
            target, "listing the kept runs", lambda: fs.ls(root, detail=False)
        )
    except FileNotFoundError:
        return []
    names = [name.rstrip("/").rsplit("/", 1)[-1] for name in found]
    return [
        name
        for name in names
        if name != target.run_id and fs.exists(f"{root}/{name}/{INDEX}")
    ]


def _remove_run(target: _output.OutputTarget) -> None:
    """Delete a kept run's folder in the output (it is kept no more)."""
    if target.local:
        shutil.rmtree(target.run_url, ignore_errors=True)
        return
    fs = target.fs()
    with contextlib.suppress(Exception):  # what is left is never read again
        fs.rm(target.run_url, recursive=True)


def incremental(
    described: JobDescription, target: Any, bundle: tuple[Path, str]
) -> Increment | None:
    """The run's :class:`Increment`, if its step is incremental; one without
    an ``append_row`` output is refused in one line, before anything runs."""
    if not described.incremental:
        return None
    if target is None:
        raise ConfigError(
            f"incremental={described.incremental!r} keeps the rows of an output "
            "file; use output_action='append_row' with an output folder"
        )
    return Increment(described, target, bundle)
