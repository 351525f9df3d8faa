"""The code a run ran, and the code a resume of it runs.

A run records the bundle it shipped to its workers (``source.zip`` in its
folder: the entry script, or what its ``source_directory`` ships) and a
digest of it. A resume ships the entry script's folder as it is now, where
it still is; if the Python files in it (and the entry script) changed since
the bundle last shipped, the resume is refused in one line naming them,
unless ``new_source`` (``daskrun resume RUN_ID --new-source``) says to run
the edited code. Where the folder is gone, the recorded copy runs. Each
bundle a run shipped stays in its folder, and the record keeps every
digest (:attr:`~daskrun.registry.records.RunRecord.source_digests`), oldest first.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import zipfile
from pathlib import Path

from daskrun.backends.storage import private_open, private_tree
from daskrun.exceptions import ConfigError
from daskrun.registry.records import SOURCE, RunRecord


def bundle_digest(bundle: bytes | Path) -> str:
    """A digest of a bundle's files (names, sizes and CRCs), whatever their
    mtimes: the same code gives the same digest.

    >>> buf = io.BytesIO()
    >>> with zipfile.ZipFile(buf, "w") as zf:
    ...     zf.writestr("score.py", "def init(): pass")
    >>> bundle_digest(buf.getvalue())
    'sha256:518ca04b7f63e534'
    """
    h = hashlib.sha256()
    for name, (size, crc) in sorted(_members(bundle).items()):
        h.update(f"{name}\0{size}\0{crc}\n".encode("utf-8", "surrogateescape"))
    return f"sha256:{h.hexdigest()[:16]}"


def _members(bundle: bytes | Path) -> dict[str, tuple[int, int]]:
    source = io.BytesIO(bundle) if isinstance(bundle, bytes) else bundle
    with zipfile.ZipFile(source) as zf:
        return {i.filename: (i.file_size, i.CRC) for i in zf.infolist()}


class RunSource:
    """Where a run's code is now, and whether it is still the run's.

    Parameters
    ----------
    record : RunRecord
        The run being resumed.
    new_source : bool
        Run the code as it is now, even where it changed.
    """

    def __init__(self, record: RunRecord, new_source: bool = False):
        self.record, self.new_source = record, new_source
        config = record.config
        # the entry script and the folder shipped with it, where the run
        # found them (absolute paths, as the run resolved them)
        self.script = Path(config.get("entry_script") or record.script)
        folder = config.get("source_directory")
        self.folder = Path(folder) if folder else None

    @property
    def recorded(self) -> Path:
        return self.record.folder / SOURCE

    def present(self) -> bool:
        """Whether the run's entry script (and its folder) are still there."""
        return self.script.is_file() and (self.folder is None or self.folder.is_dir())

    def location(self) -> tuple[str, str | None]:
        """``(entry_script, source_directory)`` for the resumed step: where
        the run found them, or the recorded copy unpacked into the run
        folder where they are gone."""
        if self.present():
            return str(self.script), None if self.folder is None else str(self.folder)
        if self.new_source:
            raise ConfigError(
                f"--new-source (new_source=True): run {self.record.run_id!r}'s "
                f"entry script {str(self.script)!r} is gone; put it back where "
                "it was, or resume without --new-source to run the recorded copy"
            )
        return self.unpacked()

    def unpacked(self) -> tuple[str, str]:
        """The recorded copy, unpacked into the run folder: ``(entry_script,
        source_directory)``."""
        unpacked = self.record.folder / "source"
        shutil.rmtree(unpacked, ignore_errors=True)
        with zipfile.ZipFile(self.recorded) as zf:
            zf.extractall(unpacked)
        private_tree(unpacked)
        return self.record.script, str(unpacked)

    def changes(self, bundle: Path) -> list[str]:
        """The entry script and Python files that differ between the bundle
        the run last shipped and ``bundle``: ``"score.py changed"``,
        ``"util.py added"``, ``"old.py removed"``. Other files (data, a
        marker file) are not compared: they ship as they are."""
        was, now = _members(self.recorded), _members(bundle)
        script = self.record.script

        def code(name: str) -> bool:
            return name == script or name.endswith(".py")

        found = [
            f"{name} changed"
            for name in sorted(was.keys() & now.keys())
            if code(name) and was[name] != now[name]
        ]
        found += [f"{n} added" for n in sorted(now.keys() - was.keys()) if code(n)]
        found += [f"{n} removed" for n in sorted(was.keys() - now.keys()) if code(n)]
        return found

    def check(self, bundle: Path) -> None:
        """Refuse to run changed code without ``new_source``."""
        if self.new_source or not self.recorded.is_file():
            return
        found = self.changes(bundle)
        if not found:
            return
        shown = ", ".join(found[:5]) + (
            f" and {len(found) - 5} more" if len(found) > 5 else ""
        )
        where = self.folder if self.folder is not None else self.script.parent
        raise ConfigError(
            f"the code of run {self.record.run_id!r} changed since it ran: "
            f"{shown} (in {where}); resume with --new-source (new_source=True) "
            "to run it as it is now, or put the files back as they were"
        )

    def keep(self, bundle: bytes) -> None:
        """Record ``bundle`` as what the run ships now: the earlier one stays
        beside it as ``source-<digest>.zip``, and its digest is added to the
        record (saved when the run starts)."""
        record = self.record
        digests = record.source_digests
        if not digests and self.recorded.is_file():  # a record of before
            digests.append(bundle_digest(self.recorded))
        digest = bundle_digest(bundle)
        if digests and digests[-1] == digest:
            return
        if self.recorded.is_file():
            old = digests[-1].split(":")[-1] if digests else "earlier"
            os.replace(self.recorded, record.folder / f"source-{old}.zip")
        with private_open(self.recorded, "wb") as f:
            f.write(bundle)
        digests.append(digest)
